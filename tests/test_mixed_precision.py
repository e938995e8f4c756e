"""Mixed precision: float16 with a GradScaler (on the CPU) and bfloat16 autocast on every
engine. Oracles: the same steps in float32 without loss scaling, and in float64 with the loop
engine; a clip taken in scaled units would be off by the scale (65536), far outside the
tolerances here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustclip as rc
from robustclip.per_sample import ENGINES

METHODS = {
    "per_sample_clip": (lambda: rc.per_sample_clip(0.05), 1),
    "per_sample_clip_loop": (lambda: rc.per_sample_clip(0.05, engine="loop"), 1),
    "micro_batch_clip": (lambda: rc.micro_batch_clip(0.05), 2),
    "clip_by_global_norm": (lambda: rc.clip_by_global_norm(0.05), 2),
}


def problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(seed + 1)
    xs = torch.randn(3, 8, 12, generator=g)
    ys = torch.randint(0, 4, (3, 8), generator=g)
    return model, xs, ys


def run(model, xs, ys, method, micro, *, autocast=None, scaler=None, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    infos = []
    with rc.Clipper(model, opt, method, scaler=scaler) as clipper:
        for s in range(steps):
            for x, y in zip(xs[s].chunk(micro), ys[s].chunk(micro)):
                with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                    out = model(x)
                clipper.backward(F.cross_entropy(out.float(), y, reduction="none"))
            infos.append(clipper.step())
    return infos, opt


def rel_err(got: nn.Module, ref: nn.Module, start: nn.Module) -> float:
    num = sum(float((a.detach().double() - b.detach().double()).pow(2).sum()) for a, b in zip(got.parameters(), ref.parameters()))
    den = sum(float((b.detach().double() - s.detach().double()).pow(2).sum()) for b, s in zip(ref.parameters(), start.parameters()))
    return (num / den) ** 0.5


@pytest.mark.parametrize("name", sorted(METHODS))
def test_float16_with_grad_scaler_matches_float32(name):
    make, micro = METHODS[name]
    model, xs, ys = problem()
    start, ref = copy.deepcopy(model), copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu")
    infos, _ = run(model, xs, ys, make(), micro, autocast=torch.float16, scaler=scaler)
    ref_infos, _ = run(ref, xs, ys, make(), micro)
    assert not any(i.skipped for i in infos)
    # clipping is active (the test would not see a clip in scaled units otherwise)
    ref_clipped = ref_infos[0].clipped_fraction if ref_infos[0].clipped_fraction is not None else ref_infos[0].transforms["clip_by_global_norm"]["clipped"]
    assert float(ref_clipped) > 0
    assert rel_err(model, ref, start) < 1e-2, rel_err(model, ref, start)
    # per-sample and micro-batch readings are in unscaled units
    for got, want in zip(infos, ref_infos):
        assert float(got.grad_norm) == pytest.approx(float(want.grad_norm), rel=2e-2)
        for a, b in ((got.per_sample_norms, want.per_sample_norms), (got.micro_batch_norms, want.micro_batch_norms)):
            if b is not None:
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-4)
    assert scaler.get_scale() == 65536.0  # no overflow: updated once per step, not lowered
    assert int(scaler._growth_tracker) == 3


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_scaled_overflow_skips_the_step_and_lowers_the_scale(name):
    make, micro = METHODS[name]
    model, xs, ys = problem()
    start = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # float16 gradients overflow
    infos, opt = run(model, xs, ys, make(), micro, autocast=torch.float16, scaler=scaler, steps=1)
    assert infos[0].skipped
    assert scaler.get_scale() == 2.0**39
    for a, b in zip(model.parameters(), start.parameters()):
        assert torch.equal(a, b)
    assert not opt.state  # momentum never started


def test_the_scaler_needs_the_optimizer_and_a_method_that_takes_scaled_losses():
    model, _, _ = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs the optimizer"):
        rc.Clipper(model, None, rc.mean(), scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="GradScaler"):
        rc.Clipper(model, opt, rc.mean(), scaler=object())
    with pytest.raises(ValueError, match="check_finite=True"):
        rc.Clipper(model, opt, rc.mean(), scaler=torch.amp.GradScaler("cpu"), check_finite=False)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_bfloat16_autocast_on_every_engine_matches_float64(engine):
    model, xs, ys = problem()
    start, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    infos, _ = run(model, xs, ys, rc.per_sample_clip(0.05, engine=engine), 1, autocast=torch.bfloat16)
    ref_infos, _ = run(ref, xs.double(), ys, rc.per_sample_clip(0.05, engine="loop"), 1)
    assert not any(i.skipped for i in infos)
    assert float(ref_infos[0].clipped_fraction) > 0
    assert rel_err(model, ref, start) < 3e-2, rel_err(model, ref, start)
