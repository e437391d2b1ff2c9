"""Multiply-adds of a :class:`Decomposition` at one ladder level (the formulas live in the contract,
:mod:`stn_edge.cost`, so a device computes the same numbers from an artifact's header)."""
from __future__ import annotations

from typing import Sequence

from stn_edge.cost import dense_layer_macs, family_macs
from stn_edge.host.decompositions.common import Decomposition


def dense_macs(d: Decomposition) -> int:
    """Multiply-adds per output position of the dense layer (0 for an embedding lookup)."""
    return dense_layer_macs(d.kind, d.layout, d.shape)


def level_macs(d: Decomposition, level: int, strides: Sequence[int] | None = None) -> float:
    """Multiply-adds per output position of ``d`` lowered at ladder ``level`` (:func:`stn_edge.cost.family_macs`).

    ``strides``: the conv's strides (default 1); ignored for linear and embedding layers.
    """
    return family_macs(d.family, d.kind, d.layout, d.shape, d.structure, d.bonds[level], strides)
