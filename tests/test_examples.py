"""The examples run as scripts and print results that show they trained."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_train_minimal_learns_despite_flipped_labels():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_minimal.py"), "--epochs=4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    epochs = re.findall(r"^epoch +(\d+) +train loss ([\d.]+) +clipped ([\d.]+) +test loss ([\d.]+) +test acc ([\d.]+)$",
                        proc.stdout, re.M)
    assert [int(e[0]) for e in epochs] == [1, 2, 3, 4]  # the --epochs=4 override took
    # per-sample clipping bites on a fifth of flipped labels, and does not stop learning
    assert all(0.0 < float(e[2]) <= 1.0 for e in epochs)
    assert float(epochs[-1][3]) < float(epochs[0][3])
    final = float(re.search(r"final test accuracy ([\d.]+)", proc.stdout).group(1))
    assert final == float(epochs[-1][4]) and final > 0.5  # chance is 0.1
