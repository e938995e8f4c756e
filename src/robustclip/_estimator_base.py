"""The contract of a sample-level estimator: what the clipper hands it and what it reports.

An :class:`Estimator` turns the losses of one (micro-)batch into a gradient contribution: it adds
a *sum* into the clipper's accumulator ``out`` and reports a :class:`Contribution` that says how
many units it counted, with its readings. The clipper divides the total by the total count at
``step()``. The estimators themselves (the mean, per-sample and micro-batch clipping) are in
``_estimators.py``; write your own by subclassing :class:`Estimator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import torch
from torch import Tensor

from robustclip._transform import state_from_plain, state_to_plain
from robustclip.per_sample import ParamLayout, PerSampleEngine

__all__ = ["Contribution", "Estimator"]

#: an estimator's state: a NamedTuple of threshold states (``()`` for a stateless one)
S = TypeVar("S")


@dataclass
class Contribution:
    """What one ``backward()`` reports besides the gradient it added."""

    count: int
    per_sample_norms: Tensor | None = None  # (B,) flat norms, per-sample methods
    group_norms: Tensor | None = None  # (G, B) per-layer norms, per-sample methods
    micro_batch_norm: Tensor | None = None  # (1,) micro-batch clipping
    clipped: Tensor | None = None  # (B,) or (1,) flags (bool or 0/1 float): scaled down or not
    #: with ``drop=True``: which reported units got weight 0 because they were not finite, a
    #: bool mask (B,) of samples (per-sample methods) or (1,) for the whole micro-batch
    #: (``mean()``, micro-batch clipping), on the device
    dropped: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Estimator(Generic[S]):
    """Base class of sample-level estimators, generic in their state type ``S``.

    :meth:`contribute` sees the public types of :mod:`robustclip.per_sample`: the
    :class:`~robustclip.per_sample.ParamLayout` (parameters, names, layer groups) and, for a
    per-sample estimator, its :class:`~robustclip.per_sample.PerSampleEngine`; it reports a
    :class:`Contribution`.
    """

    name = "estimator"
    #: True if the estimator needs one loss per sample (and so a per-sample engine)
    per_sample = False
    #: True if :meth:`contribute` accepts ``None`` entries in ``out`` (no gradient yet this
    #: step) and puts new tensors there; otherwise the clipper hands it zero-filled buffers
    writes_new_grads = False
    #: True if :meth:`contribute` takes the keywords ``drop`` (give a non-finite unit weight 0
    #: and report it in ``Contribution.dropped``) and ``loss_scale`` (the losses were
    #: multiplied by this 0-d tensor, a loss scaler's scale: norms and radii are compared in
    #: unscaled units, the sum added to ``out`` stays scaled)
    handles_nonfinite = False

    def init(self, layout: ParamLayout, device: torch.device) -> S:
        return cast(S, ())

    def contribute(
        self,
        losses: Tensor,
        state: S,
        layout: ParamLayout,
        engine: PerSampleEngine | None,
        out: list[Tensor | None],
    ) -> tuple[Contribution, S]:
        """Add this (micro-)batch's contribution to ``out`` (aligned with ``layout.params``); a
        ``None`` entry (no gradient yet this step) gets a new tensor laid out like its
        parameter."""
        raise NotImplementedError

    def state_to_dict(self, state: S) -> Any:
        return state_to_plain(state)

    def state_from_dict(self, template: S, data: Any) -> S:
        return cast(S, state_from_plain(template, data))
