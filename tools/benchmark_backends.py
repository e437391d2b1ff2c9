"""Latency of factorized models against their dense form, per backend, budget and batch size.

Three models, baked once with plain SVD and spectral importance into ``--out`` (random weights:
latency and FLOPs do not depend on the values; the calibration error column does, so it is not
an accuracy figure):

- ``resnet20``: He et al.'s CIFAR ResNet-20 from tools/fashion_mnist.py, input 1x28x28;
- ``resnet18``: a ResNet-18-shape CNN (BasicBlocks 64-128-256-512, two per stage), input 3x64x64;
- ``encoder``: one ``nn.TransformerEncoderLayer`` (d_model 256, 4 heads, FF 1024), sequence 64.

For each backend and batch size the dense model (every layer dense) and the model at each budget
are loaded side by side and timed interleaved (:func:`stn_edge.device.profile.time_side_by_side`),
so a slow spell of a shared machine hits all of them alike. The latency ratio is p50(budget) /
p50(dense); the FLOP ratio is MACs(budget) / MACs(dense) of the lowered graphs. The process is
pinned to ``--cpus`` CPUs (default 1) and torch to as many threads: on a shared 2-core VM,
engines that spin their thread pools across both cores measure the neighbours more than the model.

Also, per model: the time to ``Runtime.load`` at 25% on onnxruntime against the time to create an
onnxruntime session for the dense ONNX model (written by ``stn-edge export``), and the artifact bytes
that load read against the bytes its plan holds.

    python tools/benchmark_backends.py --out out/bench --json docs/benchmarks.json --markdown --latency-model

With ``--latency-model``, each model also gets a per-layer latency table on onnxruntime (batch 1)
and the latency it predicts for each budget's plan is compared with the measured one, including a
25% load with ``latency_limit_ms``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
#: targets of the issue, checked on onnxruntime CPU at batch 1 for budgets of 2x compression or more
FLOP_SLACK = 1.2


# --------------------------------------------------------------------------- models


def make_model(name: str):
    """``(torch module, input shape of one sample)`` for a benchmark model, seeded."""
    import torch
    from torch import nn

    sys.path.insert(0, str(TOOLS))
    from fashion_mnist import BasicBlock, ResNet20

    torch.manual_seed(0)
    if name == "resnet20":
        return ResNet20(), (1, 28, 28)
    if name == "resnet18":
        class ResNet18Shape(nn.Module):
            def __init__(self, classes: int = 100):
                super().__init__()
                self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
                blocks, cin = [], 64
                for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                    for i in range(2):
                        blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                        cin = cout
                self.blocks = nn.Sequential(*blocks)
                self.fc = nn.Linear(512, classes)

            def forward(self, x):
                return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))

        return ResNet18Shape(), (3, 64, 64)
    if name == "encoder":
        class EncoderBlock(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)

            def forward(self, x):
                return self.layer(x)

        return EncoderBlock(), (64, 256)
    raise SystemExit(f"unknown model {name!r}; choose from resnet20, resnet18, encoder")


def baked(name: str, out: Path, rebake: bool = False, structure: str = "svd", op_cost: float | None = None) -> Path:
    """The model's artifact in ``out``, baked (spectral importance, 16 random calibration inputs) if missing.

    ``structure`` is bake's: ``"svd"`` (the tables in docs/BENCHMARKS.md) or ``"auto"`` (the search,
    bake's default), kept side by side as ``<name>.stn`` and ``<name>-auto.stn``."""
    import torch

    from stn_edge.host import bake

    path = out / (f"{name}.stn" if structure == "svd" else f"{name}-{structure}.stn")
    if op_cost:
        path = path.with_name(f"{path.stem}-opcost{op_cost:g}.stn")
    if path.exists() and not rebake:
        return path
    model, shape = make_model(name)
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused encoder kernel has no ONNX export
    gen = torch.Generator().manual_seed(1)
    cal = torch.randn(16, *shape, generator=gen)
    from stn_edge.host.structure import SearchLimits

    report = bake(model, cal[:1], path, calibration=cal, importance="spectral", progress=False, structure=structure,
                  search_limits=SearchLimits(op_cost_macs=op_cost))
    print(f"[bench] baked {path} in {report.seconds:.0f} s", file=sys.stderr)
    return path


# --------------------------------------------------------------------------- measurements


def side_by_side(path: Path, backend: str, budgets: list[str], batches: list[int], seconds: float,
                 macs: dict[str, tuple[int, int]], as_fast_as_dense: bool = False) -> list[dict]:
    """Rows ``{budget, batch, p50_ms, dense_p50_ms, latency_ratio, flop_ratio, ...}`` for one backend.

    ``as_fast_as_dense``: also load each budget with ``latency_limit_ms`` at the dense model's
    predicted latency (the engine's cost model), rows named ``"<budget> <=dense"``."""
    from stn_edge.device import Runtime
    from stn_edge.device.profile import calibration_feeds, model_macs, time_side_by_side
    from stn_edge.errors import BudgetError

    top = max(batches)  # each batch runs whole: no chunking inside a timed call
    runtimes = {"dense": Runtime.load(path, mem_limit=None, backend=backend, batch_size=top)}
    for b in budgets:
        try:
            runtimes[b] = Runtime.load(path, mem_limit=b, backend=backend, batch_size=top)
        except BudgetError as exc:
            print(f"[bench] {path.name} {b}: {exc}", file=sys.stderr)
    if as_fast_as_dense:
        limit = runtimes["dense"].predict_latency_ms()
        for b in budgets:
            try:
                runtimes[f"{b} <=dense"] = Runtime.load(path, mem_limit=b, backend=backend, batch_size=top,
                                                        latency_limit_ms=limit)
            except BudgetError as exc:
                print(f"[bench] {path.name} {b} within the dense latency: {exc}", file=sys.stderr)
    for b, rt in runtimes.items():
        if b not in macs:
            macs[b] = model_macs(rt, calibration_feeds(rt, 1))
    rows = []
    for batch in batches:
        fns = {}
        for b, rt in runtimes.items():
            feeds = calibration_feeds(rt, batch)
            fns[b] = (lambda rt=rt, feeds=feeds: rt.run(feeds))
        lat = time_side_by_side(fns, batch=batch, warmup=2, seconds=seconds)
        dense = lat["dense"]
        for b in runtimes:
            if b == "dense":
                continue
            rt = runtimes[b]
            rows.append({
                "backend": backend, "budget": b, "batch": batch, "model_bytes": rt.plan.total_bytes,
                "full_bytes": rt.full_bytes, "p50_ms": lat[b].p50_ms, "p90_ms": lat[b].p90_ms,
                "dense_p50_ms": dense.p50_ms, "runs": lat[b].runs, "latency_ratio": lat[b].p50_ms / dense.p50_ms,
                "min_ratio": lat[b].min_ms / dense.min_ms,
                "flop_ratio": macs[b][0] / macs["dense"][0], "macs": macs[b][0], "dense_macs": macs["dense"][0],
                "plan": rt.plan.summary(), "predicted_loss": rt.plan.loss,
                "slower_than_dense_layers": len(rt.plan.slower_than_dense()),
            })
            print(f"[bench] {path.stem} {backend} batch {batch} {b}: {lat[b].p50_ms:.3f} ms vs dense {dense.p50_ms:.3f} ms "
                  f"(x{rows[-1]['latency_ratio']:.2f}, FLOPs x{rows[-1]['flop_ratio']:.2f})", file=sys.stderr)
    for rt in runtimes.values():
        rt.close()
    return rows


def load_times(path: Path, out: Path, budget: str = "25%", repeats: int = 5) -> dict:
    """Median ``Runtime.load(path, budget)`` on onnxruntime vs a session for the dense ONNX model."""
    import onnxruntime as ort

    from stn_edge.device import Runtime
    from stn_edge.device.export import export_model

    dense_onnx = out / f"{path.stem}.dense.onnx"
    export_model(path, dense_onnx, mem_limit=None, check=False)
    stn_t, unverified_t, ort_t, reads = [], [], [], None
    for _ in range(repeats):
        t = time.perf_counter()
        Runtime.load(path, mem_limit=budget, backend="onnxruntime", verify=False).close()
        unverified_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        rt = Runtime.load(path, mem_limit=budget, backend="onnxruntime")
        stn_t.append(time.perf_counter() - t)
        reads = {"bytes_read": rt.bytes_read, "planned_bytes": rt.plan.total_bytes,
                 "header_bytes": rt._reader.data_start, "full_bytes": rt.full_bytes, "file_bytes": path.stat().st_size}
        rt.close()
        del rt
        t = time.perf_counter()
        session = ort.InferenceSession(str(dense_onnx), providers=["CPUExecutionProvider"])
        ort_t.append(time.perf_counter() - t)
        del session
    return {"model": path.stem, "budget": budget, "stn_load_ms": 1e3 * float(np.median(stn_t)),
            "stn_load_unverified_ms": 1e3 * float(np.median(unverified_t)),
            "ort_dense_session_ms": 1e3 * float(np.median(ort_t)), "dense_onnx_bytes": dense_onnx.stat().st_size, **reads}


def latency_model(path: Path, backend: str, budgets: list[str], seconds: float) -> list[dict]:
    """Per-layer table on ``backend`` (batch 1), then predicted vs measured p50 for each budget's plan,
    and for the 25% budget with ``latency_limit_ms`` at 85% of its predicted time."""
    from stn_edge.device import Runtime
    from stn_edge.device.profile import calibration_feeds, layer_latency, time_side_by_side
    from stn_edge.errors import BudgetError

    loaded = {b: Runtime.load(path, mem_limit=b, backend=backend) for b in ["100%", *budgets]}
    levels: dict[str, set[int]] = {}
    for rt in loaded.values():
        for c in rt.plan.layers:
            if not c.dense:
                levels.setdefault(c.name, set()).add(c.level)
    t = time.perf_counter()
    table = layer_latency(path, backend=backend, batch=1, levels=levels, spread=3, seconds=0.2)
    table_s = time.perf_counter() - t
    limit = 0.85 * table.predict(loaded["25%"].plan)
    refused = None
    try:
        loaded["25% + latency limit"] = Runtime.load(path, mem_limit="25%", backend=backend, latency_limit_ms=limit,
                                                     profile=table)
    except BudgetError as exc:  # no plan within 25% is predicted that fast: the load says so
        refused = {"model": path.stem, "backend": backend, "budget": "25% + latency limit", "limit_ms": limit,
                   "refused": str(exc)}
    fns = {}
    for b, rt in loaded.items():
        feeds = calibration_feeds(rt, 1)
        fns[b] = (lambda rt=rt, feeds=feeds: rt.run(feeds))
    lat = time_side_by_side(fns, warmup=2, seconds=seconds)
    rows = []
    for b, rt in loaded.items():
        rows.append({"model": path.stem, "backend": backend, "budget": b, "model_bytes": rt.plan.total_bytes,
                     "full_bytes": rt.full_bytes, "predicted_ms": table.predict(rt.plan), "measured_p50_ms": lat[b].p50_ms,
                     "calibration_error": max(rt.verify().values()), "limit_ms": limit if "limit" in b else None,
                     "table_seconds": table_s})
        rt.close()
    return rows + ([refused] if refused else [])


# --------------------------------------------------------------------------- reporting


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets on onnxruntime, batch 1, budgets of 2x compression or more."""
    out = []
    for r in rows:
        if r["backend"] != "onnxruntime" or r["batch"] != 1 or r["model_bytes"] > 0.5 * r["full_bytes"]:
            continue
        out.append({"model": r["model"], "budget": r["budget"], "latency_ratio": r["latency_ratio"],
                    "flop_ratio": r["flop_ratio"], "within_1.2x_flops": r["latency_ratio"] <= FLOP_SLACK * r["flop_ratio"],
                    "not_slower_than_dense": r["latency_ratio"] <= 1.0})
    return out


def markdown(result: dict) -> str:
    lines = []
    for model in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == model]
        if not rows:
            continue
        lines += [f"### {model}", "", "| backend | batch | dense p50 ms | budget | bytes kept | p50 ms | latency ratio "
                  "| (ratio of min times) | FLOP ratio | pred. loss | layers slower than dense |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['backend']} | {r['batch']} | {r['dense_p50_ms']:.3f} | {r['budget']} | "
                         f"{r['model_bytes'] / r['full_bytes']:.0%} | {r['p50_ms']:.3f} | {r['latency_ratio']:.2f} | "
                         f"({r['min_ratio']:.2f}) | {r['flop_ratio']:.2f} | {r.get('predicted_loss', float('nan')):.3g} | "
                         f"{r.get('slower_than_dense_layers', '')} |")
        lines.append("")
    if result["targets"]:
        lines += ["### Targets (onnxruntime CPU, batch 1, budgets of 2x compression or more)", "",
                  "| model | budget | latency ratio | FLOP ratio | 1.2 x FLOP ratio | <= 1.2x FLOPs | not slower than dense |",
                  "|---|---|---|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['model']} | {t['budget']} | {t['latency_ratio']:.2f} | {t['flop_ratio']:.2f} | "
                         f"{FLOP_SLACK * t['flop_ratio']:.2f} | {'met' if t['within_1.2x_flops'] else 'MISSED'} | "
                         f"{'met' if t['not_slower_than_dense'] else 'MISSED'} |")
        lines.append("")
    if result["load"]:
        lines += ["### Load time and bytes read (onnxruntime, 25% budget)", "",
                  "| model | Runtime.load 25% ms | same, verify=False | dense ONNX session ms | bytes read | bytes planned "
                  "| header | read / planned | (read - header) / planned |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["load"]:
            lines.append(f"| {r['model']} | {r['stn_load_ms']:.1f} | {r['stn_load_unverified_ms']:.1f} | "
                         f"{r['ort_dense_session_ms']:.1f} | {r['bytes_read']:,} | {r['planned_bytes']:,} | "
                         f"{r['header_bytes']:,} | {r['bytes_read'] / r['planned_bytes']:.3f} | "
                         f"{(r['bytes_read'] - r['header_bytes']) / r['planned_bytes']:.3f} |")
        lines.append("")
    if result.get("latency_model"):
        lines += ["### Latency model (per-layer table, batch 1): predicted vs measured", "",
                  "| model | backend | budget | bytes kept | predicted ms | measured p50 ms | measured / predicted | cal. error |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["latency_model"]:
            budget = r["budget"] + (f" ({r['limit_ms']:.3f} ms)" if r["limit_ms"] else "")
            if "refused" in r:
                lines.append(f"| {r['model']} | {r['backend']} | {budget} | refused: {r['refused']} | | | | |")
                continue
            lines.append(f"| {r['model']} | {r['backend']} | {budget} | {r['model_bytes'] / r['full_bytes']:.0%} | "
                         f"{r['predicted_ms']:.3f} | {r['measured_p50_ms']:.3f} | {r['measured_p50_ms'] / r['predicted_ms']:.2f} | "
                         f"{r['calibration_error']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet18,encoder")
    ap.add_argument("--backends", default="onnxruntime,tflite,torch", help="numpy works too (slow for big convs)")
    ap.add_argument("--budgets", default="75%,50%,25%,10%")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per configuration, about")
    ap.add_argument("--cpus", type=int, default=1, help="pin to this many CPUs (0: leave the affinity alone)")
    ap.add_argument("--out", default="out/bench", help="folder for the baked artifacts and dense ONNX files")
    ap.add_argument("--rebake", action="store_true")
    ap.add_argument("--structure", default="svd", choices=("svd", "auto"),
                    help="bake's structure: svd (the documented tables) or auto (the per-layer search)")
    ap.add_argument("--op-cost", type=float, default=None,
                    help="with --structure auto: SearchLimits.op_cost_macs (multiply-adds one extra op costs)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument("--latency-model", action="store_true",
                    help="also time every layer alone on onnxruntime and compare predicted with measured latency")
    ap.add_argument("--skip-load", action="store_true", help="skip the load-time comparison")
    ap.add_argument("--as-fast-as-dense", action="store_true",
                    help="also load each budget with latency_limit_ms at the dense model's predicted latency")
    args = ap.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpus])
    import torch

    if args.cpus:
        torch.set_num_threads(args.cpus)
    from stn_edge.device.backends import available_backends
    from stn_edge.device.profile import system_info

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backends = [b for b in args.backends.split(",") if b in available_backends()]
    skipped = sorted(set(args.backends.split(",")) - set(backends))
    budgets = args.budgets.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    result = {"command": " ".join(["python", "tools/benchmark_backends.py", *sys.argv[1:]]), "system": system_info(),
              "cpus": args.cpus, "models": args.models.split(","), "skipped_backends": skipped, "rows": [], "load": [],
              "latency_model": []}
    for model in result["models"]:
        path = baked(model, out, args.rebake, args.structure, args.op_cost)
        macs: dict[str, tuple[int, int]] = {}
        for backend in backends:
            for row in side_by_side(path, backend, budgets, batches, args.seconds, macs, args.as_fast_as_dense):
                result["rows"].append({"model": model, **row})
        if "onnxruntime" in backends and not args.skip_load:
            result["load"].append(load_times(path, out))
        if args.latency_model:
            result["latency_model"] += latency_model(path, "onnxruntime", budgets, args.seconds)
    result["targets"] = targets(result["rows"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        print(markdown(result))
    else:
        print(json.dumps(result["targets"], indent=1))


if __name__ == "__main__":
    main()
