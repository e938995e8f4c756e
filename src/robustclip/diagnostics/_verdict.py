"""A plain-language verdict from the diagnostics: which clipping this problem needs, and why.

The rules are heuristics that read the estimates the way the papers motivate the methods:

* heavy-tailed noise (``alpha_hat < 1.8``) is what per-sample clipping is built for
  (Nobile & Grohs, arXiv:2605.02701; heavy tails measured as in Simsekli et al.,
  arXiv:1901.06053). 1.8 sits well below the spread of the estimate on Gaussian noise at a few
  hundred high-dimensional probe samples (about +-0.1), and above Student-t noise with 1.5
  degrees of freedom (which reads about 1.4).
* smoothness that grows with the gradient norm (``L1 ||grad f|| > L0`` at typical gradient
  norms) is what batch-level clipping and normalisation exploit (Zhang et al.,
  arXiv:1905.11881); the gradient norm where the two terms balance, ``L0/L1``, is a natural
  batch clipping radius.
* a top singular value that spikes (some value at least 3 times the median of the 20 before
  it, so a steady trend is not a spike) while the top ``r`` directions hold most of the
  gradient's energy (>= 50%) is the rank-one noise that spectral clipping removes
  (arXiv:2605.11838).
* a batch size at least ``rho_hat`` makes clipped and normalised SGD unbiased in the
  interpolation regime (Lobanov & Koloskova, arXiv:2605.14800; strong growth, Vaswani et al.,
  arXiv:1810.07288).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

import numpy as np

__all__ = ["Verdict", "verdict", "spike_ratio", "without_spikes", "HEAVY_TAIL_ALPHA", "SPIKE_RATIO", "LOW_RANK_SHARE"]

#: alpha_hat below this reads as heavy-tailed
HEAVY_TAIL_ALPHA = 1.8
#: max/median of a layer's sigma_max history at or above this reads as spiky
SPIKE_RATIO = 3.0
#: how many previous values a spike is compared with
SPIKE_WINDOW = 20
#: top-r energy share at or above this reads as low-rank
LOW_RANK_SHARE = 0.5


@dataclass(frozen=True)
class Verdict:
    """The recommendation and the reasons for it.

    Attributes:
        recommendation: ``"per_sample_clip"``, ``"spectral_clip"``, ``"clip_by_global_norm"``
            or ``"none"``.
        headline: one sentence, e.g. "the noise looks heavy-tailed (α̂ = 1.40): per-sample
            clipping is recommended (c ≈ 2.3)".
        findings: one sentence per estimate, with its number and what it means.
        snippet: a line of robustclip code that applies the recommendation ("" for none).
    """

    recommendation: str
    headline: str
    findings: list[str] = field(default_factory=list)
    snippet: str = ""

    @property
    def text(self) -> str:
        """Headline and findings as a short paragraph."""
        return " ".join([self.headline[:1].upper() + self.headline[1:] + "."] + self.findings)


def spike_ratio(history: Sequence[float], window: int = SPIKE_WINDOW) -> float | None:
    """Largest ``h[t] / median(h[t - window : t])`` over the history (needs 4 finite values).

    A ratio against the *recent* median, as the spectral paper's adaptive threshold looks at
    the last values only, so a slow drift of the gradient scale does not read as a spike.
    """
    h = np.asarray(list(history), dtype=np.float64)
    h = h[np.isfinite(h)]
    best = None
    for t in range(3, h.size):
        med = float(np.median(h[max(0, t - window) : t]))
        if med > 0:
            r = float(h[t] / med)
            best = r if best is None else max(best, r)
    return best


def without_spikes(history: Sequence[float], window: int = SPIKE_WINDOW, ratio: float = SPIKE_RATIO) -> np.ndarray:
    """The finite values of ``history`` that are not spikes: a value at or above ``ratio``
    times the median of the ``window`` finite values before it (the rule of
    :func:`spike_ratio`) is left out; the first three values are kept (no median yet).

    The radius of a method that clips spikes is read from what is left: a quantile that
    includes the spikes can land among them, and a radius at spike level clips nothing the
    method is there for.
    """
    h = np.asarray(list(history), dtype=np.float64)
    h = h[np.isfinite(h)]
    keep = np.ones(h.size, dtype=bool)
    for t in range(3, h.size):
        med = float(np.median(h[max(0, t - window) : t]))
        if med > 0 and h[t] >= ratio * med:
            keep[t] = False
    return h[keep]


def _finite(x: float | None) -> TypeGuard[float]:
    return x is not None and math.isfinite(x)


def verdict(
    *,
    tail_index: float | None = None,
    rho: float | None = None,
    batch_size: int | None = None,
    l0: float | None = None,
    l1: float | None = None,
    grad_norm: float | None = None,
    sigma_max_history: Mapping[str, Sequence[float]] | None = None,
    top_share: Mapping[str, float | None] | None = None,
    suggested_max_norm: float | None = None,
    suggested_spectral_threshold: float | None = None,
) -> Verdict:
    """Turn the estimates into a recommendation with reasons (see the module docstring).

    Every argument is optional; findings are given for what is known, and the recommendation
    goes, in this order of priority, to per-sample clipping (heavy tails), spectral clipping
    (spiky low-rank gradients), batch clipping (smoothness growing with the gradient), or none.

    Args:
        tail_index: ``alpha_hat`` (:func:`tail_index`), e.g. over the later half of training.
        rho: ``rho_hat`` (:func:`strong_growth`), the largest seen.
        batch_size: the batch size in use.
        l0, l1: the (L0, L1) fit (:func:`fit_l0_l1`).
        grad_norm: a typical full-gradient norm along training (e.g. the median at probes).
        sigma_max_history: layer -> top singular value of its gradient over training.
        top_share: layer -> share of the gradient's energy in the top r singular values.
        suggested_max_norm: the per-sample radius to quote.
        suggested_spectral_threshold: the spectral ``tau`` to quote.
    """
    findings: list[str] = []
    heavy = _finite(tail_index) and tail_index < HEAVY_TAIL_ALPHA
    if _finite(tail_index):
        kind = "heavy-tailed" if heavy else "close to Gaussian"
        findings.append(
            f"Tail index of the per-sample gradient noise: α̂ = {tail_index:.2f} (2 = Gaussian, "
            f"smaller = heavier tails; below {HEAVY_TAIL_ALPHA} reads as heavy-tailed): the noise "
            f"looks {kind}."
        )
    elif tail_index is not None:
        findings.append("The tail index could not be estimated (no spread in the noise).")

    if rho is not None:
        if not math.isfinite(rho):
            findings.append(
                "Strong growth: the mean gradient vanished while per-sample gradients did not "
                "(ρ̂ = ∞), so the strong growth condition fails at a probed point."
            )
        else:
            b_min = max(1, math.ceil(rho - 1e-9))
            line = f"Strong growth constant ρ̂ = {rho:.3g} (largest seen): batch size ≥ {b_min} "
            line += "makes clipped and normalized SGD unbiased under interpolation"
            if batch_size is not None:
                if batch_size >= rho:
                    line += f"; the batch size {batch_size} already satisfies it."
                else:
                    line += f"; the batch size {batch_size} is below it, so raise it to {b_min}."
            else:
                line += "."
            findings.append(line)

    l1_dominant = False
    batch_radius = None
    if _finite(l0) and _finite(l1):
        g = grad_norm if _finite(grad_norm) else None
        l1_dominant = bool(g is not None and l1 * g > l0)
        line = f"(L0, L1)-smoothness fit: L0 = {l0:.3g}, L1 = {l1:.3g}"
        if g is not None:
            share = "dominates" if l1_dominant else "does not dominate"
            line += f"; at the typical gradient norm {g:.3g} the L1 term {share}"
        if l1 > 0 and l0 > 0:
            batch_radius = l0 / l1
            line += f" (the terms balance at ‖∇f‖ = L0/L1 = {batch_radius:.3g})"
        findings.append(line + ".")

    spiky: list[str] = []
    if sigma_max_history:
        ratios: dict[str, float] = {}
        for name, hist in sigma_max_history.items():
            r = spike_ratio(hist)
            if r is not None:
                ratios[name] = r
        shares = {k: v for k, v in (top_share or {}).items() if _finite(v)}
        for name, r in ratios.items():
            if r >= SPIKE_RATIO and shares.get(name, 1.0) >= LOW_RANK_SHARE:
                spiky.append(name)
        if ratios:
            worst = max(ratios, key=lambda n: ratios[n])
            line = (
                f"Top singular value of the layer gradients: the largest spike is in {worst} "
                f"(σ_max up to {ratios[worst]:.2g}x the median of the {SPIKE_WINDOW} readings before it)"
            )
            if shares:
                line += f"; the top singular values hold {np.mean(list(shares.values())):.0%} of the gradient energy on average"
            findings.append(line + ".")

    c = suggested_max_norm
    tau = suggested_spectral_threshold
    if heavy:
        head = f"the noise looks heavy-tailed (α̂ = {tail_index:.2f}): per-sample clipping is recommended"
        head += f" (c ≈ {c:.3g})" if _finite(c) else ""
        return Verdict(
            "per_sample_clip",
            head,
            findings,
            f"rc.Clipper(model, opt, rc.per_sample_clip({c:.3g}))" if _finite(c) else "",
        )
    if spiky:
        head = (
            f"the gradients of {', '.join(spiky[:3])} spike in a few directions: spectral clipping "
            "is recommended"
        )
        head += f" (τ ≈ {tau:.3g})" if _finite(tau) else ""
        snippet = f"rc.Clipper(model, opt, rc.spectral_clip({tau:.3g}))" if _finite(tau) else ""
        return Verdict("spectral_clip", head, findings, snippet)
    if l1_dominant:
        head = "smoothness grows with the gradient norm: clipping the batch gradient is recommended"
        snippet = "rc.Clipper(model, opt, rc.clip_by_global_norm(...))"
        if batch_radius is not None:
            head += f" (radius ≈ L0/L1 = {batch_radius:.3g})"
            snippet = f"rc.Clipper(model, opt, rc.clip_by_global_norm({batch_radius:.3g}))"
        return Verdict("clip_by_global_norm", head, findings, snippet)
    if not findings:
        return Verdict("none", "no diagnostics were available to judge from", findings, "")
    return Verdict(
        "none",
        "the noise looks light-tailed and nothing calls for clipping: plain SGD should do; "
        "clipping stays optional insurance",
        findings,
        "",
    )
