"""The ``demo``, ``run``, ``list`` and ``plot`` sub-commands of ``robustclip``."""

from __future__ import annotations

import argparse
import dataclasses

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo``, ``run``, ``list`` and ``plot`` to the ``robustclip`` parser."""
    p = subparsers.add_parser(
        "demo",
        help="compare SGDM, Clip-SGD, NSGD and PS-Clip-SGD on embedded data (a few minutes on a CPU)",
        description="Run SGDM, Clip-SGD, NSGD and PS-Clip-SGD (and Spectral when installed) on a "
        "synthetic heavy-tailed problem and on digits with 20% flipped labels; print a results "
        "table and write metrics (CSV, JSONL) and PNG plots into a run directory.",
    )
    p.add_argument("--out", help="run directory (default: runs/demo-<time>)")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", default=[],
                   help="override a demo setting (methods, problems, momentum, seed, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # a smaller demo for tests and smoke checks: not part of the documented interface
    p.add_argument("--size", choices=("full", "tiny"), default="full", help=argparse.SUPPRESS)
    p.set_defaults(func=_demo)

    p = subparsers.add_parser(
        "run",
        help="run a built-in experiment (see 'robustclip list')",
        description="Run EXPERIMENT into a run directory holding config, metrics, plots and a "
        "checkpoint. Override config fields with --set key=value or a TOML file.",
    )
    p.add_argument("experiment", help="experiment name (see 'robustclip list')")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config field; repeat for several (lists: a=1,2,3)")
    p.add_argument("--config", help="TOML file of config overrides (applied before --set)")
    p.add_argument("--out", help="run directory (default: runs/<experiment>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=200, metavar="STEPS",
                   help="steps between checkpoints within an arm (default 200; arms always end with one)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: 1 for the small-model experiments, else torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # a testing aid, not part of the documented interface: SIGKILL this process after N steps
    p.add_argument("--kill-after", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)

    p = subparsers.add_parser("list", help="list the experiments, their configs and the methods",
                              description="List the built-in experiments and the method labels.")
    p.add_argument("experiment", nargs="?", help="show this experiment's config fields and defaults")
    p.set_defaults(func=_list)

    p = subparsers.add_parser(
        "plot", help="overlay the curves of one or more run directories",
        description="Overlay runs of one experiment (e.g. two configs) in PNG plots.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="where to write the PNGs (default: RUN_DIR/overlay of the first run)")
    p.set_defaults(func=_plot)


def _demo(args: argparse.Namespace) -> int:
    from robustclip.experiments import demo
    from robustclip.experiments._config import apply_overrides, parse_set_args

    cfg = demo.Config()
    if args.size == "tiny":
        cfg = dataclasses.replace(cfg, scale=0.1, seeds=1)
    cfg = apply_overrides(cfg, parse_set_args(args.sets))
    demo.run_demo(args.out, cfg, progress=False if args.no_progress else None)
    return 0


def _run(args: argparse.Namespace) -> int:
    from robustclip.experiments._config import parse_set_args
    from robustclip.experiments._runner import run_experiment

    run_experiment(
        args.experiment, parse_set_args(args.sets), out=args.out, resume=args.resume,
        config_file=args.config, checkpoint_every=args.checkpoint_every,
        progress=False if args.no_progress else None, threads=args.threads,
        interrupt_after=args.kill_after, interrupt_by_kill=args.kill_after is not None,
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    from robustclip.experiments import describe, list_experiments, make_config
    from robustclip.experiments._config import describe_fields
    from robustclip.experiments._methods import METHODS, available_methods

    if args.experiment:
        print(f"{args.experiment}: {describe(args.experiment)}\nconfig (override with --set key=value):")
        print(describe_fields(make_config(args.experiment)))
        return 0
    print("experiments (robustclip run NAME; robustclip list NAME shows its config):")
    for name in list_experiments():
        print(f"  {name:<18} {describe(name)}")
    have = available_methods()
    print("\nmethods (labels for --set methods=...):")
    for label, spec in METHODS.items():
        note = "" if label in have else "  [not installed]"
        print(f"  {label:<18} {spec.description}{note}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from robustclip.experiments._runner import plot_runs

    paths = plot_runs(args.runs, args.out)
    for p in paths:
        print(p)
    return 0
