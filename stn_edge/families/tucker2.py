"""``tucker2``: a conv kernel's channel modes factorized, its spatial modes kept.

Storage form (conv only; bonds ``[r_out, r_in]``): ``a (r_in, C_in)`` and ``b (r_out, C_out)``
rank-major; ``core`` a nested-shell core over ``(r_out, r_in)`` (``structure["shells"]``), held as its
box ``(r_out, r_in, *k)``. Lowered as a 1x1 Conv C_in->r_in, the kernel Conv r_in->r_out (the node's
stride/pads/dilations), a 1x1 Conv r_out->C_out + bias. A level's correction scale folds into ``b``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stn_edge.families.base import Emitter, Family, LayerDims, conv_attrs, conv_bias
from stn_edge.graph import Node


def _conv(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    a, core, b = f["a"], f["core"], f["b"]
    nd = core.ndim - 2
    ones = [1] * nd
    e = Emitter(node, layer)
    x = e.op("Conv", [node.inputs[0], e.const("a", a.reshape(a.shape + (1,) * nd))], conv_attrs(node.attrs, ones, ()))
    x = e.op("Conv", [x, e.const("core", core)], conv_attrs(node.attrs, list(core.shape[2:]), tuple(range(nd))))
    # b^T reshaped to (C_out, r_out, 1, ...) is a view of the rank-major rows, as for svd
    w3 = b.T.reshape(b.shape[1], b.shape[0], *ones)
    e.op("Conv", [x, e.const("b", w3)] + conv_bias(node), conv_attrs(node.attrs, ones, ()), last=True)
    return e.result()


def _reconstruct(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    a, core, b = f["a"], f["core"], f["b"]
    p, q = core.shape[:2]
    w = b.T @ core.reshape(p, -1)  # (C_out, r_in * K)
    w = w.reshape(b.shape[1], q, -1).transpose(0, 2, 1) @ a  # (C_out, K, C_in)
    return w.transpose(0, 2, 1).reshape(tuple(layer["dense"]["shape"]))


def _macs(d: LayerDims, bonds: list[int]) -> float:
    r_out, r_in = bonds
    return float(d.s * r_in * d.inp + r_out * r_in * d.K + d.out * r_out)


FAMILY = Family("tucker2", {"conv": _conv}, _reconstruct, _macs, extra_ops=2, output_factor=("b", 1),
                factors=("a", "core", "b"))
