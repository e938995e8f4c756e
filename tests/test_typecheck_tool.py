"""tools/typecheck.py: the scan for unexplained ``# type: ignore`` comments."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("typecheck", ROOT / "tools" / "typecheck.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flags_missing_code_and_missing_reason(tmp_path, monkeypatch):
    tool = _tool()
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    lib = tmp_path / "lib"
    (lib / "experiments").mkdir(parents=True)
    (lib / "a.py").write_text(
        "x = 1  # type: ignore\n"  # no code, no reason: two problems
        "y = 2  # type: ignore[assignment]\n"  # no reason
        "z = 3  # type: ignore[assignment]  # the stub is wrong\n"
        "# the field shadows tuple.count\n"
        "w = 4  # type: ignore[assignment]\n"
        "v = 5  # type: ignore  # a reason but no code\n"
    )
    (lib / "experiments" / "b.py").write_text("x = 1  # type: ignore\n")  # not checked
    problems = tool.unexplained_ignores(lib)
    assert [p.split(": ")[0] for p in problems] == ["lib/a.py:1", "lib/a.py:1", "lib/a.py:2", "lib/a.py:6"]
    assert "error code" in problems[0] and "say why" in problems[1]
    assert "say why" in problems[2] and "error code" in problems[3]


def test_clean_file_passes(tmp_path, monkeypatch):
    tool = _tool()
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    (tmp_path / "c.py").write_text("x: int = 1\n")
    assert tool.unexplained_ignores(tmp_path) == []
