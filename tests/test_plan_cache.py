"""The hook engine's plan cache: a plan is reused only on a step whose graph has the same
signature, and every step's gradient matches the reference loop engine, also on the steps
where the graph changes (batch size, input shape, dtype, requires_grad, another operation, a
parameter used directly on some steps only)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import robustclip as rc


class Net(nn.Module):
    """Two Linears; between them ReLU or Tanh, and optionally a learned scale used directly."""

    def __init__(self, d_in: int = 6, d: int = 5, d_out: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(d_in, d)
        self.b = nn.Linear(d, d_out)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.act = "relu"
        self.use_scale = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = torch.relu(h) if self.act == "relu" else torch.tanh(h)
        if self.use_scale:
            h = h * self.scale  # a bare parameter, broadcast over the batch
        return self.b(h)


def _pair(model: nn.Module) -> tuple[rc.Clipper, rc.Clipper, nn.Module]:
    ref_model = copy.deepcopy(model)
    fast = rc.Clipper(model, None, rc.per_sample_clip(0.5), allow_unused=True)
    ref = rc.Clipper(ref_model, None, rc.per_sample_clip(0.5, engine="loop"), allow_unused=True)
    return fast, ref, ref_model


def _step(clipper: rc.Clipper, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    out = model(x)
    losses = (out - y).pow(2).reshape(out.shape[0], -1).sum(1)
    clipper.backward(losses)
    info = clipper.finish()
    assert not info.skipped
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in clipper.params]


def _check(fast: rc.Clipper, ref: rc.Clipper, model: nn.Module, ref_model: nn.Module, x: torch.Tensor) -> None:
    y = torch.randn(*x.shape[:-1], 3, dtype=x.dtype)
    got = _step(fast, model, x, y)
    want = _step(ref, ref_model, x.detach().clone().requires_grad_(x.requires_grad), y)
    for g, w, name in zip(got, want, fast.layout.names):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


def test_a_plan_is_made_once_and_reused_while_the_graph_stays():
    torch.manual_seed(0)
    model = Net()
    fast, ref, ref_model = _pair(model)
    for _ in range(5):
        _check(fast, ref, model, ref_model, torch.randn(8, 6))
    assert fast.engine.plans_made == 1


@pytest.mark.parametrize("change", ["batch", "shape", "dtype", "requires_grad", "op"])
def test_a_changed_graph_is_planned_again(change):
    torch.manual_seed(0)
    model = Net()
    fast, ref, ref_model = _pair(model)
    x = torch.randn(8, 6)
    _check(fast, ref, model, ref_model, x)
    _check(fast, ref, model, ref_model, x)
    assert fast.engine.plans_made == 1
    if change == "batch":
        x = torch.randn(5, 6)
    elif change == "shape":  # positions: the Linears see (B, T, d)
        x = torch.randn(8, 4, 6)
    elif change == "dtype":
        model.double()
        ref_model.double()
        x = x.double()
    elif change == "requires_grad":
        x = x.clone().requires_grad_(True)
    else:
        model.act = ref_model.act = "tanh"
    _check(fast, ref, model, ref_model, x)
    assert fast.engine.plans_made == 2
    _check(fast, ref, model, ref_model, x)  # and the new plan is cached in turn
    assert fast.engine.plans_made == 2


def test_a_parameter_used_directly_on_some_steps_is_never_missed():
    """The graph around the calls changes while every call looks the same: the signature sees
    the bare parameter, and that step's plan is made afresh (a cached one would leave out the
    scale's per-sample gradient: a silently wrong gradient)."""
    torch.manual_seed(0)
    model = Net()
    fast, ref, ref_model = _pair(model)
    for use in [False, False, True, False, True, True, False]:
        model.use_scale = ref_model.use_scale = use
        _check(fast, ref, model, ref_model, torch.randn(8, 6))
