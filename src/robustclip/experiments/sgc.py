"""sgc: strong growth in an interpolating MLP, and the largest stable step size of each method.

Lobanov & Koloskova, "Avoiding Bias in Clipped SGD for Overparameterized Models under
Generalized Smoothness" (arXiv:2605.14800), show that when the model can interpolate its data
the strong growth condition ``E ||grad f_i(x)||^2 <= rho ||grad f(x)||^2`` holds, and that ClipSGD
(``x <- x - gamma min(1, c/||g||) g``) and NSGD (``x <- x - gamma g/||g||``) then converge without
the bias clipping usually brings, while -- under (L0, L1)-smoothness -- tolerating step sizes at
which plain SGD diverges.

The paper's central condition is on the batch size: with ``B >= rho`` the clipped (or
normalized) mini-batch direction stays aligned with the full gradient, and the bias of clipping
disappears. Three parts, on scikit-learn's digits with clean labels and an over-parameterized MLP
(64 -> 512 -> 512 -> 10, about 300k parameters for 1348 training images):

1. ``main``: each method at the same step size; per epoch the training loss, test accuracy and
   ``rho_hat = (1/N) sum_i ||grad f_i||^2 / ||grad f||^2`` over the whole training set (via
   :func:`robustclip.diagnostics.estimate_strong_growth`). Every ``bias_every`` epochs, at the
   current point ``x``, the *bias* of each method's direction at the batch sizes
   ``B = f * rho_hat(x)`` for ``f`` in ``bias_factors`` (below, at and above ``rho_hat``): see
   :func:`direction_bias`.
2. ``sweep``: each method over a grid of step sizes for ``sweep_epochs`` epochs at ``batch_size``;
   a step size is *stable* when the final training loss is finite and below ``stable_ratio``
   times the initial one. The summary reports the largest stable step size of each method.
3. ``batch``: the same stability test at each batch size of ``batch_sizes`` over ``batch_lrs``,
   each run for ``batch_steps`` steps (the same number of steps at every batch size), so the
   summary holds the largest stable step size and the final training loss (the suboptimality:
   ``f* = 0`` when the model interpolates) of each method at each batch size, beside the largest
   ``rho_hat`` of the main runs.
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

DESCRIPTION = "over-parameterization paper: rho-hat per epoch; bias and largest stable step of SGD, Clip-SGD, NSGD below, at and above rho-hat"
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
    # the bias probe: every bias_every epochs (0: never) of the main runs, at B = f * rho_hat
    bias_every: int = 10
    bias_factors: tuple[float, ...] = (0.25, 1.0, 4.0)
    bias_draws: int = 32  # mini-batches drawn per batch size to estimate the expected direction
    # the batch-size sweep (empty: none): largest stable step of each method at each batch size
    batch_sizes: tuple[int, ...] = (16, 128, 1024)
    batch_lrs: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
    batch_steps: int = 100
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        check_methods(self.methods)
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden needs at least one positive width, got {self.hidden}.")
        if not self.sweep_lrs or min(self.sweep_lrs) <= 0:
            raise ValueError(f"sweep_lrs must be positive step sizes, got {self.sweep_lrs}.")
        for k in ("batch_size", "epochs", "sweep_epochs", "rho_every", "bias_draws", "batch_steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1, got {getattr(self, k)}.")
        if self.bias_every < 0:
            raise ValueError(f"bias_every must be >= 0 (0: no bias probe), got {self.bias_every}.")
        if self.bias_every and self.bias_every % self.rho_every:
            raise ValueError(
                f"bias_every ({self.bias_every}) must be a multiple of rho_every ({self.rho_every}): "
                "the probe's batch sizes are multiples of that epoch's rho_hat."
            )
        if self.bias_every and (not self.bias_factors or min(self.bias_factors) <= 0):
            raise ValueError(f"bias_factors must be positive, got {self.bias_factors}.")
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be at least 1, got {self.batch_sizes}.")
        if self.batch_sizes and (not self.batch_lrs or min(self.batch_lrs) <= 0):
            raise ValueError(f"batch_lrs must be positive step sizes, got {self.batch_lrs}.")
        if not 0 < self.stable_ratio <= 1:
            raise ValueError(f"stable_ratio must be in (0, 1], got {self.stable_ratio}.")


def _model(cfg: Config) -> nn.Module:
    return MLP([64, *cfg.hidden, 10])


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _flat_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of the mean loss over ``(x, y)``, flattened, in float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(_loss(model(x), y).mean(), params)
    return torch.cat([g.reshape(-1) for g in grads]).double()


#: each method's direction as a function of a gradient ``g``, its norm ``n`` and the radius ``c``
DIRECTIONS = {
    "SGD": lambda g, n, c: g,
    "Clip-SGD": lambda g, n, c: g * min(1.0, c / n) if n > 0 else g,
    "NSGD": lambda g, n, c: g / n if n > 0 else g,
}


def direction_bias(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_sizes: list[int],
    clip: float,
    draws: int,
    generator: torch.Generator,
) -> dict[int, dict[str, float]]:
    """The bias of each method's mini-batch direction, at each batch size.

    For a method with direction ``d`` (the gradient itself for SGD, ``min(1, c/||g||) g`` for
    Clip-SGD, ``g/||g||`` for NSGD) the bias at batch size ``B`` is
    ``||E d(g_B) - d(grad f)|| / ||d(grad f)||``, where ``g_B`` is the mean gradient of ``B``
    samples drawn with replacement (i.i.d., as in the paper's Algorithm 1) and ``grad f`` the
    full-batch gradient. ``E d(g_B)`` is estimated by the mean ``d_bar`` of ``draws`` mini-batches,
    and the squared bias without the sampling error of that mean:
    ``||d_bar - d(grad f)||^2 - s^2/K``, with ``s^2`` the sample variance of the ``K = draws``
    directions (``E ||d_bar - r||^2 = ||E d - r||^2 + tr Cov(d)/K``); it is reported as its square
    root, 0 where the correction makes it negative. SGD's direction is unbiased, so its value
    shows how well ``draws`` resolves the others'. Also returned: ``cos``, the mean cosine
    between ``g_B`` and ``grad f`` (the alignment the paper's proofs rest on), and for each
    method ``"{method} cos"``, the cosine between ``d_bar`` and ``d(grad f)``: how far the
    expected step turns away from the true direction, apart from its length (it includes the
    sampling error of ``d_bar``).
    """
    n_all = x.shape[0]
    full = _flat_grad(model, x, y)
    full_norm = float(full.norm())
    out: dict[int, dict[str, float]] = {}
    for b in batch_sizes:
        sums = {m: torch.zeros_like(full) for m in DIRECTIONS}
        sq = dict.fromkeys(DIRECTIONS, 0.0)
        cos = 0.0
        for _ in range(draws):
            idx = torch.randint(0, n_all, (b,), generator=generator).to(x.device)
            g = _flat_grad(model, x[idx], y[idx])
            norm = float(g.norm())
            cos += float(g @ full) / max(norm * full_norm, 1e-300)
            for m, d in DIRECTIONS.items():
                v = d(g, norm, clip)
                sums[m] += v
                sq[m] += float(v @ v)
        rec: dict[str, float] = {"cos": cos / draws}
        for m, d in DIRECTIONS.items():
            ref = d(full, full_norm, clip)
            mean = sums[m] / draws
            # sum_k ||v_k - mean||^2 = sum_k ||v_k||^2 - K ||mean||^2
            var = (sq[m] - draws * float(mean @ mean)) / max(draws - 1, 1)
            bias_sq = float((mean - ref).pow(2).sum()) - var / draws
            rec[m] = math.sqrt(max(bias_sq, 0.0)) / max(float(ref.norm()), 1e-300)
            rec[f"{m} cos"] = float(mean @ ref) / max(float(mean.norm() * ref.norm()), 1e-300)
        out[b] = rec
    return out


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

    def epoch_readings(model: nn.Module, part: str, epoch: int, tag: dict[str, Any]) -> dict[str, Any]:
        # training loss from epoch 0 on: the sweep judges stability against the initial one
        rec = evaluation(model, _loss, device, train=train, test=test)
        if part == "main" and epoch % cfg.rho_every == 0:
            # the finite-sum rho_hat over the whole training set, as the paper estimates it:
            # one per-sample gradient of every training sample, so only every rho_every epochs
            est = estimate_strong_growth(model, _loss, x_tr, y_tr)
            rec.update(rho_hat=est.rho, grad_norm=math.sqrt(est.grad_sq_norm))
            if cfg.bias_every and epoch % cfg.bias_every == 0 and math.isfinite(est.rho):
                # a generator of its own per (seed, epoch): a resumed arm draws the same batches
                gen = torch.Generator().manual_seed(7_919 * cfg.seed + epoch)
                sizes = {f: max(1, round(f * est.rho)) for f in cfg.bias_factors}
                bias = direction_bias(model, x_tr, y_tr, sorted(set(sizes.values())), cfg.clip, cfg.bias_draws, gen)
                for f, b in sizes.items():
                    ctx.log({**tag, "kind": "bias", "epoch": epoch, "rho_hat": est.rho, "factor": f, "batch": b, **bias[b]})
        return rec

    arms = (
        [("main", m, cfg.lr, cfg.batch_size) for m in cfg.methods]
        + [("sweep", m, lr, cfg.batch_size) for m in cfg.methods for lr in cfg.sweep_lrs]
        + [("batch", m, lr, b) for b in cfg.batch_sizes for m in cfg.methods for lr in cfg.batch_lrs]
    )
    for part, method, lr, batch_size in ctx.iterate(arms, "arms"):
        arm_id = f"{part}/{method}/lr{lr:g}" + (f"/B{batch_size}" if part == "batch" else "")
        if ctx.is_done(arm_id):
            continue
        tag = {"arm": arm_id, "method": method, "part": part, "lr": lr, "batch": batch_size}
        batches = TensorBatches(split.x_train, split.y_train, batch_size, cfg.seed, device)
        steps_per_epoch = batches.steps_per_epoch
        # the batch part runs the same number of steps at every batch size, with 10 readings
        # (an epoch of a large batch can be a single step)
        total = {"main": cfg.epochs * steps_per_epoch, "sweep": cfg.sweep_epochs * steps_per_epoch}.get(part, cfg.batch_steps)
        every = steps_per_epoch if part != "batch" else max(1, total // 10)
        seed_everything(cfg.seed)
        model = _model(cfg).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)

        with rc.Clipper(model, optimizer, build_method(method, MethodParams(clip=cfg.clip))) as clipper:
            meter = EpochMeter(device)
            arm = ctx.arm(arm_id, {"model": model, "optimizer": optimizer, "clipper": clipper, "meter": meter})
            if arm.start == 0:
                ctx.log({**tag, "kind": "epoch", "epoch": 0, "step": 0, "time": 0.0, **epoch_readings(model, part, 0, tag)})
            meter.start_clock()
            for step, x, y in steps_with_batches(arm, batches, total, arm_id):
                out = model(x)
                clipper.backward(_loss(out, y))
                info = clipper.step()
                meter.add(info, out, y)
                if (step + 1) % every == 0 or step + 1 == total:
                    epoch = (step + 1) // steps_per_epoch
                    readings = meter.read(step + 1)
                    ctx.log({**tag, "kind": "epoch", "epoch": epoch, **readings, **epoch_readings(model, part, epoch, tag)})
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
    out["batch"] = _summarize_batch(records, cfg)
    out["bias"] = _summarize_bias(records, cfg)
    return out


def _summarize_batch(records: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Per method and batch size: the largest stable step size and the final training loss
    at each step size (``{method: {B: {"largest_stable_lr", "final_train_loss": {lr: loss}}}}``)."""
    out: dict[str, Any] = {}
    for m in cfg.methods:
        per_b: dict[str, Any] = {}
        for b in cfg.batch_sizes:
            losses, stable = {}, []
            for lr in cfg.batch_lrs:
                rs = [r for r in records if r.get("part") == "batch" and r.get("method") == m and r.get("lr") == lr
                      and r.get("batch") == b and r.get("kind") == "epoch"]
                if not rs:
                    continue
                first, last = rs[0]["train_loss"], rs[-1]["train_loss"]
                losses[f"{lr:g}"] = last
                if math.isfinite(last) and last < cfg.stable_ratio * first:
                    stable.append(lr)
            if losses:
                per_b[str(b)] = {"largest_stable_lr": max(stable) if stable else None, "final_train_loss": losses}
        if per_b:
            out[m] = per_b
    return out


def _summarize_bias(records: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """The bias probe's readings of the main runs, one row per (method's run, epoch, factor)."""
    keys = ("method", "epoch", "rho_hat", "factor", "batch", "cos", *DIRECTIONS, *(f"{m} cos" for m in DIRECTIONS))
    return [{k: r[k] for k in keys} for r in records if r.get("kind") == "bias" and r.get("part") == "main"]


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'method':<10}{'largest stable lr':>19}{'max rho_hat':>13}   final training loss per lr"]
    for m, lr in summary["largest_stable_lr"].items():
        rho = summary["rho_hat_max"].get(m)
        sweep = "  ".join(f"{k}:{v['final_train_loss']:.3g}" for k, v in summary["sweep"][m].items())
        lines.append(f"{m:<10}{'none' if lr is None else f'{lr:g}':>19}{'-' if rho is None else f'{rho:.3g}':>13}   {sweep}")
    if summary.get("batch"):
        lines += ["", f"{'method':<10}{'batch':>7}{'largest stable lr':>19}   final training loss per lr"]
        for m, per_b in summary["batch"].items():
            for b, row in per_b.items():
                lr = row["largest_stable_lr"]
                losses = "  ".join(f"{k}:{v:.3g}" for k, v in row["final_train_loss"].items())
                lines.append(f"{m:<10}{b:>7}{'none' if lr is None else f'{lr:g}':>19}   {losses}")
    if summary.get("bias"):
        names = list(DIRECTIONS)
        lines += ["", "bias of each direction at B = factor * rho_hat (main runs; SGD's shows the sampling error)",
                  "(cos: mean cosine of g_B with grad f; METHOD cos: cosine of the mean direction with the true one)",
                  f"{'run':<10}{'epoch':>6}{'rho_hat':>9}{'factor':>7}{'B':>6}{'cos':>7}"
                  + "".join(f"{n:>10}" for n in names) + "".join(f"{n + ' cos':>14}" for n in names[1:])]
        for r in summary["bias"]:
            lines.append(
                f"{r['method']:<10}{r['epoch']:>6}{r['rho_hat']:>9.3g}{r['factor']:>7g}{r['batch']:>6}{r['cos']:>7.3f}"
                + "".join(f"{r[n]:>10.3f}" for n in names) + "".join(f"{r[n + ' cos']:>14.4f}" for n in names[1:])
            )
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
    # the bias of each method's own direction along its own main run, against B / rho_hat,
    # averaged over the probe epochs
    bias_series = []
    for i, run in enumerate(runs):
        acc: dict[str, dict[float, list[float]]] = {}
        for r in run.records:
            if r.get("kind") == "bias" and r.get("method") in DIRECTIONS:
                acc.setdefault(r["method"], {}).setdefault(r["factor"], []).append(r[r["method"]])
        for m, per_f in acc.items():
            fs = sorted(per_f)
            style = {"color": color_for(m), "linestyle": ("-", "--", ":", "-.")[i % 4], "marker": "o"}
            ys = [sum(per_f[f]) / len(per_f[f]) for f in fs]
            bias_series.append(Series(f"{run.label}: {m}" if len(runs) > 1 else m, fs, ys, style))
    panels = [
        Panel("rho_hat per epoch", "epoch", "rho_hat", curves(runs, "rho_hat", where=main), logy=True),
        Panel("training loss", "epoch", "loss", curves(runs, "train_loss", where=main), logy=True),
        Panel("step-size sweep (diverged: 10x initial)", "step size", "final training loss", sweep_series, logy=True, logx=True),
    ]
    if bias_series:
        panels.append(Panel("bias of the direction (mean over probes)", "B / rho_hat", "relative bias", bias_series, logx=True))
    return [save_panels(out_dir / "sgc.png", panels, "strong growth and stable step sizes (digits, interpolating MLP)")]
