"""Does ``robustclip.diagnostics.diagnose`` pick the method that wins a full training run?

For each problem, ``diagnose`` runs within its budget (default 10% of the planned steps); then
every candidate it could have chosen (no clipping, and per-sample, global-norm and spectral
clipping at the three radii its statistics set) trains for the full ``planned_steps`` from the
same initialisation, on the same data order. The winner is the best final metric; ``agree``
is true when the verdict's candidate is the winner or within 2% of the winner's final metric
(relative, on the problem's own scale: accuracy for classification, a loss or an error
otherwise). One JSON record per problem::

    {problem, verdict, threshold, winner, agree, gap, pilot_cost_frac, ...}

The problems have known structure: Gaussian and alpha-stable (alpha = 1.2) per-sample noise on
linear regression; rank-1 heavy-tailed gradient spikes on the spectral-clipping paper's MLP
(``x0 x1 x2``, spikes ``s (u/|u|)(v/|v|)^T`` with ``|s|`` Pareto I of scale 5, drawn per matrix);
over-parameterized least squares with ``B << rho`` (independent features) and ``B >> rho``
(features of rank 4, rho about 6 against B = 64); scikit-learn digits with
0% and 40% flipped labels; and the built-in ``synthetic-noise`` problem (Pareto 1.1 noise)
through ``robustclip.experiments.load_problem``.

    python benchmarks/run.py --suite verdict [--problems a,b] [--seed 0] [--markdown]
        [--also other_seed.json]   # a second run's records, tabled below the first
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import robustclip as rc
import robustclip.diagnostics as rcd
from robustclip.diagnostics._pilot import Candidate, PilotTrainer

AGREE_TOL = 0.02


@dataclass
class Bench:
    """One problem: a model factory, data, loss, the optimizer and how to score a model."""

    name: str
    model_fn: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    train: tuple[Tensor, Tensor]
    batch_size: int
    lr: float
    planned_steps: int
    val_metric: Callable[[nn.Module], float]  # lower is better, what diagnose races on
    final_metric: Callable[[nn.Module], float]  # the full run's score
    higher_is_better: bool = False
    metric_name: str = "loss"
    noise_fn: Callable[[], Any] | None = None
    structure: str = ""

    def loader(self, seed: int) -> DataLoader:
        return DataLoader(TensorDataset(*self.train), batch_size=self.batch_size, shuffle=True, drop_last=True)


# -- problems ---------------------------------------------------------------------------------------


def _regression(name: str, noise: str, seed: int) -> Bench:
    g = torch.Generator().manual_seed(seed)
    n, d = 2048, 20
    w = torch.randn(d, 1, generator=g)
    x = torch.randn(n, d, generator=g)
    if noise == "gaussian":
        e = torch.randn(n, 1, generator=g)
        structure = "Gaussian label noise, sd 1"
    else:
        e = rcd.symmetric_stable(1.2, (n, 1), generator=g, dtype=torch.float32)
        structure = "symmetric alpha-stable (alpha = 1.2) label noise, scale 1"
    y = x @ w + e
    xt = torch.randn(1024, d, generator=g)
    yt = xt @ w

    def clean_mse(m: nn.Module) -> float:
        return float(((m(xt) - yt) ** 2).mean())

    return Bench(
        name, lambda: nn.Linear(d, 1), lambda o, t: 0.5 * ((o - t) ** 2).sum(1), (x, y), 32, 0.05, 2000,
        clean_mse, clean_mse, metric_name="clean test MSE", structure=structure,
    )


class _SpikeState(NamedTuple):
    pass


class RankOneSpikes(rc.GradientTransform):
    """Adds ``s (u/|u|)(v/|v|)^T`` to each weight-matrix gradient with probability ``p``, ``|s|``
    Pareto I (``alpha``, scale 5) and a random sign, drawn per matrix (the spectral-clipping
    paper's noise model, arXiv:2605.11838)."""

    name = "rank_one_spikes"

    def __init__(self, p: float, alpha: float, seed: int) -> None:
        self.p, self.alpha = p, alpha
        self.gen = torch.Generator().manual_seed(seed)

    def init(self, params: Any) -> _SpikeState:
        return _SpikeState()

    def update(self, grads: list[Tensor], state: _SpikeState, ctx: Any) -> tuple[list[Tensor], _SpikeState]:
        for g in grads:
            if g.dim() < 2 or float(torch.rand((), generator=self.gen)) >= self.p:
                continue
            u = torch.randn(g.shape[0], generator=self.gen)
            v = torch.randn(g[0].numel(), generator=self.gen)
            mag = 5.0 * float(torch.rand((), generator=self.gen)) ** (-1.0 / self.alpha)
            sign = 1.0 if float(torch.rand((), generator=self.gen)) < 0.5 else -1.0
            g.add_((sign * mag * torch.outer(u / u.norm(), v / v.norm())).reshape(g.shape).to(g.dtype))
        return grads, state


def _spikes(seed: int) -> Bench:
    g = torch.Generator().manual_seed(seed)
    n = 2048
    x = torch.rand(n, 3, generator=g) * 2 - 1
    y = (x[:, 0] * x[:, 1] * x[:, 2]).unsqueeze(1)
    xt = torch.rand(1024, 3, generator=g) * 2 - 1
    yt = (xt[:, 0] * xt[:, 1] * xt[:, 2]).unsqueeze(1)

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def mse(m: nn.Module) -> float:
        return float(((m(xt) - yt) ** 2).mean())

    return Bench(
        "rank1-spikes", mlp, lambda o, t: ((o - t) ** 2).sum(1), (x, y), 64, 0.05, 2000, mse, mse,
        metric_name="test MSE", noise_fn=lambda: RankOneSpikes(0.1, 1.5, seed + 1),
        structure="rank-1 spikes s(u/|u|)(v/|v|)^T, |s| ~ Pareto I(1.5, scale 5), p = 0.1 per matrix",
    )


def _least_squares(name: str, seed: int, low_rank: bool) -> Bench:
    g = torch.Generator().manual_seed(seed)
    n, d = 256, 512  # more weights than samples: a zero-loss solution exists
    if low_rank:
        # B >> rho. Near interpolation rho is about d_eff + 2 for isotropic data of effective rank
        # d_eff (the residual's slowest direction sets it), so n samples in general position
        # give rho of order n >= B. Samples from a rank-4 subspace, x = U z with orthonormal U
        # (d x 4) and z ~ N(0, I_4), keep every direction equally fast: rho stays near 6 along
        # the whole run (measured with strong_growth_over), a tenth of B = 64.
        k, b, lr = 4, 64, 0.002
        u, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
        x = torch.randn(n, k, generator=g) @ u.T
        w = torch.randn(d, 1, generator=g) / math.sqrt(k)
        what = f"features of rank {k} (x = U z, U orthonormal {d}x{k}), B={b}"
    else:
        # independent Gaussian features, n < d: rho is of order n, B = 4 << rho
        b, lr = 4, 0.002
        x = torch.randn(n, d, generator=g)
        w = torch.randn(d, 1, generator=g) / math.sqrt(d)
        what = f"independent Gaussian features, B={b}"
    y = x @ w  # interpolation: a zero-loss solution exists

    def full_loss(m: nn.Module) -> float:
        return float(0.5 * ((m(x) - y) ** 2).mean())

    return Bench(
        name, lambda: nn.Linear(d, 1, bias=False), lambda o, t: 0.5 * ((o - t) ** 2).sum(1), (x, y), b, lr, 2000,
        full_loss, full_loss, metric_name="training loss",
        structure=f"over-parameterized least squares n={n}, d={d}, {what}",
    )


def _digits(noise: float, seed: int) -> Bench:
    from sklearn.datasets import load_digits

    xs, ys = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ys), generator=g)
    x = torch.tensor(xs, dtype=torch.float32)[perm] / 16.0
    y = torch.tensor(ys, dtype=torch.int64)[perm]
    n_train, n_val = 1200, 200
    xtr, ytr = x[:n_train], y[:n_train].clone()
    flip = torch.rand(n_train, generator=g) < noise
    ytr[flip] = (ytr[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=g)) % 10
    xv, yv = x[n_train : n_train + n_val], y[n_train : n_train + n_val]
    xt, yt = x[n_train + n_val :], y[n_train + n_val :]

    def err(xe: Tensor, ye: Tensor) -> Callable[[nn.Module], float]:
        return lambda m: float((m(xe).argmax(1) != ye).float().mean())

    def acc(m: nn.Module) -> float:
        return float((m(xt).argmax(1) == yt).float().mean())

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    return Bench(
        f"digits-noise{int(noise * 100)}", mlp, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"),
        (xtr, ytr), 32, 0.1, 2000, err(xv, yv), acc, higher_is_better=True, metric_name="test accuracy",
        structure=f"scikit-learn digits, {noise:.0%} of training labels flipped",
    )


def _synthetic_noise(seed: int) -> Bench:
    from robustclip.experiments import load_problem

    p = load_problem("synthetic-noise", {"regimes": "pareto:1.1", "seed": str(seed)})
    model = p.model

    def objective(m: nn.Module) -> float:
        return float(m.objective())  # type: ignore[operator]

    return Bench(
        "synthetic-noise-pareto1.1", lambda: type(model)(model.x.numel(), model.a, model.sigma, 1.0),
        p.loss_fn, p.train, p.batch_size, p.lr, 2000, objective, objective, metric_name="objective f(x)",
        structure="built-in synthetic-noise, symmetric Pareto(1.1) per-sample noise",
    )


PROBLEMS: dict[str, Callable[[int], Bench]] = {
    "gaussian": lambda s: _regression("gaussian", "gaussian", s),
    "stable-1.2": lambda s: _regression("stable-1.2", "stable", s),
    "rank1-spikes": _spikes,
    "ls-B<<rho": lambda s: _least_squares("ls-B<<rho", s, low_rank=False),
    "ls-B>>rho": lambda s: _least_squares("ls-B>>rho", s, low_rank=True),
    "digits-noise0": lambda s: _digits(0.0, s),
    "digits-noise40": lambda s: _digits(0.4, s),
    "synthetic-noise-pareto1.1": _synthetic_noise,
}


# -- the measurement ------------------------------------------------------------------------------


def full_run(bench: Bench, cand: Candidate, seed: int, engine: str) -> float:
    """Train ``cand`` for ``planned_steps``; the final metric, averaged over 5 checkpoints of the
    last 10% of steps (a constant step size leaves the iterate fluctuating)."""
    trainer = PilotTrainer(
        bench.model_fn, bench.loss_fn, bench.loader(seed),
        lambda p: torch.optim.SGD(p, lr=bench.lr), seed=seed, device=torch.device("cpu"),
        noise_fn=bench.noise_fn, engine=engine,
    )
    arm = trainer.new_arm(cand)
    tail = max(5, bench.planned_steps // 10)
    trainer.train(arm, bench.planned_steps - tail)
    vals = []
    for _ in range(5):
        trainer.train(arm, tail // 5)
        arm.model.eval()
        with torch.no_grad():
            v = bench.final_metric(arm.model) if not arm.diverged else math.nan
        arm.model.train()
        vals.append(v if math.isfinite(v) else math.nan)
    trainer.close(arm)
    if any(math.isnan(v) for v in vals):
        return -math.inf if bench.higher_is_better else math.inf
    return sum(vals) / len(vals)


def measure(bench: Bench, seed: int, engine: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    d = rcd.diagnose(
        bench.model_fn, bench.loss_fn, bench.loader(seed), planned_steps=bench.planned_steps,
        lr=bench.lr, metric_fn=bench.val_metric, noise_fn=bench.noise_fn, seed=seed, engine=engine,
    )
    t_diag = time.perf_counter() - t0
    grid = [Candidate("none")]
    for m, radii in d.statistics["radii"].items():
        if radii:
            grid += [Candidate(m, r, q) for r, q in zip(radii, rcd._diagnose.RADIUS_QUANTILES)]
    t0 = time.perf_counter()
    finals = {c.label: full_run(bench, c, seed, engine) for c in grid}
    t_full = time.perf_counter() - t0
    sign = -1.0 if bench.higher_is_better else 1.0
    winner = min(finals, key=lambda k: sign * finals[k])
    chosen = Candidate(d.method, d.threshold).label
    w, v = finals[winner], finals[chosen]
    gap = (w - v) / abs(w) if bench.higher_is_better else (v - w) / abs(w)
    if not math.isfinite(gap):
        gap = math.inf
    return {
        "problem": bench.name,
        "seed": seed,
        "verdict": d.method,
        "threshold": d.threshold,
        "winner": winner,
        "agree": bool(gap <= AGREE_TOL),
        "gap": gap,
        "pilot_cost_frac": d.pilot_cost_frac,
        "confidence": d.confidence,
        "metric": bench.metric_name,
        "verdict_metric": v,
        "winner_metric": w,
        "finals": finals,
        "alpha_hat": d.statistics.get("tail_index"),
        "rho_hat": d.statistics.get("rho"),
        "batch_size": bench.batch_size,
        "raced": [c["label"] for c in d.candidates],
        # set when the radius was chosen at matched progress (diagnostics._pilot.matched_progress)
        "matched_progress": d.candidates[0].get("caught_up") if d.candidates else None,
        "structure": bench.structure,
        "seconds_diagnose": round(t_diag, 2),
        "seconds_full_runs": round(t_full, 2),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="auto")
    parser.add_argument(
        "--also", type=pathlib.Path, default=None,
        help="JSON records of another run (e.g. a second seed) to table below this one in --markdown",
    )


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads or 1)
    records = []
    for name in args.problems.split(","):
        if name not in PROBLEMS:
            raise SystemExit(f"unknown problem {name!r}; choose from {sorted(PROBLEMS)}")
        rec = measure(PROBLEMS[name](args.seed), args.seed, args.engine)
        print({k: rec[k] for k in ("problem", "verdict", "threshold", "winner", "agree", "gap", "pilot_cost_frac", "finals")}, flush=True)
        records.append(rec)
    return records


def _f(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "∞"
    return format(x, spec)


def _table(records: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| problem | verdict | winner (full training) | agree | gap | pilot cost | confidence | α̂ | ρ̂ (B) | metric |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        v = Candidate(r["verdict"], r["threshold"]).label
        lines.append(
            f"| {r['problem']} | {v} | {r['winner']} | {'yes' if r['agree'] else 'no'} | {_f(r['gap'], '.1%')} "
            f"| {r['pilot_cost_frac']:.1%} | {r['confidence']} | {_f(r['alpha_hat'], '.2f')} | "
            f"{_f(r['rho_hat'])} ({r['batch_size']}) | {r['metric']} |"
        )
    return lines


def _notes(records: list[dict[str, Any]]) -> list[str]:
    out = []
    off = [
        r["problem"] for r in records if r["rho_hat"] is not None and (
            ("B>>rho" in r["problem"] and r["rho_hat"] >= r["batch_size"])
            or ("B<<rho" in r["problem"] and r["rho_hat"] <= r["batch_size"])
        )
    ]
    if off:
        out.append(
            f"Caveat: the measured ρ̂ (the largest along the statistics run, over the whole "
            f"training set) puts {', '.join(off)} on the other side of B than its name says."
        )
    for r in records:
        if not r["agree"]:
            v = Candidate(r["verdict"], r["threshold"]).label
            out.append(f"Miss: {r['problem']}: the verdict {v} ends {r['gap']:.1%} behind {r['winner']}.")
    return out


def to_markdown(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    agree = sum(r["agree"] for r in records)
    cost = max((r["pilot_cost_frac"] for r in records), default=0.0)
    lines = [
        "## Verdict: does `diagnose` pick the method that wins full training?",
        "",
        f"`diagnose` (budget 10% of the planned steps) against full training of every candidate "
        f"(no clipping; per-sample, global-norm and spectral clipping at the 3 radii its statistics "
        f"set), seed {args.seed}. **Agreement: {agree} of {len(records)}** (verdict = winner, or within "
        f"{AGREE_TOL:.0%} of its final metric); largest pilot cost {cost:.1%} of one full run.",
        "",
        *_table(records),
    ]
    secs = sum(r["seconds_diagnose"] + r["seconds_full_runs"] for r in records)
    lines += ["", f"Wall time {secs:.0f} s in all (rough: the machine was shared)."]
    notes = _notes(records)
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    lines += [
        "",
        "Why the verdicts come out this way (the matched-progress radius rule for per-sample "
        "clipping under heavy tails, spike-free radii for spectral and global-norm clipping, the "
        "race's stages): docs/diagnostics.md, *How well it works (measured)*.",
    ]
    if args.also is not None:
        other = json.loads(args.also.read_text())
        agree2 = sum(r["agree"] for r in other)
        cost2 = max((r["pilot_cost_frac"] for r in other), default=0.0)
        seeds = sorted({r.get("seed") for r in other if r.get("seed") is not None})
        which = f"seed {', '.join(map(str, seeds))}" if seeds else "another run"
        subset = {r["problem"] for r in other} != {r["problem"] for r in records}
        lines += [
            "",
            f"The same measurement on {which}{', for a subset of the problems' if subset else ''}: "
            f"**agreement {agree2} of {len(other)}**; largest pilot cost {cost2:.1%}.",
            "",
            *_table(other),
        ]
        notes2 = _notes(other)
        if notes2:
            lines += [""] + [f"- {n}" for n in notes2]
    return "\n".join(lines)
