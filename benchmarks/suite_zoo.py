"""Step time, memory and correctness of per-sample clipping on a zoo of the models users bring.

``python benchmarks/run.py --suite zoo --json PATH [--markdown] [--scale cpu|gpt2-small|tiny]``

The methodology is the step suite's (``suite_step.py``): a *step* is zero_grad + forward +
backward + clip + optimizer step (SGD, lr 0, so the weights stay fixed and every method sees the
same model); every method gets its own copy of the model, all live in one process and take turns
round by round (``--rounds``), one untimed step then ``--steps-per-round`` timed ones per turn;
``ratio_vs_plain_paired`` is the median over rounds of the method's median step in a round
divided by the plain step's in the same round. Extra peak memory of one step is measured again
in a fresh (spawned) process per method, as in the step suite (``peak_mb``: RSS above the RSS
before the step on CPU, ``max_memory_allocated`` above the allocated memory on CUDA).

Models (``--scale cpu``, the default):

* Hugging Face ``gpt2``, ``bert`` (sequence classification, padded batch), ``llama`` and
  ``vit`` (32x32 images, patch 4): d = 256, 4 layers, 4 heads, T = 128, B = 16; ``t5``: d = 256,
  4 + 4 layers, source T = 128, target T = 32, B = 16. Built from config objects, vocabulary
  1024, dropout 0;
* ``torch_encoder``: ``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside), d = 256,
  4 layers, T = 128, B = 16, padded, mean pooled;
* ``lstm``: embedding, a 1-layer LSTM (256 units), the last step's output, T = 32, B = 64;
* ``resnet18``: the in-house GroupNorm ResNet-18, 32x32, B = 32; ``alexnet``: the CIFAR
  AlexNet of ``robustclip.experiments.models`` (the PS-Clip-SGD paper's model), B = 128;
* ``mlp_b32``: an MLP 784-256-10 at B = 32;
* ``step_mlp``, ``step_cnn``, ``step_gpt``: the three models of the step suite, at its sizes.

``--scale gpt2-small`` (for a GPU): GPT-2 at d = 768, 12 layers, T = 1024, B = 8 and ResNet-18
at B = 128 (the other models keep their cpu sizes). ``--scale tiny``: every model a few hundred
parameters wide, for the suite's own test.

Methods (record names): ``plain``; ``per_sample_fast`` (``rc.per_sample_clip(c)``, the default
engine); ``per_sample_vmap`` (``engine="vmap"``); ``opacus_ghost`` (Opacus' ghost clipping,
noise 0; its error is recorded where it does not run); ``plain_accum`` and ``micro_batch_clip``
(4 micro-batches); ``batch_clip`` (``rc.clip_by_global_norm``).

Checks, once per model before timing, on each method's last untimed step (per-sample methods run
two, as a whole-model fallback's first step differs from its later ones): the radius is the
median of the fast path's per-sample norms (about half the samples clipped); ``max_rel_err`` is
the largest over parameters of ``||g - g_ref|| / max(||g_ref||, 1e-4 ||G_ref||)`` (``G_ref``:
the whole gradient), where ``g_ref`` is the reference loop's clipped gradient
(``engine="loop"``) for the per-sample methods and Opacus, ``clip_grad_norm_`` for
``batch_clip`` and an explicit loop over micro-batches for ``micro_batch_clip``. ``paths``: how
the hook engine handled each module on that step: a rule (in the backward pass, after it, or on
an unbatched output), a per-module fallback (torch.func replay), a bare parameter, or a
whole-model fallback (with the engine's reasons); read from the engine's step plan.

Cost control for a loaded machine: ``--memory-methods plain,per_sample_fast`` measures memory
for those methods only, ``--memory-steps`` sets the measured steps per memory process, and
``--profile`` adds one torch.profiler step per method to its record (wall time, the time inside
PyTorch ops, the top ops by self time) to see where a slow method's time goes.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _common
import suite_step
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustclip as rc
import robustclip.per_sample._hooks.engine as hook_engine
from robustclip import convert_batchnorm_to_groupnorm
from robustclip.experiments.models import MLP, AlexNet, CharGPT, ResNet18, sequence_losses
from robustclip.per_sample import PerSampleFallbackWarning

MODELS = (
    "gpt2",
    "bert",
    "llama",
    "vit",
    "t5",
    "torch_encoder",
    "lstm",
    "resnet18",
    "alexnet",
    "mlp_b32",
    "step_mlp",
    "step_cnn",
    "step_gpt",
)
METHODS = (
    "plain",
    "per_sample_fast",
    "per_sample_vmap",
    "opacus_ghost",
    "plain_accum",
    "micro_batch_clip",
    "batch_clip",
)
PER_SAMPLE = ("per_sample_fast", "per_sample_vmap", "opacus_ghost")
MICRO = 4
IGNORE = -100
TRANSFORMERS = ("gpt2", "bert", "llama", "vit", "t5", "torch_encoder", "step_gpt")
CONV = ("resnet18", "alexnet", "step_cnn", "vit")

Batch = dict[str, Tensor]


def add_arguments(parser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median of per-round ratios)")
    parser.add_argument(
        "--warmup", type=int, default=0, help="untimed steps per method after the check steps, before the rounds"
    )
    parser.add_argument(
        "--steps-per-round", type=int, default=1, help="timed steps per method and round (after one untimed)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--scale",
        default="cpu",
        choices=["cpu", "gpt2-small", "tiny"],
        help="'cpu': realistic CPU sizes; 'gpt2-small': GPT-2 d=768, 12 layers, T=1024, B=8 and "
        "ResNet-18 at B=128 (GPU); 'tiny': tiny models (tests)",
    )
    _common.add_autotune_argument(
        parser, "robustclip.backends.autotune for the timed steps and the memory processes"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument(
        "--memory-methods",
        default=None,
        help="comma-separated methods whose memory is measured (default: every method timed)",
    )
    parser.add_argument("--memory-steps", type=int, default=3, help="measured steps per memory process (median)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, profile one step of each method (torch.profiler): the top ops by "
        "self time, in the record as 'profile'",
    )


# -- models ---------------------------------------------------------------------------------------------


@dataclass
class Zoo:
    """One model with its batch: ``losses(model, batch)`` calls the model as a user would and
    returns one loss per sample, shape (B,). Every tensor of ``batch`` is batch-first, so a
    micro-batch is every tensor's chunk."""

    model: nn.Module
    batch: Batch
    losses: Callable[[nn.Module, Batch], Tensor]
    size: str


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(b: int, t: int, vocab: int, seed: int = 1, low: int = 0) -> Tensor:
    return torch.randint(low, vocab, (b, t), generator=_gen(seed))


def _padding_mask(b: int, t: int, seed: int = 3) -> Tensor:
    """Lengths between T/2 and T, the first sequence full (so the batch spans T)."""
    lengths = torch.randint(t // 2, t + 1, (b,), generator=_gen(seed))
    lengths[0] = t
    return (torch.arange(t)[None, :] < lengths[:, None]).long()


def _classification(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _token_mean(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over each sequence's valid tokens (label != -100)."""
    b, t, v = logits.shape
    tok = F.cross_entropy(logits.reshape(b * t, v), labels.reshape(b * t), ignore_index=IGNORE, reduction="none")
    return tok.view(b, t).sum(1) / (labels != IGNORE).sum(1).clamp(min=1).to(tok.dtype)


def _causal_lm(logits: Tensor, labels: Tensor) -> Tensor:
    return _token_mean(logits[:, :-1], labels[:, 1:])


@dataclass
class Size:
    d: int
    layers: int
    heads: int
    t: int
    b: int
    vocab: int


def _transformer_size(name: str, scale: str) -> Size:
    if scale == "tiny":
        return Size(d=16, layers=2, heads=2, t=8, b=4, vocab=32)
    if scale == "gpt2-small" and name == "gpt2":
        return Size(d=768, layers=12, heads=12, t=1024, b=8, vocab=1024)
    return Size(d=256, layers=4, heads=4, t=128, b=16, vocab=1024)


def _causal_lm_zoo(model: nn.Module, s: Size, desc: str) -> Zoo:
    """A Hugging Face causal LM on random tokens, each sequence its own labels."""
    ids = _tokens(s.b, s.t, s.vocab)
    return Zoo(
        model,
        {"input_ids": ids, "labels": ids.clone()},
        lambda m, b: _causal_lm(m(input_ids=b["input_ids"]).logits, b["labels"]),
        desc,
    )


def _hf(name: str, s: Size) -> Zoo:
    import transformers as tf

    desc = f"d={s.d}, {s.layers} layers, T={s.t}, B={s.b}, vocab {s.vocab}"
    if name == "gpt2":
        gpt2_cfg = tf.GPT2Config(
            vocab_size=s.vocab, n_positions=s.t, n_embd=s.d, n_layer=s.layers, n_head=s.heads,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
        )
        return _causal_lm_zoo(tf.GPT2LMHeadModel(gpt2_cfg), s, desc + " (tied head)")
    if name == "llama":
        llama_cfg = tf.LlamaConfig(
            vocab_size=s.vocab, hidden_size=s.d, intermediate_size=(8 * s.d) // 3, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, num_key_value_heads=max(1, s.heads // 2),
            max_position_embeddings=s.t, tie_word_embeddings=False, attention_dropout=0.0,
        )
        return _causal_lm_zoo(tf.LlamaForCausalLM(llama_cfg), s, desc + ", GQA 2:1")
    if name == "bert":
        bert_cfg = tf.BertConfig(
            vocab_size=s.vocab, hidden_size=s.d, num_hidden_layers=s.layers, num_attention_heads=s.heads,
            intermediate_size=4 * s.d, max_position_embeddings=s.t, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=4, classifier_dropout=0.0,
        )
        mask = _padding_mask(s.b, s.t)
        ids = _tokens(s.b, s.t, s.vocab, low=1).masked_fill(mask == 0, 0)
        return Zoo(
            tf.BertForSequenceClassification(bert_cfg),
            {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 4, (s.b,), generator=_gen(2))},
            lambda m, b: _classification(
                m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
            ),
            desc + ", padded",
        )
    if name == "vit":
        side, patch = (8, 4) if s.d == 16 else (32, 4)
        vit_cfg = tf.ViTConfig(
            image_size=side, patch_size=patch, num_channels=3, hidden_size=s.d, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, intermediate_size=4 * s.d, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=10,
        )
        return Zoo(
            tf.ViTForImageClassification(vit_cfg),
            {
                "pixel_values": torch.randn(s.b, 3, side, side, generator=_gen()),
                "labels": torch.randint(0, 10, (s.b,), generator=_gen(2)),
            },
            lambda m, b: _classification(m(pixel_values=b["pixel_values"]).logits, b["labels"]),
            f"d={s.d}, {s.layers} layers, {side}x{side} images, patch {patch}, B={s.b}",
        )
    if name == "t5":
        t5_cfg = tf.T5Config(
            vocab_size=s.vocab, d_model=s.d, d_kv=s.d // s.heads, d_ff=4 * s.d, num_layers=s.layers,
            num_decoder_layers=s.layers, num_heads=s.heads, dropout_rate=0.0, decoder_start_token_id=0,
            pad_token_id=0,
        )
        t_tgt = max(s.t // 4, 4)
        mask = _padding_mask(s.b, s.t)
        ids = _tokens(s.b, s.t, s.vocab, low=1).masked_fill(mask == 0, 0)
        tgt = _tokens(s.b, t_tgt, s.vocab, seed=2, low=1)
        labels = tgt.masked_fill(_padding_mask(s.b, t_tgt, seed=4) == 0, IGNORE)
        dec = torch.cat([torch.zeros(s.b, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], 1)
        return Zoo(
            tf.T5ForConditionalGeneration(t5_cfg),
            {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "labels": labels},
            lambda m, b: _token_mean(
                m(
                    input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    decoder_input_ids=b["decoder_input_ids"],
                ).logits,
                b["labels"],
            ),
            f"d={s.d}, {s.layers}+{s.layers} layers, source T={s.t} (padded), target T={t_tgt}, B={s.b}",
        )
    raise ValueError(name)


class EncoderClassifier(nn.Module):
    """Embedding and learned positions, nn.TransformerEncoder, mean over the valid tokens, head."""

    def __init__(self, vocab: int, t: int, d: int, layers: int, heads: int, classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(t, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        pos = self.pos(torch.arange(ids.shape[1], device=ids.device))
        h = self.encoder(self.emb(ids) + pos, src_key_padding_mask=mask == 0)
        keep = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class LSTMClassifier(nn.Module):
    """Embedding, a 1-layer LSTM, the last step's output, a linear head."""

    def __init__(self, vocab: int, d: int, classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: Tensor) -> Tensor:
        h, _ = self.rnn(self.emb(ids))
        return self.head(h[:, -1])


def _images(b: int, side: int, classes: int) -> Batch:
    return {"x": torch.randn(b, 3, side, side, generator=_gen()), "labels": torch.randint(0, classes, (b,), generator=_gen(2))}


def _x_classification(m: nn.Module, b: Batch) -> Tensor:
    return _classification(m(b["x"]), b["labels"])


def build(name: str, scale: str, device: str = "cpu") -> Zoo:
    """The model, its batch and its per-sample losses; the same name and scale give the same
    everything (seeded)."""
    torch.manual_seed(0)
    tiny = scale == "tiny"
    if name in ("gpt2", "bert", "llama", "vit", "t5"):
        z = _hf(name, _transformer_size(name, scale))
    elif name == "torch_encoder":
        s = _transformer_size(name, scale)
        mask = _padding_mask(s.b, s.t)
        z = Zoo(
            EncoderClassifier(s.vocab, s.t, s.d, s.layers, s.heads),
            {
                "ids": _tokens(s.b, s.t, s.vocab, low=1).masked_fill(mask == 0, 0),
                "mask": mask,
                "labels": torch.randint(0, 4, (s.b,), generator=_gen(2)),
            },
            lambda m, b: _classification(m(b["ids"], b["mask"]), b["labels"]),
            f"d={s.d}, {s.layers} layers, T={s.t} (padded), B={s.b}",
        )
    elif name == "lstm":
        d, t, b, vocab = (8, 6, 4, 32) if tiny else (256, 32, 64, 1024)
        z = Zoo(
            LSTMClassifier(vocab, d),
            {"ids": _tokens(b, t, vocab), "labels": torch.randint(0, 4, (b,), generator=_gen(2))},
            lambda m, bt: _classification(m(bt["ids"]), bt["labels"]),
            f"1 layer, {d} units, T={t}, B={b}",
        )
    elif name == "resnet18":
        b = 4 if tiny else (128 if scale == "gpt2-small" else 32)
        width, side = (8, 16) if tiny else (64, 32)
        model = convert_batchnorm_to_groupnorm(ResNet18(num_classes=10, width=width), num_groups=2) if tiny else (
            ResNet18(num_classes=10, norm="group", width=width)
        )
        z = Zoo(model, _images(b, side, 10), _x_classification, f"GroupNorm, width {width}, {side}x{side}, B={b}")
    elif name == "alexnet":
        b, hidden = (4, 8) if tiny else (128, 4096)
        z = Zoo(AlexNet(num_classes=100, hidden=hidden), _images(b, 32, 100), _x_classification, f"hidden {hidden}, 32x32, B={b}")
    elif name == "mlp_b32":
        widths, b = ([10, 16, 4], 6) if tiny else ([784, 256, 10], 32)
        z = Zoo(
            MLP(widths),
            {"x": torch.randn(b, widths[0], generator=_gen()), "labels": torch.randint(0, widths[-1], (b,), generator=_gen(2))},
            _x_classification,
            f"{'-'.join(map(str, widths))}, B={b}",
        )
    elif name.startswith("step_"):
        inner = name.removeprefix("step_")
        if tiny:
            z = _tiny_step_model(inner)
        else:
            model, x, y, losses = suite_step.build(inner, "cpu", "issue", None)
            z = Zoo(model, {"x": x, "labels": y}, lambda m, b: losses(m(b["x"]), b["labels"]), f"the step suite's, B={x.shape[0]}")
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    z.model.train()
    z.model.to(device)
    z.batch = {k: v.to(device) for k, v in z.batch.items()}
    return z


def _tiny_step_model(inner: str) -> Zoo:
    from robustclip.experiments.models import SmallCNN

    if inner == "mlp":
        z = Zoo(MLP([10, 16, 4]), {"x": torch.randn(6, 10, generator=_gen()), "labels": torch.randint(0, 4, (6,), generator=_gen(2))}, _x_classification, "tiny")
    elif inner == "cnn":
        z = Zoo(SmallCNN(3, (4, 6), hidden=12, num_classes=5, image_size=8), _images(4, 8, 5), _x_classification, "tiny")
    elif inner == "gpt":
        z = Zoo(
            CharGPT(vocab=13, block_size=8, d=16, layers=2, heads=2, tied=False),
            {"x": _tokens(4, 8, 13), "labels": _tokens(4, 8, 13, seed=2)},
            lambda m, b: sequence_losses(m(b["x"]), b["labels"]),
            "tiny",
        )
    else:
        raise ValueError(f"unknown model 'step_{inner}'")
    return z


# -- methods --------------------------------------------------------------------------------------------


def _chunks(batch: Batch) -> list[Batch]:
    parts = {k: v.chunk(MICRO) for k, v in batch.items()}
    n = min(len(p) for p in parts.values())
    return [{k: v[i] for k, v in parts.items()} for i in range(n)]


def make_step(method: str, z: Zoo, model: nn.Module, radius: float, batch_radius: float) -> Callable[[], None]:
    """A closure running one full training step of ``method`` on ``model`` (a copy of ``z.model``,
    modified: hooks, wrappers)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch, losses = z.batch, z.losses
    if method == "plain":

        def step() -> None:
            opt.zero_grad()
            losses(model, batch).mean().backward()
            opt.step()

        return step
    if method == "plain_accum":
        parts = _chunks(batch)

        def step() -> None:
            opt.zero_grad()
            for b in parts:
                (losses(model, b).mean() / len(parts)).backward()
            opt.step()

        return step
    estimators = {
        "batch_clip": lambda: rc.clip_by_global_norm(batch_radius),
        "micro_batch_clip": lambda: rc.micro_batch_clip(batch_radius),
        "per_sample_fast": lambda: rc.per_sample_clip(radius),
        "per_sample_vmap": lambda: rc.per_sample_clip(radius, engine="vmap"),
        "per_sample_loop": lambda: rc.per_sample_clip(radius, engine="loop"),
    }
    if method in estimators:
        clipper = rc.Clipper(model, opt, estimators[method]())
        if method == "micro_batch_clip":
            parts = _chunks(batch)

            def step() -> None:
                opt.zero_grad()
                for b in parts:
                    clipper.backward(losses(model, b).mean())
                clipper.step()

            return step

        def step() -> None:
            opt.zero_grad()
            clipper.backward(losses(model, batch))
            clipper.step()

        return step
    if method == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        if isinstance(model, CharGPT):  # Opacus needs batch-first inputs at every layer
            model.__class__ = suite_step.BatchedPositionsGPT
        gsm = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=radius, use_ghost_clipping=True
        )
        dpo = DPOptimizerFastGradientClipping(
            opt, noise_multiplier=0.0, max_grad_norm=radius, expected_batch_size=next(iter(batch.values())).shape[0]
        )

        def step() -> None:
            dpo.zero_grad()
            DPTensorFastGradientClipping(gsm, dpo, losses(gsm, batch), "mean").backward()
            dpo.step()

        return step
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


# -- checks ---------------------------------------------------------------------------------------------


def fast_probe(z: Zoo) -> tuple[float, float, dict[str, Any]]:
    """One step of the default engine with no radius, on a copy: the radius (median per-sample
    norm), half the batch gradient norm, and the paths the engine took."""
    m = copy.deepcopy(z.model)
    plans: list[Any] = []
    real = hook_engine.make_plan

    def spy(*a: Any, **k: Any) -> Any:
        plan = real(*a, **k)
        plans.append(plan)
        return plan

    hook_engine.make_plan = spy  # read the step plan; no public hook exposes it
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clipper = rc.Clipper(m, torch.optim.SGD(m.parameters(), lr=0.0), rc.per_sample_clip(None))
            clipper.backward(z.losses(m, z.batch))
            info = clipper.step()
    finally:
        hook_engine.make_plan = real
    assert info.per_sample_norms is not None
    radius = float(info.per_sample_norms.median())
    assert info.grad_norm is not None
    batch_radius = 0.5 * float(info.grad_norm)
    engine = clipper.engine
    clipper.close()
    return radius, batch_radius, _paths(engine, plans, caught)


def _paths(engine: Any, plans: list[Any], caught: list[warnings.WarningMessage]) -> dict[str, Any]:
    fallback = [str(w.message) for w in caught if issubclass(w.category, PerSampleFallbackWarning)]
    out: dict[str, Any] = {"engine": type(engine).__name__}
    if not plans:
        out["note"] = "no hook-engine plan (another engine ran)"
        return out
    plan = plans[-1]
    if plan.problems:
        out["whole_model_fallback"] = list(plan.problems)
        out["delegate"] = type(getattr(engine, "_delegate", None)).__name__
    counts: dict[str, int] = {}
    modules = []
    for what, path, detail in plan.rows():
        counts[path] = counts.get(path, 0) + 1
        modules.append([what, path, detail])
    out["counts"] = counts
    out["modules"] = modules
    out["fallback_modules"] = [m for m in modules if m[1] == "per-module fallback"]
    if fallback:
        out["warnings"] = [w[:300] for w in fallback]
    return out


def reference_grads(method: str, z: Zoo, radius: float, batch_radius: float, loop_ref: list[Tensor] | None) -> list[Tensor] | None:
    if method in PER_SAMPLE:
        return loop_ref
    m = copy.deepcopy(z.model)
    params = list(m.parameters())
    if method == "batch_clip":
        g = torch.autograd.grad(z.losses(m, z.batch).mean(), params, allow_unused=True)
        g = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(params, g))
        total = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g))
        return [t * min(1.0, batch_radius / (total + 1e-12)) for t in g]
    if method == "micro_batch_clip":
        acc = [torch.zeros_like(p) for p in params]
        parts = _chunks(z.batch)
        for b in parts:
            g = torch.autograd.grad(z.losses(m, b).mean(), params, allow_unused=True)
            g = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(params, g))
            total = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g))
            coef = min(1.0, batch_radius / (total + 1e-12))
            acc = [a + t * coef / len(parts) for a, t in zip(acc, g)]
        return acc
    return None


def loop_reference(z: Zoo, radius: float, batch_radius: float) -> list[Tensor]:
    """The reference loop's clipped gradient (one backward per sample)."""
    m = copy.deepcopy(z.model)
    make_step("per_sample_loop", z, m, radius, batch_radius)()
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in m.parameters()]


def max_rel_err(model: nn.Module, ref: list[Tensor]) -> float:
    """The worst relative error over parameters, each in its own norm, floored at 1e-4 of the
    whole gradient's norm: some gradients are zero in exact arithmetic (an attention key's bias:
    softmax ignores a constant shift) and their float rounding is no error."""
    total = math.sqrt(sum(float(r.double().pow(2).sum()) for r in ref))
    errs = [0.0]
    for p, r in zip(model.parameters(), ref):
        g = torch.zeros_like(p) if p.grad is None else p.grad
        scale = max(float(r.double().norm()), 1e-4 * total, 1e-30)
        errs.append(float((g.double() - r.double()).norm()) / scale)
    return max(errs)


def profile_step(step: Callable[[], None], top: int = 8) -> dict[str, Any]:
    """One step under torch.profiler: its wall time, the time inside PyTorch ops (the rest is
    Python and hooks) and the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "wall_ms": round(wall * 1e3, 2),
        "ops_self_ms": round(sum(e.self_cpu_time_total for e in ops) / 1e3, 2),
        "top": [[e.key, round(e.self_cpu_time_total / 1e3, 2), e.count] for e in ops[:top]],
    }


# -- memory (fresh process per method) ------------------------------------------------------------------


def _memory_step(conf: dict) -> Callable[[], None]:
    """The step of ``conf``'s method and model, built in the memory process."""
    z = build(conf["model"], conf["scale"], conf["device"])
    return make_step(conf["method"], z, z.model, conf["radius"], conf["batch_radius"])


# -- the suite ------------------------------------------------------------------------------------------


def run(args) -> list[dict]:
    warnings.simplefilter("ignore")  # the tools' warnings would drown the JSON; paths records them
    autotune = args.autotune == "on"
    rc.backends.autotune = autotune
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    mem_methods = set(methods if args.memory_methods is None else [m for m in args.memory_methods.split(",") if m])
    have_opacus = _common.opacus_available()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    records: list[dict] = []
    for name in models:
        t_model = time.perf_counter()
        load_before = os.getloadavg()[0]
        z = build(name, args.scale, args.device)
        radius, batch_radius, paths = fast_probe(z)
        loop_ref = loop_reference(z, radius, batch_radius) if any(m in PER_SAMPLE for m in methods) else None
        steps: dict[str, Callable[[], None]] = {}
        copies: dict[str, nn.Module] = {}
        notes: dict[str, str] = {}
        for method in methods:
            if method == "opacus_ghost" and not have_opacus:
                notes[method] = "skipped: opacus is not installed (pip install robustclip[bench])"
                continue
            m = copy.deepcopy(z.model)
            try:
                steps[method] = make_step(method, z, m, radius, batch_radius)
                # the last of these untimed steps is the correctness probe (lr 0 leaves p.grad
                # behind); per-sample methods run two, because a first step may differ from the
                # steady state (the hook engine's whole-model fallback runs the reference loop
                # once, then hands over to torch.func)
                for _ in range(2 if method.startswith("per_sample") else 1):
                    steps[method]()
                copies[method] = m
            except Exception as e:  # a tool that cannot run this model is reported, not fatal
                notes[method] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                steps.pop(method, None)
        errs: dict[str, float | None] = {}
        for method, m in copies.items():
            ref = reference_grads(method, z, radius, batch_radius, loop_ref)
            errs[method] = None if ref is None else max_rel_err(m, ref)
        del loop_ref
        times, rounds = _common.timed_rounds(
            steps, warmup=args.warmup, rounds=args.rounds, steps_per_round=args.steps_per_round, sync=sync
        )
        profiles = {k: profile_step(f) for k, f in steps.items()} if args.profile else {}
        del steps, copies
        load_after = os.getloadavg()[0]
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        plain = med.get("plain")
        summary = {k: v for k, v in paths.items() if k != "modules"}
        for method in methods:
            rec: dict[str, Any] = {
                "model": name,
                "size": z.size,
                "method": method,
                "batch": int(next(iter(z.batch.values())).shape[0]),
                "device": args.device,
                "scale": args.scale,
                "median_ms": round(med[method], 3) if method in med else None,
                "ratio_vs_plain": round(med[method] / plain, 3) if plain and method in med else None,
                "ratio_vs_plain_paired": None,
                "ratio_vs_plain_paired_iqr": None,
                "peak_mb": None,
                "max_rel_err": errs.get(method),
                "paths": paths if method == "per_sample_fast" else summary,
                "radius": radius,
                "rounds": len(rounds),
                "autotune": args.autotune,
                "threads": torch.get_num_threads(),
                "load_avg_1min": [round(load_before, 2), round(load_after, 2)],
            }
            if plain and method in med and rounds:
                _common.set_paired_ratio(rec, method, rounds)
            if method in notes:
                rec["note"] = notes[method]
            if method in profiles:
                rec["profile"] = profiles[method]
            if method in med and method in mem_methods and not args.no_memory:
                conf = {
                    "model": name,
                    "method": method,
                    "device": args.device,
                    "scale": args.scale,
                    "threads": torch.get_num_threads(),
                    "radius": radius,
                    "batch_radius": batch_radius,
                    "warmup": 1,
                    "steps": args.memory_steps,
                    "autotune": autotune,
                }
                _common.record_memory(rec, _memory_step, conf)
            records.append(rec)
        for rec in records[-len(methods):]:
            rec["model_seconds"] = round(time.perf_counter() - t_model, 1)
    return records


# -- the table and the targets --------------------------------------------------------------------------


def _ratio(r: dict | None) -> float | None:
    if r is None:
        return None
    return r.get("ratio_vs_plain_paired") or r.get("ratio_vs_plain")


def targets(records: list[dict]) -> list[str]:
    """The issue's targets, each marked met / not met on these records (paired ratios)."""
    by = {(r["model"], r["method"]): r for r in records}
    out = []
    for model in dict.fromkeys(r["model"] for r in records):
        fast = _ratio(by.get((model, "per_sample_fast")))
        if fast is None:
            continue
        out.append(f"- {model}: per_sample_fast {fast:.2f}x plain (target <= 1.3x, aim 1.15x): {'met' if fast <= 1.3 else 'NOT met'}")
        ghost = _ratio(by.get((model, "opacus_ghost")))
        if ghost is not None:
            s = ghost / fast
            out.append(f"- {model}: {s:.2f}x faster than opacus_ghost (target >= 1.5x): {'met' if s >= 1.5 else 'NOT met'}")
        vmap = _ratio(by.get((model, "per_sample_vmap")))
        if vmap is not None:
            out.append(f"- {model}: per_sample_vmap {vmap:.2f}x plain (target: fast never slower): {'met' if fast <= vmap else 'NOT met'}")
        mb, acc = _ratio(by.get((model, "micro_batch_clip"))), _ratio(by.get((model, "plain_accum")))
        if mb is not None and acc and (model in TRANSFORMERS or model in CONV):
            out.append(f"- {model}: micro_batch_clip {mb / acc:.2f}x plain_accum (target <= 1.05x): {'met' if mb <= 1.05 * acc else 'NOT met'}")
        pf = (by.get((model, "per_sample_fast")) or {}).get("peak_mb")
        pp = (by.get((model, "plain")) or {}).get("peak_mb")
        if pf is not None and pp and (model in TRANSFORMERS or model in CONV):
            out.append(f"- {model}: extra peak memory {pf / pp:.2f}x plain (target <= 1.5x): {'met' if pf <= 1.5 * pp else 'NOT met'}")
    return out


def _path_summary(r: dict) -> str:
    p = r.get("paths") or {}
    if p.get("whole_model_fallback"):
        return "whole-model fallback to " + str(p.get("delegate"))
    counts = p.get("counts", {})
    parts = [f"{n} {k}" for k, n in counts.items()]
    fb = p.get("fallback_modules") or []
    if fb:
        parts.append("fallback: " + ", ".join(m[0] for m in fb[:3]) + (" ..." if len(fb) > 3 else ""))
    return "; ".join(parts)


def to_markdown(records: list[dict], args) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "### Zoo (`--suite zoo`)",
        "",
        "Median step time over interleaved rounds; `× plain` is the median over rounds of the "
        "method's step divided by the plain step's in the same round (IQR over rounds); extra "
        "peak memory of one step in a fresh process (MB); the largest relative gradient error "
        "against the reference (the per-sample loop for per-sample methods); the hook engine's "
        f"paths. Autotune: {getattr(args, 'autotune', 'off')}. Load average (1, 5, 15 min) when "
        f"the table was written: {load}.",
        "",
        "| model | size | method | median ms | × plain (IQR) | peak MB | × plain MB | max rel err | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    plain_mb = {r["model"]: r["peak_mb"] for r in records if r["method"] == "plain"}
    for r in records:
        pm = plain_mb.get(r["model"])
        ms = "" if r["median_ms"] is None else f"{r['median_ms']:.1f}"
        ratio = ""
        if r.get("ratio_vs_plain_paired") is not None:
            lo, hi = r["ratio_vs_plain_paired_iqr"]
            ratio = f"{r['ratio_vs_plain_paired']:.2f} ({lo:.2f}-{hi:.2f})"
        mb = "" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        mem = f"{r['peak_mb'] / pm:.2f}" if r["peak_mb"] is not None and pm else ""
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        note = r.get("note", "")
        if r["method"] == "per_sample_fast":
            note = (note + "; " if note else "") + _path_summary(r)
        note = note.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['model']} | {r['size']} | {r['method']} | {ms} | {ratio} | {mb} | {mem} | {err} | {note} |")
    t = targets(records)
    if t:
        lines += ["", "Targets, on these records:", "", *t]
    return "\n".join(lines) + "\n"
