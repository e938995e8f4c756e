"""Cost of the hook engine's overflow-safe per-sample norms against plain float32 ones.

The hook engine takes every per-sample squared norm from values divided by each sample's
largest magnitude (the factors before a Gram, a materialised per-sample gradient, an
embedding's output gradient) and puts the scale back in float64, so a float32 gradient of norm
1e25 is clipped rather than dropped and one of norm 1e-25 is not taken for 0. That costs, per
norm, a max-abs pass and a division pass over what is reduced. This script times a per-sample
clipping step with those norms (``safe``) and with the plain float32 norms they replaced
(``float32``: squares summed in float32 without a scale, which overflow above 1.8e19 and
underflow below 1e-19), interleaved in rounds in one process, on three models: an MLP (Gram
norms of single positions), a small CNN (convolution Grams and kept gradients) and a small
CharGPT (Grams over 64 positions, kept gradients, the embedding's sort-based norm). One JSON
record per model (``ratio``: safe / float32, the median over rounds)::

    python benchmarks/per_sample_norms_cost.py [--rounds 8] [--threads 2] [--models mlp cnn gpt]

Timings on a shared machine are rough; compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustclip as rc
import robustclip.per_sample._hooks.fallback as fallback
import robustclip.per_sample._hooks.norms as norms
from robustclip.experiments.models import MLP, CharGPT, SmallCNN
from robustclip.per_sample._engine import acc_dtype
from robustclip.per_sample.rules._terms import OuterTerm, gram

STEPS = 3


# -- the plain float32 norms (the baseline; unsafe outside 1e-19..1.8e19) --------------------------


def plain_row_sq_norms(g: Tensor) -> Tensor:
    sq: Tensor = torch.linalg.vector_norm(g.detach().flatten(1), dim=1, dtype=acc_dtype(g.dtype)).square()
    return sq.double()


def plain_ghost_sq_norms(terms: Sequence[OuterTerm], budget: int) -> Tensor:
    batch = terms[0].batch
    tt = sum(t.T for t in terms)
    chunk = max(1, min(batch, budget // (2 * terms[0].K * tt * tt + 1)))
    out = []
    for s in range(0, batch, chunk):
        sl = slice(s, min(s + chunk, batch))
        if len(terms) == 1:  # no scale: the Grams of the raw factors
            acc = (terms[0].u_gram(sl) * terms[0].v_gram(sl)).sum(dim=(1, 2, 3))
        else:
            us, vs = [t.u_chunk(sl) for t in terms], [t.v_chunk(sl) for t in terms]
            acc = sum(
                (1 if a == b else 2) * (gram(us[a], us[b]) * gram(vs[a], vs[b])).sum(dim=(1, 2, 3))
                for a in range(len(terms))
                for b in range(a, len(terms))
            )
        out.append(acc.double())
    return out[0] if len(out) == 1 else torch.cat(out)


def plain_index_sq_norms(term: OuterTerm) -> Tensor:
    u, v = term.u, term.v
    assert v is not None
    b, k, t = u.shape
    srt, perm = u.reshape(b * k, t).sort(dim=1)
    new = torch.ones_like(srt, dtype=torch.long)
    new[:, 1:] = (srt[:, 1:] != srt[:, :-1]).long()
    gid = torch.empty_like(srt).scatter_(1, perm, new.cumsum(1) - 1)
    vv = v.reshape(b * k, t, -1).to(acc_dtype(v.dtype))
    sums = torch.zeros_like(vv).scatter_add_(1, gid.unsqueeze(-1).expand_as(vv), vv)
    return sums.pow(2).sum(dim=(1, 2)).view(b, k).sum(1).double()


SAFE = {
    (norms, "row_sq_norms"): norms.row_sq_norms,
    (fallback, "row_sq_norms"): fallback.row_sq_norms,
    (norms, "ghost_sq_norms"): norms.ghost_sq_norms,
    (norms, "index_sq_norms"): norms.index_sq_norms,
}
PLAIN = {
    (norms, "row_sq_norms"): plain_row_sq_norms,
    (fallback, "row_sq_norms"): plain_row_sq_norms,
    (norms, "ghost_sq_norms"): plain_ghost_sq_norms,
    (norms, "index_sq_norms"): plain_index_sq_norms,
}


def use(functions: dict[tuple[Any, str], Callable[..., Tensor]]) -> None:
    for (module, name), fn in functions.items():
        setattr(module, name, fn)


# -- the models -------------------------------------------------------------------------------------


def case(name: str) -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    gen = torch.Generator().manual_seed(0)
    if name == "mlp":
        model: nn.Module = MLP([784, 512, 256, 10])
        x, y = torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        return model, lambda m: F.cross_entropy(m(x), y, reduction="none")
    if name == "cnn":
        model = SmallCNN(in_channels=3, channels=(16, 32, 64), hidden=128, num_classes=10, image_size=32)
        x, y = torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        return model, lambda m: F.cross_entropy(m(x), y, reduction="none")
    vocab, t = 64, 64
    model = CharGPT(vocab=vocab, d=128, layers=4, heads=4, block_size=t)
    tok, tgt = torch.randint(0, vocab, (32, t), generator=gen), torch.randint(0, vocab, (32, t), generator=gen)
    return model, lambda m: F.cross_entropy(m(tok).reshape(-1, vocab), tgt.reshape(-1), reduction="none").view(32, -1).mean(1)


def bench(name: str, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base, losses_of = case(name)
    steppers = {}
    for variant in ("safe", "float32"):
        model = copy.deepcopy(base)
        clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=1e-3), rc.per_sample_clip(1.0))

        def step(model: nn.Module = model, clipper: rc.Clipper = clipper) -> None:
            clipper.backward(losses_of(model))
            clipper.step()

        steppers[variant] = step
    plans = {"safe": SAFE, "float32": PLAIN}
    for variant, step in steppers.items():
        use(plans[variant])
        for _ in range(STEPS):
            step()
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(rounds):
        for variant, step in steppers.items():
            use(plans[variant])
            t0 = time.perf_counter()
            for _ in range(STEPS):
                step()
            times[variant].append((time.perf_counter() - t0) / STEPS)
    use(SAFE)
    return {
        "model": name,
        "median_ms_safe": round(statistics.median(times["safe"]) * 1e3, 2),
        "median_ms_float32": round(statistics.median(times["float32"]) * 1e3, 2),
        "ratio": round(statistics.median(a / b for a, b in zip(times["safe"], times["float32"])), 3),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=["mlp", "cnn", "gpt"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        print(json.dumps(bench(name, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
