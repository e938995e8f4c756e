"""``diagnose``: which clipping, at which radius, for the user's own model and data, with evidence.

Three stages, all within a budget the user sets (a fraction of the planned training steps):

1. **Statistics.** The baseline (no clipping, the user's optimizer) trains the first rung of
   the pilot while :class:`Diagnostics` watches it: per-sample gradient norms, batch gradient
   norms, the layers' top singular values, and at three probes the tail index alpha-hat, the
   local smoothness and its (L0, L1) fits. The strong-growth constant rho-hat is the finite sum
   over the whole training set (streamed over the loader, arXiv:2605.14800), at the start and
   at the end of this run.
2. **Candidates.** The statistics score the clipping methods (per-sample clipping for heavy
   tails; spectral and global-norm clipping for spikes in the aggregated gradient; global-norm
   clipping for smoothness growing with the gradient). Methods with strong evidence race alone
   (at most two); otherwise all three race. Each races at three radii read off the
   distribution of the quantity it clips (its 0.1-, 0.5- and 0.9-quantile; spikes left out
   for spectral and global-norm clipping), beside the baseline: at most 3 methods x 3 radii.
3. **Pilot.** The arms branch from the trunk and race (:func:`._pilot.staged_race`: method
   first, then radius; or successive halving); the winner is the verdict, and the race's margin,
   measured against the step-to-step noise of paired losses, is its confidence. Under
   heavy-tailed noise the radius of per-sample clipping is chosen at matched progress
   (:func:`._pilot.matched_progress`): a smaller radius that catches up with the leader within
   the planned run settles lower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from robustclip.diagnostics._growth import StrongGrowth, strong_growth
from robustclip.diagnostics._pilot import (
    METHODS,
    Arm,
    Candidate,
    PilotTrainer,
    paired_z,
    rung_lengths,
    staged_race,
    successive_halving,
)
from robustclip.diagnostics._tail import MIN_TAIL_SAMPLES
from robustclip.diagnostics._tracker import Diagnostics
from robustclip.diagnostics._verdict import (
    HEAVY_TAIL_ALPHA,
    LOW_RANK_SHARE,
    SPIKE_RATIO,
    spike_ratio,
    without_spikes,
)

_T = TypeVar("_T")

__all__ = ["diagnose", "Diagnosis", "RADIUS_QUANTILES"]

#: the quantiles of a clipped quantity's observed distribution that give a method's 3 radii
RADIUS_QUANTILES = (0.1, 0.5, 0.9)
#: a one-step jump of a gradient norm or top singular value by this factor over its recent
#: median, seen along the statistics run, rules out the unclipped baseline as the verdict
CATASTROPHE_RATIO = 100.0
#: how many clipping methods race beside the baseline when the statistics strongly support
#: some (those, at most this many) ...
RACED_METHODS = 2
#: ... and when they support none (all of them)
RACED_METHODS_WEAK = 3
#: an evidence score at or above this (see ``_evidence``) is strong: heavy tails, spikes in
#: the aggregated gradient
STRONG_EVIDENCE = 2.0
#: probes of the statistics run (start, middle, end: the (L0, L1) fit needs 3 points)
PROBES = 3
#: most of the budget the probes may take (a smaller budget shrinks the probe set)
PROBE_SHARE = 0.1
#: ... or up to this share when the batch is small, to reach a usable probe set
PROBE_SHARE_MAX = 0.3
#: most of the budget the rho passes over the training set may take
RHO_SHARE = 0.1
#: share of the remaining training steps spent on the statistics run (the arms' common trunk)
STATS_SHARE = 0.25

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Diagnosis:
    """The answer of :func:`diagnose`: a method and its radius, with the evidence.

    Attributes:
        method: ``"none"``, ``"per_sample_clip"``, ``"clip_by_global_norm"`` or
            ``"spectral_clip"``: the pilot's winner.
        threshold: its radius (``c`` or ``tau``); ``None`` for ``"none"``.
        snippet: a line of robustclip code that applies it.
        confidence: ``"high"``, ``"medium"`` or ``"low"``.
        confidence_reason: why, in one or two sentences.
        statistics: alpha-hat, rho-hat (whole training set), the (L0, L1) fits, suggested
            radii, spike ratios and spectra summaries (the :class:`Diagnostics` summary plus
            the streamed rho).
        evidence: method -> the statistic's reading of it (why it was raced or not).
        candidates: the arms raced, best first, each with its scores per rung and loss curve.
        rungs: ``[(arms, cumulative steps per arm), ...]`` of the race, counted from the branch.
        pilot: the race design, ``"staged"`` or ``"halving"``.
        trunk_losses: the statistics run's per-step losses (the arms branch at its end).
        pilot_steps: training-step equivalents spent (arms' steps, probes and rho passes).
        pilot_cost_frac: ``pilot_steps / planned_steps``.
        warnings: things a user must know before using the numbers (e.g. which (L0, L1)).
    """

    method: str
    threshold: float | None
    snippet: str
    confidence: str
    confidence_reason: str
    statistics: dict[str, Any]
    evidence: dict[str, str]
    candidates: list[dict[str, Any]]
    rungs: list[tuple[int, int]]
    trunk_losses: list[float]
    pilot_steps: float
    pilot_cost_frac: float
    planned_steps: int
    budget: float
    seed: int
    pilot: str = "staged"
    warnings: list[str] = field(default_factory=list)
    #: the statistics run's :class:`Diagnostics` (per-step readings, probes), saved beside
    tracker: Diagnostics | None = field(default=None, repr=False)

    @property
    def headline(self) -> str:
        what = "no clipping (plain mean gradient)" if self.method == "none" else (
            f"{self.method} at {self.threshold:.4g}"
        )
        return f"{what}; confidence {self.confidence}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.method,
            "threshold": self.threshold,
            "headline": self.headline,
            "snippet": self.snippet,
            "confidence": self.confidence,
            "confidence_reason": self.confidence_reason,
            "evidence": self.evidence,
            "statistics": self.statistics,
            "candidates": self.candidates,
            "rungs": [list(r) for r in self.rungs],
            "trunk_losses": self.trunk_losses,
            "pilot_steps": self.pilot_steps,
            "pilot_cost_frac": self.pilot_cost_frac,
            "planned_steps": self.planned_steps,
            "budget": self.budget,
            "seed": self.seed,
            "pilot": self.pilot,
            "warnings": self.warnings,
        }

    def save(self, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Write ``verdict.json``, ``report.md`` and (with matplotlib) ``pilot.png``, and the
        statistics run's files (:meth:`Diagnostics.save`) into ``statistics/``."""
        from robustclip.diagnostics._report import write_diagnosis

        paths = write_diagnosis(self, Path(out_dir), plots=plots)
        if self.tracker is not None:
            stats = self.tracker.save(Path(out_dir) / "statistics", plots=plots)
            paths.update({f"statistics/{k}": v for k, v in stats.items()})
        return paths


# -- helpers --------------------------------------------------------------------------------------


def _check(planned_steps: object, budget: object, methods: Sequence[str] | None) -> list[str]:
    if isinstance(planned_steps, bool) or not isinstance(planned_steps, int) or planned_steps < 1:
        raise ValueError(
            f"planned_steps must be the number of optimizer steps of the full training run "
            f"(an int >= 1), got {planned_steps!r}."
        )
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(
            f"budget must be the share of planned_steps the diagnosis may spend, in (0, 1] "
            f"(default 0.1), got {budget!r}."
        )
    chosen = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise ValueError(f"methods must be a non-empty subset of {list(METHODS)}, got {methods!r}.")
    return chosen


def _batch_size(batch: Any) -> int:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor)):
        raise TypeError(
            "the loader must yield (inputs, targets) pairs of tensors, got "
            f"{type(batch).__name__}; wrap it so it does."
        )
    return int(batch[0].shape[0])


def _probe_set(loader: Iterable[Any], size: int, seed: int) -> tuple[Tensor, Tensor]:
    torch.manual_seed(seed)
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    n = 0
    for batch in loader:
        _batch_size(batch)
        xs.append(batch[0])
        ys.append(batch[1])
        n += batch[0].shape[0]
        if n >= size:
            break
    return torch.cat(xs)[:size], torch.cat(ys)[:size]


def _stream_rho(
    model: nn.Module, loss_fn: LossFn, loader: Iterable[Any], engine: str, max_batches: int | None
) -> tuple[StrongGrowth, int]:
    """rho over the loader (the whole set, or its first ``max_batches`` batches), in eval mode."""
    from robustclip.diagnostics._gradients import stream_gradients

    def batches() -> Any:
        for i, b in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                return
            yield b

    pg = stream_gradients(model, loss_fn, batches(), engine=engine)
    return strong_growth(pg.per_sample_norms, pg.mean_grad), int(pg.per_sample_norms.numel())


def _quantiles(values: np.ndarray) -> list[float] | None:
    v = values[np.isfinite(values) & (values > 0)]
    if v.size < 3:
        return None
    out = [float(np.quantile(v, q, method="lower")) for q in RADIUS_QUANTILES]
    return out if out[-1] > 0 else None


def _evidence(summary: dict[str, Any], batch_norms: np.ndarray) -> tuple[dict[str, float], dict[str, str]]:
    """Score every clipping method from the statistics (higher: more reason to race it)."""
    scores: dict[str, float] = {}
    why: dict[str, str] = {}
    alpha = summary.get("tail_index")
    q = summary.get("per_sample_norms") or {}
    spread = (q.get("q0.99", 0.0) / q["q0.5"]) if q.get("q0.5") else 0.0
    if alpha is not None and alpha < HEAVY_TAIL_ALPHA:
        scores["per_sample_clip"] = 2.0 + (HEAVY_TAIL_ALPHA - alpha)
        why["per_sample_clip"] = f"heavy-tailed noise: α̂ = {alpha:.2f} < {HEAVY_TAIL_ALPHA}"
    else:
        scores["per_sample_clip"] = min(1.0, spread / 20.0)
        a = "n/a" if alpha is None else f"{alpha:.2f}"
        why["per_sample_clip"] = f"α̂ = {a} (not heavy-tailed); per-sample norm q0.99/q0.5 = {spread:.3g}"
    # spectral clipping acts on matrices with at least 2 rows and 2 columns; on a (1, n) or
    # (n, 1) gradient it is norm clipping, and its top share is 1 by construction
    shapes = summary.get("layer_shapes") or {}
    matrix = {n for n, sh in shapes.items() if min(sh) >= 2}
    layers = {n: v for n, v in (summary.get("layers") or {}).items() if n in matrix}
    ratios = {n: r for n, r in (summary.get("spike_ratios") or {}).items() if n in matrix}
    spiky = [n for n, r in ratios.items() if r >= SPIKE_RATIO and (layers.get(n, {}).get("top_share_mean") or 0) >= LOW_RANK_SHARE]
    worst = max(ratios.values()) if ratios else None
    if spiky:
        scores["spectral_clip"] = 2.0 + min(2.0, math.log10(max(worst or 1.0, 1.0)))
        why["spectral_clip"] = f"σ_max spikes up to {worst:.3g}x its recent median in {len(spiky)} low-rank layer(s)"
    else:
        share = np.mean([d["top_share_mean"] for d in layers.values() if d.get("top_share_mean") is not None]) if layers else 0.0
        scores["spectral_clip"] = 0.5 * float(share) if layers else 0.0
        why["spectral_clip"] = (
            f"no low-rank σ_max spikes (largest ratio {worst:.3g})" if worst is not None
            else "no gradient matrix with 2 or more rows and columns"
        )
    bn = batch_norms[np.isfinite(batch_norms)]
    b_ratio = spike_ratio(bn.tolist()) if bn.size >= 4 else None
    l0, l1, g = summary.get("l0"), summary.get("l1"), summary.get("grad_norm_median")
    if spiky and worst is not None:
        # a spike in the aggregated gradient is what batch-level clipping removes, by norm or by
        # singular value; per-sample clipping acts before the average and cannot
        scores["clip_by_global_norm"] = 1.5 + min(2.0, math.log10(max(worst, 1.0)))
        why["clip_by_global_norm"] = f"the aggregated gradient spikes (σ_max up to {worst:.3g}x its recent median)"
    elif l0 is not None and l1 is not None and g is not None and l1 * g > l0:
        # three probes along a short trunk: a suggestion, not strong evidence
        scores["clip_by_global_norm"] = 1.5
        why["clip_by_global_norm"] = f"smoothness grows with the gradient: L1·‖∇f‖ = {l1 * g:.3g} > L0 = {l0:.3g}"
    elif b_ratio is not None and b_ratio >= SPIKE_RATIO:
        scores["clip_by_global_norm"] = 1.5
        why["clip_by_global_norm"] = f"the batch gradient norm spikes to {b_ratio:.3g}x its recent median"
    else:
        scores["clip_by_global_norm"] = 0.4
        r = "n/a" if b_ratio is None else f"{b_ratio:.3g}"
        why["clip_by_global_norm"] = f"no sign of (L0, L1) growth; batch-norm spike ratio {r}"
    return scores, why


# -- the public function --------------------------------------------------------------------------


def diagnose(
    model_fn: Callable[[], nn.Module] | nn.Module,
    loss_fn: LossFn,
    loader: Iterable[Any],
    *,
    planned_steps: int,
    budget: float = 0.1,
    optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr: float = 0.01,
    metric_fn: Callable[[nn.Module], float] | None = None,
    methods: Sequence[str] | None = None,
    noise_fn: Callable[[], Any] | None = None,
    probe_size: int = 128,
    dataset_size: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    engine: str = "auto",
    extrapolate: bool = True,
    pilot: str = "staged",
    out: str | Path | None = None,
    plots: bool = True,
) -> Diagnosis:
    """Which clipping method and radius this problem needs, decided by a short pilot.

    Measures the gradient statistics (alpha-hat, rho-hat over the whole training set, (L0, L1),
    per-layer spectra), picks the leading candidates (the baseline and the two best-supported
    clipping methods, 3 radii each) and races them by successive halving on the user's own
    problem within ``budget * planned_steps`` training-step equivalents (see the module
    docstrings of ``_diagnose`` and ``_pilot`` for the design). Deterministic given ``seed``
    (on the CPU; on a GPU up to its kernels' own nondeterminism).

    Args:
        model_fn: a factory returning a freshly initialised model (called once per arm under
            ``torch.manual_seed(seed)``, so every arm starts from the same weights), or a module,
            deep-copied per arm from its current state.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses (``reduction="none"``).
        loader: re-iterable batches ``(inputs, targets)`` of the training set, e.g. a
            ``DataLoader``; each arm iterates it as training would (a shuffling loader is
            re-seeded per pass, so all arms see the same batches).
        planned_steps: optimizer steps of the full training run the verdict is for.
        budget: share of ``planned_steps`` the whole diagnosis may spend (default 0.1).
        optimizer_fn: ``params -> optimizer``, the one training will use; default
            ``torch.optim.SGD(params, lr=lr)``.
        lr: the SGD step size when ``optimizer_fn`` is not given.
        metric_fn: ``model -> float``, lower is better (e.g. validation loss or error), read at
            each rung's end (model in eval mode, no grad); default: the arm's mean training loss
            over the last third of the rung.
        methods: restrict the candidates to these of ``"none"``, ``"per_sample_clip"``,
            ``"clip_by_global_norm"``, ``"spectral_clip"``.
        noise_fn: ``() -> GradientTransform``, gradient noise the problem adds after
            aggregation (a synthetic problem's injected noise); every arm gets a fresh one,
            applied before the candidate's own transforms.
        probe_size: training samples in the probe set of the tail index and smoothness
            (>= 16).
        dataset_size: samples in the training set; default ``len(loader.dataset)``. Only used
            when the budget allows no full pass for rho (then rho is read from the first
            batches with the subset correction of :mod:`._growth`).
        seed: seed of the initialisation, data order, sketches and the race.
        device: where to train (default: the model's device, else CPU).
        engine: per-sample engine (``"auto"``, ``"hooks"``, ``"vmap"``, ``"loop"``).
        pilot: ``"staged"`` (method first, then radius; the default) or ``"halving"``
            (successive halving over all arms, eta = 3); see :mod:`._pilot`.
        extrapolate: score each rung by its curve carried ahead (Aitken's delta-squared over
            the rung's thirds, :func:`._pilot.extrapolate`) rather than by its last third.
        out: if given, write ``verdict.json``, ``report.md`` and ``pilot.png`` there.
        plots: write ``pilot.png`` (needs matplotlib).

    Returns:
        a :class:`Diagnosis`.

    Example::

        diag = rcd.diagnose(lambda: Net(), loss_fn, train_loader, planned_steps=5000,
                            optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                            out="diag/")
        print(diag.headline, diag.snippet)
    """
    chosen = _check(planned_steps, budget, methods)
    if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < MIN_TAIL_SAMPLES:
        raise ValueError(f"probe_size must be an int >= {MIN_TAIL_SAMPLES}, got {probe_size!r}.")
    if optimizer_fn is None:
        def optimizer_fn(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=lr)
    dev = torch.device(device) if device is not None else (
        next(model_fn.parameters()).device if isinstance(model_fn, nn.Module) else torch.device("cpu")
    )
    rng_outer = torch.get_rng_state()
    try:
        return _diagnose(
            model_fn, loss_fn, loader, planned_steps, float(budget), optimizer_fn, metric_fn,
            chosen, noise_fn, probe_size, dataset_size, int(seed), dev, engine, bool(extrapolate), pilot,
            out, plots,
        )
    finally:
        torch.set_rng_state(rng_outer)


def _diagnose(
    model_fn: Callable[[], nn.Module] | nn.Module,
    loss_fn: LossFn,
    loader: Iterable[Any],
    planned_steps: int,
    budget: float,
    optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    metric_fn: Callable[[nn.Module], float] | None,
    chosen: list[str],
    noise_fn: Callable[[], Any] | None,
    probe_size: int,
    dataset_size: int | None,
    seed: int,
    dev: torch.device,
    engine: str,
    extrapolate: bool,
    pilot: str,
    out: str | Path | None,
    plots: bool,
) -> Diagnosis:
    if pilot not in ("staged", "halving"):
        raise ValueError(f"pilot must be 'staged' or 'halving', got {pilot!r}.")
    trainer = PilotTrainer(
        model_fn, loss_fn, loader, optimizer_fn, seed=seed, device=dev, noise_fn=noise_fn, engine=engine
    )
    warnings: list[str] = []
    total = budget * planned_steps
    batch = _batch_size(next(iter(loader)))
    n_data = dataset_size if dataset_size is not None else len(getattr(loader, "dataset", ()) or ()) or None
    n_batches = math.ceil(n_data / batch) if n_data else None

    # costs in training-step equivalents (a step = forward + backward of one batch). A probe is
    # about 4 passes over the probe set (per-sample norms, per-sample vectors for the tail
    # index, two gradients for the smoothness); the probes may take a fifth of the budget, so
    # a small budget shrinks the probe set (never below MIN_TAIL_SAMPLES).
    size = min(probe_size, int(PROBE_SHARE * total * batch / (PROBES * 4)))
    if size < MIN_TAIL_SAMPLES and MIN_TAIL_SAMPLES * PROBES * 4 / batch <= PROBE_SHARE_MAX * total:
        # small batches: the smallest usable probe costs more than the usual share; allow it
        size = MIN_TAIL_SAMPLES
        warnings.append(
            f"the probes use the smallest usable probe set ({MIN_TAIL_SAMPLES} samples, "
            f"{MIN_TAIL_SAMPLES * PROBES * 4 / batch:.0f} step equivalents): the tail index is rough."
        )
    if size < MIN_TAIL_SAMPLES:
        raise ValueError(
            f"the budget ({budget:g} x {planned_steps} = {total:.0f} step equivalents) is too small "
            f"for the statistics: the probes would get {size} samples, the tail index needs "
            f"{MIN_TAIL_SAMPLES}. Raise budget or planned_steps."
        )
    probe_x, probe_y = _probe_set(loader, size, seed)
    if probe_x.shape[0] < MIN_TAIL_SAMPLES:
        raise ValueError(
            f"the loader gave {probe_x.shape[0]} samples; the diagnosis needs at least {MIN_TAIL_SAMPLES}."
        )
    probe_cost = PROBES * 4 * probe_x.shape[0] / batch
    # rho: the whole training set at the start and the end of the statistics run if the
    # budget allows it (a quarter of it), else one pass, else the first batches, corrected
    rho_passes = 2
    rho_batches: int | None = None
    if n_batches is None or 2 * n_batches > RHO_SHARE * total:
        rho_passes = 1
        if n_batches is None or n_batches > RHO_SHARE * total:
            rho_batches = max(2, int(RHO_SHARE * total))
            if n_batches is not None:
                rho_batches = min(rho_batches, n_batches)
    rho_cost = rho_passes * (rho_batches if rho_batches is not None else (n_batches or 0))
    train_steps = int(total - probe_cost - rho_cost)
    n_methods = len([m for m in chosen if m != "none"])
    n_arms = (1 if "none" in chosen else 0) + 3 * min(RACED_METHODS, n_methods)
    stats_steps = int(STATS_SHARE * train_steps)
    race_steps = train_steps - stats_steps
    if stats_steps < 4 or race_steps < 3 * n_arms:
        raise ValueError(
            f"the budget ({budget:g} x {planned_steps} = {total:.0f} step equivalents) leaves "
            f"{train_steps} training steps for the statistics run and {n_arms} pilot arms after "
            f"the probes ({probe_cost:.0f}) and rho ({rho_cost:.0f}); raise budget or planned_steps."
        )

    # 1. statistics along the baseline's run, the trunk every arm branches from
    trunk = trainer.new_arm(Candidate("none"), observe_norms=True)
    diag = Diagnostics(
        trunk.model, loss_fn, (probe_x, probe_y), batch_size=batch, engine=engine,
        spectrum_every=max(1, stats_steps // 50), sketch_dim=256, seed=seed,
    )
    batch_norms: list[Tensor] = []

    def on_step(arm: Arm, info: Any) -> None:
        diag.observe(info)
        if info.grad_norm is not None and not info.skipped:
            batch_norms.append(info.grad_norm.detach().reshape(1))

    def detached(fn: Callable[[], _T]) -> _T:
        # the clipper's per-sample engine watches every forward of the model; take it off
        # while the probes run their own passes
        eng = trunk.clipper.engine
        if eng is not None:
            eng.detach()
        try:
            return fn()
        finally:
            if eng is not None:
                eng.attach()

    def rho_now() -> tuple[StrongGrowth | None, int]:
        try:
            return detached(lambda: _stream_rho(trunk.model, loss_fn, loader, engine, rho_batches))
        except ValueError as e:
            warnings.append(f"rho: {e}")
            return None, 0

    rhos: list[tuple[int, StrongGrowth | None, int]] = []
    detached(diag.probe)
    if rho_passes == 2:
        rhos.append((0, *rho_now()))
    half = stats_steps // 2
    trainer.train(trunk, half, on_step)
    detached(diag.probe)
    trainer.train(trunk, stats_steps - half, on_step)
    detached(diag.probe)
    rhos.append((trunk.steps, *rho_now()))
    summary = diag.summary()
    summary["layer_shapes"] = {
        n: [p.shape[0], p[0].numel()] for n, p in trunk.model.named_parameters() if p.dim() >= 2
    }
    summary["spike_ratios"] = {
        name: r for name, hist in diag.sigma_max_history().items()
        if (r := spike_ratio([v for _, v in hist])) is not None
    }
    summary.update(_rho_summary(rhos, rho_batches, n_data, warnings))
    bn = torch.cat(batch_norms).double().cpu().numpy() if batch_norms else np.zeros(0)
    summary["batch_grad_norms"] = {f"q{q:g}": float(np.quantile(bn, q)) for q in (0.1, 0.5, 0.9)} if bn.size else {}
    if summary.get("l1") is not None:
        warnings.append(
            "The (L0, L1) fit l0, l1 is gradient-norm smoothness, ‖∇²f‖ ≤ L0 + L1‖∇f‖ (Zhang et al., "
            "arXiv:1905.11881). rc.l0l1_warmup (arXiv:2605.14800, app. C.4) needs function-gap "
            "smoothness, ‖∇²f‖ ≤ L0 + L1 (f − f*): pass it l0_gap, l1_gap (fitted against the loss "
            "with f* = 0), never l0, l1."
        )

    # 2. candidates: the two best-supported clipping methods, 3 radii each, and the baseline
    scores, why = _evidence(summary, bn)
    ranked_methods = sorted(
        (m for m in chosen if m != "none"), key=lambda m: (-scores[m], METHODS.index(m))
    )
    strong = [m for m in ranked_methods if scores[m] >= STRONG_EVIDENCE]
    # strong evidence (heavy tails, spikes in the aggregated gradient, (L0, L1) growth) is a
    # property of the whole run, which a short race cannot see: then only the supported methods
    # race, for their radius and against the baseline; without it, every method races
    clip_methods = strong[:RACED_METHODS] if strong else ranked_methods[:RACED_METHODS_WEAK]
    for m in ranked_methods:
        if m not in clip_methods:
            why[m] += "; not raced" + (
                f": the statistics clearly favour {', '.join(strong)}" if strong else ""
            )
    norms_hist = diag.per_sample_norm_history()
    ps = np.concatenate(norms_hist) if norms_hist else np.zeros(0)
    eligible = {n for n, sh in summary["layer_shapes"].items() if min(sh) >= 2}
    # spectral and global-norm clipping are raced to remove spikes: their radii are read from
    # the readings without the spikes (per layer for sigma_max), so that no radius sits at
    # spike level, where it would clip nothing the method is there for
    sig = np.concatenate(
        [without_spikes([v for _, v in h]) for n, h in diag.sigma_max_history().items() if n in eligible]
        or [np.zeros(0)]
    )
    source = {"per_sample_clip": ps, "clip_by_global_norm": without_spikes(bn.tolist()), "spectral_clip": sig}
    all_radii = {m: _quantiles(v) for m, v in source.items()}
    summary["radii"] = all_radii
    cands: list[Candidate] = [Candidate("none")] if "none" in chosen else []
    for m in clip_methods:
        radii = all_radii[m]
        if radii is None:
            why[m] += "; too few readings to set radii, not raced"
            continue
        cands += [Candidate(m, r, q) for r, q in zip(radii, RADIUS_QUANTILES)]
    if not cands:
        raise ValueError(
            f"no candidate could be raced: {'; '.join(why[m] for m in clip_methods)}. Include "
            "'none' in methods or give the statistics run more steps (a larger budget)."
        )

    # a rare catastrophe the statistics run met (the gradient jumping by orders of magnitude
    # in one step) may not recur within a short race; without clipping, a full run will meet
    # it again, so the baseline cannot be the verdict then
    jumps = [r for r in (summary.get("spike_ratios") or {}).values() if r is not None]
    b_jump = spike_ratio(bn[np.isfinite(bn)].tolist()) if bn.size >= 4 else None
    worst_jump = max(jumps + ([b_jump] if b_jump is not None else []), default=0.0)
    catastrophe = worst_jump >= CATASTROPHE_RATIO

    # 3. the race: every arm branches from the trunk (same weights, optimizer state, RNG state
    # and, from a fresh pass, the same batches)
    favoured = max(clip_methods, key=lambda m: scores[m]) if clip_methods else "none"
    if scores.get(favoured, 0.0) < STRONG_EVIDENCE:
        favoured = "none"
    # heavy-tailed per-sample noise: a smaller per-sample radius that catches up with the
    # leader within the planned run settles lower (see _pilot.matched_progress)
    alpha = summary.get("tail_index")
    heavy = alpha is not None and alpha < HEAVY_TAIL_ALPHA
    if pilot == "staged":
        ranked, plan = staged_race(
            trainer, trunk, cands, race_steps, metric_fn=metric_fn, extrapolate_curve=extrapolate,
            forbid_baseline=catastrophe, prior=None if favoured == "none" else favoured,
            match_radius=heavy, steps_left=planned_steps - trunk.steps,
        )
        arms = list(ranked)
    else:
        arms = [trainer.branch(trunk, c) for c in cands]
        plan = rung_lengths(len(arms), race_steps)
        ranked = successive_halving(trainer, arms, plan, metric_fn=metric_fn, extrapolate_curve=extrapolate)
    trainer.close(trunk)
    for a in arms:
        trainer.close(a)
    # steps each arm actually trained (a stage-2 arm's step count starts where it branched)
    spent = trunk.steps + sum(len(a.losses) - a.padded for a in arms) + probe_cost + rho_cost
    overruled = None
    if catastrophe and any(a.candidate.method == "none" for a in ranked):
        base = next(a for a in ranked if a.candidate.method == "none")
        lead = ranked[0]
        if lead is base:
            clipped = [a for a in ranked if a.candidate.method != "none" and not a.diverged]
            if clipped:
                overruled = base
                ranked.remove(clipped[0])
                ranked.insert(0, clipped[0])
        elif pilot == "staged" and base.scores and lead.scores and base.scores[0] <= min(
            a.scores[0] for a in ranked if a.scores and a.candidate.method != "none"
        ):
            overruled = base
    best = ranked[0]
    conf, reason = _confidence(ranked, plan, metric_fn is not None)
    if overruled is not None:
        conf = "medium"
        reason = (
            f"The pilot ranked no clipping first, but along the statistics run a gradient jumped to "
            f"{worst_jump:.3g}x its recent median in one step: a full run without clipping meets "
            f"such jumps, which a short race may not. The best clipping arm, {best.candidate.label}, "
            "is the verdict."
        )
    if best.caught_up is not None:
        leader, need, horizon = best.caught_up
        conf = "medium"
        reason = (
            f"In the final rung {leader} led, but {best.candidate.label}, a smaller radius under "
            f"heavy-tailed per-sample noise (α̂ = {alpha:.2f}), descended at a rate that "
            f"reaches {leader}'s level in about {need:.0f} steps, within half of the {horizon} "
            "planned steps still to come; a smaller radius settles lower, so it is the verdict "
            "(matched progress, not the race's last reading)."
        )
    if best.candidate.method != favoured:
        reason += (
            f" The statistics alone pointed to {favoured}; the pilot overrules them, as it "
            "measures the methods on this problem."
        )
    cand_records = [
        {
            "method": a.candidate.method,
            "radius": a.candidate.radius,
            "quantile": a.candidate.quantile,
            "label": a.candidate.label,
            "scores": a.scores,
            "readings": a.readings,
            "steps": a.steps,
            "eliminated_at_rung": a.eliminated_at,
            "diverged": a.diverged,
            "caught_up": None if a.caught_up is None else {
                "leader": a.caught_up[0], "steps_to_leader_level": a.caught_up[1], "steps_left": a.caught_up[2],
            },
            "losses": a.losses,
        }
        for a in ranked
    ]
    result = Diagnosis(
        method=best.candidate.method,
        threshold=best.candidate.radius,
        snippet=best.candidate.snippet(),
        confidence=conf,
        confidence_reason=reason,
        statistics=summary,
        evidence=why,
        candidates=cand_records,
        rungs=plan,
        trunk_losses=trunk.losses,
        pilot_steps=float(spent),
        pilot_cost_frac=float(spent) / planned_steps,
        planned_steps=planned_steps,
        budget=budget,
        seed=seed,
        pilot=pilot,
        warnings=warnings,
        tracker=diag,
    )
    if out is not None:
        result.save(out, plots=plots)
    return result


def _rho_summary(
    rhos: list[tuple[int, StrongGrowth | None, int]], rho_batches: int | None, n_data: int | None,
    warnings: list[str],
) -> dict[str, Any]:
    vals = [(s, sg, n) for s, sg, n in rhos if sg is not None]
    out: dict[str, Any] = {"rho_probe_subset": None}
    rho_hat = max((sg.rho for _, sg, _ in vals), default=None)
    if rho_batches is not None and vals:
        # a partial pass: the subset's mean gradient carries its own noise; remove its expected
        # share, E||gbar_n||^2 = ||gbar||^2 + (m - ||gbar||^2)(N - n)/(n (N - 1))
        _, sg, n = vals[-1]
        c = (n_data - n) / (n * (n_data - 1)) if n_data else 1.0 / n
        g_hat = (sg.grad_sq_norm - c * sg.mean_sq_norm) / (1 - c) if c < 1 else 0.0
        rho_hat = sg.mean_sq_norm / g_hat if g_hat > 0 else math.inf
        out["rho_correction"] = {"samples": n, "dataset_size": n_data, "uncorrected": sg.rho, "corrected": rho_hat}
        warnings.append(
            f"rho-hat was read from the first {n} samples only (the budget allows no full pass) and "
            f"corrected for the subset's own noise: {sg.rho:.4g} -> {rho_hat:.4g}."
        )
    out["rho"] = rho_hat
    out["rho_history"] = [{"step": s, "rho": sg.rho, "samples": n} for s, sg, n in vals]
    out["rho_source"] = "whole training set" if rho_batches is None else "first batches, corrected"
    out["recommended_batch_size"] = (
        math.ceil(rho_hat - 1e-9) if rho_hat is not None and math.isfinite(rho_hat) else None
    )
    return out


def _confidence(ranked: list[Arm], plan: list[tuple[int, int]], has_metric: bool) -> tuple[str, str]:
    if len(ranked) < 2:
        return "low", "Only one candidate was raced, so nothing was compared."
    best, second = ranked[0], ranked[1]
    if second.diverged and not best.diverged:
        return "high", f"Every other candidate that reached the final rung diverged; {best.candidate.label} trained."
    s1, s2 = best.scores[-1], second.scores[-1]
    start = plan[-2][1] if len(plan) > 1 else 0
    end = plan[-1][1]
    z = paired_z(best, second, start, end)
    rel = (s2 - s1) / abs(s1) if s1 and math.isfinite(s1) and math.isfinite(s2) else math.inf
    zs = "n/a" if z is None else f"{z:.1f}"
    what = "metric" if has_metric else "training loss"
    base = (
        f"In the final rung ({end} steps per arm) {best.candidate.label} beat the runner-up "
        f"{second.candidate.label} by {rel:.1%} in {what} ({zs} standard errors of the paired "
        "per-step loss difference)."
    )
    if rel < 0.02:
        return "medium", base + " The two are within 2% of each other: either is a reasonable choice."
    if z is not None and z >= 3 and rel >= 0.05:
        return "high", base
    if z is not None and z >= 2:
        return "medium", base
    return "low", base + " The margin is within the race's noise; a longer budget would tell them apart."

