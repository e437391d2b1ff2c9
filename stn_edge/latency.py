"""The latency model a plan is kept within: a per-layer latency table and the plan that fits it.

A :class:`LayerLatency` comes from a measurement on the device (``stn-edge profile --per-layer``,
:func:`stn_edge.device.profile.layer_latency`) or from an engine's cost model and the artifact's
header alone (:meth:`LayerLatency.from_cost_model`, :mod:`stn_edge.cost`);
:func:`plan_within_latency` moves a memory plan until it is predicted to run in time. Both are
plain arithmetic on the header: the runtime, the profiler and the CLI share them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from stn_edge.errors import BackendError, BudgetError, InputError
from stn_edge.plan import LadderSpec, LayerChoice, Option, Plan, format_bytes, format_table

#: ``format`` field of a layer-latency table file
LAYER_TABLE_FORMAT = "stn-edge layer latency 1"


@dataclass
class LayerLatency:
    """Per-layer latency of one engine at one batch size: ``layers[name] = {"dense": ms, level: ms, ...}``.

    Layers timed alone run with their weights hot in the cache; inside the model they are not, and
    the ops between them cost time too. So the table is calibrated on two end-to-end runs timed
    side by side: the dense model (``model_dense_ms``) and the smallest plan (``model_smallest_ms``,
    whose levels are ``smallest``). A plan is predicted as ``rest + scale * sum(layer times)``, the
    line through those two points.
    """

    backend: str
    device: str
    batch: int
    layers: dict[str, dict[Any, float]]
    ranks: dict[str, dict[int, int]] = field(default_factory=dict)
    model_dense_ms: float | None = None
    model_smallest_ms: float | None = None
    smallest: dict[str, int | None] = field(default_factory=dict)
    system: dict[str, Any] = field(default_factory=dict)

    def layer_ms(self, name: str, level: int | None, rank: int | None = None) -> float:
        """Milliseconds of layer ``name`` alone, dense (level None) or at ``level``.

        Levels not measured are interpolated linearly in rank between measured ones (flat beyond them).
        """
        times = self.layers[name]
        if level is None:
            return float(times["dense"])
        if level in times:
            return float(times[level])
        measured = sorted((self.ranks[name][j], ms) for j, ms in times.items() if j != "dense")
        if not measured:
            return float(times["dense"])
        r = rank if rank is not None else level
        return float(np.interp(r, [m[0] for m in measured], [m[1] for m in measured]))

    def _sums(self) -> tuple[float, float]:
        dense = sum(float(t["dense"]) for t in self.layers.values())
        small = sum(self.layer_ms(n, self.smallest.get(n)) for n in self.layers)
        return dense, small

    def scale(self) -> float:
        """In-model milliseconds per millisecond measured alone (1 without the two-point calibration)."""
        if self.model_dense_ms is None or self.model_smallest_ms is None:
            return 1.0
        dense, small = self._sums()
        k = (self.model_dense_ms - self.model_smallest_ms) / (dense - small) if dense - small > 1e-9 else 0.0
        return k if k > 0 else 1.0

    def rest_ms(self) -> float:
        """Time spent outside the factorized layers (0 when the dense model was not timed)."""
        if self.model_dense_ms is None:
            return 0.0
        return max(0.0, self.model_dense_ms - self.scale() * self._sums()[0])

    def cost_ms(self, choice: LayerChoice) -> float:
        """In-model milliseconds of one layer as ``choice`` runs it (0 for a layer not in the table)."""
        if choice.name not in self.layers:
            return 0.0
        return self.scale() * self.layer_ms(choice.name, choice.level, choice.rank)

    def predict(self, plan: Plan) -> float:
        """Predicted end-to-end milliseconds of ``plan`` on this engine."""
        return self.rest_ms() + sum(self.cost_ms(c) for c in plan.layers)

    def table(self) -> str:
        rows = [("layer", "dense ms", "factorized ms by rank")]
        for name, times in self.layers.items():
            levels = sorted(j for j in times if j != "dense")
            rows.append((name, f"{times['dense']:.3f}",
                         "  ".join(f"r{self.ranks[name][j]}:{times[j]:.3f}" for j in levels)))
        tail = f"\n{self.backend} on {self.device}, batch {self.batch} (each layer alone)"
        if self.model_dense_ms is not None:
            tail += f"; dense model end to end {self.model_dense_ms:.3f} ms"
        if self.model_smallest_ms is not None:
            tail += (f", smallest plan {self.model_smallest_ms:.3f} ms: in the model a layer takes {self.scale():.2f}x "
                     f"its time alone, the rest {self.rest_ms():.3f} ms")
        return format_table(rows) + tail

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LAYER_TABLE_FORMAT, "backend": self.backend, "device": self.device, "batch": self.batch,
            "model_dense_ms": self.model_dense_ms, "model_smallest_ms": self.model_smallest_ms,
            "smallest": {n: ("dense" if j is None else j) for n, j in self.smallest.items()}, "system": self.system,
            "layers": {n: {str(k): v for k, v in t.items()} for n, t in self.layers.items()},
            "ranks": {n: {str(k): v for k, v in r.items()} for n, r in self.ranks.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        from stn_edge.format import write_atomic

        write_atomic(path, json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerLatency":
        if data.get("format") != LAYER_TABLE_FORMAT:
            raise InputError(f"not a layer-latency table (format {data.get('format')!r}, expected {LAYER_TABLE_FORMAT!r}); "
                             "write one with: stn-edge profile model.stn --per-layer -o DIR")
        key = lambda k: k if k == "dense" else int(k)  # noqa: E731
        return cls(
            backend=data["backend"], device=data["device"], batch=int(data["batch"]),
            layers={n: {key(k): float(v) for k, v in t.items()} for n, t in data["layers"].items()},
            ranks={n: {int(k): int(v) for k, v in r.items()} for n, r in data.get("ranks", {}).items()},
            model_dense_ms=data.get("model_dense_ms"), model_smallest_ms=data.get("model_smallest_ms"),
            smallest={n: (None if j == "dense" else int(j)) for n, j in data.get("smallest", {}).items()},
            system=data.get("system", {}),
        )

    @classmethod
    def from_cost_model(cls, specs: Sequence[LadderSpec], rest_us: float, backend: str, device: str) -> "LayerLatency":
        """A table predicted by the engine's cost model (:mod:`stn_edge.cost`) instead of measured:
        the specs' level costs, and ``rest_us`` for everything outside the factorized layers."""
        layers, ranks = {}, {}
        for s in specs:
            if s.cost is None:
                continue
            layers[s.name] = {"dense": s.cost.dense_us / 1e3, **{j: us / 1e3 for j, us in enumerate(s.cost.level_us)}}
            ranks[s.name] = dict(enumerate(s.ranks))
        if not layers:
            raise InputError("latency_limit_ms without profile= needs the value shapes an artifact records since "
                             "format 1.1; re-bake it, or pass a table written by stn-edge profile model.stn --per-layer")
        dense = rest_us / 1e3 + sum(t["dense"] for t in layers.values())
        return cls(backend, device, 1, layers, ranks, model_dense_ms=dense, system={"source": "cost model"})

    @classmethod
    def for_engine(cls, source: Any, backend: str, device: str) -> "LayerLatency":
        """:meth:`load` ``source`` and check it was measured on ``backend`` and ``device``."""
        table = cls.load(source)
        if (table.backend, table.device) != (backend, device):
            raise BackendError(f"the layer-latency table was measured on {table.backend}/{table.device}, this runtime "
                               f"runs on {backend}/{device}; profile on this engine with --backend {backend} --device {device}")
        return table

    @classmethod
    def load(cls, source: "str | os.PathLike | LayerLatency | Mapping[str, Any]") -> "LayerLatency":
        """A table from a file written by :meth:`save`, a dict, or a table (returned as is)."""
        if isinstance(source, LayerLatency):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        try:
            data = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the layer-latency table {source}: {exc}") from None
        return cls.from_dict(data)


def plan_within_latency(plan: Plan, specs: Sequence[LadderSpec], table: LayerLatency, latency_limit_ms: float) -> Plan:
    """The plan closest to ``plan`` that keeps its bytes within ``plan.budget`` and is predicted to
    run within ``latency_limit_ms`` on the table's engine.

    First every layer runs dense instead of factorized where dense is faster on this engine and its
    bytes still fit (dense loses nothing). Then, while the prediction is over the limit, the move
    (another level, or dense) that saves the most milliseconds per unit of predicted loss added is
    taken. Raises :class:`BudgetError` when no sequence of moves gets under the limit.
    """
    by_name = {s.name: s for s in specs}
    chosen = {c.name: c for c in plan.layers}
    if chosen and not set(chosen) & set(table.layers):
        raise InputError(f"the layer-latency table names none of this model's layers ({', '.join(list(chosen)[:3])}, ...); "
                         "it was measured for another model")
    used = plan.total_bytes

    ms = table.cost_ms

    for name, c in list(chosen.items()):
        spec = by_name[name]
        dense = spec.choice(Option(spec.dense_bytes, 0.0, None))
        if not c.dense and name in table.layers and ms(dense) < ms(c) and used - c.bytes + dense.bytes <= plan.budget:
            used += dense.bytes - c.bytes
            chosen[name] = dense
    predicted = table.rest_ms() + sum(ms(c) for c in chosen.values())
    while predicted > latency_limit_ms:
        best: tuple[float, LayerChoice] | None = None
        for name, c in chosen.items():
            if name not in table.layers:
                continue
            spec = by_name[name]
            for opt in spec.options():
                alt = spec.choice(opt)
                saved = ms(c) - ms(alt)
                if saved <= 1e-9 or used - c.bytes + alt.bytes > plan.budget:
                    continue
                score = saved / max(alt.loss - c.loss, 1e-12)
                if best is None or score > best[0]:
                    best = (score, alt)
        if best is None:
            raise BudgetError(
                f"no plan within {format_bytes(plan.budget)} is predicted to run in {latency_limit_ms:g} ms on "
                f"{table.backend}/{table.device} (batch {table.batch}); the fastest found takes {predicted:.3g} ms. "
                "Raise latency_limit_ms or mem_limit"
            )
        alt = best[1]
        old = chosen[alt.name]
        used += alt.bytes - old.bytes
        predicted += ms(alt) - ms(old)
        chosen[alt.name] = alt
    return Plan(plan.budget, plan.full_bytes, plan.fixed_bytes, [chosen[c.name] for c in plan.layers])
