"""The converter: one ONNX value per name, its TFLite tensor and layout, and the registry of op conversions."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from stn_edge.device.backends import machinery, unsupported
from stn_edge.device.backends import numpy as reference
from stn_edge.device.backends.tflite_flatbuffer import TENSOR_TYPES, ModelDraft
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
