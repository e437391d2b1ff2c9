"""Elementwise ops: binary and variadic arithmetic, comparisons, unary functions, Clip, Erf, Softmax, Cast."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from stn_edge.device.backends import numpy as reference
from stn_edge.device.backends.tflite_builder.converter import (
    _ACT_NONE, _ACT_RELU6, _Converter, _Refused, _Value, _converts, _identity,
)
from stn_edge.device.backends.tflite_flatbuffer import TENSOR_TYPES
from stn_edge.graph import Node


_BINARY = {
    "Add": ("ADD", "AddOptions", True),
    "Sub": ("SUB", "SubOptions", True),
    "Mul": ("MUL", "MulOptions", True),
    "Div": ("DIV", "DivOptions", True),
    "Pow": ("POW", None, False),
    "Equal": ("EQUAL", None, False),
    "Less": ("LESS", None, False),
    "LessOrEqual": ("LESS_EQUAL", None, False),
    "Greater": ("GREATER", None, False),
    "GreaterOrEqual": ("GREATER_EQUAL", None, False),
    "And": ("LOGICAL_AND", None, False),
    "Or": ("LOGICAL_OR", None, False),
    "Where": ("SELECT_V2", None, False),
    "Xor": ("NOT_EQUAL", None, False),
    "PRelu": ("PRELU", None, False),
}
_COMPARISONS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor"}


def _broadcast(c: _Converter, names: Sequence[str]) -> tuple[tuple[int, ...], tuple[int, ...] | None, list[int]]:
    """Output shape, shared storage layout and input tensors of a broadcasting op."""
    shapes = [c.values[n].shape for n in names]
    out = tuple(int(s) for s in np.broadcast_shapes(*shapes))
    rank = len(out)
    live = [n for n in names if not c.is_const(n)]
    perm = None
    if live and all(len(c.values[n].shape) == rank for n in live):
        perm = _shared_layout(c, live)
    live_rank = max((len(c.values[n].shape) for n in live), default=0)
    inputs = []
    for n in names:
        v = c.values[n]
        if v.const is not None:
            # a one-element constant that does not raise the rank is a scalar (as XNNPACK likes)
            scalar = v.const.size == 1 and v.const.ndim <= live_rank
            inputs.append(c.const_tensor(v.const.reshape(())) if scalar else c.const_tensor(v.const, perm, rank))
        else:
            inputs.append(c.tensor(n, perm))
    return out, perm, inputs


def _shared_layout(c: _Converter, names: Sequence[str]) -> tuple[int, ...] | None:
    """The layout among the inputs' that needs the fewest new transposes (ties: not NCHW)."""

    def cost(perm: tuple[int, ...] | None) -> tuple[int, bool]:
        key = perm or _identity(len(c.values[names[0]].shape))
        new = sum(c.values[n].perm != perm and (n, key) not in c._views for n in names)
        return new, perm is None

    return min(dict.fromkeys(c.values[n].perm for n in names), key=cost)


def _binary_node(
    c: _Converter,
    node: Node,
    code: str,
    options: str | None = None,
    fuse: bool = False,
    names: Sequence[str] | None = None,
) -> None:
    names = list(names or node.inputs)
    shape, perm, inputs = _broadcast(c, names)
    dtype = np.dtype(np.bool_) if node.op in _COMPARISONS else c.values[names[-1] if node.op == "Where" else names[0]].dtype
    name, act = c.take_activation(node.outputs[0]) if fuse and dtype == np.float32 else (node.outputs[0], _ACT_NONE)
    out = c.out(name, shape, dtype, perm)
    fields = {"FusedActivationFunction": act} if options else {}
    c.emit(code, inputs, [out], options, **fields)
    c.define(name, shape, dtype, out, perm)


@_converts(*_BINARY)
def _binary(c: _Converter, node: Node) -> None:
    code, options, fuse = _BINARY[node.op]
    if node.op == "Pow" and c.is_const(node.inputs[1]) and c.const(node.inputs[1]).size == 1:
        e = float(c.const(node.inputs[1]).reshape(()))
        unary = {1.0: None, 0.5: "SQRT", -0.5: "RSQRT"}
        if e == 2.0:
            return _binary_node(c, node, "MUL", "MulOptions", names=[node.inputs[0], node.inputs[0]])
        if e in unary:
            return _unary_node(c, node, unary[e])
    if node.op == "Div" and c.values[node.inputs[0]].dtype.kind in "iu":
        raise _Refused("integer Div is not supported (TFLite DIV rounds differently); only float")
    _binary_node(c, node, code, options, fuse)


_VARIADIC = {"Min": ("MINIMUM", None), "Max": ("MAXIMUM", None), "Sum": ("ADD", "AddOptions"), "Mean": ("ADD", "AddOptions")}


@_converts(*_VARIADIC)
def _variadic(c: _Converter, node: Node) -> None:
    code, options = _VARIADIC[node.op]
    names = [n for n in node.inputs if n]
    if len(names) == 1:
        return _alias(c, node)
    out = node.outputs[0]
    total = out if node.op != "Mean" else f"{out}::sum"
    acc = names[0]
    for i, name in enumerate(names[1:]):
        target = total if i == len(names) - 2 else f"{out}::{i}"
        _binary_node(c, Node(node.op, node.name, [acc, name], [target]), code, options, names=[acc, name])
        acc = target
    if node.op == "Mean":
        _scaled(c, node, total, 1.0 / len(names), out)
    return None


_UNARY = {
    "Relu": "RELU",
    "Sigmoid": "LOGISTIC",
    "Tanh": "TANH",
    "Exp": "EXP",
    "Log": "LOG",
    "Sqrt": "SQRT",
    "Abs": "ABS",
    "Neg": "NEG",
    "Sin": "SIN",
    "Cos": "COS",
    "Floor": "FLOOR",
    "Ceil": "CEIL",
    "Round": "ROUND",
    "Sign": "SIGN",
    "HardSwish": "HARD_SWISH",
    "Elu": "ELU",
    "Not": "LOGICAL_NOT",
}


def _unary_node(c: _Converter, node: Node, code: str | None, options: str | None = None, **fields: Any) -> None:
    if code is None:
        return _alias(c, node)
    v = c.values[node.inputs[0]]
    out = c.out(node.outputs[0], v.shape, v.dtype, v.perm)
    c.emit(code, [c.tensor(node.inputs[0], v.perm)], [out], options, **fields)
    c.define(node.outputs[0], v.shape, v.dtype, out, v.perm)


@_converts(*_UNARY)
def _unary(c: _Converter, node: Node) -> None:
    if node.op == "Elu" and node.attrs.get("alpha", 1.0) != 1.0:
        raise _Refused("Elu with alpha != 1 is not supported")
    _unary_node(c, node, _UNARY[node.op])


@_converts("Identity", "Dropout")
def _alias(c: _Converter, node: Node) -> None:
    c.values[node.outputs[0]] = c.values[node.inputs[0]]
    if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1]:
        mask = np.ones(c.values[node.inputs[0]].shape, dtype=bool)
        c.values[node.outputs[1]] = _Value(mask.shape, mask.dtype, const=mask)


@_converts("Reciprocal")
def _reciprocal(c: _Converter, node: Node) -> None:
    one = f"{node.name}::one"
    c.values[one] = _Value((), np.dtype(np.float32), const=np.array(1.0, np.float32))
    _binary_node(c, node, "DIV", "DivOptions", names=[one, node.inputs[0]])


@_converts("LeakyRelu")
def _leaky_relu(c: _Converter, node: Node) -> None:
    _unary_node(c, node, "LEAKY_RELU", "LeakyReluOptions", Alpha=float(node.attrs.get("alpha", 0.01)))


@_converts("Gelu")
def _gelu(c: _Converter, node: Node) -> None:
    _unary_node(c, node, "GELU", "GeluOptions", Approximate=node.attrs.get("approximate", "none") == "tanh")


def _clip_node(c: _Converter, node: Node, lo: float | None, hi: float | None) -> None:
    # not RELU_0_TO_1: XNNPACK does not take it, and one op outside the delegate splits the graph
    code = {(0.0, 6.0): "RELU6", (-1.0, 1.0): "RELU_N1_TO_1", (0.0, None): "RELU"}.get((lo, hi))
    if code or (lo is None and hi is None):
        return _unary_node(c, node, code)
    src = node.inputs[0]
    for i, (bound, op, code) in enumerate(((lo, "Max", "MAXIMUM"), (hi, "Min", "MINIMUM"))):
        if bound is None:
            continue
        k = f"{node.name}::{op}"
        c.values[k] = _Value((), np.dtype(np.float32), const=np.array(bound, np.float32))
        last = i == 1 or hi is None
        target = node.outputs[0] if last else f"{node.outputs[0]}::lo"
        _binary_node(c, Node(op, node.name, [src, k], [target]), code, names=[src, k])
        src = target


@_converts("Clip")
def _clip(c: _Converter, node: Node) -> None:
    consts = {n: v.const for n, v in c.values.items() if v.const is not None and n in node.inputs}
    lo, hi = c._clip_bounds(node, consts)
    if lo is not None and math.isnan(lo):
        raise _Refused("Clip bounds must be constants")
    _clip_node(c, node, lo, hi)


@_converts("HardSigmoid")
def _hard_sigmoid(c: _Converter, node: Node) -> None:
    """clip(alpha x + beta, 0, 1) = relu6(6 alpha x + 6 beta) / 6: three ops XNNPACK runs."""
    alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    v = c.values[node.inputs[0]]
    storage = [v.shape[p] for p in v.perm] if v.perm else list(v.shape)
    scaled, shifted = c.temp(storage, np.float32, "6ax"), c.temp(storage, np.float32, "relu6")
    out = c.out(node.outputs[0], v.shape, np.float32, v.perm)
    k = [c.const_tensor(np.array(value, np.float32)) for value in (6 * alpha, 6 * beta, 1 / 6)]
    c.emit("MUL", [c.tensor(node.inputs[0], v.perm), k[0]], [scaled], "MulOptions", FusedActivationFunction=_ACT_NONE)
    c.emit("ADD", [scaled, k[1]], [shifted], "AddOptions", FusedActivationFunction=_ACT_RELU6)
    c.emit("MUL", [shifted, k[2]], [out], "MulOptions", FusedActivationFunction=_ACT_NONE)
    c.define(node.outputs[0], v.shape, np.float32, out, v.perm)


# Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), as the numpy backend's far-from-zero branch.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@_converts("Erf")
def _erf(c: _Converter, node: Node) -> None:
    """erf(x) = sign(x) (1 - poly(t) exp(-x^2)), t = 1 / (1 + p|x|): |error| < 1.5e-7."""
    v = c.values[node.inputs[0]]
    x = c.tensor(node.inputs[0], v.perm)
    storage = [v.shape[p] for p in v.perm] if v.perm else list(v.shape)

    def t_(tag: str) -> int:
        return c.temp(storage, np.float32, tag)

    def k(value: float) -> int:
        return c.const_tensor(np.array(value, np.float32))

    def op(code: str, a: int, b: int | None, tag: str, options: str | None = None) -> int:
        out = t_(tag)
        c.emit(code, [a] if b is None else [a, b], [out], options, **({"FusedActivationFunction": 0} if options else {}))
        return out

    ax = op("ABS", x, None, "abs")
    one_px = op("ADD", op("MUL", ax, k(_ERF_P), "px", "MulOptions"), k(1.0), "1px", "AddOptions")
    t = op("DIV", k(1.0), one_px, "t", "DivOptions")
    poly = k(_ERF_A[4])
    for i, coef in enumerate(reversed(_ERF_A[:4])):
        poly = op("ADD", op("MUL", poly, t, f"p{i}", "MulOptions"), k(coef), f"q{i}", "AddOptions")
    poly = op("MUL", poly, t, "poly", "MulOptions")
    gauss = op("EXP", op("NEG", op("MUL", x, x, "x2", "MulOptions"), None, "nx2"), None, "exp")
    tail = op("SUB", k(1.0), op("MUL", poly, gauss, "pe", "MulOptions"), "tail", "SubOptions")
    out = c.out(node.outputs[0], v.shape, np.float32, v.perm)
    c.emit("MUL", [op("SIGN", x, None, "sign"), tail], [out], "MulOptions", FusedActivationFunction=0)
    c.define(node.outputs[0], v.shape, np.float32, out, v.perm)


@_converts("Softmax", "LogSoftmax")
def _softmax(c: _Converter, node: Node) -> None:
    if c.graph.opset < 13:
        raise _Refused("opset < 13 Softmax (coerced to 2-D) is not supported; export with opset >= 13")
    v = c.values[node.inputs[0]]
    rank = len(v.shape)
    axis = int(node.attrs.get("axis", -1)) % rank
    current = v.perm or _identity(rank)
    perm = current if current[-1] == axis else tuple([p for p in current if p != axis] + [axis])
    out = c.out(node.outputs[0], v.shape, v.dtype, perm)
    if node.op == "Softmax":
        c.emit("SOFTMAX", [c.tensor(node.inputs[0], perm)], [out], "SoftmaxOptions", Beta=1.0)
    else:
        c.emit("LOG_SOFTMAX", [c.tensor(node.inputs[0], perm)], [out])
    c.define(node.outputs[0], v.shape, v.dtype, out, perm)


@_converts("Cast")
def _cast(c: _Converter, node: Node) -> None:
    to = reference.ONNX_DTYPES.get(node.attrs.get("to"))
    if to is None or to not in TENSOR_TYPES:
        raise _Refused(f"cast to ONNX type {node.attrs.get('to')} is not supported")
    v = c.values[node.inputs[0]]
    out = c.out(node.outputs[0], v.shape, to, v.perm)
    types = {"InDataType": TENSOR_TYPES[v.dtype], "OutDataType": TENSOR_TYPES[to]}
    c.emit("CAST", [c.tensor(node.inputs[0], v.perm)], [out], "CastOptions", **types)
    c.define(node.outputs[0], v.shape, to, out, v.perm)


def _scaled(c: _Converter, node: Node, name: str, factor: float, out: str) -> str:
    """Value ``out = name * factor`` (a MUL by a scalar constant); ``name`` itself when factor is 1."""
    if factor == 1.0:
        return name
    k = f"{out}::factor"
    c.values[k] = _Value((), np.dtype(np.float32), const=np.array(factor, np.float32))
    _binary_node(c, Node("Mul", node.name, [name, k], [out]), "MUL", "MulOptions")
    return out
