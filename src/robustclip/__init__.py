"""robustclip: robust and fast training via gradient clipping, for any torch.optim optimizer.

The public API is what this module exports; everything in underscored modules is private.

* :class:`Clipper` drives an optimizer with a gradient method.
* Sample-level estimators: :func:`mean`, :func:`per_sample_clip`, :func:`per_sample_normalize`,
  :func:`micro_batch_clip`; write your own by subclassing :class:`Estimator` (it reports a
  :class:`Contribution`).
* Batch-level transforms: :func:`clip_by_global_norm`, :func:`clip_by_tensor_norm`,
  :func:`normalize`, :func:`l0l1_warmup`, :func:`spectral_clip`, composed with :func:`chain`.
* Opt-in kernel autotuning: :mod:`robustclip.backends` (``rc.backends.autotune = True``).
* Thresholds for every clipping radius: :mod:`robustclip.thresholds`.
* Which clipping a problem needs: :mod:`robustclip.diagnostics`.
* Per-sample losses for Hugging Face heads: :mod:`robustclip.losses`; training frameworks
  (Hugging Face Trainer, Lightning): :mod:`robustclip.integrations` (imported on demand).
"""

from robustclip import backends, diagnostics, losses, thresholds
from robustclip._batchnorm import convert_batchnorm_to_groupnorm
from robustclip._clipper import Clipper, StepInfo
from robustclip._estimators import (
    Contribution,
    Estimator,
    mean,
    micro_batch_clip,
    per_sample_clip,
    per_sample_normalize,
)
from robustclip._method import Method, chain
from robustclip._norm_transforms import (
    clip_by_global_norm,
    clip_by_tensor_norm,
    l0l1_warmup,
    normalize,
)
from robustclip._spectral import spectral_clip
from robustclip._transform import GradientTransform, StepContext, identity
from robustclip.per_sample import PerSampleFallbackWarning
from robustclip.per_sample._explain import explain

__version__ = "0.1.0"

__all__ = [
    "Clipper",
    "Contribution",
    "Estimator",
    "GradientTransform",
    "Method",
    "PerSampleFallbackWarning",
    "StepContext",
    "StepInfo",
    "backends",
    "chain",
    "clip_by_global_norm",
    "clip_by_tensor_norm",
    "convert_batchnorm_to_groupnorm",
    "diagnostics",
    "explain",
    "identity",
    "l0l1_warmup",
    "losses",
    "mean",
    "micro_batch_clip",
    "normalize",
    "per_sample_clip",
    "per_sample_normalize",
    "spectral_clip",
    "thresholds",
]
