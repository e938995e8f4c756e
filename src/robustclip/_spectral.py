"""Spectral clipping of matrix-valued gradients, as a batch-level transform.

Yukhimchuk, Takáč, Kolar, Choudhury, "Gradient Clipping Beyond Vector Norms: A Spectral Approach
for Matrix-Valued Parameters" (arXiv:2605.11838). Each selected parameter's gradient is read as
a matrix ``G`` (``reshape(shape[0], -1)``, so a conv weight ``(out, in, kh, kw)`` becomes
``(out, in*kh*kw)``) and its singular values are clamped at a threshold ``tau``, exactly (full
SVD) or for the top ``r`` by a randomized range finder: the maths is in ``_svd.py``. This file
decides which parameters are clipped, batches same-shaped matrices (a wide one as its tall
transpose), keeps one threshold per layer, and records the readings.

Clipping only shrinks the singular values above ``tau`` and keeps every singular direction;
with ``tau`` below all of them the result is ``tau U V^T``, the orthogonalized direction Muon
steps along. A vector's only singular value is its norm, so norm clipping is spectral clipping
of an ``n x 1`` matrix: the selected 1-D parameters are clipped so, at ``tau`` by default, as in
the authors' code, and without a decomposition.

The default selection follows the authors' public code (katcinskiy/spectral-clipping): every
parameter except the input embeddings and the language-model head, told by their names.

Every clip is written as ``G + correction``, so a layer that is not clipped is left bit-for-bit
unchanged, and no decision is taken on the host. (On CUDA, torch.linalg's SVD, QR and eigh
synchronize with the device by themselves; nothing else in the step does.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from robustclip._kernels import addmm_
from robustclip._math import clip_coefficient, tensor_norms
from robustclip._svd import decompose, sketch_columns
from robustclip._transform import GradientTransform, StepContext
from robustclip._validate import check_positive_int
from robustclip.thresholds import NoClip, Threshold, _select, as_threshold

__all__ = ["spectral_clip", "SpectralClip", "SpectralClipState"]

#: ``select(name, param, module) -> bool``: whether a parameter is spectrally clipped.
Selector = Callable[[str, Tensor, "nn.Module | None"], bool]

_NO_CLIP = NoClip()


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
    vectors: tuple[int, ...]  # selected 1-D (or 0-D) parameters, norm-clipped
    vector_index: Tensor | None
    selected: tuple[str, ...]  # names of the clipped parameters, matrices and vectors


#: name fragments of the input embeddings that the authors' code (arXiv:2605.11838) leaves
#: out, as they appear in Hugging Face and nanoGPT parameter names; a name holding one is
#: skipped unless it also holds "LayerNorm" (an embedding block's norm is clipped)
EMBEDDING_NAMES = (
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embed_tokens",
    "wpe",
    "wte",
)
#: the name fragment of a language-model head, which the authors' code leaves out as well
LM_HEAD_NAME = "lm_head"

#: the accepted values of ``clip_vectors`` besides a radius
_VECTOR_MODES = ("tau",)


def _is_embedding(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def _named_like(name: str, fragments: Sequence[str]) -> bool:
    # substrings, as in the authors' rule: wrappers' prefixes ("module.", "_orig_mod.") and
    # suffixes (".weight", ".bias") do not hide a match
    return "LayerNorm" not in name and any(f in name for f in fragments)


def is_embedding_name(name: str) -> bool:
    """Whether the spectral paper's rule (arXiv:2605.11838) skips ``name`` as an input embedding:
    it holds one of :data:`EMBEDDING_NAMES` and not ``"LayerNorm"``."""
    return _named_like(name, EMBEDDING_NAMES)


def is_lm_head_name(name: str) -> bool:
    """Whether the spectral paper's rule skips ``name`` as a language-model head: it holds
    ``"lm_head"`` and not ``"LayerNorm"``."""
    return _named_like(name, (LM_HEAD_NAME,))


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in patterns)


def _owner_name(name: str) -> str:
    """The module part of a parameter name (``"blocks.0.fc"`` of ``"blocks.0.fc.weight"``)."""
    return name.rpartition(".")[0]


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
        if rank is not None:
            rank = check_positive_int(rank, "rank")
        if oversample is not None:
            if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
                raise ValueError(f"oversample must be an int >= 0, got {oversample!r}.")
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
            raise ValueError(f"niter must be an int >= 0, got {niter!r}.")
        self.rank, self.oversample, self.niter = rank, oversample, niter
        self.q = sketch_columns(rank, oversample)
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
        if head is None or head in ("auto", "last"):
            self.head: str | tuple[str, ...] | None = head
        elif isinstance(head, str):
            self.head = (head,)
        else:
            self.head = tuple(head)
            if not all(isinstance(s, str) for s in self.head):
                raise TypeError('head must be "auto", "last", None, or module/parameter names (str).')
        # 1-D parameters: "tau" clips them as (n, 1) matrices at tau, as the authors' code does
        # (their one singular value is their norm); a radius norm-clips them at that radius;
        # None leaves them alone
        self.vector_threshold: Threshold | None
        if isinstance(clip_vectors, str):
            if clip_vectors not in _VECTOR_MODES:  # the one string it takes; else a number
                raise TypeError(
                    f"clip_vectors={clip_vectors!r}: pass 'tau' (1-D parameters clipped as (n, 1) "
                    "matrices at tau, the default), a number or threshold, or None (left alone)."
                )
            self.vector_threshold = self.threshold
        else:
            self.vector_threshold = None if clip_vectors is None else as_threshold(clip_vectors, "clip_vectors")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        self.seed = seed
        self._plans: dict[Any, _Plan] = {}

    # -- selection ---------------------------------------------------------------------------------
    def _head_indices(self, names: Sequence[str], modules: Sequence[nn.Module | None]) -> set[int]:
        """The parameters of the output head that the default selection leaves out, found by
        name: under FSDP2 a module's parameters are swapped for unsharded views, so comparing
        tensors by identity would miss them."""
        if self.head is None:
            return set()
        if self.head == "auto":
            # a language-model head by name, as in the authors' code; a head tied to the input
            # embedding is listed once, under the embedding's name, and skipped as the embedding
            return {i for i, n in enumerate(names) if is_lm_head_name(n)}
        if self.head == "last":
            # the nn.Linear owning the last parameter, where models register their output layer
            if not names or not isinstance(modules[-1], nn.Linear):
                owner = "nothing" if not names else type(modules[-1]).__name__
                raise ValueError(
                    f"spectral_clip(head='last') takes the nn.Linear owning the last parameter, "
                    f"but {names[-1] if names else 'no parameter'!r} is owned by {owner} (the "
                    "module of each parameter is known inside a Clipper); name the head, e.g. "
                    "head='classifier', or pass head='auto' or head=None."
                )
            owner_name = _owner_name(names[-1])
            return {i for i, n in enumerate(names) if _owner_name(n) == owner_name}
        patterns = self.head if isinstance(self.head, tuple) else (self.head,)
        found = {i for i, n in enumerate(names) if _matches(n, patterns)}
        if not found:
            raise ValueError(
                f"spectral_clip(head={list(patterns)}) matches no parameter; pass module or "
                f"parameter names from {list(names)}, head='auto', head='last' or head=None."
            )
        return found

    def selected(
        self, params: Sequence[Tensor], names: Sequence[str], modules: Sequence[nn.Module | None]
    ) -> list[bool]:
        """Which parameters are clipped, matrices and (unless ``clip_vectors=None``) 1-D ones
        (see :func:`spectral_clip`)."""
        mods = list(modules) if modules else [None] * len(params)
        vectors = self.vector_threshold is not None
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
            # the rule of the authors' code: every parameter but the input embeddings and the
            # language-model head, by name; robustclip also skips nn.Embedding weights whatever
            # their name
            head = self._head_indices(names, mods)
            out = [
                not is_embedding_name(n) and not _is_embedding(m) and i not in head and (vectors or p.dim() >= 2)
                for i, (n, p, m) in enumerate(zip(names, params, mods))
            ]
        if not vectors:
            bad = [n for n, p, s in zip(names, params, out) if s and p.dim() < 2]
            if bad:
                raise ValueError(
                    f"spectral_clip(clip_vectors=None) leaves 1-D parameters alone, but select "
                    f"picked {bad}; pass clip_vectors='tau' (clipped as (n, 1) matrices at tau) "
                    "or a radius, or leave them out of select."
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
            if not s or g.dim() < 2:
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
        # selected 1-D (and 0-D) parameters: an (n, 1) matrix's one singular value is its norm,
        # so its spectral clip is a norm clip, done without a decomposition
        vectors = tuple(i for i, (g, s) in enumerate(zip(grads, chosen)) if s and g.dim() < 2)
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
        picked = [grp.index_tensor for grp in plan.groups]
        if plan.vector_index is not None:
            picked.append(plan.vector_index)
        if picked:
            frac = clipped.index_select(0, torch.cat(picked)).mean()
        else:
            frac = torch.zeros_like(state.clipped_fraction)
        rng = gen.get_state() if gen is not None else state.rng
        return grads, SpectralClipState(tuple(ths), rng, before, after, taus, clipped, nonfinite, frac)

    def _clip_group(
        self,
        grads: list[Tensor],
        grp: _Group,
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
        before, after, taus, clipped, nonfinite = out
        idx = grp.index_tensor
        before.index_copy_(0, idx, dec.sigma_before.float())
        after.index_copy_(0, idx, dec.sigma_after.float())
        taus.index_copy_(0, idx, tau.float())
        clipped.index_copy_(0, idx, (dec.sigma_before > tau).float())
        nonfinite.index_copy_(0, idx, (~dec.finite).float())

    def _clip_vectors(
        self, grads: list[Tensor], plan: _Plan, ths: list[Any], out: tuple[Tensor, ...], norms: Tensor | None = None
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
        before, after, taus, clipped, nonfinite = out
        idx = plan.vector_index
        safe = torch.where(finite, norms, 0.0)
        before.index_copy_(0, idx, safe)
        after.index_copy_(0, idx, torch.minimum(safe, radii))
        taus.index_copy_(0, idx, radii)
        clipped.index_copy_(0, idx, (coef < 1).float())
        nonfinite.index_copy_(0, idx, (~finite).float())

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
