"""Deprecated alias of :mod:`robustclip.experiments.data`, where this module now lives.

Importing it warns once; every name it had is still here. Import from
``robustclip.experiments.data`` instead: this alias will be removed in a later release.
"""

from __future__ import annotations

import warnings
from typing import Any

from robustclip.experiments import data as _moved
from robustclip.experiments.data import *  # noqa: F403
from robustclip.experiments.data import __all__  # noqa: F401

warnings.warn(
    "robustclip.data has moved to robustclip.experiments.data; import it from there "
    "(the old path will be removed in a later release).",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    # names outside __all__ (private helpers) resolve in the new module too
    return getattr(_moved, name)
