"""A tiny artifact built by hand, byte for byte deterministic: the golden file and the format tests use it.

Model: ``y = relu(x @ W^T + c)`` with ``W (8, 16)`` stored as an SVD layer with a 3-level ladder.
"""
from __future__ import annotations

import numpy as np

from stn_edge.format import ArtifactBuilder
from stn_edge.graph import Graph, Node, ValueInfo, graph_to_dict


def tiny_parts() -> tuple[dict, ArtifactBuilder, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    c = rng.standard_normal(8).astype(np.float32)
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    r = 5  # break-even rank of 8x16 is 5
    a = (np.sqrt(s[:r])[:, None] * vt[:r]).astype(np.float32)
    b = (u[:, :r] * np.sqrt(s[:r])).T.astype(np.float32)
    ranks = [1, 3, 5]
    graph = Graph(
        nodes=[Node("Gemm", "fc", ["x", "W", "c"], ["h"], {"transB": 1}), Node("Relu", "act", ["h"], ["y"])],
        inputs=[ValueInfo("x", ["batch", 16], "float32")],
        outputs=[ValueInfo("y", ["batch", 8], "float32")],
    )
    x = rng.standard_normal((2, 16)).astype(np.float32)
    y = np.maximum(x @ w.T + c, 0)
    builder = ArtifactBuilder()
    header = {
        "producer": "stn-edge tests",
        "model": graph_to_dict(graph),
        "tensors": {"c": builder.add_array(c)},
        "layers": [{
            "name": "W", "weight": "W", "node": "fc", "kind": "linear", "family": "svd", "layout": "out_in",
            "max_rank": 8, "dense": builder.add_array(w),
            "factors": {"a": builder.add_rows(a, ranks), "b": builder.add_rows(b, ranks)},
            "ladder": {"ranks": ranks, "bytes": [k * 24 * 4 for k in ranks],
                       "loss": [float(np.sum(s[k:] ** 2) / np.sum(s ** 2)) for k in ranks]},
        }],
        "calibration": {"inputs": {"x": builder.add_array(x)}, "outputs": {"y": builder.add_array(y)}},
        "full_bytes": int(w.nbytes + c.nbytes),
    }
    return header, builder, {"W": w, "c": c, "a": a, "b": b, "x": x, "y": y}


def tiny_bytes() -> bytes:
    header, builder, _ = tiny_parts()
    return builder.to_bytes(header)
