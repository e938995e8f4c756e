"""Numerical safety of norms, clip coefficients, thresholds and estimators: every finite gradient
gets a finite, accurate norm (no overflow above 1.8e19, no underflow below 1e-19 in float32), no
adaptive radius reaches 0, and every clipped contribution stays within its radius, in float32,
bfloat16, float16 and float64. Oracles: float64 norms of the gradients scaled by a power of ten
on the host, and per-sample gradients from autograd one sample at a time."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import robustclip as rc
from robustclip import _math
from robustclip import thresholds as th
from robustclip._estimators import PerSample, per_sample_clip_sum
from robustclip._transform import StepContext
from robustclip.per_sample import ParamLayout
from robustclip.per_sample._engine import ROW_BY_ROW, row_sq_norms

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
#: what each dtype's multiply can cost a clipped vector's norm: the coefficient is rounded to
#: the gradient's dtype and each product once more (2 * 2^-(mantissa bits + 1)), plus the norm's
#: own float32 rounding; float32 and float64 get the issue's 1e-5
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}
#: how far below min(||g||, c) a clipped norm may fall: the coefficient is rounded toward zero
#: (up to one ulp, 2^-7 in bfloat16), then each product to nearest
LOW_TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}


def exact_norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm in float64 on the host, scaled by the largest entry first, so that it holds
    for any float64 input."""
    xs = [t.detach().double().reshape(-1) for t in tensors]
    m = max((float(x.abs().max()) for x in xs if x.numel()), default=0.0)
    if m == 0:
        return 0.0
    return m * math.sqrt(sum(float((x / m).pow(2).sum()) for x in xs))


def magnitudes(dtype: torch.dtype) -> list[float]:
    if dtype == torch.float16:
        return [1e-3, 1.0, 1e2]  # float16 holds norms from 6e-8 to 65504
    return [1e-30, 1e-25, 1e-20, 1.0, 1e20, 1e25, 1e30]


def gradients_of(mag: float, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 40), (40,), (40000,), (3, 5, 7)]
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * mag).to(dtype) for s in shapes]


def apply(transform, grads):
    grads = [g.clone() for g in grads]
    params = [torch.zeros_like(g) for g in grads]
    state = transform.init(params)
    ctx = StepContext(params, [f"p{i}" for i in range(len(grads))], modules=[None] * len(grads))
    return transform.update(grads, state, ctx)


# -- norms ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_global_and_tensor_norms_are_finite_and_accurate_at_every_magnitude(dtype):
    for mag in magnitudes(dtype):
        gs = gradients_of(mag, dtype)
        ref = exact_norm(gs)
        rel = 1e-12 if dtype == torch.float64 else 1e-5
        got = _math.global_norm(gs)
        assert math.isfinite(float(got)) and float(got) == pytest.approx(ref, rel=rel, abs=0), (mag, float(got), ref)
        for n, g in zip(_math.tensor_norms(gs), gs):
            assert float(n) == pytest.approx(exact_norm([g]), rel=rel, abs=0), mag
        # the path taken on devices where no value is read on the host, and the scaled path
        # taken without float64 (MPS), computed here on the CPU
        wide = float(_math.combine_norms(torch.stack(_math._wide_norms(gs))))
        assert wide == pytest.approx(ref, rel=rel, abs=0)
        scaled = float(_math.combine_norms(torch.stack([_math._scaled_norm(g, torch.float32) for g in gs])))
        assert scaled == pytest.approx(ref, rel=1e-5 if dtype != torch.float64 else 1e-6, abs=0)


def test_float64_norms_hold_beyond_the_float64_square_range():
    g = torch.full((1000,), 1e200, dtype=torch.float64)  # squares overflow float64
    assert float(_math.global_norm([g])) == pytest.approx(1e200 * math.sqrt(1000), rel=1e-12)
    g = torch.full((1000,), 1e-200, dtype=torch.float64)  # squares underflow float64
    assert float(_math.tensor_norms([g])[0]) == pytest.approx(1e-200 * math.sqrt(1000), rel=1e-12, abs=0)


def test_norms_above_the_float32_maximum_are_finite_when_asked_for_wide():
    g = torch.full((10000,), 3e38)  # every entry finite, the norm 3e40
    assert math.isinf(float(_math.global_norm([g])))  # a float32 reading cannot hold it
    assert float(_math.global_norm([g], dtype=torch.float64)) == pytest.approx(3e40, rel=1e-5, abs=0)
    assert float(_math.tensor_norms([g], dtype=torch.float64)[0]) == pytest.approx(3e40, rel=1e-5, abs=0)


def test_non_finite_inputs_give_non_finite_norms():
    nan, inf = torch.tensor([1.0, math.nan]), torch.tensor([1e30, math.inf])
    assert math.isnan(float(_math.global_norm([nan])))
    assert math.isinf(float(_math.global_norm([inf])))
    assert math.isnan(float(_math.tensor_norms([nan])[0]))
    assert math.isinf(float(_math.combine_norms(torch.stack(_math._wide_norms([inf])))))
    assert math.isnan(float(_math._scaled_norm(nan, torch.float32)))
    assert float(_math.global_norm([torch.zeros(5)])) == 0.0


def test_clip_coefficient_at_zero_norm_and_zero_radius_is_one():
    zero = torch.zeros(())
    assert float(_math.clip_coefficient(zero, zero)) == 1.0
    assert float(_math.clip_coefficient(torch.tensor(2.0), zero)) == 0.0
    assert float(_math.clip_coefficient(torch.tensor(4.0), torch.tensor(1.0))) == 0.25
    assert math.isnan(float(_math.clip_coefficient(torch.tensor(math.nan), torch.tensor(1.0))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_coefficients_are_never_rounded_up_into_the_gradient_dtype(dtype):
    gen = torch.Generator().manual_seed(0)
    coefs = torch.cat([torch.rand(2000, generator=gen, dtype=torch.float64), 10.0 ** -torch.linspace(0, 44, 500, dtype=torch.float64)])
    got = _math.coefficient_as(coefs, dtype)
    assert got.dtype == dtype and bool((got.double() <= coefs).all())
    normal = coefs >= float(torch.finfo(dtype).tiny)
    assert bool((got.double()[normal] >= coefs[normal] * (1 - 2 * float(torch.finfo(dtype).eps))).all())


# -- transforms and estimators: an exploding gradient is clipped, a tiny one too ----------------


@pytest.mark.parametrize("transform", [rc.clip_by_global_norm, rc.clip_by_tensor_norm])
@pytest.mark.parametrize("mag,c", [(1e25, 1.0), (1e-25, 1e-30)])
def test_norm_clipping_clips_huge_and_tiny_gradients_to_the_radius(transform, mag, c):
    gs = gradients_of(mag, torch.float32)
    out, _ = apply(transform(c), gs)
    parts = [out] if transform is rc.clip_by_global_norm else [[o] for o in out]
    for p in parts:
        assert exact_norm(p) == pytest.approx(c, rel=1e-5, abs=0)


def linear_problem(dtype=torch.float32, n=6, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=gen))
    x = torch.randn(n, d, generator=gen).to(dtype)
    return model, x


@pytest.mark.parametrize("scale", [1e25, 1e-25])
def test_micro_batch_clip_clips_an_exploding_gradient_instead_of_dropping_it(scale):
    model, x = linear_problem()
    c = 1.0 if scale > 1 else 1e-30
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    clipper = rc.Clipper(model, opt, rc.micro_batch_clip(c))
    clipper.backward((model(x).squeeze(1) * scale).mean())
    info = clipper.step()
    assert not info.skipped
    step = model.weight.grad.double()  # the gradient the optimizer stepped with
    assert float(step.norm()) == pytest.approx(c, rel=1e-5, abs=0)
    # the direction of the mean gradient x.mean(0), as with any radius
    d = x.mean(0).double()
    torch.testing.assert_close(step[0] / step.norm(), d / d.norm(), rtol=1e-5, atol=1e-6)
    clipper.close()


def test_per_sample_clip_clips_an_exploding_sample_instead_of_dropping_it():
    model, x = linear_problem()
    scales = torch.tensor([1.0, 1e25, 1.0, 1e-25, 1.0, 1.0])
    c = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    clipper = rc.Clipper(model, opt, rc.per_sample_clip(c, engine="loop"))
    clipper.backward(model(x).squeeze(1) * scales)
    info = clipper.step()
    assert not info.skipped
    # oracle: g_i = scale_i x_i, clipped in float64 one sample at a time
    g = scales.double()[:, None] * x.double()
    w = torch.clamp(c / g.norm(dim=1), max=1.0)
    ref = (w[:, None] * g).mean(0)
    torch.testing.assert_close(model.weight.grad.double()[0], ref, rtol=1e-5, atol=0)
    norms = info.per_sample_norms.double()
    torch.testing.assert_close(norms, g.norm(dim=1), rtol=1e-5, atol=0)
    clipper.close()


def test_per_sample_weights_from_float32_float64_and_scaled_squared_norms():
    est = PerSample("clip", 1.0)
    radii = torch.tensor([[1.0]], dtype=torch.float64)
    norms = torch.tensor([[2.0, 0.5, 1e25, 1e-25]], dtype=torch.float64)
    ref = torch.tensor([[0.5, 1.0, 1e-25, 1.0]], dtype=torch.float64)
    # float64 squares: exact where float32 ones are not
    torch.testing.assert_close(est.weights(norms.square(), radii), ref, rtol=1e-12, atol=0)
    # scaled: the engine divides each sample's gradient by a scale and reports that too
    scale = torch.tensor([[4.0, 1.0, 1e24, 1e-26]], dtype=torch.float64)
    sq = (norms / scale).square().float()
    torch.testing.assert_close(est.weights(sq, radii, scale.float()), ref, rtol=1e-6, atol=0)
    # per layer: each group its own norm; flat: the norm over the groups, without overflow
    groups = torch.tensor([[3e30, 1.0], [4e30, 0.0]], dtype=torch.float64)
    flat = PerSample("clip", 1.0).weights_from_norms(groups, radii)
    torch.testing.assert_close(flat, torch.tensor([[2e-31, 1.0]], dtype=torch.float64), rtol=1e-12, atol=0)
    layered = PerSample("clip", 1.0, per_layer=True).weights_from_norms(groups, radii.expand(2, 1))
    torch.testing.assert_close(layered, torch.tensor([[1 / 3e30, 1.0], [1 / 4e30, 1.0]], dtype=torch.float64))


def test_an_infinite_squared_norm_is_never_a_silent_zero_weight():
    """A float32 squared norm overflows for a finite gradient of norm 2e19: the true weight is
    then unknown, and a weight of 0 would drop the sample without a word. NaN makes the step
    skip; where the weight does not depend on the norm (no clipping) it stays 1."""
    sq = torch.tensor([[math.inf, 4.0]])
    w = PerSample("clip", 1.0).weights(sq, torch.tensor([[1.0]], dtype=torch.float64))
    assert math.isnan(float(w[0, 0])) and float(w[0, 1]) == 0.5
    w = PerSample("clip", None).weights(sq, torch.tensor([[math.inf]], dtype=torch.float64))
    assert w.tolist() == [[1.0, 1.0]]
    w = PerSample("normalize", gamma=0.0).weights(sq, None)
    assert math.isnan(float(w[0, 0])) and float(w[0, 1]) == 0.5


# -- thresholds: zero gradients never make a radius 0 --------------------------------------------

ADAPTIVE = {
    "ema": lambda: th.EMA(),
    "window": lambda: th.WindowQuantile(q=0.5, window=10),
    "autoclip": lambda: th.AutoClip(q=0.5),
    "zclip": lambda: th.ZClip(warmup=1),
}


@pytest.mark.parametrize("rule", sorted(ADAPTIVE))
def test_zero_and_non_finite_observations_leave_the_radius_alone(rule):
    t = ADAPTIVE[rule]()
    s = t.init("cpu")
    for values in ([0.0], [0.0, 0.0, 0.0], [math.nan, 0.0], [math.inf]):
        s = t.observe(s, torch.tensor(values))
        assert math.isinf(float(t.value(s)))  # nothing observed yet: no clipping, never 0
    s = t.observe(s, torch.tensor([0.0, 2.0, 0.0]))
    assert float(t.value(s)) == pytest.approx(2.0, rel=1e-6)
    s = t.observe(s, torch.tensor([0.0]))
    assert float(t.value(s)) == pytest.approx(2.0, rel=1e-6)
    # the tiniest positive values floor the radius above 0
    s = t.observe(t.init("cpu"), torch.tensor([1e-45]))
    assert float(t.value(s)) > 0


@pytest.mark.parametrize("rule", sorted(ADAPTIVE))
@pytest.mark.parametrize("where", ["global", "tensor", "micro_batch", "per_sample"])
def test_all_ignored_targets_at_the_start_never_make_the_parameters_nan(rule, where):
    """A batch whose targets are all ``ignore_index`` has all-zero gradients; with an adaptive
    radius that observed them, the radius became 0 and the next zero step computed 0/0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = {
        "global": lambda: rc.clip_by_global_norm(ADAPTIVE[rule]()),
        "tensor": lambda: rc.clip_by_tensor_norm(ADAPTIVE[rule]()),
        "micro_batch": lambda: rc.micro_batch_clip(ADAPTIVE[rule]()),
        "per_sample": lambda: rc.per_sample_clip(ADAPTIVE[rule](), engine="loop"),
    }[where]()
    clipper = rc.Clipper(model, opt, method)
    x = torch.randn(6, 4)
    for step in range(6):
        y = torch.full((6,), -100) if step < 3 else torch.randint(0, 3, (6,))
        losses = F.cross_entropy(model(x), y, reduction="none", ignore_index=-100)
        clipper.backward(losses)
        info = clipper.step()
        assert not info.skipped
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), step
    clipper.close()


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)
        self.unused = nn.Linear(6, 6)

    def forward(self, x):
        return self.head(torch.tanh(self.used(x)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: rc.clip_by_tensor_norm(th.EMA()),
        lambda: rc.spectral_clip(th.EMA(), rank=None, clip_vectors=th.EMA()),
        lambda: rc.chain(rc.mean(), rc.spectral_clip(1.0, rank=2, clip_vectors=th.EMA())),
    ],
    ids=["tensor_norm", "spectral_exact", "spectral_randomized"],
)
def test_allow_unused_parameter_stays_finite_with_adaptive_radii(make):
    torch.manual_seed(0)
    model = WithUnused()
    unused = [p.detach().clone() for p in model.unused.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = rc.Clipper(model, opt, make(), allow_unused=True)
    for _ in range(4):
        x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
        clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
        info = clipper.step()
        assert not info.skipped
        for p, u in zip(model.unused.parameters(), unused):
            assert torch.equal(p.detach(), u)  # zero gradient, plain SGD: unchanged, not NaN
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    clipper.close()


# -- the mean estimator under float16 -----------------------------------------------------------


def test_mean_backward_does_not_overflow_float16_where_a_mean_loss_backward_does_not():
    """float16 autocast: each sample's weight gradient is ~1000 (fine in float16), the sum
    over 128 samples 128000 (> 65504). The sum-of-losses backward overflowed in the float16
    weight-gradient product; the mean's does not, and the float32 parameter gradient holds
    the sum."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = 1000.0 + torch.rand(128, 4)
    ref_model = nn.Linear(4, 1)
    ref_model.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.float16):
        ref_loss = ref_model(x).float().mean()
    ref_loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in ref_model.parameters())

    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    clipper = rc.Clipper(model, opt, rc.mean())
    with torch.autocast("cpu", dtype=torch.float16):
        losses = model(x).float().squeeze(1)
    clipper.backward(losses)
    info = clipper.step()
    assert not info.skipped
    for p, q in zip(model.parameters(), ref_model.parameters()):
        expected = q.detach() - 1e-6 * q.grad
        torch.testing.assert_close(p.detach(), expected, rtol=1e-3, atol=1e-6)
    clipper.close()


def test_mean_with_bfloat16_parameters_scales_by_the_exact_count():
    """257 is not a bfloat16 number (256 or 258): scaling the mean gradient by a rounded count
    would bias every step by 0.4%."""
    torch.manual_seed(0)
    model = nn.Linear(64, 8).to(torch.bfloat16)
    x = torch.rand(257, 64).to(torch.bfloat16)
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), rc.mean())
    clipper.backward(model(x).float().sum(1))
    clipper.step()
    ref = x.double().mean(0).expand(8, 64)  # d/dW of sum_j (W x + b)_j, averaged over samples
    got = model.weight.grad.double()
    ratio = float((got * ref).sum() / (ref * ref).sum())
    assert abs(ratio - 1) < 1e-3, ratio
    clipper.close()


def test_mean_in_float32_matches_the_sum_within_rounding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    ref.load_state_dict(model.state_dict())
    xs, ys = [torch.randn(6, 5), torch.randn(3, 5)], [torch.randint(0, 3, (6,)), torch.randint(0, 3, (3,))]
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.mean())
    for x, y in zip(xs, ys):
        clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
        F.cross_entropy(ref(x), y, reduction="sum").backward()
    clipper.step()
    with torch.no_grad():
        for q in ref.parameters():
            q -= 0.1 * q.grad / 9
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    clipper.close()


# -- validation of float arguments ----------------------------------------------------------------

BAD_FLOATS = [math.nan, math.inf, -math.inf]
FACTORIES = {
    "per_sample_clip": lambda v: rc.per_sample_clip(v),
    "micro_batch_clip": lambda v: rc.micro_batch_clip(v),
    "clip_by_global_norm": lambda v: rc.clip_by_global_norm(v),
    "clip_by_tensor_norm": lambda v: rc.clip_by_tensor_norm(v),
    "spectral_clip.tau": lambda v: rc.spectral_clip(v),
    "spectral_clip.clip_vectors": lambda v: rc.spectral_clip(1.0, clip_vectors=v),
    "per_sample_normalize.gamma": lambda v: rc.per_sample_normalize(v),
    "l0l1_warmup.l0": lambda v: rc.l0l1_warmup(v, 1.0),
    "l0l1_warmup.l1": lambda v: rc.l0l1_warmup(1.0, v),
    "l0l1_warmup.f_star": lambda v: rc.l0l1_warmup(1.0, 1.0, f_star=v),
    "EMA.beta": lambda v: th.EMA(beta=v),
    "EMA.scale": lambda v: th.EMA(scale=v),
    "WindowQuantile.q": lambda v: th.WindowQuantile(q=v),
    "WindowQuantile.scale": lambda v: th.WindowQuantile(scale=v),
    "AutoClip.q": lambda v: th.AutoClip(q=v),
    "AutoClip.scale": lambda v: th.AutoClip(scale=v),
    "ZClip.z": lambda v: th.ZClip(z=v),
    "ZClip.alpha": lambda v: th.ZClip(alpha=v),
    "Constant": lambda v: th.Constant(v),
}
#: arguments that must also be > 0 (or >= 0, where 0 is meaningful)
POSITIVE = {
    "per_sample_clip", "micro_batch_clip", "clip_by_global_norm", "clip_by_tensor_norm",
    "spectral_clip.tau", "spectral_clip.clip_vectors", "EMA.scale", "WindowQuantile.scale",
    "AutoClip.scale", "ZClip.z", "Constant",
}
NONNEGATIVE = {"per_sample_normalize.gamma", "l0l1_warmup.l0", "l0l1_warmup.l1"}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_float_argument_refuses_nan_and_inf_with_a_hint(name):
    for bad in BAD_FLOATS:
        with pytest.raises(ValueError) as err:
            FACTORIES[name](bad)
        msg = str(err.value)
        # says which argument and what to pass instead
        assert name.split(".")[-1] in msg or "max_norm" in msg, msg
        assert any(w in msg for w in ("finite", "pass", "must", "lie in")), msg
    if name in POSITIVE:
        for bad in (0.0, -1.0):
            with pytest.raises(ValueError):
                FACTORIES[name](bad)
    if name in NONNEGATIVE:
        with pytest.raises(ValueError):
            FACTORIES[name](-1.0)
    with pytest.raises(TypeError):
        FACTORIES[name]("1.0")


def test_l0l1_warmup_with_nan_f_star_is_refused_before_any_step():
    with pytest.raises(ValueError, match="f_star.*pass the optimal loss value"):
        rc.l0l1_warmup(1, 1, f_star=math.nan)
    assert rc.l0l1_warmup(1, 1, f_star=-0.5).f_star == -0.5


# -- fuzz: every contribution within its radius, every result finite ----------------------------

FUZZ_DTYPES = [torch.float32, torch.bfloat16, torch.float64]
exponents = st.floats(min_value=-30.0, max_value=30.0, allow_nan=False)


def _check_within(norm: float, ref_norm: float, c: float, dtype: torch.dtype, coef_ok: bool) -> None:
    assert math.isfinite(norm)
    assert norm <= c * (1 + TOL[dtype]), (norm, c)
    if coef_ok:  # the coefficient and the result are normal numbers of the dtype: not dropped
        assert norm >= min(ref_norm, c) * (1 - LOW_TOL[dtype]) - 1e-300, (norm, ref_norm, c)


def _fuzz(**magnitudes: st.SearchStrategy[Any]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """100 hypothesis examples of a fuzzed dtype, a radius exponent, a seed and ``magnitudes``."""

    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        cases = given(dtype=st.sampled_from(FUZZ_DTYPES), radius=exponents, seed=st.integers(0, 2**16), **magnitudes)
        return settings(max_examples=100, deadline=None)(cases(test))

    return wrap


def _normal(dtype: torch.dtype, *values: float) -> bool:
    tiny = float(torch.finfo(dtype).tiny)
    return all(v >= tiny * 2**30 for v in values)


@_fuzz(mags=st.lists(exponents, min_size=1, max_size=4))
def test_fuzz_per_sample_clip_contributions(dtype, mags, radius, seed):
    """Each sample owns one row of the weight, so row i of the summed gradient is exactly
    sample i's contribution ``w_i g_i`` as the estimator and the loop engine computed it."""
    n, d = len(mags), 3
    gen = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.randn(n, d, generator=gen).to(dtype))
    model = nn.Module()
    model.weight = weight
    x = torch.randn(n, d, generator=gen).to(dtype)
    scale = torch.tensor([10.0**m for m in mags], dtype=torch.float64).to(dtype)
    losses = (weight * x).sum(1) * scale
    c = 10.0**radius
    est = rc.per_sample_clip(c, engine="loop")
    layout = ParamLayout.build(model, [weight])
    engine = est.make_engine(model, layout)
    out: list[torch.Tensor | None] = [None]
    contrib, _ = est.contribute(losses, est.init(layout, torch.device("cpu")), layout, engine, out)
    assert out[0] is not None
    for i in range(n):
        g_i = torch.autograd.grad(losses[i], weight, retain_graph=True)[0]
        ref = exact_norm([g_i])
        got = exact_norm([out[0][i]])
        coef = min(1.0, c / ref) if ref > 0 else 1.0
        _check_within(got, ref, c, dtype, _normal(dtype, coef, min(ref, c) / d))
    assert bool(torch.isfinite(contrib.per_sample_norms).all())


@_fuzz(mags=st.lists(exponents, min_size=1, max_size=3))
def test_fuzz_micro_batch_clip_contributions(dtype, mags, radius, seed):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 4, generator=gen))
    c = 10.0**radius
    est = rc.micro_batch_clip(c)
    layout = ParamLayout.build(model, list(model.parameters()))
    state = est.init(layout, torch.device("cpu"))
    for m in mags:  # one micro-batch each: its contribution alone in `out`
        x = torch.randn(3, 4, generator=gen).to(dtype)
        loss = (model(x).squeeze(1) * torch.tensor(10.0**m, dtype=torch.float64).to(dtype)).mean()
        g = torch.autograd.grad(loss, model.weight, retain_graph=True)[0]
        out: list[torch.Tensor | None] = [None]
        contrib, state = est.contribute(loss, state, layout, None, out)
        ref = exact_norm([g])
        coef = min(1.0, c / ref) if ref > 0 else 1.0
        assert out[0] is not None
        _check_within(exact_norm([out[0]]), ref, c, dtype, _normal(dtype, coef, min(ref, c) / 4))
        assert bool(torch.isfinite(contrib.micro_batch_norm).all())


@_fuzz(mag=exponents)
def test_fuzz_clip_by_global_norm(dtype, mag, radius, seed):
    gen = torch.Generator().manual_seed(seed)
    gs = [(torch.randn(s, generator=gen, dtype=torch.float64) * 10.0**mag).to(dtype) for s in ((7, 5), (5,), (300,))]
    c = 10.0**radius
    out, state = apply(rc.clip_by_global_norm(c), gs)
    ref = exact_norm(gs)
    coef = min(1.0, c / ref) if ref > 0 else 1.0
    _check_within(exact_norm(out), ref, c, dtype, _normal(dtype, coef, min(ref, c) / 20))
    assert all(bool(torch.isfinite(o).all()) for o in out)
    assert math.isfinite(float(state.norm))


# -- the hook and vmap engines: per-sample norms at every magnitude ------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", [7, ROW_BY_ROW + 3], ids=["short", "long"])
def test_engine_row_norms_are_accurate_at_every_magnitude(dtype, length):
    """The per-sample squared norms the vmap and hook engines take of materialised gradients:
    float64 accumulation (short rows at once, long rows one by one) or, for float64 gradients,
    scaling by each row's largest entry; a zero row is 0 and a NaN row NaN."""
    mags = [1e-30, 1e-25, 1.0, 1e25, 1e30] if dtype != torch.float16 else [1e-6, 1.0, 3e3]
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(length, generator=gen, dtype=torch.float64) * m for m in mags]
    g = torch.stack(rows + [torch.zeros(length, dtype=torch.float64)]).to(dtype)
    got = row_sq_norms(g)
    assert got.dtype == torch.float64
    for i in range(len(mags)):
        assert float(got[i]) == pytest.approx(exact_norm([g[i]]) ** 2, rel=1e-12, abs=0), mags[i]
    assert float(got[-1]) == 0.0
    g[1, 2] = math.nan
    assert math.isnan(float(row_sq_norms(g)[1]))


class OwnRows(nn.Module):
    """Sample ``i``'s loss reads only row ``i`` of every parameter, so row ``i`` of the summed
    gradient is exactly sample ``i``'s contribution ``w_i g_i``. ``kind``: a Linear over ``t``
    positions (Gram norms, kept or chunked per-sample gradients, a bias), or an Embedding whose
    sample ``i`` looks up token ``i`` at every position (the sort-based index norm)."""

    def __init__(self, kind: str, n: int, d: int, gen: torch.Generator) -> None:
        super().__init__()
        self.kind = kind
        self.layer = nn.Linear(d, n) if kind == "linear" else nn.Embedding(n, d)
        with torch.no_grad():
            for p in self.layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def own_rows_losses(kind: str, out: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    n = out.shape[0]
    if kind == "linear":  # out (n, t, n): sample i reads output unit i
        return out[torch.arange(n), :, torch.arange(n)].sum(1)
    return (out * r).sum((1, 2))  # out (n, t, d): sample i's row of the table, weighted


def _fuzz_engine(engine_name: str, kind: str, dtype, mags, radius, seed, t, strategy) -> None:
    n, d = len(mags), 3
    gen = torch.Generator().manual_seed(seed)
    model = OwnRows(kind, n, d, gen).to(dtype)
    if kind == "linear":
        x = torch.randn(n, t, d, generator=gen).to(dtype)
        r = None
    else:
        x = torch.arange(n)[:, None].expand(n, t).contiguous()
        r = torch.randn(n, t, d, generator=gen).to(dtype)
    scale = torch.tensor([10.0**m for m in mags], dtype=torch.float64).to(dtype)
    c = 10.0**radius
    params = list(model.parameters())
    est = rc.per_sample_clip(c, engine=engine_name)
    layout = ParamLayout.build(model, params)
    engine = est.make_engine(model, layout)
    if strategy is not None:
        engine._plan_override = strategy
    engine.attach()
    try:
        losses = own_rows_losses(kind, model(x), r) * scale
        refs = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(n)]
        out: list[torch.Tensor | None] = [None] * len(params)
        contrib, _ = est.contribute(losses, est.init(layout, torch.device("cpu")), layout, engine, out)
    finally:
        engine.detach()
    assert all(o is not None and bool(torch.isfinite(o).all()) for o in out)
    norms = contrib.per_sample_norms
    assert norms is not None and bool(torch.isfinite(norms).all())
    for i in range(n):
        ref = exact_norm([g[i] for g in refs[i]])
        got = exact_norm([o[i] for o in out if o is not None])
        coef = min(1.0, c / ref) if ref > 0 else 1.0
        _check_within(got, ref, c, dtype, _normal(dtype, coef, min(ref, c) / (2 * d)))
        # the norm itself: accurate, not inf or 0 (bf16, fp16: the engine's own per-sample
        # gradient rounds differently from autograd's)
        rel = {torch.bfloat16: 2e-2, torch.float16: 2e-3}.get(dtype, 1e-5)
        assert float(norms[i]) == pytest.approx(ref, rel=rel, abs=0), (i, float(norms[i]), ref)


@_fuzz(
    mags=st.lists(exponents, min_size=1, max_size=4),
    kind=st.sampled_from(["linear", "embedding"]),
    t=st.integers(1, 3),
    strategy=st.sampled_from([None, "keep", "ghost", "chunks", "index"]),
)
def test_fuzz_hook_engine_per_sample_clip_contributions(dtype, mags, radius, seed, kind, t, strategy):
    """The hook engine through each norm strategy (Gram of scaled factors, kept or chunked
    per-sample gradients, the sort-based embedding norm): every contribution within its radius,
    every norm finite and accurate, from 1e-30 to 1e30."""
    _fuzz_engine("hooks", kind, dtype, mags, radius, seed, t, strategy)


@_fuzz(mags=st.lists(exponents, min_size=1, max_size=4), kind=st.sampled_from(["linear", "embedding"]), t=st.integers(1, 3))
def test_fuzz_vmap_engine_per_sample_clip_contributions(dtype, mags, radius, seed, kind, t):
    _fuzz_engine("vmap", kind, dtype, mags, radius, seed, t, None)


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_float16_per_sample_norms_span_the_float16_range(engine, kind):
    """float16 gradients near its maximum (65504: squares overflow float16) and near its
    smallest subnormal (6e-8: squares underflow it) get accurate norms on both engines."""
    for mags in ([4.0, 0.0, -4.0], [-6.0, -5.0, 0.0]):
        strategies = [None, "keep", "ghost", "chunks"] if engine == "hooks" else [None]
        for strategy in strategies:
            _fuzz_engine(engine, kind, torch.float16, mags, 0.0, 0, 2, strategy)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # the second convolution's patch Gram is taken pixels first (ConvTerm.v_gram), the
        # first's from unfolded patches
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 3, 5, padding=2)
        self.fc = nn.Linear(3 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).flatten(1))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0][:, -1])


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))


class TiedLM(nn.Module):
    """An embedding tied to the output layer: one parameter, an index term and a dense term."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x)))).mean(1)


def _model_case(name: str, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        x = torch.randn(n, 5, generator=gen)
    elif name == "conv":
        model, x = ConvNet(), torch.randn(n, 2, 8, 8, generator=gen)
    elif name == "lstm":
        model, x = LSTMNet(), torch.randn(n, 4, 4, generator=gen)
    elif name == "attention":
        model, x = AttentionNet(), torch.randn(n, 3, 6, generator=gen)
    else:
        model, x = TiedLM(), torch.randint(0, 11, (n, 4), generator=gen)
    y = torch.randint(0, 11 if name == "tied_lm" else 3, (n,), generator=gen)
    return model, x, y


def _clipped_grads(model, x, y, scales, c, engine, strategy=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with rc.Clipper(model, opt, rc.per_sample_clip(c, engine=engine)) as clipper:
        if strategy is not None:
            clipper.engine._plan_override = strategy
        clipper.backward(F.cross_entropy(model(x), y, reduction="none") * scales)
        info = clipper.step()
    return info, [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("strategy", [None, "keep", "ghost", "chunks"])
@pytest.mark.parametrize("name", ["mlp", "conv", "lstm", "attention", "tied_lm"])
@pytest.mark.parametrize(
    "scales,c",
    [([1.0, 1e25, 1.0, 3.0, 1.0, 1e-25], 0.5), ([1e-25, 3e-25, 1e-24, 1e-25, 2e-25, 1e-26], 1e-30)],
    ids=["exploding", "vanishing"],
)
def test_hook_engine_clips_an_exploding_sample_instead_of_dropping_it(name, strategy, scales, c):
    """A float32 sample gradient of norm ~1e25 is clipped to ``c`` (its float32 squared norm
    would be inf, its weight 0: dropped), and gradients of norm ~1e-25 are clipped to 1e-30
    (their float32 squares underflow to 0: not clipped), on every path of the hook engine,
    against the float64 loop engine."""
    n = len(scales)
    model, x, y = _model_case(name, n)
    ref_model = copy.deepcopy(model).double()
    info, got = _clipped_grads(model, x, y, torch.tensor(scales), c, "hooks", strategy)
    ref_x = x.double() if x.is_floating_point() else x
    ref_info, ref = _clipped_grads(ref_model, ref_x, y, torch.tensor(scales, dtype=torch.float64), c, "loop")
    assert not info.skipped
    assert bool(torch.isfinite(info.per_sample_norms).all())
    torch.testing.assert_close(info.per_sample_norms.double(), ref_info.per_sample_norms, rtol=1e-4, atol=0)
    total = math.sqrt(sum(float(r.pow(2).sum()) for r in ref))
    assert total > 0
    for g, r in zip(got, ref):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * total)
    if scales[1] == 1e25:  # the exploding sample's contribution is c/n of the mean: kept
        assert float(info.per_sample_norms[1]) > 1e24


@pytest.mark.filterwarnings("ignore::robustclip.per_sample.PerSampleFallbackWarning")
@pytest.mark.parametrize("name", ["mlp", "conv", "lstm", "attention", "tied_lm"])
def test_vmap_engine_clips_an_exploding_sample_instead_of_dropping_it(name):
    scales = [1.0, 1e25, 1.0, 3.0, 1.0, 1e-25]
    model, x, y = _model_case(name, len(scales))
    ref_model = copy.deepcopy(model).double()
    info, got = _clipped_grads(model, x, y, torch.tensor(scales), 0.5, "vmap")
    ref_x = x.double() if x.is_floating_point() else x
    ref_info, ref = _clipped_grads(ref_model, ref_x, y, torch.tensor(scales, dtype=torch.float64), 0.5, "loop")
    assert not info.skipped
    torch.testing.assert_close(info.per_sample_norms.double(), ref_info.per_sample_norms, rtol=1e-4, atol=0)
    total = math.sqrt(sum(float(r.pow(2).sum()) for r in ref))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * total)


@pytest.mark.parametrize("engine", ["hooks", "vmap", "loop"])
def test_a_norm_above_the_float32_maximum_is_clipped_not_counted_as_dropped(engine: str) -> None:
    """A float32 gradient can have a norm above 3.4e38 (100 entries of 1e38: 1e39): its float32
    reading is inf, but its weight comes from the float64 norm and it is clipped and included.
    Under drop_sample it must count as clipped, not as dropped (a dropped count of 1 would also
    divide the sum by B - 1). Oracle: per_sample_clip_sum in float64."""
    torch.manual_seed(0)
    b, d, c = 4, 100, 1.0
    x = torch.randn(b, d)
    x[1] = 1e38  # sample 1: gradient x_1 of norm 1e39
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with rc.Clipper(model, opt, rc.per_sample_clip(c, engine=engine), nonfinite="drop_sample") as clipper:
        clipper.backward(model(x).squeeze(1))
        info = clipper.step()
    assert not info.skipped
    assert float(info.dropped) == 0 and info.num_samples == b
    assert info.dropped_mask is not None and not bool(info.dropped_mask.any())
    assert math.isinf(float(info.per_sample_norms[1]))  # the float32 reading cannot hold it
    ref_sum, num_clipped = per_sample_clip_sum([[x[i : i + 1].double()] for i in range(b)], c)
    assert float(info.clipped_fraction) == pytest.approx(num_clipped / b)
    torch.testing.assert_close(model.weight.grad.double(), ref_sum[0] / b, rtol=1e-5, atol=1e-6)
