"""The framework integrations are optional: importing robustclip imports no framework, and a
missing one names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_robustclip_imports_no_framework():
    r = _run(
        "import sys, robustclip, robustclip.losses, robustclip.integrations\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'lightning', "
        "'pytorch_lightning', 'accelerate'))\n"
        "print(bad)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module,blocked,extra",
    [("transformers", "transformers", "transformers"), ("lightning", "lightning", "lightning")],
)
def test_a_missing_framework_names_the_extra(module, blocked, extra):
    # a None entry in sys.modules makes `import NAME` raise ImportError, as if not installed
    r = _run(
        f"import sys; sys.modules[{blocked!r}] = None\n"
        f"import robustclip.integrations.{module}\n"
    )
    assert r.returncode != 0
    assert f"pip install 'robustclip[{extra}]'" in r.stderr


# -- Clipper.finish(): the step that stops before the optimizer ---------------------------------

import copy  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import robustclip as rc  # noqa: E402
from robustclip import _kernels  # noqa: E402


def _case(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(12, 5)
    x[3] *= 30
    return model, x, torch.randint(0, 3, (12,))


METHODS = [
    lambda: rc.per_sample_clip(0.5),
    lambda: rc.micro_batch_clip(0.5),
    lambda: rc.chain(rc.per_sample_clip(0.5), rc.clip_by_global_norm(0.3)),
    lambda: rc.clip_by_global_norm(0.3),
    lambda: rc.spectral_clip(0.1, rank=None, head=None),
]


@pytest.mark.parametrize("make", METHODS, ids=["per_sample", "micro", "chain", "global", "spectral"])
def test_finish_then_optimizer_step_equals_step(make):
    """Three steps of two micro-batches each: finish() + opt.step() is step(), at every step
    (bit for bit, on fixed kernels: the timed ones may pick another BLAS for the second run)."""
    runs = []
    for use_finish in (False, True):
        model, x, y = _case()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        clipper = rc.Clipper(model, None if use_finish else opt, make())
        trace = []
        with _kernels.plain_kernels():
            for _ in range(3):
                for half in (slice(0, 6), slice(6, 12)):
                    clipper.backward(F.cross_entropy(model(x[half]), y[half], reduction="none"))
                if use_finish:
                    info = clipper.finish()
                    assert not info.skipped
                    opt.step()
                else:
                    info = clipper.step()
                trace.append([p.detach().clone() for p in model.parameters()])
        runs.append(trace)
    for a, b in zip(*runs):
        for p, q in zip(a, b):
            assert torch.equal(p, q)


@pytest.mark.parametrize("make", [lambda: rc.mean(), lambda: rc.clip_by_global_norm(0.3),
                                  lambda: rc.spectral_clip(0.1, rank=None, head=None),
                                  lambda: rc.l0l1_warmup(1.0, 2.0)],
                         ids=["mean", "global", "spectral", "l0l1"])
def test_finish_takes_the_gradient_of_an_ordinary_backward(make):
    """mean(): a gradient from loss.backward() (with the loss given) finishes as clipper.backward's."""
    grads = []
    for external in (False, True):
        model, x, y = _case()
        clipper = rc.Clipper(model, None, make())
        losses = F.cross_entropy(model(x), y, reduction="none")
        if external:
            losses.mean().backward()
            info = clipper.finish(loss=losses.mean())
            assert info.num_samples == 0
        else:
            clipper.backward(losses)
            info = clipper.finish()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert float(info.loss) == pytest.approx(float(losses.detach().mean()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_skipped_finish_leaves_no_gradient_so_any_optimizer_step_changes_nothing(caplog):
    model, x, y = _case()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    clipper = rc.Clipper(model, None, rc.per_sample_clip(0.5))
    clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
    clipper.finish()
    opt.step()
    params, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    x = x.clone()
    x[0, 0] = math.nan
    clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
    info = clipper.finish()
    assert info.skipped and all(p.grad is None for p in model.parameters())
    opt.step()  # a framework that steps anyway
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k])
    for pid, st in state["state"].items():
        for k, v in st.items():
            assert torch.equal(opt.state_dict()["state"][pid][k], v)


def test_layer_norms_are_each_layers_norm_before_the_transforms():
    model, x, y = _case()
    clipper = rc.Clipper(model, None, rc.clip_by_global_norm(1e-3))
    clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
    grads = [p.grad.clone() / 12 for p in model.parameters()]  # the mean: the sum over 12 samples
    info = clipper.finish(layer_norms=True)
    assert clipper.layout.group_names == ["0", "2"]
    want = torch.stack([torch.cat([grads[0].flatten(), grads[1]]).norm(), torch.cat([grads[2].flatten(), grads[3]]).norm()])
    torch.testing.assert_close(info.layer_norms, want)
    torch.testing.assert_close(info.layer_norms.norm(), info.grad_norm.float())
    assert float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()) == pytest.approx(1e-3, rel=1e-4)


def test_finish_and_step_misuse_says_what_to_do():
    model, x, y = _case()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="either an optimizer or params"):
        rc.Clipper(model, opt, rc.mean(), params=list(model.parameters()))
    clipper = rc.Clipper(model, None, rc.per_sample_clip(1.0))
    with pytest.raises(RuntimeError, match="finish"):
        clipper.step()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="clipper.backward"):
        clipper.finish()  # per-sample clipping cannot use an ordinary backward's gradient
    clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(ValueError, match="already knows the loss"):
        clipper.finish(loss=torch.tensor(1.0))
    fresh = rc.Clipper(nn.Linear(2, 2), None, rc.mean())
    with pytest.raises(RuntimeError, match="no gradient"):
        fresh.finish()
    # a subset of the parameters, without an optimizer
    model, x, y = _case()
    clipper = rc.Clipper(model, None, rc.per_sample_clip(1.0), params=model[2].parameters())
    assert clipper.layout.names == ["2.weight", "2.bias"]
