"""The onnxruntime backend: the graph becomes an in-memory ONNX model run by an InferenceSession.

It needs ``onnxruntime`` and ``onnx`` (``pip install 'stn-edge[onnxruntime]'``); this module is
imported only when the backend is asked for. On device ``"cuda"`` it needs onnxruntime-gpu with a
working CUDAExecutionProvider, and says so rather than running on the CPU behind your back.

ORT's constant folding is turned off: a lowered graph keeps factorized layers as chains of small
matmuls (``x @ A @ B``), and folding ``A @ B`` back into one dense weight would undo the compression
in both memory and time. All other graph optimizations stay on.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stn_edge.device.backends import Backend, Executable, register
from stn_edge.errors import BackendError, BackendUnavailable, InputError
from stn_edge.graph import DTYPES, Graph

try:
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper
except ImportError as exc:  # reported by check_available, with the command that fixes it
    onnx = ort = helper = numpy_helper = None  # type: ignore[assignment]
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

INSTALL_HINT = "pip install 'stn-edge[onnxruntime]'"

#: device -> execution providers, in the order ORT should try them
PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


# ------------------------------------------------------------------------------------------------
# Graph -> ONNX
# ------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """numpy scalars as Python scalars, arrays as TensorProtos, anything else as it is."""
    if isinstance(value, np.ndarray):
        return numpy_helper.from_array(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attribute(key: str, value: Any) -> "onnx.AttributeProto":
    """An ONNX attribute from an IR attribute value (numpy arrays become tensors)."""
    if isinstance(value, (list, tuple)):
        if not value:
            # an empty list carries no element type; the list attributes left empty are ints (pads, axes...)
            return helper.make_attribute(key, [], attr_type=onnx.AttributeProto.INTS)
        return helper.make_attribute(key, [_plain(v) for v in value])
    return helper.make_attribute(key, _plain(value))


def _value_info(name: str, shape: Any, dtype: np.dtype) -> "onnx.ValueInfoProto":
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), list(shape))


def graph_to_onnx(graph: Graph, as_inputs: frozenset[str] = frozenset()) -> "onnx.ModelProto":
    """Build an ONNX model equal to ``graph``.

    Symbolic dims become ``dim_param``; numpy-array attributes become tensor attributes; the
    default-domain opset is ``graph.opset`` and the IR version is the lowest that opset needs, so
    any onnxruntime that knows the opset can load it.

    Parameters
    ----------
    graph
        The graph to convert.
    as_inputs
        Initializer names to declare as graph inputs instead, so that a session can be fed them
        (used to override weights at run time).
    """
    if onnx is None:
        raise BackendUnavailable(f"graph_to_onnx needs onnx ({_IMPORT_ERROR}); install: {INSTALL_HINT}")
    nodes = []
    for n in graph.nodes:
        node = helper.make_node(n.op, list(n.inputs), list(n.outputs), name=n.name, domain=n.domain or None)
        node.attribute.extend(_attribute(k, v) for k, v in n.attrs.items())
        nodes.append(node)
    inputs = [_value_info(v.name, v.shape, DTYPES[v.dtype]) for v in graph.inputs]
    initializers = []
    for name, array in graph.initializers.items():
        array = np.asarray(array)
        if name in as_inputs:
            inputs.append(_value_info(name, array.shape, array.dtype))
        else:
            initializers.append(numpy_helper.from_array(array, name))
    outputs = [_value_info(v.name, v.shape, DTYPES[v.dtype]) for v in graph.outputs]
    onnx_graph = helper.make_graph(nodes, "stn_edge", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", graph.opset)]
    opsets += [helper.make_opsetid(d, 1) for d in sorted({n.domain for n in graph.nodes} - {"", "ai.onnx"})]
    model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="stn-edge")
    model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    return model


# ------------------------------------------------------------------------------------------------
# The backend
# ------------------------------------------------------------------------------------------------


def _is_input_error(exc: Exception) -> bool:
    """Whether ORT blamed the feeds (it raises InvalidArgument for kernels' complaints too)."""
    message = str(exc)
    if "missing from input feed" in message:
        return True
    return type(exc).__name__ == "InvalidArgument" and "while running" not in message


class OnnxRuntimeExecutable(Executable):
    """An InferenceSession per set of overridden initializers (usually just the one, for none)."""

    def __init__(self, graph: Graph, device: str):
        self.graph = graph
        self.device = device
        self._sessions: dict[frozenset[str], Any] = {}
        self._output_names = [o.name for o in graph.outputs]
        self._session(frozenset())  # fail at prepare, not at the first run

    def _session(self, overrides: frozenset[str]) -> Any:
        if overrides not in self._sessions:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            model = graph_to_onnx(self.graph, as_inputs=overrides)
            try:
                self._sessions[overrides] = ort.InferenceSession(
                    model.SerializeToString(),
                    options,
                    providers=PROVIDERS[self.device],
                    # folding would multiply factor chains back into dense weights
                    disabled_optimizers=["ConstantFolding"],
                )
            except Exception as exc:  # ORT's own types: Fail, InvalidGraph, NotImplemented...
                raise BackendError(f"onnxruntime could not load the graph on {self.device!r}: {exc}") from exc
            wanted = PROVIDERS[self.device][0]
            if wanted not in self._sessions[overrides].get_providers():
                # ORT falls back to the CPU with only a warning when e.g. cuDNN fails to load
                del self._sessions[overrides]
                raise BackendUnavailable(
                    f"onnxruntime could not start {wanted} for device {self.device!r} (see its log for the "
                    "missing library); fix the CUDA install or use device 'cpu'"
                )
        return self._sessions[overrides]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on ``feeds`` (input or initializer name -> array); return every output by name."""
        overrides = frozenset(feeds) & frozenset(self.graph.initializers)
        session = self._session(overrides)
        try:
            values = session.run(self._output_names, {k: np.asarray(v) for k, v in feeds.items()})
        except Exception as exc:
            if _is_input_error(exc):
                raise InputError(f"onnxruntime rejected the feeds: {exc}") from exc
            raise BackendError(f"onnxruntime failed to run the graph: {exc}") from exc
        return dict(zip(self._output_names, values))


@register("onnxruntime")
class OnnxRuntimeBackend(Backend):
    """Runs graphs with onnxruntime on the CPU or, with onnxruntime-gpu, on CUDA."""

    devices = ("cpu", "cuda")

    @classmethod
    def check_available(cls, device: str = "cpu") -> None:
        """Raise :class:`BackendUnavailable` unless onnxruntime can run on ``device`` here."""
        if ort is None:
            raise BackendUnavailable(
                f"backend 'onnxruntime' needs onnxruntime and onnx ({_IMPORT_ERROR}); "
                f"install them with: {INSTALL_HINT}"
            )
        if device not in PROVIDERS:
            raise BackendUnavailable(
                f"backend 'onnxruntime' does not run on device {device!r}; it supports: {', '.join(PROVIDERS)}"
            )
        available = ort.get_available_providers()
        missing = [p for p in PROVIDERS[device] if p not in available]
        if missing:
            raise BackendUnavailable(
                f"backend 'onnxruntime' cannot use device {device!r}: {', '.join(missing)} is not available "
                f"(this onnxruntime has {', '.join(available)}); install onnxruntime-gpu built for your CUDA "
                f"in place of onnxruntime, or use device 'cpu'"
            )

    def prepare(self, graph: Graph, device: str = "cpu") -> OnnxRuntimeExecutable:
        """Convert ``graph`` to ONNX and open a session on ``device``.

        Raises :class:`BackendError` when onnxruntime refuses the graph.
        """
        self.check_available(device)
        return OnnxRuntimeExecutable(graph, device)
