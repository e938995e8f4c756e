"""``nn.Linear`` on inputs of any rank ``(B, *, in)``.

Per sample, with the positions ``*`` flattened to ``T``: ``grad W_i = G_i^T A_i``, a sum of
``T`` outer products (``u`` = output gradient, ``v`` = input), and ``grad b_i = sum_t G_{i,t}``.
For 2-D inputs (``T = 1``) the ghost norm is the product ``||G_i||^2 ||A_i||^2`` (Goodfellow,
arXiv:1510.01799); for sequences the engine picks the Gram form or materialisation by cost.
"""

from __future__ import annotations

from torch import Tensor, nn

from robustclip.per_sample.rules import register
from robustclip.per_sample.rules._terms import DenseTerm, OuterTerm, Term
from robustclip.per_sample.rules._util import sum_positions


@register(nn.Linear)
def linear_terms(module: nn.Linear, x: Tensor, grad_out: Tensor, names: frozenset) -> dict[str, Term]:
    b = grad_out.shape[0]
    g = grad_out.reshape(b, 1, -1, module.out_features)
    terms: dict[str, Term] = {}
    if "weight" in names:
        a = x.reshape(b, 1, -1, module.in_features)
        terms["weight"] = OuterTerm(g, a, module.out_features, module.weight.shape, grad_out.dtype)
    if "bias" in names:
        terms["bias"] = DenseTerm(sum_positions(g.reshape(b, -1, module.out_features)))
    return terms
