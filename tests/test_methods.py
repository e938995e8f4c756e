"""Every gradient method against a loop oracle, on the whole test matrix of models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import robustclip as rc
from robustclip._estimators import per_sample_clip_sum
from robustclip.per_sample import ENGINES

from . import _oracles as O

ENGINE_NAMES = sorted(ENGINES)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def run_clipper(method, model, opt, batches, loss_fn):
    """One step through the Clipper; returns the gradient handed to the optimizer."""
    with rc.Clipper(model, opt, method) as clipper:
        for x, y in batches:
            clipper.backward(loss_fn(model(x), y))
        info = clipper.step()
        assert not info.skipped
        return [p.grad.detach().clone() for p in clipper.params], info


def groups_of(model, params):
    ids = {id(p): i for i, p in enumerate(params)}
    groups: dict[str, list[int]] = {}
    taken = set()
    for mname, mod in model.named_modules():
        for _, p in mod.named_parameters(recurse=False):
            if id(p) in ids and id(p) not in taken:
                taken.add(id(p))
                groups.setdefault(mname, []).append(ids[id(p)])
    return groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", O.MODELS)
def test_batch_level_methods(name, dtype):
    model, x, y, loss_fn = O.make_case(name, dtype)
    opt = O.make_optimizer(name, model)
    params = O.trainable(model, opt)
    g = O.mean_grad(model, loss_fn, x, y, params)
    c = 0.3 * O.flat_norm(g)  # clips for sure
    cases = {
        "mean": (rc.mean(), g),
        "clip": (rc.clip_by_global_norm(c), O.clip_vec(g, c)),
        "normalize": (rc.normalize(), [t / O.flat_norm(g) for t in g]),
        "tensor": (rc.clip_by_tensor_norm(0.05), [O.clip_vec([t], 0.05)[0] for t in g]),
        "warmup": (
            rc.l0l1_warmup(2.0, 3.0),
            [t / (2.0 + 3.0 * float(loss_fn(model(x), y).mean().detach())) for t in g],
        ),
    }
    for key, (method, ref) in cases.items():
        got, info = run_clipper(method, model, opt, [(x, y)], loss_fn)
        assert O.max_rel_err(got, ref) <= TOL[dtype], key
        assert torch.allclose(info.grad_norm.double(), torch.tensor(O.flat_norm(g), dtype=torch.float64), rtol=1e-5)


def test_per_sample_clip_sum_is_the_papers_box_by_hand():
    """The reference itself, on numbers worked out by hand: ||(3, 4)|| = 5 is scaled to c = 2,
    ||(0.6, 0.8)|| = 1 and a zero gradient are kept; an infinite radius clips nothing."""
    grads = [
        [torch.tensor([3.0]), torch.tensor([4.0])],
        [torch.tensor([0.6]), torch.tensor([0.8])],
        [torch.tensor([0.0]), torch.tensor([0.0])],
    ]
    total, num_clipped = per_sample_clip_sum(grads, 2.0)
    assert num_clipped == 1
    torch.testing.assert_close(torch.cat(total), torch.tensor([1.2 + 0.6, 1.6 + 0.8]))
    total, num_clipped = per_sample_clip_sum(grads, float("inf"))
    assert num_clipped == 0
    torch.testing.assert_close(torch.cat(total), torch.tensor([3.6, 4.8]))


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", O.MODELS)
def test_per_sample_methods(name, dtype, engine):
    model, x, y, loss_fn = O.make_case(name, dtype)
    opt = O.make_optimizer(name, model)
    params = O.trainable(model, opt)
    norms = [O.flat_norm(gs) for gs in O.sample_grads(model, loss_fn, x, y, params)]
    s = sorted(norms)
    c = 0.5 * (s[len(s) // 2] + s[len(s) // 2 - 1])  # about half the samples are clipped

    got, info = run_clipper(rc.per_sample_clip(c, engine=engine), model, opt, [(x, y)], loss_fn)
    ref = O.per_sample_clip(model, loss_fn, x, y, params, c)
    assert O.max_rel_err(got, ref) <= TOL[dtype]
    assert torch.allclose(info.per_sample_norms.double(), torch.tensor(norms, dtype=torch.float64), rtol=1e-5)
    _, num_clipped = per_sample_clip_sum(O.sample_grads(model, loss_fn, x, y, params), c)
    expected_frac = num_clipped / len(norms)
    assert float(info.clipped_fraction) == pytest.approx(expected_frac)

    got, _ = run_clipper(rc.per_sample_normalize(0.01, engine=engine), model, opt, [(x, y)], loss_fn)
    ref = O.per_sample_normalize(model, loss_fn, x, y, params, 0.01)
    assert O.max_rel_err(got, ref) <= TOL[dtype]

    groups = groups_of(model, params)
    got, _ = run_clipper(rc.per_sample_clip(c / 3, per_layer=True, engine=engine), model, opt, [(x, y)], loss_fn)
    ref = O.per_sample_clip(model, loss_fn, x, y, params, c / 3, per_layer_groups=groups)
    assert O.max_rel_err(got, ref) <= TOL[dtype]

    radii = {gname: 0.01 * (i + 1) for i, gname in enumerate(groups)}
    got, _ = run_clipper(
        rc.per_sample_clip(radii, per_layer=True, engine=engine), model, opt, [(x, y)], loss_fn
    )
    ref = O.per_sample_clip(model, loss_fn, x, y, params, None, per_layer_groups=groups, radii=radii)
    assert O.max_rel_err(got, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", O.MODELS)
def test_micro_batch_clipping_and_accumulation(name, dtype):
    model, x, y, loss_fn = O.make_case(name, dtype, batch=8)
    opt = O.make_optimizer(name, model)
    params = O.trainable(model, opt)
    xs, ys = list(x.split(2)), list(y.split(2))
    c = 0.5 * O.flat_norm(O.mean_grad(model, loss_fn, x, y, params))

    got, info = run_clipper(rc.micro_batch_clip(c), model, opt, list(zip(xs, ys)), loss_fn)
    ref = O.micro_batch_clip(model, loss_fn, xs, ys, params, c)
    assert O.max_rel_err(got, ref) <= TOL[dtype]
    assert info.micro_batch_norms.shape == (4,)
    assert info.num_samples == 4
    mean_loss = float(loss_fn(model(x), y).detach().mean())
    assert float(info.loss) == pytest.approx(mean_loss, rel=1e-6)  # equal micro-batches

    # clip after accumulation: the mean over all micro-batches, then one clip
    got, _ = run_clipper(rc.chain(rc.mean(), rc.clip_by_global_norm(c)), model, opt, list(zip(xs, ys)), loss_fn)
    ref = O.clip_vec(O.mean_grad(model, loss_fn, x, y, params), c)
    assert O.max_rel_err(got, ref) <= TOL[dtype]

    # per-sample clipping over accumulated micro-batches = per-sample clipping of the whole batch
    got, info = run_clipper(rc.per_sample_clip(c, engine="vmap"), model, opt, list(zip(xs, ys)), loss_fn)
    ref = O.per_sample_clip(model, loss_fn, x, y, params, c)
    assert O.max_rel_err(got, ref) <= TOL[dtype]
    assert info.per_sample_norms.shape == (8,)


def test_composition_per_sample_then_global_clip():
    model, x, y, loss_fn = O.make_case("mlp", torch.float64)
    opt = O.make_optimizer("mlp", model)
    params = O.trainable(model, opt)
    c_inner = 0.5
    inner = O.per_sample_clip(model, loss_fn, x, y, params, c_inner)
    c_outer = 0.5 * O.flat_norm(inner)
    method = rc.chain(rc.per_sample_clip(c_inner, engine="vmap"), rc.clip_by_global_norm(c_outer), rc.normalize())
    got, info = run_clipper(method, model, opt, [(x, y)], loss_fn)
    ref = [t / O.flat_norm(inner) for t in inner]  # clip then normalize = normalize
    assert O.max_rel_err(got, ref) <= 1e-12
    assert float(info.transforms["clip_by_global_norm"]["clipped"]) == 1.0


def test_optimizer_and_scheduler_see_the_clipped_gradient():
    """SGD(momentum) after per-sample clipping is PS-Clip-SGD with momentum; schedulers work."""
    model, x, y, loss_fn = O.make_case("mlp", torch.float64)
    ref_model, *_ = O.make_case("mlp", torch.float64)
    ref_model.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    clipper = rc.Clipper(model, opt, rc.per_sample_clip(0.2, engine="vmap"))
    for _ in range(3):
        clipper.backward(loss_fn(model(x), y))
        clipper.step()
        sched.step()
        g = O.per_sample_clip(ref_model, loss_fn, x, y, list(ref_model.parameters()), 0.2)
        for p, gp in zip(ref_model.parameters(), g):
            p.grad = gp
        ref_opt.step()
        ref_sched.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.bfloat16])
def test_step_loss_and_clipped_fraction_over_unequal_micro_batches(loss_dtype):
    """The step's loss is the mean over all its samples (unequal micro-batches weighted by their
    sizes; micro-batch clipping weights each micro-batch as one unit), taken when backward()
    is called: a later in-place change of the loss tensor does not alter it."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8)

    def losses_of(xb, yb):
        return (model(xb).squeeze(1) - yb).pow(2).to(loss_dtype)

    parts = [slice(0, 3), slice(3, 8)]
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), rc.per_sample_clip(0.5))
    all_losses = []
    for sl in parts:
        loss = losses_of(x[sl], y[sl])
        all_losses.append(loss.detach().double())
        clipper.backward(loss)
        loss.data.mul_(100.0)  # the caller reuses its tensor: the step's loss must not change
    info = clipper.step()
    assert float(info.loss) == pytest.approx(float(torch.cat(all_losses).mean()), rel=1e-12)
    assert info.num_samples == 8
    norms = info.per_sample_norms
    assert float(info.clipped_fraction) == pytest.approx(float((norms > 0.5).double().mean()))

    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), rc.micro_batch_clip(1e-3))
    means = []
    for sl in parts:
        loss = losses_of(x[sl], y[sl]).mean()
        means.append(float(loss.detach().double()))
        clipper.backward(loss)
    info = clipper.step()
    assert float(info.loss) == pytest.approx(sum(means) / 2, rel=1e-12)
    assert float(info.clipped_fraction) == 1.0


class _SharedGradients(nn.Module):
    """Parameters whose gradients autograd hands back shared (``a`` and ``b`` get one tensor:
    the gradient of ``a + b``) or expanded (``t``, summed whole: a stride-0 tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4))
        self.b = nn.Parameter(torch.randn(4))
        self.t = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x @ (self.a + self.b) + self.t.sum()


@pytest.mark.parametrize("method", ["mean", "micro_batch_clip"])
def test_first_contribution_owns_its_gradients(method):
    """With no gradients yet, the first micro-batch's become the parameters' gradients; each
    must be a tensor of its own, laid out like its parameter, so that the next micro-batch adds
    into it correctly (a shared or expanded autograd result would double-count or fail)."""
    model = _SharedGradients()
    xs = [torch.randn(3, 4), torch.randn(5, 4)]
    params = list(model.parameters())
    c = 0.7
    ref = [torch.zeros_like(p) for p in params]
    for x in xs:  # oracle: autograd per micro-batch, clipped by hand
        g = torch.autograd.grad(model(x).pow(2).mean(), params)
        norm = torch.sqrt(sum(gi.pow(2).sum() for gi in g))
        coef = min(1.0, c / float(norm)) if method == "micro_batch_clip" else 1.0
        for r, gi in zip(ref, g):
            r.add_(coef * gi)
    est = rc.mean() if method == "mean" else rc.micro_batch_clip(c)
    clipper = rc.Clipper(model, torch.optim.SGD(params, lr=0.0), est)
    clipper.backward(model(xs[0]).pow(2).mean())
    ptrs = {p.grad.untyped_storage().data_ptr() for p in params}
    assert len(ptrs) == len(params)
    assert all(p.grad.stride() == p.stride() for p in params)
    clipper.backward(model(xs[1]).pow(2).mean())
    clipper.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r / len(xs), rtol=1e-6, atol=1e-7)


def test_custom_estimator_that_only_adds_gets_zero_filled_buffers():
    """An estimator written to add into ``out`` (``writes_new_grads`` False) never sees None."""
    class AddOnly(rc.Estimator):
        def contribute(self, losses, state, layout, engine, out):
            torch._foreach_add_(out, torch.autograd.grad(losses.sum(), layout.params))
            return rc.Contribution(losses.shape[0]), state

    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), AddOnly())
    clipper.backward(model(x).pow(2).sum(1))
    clipper.step()
    ref = torch.autograd.grad(model(x).pow(2).sum(1).mean(), list(model.parameters()))
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r)


def test_gradient_hooks_keep_what_they_saw():
    """The new gradients are tensors of their own: a tensor a gradient hook kept is not divided
    or clipped in place by step()."""
    for est in (rc.mean(), rc.micro_batch_clip(1e-3)):
        model = nn.Linear(3, 2)
        saved = []
        model.weight.register_hook(saved.append)  # keeps the tensor; returns None: no change
        clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), est)
        clipper.backward(model(torch.randn(4, 3)).pow(2).sum(1))  # mean(): count 4, divided
        before = saved[0].clone()
        clipper.step()
        assert torch.equal(saved[0], before)


def test_ddp_transforms_run_on_plain_kernels(monkeypatch):
    """Every DDP process transforms the all-reduced gradient itself: inside step() the timed
    kernel choice is off, so all processes round alike."""
    from robustclip import _distributed, _kernels

    seen = []

    class Probe(rc.GradientTransform):
        def init(self, params):
            return ()

        def update(self, grads, state, ctx):
            seen.append(_kernels._PLAIN)
            return grads, state

    monkeypatch.setattr(_distributed, "all_reduce_sum", lambda grads, scalars, group: None)
    model = nn.Linear(3, 2)
    for group, expect in ((None, False), (object(), True)):
        clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), rc.chain(rc.mean(), Probe()))
        clipper._group = group
        clipper.backward(model(torch.randn(4, 3)).pow(2).sum(1))
        clipper.step()
        assert seen[-1] is expect


@pytest.mark.parametrize("method", ["mean", "micro_batch_clip"])
def test_first_backward_is_autograds_own_accumulation(method, monkeypatch):
    """In one process the first micro-batch's gradient is written by autograd into ``p.grad``
    (no copy), and only there: a parameter the optimizer does not hold gets no gradient, one the
    loss does not reach gets zeros. Under DDP (``direct_backward`` off) the same numbers come
    from ``autograd.grad``."""
    from robustclip.per_sample import _grads

    results = {}
    real = _grads.autograd_grads
    for direct in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        unused = nn.Parameter(torch.randn(2))
        model.register_parameter("unused", unused)
        frozen = model[0].bias  # requires grad, but not in the optimizer
        params = [p for p in model.parameters() if p is not frozen]
        est = rc.mean() if method == "mean" else rc.micro_batch_clip(0.05)
        clipper = rc.Clipper(model, torch.optim.SGD(params, lr=0.0), est, allow_unused=True)
        clipper.layout.direct_backward = direct
        calls = []
        monkeypatch.setattr(_grads, "autograd_grads", lambda loss, ps, calls=calls: calls.append(1) or real(loss, ps))
        xs = [torch.randn(5, 3), torch.randn(3, 3)]
        for x in xs:
            clipper.backward(model(x).pow(2).sum(1))
        assert len(calls) == (1 if direct else 2)  # the first backward took the direct path
        assert frozen.grad is None
        clipper.step()
        assert torch.equal(unused.grad, torch.zeros(2))
        results[direct] = [p.grad.clone() for p in params]
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_post_accumulate_hooks_never_see_an_unclipped_gradient():
    """A post-accumulate-grad hook (e.g. an optimizer step inside backward) would fire on the
    direct path's unclipped gradient; with one registered, the clipper uses autograd.grad."""
    model = nn.Linear(3, 2)
    fired = []
    model.weight.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), rc.micro_batch_clip(1e-3))
    clipper.backward(model(torch.randn(4, 3)).pow(2).mean())
    clipper.step()
    assert fired == [] and float(model.weight.grad.norm()) <= 1e-3 * (1 + 1e-6)


class _Concatenated(nn.Module):
    """Two parameters used through ``torch.cat``: their gradients are slices of one buffer,
    which a hook on the concatenation keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3))
        self.b = nn.Parameter(torch.randn(3))
        self.saved: list[torch.Tensor] = []

    def forward(self, x):
        w = torch.cat([self.a, self.b])
        w.register_hook(self.saved.append)
        return (x * w).sum(1)


@pytest.mark.parametrize("method", ["mean", "micro_batch_clip"])
def test_gradients_sharing_a_buffer_are_copied(method):
    """A gradient autograd leaves as a view into a buffer someone holds is not changed in place
    by the clip, the accumulation or the division; the values match the oracle."""
    model = _Concatenated()
    xs = [torch.randn(4, 6), torch.randn(2, 6)]
    c = 1e-2
    ref = [torch.zeros(3), torch.zeros(3)]
    for x in xs:
        g = torch.autograd.grad(model(x).mean(), [model.a, model.b])
        coef = min(1.0, c / float(torch.cat(g).norm())) if method == "micro_batch_clip" else 1.0
        for r, gi in zip(ref, g):
            r.add_(coef * gi)
    model.saved.clear()
    est = rc.mean() if method == "mean" else rc.micro_batch_clip(c)
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), est)
    for x in xs:
        clipper.backward(model(x) if method == "mean" else model(x).mean())
    kept = [s.clone() for s in model.saved]
    clipper.step()
    for s, k in zip(model.saved, kept):
        assert torch.equal(s, k)
    # both backpropagate the micro-batch's mean loss (mean() scales by B as it adds)
    torch.testing.assert_close(model.saved[0], xs[0].mean(0))
    scale = len(xs) if method == "micro_batch_clip" else sum(len(x) for x in xs)
    if method == "mean":  # mean() gets per-sample losses: the oracle above used mean losses
        ref = [sum(torch.autograd.grad(model(x).sum(), [p])[0] for x in xs) for p in (model.a, model.b)]
    for p, r in zip((model.a, model.b), ref):
        torch.testing.assert_close(p.grad, r / scale, rtol=1e-6, atol=1e-7)


def test_no_direct_backward_under_an_initialized_process_group(monkeypatch):
    """With a process group up (a distributed wrapper anywhere in the model), the first
    backward goes through autograd.grad: no wrapper hook sees an unclipped gradient."""
    from robustclip.per_sample import _grads

    calls = []
    real = _grads.autograd_grads
    monkeypatch.setattr(_grads, "autograd_grads", lambda loss, ps: calls.append(1) or real(loss, ps))
    model = nn.Linear(3, 2)
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), rc.micro_batch_clip(1.0))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    clipper.backward(model(torch.randn(4, 3)).pow(2).mean())
    assert calls == [1]


def test_sparse_gradients_are_refused_with_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="sparse=False"):
        rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.mean())


class _Recorder(rc.GradientTransform):
    """Keeps what a transform is handed, to check the StepContext."""

    name = "recorder"

    def __init__(self):
        self.seen = []

    def update(self, grads, state, ctx):
        self.seen.append((ctx.num_samples.clone(), ctx.loss.clone(), global_norm_of(grads)))
        return grads, state


def global_norm_of(grads):
    return float(torch.cat([g.reshape(-1) for g in grads]).double().norm())


@pytest.mark.parametrize("sizes", [(8,), (4, 4), (3, 5)])
def test_transforms_see_the_count_loss_and_averaged_gradient(sizes):
    """A transform reads the step's count as a tensor, its mean loss and the averaged gradient,
    whatever the split into micro-batches; the step's grad_norm reading is that gradient's
    norm, and an empty chain gives the same step."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 300), nn.Tanh(), nn.Linear(300, 200))  # a dot-sized weight
    x, y = torch.randn(8, 3), torch.randn(8, 200)
    losses_fn = lambda xb, yb: (model(xb) - yb).pow(2).mean(1)  # noqa: E731
    ref = torch.autograd.grad(losses_fn(x, y).mean(), list(model.parameters()))
    rec = _Recorder()
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    infos = []
    for method in (rc.chain(rc.mean(), rec), rc.mean()):
        clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), method)
        for a, b in zip(bounds, bounds[1:]):
            clipper.backward(losses_fn(x[a:b], y[a:b]))
        infos.append(clipper.step())
        for p, r in zip(model.parameters(), ref):
            torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)
    (count, loss, norm), = rec.seen
    assert isinstance(count, torch.Tensor) and count.dtype == torch.float64 and float(count) == 8
    assert float(loss) == pytest.approx(float(losses_fn(x, y).detach().double().mean()), rel=1e-6)
    ref_norm = global_norm_of(ref)
    assert norm == pytest.approx(ref_norm, rel=1e-5)
    for info in infos:
        assert float(info.grad_norm) == pytest.approx(ref_norm, rel=1e-5)
        assert float(info.loss) == pytest.approx(float(loss), rel=1e-12)


def test_a_method_takes_a_bare_transform_and_checks_its_type():
    torch.manual_seed(2)
    model = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    grads = []
    for method in (rc.Method(rc.mean(), rc.clip_by_global_norm(0.01)), rc.chain(rc.mean(), rc.clip_by_global_norm(0.01))):
        clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), method)
        clipper.backward((model(x) - y).pow(2).mean(1))
        info = clipper.step()
        assert float(info.transforms["clip_by_global_norm"]["norm"]) > 0.01
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert float(torch.cat([g.reshape(-1) for g in grads[0]]).norm()) == pytest.approx(0.01, rel=1e-5)
    assert repr(rc.Method(rc.mean(), None)) == "chain(mean())"
    with pytest.raises(TypeError, match="transform"):
        rc.Method(rc.mean(), "clip")


def test_step_loss_is_a_copy_even_of_a_float64_scalar_loss():
    """StepInfo.loss must not share memory with the caller's loss tensor."""
    torch.manual_seed(3)
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.0), rc.mean())
    loss = (model(x).squeeze(1) - y).pow(2).mean()
    expected = float(loss.detach())
    clipper.backward(loss)
    info = clipper.step()
    with torch.no_grad():
        loss.zero_()
    assert float(info.loss) == expected
