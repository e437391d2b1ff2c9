"""Lowering: a factorized layer at a chosen rank becomes a few plain ONNX ops.

Every family lowers to operators every backend already runs (Conv, MatMul, Gemm, Reshape, Transpose),
so a backend needs to know nothing about tensor decompositions. What is particular to a family (its
storage form, its lowering per layer kind, how it rebuilds the dense weight, how the runtime holds
its factors) lives in its module of :mod:`stn_edge.families`; this module does what every family
shares: the held form of the factors (nested-shell cores rebuilt as boxes, transposed factors),
the per-level output correction, tied weights, and the walk over the graph.

Factors are stored rank-major (the first axis is the rank, so a prefix of rows is a truncation);
``a`` is always the input-side factor and ``b`` the output-side one. Bonds are listed per ladder
level in ``layer["ladder"]["bonds"]``.

Nested-shell order: a core with bond axes (p, q) kept at (a_j, b_j) on level j stores, for each level
in turn, the cells of ``core[:a_j, :b_j]`` not in ``core[:a_{j-1}, :b_{j-1}]``, in row-major (p, q)
order; so the first ``a_j * b_j`` stored rows rebuild ``core[:a_j, :b_j]``. ``structure["shells"]``
names each nested-shell factor with the indices of its two bonds in ``ladder["bonds"]``.

One copy of every factor, read by the ops as constants. A level's ``a_j * b_j`` stored rows are
exactly the cells of the box ``core[:a_j, :b_j]``, so the runtime holds the box (in the layout its
op reads) instead of the rows, at the same bytes (``ladder.bytes`` counts exactly those), and gets
the rows back from it when a rescale extends or trims them (:func:`stored_rows`). Likewise a factor
an op reads with its rank axis moved is held transposed (:attr:`Family.held_axes`). The lowered
graph's weights are the held arrays or views of them (reshapes, unit axes, ``.T`` of a matrix): no
Gather or Transpose of a weight runs per inference, and an engine can pre-pack every kernel once.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stn_edge import families as _families
from stn_edge.errors import ArtifactError
from stn_edge.graph import Graph, Node


def assemble(layer: dict[str, Any], level: int, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Factors at ladder ``level`` as a runtime holds them and the lowered graph reads them, from the
    row prefixes read for that level.

    A factor whose stored layout is the one its op reads (every ``svd`` factor, most rank-major
    factors) is the rows array itself, not copied. A nested-shell core is rebuilt into its box, and a
    factor an op reads with other axes adjacent is transposed, each into one new C-contiguous array
    (:func:`_held_axes`): the same cells, so the same bytes as the rows, and the lowered graph reads
    it as a constant an engine can pre-pack. The rows are not kept: the result is the one copy of
    every factor, and :func:`stored_rows` gives the rows back when a rescale needs them. Entries that
    are not factors (the level's :data:`CORRECTION`) pass through.
    Raises :class:`ArtifactError` when a nested-shell factor does not hold the cells of a level.
    """
    shells = layer.get("structure", {}).get("shells", {})
    out = {}
    for name, r in rows.items():
        axes = _held_axes(layer, name, r.ndim + (name in shells))
        if name in shells:
            pairs = _shell_pairs(layer, name, r, level)
            a, b = pairs[-1]
            box_shape = (a, b) + r.shape[1:]
            held = np.empty(tuple(box_shape[k] for k in axes) if axes else box_shape, dtype=r.dtype)
            p, q = shell_order(pairs)
            _canonical_view(held, axes)[p, q] = r  # every cell is one stored row: nothing is left unset
            out[name] = held
        else:
            out[name] = r if axes is None else np.ascontiguousarray(r.transpose(axes))
    return out


def stored_rows(layer: dict[str, Any], level: int, held: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The row prefixes :func:`assemble` built ``held`` from at ``level``, bit for bit: ``held``'s own
    arrays or views of them where the runtime holds the stored layout, new arrays for nested-shell
    cores (the cells gathered back into nested-shell order)."""
    shells = layer.get("structure", {}).get("shells", {})
    out = {}
    for name, h in held.items():
        canon = _canonical_view(h, _held_axes(layer, name, h.ndim))
        if name in shells:
            i, k = shells[name]
            pairs = [(int(b[i]), int(b[k])) for b in layer["ladder"]["bonds"][: level + 1]]
            if canon.shape[:2] != pairs[-1]:
                raise ArtifactError(f"layer {layer['name']!r}: factor {name!r} is held as a {canon.shape[:2]} box, "
                                    f"level {level} has bonds {pairs[-1]}")
            p, q = shell_order(pairs)
            canon = canon[p, q]
        out[name] = canon
    return out


def assembled_shapes(layer: dict[str, Any], level: int, rows: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The shapes :func:`assemble` gives factors whose row prefixes at ``level`` have shapes ``rows``."""
    shells = layer.get("structure", {}).get("shells", {})
    out = {}
    for name, shape in rows.items():
        shape = tuple(int(d) for d in shape)
        if name in shells:
            i, k = shells[name]
            bonds = layer["ladder"]["bonds"][level]
            shape = (int(bonds[i]), int(bonds[k])) + shape[1:]
        axes = _held_axes(layer, name, len(shape))
        out[name] = shape if axes is None else tuple(shape[k] for k in axes)
    return out


def _canonical_view(held: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    """A view of ``held`` with its factor's canonical axes (the box's, or the stored rows')."""
    return held if axes is None else held.transpose(np.argsort(axes))


#: key of the per-level output correction ``(2, out)``: scale and shift per output channel
CORRECTION = "__correction__"


def apply_correction(layer: dict[str, Any], factors: dict[str, np.ndarray], corr: np.ndarray) -> dict[str, np.ndarray]:
    """Factors with the level's output ``scale`` folded in, plus the correction itself.

    ``factors`` must be arrays this call may own: the output factor is scaled in place, so a load
    never holds a scaled and an unscaled copy of it at once. Families without an output factor keep
    their factors and get the scale as one Mul after the layer (see :func:`lower`).
    """
    out = dict(factors)
    spec = _families.get(layer["family"]).output_factor
    if spec is not None:
        name, axis = spec
        shape = [1] * out[name].ndim
        shape[axis] = -1
        np.multiply(out[name], corr[0].reshape(shape), out=out[name], casting="same_kind")
    out[CORRECTION] = corr
    return out


def corrected_factor(layer: dict[str, Any]) -> str | None:
    """The factor that holds ``layer``'s correction scale once applied, or None.

    Scaling and unscaling a float32 array is not exact, so the runtime never unscales this factor:
    when a layer changes level it reads the factor's rows again and scales them afresh.
    """
    spec = _families.get(layer["family"]).output_factor
    return spec[0] if spec is not None and "corrections" in layer else None


def _corrected_bias(node: Node, layer: dict[str, Any], corr: np.ndarray, inits: dict[str, np.ndarray]) -> tuple[Node, list[Node]]:
    """Point ``node`` at a bias with the level's shift (and scale) applied; extra nodes if the scale is not folded."""
    scale, shift = corr[0], corr[1]
    bias_name = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else ""
    bias = inits[bias_name] if bias_name else np.zeros_like(shift)
    new_name = f"{layer['name']}::bias"
    extra: list[Node] = []
    out_name = node.outputs[0]
    if _families.get(layer["family"]).output_factor is not None:
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
    return _families.names()


def reconstruct(layer: dict[str, Any], factors: dict[str, np.ndarray]) -> np.ndarray:
    """The dense weight of ``layer`` rebuilt from its (truncated) factors as :func:`assemble` gives them,
    in the node's layout."""
    canonical = {k: _canonical_view(v, _held_axes(layer, k, v.ndim)) for k, v in factors.items()}
    dtype = next(iter(factors.values())).dtype  # every factor of a layer has one dtype
    return _families.get(layer["family"]).reconstruct(layer, canonical).astype(dtype, copy=False)


def lower(graph: Graph, layers: list[dict[str, Any]], held: dict[str, Any]) -> Graph:
    """Return a copy of ``graph`` where each layer runs as ``held`` says.

    ``held[layer_name]`` is either a dense weight array (the node keeps its original form) or a dict
    of truncated factors (the node is replaced by its family's plain ops). ``graph.initializers``
    must hold every tensor that is not a factorized layer's weight.
    """
    by_node = {layer["node"]: layer for layer in layers}
    nodes: list[Node] = []
    inits = dict(graph.initializers)
    replaced: set[str] = set()
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
            replaced.update(node.inputs[2:3])
            node, extra = _corrected_bias(node, layer, value[CORRECTION], inits)
            value = {k: v for k, v in value.items() if k != CORRECTION}
        lowerer = _families.get(layer["family"]).lowerers.get(layer["kind"])
        if lowerer is None:
            raise ArtifactError(
                f"layer {layer['name']!r} uses family {layer['family']!r} ({layer['kind']}) which this stn-edge "
                f"cannot lower; known: {', '.join(families())}. Upgrade stn-edge."
            )
        new_nodes, new_inits = lowerer(node, layer, value)
        nodes.extend(new_nodes + extra)
        inits.update(new_inits)
    nodes = _lower_tied_uses(nodes, inits, layers, held)
    used = {i for n in nodes for i in n.inputs}
    # biases replaced by a corrected copy: the originals are not held when no node reads them any more
    inits = {k: v for k, v in inits.items() if k in used or k not in replaced}
    return Graph(nodes=nodes, inputs=graph.inputs, outputs=graph.outputs, initializers=inits, opset=graph.opset)


def _lower_tied_uses(nodes: list[Node], inits: dict[str, np.ndarray], layers: list[dict[str, Any]],
                     held: dict[str, Any]) -> list[Node]:
    """Lower the other readers of a tied weight (``layer["tied"]``: ``{"node", "kind", "swap"[, "via"]}``)
    from the same held factors: ``swap`` exchanges ``a`` and ``b`` (a use that reads the weight
    transposed), ``via`` names a Transpose the factorized form no longer needs. The factors are
    views of the held arrays, so a tied weight is held once. A dense level keeps every reader as is."""
    uses = {u["node"]: (layer, i, u) for layer in layers if not isinstance(held[layer["name"]], np.ndarray)
            for i, u in enumerate(layer.get("tied", []))}
    if not uses:
        return nodes
    dropped = {u["via"] for _, _, u in uses.values() if u.get("via")}
    out: list[Node] = []
    for node in nodes:
        if node.name in dropped:
            continue
        if node.name not in uses:
            out.append(node)
            continue
        layer, i, use = uses[node.name]
        f = held[layer["name"]]
        if layer["family"] != "svd" or (use["kind"] == "embedding") != (node.op == "Gather"):
            raise ArtifactError(f"layer {layer['name']!r}: tied use {node.name!r} ({use['kind']}) of a "
                                f"{layer['family']} layer cannot be lowered; tied weights are SVD factors")
        factors = {"a": f["b"], "b": f["a"]} if use["swap"] else {"a": f["a"], "b": f["b"]}
        new_nodes, new_inits = _families.get("svd").lowerers[use["kind"]](node, dict(layer, name=f"{layer['name']}::tied{i}"), factors)
        out.extend(new_nodes)
        inits.update(new_inits)
    return out


def _held_axes(layer: dict[str, Any], name: str, ndim: int) -> tuple[int, ...] | None:
    """How the runtime holds factor ``name`` of ``layer``: the axes of its canonical form (the box of a
    nested-shell core, else the stored rows; ``ndim`` axes) in the held array's order, or None when
    it is held as it is (:attr:`stn_edge.families.Family.held_axes`)."""
    return _families.get(layer["family"]).held_axes(layer, name, ndim)


def shell_order(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(p, q)`` cell indices of a core kept at ``pairs[j] = (a_j, b_j)``, in nested-shell order.

    Level j's cells are the first ``a_j * b_j`` entries; inside one shell cells are row-major in (p, q).
    """
    a_top, b_top = (int(x) for x in pairs[-1])
    shell = np.full((a_top, b_top), len(pairs) - 1, dtype=np.int64)
    for j in range(len(pairs) - 1, -1, -1):
        shell[: int(pairs[j][0]), : int(pairs[j][1])] = j
    order = np.argsort(shell.ravel(), kind="stable")  # stable: row-major inside a shell
    return order // b_top, order % b_top


def _shell_pairs(layer: dict[str, Any], name: str, rows: np.ndarray, level: int | None = None) -> list[tuple[int, int]]:
    """``(a_j, b_j)`` of nested-shell factor ``name`` for levels ``0..level``; the level is the one whose
    cells ``rows`` holds when not given (cell counts rise strictly from level to level)."""
    bonds = layer["ladder"]["bonds"]
    i, k = layer["structure"]["shells"][name]
    pairs = [(int(b[i]), int(b[k])) for b in bonds]
    n = int(rows.shape[0])
    if level is None:
        level = next((j for j, (a, b) in enumerate(pairs) if a * b == n), None)
        if level is None:
            raise ArtifactError(f"layer {layer['name']!r}: factor {name!r} holds {n} cells, which no level's bonds "
                                f"{pairs} make")
    a, b = pairs[level]
    if n != a * b:
        raise ArtifactError(f"layer {layer['name']!r}: factor {name!r} holds {n} cells at level {level}, "
                            f"bonds {a}x{b} need {a * b}")
    return pairs[: level + 1]
