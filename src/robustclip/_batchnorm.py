"""BatchNorm and per-sample methods, and the conversion to GroupNorm."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def training_batchnorms(model: nn.Module) -> list[str]:
    """Names of BatchNorm modules in training mode (they mix samples)."""
    return [n or "<root>" for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]


def check_no_training_batchnorm(model: nn.Module, method: str) -> None:
    names = training_batchnorms(model)
    if names:
        raise ValueError(
            f"{method} needs per-sample gradients, but the model has BatchNorm in training mode "
            f"({', '.join(names[:5])}{'...' if len(names) > 5 else ''}). BatchNorm normalizes "
            "each sample with statistics of the whole batch, so a sample's loss depends on every "
            "other sample and its 'own' gradient is undefined. Convert the layers with "
            "model = robustclip.convert_batchnorm_to_groupnorm(model), which keeps the same "
            "channels and learned per-channel scale and shift, or put BatchNorm in eval mode (frozen statistics)."
        )


def convert_batchnorm_to_groupnorm(model: nn.Module, num_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d in ``model`` by a GroupNorm over the same channels.

    Each GroupNorm uses ``gcd(num_groups, C)`` groups, so it always divides the ``C`` channels,
    and keeps the BatchNorm's affine parameters (scale and shift per channel). The running
    statistics have no GroupNorm counterpart and are dropped. Returns the model (changed in place; a BatchNorm
    given as the model itself is returned as its replacement). GroupNorm normalizes within a
    sample, so per-sample gradients are well defined.
    """
    if isinstance(model, _BatchNorm):
        return _to_groupnorm(model, num_groups)
    for name, child in model.named_children():
        if isinstance(child, _BatchNorm):
            setattr(model, name, _to_groupnorm(child, num_groups))
        else:
            convert_batchnorm_to_groupnorm(child, num_groups)
    return model


def _to_groupnorm(bn: _BatchNorm, num_groups: int) -> nn.GroupNorm:
    c = bn.num_features
    gn = nn.GroupNorm(math.gcd(num_groups, c), c, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        gn = gn.to(device=bn.weight.device, dtype=bn.weight.dtype)
        # keep what a pretrained BatchNorm learned: same per-channel scale and shift
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    return gn
