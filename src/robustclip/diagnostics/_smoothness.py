"""(L0, L1)-smoothness along the training trajectory.

Zhang, He, Sra, Jadbabaie, "Why gradient clipping accelerates training" (arXiv:1905.11881)
observe that the local smoothness of neural-network losses grows with the gradient norm and
propose ``||hess f(x)|| <= L0 + L1 ||grad f(x)||``; under this condition clipped and normalised
methods may take steps that plain gradient descent may not (also arXiv:2605.14800).

The estimate has two parts:

* :func:`local_smoothness`: at a point ``x``, the change of the (probe) gradient over a short
  step ``r`` along a direction ``u`` (default: the normalised negative gradient, where gradient
  descent goes), ``L(x) = ||grad f(x + r u) - grad f(x)|| / r ~ ||hess f(x) u||``. It is a lower
  bound of ``||hess f(x)||`` that measures the curvature the optimizer actually meets, as
  Zhang et al. do along the update direction.
* :func:`fit_l0_l1`: a non-negative least-squares line ``L(x_t) ~ L0 + L1 ||grad f(x_t)||``
  through the points collected at probe times, and, optionally, the smallest ``L0`` that puts
  every point under the line (the constants as an upper bound, as in the definition).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from robustclip.diagnostics._gradients import (
    _check_probe,
    _trainable,
    eval_mode,
    mean_gradient,
)
from robustclip.per_sample._engine import unwrap_model

__all__ = ["LocalSmoothness", "local_smoothness", "L0L1Fit", "fit_l0_l1"]


@dataclass(frozen=True)
class LocalSmoothness:
    """The result of :func:`local_smoothness`.

    Attributes:
        smoothness: ``||grad f(x + r u) - grad f(x)|| / r``.
        grad_norm: ``||grad f(x)||`` on the probe set.
        radius: the step length ``r`` used.
    """

    smoothness: float
    grad_norm: float
    radius: float


def _flat_norm(ts: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


def local_smoothness(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    radius: float | None = None,
    direction: Sequence[Tensor] | None = None,
    grad_at_x: Sequence[Tensor] | None = None,
    chunk_size: int = 256,
) -> LocalSmoothness:
    """Local smoothness of the probe loss at the model's current parameters.

    ``L(x) = ||grad f(x + r u) - grad f(x)|| / r`` with ``u`` a unit direction (default
    ``-grad f(x)/||grad f(x)||``), after Zhang et al. (arXiv:1905.11881). The parameters are put
    back exactly as they were.

    Args:
        model, loss_fn, inputs, targets: the model and the probe set (run in eval mode).
        radius: the step ``r``; default ``1e-3 * max(||x||, 1)``: small enough to be local,
            large enough that float32 rounding of the gradient difference stays negligible.
        direction: ``u`` as one tensor per trainable parameter (normalised here).
        grad_at_x: ``grad f(x)`` if already known (saves one pass over the probe set).
        chunk_size: samples per forward pass.

    Raises:
        ValueError: the gradient is zero and no direction was given, or bad shapes.
    """
    _check_probe(model, loss_fn, inputs, targets)
    base = unwrap_model(model)
    _, params = _trainable(base, None)
    with eval_mode(base):
        g0 = list(grad_at_x) if grad_at_x is not None else mean_gradient(
            base, loss_fn, inputs, targets, params, chunk_size=chunk_size
        )
        if len(g0) != len(params) or any(a.shape != p.shape for a, p in zip(g0, params)):
            raise ValueError("grad_at_x must hold one tensor per trainable parameter, same shapes.")
        gnorm = _flat_norm(g0)
        if direction is None:
            if gnorm == 0:
                raise ValueError(
                    "the probe gradient is zero, so the default direction (-grad) is undefined. "
                    "Pass direction=... (e.g. the last update) to measure the curvature here."
                )
            u = [-g / gnorm for g in g0]
        else:
            u = list(direction)
            if len(u) != len(params) or any(a.shape != p.shape for a, p in zip(u, params)):
                raise ValueError("direction must hold one tensor per trainable parameter, same shapes.")
            un = _flat_norm(u)
            if un == 0 or not math.isfinite(un):
                raise ValueError("direction must be a finite, non-zero vector.")
            u = [t / un for t in u]
        if radius is None:
            radius = 1e-3 * max(_flat_norm([p.detach() for p in params]), 1.0)
        if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a finite number > 0, got {radius!r}.")
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, d in zip(params, u):
                    p.add_(d.to(p.dtype), alpha=radius)
            g1 = mean_gradient(base, loss_fn, inputs, targets, params, chunk_size=chunk_size)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        diff = _flat_norm([a - b for a, b in zip(g1, g0)])
    return LocalSmoothness(diff / radius, gnorm, float(radius))


def _as_np(x: object) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


@dataclass(frozen=True)
class L0L1Fit:
    """The result of :func:`fit_l0_l1`: ``L(x) ~ l0 + l1 ||grad f(x)||``.

    Attributes:
        l0, l1: the non-negative least-squares constants.
        l0_upper: the smallest ``L0 >= l0`` with every observed point on or under
            ``L0 + l1 ||grad f||`` (the constants read as an upper bound).
        r2: coefficient of determination of the least-squares line (1 = a perfect line).
        num_points: points fitted.
    """

    l0: float
    l1: float
    l0_upper: float
    r2: float
    num_points: int


def fit_l0_l1(
    grad_norms: Sequence[float] | np.ndarray | Tensor,
    smoothness: Sequence[float] | np.ndarray | Tensor,
) -> L0L1Fit:
    """Fit ``L ~ L0 + L1 ||grad f||`` with ``L0, L1 >= 0`` (Zhang et al., arXiv:1905.11881).

    Non-negative least squares in two unknowns: the unconstrained line if both coefficients
    come out non-negative, otherwise the better of the two boundary fits (``L1 = 0`` or
    ``L0 = 0``), which is where a convex quadratic's constrained minimum lies.

    Args:
        grad_norms: ``||grad f(x_t)||`` at each probe point.
        smoothness: the local smoothness ``L(x_t)`` at the same points.

    Raises:
        ValueError: fewer than 3 finite points, or every gradient norm equal (then ``L0`` and
            ``L1`` cannot be told apart).
    """
    g, s = _as_np(grad_norms), _as_np(smoothness)
    if g.shape != s.shape:
        raise ValueError(
            f"grad_norms ({g.size}) and smoothness ({s.size}) must have one value per point each."
        )
    ok = np.isfinite(g) & np.isfinite(s)
    g, s = g[ok], s[ok]
    if g.size < 3:
        raise ValueError(
            f"the (L0, L1) fit needs at least 3 probe points, got {g.size}; probe more often "
            "(more epochs, or several probes per epoch)."
        )
    if np.ptp(g) <= 1e-12 * max(np.abs(g).max(), 1e-300):
        raise ValueError(
            "every probe point has the same gradient norm, so L0 and L1 cannot be separated; "
            "probe at points further apart along training."
        )

    def sse(a: float, b: float) -> float:
        return float(((s - a - b * g) ** 2).sum())

    b, a = np.polyfit(g, s, 1)
    if a < 0 or b < 0:
        cands = [(float(s.mean()), 0.0), (0.0, float((g * s).sum() / (g * g).sum()))]
        cands = [(max(x, 0.0), max(y, 0.0)) for x, y in cands]
        a, b = min(cands, key=lambda ab: sse(*ab))
    a, b = float(a), float(b)
    tot = float(((s - s.mean()) ** 2).sum())
    r2 = 1.0 - sse(a, b) / tot if tot > 0 else 1.0
    upper = max(a, float((s - b * g).max()))
    return L0L1Fit(l0=a, l1=b, l0_upper=upper, r2=r2, num_points=int(g.size))
