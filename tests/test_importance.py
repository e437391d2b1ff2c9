"""Data-driven importance: scoring only the graph downstream of a layer gives the full model's numbers."""
from __future__ import annotations

import numpy as np
import pytest

from stn_edge.device.backends import get_backend
from stn_edge.graph import Graph, Node, ValueInfo
from stn_edge.host.importance import downstream, score_truncations


def _graph() -> Graph:
    """x -> conv1 -> relu -> conv2 -> add(relu) -> y1;  relu -> gap -> matmul -> y2 (a second output)."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3,
        "w2": rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3,
        "b2": rng.standard_normal(4).astype(np.float32),
        "m": rng.standard_normal((4, 5)).astype(np.float32),
    }
    conv = {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}
    nodes = [
        Node("Conv", "conv1", ["x", "w1"], ["h"], conv),
        Node("Relu", "relu", ["h"], ["r"]),
        Node("Conv", "conv2", ["r", "w2", "b2"], ["c"], conv),
        Node("Add", "add", ["c", "r"], ["y1"]),
        Node("GlobalAveragePool", "gap", ["r"], ["g"]),
        Node("Flatten", "flat", ["g"], ["f"]),
        Node("MatMul", "head", ["f", "m"], ["y2"]),
    ]
    return Graph(nodes, [ValueInfo("x", [None, 3, 6, 6], "float32")],
                 [ValueInfo("y1", [None, 4, 6, 6], "float32"), ValueInfo("y2", [None, 5], "float32")], inits)


def test_downstream_of_a_layer():
    g = _graph()
    nodes, boundary = downstream(g, {"w2", "b2"})
    assert [n.name for n in nodes] == ["conv2", "add"]
    assert boundary == ["r"]
    nodes, boundary = downstream(g, {"w1"})
    assert [n.name for n in nodes] == [n.name for n in g.nodes] and boundary == ["x"]


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
def test_downstream_scores_equal_whole_model_runs(backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    g = _graph()
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((8, 3, 6, 6)).astype(np.float32)}
    layers = [
        [{"w1": g.initializers["w1"] * s} for s in (0.0, 0.5, 0.9)],
        [{"w2": g.initializers["w2"] * s, "b2": g.initializers["b2"] + s} for s in (0.2, 0.6)],
        [{"m": g.initializers["m"] * s} for s in (0.1, 1.0)],
    ]
    got = score_truncations(g, feeds, layers, backend=backend)
    exe = get_backend("numpy").prepare(g)
    ref = exe.run(feeds)
    scale = sum(float(np.sum(np.square(v, dtype=np.float64))) for v in ref.values())
    for levels, losses in zip(layers, got):
        want = []
        for override in levels:
            y = get_backend("numpy").prepare(Graph(g.nodes, g.inputs, g.outputs, {**g.initializers, **override})).run(feeds)
            want.append(sum(float(np.sum(np.square(y[k].astype(np.float64) - ref[k]))) for k in ref) / scale)
        np.testing.assert_allclose(losses, np.minimum.accumulate(want), rtol=1e-4, atol=1e-9)
    assert got[2][-1] == pytest.approx(0.0, abs=1e-12)  # the dense weight again: no loss


@pytest.mark.parametrize("kwargs, match", [({"importance": "bogus"}, "importance"), ({"levels": 0}, "levels")])
def test_bake_refuses_bad_arguments_before_any_work(tmp_path, kwargs, match):
    """No capture runs: the model here is not even a model."""
    pytest.importorskip("torch")
    from stn_edge.host import bake

    with pytest.raises(ValueError, match=match):
        bake(object(), None, tmp_path / "never.stn", progress=False, **kwargs)
    assert not (tmp_path / "never.stn").exists()
