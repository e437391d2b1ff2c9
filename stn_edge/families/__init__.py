"""Decomposition families, registered by name: everything the contract needs about each.

Every module of this package that defines ``FAMILY`` (a :class:`Family`) is registered the first
time the registry is asked, so a new built-in family is one new module here (plus its host module in
``host/decompositions/``, and a test). Code outside the package (a plugin, a test) calls
:func:`register`.

>>> from stn_edge import families
>>> families.get("svd").extra_ops
1
>>> "tt" in families.names()
True
"""
from __future__ import annotations

from stn_edge.errors import ArtifactError
from stn_edge.families.base import Emitter, Family, LayerDims, Lowerer, conv_attrs, conv_bias
from stn_edge.registry import Registry

__all__ = ["Emitter", "Family", "LayerDims", "Lowerer", "conv_attrs", "conv_bias", "get", "names", "register",
           "unregister"]


def _unknown(name: str, known: list[str]) -> ArtifactError:
    return ArtifactError(f"decomposition family {name!r} is not known to this stn-edge; known: {', '.join(known)}. "
                         "Upgrade stn-edge.")


_REGISTRY: Registry[Family] = Registry(Family, __name__, "FAMILY", _unknown)
#: make a family known to the lowering, the cost model and the planner (ValueError if its name is taken)
register = _REGISTRY.register
#: forget a family (a test that registered one cleans up with this)
unregister = _REGISTRY.unregister
#: the family of a name; :class:`ArtifactError` naming the known ones when this version has none
get = _REGISTRY.get
#: names of the registered families, sorted
names = _REGISTRY.names
