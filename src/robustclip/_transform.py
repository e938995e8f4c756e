"""Batch-level gradient transformations and how they chain.

A :class:`GradientTransform` is an immutable object holding hyperparameters, plus two functions:

* ``init(params) -> state`` builds the explicit state (a NamedTuple of tensors, or a tuple of
  such for :class:`Chain`);
* ``update(grads, state, ctx) -> (grads, state)`` transforms the aggregated gradient. It may
  write into ``grads`` in place (the clipper owns them) and returns them.

The clipper runs the chain once per optimizer step, after accumulation and the distributed
all-reduce and before ``optimizer.step()``. Readings for diagnostics (norm before clipping,
whether it clipped) are part of the state, as device tensors, so reading them is the user's
choice and costs no sync in the step itself.

:func:`robustclip.chain`, which also puts a sample-level estimator in front, lives one floor up
in ``_method.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, NamedTuple, TypeVar, cast

import torch
from torch import Tensor

from robustclip._math import global_norm, tensor_norms, wide_dtype

__all__ = ["Chain", "GradientTransform", "StepContext", "identity"]

#: a transform's state: a NamedTuple of tensors (or a tuple of such, for a chain)
S = TypeVar("S")


@dataclass
class StepContext:
    """What a transform may read besides the gradient.

    Attributes:
        params: the parameters, aligned with ``grads``.
        names: a name for each parameter (``"layer.0.weight"``), aligned with ``grads``.
        loss: the mean loss over the samples of this step (0-d tensor), if known.
        num_samples: how many samples (or micro-batches, for micro-batch clipping) the gradient
            averages, over all processes.
        modules: for each parameter, the module that owns it (``None`` for unknown), so a
            transform can tell an embedding from a linear layer.
        sum_over_shards: under FSDP2, where each process holds a shard of every gradient:
            turns a process's partial sum (of squares) into the whole gradient's, with one
            all-reduce. ``None``: the gradients are whole.
        grad_norm: the global norm of the gradients as the chain receives them, when the
            clipper already has it (FSDP2: from its one all-reduce); dropped after the first
            transform, which may change them.
    """

    params: Sequence[Tensor]
    names: Sequence[str]
    loss: Tensor | None = None
    num_samples: Tensor | None = None
    modules: Sequence[torch.nn.Module | None] = field(default_factory=list)
    sum_over_shards: Callable[[Tensor], Tensor] | None = None
    grad_norm: Tensor | None = None

    def global_norm(self, grads: Sequence[Tensor]) -> Tensor:
        """The L2 norm of the whole gradient (over every shard under FSDP2), in the wide dtype
        (float64 where the device has it): finite for every finite gradient, even above the
        float32 maximum."""
        if self.grad_norm is not None:
            return self.grad_norm
        wide = wide_dtype(grads[0].device) if grads else torch.float64
        if self.sum_over_shards is None:
            return global_norm(grads, dtype=wide)
        return self.sum_over_shards(self._shard_squares(grads, wide).sum()).sqrt()

    def tensor_norms(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """The L2 norm of each gradient tensor (over its shards under FSDP2: one all-reduce),
        in the wide dtype, overflow-safe as :meth:`global_norm`."""
        if not grads:
            return []
        wide = wide_dtype(grads[0].device)
        if self.sum_over_shards is None:
            return tensor_norms(grads, dtype=wide)
        return list(self.sum_over_shards(self._shard_squares(grads, wide)).sqrt().unbind())

    @staticmethod
    def _shard_squares(grads: Sequence[Tensor], wide: torch.dtype) -> Tensor:
        # each local shard's squared norm from the overflow-safe norms: the square of a float32
        # norm cannot overflow a float64
        if not grads:
            return torch.zeros(0, dtype=wide)
        return torch.stack(tensor_norms(grads, dtype=wide)).square()


class GradientTransform(Generic[S]):
    """Base class of batch-level transforms, generic in their state type ``S``. Subclasses
    define ``init`` and ``update``."""

    #: name under which the transform's readings appear in :class:`robustclip.StepInfo`.
    name: str = "transform"

    def init(self, params: Sequence[Tensor]) -> S:
        return cast(S, ())

    def update(self, grads: list[Tensor], state: S, ctx: StepContext) -> tuple[list[Tensor], S]:
        raise NotImplementedError

    def readings(self, state: S) -> dict[str, Any]:
        """Diagnostic readings from ``state`` (device tensors; no sync)."""
        if isinstance(state, tuple) and hasattr(state, "_asdict"):
            return {k: v for k, v in state._asdict().items() if isinstance(v, Tensor)}
        return {}

    # ``state_dict`` support: a NamedTuple state becomes a plain dict of tensors, which
    # ``torch.load(weights_only=True)`` accepts; ``state_from_dict`` rebuilds it using a fresh
    # ``init`` state as the template, so the structure never has to be pickled.
    def state_to_dict(self, state: S) -> Any:
        return state_to_plain(state)

    def state_from_dict(self, template: S, data: Any) -> S:
        return cast(S, state_from_plain(template, data))


def state_to_plain(state: Any) -> Any:
    if isinstance(state, tuple) and hasattr(state, "_asdict"):
        return {k: state_to_plain(v) for k, v in state._asdict().items()}
    if isinstance(state, (tuple, list)):
        return [state_to_plain(v) for v in state]
    if isinstance(state, dict):
        return {k: state_to_plain(v) for k, v in state.items()}
    return state


def state_from_plain(template: Any, data: Any) -> Any:
    if isinstance(template, tuple) and hasattr(template, "_asdict"):
        fields = template._asdict()  # a NamedTuple's fields, in order, with their values
        if not isinstance(data, dict) or set(data) != set(fields):
            raise ValueError(
                f"state_dict does not match {type(template).__name__}: expected keys "
                f"{sorted(fields)}, got {sorted(data) if isinstance(data, dict) else type(data).__name__}. "
                "Was it saved with a different chain of transforms?"
            )
        return type(template)(**{k: state_from_plain(v, data[k]) for k, v in fields.items()})
    if isinstance(template, (tuple, list)):
        if not isinstance(data, (tuple, list)) or len(data) != len(template):
            raise ValueError(
                f"state_dict does not match: expected a sequence of {len(template)} states, got "
                f"{type(data).__name__} of length {len(data) if hasattr(data, '__len__') else '?'}."
            )
        out = [state_from_plain(t, d) for t, d in zip(template, data)]
        return type(template)(out) if isinstance(template, tuple) else out
    if isinstance(template, dict):
        return {k: state_from_plain(template[k], data[k]) for k in template}
    if isinstance(template, Tensor):
        if not isinstance(data, Tensor):
            raise ValueError(f"state_dict holds {type(data).__name__} where a tensor was expected.")
        return data.to(device=template.device).clone()
    return data


class _EmptyState(NamedTuple):
    pass


class Identity(GradientTransform[_EmptyState]):
    name = "identity"

    def init(self, params: Sequence[Tensor]) -> _EmptyState:
        return _EmptyState()

    def update(self, grads: list[Tensor], state: _EmptyState, ctx: StepContext) -> tuple[list[Tensor], _EmptyState]:
        return grads, state


def identity() -> GradientTransform[Any]:
    """The transform that leaves the gradient as it is."""
    return Identity()


class Chain(GradientTransform[tuple[Any, ...]]):
    """Apply transforms one after another; the state is the tuple of their states."""

    name = "chain"

    def __init__(self, transforms: Sequence[GradientTransform[Any]]) -> None:
        self.transforms: tuple[GradientTransform[Any], ...] = tuple(transforms)

    def init(self, params: Sequence[Tensor]) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in self.transforms)

    def update(
        self, grads: list[Tensor], state: tuple[Any, ...], ctx: StepContext
    ) -> tuple[list[Tensor], tuple[Any, ...]]:
        new_states = []
        for t, s in zip(self.transforms, state):
            grads, s = t.update(grads, s, ctx)
            if ctx.grad_norm is not None:  # t may have changed the gradient
                ctx = replace(ctx, grad_norm=None)
            new_states.append(s)
        return grads, tuple(new_states)

    def readings(self, state: tuple[Any, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for t, s in zip(self.transforms, state):
            key = t.name
            i = 1
            while key in out:
                i += 1
                key = f"{t.name}_{i}"
            out[key] = t.readings(s)
        return out

    def state_to_dict(self, state: tuple[Any, ...]) -> Any:
        return [t.state_to_dict(s) for t, s in zip(self.transforms, state)]

    def state_from_dict(self, template: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
        if not isinstance(data, (list, tuple)) or len(data) != len(self.transforms):
            raise ValueError(
                f"state_dict holds {len(data) if hasattr(data, '__len__') else '?'} transform "
                f"states but this chain has {len(self.transforms)} transforms."
            )
        return tuple(t.state_from_dict(s, d) for t, s, d in zip(self.transforms, template, data))

    def __repr__(self) -> str:
        return "chain(" + ", ".join(repr(t) for t in self.transforms) + ")"

