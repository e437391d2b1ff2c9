"""Decompositions, one module per family, registered by name for the structure search.

Every module of this package that defines ``SEARCH`` (a :class:`~.common.SearchFamily`) is found
the first time the registry is asked, so a new family is one new module here (with its contract
module in :mod:`stn_edge.families`, and a test). Code outside the package calls :func:`register`.
"""
from __future__ import annotations

from stn_edge.host.decompositions.common import Decomposition, SearchFamily, Trial
from stn_edge.registry import Registry

__all__ = ["SearchFamily", "Trial", "register", "unregister", "search_families", "names", "needs_input_rank",
           "record_input_rank"]


def _unknown(name: str, known: list[str]) -> ValueError:
    return ValueError(f"unknown decomposition family {name!r}; known: {', '.join(known)}")


_REGISTRY: Registry[SearchFamily] = Registry(SearchFamily, __name__, "SEARCH", _unknown)
#: let the structure search try a family (ValueError if its name is taken)
register = _REGISTRY.register
#: forget a family (a test that registered one cleans up with this)
unregister = _REGISTRY.unregister


def search_families() -> list[SearchFamily]:
    """The registered families in search order (:attr:`SearchFamily.order`)."""
    return sorted(_REGISTRY, key=lambda f: (f.order, f.name))


def names() -> tuple[str, ...]:
    """Names of the registered families in search order."""
    return tuple(f.name for f in search_families())


def needs_input_rank(kind: str, families: list[str] | None) -> bool:
    """Whether a layer of ``kind`` may get a family (of ``families``; None: any) that needs its input's rank."""
    return any(kind in f.input_rank_kinds for f in search_families() if families is None or f.name in families)


def record_input_rank(dec: Decomposition, input_rank: int | None) -> None:
    """Store the rank of the layer's input in ``dec.structure`` where its family's lowering depends on it."""
    if input_rank and dec.kind in _REGISTRY.get(dec.family).input_rank_kinds:
        dec.structure["input_rank"] = int(input_rank)
