"""Latency of repeated runs: warm-up, timed runs, percentiles; side-by-side timing of several configurations."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np



@dataclass(frozen=True)
class Latency:
    """Timed runs of one configuration. Times in milliseconds; ``throughput`` in samples per second."""

    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    #: median GPU time between CUDA events around each run (torch on CUDA only), else None
    gpu_p50_ms: float | None = None

    @property
    def throughput(self) -> float:
        return 1e3 * self.batch / self.mean_ms if self.mean_ms > 0 else float("inf")

    @classmethod
    def from_times(cls, seconds: Sequence[float], batch: int, gpu_ms: Sequence[float] = ()) -> "Latency":
        ms = 1e3 * np.asarray(seconds, dtype=np.float64)
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        gpu = float(np.median(gpu_ms)) if len(gpu_ms) else None
        return cls(batch, len(ms), float(p50), float(p90), float(p99), float(ms.mean()), float(ms.min()), gpu)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"throughput": self.throughput}


def cuda_event_timer(backend: str, device: str) -> Callable[[Callable[[], Any]], float] | None:
    """A function running ``fn`` between two CUDA events and returning the GPU milliseconds between them.

    Only for the torch backend on a CUDA device (its kernels run on torch's current stream); None
    anywhere else, including when torch or CUDA is missing. Not exercised on this project's CI,
    which has no GPU.
    """
    if backend != "torch" or not device.startswith("cuda"):
        return None
    from stn_edge.device.backends.torch import cuda_event_timer as torch_timer  # torch only in its backend

    return torch_timer()


def time_runs(
    fn: Callable[[], Any], *, batch: int = 1, warmup: int = 3, seconds: float = 1.0, min_runs: int = 10,
    max_runs: int = 10_000, gpu_timer: Callable[[Callable[[], Any]], float] | None = None,
) -> Latency:
    """Call ``fn`` ``warmup`` times, then time it until ``seconds`` have passed (and at least ``min_runs`` runs)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    gpu: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
        t = time.perf_counter()
        if gpu_timer is None:
            fn()
        else:
            gpu.append(gpu_timer(fn))
        times.append(time.perf_counter() - t)
    return Latency.from_times(times, batch, gpu)


def time_side_by_side(
    fns: Mapping[str, Callable[[], Any]], *, batch: int = 1, warmup: int = 3, rounds: int = 10, per_round: int = 3,
    seconds: float | None = None,
) -> dict[str, Latency]:
    """Time several configurations interleaved: ``rounds`` times, ``per_round`` runs of each in turn.

    On a shared or thermally throttled machine a slow spell then hits every configuration alike,
    so ratios between them stay meaningful. With ``seconds``, rounds and runs are chosen so that
    the first configuration gets about that much timed time (6 to 400 runs, in up to 30 turns).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if seconds is not None:
        first = next(iter(fns.values()))
        t = time.perf_counter()
        first()
        runs = int(max(6, min(400, seconds / max(time.perf_counter() - t, 1e-6))))
        rounds = min(30, runs)
        per_round = max(1, runs // rounds)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {k: Latency.from_times(v, batch) for k, v in times.items()}
