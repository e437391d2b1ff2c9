"""``svd``: a weight as the product of two rank-major factors.

Storage form (bonds ``[r]``; the first ``k`` rows of both factors are level ``k``'s rank-``k`` SVD):

=========  ==============================  ====================================================
kind       factors                         lowered as
=========  ==============================  ====================================================
conv       ``a (r, C_in, *k)``, ``b (r,    Conv(x, a) (the node's stride/pads/dilations), then a
           C_out)``                        1x1 Conv(., b^T) + bias
linear     ``a (r, in)``, ``b (r, out)``   MatMul(x, a^T), then MatMul/Gemm(., b) + bias
embedding  ``a (r, vocab)``, ``b (r,       Gather(a^T, ids), then MatMul(., b)
           dim)``
=========  ==============================  ====================================================

Every factor is held as stored. A level's correction scale folds into ``b`` (axis 1: the outputs).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stn_edge.families.base import Family, LayerDims
from stn_edge.graph import Node


def _conv(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    a, b = f["a"], f["b"]
    k = a.shape[0]
    nd = a.ndim - 2
    w1, w2, mid = f"{layer['name']}::a", f"{layer['name']}::b", f"{node.outputs[0]}::r"
    first = Node("Conv", f"{node.name}::a", [node.inputs[0], w1], [mid], dict(node.attrs))
    first.attrs["kernel_shape"] = list(a.shape[2:])
    second_attrs = {"kernel_shape": [1] * nd}
    second = Node("Conv", f"{node.name}::b", [mid, w2] + node.inputs[2:3], list(node.outputs), second_attrs)
    # b^T reshaped to (C_out, k, 1, ...) is a view of the rank-major rows: no copy
    return [first, second], {w1: a, w2: b.T.reshape(b.shape[1], k, *([1] * nd))}


def _linear(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    a, b = f["a"], f["b"]
    w1, w2, mid = f"{layer['name']}::a", f"{layer['name']}::b", f"{node.outputs[0]}::r"
    first = Node("MatMul", f"{node.name}::a", [node.inputs[0], w1], [mid])
    if node.op == "Gemm":
        second = Node("Gemm", f"{node.name}::b", [mid, w2] + node.inputs[2:3], list(node.outputs))
    else:
        second = Node("MatMul", f"{node.name}::b", [mid, w2], list(node.outputs))
    return [first, second], {w1: a.T, w2: b}


def _embedding(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    # table (vocab, dim) = a^T b: look rows up in a^T (vocab, k), then project with b (k, dim)
    a, b = f["a"], f["b"]
    w1, w2, mid = f"{layer['name']}::a", f"{layer['name']}::b", f"{node.outputs[0]}::r"
    first = Node("Gather", f"{node.name}::a", [w1, node.inputs[1]], [mid], {"axis": 0})
    second = Node("MatMul", f"{node.name}::b", [mid, w2], list(node.outputs))
    return [first, second], {w1: a.T, w2: b}


def _reconstruct(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    a, b = f["a"], f["b"]
    shape = tuple(layer["dense"]["shape"])
    if layer["kind"] == "conv":
        return (b.T @ a.reshape(a.shape[0], -1)).reshape(shape)
    if layer.get("layout") == "in_out":
        return a.T @ b
    return b.T @ a


def _macs(d: LayerDims, bonds: list[int]) -> float:
    (r,) = bonds
    if d.kind == "embedding":
        return float(r * d.out)  # table (vocab, dim): Gather a^T (vocab, r), then MatMul by b (r, dim)
    return float(r * d.inp * d.K + r * d.out)


FAMILY = Family("svd", {"conv": _conv, "linear": _linear, "embedding": _embedding}, _reconstruct, _macs,
                extra_ops=1, output_factor=("b", 1), needs_structure=False)
