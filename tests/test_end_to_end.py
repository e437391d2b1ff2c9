"""Bake real networks on real data, load at several budgets, run on every CPU backend."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from stn_edge.device import Runtime, relative_error
from stn_edge.errors import BackendError, BudgetError, InputError
from stn_edge.host import bake
from zoo import DigitsMLP, DigitsResNet, ONet, lfw_faces, load_digits, pretrained, quick_train

BUDGETS = ["100%", "50%", "25%", "10%"]
BACKENDS = ["numpy", "onnxruntime"]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory, digits):
    xtr, ytr, _, _ = digits
    model = quick_train(DigitsMLP(), xtr, ytr)
    path = tmp_path_factory.mktemp("mlp") / "mlp.stn"
    bake(model, torch.from_numpy(xtr[:1]), path, calibration=torch.from_numpy(xtr[:64]), progress=False)
    return model, path


@pytest.fixture(scope="module")
def cnn_artifact(tmp_path_factory, digits):
    xtr, ytr, _, _ = digits
    model = quick_train(DigitsResNet(width=16), xtr, ytr, epochs=2)
    path = tmp_path_factory.mktemp("cnn") / "cnn.stn"
    bake(model, torch.from_numpy(xtr[:1]), path, calibration=torch.from_numpy(xtr[:64]), progress=False)
    return model, path


def _torch_out(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("which", ["mlp_artifact", "cnn_artifact"])
def test_full_budget_matches_pytorch(request, digits, which):
    model, path = request.getfixturevalue(which)
    x = digits[2][:50]
    ref = _torch_out(model, x)
    for backend in BACKENDS:
        with Runtime.load(path, backend=backend) as rt:
            assert all(c.dense for c in rt.plan.layers)
            assert relative_error(rt.run({"input": x})["output"], ref) < 1e-4


@pytest.mark.parametrize("which", ["mlp_artifact", "cnn_artifact"])
def test_backends_agree_at_every_budget(request, digits, which):
    _, path = request.getfixturevalue(which)
    x = digits[2][:50]
    for budget in BUDGETS:
        outs = {}
        for backend in BACKENDS:
            with Runtime.load(path, mem_limit=budget, backend=backend) as rt:
                assert rt.plan.total_bytes <= rt.plan.budget
                outs[backend] = rt.run({"input": x})["output"]
        assert relative_error(outs["onnxruntime"], outs["numpy"]) < 1e-4, budget


def test_accuracy_degrades_gracefully(digits, mlp_artifact):
    model, path = mlp_artifact
    _, _, xte, yte = digits
    dense_acc = float(np.mean(_torch_out(model, xte).argmax(1) == yte))
    accs = []
    for budget in BUDGETS:
        with Runtime.load(path, mem_limit=budget, backend="numpy") as rt:
            accs.append(float(np.mean(rt.run(xte)["output"].argmax(1) == yte)))
    assert accs[0] == pytest.approx(dense_acc, abs=1e-9)
    assert accs[1] >= dense_acc - 0.03  # half the bytes of a trained MLP costs little accuracy
    assert accs[-1] > 0.3  # far above chance (0.1) at a tenth of the bytes


class CountingFile(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.served = 0

    def read(self, n=-1):
        out = super().read(n)
        self.served += len(out)
        return out


def test_load_reads_only_planned_bytes(cnn_artifact):
    _, path = cnn_artifact
    data = path.read_bytes()
    for budget in BUDGETS:
        f = CountingFile(data)
        rt = Runtime.load(f, mem_limit=budget, backend="numpy")
        header_bytes = 48 + len(rt._reader.header and b"") + (rt._reader.data_start - 48)
        # preamble + header (without the alignment padding) + exactly the planned weights
        assert f.served == rt.bytes_read
        assert rt.bytes_read - rt.plan.total_bytes <= header_bytes
        assert rt.bytes_read >= rt.plan.total_bytes
        assert rt.bytes_read < 0.2 * len(data) + rt.plan.total_bytes


def _missing_bytes(old, new, layers) -> int:
    """Bytes a move from plan ``old`` to plan ``new`` must read: what ``new`` holds that ``old`` does not.

    A factorized level's bytes include its correction row (scale and shift per channel); a level
    change reads the new row whichever way it goes, and the output factor ``b`` (which holds the
    correction's scale) again from its first row.
    """
    total = 0
    for a, b, layer in zip(old.layers, new.layers, layers):
        corr_row = layer["corrections"]["blocks"][0]["size"] if "corrections" in layer else 0
        if b.dense:
            total += 0 if a.dense else b.bytes
        elif a.dense:
            total += b.bytes
        elif b.level != a.level:
            rows_b = layer["factors"]["b"]["blocks"]
            b_new = sum(blk["size"] for blk in rows_b[: b.level + 1])
            b_old = sum(blk["size"] for blk in rows_b[: a.level + 1])
            a_diff = max(b.bytes - a.bytes - (b_new - b_old), 0)
            total += a_diff + corr_row + (b_new if "corrections" in layer else max(b_new - b_old, 0))
    return total


def test_rescale_reads_only_missing_bytes_and_matches_fresh_load(digits, cnn_artifact):
    _, path = cnn_artifact
    x = digits[2][:20]
    rt = Runtime.load(path, mem_limit="25%", backend="numpy")
    low = rt.plan
    before = rt.bytes_read
    high = rt.rescale("50%")
    assert rt.bytes_read - before == _missing_bytes(low, high, rt.layers)
    with Runtime.load(path, mem_limit="50%", backend="numpy") as fresh:
        np.testing.assert_allclose(rt.run(x)["output"], fresh.run(x)["output"], rtol=1e-5, atol=1e-6)
    before = rt.bytes_read
    down = rt.rescale("25%")
    # going down reads no factor rows, only layers that were dense and a correction row per level change
    assert rt.bytes_read - before == _missing_bytes(high, down, rt.layers)
    with Runtime.load(path, mem_limit="25%", backend="numpy") as fresh:
        np.testing.assert_allclose(rt.run(x)["output"], fresh.run(x)["output"], rtol=1e-5, atol=1e-6)


def test_infeasible_budget_names_smallest(cnn_artifact):
    _, path = cnn_artifact
    with pytest.raises(BudgetError, match="smallest feasible") as info:
        Runtime.load(path, mem_limit=1000, backend="numpy")
    smallest = info.value.smallest_feasible
    with Runtime.load(path, mem_limit=smallest, backend="numpy") as rt:
        # the smallest model's weights (numpy keeps one copy) + its activations (x 1.1)
        assert rt.footprint() == smallest and rt.plan.total_bytes < smallest
        assert rt.plan.activation_bytes > 0


def test_bad_inputs_are_typed_errors(mlp_artifact):
    _, path = mlp_artifact
    with Runtime.load(path, backend="numpy") as rt:
        with pytest.raises(InputError, match=r"shape \[2, 1, 9, 8\].*expects \['batch', 1, 8, 8\]"):
            rt.run(np.zeros((2, 1, 9, 8), np.float32))
        with pytest.raises(InputError, match="dtype int32"):
            rt.run(np.zeros((2, 1, 8, 8), np.int32))
        with pytest.raises(InputError, match="missing input 'input'"):
            rt.run({})
        with pytest.raises(InputError, match="unknown input"):
            rt.run({"input": np.zeros((1, 1, 8, 8), np.float32), "extra": np.zeros(1)})
        # float64 is accepted and cast (same kind)
        assert rt.run(np.zeros((3, 1, 8, 8)))["output"].shape == (3, 10)


def test_unknown_backend_lists_available(mlp_artifact):
    _, path = mlp_artifact
    with pytest.raises(BackendError, match="unknown backend 'tpu'; available: numpy, onnxruntime"):
        Runtime.load(path, backend="tpu")


def test_verify_uses_stored_calibration(cnn_artifact):
    _, path = cnn_artifact
    with Runtime.load(path, backend="numpy") as rt:
        assert max(rt.verify().values()) < 1e-4
    with Runtime.load(path, mem_limit="10%", backend="numpy") as rt:
        assert max(rt.verify().values()) > 1e-4  # truncation shows up against the full-rank reference


def test_batchnorm_folded_and_layers_found(cnn_artifact):
    _, path = cnn_artifact
    with Runtime.load(path, backend="numpy") as rt:
        ops = {n["op"] for n in rt.header["model"]["nodes"]}
        assert "BatchNormalization" not in ops
        names = [l["name"] for l in rt.layers]
        assert "layers.0.conv1" in names and "layers.2.conv2" in names
        skipped = {s["weight"]: s["reason"] for s in rt.header["skipped"]}
        assert skipped["layers.1.skip.0"].startswith("too small (2048 bytes")


@pytest.fixture(scope="module")
def onet_artifact(tmp_path_factory):
    model = pretrained(ONet, "onet")
    x, y = lfw_faces(48)
    path = tmp_path_factory.mktemp("onet") / "onet.stn"
    bake(model, torch.from_numpy(x[:1]), path, calibration=torch.from_numpy(x[::4]), progress=False,
         output_names=["box", "landmarks", "face_prob"])
    return model, path, x, y


def test_pretrained_onet_full_budget_matches_and_keeps_accuracy(onet_artifact):
    model, path, x, y = onet_artifact
    with torch.no_grad():
        refs = [t.numpy() for t in model(torch.from_numpy(x))]
    for backend in BACKENDS:
        with Runtime.load(path, backend=backend) as rt:
            out = rt.run(x)
            for name, ref in zip(["box", "landmarks", "face_prob"], refs):
                assert relative_error(out[name], ref) < 1e-4, (backend, name)
    with Runtime.load(path, mem_limit="50%", backend="numpy") as rt:
        acc = float(np.mean((rt.run(x)["face_prob"][:, 1] > 0.5) == y))
    assert acc >= 0.95  # face / non-face at half the bytes, no retraining


class TinyText(torch.nn.Module):
    """Token embedding (the largest tensor) + masked mean pooling + classifier: two inputs, two outputs."""

    def __init__(self, vocab: int = 2000, dim: int = 64):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.fc = torch.nn.Linear(dim, 5)

    def forward(self, ids, mask):
        h = self.emb(ids) * mask.unsqueeze(-1)
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return self.fc(pooled), pooled


def test_embedding_table_is_factorized_and_exact_at_full_budget(tmp_path):
    torch.manual_seed(0)
    model = TinyText().eval()
    # a table with decaying spectrum, as trained embeddings have
    with torch.no_grad():
        u, v = torch.randn(2000, 64), torch.randn(64, 64)
        model.emb.weight.copy_((u * torch.logspace(0, -2, 64)) @ v)
    ids = torch.randint(0, 2000, (16, 12))
    mask = (torch.rand(16, 12) > 0.2).float()
    path = tmp_path / "text.stn"
    bake(model, (ids[:2], mask[:2]), path, calibration=(ids, mask), input_names=["ids", "mask"],
         output_names=["logits", "pooled"], progress=False)
    with torch.no_grad():
        ref_logits, ref_pooled = model(ids, mask)
    for backend in BACKENDS:
        with Runtime.load(path, backend=backend) as rt:
            emb = [l for l in rt.layers if l["kind"] == "embedding"]
            assert len(emb) == 1 and emb[0]["name"] == "emb"
            out = rt.run({"ids": ids.numpy(), "mask": mask.numpy()})
            assert relative_error(out["logits"], ref_logits.numpy()) < 1e-4
            assert relative_error(out["pooled"], ref_pooled.numpy()) < 1e-4
        with Runtime.load(path, mem_limit="25%", backend=backend) as rt:
            choice = rt.plan.choice("emb")
            assert not choice.dense
            out = rt.run({"ids": ids[:3].numpy(), "mask": mask[:3].numpy()})  # another batch size
        # the reference: the same model with its table replaced by the best rank-k approximation
        k = choice.rank
        uu, ss, vv = torch.linalg.svd(model.emb.weight.detach().double(), full_matrices=False)
        trunc = TinyText().eval()
        trunc.load_state_dict(model.state_dict())
        with torch.no_grad():
            trunc.emb.weight.copy_(((uu[:, :k] * ss[:k]) @ vv[:k]).float())
            want = trunc(ids[:3], mask[:3])[1].numpy()
        assert relative_error(out["pooled"], want) < 1e-4
