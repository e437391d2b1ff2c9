"""``svd-spatial``: a 2-D conv kernel split into a (k1 x 1) and a (1 x k2) conv through ``r`` channels.

Storage form (conv only; bonds ``[r]``): ``a (r, C_in, k1)``, ``b (r, C_out, k2)``, rank-major.
``structure["first"]`` is ``"h"`` (default: ``k1`` is the kernel height, the first conv runs along
the height) or ``"w"`` (the axes swapped). ``b`` is held ``(C_out, r, k2)``, the second conv's kernel.
Lowered as a (k1 x 1) Conv C_in->r (the node's stride/pads on that axis), then a (1 x k2) Conv
r->C_out + bias (on the other axis). A level's correction scale folds into ``b`` (axis 1).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stn_edge.families.base import Emitter, Family, LayerDims, conv_attrs, conv_bias
from stn_edge.graph import Node


def _first(layer: dict[str, Any]) -> int:
    """0 when the first conv runs along the height, 1 along the width."""
    return 0 if layer["structure"].get("first", "h") == "h" else 1


def _conv(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    a, b = f["a"], f["b"]
    first = _first(layer)
    e = Emitter(node, layer)
    k1, k2 = a.shape[2], b.shape[2]
    # both kernels are views of the held arrays with a unit axis: a (r, C_in, k1), b held (C_out, r, k2)
    if first == 0:
        w1, w2, kern1, kern2 = a[:, :, :, None], b[:, :, None, :], [k1, 1], [1, k2]
    else:
        w1, w2, kern1, kern2 = a[:, :, None, :], b[:, :, :, None], [1, k1], [k2, 1]
    mid = e.op("Conv", [node.inputs[0], e.const("a", w1)], conv_attrs(node.attrs, kern1, (first,)))
    e.op("Conv", [mid, e.const("b", w2)] + conv_bias(node), conv_attrs(node.attrs, kern2, (1 - first,)), last=True)
    return e.result()


def _reconstruct(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    if _first(layer) == 0:
        return np.einsum("riy,rox->oiyx", f["a"], f["b"], optimize=True)
    return np.einsum("rix,roy->oiyx", f["a"], f["b"], optimize=True)


def _macs(d: LayerDims, bonds: list[int]) -> float:
    # the first (k1 x 1) Conv strides only its own axis, so it runs at the other axis' input resolution
    (r,) = bonds
    first = 0 if d.structure.get("first", "h") == "h" else 1
    k1, k2 = d.kernel[first], d.kernel[1 - first]
    return float(d.strides[1 - first] * r * d.inp * k1 + r * d.out * k2)


def _held_axes(layer: dict[str, Any], name: str, ndim: int) -> tuple[int, ...] | None:
    return (1, 0, 2) if name == "b" else None  # (r, C_out, k2) -> (C_out, r, k2): the second Conv's kernel


FAMILY = Family("svd-spatial", {"conv": _conv}, _reconstruct, _macs, extra_ops=1, output_factor=("b", 1),
                held_axes=_held_axes)
