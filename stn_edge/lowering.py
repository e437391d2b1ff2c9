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
            p, q = _shell_order(pairs)
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
            p, q = _shell_order(pairs)
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
#: family -> (factor, axis) that holds the output channels: the correction's scale folds into it
_OUTPUT_FACTOR: dict[str, tuple[str, int]] = {"svd": ("b", 1)}


def apply_correction(layer: dict[str, Any], factors: dict[str, np.ndarray], corr: np.ndarray) -> dict[str, np.ndarray]:
    """Factors with the level's output ``scale`` folded in, plus the correction itself.

    ``factors`` must be arrays this call may own: the output factor is scaled in place, so a load
    never holds a scaled and an unscaled copy of it at once. Families without an output factor keep
    their factors and get the scale as one Mul after the layer (see :func:`lower`).
    """
    out = dict(factors)
    spec = _OUTPUT_FACTOR.get(layer["family"])
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
    spec = _OUTPUT_FACTOR.get(layer["family"])
    return spec[0] if spec is not None and "corrections" in layer else None


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
    """The dense weight of ``layer`` rebuilt from its (truncated) factors as :func:`assemble` gives them,
    in the node's layout."""
    canonical = {k: _canonical_view(v, _held_axes(layer, k, v.ndim)) for k, v in factors.items()}
    return _RECONSTRUCT[layer["family"]](layer, canonical).astype(factors["a"].dtype, copy=False)


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
        key = (layer["family"], layer["kind"])
        if key not in _LOWERERS:
            raise ArtifactError(
                f"layer {layer['name']!r} uses family {key[0]!r} ({key[1]}) which this stn-edge cannot lower; "
                f"known: {', '.join(families())}. Upgrade stn-edge."
            )
        new_nodes, new_inits = _LOWERERS[key](node, layer, value)
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
        new_nodes, new_inits = _LOWERERS[("svd", use["kind"])](node, dict(layer, name=f"{layer['name']}::tied{i}"), factors)
        out.extend(new_nodes)
        inits.update(new_inits)
    return out


# --------------------------------------------------------------------------- tensor-network families
#
# Storage forms (what ``add_rows`` stores; axis 0 is what a ladder level truncates), the form the
# runtime holds (what :func:`assemble` makes of the rows, :func:`_held_axes`) and the ops that read it.
# ``a`` is always the input-side factor and ``b`` the output-side one, as for ``svd``. Bonds are listed
# per ladder level in ``layer["ladder"]["bonds"]``. "Box" is a nested-shell core rebuilt as an array.
#
# ``svd-spatial`` conv  bonds [r]. ``a (r, C_in, k1)``, ``b (r, C_out, k2)``, held ``(C_out, r, k2)``: a
#                       (k1 x 1) Conv C_in->r then a (1 x k2) Conv r->C_out (``structure["first"] == "h"``;
#                       ``"w"`` swaps the axes).
# ``tucker2``   conv    bonds [r_out, r_in]. ``a (r_in, C_in)``, ``b (r_out, C_out)`` rank-major; ``core``
#                       nested-shell over (r_out, r_in), held as its box ``(r_out, r_in, *k)``: 1x1 Conv,
#                       the kernel Conv (stride/pads/dilations), 1x1 Conv + bias.
# ``cp``        conv    bonds [R]. ``a (R, C_in)``, ``h (R, kh)``, ``w (R, kw)``, ``b (R, C_out)``: 1x1 Conv,
#                       depthwise (kh x 1) Conv, depthwise (1 x kw) Conv, 1x1 Conv + bias.
# ``tt``        linear  modes in = prod(i_k), out = prod(o_k), k = 1..d (d = 2 or 3), bonds [r_1..r_{d-1}].
#                       ``a (r_1, i_1, o_1)`` (held ``(i_1, o_1, r_1)`` when the input has lead axes
#                       besides the batch), ``b (r_{d-1}, i_d, o_d)`` rank-major; for d = 3 ``core``
#                       nested-shell over (r_1, r_2), held ``(r_1, i_2, o_2, r_2)``. Lowered as a
#                       Reshape/Transpose/MatMul chain + Add(bias).
# ``tt``        conv    C_in = i1*i2, C_out = o1*o2, bonds [r_1, r_2]. ``a (r_1, i1, o1)`` held
#                       ``(i1, o1, r_1)``, ``b (r_2, i2, o2)``, ``core`` nested-shell over (r_1, r_2), held
#                       ``(r_2, r_1, kh, kw)``. Lowered as MatMul over i1 (channels last), the kernel Conv
#                       on (N*i2*o1, r_1) images, MatMul over (r_2, i2), Transpose back + Add(bias).
# ``tr``/``fctn`` conv  ring (C_in)-(kernel)-(C_out)-back, bonds [r_0, r_1, r_2] (r_0 closes the ring).
#                       All three are nested-shell cores: ``a`` over (r_0, r_1), held ``(r_0, r_1, C_in)``;
#                       ``core`` over (r_1, r_2), held ``(r_2, r_1, *k)``; ``b`` over (r_2, r_0), held
#                       ``(C_out, r_0, r_2)``. Lowered as 1x1 Conv C_in->r_0*r_1, Reshape to
#                       (N*r_0, r_1, H, W), kernel Conv, Reshape to (N, r_0*r_2, H', W'), 1x1 Conv + bias:
#                       the last Conv contracts (r_0, r_2) together, which closes the ring.
#
# Nested-shell order: a core with bond axes (p, q) kept at (a_j, b_j) on level j stores, for each level
# in turn, the cells of ``core[:a_j, :b_j]`` not in ``core[:a_{j-1}, :b_{j-1}]``, in row-major (p, q)
# order; so the first ``a_j * b_j`` stored rows rebuild ``core[:a_j, :b_j]``. ``structure["shells"]``
# names each nested-shell factor with the indices of its two bonds in ``ladder["bonds"]``.
#
# One copy of every factor, read by the ops as constants. A level's ``a_j * b_j`` stored rows are
# exactly the cells of the box ``core[:a_j, :b_j]``, so the runtime holds the box (in the layout its
# op reads) instead of the rows, at the same bytes (``ladder.bytes`` counts exactly those), and gets
# the rows back from it when a rescale extends or trims them (:func:`stored_rows`). Likewise a factor
# an op reads with its rank axis moved is held transposed. The lowered graph's weights are the held
# arrays or views of them (reshapes, unit axes, ``.T`` of a matrix): no Gather or Transpose of a weight
# runs per inference, and an engine can pre-pack every kernel once.


def _held_axes(layer: dict[str, Any], name: str, ndim: int) -> tuple[int, ...] | None:
    """How the runtime holds factor ``name`` of ``layer``: the axes of its canonical form (the box of a
    nested-shell core, else the stored rows; ``ndim`` axes) in the held array's order, or None when
    it is held as it is. One place for the layouts the lowerers read (see "Storage forms" above)."""
    family, kind = layer["family"], layer["kind"]
    rest = tuple(range(2, ndim))
    if family == "svd-spatial" and name == "b":
        return (1, 0, 2)                    # (r, C_out, k2) -> (C_out, r, k2): the second Conv's kernel
    if family == "tt":
        if name == "core":
            return (0, 2, 3, 1) if kind == "linear" else (1, 0) + rest  # (r1, i2, o2, r2) / (r2, r1, kh, kw)
        if name == "a" and (kind == "conv" or int(layer["structure"].get("input_rank", 2)) > 2):
            return (1, 2, 0)                # (r1, i1, o1) -> (i1, o1, r1): the MatMul's (i1, o1 * r1)
    if family in ("tr", "fctn"):
        if name == "core":
            return (1, 0) + rest            # (r1, r2, *k) -> (r2, r1, *k): the kernel Conv's weight
        if name == "b":
            return (2, 1, 0)                # (r2, r0, C_out) -> (C_out, r0, r2): the last Conv's (C_out, r0 * r2)
    return None


def _shell_order(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _conv_attrs(attrs: dict[str, Any], kernel: list[int], keep: tuple[int, ...]) -> dict[str, Any]:
    """Attributes of a Conv that applies the original node's stride/pads/dilations on spatial axes ``keep`` only."""
    nd = len(kernel)
    strides = list(attrs.get("strides") or [1] * nd)
    dil = list(attrs.get("dilations") or [1] * nd)
    pads = list(attrs.get("pads") or [0] * (2 * nd))
    out: dict[str, Any] = {
        "kernel_shape": [int(k) for k in kernel],
        "strides": [int(strides[k]) if k in keep else 1 for k in range(nd)],
        "dilations": [int(dil[k]) if k in keep else 1 for k in range(nd)],
    }
    auto_pad = _text(attrs.get("auto_pad", "NOTSET"))
    if auto_pad != "NOTSET" and keep:
        out["auto_pad"] = auto_pad  # SAME_* on an axis with kernel 1 and stride 1 pads nothing
    else:
        out["pads"] = [int(pads[k]) if k in keep else 0 for k in range(nd)] + \
                      [int(pads[nd + k]) if k in keep else 0 for k in range(nd)]
    return out


class _Emitter:
    """Emits the plain ops of one lowered layer: unique node names, constants as initializers."""

    def __init__(self, node: Node, layer: dict[str, Any]):
        self.node, self.prefix = node, layer["name"]
        self.nodes: list[Node] = []
        self.inits: dict[str, np.ndarray] = {}

    def const(self, tag: str, value: np.ndarray) -> str:
        name = f"{self.prefix}::{tag}"
        self.inits[name] = value
        return name

    def op(self, op: str, inputs: list[str], attrs: dict[str, Any] | None = None, last: bool = False) -> str:
        k = len(self.nodes)
        out = self.node.outputs[0] if last else f"{self.node.outputs[0]}::{k}"
        self.nodes.append(Node(op, f"{self.node.name}::{k}", inputs, [out], attrs or {}))
        return out

    def reshape(self, x: str, shape: list[int], last: bool = False) -> str:
        return self.op("Reshape", [x, self.const(f"shape{len(self.nodes)}", np.array(shape, dtype=np.int64))], last=last)

    def transpose(self, x: str, perm: list[int]) -> str:
        return self.op("Transpose", [x], {"perm": list(perm)})

    def bias(self, x: str, channel_dims: int = 0) -> str:
        """Add the node's bias (its third input) to ``x``; ``channel_dims`` trailing 1s put it on axis 1 of NCHW."""
        if len(self.node.inputs) < 3 or not self.node.inputs[2]:
            self.nodes[-1].outputs = [self.node.outputs[0]]  # no bias: the last op writes the output
            return self.node.outputs[0]
        b = self.node.inputs[2]
        if channel_dims:
            b = self.reshape(b, [-1] + [1] * channel_dims)
        return self.op("Add", [x, b], last=True)

    def result(self) -> tuple[list[Node], dict[str, np.ndarray]]:
        return self.nodes, self.inits


def _conv_bias(node: Node) -> list[str]:
    return node.inputs[2:3] if len(node.inputs) > 2 and node.inputs[2] else []


def _svd_spatial_conv(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    a, b = f["a"], f["b"]
    first = 0 if layer["structure"].get("first", "h") == "h" else 1
    e = _Emitter(node, layer)
    k1, k2 = a.shape[2], b.shape[2]
    # both kernels are views of the held arrays with a unit axis: a (r, C_in, k1), b held (C_out, r, k2)
    if first == 0:
        w1, w2, kern1, kern2 = a[:, :, :, None], b[:, :, None, :], [k1, 1], [1, k2]
    else:
        w1, w2, kern1, kern2 = a[:, :, None, :], b[:, :, :, None], [1, k1], [k2, 1]
    mid = e.op("Conv", [node.inputs[0], e.const("a", w1)], _conv_attrs(node.attrs, kern1, (first,)))
    e.op("Conv", [mid, e.const("b", w2)] + _conv_bias(node), _conv_attrs(node.attrs, kern2, (1 - first,)), last=True)
    return e.result()


def _svd_spatial_reconstruct(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    if layer["structure"].get("first", "h") == "h":
        return np.einsum("riy,rox->oiyx", f["a"], f["b"], optimize=True)
    return np.einsum("rix,roy->oiyx", f["a"], f["b"], optimize=True)


def _tucker2_conv(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    a, core, b = f["a"], f["core"], f["b"]
    nd = core.ndim - 2
    ones = [1] * nd
    e = _Emitter(node, layer)
    x = e.op("Conv", [node.inputs[0], e.const("a", a.reshape(a.shape + (1,) * nd))], _conv_attrs(node.attrs, ones, ()))
    x = e.op("Conv", [x, e.const("core", core)], _conv_attrs(node.attrs, list(core.shape[2:]), tuple(range(nd))))
    # b^T reshaped to (C_out, r_out, 1, ...) is a view of the rank-major rows, as for svd
    w3 = b.T.reshape(b.shape[1], b.shape[0], *ones)
    e.op("Conv", [x, e.const("b", w3)] + _conv_bias(node), _conv_attrs(node.attrs, ones, ()), last=True)
    return e.result()


def _tucker2_reconstruct(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    a, core, b = f["a"], f["core"], f["b"]
    p, q = core.shape[:2]
    w = b.T @ core.reshape(p, -1)  # (C_out, r_in * K)
    w = w.reshape(b.shape[1], q, -1).transpose(0, 2, 1) @ a  # (C_out, K, C_in)
    return w.transpose(0, 2, 1).reshape(tuple(layer["dense"]["shape"]))


def _cp_conv(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    a, h, w, b = f["a"], f["h"], f["w"], f["b"]
    r = a.shape[0]
    e = _Emitter(node, layer)
    x = e.op("Conv", [node.inputs[0], e.const("a", a[:, :, None, None])], _conv_attrs(node.attrs, [1, 1], ()))
    hv = _conv_attrs(node.attrs, [h.shape[1], 1], (0,))
    x = e.op("Conv", [x, e.const("h", h[:, None, :, None])], {**hv, "group": r})
    wv = _conv_attrs(node.attrs, [1, w.shape[1]], (1,))
    x = e.op("Conv", [x, e.const("w", w[:, None, None, :])], {**wv, "group": r})
    w4 = b.T[:, :, None, None]  # a view of the rank-major rows, as for svd
    e.op("Conv", [x, e.const("b", w4)] + _conv_bias(node), _conv_attrs(node.attrs, [1, 1], ()), last=True)
    return e.result()


def _cp_reconstruct(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    return np.einsum("ro,ri,ry,rx->oiyx", f["b"], f["a"], f["h"], f["w"], optimize=True)


def _tt_cores(f: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Logical TT-matrix cores ``(r_left, i_k, o_k, r_right)`` from the factors (cores as boxes)."""
    cores = [f["a"].transpose(1, 2, 0)[None]]
    if "core" in f:
        cores.append(f["core"].transpose(0, 2, 3, 1))
    cores.append(f["b"][..., None])
    return cores


def _tt_linear(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    """x (lead..., in) through the TT-matrix chain; see the state descriptions in the comments."""
    st = layer["structure"]
    ins, outs = [int(i) for i in st["in_modes"]], [int(o) for o in st["out_modes"]]
    L = int(st.get("input_rank", 2)) - 1
    e = _Emitter(node, layer)
    a, b = f["a"], f["b"]
    d = len(ins)
    # cores 1.. as the matrices (r_{k-1} * i_k, o_k * r_k) a MatMul reads, with r_k: views of b
    # (r, i_d, o_d) and of the middle core, held (r1, i2, o2, r2)
    mats: list[tuple[str, int]] = []
    if "core" in f:
        p, i, o, q = f["core"].shape
        mats.append((e.const("core", f["core"].reshape(p * i, o * q)), q))
    mats.append((e.const("b", b.reshape(b.shape[0] * b.shape[1], b.shape[2])), 1))
    if L == 1:
        return _tt_linear_rows(e, node, a, mats, ins, outs)
    # lead axes kept: state before core k is (lead, Q_k, P_k, r_{k-1} * i_k), Q_k = prod(i_{k+1:}),
    # P_k = prod(o_{:k-1}); core 0 is the matrix (i1, o1 * r1), a view of a held (i1, o1, r1)
    lead = [0] * L
    r1 = a.shape[2]
    mats.insert(0, (e.const("a", a.reshape(a.shape[0], a.shape[1] * r1)), r1))
    q = int(np.prod(ins[1:]))
    x = e.reshape(node.inputs[0], lead + [ins[0], q])
    x = e.transpose(x, list(range(L)) + [L + 1, L])
    p = 1
    for k, (g, rr) in enumerate(mats):
        x = e.op("MatMul", [x, g])
        p *= outs[k]
        if k == d - 1:
            break
        nxt = ins[k + 1]
        q //= nxt
        x = e.reshape(x, lead + [nxt, q, p, rr])
        x = e.transpose(x, list(range(L)) + [L + 1, L + 2, L + 3, L])
        x = e.reshape(x, lead + [q, p, rr * nxt])
    x = e.reshape(x, lead + [int(np.prod(outs))])
    e.bias(x)
    return e.result()


def _tt_linear_rows(e: _Emitter, node: Node, a: np.ndarray, mats: list[tuple[str, int]], ins: list[int],
                    outs: list[int]) -> tuple[list[Node], dict[str, np.ndarray]]:
    """The TT chain for x (N, in), every core read in place and only 2-D transposes of activations.

    Core 0 is r1 matrices ``a[r] (i1, o1)``: a batched MatMul of the rows (i2..i_d, N) of x. After
    it the values are ``(r1, i2, [i3..], N, o1)``; core k contracts the two leading axes
    ``(r_{k-1}, i_k)`` (moved last by one transpose) and leaves ``([i_{k+1}..], N, o_1..o_k, r_k)``,
    whose leading ``i_{k+1}`` one transpose moves next to ``r_k`` for core k + 1.
    """
    d = len(ins)
    x = e.reshape(node.inputs[0], [-1] + ins)                                # (N, i1, ..., i_d)
    x = e.transpose(x, list(range(2, d + 1)) + [0, 1])                       # (i2, ..., i_d, N, i1)
    x = e.reshape(x, [1, -1, ins[0]])
    x = e.op("MatMul", [x, e.const("a", a)])                                 # (r1, i2, ..., N, o1)
    x = e.transpose(e.reshape(x, [a.shape[0] * ins[1], -1]), [1, 0])        # ([i3..], N, o1 | r1 i2)
    for k, (g, rr) in enumerate(mats, start=1):
        x = e.op("MatMul", [x, g])                                           # ([i_{k+2}..], N, o_1..o_k | o_{k+1} r_{k+1})
        if k == d - 1:
            break
        x = e.transpose(e.reshape(x, [ins[k + 1], -1]), [1, 0])             # ([i_{k+3}..], N, o_1..o_{k+1}, r_{k+1} | i_{k+2})
        x = e.reshape(x, [-1, rr * ins[k + 1]])
    x = e.reshape(x, [-1, int(np.prod(outs))])
    e.bias(x)
    return e.result()


def _tt_matrix(f: dict[str, np.ndarray], ins: list[int], outs: list[int]) -> np.ndarray:
    """The ``(in, out)`` matrix of a TT-matrix chain."""
    acc = None
    for g in _tt_cores(f):
        if acc is None:
            acc = g[0]  # (i1, o1, r1)
        else:
            rl = g.shape[0]
            acc = (acc.reshape(-1, rl) @ g.reshape(rl, -1))  # (..., i_k o_k r_k)
            acc = acc.reshape(-1, g.shape[3])
    # acc holds indices (i1, o1, i2, o2, ...): bring the i's first
    d = len(ins)
    t = acc.reshape([v for pair in zip(ins, outs) for v in pair])
    t = t.transpose(list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2)))
    return t.reshape(int(np.prod(ins)), int(np.prod(outs)))


def _tt_conv(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    st = layer["structure"]
    (i1, i2), (o1, o2) = st["in_modes"], st["out_modes"]
    a, core, b = f["a"], f["core"], f["b"]  # a held (i1, o1, r1), core held (r2, r1, kh, kw)
    r1 = a.shape[2]
    r2, _, kh, kw = core.shape
    e = _Emitter(node, layer)
    g1 = e.const("a", a.reshape(i1, o1 * r1))
    x = e.transpose(node.inputs[0], [0, 2, 3, 1])                       # (N, H, W, C_in)
    x = e.reshape(x, [0, 0, 0, i1, i2])
    x = e.transpose(x, [0, 1, 2, 4, 3])                                 # (N, H, W, i2, i1)
    x = e.op("MatMul", [x, g1])
    x = e.reshape(x, [0, 0, 0, i2 * o1 * r1])                           # (N, H, W, i2*o1*r1)
    x = e.transpose(x, [0, 3, 1, 2])
    x = e.reshape(x, [-1, r1, 0, 0])                                    # (N*i2*o1, r1, H, W)
    x = e.op("Conv", [x, e.const("core", core)], _conv_attrs(node.attrs, [kh, kw], (0, 1)))
    x = e.reshape(x, [-1, i2 * o1 * r2, 0, 0])                          # (N, i2*o1*r2, H', W')
    x = e.transpose(x, [0, 2, 3, 1])
    x = e.reshape(x, [0, 0, 0, i2, o1, r2])
    x = e.transpose(x, [0, 1, 2, 4, 5, 3])                              # (N, H', W', o1, r2, i2)
    x = e.reshape(x, [0, 0, 0, o1, r2 * i2])
    x = e.op("MatMul", [x, e.const("b", b.reshape(r2 * i2, o2))])       # a view of b (r2, i2, o2)
    x = e.reshape(x, [0, 0, 0, o1 * o2])
    x = e.transpose(x, [0, 3, 1, 2])                                    # (N, C_out, H', W')
    e.bias(x, channel_dims=2)
    return e.result()


def _tt_reconstruct(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    st = layer["structure"]
    shape = tuple(layer["dense"]["shape"])
    if layer["kind"] == "conv":  # a (r1, i1, o1), core (r1, r2, kh, kw), b (r2, i2, o2) -> (o1, o2, i1, i2, kh, kw)
        t = np.einsum("pac,pqyx,qbd->cdabyx", f["a"], f["core"], f["b"], optimize=True)
        return t.reshape(shape)
    m = _tt_matrix(f, [int(i) for i in st["in_modes"]], [int(o) for o in st["out_modes"]])
    return m if layer.get("layout") == "in_out" else m.T


def _tr_conv(node: Node, layer: dict[str, Any], f: dict[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray]]:
    a, core, b = f["a"], f["core"], f["b"]  # held (r0, r1, C_in), (r2, r1, *k), (C_out, r0, r2)
    nd = core.ndim - 2
    ones = (1,) * nd
    (r0, r1, c_in), r2, c_out = a.shape, core.shape[0], b.shape[0]
    e = _Emitter(node, layer)
    x = e.op("Conv", [node.inputs[0], e.const("a", a.reshape((r0 * r1, c_in) + ones))], _conv_attrs(node.attrs, list(ones), ()))
    x = e.reshape(x, [-1, r1] + [0] * nd)                               # (N*r0, r1, H, W)
    x = e.op("Conv", [x, e.const("core", core)], _conv_attrs(node.attrs, list(core.shape[2:]), tuple(range(nd))))
    x = e.reshape(x, [-1, r0 * r2] + [0] * nd)                          # (N, r0*r2, H', W')
    w3 = b.reshape((c_out, r0 * r2) + ones)
    e.op("Conv", [x, e.const("b", w3)] + _conv_bias(node), _conv_attrs(node.attrs, list(ones), ()), last=True)
    return e.result()


def _tr_reconstruct(layer: dict[str, Any], f: dict[str, np.ndarray]) -> np.ndarray:
    a, core, b = f["a"], f["core"], f["b"]
    c = core.reshape(core.shape[0], core.shape[1], -1)
    w = np.einsum("abi,bgk,gao->oik", a, c, b, optimize=True)
    return w.reshape(tuple(layer["dense"]["shape"]))


_LOWERERS.update({
    ("svd-spatial", "conv"): _svd_spatial_conv,
    ("tucker2", "conv"): _tucker2_conv,
    ("cp", "conv"): _cp_conv,
    ("tt", "linear"): _tt_linear,
    ("tt", "conv"): _tt_conv,
    ("tr", "conv"): _tr_conv,
    ("fctn", "conv"): _tr_conv,  # the 3-node FCTN of (C_in, kernel, C_out) is a ring
})
_RECONSTRUCT.update({
    "svd-spatial": _svd_spatial_reconstruct,
    "tucker2": _tucker2_reconstruct,
    "cp": _cp_reconstruct,
    "tt": _tt_reconstruct,
    "tr": _tr_reconstruct,
    "fctn": _tr_reconstruct,
})
# the factor and axis holding the output channels in storage form: a level's correction scale folds in
# there (``tt`` splits the output channels over two cores, so it gets the scale as a Mul instead)
_OUTPUT_FACTOR.update({
    "svd-spatial": ("b", 1),
    "tucker2": ("b", 1),
    "cp": ("b", 1),
    "tr": ("b", 1),
    "fctn": ("b", 1),
})
