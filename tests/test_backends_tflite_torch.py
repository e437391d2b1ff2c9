"""The tflite and torch backends against the numpy reference and against torch eager.

Whole networks are exported with ``torch.onnx.export`` (TorchScript exporter, opset 17) and
captured with ``graph_from_onnx`` (or ``stn_edge.host.export.capture``, which also folds
BatchNorm); single ops are small graphs built with the IR, most of them behind a 1x1 Conv so that
the tflite builder has them in NHWC and must translate their axes and constants.

Tolerance: float32, ``rtol=1e-4, atol=1e-5`` everywhere, for both engines and for LiteRT with and
without its XNNPACK delegate. XNNPACK sums in another order than numpy and uses its own
exp/tanh/sigmoid approximations; on these models that stays within 1e-6 relative, so no engine
needs a looser tolerance.
"""
from __future__ import annotations

import io
import warnings
from typing import Any, Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from torch import nn  # noqa: E402

from models import ONet  # noqa: E402
from stn_edge.device import Runtime  # noqa: E402
from stn_edge.device.backends import get_backend  # noqa: E402
from stn_edge.errors import BackendUnavailable, InputError, UnsupportedOp  # noqa: E402
from stn_edge.graph import Graph, Node, ValueInfo  # noqa: E402
from stn_edge.host.capture import graph_from_onnx  # noqa: E402
from stn_edge.host.export import capture  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5

try:
    from stn_edge.device.backends import tflite as tflite_backend
    from stn_edge.device.backends.tflite import TFLiteBackend

    get_backend("tflite")
except (ImportError, BackendUnavailable):  # the torch-only tests still run
    tflite_backend = TFLiteBackend = None  # type: ignore[assignment,misc]
from stn_edge.device.backends import torch as torch_backend  # noqa: E402

needs_tflite = pytest.mark.skipif(tflite_backend is None, reason="LiteRT (ai-edge-litert) is not installed")

#: the engines under test, each against the numpy reference
ENGINES: dict[str, Callable[[], Any]] = {
    "torch": lambda: get_backend("torch"),
    "tflite-xnnpack": lambda: TFLiteBackend(num_threads=1),
    "tflite-builtin": lambda: TFLiteBackend(num_threads=1, xnnpack=False),
}


def engine_params() -> list:
    return [pytest.param(name, marks=[needs_tflite] if name.startswith("tflite") else []) for name in ENGINES]


def reference(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return get_backend("numpy").prepare(graph).run(feeds)


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str = "") -> None:
    assert got.keys() == want.keys(), what
    for name, expected in want.items():
        actual = np.asarray(got[name])
        assert actual.shape == expected.shape, f"{what} {name}: shape {actual.shape} != {expected.shape}"
        assert actual.dtype == expected.dtype, f"{what} {name}: dtype {actual.dtype} != {expected.dtype}"
        if np.issubdtype(expected.dtype, np.floating):
            np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=f"{what} {name}")
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=f"{what} {name}")


# ------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stem, a residual block, a strided conv (asymmetric SAME), GAP, Linear, Softmax."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        h = self.down(h).mean((2, 3))
        return torch.softmax(self.head(h), dim=1)


class MobileBlocks(nn.Module):
    """MobileNetV2/V3 blocks: expand 1x1, depthwise 3x3 (stride 1 and 2, multiplier 2), ReLU6,
    hardswish, squeeze-excitation with hardsigmoid, project 1x1, residual."""

    def __init__(self, c: int = 8):
        super().__init__()
        h = 4 * c
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.Hardswish())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(h, h // 4, 1), nn.ReLU(), nn.Conv2d(h // 4, h, 1),
                                nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1, groups=c), nn.BatchNorm2d(2 * c), nn.ReLU6(),
                                  nn.Conv2d(2 * c, 16, 1), nn.Hardswish())

    def forward(self, x):
        y = self.dw(self.expand(x))
        x = x + self.project(y * self.se(y))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.down(x), 1), 1)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32),
                                 nn.LeakyReLU(0.1), nn.Linear(32, 8), nn.Sigmoid())

    def forward(self, x):
        return self.net(x)


class TinyEncoder(nn.Module):
    """Embeddings (Gather), LayerNorm, masked attention with a fused qkv chunked in three (Split),
    GELU MLP, the first token (Gather of a scalar index), tanh pooler."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, seq: int = 10):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.ln0, self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.pool = nn.Linear(dim, dim)

    def forward(self, ids, mask):
        b, t = ids.shape
        h = self.ln0(self.tok(ids) + self.pos(torch.arange(t).unsqueeze(0)))
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(h).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + (1.0 - mask[:, None, None, :].float()) * -1e4
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        h = self.ln1(h + self.out(attn))
        h = self.ln2(h + self.mlp(h))
        return torch.tanh(self.pool(h[:, 0]))


def _norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so folding (or running) them is really tested."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model.eval()


def _tokens(batch: int) -> tuple:
    ids = torch.randint(0, 50, (batch, 10), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones(batch, 10, dtype=torch.int64)
    mask[-1, 7:] = 0
    return ids, mask


def export(model: nn.Module, args: tuple, fold: bool = True) -> Graph:
    """The TorchScript export with a symbolic batch, captured with ``graph_from_onnx``."""
    names = [f"input{i}" for i in range(len(args))]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; it is what devices get
        torch.onnx.export(model, args, buffer, dynamo=False, opset_version=17, do_constant_folding=fold,
                          input_names=names, dynamic_axes={n: {0: "batch"} for n in names})
    return graph_from_onnx(onnx.load_from_string(buffer.getvalue()))


#: name -> (model factory, inputs for a batch size, capture)
NETWORKS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple], Callable[..., Graph]]] = {
    "cnn-bn-residual": (SmallCNN, lambda n: (torch.randn(n, 3, 16, 16),), lambda m, a: capture(m, a)),
    "cnn-bn-unfolded": (SmallCNN, lambda n: (torch.randn(n, 3, 16, 16),), lambda m, a: export(m, a, fold=False)),
    "mobilenet-blocks": (MobileBlocks, lambda n: (torch.randn(n, 8, 12, 12),), export),
    "mlp": (MLP, lambda n: (torch.randn(n, 20),), export),
    "mtcnn-onet": (ONet, lambda n: (torch.randn(n, 3, 48, 48),), export),
    "transformer-encoder": (TinyEncoder, _tokens, export),
}

_graphs: dict[str, tuple[nn.Module, Graph]] = {}


def network(name: str) -> tuple[nn.Module, Graph]:
    """The model and its captured graph, built once per test session."""
    if name not in _graphs:
        make, inputs, grab = NETWORKS[name]
        torch.manual_seed(0)
        model = _norms(make())
        _graphs[name] = model, grab(model, inputs(2))
    return _graphs[name]


def run_all(name: str, batch: int) -> tuple[dict, dict, dict]:
    """Feeds, the numpy reference and torch eager's outputs for ``batch`` samples."""
    model, graph = network(name)
    torch.manual_seed(batch)
    args = NETWORKS[name][1](batch)
    feeds = {v.name: a.numpy() for v, a in zip(graph.inputs, args)}
    with torch.no_grad():
        eager = model(*args)
    eager = eager if isinstance(eager, tuple) else (eager,)
    return feeds, reference(graph, feeds), {o.name: e.numpy() for o, e in zip(graph.outputs, eager)}


@pytest.mark.parametrize("engine", engine_params())
@pytest.mark.parametrize("name", NETWORKS)
def test_network_matches_numpy_and_torch_eager(name: str, engine: str) -> None:
    _, graph = network(name)
    feeds, ref, eager = run_all(name, 3)
    assert_close(ref, eager, "numpy vs eager")
    got = ENGINES[engine]().prepare(graph).run(feeds)
    assert_close(got, ref, f"{engine} vs numpy")
    assert_close(got, eager, f"{engine} vs eager")


@pytest.mark.parametrize("engine", [p for p in engine_params() if p.values[0] != "tflite-builtin"])
@pytest.mark.parametrize("name", ["cnn-bn-residual", "mtcnn-onet", "transformer-encoder"])
def test_batch_1_then_4_on_one_executable(name: str, engine: str) -> None:
    _, graph = network(name)
    exe = ENGINES[engine]().prepare(graph)
    for batch in (1, 4, 1):
        feeds, ref, eager = run_all(name, batch)
        got = exe.run(feeds)
        assert_close(got, ref, f"{engine} batch {batch}")
        assert_close(got, eager, f"{engine} batch {batch} vs eager")
    if engine.startswith("tflite"):
        assert exe.resizable, "these graphs convert to the same program at any batch: resize, not rebuild"


@pytest.mark.parametrize("engine", [p for p in engine_params() if p.values[0] != "tflite-builtin"])
def test_concurrent_runs_of_mixed_batches(engine: str) -> None:
    """Runtime.run may be called from several threads; tflite serializes its interpreter."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    _, graph = network("cnn-bn-residual")
    exe = ENGINES[engine]().prepare(graph)
    cases = [run_all("cnn-bn-residual", batch)[:2] for batch in (1, 3, 2, 1, 3, 2)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda c: exe.run(c[0]), cases))
    for got, (_, want) in zip(results, cases):
        assert_close(got, want, engine)


@needs_tflite
def test_tflite_rebuilds_a_graph_that_bakes_the_batch_into_a_constant() -> None:
    """``bias.expand(x.shape[0], -1)`` folds to a constant holding the batch: rebuild per batch."""

    class Expanding(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(1, 6))

        def forward(self, x):
            return torch.cat([x, self.bias.expand(x.shape[0], -1)], dim=1)

    model = Expanding().eval()
    graph = export(model, (torch.randn(2, 4),))
    exe = TFLiteBackend(num_threads=1).prepare(graph)
    assert not exe.resizable
    for batch in (1, 3, 2):
        x = torch.randn(batch, 4)
        out = exe.run({"input0": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(out[graph.outputs[0].name], model(x).numpy(), rtol=RTOL, atol=ATOL)


@needs_tflite
def test_tflite_defers_the_build_when_placeholder_shapes_do_not_fit() -> None:
    """A symbolic batch of 1 cannot meet a fixed batch of 2: build at the first real shapes."""
    graph = Graph(
        [Node("Add", "add", ["x", "y"], ["z"])],
        [ValueInfo("x", ["batch", 3]), ValueInfo("y", [2, 3])],
        [ValueInfo("z", ["batch", 3])],
    )
    exe = TFLiteBackend(num_threads=1).prepare(graph)
    x, y = f32(2, 3), f32(2, 3)
    np.testing.assert_allclose(exe.run({"x": x, "y": y})["z"], x + y, rtol=RTOL, atol=ATOL)


@needs_tflite
def test_tflite_uses_the_xnnpack_delegate_and_nhwc_convolutions() -> None:
    _, graph = network("mobilenet-blocks")
    exe = TFLiteBackend(num_threads=1).prepare(graph)
    feeds, ref, _ = run_all("mobilenet-blocks", 1)
    assert_close(exe.run(feeds), ref)
    ops = exe.ops()
    assert "DELEGATE" in ops, f"XNNPACK was not applied: {ops}"
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "HARD_SWISH", "MEAN"} <= set(ops)
    # NCHW -> NHWC once at the input; the flatten of the (N, C, 1, 1) pool needs no TRANSPOSE
    assert ops.count("TRANSPOSE") == 1, ops


def test_runtime_runs_an_artifact_on_each_engine() -> None:
    from tiny import tiny_bytes  # noqa: PLC0415

    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    want = Runtime.load(tiny_bytes(), backend="numpy").run(x)["y"]
    for backend in ["torch"] + (["tflite"] if tflite_backend else []):
        for limit in (None, "40%"):
            with Runtime.load(tiny_bytes(), mem_limit=limit, backend=backend) as rt:
                ref = Runtime.load(tiny_bytes(), mem_limit=limit, backend="numpy")
                assert max(rt.verify().values()) == pytest.approx(max(ref.verify().values()), abs=1e-5)
                np.testing.assert_allclose(rt.run(x)["y"], ref.run(x)["y"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(Runtime.load(tiny_bytes(), backend=backend).run(x)["y"], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["cnn-bn-residual", "mtcnn-onet"])
def test_baked_artifact_agrees_with_numpy_at_every_budget(name: str, tmp_path) -> None:
    """Bake, then load at several budgets: the lowered (truncated, factorized) graph on each engine."""
    from stn_edge.host.bake import bake  # noqa: PLC0415

    make, inputs, _ = NETWORKS[name]
    torch.manual_seed(0)
    model = _norms(make())
    x = inputs(8)
    path = tmp_path / f"{name}.stn"
    bake(model, tuple(a[:1] for a in x), path, calibration=x, levels=4, importance="spectral", progress=False)
    feeds = [a.numpy() for a in x]
    engines = ["torch"] + (["tflite"] if tflite_backend else [])
    for budget in (None, "60%"):
        with Runtime.load(path, mem_limit=budget, backend="numpy") as rt:
            want = rt.run(feeds)
        for backend in engines:
            with Runtime.load(path, mem_limit=budget, backend=backend) as rt:
                assert_close(rt.run(feeds), want, f"{backend} at {budget}")


# ------------------------------------------------------------------------------------------------
# One op at a time
# ------------------------------------------------------------------------------------------------

rng = np.random.default_rng(0)


def f32(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def op_graph(op: str, inputs: list, attrs: dict | None = None, *, x: tuple = (2, 8, 7, 9), conv: bool = True,
             outputs: int = 1, at: int = 0, fixed: bool = False, value: np.ndarray | None = None) -> tuple[Graph, dict]:
    """``x -> [1x1 Conv] -> op(..., *inputs) -> outputs``, x's path going in at input ``at``.

    Arrays in ``inputs`` become initializers, ``("feed", array)`` more graph inputs. Behind the
    Conv the tflite builder holds x in NHWC. The batch of x is symbolic unless ``fixed``; x is
    standard normal unless ``value`` gives it.
    """
    feeds = {"x": f32(*x) if value is None else value}
    init: dict[str, np.ndarray] = {}
    nodes = []
    graph_inputs = [ValueInfo("x", list(x) if fixed else ["batch", *x[1:]], str(feeds["x"].dtype))]
    first = "x"
    if conv:
        init["w"] = f32(x[1], x[1], 1, 1, scale=0.5)
        nodes.append(Node("Conv", "conv", ["x", "w"], ["h"], {"kernel_shape": [1, 1]}))
        first = "h"
    names = []
    for i, value in enumerate(inputs):
        if value is None:
            names.append("")
        elif isinstance(value, tuple):
            feeds[f"in{i}"] = value[1]
            shape: list = list(value[1].shape)
            if not fixed and conv and shape[0] == x[0]:
                shape[0] = "batch"
            graph_inputs.append(ValueInfo(f"in{i}", shape, str(value[1].dtype)))
            names.append(f"in{i}")
        else:
            init[f"c{i}"] = np.asarray(value)
            names.append(f"c{i}")
    names.insert(at, first)
    outs = [f"y{i}" for i in range(outputs)]
    nodes.append(Node(op, "op", names, outs, dict(attrs or {})))
    return Graph(nodes, graph_inputs, [ValueInfo(o, []) for o in outs], init), feeds


def case(op: str, *inputs: Any, id: str, x: tuple = (2, 8, 7, 9), conv: bool = True, outputs: int = 1, at: int = 0,
         fixed: bool = False, value: np.ndarray | None = None, **attrs: Any):
    x = x if value is None else value.shape
    layout = {"x": x, "conv": conv, "outputs": outputs, "at": at, "fixed": fixed, "value": value}
    return pytest.param(op, list(inputs), attrs, layout, id, id=id)


OP_CASES = [
    # convolutions: the pads TFLite calls SAME, and the ones it does not
    case("Conv", f32(6, 8, 3, 3), f32(6), id="conv-same", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    case("Conv", f32(6, 8, 3, 3), id="conv-stride2-explicit-pad", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
    case("Conv", f32(6, 8, 2, 3), f32(6), id="conv-asymmetric", kernel_shape=[2, 3], pads=[0, 2, 1, 0]),
    case("Conv", f32(6, 8, 3, 3), id="conv-same-lower", kernel_shape=[3, 3], auto_pad="SAME_LOWER", strides=[2, 2]),
    case("Conv", f32(6, 8, 3, 3), f32(6), id="conv-dilated", kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2]),
    case("Conv", f32(6, 4, 3, 3), f32(6), id="conv-grouped", kernel_shape=[3, 3], group=2, pads=[1, 1, 1, 1]),
    case("Conv", f32(16, 1, 3, 3), f32(16), id="conv-depthwise-x2", kernel_shape=[3, 3], group=8, strides=[2, 2]),
    case("Conv", f32(4, 8, 5), f32(4), id="conv1d", x=(2, 8, 20), conv=False, kernel_shape=[5], pads=[2, 1], strides=[2]),
    case("ConvTranspose", f32(8, 5, 3, 3), f32(5), id="convtranspose-pads", kernel_shape=[3, 3], strides=[2, 2],
         pads=[1, 0, 1, 1], output_padding=[1, 0]),
    case("ConvTranspose", f32(8, 4, 2, 2), id="convtranspose-same", kernel_shape=[2, 2], strides=[2, 2],
         auto_pad="SAME_UPPER"),
    case("ConvTranspose", f32(8, 3, 4), f32(3), id="convtranspose-1d", x=(2, 8, 11), conv=False, kernel_shape=[4],
         strides=[3], pads=[1, 2]),
    case("ConvTranspose", f32(8, 2, 3, 3), id="convtranspose-grouped", kernel_shape=[3, 3], group=2),
    # pools with ONNX pads, ceil_mode and count_include_pad
    case("MaxPool", id="maxpool-ceil", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    case("MaxPool", id="maxpool-pads", kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 0, 1]),
    case("MaxPool", id="maxpool-same", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    case("MaxPool", id="maxpool1d", x=(2, 8, 21), conv=False, kernel_shape=[3], strides=[2], ceil_mode=1),
    case("AveragePool", id="avgpool-valid", kernel_shape=[2, 2], strides=[2, 2]),
    case("AveragePool", id="avgpool-exclude-pad", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    case("AveragePool", id="avgpool-include-pad", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
         count_include_pad=1),
    case("AveragePool", id="avgpool-ceil", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, pads=[0, 1, 0, 0]),
    case("GlobalAveragePool", id="global-avg"),
    case("GlobalMaxPool", id="global-max"),
    # elementwise ops on NHWC tensors with NCHW-shaped constants
    case("Add", f32(8, 1, 1), id="add-channel-const"),
    case("Mul", f32(9), id="mul-width-const"),
    case("Sub", np.float32(0.5), id="sub-scalar"),
    case("Div", ("feed", np.abs(f32(2, 8, 7, 9)) + 1), id="div-two-inputs"),
    case("Pow", np.float32(2.0), id="pow-2"),
    case("Max", f32(8, 1, 1), id="max-const"),
    case("PRelu", f32(8, 1, 1), id="prelu-channel"),
    case("LeakyRelu", id="leaky-relu", alpha=0.2),
    case("Clip", np.float32(0), np.float32(6), id="relu6"),
    case("Clip", np.float32(-0.5), np.float32(0.3), id="clip-any"),
    case("HardSigmoid", id="hard-sigmoid"),
    case("HardSwish", id="hard-swish"),
    case("Sigmoid", id="sigmoid"),
    case("Tanh", id="tanh"),
    case("Erf", id="erf"),
    case("Gelu", id="gelu"),
    case("Exp", id="exp"),
    case("Abs", id="abs"),
    case("Neg", id="neg"),
    case("Reciprocal", id="reciprocal", conv=False, value=np.abs(f32(2, 8, 7, 9)) + 0.5),  # 1/x of ~0 is ill-posed
    case("Where", ("feed", rng.random((2, 8, 7, 9)) > 0.5), f32(8, 1, 1), id="where", at=1),
    case("Elu", id="elu"),
    case("Sqrt", id="sqrt", conv=False, value=np.abs(f32(2, 8, 7, 9))),
    case("Floor", id="floor"),
    case("Round", id="round-half-even", conv=False, value=np.arange(-6, 6, 0.25, dtype=np.float32).reshape(2, 4, 2, 3)),
    case("Sign", id="sign"),
    case("Min", f32(8, 1, 1), ("feed", f32(2, 8, 7, 9)), id="min-variadic"),
    case("Sum", f32(8, 1, 1), f32(9), id="sum-variadic"),
    case("Less", f32(8, 1, 1), id="less"),
    case("Xor", ("feed", rng.random((2, 8, 7, 9)) > 0.5), id="xor", conv=False, value=rng.random((2, 8, 7, 9)) > 0.5),
    case("And", ("feed", rng.random((2, 8, 7, 9)) > 0.5), id="and", conv=False, value=rng.random((2, 8, 7, 9)) > 0.5),
    case("Not", id="not", conv=False, value=rng.random((2, 8, 7, 9)) > 0.5),
    case("GreaterOrEqual", f32(9), id="greater-or-equal"),
    case("Sin", id="sin"),
    case("Cos", id="cos"),
    case("Ceil", id="ceil"),
    case("Log", id="log", conv=False, value=np.abs(f32(2, 8, 7, 9)) + 0.1),
    case("Equal", np.float32(0), id="equal"),
    case("Identity", id="identity"),
    case("Dropout", id="dropout-mask", outputs=2),
    case("Expand", i64(3, 1, 1, 1, 1), id="expand"),
    # axis-taking ops on NHWC tensors
    case("Softmax", id="softmax-channels", axis=1),
    case("Softmax", id="softmax-last", axis=-1),
    case("LogSoftmax", id="log-softmax", axis=2),
    case("ReduceMean", id="reduce-mean-spatial", axes=[2, 3], keepdims=0),
    case("ReduceMean", i64(1), id="reduce-mean-channels"),
    case("ReduceSum", i64(-1), id="reduce-sum-last", keepdims=0),
    case("ReduceMax", i64(1, 3), id="reduce-max"),
    case("ReduceMin", i64(2), id="reduce-min", keepdims=0),
    case("ReduceProd", i64(1), id="reduce-prod", conv=False, value=np.abs(f32(2, 8, 7, 9)) + 0.5),
    case("Concat", ("feed", f32(2, 3, 7, 9)), id="concat-channels", axis=1),
    case("Split", i64(3, 5), id="split-channels", outputs=2, axis=1),
    case("Slice", i64(1, -1), i64(6, -8, ), i64(1, 3), i64(2, -3), id="slice-steps"),
    case("Slice", i64(0), i64(1), i64(2), id="slice-height"),
    case("Gather", np.array(2, np.int64), id="gather-scalar", axis=1),
    case("Gather", i64(0, 3, -1), id="gather-vector", axis=3),
    case("Split", id="split-equal", outputs=4, axis=1, num_outputs=4),
    case("Concat", f32(2, 2, 7, 9), ("feed", f32(2, 3, 7, 9)), id="concat-const-and-feed", axis=1),
    case("Transpose", id="transpose", perm=[0, 3, 1, 2]),
    case("Squeeze", i64(1), id="squeeze", x=(2, 1, 7, 9)),
    case("LayerNormalization", f32(8, 7, 9), id="layernorm-chw", axis=1),
    case("ReduceL2", i64(1), id="reduce-l2", keepdims=0),
    case("ReduceLogSumExp", i64(2, 3), id="reduce-log-sum-exp"),
    case("ArgMax", id="argmax-channels", axis=1),
    case("ArgMin", id="argmin-width", axis=3, keepdims=0),
    case("CumSum", np.array(2, np.int64), id="cumsum-exclusive-reverse", exclusive=1, reverse=1),
    case("Tile", i64(1, 2, 1, 3), id="tile"),
    case("Mean", ("feed", f32(2, 8, 7, 9)), f32(9), id="mean-variadic"),
    case("Trilu", id="trilu-unsupported"),
    case("Flatten", id="flatten"),
    case("Reshape", i64(0, 4, -1), id="reshape"),
    case("Unsqueeze", i64(2), id="unsqueeze"),
    case("Pad", i64(0, 0, 1, 2, 0, 0, 2, 1), id="pad-constant"),
    case("Pad", i64(0, 0, 1, 2, 0, 0, 2, 1), id="pad-reflect", mode="reflect"),
    case("Resize", None, None, i64(2, 8, 14, 18), id="resize-nearest", coordinate_transformation_mode="asymmetric",
         nearest_mode="floor"),
    case("Resize", None, np.array([1, 1, 2, 3], np.float32), id="resize-bilinear", mode="linear"),
    case("Resize", None, None, i64(2, 8, 5, 12), id="resize-align-corners", mode="linear",
         coordinate_transformation_mode="align_corners"),
    case("BatchNormalization", np.abs(f32(8)) + 0.5, f32(8), f32(8), np.abs(f32(8)) + 0.5, id="batchnorm"),
    case("LayerNormalization", f32(9), f32(9), id="layernorm-last", axis=-1),
    case("InstanceNormalization", f32(8), f32(8), id="instancenorm"),
    case("Cast", id="cast-int", to=7),
    # matrix products
    case("MatMul", f32(9, 5), id="matmul-const"),
    case("MatMul", ("feed", f32(2, 8, 9, 4)), id="matmul-batched"),
    case("Gemm", f32(5, 8), f32(5), id="gemm-transB", x=(3, 8), conv=False, transB=1),
    case("Gemm", f32(4, 6), f32(3, 6), id="gemm-transA-alpha-C", x=(4, 3), conv=False, fixed=True, transA=1, alpha=0.5,
         beta=2.0),
    case("Gemm", ("feed", f32(8, 3)), f32(3), id="gemm-nonconst-B", x=(3, 8), conv=False, alpha=2.0),
    case("Einsum", ("feed", f32(2, 8, 9, 3)), id="einsum", equation="nchw,ncwk->nchk"),
]

#: ops the tflite builder refuses by design (they run on torch, numpy and onnxruntime)
TFLITE_REFUSES = {"einsum", "instancenorm", "trilu-unsupported", "convtranspose-grouped"}


@pytest.mark.parametrize("engine", engine_params())
@pytest.mark.parametrize("op, inputs, attrs, layout, case_id", OP_CASES)
def test_op_matches_numpy(op: str, inputs: list, attrs: dict, layout: dict, case_id: str, engine: str) -> None:
    graph, feeds = op_graph(op, inputs, attrs, **layout)
    ref = reference(graph, feeds)
    if engine.startswith("tflite") and case_id in TFLITE_REFUSES:
        with pytest.raises(UnsupportedOp):
            ENGINES[engine]().prepare(graph)
        return
    assert_close(ENGINES[engine]().prepare(graph).run(feeds), ref, engine)


@needs_tflite
def test_tflite_transformer_fuses_gelu_and_keeps_attention_free_of_transposes() -> None:
    _, graph = network("transformer-encoder")
    exe = TFLiteBackend(num_threads=1).prepare(graph)
    ops = exe.ops()
    assert "GELU" in ops and "BATCH_MATMUL" in ops and "ERF" not in ops
    # q k^T with k stored transposed is BATCH_MATMUL(adj_y); only the head split/merge transposes
    assert ops.count("TRANSPOSE") <= 4, ops


# ------------------------------------------------------------------------------------------------
# Refusals and availability
# ------------------------------------------------------------------------------------------------


def _graph_of(node: Node, init: dict | None = None, x: list | None = None) -> Graph:
    return Graph([node], [ValueInfo("x", x or [2, 4, 6, 6])], [ValueInfo(o, []) for o in node.outputs], init or {})


@needs_tflite
@pytest.mark.parametrize("node, init, x, fragment", [
    (Node("Einsum", "mix", ["x", "x"], ["y"], {"equation": "nchw,nchw->nc"}), {}, None, "no TFLite conversion"),
    (Node("Conv", "conv3d", ["x", "w"], ["y"], {"kernel_shape": [1, 1, 1]}), {"w": f32(2, 4, 1, 1, 1)}, [1, 4, 3, 3, 3],
     "3-D spatial"),
    (Node("MaxPool", "pool3d", ["x"], ["y"], {"kernel_shape": [2, 2, 2]}), {}, [1, 4, 4, 4, 4], "3-D spatial"),
    (Node("Conv", "conv-fed-weight", ["x", "x"], ["y"], {}), {}, None, "must be a constant"),
    (Node("MaxPool", "dilated", ["x"], ["y"], {"kernel_shape": [2, 2], "dilations": [2, 2]}), {}, None, "dilated"),
    (Node("Pad", "edge", ["x", "p"], ["y"], {"mode": "edge"}), {"p": i64(0, 0, 1, 1, 0, 0, 1, 1)}, None, "edge"),
    (Node("Resize", "fractional", ["x", "", "s"], ["y"], {"mode": "linear"}), {"s": np.array([1, 1, 1.3, 1.3], np.float32)},
     None, "scale"),
])
def test_tflite_refuses_at_prepare_naming_op_node_and_backends(
    node: Node, init: dict, x: list | None, fragment: str
) -> None:
    with pytest.raises(UnsupportedOp) as info:
        get_backend("tflite").prepare(_graph_of(node, init, x))
    err = info.value
    assert err.op == node.op and err.node == node.name
    assert "onnxruntime" in err.backends
    assert node.name in str(err) and fragment in str(err) and "tflite" in str(err)


@pytest.mark.parametrize("node, fragment", [
    (Node("NotAnOp", "mystery", ["x"], ["y"]), "no such op"),
    (Node("Relu", "custom", ["x"], ["y"], domain="com.example"), "domain"),
    (Node("Relu", "extra-attr", ["x"], ["y"], {"bogus": 1}), "bogus"),
    (Node("AveragePool", "dilated", ["x"], ["y"], {"kernel_shape": [2, 2], "dilations": [2, 2]}), "dilated"),
])
def test_torch_refuses_at_prepare_naming_op_node_and_backends(node: Node, fragment: str) -> None:
    with pytest.raises(UnsupportedOp) as info:
        get_backend("torch").prepare(_graph_of(node))
    err = info.value
    assert err.op == node.op and err.node == node.name and "onnxruntime" in err.backends
    assert node.name in str(err) and fragment in str(err)


def test_torch_covers_the_numpy_backend_ops() -> None:
    from stn_edge.device.backends import numpy as numpy_backend  # noqa: PLC0415

    assert torch_backend.supported_ops() == numpy_backend.supported_ops()


@needs_tflite
def test_tflite_supported_ops_cover_cnns_and_transformers() -> None:
    ops = set(tflite_backend.supported_ops())
    cnn = {"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Clip", "Sigmoid", "Tanh", "HardSwish",
           "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose",
           "Concat", "Softmax"}
    transformer = {"LayerNormalization", "Gather", "Erf", "Gelu", "Split", "Slice"}
    assert cnn | transformer <= ops, sorted((cnn | transformer) - ops)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_torch_cuda_without_gpu_is_unavailable_never_a_silent_cpu_run() -> None:
    with pytest.raises(BackendUnavailable, match="torch.cuda.is_available"):
        get_backend("torch", "cuda")
    _, graph = network("mlp")
    with pytest.raises(BackendUnavailable, match="cuda"):
        torch_backend.TorchBackend().prepare(graph, "cuda")
    with pytest.raises(BackendUnavailable, match="cuda"):
        Runtime.load(__import__("tiny").tiny_bytes(), backend="torch", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["cnn-bn-residual", "mtcnn-onet", "transformer-encoder"])
def test_torch_cuda_matches_numpy(name: str) -> None:
    _, graph = network(name)
    feeds, ref, _ = run_all(name, 3)
    # TF32 may be on for convolutions and matmuls: a looser tolerance than float32's
    got = get_backend("torch", "cuda").prepare(graph, "cuda").run(feeds)
    for key, want in ref.items():
        np.testing.assert_allclose(got[key], want, rtol=2e-3, atol=2e-3, err_msg=key)


def test_tflite_cannot_run_on_cuda() -> None:
    with pytest.raises(BackendUnavailable, match="cpu"):
        get_backend("tflite", "cuda")


def test_missing_engines_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_backend, "torch", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'stn-edge\[torch\]'"):
        torch_backend.TorchBackend.check_available("cpu")
    if tflite_backend is not None:
        monkeypatch.setattr(tflite_backend, "Interpreter", None)
        with pytest.raises(BackendUnavailable, match=r"pip install 'stn-edge\[tflite\]'"):
            get_backend("tflite")
        monkeypatch.undo()
        monkeypatch.setattr(tflite_backend, "tflite_builder", None)
        with pytest.raises(BackendUnavailable, match=r"pip install 'stn-edge\[tflite\]'"):
            tflite_backend.TFLiteBackend.check_available()


@pytest.mark.parametrize("engine", [p for p in engine_params() if p.values[0] != "tflite-builtin"])
def test_outputs_are_owned_and_feeds_checked(engine: str) -> None:
    _, graph = network("mlp")
    exe = ENGINES[engine]().prepare(graph)
    feeds, ref, _ = run_all("mlp", 2)
    first = exe.run(feeds)
    for value in first.values():
        value[...] = 123.0  # writing to an output must not touch the engine's state
    assert_close(exe.run(feeds), ref)
    with pytest.raises(InputError):
        exe.run({})
