"""Experiment configs: plain dataclasses, overridable from ``--set key=value`` and TOML.

Every experiment defines one ``Config`` dataclass whose fields carry type annotations and
defaults, nanoGPT-style: every hyperparameter visible in one place with a comment. This module
turns strings (``--set lr=0.1``) and TOML values into those types, and refuses unknown keys and
values of the wrong type with a message that lists what is valid.

:func:`validate_config` checks a whole config before anything is created: every float (and every
float in a list) must be finite, and fields whose names mean the same thing in every experiment
must lie in their range (``lr``, ``clip`` and ``tau`` > 0, ``momentum`` in [0, 1), ...; see
``FIELD_RANGES``); then the config's own ``check()`` runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FIELD_RANGES",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "load_toml",
    "parse_set_args",
    "validate_config",
]

#: ranges of the fields that mean the same thing in every experiment's config:
#: name -> (low, low included, high, high included, what the field is)
FIELD_RANGES: dict[str, tuple[float, bool, float, bool, str]] = {
    "lr": (0.0, False, math.inf, False, "the step size"),
    "nsgd_lr": (0.0, True, math.inf, False, "NSGD's step size (0: lr * clip)"),
    "sweep_lrs": (0.0, False, math.inf, False, "the swept step sizes"),
    "clip": (0.0, False, math.inf, False, "the clipping radius c; a radius of 0 would zero every gradient"),
    "tau": (0.0, False, math.inf, False, "the spectral threshold"),
    "momentum": (0.0, True, 1.0, False, "the optimizer's momentum"),
    "weight_decay": (0.0, True, math.inf, False, "the weight decay"),
    "sigma": (0.0, True, math.inf, False, "the noise scale"),
    "noise_scale": (0.0, True, math.inf, False, "the noise scale"),
    "noise_alpha": (0.0, False, math.inf, False, "a tail index"),
    "synthetic_alpha": (0.0, False, math.inf, False, "a tail index"),
    "ema_beta": (0.0, True, 1.0, False, "the EMA's decay"),
    "quantile": (0.0, True, 1.0, True, "a quantile"),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"config fields support only 'T | None' unions, not {tp}.")
    return tp, False


def _coerce(key: str, value: Any, tp: Any, from_string: bool) -> Any:
    """Convert ``value`` (a string from ``--set`` or a TOML value) to the field type ``tp``."""
    base, optional = _unwrap_optional(tp)
    if optional and (value is None or (from_string and str(value).strip().lower() in ("none", "null", ""))):
        return None
    origin = typing.get_origin(base)
    if origin in (tuple, list):
        args = typing.get_args(base)
        elem = args[0] if args else str
        if from_string:
            text = str(value).strip()
            if text.startswith("[") or text.startswith("("):
                text = text[1:-1]
            items: list[Any] = [s.strip() for s in text.split(",") if s.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise TypeError(
                f"config key {key!r} expects a list of {_type_name(elem)}, got {value!r} "
                f"({type(value).__name__}); write e.g. {key}=1,2,3 or a TOML array."
            )
        out = [_coerce(f"{key}[{i}]", v, elem, from_string) for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if base is bool:
        if isinstance(value, bool):
            return value
        if from_string and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise TypeError(f"config key {key!r} expects a bool (true/false), got {value!r}.")
    if base is int:
        if isinstance(value, bool):
            raise TypeError(f"config key {key!r} expects an int, got the bool {value!r}.")
        if isinstance(value, int):
            return value
        if from_string:
            try:
                return int(str(value).strip().replace("_", ""))
            except ValueError:
                pass
        raise TypeError(f"config key {key!r} expects an int, got {value!r}.")
    if base is float:
        if isinstance(value, bool):
            raise TypeError(f"config key {key!r} expects a float, got the bool {value!r}.")
        number: float | None = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif from_string:
            try:
                number = float(str(value).strip())
            except ValueError:
                pass
        if number is None:
            raise TypeError(f"config key {key!r} expects a float, got {value!r}.")
        if not math.isfinite(number):
            raise ValueError(f"config key {key!r} must be a finite number, got {value!r}.")
        return number
    if base is str:
        if isinstance(value, str):
            return value
        if from_string:
            return str(value)
        raise TypeError(f"config key {key!r} expects a string, got {value!r} ({type(value).__name__}).")
    raise TypeError(f"config key {key!r} has an unsupported type {_type_name(tp)}.")


def describe_fields(cfg: Any) -> str:
    """``key: type = value`` lines, one per field, for error messages and ``robustclip list``.

    ``cfg`` is a config class (its defaults are shown) or instance (its values are shown).
    """
    cls = cfg if isinstance(cfg, type) else type(cfg)
    hints = _hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        value = _default(f) if isinstance(cfg, type) else getattr(cfg, f.name)
        lines.append(f"  {f.name}: {_type_name(hints[f.name])} = {value!r}")
    return "\n".join(lines)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def apply_overrides(cfg: Any, overrides: Mapping[str, Any] | None, *, from_string: bool = True) -> Any:
    """A copy of the dataclass ``cfg`` with ``overrides`` applied (strings parsed to field types).

    Raises:
        ValueError: an unknown key (the message lists the valid keys with their types).
        TypeError: a value that does not parse as the field's type.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"apply_overrides needs a config dataclass instance, got {type(cfg).__name__}.")
    if not overrides:
        return dataclasses.replace(cfg)
    cls = type(cfg)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for key, value in overrides.items():
        k = key.replace("-", "_")
        if k not in names:
            raise ValueError(
                f"unknown config key {key!r} for {cls.__module__.rsplit('.', 1)[-1]}; valid keys:\n"
                + describe_fields(cfg)
            )
        changes[k] = _coerce(k, value, hints[k], from_string)
    out = dataclasses.replace(cfg, **changes)
    validate_config(out)
    return out


def _in_range(v: float, rule: tuple[float, bool, float, bool, str]) -> bool:
    lo, lo_in, hi, hi_in, _ = rule
    return (v > lo or (lo_in and v == lo)) and (v < hi or (hi_in and v == hi))


def validate_config(cfg: Any) -> None:
    """Check a whole config: finite floats, the shared fields' ranges, then ``cfg.check()``.

    Raises:
        ValueError: naming the field, its value and what it must be.
    """
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        values = list(v) if isinstance(v, (list, tuple)) else [v]
        for x in values:
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError(f"config key {f.name!r} must be a finite number, got {v!r}.")
        rule = FIELD_RANGES.get(f.name)
        if rule is None:
            continue
        for x in values:
            if isinstance(x, (int, float)) and not isinstance(x, bool) and not _in_range(float(x), rule):
                lo, lo_in, hi, hi_in, what = rule
                interval = ("[" if lo_in else "(") + f"{lo:g}, {hi:g}" + ("]" if hi_in else ")")
                raise ValueError(f"config key {f.name!r} ({what}) must lie in {interval}, got {v!r}.")
    check = getattr(cfg, "check", None)
    if callable(check):
        check()


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build ``cls`` from typed values (TOML or JSON), validating keys and types."""
    return apply_overrides(cls(), data, from_string=False)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON/TOML-able values (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file of overrides (a flat table, or one ``[config]`` table)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "reading TOML configs on Python 3.10 needs the tomli package (pip install tomli); "
                "Python 3.11+ has it built in."
            ) from e
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist.")
    with p.open("rb") as fh:
        data = tomllib.load(fh)
    if set(data) == {"config"} and isinstance(data["config"], dict):
        data = data["config"]
    return data


def parse_set_args(items: list[str] | None) -> dict[str, str]:
    """``["lr=0.1", "methods=SGDM,NSGD"]`` -> ``{"lr": "0.1", "methods": "SGDM,NSGD"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}.")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def dump_toml(data: Mapping[str, Any]) -> str:
    """A flat mapping of str/int/float/bool/None/lists as TOML (None is left out: TOML has no null)."""
    lines = []
    for k, v in data.items():
        if v is None:
            lines.append(f"# {k} = None")
            continue
        lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            return {True: "nan"}.get(v != v, "inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML.")
