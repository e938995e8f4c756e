"""``nn.LayerNorm``: per sample, ``grad gamma_i = sum_t G_{i,t} * xhat_{i,t}`` and
``grad beta_i = sum_t G_{i,t}``, with ``xhat`` the normalised input recomputed from the input
(one normalisation pass; cheaper than keeping it). Both are ``(B, *normalized_shape)``: small
enough to materialise.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from robustclip.per_sample._engine import acc_dtype
from robustclip.per_sample.rules import DenseTerm, Term, register
from robustclip.per_sample.rules._util import sum_positions


def affine_norm_terms(xhat: Tensor | None, grad_out: Tensor, tail: tuple[int, ...], names: frozenset[str]) -> dict[str, Term]:
    """Terms of ``y = xhat * weight + bias`` with ``weight``/``bias`` of shape ``tail``,
    broadcast over the positions between the batch and ``tail``."""
    b = grad_out.shape[0]
    g = grad_out.reshape(b, -1, *tail)
    terms: dict[str, Term] = {}
    if "weight" in names:
        assert xhat is not None
        dt = acc_dtype(g.dtype)
        terms["weight"] = DenseTerm(sum_positions(g.to(dt) * xhat.reshape(g.shape).to(dt)))
    if "bias" in names:
        terms["bias"] = DenseTerm(sum_positions(g))
    return terms


@register(nn.LayerNorm)
def layer_norm_terms(module: nn.LayerNorm, x: Tensor, grad_out: Tensor, names: frozenset[str]) -> dict[str, Term]:
    shape = tuple(module.normalized_shape)
    # normalised in float32 at least, as autocast runs layer_norm
    xhat = F.layer_norm(x.to(acc_dtype(x.dtype)), shape, None, None, module.eps) if "weight" in names else None
    return affine_norm_terms(xhat, grad_out, shape, names)
