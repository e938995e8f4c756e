"""Run directories that cannot run code and cannot rot silently.

Every file robustclip saves loads with ``torch.load(weights_only=True)`` and is only loaded that
way; checkpoints and final states carry a SHA-256; a damaged newest checkpoint falls back to the
previous one (and the run still reproduces an uninterrupted one); nothing is written through a
symbolic link.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import pickle
import random
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

from robustclip.cli import main
from robustclip.experiments import _run, list_experiments
from robustclip.experiments._run import (
    TIME_KEYS,
    CheckpointError,
    Interrupted,
    RunDirectoryError,
    load_final_state,
    read_checkpoint,
    write_csv,
)
from robustclip.experiments._runner import run_experiment as _run_experiment


def _data_module() -> Any:
    """The data helpers' module: under experiments/ where it lives now, else its old place."""
    try:
        return importlib.import_module("robustclip.experiments.data")
    except ModuleNotFoundError:
        return importlib.import_module("robustclip.data")


write_fake_cifar = _data_module().write_fake_cifar

# 21 steps per epoch, 42 per arm: checkpoints at steps 10, 20, 30, 40 and the end of SGDM, then at
# 10 and 20 of PS-Clip-SGD; stopping after 65 steps lands at step 23 of the second arm, so the
# newest checkpoint is step 20 and the previous one step 10, both mid-arm
BASE = {"methods": "SGDM,PS-Clip-SGD", "epochs": "2", "seeds": "1", "hidden": "16", "batch_size": "64"}
EVERY, STOP = 10, 65


def run_experiment(*args: Any, **kwargs: Any) -> Path:
    kwargs.setdefault("threads", 1)
    kwargs.setdefault("quiet", True)
    return _run_experiment(*args, **kwargs)


def _records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k not in TIME_KEYS} for ln in (path / "metrics.jsonl").read_text().splitlines()]


def _stopped(path: Path, name: str = "label-noise", overrides: dict[str, str] | None = None, every: int = EVERY,
             stop: int = STOP) -> Path:
    with pytest.raises(Interrupted):
        run_experiment(name, BASE if overrides is None else overrides, out=path, checkpoint_every=every, interrupt_after=stop)
    return path


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "checkpoint.json").read_text())


def _sha(f: Path) -> str:
    return hashlib.sha256(f.read_bytes()).hexdigest()


def _same_run(a: Path, b: Path) -> None:
    assert _records(a) == _records(b)
    done = read_checkpoint(a)["done"]
    assert done == read_checkpoint(b)["done"] == ["SGDM/seed0", "PS-Clip-SGD/seed0"]
    for arm in done:
        wa, wb = load_final_state(a, arm)["model"], load_final_state(b, arm)["model"]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), arm


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed one must reproduce."""
    return run_experiment("label-noise", BASE, out=tmp_path_factory.mktemp("full") / "run", checkpoint_every=EVERY)


class _WritesAFile:
    """Unpickling this calls ``open(path, "w")``: the file appearing proves the payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"experiment": "label-noise", "config": {}, "done": [], "metrics_lines": 0, "arm": _WritesAFile(marker)}, buf)
    return buf.getvalue()


def test_the_payload_runs_when_unpickled(tmp_path):
    # the other tests' payload is real: a plain unpickling of it creates the file
    marker = tmp_path / "ran"
    torch.load(io.BytesIO(_payload(marker)), weights_only=False)["arm"].close()
    assert marker.exists()


# -- plain data only ----------------------------------------------------------------------------------


def _tiny(name: str, text_file: Path, cifar_dir: Path) -> tuple[dict[str, str], int, int]:
    """Overrides, checkpoint_every and a stop that lands mid-arm after at least two checkpoints."""
    return {
        "label-noise": (BASE, EVERY, STOP),
        "demo": ({"scale": "0.1", "seeds": "1", "methods": "SGDM,PS-Clip-SGD", "problems": "digits"}, 10, 150),
        "synthetic-noise": ({"seeds": "2", "steps": "12", "regimes": "student:1.5", "methods": "Clip-SGD,PS-Clip-SGD"}, 4, 30),
        "spectral-mlp": ({"n_train": "256", "n_test": "64", "width": "8", "depth": "2", "epochs": "2", "eval_every": "3",
                          "arms": "Clip-SGD,Spectral-Q85"}, 4, 23),
        "accumulation": ({"data": str(text_file), "steps": "6", "d": "16", "layers": "1", "heads": "2", "block_size": "16",
                          "micro_batch": "4", "accumulation": "2", "eval_every": "2", "eval_batches": "2", "device": "cpu",
                          "methods": "Micro-Clip,Clip-after-acc"}, 2, 11),
        "sgc": ({"hidden": "32", "epochs": "3", "sweep_lrs": "0.1,1000", "sweep_epochs": "1", "batch_size": "128", "rho_every": "2"},
                4, 37),
        "cifar100-alexnet": ({"data_dir": str(cifar_dir), "alexnet_hidden": "16", "epochs": "2", "batch_size": "8", "workers": "0",
                              "log_every": "1", "methods": "SGDM,PS-Clip-SGD"}, 2, 13),
        "cifar10-resnet18": ({"data_dir": str(cifar_dir), "width": "4", "epochs": "2", "batch_size": "8", "workers": "0",
                              "methods": "SGDM,Clip-SGD"}, 2, 13),
        "cifar10-spectral": ({"data_dir": str(cifar_dir), "width": "4", "epochs": "2", "batch_size": "8", "workers": "0", "rank": "2",
                              "methods": "SGDM,Spectral"}, 2, 13),
    }[name]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    text = tmp_path_factory.mktemp("text") / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 80)
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=32, n_test=8, seed=0)
    write_fake_cifar(root, "cifar100", n_train=32, n_test=8, seed=1)
    return text, root


@pytest.mark.parametrize("name", list_experiments())
def test_everything_saved_loads_with_weights_only(name, tmp_path, data_files):
    overrides, every, stop = _tiny(name, *data_files)
    part = _stopped(tmp_path / "r", name, overrides, every, stop)
    entries = _manifest(part)["checkpoints"]
    assert [e["sha256"] for e in entries] == [_sha(part / "checkpoint.pt"), _sha(part / "checkpoint.prev.pt")]
    for f in ("checkpoint.pt", "checkpoint.prev.pt"):
        ck = torch.load(part / f, weights_only=True)  # plain torch, no robustclip code
        assert set(ck) == {"experiment", "config", "done", "metrics_lines", "arm"}
    ck = torch.load(part / "checkpoint.pt", weights_only=True)
    assert ck["arm"] is not None and ck["arm"]["step"] > 0, "stopped mid-arm: the checkpoint holds the arm in progress"
    rng = ck["arm"]["rng"]
    assert isinstance(rng["numpy"]["key"], torch.Tensor) and isinstance(rng["python"]["key"], torch.Tensor)
    finals = sorted((part / "final").glob("*.pt"))
    assert finals and ck["done"]
    for f in finals:
        assert torch.load(f, weights_only=True)["objects"].keys() >= {"model", "optimizer", "clipper"}
        assert json.loads(f.with_suffix(".json").read_text())["sha256"] == _sha(f)
    run_experiment(name, overrides, out=part, checkpoint_every=every, resume=True)
    for f in ("checkpoint.pt", "checkpoint.prev.pt"):
        torch.load(part / f, weights_only=True)


def test_rng_state_round_trips_through_plain_data():
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.standard_normal()  # numpy now holds a cached Gaussian
    random.gauss(0.0, 1.0)  # so does Python
    g = torch.Generator().manual_seed(5)
    buf = io.BytesIO()
    torch.save(_run._rng_state({"g": g}), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    want = (torch.rand(3), np.random.standard_normal(3), random.gauss(0.0, 1.0), random.random(), torch.rand(2, generator=g))
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    g.manual_seed(0)
    _run._set_rng_state(saved, {"g": g})
    got = (torch.rand(3), np.random.standard_normal(3), random.gauss(0.0, 1.0), random.random(), torch.rand(2, generator=g))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:4] == got[2:4]
    assert torch.equal(want[4], got[4])


class Pair(NamedTuple):
    a: float
    b: float


def test_arm_state_must_be_plain_data():
    t = torch.ones(2)
    plain = _run._plain_state({"a": np.float64(1.5), "b": [np.int64(2)], "c": (t, None, "s")}, "state")
    assert plain == {"a": 1.5, "b": [2], "c": (t, None, "s")} and type(plain["a"]) is float and type(plain["b"][0]) is int
    with pytest.raises(TypeError, match=r"the arm's state state\['x'\] is a ndarray; .*weights_only=True"):
        _run._plain_state({"x": np.zeros(3)}, "state")
    with pytest.raises(TypeError, match=r"state\['p'\] is a Pair"):
        _run._plain_state({"p": Pair(1.0, 2.0)}, "state")


# -- code never runs ----------------------------------------------------------------------------------


def _plant(path: Path, name: str, data: bytes) -> None:
    """Replace checkpoint file ``name`` and list its checksum, as an attacker with write access would."""
    (path / name).write_bytes(data)
    info = _manifest(path)
    for e in info["checkpoints"]:
        e["sha256"], e["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (path / "checkpoint.json").write_text(json.dumps(info))


def test_a_malicious_checkpoint_is_refused_unread(tmp_path, capsys):
    part = _stopped(tmp_path / "r")
    marker = tmp_path / "ran"
    evil = _payload(marker)
    _plant(part, "checkpoint.pt", evil)
    _plant(part, "checkpoint.prev.pt", evil)
    with pytest.raises(CheckpointError, match=r"(?s)checkpoint.pt.*refused unread.*could run code.*without --resume"):
        run_experiment("label-noise", BASE, out=part, checkpoint_every=EVERY, resume=True)
    assert not marker.exists()
    capsys.readouterr()
    argv = ["run", "label-noise", "--resume", "--out", str(part), "--no-progress", "--threads", "1"]
    for k, v in BASE.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustclip: error: no usable checkpoint in") and "refused unread" in err
    assert not marker.exists()


def test_a_malicious_checkpoint_without_a_manifest_is_refused(tmp_path):
    # a run directory from before checksums, or one an attacker put together
    part = _stopped(tmp_path / "r")
    marker = tmp_path / "ran"
    (part / "checkpoint.pt").write_bytes(_payload(marker))
    (part / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint.json beside it: it was written by an older robustclip"):
        run_experiment("label-noise", BASE, out=part, checkpoint_every=EVERY, resume=True)
    assert not marker.exists()


def test_a_swapped_checkpoint_falls_back_without_running_it(tmp_path, full, capsys):
    part = _stopped(tmp_path / "r")
    marker = tmp_path / "ran"
    (part / "checkpoint.pt").write_bytes(_payload(marker))  # the checksum no longer matches
    capsys.readouterr()
    run_experiment("label-noise", BASE, out=part, checkpoint_every=EVERY, resume=True)
    assert not marker.exists()
    assert "resuming from" in capsys.readouterr().err
    _same_run(part, full)


def test_a_malicious_final_state_is_refused_unread(tmp_path, full):
    run = tmp_path / "r"
    run_experiment("label-noise", {**BASE, "methods": "SGDM"}, out=run, checkpoint_every=EVERY)
    f = run / "final" / "SGDM__seed0.pt"
    assert load_final_state(run, "SGDM/seed0")["model"]
    marker = tmp_path / "ran"
    evil = _payload(marker)
    f.write_bytes(evil)
    with pytest.raises(CheckpointError, match=r"SGDM__seed0.pt' is damaged: its bytes do not match"):
        load_final_state(run, "SGDM/seed0")
    side = f.with_suffix(".json")
    side.write_text(json.dumps({"format": 1, "sha256": hashlib.sha256(evil).hexdigest(), "bytes": len(evil)}))
    with pytest.raises(CheckpointError, match=r"SGDM__seed0.pt' was refused unread"):
        load_final_state(run, "SGDM/seed0")
    side.unlink()
    with pytest.raises(CheckpointError, match=r"has no checksum file SGDM__seed0.json beside it"):
        load_final_state(run, "SGDM/seed0")
    assert not marker.exists()


# -- damage: checksums, fallback, clear errors -------------------------------------------------------


def _flip_tensor_byte(f: Path) -> None:
    """Flip the top exponent bit of one weight of the arm's model, inside the file's tensor data.

    The weight is in the output layer's bias, which every prediction uses (some first-layer
    weights see a pixel that is always 0 and would not change the run).
    """
    data = bytearray(f.read_bytes())
    ck = torch.load(io.BytesIO(bytes(data)), weights_only=True)
    weight = list(ck["arm"]["objects"]["model"].values())[-1]
    raw = weight.numpy().tobytes()
    at = bytes(data).find(raw)
    assert at >= 0 and bytes(data).find(raw, at + 1) < 0, "the weight's bytes are stored once, as they are"
    middle = (weight.numel() // 2) * weight.element_size()
    data[at + middle + weight.element_size() - 1] ^= 0x40  # the float's top byte: sign and exponent
    f.write_bytes(bytes(data))
    changed = torch.load(f, weights_only=True)["arm"]["objects"]["model"]
    assert sum(not torch.equal(a, b) for a, b in zip(changed.values(), ck["arm"]["objects"]["model"].values())) == 1


def test_a_flipped_byte_falls_back_to_the_previous_checkpoint(tmp_path, full, capsys):
    part = _stopped(tmp_path / "r")
    prev = _manifest(part)["checkpoints"][1]
    assert prev["arm"] == "PS-Clip-SGD/seed0" and prev["step"] == 10
    _flip_tensor_byte(part / "checkpoint.pt")
    capsys.readouterr()
    run_experiment("label-noise", BASE, out=part, checkpoint_every=EVERY, resume=True)
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "matches no SHA-256 in checkpoint.json" in err
    assert f"resuming from {str(part / 'checkpoint.prev.pt')!r}" in err and "step 10" in err
    # metric lines after the older checkpoint were dropped and written again: the same run
    _same_run(part, full)


def test_the_fallback_truncates_the_metrics_to_its_checkpoint(tmp_path):
    part = _stopped(tmp_path / "r")
    prev = _manifest(part)["checkpoints"][1]
    _flip_tensor_byte(part / "checkpoint.pt")
    seen: list[int] = []
    real = _run.RunContext._load_checkpoint

    def spy(self: _run.RunContext) -> None:
        real(self)
        seen.append(len((self.path / "metrics.jsonl").read_text().splitlines()))
        seen.append(len(self.records))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_run.RunContext, "_load_checkpoint", spy)
        run_experiment("label-noise", BASE, out=part, checkpoint_every=EVERY, resume=True)
    assert seen == [prev["metrics_lines"]] * 2


@pytest.mark.parametrize("damage", ["flip", "empty", "truncate", "random", "delete"])
def test_no_usable_checkpoint_is_a_clear_error(damage, tmp_path, capsys):
    part = _stopped(tmp_path / "r")
    gen = np.random.default_rng(0)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        f = part / name
        if damage == "flip":
            _flip_tensor_byte(f)
        elif damage == "empty":
            f.write_bytes(b"")
        elif damage == "truncate":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        elif damage == "random":
            f.write_bytes(gen.bytes(f.stat().st_size))
        else:
            f.unlink()
    what = {"flip": "matches no SHA-256", "empty": "is empty", "truncate": "matches no SHA-256", "random": "matches no SHA-256",
            "delete": "is missing"}[damage]
    with pytest.raises(CheckpointError) as e:
        run_experiment("label-noise", BASE, out=part, checkpoint_every=EVERY, resume=True)
    msg = str(e.value)
    assert f"no usable checkpoint in {str(part)!r}" in msg
    assert f"checkpoint.pt {what}" in msg and f"checkpoint.prev.pt {what}" in msg
    assert "start the run again without --resume" in msg
    argv = ["run", "label-noise", "--resume", "--out", str(part)] + [a for k, v in BASE.items() for a in ("--set", f"{k}={v}")]
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"robustclip: error: {msg}"


def test_a_damaged_manifest_is_a_clear_error(tmp_path):
    part = _stopped(tmp_path / "r")
    (part / "checkpoint.json").write_text('{"format": 1, "checkp')
    with pytest.raises(CheckpointError, match=r"checkpoint.json' cannot be read .*start the run again without --resume"):
        run_experiment("label-noise", BASE, out=part, checkpoint_every=EVERY, resume=True)


def test_a_hand_made_checkpoint_of_the_wrong_shape_is_refused(tmp_path):
    part = _stopped(tmp_path / "r")
    buf = io.BytesIO()
    torch.save({"weights": torch.ones(2)}, buf)
    _plant(part, "checkpoint.pt", buf.getvalue())
    _plant(part, "checkpoint.prev.pt", buf.getvalue())
    with pytest.raises(CheckpointError, match="checkpoint.pt is not a robustclip checkpoint"):
        read_checkpoint(part)


class _KilledOs:
    """``os`` for the run module, whose ``replace`` stops the run after ``after`` calls."""

    def __init__(self, after: int) -> None:
        self.after, self.calls, self.armed = after, 0, False

    def __getattr__(self, name: str) -> Any:
        import os

        return getattr(os, name)

    def replace(self, src: Any, dst: Any) -> None:
        import os

        if self.armed:
            if self.calls == self.after:
                raise Interrupted("killed inside a checkpoint commit")
            self.calls += 1
        os.replace(src, dst)


@pytest.mark.parametrize("after", [0, 1, 2, 3])
def test_a_kill_inside_the_checkpoint_commit_resumes_exactly(after, tmp_path, full, monkeypatch):
    """Stop between any two steps of writing the 8th checkpoint (step 20 of the second arm)."""
    fake = _KilledOs(after)
    real = _run.RunContext._save_checkpoint
    saves = []

    def counting(self: _run.RunContext, arm: Any) -> None:
        saves.append(1)
        fake.armed = len(saves) == 8
        real(self, arm)

    monkeypatch.setattr(_run, "os", fake)
    monkeypatch.setattr(_run.RunContext, "_save_checkpoint", counting)
    part = tmp_path / "r"
    with pytest.raises(Interrupted, match="inside a checkpoint commit"):
        run_experiment("label-noise", BASE, out=part, checkpoint_every=EVERY)
    monkeypatch.undo()
    run_experiment("label-noise", BASE, out=part, checkpoint_every=EVERY, resume=True)
    _same_run(part, full)


def test_a_finished_run_keeps_two_checkpoints_with_checksums(tmp_path, full):
    info = _manifest(full)
    assert info["format"] == 1 and info["experiment"] == "label-noise"
    cur, prev = info["checkpoints"]
    assert cur["sha256"] == _sha(full / "checkpoint.pt") and prev["sha256"] == _sha(full / "checkpoint.prev.pt")
    assert cur["bytes"] == (full / "checkpoint.pt").stat().st_size
    assert cur["done"] == 2 and cur["arm"] is None and cur["seq"] == prev["seq"] + 1
    assert read_checkpoint(full)["done"] == ["SGDM/seed0", "PS-Clip-SGD/seed0"]
    assert not any(p.name.endswith((".tmp", ".new")) for p in full.iterdir())


# -- symbolic links -----------------------------------------------------------------------------------


def test_a_symlinked_metrics_file_is_refused_and_left_alone(tmp_path, capsys):
    part = _stopped(tmp_path / "r")
    outside = tmp_path / "precious.jsonl"
    outside.write_text((part / "metrics.jsonl").read_text())
    before = outside.read_bytes()
    (part / "metrics.jsonl").unlink()
    (part / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(RunDirectoryError, match=r"metrics.jsonl' is a symbolic link .*no write can land outside it"):
        run_experiment("label-noise", BASE, out=part, checkpoint_every=EVERY, resume=True)
    assert outside.read_bytes() == before
    argv = ["run", "label-noise", "--resume", "--out", str(part)] + [a for k, v in BASE.items() for a in ("--set", f"{k}={v}")]
    capsys.readouterr()
    assert main(argv) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert outside.read_bytes() == before


@pytest.mark.parametrize("link", ["summary.json", "final", "loss.png", "checkpoint.prev.pt"])
def test_a_run_directory_holding_a_link_is_refused(link, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir() if link == "final" else outside.write_text("keep me")
    run = tmp_path / "r"
    run.mkdir()
    (run / link).symlink_to(outside)
    with pytest.raises(RunDirectoryError, match=f"{link}' is a symbolic link"):
        run_experiment("label-noise", BASE, out=run, checkpoint_every=EVERY)
    assert (outside.is_dir() and not any(outside.iterdir())) or outside.read_text() == "keep me"
    assert sorted(p.name for p in run.iterdir()) == [link]  # nothing else was written


def test_writes_replace_files_and_never_follow_links(tmp_path):
    outside = tmp_path / "outside.csv"
    outside.write_text("keep me")
    link = tmp_path / "metrics.csv"
    link.symlink_to(outside)
    with pytest.raises(RunDirectoryError, match="metrics.csv' is a symbolic link"):
        write_csv([{"a": 1}], link)
    stale = tmp_path / "results.csv.tmp"
    stale.symlink_to(outside)  # a link where the temporary file goes is removed, not followed
    write_csv([{"a": 1}], tmp_path / "results.csv")
    assert outside.read_text() == "keep me" and not stale.exists()
    assert (tmp_path / "results.csv").read_text().splitlines() == ["a", "1"]


# -- data files -----------------------------------------------------------------------------------------


def test_a_malicious_cifar_batch_is_refused_unread(tmp_path):
    load_cifar = _data_module().load_cifar
    folder = write_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=10, seed=0)
    assert load_cifar("cifar10", tmp_path).x_train.shape[0] == 20  # the real format still loads
    marker = tmp_path / "ran"
    evil = pickle.dumps({b"data": _WritesAFile(marker), b"labels": [0]}, protocol=2)
    (folder / "data_batch_1").write_bytes(evil)
    with pytest.raises(ValueError, match=r"CIFAR batch 'data_batch_1' was refused: it is a pickle that calls (io|builtins).open"):
        load_cifar("cifar10", tmp_path)
    assert not marker.exists()
    good = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_1").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"CIFAR batch 'data_batch_1' cannot be read .*Fetch it again"):
        load_cifar("cifar10", tmp_path)


def test_data_pickles_of_numpy_arrays_load_under_both_numpy_names():
    from robustclip.experiments._safe_pickle import load_data_pickle

    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    blob = pickle.dumps({b"data": arr, b"labels": [1, 2, 3], b"batch_label": b"b"}, protocol=2)
    got = load_data_pickle(blob, "x")
    assert np.array_equal(got[b"data"], arr) and got[b"labels"] == [1, 2, 3]
    # files written under numpy 1.x name numpy.core.multiarray; both spellings are accepted
    other = b"numpy.core.multiarray" if b"numpy._core.multiarray" in blob else b"numpy._core.multiarray"
    this = b"numpy._core.multiarray" if other == b"numpy.core.multiarray" else b"numpy.core.multiarray"
    swapped = blob.replace(this, other)
    assert swapped != blob
    if importlib.util.find_spec(other.decode()) is not None:
        assert np.array_equal(load_data_pickle(swapped, "x")[b"data"], arr)
