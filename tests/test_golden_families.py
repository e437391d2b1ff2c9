"""Artifacts baked by an earlier version load and give bit-identical outputs, for every family.

``tests/golden/families-<family>.stn`` were baked once (by :func:`make_golden`, from a small conv +
linear model with corrections) with their numpy-backend outputs at three budgets in
``families-<family>.npz``. A change to lowering, assembly, planning or the numpy backend that moves a
single bit of those outputs fails here. Regenerate only on purpose, for a format or numerics change
that is meant to move them: ``STN_REGEN_GOLDEN=1 python -m pytest tests/test_golden_families.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stn_edge.device import Runtime
from stn_edge.format import ArtifactReader

GOLDEN = Path(__file__).parent / "golden"
FAMILIES = ("svd", "svd-spatial", "tucker2", "cp", "tt", "tr", "fctn")
BUDGETS = ("100%", "70%", "45%")


def _inputs() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((4, 3, 12, 12)).astype(np.float32)


def _outputs(path: Path) -> dict[str, np.ndarray]:
    out = {}
    x = _inputs()
    for budget in BUDGETS:
        with Runtime.load(path, mem_limit=budget, backend="numpy", batch_size=4) as rt:
            out[budget] = next(iter(rt.run({"x": x}).values()))
            out[f"{budget}/ranks"] = np.array([-1 if c.rank is None else c.rank for c in rt.plan.layers])
    return out


def make_golden(family: str) -> None:
    """Bake ``families-<family>.stn`` and record its outputs (needs torch)."""
    import torch

    from stn_edge.host import bake

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
    ).eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((16, 3, 12, 12)).astype(np.float32))
    path = GOLDEN / f"families-{family}.stn"
    bake(model, x[:1], path, calibration=x, input_names=["x"], levels=6, structure=[family], min_bytes=1024,
         progress=False)
    np.savez(GOLDEN / f"families-{family}.npz", **_outputs(path))


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_artifact_outputs_are_bit_identical(family):
    if os.environ.get("STN_REGEN_GOLDEN"):
        make_golden(family)
    path = GOLDEN / f"families-{family}.stn"
    with ArtifactReader(path) as r:
        assert family in {layer["family"] for layer in r.header["layers"]}
    want = np.load(GOLDEN / f"families-{family}.npz")
    got = _outputs(path)
    assert sorted(got) == sorted(want.files)
    for key in want.files:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{family} at {key}")
