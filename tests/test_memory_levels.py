"""Memory levels are never cut for speed; speed is a load-time choice (issue 10)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stn_edge.device import Runtime  # noqa: E402
from stn_edge.format import ArtifactReader  # noqa: E402
from stn_edge.host import bake  # noqa: E402
from stn_edge.plan import ladder_specs  # noqa: E402


def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().data / 16.0).astype(np.float32)


@pytest.fixture(scope="module")
def wide_mlp(tmp_path_factory):
    """An MLP whose 256x2048 layer holds ~95% of the bytes (the layer the compute guard left with one level)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 10)).eval()
    x = torch.from_numpy(_digits()[:256])
    path = tmp_path_factory.mktemp("wide") / "wide.stn"
    bake(model, x[:1], path, calibration=x, progress=False)
    return path


def test_the_largest_layer_offers_levels_across_its_bytes(wide_mlp):
    with ArtifactReader(wide_mlp) as r:
        big = max(r.header["layers"], key=lambda l: np.prod(l["dense"]["shape"]))
        dense = int(np.prod(big["dense"]["shape"])) * 4
    assert big["dense"]["shape"] in ([2048, 256], [256, 2048])
    sizes = [0] + list(big["ladder"]["bytes"])
    gaps = np.diff(sizes)
    assert len(big["ladder"]["bytes"]) >= 16 and gaps.max() <= dense / 16 * 1.05, (big["family"], sizes)


def test_budgets_far_apart_get_different_plans_and_outputs(wide_mlp):
    x = _digits()[:32]
    out, ranks = {}, {}
    for budget in ("50%", "10%"):
        with Runtime.load(wide_mlp, mem_limit=budget, backend="numpy", batch_size=32) as rt:
            ranks[budget] = {c.name: c.rank for c in rt.plan.layers}
            out[budget] = next(iter(rt.run({rt.header["model"]["inputs"][0]["name"]: x}).values()))
    assert ranks["50%"] != ranks["10%"]
    assert np.abs(out["50%"] - out["10%"]).max() > 1e-3


def test_table_says_where_a_layer_runs_slower_than_dense(tmp_path):
    """A tensor-train Linear layer near its top levels does far more multiply-adds than dense: the
    memory budget comes first, and the plan says so."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 16)).eval()
    x = torch.randn(64, 256)
    path = tmp_path / "tt.stn"
    bake(model, x[:1], path, calibration=x, structure=["tt"], importance="spectral", correct=False, progress=False)
    with Runtime.load(path, mem_limit="90%", backend="numpy") as rt:
        slow = rt.plan.slower_than_dense()
        assert slow and all(c.family == "tt" and c.time_ratio > 1 for c in slow)
        text = rt.plan.table()
        assert "time vs dense" in text and "slower" in text and "latency_limit_ms" in text
        assert rt.plan.to_dict()["layers"][0]["time_vs_dense"] == pytest.approx(rt.plan.layers[0].time_ratio)
        free_ms, free_loss = rt.predict_latency_ms(), rt.plan.loss
    limit = free_ms * 0.8
    with Runtime.load(path, mem_limit="90%", backend="numpy", latency_limit_ms=limit) as rt:
        assert rt.predict_latency_ms() <= limit and rt.plan.loss >= free_loss
        assert rt.plan.total_bytes <= rt.plan.budget
        rt.rescale("100%")  # dense fits: the fastest and most accurate
        assert all(c.dense for c in rt.plan.layers) and rt.predict_latency_ms() <= limit


def test_cost_model_counts_what_the_lowered_graph_runs(tmp_path):
    """The header-only cost model's multiply-adds equal a count over the lowered graph at each level."""
    from stn_edge.cost import ENGINE_COSTS, EngineCost
    from stn_edge.device.profile import calibration_feeds, model_macs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(16, 8, 12, 12)
    path = tmp_path / "conv.stn"
    bake(model, x[:1], path, calibration=x, importance="spectral", correct=False, progress=False, levels=6)
    macs_only = EngineCost("macs", 1.0, 0.0)  # 1 us per multiply-add, ops free: the model counts MACs
    for budget in ("100%", "60%", "30%"):
        with Runtime.load(path, mem_limit=budget, backend="numpy") as rt:
            specs, _ = ladder_specs(rt._reader, macs_only)
            predicted = sum(s.choice(next(o for o in s.options() if o.level == c.level)).time_ratio * s.cost.dense_us
                            for s, c in zip(specs, rt.plan.layers))
            macs, _ = model_macs(rt, calibration_feeds(rt, 1))
            assert predicted == pytest.approx(macs, rel=1e-6), budget
    assert set(ENGINE_COSTS) >= {"numpy", "onnxruntime", "tflite", "torch"}
