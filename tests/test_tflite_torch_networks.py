"""Whole networks on the tflite and torch backends against the numpy reference and torch eager
(batches, threads, baked artifacts). The engines and networks are in ``engines.py``."""
from __future__ import annotations

import numpy as np
import pytest

from engines import (
    ATOL, ENGINES, NETWORKS, RTOL, TFLiteBackend, assert_close, engine_params, export, f32, needs_tflite, network, nn,
    run_all, tflite_backend, torch,
)
from stn_edge.device import Runtime
from stn_edge.graph import Graph, Node, ValueInfo
from zoo import randomize_norms


@pytest.mark.parametrize("engine", engine_params())
@pytest.mark.parametrize("name", NETWORKS)
def test_network_matches_numpy_and_torch_eager(name: str, engine: str) -> None:
    _, graph = network(name)
    feeds, ref, eager = run_all(name, 3)
    assert_close(ref, eager, "numpy vs eager")
    got = ENGINES[engine]().prepare(graph).run(feeds)
    assert_close(got, ref, f"{engine} vs numpy")
    assert_close(got, eager, f"{engine} vs eager")


@pytest.mark.parametrize("engine", [p for p in engine_params() if p.values[0] != "tflite-builtin"])
@pytest.mark.parametrize("name", ["cnn-bn-residual", "mtcnn-onet", "transformer-encoder"])
def test_batch_1_then_4_on_one_executable(name: str, engine: str) -> None:
    _, graph = network(name)
    exe = ENGINES[engine]().prepare(graph)
    for batch in (1, 4, 1):
        feeds, ref, eager = run_all(name, batch)
        got = exe.run(feeds)
        assert_close(got, ref, f"{engine} batch {batch}")
        assert_close(got, eager, f"{engine} batch {batch} vs eager")
    if engine.startswith("tflite"):
        assert exe.resizable, "these graphs convert to the same program at any batch: resize, not rebuild"


@pytest.mark.parametrize("engine", [p for p in engine_params() if p.values[0] != "tflite-builtin"])
def test_concurrent_runs_of_mixed_batches(engine: str) -> None:
    """Runtime.run may be called from several threads; tflite serializes its interpreter."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    _, graph = network("cnn-bn-residual")
    exe = ENGINES[engine]().prepare(graph)
    cases = [run_all("cnn-bn-residual", batch)[:2] for batch in (1, 3, 2, 1, 3, 2)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda c: exe.run(c[0]), cases))
    for got, (_, want) in zip(results, cases):
        assert_close(got, want, engine)


@needs_tflite
def test_tflite_rebuilds_a_graph_that_bakes_the_batch_into_a_constant() -> None:
    """``bias.expand(x.shape[0], -1)`` folds to a constant holding the batch: rebuild per batch."""

    class Expanding(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(1, 6))

        def forward(self, x):
            return torch.cat([x, self.bias.expand(x.shape[0], -1)], dim=1)

    model = Expanding().eval()
    graph = export(model, (torch.randn(2, 4),))
    exe = TFLiteBackend(num_threads=1).prepare(graph)
    assert not exe.resizable
    for batch in (1, 3, 2):
        x = torch.randn(batch, 4)
        out = exe.run({"input0": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(out[graph.outputs[0].name], model(x).numpy(), rtol=RTOL, atol=ATOL)


@needs_tflite
def test_tflite_defers_the_build_when_placeholder_shapes_do_not_fit() -> None:
    """A symbolic batch of 1 cannot meet a fixed batch of 2: build at the first real shapes."""
    graph = Graph(
        [Node("Add", "add", ["x", "y"], ["z"])],
        [ValueInfo("x", ["batch", 3]), ValueInfo("y", [2, 3])],
        [ValueInfo("z", ["batch", 3])],
    )
    exe = TFLiteBackend(num_threads=1).prepare(graph)
    x, y = f32(2, 3), f32(2, 3)
    np.testing.assert_allclose(exe.run({"x": x, "y": y})["z"], x + y, rtol=RTOL, atol=ATOL)


@needs_tflite
def test_tflite_uses_the_xnnpack_delegate_and_nhwc_convolutions() -> None:
    _, graph = network("mobilenet-blocks")
    exe = TFLiteBackend(num_threads=1).prepare(graph)
    feeds, ref, _ = run_all("mobilenet-blocks", 1)
    assert_close(exe.run(feeds), ref)
    ops = exe.ops()
    assert "DELEGATE" in ops, f"XNNPACK was not applied: {ops}"
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "HARD_SWISH", "MEAN"} <= set(ops)
    # NCHW -> NHWC once at the input; the flatten of the (N, C, 1, 1) pool needs no TRANSPOSE
    assert ops.count("TRANSPOSE") == 1, ops


def test_runtime_runs_an_artifact_on_each_engine() -> None:
    from tiny import tiny_bytes  # noqa: PLC0415

    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    want = Runtime.load(tiny_bytes(), backend="numpy").run(x)["y"]
    for backend in ["torch"] + (["tflite"] if tflite_backend else []):
        for limit in (None, "40%"):
            with Runtime.load(tiny_bytes(), mem_limit=limit, backend=backend) as rt:
                ref = Runtime.load(tiny_bytes(), mem_limit=limit, backend="numpy")
                assert max(rt.verify().values()) == pytest.approx(max(ref.verify().values()), abs=1e-5)
                np.testing.assert_allclose(rt.run(x)["y"], ref.run(x)["y"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(Runtime.load(tiny_bytes(), backend=backend).run(x)["y"], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["cnn-bn-residual", "mtcnn-onet"])
def test_baked_artifact_agrees_with_numpy_at_every_budget(name: str, tmp_path) -> None:
    """Bake, then load at several budgets: the lowered (truncated, factorized) graph on each engine."""
    from stn_edge.host.bake import bake  # noqa: PLC0415

    make, inputs, _ = NETWORKS[name]
    torch.manual_seed(0)
    model = randomize_norms(make())
    x = inputs(8)
    path = tmp_path / f"{name}.stn"
    bake(model, tuple(a[:1] for a in x), path, calibration=x, levels=4, importance="spectral", progress=False)
    feeds = [a.numpy() for a in x]
    engines = ["torch"] + (["tflite"] if tflite_backend else [])
    for budget in (None, "60%"):
        with Runtime.load(path, mem_limit=budget, backend="numpy") as rt:
            want = rt.run(feeds)
        for backend in engines:
            with Runtime.load(path, mem_limit=budget, backend=backend) as rt:
                assert_close(rt.run(feeds), want, f"{backend} at {budget}")
