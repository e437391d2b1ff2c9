"""Convolution and pooling: CONV_2D, DEPTHWISE_CONV_2D, grouped and transposed convolutions, pools (NHWC)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from stn_edge import geometry as geo
from stn_edge.device.backends.tflite_builder.converter import (
    NHWC, _ACT_NONE, _PAD_SAME, _PAD_VALID, _Converter, _Refused, _converts,
)
from stn_edge.graph import Node


def _same_pads(
    sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> tuple[list[int], list[int]]:
    """TFLite's SAME padding: ONNX SAME_UPPER."""
    return geo.window_pads(sizes, kernel, strides, dilations, None, "SAME_UPPER")


def _pad_input(
    c: _Converter, x: int, nhwc: list[int], begin: Sequence[int], end: Sequence[int], value: float = 0.0
) -> tuple[int, list[int]]:
    """Explicit PAD / PADV2 of an NHWC tensor; returns the padded tensor and its shape."""
    shape = [nhwc[0], nhwc[1] + begin[0] + end[0], nhwc[2] + begin[1] + end[1], nhwc[3]]
    paddings = np.array([[0, 0], [begin[0], end[0]], [begin[1], end[1]], [0, 0]], dtype=np.int32)
    out = c.temp(shape, np.float32, "pad")
    if value == 0.0:
        c.emit("PAD", [x, c.const_tensor(paddings)], [out])
    else:
        c.emit("PADV2", [x, c.const_tensor(paddings), c.const_tensor(np.array(value, np.float32))], [out])
    return out, shape


def _conv_geometry(
    node: Node, sizes: Sequence[int], kernel: Sequence[int]
) -> tuple[list[int], list[int], list[int], list[int]]:
    nd = len(sizes)
    strides = list(node.attrs.get("strides") or [1] * nd)
    dilations = list(node.attrs.get("dilations") or [1] * nd)
    pads, auto_pad = node.attrs.get("pads"), node.attrs.get("auto_pad", "NOTSET")
    begin, end = geo.window_pads(sizes, kernel, strides, dilations, pads, auto_pad)
    return strides, dilations, begin, end


def _as_2d(c: _Converter, name: str) -> tuple[int, list[int], bool]:
    """Value ``name`` (N, C, *spatial) with 1 or 2 spatial dims as an NHWC tensor."""
    v = c.values[name]
    if len(v.shape) == 4:
        return c.tensor(name, NHWC), [v.shape[0], v.shape[2], v.shape[3], v.shape[1]], False
    if len(v.shape) == 3:  # 1-D: (N, C, L) -> (N, 1, L, C)
        nlc = c.tensor(name, (0, 2, 1))
        shape = [v.shape[0], 1, v.shape[2], v.shape[1]]
        out = c.temp(shape, v.dtype, "as2d")
        target = c._target(name, [v.shape[0], v.shape[2], v.shape[1]], (0, 2, 1))
        c.emit("RESHAPE", [nlc, c.int_tensor(target[:1] + [1] + target[1:])], [out])
        return out, shape, True
    raise _Refused(f"{len(v.shape) - 2}-D spatial input is not supported (1-D and 2-D only)")


def _define_nhwc(c: _Converter, name: str, tensor_fn: Callable[[int], None], nhwc: list[int], one_d: bool) -> None:
    """Create the output value ``name`` from an NHWC result, reshaping back to (N, L, C) for 1-D."""
    n, h, w, ch = nhwc
    if not one_d:
        out = c.out(name, (n, ch, h, w), np.float32, NHWC)
        tensor_fn(out)
        c.define(name, (n, ch, h, w), np.float32, out, NHWC)
        return
    mid = c.temp(nhwc, np.float32, "out2d")
    tensor_fn(mid)
    out = c.out(name, (n, ch, w), np.float32, (0, 2, 1))
    c.emit("RESHAPE", [mid, c.int_tensor(c._target(name, [n, w, ch], (0, 2, 1)))], [out])
    c.define(name, (n, ch, w), np.float32, out, (0, 2, 1))


def _lift(values: Sequence[int], one_d: bool, fill: int) -> list[int]:
    return [fill] + list(values) if one_d else list(values)


def _lift_pads(begin: Sequence[int], end: Sequence[int], one_d: bool) -> tuple[list[int], list[int]]:
    return _lift(begin, one_d, 0), _lift(end, one_d, 0)


@_converts("Conv")
def _conv(c: _Converter, node: Node) -> None:
    w = c.const(node.inputs[1], "weight")
    if w.dtype != np.float32:
        raise _Refused(f"weights of dtype {w.dtype} are not supported (float32)")
    if w.ndim != len(c.values[node.inputs[0]].shape):
        raise _Refused(f"a {w.ndim - 2}-D kernel on a rank-{len(c.values[node.inputs[0]].shape)} input")
    bias_name = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    m = w.shape[0]
    bias = c.const(bias_name, "bias").astype(np.float32) if bias_name else np.zeros(m, np.float32)
    x, nhwc, one_d = _as_2d(c, node.inputs[0])
    sizes = c.values[node.inputs[0]].shape[2:]
    strides, dilations, begin, end = _conv_geometry(node, sizes, w.shape[2:])
    strides, dilations = _lift(strides, one_d, 1), _lift(dilations, one_d, 1)
    begin, end = _lift_pads(begin, end, one_d)
    kernel = [1, w.shape[2]] if one_d else list(w.shape[2:])
    ohwi = (lambda w: w[:, :, None, :].transpose(0, 2, 3, 1)) if one_d else (lambda w: w.transpose(0, 2, 3, 1))
    group = int(node.attrs.get("group", 1))
    cin = nhwc[3]
    padded = [nhwc[1] + begin[0] + end[0], nhwc[2] + begin[1] + end[1]]
    if not any(begin) and not any(end):
        padding = _PAD_VALID
    elif (begin, end) == tuple(_same_pads(nhwc[1:3], kernel, strides, dilations)):
        padding = _PAD_SAME
    else:
        x, nhwc = _pad_input(c, x, nhwc, begin, end)
        padding = _PAD_VALID
    out_hw = geo.conv_out(padded, kernel, strides, dilations)
    out_nhwc = [nhwc[0], out_hw[0], out_hw[1], m]
    name, act = c.take_activation(node.outputs[0])
    geometry = dict(Padding=padding, StrideH=strides[0], StrideW=strides[1], DilationHFactor=dilations[0],
                    DilationWFactor=dilations[1], FusedActivationFunction=act)

    def emit(out: int) -> None:
        if group == 1:
            weight = c.const_tensor(w, derive=("ohwi", ohwi))
            c.emit("CONV_2D", [x, weight, c.const_tensor(bias)], [out], "Conv2DOptions", **geometry)
        elif w.shape[1] == 1 and group == cin and m % cin == 0:
            # (M, 1, kh, kw) -> (1, kh, kw, M): output channel c * multiplier + j, as in ONNX
            dw = c.const_tensor(w, derive=("1hwo", lambda w: ohwi(w).transpose(3, 1, 2, 0)))
            c.emit("DEPTHWISE_CONV_2D", [x, dw, c.const_tensor(bias)], [out], "DepthwiseConv2DOptions",
                   DepthMultiplier=m // cin, **geometry)
        else:
            _grouped_conv(c, x, nhwc, out_nhwc, w, ohwi, bias, group, geometry, out)

    _define_nhwc(c, name, emit, out_nhwc, one_d)


def _grouped_conv(
    c: _Converter,
    x: int,
    nhwc: list[int],
    out_nhwc: list[int],
    w: np.ndarray,
    ohwi: Callable[[np.ndarray], np.ndarray],
    bias: np.ndarray,
    group: int,
    geometry: dict[str, int],
    out: int,
) -> None:
    """SPLIT into groups, one CONV_2D each, CONCATENATION (TFLite's grouped CONV_2D is not portable)."""
    cg, mg = nhwc[3] // group, w.shape[0] // group
    parts = [c.temp(nhwc[:3] + [cg], np.float32, f"group{g}") for g in range(group)]
    c.emit("SPLIT", [c.const_tensor(np.array(3, np.int32)), x], parts, "SplitOptions", NumSplits=group)
    results = []
    for g, part in enumerate(parts):
        y = c.temp(out_nhwc[:3] + [mg], np.float32, f"conv{g}")
        wg = c.const_tensor(w, derive=(f"ohwi{g}/{group}", lambda w, g=g: ohwi(w[g * mg : (g + 1) * mg])))
        bg = np.ascontiguousarray(bias[g * mg : (g + 1) * mg])
        c.emit("CONV_2D", [part, wg, c.const_tensor(bg)], [y], "Conv2DOptions", **geometry)
        results.append(y)
    # the activation stays on the convolutions: LiteRT's CONCATENATION refuses a fused one
    c.emit("CONCATENATION", results, [out], "ConcatenationOptions", Axis=3, FusedActivationFunction=_ACT_NONE)


def _transpose_conv_pads(
    node: Node, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int]
) -> tuple[list[int], list[int], list[int]]:
    """Full output size and the begin / end crops of an ONNX ConvTranspose (dilation 1)."""
    nd = len(sizes)
    extra = list(node.attrs.get("output_padding") or [0] * nd)
    full = [s * (i - 1) + a + k for s, i, a, k in zip(strides, sizes, extra, kernel)]
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    output_shape = node.attrs.get("output_shape")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape)[-nd:] if output_shape is not None else [i * s for i, s in zip(sizes, strides)]
        mode = "SAME_UPPER" if auto_pad == "SAME_UPPER" else "SAME_LOWER"
        split = [geo.same_pads(f - t, mode) for f, t in zip(full, target)]
        return full, [p[0] for p in split], [p[1] for p in split]
    pads = node.attrs.get("pads")
    if auto_pad == "VALID" or not pads:
        return full, [0] * nd, [0] * nd
    return full, list(pads[:nd]), list(pads[nd:])


@_converts("ConvTranspose")
def _conv_transpose(c: _Converter, node: Node) -> None:
    """TRANSPOSE_CONV (VALID, output_padding as extra output) then a crop for the ONNX pads."""
    w = c.const(node.inputs[1], "weight")
    x_shape = c.values[node.inputs[0]].shape
    if w.dtype != np.float32 or w.ndim != len(x_shape):
        raise _Refused(f"a weight of shape {w.shape} ({w.dtype}) on a rank-{len(x_shape)} input is not supported")
    if int(node.attrs.get("group", 1)) != 1 or any(d != 1 for d in node.attrs.get("dilations") or []):
        raise _Refused("grouped or dilated ConvTranspose is not supported")
    m = w.shape[1]
    bias_name = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    bias = c.const(bias_name, "bias").astype(np.float32) if bias_name else np.zeros(m, np.float32)
    x, nhwc, one_d = _as_2d(c, node.inputs[0])
    strides = list(node.attrs.get("strides") or [1] * (len(x_shape) - 2))
    full, begin, end = _transpose_conv_pads(node, x_shape[2:], w.shape[2:], strides)
    full, begin, end, strides = _lift(full, one_d, 1), _lift(begin, one_d, 0), _lift(end, one_d, 0), _lift(strides, one_d, 1)
    # (C_in, C_out, *k) -> (C_out, kh, kw, C_in)
    ohwi = (lambda w: w[:, :, None, :].transpose(1, 2, 3, 0)) if one_d else (lambda w: w.transpose(1, 2, 3, 0))
    full_nhwc = [nhwc[0], full[0], full[1], m]
    out_nhwc = [nhwc[0], full[0] - begin[0] - end[0], full[1] - begin[1] - end[1], m]

    def emit(out: int) -> None:
        cropped = any(begin) or any(end)
        target = c.temp(full_nhwc, np.float32, "full") if cropped else out
        inputs = [c.int_tensor(full_nhwc), c.const_tensor(w, derive=("t_ohwi", ohwi)), x, c.const_tensor(bias)]
        c.emit("TRANSPOSE_CONV", inputs, [target], "TransposeConvOptions", Padding=_PAD_VALID, StrideH=strides[0],
               StrideW=strides[1], FusedActivationFunction=_ACT_NONE)
        if cropped:
            stops = [0, full[0] - end[0], full[1] - end[1], 0]
            bounds = [c.int_tensor([0, begin[0], begin[1], 0]), c.int_tensor(stops), c.int_tensor([1] * 4)]
            c.emit("STRIDED_SLICE", [target, *bounds], [out], "StridedSliceOptions", BeginMask=0b1001, EndMask=0b1001)

    _define_nhwc(c, node.outputs[0], emit, out_nhwc, one_d)


def _pool_attrs(c: _Converter, node: Node) -> tuple[list[int], list[int]]:
    kernel = list(node.attrs["kernel_shape"])
    if len(kernel) != len(c.values[node.inputs[0]].shape) - 2:
        raise _Refused(f"kernel_shape {kernel} does not match the input's spatial rank")
    if any(d != 1 for d in node.attrs.get("dilations") or []):
        raise _Refused("dilated pooling is not supported")
    if node.attrs.get("storage_order", 0):
        raise _Refused("storage_order=1 is not supported")
    if len(node.outputs) > 1 and node.outputs[1]:
        raise _Refused("the Indices output of MaxPool is not supported")
    strides = list(node.attrs.get("strides") or [1] * len(kernel))
    return kernel, strides


@_converts("MaxPool", "AveragePool")
def _pool(c: _Converter, node: Node) -> None:
    """Pools with ONNX pads and ceil_mode: SAME when that is what they are, else explicit padding.

    MaxPool pads with -inf. AveragePool pads with zeros, pools VALID (sum / k) and rescales each
    output by k / count, ``count`` being the cells ONNX's divisor counts (``count_include_pad``).
    """
    kernel, strides = _pool_attrs(c, node)
    sizes = list(c.values[node.inputs[0]].shape[2:])
    dilations = [1] * len(kernel)
    pads, auto_pad, ceil_mode = node.attrs.get("pads"), node.attrs.get("auto_pad", "NOTSET"), node.attrs.get("ceil_mode", 0)
    g = geo.pool_geometry(sizes, kernel, strides, dilations, pads, auto_pad, int(ceil_mode))
    x, nhwc, one_d = _as_2d(c, node.inputs[0])
    k2, s2 = _lift(kernel, one_d, 1), _lift(strides, one_d, 1)
    sizes2, outs2 = _lift(sizes, one_d, 1), _lift(g.out, one_d, 1)
    b2, e2 = _lift_pads(g.begin, g.end, one_d)
    # the ceil_mode overhang: cells past the end padding that the last window reaches
    full_end = [e + h for e, h in zip(e2, _lift(g.overhang, one_d, 0))]
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    same_b, same_e = _same_pads(sizes2, k2, s2, [1, 1])
    is_same = b2 == same_b and full_end == same_e and outs2 == [-(-n // s) for n, s in zip(sizes2, s2)]
    scale = None
    if not any(b2) and not any(full_end):
        padding = _PAD_VALID
    elif is_same and (node.op == "MaxPool" or not include_pad):
        padding = _PAD_SAME  # TFLite's SAME pooling ignores padded cells, as these ONNX pools do
    else:
        fill = -np.inf if node.op == "MaxPool" else 0.0
        x, nhwc = _pad_input(c, x, nhwc, b2, full_end, fill)
        padding = _PAD_VALID
        if node.op == "AveragePool":
            scale = _average_rescale(sizes2, k2, s2, b2, e2, full_end, outs2, include_pad)
    code = "MAX_POOL_2D" if node.op == "MaxPool" else "AVERAGE_POOL_2D"
    out_nhwc = [nhwc[0], outs2[0], outs2[1], nhwc[3]]
    fields = dict(Padding=padding, StrideH=s2[0], StrideW=s2[1], FilterHeight=k2[0], FilterWidth=k2[1])

    def emit(out: int) -> None:
        if scale is None:
            c.emit(code, [x], [out], "Pool2DOptions", FusedActivationFunction=0, **fields)
            return
        mid = c.temp(out_nhwc, np.float32, "pooled")
        c.emit(code, [x], [mid], "Pool2DOptions", FusedActivationFunction=0, **fields)
        c.emit("MUL", [mid, c.const_tensor(scale)], [out], "MulOptions", FusedActivationFunction=0)

    _define_nhwc(c, node.outputs[0], emit, out_nhwc, one_d)


def _average_rescale(sizes, kernel, strides, begin, end, full_end, outs, include_pad) -> np.ndarray | None:
    """(1, Ho, Wo, 1) factors turning a VALID average over a padded input into ONNX's average."""
    mask = np.ones(sizes, dtype=np.float64)
    if include_pad:
        mask = np.pad(mask, list(zip(begin, end)), constant_values=1.0)
        mask = np.pad(mask, [(0, f - e) for f, e in zip(full_end, end)], constant_values=0.0)
    else:
        mask = np.pad(mask, list(zip(begin, full_end)), constant_values=0.0)
    count = np.zeros(outs)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            rows = slice(i, i + (outs[0] - 1) * strides[0] + 1, strides[0])
            cols = slice(j, j + (outs[1] - 1) * strides[1] + 1, strides[1])
            count += mask[rows, cols]
    factor = math.prod(kernel) / count
    if np.all(factor == 1.0):
        return None
    return factor.astype(np.float32).reshape(1, outs[0], outs[1], 1)
