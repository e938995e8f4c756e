"""Cost of the per-sample engine's check against autograd (``verify_every``) on a small GPT.

Times clipper steps of ``rc.per_sample_clip`` with the check on every step (``verify_every=1``)
and with first-use checks only, after a warm-up, and prints the ratio. Run alone on an idle
machine::

    PYTHONPATH=src python benchmarks/verify_cost.py [--batch 32] [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import robustclip as rc
from robustclip.experiments.models import CharGPT


def step_time(verify_every: int | None, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = CharGPT(vocab=65, block_size=64, d=128, layers=4, heads=4)
    x = torch.randint(0, 65, (batch, 64))
    y = torch.randint(0, 65, (batch, 64))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with rc.Clipper(model, opt, rc.per_sample_clip(1.0), verify_every=verify_every) as clipper:

        def one() -> None:
            logits = model(x)
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(batch, -1).mean(1)
            clipper.backward(losses)
            clipper.step()

        for _ in range(2):  # warm-up, and the first-use check
            one()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    plain = step_time(None, a.batch, a.steps)
    checked = step_time(1, a.batch, a.steps)
    print(f"step without the check: {plain * 1e3:.1f} ms; with it (verify_every=1): {checked * 1e3:.1f} ms")
    print(f"one check costs {checked / plain - 1:.2f} steps; verify_every=N adds about {checked / plain - 1:.2f}/N")


if __name__ == "__main__":
    main()
