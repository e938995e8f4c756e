"""Hugging Face's ``Conv1D`` (GPT-2, GPT, ...): a Linear layer with its weight stored transposed.

``y = x @ W + b`` with ``W`` of shape ``(in, out)``. Per sample, with the positions flattened to
``T``: ``grad W_i = A_i^T G_i``, a sum of ``T`` outer products (``u`` = input, ``v`` = output
gradient: the Linear term with its factors swapped), and ``grad b_i = sum_t G_{i,t}``.

The class is recognised without importing ``transformers``: a class named ``Conv1D`` defined in a
``transformers`` module, whose ``weight`` has shape ``(nx, nf)`` and whose ``bias`` (if any)
has shape ``(nf,)``. A subclass counts only if it keeps that class's ``forward``.
"""

from __future__ import annotations

from torch import Tensor, nn

from robustclip.per_sample.rules import DenseTerm, OuterTerm, Term, register_match
from robustclip.per_sample.rules._util import sum_positions


def _hf_conv1d_class(module: nn.Module) -> type | None:
    for cls in type(module).__mro__:
        if cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers":
            return cls
    return None


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is (a forward-keeping subclass of) ``transformers``' ``Conv1D``."""
    cls = _hf_conv1d_class(module)
    if cls is None or type(module).forward is not getattr(cls, "forward", None):
        return False
    w, b, nf = getattr(module, "weight", None), getattr(module, "bias", None), getattr(module, "nf", None)
    if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[1] != nf:
        return False
    return b is None or (isinstance(b, Tensor) and tuple(b.shape) == (nf,))


def _bias_source(module: nn.Module, names: frozenset[str]) -> str | None:
    # as for nn.Linear (rules/linear.py): addmm's backward computes the bias gradient alone
    return "bias" if isinstance(getattr(module, "bias", None), Tensor) and "bias" in names else None


@register_match("Conv1D", is_hf_conv1d, source_param=_bias_source)
def hf_conv1d_terms(module: nn.Module, x: Tensor, grad_out: Tensor, names: frozenset[str]) -> dict[str, Term]:
    b = grad_out.shape[0]
    weight = module.weight
    assert isinstance(weight, Tensor)
    n_in, n_out = weight.shape
    g = grad_out.reshape(b, 1, -1, n_out)
    terms: dict[str, Term] = {}
    if "weight" in names:
        a = x.reshape(b, 1, -1, n_in)
        terms["weight"] = OuterTerm(a, g, n_in, weight.shape, grad_out.dtype)
    if "bias" in names:
        terms["bias"] = DenseTerm(sum_positions(g.reshape(b, -1, n_out)))
    return terms
