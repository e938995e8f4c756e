"""Batch-level norm clipping, normalization and the (L0, L1) warm-up step.

* Clip-SGD: ``g <- min(1, c/||g||) g`` (global norm), or per tensor.
* Normalized SGD: ``g <- g/||g||``, and 0 at ``g = 0``.
* GD with the warm-up step of Lobanov & Koloskova (arXiv:2605.14800, appendix C.4):
  ``gamma = 1/(L0 + L1 (f(x) - f*))``.

No clip coefficient is tested on the host (``if coef < 1`` would sync with the device): the
gradient is multiplied by a clamped coefficient (:func:`robustclip._math.clip_coefficient`), as
``torch.nn.utils.clip_grad_norm_`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from robustclip._math import clip_coefficient, coefficient_as
from robustclip._transform import GradientTransform, StepContext
from robustclip._validate import check_finite, check_nonneg
from robustclip.thresholds import Threshold, as_threshold

__all__ = ["clip_by_global_norm", "clip_by_tensor_norm", "normalize", "l0l1_warmup"]

Grads = list[Tensor]


class ClipByGlobalNormState(NamedTuple):
    threshold: Any
    norm: Tensor  # reading: the global norm before clipping
    radius: Tensor  # reading: the radius used at this step
    clipped: Tensor  # reading: 1.0 if the gradient was scaled down


class ClipByGlobalNorm(GradientTransform[ClipByGlobalNormState]):
    """Clip-SGD's clipping: scale the whole gradient to global norm at most ``c``.

    Reference: Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural
    networks" (arXiv:1211.5063); analysed under (L0, L1)-smoothness by Zhang et al.
    (arXiv:1905.11881) and without bias under strong growth by arXiv:2605.14800.
    """

    name = "clip_by_global_norm"

    def __init__(self, max_norm: float | Threshold) -> None:
        self.threshold = as_threshold(max_norm)

    def init(self, params: Sequence[Tensor]) -> ClipByGlobalNormState:
        dev = params[0].device if len(params) else None
        z = torch.zeros((), device=dev)
        return ClipByGlobalNormState(self.threshold.init(dev), z, z.clone(), z.clone())

    def update(
        self, grads: Grads, state: ClipByGlobalNormState, ctx: StepContext
    ) -> tuple[Grads, ClipByGlobalNormState]:
        # over every shard under FSDP2, in the wide dtype: no overflow even above the float32
        # maximum
        norm = ctx.global_norm(grads)
        radius = self.threshold.value(state.threshold)
        coef = clip_coefficient(norm, radius)
        torch._foreach_mul_(grads, coefficient_as(coef, grads[0].dtype))
        th = self.threshold.observe(state.threshold, norm.reshape(1))
        reading = norm.to(torch.promote_types(grads[0].dtype, torch.float32))
        return grads, ClipByGlobalNormState(th, reading, radius, (coef < 1).float())

    def readings(self, state: ClipByGlobalNormState) -> dict[str, Any]:
        return {"norm": state.norm, "radius": state.radius, "clipped": state.clipped}

    def __repr__(self) -> str:
        return f"clip_by_global_norm({self.threshold!r})"


class ClipByTensorNormState(NamedTuple):
    thresholds: tuple[Any, ...]
    clipped_fraction: Tensor  # reading: share of tensors that were scaled down


class ClipByTensorNorm(GradientTransform[ClipByTensorNormState]):
    """Per-tensor (per-layer) Clip-SGD: each parameter's gradient clipped to norm ``c``.

    A threshold object keeps one state per tensor, so an adaptive radius is layer-wise.
    """

    name = "clip_by_tensor_norm"

    def __init__(self, max_norm: float | Threshold) -> None:
        self.threshold = as_threshold(max_norm)

    def init(self, params: Sequence[Tensor]) -> ClipByTensorNormState:
        dev = params[0].device if len(params) else None
        return ClipByTensorNormState(
            tuple(self.threshold.init(p.device) for p in params), torch.zeros((), device=dev)
        )

    def update(
        self, grads: Grads, state: ClipByTensorNormState, ctx: StepContext
    ) -> tuple[Grads, ClipByTensorNormState]:
        # over every shard under FSDP2; norms that neither overflow nor underflow, whatever the
        # gradient's dtype
        norms = ctx.tensor_norms(grads)
        radii = [self.threshold.value(s) for s in state.thresholds]
        coefs = [clip_coefficient(n, r) for n, r in zip(norms, radii)]
        torch._foreach_mul_(grads, [coefficient_as(c, g.dtype) for c, g in zip(coefs, grads)])
        new = tuple(
            self.threshold.observe(s, n.reshape(1)) for s, n in zip(state.thresholds, norms)
        )
        frac = torch.stack([(c < 1).float() for c in coefs]).mean()
        return grads, ClipByTensorNormState(new, frac)

    def readings(self, state: ClipByTensorNormState) -> dict[str, Any]:
        return {"clipped_fraction": state.clipped_fraction}

    def __repr__(self) -> str:
        return f"clip_by_tensor_norm({self.threshold!r})"


class NormalizeState(NamedTuple):
    norm: Tensor


class Normalize(GradientTransform[NormalizeState]):
    """Normalized SGD's direction ``g/||g||`` (0 when ``g = 0``).

    Reference: Nesterov (1984); Cutkosky & Mehta, "Momentum improves normalized SGD"
    (arXiv:2002.03305); without bias under strong growth, arXiv:2605.14800 (Algorithm 1).
    """

    name = "normalize"

    def init(self, params: Sequence[Tensor]) -> NormalizeState:
        dev = params[0].device if len(params) else None
        return NormalizeState(torch.zeros((), device=dev))

    def update(self, grads: Grads, state: NormalizeState, ctx: StepContext) -> tuple[Grads, NormalizeState]:
        norm = ctx.global_norm(grads)  # over every shard under FSDP2, in the wide dtype
        # where(), not a host-side test: safe at g = 0 without a sync.
        inv = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
        torch._foreach_mul_(grads, inv.to(grads[0].dtype))
        return grads, NormalizeState(norm.to(torch.promote_types(grads[0].dtype, torch.float32)))

    def __repr__(self) -> str:
        return "normalize()"


class WarmupState(NamedTuple):
    step_size: Tensor  # reading: the gamma used at this step


class L0L1Warmup(GradientTransform[WarmupState]):
    """Scale the gradient by the warm-up step ``1/(L0 + L1 (f(x) - f*))``.

    Use it with ``torch.optim.SGD(lr=1.0)`` and the full batch to get the deterministic GD with
    warm-up step size of Lobanov & Koloskova (arXiv:2605.14800, appendix C.4): large loss gives
    a small step, and the step grows to ``1/L0`` as ``f(x) -> f*``. ``f*`` must be known (0 for
    a model that interpolates its data).
    """

    name = "l0l1_warmup"

    def __init__(self, l0: float, l1: float, f_star: float = 0.0) -> None:
        self.l0 = check_nonneg(l0, "l0")
        self.l1 = check_nonneg(l1, "l1")
        if self.l0 == 0 and self.l1 == 0:
            raise ValueError("l0 and l1 are both 0: the step 1/(L0 + L1 (f - f*)) is undefined.")
        self.f_star = check_finite(
            f_star, "f_star", "the optimal loss value f*, e.g. 0.0 for a model that can fit its data"
        )

    def init(self, params: Sequence[Tensor]) -> WarmupState:
        dev = params[0].device if len(params) else None
        return WarmupState(torch.zeros((), device=dev))

    def update(self, grads: Grads, state: WarmupState, ctx: StepContext) -> tuple[Grads, WarmupState]:
        if ctx.loss is None:
            raise ValueError("l0l1_warmup needs the loss value; call Clipper.backward(losses) first.")
        gap = (ctx.loss.detach() - self.f_star).clamp(min=0.0)
        gamma = 1.0 / (self.l0 + self.l1 * gap)
        torch._foreach_mul_(grads, gamma.to(grads[0].dtype))
        return grads, WarmupState(gamma)

    def __repr__(self) -> str:
        return f"l0l1_warmup(l0={self.l0}, l1={self.l1}, f_star={self.f_star})"


def clip_by_global_norm(max_norm: float | Threshold) -> GradientTransform[ClipByGlobalNormState]:
    """Clip the aggregated gradient to global L2 norm ``max_norm`` (Clip-SGD).

    Args:
        max_norm: the radius ``c > 0``, or a threshold object (:mod:`robustclip.thresholds`).
    """
    return ClipByGlobalNorm(max_norm)


def clip_by_tensor_norm(max_norm: float | Threshold) -> GradientTransform[ClipByTensorNormState]:
    """Clip each parameter tensor's gradient to L2 norm ``max_norm`` (per-layer Clip-SGD)."""
    return ClipByTensorNorm(max_norm)


def normalize() -> GradientTransform[NormalizeState]:
    """Normalize the aggregated gradient to unit global norm (NSGD); zero stays zero."""
    return Normalize()


def l0l1_warmup(l0: float, l1: float, f_star: float = 0.0) -> GradientTransform[WarmupState]:
    """Multiply the gradient by ``1/(L0 + L1 (f(x) - f*))`` (arXiv:2605.14800, app. C.4)."""
    return L0L1Warmup(l0, l1, f_star)
