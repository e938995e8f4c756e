"""The framework examples run (few steps here; their defaults run in under a minute on a CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script,args,needs",
    [
        ("hf_trainer.py", ["--steps", "4", "--method", "micro", "--accumulation", "2"], "transformers"),
        ("lightning_synthetic.py", ["--steps", "10"], "lightning"),
        ("accelerate_synthetic.py", ["--epochs", "1"], "accelerate"),
    ],
)
def test_example_runs(script, args, needs):
    pytest.importorskip(needs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # each prints its result and robustclip's readings
    assert "method " in r.stdout
    assert "robustclip/" in r.stdout or "skipped steps 0" in r.stdout
