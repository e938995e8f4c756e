"""Small helpers shared by the layer rules."""

from __future__ import annotations

from torch import Tensor

from robustclip.per_sample._engine import acc_dtype


def sum_positions(g: Tensor) -> Tensor:
    """``(B, T, *rest) -> (B, *rest)``: sum over positions, accumulated in float32 at least."""
    return g.sum(1, dtype=acc_dtype(g.dtype))
