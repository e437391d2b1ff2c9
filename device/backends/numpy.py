"""The numpy backend: the reference that runs any lowered graph with numpy alone.

Every operator is one small function registered in :data:`OPS` with :func:`op`. Inputs come in as
positional arguments (an absent optional input is ``None``), attributes as keyword-only arguments
with their ONNX defaults, and the function returns one array or a tuple of arrays, as the ONNX
reference evaluator does. Semantics are those of ONNX opsets 13-17 (older attribute forms, such as
``axes`` as an attribute, are accepted too).

:meth:`NumpyBackend.prepare` checks every node against the registry before anything runs, so a
graph this backend cannot run fails at load time with :class:`~stn_edge.errors.UnsupportedOp`,
never half-way through an inference.

Float math stays in the input dtype: float32 in, float32 out.

Example
-------
>>> from stn_edge.device.backends import get_backend
>>> exe = get_backend("numpy").prepare(graph)          # doctest: +SKIP
>>> exe.run({"x": x})["y"]                             # doctest: +SKIP
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from stn_edge.device.backends import Backend, Executable, machinery, register, unsupported
from stn_edge.geometry import (
    conv_out, kernel_offsets, nearest, pool_geometry, same_pads, slice_bounds, source_coords, window_pads,
)
from stn_edge.errors import BackendError, InputError, UnsupportedOp
from stn_edge.graph import Graph, Node

#: backends to suggest when this one lacks an op or an op variant
FALLBACK_BACKENDS: tuple[str, ...] = ("onnxruntime",)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpImpl:
    """One registered operator.

    ``outputs`` is the most outputs the implementation produces (None: as many as the node asks
    for). ``check`` returns why a node cannot run (an unsupported attribute value), or None.
    ``num_outputs`` asks the executor to pass the node's output count as ``num_outputs``.
    """

    name: str
    run: Callable[..., Any]
    outputs: int | None = 1
    check: Callable[[Node, int], str | None] | None = None
    num_outputs: bool = False
    n_required: int = field(init=False)
    n_positional: int | None = field(init=False)
    attr_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        # The signature is the op's contract: positional parameters are inputs, keyword-only
        # parameters are the attributes it understands. Prepare checks nodes against it.
        params = inspect.signature(self.run).parameters.values()
        positional = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        variadic = any(p.kind == p.VAR_POSITIONAL for p in params)
        object.__setattr__(self, "n_required", sum(p.default is p.empty for p in positional))
        object.__setattr__(self, "n_positional", None if variadic else len(positional))
        object.__setattr__(
            self, "attr_names", frozenset(p.name for p in params if p.kind == p.KEYWORD_ONLY)
        )


#: ONNX op type -> implementation
OPS: dict[str, OpImpl] = {}


def op(
    *names: str,
    outputs: int | None = 1,
    check: Callable[[Node, int], str | None] | None = None,
    num_outputs: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a function as the implementation of the ONNX ops ``names``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            OPS[name] = OpImpl(name, fn, outputs, check, num_outputs)
        return fn

    return wrap


def supported_ops() -> list[str]:
    """Names of the ONNX ops this backend runs, sorted."""
    return sorted(OPS)


def _attr_in(name: str, allowed: Sequence[Any], default: Any) -> Callable[[Node, int], str | None]:
    """A ``check`` refusing nodes whose attribute ``name`` is not one of ``allowed``."""

    def check(node: Node, opset: int) -> str | None:
        value = node.attrs.get(name, default)
        if value not in allowed:
            return f"{name}={value!r} is not implemented (implemented: {', '.join(map(repr, allowed))})"
        return None

    return check


# ------------------------------------------------------------------------------------------------
# Elementwise math
# ------------------------------------------------------------------------------------------------


@op("Add")
def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


@op("Sub")
def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a - b


@op("Mul")
def mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a * b


@op("Div")
def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer):
        # ONNX (and C) integer division truncates toward zero; numpy's // floors.
        q = a // b
        return q + ((a % b != 0) & ((a < 0) != (b < 0))).astype(q.dtype)
    return a / b


@op("Pow")
def pow_(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # ONNX Pow returns the base's type; numpy would promote float32 ** int64 to float64.
    return np.power(x, y).astype(x.dtype, copy=False)


@op("Mod")
def mod(a: np.ndarray, b: np.ndarray, *, fmod: int = 0) -> np.ndarray:
    return np.fmod(a, b) if fmod else np.mod(a, b)


@op("Sqrt")
def sqrt(x: np.ndarray) -> np.ndarray:
    return np.sqrt(x)


@op("Exp")
def exp(x: np.ndarray) -> np.ndarray:
    return np.exp(x)


@op("Log")
def log(x: np.ndarray) -> np.ndarray:
    return np.log(x)


@op("Tanh")
def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


@op("Sin")
def sin(x: np.ndarray) -> np.ndarray:
    return np.sin(x)


@op("Cos")
def cos(x: np.ndarray) -> np.ndarray:
    return np.cos(x)


@op("Neg")
def neg(x: np.ndarray) -> np.ndarray:
    return np.negative(x)


@op("Abs")
def abs_(x: np.ndarray) -> np.ndarray:
    return np.abs(x)


@op("Sign")
def sign(x: np.ndarray) -> np.ndarray:
    return np.sign(x)


@op("Reciprocal")
def reciprocal(x: np.ndarray) -> np.ndarray:
    return np.reciprocal(x)


@op("Floor")
def floor(x: np.ndarray) -> np.ndarray:
    return np.floor(x)


@op("Ceil")
def ceil(x: np.ndarray) -> np.ndarray:
    return np.ceil(x)


@op("Round")
def round_(x: np.ndarray) -> np.ndarray:
    # numpy rounds half to even, as ONNX Round does.
    return np.round(x)


@op("Min")
def min_(*xs: np.ndarray) -> np.ndarray:
    return functools.reduce(np.minimum, xs)


@op("Max")
def max_(*xs: np.ndarray) -> np.ndarray:
    return functools.reduce(np.maximum, xs)


@op("Sum")
def sum_(*xs: np.ndarray) -> np.ndarray:
    return functools.reduce(np.add, xs)


@op("Mean")
def mean(*xs: np.ndarray) -> np.ndarray:
    return (functools.reduce(np.add, xs) / len(xs)).astype(xs[0].dtype, copy=False)


# Abramowitz & Stegun 7.1.26: |error| < 1.5e-7 everywhere; a Taylor series near zero keeps the
# relative error small where erf(x) itself is small. Evaluated in float32 for float32 input the
# total error stays below 4e-7 and it runs in half the time of float64.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_ERF_TAYLOR = tuple(
    (-1) ** n / (math.factorial(n) * (2 * n + 1)) * 2 / math.sqrt(math.pi) for n in range(7)
)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf with max abs error < 4e-7 in float32 (< 2e-7 in float64); no scipy on devices."""
    x = np.asarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
    ax = np.abs(x)
    t = 1 / (1 + _ERF_P * ax)
    poly = t * (_ERF_A[0] + t * (_ERF_A[1] + t * (_ERF_A[2] + t * (_ERF_A[3] + t * _ERF_A[4]))))
    y = np.asarray(np.copysign(1 - poly * np.exp(-ax * ax), x))  # 0-d ufunc results are scalars
    small = ax < 0.5
    xs = x[small]
    x2 = xs * xs
    near = np.zeros_like(xs)
    for c in reversed(_ERF_TAYLOR):
        near = near * x2 + c
    y[small] = near * xs
    return y


@op("Erf")
def erf(x: np.ndarray) -> np.ndarray:
    return _erf(x).astype(x.dtype, copy=False)


@op("IsNaN")
def isnan(x: np.ndarray) -> np.ndarray:
    return np.isnan(x)


@op("IsInf")
def isinf(x: np.ndarray, *, detect_negative: int = 1, detect_positive: int = 1) -> np.ndarray:
    return (np.isposinf(x) & bool(detect_positive)) | (np.isneginf(x) & bool(detect_negative))


# ------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------


@op("Relu")
def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


@op("Sigmoid")
def sigmoid(x: np.ndarray) -> np.ndarray:
    # exp(-log(1 + exp(-x))) never overflows, for large |x| of either sign.
    return np.exp(-np.logaddexp(0, -x))


@op("LeakyRelu")
def leaky_relu(x: np.ndarray, *, alpha: float = 0.01) -> np.ndarray:
    return np.where(x >= 0, x, x * alpha)


@op("PRelu")
def prelu(x: np.ndarray, slope: np.ndarray) -> np.ndarray:
    # slope broadcasts to x (numpy rules), e.g. (C, 1, 1) against (N, C, H, W)
    return np.where(x >= 0, x, x * slope)


@op("Elu")
def elu(x: np.ndarray, *, alpha: float = 1.0) -> np.ndarray:
    return np.where(x >= 0, x, alpha * np.expm1(np.minimum(x, 0)))


@op("Selu")
def selu(
    x: np.ndarray, *, alpha: float = 1.67326319217681884765625, gamma: float = 1.05070102214813232421875
) -> np.ndarray:
    return gamma * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


@op("Softplus")
def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0, x)


@op("Clip")
def clip(
    x: np.ndarray,
    lo: np.ndarray | None = None,
    hi: np.ndarray | None = None,
    *,
    min: float | None = None,  # noqa: A002  (opset < 11 attribute names)
    max: float | None = None,  # noqa: A002
) -> np.ndarray:
    lo = lo if lo is not None else min
    hi = hi if hi is not None else max
    y = x
    if lo is not None:
        y = np.maximum(y, np.asarray(lo, dtype=x.dtype))
    if hi is not None:
        y = np.minimum(y, np.asarray(hi, dtype=x.dtype))
    return y


@op("HardSigmoid")
def hard_sigmoid(x: np.ndarray, *, alpha: float = 0.2, beta: float = 0.5) -> np.ndarray:
    return np.clip(x * alpha + beta, 0, 1)


@op("HardSwish")
def hard_swish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x * (1 / 6) + 0.5, 0, 1)


@op("Gelu")
def gelu(x: np.ndarray, *, approximate: str = "none") -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return (0.5 * x * (1 + _erf(x / math.sqrt(2)))).astype(x.dtype, copy=False)


def _softmax_check(node: Node, opset: int) -> str | None:
    if opset < 13:
        return "opset < 13 semantics (coerce to 2-D) are not implemented; export with opset >= 13"
    return None


@op("Softmax", check=_softmax_check)
def softmax(x: np.ndarray, *, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@op("LogSoftmax", check=_softmax_check)
def log_softmax(x: np.ndarray, *, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


# ------------------------------------------------------------------------------------------------
# Linear algebra
# ------------------------------------------------------------------------------------------------


@op("MatMul")
def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(a, b)


@op("Gemm")
def gemm(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    transA: int = 0,
    transB: int = 0,
) -> np.ndarray:
    y = (a.T if transA else a) @ (b.T if transB else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return y


@op("Einsum")
def einsum(*xs: np.ndarray, equation: str) -> np.ndarray:
    # optimize=True routes two-operand contractions through BLAS (tensordot)
    return np.einsum(equation.replace(" ", ""), *xs, optimize=len(xs) > 1)


# ------------------------------------------------------------------------------------------------
# Convolution and pooling
# ------------------------------------------------------------------------------------------------


def _pad_spatial(x: np.ndarray, begin: Sequence[int], end: Sequence[int], value: Any) -> np.ndarray:
    if not any(begin) and not any(end):
        return x
    width = [(0, 0), (0, 0)] + list(zip(begin, end))
    return np.pad(x, width, mode="constant", constant_values=value)


@op("Conv", check=_attr_in("auto_pad", ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"), "NOTSET"))
def conv(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    auto_pad: str = "NOTSET",
    dilations: Sequence[int] | None = None,
    group: int = 1,
    kernel_shape: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> np.ndarray:
    """N-d convolution. x: (N, C, *in), w: (M, C/group, *k), b: (M,) -> (N, M, *out)."""
    nd = x.ndim - 2
    kernel = w.shape[2:]
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    begin, end = window_pads(x.shape[2:], kernel, strides, dilations, pads, auto_pad)
    xp = _pad_spatial(x, begin, end, 0)
    out = conv_out(xp.shape[2:], kernel, strides, dilations)
    n, c = x.shape[:2]
    m, cg = w.shape[0], w.shape[1]
    mg = m // group
    if cg == 1 and group > 1:
        y = _depthwise(xp, w, out, strides, dilations, group)
    else:
        # im2col: every kernel position is one strided copy, stacked so that (C/g, K) is contiguous;
        # then a single batched matmul per group does all the arithmetic in BLAS.
        # A 1x1 kernel needs no copy at all: the (strided) input is already the column matrix.
        slices = list(kernel_offsets(out, kernel, strides, dilations))
        cols = xp[slices[0]] if len(slices) == 1 else np.stack([xp[sl] for sl in slices], axis=2)
        cols = cols.reshape(n, group, cg * math.prod(kernel), math.prod(out))
        y = np.matmul(w.reshape(group, mg, -1), cols).reshape(n, m, *out)
    if b is not None:
        y += b.reshape((1, m) + (1,) * nd)
    return y


def _depthwise(
    xp: np.ndarray, w: np.ndarray, out: list[int], strides: list[int], dilations: list[int], group: int
) -> np.ndarray:
    """Convolution with one input channel per group: multiply-accumulate per kernel position.

    A matmul with an inner dimension of K (9 for 3x3) would be mostly overhead; K broadcast
    multiply-adds over the whole tensor are faster and need no im2col buffer.
    """
    n = xp.shape[0]
    m = w.shape[0]
    mult = m // group
    nd = len(out)
    kernel = w.shape[2:]
    wk = w.reshape(group, mult, -1)
    y = np.zeros((n, group, mult, *out), dtype=np.result_type(xp, w))
    for i, sl in enumerate(kernel_offsets(out, kernel, strides, dilations)):
        y += xp[sl][:, :, None] * wk[:, :, i].reshape((group, mult) + (1,) * nd)
    return y.reshape(n, m, *out)


@op("ConvTranspose", check=_attr_in("auto_pad", ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"), "NOTSET"))
def conv_transpose(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    auto_pad: str = "NOTSET",
    dilations: Sequence[int] | None = None,
    group: int = 1,
    kernel_shape: Sequence[int] | None = None,
    output_padding: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> np.ndarray:
    """Transposed convolution. x: (N, C, *in), w: (C, M/group, *k), b: (M,) -> (N, M, *out)."""
    nd = x.ndim - 2
    n, c = x.shape[:2]
    sizes = x.shape[2:]
    kernel = w.shape[2:]
    mg = w.shape[1]
    m, cg = mg * group, c // group
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    extra = list(output_padding or [0] * nd)
    full = [
        s * (i - 1) + a + (k - 1) * d + 1 for s, i, a, k, d in zip(strides, sizes, extra, kernel, dilations)
    ]
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # the padding is what is left over between the full result and the requested size
        if output_shape is not None:
            target = list(output_shape)[-nd:]
        else:
            target = [i * s for i, s in zip(sizes, strides)]
        upper = "SAME_UPPER" if auto_pad == "SAME_UPPER" else "SAME_LOWER"
        split = [same_pads(f - t, upper) for f, t in zip(full, target)]
        begin, end = [p[0] for p in split], [p[1] for p in split]
    elif auto_pad == "VALID" or not pads:
        begin, end = [0] * nd, [0] * nd
    else:
        begin, end = list(pads[:nd]), list(pads[nd:])
    # Every input pixel scatters a (M/g, *k) patch: compute all patches with one matmul per group,
    # then add each kernel position's plane into a strided slice of the output (col2im).
    patches = np.matmul(
        w.reshape(group, cg, mg * math.prod(kernel)).transpose(0, 2, 1),
        x.reshape(n, group, cg, math.prod(sizes)),
    ).reshape(n, m, math.prod(kernel), *sizes)
    y = np.zeros((n, m, *full), dtype=np.result_type(x, w))
    for i, sl in enumerate(kernel_offsets(sizes, kernel, strides, dilations)):
        y[sl] += patches[:, :, i]
    y = y[(slice(None), slice(None)) + tuple(slice(bb, f - e) for bb, f, e in zip(begin, full, end))]
    if b is not None:
        y = y + b.reshape((1, m) + (1,) * nd)
    return y


def _pool_check(node: Node, opset: int) -> str | None:
    return _attr_in("auto_pad", ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"), "NOTSET")(node, opset)


@op("MaxPool", check=_pool_check)
def max_pool(
    x: np.ndarray,
    *,
    auto_pad: str = "NOTSET",
    ceil_mode: int = 0,
    dilations: Sequence[int] | None = None,
    kernel_shape: Sequence[int],
    pads: Sequence[int] | None = None,
    storage_order: int = 0,
    strides: Sequence[int] | None = None,
) -> np.ndarray:
    """Max over windows. x: (N, C, *in) -> (N, C, *out). Only the values output (no Indices)."""
    g = pool_geometry(x.shape[2:], kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    # Pads (explicit and overhang) hold the lowest value, so no window ever picks one over real data.
    lowest = -np.inf if np.issubdtype(x.dtype, np.floating) else np.iinfo(x.dtype).min
    xp = _pad_spatial(x, g.begin, [e + h for e, h in zip(g.end, g.overhang)], lowest)
    slices = g.slices(kernel_shape)
    y = xp[next(slices)].copy()
    for sl in slices:
        np.maximum(y, xp[sl], out=y)
    return y


@op("AveragePool", check=_pool_check)
def average_pool(
    x: np.ndarray,
    *,
    auto_pad: str = "NOTSET",
    ceil_mode: int = 0,
    count_include_pad: int = 0,
    dilations: Sequence[int] | None = None,
    kernel_shape: Sequence[int],
    pads: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> np.ndarray:
    """Mean over windows. x: (N, C, *in) -> (N, C, *out)."""
    nd = x.ndim - 2
    g = pool_geometry(x.shape[2:], kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    after = [e + h for e, h in zip(g.end, g.overhang)]
    xp = _pad_spatial(x, g.begin, after, 0)
    # The divisor counts the cells each window covers: real ones, plus the explicit pads when
    # count_include_pad, never the ceil_mode overhang (what ORT and PyTorch do).
    mask = np.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    if count_include_pad:
        mask = _pad_spatial(_pad_spatial(mask, g.begin, g.end, 1), [0] * nd, g.overhang, 0)
    else:
        mask = _pad_spatial(mask, g.begin, after, 0)
    total = np.zeros((x.shape[0], x.shape[1], *g.out), dtype=x.dtype)
    count = np.zeros((1, 1, *g.out), dtype=x.dtype)
    for sl in g.slices(kernel_shape):
        total += xp[sl]
        count += mask[sl]
    return total / count


@op("GlobalAveragePool")
def global_average_pool(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)


@op("GlobalMaxPool")
def global_max_pool(x: np.ndarray) -> np.ndarray:
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


# ------------------------------------------------------------------------------------------------
# Normalization
# ------------------------------------------------------------------------------------------------


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a per-channel vector (C,) to broadcast against (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _inference_only(node: Node, opset: int) -> str | None:
    if node.attrs.get("training_mode", 0):
        return "training_mode=1 is not implemented (inference only)"
    return None


@op("BatchNormalization", check=_inference_only)
def batch_normalization(
    x: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    *,
    epsilon: float = 1e-5,
    momentum: float = 0.9,
    spatial: int = 1,
    training_mode: int = 0,
) -> np.ndarray:
    gain = scale / np.sqrt(var + epsilon)
    return (x - _channel(mean, x.ndim)) * _channel(gain, x.ndim) + _channel(bias, x.ndim)


@op("InstanceNormalization")
def instance_normalization(
    x: np.ndarray, scale: np.ndarray, bias: np.ndarray, *, epsilon: float = 1e-5
) -> np.ndarray:
    axes = tuple(range(2, x.ndim))
    centered = x - x.mean(axis=axes, keepdims=True)
    var = (centered * centered).mean(axis=axes, keepdims=True)
    return centered / np.sqrt(var + epsilon) * _channel(scale, x.ndim) + _channel(bias, x.ndim)


@op("LayerNormalization", outputs=3)
def layer_normalization(
    x: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    axis: int = -1,
    epsilon: float = 1e-5,
    stash_type: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalize over axes [axis, rank); also returns Mean and InvStdDev (float32, keepdims)."""
    axes = tuple(range(axis % x.ndim, x.ndim))
    # stash_type=1: statistics in float32 even for float16 inputs, as ORT does
    xs = x.astype(np.float32) if x.dtype == np.float16 else x
    mu = xs.mean(axis=axes, keepdims=True)
    centered = xs - mu
    inv_std = 1 / np.sqrt((centered * centered).mean(axis=axes, keepdims=True) + epsilon)
    y = centered * inv_std * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype, copy=False), mu, inv_std


# ------------------------------------------------------------------------------------------------
# Shapes, indexing and copies
# ------------------------------------------------------------------------------------------------


def _ints(v: Any) -> list[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


@op("Identity")
def identity(x: np.ndarray) -> np.ndarray:
    return x


@op("Dropout", outputs=2)
def dropout(
    x: np.ndarray,
    ratio: np.ndarray | None = None,
    training_mode: np.ndarray | None = None,
    *,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    # Inference: identity. The mask is a broadcast view, so asking for it costs no memory.
    return x, np.broadcast_to(np.True_, x.shape)


@op("Shape")
def shape(x: np.ndarray, *, start: int = 0, end: int | None = None) -> np.ndarray:
    return np.array(x.shape[start:end], dtype=np.int64)


@op("Size")
def size(x: np.ndarray) -> np.ndarray:
    return np.array(x.size, dtype=np.int64)


@op("Flatten")
def flatten(x: np.ndarray, *, axis: int = 1) -> np.ndarray:
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Reshape")
def reshape(x: np.ndarray, shape: np.ndarray, *, allowzero: int = 0) -> np.ndarray:
    dims = _ints(shape)
    if not allowzero:
        # 0 copies the input's dimension (unless allowzero asks for a literal 0)
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@op("Transpose")
def transpose(x: np.ndarray, *, perm: Sequence[int] | None = None) -> np.ndarray:
    return np.transpose(x, perm)


@op("Concat")
def concat(*xs: np.ndarray, axis: int) -> np.ndarray:
    return np.concatenate(xs, axis=axis)


@op("Split", outputs=None, num_outputs=True)
def split(
    x: np.ndarray,
    sizes: np.ndarray | None = None,
    *,
    axis: int = 0,
    split: Sequence[int] | None = None,
    num_outputs: int | None = None,
) -> tuple[np.ndarray, ...]:
    sizes = sizes if sizes is not None and np.size(sizes) else split
    if sizes is not None:
        cuts = np.cumsum(_ints(sizes))[:-1]
    else:
        # equal chunks, the last one smaller when the axis does not divide (opset 18)
        chunk = -(-x.shape[axis] // num_outputs)
        cuts = [chunk * i for i in range(1, num_outputs)]
    return tuple(np.split(x, cuts, axis=axis))


@op("Slice")
def slice_(
    x: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    axes: np.ndarray | None = None,
    steps: np.ndarray | None = None,
) -> np.ndarray:
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis] = slice_bounds(start, end, step, x.shape[axis])
    return x[tuple(index)]


@op("Gather")
def gather(x: np.ndarray, indices: np.ndarray, *, axis: int = 0) -> np.ndarray:
    return np.take(x, indices, axis=axis)


@op("GatherElements")
def gather_elements(x: np.ndarray, indices: np.ndarray, *, axis: int = 0) -> np.ndarray:
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take_along_axis(x, indices, axis=axis)


@op("ScatterND", check=_attr_in("reduction", ("none",), "none"))
def scatter_nd(
    x: np.ndarray, indices: np.ndarray, updates: np.ndarray, *, reduction: str = "none"
) -> np.ndarray:
    y = x.copy()
    y[tuple(np.moveaxis(indices, -1, 0))] = updates
    return y


@op("Unsqueeze")
def unsqueeze(
    x: np.ndarray, axes_in: np.ndarray | None = None, *, axes: Sequence[int] | None = None
) -> np.ndarray:
    axes = _ints(axes_in if axes_in is not None else axes)
    return np.expand_dims(x, tuple(axes))


@op("Squeeze")
def squeeze(
    x: np.ndarray, axes_in: np.ndarray | None = None, *, axes: Sequence[int] | None = None
) -> np.ndarray:
    axes = axes_in if axes_in is not None else axes
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(_ints(axes)))


@op("Expand")
def expand(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    # Expand broadcasts both ways: a target dim of 1 keeps the input's dim.
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(_ints(shape))))


@op("Tile")
def tile(x: np.ndarray, repeats: np.ndarray) -> np.ndarray:
    return np.tile(x, _ints(repeats))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


@op("Pad", check=_attr_in("mode", tuple(_PAD_MODES), "constant"))
def pad(
    x: np.ndarray,
    pads_in: np.ndarray | None = None,
    constant_value: np.ndarray | None = None,
    axes: np.ndarray | None = None,
    *,
    mode: str = "constant",
    pads: Sequence[int] | None = None,
    value: float = 0.0,
) -> np.ndarray:
    """Pad (or, with negative pads, crop). pads: [x1_begin, x2_begin, ..., x1_end, x2_end, ...]."""
    amounts = _ints(pads_in if pads_in is not None else pads)
    axes_list = [a % x.ndim for a in _ints(axes)] if axes is not None else list(range(x.ndim))
    begin, end = [0] * x.ndim, [0] * x.ndim
    for i, a in enumerate(axes_list):
        begin[a], end[a] = amounts[i], amounts[i + len(axes_list)]
    # negative pads crop; np.pad only grows
    x = x[tuple(slice(max(-b, 0), n + min(e, 0)) for b, e, n in zip(begin, end, x.shape))]
    width = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)]
    if mode != "constant":
        return np.pad(x, width, mode=_PAD_MODES[mode])
    fill = value if constant_value is None or constant_value.size == 0 else constant_value.reshape(())
    return np.pad(x, width, mode="constant", constant_values=np.asarray(fill, dtype=x.dtype))


@op("Trilu")
def trilu(x: np.ndarray, k: np.ndarray | None = None, *, upper: int = 1) -> np.ndarray:
    diagonal = int(k) if k is not None else 0
    return np.triu(x, diagonal) if upper else np.tril(x, diagonal)


# ------------------------------------------------------------------------------------------------
# Constants, types and ranges
# ------------------------------------------------------------------------------------------------

#: ONNX TensorProto element type -> numpy dtype
ONNX_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.uint8),
    3: np.dtype(np.int8),
    4: np.dtype(np.uint16),
    5: np.dtype(np.int16),
    6: np.dtype(np.int32),
    7: np.dtype(np.int64),
    9: np.dtype(np.bool_),
    10: np.dtype(np.float16),
    11: np.dtype(np.float64),
    12: np.dtype(np.uint32),
    13: np.dtype(np.uint64),
}


def _constant_check(node: Node, opset: int) -> str | None:
    for name in ("sparse_value", "value_string", "value_strings"):
        if name in node.attrs:
            return f"attribute {name} is not implemented (numeric tensors only)"
    return None


@op("Constant", check=_constant_check)
def constant(
    *,
    value: np.ndarray | None = None,
    value_float: float | None = None,
    value_floats: Sequence[float] | None = None,
    value_int: int | None = None,
    value_ints: Sequence[int] | None = None,
    sparse_value: Any = None,
    value_string: str | None = None,
    value_strings: Sequence[str] | None = None,
) -> np.ndarray:
    if value is not None:
        return np.asarray(value)
    if value_float is not None or value_floats is not None:
        return np.array(value_float if value_float is not None else value_floats, dtype=np.float32)
    return np.array(value_int if value_int is not None else value_ints, dtype=np.int64)


@op("ConstantOfShape")
def constant_of_shape(shape: np.ndarray, *, value: np.ndarray | None = None) -> np.ndarray:
    fill = np.zeros((), np.float32) if value is None else np.asarray(value).reshape(())
    return np.full(_ints(shape), fill, dtype=fill.dtype)


def _cast_check(node: Node, opset: int) -> str | None:
    to = node.attrs.get("to")
    if to not in ONNX_DTYPES:
        return f"cast to ONNX element type {to!r} is not implemented"
    return None


@op("Cast", check=_cast_check)
def cast(x: np.ndarray, *, to: int, saturate: int = 1) -> np.ndarray:
    return x.astype(ONNX_DTYPES[to], copy=False)


@op("CastLike")
def cast_like(x: np.ndarray, target: np.ndarray, *, saturate: int = 1) -> np.ndarray:
    return x.astype(target.dtype, copy=False)


@op("Range")
def range_(start: np.ndarray, limit: np.ndarray, delta: np.ndarray) -> np.ndarray:
    count = max(math.ceil((limit.item() - start.item()) / delta.item()), 0)
    # start + i * delta, as the spec defines it (np.arange accumulates differently for floats)
    return (start + np.arange(count, dtype=start.dtype) * delta).astype(start.dtype, copy=False)


@op("CumSum")
def cumsum(x: np.ndarray, axis: np.ndarray, *, exclusive: int = 0, reverse: int = 0) -> np.ndarray:
    a = int(axis) % x.ndim
    y = np.flip(x, a) if reverse else x
    y = np.cumsum(y, axis=a, dtype=x.dtype)
    if exclusive:
        head = np.zeros_like(np.take(y, [0], axis=a))
        y = np.concatenate([head, np.take(y, range(y.shape[a] - 1), axis=a)], axis=a)
    return np.flip(y, a) if reverse else y


# ------------------------------------------------------------------------------------------------
# Logic
# ------------------------------------------------------------------------------------------------


@op("Where")
def where(cond: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.where(cond, x, y)


@op("Equal")
def equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.equal(a, b)


@op("Less")
def less(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.less(a, b)


@op("LessOrEqual")
def less_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.less_equal(a, b)


@op("Greater")
def greater(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.greater(a, b)


@op("GreaterOrEqual")
def greater_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.greater_equal(a, b)


@op("Not")
def not_(x: np.ndarray) -> np.ndarray:
    return np.logical_not(x)


@op("And")
def and_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.logical_and(a, b)


@op("Or")
def or_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.logical_or(a, b)


@op("Xor")
def xor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.logical_xor(a, b)


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------


def _reduction(fn: Callable[[np.ndarray, tuple[int, ...] | None], np.ndarray]) -> Callable[..., np.ndarray]:
    """Wrap ``fn(x, axes) -> keepdims result`` with ONNX's axes / keepdims / noop rules.

    Axes come as an input (ReduceSum from opset 13, all from 18) or an attribute (before that).
    """

    def run(
        x: np.ndarray,
        axes_in: np.ndarray | None = None,
        *,
        axes: Sequence[int] | None = None,
        keepdims: int = 1,
        noop_with_empty_axes: int = 0,
    ) -> np.ndarray:
        chosen = axes_in if axes_in is not None else axes
        if chosen is None or np.size(chosen) == 0:
            if noop_with_empty_axes:
                return x
            dims = None
        else:
            dims = tuple(a % x.ndim for a in _ints(chosen))
        # accumulate float16 in float32, integers in their own type (numpy would widen them)
        xs = x.astype(np.float32) if x.dtype == np.float16 else x
        y = fn(xs, dims)
        if not keepdims:
            y = np.squeeze(y, axis=dims if dims is not None else tuple(range(x.ndim)))
        return np.asarray(y).astype(x.dtype, copy=False)

    return run


def _sum(x: np.ndarray, dims: tuple[int, ...] | None) -> np.ndarray:
    return np.sum(x, axis=dims, keepdims=True, dtype=x.dtype)


def _log_sum_exp(x: np.ndarray, dims: tuple[int, ...] | None) -> np.ndarray:
    top = np.max(x, axis=dims, keepdims=True)
    return np.log(np.sum(np.exp(x - top), axis=dims, keepdims=True)) + top


op("ReduceSum")(_reduction(_sum))
op("ReduceMean")(_reduction(lambda x, d: np.mean(x, axis=d, keepdims=True)))
op("ReduceMax")(_reduction(lambda x, d: np.max(x, axis=d, keepdims=True)))
op("ReduceMin")(_reduction(lambda x, d: np.min(x, axis=d, keepdims=True)))
op("ReduceProd")(_reduction(lambda x, d: np.prod(x, axis=d, keepdims=True, dtype=x.dtype)))
op("ReduceL1")(_reduction(lambda x, d: _sum(np.abs(x), d)))
op("ReduceL2")(_reduction(lambda x, d: np.sqrt(_sum(x * x, d))))
op("ReduceSumSquare")(_reduction(lambda x, d: _sum(x * x, d)))
op("ReduceLogSumExp")(_reduction(_log_sum_exp))


def _arg(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def run(x: np.ndarray, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0) -> np.ndarray:
        axis %= x.ndim
        if select_last_index:
            idx = x.shape[axis] - 1 - fn(np.flip(x, axis), axis=axis, keepdims=True)
        else:
            idx = fn(x, axis=axis, keepdims=True)
        return (idx if keepdims else np.squeeze(idx, axis=axis)).astype(np.int64)

    return run


op("ArgMax")(_arg(np.argmax))
op("ArgMin")(_arg(np.argmin))


# ------------------------------------------------------------------------------------------------
# Resize
# ------------------------------------------------------------------------------------------------

_COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")


def _resize_check(node: Node, opset: int) -> str | None:
    for name, allowed, default in (
        ("mode", ("nearest", "linear"), "nearest"),
        ("coordinate_transformation_mode", _COORDINATE_MODES, "half_pixel"),
        ("nearest_mode", ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"), "round_prefer_floor"),
        ("antialias", (0,), 0),
        ("keep_aspect_ratio_policy", ("stretch",), "stretch"),
    ):
        reason = _attr_in(name, allowed, default)(node, opset)
        if reason:
            return reason
    return None


@op("Resize", check=_resize_check)
def resize(
    x: np.ndarray,
    roi: np.ndarray | None = None,
    scales: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
    *,
    antialias: int = 0,
    axes: Sequence[int] | None = None,
    coordinate_transformation_mode: str = "half_pixel",
    cubic_coeff_a: float = -0.75,
    exclude_outside: int = 0,
    extrapolation_value: float = 0.0,
    keep_aspect_ratio_policy: str = "stretch",
    mode: str = "nearest",
    nearest_mode: str = "round_prefer_floor",
) -> np.ndarray:
    """Nearest or (multi)linear resize, one axis at a time (both are separable)."""
    axes = [a % x.ndim for a in axes] if axes is not None else list(range(x.ndim))
    full_scale = [1.0] * x.ndim
    full_size = list(x.shape)
    if sizes is not None and sizes.size:
        for a, s in zip(axes, _ints(sizes)):
            full_size[a], full_scale[a] = s, s / x.shape[a]
    else:
        for a, s in zip(axes, np.asarray(scales, dtype=np.float64).reshape(-1)):
            full_size[a], full_scale[a] = int(math.floor(x.shape[a] * s)), float(s)
    y = x
    for a, (n_in, n_out, scale) in enumerate(zip(x.shape, full_size, full_scale)):
        if n_in == n_out and scale == 1.0:
            continue
        coords = source_coords(n_out, n_in, scale, coordinate_transformation_mode)
        if mode == "nearest":
            y = np.take(y, nearest(coords, nearest_mode, n_in), axis=a)
            continue
        coords = np.clip(coords, 0, n_in - 1)
        lo = np.floor(coords).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        shape = [1] * y.ndim
        shape[a] = n_out
        w = (coords - lo).astype(x.dtype).reshape(shape)
        y = np.take(y, lo, axis=a) * (1 - w) + np.take(y, hi, axis=a) * w
    return y


# ------------------------------------------------------------------------------------------------
# The backend
# ------------------------------------------------------------------------------------------------


@dataclass
class _Step:
    node: Node
    impl: OpImpl
    attrs: dict[str, Any]
    release: list[str]


def _unsupported(node: Node, reason: str) -> UnsupportedOp:
    return unsupported("numpy", node, reason, FALLBACK_BACKENDS)


def check_node(node: Node, opset: int) -> OpImpl:
    """The implementation that runs ``node``; UnsupportedOp saying why when there is none."""
    return machinery.check_node(node, opset, OPS, lambda impl: impl, _unsupported, "numpy")


class NumpyExecutable(Executable):
    """A graph checked against :data:`OPS`, with a release schedule for intermediate values."""

    def __init__(self, graph: Graph):
        self.graph = graph
        release = graph.release_schedule()
        self._steps = []
        impls = [check_node(node, graph.opset) for node in graph.nodes]
        graph.check_wiring()
        for node, impl, dead in zip(graph.nodes, impls, release):
            attrs = dict(node.attrs)
            if impl.num_outputs and attrs.get("num_outputs") is None:
                attrs["num_outputs"] = len(node.outputs)
            self._steps.append(_Step(node, impl, attrs, dead))
        self._required = [v.name for v in graph.inputs if v.name not in graph.initializers]
        self._known = {v.name for v in graph.inputs} | set(graph.initializers)
        self._weights = {name: _read_only(value) for name, value in graph.initializers.items()}

    def run(self, feeds: dict[str, np.ndarray],
            observe: Callable[[str, np.ndarray], None] | None = None) -> dict[str, np.ndarray]:
        """Run the graph on ``feeds``; names of initializers may be fed to override them.

        ``observe(name, value)`` is called for every value a node writes (shape recording at bake).

        Returns every graph output by name. Raises :class:`InputError` for missing or unknown feeds
        and :class:`BackendError` naming the node when an op fails on the values it was given.
        """
        missing = [name for name in self._required if name not in feeds]
        unknown = sorted(set(feeds) - self._known)
        if missing or unknown:
            raise InputError(
                f"feeds do not match the graph: missing {missing}, unknown {unknown}; "
                f"inputs are {[v.name for v in self.graph.inputs]}"
            )
        # Weights and feeds enter read-only: no op may write into them, and an output that is a
        # view of one (Identity, Reshape...) is copied on the way out instead of aliasing it.
        env: dict[str, np.ndarray] = dict(self._weights)
        env.update((name, _read_only(np.asarray(value))) for name, value in feeds.items())
        for step in self._steps:
            self._run_step(step, env, observe)
        return {o.name: _owned(env[o.name]) for o in self.graph.outputs}

    @staticmethod
    def _run_step(step: _Step, env: dict[str, np.ndarray],
                  observe: Callable[[str, np.ndarray], None] | None = None) -> None:
        args = [env[name] if name else None for name in step.node.inputs]
        try:
            results = step.impl.run(*args, **step.attrs)
        except Exception as exc:  # numpy raises many types; say which node it was
            raise BackendError(
                f"numpy backend: node {step.node.name!r} (op {step.node.op!r}) failed: {exc}"
            ) from exc
        if not isinstance(results, tuple):
            results = (results,)
        for name, value in zip(step.node.outputs, results):
            if name:
                # ufuncs on 0-d arrays return numpy scalars; keep every value an ndarray
                env[name] = np.asarray(value)
                if observe is not None:
                    observe(name, env[name])
        # drop intermediates whose last reader has run: peak memory ~ the live set, not the graph
        for name in step.release:
            env.pop(name, None)


def _read_only(value: np.ndarray) -> np.ndarray:
    view = value.view()
    view.flags.writeable = False
    return view


def _owned(value: np.ndarray) -> np.ndarray:
    """A writable array of its own: read-only views (of weights, feeds, broadcasts) are copied."""
    return value if value.flags.writeable else value.copy()


@register("numpy")
class NumpyBackend(Backend):
    """Pure-numpy reference backend; runs on the CPU anywhere numpy does."""

    devices = ("cpu",)

    def prepare(self, graph: Graph, device: str = "cpu") -> NumpyExecutable:
        """Check every node of ``graph`` and return an executable.

        Raises :class:`UnsupportedOp` (naming the op, the node and the backends that can run it)
        for the first node this backend cannot run.
        """
        if device not in self.devices:
            raise BackendError(f"numpy backend runs on {self.devices}, not {device!r}")
        return NumpyExecutable(graph)
