"""The tflite backend: the graph becomes an in-memory ``.tflite`` model run by LiteRT.

It needs LiteRT (``ai-edge-litert``, or the older ``tflite-runtime``) to run and the ``tflite``
schema package plus ``flatbuffers`` to build the model: ``pip install 'stn-edge[tflite]'``.
No TensorFlow and no converter are involved: :mod:`tflite_builder` maps each ONNX op to TFLite
builtins (NCHW graphs run NHWC inside, see there) and :mod:`tflite_flatbuffer` writes the bytes.

The interpreter uses LiteRT's default op resolver, so the XNNPACK delegate runs every op it
supports; the rest run on LiteRT's builtin kernels. XNNPACK sums in another order than numpy
and uses its own exp/tanh approximations: float32 results agree with the numpy backend to about
1e-5 relative, not bit for bit.

Dynamic batch: when the graph converts to the same program at two batch sizes, a new input shape
resizes the interpreter (``resize_tensor_input`` + ``allocate_tensors``); otherwise the model is
rebuilt for that shape. Up to ``max_interpreters`` interpreters are kept, one per input shape;
each holds its own arena and XNNPACK's packed copy of the weights, so the default keeps one.

Example
-------
>>> from stn_edge.device.backends import get_backend
>>> exe = get_backend("tflite").prepare(graph)         # doctest: +SKIP
>>> exe.run({"input": x})["output"]                    # doctest: +SKIP
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from stn_edge.device.backends import Backend, Executable, register
from stn_edge.device.memory import EngineMemory
from stn_edge.errors import BackendError, BackendUnavailable, InputError
from stn_edge.graph import Graph

INSTALL_HINT = "pip install 'stn-edge[tflite]'"

try:  # LiteRT, then the older standalone runtime
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
except ImportError as exc:
    try:
        from tflite_runtime.interpreter import Interpreter, OpResolverType  # type: ignore[no-redef]
    except ImportError:
        Interpreter = OpResolverType = None  # type: ignore[assignment,misc]
        _ENGINE_ERROR: ImportError | None = exc
    else:
        _ENGINE_ERROR = None
else:
    _ENGINE_ERROR = None

try:
    from stn_edge.device.backends import tflite_builder
except ImportError as exc:  # flatbuffers or the tflite schema package is missing
    tflite_builder = None  # type: ignore[assignment]
    _BUILDER_ERROR: ImportError | None = exc
else:
    _BUILDER_ERROR = None


def supported_ops() -> list[str]:
    """ONNX ops the tflite backend converts, sorted (for the op-coverage table)."""
    if tflite_builder is None:
        raise BackendUnavailable(
            f"the tflite builder needs flatbuffers and tflite ({_BUILDER_ERROR}); install them with: {INSTALL_HINT}"
        )
    return tflite_builder.supported_ops()


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class TFLiteExecutable(Executable):
    """A LiteRT interpreter per input shape (LRU, ``max_interpreters``) for one graph."""

    def __init__(self, graph: Graph, num_threads: int, max_interpreters: int, xnnpack: bool = True):
        self.graph = graph
        self.num_threads = num_threads
        # AUTO is LiteRT's default resolver: builtin kernels with the XNNPACK delegate applied
        self._resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.max_interpreters = max(1, max_interpreters)
        self._inputs = [v for v in graph.inputs if v.name not in graph.initializers]
        self._lock = threading.Lock()
        self._interpreters: OrderedDict[tuple, tuple[Any, tflite_builder.BuiltModel]] = OrderedDict()
        # build for the declared shapes, symbolic dims at 1: unsupported ops fail here, at prepare
        shapes = {v.name: tuple(d if isinstance(d, int) else 1 for d in v.shape) for v in self._inputs}
        self._model: tflite_builder.BuiltModel | None = tflite_builder.build(graph, shapes)
        try:
            self._interpreter(self._key(shapes))
        except BackendError:
            if all(isinstance(d, int) for v in self._inputs for d in v.shape):
                raise
            # every op converts, but 1 is not a valid size for some symbolic dim (it must match
            # another input's, say): build again for the first real input shapes
            self._model = None

    @property
    def resizable(self) -> bool:
        """True when a new batch size resizes the interpreter instead of rebuilding the model."""
        return self._model is not None and self._model.resizable

    def ops(self) -> list[str]:
        """Op names of the most recently used interpreter's graph, in node order, then one
        ``DELEGATE`` per partition XNNPACK took over (diagnostics: what runs where)."""
        with self._lock:
            if not self._interpreters:
                return []
            interpreter, _ = next(reversed(self._interpreters.values()))
            return [d["op_name"] for d in interpreter._get_ops_details()]

    @staticmethod
    def _key(shapes: dict[str, tuple[int, ...]]) -> tuple:
        return tuple(sorted(shapes.items()))

    def _open(self, model: bytes) -> Any:
        try:
            return Interpreter(
                model_content=model, num_threads=self.num_threads, experimental_op_resolver_type=self._resolver
            )
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"LiteRT could not load the model built from the graph: {exc}") from exc

    def _interpreter(self, key: tuple) -> tuple[Any, "tflite_builder.BuiltModel"]:
        """The interpreter allocated for input shapes ``key``, opening or resizing one if needed."""
        if key in self._interpreters:
            self._interpreters.move_to_end(key)
            return self._interpreters[key]
        shapes = dict(key)
        if self._model is None:
            self._model = tflite_builder.build(self.graph, shapes)
        reuse = None
        if len(self._interpreters) >= self.max_interpreters:
            _, reuse = self._interpreters.popitem(last=False)
        model = self._model
        if shapes != model.input_shapes and not model.resizable:
            model = tflite_builder.build(self.graph, shapes)
        interpreter = reuse[0] if reuse is not None and reuse[1] is model else self._open(model.content)
        del reuse
        try:
            details = interpreter.get_input_details()
            for detail, spec in zip(details, self._inputs):
                if tuple(detail["shape"]) != shapes[spec.name]:
                    interpreter.resize_tensor_input(detail["index"], list(shapes[spec.name]))
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            if model is self._model and shapes != model.input_shapes:
                # the resize probe was wrong for this shape: build for it instead
                model = tflite_builder.build(self.graph, shapes)
                interpreter = self._open(model.content)
                interpreter.allocate_tensors()
            else:
                raise BackendError(f"LiteRT could not allocate the model for input shapes {shapes}: {exc}") from exc
        self._interpreters[key] = (interpreter, model)
        return interpreter, model

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on ``feeds`` (input name -> array); return every graph output by name."""
        missing = [v.name for v in self._inputs if v.name not in feeds]
        unknown = sorted(set(feeds) - {v.name for v in self._inputs})
        if missing or unknown:
            raise InputError(
                f"feeds do not match the graph: missing {missing}, unknown {unknown}; "
                f"inputs are {[v.name for v in self._inputs]}"
            )
        arrays = {v.name: np.asarray(feeds[v.name], order="C") for v in self._inputs}
        key = self._key({name: a.shape for name, a in arrays.items()})
        with self._lock:  # an interpreter is not thread-safe
            interpreter, model = self._interpreter(key)
            inputs = interpreter.get_input_details()
            try:
                for detail, spec in zip(inputs, self._inputs):
                    interpreter.set_tensor(detail["index"], arrays[spec.name].astype(detail["dtype"], copy=False))
                interpreter.invoke()
            except ValueError as exc:
                raise InputError(f"LiteRT rejected the feeds: {exc}") from exc
            except RuntimeError as exc:
                raise BackendError(f"LiteRT failed to run the graph: {exc}") from exc
            produced = interpreter.get_output_details()
            results = {}
            for out, (kind, where) in zip(self.graph.outputs, model.outputs):
                if kind == "tensor":
                    results[out.name] = interpreter.get_tensor(produced[where]["index"])
                elif kind == "input":
                    results[out.name] = arrays[where].copy()
                else:
                    results[out.name] = np.array(where, copy=True)
        return results


@register("tflite")
class TFLiteBackend(Backend):
    """Runs graphs with LiteRT (XNNPACK delegate on) on the CPU.

    Parameters
    ----------
    num_threads : interpreter threads; default: the CPUs this process may use.
    max_interpreters : interpreters kept per executable, one per input shape (LRU).
    xnnpack : apply LiteRT's default XNNPACK delegate (True), or run the builtin kernels only
        (slower; a reference for checking the delegate).
    """

    devices = ("cpu",)
    #: measured by tools/measure_memory.py (demo MLP, 100/50/25%, LiteRT 2.3, x86-64): the runtime's
    #: arrays, the flatbuffer's copy and XNNPACK's packed copy, 3.0-3.4x at peak; ~3.7 MiB fixed.
    #: Activations live in the interpreter's planned arena (XNNPACK convolves without im2col): the
    #: values-only liveness peak, 1.0x (conv model at batch 16: 8.3 MiB run growth for 8.0 counted)
    engine_memory = EngineMemory(weight_copies=3.5, fixed_bytes=8 << 20, workspace=False)

    def __init__(self, num_threads: int | None = None, max_interpreters: int = 1, xnnpack: bool = True):
        self.num_threads = int(num_threads) if num_threads else _default_threads()
        self.max_interpreters = max_interpreters
        self.xnnpack = xnnpack

    @classmethod
    def check_available(cls, device: str = "cpu") -> None:
        """Raise :class:`BackendUnavailable` unless LiteRT and the model builder import here."""
        if Interpreter is None:
            raise BackendUnavailable(
                f"backend 'tflite' needs LiteRT (ai-edge-litert) or tflite-runtime ({_ENGINE_ERROR}); "
                f"install it with: {INSTALL_HINT}"
            )
        if tflite_builder is None:
            raise BackendUnavailable(
                f"backend 'tflite' needs flatbuffers and the tflite schema package ({_BUILDER_ERROR}); "
                f"install them with: {INSTALL_HINT}"
            )
        if device not in cls.devices:
            raise BackendUnavailable(
                f"backend 'tflite' does not run on device {device!r}; it supports: {', '.join(cls.devices)}"
            )

    def prepare(self, graph: Graph, device: str = "cpu") -> TFLiteExecutable:
        """Build the TFLite model for ``graph`` and open an interpreter.

        Raises :class:`~stn_edge.errors.UnsupportedOp` (naming the op, the node and the backends
        that can run it) for the first node the builder cannot convert.
        """
        self.check_available(device)
        return TFLiteExecutable(graph, self.num_threads, self.max_interpreters, self.xnnpack)
