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
    # the command runs robustclip.diagnostics.diagnose on the experiment's problem
    out = tmp_path / "diag"
    rc = main(
        ["diagnose", "label-noise", *TINY, "--out", str(out), "--planned-steps", "1500",
         "--probe-size", "32", "--methods", "none", "per_sample_clip"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("report.md", "verdict.json", "pilot.png", "statistics/diagnostics.json",
                 "statistics/probes.csv", "statistics/metrics.jsonl", "statistics/sigma_max.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads((out / "verdict.json").read_text())
    assert d["verdict"] in ("none", "per_sample_clip", "clip_by_global_norm", "spectral_clip")
    assert (d["threshold"] is None) == (d["verdict"] == "none")
    assert d["planned_steps"] == 1500 and 0 < d["pilot_cost_frac"] <= 0.1 + 1e-9
    st = d["statistics"]
    assert st["batch_size"] == 16
    # the budget (150 steps) allows no pass over the ~1300 training samples: rho comes from the
    # first batches, corrected for the subset's own noise, and the report says so
    assert st["rho_source"] == "first batches, corrected"
    assert st["rho_correction"]["samples"] < st["rho_correction"]["dataset_size"]
    assert any("corrected" in w for w in d["warnings"])
    assert st["rho"] >= 1 - 1e-9 and st["recommended_batch_size"] >= st["rho"]
    # probes: start, middle and end of the statistics run
    with (out / "statistics" / "probes.csv").open() as f:
        probes = list(csv.DictReader(f))
    assert len(probes) == 3 and int(probes[0]["step"]) == 0
    assert st["tail_index"] == pytest.approx(float(np.median([float(p["tail_index"]) for p in probes][1:])))
    assert {c["method"] for c in d["candidates"]} <= {"none", "per_sample_clip"}
    report = (out / "report.md").read_text()
    assert d["headline"] in report
    assert d["headline"] in printed and "label-noise" in printed


def test_diagnose_errors_are_clear(tmp_path, capsys):
    assert main(["diagnose", "no-such-experiment", "--out", str(tmp_path)]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    args = ["diagnose", "label-noise", *TINY, "--out", str(tmp_path)]
    assert main([*args, "--planned-steps", "20"]) == 2
    assert "too small" in capsys.readouterr().err
    assert main([*args, "--set", "nokey"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main([*args, "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
