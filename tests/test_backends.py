"""robustclip.backends.autotune: off by default, and then only public torch ops run, with a
fixed kernel at each call site and nothing timed or remembered; on and off agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import robustclip as rc
from robustclip import _kernels, backends
from robustclip.experiments.models import MLP, SmallCNN

from .test_kernels import low_rank_update


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(_kernels, "_CHOICES", {})


def test_off_by_default_and_flags_restore_it():
    assert backends.autotune is False and rc.backends is backends
    with backends.flags(autotune=True):
        assert backends.autotune is True
        with backends.flags(autotune=False):
            assert backends.autotune is False
        assert backends.autotune is True
    assert backends.autotune is False
    with backends.flags():  # nothing given: nothing changed
        assert backends.autotune is False
    with pytest.raises(TypeError, match="True or False"):
        with backends.flags(autotune=1):  # type: ignore[arg-type]
            pass
    assert backends.autotune is False


def test_off_every_call_site_is_the_plain_torch_kernel():
    a, b = torch.randn(40, 24), torch.randn(24, 16)
    assert torch.equal(_kernels.matmul(a, b), a @ b)
    assert torch.equal(_kernels.matmul(a, b, rows=True), a @ b)
    a3, b3 = torch.randn(3, 40, 24), torch.randn(3, 24, 16)
    assert torch.equal(_kernels.matmul(a3, b3), a3 @ b3)
    out0, x, y = low_rank_update((30, 16, 50), 8, "rrr", torch.float32)
    assert torch.equal(_kernels.addmm_(out0.clone(), x, y, 8), out0.clone().addmm_(x, y))
    # a choice made through chosen() (the per-sample convolution kernel) is candidate 0
    assert _kernels.chosen(("conv-per-sample", "any signature")) == 0
    assert _kernels.choose(("any",), [lambda: "plain", lambda: "other"]) == "plain"
    assert not _kernels._CHOICES


def _private_ops_raise(monkeypatch):
    """oneDNN's private linear op and the timer raise if anything reaches them."""

    def boom(*args, **kwargs):
        raise RuntimeError("a private op or a kernel timing ran")

    if _kernels.ONEDNN_MATMUL:
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", boom)
    monkeypatch.setattr(_kernels, "_onednn_mm", boom)
    monkeypatch.setattr(_kernels, "_fastest", boom)


def _two_steps(model, x, y, method):
    """Gradients handed to the optimizer at two steps (per-sample clipping on the hook engine,
    spectral clipping in the randomized mode), from fixed weights."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    with rc.Clipper(model, opt, method) as clipper:
        for _ in range(2):
            clipper.backward(nn.functional.cross_entropy(model(x), y, reduction="none"))
            clipper.step()
            grads.append([p.grad.clone() for p in model.parameters()])
    return grads


CASES = {
    "mlp": lambda: (MLP([20, 64, 48, 5]), torch.randn(32, 20)),
    "cnn": lambda: (SmallCNN(3, (8, 16), hidden=24, num_classes=5, image_size=8), torch.randn(16, 3, 8, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_off_runs_no_private_op_and_agrees_with_on(case, monkeypatch):
    torch.manual_seed(0)
    model, x = CASES[case]()
    y = torch.randint(0, 5, (x.shape[0],))
    init = {k: v.clone() for k, v in model.state_dict().items()}

    def method():
        return rc.chain(rc.per_sample_clip(0.5, engine="hooks"), rc.spectral_clip(0.1, rank=2, head=None))

    with monkeypatch.context() as mp:
        _private_ops_raise(mp)
        off = _two_steps(model, x, y, method())
    assert not _kernels._CHOICES
    if _kernels.ONEDNN_MATMUL:  # the probe would have caught oneDNN: with autotuning on it does
        model.load_state_dict(init)
        with monkeypatch.context() as mp, backends.flags(autotune=True):
            _private_ops_raise(mp)
            with pytest.raises(RuntimeError, match="private op"):
                _two_steps(model, x, y, method())
        monkeypatch.setattr(_kernels, "_CHOICES", {})
    model.load_state_dict(init)
    with backends.flags(autotune=True):
        on = _two_steps(model, x, y, method())
    assert _kernels._CHOICES  # something was timed
    for step_off, step_on in zip(off, on):
        for a, b in zip(step_off, step_on):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
