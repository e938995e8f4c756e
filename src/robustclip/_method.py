"""A gradient method: one sample-level estimator followed by a chain of batch-level transforms.

The floor above the estimators (``_estimators.py``) and the transforms (``_transform.py`` and
the files that define them): :func:`chain` reads pieces left to right like an algorithm box,
and :func:`as_method` turns anything the :class:`robustclip.Clipper` accepts into a
:class:`Method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, overload

from robustclip._estimators import Estimator, Mean
from robustclip._transform import Chain, GradientTransform

__all__ = ["Method", "as_method", "chain"]

@dataclass(frozen=True)
class Method:
    """A sample-level estimator followed by a chain of batch-level transforms."""

    estimator: Estimator[Any]
    transform: Chain

    def __post_init__(self) -> None:
        # a single transform (or none) given directly is a chain of one (or of none)
        t: object = self.transform
        if t is None:
            object.__setattr__(self, "transform", Chain(()))
        elif isinstance(t, GradientTransform) and not isinstance(t, Chain):
            object.__setattr__(self, "transform", Chain((t,)))
        elif not isinstance(t, Chain):
            raise TypeError(
                f"Method's transform must be a transform such as rc.clip_by_global_norm(1.0) or "
                f"rc.chain(...) of them, got {type(t).__name__}."
            )

    def __repr__(self) -> str:
        parts = [repr(self.estimator), *(repr(t) for t in self.transform.transforms)]
        return "chain(" + ", ".join(parts) + ")"


def as_method(method: object) -> Method:
    """Normalise anything the Clipper accepts into a :class:`Method`."""
    if method is None:
        return Method(Mean(), Chain(()))
    if isinstance(method, Method):
        return method
    if isinstance(method, Estimator):
        return Method(method, Chain(()))
    if isinstance(method, Chain):
        return Method(Mean(), method)
    if isinstance(method, GradientTransform):
        return Method(Mean(), Chain((method,)))
    raise TypeError(
        f"Clipper got {type(method).__name__} as its method; pass an estimator such as "
        "rc.per_sample_clip(1.0), a transform such as rc.clip_by_global_norm(1.0), or "
        "rc.chain(...) of them."
    )


@overload
def chain(first: Estimator[Any] | Method, /, *rest: GradientTransform[Any]) -> Method: ...


@overload
def chain(*pieces: GradientTransform[Any]) -> Chain: ...


def chain(*pieces: Any) -> Method | Chain:
    """Compose gradient methods into one, read left to right like an algorithm box.

    The first piece may be a sample-level estimator (:func:`robustclip.per_sample_clip`,
    :func:`robustclip.micro_batch_clip`, ...); the rest are batch-level transforms applied to
    the aggregated gradient. Example::

        rc.chain(rc.per_sample_clip(1.0), rc.clip_by_global_norm(5.0))

    Returns a :class:`Method` pairing the estimator with the transform chain, or, when every
    piece is a transform, that chain (a :class:`GradientTransform`).
    """
    flat: list[Any] = []
    for p in pieces:
        if isinstance(p, Method):
            flat.append(p.estimator)
            flat.extend(p.transform.transforms)
        elif isinstance(p, Chain):
            flat.extend(p.transforms)
        else:
            flat.append(p)
    for p in flat:
        if not isinstance(p, (Estimator, GradientTransform)):
            raise TypeError(
                f"chain() takes robustclip estimators and transforms, got {type(p).__name__}. "
                "Build pieces with e.g. rc.per_sample_clip(1.0) or rc.clip_by_global_norm(1.0)."
            )
    estimators = [i for i, p in enumerate(flat) if isinstance(p, Estimator)]
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
