"""The Clipper: a training step in two stages, in front of any torch.optim optimizer.

``backward(losses)`` runs the sample-level estimator on one (micro-)batch and adds its
contribution to ``p.grad``; ``finish()`` divides by the count, all-reduces under DDP, checks the
gradient is finite and runs the batch-level transforms, leaving the final gradient in
``p.grad``; ``step()`` is ``finish()`` followed by ``optimizer.step()`` unless the step was
skipped. Frameworks that step the optimizer themselves (Hugging Face Trainer, Lightning,
accelerate) call ``finish()`` and leave the optimizer to them. See ARCHITECTURE.md for the flow.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from robustclip import _distributed, _fsdp, _kernels
from robustclip._batchnorm import check_no_training_batchnorm
from robustclip._estimators import Contribution, Mean
from robustclip._math import global_norm, tensor_norms, wide_dtype
from robustclip._method import Method, as_method
from robustclip._transform import StepContext
from robustclip._validate import check_losses
from robustclip.per_sample import ParamLayout
from robustclip.per_sample._engine import unwrap_model
from robustclip.per_sample._grads import fill_missing
from robustclip.per_sample._graph import reached_leaves

log = logging.getLogger("robustclip")

__all__ = ["Clipper", "StepInfo"]


@dataclass
class StepInfo:
    """Readings of one optimizer step. Tensors stay on the device; :meth:`as_dict` syncs.

    Attributes:
        step: index of the optimizer step (0-based), counting skipped steps.
        skipped: True if the gradient or loss was not finite and nothing was updated.
        num_samples: samples (micro-batches for micro-batch clipping) averaged, all processes;
            0 when ``finish()`` took the gradient of the caller's own backward pass.
        loss: mean loss over the step's samples.
        grad_norm: global norm of the averaged gradient before the batch-level transforms.
        per_sample_norms: flat per-sample gradient norms (this process), per-sample methods.
        micro_batch_norms: norm of each micro-batch's mean gradient, micro-batch clipping.
        clipped_fraction: share of samples (or micro-batches) whose contribution was scaled down.
        transforms: readings of the batch-level transforms (e.g. the global norm clip's radius).
        layer_norms: norm of each layer group's averaged gradient before the transforms, aligned
            with ``clipper.layout.group_names``; only when ``finish(layer_norms=True)``.
        dropped: with ``nonfinite="drop_sample"``: how many units (samples; micro-batches' samples
            for ``mean()``, micro-batches for micro-batch clipping) got weight 0 because their
            loss or gradient was not finite, over all processes (0-d float64 tensor).
        dropped_mask: with ``nonfinite="drop_sample"``: this process's dropped flags, one per
            unit, aligned with ``per_sample_norms`` (per-sample methods) or with the
            ``backward()`` calls (``mean()`` and micro-batch clipping).
    """

    step: int
    skipped: bool
    num_samples: int
    loss: Tensor | None = None
    grad_norm: Tensor | None = None
    per_sample_norms: Tensor | None = None
    micro_batch_norms: Tensor | None = None
    clipped_fraction: Tensor | None = None
    transforms: dict[str, Any] = field(default_factory=dict)
    layer_norms: Tensor | None = None
    dropped: Tensor | None = None
    dropped_mask: Tensor | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (reads the device: call it when you log, not every step)."""

        def conv(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.item() if v.numel() == 1 and v.dim() == 0 else v.detach().cpu().tolist()
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            return v

        return {k: conv(v) for k, v in self.__dict__.items()}


_NONFINITE_MODES = ("skip_step", "drop_sample", "raise")


def _check_nonfinite_mode(mode: object, check_finite: bool, method: Method, scaler: object) -> str:
    if mode not in _NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {list(_NONFINITE_MODES)}, got {mode!r}.")
    if mode != "skip_step" and not check_finite:
        raise ValueError(
            f"nonfinite={mode!r} needs the finite check; drop check_finite=False (or keep the "
            "default nonfinite='skip_step')."
        )
    if mode == "drop_sample":
        if not getattr(method.estimator, "handles_nonfinite", False):
            raise ValueError(
                f"nonfinite='drop_sample' needs an estimator that can drop a unit "
                f"(mean, per_sample_clip, per_sample_normalize, micro_batch_clip); "
                f"{method.estimator!r} cannot."
            )
        if scaler is not None:
            raise ValueError(
                "nonfinite='drop_sample' cannot be combined with a GradScaler: under loss "
                "scaling an inf is an overflow of the scale, not a bad sample, and the scaler "
                "must see it to lower the scale. Use nonfinite='skip_step' with a scaler."
            )
    return str(mode)


def _check_scaler(
    scaler: object, optimizer: torch.optim.Optimizer | None, check_finite: bool, method: Method
) -> torch.amp.GradScaler | None:
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}.")
    if optimizer is None:
        raise ValueError(
            "a scaler needs the optimizer (it unscales the optimizer's gradients and is updated "
            "at clipper.step()); pass the optimizer, or leave loss scaling to your framework."
        )
    if not check_finite:
        raise ValueError("a scaler needs check_finite=True: an overflow must skip the step.")
    if not getattr(method.estimator, "handles_nonfinite", False):
        raise ValueError(f"{method.estimator!r} cannot work on scaled losses; use it without a scaler.")
    return scaler


class Clipper:
    """Drive any ``torch.optim`` optimizer with a robustclip gradient method.

    Args:
        model: the model (or its DistributedDataParallel wrapper).
        optimizer: any ``torch.optim.Optimizer``; momentum and weight decay stay its job, and LR
            schedulers attach to it as usual. ``None`` when something else steps the optimizer
            (a training framework): the clipper then works on every parameter of ``model``
            that requires grad (or on ``params``), and :meth:`finish` replaces :meth:`step`.
        method: an estimator (``rc.per_sample_clip(1.0)``), a transform
            (``rc.clip_by_global_norm(1.0)``) or ``rc.chain(...)`` of them. ``None`` is plain
            SGD's mean gradient.
        check_finite: skip the step (parameters, optimizer and clipper state untouched) when the
            loss, the averaged gradient or the gradient the transform chain hands the optimizer
            is not finite. Costs one host read per step, as AMP's GradScaler.
        nonfinite: what a non-finite loss or gradient does (with ``check_finite``):
            ``"skip_step"`` (default) skips the whole step; ``"drop_sample"`` gives each
            non-finite unit weight 0 (a sample for per-sample methods; the whole micro-batch's
            contribution for ``mean()`` and ``micro_batch_clip``), averages over the rest,
            reports them in ``StepInfo.dropped`` / ``dropped_mask``, and skips the step only if
            no finite unit remains (or the transforms produce a non-finite gradient); under DDP
            the counts are all-reduced, so every process decides the same. ``"raise"`` restores
            the state as a skip does, then raises ``FloatingPointError`` naming the step and the
            samples (or micro-batches) whose loss or norm was not finite.
        scaler: a ``torch.amp.GradScaler`` for float16 training. The clipper scales the losses
            before its backward pass, compares per-sample and micro-batch norms with the radii in
            unscaled units, unscales the gradient (``scaler.unscale_``) before the global norm
            and the transforms, skips the step when the unscaled gradient holds inf or NaN (as
            ``scaler.step`` would), and calls ``scaler.update()`` once per :meth:`step`. Pass
            unscaled losses to :meth:`backward`.
        allow_unused: accept optimizer parameters that get no gradient (they get a zero one).
        distributed: sum gradients over processes at ``step()``. ``None``: yes if ``model`` is
            a DistributedDataParallel module.
        params: the parameters to work on when ``optimizer`` is ``None`` (default: those of
            ``model`` that require grad).
        verify_every: per-sample methods compare sample 0's per-sample gradient with autograd
            on the first use of every way the engine computes it; with ``N``, also every ``N``
            ``backward`` calls (one extra backward pass each time; docs/fast_engine.md).

    Usage (three changed lines in a training loop)::

        clipper = rc.Clipper(model, opt, rc.per_sample_clip(1.0))
        for x, y in loader:
            losses = F.cross_entropy(model(x), y, reduction="none")
            clipper.backward(losses)   # instead of loss.backward()
            clipper.step()             # instead of opt.step()

    With gradient accumulation call ``backward`` once per micro-batch, then ``step`` once.

    When a framework steps the optimizer, call :meth:`finish` where it would clip gradients
    (after the last micro-batch, before ``optimizer.step()``) and skip its optimizer step, LR
    scheduler tick and loss-scaler update when ``info.skipped`` is true. On a skipped step
    ``finish`` also sets every ``p.grad`` to ``None``, which every ``torch.optim`` optimizer
    takes as "leave this parameter and its state alone", so an optimizer step that still runs
    changes nothing.
    The clipper owns ``p.grad`` between the first ``backward`` of a step and ``step``. The
    first ``backward`` of a step drops the previous gradients, like
    ``zero_grad(set_to_none=True)``, and sets new tensors; do not keep references to
    ``p.grad`` across steps. ``optimizer.zero_grad()`` is not needed, but calling it before the
    forward pass, as in a plain loop, frees the previous gradients before the forward pass
    allocates its activations: a lower peak.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        method: Any = None,
        *,
        check_finite: bool = True,
        nonfinite: str = "skip_step",
        scaler: torch.amp.GradScaler | None = None,
        allow_unused: bool = False,
        distributed: bool | None = None,
        process_group: Any = None,
        params: Iterable[Tensor] | None = None,
        verify_every: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (or None, to step it yourself after "
                f"clipper.finish()), got {type(optimizer).__name__}."
            )
        if optimizer is not None and params is not None:
            raise ValueError(
                "pass either an optimizer or params, not both: with an optimizer the clipper "
                "works on the optimizer's parameters."
            )
        self.model = model
        self.optimizer = optimizer
        self.method: Method = as_method(method)
        self.check_finite = bool(check_finite)
        self.nonfinite = _check_nonfinite_mode(nonfinite, self.check_finite, self.method, scaler)
        self.scaler = _check_scaler(scaler, optimizer, self.check_finite, self.method)
        self.allow_unused = bool(allow_unused)
        self._group = _distributed.resolve(model, distributed, process_group)

        if optimizer is not None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
            source = "the optimizer"
        else:
            source = "the model" if params is None else "params"
            pool = unwrap_model(model).parameters() if params is None else params
            params = [p for p in pool if p.requires_grad]
        if not params:
            raise ValueError(f"{source} has no parameters that require grad.")
        self._fsdp = _fsdp.detect(model, params, self.method)  # FSDP2-sharded model, else None
        if self._fsdp is not None:
            _check_fsdp_modes(self.nonfinite, self.scaler)
        self.layout = ParamLayout.build(unwrap_model(model), params)
        sparse = [
            n for n, m in unwrap_model(model).named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
        ]
        if sparse:
            raise ValueError(
                f"robustclip needs dense gradients, but {', '.join(repr(n) for n in sparse)} "
                "produce sparse ones (sparse=True); construct them with sparse=False."
            )
        # (estimators also check at each step that no process group is initialized)
        self.layout.direct_backward = self._group is None and not isinstance(
            model, nn.parallel.DistributedDataParallel
        )
        if self._fsdp is not None:  # FSDP2: autograd sees the unsharded leaves (_fsdp.py)
            self.layout = self._fsdp.graph_layout(self.layout)
        elif self._group is not None:  # adaptive radii observe every process's norms
            self.layout.gather_norms = functools.partial(_distributed.all_gather_padded, group=self._group)
        self.device = params[0].device
        est = self.method.estimator
        if est.per_sample:
            check_no_training_batchnorm(unwrap_model(model), repr(est))
        # BatchNorms allowed now (eval mode) must still be in eval mode at each backward()
        self._batchnorms = [m for m in unwrap_model(model).modules() if isinstance(m, _BatchNorm)]
        with self._fsdp.view() if self._fsdp is not None else contextlib.nullcontext():
            self.engine = est.make_engine(model, self.layout) if est.per_sample else None  # type: ignore[attr-defined]  # make_engine is defined by the per-sample estimators only, which est.per_sample selects
        if self._fsdp is not None:
            self._fsdp.check_engine(self.engine)
        if self.engine is not None:
            self.engine.set_verify_every(verify_every)
        # fold the mean's 1/count into the per-sample weights (one process, float32/float64
        # gradients: a half-precision weight divided by the batch could underflow)
        self._fold_count = (
            self.engine is not None
            and self._fsdp is None
            and self._group is None
            and all(p.dtype in (torch.float32, torch.float64) for p in params)
        )
        if self.engine is not None:
            self.engine.attach()
        self._est_state = est.init(self.layout, self.device)
        self._tr_state = self.method.transform.init(params)
        self.steps = 0
        self.skipped_steps = 0
        self.last: StepInfo | None = None
        self._checked_unused = False
        self._reset_cycle()

    # -- context manager: hooks live exactly as long as the clipper -------------------------------
    def __enter__(self) -> Clipper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks the per-sample engine installed on the model."""
        if self.engine is not None:
            self.engine.detach()
        if self._fsdp is not None:
            self._fsdp.close()

    @property
    def params(self) -> list[Tensor]:
        return self.layout.params

    def _reset_cycle(self) -> None:
        self._count = 0
        # per backward(): (mean loss, count) and the clipped flags, reduced once in step() (a
        # few small ops per step instead of per micro-batch)
        self._losses: list[tuple[Tensor, int]] = []
        self._clipped: list[Tensor] = []
        self._sample_norms: list[Tensor] = []
        self._micro_norms: list[Tensor] = []
        # nonfinite="drop_sample": per backward(), the dropped flags, the kept count and the sum
        # of the kept losses (device tensors); nonfinite="raise": which losses were finite
        self._dropped: list[Tensor] = []
        self._kept: list[Tensor] = []
        self._loss_sums: list[Tensor] = []
        self._loss_ok: list[Tensor] = []
        self._state_at_cycle_start = self._est_state
        # the per-sample engine folds 1/_sum_den (the first backward's batch size) into its
        # weights, so the step's sum arrives divided by it: step() then divides by
        # count/_sum_den, and not at all for a single backward() (0: nothing folded)
        self._sum_den = 0

    # -- stage 1: sample level ----------------------------------------------------------------------
    def backward(self, losses: Tensor) -> None:
        """Add this (micro-)batch's gradient contribution; call once per micro-batch.

        Args:
            losses: one loss per sample, shape ``(B,)`` (per-sample methods need this; compute
                the loss with ``reduction='none'``). ``mean()`` and ``micro_batch_clip`` also
                take a scalar mean loss. Unscaled, also with a ``scaler``: the clipper scales
                them itself.
        """
        est = self.method.estimator
        losses = check_losses(losses, per_sample=est.per_sample, method=est)
        if est.per_sample and any(m.training for m in self._batchnorms):
            check_no_training_batchnorm(unwrap_model(self.model), repr(est))
        if not self._checked_unused:
            self._check_unused(losses)
        first = self._count == 0
        if self._fsdp is not None:  # FSDP2: the sums go into the shards (_fsdp.py)
            # (nonfinite="drop_sample" and a scaler were refused under FSDP2 at construction)
            contrib, self._est_state = self._fsdp.contribute(
                est, losses, self._est_state, self.layout, self.engine, first
            )
        else:
            if first:
                # a new step: the previous gradients go, as with zero_grad(set_to_none=True),
                # before this step's are computed (not beside them)
                for p in self.params:
                    p.grad = None
            # None where a parameter has no gradient yet this step: the estimator puts a new
            # tensor there, written once instead of added to a zero-filled buffer
            out: list[Tensor | None] = [None] * len(self.params) if first else [p.grad for p in self.params]
            if not est.writes_new_grads:
                fill_missing(out, self.params)
            kwargs: dict[str, Any] = {}
            if self.nonfinite == "drop_sample":
                kwargs["drop"] = True
            scaled = losses
            if self.scaler is not None and self.scaler.is_enabled():
                # the scale as a device tensor (scaler.scale multiplies by it; get_scale() would
                # read it on the host)
                scale = self.scaler.scale(torch.ones((), dtype=torch.float32, device=losses.device))
                scaled = losses * scale
                kwargs["loss_scale"] = scale
            engine = self.engine
            if engine is not None and self._fold_count:
                if first:
                    self._sum_den = losses.shape[0] if losses.dim() == 1 and losses.shape[0] else 0
                engine.sum_scale = 1.0 / self._sum_den if self._sum_den else 1.0
                applied = engine.scaled_calls
                try:
                    contrib, self._est_state = est.contribute(
                        scaled, self._est_state, self.layout, engine, out, **kwargs
                    )
                finally:
                    engine.sum_scale = 1.0
                if self._sum_den and engine.scaled_calls == applied:  # the estimator bypassed the engine
                    if not first:
                        raise RuntimeError(
                            f"robustclip: {est!r} did not compute its sum through the per-sample "
                            "engine (accumulate_into); the step's gradient cannot be averaged."
                        )
                    self._sum_den = 0
            else:
                contrib, self._est_state = est.contribute(
                    scaled, self._est_state, self.layout, self.engine, out, **kwargs
                )
            if first:  # zeros for a parameter nothing reached
                for p, o in zip(self.params, fill_missing(out, self.params)):
                    p.grad = o
        self._count += contrib.count
        # the mean now (in float64: a bf16 or fp16 mean of many losses would round), so that a
        # later in-place change of the caller's loss tensor cannot change the step's loss
        # (a copy even when the loss already is float64: step() may return it as the reading)
        mean = losses.detach().to(torch.float64, copy=True) if losses.dim() == 0 else losses.detach().mean(dtype=torch.float64)
        self._losses.append((mean, contrib.count))
        if contrib.clipped is not None:
            self._clipped.append(contrib.clipped)
        if contrib.per_sample_norms is not None:
            self._sample_norms.append(contrib.per_sample_norms)
        if contrib.micro_batch_norm is not None:
            self._micro_norms.append(contrib.micro_batch_norm)
        if self.nonfinite == "raise":
            self._loss_ok.append(torch.isfinite(losses.detach()).reshape(-1))
        if self.nonfinite == "drop_sample":  # (never under FSDP2: refused at construction)
            self._record_drops(losses, mean, contrib)

    def _record_drops(self, losses: Tensor, mean: Tensor, contrib: Contribution) -> None:
        """The kept count and the kept losses' sum of one backward() (no host read)."""
        if contrib.dropped is None:
            raise RuntimeError(f"{self.method.estimator!r} did not report which units it dropped.")
        d = contrib.dropped.reshape(-1)
        self._dropped.append(d)
        if losses.dim() == 1 and d.numel() == losses.shape[0] == contrib.count:  # per sample
            kept = ~d
            self._loss_sums.append(torch.where(kept, losses.detach().double(), 0.0).sum())
            self._kept.append(kept.double().sum())
        else:  # one unit for the whole micro-batch, counting contrib.count
            kept1 = ~d[0]
            self._loss_sums.append(torch.where(kept1, mean * contrib.count, 0.0))
            self._kept.append(kept1.double() * contrib.count)

    def _sum_losses(self) -> Tensor:
        """Sum of the backward() calls' mean losses, each weighted by its count: divided by the
        total count, the step's mean loss per sample (micro-batch clipping counts a micro-batch
        as one unit, weighted by its mean loss)."""
        means = torch.stack([m for m, _ in self._losses])
        return means @ torch.tensor([c for _, c in self._losses], dtype=torch.float64, device=means.device)

    def _clipped_flags(self) -> Tensor | None:
        """This step's clipped flags, one entry per counted unit (sample or micro-batch)."""
        flags = [c.reshape(-1) for c in self._clipped]
        if not flags:
            return None
        return flags[0] if len(flags) == 1 else torch.cat(flags)

    def _sum_clipped(self) -> Tensor:
        flags = self._clipped_flags()
        if flags is None:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        return flags.double().sum()

    def _count_tensor(self) -> Tensor:
        return torch.full((), float(self._count), dtype=torch.float64, device=self.device)

    def _mean_loss(self) -> Tensor:
        """The step's mean loss per counted unit, in one process (see :meth:`_sum_losses`)."""
        means = [m for m, _ in self._losses]
        if len(means) == 1:
            return means[0]
        if len({c for _, c in self._losses}) == 1:  # equal micro-batches: the mean of their means
            return torch.stack(means).mean()
        return self._sum_losses() / self._count

    def _clipped_fraction(self) -> Tensor:
        """Share of this step's units that were scaled down, in one process."""
        flags = self._clipped_flags()
        if flags is None:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        return flags.sum(dtype=torch.float32) / self._count

    def _check_unused(self, losses: Tensor) -> None:
        reached = {id(t) for t in reached_leaves([losses.grad_fn])}
        missing = [n for n, p in zip(self.layout.names, self.params) if id(p) not in reached]
        self._checked_unused = True
        if missing and not self.allow_unused:
            raise ValueError(
                f"{len(missing)} parameter(s) in the optimizer got no gradient from the loss: "
                f"{', '.join(missing[:6])}{'...' if len(missing) > 6 else ''}. Freeze them "
                "(p.requires_grad_(False)), leave them out of the optimizer, or pass "
                "allow_unused=True to the Clipper to give them a zero gradient."
            )

    # -- stage 2: batch level --------------------------------------------------------------------------
    def step(self) -> StepInfo:
        """Finish the step: average, all-reduce, check, transform, ``optimizer.step()``.

        The same as :meth:`finish` followed by ``optimizer.step()`` when the step is not skipped;
        with a ``scaler``, ``scaler.update()`` follows, skipped step or not (an overflow lowers
        the scale).
        """
        if self.optimizer is None:
            raise RuntimeError(
                "this Clipper has no optimizer (optimizer=None): call clipper.finish() and step "
                "the optimizer yourself, unless info.skipped."
            )
        if self._count == 0:
            raise RuntimeError("step() was called before any backward(losses) in this step.")
        try:
            info = self.finish()
        except FloatingPointError:  # nonfinite="raise": the scaler still ends its step
            if self.scaler is not None:
                self.scaler.update()
            raise
        if not info.skipped:
            # the scaler's own step would read its inf flags on the host once more; the
            # clipper's check already covers them (an inf or NaN after unscaling skips)
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        return info

    def finish(self, *, loss: Tensor | None = None, layer_norms: bool = False) -> StepInfo:
        """Finish the step's gradient in ``p.grad`` and leave the optimizer step to the caller.

        Divides by the count, all-reduces under DDP, unscales (with a ``scaler``), runs the
        batch-level transforms, and checks that the loss, the averaged gradient and the final
        gradient are finite, with one host read. If ``info.skipped`` is true, do not step the
        optimizer, the LR scheduler or a loss scaler for this step; ``p.grad`` is then ``None``
        for every parameter, so an optimizer step that runs anyway leaves the parameters and the
        optimizer state of every ``torch.optim`` optimizer as they were, and the clipper's state
        (estimator thresholds, every transform's state) is the one before the step. With a
        ``scaler``, prefer :meth:`step`; after ``finish()`` alone call
        ``scaler.step(optimizer)`` and ``scaler.update()`` yourself.

        Without a ``backward(losses)`` call in this step, and only for the ``mean()`` estimator
        (plain or followed by batch-level transforms), ``p.grad`` is taken as the step's complete,
        averaged gradient, as an ordinary ``loss.backward()`` (and DDP's own all-reduce) left it;
        this is how batch-level methods run inside a framework's own backward pass.

        Args:
            loss: the step's mean loss (0-d tensor), for transforms that read it and for the
                finiteness check, when the gradient came from the caller's backward pass. With
                ``backward(losses)`` the clipper knows the loss itself and this must be ``None``.
            layer_norms: also compute the norm of each layer group's gradient before the
                transforms (``info.layer_norms``, one small kernel per dtype, no host read).
        """
        dropped: Tensor | None = None
        grad_norm: Tensor | None = None
        if self._count == 0:
            grads, loss_t, count, num = self._external_gradient(loss)
            clipped_fraction = None
        elif self._fsdp is not None:
            if loss is not None:
                raise ValueError(
                    "finish(loss=...) is for gradients from your own backward pass; after "
                    "clipper.backward(losses) the clipper already knows the loss."
                )
            # FSDP2: the local shards and ONE all-reduce of [count, loss sum, clipped count,
            # local sum of squares], so every rank reads the same norm and loss (_fsdp.py)
            reports = bool(self._sample_norms or self._micro_norms)
            grads, count, loss_t, clipped_sum, grad_norm = self._fsdp.reduce(
                self._count, self._sum_losses(), self._sum_clipped()
            )
            clipped_fraction = (clipped_sum / count).float() if reports else None
            num = int(round(float(count)))
        else:
            if loss is not None:
                raise ValueError(
                    "finish(loss=...) is for gradients from your own backward pass; after "
                    "clipper.backward(losses) the clipper already knows the loss."
                )
            grads, loss_t, count, num, clipped_fraction, dropped = self._average()
        if self.scaler is not None:
            # before any norm: every norm and radius below is in unscaled units
            self.scaler.unscale_(self.optimizer)  # type: ignore[arg-type]
        # Every DDP process reads the norm of the all-reduced gradient (and decides on its own
        # whether to skip) and transforms that gradient on its own: with the kernels each one
        # timed fastest, or BLAS rounding by memory alignment, they could round differently and
        # the replicas drift apart.
        fixed = _kernels.plain_kernels if self._group is not None else contextlib.nullcontext
        wide = wide_dtype(self.device)
        if grad_norm is not None:  # FSDP2: over every shard, in the wide dtype, from reduce()
            norm_wide = grad_norm
        else:
            with fixed():
                # wide: a finite gradient of norm above the float32 maximum is clipped, not skipped
                norm_wide = global_norm(grads, dtype=wide)
        info = StepInfo(
            step=self.steps,
            skipped=False,
            num_samples=num,
            loss=loss_t,
            grad_norm=norm_wide.to(_reading_dtype(grads)),
            per_sample_norms=_joined(self._sample_norms),
            micro_batch_norms=_joined(self._micro_norms),
            clipped_fraction=clipped_fraction,
            layer_norms=self._layer_norms(grads) if layer_norms else None,
            dropped=dropped,
            dropped_mask=_joined(self._dropped),
        )
        # The chain runs before the check, so that one host read covers the loss, the input
        # and the output of the chain. Transform states are immutable values: the previous one
        # is kept until the check passes (a skipped step restores it by not replacing it).
        new_tr = self._tr_state
        transforms = self.method.transform.transforms
        if transforms:
            num_t = count if count is not None else (self._count_tensor() if self._count else None)
            ctx = StepContext(self.params, self.layout.names, loss_t, num_t, self.layout.modules)
            if self._fsdp is not None:  # norms over the shards, spectral via owner ranks
                ctx = self._fsdp.context(ctx, norm_wide)
                _, new_tr = self._fsdp.transform(self.method.transform, grads, self._tr_state, ctx)
            else:
                with fixed():
                    _, new_tr = self.method.transform.update(grads, self._tr_state, ctx)
        ok = True
        if self.check_finite:
            # each part is >= 0, a loss or NaN: the sum is finite exactly when all are
            check = norm_wide if loss_t is None else norm_wide + loss_t.to(wide)
            if transforms:  # the gradient the optimizer would get
                largest = _largest_entry(grads).to(wide)
                if self._fsdp is not None:
                    # each rank holds other shards: summed over ranks (an inf or NaN anywhere
                    # stays one), so every rank reads the same flag and skips alike
                    largest = self._fsdp.sum_over_shards(largest)
                check = check + largest
            if dropped is not None and count is not None:  # nothing finite left: skip
                check = check + torch.where(count > 0, 0.0, math.nan).to(wide)
            if dropped is not None and self._group is None:
                # the dropped count in the same read (num_samples is a host number)
                flag, n_dropped = torch.stack([check, dropped.to(wide)]).tolist()
                ok = math.isfinite(flag)
                num = self._count - int(round(n_dropped))
                info.num_samples = num
            else:
                # One host read per step, as GradScaler does: skipping the optimizer needs it.
                ok = bool(torch.isfinite(check))
        if not ok:
            self.skipped_steps += 1
            self._est_state = self._state_at_cycle_start
            # None, not zeros: a torch.optim optimizer skips a parameter without a gradient
            # (no momentum, Adam moments, step count or weight decay change), while a zero
            # gradient would still move them
            for p in self.params:
                p.grad = None
            info.skipped = True
            what = self._skip_reason(norm_wide, loss_t, count if dropped is not None else None)
            self.steps += 1
            self.last = info
            self._reset_cycle()
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"robustclip: at step {info.step}, {what}. Parameters, optimizer and clipper "
                    "state are as before the step (it counts as skipped). Pass "
                    "nonfinite='skip_step' to skip such steps, or 'drop_sample' to drop the "
                    "non-finite samples and keep the rest."
                )
            log.warning(
                "robustclip: %s at step %d; skipped it (parameters, optimizer and clipper state "
                "unchanged; %d skipped so far).",
                what,
                info.step,
                self.skipped_steps,
            )
            return info
        self._tr_state = new_tr
        info.transforms = self.method.transform.readings(self._tr_state)
        self.steps += 1
        self.last = info
        self._reset_cycle()
        return info

    def _skip_reason(self, norm: Tensor, loss: Tensor | None, kept: Tensor | None) -> str:
        """What was not finite, for the warning or the error (host reads: a skipped step only)."""
        if kept is not None and float(kept) == 0:
            return "every sample's loss or gradient was non-finite (all were dropped)"
        bad = self._bad_units()
        where = f" ({bad})" if bad else ""
        if loss is not None and not math.isfinite(float(loss)):
            return f"non-finite loss{where}"
        if not math.isfinite(float(norm)):
            if self.scaler is not None:
                return (
                    f"inf or NaN in the gradient after unscaling{where} (a loss-scale overflow "
                    "lowers the scale at scaler.update())"
                )
            return f"non-finite gradient{where}"
        names = ", ".join(repr(t) for t in self.method.transform.transforms)
        return f"the transforms [{names}] made a finite gradient non-finite"

    def _bad_units(self) -> str:
        """The samples (or micro-batches) whose loss or norm was not finite, by backward() call."""
        parts: list[str] = []
        norms = self._sample_norms or self._micro_norms
        per_sample = bool(self._sample_norms)
        for k in range(max(len(norms), len(self._loss_ok))):
            found = []
            if k < len(self._loss_ok):
                bad_loss = ~self._loss_ok[k].cpu()
                if per_sample:
                    idx = torch.nonzero(bad_loss).reshape(-1).tolist()
                    if idx:
                        found.append(f"losses of samples {idx}")
                elif bool(bad_loss.any()):
                    found.append("its loss")
            if k < len(norms):
                bad_norm = ~torch.isfinite(norms[k].detach().cpu().reshape(-1))
                idx = torch.nonzero(bad_norm).reshape(-1).tolist()
                if idx:
                    found.append(f"gradient norms of samples {idx}" if per_sample else "its gradient norm")
            if found:
                parts.append(f"backward() call {k}: " + ", ".join(found))
        return "; ".join(parts)

    def _average(
        self,
    ) -> tuple[list[Tensor], Tensor, Tensor | None, int, Tensor | None, Tensor | None]:
        """The step's gradient from backward() calls: summed over processes, divided by the count.

        Returns the gradients, the mean loss, the count as a tensor (DDP and dropping only),
        the count as a number, the clipped fraction (per-sample and micro-batch methods), and
        the number of dropped units (``nonfinite="drop_sample"``, over all processes).
        """
        grads: list[Tensor] = [p.grad for p in self.params]  # type: ignore[misc]  # p.grad is typed Tensor | None; every entry is a tensor after backward (fill_missing)
        reports = bool(self._sample_norms or self._micro_norms)
        drop = bool(self._kept)
        if drop:
            # what remains after dropping: a device count, so that no host read is needed here
            kept = torch.stack(self._kept).sum()
            kept_losses = torch.stack(self._loss_sums).sum()
            dropped = self._count - kept
        if self._group is not None:
            count = kept if drop else self._count_tensor()
            # the scalars travel in float64: a count or loss sum in the gradients' dtype
            # (fp16, bf16) would round or overflow
            items = [count, kept_losses if drop else self._sum_losses(), self._sum_clipped()]
            if drop:
                items.append(dropped)
            scalars = torch.stack(items)
            _distributed.all_reduce_sum(grads, scalars, self._group)
            count, loss_sum, clipped_sum, *rest = scalars.unbind()
            torch._foreach_div_(grads, count)
            clipped_fraction = (clipped_sum / count).float() if reports else None
            # the global count is read on the host (one more sync, DDP only)
            n = int(round(float(count)))
            return grads, loss_sum / count, count, n, clipped_fraction, rest[0] if drop else None
        if drop:
            # 0 kept: 0/0 is NaN, and the check skips the step
            torch._foreach_div_(grads, kept / self._sum_den if self._sum_den else kept)
            clipped_fraction = (self._sum_clipped() / kept).float() if reports else None
            return grads, kept_losses / kept, kept, self._count, clipped_fraction, dropped
        # one process: the count is a host number, and the readings take as few small
        # operations as they can (each costs microseconds, a step of a small model a few ms)
        if not self._sum_den:
            torch._foreach_div_(grads, float(self._count))
        elif self._count != self._sum_den:  # several backward() calls: the rest of the mean
            torch._foreach_div_(grads, self._count / self._sum_den)
        clipped_fraction = self._clipped_fraction() if reports else None
        return grads, self._mean_loss(), None, self._count, clipped_fraction, None

    def _external_gradient(
        self, loss: Tensor | None
    ) -> tuple[list[Tensor], Tensor | None, Tensor | None, int]:
        """The step's gradient as the caller's own backward pass left it in ``p.grad``."""
        est = self.method.estimator
        if self._fsdp is not None:
            raise RuntimeError(
                "finish() was called before any backward(losses) in this step, but the model is "
                "sharded with FSDP2: the clipper sets FSDP2 to sum gradients over ranks (not "
                "average them), so a gradient from your own loss.backward() would be wrong. Call "
                "clipper.backward(losses) for each (micro-)batch instead of loss.backward()."
            )
        if not isinstance(est, Mean):
            raise RuntimeError(
                f"finish() was called before any backward(losses) in this step, but {est!r} "
                "computes the gradient itself: call clipper.backward(losses) for each "
                "(micro-)batch instead of loss.backward(). Only mean() (and batch-level "
                "transforms such as clip_by_global_norm) can finish a gradient from your own "
                "backward pass."
            )
        missing = [n for n, p in zip(self.layout.names, self.params) if p.grad is None]
        if len(missing) == len(self.params):
            raise RuntimeError(
                "finish() found no gradient: call loss.backward() (or clipper.backward(losses)) "
                "before finishing the step."
            )
        if missing and not self.allow_unused:
            raise ValueError(
                f"{len(missing)} parameter(s) have no gradient: "
                f"{', '.join(missing[:6])}{'...' if len(missing) > 6 else ''}. Freeze them "
                "(p.requires_grad_(False)), leave them out of the optimizer, or pass "
                "allow_unused=True to the Clipper to give them a zero gradient."
            )
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if loss is not None:
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    "finish(loss=...) takes the step's mean loss as a one-element tensor, got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}."
                )
            loss = loss.detach().to(torch.float64, copy=True).reshape(())
        return [p.grad for p in self.params], loss, None, 0  # type: ignore[misc]  # p.grad is typed Tensor | None; the loop above filled every entry

    def _layer_norms(self, grads: list[Tensor]) -> Tensor:
        """Norm of each layer group's gradient (float32, aligned with ``layout.group_names``)."""
        if self._fsdp is not None:  # local shards: their squares summed over ranks
            wide = wide_dtype(grads[0].device)
            sq = self._fsdp.sum_over_shards(torch.stack(tensor_norms(grads, dtype=wide)).square()).float()
        else:
            sq = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square()
        out = torch.zeros(self.layout.num_groups, device=sq.device, dtype=torch.float32)
        return out.index_add_(0, self.layout.group_index(sq.device), sq).sqrt()

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The clipper's own state (thresholds, transform states, counters).

        The optimizer's state is saved with ``optimizer.state_dict()`` as usual.
        """
        return {
            "estimator": self.method.estimator.state_to_dict(self._est_state),
            "transforms": self.method.transform.state_to_dict(self._tr_state),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("estimator", "transforms", "steps", "skipped_steps"):
            if key not in state:
                raise ValueError(f"not a Clipper state_dict: key {key!r} is missing.")
        self._est_state = self.method.estimator.state_from_dict(
            self.method.estimator.init(self.layout, self.device), state["estimator"]
        )
        self._tr_state = self.method.transform.state_from_dict(
            self.method.transform.init(self.params), state["transforms"]
        )
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self._reset_cycle()

    def __repr__(self) -> str:
        return f"Clipper({self.method!r}, params={len(self.params)})"



def _reading_dtype(grads: list[Tensor]) -> torch.dtype:
    """float32, or the widest real dtype of the gradients (float64 readings for float64)."""
    dtype = torch.float32
    for dt in {g.dtype for g in grads}:  # each dtype once: promote_types is a dispatched call
        dtype = torch.promote_types(dtype, dt.to_real())
    return dtype


def _joined(parts: list[Tensor]) -> Tensor | None:
    """The readings of the step's backward() calls in one tensor (no copy for a single call)."""
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _check_fsdp_modes(nonfinite: str, scaler: Any) -> None:
    """What the FSDP2 path does not support yet, refused with what to do instead."""
    if nonfinite == "drop_sample":
        raise ValueError(
            "nonfinite='drop_sample' is not supported with an FSDP2-sharded model (fully_shard): "
            "dropping a sample would have to change the gradient that FSDP2 reduce-scatters. Use "
            "nonfinite='skip_step' (the default: a non-finite loss or gradient on any rank skips "
            "the step on every rank) or nonfinite='raise'."
        )
    if scaler is not None:
        raise ValueError(
            "scaler= (a GradScaler) is not supported with an FSDP2-sharded model (fully_shard). "
            "Train in bfloat16 (FSDP2's MixedPrecisionPolicy or autocast), which needs no loss "
            "scaling, or leave the model unsharded (DDP) to use a GradScaler."
        )


def _largest_entry(grads: list[Tensor]) -> Tensor:
    """The largest magnitude over the gradients, NaN if any entry is NaN: finite exactly when
    every entry is (a norm could overflow for a finite gradient; this cannot). One pass."""
    nonempty = [g for g in grads if g.numel()]
    if not nonempty:
        return torch.zeros(())
    wide = wide_dtype(nonempty[0].device)
    return torch.stack([n.to(wide) for n in torch._foreach_norm(nonempty, math.inf)]).amax()
