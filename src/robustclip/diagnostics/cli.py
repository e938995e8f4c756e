"""``robustclip diagnose EXPERIMENT [--set key=value ...] --out DIR``.

Trains the experiment's model with plain SGD for a few epochs, observing every step the
per-sample gradient norms (through a clipper with ``per_sample_clip(None)``: the mean gradient,
computed the per-sample way) and the layer gradients' spectra, and probing tail index, strong
growth and local smoothness on a fixed probe set at the start and a few times per epoch. Writes
the report, plots and metrics into DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["register", "run_diagnose", "parse_overrides"]


def register(subparsers: Any) -> None:
    """Add the ``diagnose`` sub-command."""
    p = subparsers.add_parser(
        "diagnose",
        help="measure gradient noise and say which clipping a built-in experiment needs",
        description=(
            "Train a built-in experiment's model briefly with SGD and measure: per-sample gradient "
            "norms, the tail index of the gradient noise, the strong-growth constant rho, an "
            "(L0, L1)-smoothness fit and per-layer gradient spectra; then write a verdict with "
            "suggested thresholds (report.md, diagnostics.json, metrics, PNG plots) into --out."
        ),
    )
    p.add_argument("experiment", help="a built-in experiment, e.g. label-noise")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override an experiment setting (repeatable), e.g. --set label_noise=0.4",
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write the report into")
    p.add_argument("--epochs", type=int, default=3, help="training epochs to observe (default 3)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    p.add_argument("--probe-size", type=int, default=512, help="training samples in the probe set (>= 16)")
    p.add_argument("--probes-per-epoch", type=int, default=1, help="probes per epoch, plus one at the start")
    p.add_argument("--clip-quantile", type=float, default=0.9, help="quantile of per-sample norms that suggests c")
    p.add_argument("--spectral-quantile", type=float, default=0.85, help="quantile of sigma_max that suggests tau")
    p.add_argument("--spectral-rank", type=int, default=4, help="singular values kept per layer")
    p.add_argument("--spectrum-every", type=int, default=None, help="read spectra every N steps (default: ~50 per epoch)")
    p.add_argument("--sketch-dim", type=int, default=512, help="random-sketch width for the tail index (0: exact)")
    p.add_argument("--layers", nargs="*", default=None, help="restrict the tail index to these modules")
    p.add_argument("--engine", default="auto", help="per-sample engine: auto, vmap, hooks, loop")
    p.add_argument("--lr", type=float, default=None, help="SGD step size (default: the experiment's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the experiment's)")
    p.add_argument("--seed", type=int, default=0, help="seed of shuffling, the probe set and the sketch")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
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
    for name in ("epochs", "probe_size", "probes_per_epoch", "spectral_rank"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    for name in ("max_steps", "spectrum_every", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}.")
    if args.sketch_dim < 0:
        raise ValueError(f"--sketch-dim must be >= 0 (0 = exact gradients), got {args.sketch_dim}.")


def run_diagnose(args: argparse.Namespace) -> int:
    """The ``diagnose`` command (see the module docstring)."""
    import robustclip as rc
    from robustclip.diagnostics._tracker import Diagnostics
    from robustclip.experiments import load_problem

    _check_args(args)
    problem = load_problem(args.experiment, parse_overrides(args.overrides))
    device = torch.device(args.device)
    model = problem.model.to(device)
    x, y = problem.train
    x, y = x.to(device), y.to(device)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(args.seed)
    probe_idx = torch.randperm(n, generator=gen)[: min(args.probe_size, n)].to(device)
    batch = args.batch_size or problem.batch_size
    lr = args.lr if args.lr is not None else problem.lr
    steps_per_epoch = -(-n // batch)
    if args.max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    spectrum_every = args.spectrum_every or max(1, steps_per_epoch // 50)

    diag = Diagnostics(
        model,
        problem.loss_fn,
        (x[probe_idx], y[probe_idx]),
        batch_size=batch,
        clip_quantile=args.clip_quantile,
        spectral_quantile=args.spectral_quantile,
        spectral_rank=args.spectral_rank,
        spectrum_every=spectrum_every,
        sketch_dim=args.sketch_dim or None,
        layers=args.layers,
        engine=args.engine,
        seed=args.seed,
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    # the mean gradient, computed the per-sample way: plain SGD that also reports every norm
    clipper = rc.Clipper(model, opt, rc.per_sample_clip(None, engine=args.engine))
    probe_at = {
        round(k * steps_per_epoch / args.probes_per_epoch) for k in range(1, args.probes_per_epoch + 1)
    }
    bar = _progress(args.epochs * steps_per_epoch, args.no_progress, args.experiment)
    def probe() -> Any:
        # the clipper's per-sample engine watches every forward of the model; take it off while
        # the probe runs its own forward passes, so it never sees them
        if clipper.engine is not None:
            clipper.engine.detach()
        try:
            return diag.probe()
        finally:
            if clipper.engine is not None:
                clipper.engine.attach()

    try:
        probe()
        for _ in range(args.epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            for s in range(steps_per_epoch):
                idx = perm[s * batch : (s + 1) * batch]
                model.train()
                clipper.backward(problem.loss_fn(model(x[idx]), y[idx]))
                info = clipper.step()
                diag.observe(info)
                if s + 1 in probe_at:
                    rec = probe()
                    bar.set_postfix(alpha=_short(rec.tail_index), rho=_short(rec.rho), loss=_short(rec.loss))
                bar.update(1)
            diag.end_epoch()
    finally:
        clipper.close()
        bar.close()
    paths = diag.save(
        args.out,
        plots=not args.no_plots,
        extra={"experiment": args.experiment, "overrides": parse_overrides(args.overrides), "lr": lr, "train_epochs": args.epochs},
    )
    summary = diag.summary()
    print(f"{args.experiment}: {summary['headline']}.")
    print(f"wrote {len(paths)} files to {args.out}: {', '.join(sorted(paths))}")
    return 0


def _short(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **kw: Any) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, disable: bool, desc: str) -> Any:
    if disable:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra: no bar, same results
        return _NoBar()
    return tqdm(total=total, desc=f"diagnose {desc}", unit="step", file=sys.stderr, dynamic_ncols=True)
