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
from robustclip.diagnostics._pilot import (
    Arm,
    Candidate,
    extrapolate,
    matched_progress,
    rung_lengths,
    steps_to_reach,
)
from robustclip.diagnostics._verdict import without_spikes

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


def test_steps_to_reach_reads_a_significant_descent():
    # readings every 10 steps of a 60-step rung, falling by 1% per step in log space, end at
    # -0.6: the target exp(-1.6) lies 1.0 further, 100 steps
    r = [math.exp(-0.01 * s) for s in (10, 20, 30, 40, 50, 60)]
    assert steps_to_reach(r, 60, math.exp(-1.6)) == pytest.approx(100.0)
    # with noise around the line: the least-squares rate, still about 100 steps
    wobble = [v * math.exp(e) for v, e in zip(r, (0.01, -0.01, 0.01, -0.01, 0.01, -0.01))]
    assert steps_to_reach(wobble, 60, math.exp(-1.6)) == pytest.approx(100.0, rel=0.1)
    # a metric that can be negative is read linearly: -0.01 per step, 1.0 more to go
    lin = [0.5 - 0.01 * s for s in (10, 20, 30, 40, 50, 60)]
    assert steps_to_reach(lin, 60, -0.1 - 1.0) == pytest.approx(100.0)
    assert steps_to_reach(r, 60, 1.0) == 0.0  # already below the target
    # no significant descent (flat, noisy, rising, diverged): it never gets there
    assert math.isinf(steps_to_reach([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 60, 0.5))
    assert math.isinf(steps_to_reach([0.6, 0.5, 0.55, 0.45, 0.6, 0.48], 60, 0.3))
    assert math.isinf(steps_to_reach([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 60, 0.3))
    assert math.isinf(steps_to_reach([1.0, 0.9, 0.8, 0.7, 0.6, math.inf], 60, 0.5))


def _arm(radius: float, readings: list[float]) -> Arm:
    m = nn.Linear(1, 1)
    a = Arm(Candidate("per_sample_clip", radius), m, torch.optim.SGD(m.parameters(), lr=0.1), None, torch.get_rng_state())
    a.readings.append(readings)
    return a


def test_matched_progress_prefers_the_smallest_radius_that_catches_up_in_time():
    steps = [10, 20, 30, 40, 50, 60]
    lead = _arm(9.0, [0.5, 0.4, 0.3, 0.25, 0.2, 0.2])  # level: the last third, 0.2
    larger = _arm(30.0, [0.6, 0.5, 0.4, 0.3, 0.25, 0.21])
    # falls 1% per step to exp(-0.6) = 0.55: 0.2 after (-0.6 - log 0.2)/0.01 ~ 101 steps
    small = _arm(1.5, [math.exp(-0.01 * s) for s in steps])
    need = (-0.6 - math.log(0.2)) / 0.01
    # a still smaller radius, falling at a tenth of the rate: about 1550 steps
    tiny = _arm(0.3, [math.exp(-0.001 * s) for s in steps])
    arms = [lead, larger, small, tiny]
    got = matched_progress(arms, 60, horizon=1000)
    assert got is not None and got[0] is small and got[1] == pytest.approx(need)
    # with a long enough run the smallest radius that catches up within half of it wins
    got = matched_progress(arms, 60, horizon=10_000)
    assert got is not None and got[0] is tiny
    # too short a run: the leader stays (None), and a larger radius is never preferred
    assert matched_progress(arms, 60, horizon=2 * int(need) - 10) is None
    assert matched_progress([lead, larger], 60, horizon=10**9) is None
    # a smaller radius whose curve does not fall steadily is not preferred either
    noisy = _arm(1.5, [0.6, 0.5, 0.55, 0.45, 0.6, 0.48])
    assert matched_progress([lead, noisy], 60, horizon=10**9) is None


def test_radii_leave_out_spikes():
    h = [1.0, 1.1, 0.9, 1.0, 50.0, 1.05, 0.95, 2.9, 1.0, 40.0]
    kept = without_spikes(h)
    assert kept.tolist() == [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 2.9, 1.0]
    # the median of the readings before it, not including earlier spikes' weight beyond one vote
    assert without_spikes([1.0, 1.0, 1.0, 3.0]).tolist() == [1.0, 1.0, 1.0]
    assert without_spikes([float("nan"), 1.0, 2.0]).tolist() == [1.0, 2.0]


def test_heavy_tails_pick_the_radius_that_catches_up():
    # Cauchy per-sample noise: whenever the matched-progress rule picks a radius over the
    # rung's leader, it is a smaller one that reaches the leader's level within half the run
    d = _diagnose("cauchy")
    chosen = d.candidates[0]
    if chosen["caught_up"] is not None:
        lead = next(c for c in d.candidates if c["label"] == chosen["caught_up"]["leader"])
        assert chosen["radius"] < lead["radius"]
        assert chosen["caught_up"]["steps_to_leader_level"] <= 0.5 * chosen["caught_up"]["steps_left"]
        assert "matched progress" in d.confidence_reason
