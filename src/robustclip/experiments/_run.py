"""Run directories, metrics, checkpoints and resuming.

An experiment is a list of *arms* (one method on one seed, say), each a loop of steps. A run
directory holds::

    run.json          experiment name, versions, device, status
    config.toml       the config the run used (JSON values where TOML has none)
    metrics.jsonl     one JSON record per line, each tagged with its arm
    metrics.csv       the same records as a table (written when the run finishes)
    summary.json      the experiment's headline numbers
    checkpoint.pt     the state to continue from (see below)
    checkpoint.prev.pt  the checkpoint before it, kept to fall back to
    checkpoint.json   the SHA-256 and size of each checkpoint file, and what it holds
    final/ARM.pt      each finished arm's final state (model, optimizer, clipper), once per arm
    final/ARM.json    its SHA-256 and size
    *.png             plots

The checkpoint holds which arms are finished, how many metric lines were written, and, for the
arm in progress, the ``state_dict`` of every registered object (model, optimizer, clipper), the
arm's own accumulators, the step to continue from and every random number generator's state.
It is written atomically when the run starts (before any metric line, so a run killed at any
moment can be resumed), every ``checkpoint_every`` steps and at the end of every arm. Resuming
drops metric lines written after the checkpoint, restores everything and continues, so on CPU a
resumed run reproduces an uninterrupted one exactly (wall-clock fields aside).

What is saved is tensors and plain data only (dicts, lists, numbers, strings): the random number
generators' states are stored as integer tensors, not as the numpy and Python objects, so every
file loads with ``torch.load(weights_only=True)`` -- and is only ever loaded that way. A file
that holds anything else (a pickle that would run code) is refused unread.

A checkpoint is committed by ``checkpoint.json``, written atomically after the data: it lists
the SHA-256 of the current checkpoint and of the one before it. Resuming uses the newest file
whose bytes match a listed checksum and that loads; a damaged, truncated or swapped newest file
makes it fall back to ``checkpoint.prev.pt`` with a message naming both files (the run then
continues from there, exactly as it would have). Final states have a checksum beside them too.

Every write into the run directory goes to a temporary file that is then renamed over the
target, and a run directory holding a symbolic link is refused, so a write never lands outside
the directory.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import pickle
import platform
import random
import re
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustclip.experiments._config import config_to_dict, dump_toml, validate_config

__all__ = [
    "Arm", "CheckpointError", "Interrupted", "RunContext", "RunData", "RunDirectoryError", "final_state_path",
    "holds_run", "load_final_state", "load_run", "read_checkpoint",
]

_CKPT = "checkpoint.pt"
_PREV = "checkpoint.prev.pt"
_MANIFEST = "checkpoint.json"
_NEW = "checkpoint.pt.new"
_METRICS = "metrics.jsonl"
_FINAL = "final"
#: version of the checkpoint layout, in ``checkpoint.json`` and each ``final/ARM.json``
_FORMAT = 1
_CKPT_KEYS = {"experiment", "config", "done", "metrics_lines", "arm"}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)
#: record keys that measure wall-clock time and so differ between a resumed and a fresh run
TIME_KEYS = ("time", "step_time", "wall_time", "eval_time")


class Interrupted(RuntimeError):
    """Raised by a run told to stop early (tests use it to simulate a killed process)."""


class CheckpointError(ValueError):
    """A checkpoint or final state that cannot be used: missing, damaged, or not robustclip's."""


class RunDirectoryError(ValueError):
    """A run directory robustclip will not write into (it holds a symbolic link)."""


def _rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    # numpy's and Python's states as integer tensors and plain numbers, not their own objects:
    # those need unpickling, which ``torch.load(weights_only=True)`` rightly refuses
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_key, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "key": torch.tensor(py_key, dtype=torch.int64),
            "gauss": None if py_gauss is None else float(py_gauss),
        },
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["key"].tolist()), py["gauss"]))
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
    return any(os.path.lexists(p / n) for n in (_METRICS, _CKPT, _MANIFEST))


def final_state_path(path: str | Path, arm_id: str) -> Path:
    """Where the final state of arm ``arm_id`` of the run in ``path`` is written."""
    # "/" separates the parts of an arm id ("pareto:1.1/NSGD/seed3"): keep it visible as "__"
    name = re.sub(r"[^A-Za-z0-9.=+-]", "_", arm_id.replace("/", "__"))
    return Path(path) / _FINAL / f"{name}.pt"


def load_final_state(path: str | Path, arm_id: str) -> dict[str, Any]:
    """The final ``state_dict`` of every object of a finished arm: ``{"model": ..., ...}``.

    The file's bytes must match the SHA-256 in the ``.json`` beside it, and it is loaded with
    ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: the arm has no final state (it has not finished).
        CheckpointError: the file is damaged, has no checksum, or holds more than tensors and
            plain data (it is then not unpickled).
    """
    f = final_state_path(path, arm_id)
    if not f.is_file():
        raise FileNotFoundError(f"arm {arm_id!r} of the run in {str(path)!r} has no final state ({f} is missing); is it finished?")
    again = f"resume the run (robustclip run ... --resume --out {path}) after deleting {f.name} to train arm {arm_id!r} again"
    side = _sidecar(f)
    try:
        info = json.loads(side.read_text())
        want, size = str(info["sha256"]), int(info["bytes"])
    except FileNotFoundError:
        raise CheckpointError(
            f"{str(f)!r} has no checksum file {side.name} beside it (an older robustclip wrote it, or the run "
            f"was stopped while writing it), so it cannot be checked; {again}."
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"the checksum file {str(side)!r} cannot be read ({e}); {again}.") from None
    data = f.read_bytes()
    if len(data) != size or _sha256(data) != want:
        raise CheckpointError(
            f"{str(f)!r} is damaged: its bytes do not match the size and SHA-256 recorded in {side.name} "
            f"({len(data)} bytes, {size} recorded); {again}."
        )
    obj = _load_plain(f, data, again)
    if not isinstance(obj, dict) or not isinstance(obj.get("objects"), dict):
        raise CheckpointError(f"{str(f)!r} is not a final state written by robustclip; {again}.")
    return obj["objects"]


# -- files: checksums, plain-data loading, writes that never follow a link ---------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sidecar(f: Path) -> Path:
    return f.with_name(f.stem + ".json")


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_plain(f: Path, data: bytes, advice: str) -> Any:
    """``torch.load(weights_only=True)`` of ``data`` (the bytes of ``f``), errors as CheckpointError."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{str(f)!r} was refused unread: it holds objects other than tensors and plain data, which "
            "robustclip never writes and which could run code when unpickled (or it is not a torch file "
            f"at all); {advice}."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{str(f)!r} cannot be read ({first}); {advice}.") from None


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise RunDirectoryError(
            f"{str(path)!r} is a symbolic link (to {os.readlink(path)!r}); robustclip writes only real files "
            "inside a run directory, so that no write can land outside it. Replace the link with a copy of "
            "the file it points to (or remove it) and run again."
        )


def check_run_directory(path: str | Path) -> None:
    """Refuse a run directory that holds a symbolic link (at its top level or in ``final/``).

    Raises:
        RunDirectoryError: naming the link.
    """
    p = Path(path)
    if not p.is_dir():
        return
    for entry in p.iterdir():
        _refuse_link(entry)
    if (p / _FINAL).is_dir():
        for entry in (p / _FINAL).iterdir():
            _refuse_link(entry)


def _write_new(target: Path, data: bytes, sync: bool) -> None:
    """Create ``target`` afresh (an old file or link there is removed first, never followed)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o666)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())


def _write_atomic(target: Path, data: bytes | str, sync: bool = False) -> None:
    """Write ``target`` through a temporary file renamed over it: a kill never leaves half a file,
    and a symbolic link at ``target`` is refused rather than followed."""
    _refuse_link(target)
    tmp = target.with_name(target.name + ".tmp")
    _write_new(tmp, data.encode() if isinstance(data, str) else data, sync)
    os.replace(tmp, target)


def _open_append(path: Path) -> Any:
    _refuse_link(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666)
    return os.fdopen(fd, "a")


def _save_final(target: Path, obj: Any) -> None:
    _refuse_link(target.parent)
    target.parent.mkdir(exist_ok=True)
    data = _torch_bytes(obj)
    # the data first, then its checksum: a kill in between leaves a mismatch, which is refused
    _write_atomic(target, data, sync=True)
    info = {"format": _FORMAT, "file": target.name, "sha256": _sha256(data), "bytes": len(data)}
    _write_atomic(_sidecar(target), json.dumps(info, indent=2) + "\n", sync=True)


def _plain_state(value: Any, where: str) -> Any:
    """An arm's accumulators as tensors and plain data (numpy scalars become Python numbers)."""
    if isinstance(value, np.generic):  # before float: numpy's float64 is a float subclass
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if type(value) in (list, tuple):  # not a subclass (a NamedTuple needs unpickling)
        return type(value)(_plain_state(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain_state(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(
        f"the arm's state {where} is a {type(value).__name__}; a checkpoint holds tensors and plain data only "
        "(numbers, strings, lists, dicts with string keys), so that it loads with torch.load(weights_only=True). "
        "Keep it as a tensor or a list of numbers."
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint a resume of the run in ``path`` would continue from, checked and loaded.

    It is the newest of ``checkpoint.pt`` and ``checkpoint.prev.pt`` whose bytes match a SHA-256
    in ``checkpoint.json`` and that loads with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` holds no checkpoint.
        CheckpointError: none can be used (each file's problem is named).
    """
    return _find_checkpoint(Path(path))[0]


def _find_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any], str, list[str]]:
    """``(checkpoint, its manifest entry, its file name, problems of newer files)``."""
    manifest = path / _MANIFEST
    advice = (
        f"the run cannot be resumed; delete {str(path)!r} (or choose another --out) and start the run "
        "again without --resume"
    )
    if not os.path.lexists(manifest):
        if os.path.lexists(path / _CKPT):
            raise CheckpointError(
                f"{str(path / _CKPT)!r} has no {_MANIFEST} beside it: it was written by an older robustclip, "
                "whose checkpoints need unpickling (which could run code) and carry no checksum, so it is not "
                f"loaded; {advice}."
            )
        raise FileNotFoundError(f"no checkpoint in {str(path)!r} to resume from; start the run without --resume.")
    try:
        info = json.loads(manifest.read_text())
        if info.get("format") != _FORMAT:
            raise ValueError(f"unknown format {info.get('format')!r}, expected {_FORMAT}")
        entries = [dict(e) for e in info["checkpoints"]]
        hashes = [str(e["sha256"]) for e in entries]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(manifest)!r} cannot be read ({e}); {advice}.") from None
    problems: list[str] = []
    found: list[tuple[int, str, bytes]] = []
    for name in (_CKPT, _PREV):
        f = path / name
        if not f.is_file():
            if name == _CKPT or len(entries) > 1:
                problems.append(f"{name} is missing")
            continue
        data = f.read_bytes()
        h = _sha256(data)
        if h not in hashes:
            what = "is empty" if not data else f"matches no SHA-256 in {_MANIFEST} ({len(data)} bytes): it is damaged, truncated or was replaced"
            problems.append(f"{name} {what}")
            continue
        found.append((hashes.index(h), name, data))
    found.sort()
    for idx, name, data in found:
        try:
            ck = _load_plain(path / name, data, "it is not used")
        except CheckpointError as e:
            problems.append(f"{name}: {e}")
            continue
        if not isinstance(ck, dict) or set(ck) != _CKPT_KEYS:
            problems.append(f"{name} is not a robustclip checkpoint (its keys are not {sorted(_CKPT_KEYS)})")
            continue
        return ck, entries[idx], name, problems
    raise CheckpointError(
        f"no usable checkpoint in {str(path)!r}: " + "; ".join(problems or ["no checkpoint file is there"]) + f". {advice[0].upper()}{advice[1:]}."
    )


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
        # everything is checked before the directory is made: a run that cannot start leaves none
        validate_config(config)
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(
                f"--checkpoint-every must be a whole number of steps >= 0 (0: only at arm ends), got {checkpoint_every!r}."
            )
        self.path = Path(path)
        self.experiment = experiment
        self.config = config
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.interrupt_after = interrupt_after
        self.interrupt_by_kill = interrupt_by_kill
        self.quiet = quiet
        self.session_steps = 0
        self.records: list[dict[str, Any]] = []
        self.done: list[str] = []
        self._pending: dict[str, Any] | None = None
        self._metrics_fh: Any = None
        # the checkpoints on disk, newest first (manifest entries), and the file holding the newest
        self._entries: list[dict[str, Any]] = []
        self._holder = _CKPT
        self._seq = 0
        self.path.mkdir(parents=True, exist_ok=True)
        check_run_directory(self.path)
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
            _write_atomic(self.path / "config.toml", f"# robustclip run {experiment}: the config this run used\n" + dump_toml(cfg))
            _write_atomic(self.path / "config.json", json.dumps(_jsonable(cfg), indent=2) + "\n")
            self._write_run_json("running")
            # the empty checkpoint comes before the first metric line: from here on, a run
            # killed (or failing) at any moment can be resumed, restarting from scratch if need be
            self._save_checkpoint(None)
            _write_atomic(metrics, "")
        self._metrics_fh = _open_append(metrics)

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
        _write_atomic(self.path / "run.json", json.dumps(info, indent=2) + "\n")

    def _load_checkpoint(self) -> None:
        ck, entry, name, problems = _find_checkpoint(self.path)
        if name != _CKPT or problems:
            print(
                f"robustclip: {'; '.join(problems)}; resuming from {str(self.path / name)!r} instead (arm "
                f"{entry.get('arm')!r}, step {entry.get('step')}, {entry.get('metrics_lines')} metric lines); "
                f"the next checkpoint replaces {_CKPT}.",
                file=sys.stderr, flush=True,
            )
        self._entries, self._holder = [entry], name
        self._seq = int(entry.get("seq", 0))
        if ck.get("experiment") != self.experiment:
            raise ValueError(
                f"{str(self.path)!r} holds a run of {ck.get('experiment')!r}, not {self.experiment!r}."
            )
        saved = ck["config"]
        now = _jsonable(config_to_dict(self.config))
        if not isinstance(saved, dict):
            raise CheckpointError(f"the checkpoint in {str(self.path)!r} holds no config; it was not written by robustclip.")
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
        _write_atomic(metrics, "".join(lines))
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
        data = _torch_bytes(ck)
        self._seq += 1
        entry = {
            "sha256": _sha256(data), "bytes": len(data), "seq": self._seq, "arm": arm.id if arm is not None else None,
            "step": arm.step if arm is not None else None, "done": len(self.done), "metrics_lines": len(self.records),
        }
        # Commit order, safe against a kill at any point: the data under a new name; the manifest
        # listing it with the older checksums; the current file becomes the previous one; the new
        # one becomes current; the manifest without the oldest. A resume takes the newest file
        # whose checksum the manifest lists, so every intermediate state resumes correctly.
        _write_new(self.path / _NEW, data, sync=True)
        self._write_manifest([entry, *self._entries])
        if self._holder == _CKPT and (self.path / _CKPT).is_file():
            os.replace(self.path / _CKPT, self.path / _PREV)
        os.replace(self.path / _NEW, self.path / _CKPT)
        self._entries, self._holder = [entry, *self._entries[:1]], _CKPT
        self._write_manifest(self._entries)

    def _write_manifest(self, entries: list[dict[str, Any]]) -> None:
        info = {"format": _FORMAT, "experiment": self.experiment, "checkpoints": entries}
        _write_atomic(self.path / _MANIFEST, json.dumps(info, indent=2) + "\n", sync=True)

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
        _write_atomic(self.path / "summary.json", json.dumps(_jsonable(dict(summary)), indent=2) + "\n")
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
            "state": _plain_state(self.state, "state"),
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
        # before the checkpoint: a kill in between re-runs the arm and rewrites the same file
        _save_final(target, {"arm": self.id, "step": self.step, "objects": {k: o.state_dict() for k, o in self.objects.items()}})
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


def write_csv(records: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Records as CSV: the union of their keys as columns (lists are written as JSON)."""
    cols: dict[str, None] = {}
    for r in records:
        for k in r:
            cols.setdefault(k, None)
    fh = io.StringIO(newline="")
    w = csv.DictWriter(fh, fieldnames=list(cols))
    w.writeheader()
    for r in records:
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    _write_atomic(Path(path), fh.getvalue())


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
