"""The one collective a clipped step needs: sum the accumulated gradient over processes.

Clipped methods compute their gradient with ``torch.autograd.grad`` (DDP's reducer hooks do not
fire), then sum the per-process sums and counts once per step with ``all_reduce``. Dividing the
global sum by the global count gives the same update as one process on the global batch.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def resolve(
    model: nn.Module, distributed: bool | None, process_group: dist.ProcessGroup | None = None
) -> dist.ProcessGroup | None:
    """Return the process group to reduce over, or None for a single process."""
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if distributed is None:
        distributed = is_ddp
    if not distributed:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True but torch.distributed is not initialized; launch with torchrun "
            "and call torch.distributed.init_process_group() first."
        )
    if process_group is None and is_ddp:
        # DDP sets ``process_group`` in its __init__; torch's stubs leave it to Module.__getattr__
        process_group = cast(dist.ProcessGroup, model.process_group)
    return process_group if process_group is not None else dist.group.WORLD


def all_reduce_sum(tensors: list[Tensor], scalars: Tensor, group: dist.ProcessGroup | None) -> None:
    """Sum ``tensors`` and the 1-D ``scalars`` over ``group`` in place, one collective per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    if scalars.dtype not in by_dtype:
        dist.all_reduce(scalars, op=dist.ReduceOp.SUM, group=group)
    for dtype, ts in by_dtype.items():
        items = ts + [scalars] if dtype == scalars.dtype else ts
        flat = _flatten_dense_tensors(items)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for t, r in zip(items, _unflatten_dense_tensors(flat, items)):
            t.copy_(r)


def all_gather_padded(values: Tensor, group: Any) -> Tensor:
    """Every process's ``values`` joined along the last dimension, in rank order, the same on
    every process. The last dimension (a process's samples or micro-batches) may differ in
    length between processes: two small collectives, the lengths and then the values padded to
    the longest. What an adaptive threshold observes, so that it stays identical everywhere."""
    world = dist.get_world_size(group)
    n = torch.tensor([values.shape[-1]], dtype=torch.int64, device=values.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    lengths = [int(s) for s in sizes]
    longest = max(lengths)
    padded = values.new_full((*values.shape[:-1], longest), float("nan"))
    padded[..., : values.shape[-1]] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[..., :k] for p, k in zip(parts, lengths)], dim=-1)
