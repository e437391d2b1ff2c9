"""``stn-edge demo``: train, bake and load at several budgets, on data that ships with scikit-learn.

A small residual CNN with BatchNorm learns scikit-learn's bundled 8x8 digits with the low-rank
regularizer on, is baked into one artifact, and that one artifact is loaded at 100/50/25/10% of its
full bytes. Nothing is downloaded.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stn_edge.host.bake import bake
from stn_edge.host.regularizer import LowRankRegularizer
from stn_edge.plan import format_bytes, format_table


class Block(nn.Module):
    """A basic residual block: conv-bn-relu-conv-bn plus a (projected) skip."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class DigitsResNet(nn.Module):
    """Input ``(N, 1, 8, 8)`` digits, output ``(N, 10)`` logits."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(Block(width, width), Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def load_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits as float32 ``(N, 1, 8, 8)`` in [0, 1]; an 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30, strength: float = 2e-4,
          seed: int = 0, log=print) -> None:
    """Adam with the low-rank regularizer (sub-gradient form), light shift augmentation."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # the augmentation's shifts: the demo's numbers repeat run to run
    reg = LowRankRegularizer(model, strength=strength)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(x) + 63) // 64))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt))
        total = 0.0
        for i in range(0, len(xt), 64):
            b = perm[i:i + 64]
            xb = torch.roll(xt[b], shifts=tuple(np.random.randint(-1, 2, size=2)), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), yt[b]) + reg()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        if epoch % 5 == 4 or epoch == epochs - 1:
            log(f"[train] epoch {epoch + 1}/{epochs} loss {total / len(xt):.3f}")
    model.eval()


def finetune(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 4, log=print) -> None:
    """Budget-sampled fine-tuning: train through the truncations the planner picks at sampled budgets."""
    from stn_edge.host.finetune import BudgetSampledFinetuner, recalibrate_batchnorm

    ft = BudgetSampledFinetuner(model, budgets=(0.08, 1.0))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ft.fit(xt, yt, epochs, log=log)
    ft.finish()
    recalibrate_batchnorm(model, (xt[i:i + 128] for i in range(0, len(xt), 128)))
    model.eval()


def accuracy(run, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(run(x), axis=1) == y))


def median_latency_ms(fn, x: np.ndarray, repeats: int = 50) -> float:
    for _ in range(5):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def run_demo(budgets=("100%", "50%", "25%", "10%"), backend: str = "auto", out: str | None = None,
             epochs: int = 20, finetune_epochs: int = 3, quiet: bool = False) -> list[dict]:
    """Train, bake, load at each budget; print and return one row per budget."""
    from stn_edge.device import Runtime
    from stn_edge.errors import BudgetError

    log = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    xtr, ytr, xte, yte = load_digits()
    model = DigitsResNet()
    log(f"[demo] training a residual CNN ({sum(p.numel() for p in model.parameters())} parameters) on "
        f"{len(xtr)} scikit-learn digits with the low-rank regularizer")
    train(model, xtr, ytr, epochs=epochs, log=log)
    if finetune_epochs:
        log("[demo] budget-sampled fine-tuning (each step trains through truncations at sampled budgets)")
        finetune(model, xtr, ytr, epochs=finetune_epochs, log=log)
    with torch.no_grad():
        dense_acc = float((model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    log(f"[demo] dense PyTorch accuracy {dense_acc:.1%}")
    with tempfile.TemporaryDirectory(prefix="stn-demo-") as tmp:  # removed after, unless out keeps it
        path = Path(out) if out else Path(tmp) / "digits.stn"
        path.parent.mkdir(parents=True, exist_ok=True)
        # structure search per layer: the most accuracy per byte, for ~25 s more bake (docs/RESULTS.md, 1)
        report = bake(model, torch.from_numpy(xtr[:1]), path, calibration=torch.from_numpy(xtr[:256]), score_samples=64,
                      structure="auto", progress=not quiet)
        rows = []
        for budget in budgets:
            try:
                rt = Runtime.load(path, mem_limit=budget, backend=backend, batch_size=len(xte))  # the test set runs whole
            except BudgetError as exc:
                rows.append({"budget": budget, "error": str(exc)})
                continue
            with rt:
                run = lambda x: rt.run({"input": x})["output"]
                ranks = [c.rank / c.max_rank for c in rt.plan.layers if not c.dense]
                rows.append({
                    "budget": budget, "bytes_held": rt.plan.total_bytes, "bytes_read": rt.bytes_read,
                    "factorized": f"{len(ranks)}/{len(rt.plan.layers)}",
                    "rank_kept": f"{min(ranks):.0%}..{max(ranks):.0%}" if ranks else "dense",
                    "accuracy": accuracy(run, xte, yte), "latency_ms": median_latency_ms(run, xte[:1]), "backend": rt.backend,
                })
    table = [("budget", "bytes held", "layers factorized", "rank kept", "accuracy", "p50 latency (batch 1)")]
    for r in rows:
        if "error" in r:
            table.append((r["budget"], "infeasible", "", "", "", ""))
            continue
        table.append((r["budget"], format_bytes(r["bytes_held"]), r["factorized"], r["rank_kept"],
                      f"{r['accuracy']:.1%}", f"{r['latency_ms']:.2f} ms"))
    print(f"\nartifact {path if out else '(temporary)'} ({format_bytes(report.artifact_bytes)}); dense model "
          f"{format_bytes(report.full_bytes)}, dense accuracy {dense_acc:.1%}, backend {rows[0].get('backend', backend)}\n")
    print(format_table(table))
    if out:
        print(f"\nkept {path}; go on with:\n  stn-edge inspect {path}\n  stn-edge plan {path} --mem-limit 25%\n"
              f"  stn-edge run {path} --mem-limit 25%\n  stn-edge profile {path}")
    return rows
