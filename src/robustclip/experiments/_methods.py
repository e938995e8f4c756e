"""The methods the experiments compare, by the labels the papers use.

Each entry turns a few hyperparameters into a robustclip gradient method for ``rc.Clipper``.
The optimizer is always ``torch.optim.SGD(lr, momentum)`` -- momentum is the optimizer's job, so
``SGDM`` is the mean gradient with ``momentum=0.9`` and every other method gets the same
momentum in a fair comparison. Adding a method is one entry in :data:`METHODS`.

=================  ==========================================================================
label              method (arXiv id of the paper it is from)
=================  ==========================================================================
SGD / SGDM         ``rc.mean()``: the mini-batch mean gradient
Clip-SGD           ``rc.clip_by_global_norm(c)`` (1211.5063; 2605.14800)
NSGD               ``rc.normalize()`` (2002.03305; 2605.14800)
PS-Clip-SGD        ``rc.per_sample_clip(c)`` (2605.02701)
Micro-Clip         ``rc.micro_batch_clip(c)``: clip each micro-batch's mean (2605.02701)
Clip-after-acc     ``rc.chain(rc.mean(), rc.clip_by_global_norm(c))``: accumulate, then clip
Spectral           ``rc.spectral_clip(tau)``: clip singular values (2605.11838), when present
=================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import robustclip as rc

__all__ = [
    "METHODS", "MethodParams", "MethodSpec", "available_methods", "build_method", "check_methods", "step_size",
]


@dataclass(frozen=True)
class MethodParams:
    """Hyperparameters a method may read (each method reads only its own)."""

    clip: float = 1.0  # radius c of Clip-SGD, PS-Clip-SGD and micro-batch clipping
    tau: float = 1.0  # spectral clipping's singular-value threshold
    rank: int = 0  # spectral clipping's rank r of the randomized SVD (0: exact SVD)
    threshold: Any = None  # a threshold object replacing the constant radius/tau, if any
    engine: str = "auto"  # per-sample engine of PS-Clip-SGD
    spectral_head: str | None = "auto"  # spectral clipping's output head to skip (None: clip all)
    #: which parameters spectral clipping takes: ``select(name, param, module) -> bool`` or
    #: parameter names, passed to ``rc.spectral_clip(select=...)``; None: its default selection
    spectral_select: Any = None


@dataclass(frozen=True)
class MethodSpec:
    label: str
    description: str
    build: Callable[[MethodParams], Any]
    per_sample: bool = False
    #: the method needs a piece that may not be installed yet; None: always available
    requires: str | None = None


def _radius(p: MethodParams, default: float) -> Any:
    return p.threshold if p.threshold is not None else default


def _spectral(p: MethodParams) -> Any:
    spectral_clip = _spectral_fn()
    if spectral_clip is None:
        raise ValueError("spectral clipping is not available in this robustclip installation.")
    return spectral_clip(
        _radius(p, p.tau), rank=p.rank if p.rank > 0 else None, head=p.spectral_head, select=p.spectral_select,
    )


def _spectral_fn() -> Callable[..., Any] | None:
    return getattr(rc, "spectral_clip", None)


METHODS: dict[str, MethodSpec] = {
    m.label: m
    for m in (
        MethodSpec("SGD", "mean gradient (use momentum=0)", lambda p: rc.mean()),
        MethodSpec("SGDM", "mean gradient, SGD with momentum", lambda p: rc.mean()),
        MethodSpec("Clip-SGD", "clip the batch gradient to norm c", lambda p: rc.clip_by_global_norm(_radius(p, p.clip))),
        MethodSpec("NSGD", "normalize the batch gradient", lambda p: rc.normalize()),
        MethodSpec(
            "PS-Clip-SGD", "clip each sample's gradient to norm c, then average",
            lambda p: rc.per_sample_clip(_radius(p, p.clip), engine=p.engine), per_sample=True,
        ),
        MethodSpec("Micro-Clip", "clip each micro-batch's mean gradient, then average", lambda p: rc.micro_batch_clip(_radius(p, p.clip))),
        MethodSpec(
            "Clip-after-acc", "average the micro-batches, then clip",
            lambda p: rc.chain(rc.mean(), rc.clip_by_global_norm(_radius(p, p.clip))),
        ),
        MethodSpec("Spectral", "clip each weight matrix's singular values at tau", _spectral, requires="spectral"),
    )
}


def _is_available(spec: MethodSpec) -> bool:
    if spec.requires == "spectral":
        return _spectral_fn() is not None
    return True


def available_methods() -> list[str]:
    """Labels of the methods this installation can build."""
    return [k for k, s in METHODS.items() if _is_available(s)]


def check_methods(labels: Sequence[str], allowed: Sequence[str] | None = None) -> list[str]:
    """Validate method labels; unknown or unavailable ones raise a ValueError listing valid ones."""
    valid = [m for m in available_methods() if allowed is None or m in allowed]
    out = []
    for lab in labels:
        if lab not in valid:
            extra = ""
            if lab in METHODS and not _is_available(METHODS[lab]):
                extra = f" ({lab} needs {METHODS[lab].requires} clipping, which is not installed)"
            raise ValueError(f"unknown method {lab!r}{extra}; choose from {valid}.")
        out.append(lab)
    if not out:
        raise ValueError(f"no methods given; choose from {valid}.")
    return out


def build_method(label: str, params: MethodParams | None = None) -> Any:
    """The robustclip method for ``label`` (see the table in the module docstring)."""
    check_methods([label])
    return METHODS[label].build(params or MethodParams())


def step_size(label: str, lr: float, clip: float, nsgd_lr: float = 0.0) -> float:
    """The SGD step size an experiment gives method ``label``.

    Every method gets ``lr`` except NSGD, whose step ``lr * g/||g||`` always has length ``lr``:
    it gets ``nsgd_lr``, or, when that is 0, ``lr * clip`` -- the length of a clipped Clip-SGD
    step, so that under heavy noise (where Clip-SGD clips almost every step) the two compare at
    the same step length.
    """
    if label != "NSGD":
        return lr
    if nsgd_lr < 0:
        raise ValueError(f"nsgd_lr must be >= 0 (0: lr * clip), got {nsgd_lr}.")
    return nsgd_lr if nsgd_lr > 0 else lr * clip
