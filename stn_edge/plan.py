"""The planner: a memory budget in, one truncation level per layer out.

Each factorized layer offers options: the levels of its ladder (rank, bytes, predicted loss) whose
bytes are below the layer's dense bytes, and the dense weight itself (dense bytes, zero loss). The
planner picks one option per layer so that the summed predicted loss is smallest while the bytes
held (chosen options + tensors that are never factorized) fit the budget. It runs greedy on the
lower convex hull of each layer's options, then spends what is left on the best single upgrades.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from stn_edge.cost import EngineCost, LayerCost, layer_costs
from stn_edge.errors import BudgetError

if TYPE_CHECKING:
    from stn_edge.format import ArtifactReader

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
    "k": 2**10, "m": 2**20, "g": 2**30,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")


def parse_budget(value: int | float | str | None, full_bytes: int) -> int:
    """Turn a budget into bytes.

    Accepts an int (bytes), a string with a unit (``"12MB"``, ``"3.5MiB"``, ``"800kB"``; kB/MB/GB are
    powers of 1000, KiB/MiB/GiB powers of 1024), a percentage of the full model (``"35%"``), or None
    for the full model.

    >>> parse_budget("50%", 1000)
    500
    >>> parse_budget("2KiB", 0)
    2048
    """
    if value is None:
        return int(full_bytes)
    if isinstance(value, bool):
        raise BudgetError(f"budget {value!r} is not a size; give bytes (int), '12MB', '3MiB' or '35%'")
    if isinstance(value, (int, float)):
        if value <= 0 or value != value:
            raise BudgetError(f"budget {value!r} must be a positive number of bytes")
        return int(value)
    if not isinstance(value, str):
        raise BudgetError(f"budget of type {type(value).__name__} is not understood; give bytes (int), '12MB' or '35%'")
    m = _BUDGET_RE.match(value)
    unit = m.group(2).lower() if m else None
    if m is None or (unit not in _UNITS and unit != "%"):
        raise BudgetError(
            f"budget {value!r} is not understood; use bytes (1200000), a unit (12MB, 3.5MiB, 800kB, 1GB) or a percentage of the model (35%)"
        )
    number = float(m.group(1))
    if number <= 0:
        raise BudgetError(f"budget {value!r} must be positive")
    if unit == "%":
        return int(full_bytes * number / 100.0)
    return int(number * _UNITS[unit])


@dataclass(frozen=True)
class LadderSpec:
    """What the planner needs to know of one factorized layer.

    ``ranks``, ``bytes`` and ``loss`` describe the nested truncation levels (bytes of the factors
    kept at that level, predicted loss of truncating there); ``dense_bytes`` is the cost of running
    the layer dense at zero loss.
    """

    name: str
    family: str
    ranks: tuple[int, ...]
    bytes: tuple[int, ...]
    loss: tuple[float, ...]
    dense_bytes: int
    max_rank: int
    #: predicted time of each level and of the dense layer on the runtime's engine (None: unknown)
    cost: LayerCost | None = None

    def options(self) -> list["Option"]:
        """Every useful option, cheapest first: the levels below the dense bytes, then dense."""
        opts = [Option(b, float(l), j) for j, (b, l) in enumerate(zip(self.bytes, self.loss)) if b < self.dense_bytes]
        opts.append(Option(self.dense_bytes, 0.0, None))
        return sorted(opts, key=lambda o: (o.bytes, o.loss))

    def choice(self, option: "Option") -> "LayerChoice":
        """The plan's record of running this layer as ``option``."""
        rank = self.max_rank if option.level is None else self.ranks[option.level]
        ratio = None if self.cost is None else self.cost.ratio(option.level)
        return LayerChoice(self.name, self.family, option.level, rank, self.max_rank, option.bytes, option.loss, ratio)


class Option(NamedTuple):
    """One way to run a layer: ``level`` of its ladder (None: dense), its bytes and predicted loss."""

    bytes: int
    loss: float
    level: int | None


@dataclass(frozen=True)
class LayerChoice:
    """The plan for one layer: dense, or factorized at ``level`` (index into its ladder)."""

    name: str
    family: str
    level: int | None  # None means dense
    rank: int
    max_rank: int
    bytes: int
    loss: float
    #: predicted time over the dense layer's on the runtime's engine (None: not known)
    time_ratio: float | None = None

    @property
    def dense(self) -> bool:
        return self.level is None


@dataclass
class Plan:
    """The ranks chosen for a budget, with the bytes they hold."""

    budget: int
    full_bytes: int
    fixed_bytes: int
    layers: list[LayerChoice] = field(default_factory=list)
    #: peak bytes of one inference's intermediate values at ``batch_size`` (0: not counted), set by
    #: the runtime (:func:`stn_edge.activations.activation_bytes`)
    activation_bytes: int = 0
    batch_size: int = 1
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        """Bytes of weights held: chosen factors and dense weights, plus tensors never factorized."""
        return self.fixed_bytes + sum(c.bytes for c in self.layers)

    @property
    def loss(self) -> float:
        return sum(c.loss for c in self.layers)

    def choice(self, name: str) -> LayerChoice:
        """The choice for layer ``name`` (KeyError when the plan has no such layer)."""
        i = self._index.get(name)
        if i is None or i >= len(self.layers) or self.layers[i].name != name:  # new, or the layers changed
            self._index = {c.name: j for j, c in enumerate(self.layers)}
            i = self._index[name]
        return self.layers[i]

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "full_bytes": self.full_bytes,
            "total_bytes": self.total_bytes,
            "fixed_bytes": self.fixed_bytes,
            "predicted_loss": self.loss,
            "activation_bytes": self.activation_bytes,
            "batch_size": self.batch_size,
            "layers": [
                {"name": c.name, "family": "dense" if c.dense else c.family, "rank": c.rank, "max_rank": c.max_rank,
                 "bytes": c.bytes, "loss": c.loss, "time_vs_dense": c.time_ratio}
                for c in self.layers
            ],
        }

    def summary(self) -> str:
        """One line: bytes held, share of the full model, and the spread of kept rank ratios."""
        fact = [c for c in self.layers if not c.dense]
        ratios = sorted(c.rank / c.max_rank for c in fact)
        spread = f"rank kept {ratios[0]:.0%}..{ratios[-1]:.0%}" if ratios else "all dense"
        return (f"{format_bytes(self.total_bytes)} of {format_bytes(self.full_bytes)} "
                f"({self.total_bytes / max(self.full_bytes, 1):.0%}); {len(fact)}/{len(self.layers)} layers factorized, {spread}")

    def slower_than_dense(self) -> list[LayerChoice]:
        """Layers the engine's cost model predicts to run slower at their level than dense."""
        return [c for c in self.layers if c.time_ratio is not None and c.time_ratio > 1.0]

    def table(self) -> str:
        """A human-readable table: one row per layer (family, rank kept/max, bytes, predicted loss,
        and, where the engine's cost model knows it, predicted time against the dense layer)."""
        timed = any(c.time_ratio is not None for c in self.layers)
        rows = [("layer", "run as", "rank", "bytes", "pred. loss") + (("time vs dense",) if timed else ())]
        for c in self.layers:
            row = (c.name, "dense" if c.dense else c.family, f"{c.rank}/{c.max_rank}", format_bytes(c.bytes), f"{c.loss:.3g}")
            if timed:
                row += ("" if c.time_ratio is None else f"{c.time_ratio:.2f}x" + (" slower" if c.time_ratio > 1.0 else ""),)
            rows.append(row)
        pad = ("",) if timed else ()
        rows.append(("(not factorized)", "dense", "", format_bytes(self.fixed_bytes), "") + pad)
        rows.append(("total", "", "", format_bytes(self.total_bytes), f"{self.loss:.3g}") + pad)
        acts = (f"; activations {format_bytes(self.activation_bytes)} at batch {self.batch_size}"
                if self.activation_bytes else "")
        text = format_table(rows) + f"\nweight budget {format_bytes(self.budget)}; {self.summary()}{acts}"
        slow = self.slower_than_dense()
        if slow:
            text += (f"\n{len(slow)} layer(s) predicted slower than dense at this budget (the memory budget comes "
                     "first; pass latency_limit_ms to trade accuracy for speed)")
        return text


def format_bytes(n: int) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, a rule under the first row."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _lower_hull(opts: list[Option]) -> list[Option]:
    """Points of the lower convex hull of (bytes, loss) with loss strictly decreasing."""
    pts: list[Option] = []
    for p in opts:
        if pts and p[1] >= pts[-1][1]:
            continue  # costs more, loses no less
        while len(pts) >= 2:
            (x1, y1, _), (x2, y2, _) = pts[-2], pts[-1]
            # drop the middle point when it lies on or above the segment from pts[-2] to p
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                pts.pop()
            else:
                break
        pts.append(p)
    return pts


def plan_ranks(specs: Sequence[LadderSpec], fixed_bytes: int, budget: int, full_bytes: int) -> Plan:
    """Choose one option per layer minimising summed loss with bytes <= ``budget``.

    Raises :class:`BudgetError` stating the smallest feasible budget when ``budget`` is below it.
    """
    options = [s.options() for s in specs]
    hulls = [_lower_hull(o) for o in options]
    pick = [0] * len(specs)
    chosen = [h[0] for h in hulls]
    used = fixed_bytes + sum(c[0] for c in chosen)
    if used > budget:
        raise BudgetError(
            f"budget {format_bytes(budget)} ({budget} bytes) is below the smallest feasible model, "
            f"{format_bytes(used)} ({used} bytes); raise mem_limit to at least {used}",
            smallest_feasible=used,
        )
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        if pick[i] + 1 < len(hulls[i]):
            (b0, l0, _), (b1, l1, _) = hulls[i][pick[i]], hulls[i][pick[i] + 1]
            heapq.heappush(heap, (-(l0 - l1) / max(b1 - b0, 1), i))

    for i in range(len(specs)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        nxt = hulls[i][pick[i] + 1]
        extra = nxt[0] - chosen[i][0]
        if used + extra > budget:
            continue  # this layer's next hull step does not fit; others may
        used += extra
        pick[i] += 1
        chosen[i] = nxt
        push(i)
    # spend what is left on the single upgrade (hull or not) that lowers the loss most
    improved = True
    while improved:
        improved = False
        best: tuple[float, int, Option] | None = None
        for i, opts in enumerate(options):
            for o in opts:
                gain = chosen[i][1] - o[1]
                if gain > 0 and used - chosen[i][0] + o[0] <= budget and (best is None or gain > best[0]):
                    best = (gain, i, o)
        if best is not None:
            _, i, o = best
            used += o[0] - chosen[i][0]
            chosen[i] = o
            improved = True
    layers = [spec.choice(o) for spec, o in zip(specs, chosen)]
    return Plan(budget=budget, full_bytes=full_bytes, fixed_bytes=fixed_bytes, layers=layers)


def plan_uniform(specs: Sequence[LadderSpec], fixed_bytes: int, budget: int, full_bytes: int) -> Plan:
    """Baseline planner: one rank ratio for every layer, the largest that fits ``budget``.

    Each layer keeps the largest ladder level whose rank is at most ``ratio * max_rank`` (its
    smallest level if none is), or runs dense when that level would not save bytes. Losses are
    ignored: this is the "uniform truncation" baseline the greedy planner is measured against.
    """
    def choose(ratio: float) -> list[Option]:
        picked = []
        for s in specs:
            levels = [j for j, r in enumerate(s.ranks) if r <= ratio * s.max_rank] or [0]
            j = levels[-1]
            if ratio >= 1.0 or s.bytes[j] >= s.dense_bytes:
                picked.append(Option(s.dense_bytes, 0.0, None))
            else:
                picked.append(Option(s.bytes[j], s.loss[j], j))
        return picked

    lo, hi = 0.0, 1.0
    if fixed_bytes + sum(c[0] for c in choose(1.0)) <= budget:
        lo = 1.0
    else:
        for _ in range(40):
            mid = (lo + hi) / 2
            if fixed_bytes + sum(c[0] for c in choose(mid)) <= budget:
                lo = mid
            else:
                hi = mid
    chosen = choose(lo)
    used = fixed_bytes + sum(c[0] for c in chosen)
    if used > budget:
        raise BudgetError(f"budget {format_bytes(budget)} is below the smallest uniform plan, {format_bytes(used)}; "
                          f"raise mem_limit to at least {used}", smallest_feasible=used)
    layers = [s.choice(o) for s, o in zip(specs, chosen)]
    return Plan(budget=budget, full_bytes=full_bytes, fixed_bytes=fixed_bytes, layers=layers)


#: planners by name: ``greedy`` (default, loss-aware) and ``uniform`` (one rank ratio, the baseline)
PLANNERS = {"greedy": plan_ranks, "uniform": plan_uniform}


def plan_artifact(reader: "ArtifactReader", mem_limit: int | float | str | None) -> Plan:
    """The plan ``mem_limit`` gets for an open artifact; reads nothing but the header."""
    specs, fixed = ladder_specs(reader)
    full = int(reader.header["full_bytes"])
    return plan_ranks(specs, fixed, parse_budget(mem_limit, full), full)


def ladder_specs(reader: "ArtifactReader", engine: EngineCost | None = None) -> tuple[list[LadderSpec], int]:
    """The planner's view of an artifact: one :class:`LadderSpec` per layer, and the bytes never factorized.

    With ``engine``, each spec carries the engine's predicted time of every level and of the dense
    layer (from the header: structure, strides, recorded value shapes; none for artifacts without them).
    """
    costs = layer_costs(reader.header, engine) if engine is not None else {}
    specs = [
        LadderSpec(
            name=l["name"], family=l["family"], ranks=tuple(l["ladder"]["ranks"]), bytes=tuple(l["ladder"]["bytes"]),
            loss=tuple(float(x) for x in l["ladder"]["loss"]), dense_bytes=reader.array_ref(l["dense"]).nbytes,
            max_rank=int(l.get("max_rank", l["ladder"]["ranks"][-1])), cost=costs.get(l["name"]),
        )
        for l in reader.header["layers"]
    ]
    fixed = sum(reader.array_ref(r).nbytes for r in reader.header["tensors"].values())
    return specs, fixed

