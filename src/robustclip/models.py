"""Deprecated alias of :mod:`robustclip.experiments.models`, where this module now lives.

Importing it warns once; every name it had is still here. Import from
``robustclip.experiments.models`` instead: this alias will be removed in a later release.
"""

from __future__ import annotations

import warnings
from typing import Any

from robustclip.experiments import models as _moved
from robustclip.experiments.models import *  # noqa: F403
from robustclip.experiments.models import __all__  # noqa: F401

warnings.warn(
    "robustclip.models has moved to robustclip.experiments.models; import it from there "
    "(the old path will be removed in a later release).",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    # names outside __all__ (private helpers) resolve in the new module too
    return getattr(_moved, name)
