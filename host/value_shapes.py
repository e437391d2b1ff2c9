"""Value shapes at bake: the shape of every value of the captured graph at batch 1 and batch 2.

Stored in the artifact header (``value_shapes``), they let a device count the activation memory of
any lowered graph at any batch without running the model (:mod:`stn_edge.activations`).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from stn_edge.device.backends.numpy import NumpyExecutable
from stn_edge.graph import Graph, dtype_name

Shape = tuple[int, ...]


def record_value_shapes(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
    """Shapes of every non-constant value of ``graph`` at batch 1 and batch 2 (axis 0 of ``feeds``).

    Runs the numpy reference backend twice on the first one and two samples (one sample is
    repeated when ``feeds`` holds only one). Inputs whose batch axis is fixed in the graph are run
    at that size both times: nothing grows with the batch then. Returns the header's
    ``value_shapes`` dict.
    """
    def batch(n: int) -> dict[str, np.ndarray]:
        out = {}
        for v in graph.inputs:
            x = np.asarray(feeds[v.name])
            if v.shape and isinstance(v.shape[0], int) or x.ndim == 0:
                out[v.name] = x
                continue
            reps = -(-n // x.shape[0])
            out[v.name] = np.concatenate([x] * reps)[:n] if reps > 1 else x[:n]
        return out

    exe = NumpyExecutable(graph)
    seen: list[dict[str, tuple[Shape, str]]] = []
    for n in (1, 2):
        shapes: dict[str, tuple[Shape, str]] = {}

        def observe(name: str, value: np.ndarray) -> None:
            shapes[name] = (tuple(int(d) for d in value.shape), dtype_name(value.dtype))

        feeds_n = batch(n)
        for name, x in feeds_n.items():
            observe(name, x)
        exe.run(feeds_n, observe=observe)
        seen.append(shapes)
    return {name: [list(s1), list(seen[1].get(name, (s1, dt))[0]), dt] for name, (s1, dt) in seen[0].items()}
