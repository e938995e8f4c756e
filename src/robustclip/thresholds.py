"""Clipping thresholds as small objects with explicit state.

Every clipping method in robustclip (global norm, per-tensor norm, per-sample, micro-batch and,
where present, spectral clipping) takes its radius either as a number or as a threshold object.
A threshold follows the same three-function shape as a gradient transform:

* ``init(device) -> state``: a NamedTuple of tensors, saved in ``Clipper.state_dict()``;
* ``value(state) -> Tensor``: the radius to use *now*, a 0-d float tensor on the device
  (float64 where the device has it, so float64 training is exact)
  (``inf`` means "do not clip this step");
* ``observe(state, values) -> state``: fold in this step's observed values, a 1-D tensor
  (one global norm, a batch of per-sample norms, or a layer's top singular value).

Everything stays on the device, so an adaptive threshold never forces a host-device sync.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from robustclip._validate import check_max_norm

__all__ = ["Threshold", "Constant", "as_threshold"]


@runtime_checkable
class Threshold(Protocol):
    """Protocol every threshold implements (see the module docstring)."""

    def init(self, device: torch.device | str | None = None) -> Any: ...

    def value(self, state: Any) -> Tensor: ...

    def observe(self, state: Any, values: Tensor) -> Any: ...


def radius_dtype(device: torch.device | str | None) -> torch.dtype:
    """float64 for radii (exact float64 training), float32 on devices without float64 (MPS)."""
    return torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64


class ConstantState(NamedTuple):
    radius: Tensor


class Constant:
    """A fixed radius ``c`` (``c > 0`` and finite; see :func:`as_threshold` for ``None``)."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = check_max_norm(max_norm)

    def init(self, device: torch.device | str | None = None) -> ConstantState:
        return ConstantState(torch.tensor(self.max_norm, dtype=radius_dtype(device), device=device))

    def value(self, state: ConstantState) -> Tensor:
        return state.radius

    def observe(self, state: ConstantState, values: Tensor) -> ConstantState:
        return state

    def __repr__(self) -> str:
        return f"Constant({self.max_norm})"


class _NoClipState(NamedTuple):
    radius: Tensor


class NoClip:
    """Radius ``+inf``: clipping is off (what ``max_norm=None`` means)."""

    def init(self, device: torch.device | str | None = None) -> _NoClipState:
        return _NoClipState(torch.tensor(float("inf"), dtype=radius_dtype(device), device=device))

    def value(self, state: _NoClipState) -> Tensor:
        return state.radius

    def observe(self, state: _NoClipState, values: Tensor) -> _NoClipState:
        return state

    def __repr__(self) -> str:
        return "NoClip()"


def as_threshold(max_norm: object, name: str = "max_norm") -> Threshold:
    """Turn a user's ``max_norm`` into a threshold object.

    A number becomes :class:`Constant`, ``None`` becomes "no clipping", and a threshold object
    is returned as is. Anything else is a TypeError that names the accepted forms.
    """
    if max_norm is None:
        return NoClip()
    if isinstance(max_norm, Threshold) and not isinstance(max_norm, type):
        return max_norm
    if isinstance(max_norm, type):
        raise TypeError(
            f"{name} got the class {max_norm.__name__}; pass an instance, e.g. {max_norm.__name__}(...)."
        )
    return Constant(check_max_norm(max_norm, name))
