"""Step time of every method under FSDP2 (``fully_shard``) against the plain FSDP2 step.

``python benchmarks/run.py --suite distributed [--world 2] [--rounds 5] [--json PATH] [--markdown]``

Spawns ``--world`` CPU processes (gloo; one thread each), shards a CharGPT (each block, then the
root, as in the tests) in every process, and times a *step* of each method: zero_grad +
forward + backward + the method + optimizer step (SGD with momentum). Records (rank 0's
times; the collectives keep the ranks in step):

* ``plain``: ``loss.mean().backward(); opt.step()``, FSDP2's own reduce-scatter;
* ``plain_accum``: the same batch as ``--micro`` micro-batches (the reference of
  ``micro_batch_clip``);
* every robustclip method through ``rc.Clipper(model, opt, method)``: ``mean``,
  ``clip_by_global_norm``, ``clip_by_tensor_norm``, ``normalize``, ``micro_batch_clip`` (``--micro``
  micro-batches), ``per_sample_clip`` (flat and per layer), ``per_sample_normalize``,
  ``spectral_clip`` (exact and randomized, rank 8).

Each method has its own model; the methods take turns round by round (``--rounds``), one
untimed step then ``--steps`` timed ones per turn, so load from other processes hits all of them
alike; the record is the median step and its ratio to ``plain``'s, from the same run. With
``--device cuda`` each process takes GPU ``rank`` (NCCL): the same at a GPU's scale (use
``--d 768 --layers 12 --block 256`` for GPT-2 small).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import robustclip as rc
from robustclip.experiments.models import CharGPT, sequence_losses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", type=int, default=2, help="processes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method and round")
    parser.add_argument("--batch", type=int, default=16, help="samples per process and step")
    parser.add_argument("--micro", type=int, default=2, help="micro-batches of the accumulating methods")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block", type=int, default=64, help="sequence length")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", default="", help="comma-separated subset of the record names")


def methods(micro: int) -> dict[str, tuple[Callable[[], Any] | None, int]]:
    """name -> (robustclip method, or None for a plain step; micro-batches)."""
    return {
        "plain": (None, 1),
        "plain_accum": (None, micro),
        "mean": (lambda: rc.mean(), 1),
        "clip_by_global_norm": (lambda: rc.clip_by_global_norm(1.0), 1),
        "clip_by_tensor_norm": (lambda: rc.clip_by_tensor_norm(0.1), 1),
        "normalize": (lambda: rc.chain(rc.mean(), rc.normalize()), 1),
        "micro_batch_clip": (lambda: rc.micro_batch_clip(1.0), micro),
        "per_sample_clip": (lambda: rc.per_sample_clip(1.0), 1),
        "per_sample_clip_layer": (lambda: rc.per_sample_clip(0.3, per_layer=True), 1),
        "per_sample_normalize": (lambda: rc.per_sample_normalize(0.01), 1),
        "spectral_exact": (lambda: rc.chain(rc.mean(), rc.spectral_clip(0.01, rank=None)), 1),
        "spectral_rank8": (lambda: rc.chain(rc.mean(), rc.spectral_clip(0.01, rank=8)), 1),
    }


def _worker(rank: int, args: argparse.Namespace, init: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=args.world)
    from torch.distributed.fsdp import fully_shard

    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    try:
        table = methods(args.micro)
        if args.methods:
            keep = set(args.methods.split(",")) | {"plain"}
            table = {k: v for k, v in table.items() if k in keep}
        g = torch.Generator().manual_seed(1 + rank)
        x = torch.randint(0, 96, (args.batch, args.block), generator=g).to(dev)
        y = torch.randint(0, 96, (args.batch, args.block), generator=g).to(dev)
        runs: dict[str, Callable[[], None]] = {}
        for name, (make, k) in table.items():
            torch.manual_seed(0)
            model = CharGPT(vocab=96, block_size=args.block, d=args.d, layers=args.layers, heads=4).to(dev)
            for blk in model.blocks:
                fully_shard(blk)
            fully_shard(model)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            runs[name] = _step(model, opt, make() if make is not None else None, x, y, k)
        times: dict[str, list[float]] = {n: [] for n in runs}
        for _ in range(args.rounds):
            for name, step in runs.items():
                step()
                for _ in range(args.steps):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    step()
                    if cuda:
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - t0)
        if rank == 0:
            torch.save(times, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, method: Any, x: torch.Tensor, y: torch.Tensor, micro: int) -> Callable[[], None]:
    if method is None:

        def plain() -> None:
            opt.zero_grad(set_to_none=True)
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                (sequence_losses(model(xs), ys).mean() / micro).backward()
            opt.step()

        return plain
    clipper = rc.Clipper(model, opt, method)

    def clipped() -> None:
        opt.zero_grad(set_to_none=True)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            clipper.backward(sequence_losses(model(xs), ys))
        clipper.step()

    return clipped


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.spawn(_worker, args=(args, os.path.join(tmp, "init"), out), nprocs=args.world, join=True)
        times = torch.load(out, weights_only=True)
    base = statistics.median(times["plain"])
    return [
        {
            "method": name,
            "world": args.world,
            "device": args.device,
            "model": f"CharGPT d={args.d} layers={args.layers} T={args.block}",
            "batch_per_process": args.batch,
            "micro_batches": methods(args.micro)[name][1],
            "median_ms": 1e3 * statistics.median(ts),
            "min_ms": 1e3 * min(ts),
            "ratio_to_plain": statistics.median(ts) / base,
            "samples": len(ts),
        }
        for name, ts in times.items()
    ]


def to_markdown(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    r0 = records[0]
    lines = [
        f"FSDP2, {r0['world']} {r0['device']} processes, {r0['model']}, {r0['batch_per_process']} "
        "sequences per process and step; step time against the plain FSDP2 step of the same run.",
        "",
        "| method | micro-batches | median ms | min ms | x plain |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['method']} | {r['micro_batches']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['ratio_to_plain']:.2f} |"
        )
    return "\n".join(lines) + "\n"
