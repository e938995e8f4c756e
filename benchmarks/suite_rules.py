"""Step time of per-sample clipping through the layer rules of the newer layer types, against
the same hook engine with that rule removed (the per-module torch.func fallback, or the
whole-model fallback where the module fallback cannot take the layer) and the reference loop.

``python benchmarks/run.py --suite rules --json PATH [--markdown] [--batch 32] [--rounds 5]``

A step is zero_grad + forward + ``clipper.backward`` + ``clipper.step`` (SGD, lr 0: fixed
weights), float32 on the CPU. Variants (record field ``path``):

* ``rule``: ``rc.per_sample_clip(c)`` with the layer's rule;
* ``no rule``: the same, with the layer's rule taken out of the registry for the run;
* ``loop``: ``rc.per_sample_clip(c, engine="loop")``, one backward per sample.

The variants take turns round by round (one untimed step each turn, then ``--steps-per-round``
timed), and a record is the median of its timed steps. ``max_rel_err`` compares each variant's
gradient with the loop's at the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import robustclip as rc
from robustclip.per_sample import rules as R


class _Encoder(nn.Module):
    def __init__(self, d: int = 64, t: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.inp(x)).mean(1))


class _Recurrent(nn.Module):
    def __init__(self, cls: type, d: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, d)
        self.rnn = cls(d, d, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * d, 10)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(idx))
        return self.head(out[:, -1])


class _HFConv1D(nn.Module):
    def __init__(self, d: int = 128) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc, self.proj, self.head = Conv1D(4 * d, d), Conv1D(d, 4 * d), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + self.proj(F.gelu(self.fc(x)))).mean(1))


class _LlamaNorm(nn.Module):
    def __init__(self, d: int = 128) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.a, self.norm, self.head = nn.Linear(d, d), LlamaRMSNorm(d), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.a(x)).mean(1))


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t1 = nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1)
        self.n1 = nn.InstanceNorm2d(16, affine=True)
        self.t2 = nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.t2(torch.relu(self.n1(self.t1(x)))).flatten(1)


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(1000, 64, mode="mean"), nn.Linear(64, 10)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(idx))


def _cases(b: int) -> dict[str, tuple[Callable[[], nn.Module], torch.Tensor, list[object]]]:
    """name -> (model factory, input, the registry keys of the rules under test)."""
    return {
        "TransformerEncoder (MultiheadAttention)": (_Encoder, torch.randn(b, 32, 16), [nn.MultiheadAttention]),
        "LSTM 2-layer bidirectional": (lambda: _Recurrent(nn.LSTM), torch.randint(0, 100, (b, 32)), [nn.LSTM]),
        "GRU 2-layer bidirectional": (lambda: _Recurrent(nn.GRU), torch.randint(0, 100, (b, 32)), [nn.GRU]),
        "HF Conv1D MLP": (_HFConv1D, torch.randn(b, 32, 128), ["Conv1D"]),
        "LlamaRMSNorm": (_LlamaNorm, torch.randn(b, 32, 128), ["elementwise-affine norm"]),
        "ConvTranspose2d + InstanceNorm2d": (
            _Decoder, torch.randn(b, 16, 8, 8), [nn.ConvTranspose2d, nn.InstanceNorm2d],
        ),  # fmt: skip
        "EmbeddingBag (mean)": (_Bag, torch.randint(0, 1000, (b, 20)), [nn.EmbeddingBag]),
    }


@contextlib.contextmanager
def _without(keys: list[object]) -> Iterator[None]:
    saved = {}
    for k in keys:
        table = R.MATCHED if isinstance(k, str) else R.RULES
        saved[k] = table.pop(k)  # type: ignore[call-overload]
    try:
        yield
    finally:
        for k, rule in saved.items():
            (R.MATCHED if isinstance(k, str) else R.RULES)[k] = rule  # type: ignore[index]


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)


def run(args) -> list[dict]:
    records = []
    for name, (make, x, keys) in _cases(args.batch).items():
        torch.manual_seed(0)
        base = make()
        with torch.no_grad():
            r = torch.randn_like(base(x))

        def losses(out: torch.Tensor, r: torch.Tensor = r) -> torch.Tensor:
            return (torch.tanh(out) * r).flatten(1).sum(1)

        steps, grads, notes = {}, {}, {}
        for path in ("rule", "no rule", "loop"):
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            ctx = _without(keys) if path == "no rule" else contextlib.nullcontext()
            with ctx, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                clipper = rc.Clipper(model, opt, rc.per_sample_clip(1.0, engine="loop" if path == "loop" else "auto"))

                def step(model: nn.Module = model, opt=opt, clipper=clipper, x: torch.Tensor = x, losses=losses) -> None:
                    opt.zero_grad(set_to_none=True)
                    clipper.backward(losses(model(x)))
                    clipper.step()

                try:
                    step()  # the first step (the engine's check; a whole-model fallback's loop)
                    step()  # the path every later step takes
                except Exception as e:  # noqa: BLE001 - a failing fallback is a result
                    notes[path] = f"fails: {type(e).__name__}"
                    continue
            whole = any("cannot split this model" in str(w.message) for w in caught)
            notes[path] = "whole-model fallback" if whole else ""
            steps[path] = (step, ctx)
            grads[path] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        times: dict[str, list[float]] = {p: [] for p in steps}
        for _ in range(args.rounds):
            for path, (step, _ctx) in steps.items():
                with _without(keys) if path == "no rule" else contextlib.nullcontext():
                    step()
                    for _ in range(args.steps_per_round):
                        t0 = time.perf_counter()
                        step()
                        times[path].append(time.perf_counter() - t0)
        ref = grads.get("loop")
        for path in ("rule", "no rule", "loop"):
            rec = {"model": name, "batch": args.batch, "path": path, "note": notes.get(path, "")}
            if path in times:
                rec["ms"] = 1000 * statistics.median(times[path])
                if ref is not None:
                    rec["max_rel_err"] = float((grads[path] - ref).norm() / ref.norm())
            records.append(rec)
    return records


def to_markdown(records: list[dict], args) -> str:
    lines = [
        f"Step time (ms, median), batch {args.batch}, float32, CPU: the layer's rule, the same engine "
        "without it, and the reference loop.",
        "",
        "| model | rule | no rule | loop | note (no rule) |",
        "|---|---|---|---|---|",
    ]
    by: dict[str, dict[str, dict]] = {}
    for r in records:
        by.setdefault(r["model"], {})[r["path"]] = r
    def cell(paths: dict[str, dict], p: str) -> str:
        rec = paths.get(p, {})
        return f"{rec['ms']:.1f}" if "ms" in rec else rec.get("note", "-")

    for model, paths in by.items():
        lines.append(f"| {model} | {cell(paths, 'rule')} | {cell(paths, 'no rule')} | {cell(paths, 'loop')} | {paths['no rule'].get('note', '')} |")
    return "\n".join(lines) + "\n"
