"""Profiling on the device: what each budget costs in time, memory and error on this engine.

Four jobs, one subject (how a loaded model behaves on this machine), one module each:

- **Latency** (:mod:`.timing`). :func:`time_runs` does warm-up runs, then timed runs for a number of
  seconds, and summarizes them as :class:`Latency` (p50/p90/p99, throughput). With the torch backend
  on CUDA it also records GPU time with CUDA events next to the end-to-end time (:func:`cuda_event_timer`).
- **Budgets** (:mod:`.budgets`). :func:`profile_artifact` loads an artifact at each budget and reports
  load time, bytes read, model bytes, calibration error, MACs per sample and their ratio to the dense
  model (:mod:`.macs`), peak process memory and latency per batch size (a :class:`ProfileReport`:
  table, JSON, PNG).
- **Layers** (:mod:`.layers`). :func:`layer_latency` times each factorized layer's lowered ops in
  isolation, dense and at the ladder levels of interest, on the chosen engine: a :class:`LayerLatency`
  table that :func:`stn_edge.latency.plan_within_latency` (and
  ``Runtime.load(latency_limit_ms=..., profile=...)``) plan with.
- **The board** (:mod:`.board`). :func:`system_info` records the machine; on an NVIDIA Jetson also the
  power mode (``nvpmodel -q``), one ``tegrastats`` sample (clocks, temperatures) and a ``jtop``
  snapshot when jetson-stats is installed. Whatever is absent is recorded as None. :func:`peak_memory`
  reads this process's peak resident memory.

Nothing here imports an engine at module level; the numpy backend infers shapes for MAC counts.

>>> report = profile_artifact("model.stn", budgets=("100%", "25%"), backend="onnxruntime")  # doctest: +SKIP
>>> print(report.table())                                                                    # doctest: +SKIP
"""
from stn_edge.cost import count_macs, node_macs
from stn_edge.device.profile.board import (
    jetson_info, parse_tegrastats, peak_memory, reset_peak_memory, system_info, tegrastats_sample,
)
from stn_edge.device.profile.budgets import ProfileReport, profile_artifact
from stn_edge.device.profile.layers import layer_latency
from stn_edge.device.profile.macs import all_values, calibration_feeds, model_macs, value_shapes
from stn_edge.device.profile.timing import Latency, cuda_event_timer, time_runs, time_side_by_side
from stn_edge.latency import LAYER_TABLE_FORMAT, LayerLatency, plan_within_latency

__all__ = [
    "LAYER_TABLE_FORMAT", "LayerLatency", "Latency", "ProfileReport", "all_values", "calibration_feeds",
    "count_macs", "cuda_event_timer", "jetson_info", "layer_latency", "model_macs", "node_macs",
    "parse_tegrastats", "peak_memory", "plan_within_latency", "profile_artifact", "reset_peak_memory",
    "system_info", "tegrastats_sample", "time_runs", "time_side_by_side", "value_shapes",
]
