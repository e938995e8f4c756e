"""The vmap engine on what broke it: outputs computed from other outputs (T5), a scalar loss
returned beside the logits, forward passes torch.func cannot run (padding masks checked on the
host, nn.GRU, bf16 attention with a float32 bias), and bf16 autocast. Each compares every step
with the float64 oracle of ``zoo.py``."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustclip as rc
from robustclip.per_sample import PerSampleFallbackWarning
from robustclip.per_sample._graph import output_cotangents

from .zoo import ZOO, Batch, Entry, classification_losses
from .zoo_harness import METHODS, run

RTOL = 1e-5
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers is not installed"
)


def _fallback_notes(r) -> list[str]:
    return [w for w in r.warnings if w.startswith(PerSampleFallbackWarning.__name__)]


def _exact(r) -> None:
    assert max(r.grad_err) <= RTOL, r.grad_err
    assert max(r.norm_err) <= RTOL, r.norm_err


# -- outputs computed from other outputs --------------------------------------------------------------


@needs_transformers
@pytest.mark.parametrize("method", METHODS)
def test_t5_with_decoder_input_ids(method: str) -> None:
    """T5 returns the encoder's last hidden state beside the logits computed from it. Pulling
    the losses' total derivative for both back through the model counted every path through
    the encoder twice (58% error at every step, no warning)."""
    t5 = ZOO["t5_decoder_ids"]
    # no attention mask: the batched torch.func path itself, not the one-sample-at-a-time one
    entry = Entry(
        "t5_no_mask",
        t5.build,
        t5.batch,
        lambda m, b: m(input_ids=b["input_ids"], decoder_input_ids=b["decoder_input_ids"]),
        t5.loss,
    )
    r = run(entry, method, "vmap")
    assert not _fallback_notes(r), r.warnings
    _exact(r)


class Nested(nn.Module):
    """Returns a hidden state, logits computed from it, and the hidden state again."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.body(x)
        return {"hidden": h, "logits": self.head(h), "again": h}


def _nested_batch() -> Batch:
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(5, 5, generator=g), "labels": torch.tensor([0, 1, 2, 0, 1])}


def _nested_loss(o: dict[str, Tensor], b: Batch) -> Tensor:
    # uses the inner output directly as well as through the logits, and the repeated one
    return classification_losses(o["logits"], b["labels"]) + 0.3 * o["hidden"].pow(2).sum(1) - 0.1 * o["again"].sum(1)


@pytest.mark.parametrize("method", METHODS)
def test_outputs_computed_from_other_outputs(method: str) -> None:
    entry = Entry("nested", Nested, _nested_batch, lambda m, b: m(b["x"]), _nested_loss)
    _exact(run(entry, method, "vmap"))


def test_output_cotangents_are_partial_derivatives() -> None:
    """Against the loss function differentiated at detached outputs: the definition."""
    torch.manual_seed(0)
    model, b = Nested(), _nested_batch()
    out = model(b["x"])
    losses = _nested_loss(out, b)
    keys = ["hidden", "logits", "again"]
    cots = output_cotangents(losses, [out[k] for k in keys])
    leaves = {k: out[k].detach().requires_grad_() for k in keys}
    ref = torch.autograd.grad(_nested_loss(leaves, b).sum(), [leaves[k] for k in keys])
    # the repeated output's partial derivative is carried by its first occurrence
    torch.testing.assert_close(cots[0], ref[0] + ref[2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cots[1], ref[1], rtol=1e-6, atol=1e-7)
    assert cots[2] is None
    # an output the losses reach only through another output gets no cotangent
    only = output_cotangents(classification_losses(out["logits"], b["labels"]), [out["hidden"], out["logits"]])
    assert only[0] is None and only[1] is not None


class ScalarLossFirst(nn.Module):
    """Returns (mean loss, logits), as a Hugging Face model called with labels= does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.net(x)
        return F.cross_entropy(logits, labels), logits


def test_scalar_loss_beside_the_logits() -> None:
    entry = Entry(
        "scalar_first",
        ScalarLossFirst,
        _nested_batch,
        lambda m, b: m(b["x"], b["labels"]),
        lambda o, b: classification_losses(o[1], b["labels"]),
    )
    _exact(run(entry, "clip", "vmap"))


@needs_transformers
def test_t5_with_labels() -> None:
    _exact(run(ZOO["t5_labels"], "clip", "vmap"))


def test_losses_that_do_not_use_the_output() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with rc.Clipper(model, opt, rc.per_sample_clip(1.0, engine="vmap"), allow_unused=True) as clipper:
        x = torch.randn(3, 4)
        model(x)
        losses = (x @ model.weight.T).sum(1)  # the weight used outside the forward pass
        with pytest.raises(ValueError, match="do not depend on the model's output"):
            clipper.backward(losses)


# -- forward passes torch.func cannot run -------------------------------------------------------------------


class HostMask(nn.Module):
    """Skips its padding mask when nothing is padded, as Hugging Face's mask code does: a
    host read of a per-sample tensor, which vmap cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.emb(ids)
        if not bool(mask.all()):
            h = h * mask.unsqueeze(-1)
        return self.head(h.sum(1))


def _masked_batch() -> Batch:
    g = torch.Generator().manual_seed(4)
    mask = (torch.arange(5)[None] < torch.tensor([5, 2, 4, 5])[:, None]).long()
    return {"ids": torch.randint(0, 10, (4, 5), generator=g), "mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def _cls(o: Tensor, b: Batch) -> Tensor:
    return classification_losses(o, b["labels"])


@pytest.mark.parametrize("method", METHODS)
def test_padding_mask_read_on_the_host(method: str) -> None:
    entry = Entry("host_mask", HostMask, _masked_batch, lambda m, b: m(b["ids"], b["mask"]), _cls)
    r = run(entry, method, "vmap")
    _exact(r)
    notes = _fallback_notes(r)
    assert len(notes) == 1 and "one sample at a time" in notes[0], r.warnings


@needs_transformers
@pytest.mark.parametrize("name", ["gpt2_padded", "bert_padded"])
def test_hugging_face_padding_masks(name: str) -> None:
    _exact(run(ZOO[name], "clip", "vmap"))


class GRUClassifier(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(10, 4)
        self.rnn = nn.GRU(4, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids)
        h, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head(h[:, -1] if self.batch_first else h[-1])


@pytest.mark.parametrize("batch_first", [True, False])
def test_gru(batch_first: bool) -> None:
    """nn.GRU writes batched values into the initial state it creates: vmap failed at step 1."""
    entry = Entry(
        "gru", lambda: GRUClassifier(batch_first), _masked_batch, lambda m, b: m(b["ids"]), _cls
    )
    _exact(run(entry, "clip", "vmap"))


class BiasedAttention(nn.Module):
    """Attention with a learned float32 bias as its mask (T5's relative position bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.qkv = nn.Linear(8, 24)
        self.bias = nn.Parameter(torch.randn(1, 5, 5) * 0.1)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        q, k, v = self.qkv(self.emb(ids)).chunk(3, -1)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias * 1.0)
        return self.head(h.mean(1))


def test_bf16_attention_with_a_float32_bias() -> None:
    """Under bf16 autocast torch.func's backward of this attention raised "expected scalar
    type BFloat16 but found Float"; the clipped gradient must be as close to float64 as the
    plain bf16 mean gradient (within a factor 2) at every step."""
    entry = Entry("biased_attention", BiasedAttention, _masked_batch, lambda m, b: m(b["ids"]), _cls)
    r = run(entry, "clip", "vmap", autocast=torch.bfloat16)
    assert all(e <= 2 * m for e, m in zip(r.global_err, r.mean_err, strict=True)), (r.global_err, r.mean_err)


@pytest.mark.parametrize("name", ["small_cnn", "mlp"])
def test_bf16_autocast_recompute_check(name: str) -> None:
    """bf16 outputs recomputed one sample at a time differ from the batch's in their last
    bits; the check tolerates that (it read the dtype after casting to float32 before)."""
    r = run(ZOO[name], "clip", "vmap", autocast=torch.bfloat16)
    assert all(e <= 2 * m for e, m in zip(r.global_err, r.mean_err, strict=True)), (r.global_err, r.mean_err)


class BatchCentered(nn.Module):
    """Subtracts the batch mean: samples interact, per-sample gradients are undefined."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        return h - h.mean(0, keepdim=True)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_samples_that_interact_still_fail_loudly(autocast: torch.dtype | None) -> None:
    entry = Entry("centered", BatchCentered, _nested_batch, lambda m, b: m(b["x"]), _cls)
    with pytest.raises(ValueError, match="does not reproduce the batch's output"):
        run(entry, "clip", "vmap", autocast=autocast)


class HostCheckThenDropout(nn.Module):
    """A host read (vmap cannot batch it) before dropout: the one-sample-at-a-time path draws
    new masks, which its first check must catch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        if bool(h.abs().sum() > 0):
            h = self.drop(h)
        return self.head(h)


def test_randomness_on_the_one_sample_path_fails_loudly() -> None:
    torch.manual_seed(0)
    model = HostCheckThenDropout()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b = _nested_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerSampleFallbackWarning)
        with rc.Clipper(model, opt, rc.per_sample_clip(1.0, engine="vmap")) as clipper:
            losses = _cls(model(b["x"]), b)
            with pytest.raises(ValueError, match="does not reproduce the batch's output"):
                clipper.backward(losses)


class ReturnsItsLosses(nn.Module):
    """The model's output is the per-sample losses themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return classification_losses(self.net(x), labels)


def test_model_that_returns_its_losses() -> None:
    entry = Entry("own_losses", ReturnsItsLosses, _nested_batch, lambda m, b: m(b["x"], b["labels"]), lambda o, b: o)
    _exact(run(entry, "clip", "vmap"))
