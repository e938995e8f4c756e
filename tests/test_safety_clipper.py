"""The Clipper's finite check guards the update itself, and nonfinite= chooses what a
non-finite sample does. Oracles: the state before the step (bit-identical after a skip), and
the same step on the batch without the non-finite samples."""

from __future__ import annotations

import copy
import logging
from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import robustclip as rc
from robustclip import thresholds as th
from robustclip._transform import GradientTransform, StepContext
from robustclip.per_sample.rules._terms import DenseTerm, OuterTerm, scale_rows, zero_dropped

from ._spawn import spawn


class RiggedState(NamedTuple):
    calls: torch.Tensor


class Rigged(GradientTransform[RiggedState]):
    """Counts its calls in its state; multiplies the gradient by NaN when ``poison`` is set."""

    name = "rigged"

    def __init__(self) -> None:
        self.poison = False

    def init(self, params):
        return RiggedState(torch.zeros((), dtype=torch.float64))

    def update(self, grads, state, ctx: StepContext):
        if self.poison:
            torch._foreach_mul_(grads, float("nan"))
        return grads, RiggedState(state.calls + 1)


def model_and_data(seed: int = 0, n: int = 8):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(seed + 1)
    xs = torch.randn(4, n, 5, generator=g)
    ys = torch.randint(0, 3, (4, n), generator=g)
    return model, xs, ys


def snapshot(model: nn.Module, opt: torch.optim.Optimizer, clipper: rc.Clipper) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "params": [p.detach().clone() for p in model.parameters()],
            "opt": opt.state_dict(),
            "clipper": clipper.state_dict(),
        }
    )


def assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Bit-identical (NaN equal to NaN), through dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a, b.view(-1).view(torch.uint8) if b.numel() else b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
}


# -- 1. the check guards the update, not only the input ----------------------------------------------


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_a_transform_that_makes_the_gradient_nan_skips_and_restores_every_state(opt_name, caplog):
    model, xs, ys = model_and_data()
    opt = OPTIMIZERS[opt_name](model.parameters())
    rigged = Rigged()
    method = rc.chain(
        rc.per_sample_clip(th.EMA(), engine="loop"),
        rc.spectral_clip(th.EMA(), rank=2, clip_vectors=th.EMA()),
        rc.clip_by_global_norm(th.ZClip(warmup=1)),
        rigged,
    )
    clipper = rc.Clipper(model, opt, method)
    for s in range(2):
        clipper.backward(F.cross_entropy(model(xs[s]), ys[s], reduction="none"))
        assert not clipper.step().skipped
    before = snapshot(model, opt, clipper)
    # the same step without the poison changes the parameters and every state (so the test
    # would see a state that leaked)
    probe = copy.deepcopy((model, opt, clipper.state_dict()))
    rigged.poison = True
    clipper.backward(F.cross_entropy(model(xs[2]), ys[2], reduction="none"))
    with caplog.at_level(logging.WARNING, logger="robustclip"):
        info = clipper.step()
    assert info.skipped and clipper.skipped_steps == 1
    assert "made a finite gradient non-finite" in caplog.text
    assert all(p.grad is None for p in model.parameters())
    after = snapshot(model, opt, clipper)
    after["clipper"]["steps"] -= 1
    after["clipper"]["skipped_steps"] -= 1
    assert_identical(before, after)
    # the probe: an unpoisoned step moves every state
    pmodel, popt, pstate = probe
    pclip = rc.Clipper(pmodel, popt, rc.chain(
        rc.per_sample_clip(th.EMA(), engine="loop"),
        rc.spectral_clip(th.EMA(), rank=2, clip_vectors=th.EMA()),
        rc.clip_by_global_norm(th.ZClip(warmup=1)),
        Rigged(),
    ))
    pclip.load_state_dict(pstate)
    pclip.backward(F.cross_entropy(pmodel(xs[2]), ys[2], reduction="none"))
    assert not pclip.step().skipped
    moved = pclip.state_dict()
    for k in ("estimator", "transforms"):
        with pytest.raises(AssertionError):
            assert_identical(before["clipper"][k], moved[k])
    # the next clean step trains on
    rigged.poison = False
    clipper.backward(F.cross_entropy(model(xs[3]), ys[3], reduction="none"))
    assert not clipper.step().skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_chain_runs_within_the_one_host_read(monkeypatch):
    """A NaN input skips too, and the check reads the device once (Tensor.__bool__ or tolist)."""
    model, xs, ys = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = rc.Clipper(model, opt, rc.chain(rc.mean(), rc.clip_by_global_norm(1.0), rc.normalize()))
    reads = []
    orig = torch.Tensor.__bool__

    def counting(self):
        reads.append(1)
        return orig(self)

    clipper.backward(F.cross_entropy(model(xs[0]), ys[0], reduction="none"))
    monkeypatch.setattr(torch.Tensor, "__bool__", counting)
    info = clipper.step()
    monkeypatch.undo()
    assert not info.skipped and len(reads) == 1


def test_a_finite_gradient_above_the_float32_maximum_is_clipped_not_skipped():
    lin = nn.Linear(1000, 1, bias=False)
    nn.init.zeros_(lin.weight)  # the loss is 0, its gradient 3e37 in every entry
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    clipper = rc.Clipper(lin, opt, rc.clip_by_global_norm(1.0))
    x = torch.full((4, 1000), 3e37)
    w0 = lin.weight.detach().clone()
    clipper.backward(lin(x).reshape(-1))  # gradient 3e37 in each of 1000 entries: norm 9.5e38
    info = clipper.step()
    assert not info.skipped
    step = (w0 - lin.weight.detach()).double()
    assert torch.isfinite(step).all()
    assert float(step.norm()) == pytest.approx(1.0, rel=1e-5)


# -- 2. nonfinite= --------------------------------------------------------------------------------------


def test_bad_nonfinite_arguments_are_refused():
    model, _, _ = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        rc.Clipper(model, opt, rc.mean(), nonfinite="ignore")
    with pytest.raises(ValueError, match="needs the finite check"):
        rc.Clipper(model, opt, rc.mean(), nonfinite="drop_sample", check_finite=False)
    with pytest.raises(ValueError, match="cannot be combined with a GradScaler"):
        rc.Clipper(model, opt, rc.mean(), nonfinite="drop_sample", scaler=torch.amp.GradScaler("cpu"))


def poisoned(xs: torch.Tensor, bad: list[int]) -> torch.Tensor:
    xs = xs.clone()
    xs[bad, 0] = float("nan")
    return xs


class BlowUp(torch.autograd.Function):
    """Identity forward; the backward turns the gradient of the marked samples into NaN, but
    only where it is non-zero: the NaN stays in those samples (a backward through the batch
    for another sample sees a zero there), which is what a per-sample engine can drop."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(bad)
        return h.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (bad,) = ctx.saved_tensors
        rows = bad & (g != 0).any(-1)
        return torch.where(rows[:, None], float("nan"), g), None


class Blowy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, bad: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        if bad is not None:
            h = BlowUp.apply(h, bad)
        return self.fc3(torch.tanh(self.fc2(h)))


def blowy_and_data(seed: int = 0):
    torch.manual_seed(seed)
    _, xs, ys = model_and_data(seed)
    return Blowy(), xs, ys


def train_step(method, model, x, y, bad=None, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with rc.Clipper(model, opt, method, **kw) as clipper:
        out = model(x) if bad is None else model(x, bad)
        clipper.backward(F.cross_entropy(out, y, reduction="none"))
        info = clipper.step()
    return info, [p.detach().clone() for p in model.parameters()]


def mask(n: int, bad: list[int]) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[bad] = True
    return m


@pytest.mark.parametrize("make", [
    lambda: rc.per_sample_clip(0.3, engine="loop"),
    lambda: rc.per_sample_clip(0.3, per_layer=True, engine="loop"),
    lambda: rc.per_sample_normalize(0.1, engine="loop"),
    lambda: rc.chain(rc.per_sample_clip(th.EMA(), engine="loop"), rc.clip_by_global_norm(0.2)),
], ids=["clip", "per_layer", "normalize", "ema_chain"])
def test_drop_sample_equals_the_batch_without_the_nan_sample_loop_engine(make):
    model, xs, ys = blowy_and_data()
    ref_model = copy.deepcopy(model)
    keep = [0, 1, 3, 4, 5, 7]
    with torch.no_grad():
        ref_loss = float(F.cross_entropy(model(xs[0][keep]), ys[0][keep]))
    info, got = train_step(make(), model, xs[0], ys[0], mask(8, [2, 6]), nonfinite="drop_sample")
    _, ref = train_step(make(), ref_model, xs[0][keep], ys[0][keep])
    assert not info.skipped
    assert info.num_samples == 6 and float(info.dropped) == 2
    assert info.dropped_mask.tolist() == [i not in keep for i in range(8)]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert float(info.loss) == pytest.approx(ref_loss, rel=1e-6)


def test_drop_sample_drops_a_nan_loss_whose_gradient_is_finite():
    model, xs, ys = model_and_data()
    ref_model = copy.deepcopy(model)
    weights = torch.ones(8)
    weights[5] = float("nan")  # the loss is NaN, its gradient with respect to the model is not

    def losses_of(m, x, y, w):
        ce = F.cross_entropy(m(x), y, reduction="none")
        return ce + (w - w.detach()) * 0 + torch.where(torch.isnan(w), w, 0.0).detach()

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with rc.Clipper(model, opt, rc.per_sample_clip(0.3, engine="loop"), nonfinite="drop_sample") as c:
        c.backward(losses_of(model, xs[0], ys[0], weights))
        info = c.step()
    keep = [i for i in range(8) if i != 5]
    _, ref = train_step(rc.per_sample_clip(0.3, engine="loop"), ref_model, xs[0][keep], ys[0][keep])
    assert not info.skipped and float(info.dropped) == 1
    for a, b in zip(model.parameters(), ref):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "make,units", [(lambda: rc.micro_batch_clip(0.3), 1), (rc.mean, 4)], ids=["micro_batch", "mean"]
)
@pytest.mark.parametrize("with_transform", [False, True])
def test_drop_sample_drops_the_micro_batch_for_micro_batch_clip_and_mean(make, units, with_transform):
    model, xs, ys = model_and_data(n=12)
    ref_model = copy.deepcopy(model)
    method = rc.chain(make(), rc.clip_by_global_norm(0.25)) if with_transform else make()
    ref_method = rc.chain(make(), rc.clip_by_global_norm(0.25)) if with_transform else make()
    x = poisoned(xs[0], [5])
    micro = [(x[i : i + 4], ys[0][i : i + 4]) for i in (0, 4, 8)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with rc.Clipper(model, opt, method, nonfinite="drop_sample") as c:
        for mx, my in micro:
            c.backward(F.cross_entropy(model(mx), my, reduction="none"))
        info = c.step()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    with rc.Clipper(ref_model, ref_opt, ref_method) as c:
        for mx, my in (micro[0], micro[2]):
            c.backward(F.cross_entropy(ref_model(mx), my, reduction="none"))
        c.step()
    assert not info.skipped
    assert info.dropped_mask.tolist() == [False, True, False]
    assert float(info.dropped) == units and info.num_samples == 2 * units
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_drop_sample_skips_when_nothing_finite_remains():
    model, xs, ys = model_and_data()
    before = [p.detach().clone() for p in model.parameters()]
    info, after = train_step(
        rc.per_sample_clip(0.3, engine="loop"), model, poisoned(xs[0], list(range(8))), ys[0], nonfinite="drop_sample"
    )
    assert info.skipped and float(info.dropped) == 8 and info.num_samples == 0
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_raise_names_the_step_and_the_samples_and_restores_the_state():
    model, xs, ys = model_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    clipper = rc.Clipper(model, opt, rc.per_sample_clip(th.EMA(), engine="loop"), nonfinite="raise")
    clipper.backward(F.cross_entropy(model(xs[0]), ys[0], reduction="none"))
    clipper.step()
    before = snapshot(model, opt, clipper)
    clipper.backward(F.cross_entropy(model(xs[1]), ys[1], reduction="none"))
    clipper.backward(F.cross_entropy(model(poisoned(xs[2], [3, 6])), ys[2], reduction="none"))
    with pytest.raises(FloatingPointError, match=r"at step 1, non-finite loss \(backward\(\) call 1: losses of samples \[3, 6\]"):
        clipper.step()
    after = snapshot(model, opt, clipper)
    after["clipper"]["steps"] -= 1
    after["clipper"]["skipped_steps"] -= 1
    assert_identical(before, after)


def test_drop_sample_with_the_hook_engine_is_never_silently_wrong():
    """The hook engine multiplies each sample's factors by its weight, so a dropped sample that
    holds NaN (NaN * 0) still makes the sum NaN: the check then skips the step; where it does
    not, the update must be the one without the sample."""
    model, xs, ys = blowy_and_data()
    ref_model = copy.deepcopy(model)
    keep = [0, 1, 3, 4, 5, 6, 7]
    before = [p.detach().clone() for p in model.parameters()]
    info, got = train_step(rc.per_sample_clip(0.3, engine="hooks"), model, xs[0], ys[0], mask(8, [2]), nonfinite="drop_sample")
    _, ref = train_step(rc.per_sample_clip(0.3, engine="hooks"), ref_model, xs[0][keep], ys[0][keep])
    assert float(info.dropped) == 1
    expect = before if info.skipped else ref
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_drop_sample_equals_the_batch_without_the_nan_sample_hook_engine():
    model, xs, ys = blowy_and_data()
    ref_model = copy.deepcopy(model)
    keep = [0, 1, 3, 4, 5, 6, 7]
    info, got = train_step(rc.per_sample_clip(0.3, engine="hooks"), model, xs[0], ys[0], mask(8, [2]), nonfinite="drop_sample")
    _, ref = train_step(rc.per_sample_clip(0.3, engine="hooks"), ref_model, xs[0][keep], ys[0][keep])
    assert not info.skipped and float(info.dropped) == 1
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class Opaque(nn.Module):
    """A layer without a per-sample rule: the hook engine replays it per sample (fallback)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + 0.1 * self.scale.square()


class BlowyOpaque(Blowy):
    def __init__(self) -> None:
        super().__init__()
        self.opaque = Opaque(7)

    def forward(self, x: torch.Tensor, bad: torch.Tensor | None = None) -> torch.Tensor:
        h = self.opaque(torch.tanh(self.fc1(x)))
        if bad is not None:  # NaN in the output gradient of the module without a rule
            h = BlowUp.apply(h, bad)
        return self.fc3(torch.tanh(self.fc2(h)))


@pytest.mark.filterwarnings("ignore::robustclip.per_sample.PerSampleFallbackWarning")
@pytest.mark.parametrize("budget", [2**26, 16], ids=["kept", "second_replay"])
def test_drop_sample_equals_the_batch_without_the_nan_sample_hook_engine_fallback_module(budget):
    """The NaN reaches the output gradient of a module without a rule, whose per-sample
    gradients the hook engine replays with torch.func (kept, or replayed again in chunks for
    the weighted sum when they do not fit the budget)."""
    torch.manual_seed(0)
    model = BlowyOpaque()
    _, xs, ys = model_and_data(0)
    ref_model = copy.deepcopy(model)
    keep = [0, 1, 3, 4, 5, 6, 7]
    method = rc.per_sample_clip(0.3, engine="hooks", max_chunk_elements=budget)
    info, got = train_step(method, model, xs[0], ys[0], mask(8, [2]), nonfinite="drop_sample")
    _, ref = train_step(rc.per_sample_clip(0.3, engine="hooks"), ref_model, xs[0][keep], ys[0][keep])
    assert not info.skipped and float(info.dropped) == 1
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore::robustclip.per_sample.PerSampleFallbackWarning")
def test_drop_sample_equals_the_batch_without_the_nan_sample_vmap_engine():
    model, xs, ys = blowy_and_data()
    ref_model = copy.deepcopy(model)
    keep = [0, 1, 3, 4, 5, 6, 7]
    info, got = train_step(rc.per_sample_clip(0.3, engine="vmap"), model, xs[0], ys[0], mask(8, [2]), nonfinite="drop_sample")
    _, ref = train_step(rc.per_sample_clip(0.3, engine="vmap"), ref_model, xs[0][keep], ys[0][keep])
    assert not info.skipped and float(info.dropped) == 1
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
def test_a_nan_input_is_dropped_by_the_hook_and_vmap_engines(engine):
    """The hook engine's per-sample factors and vmap's per-sample recomputation keep a NaN
    input in its own sample (unlike the loop engine's backward through the batch): the step
    trains on the others. vmap's check that the recomputation reproduces the batch's output
    ignores the non-finite sample instead of blaming sample interaction."""
    model, xs, ys = model_and_data()
    ref_model = copy.deepcopy(model)
    keep = [0, 1, 3, 4, 5, 6, 7]
    info, got = train_step(
        rc.per_sample_clip(0.3, engine=engine), model, poisoned(xs[0], [2]), ys[0], nonfinite="drop_sample"
    )
    _, ref = train_step(rc.per_sample_clip(0.3, engine=engine), ref_model, xs[0][keep], ys[0][keep])
    assert not info.skipped and float(info.dropped) == 1
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_nan_input_poisons_the_loop_engines_batched_backward_and_the_step_is_skipped():
    """A NaN input makes every sample's gradient NaN in a backward through the batch (the
    weight gradient sums 0 * NaN over the batch): nothing finite remains, and the step is
    skipped rather than trained on."""
    model, xs, ys = model_and_data()
    before = [p.detach().clone() for p in model.parameters()]
    info, after = train_step(
        rc.per_sample_clip(0.3, engine="loop"), model, poisoned(xs[0], [2]), ys[0], nonfinite="drop_sample"
    )
    assert info.skipped and float(info.dropped) == 8
    for a, b in zip(before, after):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::robustclip.per_sample.PerSampleFallbackWarning")
@pytest.mark.parametrize(
    "engine,opaque,budget",
    [("hooks", False, 2**26), ("hooks", True, 2**26), ("hooks", True, 16), ("vmap", False, 2**26)],
    ids=["hooks", "hooks_fallback_kept", "hooks_fallback_second_replay", "vmap"],
)
def test_skip_step_sees_a_nan_sample_the_engine_did_not_zero(engine, opaque, budget):
    """Only ``drop_sample`` zeroes the rows of a sample of weight 0 in the weighted sums. Under
    the default ``skip_step`` a NaN sample's weight is NaN and its rows are left as they are:
    the accumulated gradient holds the NaN, the post-chain check sees it, and the step is
    skipped with parameters, optimizer and clipper state bit-identical. With ``drop_sample``
    the same batch gives a finite gradient."""
    torch.manual_seed(0)
    model = BlowyOpaque() if opaque else Blowy()
    _, xs, ys = model_and_data(0)
    drop_model = copy.deepcopy(model)
    method = rc.per_sample_clip(0.3, engine=engine, max_chunk_elements=budget)
    opt = OPTIMIZERS["sgd_momentum"](model.parameters())
    with rc.Clipper(model, opt, method) as clipper:
        clipper.backward(F.cross_entropy(model(xs[1]), ys[1], reduction="none"))
        clipper.step()  # momentum and clipper state that a skipped step must keep
        before = snapshot(model, opt, clipper)
        clipper.backward(F.cross_entropy(model(xs[0], mask(8, [2])), ys[0], reduction="none"))
        assert any(not bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        info = clipper.step()
        after = snapshot(model, opt, clipper)
    assert info.skipped
    after["clipper"]["steps"] -= 1
    after["clipper"]["skipped_steps"] -= 1
    assert_identical(before, after)
    drop_opt = torch.optim.SGD(drop_model.parameters(), lr=0.1)
    drop_method = rc.per_sample_clip(0.3, engine=engine, max_chunk_elements=budget)
    with rc.Clipper(drop_model, drop_opt, drop_method, nonfinite="drop_sample") as clipper:
        clipper.backward(F.cross_entropy(drop_model(xs[0], mask(8, [2])), ys[0], reduction="none"))
        assert all(bool(torch.isfinite(p.grad).all()) for p in drop_model.parameters())
        assert not clipper.step().skipped


def test_rows_of_weight_zero_are_zeroed_only_when_dropping():
    """The weighted sums of the hook engine's terms: a sample of weight 0 holding NaN adds
    exactly 0 with ``drop``; without it the factors are used as they are (no extra pass), and
    0 * NaN stays NaN."""
    g = torch.randn(4, 3, 2)
    g[1, 0, 0] = float("nan")
    w = torch.tensor([0.5, 0.0, 1.0, 0.25])
    assert zero_dropped(g, w, False) is g
    torch.testing.assert_close(scale_rows(g[[0, 2, 3]], w[[0, 2, 3]], False), g[[0, 2, 3]] * w[[0, 2, 3], None, None])
    ref = torch.einsum("b,bij->ij", w[[0, 2, 3]], g[[0, 2, 3]])
    for term in (DenseTerm(g), OuterTerm(g[:, None, :, :1], g[:, None, :, 1:], 1, torch.Size([1, 1]), g.dtype)):
        kept = term.weighted(w, drop=True)
        assert bool(torch.isfinite(kept).all())
        assert not bool(torch.isfinite(term.weighted(w)).all())
        if isinstance(term, DenseTerm):
            torch.testing.assert_close(kept, ref)
        out = torch.zeros_like(kept)
        term.add_weighted_(out, w, drop=True)
        torch.testing.assert_close(out, kept)


# -- DDP: every process makes the same decision ----------------------------------------------------------

WORLD = 2


def _ddp_data():
    model, xs, ys = blowy_and_data()
    return model.double(), xs[0].double(), ys[0]


def _ddp_worker(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for case, bad in (("one", [5]), ("all_of_rank1", [4, 5, 6, 7])):
            model, x, y = _ddp_data()
            m = mask(8, bad)
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
            with rc.Clipper(ddp, opt, rc.per_sample_clip(0.3, engine="loop"), nonfinite="drop_sample") as c:
                sl = slice(rank * 4, rank * 4 + 4)
                c.backward(F.cross_entropy(ddp(x[sl], m[sl]), y[sl], reduction="none"))
                info = c.step()
            out[case] = {
                "params": [p.detach().clone() for p in model.parameters()],
                "skipped": torch.tensor(info.skipped),
                "dropped": info.dropped.detach().clone(),
                "num": torch.tensor(info.num_samples),
            }
        torch.save(out, f"{result_file}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_drop_sample_under_ddp_every_process_decides_the_same(tmp_path):
    result = tmp_path / "ddp"
    spawn(_ddp_worker, lambda a: (str(tmp_path / f"init{a}"), str(result)), WORLD)
    got = [torch.load(f"{result}.{r}", weights_only=True) for r in range(WORLD)]
    for case, bad in (("one", [5]), ("all_of_rank1", [4, 5, 6, 7])):
        keep = [i for i in range(8) if i not in bad]
        model, x, y = _ddp_data()
        _, ref = train_step(rc.per_sample_clip(0.3, engine="loop"), model, x[keep], y[keep])
        for r in range(WORLD):
            g = got[r][case]
            assert not bool(g["skipped"]) and float(g["dropped"]) == len(bad) and int(g["num"]) == len(keep)
            for a, b in zip(g["params"], ref):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
