"""Per-sample losses for the usual model heads, one loss per sample of shape ``(B,)``.

Per-sample methods (``per_sample_clip``, ``per_sample_normalize``) clip each sample's gradient,
so they need one loss per sample rather than the batch mean that models compute. These helpers
compute it from logits and labels with the conventions of Hugging Face ``transformers`` heads:

* :func:`causal_lm`: next-token prediction (labels shifted by one inside), ignored labels
  (``-100``) left out, the mean over each sequence's valid tokens;
* :func:`seq2seq_lm`: encoder-decoder models, whose labels are already aligned with the logits;
* :func:`sequence_classification`: cross-entropy, mean squared error for one label (regression)
  or binary cross-entropy for multi-label problems;
* :func:`token_classification`: one label per token, the mean over each sequence's valid tokens;
* :func:`per_sample_losses`: picks one of them from the model (or a ``task`` name).

A sequence's loss is the mean over its own valid tokens, so every sequence weighs the same in
the step (the per-sample view of PS-Clip-SGD, arXiv:2605.02701). A model's own loss weighs
tokens instead (the sum over the batch's valid tokens divided by their number); the two agree
when every sequence has the same number of valid tokens. A sequence with no valid token gets a
loss of 0 and a zero gradient.

None of these import ``transformers``: they work on tensors and read a model's class name and
``config`` only.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TASKS",
    "causal_lm",
    "infer_task",
    "per_sample_losses",
    "seq2seq_lm",
    "sequence_classification",
    "token_classification",
]

#: task names :func:`per_sample_losses` accepts
TASKS = ("causal_lm", "seq2seq_lm", "sequence_classification", "token_classification")


def _check_tokens(logits: Tensor, labels: Tensor, what: str) -> None:
    if logits.dim() != 3:
        raise ValueError(
            f"{what} expects logits of shape (batch, sequence, vocabulary), got {tuple(logits.shape)}."
        )
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"{what} expects labels of shape {tuple(logits.shape[:2])} (batch, sequence) to match "
            f"the logits {tuple(logits.shape)}, got {tuple(labels.shape)}."
        )


def _token_mean(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Cross-entropy of each token, averaged over each row's tokens whose label is not ignored."""
    b, t, v = logits.shape
    # float32 at least, as the models' own losses: a bf16 log-softmax over a vocabulary rounds
    tok = F.cross_entropy(
        logits.reshape(b * t, v).float(), labels.reshape(b * t), ignore_index=ignore_index, reduction="none"
    ).view(b, t)
    valid = (labels != ignore_index).sum(1)
    return tok.sum(1) / valid.clamp(min=1).to(tok.dtype)


def causal_lm(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Per-sequence loss of a causal language model: token ``t`` predicts label ``t + 1``.

    Args:
        logits: ``(B, T, V)``, the model's output for every position.
        labels: ``(B, T)`` token ids aligned with the inputs (as ``transformers`` takes them:
            usually ``labels = input_ids``); the shift by one happens here. Positions labelled
            ``ignore_index`` (padding, prompts) are left out.

    Returns:
        ``(B,)``: the mean cross-entropy over each sequence's valid predicted tokens.
    """
    _check_tokens(logits, labels, "causal_lm")
    return _token_mean(logits[:, :-1], labels[:, 1:], ignore_index)


def seq2seq_lm(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Per-sequence loss of an encoder-decoder model, whose labels are aligned with the logits.

    Returns ``(B,)``: the mean cross-entropy over each target sequence's valid tokens.
    """
    _check_tokens(logits, labels, "seq2seq_lm")
    return _token_mean(logits, labels, ignore_index)


def token_classification(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Per-sequence loss of token classification (one label per token, ``ignore_index`` skipped).

    Returns ``(B,)``: the mean cross-entropy over each sequence's labelled tokens.
    """
    _check_tokens(logits, labels, "token_classification")
    return _token_mean(logits, labels, ignore_index)


def sequence_classification(
    logits: Tensor, labels: Tensor, *, problem_type: str | None = None
) -> Tensor:
    """Per-sample loss of sequence classification, as ``transformers`` chooses it.

    Args:
        logits: ``(B, num_labels)``.
        labels: class indices ``(B,)`` (single-label), targets ``(B,)`` or ``(B, num_labels)``
            (regression) or 0/1 targets ``(B, num_labels)`` (multi-label).
        problem_type: ``"regression"``, ``"single_label_classification"`` or
            ``"multi_label_classification"``; ``None`` infers it as ``transformers`` does: one
            output is regression, integer labels single-label, anything else multi-label.

    Returns:
        ``(B,)``: cross-entropy, squared error (mean over outputs) or binary cross-entropy with
        logits (mean over labels).
    """
    if logits.dim() != 2:
        raise ValueError(
            f"sequence_classification expects logits of shape (batch, num_labels), got {tuple(logits.shape)}."
        )
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"sequence_classification got {labels.shape[0]} labels for {logits.shape[0]} samples."
        )
    num_labels = logits.shape[1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    b = logits.shape[0]
    if problem_type == "regression":
        err = (logits.float().reshape(b, -1) - labels.float().reshape(b, -1)).square()
        return err.mean(1)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.float(), labels.reshape(b).long(), reduction="none")
    if problem_type == "multi_label_classification":
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        return bce.mean(1)
    raise ValueError(
        f"problem_type must be 'regression', 'single_label_classification' or "
        f"'multi_label_classification', got {problem_type!r}."
    )


def infer_task(model: Any) -> str:
    """The task of a ``transformers`` model, from its class name and config (one of :data:`TASKS`).

    Raises:
        ValueError: the head is not one of the four; pass ``task=`` to :func:`per_sample_losses`
            or compute the per-sample losses yourself.
    """
    inner = _unwrap(model)
    name = type(inner).__name__
    config = getattr(inner, "config", None)
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    if name.endswith("ForTokenClassification"):
        return "token_classification"
    if getattr(config, "is_encoder_decoder", False) and name.endswith(
        ("ForConditionalGeneration", "ForSeq2SeqLM", "LMHeadModel")
    ):
        return "seq2seq_lm"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    raise ValueError(
        f"robustclip cannot tell which per-sample loss a {name} needs; pass task= (one of "
        f"{', '.join(TASKS)}) or compute one loss per sample yourself."
    )


def per_sample_losses(
    outputs: Any,
    labels: Tensor,
    *,
    model: Any = None,
    task: str | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """One loss per sample from a model's outputs and the labels, shape ``(B,)``.

    Args:
        outputs: the model's output: a ``ModelOutput`` or dict with ``"logits"``, a tuple whose
            first element (or second, after a loss) is the logits, or the logits tensor.
        labels: the labels the model's own loss would use.
        model: the model, to infer the task from (see :func:`infer_task`); or give ``task``.
        task: one of :data:`TASKS`.
        ignore_index: the label of positions that carry no loss (``-100`` in ``transformers``).
    """
    if task is None:
        if model is None:
            raise ValueError(f"per_sample_losses needs model= or task= (one of {', '.join(TASKS)}).")
        task = infer_task(model)
    logits = _logits(outputs)
    if task == "causal_lm":
        return causal_lm(logits, labels, ignore_index=ignore_index)
    if task == "seq2seq_lm":
        return seq2seq_lm(logits, labels, ignore_index=ignore_index)
    if task == "token_classification":
        return token_classification(logits, labels, ignore_index=ignore_index)
    if task == "sequence_classification":
        config = getattr(_unwrap(model), "config", None) if model is not None else None
        problem_type = getattr(config, "problem_type", None)
        return sequence_classification(logits, labels, problem_type=problem_type)
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")


def _unwrap(model: Any) -> Any:
    """The model inside DDP / accelerate wrappers (``.module``) and PEFT (``.base_model.model``)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    if type(model).__name__.startswith("Peft") and hasattr(model, "base_model"):
        model = getattr(model.base_model, "model", model.base_model)
    return model


def _logits(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    # a model's output is an untyped container: what sits where the logits go is taken for them
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        if "logits" in outputs:
            return cast(Tensor, outputs["logits"])
        raise ValueError(
            f"the model's output has no 'logits' (keys: {', '.join(map(str, outputs.keys()))}); "
            "compute one loss per sample yourself."
        )
    if isinstance(outputs, (tuple, list)) and outputs:
        # (loss, logits, ...) when the model was given labels, (logits, ...) otherwise
        if isinstance(outputs[0], Tensor) and outputs[0].dim() == 0 and len(outputs) > 1:
            return cast(Tensor, outputs[1])
        return cast(Tensor, outputs[0])
    raise TypeError(f"cannot find logits in a model output of type {type(outputs).__name__}.")
