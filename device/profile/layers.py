"""Per-layer latency: each factorized layer timed alone, dense and at ladder levels (a :class:`LayerLatency`)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

from stn_edge.device.backends import Backend, get_backend
from stn_edge.device.profile.board import system_info
from stn_edge.device.profile.macs import all_values, calibration_feeds
from stn_edge.device.profile.timing import time_runs, time_side_by_side
from stn_edge.device.runtime import Runtime
from stn_edge.errors import BudgetError
from stn_edge.format import ArtifactReader
from stn_edge.graph import Graph, Node, ValueInfo, dtype_name, graph_from_dict
from stn_edge.latency import LayerLatency
from stn_edge.lowering import assemble, lower


def _layer_graph(node: Node, x: str, values: Mapping[str, np.ndarray], initializers: dict[str, np.ndarray],
                 opset: int) -> Graph:
    """``node`` alone, fed its activation ``x``, returning its first output."""
    y = node.outputs[0]
    return Graph([node], [ValueInfo(x, list(values[x].shape), dtype_name(values[x].dtype))],
                 [ValueInfo(y, list(values[y].shape), dtype_name(values[y].dtype))], initializers, opset)


def _smallest_runtime(source: Any, backend: str, device: str, batch: int) -> Runtime:
    """The artifact at its smallest feasible plan on ``backend``, activations counted at ``batch``."""
    try:
        return Runtime.load(source, mem_limit=1, backend=backend, device=device, batch_size=batch)
    except BudgetError as exc:
        return Runtime.load(source, mem_limit=exc.smallest_feasible, backend=backend, device=device, batch_size=batch)


def layer_latency(
    source: Any, *, backend: str = "onnxruntime", device: str = "cpu", batch: int = 1,
    levels: Mapping[str, Iterable[int]] | None = None, spread: int = 4, warmup: int = 2, seconds: float = 0.2,
    progress: Callable[[str], None] | None = None,
) -> LayerLatency:
    """Time every factorized layer of ``source`` alone on ``backend``: dense, and at ladder levels.

    A layer's time is the median of its one-layer graph minus that of an Identity graph on the same
    input (the engine's per-call cost of feeding and returning values, which the whole model pays once).

    The levels timed for a layer are ``levels[name]`` (e.g. those the budgets of interest chose)
    plus ``spread`` levels spread evenly over its ladder. Each layer runs as a one-layer graph fed
    the activation it gets in the model at ``batch`` (found by running the model once with the numpy
    backend at its smallest plan). Then the dense model and the smallest plan run end to end, side by
    side, to calibrate the table (see :class:`LayerLatency`).
    """
    engine = get_backend(backend, device)
    # the smallest plan: cheapest for numpy to run, and every activation has the same shape in any plan
    rt = _smallest_runtime(source, "numpy", "cpu", batch)
    with rt:
        smallest = {c.name: c.level for c in rt.plan.layers}
        feeds = calibration_feeds(rt, batch)
        values = all_values(rt.lowered_graph(), feeds)
        template = graph_from_dict(rt.header["model"])
        reader: ArtifactReader = rt._reader
        tensors = rt.header["tensors"]
        nodes = {n.name: n for n in template.nodes}
        table: dict[str, dict[Any, float]] = {}
        ranks: dict[str, dict[int, int]] = {}
        for layer in rt.layers:
            node = nodes[layer["node"]]
            ladder = layer["ladder"]["ranks"]
            wanted = set(levels.get(layer["name"], ()) if levels else ())
            wanted |= {int(j) for j in np.linspace(0, len(ladder) - 1, spread).round()} if spread > 0 else set()
            wanted |= {smallest[layer["name"]]} - {None}
            consts = {n: reader.read_array(tensors[n]) for n in node.inputs if n in tensors}
            fed = [n for n in node.inputs if n and n not in tensors and n != layer["weight"]]
            if len(fed) != 1:
                continue  # not a one-activation layer: nothing to time it with alone
            x = fed[0]
            dense = _layer_graph(node, x, values, {**consts, layer["weight"]: reader.read_array(layer["dense"])},
                                 template.opset)
            # what one call costs with no work (feeding x, getting a value back) is not the layer's
            idle = Graph([Node("Identity", "idle", [x], ["idle"])], dense.inputs,
                         [ValueInfo("idle", list(values[x].shape), dense.inputs[0].dtype)], {}, template.opset)
            overhead = _time_graph(engine, idle, device, values[x], warmup, seconds)
            times = {"dense": max(0.0, _time_graph(engine, dense, device, values[x], warmup, seconds) - overhead)}
            top = max(wanted, default=-1) + 1
            rows = {k: reader.read_rows(ref, 0, top) for k, ref in layer["factors"].items()} if top else {}
            for j in sorted(wanted):
                ends = {k: ref["row_ends"][j] for k, ref in layer["factors"].items()}
                factors = assemble(layer, j, {k: rows[k][: ends[k]] for k in rows})
                sub = lower(_layer_graph(node, x, values, dict(consts), template.opset), [layer], {layer["name"]: factors})
                times[j] = max(0.0, _time_graph(engine, sub, device, values[x], warmup, seconds) - overhead)
            table[layer["name"]] = times
            ranks[layer["name"]] = {j: int(ladder[j]) for j in wanted}
            if progress:
                progress(f"timed {layer['name']}: dense and {len(wanted)} levels")
    ends = {"dense": Runtime.load(source, mem_limit=None, backend=backend, device=device, batch_size=batch),
            "smallest": _smallest_runtime(source, backend, device, batch)}
    try:
        fns = {k: (lambda rt=rt: rt.run(feeds)) for k, rt in ends.items()}
        timed = time_side_by_side(fns, batch=batch, warmup=warmup, seconds=10 * seconds)
    finally:
        for rt in ends.values():
            rt.close()
    return LayerLatency(backend, device, batch, table, ranks, timed["dense"].p50_ms, timed["smallest"].p50_ms,
                        smallest, system_info())


def _time_graph(engine: Backend, graph: Graph, device: str, x: np.ndarray, warmup: int, seconds: float) -> float:
    exe = engine.prepare(graph, device)
    feeds = {graph.inputs[0].name: x}
    return time_runs(lambda: exe.run(feeds), warmup=warmup, seconds=seconds, min_runs=5).p50_ms
