"""What the tflite and torch backends refuse, and say when they are missing: refusals at prepare that
name the op, the node and the backends that can run it; availability and install hints."""
from __future__ import annotations

import numpy as np
import pytest

from engines import (
    ENGINES, assert_close, engine_params, f32, i64, needs_tflite, network, run_all, tflite_backend, torch,
)
from stn_edge.device import Runtime
from stn_edge.device.backends import get_backend
from stn_edge.device.backends import torch as torch_backend
from stn_edge.errors import BackendUnavailable, InputError, UnsupportedOp
from stn_edge.graph import Graph, Node, ValueInfo


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
