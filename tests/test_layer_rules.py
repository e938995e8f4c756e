"""Each layer rule of the hook engine against the batch-of-one oracle, shapes drawn by hypothesis.

The oracle test is parametrised over the rule registry: every registered layer type needs a case
in ``CASES`` (a strategy drawing layers and inputs), or the tests fail.

The oracle runs the layer on one sample at a time (a batch of one) and differentiates that
sample's loss: the definition of a per-sample gradient, sharing nothing with the engine. Every
norm strategy the engine may pick ("keep", "ghost", "chunks", "index") is forced in turn, with
chunks of one sample and of the whole batch, so each code path meets the oracle.
"""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustclip.per_sample import HookEngine, ParamLayout
from robustclip.per_sample.rules import MATCHED, RULES, Rule, rule_for
from robustclip.per_sample.rules._terms import gram
from robustclip.per_sample.rules.conv import ConvTerm

SETTINGS = settings(max_examples=15, deadline=None)
#: a layer, a batch of inputs, and whether to force the convolutions' matmul path
Case = tuple[nn.Module, torch.Tensor, bool]
PLANS = (None, "keep", "ghost", "chunks", "index")


def _losses(out: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # a nonlinear per-sample loss: the output gradient differs from sample to sample
    return (torch.tanh(out) * r).flatten(1).sum(1)


def check_rule(layer: nn.Module, x: torch.Tensor, unbatched_ok: bool = False) -> None:
    """The engine's per-sample norms and clipped sum equal the batch-of-one oracle's."""
    model = nn.Sequential(layer).double()
    if x.is_floating_point():
        x = x.double()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = x.shape[0]
    with torch.no_grad():
        r = torch.randn_like(model(x))
    grads = []
    for i in range(batch):  # the oracle: a batch of one
        loss = _losses(model(x[i : i + 1]), r[i : i + 1]).sum()
        got = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, got)])
    norms = torch.stack([sum(g.pow(2).sum() for g in gi) for gi in grads]).sqrt()
    c = float(norms.median()) + 1e-12
    w = torch.clamp(c / norms.clamp_min(1e-30), max=1.0)
    ref = [sum(w[i] * grads[i][k] for i in range(batch)) for k in range(len(params))]

    def weight_fn(sq: torch.Tensor) -> torch.Tensor:
        return torch.clamp(c / sq.sum(0, keepdim=True).sqrt().clamp_min(1e-30), max=1.0)

    layout = ParamLayout.build(model, params)
    for plan in PLANS:
        for transient in (1, 2**23):
            engine = HookEngine(model, layout)
            engine._plan_override = plan
            engine.transient_elements = transient
            engine.attach()
            try:
                out = [torch.zeros_like(p) for p in params]
                got_norms = engine.accumulate(_losses(model(x), r), weight_fn, out)
            finally:
                engine.detach()
            flat = got_norms.pow(2).sum(0).sqrt()
            torch.testing.assert_close(flat, norms, rtol=1e-9, atol=1e-12, msg=f"norms, plan={plan}")
            for o, e in zip(out, ref):
                torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-12, msg=f"clipped sum, plan={plan}")


@contextlib.contextmanager
def conv_kernel(grouped: bool):
    """One per-sample convolution kernel forced: im2col + matmul (non-CPU devices, thin or late
    layers) or the grouped convolution (the CPU's for wide layers); the test shapes are too
    small for the shape rule to pick the grouped one."""
    with mock.patch.object(ConvTerm, "grouped", new=property(lambda self: grouped)):
        yield


# -- Linear ---------------------------------------------------------------------------------------


@st.composite
def linear_cases(draw: st.DrawFn) -> Case:
    batch, d_in, d_out = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    mid = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    bias = draw(st.booleans())
    layer = nn.Linear(d_in, d_out, bias=bias)
    if draw(st.booleans()) and bias:
        layer.weight.requires_grad_(False)  # bias-only training (BitFit)
    return layer, torch.randn(batch, *mid, d_in), False


@pytest.mark.parametrize("mid", [(), (5,)], ids=["2d", "3d"])
def test_linear_float32_clipped_sum_through_each_kernel(kernel, mid):
    """In float32 on the CPU the clipped sum goes through robustclip._kernels; each candidate
    kernel, forced, against the batch-of-one oracle computed in float64."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    x = torch.randn(6, *mid, 24)
    ref_layer = nn.Linear(24, 40).double()
    ref_layer.load_state_dict(layer.state_dict())
    with torch.no_grad():
        r = torch.randn_like(layer(x))
    grads = []
    for i in range(x.shape[0]):
        loss = _losses(ref_layer(x[i : i + 1].double()), r[i : i + 1].double()).sum()
        grads.append(torch.autograd.grad(loss, list(ref_layer.parameters())))
    norms = torch.stack([sum(g.pow(2).sum() for g in gi) for gi in grads]).sqrt()
    c = float(norms.median())
    w = torch.clamp(c / norms, max=1.0)
    ref = [sum(w[i] * grads[i][k] for i in range(x.shape[0])) for k in range(2)]
    model = nn.Sequential(layer)
    params = list(model.parameters())
    engine = HookEngine(model, ParamLayout.build(model, params))
    engine.attach()
    try:
        # added into existing gradients, and written as new ones (None: no gradient yet)
        for out in ([torch.zeros_like(p) for p in params], [None] * len(params)):
            weights = lambda sq: torch.clamp(c / sq.sum(0, keepdim=True).sqrt(), max=1.0)  # noqa: E731
            engine.accumulate(_losses(model(x), r), weights, out)
            for o, e, p in zip(out, ref, params):
                assert o.shape == p.shape and o.stride() == p.stride()
                torch.testing.assert_close(o.double(), e, rtol=1e-5, atol=1e-6)
    finally:
        engine.detach()


# -- Conv1d / Conv2d ------------------------------------------------------------------------------


@st.composite
def conv_cases(draw: st.DrawFn, nd: int) -> Case:
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "reflect", "circular", "same"]))
    stride = (1,) * nd if mode == "same" else tuple(draw(st.integers(1, 2)) for _ in range(nd))
    size = tuple(draw(st.integers(4, 7 if nd < 3 else 5)) for _ in range(nd))
    if mode == "same":
        padding: object = "same"
        padding_mode = "zeros"
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
        padding_mode = mode
        if mode == "reflect":
            padding = tuple(min(p, s - 1) for p, s in zip(padding, size))
    for i in range(nd):  # the output must not be empty
        pad = 2 * padding[i] if padding != "same" else dilation[i] * (k[i] - 1)
        if size[i] + pad < dilation[i] * (k[i] - 1) + 1:
            size = size[:i] + (dilation[i] * (k[i] - 1) + 1,) + size[i + 1 :]
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
    layer = cls(
        c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=draw(st.booleans()), padding_mode=padding_mode,
    )  # fmt: skip
    batch = draw(st.integers(1, 3))
    return layer, torch.randn(batch, c_in, *size), draw(st.booleans())


@st.composite
def conv_transpose_cases(draw: st.DrawFn, nd: int) -> Case:
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    out_pad = tuple(draw(st.integers(0, s - 1)) for s in stride)
    size = tuple(draw(st.integers(2, 5 if nd < 3 else 3)) for _ in range(nd))
    # the output must not be empty: (size - 1) stride - 2 padding + dilation (k - 1) + out_pad + 1
    padding = tuple(
        min(p, ((n - 1) * s + d * (kk - 1) + op) // 2) for p, n, s, d, kk, op in zip(padding, size, stride, dilation, k, out_pad)
    )
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]
    layer = cls(
        c_in, c_out, k, stride=stride, padding=padding, output_padding=out_pad, groups=groups,
        bias=draw(st.booleans()), dilation=dilation,
    )  # fmt: skip
    return layer, torch.randn(draw(st.integers(1, 3)), c_in, *size), draw(st.booleans())


SAME_PADDING_WARNING = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


@SAME_PADDING_WARNING
@SETTINGS
@given(case=st.one_of(conv_cases(1), conv_cases(2), conv_cases(3)))
def test_conv_patch_gram_without_unfolding(case):
    """The pixel-Gram shortcut (its separable sum over taps) equals the Gram of the unfolded
    patches, for 1-D, 2-D and 3-D convolutions."""
    layer, x, _ = case
    layer = layer.double()
    x = x.double()
    out = layer(x)
    term = ConvTerm(layer, x, torch.randn_like(out))
    v = term.v_chunk(slice(None))
    ref = gram(v, v)
    got = term.v_gram(slice(None), pixels_first=True)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


# -- Embedding ------------------------------------------------------------------------------------


@st.composite
def embedding_cases(draw: st.DrawFn) -> Case:
    batch, length, vocab, dim = (draw(st.integers(lo, hi)) for lo, hi in ((1, 4), (1, 6), (2, 7), (1, 4)))
    pad, transposed, max_norm = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    layer = nn.Embedding(vocab, dim, padding_idx=0 if pad else None, max_norm=1.0 if max_norm else None)
    if transposed:  # a non-contiguous index tensor
        idx = torch.randint(0, vocab, (length, batch)).t()
    else:
        idx = torch.randint(0, vocab, (batch, length))
    return layer, idx, False


class BagCall(nn.Module):
    """Calls its ``nn.EmbeddingBag`` (``rule_target``) on ``(B, L)`` indices: as 2-D bags, or
    flattened with offsets after dropping the entries equal to 1 (bags of unequal lengths,
    maybe empty), with per-sample weights read from a fixed table when asked."""

    def __init__(self, bag: nn.EmbeddingBag, with_offsets: bool, weighted: bool) -> None:
        super().__init__()
        self.rule_target = bag
        self.with_offsets, self.weighted = with_offsets, weighted
        self.register_buffer("table", torch.randn(bag.num_embeddings))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        bag = self.rule_target
        if not self.with_offsets:
            return bag(idx, per_sample_weights=self.table[idx] if self.weighted else None)
        keep = idx != 1
        flat = idx[keep]
        lengths = keep.sum(1)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        if not bag.include_last_offset:
            offsets = offsets[:-1]
        return bag(flat, offsets, per_sample_weights=self.table[flat] if self.weighted else None)


@st.composite
def embedding_bag_cases(draw: st.DrawFn) -> Case:
    batch, length, vocab, dim = (draw(st.integers(lo, hi)) for lo, hi in ((1, 4), (1, 6), (3, 7), (1, 4)))
    mode = draw(st.sampled_from(["sum", "mean"]))
    weighted = mode == "sum" and draw(st.booleans())
    layer = nn.EmbeddingBag(
        vocab, dim, mode=mode, padding_idx=draw(st.sampled_from([None, 0, 2])),
        include_last_offset=draw(st.booleans()),
    )  # fmt: skip
    idx = torch.randint(0, vocab, (batch, length))
    return BagCall(layer, draw(st.booleans()), weighted), idx, False


# -- normalisation layers ---------------------------------------------------------------------------


@st.composite
def layer_norm_cases(draw: st.DrawFn) -> Case:
    batch = draw(st.integers(1, 4))
    mid = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    # over a single value LayerNorm's output is the constant bias and its weight gradient is
    # pure rounding noise, which no two computations reproduce alike
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2).filter(lambda s: math.prod(s) > 1))
    bias = draw(st.booleans())
    layer = nn.LayerNorm(shape, elementwise_affine=True, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer, torch.randn(batch, *mid, *shape), False


@st.composite
def group_norm_cases(draw: st.DrawFn) -> Case:
    batch, groups = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    c = groups * draw(st.integers(2, 3))  # GroupNorm needs more than one value per group
    spatial = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    layer = nn.GroupNorm(groups, c)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer, torch.randn(batch, c, *spatial), False


@st.composite
def instance_norm_cases(draw: st.DrawFn, nd: int) -> Case:
    batch, c = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    spatial = [draw(st.integers(1, 4)) for _ in range(nd)]
    spatial[0] = max(spatial[0], 2)  # more than one value per channel
    track = draw(st.booleans())
    layer = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[nd - 1](c, affine=True, track_running_stats=track)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    if track and draw(st.booleans()):
        with torch.no_grad():
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
        layer.eval()  # normalised by the running statistics
    return layer, torch.randn(batch, c, *spatial), False


@st.composite
def rms_norm_cases(draw: st.DrawFn) -> Case:
    batch = draw(st.integers(1, 4))
    mid = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    layer = nn.RMSNorm(shape, eps=draw(st.sampled_from([None, 1e-5])))
    with torch.no_grad():
        layer.weight.normal_()
    return layer, torch.randn(batch, *mid, *shape), False


# -- layer types of other libraries, recognised by name ---------------------------------------------


@st.composite
def hf_conv1d_cases(draw: st.DrawFn) -> Case:
    from transformers.pytorch_utils import Conv1D

    batch, d_in, d_out = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    mid = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    layer = Conv1D(d_out, d_in)
    with torch.no_grad():
        layer.bias.normal_()
    if draw(st.booleans()):
        layer.weight.requires_grad_(False)
    elif draw(st.booleans()):
        layer.bias.requires_grad_(False)
    return layer, torch.randn(batch, *mid, d_in), False


class OnePlusScaleNorm(nn.Module):
    """Gemma's RMS norm: the scale is ``1 + weight`` (not zero at zero)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class ShiftScaleNorm(nn.Module):
    """A hand-written LayerNorm with a shift and a scale, in the opposite registration order."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.randn(c))
        self.gamma = nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(-1, keepdim=True)
        return self.gamma * xc / (xc.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() + self.beta


@st.composite
def affine_norm_cases(draw: st.DrawFn) -> Case:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    batch, c = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    mid = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    kind = draw(st.sampled_from([LlamaRMSNorm, T5LayerNorm, OnePlusScaleNorm, ShiftScaleNorm]))
    layer = kind(c)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    if kind is ShiftScaleNorm and draw(st.booleans()):
        draw(st.sampled_from([layer.beta, layer.gamma])).requires_grad_(False)
    return layer, torch.randn(batch, *mid, c), False


# -- attention --------------------------------------------------------------------------------------


class AttentionCall(nn.Module):
    """Calls its ``nn.MultiheadAttention`` (``rule_target``) on a batch-first input ``x``:
    self-attention on ``x``, or cross-attention of its first ``split`` positions to the rest
    (keys and values through fixed maps to ``kdim``/``vdim``), with masks that depend on each
    sample alone."""

    def __init__(self, mha: nn.MultiheadAttention, split: int | None, mask: str, need_weights: bool) -> None:
        super().__init__()
        self.rule_target = mha
        self.split, self.mask, self.need_weights = split, mask, need_weights
        e = mha.embed_dim
        self.register_buffer("to_k", torch.randn(mha.kdim, e))
        self.register_buffer("to_v", torch.randn(mha.vdim, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mha = self.rule_target
        q = kv = x
        if self.split is not None:
            q, kv = x[:, : self.split], x[:, self.split :]
        k, v = kv @ self.to_k.t(), kv @ self.to_v.t()
        if self.split is None and mha.kdim == mha.embed_dim and mha.vdim == mha.embed_dim:
            k = v = kv
        length, src = q.shape[1], k.shape[1]
        kw: dict = {}
        if self.mask in ("padding", "both"):
            pad = kv[..., 0] > 0.5
            pad[:, 0] = False  # every query sees at least one key
            kw["key_padding_mask"] = pad
        if self.mask in ("causal", "both"):
            kw["attn_mask"] = torch.ones(length, src, dtype=torch.bool, device=x.device).triu(1)
            kw["attn_mask"][:, 0] = False
        if self.mask == "causal_hint":  # the exact causal mask, declared with is_causal
            kw["attn_mask"] = torch.ones(length, src, dtype=torch.bool, device=x.device).triu(1)
            kw["is_causal"] = True
        if self.mask == "additive":
            kw["attn_mask"] = torch.linspace(-1, 1, length * src, dtype=x.dtype).reshape(length, src)
        if not mha.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out, _ = mha(q, k, v, need_weights=self.need_weights, **kw)
        return out if mha.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize(
    ("frozen", "bias"),
    [(n, True) for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")]
    + [("in_proj_weight", False), ("out_proj.weight", False)],
)
def test_attention_with_frozen_parameters(frozen, bias):
    """The rule covers ``out_proj`` (whose own forward never runs) also when every parameter of
    the attention module itself is frozen."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, bias=bias, batch_first=True)
    mha.get_parameter(frozen).requires_grad_(False)
    check_rule(AttentionCall(mha, None, "padding", False), torch.randn(3, 3, 4))


@st.composite
def attention_cases(draw: st.DrawFn) -> Case:
    heads = draw(st.sampled_from([1, 2]))
    e = heads * draw(st.integers(1, 3))
    cross = draw(st.booleans())
    kdim = vdim = None
    if cross and draw(st.booleans()):
        kdim, vdim = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    mha = nn.MultiheadAttention(
        e, heads, bias=draw(st.booleans()), add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()), kdim=kdim, vdim=vdim, batch_first=draw(st.booleans()),
    )  # fmt: skip
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_()
    if draw(st.booleans()):
        draw(st.sampled_from([p for p in mha.parameters()])).requires_grad_(False)
    length = draw(st.integers(1, 4))
    split = length if cross else None
    total = length + (draw(st.integers(1, 4)) if cross else 0)
    mask = draw(st.sampled_from(["none", "padding", "causal", "both", "additive", "causal_hint"]))
    layer = AttentionCall(mha, split, mask, draw(st.booleans()))
    return layer, torch.randn(draw(st.integers(1, 3)), total, e), False


# -- recurrent layers ---------------------------------------------------------------------------------


class RecurrentCall(nn.Module):
    """Calls its recurrent layer (``rule_target``) on a batch-first ``x``; the losses read the
    output sequence, the final states, or both; the initial state, when given, depends on each
    sample alone."""

    def __init__(self, rnn: nn.RNNBase, reads: str, with_h0: bool) -> None:
        super().__init__()
        self.rule_target = rnn
        self.reads, self.with_h0 = reads, with_h0
        n = rnn.num_layers * (2 if rnn.bidirectional else 1)
        self.register_buffer("h0_scale", torch.randn(n, 1, rnn.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rnn = self.rule_target
        seq = x if rnn.batch_first else x.transpose(0, 1)
        hx = None
        if self.with_h0:
            h0 = torch.tanh(x[:, 0].sum(-1)).reshape(1, -1, 1) * self.h0_scale
            hx = (h0, 0.5 * h0) if isinstance(rnn, nn.LSTM) else h0
        out, hidden = rnn(seq, hx)
        out = out if rnn.batch_first else out.transpose(0, 1)
        states = list(hidden) if isinstance(hidden, tuple) else [hidden]
        parts = [s.transpose(0, 1).flatten(1) for s in states]
        if self.reads == "output":
            return out.flatten(1)
        if self.reads == "h_n":  # a classifier on the final states
            return parts[0]
        return torch.cat([out.flatten(1), *parts], 1)


@st.composite
def recurrent_cases(draw: st.DrawFn, cls: type) -> Case:
    batch, length, d_in, hid = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kw: dict = {"nonlinearity": draw(st.sampled_from(["tanh", "relu"]))} if cls is nn.RNN else {}
    rnn = cls(
        d_in, hid, num_layers=draw(st.integers(1, 2)), bias=draw(st.booleans()),
        batch_first=draw(st.booleans()), bidirectional=draw(st.booleans()), **kw,
    )  # fmt: skip
    if draw(st.booleans()):
        draw(st.sampled_from(list(rnn.parameters()))).requires_grad_(False)
    layer = RecurrentCall(rnn, draw(st.sampled_from(["output", "h_n", "both"])), draw(st.booleans()))
    return layer, torch.randn(batch, length, d_in), False


# -- every registered rule against the oracle ------------------------------------------------------

#: one case per registered layer type: a strategy drawing (layer, batch input, whether to take
#: the convolutions' matmul path). A rule registered without a case here fails the tests below.
CASES: dict[type | str, st.SearchStrategy[Case]] = {
    nn.Linear: linear_cases(),
    nn.Conv1d: conv_cases(1),
    nn.Conv2d: conv_cases(2),
    nn.Conv3d: conv_cases(3),
    nn.ConvTranspose1d: conv_transpose_cases(1),
    nn.ConvTranspose2d: conv_transpose_cases(2),
    nn.ConvTranspose3d: conv_transpose_cases(3),
    nn.Embedding: embedding_cases(),
    nn.EmbeddingBag: embedding_bag_cases(),
    nn.LayerNorm: layer_norm_cases(),
    nn.GroupNorm: group_norm_cases(),
    nn.RMSNorm: rms_norm_cases(),
    nn.InstanceNorm1d: instance_norm_cases(1),
    nn.InstanceNorm2d: instance_norm_cases(2),
    nn.InstanceNorm3d: instance_norm_cases(3),
    "Conv1D": hf_conv1d_cases(),
    "elementwise-affine norm": affine_norm_cases(),
    nn.MultiheadAttention: attention_cases(),
    nn.RNN: recurrent_cases(nn.RNN),
    nn.LSTM: recurrent_cases(nn.LSTM),
    nn.GRU: recurrent_cases(nn.GRU),
}
#: every registered rule: by type, and by name for those registered with a predicate
ALL_RULES: dict[type | str, Rule] = {**RULES, **MATCHED}


def test_every_registered_rule_has_a_case():
    missing = [r.name for t, r in ALL_RULES.items() if t not in CASES]
    assert not missing, f"registered rules without a test case: {missing}; add them to CASES"
    assert set(CASES) <= set(ALL_RULES), "a case for a layer type that has no registered rule"


@SAME_PADDING_WARNING
@pytest.mark.parametrize("module_type", list(ALL_RULES), ids=lambda t: ALL_RULES[t].name)
@SETTINGS
@given(data=st.data())
def test_rule_against_the_batch_of_one_oracle(module_type, data):
    name = ALL_RULES[module_type].name
    assert module_type in CASES, f"the rule of {name} has no test case: add one to CASES"
    layer, x, matmul_path = data.draw(CASES[module_type])
    target = getattr(layer, "rule_target", layer)  # a layer called by a wrapper
    if isinstance(module_type, str):
        assert rule_for(target)[0] is MATCHED[module_type]
    else:
        assert type(target) is module_type
    with conv_kernel(grouped=not matmul_path):  # no effect on other layers
        check_rule(layer, x)


# -- the registry ---------------------------------------------------------------------------------


def test_registry_covers_the_issue_layers():
    for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm):
        assert cls in RULES
    for cls in (
        nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.InstanceNorm1d, nn.InstanceNorm2d,
        nn.InstanceNorm3d, nn.EmbeddingBag, nn.MultiheadAttention, nn.RNN, nn.LSTM, nn.GRU,
    ):  # fmt: skip
        assert cls in RULES
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    from transformers.pytorch_utils import Conv1D

    for layer in (Conv1D(3, 2), LlamaRMSNorm(4), T5LayerNorm(4)):
        rule, why = rule_for(layer)
        assert rule is not None and rule.name in MATCHED, why


def test_rule_authors_get_terms_and_the_supported_layers_from_the_registry():
    from robustclip.per_sample import rules
    from robustclip.per_sample.rules import _terms

    assert (rules.Term, rules.DenseTerm, rules.OuterTerm) == (_terms.Term, _terms.DenseTerm, _terms.OuterTerm)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4).eval())
    engine = HookEngine(model, ParamLayout.build(model, list(model.parameters())))
    with pytest.warns(UserWarning, match="BatchNorm1d") as record:
        engine.attach()
    engine.detach()
    message = str(record[0].message)
    listed = message.split("Supported layers: ")[1].rstrip(".").split(", ")
    assert sorted(listed) == sorted(r.name for r in ALL_RULES.values())


def test_rule_for_refuses_what_it_does_not_model():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Renamed(nn.Linear):  # same forward: the rule still applies
        pass

    assert rule_for(Scaled(2, 2))[0] is None
    assert "overrides forward" in rule_for(Scaled(2, 2))[1]
    assert rule_for(Renamed(2, 2))[0] is RULES[nn.Linear]
    assert rule_for(nn.Embedding(3, 2, scale_grad_by_freq=True))[0] is None
    assert rule_for(nn.Embedding(3, 2, sparse=True))[0] is None
    assert rule_for(nn.BatchNorm1d(3))[0] is None
    assert "max" in rule_for(nn.EmbeddingBag(3, 2, mode="max"))[1]
    assert "scale_grad_by_freq" in rule_for(nn.EmbeddingBag(3, 2, scale_grad_by_freq=True))[1]


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_index_norm_is_exact_with_repeats(padding_idx):
    """Repeated tokens within a sample add up before the norm (the sorted-groups path)."""
    layer = nn.Embedding(5, 3, padding_idx=padding_idx)
    idx = torch.tensor([[1, 1, 2, 1, 4, 2], [0, 0, 0, 0, 0, 0], [2, 2, 2, 3, 3, 1]])
    check_rule(layer, idx)


@pytest.mark.usefixtures("autotune_on")
def test_conv_kernel_choice_is_timed_once_and_fixed_in_deterministic_mode(monkeypatch):
    """The first call for a layer shape times both per-sample kernels and remembers the faster;
    both give the same per-sample gradients; deterministic mode always takes im2col."""
    from robustclip import _kernels
    from robustclip.per_sample.rules import conv as conv_rule

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    out = layer(x)
    g = torch.randn_like(out)
    monkeypatch.setattr(_kernels, "_CHOICES", {})
    term = conv_rule.ConvTerm(layer, x, g)
    assert term.grouped is None  # not timed yet
    # a single sample (the first-step check) is not worth timing: grouped, nothing remembered
    torch.testing.assert_close(term.materialize(slice(2, 3)), term._materialize_grouped(slice(2, 3)))
    assert term.grouped is None and not _kernels._CHOICES
    got = term.materialize(slice(None))
    assert term.grouped in (True, False) and len(_kernels._CHOICES) == 1
    grouped = term._materialize_grouped(slice(None))
    im2col = term._materialize_im2col(slice(None))
    # oracle: each sample's weight gradient by autograd, one sample at a time
    for i in range(5):
        (ref,) = torch.autograd.grad(layer(x[i : i + 1]), layer.weight, g[i : i + 1])
        for mine in (got, grouped, im2col):
            torch.testing.assert_close(mine[i], ref, rtol=1e-10, atol=1e-12)
    # a chunk of samples in the middle (the im2col path slices its own sub-chunks)
    monkeypatch.setattr(conv_rule, "IM2COL_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(term._materialize_im2col(slice(1, 4)), im2col[1:4], rtol=1e-12, atol=1e-14)
    # another batch size of the same layer reuses the choice
    out2 = layer(x[:3])
    assert conv_rule.ConvTerm(layer, x[:3], torch.randn_like(out2)).grouped is term.grouped
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert term.grouped is False
    finally:
        torch.use_deterministic_algorithms(prev)


def test_conv_kernel_without_autotune_follows_the_shape(monkeypatch):
    """Autotuning off: the layer's shape alone picks the kernel (nothing timed or remembered),
    the same for any batch size; deterministic mode and other devices take im2col."""
    from robustclip import _kernels
    from robustclip.per_sample.rules import conv as conv_rule

    monkeypatch.setattr(_kernels, "_CHOICES", {})

    def term(c_in: int, side: int, batch: int = 2, groups: int = 1) -> ConvTerm:
        layer = nn.Conv2d(c_in, 2 * groups, 3, padding=1, groups=groups)
        x = torch.randn(batch, c_in, side, side)
        return ConvTerm(layer, x, torch.randn_like(layer(x)))

    positions = conv_rule.GROUPED_MIN_POSITIONS
    side = math.isqrt(positions - 1) + 1  # the smallest square side with enough positions
    wide = conv_rule.GROUPED_MIN_CHANNELS
    assert term(wide, side).grouped is True and term(wide, side, batch=5).grouped is True
    assert term(wide - 1, side).grouped is False  # thin input: im2col
    assert term(wide, side - 1).grouped is False  # few positions: im2col
    assert term(2 * wide, side, groups=2).grouped is True and term(2 * wide, side, groups=4).grouped is False
    assert not _kernels._CHOICES
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert term(wide, side).grouped is False
    finally:
        torch.use_deterministic_algorithms(prev)


@SAME_PADDING_WARNING
@SETTINGS
@given(case=st.one_of(conv_cases(1), conv_cases(2), conv_cases(3)))
def test_conv_ghost_norm_equals_the_materialised_norm(case):
    """The conv term's own Gram norm (pixel Gram, in-place product with the output-gradient
    Gram) equals the squared norm of each materialised per-sample gradient."""
    layer, x, _ = case
    layer, x = layer.double(), x.double()
    term = ConvTerm(layer, x, torch.randn_like(layer(x)))
    ref = term._materialize_im2col(slice(None)).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(term.ghost_sq(slice(None)), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(term.ghost_sq(slice(1, None)), ref[1:], rtol=1e-9, atol=1e-12)


def test_conv_cost_model_prices_the_pixel_gram():
    """A ResNet stage-2 convolution (128 channels, 16x16): the Gram norm without unfolding
    costs less than materialising, and the cost model knows it; unfolding it would not."""
    from robustclip.per_sample._hooks import norms

    layer = nn.Conv2d(128, 128, 3, padding=1, bias=False)
    x = torch.randn(2, 128, 16, 16)
    with torch.no_grad():
        term = ConvTerm(layer, x, torch.randn_like(layer(x)))
    unfolded = 2 * term.T * term.T * (term.n_u + term.n_v + 1)
    assert term.ghost_cost() < term.materialize_cost() < unfolded
    assert norms.choose([term], keep_ok=False) == "ghost"
    # a late, narrow-positions layer: the unfolded Gram is the cheaper one, and is what is priced
    late = nn.Conv2d(512, 512, 3, padding=1, bias=False)
    x = torch.randn(2, 512, 4, 4)
    with torch.no_grad():
        t = ConvTerm(late, x, torch.randn_like(late(x)))
    assert not t._pixels_first() or t._pixel_gram_cost() < t.T * t.T * t.n_v
    assert t.ghost_cost() <= 2 * t.T * t.T * (t.n_u + t.n_v + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_positions_of_a_single_position_is_a_view(dtype):
    """2-D Linear inputs have one position: the bias term is the output gradient itself (a view,
    no reduction into a new tensor), in float32 at least."""
    from robustclip.per_sample.rules._util import sum_positions

    g = torch.randn(4, 1, 5).to(dtype)
    got = sum_positions(g)
    assert got.dtype == torch.float32 and got.shape == (4, 5)
    torch.testing.assert_close(got, g.float().sum(1))
    if dtype == torch.float32:
        assert got.data_ptr() == g.data_ptr()
    many = torch.randn(4, 3, 5)
    torch.testing.assert_close(sum_positions(many), many.sum(1))
