"""Automatic budgets: available memory from cgroups v1/v2 and meminfo, headroom, and the watcher
that rescales under memory pressure and back.

What these tests establish is summarized in docs/RELIABILITY.md.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from stn_edge.device import Runtime
from stn_edge.device.memory import MemoryInfo, MemoryWatcher, available_memory, engine_memory, resolve_auto_budget
from stn_edge.errors import BudgetError


def _fake_root(tmp_path: Path, cgroup: str, files: dict[str, str], available_kb: int = 6 << 20,
               total_kb: int = 8 << 20) -> Path:
    root = tmp_path / "root"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/meminfo").write_text(f"MemTotal:       {total_kb} kB\nMemFree:        1000 kB\n"
                                       f"MemAvailable:   {available_kb} kB\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


MiB = 1 << 20


def test_available_memory_reads_cgroup_v2_with_ancestors(tmp_path):
    root = _fake_root(tmp_path, "0::/app/worker\n", {
        "sys/fs/cgroup/app/worker/memory.max": "max\n",
        "sys/fs/cgroup/app/worker/memory.current": f"{100 * MiB}\n",
        "sys/fs/cgroup/app/memory.max": f"{512 * MiB}\n",
        "sys/fs/cgroup/app/memory.current": f"{200 * MiB}\n",
        "sys/fs/cgroup/app/memory.stat": f"anon 1\ninactive_file {50 * MiB}\n",
    })
    info = available_memory(root)
    assert info == MemoryInfo(available=362 * MiB, limit=512 * MiB, source="cgroup v2", shared_gpu=False)


def test_available_memory_reads_cgroup_v1_and_falls_back_to_meminfo(tmp_path):
    v1 = _fake_root(tmp_path / "v1", "4:memory:/docker/abc\n1:cpu:/\n", {
        # the container does not see its own path: the mount's root holds its limit
        "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{256 * MiB}\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{100 * MiB}\n",
        "sys/fs/cgroup/memory/memory.stat": f"total_inactive_file {20 * MiB}\n",
    })
    assert available_memory(v1) == MemoryInfo(176 * MiB, 256 * MiB, "cgroup v1")
    unlimited = _fake_root(tmp_path / "none", "4:memory:/\n", {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": "1\n",
    }, available_kb=3 << 20)
    assert available_memory(unlimited) == MemoryInfo(3 << 30, 8 << 30, "meminfo")
    jetson = _fake_root(tmp_path / "jetson", "0::/\n", {"etc/nv_tegra_release": "# R35\n"})
    assert available_memory(jetson).shared_gpu
    with pytest.raises(BudgetError, match="meminfo"):
        available_memory(tmp_path / "nothing")


def test_auto_budget_subtracts_headroom():
    mem = lambda: MemoryInfo(available=1000 * MiB, limit=2000 * MiB, source="test")  # noqa: E731
    assert resolve_auto_budget("auto", memory=mem) == 800 * MiB  # 10% of the limit
    assert resolve_auto_budget("auto-100MiB", memory=mem) == 900 * MiB
    assert resolve_auto_budget("auto - 25%", memory=mem) == 500 * MiB
    assert resolve_auto_budget("auto", headroom="1MiB", held=10 * MiB, reserve=5 * MiB, memory=mem) == 1004 * MiB
    small = lambda: MemoryInfo(available=50 * MiB, limit=100 * MiB, source="test")  # noqa: E731
    assert resolve_auto_budget("auto-10MiB", memory=small) == 40 * MiB
    with pytest.raises(BudgetError, match="nothing left"):
        resolve_auto_budget("auto", memory=small)  # the default headroom is at least 64 MiB
    with pytest.raises(BudgetError, match="not an automatic budget"):
        resolve_auto_budget("50%", memory=mem)


def test_runtime_load_auto_fits_available_memory(mlp_path, monkeypatch):
    import stn_edge.device.memory as memory

    full = Runtime.load(mlp_path, backend="numpy")
    engine = engine_memory("numpy")
    room = full.footprint() // 2 + engine.fixed_bytes + 64 * MiB
    monkeypatch.setattr(memory, "available_memory", lambda: MemoryInfo(room, 8 << 30, "test"))
    rt = Runtime.load(mlp_path, mem_limit="auto-64MiB", backend="numpy")
    assert rt.footprint() <= full.footprint() // 2
    assert rt.footprint() > full.footprint() // 4


class _FakeMemory:
    def __init__(self, available: int):
        self.available = available

    def __call__(self) -> MemoryInfo:
        return MemoryInfo(self.available, 1 << 40, "fake")


def test_watcher_rescales_under_pressure_and_back(mlp_path):
    rt = Runtime.load(mlp_path, backend="numpy")
    full = rt.footprint()
    fake = _FakeMemory(full + 64 * MiB)  # headroom given explicitly below: 1 MiB
    watcher = MemoryWatcher(rt, headroom=MiB, memory=fake, interval=0.01)
    assert watcher.check() is None  # everything fits: nothing to do
    fake.available = MiB + full // 3 - full  # the system took memory: now a third of the model fits
    event = watcher.check()
    assert event is not None and rt.footprint() <= full // 3 and not event.error
    fake.available = 64 * MiB  # plenty again
    assert watcher.check() is not None and rt.footprint() == full
    fake.available = -full  # nothing left: smallest feasible model, and the error is recorded
    event = watcher.check()
    assert "smallest feasible" in event.error and rt.footprint() < full // 3
    # as a thread: starts, reacts, stops promptly
    fake.available = 64 * MiB
    with watcher:
        deadline = time.monotonic() + 10
        while rt.footprint() != full and time.monotonic() < deadline:
            time.sleep(0.01)
    assert rt.footprint() == full
    assert not watcher._thread.is_alive()
