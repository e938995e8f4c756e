"""sgc: strong growth in an interpolating MLP, and the largest stable step size of each method.

Lobanov & Koloskova, "Avoiding Bias in Clipped SGD for Overparameterized Models under
Generalized Smoothness" (arXiv:2605.14800), show that when the model can interpolate its data
the strong growth condition ``E ||grad f_i(x)||^2 <= rho ||grad f(x)||^2`` holds, and that ClipSGD
(``x <- x - gamma min(1, c/||g||) g``) and NSGD (``x <- x - gamma g/||g||``) then converge without
the bias clipping usually brings, while -- under (L0, L1)-smoothness -- tolerating step sizes at
which plain SGD diverges.

Two parts, on scikit-learn's digits with clean labels and an over-parameterized MLP
(64 -> 512 -> 512 -> 10, about 300k parameters for 1348 training images):

1. ``main``: each method at the same step size; per epoch the training loss, test accuracy and
   ``rho_hat = (1/N) sum_i ||grad f_i||^2 / ||grad f||^2`` over the whole training set (via
   :func:`robustclip.diagnostics.estimate_strong_growth`).
2. ``sweep``: each method over a grid of step sizes for ``sweep_epochs`` epochs; a step size is
   *stable* when the final training loss is finite and below ``stable_ratio`` times the
   initial one. The summary reports the largest stable step size of each method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import robustclip as rc
from robustclip.experiments._methods import MethodParams, build_method, check_methods
from robustclip.experiments._plot import Panel, Series, color_for, curves, save_panels
from robustclip.experiments._problem import Problem
from robustclip.experiments._run import RunContext, RunData, resolve_device, seed_everything
from robustclip.experiments._train import EpochMeter, TensorBatches, evaluation, steps_with_batches
from robustclip.experiments.data import load_digits
from robustclip.experiments.models import MLP

DESCRIPTION = "over-parameterization paper: rho-hat per epoch; largest stable step of SGD, Clip-SGD, NSGD"
DEFAULT_THREADS = 1


@dataclass
class Config:
    methods: tuple[str, ...] = ("SGD", "Clip-SGD", "NSGD")
    hidden: tuple[int, ...] = (512, 512)  # widths of the hidden layers
    batch_size: int = 64
    epochs: int = 30  # epochs of the main runs
    lr: float = 0.1  # step size of the main runs
    clip: float = 1.0  # radius c of Clip-SGD
    sweep_lrs: tuple[float, ...] = (0.1, 0.3, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0)
    sweep_epochs: int = 10
    stable_ratio: float = 0.5  # stable: final training loss < stable_ratio * initial loss
    rho_every: int = 1  # epochs between rho_hat estimates in the main runs (epochs 0, k, 2k, ...)
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        check_methods(self.methods)
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden needs at least one positive width, got {self.hidden}.")
        if not self.sweep_lrs or min(self.sweep_lrs) <= 0:
            raise ValueError(f"sweep_lrs must be positive step sizes, got {self.sweep_lrs}.")
        for k in ("batch_size", "epochs", "sweep_epochs", "rho_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1, got {getattr(self, k)}.")
        if not 0 < self.stable_ratio <= 1:
            raise ValueError(f"stable_ratio must be in (0, 1], got {self.stable_ratio}.")


def _model(cfg: Config) -> nn.Module:
    return MLP([64, *cfg.hidden, 10])


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def problem(cfg: Config) -> Problem:
    split = load_digits(0.0, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    return Problem("sgc", _model(cfg), (split.x_train, split.y_train), (split.x_test, split.y_test), _loss, cfg.batch_size, cfg.lr)


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    from robustclip.diagnostics import estimate_strong_growth

    device = resolve_device(cfg.device)
    split = load_digits(0.0, seed=cfg.seed)
    train, test = (split.x_train, split.y_train), (split.x_test, split.y_test)
    x_tr, y_tr = split.x_train.to(device), split.y_train.to(device)

    def epoch_readings(model: nn.Module, part: str, epoch: int) -> dict[str, Any]:
        # training loss from epoch 0 on: the sweep judges stability against the initial one
        rec = evaluation(model, _loss, device, train=train, test=test)
        if part == "main" and epoch % cfg.rho_every == 0:
            # the finite-sum rho_hat over the whole training set, as the paper estimates it:
            # one per-sample gradient of every training sample, so only every rho_every epochs
            est = estimate_strong_growth(model, _loss, x_tr, y_tr)
            rec.update(rho_hat=est.rho, grad_norm=math.sqrt(est.grad_sq_norm))
        return rec

    arms = [("main", m, cfg.lr) for m in cfg.methods] + [("sweep", m, lr) for m in cfg.methods for lr in cfg.sweep_lrs]
    for part, method, lr in ctx.iterate(arms, "arms"):
        arm_id = f"{part}/{method}/lr{lr:g}"
        if ctx.is_done(arm_id):
            continue
        tag = {"arm": arm_id, "method": method, "part": part, "lr": lr}
        epochs = cfg.epochs if part == "main" else cfg.sweep_epochs
        batches = TensorBatches(split.x_train, split.y_train, cfg.batch_size, cfg.seed, device)
        seed_everything(cfg.seed)
        model = _model(cfg).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)

        with rc.Clipper(model, optimizer, build_method(method, MethodParams(clip=cfg.clip))) as clipper:
            meter = EpochMeter(device)
            arm = ctx.arm(arm_id, {"model": model, "optimizer": optimizer, "clipper": clipper, "meter": meter})
            if arm.start == 0:
                ctx.log({**tag, "kind": "epoch", "epoch": 0, "step": 0, "time": 0.0, **epoch_readings(model, part, 0)})
            steps_per_epoch = batches.steps_per_epoch
            meter.start_clock()
            for step, x, y in steps_with_batches(arm, batches, epochs * steps_per_epoch, arm_id):
                out = model(x)
                clipper.backward(_loss(out, y))
                info = clipper.step()
                meter.add(info, out, y)
                if (step + 1) % steps_per_epoch == 0:
                    epoch = (step + 1) // steps_per_epoch
                    ctx.log({**tag, "kind": "epoch", "epoch": epoch, **meter.read(step + 1), **epoch_readings(model, part, epoch)})
                    meter.start_clock()
            arm.finish()
    return summarize(ctx.records, cfg)


def summarize(records: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"largest_stable_lr": {}, "sweep": {}, "rho_hat_max": {}}
    for m in cfg.methods:
        rows = {}
        for lr in cfg.sweep_lrs:
            rs = [r for r in records if r.get("part") == "sweep" and r.get("method") == m and r.get("lr") == lr and r.get("kind") == "epoch"]
            if not rs:
                continue
            first, last = rs[0]["train_loss"], rs[-1]["train_loss"]
            stable = math.isfinite(last) and last < cfg.stable_ratio * first
            rows[f"{lr:g}"] = {"final_train_loss": last, "stable": stable, "test_acc": rs[-1].get("test_acc")}
        out["sweep"][m] = rows
        ok = [float(k) for k, v in rows.items() if v["stable"]]
        out["largest_stable_lr"][m] = max(ok) if ok else None
        rhos = [r["rho_hat"] for r in records if r.get("part") == "main" and r.get("method") == m and "rho_hat" in r]
        finite = [v for v in rhos if math.isfinite(v)]
        out["rho_hat_max"][m] = max(finite) if finite else None
    return out


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'method':<10}{'largest stable lr':>19}{'max rho_hat':>13}   final training loss per lr"]
    for m, lr in summary["largest_stable_lr"].items():
        rho = summary["rho_hat_max"].get(m)
        sweep = "  ".join(f"{k}:{v['final_train_loss']:.3g}" for k, v in summary["sweep"][m].items())
        lines.append(f"{m:<10}{'none' if lr is None else f'{lr:g}':>19}{'-' if rho is None else f'{rho:.3g}':>13}   {sweep}")
    return "\n".join(lines)


def plot(runs: list[RunData], out_dir: Path) -> list[Path]:
    def main(r: dict[str, Any]) -> bool:
        return r.get("part") == "main"

    sweep_series = []
    first = [r["train_loss"] for run in runs for r in run.records if r.get("part") == "sweep" and r.get("epoch") == 0]
    cap = 10 * max(v for v in first if math.isfinite(v)) if first else 1e3
    for i, run in enumerate(runs):
        methods: dict[str, None] = {}
        final: dict[tuple[str, float], float] = {}
        for r in run.records:
            if r.get("part") == "sweep" and r.get("kind") == "epoch":
                methods.setdefault(r["method"], None)
                final[(r["method"], r["lr"])] = r["train_loss"]
        for m in methods:
            pts = sorted((lr, v) for (mm, lr), v in final.items() if mm == m)
            # a diverged run is drawn at 10x the initial loss, so it stays visible without
            # squashing the rest
            ys = [min(v, cap) if math.isfinite(v) else cap for _, v in pts]
            style = {"color": color_for(m), "linestyle": ("-", "--", ":", "-.")[i % 4]}
            sweep_series.append(Series(f"{run.label}: {m}" if len(runs) > 1 else m, [p[0] for p in pts], ys, style))
    panels = [
        Panel("rho_hat per epoch", "epoch", "rho_hat", curves(runs, "rho_hat", where=main), logy=True),
        Panel("training loss", "epoch", "loss", curves(runs, "train_loss", where=main), logy=True),
        Panel("step-size sweep (diverged: 10x initial)", "step size", "final training loss", sweep_series, logy=True, logx=True),
    ]
    return [save_panels(out_dir / "sgc.png", panels, "strong growth and stable step sizes (digits, interpolating MLP)")]
