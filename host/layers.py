"""Find the weights worth factorizing in a captured graph, and say why the others are not."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stn_edge.graph import Graph, Node
from stn_edge.host.decompositions.svd import break_even_rank

#: weights smaller than this stay dense: the extra op costs more time than the bytes saved are worth
MIN_FACTOR_BYTES = 4096


@dataclass
class Candidate:
    """A weight that can be factorized: the node using it, its kind and its matricization."""

    node: Node
    weight: str
    kind: str  # "conv" or "linear"
    layout: str  # "conv", "out_in" (Gemm transB=1) or "in_out" (MatMul, Gemm transB=0)

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

    Returns the factorizable ones and the skipped ones with the reason.
    """
    found: list[Candidate] = []
    skipped: list[Skipped] = []
    inits = graph.initializers
    for node in graph.nodes:
        weight = _weight_input(node)
        if not weight or weight not in inits:
            continue
        reason = _why_not(graph, node, weight, inits[weight], min_bytes)
        if reason:
            skipped.append(Skipped(layer_name(node, weight), node.name, reason))
            continue
        found.append(Candidate(node, weight, _kind(node), _layout(node)))
    return found, skipped


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
    readers = len([n for n in graph.nodes if weight in n.inputs])
    if readers > 1:
        return f"shared weight (read by {readers} nodes); kept dense so that it is stored once"
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
