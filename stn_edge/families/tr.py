"""``tr``: a tensor ring over a conv's (C_in)-(kernel)-(C_out) modes, closed by the bond ``r_0``.

Storage form (conv only; bonds ``[r_0, r_1, r_2]``). All three factors are nested-shell cores
(``structure["shells"]``): ``a`` over ``(r_0, r_1)``, held ``(r_0, r_1, C_in)``; ``core`` over ``(r_1,
r_2)``, held ``(r_2, r_1, *k)``; ``b`` over ``(r_2, r_0)``, held ``(C_out, r_0, r_2)``. Lowered as a 1x1
Conv C_in->r_0 r_1, a Reshape to ``(N r_0, r_1, H, W)``, the kernel Conv, a Reshape to ``(N, r_0 r_2,
H', W')``, a 1x1 Conv + bias: the last Conv contracts ``(r_0, r_2)`` together, which closes the ring.
A level's correction scale folds into ``b`` (axis 1 of the stored cells: ``C_out``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stn_edge.families.base import Emitter, Family, LayerDims, conv_attrs, conv_bias
from stn_edge.graph import Node


def lower_ring(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    """The ring's plain ops (shared with ``fctn``, whose three-node network is this ring)."""
    a, core, b = f["a"], f["core"], f["b"]  # held (r0, r1, C_in), (r2, r1, *k), (C_out, r0, r2)
    nd = core.ndim - 2
    ones = (1,) * nd
    (r0, r1, c_in), r2, c_out = a.shape, core.shape[0], b.shape[0]
    e = Emitter(node, layer)
    x = e.op("Conv", [node.inputs[0], e.const("a", a.reshape((r0 * r1, c_in) + ones))], conv_attrs(node.attrs, list(ones), ()))
    x = e.reshape(x, [-1, r1] + [0] * nd)                               # (N*r0, r1, H, W)
    x = e.op("Conv", [x, e.const("core", core)], conv_attrs(node.attrs, list(core.shape[2:]), tuple(range(nd))))
    x = e.reshape(x, [-1, r0 * r2] + [0] * nd)                          # (N, r0*r2, H', W')
    w3 = b.reshape((c_out, r0 * r2) + ones)
    e.op("Conv", [x, e.const("b", w3)] + conv_bias(node), conv_attrs(node.attrs, list(ones), ()), last=True)
    return e.result()


def reconstruct_ring(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    """The dense kernel of the ring (shared with ``fctn``)."""
    a, core, b = f["a"], f["core"], f["b"]
    c = core.reshape(core.shape[0], core.shape[1], -1)
    w = np.einsum("abi,bgk,gao->oik", a, c, b, optimize=True)
    return w.reshape(tuple(layer["dense"]["shape"]))


def ring_macs(d: LayerDims, bonds: list[int]) -> float:
    """``s r0 r1 I + r0 r1 r2 K + O r0 r2`` (shared with ``fctn``)."""
    r0, r1, r2 = bonds
    return float(d.s * r0 * r1 * d.inp + r0 * r1 * r2 * d.K + d.out * r0 * r2)


def ring_held_axes(layer: dict[str, Any], name: str, ndim: int) -> tuple[int, ...] | None:
    """How the ring's cores are held (shared with ``fctn``)."""
    if name == "core":
        return (1, 0) + tuple(range(2, ndim))  # (r1, r2, *k) -> (r2, r1, *k): the kernel Conv's weight
    if name == "b":
        return (2, 1, 0)                       # (r2, r0, C_out) -> (C_out, r0, r2): the last Conv's (C_out, r0 * r2)
    return None


FAMILY = Family("tr", {"conv": lower_ring}, reconstruct_ring, ring_macs, extra_ops=4, output_factor=("b", 1),
                held_axes=ring_held_axes, factors=("a", "core", "b"))
