"""Build a serialized model: convert at the requested shapes and probe whether it resizes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stn_edge.device.backends.tflite_builder.converter import Conversion, _Converter
from stn_edge.device.backends.tflite_flatbuffer import serialize
from stn_edge.errors import BackendError, UnsupportedOp
from stn_edge.graph import Graph


@dataclass
class BuiltModel:
    """A serialized model for some input shapes, and whether the interpreter may resize it."""

    content: bytes
    #: per graph output: ("tensor", position among the model's outputs), ("const", array) or ("input", name)
    outputs: list[tuple[str, Any]]
    input_shapes: dict[str, tuple[int, ...]]
    resizable: bool


def convert(
    graph: Graph,
    input_shapes: dict[str, tuple[int, ...]],
    ref_shapes: dict[str, tuple[int, ...]] | None = None,
    const_cache: dict[Any, Any] | None = None,
) -> Conversion:
    """Convert ``graph`` at fixed ``input_shapes`` (name -> shape). See the module docstring."""
    try:
        return _Converter(graph, input_shapes, ref_shapes, {} if const_cache is None else const_cache).run()
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise BackendError(f"tflite backend could not convert the graph at input shapes {input_shapes}: {exc}") from exc


def _same_outputs(a: list[tuple[str, Any]], b: list[tuple[str, Any]]) -> bool:
    """Outputs produced the same way, constant ones (a Dropout mask, say) equal at both shapes."""
    for (kind_a, what_a), (kind_b, what_b) in zip(a, b):
        if kind_a != kind_b:
            return False
        if kind_a == "const" and (what_a.shape != what_b.shape or not np.array_equal(what_a, what_b)):
            return False
        if kind_a != "const" and what_a != what_b:
            return False
    return True


def build(graph: Graph, input_shapes: dict[str, tuple[int, ...]]) -> BuiltModel:
    """Convert and serialize ``graph`` for ``input_shapes``; probe whether it can be resized.

    Raises :class:`UnsupportedOp` for the first node that cannot be converted.
    """
    symbolic = {v.name: [not isinstance(d, int) for d in v.shape] for v in graph.inputs if v.name not in graph.initializers}
    cache: dict[Any, Any] = {}
    if not any(any(flags) for flags in symbolic.values()):
        conversion = convert(graph, input_shapes, None, cache)
        return BuiltModel(serialize(conversion.draft), conversion.outputs, dict(input_shapes), False)
    bumped = {n: tuple(d + 1 if flag else d for d, flag in zip(input_shapes[n], flags)) for n, flags in symbolic.items()}
    try:
        probe = convert(graph, bumped, None, cache)
    except (BackendError, UnsupportedOp):
        probe = None  # the graph only converts at the requested shapes: rebuild per shape
    main = convert(graph, input_shapes, probe.shapes if probe else None, cache)
    resizable = False
    if probe is not None:
        try:
            check = convert(graph, bumped, main.shapes, cache)
            resizable = main.draft.same_program(check.draft) and _same_outputs(main.outputs, check.outputs)
        except (BackendError, UnsupportedOp):
            resizable = False
    return BuiltModel(serialize(main.draft), main.outputs, dict(input_shapes), resizable)
