"""Bake: capture a model, decompose every eligible layer at maximal rank, score, write one artifact."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from stn_edge import __version__
from stn_edge.cost import positions
from stn_edge.errors import STNError
from stn_edge.format import ArtifactBuilder
from stn_edge.graph import Graph, graph_to_dict
from stn_edge.host.correction import corrected_weight, layer_inputs, level_corrections, level_corrections_dense
from stn_edge.host.decompositions import needs_input_rank, record_input_rank
from stn_edge.host.decompositions.common import Decomposition
from stn_edge.host.export import TorchInputs, calibration_feeds, capture, reference_outputs
from stn_edge.host.importance import score_truncations
from stn_edge.host.layers import Candidate, Skipped, find_layers
from stn_edge.host.value_shapes import record_value_shapes
from stn_edge.plan import format_bytes, format_table

if TYPE_CHECKING:
    from stn_edge.host.structure import SearchLimits

#: calibration samples stored in the artifact for on-device verification
STORED_CALIBRATION = 8


@dataclass
class BakedLayer:
    name: str
    family: str
    shape: tuple[int, ...]
    max_rank: int
    ladder_ranks: list[int]
    dense_bytes: int


@dataclass(eq=False)  # compared by identity: a bake finds its layers again in lists
class DecomposedLayer:
    """One layer on its way into the artifact.

    ``meta``: the layer record's plain fields (:meth:`Decomposition.layer`, plus ``tied`` and
    ``search``); ``cand``: the layer as found in the graph; ``dec``: its decomposition; ``dense``:
    the dense weight; ``corr``: the per-level output corrections ``(levels, 2, out)``, or None.
    """

    meta: dict[str, Any]
    cand: Candidate
    dec: Decomposition
    dense: np.ndarray
    corr: np.ndarray | None = None


@dataclass
class BakeReport:
    """What :func:`bake` wrote."""

    path: str
    artifact_bytes: int
    full_bytes: int
    layers: list[BakedLayer] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    #: seconds per phase (capture, layer inputs, shapes, decompose, correct, score, write)
    phases: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        rows = [("layer", "family", "shape", "ladder ranks", "dense bytes")]
        for l in self.layers:
            rows.append((l.name, l.family, "x".join(map(str, l.shape)),
                         f"{l.ladder_ranks[0]}..{l.ladder_ranks[-1]} ({len(l.ladder_ranks)} levels, rank {l.max_rank})",
                         format_bytes(l.dense_bytes)))
        for s in self.skipped:
            rows.append((s.weight, "dense", "", s.reason, ""))
        return (format_table(rows) + f"\n{self.path}: {format_bytes(self.artifact_bytes)} artifact, "
                f"{format_bytes(self.full_bytes)} dense model, {len(self.layers)} layers factorized, baked in {self.seconds:.1f} s"
                + (" (" + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()) + ")" if self.phases else ""))


def _progress_printer(enabled: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if enabled:
            print(f"[bake] {msg}", file=sys.stderr, flush=True)
    return say


def bake(
    model: Any,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    calibration: Any = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    levels: int = 32,
    structure: str | Sequence[str] = "auto",
    importance: str = "data",
    min_bytes: int = 4096,
    score_samples: int = 128,
    correct: bool = True,
    progress: bool = True,
    search_limits: SearchLimits | None = None,
) -> BakeReport:
    """Bake ``model`` into one ``.stn`` artifact at ``path``.

    Parameters
    ----------
    model : a ``torch.nn.Module``, ONNX bytes, or a path to an ``.onnx`` file.
    example_inputs : a tensor or tuple of tensors with the model's input shapes (batch axis 0).
    calibration : inputs (same structure as ``example_inputs``, any batch size) used to score each
        truncation level by its effect on the output, and whose first samples are stored in the
        artifact with reference outputs. Defaults to ``example_inputs``.
    levels : truncation levels per layer in the ladder (at most).
    structure : ``"auto"`` (default: search the decomposition structure per layer among
        :func:`stn_edge.host.decompositions.names`, the most accuracy per byte, see docs/RESULTS.md;
        every family holds one copy of its factors on the device, as ``mem_limit`` counts them),
        ``"svd"`` (truncated SVD of the output matricization for every layer: the fastest bake,
        several times faster than the search), or a list of family names to choose from. Every
        memory level a family offers is kept (speed is chosen at load time, from the engine's cost
        model or a measured profile); among families of about equal accuracy per byte the one with
        fewer multiply-adds, counting a fixed cost per extra op, wins (``SearchLimits.speed_tie``,
        ``op_cost_macs``).
    importance : ``"data"`` (measured output error) or ``"spectral"`` (discarded singular energy).
    score_samples : calibration samples used to score truncation levels (the first ones).
    correct : store, per level, the per-channel output scale and shift that restore the full-rank
        layer's output statistics on the calibration data (see :mod:`stn_edge.host.correction`).
    search_limits : a :class:`stn_edge.host.structure.SearchLimits` for the structure search (default
        ``SearchLimits()``: its size caps, the op cost and the speed tie-break).

    The artifact is written atomically: a failed bake leaves nothing at ``path``.
    """
    if importance not in ("data", "spectral"):  # checked before any work starts
        raise ValueError(f"importance must be 'data' or 'spectral', not {importance!r}")
    if int(levels) < 1:
        raise ValueError(f"levels must be at least 1, not {levels!r}")
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    last = [t0]

    def done(phase: str) -> None:
        now = time.perf_counter()
        phases[phase] = phases.get(phase, 0.0) + now - last[0]
        last[0] = now

    families = _families(structure)
    say = _progress_printer(progress)
    say("capturing the graph")
    graph = capture(model, example_inputs, input_names=input_names, output_names=output_names) \
        if not isinstance(model, (str, os.PathLike, bytes)) else capture(model)
    feeds = calibration_feeds(graph, calibration if calibration is not None else example_inputs)
    done("capture")
    candidates, skipped = find_layers(graph, min_bytes=min_bytes)
    say(f"{len(candidates)} layers to factorize, {len(skipped)} kept dense")
    for cand in candidates:
        _ensure_bias(graph, cand)
    score_feeds = {k: v[:score_samples] for k, v in feeds.items()}
    needs_inputs = [c for c in candidates if (correct and _bias_name(c)) or needs_input_rank(c.kind, families)]
    inputs = layer_inputs(graph, needs_inputs, score_feeds) if needs_inputs else {}
    done("layer inputs")
    say("recording activation shapes at batch 1 and 2")
    try:
        value_shapes = record_value_shapes(graph, feeds)
    except STNError as exc:  # an op the numpy reference cannot run: the artifact works, uncounted
        value_shapes = None
        say(f"activation shapes not recorded ({exc}); mem_limit will count weights only")
    done("shapes")
    decomposed = []
    for i, cand in enumerate(candidates):
        x = inputs.get(cand.weight)
        w = graph.initializers[cand.weight]
        with _blas_threads(1 if w.size <= SINGLE_THREAD_SIZE else None):
            decomposed.append(_decompose(cand, w, levels, families, None if x is None else x.ndim, search_limits,
                                         _positions(cand, value_shapes)))
        d = decomposed[-1]
        say(f"decomposed {i + 1}/{len(candidates)}: {cand.name} {d.meta['dense']['shape']} -> {d.dec.family}")
    done("decompose")
    if correct and decomposed:
        say("measuring per-level output statistics")
        for d in decomposed:
            cand, dec = d.cand, d.dec
            if not _bias_name(cand):
                continue
            bias = graph.initializers[_bias_name(cand)]
            if dec.family == "svd":
                d.corr = level_corrections(cand, d.dense, bias, dec.factors["a"], dec.factors["b"], dec.ranks,
                                           inputs[cand.weight])
            else:
                d.corr = level_corrections_dense(cand, d.dense, bias, dec.truncated, dec.levels, inputs[cand.weight])
    done("correct")
    if importance == "data" and decomposed:
        n_levels = sum(len(d.dec.ranks) for d in decomposed)
        say(f"scoring {n_levels} truncation levels on {len(next(iter(score_feeds.values())))} calibration samples")
        losses = score_truncations(graph, score_feeds, [_level_overrides(graph, d) for d in decomposed],
                                   progress=lambda k, n: say(f"scored {k}/{n}"))
        corrected = [d for d in decomposed if d.corr is not None]
        if corrected:
            # the correction is a guess that the next layer wants the full-rank statistics; it is
            # wrong for some layers (logits read by a softmax), so each level keeps it only where
            # it measurably lowers the output error
            say(f"scoring {sum(len(d.dec.ranks) for d in corrected)} levels without correction")
            raw = score_truncations(graph, score_feeds, [_level_overrides(graph, d, corrected=False) for d in corrected])
            for d, loss_raw in zip(corrected, raw):
                i = decomposed.index(d)
                for j, (with_corr, without) in enumerate(zip(losses[i], loss_raw)):
                    if without < with_corr:
                        d.corr[j, 0], d.corr[j, 1] = 1.0, 0.0
                losses[i] = [float(x) for x in np.minimum.accumulate(np.minimum(losses[i], loss_raw))]
    else:
        losses = [d.dec.spectral_loss for d in decomposed]
        for d in decomposed:  # without measurements, do not correct layers that produce model outputs
            if d.corr is not None and _feeds_output(graph, d.cand.node):
                d.corr = None
    done("score")
    reference = _reference_outputs(model, graph, feeds, example_inputs)
    header, builder = _assemble(graph, decomposed, losses, skipped, feeds, reference, value_shapes)
    say(f"writing {path}")
    size = builder.write(path, header)
    done("write")
    report = BakeReport(
        path=str(path), artifact_bytes=size, full_bytes=header["full_bytes"], skipped=skipped,
        layers=[BakedLayer(d.meta["name"], d.dec.family, tuple(d.meta["dense"]["shape"]), d.meta["max_rank"],
                           d.dec.ranks, int(graph.initializers[d.meta["weight"]].nbytes)) for d in decomposed],
        seconds=time.perf_counter() - t0, phases={k: round(v, 2) for k, v in phases.items()},
    )
    say(f"done in {report.seconds:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.phases.items()))
    return report


#: weights up to this many numbers are decomposed with one BLAS thread: their eigensolves and ALS
#: products are too small to share, and a second thread that spins while the other core is busy made
#: a 64x64x3x3 CP fit 7x slower on the 2-core machine (docs/RESULTS.md, bake time)
SINGLE_THREAD_SIZE = 1 << 20


def _blas_threads(limit: int | None):
    """A context that caps BLAS threads at ``limit`` (threadpoolctl, where installed; None: no cap)."""
    import contextlib

    if limit is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


def _families(structure: str | Sequence[str]) -> list[str] | None:
    """The decomposition families ``structure`` allows (None: all, searched per layer)."""
    from stn_edge.host.decompositions import names

    if structure == "auto":
        return None
    wanted = [structure] if isinstance(structure, str) else list(structure)
    unknown = [f for f in wanted if f not in names()]
    if unknown:
        raise ValueError(f"unknown decomposition families {unknown}; known: {', '.join(names())} (or 'auto')")
    return wanted


def _feeds_output(graph: Graph, node: Any) -> bool:
    """True when ``node``'s output reaches a graph output through shape-only or softmax-like ops."""
    outputs = {o.name for o in graph.outputs}
    frontier = list(node.outputs)
    passthrough = {"Softmax", "LogSoftmax", "Sigmoid", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze"}
    while frontier:
        value = frontier.pop()
        if value in outputs:
            return True
        frontier += [o for n in graph.consumers(value) if n.op in passthrough for o in n.outputs]
    return False


def _bias_name(cand: Candidate) -> str:
    """The bias the layer's node adds (Conv and Gemm have one after :func:`_ensure_bias`; MatMul none;
    a tied weight none: its output scale would scale every use)."""
    if cand.uses:
        return ""
    return cand.node.inputs[2] if cand.node.op in ("Conv", "Gemm") and len(cand.node.inputs) > 2 else ""


def _ensure_bias(graph: Graph, cand: Candidate) -> None:
    """Give a bias-less Conv/Gemm a zero bias, so a per-level shift has somewhere to go."""
    node = cand.node
    if node.op not in ("Conv", "Gemm") or (len(node.inputs) > 2 and node.inputs[2]):
        return
    w = graph.initializers[cand.weight]
    out = w.shape[1] if cand.layout == "in_out" else w.shape[0]
    name = f"{cand.weight}::zero_bias"
    graph.initializers[name] = np.zeros(out, dtype=w.dtype)
    node.inputs = node.inputs[:2] + [name]


def _level_overrides(graph: Graph, d: DecomposedLayer, corrected: bool = True) -> list[dict[str, np.ndarray]]:
    """For each level, the constants that differ from the dense model: the weight, and the bias if corrected."""
    cand, out = d.cand, []
    for j in range(len(d.dec.ranks)):
        w_k = d.dec.truncated(j)
        if corrected and d.corr is not None:
            bias = graph.initializers[_bias_name(cand)]
            w_k, b_k = corrected_weight(cand, w_k, bias, d.corr[j])
            out.append({cand.weight: w_k, _bias_name(cand): b_k})
        else:
            out.append({cand.weight: w_k})
    return out


def _positions(cand: Candidate, value_shapes: dict[str, Any] | None) -> int | None:
    """Output positions of ``cand`` per sample (a conv's output pixels, a linear layer's rows), from
    the shapes recorded at batch 1; None when unknown."""
    rec = (value_shapes or {}).get(cand.node.outputs[0])
    return None if rec is None else positions(cand.kind, rec[0])


def _decompose(cand: Candidate, w: np.ndarray, levels: int, families: list[str] | None,
               input_rank: int | None, limits: SearchLimits | None = None,
               positions: int | None = None) -> DecomposedLayer:
    """Decompose one weight with the best family (or SVD); the layer fields and ladder helpers."""
    from stn_edge.host.decompositions.svd import decompose_svd
    from stn_edge.host.structure import SearchLimits, choose_structure

    report: list[dict[str, Any]] = []
    if families == ["svd"] or cand.kind == "embedding" or cand.uses:  # tied uses share SVD factors
        best = decompose_svd(w, cand.kind, cand.layout, levels)
    else:
        try:
            best, report = choose_structure(cand, w, levels, families, limits=limits or SearchLimits(),
                                            positions=positions)
        except ValueError as exc:  # none of the allowed families fits this shape (Tucker-2 on a 1x1 conv)
            best = decompose_svd(w, cand.kind, cand.layout, levels)
            report = [{"name": "svd", "family": "svd", "fallback": str(exc)}]
    record_input_rank(best, input_rank)
    meta = best.layer(name=cand.name, node=cand.node.name, weight=cand.weight)
    if cand.uses:
        meta["tied"] = cand.uses  # one stored copy and ladder, lowered at every node that reads it
    if report:
        meta["search"] = report
    return DecomposedLayer(meta, cand, best, w)


def _reference_outputs(model: Any, graph: Graph, feeds: dict[str, np.ndarray],
                       example_inputs: Any = None) -> dict[str, np.ndarray]:
    """Full-rank outputs of the original model on the stored calibration samples."""
    stored = {k: v[:STORED_CALIBRATION] for k, v in feeds.items()}
    names = [o.name for o in graph.outputs]
    if hasattr(model, "forward"):
        import torch

        keywords = TorchInputs(example_inputs).keywords if example_inputs is not None else []
        tensors = [torch.from_numpy(np.ascontiguousarray(stored[v.name])) for v in graph.inputs]
        return dict(zip(names, reference_outputs(model, tensors, keywords)))
    from stn_edge.device.backends import get_backend

    return get_backend("numpy").prepare(graph).run(stored)


def _assemble(graph, decomposed, losses, skipped, feeds, reference,
              value_shapes=None) -> tuple[dict[str, Any], ArtifactBuilder]:
    builder = ArtifactBuilder()
    layer_weights = {d.meta["weight"] for d in decomposed}
    tensors = {k: builder.add_array(v) for k, v in graph.initializers.items() if k not in layer_weights}
    layers = []
    for d, loss in zip(decomposed, losses):
        meta = dict(d.meta)
        meta["dense"] = builder.add_array(d.dense)
        meta["factors"] = {k: builder.add_rows(v, d.dec.row_ends[k]) for k, v in d.dec.factors.items()}
        corr_bytes = 0
        if d.corr is not None:
            meta["corrections"] = builder.add_rows(d.corr, range(1, len(d.dec.ranks) + 1))
            corr_bytes = int(d.corr[0].nbytes)
        meta["ladder"] = {
            **meta["ladder"],  # ranks and, for multi-bond families, the bonds of each level
            "bytes": [int(b) + corr_bytes for b in d.dec.level_bytes],
            "loss": [float(x) for x in loss],
        }
        layers.append(meta)
    stored = {k: v[:STORED_CALIBRATION] for k, v in feeds.items()}
    header = {
        "producer": f"stn-edge {__version__}",
        "model": graph_to_dict(Graph(graph.nodes, graph.inputs, graph.outputs, {}, graph.opset)),
        "tensors": tensors,
        "layers": layers,
        "skipped": [{"weight": s.weight, "node": s.node, "reason": s.reason} for s in skipped],
        "calibration": {
            "inputs": {k: builder.add_array(np.ascontiguousarray(v)) for k, v in stored.items()},
            "outputs": {k: builder.add_array(np.ascontiguousarray(v)) for k, v in reference.items()},
        },
        "full_bytes": int(sum(v.nbytes for v in graph.initializers.values())),
    }
    if value_shapes:
        header["value_shapes"] = value_shapes  # activation memory at any batch size (stn_edge.activations)
    return header, builder
