"""What a new user sees on the command line (issue 14, item 5): ``stn-edge bake mymodels:Net`` in
the folder that holds ``mymodels.py``, and ``stn-edge demo --keep DIR``."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stn_edge.cli import main

MODELS = textwrap.dedent('''
    from torch import nn

    def Net():
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
''')


def test_bake_imports_a_module_from_the_working_directory(tmp_path):
    script = Path(sys.executable).parent / "stn-edge"
    if not script.exists():
        pytest.skip("the stn-edge console script is not installed in this environment")
    (tmp_path / "mymodels_cwd.py").write_text(MODELS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(script), "bake", "mymodels_cwd:Net", "--input-shape", "1,32", "-o", "net.stn",
                           "--structure", "svd", "--levels", "4", "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "net.stn").is_file()


def test_demo_keep_leaves_an_artifact_the_other_commands_open(tmp_path, monkeypatch, capsys):
    import stn_edge.host.demo as demo

    # the demo's own bake searches structures (~30 s); SVD keeps this test about --keep
    monkeypatch.setattr(demo, "bake", functools.partial(demo.bake, structure="svd", levels=4, correct=False))
    monkeypatch.setattr(demo, "median_latency_ms", lambda fn, x: 0.0)
    keep = tmp_path / "kept"
    assert main(["demo", "--keep", str(keep), "--epochs", "1", "--finetune-epochs", "0"]) == 0
    artifact = keep / "digits.stn"
    out = capsys.readouterr().out
    assert artifact.is_file() and f"stn-edge inspect {artifact}" in out
    assert main(["inspect", str(artifact), "--json"]) == 0
    assert main(["plan", str(artifact), "--mem-limit", "50%"]) == 0
    assert main(["verify", str(artifact)]) == 0
