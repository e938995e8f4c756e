"""The strong-growth constant rho and the batch size it recommends.

The strong growth condition (Vaswani, Bach, Schmidt, arXiv:1810.07288) asks
``E_i ||grad f_i(x)||^2 <= rho ||grad f(x)||^2``: the noise vanishes where the full gradient
does, as in interpolating (over-parameterised) models. Lobanov & Koloskova (arXiv:2605.14800)
show that clipped and normalised SGD then lose their bias once the batch size is of order rho,
and estimate it each epoch on the finite sum,

    rho_hat = (1/N) sum_i ||grad f_i(x)||^2 / ||(1/N) sum_i grad f_i(x)||^2,

taking the batch size above the largest rho_hat seen. ``rho_hat >= 1`` always (Jensen), with
equality exactly when every sample has the same gradient.

Estimated on a subset of n samples instead of all N, rho_hat is biased, and not by a constant
factor: the subset's mean gradient carries the subset's own noise, ``E||gbar_n||^2 =
||gbar||^2 + (mean ||g_i||^2 - ||gbar||^2)(N - n)/(n (N - 1))``, so where rho is large the
subset estimate tends to ``n`` instead of rho. :func:`strong_growth_over` streams the finite
sum over the whole training set (one pass, one gradient-sized buffer), which is what
``robustclip.diagnostics.diagnose`` uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor, nn

from robustclip.diagnostics._gradients import probe_gradients, stream_gradients
from robustclip.diagnostics._tail import _as_float64

__all__ = ["StrongGrowth", "strong_growth", "estimate_strong_growth", "strong_growth_over"]


@dataclass(frozen=True)
class StrongGrowth:
    """The result of :func:`strong_growth`.

    Attributes:
        rho: ``mean_i ||g_i||^2 / ||mean_i g_i||^2`` (``inf`` if the mean gradient is zero while
            some ``g_i`` is not: the condition fails at this point).
        recommended_batch_size: ``ceil(rho)``, the smallest batch ``b >= rho``.
        mean_sq_norm: ``mean_i ||g_i||^2``.
        grad_sq_norm: ``||mean_i g_i||^2``.
        num_samples: N.
    """

    rho: float
    recommended_batch_size: int | None
    mean_sq_norm: float
    grad_sq_norm: float
    num_samples: int


def _vector(x: object, name: str) -> Tensor:
    return _as_float64(x, name).cpu()


def strong_growth(
    per_sample_norms: Tensor | np.ndarray, mean_gradient: Tensor | Sequence[Tensor] | float
) -> StrongGrowth:
    """Estimate the strong-growth constant from per-sample norms and the mean gradient.

    ``rho_hat = mean_i ||g_i||^2 / ||gbar||^2`` (Vaswani et al., arXiv:1810.07288; estimated
    per epoch by Lobanov & Koloskova, arXiv:2605.14800), with the batch size it recommends,
    ``b >= rho_hat``.

    Args:
        per_sample_norms: ``||g_i||`` for every probe sample, shape ``(N,)``.
        mean_gradient: ``gbar = (1/N) sum_i g_i`` of *the same* samples: a tensor, a list of
            tensors (one per parameter), or its norm as a number.

    Raises:
        ValueError: fewer than 2 samples, non-finite values, or all gradients zero (then every
            rho satisfies the condition and none can be estimated).
    """
    sq = _vector(per_sample_norms, "per_sample_norms").reshape(-1).pow(2)
    n = sq.numel()
    if n < 2:
        raise ValueError(
            f"rho needs the gradients of at least 2 samples, got {n}; with one sample the ratio is "
            "1 by definition. Use a probe set of a few hundred samples."
        )
    if isinstance(mean_gradient, (int, float)) and not isinstance(mean_gradient, bool):
        gsq = float(mean_gradient) ** 2
    elif isinstance(mean_gradient, Tensor):
        gsq = float(mean_gradient.detach().double().pow(2).sum())
    elif isinstance(mean_gradient, Sequence) and all(isinstance(t, Tensor) for t in mean_gradient):
        gsq = sum(float(t.detach().double().pow(2).sum()) for t in mean_gradient)
    else:
        raise TypeError(
            "mean_gradient must be a tensor, a list of tensors or a number (its norm), got "
            f"{type(mean_gradient).__name__}."
        )
    msq = float(sq.mean())
    if not (math.isfinite(msq) and math.isfinite(gsq)):
        raise ValueError("the gradients are not finite; rho is undefined. Check for overflow first.")
    if msq == 0:
        raise ValueError(
            "every per-sample gradient is zero: the point is stationary for each sample, so any "
            "rho satisfies the strong growth condition and none can be estimated. Probe at a "
            "point where the loss still has a gradient."
        )
    if gsq <= 1e-30 * msq:
        return StrongGrowth(math.inf, None, msq, gsq, n)
    rho = msq / gsq
    return StrongGrowth(rho, max(1, math.ceil(rho - 1e-9)), msq, gsq, n)


def estimate_strong_growth(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    engine: str = "auto",
    chunk_size: int = 256,
) -> StrongGrowth:
    """:func:`strong_growth` of a model on a probe set, via a per-sample engine (one pass).

    Example::

        est = rcd.estimate_strong_growth(model, loss_fn, x_probe, y_probe)
        print(est.rho, est.recommended_batch_size)
    """
    pg = probe_gradients(model, loss_fn, inputs, targets, engine=engine, chunk_size=chunk_size)
    return strong_growth(pg.per_sample_norms, pg.mean_grad)


def strong_growth_over(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    engine: str = "auto",
) -> StrongGrowth:
    """:func:`strong_growth` over every sample of a loader: the finite sum of arXiv:2605.14800.

    One pass over ``batches`` (e.g. the training ``DataLoader``), in eval mode, holding one
    gradient-sized buffer and one float per sample. Unlike :func:`estimate_strong_growth` on
    a probe subset it has no subset bias (see the module docstring).

    Example::

        est = rcd.strong_growth_over(model, loss_fn, train_loader)
        print(est.rho, est.recommended_batch_size)
    """
    pg = stream_gradients(model, loss_fn, batches, engine=engine)
    return strong_growth(pg.per_sample_norms, pg.mean_grad)
