"""demo: the four (or five) methods on two embedded problems, in about a minute on a CPU.

``robustclip demo`` runs it into a fresh directory and prints its table; ``robustclip run demo``
runs it like every other experiment (``--resume`` included).

Problems (nothing is downloaded):

* ``synthetic``: the synthetic heavy-tailed problem of :func:`robustclip.experiments.data.synthetic_classification`
  -- a linear teacher labels Gaussian inputs ``x ~ N(0, I_d)``, and each training input is moved
  by ``sqrt(d) * R * u`` (``u`` a random unit direction, ``R`` a Pareto radius of tail index
  ``alpha``), so per-sample gradients have a heavy tail while the labels are right. Test inputs
  are clean.
* ``digits``: scikit-learn's 8x8 digits with 20% of the training labels flipped to another
  class; the test labels are clean.

Methods (labels of :mod:`robustclip.experiments._methods`): SGDM, Clip-SGD, NSGD, PS-Clip-SGD,
and Spectral when spectral clipping is installed. Every method runs SGD with momentum 0.9 for
the same number of epochs; each method's learning rate was picked by :func:`tune` on seeds the
demo does not report, by accuracy on a validation split of their *training* data -- the test
data never choose a setting. The table reports the final training loss (on the training data
as given, noisy labels included), test accuracy, wall time, and time per step relative to SGDM.

References: Nobile & Grohs, arXiv:2605.02701 (PS-Clip-SGD); Lobanov & Koloskova,
arXiv:2605.14800 (Clip-SGD, NSGD); Yukhimchuk et al., arXiv:2605.11838 (spectral clipping).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import robustclip as rc
from robustclip.experiments._methods import (
    MethodParams,
    available_methods,
    build_method,
    check_methods,
)
from robustclip.experiments._plot import Panel, curves, save_panels
from robustclip.experiments._run import RunContext, RunData, holds_run, seed_everything, write_csv
from robustclip.experiments._runner import cpu_threads, quiet_skips, run_config
from robustclip.experiments._train import EpochMeter, TensorBatches, evaluation, steps_with_batches
from robustclip.experiments.data import Split, load_digits, synthetic_classification
from robustclip.experiments.models import MLP

DESCRIPTION = "SGDM, Clip-SGD, NSGD, PS-Clip-SGD (and Spectral) on two embedded problems, about a minute on a CPU"
DEMO_METHODS = ("SGDM", "Clip-SGD", "NSGD", "PS-Clip-SGD", "Spectral")


def _default_methods() -> tuple[str, ...]:
    have = available_methods()
    return tuple(m for m in DEMO_METHODS if m in have)


@dataclass(frozen=True)
class ProblemSetup:
    """One demo problem: data, model and each method's step size and radius."""

    epochs: int
    batch_size: int
    hidden: tuple[int, ...]
    lr: dict[str, float]  # per method label; "default" for the rest
    clip: float  # radius c of Clip-SGD and PS-Clip-SGD
    tau: float  # threshold of spectral clipping


#: the demo's settings, per problem. The learning rates are what ``tune("runs/demo-tune")``
#: picked from :data:`LR_GRID` on :data:`TUNING_SEEDS` (validation accuracy, never test data).
SETUPS: dict[str, ProblemSetup] = {
    "synthetic": ProblemSetup(
        epochs=10, batch_size=32, hidden=(64,),
        lr={"SGDM": 0.003, "Clip-SGD": 0.01, "NSGD": 0.01, "PS-Clip-SGD": 0.03, "Spectral": 0.01, "default": 0.01},
        clip=1.0, tau=1.0,
    ),
    "digits": ProblemSetup(
        epochs=30, batch_size=32, hidden=(128, 128),
        lr={"SGDM": 0.01, "Clip-SGD": 0.01, "NSGD": 0.01, "PS-Clip-SGD": 0.1, "Spectral": 0.01, "default": 0.01},
        clip=1.0, tau=1.0,
    ),
}


@dataclass
class Config:
    methods: tuple[str, ...] = dataclasses.field(default_factory=_default_methods)
    problems: tuple[str, ...] = ("synthetic", "digits")
    momentum: float = 0.9
    seed: int = 0  # first seed
    seeds: int = 5  # seeds per (problem, method); the table shows means
    synthetic_alpha: float = 1.2  # tail index of the input scales of the synthetic problem
    label_noise: float = 0.2  # share of flipped digits labels
    scale: float = 1.0  # multiplies every problem's epochs (tests use a small value)
    # torch CPU threads: 1, because intra-op threads do not speed up these tiny matrices and on
    # a busy machine they spin against other processes (50x slower steps measured); 0: default
    threads: int = 1

    def check(self) -> None:
        check_methods(self.methods)
        for p in self.problems:
            if p not in SETUPS:
                raise ValueError(f"unknown demo problem {p!r}; choose from {list(SETUPS)}.")
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}.")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}.")
        if not 0 < self.scale <= 10:
            raise ValueError(f"scale must be in (0, 10], got {self.scale}.")


def _data(problem: str, cfg: Config, seed: int) -> Split:
    if problem == "synthetic":
        return synthetic_classification(alpha=cfg.synthetic_alpha, seed=seed)
    return load_digits(cfg.label_noise, seed=seed)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    t0 = time.perf_counter()
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    arms = [(p, m, s) for p in cfg.problems for s in seeds for m in cfg.methods]
    for problem, method, seed in ctx.iterate(arms, "demo"):
        setup = SETUPS[problem]
        lr = setup.lr.get(method, setup.lr["default"])
        train_arm(ctx, f"{problem}/{method}/seed{seed}", problem, method, seed, lr, _data(problem, cfg, seed), cfg)
    summary = summarize(ctx.records, cfg)
    summary["total_time_s"] = time.perf_counter() - t0  # of this session, if the run was resumed
    write_csv(summary["rows"], ctx.path / "results.csv")
    return summary


def train_arm(ctx: RunContext, arm_id: str, problem: str, method: str, seed: int, lr: float, split: Split,
              cfg: Config) -> None:
    """Train one (problem, method, seed) arm, logging an epoch record per epoch."""
    if ctx.is_done(arm_id):
        return
    tag = {"arm": arm_id, "method": method, "problem": problem, "seed": seed, "lr": lr}
    setup = SETUPS[problem]
    device = torch.device("cpu")  # the demo is a CPU demo: tiny models, no transfer overhead
    train, test = (split.x_train, split.y_train), (split.x_test, split.y_test)
    batches = TensorBatches(*train, setup.batch_size, seed, device)
    seed_everything(seed)
    model = MLP([split.x_train.shape[1], *setup.hidden, split.num_classes])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
    with rc.Clipper(model, optimizer, build_method(method, MethodParams(clip=setup.clip, tau=setup.tau))) as clipper:
        meter = EpochMeter(device)
        arm = ctx.arm(arm_id, {"model": model, "optimizer": optimizer, "clipper": clipper, "meter": meter})
        steps_per_epoch = batches.steps_per_epoch
        epochs = max(1, round(setup.epochs * cfg.scale))
        meter.start_clock()
        for step, x, y in steps_with_batches(arm, batches, epochs * steps_per_epoch, arm_id):
            out = model(x)
            clipper.backward(_loss(out, y))
            info = clipper.step()
            meter.add(info, out, y)
            if (step + 1) % steps_per_epoch == 0:
                readings = meter.read(step + 1)
                ctx.log({**tag, "kind": "epoch", "epoch": (step + 1) // steps_per_epoch, **readings,
                         **evaluation(model, _loss, device, train=train, test=test)})
                meter.start_clock()
        arm.finish()


#: the seeds :func:`tune` picked the learning rates on: none of them is reported by the demo
TUNING_SEEDS = (100, 101)
#: the learning rates :func:`tune` tries
LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)


def validation_split(split: Split, seed: int, fraction: float = 0.2) -> Split:
    """``split`` with its test part replaced by ``fraction`` of its training part, held out.

    The held-out part keeps the training data as given (flipped labels, heavy-tailed inputs):
    what a user without clean data would validate on. The test part is not kept at all.
    """
    n = split.x_train.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7919 + seed))
    val, tr = perm[: round(fraction * n)], perm[round(fraction * n) :]
    return Split(split.x_train[tr], split.y_train[tr], split.x_train[val], split.y_train[val], None, split.num_classes)


def tune(
    out: str | Path,
    cfg: Config | None = None,
    seeds: tuple[int, ...] = TUNING_SEEDS,
    grid: tuple[float, ...] = LR_GRID,
    quiet: bool = True,
) -> dict[str, dict[str, float]]:
    """Pick each (problem, method)'s learning rate: the best mean validation accuracy over
    ``seeds`` after the demo's epochs, on :func:`validation_split` of each seed's training data.

    Run it on seeds the demo does not report (the default), so the reported test accuracy is
    not selected on: ``tune("runs/demo-tune")`` wrote the learning rates of :data:`SETUPS`.
    Returns ``{problem: {method: lr}}``; the run directory ``out`` keeps every arm's metrics.
    """
    cfg = cfg or Config()
    cfg.check()
    if set(seeds) & set(range(cfg.seed, cfg.seed + cfg.seeds)):
        raise ValueError(f"tuning seeds {seeds} overlap the reported seeds; pick seeds outside them.")
    ctx = RunContext(out, "demo-tune", cfg, checkpoint_every=0, progress=None if not quiet else False, quiet=quiet)
    try:
        with cpu_threads(cfg.threads), quiet_skips():
            for problem in cfg.problems:
                for seed in seeds:
                    split = validation_split(_data(problem, cfg, seed), seed)
                    for method in cfg.methods:
                        for lr in grid:
                            train_arm(ctx, f"{problem}/{method}/lr{lr:g}/seed{seed}", problem, method, seed, lr, split, cfg)
        final: dict[tuple[str, str, float], list[float]] = {}
        for r in ctx.records:
            if r.get("kind") == "epoch" and r["epoch"] == max(1, round(SETUPS[r["problem"]].epochs * cfg.scale)):
                final.setdefault((r["problem"], r["method"], r["lr"]), []).append(r["test_acc"])
        best: dict[str, dict[str, float]] = {}
        for problem in cfg.problems:
            for method in cfg.methods:
                # the best mean validation accuracy; on a tie, the smaller step
                scores = [(sum(final[(problem, method, lr)]) / len(seeds), -lr) for lr in grid]
                best.setdefault(problem, {})[method] = -max(scores)[1]
        ctx.finish({"learning_rates": best, "seeds": list(seeds), "grid": list(grid)})
    finally:
        ctx.close()
    return best


def summarize(records: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """One row per (problem, method): final-epoch numbers averaged over the seeds."""
    final: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in records:
        if r.get("kind") == "epoch":
            final.setdefault((r["problem"], r["method"]), {})[r["seed"]] = r  # the last epoch wins
    rows = []
    for p in cfg.problems:
        base = final.get((p, "SGDM"))
        base_step = _mean([r["step_time"] for r in base.values()]) if base else float("nan")
        for m in cfg.methods:
            if (p, m) not in final:
                continue
            rs = list(final[(p, m)].values())
            step_time = _mean([r["step_time"] for r in rs])
            rows.append({
                "problem": p,
                "method": m,
                "train_loss": _mean([r["train_loss"] for r in rs]),
                "test_acc": _mean([r["test_acc"] for r in rs]),
                "test_acc_min": min(r["test_acc"] for r in rs),
                "test_acc_max": max(r["test_acc"] for r in rs),
                "wall_time_s": _mean([r["time"] for r in rs]),
                "step_time_ms": 1000 * step_time,
                "time_per_step_vs_sgd": step_time / base_step,
                "epochs": rs[0]["epoch"],
                "seeds": len(rs),
            })
    return {"rows": rows}


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def format_table(summary: dict[str, Any]) -> str:
    """The results table: means over seeds (test accuracy also as min-max)."""
    head = (f"{'problem':<11}{'method':<13}{'train loss':>11}{'test acc':>10}{'(min-max)':>14}"
            f"{'wall time':>11}{'time/step vs SGD':>18}")
    lines = [head, "-" * len(head)]
    for r in summary["rows"]:
        lines.append(
            f"{r['problem']:<11}{r['method']:<13}{r['train_loss']:>11.4g}{r['test_acc']:>10.3f}"
            f"{r['test_acc_min']:>8.3f}-{r['test_acc_max']:.3f}"
            f"{r['wall_time_s']:>10.2f}s{r['time_per_step_vs_sgd']:>17.2f}x"
        )
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """The table, then the time it took."""
    return (f"{format_table(summary)}\n\ntotal {summary['total_time_s']:.1f} s on {torch.get_num_threads()} "
            "threads; results.csv, metrics (CSV, JSONL) and plots are in the run directory")


def plot(runs: list[RunData], out_dir: Path) -> list[Path]:
    paths = []
    problems: dict[str, None] = {}
    for run in runs:
        for r in run.records:
            if "problem" in r:
                problems.setdefault(r["problem"], None)
    for p in problems:
        def sel(r: dict[str, Any], p: str = p) -> bool:
            return r.get("problem") == p

        panels = [
            Panel(f"{p}: training loss", "epoch", "loss (training labels)", curves(runs, "train_loss", where=sel), logy=True),
            Panel(f"{p}: test accuracy", "epoch", "test accuracy", curves(runs, "test_acc", where=sel)),
            Panel(f"{p}: test accuracy vs time", "training time (s)", "test accuracy", curves(runs, "test_acc", x="time", where=sel, by="epoch")),
        ]
        paths.append(save_panels(out_dir / f"demo_{p}.png", panels))
    return paths


def run_demo(
    out: str | Path | None = None,
    cfg: Config | None = None,
    *,
    progress: bool | None = None,
    quiet: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """``robustclip demo``: run the demo into a fresh ``out`` (default ``runs/demo-<time>``),
    print its table and return the run directory and the summary.

    The same run as ``robustclip run demo``, with the demo's settings for a first look: no
    checkpoints within an arm (the demo takes about a minute), and a directory that already
    holds a run is refused rather than offered ``--resume``.
    """
    cfg = cfg or Config()
    cfg.check()
    if out is not None and holds_run(out):
        raise ValueError(
            f"{str(out)!r} already holds a run; the demo always starts afresh (it takes about a "
            "minute), so choose another --out directory or delete this one."
        )
    path = run_config("demo", cfg, out=out, checkpoint_every=0, progress=progress, quiet=quiet)
    return path, json.loads((path / "summary.json").read_text())
