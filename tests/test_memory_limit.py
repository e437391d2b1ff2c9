"""Memory that is true: what an engine holds, measured in a fresh process, stays within mem_limit plus
the engine's constant; byte budgets count the engine's copies.

What these tests establish is summarized in docs/RELIABILITY.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memtools import tool as _tool
from stn_edge.device import Runtime
from stn_edge.device.backends import KNOWN_BACKENDS, get_backend
from stn_edge.device.memory import ENGINE_MEMORY, EngineMemory
from stn_edge.errors import BackendUnavailable, BudgetError


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    return _tool("measure_memory").bake_demo(tmp_path_factory.mktemp("mem") / "demo.stn", correct=False)


def _memory_within_limit(path: Path, backend: str, budgets=("100%", "50%", "25%", "10%"), batch: int = 1) -> list[dict]:
    """Probe ``path`` on ``backend`` in a fresh process per budget (skip when the engine is not
    installed); assert the growth after the first run and the peak stay within the limit + the
    engine's constant, and that the runtime counts no more than the limit. Returns the probes."""
    try:
        get_backend(backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    probe = _tool("measure_memory").probe_in_subprocess
    out = []
    for budget in budgets:
        r = probe(path, backend, budget, batch=batch)
        assert r["growth_after_first_run"] <= r["limit_bytes"] + r["constant_bytes"], r
        assert r["peak_growth"] is None or r["peak_growth"] <= r["limit_bytes"] + r["constant_bytes"], r
        assert r["counted_bytes"] <= r["limit_bytes"], r
        out.append(r)
    return out


# Every known engine, with the cost it declares or the table's (device/memory.py).
@pytest.mark.parametrize("backend", sorted(KNOWN_BACKENDS))
def test_memory_growth_stays_within_mem_limit(demo_path, backend):
    _memory_within_limit(demo_path, backend)


@pytest.fixture(scope="module")
def auto_path(tmp_path_factory) -> Path:
    """A model baked with ``structure="auto"`` whose search picks Tucker-2 (a nested-shell core),
    tensor-train and SVD layers: two 256x256 3x3 convs with Tucker-structured filters, then
    Linear(256, 1024), 3 x Linear(1024, 1024), Linear(1024, 16) (~18 MiB of weights)."""
    torch = pytest.importorskip("torch")
    from stn_edge.host import bake
    from stn_edge.host.structure import SearchLimits

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def tucker(o: int, i: int, r: int):  # a 3x3 filter of multilinear rank (r, r), plus a little noise
        u, v = (torch.linalg.qr(torch.randn(n, r, generator=g))[0] for n in (o, i))
        w = torch.einsum("oqk,iq->oik", torch.einsum("op,pqk->oqk", u, torch.randn(r, r, 9, generator=g)), v)
        return w.reshape(o, i, 3, 3) / w.std() * 0.05 + 1e-3 * torch.randn(o, i, 3, 3, generator=g)

    convs = [torch.nn.Conv2d(64, 256, 3, padding=1), torch.nn.Conv2d(256, 256, 3, padding=1),
             torch.nn.Conv2d(256, 256, 3, padding=1)]
    with torch.no_grad():
        for c in convs[1:]:
            c.weight.copy_(tucker(c.out_channels, c.in_channels, 64))
    layers = [m for c in convs for m in (c, torch.nn.ReLU())]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(256, 1024), torch.nn.ReLU()]
    layers += [m for _ in range(3) for m in (torch.nn.Linear(1024, 1024), torch.nn.ReLU())] + [torch.nn.Linear(1024, 16)]
    path = tmp_path_factory.mktemp("mem") / "auto.stn"
    report = bake(torch.nn.Sequential(*layers), torch.randn(2, 64, 4, 4), path, calibration=torch.randn(16, 64, 4, 4),
                  structure="auto", importance="spectral", correct=False, progress=False,
                  search_limits=SearchLimits(max_macs_ratio=None))  # tt layers do more MACs than dense: about memory here
    assert {"tucker2", "tt"} <= {l.family for l in report.layers}, report.summary()
    return path


@pytest.mark.parametrize("backend", sorted(KNOWN_BACKENDS))
def test_memory_growth_stays_within_mem_limit_with_structure_auto(auto_path, backend):
    """The families the structure search picks hold one copy of each factor, as the plan counts:
    nested-shell cores are held assembled instead of their rows (the same bytes), not besides them."""
    _memory_within_limit(auto_path, backend)


def test_rescales_of_a_structure_searched_model_match_fresh_loads(auto_path):
    """Tucker-2 cores are held assembled and tensor-train cores transposed; every move between levels
    gets the rows back from what is held, so after any sequence of rescales the outputs equal a fresh
    load's bit for bit, what is held is the bytes each level counts, and going up reads only the rows
    it lacks."""
    x = {"input": np.random.default_rng(5).standard_normal((2, 64, 4, 4)).astype(np.float32)}
    fresh = {}
    for budget in ("10%", "30%", "70%"):
        with Runtime.load(auto_path, mem_limit=budget, backend="numpy") as rt:
            fresh[budget] = rt.run(x)[rt.output_names[0]].tobytes()
    rt = Runtime.load(auto_path, mem_limit="30%", backend="numpy")
    for budget in ("70%", "10%", "30%", "70%", "30%", "10%"):
        before, old = rt.bytes_read, rt.plan
        plan = rt.rescale(budget)
        # a layer reads nothing going down, the rows it lacks going up, all of it when it leaves or enters dense
        missing = sum(c.bytes if c.dense or o.dense else max(0, c.bytes - o.bytes)
                      for c, o in zip(plan.layers, old.layers) if c.level != o.level)
        assert rt.bytes_read - before == missing, budget
        for c in plan.layers:
            level, data = rt._held[c.name]
            assert level == c.level
            held = [v for k, v in data.items() if not k.startswith("__")] if level is not None else [data]
            assert sum(v.nbytes for v in held) == c.bytes, c.name
        assert rt.run(x)[rt.output_names[0]].tobytes() == fresh[budget], budget
    rt.close()


@pytest.fixture(scope="module")
def conv_path(tmp_path_factory) -> Path:
    """Three 3x3 Conv(64) at 32x32: at batch 16 its activations (~50 MiB with numpy's im2col) dwarf
    its 0.3 MiB of weights."""
    return _tool("measure_memory").bake_cnn(tmp_path_factory.mktemp("mem") / "cnn.stn")


@pytest.mark.parametrize("backend", sorted(KNOWN_BACKENDS))
def test_memory_peak_at_batch_16_stays_within_mem_limit(conv_path, backend):
    """Activations at the load's batch size are inside mem_limit: the peak while a batch of 16 runs
    stays within the limit + the engine's constant, for percentages and for bytes."""
    full, _ = _memory_within_limit(conv_path, backend, ("100%", "25%"), batch=16)
    assert full["activation_bytes"] > 10 * full["weight_bytes"], full
    # bytes: room for the activations and a third of the weights' counted size
    squeezed = str(full["counted_bytes"] - int(full["weight_bytes"] * full["weight_copies"] * 2 / 3))
    [r] = _memory_within_limit(conv_path, backend, (squeezed,), batch=16)
    assert r["weight_bytes"] < full["weight_bytes"] / 2  # the byte budget really truncated


def test_counted_budgets_round_trip():
    for engine in list(ENGINE_MEMORY.values()) + [EngineMemory(2.75, 0), EngineMemory(1.1, 0)]:
        for w in (0, 1, 7, 544, 16_859_137, 12_345_678_901):
            assert engine.weights_for(engine.footprint(w)) >= w
            assert engine.footprint(engine.weights_for(w)) <= w


def test_byte_budgets_count_the_engine_copies(mlp_path):
    rt = Runtime.load(mlp_path, mem_limit="50%", backend="numpy")
    copies = EngineMemory(3.0, 0)
    rt._backend.engine_memory = copies  # a backend may declare its own cost
    try:
        plan = rt.rescale(300_000)
        assert plan.total_bytes <= 100_000 and rt.footprint() <= 300_000
        full = rt.plan_for(None).total_bytes
        assert full / 4 < rt.rescale("50%").total_bytes <= full / 2  # percentages keep a share of the weights
        with pytest.raises(BudgetError, match="x 3 copies") as err:
            rt.rescale(10)
        rt.rescale(err.value.smallest_feasible)  # the smallest budget it states is feasible
    finally:
        del rt._backend.engine_memory
