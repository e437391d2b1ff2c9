"""Machinery every backend shares: checking a node against an op table, and the ops never folded.

The schedule that frees a value after its last reader is a :class:`~stn_edge.graph.Graph` helper
(:meth:`~stn_edge.graph.Graph.release_schedule`), since the activation count in the contract walks
the same schedule.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

from stn_edge.errors import UnsupportedOp
from stn_edge.graph import Node

#: ops never computed ahead of time (folded) even when every input is constant, nor moved off the
#: engine: they are the model's arithmetic, and folding a factorized layer would undo it
NEVER_FOLD = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"})

Entry = TypeVar("Entry")


def check_node(node: Node, opset: int, ops: Mapping[str, Entry], impl: Callable[[Entry], Any],
               refuse: Callable[[Node, str], UnsupportedOp], backend: str) -> Entry:
    """The entry of ``ops`` that runs ``node``; ``refuse(node, why)`` raised when there is none.

    ``impl(entry)`` gives the entry's op description: ``n_required`` and ``n_positional`` inputs,
    ``outputs``, ``attr_names`` and an optional ``check(node, opset) -> reason or None``.
    """
    if node.domain not in ("", "ai.onnx"):
        raise refuse(node, f"domain {node.domain!r} is not implemented (default ONNX domain only)")
    entry = ops.get(node.op)
    if entry is None:
        raise refuse(node, f"no such op here; the {backend} backend runs: {', '.join(sorted(ops))}")
    op = impl(entry)
    present = [i for i, name in enumerate(node.inputs) if name]
    if any(i >= len(node.inputs) or not node.inputs[i] for i in range(op.n_required)):
        raise refuse(node, f"it needs {op.n_required} inputs, got {node.inputs}")
    if op.n_positional is not None and present and present[-1] >= op.n_positional:
        raise refuse(node, f"input {present[-1]} is not implemented (at most {op.n_positional})")
    wanted = [i for i, name in enumerate(node.outputs) if name]
    if op.outputs is not None and wanted and wanted[-1] >= op.outputs:
        raise refuse(node, f"output {wanted[-1]} is not implemented (at most {op.outputs})")
    unknown = sorted(set(node.attrs) - op.attr_names)
    if unknown:
        raise refuse(node, f"attribute(s) {', '.join(unknown)} not implemented")
    reason = op.check(node, opset) if op.check else None
    if reason:
        raise refuse(node, reason)
    return entry
