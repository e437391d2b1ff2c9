"""``fctn``: the fully-connected tensor network of a conv's three modes (C_in, kernel, C_out).

With three nodes every pair of modes is joined by one bond, which is a ring: the storage form,
lowering, reconstruction and cost are those of :mod:`stn_edge.families.tr` (bonds ``[r_0, r_1, r_2]``).
The family is its own name because the host chooses its bond ranks differently (from each edge's
spectrum, see :mod:`stn_edge.host.decompositions.fctn`).
"""
from __future__ import annotations

from stn_edge.families.base import Family
from stn_edge.families.tr import lower_ring, reconstruct_ring, ring_held_axes, ring_macs

FAMILY = Family("fctn", {"conv": lower_ring}, reconstruct_ring, ring_macs, extra_ops=4, output_factor=("b", 1),
                held_axes=ring_held_axes, factors=("a", "core", "b"))
