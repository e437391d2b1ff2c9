"""Bake time of an 11M-parameter ResNet-18-shaped model on this machine, structure search included.

    python tools/bake_time.py --importance spectral
    python tools/bake_time.py --importance data --calibration 8

Random weights with a decaying spectrum (trained weights are near-low-rank; random ones are the slow
case for the structure search's iterative families). Input 3x64x64.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.sc = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.sc(x))


class ResNet18(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


def main() -> None:
    from stn_edge.host import bake

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--importance", default="spectral", choices=("spectral", "data"))
    ap.add_argument("--structure", default="auto")
    ap.add_argument("--calibration", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = ResNet18().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight.reshape(m.weight.shape[0], -1)
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                m.weight.copy_(((u * (s * torch.logspace(0, -3, len(s)))) @ vh).reshape(m.weight.shape))
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.calibration, 3, 64, 64)
    path = Path(tempfile.mkdtemp()) / "r18.stn"
    t0 = time.perf_counter()
    report = bake(model, x[:1], path, calibration=x, structure=args.structure, importance=args.importance,
                  score_samples=args.calibration, progress=False)
    seconds = time.perf_counter() - t0
    families = {}
    for l in report.layers:
        families[l.family] = families.get(l.family, 0) + 1
    print(json.dumps({"parameters": params, "seconds": round(seconds, 1), "importance": args.importance,
                      "structure": args.structure, "families": families, "artifact_bytes": report.artifact_bytes}))


if __name__ == "__main__":
    main()
