"""The supervised training loop the classification experiments share.

One *arm* trains one model with one method for a number of epochs, through ``rc.Clipper``::

    clipper = rc.Clipper(model, torch.optim.SGD(...), method)
    for x, y in batches:
        clipper.backward(loss_fn(model(x), y))   # per-sample losses, shape (B,)
        clipper.step()

Data order is a function of ``(seed, epoch)`` only, so a resumed arm sees exactly the batches an
uninterrupted one would. Readings stay on the device and are summed there; the host reads them
once per ``log_every`` steps and at each epoch's end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import robustclip as rc
from robustclip.experiments._run import RunContext, seed_everything

__all__ = ["ArmSpec", "TensorBatches", "check_amp", "clip_reading", "evaluate", "fit", "steps_with_batches"]


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The sample order of ``epoch``: a permutation that depends on ``(seed, epoch)`` only."""
    g = torch.Generator().manual_seed(1_000_003 * int(seed) + int(epoch))
    return torch.randperm(n, generator=g)


class TensorBatches:
    """Mini-batches of in-memory tensors (the last partial batch is dropped)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int, device: torch.device) -> None:
        if batch_size < 1 or batch_size > x.shape[0]:
            raise ValueError(f"batch_size must be in [1, {x.shape[0]}] for this data, got {batch_size}.")
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.steps_per_epoch = x.shape[0] // batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        perm = epoch_permutation(self.x.shape[0], self.seed, epoch).to(self.device)
        for b in range(start, self.steps_per_epoch):
            idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch_size: int = 1024,
    device: torch.device | None = None,
    amp: bool = False,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)``, in evaluation mode."""
    was = model.training
    model.eval()
    dev = device or next(model.parameters()).device
    tot_loss = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.float64, device=dev)
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(dev, non_blocking=True), y[i : i + batch_size].to(dev, non_blocking=True)
        with _autocast(dev, amp):
            out = model(xb)
        out = out.float()
        tot_loss += loss_fn(out, yb).double().sum()
        correct += (out.argmax(1) == yb).double().sum()
    model.train(was)
    n = max(x.shape[0], 1)
    return float(tot_loss) / n, float(correct) / n


def check_amp(device: torch.device) -> None:
    """``amp`` means bfloat16 autocast; refuse a GPU without bfloat16 (float16 would need a
    ``GradScaler``, whose loss scaling the per-sample norms and clip radii would see)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            "amp=true uses bfloat16 autocast, which this GPU does not support; set amp=false."
        )


def _autocast(device: torch.device, amp: bool) -> Any:
    if not amp:
        return contextlib.nullcontext()
    check_amp(device)
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class ArmSpec:
    """Everything one arm of a classification experiment needs."""

    arm_id: str
    method_label: str
    build_model: Callable[[], nn.Module]
    method: Any
    lr: float
    momentum: float
    epochs: int
    seed: int
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batches: Any  # TensorBatches or anything with .steps_per_epoch and .epoch(epoch, start)
    test: tuple[Tensor, Tensor] | None = None
    train_eval: tuple[Tensor, Tensor] | None = None  # data for the full training loss, if wanted
    weight_decay: float = 0.0
    nesterov: bool = False
    device: torch.device = torch.device("cpu")
    amp: bool = False
    cosine: bool = False  # cosine learning-rate decay to 0 over the run
    log_every: int = 0  # also log a "step" record every this many steps (0: epochs only)
    eval_batch: int = 1024
    extra: dict[str, Any] | None = None  # added to every record (e.g. the seed, the lr)
    #: also log an epoch-0 record (train/test evaluation of the untrained model, time 0)
    eval_at_start: bool = False
    #: called as ``on_epoch(model, epoch)`` at each epoch's end (and before training, epoch 0,
    #: which implies ``eval_at_start``); its dict is added to the epoch record (e.g. the
    #: strong-growth constant of the sgc experiment)
    on_epoch: Callable[[nn.Module, int], dict[str, Any]] | None = None


def steps_with_batches(arm: Any, batches: Any, total: int, desc: str) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``arm.steps(total)`` with each step's mini-batch ``(step, x, y)``.

    Step ``s`` takes batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, so a run
    resumed mid-epoch continues with the very batch an uninterrupted one would take.
    """
    spe = batches.steps_per_epoch
    it: Iterator[tuple[Tensor, Tensor]] | None = None
    for step in arm.steps(total, desc=desc):
        epoch, b = divmod(step, spe)
        if it is None or b == 0:
            it = batches.epoch(epoch, b)
        x, y = next(it)
        yield step, x, y


def fit(ctx: RunContext, spec: ArmSpec) -> dict[str, Any] | None:
    """Train one arm, logging an ``epoch`` record per epoch; returns the last epoch's record.

    Returns None if the arm was already finished in a resumed run.
    """
    if ctx.is_done(spec.arm_id):
        return None
    seed_everything(spec.seed)
    model = spec.build_model().to(spec.device)
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
        nesterov=spec.nesterov and spec.momentum > 0,
    )
    spe = spec.batches.steps_per_epoch
    total = spe * spec.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1)) if spec.cosine else None
    objects: dict[str, Any] = {"model": model, "optimizer": opt}
    if sched is not None:
        objects["scheduler"] = sched
    base = {"arm": spec.arm_id, "method": spec.method_label, **(spec.extra or {})}
    last: dict[str, Any] | None = None
    with rc.Clipper(model, opt, spec.method) as clipper:
        objects["clipper"] = clipper
        arm = ctx.arm(spec.arm_id, objects, state=_fresh_epoch_state(spec.device))
        arm.state.setdefault("train_time", 0.0)
        if arm.start == 0 and (spec.eval_at_start or spec.on_epoch is not None):
            ctx.log({**base, "kind": "epoch", "epoch": 0, "step": 0, "time": 0.0, **_initial(spec, model)})
        t_epoch = time.perf_counter()
        for step, x, y in steps_with_batches(arm, spec.batches, total, spec.arm_id):
            with _autocast(spec.device, spec.amp):
                out = model(x)
            out = out.float()
            losses = spec.loss_fn(out, y)
            if out.dim() == 2 and y.dim() == 1:  # classification: count correct answers on the device
                arm.state["correct"] += (out.detach().argmax(1) == y).sum()
                arm.state["seen"] += y.shape[0]
            clipper.backward(losses)
            info = clipper.step()
            if sched is not None:
                sched.step()
            _accumulate(arm.state, info)
            if spec.log_every and (step + 1) % spec.log_every == 0:
                ctx.log({**base, "kind": "step", "step": step + 1, **_step_reading(info)})
            if (step + 1) % spe == 0:
                if spec.device.type == "cuda":
                    torch.cuda.synchronize(spec.device)
                arm.state["train_time"] += time.perf_counter() - t_epoch
                last = _end_epoch(ctx, spec, model, arm.state, base, (step + 1) // spe, step + 1)
                t_epoch = time.perf_counter()
        arm.finish()
    return last


def _initial(spec: ArmSpec, model: nn.Module) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    if spec.train_eval is not None:
        rec["train_loss"], rec["train_acc"] = evaluate(model, *spec.train_eval, spec.loss_fn, spec.eval_batch, spec.device, spec.amp)
    if spec.test is not None:
        rec["test_loss"], rec["test_acc"] = evaluate(model, *spec.test, spec.loss_fn, spec.eval_batch, spec.device, spec.amp)
    if spec.on_epoch is not None:
        rec.update(spec.on_epoch(model, 0))
    return rec


def _fresh_epoch_state(device: torch.device) -> dict[str, Any]:
    z = torch.zeros((), dtype=torch.float64, device=device)
    return {
        "loss_sum": z.clone(),
        "norm_sum": z.clone(),
        "clip_sum": z.clone(),
        "correct": torch.zeros((), dtype=torch.int64, device=device),
        "seen": 0,
        "samples": 0,
        "steps": 0,
        "skipped": 0,  # steps the clipper skipped (non-finite loss or gradient)
        "clip_steps": 0,  # steps with a clipping reading (none for SGD, SGDM, NSGD)
    }


def clip_reading(info: rc.StepInfo) -> Tensor | None:
    """This step's share clipped, or None if the method does not clip.

    Samples (per-sample clipping), micro-batches (micro-batch clipping), the step itself (0 or
    1, global norm clipping) or weight matrices (spectral clipping); device tensors, no sync.
    """
    if info.clipped_fraction is not None:
        return info.clipped_fraction
    tr = info.transforms or {}
    if "clip_by_global_norm" in tr:
        return tr["clip_by_global_norm"]["clipped"]
    if "spectral_clip" in tr:
        return tr["spectral_clip"]["clipped_fraction"]
    return None


def _accumulate(state: dict[str, Any], info: rc.StepInfo) -> None:
    # device tensors only: no host read per step (``skipped`` is a bool the clipper already read)
    state["steps"] += 1
    if info.skipped:
        # nothing was applied; its loss is not finite and would poison the epoch's mean
        state["skipped"] += 1
        return
    if info.loss is not None:
        state["loss_sum"] += info.loss.double()
    if info.per_sample_norms is not None:
        state["norm_sum"] += info.per_sample_norms.double().sum()
        state["samples"] += int(info.per_sample_norms.numel())
    clipped = clip_reading(info)
    if clipped is not None:
        state["clip_sum"] += clipped.double()
        state["clip_steps"] += 1


def _step_reading(info: rc.StepInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"loss": info.loss, "grad_norm": info.grad_norm, "skipped": info.skipped}
    if info.per_sample_norms is not None:
        out["ps_norm_mean"] = info.per_sample_norms.mean()
        out["ps_norm_max"] = info.per_sample_norms.max()
    if info.clipped_fraction is not None:
        out["clipped_fraction"] = info.clipped_fraction
    return out


def _end_epoch(
    ctx: RunContext, spec: ArmSpec, model: nn.Module, state: dict[str, Any], base: dict[str, Any],
    epoch: int, step: int,
) -> dict[str, Any]:
    applied = state["steps"] - state["skipped"]
    rec: dict[str, Any] = {
        **base, "kind": "epoch", "epoch": epoch, "step": step,
        # the mean over the steps applied (NaN if the method skipped every step: it diverged)
        "batch_loss": float(state["loss_sum"]) / applied if applied else float("nan"),
        "skipped_steps": state["skipped"],
        "time": state["train_time"],
        "step_time": state["train_time"] / max(step, 1),
    }
    if state["clip_steps"]:
        rec["clipped_fraction"] = float(state["clip_sum"]) / state["clip_steps"]
    if state["seen"]:
        rec["batch_acc"] = int(state["correct"]) / state["seen"]
    if state["samples"]:
        rec["ps_norm_mean"] = float(state["norm_sum"]) / state["samples"]
    if spec.train_eval is not None:
        rec["train_loss"], rec["train_acc"] = evaluate(model, *spec.train_eval, spec.loss_fn, spec.eval_batch, spec.device, spec.amp)
    if spec.test is not None:
        rec["test_loss"], rec["test_acc"] = evaluate(model, *spec.test, spec.loss_fn, spec.eval_batch, spec.device, spec.amp)
    if spec.on_epoch is not None:
        rec.update(spec.on_epoch(model, epoch))
    ctx.log(rec)
    state.update({k: v for k, v in _fresh_epoch_state(spec.device).items()})
    return rec
