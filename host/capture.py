"""Capture: turn a trained model into a :class:`~stn_edge.graph.Graph`.

Host-side only (it needs ``onnx``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stn_edge.errors import CaptureError
from stn_edge.graph import Graph, Node, ValueInfo, dtype_name

try:
    import onnx
    from onnx import helper, numpy_helper
except ImportError:  # graph_from_onnx says how to install it
    onnx = helper = numpy_helper = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------------
# ONNX -> Graph
# ------------------------------------------------------------------------------------------------


#: attribute kinds with no place in the IR
_UNSTORABLE = ("SPARSE_TENSOR", "SPARSE_TENSORS", "TYPE_PROTO", "TYPE_PROTOS")


def _array(tensor: "onnx.TensorProto", what: str) -> np.ndarray:
    """A tensor as a contiguous little-endian array of a dtype the artifact supports."""
    array = numpy_helper.to_array(tensor)
    try:
        dtype_name(array.dtype)
    except TypeError as exc:
        raise CaptureError(f"{what} has an unsupported dtype: {exc}") from exc
    # np.require, not np.ascontiguousarray: the latter turns 0-d scalars into shape (1,)
    return np.require(array.astype(array.dtype.newbyteorder("<"), copy=False), requirements="C")


def _attr_value(attr: "onnx.AttributeProto", node: str) -> Any:
    """A node attribute as a plain Python value (numpy array for tensors)."""
    kind = attr.type
    if kind in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise CaptureError(
            f"node {node!r} has a subgraph attribute {attr.name!r} (control flow: If/Loop/Scan); "
            "stn-edge graphs are straight-line: export with fixed control flow (trace) instead"
        )
    kind_name = onnx.AttributeProto.AttributeType.Name(kind)
    if kind_name in _UNSTORABLE:
        raise CaptureError(f"node {node!r}: attribute {attr.name!r} is a {kind_name}; stn-edge cannot store it")
    value = helper.get_attribute_value(attr)
    if kind == onnx.AttributeProto.TENSOR:
        return _array(value, f"attribute {attr.name!r} of node {node!r}")
    if kind == onnx.AttributeProto.TENSORS:
        return [_array(v, f"attribute {attr.name!r} of node {node!r}") for v in value]
    if kind == onnx.AttributeProto.STRING:
        return value.decode("utf-8")
    if kind == onnx.AttributeProto.STRINGS:
        return [v.decode("utf-8") for v in value]
    if kind in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS):
        return list(value)
    return value


def _constant_value(node: "onnx.NodeProto", name: str) -> np.ndarray:
    """The tensor a ``Constant`` node (called ``name``) produces."""
    if len(node.attribute) != 1:
        raise CaptureError(f"Constant node {name!r} must have exactly one value attribute")
    attr = node.attribute[0]
    if attr.name == "value":
        return _array(attr.t, f"Constant {name!r}")
    if attr.name in ("value_float", "value_floats"):
        return np.array(attr.f if attr.name == "value_float" else list(attr.floats), dtype="<f4")
    if attr.name in ("value_int", "value_ints"):
        return np.array(attr.i if attr.name == "value_int" else list(attr.ints), dtype="<i8")
    raise CaptureError(f"Constant node {name!r}: {attr.name!r} is not supported (numeric tensors only)")


def _value_info(value: "onnx.ValueInfoProto", what: str) -> ValueInfo:
    """Name, shape (dim_value ints, dim_param strings) and dtype name of a graph input or output."""
    if value.type.WhichOneof("value") != "tensor_type":
        raise CaptureError(f"{what} {value.name!r} is not a tensor; stn-edge graphs take and give tensors")
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        raise CaptureError(f"{what} {value.name!r} has no known rank; export it with a shape")
    shape: list[int | str] = []
    for i, dim in enumerate(tensor.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        else:
            # an anonymous dim gets a name of its own, so it is not taken to equal another
            shape.append(dim.dim_param or f"{value.name}_dim{i}")
    try:
        dtype = dtype_name(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, TypeError, ValueError) as exc:
        raise CaptureError(
            f"{what} {value.name!r} has an unsupported element type {tensor.elem_type}: {exc}"
        ) from exc
    return ValueInfo(value.name, shape, dtype)


def _typed_outputs(model: "onnx.ModelProto") -> list["onnx.ValueInfoProto"]:
    """Graph outputs, with types from ONNX shape inference where the model left them out."""
    outputs = list(model.graph.output)
    if all(o.type.tensor_type.HasField("shape") and o.type.tensor_type.elem_type for o in outputs):
        return outputs
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph.output
    except Exception as exc:  # onnx raises its own InferenceError and friends
        raise CaptureError(f"graph outputs carry no shape and ONNX shape inference failed: {exc}") from exc
    return list(inferred)


def graph_from_onnx(model: "onnx.ModelProto") -> Graph:
    """Convert an ONNX model to a :class:`~stn_edge.graph.Graph`.

    ``Constant`` nodes become initializers; unnamed nodes get unique names (``f"{op}_{i}"``);
    attributes become plain values (tensors become numpy arrays, strings become ``str``).

    Raises
    ------
    CaptureError
        For control flow (If/Loop/Scan subgraphs), string or sparse tensors, dtypes the artifact
        cannot store, and a model with no default-domain opset; the message names the node.

    Examples
    --------
    >>> graph = graph_from_onnx(onnx.load("model.onnx"))   # doctest: +SKIP
    """
    if onnx is None:
        raise CaptureError("graph_from_onnx needs onnx; install it with: pip install 'stn-edge[host]'")
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not opsets:
        raise CaptureError("the model imports no default-domain ONNX opset")
    g = model.graph
    initializers = {t.name: _array(t, f"initializer {t.name!r}") for t in g.initializer}
    nodes: list[Node] = []
    names: set[str] = set()
    for i, proto in enumerate(g.node):
        name = proto.name or f"{proto.op_type}_{i}"
        while name in names:  # ONNX does not require unique node names; the IR does
            name = f"{name}_{i}"
        names.add(name)
        if proto.op_type == "Constant" and proto.domain in ("", "ai.onnx"):
            initializers[proto.output[0]] = _constant_value(proto, name)
            continue
        attrs = {a.name: _attr_value(a, name) for a in proto.attribute}
        nodes.append(Node(proto.op_type, name, list(proto.input), list(proto.output), attrs, proto.domain))
    inputs = [_value_info(v, "input") for v in g.input if v.name not in initializers]
    outputs = [_value_info(v, "output") for v in _typed_outputs(model)]
    return Graph(nodes, inputs, outputs, initializers, opset=int(opsets[0]))
