"""A low-rank regularizer on dense weights ("full tensor format"), for any PyTorch training loop.

Trained with it, weights become near-low-rank in the unfoldings the decompositions use, so that
truncating them later loses little. Two forms:

* sub-gradient: add ``reg()`` (strength x nuclear norms) to the loss before ``backward``;
* proximal: call ``reg.prox_(lr)`` after ``optimizer.step()`` (singular value thresholding).

Unfoldings of a weight ``(out, in, *k)``; the structure search decomposes along these:

``out``      out | in*k        (SVD of the usual matricization, Tucker's output mode)
``in``       in | out*k        (Tucker's input mode)
``spatial``  in*kh | out*kw    (the spatially separable split; conv2d only)
``modes``    the pairwise mode unfoldings of the tensorized weight: out and in are each split into
             two near-square factors (o1*o2, i1*i2) and each pair of modes is unfolded against the
             rest -- the edges a tensor-train / tensor-ring / fully-connected network keeps.

Under DistributedDataParallel every rank holds the same weights, so the penalty and its gradient
are the same on every rank and the averaged gradient is the single-process gradient: add the term
to each rank's loss (``tests/test_regularizer.py`` checks this with torchrun and gloo).

>>> reg = LowRankRegularizer(model, strength=1e-4, unfoldings=("out", "spatial"))  # doctest: +SKIP
>>> loss = criterion(model(x), y) + reg()                                           # doctest: +SKIP
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import nn

UNFOLDINGS = ("out", "in", "spatial", "modes")


def _split(n: int) -> tuple[int, int]:
    """``n = a * b`` with ``a <= b`` as close to square as the divisors allow."""
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return a, n // a


def unfold(w: torch.Tensor, how: str) -> list[torch.Tensor]:
    """The matrices of ``w (out, in, *k)`` for one unfolding name (``modes`` gives several)."""
    out, inp = w.shape[0], w.shape[1]
    k = w[0, 0].numel() if w.ndim > 2 else 1
    if how == "out":
        return [w.reshape(out, -1)]
    if how == "in":
        return [w.reshape(out, inp, k).permute(1, 0, 2).reshape(inp, -1)]
    if how == "spatial":
        if w.ndim != 4:
            return []
        kh, kw = w.shape[2], w.shape[3]
        return [w.permute(1, 2, 0, 3).reshape(inp * kh, out * kw)]
    if how == "modes":
        o1, o2 = _split(out)
        i1, i2 = _split(inp)
        t = w.reshape(o1, o2, i1, i2, k)
        mats = []
        for p in range(5):
            for q in range(p + 1, 5):
                rest = [m for m in range(5) if m not in (p, q)]
                m = t.permute(p, q, *rest).reshape(t.shape[p] * t.shape[q], -1)
                if min(m.shape) > 1:
                    mats.append(m)
        return mats
    raise ValueError(f"unknown unfolding {how!r}; known: {', '.join(UNFOLDINGS)}")


class LowRankRegularizer:
    """Nuclear-norm regularizer on the weights of every Conv and Linear module (subclasses included).

    Parameters
    ----------
    model : the module to regularize.
    strength : weight of the nuclear norms in the loss; each weight's unfoldings are averaged, so
        the strength means the same whatever ``unfoldings`` holds.
    unfoldings : names from :data:`UNFOLDINGS`.
    min_params : weights with fewer elements are left alone (they stay dense at bake time).
    """

    def __init__(self, model: nn.Module, strength: float = 1e-4, unfoldings: Sequence[str] = ("out",),
                 min_params: int = 1024):
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        for how in unfoldings:
            if how not in UNFOLDINGS:
                raise ValueError(f"unknown unfolding {how!r}; known: {', '.join(UNFOLDINGS)}")
        self.strength = float(strength)
        self.unfoldings = tuple(unfoldings)
        self.weights: list[tuple[str, nn.Parameter]] = [
            (f"{name}.weight", mod.weight)
            for name, mod in model.named_modules()
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            and getattr(mod, "groups", 1) == 1
            and mod.weight.numel() >= min_params
        ]

    def __iter__(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self.weights)

    def _matrices(self, w: torch.Tensor) -> list[torch.Tensor]:
        return [m for how in self.unfoldings for m in unfold(w, how)]

    def penalty(self) -> torch.Tensor:
        """``strength * sum_l mean_u ||unfold_u(W_l)||_*`` as a differentiable scalar."""
        total = torch.zeros(())
        for _, w in self.weights:
            mats = self._matrices(w)
            if mats:
                total = total + sum(torch.linalg.svdvals(m).sum() for m in mats) / len(mats)
        return self.strength * total

    __call__ = penalty

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        """Singular value thresholding in place, ``s <- max(s - lr*strength/U, 0)``, unfolding by unfolding.

        With one unfolding this is the exact proximal step of the nuclear norm. With ``U`` > 1 the
        unfoldings are thresholded one after another (a cyclic approximation of the joint step).
        """
        for _, w in self.weights:
            hows = [h for h in self.unfoldings if unfold(w, h)]
            for how in hows:
                _threshold_(w, how, lr * self.strength / len(hows))


def _threshold_(w: torch.Tensor, how: str, tau: float) -> None:
    """Threshold the singular values of each matrix of one unfolding and fold the result back into ``w``."""
    if how == "modes":
        # the pairwise unfoldings overlap; threshold the out|in*k one as the shared proxy for them
        how = "out"
    m = unfold(w, how)[0]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    m_new = (u * (s - tau).clamp_min(0)) @ vh
    w.copy_(_fold(m_new, how, w.shape))


def _fold(m: torch.Tensor, how: str, shape: torch.Size) -> torch.Tensor:
    out, inp = shape[0], shape[1]
    if how == "out":
        return m.reshape(shape)
    if how == "in":
        k = m.shape[1] // out
        return m.reshape(inp, out, k).permute(1, 0, 2).reshape(shape)
    kh, kw = shape[2], shape[3]  # spatial
    return m.reshape(inp, kh, out, kw).permute(2, 0, 1, 3).reshape(shape)
