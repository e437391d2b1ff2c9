"""Tensor-train (TT-matrix) decompositions of Linear weights and of conv kernels with tensorized channels.

Linear ``(out, in)`` with ``in = prod(i_k)``, ``out = prod(o_k)`` (Novikov et al., 2015):
``W[(i_1..i_d), (o_1..o_d)] = G_1[i_1, o_1] G_2[i_2, o_2] ... G_d[i_d, o_d]`` for ``d = 2`` or ``3``, each
``G_k`` a ``(r_{k-1}, r_k)`` matrix. ``d = 2`` is the Kronecker-sum SVD of Van Loan.

Conv ``(C_out, C_in, kh, kw)`` with ``C_in = i1*i2``, ``C_out = o1*o2``: the 3-core train
``[(i1, o1)] - [(kh, kw)] - [(i2, o2)]`` (the kernel core sits between the two channel cores, so the
device runs it as one Conv over ``N*i2*o1`` images of ``r_1`` channels).

TT-SVD left to right in float64: every core but the last is left-orthonormal and the last carries the
singular values, and each bond is ordered by the singular values of its unfolding (a prefix on one
bond alone is the best truncation of that unfolding). For three cores this makes the error of any
pair of prefixes exact and cheap: ``||W - W_ab||^2 = ||W||^2 - sum_{alpha<a, beta<b} s_beta^2
||G_2[alpha, :, beta]||^2``. Joint prefixes are not the TT-SVD truncated at ``(a, b)``; the tests
measure the ratio.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np

from stn_edge.host.decompositions.common import (
    Decomposition, SearchFamily, Trial, as_matrix, balanced_factors, bond_ladder, break_even_rank, build, energy_table,
    exact_rank, ladder_ranks, left_svd,
)


def conv_modes(c_in: int, c_out: int) -> tuple[list[int], list[int]]:
    """``([i1, i2], [o1, o2])`` that make the two channel cores ``i1*o1`` and ``i2*o2`` as equal as possible."""
    best, score = ([1, c_in], [1, c_out]), math.inf
    for i1 in (d for d in range(1, c_in + 1) if c_in % d == 0):
        for o1 in (d for d in range(1, c_out + 1) if c_out % d == 0):
            i2, o2 = c_in // i1, c_out // o1
            s = abs(math.log(i1 * o1 / (i2 * o2))) + 0.01 * abs(math.log(i1 / i2)) + 0.01 * abs(math.log(o1 / o2))
            if s < score:
                best, score = ([i1, i2], [o1, o2]), s
    return best


def train_tensor(w: np.ndarray, kind: str, layout: str, in_modes: Sequence[int], out_modes: Sequence[int]) -> np.ndarray:
    """The weight as a train of paired modes: ``(i1*o1, i2*o2[, i3*o3])`` (linear) or
    ``(i1*o1, kh*kw, i2*o2)`` (conv)."""
    if kind == "conv":
        (i1, i2), (o1, o2) = in_modes, out_modes
        kh, kw = w.shape[2:]
        t = w.reshape(o1, o2, i1, i2, kh, kw).transpose(2, 0, 4, 5, 3, 1)
        return t.reshape(i1 * o1, kh * kw, i2 * o2)
    d = len(in_modes)
    m = as_matrix(w, kind, layout).reshape(*out_modes, *in_modes)
    t = m.transpose([p for k in range(d) for p in (d + k, k)])
    return t.reshape([i * o for i, o in zip(in_modes, out_modes)])


def decompose_tt(w: np.ndarray, kind: str, layout: str = "conv", levels: int = 32,
                 in_modes: Sequence[int] | None = None, out_modes: Sequence[int] | None = None,
                 d: int = 3) -> Decomposition:
    """TT of a Linear weight (``d`` = 2 or 3 paired modes) or a 2-D conv kernel (2 channel modes).

    Modes default to balanced factorizations (:func:`balanced_factors`, :func:`conv_modes`); a Linear
    layer fed an N-D input needs ``structure["input_rank"]`` set by the caller (default 2; bake sets it,
    ``SEARCH.input_rank_kinds``).
    """
    t0 = time.perf_counter()
    if kind == "conv":
        if w.ndim != 4:
            raise ValueError(f"tt needs a 2-D conv weight (C_out, C_in, kh, kw), got shape {w.shape}")
        if in_modes is None or out_modes is None:
            in_modes, out_modes = conv_modes(w.shape[1], w.shape[0])
        d = 3
    else:
        n_out, n_in = as_matrix(w, kind, layout).shape
        in_modes = list(in_modes) if in_modes is not None else balanced_factors(n_in, d)
        out_modes = list(out_modes) if out_modes is not None else balanced_factors(n_out, d)
        d = len(in_modes)
    in_modes, out_modes = [int(x) for x in in_modes], [int(x) for x in out_modes]
    structure = {"in_modes": in_modes, "out_modes": out_modes}
    if kind == "linear":
        structure["input_rank"] = 2
    t = train_tensor(w.astype(np.float64), kind, layout, in_modes, out_modes)
    if d == 2:
        return _tt2(w, kind, layout, t, in_modes, out_modes, structure, levels, t0)
    if d != 3:
        raise ValueError(f"tt supports 2 or 3 modes, not {d}")
    return _tt3(w, kind, layout, t, in_modes, out_modes, structure, levels, t0)


def _tt2(w, kind, layout, t, in_modes, out_modes, structure, levels, t0) -> Decomposition:
    n1, n2 = t.shape
    u, s, rt = left_svd(t)
    top = min(break_even_rank(n1, n2), exact_rank(s))
    if top < 1:
        raise ValueError(f"tt: a {n1}x{n2} train saves no bytes")
    root = np.sqrt(s[:top])
    a = (u[:, :top] * root).T.reshape(top, in_modes[0], out_modes[0])
    b = (rt[:top] / root[:, None]).reshape(top, in_modes[1], out_modes[1])
    ranks = ladder_ranks(top, levels)
    total = float(np.sum(t ** 2)) or 1.0
    e2 = s ** 2
    errors = [math.sqrt(max(total - float(e2[:r].sum()), 0.0) / total) for r in ranks]
    return build("tt", kind, layout, w.shape, structure, {"a": (0, a), "b": (0, b)}, {}, [(r,) for r in ranks],
                 [0], errors, len(s), w.dtype, time.perf_counter() - t0)


def _tt3(w, kind, layout, t, in_modes, out_modes, structure, levels, t0) -> Decomposition:
    n1, n2, n3 = t.shape
    g1, _, rest = left_svd(t.reshape(n1, n2 * n3))
    r1 = g1.shape[1]
    u2, s2, g3 = left_svd(rest.reshape(r1 * n2, n3))
    r2 = u2.shape[1]
    g2 = u2.reshape(r1, n2, r2)
    table = energy_table(np.sum(g2 ** 2, axis=1) * (s2 ** 2)[None, :])
    total = float(np.sum(t ** 2)) or 1.0

    def params(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a * n1 + a * b * n2 + b * n3

    bonds = bond_ladder((r1, r2), lambda a, b: table[a - 1, b - 1], params, t.size, total, levels, (0, 1))
    if not bonds:
        raise ValueError(f"tt: no ranks of the {t.shape} train are smaller than the dense weight")
    errors = [math.sqrt(max(total - float(table[a - 1, b - 1]), 0.0) / total) for a, b in bonds]
    last = in_modes[-1], out_modes[-1]
    mid = (w.shape[2], w.shape[3]) if kind == "conv" else (in_modes[1], out_modes[1])
    core = g2.transpose(0, 2, 1).reshape(r1, r2, *mid)
    return build("tt", kind, layout, w.shape, structure,
                 {"a": (0, g1.T.reshape(r1, in_modes[0], out_modes[0])), "b": (1, g3.reshape(r2, *last))},
                 {"core": ((0, 1), core)}, bonds, (0, 1), errors, max(r1, r2), w.dtype, time.perf_counter() - t0)


def _trials(kind: str, shape: tuple[int, ...], layout: str, levels: int, limits) -> list[Trial]:
    if kind == "linear":
        return [Trial("tt/d2", lambda w: decompose_tt(w, kind, layout, levels, d=2)),
                Trial("tt/d3", lambda w: decompose_tt(w, kind, layout, levels, d=3))]
    if kind == "conv" and len(shape) == 4:
        return [Trial("tt", lambda w: decompose_tt(w, kind, layout, levels))]
    return []


def torch_weight(layer: dict, f: dict) -> "torch.Tensor":
    """The dense weight from torch cores: conv ``a (r1, i1, o1)``, ``core (r1, r2, kh, kw)``,
    ``b (r2, i2, o2)``; linear ``a (r1, i1, o1)``, [``core (r1, r2, i2, o2)``], ``b (r_last, i_d, o_d)``."""
    import torch

    shape = tuple(layer["dense"]["shape"])
    if layer["kind"] == "conv":  # (o1, o2, i1, i2, kh, kw)
        return torch.einsum("pac,pqyx,qbd->cdabyx", f["a"], f["core"], f["b"]).reshape(shape)
    ins, outs = layer["structure"]["in_modes"], layer["structure"]["out_modes"]
    if "core" in f:
        t = torch.einsum("pil,pqjm,qkn->ijklmn", f["a"], f["core"], f["b"])
    else:
        t = torch.einsum("rik,rjl->ijkl", f["a"], f["b"])
    m = t.reshape(math.prod(ins), math.prod(outs))  # (in, out)
    return m if layer.get("layout") == "in_out" else m.T


#: linear layers (two and three cores) and 2-D convs (including 1x1)
SEARCH = SearchFamily("tt", 40, _trials, torch_weight, input_rank_kinds=frozenset({"linear"}))
