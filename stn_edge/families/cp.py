"""``cp``: a 2-D conv kernel as a sum of ``R`` rank-one terms (CP / PARAFAC).

Storage form (conv only; bonds ``[R]``): ``a (R, C_in)``, ``h (R, kh)``, ``w (R, kw)``, ``b (R, C_out)``,
rank-major, held as stored. Lowered as a 1x1 Conv C_in->R, a depthwise (kh x 1) Conv (the node's
stride/pads on the height), a depthwise (1 x kw) Conv (on the width), a 1x1 Conv R->C_out + bias.
A level's correction scale folds into ``b`` (axis 1).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stn_edge.families.base import Emitter, Family, LayerDims, conv_attrs, conv_bias
from stn_edge.graph import Node


def _conv(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    a, h, w, b = f["a"], f["h"], f["w"], f["b"]
    r = a.shape[0]
    e = Emitter(node, layer)
    x = e.op("Conv", [node.inputs[0], e.const("a", a[:, :, None, None])], conv_attrs(node.attrs, [1, 1], ()))
    hv = conv_attrs(node.attrs, [h.shape[1], 1], (0,))
    x = e.op("Conv", [x, e.const("h", h[:, None, :, None])], {**hv, "group": r})
    wv = conv_attrs(node.attrs, [1, w.shape[1]], (1,))
    x = e.op("Conv", [x, e.const("w", w[:, None, None, :])], {**wv, "group": r})
    w4 = b.T[:, :, None, None]  # a view of the rank-major rows, as for svd
    e.op("Conv", [x, e.const("b", w4)] + conv_bias(node), conv_attrs(node.attrs, [1, 1], ()), last=True)
    return e.result()


def _reconstruct(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    return np.einsum("ro,ri,ry,rx->oiyx", f["b"], f["a"], f["h"], f["w"], optimize=True)


def _macs(d: LayerDims, bonds: list[int]) -> float:
    # the depthwise (kh x 1) Conv strides only the height
    (r,) = bonds
    return float(d.s * r * d.inp + d.strides[1] * r * d.kernel[0] + r * d.kernel[1] + r * d.out)


FAMILY = Family("cp", {"conv": _conv}, _reconstruct, _macs, extra_ops=3, output_factor=("b", 1),
                factors=("a", "h", "w", "b"))
