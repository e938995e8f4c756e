"""Cost of zeroing dropped samples' rows in the per-sample weighted sums.

With ``Clipper(nonfinite="drop_sample")`` every weighted per-sample sum sets the rows of a
sample of weight 0 to exactly 0, so that the update is the one of the batch without that sample
even when its factors hold NaN. In the default mode (``skip_step``) the rows are left alone: a
non-finite sample has a NaN weight and the step is skipped anyway. This script times a
per-sample clipping step on a small CharGPT (hook engine) three ways, interleaved in rounds in
one process:

* ``skip_step``: the default, no zeroing;
* ``skip_step_zeroing``: the default mode with the zeroing forced on, as it ran in every mode
  before it was gated (the helpers patched to zero whatever the mode);
* ``drop_sample``: the zeroing and the mode's own bookkeeping (finite masks, a device count).

It prints one JSON record (``ratio_zeroing``: what the gate saves in the default mode;
``ratio_drop_sample``: what ``drop_sample`` costs over the default)::

    python benchmarks/drop_rows_cost.py [--rounds 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import robustclip as rc
import robustclip.per_sample.rules._terms as terms
from robustclip.experiments.models import CharGPT

VOCAB, D, LAYERS, T, B, STEPS = 64, 128, 4, 64, 32, 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base = CharGPT(vocab=VOCAB, d=D, layers=LAYERS, heads=4, block_size=T)
    x = torch.randint(0, VOCAB, (B, T))
    y = torch.randint(0, VOCAB, (B, T))

    def stepper(nonfinite: str) -> Callable[[], None]:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        clipper = rc.Clipper(model, opt, rc.per_sample_clip(1.0), nonfinite=nonfinite)

        def step() -> None:
            logits = model(x)
            losses = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="none")
            clipper.backward(losses.view(B, -1).mean(1))
            clipper.step()

        return step

    gated = (terms.zero_dropped, terms.scale_rows)

    def always_zero(x: torch.Tensor, w: torch.Tensor, drop: bool) -> torch.Tensor:
        return gated[0](x, w, True)

    def always_scale(x: torch.Tensor, w: torch.Tensor, drop: bool) -> torch.Tensor:
        return gated[1](x, w, True)

    skip, drop = stepper("skip_step"), stepper("drop_sample")
    # (step, helpers): the term classes look the helpers up in their module at each call
    variants = {
        "skip_step": (skip, gated),
        "skip_step_zeroing": (skip, (always_zero, always_scale)),
        "drop_sample": (drop, gated),
    }
    for step, _ in variants.values():
        for _ in range(STEPS):
            step()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (step, (zero, scale)) in variants.items():
            terms.zero_dropped, terms.scale_rows = zero, scale
            t0 = time.perf_counter()
            for _ in range(STEPS):
                step()
            times[name].append((time.perf_counter() - t0) / STEPS)
    terms.zero_dropped, terms.scale_rows = gated

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(p / q for p, q in zip(times[a], times[b])), 3)

    print(json.dumps({
        "model": f"CharGPT d={D} layers={LAYERS} T={T} batch={B}",
        **{f"median_ms_{k}": round(statistics.median(v) * 1e3, 2) for k, v in times.items()},
        "ratio_zeroing": ratio("skip_step_zeroing", "skip_step"),
        "ratio_drop_sample": ratio("drop_sample", "skip_step"),
        "rounds": args.rounds,
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
