"""The hook engine on whole models, against the reference loop (one backward per sample).

Every comparison runs the same model (a deep copy, same weights) through the reference
``LoopEngine`` and the ``HookEngine`` and asks for equal clipped sums and per-sample norms,
relative error <= 1e-5 in float32, directly and through ``rc.Clipper``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustclip as rc
from robustclip.experiments.models import MLP, CharGPT, SmallCNN, sequence_losses
from robustclip.per_sample import (
    HookEngine,
    LoopEngine,
    ParamLayout,
    PerSampleFallbackWarning,
    VmapEngine,
)
from robustclip.per_sample._hooks import plan as plan_module

RTOL = 1e-5


# -- models -------------------------------------------------------------------------------------------


class GatedCustom(nn.Module):
    """A layer no rule covers: its own weight used through a matmul, and a gate."""

    def __init__(self, d: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)
        self.gate = nn.Parameter(torch.ones(d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(torch.tanh(x @ self.w)) * self.gate


class Mixed(nn.Module):
    """Conv1d, GroupNorm, RMSNorm, an Embedding with padding_idx tied to the output head, an
    unsupported custom layer, and bare parameters (a layer scale and a bias)."""

    def __init__(self, vocab: int = 13, d: int = 12, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.gn = nn.GroupNorm(3, d)
        self.rms = nn.RMSNorm(d)
        self.custom = GatedCustom(d, dropout)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.beta = nn.Parameter(torch.linspace(-0.1, 0.1, d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        h = self.gn(self.conv(h.transpose(1, 2))).transpose(1, 2)
        h = self.custom(self.rms(h)) * self.gamma + self.beta
        return self.head(h)


class SharedTwice(nn.Module):
    """One Linear called twice in a forward pass: its per-sample gradient sums both calls."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.relu(self.lin(x)))))


class BareMatmul(nn.Module):
    """A bare weight used through a matmul: no rule models it, the whole model falls back."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.w = nn.Parameter(torch.randn(4, 3) * 0.5)

    def forward(self, x):
        return torch.tanh(self.lin(x)) @ self.w


class SeqFirst(nn.Module):
    """Keeps the batch in dimension 1 around a Linear (like batch_first=False layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):  # x: (B, T, 4)
        return self.lin(torch.tanh(x.transpose(0, 1)) * x.transpose(0, 1).mean(1, keepdim=True)).transpose(0, 1)


class InPlaceAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        y = self.lin(x)
        x.mul_(2.0)  # changes the input the layer saw
        return y


def mlp_case(inplace=False, dropout=0.0):
    model = MLP([10, 8, 8, 4], inplace=inplace)
    if dropout:
        model.insert(2, nn.Dropout(dropout))
    x, y = torch.randn(7, 10), torch.randint(0, 4, (7,))
    return model, x, lambda out: F.cross_entropy(out, y, reduction="none")


def cnn_case(norm=None):
    model = SmallCNN(channels=(4, 8), hidden=16, num_classes=5, image_size=16, norm=norm)
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 5, (5,))
    return model, x, lambda out: F.cross_entropy(out, y, reduction="none")


def gpt_case(tied=False):
    model = CharGPT(vocab=11, block_size=8, d=16, layers=2, heads=2, tied=tied)
    x, y = torch.randint(0, 11, (5, 8)), torch.randint(0, 11, (5, 8))
    return model, x, lambda out: sequence_losses(out, y)


def mixed_case(dropout=0.0):
    model = Mixed(dropout=dropout)
    x = torch.randint(0, 13, (6, 7))
    x[0, :3] = 0  # padding tokens
    y = torch.randint(0, 13, (6, 7))
    return model, x, lambda out: sequence_losses(out, y)


def shared_case():
    model = SharedTwice()
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    return model, x, lambda out: F.cross_entropy(out, y, reduction="none")


# -- helpers ----------------------------------------------------------------------------------------


def clip_weights(c):
    def weight_fn(sq):
        return torch.clamp(c / sq.sum(0, keepdim=True).sqrt().clamp_min(1e-30), max=1.0)

    return weight_fn


def run_engine(engine_cls, model, x, losses_fn, weight_fn, seed=0, steps=1, fresh=False, max_chunk_elements=None):
    """``fresh``: the engine gets ``None`` entries (no gradient yet) and writes new tensors,
    instead of adding into zeros."""
    params = [p for p in model.parameters() if p.requires_grad]
    engine = engine_cls(model, ParamLayout.build(model, params))
    if max_chunk_elements is not None:
        engine.max_chunk_elements = max_chunk_elements
    engine.attach()
    outs, norms = [], []
    try:
        for s in range(steps):
            torch.manual_seed(seed + s)  # the same dropout masks for every engine
            out = [None] * len(params) if fresh else [torch.zeros_like(p) for p in params]
            norms.append(engine.accumulate(losses_fn(model(x)), weight_fn, out))
            outs.append(out)
    finally:
        engine.detach()
    return outs, norms, engine


def assert_rel_close(got, ref, rtol=RTOL, what=""):
    """Per tensor: ``||g - r|| <= rtol ||r|| + 0.1 rtol ||ref||`` (the second term absorbs the
    rounding noise of gradients that are zero in exact arithmetic, e.g. a bias before a norm)."""
    total = sum(float(r.double().pow(2).sum()) for r in ref) ** 0.5
    for g, r in zip(got, ref):
        err = float((g.double() - r.double()).norm())
        scale = float(r.double().norm())
        assert err <= rtol * scale + 0.1 * rtol * total + 1e-30, (
            f"{what}: relative error {err / max(scale, 1e-30):.2e} (tensor norm {scale:.2e}, all {total:.2e})"
        )


def compare_engines(case, c=None, steps=1, **kw):
    model, x, losses_fn = case
    ref_model = copy.deepcopy(model)
    if c is None:  # clip about half of the samples
        _, n, _ = run_engine(LoopEngine, copy.deepcopy(model), x, losses_fn, clip_weights(1e30))
        c = float(n[0].pow(2).sum(0).sqrt().median())
    wf = clip_weights(c)
    ref_out, ref_norms, _ = run_engine(LoopEngine, ref_model, x, losses_fn, wf, steps=steps)
    out, norms, engine = run_engine(HookEngine, model, x, losses_fn, wf, steps=steps, **kw)
    for s in range(steps):
        assert_rel_close(out[s], ref_out[s], what=f"clipped sum, step {s}")
        assert_rel_close([norms[s]], [ref_norms[s]], what=f"norms, step {s}")
        assert norms[s].dtype == torch.float32
    return engine


# -- whole models against the reference loop ---------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(mlp_case, id="mlp"),
        pytest.param(lambda: mlp_case(inplace=True), id="mlp-inplace-relu"),
        pytest.param(cnn_case, id="cnn"),
        pytest.param(lambda: cnn_case(norm="group"), id="cnn-groupnorm"),
        pytest.param(gpt_case, id="gpt"),
        pytest.param(lambda: gpt_case(tied=True), id="gpt-tied"),
        pytest.param(shared_case, id="module-called-twice"),
    ],
)
@pytest.mark.parametrize("fresh", [False, True], ids=["added", "new-gradients"])
def test_models_match_reference_loop(case, fresh):
    compare_engines(case(), steps=2, fresh=fresh)


def test_mixed_model_with_fallback_bare_and_tied_parameters():
    with pytest.warns(PerSampleFallbackWarning, match="'custom' \\(GatedCustom\\)"):
        compare_engines(mixed_case(), steps=2)


@pytest.mark.parametrize("fresh", [False, True], ids=["added", "new-gradients"])
def test_replayed_module_over_the_budget(fresh):
    """A fallback module whose per-sample gradients exceed the budget is replayed a second time
    for the weighted sums, every parameter of the module at once: it needs all their weights
    before the first sum, whichever parameter the engine takes first."""
    with pytest.warns(PerSampleFallbackWarning, match="custom"):
        compare_engines(mixed_case(), steps=2, fresh=fresh, max_chunk_elements=1)


class _ScaleByTied(nn.Module):
    """No rule covers it; its ``w`` is another layer's weight (tied), and it has a bias."""

    def __init__(self, w: nn.Parameter) -> None:
        super().__init__()
        self.w = w
        self.b = nn.Parameter(torch.randn(8) * 0.1)

    def forward(self, x):
        return torch.tanh(x * self.w.view(-1) + self.b)


@pytest.mark.parametrize("fresh", [False, True], ids=["added", "new-gradients"])
def test_replay_over_the_budget_with_a_tied_parameter(fresh):
    """The tied weight's per-sample gradients are kept (two calls share it), so the replay's
    second pass has no weight for it and must sum only the module's other parameters."""
    torch.manual_seed(0)
    lin = nn.Linear(1, 8)
    model = nn.Sequential(lin, _ScaleByTied(lin.weight), nn.Linear(8, 2))
    x = torch.randn(6, 1)
    case = (model, x, lambda out: out.pow(2).sum(1))
    with pytest.warns(PerSampleFallbackWarning):
        compare_engines(case, steps=2, fresh=fresh, max_chunk_elements=16)


def test_fallback_module_with_dropout_uses_the_real_graph():
    with pytest.warns(PerSampleFallbackWarning, match="custom"):
        compare_engines(mixed_case(dropout=0.3), steps=2)


def test_input_that_requires_grad():
    # the first layer's input is a leaf that requires grad (e.g. adversarial training)
    model, x, losses_fn = mlp_case()
    compare_engines((model, x.requires_grad_(True), losses_fn), steps=2)


def test_frozen_parameters_that_still_require_grad():
    # an embedding that requires grad but is not trained: no requested gradient lies below the
    # trained layer, whose output gradient must then be requested explicitly
    emb, lin = nn.Embedding(9, 5), nn.Linear(5, 3)
    model = nn.Sequential(emb, lin)
    x = torch.randint(0, 9, (6, 4))
    ref = copy.deepcopy(model)
    wf = clip_weights(0.05)
    results = []
    for cls, m in ((LoopEngine, ref), (HookEngine, model)):
        params = list(m[1].parameters())
        engine = cls(m, ParamLayout.build(m, params))
        engine.attach()
        out = [torch.zeros_like(p) for p in params]
        norms = engine.accumulate(m(x).pow(2).sum((1, 2)), wf, out)
        engine.detach()
        results.append((out, norms))
    assert_rel_close(results[1][0], results[0][0], what="clipped sum")
    assert_rel_close([results[1][1]], [results[0][1]], what="norms")


def test_dropout_in_the_model():
    compare_engines(mlp_case(dropout=0.4), steps=2)


def test_bare_parameter_in_a_matmul_falls_back_for_the_whole_model():
    model = BareMatmul()
    x, y = torch.randn(5, 5), torch.randint(0, 3, (5,))

    def losses_fn(out):
        return F.cross_entropy(out, y, reduction="none")

    with pytest.warns(PerSampleFallbackWarning, match="'w' is used directly by MmBackward0"):
        engine = compare_engines((model, x, losses_fn), steps=2)
    assert isinstance(engine._delegate, VmapEngine)


def test_unbatched_layer_output_used_by_a_matmul_falls_back():
    class Basis(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.register_buffer("basis", torch.eye(4))

        def forward(self, x):
            return x @ self.proj(self.basis)  # proj's output has no batch dimension

    model = Basis()
    x = torch.randn(6, 4)
    with pytest.warns(PerSampleFallbackWarning, match="without a batch dimension"):
        compare_engines((model, x, lambda out: out.pow(2).sum(1)), steps=2)


def test_batch_not_first_is_never_silently_wrong():
    # T != B: the Linear's output (T, B, 3) has the batch in dimension 1; a position-wise rule
    # takes it with the batch moved first (no fallback), and matches the loop
    model = SeqFirst()
    x = torch.randn(3, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        engine = compare_engines((model, x, lambda out: out.pow(2).sum((1, 2))), steps=2)
    assert engine._delegate is None
    # T == B: shapes cannot tell (taken as batch-first); the first-use check raises
    x = torch.randn(4, 4, 4)
    with pytest.raises(ValueError, match="disagrees with autograd"):
        compare_engines((SeqFirst(), x, lambda out: out.pow(2).sum((1, 2))))


def test_input_changed_in_place_after_the_layer_raises():
    # autograd would catch this only when computing the weight gradient, which the engine skips
    model = InPlaceAfter()
    params = list(model.parameters())
    engine = HookEngine(model, ParamLayout.build(model, params), verify=False)
    engine.attach()
    with pytest.raises(ValueError, match="modified in place"):
        engine.accumulate(model(torch.randn(3, 4)).pow(2).sum(1), clip_weights(1.0), [torch.zeros_like(p) for p in params])
    engine.detach()


def test_batchnorm_in_eval_mode_falls_back_per_module():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    model[1].eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(7, 5)
    with pytest.warns(PerSampleFallbackWarning, match="BatchNorm1d"):
        compare_engines((model, x, lambda out: out.pow(2).sum(1)), steps=2)


def test_bf16_autocast_norms_in_float32():
    model, x, losses_fn = gpt_case()
    ref = copy.deepcopy(model)

    def autocast_losses(m):
        def f(out):
            return losses_fn(out.float())

        return f

    wf = clip_weights(0.05)
    results = []
    for cls, m in ((LoopEngine, ref), (HookEngine, model)):
        params = list(m.parameters())
        engine = cls(m, ParamLayout.build(m, params))
        engine.attach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(x)
        out = [torch.zeros_like(p) for p in params]
        norms = engine.accumulate(autocast_losses(m)(logits), wf, out)
        engine.detach()
        results.append((out, norms))
    (ref_out, ref_norms), (out, norms) = results
    assert norms.dtype == torch.float32
    assert all(o.dtype == torch.float32 for o in out)
    assert_rel_close([norms], [ref_norms], rtol=3e-2, what="bf16 norms")
    assert_rel_close([torch.cat([o.flatten() for o in out])], [torch.cat([o.flatten() for o in ref_out])], rtol=5e-2, what="bf16 clipped sum")


# -- through the Clipper ---------------------------------------------------------------------------------


def clipper_grads(model, x, y, estimator, micro=1):
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), estimator)
    torch.manual_seed(0)
    for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
        clipper.backward(sequence_losses(model(xb), yb))
    info = clipper.step()
    clipper.close()
    return [p.grad.clone() for p in model.parameters()], info


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda engine: rc.per_sample_clip(0.05, engine=engine), id="clip"),
        pytest.param(lambda engine: rc.per_sample_clip(0.02, per_layer=True, engine=engine), id="per-layer"),
        pytest.param(lambda engine: rc.per_sample_normalize(0.01, engine=engine), id="normalize"),
        pytest.param(
            lambda engine: rc.chain(rc.per_sample_clip(0.05, engine=engine), rc.clip_by_global_norm(0.01)),
            id="chain",
        ),
    ],
)
@pytest.mark.parametrize("micro", [1, 2])
def test_clipper_with_hooks_matches_loop(make, micro):
    model = CharGPT(vocab=11, block_size=6, d=8, layers=1, heads=2, tied=True)
    x, y = torch.randint(0, 11, (6, 6)), torch.randint(0, 11, (6, 6))
    ref, ref_info = clipper_grads(copy.deepcopy(model), x, y, make("loop"), micro)
    got, info = clipper_grads(model, x, y, make("hooks"), micro)
    assert_rel_close(got, ref, what="clipper gradient")
    assert_rel_close([info.per_sample_norms], [ref_info.per_sample_norms], what="per-sample norms")
    assert torch.equal(info.clipped_fraction, ref_info.clipped_fraction)


def test_auto_engine_is_the_hook_engine():
    model, _, _ = mlp_case()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0))
    assert isinstance(clipper.engine, HookEngine)
    clipper.close()


def test_close_removes_the_hooks():
    model, x, losses_fn = mlp_case()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0, engine="hooks"))
    engine = clipper.engine
    clipper.close()
    model(x)
    assert engine.recorder.calls == [] and engine.recorder.handles == []
    assert all(not m._forward_hooks for m in model.modules())


def test_evaluation_passes_are_not_recorded():
    model, x, losses_fn = mlp_case()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), rc.per_sample_clip(1.0, engine="hooks"))
    with torch.no_grad():
        model(x)
    assert clipper.engine.recorder.calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipper.backward(losses_fn(model(x)))
        clipper.step()
    clipper.close()


# -- DDP ----------------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    from tests import _ddp_hooks_worker as w
    from tests._spawn import spawn

    def args_for(attempt):
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        return (2, str(out))

    spawn(w.worker, args_for, 2)
    out = sorted(tmp_path.glob("attempt*"))[-1]  # the attempt that finished
    model, xs, ys = w.make_problem()
    w.train(model, xs, ys, engine="loop")
    ref = [p.detach() for p in model.parameters()]
    for rank in range(2):
        got = torch.load(out / f"rank{rank}.pt")
        assert_rel_close(got, ref, what=f"rank {rank} parameters")


def test_forward_passes_without_backward_warn():
    model, x, _ = mlp_case()
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), rc.per_sample_clip(1.0, engine="hooks"))
    with pytest.warns(RuntimeWarning, match="without a clipper.backward"):
        for _ in range(64):
            model(x)
    clipper.close()


# -- which gradients the backward pass is asked for ----------------------------------------------


def _requested_sources(model, x, losses_fn):
    """The source edges the engine requests (see ``_hooks.plan.source_edge``), by unit name."""
    asked = []
    orig = plan_module.source_edge

    def spy(call, *rest):
        asked.append(call.unit.name)
        return orig(call, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_module, "source_edge", spy)
        compare_engines((model, x, losses_fn))
    return asked


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        # conv output consumed directly by GroupNorm, then ReLU, then another conv
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten()), ["0"]),
        # a bias-free Linear feeding a Linear directly, an Embedding feeding a LayerNorm
        (lambda: nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3)), ["0"]),
        (lambda: nn.Sequential(nn.Embedding(7, 4), nn.LayerNorm(4), nn.Flatten(), nn.Linear(12, 2)), ["0"]),
        (lambda: MLP([6, 5, 3]), ["net.0"]),
    ],
)
def test_one_source_edge_serves_every_streamed_layer(make, expect):
    """Only the first layer is asked for: a second request would hold another output gradient
    to the end of the pass (or, for a convolution's bias, run its weight-gradient kernel)."""
    torch.manual_seed(0)
    model = make()
    if isinstance(model[0], nn.Embedding):
        x = torch.randint(0, 7, (5, 3))
    elif isinstance(model[0], nn.Conv2d):
        x = torch.randn(5, 3, 6, 6)
    else:
        x = torch.randn(5, 6)
    names = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    expect = [e if e in names else names[0] for e in expect]
    assert _requested_sources(model, x, lambda out: out.pow(2).sum(1)) == expect


def test_source_edge_of_a_conv_is_its_output_and_of_a_linear_its_bias():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).double()
    lin = nn.Sequential(nn.Linear(3, 4)).double()
    for model, x, want_bias in ((conv, torch.randn(2, 3, 5, 5, dtype=torch.float64), False), (lin, torch.randn(2, 3, dtype=torch.float64), True)):
        engine = HookEngine(model, ParamLayout.build(model, list(model.parameters())))
        engine.attach()
        try:
            model(x)
            call = engine.recorder.calls[-1]
            (key,) = plan_module.source_edge(call)
        finally:
            engine.detach()
        bias_node = torch.autograd.graph.get_gradient_edge(model[0].bias).node
        assert (key[0] is bias_node) == want_bias


@pytest.mark.parametrize("make", [mlp_case, cnn_case, lambda: gpt_case(tied=True), mixed_case])
def test_a_step_leaves_no_reference_cycles(make):
    """Recorded calls and the autograd graph reference each other through the output hooks;
    the engine cuts that once the step is done, so the graph and its saved activations are
    freed by reference counting at once, not by a later garbage collection."""
    import gc

    model, x, losses_fn = make()
    params = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerSampleFallbackWarning)
        clipper = rc.Clipper(model, torch.optim.SGD(params, lr=0.0), rc.per_sample_clip(1.0, engine="hooks"))
        for _ in range(2):  # the first step also runs the one-time checks
            clipper.backward(losses_fn(model(x)))
            clipper.step()
        gc.collect()
        gc.disable()
        try:
            for _ in range(2):
                clipper.backward(losses_fn(model(x)))
                clipper.step()
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            # torch.func's own recursive helpers (pytree, functorch) form harmless cycles of
            # functions; what must not be in a cycle is robustclip's records, autograd nodes,
            # or tensors
            leaked = sorted(
                {
                    type(o).__name__
                    for o in gc.garbage
                    if isinstance(o, torch.Tensor)
                    or type(o).__module__.startswith("robustclip")
                    or type(o).__name__.endswith("Backward0")
                }
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    clipper.close()
    assert not leaked, f"reference cycles left by the step hold: {leaked[:10]}"


# -- no path goes unchecked: first uses, plan changes, verify_every --------------------------------------


class Scale(nn.Module):
    """``y = x * weight``: a layer type the tests give a rule that can be rigged wrong."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.weight


class Rigged:
    """A rule for :class:`Scale` that is right until ``wrong`` is set, then off by 10%."""

    def __init__(self) -> None:
        self.wrong = False

    def __call__(self, module, x, grad_out, names):
        from robustclip.per_sample.rules import DenseTerm

        b = grad_out.shape[0]
        per_sample = (grad_out * x).reshape(b, -1, module.weight.shape[0]).sum(1)
        return {"weight": DenseTerm(per_sample * (1.1 if self.wrong else 1.0))}


@pytest.fixture
def rigged(monkeypatch):
    from robustclip.per_sample.rules import RULES, Rule

    fn = Rigged()
    monkeypatch.setitem(RULES, Scale, Rule(Scale, fn))
    return fn


class WithScale(nn.Module):
    """Linear, then a Scale that the forward pass uses only from ``use_scale`` on."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.scale = Scale(4)
        self.head = nn.Linear(4, 3)
        self.use_scale = True

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(self.scale(h) if self.use_scale else h)


def _train(model, steps, on_step=lambda k: None, **clipper_kw):
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    with rc.Clipper(model, opt, rc.per_sample_clip(0.5), allow_unused=True, **clipper_kw) as clipper:
        for k in range(steps):
            on_step(k)
            clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
            clipper.step()
        return clipper


def test_rigged_rule_is_caught_by_verify_every(rigged):
    """Wrong from step 2 on: the first-use check passed at step 1, verify_every=1 checks again."""
    model = WithScale()

    def on_step(k):
        rigged.wrong = k >= 1

    with pytest.raises(ValueError, match="scale.weight"):
        _train(model, 3, on_step, verify_every=1)
    # without verify_every nothing re-checks the same path: documented, and the reason for it
    rigged.wrong = False
    _train(WithScale(), 3, on_step)


def test_new_path_is_checked_when_the_plan_changes(rigged):
    """A module used for the first time at step 2, through a wrong rule: that step is checked."""
    rigged.wrong = True
    model = WithScale()
    model.use_scale = False

    def on_step(k):
        model.use_scale = k >= 1

    with pytest.raises(ValueError, match="scale.weight"):
        _train(model, 3, on_step)


def test_a_checked_step_has_exactly_the_extra_backward_of_the_check():
    """verify_every=3 over 7 steps: checks at steps 1, 4 and 7."""
    clipper = _train(MLP([5, 8, 3]), 7, verify_every=3)
    assert clipper.engine.checks.checks == 3
    clipper = _train(MLP([5, 8, 3]), 7)
    assert clipper.engine.checks.checks == 1
    with pytest.raises(ValueError, match="verify_every"):
        _train(MLP([5, 8, 3]), 1, verify_every=0)


def test_whole_model_fallback_engine_is_checked_on_its_first_use(monkeypatch):
    """The model falls back at step 1 (the reference loop runs); the vmap engine that takes over
    runs first at step 2 and is checked there: rigged wrong, it raises instead of training."""
    real = VmapEngine.accumulate

    def wrong(self, losses, weight_fn, out, **kw):
        return real(self, losses * 1.2, weight_fn, out, **kw)  # every per-sample gradient 20% too large

    monkeypatch.setattr(VmapEngine, "accumulate", wrong)
    model = BareMatmul()
    x, y = torch.randn(5, 5), torch.randint(0, 3, (5,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with rc.Clipper(model, opt, rc.per_sample_clip(0.5)) as clipper:
        with pytest.warns(PerSampleFallbackWarning, match="cannot split"):
            clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
        clipper.step()
        with pytest.raises(ValueError, match="'vmap' per-sample engine"):
            clipper.backward(F.cross_entropy(model(x), y, reduction="none"))


@pytest.mark.parametrize("engine", ["vmap", "loop"])
def test_chosen_engines_are_checked_on_first_use(engine):
    model = MLP([5, 8, 3])
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with rc.Clipper(model, opt, rc.per_sample_clip(0.5, engine=engine), verify_every=2) as clipper:
        for _ in range(5):
            clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
            clipper.step()
        assert clipper.engine.checks.checks == 3  # steps 1, 3, 5


# -- views, class tokens, shared position biases: the gradients ----------------------------------------


@pytest.mark.parametrize("which", ["heads-view", "heads-split", "class-token", "relative-bias", "table-T==B"])
def test_view_recognition_gives_the_loops_gradients(which):
    """The plans of ``test_hooks_plan.py`` (views, class and register tokens, a relative
    position bias through permute and a mask), computed: the loop's clipped sums, two steps,
    no whole-model fallback."""
    from .test_hooks_plan import _ClassToken, _Heads, _RelBias

    torch.manual_seed(0)
    model, x = {
        "heads-view": lambda: (_Heads("view"), torch.randn(5, 4, 8)),
        "heads-split": lambda: (_Heads("split"), torch.randn(5, 5, 8)),
        "class-token": lambda: (_ClassToken(), torch.randn(5, 4, 3)),
        "relative-bias": lambda: (_RelBias(), torch.randn(5, 5, 4)),
        "table-T==B": lambda: (_TableTB(), torch.randn(4, 4, 4)),
    }[which]()
    engine = compare_engines((model, x, lambda out: out.pow(2).flatten(1).sum(1)), steps=2)
    assert engine._delegate is None


class _TableTB(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(4, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x) + self.pos(torch.arange(4)))


class SeqFirstBlock(nn.Module):
    """A sequence-first block (batch_first=False): Linear, LayerNorm, Linear on (T, B, d)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):  # x: (B, T, d)
        h = x.transpose(0, 1)
        h = self.out(torch.tanh(self.norm(self.inp(h))))
        return h.transpose(0, 1)


def test_sequence_first_positionwise_layers_take_their_rules():
    model = SeqFirstBlock()
    x = torch.randn(4, 7, 6)
    engine = compare_engines((model, x, lambda out: out.pow(2).sum((1, 2))), steps=2)
    assert engine._delegate is None
    ex = rc.explain(model, x, lambda out: out.pow(2).sum((1, 2)), quiet=True)
    assert {m.path for m in ex.modules} == {"rule Linear", "rule LayerNorm"}
    assert all("batch in dimension 1" in m.why for m in ex.modules)
