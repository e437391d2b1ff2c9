"""The onnxruntime backend: the graph becomes an in-memory ONNX model run by an InferenceSession.

It needs ``onnxruntime`` and ``onnx`` (``pip install 'stn-edge[onnxruntime]'``); this module is
imported only when the backend is asked for. On device ``"cuda"`` it needs onnxruntime-gpu with a
working CUDAExecutionProvider, and says so rather than running on the CPU behind your back.

ORT's constant folding is turned off: a lowered graph keeps factorized layers as chains of small
matmuls (``x @ A @ B``), and folding ``A @ B`` back into one dense weight would undo the compression
in both memory and time. All other graph optimizations stay on.

ORT runs on the runtime's own arrays. The model handed to a session carries no weights: each
initializer is declared as external data in an in-memory "file" of its own, and the session borrows
the array's memory as that file (``SessionOptions.add_external_initializers_from_files_in_memory``
with ``session.use_external_initializer_file_buffers_directly``), so no weight is serialized,
parsed or copied. MatMuls whose weight is a transposed view (lowering passes ``a.T``) read the
matrix it views through ORT's ``FusedMatMul(transB=1)``; other arrays that are not C-contiguous and
aligned are copied once (``OnnxRuntimeExecutable.copied_bytes``). What ORT still adds are its fast
kernels' own layouts: pre-packed MatMul/Gemm weights and NCHWc-blocked convolution filters, about
one more copy, kept on because they are worth 1.1-2.6x in latency (``docs/RELIABILITY.md``).

An onnxruntime older than the one this was measured on (:data:`BORROWS_FROM`) gets the weights
embedded in the model as before, and the backend declares that path's cost (:data:`EMBEDDED_MEMORY`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from stn_edge.device.backends import Backend, Executable, register
from stn_edge.device.memory import EngineMemory
from stn_edge.errors import BackendError, BackendUnavailable, InputError
from stn_edge.graph import DTYPES, Graph, Node

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

#: the first onnxruntime measured to run on borrowed buffers (docs/RELIABILITY.md, "Memory that is true")
BORROWS_FROM = (1, 32)
#: what a model costs where weights are embedded (older onnxruntime): measured on 1.32 before
#: borrowing, 6.0 at the peak of a ResNet-18 session build, 5.1 for an MLP
EMBEDDED_MEMORY = EngineMemory(weight_copies=6.5, fixed_bytes=16 << 20)


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version such as ``1.32.0`` or ``1.33.0.dev20251201``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


#: whether this onnxruntime runs on the runtime's arrays (else the weights are embedded)
BORROWS_WEIGHTS = ort is not None and _release(ort.__version__) >= BORROWS_FROM

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


def _declared(name: str, array: np.ndarray, location: str) -> "onnx.TensorProto":
    """An initializer with dtype and shape only: its bytes are the whole external file ``location``."""
    tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def graph_to_onnx(
    graph: Graph, as_inputs: frozenset[str] = frozenset(), external: Mapping[str, str] | None = None
) -> "onnx.ModelProto":
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
    external
        Initializer name -> the name of an external-data file that holds exactly its bytes. These
        initializers are declared without data; a session then needs the files' contents (see
        ``SessionOptions.add_external_initializers_from_files_in_memory``).
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
        elif external and name in external:
            initializers.append(_declared(name, array, external[name]))
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


#: initializers of fewer bytes are embedded in the model instead of borrowed: ONNX shape inference
#: must read small values such as Reshape's target shape, and cannot from external data (and ORT
#: refuses an empty file). Each embedded array costs ORT a copy of at most this many bytes.
BORROW_FROM_BYTES = 1024


def _in_place(array: np.ndarray) -> np.ndarray:
    """``array`` as ORT can borrow it, C-contiguous and aligned: a copy only if it is not.

    ORT would copy a misaligned buffer itself, where ``copied_bytes`` could not count it.
    """
    return np.require(array, requirements=["C_CONTIGUOUS", "ALIGNED"])


def _transposed_weights(graph: Graph) -> frozenset[str]:
    """Initializers that are transposed views ``w.T`` of a C-contiguous matrix ``w`` (lowering
    passes ``a.T`` for factorized linear layers) and are read only as the weight of MatMuls."""
    found = set()
    for name, array in graph.initializers.items():
        array = np.asarray(array)
        if array.ndim != 2 or array.flags.c_contiguous or not array.T.flags.c_contiguous:
            continue
        if array.nbytes < BORROW_FROM_BYTES:
            continue
        users = graph.consumers(name)
        if users and all(n.op == "MatMul" and not n.domain and n.inputs[1:] == [name] and n.inputs[0] != name
                         for n in users):
            found.add(name)
    return frozenset(found)


def _read_transposed(graph: Graph, names: frozenset[str]) -> Graph:
    """``graph`` whose MatMuls of ``names`` read ``w`` for ``w.T`` (ORT's FusedMatMul, ``transB=1``)
    and whose initializers ``names`` are those ``w``: ORT borrows them and pre-packs from them as
    fast as from ``w.T``, and nothing copies ``w.T`` to make it contiguous."""
    if not names:
        return graph
    nodes = [
        Node("FusedMatMul", n.name, list(n.inputs), list(n.outputs), {"transB": 1}, domain="com.microsoft")
        if n.op == "MatMul" and not n.domain and n.inputs[1] in names else n
        for n in graph.nodes
    ]
    inits = {k: np.asarray(v).T if k in names else v for k, v in graph.initializers.items()}
    return Graph(nodes, graph.inputs, graph.outputs, inits, graph.opset)


class OnnxRuntimeExecutable(Executable):
    """InferenceSessions over the graph's own arrays: one per set of overridden initializers
    (usually just the one, for none). Every session borrows the same weight memory.

    ``copied_bytes``: bytes of initializers copied because they were not C-contiguous and aligned.
    """

    def __init__(self, graph: Graph, device: str):
        self.graph = graph
        self.device = device
        self._sessions: dict[frozenset[str], Any] = {}
        self._output_names = [o.name for o in graph.outputs]
        self._transposed = _transposed_weights(graph) if BORROWS_WEIGHTS else frozenset()
        # The sessions read these buffers in place: they must live, unchanged, as long as this
        # executable. Small arrays stay in the model (see BORROW_FROM_BYTES).
        self._buffers: dict[str, np.ndarray] = {}
        self.copied_bytes = 0
        for name, array in graph.initializers.items() if BORROWS_WEIGHTS else ():
            array = np.asarray(array)
            if name in self._transposed:
                array = array.T  # the C-contiguous matrix it is a view of
            if array.nbytes >= BORROW_FROM_BYTES:
                held = _in_place(array)
                self._buffers[name] = held.reshape(-1).view(np.uint8)
                self.copied_bytes += held.nbytes if held is not array else 0
        # logical file names that ORT accepts whatever the initializers are called
        self._files = {name: f"{i}.bin" for i, name in enumerate(self._buffers)}
        self._session(frozenset())  # fail at prepare, not at the first run

    def _options(self, overrides: frozenset[str]) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        names = [n for n in self._buffers if n not in overrides]
        if names:
            options.add_session_config_entry("session.use_external_initializer_file_buffers_directly", "1")
            options.add_external_initializers_from_files_in_memory(
                [self._files[n] for n in names], [self._buffers[n] for n in names],
                [self._buffers[n].nbytes for n in names],
            )
        return options

    def _session(self, overrides: frozenset[str]) -> Any:
        if overrides not in self._sessions:
            external = {n: f for n, f in self._files.items() if n not in overrides}
            # an overriding feed comes in the graph's layout: its MatMuls stay as they are
            graph = _read_transposed(self.graph, self._transposed - overrides)
            model = graph_to_onnx(graph, as_inputs=overrides, external=external).SerializeToString()
            try:
                session = ort.InferenceSession(
                    model,
                    self._options(overrides),
                    providers=PROVIDERS[self.device],
                    # folding would multiply factor chains back into dense weights
                    disabled_optimizers=["ConstantFolding"],
                )
            except Exception as exc:  # ORT's own types: Fail, InvalidGraph, NotImplemented...
                raise BackendError(f"onnxruntime could not load the graph on {self.device!r}: {exc}") from exc
            wanted = PROVIDERS[self.device][0]
            if wanted not in session.get_providers():
                # ORT falls back to the CPU with only a warning when e.g. cuDNN fails to load
                raise BackendUnavailable(
                    f"onnxruntime could not start {wanted} for device {self.device!r} (see its log for the "
                    "missing library); fix the CUDA install or use device 'cpu'"
                )
            self._sessions[overrides] = session
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

    def __init__(self) -> None:
        if not BORROWS_WEIGHTS:  # else the measured entry of device/memory.py's table holds
            self.engine_memory = EMBEDDED_MEMORY

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
