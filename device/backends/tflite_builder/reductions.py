"""Reductions (Reduce*, global pools, ArgMax/ArgMin), CumSum and Tile."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from stn_edge.device.backends.tflite_builder.converter import (
    _Converter, _Refused, _converts, _dims_of, _drop_axes, _identity,
)
from stn_edge.device.backends.tflite_builder.elementwise import _binary_node, _unary_node, _alias
from stn_edge.device.backends.tflite_builder.shapes import _reshape_to
from stn_edge.device.backends.tflite_flatbuffer import TENSOR_TYPES
from stn_edge.graph import Node


_REDUCERS = {
    "ReduceMean": "MEAN",
    "ReduceSum": "SUM",
    "ReduceMax": "REDUCE_MAX",
    "ReduceMin": "REDUCE_MIN",
    "ReduceProd": "REDUCE_PROD",
}


def _reduce(c: _Converter, node: Node, code: str, axes: list[int] | None, keepdims: bool) -> None:
    v = c.values[node.inputs[0]]
    rank = len(v.shape)
    axes = sorted({a % rank for a in axes}) if axes else list(range(rank))
    perm = v.perm or _identity(rank)
    saxes = [perm.index(a) for a in axes]
    if keepdims:
        shape = tuple(1 if i in axes else s for i, s in enumerate(v.shape))
    else:
        shape = tuple(s for i, s in enumerate(v.shape) if i not in axes)
    out_perm = v.perm if keepdims else _drop_axes(perm, axes)
    out = c.out(node.outputs[0], shape, v.dtype, out_perm)
    c.emit(code, [c.tensor(node.inputs[0], v.perm), c.int_tensor(saxes)], [out], "ReducerOptions", KeepDims=keepdims)
    c.define(node.outputs[0], shape, v.dtype, out, out_perm)


def _keepdims_reshape(c: _Converter, node: Node, source: str, axes: list[int], rank: int) -> None:
    """Value ``node.outputs[0]``: ``source`` (``axes`` dropped) with those axes back as size 1."""
    shape = _with_axes(c.values[source].shape, axes, rank)
    _reshape_to(c, Node("Reshape", node.name, [source], list(node.outputs[:1])), shape)


def _with_axes(shape: Sequence[int], axes: Sequence[int], rank: int) -> list[int]:
    it = iter(shape)
    return [1 if i in axes else next(it) for i in range(rank)]


@_converts("ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp")
def _composite_reduction(c: _Converter, node: Node) -> None:
    """SUM of ABS or squares (then SQRT), and a max-shifted log-sum-exp."""
    x, out = node.inputs[0], node.outputs[0]
    rank = len(c.values[x].shape)
    axes = c.ints(node, 1, "axes")
    if not axes and node.attrs.get("noop_with_empty_axes", 0):
        return _alias(c, node)
    axes = sorted({a % rank for a in axes}) if axes else list(range(rank))
    keep = bool(node.attrs.get("keepdims", 1))
    if node.op == "ReduceLogSumExp":
        top, shifted, exp, total, log = (f"{out}::{t}" for t in ("max", "shifted", "exp", "sum", "log"))
        _reduce(c, Node("ReduceMax", node.name, [x], [top]), "REDUCE_MAX", axes, True)
        _binary_node(c, Node("Sub", node.name, [x, top], [shifted]), "SUB", "SubOptions")
        _unary_node(c, Node("Exp", node.name, [shifted], [exp]), "EXP")
        _reduce(c, Node("ReduceSum", node.name, [exp], [total]), "SUM", axes, True)
        _unary_node(c, Node("Log", node.name, [total], [log]), "LOG")
        result = out if keep else f"{out}::keep"
        _binary_node(c, Node("Add", node.name, [log, top], [result]), "ADD", "AddOptions")
        if not keep:
            kept = [s for i, s in enumerate(c.values[result].shape) if i not in axes]
            _reshape_to(c, Node("Reshape", node.name, [result], [out]), kept)
        return None
    terms = f"{out}::terms"
    if node.op == "ReduceL1":
        _unary_node(c, Node("Abs", node.name, [x], [terms]), "ABS")
    else:
        _binary_node(c, Node("Mul", node.name, [x, x], [terms]), "MUL", "MulOptions", names=[x, x])
    total = out if node.op != "ReduceL2" else f"{out}::sum"
    _reduce(c, Node("ReduceSum", node.name, [terms], [total]), "SUM", axes, keep)
    if node.op == "ReduceL2":
        _unary_node(c, Node("Sqrt", node.name, [total], [out]), "SQRT")
    return None


@_converts("ArgMax", "ArgMin")
def _arg(c: _Converter, node: Node) -> None:
    if node.attrs.get("select_last_index", 0):
        raise _Refused("select_last_index=1 is not supported")
    v = c.values[node.inputs[0]]
    rank = len(v.shape)
    axis = int(node.attrs.get("axis", 0)) % rank
    perm = v.perm or _identity(rank)
    keep = bool(node.attrs.get("keepdims", 1))
    name = node.outputs[0] if not keep else f"{node.outputs[0]}::dropped"
    shape = tuple(s for i, s in enumerate(v.shape) if i != axis)
    out_perm = _drop_axes(perm, [axis])
    out = c.out(name, shape, np.int64, out_perm)
    code, options = ("ARG_MAX", "ArgMaxOptions") if node.op == "ArgMax" else ("ARG_MIN", "ArgMinOptions")
    c.emit(code, [c.tensor(node.inputs[0], v.perm), c.const_tensor(np.array([perm.index(axis)], np.int32))], [out], options,
           OutputType=TENSOR_TYPES[np.dtype(np.int64)])
    c.define(name, shape, np.int64, out, out_perm)
    if keep:
        _keepdims_reshape(c, node, name, [axis], rank)


@_converts("CumSum")
def _cumsum(c: _Converter, node: Node) -> None:
    v = c.values[node.inputs[0]]
    axis = int(c.const(node.inputs[1], "axis").reshape(())) % len(v.shape)
    perm = v.perm or _identity(len(v.shape))
    out = c.out(node.outputs[0], v.shape, v.dtype, v.perm)
    c.emit("CUMSUM", [c.tensor(node.inputs[0], v.perm), c.const_tensor(np.array(perm.index(axis), np.int32))], [out],
           "CumsumOptions", Exclusive=bool(node.attrs.get("exclusive", 0)), Reverse=bool(node.attrs.get("reverse", 0)))
    c.define(node.outputs[0], v.shape, v.dtype, out, v.perm)


@_converts("Tile")
def _tile(c: _Converter, node: Node) -> None:
    v = c.values[node.inputs[0]]
    repeats = _dims_of(c.const(node.inputs[1], "repeats"))
    shape = tuple(s * r for s, r in zip(v.shape, repeats))
    perm = v.perm or _identity(len(v.shape))
    out = c.out(node.outputs[0], shape, v.dtype, v.perm)
    c.emit("TILE", [c.tensor(node.inputs[0], v.perm), c.int_tensor([repeats[p] for p in perm])], [out])
    c.define(node.outputs[0], shape, v.dtype, out, v.perm)


@_converts(*_REDUCERS)
def _reduction(c: _Converter, node: Node) -> None:
    axes = c.ints(node, 1, "axes")
    if not axes and node.attrs.get("noop_with_empty_axes", 0):
        return _alias(c, node)
    _reduce(c, node, _REDUCERS[node.op], axes, bool(node.attrs.get("keepdims", 1)))


@_converts("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(c: _Converter, node: Node) -> None:
    rank = len(c.values[node.inputs[0]].shape)
    _reduce(c, node, "MEAN" if node.op == "GlobalAveragePool" else "REDUCE_MAX", list(range(2, rank)), True)
