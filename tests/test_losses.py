"""robustclip.losses: each per-sample loss against a hand-written loop, and against the model's
own mean loss where the two must agree."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustclip import losses as L

transformers = pytest.importorskip("transformers")


def _hand_token_mean(logits, labels, shift):
    """One sequence and one token at a time: the obvious definition."""
    out = []
    for b in range(logits.shape[0]):
        total, n = 0.0, 0
        for t in range(logits.shape[1] - (1 if shift else 0)):
            y = int(labels[b, t + 1 if shift else t])
            if y == -100:
                continue
            lp = torch.log_softmax(logits[b, t].double(), -1)
            total += -float(lp[y])
            n += 1
        out.append(total / n if n else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def _labels_with_ignored(b, t, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 3:] = -100  # padding at the end
    labels[1, :2] = -100  # a prompt at the start
    return labels


@pytest.mark.parametrize("fn,shift", [(L.causal_lm, True), (L.seq2seq_lm, False), (L.token_classification, False)])
def test_token_losses_match_a_hand_written_loop(fn, shift):
    logits = torch.randn(3, 7, 11, dtype=torch.float64)
    labels = _labels_with_ignored(3, 7, 11)
    got = fn(logits, labels)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), _hand_token_mean(logits, labels, shift), rtol=1e-6, atol=1e-7)


def test_a_sequence_without_valid_tokens_gets_zero_loss_and_zero_gradient():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.randint(0, 5, (2, 4))
    labels[1] = -100
    losses = L.causal_lm(logits, labels)
    assert losses[1].item() == 0.0 and math.isfinite(losses[0].item())
    losses.sum().backward()
    assert torch.equal(logits.grad[1], torch.zeros_like(logits.grad[1]))


def test_sequence_classification_matches_hand_written_losses():
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    hand = torch.stack([-torch.log_softmax(logits[i], -1)[y[i]] for i in range(5)])
    torch.testing.assert_close(L.sequence_classification(logits, y), hand)
    # one output: regression, squared error
    r = torch.randn(5, 1)
    t = torch.randn(5)
    torch.testing.assert_close(L.sequence_classification(r, t), (r[:, 0] - t) ** 2)
    # multi-label: binary cross-entropy, mean over labels
    m = torch.randint(0, 2, (5, 3)).float()
    hand_bce = torch.stack(
        [
            -(m[i] * F.logsigmoid(logits[i]) + (1 - m[i]) * F.logsigmoid(-logits[i])).mean()
            for i in range(5)
        ]
    )
    torch.testing.assert_close(L.sequence_classification(logits, m), hand_bce)


def _tiny(cls_name, **kw):
    cfg = transformers.GPT2Config(
        vocab_size=31, n_positions=16, n_embd=8, n_layer=1, n_head=2,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw,
    )
    return getattr(transformers, cls_name)(cfg).eval()


def test_causal_lm_agrees_with_the_models_own_loss():
    torch.manual_seed(0)
    model = _tiny("GPT2LMHeadModel")
    ids = torch.randint(0, 31, (4, 9))
    out = model(input_ids=ids, labels=ids)
    per = L.per_sample_losses(out, ids, model=model)
    assert per.shape == (4,)
    # every sequence has the same number of tokens: the mean of the means is the token mean
    torch.testing.assert_close(per.mean(), out.loss, rtol=1e-6, atol=1e-6)
    # and each is the model's loss on that sequence alone
    for i in range(4):
        alone = model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss
        torch.testing.assert_close(per[i], alone, rtol=1e-5, atol=1e-6)


def test_classification_heads_agree_with_the_models_own_loss():
    torch.manual_seed(0)
    ids = torch.randint(1, 31, (4, 6))
    seq = _tiny("GPT2ForSequenceClassification", num_labels=3)
    y = torch.tensor([0, 2, 1, 2])
    out = seq(input_ids=ids, labels=y)
    torch.testing.assert_close(L.per_sample_losses(out, y, model=seq).mean(), out.loss)
    reg = _tiny("GPT2ForSequenceClassification", num_labels=1)
    t = torch.randn(4)
    out = reg(input_ids=ids, labels=t)
    torch.testing.assert_close(L.per_sample_losses(out, t, model=reg).mean(), out.loss)
    tok = _tiny("GPT2ForTokenClassification", num_labels=4)
    yt = torch.randint(0, 4, (4, 6))
    out = tok(input_ids=ids, labels=yt)
    torch.testing.assert_close(L.per_sample_losses(out, yt, model=tok).mean(), out.loss)


def test_seq2seq_agrees_with_the_models_own_loss():
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
        num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    assert L.infer_task(model) == "seq2seq_lm"
    src = torch.randint(2, 32, (3, 5))
    tgt = torch.randint(2, 32, (3, 4))
    out = model(input_ids=src, labels=tgt)
    per = L.per_sample_losses(out, tgt, model=model)
    torch.testing.assert_close(per.mean(), out.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per.double(), _hand_token_mean(out.logits.detach(), tgt, False), rtol=1e-5, atol=1e-6)


def test_unknown_heads_and_bad_shapes_say_what_to_do():
    with pytest.raises(ValueError, match="task="):
        L.per_sample_losses(torch.randn(2, 3), torch.tensor([0, 1]), model=torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="task must be one of"):
        L.per_sample_losses(torch.randn(2, 3), torch.tensor([0, 1]), task="ranking")
    with pytest.raises(ValueError, match="labels of shape"):
        L.causal_lm(torch.randn(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))
    # tuples: (loss, logits) with labels, (logits,) without
    logits = torch.randn(2, 3)
    y = torch.tensor([0, 1])
    a = L.per_sample_losses((torch.tensor(1.0), logits), y, task="sequence_classification")
    b = L.per_sample_losses((logits,), y, task="sequence_classification")
    torch.testing.assert_close(a, b)
