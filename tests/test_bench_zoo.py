"""The zoo benchmark runs end to end at its tiny scale and writes complete records (no timing
assertions: timing targets live in BENCHMARKS.md, not in tests)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"

FIELDS = {
    "model", "size", "method", "batch", "device", "scale", "median_ms", "ratio_vs_plain",
    "ratio_vs_plain_paired", "ratio_vs_plain_paired_iqr", "peak_mb", "max_rel_err", "paths",
    "radius", "rounds", "autotune", "threads", "load_avg_1min", "model_seconds",
}


@pytest.fixture
def bench_run(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("run", None)
    import run  # benchmarks/run.py

    return run.main


def test_zoo_suite_tiny_gpt2_records(bench_run, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "zoo.json"
    methods = ["plain", "per_sample_fast", "per_sample_vmap", "plain_accum", "micro_batch_clip", "batch_clip"]
    rc = bench_run([
        "--suite", "zoo", "--scale", "tiny", "--models", "gpt2", "--methods", ",".join(methods),
        "--rounds", "1", "--memory-methods", "plain", "--memory-steps", "1", "--json", str(out),
    ])
    assert rc == 0
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == methods
    by = {r["method"]: r for r in records}
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["model"] == "gpt2" and r["scale"] == "tiny" and r["batch"] == 4 and r["rounds"] == 1
        assert "note" not in r, r.get("note")  # every method ran on the tiny GPT-2
        assert r["median_ms"] > 0 and r["ratio_vs_plain"] > 0 and r["ratio_vs_plain_paired"] > 0
        lo, hi = r["ratio_vs_plain_paired_iqr"]
        assert lo <= r["ratio_vs_plain_paired"] <= hi
    assert by["plain"]["ratio_vs_plain_paired"] == 1.0
    # memory only where asked, measured in a fresh process
    assert by["plain"]["peak_mb"] is not None and by["plain"]["peak_mb"] >= 0
    assert by["per_sample_fast"]["peak_mb"] is None
    # every clipped gradient matches its reference (the per-sample loop, clip_grad_norm_, the
    # micro-batch loop); the plain methods have none
    for m in ("per_sample_fast", "per_sample_vmap", "micro_batch_clip", "batch_clip"):
        assert by[m]["max_rel_err"] is not None and by[m]["max_rel_err"] < 1e-4, (m, by[m]["max_rel_err"])
    assert by["plain"]["max_rel_err"] is None and by["plain_accum"]["max_rel_err"] is None
    # the hook engine's paths: one row per module it handled, counted by path; GPT-2's tied head
    # and HF Conv1D layers are all accounted for
    paths = by["per_sample_fast"]["paths"]
    assert paths["engine"] == "HookEngine"
    assert sum(paths["counts"].values()) == len(paths["modules"]) > 0
    assert all(len(row) == 3 for row in paths["modules"])
    assert "modules" not in by["plain"]["paths"] and by["plain"]["paths"]["counts"] == paths["counts"]


def test_zoo_suite_rejects_unknown_model(bench_run) -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        bench_run(["--suite", "zoo", "--scale", "tiny", "--models", "nope", "--no-memory"])


def test_zoo_markdown_marks_targets() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import suite_zoo
    finally:
        sys.path.remove(str(BENCH))
    base = {"size": "s", "batch": 4, "peak_mb": 10.0, "max_rel_err": None, "median_ms": 1.0,
            "ratio_vs_plain_paired_iqr": [1.0, 1.0], "paths": {"counts": {"rule": 2}}}
    records = [
        {**base, "model": "gpt2", "method": "plain", "ratio_vs_plain_paired": 1.0},
        {**base, "model": "gpt2", "method": "per_sample_fast", "ratio_vs_plain_paired": 1.2, "peak_mb": 20.0},
        {**base, "model": "gpt2", "method": "per_sample_vmap", "ratio_vs_plain_paired": 1.1},
        {**base, "model": "gpt2", "method": "opacus_ghost", "ratio_vs_plain_paired": 2.0},
    ]
    lines = suite_zoo.targets(records)
    assert any("per_sample_fast 1.20x plain" in t and t.endswith(": met") for t in lines)
    assert any("1.67x faster than opacus_ghost" in t and t.endswith(": met") for t in lines)
    assert any("per_sample_vmap 1.10x" in t and t.endswith("NOT met") for t in lines)
    assert any("extra peak memory 2.00x" in t and t.endswith("NOT met") for t in lines)
