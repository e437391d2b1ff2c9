"""Shapes and indexing: Reshape family, Transpose, Concat, Split, Slice, Gather, Expand, Pad, Resize."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from stn_edge import geometry as geo
from stn_edge.device.backends.tflite_builder.converter import (
    NHWC, _ACT_NONE, _MIRROR_REFLECT, _Converter, _Refused, _Value, _argsort, _converts, _dims_of, _drop_axes, _identity,
)
from stn_edge.device.backends.tflite_builder.elementwise import _alias
from stn_edge.graph import Node


def _reshape_to(c: _Converter, node: Node, shape: Sequence[int]) -> None:
    v = c.values[node.inputs[0]]
    if math.prod(shape) != math.prod(v.shape):
        raise _Refused(f"cannot reshape {list(v.shape)} to {list(shape)}")
    if v.perm and c._moves_only_ones(node.inputs[0], v, v.perm, _argsort(v.perm)):
        src = v.tensor  # stored in the logical order up to size-1 axes: reshape it as it is
    else:
        src = c.tensor(node.inputs[0])
    out = c.out(node.outputs[0], shape, v.dtype)
    c.emit("RESHAPE", [src, c.int_tensor(c._target(node.outputs[0], shape))], [out])
    c.define(node.outputs[0], shape, v.dtype, out)


@_converts("Reshape")
def _reshape(c: _Converter, node: Node) -> None:
    v = c.values[node.inputs[0]]
    dims = _dims_of(c.const(node.inputs[1], "shape"))
    if not node.attrs.get("allowzero", 0):
        dims = [v.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = math.prod(v.shape) // known if known else 0
    _reshape_to(c, node, dims)


@_converts("Flatten")
def _flatten(c: _Converter, node: Node) -> None:
    shape = c.values[node.inputs[0]].shape
    axis = int(node.attrs.get("axis", 1))
    axis = axis + len(shape) if axis < 0 else axis
    _reshape_to(c, node, [math.prod(shape[:axis]), math.prod(shape[axis:])])


@_converts("Squeeze")
def _squeeze(c: _Converter, node: Node) -> None:
    shape = c.values[node.inputs[0]].shape
    axes = c.ints(node, 1, "axes")
    axes = {a % len(shape) for a in axes} if axes is not None else {i for i, s in enumerate(shape) if s == 1}
    _reshape_to(c, node, [s for i, s in enumerate(shape) if i not in axes])


@_converts("Unsqueeze")
def _unsqueeze(c: _Converter, node: Node) -> None:
    shape = list(c.values[node.inputs[0]].shape)
    axes = c.ints(node, 1, "axes") or []
    rank = len(shape) + len(axes)
    for a in sorted(x % rank for x in axes):
        shape.insert(a, 1)
    _reshape_to(c, node, shape)


@_converts("Transpose")
def _transpose(c: _Converter, node: Node) -> None:
    """No op: the output is the input's storage under another permutation."""
    v = c.values[node.inputs[0]]
    rank = len(v.shape)
    p = [int(i) for i in node.attrs.get("perm") or reversed(range(rank))]
    current = v.perm or _identity(rank)
    inverse = _argsort(current)
    moves = [inverse[i] for i in p]  # storage axes in the output's logical order
    c.define(node.outputs[0], [v.shape[i] for i in p], v.dtype, v.tensor, tuple(_argsort(moves)))


@_converts("Shape")
def _shape(c: _Converter, node: Node) -> None:
    shape = np.array(c.values[node.inputs[0]].shape, dtype=np.int64)
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    c.values[node.outputs[0]] = _Value(shape[start:end].shape, np.dtype(np.int64), const=shape[start:end])


@_converts("Size")
def _size(c: _Converter, node: Node) -> None:
    size = np.array(math.prod(c.values[node.inputs[0]].shape), np.int64)
    c.values[node.outputs[0]] = _Value((), size.dtype, const=size)


@_converts("Concat")
def _concat(c: _Converter, node: Node) -> None:
    names = [n for n in node.inputs if n]
    first = c.values[names[0]]
    rank = len(first.shape)
    axis = int(node.attrs["axis"]) % rank
    live = [n for n in names if not c.is_const(n)]
    perm = c.values[live[0]].perm if live else None
    shape = list(first.shape)
    shape[axis] = sum(c.values[n].shape[axis] for n in names)
    out = c.out(node.outputs[0], shape, first.dtype, perm)
    saxis = (perm or _identity(rank)).index(axis)
    # no fused activation: LiteRT's kernel refuses one and XNNPACK would silently drop it
    c.emit("CONCATENATION", [c.tensor(n, perm) for n in names], [out], "ConcatenationOptions", Axis=saxis,
           FusedActivationFunction=_ACT_NONE)
    c.define(node.outputs[0], shape, first.dtype, out, perm)


@_converts("Split")
def _split(c: _Converter, node: Node) -> None:
    v = c.values[node.inputs[0]]
    rank = len(v.shape)
    axis = int(node.attrs.get("axis", 0)) % rank
    sizes = c.ints(node, 1, "split")
    n_out = len(node.outputs)
    if not sizes:
        chunk = -(-v.shape[axis] // int(node.attrs.get("num_outputs") or n_out))
        sizes = [min(chunk, v.shape[axis] - chunk * i) for i in range(n_out)]
    perm = v.perm or _identity(rank)
    outs = []
    for i, (name, size) in enumerate(zip(node.outputs, sizes)):
        shape = list(v.shape)
        shape[axis] = size
        outs.append((name, shape, c.out(name or f"{node.name}/unused{i}", shape, v.dtype, v.perm)))
    inputs = [c.tensor(node.inputs[0], v.perm), c.int_tensor(sizes), c.const_tensor(np.array(perm.index(axis), np.int32))]
    c.emit("SPLIT_V", inputs, [o[2] for o in outs], "SplitVOptions", NumSplits=len(sizes))
    for name, shape, tensor in outs:
        if name:
            c.define(name, shape, v.dtype, tensor, v.perm)


@_converts("Slice")
def _slice(c: _Converter, node: Node) -> None:
    v = c.values[node.inputs[0]]
    rank = len(v.shape)
    starts, ends = c.ints(node, 1, "starts"), c.ints(node, 2, "ends")
    axes = c.ints(node, 3, "axes") or list(range(len(starts)))
    steps = c.ints(node, 4) or [1] * len(starts)
    perm = v.perm or _identity(rank)
    begin, end, stride = [0] * rank, [0] * rank, [1] * rank
    begin_mask = end_mask = (1 << rank) - 1
    shape = list(v.shape)
    for start, stop, axis, step in zip(starts, ends, axes, steps):
        axis %= rank
        dim = v.shape[axis]
        bounds = geo.slice_bounds(start, stop, step, dim)
        shape[axis] = len(range(dim)[bounds])
        i = perm.index(axis)
        stride[i] = step
        whole_start = bounds.start == (0 if step > 0 else dim - 1)
        whole_end = bounds.stop is None or (step > 0 and bounds.stop == dim)
        if not whole_start:
            begin[i] = bounds.start
            begin_mask &= ~(1 << i)
        if not whole_end:
            end[i] = bounds.stop
            end_mask &= ~(1 << i)
    out = c.out(node.outputs[0], shape, v.dtype, v.perm)
    c.emit(
        "STRIDED_SLICE",
        [c.tensor(node.inputs[0], v.perm), c.int_tensor(begin), c.int_tensor(end), c.int_tensor(stride)],
        [out],
        "StridedSliceOptions",
        BeginMask=begin_mask,
        EndMask=end_mask,
    )
    c.define(node.outputs[0], shape, v.dtype, out, v.perm)


@_converts("Gather")
def _gather(c: _Converter, node: Node) -> None:
    data, indices = node.inputs[:2]
    v, iv = c.values[data], c.values[indices]
    rank = len(v.shape)
    axis = int(node.attrs.get("axis", 0)) % rank
    if iv.const is not None:
        idx = np.asarray(iv.const)
        idx = np.where(idx < 0, idx + v.shape[axis], idx).astype(np.int32)
        idx_tensor = c.const_tensor(idx)
    else:
        idx_tensor = c.tensor(indices)
    scalar = len(iv.shape) == 0
    perm = v.perm if (scalar and v.const is None) else None
    shape = v.shape[:axis] + iv.shape + v.shape[axis + 1 :]
    out_perm = _drop_axes(perm, [axis]) if perm else None
    saxis = perm.index(axis) if perm else axis
    out = c.out(node.outputs[0], shape, v.dtype, out_perm)
    c.emit("GATHER", [c.tensor(data, perm), idx_tensor], [out], "GatherOptions", Axis=saxis)
    c.define(node.outputs[0], shape, v.dtype, out, out_perm)


@_converts("Expand")
def _expand(c: _Converter, node: Node) -> None:
    v = c.values[node.inputs[0]]
    shape = tuple(int(s) for s in np.broadcast_shapes(v.shape, tuple(_dims_of(c.const(node.inputs[1], "shape")))))
    if shape == v.shape:
        return _alias(c, node)
    out = c.out(node.outputs[0], shape, v.dtype)
    c.emit("BROADCAST_TO", [c.tensor(node.inputs[0]), c.int_tensor(shape)], [out])
    c.define(node.outputs[0], shape, v.dtype, out)


@_converts("Pad")
def _pad(c: _Converter, node: Node) -> None:
    v = c.values[node.inputs[0]]
    rank = len(v.shape)
    amounts = c.ints(node, 1, "pads")
    axes = [a % rank for a in (c.ints(node, 3) or range(rank))]
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = amounts[i], amounts[i + len(axes)]
    if min(begin + end) < 0:
        raise _Refused("negative pads (cropping) are not supported")
    mode = node.attrs.get("mode", "constant")
    value = 0.0
    if len(node.inputs) > 2 and node.inputs[2]:
        given = np.asarray(c.const(node.inputs[2], "constant_value")).reshape(-1)
        value = float(given[0]) if given.size else 0.0
    perm = v.perm or _identity(rank)
    paddings = np.array([[begin[p], end[p]] for p in perm], dtype=np.int32)
    shape = [s + b + e for s, b, e in zip(v.shape, begin, end)]
    out = c.out(node.outputs[0], shape, v.dtype, v.perm)
    x = c.tensor(node.inputs[0], v.perm)
    if mode == "constant":
        if value == 0.0:
            c.emit("PAD", [x, c.const_tensor(paddings)], [out])
        else:
            c.emit("PADV2", [x, c.const_tensor(paddings), c.const_tensor(np.array(value, v.dtype))], [out])
    elif mode == "reflect":
        c.emit("MIRROR_PAD", [x, c.const_tensor(paddings)], [out], "MirrorPadOptions", Mode=_MIRROR_REFLECT)
    else:
        raise _Refused(f"Pad mode {mode!r} is not supported (constant, reflect)")
    c.define(node.outputs[0], shape, v.dtype, out, v.perm)


@_converts("Resize")
def _resize(c: _Converter, node: Node) -> None:
    """Nearest (asymmetric, floor) and bilinear (half_pixel, align_corners, asymmetric) 2-D resizes."""
    v = c.values[node.inputs[0]]
    if len(v.shape) != 4:
        raise _Refused("only 4-D (N, C, H, W) Resize is supported")
    mode = node.attrs.get("mode", "nearest")
    ctm = node.attrs.get("coordinate_transformation_mode", "half_pixel")
    if node.attrs.get("axes") is not None or node.attrs.get("antialias", 0):
        raise _Refused("Resize with axes or antialias is not supported")
    sizes = c.ints(node, 3)
    if sizes:
        if len(sizes) != 4 or sizes[1] != v.shape[1]:
            raise _Refused(f"Resize sizes {sizes} change more than height and width")
        out_hw = sizes[-2:]
    else:
        scales = np.asarray(c.const(node.inputs[2], "scales"), dtype=np.float64).reshape(-1)
        if len(scales) != 4 or scales[0] != 1 or scales[1] != 1:
            raise _Refused(f"Resize scales {scales.tolist()} change more than height and width")
        out_hw = [int(math.floor(v.shape[2 + i] * scales[-2 + i])) for i in range(2)]
        if any(o != v.shape[2 + i] * scales[-2 + i] for i, o in enumerate(out_hw)):
            # ONNX maps coordinates with the given scale, TFLite with out / in: equal only here
            raise _Refused(f"scales {scales.tolist()} do not give whole output sizes")
    if mode == "nearest" and ctm == "asymmetric" and node.attrs.get("nearest_mode", "round_prefer_floor") == "floor":
        code, options = "RESIZE_NEAREST_NEIGHBOR", "ResizeNearestNeighborOptions"
        fields = {"AlignCorners": False, "HalfPixelCenters": False}
    elif mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"):
        if ctm == "pytorch_half_pixel" and 1 in out_hw:
            raise _Refused("pytorch_half_pixel to an output size of 1 is not supported")
        code, options = "RESIZE_BILINEAR", "ResizeBilinearOptions"
        fields = {"AlignCorners": ctm == "align_corners", "HalfPixelCenters": ctm in ("half_pixel", "pytorch_half_pixel")}
    else:
        raise _Refused(f"Resize mode={mode!r}, coordinate_transformation_mode={ctm!r} is not supported")
    shape = (v.shape[0], v.shape[1], out_hw[0], out_hw[1])
    out = c.out(node.outputs[0], shape, v.dtype, NHWC)
    c.emit(code, [c.tensor(node.inputs[0], NHWC), c.int_tensor(out_hw)], [out], options, **fields)
    c.define(node.outputs[0], shape, v.dtype, out, NHWC)
