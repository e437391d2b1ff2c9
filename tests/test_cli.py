"""The stn-edge command line: every command, its JSON, its exit codes, no tracebacks on bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from stn_edge.cli import main
from tiny import tiny_bytes, tiny_parts

MODULE_SRC = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
'''


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tiny.stn"
    path.write_bytes(tiny_bytes())
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_table_and_json(capsys, tiny):
    code, out, _ = _run(capsys, "inspect", tiny)
    assert code == 0 and "stn format 1.0" in out and "W " in out and "3 levels" in out
    code, out, _ = _run(capsys, "inspect", tiny, "--json")
    data = json.loads(out)
    assert data["layers"][0]["ladder"]["ranks"] == [1, 3, 5] and data["full_bytes"] == 544


def test_plan_json_fits_budget(capsys, tiny):
    code, out, _ = _run(capsys, "plan", tiny, "--mem-limit", "400", "--json")
    data = json.loads(out)
    assert code == 0 and data["total_bytes"] <= 400 and data["layers"][0]["rank"] == 3


def test_run_writes_outputs(capsys, tiny, tmp_path):
    _, _, arrays = tiny_parts()
    np.save(tmp_path / "x.npy", arrays["x"])
    code, out, _ = _run(capsys, "run", tiny, "--backend", "numpy", "--input", tmp_path / "x.npy",
                        "--output", tmp_path / "y.npz", "--json")
    assert code == 0 and json.loads(out)["outputs"]["y"]["shape"] == [2, 8]
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["y"], arrays["y"], rtol=1e-5, atol=1e-6)


def test_verify_passes_full_and_fails_truncated(capsys, tiny):
    code, out, _ = _run(capsys, "verify", tiny, "--backend", "numpy")
    assert code == 0 and "OK" in out
    code, out, _ = _run(capsys, "verify", tiny, "--backend", "numpy", "--mem-limit", "200")
    assert code == 1 and "FAILED" in out


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["inspect", "missing.stn"], 3, "no such artifact file"),
        (["plan", "{tiny}", "--mem-limit", "3 parsecs"], 4, "not understood"),
        (["plan", "{tiny}", "--mem-limit", "10"], 4, "smallest feasible"),
        (["run", "{tiny}", "--backend", "tpu"], 5, "unknown backend"),
        (["run", "{tiny}", "--backend", "numpy", "--input", "nothere.npy"], 6, "does not exist"),
    ],
)
def test_errors_exit_with_code_and_one_line(capsys, tiny, argv, code, message):
    got, out, err = _run(capsys, *[a.format(tiny=tiny) for a in argv])
    assert got == code
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_corrupt_artifact_is_exit_3(capsys, tmp_path):
    bad = tmp_path / "bad.stn"
    bad.write_bytes(b"PK\x03\x04 definitely a zip file" * 4)
    code, _, err = _run(capsys, "inspect", bad)
    assert code == 3 and "not a .stn artifact" in err


def test_bake_from_module_factory_and_onnx(tmp_path):
    (tmp_path / "tinymodels.py").write_text(MODULE_SRC)
    out = tmp_path / "m.stn"
    env_path = f"{tmp_path}"
    res = subprocess.run(
        [sys.executable, "-m", "stn_edge.cli", "bake", "tinymodels:make", "--input-shape", "1,1,8,8", "-o", str(out), "--json"],
        capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": env_path}, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["layers"][0]["name"] == "1" and out.exists()
    # the same model as an ONNX file
    import torch

    sys.path.insert(0, str(tmp_path))
    try:
        import tinymodels

        onnx_path = tmp_path / "m.onnx"
        torch.onnx.export(tinymodels.make(), (torch.zeros(1, 1, 8, 8),), str(onnx_path), dynamo=False,
                          input_names=["input"], output_names=["output"])
    finally:
        sys.path.remove(str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "stn_edge.cli", "bake", str(onnx_path), "--input-shape", "1,1,8,8",
                          "-o", str(tmp_path / "o.stn")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "2 layers factorized" in res.stdout
    assert "random calibration inputs" in res.stderr


def test_bake_unknown_structure_is_input_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "stn_edge.cli", "bake", "no_such_module:make", "--input-shape", "1,3",
                          "--structure", "svd,nope", "-o", str(tmp_path / "x.stn")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 6 and "'nope'" in res.stderr and "auto" in res.stderr and "Traceback" not in res.stderr


def test_bake_bad_factory_is_capture_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "stn_edge.cli", "bake", "no_such_module:make", "--input-shape", "1,3",
                          "-o", str(tmp_path / "x.stn")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 7 and "cannot import" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.stn").exists()


def test_every_command_has_help():
    for cmd in ("bake", "inspect", "plan", "run", "verify", "demo"):
        res = subprocess.run([sys.executable, "-m", "stn_edge.cli", cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "usage: stn-edge" in res.stdout


def test_plan_with_backend_agrees_with_runtime(capsys, tmp_path):
    from stn_edge.device import Runtime

    path = tmp_path / "tiny.stn"
    path.write_bytes(tiny_bytes())
    for budget in ("1500", "60%"):
        code, out, _ = _run(capsys, "plan", path, "--mem-limit", budget, "--backend", "onnxruntime", "--json")
        with Runtime.load(path, mem_limit=budget if budget.endswith("%") else int(budget), backend="onnxruntime") as rt:
            assert code == 0 and json.loads(out)["layers"][0]["rank"] == rt.plan.layers[0].rank


def test_inspect_shows_compute_of_every_candidate(capsys, tmp_path):
    """A strided conv where tensor-train does more multiply-adds than dense at its top levels: the
    ladder keeps them (memory levels are never cut for speed) and inspect gives the ratio."""
    import torch

    from stn_edge.host import bake

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 64, 3, padding=1))
    path = tmp_path / "searched.stn"
    bake(model, torch.randn(2, 32, 8, 8), path, importance="spectral", correct=False, progress=False, levels=8)
    code, out, _ = _run(capsys, "inspect", path)
    assert code == 0 and "MACs/dense" in out and "compute:" not in out
    code, out, _ = _run(capsys, "inspect", path, "--json")
    rows = {c["name"]: c for c in json.loads(out)["layers"][0]["search"]}
    assert "skipped" not in rows["tt"] and rows["tt"]["macs_ratio"] > 1.0 and rows["tt"]["levels"] == 8


def test_runtime_gives_its_calibration_set(tiny):
    """One public accessor for the stored calibration set (the CLI's run and profile read it too)."""
    from stn_edge.device import Runtime

    _, _, arrays = tiny_parts()
    with Runtime.load(tiny, backend="numpy") as rt:
        np.testing.assert_array_equal(rt.calibration()["x"], arrays["x"])
        np.testing.assert_array_equal(rt.calibration("outputs")["y"], arrays["y"])
        with pytest.raises(ValueError, match="inputs"):
            rt.calibration("labels")
