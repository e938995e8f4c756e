"""``nn.InstanceNorm1d/2d/3d`` with ``affine=True``: per sample, ``grad gamma_{i,c} = sum_p
G_{i,c,p} * xhat_{i,c,p}`` over the spatial positions ``p``, ``grad beta_{i,c} = sum_p G_{i,c,p}``.
``xhat`` is recomputed from the input: normalised by the sample's own statistics (training, or
no running statistics), or by the running statistics (evaluation with
``track_running_stats=True``), as the layer did. Instance normalisation never mixes samples.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm

from robustclip.per_sample._engine import acc_dtype
from robustclip.per_sample.rules import DenseTerm, Term, register
from robustclip.per_sample.rules._util import sum_positions


@register(nn.InstanceNorm3d)
@register(nn.InstanceNorm2d)
@register(nn.InstanceNorm1d)
def instance_norm_terms(module: _InstanceNorm, x: Tensor, grad_out: Tensor, names: frozenset[str]) -> dict[str, Term]:
    if x.dim() != module._get_no_batch_dim() + 1:
        raise RuntimeError(
            f"robustclip: {type(module).__name__} was called on an input without a batch "
            f"dimension (shape {tuple(x.shape)}); per-sample gradients need a batch."
        )
    b, c = grad_out.shape[0], module.num_features
    g = grad_out.reshape(b, c, -1).transpose(1, 2)  # (B, positions, C)
    terms: dict[str, Term] = {}
    if "weight" in names:
        dt = acc_dtype(g.dtype)
        own_stats = module.training or not module.track_running_stats
        rm, rv = (None, None) if own_stats else (module.running_mean, module.running_var)
        xhat = F.instance_norm(x.to(dt), rm, rv, None, None, own_stats, 0.0, module.eps)
        terms["weight"] = DenseTerm(sum_positions(g.to(dt) * xhat.reshape(b, c, -1).transpose(1, 2)))
    if "bias" in names:
        terms["bias"] = DenseTerm(sum_positions(g))
    return terms
