"""``robustclip diagnose EXPERIMENT [--set key=value ...] --out DIR``.

Runs :func:`robustclip.diagnostics.diagnose` on a built-in experiment's problem (its model,
training data, per-sample loss, batch size and SGD step size, from
``robustclip.experiments.load_problem``): the statistics run, the candidates and the pilot race,
within ``--budget`` of ``--planned-steps``. Writes the verdict (report.md, verdict.json,
pilot.png) into DIR and the statistics run's own files into DIR/statistics/.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

__all__ = ["register", "run_diagnose", "parse_overrides"]


def register(subparsers: Any) -> None:
    """Add the ``diagnose`` sub-command."""
    p = subparsers.add_parser(
        "diagnose",
        help="say which clipping (and radius) a built-in experiment needs, validated by a short pilot",
        description=(
            "Measure the gradient statistics of a built-in experiment (per-sample norms, tail index, "
            "strong-growth rho over the whole training set, (L0, L1)-smoothness, layer spectra), pick "
            "the leading candidate methods and radii, and race them by successive halving within "
            "--budget of --planned-steps. Writes report.md, verdict.json and pilot.png into --out."
        ),
    )
    p.add_argument("experiment", help="a built-in experiment, e.g. label-noise")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override an experiment setting (repeatable), e.g. --set label_noise=0.4",
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write the report into")
    p.add_argument("--planned-steps", type=int, default=None,
                   help="optimizer steps of the full run the verdict is for (default: --epochs epochs)")
    p.add_argument("--epochs", type=int, default=10, help="planned epochs when --planned-steps is not given")
    p.add_argument("--budget", type=float, default=0.1, help="share of the planned steps to spend (default 0.1)")
    p.add_argument("--methods", nargs="*", default=None,
                   help="candidate methods (none, per_sample_clip, clip_by_global_norm, spectral_clip)")
    p.add_argument("--probe-size", type=int, default=128, help="training samples in the probe set (>= 16)")
    p.add_argument("--engine", default="auto", help="per-sample engine: auto, vmap, hooks, loop")
    p.add_argument("--lr", type=float, default=None, help="SGD step size (default: the experiment's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the experiment's)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and the race")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run_diagnose)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; values stay strings (the experiment
    converts them to its config's types)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set label_noise=0.4).")
        out[key.strip()] = value.strip()
    return out


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "probe_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    for name in ("planned_steps", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}.")


def run_diagnose(args: argparse.Namespace) -> int:
    """The ``diagnose`` command (see the module docstring)."""
    from torch.utils.data import DataLoader, TensorDataset

    from robustclip.diagnostics._diagnose import diagnose
    from robustclip.experiments import load_problem

    _check_args(args)
    problem = load_problem(args.experiment, parse_overrides(args.overrides))
    batch = args.batch_size or problem.batch_size
    lr = args.lr if args.lr is not None else problem.lr
    x, y = problem.train
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    planned = args.planned_steps or args.epochs * len(loader)
    device = torch.device(args.device)
    metric_fn = None
    if problem.test is not None:
        xt, yt = problem.test
        xt, yt = xt.to(device), yt.to(device)
        loss_fn = problem.loss_fn

        def metric_fn(model: torch.nn.Module) -> float:
            # held-out mean loss, in chunks
            total = 0.0
            for s in range(0, xt.shape[0], 1024):
                total += float(loss_fn(model(xt[s : s + 1024]), yt[s : s + 1024]).sum())
            return total / xt.shape[0]

    d = diagnose(
        problem.model, problem.loss_fn, loader, planned_steps=planned, budget=args.budget,
        metric_fn=metric_fn, methods=args.methods, noise_fn=problem.grad_noise,
        optimizer_fn=lambda params: torch.optim.SGD(params, lr=lr, momentum=problem.momentum),
        probe_size=args.probe_size, seed=args.seed, device=device, engine=args.engine,
    )
    paths = d.save(args.out, plots=not args.no_plots)
    print(f"{args.experiment}: {d.headline}.")
    print(d.snippet)
    print(f"wrote {len(paths)} files to {args.out}: {', '.join(sorted(paths))}")
    return 0
