"""A zoo of the architectures practitioners train, at tiny sizes, for per-sample engine tests.

Every entry builds its model from a tiny config (Hugging Face models from their config
objects, nothing downloaded), with dropout 0, and gives a fixed batch of 4 to 6 samples, the
call the way a user writes it, and a hand-written per-sample loss of shape ``(B,)``. The loss
functions here are written out on purpose (not taken from the library): they are the reference
the library's own loss helpers are checked against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustclip import convert_batchnorm_to_groupnorm
from robustclip.experiments.models import MLP, AlexNet, CharGPT, ResNet18, SmallCNN, sequence_losses

Batch = dict[str, Tensor]

IGNORE = -100


# -- hand-written per-sample losses ---------------------------------------------------------------


def classification_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Sequence or image classification: one cross-entropy per sample."""
    return F.cross_entropy(logits, labels, reduction="none")


def token_mean_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over each sequence's valid tokens (label != -100); logits (B, T, V)
    aligned with labels (B, T). Sequence-to-sequence and token classification."""
    b, t, v = logits.shape
    tok = F.cross_entropy(
        logits.reshape(b * t, v), labels.reshape(b * t), ignore_index=IGNORE, reduction="none"
    ).view(b, t)
    valid = (labels != IGNORE).to(tok.dtype)
    return tok.sum(1) / valid.sum(1)


def causal_lm_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Causal LM: position t predicts token t + 1 (shift), -100 ignored, mean over each
    sequence's valid tokens."""
    return token_mean_losses(logits[:, :-1], labels[:, 1:])


# -- entries --------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One model of the zoo.

    ``forward(model, batch)`` calls the model as a user would and returns its raw output;
    ``loss(output, batch)`` turns that output into per-sample losses of shape (B,).
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], Batch]
    forward: Callable[[nn.Module, Batch], Any]
    loss: Callable[[Any, Batch], Tensor]

    def make(self) -> tuple[nn.Module, Batch]:
        torch.manual_seed(0)
        model = self.build()
        model.train()
        return model, self.batch()

    def losses(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.loss(self.forward(model, batch), batch)


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(b: int, t: int, vocab: int, seed: int = 1, low: int = 1) -> Tensor:
    return torch.randint(low, vocab, (b, t), generator=_gen(seed))


def _padding_mask(lengths: list[int], t: int) -> Tensor:
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()


def _lm_batch(b: int = 4, t: int = 8, vocab: int = 32, lengths: list[int] | None = None) -> Batch:
    ids = _tokens(b, t, vocab)
    out: Batch = {"input_ids": ids}
    labels = ids.clone()
    if lengths is not None:
        mask = _padding_mask(lengths, t)
        ids.masked_fill_(mask == 0, 0)
        labels = ids.clone().masked_fill_(mask == 0, IGNORE)
        out["attention_mask"] = mask
    out["labels"] = labels
    return out


def _logits(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


# Hugging Face -------------------------------------------------------------------------------------------


def _gpt2(padded: bool) -> Entry:
    def build() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
        )
        return GPT2LMHeadModel(cfg)

    def fwd(m: nn.Module, b: Batch) -> Any:
        if padded:
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return m(input_ids=b["input_ids"])

    return Entry(
        "gpt2_padded" if padded else "gpt2",
        build,
        lambda: _lm_batch(lengths=[8, 5, 8, 3] if padded else None),
        fwd,
        lambda o, b: causal_lm_losses(o.logits, b["labels"]),
    )


def _bert() -> Entry:
    def build() -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=3, classifier_dropout=0.0,
        )
        return BertForSequenceClassification(cfg)

    def batch() -> Batch:
        b = _lm_batch(lengths=[8, 6, 3, 8])
        b["labels"] = torch.tensor([0, 2, 1, 2])
        return b

    return Entry(
        "bert_padded",
        build,
        batch,
        lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
        lambda o, b: classification_losses(o.logits, b["labels"]),
    )


def _llama(tied: bool) -> Entry:
    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
            tie_word_embeddings=tied, attention_dropout=0.0,
        )
        return LlamaForCausalLM(cfg)

    return Entry(
        "llama_tied" if tied else "llama_untied",
        build,
        lambda: _lm_batch(),
        lambda m, b: m(input_ids=b["input_ids"]),
        lambda o, b: causal_lm_losses(o.logits, b["labels"]),
    )


def _vit() -> Entry:
    def build() -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(
            image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=3,
        )
        return ViTForImageClassification(cfg)

    def batch() -> Batch:
        g = _gen()
        return {"pixel_values": torch.randn(4, 3, 8, 8, generator=g), "labels": torch.tensor([0, 1, 2, 1])}

    return Entry(
        "vit",
        build,
        batch,
        lambda m, b: m(pixel_values=b["pixel_values"]),
        lambda o, b: classification_losses(o.logits, b["labels"]),
    )


def _t5(with_labels: bool) -> Entry:
    def build() -> nn.Module:
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = T5Config(
            vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
            num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        )
        return T5ForConditionalGeneration(cfg)

    def batch() -> Batch:
        src = _lm_batch(b=4, t=7, lengths=[7, 4, 6, 2])
        tgt = _tokens(4, 5, 32, seed=2)
        tgt_mask = _padding_mask([5, 3, 4, 5], 5)
        labels = tgt.masked_fill(tgt_mask == 0, IGNORE)
        # what T5 builds from labels itself: shift right, start token 0, -100 -> pad (0)
        dec = torch.cat([torch.zeros(4, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], 1)
        return {
            "input_ids": src["input_ids"],
            "attention_mask": src["attention_mask"],
            "decoder_input_ids": dec,
            "labels": labels,
        }

    def fwd(m: nn.Module, b: Batch) -> Any:
        if with_labels:
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        return m(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["decoder_input_ids"]
        )

    return Entry(
        "t5_labels" if with_labels else "t5_decoder_ids",
        build,
        batch,
        fwd,
        lambda o, b: token_mean_losses(o.logits, b["labels"]),
    )


# torch.nn -----------------------------------------------------------------------------------------------


class EncoderClassifier(nn.Module):
    """Embedding, nn.TransformerEncoder (MultiheadAttention inside), mean pool, linear head."""

    def __init__(self, batch_first: bool, vocab: int = 32, d: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: Tensor, pad_mask: Tensor) -> Tensor:
        x = self.emb(ids)
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.encoder(x, src_key_padding_mask=pad_mask == 0)
        if not self.batch_first:
            h = h.transpose(0, 1)
        keep = pad_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def _encoder(batch_first: bool) -> Entry:
    def batch() -> Batch:
        b = _lm_batch(lengths=[8, 5, 8, 3])
        b["labels"] = torch.tensor([0, 1, 2, 0])
        return b

    return Entry(
        f"torch_encoder_bf{int(batch_first)}",
        lambda: EncoderClassifier(batch_first),
        batch,
        lambda m, b: m(b["input_ids"], b["attention_mask"]),
        lambda o, b: classification_losses(o, b["labels"]),
    )


class Seq2Seq(nn.Module):
    """nn.Transformer (encoder and decoder) between two embeddings and a linear head."""

    def __init__(self, vocab: int = 32, d: int = 16) -> None:
        super().__init__()
        self.src_emb = nn.Embedding(vocab, d)
        self.tgt_emb = nn.Embedding(vocab, d)
        self.transformer = nn.Transformer(
            d, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0,
            batch_first=True,
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        h = self.transformer(self.src_emb(src), self.tgt_emb(tgt), tgt_mask=causal, tgt_is_causal=True)
        return self.head(h)


def _seq2seq() -> Entry:
    def batch() -> Batch:
        src = _tokens(4, 6, 32)
        tgt = _tokens(4, 5, 32, seed=2)
        labels = torch.cat([tgt[:, 1:], _tokens(4, 1, 32, seed=3)], 1)
        return {"src": src, "tgt": tgt, "labels": labels}

    return Entry(
        "torch_transformer",
        Seq2Seq,
        batch,
        lambda m, b: m(b["src"], b["tgt"]),
        lambda o, b: token_mean_losses(o, b["labels"]),
    )


class RNNClassifier(nn.Module):
    """Embedding, a recurrent layer, the last step's output (or every step's, for tagging)."""

    def __init__(self, kind: str, layers: int = 1, bidirectional: bool = False, batch_first: bool = True,
                 tagger: bool = False, vocab: int = 32, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.batch_first, self.tagger = batch_first, tagger
        self.emb = nn.Embedding(vocab, d)
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.rnn = cls(d, d, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.head = nn.Linear(d * (2 if bidirectional else 1), classes)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids)
        if not self.batch_first:
            x = x.transpose(0, 1)
        h, _ = self.rnn(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h if self.tagger else h[:, -1])


def _rnn(name: str, kind: str, **kw: Any) -> Entry:
    tagger = kw.get("tagger", False)

    def batch() -> Batch:
        ids = _tokens(4, 6, 32)
        if tagger:  # token classification, padded positions ignored
            labels = _tokens(4, 6, 3, seed=2, low=0).masked_fill(_padding_mask([6, 4, 6, 2], 6) == 0, IGNORE)
        else:
            labels = torch.tensor([0, 1, 2, 1])
        return {"input_ids": ids, "labels": labels}

    return Entry(
        name,
        lambda: RNNClassifier(kind, **kw),
        batch,
        lambda m, b: m(b["input_ids"]),
        (lambda o, b: token_mean_losses(o, b["labels"])) if tagger else (lambda o, b: classification_losses(o, b["labels"])),
    )


# robustclip.experiments.models ----------------------------------------------------------------------------------------


def _image_batch(b: int, side: int, classes: int) -> Callable[[], Batch]:
    def batch() -> Batch:
        g = _gen()
        return {"x": torch.randn(b, 3, side, side, generator=g), "labels": torch.randint(0, classes, (b,), generator=g)}

    return batch


def _house() -> list[Entry]:
    def cls_loss(o: Tensor, b: Batch) -> Tensor:
        return classification_losses(o, b["labels"])

    def x_fwd(m: nn.Module, b: Batch) -> Tensor:
        return m(b["x"])

    def mlp_batch() -> Batch:
        g = _gen()
        return {"x": torch.randn(6, 10, generator=g), "labels": torch.randint(0, 4, (6,), generator=g)}

    def gpt_batch() -> Batch:
        return {"x": _tokens(4, 8, 13, low=0), "labels": _tokens(4, 8, 13, seed=2, low=0)}

    return [
        Entry("mlp", lambda: MLP([10, 16, 16, 4]), mlp_batch, x_fwd, cls_loss),
        Entry(
            "small_cnn",
            lambda: SmallCNN(3, (4, 6), hidden=12, num_classes=5, image_size=8),
            _image_batch(4, 8, 5),
            x_fwd,
            cls_loss,
        ),
        Entry(
            "char_gpt_tied",
            lambda: CharGPT(vocab=13, block_size=8, d=16, layers=2, heads=2, tied=True),
            gpt_batch,
            x_fwd,
            lambda o, b: sequence_losses(o, b["labels"]),
        ),
        Entry("alexnet", lambda: AlexNet(num_classes=5, hidden=8), _image_batch(4, 32, 5), x_fwd, cls_loss),
        Entry(
            "resnet18",
            # as users convert it for per-sample clipping, with groups of several channels
            lambda: convert_batchnorm_to_groupnorm(ResNet18(num_classes=5, width=8), num_groups=2),
            _image_batch(4, 16, 5),
            x_fwd,
            cls_loss,
        ),
    ]


ZOO: dict[str, Entry] = {
    e.name: e
    for e in [
        _gpt2(padded=False),
        _gpt2(padded=True),
        _bert(),
        _llama(tied=True),
        _llama(tied=False),
        _vit(),
        _t5(with_labels=True),
        _t5(with_labels=False),
        _encoder(batch_first=True),
        _encoder(batch_first=False),
        _seq2seq(),
        _rnn("lstm", "lstm"),
        _rnn("gru", "gru", batch_first=False),
        _rnn("bilstm2_tagger", "lstm", layers=2, bidirectional=True, tagger=True),
        *_house(),
    ]
}


# -- the float64 oracle and the harness ---------------------------------------------------------------


def to_double(batch: Batch) -> Batch:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


@dataclass
class Oracle:
    """Per-sample gradients of a float64 copy of the model, one backward per sample.

    ``grads[i][k]``: sample i's gradient of parameter k; ``group_sq[g, i]``: its squared norm
    over layer group g (the clipper's groups, ``group_of``)."""

    grads: list[list[Tensor]]
    group_sq: Tensor

    @property
    def flat_norms(self) -> Tensor:
        return self.group_sq.sum(0).sqrt()

    def weighted_mean(self, weights: Tensor, group_of: list[int]) -> list[Tensor]:
        """(1/B) sum_i w_{g(k),i} g_{i,k}; weights (G or 1, B)."""
        b = len(self.grads)
        out = [torch.zeros_like(g) for g in self.grads[0]]
        for i, gs in enumerate(self.grads):
            for k, g in enumerate(gs):
                w = weights[0 if weights.shape[0] == 1 else group_of[k], i]
                out[k] += w * g
        return [o / b for o in out]

    def mean(self) -> list[Tensor]:
        return self.weighted_mean(torch.ones(1, len(self.grads), dtype=torch.float64), [])


def oracle(entry: Entry, model64: nn.Module, batch: Batch, group_of: list[int], num_groups: int) -> Oracle:
    params = trainable(model64)
    losses = entry.losses(model64, to_double(batch))
    assert losses.dtype == torch.float64 and losses.shape == (losses.shape[0],)
    grads, sq = [], []
    for i in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, gs)]
        grads.append(gs)
        col = torch.zeros(num_groups, dtype=torch.float64)
        for k, g in enumerate(gs):
            col[group_of[k]] += g.pow(2).sum()
        sq.append(col)
    return Oracle(grads, torch.stack(sq, 1))


def sync_weights(dst: nn.Module, src: nn.Module) -> None:
    """``dst`` (float64) takes ``src``'s current parameters and buffers."""
    with torch.no_grad():
        for (n, a), (m, b) in zip(dst.named_parameters(), src.named_parameters()):
            assert n == m
            a.copy_(b)
        for (n, a), (m, b) in zip(dst.named_buffers(), src.named_buffers()):
            assert n == m
            a.copy_(b)


def rel_err(got: list[Tensor], ref: list[Tensor]) -> float:
    """The worst relative error over parameters, each measured in its own norm (floored at a
    ten-thousandth of the whole gradient's norm, for parameters whose gradient is about zero)."""
    total = float(torch.sqrt(sum(r.double().pow(2).sum() for r in ref)))
    worst = 0.0
    for a, r in zip(got, ref):
        diff = float((a.double() - r.double()).norm())
        scale = max(float(r.double().norm()), 1e-4 * total)
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def median_radius(norms: Tensor) -> float:
    """A radius between the middle two norms: about half the samples clip, half do not."""
    s = norms.sort().values
    b = s.shape[0]
    return float((s[(b - 1) // 2] + s[b // 2]) / 2) if b % 2 == 0 else float((s[b // 2] + s[b // 2 + 1]) / 2)
