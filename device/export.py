"""Export: one fixed-budget model, in a standard format, for toolchains that do not read ``.stn``.

The artifact is loaded at ``mem_limit`` exactly as :meth:`Runtime.load` would (on the numpy
engine, which keeps one copy of the weights, so ``mem_limit`` is the bytes of weights the exported
model holds), and the graph the runtime lowered for that plan is written out: factorized layers as
their chains of plain Conv / MatMul / Gemm ops at the planned ranks, everything else as it was.

- ``onnx``: an ONNX model (the default-domain opset of the artifact), for onnxruntime, TensorRT's
  ``trtexec --onnx=...``, OpenVINO... The batch axis stays symbolic unless ``batch`` is given.
- ``tflite``: a TFLite flatbuffer built by the tflite backend's builder (no TensorFlow), for
  LiteRT on Android or a microcontroller toolchain. TFLite needs concrete shapes: the batch is
  ``batch`` (default 1); where the graph allows it the model also records a resizable batch
  (``shape_signature`` -1).

Both files are written atomically. By default the export is checked: the file is opened by a fresh
onnxruntime session (or LiteRT interpreter) and run on the artifact's calibration inputs, and its
outputs are compared with the runtime's.

>>> report = export_model("model.stn", "model.onnx", mem_limit="8MB")   # doctest: +SKIP
>>> report.check                                                        # doctest: +SKIP
{'logits': 3.1e-07}
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stn_edge.device.runtime import Runtime, relative_error
from stn_edge.errors import BackendError, BackendUnavailable, InputError
from stn_edge.format import write_atomic
from stn_edge.graph import Graph, ValueInfo
from stn_edge.plan import Plan, format_bytes

FORMATS = ("onnx", "tflite")
_SUFFIXES = {".onnx": "onnx", ".tflite": "tflite"}


@dataclass
class ExportReport:
    """What :func:`export_model` wrote, and how the file compared with the runtime."""

    path: str
    format: str
    file_bytes: int
    plan: Plan
    input_shapes: dict[str, list[int | str]]
    #: largest relative error per output of the exported model against the runtime, or None if unchecked
    check: dict[str, float] | None = None
    tolerance: float = 1e-4

    @property
    def ok(self) -> bool:
        return self.check is None or max(self.check.values(), default=0.0) <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "file_bytes": self.file_bytes,
                "weight_bytes": self.plan.total_bytes, "plan": self.plan.to_dict(), "input_shapes": self.input_shapes,
                "check": self.check, "tolerance": self.tolerance, "ok": self.ok}

    def summary(self) -> str:
        shapes = "; ".join(f"{k} {v}" for k, v in self.input_shapes.items())
        text = (f"wrote {self.path}: {self.format}, {format_bytes(self.file_bytes)} "
                f"({self.plan.summary()}); inputs {shapes}")
        if self.check is not None:
            worst = max(self.check.values(), default=0.0)
            text += (f"\n{'OK' if self.ok else 'FAILED'}: exported model vs runtime, worst relative error "
                     f"{worst:.3g} (tolerance {self.tolerance:g})")
        return text


def format_for(path: str | os.PathLike, format: str | None) -> str:
    """``format`` checked, or the one ``path``'s suffix names (``.onnx``, ``.tflite``)."""
    if format is None:
        format = _SUFFIXES.get(Path(path).suffix.lower())
        if format is None:
            raise InputError(f"cannot tell the export format from {str(path)!r}; give format 'onnx' or 'tflite'")
    if format not in FORMATS:
        raise InputError(f"export format {format!r} is not known; choose one of: {', '.join(FORMATS)}")
    return format


def export_model(
    source: Any,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    mem_limit: int | float | str | None = None,
    batch: int | None = None,
    check: bool = True,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Write the model ``source`` runs at ``mem_limit`` to ``path`` as ONNX or TFLite.

    Parameters
    ----------
    source : a ``.stn`` artifact (path, bytes, file object or URL, as for :meth:`Runtime.load`).
    path : the file to write; ``format`` defaults to its suffix.
    mem_limit : bytes of weights the exported model may hold (``"8MB"``, ``"25%"``, int), or None
        for the full model.
    batch : fix the batch axis (axis 0 of every input whose first dim is symbolic) to this size.
        ONNX keeps it symbolic when None; TFLite uses 1.
    check : run the exported file in a fresh session on the calibration inputs and compare.

    Raises :class:`~stn_edge.errors.BudgetError` for an infeasible budget,
    :class:`~stn_edge.errors.UnsupportedOp` when the TFLite builder cannot express an op, and
    :class:`~stn_edge.errors.BackendUnavailable` when the format's writer is not installed.
    """
    format = format_for(path, format)
    if batch is not None and batch < 1:
        raise InputError(f"batch must be a positive integer, not {batch!r}")
    with Runtime.load(source, mem_limit=mem_limit, backend="numpy") as rt:
        graph = used_only(rt.lowered_graph())
        if format == "onnx":
            graph = graph if batch is None else with_batch(graph, batch)
            content = onnx_bytes(graph)
            shapes = {v.name: list(v.shape) for v in graph.inputs}
        else:
            shapes = fixed_input_shapes(graph, batch or 1)
            content = tflite_bytes(graph, shapes)
        write_atomic(path, content)
        report = ExportReport(str(path), format, len(content), rt.plan, shapes, tolerance=tolerance)
        if check:
            feeds = _check_feeds(rt, shapes)
            expected = rt.run(feeds)
            got = run_exported(path, format, feeds, [v.name for v in graph.inputs], list(expected))
            report.check = {k: relative_error(got[k], v) for k, v in expected.items()}
    return report


# --------------------------------------------------------------------------- graph preparation


def used_only(graph: Graph) -> Graph:
    """``graph`` without initializers no node reads (a layer's bias replaced by its corrected one)."""
    read = {name for node in graph.nodes for name in node.inputs} | {v.name for v in graph.outputs}
    inits = {k: v for k, v in graph.initializers.items() if k in read}
    return Graph(graph.nodes, graph.inputs, graph.outputs, inits, graph.opset)


def fixed_input_shapes(graph: Graph, batch: int) -> dict[str, list[int]]:
    """Input name -> shape with a leading symbolic dim (the batch) set to ``batch``.

    Other symbolic dims (a sequence length...) are refused: no exported shape can be chosen for them.
    """
    shapes = {}
    for v in graph.inputs:
        shape = list(v.shape)
        if shape and not isinstance(shape[0], int):
            shape[0] = batch
        rest = [d for d in shape if not isinstance(d, int)]
        if rest:
            raise InputError(f"input {v.name!r} has symbolic dims {rest} besides the batch; a fixed-shape export "
                             "cannot choose them")
        shapes[v.name] = shape
    return shapes


def with_batch(graph: Graph, batch: int) -> Graph:
    """``graph`` with the leading symbolic dim of every input and output set to ``batch``."""
    shapes = fixed_input_shapes(graph, batch)
    outputs = [ValueInfo(v.name, [batch if i == 0 and not isinstance(d, int) else d for i, d in enumerate(v.shape)],
                         v.dtype) for v in graph.outputs]
    inputs = [ValueInfo(v.name, shapes[v.name], v.dtype) for v in graph.inputs]
    return Graph(graph.nodes, inputs, outputs, graph.initializers, graph.opset)


# --------------------------------------------------------------------------- writers


def onnx_bytes(graph: Graph) -> bytes:
    """The serialized, checker-validated ONNX model of ``graph``."""
    from stn_edge.device.backends.onnxruntime import graph_to_onnx

    model = graph_to_onnx(graph)
    import onnx  # graph_to_onnx raised BackendUnavailable if it is missing

    if model.ByteSize() >= 2**31:
        raise BackendError(f"the exported ONNX model would be {format_bytes(model.ByteSize())}, over protobuf's 2 GiB "
                           "limit; export at a smaller mem_limit")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise BackendError(f"the exported ONNX model does not pass onnx.checker: {exc}") from exc
    return model.SerializeToString()


def tflite_bytes(graph: Graph, shapes: dict[str, list[int]]) -> bytes:
    """The TFLite flatbuffer of ``graph`` at input ``shapes``, built by the tflite backend's builder.

    Where the graph converts the same at another batch, the model's inputs keep a resizable batch
    (``shape_signature`` -1).
    """
    try:
        from stn_edge.device.backends import tflite_builder
    except ImportError as exc:
        raise BackendUnavailable(
            f"TFLite export needs flatbuffers and the tflite schema package ({exc}); "
            "install them with: pip install 'stn-edge[tflite]'"
        ) from exc
    built = tflite_builder.build(graph, {k: tuple(v) for k, v in shapes.items()})
    not_computed = [out.name for out, (kind, _) in zip(graph.outputs, built.outputs) if kind != "tensor"]
    if not_computed:
        raise BackendError(f"outputs {not_computed} are constants or copies of inputs in TFLite; a .tflite file "
                           "cannot carry them as outputs")
    return built.content


# --------------------------------------------------------------------------- checking


def _check_feeds(rt: Runtime, shapes: dict[str, list[int | str]]) -> dict[str, np.ndarray]:
    """The calibration inputs, cut or tiled to the exported batch where it is fixed."""
    from stn_edge.device.profile import calibration_feeds

    fixed = {s[0] for s in shapes.values() if s and isinstance(s[0], int)}
    return calibration_feeds(rt, fixed.pop() if len(fixed) == 1 else None)


def run_exported(path: str | os.PathLike, format: str, feeds: dict[str, np.ndarray], input_names: list[str],
                 output_names: list[str]) -> dict[str, np.ndarray]:
    """Run an exported file in a fresh engine session (onnxruntime or LiteRT); outputs by name.

    A TFLite file's tensors carry their own names: inputs and outputs are matched by position,
    which the builder keeps in the graph's order.
    """
    if format == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"checking an ONNX export needs onnxruntime ({exc}); pass check=False") from exc
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return dict(zip(output_names, session.run(output_names, feeds)))
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError as exc:
            raise BackendUnavailable(f"checking a TFLite export needs LiteRT ({exc}); pass check=False") from exc
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    for detail, name in zip(interpreter.get_input_details(), input_names):
        interpreter.set_tensor(detail["index"], feeds[name].astype(detail["dtype"], copy=False))
    interpreter.invoke()
    details = interpreter.get_output_details()
    return {name: interpreter.get_tensor(d["index"]) for name, d in zip(output_names, details)}
