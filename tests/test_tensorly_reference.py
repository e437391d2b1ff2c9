"""Our decompositions against TensorLy's, an independent implementation (issue 11).

Where both compute the same thing (HOSVD for ``tucker2``, TT-SVD for ``tt``) the errors agree to
float precision. Where ours refines further (the ring families run ALS sweeps after a TR-SVD
start), its top level is at least as good as TensorLy's TR-SVD at the same bonds. CP recovers a
planted low-rank kernel as TensorLy's ``parafac`` does. Our lower levels are prefixes of one
factorization (that is what makes a ladder), so only the top level is compared where a fresh
factorization at smaller ranks would differ.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

tl = pytest.importorskip("tensorly")
from tensorly.decomposition import parafac, partial_tucker, tensor_ring, tensor_train_matrix  # noqa: E402

from stn_edge.host.decompositions.cp import decompose_cp  # noqa: E402
from stn_edge.host.decompositions.fctn import decompose_fctn  # noqa: E402
from stn_edge.host.decompositions.tr import decompose_tr  # noqa: E402
from stn_edge.host.decompositions.tt import decompose_tt  # noqa: E402
from stn_edge.host.decompositions.tucker import decompose_tucker2  # noqa: E402

RNG = np.random.default_rng(0)


def _rel(x: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(x - approx) / np.linalg.norm(x))


def test_tucker2_is_tensorly_hosvd_at_every_level():
    w = RNG.standard_normal((16, 12, 3, 3)).astype(np.float32)
    d = decompose_tucker2(w, 8)
    for bonds, err in zip(d.bonds, d.errors):
        (core, factors), _ = partial_tucker(w.astype(np.float64), rank=bonds, modes=[0, 1], init="svd", n_iter_max=0)
        ref = _rel(w, tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]))
        assert err == pytest.approx(ref, rel=1e-5), bonds


@pytest.mark.parametrize("cores", [2, 3])
def test_tt_linear_is_tensorly_tt_svd(cores):
    w = RNG.standard_normal((64, 48)).astype(np.float32)  # (out, in)
    d = decompose_tt(w, "linear", "out_in", 8, d=cores)
    ins, outs = d.structure["in_modes"], d.structure["out_modes"]
    m = w.T.astype(np.float64)  # (in, out): the TT-matrix pairs (i_k, o_k)
    tt = tensor_train_matrix(m.reshape(list(ins) + list(outs)), rank=[1, *d.bonds[-1], 1])
    ref = _rel(m, tl.tt_matrix_to_tensor(tt).reshape(m.shape))
    assert d.errors[-1] == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("decompose", [decompose_tr, decompose_fctn])
def test_ring_top_level_is_no_worse_than_tensorly_tr_svd(decompose):
    w = RNG.standard_normal((16, 12, 3, 3)).astype(np.float32)
    d = decompose(w, 8)
    r0, r1, r2 = d.bonds[-1]
    x = w.reshape(16, 12, 9).transpose(1, 2, 0).astype(np.float64)  # the ring's modes (C_in, K, C_out)
    ref = _rel(x, tl.tr_to_tensor(tensor_ring(x, rank=[r0, r1, r2, r0])))
    assert d.errors[-1] <= ref * 1.02


def test_cp_recovers_a_planted_kernel_like_tensorly():
    factors = [RNG.standard_normal((n, 4)) for n in (16, 12, 3, 3)]
    w = tl.cp_to_tensor((np.ones(4), factors)).astype(np.float32)
    d = decompose_cp(w, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _rel(w, tl.cp_to_tensor(parafac(w.astype(np.float64), rank=4, init="svd", n_iter_max=500, tol=1e-10)))
    assert ref < 1e-4
    assert d.errors[-1] < 1e-4
