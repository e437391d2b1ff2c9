"""The model graph: nodes with ONNX operator semantics, held without protobuf.

A :class:`Graph` is what the artifact stores and what every backend runs. Node attributes are plain
Python values (int, float, str, bytes, lists of those) or numpy arrays for tensor-valued attributes.
Optional inputs that are absent are the empty string, as in ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: dtypes the artifact and the backends accept, by their artifact name
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}


def dtype_name(dtype: np.dtype | type | str) -> str:
    """Return the artifact name of a numpy dtype (``float32``, ``int64``...)."""
    dt = np.dtype(dtype)
    for name, known in DTYPES.items():
        if known == dt.newbyteorder("<") or known == dt:
            return name
    raise TypeError(f"dtype {dt} is not supported; supported: {', '.join(DTYPES)}")


@dataclass
class ValueInfo:
    """A graph input or output: name, shape (ints, or strings for symbolic dims), dtype name."""

    name: str
    shape: list[int | str]
    dtype: str = "float32"


@dataclass
class Node:
    """One operator application, with ONNX semantics for ``op`` and ``attrs``."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    domain: str = ""


@dataclass
class Graph:
    """A topologically sorted list of nodes plus the constant tensors they read."""

    nodes: list[Node]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    opset: int = 17

    def consumers(self, value: str) -> list[Node]:
        """Nodes that read ``value``."""
        return [n for n in self.nodes if value in n.inputs]

    def check_wiring(self) -> None:
        """Raise :class:`~stn_edge.errors.BackendError` unless every node reads only values that an
        input, an initializer or an earlier node provides, and every graph output is produced."""
        from stn_edge.errors import BackendError

        available = {v.name for v in self.inputs} | set(self.initializers)
        for node in self.nodes:
            absent = [name for name in node.inputs if name and name not in available]
            if absent:
                raise BackendError(
                    f"node {node.name!r} reads {absent}, which no input, initializer or earlier node "
                    "provides; the graph must be topologically sorted"
                )
            available.update(node.outputs)
        unproduced = [o.name for o in self.outputs if o.name not in available]
        if unproduced:
            raise BackendError(f"graph outputs {unproduced} are produced by no node, input or initializer")

    def last_uses(self) -> dict[str, int]:
        """Value name -> index of the last node that reads it (or writes it, when no later node reads
        it), for every value a node touches, initializers included."""
        last: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for name in node.inputs + node.outputs:
                if name:
                    last[name] = i
        return last

    def release_schedule(self) -> list[list[str]]:
        """Per node, the values an engine may drop once that node has run: those it is the last to
        touch (:meth:`last_uses`), graph outputs excepted. Peak memory is then about the live set,
        not the whole graph; backends and the activation count (:mod:`stn_edge.activations`) share it."""
        keep = {o.name for o in self.outputs}
        release: list[list[str]] = [[] for _ in self.nodes]
        for name, i in self.last_uses().items():
            if name not in keep:
                release[i].append(name)
        return release

    def producer(self, value: str) -> Node | None:
        """The node that writes ``value``, or None for inputs and initializers."""
        for n in self.nodes:
            if value in n.outputs:
                return n
        return None


# --------------------------------------------------------------------------- storage form
# The artifact header stores a graph as plain msgpack maps; tensor-valued attributes become
# {"tensor": {dtype, shape, data}} so that reading them needs neither protobuf nor pickle.


def _attr_to_plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        arr = np.asarray(value, order="C")  # ascontiguousarray would turn 0-d into 1-d
        return {"tensor": {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape), "data": arr.astype(DTYPES[dtype_name(arr.dtype)]).tobytes()}}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_attr_to_plain(v) for v in value]
    return value


def _attr_from_plain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tensor"}:
        t = value["tensor"]
        if not isinstance(t, dict) or t.get("dtype") not in DTYPES or not isinstance(t.get("data"), bytes):
            raise ValueError("malformed tensor attribute")
        shape = tuple(int(d) for d in t.get("shape", []))
        dt = DTYPES[t["dtype"]]
        if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != len(t["data"]):
            raise ValueError("tensor attribute size does not match its shape")
        return np.frombuffer(t["data"], dtype=dt).reshape(shape).copy()
    if isinstance(value, list):
        return [_attr_from_plain(v) for v in value]
    return value


def graph_to_dict(graph: Graph) -> dict[str, Any]:
    """The header form of ``graph`` (initializers excluded: the artifact stores them as blocks)."""
    return {
        "opset": int(graph.opset),
        "inputs": [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in graph.inputs],
        "outputs": [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in graph.outputs],
        "nodes": [
            {
                "op": n.op,
                "name": n.name,
                "inputs": list(n.inputs),
                "outputs": list(n.outputs),
                "attrs": {k: _attr_to_plain(v) for k, v in n.attrs.items()},
                **({"domain": n.domain} if n.domain else {}),
            }
            for n in graph.nodes
        ],
    }


def graph_from_dict(model: dict[str, Any], initializers: dict[str, np.ndarray] | None = None) -> Graph:
    """Rebuild a :class:`Graph` from its header form (validated beforehand by the reader)."""
    return Graph(
        nodes=[
            Node(
                op=n["op"],
                name=n["name"],
                inputs=list(n["inputs"]),
                outputs=list(n["outputs"]),
                attrs={k: _attr_from_plain(v) for k, v in n.get("attrs", {}).items()},
                domain=n.get("domain", ""),
            )
            for n in model["nodes"]
        ],
        inputs=[ValueInfo(v["name"], list(v["shape"]), v["dtype"]) for v in model["inputs"]],
        outputs=[ValueInfo(v["name"], list(v["shape"]), v["dtype"]) for v in model["outputs"]],
        initializers=dict(initializers or {}),
        opset=int(model.get("opset", 17)),
    )
