"""Shape arithmetic the backends share: window padding, output sizes, pooling windows, ONNX
Slice clamping and Resize coordinates. Pure Python and numpy; every engine that lowers ONNX ops
(numpy runs them, torch and the TFLite builder translate them) uses these so they agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


def same_pads(total: int, auto_pad: str) -> tuple[int, int]:
    """Split a total padding the way SAME_UPPER / SAME_LOWER do (the odd pixel at the end / start)."""
    small, large = total // 2, total - total // 2
    return (small, large) if auto_pad == "SAME_UPPER" else (large, small)


def window_pads(
    sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int] | None,
    auto_pad: str,
) -> tuple[list[int], list[int]]:
    """Begin and end padding of each spatial axis for Conv and the pools."""
    nd = len(sizes)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(sizes, kernel, strides, dilations):
            out = -(-size // s)
            b, e = same_pads(max(0, (out - 1) * s + (k - 1) * d + 1 - size), auto_pad)
            begin.append(b)
            end.append(e)
        return begin, end
    if auto_pad == "VALID" or not pads:
        return [0] * nd, [0] * nd
    return list(pads[:nd]), list(pads[nd:])


def kernel_offsets(
    out: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> Iterator[tuple[slice, ...]]:
    """For each kernel position, the strided slice of the padded input it reads: (..., *out)."""
    for pos in np.ndindex(*kernel):
        yield (slice(None), slice(None)) + tuple(
            slice(p * d, p * d + (o - 1) * s + 1, s) for p, d, o, s in zip(pos, dilations, out, strides)
        )


def conv_out(
    padded: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    return [(n - (k - 1) * d - 1) // s + 1 for n, k, s, d in zip(padded, kernel, strides, dilations)]


@dataclass(frozen=True)
class PoolGeometry:
    """Where a pool's windows lie along each spatial axis."""

    begin: list[int]  # explicit (or SAME) padding before
    end: list[int]  # explicit (or SAME) padding after
    overhang: list[int]  # extra cells past ``end`` that ceil_mode's last window reaches
    out: list[int]  # output size
    strides: list[int]
    dilations: list[int]

    def slices(self, kernel: Sequence[int]) -> Iterator[tuple[slice, ...]]:
        return kernel_offsets(self.out, kernel, self.strides, self.dilations)


def pool_geometry(
    sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int] | None,
    dilations: Sequence[int] | None,
    pads: Sequence[int] | None,
    auto_pad: str,
    ceil_mode: int,
) -> PoolGeometry:
    strides = list(strides or [1] * len(sizes))
    dilations = list(dilations or [1] * len(sizes))
    begin, end = window_pads(sizes, kernel, strides, dilations, pads, auto_pad)
    out, overhang = [], []
    for size, k, s, d, b, e in zip(sizes, kernel, strides, dilations, begin, end):
        extent = (k - 1) * d + 1
        span = size + b + e - extent
        o = (-(-span // s) if ceil_mode else span // s) + 1
        # A last window that would start in the end padding is dropped (PyTorch and ORT agree).
        if ceil_mode and (o - 1) * s >= size + b:
            o -= 1
        out.append(o)
        overhang.append(max(0, (o - 1) * s + extent - (size + b + e)))
    return PoolGeometry(begin, end, overhang, out, strides, dilations)


def slice_bounds(start: int, end: int, step: int, dim: int) -> slice:
    """ONNX Slice clamping (it differs from Python's for negative steps below -dim)."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    if dim == 0:
        return slice(0, 0, step)
    return slice(start, None if end < 0 else end, step)


def source_coords(n_out: int, n_in: int, scale: float, mode: str) -> np.ndarray:
    """Input coordinate of each output index along one axis (float64)."""
    x = np.arange(n_out, dtype=np.float64)
    if mode == "asymmetric":
        return x / scale
    if mode == "align_corners":
        return x * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    if mode == "pytorch_half_pixel" and n_out == 1:
        return np.zeros(n_out)
    return (x + 0.5) / scale - 0.5


def nearest(coords: np.ndarray, mode: str, n_in: int) -> np.ndarray:
    rounded = {
        "round_prefer_floor": np.ceil(coords - 0.5),
        "round_prefer_ceil": np.floor(coords + 0.5),
        "floor": np.floor(coords),
        "ceil": np.ceil(coords),
    }[mode]
    return np.clip(rounded, 0, n_in - 1).astype(np.int64)
