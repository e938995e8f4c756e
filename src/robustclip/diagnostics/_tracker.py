"""Diagnostics from a user's own training loop: a small object fed once per step.

``observe()`` runs every step and reads nothing back to the host: it keeps the per-sample norms of the
step (from a clipper's :class:`~robustclip.StepInfo`) and, every ``spectrum_every`` steps, the
top singular values of each layer's gradient, as device tensors. ``end_epoch()`` moves them to
the host once per epoch. (On CUDA the SVD behind the spectra synchronizes by itself, which is
why spectra are read only every ``spectrum_every`` steps.) ``probe()`` is the expensive part (a few passes over a probe set: tail
index, strong growth, local smoothness); call it a few times per run, between steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
from torch import Tensor, nn

from robustclip.diagnostics._gradients import (
    _check_probe,
    per_sample_gradients,
    probe_gradients,
)
from robustclip.diagnostics._growth import strong_growth
from robustclip.diagnostics._norms import (
    DEFAULT_QUANTILES,
    clipped_fraction,
    norm_statistics,
    suggest_max_norm,
    suggest_spectral_threshold,
)
from robustclip.diagnostics._smoothness import fit_l0_l1, local_smoothness
from robustclip.diagnostics._spectrum import gradient_matrices, top_singular_values
from robustclip.diagnostics._tail import MIN_TAIL_SAMPLES, tail_index
from robustclip.diagnostics._verdict import verdict
from robustclip.per_sample._engine import unwrap_model

__all__ = ["Diagnostics", "ProbeRecord", "EpochRecord"]


@dataclass
class ProbeRecord:
    """What one :meth:`Diagnostics.probe` measured at the current parameters."""

    step: int
    epoch: int
    loss: float
    grad_norm: float
    tail_index: float | None
    rho: float | None
    smoothness: float | None
    norm_mean: float
    norm_quantiles: dict[str, float]
    notes: list[str] = field(default_factory=list)


@dataclass
class EpochRecord:
    """Per-epoch per-sample norm readings (the PS-Clip paper's per-epoch curves)."""

    epoch: int
    steps: int
    samples: int
    mean_norm: float | None
    norm_quantiles: dict[str, float]
    mean_loss: float | None


class Diagnostics:
    """Gradient-noise diagnostics for any training loop.

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses.
        probe: ``(inputs, targets)``, a fixed probe set (a few hundred training samples) on which
            :meth:`probe` measures the tail index, ``rho`` and the local smoothness; at least
            16 samples (the tail index needs them).
        batch_size: the training batch size, compared with ``rho_hat`` in the verdict.
        max_norm: the per-sample radius in use, if training clips per sample; the fraction
            clipped per epoch is computed at it (default: at the suggested radius).
        clip_quantile: quantile of per-sample norms that suggests the radius ``c``.
        spectral_quantile: quantile of the sigma_max history that suggests ``tau``.
        spectral_rank: ``r``, singular values kept per layer.
        spectrum_every: read the gradient spectra every this many steps (0: never).
        sketch_dim: random-sketch width for the tail index's noise vectors (None: exact).
        layers: restrict the tail index to these modules (paths), e.g. one layer of a big model.
        engine: per-sample engine of the probe (``"auto"``, ``"vmap"``, ``"hooks"``, ``"loop"``).
        chunk_size: probe samples per forward pass.
        smoothness: measure the local smoothness at each probe (one extra pass).
        seed: seed of the sketch.

    Usage::

        diag = rcd.Diagnostics(model, loss_fn, probe=(x_probe, y_probe), batch_size=128)
        clipper = rc.Clipper(model, opt, rc.per_sample_clip(None))  # exposes per-sample norms
        for epoch in range(epochs):
            for x, y in loader:
                clipper.backward(loss_fn(model(x), y))
                diag.observe(clipper.step())
            diag.end_epoch()
            diag.probe()
        print(diag.summary()["verdict"])
        diag.save("diagnostics/")
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        probe: tuple[Tensor, Tensor],
        *,
        batch_size: int | None = None,
        max_norm: float | None = None,
        clip_quantile: float = 0.9,
        spectral_quantile: float = 0.85,
        spectral_rank: int = 4,
        spectrum_every: int = 10,
        sketch_dim: int | None = 512,
        layers: Sequence[str] | None = None,
        engine: str = "auto",
        chunk_size: int = 256,
        smoothness: bool = True,
        seed: int = 0,
    ) -> None:
        if not (isinstance(probe, (tuple, list)) and len(probe) == 2):
            raise TypeError("probe must be a pair (inputs, targets) of tensors.")
        _check_probe(model, loss_fn, probe[0], probe[1])
        if probe[0].shape[0] < MIN_TAIL_SAMPLES:
            raise ValueError(
                f"the probe set has {probe[0].shape[0]} samples; the tail index needs at least "
                f"{MIN_TAIL_SAMPLES} (a few hundred give usable estimates). Pass a larger probe set."
            )
        for name, v in (("clip_quantile", clip_quantile), ("spectral_quantile", spectral_quantile)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}.")
        for name, v in (("spectral_rank", spectral_rank), ("spectrum_every", spectrum_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "spectral_rank" else 0):
                raise ValueError(f"{name} must be a non-negative int (rank >= 1), got {v!r}.")
        if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"max_norm must be a number > 0 or None, got {max_norm!r}.")
        self.model = model
        self.loss_fn = loss_fn
        self.probe_inputs, self.probe_targets = probe
        self.batch_size = batch_size
        self.max_norm = max_norm
        self.clip_quantile = float(clip_quantile)
        self.spectral_quantile = float(spectral_quantile)
        self.spectral_rank = spectral_rank
        self.spectrum_every = spectrum_every
        self.sketch_dim = sketch_dim
        self.layers = list(layers) if layers is not None else None
        self.engine = engine
        self.chunk_size = chunk_size
        self.measure_smoothness = bool(smoothness)
        self.seed = seed

        self.step = 0
        self.epoch = 0
        self.probes: list[ProbeRecord] = []
        self.epochs: list[EpochRecord] = []
        self.notes: list[str] = []
        # host-side histories
        self._epoch_norms: list[np.ndarray] = []  # one array per closed epoch
        self._open_norms: list[np.ndarray] = []  # flushed parts of the open epoch
        self._steps: list[dict[str, Any]] = []  # step, epoch, loss
        self._spectra: list[dict[str, Any]] = []  # step, layer, sigma (r values), share
        self._probe_norms: np.ndarray | None = None
        # device-side, pending until the next flush
        self._pending_norms: list[Tensor] = []
        self._pending_steps: list[tuple[int, int, Tensor | None]] = []
        self._pending_spectra: list[tuple[int, str, Tensor, Tensor]] = []
        self._open_steps = 0
        self.skipped_steps = 0

    # -- every step (no host reads) ---------------------------------------------------------------
    def observe(
        self,
        info: Any = None,
        *,
        per_sample_norms: Tensor | Sequence[float] | None = None,
        loss: Tensor | float | None = None,
        gradients: bool = True,
    ) -> None:
        """Record one training step; call it once per optimizer step.

        Args:
            info: the :class:`robustclip.StepInfo` returned by ``clipper.step()``; its
                ``per_sample_norms`` (per-sample methods) and ``loss`` are recorded.
            per_sample_norms: per-sample gradient norms of the step, if not in ``info``.
            loss: the step's mean loss, if not in ``info``.
            gradients: read the layer gradients' spectra from ``p.grad`` this step (every
                ``spectrum_every`` steps). ``p.grad`` must hold the step's gradient: call
                ``observe`` after ``backward``/``step`` and before the next ``zero_grad``.
        """
        if info is not None and getattr(info, "skipped", False):
            # a skipped (non-finite) step updated nothing: its NaN readings and zeroed p.grad
            # say nothing about the problem's gradients
            self.skipped_steps += 1
            return
        if info is not None:
            if per_sample_norms is None:
                per_sample_norms = getattr(info, "per_sample_norms", None)
            if loss is None:
                loss = getattr(info, "loss", None)
        if per_sample_norms is not None:
            if not isinstance(per_sample_norms, Tensor):
                per_sample_norms = torch.as_tensor(per_sample_norms)
            self._pending_norms.append(per_sample_norms.detach().reshape(-1))
        loss_t = loss.detach() if isinstance(loss, Tensor) else (
            torch.tensor(float(loss)) if loss is not None else None
        )
        self._pending_steps.append((self.step, self.epoch, loss_t))
        if gradients and self.spectrum_every and self.step % self.spectrum_every == 0:
            for name, g in gradient_matrices(unwrap_model(self.model)).items():
                top, energy, _ = top_singular_values(g.reshape(g.shape[0], -1), self.spectral_rank)
                self._pending_spectra.append((self.step, name, top, energy))
        self.step += 1
        self._open_steps += 1

    def _flush(self) -> None:
        """Move pending device readings to the host (one batch of reads)."""
        if self._pending_norms:
            self._open_norms.append(torch.cat(self._pending_norms).double().cpu().numpy())
            self._pending_norms = []
        for step, epoch, loss in self._pending_steps:
            self._steps.append(
                {"step": step, "epoch": epoch, "loss": float(loss) if loss is not None else None}
            )
        self._pending_steps = []
        for step, name, top, energy in self._pending_spectra:
            t = top.double().cpu()
            e = float(energy)
            self._spectra.append(
                {
                    "step": step,
                    "layer": name,
                    "sigma": [float(v) for v in t],
                    "top_share": min(float(t.pow(2).sum()) / e, 1.0) if e > 0 else float("nan"),
                }
            )
        self._pending_spectra = []

    def end_epoch(self) -> EpochRecord:
        """Close the epoch: its average per-sample norm and quantiles (one host read)."""
        self._flush()
        norms = np.concatenate(self._open_norms) if self._open_norms else np.zeros(0)
        losses = [s["loss"] for s in self._steps if s["epoch"] == self.epoch and s["loss"] is not None]
        rec = EpochRecord(
            epoch=self.epoch,
            steps=self._open_steps,
            samples=int(norms.size),
            mean_norm=float(norms.mean()) if norms.size else None,
            norm_quantiles=_quantiles(norms) if norms.size else {},
            mean_loss=float(np.mean(losses)) if losses else None,
        )
        self._epoch_norms.append(norms)
        self.epochs.append(rec)
        self._open_norms = []
        self._open_steps = 0
        self.epoch += 1
        return rec

    # -- at probe times (expensive) ---------------------------------------------------------------
    def probe(self) -> ProbeRecord:
        """Measure tail index, strong growth and local smoothness on the probe set, now.

        An estimate that is undefined at this point (zero gradients, constant noise) is recorded
        as ``None`` with the reason in ``notes`` instead of stopping training.
        """
        x, y = self.probe_inputs, self.probe_targets
        notes: list[str] = []
        pg = probe_gradients(
            self.model, self.loss_fn, x, y, engine=self.engine, chunk_size=self.chunk_size
        )
        self._probe_norms = pg.per_sample_norms.numpy()
        rho = alpha = smooth = None
        try:
            rho = strong_growth(pg.per_sample_norms, pg.mean_grad).rho
        except ValueError as e:
            notes.append(f"rho: {e}")
        try:
            vec = per_sample_gradients(
                self.model, self.loss_fn, x, y, layers=self.layers, sketch_dim=self.sketch_dim, seed=self.seed
            )
            alpha = tail_index(vec, center=True).alpha
        except ValueError as e:
            notes.append(f"tail index: {e}")
        if self.measure_smoothness:
            try:
                smooth = local_smoothness(
                    self.model, self.loss_fn, x, y, grad_at_x=pg.mean_grad, chunk_size=self.chunk_size
                ).smoothness
            except ValueError as e:
                notes.append(f"smoothness: {e}")
        rec = ProbeRecord(
            step=self.step,
            epoch=self.epoch,
            loss=pg.loss,
            grad_norm=pg.grad_norm,
            tail_index=alpha,
            rho=rho,
            smoothness=smooth,
            norm_mean=float(self._probe_norms.mean()),
            norm_quantiles=_quantiles(self._probe_norms),
            notes=notes,
        )
        self.probes.append(rec)
        return rec

    # -- results ------------------------------------------------------------------------------------
    def per_sample_norm_history(self) -> list[np.ndarray]:
        """Per-sample norms of every epoch observed (the open epoch last, if it has any)."""
        self._flush()
        out = list(self._epoch_norms)
        if self._open_norms:
            out.append(np.concatenate(self._open_norms))
        return out

    def sigma_max_history(self) -> dict[str, list[tuple[int, float]]]:
        """Layer -> ``[(step, sigma_max), ...]`` of the gradient spectra observed."""
        self._flush()
        out: dict[str, list[tuple[int, float]]] = {}
        for r in self._spectra:
            out.setdefault(r["layer"], []).append((r["step"], r["sigma"][0] if r["sigma"] else 0.0))
        return out

    def summary(self) -> dict[str, Any]:
        """Every estimate, the suggested thresholds and the verdict, as plain Python values."""
        self._flush()
        notes = list(self.notes)
        alphas = [p.tail_index for p in self.probes if _finite(p.tail_index)]
        rhos = [p.rho for p in self.probes if p.rho is not None]
        # the noise tends to grow heavier as training goes on (Simsekli et al. 2019): judge it
        # by the later half of the probes, with the median against single noisy readings
        recent = alphas[len(alphas) // 2 :]
        alpha = float(np.median(recent)) if recent else None
        rho = max(rhos) if rhos else None

        epoch_norms = self.per_sample_norm_history()
        train_norms = np.concatenate(epoch_norms) if epoch_norms else np.zeros(0)
        source = "training steps"
        if train_norms.size == 0 and self._probe_norms is not None:
            train_norms, source = self._probe_norms, "probe set"
        c = None
        if train_norms.size:
            try:
                c = suggest_max_norm(train_norms, self.clip_quantile)
            except ValueError as e:
                notes.append(f"max_norm: {e}")
        radius = self.max_norm if self.max_norm is not None else c
        epochs = []
        for i, norms in enumerate(epoch_norms):
            rec = self.epochs[i] if i < len(self.epochs) else None
            epochs.append(
                {
                    "epoch": i,
                    "steps": rec.steps if rec else self._open_steps,
                    "samples": int(norms.size),
                    "mean_norm": float(norms.mean()) if norms.size else None,
                    "fraction_clipped": clipped_fraction(norms, radius) if norms.size and radius else None,
                    "mean_loss": rec.mean_loss if rec else None,
                }
            )

        sig = self.sigma_max_history()
        tau = None
        pooled = [v for hist in sig.values() for _, v in hist]
        if pooled:
            try:
                tau = suggest_spectral_threshold(pooled, self.spectral_quantile)
            except ValueError as e:
                notes.append(f"spectral threshold: {e}")
        shares: dict[str, list[float]] = {}
        for r in self._spectra:
            shares.setdefault(r["layer"], []).append(r["top_share"])
        layers = {
            name: {
                "sigma_max_last": hist[-1][1],
                "sigma_max_median": float(np.median([v for _, v in hist])),
                "sigma_max_max": float(max(v for _, v in hist)),
                "top_share_mean": _nanmean(shares.get(name, [])),
            }
            for name, hist in sig.items()
        }

        l0 = l1 = l0_upper = r2 = None
        pts = [(p.grad_norm, p.smoothness) for p in self.probes if _finite(p.smoothness)]
        if pts:
            try:
                fit = fit_l0_l1([a for a, _ in pts], [b for _, b in pts])
                l0, l1, l0_upper, r2 = fit.l0, fit.l1, fit.l0_upper, fit.r2
            except ValueError as e:
                notes.append(f"(L0, L1): {e}")
        # the same curvature readings against the loss: function-gap (L0, L1)-smoothness with
        # f* = 0, the constants rc.l0l1_warmup takes (arXiv:2605.14800, app. C.4)
        l0_gap = l1_gap = None
        gap_pts = [(p.loss, p.smoothness) for p in self.probes if _finite(p.smoothness) and _finite(p.loss)]
        if gap_pts:
            try:
                gfit = fit_l0_l1([max(a, 0.0) for a, _ in gap_pts], [b for _, b in gap_pts])
                l0_gap, l1_gap = gfit.l0, gfit.l1
            except ValueError as e:
                notes.append(f"(L0, L1) against the loss: {e}")
        gnorms = [p.grad_norm for p in self.probes if _finite(p.grad_norm)]
        gmed = float(np.median(gnorms)) if gnorms else None

        v = verdict(
            tail_index=alpha,
            rho=rho,
            batch_size=self.batch_size,
            l0=l0,
            l1=l1,
            grad_norm=gmed,
            sigma_max_history={k: [s for _, s in h] for k, h in sig.items()},
            top_share={k: d["top_share_mean"] for k, d in layers.items()},
            suggested_max_norm=c,
            suggested_spectral_threshold=tau,
        )
        for p in self.probes:
            notes.extend(f"probe at step {p.step}: {n}" for n in p.notes)
        return {
            "verdict": v.text,
            "headline": v.headline,
            "recommendation": v.recommendation,
            "snippet": v.snippet,
            "findings": v.findings,
            "tail_index": alpha,
            "tail_index_history": [p.tail_index for p in self.probes],
            "tail_index_min": min(alphas) if alphas else None,
            "rho": rho,
            "rho_history": [p.rho for p in self.probes],
            "recommended_batch_size": math.ceil(rho - 1e-9) if _finite(rho) else None,
            "batch_size": self.batch_size,
            "suggested_max_norm": c,
            "clip_quantile": self.clip_quantile,
            "per_sample_norm_source": source,
            "suggested_spectral_threshold": tau,
            "spectral_quantile": self.spectral_quantile,
            "l0": l0,
            "l1": l1,
            "l0_upper": l0_upper,
            "l0_gap": l0_gap,
            "l1_gap": l1_gap,
            "l0l1_r2": r2,
            "grad_norm_median": gmed,
            "per_sample_norms": _quantiles(train_norms) if train_norms.size else {},
            "per_sample_norms_mean": float(train_norms.mean()) if train_norms.size else None,
            "epochs": epochs,
            "layers": layers,
            "probes": [asdict(p) for p in self.probes],
            "steps": self.step,
            "settings": {
                "probe_size": int(self.probe_inputs.shape[0]),
                "sketch_dim": self.sketch_dim,
                "layers": self.layers,
                "spectral_rank": self.spectral_rank,
                "spectrum_every": self.spectrum_every,
                "engine": self.engine,
            },
            "notes": notes,
        }

    def save(self, out_dir: str | Path, *, plots: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Path]:
        """Write ``report.md``, ``diagnostics.json``, metrics (CSV and JSONL) and PNG plots.

        Returns name -> path of every file written. Plots need matplotlib.
        """
        from robustclip.diagnostics._report import write_all

        return write_all(self, Path(out_dir), plots=plots, extra=extra or {})


def _finite(x: float | None) -> TypeGuard[float]:
    return x is not None and math.isfinite(x)


def _nanmean(xs: Sequence[float]) -> float | None:
    a = np.asarray(xs, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def _quantiles(a: np.ndarray) -> dict[str, float]:
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {}
    return {f"q{q:g}": float(v) for q, v in norm_statistics(a, DEFAULT_QUANTILES, bins=1).quantiles.items()}
