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

References: PS-Clip-SGD and micro-batch clipping, Nobile & Grohs, arXiv:2605.02701;
per-sample normalization ("automatic clipping"), Bu et al., arXiv:2206.07136.

:func:`per_sample_clip_sum` writes PS-Clip-SGD's sum out plainly, as the reference the fast
engines are tested against. The floor below holds the machinery: the estimator contract
(``_estimator_base.py``), the radius of each layer group (``_radii.py``), from an engine's
squared norms to weights (``_sample_weights.py``), the engines and who owns ``p.grad``
(``per_sample/``). Pairing an estimator with transforms (``Method``, ``chain``) is one floor
up, in ``_method.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from robustclip._estimator_base import Contribution, Estimator
from robustclip._math import clip_coefficient, coefficient_as, global_norm, wide_dtype
from robustclip._radii import GroupRadii, gathered
from robustclip._sample_weights import SampleWeighting, norms_from_squares, wide_norms
from robustclip._validate import check_nonneg, check_positive_int
from robustclip.per_sample import ENGINES, ParamLayout, PerSampleEngine
from robustclip.per_sample._engine import accumulate_into, check_engine_name, make_engine
from robustclip.per_sample._grads import add_into, count_coefficient, drop_if_nonfinite, gradients
from robustclip.thresholds import Threshold, as_threshold

__all__ = ["Contribution", "Estimator", "mean", "micro_batch_clip", "per_sample_clip", "per_sample_clip_sum", "per_sample_normalize"]

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
        # The backward pass runs on the mean loss, as a plain mean-loss backward does: the sum's
        # backward carries B times larger gradients through every activation, which overflows
        # float16 (autocast, GradScaler) where the mean's does not. The sum the contract asks for
        # is then B times the mean gradient, scaled in the same pass that adds it. It stays in
        # the losses' (scaled) units: nothing here compares a norm. (A 0-d loss counts as one.)
        count = 1 if losses.dim() == 0 else losses.shape[0]
        mean_loss = losses if losses.dim() == 0 else losses.mean()
        g, owned = gradients(mean_loss, layout.params, layout.direct_backward, out)
        dropped = None
        if drop:
            g, owned, dropped = drop_if_nonfinite(g, owned, torch.isfinite(losses).all())
        add_into(out, g, layout.params, count_coefficient(count, g[0]), owned=owned)
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
            g, owned, dropped = drop_if_nonfinite(g, owned, ok, check=False)  # a finite norm: finite g
            coef = torch.where(ok, coef, 0.0)
        # out += coef * g in one fused pass; coef stays a device tensor (no host sync)
        add_into(out, g, layout.params, coefficient_as(coef, g[0].dtype), owned=owned)
        norm1 = norm.to(torch.promote_types(g[0].dtype, torch.float32)).reshape(1)
        # every process's micro-batch norms, so an adaptive radius stays identical everywhere (a
        # dropped micro-batch's non-finite norm is skipped by the threshold on every process)
        th = self.threshold.observe(state.threshold, gathered(norm1, layout, [self.threshold]))
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
        self.engine = check_engine_name(engine, ENGINES)
        # the radius per layer group (or one for the flat norm); normalizing has none
        self.radii = GroupRadii(max_norm, self.per_layer) if rule == "clip" else None

    def make_engine(self, model: torch.nn.Module, layout: ParamLayout) -> PerSampleEngine:
        return make_engine(ENGINES, self.engine, model, layout, self.max_chunk_elements)

    def init(self, layout: ParamLayout, device: torch.device) -> PerSampleState:
        return PerSampleState(() if self.radii is None else self.radii.init(layout, device))

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
        assert radii is not None and self.radii is not None
        if self.radii.never_clips:  # weight 1 whatever the norm: nothing unknown
            return torch.ones_like(norm[:1])
        return clip_coefficient(norm.nan_to_num(nan=math.nan, posinf=math.nan), radii.to(norm.device))

    def weights(self, group_sq: Tensor, radii: Tensor | None, scale: Tensor | None = None) -> Tensor:
        """Weights (G or 1, b) from the squared per-group norms (G, b) an engine reports, read
        as norms in float64 (float32 on MPS) (see ``_sample_weights.norms_from_squares``)."""
        return self._weights(norms_from_squares(group_sq, scale, self.per_layer), radii)

    def weights_from_norms(self, norms: Tensor, radii: Tensor | None) -> Tensor:
        """Weights (G or 1, b) from per-group norms (G, b), in float64 (float32 on MPS)."""
        return self._weights(wide_norms(norms, self.per_layer), radii)

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
        radii = None if self.radii is None else self.radii.values(state.thresholds, layout)
        weighting = SampleWeighting(lambda n: self._weights(n, radii), self.per_layer, layout.params, loss_scale, drop)
        loss_ok = torch.isfinite(losses.detach()) if drop else None
        if loss_ok is not None:
            losses = torch.where(loss_ok, losses, 0.0)
        # the readings (norms, clipped and dropped flags) from the weights the engine applied
        read = weighting.readings(accumulate_into(engine, losses, weighting, out, drop=drop), loss_ok)
        if self.radii is not None and not self.radii.constant:  # adaptive radii observe the norms
            seen = read.group_norms if self.per_layer else read.per_sample_norms
            state = PerSampleState(self.radii.observe(state.thresholds, layout, seen))
        return Contribution(losses.shape[0], **read._asdict()), state

    def __repr__(self) -> str:
        if self.rule == "normalize":
            return f"per_sample_normalize(gamma={self.gamma})"
        return f"per_sample_clip({self.radii!r}, per_layer={self.per_layer}, engine={self.engine!r})"


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
