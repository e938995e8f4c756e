"""The accelerate recipe (docs/integrations.md): accelerator.backward or clipper.backward,
clipper.finish() when accelerator.sync_gradients, unscale_gradients first; equal to robustclip's
own loop, and a skipped step leaves parameters, optimizer state and scheduler alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustclip as rc

accelerate = pytest.importorskip("accelerate")

STEPS, BATCH, ACC = 12, 8, 2


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def make_data(n=BATCH * STEPS * ACC):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    x[::5] *= 20
    return x, torch.randint(0, 3, (n,), generator=g)


def make_opt(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s))


def accelerate_loop(method, data, poison_step=None, watch=None):
    """The recipe, as a user writes it."""
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=ACC, cpu=True)
    model = make_net()
    opt, sched = make_opt(model)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=BATCH)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    clipper = rc.Clipper(model, None, method)
    per_sample = not isinstance(method, rc.GradientTransform)
    skipped = 0
    for i, (x, y) in enumerate(loader):
        if poison_step is not None and i // ACC == poison_step:
            if i % ACC == 0:
                watch.before(model, opt, sched)
            x = x.clone()
            x[0, 0] = math.nan
        with accelerator.accumulate(model):
            out = model(x)
            if per_sample:
                clipper.backward(F.cross_entropy(out, y, reduction="none"))  # instead of accelerator.backward
            else:
                accelerator.backward(F.cross_entropy(out, y))
            if accelerator.sync_gradients:
                accelerator.unscale_gradients()  # fp16: the clipper sees the true gradient
                info = clipper.finish()
                skipped += info.skipped
            opt.step()  # after a skipped finish(), p.grad is None: nothing changes
            if accelerator.sync_gradients and not info.skipped:
                sched.step()
            opt.zero_grad()
        if poison_step is not None and i // ACC == poison_step and i % ACC == ACC - 1:
            watch.after(model, opt, sched)
    return accelerator.unwrap_model(model), calls, skipped, sched


def own_loop(method, data):
    model = make_net()
    opt, sched = make_opt(model)
    clipper = rc.Clipper(model, opt, method)
    x, y = data
    for s in range(STEPS):
        for k in range(ACC):
            j = (s * ACC + k) * BATCH
            clipper.backward(F.cross_entropy(model(x[j : j + BATCH]), y[j : j + BATCH], reduction="none"))
        clipper.step()
        sched.step()
    return model


METHODS = {
    "per_sample_clip": lambda: rc.per_sample_clip(0.5),
    "micro_batch_clip": lambda: rc.micro_batch_clip(0.5),
    "clip_by_global_norm": lambda: rc.clip_by_global_norm(0.5),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_accelerate_recipe_equals_own_loop(name):
    data = make_data()
    model, calls, skipped, sched = accelerate_loop(METHODS[name](), data)
    # accelerate's optimizer wrapper steps the optimizer only when the gradients are synced
    assert len(calls) == STEPS and skipped == 0 and sched.scheduler.last_epoch == STEPS
    ref = own_loop(METHODS[name](), data)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), make_net().parameters())) > 1e-2


class Watch:
    def before(self, model, opt, sched):
        self.params = copy.deepcopy(model.state_dict())
        self.opt = copy.deepcopy(opt.state_dict())
        self.sched = (sched.scheduler.last_epoch, sched.scheduler._step_count)

    def after(self, model, opt, sched):
        for k, v in model.state_dict().items():
            assert torch.equal(v, self.params[k]), k
        now = opt.state_dict()["state"]
        for pid, st in self.opt["state"].items():
            for k, v in st.items():
                assert torch.equal(now[pid][k], v)
        assert (sched.scheduler.last_epoch, sched.scheduler._step_count) == self.sched
        self.checked = True


@pytest.mark.parametrize("name", ["per_sample_clip", "clip_by_global_norm"])
def test_accelerate_recipe_skips_a_nonfinite_step(name, caplog):
    watch = Watch()
    model, calls, skipped, sched = accelerate_loop(METHODS[name](), make_data(), poison_step=3, watch=watch)
    assert watch.checked and skipped == 1
    assert sched.scheduler.last_epoch == STEPS - 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
