"""Batch-level gradient transformations and how they compose.

A :class:`GradientTransform` is an immutable object holding hyperparameters, plus two functions:

* ``init(params) -> state`` builds the explicit state (a NamedTuple of tensors, or a tuple of
  such for :func:`chain`);
* ``update(grads, state, ctx) -> (grads, state)`` transforms the aggregated gradient. It may
  write into ``grads`` in place (the clipper owns them) and returns them.

The clipper runs the chain once per optimizer step, after accumulation and the distributed
all-reduce and before ``optimizer.step()``. Readings for diagnostics (norm before clipping,
whether it clipped) are part of the state, as device tensors, so reading them is the user's
choice and costs no sync in the step itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from robustclip import _kernels

__all__ = ["GradientTransform", "StepContext", "chain", "identity"]


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
    """

    params: Sequence[Tensor]
    names: Sequence[str]
    loss: Tensor | None = None
    num_samples: Tensor | None = None
    modules: Sequence[torch.nn.Module | None] = field(default_factory=list)


class GradientTransform:
    """Base class of batch-level transforms. Subclasses define ``init`` and ``update``."""

    #: name under which the transform's readings appear in :class:`robustclip.StepInfo`.
    name: str = "transform"

    def init(self, params: Sequence[Tensor]) -> Any:
        return ()

    def update(
        self, grads: list[Tensor], state: Any, ctx: StepContext
    ) -> tuple[list[Tensor], Any]:
        raise NotImplementedError

    def readings(self, state: Any) -> dict[str, Any]:
        """Diagnostic readings from ``state`` (device tensors; no sync)."""
        if isinstance(state, tuple) and hasattr(state, "_asdict"):
            return {k: v for k, v in state._asdict().items() if isinstance(v, Tensor)}
        return {}

    # ``state_dict`` support: a NamedTuple state becomes a plain dict of tensors, which
    # ``torch.load(weights_only=True)`` accepts; ``state_from_dict`` rebuilds it using a fresh
    # ``init`` state as the template, so the structure never has to be pickled.
    def state_to_dict(self, state: Any) -> Any:
        return state_to_plain(state)

    def state_from_dict(self, template: Any, data: Any) -> Any:
        return state_from_plain(template, data)


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
        if not isinstance(data, dict) or set(data) != set(template._fields):
            raise ValueError(
                f"state_dict does not match {type(template).__name__}: expected keys "
                f"{sorted(template._fields)}, got {sorted(data) if isinstance(data, dict) else type(data).__name__}. "
                "Was it saved with a different chain of transforms?"
            )
        return type(template)(
            **{k: state_from_plain(getattr(template, k), data[k]) for k in template._fields}
        )
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


class Identity(GradientTransform):
    name = "identity"

    def init(self, params: Sequence[Tensor]) -> _EmptyState:
        return _EmptyState()

    def update(self, grads, state, ctx):  # type: ignore[override]
        return grads, state


def identity() -> GradientTransform:
    """The transform that leaves the gradient as it is."""
    return Identity()


class Chain(GradientTransform):
    """Apply transforms one after another; the state is the tuple of their states."""

    name = "chain"

    def __init__(self, transforms: Sequence[GradientTransform]) -> None:
        self.transforms = tuple(transforms)

    def init(self, params: Sequence[Tensor]) -> tuple:
        return tuple(t.init(params) for t in self.transforms)

    def update(self, grads, state, ctx):  # type: ignore[override]
        new_states = []
        for t, s in zip(self.transforms, state):
            grads, s = t.update(grads, s, ctx)
            new_states.append(s)
        return grads, tuple(new_states)

    def readings(self, state: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for t, s in zip(self.transforms, state):
            key = t.name
            i = 1
            while key in out:
                i += 1
                key = f"{t.name}_{i}"
            out[key] = t.readings(s)
        return out

    def state_to_dict(self, state: Any) -> Any:
        return [t.state_to_dict(s) for t, s in zip(self.transforms, state)]

    def state_from_dict(self, template: Any, data: Any) -> Any:
        if not isinstance(data, (list, tuple)) or len(data) != len(self.transforms):
            raise ValueError(
                f"state_dict holds {len(data) if hasattr(data, '__len__') else '?'} transform "
                f"states but this chain has {len(self.transforms)} transforms."
            )
        return tuple(t.state_from_dict(s, d) for t, s, d in zip(self.transforms, template, data))

    def __repr__(self) -> str:
        return "chain(" + ", ".join(repr(t) for t in self.transforms) + ")"


def chain(*pieces: Any) -> Any:
    """Compose gradient methods into one, read left to right like an algorithm box.

    The first piece may be a sample-level estimator (:func:`robustclip.per_sample_clip`,
    :func:`robustclip.micro_batch_clip`, ...); the rest are batch-level transforms applied to
    the aggregated gradient. Example::

        rc.chain(rc.per_sample_clip(1.0), rc.clip_by_global_norm(5.0))

    Returns a :class:`GradientTransform` when every piece is one, otherwise a
    :class:`robustclip.Method` pairing the estimator with the transform chain.
    """
    from robustclip._estimators import Estimator, Method

    flat: list[Any] = []
    for p in pieces:
        if isinstance(p, Method):
            flat.append(p.estimator)
            flat.extend(p.transform.transforms if isinstance(p.transform, Chain) else [p.transform])
        elif isinstance(p, Chain):
            flat.extend(p.transforms)
        else:
            flat.append(p)
    estimators = [i for i, p in enumerate(flat) if isinstance(p, Estimator)]
    for p in flat:
        if not isinstance(p, (Estimator, GradientTransform)):
            raise TypeError(
                f"chain() takes robustclip estimators and transforms, got {type(p).__name__}. "
                "Build pieces with e.g. rc.per_sample_clip(1.0) or rc.clip_by_global_norm(1.0)."
            )
    if len(estimators) > 1:
        raise ValueError(
            "chain() got more than one sample-level estimator "
            f"({', '.join(repr(flat[i]) for i in estimators)}); a step has one way of turning "
            "per-sample losses into a gradient. Keep one and express the rest as transforms."
        )
    if estimators and estimators[0] != 0:
        raise ValueError(
            f"the sample-level estimator {flat[estimators[0]]!r} must come first in chain(): it "
            "produces the gradient that the batch-level transforms then act on."
        )
    transforms = [p for p in flat if isinstance(p, GradientTransform)]
    if not estimators:
        return Chain(transforms)
    return Method(flat[0], Chain(transforms))


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of the concatenation of ``tensors``, in float32 or wider, without a host sync
    (:func:`robustclip._kernels.sum_of_squares`)."""
    if len(tensors) == 0:
        return torch.zeros(())
    return _kernels.sum_of_squares(list(tensors)).sqrt()
