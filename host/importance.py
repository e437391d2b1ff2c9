"""Data-driven importance: how much each truncation level of each layer changes the model's output.

The planner adds these numbers across layers, so they must be on one scale: each is the relative
squared error of all outputs, ``sum ||y_k - y||^2 / sum ||y||^2`` on the calibration inputs, when
that one layer is truncated and every other layer is dense.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from stn_edge.device.backends import get_backend
from stn_edge.errors import BackendError
from stn_edge.graph import Graph, Node, ValueInfo, dtype_name


def weight_feed_executable(graph: Graph, weights: Sequence[str], backend: str = "auto"):
    """Prepare ``graph`` with ``weights`` turned from constants into inputs, so they can be swapped per run."""
    inits = {k: v for k, v in graph.initializers.items() if k not in weights}
    extra = [ValueInfo(w, list(graph.initializers[w].shape), dtype_name(graph.initializers[w].dtype)) for w in weights]
    scoring = Graph(graph.nodes, graph.inputs + extra, graph.outputs, inits, graph.opset)
    names = ["onnxruntime", "numpy"] if backend == "auto" else [backend]
    for name in names:
        try:
            return get_backend(name).prepare(scoring, "cpu")
        except BackendError:
            if name == names[-1]:
                raise
    raise AssertionError("unreachable")


def downstream(graph: Graph, constants: set[str]) -> tuple[list[Node], list[str]]:
    """The nodes whose result changes when ``constants`` change (those reading them and everything
    after, in graph order), and the values they read from the rest of the graph (graph inputs and
    outputs of unchanged nodes; initializers excluded)."""
    changed: set[str] = set(constants)
    nodes = []
    for n in graph.nodes:
        if any(i in changed for i in n.inputs if i):
            nodes.append(n)
            changed.update(o for o in n.outputs if o)
    produced = {o for n in nodes for o in n.outputs}
    boundary = []
    for n in nodes:
        for i in n.inputs:
            if i and i not in produced and i not in graph.initializers and i not in boundary:
                boundary.append(i)
    return nodes, boundary


def dense_values(graph: Graph, feeds: dict[str, np.ndarray], names: Sequence[str], backend: str = "auto") -> dict[str, np.ndarray]:
    """``feeds``, the graph's outputs and the intermediate values ``names``, from one run of ``graph``.

    The numpy reference runs it first (these extra outputs have no declared shapes, which
    onnxruntime may refuse); onnxruntime where the reference cannot (an op it lacks), and reports
    the real shapes. ``backend="numpy"`` allows the reference only."""
    outputs = {o.name for o in graph.outputs}
    extra = [ValueInfo(n, [], "float32") for n in names if n not in feeds and n not in outputs]
    probe = Graph(graph.nodes, graph.inputs, graph.outputs + extra, graph.initializers, graph.opset)
    order = ["numpy"] if backend == "numpy" else ["numpy", "onnxruntime"]
    for name in order:
        try:
            return {**feeds, **get_backend(name).prepare(probe, "cpu").run(feeds)}
        except BackendError:
            if name == order[-1]:
                raise
    raise AssertionError("unreachable")


def score_truncations(
    graph: Graph,
    feeds: dict[str, np.ndarray],
    layers: Sequence[Sequence[dict[str, np.ndarray]]],
    backend: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[list[float]]:
    """Relative output error for each truncation level of each layer.

    ``layers[i][j]`` maps constant names (the weight, and the bias when a correction changes it)
    to their values at level ``j`` of layer ``i``; every other constant keeps its dense value.
    Returns one list of losses per layer, made non-increasing in the level (a larger rank never
    predicts more loss).

    Exact and only as costly as it must be: the dense model runs once, keeping the values at every
    layer's boundary, and each level re-runs only the part of the graph downstream of its layer
    (:func:`downstream`), fed those values.
    """
    cuts = [downstream(graph, {name for level in levels for name in level}) for levels in layers]
    ref = dense_values(graph, feeds, sorted({b for _, boundary in cuts for b in boundary}), backend)
    outputs = [o.name for o in graph.outputs]
    scale = sum(float(np.sum(np.square(ref[k], dtype=np.float64))) for k in outputs) or 1.0
    out: list[list[float]] = []
    for i, (levels, (nodes, boundary)) in enumerate(zip(layers, cuts)):
        names = sorted({name for level in levels for name in level})
        produced = {o for n in nodes for o in n.outputs}
        used = {i for n in nodes for i in n.inputs if i in graph.initializers}
        sub = Graph(nodes, [ValueInfo(b, list(ref[b].shape), dtype_name(ref[b].dtype)) for b in boundary],
                    [o for o in graph.outputs if o.name in produced],
                    {k: v for k, v in graph.initializers.items() if k in used}, graph.opset)
        exe = weight_feed_executable(sub, names, backend)
        fed = {b: ref[b] for b in boundary}
        dense = {w: graph.initializers[w] for w in names}
        losses = []
        for override in levels:
            y = exe.run({**fed, **dense, **override})
            err = sum(float(np.sum(np.square(y[k].astype(np.float64) - ref[k]))) for k in y)
            losses.append(err / scale)
        out.append([float(x) for x in np.minimum.accumulate(losses)])
        if progress:
            progress(i + 1, len(layers))
    return out
