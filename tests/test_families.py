"""A decomposition family is one unit: a family added from outside the package is baked, planned,
lowered and run like a built-in one (issue 11)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from stn_edge import families
from stn_edge.families import Emitter, Family, LayerDims

torch = pytest.importorskip("torch")

from stn_edge.host import decompositions  # noqa: E402
from stn_edge.host.decompositions.common import SearchFamily, Trial, build, ladder_ranks, left_svd  # noqa: E402

BUILTIN = {"svd", "svd-spatial", "tucker2", "cp", "tt", "tr", "fctn"}


def test_builtins_are_registered_on_both_sides():
    assert set(families.names()) == BUILTIN
    assert set(decompositions.names()) == BUILTIN
    assert decompositions.names()[0] == "svd"  # the search tries svd first: exact ties go to it


def test_an_unknown_family_is_refused_with_the_known_ones():
    from stn_edge.errors import ArtifactError

    with pytest.raises(ArtifactError, match="known: cp, fctn, svd, svd-spatial, tr, tt, tucker2"):
        families.get("block-term")


# --------------------------------------------------------------------------- a toy family, defined here
# ``toy``: a linear layer as ``p (r, in)`` and ``q (r, out)`` (an SVD under other names), lowered as
# MatMul(x, p^T), MatMul(., q), Add(bias).


def _toy_linear(node, layer, f):
    e = Emitter(node, layer)
    x = e.op("MatMul", [node.inputs[0], e.const("p", f["p"].T)])
    x = e.op("MatMul", [x, e.const("q", f["q"])], last=True)
    e.bias(x)
    return e.result()


def _toy_reconstruct(layer, f):
    w = f["p"].T @ f["q"]  # (in, out)
    return w if layer["layout"] == "in_out" else w.T


def _toy_macs(d: LayerDims, bonds: list[int]) -> float:
    (r,) = bonds
    return float(r * (d.inp + d.out))


TOY = Family("toy", {"linear": _toy_linear}, _toy_reconstruct, _toy_macs, extra_ops=2, output_factor=("q", 1),
             factors=("p", "q"))


def _toy_decompose(w: np.ndarray, layout: str, levels: int):
    t0 = time.perf_counter()
    m = w.T if layout == "in_out" else w  # (out, in)
    u, s, vt = left_svd(m)
    top = min(len(s), (m.shape[0] * m.shape[1] - 1) // sum(m.shape))
    root = np.sqrt(s[:top])
    p, q = vt[:top] / root[:, None], (u[:, :top] * root).T
    ranks = ladder_ranks(top, levels)
    total = float(np.sum(s ** 2))
    errors = [float(np.sqrt(max(total - np.sum(s[:r] ** 2), 0) / total)) for r in ranks]
    return build("toy", "linear", layout, w.shape, {}, {"p": (0, p), "q": (0, q)}, {}, [(r,) for r in ranks], (0,),
                 errors, len(s), w.dtype, time.perf_counter() - t0)


def _toy_trials(kind, shape, layout, levels, limits):
    return [Trial("toy", lambda w: _toy_decompose(w, layout, levels))] if kind == "linear" else []


@pytest.fixture
def toy_family():
    families.register(TOY)
    decompositions.register(SearchFamily("toy", 100, _toy_trials))
    yield TOY
    families.unregister("toy")
    decompositions.unregister("toy")


def test_a_family_from_a_test_module_bakes_plans_lowers_and_runs(toy_family, tmp_path):
    from stn_edge.device import Runtime
    from stn_edge.host import bake

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32)).eval()
    x = torch.randn(64, 64)
    path = tmp_path / "toy.stn"
    bake(model, x[:1], path, calibration=x, structure=["toy"], levels=6, progress=False)
    with torch.no_grad():
        want = model(x[:8]).numpy()
    with Runtime.load(path, mem_limit=None, backend="numpy", batch_size=8) as rt:
        assert {layer["family"] for layer in rt.header["layers"]} == {"toy"}
        got = next(iter(rt.run(x[:8].numpy()).values()))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    with Runtime.load(path, mem_limit="55%", backend="numpy", batch_size=8) as rt:
        truncated = [c for c in rt.plan.layers if c.rank is not None and c.rank < rt.header["layers"][0]["max_rank"]]
        small = next(iter(rt.run(x[:8].numpy()).values()))
        ops = [n.op for n in rt.lowered_graph().nodes]
        assert "toy" in rt.plan.table()
    assert truncated and ops.count("MatMul") >= 2
    assert 0 < np.abs(small - want).max() < np.abs(want).max()
