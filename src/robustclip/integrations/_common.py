"""What the framework integrations share: the missing-extra error and the logged readings."""

from __future__ import annotations

from torch import Tensor

from robustclip._clipper import StepInfo


def missing(module: str, extra: str) -> ImportError:
    """The error for a framework that is not installed: it names the extra that installs it."""
    return ImportError(
        f"robustclip.integrations.{extra} needs the {module!r} package, which is not "
        f"installed: pip install 'robustclip[{extra}]'"
    )


class Readings:
    """Per-step readings kept on the device between logging steps, read once when logged.

    ``add`` costs a few small device operations and no host read; ``flush`` reads everything
    (one sync, at a logging step) and starts a new window.

    Logged keys (prefix ``robustclip/``): ``grad_norm`` (global norm of the averaged gradient
    before the batch-level transforms, last step), ``clipped_fraction`` (mean over the window's
    steps of the share of samples or micro-batches clipped, per-sample and micro-batch methods),
    ``skipped_steps`` (total so far), ``layer_norm/<layer>`` (last step's per-layer norms before
    the transforms, when computed), and ``<transform>/<reading>`` for every scalar reading of the
    batch-level transforms (e.g. ``clip_by_global_norm/clipped``, averaged over the window).
    """

    def __init__(self, group_names: list[str]) -> None:
        self.group_names = group_names
        self.skipped_steps = 0
        self._reset()

    def _reset(self) -> None:
        self._steps = 0
        self._sums: dict[str, Tensor] = {}
        self._last: dict[str, Tensor] = {}
        self._layer_norms: Tensor | None = None

    def add(self, info: StepInfo) -> None:
        if info.skipped:
            self.skipped_steps += 1
            return
        self._steps += 1
        if info.grad_norm is not None:
            self._last["grad_norm"] = info.grad_norm
        summed: dict[str, Tensor] = {}
        if info.clipped_fraction is not None:
            summed["clipped_fraction"] = info.clipped_fraction
        for name, readings in info.transforms.items():
            if isinstance(readings, dict):
                for key, value in readings.items():
                    if isinstance(value, Tensor) and value.dim() == 0:
                        summed[f"{name}/{key}"] = value
        for key, value in summed.items():
            v = value.detach().double()
            self._sums[key] = self._sums[key] + v if key in self._sums else v
        if info.layer_norms is not None:
            self._layer_norms = info.layer_norms

    def flush(self) -> dict[str, float]:
        """The window's readings as plain floats (reads the device), then a new window."""
        out: dict[str, float] = {}
        for key, value in self._last.items():
            out[f"robustclip/{key}"] = float(value)
        n = max(self._steps, 1)
        for key, value in self._sums.items():
            out[f"robustclip/{key}"] = float(value) / n
        if self._layer_norms is not None:
            for name, v in zip(self.group_names, self._layer_norms.tolist()):
                out[f"robustclip/layer_norm/{name}"] = v
        out["robustclip/skipped_steps"] = float(self.skipped_steps)
        self._reset()
        return out
