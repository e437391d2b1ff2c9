"""Activation memory: recorded shapes, the liveness peak, budgets that hold it, chunked batches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stn_edge.activations import activation_bytes
from stn_edge.host.value_shapes import record_value_shapes
from stn_edge.device import Runtime
from stn_edge.device.memory import ENGINE_MEMORY
from stn_edge.errors import ArtifactError, BudgetError, InputError
from stn_edge.format import ArtifactReader
from stn_edge.graph import Graph, Node, ValueInfo
from memtools import tool as _tool
from memtools import traced_peak
from test_format import GOLDEN, _golden_header, _with_header

torch = pytest.importorskip("torch")


def _chain() -> Graph:
    """x (N, 4) -> MatMul (N, 8) -> Relu -> Reshape (view) -> MatMul (N, 2)."""
    rng = np.random.default_rng(0)
    nodes = [
        Node("MatMul", "m1", ["x", "w1"], ["h"]),
        Node("Relu", "r", ["h"], ["a"]),
        Node("Reshape", "v", ["a", "shape"], ["a2"]),
        Node("MatMul", "m2", ["a2", "w2"], ["y"]),
    ]
    inits = {"w1": rng.standard_normal((4, 8)).astype(np.float32), "w2": rng.standard_normal((8, 2)).astype(np.float32),
             "shape": np.array([-1, 8], np.int64)}
    return Graph(nodes, [ValueInfo("x", ["batch", 4])], [ValueInfo("y", ["batch", 2])], inits)


def test_recorded_shapes_tell_the_batch_axis():
    g = _chain()
    shapes = record_value_shapes(g, {"x": np.ones((5, 4), np.float32)})
    assert shapes["x"] == [[1, 4], [2, 4], "float32"]
    assert shapes["h"] == [[1, 8], [2, 8], "float32"] and shapes["y"] == [[1, 2], [2, 2], "float32"]
    assert "w1" not in shapes  # constants are weights, not activations


def test_liveness_peak_of_a_chain_is_exact():
    g = _chain()
    shapes = record_value_shapes(g, {"x": np.ones((1, 4), np.float32)})  # one sample is repeated for batch 2
    # batch 3: x (48 B) + h (96) live at m1 -> x dies; h + a (96) at r -> h dies; a2 is a view of a;
    # a + y (24) at m2. Peak: h + a = 192 bytes.
    est = activation_bytes(g, shapes, batch=3)
    assert (est.peak, est.at_node, est.recorded) == (192, "r", True)
    assert activation_bytes(g, shapes, batch=30).peak == 1920  # linear in the batch
    assert activation_bytes(g, None).recorded is False and activation_bytes(g, None).peak == 0
    with pytest.raises(ValueError, match="batch must be at least 1"):
        activation_bytes(g, shapes, batch=0)


def test_merged_batch_axes_scale_with_the_batch():
    """(N * heads, L, d) after a reshape: the merged axis doubles from batch 1 to 2."""
    nodes = [Node("Reshape", "split", ["x", "s"], ["h"]), Node("Relu", "r", ["h"], ["y"])]
    g = Graph(nodes, [ValueInfo("x", ["batch", 4, 6])], [ValueInfo("y", [-1, 4, 3])],
              {"s": np.array([-1, 4, 3], np.int64)})
    shapes = record_value_shapes(g, {"x": np.zeros((3, 4, 6), np.float32)})
    assert shapes["h"][:2] == [[2, 4, 3], [4, 4, 3]]
    # x and its view h share one buffer (96 B per sample) + y (96 B per sample)
    assert activation_bytes(g, shapes, batch=5).peak == 5 * 96 * 2


# --------------------------------------------------------------------------- a model whose activations dominate


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory) -> Path:
    """Three 3x3 Conv(32) at 16x16 (tools/measure_memory.py's model, smaller)."""
    return _tool("measure_memory").bake_cnn(tmp_path_factory.mktemp("act") / "cnn.stn", channels=32, size=16)


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("budget", ["100%", "25%"])
def test_estimate_matches_what_numpy_allocates(cnn_path, budget):
    for batch in (1, 8):
        rt = Runtime.load(cnn_path, mem_limit=budget, backend="numpy", batch_size=batch)
        x = _x(batch)
        peak = traced_peak(lambda: rt.run(x))
        est = rt.plan.activation_bytes
        assert 0.8 * est <= peak <= ENGINE_MEMORY["numpy"].activation_copies * est + (64 << 10), (batch, est, peak)


def test_byte_budgets_hold_weights_and_activations(cnn_path):
    one = Runtime.load(cnn_path, mem_limit=None, backend="numpy", batch_size=1)
    full_weights, act1 = one.plan.total_bytes, one.plan.activation_bytes
    big = Runtime.load(cnn_path, mem_limit=None, backend="numpy", batch_size=16)
    assert big.plan.activation_bytes > 10 * act1 and big.plan.total_bytes == full_weights  # "100%": acts on top
    budget = big.footprint() - full_weights // 2  # room for the batch-16 activations and half the weights
    rt = Runtime.load(cnn_path, mem_limit=budget, backend="numpy", batch_size=16)
    assert rt.footprint() <= budget
    assert full_weights // 4 < rt.plan.total_bytes <= full_weights // 2 + full_weights // 8
    assert "activations" in rt.plan.table() and "at batch 16" in rt.plan.table()
    # the same bytes at batch 1 leave far more for weights: the full model
    assert Runtime.load(cnn_path, mem_limit=budget, backend="numpy").plan.total_bytes == full_weights
    with pytest.raises(BudgetError, match="of activations") as err:
        Runtime.load(cnn_path, mem_limit=big.plan.activation_bytes // 2, backend="numpy", batch_size=16)
    rt = Runtime.load(cnn_path, mem_limit=err.value.smallest_feasible, backend="numpy", batch_size=16)
    assert rt.footprint() <= err.value.smallest_feasible


def test_rescale_keeps_counting_activations(cnn_path):
    rt = Runtime.load(cnn_path, mem_limit="100%", backend="numpy", batch_size=8)
    budget = rt.footprint() - rt.plan.total_bytes // 2
    rt.rescale(budget)
    assert rt.footprint() <= budget and rt.plan.batch_size == 8 and rt.plan.activation_bytes > 0
    assert rt.plan.total_bytes < rt.plan_for(None).total_bytes


def test_a_larger_batch_runs_in_chunks_with_the_same_results(cnn_path):
    whole = Runtime.load(cnn_path, mem_limit="50%", backend="numpy", batch_size=11)
    chunked = Runtime.load(cnn_path, mem_limit="50%", backend="numpy", batch_size=4)
    x = _x(11, 3)
    want = whole.run(x)["output"]
    got = chunked.run(x)["output"]
    assert got.shape == (11, 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
def test_batch_size_must_be_a_positive_int(cnn_path, bad):
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        Runtime.load(cnn_path, backend="numpy", batch_size=bad)


def test_artifacts_without_shapes_count_weights_only():
    rt = Runtime.load(GOLDEN, backend="numpy", batch_size=64)
    assert rt.plan.activation_bytes == 0 and rt.footprint() == rt.plan.total_bytes
    assert "activations" not in rt.plan.table()


def test_writer_stamps_minor_1_only_with_value_shapes(cnn_path):
    with ArtifactReader(cnn_path) as r:
        assert r.version == (1, 1) and "value_shapes" in r.header
    with ArtifactReader(GOLDEN) as r:
        assert r.version == (1, 0)


@pytest.mark.parametrize("shapes, message", [
    ({"x": [[1, 4], [2, 4]]}, "must be \\[shape at batch 1"),
    ({"x": [[1, -4], [2, 4], "float32"]}, "non-negative integer"),
    ({"x": [[1, 4], [2, 4], "object"]}, "dtype"),
    ({"x": [[1 << 30, 1 << 30], [2, 4], "float32"]}, "elements"),
    ({"x": [list(range(1, 40)), [2], "float32"]}, "32 axes"),
    ({"x": [[1, 4], [2], "float32"]}, "must have the axes"),
    ({"x": [[2, 4], [1, 4], "float32"]}, "none smaller"),
    ({"x": "1,4"}, "value_shapes"),
    (["x"], "value_shapes"),
])
def test_hostile_value_shapes_are_refused(shapes, message):
    header = _golden_header()
    header["value_shapes"] = shapes
    with pytest.raises(ArtifactError, match=message):
        ArtifactReader(_with_header(header))


def test_cli_plan_and_run_take_a_batch_size(cnn_path, capsys, tmp_path):
    import json

    from stn_edge.cli import main

    rt = Runtime.load(cnn_path, mem_limit=None, backend="numpy", batch_size=8)
    budget = str(rt.footprint() - rt.plan.total_bytes // 2)
    assert main(["plan", str(cnn_path), "--mem-limit", budget, "--backend", "numpy", "--batch-size", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = rt.plan_for(int(budget))
    assert (got["batch_size"], got["activation_bytes"], got["total_bytes"]) == (8, want.activation_bytes, want.total_bytes)
    np.save(tmp_path / "x.npy", _x(8))
    assert main(["run", str(cnn_path), "--mem-limit", budget, "--backend", "numpy", "--batch-size", "8",
                 "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npz")]) == 0
    y = np.load(tmp_path / "y.npz")["output"]
    with Runtime.load(cnn_path, mem_limit=int(budget), backend="numpy", batch_size=8) as same:
        np.testing.assert_allclose(y, same.run(_x(8))["output"], rtol=1e-6, atol=1e-7)
    assert main(["plan", str(cnn_path), "--backend", "numpy", "--batch-size", "0"]) == 6


def test_inspect_reports_activations(cnn_path, capsys):
    import json

    from stn_edge.cli import main

    assert main(["inspect", str(cnn_path), "--json"]) == 0
    acts = json.loads(capsys.readouterr().out)["activations"]
    with Runtime.load(cnn_path, backend="numpy", batch_size=32) as rt:
        assert acts == {"recorded": True, "numpy_peak": {"1": Runtime.load(cnn_path, backend="numpy").plan.activation_bytes,
                                                         "32": rt.plan.activation_bytes}}
    assert main(["inspect", str(GOLDEN)]) == 0
    assert "activations: not recorded" in capsys.readouterr().out


def test_percentages_plan_the_same_weights_on_every_engine(cnn_path):
    """A share is of the weights: every engine gets the same ranks, whatever its copies."""
    from stn_edge.device.memory import EngineMemory
    from stn_edge.plan import parse_budget

    rt = Runtime.load(cnn_path, mem_limit="100%", backend="numpy")
    try:
        for budget in ("73%", "50%", "31%", "10%"):
            want = rt.plan_for(budget)
            assert want.budget == parse_budget(budget, rt.full_bytes)
            for copies in (3.2, 2.75, 1.1, 3.3):
                rt._backend.engine_memory = EngineMemory(copies, 0)
                got = rt.plan_for(budget)
                assert (got.budget, [c.level for c in got.layers]) == (want.budget, [c.level for c in want.layers])
                del rt._backend.engine_memory
    finally:
        rt._backend.__dict__.pop("engine_memory", None)


def test_rescale_can_change_the_batch_size(cnn_path):
    """rescale(batch_size=) re-plans the same bytes for another batch: fewer weights for a larger
    batch, and run() chunks at the new size from then on."""
    rt = Runtime.load(cnn_path, mem_limit=None, backend="numpy", batch_size=2)
    budget = Runtime.load(cnn_path, mem_limit=None, backend="numpy", batch_size=16).footprint() \
        - rt.plan.total_bytes // 2
    small = rt.rescale(budget)
    big = rt.rescale(budget, batch_size=16)
    assert (small.batch_size, big.batch_size, rt.batch_size) == (2, 16, 16)
    assert big.total_bytes < small.total_bytes and rt.footprint() <= budget
    x = _x(20, 4)
    want = rt._exe.run({"input": x})["output"]  # the same plan, the whole batch in one call
    np.testing.assert_allclose(rt.run(x)["output"], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        rt.rescale(budget, batch_size=0)
    assert rt.batch_size == 16  # a refused rescale changes nothing


def test_chunked_batches_warn_once(cnn_path):
    import warnings

    from stn_edge.errors import ChunkedBatchWarning

    rt = Runtime.load(cnn_path, mem_limit="50%", backend="numpy", batch_size=2)
    with pytest.warns(ChunkedBatchWarning, match=r"a batch of 5 runs in 3 chunks of at most 2.*batch_size=5"):
        rt.run(_x(5))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rt.run(_x(5))
        rt.run(_x(2))
    assert not [w for w in seen if issubclass(w.category, ChunkedBatchWarning)]
