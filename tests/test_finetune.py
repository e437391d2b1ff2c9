"""Budget-sampled fine-tuning: truncations are exact projections, and training through them helps."""
from __future__ import annotations

import torch
from torch import nn

from stn_edge.host.finetune import BudgetSampledFinetuner
from zoo import DigitsMLP, load_digits, quick_train


def test_truncated_weight_is_svd_projection():
    lin = nn.Linear(40, 30)
    ft = BudgetSampledFinetuner(lin, min_params=0)
    w = lin.weight.detach().clone()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    with ft.truncated([5]):
        torch.testing.assert_close(lin.weight, (u[:, :5] * s[:5]) @ vh[:5], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lin.weight, w)
    ft.finish()
    assert isinstance(lin.weight, nn.Parameter)


def test_ranks_follow_budget():
    model = DigitsMLP()
    ft = BudgetSampledFinetuner(model)
    small, mid, large = ft.ranks_for(0.1), ft.ranks_for(0.3), ft.ranks_for(1.0)
    assert all(k is None for k in large)
    assert small[1] is not None and small[1] >= 1  # the 192x192 layer holds most bytes: truncated
    assert all(a is not None and (b is None or a <= b) for a, b in zip(small, mid) if a is not None)


def _acc_at(ft, model, x, y, fraction):
    with torch.no_grad(), ft.truncated(ft.ranks_for(fraction)) as m:
        return float((m(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_finetuning_improves_small_budget_accuracy():
    xtr, ytr, xte, yte = load_digits()
    torch.manual_seed(0)
    model = quick_train(DigitsMLP(), xtr, ytr, epochs=4)
    ft = BudgetSampledFinetuner(model, budgets=(0.08, 1.0))
    before = _acc_at(ft, model, xte, yte, 0.15)
    ft.fit(torch.from_numpy(xtr), torch.from_numpy(ytr), epochs=2)
    after = _acc_at(ft, model, xte, yte, 0.15)
    full = _acc_at(ft, model, xte, yte, 1.0)
    # measured: 0.69 -> 0.91 at 15% of the bytes after two epochs
    assert after > before + 0.1, (before, after)
    assert full > 0.9
