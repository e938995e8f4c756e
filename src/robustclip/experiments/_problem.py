"""What a built-in experiment hands to other tools (the trainer, ``robustclip diagnose``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


@dataclass
class Problem:
    """A model with its data and per-sample loss, ready to train or diagnose.

    Attributes:
        name: the experiment's name (``"label-noise"``).
        model: a freshly initialised model.
        train: the training inputs and targets, as whole tensors (first dimension = samples).
        test: the held-out inputs and targets, if any.
        loss_fn: ``loss_fn(outputs, targets) -> per-sample losses`` of shape ``(B,)``.
        batch_size: the experiment's default batch size.
        lr: the experiment's default learning rate for SGD.
        momentum: the momentum of the experiment's SGD (0 for plain SGD).
        grad_noise: ``() -> GradientTransform`` that adds the gradient noise the experiment
            injects after aggregation (a fresh transform, seeded as the experiment's first
            run), or ``None`` when the noise is all in the data. ``robustclip diagnose``
            passes it as ``noise_fn``, so the verdict is for the problem the experiment trains.
    """

    name: str
    model: nn.Module
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor] | None
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batch_size: int
    lr: float
    momentum: float = 0.0
    grad_noise: Callable[[], Any] | None = None
