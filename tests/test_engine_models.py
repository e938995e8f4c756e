"""The hook engine on standard architectures, as users call them, against a float64 loop.

Hugging Face models are built from tiny configs (nothing downloaded, dropout 0). Each is
trained for three steps through ``rc.Clipper`` with ``per_sample_clip``; at EVERY step the
gradient the optimizer receives is compared with a float64 copy of the model at that step's
weights (one backward per sample, the same clipping, the mean): relative error <= 1e-5. No
model here may make the hook engine fall back for the whole model: their attention blocks
split heads with views, ViT concatenates a class token and adds a position table, T5 adds a
relative position bias shared by the batch, and all of that is recognised.

Also: ``rc.explain`` on a model with rules, a per-module fallback and bare parameters, and on
one that falls back whole.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustclip as rc
from robustclip.per_sample import PerSampleFallbackWarning

from .test_hooks_engine import BareMatmul, Mixed

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
RTOL = 1e-5
B, T, V = 4, 8, 32


def _ids(b: int = B, t: int = T, seed: int = 1) -> Tensor:
    return torch.randint(1, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _mask(lengths: list[int], t: int = T) -> Tensor:
    return (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()


def _token_mean(logits: Tensor, labels: Tensor) -> Tensor:
    b, t, v = logits.shape
    tok = F.cross_entropy(logits.reshape(b * t, v), labels.reshape(b * t), ignore_index=-100, reduction="none")
    return tok.view(b, t).sum(1) / (labels != -100).sum(1).to(tok.dtype)


def _causal(out: Any, ids: Tensor) -> Tensor:
    return _token_mean(out.logits[:, :-1], ids[:, 1:])


# Each case: build() -> model; call(model, dtype) -> per-sample losses (the batch fixed inside)
Case = tuple[Callable[[], nn.Module], Callable[[nn.Module, torch.dtype], Tensor]]


def gpt2() -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids, mask = _ids(), _mask([8, 5, 8, 3])
    labels = ids.masked_fill(mask == 0, -100)
    return (lambda: GPT2LMHeadModel(cfg)), (lambda m, dt: _causal(m(input_ids=ids, attention_mask=mask), labels))


def bert() -> Case:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    ids, mask, y = _ids(), _mask([8, 6, 3, 8]), torch.tensor([0, 2, 1, 2])
    return (lambda: BertForSequenceClassification(cfg)), (
        lambda m, dt: F.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, y, reduction="none")
    )


def llama(tied: bool) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=tied,
    )
    ids = _ids()
    return (lambda: LlamaForCausalLM(cfg)), (lambda m, dt: _causal(m(input_ids=ids), ids))


def vit() -> Case:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    x, y = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1])
    return (lambda: ViTForImageClassification(cfg)), (
        lambda m, dt: F.cross_entropy(m(pixel_values=x.to(dt)).logits, y, reduction="none")
    )


def t5(with_labels: bool) -> Case:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0,
    )
    src, mask = _ids(t=7), _mask([7, 4, 6, 2], 7)
    labels = _ids(t=5, seed=2).masked_fill(_mask([5, 3, 4, 5], 5) == 0, -100)
    dec = torch.cat([torch.zeros(B, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], 1)

    def call(m: nn.Module, dt: torch.dtype) -> Tensor:
        # with labels=, the output's first field is the model's scalar mean loss, next to the logits
        kw = {"labels": labels} if with_labels else {"decoder_input_ids": dec}
        return _token_mean(m(input_ids=src, attention_mask=mask, **kw).logits, labels)

    return (lambda: T5ForConditionalGeneration(cfg)), call


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True), 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.enc(self.emb(ids)).mean(1))


def torch_encoder() -> Case:
    ids, y = _ids(), torch.tensor([0, 1, 2, 0])
    return Encoder, (lambda m, dt: F.cross_entropy(m(ids), y, reduction="none"))


class LSTMClassifier(nn.Module):
    """Only the LSTM's batch-first output is used; its final (h, c), batch in dimension 1, not."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h, _ = self.rnn(self.emb(ids))
        return self.head(h[:, -1])


def lstm() -> Case:
    ids, y = _ids(t=6), torch.tensor([0, 1, 2, 1])
    return LSTMClassifier, (lambda m, dt: F.cross_entropy(m(ids), y, reduction="none"))


CASES: dict[str, Callable[[], Case]] = {
    "gpt2": gpt2,
    "bert": bert,
    "llama_tied": lambda: llama(True),
    "llama_untied": lambda: llama(False),
    "vit": vit,
    "t5_labels": lambda: t5(True),
    "t5_decoder_ids": lambda: t5(False),
    "torch_encoder": torch_encoder,
    "lstm": lstm,
}


def _per_sample_grads(model: nn.Module, losses: Tensor) -> list[list[Tensor]]:
    ps = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[i], ps, retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for p, g in zip(ps, gs)])
    return out


def _clipped_mean(grads: list[list[Tensor]], c: float) -> list[Tensor]:
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in grads])
    w = torch.clamp(c / norms, max=1.0)
    return [sum(w[i] * grads[i][k] for i in range(len(grads))) / len(grads) for k in range(len(grads[0]))]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in ("torch_encoder", "lstm") else [needs_hf]) for n in CASES]
)
def test_every_step_matches_a_float64_loop_without_whole_model_fallback(name: str) -> None:
    build, call = CASES[name]()
    torch.manual_seed(0)
    model = build().train()
    ref_model = copy.deepcopy(model).double()
    params = [p for p in model.parameters() if p.requires_grad]
    # a radius between the first step's middle norms: some samples clip, some do not
    norms0 = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in _per_sample_grads(ref_model, call(ref_model, torch.float64))])
    c = float(norms0.sort().values[B // 2 - 1 : B // 2 + 1].mean())
    opt = torch.optim.SGD(params, lr=1e-2)
    seen: list[list[Tensor]] = []
    opt.register_step_pre_hook(lambda *_: seen.append([p.grad.detach().clone() for p in params]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with rc.Clipper(model, opt, rc.per_sample_clip(c)) as clipper:
            for step in range(3):
                with torch.no_grad():
                    for a, b in zip(ref_model.parameters(), model.parameters()):
                        a.copy_(b)
                ref = _clipped_mean(_per_sample_grads(ref_model, call(ref_model, torch.float64)), c)
                clipper.backward(call(model, torch.float32))
                clipper.step()
                total = float(torch.sqrt(sum(r.pow(2).sum() for r in ref)))
                for (n, _), g, r in zip(model.named_parameters(), seen[-1], ref):
                    err = float((g.double() - r).norm()) / max(float(r.norm()), 1e-4 * total)
                    assert err <= RTOL, f"step {step + 1}, {n}: relative error {err:.2e}"
            assert clipper.engine._delegate is None
    whole = [w for w in caught if "cannot split" in str(w.message)]
    assert not whole, whole[0].message
    # what remains is the announced per-module fallbacks (layers another rule will cover) and
    # torch's note that an operator has no vmap batching rule (slower, not wrong)
    other = [w for w in caught if not issubclass(w.category, PerSampleFallbackWarning) and "batching rule" not in str(w.message)]
    assert not other, other[0].message


@needs_hf
def test_t5_position_bias_is_followed_through_permute_and_mask() -> None:
    """T5's relative position bias (an Embedding of shape (q, k, H), shared by the batch)
    reaches the attention scores through permute, unsqueeze, a mask (torch.where) and an add:
    its rule sees the per-sample gradient recovered there."""
    build, call = t5(False)
    model = build()
    ex = rc.explain(model, lambda m: call(m, torch.float32), lambda losses: losses, quiet=True)
    assert not ex.whole_model_fallback
    rows = {m.name: m for m in ex.modules}
    bias = rows["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"]
    assert bias.path == "rule Embedding" and "PermuteBackward0" in bias.why and "unbatched" in bias.why


# -- rc.explain ---------------------------------------------------------------------------------------------


def test_explain_names_each_modules_path_and_cost(capsys) -> None:
    model = Mixed()
    x = torch.randint(0, 13, (4, 6))
    before = [p.detach().clone() for p in model.parameters()]
    ex = rc.explain(model, x, lambda out: out.pow(2).sum((1, 2)))
    printed = capsys.readouterr().out
    rows = {m.name: m for m in ex.modules}
    assert rows["conv"].path == "rule Conv1d" and rows["conv"].norms.keys() == {"weight", "bias"}
    assert rows["custom"].path == "per-module fallback" and "no per-sample rule" in rows["custom"].why
    assert rows["<root>"].path == "bare parameters" and "MulBackward0" in rows["<root>"].why
    assert rows["emb"].path == "rule Embedding"  # tied to the head: its own row, its own rule
    assert not ex.whole_model_fallback and ex.plan is not None and not ex.plan.problems
    # every module's predicted cost is at least the plain gradient's (the clipped sum is one)
    assert all(m.relative_cost is not None and m.relative_cost >= 1.0 for m in ex.modules)
    assert "custom (GatedCustom)" in printed and "per-module fallback" in printed
    # nothing of the model changed: parameters and their .grad
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_explain_says_when_the_whole_model_falls_back() -> None:
    model = BareMatmul()
    ex = rc.explain(model, (torch.randn(5, 5),), lambda out: out.pow(2).sum(1), quiet=True)
    assert ex.whole_model_fallback
    assert "'w' is used directly by MmBackward0" in ex.problems[0]
    assert {m.path for m in ex.modules} == {"whole-model fallback (vmap)"}
    assert "whole-model fallback:" in str(ex)


def test_explain_follows_the_methods_engine_and_refuses_other_methods() -> None:
    model = Mixed()
    x = torch.randint(0, 13, (4, 6))
    ex = rc.explain(model, x, lambda out: out.pow(2).sum((1, 2)), rc.per_sample_clip(1.0, engine="vmap"), quiet=True)
    assert ex.engine == "vmap" and {m.path for m in ex.modules} == {"engine vmap"}
    with pytest.raises(ValueError, match="per-sample method"):
        rc.explain(model, x, lambda out: out.pow(2).sum((1, 2)), rc.mean(), quiet=True)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        rc.explain(model, x, lambda out: out.pow(2).sum(), quiet=True)
