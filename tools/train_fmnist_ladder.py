"""Trained ladders on Fashion-MNIST: ResNet-20 converted to its factorized form, trained with nested
truncation, baked from the trained factors, loaded at each budget (issue 13).

    python tools/train_fmnist_ladder.py --model out/fmnist/dense.pt --out out/fmnist/ladder --epochs 15
    python tools/train_fmnist_ladder.py --model out/fmnist/dense.pt --out out/fmnist/fixed25 --epochs 15 --fixed-budget 0.25

Budgets are shares of the factorizable weights' bytes (the never-factorized tensors added on top), as
tools/bake_fmnist.py and docs/RESULTS.md count them. The run resumes from ``<out>/checkpoint.pt`` when it
exists (written atomically after every epoch and every ``--checkpoint-every`` steps). Results go to
``<out>/results.json``: minutes per epoch (and, with ``--time-dense``, those of one epoch of plain dense
training on the same images), accuracy of the trained torch model at each budget, and accuracy of the
baked artifact loaded at each budget (full test set unless ``--test``).
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from fashion_mnist import ResNet20, augment, load  # noqa: E402

BUDGETS = [1.0, 0.5, 0.25, 0.15, 0.1, 0.05, 0.02]


def share_bytes(ladder, share: float) -> int:
    """Bytes of a budget given as a share of the factorizable weights, the rest added on top."""
    return int(ladder.fixed_bytes + share * (ladder.full_bytes - ladder.fixed_bytes))


def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    with torch.no_grad():
        return sum(int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
                   for i in range(0, len(x), batch)) / len(x)


def dense_epoch_minutes(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int, steps: int) -> float:
    """Minutes one epoch of plain dense training (SGD, same batches and augmentation) takes, from ``steps`` steps."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    t0 = time.perf_counter()
    for i in range(steps):
        b = slice(i * batch, (i + 1) * batch)
        loss = nn.functional.cross_entropy(model(augment(xt[b])), yt[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * (-(-len(x) // batch)) / 60


def artifact_accuracy(path: Path, ladder, x: np.ndarray, y: np.ndarray, backend: str) -> list[dict]:
    from stn_edge.device import Runtime
    from stn_edge.errors import BudgetError

    points = []
    for share in BUDGETS:
        try:
            with Runtime.load(path, mem_limit=f"{100.0 * share_bytes(ladder, share) / ladder.full_bytes:.6f}%",
                              backend=backend, batch_size=500) as rt:
                hits = sum(int((rt.run({"input": x[i:i + 500]})["output"].argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500))
                point = {"share": share, "accuracy": hits / len(x), "bytes": rt.plan.total_bytes,
                         "factorized": sum(not c.dense for c in rt.plan.layers)}
        except BudgetError as exc:
            point = {"share": share, "accuracy": None, "note": f"infeasible: {exc.smallest_feasible} bytes needed"}
        points.append(point)
        print(f"artifact {share:.0%}: {point}", flush=True)
    return points


def main() -> None:
    from stn_edge.errors import BudgetError
    from stn_edge.host.bake import bake
    from stn_edge.host.ladder_training import (NestedTruncation, bake_trained, ladder_model, load_checkpoint)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="out/fmnist/dense.pt", help="trained dense ResNet-20 state dict")
    ap.add_argument("--out", required=True, help="folder for checkpoint.pt, model.stn and results.json")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.02, help="SGD (momentum 0.9) peak rate, cosine to 0")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--clip", type=float, default=2.0, help="clip the gradients' total norm (0: off)")
    ap.add_argument("--budgets", type=float, nargs=2, default=(0.02, 1.0), metavar=("SMALLEST", "LARGEST"),
                    help="shares of the factorizable bytes sampled between (sandwich rule)")
    ap.add_argument("--samples", type=int, default=2, help="random budgets per step besides the smallest and largest")
    ap.add_argument("--fixed-budget", type=float, help="train one factorized model for this share only (the baseline)")
    ap.add_argument("--levels", type=int, default=32)
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--rescore", action="store_true", help="re-measure the ladder losses after every epoch")
    ap.add_argument("--train", type=int, default=60000, help="training images (a prefix of a fixed shuffle)")
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--time-dense", type=int, default=0, metavar="STEPS",
                    help="also time plain dense training over this many steps")
    ap.add_argument("--backend", default="onnxruntime", help="backend the artifact is evaluated with")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    np.random.seed(0)
    xtr, ytr = load("train")
    order = np.random.default_rng(0).permutation(len(xtr))[: args.train]
    xtr, ytr = xtr[order], ytr[order]
    xte, yte = load("test")
    xte, yte = xte[: args.test], yte[: args.test]
    cal = torch.from_numpy(xtr[: args.calibration])
    dense = ResNet20()
    dense.load_state_dict(torch.load(args.model, weights_only=True))
    dense.eval()
    result: dict = {"command": " ".join(["python", "tools/train_fmnist_ladder.py", *sys.argv[1:]]),
                    "args": vars(args), "dense_accuracy": accuracy(dense, xte, yte)}
    if args.time_dense:
        result["dense_minutes_per_epoch"] = dense_epoch_minutes(ResNet20(), xtr, ytr, args.batch, args.time_dense)
        print(f"dense training: {result['dense_minutes_per_epoch']:.2f} min/epoch", flush=True)

    ckpt_path = out / "checkpoint.pt"
    t0 = time.perf_counter()
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    ladder = ckpt.ladder if ckpt else ladder_model(dense, cal[:1], calibration=cal, levels=args.levels)
    result["convert_seconds"] = time.perf_counter() - t0
    low, high = (args.fixed_budget,) * 2 if args.fixed_budget else args.budgets
    trainer = NestedTruncation(ladder, (share_bytes(ladder, low), share_bytes(ladder, high)), args.samples)
    opt = torch.optim.SGD(ladder.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
    steps = args.epochs * -(-len(xtr) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    if ckpt:
        ckpt.restore(optimizer=opt, scheduler=sched, trainer=trainer)
        print(f"resumed at epoch {trainer.epoch}, batch {trainer.batch}", flush=True)
    start_epoch = trainer.epoch
    t0 = time.perf_counter()
    trainer.fit(torch.from_numpy(xtr), torch.from_numpy(ytr), args.epochs, opt, batch_size=args.batch,
                augment=augment, scheduler=sched, checkpoint=ckpt_path, checkpoint_every=args.checkpoint_every,
                rescore=cal if args.rescore else None, max_grad_norm=args.clip or None)
    if trainer.epoch > start_epoch:
        result["minutes_per_epoch"] = (time.perf_counter() - t0) / 60 / (trainer.epoch - start_epoch)
    ladder.eval()
    result["torch"] = {}
    for share in BUDGETS:
        try:
            with ladder.at_budget(share_bytes(ladder, share)):
                result["torch"][str(share)] = accuracy(ladder, xte, yte)
        except BudgetError:
            result["torch"][str(share)] = None
        print(f"trained model (torch, planned with the training ladders) {share:.0%}: {result['torch'][str(share)]}", flush=True)
    t0 = time.perf_counter()
    options = {"precision": "float32"} if "precision" in inspect.signature(bake).parameters else {}
    bake_trained(ladder, out / "model.stn", calibration=cal, **options)
    result["bake_seconds"] = time.perf_counter() - t0
    result["artifact"] = artifact_accuracy(out / "model.stn", ladder, xte, yte, args.backend)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("artifact", "args")}), flush=True)


if __name__ == "__main__":
    main()
