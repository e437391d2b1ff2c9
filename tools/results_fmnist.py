"""Accuracy versus budget for ResNet-20 on full Fashion-MNIST: STN against its baselines and ablations.

Needs the models trained by tools/fashion_mnist.py (see docs/RESULTS.md for the exact commands):
``out/fmnist/dense.pt`` (normal training) and ``out/fmnist/stn.pt`` (the same, fine-tuned with the
low-rank regularizer), optionally ``out/fmnist/stn_ft.pt`` (plus budget-sampled fine-tuning).

    python tools/results_fmnist.py --out docs/results_fmnist.json --plot docs/results_fmnist.png

Budgets are fractions of the factorizable weights' dense bytes (the weights never factorized are
added on top), evaluated with onnxruntime on the first ``--test`` test images.
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

from stn_edge.device import Runtime  # noqa: E402
from stn_edge.errors import BudgetError  # noqa: E402
from stn_edge.host import bake  # noqa: E402

BUDGETS = [1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05]


def variants(have_ft: bool) -> list[dict]:
    """Each curve: which trained model, which bake options, which planner."""
    out = [
        {"name": "STN (regularizer + adaptive structure + data importance)", "model": "stn", "structure": "auto", "importance": "data", "correct": True},
        {"name": "plain SVD, uniform rank ratio (normal training)", "model": "dense", "structure": "svd", "importance": "spectral", "correct": False, "planner": "uniform"},
        {"name": "Tucker-2 only, same planner (normal training)", "model": "dense", "structure": ["tucker2"], "importance": "data", "correct": True},
        {"name": "tensor-train only, same planner (normal training)", "model": "dense", "structure": ["tt"], "importance": "data", "correct": True},
        {"name": "regularizer alone (SVD, spectral importance)", "model": "stn", "structure": "svd", "importance": "spectral", "correct": False},
        {"name": "adaptive structure alone (normal training, data importance)", "model": "dense", "structure": "auto", "importance": "data", "correct": True},
        {"name": "SVD + data importance + correction (normal training)", "model": "dense", "structure": "svd", "importance": "data", "correct": True},
    ]
    if have_ft:
        out.insert(1, {"name": "STN + budget-sampled fine-tuning", "model": "stn_ft", "structure": "auto", "importance": "data", "correct": True})
    return out


def accuracy(rt: Runtime, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    hits = 0
    for i in range(0, len(x), batch):
        hits += int((rt.run({"input": x[i:i + batch]})["output"].argmax(1) == y[i:i + batch]).sum())
    return hits / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="out/fmnist")
    ap.add_argument("--test", type=int, default=2000, help="test images evaluated (the first ones)")
    ap.add_argument("--calibration", type=int, default=64, help="training images used to score levels")
    ap.add_argument("--levels", type=int, default=16)
    ap.add_argument("--out", default="docs/results_fmnist.json")
    ap.add_argument("--plot", default="docs/results_fmnist.png")
    ap.add_argument("--only", help="comma-separated variant indices to run")
    ap.add_argument("--backend", default="onnxruntime")
    args = ap.parse_args()
    torch.set_num_threads(2)
    xtr, _ = load("train")
    xte, yte = load("test")
    xte, yte = xte[: args.test], yte[: args.test]
    cal = torch.from_numpy(xtr[np.random.default_rng(0).choice(len(xtr), 256, replace=False)])
    models = {}
    for key in ("dense", "stn", "stn_ft"):
        path = Path(args.models) / f"{key}.pt"
        if path.exists():
            m = ResNet20()
            m.load_state_dict(torch.load(path, weights_only=True))
            models[key] = m.eval()
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {"curves": []}
    chosen = variants("stn_ft" in models)
    if args.only:
        chosen = [chosen[int(i)] for i in args.only.split(",")]
    with torch.no_grad():
        dense_acc = {k: float((m(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean()) for k, m in models.items()}
    print("dense accuracy", dense_acc, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="stn-fmnist-"))
    for v in chosen:
        if v["model"] not in models:
            print(f"skip {v['name']}: no {v['model']}.pt", flush=True)
            continue
        path = tmp / "m.stn"
        t0 = time.perf_counter()
        try:
            report = bake(models[v["model"]], cal[:1], path, calibration=cal, structure=v["structure"],
                          importance=v["importance"], correct=v["correct"], levels=args.levels,
                          score_samples=args.calibration, progress=False)
        except (TypeError, ValueError) as exc:  # a family this bake does not offer
            print(f"skip {v['name']}: {exc}", flush=True)
            continue
        bake_s = time.perf_counter() - t0
        rt0 = Runtime.load(path, backend="numpy")
        fixed = rt0._fixed_bytes
        factorizable = rt0.full_bytes - fixed
        rt0.close()
        points = []
        for frac in BUDGETS:
            budget = int(fixed + frac * factorizable)
            try:
                with Runtime.load(path, mem_limit=f"{100.0 * budget / (fixed + factorizable):.6f}%", backend=args.backend,
                                  planner=v.get("planner", "greedy"), batch_size=500) as rt:
                    acc = accuracy(rt, xte, yte)
                    held = rt.plan.total_bytes
            except BudgetError as exc:
                points.append({"fraction": frac, "accuracy": None, "note": f"infeasible: {exc.smallest_feasible} bytes needed"})
                continue
            points.append({"fraction": frac, "accuracy": acc, "bytes": held})
            print(f"{v['name']}: {frac:.0%} -> {acc:.4f}", flush=True)
        results["curves"] = [c for c in results["curves"] if c["name"] != v["name"]]
        results["curves"].append({**{k: v[k] for k in ("name", "model")}, "bake_seconds": bake_s, "points": points,
                                  "backend": args.backend,
                                  "families": sorted({l.family for l in report.layers})})
        results["dense_accuracy"] = dense_acc
        results["test_images"] = args.test
        Path(args.out).write_text(json.dumps(results, indent=2))
    plot(results, args.plot)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for c in results["curves"]:
        pts = [(p["fraction"], p["accuracy"]) for p in c["points"] if p["accuracy"] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot([100 * x for x in xs], [100 * y for y in ys], marker="o", label=c["name"])
    for k, acc in results.get("dense_accuracy", {}).items():
        ax.axhline(100 * acc, linestyle=":", color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("budget, % of the factorizable weights' dense bytes")
    ax.set_ylabel(f"test accuracy, % (first {results.get('test_images')} images)")
    ax.set_title("ResNet-20, Fashion-MNIST: one artifact, loaded at each budget")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)



def markdown(results: dict) -> str:
    """The curves as a markdown table (one row per curve, one column per budget)."""
    fracs = BUDGETS
    head = "| curve | " + " | ".join(f"{f:.0%}" for f in fracs) + " |"
    rows = [head, "|" + "---|" * (len(fracs) + 1)]
    for c in results["curves"]:
        acc = {p["fraction"]: p["accuracy"] for p in c["points"]}
        cells = [f"{100 * acc[f]:.1f}" if acc.get(f) is not None else ("infeasible" if f in acc else "-") for f in fracs]
        rows.append(f"| {c['name']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        print(markdown(json.loads(Path("docs/results_fmnist.json").read_text())))
    else:
        main()
