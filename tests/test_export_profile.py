"""Export (ONNX, TFLite) and profiling: exported files equal the runtime, profiles are complete and honest.

Exported models are opened by a fresh engine (an onnxruntime session, a LiteRT interpreter) and
compared with ``Runtime.run`` at the same budget on the artifact's calibration inputs, ``rtol=1e-4``.
Timings here are tiny (tens of milliseconds); they check structure and invariants, not speed.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from stn_edge.cli import main
from stn_edge.device import Runtime
from stn_edge.device.export import export_model, with_batch
from stn_edge.device.profile import (
    LayerLatency,
    count_macs,
    cuda_event_timer,
    jetson_info,
    layer_latency,
    parse_tegrastats,
    plan_within_latency,
    profile_artifact,
    time_side_by_side,
)
from stn_edge.errors import BackendError, BudgetError, InputError
from stn_edge.graph import Node
from stn_edge.plan import ladder_specs
from tiny import tiny_bytes

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
RTOL = 1e-4


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A small conv net (conv, conv, linear) baked with spectral importance: seconds, not minutes."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from stn_edge.host import bake

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    cal = torch.randn(8, 3, 12, 12)
    path = tmp_path_factory.mktemp("cnn") / "cnn.stn"
    bake(model, cal[:1], path, calibration=cal, importance="spectral", min_bytes=1024, levels=6, progress=False)
    return path


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tiny.stn"
    path.write_bytes(tiny_bytes())
    return path


def _calibration(path):
    with Runtime.load(path, backend="numpy") as rt:
        cal = rt.header["calibration"]["inputs"]
        return {k: rt._reader.read_array(r) for k, r in cal.items()}


# --------------------------------------------------------------------------- export


def test_onnx_export_equals_runtime_in_a_fresh_session(cnn, tmp_path):
    out = tmp_path / "m.onnx"
    report = export_model(cnn, out, mem_limit="40%")
    assert report.ok and report.format == "onnx" and list(tmp_path.iterdir()) == [out]  # no temp file left
    feeds = _calibration(cnn)
    with Runtime.load(cnn, mem_limit="40%", backend="numpy") as rt:
        expected = rt.run(feeds)
        assert rt.plan.total_bytes == report.plan.total_bytes and any(not c.dense for c in rt.plan.layers)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for name, ref in expected.items():
        np.testing.assert_allclose(got[name], ref, rtol=RTOL, atol=1e-5 * np.abs(ref).max())
    model = onnx.load(str(out))
    read = {i for n in model.graph.node for i in n.input}
    assert all(init.name in read for init in model.graph.initializer)  # replaced biases are not carried
    weights = sum(np.prod(i.dims) * 4 for i in model.graph.initializer)
    assert weights <= report.plan.total_bytes  # the file holds the planned weights, no dense copy
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch stays symbolic


def test_onnx_export_with_fixed_batch(cnn, tmp_path):
    report = export_model(cnn, tmp_path / "m.onnx", mem_limit="60%", batch=3)
    assert report.ok and report.input_shapes["input"][0] == 3
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3


def test_tflite_export_equals_runtime_in_litert(cnn, tmp_path):
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    pytest.importorskip("flatbuffers")
    out = tmp_path / "m.tflite"
    report = export_model(cnn, out, mem_limit="40%", batch=8)
    assert report.ok and report.input_shapes["input"] == [8, 3, 12, 12]
    feeds = _calibration(cnn)
    with Runtime.load(cnn, mem_limit="40%", backend="numpy") as rt:
        expected = rt.run(feeds)
    interpreter = litert.Interpreter(model_path=str(out))
    interpreter.allocate_tensors()
    (detail,) = interpreter.get_input_details()
    assert list(detail["shape_signature"]) == [-1, 3, 12, 12]  # the batch stays resizable
    interpreter.set_tensor(detail["index"], feeds["input"])
    interpreter.invoke()
    (out_detail,) = interpreter.get_output_details()
    ref = next(iter(expected.values()))
    np.testing.assert_allclose(interpreter.get_tensor(out_detail["index"]), ref, rtol=RTOL, atol=1e-5 * np.abs(ref).max())


def test_export_refuses_what_it_cannot_write(tiny, tmp_path):
    with pytest.raises(InputError, match="format"):
        export_model(tiny, tmp_path / "m.bin")
    with pytest.raises(BudgetError, match="at least"):
        export_model(tiny, tmp_path / "m.onnx", mem_limit=10)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.stn"]  # nothing written, no temp file left
    with Runtime.load(tiny, backend="numpy") as rt:
        graph = rt.lowered_graph()
    assert with_batch(graph, 4).inputs[0].shape == [4, 16] and graph.inputs[0].shape == ["batch", 16]


def test_cli_export(capsys, tiny, tmp_path):
    code = main(["export", str(tiny), "--mem-limit", "400", "-o", str(tmp_path / "t.onnx"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["ok"] and data["weight_bytes"] <= 400 and data["plan"]["layers"][0]["rank"] == 3
    assert main(["export", str(tiny), "--mem-limit", "10", "-o", str(tmp_path / "t.onnx")]) == 4
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------- profiling


def test_profile_rows_are_complete_and_consistent(cnn, tmp_path):
    report = profile_artifact(cnn, budgets=("100%", "40%", "1%"), backend="onnxruntime", batches=(1, 2), warmup=1,
                              seconds=0.02, min_runs=3)
    ok = [r for r in report.rows if "error_message" not in r]
    assert len(ok) == 4 and report.rows[-1]["budget"] == "1%" and "at least" in report.rows[-1]["error_message"]
    dense, small = ok[0], ok[2]
    assert dense["flop_ratio"] == 1.0 and dense["calibration_error"] < 1e-5
    assert small["flop_ratio"] < 1.0 and small["model_bytes"] < dense["model_bytes"] and small["bytes_read"] < dense["bytes_read"]
    for r in ok:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput"] > 0 and r["runs"] >= 3
        assert r["peak_rss"] > 0 and r["gpu_p50_ms"] is None
    assert "p50 ms" in report.table() and "infeasible" in report.table()
    json.dumps(report.to_dict())
    pytest.importorskip("matplotlib")
    report.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_macs_of_conv_gemm_matmul():
    shapes = {"x": (2, 3, 8, 8), "w": (4, 3, 3, 3), "y": (2, 4, 8, 8), "a": (2, 5), "b": (7, 5), "z": (2, 7),
              "m": (2, 6, 5), "n": (5, 9), "o": (2, 6, 9), "dw": (3, 1, 3, 3), "d": (2, 3, 8, 8)}
    nodes = [Node("Conv", "c", ["x", "w"], ["y"]), Node("Gemm", "g", ["a", "b"], ["z"], {"transB": 1}),
             Node("MatMul", "mm", ["m", "n"], ["o"]), Node("Conv", "dw", ["x", "dw"], ["d"], {"group": 3}),
             Node("Relu", "r", ["y"], ["y2"])]
    assert count_macs(nodes, shapes) == 2 * 4 * 64 * 27 + 2 * 7 * 5 + 2 * 6 * 9 * 5 + 2 * 3 * 64 * 9


def test_side_by_side_interleaves():
    calls: list[str] = []
    lat = time_side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=0, rounds=3, per_round=2)
    assert calls == ["a", "a", "b", "b"] * 3 and lat["a"].runs == 6


# --------------------------------------------------------------------------- latency tables and planning


def _table(tiny_path, dense_ms: float, level_ms: dict[int, float], rest: float = 0.1) -> LayerLatency:
    return LayerLatency("numpy", "cpu", 1, {"W": {"dense": dense_ms, **level_ms}}, {"W": {0: 1, 1: 3, 2: 5}},
                        model_dense_ms=dense_ms + rest)


def test_layer_latency_table_round_trips(cnn, tmp_path):
    table = layer_latency(cnn, backend="numpy", batch=1, spread=2, warmup=1, seconds=0.01)
    assert table.layers and all("dense" in t and len(t) >= 3 for t in table.layers.values())
    assert table.model_dense_ms > 0 and table.system["cpus_usable"] >= 1
    table.save(tmp_path / "t.json")
    again = LayerLatency.load(tmp_path / "t.json")
    assert again.layers == table.layers and again.ranks == table.ranks
    with pytest.raises(BackendError, match="measured on numpy/cpu"):
        LayerLatency.for_engine(tmp_path / "t.json", "onnxruntime", "cpu")
    with pytest.raises(InputError, match="value shapes an artifact records since format 1.1"):
        LayerLatency.from_cost_model([], 0.0, "numpy", "cpu")  # no layer with a known cost


def test_plan_within_latency(tiny):
    from dataclasses import replace

    from stn_edge.format import ArtifactReader
    from stn_edge.plan import plan_artifact

    with ArtifactReader(tiny) as reader:
        specs, _ = ladder_specs(reader)
        plan = plan_artifact(reader, 400)  # W is 512 bytes dense: rank 3 (level 1, 288 bytes) is the best that fits
    assert plan.layers[0].level == 1
    table = _table(tiny, 1.0, {0: 0.2, 1: 0.5, 2: 0.7})
    assert plan_within_latency(plan, specs, table, 10.0).layers == plan.layers  # within the limit: unchanged
    faster = plan_within_latency(plan, specs, table, 0.35)  # 0.1 outside W + 0.2 at rank 1
    assert faster.layers[0].level == 0 and faster.total_bytes <= plan.budget
    with pytest.raises(BudgetError, match="fastest"):
        plan_within_latency(plan, specs, table, 0.2)
    # where dense fits too and runs faster on this engine, the layer runs dense (and loses nothing)
    roomy = replace(plan, budget=600)
    swapped = plan_within_latency(roomy, specs, _table(tiny, 0.1, {0: 0.2, 1: 0.5, 2: 0.7}), 10.0)
    assert swapped.layers[0].dense and swapped.total_bytes == 544


def test_runtime_load_with_latency_limit(tiny):
    table = _table(tiny, 1.0, {0: 0.2, 1: 0.5, 2: 0.7}).to_dict()
    with Runtime.load(tiny, mem_limit=400, backend="numpy", latency_limit_ms=0.35, profile=table) as rt:
        assert rt.plan.layers[0].level == 0
        rt.rescale(544)  # the limit holds on every rescale
        assert rt.plan.layers[0].level == 0
    with pytest.raises(BackendError, match="measured on numpy"):
        Runtime.load(tiny, backend="onnxruntime", latency_limit_ms=1.0, profile=table)


# --------------------------------------------------------------------------- the board


def test_jetson_info_on_a_fake_board(tmp_path):
    assert jetson_info(tmp_path) is None
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref\n")
    info = jetson_info(tmp_path)
    assert info["l4t_release"].startswith("# R35") and info["nvpmodel"] is None and info["tegrastats"] is None


def test_parse_tegrastats_and_cuda_timer_guard():
    line = ("RAM 2044/30536MB (lfb 6917x4MB) SWAP 0/15268MB (cached 0MB) CPU [1%@729,0%@729] EMC_FREQ 3%@2133 "
            "GR3D_FREQ 41%@[305,305] CV0@-256C CPU@46.5C GPU@44.1C VDD_GPU_SOC 3194mW/3194mW")
    parsed = parse_tegrastats(line)
    assert parsed["temperatures_c"] == {"CV0": -256.0, "CPU": 46.5, "GPU": 44.1}
    assert parsed["gpu_load_percent"] == 41 and parsed["gpu_mhz"] == 305 and parsed["emc_load_percent"] == 3
    assert cuda_event_timer("onnxruntime", "cuda") is None and cuda_event_timer("torch", "cpu") is None


def test_cli_profile_writes_table_json_plot_and_layers(capsys, tiny, tmp_path):
    pytest.importorskip("matplotlib")
    code = main(["profile", str(tiny), "--backend", "numpy", "--budgets", "100%,70%", "--batch", "1,2", "--warmup", "1",
                 "--seconds", "0.02", "--per-layer", "-o", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert code == 0 and "samples/s" in out and "factorized ms by rank" in out
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["layer_latency-numpy-cpu-b1.json", "layer_latency-numpy-cpu-b2.json", "profile.json", "profile.png"]
    data = json.loads((tmp_path / "p/profile.json").read_text())
    assert len(data["rows"]) == 4 and data["system"]["jetson"] is None
    assert main(["profile", str(tiny), "--batch", "0"]) == 6
