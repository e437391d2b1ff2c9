"""Structure search: it finds the structure a weight was built in, and reports every candidate."""
from __future__ import annotations

import numpy as np
import pytest

from stn_edge.graph import Node
from stn_edge.host.layers import Candidate
from stn_edge.host.decompositions import names as family_names
from stn_edge.host.structure import SearchLimits, choose_structure, error_at
from test_decompositions import planted_kron, planted_lowrank, planted_spatial, planted_tucker2

RNG = np.random.default_rng(99)


def conv_candidate() -> Candidate:
    return Candidate(Node("Conv", "conv", ["x", "W"], ["y"], {"kernel_shape": [3, 3]}), "W", "conv", "conv")


def linear_candidate(layout: str = "out_in") -> Candidate:
    node = Node("Gemm", "fc", ["x", "W"], ["y"], {"transB": 1}) if layout == "out_in" else Node("MatMul", "fc", ["x", "W"], ["y"])
    return Candidate(node, "W", "linear", layout)


def noisy(w: np.ndarray, level: float = 1e-3) -> np.ndarray:
    return (w + level * np.abs(w).mean() * RNG.standard_normal(w.shape)).astype(np.float32)


@pytest.mark.parametrize("planted, family", [
    (lambda: planted_tucker2(48, 40, 3, 4, 4), "tucker2"),
    (lambda: planted_spatial(48, 40, 3, 4), "svd-spatial"),
    (lambda: planted_lowrank(48, 40, 3, 4), "svd"),
])
def test_search_finds_the_planted_conv_structure(planted, family):
    best, report = choose_structure(conv_candidate(), noisy(planted()))
    assert best.family == family, [(r["name"], r.get("score")) for r in report]
    assert report[0]["chosen"] and report[0]["family"] == family


def test_search_finds_a_planted_kronecker_linear_structure():
    best, report = choose_structure(linear_candidate(), noisy(planted_kron(60, 48, 2)))
    assert best.family == "tt" and best.structure["in_modes"] and len(best.structure["in_modes"]) == 2, report[:3]


def test_report_lists_every_applicable_family_with_its_numbers():
    w = planted_tucker2(32, 24, 3, 6, 5)
    best, report = choose_structure(conv_candidate(), noisy(w, 0.1), levels=16)
    scored = [r for r in report if "score" in r]
    assert {r["family"] for r in report} == set(family_names())
    assert [r["score"] for r in scored] == sorted(r["score"] for r in scored)
    assert sum(r["chosen"] for r in scored) == 1 and scored[0]["name"] in ("tucker2", "svd", "tr", "fctn")
    for r in scored:
        assert {"err@10%", "err@25%", "err@50%", "seconds", "levels", "min_bytes", "max_bytes"} <= set(r)
        assert 0.0 <= r["err@50%"] <= r["err@10%"] <= 1.0
        assert r["max_bytes"] < r["dense_bytes"]
    assert best.levels <= 16


def test_limits_skip_expensive_families_and_say_why():
    w = planted_lowrank(32, 24, 3, 4)
    _, report = choose_structure(conv_candidate(), w, limits=SearchLimits(cp_max_size=100, ring_max_size=100))
    skipped = {r["family"]: r["skipped"] for r in report if "skipped" in r}
    assert set(skipped) == {"cp", "tr", "fctn"} and "cp_max_size" in skipped["cp"]


def test_families_filter_and_1x1_convs():
    w = RNG.standard_normal((32, 16, 1, 1)).astype(np.float32)
    _, report = choose_structure(conv_candidate(), w)
    assert {r["family"] for r in report} == {"svd", "tt"}  # no kernel to factor
    best, report = choose_structure(conv_candidate(), planted_tucker2(), families=["svd-spatial"])
    assert best.family == "svd-spatial" and all(r["family"] == "svd-spatial" for r in report)


def test_embedding_tables_get_svd_only():
    table = planted_lowrank(64, 12, 1, 3).reshape(64, 12)  # (vocab, dim)
    cand = Candidate(Node("Gather", "emb", ["W", "ids"], ["y"], {"axis": 0}), "W", "embedding", "in_out")
    best, report = choose_structure(cand, table)
    assert best.family == "svd" and [r["family"] for r in report] == ["svd"]
    assert np.allclose(best.truncated(best.levels - 1), table, atol=1e-4)


def test_activation_weighted_errors_follow_the_gram():
    from stn_edge.host.decompositions.svd import decompose_svd
    from stn_edge.host.structure import weighted_errors

    w = RNG.standard_normal((20, 30)).astype(np.float32)
    d = decompose_svd(w, "linear", "out_in")
    assert np.allclose(weighted_errors(d, w, np.eye(30)), d.errors, atol=1e-5)  # identity Gram: plain errors
    v = np.linalg.svd(w.astype(np.float64))[2][:3].T
    top = weighted_errors(d, w, v @ v.T + 1e-12 * np.eye(30))  # inputs live in the top-3 right singular space
    assert all(e < 1e-3 for e, r in zip(top, d.ranks) if r >= 3) and top[0] > 0.1
    best, report = choose_structure(linear_candidate(), w, families=["svd"], gram=v @ v.T + 1e-12 * np.eye(30))
    assert report[0]["err@50%"] < 1e-3


def test_error_at_is_a_step_function():
    assert error_at([10, 20, 30], [0.5, 0.3, 0.1], 5) == 1.0
    assert error_at([10, 20, 30], [0.5, 0.3, 0.1], 25) == 0.3
    assert error_at([10, 20, 30], [0.5, 0.3, 0.1], 1e9) == 0.1


def test_search_does_not_depend_on_the_machines_speed(monkeypatch):
    """The chosen structure and its factors are the same on a machine 1000x slower (a clock that
    jumps a second per read): the fits run a fixed number of sweeps, not until a deadline."""
    import itertools
    import time

    w = noisy(planted_tucker2(24, 20, 4, 3)).astype(np.float32)
    fast, fast_report = choose_structure(conv_candidate(), w, levels=8)
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    slow, slow_report = choose_structure(conv_candidate(), w, levels=8)
    assert slow.family == fast.family
    scores = lambda report: [(c["name"], c.get("score")) for c in report]  # noqa: E731
    assert scores(slow_report) == scores(fast_report)
    for k in fast.factors:
        np.testing.assert_array_equal(slow.factors[k], fast.factors[k])


def test_levels_are_never_cut_for_speed():
    """A TT-linear layer of 256 = 16 x 16 does 8192 r multiply-adds per sample for 512 r numbers
    stored, far above the dense layer's 65536 at its top levels: it keeps all of them all the same,
    and the report gives its compute."""
    w = (RNG.standard_normal((256, 256)) / 16).astype(np.float32)
    best, report = choose_structure(linear_candidate(), w)
    rows = {r["name"]: r for r in report}
    assert all("skipped" not in r for r in report)
    assert rows["tt/d2"]["levels"] == 32 and rows["tt/d2"]["macs_ratio"] > 10 and rows["tt/d3"]["macs_ratio"] > 1
    assert rows["svd"]["macs_ratio"] <= 1.0 and rows["svd"]["compute"] <= 1.0
    assert best.levels == rows[next(r["name"] for r in report if r["chosen"])]["levels"]


def test_max_macs_ratio_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="bake keeps every memory level.*latency_limit_ms"):
        SearchLimits(max_macs_ratio=1.0)


def test_speed_breaks_ties_between_families():
    """Within ``speed_tie`` of the best score the family with the least compute wins; at 0 the best
    score wins. With an op cost on a conv with few output pixels CP's three extra ops make it the
    slowest; the ranking changes, the ladders do not."""
    w = noisy(planted_tucker2(32, 32, 3, 8, 8)).astype(np.float32)
    fams = ["svd", "cp", "tucker2"]
    _, exact = choose_structure(conv_candidate(), w, levels=8, families=fams, limits=SearchLimits(speed_tie=0.0), positions=64)
    _, fast = choose_structure(conv_candidate(), w, levels=8, families=fams, limits=SearchLimits(speed_tie=1e4), positions=64)
    chosen = lambda report: next(r for r in report if r["chosen"])  # noqa: E731
    assert chosen(exact)["score"] == min(r["score"] for r in exact)
    assert chosen(fast)["compute"] == min(r["compute"] for r in fast)
    by = lambda report: {c["name"]: c for c in report}  # noqa: E731
    assert by(fast)["cp"]["compute"] > by(fast)["svd"]["compute"]
    assert {n: r["levels"] for n, r in by(fast).items()} == {n: r["levels"] for n, r in by(exact).items()}


def test_op_cost_is_charged_per_output_position():
    """Without positions (or cost) the extra ops are free; with few positions they dominate."""
    w = noisy(planted_tucker2(32, 32, 3, 8, 8)).astype(np.float32)
    # 32x32 3x3: 9,216 multiply-adds per output pixel; at 64 pixels one op costs 7,812 per pixel
    _, small = choose_structure(conv_candidate(), w, levels=8, families=["svd", "cp"], positions=64)
    _, free = choose_structure(conv_candidate(), w, levels=8, families=["svd", "cp"])
    by = lambda report: {c["name"]: c for c in report}  # noqa: E731
    assert by(small)["cp"]["macs_ratio"] - by(free)["cp"]["macs_ratio"] == pytest.approx(3 * 5e5 / 64 / 9216, rel=1e-2)
    assert by(small)["svd"]["macs_ratio"] - by(free)["svd"]["macs_ratio"] == pytest.approx(5e5 / 64 / 9216, rel=1e-2)
