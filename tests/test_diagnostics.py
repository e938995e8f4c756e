"""Diagnostics estimators: known-answer problems, oracles, and edge cases.

Tolerances of the tail-index tests come from simulation (200 repetitions per case, seeds other
than those used here): on symmetric alpha-stable vectors with N = 4096, d = 10 the estimate has
standard deviation <= 0.045 and no bias (the estimator is exact in law for stable noise), so
0.15 is over 3 standard deviations; Student-t noise is only in the domain of attraction of a
stable law and reads low at finite block length (nu = 1.5 gives about 1.40), hence the wider
bound there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustclip as rc
import robustclip.diagnostics as rcd
from robustclip.diagnostics._gradients import make_sketch
from robustclip.per_sample import ENGINES

# -- samplers -----------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("alpha", [2.0, 1.0])
def test_symmetric_stable_matches_known_laws(alpha):
    # alpha = 2 is N(0, 2); alpha = 1 is the standard Cauchy law. The empirical CDF at the true
    # quantiles has standard deviation sqrt(p(1-p)/N) < 0.0016, so 0.006 is over 3.5 of them.
    x = rcd.symmetric_stable(alpha, 100_000, generator=_gen(1)).numpy()
    ps = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
    if alpha == 2.0:
        ref = torch.distributions.Normal(0.0, math.sqrt(2.0)).icdf(torch.tensor(ps)).numpy()
    else:
        ref = np.tan(np.pi * (ps - 0.5))
    np.testing.assert_allclose([(x <= r).mean() for r in ref], ps, atol=0.006)


def test_symmetric_stable_rejects_bad_alpha():
    with pytest.raises(ValueError, match=r"\(0, 2\]"):
        rcd.symmetric_stable(2.5, 10)
    with pytest.raises(TypeError):
        rcd.symmetric_stable("1.5", 10)  # type: ignore[arg-type]


# -- tail index -----------------------------------------------------------------------------------


def _oracle_inv_alpha(x: np.ndarray, k1: int) -> float:
    """The estimator written out with plain loops."""
    n = (len(x) // k1) * k1
    k2 = n // k1
    log_x = [math.log(float(np.linalg.norm(x[j]))) for j in range(n)]
    log_y = []
    for i in range(k2):
        s = np.zeros_like(x[0])
        for j in range(i * k1, (i + 1) * k1):
            s = s + x[j]
        log_y.append(math.log(float(np.linalg.norm(s))))
    return (sum(log_y) / k2 - sum(log_x) / n) / math.log(k1)


def test_tail_index_equals_formula():
    x = torch.randn(103, 5, generator=_gen(2), dtype=torch.float64)
    for k1 in (2, 7, 10, 51):
        est = rcd.tail_index(x, k1=k1)
        assert est.k1 == k1 and est.k2 == 103 // k1 and est.num_samples == k1 * (103 // k1)
        assert est.inv_alpha == pytest.approx(_oracle_inv_alpha(x.numpy(), k1), rel=1e-12)
        assert est.alpha == pytest.approx(1 / est.inv_alpha)


def test_tail_index_center_subtracts_the_mean():
    x = torch.randn(400, 3, generator=_gen(3), dtype=torch.float64) + 5.0
    centred = x - x.mean(0)
    assert rcd.tail_index(x, center=True).inv_alpha == pytest.approx(
        rcd.tail_index(centred).inv_alpha, rel=1e-12
    )


@pytest.mark.parametrize("alpha", [1.1, 1.5, 1.8, 2.0])
def test_tail_index_recovers_stable_alpha(alpha):
    x = rcd.symmetric_stable(alpha, (4096, 10), generator=_gen(int(alpha * 100)))
    assert rcd.tail_index(x).alpha == pytest.approx(alpha, abs=0.15)


def test_tail_index_on_scalar_noise():
    # d = 1 is noisier (std about 0.08 at N = 20000 for alpha = 2)
    g = _gen(4)
    assert rcd.tail_index(torch.randn(20_000, generator=g)).alpha == pytest.approx(2.0, abs=0.25)
    assert rcd.tail_index(rcd.symmetric_stable(1.5, 20_000, generator=g)).alpha == pytest.approx(1.5, abs=0.25)


@pytest.mark.parametrize(("nu", "low", "high"), [(1.0, 0.85, 1.15), (1.5, 1.25, 1.65), (5.0, 1.8, 2.2)])
def test_tail_index_student_t(nu, low, high):
    torch.manual_seed(int(nu * 10))
    x = torch.distributions.StudentT(torch.tensor(nu, dtype=torch.float64)).sample((4096, 10))
    assert low < rcd.tail_index(x).alpha < high


@pytest.mark.parametrize("kind", ["gaussian", "count"])
def test_sketch_keeps_norms_and_alpha(kind):
    d, k = 3000, 128
    shapes = [torch.Size([d // 2]), torch.Size([d // 4, 2])]
    sk = make_sketch(shapes, k, seed=1, gaussian_max_elements=10**9 if kind == "gaussian" else 0)
    assert isinstance(sk, rcd.GaussianSketch if kind == "gaussian" else rcd.CountSketch)
    x = rcd.symmetric_stable(1.5, (2048, d), generator=_gen(5), dtype=torch.float32)
    parts = [x[:, : d // 2], x[:, d // 2 :].reshape(-1, d // 4, 2)]
    y = sk(parts)
    assert y.shape == (2048, k)
    # linearity: the sketch of a sum is the sum of the sketches
    torch.testing.assert_close(sk([p[:2].sum(0, keepdim=True) for p in parts])[0], y[:2].sum(0), rtol=1e-4, atol=1e-3)
    # E||Sx||^2 = ||x||^2 (checked on Gaussian vectors, whose norms concentrate)
    z = torch.randn(512, d, generator=_gen(6))
    ratio = sk([z[:, : d // 2], z[:, d // 2 :].reshape(-1, d // 4, 2)]).pow(2).sum(1) / z.pow(2).sum(1)
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.05)
    # a fixed linear map keeps a stable law stable with the same alpha
    assert rcd.tail_index(y).alpha == pytest.approx(1.5, abs=0.15)


def test_make_sketch_none_when_small():
    assert make_sketch([torch.Size([10])], 64) is None
    assert make_sketch([torch.Size([100])], None) is None


def test_tail_index_edge_cases():
    with pytest.raises(ValueError, match="constant"):
        rcd.tail_index(torch.ones(100, 4), center=True)
    with pytest.raises(ValueError, match="constant"):
        rcd.tail_index(torch.zeros(100, 4))  # zero gradients
    with pytest.raises(ValueError, match="at least 16"):
        rcd.tail_index(torch.randn(10, 3))
    x = torch.randn(100, 3)
    x[7] = 0
    with pytest.raises(ValueError, match="exactly zero"):
        rcd.tail_index(x)
    x = torch.randn(100, 3)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rcd.tail_index(x)
    with pytest.raises(ValueError, match="k1"):
        rcd.tail_index(torch.randn(100, 3), k1=60)
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, d\)"):
        rcd.tail_index(torch.randn(20, 3, 2))
    with pytest.raises(TypeError):
        rcd.tail_index([1.0, 2.0])  # type: ignore[arg-type]


# -- gradients on a probe set ----------------------------------------------------------------------


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _loop_grads(model, x, y):
    """Oracle: one autograd.grad per sample, flattened."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(_ce(model(x[i : i + 1]), y[i : i + 1]).sum(), params)
        rows.append(torch.cat([t.flatten() for t in g]))
    return torch.stack(rows)


def test_per_sample_gradients_match_loop_oracle():
    from robustclip.experiments.models import MLP

    torch.manual_seed(0)
    model = MLP([5, 7, 3]).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    ref = _loop_grads(model, x, y)
    got = rcd.per_sample_gradients(model, _ce, x, y, sketch_dim=None, max_chunk_elements=300)
    torch.testing.assert_close(got, ref)
    # restricted to one layer: the matching columns
    got0 = rcd.per_sample_gradients(model, _ce, x, y, layers=["0"], sketch_dim=None)
    torch.testing.assert_close(got0, ref[:, : 7 * 5 + 7])
    with pytest.raises(ValueError, match="not modules"):
        rcd.per_sample_gradients(model, _ce, x, y, layers=["nope"])


@pytest.mark.parametrize("engine", ["auto", *sorted(ENGINES)])
def test_probe_gradients_match_autograd(engine):
    from robustclip.experiments.models import MLP

    torch.manual_seed(0)
    model = nn.Sequential(MLP([5, 7, 3]), nn.Dropout(0.5)).double()  # dropout: eval mode in the probe
    model.train()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    pg = rcd.probe_gradients(model, _ce, x, y, engine=engine, chunk_size=16)
    assert model.training and model[1].training  # mode restored
    model.eval()
    ref = _loop_grads(model, x, y)
    torch.testing.assert_close(pg.per_sample_norms, ref.norm(dim=1))
    torch.testing.assert_close(torch.cat([g.flatten() for g in pg.mean_grad]), ref.mean(0))
    assert pg.grad_norm == pytest.approx(float(ref.mean(0).norm()))
    assert pg.loss == pytest.approx(float(_ce(model(x), y).mean().detach()))


def test_probe_rejects_bad_input():
    from robustclip.experiments.models import MLP

    model = MLP([5, 3])
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="first dimension"):
        rcd.probe_gradients(model, _ce, x, y[:5])
    with pytest.raises(ValueError, match="at least 2"):
        rcd.probe_gradients(model, _ce, x[:1], y[:1])
    with pytest.raises(ValueError, match="one loss per sample"):
        rcd.probe_gradients(model, lambda o, t: _ce(o, t).mean(), x, y)
    with pytest.raises(ValueError, match="unknown engine"):
        rcd.probe_gradients(model, _ce, x, y, engine="fast")
    with pytest.raises(TypeError):
        rcd.probe_gradients(model, _ce, x.numpy(), y)  # type: ignore[arg-type]


# -- strong growth ----------------------------------------------------------------------------------


def _sq(out, target):
    return 0.5 * (out.squeeze(1) - target).pow(2)


def test_strong_growth_known_rho():
    # a_i = sqrt(d) e_{k(i)}, each coordinate m times, targets interpolated by w*: per-sample
    # gradients d * delta_k e_k, mean gradient delta, so rho = d exactly for any w != w*.
    d, m = 6, 5
    a = (torch.eye(d, dtype=torch.float64) * math.sqrt(d)).repeat(m, 1)
    w_star = torch.randn(d, dtype=torch.float64)
    b = a @ w_star
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + torch.randn(d, dtype=torch.float64)).unsqueeze(0))
    for engine in ("vmap", "loop"):
        est = rcd.estimate_strong_growth(model, _sq, a, b, engine=engine, chunk_size=7)
        assert est.rho == pytest.approx(d, rel=1e-10)
        assert est.recommended_batch_size == d
        assert est.num_samples == d * m


def test_strong_growth_matches_closed_form_least_squares():
    n, d = 50, 4
    a = torch.randn(n, d, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    w = model.weight.detach()[0]
    r = a @ w - b  # grad_i = r_i a_i
    rho = float((r**2 * a.pow(2).sum(1)).mean() / (r.unsqueeze(1) * a).mean(0).pow(2).sum())
    est = rcd.estimate_strong_growth(model, _sq, a, b)
    assert est.rho == pytest.approx(rho, rel=1e-10)
    assert est.recommended_batch_size == math.ceil(rho)


def test_strong_growth_edge_cases():
    # identical per-sample gradients: rho = 1 exactly (Jensen's equality case)
    assert rcd.strong_growth(torch.full((8,), 2.0), 2.0).rho == pytest.approx(1.0)
    assert rcd.strong_growth(torch.full((8,), 2.0), 2.0).recommended_batch_size == 1
    # mean gradient zero while samples are not: the condition fails
    est = rcd.strong_growth(torch.ones(8), [torch.zeros(3)])
    assert est.rho == math.inf and est.recommended_batch_size is None
    with pytest.raises(ValueError, match="every per-sample gradient is zero"):
        rcd.strong_growth(torch.zeros(8), 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        rcd.strong_growth(torch.ones(1), 1.0)
    with pytest.raises(TypeError):
        rcd.strong_growth(torch.ones(4), "1.0")  # type: ignore[arg-type]


def test_strong_growth_at_zero_gradients_of_a_model():
    # interpolation reached exactly: every per-sample gradient is zero -> clear error
    d = 3
    a = torch.randn(20, d, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    b = (a @ model.weight.detach()[0]).clone()
    with pytest.raises(ValueError, match="zero"):
        rcd.estimate_strong_growth(model, _sq, a, b)


# -- (L0, L1)-smoothness ------------------------------------------------------------------------------

L0, L1 = 2.0, 0.5


class _Scalar(nn.Module):
    """One parameter x; every sample's output is x."""

    def __init__(self, x0: float) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0, dtype=torch.float64))

    def forward(self, inputs):
        return self.x.expand(inputs.shape[0])


def _exp_loss(out, target):
    # f(x) = e^{L1 x}/L1 - (L0/L1) x: f' = e^{L1 x} - L0/L1, f'' = L1 e^{L1 x} = L0 + L1 f'
    return torch.exp(L1 * out) / L1 - (L0 / L1) * out + 0 * target


def test_local_smoothness_on_exactly_l0l1_smooth_function():
    gs, ls = [], []
    probe = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    for x0 in np.linspace(3.0, 7.0, 6):
        model = _Scalar(float(x0))
        est = rcd.local_smoothness(model, _exp_loss, *probe, radius=1e-6)
        fprime = math.exp(L1 * x0) - L0 / L1
        assert est.grad_norm == pytest.approx(fprime, rel=1e-10)
        assert est.smoothness == pytest.approx(L0 + L1 * fprime, rel=1e-4)
        assert float(model.x.detach()) == x0  # parameters restored exactly
        gs.append(est.grad_norm)
        ls.append(est.smoothness)
    fit = rcd.fit_l0_l1(gs, ls)
    assert fit.l0 == pytest.approx(L0, rel=1e-3)
    assert fit.l1 == pytest.approx(L1, rel=1e-3)
    assert fit.r2 == pytest.approx(1.0, abs=1e-6)


def test_local_smoothness_of_a_quadratic_is_its_curvature_along_u():
    # f(w) = 0.5 w^T H w with H = diag(h): ||H u|| along any unit u, exactly (radius-free)
    h = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()

    def loss(out, target):
        w = model.weight[0]
        return 0.5 * (w * h * w).sum().expand(out.shape[0]) + 0 * out.squeeze(1)

    x = torch.zeros(4, 3, dtype=torch.float64)
    t = torch.zeros(4, dtype=torch.float64)
    w0 = model.weight.detach()[0].clone()
    est = rcd.local_smoothness(model, loss, x, t, radius=0.3)
    u = -(h * w0) / (h * w0).norm()
    assert est.smoothness == pytest.approx(float((h * u).norm()), rel=1e-10)
    e = [torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)]
    assert rcd.local_smoothness(model, loss, x, t, direction=e).smoothness == pytest.approx(4.0)


def test_local_smoothness_zero_gradient_needs_direction():
    model = _Scalar(0.0)
    probe = (torch.zeros(4, 1), torch.zeros(4))

    def flat(out, target):
        return 0 * out + target

    with pytest.raises(ValueError, match="gradient is zero"):
        rcd.local_smoothness(model, flat, *probe)
    with pytest.raises(ValueError, match="radius"):
        rcd.local_smoothness(_Scalar(5.0), _exp_loss, *probe, radius=-1.0)


def test_fit_l0_l1_least_squares_and_bounds():
    g = np.array([0.5, 1.0, 2.0, 4.0])
    fit = rcd.fit_l0_l1(g, 3 + 2 * g)
    assert (fit.l0, fit.l1) == pytest.approx((3.0, 2.0))
    noisy = 3 + 2 * g + np.array([0.1, -0.2, 0.3, -0.1])
    fit = rcd.fit_l0_l1(torch.tensor(g), torch.tensor(noisy))
    ref_slope, ref_icpt = np.polyfit(g, noisy, 1)
    assert (fit.l0, fit.l1) == pytest.approx((ref_icpt, ref_slope))
    assert np.all(noisy <= fit.l0_upper + fit.l1 * g + 1e-12)
    # smoothness falling with the gradient: the non-negative fit is flat at the mean
    fit = rcd.fit_l0_l1(g, 10 - g)
    assert fit.l1 == 0.0 and fit.l0 == pytest.approx(np.mean(10 - g))
    # negative intercept: the best line through the origin
    fit = rcd.fit_l0_l1(g, -1 + 3 * g)
    assert fit.l0 == 0.0 and fit.l1 == pytest.approx(float((g * (-1 + 3 * g)).sum() / (g * g).sum()))
    with pytest.raises(ValueError, match="at least 3"):
        rcd.fit_l0_l1([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="same gradient norm"):
        rcd.fit_l0_l1([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="one value per point"):
        rcd.fit_l0_l1([1.0, 2.0, 3.0], [1.0, 2.0])


# -- spectra ------------------------------------------------------------------------------------------


def test_layer_spectra_exact_and_lowrank_match_svd():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(700, 600, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(600, 600, dtype=torch.float64))
    s = 10.0 * 0.5 ** torch.arange(600, dtype=torch.float64)
    big = (u * s) @ v.T
    conv = torch.randn(8, 3, 3, 3)
    mats = {"big": big, "conv": conv, "bias": torch.randn(5), "zero": torch.zeros(4, 4)}
    spec = rcd.layer_spectra(mats, rank=3, exact_max_dim=100)
    assert list(spec) == ["big", "conv", "zero"]  # 1-D skipped
    assert not spec["big"].exact and spec["conv"].exact
    torch.testing.assert_close(spec["big"].top, s[:3], rtol=1e-6, atol=0)
    ref = torch.linalg.svdvals(conv.reshape(8, -1).double())
    torch.testing.assert_close(spec["conv"].top, ref[:3], rtol=1e-5, atol=1e-6)
    assert spec["conv"].top_share == pytest.approx(float(ref[:3].pow(2).sum() / ref.pow(2).sum()), rel=1e-5)
    assert spec["big"].top_share == pytest.approx(float(s[:3].pow(2).sum() / s.pow(2).sum()), rel=1e-6)
    assert spec["zero"].sigma_max == 0.0 and math.isnan(spec["zero"].top_share)
    assert spec["conv"].shape == (8, 27)
    with pytest.raises(ValueError, match="rank"):
        rcd.layer_spectra(mats, rank=0)


def test_gradient_matrices_skips_embeddings_and_missing_grads():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.Linear(3, 2))
    model(torch.tensor([1, 2])).sum().backward()
    model[2].weight.grad = None
    assert list(rcd.gradient_matrices(model)) == ["1.weight"]
    assert list(rcd.gradient_matrices(model, skip_embeddings=False)) == ["0.weight", "1.weight"]


# -- norm statistics and thresholds -------------------------------------------------------------------


def test_norm_statistics_and_thresholds():
    norms = torch.cat([torch.zeros(3), torch.rand(97, generator=_gen(7)) * 10 + 0.1])
    st = rcd.norm_statistics(norms, quantiles=(0.5, 0.9), bins=10)
    a = norms.double().numpy()
    assert st.count == 100 and st.zero_count == 3
    assert st.mean == pytest.approx(a.mean()) and st.max == pytest.approx(a.max())
    assert st.quantiles[0.9] == pytest.approx(np.quantile(a, 0.9))
    assert sum(st.hist_counts) == 97 and len(st.hist_edges) == 11
    assert rcd.suggest_max_norm(norms, 0.9) == pytest.approx(np.quantile(a, 0.9))
    c = 5.0
    assert rcd.clipped_fraction(norms, c) == pytest.approx(float((a > c).mean()))
    assert rcd.suggest_spectral_threshold([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)


def test_norm_statistics_edge_cases():
    with pytest.raises(ValueError, match="zero"):
        rcd.suggest_max_norm(torch.zeros(10))
    with pytest.raises(ValueError, match="empty"):
        rcd.norm_statistics(torch.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        rcd.norm_statistics([1.0, float("nan")])
    with pytest.raises(ValueError, match=">= 0"):
        rcd.norm_statistics([1.0, -1.0])
    with pytest.raises(ValueError, match="quantile"):
        rcd.suggest_max_norm([1.0, 2.0], quantile=1.5)
    with pytest.raises(ValueError, match="max_norm"):
        rcd.clipped_fraction([1.0], 0.0)
    st = rcd.norm_statistics(torch.zeros(5))  # all zero: statistics still defined
    assert st.zero_count == 5 and st.hist_counts == []


# -- verdict -------------------------------------------------------------------------------------------


def test_verdict_rules():
    v = rcd.verdict(tail_index=1.4, suggested_max_norm=2.3, rho=12.0, batch_size=32)
    assert v.recommendation == "per_sample_clip"
    assert "heavy-tailed (α̂ = 1.40)" in v.headline and "per-sample clipping is recommended" in v.headline
    assert "per_sample_clip(2.3)" in v.snippet
    assert any("32 already satisfies" in f for f in v.findings)
    v = rcd.verdict(tail_index=1.97, l0=1.0, l1=2.0, grad_norm=3.0, rho=100.0, batch_size=32)
    assert v.recommendation == "clip_by_global_norm" and "0.5" in v.headline
    assert any("raise it to 100" in f for f in v.findings)
    v = rcd.verdict(
        tail_index=1.97,
        sigma_max_history={"fc": [1.0, 1.0, 1.1, 9.0], "out": [1.0, 1.0, 1.0]},
        top_share={"fc": 0.9, "out": 0.9},
        suggested_spectral_threshold=1.1,
    )
    assert v.recommendation == "spectral_clip" and "fc" in v.headline and "τ ≈ 1.1" in v.headline
    assert "spectral_clip(1.1)" in v.snippet
    # a steady trend (x1.05 per reading, like growing gradients) is not a spike
    trend = [1.05**t for t in range(60)]
    v = rcd.verdict(tail_index=1.97, sigma_max_history={"fc": trend}, top_share={"fc": 0.9})
    assert v.recommendation == "none"
    v = rcd.verdict(tail_index=2.0, l0=5.0, l1=0.1, grad_norm=1.0)
    assert v.recommendation == "none" and v.text.startswith("The noise looks light-tailed")
    assert rcd.verdict().recommendation == "none"
    assert "∞" in rcd.verdict(rho=math.inf).text


def test_spike_ratio_against_recent_median():
    from robustclip.diagnostics._verdict import spike_ratio

    h = [1.0, 2.0, 3.0, 4.0, 100.0, 5.0]
    # oracle: h[t] / median of everything before t (window longer than the history)
    ref = max(h[t] / float(np.median(h[:t])) for t in range(3, len(h)))
    assert spike_ratio(h) == pytest.approx(ref)
    assert spike_ratio(h, window=2) == pytest.approx(max(h[t] / float(np.median(h[t - 2 : t])) for t in range(3, 6)))
    assert spike_ratio([1.0, 2.0, 3.0]) is None


# -- the tracker in a user's loop -------------------------------------------------------------------


def _tracker_setup(n=64, seed=0):
    from robustclip.experiments.models import MLP

    torch.manual_seed(seed)
    model = MLP([5, 8, 3])
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    return model, x, y


def test_diagnostics_in_a_training_loop(tmp_path):
    model, x, y = _tracker_setup()
    diag = rcd.Diagnostics(
        model, _ce, (x[:32], y[:32]), batch_size=16, max_norm=0.5, sketch_dim=20, spectrum_every=1
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen_norms: list[list[torch.Tensor]] = [[], []]
    seen_sigma = []
    with rc.Clipper(model, opt, rc.per_sample_clip(None)) as clipper:
        diag.probe()
        for epoch in range(2):
            for s in range(0, 64, 16):
                clipper.backward(_ce(model(x[s : s + 16]), y[s : s + 16]))
                info = clipper.step()
                seen_norms[epoch].append(info.per_sample_norms.clone())
                seen_sigma.append(float(torch.linalg.svdvals(model[0].weight.grad)[0]))
                diag.observe(info)
            rec = diag.end_epoch()
            ref = torch.cat(seen_norms[epoch]).double()
            assert rec.samples == 64 and rec.steps == 4
            assert rec.mean_norm == pytest.approx(float(ref.mean()))
            diag.probe()
    s = diag.summary()
    assert len(s["probes"]) == 3 and s["steps"] == 8
    for e, norms in zip(s["epochs"], seen_norms):
        assert e["fraction_clipped"] == pytest.approx(float((torch.cat(norms) > 0.5).double().mean()))
    sig0 = [v for _, v in diag.sigma_max_history()["0.weight"]]
    np.testing.assert_allclose(sig0, seen_sigma, rtol=1e-5)
    pooled = np.concatenate([torch.cat(n).double().numpy() for n in seen_norms])
    assert s["suggested_max_norm"] == pytest.approx(np.quantile(pooled, 0.9))
    alphas = [p["tail_index"] for p in s["probes"]]
    assert s["tail_index"] == pytest.approx(np.median(alphas[1:]))  # later half of 3 probes
    assert s["tail_index_min"] == min(alphas)
    assert s["rho"] == max(p["rho"] for p in s["probes"])
    assert s["l0"] is not None and s["l1"] is not None and s["l0"] >= 0 and s["l1"] >= 0
    assert s["recommendation"] in ("per_sample_clip", "spectral_clip", "clip_by_global_norm", "none")
    paths = diag.save(tmp_path, plots=False)
    assert {"report.md", "diagnostics.json", "probes.csv", "epochs.csv", "metrics.jsonl"} <= set(paths)
    assert s["headline"] in (tmp_path / "report.md").read_text()


def test_diagnostics_ignores_skipped_steps(caplog):
    """A non-finite step is skipped by the clipper; its NaN readings must not reach the stats."""
    model, x, y = _tracker_setup()
    diag = rcd.Diagnostics(model, _ce, (x[:32], y[:32]), max_norm=0.5, spectrum_every=1, smoothness=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    with rc.Clipper(model, opt, rc.per_sample_clip(None)) as clipper:
        for s in range(0, 64, 16):
            xb = x[s : s + 16].clone()
            if s == 16:
                xb[0, 0] = float("nan")
            clipper.backward(_ce(model(xb), y[s : s + 16]))
            info = clipper.step()
            if not info.skipped:
                norms.append(info.per_sample_norms.clone())
            diag.observe(info)
    rec = diag.end_epoch()
    assert diag.skipped_steps == 1 and rec.steps == 3 and rec.samples == 48
    assert rec.mean_norm == pytest.approx(float(torch.cat(norms).double().mean()))
    assert all(np.isfinite(v) for _, v in diag.sigma_max_history()["0.weight"])


def test_diagnostics_without_clipper_uses_probe_norms():
    model, x, y = _tracker_setup()
    diag = rcd.Diagnostics(model, _ce, (x, y), spectrum_every=0, smoothness=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = _ce(model(x), y).mean()
    loss.backward()
    opt.step()
    diag.observe(loss=loss)
    rec = diag.probe()
    s = diag.summary()
    assert s["per_sample_norm_source"] == "probe set"
    assert s["suggested_max_norm"] == pytest.approx(rec.norm_quantiles["q0.9"])
    assert s["layers"] == {} and s["l0"] is None
    assert not any("(L0, L1)" in n for n in s["notes"])  # no smoothness measured: nothing to fit


def test_diagnostics_records_undefined_estimates_instead_of_failing():
    # a model whose gradients are all zero: every estimator is undefined; probe() says why
    model = nn.Linear(3, 2)
    x, y = torch.randn(20, 3), torch.zeros(20)

    def zero_loss(out, target):
        return 0 * out.sum(1) + target

    diag = rcd.Diagnostics(model, zero_loss, (x, y))
    rec = diag.probe()
    assert rec.tail_index is None and rec.rho is None and rec.smoothness is None
    assert any("constant" in n for n in rec.notes) and any("zero" in n for n in rec.notes)
    s = diag.summary()
    assert s["tail_index"] is None and s["rho"] is None and s["notes"]


def test_diagnostics_rejects_bad_arguments():
    model, x, y = _tracker_setup()
    with pytest.raises(ValueError, match="at least 16"):
        rcd.Diagnostics(model, _ce, (x[:10], y[:10]))
    with pytest.raises(TypeError, match="pair"):
        rcd.Diagnostics(model, _ce, x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clip_quantile"):
        rcd.Diagnostics(model, _ce, (x, y), clip_quantile=0.0)
    with pytest.raises(ValueError, match="max_norm"):
        rcd.Diagnostics(model, _ce, (x, y), max_norm=-1.0)
