"""Run an experiment by name into a run directory, fresh or resumed, and plot runs."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from robustclip.experiments._config import apply_overrides, load_toml
from robustclip.experiments._registry import get_experiment, make_config
from robustclip.experiments._run import RunContext, default_run_dir, load_run, resolve_device

__all__ = ["cpu_threads", "plot_runs", "quiet_skips", "run_config", "run_experiment"]


def run_experiment(
    name: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    config_file: str | Path | None = None,
    checkpoint_every: int = 200,
    progress: bool | None = None,
    interrupt_after: int | None = None,
    interrupt_by_kill: bool = False,
    quiet: bool = False,
    threads: int | None = None,
) -> Path:
    """Run experiment ``name`` and return its run directory.

    Args:
        overrides: ``{"key": "value"}`` strings, parsed to the config fields' types.
        out: the run directory (default ``runs/<name>-<time>``).
        resume: continue the run in ``out`` from its checkpoint (its saved config is used;
            overrides must agree with it). A run stopped before its first arm's first checkpoint
            restarts from the beginning.
        config_file: a TOML file of overrides, applied before ``overrides``.
        checkpoint_every: steps between checkpoints within an arm (arms always end with one).
        interrupt_after: testing aid: stop after this many steps without a checkpoint, as a kill.
        interrupt_by_kill: testing aid: at ``interrupt_after``, ``SIGKILL`` this process.
        threads: torch CPU threads for the run (restored afterwards). ``None``: the config's
            ``threads`` field if it has one (the demo), else the experiment's ``DEFAULT_THREADS``
            (1 for the small-model experiments: intra-op threads do not speed up tiny matrices,
            and on a shared machine they spin against each other), else torch's default.
    """
    get_experiment(name)  # an unknown name is the first error, before any --resume check
    if resume:
        if out is None:
            raise ValueError("--resume needs --out DIR, the run directory to continue.")
        saved = Path(out) / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"no run to resume in {str(out)!r} (no config.json there).")
        info = json.loads((Path(out) / "run.json").read_text()) if (Path(out) / "run.json").is_file() else {}
        if info.get("experiment", name) != name:
            raise ValueError(f"{str(out)!r} holds a run of {info['experiment']!r}, not {name!r}.")
        # the saved config with any overrides on top; the checkpoint then refuses a config that
        # differs from the one the run was started with, naming the keys
        cfg = make_config(name, json.loads(saved.read_text()), from_string=False)
    else:
        cfg = make_config(name)
    if config_file:
        cfg = apply_overrides(cfg, load_toml(config_file), from_string=False)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return run_config(name, cfg, out=out, resume=resume, checkpoint_every=checkpoint_every, progress=progress,
                      interrupt_after=interrupt_after, interrupt_by_kill=interrupt_by_kill, quiet=quiet,
                      threads=threads)


def run_config(
    name: str,
    cfg: Any,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 200,
    progress: bool | None = None,
    interrupt_after: int | None = None,
    interrupt_by_kill: bool = False,
    quiet: bool = False,
    threads: int | None = None,
) -> Path:
    """Run experiment ``name`` with the config ``cfg`` as built; the arguments are
    :func:`run_experiment`'s."""
    mod = get_experiment(name)
    preflight_checks(mod, cfg)
    path = Path(out) if out is not None else default_run_dir(name)
    if threads is None:
        threads = getattr(cfg, "threads", getattr(mod, "DEFAULT_THREADS", None))
    with cpu_threads(threads):
        return _execute(mod, name, cfg, path, resume, checkpoint_every, progress, interrupt_after,
                        interrupt_by_kill, quiet)


def preflight_checks(mod: Any, cfg: Any) -> None:
    """Checks of the whole config and of what needs the machine (the device) or the disk (the
    data), before anything is written: a run that cannot start leaves no run directory behind."""
    from robustclip.experiments._config import validate_config

    validate_config(cfg)
    if isinstance(getattr(cfg, "device", None), str):
        resolve_device(cfg.device)
    preflight = getattr(mod, "preflight", None)
    if preflight is not None:
        preflight(cfg)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` torch CPU threads inside the block (``None`` or 0: leave them as they are)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"threads must be a non-negative int, got {n!r}.")
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _QuietAfter(logging.Filter):
    """Let the first ``n`` warnings of the clipper through, then one note, then silence.

    A method that diverges (the experiments compare some that do) would otherwise print a
    skipped-step warning on every remaining step; the metrics count them instead.
    """

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.n, self.seen = n, 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.seen += 1
        if self.seen == self.n + 1:
            record.msg, record.args = "robustclip: further skipped-step warnings of this run are silenced.", ()
        return self.seen <= self.n + 1


@contextlib.contextmanager
def quiet_skips() -> Iterator[None]:
    log = logging.getLogger("robustclip")
    f = _QuietAfter()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


def _execute(mod: Any, name: str, cfg: Any, path: Path, resume: bool, checkpoint_every: int,
             progress: bool | None, interrupt_after: int | None, interrupt_by_kill: bool, quiet: bool) -> Path:
    with quiet_skips():
        return _execute_inner(mod, name, cfg, path, resume, checkpoint_every, progress, interrupt_after,
                              interrupt_by_kill, quiet)


def _execute_inner(mod: Any, name: str, cfg: Any, path: Path, resume: bool, checkpoint_every: int,
                   progress: bool | None, interrupt_after: int | None, interrupt_by_kill: bool,
                   quiet: bool) -> Path:
    ctx = RunContext(
        path, name, cfg, resume=resume, checkpoint_every=checkpoint_every, progress=progress,
        interrupt_after=interrupt_after, interrupt_by_kill=interrupt_by_kill, quiet=quiet,
    )
    try:
        ctx.note(f"robustclip run {name}: writing to {path}")
        summary = mod.run(cfg, ctx)
        ctx.finish(summary)
    finally:
        ctx.close()
    mod.plot([load_run(path)], path)
    if not quiet:
        fmt = getattr(mod, "format_summary", None)
        if fmt is not None:
            print(fmt(summary))
        print(f"run directory: {path}")
    return path


def plot_runs(paths: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Overlay runs of one experiment; returns the PNGs written (into ``out``)."""
    if not paths:
        raise ValueError("robustclip plot needs at least one run directory.")
    runs = [load_run(p) for p in paths]
    kinds = {r.experiment for r in runs}
    if len(kinds) > 1:
        raise ValueError(
            f"these runs are of different experiments ({sorted(kinds)}); plot runs of one "
            "experiment together."
        )
    plot = get_experiment(runs[0].experiment).plot
    target = Path(out) if out is not None else Path(paths[0]) / "overlay"
    target.mkdir(parents=True, exist_ok=True)
    return plot(runs, target)
