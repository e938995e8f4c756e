"""``nn.RMSNorm``: per sample, ``grad gamma_i = sum_t G_{i,t} * x_{i,t} / rms(x_{i,t})``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from robustclip.per_sample._engine import acc_dtype
from robustclip.per_sample.rules import Term, register
from robustclip.per_sample.rules.layer_norm import affine_norm_terms


@register(nn.RMSNorm)
def rms_norm_terms(module: nn.RMSNorm, x: Tensor, grad_out: Tensor, names: frozenset[str]) -> dict[str, Term]:
    shape = tuple(module.normalized_shape)
    xhat = F.rms_norm(x.to(acc_dtype(x.dtype)), shape, None, module.eps) if "weight" in names else None
    return affine_norm_terms(xhat, grad_out, shape, names)
