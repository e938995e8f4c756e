"""The ``robustclip`` command: ``demo``, ``run``, ``list``, ``plot``, ``diagnose``.

Each sub-command lives with its subject (``robustclip.experiments.cli``,
``robustclip.diagnostics.cli``) and registers itself on the parser here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: modules that provide ``register(subparsers)``; each adds its sub-commands
_COMMAND_MODULES = ("robustclip.experiments.cli", "robustclip.diagnostics.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustclip",
        description="Robust and fast training via gradient clipping: experiments and diagnostics.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"robustclip: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
