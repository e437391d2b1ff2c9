"""The low-rank regularizer: it lowers rank, its proximal step is exact, and it is DDP-correct."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from stn_edge.host.regularizer import LowRankRegularizer, _fold, unfold


@pytest.mark.parametrize("how", ["out", "in", "spatial"])
def test_fold_inverts_unfold(how):
    w = torch.randn(6, 4, 3, 5)
    assert torch.equal(_fold(unfold(w, how)[0], how, w.shape), w)


def test_modes_unfoldings_cover_pairs():
    w = torch.randn(12, 8, 3, 3)  # out 3x4, in 2x4, k 9: 5 modes, 10 pairs
    mats = unfold(w, "modes")
    assert len(mats) == 10
    assert all(m.numel() == w.numel() for m in mats)


def test_penalty_equals_nuclear_norm_sum():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 32))
    reg = LowRankRegularizer(model, strength=0.5, unfoldings=("out",), min_params=0)
    expected = sum(torch.linalg.matrix_norm(m.weight.reshape(m.weight.shape[0], -1), ord="nuc")
                   for m in (model[0], model[2]))
    assert float(reg().detach()) == pytest.approx(0.5 * float(expected), rel=1e-5)


def test_prox_is_singular_value_thresholding():
    lin = nn.Linear(20, 10)
    reg = LowRankRegularizer(lin, strength=2.0, min_params=0)
    s_before = torch.linalg.svdvals(lin.weight.detach()).clone()
    reg.prox_(lr=0.1)
    s_after = torch.linalg.svdvals(lin.weight.detach())
    np.testing.assert_allclose(s_after.numpy(), (s_before - 0.2).clamp_min(0).numpy(), atol=1e-5)


def test_training_with_regularizer_concentrates_spectrum():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    y = (x[:, :4] @ torch.randn(4, 8))  # a rank-4 target
    energy = {}
    for strength in (0.0, 3e-3):
        torch.manual_seed(1)
        lin = nn.Linear(32, 8)
        reg = LowRankRegularizer(lin, strength=strength, min_params=0)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
        for _ in range(300):
            loss = nn.functional.mse_loss(lin(x), y + 0.3 * torch.randn_like(y)) + reg()
            opt.zero_grad()
            loss.backward()
            opt.step()
        s = torch.linalg.svdvals(lin.weight.detach())
        energy[strength] = float((s[:4] ** 2).sum() / (s ** 2).sum())
    assert energy[3e-3] > energy[0.0]
    assert energy[3e-3] > 0.999


DDP_SCRIPT = textwrap.dedent('''
    import os, sys, torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    from stn_edge.host.regularizer import LowRankRegularizer

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)

    out = sys.argv[1]
    x, y = data()
    if os.environ.get("WORLD_SIZE"):
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        model = make()
        ddp = DDP(model)
        reg = LowRankRegularizer(model, strength=1e-2, unfoldings=("out", "in"), min_params=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        for _ in range(3):
            loss = nn.functional.cross_entropy(ddp(xs), ys) + reg()
            opt.zero_grad(); loss.backward(); opt.step()
        if rank == 0:
            torch.save(model.state_dict(), out)
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        # skip interpreter teardown: gloo's threads can abort ("terminate called without an active
        # exception") while C++ statics are destroyed, after all the work is done and saved
        os._exit(0)
    else:
        model = make()
        reg = LowRankRegularizer(model, strength=1e-2, unfoldings=("out", "in"), min_params=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x), y) + reg()
            opt.zero_grad(); loss.backward(); opt.step()
        torch.save(model.state_dict(), out)
''')


def test_distributed_matches_single_process(tmp_path):
    script = tmp_path / "ddp_reg.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single.pt")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "ddp.pt")],
                         capture_output=True, text=True, env=env, timeout=180)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = torch.load(tmp_path / "single.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
