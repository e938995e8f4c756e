"""label-noise: digits with flipped labels; SGDM vs Clip-SGD vs PS-Clip-SGD at equal wall time.

Nobile & Grohs, "Robust and Fast Training via Per-Sample Clipping" (arXiv:2605.02701), argue
that clipping each sample's gradient makes training robust to samples whose gradients are large
for bad reasons -- here, the share of training labels flipped to a wrong class -- and that this
pays off even after paying for per-sample gradients. This experiment trains the same model with
each method for the same number of epochs, records wall-clock time, and compares test accuracy
(on clean labels) at equal wall time: on each seed, at the total training time of the method
that finished that seed *first*, so the slower per-sample method is charged for its cost. Each
arm also evaluates the untrained model (epoch 0, time 0), the fallback for a method that had
not finished one epoch within the budget.

Per epoch it logs the mean per-sample gradient norm and the fraction clipped (samples for
PS-Clip-SGD, steps for Clip-SGD), the paper's diagnostics.

Each arm's loop is ``examples/train_minimal.py``'s, line for line, with resume added at its
edges: ``ctx.arm`` names what a checkpoint holds (model, optimizer, clipper and the readings
summed so far) and restores it; ``steps_with_batches`` is the example's ``range`` over steps and
mini-batches, starting where the checkpoint stopped, with a sample order fixed by ``(seed,
epoch)`` so a resumed epoch sees the same batches; an :class:`EpochMeter` keeps the example's
running sums (and more readings) in the checkpoint; ``ctx.log`` writes what the example prints;
``arm.finish`` saves the arm's final state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import robustclip as rc
from robustclip.experiments._methods import MethodParams, build_method, check_methods
from robustclip.experiments._plot import Panel, curves, save_panels
from robustclip.experiments._problem import Problem
from robustclip.experiments._run import RunContext, RunData, resolve_device, seed_everything
from robustclip.experiments._train import EpochMeter, TensorBatches, evaluation, steps_with_batches
from robustclip.experiments.data import load_digits
from robustclip.experiments.models import MLP, SmallCNN

DESCRIPTION = "digits, 20% flipped labels: SGDM vs Clip-SGD vs PS-Clip-SGD at equal wall time"
DEFAULT_THREADS = 1  # a tiny model: see run_experiment(threads=...)


@dataclass
class Config:
    methods: tuple[str, ...] = ("SGDM", "Clip-SGD", "PS-Clip-SGD")  # labels from _methods.METHODS
    label_noise: float = 0.2  # share of training labels flipped to another class
    model: str = "mlp"  # "mlp" (64 -> hidden^depth -> 10) or "cnn" (two conv layers on 8x8)
    hidden: int = 128  # width of the MLP's hidden layers
    depth: int = 2  # number of hidden layers of the MLP
    epochs: int = 40
    batch_size: int = 32
    lr: float = 0.05  # SGD step size, the same for every method
    momentum: float = 0.9  # the optimizer's momentum, the same for every method
    clip: float = 1.0  # radius c of Clip-SGD and PS-Clip-SGD
    seeds: int = 3  # independent runs per method (data split, flips and init change)
    seed: int = 0  # first seed
    device: str = "auto"  # "auto": CUDA if available

    def check(self) -> None:
        check_methods(self.methods)
        if self.model not in ("mlp", "cnn"):
            raise ValueError(f"model must be 'mlp' or 'cnn', got {self.model!r}.")
        for k in ("hidden", "depth", "epochs", "batch_size", "seeds"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1, got {getattr(self, k)}.")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}.")


class _DigitsCNN(nn.Module):
    """A small CNN on the 8x8 digits given as 64-vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(in_channels=1, channels=(16, 32), hidden=64, num_classes=10, image_size=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, 8, 8))


def _model(cfg: Config) -> nn.Module:
    if cfg.model == "cnn":
        return _DigitsCNN()
    return MLP([64, *([cfg.hidden] * cfg.depth), 10])


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def problem(cfg: Config) -> Problem:
    """The digits model with ``cfg.label_noise`` of the training labels flipped."""
    split = load_digits(cfg.label_noise, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    return Problem(
        name="label-noise",
        model=_model(cfg),
        train=(split.x_train, split.y_train),
        test=(split.x_test, split.y_test),
        loss_fn=_loss,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
    )


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    arms = [(m, cfg.seed + k) for k in range(cfg.seeds) for m in cfg.methods]
    for method, seed in ctx.iterate(arms, "arms"):
        arm_id = f"{method}/seed{seed}"
        if ctx.is_done(arm_id):  # resume: a finished arm is not trained again
            continue
        tag = {"arm": arm_id, "method": method, "seed": seed}

        # data, model, optimizer and the clipper between them
        split = load_digits(cfg.label_noise, seed=seed)
        train, test = (split.x_train, split.y_train), (split.x_test, split.y_test)
        batches = TensorBatches(*train, cfg.batch_size, seed, device)
        seed_everything(seed)
        model = _model(cfg).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        with rc.Clipper(model, optimizer, build_method(method, MethodParams(clip=cfg.clip))) as clipper:
            # resume: everything the checkpoint holds, restored here if the run stopped mid-arm
            meter = EpochMeter(device)
            arm = ctx.arm(arm_id, {"model": model, "optimizer": optimizer, "clipper": clipper, "meter": meter})
            if arm.start == 0:  # the untrained model at time 0: the equal-time fallback
                ctx.log({**tag, "kind": "epoch", "epoch": 0, "step": 0, "time": 0.0,
                         **evaluation(model, _loss, device, train=train, test=test)})

            # training: resume picks up at arm.start, mid-epoch included
            steps_per_epoch = batches.steps_per_epoch
            meter.start_clock()
            for step, x, y in steps_with_batches(arm, batches, cfg.epochs * steps_per_epoch, arm_id):
                out = model(x)
                losses = _loss(out, y)  # one loss per sample
                clipper.backward(losses)
                info = clipper.step()
                meter.add(info, out, y)
                if (step + 1) % steps_per_epoch == 0:  # an epoch's end: evaluate, off the clock
                    readings = meter.read(step + 1)
                    ctx.log({**tag, "kind": "epoch", "epoch": (step + 1) // steps_per_epoch, **readings,
                             **evaluation(model, _loss, device, train=train, test=test)})
                    meter.start_clock()
            arm.finish()
    return summarize(ctx.records, cfg.methods)


def summarize(records: list[dict[str, Any]], methods: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Final, peak and equal-wall-time test accuracy per method (means over seeds).

    Equal wall time is per seed: the budget of seed ``s`` is the smallest total training time
    among the methods on ``s``, and each method on ``s`` is read at its last evaluation within
    that budget (at worst epoch 0, logged at time 0).
    """
    by: dict[str, dict[int, list[dict[str, Any]]]] = {}  # method -> seed -> epoch records
    for r in records:
        if r.get("kind") == "epoch":
            by.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r)
    methods = [m for m in methods if m in by]
    seeds = sorted({s for m in methods for s in by[m]})
    budget = {s: min(by[m][s][-1]["time"] for m in methods if s in by[m]) for s in seeds}
    out: dict[str, Any] = {"equal_time_budget_s": {str(s): b for s, b in budget.items()}, "methods": {}}
    for m in methods:
        runs = by[m]
        at_budget = []
        for s, rs in runs.items():
            # the last evaluation reached within the seed's budget (the first one if none was)
            ok = [r for r in rs if r["time"] <= budget[s] * (1 + 1e-9)]
            at_budget.append((ok[-1] if ok else rs[0])["test_acc"])
        # the peak of the seed-averaged test accuracy curve, over the epochs every seed reached
        per_epoch: dict[int, list[float]] = {}
        for rs in runs.values():
            for r in rs:
                per_epoch.setdefault(r["epoch"], []).append(r["test_acc"])
        curve = {e: _mean(v) for e, v in per_epoch.items() if len(v) == len(runs)}
        peak_epoch = max(curve, key=lambda e: (curve[e], -e))
        finals = [rs[-1] for rs in runs.values()]
        out["methods"][m] = {
            "test_acc": _mean([r["test_acc"] for r in finals]),
            "test_acc_at_equal_time": _mean(at_budget),
            "peak_test_acc": curve[peak_epoch],
            "peak_epoch": peak_epoch,
            "train_loss": _mean([r["train_loss"] for r in finals]),
            "train_acc_noisy_labels": _mean([r["train_acc"] for r in finals]),
            "time_s": _mean([r["time"] for r in finals]),
            "step_time_ms": 1000 * _mean([r["step_time"] for r in finals]),
            "epochs": finals[-1]["epoch"],
            "seeds": len(runs),
        }
    return out


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def format_summary(summary: dict[str, Any]) -> str:
    rows = [f"{'method':<14}{'test acc':>10}{'acc @ equal time':>18}{'peak acc (epoch)':>18}{'train loss':>12}{'ms/step':>9}"]
    for m, s in summary["methods"].items():
        rows.append(
            f"{m:<14}{s['test_acc']:>10.4f}{s['test_acc_at_equal_time']:>18.4f}"
            f"{s['peak_test_acc']:>12.4f} ({s['peak_epoch']:>2})"
            f"{s['train_loss']:>12.4f}{s['step_time_ms']:>9.2f}"
        )
    budgets = ", ".join(f"seed {k}: {v:.2f} s" for k, v in summary["equal_time_budget_s"].items())
    rows.append(f"(equal wall time per seed, the fastest method's total: {budgets})")
    return "\n".join(rows)


def plot(runs: list[RunData], out_dir: Path) -> list[Path]:
    panels = [
        Panel("test accuracy vs wall time", "training time (s)", "test accuracy", curves(runs, "test_acc", x="time", by="epoch")),
        Panel("test accuracy", "epoch", "test accuracy", curves(runs, "test_acc")),
        Panel("training loss (noisy labels)", "epoch", "loss", curves(runs, "train_loss"), logy=True),
    ]
    diag = [
        Panel("mean per-sample gradient norm", "epoch", "norm", curves(runs, "ps_norm_mean"), logy=True),
        Panel("fraction clipped", "epoch", "fraction", curves(runs, "clipped_fraction")),
    ]
    return [
        save_panels(out_dir / "label_noise.png", panels, "label-noise: digits with flipped labels"),
        save_panels(out_dir / "label_noise_clipping.png", diag, "per-epoch clipping diagnostics"),
    ]
