"""What the tflite and torch backend tests share: the engines under test, the comparison with the
numpy reference, and whole networks exported from torch (the models themselves are in ``zoo.py``).

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

from stn_edge.device.backends import get_backend  # noqa: E402
from stn_edge.errors import BackendUnavailable  # noqa: E402
from stn_edge.graph import Graph  # noqa: E402
from stn_edge.host.capture import graph_from_onnx  # noqa: E402
from stn_edge.host.export import capture  # noqa: E402
from zoo import MLP, MobileBlocks, ONet, SmallCNN, TinyEncoder, randomize_norms  # noqa: E402

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
        model = randomize_norms(make())
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
