"""Memory on the device: what a model costs on an engine, how much there is, and a watcher.

Three jobs, one subject:

- **Cost.** ``mem_limit`` counts the memory a loaded model adds to the process (see
  ``docs/RELIABILITY.md``): the weights held at the chosen ranks times the copies the engine keeps of
  them (:class:`EngineMemory`). Each engine also has a fixed cost (its session, arenas, allocator
  slack) that does not grow with the model; that is the documented constant, not part of the budget.
- **Supply.** :func:`available_memory` reads the cgroup limit (v2 or v1) and ``/proc/meminfo``
  ``MemAvailable``; :func:`resolve_auto_budget` turns ``mem_limit="auto"`` (or ``"auto-256MB"``,
  ``"auto-15%"``) into bytes: what is available minus a headroom.
- **Pressure.** :class:`MemoryWatcher` polls the supply and rescales a runtime down (or back up)
  when it changes.

On NVIDIA Jetson boards the CPU and the GPU share one physical memory; CUDA allocations show up in
``MemAvailable``, so the same numbers hold for ``device="cuda"`` there. On a discrete GPU, ``"auto"``
sizes from host memory, which is the wrong pool: give ``mem_limit`` in bytes.

>>> rt = Runtime.load("model.stn", mem_limit="auto-128MB")       # doctest: +SKIP
>>> watcher = MemoryWatcher(rt, headroom="128MB").start()          # doctest: +SKIP
>>> watcher.stop()                                                 # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from stn_edge.errors import BudgetError
from stn_edge.plan import Plan, format_bytes, parse_budget

if TYPE_CHECKING:
    from stn_edge.device.runtime import Runtime

# --------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class EngineMemory:
    """What a model costs on one engine, measured by ``tools/measure_memory.py``.

    ``weight_copies``: bytes the process holds per byte of weights at the chosen ranks (the
    runtime's own arrays count as one). ``fixed_bytes``: what the engine adds whatever the model
    (session state, arenas, allocator slack); the documented constant of the memory test.
    """

    weight_copies: float
    fixed_bytes: int
    #: bytes the engine holds per byte of the activation peak (stn_edge.activations) it is given
    activation_copies: float = 1.0
    #: whether ops hold numpy-style workspace while they run (im2col, padded copies, temporaries;
    #: stn_edge.activations.workspace_bytes), counted in the activation peak
    workspace: bool = True

    @property
    def _ratio(self) -> Fraction:
        return Fraction(self.weight_copies).limit_denominator(1000)

    def footprint(self, weight_bytes: int) -> int:
        """Counted bytes for ``weight_bytes`` of weights (what ``mem_limit`` is compared with), rounded up."""
        return math.ceil(weight_bytes * self._ratio)

    def activation_footprint(self, activation_bytes: int) -> int:
        """Counted bytes for an activation peak of ``activation_bytes``, rounded up."""
        return math.ceil(activation_bytes * Fraction(self.activation_copies).limit_denominator(1000))

    def weights_for(self, budget: int) -> int:
        """The weight bytes a counted ``budget`` allows, rounded down: ``weights_for(footprint(w)) >= w``."""
        return math.floor(budget / self._ratio)


#: measured on x86-64 Linux, onnxruntime 1.32 CPU, by tools/measure_memory.py (docs/RELIABILITY.md, "Memory that is true").
#: numpy runs on the runtime's own arrays. So does onnxruntime (it borrows them), plus one copy in
#: its fast kernels' layouts (pre-packed MatMul/Gemm weights, NCHWc conv filters): ~2.0 afterwards,
#: and 3.2 covers the peak while a CNN's session is built (~3.1: NCHWc reorders the filters); an
#: MLP peaks at 2.0. An onnxruntime too old to borrow declares its own cost (EMBEDDED_MEMORY).
ENGINE_MEMORY: dict[str, EngineMemory] = {
    "numpy": EngineMemory(weight_copies=1.0, fixed_bytes=2 << 20, activation_copies=1.25),
    "onnxruntime": EngineMemory(weight_copies=3.2, fixed_bytes=16 << 20, activation_copies=2.0, workspace=False),
}
#: engines not measured yet are assumed to keep two copies (theirs and the runtime's)
UNMEASURED_ENGINE = EngineMemory(weight_copies=2.0, fixed_bytes=64 << 20)


def engine_memory(backend: Any) -> EngineMemory:
    """The :class:`EngineMemory` of a backend (instance or name).

    A backend class may declare its own with an ``engine_memory`` attribute; otherwise the table
    :data:`ENGINE_MEMORY` is used.
    """
    declared = getattr(backend, "engine_memory", None)
    if isinstance(declared, EngineMemory):
        return declared
    name = backend if isinstance(backend, str) else getattr(backend, "name", "")
    return ENGINE_MEMORY.get(name, UNMEASURED_ENGINE)


def release_free_memory() -> bool:
    """Hand memory the allocator holds but no object uses back to the system (glibc ``malloc_trim``).

    Freed arrays of a few MiB land in malloc's heap and stay counted in the process's RSS (and its
    cgroup) until trimmed; the runtime calls this after every rescale so that going down shows up as
    less memory used. Returns False where there is no glibc (musl, macOS, Windows): a no-op there.
    """
    trim = _malloc_trim()
    return bool(trim and trim(0) is not None)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- supply


@dataclass(frozen=True)
class MemoryInfo:
    """Memory this process may still take, and where the number comes from.

    ``available``: bytes that can be allocated before the tightest limit is hit. ``limit``: the
    tightest limit in force (cgroup ``memory.max`` or physical memory). ``source`` names what set
    ``available`` (``"cgroup v2"``, ``"cgroup v1"`` or ``"meminfo"``). ``shared_gpu`` is True on
    boards whose GPU allocates from the same memory (Jetson).
    """

    available: int
    limit: int
    source: str
    shared_gpu: bool = False


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if text == "max" or not text.lstrip("-").isdigit():
        return None
    return int(text)


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _meminfo(root: Path) -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) in bytes from ``/proc/meminfo``."""
    try:
        text = (root / "proc/meminfo").read_text()
    except OSError:
        return None
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, flags=re.M))
    if "MemTotal" not in fields:
        return None
    total = int(fields["MemTotal"]) * 1024
    return total, int(fields.get("MemAvailable", fields.get("MemFree", 0))) * 1024


def _cgroup_dirs(root: Path) -> list[tuple[str, Path]]:
    """(version, folder) of this process's memory cgroup and its ancestors, innermost first."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    found: list[tuple[str, Path]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, rel = parts
        if hier == "0" and controllers == "":
            version, base = "cgroup v2", root / "sys/fs/cgroup"
        elif "memory" in controllers.split(","):
            version, base = "cgroup v1", root / "sys/fs/cgroup/memory"
        else:
            continue
        rel_parts = [p for p in rel.split("/") if p]
        # inside a container the path is often not visible: fall back to the mount's root
        for depth in range(len(rel_parts), -1, -1):
            folder = base.joinpath(*rel_parts[:depth])
            if folder.is_dir():
                found.append((version, folder))
    return found


def _cgroup_available(version: str, folder: Path, physical: int) -> tuple[int, int] | None:
    """(limit, available) of one cgroup folder, or None when it sets no memory limit."""
    if version == "cgroup v2":
        limit, usage, stat = _read_int(folder / "memory.max"), _read_int(folder / "memory.current"), folder / "memory.stat"
        reclaimable = _stat_value(stat, "inactive_file")
    else:
        limit, usage, stat = (_read_int(folder / "memory.limit_in_bytes"), _read_int(folder / "memory.usage_in_bytes"),
                              folder / "memory.stat")
        reclaimable = _stat_value(stat, "total_inactive_file") or _stat_value(stat, "inactive_file")
    if limit is None or limit >= physical or usage is None:
        return None  # "max", or v1's "unlimited" (a huge number)
    return limit, max(0, limit - max(0, usage - reclaimable))


def _is_jetson(root: Path) -> bool:
    if (root / "etc/nv_tegra_release").exists():
        return True
    try:
        return "jetson" in (root / "proc/device-tree/model").read_text(errors="replace").lower()
    except OSError:
        return False


def available_memory(root: str | os.PathLike = "/") -> MemoryInfo:
    """How much memory this process can still allocate: the tightest of its cgroup limits and
    ``MemAvailable``. Page cache the kernel can drop (``inactive_file``) counts as available.

    ``root`` lets tests point at a fake ``/proc`` and ``/sys`` tree.
    """
    base = Path(root)
    mem = _meminfo(base)
    if mem is None:
        raise BudgetError("mem_limit='auto' needs /proc/meminfo (Linux); give mem_limit in bytes ('256MB')")
    physical, avail = mem
    best = MemoryInfo(available=avail, limit=physical, source="meminfo", shared_gpu=_is_jetson(base))
    for version, folder in _cgroup_dirs(base):
        got = _cgroup_available(version, folder, physical)
        if got is not None and got[1] < best.available:
            best = MemoryInfo(available=got[1], limit=got[0], source=version, shared_gpu=best.shared_gpu)
    return best


#: ``mem_limit="auto"`` keeps this much free: the larger of 10% of the limit and 64 MiB
DEFAULT_HEADROOM = "10%"
MIN_HEADROOM = 64 << 20
_AUTO_RE = re.compile(r"^\s*auto\s*(?:-\s*(?P<headroom>.+?))?\s*$", re.IGNORECASE)


def is_auto(mem_limit: Any) -> bool:
    """True for ``"auto"``, ``"auto-256MB"``, ``"auto-15%"``."""
    return isinstance(mem_limit, str) and _AUTO_RE.match(mem_limit) is not None


def headroom_bytes(headroom: int | float | str | None, limit: int) -> int:
    """Headroom in bytes: an int, ``"256MB"``, or a percentage of ``limit``; None for the default."""
    if headroom is None:
        return max(MIN_HEADROOM, parse_budget(DEFAULT_HEADROOM, limit))
    return parse_budget(headroom, limit)


def resolve_auto_budget(
    mem_limit: str = "auto",
    *,
    headroom: int | float | str | None = None,
    held: int = 0,
    reserve: int = 0,
    memory: Callable[[], MemoryInfo] | None = None,
) -> int:
    """Bytes a model may use under ``mem_limit="auto"``: available memory + what the model already
    holds (``held``, counted bytes) - the headroom - ``reserve`` (an engine's fixed cost still to come).

    The headroom comes from ``"auto-<headroom>"`` when given (``"auto-256MB"``, ``"auto-15%"`` of the
    limit), else from ``headroom``, else the default (10% of the limit, at least 64 MiB).
    Raises :class:`BudgetError` when nothing is left.
    """
    match = _AUTO_RE.match(mem_limit) if isinstance(mem_limit, str) else None
    if match is None:
        raise BudgetError(f"{mem_limit!r} is not an automatic budget; use 'auto', 'auto-256MB' or 'auto-15%'")
    info = (memory or available_memory)()
    room = headroom_bytes(match.group("headroom") or headroom, info.limit)
    budget = info.available + held - room - reserve
    if budget <= 0:
        raise BudgetError(
            f"mem_limit='auto': {format_bytes(info.available)} available ({info.source}), "
            f"{format_bytes(held)} already held, headroom {format_bytes(room)}"
            + (f", engine needs {format_bytes(reserve)}" if reserve else "")
            + ": nothing left for the model; free memory or lower the headroom ('auto-32MB')"
        )
    return budget


# --------------------------------------------------------------------------- pressure


@dataclass(frozen=True)
class WatchEvent:
    """One decision of a :class:`MemoryWatcher`: when, the budget it saw, the plan it moved to."""

    time: float
    budget: int
    held_before: int
    held_after: int
    error: str = ""


class MemoryWatcher:
    """A daemon thread that keeps a runtime within the memory it can get.

    Every ``interval`` seconds it computes the automatic budget (available + held - headroom). When
    the model holds more than that, it rescales down at once; when the budget exceeds what the model
    holds by more than ``grow_margin`` (a fraction) and the model is not at full size, it rescales up.
    A budget below the smallest feasible model rescales to the smallest one and records the error.

    ``memory`` is the supply reader (tests pass a fake one). ``events`` lists every rescale.

    >>> w = MemoryWatcher(rt, headroom="128MB", interval=0.5).start()   # doctest: +SKIP
    >>> w.stop()                                                          # doctest: +SKIP
    """

    def __init__(
        self,
        runtime: "Runtime",
        *,
        headroom: int | float | str | None = None,
        interval: float = 1.0,
        grow_margin: float = 0.25,
        memory: Callable[[], MemoryInfo] | None = None,
    ):
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self.runtime = runtime
        self.headroom = headroom
        self.interval = interval
        self.grow_margin = grow_margin
        self.memory = memory
        self.events: list[WatchEvent] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "MemoryWatcher":
        """Start polling in a daemon thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("this MemoryWatcher is already started")
        self._thread = threading.Thread(target=self._loop, name="stn-memory-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop polling and wait (up to ``timeout`` s) for a rescale in progress to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "MemoryWatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval)

    def check(self) -> WatchEvent | None:
        """Poll once; rescale when needed. Returns the event, or None when nothing changed."""
        rt = self.runtime
        held = rt.footprint()
        try:
            budget = resolve_auto_budget("auto", headroom=self.headroom, held=held, memory=self.memory)
        except BudgetError:
            budget = 0
        full = rt.plan_for(None)
        at_full = rt.plan is not None and rt.plan.total_bytes >= full.total_bytes
        shrink = budget < held
        grow = budget > held * (1 + self.grow_margin) and not at_full
        if not (shrink or grow):
            return None
        error = ""
        try:
            rt.rescale(min(budget, rt.footprint(full)) if budget > 0 else 1)
        except BudgetError as exc:
            error = str(exc)
            if exc.smallest_feasible is not None and held > exc.smallest_feasible:
                rt.rescale(exc.smallest_feasible)
        except Exception as exc:  # a watcher must not die: record and keep polling
            error = f"{type(exc).__name__}: {exc}"
        event = WatchEvent(time.monotonic(), budget, held, rt.footprint(), error)
        self.events.append(event)
        return event


def counted_plan(
    plan_weights: Callable[[int], Plan], mem_limit: Any, *, full_bytes: int, engine: EngineMemory,
    held: int = 0, first: bool = True, activations: Callable[[Plan], int] | None = None,
) -> Plan:
    """The plan for ``mem_limit`` counted on ``engine``: ``plan_weights`` maps a weight budget to a plan.

    Counted bytes are the weights x the engine's copies plus, when ``activations`` is given (it maps
    a plan to its activation peak at the runtime's batch size), that peak x the engine's activation
    copies. Bytes budgets and ``"auto"`` forms hold both: the weights get what the activations leave.
    Percentages (and None, the full model) are of the full model's weights, so ``"50%"`` keeps half
    the weights on every engine; the activations come on top and are in ``plan.activation_bytes``.
    ``"auto"`` is resolved against available memory (``held``: counted bytes the runtime holds now;
    on the first load the engine's fixed cost is reserved too). A :class:`BudgetError` states the
    smallest feasible budget in counted bytes.
    """
    share = mem_limit is None or (isinstance(mem_limit, str) and mem_limit.strip().endswith("%"))
    if is_auto(mem_limit):
        budget = resolve_auto_budget(mem_limit, held=held, reserve=engine.fixed_bytes if first else 0)
    else:
        budget = parse_budget(mem_limit, engine.footprint(full_bytes))
    if activations is None or share:
        # a share is of the weights themselves: no detour through the engine's copies, whose
        # rounding would plan a byte less on one engine than on another at a level boundary
        weights = parse_budget(mem_limit, full_bytes) if share else None
        plan, _ = _weights_plan(plan_weights, budget, budget, engine, activations, weights)
        if activations is not None:
            plan.activation_bytes = activations(plan)
        return plan
    # the activation peak depends a little on the ranks (a factorized layer's rank-sized values):
    # reserve the last plan's peak and re-plan until weights + activations fit
    reserve = 0
    for _ in range(8):
        plan, smallest = _weights_plan(plan_weights, budget, budget - reserve, engine, activations)
        plan.activation_bytes = activations(plan)
        over = engine.footprint(plan.total_bytes) + engine.activation_footprint(plan.activation_bytes) - budget
        if over <= 0 or smallest:  # fits; or the smallest model, which fits: nothing smaller to try
            return plan
        reserve = max(reserve + over, engine.activation_footprint(plan.activation_bytes))
    raise BudgetError(f"mem_limit {format_bytes(budget)}: the planner found no ranks whose weights and activations "
                      f"fit together; raise mem_limit or lower batch_size")


def _weights_plan(plan_weights: Callable[[int], Plan], budget: int, room: int, engine: EngineMemory,
                  activations: Callable[[Plan], int] | None, weights: int | None = None) -> tuple[Plan, bool]:
    """``(plan, smallest)``: the plan for the weights ``room`` (counted) allows, or for ``weights``
    bytes of weights when given. When that is below the smallest model: the smallest model if it
    fits ``budget`` with its activations (``smallest`` True), else a BudgetError in counted bytes
    that states the smallest feasible budget."""
    try:
        return plan_weights(engine.weights_for(max(room, 0)) if weights is None else weights), False
    except BudgetError as exc:
        if exc.smallest_feasible is None:
            raise
        reserve = 0
        if activations is not None:
            smallest = plan_weights(exc.smallest_feasible)
            reserve = engine.activation_footprint(activations(smallest))
            if room < budget and engine.footprint(smallest.total_bytes) + reserve <= budget:
                return smallest, True
        need = engine.footprint(exc.smallest_feasible) + reserve
        acts = f" + {format_bytes(reserve)} of activations (a smaller batch_size needs less)" if reserve else ""
        raise BudgetError(
            f"mem_limit {format_bytes(budget)} ({budget} bytes) is below the smallest feasible model on this "
            f"engine, {format_bytes(need)} ({format_bytes(exc.smallest_feasible)} of weights x "
            f"{engine.weight_copies:g} copies{acts}); raise mem_limit to at least {need}",
            smallest_feasible=need,
        ) from None
