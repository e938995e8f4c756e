"""robustclip in the Hugging Face ``Trainer``: any robustclip method, the Trainer's loop unchanged.

Two lines change in a ``Trainer`` script::

    from robustclip.integrations.transformers import RobustClipTrainer

    trainer = RobustClipTrainer(model=model, args=args, train_dataset=ds,
                                method=rc.per_sample_clip(1.0))
    trainer.train()

What happens inside the Trainer's loop:

* **Per-sample and micro-batch methods** (``per_sample_clip``, ``per_sample_normalize``,
  ``micro_batch_clip``, alone or chained with transforms) replace the Trainer's backward pass:
  each micro-batch's forward output and labels give one loss per sample
  (:func:`robustclip.losses.per_sample_losses`, or your ``per_sample_loss``), and
  ``clipper.backward`` adds that micro-batch's clipped contribution. The Trainer's gradient
  accumulation steps are robustclip's micro-batches: ``micro_batch_clip`` clips each of them.
* **Batch-level methods** (``clip_by_global_norm``, ``spectral_clip``, ... after ``mean()``) keep
  the Trainer's own backward pass and loss (token-weighted, ``compute_loss_func``, label
  smoothing, fp16 loss scaling).
* Once the gradient is complete (after the last micro-batch, gradients unscaled) the clipper
  finishes it (average, all-reduce under DDP, finite check, transforms) where the Trainer would
  clip it, and the Trainer steps its optimizer as usual. The Trainer's own clipping is off
  (``max_grad_norm`` is set to 0, with a warning if you chose a value).
* A step with a non-finite loss or gradient is skipped as the Trainer skips an fp16 overflow: no
  optimizer step, no LR-scheduler tick, no loss-scaler update, and the parameters and optimizer
  state stay as they were.
* The logs get the norm before clipping as ``grad_norm`` and robustclip's readings
  (``robustclip/clipped_fraction``, ``robustclip/skipped_steps``, ``robustclip/layer_norm/<layer>``
  and the transforms' readings, see :class:`robustclip.integrations._common.Readings`) at the
  Trainer's logging steps; other steps read nothing from the device except the finite check.

For another ``Trainer`` subclass (TRL's ``SFTTrainer``, ...) put :class:`RobustClipMixin` first:
``class MyTrainer(RobustClipMixin, SFTTrainer): pass``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from robustclip._clipper import Clipper, StepInfo
from robustclip._estimators import Mean
from robustclip._method import as_method
from robustclip.integrations._common import Readings, missing
from robustclip.losses import per_sample_losses

try:
    import transformers
except ImportError as e:
    raise missing("transformers", "transformers") from e

__all__ = ["CLIPPER_STATE", "RobustClipMixin", "RobustClipTrainer"]

#: the file in each checkpoint directory that holds the clipper's state
CLIPPER_STATE = "robustclip_clipper.pt"

#: ``per_sample_loss(outputs, inputs) -> (B,)``: one loss per sample of a micro-batch
PerSampleLoss = Callable[[Any, dict[str, Any]], Tensor]

if TYPE_CHECKING:
    # the mixin is always listed before a Trainer: type-check it as one, so that its calls on
    # super() and on the Trainer's own methods are checked
    _TrainerBase = transformers.Trainer
else:
    _TrainerBase = object


class RobustClipMixin(_TrainerBase):
    """Adds a robustclip method to a ``transformers.Trainer`` (sub)class; list it first.

    Keyword arguments (besides the Trainer's own):
        method: any robustclip method (``rc.per_sample_clip(1.0)``, ``rc.clip_by_global_norm(1.0)``,
            ``rc.chain(...)``); ``None`` is the plain mean gradient.
        per_sample_loss: ``fn(outputs, inputs) -> (B,)`` for per-sample and micro-batch methods;
            default: :func:`robustclip.losses.per_sample_losses` from ``outputs`` and
            ``inputs["labels"]``, with the task inferred from the model's head.
        log_layer_norms: log each layer's gradient norm before the transforms at logging steps.
        clipper_options: more keyword arguments for :class:`robustclip.Clipper`
            (``check_finite``, ``allow_unused``).
    """

    #: the Trainer's accelerate-prepared optimizer: the mixin checks for its overflow flag and
    #: replaces its ``step``, neither of which a plain ``torch.optim.Optimizer`` has
    optimizer: Any

    def __init__(
        self,
        *args: Any,
        method: Any = None,
        per_sample_loss: PerSampleLoss | None = None,
        log_layer_norms: bool = True,
        clipper_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.robustclip_method = as_method(method)
        self.per_sample_loss = per_sample_loss
        self.log_layer_norms = bool(log_layer_norms)
        self._rc_options = dict(clipper_options or {})
        for key in ("params", "distributed", "process_group"):
            if key in self._rc_options:
                raise ValueError(f"clipper_options may not set {key!r}: the Trainer decides it.")
        self.clipper: Clipper | None = None
        self._rc_readings: Readings | None = None
        self._rc_info: StepInfo | None = None
        self._rc_resume: dict[str, Any] | None = None
        self._rc_optimizer: Any = None
        self._rc_stepping = False
        # the Trainer's own clipping would clip the already clipped gradient a second time
        max_norm = self.args.max_grad_norm
        if max_norm:
            default = {f.name: f.default for f in dataclasses.fields(type(self.args))}.get("max_grad_norm")
            if max_norm != default:
                warnings.warn(
                    f"RobustClipTrainer: TrainingArguments.max_grad_norm={max_norm} is ignored (set "
                    "to 0): robustclip's method clips the gradient; to clip the global norm as "
                    f"well, chain it: rc.chain(method, rc.clip_by_global_norm({max_norm})).",
                    UserWarning,
                    stacklevel=2,
                )
            self.args.max_grad_norm = 0.0

    # -- who computes the gradient ----------------------------------------------------------------
    @property
    def _rc_own_backward(self) -> bool:
        """Per-sample and micro-batch estimators compute the gradient; mean() leaves it to the
        Trainer's backward pass."""
        return not isinstance(self.robustclip_method.estimator, Mean)

    def _rc_setup(self, model: nn.Module) -> Clipper:
        # one clipper per optimizer: train() again keeps the Trainer's optimizer (and its state),
        # and so the clipper; a new optimizer gets a new clipper
        if self.clipper is None or self._rc_optimizer is not self.optimizer:
            if self.clipper is not None:
                self.clipper.close()
            self.clipper = self._rc_build(model)
        if self._rc_resume is not None:  # a checkpoint being resumed
            self.clipper.load_state_dict(self._rc_resume)
            self._rc_resume = None
        return self.clipper

    def _rc_build(self, model: nn.Module) -> Clipper:
        if self._rc_own_backward and getattr(self.accelerator, "scaler", None) is not None:
            raise ValueError(
                f"{self.robustclip_method!r} computes the gradient itself and cannot use fp16 "
                "loss scaling (the clipping radius would apply to scaled gradients); train with "
                "bf16=True, or in fp32."
            )
        if not hasattr(self.optimizer, "_is_overflow"):
            raise TypeError(
                f"RobustClipTrainer needs the Trainer's accelerate-prepared optimizer, got "
                f"{type(self.optimizer).__name__} (DeepSpeed and SageMaker model parallelism "
                "step their own optimizer and are not supported)."
            )
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        clipper = Clipper(model, None, self.robustclip_method, params=params, **self._rc_options)
        self._rc_readings = Readings(clipper.layout.group_names)
        self._rc_optimizer = self.optimizer
        self._rc_guard_optimizer()
        return clipper

    def _rc_guard_optimizer(self) -> None:
        """The Trainer calls ``optimizer.step()`` unconditionally: on a skipped step it does
        nothing and tells accelerate that the step was skipped, as after an fp16 overflow, so
        that the Trainer leaves the LR scheduler alone (and the loss scaler is never updated)."""
        opt = self.optimizer
        original = opt.step

        def step(this: Any, *args: Any, **kwargs: Any) -> Any:
            if self._rc_stepping:  # a guard further out (an optimizer wrapped again) decided
                return original(*args, **kwargs)
            info = self._rc_info if self._rc_info is not None else self._rc_finish(None)
            self._rc_info = None
            if info.skipped:
                this._is_overflow = True
                return None
            this._is_overflow = False  # reset when no scaler does; a scaler sets it itself
            self._rc_stepping = True
            try:
                return original(*args, **kwargs)
            finally:
                self._rc_stepping = False

        # an LR scheduler built on this optimizer marked its step to check the call order;
        # the mark stays (the call still goes through to it), and a bound method lets a
        # scheduler built later wrap this step in turn
        if hasattr(original, "_wrapped_by_lr_sched"):
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # torch's own mark on a function
        opt.step = types.MethodType(step, opt)

    # -- the Trainer's hooks ------------------------------------------------------------------------
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        clipper = self._rc_setup(model)
        if not self._rc_own_backward:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            losses = self.compute_per_sample_losses(model, inputs)
        clipper.backward(losses)
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        # the Trainer sums this over micro-batches and divides by the steps when it logs
        return losses.detach().mean() / steps

    def compute_per_sample_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """One loss per sample of this micro-batch, shape ``(B,)``. Override for other losses."""
        outputs = model(**inputs)
        if self.per_sample_loss is not None:
            return self.per_sample_loss(outputs, inputs)
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                f"{self.robustclip_method!r} needs one loss per sample, but the batch has no "
                "'labels'; pass per_sample_loss=fn(outputs, inputs) -> (B,) to the trainer."
            )
        return per_sample_losses(outputs, labels, model=model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """Where the Trainer reads the norm, once per optimizer step before ``optimizer.step()``:
        the clipper finishes the gradient here, and the Trainer logs its norm before clipping."""
        self._rc_info = self._rc_finish(model)
        return self._rc_info.grad_norm

    def _rc_finish(self, model: nn.Module | None) -> StepInfo:
        clipper = self.clipper
        if clipper is None:
            raise RuntimeError("robustclip: the optimizer stepped before any training step.")
        if not self._rc_own_backward:
            # fp16: the clipper and its transforms work on the true gradient
            self.accelerator.unscale_gradients()
        info = clipper.finish(layer_norms=self.log_layer_norms and self._rc_will_log())
        assert self._rc_readings is not None
        self._rc_readings.add(info)
        return info

    def _rc_will_log(self) -> bool:
        """Whether the step being finished is a logging step (when the Trainer logs by steps)."""
        strategy = str(getattr(self.args.logging_strategy, "value", self.args.logging_strategy))
        if strategy != "steps":
            return True
        step = self.state.global_step + 1
        every = getattr(self.state, "logging_steps", None) or self.args.logging_steps
        every = int(every) if every and every >= 1 else 1
        return step % every == 0 or (self.args.logging_first_step and step == 1)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # training logs carry "loss"; evaluation and the final summary do not
        if self._rc_readings is not None and "loss" in logs:
            logs = {**logs, **self._rc_readings.flush()}
        super().log(logs, *args, **kwargs)


    # -- checkpoints: the clipper's state (adaptive radii, transform states, counters) -------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.clipper is not None and self.args.should_save:
            torch.save(self.clipper.state_dict(), os.path.join(output_dir, CLIPPER_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, CLIPPER_STATE) if checkpoint else None
        if path is not None and os.path.isfile(path):
            # applied when the clipper is built for this run, at its first training step
            self._rc_resume = torch.load(path, weights_only=True, map_location="cpu")


class RobustClipTrainer(RobustClipMixin, transformers.Trainer):
    """``transformers.Trainer`` with a robustclip method (see :class:`RobustClipMixin`)."""
