"""Obviously-correct reference implementations: loops over samples and micro-batches.

Per-sample gradients come from a batch of one (``model(x[i:i+1])``), so nothing the library
does (hooks, vmap, graph reuse) is involved. Per-sample clipping is the paper's box as
``robustclip._estimators.per_sample_clip_sum`` states it, applied to those gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from robustclip._estimators import per_sample_clip_sum
from robustclip.experiments.models import MLP, CharGPT, SmallCNN, sequence_losses


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def trainable(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    if opt is not None:
        return [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def sample_grads(model, loss_fn, x, y, params):
    """List over samples of per-parameter gradient lists (batch of one each)."""
    out = []
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])[0]
        out.append(list(torch.autograd.grad(loss, params, allow_unused=True)))
        out[-1] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, out[-1])]
    return out


def flat_norm(gs):
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs))


def mean_grad(model, loss_fn, x, y, params):
    loss = loss_fn(model(x), y).mean()
    return [g if g is not None else torch.zeros_like(p) for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def clip_vec(gs, c):
    n = flat_norm(gs)
    s = 1.0 if c is None or n == 0 else min(1.0, c / n)
    return [g * s for g in gs]


def per_sample_clip(model, loss_fn, x, y, params, c, per_layer_groups=None, radii=None):
    """PS-Clip's mean ``(1/B) sum_i min(1, c/||g_i||) g_i`` (``c`` None: no clipping); with
    ``per_layer_groups`` each group's part of ``g_i`` is clipped to its own radius."""
    grads = sample_grads(model, loss_fn, x, y, params)
    if per_layer_groups is None:
        total, _ = per_sample_clip_sum(grads, math.inf if c is None else c)
    else:
        total = [torch.zeros_like(p) for p in params]
        for gname, idx in per_layer_groups.items():
            r = radii[gname] if radii is not None else c
            part, _ = per_sample_clip_sum([[gs[i] for i in idx] for gs in grads], math.inf if r is None else r)
            for i, v in zip(idx, part):
                total[i] = v
    return [t / x.shape[0] for t in total]


def per_sample_normalize(model, loss_fn, x, y, params, gamma):
    acc = [torch.zeros_like(p) for p in params]
    for gs in sample_grads(model, loss_fn, x, y, params):
        n = flat_norm(gs)
        for a, g in zip(acc, gs):
            a.add_(g / (n + gamma) if n + gamma > 0 else g * 0)
    return [a / x.shape[0] for a in acc]


def micro_batch_clip(model, loss_fn, xs, ys, params, c):
    acc = [torch.zeros_like(p) for p in params]
    for x, y in zip(xs, ys):
        for a, g in zip(acc, clip_vec(mean_grad(model, loss_fn, x, y, params), c)):
            a.add_(g)
    return [a / len(xs) for a in acc]


def max_rel_err(got, ref):
    worst = 0.0
    for a, b in zip(got, ref):
        scale = float(b.abs().max())
        diff = float((a - b).abs().max())
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


# -- models of the test matrix ------------------------------------------------------------------


def make_case(name: str, dtype=torch.float32, batch: int = 6):
    """(model, optimizer-params builder, x, y, loss_fn) for a named model of the test matrix."""
    g = torch.Generator().manual_seed(1)
    if name in ("mlp", "frozen", "groups"):
        model = MLP([10, 16, 16, 4])
        x = torch.randn(batch, 10, generator=g)
        y = torch.randint(0, 4, (batch,), generator=g)
        loss_fn = ce
        if name == "frozen":
            for p in model[0].parameters():
                p.requires_grad_(False)
    elif name == "cnn":
        model = SmallCNN(3, (4, 6), hidden=12, num_classes=5, image_size=8)
        x = torch.randn(batch, 3, 8, 8, generator=g)
        y = torch.randint(0, 5, (batch,), generator=g)
        loss_fn = ce
    elif name in ("gpt", "tied"):
        model = CharGPT(vocab=13, block_size=8, d=16, layers=2, heads=2, tied=(name == "tied"))
        x = torch.randint(0, 13, (batch, 8), generator=g)
        y = torch.randint(0, 13, (batch, 8), generator=g)
        loss_fn = sequence_losses
    else:
        raise KeyError(name)
    model = model.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    return model, x, y, loss_fn


def make_optimizer(name: str, model: nn.Module, lr: float = 0.0):
    if name == "groups":
        return torch.optim.SGD(
            [
                {"params": model[0].parameters(), "lr": lr},
                {"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": lr},
            ],
            lr=lr,
        )
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


MODELS = ["mlp", "cnn", "gpt", "tied", "frozen", "groups"]
