"""Spectral clipping of matrix-valued gradients, as a batch-level transform.

Yukhimchuk, Takáč, Kolar, Choudhury, "Gradient Clipping Beyond Vector Norms: A Spectral Approach
for Matrix-Valued Parameters" (arXiv:2605.11838). Each selected parameter's gradient is read as
a matrix ``G`` (``reshape(shape[0], -1)``, so a conv weight ``(out, in, kh, kw)`` becomes
``(out, in*kh*kw)``) and its singular values are clamped at a threshold ``tau``, exactly (full
SVD) or for the top ``r`` by a randomized range finder: the maths is in ``_svd.py``. This file
is the transform: one threshold per layer, the clip of each batch of same-shaped matrices and
of the 1-D parameters, the readings. Which parameters are clipped is decided by name in
``_spectral_select.py`` (by default every parameter except the input embeddings and the
language-model head, as in the authors' code); how they are batched, in ``_spectral_plan.py``.

Clipping only shrinks the singular values above ``tau`` and keeps every singular direction;
with ``tau`` below all of them the result is ``tau U V^T``, the orthogonalized direction Muon
steps along. A vector's only singular value is its norm, so norm clipping is spectral clipping
of an ``n x 1`` matrix: the selected 1-D parameters are clipped so, at ``tau`` by default, as in
the authors' code, and without a decomposition.

Every clip is written as ``G + correction``, so a layer that is not clipped is left bit-for-bit
unchanged, and no decision is taken on the host. (On CUDA, torch.linalg's SVD, QR and eigh
synchronize with the device by themselves; nothing else in the step does.)
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from robustclip._kernels import addmm_
from robustclip._math import clip_coefficient, tensor_norms
from robustclip._spectral_plan import Group, Plan, make_plan, plan_key, record
from robustclip._spectral_select import (
    Selector,
    check_clip_vectors,
    check_head,
    check_select,
    selected,
)
from robustclip._svd import decompose, sketch_columns
from robustclip._transform import GradientTransform, StepContext
from robustclip._validate import check_nonneg_int, check_positive_int
from robustclip.thresholds import NoClip, Threshold, _select, as_threshold

__all__ = ["spectral_clip", "SpectralClip", "SpectralClipState"]

_NO_CLIP = NoClip()


# -- the transform ---------------------------------------------------------------------------------


class SpectralClipState(NamedTuple):
    thresholds: tuple[Any, ...]  # one threshold state per parameter (each layer has its own)
    rng: Tensor  # state of the generator of the randomized sketches (uint8, on the host)
    sigma_before: Tensor  # (P,) reading: top singular value before (the norm, for vectors)
    sigma_after: Tensor  # (P,) reading: top singular value after
    threshold: Tensor  # (P,) reading: tau used at this step
    clipped: Tensor  # (P,) reading: 1.0 where tau was below the top singular value
    nonfinite: Tensor  # (P,) reading: 1.0 where the gradient was not finite (left untouched)
    clipped_fraction: Tensor  # reading: share of the selected parameters that were clipped


class SpectralClip(GradientTransform[SpectralClipState]):
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
        clip_vectors: float | Threshold | str | None = "tau",
        seed: int = 0,
    ) -> None:
        self.threshold = as_threshold(tau, "tau")
        self.rank = None if rank is None else check_positive_int(rank, "rank")
        self.oversample = None if oversample is None else check_nonneg_int(oversample, "oversample")
        self.niter = check_nonneg_int(niter, "niter")
        self.q = sketch_columns(self.rank, self.oversample)
        # which parameters (_spectral_select.py); 1-D ones at tau by default, as in the
        # authors' code, or at their own radius, or (None) left alone
        self.select = check_select(select)
        self.head = check_head(head)
        self.vector_threshold = check_clip_vectors(clip_vectors, self.threshold)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        self.seed = seed
        self._plans: dict[Hashable, Plan] = {}

    # -- which parameters, and how they are batched ----------------------------------------------
    def selected(
        self, params: Sequence[Tensor], names: Sequence[str], modules: Sequence[nn.Module | None]
    ) -> list[bool]:
        """Which parameters are clipped, matrices and (unless ``clip_vectors=None``) 1-D ones
        (see :func:`spectral_clip`)."""
        return selected(params, names, modules, self.select, self.head, self.vector_threshold is not None)

    def _plan(self, grads: Sequence[Tensor], ctx: StepContext) -> Plan:
        """Same-shaped matrices in groups, built once per model (``_spectral_plan.py``)."""
        names = list(ctx.names) if ctx.names else [f"param{i}" for i in range(len(grads))]
        key = plan_key(names, ctx.modules or (), grads)
        plan = self._plans.get(key)
        if plan is None:
            params = list(ctx.params) if ctx.params else list(grads)
            chosen = self.selected(params, names, list(ctx.modules or ()))
            plan = self._plans[key] = make_plan(grads, names, chosen)
        return plan

    # -- GradientTransform ------------------------------------------------------------------------
    def _threshold_for(self, p: Tensor) -> Threshold:
        if p.dim() < 2:  # a vector's threshold (tau's rule by default), or a 1-number state
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

    def update(
        self, grads: list[Tensor], state: SpectralClipState, ctx: StepContext
    ) -> tuple[list[Tensor], SpectralClipState]:
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
        gen: torch.Generator | None = None
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
        frac = plan.clipped_fraction(clipped, state.clipped_fraction)
        rng = gen.get_state() if gen is not None else state.rng
        return grads, SpectralClipState(tuple(ths), rng, before, after, taus, clipped, nonfinite, frac)

    def _clip_group(
        self,
        grads: list[Tensor],
        grp: Group,
        ths: list[Any],
        gen: torch.Generator | None,
        out: tuple[Tensor, ...],
    ) -> None:
        mats = []
        for i, t in zip(grp.indices, grp.transposed):
            m = grads[i].reshape(grads[i].shape[0], -1)
            mats.append(m.mT if t else m)
        # one member: a view, no copy; several: one stacked batch for torch.linalg
        g = mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        tau = torch.stack([self.threshold.value(ths[i]) for i in grp.indices]).to(g.dtype)
        dec = decompose(g, tau, self.rank, self.q, self.niter, gen)
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
        record(out, grp.index_tensor, dec.sigma_before, dec.sigma_after, tau, dec.sigma_before > tau, ~dec.finite)

    def _clip_vectors(
        self, grads: list[Tensor], plan: Plan, ths: list[Any], out: tuple[Tensor, ...], norms: Tensor | None = None
    ) -> None:
        """Clip the selected 1-D gradients by their norms; ``norms`` (float32, one per vector)
        when the caller has them: under FSDP2 ``grads`` are local shards and the norms are
        taken over every shard."""
        vt = self.vector_threshold
        assert vt is not None and plan.vector_index is not None
        vs = [grads[i] for i in plan.vectors]
        if norms is None:
            norms = torch.stack(tensor_norms(vs, dtype=torch.float32))  # no overflow above 1.8e19
        finite = torch.isfinite(norms)
        radii = torch.stack([vt.value(ths[i]) for i in plan.vectors]).float()
        coef = clip_coefficient(norms, radii)
        torch._foreach_mul_(vs, [c.to(v.dtype) for c, v in zip(coef.unbind(), vs)])
        for j, i in enumerate(plan.vectors):
            ths[i] = _select(finite[j], vt.observe(ths[i], norms[j : j + 1]), ths[i])
        safe = torch.where(finite, norms, 0.0)
        record(out, plan.vector_index, safe, torch.minimum(safe, radii), radii, coef < 1, ~finite)

    def readings(self, state: SpectralClipState) -> dict[str, Any]:
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
    clip_vectors: float | Threshold | str | None = "tau",
    seed: int = 0,
) -> GradientTransform[SpectralClipState]:
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
            or a list of parameter names (as in ``clipper.layout.names``). Default: the rule of
            the authors' code, every parameter except the input embeddings and the
            language-model head, told by name: a name holding ``word_embeddings``,
            ``position_embeddings``, ``token_type_embeddings``, ``embed_tokens``, ``wpe`` or
            ``wte`` (and not ``LayerNorm``) is skipped; robustclip also skips every
            ``nn.Embedding`` / ``nn.EmbeddingBag`` weight, whatever its name. A classifier's
            last layer is clipped, as in the paper.
        head: the output head the default selection skips (ignored with ``select``):
            ``"auto"`` skips a language-model head, a parameter whose name holds ``lm_head``
            (and not ``LayerNorm``), as the authors' code does; a head tied to the input
            embedding is listed once, under the embedding's name, and skipped as the embedding.
            ``"last"`` skips the ``nn.Linear`` that owns the last parameter (where models
            register their output layer); a name or names skip those modules or parameters;
            ``None`` skips no head (an ``lm_head`` is clipped too). The head is always found by
            name, never by tensor identity.
        clip_vectors: how the selected 1-D (and 0-D) parameters (biases, norm gains) are
            clipped. ``"tau"`` (the default, the authors' rule): as ``(n, 1)`` matrices at
            ``tau``, whose one singular value is the norm, so this is norm clipping at ``tau``,
            each parameter with its own state of ``tau``'s rule. A number or threshold:
            norm-clipped at that radius instead. ``None``: left alone, and the default selection
            takes only parameters with >= 2 dimensions (robustclip's rule before it followed
            the paper; with ``head="last"``, the whole former default).
        seed: seed of the Gaussian sketches. Every DDP process draws the same sketches, so the
            processes stay in step; the generator state is part of ``state_dict``.

    Readings (per parameter, aligned with the clipper's parameters; NaN where a parameter is not
    clipped): ``sigma_before`` (the norm, for a 1-D parameter), ``sigma_after`` (in the randomized mode the larger of the
    clipped top value and the estimate of ``sigma_{r+1}``), ``threshold``, ``clipped``,
    ``nonfinite`` (a non-finite gradient matrix is left untouched, never decomposed, and its
    threshold does not observe it), and ``clipped_fraction`` (the share of the selected
    parameters, matrices and 1-D ones, that were clipped).
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
