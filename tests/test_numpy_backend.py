"""The numpy reference backend, op by op and on whole models, and against onnxruntime (and torch).

Every single-op case runs on numpy as a :class:`Graph` built directly, with numpy alone (the install
the reference backend exists for). Where onnx and onnxruntime are installed, the same case is also
built with ``onnx.helper``, captured with ``graph_from_onnx`` and checked against onnxruntime (that
cross-check skips without them); real networks are exported by ``torch.onnx.export`` (TorchScript
exporter, opset 17) and run on numpy, onnxruntime and torch.
"""
from __future__ import annotations

import io
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from stn_edge.device.backends import get_backend
from stn_edge.device.backends import numpy as numpy_backend
from stn_edge.errors import BackendUnavailable, CaptureError, InputError, UnsupportedOp
from stn_edge.graph import Graph, Node, ValueInfo, dtype_name

try:  # the ONNX cross-check; everything else runs with numpy alone
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from stn_edge.device.backends.onnxruntime import graph_to_onnx
    from stn_edge.host.capture import graph_from_onnx
except ImportError:
    onnx = ort = None

needs_onnx = pytest.mark.skipif(ort is None, reason="the ONNX cross-check needs onnx, onnxruntime and the host part")

#: ONNX TensorProto element types the Cast cases use (stable numbers of the ONNX standard)
ONNX_FLOAT, ONNX_INT64, ONNX_BOOL = 1, 7, 9

#: numpy vs onnxruntime on one op, float32
RTOL, ATOL = 1e-4, 1e-5
#: whole networks: float32 sums over hundreds of terms, in different orders per engine
MODEL_RTOL, MODEL_ATOL = 1e-4, 1e-4

rng = np.random.default_rng(0)


def f32(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def i64(*values: Any) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass
class Const:
    """An op input stored as an initializer rather than fed."""

    value: Any


def _split(inputs: list) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Input names of a single-op case (``""`` for an absent optional input), its constants
    (:class:`Const`, stored as initializers) and its feeds (arrays, graph inputs)."""
    names, consts, feeds = [], {}, {}
    for i, value in enumerate(inputs):
        name = "" if value is None else f"in{i}"
        names.append(name)
        if isinstance(value, Const):
            consts[name] = np.asarray(value.value)
        elif value is not None:
            feeds[name] = value
    return names, consts, feeds


def single_op_model(op: str, inputs: list, attrs: dict, n_outputs: int, opset: int) -> tuple[Any, dict]:
    """An ONNX model of one node; arrays become graph inputs, :class:`Const` initializers."""
    names, consts, feeds = _split(inputs)
    initializers = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph_inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                    for k, v in feeds.items()]
    outputs = [f"out{i}" for i in range(n_outputs)]
    attrs = {k: numpy_helper.from_array(v) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
    node = helper.make_node(op, names, outputs, **attrs)
    graph = helper.make_graph(
        [node], op, graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outputs], initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, feeds


def single_op_graph(op: str, inputs: list, attrs: dict, n_outputs: int, opset: int) -> tuple[Graph, dict]:
    """The same one-node model as :func:`single_op_model`, as a :class:`Graph` built without onnx."""
    names, consts, feeds = _split(inputs)
    graph_inputs = [ValueInfo(k, list(v.shape), dtype_name(v.dtype)) for k, v in feeds.items()]
    outputs = [f"out{i}" for i in range(n_outputs)]
    node = Node(op, op, names, outputs, dict(attrs))
    return Graph([node], graph_inputs, [ValueInfo(o, None) for o in outputs], consts, opset), feeds


def run_both(graph: Graph, feeds: dict) -> tuple[dict, dict]:
    ours = get_backend("numpy").prepare(graph).run(feeds)
    theirs = get_backend("onnxruntime").prepare(graph).run(feeds)
    return ours, theirs


def assert_same(ours: dict, theirs: dict, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        a, b = ours[name], np.asarray(theirs[name])
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


# ------------------------------------------------------------------------------------------------
# One op at a time
# ------------------------------------------------------------------------------------------------


def case(op: str, *inputs: Any, outputs: int = 1, opset: int = 17, id: str | None = None, **attrs: Any):
    return pytest.param(op, list(inputs), attrs, outputs, opset, id=id or op)


x4 = f32(2, 3, 7, 9)
positive = np.abs(f32(3, 4)) + 0.1
ints = np.array([[7, -7, 9], [-9, 5, -3]], dtype=np.int64)

CASES = [
    # elementwise math
    case("Add", f32(2, 3, 4), f32(3, 1)),
    case("Sub", f32(2, 3), Const(f32(3))),
    case("Mul", f32(2, 3, 4), Const(np.float32(0.5))),
    case("Div", f32(3, 4), positive),
    case("Div", ints, Const(np.array([2, -4, 5], np.int64)), id="Div-int-truncates"),
    case("Mod", ints, Const(np.array([2, -4, 5], np.int64)), id="Mod-int"),
    case("Pow", positive, Const(np.float32(1.7))),
    case("Pow", f32(3, 4), Const(np.int64(2)), id="Pow-int-exponent"),
    case("Sqrt", positive),
    case("Exp", f32(3, 4)),
    case("Log", positive),
    case("Erf", f32(4, 50, scale=2.0)),
    case("Tanh", f32(3, 4, scale=3.0)),
    case("Sigmoid", np.array([-100, -30, -1, 0, 1, 30, 100], np.float32), id="Sigmoid-extremes"),
    case("Sigmoid", f32(3, 4, scale=4.0)),
    case("Neg", f32(3, 4)),
    case("Abs", f32(3, 4)),
    case("Reciprocal", positive),
    case("Floor", f32(3, 4, scale=3.0)),
    case("Ceil", f32(3, 4, scale=3.0)),
    case("Sign", f32(3, 4)),
    case("Min", f32(3, 4), f32(4), f32(3, 1)),
    case("Max", f32(3, 4), f32(3, 4)),
    case("Sum", f32(3, 4), f32(4), f32(3, 4)),
    case("Mean", f32(3, 4), f32(3, 4)),
    # activations
    case("Relu", f32(3, 4)),
    case("LeakyRelu", f32(3, 4), alpha=0.2),
    case("PRelu", x4, Const(f32(3, 1, 1))),
    case("PRelu", f32(5, 6), Const(f32(6)), id="PRelu-vector-slope"),
    case("Elu", f32(3, 4), alpha=0.7),
    case("Softplus", f32(3, 4, scale=5.0)),
    case("Clip", f32(3, 4, scale=8.0), Const(np.float32(0)), Const(np.float32(6)), id="Clip-relu6"),
    case("Clip", f32(3, 4), None, Const(np.float32(0.3)), id="Clip-max-only"),
    case("HardSigmoid", f32(3, 4, scale=4.0), alpha=0.25, beta=0.4),
    case("HardSwish", f32(3, 4, scale=4.0)),
    case("Softmax", f32(2, 3, 5), axis=1),
    case("Softmax", f32(2, 3, 5), id="Softmax-last-axis"),
    case("LogSoftmax", f32(2, 5, scale=3.0), axis=-1),
    # linear algebra
    case("MatMul", f32(2, 3, 4), Const(f32(4, 5))),
    case("MatMul", f32(2, 2, 3, 4), f32(2, 2, 4, 6), id="MatMul-batched"),
    case("Gemm", f32(3, 4), Const(f32(5, 4)), Const(f32(5)), transB=1, alpha=0.5, beta=2.0),
    case("Gemm", f32(4, 3), Const(f32(4, 5)), transA=1, id="Gemm-transA-noC"),
    case("Einsum", f32(2, 3, 4), f32(2, 4, 5), equation="bij,bjk->bik"),
    case("Einsum", f32(2, 2, 3, 4), f32(2, 2, 5, 4), equation="bhqd,bhkd->bhqk", id="Einsum-attention"),
    # convolution
    case("Conv", x4, Const(f32(4, 3, 3, 3)), Const(f32(4)), pads=[1, 1, 1, 1]),
    case("Conv", x4, Const(f32(4, 3, 3, 3)), strides=[2, 2], pads=[1, 0, 1, 2], id="Conv-stride-asym-pads"),
    case("Conv", x4, Const(f32(4, 3, 3, 2)), dilations=[2, 1], id="Conv-dilated"),
    case("Conv", f32(2, 4, 6, 6), Const(f32(6, 2, 3, 3)), group=2, pads=[1, 1, 1, 1], id="Conv-groups"),
    case("Conv", f32(1, 4, 8, 8), Const(f32(4, 1, 3, 3)), Const(f32(4)), group=4, strides=[2, 2],
         pads=[1, 1, 1, 1], id="Conv-depthwise"),
    case("Conv", f32(1, 3, 8, 8), Const(f32(6, 1, 3, 3)), group=3, id="Conv-depthwise-multiplier"),
    case("Conv", x4, Const(f32(5, 3, 1, 1)), id="Conv-1x1"),
    case("Conv", f32(1, 1, 9, 9), Const(f32(3, 1, 3, 3)), id="Conv-one-input-channel"),
    case("Conv", x4, Const(f32(4, 3, 3, 3)), auto_pad="SAME_UPPER", strides=[2, 2], id="Conv-same-upper"),
    case("Conv", x4, Const(f32(4, 3, 2, 2)), auto_pad="SAME_LOWER", id="Conv-same-lower"),
    case("Conv", x4, Const(f32(4, 3, 3, 3)), auto_pad="VALID", strides=[2, 1], id="Conv-valid"),
    case("Conv", f32(2, 3, 50), Const(f32(8, 3, 5)), Const(f32(8)), strides=[2], pads=[2, 2],
         dilations=[2], id="Conv1d"),
    case("ConvTranspose", f32(1, 4, 5, 5), Const(f32(4, 3, 3, 3)), Const(f32(3)), strides=[2, 2],
         pads=[1, 1, 1, 1], output_padding=[1, 1]),
    case("ConvTranspose", f32(1, 4, 5, 5), Const(f32(4, 2, 2, 2)), group=2, strides=[2, 2],
         id="ConvTranspose-groups"),
    case("ConvTranspose", f32(1, 4, 5, 5), Const(f32(4, 3, 3, 3)), strides=[2, 2], auto_pad="SAME_UPPER",
         id="ConvTranspose-same-upper"),
    case("ConvTranspose", f32(1, 4, 5, 5), Const(f32(4, 3, 4, 4)), strides=[2, 2], output_shape=[10, 11],
         id="ConvTranspose-output-shape"),
    case("ConvTranspose", f32(2, 3, 10), Const(f32(3, 2, 4)), strides=[2], pads=[1, 1], dilations=[2],
         id="ConvTranspose-1d"),
    # pooling
    case("MaxPool", x4, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, id="MaxPool-ceil"),
    case("MaxPool", x4, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], id="MaxPool-pads"),
    case("MaxPool", f32(1, 2, 10, 11), kernel_shape=[2, 2], strides=[3, 3], pads=[1, 0, 1, 0], ceil_mode=1,
         id="MaxPool-ceil-pads"),
    case("MaxPool", x4, kernel_shape=[2, 3], dilations=[2, 1], id="MaxPool-dilated"),
    case("MaxPool", x4, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", id="MaxPool-same"),
    case("MaxPool", f32(2, 3, 20), kernel_shape=[3], strides=[2], id="MaxPool-1d"),
    case("AveragePool", x4, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], id="AveragePool-pads"),
    case("AveragePool", x4, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1,
         id="AveragePool-count-pad"),
    case("AveragePool", x4, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, id="AveragePool-ceil"),
    case("AveragePool", x4, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
         count_include_pad=1, id="AveragePool-ceil-count-pad"),
    case("AveragePool", x4, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", count_include_pad=1,
         id="AveragePool-same-count-pad"),
    case("GlobalAveragePool", x4),
    case("GlobalMaxPool", x4),
    # normalization
    case("BatchNormalization", x4, Const(f32(3)), Const(f32(3)), Const(f32(3)), Const(np.abs(f32(3)) + 0.5),
         epsilon=1e-3),
    case("InstanceNormalization", x4, Const(f32(3)), Const(f32(3))),
    case("LayerNormalization", f32(2, 5, 8), Const(f32(8)), Const(f32(8)), outputs=3),
    case("LayerNormalization", f32(2, 5, 8), Const(f32(5, 8)), axis=-2, epsilon=1e-3, id="LayerNorm-axis-2"),
    # shapes, indexing and copies
    case("Identity", f32(3, 4)),
    case("Dropout", f32(3, 4), outputs=2),
    case("Flatten", x4, axis=2),
    case("Flatten", x4, axis=0, id="Flatten-axis0"),
    case("Reshape", x4, Const(i64(0, -1, 9))),
    case("Reshape", f32(2, 3, 4), Const(i64(4, 3, 2)), allowzero=1, id="Reshape-allowzero"),
    case("Transpose", x4, perm=[0, 2, 3, 1]),
    case("Transpose", f32(3, 4), id="Transpose-default"),
    case("Concat", f32(2, 1, 3), f32(2, 4, 3), Const(f32(2, 2, 3)), axis=1),
    case("Split", f32(2, 6), Const(i64(2, 4)), axis=1, outputs=2),
    case("Split", f32(6, 3), outputs=3, id="Split-equal"),
    case("Slice", f32(5, 6, 7), Const(i64(1, -100)), Const(i64(2**62, -2)), Const(i64(0, 2))),
    case("Slice", f32(5, 6), Const(i64(-1, 10)), Const(i64(-(2**63), -100)), Const(i64(0, 1)),
         Const(i64(-1, -2)), id="Slice-negative-steps"),
    case("Gather", f32(5, 4), Const(np.array([[0, -1], [3, 2]], np.int64))),
    case("Gather", f32(3, 5, 2), Const(np.array([4, 0], np.int32)), axis=1, id="Gather-axis1"),
    case("GatherElements", f32(3, 4), Const(np.array([[0, 1], [-1, 2], [3, 0]], np.int64)), axis=1),
    case("ScatterND", f32(4, 3), Const(np.array([[1], [3]], np.int64)), f32(2, 3)),
    case("Unsqueeze", f32(3, 4), Const(i64(0, -1))),
    case("Squeeze", f32(3, 1, 4, 1), Const(i64(1))),
    case("Squeeze", f32(3, 1, 4, 1), id="Squeeze-all"),
    case("Shape", x4, start=1, end=-1),
    case("Shape", x4, id="Shape-full"),
    case("Size", x4),
    case("Expand", f32(3, 1), Const(i64(2, 1, 4))),
    case("Tile", f32(2, 3), Const(i64(2, 3))),
    case("Pad", x4, Const(i64(0, 0, 1, 2, 0, 0, 3, 0)), Const(np.float32(1.5))),
    case("Pad", x4, Const(i64(0, 0, 2, 1, 0, 0, 1, 2)), mode="reflect", id="Pad-reflect"),
    case("Pad", x4, Const(i64(0, 0, 2, 1, 0, 0, 1, 2)), mode="edge", id="Pad-edge"),
    case("Pad", x4, Const(i64(0, 0, -1, 2, 0, 0, 1, -3)), id="Pad-negative-crops"),
    case("Trilu", f32(2, 4, 5), Const(np.int64(1))),
    case("Trilu", f32(4, 5), upper=0, id="Trilu-lower"),
    # constants, types, ranges
    case("ConstantOfShape", Const(i64(2, 3)), value=np.array([7], np.int64)),
    case("ConstantOfShape", Const(i64(4)), id="ConstantOfShape-default"),
    case("Cast", f32(3, 4, scale=5.0), to=ONNX_INT64, id="Cast-float-int"),
    case("Cast", ints, to=ONNX_FLOAT, id="Cast-int-float"),
    case("Cast", f32(3, 4), to=ONNX_BOOL, id="Cast-float-bool"),
    case("Range", Const(np.int64(2)), Const(np.int64(11)), Const(np.int64(3))),
    case("Range", Const(np.float32(0.5)), Const(np.float32(-1.2)), Const(np.float32(-0.3)), id="Range-float"),
    case("CumSum", f32(3, 5), Const(np.int64(1))),
    case("CumSum", f32(3, 5), Const(np.int64(-1)), exclusive=1, reverse=1, id="CumSum-exclusive-reverse"),
    # logic
    case("Where", f32(3, 4) > 0, f32(3, 4), Const(f32(4))),
    case("Equal", ints, Const(np.array([7, 5, -3], np.int64))),
    case("Less", f32(3, 4), f32(4)),
    case("LessOrEqual", ints, Const(np.int64(5))),
    case("Greater", f32(3, 4), f32(3, 1)),
    case("GreaterOrEqual", f32(3, 4), Const(np.float32(0))),
    case("Not", f32(3, 4) > 0),
    case("And", f32(3, 4) > 0, f32(3, 4) > 0),
    case("Or", f32(3, 4) > 0, f32(4) > 0),
    case("Xor", f32(3, 4) > 0, f32(4) > 0),
    # reductions
    case("ReduceMean", x4, axes=[2, 3], keepdims=1),
    case("ReduceMean", f32(3, 4, 5), axes=[-1], keepdims=0, id="ReduceMean-keepdims0"),
    case("ReduceSum", f32(3, 4, 5), Const(i64(0, 2)), keepdims=0),
    case("ReduceSum", f32(3, 4), id="ReduceSum-all"),
    case("ReduceSum", f32(3, 4), Const(np.zeros(0, np.int64)), noop_with_empty_axes=1, id="ReduceSum-noop"),
    case("ReduceSum", ints, Const(i64(1)), id="ReduceSum-int64"),
    case("ReduceMax", f32(3, 4, 5), axes=[1]),
    case("ReduceMin", f32(3, 4, 5), axes=[0, 2], keepdims=0),
    case("ReduceL2", f32(3, 4, 5), axes=[2]),
    case("ReduceSumSquare", f32(3, 4), axes=[1]),
    case("ReduceLogSumExp", f32(3, 4, scale=10.0), axes=[1]),
    case("ArgMax", f32(3, 4), axis=1),
    case("ArgMin", np.array([[1, 0, 0, 3]], np.float32), axis=1, keepdims=0, select_last_index=1,
         id="ArgMin-last-index"),
    # resize
    case("Resize", x4, None, Const(np.array([1, 1, 2, 2], np.float32)), mode="nearest",
         coordinate_transformation_mode="asymmetric", nearest_mode="floor", id="Resize-nearest-torch"),
    case("Resize", x4, None, Const(np.array([1, 1, 2, 2], np.float32)), mode="linear",
         coordinate_transformation_mode="pytorch_half_pixel", id="Resize-bilinear-torch"),
    case("Resize", x4, None, None, Const(i64(2, 3, 11, 5)), mode="linear",
         coordinate_transformation_mode="align_corners", id="Resize-linear-align-corners"),
    case("Resize", x4, None, None, Const(i64(2, 3, 21, 14)), mode="nearest", id="Resize-nearest-half-pixel"),
    case("Resize", x4, None, Const(np.array([1, 1, 1.5, 0.5], np.float32)), mode="linear",
         id="Resize-linear-half-pixel"),
    case("Resize", x4, None, Const(np.array([1, 1, 3, 2.5], np.float32)), mode="nearest",
         nearest_mode="round_prefer_ceil", id="Resize-nearest-prefer-ceil"),
    case("Resize", x4, None, None, Const(i64(15, 4)), mode="linear", axes=[2, 3], opset=18,
         id="Resize-axes-opset18"),
    # opset 18 forms: axes as inputs, Split's num_outputs
    case("ReduceMean", f32(3, 4, 5), Const(i64(1, -1)), keepdims=0, opset=18, id="ReduceMean-opset18"),
    case("ReduceMax", f32(3, 4, 5), Const(i64(1)), opset=18, id="ReduceMax-opset18"),
    case("Split", f32(7, 3), num_outputs=3, outputs=3, opset=18, id="Split-uneven-opset18"),
    case("Pad", f32(3, 4, 5), Const(i64(1, 2, 0, 1)), Const(np.float32(2)), Const(i64(0, 2)), opset=18,
         id="Pad-axes-opset18"),
    case("Gelu", f32(3, 4, scale=3.0), opset=20),
    case("Gelu", f32(3, 4, scale=3.0), approximate="tanh", opset=20, id="Gelu-tanh"),
]


@pytest.mark.parametrize("op, inputs, attrs, outputs, opset", CASES)
def test_op_runs_on_numpy_alone(op: str, inputs: list, attrs: dict, outputs: int, opset: int) -> None:
    graph, feeds = single_op_graph(op, inputs, attrs, outputs, opset)
    ours = get_backend("numpy").prepare(graph).run(feeds)
    assert sorted(ours) == [f"out{i}" for i in range(outputs)]
    for name, value in ours.items():
        assert isinstance(value, np.ndarray), name
        if np.issubdtype(value.dtype, np.floating):
            assert not np.isnan(value).any(), name
    if ort is not None:  # the directly built graph is the one capture makes
        model, _ = single_op_model(op, inputs, attrs, outputs, opset)
        assert_same(ours, get_backend("numpy").prepare(graph_from_onnx(model)).run(feeds))


@needs_onnx
@pytest.mark.parametrize("op, inputs, attrs, outputs, opset", CASES)
def test_op_matches_onnxruntime(op: str, inputs: list, attrs: dict, outputs: int, opset: int) -> None:
    model, feeds = single_op_model(op, inputs, attrs, outputs, opset)
    ours, theirs = run_both(graph_from_onnx(model), feeds)
    assert_same(ours, theirs)


def test_every_op_listed_in_the_brief_is_registered() -> None:
    wanted = """Conv ConvTranspose Gemm MatMul Add Sub Mul Div Pow Sqrt Exp Log Erf Tanh Sigmoid Relu LeakyRelu
        PRelu Clip HardSigmoid HardSwish Softmax LogSoftmax BatchNormalization InstanceNormalization
        LayerNormalization MaxPool AveragePool GlobalAveragePool GlobalMaxPool Flatten Reshape Transpose
        Concat Split Slice Gather Unsqueeze Squeeze Shape Constant ConstantOfShape Identity Dropout Cast
        Where Equal Less Greater Not And Expand ReduceMean ReduceSum ReduceMax Range Pad Tile Neg Abs Min
        Max Resize CumSum Einsum""".split()
    assert set(wanted) <= set(numpy_backend.supported_ops())
    assert numpy_backend.supported_ops() == sorted(numpy_backend.OPS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_erf_is_accurate(dtype: type) -> None:
    import math

    x = np.linspace(-7, 7, 20001).astype(dtype)
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert np.max(np.abs(numpy_backend._erf(x).astype(np.float64) - exact)) < 1e-6
    assert numpy_backend._erf(np.array(0.25, dtype)).shape == ()
    assert numpy_backend._erf(np.array([np.inf, -np.inf, np.nan], dtype)).tolist()[:2] == [1.0, -1.0]


def test_float32_stays_float32_through_a_graph() -> None:
    graph, feeds = single_op_graph("Erf", [f32(3, 4)], {}, 1, 17)
    out = get_backend("numpy").prepare(graph).run(feeds)
    assert out["out0"].dtype == np.float32


@needs_onnx
def test_opset13_axes_inputs() -> None:
    for op, inputs in [
        ("Unsqueeze", [f32(3, 4), Const(i64(1))]),
        ("ReduceSum", [f32(3, 4), Const(i64(1))]),
        ("Split", [f32(4, 3), Const(i64(1, 3))]),
    ]:
        model, feeds = single_op_model(op, inputs, {}, 2 if op == "Split" else 1, 13)
        assert_same(*run_both(graph_from_onnx(model), feeds))


# ------------------------------------------------------------------------------------------------
# Refusals and errors
# ------------------------------------------------------------------------------------------------


def _tiny_graph(node: Node) -> Graph:
    return Graph(
        nodes=[Node("Relu", "first", ["x"], ["h"]), node],
        inputs=[ValueInfo("x", [2, 3])],
        outputs=[ValueInfo("y", [2, 3])],
    )


def test_unknown_op_is_refused_at_prepare() -> None:
    graph = _tiny_graph(Node("FancyGelu", "block3/act", ["h"], ["y"]))
    with pytest.raises(UnsupportedOp) as info:
        get_backend("numpy").prepare(graph)
    message = str(info.value)
    assert "FancyGelu" in message and "block3/act" in message and "onnxruntime" in message
    assert info.value.op == "FancyGelu" and info.value.node == "block3/act"
    assert info.value.backends == ("onnxruntime",)


@pytest.mark.parametrize(
    "node, fragment",
    [
        (Node("Resize", "up", ["h", "", "s"], ["y"], {"mode": "cubic"}), "cubic"),
        (Node("MaxPool", "pool", ["h"], ["y", "idx"], {"kernel_shape": [2]}), "output 1"),
        (Node("Relu", "r", ["h"], ["y"], {"bogus": 1}), "bogus"),
        (Node("Relu", "r", ["h"], ["y"], domain="com.microsoft"), "com.microsoft"),
        (Node("BatchNormalization", "bn", ["h", "a", "b", "c", "d"], ["y"], {"training_mode": 1}), "training"),
    ],
)
def test_unsupported_variants_are_refused_at_prepare(node: Node, fragment: str) -> None:
    with pytest.raises(UnsupportedOp, match=fragment) as info:
        get_backend("numpy").prepare(_tiny_graph(node))
    assert info.value.node == node.name


def test_softmax_before_opset13_is_refused() -> None:
    graph = _tiny_graph(Node("Softmax", "sm", ["h"], ["y"]))
    graph.opset = 11
    with pytest.raises(UnsupportedOp, match="opset"):
        get_backend("numpy").prepare(graph)


def test_missing_and_unknown_feeds_raise_input_error() -> None:
    exe = get_backend("numpy").prepare(_tiny_graph(Node("Relu", "second", ["h"], ["y"])))
    with pytest.raises(InputError, match="missing"):
        exe.run({})
    with pytest.raises(InputError, match="unknown"):
        exe.run({"x": f32(2, 3), "z": f32(1)})


@needs_onnx
def test_onnxruntime_cuda_without_gpu_is_unavailable() -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA onnxruntime")
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
        get_backend("onnxruntime", "cuda")


def test_onnxruntime_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from stn_edge.device.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "ort", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'stn-edge\[onnxruntime\]'"):
        get_backend("onnxruntime")


# ------------------------------------------------------------------------------------------------
# Executable behaviour
# ------------------------------------------------------------------------------------------------


def test_feeds_override_initializers_on_both_backends() -> None:
    w, other, x = f32(4, 5), f32(4, 5), f32(3, 4)
    graph = Graph(
        nodes=[Node("MatMul", "mm", ["x", "w"], ["y"])],
        inputs=[ValueInfo("x", [3, 4])],
        outputs=[ValueInfo("y", [3, 5])],
        initializers={"w": w},
    )
    for name in ("numpy", "onnxruntime") if ort is not None else ("numpy",):
        exe = get_backend(name).prepare(graph)
        np.testing.assert_allclose(exe.run({"x": x})["y"], x @ w, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(exe.run({"x": x, "w": other})["y"], x @ other, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(exe.run({"x": x})["y"], x @ w, rtol=RTOL, atol=ATOL)


def test_intermediates_are_freed_after_their_last_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[weakref.ref] = []
    alive_later: list[bool] = []

    def remember(x: np.ndarray) -> np.ndarray:
        seen.append(weakref.ref(x))
        return x + 1

    def check(x: np.ndarray) -> np.ndarray:
        alive_later.append(seen[0]() is not None)
        return x + 1

    monkeypatch.setitem(numpy_backend.OPS, "Remember", numpy_backend.OpImpl("Remember", remember))
    monkeypatch.setitem(numpy_backend.OPS, "Check", numpy_backend.OpImpl("Check", check))
    graph = Graph(
        nodes=[
            Node("Relu", "a", ["x"], ["a"]),
            Node("Remember", "b", ["a"], ["b"]),  # last reader of "a"
            Node("Relu", "c", ["b"], ["c"]),
            Node("Check", "d", ["c"], ["y"]),
        ],
        inputs=[ValueInfo("x", [100])],
        outputs=[ValueInfo("y", [100])],
    )
    get_backend("numpy").prepare(graph).run({"x": f32(100)})
    assert alive_later == [False]


def test_constant_node_and_outputs_are_writable() -> None:
    graph = Graph(
        nodes=[
            Node("Constant", "k", [], ["k"], {"value": np.array([1.0, 2.0], np.float32)}),
            Node("Expand", "e", ["k", "shape"], ["y"]),
            Node("Dropout", "d", ["y"], ["z", "mask"]),
        ],
        inputs=[],
        outputs=[ValueInfo("z", [3, 2]), ValueInfo("mask", [3, 2], "bool")],
        initializers={"shape": i64(3, 2)},
    )
    out = get_backend("numpy").prepare(graph).run({})
    np.testing.assert_array_equal(out["z"], [[1, 2]] * 3)
    assert out["mask"].all() and out["z"].flags.writeable and out["mask"].flags.writeable


def test_outputs_never_alias_weights_or_feeds() -> None:
    w, x = f32(2, 3), f32(6)
    graph = Graph(
        nodes=[Node("Identity", "i", ["w"], ["y"]), Node("Reshape", "r", ["x", "shape"], ["z"])],
        inputs=[ValueInfo("x", [6])],
        outputs=[ValueInfo("y", [2, 3]), ValueInfo("z", [2, 3])],
        initializers={"w": w.copy(), "shape": i64(2, 3)},
    )
    out = get_backend("numpy").prepare(graph).run({"x": x})
    out["y"][:] = 0
    out["z"][:] = 0
    np.testing.assert_array_equal(graph.initializers["w"], w)
    assert x.any() and x.flags.writeable


# ------------------------------------------------------------------------------------------------
# Capture and ONNX conversion
# ------------------------------------------------------------------------------------------------


@needs_onnx
def test_graph_from_onnx_names_nodes_and_folds_constants() -> None:
    nodes = [
        helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0, 3.0]),
        helper.make_node("Add", ["x", "c"], ["y"]),
        helper.make_node("Identity", ["y"], ["z"], name="Add_1"),  # clashes with a generated name
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = graph_from_onnx(model)
    assert [n.op for n in g.nodes] == ["Add", "Identity"]
    assert len({n.name for n in g.nodes}) == 2
    assert g.initializers["c"].dtype == np.float32 and g.initializers["c"].tolist() == [1, 2, 3]
    assert g.inputs == [ValueInfo("x", ["batch", 3], "float32")]
    assert g.outputs[0].shape[0] == "batch" and isinstance(g.outputs[0].shape[1], str)
    assert g.opset == 17


@needs_onnx
def test_graph_from_onnx_keeps_scalars_scalar() -> None:
    model, _ = single_op_model("Trilu", [f32(3, 3), Const(np.int64(1))], {}, 1, 17)
    g = graph_from_onnx(model)
    assert g.initializers["in1"].shape == () and g.initializers["in1"].dtype == np.int64


@needs_onnx
def test_graph_from_onnx_refuses_control_flow() -> None:
    branch = helper.make_graph([], "b", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["cond"], ["y"], name="maybe", then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CaptureError, match="maybe"):
        graph_from_onnx(model)


@needs_onnx
def test_graph_to_onnx_round_trips() -> None:
    model, _ = single_op_model(
        "Resize", [x4, None, Const(np.array([1, 1, 2, 2], np.float32))],
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, 1, 17,
    )
    g = graph_from_onnx(model)
    back = graph_from_onnx(graph_to_onnx(g))
    onnx.checker.check_model(graph_to_onnx(g))
    assert back.nodes == g.nodes and back.inputs == g.inputs and back.outputs == g.outputs
    assert back.initializers.keys() == g.initializers.keys() and back.opset == g.opset


# ------------------------------------------------------------------------------------------------
# Whole networks exported by torch
# ------------------------------------------------------------------------------------------------

try:
    import torch
    from torch import nn

    Module = nn.Module
except ImportError:  # the single-op tests above still run
    torch = nn = None
    Module = object

needs_torch = pytest.mark.skipif(torch is None or ort is None, reason="needs torch, onnx and onnxruntime")


def _randomize_norms(model: "nn.Module") -> "nn.Module":
    """Give BatchNorm layers non-trivial statistics, so folding them is actually tested."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


class BasicBlock(Module):
    def __init__(self, cin: int = 8, cout: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class InvertedResidual(Module):
    """MobileNetV2/V3 block: expand 1x1, depthwise 3x3, squeeze-excitation, project 1x1."""

    def __init__(self, c: int = 16, expand: int = 4):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.Hardswish())
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(h, h // 4, 1), nn.ReLU(), nn.Conv2d(h // 4, h, 1), nn.Hardsigmoid()
        )
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.depthwise(self.expand(x))
        return x + self.project(y * self.se(y))


class TinyViT(Module):
    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


class TinyBert(Module):
    """Token + position embeddings, masked self-attention written out as BERT does, GELU MLP."""

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4, seq: int = 12):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.ln0 = nn.LayerNorm(dim, eps=1e-12)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim, eps=1e-12)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln2 = nn.LayerNorm(dim, eps=1e-12)
        self.pool = nn.Linear(dim, dim)

    def forward(self, ids, mask):
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device).unsqueeze(0)
        h = self.ln0(self.tok(ids) + self.pos(positions))
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
        scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        h = self.ln1(h + self.out(attn))
        h = self.ln2(h + self.mlp(h))
        return h, torch.tanh(self.pool(h[:, 0]))


class AudioNet(Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 16, 80, stride=16, padding=38), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(16, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(32, 32, 3, padding=2, dilation=2, groups=4), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1)).log_softmax(-1)


class ONet(Module):
    """MTCNN's output network (facenet-pytorch layout)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(64, 128, 2), nn.PReLU(128),
        )
        self.dense = nn.Linear(1152, 256)
        self.prelu = nn.PReLU(256)
        self.cls = nn.Linear(256, 2)
        self.box = nn.Linear(256, 4)
        self.landmarks = nn.Linear(256, 10)

    def forward(self, x):
        x = self.body(x).permute(0, 3, 2, 1).contiguous()
        x = self.prelu(self.dense(x.view(x.shape[0], -1)))
        return torch.softmax(self.cls(x), dim=1), self.box(x), self.landmarks(x)


def _tokens() -> tuple:
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[1, 8:] = 0
    return ids, mask


MODELS = {
    "resnet-basic-block": (BasicBlock, lambda: (torch.randn(2, 8, 16, 16),)),
    "mobilenetv2-block": (InvertedResidual, lambda: (torch.randn(2, 16, 14, 14),)),
    "vit-encoder": (TinyViT, lambda: (torch.randn(2, 3, 16, 16),)),
    "bert-encoder": (TinyBert, _tokens),
    "conv1d-audio": (AudioNet, lambda: (torch.randn(2, 1, 4000),)),
    "mtcnn-onet": (ONet, lambda: (torch.randn(2, 3, 48, 48),)),
}


def export(model: "nn.Module", args: tuple, **options: Any) -> Graph:
    buffer = io.BytesIO()
    options.setdefault("do_constant_folding", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; it is what we test
        torch.onnx.export(model, args, buffer, dynamo=False, opset_version=17,
                          input_names=[f"input{i}" for i in range(len(args))], **options)
    return graph_from_onnx(onnx.load_from_string(buffer.getvalue()))


@needs_torch
@pytest.mark.parametrize("name", MODELS)
def test_torch_model_numpy_matches_onnxruntime_and_torch(name: str) -> None:
    torch.manual_seed(0)
    cls, make_args = MODELS[name]
    model = _randomize_norms(cls())
    args = make_args()
    graph = export(model, args)
    feeds = {v.name: a.numpy() for v, a in zip(graph.inputs, args)}
    ours, theirs = run_both(graph, feeds)
    assert_same(ours, theirs, MODEL_RTOL, MODEL_ATOL)
    with torch.no_grad():
        expected = model(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for out, want in zip(graph.outputs, expected):
        np.testing.assert_allclose(ours[out.name], want.numpy(), rtol=MODEL_RTOL, atol=MODEL_ATOL, err_msg=out.name)


@needs_torch
def test_unfolded_batchnorm_and_symbolic_batch() -> None:
    """Without constant folding BatchNormalization stays in the graph; a dynamic batch is a dim_param."""
    torch.manual_seed(0)
    model = _randomize_norms(BasicBlock())
    graph = export(model, (torch.randn(2, 8, 16, 16),), do_constant_folding=False,
                   dynamic_axes={"input0": {0: "batch"}})
    assert "BatchNormalization" in {n.op for n in graph.nodes}
    assert graph.inputs[0].shape[0] == "batch"
    x = torch.randn(3, 8, 16, 16)
    ours, theirs = run_both(graph, {"input0": x.numpy()})
    assert_same(ours, theirs, MODEL_RTOL, MODEL_ATOL)
    with torch.no_grad():
        np.testing.assert_allclose(ours[graph.outputs[0].name], model(x).numpy(), rtol=MODEL_RTOL, atol=MODEL_ATOL)
