"""robustclip in Lightning: a Callback for batch-level methods, a LightningModule mixin for any.

Batch-level methods (``clip_by_global_norm``, ``spectral_clip``, ... on the mean gradient) need
no change to the module, one callback::

    trainer = L.Trainer(callbacks=[RobustClipCallback(rc.clip_by_global_norm(1.0))])

Per-sample and micro-batch methods compute the gradient themselves, from one loss per sample:
mix :class:`RobustClipModule` in first, name the method and return the per-sample losses::

    class Model(RobustClipModule, L.LightningModule):
        def configure_robustclip(self):
            return rc.per_sample_clip(1.0)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y, reduction="none")   # shape (B,)

What happens inside Lightning's loop:

* Lightning's gradient accumulation (``accumulate_grad_batches``) gives robustclip's micro-batches:
  each ``training_step`` is one ``clipper.backward``; ``micro_batch_clip`` clips each of them.
* The clipper finishes the gradient at ``on_before_optimizer_step`` (after AMP unscaling):
  average, all-reduce under DDP (the module's ``DistributedDataParallel`` wrapper from the
  strategy), finite check, batch-level transforms; then Lightning steps the optimizer.
* Lightning's own clipping (``gradient_clip_val``) is turned off, with a warning.
* A non-finite step is skipped: ``p.grad`` is ``None`` for every parameter, so the optimizer
  step changes neither the parameters nor its state, and the step-interval LR schedulers do not
  tick (fp16 AMP: the loss scaler sees the overflow and skips the step itself).
* Readings are logged with ``pl_module.log`` under ``robustclip/`` (``grad_norm`` before clipping,
  ``clipped_fraction``, ``skipped_steps``, transforms' scalar readings, and ``layer_norm/<layer>``
  at the steps Lightning writes to its loggers); they stay device tensors until Lightning writes
  them, every ``log_every_n_steps``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from robustclip._clipper import Clipper, StepInfo
from robustclip._estimators import Mean
from robustclip._method import as_method
from robustclip.integrations._common import missing

try:
    import lightning.pytorch as pl
except ImportError as e:
    raise missing("lightning", "lightning") from e

__all__ = ["RobustClipCallback", "RobustClipModule"]


class RobustClipCallback(pl.Callback):
    """Finish each step's gradient with a robustclip method, before Lightning's optimizer step.

    Args:
        method: a batch-level method (transforms on the mean gradient), or, when the module is a
            :class:`RobustClipModule`, any method (the mixin passes its own).
        log_layer_norms: log each layer's gradient norm (before the transforms) at the steps
            Lightning writes to its loggers.
        clipper_options: more keyword arguments for :class:`robustclip.Clipper`
            (``check_finite``, ``allow_unused``).
    """

    def __init__(
        self,
        method: Any = None,
        *,
        log_layer_norms: bool = True,
        clipper_options: dict[str, Any] | None = None,
    ) -> None:
        self.method = as_method(method)
        self.log_layer_norms = bool(log_layer_norms)
        self.clipper_options = dict(clipper_options or {})
        self.clipper: Clipper | None = None
        self.last: StepInfo | None = None
        self._skip_pending = False
        self._pending_state: dict[str, Any] | None = None

    # -- set-up -----------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        own = isinstance(pl_module, RobustClipModule)
        if not own and not isinstance(self.method.estimator, Mean):
            raise TypeError(
                f"{self.method.estimator!r} computes the gradient from one loss per sample, which "
                "a callback cannot get: mix robustclip.integrations.lightning.RobustClipModule "
                "into the LightningModule and return per-sample losses from training_step."
            )
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"robustclip drives one optimizer, the module configured {len(trainer.optimizers)}."
            )
        if own and getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"{self.method!r} computes the gradient itself and cannot use fp16 loss scaling "
                "(the clipping radius would apply to scaled gradients): use precision='bf16-mixed' "
                "or 32."
            )
        if trainer.gradient_clip_val:
            warnings.warn(
                f"robustclip: Trainer(gradient_clip_val={trainer.gradient_clip_val}) is turned off: "
                "the robustclip method clips the gradient; chain rc.clip_by_global_norm(...) to "
                "clip the global norm as well.",
                UserWarning,
                stacklevel=2,
            )
            trainer.gradient_clip_val = None
        if self.clipper is None:
            opt = trainer.optimizers[0]
            params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
            # the strategy's wrapper (DistributedDataParallel under DDP): the clipper all-reduces
            # what it computes itself; a gradient from Lightning's backward is already reduced
            self.clipper = Clipper(trainer.model, None, self.method, params=params, **self.clipper_options)
            if self._pending_state is not None:
                self.clipper.load_state_dict(self._pending_state)
                self._pending_state = None
        self._guard_schedulers(trainer)

    def _guard_schedulers(self, trainer: Any) -> None:
        """A skipped step must not tick a step-interval scheduler; Lightning ticks it after every
        optimizer step, so its ``step`` passes once after a skip."""
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if config.interval != "step" or getattr(sched, "_robustclip_guard", None) is self:
                continue
            original = sched.step

            def step(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                if self._skip_pending:
                    return None
                return _original(*args, **kwargs)

            sched.step = step
            sched._robustclip_guard = self

    # -- the step ---------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        clipper = self.clipper
        assert clipper is not None
        layer_norms = self.log_layer_norms and _will_log(trainer)
        info = clipper.finish(layer_norms=layer_norms)
        self.last = info
        self._skip_pending = info.skipped
        self._log(pl_module, info)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._skip_pending = False

    def _log(self, pl_module: Any, info: StepInfo) -> None:
        assert self.clipper is not None
        kw = {"on_step": True, "on_epoch": False, "batch_size": 1}
        values: dict[str, Any] = {"robustclip/skipped_steps": float(self.clipper.skipped_steps)}
        if not info.skipped:
            if info.grad_norm is not None:
                values["robustclip/grad_norm"] = info.grad_norm.float()
            if info.clipped_fraction is not None:
                values["robustclip/clipped_fraction"] = info.clipped_fraction.float()
            for name, readings in info.transforms.items():
                for key, value in readings.items() if isinstance(readings, dict) else ():
                    if isinstance(value, Tensor) and value.dim() == 0:
                        values[f"robustclip/{name}/{key}"] = value.float()
            if info.layer_norms is not None:
                for name, v in zip(self.clipper.layout.group_names, info.layer_norms.unbind()):
                    values[f"robustclip/layer_norm/{name}"] = v
        for key, value in values.items():
            pl_module.log(key, value, **kw)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"clipper": self.clipper.state_dict()} if self.clipper is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict.get("clipper")


def _will_log(trainer: Any) -> bool:
    """Whether Lightning writes this step's logged values to its loggers."""
    connector = getattr(trainer, "_logger_connector", None)
    should = getattr(connector, "should_update_logs", None)
    return True if should is None else bool(should)


if TYPE_CHECKING:
    # the mixin is always listed before a LightningModule: type-check it as one, so that its
    # calls on super() and its overrides are checked
    _ModuleBase = pl.LightningModule
else:
    _ModuleBase = object


class RobustClipModule(_ModuleBase):
    """LightningModule mixin (list it first): the gradient comes from ``clipper.backward``.

    Define ``configure_robustclip(self)`` to return the method (any robustclip method), and let
    ``training_step`` return one loss per sample, shape ``(B,)`` (or a dict whose ``"loss"`` is).
    The mixin adds a :class:`RobustClipCallback` through ``configure_callbacks`` and routes
    Lightning's backward pass to the clipper; for the callback's options override
    :meth:`configure_robustclip_callback`.
    """

    _rc_losses: Tensor | None = None

    def configure_robustclip(self) -> Any:
        raise NotImplementedError(
            "RobustClipModule: define configure_robustclip(self) to return the robustclip method, "
            "e.g. rc.per_sample_clip(1.0)."
        )

    def configure_robustclip_callback(self) -> RobustClipCallback:
        return RobustClipCallback(self.configure_robustclip())

    def configure_callbacks(self) -> list[pl.Callback]:
        # Lightning lets a module return one callback or a sequence of them
        theirs = super().configure_callbacks()
        callbacks = [theirs] if isinstance(theirs, pl.Callback) else list(theirs or [])
        self._rc_callback = self.configure_robustclip_callback()
        return [*callbacks, self._rc_callback]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Lightning divides training_step's loss by accumulate_grad_batches before backward; the
        # clipper needs the losses themselves (clipping compares each sample's gradient with the
        # radius), so training_step's output is kept as it was returned
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_robustclip_keeps_losses", False):

            @functools.wraps(step)
            def training_step(self: Any, *args: Any, **kw: Any) -> Any:
                out = step(self, *args, **kw)
                loss = out.get("loss") if isinstance(out, Mapping) else out
                self._rc_losses = loss if isinstance(loss, Tensor) else None
                return out

            training_step._robustclip_keeps_losses = True  # type: ignore[attr-defined]  # a mark on a function
            cls.training_step = training_step  # type: ignore[method-assign]  # wraps the subclass's own

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        losses = self._rc_losses
        self._rc_losses = None
        callback = getattr(self, "_rc_callback", None)
        if callback is None or callback.clipper is None:
            raise RuntimeError("RobustClipModule: the robustclip callback was not set up.")
        if losses is None or losses.shape != loss.shape:
            raise RuntimeError(
                "RobustClipModule: backward got a loss that is not training_step's output; return "
                "the per-sample losses (or a dict with them under 'loss') from training_step."
            )
        callback.clipper.backward(losses)
