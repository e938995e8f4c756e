"""Train a zoo model for a few steps through ``rc.Clipper`` and compare every step's gradient
with the float64 oracle of ``zoo.py`` (a copy of the model at that step's weights, one backward
per sample, the same weights rule, the mean)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

import robustclip as rc
from robustclip.per_sample import ParamLayout, PerSampleFallbackWarning

from .zoo import Batch, Entry, Oracle, median_radius, oracle, rel_err, sync_weights, trainable

METHODS = ["clip", "clip_per_layer", "normalize"]
ENGINES = ["auto", "vmap", "loop"]
GAMMA = 1e-2
LR = 1e-3


@dataclass
class Run:
    """What a few steps of training showed, step by step."""

    grad_err: list[float] = field(default_factory=list)  # worst per-parameter relative error
    global_err: list[float] = field(default_factory=list)  # ||g - g*|| / ||g*||
    norm_err: list[float] = field(default_factory=list)  # per-sample norms vs the oracle's
    mean_err: list[float] = field(default_factory=list)  # the plain mean gradient's (autocast)
    clipped: list[int] = field(default_factory=list)  # samples the oracle clips, per step
    whole_model_fallbacks: int = 0
    warnings: list[str] = field(default_factory=list)


def oracle_weights(method: str, o: Oracle, radii: Tensor | None) -> Tensor:
    if method == "normalize":
        return 1.0 / (o.flat_norms + GAMMA)[None]
    assert radii is not None
    norms = o.group_sq.sqrt() if method == "clip_per_layer" else o.flat_norms[None]
    return torch.where(norms > 0, torch.clamp(radii[:, None] / norms, max=1.0), torch.ones_like(norms))


def count_whole_model_fallbacks(clipper: rc.Clipper, caught: list[warnings.WarningMessage]) -> int:
    """Whole-model fallbacks: the engine handed the whole model to another engine (it says so
    in a PerSampleFallbackWarning and keeps the engine it delegates to)."""
    said = sum(
        issubclass(w.category, PerSampleFallbackWarning) and "cannot split this model" in str(w.message)
        for w in caught
    )
    delegated = int(getattr(clipper.engine, "_delegate", None) is not None)
    return max(said, delegated)


def run(entry: Entry, method: str, engine: str, steps: int = 3, autocast: torch.dtype | None = None) -> Run:
    """``steps`` optimizer steps; at each, the gradient the optimizer sees against the oracle."""
    model, batch = entry.make()
    model64 = copy.deepcopy(model).double()
    params = trainable(model)
    layout = ParamLayout.build(model, params)
    g_of, n_groups = layout.group_of, layout.num_groups
    o = oracle(entry, model64, batch, g_of, n_groups)
    radii: Tensor | None = None
    if method == "clip":
        c = median_radius(o.flat_norms)
        radii = torch.tensor([c], dtype=torch.float64)
        est = rc.per_sample_clip(c, engine=engine)
    elif method == "clip_per_layer":
        cs = [max(median_radius(o.group_sq[g].sqrt()), 1e-12) for g in range(n_groups)]
        radii = torch.tensor(cs, dtype=torch.float64)
        est = rc.per_sample_clip(dict(zip(layout.group_names, cs)), per_layer=True, engine=engine)
    elif method == "normalize":
        est = rc.per_sample_normalize(GAMMA, engine=engine)
    else:
        raise KeyError(method)
    opt = torch.optim.SGD(params, lr=LR)
    seen: list[list[Tensor]] = []
    opt.register_step_pre_hook(lambda *_: seen.append([p.grad.detach().clone() for p in params]))
    mean_model = copy.deepcopy(model) if autocast is not None else None
    out = Run()
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast is not None else contextlib.nullcontext
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clipper = rc.Clipper(model, opt, est)
        try:
            for step in range(steps):
                if step:
                    sync_weights(model64, model)
                    o = oracle(entry, model64, batch, g_of, n_groups)
                w = oracle_weights(method, o, radii)
                ref = o.weighted_mean(w, g_of)
                if method != "normalize":
                    out.clipped.append(int((w < 1).any(0).sum()))
                if mean_model is not None:
                    out.mean_err.append(_mean_err(entry, mean_model, model, batch, o, ctx))
                with ctx():
                    losses = entry.losses(model, batch)
                clipper.backward(losses)
                info = clipper.step()
                out.grad_err.append(rel_err(seen[-1], ref))
                out.global_err.append(_global_err(seen[-1], ref))
                assert info.per_sample_norms is not None
                out.norm_err.append(float(((info.per_sample_norms.double() - o.flat_norms).abs() / o.flat_norms).max()))
        finally:
            clipper.close()
    out.whole_model_fallbacks = count_whole_model_fallbacks(clipper, caught)
    out.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
    return out


def _global_err(got: list[Tensor], ref: list[Tensor]) -> float:
    diff = sum(float((a.double() - r).pow(2).sum()) for a, r in zip(got, ref))
    return (diff / sum(float(r.pow(2).sum()) for r in ref)) ** 0.5


def _mean_err(entry: Entry, mean_model: torch.nn.Module, model: torch.nn.Module, batch: Batch, o: Oracle, ctx) -> float:
    """The plain mean gradient's own error (same weights, same autocast) against float64."""
    sync_weights(mean_model, model)
    with ctx():
        losses = entry.losses(mean_model, batch)
    ps = trainable(mean_model)
    gs = torch.autograd.grad(losses.mean(), ps, allow_unused=True)
    gs = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, gs)]
    return _global_err(gs, o.mean())
