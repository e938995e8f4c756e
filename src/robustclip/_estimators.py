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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from robustclip._norm_transforms import clip_coefficient
from robustclip._transform import Chain, GradientTransform, global_norm
from robustclip._validate import check_nonneg, check_positive_int
from robustclip.per_sample import ENGINES, ParamLayout, PerSampleEngine
from robustclip.per_sample._engine import accumulate_into, auto_engine, new_grad
from robustclip.thresholds import Threshold, as_threshold


@dataclass
class Contribution:
    """What one ``backward()`` reports besides the gradient it added."""

    count: int
    per_sample_norms: Tensor | None = None  # (B,) flat norms, per-sample methods
    group_norms: Tensor | None = None  # (G, B) per-layer norms, per-sample methods
    micro_batch_norm: Tensor | None = None  # (1,) micro-batch clipping
    clipped: Tensor | None = None  # (B,) or (1,) flags (bool or 0/1 float): scaled down or not
    extra: dict[str, Any] = field(default_factory=dict)


class Estimator:
    """Base class of sample-level estimators."""

    name = "estimator"
    #: True if the estimator needs one loss per sample (and so a per-sample engine)
    per_sample = False
    #: True if :meth:`contribute` accepts ``None`` entries in ``out`` (no gradient yet this
    #: step) and puts new tensors there; otherwise the clipper hands it zero-filled buffers
    writes_new_grads = False

    def init(self, layout: ParamLayout, device: torch.device) -> Any:
        return ()

    def contribute(
        self,
        losses: Tensor,
        state: Any,
        layout: ParamLayout,
        engine: PerSampleEngine | None,
        out: list[Tensor | None],
    ) -> tuple[Contribution, Any]:
        """Add this (micro-)batch's contribution to ``out`` (aligned with ``layout.params``); a
        ``None`` entry (no gradient yet this step) gets a new tensor laid out like its
        parameter."""
        raise NotImplementedError

    def state_to_dict(self, state: Any) -> Any:
        from robustclip._transform import state_to_plain

        return state_to_plain(state)

    def state_from_dict(self, template: Any, data: Any) -> Any:
        from robustclip._transform import state_from_plain

        return state_from_plain(template, data)


def _grads(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    # autograd.grad, not backward(): the estimator owns accumulation, and DDP's reducer hooks
    # stay silent (the clipper all-reduces once per step itself).
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _direct_grads(loss: Tensor, layout: ParamLayout, out: list[Tensor | None]) -> list[Tensor] | None:
    """The first gradient of a step written by autograd into ``p.grad`` (as a plain
    ``backward()`` does), or ``None`` where that is not allowed, so the caller falls back to
    :func:`_grads`. The caller may change the returned tensors in place: autograd's
    accumulation copies a gradient another reference holds (a tensor hook, another parameter),
    and what it keeps as a view into a larger buffer (a parameter used through ``torch.cat`` or
    ``view``, whose buffer a hook may hold) is copied here. A copy of every gradient would be
    one more pass over new memory, which costs more than the pass itself.

    Not allowed: when the clipper forbids it (``ParamLayout.direct_backward``: DDP), whenever a
    process group is initialized (a distributed wrapper's hooks on the accumulation would
    reduce the unclipped gradient), after an earlier contribution, and with post-accumulate
    hooks, which would see an unclipped gradient."""
    params = layout.params
    if not layout.direct_backward or any(o is not None for o in out):
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    if any(p.grad is not None or getattr(p, "_post_accumulate_grad_hooks", None) for p in params):
        return None
    loss.backward(inputs=params)
    grads = []
    for p in params:
        g = p.grad
        if g is None:
            g = torch.zeros_like(p)
        elif g.storage_offset() != 0 or g.untyped_storage().nbytes() != g.numel() * g.element_size():
            g = g.clone()  # shares a buffer with other tensors
        grads.append(g)
    return grads


def _gradients(loss: Tensor, layout: ParamLayout, out: list[Tensor | None]) -> tuple[list[Tensor], bool]:
    """The gradients of ``loss``, and whether they are tensors of the clipper's own
    (:func:`_direct_grads`) rather than autograd's results, which others may hold."""
    direct = _direct_grads(loss, layout, out)
    return (direct, True) if direct is not None else (_grads(loss, layout.params), False)


def _add_into(
    out: list[Tensor | None],
    values: list[Tensor],
    params: list[Tensor],
    coef: Tensor | None = None,
    owned: bool = False,
) -> None:
    """``out += coef * values`` (``coef`` 1 if None), fused over the entries that exist; a
    ``None`` entry gets a new tensor, laid out like its parameter, or, if the values are
    ``owned`` (see :func:`_gradients`), the value itself, scaled where it is."""
    have = [i for i, o in enumerate(out) if o is not None]
    if have:
        dst, src = [out[i] for i in have], [values[i] for i in have]
        if coef is None:
            torch._foreach_add_(dst, src)  # type: ignore[arg-type]
        else:
            torch._foreach_addcmul_(dst, src, [coef] * len(src))  # type: ignore[arg-type]
    missing = [i for i, o in enumerate(out) if o is None]
    if not missing:
        return
    src = [values[i] for i in missing]
    if owned:  # tensors of our own, laid out like their parameters: scaled where they are
        if coef is not None:
            torch._foreach_mul_(src, coef)  # type: ignore[arg-type]
        for i, v in zip(missing, src):
            out[i] = v
        return
    # new tensors, not autograd's results themselves: a gradient hook may hold those, and
    # autograd may hand one tensor to two parameters
    new = torch._foreach_mul(src, coef) if coef is not None else [v.clone() for v in src]
    for i, v in zip(missing, new):
        out[i] = new_grad(params[i], v)


class Mean(Estimator):
    """The mini-batch mean gradient: plain SGD, the baseline."""

    name = "mean"
    writes_new_grads = True

    def contribute(self, losses, state, layout, engine, out):  # type: ignore[override]
        if losses.dim() == 0:
            total, count = losses, 1
        else:
            total, count = losses.sum(), losses.shape[0]
        g, owned = _gradients(total, layout, out)
        _add_into(out, g, layout.params, owned=owned)
        return Contribution(count), state

    def __repr__(self) -> str:
        return "mean()"


class MicroBatchClipState(NamedTuple):
    threshold: Any


class MicroBatchClip(Estimator):
    """Clip each micro-batch's mean gradient before accumulating (arXiv:2605.02701, Sec. 4).

    With K micro-batches per step the gradient is ``(1/K) sum_k clip_c(gbar_k)``. Compare with
    ``chain(mean(), clip_by_global_norm(c))``, the usual clip-after-accumulation.
    """

    name = "micro_batch_clip"
    writes_new_grads = True

    def __init__(self, max_norm: float | Threshold) -> None:
        self.threshold = as_threshold(max_norm)

    def init(self, layout, device):  # type: ignore[override]
        return MicroBatchClipState(self.threshold.init(device))

    def contribute(self, losses, state, layout, engine, out):  # type: ignore[override]
        mean_loss = losses if losses.dim() == 0 else losses.mean()
        g, owned = _gradients(mean_loss, layout, out)
        norm = global_norm(g)
        radius = self.threshold.value(state.threshold)
        coef = clip_coefficient(norm, radius)
        # out += coef * g in one fused pass; coef stays a device tensor (no host sync)
        _add_into(out, g, layout.params, coef.to(g[0].dtype), owned=owned)
        norm1 = norm.reshape(1)
        th = self.threshold.observe(state.threshold, norm1)
        return Contribution(1, micro_batch_norm=norm1, clipped=(coef < 1).reshape(1)), MicroBatchClipState(th)

    def __repr__(self) -> str:
        return f"micro_batch_clip({self.threshold!r})"


class PerSampleState(NamedTuple):
    thresholds: tuple  # one threshold state (flat rule) or one per layer group


class PerSample(Estimator):
    """Per-sample weighting ``sum_i w_i g_i``, computed by a per-sample engine.

    ``rule`` is ``"clip"`` (``w = min(1, c/||g_i||)``) or ``"normalize"``
    (``w = 1/(||g_i|| + gamma)``). With ``per_layer=True`` the norm and the radius are taken
    per layer group (a module's own parameters), so each layer's part of ``g_i`` is clipped to
    its own ``c_l``.
    """

    name = "per_sample"
    writes_new_grads = True
    per_sample = True

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
        return cls(model, layout, max_chunk_elements=self.max_chunk_elements)  # type: ignore[call-arg]

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

    def init(self, layout, device):  # type: ignore[override]
        if self.rule == "normalize":
            return PerSampleState(())
        return PerSampleState(tuple(t.init(device) for t in self._group_thresholds(layout)))

    def _radii(self, state: PerSampleState, layout: ParamLayout) -> Tensor:
        ths = self._group_thresholds(layout)
        return torch.stack([t.value(s) for t, s in zip(ths, state.thresholds)]).reshape(-1, 1).double()

    def weights(self, group_sq: Tensor, radii: Tensor | None) -> Tensor:
        """Weights (G or 1, b) from squared per-group norms (G, b)."""
        if self.rule == "normalize":
            norm = group_sq.sum(0, keepdim=True).sqrt()
            denom = norm + self.gamma
            return torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom))
        assert radii is not None
        if self.per_layer:
            return clip_coefficient(group_sq.sqrt(), radii.to(group_sq.device))
        return clip_coefficient(group_sq.sum(0, keepdim=True).sqrt(), radii.to(group_sq.device))

    def contribute(self, losses, state, layout, engine, out):  # type: ignore[override]
        assert engine is not None
        radii = None if self.rule == "normalize" else self._radii(state, layout)
        group_norms = accumulate_into(engine, losses, lambda sq: self.weights(sq, radii), out)
        flat = group_norms.pow(2).sum(0).sqrt()
        w = self.weights(group_norms.pow(2), radii)
        clipped = (w < 1).any(0).float()
        if self.rule == "clip":
            ths = self._group_thresholds(layout)
            if self.per_layer:
                new = tuple(
                    t.observe(s, group_norms[g]) for g, (t, s) in enumerate(zip(ths, state.thresholds))
                )
            else:
                new = (ths[0].observe(state.thresholds[0], flat),)
            state = PerSampleState(new)
        return (
            Contribution(losses.shape[0], per_sample_norms=flat, group_norms=group_norms, clipped=clipped),
            state,
        )

    def __repr__(self) -> str:
        if self.rule == "normalize":
            return f"per_sample_normalize(gamma={self.gamma})"
        radius = self._per_layer_map if self._per_layer_map is not None else self.threshold
        return f"per_sample_clip({radius!r}, per_layer={self.per_layer}, engine={self.engine!r})"


@dataclass(frozen=True)
class Method:
    """A sample-level estimator followed by a chain of batch-level transforms."""

    estimator: Estimator
    transform: Chain

    def __post_init__(self) -> None:
        # a single transform (or none) given directly is a chain of one (or of none)
        t = self.transform
        if t is None:
            object.__setattr__(self, "transform", Chain(()))
        elif isinstance(t, GradientTransform) and not isinstance(t, Chain):
            object.__setattr__(self, "transform", Chain((t,)))
        elif not isinstance(t, Chain):
            raise TypeError(
                f"Method's transform must be a transform such as rc.clip_by_global_norm(1.0) or "
                f"rc.chain(...) of them, got {type(t).__name__}."
            )

    def __repr__(self) -> str:
        parts = [repr(self.estimator), *(repr(t) for t in self.transform.transforms)]
        return "chain(" + ", ".join(parts) + ")"


def as_method(method: Any) -> Method:
    """Normalise anything the Clipper accepts into a :class:`Method`."""
    if method is None:
        return Method(Mean(), Chain(()))
    if isinstance(method, Method):
        return method
    if isinstance(method, Estimator):
        return Method(method, Chain(()))
    if isinstance(method, Chain):
        return Method(Mean(), method)
    if isinstance(method, GradientTransform):
        return Method(Mean(), Chain((method,)))
    raise TypeError(
        f"Clipper got {type(method).__name__} as its method; pass an estimator such as "
        "rc.per_sample_clip(1.0), a transform such as rc.clip_by_global_norm(1.0), or "
        "rc.chain(...) of them."
    )


# -- public factories ------------------------------------------------------------------------------


def mean() -> Estimator:
    """The plain mini-batch mean gradient (SGD's estimator)."""
    return Mean()


def per_sample_clip(
    max_norm: float | Threshold | Mapping[str, float] | None,
    *,
    per_layer: bool = False,
    engine: str = "auto",
    max_chunk_elements: int = 2**26,
) -> Estimator:
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
) -> Estimator:
    """Per-sample normalization ("automatic clipping", arXiv:2206.07136): ``g_i/(||g_i|| + gamma)``."""
    return PerSample("normalize", gamma=gamma, engine=engine, max_chunk_elements=max_chunk_elements)


def micro_batch_clip(max_norm: float | Threshold) -> Estimator:
    """Clip each micro-batch's mean gradient to norm ``c`` before accumulating (arXiv:2605.02701)."""
    return MicroBatchClip(max_norm)
