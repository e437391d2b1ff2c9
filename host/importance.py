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
from stn_edge.graph import Graph, ValueInfo, dtype_name


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
    """
    names = sorted({name for levels in layers for level in levels for name in level})
    exe = weight_feed_executable(graph, names, backend)
    dense = {w: graph.initializers[w] for w in names}
    ref = exe.run({**feeds, **dense})
    scale = sum(float(np.sum(np.square(v, dtype=np.float64))) for v in ref.values()) or 1.0
    out: list[list[float]] = []
    for i, levels in enumerate(layers):
        losses = []
        for override in levels:
            y = exe.run({**feeds, **dense, **override})
            err = sum(float(np.sum(np.square(y[k].astype(np.float64) - ref[k]))) for k in ref)
            losses.append(err / scale)
        out.append([float(x) for x in np.minimum.accumulate(losses)])
        if progress:
            progress(i + 1, len(layers))
    return out
