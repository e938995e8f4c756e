"""Writing the diagnostics to a folder: report.md, diagnostics.json, metrics, PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from robustclip.diagnostics._diagnose import Diagnosis
    from robustclip.diagnostics._tracker import Diagnostics

#: the plots every report has (a plot without data says so on its canvas)
PLOTS = ("norm_histograms.png", "tail_index.png", "rho.png", "sigma_max.png")


def jsonable(x: Any) -> Any:
    """Plain JSON values: NaN and inf become null (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return "∞" if x > 0 else "n/a"
    return format(x, spec)


def write_all(diag: Diagnostics, out: Path, *, plots: bool, extra: dict[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary = diag.summary()
    clash = sorted(set(extra) & set(summary))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite diagnostics; rename them.")
    summary.update(extra)
    paths: dict[str, Path] = {}

    p = out / "diagnostics.json"
    p.write_text(json.dumps(jsonable(summary), indent=2, ensure_ascii=False) + "\n")
    paths["diagnostics.json"] = p

    probe_cols = ["step", "epoch", "loss", "grad_norm", "tail_index", "rho", "smoothness", "norm_mean"]
    paths["probes.csv"] = _write_csv(out / "probes.csv", probe_cols, summary["probes"])
    epoch_cols = ["epoch", "steps", "samples", "mean_norm", "fraction_clipped", "mean_loss"]
    paths["epochs.csv"] = _write_csv(out / "epochs.csv", epoch_cols, summary["epochs"])

    p = out / "metrics.jsonl"
    with p.open("w") as f:
        for r in diag._steps:
            f.write(json.dumps(jsonable({"kind": "step", **r})) + "\n")
        for r in diag._spectra:
            f.write(json.dumps(jsonable({"kind": "spectrum", **r})) + "\n")
        for r in summary["probes"]:
            f.write(json.dumps(jsonable({"kind": "probe", **r}), ensure_ascii=False) + "\n")
        for r in summary["epochs"]:
            f.write(json.dumps(jsonable({"kind": "epoch", **r})) + "\n")
    paths["metrics.jsonl"] = p

    if plots:
        paths.update(_plots(diag, summary, out))
    p = out / "report.md"
    p.write_text(_markdown(summary, [k for k in paths if k.endswith(".png")]))
    paths["report.md"] = p
    return paths


def _nan(v: float | None) -> float:
    return float("nan") if v is None else v


def _write_csv(path: Path, cols: list[str], rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_csv(r[c]) for c in cols])
    return path


def _csv(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "" if v is None or math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _markdown(s: dict[str, Any], pngs: list[str]) -> str:
    name = s.get("experiment")
    title = f"# robustclip diagnostics: {name}" if name else "# robustclip diagnostics"
    lines = [title, "", f"**Verdict:** {s['headline']}.", ""]
    if s.get("snippet"):
        lines += ["```python", s["snippet"], "```", ""]
    lines += ["## Findings", ""] + [f"- {f}" for f in s["findings"]] + [""]
    q = s.get("per_sample_norms") or {}
    rows = [
        ("tail index α̂ (median over the later half of the probes)", _fmt(s["tail_index"], ".3f"), "Simsekli et al. arXiv:1901.06053; Mohammadi et al. 2015"),
        ("smallest α̂ at any probe", _fmt(s["tail_index_min"], ".3f"), ""),
        ("strong growth ρ̂ (largest seen)", _fmt(s["rho"], ".4g"), "Vaswani et al. arXiv:1810.07288; arXiv:2605.14800"),
        ("recommended batch size (b ≥ ρ̂)", _fmt(s["recommended_batch_size"], "d"), "arXiv:2605.14800"),
        ("L0, L1", f"{_fmt(s['l0'])}, {_fmt(s['l1'])}", "Zhang et al. arXiv:1905.11881"),
        (f"suggested per-sample c ({s['clip_quantile']:g}-quantile of norms)", _fmt(s["suggested_max_norm"]), "arXiv:2605.02701"),
        (f"suggested spectral τ ({s['spectral_quantile']:g}-quantile of σ_max)", _fmt(s["suggested_spectral_threshold"]), "arXiv:2605.11838"),
        ("median per-sample gradient norm", _fmt(q.get("q0.5")), s.get("per_sample_norm_source", "")),
        ("99th percentile per-sample norm", _fmt(q.get("q0.99")), ""),
    ]
    lines += ["## Numbers", "", "| quantity | value | source |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows] + [""]
    if s["epochs"]:
        lines += ["## Per epoch", "", "| epoch | mean per-sample norm | fraction clipped at c | mean loss |", "|---|---|---|---|"]
        for e in s["epochs"]:
            lines.append(
                f"| {e['epoch']} | {_fmt(e['mean_norm'])} | {_fmt(e['fraction_clipped'], '.3f')} | {_fmt(e['mean_loss'])} |"
            )
        lines.append("")
    if s["probes"]:
        lines += ["## Probes", "", "| step | loss | ‖∇f‖ | α̂ | ρ̂ | local smoothness |", "|---|---|---|---|---|---|"]
        for p in s["probes"]:
            lines.append(
                f"| {p['step']} | {_fmt(p['loss'])} | {_fmt(p['grad_norm'])} | {_fmt(p['tail_index'], '.3f')} "
                f"| {_fmt(p['rho'])} | {_fmt(p['smoothness'])} |"
            )
        lines.append("")
    if s["layers"]:
        lines += ["## Layers (gradient spectra)", "", "| layer | σ_max last | median | max | top-r share |", "|---|---|---|---|---|"]
        for n, d in s["layers"].items():
            lines.append(
                f"| {n} | {_fmt(d['sigma_max_last'])} | {_fmt(d['sigma_max_median'])} | {_fmt(d['sigma_max_max'])} | {_fmt(d['top_share_mean'], '.2f')} |"
            )
        lines.append("")
    if pngs:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    if s["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in s["notes"]] + [""]
    st = s["settings"]
    lines += [
        "## How these were measured",
        "",
        f"- Probe set: {st['probe_size']} training samples, gradients in eval mode; the tail index "
        f"uses the noise X_j = g_j − ḡ, {'sketched to ' + str(st['sketch_dim']) + ' dimensions by a fixed random projection' if st['sketch_dim'] else 'exact'}"
        f"{', restricted to ' + ', '.join(st['layers']) if st['layers'] else ''}.",
        "- Blocks of K1 ≈ √N samples (Mohammadi et al. 2015). α̂ = 2 is Gaussian; the verdict reads α̂ < 1.8 as heavy-tailed.",
        f"- Gradient spectra: top {st['spectral_rank']} singular values of each matrix gradient, every {st['spectrum_every']} step(s).",
        "- Local smoothness: ‖∇f(x + r u) − ∇f(x)‖ / r along u = −∇f/‖∇f‖ at each probe; the (L0, L1) fit is non-negative least squares.",
        "",
    ]
    return "\n".join(lines)


def _plots(diag: Diagnostics, s: dict[str, Any], out: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is a dev/experiments extra
        raise ImportError(
            "the diagnostics plots need matplotlib: pip install 'robustclip[experiments]', or "
            "pass plots=False."
        ) from e
    paths: dict[str, Path] = {}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths[name] = p

    def empty(ax: Any, what: str) -> None:
        ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)

    # per-sample norm histograms, one curve per epoch
    fig, ax = plt.subplots(figsize=(6.4, 4))
    hist = diag.per_sample_norm_history()
    label = "epoch"
    if not any(h.size for h in hist) and diag._probe_norms is not None:
        hist, label = [diag._probe_norms], "probe"
    pos_all = np.concatenate([h[h > 0] for h in hist]) if hist else np.zeros(0)
    if pos_all.size:
        lo, hi = pos_all.min(), pos_all.max()
        # log-spaced bins once the norms span more than a decade (heavy tails), linear otherwise
        wide = hi > 10 * lo
        if hi <= lo:
            edges = np.array([lo * 0.9, hi * 1.1])
        else:
            edges = np.geomspace(lo, hi, 41) if wide else np.linspace(lo, hi, 41)
        cmap = plt.get_cmap("viridis")
        for i, h in enumerate(hist):
            if h.size:
                ax.hist(h[h > 0], bins=edges.tolist(), histtype="step", density=True, color=cmap(i / max(len(hist) - 1, 1)), label=f"{label} {i}")
        if wide:
            ax.set_xscale("log")
        if s["suggested_max_norm"]:
            ax.axvline(s["suggested_max_norm"], color="red", ls="--", label=f"suggested c = {s['suggested_max_norm']:.3g}")
        ax.legend(fontsize=7)
    else:
        empty(ax, "per-sample norms")
    ax.set_xlabel("per-sample gradient norm ‖g_i‖")
    ax.set_ylabel("density")
    ax.set_title("Per-sample gradient norms")
    save(fig, "norm_histograms.png")

    probes = s["probes"]
    for key, name, title, ylabel in (
        ("tail_index", "tail_index.png", "Tail index α̂ of the gradient noise", "α̂"),
        ("rho", "rho.png", "Strong growth constant ρ̂", "ρ̂"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        pts = [(p["step"], p[key]) for p in probes if p[key] is not None and math.isfinite(p[key])]
        if pts:
            ax.plot([a for a, _ in pts], [b for _, b in pts], "o-")
            if key == "tail_index":
                ax.axhline(2.0, color="gray", ls=":", label="Gaussian (α = 2)")
                ax.axhline(1.8, color="red", ls="--", label="heavy-tail line (1.8)")
            elif s.get("batch_size"):
                ax.axhline(s["batch_size"], color="red", ls="--", label=f"batch size {s['batch_size']}")
            if key == "rho":
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            empty(ax, ylabel)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    sig = diag.sigma_max_history()
    if sig:
        for layer, pairs in sig.items():
            ax.plot([a for a, _ in pairs], [b for _, b in pairs], lw=1, label=layer)
        if s["suggested_spectral_threshold"]:
            ax.axhline(s["suggested_spectral_threshold"], color="red", ls="--", label=f"suggested τ = {s['suggested_spectral_threshold']:.3g}")
        ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2)
    else:
        empty(ax, "gradient spectra")
    ax.set_xlabel("training step")
    ax.set_ylabel("σ_max of the layer gradient")
    ax.set_title("Top singular value per layer")
    save(fig, "sigma_max.png")

    if s["epochs"]:
        # two panels, as the PS-Clip paper shows them: mean per-sample norm, fraction clipped
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 5), sharex=True)
        ep = s["epochs"]
        xs = [e["epoch"] for e in ep]
        ax1.plot(xs, [_nan(e["mean_norm"]) for e in ep], "o-")
        ax1.set_ylabel("mean ‖g_i‖")
        ax1.set_title("Per epoch: average per-sample gradient norm and fraction clipped")
        ax2.plot(xs, [_nan(e["fraction_clipped"]) for e in ep], "s-", color="C1")
        ax2.set_ylabel("fraction clipped at c")
        ax2.set_xlabel("epoch")
        ax2.xaxis.get_major_locator().set_params(integer=True)
        save(fig, "per_epoch.png")

    pts = [(p["grad_norm"], p["smoothness"]) for p in probes if p["smoothness"] is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        g = np.array([a for a, _ in pts])
        ax.plot(g, [b for _, b in pts], "o", label="probes")
        if s["l0"] is not None:
            gs = np.linspace(0, g.max() * 1.05, 50)
            ax.plot(gs, s["l0"] + s["l1"] * gs, "r--", label=f"L0 + L1‖∇f‖ (L0={s['l0']:.3g}, L1={s['l1']:.3g})")
        ax.set_xlabel("‖∇f(x)‖ on the probe set")
        ax.set_ylabel("local smoothness")
        ax.set_title("(L0, L1)-smoothness along training")
        ax.legend(fontsize=8)
        save(fig, "smoothness.png")
    return paths


# -- diagnose(): the verdict with its evidence -----------------------------------------------------


def write_diagnosis(d: Diagnosis, out: Path, *, plots: bool) -> dict[str, Path]:
    """``verdict.json``, ``report.md`` and ``pilot.png`` of a :class:`Diagnosis`."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    p = out / "verdict.json"
    p.write_text(json.dumps(jsonable(d.as_dict()), indent=2, ensure_ascii=False) + "\n")
    paths["verdict.json"] = p
    if plots:
        paths["pilot.png"] = _pilot_plot(d, out / "pilot.png")
    p = out / "report.md"
    p.write_text(_diagnosis_markdown(d, "pilot.png" in paths))
    paths["report.md"] = p
    return paths


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Trailing mean over ``width`` steps, NaN-aware (a skipped step leaves a gap)."""
    out = np.full(x.shape, np.nan)
    for i in range(x.size):
        w = x[max(0, i - width + 1) : i + 1]
        w = w[np.isfinite(w)]
        if w.size:
            out[i] = w.mean()
    return out


def _pilot_plot(d: Diagnosis, path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is a dev/experiments extra
        raise ImportError(
            "the pilot plot needs matplotlib: pip install 'robustclip[experiments]', or pass plots=False."
        ) from e
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    trunk = np.asarray(d.trunk_losses, dtype=np.float64)
    s0 = trunk.size
    longest = max([s0] + [s0 + len(c["losses"]) for c in d.candidates])
    width = max(1, longest // 40)
    if s0:
        ax.plot(np.arange(1, s0 + 1), _smooth(trunk, width), color="black", lw=1.2, label="statistics run (no clipping)")
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(d.candidates):
        y = _smooth(np.asarray(c["losses"], dtype=np.float64), width)
        style = "-" if c["eliminated_at_rung"] is None else "--"
        lw = 2.2 if i == 0 else 1.0
        tag = " (verdict)" if i == 0 else (" (diverged)" if c["diverged"] else "")
        ax.plot(s0 + np.arange(1, y.size + 1), y, style, lw=lw, color=cmap(i % 10), label=c["label"] + tag)
    ax.axvline(s0, color="black", ls=":", lw=0.8)
    for _, end in d.rungs[:-1]:
        ax.axvline(s0 + end, color="gray", ls=":", lw=0.8)
    finite = [v for c in d.candidates for v in c["losses"] if v is not None and math.isfinite(v) and v > 0]
    finite += [v for v in d.trunk_losses if math.isfinite(v) and v > 0]
    if finite and max(finite) > 20 * min(finite):
        ax.set_yscale("log")
    ax.set_xlabel("step (dotted: branch point and rung ends; dashed: eliminated)")
    ax.set_ylabel(f"training loss (trailing mean over {width} steps)")
    ax.set_title(f"Pilot race: {d.headline}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_DESIGNS = {
    "staged": "stage 1 picks the method at middle radii, stage 2 the radius from the point stage 1 reached",
    "halving": "successive halving, eta = 3, survivors restarting from the leader",
}


def _diagnosis_markdown(d: Diagnosis, plot: bool) -> str:
    s = d.statistics
    lines = ["# robustclip diagnose: verdict", "", f"**Verdict:** {d.headline}.", ""]
    lines += ["```python", d.snippet, "```", "", f"**Confidence: {d.confidence}.** {d.confidence_reason}", ""]
    if d.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in d.warnings] + [""]
    lines += ["## The pilot", ""]
    rungs = ", ".join(f"{a} arms to step {e}" for a, e in d.rungs)
    lines += [
        f"A statistics run without clipping ({len(d.trunk_losses)} steps), then every candidate branches "
        f"from its end and they race ({_DESIGNS.get(d.pilot, d.pilot)}): {rungs}. Cost, probes and "
        f"rho passes included: {d.pilot_steps:.0f} training-step "
        f"equivalents = {d.pilot_cost_frac:.1%} of the {d.planned_steps} planned steps (budget "
        f"{d.budget:.0%}), seed {d.seed}.",
        "",
        "| rank | candidate | radius from | score per rung (lower is better) | steps | out at rung |",
        "|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(d.candidates):
        q = "" if c["quantile"] is None else f"q{c['quantile']:g} of observed"
        sc = ", ".join(_fmt(v) for v in c["scores"])
        out = "" if c["eliminated_at_rung"] is None else str(c["eliminated_at_rung"])
        out += " (diverged)" if c["diverged"] else ""
        lines.append(f"| {i + 1} | {c['label']} | {q} | {sc} | {c['steps']} | {out} |")
    lines.append("")
    if plot:
        lines += ["![pilot curves](pilot.png)", ""]
    lines += ["## Why these candidates", "", "| method | what the statistics say |", "|---|---|"]
    lines += [f"| {m} | {w} |" for m, w in d.evidence.items()] + [""]
    rows = [
        ("tail index α̂ (median, later probes)", _fmt(s.get("tail_index"), ".3f")),
        ("strong growth ρ̂ (" + str(s.get("rho_source")) + ", largest)", _fmt(s.get("rho"))),
        ("ρ̂ on the probe subset (biased toward its size)", _fmt(s.get("rho_probe_subset"))),
        ("batch size / recommended (b ≥ ρ̂)", f"{s.get('batch_size')} / {_fmt(s.get('recommended_batch_size'), 'd')}"),
        ("gradient-norm (L0, L1) (Zhang et al.)", f"{_fmt(s.get('l0'))}, {_fmt(s.get('l1'))}"),
        ("function-gap (L0, L1), f* = 0 (for rc.l0l1_warmup)", f"{_fmt(s.get('l0_gap'))}, {_fmt(s.get('l1_gap'))}"),
        ("per-sample norm q0.1 / q0.5 / q0.9", " / ".join(_fmt((s.get("per_sample_norms") or {}).get(k)) for k in ("q0.1", "q0.5", "q0.9"))),
        ("batch gradient norm q0.1 / q0.5 / q0.9", " / ".join(_fmt((s.get("batch_grad_norms") or {}).get(k)) for k in ("q0.1", "q0.5", "q0.9"))),
    ]
    lines += ["## Statistics", "", "| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows] + [""]
    if s.get("layers"):
        lines += ["| layer | σ_max median | σ_max max | spike ratio | top-r share |", "|---|---|---|---|---|"]
        for n, v in s["layers"].items():
            lines.append(
                f"| {n} | {_fmt(v['sigma_max_median'])} | {_fmt(v['sigma_max_max'])} | "
                f"{_fmt((s.get('spike_ratios') or {}).get(n))} | {_fmt(v['top_share_mean'], '.2f')} |"
            )
        lines.append("")
    lines += [
        "## How to read this",
        "",
        "- The verdict is the pilot's winner, not a rule applied to the statistics; the statistics "
        "choose which methods race and set their radii (0.1-, 0.5- and 0.9-quantiles of the quantity "
        "each method clips, observed along the baseline's run).",
        "- A pilot is short: it ranks the methods by their progress over its horizon. A method "
        "whose advantage only shows late in training can lose it; the confidence says how clear the "
        "margin was.",
        "",
    ]
    return "\n".join(lines)
