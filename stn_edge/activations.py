"""Activation memory: the buffers a graph needs while it runs, at a given batch size.

A loaded model costs its weights (what the planner trades) and the intermediate values of one
inference. The second part does not depend on the ranks much, but it grows with the batch: a
ResNet-18 at batch 32 holds more in activations than in weights at 25%. So ``mem_limit`` counts both
(``docs/RELIABILITY.md``, "What mem_limit counts").

How it is known without running the model on the device:

- **At bake** (:func:`stn_edge.host.value_shapes.record_value_shapes`), the captured graph runs once on the numpy reference
  backend at batch 1 and at batch 2 and the shape of every value is stored in the artifact header
  (``value_shapes``: ``{name: [shape at 1, shape at 2, dtype]}``). Two batch sizes tell which
  dimensions grow with the batch, whatever reshapes the model does (``(N * heads, L, d)`` included).
- **At load** (:func:`activation_bytes`), the values a lowering adds (the rank-sized tensors between
  a factorized layer's ops) get their shapes from the few ops lowerings emit (:data:`SHAPE_RULES`),
  and a liveness walk over the lowered graph in execution order finds the peak: every value is
  held from the node that writes it to its last reader, views (Reshape, Flatten, Squeeze, ...) share
  their input's buffer, and a convolution's im2col workspace is held while it runs.

Bytes at batch ``n`` are linear in ``n`` for every value: ``b(1) + (b(2) - b(1)) * (n - 1)``.
Dimensions other than the batch (a transformer's sequence length) are those of the calibration data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from stn_edge import geometry
from stn_edge.graph import DTYPES, Graph, Node

#: ops whose output is a view of their first input in the engines we run on (no new buffer)
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})

Shape = tuple[int, ...]


# --------------------------------------------------------------------------- device: shapes of lowered values


def _broadcast(*shapes: Shape) -> Shape:
    return tuple(np.broadcast_shapes(*shapes))


def _auto_pad(attrs: dict[str, Any]) -> str:
    value = attrs.get("auto_pad", "NOTSET")
    return value.decode() if isinstance(value, bytes) else str(value)


def _window(x: Shape, kernel: Sequence[int], attrs: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """``(strides, dilations, padded spatial sizes)`` of a Conv or pool over ``x``, the way the
    backends pad (:mod:`stn_edge.geometry`)."""
    nd = len(x) - 2
    strides = list(attrs.get("strides") or [1] * nd)
    dil = list(attrs.get("dilations") or [1] * nd)
    begin, end = geometry.window_pads(x[2:], kernel, strides, dil, attrs.get("pads"), _auto_pad(attrs))
    return strides, dil, [n + b + e for n, b, e in zip(x[2:], begin, end)]


def _conv_shape(x: Shape, w: Shape, attrs: dict[str, Any]) -> Shape:
    kernel = [int(d) for d in w[2:]]
    strides, dil, padded = _window(x, kernel, attrs)
    return (x[0], w[0], *geometry.conv_out(padded, kernel, strides, dil))


def _matmul_shape(a: Shape, b: Shape) -> Shape:
    if len(b) == 1:
        return a[:-1]
    if len(a) == 1:
        return b[:-2] + b[-1:]
    return _broadcast(a[:-2], b[:-2]) + (a[-2], b[-1])


def _gemm_shape(a: Shape, b: Shape, attrs: dict[str, Any]) -> Shape:
    rows = a[1] if attrs.get("transA") else a[0]
    cols = b[0] if attrs.get("transB") else b[1]
    return (rows, cols)


def _reshape_shape(x: Shape, target: np.ndarray, attrs: dict[str, Any]) -> Shape:
    dims = [int(d) for d in np.asarray(target).ravel()]
    if not attrs.get("allowzero"):
        dims = [x[i] if d == 0 and i < len(x) else d for i, d in enumerate(dims)]
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = math.prod(x) // known if known else 0
    return tuple(dims)


def _gather_shape(data: Shape, idx: Shape, attrs: dict[str, Any]) -> Shape:
    axis = int(attrs.get("axis", 0)) % len(data)
    return data[:axis] + idx + data[axis + 1:]


#: op -> rule(input shapes, node attrs, constant inputs) -> output shape, for the ops lowerings emit
SHAPE_RULES: dict[str, Callable[[list[Shape], dict[str, Any], list[Any]], Shape]] = {
    "Conv": lambda s, a, c: _conv_shape(s[0], s[1], a),
    "MatMul": lambda s, a, c: _matmul_shape(s[0], s[1]),
    "Gemm": lambda s, a, c: _gemm_shape(s[0], s[1], a),
    "Gather": lambda s, a, c: _gather_shape(s[0], s[1], a),
    "Add": lambda s, a, c: _broadcast(*s),
    "Mul": lambda s, a, c: _broadcast(*s),
    "Transpose": lambda s, a, c: tuple(s[0][p] for p in (a.get("perm") or range(len(s[0]) - 1, -1, -1))),
    "Reshape": lambda s, a, c: _reshape_shape(s[0], c[1], a),
    "Identity": lambda s, a, c: s[0],
}


# --------------------------------------------------------------------------- device: liveness


@dataclass(frozen=True)
class ActivationEstimate:
    """Peak activation bytes of one inference at ``batch``, and the node where the peak is reached.

    ``recorded`` is False when the artifact holds no value shapes (baked before they were
    recorded): then ``peak`` is 0 and nothing is counted.
    """

    batch: int
    peak: int
    at_node: str
    recorded: bool = True


#: temporaries an op holds while it runs, in multiples of its output's bytes, on engines that run
#: ops as numpy expressions (measured with tracemalloc on the zoo models, numpy 2; the largest seen)
TEMPORARIES: dict[str, float] = {
    "Erf": 8.5, "LayerNormalization": 3.3, "Softmax": 2.3, "LogSoftmax": 2.3, "Gemm": 2.2, "Gelu": 8.5,
    "Sigmoid": 1.1, "HardSigmoid": 1.2, "HardSwish": 1.2, "Add": 0.1, "Mul": 0.1, "AveragePool": 1.0,
    "InstanceNormalization": 3.3, "BatchNormalization": 2.0,
}


def _padded_copy(node: Node, x: Shape, kernel: list[int], itemsize: int) -> int:
    """Bytes of the padded copy of input ``x`` a window op makes (0 when it pads nothing): the
    explicit or SAME pads, and for a pool with ``ceil_mode`` the overhang of its last window."""
    if node.op == "Conv":
        padded = _window(x, kernel, node.attrs)[2]
    else:
        g = geometry.pool_geometry(x[2:], kernel, node.attrs.get("strides"), node.attrs.get("dilations"),
                                   node.attrs.get("pads"), _auto_pad(node.attrs), int(node.attrs.get("ceil_mode", 0)))
        padded = [n + b + e + h for n, b, e, h in zip(x[2:], g.begin, g.end, g.overhang)]
    if list(padded) == list(x[2:]):
        return 0
    return x[0] * x[1] * math.prod(padded) * itemsize


def workspace_bytes(node: Node, inputs: list[Shape], out: Shape, itemsize: int) -> int:
    """Bytes an op holds besides its inputs and outputs on a numpy-style engine: a convolution's
    im2col matrix, the padded copy of a convolution's or pooling's input, and the temporaries of
    :data:`TEMPORARIES`. A 1x1 stride-1 convolution needs no im2col; a depthwise one (one input
    channel per group) multiplies and adds in place, holding one output-sized temporary."""
    size = math.prod(out) * itemsize
    work = int(TEMPORARIES.get(node.op, 0.0) * size)
    if node.op not in ("Conv", "MaxPool", "AveragePool") or not inputs or len(inputs[0]) < 3:
        return work
    x = inputs[0]
    if node.op != "Conv" or len(inputs) < 2:
        return work + _padded_copy(node, x, list(node.attrs.get("kernel_shape") or []), itemsize)
    w = inputs[1]
    k = math.prod(w[2:])
    pad_copy = _padded_copy(node, x, list(w[2:]), itemsize)
    group = int(node.attrs.get("group", 1))
    if group > 1 and w[1] == 1:
        return pad_copy + size
    if k == 1 and all(s == 1 for s in node.attrs.get("strides") or []):
        return pad_copy
    return pad_copy + x[0] * x[1] * k * math.prod(out[2:]) * itemsize


def activation_bytes(graph: Graph, value_shapes: Mapping[str, list[Any]] | None, batch: int = 1,
                     workspace: bool = True) -> ActivationEstimate:
    """Peak bytes of the values one inference of ``graph`` holds at ``batch`` (see the module doc).

    ``graph`` is the lowered graph a backend runs; ``value_shapes`` is the artifact's record. The
    graph's inputs count (an engine holds them while it runs) and so do its outputs. ``workspace``
    adds what each op holds while it runs (:func:`workspace_bytes`: im2col, padded copies,
    temporaries): numpy-style engines need it; onnxruntime's blocked kernels do not.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch!r}")
    if not value_shapes:
        return ActivationEstimate(batch, 0, "", recorded=False)
    const = graph.initializers
    known: dict[str, tuple[Shape, Shape, int]] = {}  # name -> (shape at 1, shape at 2, itemsize)
    for name, rec in value_shapes.items():
        known[name] = (tuple(rec[0]), tuple(rec[1]), DTYPES[rec[2]].itemsize if rec[2] in DTYPES else 4)

    def nbytes(name: str) -> int:
        s1, s2, item = known[name]
        b1, b2 = math.prod(s1) * item, math.prod(s2) * item
        return b1 + (b2 - b1) * (batch - 1)

    def shape_at(name: str, which: int) -> Shape:
        if name in const:
            return tuple(const[name].shape)
        return known[name][which] if name in known else ()

    last_use = graph.last_uses()
    keep = {v.name for v in graph.outputs}
    buffer_of: dict[str, str] = {}  # value -> the value that owns its buffer
    owners: dict[str, set[str]] = {}  # buffer -> values still alive that use it
    sizes: dict[str, int] = {}
    live = 0

    def alloc(name: str, owner: str | None = None) -> int:
        nonlocal live
        if owner is not None:
            buffer_of[name] = owner
            owners[owner].add(name)
            return 0
        buffer_of[name] = name
        owners[name] = {name}
        sizes[name] = nbytes(name) if name in known else 0
        live += sizes[name]
        return sizes[name]

    def release(name: str) -> None:
        nonlocal live
        owner = buffer_of.pop(name, None)
        if owner is None:
            return
        owners[owner].discard(name)
        if not owners[owner]:
            live -= sizes.pop(owner)
            del owners[owner]

    for v in graph.inputs:
        if v.name not in const and v.name in known:
            alloc(v.name)
    peak, at = live, ""
    for i, node in enumerate(graph.nodes):
        for out in node.outputs:
            if out and out not in known:
                _infer(node, out, known, const, shape_at)
        work = 0
        if workspace and node.outputs and node.outputs[0] in known:
            item = known[node.outputs[0]][2]
            w1, w2 = (workspace_bytes(node, [shape_at(n, k) if n else () for n in node.inputs], known[node.outputs[0]][k],
                                      item) for k in (0, 1))
            work = w1 + (w2 - w1) * (batch - 1)
        first_in = node.inputs[0] if node.inputs else ""
        for out in node.outputs:
            if not out:
                continue
            if node.op in VIEW_OPS and first_in in buffer_of:
                alloc(out, buffer_of[first_in])
            else:
                alloc(out)
        if live + work > peak:
            peak, at = live + work, node.name
        for name in set(node.inputs + node.outputs):
            if name and name not in keep and name not in const and last_use.get(name, i) <= i:
                release(name)
    return ActivationEstimate(batch, int(peak), at)


def _infer(node: Node, out: str, known: dict[str, tuple[Shape, Shape, int]], const: Mapping[str, np.ndarray],
           shape_at: Callable[[str, int], Shape]) -> None:
    """Shape of ``out`` (written by ``node``) at batch 1 and 2, from the rules of :data:`SHAPE_RULES`.

    An op without a rule gets the shape of its largest input: an estimate, never zero.
    """
    item = 4
    for name in node.inputs:
        if name in known:
            item = known[name][2]
            break
    consts = [const.get(n) for n in node.inputs]
    got = []
    for which in (0, 1):
        shapes = [shape_at(n, which) if n else () for n in node.inputs]
        rule = SHAPE_RULES.get(node.op)
        try:
            got.append(tuple(int(d) for d in rule(shapes, node.attrs, consts)) if rule else max(shapes, key=math.prod))
        except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError):
            got.append(max(shapes, key=math.prod) if shapes else ())
    known[out] = (got[0], got[1], item)
