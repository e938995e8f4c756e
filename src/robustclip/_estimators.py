"""Sample-level estimators: how one micro-batch of losses becomes a gradient contribution.

Every estimator adds a *sum* to the clipper's accumulator and says how many units it counted;
at ``step()`` the clipper divides the total by the total count (over all micro-batches and all
processes). This single rule gives every method its textbook form, also under accumulation and
DDP with unequal batches:

=====================  ==========================================  =========
estimator              contribution of one micro-batch k           count
=====================  ==========================================  =========
``mean()``             sum_i g_i                                    B_k
``per_sample_clip(c)`` sum_i min(1, c/||g_i||) g_i                  B_k
``per_sample_normalize(gamma)``  sum_i g_i / (||g_i|| + gamma)       B_k
``micro_batch_clip(c)``  min(1, c/||gbar_k||) gbar_k                1
=====================  ==========================================  =========

``mean()`` computes its sum as ``B_k`` times the gradient of the mean loss: the backward pass
then carries the same values a plain mean-loss backward does (the sum's would be ``B_k`` times
larger in every activation and overflow float16 first).

References: PS-Clip-SGD and micro-batch clipping, Nobile & Grohs, arXiv:2605.02701;
per-sample normalization ("automatic clipping"), Bu et al., arXiv:2206.07136.

:func:`per_sample_clip_sum` writes PS-Clip-SGD's sum out plainly, as the reference the fast
engines are tested against. Who owns ``p.grad`` while a step accumulates, and how a first
contribution becomes the gradient without a copy, is in ``per_sample/_grads.py``; pairing an
estimator with transforms (``Method``, ``chain``) is one floor up, in ``_method.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar, cast

import torch
from torch import Tensor

from robustclip._math import (
    clip_coefficient,
    coefficient_as,
    combine_norms,
    global_norm,
    wide_dtype,
)
from robustclip._transform import state_from_plain, state_to_plain
from robustclip._validate import check_nonneg, check_positive_int
from robustclip.per_sample import ENGINES, ParamLayout, PerSampleEngine
from robustclip.per_sample._engine import accumulate_into, auto_engine
from robustclip.per_sample._grads import add_into, gradients
from robustclip.thresholds import Constant, NoClip, Threshold, as_threshold

__all__ = [
    "Contribution",
    "Estimator",
    "mean",
    "micro_batch_clip",
    "per_sample_clip",
    "per_sample_clip_sum",
    "per_sample_normalize",
]

#: an estimator's state: a NamedTuple of threshold states (``()`` for a stateless one)
S = TypeVar("S")


def per_sample_clip_sum(per_sample_grads: Sequence[Sequence[Tensor]], c: float) -> tuple[list[Tensor], int]:
    """PS-Clip-SGD's box (Nobile & Grohs, arXiv:2605.02701), as plainly as it can be written:
    ``sum_i min(1, c/||g_i||) g_i`` over the samples' gradients ``g_i`` (each a list of
    per-parameter tensors; ``||g_i||`` the L2 norm over all of them), and how many samples were
    scaled down. The clipper divides the sum by the batch size at ``step()``. A reference, one
    sample at a time with float64 norms on the host; training computes the same sum with a
    per-sample engine (:class:`PerSample`) and never holds the ``g_i``."""
    clipped_sum = [torch.zeros_like(t) for t in per_sample_grads[0]]
    num_clipped = 0
    for g_i in per_sample_grads:
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g_i))
        scale = min(1.0, c / norm) if norm > 0 else 1.0
        num_clipped += scale < 1.0
        for acc, t in zip(clipped_sum, g_i):
            acc.add_(t * scale)
    return clipped_sum, num_clipped


@dataclass
class Contribution:
    """What one ``backward()`` reports besides the gradient it added."""

    count: int
    per_sample_norms: Tensor | None = None  # (B,) flat norms, per-sample methods
    group_norms: Tensor | None = None  # (G, B) per-layer norms, per-sample methods
    micro_batch_norm: Tensor | None = None  # (1,) micro-batch clipping
    clipped: Tensor | None = None  # (B,) or (1,) flags (bool or 0/1 float): scaled down or not
    #: with ``drop=True``: which reported units got weight 0 because they were not finite, a
    #: bool mask (B,) of samples (per-sample methods) or (1,) for the whole micro-batch
    #: (``mean()``, micro-batch clipping), on the device
    dropped: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Estimator(Generic[S]):
    """Base class of sample-level estimators, generic in their state type ``S``.

    :meth:`contribute` sees the public types of :mod:`robustclip.per_sample`: the
    :class:`~robustclip.per_sample.ParamLayout` (parameters, names, layer groups) and, for a
    per-sample estimator, its :class:`~robustclip.per_sample.PerSampleEngine`; it reports a
    :class:`Contribution`.
    """

    name = "estimator"
    #: True if the estimator needs one loss per sample (and so a per-sample engine)
    per_sample = False
    #: True if :meth:`contribute` accepts ``None`` entries in ``out`` (no gradient yet this
    #: step) and puts new tensors there; otherwise the clipper hands it zero-filled buffers
    writes_new_grads = False
    #: True if :meth:`contribute` takes the keywords ``drop`` (give a non-finite unit weight 0
    #: and report it in ``Contribution.dropped``) and ``loss_scale`` (the losses were
    #: multiplied by this 0-d tensor, a loss scaler's scale: norms and radii are compared in
    #: unscaled units, the sum added to ``out`` stays scaled)
    handles_nonfinite = False

    def init(self, layout: ParamLayout, device: torch.device) -> S:
        return cast(S, ())

    def contribute(
        self,
        losses: Tensor,
        state: S,
        layout: ParamLayout,
        engine: PerSampleEngine | None,
        out: list[Tensor | None],
    ) -> tuple[Contribution, S]:
        """Add this (micro-)batch's contribution to ``out`` (aligned with ``layout.params``); a
        ``None`` entry (no gradient yet this step) gets a new tensor laid out like its
        parameter."""
        raise NotImplementedError

    def state_to_dict(self, state: S) -> Any:
        return state_to_plain(state)

    def state_from_dict(self, template: S, data: Any) -> S:
        return cast(S, state_from_plain(template, data))


def _holds_integer(dtype: torch.dtype, n: int) -> bool:
    """Whether ``dtype`` represents the integer ``n > 0`` exactly (its odd part fits the mantissa)."""
    info = torch.finfo(dtype)
    odd = n >> ((n & -n).bit_length() - 1)
    # eps = 2**-m for m stored mantissa bits (frexp gives exponent 1 - m); m + 1 significant bits
    return n <= info.max and odd.bit_length() <= 2 - math.frexp(info.eps)[1]


def _finite_all(g: Sequence[Tensor]) -> Tensor:
    """0-d bool: every entry of every tensor is finite (one pass; the largest magnitude cannot
    overflow where a norm could, and a NaN propagates through it)."""
    nonempty = [t for t in g if t.numel()]
    if not nonempty:
        return torch.ones((), dtype=torch.bool, device=g[0].device if g else None)
    return torch.stack([torch.isfinite(n) for n in torch._foreach_norm(nonempty, math.inf)]).all()


def _drop_if_nonfinite(
    g: list[Tensor], owned: bool, ok: Tensor, check: bool = True
) -> tuple[list[Tensor], bool, Tensor]:
    """A micro-batch's gradient, all zeros unless ``ok`` and (``check``) every entry is finite:
    zeroed, not multiplied by 0 (``NaN * 0`` is NaN). Returns the gradients, whether they are
    owned, and the (1,) dropped mask. No host read."""
    if check:
        ok = ok & _finite_all(g)
    bad = ~ok
    if owned:  # our own tensors: zeroed in place
        for t in g:
            t.masked_fill_(bad, 0)
        return g, True, bad.reshape(1)
    return [t.masked_fill(bad, 0) for t in g], False, bad.reshape(1)


class Mean(Estimator[tuple[()]]):
    """The mini-batch mean gradient: plain SGD, the baseline."""

    name = "mean"
    writes_new_grads = True
    handles_nonfinite = True

    def contribute(
        self,
        losses: Tensor,
        state: tuple[()],
        layout: ParamLayout,
        engine: PerSampleEngine | None,
        out: list[Tensor | None],
        *,
        drop: bool = False,
        loss_scale: Tensor | None = None,
    ) -> tuple[Contribution, tuple[()]]:
        # the sum stays in the losses' (scaled) units: nothing here compares a norm
        if losses.dim() == 0:
            g, owned = gradients(losses, layout.params, layout.direct_backward, out)
            dropped = None
            if drop:
                g, owned, dropped = _drop_if_nonfinite(g, owned, torch.isfinite(losses))
            add_into(out, g, layout.params, owned=owned)
            return Contribution(1, dropped=dropped), state
        # The backward pass runs on the mean loss, as a plain mean-loss backward does: the sum's
        # backward carries B times larger gradients through every activation, which overflows
        # float16 (autocast, GradScaler) where the mean's does not. The sum the contract asks for
        # is then B times the mean gradient, scaled in the same pass that adds it.
        count = losses.shape[0]
        g, owned = gradients(losses.mean(), layout.params, layout.direct_backward, out)
        dropped = None
        if drop:
            g, owned, dropped = _drop_if_nonfinite(g, owned, torch.isfinite(losses).all())
        dtype = g[0].dtype
        if not _holds_integer(dtype, count):  # e.g. 257 in bfloat16: scale in float32 instead
            dtype = torch.promote_types(dtype, torch.float32)
        coef = None if count == 1 else torch.full((), count, dtype=dtype, device=g[0].device)
        add_into(out, g, layout.params, coef, owned=owned)
        return Contribution(count, dropped=dropped), state

    def __repr__(self) -> str:
        return "mean()"


class MicroBatchClipState(NamedTuple):
    threshold: Any


class MicroBatchClip(Estimator[MicroBatchClipState]):
    """Clip each micro-batch's mean gradient before accumulating (arXiv:2605.02701, Sec. 4).

    With K micro-batches per step the gradient is ``(1/K) sum_k clip_c(gbar_k)``. Compare with
    ``chain(mean(), clip_by_global_norm(c))``, the usual clip-after-accumulation.
    """

    name = "micro_batch_clip"
    writes_new_grads = True
    handles_nonfinite = True

    def __init__(self, max_norm: float | Threshold) -> None:
        self.threshold = as_threshold(max_norm)

    def init(self, layout: ParamLayout, device: torch.device) -> MicroBatchClipState:
        return MicroBatchClipState(self.threshold.init(device))

    def contribute(
        self,
        losses: Tensor,
        state: MicroBatchClipState,
        layout: ParamLayout,
        engine: PerSampleEngine | None,
        out: list[Tensor | None],
        *,
        drop: bool = False,
        loss_scale: Tensor | None = None,
    ) -> tuple[Contribution, MicroBatchClipState]:
        mean_loss = losses if losses.dim() == 0 else losses.mean()
        g, owned = gradients(mean_loss, layout.params, layout.direct_backward, out)
        # the coefficient from a norm that does not overflow even above the float32 maximum
        norm = global_norm(g, dtype=wide_dtype(g[0].device))
        if loss_scale is not None:  # the radius is in the true gradient's units
            norm = norm / loss_scale.to(norm.dtype)
        radius = self.threshold.value(state.threshold)
        coef = clip_coefficient(norm, radius)
        dropped = None
        if drop:
            ok = torch.isfinite(norm) & torch.isfinite(mean_loss.detach())
            g, owned, dropped = _drop_if_nonfinite(g, owned, ok, check=False)  # a finite norm: finite g
            coef = torch.where(ok, coef, 0.0)
        # out += coef * g in one fused pass; coef stays a device tensor (no host sync)
        add_into(out, g, layout.params, coefficient_as(coef, g[0].dtype), owned=owned)
        norm1 = norm.to(torch.promote_types(g[0].dtype, torch.float32)).reshape(1)
        # every process's micro-batch norms, so an adaptive radius stays identical everywhere (a
        # dropped micro-batch's non-finite norm is skipped by the threshold on every process)
        th = self.threshold.observe(state.threshold, _gathered(norm1, layout, [self.threshold]))
        clipped = (coef < 1).reshape(1) if dropped is None else (coef < 1).reshape(1) & ~dropped
        contrib = Contribution(1, micro_batch_norm=norm1, clipped=clipped, dropped=dropped)
        return contrib, MicroBatchClipState(th)

    def __repr__(self) -> str:
        return f"micro_batch_clip({self.threshold!r})"


class PerSampleState(NamedTuple):
    thresholds: tuple[Any, ...]  # one threshold state (flat rule) or one per layer group


class PerSample(Estimator[PerSampleState]):
    """Per-sample weighting ``sum_i w_i g_i``, computed by a per-sample engine.

    ``rule`` is ``"clip"`` (``w = min(1, c/||g_i||)``) or ``"normalize"``
    (``w = 1/(||g_i|| + gamma)``). With ``per_layer=True`` the norm and the radius are taken
    per layer group (a module's own parameters), so each layer's part of ``g_i`` is clipped to
    its own ``c_l``.
    """

    name = "per_sample"
    writes_new_grads = True
    per_sample = True
    handles_nonfinite = True

    def __init__(
        self,
        rule: str,
        max_norm: Any = None,
        gamma: float = 0.0,
        per_layer: bool = False,
        engine: str = "auto",
        max_chunk_elements: int = 2**26,
    ) -> None:
        if rule not in ("clip", "normalize"):
            raise ValueError(f"unknown per-sample rule {rule!r}; use 'clip' or 'normalize'.")
        self.rule = rule
        self.per_layer = bool(per_layer)
        self.gamma = check_nonneg(gamma, "gamma")
        self.max_chunk_elements = check_positive_int(max_chunk_elements, "max_chunk_elements")
        if engine != "auto" and engine not in ENGINES:
            raise ValueError(
                f"unknown per-sample engine {engine!r}; choose one of "
                f"{['auto', *sorted(ENGINES)]}."
            )
        self.engine = engine
        self._per_layer_map: Mapping[str, Any] | None = None
        if rule == "clip":
            if isinstance(max_norm, Mapping):
                if not per_layer:
                    raise ValueError(
                        "a mapping of radii per layer needs per_layer=True; with per_layer=False "
                        "pass one number."
                    )
                self._per_layer_map = {k: as_threshold(v, f"max_norm[{k!r}]") for k, v in max_norm.items()}
                self.threshold: Threshold | None = None
            else:
                self.threshold = as_threshold(max_norm)
        else:
            self.threshold = None

    # -- engine and state -----------------------------------------------------------------------
    def make_engine(self, model: torch.nn.Module, layout: ParamLayout) -> PerSampleEngine:
        name = self.engine
        if name == "auto":
            name = auto_engine(ENGINES)
        cls = ENGINES[name]
        if name == "loop":
            return cls(model, layout)
        return cls(model, layout, max_chunk_elements=self.max_chunk_elements)  # type: ignore[call-arg]  # ENGINES is typed by the base class; every engine but the loop takes max_chunk_elements

    def _group_thresholds(self, layout: ParamLayout) -> list[Threshold]:
        if self._per_layer_map is not None:
            missing = [g for g in layout.group_names if g not in self._per_layer_map]
            unknown = [k for k in self._per_layer_map if k not in layout.group_names]
            if missing or unknown:
                raise ValueError(
                    "per-layer radii must name every layer group exactly. "
                    f"Layer groups of this model: {layout.group_names}. "
                    f"Missing: {missing}. Unknown: {unknown}."
                )
            return [self._per_layer_map[g] for g in layout.group_names]
        assert self.threshold is not None
        n = layout.num_groups if self.per_layer else 1
        return [self.threshold] * n

    def init(self, layout: ParamLayout, device: torch.device) -> PerSampleState:
        if self.rule == "normalize":
            return PerSampleState(())
        return PerSampleState(tuple(t.init(device) for t in self._group_thresholds(layout)))

    def _radii(self, state: PerSampleState, layout: ParamLayout) -> Tensor:
        ths = self._group_thresholds(layout)
        radii = torch.stack([t.value(s) for t, s in zip(ths, state.thresholds)]).reshape(-1, 1)
        return radii.to(wide_dtype(radii.device))

    def weights(self, group_sq: Tensor, radii: Tensor | None, scale: Tensor | None = None) -> Tensor:
        """Weights (G or 1, b) from the squared per-group norms (G, b) an engine reports.

        The engine's side of the contract: for every finite gradient ``group_sq`` is finite and
        accurate, which float32 squares are not above 1.8e19 or below 1e-19. An engine either
        reports float64 squared norms (exact for float32, bfloat16 and float16 gradients), or
        the squared norms of its gradients divided by ``scale`` (broadcastable to (G, b), e.g.
        each sample's largest entry), so that ``||g|| = scale * sqrt(group_sq)``. Both are
        combined in float64 here (float32 on MPS).
        """
        sq = group_sq.to(wide_dtype(group_sq.device))
        if scale is not None:
            return self.weights_from_norms(sq.sqrt() * scale.to(sq.dtype), radii)
        # a sum of float64 squares overflows only for float64 gradients of norm above 1e154
        return self._weights(sq.sqrt() if self.per_layer else sq.sum(0, keepdim=True).sqrt(), radii)

    def weights_from_norms(self, norms: Tensor, radii: Tensor | None) -> Tensor:
        """Weights (G or 1, b) from per-group norms (G, b), computed in float64 (float32 on MPS),
        the flat norm over the groups without squaring them into an overflow."""
        norms = norms.to(wide_dtype(norms.device))
        return self._weights(norms if self.per_layer else combine_norms(norms, 0, keepdim=True), radii)

    def _weights(self, norm: Tensor, radii: Tensor | None) -> Tensor:
        """The rule applied to wide norms, (G, b) per layer, else (1, b).

        An infinite norm whose weight would depend on it gets a NaN weight: either the sample's
        gradient is not finite (its weighted sum is non-finite whatever the weight), or an engine
        let a finite gradient's squared norm overflow, and then the true weight is unknown.
        Weight 0 would drop that sample without a word; NaN makes the clipper skip the step and
        say so."""
        if self.rule == "normalize":
            denom = norm.nan_to_num(nan=math.nan, posinf=math.nan) + self.gamma
            return torch.where(denom == 0, torch.zeros_like(denom), 1.0 / denom)  # NaN stays NaN
        assert radii is not None
        if isinstance(self.threshold, NoClip):  # weight 1 whatever the norm: nothing unknown
            return torch.ones_like(norm[:1])
        return clip_coefficient(norm.nan_to_num(nan=math.nan, posinf=math.nan), radii.to(norm.device))

    def contribute(
        self,
        losses: Tensor,
        state: PerSampleState,
        layout: ParamLayout,
        engine: PerSampleEngine | None,
        out: list[Tensor | None],
        *,
        drop: bool = False,
        loss_scale: Tensor | None = None,
    ) -> tuple[Contribution, PerSampleState]:
        """``sum_i w_i g_i`` through the engine: :func:`per_sample_clip_sum` (or its
        normalizing and per-layer forms) without a list of every ``g_i``: the hook engine never
        forms them, the others a chunk of samples at a time.

        With ``drop``, a sample whose loss or gradient norm is not finite gets weight 0 instead
        of a NaN weight: its loss is masked out of the backward pass (``where``, so a finite
        gradient of a NaN loss becomes exactly 0), and a NaN or infinite norm gives weight 0.
        The engine must then make that sample's contribution exactly 0 even where its gradient
        holds NaN (``NaN * 0`` is NaN): every engine does when told ``drop``.
        """
        assert engine is not None  # the Clipper makes one (make_engine) for a per_sample estimator
        radii = None if self.rule == "normalize" else self._radii(state, layout)

        dtypes = {p.dtype for p in layout.params}
        grad_dtype = dtypes.pop() if len(dtypes) == 1 else None
        # the engine sees the scaled losses' gradients: their norms divided by the loss scale
        # are the true norms the radii and gamma refer to; the weights then apply to the
        # scaled gradients, whose sum stays scaled until the clipper unscales it
        inv = None if loss_scale is None else 1.0 / loss_scale.to(wide_dtype(loss_scale.device))

        def weight_fn(sq: Tensor, scale: Tensor | None = None) -> Tensor:
            if inv is not None:
                scale = inv.to(sq.device) if scale is None else scale.to(inv.dtype) * inv.to(scale.device)
            w = self.weights(sq, radii, scale)
            if drop:
                bad = torch.isnan(w).any(0, keepdim=True) | ~torch.isfinite(sq).all(0, keepdim=True)
                w = torch.where(bad, 0.0, w)
            # rounded toward zero into the gradients' dtype, so the engine's cast never rounds a
            # weight up and a clipped contribution never exceeds its radius
            return w if grad_dtype is None else coefficient_as(w, grad_dtype).to(w.dtype)

        loss_ok = torch.isfinite(losses.detach()) if drop else None
        if loss_ok is not None:
            losses = torch.where(loss_ok, losses, 0.0)
        group_norms = accumulate_into(engine, losses, weight_fn, out, drop=drop)
        wide = group_norms.to(wide_dtype(group_norms.device))
        if inv is not None:
            wide = wide * inv.to(wide.device)
            group_norms = wide.to(group_norms.dtype)
        flat_wide = combine_norms(wide, 0, keepdim=True)
        flat = flat_wide.reshape(-1).to(group_norms.dtype)
        w = self._weights(wide if self.per_layer else flat_wide, radii)
        clipped = (w < 1).any(0)
        dropped = None
        if loss_ok is not None:
            dropped = ~loss_ok.reshape(-1) | ~torch.isfinite(wide).all(0)
            clipped = clipped & ~dropped
        if self.rule == "clip":
            ths = self._group_thresholds(layout)
            if self.per_layer:
                seen = _gathered(group_norms, layout, ths)
                new = tuple(t.observe(s, seen[g]) for g, (t, s) in enumerate(zip(ths, state.thresholds)))
            else:
                new = (ths[0].observe(state.thresholds[0], _gathered(flat, layout, ths)),)
            state = PerSampleState(new)
        contrib = Contribution(
            losses.shape[0],
            per_sample_norms=flat,
            group_norms=group_norms,
            clipped=clipped.float(),
            dropped=dropped,
        )
        return contrib, state

    def __repr__(self) -> str:
        if self.rule == "normalize":
            return f"per_sample_normalize(gamma={self.gamma})"
        radius = self._per_layer_map if self._per_layer_map is not None else self.threshold
        return f"per_sample_clip({radius!r}, per_layer={self.per_layer}, engine={self.engine!r})"


def _gathered(values: Tensor, layout: ParamLayout, thresholds: Sequence[Threshold]) -> Tensor:
    """What an adaptive threshold observes: with several processes, every process's norms (the
    last dimension, joined in rank order), so the radii stay identical on every process; a
    constant radius observes nothing and needs no collective."""
    if layout.gather_norms is None or all(isinstance(t, (Constant, NoClip)) for t in thresholds):
        return values
    return layout.gather_norms(values)


# -- public factories ------------------------------------------------------------------------------


def mean() -> Estimator[Any]:
    """The plain mini-batch mean gradient (SGD's estimator).

    With ``Clipper(..., nonfinite="drop_sample")`` the unit dropped is a whole micro-batch (one
    ``backward()`` call): a micro-batch whose loss or gradient is not finite adds nothing and
    its samples are not counted."""
    return Mean()


def per_sample_clip(
    max_norm: float | Threshold | Mapping[str, float] | None,
    *,
    per_layer: bool = False,
    engine: str = "auto",
    max_chunk_elements: int = 2**26,
) -> Estimator[Any]:
    """PS-Clip-SGD's estimator: ``g = (1/B) sum_i min(1, c/||g_i||) g_i`` (arXiv:2605.02701).

    Args:
        max_norm: the radius ``c``: a number, a threshold object, ``None`` (no clipping: the
            mean gradient, computed the per-sample way) or, with ``per_layer=True``, a mapping
            from layer-group name (a module path such as ``"fc1"``) to its own ``c_l``.
        per_layer: clip each layer's part of ``g_i`` to its own radius instead of using the
            flat norm over the whole model.
        engine: ``"auto"`` (the fastest available: ``"hooks"``), ``"hooks"`` (one forward and
            one backward, no per-sample gradients held), ``"vmap"`` (torch.func) or ``"loop"``
            (one backward per sample; the reference).
        max_chunk_elements: memory cap of the vmap engine: samples are processed in chunks so
            that chunk x parameters never exceeds this many elements.

    Example::

        clipper = rc.Clipper(model, opt, rc.per_sample_clip(1.0))
    """
    return PerSample("clip", max_norm, per_layer=per_layer, engine=engine, max_chunk_elements=max_chunk_elements)


def per_sample_normalize(
    gamma: float = 0.01, *, engine: str = "auto", max_chunk_elements: int = 2**26
) -> Estimator[Any]:
    """Per-sample normalization ("automatic clipping", arXiv:2206.07136): ``g_i/(||g_i|| + gamma)``."""
    return PerSample("normalize", gamma=gamma, engine=engine, max_chunk_elements=max_chunk_elements)


def micro_batch_clip(max_norm: float | Threshold) -> Estimator[Any]:
    """Clip each micro-batch's mean gradient to norm ``c`` before accumulating (arXiv:2605.02701).

    With ``Clipper(..., nonfinite="drop_sample")`` a micro-batch whose loss or gradient is not
    finite is dropped whole (its contribution is zeroed, and it is not counted)."""
    return MicroBatchClip(max_norm)
