"""A low-rank regularizer on dense weights, for any PyTorch training loop.

The trained weights become near-low-rank in the matricization the decomposition will use, so
truncating them later loses little. Two forms:

* sub-gradient: add ``reg()`` (strength x summed nuclear norms) to the loss before ``backward``;
* proximal: call ``reg.prox_(lr)`` after ``optimizer.step()`` (singular value thresholding).

Under DistributedDataParallel every rank holds the same weights, so the penalty and its gradient
are the same on every rank and the averaged gradient is unchanged: add the term to each rank's loss.

>>> reg = LowRankRegularizer(model, strength=1e-4)       # doctest: +SKIP
>>> loss = criterion(model(x), y) + reg()                 # doctest: +SKIP
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def _matricize(w: torch.Tensor) -> torch.Tensor:
    """``(out, in, *k) -> (out, in*k)``: the unfolding SVD factorizes."""
    return w.reshape(w.shape[0], -1)


class LowRankRegularizer:
    """Nuclear-norm regularizer on the weights of every Conv and Linear module (subclasses included).

    Parameters
    ----------
    model : the module to regularize.
    strength : weight of the summed nuclear norms in the loss.
    min_params : weights with fewer elements are left alone (they stay dense at bake time).
    """

    def __init__(self, model: nn.Module, strength: float = 1e-4, min_params: int = 1024):
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        self.strength = float(strength)
        self.weights: list[tuple[str, nn.Parameter]] = [
            (f"{name}.weight", mod.weight)
            for name, mod in model.named_modules()
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            and getattr(mod, "groups", 1) == 1
            and mod.weight.numel() >= min_params
        ]

    def __iter__(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self.weights)

    def penalty(self) -> torch.Tensor:
        """``strength * sum_l ||W_l||_*`` as a differentiable scalar."""
        if not self.weights:
            return torch.zeros(())
        total = sum(torch.linalg.svdvals(_matricize(w)).sum() for _, w in self.weights)
        return self.strength * total

    __call__ = penalty

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        """Singular value thresholding in place: ``s <- max(s - lr*strength, 0)`` for each weight."""
        tau = lr * self.strength
        for _, w in self.weights:
            u, s, vh = torch.linalg.svd(_matricize(w), full_matrices=False)
            w.copy_(((u * (s - tau).clamp_min(0)) @ vh).reshape(w.shape))
