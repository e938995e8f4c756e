"""How spectral clipping batches the selected gradients: one plan per model, cached.

torch.linalg decomposes a stack of same-shaped matrices in one call, which is much faster than
one call per matrix for the many equal layers of a transformer. A plan groups the selected
gradients, each read as a ``(shape[0], -1)`` matrix, by shape, dtype and device, with a wide
matrix taken as its tall transpose (so ``(m, n)`` and ``(n, m)`` layers share a batch). The
selected 1-D (and 0-D) gradients are listed apart: an ``(n, 1)`` matrix's one singular value is
its norm, so their spectral clip is a norm clip, without a decomposition. The plan depends only
on the parameters' names, modules, shapes, dtypes and devices, so it is built once
(:func:`plan_key`). Used by ``_spectral.py``, and by ``_fsdp.py``, which sends each group to an
owner rank. :func:`record` writes a group's readings at its parameters' positions.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Group", "Plan", "make_plan", "plan_key", "record"]


@dataclass(frozen=True)
class Group:
    """Same-shaped matrices (after reshaping and turning wide ones tall), decomposed together."""

    indices: tuple[int, ...]  # parameter positions
    transposed: tuple[bool, ...]  # whether each member is used as its transpose
    index_tensor: Tensor


@dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]
    vectors: tuple[int, ...]  # selected 1-D (or 0-D) parameters, norm-clipped
    vector_index: Tensor | None
    selected: tuple[str, ...]  # names of the clipped parameters, matrices and vectors

    def clipped_fraction(self, clipped: Tensor, none: Tensor) -> Tensor:
        """The share of the selected parameters that the (P,) flags ``clipped`` mark; zeros like
        ``none`` when nothing is selected."""
        picked = [grp.index_tensor for grp in self.groups]
        if self.vector_index is not None:
            picked.append(self.vector_index)
        return clipped.index_select(0, torch.cat(picked)).mean() if picked else torch.zeros_like(none)


def plan_key(names: Sequence[str], modules: Sequence[nn.Module | None], grads: Sequence[Tensor]) -> Hashable:
    """What a plan depends on: the names, the modules (by identity), and each gradient's shape,
    dtype and device."""
    return (
        tuple(names),
        tuple(map(id, modules)),
        tuple((tuple(g.shape), g.dtype, g.device) for g in grads),
    )


def make_plan(grads: Sequence[Tensor], names: Sequence[str], chosen: Sequence[bool]) -> Plan:
    """The plan for the gradients ``grads`` of which ``chosen`` are clipped."""
    buckets: dict[Any, list[tuple[int, bool]]] = {}
    for i, (g, s) in enumerate(zip(grads, chosen)):
        if not s or g.dim() < 2:
            continue
        m, n = g.shape[0], g.numel() // g.shape[0]
        transposed = m < n  # batch wide matrices with their tall transposes
        shape = (n, m) if transposed else (m, n)
        buckets.setdefault((shape, g.dtype, g.device), []).append((i, transposed))
    groups = tuple(
        Group(
            tuple(i for i, _ in members),
            tuple(t for _, t in members),
            torch.tensor([i for i, _ in members], device=dev),
        )
        for (_, _, dev), members in buckets.items()
    )
    # selected 1-D (and 0-D) parameters: an (n, 1) matrix's one singular value is its norm,
    # so its spectral clip is a norm clip, done without a decomposition
    vectors = tuple(i for i, (g, s) in enumerate(zip(grads, chosen)) if s and g.dim() < 2)
    dev = grads[0].device if grads else None
    return Plan(
        groups,
        vectors,
        torch.tensor(vectors, device=dev, dtype=torch.long) if vectors else None,
        tuple(n for n, s in zip(names, chosen) if s),
    )


def record(readings: Sequence[Tensor], idx: Tensor, *values: Tensor) -> None:
    """Write each value (one entry per position of ``idx``) into its (P,) float32 reading, in
    the order of the transform's readings: sigma_before, sigma_after, threshold, clipped,
    nonfinite."""
    for reading, v in zip(readings, values, strict=True):
        reading.index_copy_(0, idx, v.float())
