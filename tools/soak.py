"""Soak: many inferences with a rescale every few hundred, and the process's memory watched throughout.

    python tools/soak.py                                  # bake the demo MLP, numpy, 10,000 runs
    python tools/soak.py --artifact model.stn --backend onnxruntime --runs 10000 --every 500
    python tools/soak.py --threads 4 --json soak.json

Budgets cycle through ``--budgets``. After every rescale the tool records private RSS (``RssAnon +
RssShmem``), the
Python objects alive, the runtime's counted bytes, and the output on a fixed input. It reports:

- memory at each visit of each budget: a leak shows as growth between visits of the same budget;
- drift: the largest difference between outputs at visits of the same budget (0 means every
  rescale rebuilt exactly the same weights);
- inference time percentiles.

The numbers in docs/RELIABILITY.md ("Soak") come from the first command. Exit status 1 when the
RSS at the last visit of a budget exceeds its first visit (after warm-up) by more than ``--tolerance``.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rss() -> int:
    """The process's private memory, ``RssAnon + RssShmem``: its RSS without file-backed library
    pages, which code faults in over time whatever the model does (not a leak)."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if ":" in line)
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem") if k in fields)


def _inputs(rt, batch: int, seed: int) -> dict[str, np.ndarray]:
    from stn_edge.graph import DTYPES

    rng = np.random.default_rng(seed)
    return {
        spec.name: rng.standard_normal([batch if isinstance(d, str) else d for d in spec.shape]).astype(DTYPES[spec.dtype])
        for spec in rt._template.inputs
    }


def soak(artifact: str, backend: str, runs: int, every: int, budgets: list[str], threads: int = 1,
         batch: int = 1) -> dict:
    """Run the soak in this process; return the record (see the module docstring)."""
    from stn_edge.device import Runtime

    rt = Runtime.load(artifact, mem_limit=budgets[0], backend=backend)
    x = _inputs(rt, batch, 0)
    out_name = rt.output_names[0]
    visits: dict[str, list[dict]] = {b: [] for b in budgets}
    # every inference time has its slot before the first reading: a growing list of 40,000 floats
    # (1.3 MiB) once showed up as a "leak" of the runtime
    times = np.full(runs, np.nan)
    filled = [0]
    lock = threading.Lock()
    start_rss = rss()

    def record(budget: str) -> None:
        gc.collect()
        visits[budget].append({
            "rss": rss(), "objects": len(gc.get_objects()), "counted": rt.footprint(),
            "output": rt.run(x)[out_name].copy(),
        })

    def work(n: int, seed: int) -> None:
        xs = _inputs(rt, batch, seed)
        local = np.empty(n)
        for i in range(n):
            t = time.perf_counter()
            rt.run(xs)
            local[i] = time.perf_counter() - t
        with lock:
            times[filled[0]:filled[0] + n] = local
            filled[0] += n

    record(budgets[0])
    done, step = 0, 0
    while done < runs:
        n = min(every, runs - done)
        workers = [threading.Thread(target=work, args=(n // threads + (i < n % threads), i + 1)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        done += n
        step += 1
        budget = budgets[step % len(budgets)]
        rt.rescale(budget)
        record(budget)
    rt.close()
    summary = {"artifact": str(artifact), "backend": backend, "runs": runs, "rescale_every": every,
               "rescales": step, "threads": threads, "batch": batch, "start_rss": start_rss, "budgets": {}}
    for budget, vs in visits.items():
        if not vs:
            continue
        warm = vs[1] if len(vs) > 1 else vs[0]  # the first visit warms allocator pools and caches
        drift = max(float(np.max(np.abs(v["output"] - vs[0]["output"]))) for v in vs)
        summary["budgets"][budget] = {
            "visits": len(vs), "counted": vs[-1]["counted"], "rss": [v["rss"] for v in vs],
            "rss_growth_after_warmup": vs[-1]["rss"] - warm["rss"], "objects": [v["objects"] for v in vs],
            "max_output_drift": drift,
        }
    ms = sorted(float(t) * 1e3 for t in times[:filled[0]])
    summary["inference_ms"] = {"p50": statistics.median(ms), "p99": ms[int(0.99 * (len(ms) - 1))], "max": ms[-1]}
    summary["end_rss"] = rss()
    return summary


def _bake_demo(path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("measure_memory", ROOT / "tools" / "measure_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bake_demo(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", help="artifact to soak (default: bake the demo MLP of tools/measure_memory.py)")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--every", type=int, default=500, help="inferences between rescales")
    ap.add_argument("--budgets", nargs="+", default=["100%", "50%", "25%", "10%", "75%"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=1.0, help="allowed RSS growth per budget after warm-up, MiB")
    ap.add_argument("--json", help="also write the record to this file")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or _bake_demo(Path(tmp) / "demo.stn")
        t0 = time.perf_counter()
        s = soak(str(artifact), args.backend, args.runs, args.every, args.budgets, args.threads, args.batch)
        s["seconds"] = time.perf_counter() - t0
    mib = 2**20
    print(f"{s['runs']} inferences on {s['backend']} ({s['threads']} thread(s), batch {s['batch']}), "
          f"a rescale every {s['rescale_every']}: {s['rescales']} rescales in {s['seconds']:.1f} s")
    print(f"inference p50 {s['inference_ms']['p50']:.3f} ms, p99 {s['inference_ms']['p99']:.3f} ms, "
          f"max {s['inference_ms']['max']:.2f} ms")
    print(f"{'budget':>7} {'visits':>6} {'counted MiB':>11}  {'RSS MiB at each visit':<40} {'growth':>7} {'drift':>9}")
    leaked = False
    for budget, b in s["budgets"].items():
        visits = " ".join(f"{r / mib:.1f}" for r in b["rss"])
        growth = b["rss_growth_after_warmup"] / mib
        leaked |= growth > args.tolerance
        print(f"{budget:>7} {b['visits']:>6} {b['counted'] / mib:>11.2f}  {visits:<40} {growth:>+7.2f} {b['max_output_drift']:>9.2g}")
    print(f"RSS: {s['start_rss'] / mib:.1f} MiB after the first load, {s['end_rss'] / mib:.1f} MiB at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=1))
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
