"""Find the weights worth factorizing in a captured graph, and say why the others are not."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stn_edge.graph import Graph, Node
from stn_edge.host.decompositions.common import break_even_rank

#: weights smaller than this stay dense: the extra op costs more time than the bytes saved are worth
MIN_FACTOR_BYTES = 4096


@dataclass
class Candidate:
    """A weight that can be factorized: the node using it, its kind and its matricization."""

    node: Node
    weight: str
    kind: str  # "conv" or "linear"
    layout: str  # "conv", "out_in" (Gemm transB=1) or "in_out" (MatMul, Gemm transB=0)
    #: other nodes that read the same weight (tied weights), as stored in the layer's ``tied`` field:
    #: ``{"node", "kind", "swap"[, "via"]}`` (see :func:`stn_edge.lowering.lower`)
    uses: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A readable layer name: the module path (``layers.0.conv1``) where the exporter kept one."""
        return layer_name(self.node, self.weight)

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight as ``(out, in * kernel)``: the matricization SVD factorizes."""
        if self.layout == "in_out":
            return w.T
        return w.reshape(w.shape[0], -1)


@dataclass
class Skipped:
    """A weight left dense, and why."""

    weight: str
    node: str
    reason: str


def find_layers(graph: Graph, min_bytes: int = MIN_FACTOR_BYTES) -> tuple[list[Candidate], list[Skipped]]:
    """Every constant weight of a Conv/Gemm/MatMul, and every embedding table read by Gather.

    A weight read by several such nodes (tied weights) is one candidate: its first reader, with the
    others in ``uses``. Returns the factorizable ones and the skipped ones with the reason.
    """
    found: list[Candidate] = []
    skipped: list[Skipped] = []
    inits = graph.initializers
    seen: set[str] = set()
    for node in graph.nodes:
        left = _constant_left(node, inits)
        if left:
            skipped.append(Skipped(layer_name(node, left), node.name, left_reason(node)))
            continue
        weight = _weight_input(node)
        if not weight or weight not in inits or weight in seen:
            continue
        seen.add(weight)
        uses = _tied_uses(graph, node, weight)
        reason = uses if isinstance(uses, str) else _why_not(graph, node, weight, inits[weight], min_bytes)
        if reason:
            skipped.append(Skipped(layer_name(node, weight), node.name, reason))
            continue
        found.append(Candidate(node, weight, _kind(node), _layout(node), uses))
    return found, skipped


def _constant_left(node: Node, inits: dict) -> str:
    """The constant a ConvTranspose or a MatMul with the constant on the left (``W @ x``) reads."""
    if node.op == "ConvTranspose" and len(node.inputs) >= 2 and node.inputs[1] in inits:
        return node.inputs[1]
    if node.op == "MatMul" and node.inputs[0] in inits and node.inputs[1] not in inits:
        return node.inputs[0]
    return ""


def left_reason(node: Node) -> str:
    """Why a ConvTranspose or a constant-left MatMul stays dense (``stn-edge inspect`` lists it)."""
    if node.op == "ConvTranspose":
        return "ConvTranspose is not factorized yet (no lowering for its factors); kept dense"
    return "MatMul with the constant on the left (W @ x) is not factorized yet; kept dense"


#: which factor of the SVD ``W = P^T Q`` (rows of the stored weight) a reader calls ``a``
_ROWS_FACTOR = {"in_out": "a", "embedding": "a", "out_in": "b"}


def _reader_form(graph: Graph, node: Node, weight: str) -> tuple[Node, str, str] | str:
    """How ``node`` reads ``weight``: (the node a lowering replaces, its kind, which factor holds the
    weight's rows), or why that reading cannot share a factorization."""
    if node.op == "Transpose" and list(node.attrs.get("perm", [1, 0])) == [1, 0]:
        readers = graph.consumers(node.outputs[0])
        if len(readers) == 1 and readers[0].op == "MatMul" and readers[0].inputs[1] == node.outputs[0] \
                and readers[0].inputs[0] != node.outputs[0]:
            return readers[0], "linear", "b"  # x @ W^T: W's rows are the output side
        return f"read through a Transpose by {[n.op for n in readers]}"
    if _weight_input(node) != weight or _constant_left(node, graph.initializers):
        return f"read by {node.op} {node.name!r} as other than its weight"
    if node.op == "Conv":
        return "read by a Conv"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0):
        return "read by a Gemm with transA/alpha/beta"
    layout = "embedding" if node.op == "Gather" else _layout(node)
    return node, _kind(node), _ROWS_FACTOR[layout]


def _tied_uses(graph: Graph, primary: Node, weight: str) -> list[dict] | str:
    """The other readers of ``weight`` as lowering uses, or why the weight stays dense."""
    readers = [n for n in graph.nodes if weight in n.inputs]
    if len(readers) == 1:
        return []
    forms = [_reader_form(graph, n, weight) for n in readers]
    bad = [f for f in forms if isinstance(f, str)]
    if bad or graph.initializers[weight].ndim != 2:
        why = bad[0] if bad else f"a {graph.initializers[weight].ndim}-D weight"
        return f"shared weight (read by {len(readers)} nodes, {why}); kept dense so that it is stored once"
    main = forms[readers.index(primary)]
    uses = []
    for reader, (node, kind, rows) in zip(readers, forms):
        if reader is primary:
            continue
        use = {"node": node.name, "kind": kind, "swap": rows != main[2]}
        if reader is not node:
            use["via"] = reader.name
        uses.append(use)
    return uses


def _weight_input(node: Node) -> str:
    """The input a node reads its weight from: the kernel of Conv/Gemm/MatMul, the table of Gather."""
    if node.op in ("Conv", "Gemm", "MatMul") and len(node.inputs) >= 2:
        return node.inputs[1]
    if node.op == "Gather" and len(node.inputs) == 2:
        return node.inputs[0]
    return ""


def _kind(node: Node) -> str:
    return {"Conv": "conv", "Gather": "embedding"}.get(node.op, "linear")


def _layout(node: Node) -> str:
    """``conv`` (out, in, *k); ``out_in`` (Gemm transB=1); ``in_out`` (MatMul, Gemm transB=0, and
    embedding tables (vocab, dim), which factorize like a MatMul weight read by row)."""
    if node.op == "Conv":
        return "conv"
    return "out_in" if node.op == "Gemm" and node.attrs.get("transB", 0) else "in_out"


def _why_not(graph: Graph, node: Node, weight: str, w: np.ndarray, min_bytes: int) -> str:
    if w.dtype.kind != "f":
        return f"weight dtype {w.dtype} is not floating point"
    if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
        return f"grouped convolution (group={node.attrs['group']}); only group=1 kernels are factorized"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0):
        return "Gemm with transA/alpha/beta is not factorized"
    if node.op == "MatMul" and w.ndim != 2:
        return f"batched MatMul weight of rank {w.ndim}"
    if node.op == "Gather" and (w.ndim != 2 or int(node.attrs.get("axis", 0)) != 0):
        return "Gather that is not a row lookup in a 2-D table"
    if w.nbytes < min_bytes:
        return f"too small ({w.nbytes} bytes < min_bytes {min_bytes})"
    m = w.shape[1] if _layout(node) == "in_out" else w.shape[0]
    n = w.size // m
    if break_even_rank(m, n) < 1:
        return f"no byte saving at any rank ({m}x{n}: rank-1 factors hold {m + n} numbers, the dense weight {m * n})"
    return ""


def layer_name(node: Node, weight: str) -> str:
    """``layers.0.conv1`` from a weight ``layers.0.conv1.weight`` or a node ``/layers/layers.0/conv1/Conv``.

    The exporter renames weights it rewrote (BatchNorm folding gives ``onnx::Conv_83``); the node
    name still holds the module path, one scope per component, each scope qualified by its parent.
    """
    if not weight.startswith("onnx::") and "::" not in weight:
        return weight[: -len(".weight")] if weight.endswith(".weight") else weight
    scopes: list[str] = []
    for part in [p for p in node.name.split("/") if p][:-1]:
        if scopes and part.startswith(scopes[-1] + "."):
            scopes[-1] = part  # "layers" then "layers.0": the child scope repeats its parent's name
        else:
            scopes.append(part)
    return ".".join(scopes) or node.name
