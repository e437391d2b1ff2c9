"""What the tflite and torch backend tests share: the engines under test, the comparison with the
numpy reference, and whole networks exported from torch.

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
from stn_edge.device.backends import get_backend  # noqa: E402
from stn_edge.errors import BackendUnavailable  # noqa: E402
from stn_edge.graph import Graph  # noqa: E402
from stn_edge.host.capture import graph_from_onnx  # noqa: E402
from stn_edge.host.export import capture  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5

try:
    from stn_edge.device.backends import tflite as tflite_backend
    from stn_edge.device.backends.tflite import TFLiteBackend

    get_backend("tflite")
except (ImportError, BackendUnavailable):  # the torch-only tests still run
    tflite_backend = TFLiteBackend = None  # type: ignore[assignment,misc]

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


def with_batchnorm_statistics(model: nn.Module) -> nn.Module:
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
        model = with_batchnorm_statistics(make())
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


rng = np.random.default_rng(0)


def f32(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)
