"""Matrix products: MatMul and Gemm as FULLY_CONNECTED (constant weight) or BATCH_MATMUL."""
from __future__ import annotations


import numpy as np

from stn_edge.device.backends.tflite_builder.converter import _ACT_NONE, _Converter, _Refused, _converts, _identity
from stn_edge.device.backends.tflite_builder.elementwise import _binary_node, _scaled
from stn_edge.device.backends.tflite_builder.shapes import _transpose
from stn_edge.graph import Node


def _fully_connected(c: _Converter, x: str, weight: int, width: int, bias: np.ndarray | None, name: str, act: int) -> None:
    """FULLY_CONNECTED of value ``x (..., in)`` with the constant tensor ``weight (out=width, in)``.

    It contracts the last axis and keeps the others: ``x`` stays in its layout when that keeps
    its last axis last (a transposed attention tensor, say).
    """
    v = c.values[x]
    rank = len(v.shape)
    perm = v.perm if v.perm and v.perm[-1] == rank - 1 else None
    shape = tuple(v.shape[:-1]) + (width,)
    inputs = [c.tensor(x, perm), weight, c.const_tensor(bias.astype(np.float32)) if bias is not None else -1]
    out = c.out(name, shape, np.float32, perm)
    c.emit("FULLY_CONNECTED", inputs, [out], "FullyConnectedOptions", FusedActivationFunction=act, KeepNumDims=rank != 2)
    c.define(name, shape, np.float32, out, perm)


def _matmul_operand(c: _Converter, name: str, rank: int) -> tuple[tuple[int, ...], bool] | None:
    """(batch layout, transposed) when value ``name`` can feed BATCH_MATMUL as it is stored."""
    v = c.values[name]
    if v.const is not None or len(v.shape) != rank:
        return None
    p = v.perm or _identity(rank)
    batch, tail = tuple(p[:-2]), tuple(p[-2:])
    if sorted(batch) != list(range(rank - 2)) or sorted(tail) != [rank - 2, rank - 1]:
        return None
    return batch, tail == (rank - 1, rank - 2)


def _batch_matmul(c: _Converter, a: str, b: str, name: str, adj_x: bool = False, adj_y: bool = False) -> None:
    """BATCH_MATMUL; operands stored with their batch axes in the same order and the last two in
    either order are used as they are (a transposed last pair becomes adj_x / adj_y)."""
    sa, sb = c.values[a].shape, c.values[b].shape
    if len(sa) < 2 or len(sb) < 2:
        raise _Refused("MatMul with a 1-D operand is not supported")
    m = sa[-1] if adj_x else sa[-2]
    n = sb[-2] if adj_y else sb[-1]
    shape = tuple(int(d) for d in np.broadcast_shapes(sa[:-2], sb[:-2])) + (m, n)
    rank = len(shape)
    la, lb = _matmul_operand(c, a, rank), _matmul_operand(c, b, rank)
    if la is not None and lb is not None and la[0] == lb[0]:
        perm = la[0] + (rank - 2, rank - 1)
        inputs = [c.values[a].tensor, c.values[b].tensor]
        adj_x, adj_y = adj_x != la[1], adj_y != lb[1]
    else:
        perm, inputs = None, [c.tensor(a), c.tensor(b)]
    out = c.out(name, shape, np.float32, perm)
    c.emit("BATCH_MATMUL", inputs, [out], "BatchMatMulOptions", AdjX=adj_x, AdjY=adj_y)
    c.define(name, shape, np.float32, out, perm)


def _bias_after(c: _Converter, name: str, rank: int, width: int) -> tuple[np.ndarray | None, Node | None]:
    """A constant (width,) bias that the only reader of ``name`` adds, for FULLY_CONNECTED to absorb."""
    if c._consumers.get(name) != 1 or name in c._graph_outputs:
        return None, None
    reader = next((n for n in c.graph.nodes if name in n.inputs), None)
    if reader is None or reader.op != "Add" or len(reader.inputs) != 2:
        return None, None
    other = reader.inputs[1] if reader.inputs[0] == name else reader.inputs[0]
    v = c.values.get(other)
    if v is None or v.const is None or v.const.dtype != np.float32 or v.const.shape[-1:] != (width,):
        return None, None
    if v.const.size != width or v.const.ndim > rank:
        return None, None
    return v.const.reshape(width), reader


@_converts("MatMul")
def _matmul(c: _Converter, node: Node) -> None:
    a, b = node.inputs[:2]
    if not c.is_const(b) or c.const(b).ndim != 2 or len(c.values[a].shape) < 2:
        return _batch_matmul(c, a, b, node.outputs[0])
    w = c.const(b)
    if w.dtype != np.float32:
        raise _Refused(f"weights of dtype {w.dtype} are not supported (float32)")
    bias, add = _bias_after(c, node.outputs[0], len(c.values[a].shape), w.shape[1])
    target = node.outputs[0]
    if add is not None:
        c._skip.add(add.name)
        target = add.outputs[0]
    name, act = c.take_activation(target)
    _fully_connected(c, a, c.const_tensor(w, (1, 0)), w.shape[1], bias, name, act)



@_converts("Gemm")
def _gemm(c: _Converter, node: Node) -> None:
    """FULLY_CONNECTED for a constant B (alpha folded into it, a bias-vector C as its bias);
    otherwise BATCH_MATMUL, then MUL by alpha and ADD of beta * C."""
    a, b = node.inputs[:2]
    cin = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    trans_a, trans_b = bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0))
    out = node.outputs[0]
    if c.is_const(b) and c.const(b).dtype == np.float32:
        w = c.const(b)
        width = w.shape[0] if trans_b else w.shape[1]
        if alpha == 1.0:
            weight = c.const_tensor(w, None if trans_b else (1, 0))
        else:
            scaled = (f"gemm{alpha}{trans_b}", lambda w: (w if trans_b else w.T) * np.float32(alpha))
            weight = c.const_tensor(w, derive=scaled)
        cv = c.values[cin].const if cin else None
        bias = None
        if cv is not None and cv.size in (1, width) and (cv.ndim < 2 or cv.shape[0] == 1) and cv.ndim <= 2:
            bias = np.broadcast_to(cv.astype(np.float32).reshape(-1) * np.float32(beta), (width,)).copy()
            cin = None
        if trans_a:  # A^T as a layout of A: FULLY_CONNECTED then asks for a TRANSPOSE
            _transpose(c, Node("Transpose", node.name, [a], [f"{a}::T"], {"perm": [1, 0]}))
            a = f"{a}::T"
        if cin is None:
            name, act = c.take_activation(out)
            return _fully_connected(c, a, weight, width, bias, name, act)
        product = f"{out}::ab"
        _fully_connected(c, a, weight, width, bias, product, _ACT_NONE)
    else:
        product = out if alpha == 1.0 and cin is None else f"{out}::ab"
        _batch_matmul(c, a, b, product, trans_a, trans_b)
        product = _scaled(c, node, product, alpha, f"{out}::alpha_ab" if cin else out)
        if cin is None:
            return None
    term = _scaled(c, node, cin, beta, f"{out}::beta_c")
    _binary_node(c, Node("Add", node.name, [product, term], [out]), "ADD", "AddOptions", fuse=True)
    return None
