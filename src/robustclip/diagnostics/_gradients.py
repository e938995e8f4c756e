"""Gradients on a probe set: the mean gradient, per-sample norms, and per-sample vectors.

Two quantities need different machinery:

* the strong-growth constant and the norm statistics need the *mean* gradient and every
  sample's *norm*. A per-sample engine (``robustclip.per_sample``) gives both in one pass with
  unit weights, without holding any per-sample gradient;
* the tail index needs the noise *vectors* ``X_j = g_j - gbar``. They are materialised a chunk
  of samples at a time with ``torch.func.vmap(grad(...))`` and, when the model is large,
  compressed at once by a fixed random linear sketch ``S`` (``d >> k``), so the probe holds
  ``N x k`` numbers instead of ``N x d``. Because ``S`` is linear and fixed, ``S X_j`` are the
  sketched noise vectors, and sums of sketched vectors are sketched sums: the tail-index
  estimator is exactly as unbiased on strictly stable noise after the sketch as before.

The probe runs in eval mode (dropout off, BatchNorm on running statistics), which makes every
sample's gradient well defined; the model's mode is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from robustclip.per_sample import ENGINES, ParamLayout, PerSampleEngine
from robustclip.per_sample._engine import auto_engine, unwrap_model

__all__ = [
    "ProbeGradients",
    "probe_gradients",
    "stream_gradients",
    "per_sample_gradients",
    "GaussianSketch",
    "CountSketch",
    "make_sketch",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _check_probe(model: object, loss_fn: object, inputs: object, targets: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise TypeError(
            "loss_fn must be callable as loss_fn(outputs, targets) -> per-sample losses of shape "
            f"(B,), got {type(loss_fn).__name__}."
        )
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"the probe {name} must be a torch.Tensor, got {type(t).__name__}.")
    assert isinstance(inputs, Tensor) and isinstance(targets, Tensor)
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"the probe inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must share "
            "their first dimension (the number of samples)."
        )
    if inputs.shape[0] < 2:
        raise ValueError(
            f"the probe set has {inputs.shape[0]} sample(s); gradient statistics need at least 2 "
            "(the tail index at least 16). Pass more probe samples."
        )


def _trainable(model: nn.Module, names: Sequence[str] | None) -> tuple[list[str], list[Tensor]]:
    """Trainable parameters (optionally restricted to some modules), in registration order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if names is not None:
        wanted = list(names)
        mods = {m for m, _ in model.named_modules()}
        unknown = [m for m in wanted if m not in mods]
        if unknown:
            raise ValueError(
                f"layers {unknown} are not modules of the model; pass module paths such as "
                f"{[m for m, _ in model.named_modules() if m][:5]}."
            )
        named = [
            (n, p)
            for n, p in named
            if any(n == m or n.startswith(m + ".") or m == "" for m in wanted)
        ]
    if not named:
        raise ValueError("no trainable parameters to probe (all frozen, or layers selects none).")
    return [n for n, _ in named], [p for _, p in named]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the probe (well-defined per-sample gradients), then the old modes back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass
class ProbeGradients:
    """Gradients of the probe set at the current parameters.

    Attributes:
        mean_grad: ``(1/N) sum_i g_i``, one tensor per parameter of ``params``.
        params: the parameters the gradients refer to.
        per_sample_norms: ``||g_i||`` over all of ``params``, shape ``(N,)``, float64 on the host.
        loss: the mean probe loss.
    """

    mean_grad: list[Tensor]
    params: list[Tensor]
    per_sample_norms: Tensor
    loss: float

    @property
    def grad_norm(self) -> float:
        """``||(1/N) sum_i g_i||``."""
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in self.mean_grad))



def _unit_weight_engine(
    model: nn.Module, engine: str
) -> tuple[nn.Module, list[Tensor], PerSampleEngine, torch.device, list[Tensor], list[Tensor | None]]:
    """The per-sample engine a probe runs with unit weights: the unwrapped model, its trainable
    parameters, the engine, the device, and zero buffers for the summed gradient (also as the
    ``list[Tensor | None]`` that ``accumulate`` takes: it fills only None entries and adds into
    the rest, so the buffers stay tensors)."""
    if engine == "auto":
        engine = auto_engine(ENGINES)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {['auto', *sorted(ENGINES)]}.")
    base = unwrap_model(model)
    _, params = _trainable(base, None)
    layout = ParamLayout.build(base, params)
    eng = ENGINES[engine](base, layout)
    out = [torch.zeros_like(p) for p in params]
    return base, params, eng, _device_of(base), out, cast(list[Tensor | None], out)

def probe_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    engine: str = "auto",
    chunk_size: int = 256,
) -> ProbeGradients:
    """The mean gradient and every per-sample gradient norm on a probe set, in one pass.

    Runs a robustclip per-sample engine with unit weights: it adds ``sum_i g_i`` into a zero
    buffer and returns the per-sample norms, holding no per-sample gradient (arXiv:2605.02701
    tracks these norms; arXiv:2605.14800 builds the strong-growth estimate from them).

    Args:
        model: the model; run in eval mode for the probe.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses.
        inputs, targets: the probe set (first dimension = samples).
        engine: ``"auto"`` (the fastest registered), ``"vmap"``, ``"hooks"`` or ``"loop"``.
        chunk_size: samples per forward pass.
    """
    _check_probe(model, loss_fn, inputs, targets)
    base, params, eng, dev, out, out_slots = _unit_weight_engine(model, engine)
    norms: list[Tensor] = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    n = inputs.shape[0]
    with eval_mode(base), torch.enable_grad():
        eng.attach()
        try:
            for s in range(0, n, chunk_size):
                xb = inputs[s : s + chunk_size].to(dev)
                yb = targets[s : s + chunk_size].to(dev)
                losses = _check_losses(loss_fn(base(xb), yb), xb.shape[0])
                loss_sum += losses.detach().double().sum()
                gn = eng.accumulate(losses, lambda sq: torch.ones_like(sq[:1]), out_slots)
                norms.append(gn.double().pow(2).sum(0).sqrt())
        finally:
            eng.detach()
    mean = [o / n for o in out]
    return ProbeGradients(mean, params, torch.cat(norms).cpu(), float(loss_sum) / n)


def stream_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    engine: str = "auto",
) -> ProbeGradients:
    """:func:`probe_gradients` over every batch of an iterable (a ``DataLoader``), streamed.

    Memory is one gradient-sized buffer plus one float per sample, whatever the data set's
    size: the per-sample engine adds each batch's ``sum_i g_i`` into the buffer and returns
    the batch's per-sample norms. This is the finite sum over all N training points on which
    Lobanov & Koloskova (arXiv:2605.14800) estimate ``rho`` each epoch.

    Args:
        model: the model; run in eval mode here.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses.
        batches: an iterable of ``(inputs, targets)`` pairs (e.g. a ``DataLoader``); iterated
            once.
        engine: ``"auto"``, ``"vmap"``, ``"hooks"`` or ``"loop"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    base, params, eng, dev, out, out_slots = _unit_weight_engine(model, engine)
    norms: list[Tensor] = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    n = 0
    with eval_mode(base), torch.enable_grad():
        eng.attach()
        try:
            for batch in batches:
                if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                    raise TypeError(
                        "each batch must be a pair (inputs, targets) of tensors, got "
                        f"{type(batch).__name__}; wrap other loaders so they yield (x, y)."
                    )
                xb, yb = batch[0].to(dev), batch[1].to(dev)
                losses = _check_losses(loss_fn(base(xb), yb), xb.shape[0])
                loss_sum += losses.detach().double().sum()
                gn = eng.accumulate(losses, lambda sq: torch.ones_like(sq[:1]), out_slots)
                norms.append(gn.double().pow(2).sum(0).sqrt())
                n += xb.shape[0]
        finally:
            eng.detach()
    if n < 2:
        raise ValueError(f"the data gave {n} sample(s); gradient statistics need at least 2.")
    mean = [o / n for o in out]
    return ProbeGradients(mean, params, torch.cat(norms).cpu(), float(loss_sum) / n)


def _check_losses(losses: object, batch: int) -> Tensor:
    if not isinstance(losses, Tensor) or losses.shape != (batch,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn returned {shape}; it must return one loss per sample, shape ({batch},) "
            "(use reduction='none')."
        )
    return losses


def mean_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    params: Sequence[Tensor],
    *,
    chunk_size: int = 256,
) -> list[Tensor]:
    """``(1/N) sum_i grad f_i`` by plain autograd, in chunks (eval mode is the caller's job)."""
    dev = _device_of(model)
    n = inputs.shape[0]
    acc = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for s in range(0, n, chunk_size):
            xb = inputs[s : s + chunk_size].to(dev)
            yb = targets[s : s + chunk_size].to(dev)
            losses = _check_losses(loss_fn(model(xb), yb), xb.shape[0])
            gs = torch.autograd.grad(losses.sum(), list(params), allow_unused=True)
            for a, g in zip(acc, gs):
                if g is not None:
                    a.add_(g)
    return [a / n for a in acc]


# -- sketches ------------------------------------------------------------------------------------


class GaussianSketch:
    """``x -> S x`` with ``S`` of i.i.d. N(0, 1/k) entries: ``E||S x||^2 = ||x||^2``.

    A Johnson-Lindenstrauss map: norms of a fixed set of N vectors are kept within a factor
    ``1 +- eps`` for ``k ~ log(N)/eps^2``. ``S`` is generated once per parameter from ``seed``
    and cached: memory ``4 d k`` bytes, so it suits models up to a few million parameters for
    ``k`` in the hundreds. Larger models use :class:`CountSketch`.
    """

    def __init__(
        self, shapes: Sequence[torch.Size], k: int, *, seed: int = 0, device: torch.device | str | None = None
    ) -> None:
        self.k = int(k)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.mats = [
            (torch.randn(math.prod(s), self.k, generator=gen) / math.sqrt(self.k)).to(device)
            for s in shapes
        ]

    def __call__(self, grads: Sequence[Tensor]) -> Tensor:
        """Per-parameter per-sample gradients ``(b, *shape)`` -> sketched ``(b, k)``."""
        out = None
        for g, m in zip(grads, self.mats):
            term = g.flatten(1).to(m.dtype) @ m
            out = term if out is None else out + term
        assert out is not None
        return out


class CountSketch:
    """``x -> S x`` with one random bucket and sign per coordinate: ``E||S x||^2 = ||x||^2``.

    Each coordinate ``x_t`` is added, with a random sign, to one of ``k`` buckets (Charikar,
    Chen, Farach-Colton 2002). Memory ``O(d)`` and time ``O(d)`` per sample, for any model size;
    norms are kept in expectation with a spread that shrinks as ``1/sqrt(k)``.
    """

    def __init__(
        self, shapes: Sequence[torch.Size], k: int, *, seed: int = 0, device: torch.device | str | None = None
    ) -> None:
        self.k = int(k)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.buckets: list[Tensor] = []
        self.signs: list[Tensor] = []
        for s in shapes:
            d = math.prod(s)
            self.buckets.append(torch.randint(0, self.k, (d,), generator=gen).to(device))
            self.signs.append((torch.randint(0, 2, (d,), generator=gen) * 2 - 1).to(device))

    def __call__(self, grads: Sequence[Tensor]) -> Tensor:
        b = grads[0].shape[0]
        dtype = torch.promote_types(grads[0].dtype, torch.float32)
        out = grads[0].new_zeros((b, self.k), dtype=dtype)
        for g, idx, sg in zip(grads, self.buckets, self.signs):
            out.index_add_(1, idx, g.flatten(1).to(dtype) * sg.to(dtype))
        return out


def make_sketch(
    shapes: Sequence[torch.Size],
    k: int | None,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    gaussian_max_elements: int = 2**24,
) -> GaussianSketch | CountSketch | None:
    """The sketch the diagnostics use for ``k``: none if ``k`` is None or ``k >= d``; Gaussian
    while ``d * k <= gaussian_max_elements`` (64 MiB of float32), CountSketch above."""
    d = sum(math.prod(s) for s in shapes)
    if k is None or k >= d:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"sketch_dim must be a positive int or None, got {k!r}.")
    if d * k <= gaussian_max_elements:
        return GaussianSketch(shapes, k, seed=seed, device=device)
    return CountSketch(shapes, k, seed=seed, device=device)


def per_sample_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    layers: Sequence[str] | None = None,
    sketch_dim: int | None = 512,
    seed: int = 0,
    max_chunk_elements: int = 2**24,
) -> Tensor:
    """Every probe sample's gradient as a row, sketched to ``sketch_dim`` columns when larger.

    ``g_i = grad_theta loss_fn(model(x_i), y_i)`` for each sample, computed with
    ``torch.func.vmap`` a chunk at a time (a chunk holds at most ``max_chunk_elements``
    gradient entries) and multiplied by a fixed random sketch (:func:`make_sketch`) right away,
    so memory stays ``O(chunk x d + N x k)``. The rows feed :func:`tail_index` (arXiv:1901.06053).

    Args:
        model: the model; run in eval mode here.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)``.
        inputs, targets: the probe set.
        layers: restrict to the parameters of these modules (paths such as ``"fc1"``), e.g. one
            large layer of a big model; ``None`` uses every trainable parameter.
        sketch_dim: columns of the sketch; ``None`` keeps the exact gradients (``N x d``).
        seed: seed of the sketch (keep it fixed across probes so they are comparable).
        max_chunk_elements: memory cap per vmap chunk.

    Returns:
        a float tensor of shape ``(N, min(d, sketch_dim))`` on the model's device.
    """
    _check_probe(model, loss_fn, inputs, targets)
    base = unwrap_model(model)
    names, params = _trainable(base, layers)
    dev = _device_of(base)
    sketch = make_sketch([p.shape for p in params], sketch_dim, seed=seed, device=dev)
    diff = dict(zip(names, (p.detach() for p in params)))
    const = {n: p.detach() for n, p in base.named_parameters() if n not in diff}
    buffers = dict(base.named_buffers())

    def loss_one(vals: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(base, ({**const, **vals}, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="error")
    d = sum(p.numel() for p in params)
    chunk = max(1, max_chunk_elements // max(d, 1))
    rows = []
    with eval_mode(base):
        for s in range(0, inputs.shape[0], chunk):
            g = per_sample(diff, inputs[s : s + chunk].to(dev), targets[s : s + chunk].to(dev))
            gl = [g[n].detach() for n in names]
            rows.append(sketch(gl) if sketch is not None else torch.cat([t.flatten(1) for t in gl], 1))
    return torch.cat(rows)
