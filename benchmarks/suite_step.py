"""Step time and peak memory of per-sample clipping against the plain step and other tools.

``python benchmarks/run.py --suite step --json PATH [--markdown] [--autotune on|off]``

``--autotune`` sets ``robustclip.backends.autotune`` for the timed steps and the memory
processes (default ``off``, the library's default); every record says which. Record both
settings with two runs, e.g. ``--autotune on --json step_on.json`` and ``--autotune off
--json step_off.json --extra-json step_on.json --extra-label "autotune on" --markdown``.

A *step* is zero_grad + forward + backward + clip + optimizer step (SGD, lr 0, so the weights
stay fixed and every method sees the same model). Methods (record names):

* ``plain``: ``loss.mean().backward(); opt.step()``;
* ``plain_accum``: the same batch as 4 micro-batches of plain accumulation (the reference of
  ``micro_batch_clip``);
* ``batch_clip``: ``rc.Clipper(..., rc.clip_by_global_norm(c))``;
* ``micro_batch_clip``: ``rc.micro_batch_clip(c)`` over 4 micro-batches;
* ``per_sample_vmap``, ``per_sample_fast``: ``rc.per_sample_clip(c, engine="vmap"|"hooks")``;
* ``opacus_hooks``, ``opacus_ghost``: Opacus' GradSampleModule + DPOptimizer, and its ghost
  clipping (two backward passes), noise_multiplier=0 (skipped with a note if Opacus is missing).

Timing: every method gets its own copy of the model, all live in one process, and the methods
take turns round by round (``--rounds``), so that load from other processes hits all of them
alike; in its turn a method runs one untimed step (which absorbs the page faults and cold caches
the previous method leaves behind) and ``--steps-per-round`` timed ones; the record is the
median of all its timed steps. Memory: each method runs again in a fresh (spawned) process,
with glibc's mmap threshold fixed at 128 KB (:func:`_common._fixed_mmap_threshold`: every large block
is mapped and unmapped on its own, so the RSS follows the memory in use instead of what the
heap kept from earlier steps). The extra memory of one step
is measured like this: the C heap's free pages are returned to the OS (``malloc_trim``), the
kernel's peak-RSS mark (``VmHWM``) is reset, the step runs, and the record is that peak minus
the RSS just before the step. ``peak_mb`` is the median of 5 steps after 2 warm-up steps (the
RSS of glibc's heap depends on the order of allocations, so single steps vary by several MB);
``first_step_peak_mb`` is the very first step (one-time costs included: allocator arenas,
library workspaces, the hook engine's first-step check against autograd). On CUDA: ``max_memory_allocated``
minus the allocated memory before the first step.

``max_rel_err``: the largest, over parameters, of ``||g - g_ref|| / ||g_ref||`` between the
method's final gradient and a reference at the same weights: the per-sample reference loop
(``engine="loop"``) for per-sample methods and Opacus, ``clip_grad_norm_`` for ``batch_clip``,
an explicit loop over micro-batches for ``micro_batch_clip``. Radii: the median per-sample
gradient norm for per-sample methods (half the samples clipped), half the batch gradient norm
for the others.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import statistics
import warnings
from collections.abc import Callable

import _common
import torch
import torch.nn.functional as F

import robustclip as rc
from robustclip.experiments.models import MLP, CharGPT, SmallCNN, sequence_losses
from robustclip.per_sample import PerSampleFallbackWarning

MODELS = ("mlp", "cnn", "gpt")
METHODS = (
    "plain",
    "plain_accum",
    "batch_clip",
    "micro_batch_clip",
    "per_sample_vmap",
    "per_sample_fast",
    "opacus_hooks",
    "opacus_ghost",
)
MICRO = 4


def add_arguments(parser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: mlp,cnn,gpt")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated record names")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument(
        "--steps-per-round", type=int, default=2, help="timed steps per method and round (after one untimed)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--scale",
        default="issue",
        choices=["issue", "gpt2-small"],
        help="'issue': the sizes of the issue; 'gpt2-small': GPT d=768, 12 layers, T=1024 (GPU)",
    )
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    _common.add_autotune_argument(parser)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-check", action="store_true", help="skip max_rel_err")
    parser.add_argument(
        "--extra-json",
        type=pathlib.Path,
        action="append",
        default=[],
        help="with --markdown: also tabulate the records of an earlier run (repeatable)",
    )
    parser.add_argument(
        "--extra-label", action="append", default=[], help="heading of each --extra-json table"
    )


# -- models -------------------------------------------------------------------------------------------


def build(name: str, device: str, scale: str, batch: int | None, seed: int = 0):
    """(model, x, y, losses_fn) with the issue's sizes; the same seed gives the same everything."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        b = batch or 256
        model = MLP([784, 512, 512, 10])
        x, y = torch.randn(b, 784, generator=g), torch.randint(0, 10, (b,), generator=g)

        def losses(out, y):
            return F.cross_entropy(out, y, reduction="none")

    elif name == "cnn":
        b = batch or 128
        model = SmallCNN()
        x, y = torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 100, (b,), generator=g)

        def losses(out, y):
            return F.cross_entropy(out, y, reduction="none")

    elif name == "gpt":
        if scale == "gpt2-small":
            b, vocab, t, d, layers, heads = batch or 8, 96, 1024, 768, 12, 12
        else:
            b, vocab, t, d, layers, heads = batch or 32, 96, 128, 128, 4, 4
        model = CharGPT(vocab=vocab, block_size=t, d=d, layers=layers, heads=heads, tied=False)
        x = torch.randint(0, vocab, (b, t), generator=g)
        y = torch.randint(0, vocab, (b, t), generator=g)
        losses = sequence_losses
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return model.to(device), x.to(device), y.to(device), losses


# -- methods ------------------------------------------------------------------------------------------


class BatchedPositionsGPT(CharGPT):
    """CharGPT with its position index expanded over the batch (for Opacus only): the same
    function and parameters, but every layer sees batch-first inputs."""

    def forward(self, idx):
        b, t = idx.shape
        pos = torch.arange(t, device=idx.device).expand(b, t).contiguous()
        x = self.tok(idx) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))



def make_step(method: str, model, x, y, losses, radius: float, batch_radius: float) -> Callable[[], None]:
    """A closure running one full training step of ``method`` on ``model`` (modified: wrapped)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    if method == "plain":

        def step():
            opt.zero_grad()
            losses(model(x), y).mean().backward()
            opt.step()

        return step
    if method == "plain_accum":
        xs, ys = x.chunk(MICRO), y.chunk(MICRO)

        def step():
            opt.zero_grad()
            for xb, yb in zip(xs, ys):
                (losses(model(xb), yb).mean() / MICRO).backward()
            opt.step()

        return step
    if method in ("batch_clip", "micro_batch_clip", "per_sample_vmap", "per_sample_fast", "per_sample_loop"):
        est = {
            "batch_clip": rc.clip_by_global_norm(batch_radius),
            "micro_batch_clip": rc.micro_batch_clip(batch_radius),
            "per_sample_vmap": rc.per_sample_clip(radius, engine="vmap"),
            "per_sample_fast": rc.per_sample_clip(radius, engine="hooks"),
            "per_sample_loop": rc.per_sample_clip(radius, engine="loop"),
        }[method]
        clipper = rc.Clipper(model, opt, est)
        if method == "micro_batch_clip":
            xs, ys = x.chunk(MICRO), y.chunk(MICRO)

            def step():
                opt.zero_grad()  # every step starts with zero_grad, as the plain ones do
                for xb, yb in zip(xs, ys):
                    clipper.backward(losses(model(xb), yb).mean())
                clipper.step()

            return step

        def step():
            opt.zero_grad()  # as in the plain step: the previous gradients go before the forward
            clipper.backward(losses(model(x), y))
            clipper.step()

        return step
    if method.startswith("opacus") and isinstance(model, CharGPT):
        # Opacus needs every layer input batch-first; CharGPT looks its positions up with an
        # unbatched index (T,). The same model with the index expanded to (B, T):
        model.__class__ = BatchedPositionsGPT
    if method == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        dpo = DPOptimizer(opt, noise_multiplier=0.0, max_grad_norm=radius, expected_batch_size=x.shape[0])

        def step():
            dpo.zero_grad()
            losses(gsm(x), y).mean().backward()
            dpo.step()

        return step
    if method == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=radius, use_ghost_clipping=True
        )
        dpo = DPOptimizerFastGradientClipping(
            opt, noise_multiplier=0.0, max_grad_norm=radius, expected_batch_size=x.shape[0]
        )

        def step():
            dpo.zero_grad()
            DPTensorFastGradientClipping(gsm, dpo, losses(gsm(x), y), "mean").backward()
            dpo.step()

        return step
    raise ValueError(f"unknown method {method!r}")


# -- references ------------------------------------------------------------------------------------------


def radii(model, x, y, losses) -> tuple[float, float]:
    """The median per-sample gradient norm and half the batch gradient norm."""
    m = copy.deepcopy(model)
    clipper = rc.Clipper(m, torch.optim.SGD(m.parameters(), lr=0.0), rc.per_sample_clip(None, engine="loop"))
    clipper.backward(losses(m(x), y))
    info = clipper.step()
    per_sample = float(info.per_sample_norms.median())
    return per_sample, 0.5 * float(info.grad_norm)


def reference_grads(method: str, model, x, y, losses, radius: float, batch_radius: float) -> list[torch.Tensor] | None:
    m = copy.deepcopy(model)
    params = list(m.parameters())
    if method in ("per_sample_vmap", "per_sample_fast", "opacus_hooks", "opacus_ghost"):
        make_step("per_sample_loop", m, x, y, losses, radius, batch_radius)()
        return [p.grad.detach().clone() for p in params]
    if method == "batch_clip":
        g = torch.autograd.grad(losses(m(x), y).mean(), params)
        total = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
        coef = min(1.0, batch_radius / (total + 1e-12))
        return [t * coef for t in g]
    if method == "micro_batch_clip":
        acc = [torch.zeros_like(p) for p in params]
        for xb, yb in zip(x.chunk(MICRO), y.chunk(MICRO)):
            g = torch.autograd.grad(losses(m(xb), yb).mean(), params)
            total = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
            coef = min(1.0, batch_radius / (total + 1e-12))
            acc = [a + t * coef / MICRO for a, t in zip(acc, g)]
        return acc
    return None


def max_rel_err(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    errs = []
    for g, r in zip(grads, ref):
        errs.append(float((g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)))
    return max(errs)


# -- memory (fresh process per method) -----------------------------------------------------------


def _memory_step(conf: dict) -> Callable[[], None]:
    """The step of ``conf``'s method and model, built in the memory process."""
    model, x, y, losses = build(conf["model"], conf["device"], conf["scale"], conf["batch"])
    return make_step(conf["method"], model, x, y, losses, conf["radius"], conf["batch_radius"])


# -- the suite ---------------------------------------------------------------------------------------------


def run(args) -> list[dict]:
    # the tools' warnings (Opacus' full-backward-hook notes, fallback notices) would drown the
    # JSON printed at the end; the benchmark measures, it does not diagnose
    warnings.simplefilter("ignore")
    autotune = args.autotune == "on"
    rc.backends.autotune = autotune
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    have_opacus = _common.opacus_available()
    records: list[dict] = []
    for name in models:
        base, x, y, losses = build(name, args.device, args.scale, args.batch)
        radius, batch_radius = radii(base, x, y, losses)
        steps: dict[str, Callable[[], None]] = {}
        models_of: dict[str, torch.nn.Module] = {}
        notes: dict[str, str] = {}
        for method in methods:
            if method.startswith("opacus") and not have_opacus:
                notes[method] = "skipped: opacus is not installed (pip install robustclip[bench])"
                continue
            m = copy.deepcopy(base)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    steps[method] = make_step(method, m, x, y, losses, radius, batch_radius)
                    steps[method]()  # also the correctness probe: lr=0 leaves p.grad behind
                models_of[method] = m
            except Exception as e:  # a tool that cannot run this model is reported, not fatal
                notes[method] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                steps.pop(method, None)
        errs: dict[str, float | None] = {}
        for method, m in models_of.items():
            ref = None if args.no_check else reference_grads(method, base, x, y, losses, radius, batch_radius)
            if ref is None:
                errs[method] = None
            else:
                errs[method] = max_rel_err([p.grad for p in m.parameters()], ref)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        times, rounds = _common.timed_rounds(
            steps,
            warmup=args.warmup,
            rounds=args.rounds,
            steps_per_round=args.steps_per_round,
            sync=sync,
            ignore=PerSampleFallbackWarning,
        )
        del steps, models_of
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        plain = med.get("plain")
        for method in methods:
            rec = {
                "model": name,
                "method": method,
                "batch": int(x.shape[0]),
                "median_ms": round(med[method], 2) if method in med else None,
                "ratio_vs_plain": round(med[method] / plain, 3) if plain and method in med else None,
                "peak_mb": None,
                "max_rel_err": errs.get(method),
                "autotune": args.autotune,
            }
            if plain and method in med:
                _common.set_paired_ratio(rec, method, rounds)
            if method in notes:
                rec["note"] = notes[method]
            if method in med and not args.no_memory:
                conf = {
                    "model": name,
                    "method": method,
                    "device": args.device,
                    "scale": args.scale,
                    "batch": args.batch,
                    "threads": torch.get_num_threads(),
                    "radius": radius,
                    "batch_radius": batch_radius,
                    "warmup": 2,
                    "steps": 5,
                    "autotune": autotune,
                }
                _common.record_memory(rec, _memory_step, conf)
            records.append(rec)
    return records


def _targets(records: list[dict]) -> list[str]:
    """The issue's targets, checked on these records."""
    by = {(r["model"], r["method"]): r for r in records}

    def ratio(model: str, method: str) -> float | None:
        r = by.get((model, method))
        return r["ratio_vs_plain"] if r else None

    out = []
    for model in MODELS:
        fast = ratio(model, "per_sample_fast")
        if fast is None:
            continue
        paired = by[(model, "per_sample_fast")].get("ratio_vs_plain_paired")
        note = f" (paired by round: {paired:.2f}x)" if paired is not None else ""
        out.append(f"- {model}: per_sample_fast {fast:.2f}x plain{note} (target <= 1.3x, aim 1.15x): {'met' if fast <= 1.3 else 'NOT met'}")
        ghost = ratio(model, "opacus_ghost")
        if ghost is not None and model in ("mlp", "cnn"):
            speedup = ghost / fast
            out.append(f"- {model}: {speedup:.2f}x faster than opacus_ghost (target >= 1.6x): {'met' if speedup >= 1.6 else 'NOT met'}")
        vmap = ratio(model, "per_sample_vmap")
        if vmap is not None and model == "gpt":
            out.append(f"- {model}: per_sample_vmap {vmap:.2f}x plain (target: fast no slower): {'met' if fast <= vmap else 'NOT met'}")
        pf, pp = by[(model, "per_sample_fast")].get("peak_mb"), by.get((model, "plain"), {}).get("peak_mb")
        if pf is not None and pp:
            out.append(f"- {model}: extra peak memory {pf / pp:.2f}x plain (target <= 1.5x): {'met' if pf <= 1.5 * pp else 'NOT met'}")
        mb, acc = ratio(model, "micro_batch_clip"), ratio(model, "plain_accum")
        if mb is not None and acc:
            out.append(f"- {model}: micro_batch_clip {mb / acc:.2f}x plain_accum (target <= 1.05x): {'met' if mb <= 1.05 * acc else 'NOT met'}")
    return out


def to_markdown(records: list[dict], args) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "### Step time and memory (`--suite step`)",
        "",
        "Median step time over interleaved rounds and its ratio to the plain step of the same "
        "model; extra RSS of one step over the RSS before it, in a fresh process with glibc's "
        "mmap threshold fixed at 128 KB so that the RSS follows the memory in use (MB; median "
        "of 5 steady-state steps, and the first step); the largest relative gradient error "
        "against the reference (per-sample loop, `clip_grad_norm_`, or the micro-batch loop). "
        "The paired ratio is the median over rounds of the method's median step in a round "
        "divided by the plain step's in the same round, with the interquartile range over "
        "rounds: a measure of how far the machine's noise moves the ratio. "
        f"Kernel autotuning (`robustclip.backends.autotune`): {getattr(args, 'autotune', 'off')}. "
        f"Load average (1, 5, 15 min) when the table was written: {load}; other processes "
        "shared the CPU.",
        "",
        *_table(records),
    ]
    for path, label in zip(args.extra_json, args.extra_label + [""] * len(args.extra_json)):
        extra = json.loads(path.read_text())
        lines += ["", f"#### {label or path.name}", "", *_table(extra)]
    return "\n".join(lines) + "\n"


def _table(records: list[dict]) -> list[str]:
    lines = [
        "| model | B | method | median ms | × plain | × plain, paired by round (IQR) | peak MB | × plain MB | first step MB | max rel err | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain_mb = {r["model"]: r["peak_mb"] for r in records if r["method"] == "plain"}
    for r in records:
        pm = plain_mb.get(r["model"])
        ms = "" if r["median_ms"] is None else f"{r['median_ms']:.1f}"
        ratio = "" if r["ratio_vs_plain"] is None else f"{r['ratio_vs_plain']:.2f}"
        mb = "" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        first = "" if r.get("first_step_peak_mb") is None else f"{r['first_step_peak_mb']:.1f}"
        mem_ratio = f"{r['peak_mb'] / pm:.2f}" if r["peak_mb"] is not None and pm else ""
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        paired = ""
        if r.get("ratio_vs_plain_paired") is not None:
            lo, hi = r["ratio_vs_plain_paired_iqr"]
            paired = f"{r['ratio_vs_plain_paired']:.2f} ({lo:.2f}-{hi:.2f})"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['method']} | {ms} | {ratio} | {paired} | {mb} | "
            f"{mem_ratio} | {first} | {err} | {r.get('note', '')} |"
        )
    targets = _targets(records)
    if targets:
        lines += ["", "Targets of the issue, on these records:", "", *targets]
    return lines
