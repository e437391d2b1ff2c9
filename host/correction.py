"""Per-level output statistics correction: what truncation does to BatchNorm statistics, undone.

BatchNorm is folded into the convolution before baking, so the layer that follows a truncated
weight sees outputs whose per-channel mean and spread have drifted from what the network was
trained with. For every ladder level this module measures, on calibration inputs, the affine map
per output channel that restores the full-rank output's mean and standard deviation::

    y_corrected = scale * y_truncated + shift        (per output channel, bias included in y)

That is the BatchNorm re-estimation one would do after truncating, reduced to two numbers per
channel per level, so the device applies it with no data and no extra op (the scale folds into the
last factor and the shift into the bias).

Statistics are computed in closed form from the rank-major factors: with ``Z = a * x`` (all
components, once) the truncated output's mean is ``b[:k]^T mean(Z[:k])`` and its variance
``b[:k,c]^T Cov(Z[:k]) b[:k,c]``, so every level costs a few small matrix products.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from stn_edge.graph import Graph
from stn_edge.host.importance import dense_values
from stn_edge.host.layers import Candidate


def layer_inputs(graph: Graph, candidates: Sequence[Candidate], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The input activation of every candidate layer on ``feeds`` (weight name -> array), from one run."""
    values = dense_values(graph, feeds, sorted({c.node.inputs[0] for c in candidates}))
    return {c.weight: values[c.node.inputs[0]] for c in candidates}


def _channel_stats(y: np.ndarray, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and second moment of ``y`` over every other axis, in float64."""
    y = np.moveaxis(y.astype(np.float64), channel_axis, 0).reshape(y.shape[channel_axis], -1)
    return y.mean(axis=1), y


def level_corrections(cand: Candidate, w: np.ndarray, bias: np.ndarray | None, a: np.ndarray, b: np.ndarray,
                      ranks: Sequence[int], x: np.ndarray, min_std: float = 1e-6) -> np.ndarray:
    """``(levels, 2, out)`` float32: per level, the per-channel ``scale`` and ``shift``.

    ``a`` is the rank-major input factor in the node's weight form (``(r, in, *k)`` for conv,
    ``(r, in)`` for linear), ``b`` the ``(r, out)`` output factor, ``x`` the layer's input activation.
    """
    if cand.kind == "conv":
        from stn_edge.device.backends.numpy import conv

        attrs = {k: v for k, v in cand.node.attrs.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}
        attrs["kernel_shape"] = list(a.shape[2:])
        z = conv(x.astype(np.float32), a.astype(np.float32), **attrs)  # (N, r, *spatial)
        full = conv(x.astype(np.float32), w.astype(np.float32), **{**attrs, "kernel_shape": list(w.shape[2:])})
        axis = 1
    else:
        mat = w.T if cand.layout == "in_out" else w  # (out, in)
        z = x @ a.T
        full = x @ mat.T
        axis = x.ndim - 1
    zc = np.moveaxis(z.astype(np.float64), axis, 0).reshape(z.shape[axis], -1)  # (r, samples)
    mz = zc.mean(axis=1)
    cov = np.cov(zc, bias=True) if zc.shape[1] > 1 else np.zeros((len(mz), len(mz)))
    cov = np.atleast_2d(cov)
    mu_full, yf = _channel_stats(full, axis)
    sd_full = yf.std(axis=1)
    bias = np.zeros(len(mu_full)) if bias is None else bias.astype(np.float64)
    b64 = b.astype(np.float64)
    out = np.empty((len(ranks), 2, len(mu_full)), np.float32)
    for j, k in enumerate(ranks):
        bk = b64[:k]  # (k, out)
        mu_k = bk.T @ mz[:k]
        var_k = np.sum((cov[:k, :k] @ bk) * bk, axis=0)
        sd_k = np.sqrt(np.maximum(var_k, 0.0))
        scale = np.where(sd_k > min_std, sd_full / np.maximum(sd_k, min_std), 1.0)
        # y = scale * (W_k x + bias) + shift must have the full output's mean (mu_full + bias)
        shift = (mu_full + bias) - scale * (mu_k + bias)
        out[j, 0], out[j, 1] = scale, shift
    return out


def corrected_weight(cand: Candidate, w_k: np.ndarray, bias: np.ndarray | None, corr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The dense weight and bias equivalent to level weight ``w_k`` with correction ``corr (2, out)``."""
    scale, shift = corr[0].astype(np.float64), corr[1].astype(np.float64)
    if cand.layout == "in_out":
        w = w_k * scale[None, :]
    else:
        w = w_k * scale.reshape(-1, *([1] * (w_k.ndim - 1)))
    b = (np.zeros_like(scale) if bias is None else bias.astype(np.float64)) * scale + shift
    return w.astype(w_k.dtype), b.astype(w_k.dtype)


def input_moments(cand: Candidate, x: np.ndarray, kernel: Sequence[int] | None = None,
                  chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (float64, population) of what the layer multiplies its
    weight with: the im2col patches ``(in, *kernel)`` of a conv (``D = in * K``; ``kernel`` defaults to
    the node's ``kernel_shape``), the input features of a linear layer. Output channel ``c`` is
    ``W_c . p`` over those vectors ``p``, so any weight's output mean and variance follow from these two
    without running the layer again. Samples are taken ``chunk`` patch numbers at a time."""
    if cand.kind == "conv":
        from stn_edge.geometry import conv_out, kernel_offsets, window_pads
        from stn_edge.device.backends.numpy import _pad_spatial

        attrs = cand.node.attrs
        kernel = list(kernel if kernel is not None else attrs["kernel_shape"])
        nd = x.ndim - 2
        strides = list(attrs.get("strides") or [1] * nd)
        dilations = list(attrs.get("dilations") or [1] * nd)
        begin, end = window_pads(x.shape[2:], kernel, strides, dilations, attrs.get("pads"), attrs.get("auto_pad", "NOTSET"))
        out = conv_out([d + b + e for d, b, e in zip(x.shape[2:], begin, end)], kernel, strides, dilations)
        dim = x.shape[1] * int(np.prod(kernel))

        def patches(xs: np.ndarray) -> np.ndarray:  # (D, samples)
            xp = _pad_spatial(xs, begin, end, 0)
            cols = np.stack([xp[sl] for sl in kernel_offsets(out, kernel, strides, dilations)], axis=2)  # (n, C, K, *out)
            return np.ascontiguousarray(cols.reshape(len(xs), dim, -1).transpose(1, 0, 2)).reshape(dim, -1)

        per_sample = dim * int(np.prod(out))
    else:
        dim = x.shape[-1]
        x = x.reshape(-1, dim)
        patches = lambda xs: np.ascontiguousarray(xs.T)  # noqa: E731
        per_sample = dim
    step = max(1, chunk // max(per_sample, 1))
    # float32 products (4x faster than float64 here) of data shifted by the first chunk's mean, so
    # that E[pp^T] - mm^T does not cancel; sums across chunks in float64
    shift: np.ndarray | None = None
    total, gram, count = np.zeros(dim), np.zeros((dim, dim)), 0
    for i in range(0, len(x), step):
        p = patches(x[i:i + step]).astype(np.float32, copy=False)
        if shift is None:
            shift = p.mean(axis=1, dtype=np.float64).astype(np.float32)
        p = p - shift[:, None]
        total += p.sum(axis=1, dtype=np.float64)
        gram += (p @ p.T).astype(np.float64)
        count += p.shape[1]
    centred = total / max(count, 1)
    mean = centred + (shift if shift is not None else 0.0)
    return mean, gram / max(count, 1) - np.outer(centred, centred)


def level_corrections_dense(cand: Candidate, w: np.ndarray, bias: np.ndarray | None, truncated, levels: int,
                            x: np.ndarray, min_std: float = 1e-6, chunk: int = 1 << 24) -> np.ndarray:
    """:func:`level_corrections` for any family, from each level's dense weight ``truncated(j)``.

    Exact and cheap: the output statistics of every level come from the input's patch moments
    (:func:`input_moments`, computed once), a few matrix products per level. A grouped conv, whose
    channels read different inputs, is run once per level instead.
    """
    if cand.kind == "conv" and int(cand.node.attrs.get("group", 1)) != 1:
        return _level_corrections_direct(cand, w, bias, truncated, levels, x, min_std)
    mean, cov = input_moments(cand, x, w.shape[2:] if cand.kind == "conv" else None, chunk)

    def stats(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = (weight.T if cand.layout == "in_out" else weight.reshape(weight.shape[0], -1)).astype(np.float64)
        return m @ mean, np.sqrt(np.maximum(np.sum((m @ cov) * m, axis=1), 0.0))

    mu_full, sd_full = stats(w)
    bias = np.zeros(len(mu_full)) if bias is None else bias.astype(np.float64)
    out = np.empty((levels, 2, len(mu_full)), np.float32)
    for j in range(levels):
        mu_k, sd_k = stats(truncated(j))
        scale = np.where(sd_k > min_std, sd_full / np.maximum(sd_k, min_std), 1.0)
        out[j, 0], out[j, 1] = scale, (mu_full + bias) - scale * (mu_k + bias)
    return out


def _level_corrections_direct(cand: Candidate, w: np.ndarray, bias: np.ndarray | None, truncated, levels: int,
                              x: np.ndarray, min_std: float = 1e-6) -> np.ndarray:
    """:func:`level_corrections_dense` by running the layer with each level's weight (grouped convs)."""
    if cand.kind == "conv":
        from stn_edge.device.backends.numpy import conv

        attrs = {k: v for k, v in cand.node.attrs.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}

        def apply(weight: np.ndarray) -> np.ndarray:
            return conv(x.astype(np.float32), weight.astype(np.float32), **attrs)

        axis = 1
    else:
        def apply(weight: np.ndarray) -> np.ndarray:
            mat = weight.T if cand.layout == "in_out" else weight
            return x @ mat.T

        axis = x.ndim - 1
    mu_full, yf = _channel_stats(apply(w), axis)
    sd_full = yf.std(axis=1)
    bias = np.zeros(len(mu_full)) if bias is None else bias.astype(np.float64)
    out = np.empty((levels, 2, len(mu_full)), np.float32)
    for j in range(levels):
        mu_k, yk = _channel_stats(apply(truncated(j)), axis)
        sd_k = yk.std(axis=1)
        scale = np.where(sd_k > min_std, sd_full / np.maximum(sd_k, min_std), 1.0)
        out[j, 0], out[j, 1] = scale, (mu_full + bias) - scale * (mu_k + bias)
    return out
