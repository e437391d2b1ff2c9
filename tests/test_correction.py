"""Per-level output correction: the closed form matches a direct evaluation, and it restores the statistics."""
from __future__ import annotations

import numpy as np
import pytest

from stn_edge.device.backends.numpy import conv
from stn_edge.graph import Node
from stn_edge.host.correction import corrected_weight, level_corrections, level_corrections_dense
from stn_edge.host.decompositions.svd import svd_factors
from stn_edge.host.layers import Candidate
from stn_edge.lowering import reconstruct


@pytest.fixture()
def conv_case():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 6, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(12).astype(np.float32)
    x = np.maximum(rng.standard_normal((16, 6, 7, 7)), 0).astype(np.float32) + 0.3  # post-ReLU-like, non-zero mean
    node = Node("Conv", "c", ["x", "w", "b"], ["y"], {"pads": [1, 1, 1, 1], "strides": [2, 2], "kernel_shape": [3, 3]})
    cand = Candidate(node, "w", "conv", "conv")
    a, b, _ = svd_factors(w.reshape(12, -1), 7)
    return cand, w, bias, a.reshape(7, 6, 3, 3), b, x


def test_closed_form_equals_direct_evaluation(conv_case):
    cand, w, bias, a, b, x = conv_case
    ranks = [1, 3, 5, 7]
    meta = {"kind": "conv", "family": "svd", "dense": {"shape": list(w.shape)}}
    closed = level_corrections(cand, w, bias, a, b, ranks, x)
    direct = level_corrections_dense(cand, w, bias, lambda j: reconstruct(meta, {"a": a[:ranks[j]], "b": b[:ranks[j]]}),
                                     len(ranks), x)
    np.testing.assert_allclose(closed, direct, rtol=2e-3, atol=2e-4)


def test_corrected_layer_has_full_rank_statistics(conv_case):
    cand, w, bias, a, b, x = conv_case
    meta = {"kind": "conv", "family": "svd", "dense": {"shape": list(w.shape)}}
    corr = level_corrections(cand, w, bias, a, b, [2], x)[0]
    w2 = reconstruct(meta, {"a": a[:2], "b": b[:2]})
    wc, bc = corrected_weight(cand, w2, bias, corr)
    attrs = dict(pads=[1, 1, 1, 1], strides=[2, 2])
    full = conv(x, w, bias, **attrs)
    fixed = conv(x, wc, bc, **attrs)
    raw = conv(x, w2, bias, **attrs)
    np.testing.assert_allclose(fixed.mean(axis=(0, 2, 3)), full.mean(axis=(0, 2, 3)), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(fixed.std(axis=(0, 2, 3)), full.std(axis=(0, 2, 3)), rtol=1e-3, atol=1e-3)
    # and it is a real change: the raw truncation's statistics were off
    assert np.abs(raw.std(axis=(0, 2, 3)) - full.std(axis=(0, 2, 3))).max() > 0.05


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_moments_equal_running_the_layer_per_level(conv_case, kind):
    """The patch-moment shortcut gives the corrections a per-level evaluation of the layer gives."""
    from stn_edge.host.correction import _level_corrections_direct

    cand, w, bias, a, b, x = conv_case
    rng = np.random.default_rng(1)
    if kind == "linear":  # a (in, out) MatMul on a (batch, seq, in) input
        w = rng.standard_normal((10, 7)).astype(np.float32)
        bias = rng.standard_normal(7).astype(np.float32)
        x = (rng.standard_normal((5, 4, 10)) + 0.5).astype(np.float32)
        cand = Candidate(Node("MatMul", "m", ["x", "w"], ["y"], {}), "w", "linear", "in_out")
    levels = [w * s for s in (0.3, 0.7, 1.0)] + [w + rng.standard_normal(w.shape).astype(np.float32) * 0.1]
    fast = level_corrections_dense(cand, w, bias, lambda j: levels[j], len(levels), x, chunk=1000)
    slow = _level_corrections_direct(cand, w, bias, lambda j: levels[j], len(levels), x)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)


def test_moments_hold_for_inputs_with_a_large_mean():
    """float32 products of data far from zero would cancel in E[pp^T] - mm^T; shifted, they do not."""
    from stn_edge.host.correction import input_moments

    rng = np.random.default_rng(2)
    x = (50.0 + 0.1 * rng.standard_normal((4000, 6))).astype(np.float32)
    cand = Candidate(Node("MatMul", "m", ["x", "w"], ["y"], {}), "w", "linear", "in_out")
    mean, cov = input_moments(cand, x, chunk=6 * 1000)  # four chunks
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(cov, np.cov(x64.T, bias=True), rtol=1e-3, atol=1e-6)
