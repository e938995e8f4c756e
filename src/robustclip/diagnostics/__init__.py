"""Diagnostics: measure the gradient noise and say which clipping a problem needs, and why.

Estimators (each a plain function, validated on problems of known answer in the tests):

* :func:`tail_index`: tail index alpha of the gradient noise (Simsekli et al., arXiv:1901.06053,
  with the estimator of Mohammadi et al. 2015); :func:`symmetric_stable` draws noise of known
  alpha to check it.
* :func:`strong_growth` / :func:`strong_growth_over` (streamed over a whole loader) /
  :func:`estimate_strong_growth` (a probe subset): the strong-growth constant rho and the
  batch size ``b >= rho`` it recommends (Vaswani et al., arXiv:1810.07288; Lobanov &
  Koloskova, arXiv:2605.14800).
* :func:`local_smoothness` and :func:`fit_l0_l1`: (L0, L1)-smoothness along the trajectory
  (Zhang et al., arXiv:1905.11881).
* :func:`layer_spectra`: top singular values per layer and the share of the spectrum they hold
  (spectral clipping, arXiv:2605.11838).
* :func:`norm_statistics`, :func:`clipped_fraction`, :func:`suggest_max_norm`,
  :func:`suggest_spectral_threshold`: per-sample norm statistics and thresholds
  (PS-Clip-SGD, arXiv:2605.02701).
* :func:`verdict`: the statistics' plain-language reading.
* :func:`diagnose`: the validated verdict: a method and its radius, chosen by a short pilot in
  which the leading candidates race on the user's own model and data (successive halving,
  within a budget), with the statistics as evidence and a confidence.

From a training loop, :class:`Diagnostics` collects the statistics in a few lines; the command
``robustclip diagnose EXPERIMENT --out DIR`` runs :func:`diagnose` on a built-in experiment.
"""

from robustclip.diagnostics._diagnose import Diagnosis, diagnose
from robustclip.diagnostics._gradients import (
    CountSketch,
    GaussianSketch,
    ProbeGradients,
    per_sample_gradients,
    probe_gradients,
)
from robustclip.diagnostics._growth import (
    StrongGrowth,
    estimate_strong_growth,
    strong_growth,
    strong_growth_over,
)
from robustclip.diagnostics._norms import (
    NormStatistics,
    clipped_fraction,
    norm_statistics,
    suggest_max_norm,
    suggest_spectral_threshold,
)
from robustclip.diagnostics._smoothness import L0L1Fit, LocalSmoothness, fit_l0_l1, local_smoothness
from robustclip.diagnostics._spectrum import LayerSpectrum, gradient_matrices, layer_spectra
from robustclip.diagnostics._tail import MIN_TAIL_SAMPLES, TailIndex, symmetric_stable, tail_index
from robustclip.diagnostics._tracker import Diagnostics, EpochRecord, ProbeRecord
from robustclip.diagnostics._verdict import Verdict, verdict

__all__ = [
    "MIN_TAIL_SAMPLES",
    "CountSketch",
    "Diagnosis",
    "Diagnostics",
    "EpochRecord",
    "GaussianSketch",
    "L0L1Fit",
    "LayerSpectrum",
    "LocalSmoothness",
    "NormStatistics",
    "ProbeGradients",
    "ProbeRecord",
    "StrongGrowth",
    "TailIndex",
    "Verdict",
    "clipped_fraction",
    "diagnose",
    "estimate_strong_growth",
    "fit_l0_l1",
    "gradient_matrices",
    "layer_spectra",
    "local_smoothness",
    "norm_statistics",
    "per_sample_gradients",
    "probe_gradients",
    "strong_growth",
    "strong_growth_over",
    "suggest_max_norm",
    "suggest_spectral_threshold",
    "symmetric_stable",
    "tail_index",
    "verdict",
]
