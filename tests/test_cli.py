"""The robustclip command: demo, run, list, plot."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import pytest
import torch

from robustclip.cli import main
from robustclip.experiments import list_experiments
from robustclip.experiments._methods import available_methods
from robustclip.experiments._plot import curves
from robustclip.experiments._run import load_run
from robustclip.experiments.demo import DEMO_METHODS


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_demo_table_has_every_method(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--size", "tiny", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    methods = [m for m in DEMO_METHODS if m in available_methods()]
    assert {"SGDM", "Clip-SGD", "NSGD", "PS-Clip-SGD"} <= set(methods)
    table = [ln for ln in text.splitlines() if ln.startswith(("synthetic", "digits"))]
    rows = {(ln.split()[0], ln.split()[1]) for ln in table}
    assert rows == {(p, m) for p in ("synthetic", "digits") for m in methods}
    for col in ("train loss", "test acc", "wall time", "time/step vs SGD"):
        assert col in text
    assert str(out) in text  # says where the run directory is
    with (out / "results.csv").open() as fh:
        res = list(csv.DictReader(fh))
    assert len(res) == 2 * len(methods)
    sgdm = [r for r in res if r["method"] == "SGDM"]
    assert all(float(r["time_per_step_vs_sgd"]) == 1.0 for r in sgdm)
    for r in res:
        assert 0.0 <= float(r["test_acc"]) <= 1.0
    assert (out / "demo_synthetic.png").is_file() and (out / "demo_digits.png").is_file()
    assert (out / "metrics.csv").is_file() and (out / "metrics.jsonl").is_file()
    # the table's test accuracy is the final epoch's, from the metrics
    last = {}
    for r in load_run(out).records:
        if r.get("kind") == "epoch":
            last[(r["problem"], r["method"])] = r["test_acc"]
    for r in res:
        assert float(r["test_acc"]) == pytest.approx(last[(r["problem"], r["method"])])
    # the demo has no --resume: an existing directory is refused with advice that works
    capsys.readouterr()
    assert main(["demo", "--size", "tiny", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "another --out" in err and "--resume" not in err


def test_demo_learning_rates_come_from_tuning_seeds(tmp_path):
    from robustclip.experiments.demo import Config, tune

    cfg = Config(methods=("SGDM", "PS-Clip-SGD"), problems=("synthetic",), scale=0.2, seeds=2)
    with pytest.raises(ValueError, match="overlap the reported seeds"):
        tune(tmp_path / "bad", cfg, seeds=(1, 100))
    best = tune(tmp_path / "t", cfg, seeds=(100,), grid=(0.001, 0.1))
    # the pick is the grid value with the best final accuracy on the held-out training part
    final = {}
    for r in load_run(tmp_path / "t").records:
        final[(r["method"], r["lr"])] = r["test_acc"]  # the last epoch wins
    for m in cfg.methods:
        assert best["synthetic"][m] == max((0.001, 0.1), key=lambda lr: (final[(m, lr)], -lr))


def test_demo_rejects_unknown_method(tmp_path, capsys):
    assert main(["demo", "--size", "tiny", "--out", str(tmp_path / "d"), "--set", "methods=SGDM,Adam"]) == 2
    assert "unknown method 'Adam'" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for name in list_experiments():
        assert name in text
    for m in ("SGDM", "Clip-SGD", "NSGD", "PS-Clip-SGD", "Micro-Clip"):
        assert m in text
    assert main(["list", "label-noise"]) == 0
    assert "label_noise: float = 0.2" in capsys.readouterr().out


def test_run_and_plot_overlay(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["run", "label-noise", "--no-progress", "--threads", "1", "--set", "epochs=2", "--set", "seeds=1",
            "--set", "hidden=16", "--set", "methods=SGDM,Clip-SGD"]
    assert main([*base, "--out", str(a)]) == 0
    assert main([*base, "--out", str(b), "--set", "lr=0.2"]) == 0
    capsys.readouterr()
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    written = capsys.readouterr().out.split()
    assert written and all(p.endswith(".png") for p in written)
    assert (tmp_path / "cmp" / "label_noise.png").is_file()
    # the overlay has one curve per (run, method), labelled by run
    series = curves([load_run(a), load_run(b)], "test_acc")
    assert sorted(s.label for s in series) == ["a: Clip-SGD", "a: SGDM", "b: Clip-SGD", "b: SGDM"]
    assert json.loads((b / "config.json").read_text())["lr"] == 0.2


def test_curves_show_a_diverged_seed():
    from pathlib import Path

    from robustclip.experiments._run import RunData

    recs = [{"kind": "epoch", "method": "M", "seed": s, "epoch": e, "loss": v}
            for s, vals in ((0, [1.0, 0.5, 0.25]), (1, [1.0, float("inf"), float("nan")])) for e, v in enumerate(vals)]
    recs.append({"kind": "epoch", "method": "M", "seed": 0, "epoch": 3})  # no reading: not a point
    (series,) = curves([RunData(Path("r"), "x", {}, recs, {})], "loss")
    assert series.x == [0.0, 1.0, 2.0]
    # the survivor alone would read 0.5, 0.25: the diverged seed makes the mean NaN instead
    assert series.y[0] == 1.0 and all(v != v for v in series.y[1:])


def test_run_errors(tmp_path, capsys):
    assert main(["run", "label-noise", "--set", "foo=1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'foo'" in err and "epochs: int" in err
    assert main(["run", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert main(["run", "label-noise", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "not a robustclip run directory" in capsys.readouterr().err
    assert main(["run", "cifar10-resnet18", "--set", f"data_dir={tmp_path}", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()  # no run directory for a run that cannot start
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "downloads nothing" in err


@pytest.mark.parametrize(
    ("experiment", "sets", "expect"),
    [
        ("label-noise", ["lr=nan"], "'lr' must be a finite number"),
        ("label-noise", ["lr=inf"], "'lr' must be a finite number"),
        ("label-noise", ["momentum=-inf"], "'momentum' must be a finite number"),
        ("label-noise", ["label_noise=nan"], "'label_noise' must be a finite number"),
        ("label-noise", ["clip=0"], r"'clip' \(the clipping radius c; a radius of 0 would zero every gradient\) must lie in \(0, inf\)"),
        ("label-noise", ["clip=-1"], "'clip' .* must lie in"),
        ("label-noise", ["lr=0"], r"'lr' \(the step size\) must lie in \(0, inf\)"),
        ("label-noise", ["momentum=1"], r"'momentum' .* must lie in \[0, 1\)"),
        ("sgc", ["sweep_lrs=0.1,nan"], r"'sweep_lrs\[1\]' must be a finite number"),
        ("sgc", ["sweep_lrs=0.1,-1"], "'sweep_lrs' .* must lie in"),
        ("spectral-mlp", ["tau=0"], "'tau' .* must lie in"),
        ("spectral-mlp", ["ema_beta=1"], "'ema_beta' .* must lie in"),
        ("spectral-mlp", ["quantile=1.5"], "'quantile' .* must lie in"),
        ("synthetic-noise", ["sigma=-1"], "'sigma' .* must lie in"),
        ("synthetic-noise", ["x0=nan"], "'x0' must be a finite number"),
        ("synthetic-noise", ["nsgd_lr=inf"], "'nsgd_lr' must be a finite number"),
    ],
)
def test_run_refuses_a_bad_config_before_creating_anything(experiment, sets, expect, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["run", experiment, "--no-progress", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustclip: error: config key ") and len(err.splitlines()) == 1
    assert re.search(expect, err), err
    assert not out.exists()  # no run directory, no "running" status


def test_toml_nan_and_bad_checkpoint_every_are_refused_before_the_run_directory(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text("lr = nan\n")
    out = tmp_path / "r"
    assert main(["run", "label-noise", "--config", str(toml), "--out", str(out)]) == 2
    assert "'lr' must be a finite number, got nan" in capsys.readouterr().err
    toml.write_text("sweep_lrs = [0.1, inf]\n")
    assert main(["run", "sgc", "--config", str(toml), "--out", str(out)]) == 2
    assert "'sweep_lrs[1]' must be a finite number, got inf" in capsys.readouterr().err
    assert main(["run", "label-noise", "--checkpoint-every", "-1", "--out", str(out)]) == 2
    assert "--checkpoint-every must be a whole number of steps >= 0" in capsys.readouterr().err
    assert not out.exists()


def test_demo_refuses_a_bad_config_before_creating_anything(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["demo", "--size", "tiny", "--out", str(out), "--set", "momentum=nan"]) == 2
    assert "'momentum' must be a finite number" in capsys.readouterr().err
    assert main(["demo", "--size", "tiny", "--out", str(out), "--set", "synthetic_alpha=0"]) == 2
    assert "'synthetic_alpha' (a tail index) must lie in (0, inf)" in capsys.readouterr().err
    assert not out.exists()


def test_validate_config_checks_programmatic_configs():
    from robustclip.experiments import make_config
    from robustclip.experiments._config import validate_config

    cfg = make_config("label-noise")
    validate_config(cfg)  # the defaults are valid
    with pytest.raises(ValueError, match="'clip' .* must lie in"):
        validate_config(dataclasses.replace(cfg, clip=0.0))
    with pytest.raises(ValueError, match="'lr' must be a finite number"):
        validate_config(dataclasses.replace(cfg, lr=float("nan")))
    for name in list_experiments():
        validate_config(make_config(name))  # every experiment's defaults pass
