"""Who owns ``p.grad``: the tensors an estimator writes as a step's gradients.

From the first ``backward()`` of a step to ``step()``, the clipper owns ``p.grad``: estimators
add sums into a list ``out`` aligned with the parameters, where a ``None`` entry means "no
gradient yet this step". The first contribution then *becomes* the gradient instead of being
added to a zero-filled buffer, which saves a pass over new memory and a temporary the size of
the model. This module holds the rules that keep that safe:

* :func:`new_grad`: a value nothing else references, laid out like its parameter;
* :func:`gradients`: a micro-batch's gradients, written by autograd straight into ``p.grad``
  where that is allowed (:func:`direct_grads`), else from ``torch.autograd.grad``;
* :func:`add_into`: ``out += coef * values``, taking ownership of what may be owned;
* :func:`fill_missing`: zeros for code that only adds;
* :func:`count_coefficient`: a batch size as the coefficient that turns a mean into a sum;
* :func:`drop_if_nonfinite`: a micro-batch's gradients zeroed when they are not finite, in
  place where they are owned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from robustclip._math import holds_integer

__all__ = [
    "add_into",
    "all_finite",
    "autograd_grads",
    "count_coefficient",
    "direct_grads",
    "drop_if_nonfinite",
    "fill_missing",
    "gradients",
    "new_grad",
]


def new_grad(p: Tensor, value: Tensor | None = None) -> Tensor:
    """``value`` (a tensor nothing else references) as ``p``'s new gradient: in ``p``'s dtype
    and laid out like ``p``, copied only if it is not; zeros if ``value`` is None."""
    if value is None:
        return torch.zeros_like(p)
    value = value.to(p.dtype).reshape(p.shape)
    if value.stride() != p.stride():
        value = torch.empty_like(p).copy_(value)
    return value


def fill_missing(out: list[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    """Zeros, in place, for the entries of ``out`` that have no gradient yet (``None``); for
    code that only adds into ``out``."""
    filled: list[Tensor] = []
    for i, (o, p) in enumerate(zip(out, params)):
        if o is None:
            out[i] = o = torch.zeros_like(p)
        filled.append(o)
    return filled


def autograd_grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``d loss / d params`` from ``torch.autograd.grad``, zeros for what the loss does not
    reach. Not ``backward()``: the estimator owns accumulation, and DDP's reducer hooks stay
    silent (the clipper all-reduces once per step itself)."""
    gs = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def direct_grads(
    loss: Tensor, params: Sequence[Tensor], allowed: bool, out: Sequence[Tensor | None]
) -> list[Tensor] | None:
    """The first gradient of a step written by autograd into ``p.grad`` (as a plain
    ``backward()`` does), or ``None`` where that is not allowed, so the caller falls back to
    :func:`autograd_grads`. The caller may change the returned tensors in place: autograd's
    accumulation copies a gradient another reference holds (a tensor hook, another parameter),
    and what it keeps as a view into a larger buffer (a parameter used through ``torch.cat`` or
    ``view``, whose buffer a hook may hold) is copied here. A copy of every gradient would be
    one more pass over new memory, which costs more than the pass itself.

    Not allowed: when the clipper forbids it (``allowed`` False:
    ``ParamLayout.direct_backward``, off under DDP), whenever a process group is initialized (a
    distributed wrapper's hooks on the accumulation would reduce the unclipped gradient), after
    an earlier contribution, and with post-accumulate hooks, which would see an unclipped
    gradient."""
    if not allowed or any(o is not None for o in out):
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    if any(p.grad is not None or getattr(p, "_post_accumulate_grad_hooks", None) for p in params):
        return None
    loss.backward(inputs=list(params))
    grads = []
    for p in params:
        g = p.grad
        if g is None:
            g = torch.zeros_like(p)
        elif g.storage_offset() != 0 or g.untyped_storage().nbytes() != g.numel() * g.element_size():
            g = g.clone()  # shares a buffer with other tensors
        grads.append(g)
    return grads


def gradients(
    loss: Tensor, params: Sequence[Tensor], direct: bool, out: Sequence[Tensor | None]
) -> tuple[list[Tensor], bool]:
    """The gradients of ``loss``, and whether they are tensors of the clipper's own
    (:func:`direct_grads`, tried when ``direct``) rather than autograd's results, which others
    may hold."""
    own = direct_grads(loss, params, direct, out)
    return (own, True) if own is not None else (autograd_grads(loss, params), False)


def add_into(
    out: list[Tensor | None],
    values: Sequence[Tensor],
    params: Sequence[Tensor],
    coef: Tensor | None = None,
    owned: bool = False,
) -> None:
    """``out += coef * values`` (``coef`` 1 if None), fused over the entries that exist; a
    ``None`` entry gets a new tensor, laid out like its parameter, or, if the values are
    ``owned`` (see :func:`gradients`), the value itself, scaled where it is."""
    have = [(o, values[i]) for i, o in enumerate(out) if o is not None]
    if have:
        dst, src = [o for o, _ in have], [v for _, v in have]
        if coef is None:
            torch._foreach_add_(dst, src)
        else:
            torch._foreach_addcmul_(dst, src, [coef] * len(src))
    missing = [i for i, o in enumerate(out) if o is None]
    if not missing:
        return
    todo = [values[i] for i in missing]
    if owned:  # tensors of our own, laid out like their parameters: scaled where they are
        if coef is not None:
            torch._foreach_mul_(todo, coef)
        for i, v in zip(missing, todo):
            out[i] = v
        return
    # new tensors, not autograd's results themselves: a gradient hook may hold those, and
    # autograd may hand one tensor to two parameters
    new = torch._foreach_mul(todo, coef) if coef is not None else [v.clone() for v in todo]
    for i, v in zip(missing, new):
        out[i] = new_grad(params[i], v)


def count_coefficient(count: int, like: Tensor) -> Tensor | None:
    """``count`` as a 0-d coefficient for gradients like ``like`` (None for 1): in their dtype
    where it holds the integer exactly, else in float32 (257 is not exact in bfloat16)."""
    if count == 1:
        return None
    dtype = like.dtype
    if not holds_integer(dtype, count):
        dtype = torch.promote_types(dtype, torch.float32)
    return torch.full((), count, dtype=dtype, device=like.device)


def all_finite(g: Sequence[Tensor]) -> Tensor:
    """0-d bool: every entry of every tensor is finite (one pass; the largest magnitude cannot
    overflow where a norm could, and a NaN propagates through it)."""
    nonempty = [t for t in g if t.numel()]
    if not nonempty:
        return torch.ones((), dtype=torch.bool, device=g[0].device if g else None)
    return torch.stack([torch.isfinite(n) for n in torch._foreach_norm(nonempty, math.inf)]).all()


def drop_if_nonfinite(
    g: list[Tensor], owned: bool, ok: Tensor, check: bool = True
) -> tuple[list[Tensor], bool, Tensor]:
    """A micro-batch's gradient, all zeros unless ``ok`` and (``check``) every entry is finite:
    zeroed, not multiplied by 0 (``NaN * 0`` is NaN). Returns the gradients, whether they are
    owned (see :func:`gradients`), and the (1,) dropped mask. No host read."""
    if check:
        ok = ok & all_finite(g)
    bad = ~ok
    if owned:  # our own tensors: zeroed in place
        for t in g:
            t.masked_fill_(bad, 0)
        return g, True, bad.reshape(1)
    return [t.masked_fill(bad, 0) for t in g], False, bad.reshape(1)
