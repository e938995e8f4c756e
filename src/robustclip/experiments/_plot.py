"""Plot helpers: curves from metrics records, averaged over seeds, overlaid across runs.

Every experiment's ``plot(runs, out_dir)`` uses these, so ``robustclip plot RUN_A RUN_B``
overlays runs the same way a single run plots itself: one line per (run, method), labelled with
the run's directory name when there is more than one run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustclip.experiments._run import RunData

__all__ = ["Panel", "Series", "curves", "save_panels"]


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    style: dict[str, Any] = field(default_factory=dict)


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    logy: bool = False
    logx: bool = False
    ylim: tuple[float | None, float | None] | None = None  # e.g. keep a diverged run off-scale


#: a fixed colour per method label, so a method looks the same in every plot
_ORDER = ("SGD", "SGDM", "Clip-SGD", "NSGD", "PS-Clip-SGD", "Micro-Clip", "Clip-after-acc", "Spectral",
          "Spectral-EMA", "Spectral-Q85")
_LINESTYLES = ("-", "--", ":", "-.")


def color_for(label: Any) -> str:
    """A matplotlib colour for a method label (stable across plots and runs)."""
    text = str(label)
    if text in _ORDER:
        return f"C{_ORDER.index(text) % 10}"
    return f"C{sum(map(ord, text)) % 10}"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _number(v) and math.isfinite(v)


def curves(
    runs: Sequence[RunData],
    y: str,
    x: str = "epoch",
    kind: str = "epoch",
    group: str = "method",
    where: Callable[[dict[str, Any]], bool] | None = None,
    label: Callable[[RunData, Any], str] | None = None,
    by: str | None = None,
) -> list[Series]:
    """One series per (run, ``group`` value), averaged over seeds.

    Records sharing ``x`` are averaged; with ``by`` (e.g. ``by="epoch"`` for ``x="time"``, which
    differs between seeds) records sharing ``by`` are averaged in both ``x`` and ``y``. A
    non-finite ``y`` (a diverged seed) makes the mean at that point NaN, so the line breaks
    where a seed diverged instead of quietly averaging the survivors.
    """
    out = []
    for i, run in enumerate(runs):
        acc: dict[Any, dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
        order: dict[Any, None] = {}
        for r in run.records:
            if r.get("kind") != kind or (where is not None and not where(r)):
                continue
            if not (_finite(r.get(x)) and _number(r.get(y))):
                continue  # records without this metric (e.g. rho_hat only every k epochs)
            g = r.get(group)
            order.setdefault(g, None)
            key = float(r[by]) if by is not None else float(r[x])
            # inf (an overflowed loss) counts as diverged too: NaN keeps it off the axes
            acc[g][key].append((float(r[x]), float(r[y]) if math.isfinite(r[y]) else math.nan))
        for g in order:
            pts = [
                (sum(p[0] for p in v) / len(v), sum(p[1] for p in v) / len(v))
                for _, v in sorted(acc[g].items())
            ]
            name = label(run, g) if label else (f"{run.label}: {g}" if len(runs) > 1 else str(g))
            # colour: the method; line style: the run (when overlaying several)
            style = {"color": color_for(g), "linestyle": _LINESTYLES[i % len(_LINESTYLES)]}
            out.append(Series(name, [p[0] for p in pts], [p[1] for p in pts], style))
    return out


def save_panels(path: str | Path, panels: Sequence[Panel], suptitle: str | None = None) -> Path:
    """Panels side by side in one small PNG (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        for s in p.series:
            ax.plot(s.x, s.y, label=s.label, **({"marker": "o", "ms": 3} if len(s.x) < 25 else {}) | s.style)
        ax.set_title(p.title, fontsize=10)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        if p.logy and any(v > 0 for s in p.series for v in s.y):
            ax.set_yscale("log")
        if p.logx:
            ax.set_xscale("log")
        if p.ylim is not None:
            ax.set_ylim(*p.ylim)
        ax.grid(alpha=0.3)
        if p.series:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
