"""Argument checks shared by every public entry point.

Each check raises a ValueError or TypeError whose message says what was wrong and what to pass
instead, so a mistake is caught where it is made rather than as a NaN three layers later.
"""

from __future__ import annotations

import math
from numbers import Real

from torch import Tensor


def check_max_norm(value: object, name: str = "max_norm") -> float:
    """Return ``value`` as a float after checking it is a usable clipping radius ``c``.

    ``c`` must be a finite number > 0. ``inf`` is refused on purpose: "no clipping" is said with
    ``None`` (or with :func:`robustclip.mean`), so an accidental overflow never silently turns
    clipping off.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        if isinstance(value, Tensor) and value.numel() == 1:
            value = float(value)
        else:
            raise TypeError(
                f"{name} must be a positive number (a float such as 1.0) or a robustclip "
                f"threshold object, got {type(value).__name__}."
            )
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} is NaN; pass a positive finite clipping radius such as 1.0.")
    if math.isinf(value):
        raise ValueError(
            f"{name}={value} is not a clipping radius. To turn clipping off pass {name}=None "
            "(or use robustclip.mean()); otherwise pass a positive finite number such as 1.0."
        )
    if value <= 0:
        raise ValueError(
            f"{name} must be > 0, got {value}. A radius of 0 would zero every gradient; pass a "
            "positive number such as 1.0 (robustclip.diagnose suggests one from your data)."
        )
    return value


def check_finite(value: object, name: str, what: str) -> float:
    """``value`` as a float after checking it is a finite real number; ``what`` says what to
    pass instead (e.g. "the optimal loss value f*, such as 0.0")."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite number ({what}), got {type(value).__name__}.")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}; pass {what}.")
    return v


def check_nonneg(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number >= 0, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (such as 0.0 or 0.01), got {value}.")
    return value


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value <= 0:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return value


def check_nonneg_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
    return value


def check_losses(losses: object, *, per_sample: bool, method: object) -> Tensor:
    """Check the losses handed to :meth:`robustclip.Clipper.backward`.

    Per-sample methods need a 1-D tensor with one loss per sample; the others also accept a
    scalar (treated as the mean loss of the micro-batch). ``method`` is only formatted into
    the error messages (so a method object costs no ``repr`` on the hot path).
    """
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"backward() expects the losses as a torch.Tensor, got {type(losses).__name__}."
        )
    if not losses.requires_grad:
        raise ValueError(
            "the losses do not require grad: they were computed under torch.no_grad(), from "
            "detached tensors, or from a model whose parameters are all frozen."
        )
    if not (losses.is_floating_point() or losses.is_complex()):
        raise TypeError(f"the losses must be floating point, got dtype {losses.dtype}.")
    if losses.dim() == 0:
        if per_sample:
            raise ValueError(
                f"{method} needs one loss per sample, but got a scalar (already reduced) loss. "
                "Compute the loss with reduction='none', e.g. "
                "F.cross_entropy(logits, targets, reduction='none'), and pass that vector."
            )
        return losses
    if losses.dim() != 1:
        raise ValueError(
            f"{method} needs a 1-D tensor of per-sample losses (shape (batch,)), got shape "
            f"{tuple(losses.shape)}. Reduce the non-batch dimensions first, e.g. "
            "losses.view(batch, -1).mean(1) for per-token losses."
        )
    if losses.numel() == 0:
        raise ValueError(
            "the batch is empty (0 losses): there is nothing to take a gradient of. Skip empty "
            "batches, or use drop_last=True in the DataLoader."
        )
    return losses

