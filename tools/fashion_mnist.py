"""ResNet-20 on full Fashion-MNIST: data, model, training. Used by the results scripts.

Data comes from the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``,
files under /usr/share/datasets/fashion-mnist/); nothing is downloaded.

    python tools/fashion_mnist.py train --out out/fmnist/dense.pt --epochs 3
    python tools/fashion_mnist.py train --out out/fmnist/stn.pt --init out/fmnist/dense.pt --epochs 2 --reg 5e-4
"""
from __future__ import annotations

import argparse
import gzip
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

DATA = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
    return np.frombuffer(data, np.uint8, offset=8)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x (N, 1, 28, 28) float32 normalized, y (N,) int64)`` for ``train`` or ``test``."""
    prefix = "train" if split == "train" else "t10k"
    if not (DATA / f"{prefix}-images-idx3-ubyte.gz").exists():
        sys.exit(f"Fashion-MNIST not found under {DATA}: apt-get install dataset-fashion-mnist")
    x = _idx(DATA / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    y = _idx(DATA / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return ((x - MEAN) / STD)[:, None].copy(), y.copy()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels) for 1-channel 28x28 input."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        blocks, cin = [], w
        for cout, stride in ((w, 1), (2 * w, 2), (4 * w, 2)):
            for i in range(3):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random 2-pixel shifts and horizontal flips."""
    if np.random.rand() < 0.5:
        x = x.flip(3)
    dx, dy = np.random.randint(-2, 3, size=2)
    return torch.roll(x, shifts=(int(dx), int(dy)), dims=(2, 3))


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: float, lr: float = 0.1, reg_strength: float = 0.0,
          batch: int = 128, log=print, budget_sampled: bool = False) -> dict:
    """SGD + momentum with a one-cycle schedule; the low-rank regularizer when ``reg_strength`` > 0;
    budget-sampled fine-tuning (training through sampled truncations) when ``budget_sampled``."""
    from stn_edge.host.finetune import BudgetSampledFinetuner
    from stn_edge.host.regularizer import LowRankRegularizer

    reg = LowRankRegularizer(model, strength=reg_strength) if reg_strength > 0 else None
    ft = BudgetSampledFinetuner(model, budgets=(0.05, 1.0)) if budget_sampled else None
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = int(epochs * (len(x) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t0, seen, reg_time = time.perf_counter(), 0, 0.0
    for epoch in range(int(np.ceil(epochs))):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt) - batch + 1, batch):
            if seen >= steps:
                break
            b = perm[i:i + batch]
            xb = augment(xt[b])
            if ft is not None:
                loss = ft.step_loss(lambda m: nn.functional.cross_entropy(m(xb), yt[b]))
            else:
                loss = nn.functional.cross_entropy(model(xb), yt[b])
            if reg is not None:
                tr = time.perf_counter()
                loss = loss + reg()
                reg_time += time.perf_counter() - tr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += 1
            if seen % 100 == 0:
                log(f"epoch {epoch + 1} step {seen}/{steps} loss {float(loss):.3f} ({time.perf_counter() - t0:.0f} s)")
    if ft is not None:
        from stn_edge.host.finetune import recalibrate_batchnorm

        ft.finish()
        recalibrate_batchnorm(model, (xt[perm[i:i + batch]] for i in range(0, 100 * batch, batch)))
    return {"seconds": time.perf_counter() - t0, "steps": seen, "regularizer_seconds": reg_time}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", help="start from this state dict")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--budget-sampled", action="store_true", help="train through sampled truncations (sandwich rule)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--reg", type=float, default=0.0, help="low-rank regularizer strength (0: off)")
    args = ap.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    xtr, ytr = load("train")
    xte, yte = load("test")
    model = ResNet20()
    if args.init:
        model.load_state_dict(torch.load(args.init, weights_only=True))
    log = lambda m: print(m, flush=True)
    stats = train(model, xtr, ytr, args.epochs, lr=args.lr, reg_strength=args.reg, log=log,
                  budget_sampled=args.budget_sampled)
    acc = evaluate(model, xte, yte)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    log(f"test accuracy {acc:.4f}; {stats}")
    Path(args.out).with_suffix(".json").write_text(__import__("json").dumps({"test_accuracy": acc, **stats, **vars(args)}))


if __name__ == "__main__":
    main()
