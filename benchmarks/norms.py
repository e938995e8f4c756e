"""Cost of robustclip's overflow-safe norms against the plain float32 ones.

    PYTHONPATH=src python benchmarks/norms.py [--gpt-layers 12] [--repeats 20]

Two sets of gradients: an MLP's first layer (512x784 weight and its bias) and a GPT-2-small
shaped list (124M parameters with the default 12 layers). For each it times, best of
``--repeats``:

* ``plain``: ``sqrt(_kernels.sum_of_squares(...))``, the float32 norm without any check (what
  ``global_norm`` was before it was made safe);
* ``global_norm``: the safe norm on gradients of ordinary size (the fast path plus its range
  check), of norm 1e25 (the fast path overflows and the norm is recomputed in float64), and
  all zeros (the recomputation also runs: a zero sum could hide underflowed squares);
* ``no-host-read``: the path taken on devices other than the CPU (float64 accumulation, no
  value read on the host), timed here on the CPU;
* per-tensor norms: ``torch._foreach_norm`` against ``tensor_norms``.

Times on a shared machine are rough; compare the columns of one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from robustclip import _kernels, _math


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def gpt_shapes(layers: int, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def run(name: str, shapes: list[tuple[int, ...]], repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    huge = [g * 1e28 for g in grads]
    zeros = [torch.zeros_like(g) for g in grads]
    numel = sum(g.numel() for g in grads)
    rows = {
        "plain float32 (unsafe)": lambda: _kernels.sum_of_squares(grads).sqrt(),
        "global_norm, ordinary": lambda: _math.global_norm(grads),
        "global_norm, norm 1e25": lambda: _math.global_norm(huge),
        "global_norm, all zero": lambda: _math.global_norm(zeros),
        "no-host-read path (float64)": lambda: _math.combine_norms(torch.stack(_math._wide_norms(grads))),
        "_foreach_norm per tensor (unsafe)": lambda: torch._foreach_norm(grads, 2.0),
        "tensor_norms, ordinary": lambda: _math.tensor_norms(grads),
    }
    print(f"\n{name}: {len(grads)} tensors, {numel / 1e6:.2f}M parameters")
    base = None
    for label, fn in rows.items():
        ms = best_ms(fn, repeats)
        base = base if base is not None else ms
        print(f"  {label:36s} {ms:9.3f} ms  {ms / base:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt-layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    run("MLP layer 512x784", [(512, 784), (512,)], args.repeats)
    run(f"GPT-2-small shapes ({args.gpt_layers} layers)", gpt_shapes(args.gpt_layers), max(3, args.repeats // 4))


if __name__ == "__main__":
    main()
