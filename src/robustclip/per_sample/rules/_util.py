"""Small helpers shared by the layer rules."""

from __future__ import annotations

from torch import Tensor

from robustclip.per_sample._engine import acc_dtype


def sum_positions(g: Tensor) -> Tensor:
    """``(B, T, *rest) -> (B, *rest)``: sum over positions, accumulated in float32 at least."""
    dt = acc_dtype(g.dtype)
    if g.shape[1] == 1:  # one position (2-D inputs): a view, not a reduction into a new tensor
        return g.squeeze(1).to(dt)
    return g.sum(1, dtype=dt)
