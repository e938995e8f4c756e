"""The maths of spectral clipping: clamp the singular values of a batch of matrices.

Yukhimchuk, Takáč, Kolar, Choudhury, "Gradient Clipping Beyond Vector Norms: A Spectral Approach
for Matrix-Valued Parameters" (arXiv:2605.11838). A matrix ``G`` with SVD ``G = U diag(S) V^T``
has its singular values clamped at a threshold ``tau``:

* exact mode: ``G <- U diag(min(S, tau)) V^T`` (full SVD, :func:`_exact`);
* randomized mode: only the top ``r`` singular triplets are computed, with a randomized range
  finder (Halko, Martinsson, Tropp, arXiv:0909.4061, Alg. 4.4 and 5.1: a Gaussian sketch with
  ``q = r + p`` columns, ``niter`` power iterations, a Rayleigh-Ritz step on the small matrix
  ``Q^T G``), and only that part is corrected: ``G <- G + U_r diag(min(S_r, tau) - S_r) V_r^T``
  (:func:`_randomized`).

Both modes return the clip as a low-rank correction ``left @ right`` to add to ``G``
(:class:`Decomposition`), so a matrix that is not clipped stays bit-for-bit unchanged and no
decision is taken on the host. A non-finite matrix is never decomposed: its correction is zero.
:func:`clip_singular_values` is the functional form; the transform that selects a model's
gradients, batches them and keeps thresholds is :func:`robustclip.spectral_clip`
(``_spectral.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from robustclip._kernels import matmul

__all__ = ["Decomposition", "clip_singular_values", "decompose", "sketch_columns"]

#: Below this many sketch columns torch's CPU matmul takes a much slower path (measured on the
#: development machine), so the default oversampling rounds ``rank + p`` up to it.
MIN_SKETCH_COLUMNS = 16
DEFAULT_OVERSAMPLE = 5  # the authors' default p


class Decomposition(NamedTuple):
    """``G + left @ right`` is the clipped matrix (a low-rank correction, never materialized)."""

    left: Tensor  # (k, m, c)
    right: Tensor  # (k, c, n)
    sigma_before: Tensor  # (k,) top singular value before clipping (0 for a non-finite G)
    sigma_after: Tensor  # (k,) top singular value after (an estimate in randomized mode)
    finite: Tensor  # (k,) bool: G was finite (otherwise the correction is zero)
    used: int | None = None  # left[..., k] @ right[k] is zero for k >= used (left's columns are)


def _orthonormal(y: Tensor) -> Tensor:
    q: Tensor = torch.linalg.qr(y).Q  # torch.linalg's functions return Any
    return q


def _finite_rows(sketch: Tensor) -> tuple[Tensor, Tensor]:
    """Which matrices of a batch are finite, read from the first product ``G X``: a non-finite
    entry of ``G`` makes its whole row of ``G X`` non-finite, so no extra pass over ``G`` is
    needed. Returns ``(finite (k,), drop (k, 1, 1))``; only the small products are then zeroed
    for the dropped matrices, so no QR or eigensolver ever sees a NaN and their correction is
    zero."""
    finite = torch.isfinite(_max_abs(sketch))
    return finite, ~finite[:, None, None]


def _max_abs(x: Tensor, keepdim: bool = False) -> Tensor:
    """Largest absolute entry of each matrix of a batch (NaN if any entry is NaN), from two
    reductions: ``abs()`` would allocate a copy, and a new tensor inside a step can cost more
    in page faults than the reduction itself."""
    dims = (-2, -1)
    return torch.maximum(x.amax(dim=dims, keepdim=keepdim), x.amin(dim=dims, keepdim=keepdim).neg_())


def _exact(g: Tensor, tau: Tensor) -> Decomposition:
    finite = torch.isfinite(g).flatten(1).all(1)
    # never hand a non-finite matrix to the SVD: its slot decomposes as zero instead
    g = torch.where(finite[:, None, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    delta = torch.minimum(s, tau[:, None]) - s  # <= 0, and exactly 0 where S <= tau
    return Decomposition(u * delta[:, None, :], vh, s[:, 0], torch.minimum(s[:, 0], tau), finite)


def _randomized(
    g: Tensor,
    tau: Tensor,
    rank: int,
    q: int,
    niter: int,
    generator: torch.Generator,
) -> Decomposition:
    """Top-``rank`` clipping by a randomized range finder (Halko, Martinsson, Tropp,
    arXiv:0909.4061).

    The subspace is that of their randomized subspace iteration (Alg. 4.4) with ``niter`` power
    iterations, ``Q = orth(Y)`` with ``Y = (G G^T)^niter G Omega``, reached from the row space:

    1. ``Z = Omega`` (Gaussian, ``n x q``), then ``niter`` times ``Z <- orth(G^T orth(G Z))``,
       so that ``span Z = span (G^T G)^niter Omega``. The inner ``orth`` is a QR for the first
       sketch ``G Omega``, whose columns all lean on the top singular vector (rounded entry by
       entry, ``G^T G Omega`` would keep the direction of ``sigma_i`` only to
       ``eps (sigma_1 / sigma_i)^2``); the later ``Z`` come from a QR, so ``G Z`` has columns
       of their own sizes and is only scaled;
    2. ``Y = G Z`` (Halko's left space), ``Q = orth(Y)`` (Householder QR);
    3. ``B^T = G^T Q`` and the Rayleigh-Ritz step (their Alg. 5.1): the SVD of the ``q x n``
       matrix ``B = Q^T G`` from the eigendecomposition of its ``q x q`` Gram
       ``B B^T = Ub diag(s^2) Ub^T`` in float64;
    4. the correction ``Q Ub diag(min(s, tau) / s - 1) Ub^T B`` (``Ub^T B = diag(s) V^T``),
       nonzero only for the top ``rank`` values above ``tau``, added by the caller in one pass.

    That is ``2 niter + 2`` products with ``G`` and the correction, as in Halko's scheme, all in
    ``G``'s precision, so a matrix of rank ``<= q`` is clipped exactly. The thin products take
    most of the time; they go through :func:`robustclip._kernels.matmul`, which, with
    :data:`robustclip.backends.autotune` on, picks the fastest kernel and operand order for
    ``G``'s layout (``torch.matmul`` otherwise).

    A non-finite ``G`` is recognised from the first product (see below), and only the small
    products are zeroed for it, so no QR or eigensolver sees a NaN and its correction is zero.
    """
    k, _, n = g.shape
    if not (g.is_contiguous() or g.mT.is_contiguous()):
        g = g.contiguous()

    def g_at(x: Tensor, drop: Tensor | None = None, transpose: bool = False) -> Tensor:
        out = matmul(g.mT if transpose else g, x)  # G @ x, or G^T @ x
        # the matrices that are not finite zeroed, in place: no new buffer
        return out if drop is None else out.masked_fill_(drop, 0.0)

    # the sketch, drawn as (q, n) and used transposed
    omega = torch.randn(k, q, n, generator=generator, device=generator.device, dtype=g.dtype)
    z = omega.to(g.device).mT
    finite = drop = None
    # step 1: power iterations on the row space
    for i in range(niter):
        t = g_at(z)
        if drop is None:
            finite, drop = _finite_rows(t)
        if i == 0:
            t = _orthonormal(t.masked_fill_(drop, 0.0))
        else:
            # scaled to unit Frobenius norm, so that ||G^T T|| <= sigma_1 stays in range wherever
            # G is; by the largest entry first, so that the norm's squares cannot overflow. In
            # place: t is this step's own product, and each new tensor here would page-fault
            tiny = torch.finfo(t.dtype).tiny
            t.div_(_max_abs(t, keepdim=True).clamp_min_(tiny))
            t.div_(torch.linalg.vector_norm(t, dim=(-2, -1), keepdim=True).clamp_min_(tiny))
        z = _orthonormal(g_at(t, drop, transpose=True))
    if drop is None:
        y = g_at(z)
        finite, drop = _finite_rows(y)
        y.masked_fill_(drop, 0.0)
    else:
        y = g_at(z, drop)
    qm = _orthonormal(y)  # step 2
    bt = g_at(qm, drop, transpose=True)  # step 3: B^T = G^T Q, (k, n, q)
    # the Gram in float64 gives the singular values of B to ~1e-8 relative even 1e4 below the
    # top one, and costs a q x q eigensolver instead of a q x n SVD
    bd = bt.double()
    lam, ub = torch.linalg.eigh(bd.mT @ bd)  # ascending
    s = lam.flip(-1).clamp_min(0.0).sqrt()
    ub = ub.flip(-1).to(g.dtype)
    tau_d = tau.to(s.dtype)[:, None]
    # step 4: a factor of exactly 0 (so a zero correction) where s <= tau, and for all but the
    # top r values
    factor = torch.where(s > tau_d, tau_d / s - 1.0, 0.0)
    factor[:, rank:] = 0.0
    # all q columns kept (Q^T is the row-major side of the QR); the caller's update may use
    # only the first r (`used`): which inner dimension is faster depends on the layout
    left = ((ub * factor.to(g.dtype)[:, None, :]).mT @ qm.mT).mT
    right = (bt @ ub).mT  # Ub^T B = diag(s) V^T, (k, q, n)
    s = s.to(g.dtype)
    # the largest singular value left: the clipped top one, or the first one not corrected
    after = torch.minimum(s[:, 0], tau)
    if q > rank:
        after = torch.maximum(after, s[:, rank])
    assert finite is not None  # read from the first product with G
    return Decomposition(left, right, s[:, 0], after, finite, rank)


def clip_singular_values(
    g: Tensor,
    tau: Tensor | float,
    *,
    rank: int | None = None,
    oversample: int | None = None,
    niter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clip the singular values of a matrix (or a batch of them) at ``tau``.

    The functional core of :func:`spectral_clip`, for one matrix ``(m, n)`` or a batch
    ``(k, m, n)`` with one ``tau`` each (a number or a tensor of shape ``()`` or ``(k,)``).

    Args:
        g: the matrices; they must be finite (see :func:`spectral_clip` for the guard).
        tau: the threshold(s); ``inf`` leaves a matrix unchanged.
        rank: ``None`` for the exact mode (full SVD), else the number ``r`` of top singular
            values to clip with the randomized mode.
        oversample: extra sketch columns ``p`` (default ``max(5, 16 - r)``).
        niter: power iterations of the range finder.
        generator: source of the Gaussian sketch (randomized mode).

    Returns:
        ``(clipped, sigma_before, sigma_after)``: the clipped matrices (a new tensor, same
        shape and dtype as ``g``) and the top singular value before and after, shape ``(k,)``
        or ``()``.
    """
    single = g.dim() == 2
    if g.dim() not in (2, 3):
        raise ValueError(f"g must be a matrix (m, n) or a batch (k, m, n), got shape {tuple(g.shape)}.")
    gb = g.unsqueeze(0) if single else g
    work = gb.to(torch.promote_types(gb.dtype, torch.float32))
    tau_t = torch.as_tensor(tau, dtype=work.dtype, device=work.device).reshape(-1)
    tau_t = tau_t.expand(work.shape[0]) if tau_t.numel() == 1 else tau_t
    q = sketch_columns(rank, oversample)
    gen = generator if generator is not None else torch.Generator(device=work.device).manual_seed(0)
    dec = decompose(work, tau_t, rank, q, niter, gen)
    out = torch.baddbmm(work, dec.left, dec.right).to(g.dtype)
    if single:
        return out[0], dec.sigma_before[0], dec.sigma_after[0]
    return out, dec.sigma_before, dec.sigma_after


def sketch_columns(rank: int | None, oversample: int | None) -> int:
    """``q = r + p``, the sketch's columns (0 in the exact mode)."""
    if rank is None:
        return 0
    p = max(DEFAULT_OVERSAMPLE, MIN_SKETCH_COLUMNS - rank) if oversample is None else oversample
    return rank + p


def decompose(
    g: Tensor,
    tau: Tensor,
    rank: int | None,
    q: int,
    niter: int,
    generator: torch.Generator | None,
) -> Decomposition:
    """Pick the mode: a sketch as wide as the matrix would not be cheaper than the full SVD.
    ``generator`` draws the randomized mode's sketch (unused, and may be None, for ``rank=None``)."""
    tall = g.shape[-2] < g.shape[-1]
    if tall:  # work on the tall side: the sketch multiplies the smaller dimension
        g = g.mT
    if rank is None or q >= g.shape[-1]:
        dec = _exact(g, tau)
    else:
        if generator is None:
            raise ValueError("the randomized mode (rank=...) needs a generator for its sketch.")
        dec = _randomized(g, tau, rank, q, niter, generator)
    if tall:  # (left right)^T = right^T left^T
        dec = dec._replace(left=dec.right.mT, right=dec.left.mT)
    return dec
