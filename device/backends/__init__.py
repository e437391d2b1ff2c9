"""Backends: each turns a lowered :class:`~stn_edge.graph.Graph` into something that runs.

A backend lives in ``device/backends/<name>.py``, subclasses :class:`Backend`, and registers itself
with :func:`register`. Modules are imported only when their backend is asked for, so a device with
numpy + msgpack alone never imports an engine it does not have.
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence

import numpy as np

from stn_edge.errors import BackendError, BackendUnavailable, UnsupportedOp
from stn_edge.graph import Graph, Node

#: backend name -> (module, pip extra that installs its engine)
KNOWN_BACKENDS: dict[str, tuple[str, str]] = {
    "numpy": ("stn_edge.device.backends.numpy", ""),
    "onnxruntime": ("stn_edge.device.backends.onnxruntime", "onnxruntime"),
    "tflite": ("stn_edge.device.backends.tflite", "tflite"),
    "torch": ("stn_edge.device.backends.torch", "torch"),
}

_REGISTRY: dict[str, type["Backend"]] = {}


class Executable:
    """A graph prepared by a backend for one device."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on ``feeds`` (input name -> array); return every graph output by name."""
        raise NotImplementedError


class Backend:
    """Base class of backends. Subclasses set ``name`` and ``devices`` and implement ``prepare``."""

    name: str = ""
    devices: tuple[str, ...] = ("cpu",)

    @classmethod
    def check_available(cls, device: str = "cpu") -> None:
        """Raise :class:`BackendUnavailable` when the engine or ``device`` cannot be used here."""

    def prepare(self, graph: Graph, device: str = "cpu") -> Executable:
        """Build an :class:`Executable` for ``graph`` on ``device``."""
        raise NotImplementedError


def register(name: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator: make a :class:`Backend` subclass available under ``name``."""

    def wrap(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_backend(name: str, device: str = "cpu") -> Backend:
    """Return an instance of the backend ``name`` checked usable on ``device``.

    Raises :class:`BackendError` for an unknown name and :class:`BackendUnavailable` when its engine
    is not installed or cannot use ``device``; both say what to do.
    """
    if name not in KNOWN_BACKENDS:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(KNOWN_BACKENDS)}")
    module, extra = KNOWN_BACKENDS[name]
    if name not in _REGISTRY:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            hint = f"pip install 'stn-edge[{extra}]'" if extra else "reinstall stn-edge"
            raise BackendUnavailable(
                f"backend {name!r} needs an engine that is not installed ({exc}); install it with: {hint}"
            ) from exc
    cls = _REGISTRY[name]
    if device not in cls.devices:
        raise BackendUnavailable(
            f"backend {name!r} does not run on device {device!r}; it supports: {', '.join(cls.devices)}"
        )
    cls.check_available(device)
    return cls()


def available_backends(device: str = "cpu") -> list[str]:
    """Names of the backends usable on ``device`` on this machine, in the registry's order."""
    names = []
    for name in KNOWN_BACKENDS:
        try:
            get_backend(name, device)
        except BackendError:
            continue
        names.append(name)
    return names


def unsupported(backend: str, node: Node, reason: str, backends: Sequence[str]) -> UnsupportedOp:
    """The error a backend raises for a node it cannot run: which node, which op, why, and the
    backends that can (``backends``, best first)."""
    backends = tuple(backends)
    return UnsupportedOp(
        f"{backend} backend cannot run node {node.name!r} (op {node.op!r}): {reason}; "
        f"run it with backend {' or '.join(map(repr, backends))}",
        op=node.op,
        node=node.name,
        backends=backends,
    )
