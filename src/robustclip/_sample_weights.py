"""From what a per-sample engine reports to the weights it applies, without a silent error.

A per-sample estimator's rule (``_estimators.py``) maps each sample's gradient norm to a weight
``w_i``. Between the engine and the rule sit three concerns this module keeps out of the
estimator's room:

* the norms: an engine reports squared norms, which float32 cannot hold for every finite
  gradient, so they are read as norms in float64 (float32 on MPS) by
  :func:`norms_from_squares` and combined into a flat norm by :func:`wide_norms`;
* a loss scaler: the engine sees the scaled losses' gradients, while radii refer to the true
  ones;
* the weights' dtype and dropped samples: :func:`make_weight_fn` rounds weights toward zero into the
  gradients' dtype, and gives weight 0 to a sample that is not finite when asked to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from robustclip._math import coefficient_as, combine_norms, wide_dtype
from robustclip.per_sample import WeightFn

__all__ = ["make_weight_fn", "norms_from_squares", "wide_norms"]


def wide_norms(norms: Tensor, per_layer: bool) -> Tensor:
    """Per-group norms (G, b) in float64 (float32 on MPS), or with ``per_layer`` False the flat
    norm (1, b) over the groups, combined without squaring them into an overflow."""
    norms = norms.to(wide_dtype(norms.device))
    return norms if per_layer else combine_norms(norms, 0, keepdim=True)


def norms_from_squares(group_sq: Tensor, scale: Tensor | None, per_layer: bool) -> Tensor:
    """The norms that the squared per-group norms (G, b) an engine reports stand for: (G, b), or
    the flat (1, b) with ``per_layer`` False, in float64 (float32 on MPS).

    The engine's side of the contract: for every finite gradient ``group_sq`` is finite and
    accurate, which float32 squares are not above 1.8e19 or below 1e-19. An engine either
    reports float64 squared norms (exact for float32, bfloat16 and float16 gradients), or the
    squared norms of its gradients divided by ``scale`` (broadcastable to (G, b), e.g. each
    sample's largest entry), so that ``||g|| = scale * sqrt(group_sq)``.
    """
    sq = group_sq.to(wide_dtype(group_sq.device))
    if scale is not None:
        return wide_norms(sq.sqrt() * scale.to(sq.dtype), per_layer)
    # a sum of float64 squares overflows only for float64 gradients of norm above 1e154
    return sq.sqrt() if per_layer else sq.sum(0, keepdim=True).sqrt()


def make_weight_fn(
    weights: Callable[[Tensor, Tensor | None], Tensor],
    params: Sequence[Tensor],
    inv_loss_scale: Tensor | None,
    drop: bool,
) -> WeightFn:
    """The function an engine calls with squared norms (and optionally their ``scale``):
    ``weights(group_sq, scale)`` of the true gradients, the losses having been multiplied by
    ``1 / inv_loss_scale``; with ``drop``, weight 0 for a sample whose weight is NaN or whose
    squared norm is not finite; rounded toward zero into the gradients' dtype."""
    dtypes = {p.dtype for p in params}
    grad_dtype = dtypes.pop() if len(dtypes) == 1 else None
    inv = inv_loss_scale

    def weight_fn(sq: Tensor, scale: Tensor | None = None) -> Tensor:
        if inv is not None:
            scale = inv.to(sq.device) if scale is None else scale.to(inv.dtype) * inv.to(scale.device)
        w = weights(sq, scale)
        if drop:
            bad = torch.isnan(w).any(0, keepdim=True) | ~torch.isfinite(sq).all(0, keepdim=True)
            w = torch.where(bad, 0.0, w)
        # rounded toward zero into the gradients' dtype, so the engine's cast never rounds a
        # weight up and a clipped contribution never exceeds its radius
        return w if grad_dtype is None else coefficient_as(w, grad_dtype).to(w.dtype)

    return weight_fn
