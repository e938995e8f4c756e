"""The checks that keep the hook engine from training on a silently wrong gradient.

* **Sample 0 against autograd** (:class:`Verifier`), on every step that takes a path for the
  first time (the first step, a module that starts falling back, a layer called in a new way)
  and every ``verify_every`` steps: sample 0's gradient from the terms is compared, parameter
  by parameter, with ``torch.autograd.grad(losses[0], params)`` (one extra backward pass).
  This catches what shapes cannot: a model that keeps the batch in another dimension or mixes
  samples in its forward pass. A mismatch raises, and the check stays due. (A whole-model
  fallback's engine is checked by ``_engine.accumulate_into`` on its first use.)
* **A fallback unit's first replay** must reproduce the unit's recorded outputs
  (:func:`check_replay_output`); if it cannot (randomness, mixing of samples), the unit switches
  to graph mode (``fallback.py``). The units checked so far are kept here.
* **A rule call's input** must be unchanged since the layer used it
  (:func:`check_input_unchanged`): autograd would notice an in-place change only when computing
  the weight gradient, which the engine skips.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor

from robustclip._math import wide_dtype
from robustclip.per_sample._engine import ParamLayout, PathCheck, acc_dtype
from robustclip.per_sample._hooks.capture import Call
from robustclip.per_sample.rules._terms import Term, sum_materialized

_HALF = (torch.float16, torch.bfloat16)


class ReplayError(RuntimeError):
    """The replay cannot reproduce the unit's forward pass (randomness, samples mixing)."""


class Verifier:
    """Which checks are due, and what has passed its first-use check.

    Args:
        layout: the clipper's parameter layout.
        checks: the engine's :class:`PathCheck`: the sample-0 check runs on a step that takes
            a path (a rule job, a fallback, a broadcast site; ``Plan.paths``) for the first
            time, and every ``checks.every`` steps.
    """

    def __init__(self, layout: ParamLayout, checks: PathCheck) -> None:
        self.layout = layout
        self.checks = checks
        #: the sample-0 check runs on this step
        self.due = False
        self._paths: set[str] = set()
        #: fallback units (by id) whose replay has reproduced their recorded outputs
        self.replays_checked: set[int] = set()

    def begin(self, paths: set[str]) -> None:
        """A step that takes ``paths``: is the sample-0 check due?"""
        self._paths = paths
        self.due = self.checks.due(paths)

    def reference(self, losses: Tensor, muted: Callable[[], AbstractContextManager[None]]) -> list[Tensor] | None:
        """Autograd's gradient of sample 0, when the check is due; taken before the engine's
        own backward pass, which may free the graph. ``muted``: a block whose forward passes
        the engine does not record."""
        if not self.due:
            return None
        params = self.layout.params
        with muted():
            got = torch.autograd.grad(losses[0], params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]

    def check(self, ref: list[Tensor] | None, terms: dict[int, list[Term]], kept: dict[int, Tensor]) -> None:
        """Sample 0's gradient from ``terms`` and ``kept`` (by parameter index) against ``ref``."""
        if ref is None:
            return
        check_sample(ref, terms, kept, self.layout.names)
        self.due = False
        self.checks.passed(self._paths)


def check_sample(ref: list[Tensor], terms: dict[int, list[Term]], kept: dict[int, Tensor], names: list[str]) -> None:
    """Sample 0's gradient from the terms must match autograd's, parameter by parameter."""
    half = any(t.dtype in _HALF for ts in terms.values() for t in ts) or any(g.dtype in _HALF for g in kept.values())
    rtol, atol = (5e-2, 1e-2) if half else (1e-3, 1e-5)
    # one host read per parameter, on check steps only; in float64, so that an exploding (1e25)
    # or vanishing (1e-25) float32 gradient is compared, not inf against inf or 0 against 0
    wide = wide_dtype(ref[0].device) if ref else torch.float64
    total = math.sqrt(sum(float(torch.linalg.vector_norm(r.detach(), dtype=wide)) ** 2 for r in ref))
    bad = []
    for idx, r in enumerate(ref):
        ts = terms.get(idx)
        r = r.detach()
        if idx in kept:
            mine = kept[idx][0]
        else:
            mine = sum_materialized(ts, slice(0, 1))[0] if ts else torch.zeros_like(r)
        err = float(torch.linalg.vector_norm(mine.to(wide) - r.to(wide)))
        # the floor: gradients that are rounding noise everywhere compare as equal
        floor = 100 * torch.finfo(acc_dtype(r.dtype)).eps * (1.0 + total)
        if err > rtol * float(torch.linalg.vector_norm(r, dtype=wide)) + atol * total + floor:
            bad.append(names[idx])
    if bad:
        raise ValueError(
            "robustclip hook engine: the per-sample gradient of sample 0 disagrees with autograd "
            f"for {', '.join(bad[:6])}{'...' if len(bad) > 6 else ''}. The model probably mixes "
            "samples in its forward pass (statistics over the batch), keeps the batch "
            "elsewhere than in the first dimension (e.g. nn.MultiheadAttention or RNNs with "
            "batch_first=False), or uses these parameters in a way the rules do not model. "
            "Make the batch the first dimension, or use engine='vmap' or engine='loop'."
        )


def check_replay_output(got: Tensor, ref: Tensor) -> None:
    """A replayed output (per sample, stacked) against the recorded one; :class:`ReplayError`
    if they differ beyond rounding."""
    got, ref = got.detach().float(), ref.detach().float()
    scale = max(float(ref.abs().amax()) if ref.numel() else 0.0, 1.0)
    half = ref.dtype in _HALF
    tol = (1e-2 if half else 1e-4) * scale
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=0, atol=tol):
        raise ReplayError("the replay of the module one sample at a time does not reproduce its output")


def check_input_unchanged(call: Call) -> None:
    """A rule call's input still holds the value the layer saw."""
    assert call.x is not None
    if call.x._version != call.x_version:
        raise ValueError(
            f"the input of '{call.unit.name}' was modified in place after the layer used it; "
            "per-sample gradients need the value the layer saw. Avoid the in-place "
            "operation on that tensor (e.g. use x = x + y instead of x += y)."
        )
