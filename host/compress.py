"""``compress``: one fixed-size factorized PyTorch model, for users who want a single size.

Bakes the model, plans ranks for ``budget`` exactly as a device would, and returns the lowered
graph (factors at the chosen ranks, plain Conv/MatMul ops) as a trainable ``nn.Module`` whose
parameters are the truncated factors. Fine-tune it like any module; export it with
``torch.onnx.export`` or keep using it in PyTorch.

>>> small = compress(model, "25%", example_input, calibration=x_cal)   # doctest: +SKIP
>>> small(x).shape                                                     # doctest: +SKIP
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stn_edge.device import Runtime
from stn_edge.device.backends import get_backend
from stn_edge.graph import Graph
from stn_edge.plan import Plan


class CompressedModel(nn.Module):
    """A lowered graph run with torch ops; float weights (the truncated factors) are parameters.

    ``plan`` says what each layer keeps. Runs on the CPU.
    """

    def __init__(self, graph: Graph, plan: Plan):
        super().__init__()
        self.plan = plan
        self._exe = get_backend("torch").prepare(graph, "cpu")
        self._inputs = [v.name for v in graph.inputs]
        self._outputs = [v.name for v in graph.outputs]
        self.weights = nn.ParameterDict()
        self.weight_names: dict[str, str] = {}
        for i, (name, tensor) in enumerate(sorted(self._exe._dev.items())):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                param = nn.Parameter(tensor.detach().clone().contiguous())
                self.weights[f"w{i}"] = param
                self.weight_names[f"w{i}"] = name
                self._exe._dev[name] = param  # the graph now reads the parameter

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        exe = self._exe
        if len(inputs) != len(self._inputs):
            raise TypeError(f"the model takes {len(self._inputs)} input(s) {self._inputs}, got {len(inputs)}")
        env = exe.execute(dict(zip(self._inputs, inputs)))
        outs = tuple(exe._value(env, name, False, False) for name in self._outputs)
        return outs[0] if len(outs) == 1 else outs


def compress(model: nn.Module, budget: int | float | str, example_inputs: Any, *, calibration: Any = None,
             **bake_options: Any) -> CompressedModel:
    """Bake ``model`` and return it factorized at ``budget`` (bytes, ``"12MB"`` or ``"25%"``) as a module.

    ``bake_options`` go to :func:`stn_edge.host.bake` (``structure``, ``importance``, ...).
    """
    from stn_edge.host.bake import bake

    bake_options.setdefault("progress", False)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.stn"
        bake(model, example_inputs, path, calibration=calibration, **bake_options)
        with Runtime.load(path, mem_limit=budget, backend="numpy") as rt:
            graph = rt.lowered_graph()
            plan = rt.plan
            graph = Graph(graph.nodes, graph.inputs, graph.outputs,
                          {k: np.array(v) for k, v in graph.initializers.items()}, graph.opset)
    return CompressedModel(graph, plan)
