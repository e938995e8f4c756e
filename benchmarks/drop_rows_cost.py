"""Cost of zeroing dropped samples' rows in the per-sample weighted sums.

Every weighted per-sample sum sets the rows of a sample of weight 0 to exactly 0 (so that
``Clipper(nonfinite="drop_sample")`` gives the update of the batch without that sample, even
when its factors hold NaN). This script times a per-sample clipping step on a small CharGPT with
that zeroing and with plain row scaling in its place, interleaved in rounds in one process, and
prints one JSON record::

    python benchmarks/drop_rows_cost.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

import robustclip as rc
import robustclip.per_sample.rules._terms as terms
from robustclip.experiments.models import CharGPT

VOCAB, D, LAYERS, T, B, ROUNDS, STEPS = 64, 128, 4, 64, 32, 8, 3


def _plain_scale(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * w.to(x.dtype).view(-1, *(1,) * (x.dim() - 1))


def _unchanged(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = CharGPT(vocab=VOCAB, d=D, layers=LAYERS, heads=4, block_size=T)
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=1e-3), rc.per_sample_clip(1.0))
    x = torch.randint(0, VOCAB, (B, T))
    y = torch.randint(0, VOCAB, (B, T))

    def step() -> None:
        logits = model(x)
        losses = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="none")
        clipper.backward(losses.view(B, -1).mean(1))
        clipper.step()

    variants = {
        "zeroing": (terms.zero_dropped, terms.scale_rows),
        "plain": (_unchanged, _plain_scale),
    }
    for _ in range(STEPS):
        step()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(ROUNDS):
        for name, (zero, scale) in variants.items():
            # the term classes look these helpers up in their module at each call
            terms.zero_dropped, terms.scale_rows = zero, scale
            t0 = time.perf_counter()
            for _ in range(STEPS):
                step()
            times[name].append((time.perf_counter() - t0) / STEPS)
    terms.zero_dropped, terms.scale_rows = variants["zeroing"]
    ratios = [a / b for a, b in zip(times["zeroing"], times["plain"])]
    print(json.dumps({
        "model": f"CharGPT d={D} layers={LAYERS} T={T} batch={B}",
        "median_ms_zeroing": round(statistics.median(times["zeroing"]) * 1e3, 2),
        "median_ms_plain_scaling": round(statistics.median(times["plain"]) * 1e3, 2),
        "ratio": round(statistics.median(ratios), 3),
        "rounds": ROUNDS,
    }))


if __name__ == "__main__":
    main()
