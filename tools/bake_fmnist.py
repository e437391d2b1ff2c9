"""Bake a trained Fashion-MNIST ResNet-20 with bake's defaults, time it, and load it at each budget.

    python tools/bake_fmnist.py --model out/fmnist/dense.pt --out docs/bake_fmnist.json

What docs/RESULTS.md's "memory levels" table and bake-time figures come from: one artifact baked with
``bake(model, x, path, calibration=256 training images)`` (the defaults: structure search, data
importance, correction, 32 levels), its bake time per phase, then accuracy on the full 10k test set
with onnxruntime at each budget (a share of the factorizable weights' dense bytes, the never-factorized
tensors added on top, as tools/results_fmnist.py counts them). Run it with another checkout first on
``PYTHONPATH`` to measure that code side by side (docs/RESULTS.md names the commits).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fashion_mnist import ResNet20, load  # noqa: E402

BUDGETS = [1.0, 0.5, 0.25, 0.15, 0.1, 0.05]


def main() -> None:
    from stn_edge.device import Runtime
    from stn_edge.errors import BudgetError
    from stn_edge.host import bake

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="out/fmnist/dense.pt")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--label", default="", help="a name for this run (the code measured)")
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--bake-only", action="store_true", help="time the bake, load no budget")
    args = ap.parse_args()
    torch.manual_seed(0)
    xtr, _ = load("train")
    xte, yte = load("test")
    xte, yte = xte[: args.test], yte[: args.test]
    cal = torch.from_numpy(xtr[np.random.default_rng(0).choice(len(xtr), args.calibration, replace=False)])
    model = ResNet20()
    model.load_state_dict(torch.load(args.model, weights_only=True))
    model.eval()
    with torch.no_grad():
        dense_acc = float((model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    path = Path(tempfile.mkdtemp(prefix="stn-bake-")) / "resnet20.stn"
    t0 = time.perf_counter()
    report = bake(model, cal[:1], path, calibration=cal, progress=True)
    seconds = time.perf_counter() - t0
    with Runtime.load(path, backend="numpy") as rt:
        fixed = rt.plan.fixed_bytes
        factorizable = rt.full_bytes - fixed
    points = []
    for frac in [] if args.bake_only else BUDGETS:
        share = 100.0 * (fixed + frac * factorizable) / (fixed + factorizable)
        try:
            with Runtime.load(path, mem_limit=f"{share:.6f}%", backend=args.backend, batch_size=500) as rt:
                hits = sum(int((rt.run({"input": xte[i:i + 500]})["output"].argmax(1) == yte[i:i + 500]).sum())
                           for i in range(0, len(xte), 500))
                point = {"fraction": frac, "accuracy": hits / len(xte), "bytes": rt.plan.total_bytes,
                         "factorized": sum(not c.dense for c in rt.plan.layers)}
        except BudgetError as exc:
            point = {"fraction": frac, "accuracy": None, "note": f"infeasible: {exc.smallest_feasible} bytes needed"}
        points.append(point)
        print(f"{frac:.0%}: {point}", flush=True)
    result = {
        "label": args.label, "command": " ".join(["python", "tools/bake_fmnist.py", *sys.argv[1:]]),
        "dense_accuracy": dense_acc, "test_images": len(xte), "calibration": args.calibration,
        "bake_seconds": seconds, "phases": getattr(report, "phases", {}),
        "families": {l.name: l.family for l in report.layers},
        "levels": {l.name: len(l.ladder_ranks) for l in report.layers}, "points": points,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("bake_seconds", "phases", "dense_accuracy")}), flush=True)


if __name__ == "__main__":
    main()
