"""BatchNormalization and LayerNormalization, as the elementwise ops TFLite runs."""
from __future__ import annotations


import numpy as np

from stn_edge.device.backends.tflite_builder.converter import _Converter, _Refused, _converts
from stn_edge.graph import Node


def _channel_const(c: _Converter, array: np.ndarray, rank: int, perm: tuple[int, ...] | None, tag: str) -> int:
    """A per-channel vector (C,) as a constant broadcasting against (N, C, *spatial) in ``perm`` order."""
    shaped = np.ascontiguousarray(array.astype(np.float32).reshape((1, -1) + (1,) * (rank - 2)))
    return c.const_tensor(shaped, perm)


@_converts("BatchNormalization")
def _batch_norm(c: _Converter, node: Node) -> None:
    if node.attrs.get("training_mode", 0):
        raise _Refused("training_mode=1 is not supported (inference only)")
    scale, bias, mean, var = (c.const(n).astype(np.float64) for n in node.inputs[1:5])
    gain = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    shift = bias - mean * gain
    v = c.values[node.inputs[0]]
    rank = len(v.shape)
    mid = c.temp([v.shape[p] for p in v.perm] if v.perm else v.shape, np.float32, "scaled")
    gain_t = _channel_const(c, gain, rank, v.perm, "gain")
    c.emit("MUL", [c.tensor(node.inputs[0], v.perm), gain_t], [mid], "MulOptions", FusedActivationFunction=0)
    name, act = c.take_activation(node.outputs[0])
    out = c.out(name, v.shape, np.float32, v.perm)
    c.emit("ADD", [mid, _channel_const(c, shift, rank, v.perm, "shift")], [out], "AddOptions", FusedActivationFunction=act)
    c.define(name, v.shape, np.float32, out, v.perm)


@_converts("LayerNormalization")
def _layer_norm(c: _Converter, node: Node) -> None:
    """mean, centred, variance, RSQRT: the decomposition the TFLite converter emits."""
    v = c.values[node.inputs[0]]
    rank = len(v.shape)
    axes = list(range(int(node.attrs.get("axis", -1)) % rank, rank))
    perm = v.perm
    storage = [v.shape[p] for p in perm] if perm else list(v.shape)
    saxes = [(perm.index(a) if perm else a) for a in axes]
    stat_shape = [1 if i in saxes else s for i, s in enumerate(storage)]
    x = c.tensor(node.inputs[0], perm)
    axes_t = c.int_tensor(saxes)
    mean = c.temp(stat_shape, np.float32, "mean")
    c.emit("MEAN", [x, axes_t], [mean], "ReducerOptions", KeepDims=True)
    centred = c.temp(storage, np.float32, "centred")
    c.emit("SUB", [x, mean], [centred], "SubOptions", FusedActivationFunction=0)
    square = c.temp(storage, np.float32, "square")
    c.emit("MUL", [centred, centred], [square], "MulOptions", FusedActivationFunction=0)
    var = c.temp(stat_shape, np.float32, "var")
    c.emit("MEAN", [square, axes_t], [var], "ReducerOptions", KeepDims=True)
    var_eps = c.temp(stat_shape, np.float32, "var_eps")
    eps = c.const_tensor(np.array(float(node.attrs.get("epsilon", 1e-5)), np.float32))
    c.emit("ADD", [var, eps], [var_eps], "AddOptions", FusedActivationFunction=0)
    inv_std = c.temp(stat_shape, np.float32, "inv_std")
    c.emit("RSQRT", [var_eps], [inv_std])
    normed = c.temp(storage, np.float32, "normed")
    c.emit("MUL", [centred, inv_std], [normed], "MulOptions", FusedActivationFunction=0)
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2])
    scaled = c.out(node.outputs[0], v.shape, np.float32, perm) if not has_bias else c.temp(storage, np.float32, "scaled")
    gamma = c.const_tensor(c.const(node.inputs[1]), perm, rank)
    c.emit("MUL", [normed, gamma], [scaled], "MulOptions", FusedActivationFunction=0)
    out = scaled
    if has_bias:
        out = c.out(node.outputs[0], v.shape, np.float32, perm)
        beta = c.const_tensor(c.const(node.inputs[2]), perm, rank)
        c.emit("ADD", [scaled, beta], [out], "AddOptions", FusedActivationFunction=0)
    c.define(node.outputs[0], v.shape, np.float32, out, perm)
    logical_stat = tuple(1 if i in axes else s for i, s in enumerate(v.shape))
    for name, tensor in zip(node.outputs[1:3], (mean, inv_std)):
        if name:
            c.define(name, logical_stat, np.float32, tensor, perm)
