"""The fixed cost of a robustclip step: ``robustclip step - plain step`` on a small MLP.

On a model this small (784-256-10, batch 32) a plain SGD step takes well under a millisecond,
so what a per-sample clipping step costs beyond it is almost all bookkeeping: Python calls and
small tensor operations per step, independent of the model's size. This script times both
steps interleaved in rounds in one process (so that load on the machine hits both alike) and
prints one JSON record with

* ``median_ms_plain`` / ``median_ms_robustclip``: the median step time of each;
* ``fixed_cost_ms``: the median over rounds of the per-round difference;
* ``ratio``: the median over rounds of the per-round ratio;
* ``python_calls_per_step`` / ``torch_ops_per_step``: counted with cProfile and
  torch.profiler (independent of the machine's load), for both steps;
* ``breakdown_ms``: with ``--breakdown``, the robustclip step's time split into its parts
  (forward, ``clipper.backward``, ``clipper.step``), each timed on its own.

Run::

    python benchmarks/fixed_cost.py [--rounds 30] [--steps 20] [--method clip|normalize]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import robustclip as rc

IN, HIDDEN, OUT, B = 784, 256, 10, 32


def _setup(method: str) -> tuple[Callable[[], None], Callable[[], None], dict[str, Callable[[], None]]]:
    torch.manual_seed(0)
    x = torch.randn(B, IN)
    y = torch.randint(0, OUT, (B,))
    lossf = nn.CrossEntropyLoss(reduction="none")

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))

    plain_model, rc_model = mlp(), mlp()
    rc_model.load_state_dict(plain_model.state_dict())
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=1e-3)
    rc_opt = torch.optim.SGD(rc_model.parameters(), lr=1e-3)
    est = rc.per_sample_clip(1.0) if method == "clip" else rc.per_sample_normalize()
    clipper = rc.Clipper(rc_model, rc_opt, est)

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        lossf(plain_model(x), y).mean().backward()
        plain_opt.step()

    def robust() -> None:
        rc_opt.zero_grad(set_to_none=True)
        clipper.backward(lossf(rc_model(x), y))
        clipper.step()

    held: list[torch.Tensor] = []

    def forward_only() -> None:
        rc_opt.zero_grad(set_to_none=True)
        held.append(lossf(rc_model(x), y))

    def backward_only() -> None:
        clipper.backward(held.pop())

    def step_only() -> None:
        clipper.step()

    parts = {"forward": forward_only, "backward": backward_only, "step": step_only}
    return plain, robust, parts


def _time(fn: Callable[[], None], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def _python_calls(fn: Callable[[], None], steps: int) -> float:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    return pstats.Stats(prof).total_calls / steps  # type: ignore[attr-defined]  # pstats.Stats sets total_calls in its constructor (untyped)


def _torch_ops(fn: Callable[[], None], steps: int) -> tuple[float, float]:
    """ATen operator calls per step: all of them, and the top-level ones (called from Python
    or autograd, not from inside another operator)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(events) / steps, len(top) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20, help="steps per round and method")
    ap.add_argument("--method", choices=["clip", "normalize"], default="clip")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true", help="also time forward, backward and step apart")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plain, robust, parts = _setup(args.method)
    for _ in range(3 * args.steps):  # first-use checks, kernel choices, allocator warm-up
        plain()
        robust()
    t_plain: list[float] = []
    t_rc: list[float] = []
    for r in range(args.rounds):
        order = [(plain, t_plain), (robust, t_rc)]
        for fn, acc in order if r % 2 == 0 else reversed(order):
            acc.append(_time(fn, args.steps))
    diffs = [a - b for a, b in zip(t_rc, t_plain)]
    ratios = [a / b for a, b in zip(t_rc, t_plain)]
    n = 50
    record: dict[str, object] = {
        "model": f"MLP {IN}-{HIDDEN}-{OUT}, batch {B}, SGD",
        "method": f"per_sample_{args.method}",
        "threads": args.threads,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "median_ms_plain": round(statistics.median(t_plain) * 1e3, 4),
        "median_ms_robustclip": round(statistics.median(t_rc) * 1e3, 4),
        "fixed_cost_ms": round(statistics.median(diffs) * 1e3, 4),
        "fixed_cost_ms_quartiles": [round(q * 1e3, 4) for q in statistics.quantiles(diffs, n=4)],
        "ratio": round(statistics.median(ratios), 3),
        "python_calls_per_step": {"plain": _python_calls(plain, n), "robustclip": _python_calls(robust, n)},
    }
    ops_plain, top_plain = _torch_ops(plain, n)
    ops_rc, top_rc = _torch_ops(robust, n)
    record["torch_ops_per_step"] = {
        "plain": {"all": ops_plain, "top_level": top_plain},
        "robustclip": {"all": ops_rc, "top_level": top_rc},
    }
    if args.breakdown:
        acc: dict[str, list[float]] = {k: [] for k in parts}
        for _ in range(args.rounds):
            for _ in range(args.steps):
                for name, fn in parts.items():
                    t0 = time.perf_counter()
                    fn()
                    acc[name].append(time.perf_counter() - t0)
        pl: list[float] = [_time(plain, 1) for _ in range(args.rounds * args.steps)]
        record["breakdown_ms"] = {k: round(statistics.median(v) * 1e3, 4) for k, v in acc.items()}
        record["breakdown_ms"]["plain_step"] = round(statistics.median(pl) * 1e3, 4)  # type: ignore[index]  # a dict built just above
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
