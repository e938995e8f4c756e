"""The Clipper: a training step in two stages, in front of any torch.optim optimizer.

``backward(losses)`` runs the sample-level estimator on one (micro-)batch and adds its
contribution to ``p.grad``; ``step()`` divides by the count, all-reduces under DDP, checks the
gradient is finite, runs the batch-level transforms and calls ``optimizer.step()``. See
ARCHITECTURE.md for the flow.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from robustclip import _distributed, _fsdp, _kernels
from robustclip._batchnorm import check_no_training_batchnorm
from robustclip._math import global_norm
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
        num_samples: samples (micro-batches for micro-batch clipping) averaged, all processes.
        loss: mean loss over the step's samples.
        grad_norm: global norm of the averaged gradient before the batch-level transforms.
        per_sample_norms: flat per-sample gradient norms (this process), per-sample methods.
        micro_batch_norms: norm of each micro-batch's mean gradient, micro-batch clipping.
        clipped_fraction: share of samples (or micro-batches) whose contribution was scaled down.
        transforms: readings of the batch-level transforms (e.g. the global norm clip's radius).
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

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (reads the device: call it when you log, not every step)."""

        def conv(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.item() if v.numel() == 1 and v.dim() == 0 else v.detach().cpu().tolist()
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            return v

        return {k: conv(v) for k, v in self.__dict__.items()}


class Clipper:
    """Drive any ``torch.optim`` optimizer with a robustclip gradient method.

    Args:
        model: the model (or its DistributedDataParallel wrapper).
        optimizer: any ``torch.optim.Optimizer``; momentum and weight decay stay its job, and LR
            schedulers attach to it as usual.
        method: an estimator (``rc.per_sample_clip(1.0)``), a transform
            (``rc.clip_by_global_norm(1.0)``) or ``rc.chain(...)`` of them. ``None`` is plain
            SGD's mean gradient.
        check_finite: skip the step (parameters, optimizer and clipper state untouched) when the
            loss or gradient is not finite. Costs one host read per step, as AMP's GradScaler.
        allow_unused: accept optimizer parameters that get no gradient (they get a zero one).
        distributed: sum gradients over processes at ``step()``. ``None``: yes if ``model`` is
            a DistributedDataParallel module.

    Usage (three changed lines in a training loop)::

        clipper = rc.Clipper(model, opt, rc.per_sample_clip(1.0))
        for x, y in loader:
            losses = F.cross_entropy(model(x), y, reduction="none")
            clipper.backward(losses)   # instead of loss.backward()
            clipper.step()             # instead of opt.step()

    With gradient accumulation call ``backward`` once per micro-batch, then ``step`` once.
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
        optimizer: torch.optim.Optimizer,
        method: Any = None,
        *,
        check_finite: bool = True,
        allow_unused: bool = False,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        self.model = model
        self.optimizer = optimizer
        self.method: Method = as_method(method)
        self.check_finite = bool(check_finite)
        self.allow_unused = bool(allow_unused)
        self._group = _distributed.resolve(model, distributed, process_group)

        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            raise ValueError("the optimizer has no parameters that require grad.")
        self._fsdp = _fsdp.detect(model, params, self.method)  # FSDP2-sharded model, else None
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
            self.engine = est.make_engine(model, self.layout) if est.per_sample else None  # type: ignore[attr-defined]
        if self._fsdp is not None:
            self._fsdp.check_engine(self.engine)
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
        self._state_at_cycle_start = self._est_state

    # -- stage 1: sample level ----------------------------------------------------------------------
    def backward(self, losses: Tensor) -> None:
        """Add this (micro-)batch's gradient contribution; call once per micro-batch.

        Args:
            losses: one loss per sample, shape ``(B,)`` (per-sample methods need this; compute
                the loss with ``reduction='none'``). ``mean()`` and ``micro_batch_clip`` also
                take a scalar mean loss.
        """
        est = self.method.estimator
        losses = check_losses(losses, per_sample=est.per_sample, method=est)
        if est.per_sample and any(m.training for m in self._batchnorms):
            check_no_training_batchnorm(unwrap_model(self.model), repr(est))
        if not self._checked_unused:
            self._check_unused(losses)
        first = self._count == 0
        if self._fsdp is not None:  # FSDP2: the sums go into the shards (_fsdp.py)
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
            contrib, self._est_state = est.contribute(losses, self._est_state, self.layout, self.engine, out)
            if first:  # zeros for a parameter nothing reached
                for p, o in zip(self.params, fill_missing(out, self.params)):
                    p.grad = o
        self._count += contrib.count
        # the mean now (in float64: a bf16 or fp16 mean of many losses would round), so that a
        # later in-place change of the caller's loss tensor cannot change the step's loss
        # (a copy even when the loss already is float64: step() may return it as the reading)
        mean = losses.detach().to(torch.float64, copy=True) if losses.dim() == 0 else losses.detach().double().mean()
        self._losses.append((mean, contrib.count))
        if contrib.clipped is not None:
            self._clipped.append(contrib.clipped)
        if contrib.per_sample_norms is not None:
            self._sample_norms.append(contrib.per_sample_norms)
        if contrib.micro_batch_norm is not None:
            self._micro_norms.append(contrib.micro_batch_norm)

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
        return flags.float().sum() / self._count

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
        """Finish the step: average, all-reduce, check, transform, ``optimizer.step()``."""
        if self._count == 0:
            raise RuntimeError("step() was called before any backward(losses) in this step.")
        grads = [p.grad for p in self.params]
        reports = bool(self._sample_norms or self._micro_norms)
        grad_norm: Tensor | None = None
        if self._fsdp is not None:  # FSDP2: the local shards, and one all-reduce (_fsdp.py)
            grads, count, loss, clipped_sum, grad_norm = self._fsdp.reduce(  # type: ignore[assignment]
                self._count, self._sum_losses(), self._sum_clipped()
            )
            clipped_fraction = (clipped_sum / count).float() if reports else None
            num = int(round(float(count)))
        elif self._group is not None:
            count = self._count_tensor()
            # the scalars travel in float64: a count or loss sum in the gradients' dtype
            # (fp16, bf16) would round or overflow
            scalars = torch.stack([count, self._sum_losses(), self._sum_clipped()])
            _distributed.all_reduce_sum(grads, scalars, self._group)  # type: ignore[arg-type]
            count, loss_sum, clipped_sum = scalars.unbind()
            torch._foreach_div_(grads, count)  # type: ignore[arg-type]
            loss = loss_sum / count
            clipped_fraction = (clipped_sum / count).float() if reports else None
            # the global count is read on the host (one more sync, DDP only)
            num = int(round(float(count)))
        else:
            # one process: the count is a host number, and the readings take as few small
            # operations as they can (each costs microseconds, a step of a small model a few ms)
            torch._foreach_div_(grads, float(self._count))  # type: ignore[arg-type]
            count = None  # as a tensor only if a transform reads it
            loss = self._mean_loss()
            clipped_fraction = self._clipped_fraction() if reports else None
            num = self._count
        # Every DDP process reads the norm of the all-reduced gradient (and decides on its own
        # whether to skip) and transforms that gradient on its own: with the kernels each one
        # timed fastest, or BLAS rounding by memory alignment, they could round differently and
        # the replicas drift apart.
        fixed = _kernels.plain_kernels if self._group is not None else contextlib.nullcontext
        if grad_norm is None:
            with fixed():
                grad_norm = global_norm(grads)  # type: ignore[arg-type]
        info = StepInfo(
            step=self.steps,
            skipped=False,
            num_samples=num,
            loss=loss,
            grad_norm=grad_norm,
            per_sample_norms=torch.cat(self._sample_norms) if self._sample_norms else None,
            micro_batch_norms=torch.cat(self._micro_norms) if self._micro_norms else None,
            clipped_fraction=clipped_fraction,
        )
        # the norm is >= 0 or NaN, so the sum is finite exactly when both are
        if self.check_finite and not bool(torch.isfinite(grad_norm + loss)):
            # One host read per step, as GradScaler does: skipping the optimizer needs it.
            self.skipped_steps += 1
            self._est_state = self._state_at_cycle_start
            torch._foreach_zero_(grads)  # type: ignore[arg-type]
            info.skipped = True
            log.warning(
                "robustclip: non-finite loss or gradient at step %d; skipped it (parameters and "
                "optimizer state unchanged; %d skipped so far).",
                self.steps,
                self.skipped_steps,
            )
        else:
            if self.method.transform.transforms:
                num_t = self._count_tensor() if count is None else count
                ctx = StepContext(self.params, self.layout.names, loss, num_t, self.layout.modules)
                if self._fsdp is not None:  # norms over the shards, spectral via owner ranks
                    ctx = self._fsdp.context(ctx, grad_norm)
                    _, self._tr_state = self._fsdp.transform(self.method.transform, grads, self._tr_state, ctx)  # type: ignore[arg-type]
                else:
                    with fixed():
                        _, self._tr_state = self.method.transform.update(grads, self._tr_state, ctx)  # type: ignore[arg-type]
            self.optimizer.step()
            info.transforms = self.method.transform.readings(self._tr_state)
        self.steps += 1
        self.last = info
        self._reset_cycle()
        return info

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

