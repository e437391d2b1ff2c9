"""``tt``: a tensor-train (TT-matrix) of a linear layer, or of a conv's channel modes around its kernel.

Storage form. ``a`` is the input-side core and ``b`` the output-side one; ``structure`` holds
``in_modes`` and ``out_modes`` (``in = prod(i_k)``, ``out = prod(o_k)``, ``k = 1..d``).

* linear, ``d`` = 2 or 3, bonds ``[r_1 .. r_{d-1}]``: ``a (r_1, i_1, o_1)`` (held ``(i_1, o_1, r_1)``
  when the input has lead axes besides the batch, ``structure["input_rank"] > 2``), ``b (r_{d-1}, i_d,
  o_d)`` rank-major; for ``d = 3`` a ``core`` nested-shell over ``(r_1, r_2)``, held ``(r_1, i_2, o_2,
  r_2)``. Lowered as a Reshape/Transpose/MatMul chain + Add(bias).
* conv, ``C_in = i1 i2``, ``C_out = o1 o2``, bonds ``[r_1, r_2]``: ``a (r_1, i1, o1)`` held ``(i1, o1,
  r_1)``, ``b (r_2, i2, o2)``, ``core`` nested-shell over ``(r_1, r_2)``, held ``(r_2, r_1, kh, kw)``.
  Lowered as a MatMul over i1 (channels last), the kernel Conv on ``(N i2 o1, r_1)`` images, a MatMul
  over ``(r_2, i2)``, a Transpose back + Add(bias).

The output channels are split over two cores, so a level's correction scale runs as one Mul.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from stn_edge.families.base import Emitter, Family, LayerDims, conv_attrs
from stn_edge.graph import Node


def _cores(f: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Logical TT-matrix cores ``(r_left, i_k, o_k, r_right)`` from the factors (cores as boxes)."""
    cores = [f["a"].transpose(1, 2, 0)[None]]
    if "core" in f:
        cores.append(f["core"].transpose(0, 2, 3, 1))
    cores.append(f["b"][..., None])
    return cores


def _linear(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    """x (lead..., in) through the TT-matrix chain; see the state descriptions in the comments."""
    st = layer["structure"]
    ins, outs = [int(i) for i in st["in_modes"]], [int(o) for o in st["out_modes"]]
    L = int(st.get("input_rank", 2)) - 1
    e = Emitter(node, layer)
    a, b = f["a"], f["b"]
    d = len(ins)
    # cores 1.. as the matrices (r_{k-1} * i_k, o_k * r_k) a MatMul reads, with r_k: views of b
    # (r, i_d, o_d) and of the middle core, held (r1, i2, o2, r2)
    mats: list[tuple[str, int]] = []
    if "core" in f:
        p, i, o, q = f["core"].shape
        mats.append((e.const("core", f["core"].reshape(p * i, o * q)), q))
    mats.append((e.const("b", b.reshape(b.shape[0] * b.shape[1], b.shape[2])), 1))
    if L == 1:
        return _linear_rows(e, node, a, mats, ins, outs)
    # lead axes kept: state before core k is (lead, Q_k, P_k, r_{k-1} * i_k), Q_k = prod(i_{k+1:}),
    # P_k = prod(o_{:k-1}); core 0 is the matrix (i1, o1 * r1), a view of a held (i1, o1, r1)
    lead = [0] * L
    r1 = a.shape[2]
    mats.insert(0, (e.const("a", a.reshape(a.shape[0], a.shape[1] * r1)), r1))
    q = int(np.prod(ins[1:]))
    x = e.reshape(node.inputs[0], lead + [ins[0], q])
    x = e.transpose(x, list(range(L)) + [L + 1, L])
    p = 1
    for k, (g, rr) in enumerate(mats):
        x = e.op("MatMul", [x, g])
        p *= outs[k]
        if k == d - 1:
            break
        nxt = ins[k + 1]
        q //= nxt
        x = e.reshape(x, lead + [nxt, q, p, rr])
        x = e.transpose(x, list(range(L)) + [L + 1, L + 2, L + 3, L])
        x = e.reshape(x, lead + [q, p, rr * nxt])
    x = e.reshape(x, lead + [int(np.prod(outs))])
    e.bias(x)
    return e.result()


def _linear_rows(e: Emitter, node: Node, a: np.ndarray, mats: list[tuple[str, int]], ins: list[int],
                 outs: list[int]) -> tuple[list[Node], dict[str, np.ndarray]]:
    """The TT chain for x (N, in), every core read in place and only 2-D transposes of activations.

    Core 0 is r1 matrices ``a[r] (i1, o1)``: a batched MatMul of the rows (i2..i_d, N) of x. After
    it the values are ``(r1, i2, [i3..], N, o1)``; core k contracts the two leading axes
    ``(r_{k-1}, i_k)`` (moved last by one transpose) and leaves ``([i_{k+1}..], N, o_1..o_k, r_k)``,
    whose leading ``i_{k+1}`` one transpose moves next to ``r_k`` for core k + 1.
    """
    d = len(ins)
    x = e.reshape(node.inputs[0], [-1] + ins)                                # (N, i1, ..., i_d)
    x = e.transpose(x, list(range(2, d + 1)) + [0, 1])                       # (i2, ..., i_d, N, i1)
    x = e.reshape(x, [1, -1, ins[0]])
    x = e.op("MatMul", [x, e.const("a", a)])                                 # (r1, i2, ..., N, o1)
    x = e.transpose(e.reshape(x, [a.shape[0] * ins[1], -1]), [1, 0])        # ([i3..], N, o1 | r1 i2)
    for k, (g, rr) in enumerate(mats, start=1):
        x = e.op("MatMul", [x, g])                                           # ([i_{k+2}..], N, o_1..o_k | o_{k+1} r_{k+1})
        if k == d - 1:
            break
        x = e.transpose(e.reshape(x, [ins[k + 1], -1]), [1, 0])             # ([i_{k+3}..], N, o_1..o_{k+1}, r_{k+1} | i_{k+2})
        x = e.reshape(x, [-1, rr * ins[k + 1]])
    x = e.reshape(x, [-1, int(np.prod(outs))])
    e.bias(x)
    return e.result()


def _matrix(f: dict[str, np.ndarray], ins: list[int], outs: list[int]) -> np.ndarray:
    """The ``(in, out)`` matrix of a TT-matrix chain."""
    acc = None
    for g in _cores(f):
        if acc is None:
            acc = g[0]  # (i1, o1, r1)
        else:
            rl = g.shape[0]
            acc = (acc.reshape(-1, rl) @ g.reshape(rl, -1))  # (..., i_k o_k r_k)
            acc = acc.reshape(-1, g.shape[3])
    # acc holds indices (i1, o1, i2, o2, ...): bring the i's first
    d = len(ins)
    t = acc.reshape([v for pair in zip(ins, outs) for v in pair])
    t = t.transpose(list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2)))
    return t.reshape(int(np.prod(ins)), int(np.prod(outs)))


def _conv(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    st = layer["structure"]
    (i1, i2), (o1, o2) = st["in_modes"], st["out_modes"]
    a, core, b = f["a"], f["core"], f["b"]  # a held (i1, o1, r1), core held (r2, r1, kh, kw)
    r1 = a.shape[2]
    r2, _, kh, kw = core.shape
    e = Emitter(node, layer)
    g1 = e.const("a", a.reshape(i1, o1 * r1))
    x = e.transpose(node.inputs[0], [0, 2, 3, 1])                       # (N, H, W, C_in)
    x = e.reshape(x, [0, 0, 0, i1, i2])
    x = e.transpose(x, [0, 1, 2, 4, 3])                                 # (N, H, W, i2, i1)
    x = e.op("MatMul", [x, g1])
    x = e.reshape(x, [0, 0, 0, i2 * o1 * r1])                           # (N, H, W, i2*o1*r1)
    x = e.transpose(x, [0, 3, 1, 2])
    x = e.reshape(x, [-1, r1, 0, 0])                                    # (N*i2*o1, r1, H, W)
    x = e.op("Conv", [x, e.const("core", core)], conv_attrs(node.attrs, [kh, kw], (0, 1)))
    x = e.reshape(x, [-1, i2 * o1 * r2, 0, 0])                          # (N, i2*o1*r2, H', W')
    x = e.transpose(x, [0, 2, 3, 1])
    x = e.reshape(x, [0, 0, 0, i2, o1, r2])
    x = e.transpose(x, [0, 1, 2, 4, 5, 3])                              # (N, H', W', o1, r2, i2)
    x = e.reshape(x, [0, 0, 0, o1, r2 * i2])
    x = e.op("MatMul", [x, e.const("b", b.reshape(r2 * i2, o2))])       # a view of b (r2, i2, o2)
    x = e.reshape(x, [0, 0, 0, o1 * o2])
    x = e.transpose(x, [0, 3, 1, 2])                                    # (N, C_out, H', W')
    e.bias(x, channel_dims=2)
    return e.result()


def _reconstruct(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    st = layer["structure"]
    shape = tuple(layer["dense"]["shape"])
    if layer["kind"] == "conv":  # a (r1, i1, o1), core (r1, r2, kh, kw), b (r2, i2, o2) -> (o1, o2, i1, i2, kh, kw)
        t = np.einsum("pac,pqyx,qbd->cdabyx", f["a"], f["core"], f["b"], optimize=True)
        return t.reshape(shape)
    m = _matrix(f, [int(i) for i in st["in_modes"]], [int(o) for o in st["out_modes"]])
    return m if layer.get("layout") == "in_out" else m.T


def _macs(d: LayerDims, bonds: list[int]) -> float:
    """Conv: ``s i2 i1 o1 r1 + i2 o1 r1 r2 K + o1 r2 i2 o2``. Linear: the MatMul chain contracts one
    core at a time, ``sum_k prod(o_<k) prod(i_>k) r_{k-1} i_k o_k r_k`` (``r_0 = r_d = 1``)."""
    ins = [int(x) for x in d.structure["in_modes"]]
    outs = [int(x) for x in d.structure["out_modes"]]
    if d.kind == "conv":
        (i1, i2), (o1, o2) = ins, outs
        r1, r2 = bonds
        return float(d.s * i2 * i1 * o1 * r1 + i2 * o1 * r1 * r2 * d.K + o1 * r2 * i2 * o2)
    ranks = [1] + list(bonds) + [1]
    return float(sum(math.prod(outs[:k]) * math.prod(ins[k + 1:]) * ranks[k] * ins[k] * outs[k] * ranks[k + 1]
                     for k in range(len(ins))))


def _held_axes(layer: dict[str, Any], name: str, ndim: int) -> tuple[int, ...] | None:
    kind = layer["kind"]
    if name == "core":
        return (0, 2, 3, 1) if kind == "linear" else (1, 0) + tuple(range(2, ndim))  # (r1, i2, o2, r2) / (r2, r1, kh, kw)
    if name == "a" and (kind == "conv" or int(layer["structure"].get("input_rank", 2)) > 2):
        return (1, 2, 0)                # (r1, i1, o1) -> (i1, o1, r1): the MatMul's (i1, o1 * r1)
    return None


FAMILY = Family("tt", {"linear": _linear, "conv": _conv}, _reconstruct, _macs, extra_ops=3, held_axes=_held_axes,
                optional_factors=("core",))
