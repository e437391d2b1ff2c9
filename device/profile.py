"""Profiling on the device: what each budget costs in time, memory and error on this engine.

Four jobs, one subject (how a loaded model behaves on this machine):

- **Latency.** :func:`time_runs` does warm-up runs, then timed runs for a number of seconds, and
  summarizes them as :class:`Latency` (p50/p90/p99, throughput). With the torch backend on CUDA it
  also records GPU time with CUDA events next to the end-to-end time (:func:`cuda_event_timer`).
- **Budgets.** :func:`profile_artifact` loads an artifact at each budget and reports load time,
  bytes read, model bytes, calibration error, MACs per sample and their ratio to the dense model,
  peak process memory and latency per batch size (a :class:`ProfileReport`: table, JSON, PNG).
- **Layers.** :func:`layer_latency` times each factorized layer's lowered ops in isolation, dense
  and at the ladder levels of interest, on the chosen engine: a :class:`LayerLatency` table that
  :func:`stn_edge.latency.plan_within_latency` (and ``Runtime.load(latency_limit_ms=..., profile=...)``)
  plan with.
- **The board.** :func:`system_info` records the machine; on an NVIDIA Jetson also the power mode
  (``nvpmodel -q``), one ``tegrastats`` sample (clocks, temperatures) and a ``jtop`` snapshot when
  jetson-stats is installed. Whatever is absent is recorded as None.

Nothing here imports an engine at module level; the numpy backend infers shapes for MAC counts.

>>> report = profile_artifact("model.stn", budgets=("100%", "25%"), backend="onnxruntime")  # doctest: +SKIP
>>> print(report.table())                                                                    # doctest: +SKIP
"""
from __future__ import annotations

import gc
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from stn_edge.device.backends import Backend, get_backend
from stn_edge.device.memory import release_free_memory
from stn_edge.device.runtime import Runtime
from stn_edge.cost import count_macs, node_macs  # noqa: F401  (re-exported: profile users count MACs here)
from stn_edge.errors import BudgetError, InputError
from stn_edge.format import ArtifactReader
from stn_edge.graph import Graph, Node, ValueInfo, dtype_name, graph_from_dict
from stn_edge.lowering import assemble, lower
from stn_edge.latency import LAYER_TABLE_FORMAT, LayerLatency, plan_within_latency  # noqa: F401  (re-exported)
from stn_edge.plan import format_bytes, format_table

# --------------------------------------------------------------------------- latency


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


# --------------------------------------------------------------------------- process memory


def _proc_status() -> dict[str, int]:
    try:
        with open("/proc/self/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM") if k in fields}
    except OSError:
        return {}


def reset_peak_memory() -> bool:
    """Reset the process's peak resident memory to the current one (Linux >= 4.0); False elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory() -> int | None:
    """Peak resident memory of this process in bytes (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    try:
        import resource
    except ImportError:
        return None
    scale = 1 if platform.system() == "Darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


# --------------------------------------------------------------------------- shapes and MACs


def all_values(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every value of ``graph`` (inputs, initializers, node outputs) when run on ``feeds``.

    Runs the numpy backend once with every node output kept.
    """
    produced = [ValueInfo(o, [], "float32") for n in graph.nodes for o in n.outputs if o]
    probe = Graph(graph.nodes, graph.inputs, produced, graph.initializers, graph.opset)
    return {**graph.initializers, **feeds, **get_backend("numpy").prepare(probe).run(dict(feeds))}


def value_shapes(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shape of every value of ``graph`` when run on ``feeds`` (see :func:`all_values`)."""
    return {k: tuple(np.shape(v)) for k, v in all_values(graph, feeds).items()}


def model_macs(rt: Runtime, feeds: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """``(MACs of the plan rt runs, MACs of the same model with every layer dense)`` on ``feeds``.

    Activations have the same shapes in both; the dense count uses each layer's dense weight shape.
    """
    lowered = rt.lowered_graph()
    shapes = value_shapes(lowered, feeds)
    dense_shapes = dict(shapes) | {layer["weight"]: tuple(layer["dense"]["shape"]) for layer in rt.layers}
    template = graph_from_dict(rt.header["model"])
    return count_macs(lowered.nodes, shapes), count_macs(template.nodes, dense_shapes)


def calibration_feeds(rt: Runtime, batch: int | None = None) -> dict[str, np.ndarray]:
    """The artifact's calibration inputs, cut or tiled to ``batch`` samples (all of them for None)."""
    feeds = rt.calibration("inputs")
    if not feeds:
        raise InputError("the artifact holds no calibration inputs to profile with")
    if batch is None:
        return feeds
    out = {}
    for k, x in feeds.items():
        reps = -(-batch // len(x))
        out[k] = np.ascontiguousarray(np.concatenate([x] * reps)[:batch])
    return out


# --------------------------------------------------------------------------- per-layer latency


def _layer_graph(node: Node, x: str, values: Mapping[str, np.ndarray], initializers: dict[str, np.ndarray],
                 opset: int) -> Graph:
    """``node`` alone, fed its activation ``x``, returning its first output."""
    y = node.outputs[0]
    return Graph([node], [ValueInfo(x, list(values[x].shape), dtype_name(values[x].dtype))],
                 [ValueInfo(y, list(values[y].shape), dtype_name(values[y].dtype))], initializers, opset)


def _smallest_runtime(source: Any, backend: str, device: str, batch: int) -> Runtime:
    """The artifact at its smallest feasible plan on ``backend``, activations counted at ``batch``."""
    try:
        return Runtime.load(source, mem_limit=1, backend=backend, device=device, batch_size=batch)
    except BudgetError as exc:
        return Runtime.load(source, mem_limit=exc.smallest_feasible, backend=backend, device=device, batch_size=batch)


def layer_latency(
    source: Any, *, backend: str = "onnxruntime", device: str = "cpu", batch: int = 1,
    levels: Mapping[str, Iterable[int]] | None = None, spread: int = 4, warmup: int = 2, seconds: float = 0.2,
    progress: Callable[[str], None] | None = None,
) -> LayerLatency:
    """Time every factorized layer of ``source`` alone on ``backend``: dense, and at ladder levels.

    A layer's time is the median of its one-layer graph minus that of an Identity graph on the same
    input (the engine's per-call cost of feeding and returning values, which the whole model pays once).

    The levels timed for a layer are ``levels[name]`` (e.g. those the budgets of interest chose)
    plus ``spread`` levels spread evenly over its ladder. Each layer runs as a one-layer graph fed
    the activation it gets in the model at ``batch`` (found by running the model once with the numpy
    backend at its smallest plan). Then the dense model and the smallest plan run end to end, side by
    side, to calibrate the table (see :class:`LayerLatency`).
    """
    engine = get_backend(backend, device)
    # the smallest plan: cheapest for numpy to run, and every activation has the same shape in any plan
    rt = _smallest_runtime(source, "numpy", "cpu", batch)
    with rt:
        smallest = {c.name: c.level for c in rt.plan.layers}
        feeds = calibration_feeds(rt, batch)
        values = all_values(rt.lowered_graph(), feeds)
        template = graph_from_dict(rt.header["model"])
        reader: ArtifactReader = rt._reader
        tensors = rt.header["tensors"]
        nodes = {n.name: n for n in template.nodes}
        table: dict[str, dict[Any, float]] = {}
        ranks: dict[str, dict[int, int]] = {}
        for layer in rt.layers:
            node = nodes[layer["node"]]
            ladder = layer["ladder"]["ranks"]
            wanted = set(levels.get(layer["name"], ()) if levels else ())
            wanted |= {int(j) for j in np.linspace(0, len(ladder) - 1, spread).round()} if spread > 0 else set()
            wanted |= {smallest[layer["name"]]} - {None}
            consts = {n: reader.read_array(tensors[n]) for n in node.inputs if n in tensors}
            fed = [n for n in node.inputs if n and n not in tensors and n != layer["weight"]]
            if len(fed) != 1:
                continue  # not a one-activation layer: nothing to time it with alone
            x = fed[0]
            dense = _layer_graph(node, x, values, {**consts, layer["weight"]: reader.read_array(layer["dense"])},
                                 template.opset)
            # what one call costs with no work (feeding x, getting a value back) is not the layer's
            idle = Graph([Node("Identity", "idle", [x], ["idle"])], dense.inputs,
                         [ValueInfo("idle", list(values[x].shape), dense.inputs[0].dtype)], {}, template.opset)
            overhead = _time_graph(engine, idle, device, values[x], warmup, seconds)
            times = {"dense": max(0.0, _time_graph(engine, dense, device, values[x], warmup, seconds) - overhead)}
            top = max(wanted, default=-1) + 1
            rows = {k: reader.read_rows(ref, 0, top) for k, ref in layer["factors"].items()} if top else {}
            for j in sorted(wanted):
                ends = {k: ref["row_ends"][j] for k, ref in layer["factors"].items()}
                factors = assemble(layer, j, {k: rows[k][: ends[k]] for k in rows})
                sub = lower(_layer_graph(node, x, values, dict(consts), template.opset), [layer], {layer["name"]: factors})
                times[j] = max(0.0, _time_graph(engine, sub, device, values[x], warmup, seconds) - overhead)
            table[layer["name"]] = times
            ranks[layer["name"]] = {j: int(ladder[j]) for j in wanted}
            if progress:
                progress(f"timed {layer['name']}: dense and {len(wanted)} levels")
    ends = {"dense": Runtime.load(source, mem_limit=None, backend=backend, device=device, batch_size=batch),
            "smallest": _smallest_runtime(source, backend, device, batch)}
    try:
        fns = {k: (lambda rt=rt: rt.run(feeds)) for k, rt in ends.items()}
        timed = time_side_by_side(fns, batch=batch, warmup=warmup, seconds=10 * seconds)
    finally:
        for rt in ends.values():
            rt.close()
    return LayerLatency(backend, device, batch, table, ranks, timed["dense"].p50_ms, timed["smallest"].p50_ms,
                        smallest, system_info())


def _time_graph(engine: Backend, graph: Graph, device: str, x: np.ndarray, warmup: int, seconds: float) -> float:
    exe = engine.prepare(graph, device)
    feeds = {graph.inputs[0].name: x}
    return time_runs(lambda: exe.run(feeds), warmup=warmup, seconds=seconds, min_runs=5).p50_ms


# --------------------------------------------------------------------------- the board


def _run_text(argv: Sequence[str], timeout: float = 5.0) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def tegrastats_sample(interval_ms: int = 200, timeout: float = 5.0) -> str | None:
    """One line of ``tegrastats --interval``: RAM, CPU/GPU load and clocks, temperatures, power rails."""
    if shutil.which("tegrastats") is None:
        return None
    try:
        proc = subprocess.Popen(["tegrastats", "--interval", str(interval_ms)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None
    try:
        deadline = time.monotonic() + timeout
        line = ""
        while not line.strip() and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline() if proc.stdout else ""
        return line.strip() or None
    finally:
        proc.kill()
        proc.wait()


def parse_tegrastats(line: str) -> dict[str, Any]:
    """Temperatures (``name@41.5C``), GPU clock share (``GR3D_FREQ 0%@[1300]``) and EMC from a tegrastats line."""
    temps = {k: float(v) for k, v in re.findall(r"(\w+)@(-?[\d.]+)C\b", line)}
    gpu = re.search(r"GR3D_FREQ (\d+)%(?:@\[?(\d+)\]?)?", line)
    emc = re.search(r"EMC_FREQ (\d+)%(?:@(\d+))?", line)
    return {
        "temperatures_c": temps,
        "gpu_load_percent": int(gpu.group(1)) if gpu else None,
        "gpu_mhz": int(gpu.group(2)) if gpu and gpu.group(2) else None,
        "emc_load_percent": int(emc.group(1)) if emc else None,
    }


def _jtop_snapshot() -> dict[str, Any] | None:
    try:
        from jtop import jtop  # jetson-stats
    except ImportError:
        return None
    try:
        with jtop() as jetson:
            if not jetson.ok():
                return None
            stats = {k: (v if isinstance(v, (int, float, str)) or v is None else str(v)) for k, v in jetson.stats.items()}
            return {"stats": stats, "nvpmodel": str(getattr(jetson, "nvpmodel", "")) or None}
    except Exception as exc:  # jtop talks to a service that may not run
        return {"error": f"{type(exc).__name__}: {exc}"}


def jetson_info(root: str | os.PathLike = "/") -> dict[str, Any] | None:
    """Power mode, clocks and temperatures of an NVIDIA Jetson; None on any other machine.

    ``root`` lets tests point at a fake tree (the commands are only run for the real root).
    """
    base = Path(root)
    release = None
    try:
        release = (base / "etc/nv_tegra_release").read_text(errors="replace").splitlines()[0].strip()
    except (OSError, IndexError):
        pass
    try:
        model = (base / "proc/device-tree/model").read_text(errors="replace").strip("\x00 \n")
    except OSError:
        model = None
    if release is None and not (model and ("jetson" in model.lower() or "tegra" in model.lower())):
        return None
    real = base.resolve() == Path("/").resolve()
    sample = tegrastats_sample() if real else None
    return {
        "model": model,
        "l4t_release": release,
        "nvpmodel": _run_text(["nvpmodel", "-q"]) if real else None,
        "tegrastats": sample,
        "tegrastats_parsed": parse_tegrastats(sample) if sample else None,
        "jtop": _jtop_snapshot() if real else None,
    }


def system_info() -> dict[str, Any]:
    """The machine a profile ran on: CPU, cores usable, memory, engine versions, Jetson state."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    cpu_model = None
    try:
        cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith(("model name", "Model"))), None)
    except OSError:
        pass
    versions = {}
    for module in ("numpy", "onnxruntime", "ai_edge_litert", "torch"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[module] = None
    try:
        mem_total = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        mem_total = None
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        load = None
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_model, "cpus_usable": cpus,
            "memory_bytes": mem_total, "load_average": load, "python": platform.python_version(),
            "versions": versions, "jetson": jetson_info()}


# --------------------------------------------------------------------------- budgets


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
