"""The hook engine's planning phase (``per_sample/_hooks/plan.py``), without a backward pass.

The planner reads the graph only through node names, ``next_functions`` and metadata, so the
first tests hand it a graph of stand-in nodes (no autograd at all); the last one plans a real
forward pass and checks that planning ran no backward.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from robustclip.per_sample import ParamLayout
from robustclip.per_sample._hooks.capture import Call, Recorder, Unit, edge_key, plan_units, release
from robustclip.per_sample._hooks.plan import make_plan
from robustclip.per_sample._hooks.walk import walk
from robustclip.per_sample.rules import RULES

B = 4


class Node:
    """A stand-in for an autograd node."""

    def __init__(self, name: str, *nexts: Any, out_shape: tuple[int, ...] | None = None, **saved: Any) -> None:
        self._name = name
        self.next_functions = tuple((n, 0) for n in nexts)
        if out_shape is not None:
            self._input_metadata = [SimpleNamespace(shape=out_shape)]
        for k, v in saved.items():
            setattr(self, k, v)

    def name(self) -> str:
        return self._name


class Leaf(Node):
    """A stand-in for the ``AccumulateGrad`` node of a parameter."""

    def __init__(self, p: torch.Tensor) -> None:
        super().__init__("AccumulateGrad")
        self.variable = p


def rule_call(model: nn.Module, name: str, params: dict[str, int], out: Node, shape: tuple[int, ...], inputs: list[Any]) -> Call:
    module = model.get_submodule(name)
    unit = Unit(module, name, RULES[type(module)], params)
    return Call(unit, [GradientEdge(out, 0)], [shape], [(n, 0) for n in inputs])


def two_linears(bias: bool) -> tuple[nn.Module, ParamLayout]:
    model = nn.Sequential(nn.Linear(5, 3, bias=bias), nn.Linear(3, 2, bias=bias))
    return model, ParamLayout.build(model, list(model.parameters()))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_one_request_serves_every_streamed_layer(bias):
    """``losses <- lin2 <- relu <- lin1 <- x``: both layers are streamed, and one request at the
    bottom (the first layer's bias, which the Linear rule declares, or else its output) makes
    the pass reach both."""
    model, layout = two_linears(bias)
    p = {n: i for i, n in enumerate(layout.names)}
    # the first layer's node reaches its bias's AccumulateGrad, as an AddmmBackward0 does
    below = [get_gradient_edge(model[0].bias).node] if bias else []
    n1 = Node("AddmmBackward0" if bias else "MmBackward0", *below)
    relu = Node("ReluBackward0", n1)
    n2 = Node("AddmmBackward0" if bias else "MmBackward0", relu)
    root = Node("SumBackward1", n2)
    own = (lambda k: {"weight": p[f"{k}.weight"], "bias": p[f"{k}.bias"]}) if bias else (lambda k: {"weight": p[f"{k}.weight"]})
    c1 = rule_call(model, "0", own("0"), n1, (B, 3), [])
    c2 = rule_call(model, "1", own("1"), n2, (B, 2), [relu])
    calls = [c1, c2]  # forward order

    plan = make_plan(calls, walk(root, calls, {id(q): i for i, q in enumerate(layout.params)}), B, layout)

    assert not plan.problems and not plan.fallbacks and not plan.bare
    assert {id(c) for c in plan.streamed} == {id(c1), id(c2)} and plan.after == []
    if bias:
        assert list(plan.requests) == [edge_key(get_gradient_edge(model[0].bias))]
    else:
        assert list(plan.requests) == [(n1, 0)]
    rows = {r[0]: r[1:] for r in plan.rows()}
    assert rows["0 (Linear)"] == ("rule, in the backward pass", f"requests its {'bias' if bias else 'output'}")
    assert rows["1 (Linear)"] == ("rule, in the backward pass", "")
    assert "1 gradient(s) requested" in str(plan)


def test_shared_parameter_is_processed_after_the_pass():
    """A Linear called twice: its parameters have two uses, so neither call is streamed and
    both output gradients are requested."""
    model, layout = two_linears(False)
    n1 = Node("MmBackward0")
    n2 = Node("MmBackward0", Node("TanhBackward0", n1))
    root = Node("SumBackward1", n2)
    params = {"weight": 0}
    c1 = rule_call(model, "0", params, n1, (B, 3), [])
    c2 = rule_call(model, "0", params, n2, (B, 3), [n2.next_functions[0][0]])
    plan = make_plan([c1, c2], walk(root, [c1, c2], {id(layout.params[0]): 0}), B, layout)
    assert plan.streamed == [] and len(plan.after) == 2
    assert set(plan.requests) == {(n1, 0), (n2, 0)}
    assert all(r[1] == "rule, after the backward pass" for r in plan.rows())


def test_bare_parameter_at_a_broadcasting_multiply():
    """``lin(x) * gamma``: gamma's per-sample gradient is recovered at the multiply, from the
    gradient of its output and the factor it saved (the other operand)."""
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    gamma = nn.Parameter(torch.ones(3))
    params = [model[0].weight, gamma]
    layout = ParamLayout(params, ["0.weight", "gamma"], [model[0], None], [0, 1], ["0", "<root>.gamma"])
    n1 = Node("MmBackward0")
    act = torch.randn(B, 3)
    mul = Node("MulBackward0", n1, Leaf(gamma), out_shape=(B, 3), _saved_self=act, _saved_other=gamma.detach())
    root = Node("SumBackward1", mul)
    c1 = rule_call(model, "0", {"weight": 0}, n1, (B, 3), [])
    plan = make_plan([c1], walk(root, [c1], {id(q): i for i, q in enumerate(params)}), B, layout)
    assert not plan.problems
    (bare,) = plan.bare
    assert bare.node is mul and bare.idx == 1 and bare.name == "gamma"
    assert torch.equal(bare.factor, act)  # gamma is operand 1: its factor is operand 0
    assert (mul, 0) in plan.requests
    # the multiply's request lies above the layer, which has no gradient below its input: the
    # (streamed) layer requests its own output (bias-free Linear), so that the pass reaches it
    assert plan.streamed == [c1] and list(plan.requests) == [(mul, 0), (n1, 0)]
    assert ("gamma", "bare parameter", "broadcast by MulBackward0") in plan.rows()


def test_problems_make_the_whole_model_fall_back():
    """A bare weight in a matmul and an unbatched layer output consumed by a matmul: the plan
    says why, and requests are not worked out."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    w = nn.Parameter(torch.randn(4, 2))
    params = [model[0].weight, w]
    layout = ParamLayout(params, ["0.weight", "w"], [model[0], None], [0, 1], ["0", "<root>.w"])
    basis = Node("MmBackward0")  # proj(basis): shape (4, 4), no batch
    mm1 = Node("MmBackward0", basis, out_shape=(B, 4))
    mm2 = Node("MmBackward0", mm1, Leaf(w), out_shape=(B, 2))
    root = Node("SumBackward1", mm2)
    c = rule_call(model, "0", {"weight": 0}, basis, (4, 4), [])
    plan = make_plan([c], walk(root, [c], {id(q): i for i, q in enumerate(params)}), 6, layout)
    assert len(plan.problems) == 2
    assert "'0' is called on an input without a batch dimension" in plan.problems[0]
    assert "used by MmBackward0" in plan.problems[0]
    assert "parameter 'w' is used directly by MmBackward0" in plan.problems[1]
    assert plan.streamed == []
    assert "whole-model fallback: parameter 'w'" in str(plan)


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w)


class _Model(nn.Module):
    """A tied embedding and head, a custom layer no rule covers, a bare layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.norm = nn.LayerNorm(6)
        self.custom = _Gated()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.head = nn.Linear(6, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.custom(self.norm(self.emb(idx))) * self.gamma)


def test_plan_of_a_real_forward_pass_runs_no_backward():
    torch.manual_seed(0)
    model = _Model()
    layout = ParamLayout.build(model, list(model.parameters()))
    fired = []
    recorder = Recorder(plan_units(model, layout), lambda call, g: fired.append(call))
    recorder.attach()
    try:
        losses = model(torch.randint(0, 9, (B, 5))).pow(2).sum((1, 2))
        calls = recorder.take()
        plan = make_plan(calls, walk(losses.grad_fn, calls, {id(p): i for i, p in enumerate(layout.params)}), B, layout)
    finally:
        recorder.detach()
    assert fired == [] and all(p.grad is None for p in model.parameters())
    assert not plan.problems
    by_name = {r[0]: r[1] for r in plan.rows()}
    # the tied weight has two uses: embedding and head go after the pass; the norm is streamed
    assert by_name == {
        "emb (Embedding)": "rule, after the backward pass",
        "norm (LayerNorm)": "rule, in the backward pass",
        "head (Linear)": "rule, after the backward pass",
        "custom (_Gated)": "per-module fallback",
        "gamma": "bare parameter",
    }
    assert [c.unit.name for c in plan.fallbacks] == ["custom"]
    release(calls)


# -- batched tensors through views; shared tensors through views to their broadcasting site ------------


def _plan_of(model: nn.Module, x: torch.Tensor, losses_fn=lambda out: out.pow(2).flatten(1).sum(1)):
    layout = ParamLayout.build(model, list(model.parameters()))
    recorder = Recorder(plan_units(model, layout), lambda call, g: None)
    recorder.attach()
    try:
        losses = losses_fn(model(x))
        calls = recorder.take()
        plan = make_plan(calls, walk(losses.grad_fn, calls, {id(p): i for i, p in enumerate(layout.params)}), x.shape[0], layout)
    finally:
        recorder.detach()
    return plan, calls


class _Heads(nn.Module):
    """An attention block's projections, heads split with a view, and every other batch-keeping
    rearrangement after a projection: none makes a batched output look unbatched."""

    def __init__(self, how: str, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.how, self.h = how, heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = self.qkv(x)
        if self.how == "view":
            q, k, v = y.view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        elif self.how == "reshape":
            q, k, v = y.reshape(b, t, self.h, 3 * d // self.h).transpose(1, 2).chunk(3, dim=-1)
        elif self.how == "split":
            q, k, v = (z.unflatten(-1, (self.h, d // self.h)).transpose(1, 2) for z in y.split(d, dim=-1))
        else:
            raise KeyError(self.how)
        att = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.out(att.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("how", ["view", "reshape", "split"])
@pytest.mark.parametrize("t", [5, B], ids=["T!=B", "T==B"])
def test_views_that_keep_the_batch_first_are_batched(how, t):
    """``.view(B, T, H, d)`` and friends after a projection (output (B, T, 3d), its first
    dimension the batch) leave it a batched layer: no problem, its output requested as usual."""
    plan, calls = _plan_of(_Heads(how), torch.randn(B, t, 8))
    assert not plan.problems, plan.problems
    assert all(j.consumers is None for j in plan.rules) and len(plan.rules) == 2
    release(calls)


class _ClassToken(nn.Module):
    """ViT's embeddings: patches, a class token and register tokens expanded over the batch and
    concatenated along dimension 1, a position table added (all bare parameters)."""

    def __init__(self, d: int = 8, n: int = 4) -> None:
        super().__init__()
        self.patch = nn.Linear(3, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.reg = nn.Parameter(torch.randn(1, 2, d))
        self.pos = nn.Parameter(torch.randn(n + 3, d))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = torch.cat([self.cls.expand(b, -1, -1), self.reg.expand(b, -1, -1), self.patch(x)], 1)
        return self.head(h + self.pos.unsqueeze(0))


def test_class_and_register_tokens_and_position_table_are_bare_broadcasts():
    plan, calls = _plan_of(_ClassToken(), torch.randn(B, 4, 3))
    assert not plan.problems, plan.problems
    via = {b.name: b.site.node.name() for b in plan.bare}
    assert via == {"cls": "ExpandBackward0", "reg": "ExpandBackward0", "pos": "AddBackward0"}
    pos = next(b for b in plan.bare if b.name == "pos")
    assert [v[0].name() for v in pos.site.views] == ["UnsqueezeBackward0"]
    release(calls)


class _RelBias(nn.Module):
    """T5's relative position bias: an embedding of (q, k) buckets, permuted and unsqueezed to
    (1, H, q, k), masked by a causal mask (still no batch), added to the batch's scores."""

    def __init__(self, t: int = 5, heads: int = 2) -> None:
        super().__init__()
        self.bias = nn.Embedding(8, heads)
        self.proj = nn.Linear(4, 4)
        pos = torch.arange(t)
        self.register_buffer("buckets", (pos[None] - pos[:, None]).clamp(-3, 4) + 3)
        self.register_buffer("causal", torch.ones(t, t, dtype=torch.bool).tril())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias(self.buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, q, k)
        b = torch.where(self.causal, b, -1e4)
        h = self.proj(x)  # (B, t, 4)
        scores = (h @ h.transpose(1, 2)).unsqueeze(1) + b  # (B, H, q, k)
        return torch.softmax(scores, -1).sum(1)


def test_an_unbatched_output_is_followed_through_views_and_masks_to_its_broadcast():
    plan, calls = _plan_of(_RelBias(), torch.randn(B, 5, 4))
    assert not plan.problems, plan.problems
    (job,) = [j for j in plan.rules if j.consumers is not None]
    (site,) = job.consumers
    assert site.node.name() == "AddBackward0"
    assert [v[0].name() for v in site.views] == ["PermuteBackward0", "UnsqueezeBackward0", "WhereBackward0"]
    assert site.views[2][2] is not None  # the mask's factor; shape-only steps have none
    release(calls)


def test_a_batch_sized_table_added_after_unsqueeze_is_not_taken_for_batched():
    """A position table of T == B rows: shapes cannot tell it from a batched output. Added
    directly, the add that broadcasts it says it is unbatched; the plan follows it there."""

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Embedding(B, 4)
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + self.pos(torch.arange(B))  # (B, T=B, 4) + (T=B, 4)

    plan, calls = _plan_of(Table(), torch.randn(B, B, 4))
    assert not plan.problems
    (job,) = [j for j in plan.rules if j.call.unit.name == "pos"]
    assert job.consumers is not None and job.consumers[0].node.name() == "AddBackward0"
    release(calls)
