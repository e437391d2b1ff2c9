"""Lowering: a factorized layer at a chosen rank becomes a few plain ONNX ops.

Every family lowers to operators every backend already runs (Conv, MatMul, Gemm), so a backend
needs to know nothing about tensor decompositions. Each family also knows how to rebuild the dense
weight from its truncated factors, for engines where the dense form runs faster.

Factor conventions (rank-major: the first axis is the rank, so a prefix of rows is a truncation):

``svd``, kind ``conv``   ``a (r, C_in, *k)``, ``b (r, C_out)``: Conv(x, a) then 1x1 Conv(., b^T) + bias
``svd``, kind ``linear`` ``a (r, in)``, ``b (r, out)``: MatMul(x, a^T) then MatMul/Gemm(., b) + bias
``svd``, kind ``embedding`` ``a (r, vocab)``, ``b (r, dim)``: Gather(a^T, ids) then MatMul(., b)
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from stn_edge.errors import ArtifactError
from stn_edge.graph import Graph, Node

Lowerer = Callable[[Node, dict[str, Any], dict[str, np.ndarray]], tuple[list[Node], dict[str, np.ndarray]]]


def _svd_conv(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    a, b = f["a"], f["b"]
    k = a.shape[0]
    nd = a.ndim - 2
    w1, w2, mid = f"{layer['name']}::a", f"{layer['name']}::b", f"{node.outputs[0]}::r"
    first = Node("Conv", f"{node.name}::a", [node.inputs[0], w1], [mid], dict(node.attrs))
    first.attrs["kernel_shape"] = list(a.shape[2:])
    second_attrs = {"kernel_shape": [1] * nd}
    second = Node("Conv", f"{node.name}::b", [mid, w2] + node.inputs[2:3], list(node.outputs), second_attrs)
    # b^T reshaped to (C_out, k, 1, ...) is a view of the rank-major rows: no copy
    return [first, second], {w1: a, w2: b.T.reshape(b.shape[1], k, *([1] * nd))}


def _svd_linear(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    a, b = f["a"], f["b"]
    w1, w2, mid = f"{layer['name']}::a", f"{layer['name']}::b", f"{node.outputs[0]}::r"
    first = Node("MatMul", f"{node.name}::a", [node.inputs[0], w1], [mid])
    if node.op == "Gemm":
        second = Node("Gemm", f"{node.name}::b", [mid, w2] + node.inputs[2:3], list(node.outputs))
    else:
        second = Node("MatMul", f"{node.name}::b", [mid, w2], list(node.outputs))
    return [first, second], {w1: a.T, w2: b}


def _svd_embedding(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    # table (vocab, dim) = a^T b: look rows up in a^T (vocab, k), then project with b (k, dim)
    a, b = f["a"], f["b"]
    w1, w2, mid = f"{layer['name']}::a", f"{layer['name']}::b", f"{node.outputs[0]}::r"
    first = Node("Gather", f"{node.name}::a", [w1, node.inputs[1]], [mid], {"axis": 0})
    second = Node("MatMul", f"{node.name}::b", [mid, w2], list(node.outputs))
    return [first, second], {w1: a.T, w2: b}


def _svd_reconstruct(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    a, b = f["a"], f["b"]
    shape = tuple(layer["dense"]["shape"])
    if layer["kind"] == "conv":
        return (b.T @ a.reshape(a.shape[0], -1)).reshape(shape)
    if layer.get("layout") == "in_out":
        return a.T @ b
    return b.T @ a


_LOWERERS: dict[tuple[str, str], Lowerer] = {
    ("svd", "conv"): _svd_conv,
    ("svd", "linear"): _svd_linear,
    ("svd", "embedding"): _svd_embedding,
}
_RECONSTRUCT: dict[str, Callable[[dict[str, Any], dict[str, np.ndarray]], np.ndarray]] = {
    "svd": _svd_reconstruct,
}


_ASSEMBLE: dict[str, Callable[[dict[str, Any], int, dict[str, np.ndarray]], dict[str, np.ndarray]]] = {}


def assemble(layer: dict[str, Any], level: int, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Factors at ladder ``level`` from the row prefixes read for it.

    Families whose factors are plain rank-major arrays (svd) use the rows as they are; families
    that store a core in nested-shell order rebuild the core here.
    """
    fn = _ASSEMBLE.get(layer["family"])
    return rows if fn is None else fn(layer, level, rows)


#: key of the per-level output correction ``(2, out)``: scale and shift per output channel
CORRECTION = "__correction__"
#: family -> (factor, axis) that holds the output channels: the correction's scale folds into it
_OUTPUT_FACTOR: dict[str, tuple[str, int]] = {"svd": ("b", 1)}


def apply_correction(layer: dict[str, Any], factors: dict[str, np.ndarray], corr: np.ndarray) -> dict[str, np.ndarray]:
    """Factors with the level's output ``scale`` folded in (new arrays), plus the correction itself.

    ``factors`` must be arrays this call may own. Families without an output factor keep their
    factors and get the scale as one Mul after the layer (see :func:`lower`).
    """
    out = dict(factors)
    spec = _OUTPUT_FACTOR.get(layer["family"])
    if spec is not None:
        name, axis = spec
        shape = [1] * out[name].ndim
        shape[axis] = -1
        out[name] = out[name] * corr[0].reshape(shape)
    out[CORRECTION] = corr
    return out


def remove_correction(layer: dict[str, Any], held: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The raw factor rows back from what :func:`apply_correction` returned."""
    if CORRECTION not in held:
        return held
    out = {k: v for k, v in held.items() if k != CORRECTION}
    spec = _OUTPUT_FACTOR.get(layer["family"])
    if spec is not None:
        name, axis = spec
        shape = [1] * out[name].ndim
        shape[axis] = -1
        out[name] = out[name] / held[CORRECTION][0].reshape(shape)
    return out


def _corrected_bias(node: Node, layer: dict[str, Any], corr: np.ndarray, inits: dict[str, np.ndarray]) -> tuple[Node, list[Node]]:
    """Point ``node`` at a bias with the level's shift (and scale) applied; extra nodes if the scale is not folded."""
    scale, shift = corr[0], corr[1]
    bias_name = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else ""
    bias = inits[bias_name] if bias_name else np.zeros_like(shift)
    new_name = f"{layer['name']}::bias"
    extra: list[Node] = []
    out_name = node.outputs[0]
    if layer["family"] in _OUTPUT_FACTOR:
        inits[new_name] = (bias * scale + shift).astype(shift.dtype)
    else:  # y = scale * (W x + bias + shift / scale)
        inits[new_name] = (bias + shift / scale).astype(shift.dtype)
        inits[f"{layer['name']}::scale"] = scale.reshape(-1, *([1] * (len(layer["dense"]["shape"]) - 2 if layer["kind"] == "conv" else 0)))
        pre = f"{out_name}::unscaled"
        extra.append(Node("Mul", f"{node.name}::scale", [pre, f"{layer['name']}::scale"], [out_name]))
        out_name = pre
    new = Node(node.op, node.name, [node.inputs[0], node.inputs[1], new_name], [out_name] + node.outputs[1:],
               dict(node.attrs), node.domain)
    return new, extra


def families() -> list[str]:
    """Names of the decomposition families this version can lower."""
    return sorted({f for f, _ in _LOWERERS})


def reconstruct(layer: dict[str, Any], factors: dict[str, np.ndarray]) -> np.ndarray:
    """The dense weight of ``layer`` rebuilt from its (truncated) factors, in the node's layout."""
    return _RECONSTRUCT[layer["family"]](layer, factors).astype(factors["a"].dtype, copy=False)


def lower(graph: Graph, layers: list[dict[str, Any]], held: dict[str, Any]) -> Graph:
    """Return a copy of ``graph`` where each layer runs as ``held`` says.

    ``held[layer_name]`` is either a dense weight array (the node keeps its original form) or a dict
    of truncated factors (the node is replaced by its family's plain ops). ``graph.initializers``
    must hold every tensor that is not a factorized layer's weight.
    """
    by_node = {layer["node"]: layer for layer in layers}
    nodes: list[Node] = []
    inits = dict(graph.initializers)
    for node in graph.nodes:
        layer = by_node.get(node.name)
        if layer is None:
            nodes.append(node)
            continue
        value = held[layer["name"]]
        if isinstance(value, np.ndarray):
            inits[layer["weight"]] = value
            nodes.append(node)
            continue
        extra: list[Node] = []
        if CORRECTION in value:
            node, extra = _corrected_bias(node, layer, value[CORRECTION], inits)
            value = {k: v for k, v in value.items() if k != CORRECTION}
        key = (layer["family"], layer["kind"])
        if key not in _LOWERERS:
            raise ArtifactError(
                f"layer {layer['name']!r} uses family {key[0]!r} ({key[1]}) which this stn-edge cannot lower; "
                f"known: {', '.join(families())}. Upgrade stn-edge."
            )
        new_nodes, new_inits = _LOWERERS[key](node, layer, value)
        nodes.extend(new_nodes + extra)
        inits.update(new_inits)
    return Graph(nodes=nodes, inputs=graph.inputs, outputs=graph.outputs, initializers=inits, opset=graph.opset)
