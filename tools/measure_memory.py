"""Measure what a loaded model really costs: process memory growth against ``mem_limit``.

Each measurement runs in a fresh process (``--probe``), so nothing else in the interpreter moves the
numbers. The probe imports the engine first (its library code is not per-model), returns free heap
pages to the system, reads the process's private memory (``RssAnon + RssShmem``: its RSS without
file-backed library pages), loads the artifact at the budget, runs one inference, and reads it
again; the peak is ``VmHWM`` (reset through ``/proc/self/clear_refs``) less the library pages faulted
in meanwhile. ``rss_growth_after_first_run`` keeps the plain ``VmRSS`` growth.

    python tools/measure_memory.py                          # bake the demo MLP, print the table
    python tools/measure_memory.py --structure auto         # the demo MLP with the searched structure
    python tools/measure_memory.py --artifact model.stn --backends numpy onnxruntime
    python tools/measure_memory.py --probe model.stn --backend numpy --mem-limit 50% --json

The table in docs/RELIABILITY.md ("Memory that is true") comes from the first command.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BUDGETS = ("100%", "50%", "25%", "10%")


def _status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` and ``Private``: the process's anonymous and shared-memory pages
    (``RssAnon + RssShmem``), i.e. its RSS without file-backed pages (library code). Library pages
    are shared, reclaimable and faulted in by whatever code first runs: how many depends on the
    page cache, not on the model (a fresh checkout measured up to 1.7 MiB more of them than a warm
    one, for the same artifact and code)."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if ":" in line)
    out = {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssShmem")}
    out["Private"] = out["RssAnon"] + out["RssShmem"]
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def probe(artifact: str, backend: str, mem_limit: str, batch: int = 1) -> dict:
    """Load ``artifact`` at ``mem_limit`` on ``backend`` in this process; return the measurements."""
    import numpy as np

    from stn_edge.device import Runtime
    from stn_edge.device.backends import get_backend
    from stn_edge.device.memory import engine_memory, release_free_memory
    from stn_edge.graph import DTYPES
    from stn_edge.plan import parse_budget

    get_backend(backend)  # the engine's library code is loaded before measuring
    gc.collect()
    release_free_memory()  # the runtime trims after loading: trim before the baseline too
    peak_ok = _reset_peak()
    before = _status()
    rt = Runtime.load(artifact, mem_limit=mem_limit, backend=backend, batch_size=batch)
    loaded = _status()
    feeds = {
        spec.name: np.zeros([batch if isinstance(d, str) else d for d in spec.shape], DTYPES[spec.dtype])
        for spec in rt._template.inputs
    }
    rt.run(feeds)
    after = _status()
    engine = engine_memory(get_backend(backend))
    # a bytes budget is the limit; a percentage is of the weights, with the activations on top
    limit = (engine.footprint(rt.plan.budget) + engine.activation_footprint(rt.plan.activation_bytes)
             if mem_limit.strip().endswith("%") else parse_budget(mem_limit, 0))
    return {
        "backend": backend,
        "mem_limit": mem_limit,
        "batch": batch,
        "limit_bytes": limit,
        "counted_bytes": rt.footprint(),
        "weight_bytes": rt.plan.total_bytes,
        "activation_bytes": rt.plan.activation_bytes,
        "growth_after_load": loaded["Private"] - before["Private"],
        "growth_after_first_run": after["Private"] - before["Private"],
        # there is no high-water mark of private pages: the RSS peak less the library pages faulted in
        "peak_growth": (after["VmHWM"] - before["VmRSS"] - ((after["VmRSS"] - after["Private"]) -
                                                           (before["VmRSS"] - before["Private"]))) if peak_ok else None,
        "rss_growth_after_first_run": after["VmRSS"] - before["VmRSS"],
        "constant_bytes": engine.fixed_bytes,
        "weight_copies": engine.weight_copies,
    }


def probe_in_subprocess(artifact: str | os.PathLike, backend: str, mem_limit: str, batch: int = 1,
                        timeout: float = 120.0) -> dict:
    """Run :func:`probe` in a fresh interpreter; return its measurements."""
    cmd = [sys.executable, __file__, "--probe", str(artifact), "--backend", backend, "--mem-limit", mem_limit,
           "--batch", str(batch), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed ({backend}, {mem_limit}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bake_demo(path: str | os.PathLike, correct: bool = True, structure: str = "svd") -> Path:
    """The model of the memory table: 4 x Linear(1024, 1024) + ReLU, then Linear(1024, 16) (~16 MiB).

    ``correct=False`` skips the per-level output corrections: a 6x faster bake, for tests.
    ``structure``: SVD by default, as the table was measured; ``"auto"`` bakes the searched structure
    (SVD for every layer since the search's compute guard; tensor-train for four layers before it).
    """
    import torch

    from stn_edge.host import bake

    torch.manual_seed(0)
    layers = [m for _ in range(4) for m in (torch.nn.Linear(1024, 1024), torch.nn.ReLU())]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(1024, 16))
    bake(model, torch.randn(2, 1024), path, calibration=torch.randn(16, 1024), importance="spectral", progress=False,
         correct=correct, structure=structure)
    return Path(path)


def bake_cnn(path: str | os.PathLike, channels: int = 64, size: int = 32, structure: str = "svd") -> Path:
    """A model whose activations outweigh its weights: three 3x3 Conv(channels) at size x size, pooled,
    Linear(channels, 10). At the defaults: ~0.3 MiB of weights; ~4 MiB per activation and ~36 MiB of
    im2col workspace at batch 16."""
    import torch

    from stn_edge.host import bake

    torch.manual_seed(0)
    c = channels
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(c, 10))
    # SVD: every conv keeps an im2col over all its input channels, so the activations stay large at
    # every budget (the structure search would pick CP here, whose low ranks need far less)
    bake(model, torch.randn(2, 3, size, size), path, calibration=torch.randn(8, 3, size, size), importance="spectral",
         progress=False, correct=False, structure=structure)
    return Path(path)


def _needed(r: dict) -> str:
    """The activation copies this probe needed: (the larger of growth and peak - the constant - the
    counted weights) / the activation estimate; the engine's ``activation_copies`` must cover it."""
    if not r["activation_bytes"]:
        return "-"
    top = max(r["growth_after_first_run"], r["peak_growth"] or 0)
    return f"{(top - r['constant_bytes'] - r['weight_bytes'] * r['weight_copies']) / r['activation_bytes']:.2f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe", metavar="ARTIFACT", help="measure once, in this process")
    ap.add_argument("--artifact", help="artifact for the table (default: bake the demo MLP)")
    ap.add_argument("--cnn", action="store_true", help="bake the conv model of bake_cnn instead (activations dominate)")
    ap.add_argument("--structure", default="svd", help="the baked model's structure: svd (the tables') or auto")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--backends", nargs="+", default=["numpy", "onnxruntime"])
    ap.add_argument("--mem-limit", default="100%")
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.probe:
        result = probe(args.probe, args.backend, args.mem_limit, args.batch)
        print(json.dumps(result) if args.json else result)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.stn"
        artifact = args.artifact or (bake_cnn(path, structure=args.structure) if args.cnn
                                     else bake_demo(path, structure=args.structure))
        print(f"batch {args.batch}")
        print(f"{'backend':12} {'mem_limit':9} {'limit MiB':>9} {'weights':>8} {'acts':>8} {'load':>8} {'1st run':>8} "
              f"{'peak':>8} {'const':>6}  within  acts x")
        for backend in args.backends:
            for budget in args.budgets:
                r = probe_in_subprocess(artifact, backend, budget, args.batch)
                top = max(r["growth_after_first_run"], r["peak_growth"] or 0)
                ok = top <= r["limit_bytes"] + r["constant_bytes"]
                print(f"{backend:12} {budget:9} {_mib(r['limit_bytes']):>9} {_mib(r['weight_bytes']):>8} "
                      f"{_mib(r['activation_bytes']):>8} {_mib(r['growth_after_load']):>8} "
                      f"{_mib(r['growth_after_first_run']):>8} {_mib(r['peak_growth']):>8} "
                      f"{_mib(r['constant_bytes']):>6}  {'yes' if ok else 'NO ':6}  {_needed(r):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
