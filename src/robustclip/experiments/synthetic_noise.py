"""synthetic-noise: NSGD vs Clip-SGD vs PS-Clip-SGD under Gaussian and heavy-tailed noise.

Reproduces the setting of Nobile & Grohs, "Robust and Fast Training via Per-Sample Clipping"
(arXiv:2605.02701), Figures 1-2: a smooth non-convex objective whose stochastic gradients carry
additive noise of several laws, optimised for ``T = 100`` steps over many seeds. For each method
and noise law we record the average gradient norm ``(1/T) sum_t ||grad f(x_t)||`` (the true
gradient) and plot its ``(1 - delta)``-quantile over seeds against ``log(1/delta)``: a
high-probability guarantee shows as a curve that grows slowly with ``log(1/delta)``.

The objective (not given in the paper; chosen here) is, for ``x`` in ``R^d``,

    f(x) = 1/2 ||x||^2 + a * sum_j sin^2(x_j),

smooth and non-convex for ``a > 1/4`` (``f''`` dips to ``1 - 2a``), with stationary points
around the origin. Sample ``i`` of a mini-batch has the loss
``f(x) + sigma * <xi_i, x>``, so its gradient is ``grad f(x) + sigma * xi_i`` with ``xi_i``
i.i.d. noise (coordinates independent) of the chosen law: Gaussian; Student-t with
``nu in {2.5, 1.5}``; symmetric Pareto with ``alpha in {1.5, 1.1}`` (or alpha-stable). The
methods see exactly these per-sample gradients through ``rc.Clipper``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import robustclip as rc
from robustclip.experiments._methods import MethodParams, build_method, check_methods, step_size
from robustclip.experiments._plot import Panel, Series, color_for, save_panels
from robustclip.experiments._problem import Problem
from robustclip.experiments._run import RunContext, RunData, seed_everything
from robustclip.experiments.data import NOISE_KINDS, heavy_tailed

DESCRIPTION = "PS-Clip paper Figs. 1-2: quantiles of the average gradient norm under heavy-tailed noise"
DEFAULT_THREADS = 1


@dataclass
class Config:
    methods: tuple[str, ...] = ("NSGD", "Clip-SGD", "PS-Clip-SGD")
    # noise laws as kind:parameter (student: nu; pareto, stable: alpha)
    regimes: tuple[str, ...] = ("gaussian", "student:2.5", "student:1.5", "pareto:1.5", "pareto:1.1")
    dim: int = 10  # d
    a: float = 2.0  # weight of the non-convex term sum_j sin^2(x_j)
    sigma: float = 1.0  # noise scale
    x0: float = 1.0  # every coordinate of the starting point
    steps: int = 100  # T
    batch_size: int = 8  # B
    lr: float = 0.1  # step size of Clip-SGD and PS-Clip-SGD
    nsgd_lr: float = 0.0  # step size of NSGD (0: lr * clip, the length of a clipped Clip-SGD step)
    clip: float = 3.0  # radius c (about the norm of a Gaussian sample's noise, sqrt(d))
    momentum: float = 0.0  # the papers' plain methods
    seeds: int = 200  # runs per (method, regime): the quantiles need many
    seed: int = 0
    engine: str = "vmap"  # per-sample engine: the loss uses its parameter directly, not via a layer

    def check(self) -> None:
        check_methods(self.methods)
        for r in self.regimes:
            parse_regime(r)
        for k in ("dim", "steps", "batch_size", "seeds"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1, got {getattr(self, k)}.")
        if self.nsgd_lr < 0:
            raise ValueError(f"nsgd_lr must be >= 0 (0: lr * clip), got {self.nsgd_lr}.")


def parse_regime(text: str) -> tuple[str, float]:
    """``"student:1.5"`` -> ``("student", 1.5)``; ``"gaussian"`` -> ``("gaussian", 0.0)``."""
    kind, _, param = text.partition(":")
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise regime {text!r}; use one of {NOISE_KINDS}, e.g. 'student:1.5'.")
    if kind == "gaussian":
        return kind, 0.0
    try:
        value = float(param)
    except ValueError:
        raise ValueError(f"noise regime {text!r} needs a parameter, e.g. '{kind}:1.5'.") from None
    if value <= 0 or (kind == "stable" and value > 2):
        raise ValueError(f"noise regime {text!r}: the parameter must be > 0 (and <= 2 for stable).")
    return kind, value


class NoisyObjective(nn.Module):
    """Per-sample losses ``f(x) + sigma <xi_i, x>`` with ``f(x) = |x|^2/2 + a sum sin^2(x_j)``.

    ``forward(xi)`` takes the noise of a batch, shape ``(B, d)``, and returns the ``(B,)`` losses.
    """

    def __init__(self, dim: int, a: float, sigma: float, x0: float) -> None:
        super().__init__()
        self.a, self.sigma = a, sigma
        self.x = nn.Parameter(torch.full((dim,), float(x0)))

    def objective(self) -> Tensor:
        x = self.x
        return 0.5 * x.pow(2).sum() + self.a * torch.sin(x).pow(2).sum()

    def true_grad(self) -> Tensor:
        x = self.x.detach()
        return x + self.a * torch.sin(2 * x)

    def forward(self, xi: Tensor) -> Tensor:
        return self.objective() + self.sigma * (xi @ self.x)


def _noise(regime: str, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    kind, param = parse_regime(regime)
    return heavy_tailed(kind, param, shape, g)


def problem(cfg: Config) -> Problem:
    """The objective with a finite pool of noise samples (first regime) as its training set."""
    g = torch.Generator().manual_seed(cfg.seed)
    xi = _noise(cfg.regimes[0], (4096, cfg.dim), g)
    model = NoisyObjective(cfg.dim, cfg.a, cfg.sigma, cfg.x0)
    return Problem(
        name="synthetic-noise",
        model=model,
        train=(xi, torch.zeros(xi.shape[0])),
        test=None,
        loss_fn=lambda out, y: out,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
    )


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    arms = [(r, m, cfg.seed + s) for r in cfg.regimes for m in cfg.methods for s in range(cfg.seeds)]
    for regime, method, seed in ctx.iterate(arms, "runs"):
        arm_id = f"{regime}/{method}/seed{seed}"
        if ctx.is_done(arm_id):
            continue
        seed_everything(seed)
        model = NoisyObjective(cfg.dim, cfg.a, cfg.sigma, cfg.x0)
        lr = step_size(method, cfg.lr, cfg.clip, cfg.nsgd_lr)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
        # the same noise stream for every method at a given (regime, seed): paired comparison
        g = torch.Generator().manual_seed(10_007 * seed + cfg.regimes.index(regime))
        with rc.Clipper(model, optimizer, build_method(method, MethodParams(clip=cfg.clip, engine=cfg.engine))) as clipper:
            arm = ctx.arm(arm_id, {"model": model, "optimizer": optimizer, "clipper": clipper}, {"noise": g},
                          state={"norms": []})
            for _ in arm.steps(cfg.steps, desc=arm_id):
                arm.state["norms"].append(float(model.true_grad().norm()))
                clipper.backward(model(_noise(regime, (cfg.batch_size, cfg.dim), g)))
                clipper.step()
            norms = arm.state["norms"]
            ctx.log({
                "arm": arm_id, "kind": "run", "regime": regime, "method": method, "seed": seed,
                "avg_grad_norm": sum(norms) / len(norms),
                "final_grad_norm": float(model.true_grad().norm()),
                "final_objective": float(model.objective().detach()),
                "grad_norms": [round(v, 6) for v in norms],
            })
            arm.finish()
    return summarize(ctx.records, cfg.regimes, cfg.methods)


#: the delta values of the quantile plots and summary
DELTAS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)


def summarize(records: list[dict[str, Any]], regimes: Any, methods: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in regimes:
        out[r] = {}
        for m in methods:
            v = np.array([x["avg_grad_norm"] for x in records if x.get("regime") == r and x.get("method") == m])
            if v.size == 0:
                continue
            out[r][m] = {f"q{1 - d:.2f}": float(np.quantile(v, 1 - d)) for d in DELTAS} | {"runs": int(v.size)}
    return {"avg_grad_norm_quantiles": out}


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["(1-delta)-quantile of the average gradient norm over seeds"]
    for regime, by in summary["avg_grad_norm_quantiles"].items():
        for m, q in by.items():
            qs = "  ".join(f"{k}={v:.3g}" for k, v in q.items() if k != "runs")
            lines.append(f"{regime:<13}{m:<13}{qs}")
    return "\n".join(lines)


def plot(runs: list[RunData], out_dir: Path) -> list[Path]:
    regimes: dict[str, None] = {}
    for run in runs:
        for r in run.records:
            if r.get("kind") == "run":
                regimes.setdefault(r["regime"], None)
    quant_panels, traj_panels = [], []
    for regime in regimes:
        qs, ts = [], []
        for i, run in enumerate(runs):
            methods: dict[str, None] = {}
            for r in run.records:
                if r.get("regime") == regime:
                    methods.setdefault(r["method"], None)
            for m in methods:
                rs = [r for r in run.records if r.get("regime") == regime and r.get("method") == m]
                v = np.array([r["avg_grad_norm"] for r in rs])
                deltas = [d for d in np.geomspace(0.5, 1.0 / max(len(v), 2), 12)]
                name = f"{run.label}: {m}" if len(runs) > 1 else m
                c = {"color": color_for(m), **({"marker": "os^v"[i % 4]} if len(runs) > 1 else {})}
                qs.append(Series(name, [math.log(1 / d) for d in deltas], [float(np.quantile(v, 1 - d)) for d in deltas], c))
                traj = np.array([r["grad_norms"] for r in rs])
                ts.append(Series(name + " (median)", list(range(traj.shape[1])), list(np.median(traj, 0)), c))
                ts.append(Series(name + " (90%)", list(range(traj.shape[1])), list(np.quantile(traj, 0.9, 0)), {**c, "linestyle": "--"}))
        quant_panels.append(Panel(regime, "log(1/delta)", "(1-delta)-quantile of avg ||grad f||", qs))
        traj_panels.append(Panel(regime, "step", "||grad f(x_t)||", ts, logy=True))
    return [
        save_panels(out_dir / "synthetic_noise_quantiles.png", quant_panels, "average gradient norm after T steps"),
        save_panels(out_dir / "synthetic_noise_trajectories.png", traj_panels, "gradient norm over the steps"),
    ]
