"""Capture: a PyTorch model (or an ONNX file) becomes a :class:`~stn_edge.graph.Graph`.

Anything ``torch.onnx.export`` can export is accepted: the layers to factorize are found in the
exported graph by operator (Conv, Gemm, MatMul with a constant weight), not by module type, so
subclasses and functional calls are found too. The graph is then cleaned for baking: aliases of
constants are resolved and BatchNormalization is folded into the Conv or Gemm before it.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Any, Sequence

import numpy as np

from stn_edge.errors import CaptureError
from stn_edge.graph import Graph


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

    ``example_inputs`` is a tensor or a tuple of tensors. The batch axis (0) of every input and
    output is symbolic when ``dynamic_batch``.
    """
    import torch

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    n_in = len(args)
    input_names = list(input_names or (["input"] if n_in == 1 else [f"input_{i}" for i in range(n_in)]))
    with torch.no_grad():
        outs = model(*args)
    n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
    output_names = list(output_names or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]))
    axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
    buf = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, args, buf, dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=input_names, output_names=output_names, dynamic_axes=axes,
                training=torch.onnx.TrainingMode.EVAL,
            )
    except Exception as exc:  # the exporter raises many types; all mean "cannot capture"
        raise CaptureError(f"torch.onnx.export failed for {type(model).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    return buf.getvalue()


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
