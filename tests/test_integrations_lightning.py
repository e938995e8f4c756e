"""Lightning with robustclip: the same parameters as robustclip's own loop, readings logged, a
skipped step that touches nothing, one optimizer step per step, DDP over two CPU processes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustclip as rc

pl = pytest.importorskip("lightning.pytorch")
from robustclip.integrations.lightning import RobustClipCallback, RobustClipModule  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval.*"),
    # lightning 2.6.6 on torch 2.13: pytree's LeafSpec deprecation, raised inside Lightning
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]

STEPS, BATCH = 20, 8


def make_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def make_data(n=BATCH * STEPS * 2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    x[::7] *= 20  # outliers: large per-sample gradients
    return x, y


def loader(x, y, batch=BATCH):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def make_opt(params):
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s))
    return opt, sched


class Plain(pl.LightningModule):
    """An ordinary module: mean loss, Lightning's backward; batch-level methods via the callback."""

    def __init__(self):
        super().__init__()
        self.net = make_net()
        self.opt_calls = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt, sched = make_opt(self.parameters())
        opt.register_step_post_hook(lambda *a: setattr(self, "opt_calls", self.opt_calls + 1))
        self.opt, self.sched = opt, sched
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class PerSample(RobustClipModule, Plain):
    """The mixin: training_step returns one loss per sample."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def configure_robustclip(self):
        return self.method

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")


class Capture(pl.loggers.Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    name = "capture"
    version = "0"

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *a, **k):
        pass


def fit(module, data, accumulation=1, callbacks=(), steps=STEPS, **kw):
    logger = Capture()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=5,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=accumulation, callbacks=list(callbacks), **kw,
    )
    trainer.fit(module, loader(*data))
    return trainer, logger


def own_loop(data, method, accumulation, steps=STEPS):
    model = make_net()
    opt, sched = make_opt(model.parameters())
    clipper = rc.Clipper(model, opt, method)
    batches = list(loader(*data))
    for s in range(steps):
        for x, y in batches[s * accumulation : (s + 1) * accumulation]:
            clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
        clipper.step()
        sched.step()
    return model


CASES = {
    "per_sample_clip": (lambda: rc.per_sample_clip(0.5), 1, True),
    "micro_batch_clip": (lambda: rc.micro_batch_clip(0.5), 2, True),
    "clip_by_global_norm": (lambda: rc.clip_by_global_norm(0.5), 1, False),
    "spectral_clip_accumulated": (lambda: rc.spectral_clip(0.2, rank=None, head=None), 2, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_lightning_equals_own_loop_and_logs_readings(name):
    make, accumulation, mixin = CASES[name]
    data = make_data()
    if mixin:
        module, callbacks = PerSample(make()), ()
    else:
        module, callbacks = Plain(), (RobustClipCallback(make()),)
    trainer, logger = fit(module, data, accumulation, callbacks)
    assert trainer.global_step == STEPS
    assert module.opt_calls == STEPS  # the optimizer stepped exactly once per step
    assert module.sched.last_epoch == STEPS
    ref = own_loop(data, make(), accumulation)
    for (n, p), q in zip(module.net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    assert max((p - q).abs().max().item() for p, q in zip(module.net.parameters(), make_net().parameters())) > 1e-2
    rows = [m for _, m in logger.rows if "robustclip/grad_norm" in m]
    assert len(rows) == STEPS // 5
    for m in rows:
        assert m["robustclip/skipped_steps"] == 0.0 and m["robustclip/grad_norm"] > 0
        layers = [k for k in m if k.startswith("robustclip/layer_norm/")]
        assert sorted(layers) == ["robustclip/layer_norm/net.0", "robustclip/layer_norm/net.2"]
        assert math.hypot(*(m[k] for k in layers)) == pytest.approx(m["robustclip/grad_norm"], rel=1e-5)
        if mixin:
            assert 0.0 <= m["robustclip/clipped_fraction"] <= 1.0
    if name == "per_sample_clip":
        assert max(m["robustclip/clipped_fraction"] for m in rows) > 0
    if name == "clip_by_global_norm":
        assert all(m["robustclip/clip_by_global_norm/radius"] == pytest.approx(0.5) for m in rows)


class Poison(pl.Callback):
    """Feeds NaN into step ``at`` and checks the step changed nothing."""

    def __init__(self, at):
        self.at, self.checked = at, False

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.at:
            batch[0][1, 2] = math.nan
            self.params = copy.deepcopy(module.state_dict())
            self.opt_state = copy.deepcopy(module.opt.state_dict())
            self.sched_steps = (module.sched.last_epoch, module.sched._step_count)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            for k, v in module.state_dict().items():
                assert torch.equal(v, self.params[k]), k
            after = module.opt.state_dict()["state"]
            for pid, st in self.opt_state["state"].items():
                for k, v in st.items():
                    assert torch.equal(after[pid][k], v)
            assert (module.sched.last_epoch, module.sched._step_count) == self.sched_steps
            self.checked = True


@pytest.mark.parametrize("mixin", [True, False], ids=["module", "callback"])
def test_a_nonfinite_step_changes_nothing_under_lightning(mixin, caplog):
    if mixin:
        module, callbacks = PerSample(rc.per_sample_clip(0.5)), []
    else:
        module, callbacks = Plain(), [RobustClipCallback(rc.clip_by_global_norm(0.5))]
    poison = Poison(at=3)
    trainer, logger = fit(module, make_data(), 1, [*callbacks, poison], steps=6)
    assert poison.checked
    assert module.sched.last_epoch == 5  # six steps, one skipped
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert [m["robustclip/skipped_steps"] for _, m in logger.rows if "robustclip/skipped_steps" in m] == [1.0]


def test_callback_refuses_per_sample_methods_and_turns_off_lightnings_clipping():
    with pytest.raises(TypeError, match="RobustClipModule"):
        fit(Plain(), make_data(), callbacks=[RobustClipCallback(rc.per_sample_clip(1.0))], steps=1)
    module = Plain()
    with pytest.warns(UserWarning, match="gradient_clip_val=2.0"):
        trainer, _ = fit(module, make_data(), callbacks=[RobustClipCallback(rc.clip_by_global_norm(1.0))], steps=2, gradient_clip_val=2.0)
    assert trainer.gradient_clip_val is None



def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_ddp_over_two_cpu_processes_equals_one_process_on_the_global_batch(tmp_path):
    """Lightning's DDP strategy over gloo: each process trains on half of each global batch; the
    clipper's all-reduce (per-sample module) or DDP's own (callback) gives the update of one
    process on the whole batch."""
    from . import _lightning_ddp_worker as W
    from ._spawn import spawn

    out = tmp_path / "params.pt"
    spawn(W.worker, lambda attempt: (_free_port(), str(out)), 2)
    results = torch.load(out, weights_only=True)
    for key, method in (("module", rc.per_sample_clip(0.5)), ("callback", rc.clip_by_global_norm(0.5))):
        got = results[key]
        # one process, batches of 2 * BATCH: the samples both processes saw at each step
        model = make_net()
        opt, sched = make_opt(model.parameters())
        clipper = rc.Clipper(model, opt, method)
        for x, y in loader(*make_data(n=2 * BATCH * W.STEPS), batch=2 * BATCH):
            clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
            clipper.step()
            sched.step()
        assert got.keys() == dict(model.named_parameters()).keys()
        for n, q in model.named_parameters():
            torch.testing.assert_close(got[n], q.detach(), rtol=0, atol=1e-6, msg=f"{key} {n}")
        assert max((got[n] - p).abs().max().item() for n, p in make_net().named_parameters()) > 1e-2
