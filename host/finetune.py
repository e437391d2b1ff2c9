"""Budget-sampled fine-tuning: every budget good, no per-budget retraining.

Each step trains the model *through* a truncation: every regularized weight is replaced, in the
forward pass, by its projection on its top-``k`` left singular vectors (``W_k = U_k U_k^T W``), with
per-layer ranks ``k`` that the planner picks for a sampled budget. The gradient reaches the dense
weight through the (linear) projection. Following the sandwich rule of slimmable networks, the
smallest and the largest budgets are trained on alternate steps next to one random budget, so the
extremes are never neglected. Baking afterwards re-decomposes the dense weights; SVD prefixes are
exactly the truncations that were trained.

>>> ft = BudgetSampledFinetuner(model, budgets=(0.05, 1.0))                    # doctest: +SKIP
>>> for x, y in loader:                                                        # doctest: +SKIP
...     loss = ft.step_loss(lambda m: criterion(m(x), y)); opt.zero_grad(); loss.backward(); opt.step()
"""
from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from stn_edge.plan import LadderSpec, plan_ranks


class _Truncate(nn.Module):
    """Parametrization: the weight projected on its top-``rank`` left singular subspace (None: unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.rank: int | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return w
        m = w.reshape(w.shape[0], -1)
        with torch.no_grad():
            u = torch.linalg.svd(m, full_matrices=False)[0][:, : self.rank]
        return (u @ (u.T @ m)).reshape(w.shape)


class BudgetSampledFinetuner:
    """Trains a model so that the SVD truncations the planner picks at any budget work well.

    Parameters
    ----------
    model : the model; its Conv/Linear weights (groups 1, at least ``min_params`` elements) are truncated.
    budgets : ``(smallest, largest)`` fraction of those weights' bytes to sample between (log-uniform).
    levels : rank levels per layer offered to the planner.
    """

    def __init__(self, model: nn.Module, budgets: Sequence[float] = (0.05, 1.0), levels: int = 16,
                 min_params: int = 1024, seed: int = 0):
        self.model = model
        self.low, self.high = float(budgets[0]), float(budgets[1])
        self.levels = levels
        self.rng = random.Random(seed)
        self.modules = [m for m in model.modules()
                        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and getattr(m, "groups", 1) == 1
                        and m.weight.numel() >= min_params]
        self._steps = 0

    def ranks_for(self, fraction: float) -> list[int | None]:
        """Per-module rank (None: dense) the planner picks for ``fraction`` of the weights' bytes."""
        specs = []
        for i, m in enumerate(self.modules):
            w = m.weight.detach().reshape(m.weight.shape[0], -1)
            rows, cols = w.shape
            s2 = torch.linalg.svdvals(w).double() ** 2
            top = max((rows * cols - 1) // (rows + cols), 1)
            ranks = sorted({max(1, int(round(top * (j + 1) / self.levels))) for j in range(self.levels)})
            total = float(s2.sum()) or 1.0
            loss = tuple(float(s2[k:].sum()) / total for k in ranks)
            specs.append(LadderSpec(str(i), "svd", tuple(ranks), tuple(4 * k * (rows + cols) for k in ranks), loss,
                                    4 * rows * cols, min(rows, cols)))
        full = sum(s.dense_bytes for s in specs)
        smallest = sum(s.bytes[0] for s in specs)
        plan = plan_ranks(specs, 0, max(int(full * fraction), smallest), full)
        return [None if c.dense else c.rank for c in plan.layers]

    @contextlib.contextmanager
    def truncated(self, ranks: Sequence[int | None]) -> Iterator[nn.Module]:
        """The model with each module's weight truncated to ``ranks`` for the duration of the block."""
        for m, k in zip(self.modules, ranks):
            if not parametrize.is_parametrized(m, "weight"):
                parametrize.register_parametrization(m, "weight", _Truncate())
            m.parametrizations.weight[0].rank = k
        try:
            yield self.model
        finally:
            for m in self.modules:
                m.parametrizations.weight[0].rank = None

    def sample_fractions(self) -> list[float]:
        """This step's budgets: one log-uniform sample, plus the smallest or the largest on alternate steps."""
        self._steps += 1
        mid = float(np.exp(self.rng.uniform(np.log(self.low), np.log(self.high))))
        return [mid, self.low if self._steps % 2 else self.high]

    def step_loss(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """Summed loss over this step's sampled budgets; call ``backward`` on it."""
        total = torch.zeros(())
        for fraction in self.sample_fractions():
            with self.truncated(self.ranks_for(fraction)) as m:
                total = total + loss_fn(m)
        return total

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        epochs: int = 1,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        batch_size: int = 64,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
        log: Callable[[str], None] | None = None,
    ) -> float:
        """Train on ``(x, y)`` for ``epochs``, shuffled mini-batches, each step through this step's
        sampled budgets (:meth:`step_loss`). The optimizer defaults to Adam at 1e-3. Returns the
        last step's loss. Call :meth:`finish` (and :func:`recalibrate_batchnorm`) afterwards.
        """
        opt = optimizer or torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.model.train()
        last = float("nan")
        for epoch in range(epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), batch_size):
                b = perm[i:i + batch_size]
                step = self.step_loss(lambda m: loss(m(x[b]), y[b]))
                opt.zero_grad()
                step.backward()
                opt.step()
                last = float(step.detach())
            if log:
                log(f"[finetune] epoch {epoch + 1}/{epochs} loss {last:.3f}")
        return last

    def finish(self) -> None:
        """Remove the parametrizations, leaving plain dense weights for baking."""
        for m in self.modules:
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics at full rank (cumulative average over ``batches``).

    Training through sampled truncations feeds BatchNorm the statistics of many different networks,
    and its running averages end up fitting none of them; the full-rank network needs its own.
    Run this after :meth:`BudgetSampledFinetuner.finish` with a few dozen training batches.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was = model.training
    model.train()
    for x in batches:
        model(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was)
