"""The two formulas every clipping method shares: the global norm and the clip coefficient.

The floor below the estimators, the norm transforms and spectral clipping, so that none of them
imports another for its arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from robustclip import _kernels

__all__ = ["clip_coefficient", "global_norm"]


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of the concatenation of ``tensors``, in float32 or wider, without a host sync
    (:func:`robustclip._kernels.sum_of_squares`)."""
    if len(tensors) == 0:
        return torch.zeros(())
    return _kernels.sum_of_squares(list(tensors)).sqrt()


def clip_coefficient(norm: Tensor, radius: Tensor) -> Tensor:
    """``min(1, radius/norm)``, equal to 1 at ``norm = 0`` and NaN only if ``norm`` is NaN.

    No coefficient is tested on the host (``if coef < 1`` would sync with the device): the
    gradient is multiplied by the clamped coefficient, as ``torch.nn.utils.clip_grad_norm_``
    does."""
    return (radius / norm).clamp(max=1.0)
