"""The radii of the sample-level estimators: which threshold each layer group uses, and what an
adaptive one observes when several processes train together.

Per-sample clipping takes one radius ``c`` for the flat norm over the whole model, the same
rule per layer group (``per_layer=True``), or, per layer, a mapping from layer-group name to
its own ``c_l``. :class:`GroupRadii` turns that argument into one threshold per group of a
:class:`~robustclip.per_sample.ParamLayout`. With several processes an adaptive threshold
observes every process's norms (:func:`gathered`), so the radii stay identical everywhere; a
constant one observes nothing and costs no collective. The estimators themselves are in
``_estimators.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from robustclip._math import wide_dtype
from robustclip.per_sample import ParamLayout
from robustclip.thresholds import Constant, NoClip, Threshold, as_threshold

__all__ = ["GroupRadii", "gathered"]


def gathered(values: Tensor, layout: ParamLayout, thresholds: Sequence[Threshold]) -> Tensor:
    """What an adaptive threshold observes: with several processes, every process's norms (the
    last dimension, joined in rank order), so the radii stay identical on every process; a
    constant radius observes nothing and needs no collective."""
    if layout.gather_norms is None or all(isinstance(t, (Constant, NoClip)) for t in thresholds):
        return values
    return layout.gather_norms(values)


class GroupRadii:
    """The radius of per-sample clipping, one threshold per layer group or one for the flat norm.

    ``max_norm`` is a number or threshold (the same rule for every group with ``per_layer``,
    each group keeping its own state), ``None`` (no clipping), or, with ``per_layer``, a mapping
    from layer-group name to that group's radius.
    """

    def __init__(self, max_norm: Any, per_layer: bool) -> None:
        self.per_layer = per_layer
        self.per_group: Mapping[str, Threshold] | None = None
        self.threshold: Threshold | None = None
        if isinstance(max_norm, Mapping):
            if not per_layer:
                raise ValueError(
                    "a mapping of radii per layer needs per_layer=True; with per_layer=False "
                    "pass one number."
                )
            self.per_group = {k: as_threshold(v, f"max_norm[{k!r}]") for k, v in max_norm.items()}
        else:
            self.threshold = as_threshold(max_norm)
        ths = list(self.per_group.values()) if self.per_group is not None else [self.threshold]
        #: every radius is a constant (or none): nothing to observe, and the radii tensor of a
        #: state is made once (:meth:`values`)
        self.constant = all(isinstance(t, (Constant, NoClip)) for t in ths)
        self._thresholds: tuple[ParamLayout, list[Threshold]] | None = None
        self._values: tuple[Sequence[Any], ParamLayout, Tensor] | None = None

    @property
    def never_clips(self) -> bool:
        """One radius that never clips (``max_norm=None``): every weight is 1, whatever the norm."""
        return isinstance(self.threshold, NoClip)

    def thresholds(self, layout: ParamLayout) -> list[Threshold]:
        """The threshold of each layer group of ``layout`` (one entry for the flat norm)."""
        cached = self._thresholds
        if cached is not None and cached[0] is layout:
            return cached[1]
        ths = self._match(layout)
        self._thresholds = (layout, ths)
        return ths

    def _match(self, layout: ParamLayout) -> list[Threshold]:
        if self.per_group is not None:
            missing = [g for g in layout.group_names if g not in self.per_group]
            unknown = [k for k in self.per_group if k not in layout.group_names]
            if missing or unknown:
                raise ValueError(
                    "per-layer radii must name every layer group exactly. "
                    f"Layer groups of this model: {layout.group_names}. "
                    f"Missing: {missing}. Unknown: {unknown}."
                )
            return [self.per_group[g] for g in layout.group_names]
        assert self.threshold is not None
        n = layout.num_groups if self.per_layer else 1
        return [self.threshold] * n

    def init(self, layout: ParamLayout, device: torch.device) -> tuple[Any, ...]:
        return tuple(t.init(device) for t in self.thresholds(layout))

    def values(self, states: Sequence[Any], layout: ParamLayout) -> Tensor:
        """The radii now, (G, 1) per layer group or (1, 1), in float64 (float32 on MPS).

        With constant radii, made once per state: a state is an immutable value (a loaded
        checkpoint is a new one), so the same state object holds the same radii."""
        cached = self._values
        if cached is not None and cached[0] is states and cached[1] is layout:
            return cached[2]
        ths = self.thresholds(layout)
        radii = torch.stack([t.value(s) for t, s in zip(ths, states)]).reshape(-1, 1)
        radii = radii.to(wide_dtype(radii.device))
        if self.constant:
            self._values = (states, layout, radii)
        return radii

    def observe(self, states: Sequence[Any], layout: ParamLayout, norms: Tensor) -> tuple[Any, ...]:
        """New states after observing this micro-batch's norms: (G, B) per layer group, else the
        (B,) flat norms; every process's, where a threshold adapts. Constant radii return
        ``states`` itself (no gather)."""
        if self.constant:
            return tuple(states)
        ths = self.thresholds(layout)
        seen = gathered(norms, layout, ths)
        if self.per_layer:
            return tuple(t.observe(s, seen[g]) for g, (t, s) in enumerate(zip(ths, states)))
        return (ths[0].observe(states[0], seen),)

    def __repr__(self) -> str:
        return repr(self.per_group if self.per_group is not None else self.threshold)
