"""Concurrency and rescaling: threads see whole plans while the runtime rescales; rescales free what
they drop and match fresh loads.

What these tests establish is summarized in docs/RELIABILITY.md.
"""
from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest

from stn_edge.device import Runtime
from stn_edge.device.backends import get_backend
from stn_edge.errors import BackendUnavailable


def _inputs(rt: Runtime, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    return {rt.input_names[0]: np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)}


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
def test_threads_get_sequential_results_during_rescales(mlp_path, backend):
    try:
        get_backend(backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    rt = Runtime.load(mlp_path, mem_limit="30%", backend=backend, batch_size=4)  # x runs whole
    x = _inputs(rt)
    out = rt.output_names[0]
    # every executable the runtime ever swaps in, with its sequential result on x
    seen: list[np.ndarray] = [rt._exe.run(x)[out]]
    errors: list[BaseException] = []
    stop = threading.Event()

    def rescaler() -> None:
        budgets = ["80%", "30%"]
        for i in range(12):
            rt.rescale(budgets[i % 2])
            seen.append(rt._exe.run(x)[out])
            time.sleep(0.003)
        stop.set()

    results: list[np.ndarray] = []

    def worker() -> None:
        try:
            while not stop.is_set() or len(results) < 64:
                results.append(rt.run(x)[out])
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)] + [threading.Thread(target=rescaler)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len({r.tobytes() for r in seen}) >= 2  # the two plans really differ
    allowed = {r.tobytes() for r in seen}
    assert all(r.tobytes() in allowed for r in results)  # each run saw one whole plan
    rt.close()


def test_threads_without_rescale_match_sequential_calls(mlp_path):
    rt = Runtime.load(mlp_path, mem_limit="50%", backend="numpy")
    xs = [_inputs(rt, 3, seed) for seed in range(16)]
    want = [rt.run(x)[rt.output_names[0]] for x in xs]
    got: dict[int, list[np.ndarray]] = {i: [] for i in range(8)}

    def worker(i: int) -> None:
        for x in xs:
            got[i].append(rt.run(x)[rt.output_names[0]])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(8):
        assert [g.tobytes() for g in got[i]] == [w.tobytes() for w in want]


def _held_arrays(rt: Runtime) -> list[np.ndarray]:
    arrays = []
    for _, data in rt._held.values():
        arrays += list(data.values()) if isinstance(data, dict) else [data]
    return arrays


def test_rescale_down_frees_what_it_drops(mlp_path):
    rt = Runtime.load(mlp_path, mem_limit="90%", backend="numpy")
    x = _inputs(rt)
    refs = [weakref.ref(a) for a in _held_arrays(rt)]
    big = sum(a.nbytes for a in _held_arrays(rt))
    rt.rescale("20%")
    rt.run(x)
    gc.collect()
    now = _held_arrays(rt)
    alive = [r() for r in refs if r() is not None]
    # what is still alive is exactly what the smaller plan holds: dropped rows were freed
    assert all(any(a is b for b in now) for a in alive)
    assert sum(a.nbytes for a in now) < big


def test_rescale_round_trip_matches_a_fresh_load(mlp_path):
    """A -> B -> A -> B gives bit-identical outputs to fresh loads at A and B."""
    fresh = {}
    for budget in ("25%", "70%"):
        with Runtime.load(mlp_path, mem_limit=budget, backend="numpy") as rt:
            x = _inputs(rt, seed=3)
            fresh[budget] = rt.run(x)[rt.output_names[0]]
    rt = Runtime.load(mlp_path, mem_limit="25%", backend="numpy")
    for budget in ("70%", "25%", "70%", "25%"):
        rt.rescale(budget)
        np.testing.assert_array_equal(rt.run(x)[rt.output_names[0]], fresh[budget])
