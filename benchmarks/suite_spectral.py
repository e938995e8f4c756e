"""Spectral clipping: exact against randomized, and its cost in a GPT training step.

``python benchmarks/run.py --suite spectral --json PATH [--markdown] [--autotune on|off]``

``--autotune`` sets ``robustclip.backends.autotune`` for the whole run. Off (the library's
default), the randomized mode's products with ``G`` run through ``torch.matmul`` and its
correction through ``Tensor.addmm_``. On, robustclip times each product once per shape and
layout (PyTorch's BLAS or oneDNN, either operand order) and the correction's blocking, and keeps
the fastest (``robustclip._kernels``). The exact mode decomposes with ``torch.linalg.svd``
either way. Compare the settings with two runs, e.g. ``--autotune on --json spectral_on.json``
and ``--autotune off --json spectral_off.json``.

1. Exact (full SVD) against randomized (r = 8, q = 16, niter = 2) clipping of real gradient
   matrices of shapes 768x768, 768x3072 and 3072x768: the attention output projection, the MLP
   output and the MLP input weights of a d = 768 character GPT, taken at the first
   ``--grad-steps`` AdamW steps on text (the Python standard library's source). Each clip is one
   ``spectral_clip(...).update`` with tau at half the top singular value, so it does clip.
   Records ``{shape, method: "exact" | "randomized", median_ms, sigma1_rel_err}``, the error
   being the largest over the matrices of the top singular value the clip reads, against a
   float64 full SVD.

   Timing. The methods take turns on each matrix: one exact clip, then one randomized clip
   (``median_ms_first_call``), then ``--sequence`` more randomized clips back to back
   (``median_ms``), each on a fresh copy of the gradient made outside the timer. A step clips
   its matrices one after another, so the sequence is the cost per matrix inside a step. A
   call of a few milliseconds that follows other work (the exact SVD, a 64 MB read, or a 50
   ms sleep) takes 0.7-1 ms longer on the development machine, whatever it follows, so the
   first call is reported beside it; ``speedup`` and ``speedup_first_call`` divide the exact
   time by each. The exact clip takes 60-180 ms, so its first-call effect is lost in it.
2. The overhead of spectral clipping with its default selection (the paper's rule: every
   parameter but the two ``nn.Embedding`` weights, so every weight matrix, the output head
   ``head.weight`` included, and every bias and LayerNorm gain as an ``(n, 1)`` matrix, that is
   norm-clipped at tau; randomized, adaptive EMA threshold) in a full ``rc.Clipper`` step of
   ``CharGPT`` (vocab 96, T = 128, d = 128, 4 layers, 4 heads, B = 32) and of a d = 384
   variant (6 heads), timed side by side with the same step without it, in interleaved rounds.
   Records ``{model, method: "spectral_overhead", overhead_frac, matrices_clipped,
   vectors_clipped}``, ``overhead_frac`` being the median over rounds of the paired ratio (step
   with / step without - 1).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import _common
import torch

import robustclip as rc
from robustclip import thresholds as th
from robustclip._spectral import spectral_clip
from robustclip._transform import StepContext
from robustclip.experiments.data import stdlib_corpus
from robustclip.experiments.models import CharGPT, sequence_losses

VOCAB = 96  # printable ASCII (95 characters) and the newline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="timed clips per shape and method")
    parser.add_argument("--grad-steps", type=int, default=3, help="training steps to take gradients from")
    parser.add_argument(
        "--sequence", type=int, default=4, help="randomized clips timed back to back after each first call"
    )
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per model (overhead)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, few repeats")
    _common.add_autotune_argument(parser)


# -- data -------------------------------------------------------------------------------------------


def text_ids(max_chars: int = 1_000_000) -> torch.Tensor:
    """The standard library's source as ids in [0, 96): printable ASCII, newline; rest dropped."""
    codes = [10 if c == "\n" else ord(c) for c in stdlib_corpus(max_chars)]
    ids = [95 if c == 10 else c - 32 for c in codes if c == 10 or 32 <= c < 127]
    return torch.tensor(ids, dtype=torch.long)


def batches(ids: torch.Tensor, b: int, t: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        ix = torch.randint(len(ids) - t - 1, (b,), generator=gen)
        x = torch.stack([ids[i : i + t] for i in ix.tolist()])
        y = torch.stack([ids[i + 1 : i + 1 + t] for i in ix.tolist()])
        yield x, y


def load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# -- part 1: exact against randomized ---------------------------------------------------------------


def gradient_matrices(d: int, steps: int, ids: torch.Tensor, batch: int) -> dict[str, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = CharGPT(vocab=VOCAB, block_size=128, d=d, layers=1, heads=max(1, d // 64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    blk = model.blocks[0]
    wanted = {
        f"{d}x{d}": blk.attn.proj.weight,
        f"{d}x{4 * d}": blk.out.weight,
        f"{4 * d}x{d}": blk.fc.weight,
    }
    out: dict[str, list[torch.Tensor]] = {k: [] for k in wanted}
    data = batches(ids, batch, 128, seed=1)
    for _ in range(steps):
        x, y = next(data)
        opt.zero_grad()
        sequence_losses(model(x), y).mean().backward()
        for k, p in wanted.items():
            out[k].append(p.grad.detach().clone())
        opt.step()
    return out


def _time_ms(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return (time.perf_counter() - t0) * 1e3


class _Timer:
    """One transform on one matrix: each call times an update on a fresh copy (copied outside
    the timer) and returns the top singular value the clip read."""

    def __init__(self, transform, g: torch.Tensor) -> None:
        self.transform, self.g = transform, g
        self.ctx = StepContext([g], ["w"], modules=[None])
        self.state = transform.init([g])
        self.times: list[float] = []
        self()  # warm-up, not recorded
        self.times.clear()

    def __call__(self) -> float:
        work = [self.g.clone()]
        t0 = time.perf_counter()
        _, self.state = self.transform.update(work, self.state, self.ctx)
        sigma = float(self.state.sigma_before[0])  # waits for the result on any device
        self.times.append((time.perf_counter() - t0) * 1e3)
        return sigma


def exact_vs_randomized(args, ids) -> list[dict]:
    d = 64 if args.quick else 768
    mats = gradient_matrices(d, args.grad_steps, ids, batch=2 if args.quick else 8)
    records = []
    for shape, gs in mats.items():
        res = {m: {"times": [], "errs": []} for m in ("exact", "randomized")}
        for g in gs:
            s1 = float(torch.linalg.svdvals(g.double())[0])
            # tau constant at sigma_1 / 2: the clip itself is timed, and it does clip
            timers = {
                "exact": _Timer(spectral_clip(0.5 * s1, rank=None), g),
                "randomized": _Timer(spectral_clip(0.5 * s1, rank=8, oversample=8, niter=2), g),
            }
            # interleaved, so both see the same load; the full SVD takes most of a second, so
            # it gets fewer repeats per matrix (about `repeats` over all matrices)
            n_exact = max(2, -(-args.repeats // len(gs)))
            for rep in range(args.repeats):
                if rep < n_exact:
                    est_e = timers["exact"]()
                    # context: torch.linalg.svd on the matrix as stored (the exact mode
                    # decomposes the tall orientation, which LAPACK does faster)
                    res["exact"].setdefault("as_stored", []).append(_time_ms(torch.linalg.svd, g, full_matrices=False))
                if rep == 0:
                    # context: torch.linalg.svd with its defaults (full_matrices=True), the
                    # "full SVD" a user would call first
                    res["exact"].setdefault("full", []).append(_time_ms(torch.linalg.svd, g))
                # the first randomized call after other work, then a sequence of calls as a
                # step over many matrices makes them (see the module docstring)
                first = len(timers["randomized"].times)
                for _ in range(1 + args.sequence):
                    est_r = timers["randomized"]()
                res["randomized"].setdefault("first", []).append(timers["randomized"].times.pop(first))
                lowrank = [_time_ms(torch.svd_lowrank, g, q=16, niter=2) for _ in range(1 + args.sequence)]
                res["randomized"].setdefault("lowrank", []).extend(lowrank[1:] or lowrank)
            for m, est in (("exact", est_e), ("randomized", est_r)):
                res[m]["times"] += timers[m].times
                res[m]["errs"].append(abs(est - s1) / s1)
        for m, rank in (("exact", None), ("randomized", 8)):
            records.append(
                {
                    "shape": shape,
                    "method": m,
                    "median_ms": statistics.median(res[m]["times"]),
                    "sigma1_rel_err": max(res[m]["errs"]),
                    "sigma1_rel_err_median": statistics.median(res[m]["errs"]),
                    "n_matrices": len(gs),
                    "n_timings": len(res[m]["times"]),
                    "rank": rank,
                    "q": None if rank is None else 16,
                    "niter": None if rank is None else 2,
                    "load_avg_1m": load_avg(),
                }
            )
            ctx_key, ctx_name = ("as_stored", "svd_as_stored_ms") if m == "exact" else ("lowrank", "svd_lowrank_q16_ms")
            records[-1][ctx_name] = statistics.median(res[m][ctx_key])
            if m == "exact":
                records[-1]["svd_full_matrices_ms"] = statistics.median(res[m]["full"])
            else:
                records[-1]["median_ms_first_call"] = statistics.median(res[m]["first"])
                records[-1]["sequence"] = args.sequence
    by = {(r["shape"], r["method"]): r for r in records}
    for r in records:
        if r["method"] == "randomized":
            r["speedup"] = by[(r["shape"], "exact")]["median_ms"] / r["median_ms"]
            r["speedup_first_call"] = by[(r["shape"], "exact")]["median_ms"] / r["median_ms_first_call"]
    return records


# -- part 2: overhead in a training step ------------------------------------------------------------


def overhead(args, ids, name: str, d: int, heads: int) -> list[dict]:
    b = 4 if args.quick else 32
    layers = 1 if args.quick else 4

    def fresh(method):
        torch.manual_seed(0)
        model = CharGPT(vocab=VOCAB, block_size=128, d=d, layers=layers, heads=heads)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return rc.Clipper(model, opt, method)

    runs = {
        "baseline": fresh(None),
        "spectral": fresh(spectral_clip(th.EMA(), rank=8)),
    }
    data = batches(ids, b, 128, seed=2)

    def step(clipper):
        x, y = next(data)
        t0 = time.perf_counter()
        clipper.backward(sequence_losses(clipper.model(x), y))
        clipper.step()
        return time.perf_counter() - t0

    for c in runs.values():  # warm-up
        step(c)
        step(c)
    times: dict[str, list[float]] = {k: [] for k in runs}
    rounds = 2 if args.quick else args.rounds
    for i in range(rounds):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]  # alternate who goes first
        for k in order:
            times[k].append(step(runs[k]))
    # the transform alone, on the spectral run's last (real) gradient, for a low-noise reading
    sc = runs["spectral"]
    tr = sc.method.transform.transforms[0]  # the Clipper holds a chain of one
    grads = [p.grad.detach().clone() for p in sc.params]
    ctx = StepContext(sc.params, sc.layout.names, modules=sc.layout.modules)
    state = tr.init(sc.params)
    alone = []
    for _ in range(rounds + 1):
        work = [g.clone() for g in grads]
        t0 = time.perf_counter()
        _, state = tr.update(work, state, ctx)
        alone.append(time.perf_counter() - t0)
    base, spec = statistics.median(times["baseline"]), statistics.median(times["spectral"])
    # each round runs both steps back to back: the per-round ratio cancels slow load drift
    paired = statistics.median(s / b_ - 1 for s, b_ in zip(times["spectral"], times["baseline"]))
    plan = tr._plans[next(iter(tr._plans))] if tr._plans else None
    n_mat = sum(len(grp.indices) for grp in plan.groups) if plan else 0
    n_vec = len(plan.vectors) if plan else 0
    return [
        {
            "model": name,
            "method": "spectral_overhead",
            "overhead_frac": paired,
            "overhead_frac_of_medians": spec / base - 1,
            "overhead_frac_transform_alone": statistics.median(alone[1:]) / base,
            "step_ms": base * 1e3,
            "step_ms_spectral": spec * 1e3,
            "transform_ms": statistics.median(alone[1:]) * 1e3,
            "matrices_clipped": n_mat,
            "vectors_clipped": n_vec,
            "rounds": rounds,
            "batch": b,
            "d": d,
            "heads": heads,
            "layers": layers,
            "load_avg_1m": load_avg(),
        }
    ]


def run(args) -> list[dict]:
    autotune = getattr(args, "autotune", "off")
    rc.backends.autotune = autotune == "on"
    ids = text_ids(200_000 if args.quick else 1_000_000)
    records = exact_vs_randomized(args, ids)
    d1, d2 = (32, 64) if args.quick else (128, 384)
    records += overhead(args, ids, f"CharGPT d={d1}", d1, 4)
    records += overhead(args, ids, f"CharGPT d={d2}", d2, 6 if d2 == 384 else 4)
    for r in records:
        r["autotune"] = autotune
    return records


# -- report ---------------------------------------------------------------------------------------


def to_markdown(records: list[dict], args) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    loads = [r["load_avg_1m"] for r in records]
    seq = next((r["sequence"] for r in records if "sequence" in r), args.sequence)
    autotune = next((r["autotune"] for r in records if "autotune" in r), getattr(args, "autotune", "off"))
    if autotune == "on":
        kernels = (
            "Kernel autotuning (`robustclip.backends.autotune`) on: the randomized mode's "
            "products go through the kernel each one timed fastest, and its correction through "
            "the fastest blocking (robustclip._kernels). "
        )
    else:
        kernels = (
            "Kernel autotuning (`robustclip.backends.autotune`) off, the default: the randomized "
            "mode's products run through `torch.matmul` and its correction through "
            "`Tensor.addmm_`. "
        )
    lines = [
        "## Spectral clipping",
        "",
        f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}. "
        f"The machine was shared with other jobs: 1-minute load average {min(loads):.1f}-"
        f"{max(loads):.1f} during the run, so absolute times are inflated and noisy; the "
        "methods were timed side by side in one process.",
        "",
        "### Exact against randomized (r = 8, q = 16, niter = 2)",
        "",
        "Real gradients of a d = 768 character GPT (attention projection 768x768, MLP output "
        "768x3072, MLP input 3072x768) at its first AdamW steps on text; tau = sigma_1 / 2. "
        "Time: one `spectral_clip(...).update` on one matrix. Error: the top singular value the "
        "clip reads, against a float64 full SVD (the largest over the matrices). "
        f"{kernels}"
        "Each exact clip is followed by one randomized clip (*first call*) and then "
        f"{seq} more back to back (*in sequence*, as a step clips its matrices one after "
        "another, and the `median ms` of the record); a call of a few ms that follows any "
        "other work (the SVD, a 64 MB read, a 50 ms sleep) runs 0.7-1 ms slower on this machine.",
        "",
        "| shape | method | median ms (in sequence) | speed-up | first call ms | speed-up (first call) | "
        "sigma_1 rel. error (max) | for context |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        if "shape" in r:
            sp = f"{r['speedup']:.0f}x" if "speedup" in r else ""
            sp1 = f"{r['speedup_first_call']:.0f}x" if "speedup_first_call" in r else ""
            first = f"{r['median_ms_first_call']:.1f}" if "median_ms_first_call" in r else ""
            if r["method"] == "exact":
                note = (
                    f"`torch.linalg.svd` of the matrix as stored: {r['svd_as_stored_ms']:.0f} ms; "
                    f"with its default `full_matrices=True`: {r['svd_full_matrices_ms']:.0f} ms"
                )
            else:
                note = f"`torch.svd_lowrank(q=16, niter=2)`: {r['svd_lowrank_q16_ms']:.1f} ms"
            lines.append(
                f"| {r['shape']} | {r['method']} | {r['median_ms']:.1f} | {sp} | {first} | {sp1} | "
                f"{r['sigma1_rel_err']:.1e} | {note} |"
            )
    lines += [
        "",
        "### Share of a training step",
        "",
        "A full `rc.Clipper` step (forward, backward, step with AdamW) of `CharGPT` (vocab 96, "
        "T = 128, 4 layers, B = 32; 4 heads at d = 128, 6 at d = 384) with "
        "`spectral_clip(EMA(), rank=8)` (randomized, r = 8, q = 16, niter = 2) and its default "
        "selection, the paper's rule: every parameter but the two embeddings, so every weight "
        "matrix (the output head included) and every bias and LayerNorm gain, the latter as "
        "`(n, 1)` matrices, which is norm clipping at tau. Against the same step without it, in "
        f"interleaved rounds. {kernels}`overhead` is the median over rounds of (step with / step without - 1), the "
        "two steps of a round run back to back; `transform alone` times the transform on the "
        "run's last gradient, a lower-noise reading of the same cost.",
        "",
        "| model | matrices | vectors | step ms | with spectral ms | overhead | transform alone ms | "
        "transform alone / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r.get("method") == "spectral_overhead":
            lines.append(
                f"| {r['model']} | {r['matrices_clipped']} | {r.get('vectors_clipped', 0)} | {r['step_ms']:.0f} | "
                f"{r['step_ms_spectral']:.0f} | {100 * r['overhead_frac']:+.1f}% | "
                f"{r['transform_ms']:.1f} | {100 * r['overhead_frac_transform_alone']:.1f}% |"
            )
    lines += [
        "",
        "Under this much load a single step varies by more than the transform costs, so the "
        "paired overhead can come out negative; the transform-alone column is the steadier "
        "estimate. Targets: randomized top-8 on 768x3072 at least 40x faster than "
        "exact with sigma_1 error <= 1e-2; clipping every matrix <= 10% of the step.",
    ]
    return "\n".join(lines) + "\n"
