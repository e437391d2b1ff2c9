"""Named things found in a package: decomposition families (the contract's and the host's).

A :class:`Registry` finds, the first time it is asked, every module of one package that defines a
given attribute, and registers its value by ``.name``; code outside the package (a plugin, a test)
calls :meth:`Registry.register`. One way to add a family or backend: a new module.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Values of type ``kind`` registered by their ``name``.

    ``package`` and ``attr``: every module of ``package`` (a dotted name) whose ``attr`` is a
    ``kind`` is registered on first use. ``missing(name, known)`` builds the error :meth:`get`
    raises for a name nobody registered.
    """

    def __init__(self, kind: type, package: str, attr: str, missing: Callable[[str, list[str]], Exception]):
        self._kind, self._package, self._attr, self._missing = kind, package, attr, missing
        self._items: dict[str, T] = {}
        self._found = False

    def _find(self) -> None:
        if self._found:
            return
        self._found = True
        package = importlib.import_module(self._package)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            value = getattr(importlib.import_module(f"{self._package}.{info.name}"), self._attr, None)
            if isinstance(value, self._kind):
                self.register(value)

    def register(self, item: T) -> T:
        """Register ``item`` under ``item.name``; ValueError when another item has that name."""
        name = item.name  # type: ignore[attr-defined]
        known = self._items.get(name)
        if known is not None and known is not item:
            raise ValueError(f"{self._package}: another {self._kind.__name__} named {name!r} is already registered")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a test that registered an item cleans up with this)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        self._find()
        try:
            return self._items[name]
        except KeyError:
            raise self._missing(name, self.names()) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._find()
        return sorted(self._items)

    def __iter__(self) -> Iterator[T]:
        self._find()
        return iter(list(self._items.values()))
