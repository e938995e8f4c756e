"""The layer rules end to end: ``rc.Clipper(..., rc.per_sample_clip(c))`` on small models built
around each rule, against a float64 loop over samples (a batch of one each) at every one of
three optimizer steps.

The hook engine warns when a module falls back to torch.func, and the tests run with warnings
as errors, so each model here passes only through its rules.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import robustclip as rc
from robustclip.per_sample.rules import rule_for

STEPS = 3


def _losses(out: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(out) * r).flatten(1).sum(1)


def _loop_clipped_mean(model: nn.Module, x: torch.Tensor, r: torch.Tensor, c: float) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        loss = _losses(model(x[i : i + 1]), r[i : i + 1]).sum()
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in gs))
        scale = min(1.0, c / norm) if norm > 0 else 1.0
        for t, g in zip(total, gs):
            t.add_(g, alpha=scale)
    return [t / x.shape[0] for t in total]


def check_three_steps(model: nn.Module, x: torch.Tensor, covered: list[nn.Module]) -> None:
    """Three steps of per-sample clipping through the hook engine equal the loop's, step by step."""
    for m in covered:
        rule, why = rule_for(m)
        assert rule is not None, f"{type(m).__name__} takes no rule: {why}"
    torch.manual_seed(0)
    model = model.double()
    if x.is_floating_point():
        x = x.double()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        r = torch.randn_like(model(x))
        norms = []
        for i in range(x.shape[0]):
            params = [p for p in ref.parameters() if p.requires_grad]
            with torch.enable_grad():
                gs = torch.autograd.grad(_losses(ref(x[i : i + 1]), r[i : i + 1]).sum(), params, allow_unused=True)
            norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in gs if g is not None)))
    c = sorted(norms)[len(norms) // 2]  # about half the samples are clipped
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05)
    clipper = rc.Clipper(model, opt, rc.per_sample_clip(c))
    for step in range(STEPS):
        clipper.backward(_losses(model(x), r))
        expected = _loop_clipped_mean(ref, x, r, c)
        clipper.step()
        got = [p.grad for p in model.parameters() if p.requires_grad]
        for g, e in zip(got, expected):
            assert g is not None
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12, msg=f"clipped mean gradient, step {step}")
        for p, e in zip([p for p in ref.parameters() if p.requires_grad], expected):
            p.grad = e
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


# -- Hugging Face Conv1D ------------------------------------------------------------------------------


class ConvOneDMLP(nn.Module):
    """GPT-2's MLP: two ``Conv1D`` with a nonlinearity between them."""

    def __init__(self, d: int = 5, hidden: int = 7) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc = Conv1D(hidden, d)
        self.proj = Conv1D(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.fc(x)))


@pytest.mark.parametrize("mid", [(), (3,)], ids=["2d", "3d"])
def test_hf_conv1d_end_to_end(mid):
    torch.manual_seed(1)
    model = ConvOneDMLP()
    with torch.no_grad():
        model.fc.bias.normal_()
    check_three_steps(model, torch.randn(5, *mid, 5), [model.fc, model.proj])


def test_hf_conv1d_recognised_by_name_without_importing_transformers():
    from transformers.pytorch_utils import Conv1D

    from robustclip.per_sample.rules.hf_conv1d import is_hf_conv1d

    assert is_hf_conv1d(Conv1D(3, 2))

    class Conv1D_(nn.Module):  # noqa: N801 - a look-alike from elsewhere: not recognised
        def __init__(self) -> None:
            super().__init__()
            self.nf = 3
            self.weight = nn.Parameter(torch.zeros(2, 3))

    Conv1D_.__name__ = "Conv1D"
    assert not is_hf_conv1d(Conv1D_())

    class Doubled(Conv1D):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    class Renamed(Conv1D):
        pass

    assert not is_hf_conv1d(Doubled(3, 2)) and rule_for(Doubled(3, 2))[0] is None
    assert is_hf_conv1d(Renamed(3, 2))


# -- normalisation layers that are not torch's own ----------------------------------------------------


class NormedMLP(nn.Module):
    def __init__(self, norm: nn.Module, d: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.norm = norm
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.inp(x)))


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_hf_rms_norms_end_to_end(kind):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(2)
    norm = (LlamaRMSNorm if kind == "llama" else T5LayerNorm)(6)
    with torch.no_grad():
        norm.weight.normal_()
    model = NormedMLP(norm)
    check_three_steps(model, torch.randn(5, 3, 4), [model.inp, model.norm, model.out])


class ChannelMixingNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True) * self.weight.flip(0)


class PooledStatsNorm(nn.Module):
    """Normalises with statistics over the batch, without keeping running statistics."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0, keepdim=True)) * self.weight


class ChannelsFirstNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=1, keepdim=True) * self.weight[:, None]


class QuadraticNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight**2


@pytest.mark.parametrize(
    ("cls", "why"),
    [
        (ChannelMixingNorm, "not affine and elementwise"),
        (PooledStatsNorm, "depends on the other samples"),
        (ChannelsFirstNorm, "does not run as an elementwise-affine norm on a (B, T, 6) input"),
        (QuadraticNorm, "not affine and elementwise"),
    ],
)
def test_norms_of_another_form_take_the_fallback_with_the_reason(cls, why):
    """Modules that look like norms but are not elementwise-affine in their parameters, or mix
    the samples, are refused by the rule's check, and the per-module fallback is right for them
    (against the loop, three steps)."""
    layer = cls(6)
    rule, reason = rule_for(layer)
    assert rule is None and why in reason
    torch.manual_seed(3)
    model = NormedMLP(layer)
    if cls is PooledStatsNorm:
        return  # no per-sample gradient exists: the batch-of-one loop is not its oracle
    with pytest.warns(UserWarning, match=cls.__name__):
        # (channels first: the normalised dimension, 6, is dimension 1)
        check_three_steps(model, torch.randn(5, 6, 4), [model.inp, model.out])


# -- attention --------------------------------------------------------------------------------------


class TinyEncoder(nn.Module):
    """A 2-layer ``nn.TransformerEncoder`` on batch-first inputs, with a padding mask that
    depends on each sample alone."""

    def __init__(self, batch_first: bool, dropout: float = 0.0, d: int = 8) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(3, d)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=dropout, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = x[..., 0] > 0.8
        pad[:, 0] = False
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h, src_key_padding_mask=pad)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)


def test_transformer_encoder_end_to_end():
    torch.manual_seed(4)
    model = TinyEncoder(True)
    attn = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    check_three_steps(model, torch.randn(5, 4, 3), attn)


class TinyTransformer(nn.Module):
    """``nn.Transformer`` (encoder and decoder: self-, causal and cross-attention), batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.tr = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        src, tgt = h[:, :3], h[:, 3:]
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=h.dtype)
        return self.head(self.tr(src, tgt, tgt_mask=mask, tgt_is_causal=True))


def test_transformer_encoder_decoder_end_to_end():
    torch.manual_seed(12)
    model = TinyTransformer()
    attn = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attn) == 3
    check_three_steps(model, torch.randn(5, 6, 3), attn)


class SequenceFirstAttention(nn.Module):
    """Self-attention of a sequence-first ``nn.MultiheadAttention`` (``batch_first=False``)
    between batch-first layers, causal, with a padding mask."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.attn = nn.MultiheadAttention(d, 2)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = x[..., 0] > 0.8
        pad[:, 0] = False
        h = self.inp(x).transpose(0, 1)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        h, _ = self.attn(h, h, h, key_padding_mask=pad, attn_mask=causal)
        return self.head(h.transpose(0, 1))


def test_sequence_first_attention_end_to_end():
    torch.manual_seed(5)
    model = SequenceFirstAttention()
    check_three_steps(model, torch.randn(5, 4, 3), [model.attn, model.inp, model.head])


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch.func over attention
def test_attention_with_dropout_takes_a_correct_fallback():
    """Attention dropout is not modelled: the layer falls back (with the reason), and the
    fallback is right (evaluation mode: no dropout applied, three steps against the loop)."""
    model = TinyEncoder(True, dropout=0.1).eval()
    attn = model.enc.layers[0].self_attn
    rule, why = rule_for(attn)
    assert rule is None and "dropout" in why
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        check_three_steps(model, torch.randn(5, 4, 3), [model.inp, model.head])


# -- convolutions and instance normalisation ------------------------------------------------------------


class VolumeNet(nn.Module):
    """Conv3d and InstanceNorm3d, then ConvTranspose2d and InstanceNorm2d on the pooled planes,
    then ConvTranspose1d and InstanceNorm1d on the pooled rows."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(2, 3, 2, padding=1)
        self.n3 = nn.InstanceNorm3d(3, affine=True)
        self.t2 = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1, groups=1)
        self.n2 = nn.InstanceNorm2d(2, affine=True)
        self.t1 = nn.ConvTranspose1d(2, 4, 2, stride=2, groups=2)
        self.n1 = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.n3(self.c3(x)))  # (B, 3, 4, 4, 4)
        h = torch.tanh(self.n2(self.t2(h.mean(2))))  # (B, 2, 8, 8)
        return self.n1(self.t1(h.mean(2)))  # (B, 4, 16)


def test_conv3d_conv_transpose_and_instance_norm_end_to_end():
    torch.manual_seed(6)
    model = VolumeNet()
    with torch.no_grad():
        for m in (model.n3, model.n2, model.n1):
            m.weight.normal_()
            m.bias.normal_()
    covered = [model.c3, model.n3, model.t2, model.n2, model.t1, model.n1]
    check_three_steps(model, torch.randn(4, 2, 3, 3, 3), covered)


# -- EmbeddingBag -------------------------------------------------------------------------------------


class BagClassifier(nn.Module):
    """A bag-of-words classifier: variable-length bags cut by offsets (entries equal to 1
    dropped), mean of the embeddings, then a Linear layer."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 4, mode=mode, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        keep = idx != 1
        lengths = keep.sum(1)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
        return self.head(self.bag(idx[keep], offsets))


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_end_to_end(mode):
    torch.manual_seed(7)
    model = BagClassifier(mode)
    idx = torch.randint(0, 9, (5, 6))
    idx[1, 0] = 3  # a repeated index within a bag
    idx[1, 1] = 3
    check_three_steps(model, idx, [model.bag, model.head])


# -- recurrent layers -------------------------------------------------------------------------------


class RecurrentClassifier(nn.Module):
    """Embedding, a recurrent layer, and a head on the last layer's final hidden state(s) (the
    usual classifier) or on the mean of the output sequence."""

    def __init__(self, cls: type, layers: int, bidirectional: bool, batch_first: bool, head_on: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.rnn = cls(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.dirs = 2 if bidirectional else 1
        self.head = nn.Linear(5 * self.dirs, 3)
        self.head_on = head_on

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        if not self.rnn.batch_first:
            h = h.transpose(0, 1)
        out, hidden = self.rnn(h)
        if self.head_on == "mean":
            return self.head(out.mean(1 if self.rnn.batch_first else 0))
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden
        last = h_n[-self.dirs :].transpose(0, 1).reshape(idx.shape[0], -1)
        return self.head(last)


@pytest.mark.parametrize(
    ("cls", "layers", "bidirectional", "batch_first", "head_on"),
    [
        (nn.LSTM, 1, False, True, "h_n"),
        (nn.GRU, 1, False, True, "h_n"),
        (nn.RNN, 1, False, False, "mean"),
        (nn.LSTM, 2, True, True, "h_n"),
        (nn.LSTM, 2, True, False, "mean"),
        (nn.GRU, 2, True, False, "h_n"),
    ],
)
def test_recurrent_classifiers_end_to_end(cls, layers, bidirectional, batch_first, head_on):
    torch.manual_seed(8)
    model = RecurrentClassifier(cls, layers, bidirectional, batch_first, head_on)
    check_three_steps(model, torch.randint(0, 11, (5, 4)), [model.emb, model.rnn, model.head])


class StatefulRecurrent(nn.Module):
    """A recurrent layer whose input and initial state(s) both come from trained layers below
    it, and a head reading the whole output and every final state: the gradients of the
    layer's input and initial states (which the rule hands the layer's backward node) reach
    trained parameters."""

    def __init__(self, cls: type, layers: int, bidirectional: bool, batch_first: bool, **kw: str) -> None:
        super().__init__()
        dirs = 2 if bidirectional else 1
        self.emb = nn.Embedding(11, 4)
        self.init = nn.Linear(4, layers * dirs * 5)
        self.rnn = cls(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **kw)
        self.head = nn.LazyLinear(3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        b = idx.shape[0]
        h0 = torch.tanh(self.init(h.mean(1))).reshape(b, -1, 5).transpose(0, 1).contiguous()
        hx = (h0, 0.5 * h0) if isinstance(self.rnn, nn.LSTM) else h0
        out, hidden = self.rnn(h if self.rnn.batch_first else h.transpose(0, 1), hx)
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        states = list(hidden) if isinstance(hidden, tuple) else [hidden]
        return self.head(torch.cat([out.flatten(1), *(s.transpose(0, 1).flatten(1) for s in states)], 1))


@pytest.mark.parametrize(
    ("cls", "layers", "bidirectional", "batch_first", "kw"),
    [
        (nn.LSTM, 1, False, True, {}),
        (nn.LSTM, 2, True, False, {}),
        (nn.GRU, 2, True, True, {}),
        (nn.GRU, 1, False, False, {}),
        (nn.RNN, 2, True, True, {"nonlinearity": "relu"}),
        (nn.RNN, 1, False, False, {}),
    ],
)
def test_recurrent_input_and_state_gradients_reach_the_layers_below(cls, layers, bidirectional, batch_first, kw):
    torch.manual_seed(3)
    model = StatefulRecurrent(cls, layers, bidirectional, batch_first, **kw)
    x = torch.randint(0, 11, (5, 4))
    model(x)  # materialises the lazy head
    check_three_steps(model, x, [model.emb, model.init, model.rnn, model.head])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recorded_recurrent_call_keeps_torch_gradients_for_a_plain_backward(cls):
    """A call recorded by the engine but differentiated by a plain ``backward()`` (no rule
    solution for it) gets torch's own gradients, the layer's parameters included."""
    from robustclip.per_sample._engine import ParamLayout
    from robustclip.per_sample._hooks.engine import HookEngine

    torch.manual_seed(4)
    model = StatefulRecurrent(cls, 2, True, False).double()
    x = torch.randint(0, 11, (5, 4))
    model(x)
    ref = copy.deepcopy(model)
    engine = HookEngine(model, ParamLayout.build(model, list(model.parameters())))
    engine.attach()
    try:
        model(x).pow(2).sum().backward()
    finally:
        engine.detach()
    ref(x).pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_recurrent_backward_reuses_the_rule_solution(monkeypatch):
    """After the first step (whose reference check runs torch's own backward of the layer), the
    layer's backward node takes the input and state gradients the rule computed: torch's
    recurrence is not run again."""
    from robustclip.per_sample.rules import recurrent

    native = []
    orig = recurrent._native
    monkeypatch.setattr(recurrent, "_native", lambda *a: (native.append(1), orig(*a))[1])
    model = StatefulRecurrent(nn.LSTM, 2, True, True).double()
    x = torch.randint(0, 11, (5, 4))
    model(x)
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.01), rc.per_sample_clip(1.0))
    counts = []
    for _ in range(3):
        clipper.backward(_losses(model(x), torch.ones(5, 3, dtype=torch.float64)))
        clipper.step()
        counts.append(len(native))
    assert counts[0] >= 1 and counts[1] == counts[0] and counts[2] == counts[0]


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.filterwarnings("ignore::robustclip.per_sample.PerSampleFallbackWarning")
def test_recurrent_layer_with_dropout_between_layers_takes_a_correct_fallback():
    """Dropout between layers is not modelled: the layer falls back, with the reason, and the
    fallback must be right (evaluation mode, three steps against the loop)."""
    model = RecurrentClassifier(nn.GRU, 2, False, True, "h_n")
    model.rnn.dropout = 0.3
    model.eval()
    rule, why = rule_for(model.rnn)
    assert rule is None and "dropout" in why
    check_three_steps(model, torch.randint(0, 11, (5, 4)), [model.emb, model.head])


# -- layers refused --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::robustclip.per_sample.PerSampleFallbackWarning")
def test_embedding_scaled_by_batch_frequency_is_refused_not_trained():
    """``scale_grad_by_freq=True`` scales by index counts over the whole batch: no rule, and the
    first-step check raises instead of training on a gradient that is not per sample."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 3, scale_grad_by_freq=True)
            self.head = nn.Linear(3, 2)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(idx)).mean(1)

    model = Model()
    assert "scale_grad_by_freq" in rule_for(model.emb)[1]
    with pytest.raises(ValueError, match="disagrees with autograd for emb.weight"):
        check_three_steps(model, torch.tensor([[1, 1, 2], [1, 3, 3], [4, 1, 5]]), [model.head])


# -- bf16 autocast ----------------------------------------------------------------------------------------


def _bf16_models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(9)
    return {
        "conv1d": (ConvOneDMLP(), torch.randn(5, 3, 5)),
        "llama_norm": (NormedMLP(LlamaRMSNorm(6)), torch.randn(5, 3, 4)),
        "encoder": (TinyEncoder(True), torch.randn(5, 4, 3)),
        "sequence_first_attention": (SequenceFirstAttention(), torch.randn(5, 4, 3)),
        "conv3d_transpose_instance_norm": (VolumeNet(), torch.randn(4, 2, 3, 3, 3)),
        "embedding_bag": (BagClassifier("mean"), torch.randint(0, 9, (5, 6))),
        "lstm": (RecurrentClassifier(nn.LSTM, 2, True, False, "h_n"), torch.randint(0, 11, (5, 4))),
        "gru": (RecurrentClassifier(nn.GRU, 1, False, True, "mean"), torch.randint(0, 11, (5, 4))),
    }


def _bf16_clipped(model: nn.Module, x: torch.Tensor, r: torch.Tensor, c: float, engine: str) -> torch.Tensor:
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    clipper = rc.Clipper(model, torch.optim.SGD(params, lr=0.0), rc.per_sample_clip(c, engine=engine))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    clipper.backward(_losses(out.float(), r))
    clipper.step()
    return torch.cat([p.grad.double().flatten() for p in params if p.grad is not None])


@pytest.mark.parametrize("name", list(_bf16_models()))
def test_rules_under_bf16_autocast(name):
    """Under bf16 autocast the clipped gradient's error against the float64 loop is no larger
    than twice the larger of the plain bf16 mean gradient's error (against its float64 value)
    and the reference loop's own error under bf16 autocast."""
    model, x = _bf16_models()[name]
    ref = copy.deepcopy(model).double()
    xd = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        r = torch.randn_like(model(x).float())
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(_losses(ref(xd[i : i + 1]), r[i : i + 1].double()).sum(), list(ref.parameters()))
        norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in gs)))
    c = sorted(norms)[len(norms) // 2]
    expected = torch.cat([g.flatten() for g in _loop_clipped_mean(ref, xd, r.double(), c)])
    mean_ref = torch.autograd.grad(_losses(ref(xd), r.double()).mean(), list(ref.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    mean_bf16 = torch.autograd.grad(_losses(out.float(), r).mean(), params)
    flat = lambda gs: torch.cat([g.double().flatten() for g in gs])  # noqa: E731
    plain_err = float((flat(mean_bf16) - flat(mean_ref)).norm() / flat(mean_ref).norm())
    loop_err = float((_bf16_clipped(model, x, r, c, "loop") - expected).norm() / expected.norm())
    err = float((_bf16_clipped(model, x, r, c, "hooks") - expected).norm() / expected.norm())
    bound = 2 * max(plain_err, loop_err)
    assert err <= bound, f"bf16 clipped gradient error {err:.2e}; plain bf16 {plain_err:.2e}, loop bf16 {loop_err:.2e}"


# -- what the rules leave to the fallbacks ----------------------------------------------------------------


class AttentionWeightsUsed(nn.Module):
    """The losses use the attention weights the layer returns, not only its output."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        out, weights = self.attn(h, h, h)
        return out.flatten(1) + weights.flatten(1).sum(1, keepdim=True)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_attention_weights_in_the_losses_are_not_missed():
    """The rule differentiates through the attention output only; when the losses also use the
    returned weights, the layer's parameters are reached outside it, and the whole model falls
    back with a warning (right at every step) instead of missing that part of the gradient."""
    torch.manual_seed(10)
    model = AttentionWeightsUsed()
    with pytest.warns(UserWarning, match="cannot split this model's gradient by sample"):
        check_three_steps(model, torch.randn(5, 3, 3), [model.attn])


class PackedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = (x[..., 0] > -0.5).sum(1).clamp_min(1)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.rnn(packed)
        return self.head(h_n[-1])


@pytest.mark.filterwarnings("ignore::robustclip.per_sample.PerSampleFallbackWarning")
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_packed_sequences_take_a_correct_fallback():
    torch.manual_seed(11)
    check_three_steps(PackedLSTM(), torch.randn(5, 4, 3), [])


class MaxBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 4, mode="max")
        self.head = nn.Linear(4, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(idx))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_embedding_bag_max_takes_a_correct_module_fallback():
    torch.manual_seed(13)
    model = MaxBag()
    assert "max" in rule_for(model.bag)[1]
    with pytest.warns(UserWarning, match="EmbeddingBag"):
        check_three_steps(model, torch.randint(0, 9, (5, 6)), [model.head])
