"""compress(): a fixed-size factorized PyTorch module that equals the runtime and trains."""
from __future__ import annotations

import numpy as np
import torch

from stn_edge.device import Runtime
from stn_edge.host import bake
from stn_edge.host.compress import compress
from zoo import DigitsMLP, load_digits, quick_train


def test_compressed_module_matches_runtime_and_trains(tmp_path):
    xtr, ytr, xte, yte = load_digits()
    model = quick_train(DigitsMLP(), xtr, ytr, epochs=2)
    cal = torch.from_numpy(xtr[:64])
    small = compress(model, "30%", cal[:1], calibration=cal)
    dense_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < 0.45 * dense_params
    path = tmp_path / "m.stn"
    bake(model, cal[:1], path, calibration=cal, progress=False)
    with Runtime.load(path, mem_limit="30%", backend="numpy") as rt:
        ref = rt.run(xte[:40])["output"]
        assert [c.rank for c in rt.plan.layers] == [c.rank for c in small.plan.layers]
    with torch.no_grad():
        out = small(torch.from_numpy(xte[:40])).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    # it trains: one step lowers the loss on the batch it saw
    opt = torch.optim.SGD(small.parameters(), lr=0.05)
    x, y = torch.from_numpy(xtr[:128]), torch.from_numpy(ytr[:128])
    before = float(torch.nn.functional.cross_entropy(small(x), y).detach())
    loss = torch.nn.functional.cross_entropy(small(x), y)
    loss.backward()
    assert all(p.grad is not None for p in small.parameters())
    opt.step()
    after = float(torch.nn.functional.cross_entropy(small(x), y).detach())
    assert after < before
