"""What each budget costs: :func:`profile_artifact` loads an artifact at each budget and measures it."""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


from stn_edge.device.memory import release_free_memory
from stn_edge.device.profile.board import peak_memory, reset_peak_memory, system_info
from stn_edge.device.profile.layers import layer_latency
from stn_edge.device.profile.macs import calibration_feeds, model_macs
from stn_edge.device.profile.timing import cuda_event_timer, time_runs
from stn_edge.device.runtime import Runtime
from stn_edge.errors import BudgetError
from stn_edge.latency import LayerLatency
from stn_edge.plan import format_bytes, format_table


@dataclass
class ProfileReport:
    """Rows of :func:`profile_artifact`: one per budget and batch size."""

    artifact: str
    backend: str
    device: str
    rows: list[dict[str, Any]]
    system: dict[str, Any]
    layers: list[LayerLatency] = field(default_factory=list)

    def table(self) -> str:
        head = ("budget", "bytes", "read", "load ms", "cal. error", "MACs/dense", "batch", "p50 ms", "p90 ms",
                "p99 ms", "samples/s", "peak RSS")
        rows: list[tuple[str, ...]] = [head]
        gpu = any(r.get("gpu_p50_ms") is not None for r in self.rows)
        if gpu:
            rows[0] = head + ("GPU p50 ms",)
        for r in self.rows:
            if "error_message" in r:
                rows.append((r["budget"], "infeasible", "", "", "", "", "", "", "", "", "", "") + (("",) if gpu else ()))
                continue
            row = (r["budget"], format_bytes(r["model_bytes"]), format_bytes(r["bytes_read"]), f"{r['load_ms']:.1f}",
                   f"{r['calibration_error']:.3g}", f"{r['flop_ratio']:.3f}", str(r["batch"]), f"{r['p50_ms']:.3f}",
                   f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['throughput']:.1f}",
                   format_bytes(r["peak_rss"]) if r.get("peak_rss") else "?")
            rows.append(row + ((f"{r['gpu_p50_ms']:.3f}" if r.get("gpu_p50_ms") is not None else "",) if gpu else ()))
        jet = self.system.get("jetson")
        board = f"; Jetson {jet.get('model')}, power mode {(jet.get('nvpmodel') or '?').splitlines()[0]}" if jet else ""
        return (format_table(rows) + f"\n{self.artifact} on {self.backend}/{self.device}; {self.system.get('cpu')}, "
                f"{self.system.get('cpus_usable')} CPUs usable{board}")

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "backend": self.backend, "device": self.device, "system": self.system,
                "rows": self.rows, "layers": [t.to_dict() for t in self.layers]}

    def plot(self, path: str | os.PathLike) -> None:
        """A PNG of p50 latency (one line per batch) and calibration error against model bytes."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in self.rows if "error_message" not in r]
        fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
        for batch in sorted({r["batch"] for r in ok}):
            pts = sorted((r["model_bytes"] / r["full_bytes"], r["p50_ms"]) for r in ok if r["batch"] == batch)
            ax_t.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", label=f"batch {batch}")
        ax_t.set(xlabel="model bytes (% of full)", ylabel="p50 latency (ms)", title=f"{self.backend}/{self.device}")
        ax_t.legend()
        first = {r["budget"]: r for r in ok}
        pts = sorted((r["model_bytes"] / r["full_bytes"], r["calibration_error"]) for r in first.values())
        ax_e.plot([100 * p[0] for p in pts], [max(p[1], 1e-9) for p in pts], "o-", color="C3")
        ax_e.set(xlabel="model bytes (% of full)", ylabel="calibration error (max rel.)", yscale="log",
                 title="error against the full-rank reference")
        fig.suptitle(Path(self.artifact).name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _measure(rt: Runtime, base: dict[str, Any], batches: Sequence[int], *, warmup: int, seconds: float,
             min_runs: int, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows of :func:`profile_artifact` for one loaded budget: ``base`` plus error, MACs, latency, memory."""
    gpu_timer = cuda_event_timer(rt.backend, rt.device)
    errors = rt.verify()
    macs, dense_macs = model_macs(rt, calibration_feeds(rt, 1))
    base = base | {"model_bytes": rt.plan.total_bytes, "full_bytes": rt.full_bytes,
                   "calibration_error": max(errors.values(), default=0.0), "macs": macs, "dense_macs": dense_macs,
                   "flop_ratio": macs / max(dense_macs, 1), "plan": rt.plan.summary()}
    rows = []
    for batch in batches:
        feeds = calibration_feeds(rt, batch)
        lat = time_runs(lambda: rt.run(feeds), batch=batch, warmup=warmup, seconds=seconds, min_runs=min_runs,
                        gpu_timer=gpu_timer)
        rows.append(base | lat.to_dict() | {"peak_rss": peak_memory()})
        progress(f"{base['budget']} batch {batch}: p50 {lat.p50_ms:.3f} ms")
    return rows


def profile_artifact(
    source: Any, *, budgets: Sequence[str | int | None] = ("100%", "50%", "25%", "10%"), backend: str = "auto",
    device: str = "cpu", batches: Sequence[int] = (1,), warmup: int = 3, seconds: float = 1.0, min_runs: int = 10,
    per_layer: bool = False, progress: Callable[[str], None] | None = None,
) -> ProfileReport:
    """Load ``source`` at each budget on ``backend`` and measure it; see the module docstring.

    A row per budget and batch: ``model_bytes`` (weights held), ``bytes_read`` (artifact bytes
    read by the load, header included), ``load_ms``, ``calibration_error`` (largest relative error
    on the stored calibration set, against the full-rank reference), ``macs`` per sample and
    ``flop_ratio`` (to the same model with every layer dense), the :class:`Latency` fields, and
    ``peak_rss`` (peak resident memory of this process during the load and the runs). An
    infeasible budget gives a row with ``error_message``. With ``per_layer``, a
    :class:`LayerLatency` table per batch size is added, timing the levels the budgets chose.
    """
    say = progress or (lambda msg: None)
    rows: list[dict[str, Any]] = []
    chosen: dict[str, set[int]] = {}
    engine_name = None
    for budget in budgets:
        gc.collect()
        release_free_memory()
        reset_peak_memory()
        t0 = time.perf_counter()
        try:
            rt = Runtime.load(source, mem_limit=budget, backend=backend, device=device, batch_size=max(batches))
        except BudgetError as exc:
            rows.append({"budget": str(budget), "error_message": str(exc)})
            continue
        load_ms = 1e3 * (time.perf_counter() - t0)
        bytes_read = rt.bytes_read  # before verify reads the calibration set
        with rt:
            engine_name = rt.backend
            for c in rt.plan.layers:
                if not c.dense:
                    chosen.setdefault(c.name, set()).add(c.level)
            base = {"budget": str(budget), "bytes_read": bytes_read, "load_ms": load_ms}
            rows += _measure(rt, base, batches, warmup=warmup, seconds=seconds, min_runs=min_runs, progress=say)
        del rt  # the next budget's peak memory must not include this model
    if engine_name is None:
        raise BudgetError(f"no budget of {list(budgets)} is feasible for {source}: " + "; ".join(r["error_message"] for r in rows))
    report = ProfileReport(str(source), engine_name, device, rows, system_info())
    if per_layer:
        for batch in batches:
            report.layers.append(layer_latency(
                source, backend=engine_name, device=device, batch=batch, levels=chosen, warmup=warmup,
                seconds=max(0.1, seconds / 5), progress=say))
    return report
