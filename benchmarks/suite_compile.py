"""Eager against ``torch.compile(model)`` step times of each method, one process.

``python benchmarks/run.py --suite compile [--backend inductor] [--rounds 5] [--json PATH] [--markdown]``

A *step* is zero_grad + forward + ``clipper.backward`` + ``clipper.step`` (SGD, momentum) on a
CharGPT. For each method there are two copies of the model: one eager, one compiled (the
Clipper created before the compiled model first runs, so the hook engine's hooks are traced,
with a graph break at each watched layer). The copies take turns round by round; each record
is the median step time, the first compiled step (compilation included), the number of graphs
dynamo made, and ``max_rel_err``: the largest relative difference, over parameters, between
the two copies after all steps (float32 rounding, reordered by the compiler).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import robustclip as rc
from robustclip.experiments.models import CharGPT, sequence_losses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per copy and round")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--methods", default="", help="comma-separated subset")


def methods() -> dict[str, tuple[Callable[[], Any], int]]:
    return {
        "mean": (lambda: rc.mean(), 1),
        "clip_by_global_norm": (lambda: rc.clip_by_global_norm(1.0), 1),
        "micro_batch_clip": (lambda: rc.micro_batch_clip(1.0), 2),
        "per_sample_clip": (lambda: rc.per_sample_clip(1.0), 1),
        "spectral_clip": (lambda: rc.chain(rc.mean(), rc.spectral_clip(0.01, rank=8)), 1),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 96, (args.batch, args.block), generator=g)
    y = torch.randint(0, 96, (args.batch, args.block), generator=g)
    table = methods()
    if args.methods:
        table = {k: v for k, v in table.items() if k in set(args.methods.split(","))}
    records = []
    for name, (make, micro) in table.items():
        torch._dynamo.reset()
        copies = {}
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            model = CharGPT(vocab=96, block_size=args.block, d=args.d, layers=args.layers, heads=4)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            clipper = rc.Clipper(model, opt, make())
            forward = torch.compile(model, backend=args.backend) if mode == "compiled" else model
            copies[mode] = (model, opt, clipper, forward)

        def step(mode: str, copies: dict[str, Any] = copies, micro: int = micro) -> float:
            model, opt, clipper, forward = copies[mode]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                clipper.backward(sequence_losses(forward(xs), ys))
            clipper.step()
            return time.perf_counter() - t0

        first = {mode: step(mode) for mode in copies}
        times: dict[str, list[float]] = {m: [] for m in copies}
        for _ in range(args.rounds):
            for mode in copies:
                step(mode)
                times[mode].extend(step(mode) for _ in range(args.steps))
        ps = {m: [p.detach() for p in c[0].parameters()] for m, c in copies.items()}
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(ps["compiled"], ps["eager"]))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for c in copies.values():
            c[2].close()
        eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
        records.append(
            {
                "method": name,
                "backend": args.backend,
                "model": f"CharGPT d={args.d} layers={args.layers} T={args.block} batch={args.batch}",
                "eager_ms": 1e3 * eager,
                "compiled_ms": 1e3 * compiled,
                "compiled_over_eager": compiled / eager,
                "first_compiled_step_s": first["compiled"],
                "graphs": graphs,
                "max_rel_err": err,
            }
        )
        torch._dynamo.utils.counters.clear()
    return records


def to_markdown(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"torch.compile ({records[0]['backend']}) against eager, {records[0]['model']}, one process.",
        "",
        "| method | eager ms | compiled ms | compiled / eager | first compiled step s | graphs | max rel. err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['method']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['compiled_over_eager']:.2f} | "
            f"{r['first_compiled_step_s']:.1f} | {r['graphs']} | {r['max_rel_err']:.1e} |"
        )
    return "\n".join(lines) + "\n"
