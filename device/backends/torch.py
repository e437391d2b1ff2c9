"""The torch backend: runs a lowered graph with plain torch tensor ops, on the CPU or a CUDA GPU.

It needs PyTorch (``pip install 'stn-edge[torch]'``); this module is imported only when the
backend is asked for. Every ONNX op is one small function registered in :data:`OPS`, with the
conventions of the numpy backend (inputs positional, absent optional inputs ``None``, attributes
keyword-only with their ONNX defaults), so the two registries cover the same ops.

Where values live. Weights are moved to the device once, at prepare. Shape arithmetic stays on
the host: ``Shape`` gives a numpy array, nodes whose inputs are all host values (Shape -> Gather
-> Concat -> Reshape chains, integer constants) run with the numpy backend's ops, and those that
depend only on constants are folded at prepare. Inputs an op reads as parameters (a Reshape's
shape, Slice's starts, reduction axes...) are never copied to the device, so a CUDA run does not
stall on device-to-host copies of shapes.

``device="cuda"`` without a working CUDA torch raises
:class:`~stn_edge.errors.BackendUnavailable`; it never runs on the CPU instead.

Example
-------
>>> from stn_edge.device.backends import get_backend
>>> exe = get_backend("torch", "cuda").prepare(graph, "cuda")   # doctest: +SKIP
>>> exe.run({"input": x})["output"]                            # doctest: +SKIP
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from stn_edge.device.backends import Backend, Executable, machinery, register, unsupported
from stn_edge import geometry as geo
from stn_edge.device.backends import numpy as reference
from stn_edge.device.memory import EngineMemory
from stn_edge.errors import BackendError, BackendUnavailable, InputError, UnsupportedOp
from stn_edge.graph import Graph, Node

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # reported by check_available, with the command that fixes it
    torch = F = None  # type: ignore[assignment]
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

INSTALL_HINT = "pip install 'stn-edge[torch]'"
#: backends to suggest when this one lacks an op or an op variant
FALLBACK_BACKENDS: tuple[str, ...] = ("onnxruntime", "numpy")
#: constants up to this many elements are also kept on the host, for parameter use and folding
_SMALL_CONST = 64


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchOp:
    """One registered operator: the numpy backend's :class:`OpImpl` plus where its inputs live.

    ``params`` are the input positions read as host parameters (shapes, axes, bounds); every
    other input is a device tensor when the function runs.
    """

    impl: reference.OpImpl
    params: frozenset[int]


#: ONNX op type -> implementation
OPS: dict[str, TorchOp] = {}


def op(
    *names: str,
    params: Sequence[int] = (),
    outputs: int | None = 1,
    check: Callable[[Node, int], str | None] | None = None,
    num_outputs: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a function as the torch implementation of the ONNX ops ``names``.

    Attribute checks default to the numpy backend's for the same op: both follow ONNX.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            ref = reference.OPS.get(name)
            chk = check if check is not None else (ref.check if ref else None)
            OPS[name] = TorchOp(reference.OpImpl(name, fn, outputs, chk, num_outputs), frozenset(params))
        return fn

    return wrap


def supported_ops() -> list[str]:
    """Names of the ONNX ops this backend runs, sorted."""
    return sorted(OPS)


def _ints(v: Any) -> list[int]:
    """A host list of ints from a numpy array, a tensor (synchronizes a GPU) or a sequence."""
    if torch is not None and isinstance(v, torch.Tensor):
        return [int(i) for i in v.reshape(-1).tolist()]
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _scalar(v: Any) -> float | int | bool:
    if torch is not None and isinstance(v, torch.Tensor):
        return v.reshape(()).item()
    return np.asarray(v).reshape(()).item()


def _float(x: "torch.Tensor") -> bool:
    return x.is_floating_point()


# ------------------------------------------------------------------------------------------------
# Elementwise math
# ------------------------------------------------------------------------------------------------


@op("Add")
def add(a, b):
    return a + b


@op("Sub")
def sub(a, b):
    return a - b


@op("Mul")
def mul(a, b):
    return a * b


@op("Div")
def div(a, b):
    # ONNX integer division truncates toward zero (torch's default would give floats)
    return torch.div(a, b, rounding_mode="trunc") if not _float(a) else a / b


@op("Pow")
def pow_(x, y):
    return torch.pow(x, y).to(x.dtype)


@op("Mod")
def mod(a, b, *, fmod: int = 0):
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def _unary(name: str, fn: Callable[[Any], Any]) -> None:
    def run(x):
        return fn(x)

    op(name)(run)


for _name, _fn in {
    "Sqrt": lambda x: torch.sqrt(x),
    "Exp": lambda x: torch.exp(x),
    "Log": lambda x: torch.log(x),
    "Tanh": lambda x: torch.tanh(x),
    "Sin": lambda x: torch.sin(x),
    "Cos": lambda x: torch.cos(x),
    "Neg": lambda x: torch.neg(x),
    "Abs": lambda x: torch.abs(x),
    "Sign": lambda x: torch.sign(x),
    "Reciprocal": lambda x: torch.reciprocal(x),
    "Floor": lambda x: torch.floor(x),
    "Ceil": lambda x: torch.ceil(x),
    "Round": lambda x: torch.round(x),  # half to even, as ONNX
    "Erf": lambda x: torch.erf(x),
    "IsNaN": lambda x: torch.isnan(x),
    "Relu": lambda x: torch.relu(x),
    "Sigmoid": lambda x: torch.sigmoid(x),
    "Softplus": lambda x: F.softplus(x),
    "HardSwish": lambda x: F.hardswish(x),
    "Not": lambda x: torch.logical_not(x),
}.items():
    _unary(_name, _fn)


@op("Min")
def min_(*xs):
    return functools.reduce(torch.minimum, xs)


@op("Max")
def max_(*xs):
    return functools.reduce(torch.maximum, xs)


@op("Sum")
def sum_(*xs):
    return functools.reduce(torch.add, xs)


@op("Mean")
def mean(*xs):
    return functools.reduce(torch.add, xs) / len(xs)


@op("IsInf")
def isinf(x, *, detect_negative: int = 1, detect_positive: int = 1):
    return (torch.isposinf(x) & bool(detect_positive)) | (torch.isneginf(x) & bool(detect_negative))


# ------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------


@op("LeakyRelu")
def leaky_relu(x, *, alpha: float = 0.01):
    return F.leaky_relu(x, alpha)


@op("PRelu")
def prelu(x, slope):
    # slope broadcasts (numpy rules), e.g. (C, 1, 1) against (N, C, H, W); per channel, F.prelu
    # does it in one kernel
    if slope.numel() == 1 or _per_channel(x, slope):
        return F.prelu(x, slope.reshape(-1))
    return torch.where(x >= 0, x, x * slope)


def _per_channel(x, slope) -> bool:
    """True when ``slope`` broadcasts against ``x`` (N, C, ...) as one value per channel."""
    shape = tuple(slope.shape)
    while len(shape) > x.ndim - 1 and shape and shape[0] == 1:
        shape = shape[1:]
    return x.ndim >= 2 and shape == (x.shape[1],) + (1,) * (x.ndim - 2)


@op("Elu")
def elu(x, *, alpha: float = 1.0):
    return torch.where(x >= 0, x, alpha * torch.expm1(torch.clamp(x, max=0)))


@op("Selu")
def selu(x, *, alpha: float = 1.67326319217681884765625, gamma: float = 1.05070102214813232421875):
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(torch.clamp(x, max=0)))


@op("Clip", params=(1, 2))
def clip(x, lo=None, hi=None, *, min: float | None = None, max: float | None = None):  # noqa: A002
    lo = _scalar(lo) if lo is not None else min
    hi = _scalar(hi) if hi is not None else max
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


@op("HardSigmoid")
def hard_sigmoid(x, *, alpha: float = 0.2, beta: float = 0.5):
    return torch.clamp(x * alpha + beta, 0, 1)


@op("Gelu")
def gelu(x, *, approximate: str = "none"):
    return F.gelu(x, approximate="tanh" if approximate == "tanh" else "none")


@op("Softmax")
def softmax(x, *, axis: int = -1):
    return torch.softmax(x, axis)


@op("LogSoftmax")
def log_softmax(x, *, axis: int = -1):
    return torch.log_softmax(x, axis)


# ------------------------------------------------------------------------------------------------
# Linear algebra
# ------------------------------------------------------------------------------------------------


@op("MatMul")
def matmul(a, b):
    return torch.matmul(a, b)


@op("Gemm")
def gemm(a, b, c=None, *, alpha: float = 1.0, beta: float = 1.0, transA: int = 0, transB: int = 0):
    if transB and not transA and alpha == 1.0 and beta == 1.0 and (c is None or c.ndim <= 1):
        return F.linear(a, b, c)  # one addmm, as nn.Linear runs
    y = (a.T if transA else a) @ (b.T if transB else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return y


@op("Einsum")
def einsum(*xs, equation: str):
    return torch.einsum(equation.replace(" ", ""), *xs)


# ------------------------------------------------------------------------------------------------
# Convolution and pooling
# ------------------------------------------------------------------------------------------------


def _pad_spatial(x, begin: Sequence[int], end: Sequence[int], value: float = 0.0):
    """Pad the spatial axes of (N, C, *spatial); torch's F.pad lists the last axis first."""
    if not any(begin) and not any(end):
        return x
    widths = [w for b, e in zip(reversed(begin), reversed(end)) for w in (b, e)]
    return F.pad(x, widths, value=value)


_CONV = {1: "conv1d", 2: "conv2d", 3: "conv3d"}


def _spatial_check(node: Node, opset: int) -> str | None:
    ref = reference.OPS[node.op].check
    reason = ref(node, opset) if ref else None
    kernel = node.attrs.get("kernel_shape")
    if reason is None and kernel is not None and not 1 <= len(kernel) <= 3:
        reason = f"{len(kernel)}-D spatial ops are not supported (1-D to 3-D)"
    return reason


@op("Conv", check=_spatial_check)
def conv(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    """x: (N, C, *in), w: (M, C/group, *k), b: (M,) -> (N, M, *out)."""
    nd = x.ndim - 2
    if nd not in _CONV:
        raise ValueError(f"{nd}-D convolution is not supported (1-D to 3-D)")
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    begin, end = geo.window_pads(list(x.shape[2:]), list(w.shape[2:]), strides, dilations, pads, auto_pad)
    padding: Any = begin
    if begin != end:
        x, padding = _pad_spatial(x, begin, end), 0
    return getattr(F, _CONV[nd])(x, w, b, strides, padding, dilations, group)


@op("ConvTranspose", check=_spatial_check)
def conv_transpose(
    x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
    output_padding=None, output_shape=None, pads=None, strides=None,
):
    """x: (N, C, *in), w: (C, M/group, *k) -> (N, M, *out); the numpy backend's pad rules."""
    nd = x.ndim - 2
    sizes, kernel = list(x.shape[2:]), list(w.shape[2:])
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    extra = list(output_padding or [0] * nd)
    full = [s * (i - 1) + a + (k - 1) * d + 1 for s, i, a, k, d in zip(strides, sizes, extra, kernel, dilations)]
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape)[-nd:] if output_shape is not None else [i * s for i, s in zip(sizes, strides)]
        mode = "SAME_UPPER" if auto_pad == "SAME_UPPER" else "SAME_LOWER"
        split = [geo.same_pads(f - t, mode) for f, t in zip(full, target)]
        begin, end = [p[0] for p in split], [p[1] for p in split]
    elif auto_pad == "VALID" or not pads:
        begin, end = [0] * nd, [0] * nd
    else:
        begin, end = list(pads[:nd]), list(pads[nd:])
    fn = getattr(F, {1: "conv_transpose1d", 2: "conv_transpose2d", 3: "conv_transpose3d"}[nd])
    y = fn(x, w, None, strides, 0, 0, group, dilations)
    # output_padding cells get no kernel contribution: zeros, then crop the ONNX pads
    y = _pad_spatial(y, [0] * nd, extra)
    y = y[(slice(None), slice(None)) + tuple(slice(bb, f - e) for bb, f, e in zip(begin, full, end))]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * nd)
    return y


def _native_pads(begin: list[int], end: list[int], kernel: Sequence[int], dilations: Sequence[int]) -> bool:
    """torch's pools take symmetric pads of at most half the (dilated) kernel."""
    return begin == end and all(p <= ((k - 1) * d + 1) // 2 for p, k, d in zip(begin, kernel, dilations))


def _pool_check(node: Node, opset: int) -> str | None:
    reason = _spatial_check(node, opset)
    if reason is None and node.op == "AveragePool" and any(d != 1 for d in node.attrs.get("dilations") or []):
        reason = "dilated AveragePool is not supported"
    if reason is None and node.attrs.get("storage_order", 0):
        reason = "storage_order=1 is not supported"
    return reason


@op("MaxPool", check=_pool_check)
def max_pool(x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape, pads=None, storage_order=0, strides=None):
    nd = x.ndim - 2
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    g = geo.pool_geometry(list(x.shape[2:]), kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    fn = getattr(F, f"max_pool{nd}d")
    if _native_pads(g.begin, g.end, kernel_shape, dilations):
        return fn(x, kernel_shape, strides, g.begin, dilations, ceil_mode=bool(ceil_mode))
    # general case: pad with the lowest value up to the last window, then pool without padding
    lowest = -math.inf if _float(x) else torch.iinfo(x.dtype).min
    after = [e + h for e, h in zip(g.end, g.overhang)]
    return fn(_pad_spatial(x, g.begin, after, lowest), kernel_shape, strides, 0, dilations)


@op("AveragePool", check=_pool_check)
def average_pool(
    x, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, kernel_shape, pads=None, strides=None
):
    nd = x.ndim - 2
    strides = list(strides or [1] * nd)
    ones = [1] * nd
    g = geo.pool_geometry(list(x.shape[2:]), kernel_shape, strides, ones, pads, auto_pad, ceil_mode)
    fn = getattr(F, f"avg_pool{nd}d")
    if _native_pads(g.begin, g.end, kernel_shape, ones):
        # torch's divisor matches ONNX: pads counted when count_include_pad, ceil overhang never
        return fn(x, kernel_shape, strides, g.begin, bool(ceil_mode), bool(count_include_pad))
    # general case: sum over a zero-padded input, divide by the cells ONNX counts
    after = [e + h for e, h in zip(g.end, g.overhang)]
    window = math.prod(kernel_shape)
    total = fn(_pad_spatial(x, g.begin, after), kernel_shape, strides, 0) * window
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if count_include_pad:
        mask = _pad_spatial(_pad_spatial(mask, g.begin, g.end, 1.0), [0] * nd, g.overhang, 0.0)
    else:
        mask = _pad_spatial(mask, g.begin, after, 0.0)
    return total / (fn(mask, kernel_shape, strides, 0) * window)


@op("GlobalAveragePool")
def global_average_pool(x):
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(x):
    return x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)


# ------------------------------------------------------------------------------------------------
# Normalization
# ------------------------------------------------------------------------------------------------


@op("BatchNormalization")
def batch_normalization(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, spatial=1, training_mode=0):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)


@op("InstanceNormalization")
def instance_normalization(x, scale, bias, *, epsilon=1e-5):
    return F.instance_norm(x, weight=scale, bias=bias, eps=epsilon)


@op("LayerNormalization", outputs=3, num_outputs=True)
def layer_normalization(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1, num_outputs=1):
    """Normalize over axes [axis, rank); also returns Mean and InvStdDev (float32, keepdims)."""
    axis %= x.ndim
    shape = tuple(x.shape[axis:])
    # stash_type=1: statistics in float32 even for float16 inputs, as ORT does
    xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    fused = tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape)
    if fused and num_outputs == 1:
        return F.layer_norm(xs, shape, scale.to(xs.dtype), None if bias is None else bias.to(xs.dtype), epsilon).to(x.dtype)
    dims = tuple(range(axis, x.ndim))
    mu = xs.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(xs.var(dim=dims, keepdim=True, correction=0) + epsilon)
    y = (xs - mu) * inv_std * scale  # scale / bias may only broadcast to the normalized shape
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), mu, inv_std


# ------------------------------------------------------------------------------------------------
# Shapes, indexing and copies
# ------------------------------------------------------------------------------------------------


@op("Identity")
def identity(x):
    return x


@op("Dropout", params=(1, 2), outputs=2)
def dropout(x, ratio=None, training_mode=None, *, seed=None):
    return x, torch.ones(x.shape, dtype=torch.bool, device=x.device)


@op("Shape", params=(0,))
def shape(x, *, start: int = 0, end: int | None = None):
    return np.array(tuple(x.shape)[start:end], dtype=np.int64)


@op("Size", params=(0,))
def size(x):
    return np.array(math.prod(x.shape), dtype=np.int64)


@op("Flatten")
def flatten(x, *, axis: int = 1):
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Reshape", params=(1,))
def reshape(x, shape, *, allowzero: int = 0):
    dims = _ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@op("Transpose")
def transpose(x, *, perm=None):
    return x.permute(*(perm if perm is not None else reversed(range(x.ndim))))


@op("Concat")
def concat(*xs, axis: int):
    return torch.cat(xs, dim=axis)


@op("Split", params=(1,), outputs=None, num_outputs=True)
def split(x, sizes=None, *, axis: int = 0, split=None, num_outputs=None):
    sizes = _ints(sizes) if sizes is not None else []
    if not sizes:
        sizes = list(split) if split is not None else None
    if sizes is None:
        # equal chunks, the last one smaller when the axis does not divide (opset 18)
        chunk = -(-x.shape[axis] // num_outputs)
        sizes = [min(chunk, x.shape[axis] - chunk * i) for i in range(num_outputs)]
    return tuple(torch.split(x, sizes, dim=axis))


@op("Slice", params=(1, 2, 3, 4))
def slice_(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.ndim
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.ndim
        bounds = geo.slice_bounds(start, end, step, x.shape[axis])
        if step > 0:
            index[axis] = bounds
        else:  # torch slices take positive steps only: take the positions explicitly
            flips.append((axis, list(range(x.shape[axis]))[bounds]))
    y = x[tuple(index)]
    for axis, positions in flips:
        y = y.index_select(axis, torch.tensor(positions, dtype=torch.long, device=x.device))
    return y


@op("Gather")
def gather(x, indices, *, axis: int = 0):
    axis %= x.ndim
    idx = torch.where(indices < 0, indices + x.shape[axis], indices).long()
    y = x.index_select(axis, idx.reshape(-1))
    return y.reshape(tuple(x.shape[:axis]) + tuple(indices.shape) + tuple(x.shape[axis + 1 :]))


@op("GatherElements")
def gather_elements(x, indices, *, axis: int = 0):
    idx = torch.where(indices < 0, indices + x.shape[axis], indices).long()
    return torch.gather(x, axis, idx)


@op("ScatterND")
def scatter_nd(x, indices, updates, *, reduction: str = "none"):
    y = x.clone()
    y[tuple(indices.long().movedim(-1, 0))] = updates
    return y


@op("Unsqueeze", params=(1,))
def unsqueeze(x, axes_in=None, *, axes=None):
    axes = _ints(axes_in if axes_in is not None else axes)
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@op("Squeeze", params=(1,))
def squeeze(x, axes_in=None, *, axes=None):
    axes = axes_in if axes_in is not None else axes
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.ndim for a in _ints(axes)))


@op("Expand", params=(1,))
def expand(x, shape):
    # Expand broadcasts both ways: a target dim of 1 keeps the input's dim.
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


@op("Tile", params=(1,))
def tile(x, repeats):
    return x.repeat(_ints(repeats))


def _mirror_index(n: int, begin: int, end: int, mode: str) -> np.ndarray:
    """Source positions of the cells of an axis padded by ``begin``/``end`` in ``mode``."""
    idx = np.arange(-begin, n + end)
    if mode == "edge":
        return np.clip(idx, 0, n - 1)
    if mode == "wrap":
        return np.mod(idx, n)
    period = 2 * (n - 1)  # reflect, without repeating the edge
    if period == 0:
        return np.zeros_like(idx)
    m = np.mod(idx, period)
    return np.where(m >= n, period - m, m)


@op("Pad", params=(1, 2, 3))
def pad(x, pads_in=None, constant_value=None, axes=None, *, mode: str = "constant", pads=None, value: float = 0.0):
    """Pad (or, with negative pads, crop). pads: [x1_begin, x2_begin, ..., x1_end, x2_end, ...]."""
    amounts = _ints(pads_in if pads_in is not None else pads)
    axes_list = [a % x.ndim for a in _ints(axes)] if axes is not None else list(range(x.ndim))
    begin, end = [0] * x.ndim, [0] * x.ndim
    for i, a in enumerate(axes_list):
        begin[a], end[a] = amounts[i], amounts[i + len(axes_list)]
    x = x[tuple(slice(max(-b, 0), n + min(e, 0)) for b, e, n in zip(begin, end, x.shape))]
    begin, end = [max(b, 0) for b in begin], [max(e, 0) for e in end]
    if mode == "constant":
        given = [] if constant_value is None else _scalar_array(constant_value).reshape(-1)
        fill = given[0].item() if len(given) else value
        widths = [w for b, e in zip(reversed(begin), reversed(end)) for w in (b, e)]
        return F.pad(x, widths, value=fill)
    for a in range(x.ndim):
        if begin[a] or end[a]:
            positions = torch.from_numpy(_mirror_index(x.shape[a], begin[a], end[a], mode)).to(x.device)
            x = x.index_select(a, positions)
    return x


@op("Trilu", params=(1,))
def trilu(x, k=None, *, upper: int = 1):
    diagonal = int(_scalar(k)) if k is not None else 0
    return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)


# ------------------------------------------------------------------------------------------------
# Constants, types and ranges (mostly folded on the host at prepare)
# ------------------------------------------------------------------------------------------------

_TORCH_DTYPES: dict[np.dtype, Any] = {}
if torch is not None:
    _TORCH_DTYPES = {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float16): torch.float16,
        np.dtype(np.float64): torch.float64,
        np.dtype(np.int64): torch.int64,
        np.dtype(np.int32): torch.int32,
        np.dtype(np.int16): torch.int16,
        np.dtype(np.int8): torch.int8,
        np.dtype(np.uint8): torch.uint8,
        np.dtype(np.bool_): torch.bool,
    }


def _cast_check(node: Node, opset: int) -> str | None:
    to = reference.ONNX_DTYPES.get(node.attrs.get("to"))
    if to is None or to not in _TORCH_DTYPES:
        return f"cast to ONNX element type {node.attrs.get('to')!r} is not implemented"
    return None


# Constant has no inputs: it is always folded on the host at prepare, with the numpy backend's op.
OPS["Constant"] = TorchOp(reference.OPS["Constant"], frozenset())


@op("ConstantOfShape", params=(0,))
def constant_of_shape(shape, *, value=None):
    # a host array: the executor copies it to the device where an op reads it as data
    return reference.constant_of_shape(np.asarray(_ints(shape), dtype=np.int64), value=value)


@op("Cast", check=_cast_check)
def cast(x, *, to: int, saturate: int = 1):
    return x.to(_TORCH_DTYPES[reference.ONNX_DTYPES[to]])


@op("CastLike")
def cast_like(x, target, *, saturate: int = 1):
    return x.to(target.dtype)


@op("Range", params=(0, 1, 2))
def range_(start, limit, delta):
    # a host array, like ConstantOfShape's
    return reference.range_(_scalar_array(start), _scalar_array(limit), _scalar_array(delta))


def _scalar_array(v: Any) -> np.ndarray:
    return v.cpu().numpy() if torch is not None and isinstance(v, torch.Tensor) else np.asarray(v)


@op("CumSum", params=(1,))
def cumsum(x, axis, *, exclusive: int = 0, reverse: int = 0):
    a = int(_scalar(axis)) % x.ndim
    y = torch.flip(x, (a,)) if reverse else x
    y = torch.cumsum(y, dim=a, dtype=x.dtype)
    if exclusive:
        y = torch.cat([torch.zeros_like(y.narrow(a, 0, 1)), y.narrow(a, 0, y.shape[a] - 1)], dim=a)
    return torch.flip(y, (a,)) if reverse else y


# ------------------------------------------------------------------------------------------------
# Logic
# ------------------------------------------------------------------------------------------------


@op("Where")
def where(cond, x, y):
    return torch.where(cond.bool(), x, y)


def _binary(fn_name: str) -> Callable[[Any, Any], Any]:
    def run(a, b):
        return getattr(torch, fn_name)(a, b)

    return run


for _name, _fn_name in {
    "Equal": "eq",
    "Less": "lt",
    "LessOrEqual": "le",
    "Greater": "gt",
    "GreaterOrEqual": "ge",
    "And": "logical_and",
    "Or": "logical_or",
    "Xor": "logical_xor",
}.items():
    op(_name)(_binary(_fn_name))


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------


def _reduction(fn: Callable[[Any, tuple[int, ...]], Any]) -> Callable[..., Any]:
    """Wrap ``fn(x, dims) -> keepdims result`` with ONNX's axes / keepdims / noop rules."""

    def run(x, axes_in=None, *, axes=None, keepdims: int = 1, noop_with_empty_axes: int = 0):
        chosen = axes_in if axes_in is not None else axes
        if chosen is None or np.size(chosen) == 0:
            if noop_with_empty_axes:
                return x
            dims = tuple(range(x.ndim))
        else:
            dims = tuple(sorted(a % x.ndim for a in _ints(chosen)))
        # accumulate float16 in float32, integers in their own type (torch would widen sums)
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = fn(xs, dims) if dims else xs
        if not keepdims:
            y = y.squeeze(dims) if dims else y
        return y.to(x.dtype)

    return run


def _prod(x, dims):
    for d in dims:
        x = torch.prod(x, dim=d, keepdim=True, dtype=x.dtype)
    return x


def _mean(x, dims):
    return x.mean(dim=dims, keepdim=True) if _float(x) else x.double().mean(dim=dims, keepdim=True)


def _sum(x, dims):
    return torch.sum(x, dim=dims, keepdim=True, dtype=x.dtype)


for _name, _fn in {
    "ReduceSum": _sum,
    "ReduceMean": _mean,
    "ReduceMax": lambda x, d: torch.amax(x, dim=d, keepdim=True),
    "ReduceMin": lambda x, d: torch.amin(x, dim=d, keepdim=True),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d: _sum(torch.abs(x), d),
    "ReduceL2": lambda x, d: torch.sqrt(_sum(x * x, d)),
    "ReduceSumSquare": lambda x, d: _sum(x * x, d),
    "ReduceLogSumExp": lambda x, d: torch.logsumexp(x, dim=d, keepdim=True),
}.items():
    op(_name, params=(1,))(_reduction(_fn))


def _arg(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(x, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0):
        axis %= x.ndim
        if select_last_index:
            idx = x.shape[axis] - 1 - fn(torch.flip(x, (axis,)), dim=axis, keepdim=True)
        else:
            idx = fn(x, dim=axis, keepdim=True)
        return (idx if keepdims else idx.squeeze(axis)).long()

    return run


op("ArgMax")(_arg(lambda x, **kw: torch.argmax(x, **kw)))
op("ArgMin")(_arg(lambda x, **kw: torch.argmin(x, **kw)))


# ------------------------------------------------------------------------------------------------
# Resize
# ------------------------------------------------------------------------------------------------


@op("Resize", params=(1, 2, 3))
def resize(
    x, roi=None, scales=None, sizes=None, *, antialias=0, axes=None, coordinate_transformation_mode="half_pixel",
    cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, keep_aspect_ratio_policy="stretch",
    mode="nearest", nearest_mode="round_prefer_floor",
):
    """Nearest or (multi)linear resize, one axis at a time, with the numpy backend's coordinates."""
    axes = [a % x.ndim for a in axes] if axes is not None else list(range(x.ndim))
    full_scale = [1.0] * x.ndim
    full_size = list(x.shape)
    if sizes is not None and np.size(sizes):
        for a, s in zip(axes, _ints(sizes)):
            full_size[a], full_scale[a] = s, s / x.shape[a]
    else:
        for a, s in zip(axes, np.asarray(_scalar_array(scales), dtype=np.float64).reshape(-1)):
            full_size[a], full_scale[a] = int(math.floor(x.shape[a] * s)), float(s)
    y = x
    for a, (n_in, n_out, scale) in enumerate(zip(x.shape, full_size, full_scale)):
        if n_in == n_out and scale == 1.0:
            continue
        coords = geo.source_coords(n_out, n_in, scale, coordinate_transformation_mode)
        if mode == "nearest":
            pick = torch.from_numpy(geo.nearest(coords, nearest_mode, n_in)).to(x.device)
            y = y.index_select(a, pick)
            continue
        coords = np.clip(coords, 0, n_in - 1)
        lo = np.floor(coords).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        shape = [1] * y.ndim
        shape[a] = n_out
        w = torch.from_numpy((coords - lo).reshape(shape)).to(device=x.device, dtype=x.dtype)
        y0 = y.index_select(a, torch.from_numpy(lo).to(x.device))
        y1 = y.index_select(a, torch.from_numpy(hi).to(x.device))
        y = y0 * (1 - w) + y1 * w
    return y


# ------------------------------------------------------------------------------------------------
# The backend
# ------------------------------------------------------------------------------------------------


def _unsupported(node: Node, reason: str) -> UnsupportedOp:
    # suggest numpy only when its registry has the op (torch lacks a variant numpy may run)
    return unsupported("torch", node, reason, [b for b in FALLBACK_BACKENDS if b != "numpy" or node.op in reference.OPS])


def _check_node(node: Node, opset: int) -> TorchOp:
    """The implementation that runs ``node``; UnsupportedOp saying why when there is none."""
    return machinery.check_node(node, opset, OPS, lambda entry: entry.impl, _unsupported, "torch")


@dataclass
class _Step:
    node: Node
    run: Callable[..., Any]
    attrs: dict[str, Any]
    #: per input: (name, read as a host parameter)
    reads: list[tuple[str, bool]]
    on_host: bool
    release: list[str]


class TorchExecutable(Executable):
    """A checked graph with its weights on ``device`` and its shape arithmetic on the host."""

    def __init__(self, graph: Graph, device: str):
        self.graph = graph
        self.device = torch.device(device)
        opset = graph.opset
        entries = [_check_node(node, opset) for node in graph.nodes]
        host: dict[str, np.ndarray] = {}  # constants usable on the host (small or integer)
        dev: dict[str, Any] = {}  # constants on the device
        host_values = set()  # values computed on the host at run time
        for name, array in graph.initializers.items():
            array = np.asarray(array)
            if array.dtype.kind != "f" or array.size <= _SMALL_CONST:
                host[name] = array
        as_data: set[str] = set()
        folded_from: set[str] = set()
        plan: list[tuple[Node, TorchOp, bool]] = []
        graph.check_wiring()
        for node, entry in zip(graph.nodes, entries):
            present = [n for n in node.inputs if n]
            hostable = node.op in reference.OPS and node.op not in machinery.NEVER_FOLD
            if hostable and all(n in host for n in present):
                self._fold(node, host)  # depends on constants only: computed once, now
                folded_from.update(n for n in present if n in graph.initializers)
                continue
            on_host = hostable and all(n in host or n in host_values for n in present)
            if on_host or node.op in ("Shape", "Size"):  # their torch versions give host arrays
                host_values.update(o for o in node.outputs if o)
            else:
                as_data.update(n for i, n in enumerate(node.inputs) if n and i not in entry.params)
            plan.append((node, entry, on_host))
        # weights to the device once; host constants read as data get a device copy too
        for name, array in graph.initializers.items():
            if name not in host or name in as_data:
                dev[name] = self._to_device(np.asarray(array))
        for name in as_data & set(host) - set(dev):
            dev[name] = self._to_device(host[name])
        self._host, self._dev = host, dev
        self._steps = self._schedule(plan, opset)
        self._required = [v.name for v in graph.inputs if v.name not in graph.initializers]
        self._known = {v.name for v in graph.inputs} | set(graph.initializers)
        self._folded_from = frozenset(folded_from)

    def _fold(self, node: Node, host: dict[str, np.ndarray]) -> None:
        impl = reference.check_node(node, self.graph.opset)
        attrs = dict(node.attrs)
        if impl.num_outputs and attrs.get("num_outputs") is None:
            attrs["num_outputs"] = len(node.outputs)
        results = impl.run(*[host[n] if n else None for n in node.inputs], **attrs)
        for name, value in zip(node.outputs, results if isinstance(results, tuple) else (results,)):
            if name:
                host[name] = np.asarray(value)

    def _schedule(self, plan: list[tuple[Node, TorchOp, bool]], opset: int) -> list[_Step]:
        # folded nodes ran once at build time: the schedule is over the nodes that run
        ran = Graph([node for node, _, _ in plan], self.graph.inputs, self.graph.outputs)
        release = ran.release_schedule()
        steps = []
        for (node, entry, on_host), dead in zip(plan, release):
            impl = reference.check_node(node, opset) if on_host else entry.impl
            attrs = dict(node.attrs)
            if impl.num_outputs and attrs.get("num_outputs") is None:
                attrs["num_outputs"] = len(node.outputs)
            reads = [(n, i in entry.params) for i, n in enumerate(node.inputs)]
            steps.append(_Step(node, impl.run, attrs, reads, on_host, dead))
        return steps

    def _to_device(self, array: np.ndarray) -> "torch.Tensor":
        """``array`` as a tensor on the device; on the CPU it shares the array's memory.

        Strided views (a lowered factor's transpose) are kept as they are: torch ops take strides,
        and a contiguous copy would double the weights. Read-only arrays (an mmap'd artifact, a
        caller's feed) are shared too: nothing here writes to an input or a weight.
        """
        array = np.asarray(array)
        if any(s < 0 for s in array.strides):  # torch cannot view negative strides
            array = array.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
            return torch.from_numpy(array).to(self.device)

    def _value(self, env: dict[str, Any], name: str, param: bool, on_host: bool) -> Any:
        if not name:
            return None
        if name in env:
            value = env[name]
            if on_host and isinstance(value, torch.Tensor):  # a fed override of a host constant
                return value.cpu().numpy()
        elif (param or on_host) and name in self._host:
            return self._host[name]
        elif name in self._dev:
            return self._dev[name]
        else:
            value = self._host[name]
        if on_host or param or not isinstance(value, np.ndarray):
            return value
        return self._to_device(value)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on ``feeds``; names of initializers may be fed to override them.

        Returns every graph output by name, as numpy arrays on the host. Raises
        :class:`InputError` for missing or unknown feeds and :class:`BackendError` naming the node
        when an op fails on the values it was given.
        """
        missing = [name for name in self._required if name not in feeds]
        unknown = sorted(set(feeds) - self._known)
        if missing or unknown:
            raise InputError(
                f"feeds do not match the graph: missing {missing}, unknown {unknown}; "
                f"inputs are {[v.name for v in self.graph.inputs]}"
            )
        folded = sorted(self._folded_from & set(feeds))
        if folded:
            raise InputError(f"constants {folded} were folded into the graph at prepare and cannot be fed; prepare again")
        with torch.inference_mode():
            env = self.execute({name: self._to_device(np.asarray(value)) for name, value in feeds.items()})
            return {o.name: self._to_host(self._value(env, o.name, True, True)) for o in self.graph.outputs}

    def execute(self, env: dict[str, Any]) -> dict[str, Any]:
        """Run every step on ``env`` (value name -> tensor, inputs filled in); return it with the outputs.

        No grad mode is set here: :meth:`run` wraps it in inference mode, and a trainable wrapper
        (``stn_edge.host.compress``) calls it with autograd on.
        """
        for step in self._steps:
            args = [self._value(env, name, param, step.on_host) for name, param in step.reads]
            try:
                results = step.run(*args, **step.attrs)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise BackendError(
                    f"torch backend: node {step.node.name!r} (op {step.node.op!r}) failed: {exc}"
                ) from exc
            if not isinstance(results, tuple):
                results = (results,)
            for name, value in zip(step.node.outputs, results):
                if name:
                    # numpy ops may give numpy scalars; host values are always arrays
                    env[name] = value if isinstance(value, torch.Tensor) else np.asarray(value)
            for name in step.release:
                env.pop(name, None)
        return env

    def _to_host(self, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value.copy()
        array = value.detach().cpu().numpy()
        # on the CPU the array shares the tensor's memory, which may be a weight or a feed
        return array.copy() if self.device.type == "cpu" else np.asarray(array, order="C")


@register("torch")
class TorchBackend(Backend):
    """Runs graphs with torch ops on the CPU or on a CUDA GPU (Jetson included)."""

    devices = ("cpu", "cuda")
    #: measured on the CPU by tools/measure_memory.py (demo MLP, 100/50/25%, torch 2.13, x86-64):
    #: tensors share the runtime's arrays, 1.0-1.07x; ~4.6 MiB fixed (allocator, first run). On
    #: CUDA the weights are copied to the GPU once, outside this (host) count. Activations: the
    #: numpy-style model with workspace, x 1.25; a convolution's first run adds oneDNN scratch and
    #: caches of up to ~16 MiB whatever the batch (grouped/depthwise convs most): 24 MiB fixed.
    engine_memory = EngineMemory(weight_copies=1.25, fixed_bytes=24 << 20, activation_copies=1.25)

    @classmethod
    def check_available(cls, device: str = "cpu") -> None:
        """Raise :class:`BackendUnavailable` unless torch can run on ``device`` here."""
        if torch is None:
            raise BackendUnavailable(f"backend 'torch' needs PyTorch ({_IMPORT_ERROR}); install it with: {INSTALL_HINT}")
        if device not in cls.devices:
            raise BackendUnavailable(
                f"backend 'torch' does not run on device {device!r}; it supports: {', '.join(cls.devices)}"
            )
        if device == "cuda" and not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise BackendUnavailable(
                f"backend 'torch' cannot use device 'cuda': torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"{build}); install a CUDA build of torch that matches the driver, or use device 'cpu'"
            )

    def prepare(self, graph: Graph, device: str = "cpu") -> TorchExecutable:
        """Check every node of ``graph``, move its weights to ``device``, return an executable.

        Raises :class:`UnsupportedOp` (naming the op, the node and the backends that can run it)
        for the first node this backend cannot run, and :class:`BackendUnavailable` for a device
        torch cannot use here.
        """
        self.check_available(device)
        return TorchExecutable(graph, device)


def cuda_event_timer() -> Callable[[Callable[[], Any]], float] | None:
    """A function running ``fn`` between two CUDA events and returning the GPU milliseconds between
    them (kernels run on torch's current stream); None when torch or CUDA is missing.
    :func:`stn_edge.device.profile.cuda_event_timer` asks for it on a CUDA device."""
    if torch is None or not torch.cuda.is_available():
        return None


    def timed(fn: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    return timed
