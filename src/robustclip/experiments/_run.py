"""Run directories, metrics, checkpoints and resuming.

An experiment is a list of *arms* (one method on one seed, say), each a loop of steps. A run
directory holds::

    run.json          experiment name, versions, device, status
    config.toml       the config the run used (JSON values where TOML has none)
    metrics.jsonl     one JSON record per line, each tagged with its arm
    metrics.csv       the same records as a table (written when the run finishes)
    summary.json      the experiment's headline numbers
    checkpoint.pt     the state to continue from (see below)
    final/ARM.pt      each finished arm's final state (model, optimizer, clipper), once per arm
    *.png             plots

The checkpoint holds which arms are finished, how many metric lines were written, and, for the
arm in progress, the ``state_dict`` of every registered object (model, optimizer, clipper), the
arm's own accumulators, the step to continue from and every random number generator's state.
It is written atomically when the run starts (before any metric line, so a run killed at any
moment can be resumed), every ``checkpoint_every`` steps and at the end of every arm. Resuming
drops metric lines written after the checkpoint, restores everything and continues, so on CPU a
resumed run reproduces an uninterrupted one exactly (wall-clock fields aside).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import re
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustclip.experiments._config import config_to_dict, dump_toml

__all__ = ["Arm", "RunContext", "RunData", "Interrupted", "final_state_path", "holds_run", "load_final_state", "load_run"]

_CKPT = "checkpoint.pt"
_METRICS = "metrics.jsonl"
_FINAL = "final"
#: record keys that measure wall-clock time and so differ between a resumed and a fresh run
TIME_KEYS = ("time", "step_time", "wall_time", "eval_time")


class Interrupted(RuntimeError):
    """Raised by a run told to stop early (tests use it to simulate a killed process)."""


def _rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        if k not in state["generators"]:
            raise ValueError(f"the checkpoint has no state for generator {k!r}; was it another run?")
        g.set_state(state["generators"][k])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` (each arm calls this before building models)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.detach().cpu().tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda'.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available; use device=auto or cpu.")
    return dev


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` already holds a run (its metrics or checkpoint)."""
    p = Path(path)
    return (p / _METRICS).exists() or (p / _CKPT).exists()


def final_state_path(path: str | Path, arm_id: str) -> Path:
    """Where the final state of arm ``arm_id`` of the run in ``path`` is written."""
    # "/" separates the parts of an arm id ("pareto:1.1/NSGD/seed3"): keep it visible as "__"
    name = re.sub(r"[^A-Za-z0-9.=+-]", "_", arm_id.replace("/", "__"))
    return Path(path) / _FINAL / f"{name}.pt"


def load_final_state(path: str | Path, arm_id: str) -> dict[str, Any]:
    """The final ``state_dict`` of every object of a finished arm: ``{"model": ..., ...}``."""
    f = final_state_path(path, arm_id)
    if not f.is_file():
        raise FileNotFoundError(f"arm {arm_id!r} of the run in {str(path)!r} has no final state ({f} is missing); is it finished?")
    return torch.load(f, map_location="cpu", weights_only=False)["objects"]


def _atomic_save(obj: Any, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, target)  # atomic: a kill never leaves half a file


class RunContext:
    """The run directory of one experiment run, with logging and checkpointing.

    Args:
        path: the run directory (created).
        experiment: the experiment's name.
        config: the config dataclass.
        resume: continue from ``path/checkpoint.pt``.
        checkpoint_every: save the arm in progress every this many steps (0: only at arm ends).
        progress: show tqdm progress bars (``None``: only on a terminal).
        interrupt_after: testing aid -- raise :class:`Interrupted` after this many steps in this
            session, *without* saving, as if the process had been killed.
        interrupt_by_kill: testing aid -- at ``interrupt_after``, send this process ``SIGKILL``
            instead (a real kill: buffered metric lines are lost, as they would be).
    """

    def __init__(
        self,
        path: str | Path,
        experiment: str,
        config: Any,
        *,
        resume: bool = False,
        checkpoint_every: int = 200,
        progress: bool | None = None,
        interrupt_after: int | None = None,
        interrupt_by_kill: bool = False,
        quiet: bool = False,
    ) -> None:
        self.path = Path(path)
        self.experiment = experiment
        self.config = config
        self.checkpoint_every = int(checkpoint_every)
        self.progress = progress
        self.interrupt_after = interrupt_after
        self.interrupt_by_kill = interrupt_by_kill
        self.quiet = quiet
        self.session_steps = 0
        self.records: list[dict[str, Any]] = []
        self.done: list[str] = []
        self._pending: dict[str, Any] | None = None
        self._metrics_fh: Any = None
        self.path.mkdir(parents=True, exist_ok=True)
        metrics = self.path / _METRICS
        if resume:
            self._load_checkpoint()
        else:
            if holds_run(self.path):
                raise ValueError(
                    f"{str(self.path)!r} already holds a run; pass --resume to continue it, or "
                    "choose another --out directory."
                )
            cfg = config_to_dict(config)
            (self.path / "config.toml").write_text(
                f"# robustclip run {experiment}: the config this run used\n" + dump_toml(cfg)
            )
            (self.path / "config.json").write_text(json.dumps(_jsonable(cfg), indent=2) + "\n")
            self._write_run_json("running")
            # the empty checkpoint comes before the first metric line: from here on, a run
            # killed (or failing) at any moment can be resumed, restarting from scratch if need be
            self._save_checkpoint(None)
            metrics.write_text("")
        self._metrics_fh = metrics.open("a")

    # -- bookkeeping -------------------------------------------------------------------------------
    def _write_run_json(self, status: str, **extra: Any) -> None:
        info = {
            "experiment": self.experiment,
            "status": status,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.is_available(),
            "threads": torch.get_num_threads(),
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            **extra,
        }
        (self.path / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    def _load_checkpoint(self) -> None:
        ck_path = self.path / _CKPT
        if not ck_path.exists():
            raise FileNotFoundError(
                f"no checkpoint in {str(self.path)!r} to resume from; start the run without --resume."
            )
        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        if ck.get("experiment") != self.experiment:
            raise ValueError(
                f"{str(self.path)!r} holds a run of {ck.get('experiment')!r}, not {self.experiment!r}."
            )
        saved = ck.get("config")
        now = _jsonable(config_to_dict(self.config))
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ValueError(
                f"--resume continues the run in {str(self.path)!r} with the config it was started "
                f"with, and these keys differ: {diff}; drop the --set/--config values that differ, "
                "or start a new run in another --out directory."
            )
        self.done = list(ck["done"])
        self._pending = ck["arm"]
        metrics = self.path / _METRICS
        text = metrics.read_text() if metrics.exists() else ""
        lines = text.splitlines(keepends=True)[: ck["metrics_lines"]]
        if len(lines) < ck["metrics_lines"]:
            raise ValueError(
                f"{str(metrics)!r} has fewer lines than the checkpoint recorded; the run directory "
                "was changed by hand. Start a new run in another --out directory."
            )
        metrics.write_text("".join(lines))
        self.records = [json.loads(ln) for ln in lines]
        self._write_run_json("running", resumed=True)

    def _save_checkpoint(self, arm: Arm | None) -> None:
        if self._metrics_fh is not None:
            self._metrics_fh.flush()
        ck = {
            "experiment": self.experiment,
            "config": _jsonable(config_to_dict(self.config)),
            "done": list(self.done),
            "metrics_lines": len(self.records),
            "arm": arm._snapshot() if arm is not None else None,
        }
        _atomic_save(ck, self.path / _CKPT)

    def _interrupt(self) -> None:
        if self.interrupt_by_kill:
            os.kill(os.getpid(), signal.SIGKILL)
        self._metrics_fh.flush()
        raise Interrupted(f"stopped after {self.session_steps} steps (interrupt_after)")

    # -- what experiments call ---------------------------------------------------------------------
    def log(self, record: Mapping[str, Any]) -> None:
        """Append one metrics record (a flat mapping; tensors are read here)."""
        rec = _jsonable(dict(record))
        self.records.append(rec)
        self._metrics_fh.write(json.dumps(rec) + "\n")

    def is_done(self, arm_id: str) -> bool:
        return arm_id in self.done

    def arm(
        self,
        arm_id: str,
        objects: Mapping[str, Any],
        generators: Mapping[str, torch.Generator] | None = None,
        state: dict[str, Any] | None = None,
    ) -> Arm:
        """Start (or resume) arm ``arm_id``; ``objects`` have ``state_dict``/``load_state_dict``.

        ``state`` is the arm's own accumulators (numbers, tensors, lists): it is saved in the
        checkpoint and restored on resume, so keep per-epoch running sums there.
        """
        arm = Arm(self, arm_id, dict(objects), dict(generators or {}), dict(state or {}))
        if self._pending is not None:
            if self._pending["id"] != arm_id:
                raise ValueError(
                    f"the checkpoint is in the middle of arm {self._pending['id']!r} but the "
                    f"experiment started {arm_id!r}; the run directory and the code disagree."
                )
            arm._restore(self._pending)
            self._pending = None
        return arm

    def iterate(self, items: list[Any], desc: str) -> Iterator[Any]:
        """A progress bar over the arms (or any list)."""
        yield from _bar(items, total=len(items), desc=desc, progress=self.progress, leave=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Write the summary and ``metrics.csv``; the checkpoint stays (marked complete)."""
        self._save_checkpoint(None)
        self._metrics_fh.close()
        (self.path / "summary.json").write_text(json.dumps(_jsonable(dict(summary)), indent=2) + "\n")
        write_csv(self.records, self.path / "metrics.csv")
        self._write_run_json("finished")

    def close(self) -> None:
        if not self._metrics_fh.closed:
            self._metrics_fh.close()


def _bar(it: Any, total: int, desc: str, progress: bool | None, leave: bool) -> Iterator[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an experiments extra
        yield from it
        return
    # disable=None: tqdm shows the bar on a terminal only, so logs and tests stay clean
    yield from tqdm(it, total=total, desc=desc, leave=leave, disable=None if progress is None else not progress, dynamic_ncols=True)


@dataclass
class Arm:
    """One training loop of a run: its step counter, objects, generators and accumulators."""

    ctx: RunContext
    id: str
    objects: dict[str, Any]
    generators: dict[str, torch.Generator]
    state: dict[str, Any]
    start: int = 0
    step: int = 0
    resumed: bool = False
    _t0: float = field(default=0.0, repr=False)

    def _snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "step": self.step,
            "objects": {k: o.state_dict() for k, o in self.objects.items()},
            "state": self.state,
            "rng": _rng_state(self.generators),
        }

    def _restore(self, snap: Mapping[str, Any]) -> None:
        for k, o in self.objects.items():
            if k not in snap["objects"]:
                raise ValueError(f"the checkpoint of arm {self.id!r} has no state for {k!r}.")
            o.load_state_dict(snap["objects"][k])
        fresh = dict(self.state)
        self.state.clear()
        for k, v in snap["state"].items():
            # tensors were loaded to the CPU; put them back where the fresh state keeps them
            t = fresh.get(k)
            self.state[k] = v.to(t.device) if isinstance(v, torch.Tensor) and isinstance(t, torch.Tensor) else v
        _set_rng_state(snap["rng"], self.generators)
        self.start = self.step = int(snap["step"])
        self.resumed = True

    def steps(self, total: int, desc: str | None = None) -> Iterator[int]:
        """Yield the step indices still to do, checkpointing every ``checkpoint_every`` steps.

        The body of the loop for step ``s`` must be complete (metrics logged) when control comes
        back here; the checkpoint then records ``s + 1`` as the next step.
        """
        ctx = self.ctx
        for s in _bar(range(self.start, total), total - self.start, desc or self.id, ctx.progress, leave=False):
            self.step = s
            yield s
            self.step = s + 1
            ctx.session_steps += 1
            if ctx.interrupt_after is not None and ctx.session_steps >= ctx.interrupt_after:
                ctx._interrupt()
            if ctx.checkpoint_every and self.step % ctx.checkpoint_every == 0 and self.step < total:
                ctx._save_checkpoint(self)

    def finish(self) -> None:
        """Write the arm's final state to ``final/ARM.pt``, mark it done and checkpoint."""
        target = final_state_path(self.ctx.path, self.id)
        target.parent.mkdir(exist_ok=True)
        # before the checkpoint: a kill in between re-runs the arm and rewrites the same file
        _atomic_save({"arm": self.id, "step": self.step, "objects": {k: o.state_dict() for k, o in self.objects.items()}}, target)
        self.ctx.done.append(self.id)
        self.ctx._save_checkpoint(None)


# -- reading runs back -------------------------------------------------------------------------------


@dataclass
class RunData:
    """A finished (or partial) run read from disk, for plotting and comparing."""

    path: Path
    experiment: str
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        return self.path.name

    def select(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records if all(r.get(k) == v for k, v in match.items())]

    def arms(self, kind: str | None = None) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            if "arm" in r and (kind is None or r.get("kind") == kind):
                seen.setdefault(r["arm"], None)
        return list(seen)


def load_run(path: str | Path) -> RunData:
    """Read a run directory written by :class:`RunContext`."""
    p = Path(path)
    if not (p / "run.json").is_file() or not (p / _METRICS).is_file():
        raise FileNotFoundError(
            f"{str(p)!r} is not a robustclip run directory (no run.json/metrics.jsonl); pass a "
            "directory written by 'robustclip run' or 'robustclip demo'."
        )
    info = json.loads((p / "run.json").read_text())
    cfg = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    records = []
    for ln in (p / _METRICS).read_text().splitlines():
        if ln.strip():
            records.append(json.loads(ln))  # NaN/Infinity as Python's json writes them
    summary = json.loads((p / "summary.json").read_text()) if (p / "summary.json").is_file() else {}
    return RunData(p, info.get("experiment", "?"), cfg, records, summary)


def write_csv(records: list[Mapping[str, Any]], path: str | Path) -> None:
    """Records as CSV: the union of their keys as columns (lists are written as JSON)."""
    cols: dict[str, None] = {}
    for r in records:
        for k in r:
            cols.setdefault(k, None)
    with Path(path).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(cols))
        w.writeheader()
        for r in records:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})


def method_table(
    methods: Mapping[str, Mapping[str, Any]],
    name_width: int,
    columns: Sequence[tuple[str, str, str, str]],
    note: str = "",
) -> str:
    """A text table of a summary's methods, one row each.

    ``columns``: ``(header, key, format spec, unit)``, e.g. ``("time", "time_s", ">8.1f", "s")``;
    a header is right-aligned over the width of its spec plus its unit. ``note`` follows the
    header line.
    """
    head = f"{'method':<{name_width}}"
    for header, _, spec, unit in columns:
        head += f"{header:>{int(spec.lstrip('<>^').split('.')[0]) + len(unit)}}"
    lines = [head + note]
    for m, s in methods.items():
        lines.append(f"{m:<{name_width}}" + "".join(f"{s[key]:{spec}}{unit}" for _, key, spec, unit in columns))
    return "\n".join(lines)


def default_run_dir(experiment: str, root: str | Path = "runs") -> Path:
    """``runs/<experiment>-<YYYYmmdd-HHMMSS>`` (a suffix is added if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{experiment}-{stamp}"
    p, i = base, 1
    while p.exists():
        i += 1
        p = Path(f"{base}-{i}")
    return p
