"""Pieces the experiments' training loops share: batches, evaluation, per-epoch readings.

Every experiment writes its own loop, in the shape of ``examples/train_minimal.py``; these are
the parts that would otherwise be copied into each. None of them runs a loop:

* :class:`TensorBatches` and :func:`steps_with_batches`: the mini-batch of each step, with a
  sample order that depends on ``(seed, epoch)`` only, so a resumed arm sees exactly the batches
  an uninterrupted one would;
* :func:`evaluation`: loss and accuracy on whole data sets, in evaluation mode;
* :class:`EpochMeter`: an epoch's step readings summed on the device (the host reads them once
  per epoch) and the training clock, checkpointed with the arm;
* :func:`autocast`, :func:`check_amp`: bfloat16 autocast for the ``amp`` option.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

import robustclip as rc

__all__ = [
    "EpochMeter", "TensorBatches", "autocast", "check_amp", "clip_reading", "epoch_permutation", "evaluate",
    "evaluation", "step_reading", "steps_with_batches",
]


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
        with autocast(dev, amp):
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


def autocast(device: torch.device, amp: bool) -> Any:
    """bfloat16 autocast on ``device`` when ``amp``, else a context that does nothing."""
    if not amp:
        return contextlib.nullcontext()
    check_amp(device)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def evaluation(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    device: torch.device,
    *,
    amp: bool = False,
    batch_size: int = 1024,
    **sets: tuple[Tensor, Tensor],
) -> dict[str, float]:
    """``{"NAME_loss": ..., "NAME_acc": ...}`` for each named set, in the order given.

    Example: ``evaluation(model, loss_fn, device, train=(x, y), test=(xt, yt))``.
    """
    out: dict[str, float] = {}
    for name, (x, y) in sets.items():
        out[f"{name}_loss"], out[f"{name}_acc"] = evaluate(model, x, y, loss_fn, batch_size, device, amp)
    return out


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


class EpochMeter:
    """One arm's step readings summed over an epoch on the device, and its training clock.

    ``add(info, out, y)`` after each ``clipper.step()`` reads nothing on the host; ``read(step)``
    at an epoch's end returns the epoch's readings (one host read), stops the clock and starts
    the next epoch's sums. Register the meter with the arm (``ctx.arm(id, {..., "meter":
    meter})``): its ``state_dict`` is checkpointed, so a resumed arm continues its sums exactly.

    The clock runs between :meth:`start_clock` and :meth:`read`, so evaluation between an
    epoch's ``read`` and the next ``start_clock`` is not training time.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.train_time = 0.0  # seconds of training so far, over every epoch
        self._t0: float | None = None
        self._zero()

    def _zero(self) -> None:
        z = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_sum, self.norm_sum, self.clip_sum = z, z.clone(), z.clone()
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = 0  # samples whose prediction was scored (classification only)
        self.samples = 0  # per-sample norms summed
        self.steps = 0
        self.skipped = 0  # steps the clipper skipped (non-finite loss or gradient)
        self.clip_steps = 0  # steps with a clipping reading (none for SGD, SGDM, NSGD)

    def start_clock(self) -> None:
        self._t0 = time.perf_counter()

    def add(self, info: rc.StepInfo, out: Tensor | None = None, y: Tensor | None = None) -> None:
        """Add one step's readings; with outputs ``out`` and integer labels ``y``, its hits."""
        self.steps += 1
        if out is not None and y is not None and out.dim() == 2 and y.dim() == 1:
            self.correct += (out.detach().argmax(1) == y).sum()
            self.seen += y.shape[0]
        if info.skipped:
            # nothing was applied; its loss is not finite and would poison the epoch's mean
            self.skipped += 1
            return
        if info.loss is not None:
            self.loss_sum += info.loss.double()
        if info.per_sample_norms is not None:
            self.norm_sum += info.per_sample_norms.double().sum()
            self.samples += int(info.per_sample_norms.numel())
        clipped = clip_reading(info)
        if clipped is not None:
            self.clip_sum += clipped.double()
            self.clip_steps += 1

    def read(self, step: int) -> dict[str, Any]:
        """The epoch's readings as record fields (``step`` is the arm's step count so far)."""
        if self._t0 is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.train_time += time.perf_counter() - self._t0
            self._t0 = None
        applied = self.steps - self.skipped
        rec: dict[str, Any] = {
            "step": step,
            # the mean over the steps applied (NaN if the method skipped every step: it diverged)
            "batch_loss": float(self.loss_sum) / applied if applied else float("nan"),
            "skipped_steps": self.skipped,
            "time": self.train_time,
            "step_time": self.train_time / max(step, 1),
        }
        if self.clip_steps:
            rec["clipped_fraction"] = float(self.clip_sum) / self.clip_steps
        if self.seen:
            rec["batch_acc"] = int(self.correct) / self.seen
        if self.samples:
            rec["ps_norm_mean"] = float(self.norm_sum) / self.samples
        self._zero()
        return rec

    _FIELDS = ("loss_sum", "norm_sum", "clip_sum", "correct", "seen", "samples", "steps", "skipped", "clip_steps", "train_time")

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._FIELDS:
            v = state[k]
            # tensors come back on the CPU from a checkpoint; the sums live on the device
            setattr(self, k, v.to(self.device) if isinstance(v, Tensor) else v)


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


def step_reading(info: rc.StepInfo) -> dict[str, Any]:
    """One step's readings as record fields (device tensors: ``ctx.log`` reads them)."""
    out: dict[str, Any] = {"loss": info.loss, "grad_norm": info.grad_norm, "skipped": info.skipped}
    if info.per_sample_norms is not None:
        out["ps_norm_mean"] = info.per_sample_norms.mean()
        out["ps_norm_max"] = info.per_sample_norms.max()
    if info.clipped_fraction is not None:
        out["clipped_fraction"] = info.clipped_fraction
    return out
