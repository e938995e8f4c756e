"""label-noise: digits with flipped labels; SGDM vs Clip-SGD vs PS-Clip-SGD at equal wall time.

Nobile & Grohs, "Robust and Fast Training via Per-Sample Clipping" (arXiv:2605.02701), argue
that clipping each sample's gradient makes training robust to samples whose gradients are large
for bad reasons -- here, the share of training labels flipped to a wrong class -- and that this
pays off even after paying for per-sample gradients. This experiment trains the same model with
each method for the same number of epochs, records wall-clock time, and compares test accuracy
(on clean labels) at the wall time of the *fastest* method, so the slower per-sample method is
charged for its cost.

Per epoch it logs the mean per-sample gradient norm and the fraction clipped (samples for
PS-Clip-SGD, steps for Clip-SGD), the paper's diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustclip.data import load_digits
from robustclip.experiments._methods import MethodParams, build_method, check_methods
from robustclip.experiments._plot import Panel, curves, save_panels
from robustclip.experiments._problem import Problem
from robustclip.experiments._run import RunContext, RunData, resolve_device
from robustclip.experiments._train import ArmSpec, TensorBatches, fit
from robustclip.models import MLP, SmallCNN

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
    )


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    arms = [(m, cfg.seed + k) for k in range(cfg.seeds) for m in cfg.methods]
    for method, seed in ctx.iterate(arms, "arms"):
        split = load_digits(cfg.label_noise, seed=seed)
        fit(ctx, ArmSpec(
            arm_id=f"{method}/seed{seed}",
            method_label=method,
            build_model=lambda: _model(cfg),
            method=build_method(method, MethodParams(clip=cfg.clip)),
            lr=cfg.lr, momentum=cfg.momentum, epochs=cfg.epochs, seed=seed, loss_fn=_loss,
            batches=TensorBatches(split.x_train, split.y_train, cfg.batch_size, seed, device),
            test=(split.x_test, split.y_test),
            train_eval=(split.x_train, split.y_train),
            device=device,
            extra={"seed": seed},
        ))
    return summarize(ctx.records, cfg.methods)


def summarize(records: list[dict[str, Any]], methods: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Final and equal-wall-time test accuracy per method (means over seeds)."""
    epochs = [r for r in records if r.get("kind") == "epoch"]
    by: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in epochs:
        by.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r)
    totals = {m: _mean([rs[-1]["time"] for rs in by[m].values()]) for m in methods if m in by}
    budget = min(totals.values()) if totals else 0.0
    out: dict[str, Any] = {"equal_time_budget_s": budget, "methods": {}}
    for m in methods:
        if m not in by:
            continue
        runs = list(by[m].values())
        at_budget = []
        for rs in runs:
            # the last evaluation reached within the budget (the first one if none was)
            ok = [r for r in rs if r["time"] <= budget * (1 + 1e-9)]
            at_budget.append((ok[-1] if ok else rs[0])["test_acc"])
        out["methods"][m] = {
            "test_acc": _mean([rs[-1]["test_acc"] for rs in runs]),
            "test_acc_at_equal_time": _mean(at_budget),
            "train_loss": _mean([rs[-1]["train_loss"] for rs in runs]),
            "train_acc_noisy_labels": _mean([rs[-1]["train_acc"] for rs in runs]),
            "time_s": totals[m],
            "step_time_ms": 1000 * _mean([rs[-1]["step_time"] for rs in runs]),
            "epochs": rs[-1]["epoch"],
            "seeds": len(runs),
        }
    return out


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def format_summary(summary: dict[str, Any]) -> str:
    rows = [f"{'method':<14}{'test acc':>10}{'acc @ equal time':>18}{'train loss':>12}{'ms/step':>9}"]
    for m, s in summary["methods"].items():
        rows.append(
            f"{m:<14}{s['test_acc']:>10.4f}{s['test_acc_at_equal_time']:>18.4f}"
            f"{s['train_loss']:>12.4f}{s['step_time_ms']:>9.2f}"
        )
    rows.append(f"(equal wall time = {summary['equal_time_budget_s']:.2f} s, the fastest method's)")
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
