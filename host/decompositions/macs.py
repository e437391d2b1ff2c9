"""Multiply-adds of a factorized layer at one ladder level, as :mod:`stn_edge.lowering` runs it.

Counted per *output position*: per input row for a linear layer (per sample at batch 1), per output
pixel for a conv. Only the ops :func:`stn_edge.device.profile.count_macs` counts do multiply-adds (Conv,
MatMul, Gemm; Reshape/Transpose/Add/Gather move data). Ops that run before a conv's strided kernel op
(its 1x1 input projection) run at input resolution, so a stride ``(sh, sw)`` multiplies them by
``sh * sw`` per output pixel (padding's border effect is ignored). With ``O, I`` the output/input
channels (features), ``K = kh * kw`` and ``s = sh * sw``:

=================  ===================================================================================
dense conv         ``O I K``;  dense linear ``O I``;  embedding: a Gather, 0
``svd`` conv       ``r I K + r O`` (the kernel Conv keeps the stride; one MAC per stored weight)
``svd`` linear     ``r I + r O``;  ``svd`` embedding ``r O`` (Gather, then MatMul by ``b``)
``svd-spatial``    ``s_other r I k1 + r O k2``: the first (k1 x 1) Conv strides only its own axis, so it
                   runs at the other axis' input resolution (``s_other`` = that axis' stride)
``tucker2``        ``s r_in I + r_out r_in K + O r_out``
``cp``             ``s R I + sw R kh + R kw + R O`` (the depthwise (kh x 1) Conv strides only the height)
``tt`` linear      ``sum_k prod(o_<k) prod(i_>k) r_{k-1} i_k o_k r_k`` (``r_0 = r_d = 1``): the MatMul
                   chain of ``_tt_linear`` contracts one core at a time; for 1024 = 32 x 32 that is
                   ``65536 r`` against ``2048 r`` stored numbers
``tt`` conv        ``s i2 i1 o1 r1 + i2 o1 r1 r2 K + o1 r2 i2 o2``
``tr``/``fctn``    ``s r0 r1 I + r0 r1 r2 K + O r0 r2``
=================  ===================================================================================

``svd``, ``svd-spatial``, ``tucker2`` and ``cp`` do at most about one multiply-add per stored weight per
output position (at stride 1), so they never exceed the dense layer below its bytes; the tensor-train
and ring families reuse each core for many positions of the other modes and can do far more.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from stn_edge.host.decompositions.common import Decomposition


def _io(d: Decomposition) -> tuple[int, int]:
    """``(out, in)`` features/channels of the dense weight."""
    if d.kind == "conv":
        return int(d.shape[0]), int(d.shape[1])
    if d.layout == "in_out":
        return int(d.shape[1]), int(d.shape[0])
    return int(d.shape[0]), int(d.shape[1])


def dense_macs(d: Decomposition) -> int:
    """Multiply-adds per output position of the dense layer (0 for an embedding lookup)."""
    if d.kind == "embedding":
        return 0
    o, i = _io(d)
    return o * i * int(math.prod(d.shape[2:])) if d.kind == "conv" else o * i


def level_macs(d: Decomposition, level: int, strides: Sequence[int] | None = None) -> float:
    """Multiply-adds per output position of ``d`` lowered at ladder ``level`` (see the module table).

    ``strides``: the conv's strides (default 1); ignored for linear and embedding layers.
    """
    return family_macs(d.family, d.kind, d.layout, d.shape, d.structure, d.bonds[level], strides)


def family_macs(family: str, kind: str, layout: str, shape: Sequence[int], structure: dict[str, Any],
                bonds: Sequence[int], strides: Sequence[int] | None = None) -> float:
    """:func:`level_macs` from a layer's fields and one level's bonds."""
    if kind == "conv":
        o, i = int(shape[0]), int(shape[1])
        kernel = [int(k) for k in shape[2:]]
    else:
        o, i = (int(shape[1]), int(shape[0])) if layout == "in_out" else (int(shape[0]), int(shape[1]))
        kernel = []
    st = [int(s) for s in (strides or [])] + [1] * (len(kernel) - len(strides or []))
    s = math.prod(st)
    K = math.prod(kernel)
    b = [int(x) for x in bonds]
    if family == "svd":
        (r,) = b
        if kind == "embedding":
            return float(r * o)  # table (vocab, dim): Gather a^T (vocab, r), then MatMul by b (r, dim)
        return float(r * i * K + r * o)
    if family == "svd-spatial":
        (r,) = b
        first = 0 if structure.get("first", "h") == "h" else 1
        k1, k2 = kernel[first], kernel[1 - first]
        return float(st[1 - first] * r * i * k1 + r * o * k2)
    if family == "tucker2":
        r_out, r_in = b
        return float(s * r_in * i + r_out * r_in * K + o * r_out)
    if family == "cp":
        (r,) = b
        return float(s * r * i + st[1] * r * kernel[0] + r * kernel[1] + r * o)
    if family == "tt":
        ins = [int(x) for x in structure["in_modes"]]
        outs = [int(x) for x in structure["out_modes"]]
        if kind == "conv":
            (i1, i2), (o1, o2) = ins, outs
            r1, r2 = b
            return float(s * i2 * i1 * o1 * r1 + i2 * o1 * r1 * r2 * K + o1 * r2 * i2 * o2)
        ranks = [1] + b + [1]
        total = 0
        for k in range(len(ins)):
            total += math.prod(outs[:k]) * math.prod(ins[k + 1:]) * ranks[k] * ins[k] * outs[k] * ranks[k + 1]
        return float(total)
    if family in ("tr", "fctn"):
        r0, r1, r2 = b
        return float(s * r0 * r1 * i + r0 * r1 * r2 * K + o * r0 * r2)
    raise ValueError(f"no multiply-add count for family {family!r} ({kind})")
