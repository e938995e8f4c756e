"""accumulation: clip each micro-batch vs clip after accumulation vs no clipping.

Nobile & Grohs (arXiv:2605.02701) observe that with gradient accumulation, clipping each
mini-batch's gradient before summing (``rc.micro_batch_clip(c)``) beats clipping the accumulated
gradient (``rc.chain(rc.mean(), rc.clip_by_global_norm(c))``) at virtually no extra cost: the
first bounds the influence of one bad micro-batch, the second only rescales the whole step.

A nanoGPT-style character-level transformer (:class:`robustclip.experiments.models.CharGPT`) trains on a
text corpus -- by default the Python standard library's own source files, which ship with every
Python, or any text file via ``--set data=PATH``. Every optimizer step is built from ``K``
micro-batches (``K`` calls to ``clipper.backward``, one ``clipper.step``). All methods see the same
batches in the same order, take the same number of steps and do the same forward and backward
work; the validation loss is measured every ``eval_every`` steps on fixed held-out windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import robustclip as rc
from robustclip.experiments._methods import MethodParams, build_method, check_methods
from robustclip.experiments._plot import Panel, curves, save_panels
from robustclip.experiments._problem import Problem
from robustclip.experiments._run import (
    RunContext,
    RunData,
    method_table,
    resolve_device,
    seed_everything,
)
from robustclip.experiments._train import clip_reading
from robustclip.experiments.data import CharCorpus, load_text
from robustclip.experiments.models import CharGPT, sequence_losses

DESCRIPTION = "char-level GPT with K micro-batches: clip each micro-batch vs clip after accumulation vs none"


@dataclass
class Config:
    methods: tuple[str, ...] = ("Micro-Clip", "Clip-after-acc", "SGDM")  # SGDM: no clipping
    data: str = ""  # a text file; empty: the Python standard library's sources
    max_chars: int = 1_000_000  # cap on the corpus size
    block_size: int = 64  # context length T
    d: int = 128  # embedding width
    layers: int = 2
    heads: int = 4
    micro_batch: int = 16  # sequences per micro-batch
    accumulation: int = 4  # K micro-batches per optimizer step
    steps: int = 600
    lr: float = 0.3  # SGD step size
    momentum: float = 0.9
    clip: float = 1.0  # radius c, of a micro-batch's mean gradient or of the accumulated one
    eval_every: int = 50  # steps between validation losses
    eval_batches: int = 8  # validation micro-batches per evaluation (fixed windows)
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        check_methods(self.methods, ["Micro-Clip", "Clip-after-acc", "SGDM", "SGD", "Clip-SGD", "NSGD", "Spectral"])
        for k in ("max_chars", "block_size", "d", "layers", "heads", "micro_batch", "accumulation", "steps", "eval_every", "eval_batches"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1, got {getattr(self, k)}.")
        if self.d % self.heads:
            raise ValueError(f"d={self.d} must be divisible by heads={self.heads}.")


def preflight(cfg: Config) -> None:
    if cfg.data and not Path(cfg.data).expanduser().is_file():
        raise FileNotFoundError(f"text file {cfg.data!r} does not exist; pass a readable text file with --set data=PATH.")


def corpus(cfg: Config) -> CharCorpus:
    return CharCorpus(load_text(cfg.data or None, cfg.max_chars))


def _model(cfg: Config, vocab: int) -> CharGPT:
    return CharGPT(vocab, cfg.block_size, cfg.d, cfg.layers, cfg.heads)


def problem(cfg: Config) -> Problem:
    """The CharGPT with a fixed sample of training and validation windows as tensors."""
    c = corpus(cfg)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = c.batch("train", 512, cfg.block_size, g)
    xv, yv = c.batch("val", 256, cfg.block_size, g)
    return Problem("accumulation", _model(cfg, c.vocab_size), (x, y), (xv, yv), sequence_losses, cfg.micro_batch, cfg.lr, cfg.momentum)


@torch.no_grad()
def _val_loss(model: torch.nn.Module, val: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    was = model.training
    model.eval()
    tot = sum(float(sequence_losses(model(x), y).mean()) for x, y in val)
    model.train(was)
    return tot / len(val)


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    c = corpus(cfg)
    ctx.note(f"corpus: {len(c.train) + len(c.val)} characters, vocabulary {c.vocab_size}")
    gv = torch.Generator().manual_seed(12345)
    val = [tuple(t.to(device) for t in c.batch("val", cfg.micro_batch, cfg.block_size, gv)) for _ in range(cfg.eval_batches)]
    for method in ctx.iterate(list(cfg.methods), "methods"):
        arm_id = method
        if ctx.is_done(arm_id):
            continue
        tag = {"arm": arm_id, "method": method}
        seed_everything(cfg.seed)
        model = _model(cfg, c.vocab_size).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        data_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same batches for every method
        with rc.Clipper(model, optimizer, build_method(method, MethodParams(clip=cfg.clip))) as clipper:
            arm = ctx.arm(arm_id, {"model": model, "optimizer": optimizer, "clipper": clipper}, {"data": data_gen},
                          state={"train_time": 0.0, "count": 0, "clip_steps": 0, **_sums(device)})
            if arm.start == 0:
                ctx.log({**tag, "kind": "eval", "step": 0, "val_loss": _val_loss(model, val), "time": 0.0})
            t0 = time.perf_counter()
            for step in arm.steps(cfg.steps, desc=method):
                for _ in range(cfg.accumulation):
                    x, y = (t.to(device) for t in c.batch("train", cfg.micro_batch, cfg.block_size, data_gen))
                    losses = sequence_losses(model(x), y)
                    clipper.backward(losses)
                    # device tensors: no host read per step
                    arm.state["loss_sum"] += losses.detach().double().mean() / cfg.accumulation
                info = clipper.step()
                # Micro-Clip: share of micro-batches clipped; Clip-after-acc: was the step
                # clipped; no reading for the methods that do not clip
                clipped = None if info.skipped else clip_reading(info)
                if clipped is not None:
                    arm.state["clip_sum"] += clipped.double()
                    arm.state["clip_steps"] += 1
                arm.state["count"] += 1
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                    arm.state["train_time"] += time.perf_counter() - t0
                    n = max(arm.state["count"], 1)
                    rec = {
                        **tag, "kind": "eval", "step": step + 1,
                        "train_loss": float(arm.state["loss_sum"]) / n,
                        "val_loss": _val_loss(model, val), "time": arm.state["train_time"],
                    }
                    if arm.state["clip_steps"]:
                        rec["clipped_fraction"] = float(arm.state["clip_sum"]) / arm.state["clip_steps"]
                    ctx.log(rec)
                    arm.state.update(count=0, clip_steps=0, **_sums(device))
                    t0 = time.perf_counter()
            arm.finish()
    return summarize(ctx.records, cfg.methods)


def _sums(device: torch.device) -> dict[str, torch.Tensor]:
    z = torch.zeros((), dtype=torch.float64, device=device)
    return {"loss_sum": z, "clip_sum": z.clone()}


def summarize(records: list[dict[str, Any]], methods: Any) -> dict[str, Any]:
    out = {}
    for m in methods:
        rs = [r for r in records if r.get("method") == m and r.get("kind") == "eval"]
        if rs:
            out[m] = {
                "final_val_loss": rs[-1]["val_loss"],
                "best_val_loss": min(r["val_loss"] for r in rs),
                "time_s": rs[-1]["time"],
                "steps": rs[-1]["step"],
            }
    return {"methods": out}


def format_summary(summary: dict[str, Any]) -> str:
    return method_table(
        summary["methods"],
        16,
        [
            ("final val loss", "final_val_loss", ">15.4f", ""),
            ("best val loss", "best_val_loss", ">15.4f", ""),
            ("time", "time_s", ">8.1f", "s"),
        ],
    )


def plot(runs: list[RunData], out_dir: Path) -> list[Path]:
    # a diverged method (no clipping, large lr) would squash the others: cap the axis at 1.5x
    # the initial validation loss and let it leave the plot
    start = [r["val_loss"] for run in runs for r in run.records if r.get("step") == 0 and "val_loss" in r]
    ylim = (0.0, 1.5 * max(start)) if start and all(math.isfinite(v) for v in start) else None
    panels = [
        Panel("validation loss", "optimizer step", "loss (nats/char)", curves(runs, "val_loss", x="step", kind="eval"), ylim=ylim),
        Panel("training loss", "optimizer step", "loss (nats/char)", curves(runs, "train_loss", x="step", kind="eval"), ylim=ylim),
        Panel("validation loss vs time", "training time (s)", "loss (nats/char)",
              curves(runs, "val_loss", x="time", kind="eval", by="step"), ylim=ylim),
    ]
    return [save_panels(out_dir / "accumulation.png", panels, "gradient accumulation: where to clip")]
