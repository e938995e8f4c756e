"""The framework integrations are optional: importing robustclip imports no framework, and a
missing one names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_robustclip_imports_no_framework():
    r = _run(
        "import sys, robustclip, robustclip.losses, robustclip.integrations\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'lightning', "
        "'pytorch_lightning', 'accelerate'))\n"
        "print(bad)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module,blocked,extra",
    [("transformers", "transformers", "transformers"), ("lightning", "lightning", "lightning")],
)
def test_a_missing_framework_names_the_extra(module, blocked, extra):
    # a None entry in sys.modules makes `import NAME` raise ImportError, as if not installed
    r = _run(
        f"import sys; sys.modules[{blocked!r}] = None\n"
        f"import robustclip.integrations.{module}\n"
    )
    assert r.returncode != 0
    assert f"pip install 'robustclip[{extra}]'" in r.stderr
