"""A TFLite model held as plain Python data, and its serialization to ``.tflite`` bytes.

:class:`ModelDraft` is what the graph converter (:mod:`tflite_builder`) writes into: tensors,
constant buffers and builtin operators with their options as keyword fields. :func:`serialize`
turns a draft into the flatbuffer LiteRT loads, with the ``tflite`` package's generated builders
(``tflite.TensorStart``, ``tflite.Conv2DOptionsAddStrideW``, ...) and ``flatbuffers``: no
TensorFlow, no converter, nothing written to disk.

Conventions of the TFLite schema this module follows:

- buffer 0 is the empty sentinel; a tensor whose buffer holds no data is an activation;
- an optional operator input that is absent is the tensor index ``-1``;
- operator codes >= 127 go in ``builtin_code``, with ``deprecated_builtin_code`` set to 127
  (``PLACEHOLDER_FOR_GREATER_OP_CODES``), as readers of both schema generations expect;
- every operator code says version 1, the lowest LiteRT registers, except where noted;
- constant data is 16-byte aligned, as the TFLite converter writes it, so kernels can read it
  in place.

Example
-------
>>> d = ModelDraft()
>>> x = d.tensor((1, 4), np.float32, "x"); y = d.tensor((1, 4), np.float32, "y")
>>> d.op("RELU", [x], [y]); d.inputs, d.outputs = [x], [y]
>>> model = serialize(d)                      # bytes for Interpreter(model_content=model)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

import flatbuffers
import tflite as schema

#: numpy dtype -> TFLite TensorType
TENSOR_TYPES: dict[np.dtype, int] = {
    np.dtype(np.float32): schema.TensorType.FLOAT32,
    np.dtype(np.float16): schema.TensorType.FLOAT16,
    np.dtype(np.int32): schema.TensorType.INT32,
    np.dtype(np.int64): schema.TensorType.INT64,
    np.dtype(np.int8): schema.TensorType.INT8,
    np.dtype(np.uint8): schema.TensorType.UINT8,
    np.dtype(np.bool_): schema.TensorType.BOOL,
}

_SCHEMA_VERSION = 3
_FILE_IDENTIFIER = b"TFL3"
_DATA_ALIGNMENT = 16
_GREATER_OP_CODES = 127  # deprecated_builtin_code of every op code >= 127
#: op versions above 1 that LiteRT's resolver needs (BROADCAST_TO registers versions 2-3 only);
#: kernels read their options, not the version, so the lowest registered one is enough
_MIN_VERSIONS = {"BROADCAST_TO": 2}


@dataclass
class TensorSpec:
    """One tensor: ``shape`` as allocated, ``signature`` with -1 where a dim may be resized."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    buffer: int = 0
    signature: tuple[int, ...] | None = None


@dataclass
class OpSpec:
    """One builtin operator. ``fields`` are the options table's fields by their schema names."""

    code: str
    inputs: list[int]
    outputs: list[int]
    options: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


class ModelDraft:
    """A single-subgraph TFLite model under construction."""

    def __init__(self) -> None:
        self.tensors: list[TensorSpec] = []
        self.buffers: list[np.ndarray | None] = [None]
        self.ops: list[OpSpec] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []

    def tensor(
        self, shape: Sequence[int], dtype: Any, name: str, signature: Sequence[int] | None = None
    ) -> int:
        """Add an activation tensor; return its index."""
        dt = np.dtype(dtype)
        if dt not in TENSOR_TYPES:
            raise TypeError(f"TFLite tensors of dtype {dt} are not supported here")
        sig = tuple(int(s) for s in signature) if signature is not None else None
        self.tensors.append(TensorSpec(name, tuple(int(s) for s in shape), dt, 0, sig))
        return len(self.tensors) - 1

    def constant(self, array: np.ndarray, name: str) -> int:
        """Add a constant tensor holding ``array``; return its index."""
        array = np.asarray(array, order="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
        index = self.tensor(array.shape, array.dtype, name)
        self.buffers.append(array)
        self.tensors[index].buffer = len(self.buffers) - 1
        return index

    def op(
        self, code: str, inputs: Sequence[int], outputs: Sequence[int], options: str | None = None, **fields: Any
    ) -> None:
        """Append the builtin operator ``code`` (a ``BuiltinOperator`` name such as ``"CONV_2D"``)."""
        if not hasattr(schema.BuiltinOperator, code):
            raise ValueError(f"unknown TFLite builtin operator {code!r}")
        self.ops.append(OpSpec(code, list(inputs), list(outputs), options, dict(fields)))

    def same_program(self, other: "ModelDraft") -> bool:
        """True when both drafts run the same operators on the same constants.

        Tensor shapes may differ: a draft built for batch 1 that is the same program as one built
        for batch 2 can be resized by the interpreter instead of rebuilt.
        """
        if [(o.code, o.inputs, o.outputs, o.options, o.fields) for o in self.ops] != [
            (o.code, o.inputs, o.outputs, o.options, o.fields) for o in other.ops
        ]:
            return False
        if len(self.buffers) != len(other.buffers):
            return False
        for a, b in zip(self.buffers, other.buffers):
            if a is b:
                continue
            if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
                return False
        return True


# ------------------------------------------------------------------------------------------------
# Serialization
# ------------------------------------------------------------------------------------------------


def _int_vector(builder: flatbuffers.Builder, values: Sequence[int]) -> int:
    return builder.CreateNumpyVector(np.asarray(values, dtype=np.int32).reshape(-1))


def _data_vector(builder: flatbuffers.Builder, array: np.ndarray) -> int:
    """The raw little-endian bytes of ``array`` as a 16-byte aligned ubyte vector."""
    payload = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).tobytes()
    builder.StartVector(1, len(payload), _DATA_ALIGNMENT)
    builder.head = builder.head - len(payload)
    builder.Bytes[builder.head : builder.head + len(payload)] = payload
    return builder.EndVector()


def _table_vector(builder: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    builder.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    return builder.EndVector()


def _options_table(builder: flatbuffers.Builder, name: str, fields: dict[str, Any]) -> int:
    """Write the options table ``name`` (e.g. ``Conv2DOptions``) from its fields."""
    # vectors must be complete before the table that points at them starts
    values = {k: _int_vector(builder, v) if isinstance(v, (list, tuple, np.ndarray)) else v for k, v in fields.items()}
    getattr(schema, f"{name}Start")(builder)
    for key, value in values.items():
        getattr(schema, f"{name}Add{key}")(builder, value)
    return getattr(schema, f"{name}End")(builder)


def _tensor(builder: flatbuffers.Builder, spec: TensorSpec) -> int:
    name = builder.CreateString(spec.name)
    shape = _int_vector(builder, spec.shape)
    signature = _int_vector(builder, spec.signature) if spec.signature is not None else None
    schema.TensorStart(builder)
    schema.TensorAddShape(builder, shape)
    schema.TensorAddType(builder, TENSOR_TYPES[spec.dtype])
    schema.TensorAddBuffer(builder, spec.buffer)
    schema.TensorAddName(builder, name)
    if signature is not None:
        schema.TensorAddShapeSignature(builder, signature)
    schema.TensorAddHasRank(builder, True)
    return schema.TensorEnd(builder)


def _operator(builder: flatbuffers.Builder, spec: OpSpec, opcode_index: int) -> int:
    inputs = _int_vector(builder, spec.inputs)
    outputs = _int_vector(builder, spec.outputs)
    options = _options_table(builder, spec.options, spec.fields) if spec.options else None
    schema.OperatorStart(builder)
    schema.OperatorAddOpcodeIndex(builder, opcode_index)
    schema.OperatorAddInputs(builder, inputs)
    schema.OperatorAddOutputs(builder, outputs)
    if options is not None:
        schema.OperatorAddBuiltinOptionsType(builder, getattr(schema.BuiltinOptions, spec.options))
        schema.OperatorAddBuiltinOptions(builder, options)
    return schema.OperatorEnd(builder)


def _operator_code(builder: flatbuffers.Builder, code: str) -> int:
    value = getattr(schema.BuiltinOperator, code)
    schema.OperatorCodeStart(builder)
    schema.OperatorCodeAddDeprecatedBuiltinCode(builder, min(value, _GREATER_OP_CODES))
    schema.OperatorCodeAddBuiltinCode(builder, value)
    schema.OperatorCodeAddVersion(builder, _MIN_VERSIONS.get(code, 1))
    return schema.OperatorCodeEnd(builder)


def serialize(draft: ModelDraft, description: str = "stn-edge") -> bytes:
    """The ``.tflite`` flatbuffer of ``draft`` (file identifier ``TFL3``, schema version 3)."""
    data_bytes = sum(a.nbytes for a in draft.buffers if a is not None)
    if data_bytes > 2**31 - 2**24:
        raise ValueError(f"the model's constants ({data_bytes} bytes) exceed the 2 GiB flatbuffer limit")
    # room for all constants up front: the builder would otherwise copy itself as it grows
    builder = flatbuffers.Builder(data_bytes + _DATA_ALIGNMENT * len(draft.buffers) + 256 * len(draft.tensors) + 4096)

    buffers = []
    for array in draft.buffers:
        data = _data_vector(builder, array) if array is not None and array.size else None
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        buffers.append(schema.BufferEnd(builder))
    tensors = [_tensor(builder, t) for t in draft.tensors]

    codes: dict[str, int] = {}
    for spec in draft.ops:
        codes.setdefault(spec.code, len(codes))
    operators = [_operator(builder, spec, codes[spec.code]) for spec in draft.ops]

    name = builder.CreateString("main")
    tensor_vec = _table_vector(builder, tensors)
    inputs = _int_vector(builder, draft.inputs)
    outputs = _int_vector(builder, draft.outputs)
    operator_vec = _table_vector(builder, operators)
    schema.SubGraphStart(builder)
    schema.SubGraphAddTensors(builder, tensor_vec)
    schema.SubGraphAddInputs(builder, inputs)
    schema.SubGraphAddOutputs(builder, outputs)
    schema.SubGraphAddOperators(builder, operator_vec)
    schema.SubGraphAddName(builder, name)
    subgraph = schema.SubGraphEnd(builder)

    code_vec = _table_vector(builder, [_operator_code(builder, c) for c in codes])
    subgraph_vec = _table_vector(builder, [subgraph])
    buffer_vec = _table_vector(builder, buffers)
    desc = builder.CreateString(description)
    schema.ModelStart(builder)
    schema.ModelAddVersion(builder, _SCHEMA_VERSION)
    schema.ModelAddOperatorCodes(builder, code_vec)
    schema.ModelAddSubgraphs(builder, subgraph_vec)
    schema.ModelAddDescription(builder, desc)
    schema.ModelAddBuffers(builder, buffer_vec)
    builder.Finish(schema.ModelEnd(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(memoryview(builder.Bytes)[builder.Head():])  # one copy, not two
