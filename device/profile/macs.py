"""Shapes and multiply-adds of a loaded model, and the calibration inputs it is measured on."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from stn_edge.cost import count_macs
from stn_edge.device.backends import get_backend
from stn_edge.device.runtime import Runtime
from stn_edge.errors import InputError
from stn_edge.graph import Graph, ValueInfo, graph_from_dict


def all_values(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every value of ``graph`` (inputs, initializers, node outputs) when run on ``feeds``.

    Runs the numpy backend once with every node output kept.
    """
    produced = [ValueInfo(o, [], "float32") for n in graph.nodes for o in n.outputs if o]
    probe = Graph(graph.nodes, graph.inputs, produced, graph.initializers, graph.opset)
    return {**graph.initializers, **feeds, **get_backend("numpy").prepare(probe).run(dict(feeds))}


def value_shapes(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shape of every value of ``graph`` when run on ``feeds`` (see :func:`all_values`)."""
    return {k: tuple(np.shape(v)) for k, v in all_values(graph, feeds).items()}


def model_macs(rt: Runtime, feeds: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """``(MACs of the plan rt runs, MACs of the same model with every layer dense)`` on ``feeds``.

    Activations have the same shapes in both; the dense count uses each layer's dense weight shape.
    """
    lowered = rt.lowered_graph()
    shapes = value_shapes(lowered, feeds)
    dense_shapes = dict(shapes) | {layer["weight"]: tuple(layer["dense"]["shape"]) for layer in rt.layers}
    template = graph_from_dict(rt.header["model"])
    return count_macs(lowered.nodes, shapes), count_macs(template.nodes, dense_shapes)


def calibration_feeds(rt: Runtime, batch: int | None = None) -> dict[str, np.ndarray]:
    """The artifact's calibration inputs, cut or tiled to ``batch`` samples (all of them for None)."""
    feeds = rt.calibration("inputs")
    if not feeds:
        raise InputError("the artifact holds no calibration inputs to profile with")
    if batch is None:
        return feeds
    out = {}
    for k, x in feeds.items():
        reps = -(-batch // len(x))
        out[k] = np.ascontiguousarray(np.concatenate([x] * reps)[:batch])
    return out
