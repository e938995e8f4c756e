"""``robustclip diagnose`` end to end on a tiny built-in task, and its argument errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from robustclip.cli import main
from robustclip.diagnostics.cli import parse_overrides

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")  # the label-noise experiment's digits

TINY = ["--set", "hidden=16", "--set", "depth=1", "--set", "batch_size=16"]


def test_parse_overrides():
    assert parse_overrides(["a=1", " b = x=y "]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["novalue"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["=3"])


def test_diagnose_label_noise_end_to_end(tmp_path, capsys):
    out = tmp_path / "diag"
    rc = main(
        ["diagnose", "label-noise", *TINY, "--out", str(out), "--epochs", "2", "--max-steps", "6",
         "--probe-size", "64", "--probes-per-epoch", "1", "--sketch-dim", "32", "--no-progress"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("report.md", "diagnostics.json", "metrics.jsonl", "probes.csv", "epochs.csv",
                 "norm_histograms.png", "tail_index.png", "rho.png", "sigma_max.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads((out / "diagnostics.json").read_text())
    for key in ("tail_index", "rho", "suggested_max_norm", "suggested_spectral_threshold", "l0", "l1"):
        assert key in d
    assert d["experiment"] == "label-noise" and d["overrides"]["hidden"] == "16"
    assert d["batch_size"] == 16 and d["steps"] == 12
    # probes: one at the start and one per epoch, each measured at the step it says
    with (out / "probes.csv").open() as f:
        probes = list(csv.DictReader(f))
    assert [int(p["step"]) for p in probes] == [0, 6, 12]
    alphas = [float(p["tail_index"]) for p in probes]
    rhos = [float(p["rho"]) for p in probes]
    assert d["tail_index"] == pytest.approx(float(np.median(alphas[1:])))  # later half of 3 probes
    assert d["rho"] == pytest.approx(max(rhos))
    assert d["recommended_batch_size"] >= d["rho"]
    assert 0 < d["tail_index"] < 4 and d["rho"] >= 1 - 1e-9
    # per-epoch norms: every training sample of every step observed (6 steps x 16)
    with (out / "epochs.csv").open() as f:
        epochs = list(csv.DictReader(f))
    assert [int(e["samples"]) for e in epochs] == [96, 96]
    assert all(0 <= float(e["fraction_clipped"]) <= 1 for e in epochs)
    assert d["suggested_max_norm"] > 0 and d["suggested_spectral_threshold"] > 0
    kinds = {json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert kinds == {"step", "spectrum", "probe", "epoch"}
    report = (out / "report.md").read_text()
    assert d["headline"] in report and "label-noise" in report
    assert d["headline"] in printed


def test_diagnose_errors_are_clear(tmp_path, capsys):
    assert main(["diagnose", "no-such-experiment", "--out", str(tmp_path)]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    args = ["diagnose", "label-noise", *TINY, "--out", str(tmp_path), "--no-progress"]
    assert main([*args, "--probe-size", "8", "--max-steps", "1", "--epochs", "1"]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main([*args, "--set", "nokey"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main([*args, "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
