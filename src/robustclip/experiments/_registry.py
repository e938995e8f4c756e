"""The registry of built-in experiments: name -> module, configs and problems by name."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from robustclip.experiments._config import apply_overrides
from robustclip.experiments._problem import Problem

__all__ = ["describe", "get_experiment", "list_experiments", "load_problem", "make_config"]

#: experiment name -> its module (relative to this package); a module serving several names
#: (cifar) gives each its defaults through ``default_config(name)``
_REGISTRY: dict[str, str] = {
    "demo": "demo",
    "synthetic-noise": "synthetic_noise",
    "label-noise": "label_noise",
    "accumulation": "accumulation",
    "spectral-mlp": "spectral_mlp",
    "sgc": "sgc",
    "cifar100-alexnet": "cifar",
    "cifar10-resnet18": "cifar",
    "cifar10-spectral": "cifar",
}


def list_experiments() -> list[str]:
    """Names of the built-in experiments, for ``robustclip run NAME``."""
    return list(_REGISTRY)


def get_experiment(name: str) -> ModuleType:
    """The module of experiment ``name`` (with ``Config``, ``run``, ``plot``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; choose one of {list_experiments()}.")
    return importlib.import_module(f"robustclip.experiments.{_REGISTRY[name]}")


def describe(name: str) -> str:
    """A one-line description of experiment ``name``."""
    mod = get_experiment(name)
    return getattr(mod, "DESCRIPTIONS", {}).get(name, mod.DESCRIPTION)


def make_config(name: str, overrides: Mapping[str, Any] | None = None, *, from_string: bool = True) -> Any:
    """The default config of experiment ``name`` with ``overrides`` applied.

    ``overrides`` maps field names to strings (as from ``--set key=value``, parsed to the
    field's type) or, with ``from_string=False``, to typed values (as from TOML).
    """
    mod = get_experiment(name)
    cfg = mod.default_config(name) if hasattr(mod, "default_config") else mod.Config()
    return apply_overrides(cfg, overrides, from_string=from_string)


def load_problem(name: str, overrides: Mapping[str, str] | None = None) -> Problem:
    """The model, data and per-sample loss of experiment ``name``, freshly initialised.

    Args:
        name: an experiment from :func:`list_experiments` that defines a single problem
            (``label-noise``, ``synthetic-noise``, ``spectral-mlp``, ``sgc``, ``accumulation``
            and the CIFAR ones).
        overrides: config overrides as strings, e.g. ``{"label_noise": "0.4", "seed": "1"}``.

    Example::

        p = load_problem("label-noise")
        losses = p.loss_fn(p.model(p.train[0][:32]), p.train[1][:32])   # shape (32,)
    """
    mod = get_experiment(name)
    if not hasattr(mod, "problem"):
        raise ValueError(f"experiment {name!r} does not define a single problem to load.")
    return mod.problem(make_config(name, overrides))
