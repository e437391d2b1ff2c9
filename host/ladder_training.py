"""Trained ladders: train the factorized model itself, so that every truncation the device picks works.

The recipe of issue 13, in three verbs:

* :func:`ladder_model` captures a model as bake does (BatchNorm folded), decomposes every eligible layer
  in the structure bake's search picks, at maximal rank, and returns a :class:`LadderModel`: the
  captured graph as a trainable ``nn.Module`` whose layers are their factors (initialised from the
  decomposition), their dense weights, and every other float tensor of the graph.
* :class:`NestedTruncation` trains it with nested truncation. Each step runs the largest budget with the
  task loss and, following the sandwich rule, the smallest budget and ``samples`` random ones (log-uniform
  in between), each distilled from the largest one's output (in-place distillation). A budget becomes
  per-layer levels through :func:`stn_edge.plan.plan_ranks` on the same ladders a device reads (bytes
  per level, data-driven loss per level); a level keeps each factor's rank prefix (the first rows of a
  rank-major factor, the ``core[:a, :b]`` box of a two-bond core), which is exactly what the artifact
  stores for that level. Budgets come from a seeded generator, so every DDP rank samples the same ones.
* :func:`bake_trained` writes the artifact from the trained factors as they are, in their trained order;
  bake re-measures the per-level corrections (the normalisation statistics a truncation shifts) and the
  ladder losses on calibration data, as for any bake.

>>> ladder = ladder_model(model, x[:1], calibration=x[:256])              # doctest: +SKIP
>>> trainer = NestedTruncation(ladder, budgets=(0.05, 1.0))               # doctest: +SKIP
>>> opt = torch.optim.SGD(ladder.parameters(), lr=0.01, momentum=0.9)    # doctest: +SKIP
>>> for x, y in loader:                                                   # any loop, DDP included
...     loss = trainer.step_loss((x,), lambda out: F.cross_entropy(out, y))
...     opt.zero_grad(); loss.backward(); opt.step()
>>> bake_trained(ladder, "model.stn", calibration=x[:256])                # doctest: +SKIP

Under DistributedDataParallel wrap the ladder (``DDP(ladder)``) and pass the wrapper as ``forward=``;
:meth:`LadderModel.rescore` computes the ladder losses on rank 0 and broadcasts them.
"""
from __future__ import annotations

import contextlib
import io
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from stn_edge.format import write_atomic
from stn_edge.graph import Graph, graph_from_dict, graph_to_dict
from stn_edge.host.decompositions import search_families
from stn_edge.host.decompositions.common import Decomposition, shell_rows
from stn_edge.lowering import shell_order
from stn_edge.plan import LadderSpec, Plan, plan_ranks

#: ops whose float constant inputs are trainable data (other float constants stay constants)
TRAINABLE_READERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "PRelu",
                     "BatchNormalization", "InstanceNormalization", "LayerNormalization", "Gather", "Einsum"}

#: ``(student output, teacher output) -> loss``
Distill = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """In-place distillation's default: cross-entropy of the student's logits against the teacher's
    softmax over the last axis, averaged over the other axes."""
    return -(torch.softmax(teacher, -1) * torch.log_softmax(student, -1)).sum(-1).mean()


def _torch_weight(family: str) -> Callable[[dict, dict], torch.Tensor]:
    for f in search_families():
        if f.name == family and f.torch_weight is not None:
            return f.torch_weight
    raise ValueError(f"decomposition family {family!r} has no torch form (SearchFamily.torch_weight); "
                     f"train it with one of: {', '.join(f.name for f in search_families() if f.torch_weight)}")


def _shell_pairs(dec: Decomposition, name: str) -> list[tuple[int, int]]:
    i, k = dec.structure["shells"][name]
    return [(int(b[i]), int(b[k])) for b in dec.bonds]


def canonical_factors(dec: Decomposition) -> dict[str, np.ndarray]:
    """``dec``'s factors at its top level in canonical form: rank-major rows, two-bond cores as boxes."""
    out = {}
    for name, rows in dec.factors.items():
        if name in dec.structure.get("shells", {}):
            pairs = _shell_pairs(dec, name)
            p, q = shell_order(pairs)
            box = np.empty(pairs[-1] + rows.shape[1:], dtype=rows.dtype)
            box[p, q] = rows
            out[name] = box
        else:
            out[name] = rows
    return out


def level_factors(dec: Decomposition, canonical: Mapping[str, Any], level: int) -> dict[str, Any]:
    """What ladder ``level`` keeps of canonical factors (arrays or tensors): the first ``row_ends`` rows of
    a rank-major factor, the ``[:a, :b]`` box of a two-bond core: exactly the artifact's prefix."""
    shells = dec.structure.get("shells", {})
    out = {}
    for name, f in canonical.items():
        if name in shells:
            a, b = _shell_pairs(dec, name)[level]
            out[name] = f[:a, :b]
        else:
            out[name] = f[: dec.row_ends[name][level]]
    return out


def stored_factors(dec: Decomposition, canonical: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reverse of :func:`canonical_factors`: storage rows in ``dec``'s nested-shell order."""
    shells = dec.structure.get("shells", {})
    return {name: shell_rows(f, _shell_pairs(dec, name)) if name in shells else np.ascontiguousarray(f)
            for name, f in canonical.items()}


class LadderModel(nn.Module):
    """A captured graph whose factorized layers train as their factors, at any per-layer level.

    ``levels[i]`` is what layer ``i`` runs as: None (its dense weight) or a ladder level, whose weight is
    rebuilt from the rank prefix of each factor by the family's torch form. Build it with
    :func:`ladder_model` (or :meth:`from_skeleton`); set levels with :meth:`at` or :meth:`at_budget`.

    Parameters: ``factors[i][name]`` (canonical form, top level), and ``tensors`` (every trainable float
    constant of the graph, the layers' dense weights included; ``tensor_names`` maps them back).
    """

    def __init__(self, graph: Graph, layers: Sequence[tuple[dict[str, Any], Decomposition]],
                 losses: Sequence[Sequence[float]], correction_bytes: Sequence[int] | None = None):
        super().__init__()
        from stn_edge.host.importance import weight_feed_executable

        self.graph = graph
        self.metas = [dict(meta) for meta, _ in layers]
        self.decs = [dec for _, dec in layers]
        self.losses = [[float(x) for x in l] for l in losses]
        self.correction_bytes = list(correction_bytes or [0] * len(self.decs))
        self._forms = [_torch_weight(d.family) for d in self.decs]
        self.factors = nn.ModuleList(
            nn.ParameterDict({k: nn.Parameter(torch.from_numpy(np.array(v, dtype=np.float32))) for k, v in
                              canonical_factors(d).items()}) for d in self.decs)
        self.tensor_names = trainable_constants(graph)
        self.tensors = nn.ParameterDict({f"t{i}": nn.Parameter(torch.from_numpy(np.array(graph.initializers[n])))
                                         for i, n in enumerate(self.tensor_names)})
        self._slot = {n: f"t{i}" for i, n in enumerate(self.tensor_names)}
        missing = [m["weight"] for m in self.metas if m["weight"] not in self._slot]
        if missing:
            raise ValueError(f"layer weights {missing} are not trainable constants of the graph")
        self._exe = weight_feed_executable(graph, self.tensor_names, backend="torch")
        self._inputs = [v.name for v in graph.inputs]
        self._outputs = [v.name for v in graph.outputs]
        self.levels: list[int | None] = [None] * len(self.decs)
        self.fixed_bytes = sum(int(v.nbytes) for k, v in graph.initializers.items()
                               if k not in {m["weight"] for m in self.metas})
        self.full_bytes = sum(int(v.nbytes) for v in graph.initializers.values())

    # ------------------------------------------------------------------ running

    def weight(self, i: int, level: int | None = None) -> torch.Tensor:
        """Layer ``i``'s weight at ``level`` (None: dense), in the node's layout."""
        if level is None:
            return self.tensors[self._slot[self.metas[i]["weight"]]]
        return self._forms[i](self.metas[i], level_factors(self.decs[i], dict(self.factors[i].items()), level))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self._inputs):
            raise TypeError(f"the model takes {len(self._inputs)} input(s) {self._inputs}, got {len(inputs)}")
        feeds: dict[str, Any] = dict(zip(self._inputs, inputs))
        feeds.update({n: self.tensors[s] for n, s in self._slot.items()})
        for i, level in enumerate(self.levels):
            if level is not None:
                feeds[self.metas[i]["weight"]] = self.weight(i, level)
        env = self._exe.execute(feeds)
        outs = tuple(env[name] for name in self._outputs)
        return outs[0] if len(outs) == 1 else outs

    @contextlib.contextmanager
    def at(self, levels: Sequence[int | None] | None) -> Iterator["LadderModel"]:
        """This model with ``levels`` (one per layer; None: all dense) for the duration of the block."""
        before = self.levels
        self.levels = [None] * len(self.decs) if levels is None else list(levels)
        try:
            yield self
        finally:
            self.levels = before

    def at_budget(self, budget: int | float | str) -> contextlib.AbstractContextManager["LadderModel"]:
        """:meth:`at` the levels the planner picks for ``budget`` (bytes, ``"25%"``, a fraction of
        :attr:`full_bytes` as a float below 1.0)."""
        return self.at(self.levels_for(budget))

    # ------------------------------------------------------------------ planning

    def specs(self) -> list[LadderSpec]:
        """The planner's view of the layers, as a device reads it from the artifact: bytes per level
        (with the per-level correction where bake stores one) and the current ladder losses."""
        return [LadderSpec(m["name"], d.family, tuple(d.ranks), tuple(b + c for b in d.level_bytes), tuple(loss),
                           d.dense_bytes, int(d.max_rank))
                for m, d, loss, c in zip(self.metas, self.decs, self.losses, self.correction_bytes)]

    def budget_bytes(self, budget: int | float | str) -> int:
        """``budget`` in bytes: an int as is, a float below 1.0 as a share of :attr:`full_bytes`, a string as
        :func:`stn_edge.plan.parse_budget` reads it."""
        from stn_edge.plan import parse_budget

        if isinstance(budget, float) and budget <= 1.0:
            return int(budget * self.full_bytes)
        return parse_budget(budget, self.full_bytes)

    @property
    def smallest_bytes(self) -> int:
        """The smallest feasible budget: every layer at its first level."""
        return self.fixed_bytes + sum(min(o.bytes for o in s.options()) for s in self.specs())

    def plan(self, budget: int | float | str) -> Plan:
        """The plan the device's planner makes for ``budget`` (BudgetError below :attr:`smallest_bytes`)."""
        return plan_ranks(self.specs(), self.fixed_bytes, self.budget_bytes(budget), self.full_bytes)

    def levels_for(self, budget: int | float | str) -> list[int | None]:
        return [c.level for c in self.plan(budget).layers]

    @torch.no_grad()
    def rescore(self, calibration: Any, samples: int = 128) -> None:
        """Re-measure every level's loss on ``calibration`` inputs, as bake scores them (relative output
        error with that one layer truncated), from the trained weights. Under torch.distributed rank 0
        measures and broadcasts, so every rank plans alike."""
        import torch.distributed as dist

        from stn_edge.host.export import calibration_feeds
        from stn_edge.host.importance import score_truncations

        box: list[Any] = [None]
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            graph = self.to_graph()
            feeds = {k: v[:samples] for k, v in calibration_feeds(graph, calibration).items()}
            levels = [[{m["weight"]: self.weight(i, j).detach().numpy()} for j in range(d.levels)]
                      for i, (m, d) in enumerate(zip(self.metas, self.decs))]
            box[0] = score_truncations(graph, feeds, levels)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        self.losses = [[float(x) for x in l] for l in box[0]]

    # ------------------------------------------------------------------ what bake reads

    @torch.no_grad()
    def to_graph(self) -> Graph:
        """The captured graph with the trained constants (the layers' dense weights included)."""
        inits = dict(self.graph.initializers)
        for n, s in self._slot.items():
            inits[n] = self.tensors[s].detach().cpu().numpy().copy()
        g = self.graph
        return Graph(g.nodes, g.inputs, g.outputs, inits, g.opset)

    @torch.no_grad()
    def decompositions(self) -> dict[str, Decomposition]:
        """Each layer's trained factors as a :class:`Decomposition` (by weight name), in the structure,
        ladder and component order it was converted with; ``errors`` against the trained dense weight."""
        out = {}
        for i, (m, d) in enumerate(zip(self.metas, self.decs)):
            canonical = {k: p.detach().cpu().numpy() for k, p in self.factors[i].items()}
            dense = self.weight(i).detach().double()
            norm = float(dense.norm()) or 1.0
            errors = [float((self.weight(i, j).double() - dense).norm()) / norm for j in range(d.levels)]
            t = Decomposition(d.family, d.kind, d.layout, d.shape, d.structure, stored_factors(d, canonical),
                              d.row_ends, d.ranks, d.bonds, d.max_rank, errors, notes="trained")
            t.check()
            out[m["weight"]] = t
        return out

    # ------------------------------------------------------------------ checkpoints

    def skeleton(self) -> dict[str, Any]:
        """What rebuilds this model's structure (plain values and tensors; no pickled classes)."""
        g = self.graph
        return {
            "graph": graph_to_dict(Graph(g.nodes, g.inputs, g.outputs, {}, g.opset)),
            "initializers": {k: torch.from_numpy(np.array(v)) for k, v in g.initializers.items()},
            "layers": [{"meta": m, "family": d.family, "kind": d.kind, "layout": d.layout, "shape": list(d.shape),
                        "structure": d.structure, "row_ends": d.row_ends, "ranks": d.ranks, "bonds": d.bonds,
                        "max_rank": d.max_rank, "errors": d.errors,
                        "factors": {k: torch.from_numpy(np.array(v)) for k, v in d.factors.items()}}
                       for m, d in zip(self.metas, self.decs)],
            "losses": self.losses,
            "correction_bytes": self.correction_bytes,
        }

    @classmethod
    def from_skeleton(cls, sk: Mapping[str, Any]) -> "LadderModel":
        g = graph_from_dict(sk["graph"])
        graph = Graph(g.nodes, g.inputs, g.outputs, {k: v.numpy() for k, v in sk["initializers"].items()}, g.opset)
        layers = []
        for l in sk["layers"]:
            d = Decomposition(l["family"], l["kind"], l["layout"], tuple(l["shape"]), l["structure"],
                              {k: v.numpy() for k, v in l["factors"].items()}, l["row_ends"], l["ranks"], l["bonds"],
                              l["max_rank"], l["errors"])
            layers.append((l["meta"], d))
        return cls(graph, layers, sk["losses"], sk["correction_bytes"])


def trainable_constants(graph: Graph) -> list[str]:
    """Float constants of ``graph`` with more than one element that only :data:`TRAINABLE_READERS` read
    (weights, biases, scales), sorted by name."""
    readers: dict[str, set[str]] = {}
    for node in graph.nodes:
        for name in node.inputs:
            if name in graph.initializers:
                readers.setdefault(name, set()).add(node.op)
    return sorted(n for n, ops in readers.items()
                  if np.asarray(graph.initializers[n]).dtype.kind == "f" and np.asarray(graph.initializers[n]).size > 1
                  and ops <= TRAINABLE_READERS)


def _bake_module():
    """The module :mod:`stn_edge.host.bake` (``stn_edge.host.bake`` is the function): the structure
    search and the per-layer steps bake runs, so a conversion picks exactly what bake would."""
    import importlib

    return importlib.import_module("stn_edge.host.bake")


def ladder_model(model: Any, example_inputs: Any = None, *, calibration: Any = None, levels: int = 32,
                 structure: str | Sequence[str] = "auto", min_bytes: int = 4096, score_samples: int = 128,
                 correct: bool = False, search_limits: Any = None, progress: bool = True) -> LadderModel:
    """Convert ``model`` (a torch module with ``example_inputs``, ONNX bytes or an ``.onnx`` path) to its
    factorized form at maximal rank, in the structure bake's search picks, factors from the decomposition.

    The options mean what they mean for :func:`stn_edge.host.bake`; ``correct`` only counts the
    per-level correction's bytes in the ladders, and must say what :func:`bake_trained` will be told
    (default False, as there). Ladder losses are scored on the first ``score_samples`` calibration inputs.
    """
    from stn_edge.host.export import calibration_feeds, capture
    from stn_edge.host.importance import score_truncations
    from stn_edge.host.layers import find_layers
    from stn_edge.host.value_shapes import record_value_shapes

    baking = _bake_module()
    say = (lambda msg: print(f"[ladder] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    graph = capture(model) if isinstance(model, (str, Path, bytes)) else capture(model, example_inputs)
    feeds = calibration_feeds(graph, calibration if calibration is not None else example_inputs)
    candidates, _ = find_layers(graph, min_bytes=min_bytes)
    for cand in candidates:
        baking._ensure_bias(graph, cand)
    shapes = record_value_shapes(graph, feeds)
    families = baking._families(structure)
    layers = []
    for k, cand in enumerate(candidates):
        rec = shapes.get(cand.node.inputs[0])
        d = baking._decompose(cand, graph.initializers[cand.weight], levels, families, None if rec is None else len(rec[0]),
                              search_limits, baking._positions(cand, shapes))
        layers.append((d.meta, d.dec))
        say(f"decomposed {k + 1}/{len(candidates)}: {cand.name} {list(d.dense.shape)} -> {d.dec.family}")
    say(f"scoring {sum(d.levels for _, d in layers)} levels on {score_samples} calibration samples")
    score_feeds = {k: v[:score_samples] for k, v in feeds.items()}
    losses = score_truncations(graph, score_feeds, [[{m["weight"]: d.truncated(j)} for j in range(d.levels)]
                                                   for m, d in layers])
    corr = [2 * d.shape[1 if d.layout == "in_out" else 0] * 4 if correct and baking._bias_name(c) else 0
            for (_, d), c in zip(layers, candidates)]
    return LadderModel(graph, layers, losses, corr)


# ---------------------------------------------------------------------------------------- training


class NestedTruncation:
    """Trains a :class:`LadderModel` through the truncations a device's planner picks, every step.

    Parameters
    ----------
    ladder : the model.
    budgets : ``(smallest, largest)`` budget, as :meth:`LadderModel.budget_bytes` reads them (a float up to
        1.0 is a fraction of ``ladder.full_bytes``); the smallest is raised to the smallest feasible one.
        Equal budgets train one fixed-size model (the per-budget baseline).
    samples : random budgets per step between them (log-uniform), besides the smallest and largest.
    distill : ``(student, teacher) -> loss`` for the truncated models (default :func:`soft_cross_entropy`).
    forward : what runs the model (a ``DistributedDataParallel`` wrapper of ``ladder``); default ``ladder``.
    seed : seeds the budgets; every rank of a DDP job must use the same one.
    """

    def __init__(self, ladder: LadderModel, budgets: Sequence[float] = (0.05, 1.0), samples: int = 2, *,
                 distill: Distill = soft_cross_entropy, forward: Callable[..., Any] | None = None, seed: int = 0):
        self.ladder = ladder
        self.forward = forward or ladder
        self.low = max(ladder.budget_bytes(budgets[0]), ladder.smallest_bytes)
        self.high = max(ladder.budget_bytes(budgets[1]), self.low)
        self.samples = int(samples)
        self.distill = distill
        self.seed = seed
        self.rng = random.Random(seed)
        self.steps = 0
        #: where :meth:`fit` stands: epochs done, and batches done in the current epoch
        self.epoch = 0
        self.batch = 0

    def budgets(self) -> list[int]:
        """This step's student budgets in bytes: the smallest, then ``samples`` log-uniform ones (none
        when the smallest is the largest: one budget, trained on the task loss alone)."""
        if self.low == self.high:
            return []
        lo, hi = math.log(self.low), math.log(self.high)
        return [self.low] + [int(math.exp(self.rng.uniform(lo, hi))) for _ in range(self.samples)]

    def step_loss(self, inputs: Sequence[torch.Tensor], loss_fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """The largest budget's ``loss_fn(output)`` plus each sampled budget's distillation loss from it;
        call ``backward`` on it."""
        self.steps += 1
        with self.ladder.at(self.ladder.levels_for(self.high)):
            out = self.forward(*inputs)
        total = loss_fn(out)
        teacher = out.detach()
        for budget in self.budgets():
            with self.ladder.at(self.ladder.levels_for(budget)):
                total = total + self.distill(self.forward(*inputs), teacher)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "rng": self.rng.getstate(), "epoch": self.epoch, "batch": self.batch,
                "low": self.low, "high": self.high, "samples": self.samples, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps, self.epoch, self.batch = int(state["steps"]), int(state["epoch"]), int(state["batch"])
        self.low, self.high, self.samples, self.seed = int(state["low"]), int(state["high"]), int(state["samples"]), state["seed"]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def fit(self, x: torch.Tensor, y: torch.Tensor, epochs: int, optimizer: torch.optim.Optimizer, *,
            batch_size: int = 128, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
            augment: Callable[[torch.Tensor], torch.Tensor] | None = None, scheduler: Any = None,
            checkpoint: str | Path | None = None, checkpoint_every: int = 0, rescore: Any = None,
            max_grad_norm: float | None = None, progress: bool = True) -> float:
        """Train for ``epochs`` (counting those already done: :attr:`epoch`) on ``(x, y)``, one process.

        Batches come from a permutation seeded by (``seed``, epoch), so a run resumed from a checkpoint
        (:func:`load_checkpoint`, then this with the same arguments) continues exactly where it stopped.
        ``scheduler`` steps once per batch. ``checkpoint``: saved after every epoch and every
        ``checkpoint_every`` steps. ``rescore``: calibration inputs to re-measure the ladder losses with
        after every epoch. ``max_grad_norm``: clip the gradients' total norm (a rank-1 level without
        normalisation layers can take large steps). Returns the mean loss of the last epoch.
        """
        self.ladder.train()
        per_epoch = -(-len(x) // batch_size)
        meter = Progress(per_epoch * epochs, per_epoch * self.epoch + self.batch, enabled=progress)
        mean = float("nan")
        while self.epoch < epochs:
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
            running, count = 0.0, 0
            while self.batch < per_epoch:
                b = perm[self.batch * batch_size:(self.batch + 1) * batch_size]
                xb = x[b] if augment is None else augment(x[b])
                step = self.step_loss((xb,), lambda out: loss(out, y[b]))
                optimizer.zero_grad()
                step.backward()
                if max_grad_norm:
                    nn.utils.clip_grad_norm_(self.ladder.parameters(), max_grad_norm)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                self.batch += 1
                running, count = running + float(step.detach()), count + 1
                meter.update(f"epoch {self.epoch + 1}/{epochs} batch {self.batch}/{per_epoch} loss {running / count:.3f}")
                if checkpoint and checkpoint_every and self.steps % checkpoint_every == 0:
                    save_checkpoint(checkpoint, self.ladder, optimizer=optimizer, scheduler=scheduler, trainer=self)
            mean = running / max(count, 1)
            self.epoch, self.batch = self.epoch + 1, 0
            if rescore is not None:
                self.ladder.rescore(rescore)
            if checkpoint:
                save_checkpoint(checkpoint, self.ladder, optimizer=optimizer, scheduler=scheduler, trainer=self)
            meter.say(f"epoch {self.epoch}/{epochs} done, mean loss {mean:.4f}")
        return mean


class Progress:
    """One line to stderr at most every ``interval`` seconds: what :meth:`update` says, steps per second, ETA."""

    def __init__(self, total: int, done: int = 0, interval: float = 10.0, enabled: bool = True):
        self.total, self.done, self.interval, self.enabled = total, done, interval, enabled
        self.start_done, self.t0 = done, time.perf_counter()
        self.last = -math.inf

    def update(self, text: str) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last >= self.interval or self.done == self.total:
            self.last = now
            rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.say(f"{text}  {rate:.2f} steps/s  eta {int(eta // 60)}m{int(eta % 60):02d}s")

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"[ladder] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read: the model, and the states to restore into what trains it."""

    ladder: LadderModel
    states: dict[str, Any]

    def restore(self, *, optimizer: Any = None, scheduler: Any = None, trainer: NestedTruncation | None = None) -> None:
        """Load the saved states into ``optimizer``, ``scheduler`` and ``trainer`` (built on :attr:`ladder`)."""
        for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("trainer", trainer)):
            if target is not None:
                if self.states.get(name) is None:
                    raise ValueError(f"the checkpoint holds no {name} state")
                target.load_state_dict(self.states[name])


def save_checkpoint(path: str | Path, ladder: LadderModel, *, optimizer: Any = None, scheduler: Any = None,
                    trainer: NestedTruncation | None = None, **extra: Any) -> None:
    """Write the model (structure and parameters) and the training states to ``path``, atomically."""
    payload = {"skeleton": ladder.skeleton(), "parameters": ladder.state_dict(),
               "optimizer": None if optimizer is None else optimizer.state_dict(),
               "scheduler": None if scheduler is None else scheduler.state_dict(),
               "trainer": None if trainer is None else trainer.state_dict(), "extra": extra}
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint :func:`save_checkpoint` wrote (tensors and plain values only: ``weights_only``)."""
    payload = torch.load(path, weights_only=True)
    ladder = LadderModel.from_skeleton(payload["skeleton"])
    ladder.load_state_dict(payload["parameters"])
    return Checkpoint(ladder, {k: payload[k] for k in ("optimizer", "scheduler", "trainer", "extra")})


# ---------------------------------------------------------------------------------------- bake


def bake_trained(ladder: LadderModel, path: str | Path, *, calibration: Any, **bake_options: Any):
    """Bake the trained model: every factorized layer keeps its trained factors, structure, ladder and
    component order (no search, no re-decomposition); everything else is bake as usual (ladder losses
    measured on ``calibration``). Returns bake's report.

    ``correct`` defaults to False here: the truncated models were trained without bake's per-level
    output corrections, and adding them afterwards costs accuracy (digits CNN, 4 epochs of the recipe:
    94.2% at 20% of the bytes without, 78.6% with; docs/RESULTS.md).
    """
    from stn_edge.device.export import onnx_bytes
    from stn_edge.host.bake import bake

    import inspect

    bake_options.setdefault("progress", False)
    bake_options.setdefault("correct", False)
    given = ladder.decompositions()
    if "decompositions" in inspect.signature(bake).parameters:
        return bake(onnx_bytes(ladder.to_graph()), None, path, calibration=calibration, decompositions=given,
                    **bake_options)
    with _bake_keeping(given):
        return bake(onnx_bytes(ladder.to_graph()), None, path, calibration=calibration, **bake_options)


@contextlib.contextmanager
def _bake_keeping(given: Mapping[str, Decomposition]) -> Iterator[None]:
    """Until bake takes ``decompositions=``: its per-layer decomposition returns the given ones."""
    baking = _bake_module()
    search = baking._decompose

    def decompose(cand, w, *args, **kwargs):
        dec = given.get(cand.weight)
        if dec is None:
            return search(cand, w, *args, **kwargs)
        return baking.DecomposedLayer(dec.layer(name=cand.name, node=cand.node.name, weight=cand.weight), cand, dec, w)

    baking._decompose = decompose
    try:
        yield
    finally:
        baking._decompose = search
