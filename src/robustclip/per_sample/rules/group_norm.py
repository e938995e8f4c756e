"""``nn.GroupNorm``: per sample, ``grad gamma_{i,c} = sum_p G_{i,c,p} * xhat_{i,c,p}`` over the
spatial positions ``p``, ``grad beta_{i,c} = sum_p G_{i,c,p}``. GroupNorm normalises within a
sample, which is why it is the per-sample-safe replacement of BatchNorm.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from robustclip.per_sample._engine import acc_dtype
from robustclip.per_sample.rules import DenseTerm, Term, register
from robustclip.per_sample.rules._util import sum_positions


@register(nn.GroupNorm)
def group_norm_terms(module: nn.GroupNorm, x: Tensor, grad_out: Tensor, names: frozenset[str]) -> dict[str, Term]:
    b, c = grad_out.shape[0], module.num_channels
    g = grad_out.reshape(b, c, -1).transpose(1, 2)  # (B, positions, C)
    terms: dict[str, Term] = {}
    if "weight" in names:
        dt = acc_dtype(g.dtype)
        xhat = F.group_norm(x.to(dt), module.num_groups, None, None, module.eps)
        terms["weight"] = DenseTerm(sum_positions(g.to(dt) * xhat.reshape(b, c, -1).transpose(1, 2)))
    if "bias" in names:
        terms["bias"] = DenseTerm(sum_positions(g))
    return terms
