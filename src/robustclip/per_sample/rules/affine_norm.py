"""Normalisation layers that are not torch's own (``LlamaRMSNorm``, ``T5LayerNorm``, Gemma's
``1 + weight`` scale, a hand-written LayerNorm): one rule for every module whose parameters
scale (and shift) a normalised input elementwise over its last dimension.

Such a module computes ``y = a(x) + sum_k p_k * n_k(x)`` with each parameter ``p_k`` of shape
``(C,)`` broadcast over the last dimension (``C``) and ``a``, ``n_k`` functions of one sample's
input alone (for ``y = w * xhat + b``: ``a = 0``, ``n_w = xhat``, ``n_b = 1``). Then, per
sample, ``grad p_{k,i} = sum_t G_{i,t} * n_k(x_{i,t})``, summed over the positions ``t``. The
rule recomputes ``n_k = f(e_k) - f(0)`` from the recorded input with the module's own forward
(``torch.func.functional_call`` with the parameters replaced: ``e_k`` sets ``p_k`` to ones and
the others to zero), batched, one or two calls per trainable parameter; ``f(0)`` is skipped for
modules where it is identically zero, and a parameter that is a pure shift (``n_k = 1``) needs
no call at all.

Which modules qualify: the structure first (:func:`is_affine_norm`: a class of another library
whose name says it normalises and not over the batch, no child modules, no buffers, one or two
parameters, all of the same shape ``(C,)``), then, once per module when the engine attaches, a
numerical check on a random ``(B, T, C)`` input (:func:`affine_norm_form`): the output is
affine and elementwise in the parameters at a random point, and each sample's output does not
depend on the other samples. A module that fails the check takes the per-module fallback with
the reason.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from robustclip.per_sample._engine import acc_dtype
from robustclip.per_sample.rules import DenseTerm, Term, register_match
from robustclip.per_sample.rules._util import sum_positions


def is_affine_norm(module: nn.Module) -> bool:
    """The structure of an elementwise-affine normalisation layer (the numbers are checked by
    :func:`affine_norm_form`)."""
    cls = type(module)
    name = cls.__name__.lower()
    if cls.__module__.split(".")[0] == "torch" or "norm" not in name or "batch" in name:
        return False  # torch's own layers have their own rules (or mix samples: BatchNorm)
    if next(module.children(), None) is not None or next(module.buffers(recurse=False), None) is not None:
        return False  # submodules, or running statistics
    params = list(module.parameters(recurse=False))
    return 1 <= len(params) <= 2 and all(p.dim() == 1 and p.shape == params[0].shape for p in params)


@dataclass(frozen=True)
class AffineForm:
    """What the check learned of a module: whether ``f(0)`` vanishes, and its pure shifts."""

    offset_is_zero: bool
    shifts: frozenset[str]


_FORMS: weakref.WeakKeyDictionary[nn.Module, AffineForm] = weakref.WeakKeyDictionary()


def _call(module: nn.Module, values: dict[str, Tensor], x: Tensor) -> Tensor:
    out = functional_call(module, values, (x,))
    if not isinstance(out, Tensor) or out.shape != x.shape:
        raise ValueError(f"its output is not a tensor of its input's shape {tuple(x.shape)}")
    return out


def _basis(module: nn.Module, which: str | None) -> dict[str, Tensor]:
    return {
        n: torch.ones_like(p) if n == which else torch.zeros_like(p)
        for n, p in module.named_parameters(recurse=False)
    }


def affine_norm_form(module: nn.Module) -> AffineForm | str:
    """Check on a random input that ``module`` has the form of the module docstring; the form,
    or why not."""
    params = dict(module.named_parameters(recurse=False))
    p0 = next(iter(params.values()))
    c = p0.shape[0]
    dt = p0.dtype if p0.is_floating_point() else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(3, 2, c, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dt).to(p0.device)
    point = {n: (torch.randn(c, generator=gen, dtype=torch.float64) + 1).to(p.dtype).to(p.device) for n, p in params.items()}
    try:
        with torch.no_grad():
            y0 = _call(module, _basis(module, None), x)
            ns = {n: _call(module, _basis(module, n), x) - y0 for n in params}
            y = _call(module, point, x)
            alone = _call(module, point, x[1:2])
    except Exception as e:  # noqa: BLE001 - any failure means: not this form
        return f"it does not run as an elementwise-affine norm on a (B, T, {c}) input ({e})"
    scale = float(y.abs().max()) + 1.0
    tol = 1e-3 if dt in (torch.float16, torch.bfloat16) else 1e-5
    expected = y0 + sum(point[n] * ns[n] for n in params)
    if float((y - expected).abs().max()) > tol * scale:
        return "its output is not affine and elementwise (over the last dimension) in its parameters"
    if float((alone - y[1:2]).abs().max()) > tol * scale:
        return "each sample's output depends on the other samples of the batch"
    shifts = frozenset(n for n, v in ns.items() if bool((v == 1).all()))
    return AffineForm(bool((y0 == 0).all()), shifts)


def _unsupported(module: nn.Module) -> str | None:
    form = affine_norm_form(module)
    if isinstance(form, str):
        return form
    _FORMS[module] = form
    return None


@register_match("elementwise-affine norm", is_affine_norm, _unsupported)
def affine_norm_terms(module: nn.Module, x: Tensor, grad_out: Tensor, names: frozenset[str]) -> dict[str, Term]:
    form = _FORMS.get(module)
    if form is None:
        why = _unsupported(module)
        if why:
            raise RuntimeError(f"robustclip: {type(module).__name__} is no longer an elementwise-affine norm: {why}")
        form = _FORMS[module]
    b = grad_out.shape[0]
    c = next(iter(module.parameters(recurse=False))).shape[0]
    if grad_out.shape[-1] != c:
        raise RuntimeError(
            f"robustclip: {type(module).__name__} was called on an input whose last dimension is "
            f"{grad_out.shape[-1]}, not its {c} parameters: the rule for elementwise-affine norms "
            "needs the normalised dimension last."
        )
    dt = acc_dtype(grad_out.dtype)
    g = grad_out.reshape(b, -1, c).to(dt)
    terms: dict[str, Term] = {}
    with torch.no_grad():
        y0 = None if form.offset_is_zero else _call(module, _basis(module, None), x)
        for n in sorted(names):
            if n in form.shifts:
                terms[n] = DenseTerm(sum_positions(g))
                continue
            nk = _call(module, _basis(module, n), x)
            if y0 is not None:
                nk = nk - y0
            terms[n] = DenseTerm(sum_positions(g * nk.reshape(b, -1, c).to(dt)))
    return terms
