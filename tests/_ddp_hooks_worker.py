"""Worker for the DDP test of the hook engine (spawned by tests/test_hooks_engine.py).

Each of ``world`` gloo processes trains the same model on its slice of the global batch with
``rc.per_sample_clip(engine="hooks")`` for two steps and saves its parameters. The test then
compares them with one process trained on the whole batch.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

import robustclip as rc
from robustclip.experiments.models import CharGPT, sequence_losses
from robustclip.per_sample import PerSampleFallbackWarning

BATCH, STEPS, RADIUS, LR = 8, 2, 0.05, 0.5


def make_problem():
    torch.manual_seed(0)
    model = CharGPT(vocab=11, block_size=8, d=16, layers=1, heads=2, tied=True)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, 11, (BATCH, 8), generator=g) for _ in range(STEPS)]
    ys = [torch.randint(0, 11, (BATCH, 8), generator=g) for _ in range(STEPS)]
    return model, xs, ys


def train(model, xs, ys, rank: int = 0, world: int = 1, engine: str = "hooks"):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerSampleFallbackWarning)
        clipper = rc.Clipper(model, opt, rc.per_sample_clip(RADIUS, engine=engine))
    per = BATCH // world
    for x, y in zip(xs, ys):
        xb, yb = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        clipper.backward(sequence_losses(model(xb), yb))
        clipper.step()
    clipper.close()


def worker(rank: int, world: int, out_dir: str) -> None:
    # a file rendezvous: no port to race for with other processes on the machine
    init = "file://" + os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, xs, ys = make_problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        train(ddp, xs, ys, rank, world)
        torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
        # leave together: tearing gloo down while the peer still sends can abort a process
        dist.barrier()
    finally:
        dist.destroy_process_group()
