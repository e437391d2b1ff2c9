"""Convert a lowered :class:`~stn_edge.graph.Graph` (ONNX semantics, NCHW) to a TFLite model.

Layout. ONNX activations are NCHW; TFLite's CONV_2D, DEPTHWISE_CONV_2D and pools are NHWC. Every
value keeps a *storage permutation*: the TFLite tensor holds ``logical.transpose(perm)`` (NHWC is
``perm = (0, 2, 3, 1)``). Convolutions and pools ask for NHWC, elementwise ops and activations
keep whatever layout comes in, axis-taking ops (Concat, Softmax, reductions, Slice, Split) map
their axes, ONNX ``Transpose`` only changes the permutation, and a TRANSPOSE is emitted only where
an op needs another layout (Flatten/Reshape/MatMul need the logical order; so do graph outputs),
once per value and layout. A transpose that moves only size-1 axes is emitted as a RESHAPE.

Constants. A node whose inputs are all constant is folded with the numpy backend's implementation
(Shape -> Gather -> Concat -> Reshape chains become one RESHAPE), except matrix products and
convolutions, whose folding would multiply factorized layers back into dense weights.

Dynamic dims. :func:`build` converts the graph at the requested input shapes and at shapes with
every symbolic dim one larger. A dim that differs between the two is dynamic: RESHAPE targets put
``-1`` there and tensors carry a ``shape_signature``. When both conversions give the same
operators and constants the model is *resizable*: the interpreter can ``resize_tensor_input`` to
another batch instead of rebuilding the model.

Unsupported ops and variants raise :class:`~stn_edge.errors.UnsupportedOp` naming the op, the
node and the backends that can run it. :func:`supported_ops` lists the ONNX ops converted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from stn_edge import geometry as geo
from stn_edge.device.backends import machinery, unsupported
from stn_edge.device.backends import numpy as reference
from stn_edge.device.backends.tflite_flatbuffer import TENSOR_TYPES, ModelDraft, serialize
from stn_edge.errors import BackendError, UnsupportedOp
from stn_edge.graph import DTYPES, Graph, Node

NHWC = (0, 2, 3, 1)

# TFLite enums, by their schema names
_PAD_SAME, _PAD_VALID = 0, 1
_ACT_NONE, _ACT_RELU, _ACT_RELU_N1_TO_1, _ACT_RELU6 = 0, 1, 2, 3
_MIRROR_REFLECT = 0


class _Refused(Exception):
    """A node this converter cannot express; becomes UnsupportedOp with the node's name."""


@dataclass
class _Value:
    """An ONNX value: its logical shape and either a TFLite tensor (in ``perm`` order) or a constant."""

    shape: tuple[int, ...]
    dtype: np.dtype
    tensor: int = -1
    perm: tuple[int, ...] | None = None
    const: np.ndarray | None = None


@dataclass
class Conversion:
    """One conversion at fixed input shapes."""

    draft: ModelDraft
    shapes: dict[str, tuple[int, ...]]
    #: per graph output: ("tensor", position in draft.outputs) or ("const", array) or ("input", name)
    outputs: list[tuple[str, Any]] = field(default_factory=list)


_Converter_fn = Callable[["_Converter", Node], None]
_CONVERTERS: dict[str, _Converter_fn] = {}


def _converts(*ops: str) -> Callable[[_Converter_fn], _Converter_fn]:
    def wrap(fn: _Converter_fn) -> _Converter_fn:
        for op in ops:
            _CONVERTERS[op] = fn
        return fn

    return wrap


def supported_ops() -> list[str]:
    """ONNX ops the TFLite builder converts to TFLite builtins, sorted.

    Any other op of the numpy backend is accepted too when all its inputs are constants (it is
    folded at build time), e.g. Range or ConstantOfShape feeding a Reshape.
    """
    return sorted(_CONVERTERS)


def _argsort(perm: Sequence[int]) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


def _identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def _drop_axes(perm: tuple[int, ...], axes: Sequence[int]) -> tuple[int, ...] | None:
    """The storage permutation left after removing logical ``axes`` (keepdims=0 reductions)."""
    kept = [p for p in perm if p not in axes]
    order = sorted(kept)
    out = tuple(order.index(p) for p in kept)
    return None if out == _identity(len(out)) else out


def _dims_of(values: Any) -> list[int]:
    return [int(v) for v in np.asarray(values).reshape(-1)]


# ------------------------------------------------------------------------------------------------
# The converter
# ------------------------------------------------------------------------------------------------


class _Converter:
    def __init__(
        self,
        graph: Graph,
        input_shapes: dict[str, tuple[int, ...]],
        ref_shapes: dict[str, tuple[int, ...]] | None,
        const_cache: dict[Any, tuple[np.ndarray, np.ndarray]],
    ):
        self.graph = graph
        self.ref = ref_shapes or {}
        self.draft = ModelDraft()
        self.values: dict[str, _Value] = {}
        self._views: dict[tuple[str, tuple[int, ...]], int] = {}
        self._const_tensors: dict[Any, int] = {}
        self._const_cache = const_cache  # shared by the conversions of one build: same arrays
        self._skip: set[str] = set()
        self._node: Node | None = None
        for v in graph.inputs:
            if v.name in graph.initializers:
                continue
            shape = tuple(input_shapes[v.name])
            dtype = DTYPES[v.dtype]
            if dtype not in TENSOR_TYPES or dtype == np.float16:
                raise BackendError(
                    f"tflite backend: input {v.name!r} has dtype {v.dtype}; it runs float32 graphs "
                    "(with int32/int64/bool/int8/uint8 inputs such as token ids)"
                )
            index = self.draft.tensor(shape, dtype, v.name, self._signature(v.name, shape, None))
            self.draft.inputs.append(index)
            self.values[v.name] = _Value(shape, dtype, index)
        for name, array in graph.initializers.items():
            array = np.asarray(array)
            self.values.setdefault(name, _Value(array.shape, array.dtype, const=array))
        self._consumers: dict[str, int] = {}
        for node in graph.nodes:
            for name in node.inputs:
                self._consumers[name] = self._consumers.get(name, 0) + 1
        self._graph_outputs = {o.name for o in graph.outputs}
        self._fusable = self._find_activations()

    # -------------------------------------------------------------------------- driving

    def run(self) -> Conversion:
        for node in _fuse_gelu(self.graph.nodes, self._consumers, self._graph_outputs, self.values):
            if node.name in self._skip:
                continue
            self._node = node
            if node.domain not in ("", "ai.onnx"):
                raise self.refuse(f"domain {node.domain!r} is not supported")
            missing = [n for n in node.inputs if n and n not in self.values]
            if missing:
                raise BackendError(f"node {node.name!r} reads {missing}, which nothing before it produces")
            if self._foldable(node):
                self._fold(node)
                continue
            converter = _CONVERTERS.get(node.op)
            if converter is None:
                raise self.refuse(f"no TFLite conversion; the tflite backend converts: {', '.join(supported_ops())}")
            try:
                converter(self, node)
            except _Refused as exc:
                raise self.refuse(str(exc)) from None
        conversion = Conversion(self.draft, {k: v.shape for k, v in self.values.items()})
        for out in self.graph.outputs:
            v = self.values.get(out.name)
            if v is None:
                raise BackendError(f"graph output {out.name!r} is produced by no node, input or initializer")
            if v.const is not None:
                conversion.outputs.append(("const", v.const))
            elif v.tensor in self.draft.inputs and v.perm is None:  # an input passed through
                conversion.outputs.append(("input", self.draft.tensors[v.tensor].name))
            else:
                conversion.outputs.append(("tensor", len(self.draft.outputs)))
                self.draft.outputs.append(self.tensor(out.name))
        return conversion

    def refuse(self, reason: str) -> UnsupportedOp:
        node = self._node
        return unsupported("tflite", node, reason,
                           ("onnxruntime", "torch", "numpy") if node.op in reference.OPS else ("onnxruntime",))

    def _foldable(self, node: Node) -> bool:
        present = [n for n in node.inputs if n]
        if node.op in machinery.NEVER_FOLD or node.op not in reference.OPS:
            return False
        return all(self.values[n].const is not None for n in present)

    def _fold(self, node: Node) -> None:
        try:
            impl = reference.check_node(node, self.graph.opset)
        except UnsupportedOp as exc:
            raise self.refuse(str(exc)) from None
        attrs = dict(node.attrs)
        if impl.num_outputs and attrs.get("num_outputs") is None:
            attrs["num_outputs"] = len(node.outputs)
        results = impl.run(*[self.values[n].const if n else None for n in node.inputs], **attrs)
        for name, value in zip(node.outputs, results if isinstance(results, tuple) else (results,)):
            if name:
                value = np.asarray(value)
                self.values[name] = _Value(value.shape, value.dtype, const=value)

    # -------------------------------------------------------------------------- values

    def is_const(self, name: str) -> bool:
        return self.values[name].const is not None

    def const(self, name: str, what: str = "input") -> np.ndarray:
        v = self.values[name]
        if v.const is None:
            raise _Refused(f"its {what} {name!r} must be a constant")
        return v.const

    def ints(self, node: Node, index: int, attr: str | None = None) -> list[int] | None:
        """An int list given as input ``index`` (constant) or, in older opsets, attribute ``attr``."""
        if len(node.inputs) > index and node.inputs[index]:
            return _dims_of(self.const(node.inputs[index], f"input {index}"))
        if attr is not None and node.attrs.get(attr) is not None:
            return _dims_of(node.attrs[attr])
        return None

    def _ref_shape(self, name: str | None, shape: Sequence[int]) -> tuple[int, ...] | None:
        ref = self.ref.get(name) if name else None
        return ref if ref is not None and len(ref) == len(shape) else None

    def _signature(self, name: str | None, shape: Sequence[int], perm: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """``shape`` (storage order) with -1 where the other probe's shape differs."""
        logical = self._ref_shape(name, shape)
        if logical is None:
            return None
        ref = [logical[p] for p in perm] if perm else list(logical)
        return tuple(-1 if r != s else s for r, s in zip(ref, shape))

    def _target(self, name: str | None, shape: Sequence[int], perm: tuple[int, ...] | None = None) -> list[int]:
        """A RESHAPE target for storage ``shape``: -1 at the one dynamic dim, if there is one."""
        sig = self._signature(name, shape, perm)
        dims = list(shape)
        if sig is not None and sig.count(-1) == 1:
            dims[sig.index(-1)] = -1
        return dims

    def define(self, name: str, shape: Sequence[int], dtype: Any, tensor: int, perm: tuple[int, ...] | None = None) -> None:
        perm = None if perm is None or tuple(perm) == _identity(len(shape)) else tuple(perm)
        self.values[name] = _Value(tuple(int(s) for s in shape), np.dtype(dtype), tensor, perm)

    def out(self, name: str, shape: Sequence[int], dtype: Any, perm: tuple[int, ...] | None = None) -> int:
        """A new tensor for the ONNX value ``name`` (logical ``shape``, stored in ``perm`` order)."""
        storage = [shape[p] for p in perm] if perm else list(shape)
        return self.draft.tensor(storage, dtype, name, self._signature(name, storage, perm))

    def temp(self, shape: Sequence[int], dtype: Any, tag: str) -> int:
        return self.draft.tensor(shape, dtype, f"{self._node.name}/{tag}")

    def emit(
        self, code: str, inputs: Sequence[int], outputs: Sequence[int], options: str | None = None, **fields: Any
    ) -> None:
        self.draft.op(code, inputs, outputs, options, **fields)

    def const_tensor(
        self,
        array: np.ndarray,
        perm: tuple[int, ...] | None = None,
        rank: int | None = None,
        derive: tuple[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    ) -> int:
        """A constant tensor for ``array`` broadcast to ``rank`` dims and stored in ``perm`` order.

        ``derive`` is ``(tag, fn)``: store ``fn(array)`` instead (a weight in TFLite's layout).
        Results are cached by the source array and the transform, across the conversions of one
        build, so the probes of :func:`build` share their weights instead of copying them.
        """
        key = (id(array), perm, rank, derive[0] if derive else None)
        if key not in self._const_tensors:
            if key not in self._const_cache:
                data = np.asarray(derive[1](array) if derive else array)
                if rank is not None and data.ndim < rank:
                    data = data.reshape((1,) * (rank - data.ndim) + data.shape)
                if perm is not None and data.ndim == len(perm):
                    data = data.transpose(perm)
                # keep ``array`` alive so that its id is not reused while the cache holds the key
                self._const_cache[key] = (array, np.asarray(data, order="C"))
            self._const_tensors[key] = self.draft.constant(self._const_cache[key][1], f"{self._node.name}/const")
        return self._const_tensors[key]

    def int_tensor(self, values: Sequence[int]) -> int:
        return self.draft.constant(np.asarray(values, dtype=np.int32), f"{self._node.name}/ints")

    def tensor(self, name: str, perm: tuple[int, ...] | None = None) -> int:
        """The TFLite tensor holding ``name`` in ``perm`` order (a TRANSPOSE or RESHAPE if needed)."""
        v = self.values[name]
        rank = len(v.shape)
        perm = None if perm is None or tuple(perm) == _identity(rank) else tuple(perm)
        if v.const is not None:
            return self.const_tensor(v.const, perm)
        if v.perm == perm:
            return v.tensor
        key = (name, perm or _identity(rank))
        if key not in self._views:
            current = v.perm or _identity(rank)
            inverse = _argsort(current)
            want = perm or _identity(rank)
            moves = [inverse[d] for d in want]
            shape = [v.shape[d] for d in want]
            tag = f"{name}/{''.join(map(str, want))}"
            index = self.draft.tensor(shape, v.dtype, tag, self._signature(name, shape, perm))
            if self._moves_only_ones(name, v, current, moves):
                self.emit("RESHAPE", [v.tensor, self.int_tensor(self._target(name, shape, perm))], [index])
            else:
                self.emit("TRANSPOSE", [v.tensor, self.int_tensor(moves)], [index])
            self._views[key] = index
        return self._views[key]

    def _moves_only_ones(self, name: str, v: _Value, current: Sequence[int], moves: Sequence[int]) -> bool:
        shapes = [v.shape] + ([self.ref[name]] if name in self.ref and len(self.ref[name]) == len(v.shape) else [])
        for logical in shapes:
            storage = [logical[p] for p in current]
            order = [m for m in moves if storage[m] != 1]
            if order != sorted(order):
                return False
        return True

    # -------------------------------------------------------------------------- fusion

    def _find_activations(self) -> dict[str, tuple[Node, int]]:
        """Relu / Clip(0, 6) / Clip(-1, 1) nodes that can fuse into the op producing their input."""
        fusable = {}
        for node in self.graph.nodes:
            act = self._activation_code(node)
            src = node.inputs[0] if node.inputs else ""
            if act and self._consumers.get(src) == 1 and src not in self._graph_outputs:
                fusable[src] = (node, act)
        return fusable

    def _activation_code(self, node: Node) -> int:
        if node.op == "Relu":
            return _ACT_RELU
        if node.op != "Clip":
            return _ACT_NONE
        lo, hi = self._clip_bounds(node, self.graph.initializers)
        return {(0.0, 6.0): _ACT_RELU6, (-1.0, 1.0): _ACT_RELU_N1_TO_1, (0.0, None): _ACT_RELU}.get((lo, hi), _ACT_NONE)

    @staticmethod
    def _clip_bounds(node: Node, consts: dict[str, np.ndarray]) -> tuple[float | None, float | None]:
        bounds = []
        for i, attr in ((1, "min"), (2, "max")):
            if len(node.inputs) > i and node.inputs[i]:
                value = consts.get(node.inputs[i])
                if value is None:
                    return (math.nan, math.nan)  # not a constant: not fusable, nor a RELU variant
                bounds.append(float(np.asarray(value).reshape(())))
            else:
                bounds.append(None if node.attrs.get(attr) is None else float(node.attrs[attr]))
        lo, hi = bounds
        if hi is not None and math.isinf(hi) and hi > 0:
            hi = None
        if lo is not None and math.isinf(lo) and lo < 0:
            lo = None
        return lo, hi

    def take_activation(self, name: str) -> tuple[str, int]:
        """Fuse the activation reading ``name``, if any: return the value name to define and its code."""
        hit = self._fusable.get(name)
        if hit is None:
            return name, _ACT_NONE
        node, act = hit
        self._skip.add(node.name)
        return node.outputs[0], act


def _near(value: np.ndarray | None, target: float, rtol: float = 1e-6) -> bool:
    """True for a one-element constant within ``rtol`` of ``target``."""
    if value is None or np.size(value) != 1:
        return False
    return abs(float(np.asarray(value).reshape(())) - target) <= rtol * abs(target)


def _fuse_gelu(nodes: list[Node], consumers: dict[str, int], outputs: set[str], values: dict[str, _Value]) -> list[Node]:
    """Replace ``x * 0.5 * (1 + erf(x / sqrt(2)))`` (what torch exports for GELU) by one Gelu node."""
    by_output = {o: n for n in nodes for o in n.outputs}
    readers: dict[str, list[Node]] = {}
    for n in nodes:
        for i in n.inputs:
            readers.setdefault(i, []).append(n)

    def const_of(node: Node, other_than: str) -> np.ndarray | None:
        rest = [i for i in node.inputs if i != other_than]
        v = values.get(rest[0]) if len(rest) == 1 else None
        return v.const if v is not None else None

    def only_reader(name: str) -> Node | None:
        rs = readers.get(name, [])
        return rs[0] if len(rs) == 1 and consumers.get(name) == 1 and name not in outputs else None

    replaced: dict[str, Node] = {}
    dropped: set[str] = set()
    for erf in (n for n in nodes if n.op == "Erf"):
        scale = by_output.get(erf.inputs[0])
        if scale is None or only_reader(scale.outputs[0]) is not erf:
            continue
        x = scale.inputs[0]
        divided = scale.op == "Div" and _near(const_of(scale, x), math.sqrt(2))
        if not (divided or scale.op == "Mul" and _near(const_of(scale, x), 1 / math.sqrt(2))):
            continue
        add = only_reader(erf.outputs[0])
        if add is None or add.op != "Add" or not _near(const_of(add, erf.outputs[0]), 1.0):
            continue
        m1 = only_reader(add.outputs[0])
        if m1 is None or m1.op != "Mul":
            continue
        m2 = only_reader(m1.outputs[0])
        if m2 is None or m2.op != "Mul":
            continue
        # (x * (1 + erf)) * 0.5  or  ((1 + erf) * 0.5) * x, in either operand order
        m1_other = [i for i in m1.inputs if i != add.outputs[0]]
        m2_other = [i for i in m2.inputs if i != m1.outputs[0]]
        if len(m1_other) != 1 or len(m2_other) != 1:
            continue
        half = lambda name: _near(values[name].const if name in values else None, 0.5)  # noqa: E731
        if not (m1_other[0] == x and half(m2_other[0]) or half(m1_other[0]) and m2_other[0] == x):
            continue
        replaced[m2.name] = Node("Gelu", f"{m2.name}::gelu", [x], list(m2.outputs))
        dropped.update({scale.name, erf.name, add.name, m1.name})
    if not replaced:
        return nodes
    return [replaced.get(n.name, n) for n in nodes if n.name not in dropped]


# ------------------------------------------------------------------------------------------------
# Elementwise
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Normalization
# ------------------------------------------------------------------------------------------------


def _channel_const(c: _Converter, array: np.ndarray, rank: int, perm: tuple[int, ...] | None, tag: str) -> int:
    """A per-channel vector (C,) as a constant broadcasting against (N, C, *spatial) in ``perm`` order."""
    shaped = np.ascontiguousarray(array.astype(np.float32).reshape((1, -1) + (1,) * (rank - 2)))
    return c.const_tensor(shaped, perm)


@_converts("BatchNormalization")
def _batch_norm(c: _Converter, node: Node) -> None:
    if node.attrs.get("training_mode", 0):
        raise _Refused("training_mode=1 is not supported (inference only)")
    scale, bias, mean, var = (c.const(n).astype(np.float64) for n in node.inputs[1:5])
    gain = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    shift = bias - mean * gain
    v = c.values[node.inputs[0]]
    rank = len(v.shape)
    mid = c.temp([v.shape[p] for p in v.perm] if v.perm else v.shape, np.float32, "scaled")
    gain_t = _channel_const(c, gain, rank, v.perm, "gain")
    c.emit("MUL", [c.tensor(node.inputs[0], v.perm), gain_t], [mid], "MulOptions", FusedActivationFunction=0)
    name, act = c.take_activation(node.outputs[0])
    out = c.out(name, v.shape, np.float32, v.perm)
    c.emit("ADD", [mid, _channel_const(c, shift, rank, v.perm, "shift")], [out], "AddOptions", FusedActivationFunction=act)
    c.define(name, v.shape, np.float32, out, v.perm)


@_converts("LayerNormalization")
def _layer_norm(c: _Converter, node: Node) -> None:
    """mean, centred, variance, RSQRT: the decomposition the TFLite converter emits."""
    v = c.values[node.inputs[0]]
    rank = len(v.shape)
    axes = list(range(int(node.attrs.get("axis", -1)) % rank, rank))
    perm = v.perm
    storage = [v.shape[p] for p in perm] if perm else list(v.shape)
    saxes = [(perm.index(a) if perm else a) for a in axes]
    stat_shape = [1 if i in saxes else s for i, s in enumerate(storage)]
    x = c.tensor(node.inputs[0], perm)
    axes_t = c.int_tensor(saxes)
    mean = c.temp(stat_shape, np.float32, "mean")
    c.emit("MEAN", [x, axes_t], [mean], "ReducerOptions", KeepDims=True)
    centred = c.temp(storage, np.float32, "centred")
    c.emit("SUB", [x, mean], [centred], "SubOptions", FusedActivationFunction=0)
    square = c.temp(storage, np.float32, "square")
    c.emit("MUL", [centred, centred], [square], "MulOptions", FusedActivationFunction=0)
    var = c.temp(stat_shape, np.float32, "var")
    c.emit("MEAN", [square, axes_t], [var], "ReducerOptions", KeepDims=True)
    var_eps = c.temp(stat_shape, np.float32, "var_eps")
    eps = c.const_tensor(np.array(float(node.attrs.get("epsilon", 1e-5)), np.float32))
    c.emit("ADD", [var, eps], [var_eps], "AddOptions", FusedActivationFunction=0)
    inv_std = c.temp(stat_shape, np.float32, "inv_std")
    c.emit("RSQRT", [var_eps], [inv_std])
    normed = c.temp(storage, np.float32, "normed")
    c.emit("MUL", [centred, inv_std], [normed], "MulOptions", FusedActivationFunction=0)
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2])
    scaled = c.out(node.outputs[0], v.shape, np.float32, perm) if not has_bias else c.temp(storage, np.float32, "scaled")
    gamma = c.const_tensor(c.const(node.inputs[1]), perm, rank)
    c.emit("MUL", [normed, gamma], [scaled], "MulOptions", FusedActivationFunction=0)
    out = scaled
    if has_bias:
        out = c.out(node.outputs[0], v.shape, np.float32, perm)
        beta = c.const_tensor(c.const(node.inputs[2]), perm, rank)
        c.emit("ADD", [scaled, beta], [out], "AddOptions", FusedActivationFunction=0)
    c.define(node.outputs[0], v.shape, np.float32, out, perm)
    logical_stat = tuple(1 if i in axes else s for i, s in enumerate(v.shape))
    for name, tensor in zip(node.outputs[1:3], (mean, inv_std)):
        if name:
            c.define(name, logical_stat, np.float32, tensor, perm)


# ------------------------------------------------------------------------------------------------
# Matrix products
# ------------------------------------------------------------------------------------------------


def _fully_connected(c: _Converter, x: str, weight: int, width: int, bias: np.ndarray | None, name: str, act: int) -> None:
    """FULLY_CONNECTED of value ``x (..., in)`` with the constant tensor ``weight (out=width, in)``.

    It contracts the last axis and keeps the others: ``x`` stays in its layout when that keeps
    its last axis last (a transposed attention tensor, say).
    """
    v = c.values[x]
    rank = len(v.shape)
    perm = v.perm if v.perm and v.perm[-1] == rank - 1 else None
    shape = tuple(v.shape[:-1]) + (width,)
    inputs = [c.tensor(x, perm), weight, c.const_tensor(bias.astype(np.float32)) if bias is not None else -1]
    out = c.out(name, shape, np.float32, perm)
    c.emit("FULLY_CONNECTED", inputs, [out], "FullyConnectedOptions", FusedActivationFunction=act, KeepNumDims=rank != 2)
    c.define(name, shape, np.float32, out, perm)


def _matmul_operand(c: _Converter, name: str, rank: int) -> tuple[tuple[int, ...], bool] | None:
    """(batch layout, transposed) when value ``name`` can feed BATCH_MATMUL as it is stored."""
    v = c.values[name]
    if v.const is not None or len(v.shape) != rank:
        return None
    p = v.perm or _identity(rank)
    batch, tail = tuple(p[:-2]), tuple(p[-2:])
    if sorted(batch) != list(range(rank - 2)) or sorted(tail) != [rank - 2, rank - 1]:
        return None
    return batch, tail == (rank - 1, rank - 2)


def _batch_matmul(c: _Converter, a: str, b: str, name: str, adj_x: bool = False, adj_y: bool = False) -> None:
    """BATCH_MATMUL; operands stored with their batch axes in the same order and the last two in
    either order are used as they are (a transposed last pair becomes adj_x / adj_y)."""
    sa, sb = c.values[a].shape, c.values[b].shape
    if len(sa) < 2 or len(sb) < 2:
        raise _Refused("MatMul with a 1-D operand is not supported")
    m = sa[-1] if adj_x else sa[-2]
    n = sb[-2] if adj_y else sb[-1]
    shape = tuple(int(d) for d in np.broadcast_shapes(sa[:-2], sb[:-2])) + (m, n)
    rank = len(shape)
    la, lb = _matmul_operand(c, a, rank), _matmul_operand(c, b, rank)
    if la is not None and lb is not None and la[0] == lb[0]:
        perm = la[0] + (rank - 2, rank - 1)
        inputs = [c.values[a].tensor, c.values[b].tensor]
        adj_x, adj_y = adj_x != la[1], adj_y != lb[1]
    else:
        perm, inputs = None, [c.tensor(a), c.tensor(b)]
    out = c.out(name, shape, np.float32, perm)
    c.emit("BATCH_MATMUL", inputs, [out], "BatchMatMulOptions", AdjX=adj_x, AdjY=adj_y)
    c.define(name, shape, np.float32, out, perm)


def _bias_after(c: _Converter, name: str, rank: int, width: int) -> tuple[np.ndarray | None, Node | None]:
    """A constant (width,) bias that the only reader of ``name`` adds, for FULLY_CONNECTED to absorb."""
    if c._consumers.get(name) != 1 or name in c._graph_outputs:
        return None, None
    reader = next((n for n in c.graph.nodes if name in n.inputs), None)
    if reader is None or reader.op != "Add" or len(reader.inputs) != 2:
        return None, None
    other = reader.inputs[1] if reader.inputs[0] == name else reader.inputs[0]
    v = c.values.get(other)
    if v is None or v.const is None or v.const.dtype != np.float32 or v.const.shape[-1:] != (width,):
        return None, None
    if v.const.size != width or v.const.ndim > rank:
        return None, None
    return v.const.reshape(width), reader


@_converts("MatMul")
def _matmul(c: _Converter, node: Node) -> None:
    a, b = node.inputs[:2]
    if not c.is_const(b) or c.const(b).ndim != 2 or len(c.values[a].shape) < 2:
        return _batch_matmul(c, a, b, node.outputs[0])
    w = c.const(b)
    if w.dtype != np.float32:
        raise _Refused(f"weights of dtype {w.dtype} are not supported (float32)")
    bias, add = _bias_after(c, node.outputs[0], len(c.values[a].shape), w.shape[1])
    target = node.outputs[0]
    if add is not None:
        c._skip.add(add.name)
        target = add.outputs[0]
    name, act = c.take_activation(target)
    _fully_connected(c, a, c.const_tensor(w, (1, 0)), w.shape[1], bias, name, act)


def _scaled(c: _Converter, node: Node, name: str, factor: float, out: str) -> str:
    """Value ``out = name * factor`` (a MUL by a scalar constant); ``name`` itself when factor is 1."""
    if factor == 1.0:
        return name
    k = f"{out}::factor"
    c.values[k] = _Value((), np.dtype(np.float32), const=np.array(factor, np.float32))
    _binary_node(c, Node("Mul", node.name, [name, k], [out]), "MUL", "MulOptions")
    return out


@_converts("Gemm")
def _gemm(c: _Converter, node: Node) -> None:
    """FULLY_CONNECTED for a constant B (alpha folded into it, a bias-vector C as its bias);
    otherwise BATCH_MATMUL, then MUL by alpha and ADD of beta * C."""
    a, b = node.inputs[:2]
    cin = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    trans_a, trans_b = bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0))
    out = node.outputs[0]
    if c.is_const(b) and c.const(b).dtype == np.float32:
        w = c.const(b)
        width = w.shape[0] if trans_b else w.shape[1]
        if alpha == 1.0:
            weight = c.const_tensor(w, None if trans_b else (1, 0))
        else:
            scaled = (f"gemm{alpha}{trans_b}", lambda w: (w if trans_b else w.T) * np.float32(alpha))
            weight = c.const_tensor(w, derive=scaled)
        cv = c.values[cin].const if cin else None
        bias = None
        if cv is not None and cv.size in (1, width) and (cv.ndim < 2 or cv.shape[0] == 1) and cv.ndim <= 2:
            bias = np.broadcast_to(cv.astype(np.float32).reshape(-1) * np.float32(beta), (width,)).copy()
            cin = None
        if trans_a:  # A^T as a layout of A: FULLY_CONNECTED then asks for a TRANSPOSE
            _transpose(c, Node("Transpose", node.name, [a], [f"{a}::T"], {"perm": [1, 0]}))
            a = f"{a}::T"
        if cin is None:
            name, act = c.take_activation(out)
            return _fully_connected(c, a, weight, width, bias, name, act)
        product = f"{out}::ab"
        _fully_connected(c, a, weight, width, bias, product, _ACT_NONE)
    else:
        product = out if alpha == 1.0 and cin is None else f"{out}::ab"
        _batch_matmul(c, a, b, product, trans_a, trans_b)
        product = _scaled(c, node, product, alpha, f"{out}::alpha_ab" if cin else out)
        if cin is None:
            return None
    term = _scaled(c, node, cin, beta, f"{out}::beta_c")
    _binary_node(c, Node("Add", node.name, [product, term], [out]), "ADD", "AddOptions", fuse=True)
    return None


# ------------------------------------------------------------------------------------------------
# Convolution and pooling
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Shapes and indexing
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------


@dataclass
class BuiltModel:
    """A serialized model for some input shapes, and whether the interpreter may resize it."""

    content: bytes
    #: per graph output: ("tensor", position among the model's outputs), ("const", array) or ("input", name)
    outputs: list[tuple[str, Any]]
    input_shapes: dict[str, tuple[int, ...]]
    resizable: bool


def convert(
    graph: Graph,
    input_shapes: dict[str, tuple[int, ...]],
    ref_shapes: dict[str, tuple[int, ...]] | None = None,
    const_cache: dict[Any, Any] | None = None,
) -> Conversion:
    """Convert ``graph`` at fixed ``input_shapes`` (name -> shape). See the module docstring."""
    try:
        return _Converter(graph, input_shapes, ref_shapes, {} if const_cache is None else const_cache).run()
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise BackendError(f"tflite backend could not convert the graph at input shapes {input_shapes}: {exc}") from exc


def _same_outputs(a: list[tuple[str, Any]], b: list[tuple[str, Any]]) -> bool:
    """Outputs produced the same way, constant ones (a Dropout mask, say) equal at both shapes."""
    for (kind_a, what_a), (kind_b, what_b) in zip(a, b):
        if kind_a != kind_b:
            return False
        if kind_a == "const" and (what_a.shape != what_b.shape or not np.array_equal(what_a, what_b)):
            return False
        if kind_a != "const" and what_a != what_b:
            return False
    return True


def build(graph: Graph, input_shapes: dict[str, tuple[int, ...]]) -> BuiltModel:
    """Convert and serialize ``graph`` for ``input_shapes``; probe whether it can be resized.

    Raises :class:`UnsupportedOp` for the first node that cannot be converted.
    """
    symbolic = {v.name: [not isinstance(d, int) for d in v.shape] for v in graph.inputs if v.name not in graph.initializers}
    cache: dict[Any, Any] = {}
    if not any(any(flags) for flags in symbolic.values()):
        conversion = convert(graph, input_shapes, None, cache)
        return BuiltModel(serialize(conversion.draft), conversion.outputs, dict(input_shapes), False)
    bumped = {n: tuple(d + 1 if flag else d for d, flag in zip(input_shapes[n], flags)) for n, flags in symbolic.items()}
    try:
        probe = convert(graph, bumped, None, cache)
    except (BackendError, UnsupportedOp):
        probe = None  # the graph only converts at the requested shapes: rebuild per shape
    main = convert(graph, input_shapes, probe.shapes if probe else None, cache)
    resizable = False
    if probe is not None:
        try:
            check = convert(graph, bumped, main.shapes, cache)
            resizable = main.draft.same_program(check.draft) and _same_outputs(main.outputs, check.outputs)
        except (BackendError, UnsupportedOp):
            resizable = False
    return BuiltModel(serialize(main.draft), main.outputs, dict(input_shapes), resizable)
