"""From what a per-sample engine reports to the weights it applies, and what the step reads
back, without a silent error.

A per-sample estimator's rule (``_estimators.py``) maps each sample's gradient norm to a weight
``w_i``. Between the engine and the rule sit the concerns this module keeps out of the
estimator's room:

* the norms: an engine reports squared norms, which float32 cannot hold for every finite
  gradient, so they are read as norms in float64 (float32 on MPS) by
  :func:`norms_from_squares` and combined into a flat norm by :func:`wide_norms`;
* a loss scaler: the engine sees the scaled losses' gradients, while radii refer to the true
  ones;
* the weights' dtype and dropped samples: :class:`SampleWeighting` rounds weights toward zero
  into the gradients' dtype, and gives weight 0 to a sample that is not finite when asked to;
* the readings: :meth:`SampleWeighting.readings` reports each sample's flat norm, whether it
  was scaled down and whether it was dropped from the very norms and weights the engine used
  (a float32 reading of a norm above 3.4e38 is ``inf``, yet that sample was clipped, not
  dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from robustclip._math import coefficient_as, combine_norms, wide_dtype

__all__ = ["SampleReadings", "SampleWeighting", "norms_from_squares", "wide_norms"]


def wide_norms(norms: Tensor, per_layer: bool) -> Tensor:
    """Per-group norms (G, b) in float64 (float32 on MPS), or with ``per_layer`` False the flat
    norm (1, b) over the groups, combined without squaring them into an overflow."""
    norms = norms.to(wide_dtype(norms.device))
    return norms if per_layer else combine_norms(norms, 0, keepdim=True)


def _rule_and_flat_norms(group_sq: Tensor, scale: Tensor | None, per_layer: bool) -> tuple[Tensor, Tensor]:
    """The norms the rule sees ((G, b) with ``per_layer``, else the flat (1, b)) and the flat
    norms (1, b), both in float64 (float32 on MPS); see :func:`norms_from_squares`."""
    sq = group_sq.to(wide_dtype(group_sq.device))
    if scale is not None:
        groups = sq.sqrt() * scale.to(sq.dtype)
        flat = combine_norms(groups, 0, keepdim=True)
        return (groups if per_layer else flat), flat
    # a sum of float64 squares overflows only for float64 gradients of norm above 1e154
    flat = sq.sum(0, keepdim=True).sqrt()
    return (sq.sqrt() if per_layer else flat), flat


def norms_from_squares(group_sq: Tensor, scale: Tensor | None, per_layer: bool) -> Tensor:
    """The norms that the squared per-group norms (G, b) an engine reports stand for: (G, b), or
    the flat (1, b) with ``per_layer`` False, in float64 (float32 on MPS).

    The engine's side of the contract: for every finite gradient ``group_sq`` is finite and
    accurate, which float32 squares are not above 1.8e19 or below 1e-19. An engine either
    reports float64 squared norms (exact for float32, bfloat16 and float16 gradients), or the
    squared norms of its gradients divided by ``scale`` (broadcastable to (G, b), e.g. each
    sample's largest entry), so that ``||g|| = scale * sqrt(group_sq)``.
    """
    return _rule_and_flat_norms(group_sq, scale, per_layer)[0]


def grad_dtype(params: Sequence[Tensor]) -> torch.dtype | None:
    """The parameters' one dtype, into which weights are rounded; None for mixed dtypes (read
    every step: ``model.half()`` changes a parameter's dtype in place)."""
    dtypes = {p.dtype for p in params}
    return dtypes.pop() if len(dtypes) == 1 else None


class SampleReadings(NamedTuple):
    """What one micro-batch of a per-sample estimator reports (see :class:`SampleWeighting`)."""

    per_sample_norms: Tensor  # (B,) flat norms, in the readings' dtype
    group_norms: Tensor  # (G, B) per-group norms, in the readings' dtype
    clipped: Tensor  # (B,) bool: weight below 1 (and not dropped)
    dropped: Tensor | None  # (B,) bool with ``drop``: weight 0 for a non-finite loss or norm


class SampleWeighting:
    """The ``weight_fn`` of one micro-batch, which remembers what it computed for the readings.

    An engine calls it with squared norms (G, b) (and optionally their ``scale``), once or once
    per chunk of samples, in sample order. It returns ``rule(norms)`` of the true gradients
    (the losses having been multiplied by ``loss_scale``), rounded toward zero into the
    gradients' dtype; with ``drop``, weight 0 for a sample whose weight is NaN or whose squared
    norm is not finite. ``rule`` maps wide norms ((G, b) with ``per_layer``, else (1, b)) to
    weights of the same shape.
    """

    def __init__(
        self,
        rule: Callable[[Tensor], Tensor],
        per_layer: bool,
        params: Sequence[Tensor],
        loss_scale: Tensor | None,
        drop: bool,
    ) -> None:
        self.rule = rule
        self.per_layer = per_layer
        self.drop = drop
        self.grad_dtype = grad_dtype(params)
        # the engine sees the scaled losses' gradients: their norms divided by the loss scale
        # are the true norms the radii and gamma refer to; the weights then apply to the
        # scaled gradients, whose sum stays scaled until the clipper unscales it
        self.inv = None if loss_scale is None else 1.0 / loss_scale.to(wide_dtype(loss_scale.device))
        self._weights: list[Tensor] = []
        self._flat: list[Tensor] = []
        self._bad: list[Tensor] = []

    def __call__(self, sq: Tensor, scale: Tensor | None = None) -> Tensor:
        inv = self.inv
        if inv is not None:
            scale = inv.to(sq.device) if scale is None else scale.to(inv.dtype) * inv.to(scale.device)
        norms, flat = _rule_and_flat_norms(sq, scale, self.per_layer)
        w = self.rule(norms)
        if self.drop:
            bad = torch.isnan(w).any(0) | ~torch.isfinite(sq).all(0)
            w = torch.where(bad, 0.0, w)
            self._bad.append(bad)
        self._weights.append(w)
        self._flat.append(flat)
        # rounded toward zero into the gradients' dtype, so the engine's cast never rounds a
        # weight up and a clipped contribution never exceeds its radius
        return w if self.grad_dtype is None else coefficient_as(w, self.grad_dtype).to(w.dtype)

    def readings(self, group_norms: Tensor, loss_ok: Tensor | None) -> SampleReadings:
        """The readings of the micro-batch, from the ``group_norms`` (G, B) the engine returned
        (norms of the scaled gradients) and, with ``drop``, which losses were finite (B,).

        The flat norms, the clipped flags and the dropped flags come from the float64 norms
        and the weights the engine used, not from the readings (float32 for float32
        gradients): a sample whose norm a float32 reading cannot hold was weighted, not
        dropped."""
        batch = group_norms.shape[-1]
        seen = sum(w.shape[-1] for w in self._weights)
        if seen != batch:
            raise RuntimeError(
                f"robustclip: the per-sample engine asked for the weights of {seen} samples in a "
                f"batch of {batch}; an engine calls weight_fn once per sample, in order."
            )
        w = _joined(self._weights)
        dtype = group_norms.dtype
        flat = _joined(self._flat).reshape(-1).to(dtype)
        if self.inv is not None:  # the readings in the true gradients' units
            group_norms = (group_norms.to(self.inv.dtype) * self.inv.to(group_norms.device)).to(dtype)
        clipped = (w < 1).any(0)
        dropped = None
        if self.drop:
            assert loss_ok is not None
            dropped = _joined(self._bad, 0) | ~loss_ok.reshape(-1)
            clipped = clipped & ~dropped
        return SampleReadings(flat, group_norms, clipped, dropped)


def _joined(parts: list[Tensor], dim: int = -1) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
