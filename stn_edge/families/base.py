"""What the contract knows about one decomposition family, and the pieces its lowerings share.

A :class:`Family` is everything a device (and the planner, and the cost model) needs to run a layer
stored in that family: the lowering of each layer kind to plain ops, the dense weight rebuilt from its
factors, how the runtime holds each factor, which factor carries the output channels, and its
multiply-adds and op count. The storage form of each family is specified in docs/FORMAT.md and at the
top of its module. :mod:`stn_edge.families` registers them by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from stn_edge.graph import Node

#: ``(node, layer, held factors) -> (nodes, initializers)``: the plain ops that replace ``node``
Lowerer = Callable[[Node, dict[str, Any], dict[str, np.ndarray]], tuple[list[Node], dict[str, np.ndarray]]]


class LayerDims(NamedTuple):
    """A layer's dimensions as the multiply-add counts read them.

    ``out, inp``: output and input channels (features); ``kernel``: a conv's spatial kernel sizes (empty
    otherwise); ``strides``: one per kernel axis (1 when not given); ``structure``: the layer's
    ``structure`` record (modes, which axis a spatial SVD splits first, ...).
    """

    kind: str
    out: int
    inp: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    structure: Mapping[str, Any]

    @property
    def K(self) -> int:
        """Kernel positions (1 for a linear layer)."""
        return math.prod(self.kernel)

    @property
    def s(self) -> int:
        """Input positions per output position before a strided op: the product of the strides."""
        return math.prod(self.strides)


def _held_as_stored(layer: dict[str, Any], name: str, ndim: int) -> tuple[int, ...] | None:
    return None


@dataclass(frozen=True)
class Family:
    """One decomposition family, as the contract sees it.

    Attributes
    ----------
    name : the ``family`` string stored in a layer record.
    lowerers : layer kind (``"conv"``, ``"linear"``, ``"embedding"``) -> :data:`Lowerer`.
    reconstruct : ``(layer, factors) -> dense weight`` in the node's layout, from factors in their
        canonical form (stored rows, or the box of a nested-shell core).
    macs : ``(dims, bonds) -> multiply-adds per output position`` at one level (bonds of that level).
    extra_ops : ops the lowered layer runs beyond the dense layer's one.
    output_factor : ``(factor, axis)`` holding the output channels in storage form, where a level's
        correction scale folds in; None: the scale runs as one Mul after the layer.
    held_axes : ``(layer, factor name, ndim) -> axes or None``: how the runtime holds a factor (the
        axes of its canonical form in the held array's order; None: as stored).
    factors : the factors every layer of this family stores (the reader refuses others).
    optional_factors : factors some layers store (``tt``'s middle ``core`` for three cores).
    needs_structure : whether the lowering reads the layer's ``structure`` (the reader requires it).
    """

    name: str
    lowerers: Mapping[str, Lowerer]
    reconstruct: Callable[[dict[str, Any], dict[str, np.ndarray]], np.ndarray]
    macs: Callable[[LayerDims, list[int]], float]
    extra_ops: int
    output_factor: tuple[str, int] | None = None
    held_axes: Callable[[dict[str, Any], str, int], tuple[int, ...] | None] = field(default=_held_as_stored)
    factors: tuple[str, ...] = ("a", "b")
    optional_factors: tuple[str, ...] = ()
    needs_structure: bool = True


# --------------------------------------------------------------------------- pieces lowerings share


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def conv_attrs(attrs: dict[str, Any], kernel: list[int], keep: tuple[int, ...]) -> dict[str, Any]:
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


def conv_bias(node: Node) -> list[str]:
    """The node's bias input as a list (empty when it has none)."""
    return node.inputs[2:3] if len(node.inputs) > 2 and node.inputs[2] else []


class Emitter:
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
