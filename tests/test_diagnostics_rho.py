"""rho-hat over the whole training set, streamed over a loader, against its closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import robustclip.diagnostics as rcd


def _least_squares(n: int = 96, d: int = 256, seed: int = 0):
    """Over-parameterized least squares f_i(w) = (a_i^T w - b_i)^2 / 2 (n < d: interpolation)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = a @ (torch.randn(d, 1, generator=g, dtype=torch.float64) / math.sqrt(d))
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64) / math.sqrt(d))
    return a, b, model


def _closed_form_rho(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> float:
    # g_i = r_i a_i with r_i = a_i^T w - b_i; rho = mean_i ||g_i||^2 / ||mean_i g_i||^2
    r = (a @ w.T - b).squeeze(1)
    per_sample = (r**2) * (a**2).sum(1)
    mean_grad = (r.unsqueeze(1) * a).mean(0)
    return float(per_sample.mean() / mean_grad.pow(2).sum())


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(1)


@pytest.mark.parametrize("batch", [1, 7, 96])
def test_streamed_rho_is_the_closed_form(batch):
    a, b, model = _least_squares()
    want = _closed_form_rho(a, b, model.weight.detach())
    loader = DataLoader(TensorDataset(a, b), batch_size=batch, shuffle=True)
    got = rcd.strong_growth_over(model, loss_fn, loader)
    assert got.num_samples == a.shape[0]
    assert got.rho == pytest.approx(want, rel=1e-10)
    assert got.recommended_batch_size == math.ceil(want)


def test_a_probe_subset_is_biased_toward_its_size_and_the_correction_removes_it():
    # rho of order n: a subset of 16 samples reads far below the full-set rho (its own mean
    # gradient is noisier); the documented correction E||gbar_m||^2 = ||gbar||^2 +
    # (msq - ||gbar||^2)(N - m)/(m (N - 1)) recovers the full-set value on average
    a, b, model = _least_squares(n=512, d=1024)
    full = rcd.strong_growth_over(model, loss_fn, DataLoader(TensorDataset(a, b), batch_size=64))
    assert full.rho == pytest.approx(_closed_form_rho(a, b, model.weight.detach()), rel=1e-10)
    g = torch.Generator().manual_seed(1)
    m, n = 16, a.shape[0]
    sub_rhos, gsq_hat, msq = [], [], []
    for _ in range(200):
        idx = torch.randperm(n, generator=g)[:m]
        est = rcd.estimate_strong_growth(model, loss_fn, a[idx], b[idx])
        sub_rhos.append(est.rho)
        c = (n - m) / (m * (n - 1))
        gsq_hat.append((est.grad_sq_norm - c * est.mean_sq_norm) / (1 - c))
        msq.append(est.mean_sq_norm)
    median_subset = sorted(sub_rhos)[len(sub_rhos) // 2]
    assert median_subset < 0.5 * full.rho  # biased low, toward the subset size
    corrected = (sum(msq) / len(msq)) / (sum(gsq_hat) / len(gsq_hat))
    assert corrected == pytest.approx(full.rho, rel=0.15)


def test_streamed_rho_errors():
    a, b, model = _least_squares(n=8, d=16)
    with pytest.raises(TypeError, match="pair"):
        rcd.strong_growth_over(model, loss_fn, [a])
    with pytest.raises(ValueError, match="at least 2"):
        rcd.strong_growth_over(model, loss_fn, [(a[:1], b[:1])])
