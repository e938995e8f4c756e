"""The tail index of gradient noise, and samplers of known tail index to check it against.

Simsekli, Sagun, Gürbüzbalaban, "A Tail-Index Analysis of Stochastic Gradient Noise in Deep
Neural Networks" (arXiv:1901.06053) model the noise of SGD as symmetric alpha-stable and measure
``alpha`` with the estimator of Mohammadi, Mohammadpour, Ogata, "On estimating the tail index and
the spectral measure of multivariate alpha-stable distributions" (Metrika, 2015):

    N = K1 * K2 noise samples X_j, Y_i = sum of the i-th block of K1 of them,
    1/alpha = (1 / log K1) * [ (1/K2) sum_i log ||Y_i||  -  (1/N) sum_j log ||X_j|| ].

Why it works: for strictly alpha-stable X, a sum of K1 independent copies has the law of
``K1**(1/alpha) * X``, so the mean log norm grows by exactly ``log(K1)/alpha``. The estimator is
therefore unbiased for ``1/alpha`` on stable noise of any dimension, and stays so after any fixed
linear map (a random sketch) of the vectors. For noise that is only in the *domain of attraction*
of a stable law (Student-t) it is consistent as K1 grows. ``alpha = 2`` is Gaussian; smaller is
heavier-tailed; finite-variance noise gives values near 2 (slightly above 2 is sampling error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["TailIndex", "tail_index", "symmetric_stable", "MIN_TAIL_SAMPLES"]

#: fewest noise samples :func:`tail_index` accepts: K1 = K2 = 4. Below this the spread of the
#: estimate covers the whole range (0, 2], so a number would mislead rather than inform.
MIN_TAIL_SAMPLES = 16


@dataclass(frozen=True)
class TailIndex:
    """The result of :func:`tail_index`.

    Attributes:
        alpha: the estimate of the tail index (``inf`` when the estimate of ``1/alpha`` is <= 0,
            which only happens for noise with no spread in the block sums).
        inv_alpha: the estimate of ``1/alpha`` itself (the unbiased quantity).
        k1: block length K1.
        k2: number of blocks K2.
        num_samples: samples used, ``k1 * k2`` (any remainder of N is dropped).
    """

    alpha: float
    inv_alpha: float
    k1: int
    k2: int
    num_samples: int


def _as_float64(x: object, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array of shape (N,) or (N, d), got "
            f"{type(x).__name__}."
        )
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}.")
    return x.detach().to(torch.float64)


def tail_index(noise: Tensor | np.ndarray, k1: int | None = None, *, center: bool = False) -> TailIndex:
    """Estimate the tail index ``alpha`` of noise samples (Mohammadi et al. 2015).

    The estimator used by Simsekli et al. (arXiv:1901.06053) for SGD noise: the N samples are
    split into K2 consecutive blocks of K1 (default ``K1 = round(sqrt(N))``, the remainder
    dropped), ``Y_i`` is the sum of block ``i`` and

        1/alpha = (1/log K1) * [mean_i log||Y_i|| - mean_j log||X_j||].

    Args:
        noise: samples X_j, shape ``(N,)`` (scalars) or ``(N, d)`` (vectors, the norm is
            Euclidean). Samples must be independent and identically distributed; their order
            must not be sorted by size (blocks are consecutive).
        k1: the block length K1, ``2 <= k1 <= N // 2``.
        center: subtract the sample mean first. Use it on per-sample gradients ``g_j``: the
            noise is ``X_j = g_j - mean_j g_j``.

    Returns:
        a :class:`TailIndex`.

    Raises:
        ValueError: fewer than :data:`MIN_TAIL_SAMPLES` samples, non-finite values, constant
            noise (all X_j = 0, e.g. identical per-sample gradients or zero gradients), or a
            sample exactly equal to zero (the estimator needs ``log||X_j||``).

    Example::

        x = symmetric_stable(1.5, (20000, 10))
        tail_index(x).alpha   # close to 1.5
    """
    x = _as_float64(noise, "noise")
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(
            f"noise must have shape (N,) or (N, d), got {tuple(x.shape)}; flatten each sample "
            "into one row (e.g. noise.flatten(1))."
        )
    n = x.shape[0]
    if n < MIN_TAIL_SAMPLES:
        raise ValueError(
            f"the tail index needs at least {MIN_TAIL_SAMPLES} noise samples, got {n}. Use a "
            "larger probe set (a few hundred samples or more gives a usable estimate)."
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            "the noise contains NaN or inf; the tail index of non-finite samples is undefined. "
            "Check the loss and gradients for overflow first."
        )
    if center:
        x = x - x.mean(0, keepdim=True)
    if k1 is None:
        k1 = max(2, int(round(math.sqrt(n))))
    if isinstance(k1, bool) or not isinstance(k1, int):
        raise TypeError(f"k1 must be an int, got {type(k1).__name__}.")
    if not 2 <= k1 <= n // 2:
        raise ValueError(
            f"k1 must satisfy 2 <= k1 <= N // 2 = {n // 2} (at least two blocks of at least two "
            f"samples), got {k1}."
        )
    k2 = n // k1
    used = k1 * k2
    x = x[:used]
    norms = torch.linalg.vector_norm(x, dim=1)
    # the noise's own scale decides what "zero" means: rounding leaves ~1e-16 relative residue
    scale = float(norms.max())
    zero = norms <= 1e-12 * scale if scale > 0 else torch.ones_like(norms, dtype=torch.bool)
    if bool(zero.all()):
        raise ValueError(
            "the noise is constant (every X_j = 0): all per-sample gradients are equal, or zero. "
            "A constant has no tail; the tail index is undefined here. Probe at another point of "
            "training or with more varied samples."
        )
    if bool(zero.any()):
        raise ValueError(
            f"{int(zero.sum())} of {used} noise samples are exactly zero; the estimator takes "
            "log||X_j|| and assumes a continuous noise law. Drop the samples whose gradient "
            "equals the mean (or those with no gradient) before estimating."
        )
    y = x.reshape(k2, k1, x.shape[1]).sum(1)
    y_norms = torch.linalg.vector_norm(y, dim=1)
    if bool((y_norms <= 1e-12 * scale).any()):
        raise ValueError(
            "a block sum of the noise is exactly zero, so the noise is degenerate (samples cancel "
            "in pairs?). Shuffle the samples, or pass noise that is independent across samples."
        )
    inv = float((y_norms.log().mean() - norms.log().mean()) / math.log(k1))
    alpha = 1.0 / inv if inv > 0 else math.inf
    return TailIndex(alpha=alpha, inv_alpha=inv, k1=k1, k2=k2, num_samples=used)


def symmetric_stable(
    alpha: float,
    shape: tuple[int, ...] | int,
    *,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Independent symmetric alpha-stable samples (Chambers-Mallows-Stuck 1976).

    With ``V ~ U(-pi/2, pi/2)`` and ``W ~ Exp(1)``:
    ``X = sin(alpha V) / cos(V)**(1/alpha) * (cos((1 - alpha) V) / W)**((1 - alpha)/alpha)``
    and ``X = tan(V)`` for ``alpha = 1``. ``alpha = 2`` gives N(0, 2 scale^2) and ``alpha = 1``
    the standard Cauchy law (times ``scale``). Used to validate :func:`tail_index`.

    Args:
        alpha: the tail index, ``0 < alpha <= 2``.
        shape: the output shape.
        scale: the scale parameter.
        generator: a ``torch.Generator`` for reproducible draws.
        dtype: floating dtype of the result.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number in (0, 2], got {type(alpha).__name__}.")
    if not 0 < alpha <= 2:
        raise ValueError(f"alpha must be in (0, 2] (2 = Gaussian), got {alpha}.")
    if isinstance(shape, int):
        shape = (shape,)
    half_pi = math.pi / 2
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    # keep V strictly inside (-pi/2, pi/2): cos(V) = 0 would give inf
    v = (u * 2 - 1).clamp(-1 + 1e-15, 1 - 1e-15) * half_pi
    w = -torch.log1p(-torch.rand(shape, generator=generator, dtype=torch.float64).clamp(max=1 - 1e-16))
    if alpha == 1:
        x = torch.tan(v)
    else:
        x = (
            torch.sin(alpha * v)
            / torch.cos(v).pow(1 / alpha)
            * (torch.cos((1 - alpha) * v) / w).pow((1 - alpha) / alpha)
        )
    return (x * scale).to(dtype)
