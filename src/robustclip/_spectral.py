"""Spectral clipping of matrix-valued gradients.

Yukhimchuk, Takáč, Kolar, Choudhury, "Gradient Clipping Beyond Vector Norms: A Spectral Approach
for Matrix-Valued Parameters" (arXiv:2605.11838). Each selected parameter's gradient is read as
a matrix ``G`` (``reshape(shape[0], -1)``, so a conv weight ``(out, in, kh, kw)`` becomes
``(out, in*kh*kw)``) with SVD ``G = U diag(S) V^T``, and its singular values are clamped at a
threshold ``tau``:

* exact mode: ``G <- U diag(min(S, tau)) V^T`` (full SVD);
* randomized mode: only the top ``r`` singular triplets are computed, with a randomized range
  finder (Halko, Martinsson, Tropp, arXiv:0909.4061, Alg. 4.4 and 5.1: a Gaussian sketch with
  ``q = r + p`` columns, ``niter`` power iterations, a Rayleigh-Ritz step on the small matrix
  ``Q^T G``), and only that part is corrected: ``G <- G + U_r diag(min(S_r, tau) - S_r) V_r^T``
  (see :func:`_randomized` for how the products with ``G`` are arranged).

Clipping only shrinks the singular values above ``tau`` and keeps every singular direction;
with ``tau`` below all of them the result is ``tau U V^T``, the orthogonalized direction Muon
steps along. A row vector's only singular value is its norm, so norm clipping is spectral
clipping of a ``1 x n`` matrix; 1-D parameters can be norm-clipped the same way.

Both modes write the result as ``G + correction``, so a layer that is not clipped is left
bit-for-bit unchanged, and no decision is taken on the host. (On CUDA, torch.linalg's SVD, QR
and eigh synchronize with the device by themselves; nothing else in the step does.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from robustclip._kernels import addmm_, matmul
from robustclip._norm_transforms import clip_coefficient
from robustclip._transform import GradientTransform, StepContext
from robustclip._validate import check_positive_int
from robustclip.thresholds import NoClip, Threshold, _select, as_threshold

__all__ = ["spectral_clip", "SpectralClip", "SpectralClipState", "clip_singular_values"]

#: ``select(name, param, module) -> bool``: whether a parameter is spectrally clipped.
Selector = Callable[[str, Tensor, "nn.Module | None"], bool]

#: Below this many sketch columns torch's CPU matmul takes a much slower path (measured on the
#: development machine), so the default oversampling rounds ``rank + p`` up to it.
MIN_SKETCH_COLUMNS = 16
DEFAULT_OVERSAMPLE = 5  # the authors' default p
_NO_CLIP = NoClip()


# -- the maths on a batch of matrices -------------------------------------------------------------


class _Decomposition(NamedTuple):
    """``G + left @ right`` is the clipped matrix (a low-rank correction, never materialized)."""

    left: Tensor  # (k, m, c)
    right: Tensor  # (k, c, n)
    sigma_before: Tensor  # (k,) top singular value before clipping (0 for a non-finite G)
    sigma_after: Tensor  # (k,) top singular value after (an estimate in randomized mode)
    finite: Tensor  # (k,) bool: G was finite (otherwise the correction is zero)
    used: int | None = None  # left[..., k] @ right[k] is zero for k >= used (left's columns are)


def _orthonormal(y: Tensor) -> Tensor:
    return torch.linalg.qr(y).Q


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


def _exact(g: Tensor, tau: Tensor) -> _Decomposition:
    finite = torch.isfinite(g).flatten(1).all(1)
    # never hand a non-finite matrix to the SVD: its slot decomposes as zero instead
    g = torch.where(finite[:, None, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    delta = torch.minimum(s, tau[:, None]) - s  # <= 0, and exactly 0 where S <= tau
    return _Decomposition(u * delta[:, None, :], vh, s[:, 0], torch.minimum(s[:, 0], tau), finite)


def _randomized(
    g: Tensor,
    tau: Tensor,
    rank: int,
    q: int,
    niter: int,
    generator: torch.Generator,
) -> _Decomposition:
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
    most of the time; they go through :func:`robustclip._kernels.matmul`, which picks the
    fastest kernel and operand order for ``G``'s layout.

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
    return _Decomposition(left, right, s[:, 0], after, finite, rank)


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
    q = _sketch_columns(rank, oversample)
    gen = generator if generator is not None else torch.Generator(device=work.device).manual_seed(0)
    dec = _decompose(work, tau_t, rank, q, niter, gen)
    out = torch.baddbmm(work, dec.left, dec.right).to(g.dtype)
    if single:
        return out[0], dec.sigma_before[0], dec.sigma_after[0]
    return out, dec.sigma_before, dec.sigma_after


def _sketch_columns(rank: int | None, oversample: int | None) -> int:
    if rank is None:
        return 0
    p = max(DEFAULT_OVERSAMPLE, MIN_SKETCH_COLUMNS - rank) if oversample is None else oversample
    return rank + p


def _decompose(
    g: Tensor,
    tau: Tensor,
    rank: int | None,
    q: int,
    niter: int,
    generator: torch.Generator,
) -> _Decomposition:
    """Pick the mode: a sketch as wide as the matrix would not be cheaper than the full SVD."""
    tall = g.shape[-2] < g.shape[-1]
    if tall:  # work on the tall side: the sketch multiplies the smaller dimension
        g = g.mT
    if rank is None or q >= g.shape[-1]:
        dec = _exact(g, tau)
    else:
        dec = _randomized(g, tau, rank, q, niter, generator)
    if tall:  # (left right)^T = right^T left^T
        dec = dec._replace(left=dec.right.mT, right=dec.left.mT)
    return dec


# -- which parameters, and how they are batched -----------------------------------------------


@dataclass(frozen=True)
class _Group:
    """Same-shaped matrices (after reshaping and turning wide ones tall), decomposed together."""

    indices: tuple[int, ...]  # parameter positions
    transposed: tuple[bool, ...]  # whether each member is used as its transpose
    index_tensor: Tensor


@dataclass(frozen=True)
class _Plan:
    groups: tuple[_Group, ...]
    vectors: tuple[int, ...]  # 1-D (or 0-D) parameters to norm-clip
    vector_index: Tensor | None
    selected: tuple[str, ...]  # names of the spectrally clipped parameters


def _is_embedding(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in patterns)


# -- the transform ---------------------------------------------------------------------------------


class SpectralClipState(NamedTuple):
    thresholds: tuple  # one threshold state per parameter (each layer has its own)
    rng: Tensor  # state of the generator of the randomized sketches (uint8, on the host)
    sigma_before: Tensor  # (P,) reading: top singular value before (the norm, for vectors)
    sigma_after: Tensor  # (P,) reading: top singular value after
    threshold: Tensor  # (P,) reading: tau used at this step
    clipped: Tensor  # (P,) reading: 1.0 where tau was below the top singular value
    nonfinite: Tensor  # (P,) reading: 1.0 where the gradient was not finite (left untouched)
    clipped_fraction: Tensor  # reading: share of the clipped matrices among those selected


class SpectralClip(GradientTransform):
    """Spectral clipping transform; build it with :func:`spectral_clip`."""

    name = "spectral_clip"

    def __init__(
        self,
        tau: float | Threshold,
        *,
        rank: int | None = 8,
        oversample: int | None = None,
        niter: int = 2,
        select: Selector | Iterable[str] | None = None,
        head: str | Iterable[str] | None = "auto",
        clip_vectors: float | Threshold | None = None,
        seed: int = 0,
    ) -> None:
        self.threshold = as_threshold(tau, "tau")
        if rank is not None:
            rank = check_positive_int(rank, "rank")
        if oversample is not None:
            if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
                raise ValueError(f"oversample must be an int >= 0, got {oversample!r}.")
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
            raise ValueError(f"niter must be an int >= 0, got {niter!r}.")
        self.rank, self.oversample, self.niter = rank, oversample, niter
        self.q = _sketch_columns(rank, oversample)
        if select is None or callable(select):
            self.select: Selector | tuple[str, ...] | None = select
        elif isinstance(select, str):
            raise TypeError(
                f"select={select!r} is one string; pass a list of parameter names, e.g. "
                f"select=[{select!r}], or a predicate select(name, param, module) -> bool."
            )
        else:
            self.select = tuple(select)
            if not all(isinstance(s, str) for s in self.select):
                raise TypeError("select must be a predicate or a list of parameter names (str).")
        if head is None or head == "auto":
            self.head: str | tuple[str, ...] | None = head
        elif isinstance(head, str):
            self.head = (head,)
        else:
            self.head = tuple(head)
            if not all(isinstance(s, str) for s in self.head):
                raise TypeError('head must be "auto", None, or module/parameter names (str).')
        self.vector_threshold = None if clip_vectors is None else as_threshold(clip_vectors, "clip_vectors")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        self.seed = seed
        self._plans: dict[Any, _Plan] = {}

    # -- selection ---------------------------------------------------------------------------------
    def _auto_head(self, params: Sequence[Tensor], modules: Sequence[nn.Module | None]) -> int | None:
        # The output head is the Linear that owns the last parameter (models register their
        # head last). A head tied to the embedding is owned by the embedding, so nothing
        # is taken for a head then, which is right: the embedding rule already skips it.
        if modules and isinstance(modules[-1], nn.Linear):
            head_mod = modules[-1]
            for i, (p, m) in enumerate(zip(params, modules)):
                if m is head_mod and p is head_mod.weight:
                    return i
        return None

    def selected(
        self, params: Sequence[Tensor], names: Sequence[str], modules: Sequence[nn.Module | None]
    ) -> list[bool]:
        """Which parameters are spectrally clipped (see :func:`spectral_clip`)."""
        mods = list(modules) if modules else [None] * len(params)
        if callable(self.select):
            out = [bool(self.select(n, p, m)) for n, p, m in zip(names, params, mods)]
        elif self.select is not None:
            unknown = [s for s in self.select if s not in names]
            if unknown:
                raise ValueError(
                    f"spectral_clip(select=...) names unknown parameters {unknown}; the "
                    f"parameters are: {list(names)}."
                )
            out = [n in self.select for n in names]
        else:
            head_idx: set[int] = set()
            if self.head == "auto":
                h = self._auto_head(params, mods)
                head_idx = set() if h is None else {h}
            elif self.head is not None:
                head_idx = {i for i, n in enumerate(names) if _matches(n, self.head)}  # type: ignore[arg-type]
                if not head_idx:
                    raise ValueError(
                        f"spectral_clip(head={list(self.head)}) matches no parameter; pass module "
                        f"or parameter names from {list(names)}, head='auto' or head=None."
                    )
            out = [
                p.dim() >= 2 and not _is_embedding(m) and i not in head_idx
                for i, (p, m) in enumerate(zip(params, mods))
            ]
        bad = [n for n, p, s in zip(names, params, out) if s and p.dim() < 2]
        if bad:
            raise ValueError(
                f"spectral clipping needs parameters with >= 2 dimensions, but select picked "
                f"{bad}; norm-clip 1-D parameters with clip_vectors=... instead."
            )
        return [s and p.numel() > 0 for p, s in zip(params, out)]

    def _plan(self, grads: Sequence[Tensor], ctx: StepContext) -> _Plan:
        names = list(ctx.names) if ctx.names else [f"param{i}" for i in range(len(grads))]
        key = (
            tuple(names),
            tuple(map(id, ctx.modules or ())),
            tuple((tuple(g.shape), g.dtype, g.device) for g in grads),
        )
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        params = list(ctx.params) if ctx.params else list(grads)
        chosen = self.selected(params, names, list(ctx.modules or ()))
        buckets: dict[Any, list[tuple[int, bool]]] = {}
        for i, (g, s) in enumerate(zip(grads, chosen)):
            if not s:
                continue
            m, n = g.shape[0], g.numel() // g.shape[0]
            transposed = m < n  # batch wide matrices with their tall transposes
            shape = (n, m) if transposed else (m, n)
            buckets.setdefault((shape, g.dtype, g.device), []).append((i, transposed))
        groups = tuple(
            _Group(
                tuple(i for i, _ in members),
                tuple(t for _, t in members),
                torch.tensor([i for i, _ in members], device=dev),
            )
            for (_, _, dev), members in buckets.items()
        )
        vectors: tuple[int, ...] = ()
        if self.vector_threshold is not None:
            vectors = tuple(i for i, g in enumerate(grads) if g.dim() < 2 and g.numel() > 0)
        dev = grads[0].device if grads else None
        plan = _Plan(
            groups,
            vectors,
            torch.tensor(vectors, device=dev, dtype=torch.long) if vectors else None,
            tuple(n for n, s in zip(names, chosen) if s),
        )
        self._plans[key] = plan
        return plan

    # -- GradientTransform ------------------------------------------------------------------------
    def _threshold_for(self, p: Tensor) -> Threshold:
        if p.dim() < 2:  # never spectrally clipped: a vector threshold, or a 1-number state
            return self.vector_threshold if self.vector_threshold is not None else _NO_CLIP
        return self.threshold

    def init(self, params: Sequence[Tensor]) -> SpectralClipState:
        dev = params[0].device if len(params) else torch.device("cpu")
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        nan = torch.full((len(params),), float("nan"), device=dev)
        zero = torch.zeros(len(params), device=dev)
        return SpectralClipState(
            tuple(self._threshold_for(p).init(p.device) for p in params),
            gen.get_state(),
            nan,
            nan.clone(),
            nan.clone(),
            zero,
            zero.clone(),
            torch.zeros((), device=dev),
        )

    def update(self, grads, state, ctx):  # type: ignore[override]
        if len(grads) != len(state.thresholds):
            raise ValueError(
                f"spectral_clip was initialised for {len(state.thresholds)} parameters but got "
                f"{len(grads)} gradients; call init() with the same parameters."
            )
        plan = self._plan(grads, ctx)
        ths = list(state.thresholds)
        before, after = state.sigma_before.clone(), state.sigma_after.clone()
        taus, clipped = state.threshold.clone(), state.clipped.clone()
        nonfinite = state.nonfinite.clone()
        gen = None
        if plan.groups and self.rank is not None:
            # the sketches are drawn where the first gradient lives (the device of init's
            # generator); the generator's state travels in the transform state
            gen = torch.Generator(device=grads[0].device)
            gen.set_state(state.rng)
        with torch.no_grad():
            for grp in plan.groups:
                self._clip_group(grads, grp, ths, gen, (before, after, taus, clipped, nonfinite))
            if plan.vectors:
                self._clip_vectors(grads, plan, ths, (before, after, taus, clipped, nonfinite))
        n_sel = sum(len(grp.indices) for grp in plan.groups)
        if n_sel:
            idx = torch.cat([grp.index_tensor for grp in plan.groups])
            frac = clipped.index_select(0, idx).mean()
        else:
            frac = torch.zeros_like(state.clipped_fraction)
        rng = gen.get_state() if gen is not None else state.rng
        return grads, SpectralClipState(tuple(ths), rng, before, after, taus, clipped, nonfinite, frac)

    def _clip_group(self, grads, grp: _Group, ths: list, gen, out: tuple[Tensor, ...]) -> None:
        mats = []
        for i, t in zip(grp.indices, grp.transposed):
            m = grads[i].reshape(grads[i].shape[0], -1)
            mats.append(m.mT if t else m)
        # one member: a view, no copy; several: one stacked batch for torch.linalg
        g = mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        tau = torch.stack([self.threshold.value(ths[i]) for i in grp.indices]).to(g.dtype)
        dec = _decompose(g, tau, self.rank, self.q, self.niter, gen)  # type: ignore[arg-type]
        for j, (i, t) in enumerate(zip(grp.indices, grp.transposed)):
            left, right = dec.left[j], dec.right[j]
            if t:  # this member was used as its transpose
                left, right = right.mT, left.mT
            gi = grads[i]
            if gi.is_contiguous() and gi.dtype == left.dtype:
                # G += left @ right in one pass, without materializing the correction
                addmm_(gi.view(gi.shape[0], -1), left, right, dec.used)
            else:
                gi.add_((left @ right).reshape(gi.shape).to(gi.dtype))
            # a non-finite matrix is not observed: the threshold keeps its state
            sig = dec.sigma_before[j : j + 1].float()
            ths[i] = _select(dec.finite[j], self.threshold.observe(ths[i], sig), ths[i])
        before, after, taus, clipped, nonfinite = out
        idx = grp.index_tensor
        before.index_copy_(0, idx, dec.sigma_before.float())
        after.index_copy_(0, idx, dec.sigma_after.float())
        taus.index_copy_(0, idx, tau.float())
        clipped.index_copy_(0, idx, (dec.sigma_before > tau).float())
        nonfinite.index_copy_(0, idx, (~dec.finite).float())

    def _clip_vectors(self, grads, plan: _Plan, ths: list, out: tuple[Tensor, ...]) -> None:
        vt = self.vector_threshold
        assert vt is not None and plan.vector_index is not None
        vs = [grads[i] for i in plan.vectors]
        norms = torch.stack([n.float() for n in torch._foreach_norm(vs, 2.0)])
        finite = torch.isfinite(norms)
        radii = torch.stack([vt.value(ths[i]) for i in plan.vectors]).float()
        coef = clip_coefficient(norms, radii)
        torch._foreach_mul_(vs, [c.to(v.dtype) for c, v in zip(coef.unbind(), vs)])
        for j, i in enumerate(plan.vectors):
            ths[i] = _select(finite[j], vt.observe(ths[i], norms[j : j + 1]), ths[i])
        before, after, taus, clipped, nonfinite = out
        idx = plan.vector_index
        safe = torch.where(finite, norms, 0.0)
        before.index_copy_(0, idx, safe)
        after.index_copy_(0, idx, torch.minimum(safe, radii))
        taus.index_copy_(0, idx, radii)
        clipped.index_copy_(0, idx, (coef < 1).float())
        nonfinite.index_copy_(0, idx, (~finite).float())

    def readings(self, state: SpectralClipState) -> dict[str, Tensor]:  # type: ignore[override]
        """Per-parameter readings, aligned with the clipper's parameters (NaN/0 where unused)."""
        return {
            "sigma_before": state.sigma_before,
            "sigma_after": state.sigma_after,
            "threshold": state.threshold,
            "clipped": state.clipped,
            "nonfinite": state.nonfinite,
            "clipped_fraction": state.clipped_fraction,
        }

    def __repr__(self) -> str:
        mode = "exact" if self.rank is None else f"rank={self.rank}, q={self.q}, niter={self.niter}"
        return f"spectral_clip({self.threshold!r}, {mode})"


def spectral_clip(
    tau: float | Threshold,
    *,
    rank: int | None = 8,
    oversample: int | None = None,
    niter: int = 2,
    select: Selector | Iterable[str] | None = None,
    head: str | Iterable[str] | None = "auto",
    clip_vectors: float | Threshold | None = None,
    seed: int = 0,
) -> GradientTransform:
    """Spectral clipping (Yukhimchuk et al., arXiv:2605.11838): clamp each gradient matrix's
    singular values at ``tau``, keeping its singular directions.

    A batch-level transform: the :class:`robustclip.Clipper` runs it after accumulation and the
    DDP all-reduce, before ``optimizer.step()``, so momentum accumulates clipped gradients. It
    composes with the sample-level estimators::

        rc.chain(rc.per_sample_clip(1.0), rc.spectral_clip(rc.thresholds.EMA(), rank=8))

    Args:
        tau: the threshold: a number, or a threshold object from :mod:`robustclip.thresholds`
            (e.g. ``EMA()``, the paper's adaptive rule), of which each layer keeps its own state
            observing that layer's top singular value.
        rank: ``r``, how many top singular values the randomized mode clips; ``None`` for the
            exact mode (full SVD; slow for large layers). Matrices whose smaller side is at most
            ``q = r + p`` are always decomposed exactly.
        oversample: ``p``, extra sketch columns; default ``max(5, 16 - r)`` so that ``q >= 16``
            (narrower matmuls hit a slow CPU kernel).
        niter: power iterations of the range finder (more: more accurate top singular values).
        select: which parameters to clip: a predicate ``select(name, param, module) -> bool``
            or a list of parameter names (as in ``clipper.layout.names``). Default: every
            parameter with >= 2 dimensions except ``nn.Embedding`` weights and the output head.
        head: the output head, skipped by the default selection: ``"auto"`` takes the
            ``nn.Linear`` owning the last parameter (where models register their head), a name
            or names pick module or parameter names, ``None`` skips no head.
        clip_vectors: also clip each 1-D parameter's gradient (biases, norm gains) to this L2
            norm (a number or threshold, a state per parameter); default: leave them alone.
        seed: seed of the Gaussian sketches. Every DDP process draws the same sketches, so the
            processes stay in step; the generator state is part of ``state_dict``.

    Readings (per parameter, aligned with the clipper's parameters; NaN where a parameter is not
    clipped): ``sigma_before``, ``sigma_after`` (in the randomized mode the larger of the
    clipped top value and the estimate of ``sigma_{r+1}``), ``threshold``, ``clipped``,
    ``nonfinite`` (a non-finite gradient matrix is left untouched, never decomposed, and its
    threshold does not observe it), and ``clipped_fraction``.
    """
    return SpectralClip(
        tau,
        rank=rank,
        oversample=oversample,
        niter=niter,
        select=select,
        head=head,
        clip_vectors=clip_vectors,
        seed=seed,
    )
