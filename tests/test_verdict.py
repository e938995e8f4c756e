"""``diagnose``: the validated verdict on problems with an obvious winner, its determinism, its
pieces (rung plan, curve extrapolation) and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import robustclip.diagnostics as rcd
from robustclip.diagnostics._pilot import extrapolate, rung_lengths

D = 5


def _regression(noise: str, n: int = 1024, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, 1, generator=g)
    x = torch.randn(n, D, generator=g)
    if noise == "gaussian":
        e = 0.5 * torch.randn(n, 1, generator=g)
    else:  # Cauchy per-sample noise: alpha = 1, far heavier than Gaussian
        e = rcd.symmetric_stable(1.0, (n, 1), generator=g, dtype=torch.float32)
    xt = torch.randn(512, D, generator=g)
    yt = xt @ w

    def clean_mse(m: nn.Module) -> float:
        return float(((m(xt) - yt) ** 2).mean())

    loader = DataLoader(TensorDataset(x, x @ w + e), batch_size=32, shuffle=True)
    return loader, clean_mse


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(1)


def _diagnose(noise: str, seed: int = 0, **kw):
    loader, metric = _regression(noise)
    return rcd.diagnose(
        lambda: nn.Linear(D, 1), loss_fn, loader, planned_steps=1500, lr=0.05, metric_fn=metric, seed=seed, **kw
    )


def test_heavy_per_sample_noise_gets_per_sample_clipping():
    d = _diagnose("cauchy")
    assert d.statistics["tail_index"] < 1.8
    assert d.method == "per_sample_clip" and d.threshold is not None and d.threshold > 0
    assert d.snippet == f"rc.Clipper(model, opt, rc.per_sample_clip({d.threshold:.4g}))"
    assert d.pilot_cost_frac <= 0.1 + 1e-9
    raced = {c["method"] for c in d.candidates}
    assert "none" in raced and "per_sample_clip" in raced and len(d.candidates) <= 9


def test_gaussian_noise_gets_no_clipping():
    d = _diagnose("gaussian")
    assert d.method == "none" and d.threshold is None
    assert d.pilot_cost_frac <= 0.1 + 1e-9


@pytest.mark.parametrize("pilot", ["staged", "halving"])
def test_the_pilot_is_deterministic_given_a_seed(pilot):
    a = _diagnose("cauchy", seed=3, pilot=pilot)
    b = _diagnose("cauchy", seed=3, pilot=pilot)
    assert (a.method, a.threshold, a.rungs) == (b.method, b.threshold, b.rungs)
    assert a.trunk_losses == b.trunk_losses
    assert [c["losses"] for c in a.candidates] == [c["losses"] for c in b.candidates]
    assert [c["scores"] for c in a.candidates] == [c["scores"] for c in b.candidates]
    # and it does not disturb the caller's RNG
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    _diagnose("gaussian", seed=5, pilot=pilot)
    assert torch.equal(torch.rand(3), before)


def test_a_module_is_copied_per_arm_and_left_untouched(tmp_path):
    loader, metric = _regression("gaussian", n=256)  # 8 batches: rho over the whole set fits
    torch.manual_seed(1)
    model = nn.Linear(D, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = rcd.diagnose(model, loss_fn, loader, planned_steps=1500, lr=0.05, seed=0, out=tmp_path / "diag")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for name in ("verdict.json", "report.md", "pilot.png", "statistics/report.md", "statistics/diagnostics.json"):
        assert (tmp_path / "diag" / name).is_file(), name
    assert (tmp_path / "diag" / "pilot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "diag" / "verdict.json").read_text())
    assert data["verdict"] == d.method and data["confidence"] in ("high", "medium", "low")
    assert data["statistics"]["rho_source"] == "whole training set"
    report = (tmp_path / "diag" / "report.md").read_text()
    assert d.headline in report and "pilot.png" in report and "Confidence" in report


def test_the_warmup_warning_names_the_function_gap_constants():
    d = _diagnose("gaussian")
    assert d.statistics["l0"] is not None
    text = " ".join(d.warnings)
    assert "l0l1_warmup" in text and "function-gap" in text and "l0_gap" in text


def test_rung_plan_fits_the_budget():
    for n, budget in ((7, 130), (4, 80), (3, 30), (1, 10)):
        plan = rung_lengths(n, budget)
        assert plan[0][0] == n and plan[-1][0] >= 1
        spent = plan[0][0] * plan[0][1] + sum(a * (e - p) for (a, e), (_, p) in zip(plan[1:], plan))
        assert spent <= budget
    assert rung_lengths(7, 130) == [(7, 10), (3, 30)]


def test_extrapolation_recovers_a_geometric_curve():
    # a metric that can be negative: M_k = -2 + 8 x^k per third (two equal readings each); the
    # curve 6 thirds past M3 is -2 + 8 x^9
    x = 0.5
    lin = [-2 + 8 * x**k for k in (1, 1, 2, 2, 3, 3)]
    assert extrapolate(lin, lookahead=6) == pytest.approx(-2 + 8 * x**9)
    # a positive metric is extrapolated in log space: log M_k = 1 + 2 x^k
    pos = [math.exp(1 + 2 * x**k) for k in (1, 1, 2, 2, 3, 3)]
    assert extrapolate(pos, lookahead=6) == pytest.approx(math.exp(1 + 2 * x**9))
    # a gain larger than the rung's own descent is capped at that descent
    slow = [-7 + 8 * 0.9**k for k in (1, 1, 2, 2, 3, 3)]
    m1, m3 = -7 + 8 * 0.9, -7 + 8 * 0.9**3
    assert extrapolate(slow, lookahead=60) == pytest.approx(m3 - (m1 - m3))
    # a noisy or rising curve is not extrapolated: the last third stands (geometric mean)
    assert extrapolate([1.0, 1.2, 0.9, 1.1, 1.0, 1.05]) == pytest.approx(math.sqrt(1.05))
    assert math.isinf(extrapolate([1.0, 2.0, math.inf]))


def test_diagnose_errors_are_clear():
    loader, _ = _regression("gaussian", n=256)
    with pytest.raises(ValueError, match="planned_steps"):
        rcd.diagnose(lambda: nn.Linear(D, 1), loss_fn, loader, planned_steps=0)
    with pytest.raises(ValueError, match="budget"):
        rcd.diagnose(lambda: nn.Linear(D, 1), loss_fn, loader, planned_steps=100, budget=1.5)
    with pytest.raises(ValueError, match="methods"):
        rcd.diagnose(lambda: nn.Linear(D, 1), loss_fn, loader, planned_steps=100, methods=["sgd"])
    with pytest.raises(ValueError, match="too small"):
        rcd.diagnose(lambda: nn.Linear(D, 1), loss_fn, loader, planned_steps=50)
    with pytest.raises(ValueError, match="pilot"):
        rcd.diagnose(lambda: nn.Linear(D, 1), loss_fn, loader, planned_steps=1500, pilot="random")
    with pytest.raises(TypeError, match="nn.Module"):
        rcd.diagnose(lambda: "not a model", loss_fn, loader, planned_steps=1500)
