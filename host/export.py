"""Capture: a PyTorch model (or an ONNX file) becomes a :class:`~stn_edge.graph.Graph`.

Anything ``torch.onnx.export`` can export is accepted: the layers to factorize are found in the
exported graph by operator (Conv, Gemm, MatMul with a constant weight), not by module type, so
subclasses and functional calls are found too. The graph is then cleaned for baking: aliases of
constants are resolved and BatchNormalization is folded into the Conv or Gemm before it.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import os
import warnings
from collections.abc import Mapping
from typing import Any, Iterator, Sequence

import numpy as np

from stn_edge.errors import CaptureError
from stn_edge.graph import DTYPES, Graph, Node


class TorchInputs:
    """The example (or calibration) inputs of a torch model: names, tensors, and how forward takes them.

    ``example_inputs`` is a tensor, a tuple/list of tensors (passed positionally), or a mapping
    ``{argument name: tensor}`` (passed by keyword, as a Hugging Face tokenizer's output is).
    ``None`` entries of a mapping are left out.
    """

    def __init__(self, example_inputs: Any, input_names: Sequence[str] | None = None):
        import torch

        if isinstance(example_inputs, Mapping):
            items = [(str(k), v) for k, v in example_inputs.items() if v is not None]
            self.keywords = [k for k, _ in items]
            tensors = [v for _, v in items]
        else:
            self.keywords = []
            tensors = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
        tensors = [torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t for t in tensors]
        bad = [i for i, t in enumerate(tensors) if not isinstance(t, torch.Tensor)]
        if bad or not tensors:
            what = type(tensors[bad[0]]).__name__ if bad else "nothing"
            raise CaptureError(
                f"example inputs must be tensors (a tensor, a tuple of tensors or a dict of them), got {what}; "
                "wrap arrays with torch.as_tensor"
            )
        self.tensors: list[Any] = tensors
        n = len(tensors)
        default = self.keywords or (["input"] if n == 1 else [f"input_{i}" for i in range(n)])
        self.names = list(input_names or default)
        if len(self.names) != n:
            raise CaptureError(f"{len(self.names)} input_names for {n} example inputs")


def _model_device(model: Any) -> Any:
    """The device of the model's first parameter (or buffer); CPU for a model without either."""
    import torch

    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def flatten_outputs(out: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(name, tensor)`` for every tensor in a model's output: a tensor, nested tuples/lists, dicts
    or Hugging Face ``ModelOutput`` objects (named by key path: ``logits``, ``output_1.0``).
    ``None`` entries are left out; any other object is a :class:`CaptureError` naming where it is."""
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    if out is None:
        return []
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i) if prefix else f"output_{i}", v) for i, v in enumerate(out)]
    else:
        raise CaptureError(
            f"the model returns a {type(out).__name__} at {prefix or 'its output'}; stn-edge captures tensors "
            "(alone, in tuples, lists or dicts). Return tensors, or for a Hugging Face model call it without "
            "a cache (use_cache=False)"
        )
    flat = []
    for key, value in items:
        flat += flatten_outputs(value, f"{prefix}.{key}" if prefix else key)
    if not prefix and isinstance(out, (tuple, list)) and len(flat) == 1:
        flat = [("output", flat[0][1])]
    return flat


class TracedModel:
    """``model`` as the exporter and the reference run see it: tensors in (moved to the model's
    device), a flat tuple of tensors out; keyword inputs for a mapping example.

    For Hugging Face style ``forward`` signatures: ``use_cache=False`` where it is taken (a decoder's
    key/value cache is not a tensor output), and an all-ones ``attention_mask`` made from the shape of
    ``input_ids`` when none is given (what ``None`` means; without one, decoders trace a packed-sequence
    mask whose index arithmetic is fixed to the example's batch size)."""

    def __init__(self, model: Any, inputs: TorchInputs):
        self.model = model
        self.keywords = inputs.keywords
        self.extra: dict[str, Any] = {}
        try:
            params = [p for p in inspect.signature(model.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            params = []
        names = [p.name for p in params]
        given = self.keywords or names[: len(inputs.tensors)]
        if "use_cache" in names and "use_cache" not in given:
            self.extra["use_cache"] = False
        self.ids_at = given.index("input_ids") if "input_ids" in given and "attention_mask" in names \
            and "attention_mask" not in given else None
        self.device = _model_device(model)

    def __call__(self, *tensors: Any) -> list[tuple[str, Any]]:
        return self._flat(self.model, *tensors)

    def _flat(self, call: Any, *tensors: Any) -> list[tuple[str, Any]]:
        import torch

        tensors = tuple(t if t.device == self.device else t.to(self.device) for t in tensors)
        extra = dict(self.extra)
        if self.ids_at is not None:
            extra["attention_mask"] = torch.ones_like(tensors[self.ids_at])
        if self.keywords:
            return flatten_outputs(call(**dict(zip(self.keywords, tensors)), **extra))
        return flatten_outputs(call(*tensors, **extra))

    @contextlib.contextmanager
    def flat_forward(self) -> Iterator[None]:
        """The model's ``forward`` returns the flat tuple while in this context (what the exporter
        traces). Patched on the instance, not wrapped, so weights keep their module-path names."""
        forward = self.model.forward
        own = self.model.__dict__.get("forward")
        self.model.forward = lambda *tensors: tuple(t for _, t in self._flat(forward, *tensors))
        try:
            yield
        finally:
            if own is None:
                del self.model.forward
            else:
                self.model.forward = own


@contextlib.contextmanager
def _export_mode(model: Any) -> Iterator[None]:
    """Eval mode, no grad, and PyTorch's fused transformer fast path off (``nn.TransformerEncoderLayer``
    in eval mode runs one fused kernel that has no ONNX export); the user's settings come back after,
    also when the export raises."""
    import torch

    fastpath = torch.backends.mha.get_fastpath_enabled()
    was_training = model.training
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)


def _diff_symbolic(g: Any, x: Any, n: Any, dim: Any, prepend: Any, append: Any) -> Any:
    """``torch.diff`` as ONNX Concat/Slice/Sub: the TorchScript exporter has none, and Hugging Face
    decoders call it on position ids when no attention mask is given (packed-sequence detection)."""
    from torch.onnx import symbolic_helper as sh

    n, dim = sh._maybe_get_const(n, "i"), sh._maybe_get_const(dim, "i")
    parts = [v for v in (prepend, x, append) if not sh._is_none(v)]
    if len(parts) > 1:
        x = g.op("Concat", *parts, axis_i=dim)
    for _ in range(n):
        high = sh._slice_helper(g, x, axes=[dim], starts=[1], ends=[2**63 - 1])
        low = sh._slice_helper(g, x, axes=[dim], starts=[0], ends=[-1])
        x = g.op("Sub", high, low)
    return x


#: torch ScalarType index -> ONNX element type, for the dtypes a cumsum is asked for
_ONNX_TYPES = {3: 6, 4: 7, 5: 10, 6: 1, 7: 11}  # int32, int64, float16, float32, float64


def _cumsum_symbolic(g: Any, x: Any, dim: Any, dtype: Any) -> Any:
    """``torch.cumsum`` whose integer and bool inputs are summed as int64, as torch does: the
    exporter's own emits CumSum on bool (Hugging Face's packed-sequence mask), which ONNX refuses."""
    import torch
    from torch.onnx import symbolic_helper as sh

    axis = g.op("Constant", value_t=torch.tensor(sh._get_const(dim, "i", "dim"), dtype=torch.int64))
    to = None if sh._is_none(dtype) else _ONNX_TYPES.get(sh._get_const(dtype, "i", "dtype"))
    if to is None and x.type().scalarType() in ("Bool", "Byte", "Char", "Short", "Int"):
        to = 7  # int64
    if to is not None:
        x = g.op("Cast", x, to_i=to)
    return g.op("CumSum", x, axis)


#: ATen ops the TorchScript exporter lacks or exports wrongly, registered while capture runs: (name, symbolic, first opset)
_EXTRA_SYMBOLICS = [("aten::diff", _diff_symbolic, 9), ("aten::cumsum", _cumsum_symbolic, 11)]


@contextlib.contextmanager
def _extra_symbolics(opset: int) -> Iterator[None]:
    """Register :data:`_EXTRA_SYMBOLICS` for one export, and remove them after."""
    import torch

    added = []
    for name, fn, first in _EXTRA_SYMBOLICS:
        if opset >= first:
            torch.onnx.register_custom_op_symbolic(name, fn, opset)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def _batch_of_two(traced: TracedModel, inputs: TorchInputs, flat: list[Any]) -> tuple[list[Any], list[Any]] | str:
    """Two different samples stacked on axis 0 (the example, and the example flipped on its last
    axis) and the model's outputs on them; or why axis 0 is not a batch axis of the model.

    Axis 0 is a batch axis when the model runs on the stacked samples and gives each the outputs it
    gives alone: a conv net's example without a batch axis (``(3, 32, 32)``) fails, and a
    sequence-first transformer (``(seq, batch, dim)``) mixes the two samples."""
    import torch

    if any(t.ndim == 0 for t in inputs.tensors):
        return "an example input is a 0-d tensor"
    other = [t.flip(-1) for t in inputs.tensors]
    stacked = [torch.cat([t, o]) for t, o in zip(inputs.tensors, other)]
    try:
        outs = [t for _, t in traced(*stacked)]
        alone = [t for _, t in traced(*other)]
    except Exception as exc:  # the model's own error: it is the symptom, not the cause
        said = str(exc).splitlines()[0] if str(exc) else ""
        return f"the model does not run on 2 samples stacked on axis 0 ({type(exc).__name__}: {said})"
    if len(outs) != len(flat) or len({t.shape[0] for t in inputs.tensors}) != 1:
        return "the inputs' axis 0 sizes differ, or the outputs change with the batch"
    for (name, first), second, both in zip(flat, alone, outs):
        if first.ndim == 0 or both.shape[0] != first.shape[0] + second.shape[0]:
            return f"output {name!r} does not grow with axis 0 of the inputs"
        want = torch.cat([first, second]).double()
        scale = max(float(want.abs().max()), 1e-12) if want.numel() else 1.0
        if want.numel() and float((both.double() - want).abs().max()) > 1e-4 * scale:
            return f"output {name!r} of 2 samples stacked on axis 0 is not each sample's own output (axis 0 mixes samples)"
    return stacked, outs


def _check_exported_batch(onnx_bytes: bytes, names: list[str], doubled: list[Any], expected: list[Any]) -> None:
    """Run the exported graph at batch 2 on onnxruntime (when installed) and compare with the model:
    tracing records Python-side shape arithmetic as constants, so a graph can be fixed to the
    example's batch size while declaring a symbolic one."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its shape-merge notes are not the user's concern
        session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        got = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, doubled) if n in wanted})
    except Exception as exc:  # onnxruntime raises its own types
        raise CaptureError(
            "the exported graph does not run at batch 2 (tracing fixed a shape to the example's batch "
            f"size): {str(exc).splitlines()[0]}; export at a fixed batch (dynamic_batch=False) or make "
            "the model's shape arithmetic use tensor sizes (x.shape[0]) rather than Python numbers"
        ) from None
    for i, (g, e) in enumerate(zip(got, expected)):
        e = e.detach().cpu().numpy()
        scale = max(float(np.max(np.abs(e), initial=0.0)), 1e-12)
        if g.shape != e.shape or float(np.max(np.abs(g - e), initial=0.0)) > 1e-3 * scale:
            raise CaptureError(
                f"the exported graph's output {i} at batch 2 differs from the model's (shape {list(g.shape)} vs "
                f"{list(e.shape)}): tracing fixed something to the example's batch size; export at a fixed "
                "batch (dynamic_batch=False) or make the model's shape arithmetic use tensor sizes"
            )


def export_onnx(
    model: Any,
    example_inputs: Any,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
) -> bytes:
    """Export ``model`` in eval mode with the TorchScript exporter; return the ONNX bytes.

    ``example_inputs`` is a tensor, a tuple of tensors, or a dict ``{argument: tensor}`` passed by
    keyword (see :class:`TorchInputs`); inputs are moved to the model's device. The model may return
    a tensor, nested tuples/lists, dicts or Hugging Face ``ModelOutput`` objects: outputs are
    flattened and named by key path (:func:`flatten_outputs`). The batch axis (0) of every input and
    output is symbolic when ``dynamic_batch`` and the model treats axis 0 as a batch axis (else the
    export keeps the example's shapes, with a warning), and the exported graph is checked at batch 2.
    PyTorch's fused transformer fast path is off during the export and restored after.
    """
    import torch

    inputs = TorchInputs(example_inputs, input_names)
    traced = TracedModel(model, inputs)
    buf = io.BytesIO()
    with _export_mode(model):
        flat = traced(*inputs.tensors)
        if not flat:
            raise CaptureError(f"{type(model).__name__} returns no tensors; stn-edge captures tensor outputs")
        names = list(output_names or [n for n, _ in flat])
        if len(names) != len(flat):
            raise CaptureError(f"{len(names)} output_names for {len(flat)} model outputs ({[n for n, _ in flat]})")
        axes = None
        if dynamic_batch:
            batch = _batch_of_two(traced, inputs, flat)
            if isinstance(batch, str):
                shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(inputs.names, inputs.tensors))
                warnings.warn(f"captured at the example's fixed input shapes ({shapes}): axis 0 is not a batch "
                              f"axis ({batch}). If one sample lacks its batch axis, give x.unsqueeze(0)",
                              stacklevel=3)
                dynamic_batch = False
            else:
                axes = {n: {0: "batch"} for n in inputs.names + names}
        args = tuple(t if t.device == traced.device else t.to(traced.device) for t in inputs.tensors)
        try:
            with warnings.catch_warnings(), traced.flat_forward(), _extra_symbolics(opset):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, args, buf, dynamo=False, opset_version=opset, do_constant_folding=True,
                    input_names=inputs.names, output_names=names, dynamic_axes=axes,
                    training=torch.onnx.TrainingMode.EVAL,
                )
        except CaptureError:
            raise
        except Exception as exc:  # the exporter raises many types; all mean "cannot capture"
            said = str(exc).split("Torch IR graph at exception")[0].strip()  # not the whole traced graph
            raise CaptureError(f"torch.onnx.export failed for {type(model).__name__}: {said}") from exc
    if dynamic_batch:
        _check_exported_batch(buf.getvalue(), inputs.names, *batch)
    return buf.getvalue()


def reference_outputs(model: Any, inputs: Sequence[Any], keywords: Sequence[str] = ()) -> list[Any]:
    """The flat outputs of ``model`` (eval mode, fast path off, as captured) on torch ``inputs``, as
    numpy arrays on the CPU."""
    traced = TracedModel(model, TorchInputs(dict(zip(keywords, inputs)) if keywords else tuple(inputs)))
    with _export_mode(model):
        return [t.detach().cpu().numpy() for _, t in traced(*inputs)]


def calibration_feeds(graph: Graph, calibration: Any) -> dict[str, np.ndarray]:
    """``{input name: array}`` from calibration inputs given as the example inputs were (a tensor, a
    tuple, or a dict by argument or input name), on any device: floats are cast to the input's float
    dtype and integers to its integer dtype (float64 arrays for a float32 model are fine).

    Raises :class:`CaptureError` for a wrong count, a missing name, a float given for an integer
    input (or the reverse), or a shape that does not match the captured model's input."""
    if calibration is None:
        raise CaptureError("no calibration inputs: give calibration= (arrays or tensors for the model's inputs)")
    if isinstance(calibration, Mapping):
        given = {str(k): v for k, v in calibration.items() if v is not None}
        names = [v.name for v in graph.inputs]
        if set(given) != set(names) and len(given) == len(names):
            given = dict(zip(names, given.values()))  # keyword names while the inputs were renamed
        missing = [n for n in names if n not in given]
        if missing:
            raise CaptureError(f"calibration has no {missing}; the model's inputs are {names}")
        items = [given[n] for n in names]
    else:
        items = list(calibration) if isinstance(calibration, (tuple, list)) else [calibration]
    if len(items) != len(graph.inputs):
        raise CaptureError(f"calibration has {len(items)} input(s), the model takes {len(graph.inputs)}")
    feeds = {}
    for v, item in zip(graph.inputs, items):
        a = item.detach().cpu().numpy() if hasattr(item, "detach") else np.asarray(item)
        want = np.dtype(DTYPES[v.dtype])
        if a.dtype != want:
            if a.dtype.kind not in "fiub" or (a.dtype.kind == "f") != (want.kind == "f"):
                raise CaptureError(
                    f"calibration input {v.name!r} is {a.dtype}, the model takes {v.dtype}; give "
                    f"{'floating-point' if want.kind == 'f' else 'integer'} calibration data for it"
                )
            a = a.astype(want)
        fixed = [(i, d) for i, d in enumerate(v.shape) if isinstance(d, int)]
        if a.ndim == len(v.shape) + 1 and len(fixed) == len(v.shape) and list(a.shape[1:]) == v.shape:
            raise CaptureError(
                f"calibration input {v.name!r} has shape {list(a.shape)}, a batch of the example's shape "
                f"{v.shape}: the example input lacks its batch axis; give example_inputs x.unsqueeze(0)"
            )
        if a.ndim != len(v.shape) or any(a.shape[i] != d for i, d in fixed):
            raise CaptureError(
                f"calibration input {v.name!r} has shape {list(a.shape)} but the model takes {v.shape}; "
                "export the model with a dynamic batch axis or give calibration data of that exact shape"
            )
        feeds[v.name] = np.ascontiguousarray(a)
    return feeds


def capture(model: Any, example_inputs: Any = None, **export_kw: Any) -> Graph:
    """A cleaned graph of ``model``: a torch module (with ``example_inputs``), ONNX bytes, or an ``.onnx`` path."""
    import onnx

    from stn_edge.host.capture import graph_from_onnx

    if isinstance(model, (str, os.PathLike)):
        try:
            proto = onnx.load(os.fspath(model))
        except Exception as exc:
            raise CaptureError(f"{model}: not a readable ONNX model ({exc})") from exc
    elif isinstance(model, (bytes, bytearray)):
        proto = onnx.load_from_string(bytes(model))
    else:
        if example_inputs is None:
            raise CaptureError("capturing a torch model needs example_inputs (a tensor or a tuple of tensors)")
        proto = onnx.load_from_string(export_onnx(model, example_inputs, **export_kw))
    graph = graph_from_onnx(proto)
    resolve_constant_aliases(graph)
    tie_transposed_weights(graph)
    fold_batchnorm(graph)
    return graph


def resolve_constant_aliases(graph: Graph) -> None:
    """Turn ``Identity(initializer)`` nodes into initializers (the exporter emits them for shared params)."""
    keep = []
    for node in graph.nodes:
        if node.op == "Identity" and node.inputs[0] in graph.initializers:
            graph.initializers[node.outputs[0]] = graph.initializers[node.inputs[0]]
        else:
            keep.append(node)
    graph.nodes = keep
    used = {i for n in graph.nodes for i in n.inputs} | {o.name for o in graph.outputs}
    graph.initializers = {k: v for k, v in graph.initializers.items() if k in used}


def tie_transposed_weights(graph: Graph) -> int:
    """Read a tied weight once: a MatMul weight that is another initializer transposed (an output
    projection tied to the embedding table, which the exporter constant-folds into a second copy)
    becomes ``Transpose(table)``, so the artifact stores, factorizes and holds the table once.
    Returns how many were tied."""
    inits = graph.initializers
    by_shape: dict[tuple[Any, ...], list[str]] = {}
    for name, w in inits.items():
        if w.ndim == 2 and w.dtype.kind == "f":
            by_shape.setdefault((w.shape, w.dtype.str), []).append(name)
    tied = 0
    for node in list(graph.nodes):
        if node.op != "MatMul" or len(node.inputs) < 2 or node.inputs[1] not in inits:
            continue
        copy = inits[node.inputs[1]]
        if copy.ndim != 2 or copy.shape[0] == copy.shape[1]:
            continue  # a square weight equal to another's transpose is a coincidence worth no risk
        source = next((a for a in by_shape.get((copy.shape[::-1], copy.dtype.str), [])
                       if a != node.inputs[1] and np.array_equal(inits[a].T, copy)), None)
        if source is None:
            continue
        out = f"{node.inputs[1]}::tied"
        graph.nodes.insert(graph.nodes.index(node), Node("Transpose", f"{node.name}::tied", [source], [out], {"perm": [1, 0]}))
        node.inputs = [node.inputs[0], out] + node.inputs[2:]
        tied += 1
    used = {i for n in graph.nodes for i in n.inputs}
    graph.initializers = {k: v for k, v in inits.items() if k in used}
    return tied


def fold_batchnorm(graph: Graph) -> int:
    """Fold inference BatchNormalization into a preceding Conv/Gemm whose weight is constant.

    Only folds when the Conv/Gemm output feeds the BatchNormalization alone and its weight is used
    by no other node. Returns how many were folded.
    """
    folded = 0
    inits = graph.initializers
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        prev = graph.producer(bn.inputs[0])
        if prev is None or prev.op not in ("Conv", "Gemm") or len(graph.consumers(prev.outputs[0])) != 1:
            continue
        if not all(x in inits for x in bn.inputs[1:5]) or prev.inputs[1] not in inits:
            continue
        if len(graph.consumers(prev.inputs[1])) != 1 or prev.op == "Gemm" and (
            prev.attrs.get("transA", 0) or prev.attrs.get("alpha", 1.0) != 1.0 or prev.attrs.get("beta", 1.0) != 1.0
        ):
            continue
        gamma, beta, mean, var = (inits[x].astype(np.float64) for x in bn.inputs[1:5])
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        w = inits[prev.inputs[1]].astype(np.float64)
        if prev.op == "Conv":
            w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
        elif prev.attrs.get("transB", 0):
            w = w * scale[:, None]
        else:
            w = w * scale[None, :]
        bias = inits[prev.inputs[2]].astype(np.float64) if len(prev.inputs) > 2 and prev.inputs[2] else 0.0
        dtype = inits[prev.inputs[1]].dtype
        wname, bname = f"{prev.inputs[1]}::bnfold", f"{prev.outputs[0]}::bias"
        inits[wname] = w.astype(dtype)
        inits[bname] = ((bias - mean) * scale + beta).astype(dtype)
        prev.inputs = [prev.inputs[0], wname, bname]
        prev.outputs = list(bn.outputs[:1])
        graph.nodes.remove(bn)
        folded += 1
    used = {i for n in graph.nodes for i in n.inputs}
    graph.initializers = {k: v for k, v in inits.items() if k in used}
    return folded
