"""Per-sample gradient norm statistics, and the clipping thresholds they suggest.

PS-Clip-SGD (Nobile & Grohs, arXiv:2605.02701) clips each sample's gradient to norm ``c`` and
reports, per epoch, the average per-sample gradient norm and how many gradients were clipped.
A radius is best read off the distribution of those norms: a quantile ``q`` of them clips the
largest ``1 - q`` share, so ``q`` trades robustness to outliers (lower ``q``) against the bias
of clipping many typical samples (higher ``q``).

The spectral threshold follows the adaptive rule of spectral clipping (arXiv:2605.11838): a
quantile (0.85 there) of the history of top singular values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

__all__ = [
    "NormStatistics",
    "norm_statistics",
    "clipped_fraction",
    "suggest_max_norm",
    "suggest_spectral_threshold",
    "DEFAULT_QUANTILES",
]

#: the quantiles reported by :func:`norm_statistics`
DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def _values(x: object, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().double().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a 1-D tensor, array or list of numbers.") from e
    if a.size == 0:
        raise ValueError(f"{name} is empty; observe some gradients before asking for statistics.")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf; check the loss and gradients for overflow.")
    if (a < 0).any():
        raise ValueError(f"{name} must be norms (>= 0); got a negative value {a.min()}.")
    return a


def _check_q(q: float, name: str = "quantile") -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {q!r}.")
    return float(q)


@dataclass(frozen=True)
class NormStatistics:
    """Distribution of per-sample gradient norms.

    Attributes:
        count: number of norms.
        mean: their average (the PS-Clip paper's "average per-sample gradient norm").
        max: the largest.
        quantiles: ``{q: value}`` for the requested quantiles.
        hist_counts: histogram counts of the positive norms over ``hist_edges``.
        hist_edges: bin edges, log-spaced between the smallest and largest positive norm
            (heavy tails span decades).
        zero_count: norms exactly 0 (left out of the log-spaced histogram).
    """

    count: int
    mean: float
    max: float
    quantiles: dict[float, float]
    hist_counts: list[int] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)
    zero_count: int = 0


def norm_statistics(
    norms: Tensor | np.ndarray | Sequence[float],
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    bins: int = 50,
) -> NormStatistics:
    """Quantiles, mean and a log-spaced histogram of per-sample gradient norms.

    Args:
        norms: per-sample gradient norms (e.g. ``StepInfo.per_sample_norms`` of a clipper with
            a per-sample method, or :attr:`ProbeGradients.per_sample_norms`).
        quantiles: which quantiles to report, each in (0, 1].
        bins: histogram bins.
    """
    a = _values(norms, "norms")
    qs = [_check_q(q) for q in quantiles]
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}.")
    pos = a[a > 0]
    if pos.size:
        lo, hi = float(pos.min()), float(pos.max())
        edges = np.geomspace(lo, hi, bins + 1) if hi > lo else np.array([lo * 0.9, hi * 1.1])
        counts, edges = np.histogram(pos, bins=edges)
    else:
        counts, edges = np.zeros(0, dtype=np.int64), np.zeros(0)
    return NormStatistics(
        count=int(a.size),
        mean=float(a.mean()),
        max=float(a.max()),
        quantiles={q: float(np.quantile(a, q)) for q in qs},
        hist_counts=[int(c) for c in counts],
        hist_edges=[float(e) for e in edges],
        zero_count=int((a == 0).sum()),
    )


def clipped_fraction(norms: Tensor | np.ndarray | Sequence[float], max_norm: float) -> float:
    """Share of samples that ``min(1, c/||g_i||)`` scales down: ``mean(||g_i|| > c)``."""
    a = _values(norms, "norms")
    if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}.")
    return float((a > max_norm).mean())


def suggest_max_norm(norms: Tensor | np.ndarray | Sequence[float], quantile: float = 0.9) -> float:
    """A per-sample clipping radius ``c``: the ``quantile`` of observed per-sample norms.

    With the default 0.9, about one sample in ten is clipped at the norms observed: the
    outliers of a heavy-tailed distribution are capped while typical samples pass unchanged.

    Raises:
        ValueError: the quantile is 0 (all, or most, per-sample gradients are zero).
    """
    a = _values(norms, "norms")
    q = _check_q(quantile)
    c = float(np.quantile(a, q))
    if c <= 0:
        raise ValueError(
            f"the {q}-quantile of the per-sample norms is 0 (the gradients are zero at the probed "
            "points), so it suggests no clipping radius. Probe while the model still learns."
        )
    return c


def suggest_spectral_threshold(
    sigma_max: Tensor | np.ndarray | Sequence[float], quantile: float = 0.85
) -> float:
    """A spectral-clipping ``tau``: the ``quantile`` of a history of top singular values.

    The same rule the spectral paper (arXiv:2605.11838) uses adaptively (0.85-quantile of the
    last 100 values), applied here to the whole observed history to give one constant.
    """
    a = _values(sigma_max, "sigma_max")
    q = _check_q(quantile)
    tau = float(np.quantile(a, q))
    if tau <= 0:
        raise ValueError(
            "the top singular values observed are 0 (zero gradients), so they suggest no "
            "threshold. Observe gradients while the model still learns."
        )
    return tau


def as_numpy(x: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """Flat float64 numpy copy (internal helper for the tracker)."""
    if isinstance(x, Tensor):
        return x.detach().double().cpu().numpy().reshape(-1)
    return np.asarray(x, dtype=np.float64).reshape(-1)
