"""Worker for tests/test_ddp.py: trains each method for two steps under DDP (gloo)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import robustclip as rc
from robustclip.experiments.models import MLP
from robustclip.per_sample import ENGINES

from . import _oracles as O

WORLD = 2
MICRO = 2  # micro-batches per process and step
GLOBAL_BATCH = 16


def methods():
    out = {
        "mean": lambda: rc.mean(),
        "clip": lambda: rc.clip_by_global_norm(0.3),
        "micro_batch": lambda: rc.micro_batch_clip(0.3),
        "normalize": lambda: rc.chain(rc.mean(), rc.normalize()),
        "ps_normalize": lambda: rc.per_sample_normalize(0.1, engine="vmap"),
    }
    for engine in sorted(ENGINES):
        out[f"per_sample_{engine}"] = lambda e=engine: rc.chain(rc.per_sample_clip(0.3, engine=e), rc.clip_by_global_norm(0.2))
    return out


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, GLOBAL_BATCH, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (2, GLOBAL_BATCH), generator=g)


def fresh_model():
    torch.manual_seed(0)
    return MLP([6, 12, 3]).double()


def train(method, model, forward, shards):
    """shards: per step, a list of (x, y) micro-batches."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    clipper = rc.Clipper(model, opt, method)
    for micro in shards:
        for x, y in micro:
            clipper.backward(O.ce(forward(x), y))
        clipper.step()
    clipper.close()
    return [p.detach().clone() for p in model.parameters()]


def single_process():
    xs, ys = data()
    out = {}
    for name, make in methods().items():
        model = fresh_model()
        shards = [list(zip(xs[s].chunk(WORLD * MICRO), ys[s].chunk(WORLD * MICRO))) for s in range(2)]
        out[name] = train(make(), model, model, shards)
    return out


def worker(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        xs, ys = data()
        per = GLOBAL_BATCH // WORLD
        out = {}
        for name, make in methods().items():
            ddp = DDP(fresh_model())
            shards = [
                list(
                    zip(
                        xs[s, rank * per : (rank + 1) * per].chunk(MICRO),
                        ys[s, rank * per : (rank + 1) * per].chunk(MICRO),
                    )
                )
                for s in range(2)
            ]
            out[name] = train(make(), ddp, ddp, shards)
        if rank == 0:
            torch.save(out, result_file)
        # Both ranks leave together: a rank that tears gloo down while its peer is still
        # sending can abort the process.
        dist.barrier()
    finally:
        dist.destroy_process_group()
