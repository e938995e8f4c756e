"""Static type check of the library: strict mypy, and every ``# type: ignore`` explained.

Run from the repository root with the development environment active::

    python tools/typecheck.py

It runs mypy as configured in ``pyproject.toml`` (strict, over ``src/robustclip`` except the
research scripts under ``experiments/``), then reads every library source file and fails if a
``# type: ignore`` does not name the error code it silences (``# type: ignore[attr-defined]``)
or carries no reason: a comment after it on the same line, or a comment line just above.
Exit status 0 when both pass.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "src" / "robustclip"
#: research scripts, outside the strict check (as in pyproject.toml)
UNCHECKED = ("experiments",)

_IGNORE = re.compile(r"#\s*type:\s*ignore(?P<code>\[[^\]]+\])?(?P<rest>.*)$")


def unexplained_ignores(root: Path = LIBRARY) -> list[str]:
    """``path:line: what is missing`` for each ``# type: ignore`` without a code or a reason."""
    problems: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in UNCHECKED:
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = _IGNORE.search(line)
            if m is None:
                continue
            where = f"{path.relative_to(ROOT)}:{i + 1}"
            if m.group("code") is None:
                problems.append(f"{where}: name the error code, e.g. '# type: ignore[attr-defined]'")
            same_line = m.group("rest").strip().startswith("#")
            above = i > 0 and lines[i - 1].strip().startswith("#")
            if not (same_line or above):
                problems.append(f"{where}: say why, in a comment after it or on the line above")
    return problems


def main() -> int:
    mypy = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT)
    problems = unexplained_ignores()
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} unexplained '# type: ignore'")
    return 1 if mypy.returncode != 0 or problems else 0


if __name__ == "__main__":
    sys.exit(main())
