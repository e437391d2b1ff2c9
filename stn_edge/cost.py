"""Compute cost: multiply-adds of ops and of factorized layers, and a per-engine latency model.

The contract needs this on both sides: the structure search ranks families by speed (never cutting
memory levels for it), and the device's planner says where a layer runs slower than dense and, with
``latency_limit_ms``, trades accuracy for speed on the engine it runs on, from the artifact's header
alone (family, structure, bonds of each level, the node's strides and the recorded value shapes).

Multiply-adds of a factorized layer are counted per *output position*: per input row for a linear
layer (per sample at batch 1), per output pixel for a conv, as :mod:`stn_edge.lowering` runs it. Ops
that run before a conv's strided kernel op (its 1x1 input projection) run at input resolution, so a
stride ``(sh, sw)`` multiplies them by ``sh * sw`` per output pixel (padding's border effect is
ignored). Each family counts its own (:attr:`stn_edge.families.Family.macs`); for the built-in ones,
with ``O, I`` the output/input channels (features), ``K = kh * kw`` and ``s = sh * sw``:

=================  ===================================================================================
dense conv         ``O I K``;  dense linear ``O I``;  embedding: a Gather, 0
``svd`` conv       ``r I K + r O`` (the kernel Conv keeps the stride; one MAC per stored weight)
``svd`` linear     ``r I + r O``;  ``svd`` embedding ``r O`` (Gather, then MatMul by ``b``)
``svd-spatial``    ``s_other r I k1 + r O k2``: the first (k1 x 1) Conv strides only its own axis, so it
                   runs at the other axis' input resolution (``s_other`` = that axis' stride)
``tucker2``        ``s r_in I + r_out r_in K + O r_out``
``cp``             ``s R I + sw R kh + R kw + R O`` (the depthwise (kh x 1) Conv strides only the height)
``tt`` linear      ``sum_k prod(o_<k) prod(i_>k) r_{k-1} i_k o_k r_k`` (``r_0 = r_d = 1``): the MatMul
                   chain contracts one core at a time; for 1024 = 32 x 32 that is ``65536 r`` against
                   ``2048 r`` stored numbers
``tt`` conv        ``s i2 i1 o1 r1 + i2 o1 r1 r2 K + o1 r2 i2 o2``
``tr``/``fctn``    ``s r0 r1 I + r0 r1 r2 K + O r0 r2``
=================  ===================================================================================

``svd``, ``svd-spatial``, ``tucker2`` and ``cp`` do at most about one multiply-add per stored weight per
output position (at stride 1); the tensor-train and ring families reuse each core for many positions
of the other modes and can do far more.

The latency model (:class:`EngineCost`) is ``macs / rate + ops * op_us`` per engine: every engine
pays a fixed cost per op (measured here: ~10 us on onnxruntime and LiteRT, ~25 us on torch, on one
x86 core), so a factorized layer's extra ops (:func:`extra_ops`: the Reshape and Transpose of activations
and the extra Conv/MatMul a lowering runs) decide small layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from stn_edge import families
from stn_edge.families import LayerDims

_MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _prod(xs: Iterable[int]) -> int:
    return int(math.prod(int(x) for x in xs))


def node_macs(op: str, attrs: Mapping[str, Any], inputs: Sequence[Sequence[int] | None],
              output: Sequence[int]) -> int:
    """Multiply-accumulates of one Conv, ConvTranspose, MatMul or Gemm node; 0 for any other op.

    ``inputs`` are the shapes of the node's inputs (None where unknown), ``output`` its first output's.
    """
    out = _prod(output)
    if op == "Conv":
        return out * _prod(inputs[1][1:])  # W (C_out, C_in/g, *k)
    if op == "ConvTranspose":
        return _prod(inputs[0]) * _prod(inputs[1][1:])
    if op == "MatMul":
        return out * int(inputs[0][-1])
    if op == "Gemm":
        a = inputs[0]
        return out * int(a[0] if attrs.get("transA", 0) else a[-1])
    return 0


def count_macs(nodes: Iterable[Any], shapes: Mapping[str, Sequence[int]]) -> int:
    """Summed :func:`node_macs` over ``nodes`` (Conv, ConvTranspose, MatMul, Gemm; Einsum is not counted)."""
    total = 0
    for n in nodes:
        if n.op in _MAC_OPS:
            total += node_macs(n.op, n.attrs, [shapes.get(i) if i else None for i in n.inputs], shapes[n.outputs[0]])
    return total


def layer_io(kind: str, layout: str, shape: Sequence[int]) -> tuple[int, int]:
    """``(out, in)`` features/channels of a layer's dense weight."""
    if kind == "conv" or layout != "in_out":
        return int(shape[0]), int(shape[1])
    return int(shape[1]), int(shape[0])


def dense_layer_macs(kind: str, layout: str, shape: Sequence[int]) -> int:
    """Multiply-adds per output position of the dense layer (0 for an embedding lookup)."""
    if kind == "embedding":
        return 0
    o, i = layer_io(kind, layout, shape)
    return o * i * _prod(shape[2:]) if kind == "conv" else o * i


def family_macs(family: str, kind: str, layout: str, shape: Sequence[int], structure: Mapping[str, Any],
                bonds: Sequence[int], strides: Sequence[int] | None = None) -> float:
    """Multiply-adds per output position of a factorized layer at one level (see the module table;
    each family counts its own, :attr:`stn_edge.families.Family.macs`).

    ``strides``: the conv's strides (default 1); ignored for linear and embedding layers.
    Raises :class:`~stn_edge.errors.ArtifactError` for a family this version does not know.
    """
    o, i = layer_io(kind, layout, shape)
    kernel = tuple(int(k) for k in shape[2:]) if kind == "conv" else ()
    given = [int(s) for s in (strides or [])] if kind == "conv" else []
    st = tuple(given) + (1,) * (len(kernel) - len(given))
    dims = LayerDims(kind, o, i, kernel, st, structure)
    return families.get(family).macs(dims, [int(x) for x in bonds])


def extra_ops(family: str) -> int:
    """Ops a factorized layer of ``family`` runs beyond the dense layer's one (1 for a family this
    version does not know)."""
    return families.get(family).extra_ops if family in families.names() else 1


@dataclass(frozen=True)
class EngineCost:
    """Latency model of one engine at batch 1: ``macs / macs_per_us + ops * op_us`` microseconds.

    ``op_us`` is the fixed cost of one op (dispatch, allocation, threading); ``macs_per_us`` the
    multiply-add rate of its float32 kernels on one core. Rough on purpose: it ranks options; a
    measured profile (``stn-edge profile --per-layer``) replaces it where it matters.
    """

    name: str
    macs_per_us: float
    op_us: float

    def us(self, macs: float, ops: int = 1) -> float:
        return macs / self.macs_per_us + ops * self.op_us


#: per-engine cost on one x86 core (the numbers the search's op cost and docs/BENCHMARKS.md stand on)
ENGINE_COSTS = {
    "onnxruntime": EngineCost("onnxruntime", 5e4, 10.0),
    "tflite": EngineCost("tflite", 5e4, 10.0),
    "torch": EngineCost("torch", 5e4, 25.0),
    "numpy": EngineCost("numpy", 1e4, 15.0),
}


def engine_cost(name: str) -> EngineCost:
    """The cost model of engine ``name`` (onnxruntime's for an engine this module does not know)."""
    return ENGINE_COSTS.get(name, ENGINE_COSTS["onnxruntime"])


@dataclass(frozen=True)
class LayerCost:
    """Predicted microseconds of one layer per sample: dense, and at each ladder level."""

    dense_us: float
    level_us: tuple[float, ...]

    def ratio(self, level: int | None) -> float:
        """Time of ``level`` (None: dense) over the dense layer's."""
        return 1.0 if level is None else self.level_us[level] / max(self.dense_us, 1e-12)


def positions(kind: str, output_shape: Sequence[int]) -> int:
    """Output positions per sample of a layer from its output's shape at batch 1."""
    shape = [int(d) for d in output_shape]
    n = _prod(shape[2:]) if kind == "conv" else _prod(shape[:-1])
    return max(n, 1)


def layer_cost(layer: Mapping[str, Any], attrs: Mapping[str, Any], output_shape: Sequence[int],
               engine: EngineCost) -> LayerCost:
    """:class:`LayerCost` of a layer record (``family, kind, layout, structure, dense.shape,
    ladder.bonds``) whose node has ``attrs`` and whose output has ``output_shape`` at batch 1."""
    kind, layout, shape = layer["kind"], layer["layout"], layer["dense"]["shape"]
    n = positions(kind, output_shape)
    strides = attrs.get("strides") if kind == "conv" else None
    extra = extra_ops(layer["family"])
    bonds = layer["ladder"].get("bonds") or [[r] for r in layer["ladder"]["ranks"]]
    dense = engine.us(dense_layer_macs(kind, layout, shape) * n)
    levels = tuple(engine.us(family_macs(layer["family"], kind, layout, shape, layer["structure"], b, strides) * n,
                             1 + extra) for b in bonds)
    return LayerCost(dense, levels)


#: ops that move no data on any engine (views)
_VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Constant", "Shape"}


def rest_us(header: Mapping[str, Any], engine: EngineCost) -> float:
    """Predicted microseconds per sample of everything in an artifact's graph outside its factorized
    layers: multiply-adds of the other Conv/MatMul/Gemm nodes and one op cost per non-view op.
    Shapes come from the recorded value shapes (batch 1); unknown shapes count no multiply-adds."""
    layer_nodes = {l.get("node") for l in header.get("layers", []) if isinstance(l, Mapping)}
    shapes: dict[str, Sequence[int]] = {}
    for name, rec in (header.get("value_shapes") or {}).items():
        shapes[name] = rec[0]
    for name, ref in (header.get("tensors") or {}).items():
        shapes[name] = ref.get("shape", [])
    macs, ops = 0, 0
    for n in header["model"]["nodes"]:
        if n.get("name") in layer_nodes:
            continue
        ops += n["op"] not in _VIEWS
        ins = [shapes.get(i) if i else None for i in n.get("inputs", [])]
        out = shapes.get(n["outputs"][0]) if n.get("outputs") else None
        if n["op"] in _MAC_OPS and out is not None and all(s is not None for s in ins[:2]):
            macs += node_macs(n["op"], n.get("attrs") or {}, ins, out)
    return engine.us(macs, ops)


def layer_costs(header: Mapping[str, Any], engine: EngineCost) -> dict[str, LayerCost]:
    """Predicted time per level of every factorized layer whose output shape the header records.

    A layer whose record the cost model cannot read (an unknown family, a field of the wrong type)
    gets no prediction: the cost model informs the plan, it never stops a load."""
    shapes = header.get("value_shapes") or {}
    out = {}
    try:
        attrs = {n["name"]: (n.get("attrs") or {}, n["outputs"][0]) for n in header["model"]["nodes"]}
    except (KeyError, TypeError, IndexError, AttributeError):
        return out
    for l in header["layers"]:
        try:
            node_attrs, output = attrs.get(l["node"], ({}, None))
            rec = shapes.get(output) if isinstance(output, str) else None
            if rec is not None:
                out[l["name"]] = layer_cost(l, node_attrs, rec[0], engine)  # strides are plain ints in the header
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError):
            continue
    return out
