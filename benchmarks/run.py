"""Benchmark runner: ``python benchmarks/run.py --suite NAME [--json PATH] [--markdown]``.

Each suite is a module ``benchmarks/suite_<name>.py`` with

* ``add_arguments(parser)`` (optional): its own options;
* ``run(args) -> list[dict]``: the records, measured side by side in one process;
* ``to_markdown(records, args) -> str``: the table for BENCHMARKS.md.

The records are printed as JSON (and written to ``--json``). ``--markdown`` also rewrites the
suite's section of BENCHMARKS.md, between ``<!-- suite:NAME -->`` and ``<!-- /suite:NAME -->``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import platform
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def suites() -> list[str]:
    return sorted(p.stem.removeprefix("suite_") for p in HERE.glob("suite_*.py"))


def update_markdown(suite: str, table: str, path: pathlib.Path) -> None:
    start, end = f"<!-- suite:{suite} -->", f"<!-- /suite:{suite} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{table.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", choices=suites(), required=True)
    known, _ = pre.parse_known_args(argv)
    mod = importlib.import_module(f"suite_{known.suite}")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=suites(), required=True)
    parser.add_argument("--json", type=pathlib.Path, help="write the records here")
    parser.add_argument("--markdown", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    if hasattr(mod, "add_arguments"):
        mod.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = mod.run(args)
    text = json.dumps(records, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.markdown:
        env = (
            f"_Measured with torch {torch.__version__} on {platform.machine()}, "
            f"{torch.get_num_threads()} threads; command: `python benchmarks/run.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`._\n\n"
        )
        update_markdown(known.suite, env + mod.to_markdown(records, args), HERE.parent / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
