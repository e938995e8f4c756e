"""spectral-mlp: norm clipping vs spectral clipping under rank-1 heavy-tailed gradient noise.

The synthetic experiment of Yukhimchuk, Takac, Kolar, Choudhury, "Gradient Clipping Beyond
Vector Norms: A Spectral Approach for Matrix-Valued Parameters" (arXiv:2605.11838): an MLP
``100 -> [100, 100, 100] -> 1`` without biases learns ``y = x_0 x_1 x_2`` from 10k Gaussian
inputs with SGD (lr 0.01, momentum 0.9, batch 32). With probability ``p = 0.1`` per step, every
gradient matrix receives a rank-1 spike ``s (u/||u||) (v/||v||)^T`` (``u``, ``v`` standard
Gaussian vectors, normalised, so the spike's only singular value is ``|s|``; ``s`` two-sided
Pareto I with ``alpha = 1.1`` and scale 5, so ``|s| >= 5``), with its own ``s``, ``u``, ``v`` for
each matrix -- the law of the authors' public code. Norm clipping shrinks the whole gradient
when a spike arrives; spectral clipping caps singular values, removing the spike's direction
while keeping the rest of the gradient.

The noise is injected by a batch-level transform placed first in the method's chain, so it is
added to the averaged gradient before any clipping, as in the paper. Thresholds: constant
``tau``; EMA (0.9, bias-corrected) of previous top singular values; the 0.85-quantile of the last
100 (``robustclip.thresholds``). Measured outcomes are in docs/EXPERIMENTS.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

import robustclip as rc
from robustclip import thresholds
from robustclip.experiments._methods import MethodParams, available_methods, build_method
from robustclip.experiments._plot import Panel, curves, save_panels
from robustclip.experiments._problem import Problem
from robustclip.experiments._run import (
    RunContext,
    RunData,
    method_table,
    resolve_device,
    seed_everything,
)
from robustclip.experiments._train import TensorBatches, steps_with_batches
from robustclip.experiments.models import MLP

DESCRIPTION = "spectral paper: MLP on x0*x1*x2 with rank-1 heavy-tailed noise; norm vs spectral clipping"
DEFAULT_THREADS = 1

#: arm label -> (method label in _methods, threshold kind)
ARMS = {
    "SGDM": ("SGDM", "constant"),
    "Clip-SGD": ("Clip-SGD", "constant"),
    "Spectral": ("Spectral", "constant"),
    "Spectral-EMA": ("Spectral", "ema"),
    "Spectral-Q85": ("Spectral", "quantile"),
}


def _default_arms() -> tuple[str, ...]:
    """Every arm whose method this installation has (all of them with spectral clipping)."""
    have = available_methods()
    return tuple(a for a, (m, _) in ARMS.items() if m in have)


@dataclass
class Config:
    arms: tuple[str, ...] = dataclasses.field(default_factory=_default_arms)
    n_train: int = 10_000
    n_test: int = 2_000
    width: int = 100  # input dimension and hidden width
    depth: int = 3  # hidden layers
    batch_size: int = 32
    epochs: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    noise_prob: float = 0.1  # probability of a rank-1 spike per step
    noise_alpha: float = 1.1  # tail index of the spike's size
    noise_scale: float = 5.0  # scale of the two-sided Pareto I spike size (|s| >= noise_scale)
    clip: float = 1.0  # radius of Clip-SGD
    tau: float = 1.0  # constant spectral threshold
    ema_beta: float = 0.9
    quantile: float = 0.85
    window: int = 100
    eval_every: int = 100  # steps between test evaluations
    seeds: int = 1
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        have = available_methods()
        if not self.arms:
            raise ValueError(f"no arms given; choose from {list(_default_arms())}.")
        for a in self.arms:
            if a not in ARMS:
                raise ValueError(f"unknown arm {a!r}; choose from {list(ARMS)}.")
            if ARMS[a][0] not in have:
                raise ValueError(f"arm {a!r} needs {ARMS[a][0]}, which is not installed; choose from {list(_default_arms())}.")
        for k in ("noise_alpha", "noise_scale"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}.")
        if not 0 <= self.noise_prob <= 1:
            raise ValueError(f"noise_prob must be in [0, 1], got {self.noise_prob}.")
        for k in ("n_train", "n_test", "width", "depth", "batch_size", "epochs", "eval_every", "seeds"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1, got {getattr(self, k)}.")
        if self.width < 3:
            raise ValueError(f"width must be at least 3 (the target reads x0, x1, x2), got {self.width}.")


class _NoiseState(NamedTuple):
    rng: Tensor  # the generator's state (uint8), so the noise stream resumes exactly
    spikes: Tensor  # reading: 1.0 if this step got a spike
    size: Tensor  # reading: the largest |s| of this step's spikes (0 if none)


def pareto_spike_sizes(u01: Tensor, sign_bits: Tensor, alpha: float, scale: float) -> Tensor:
    """Two-sided Pareto I sizes ``s = sign * scale * U^(-1/alpha)`` from uniforms ``U`` in
    ``(0, 1]`` and sign bits in ``{0, 1}``: ``P(|s| > t) = (scale / t)^alpha`` for ``t >= scale``,
    the law of ``torch.distributions.Pareto(scale, alpha)`` with a random sign."""
    return (sign_bits.double() * 2 - 1) * scale * u01.double().pow(-1.0 / alpha)


class Rank1HeavyTailedNoise(rc.GradientTransform):
    """With probability ``p`` per step, add ``s (u/||u||) (v/||v||)^T`` to every gradient matrix
    (arXiv:2605.11838, the law of the authors' code).

    One Bernoulli draw per step decides whether a spike arrives. Each matrix (a 1-D gradient is
    read as an ``(n, 1)`` matrix, a larger one as ``(shape[0], -1)``) then gets its own size
    ``s`` (:func:`pareto_spike_sizes`, ``|s| >= scale``) and its own unit directions ``u``, ``v``,
    so the spike's only singular value is ``|s|``. Per step the generator is read in this order:
    the Bernoulli uniform, then for each matrix in parameter order one uniform for ``s``, one
    sign bit, ``u`` and ``v`` (drawn on every step, so the stream does not depend on whether a
    spike arrived). The draw is multiplied in rather than tested on the host, so the step never
    syncs.
    """

    name = "rank1_noise"

    def __init__(self, p: float, alpha: float, scale: float, seed: int) -> None:
        self.p, self.alpha, self.scale, self.seed = p, alpha, scale, seed

    def init(self, params: Sequence[Tensor]) -> _NoiseState:
        g = torch.Generator().manual_seed(self.seed)
        z = torch.zeros(())
        return _NoiseState(g.get_state(), z, z.clone())

    def update(self, grads: list[Tensor], state: _NoiseState, ctx: rc.StepContext | None) -> tuple[list[Tensor], _NoiseState]:
        g = torch.Generator()
        g.set_state(state.rng)
        hit = (torch.rand((), generator=g) < self.p).float()
        largest = torch.zeros((), dtype=torch.float64)
        for gr in grads:
            m = gr.shape[0] if gr.dim() >= 1 else 1
            n = gr.numel() // max(m, 1)
            # 1 - U lies in (0, 1]: the size stays finite
            u01 = 1.0 - torch.rand((), generator=g, dtype=torch.float64)
            s = pareto_spike_sizes(u01, torch.randint(0, 2, (), generator=g), self.alpha, self.scale)
            u = torch.randn(m, generator=g)
            v = torch.randn(n, generator=g)
            if gr.numel() == 0:
                continue
            coef = (hit.double() * s).float()
            spike = torch.outer(u / u.norm(), v / v.norm()) * coef
            gr.add_(spike.reshape(gr.shape).to(gr.device, gr.dtype))
            largest = torch.maximum(largest, s.abs())
        return grads, _NoiseState(g.get_state(), hit, (hit.double() * largest).float())

    def readings(self, state: _NoiseState) -> dict[str, Any]:
        return {"spike": state.spikes, "size": state.size}


def _data(cfg: Config, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.n_train + cfg.n_test, cfg.width, generator=g)
    y = (x[:, 0] * x[:, 1] * x[:, 2]).unsqueeze(1)
    return x[: cfg.n_train], y[: cfg.n_train], x[cfg.n_train :], y[cfg.n_train :]


def _model(cfg: Config) -> MLP:
    return MLP([cfg.width, *([cfg.width] * cfg.depth), 1], bias=False)


def _loss(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out, y, reduction="none").flatten(1).mean(1)


def problem(cfg: Config) -> Problem:
    x, y, xt, yt = _data(cfg, cfg.seed)
    torch.manual_seed(cfg.seed)
    return Problem(
        "spectral-mlp", _model(cfg), (x, y), (xt, yt), _loss, cfg.batch_size, cfg.lr, cfg.momentum,
        # the rank-1 spikes are injected into the gradient, not present in the data: the same
        # transform (and seed) as the experiment's first run, applied after aggregation
        grad_noise=lambda: Rank1HeavyTailedNoise(cfg.noise_prob, cfg.noise_alpha, cfg.noise_scale, cfg.seed),
    )


def _method(arm: str, cfg: Config, seed: int) -> Any:
    label, kind = ARMS[arm]
    th: Any = None
    if kind == "ema":
        th = thresholds.EMA(cfg.ema_beta)
    elif kind == "quantile":
        th = thresholds.WindowQuantile(cfg.quantile, cfg.window)
    # every weight matrix gets the noise, so spectral clipping acts on every one (head too)
    base = build_method(label, MethodParams(clip=cfg.clip, tau=cfg.tau, threshold=th, spectral_head=None))
    noise = Rank1HeavyTailedNoise(cfg.noise_prob, cfg.noise_alpha, cfg.noise_scale, seed)
    return rc.chain(noise, base) if isinstance(base, rc.GradientTransform) else rc.chain(base, noise)


@torch.no_grad()
def _test_mse(model: torch.nn.Module, x: Tensor, y: Tensor) -> float:
    return float(F.mse_loss(model(x), y))


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    for arm_label, seed in ctx.iterate([(a, cfg.seed + k) for k in range(cfg.seeds) for a in cfg.arms], "arms"):
        arm_id = f"{arm_label}/seed{seed}"
        if ctx.is_done(arm_id):
            continue
        tag = {"arm": arm_id, "method": arm_label, "seed": seed}
        x, y, xt, yt = _data(cfg, seed)
        xt, yt = xt.to(device), yt.to(device)
        batches = TensorBatches(x, y, cfg.batch_size, seed, device)
        seed_everything(seed)
        model = _model(cfg).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        total = batches.steps_per_epoch * cfg.epochs
        with rc.Clipper(model, optimizer, _method(arm_label, cfg, seed)) as clipper:
            # sums over the steps applied since the last evaluation; skipped steps (non-finite
            # gradient: the method diverged) are only counted
            arm = ctx.arm(arm_id, {"model": model, "optimizer": optimizer, "clipper": clipper},
                          state={"loss_sum": 0.0, "applied": 0, "skipped": 0, "spikes": 0.0})
            if arm.start == 0:
                ctx.log({**tag, "kind": "eval", "step": 0, "test_mse": _test_mse(model, xt, yt)})
            for step, xb, yb in steps_with_batches(arm, batches, total, arm_id):
                clipper.backward(_loss(model(xb), yb))
                info = clipper.step()
                # the host reads a float per step here: the MLP is tiny and runs on the CPU
                if info.skipped:
                    arm.state["skipped"] += 1
                else:
                    arm.state["loss_sum"] += float(info.loss)
                    arm.state["spikes"] += float(info.transforms["rank1_noise"]["spike"])
                    arm.state["applied"] += 1
                if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
                    n = arm.state["applied"]
                    ctx.log({
                        **tag, "kind": "eval", "step": step + 1,
                        # the mean over the steps applied (NaN when every step was skipped)
                        "train_loss": arm.state["loss_sum"] / n if n else float("nan"),
                        "spike_rate": arm.state["spikes"] / n if n else float("nan"),
                        "skipped_steps": arm.state["skipped"],
                        "test_mse": _test_mse(model, xt, yt),
                    })
                    arm.state.update(loss_sum=0.0, applied=0, skipped=0, spikes=0.0)
            arm.finish()
    return summarize(ctx.records, cfg.arms)


def summarize(records: list[dict[str, Any]], arms: Any) -> dict[str, Any]:
    out = {}
    for a in arms:
        finals: dict[int, float] = {}
        best: dict[int, float] = {}
        for r in records:
            if r.get("method") == a and r.get("kind") == "eval":
                finals[r["seed"]] = r["test_mse"]
                best[r["seed"]] = min(best.get(r["seed"], float("inf")), r["test_mse"])
        if finals:
            out[a] = {
                "final_test_mse": sum(finals.values()) / len(finals),
                "best_test_mse": sum(best.values()) / len(best),
                "seeds": len(finals),
            }
    return {"methods": out, "target_variance": 1.0}


def format_summary(summary: dict[str, Any]) -> str:
    columns = [("final test MSE", "final_test_mse", ">16.4g", ""), ("best test MSE", "best_test_mse", ">15.4g", "")]
    return method_table(summary["methods"], 15, columns, note="   (predicting 0 gives 1.0)")


def plot(runs: list[RunData], out_dir: Path) -> list[Path]:
    panels = [
        # capped axes: a diverged method leaves the plot instead of squashing the others
        Panel("test MSE (mean over seeds)", "step", "MSE", curves(runs, "test_mse", x="step", kind="eval"), logy=True, ylim=(None, 3.0)),
        Panel("training loss", "step", "MSE (with noise)", curves(runs, "train_loss", x="step", kind="eval"), logy=True, ylim=(None, 30.0)),
    ]
    return [save_panels(out_dir / "spectral_mlp.png", panels, "x0*x1*x2 with rank-1 heavy-tailed gradient noise")]
