"""Trained ladders (issue 13): the factorized model trains at every truncation, and bakes as trained."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from stn_edge.device import Runtime
from stn_edge.host.bake import bake
from stn_edge.host.decompositions import search_families
from stn_edge.host.decompositions.common import Decomposition
from stn_edge.host.decompositions.cp import decompose_cp
from stn_edge.host.decompositions.fctn import decompose_fctn
from stn_edge.host.decompositions.spatial import decompose_spatial
from stn_edge.host.decompositions.svd import decompose_svd
from stn_edge.host.decompositions.tr import decompose_tr
from stn_edge.host.decompositions.tt import decompose_tt
from stn_edge.host.decompositions.tucker import decompose_tucker2
from stn_edge.host.ladder_training import (NestedTruncation, bake_trained, canonical_factors, ladder_model,
                                           level_factors, load_checkpoint, save_checkpoint, stored_factors)
from zoo import DigitsMLP, DigitsResNet, load_digits, quick_train

#: float32 factors where bake offers nested precision (rank the only axis: outputs comparable exactly)
FLOAT32 = {"precision": "float32"} if "precision" in inspect.signature(bake).parameters else {}


def _weight(shape, rank=4, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, int(np.prod(shape[1:]))))
    return (m + 0.05 * rng.standard_normal(m.shape)).reshape(shape).astype(np.float32)


CASES = [
    ("svd conv", lambda: decompose_svd(_weight((16, 8, 3, 3)), "conv", levels=6)),
    ("svd linear", lambda: decompose_svd(_weight((24, 32)), "linear", "out_in", levels=6)),
    ("svd in_out", lambda: decompose_svd(_weight((32, 24)), "linear", "in_out", levels=6)),
    ("spatial h", lambda: decompose_spatial(_weight((16, 8, 3, 3)), 6, "h")),
    ("spatial w", lambda: decompose_spatial(_weight((16, 8, 3, 3)), 6, "w")),
    ("cp", lambda: decompose_cp(_weight((16, 8, 3, 3)), 6)),
    ("tucker2", lambda: decompose_tucker2(_weight((16, 8, 3, 3)), 6)),
    ("tt conv", lambda: decompose_tt(_weight((16, 8, 3, 3)), "conv", levels=6)),
    ("tt linear d2", lambda: decompose_tt(_weight((24, 32)), "linear", "out_in", 6, d=2)),
    ("tt linear d3", lambda: decompose_tt(_weight((64, 32)), "linear", "in_out", 6, d=3)),
    ("tr", lambda: decompose_tr(_weight((16, 8, 3, 3)), 6)),
    ("fctn", lambda: decompose_fctn(_weight((16, 8, 3, 3)), 6)),
]


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
def test_torch_form_equals_the_contract_at_every_level(name, make):
    """A family's torch form of any (trained) factors, cut to a level, is the weight the device rebuilds
    from the stored rows of that level; canonical <-> storage round-trips bit for bit."""
    dec = make()
    form = next(f.torch_weight for f in search_families() if f.name == dec.family)
    canonical = canonical_factors(dec)
    assert all(np.array_equal(v, dec.factors[k]) for k, v in stored_factors(dec, canonical).items())
    rng = np.random.default_rng(1)
    trained = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in canonical.items()}
    moved = Decomposition(dec.family, dec.kind, dec.layout, dec.shape, dec.structure, stored_factors(dec, trained),
                          dec.row_ends, dec.ranks, dec.bonds, dec.max_rank, dec.errors)
    meta = dec.layer()
    for j in range(dec.levels):
        got = form(meta, level_factors(dec, {k: torch.from_numpy(v) for k, v in trained.items()}, j)).numpy()
        np.testing.assert_allclose(got, moved.truncated(j), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A small digits CNN trained normally, its ladder as converted, and the same ladder after 4 epochs of
    the recipe."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = quick_train(DigitsResNet(width=16), xtr, ytr, epochs=6)
    cal = torch.from_numpy(xtr[:128])
    converted = ladder_model(model, cal[:1], calibration=cal, levels=16, progress=False)
    path = tmp_path_factory.mktemp("ladder") / "converted.pt"
    save_checkpoint(path, converted)
    ladder = load_checkpoint(path).ladder
    trainer = NestedTruncation(ladder, budgets=(0.0, 1.0), samples=2)
    opt = torch.optim.Adam(ladder.parameters(), lr=1e-3)
    trainer.fit(torch.from_numpy(xtr), torch.from_numpy(ytr), 4, opt, batch_size=64, rescore=cal, progress=False)
    return converted, ladder.eval(), cal


def _artifact_accuracy(path, share, x, y):
    with Runtime.load(path, mem_limit=share, backend="numpy", batch_size=len(x)) as rt:
        return float((rt.run({"input": x})["output"].argmax(1) == y).mean())


def test_recipe_beats_the_normally_trained_model_at_small_budgets(trained, digits, tmp_path):
    """Baked from trained factors, the recipe's artifact keeps far more accuracy at a small budget than the
    normally trained model's (same structure, same ladder), and stays close to dense at full size."""
    converted, ladder, cal = trained
    _, _, xte, yte = digits
    bake_trained(converted, tmp_path / "plain.stn", calibration=cal, **FLOAT32)
    bake_trained(ladder, tmp_path / "recipe.stn", calibration=cal, **FLOAT32)
    plain = {s: _artifact_accuracy(tmp_path / "plain.stn", s, xte, yte) for s in ("100%", "20%", "12%")}
    recipe = {s: _artifact_accuracy(tmp_path / "recipe.stn", s, xte, yte) for s in ("100%", "20%", "12%")}
    assert recipe["100%"] >= plain["100%"] - 0.02
    assert recipe["20%"] >= plain["20%"] + 0.05, (plain, recipe)
    assert recipe["12%"] >= plain["12%"] + 0.15, (plain, recipe)
    assert recipe["20%"] >= 0.9, recipe


def test_artifact_runs_the_trained_factors(trained, digits, tmp_path):
    """What was trained is what is shipped: at the levels a device plans, the artifact's outputs are the
    trained torch model's at those levels."""
    _, ladder, cal = trained
    _, _, xte, _ = digits
    x = xte[:32]
    bake_trained(ladder, tmp_path / "m.stn", calibration=cal, **FLOAT32)
    seen = set()
    for share in ("60%", "25%", "12%"):
        with Runtime.load(tmp_path / "m.stn", mem_limit=share, backend="numpy", batch_size=len(x)) as rt:
            got = rt.run({"input": x})["output"]
            chosen = {c.name: c.level for c in rt.plan.layers}
        levels = [chosen[m["name"]] for m in ladder.metas]
        seen.update(l for l in levels if l is not None)
        with torch.no_grad(), ladder.at(levels):
            want = ladder(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert len(seen) >= 3  # several truncation levels were compared, not only dense layers


def _mlp_ladder(path):
    xtr, ytr, _, _ = load_digits()
    torch.manual_seed(0)
    model = quick_train(DigitsMLP(hidden=64), xtr, ytr, epochs=1)
    cal = torch.from_numpy(xtr[:64])
    ladder = ladder_model(model, cal[:1], calibration=cal, levels=8, structure="svd", progress=False)
    save_checkpoint(path, ladder)
    return xtr, ytr


def test_checkpoint_resume_gives_identical_results(tmp_path):
    """Stopping after an epoch and resuming from the checkpoint ends with the very same parameters."""
    xtr, ytr = _mlp_ladder(tmp_path / "start.pt")
    x, y = torch.from_numpy(xtr[:256]), torch.from_numpy(ytr[:256])

    def run(epochs, ckpt=None, resume=None):
        c = load_checkpoint(resume or tmp_path / "start.pt")
        opt = torch.optim.SGD(c.ladder.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 5, 0.5)
        trainer = NestedTruncation(c.ladder, (0.1, 1.0), samples=1, seed=3)
        if resume:
            c.restore(optimizer=opt, scheduler=sched, trainer=trainer)
        trainer.fit(x, y, epochs, opt, batch_size=64, scheduler=sched, checkpoint=ckpt, progress=False)
        return c.ladder

    straight = run(2)
    run(1, ckpt=tmp_path / "half.pt")
    resumed = run(2, resume=tmp_path / "half.pt")
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert any(not torch.equal(a, b) for a, b in zip(straight.state_dict().values(),
                                                      load_checkpoint(tmp_path / "start.pt").ladder.state_dict().values()))


DDP_SCRIPT = textwrap.dedent('''
    import os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from stn_edge.host.ladder_training import NestedTruncation, load_checkpoint

    start, data, out = sys.argv[1:4]
    x, y = torch.load(data, weights_only=True)
    ladder = load_checkpoint(start).ladder
    ddp = os.environ.get("WORLD_SIZE")
    if ddp:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        net = DDP(ladder)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    trainer = NestedTruncation(ladder, (0.1, 1.0), samples=2, forward=net if ddp else None, seed=5)
    opt = torch.optim.SGD(ladder.parameters(), lr=0.05)
    for _ in range(3):
        loss = trainer.step_loss((x,), lambda o: torch.nn.functional.cross_entropy(o, y))
        opt.zero_grad(); loss.backward(); opt.step()
    if not ddp or rank == 0:
        torch.save(ladder.state_dict(), out)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # gloo's threads can abort during interpreter teardown, after the work is saved
''')


def test_distributed_matches_single_process(tmp_path):
    """Two DDP processes (gloo), each on half of every batch, end with the single process's parameters:
    every rank samples the same budgets and plans the same levels."""
    xtr, ytr = _mlp_ladder(tmp_path / "start.pt")
    torch.save((torch.from_numpy(xtr[:32]), torch.from_numpy(ytr[:32])), tmp_path / "data.pt")
    script = tmp_path / "ddp_ladder.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [str(tmp_path / "start.pt"), str(tmp_path / "data.pt")]
    single = subprocess.run([sys.executable, str(script), *args, str(tmp_path / "single.pt")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                          *args, str(tmp_path / "ddp.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = torch.load(tmp_path / "single.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp.pt", weights_only=True)
    start = load_checkpoint(tmp_path / "start.pt").ladder.state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
