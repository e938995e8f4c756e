"""Clipping thresholds as small objects with explicit state.

Every clipping method in robustclip (global norm, per-tensor norm, per-sample, micro-batch and
spectral clipping) takes its radius either as a number or as a threshold object. A threshold
follows the same three-function shape as a gradient transform:

* ``init(device) -> state``: a NamedTuple of tensors, saved in ``Clipper.state_dict()``;
* ``value(state) -> Tensor``: the radius to use *now*, a 0-d float tensor on the device
  (a constant radius is float64 where the device has it, so float64 training is exact)
  (``inf`` means "do not clip this step");
* ``observe(state, values) -> state``: fold in this step's observed values, a 1-D tensor
  (one global norm, a micro-batch's per-sample norms, or a layer's top singular value).

A clipping method always reads ``value`` *before* it observes the current values, so an adaptive
radius is a statistic of the *previous* values only, and the current gradient cannot raise the
bar it is measured against.

Everything stays on the device, so an adaptive threshold never forces a host-device sync.
``observe`` is pure: it returns a new state and never writes into the old one, which is what
lets the :class:`robustclip.Clipper` roll a threshold back when it skips a non-finite step.
Zero and non-finite entries of ``values`` are ignored, and a call with no positive finite value
leaves the state as it was: all-zero gradients (a batch whose targets are all ``ignore_index``,
an unused parameter) say nothing about the size of a gradient, and observing them would drive a
radius to 0 and the next clip coefficient to 0/0. Positive values below the smallest normal
float32 (1.2e-38) are observed as that number, and the adaptive radii are floored there too, so
no radius is ever 0.

What a rule does with a *vector* of values (the per-sample norms of a micro-batch):

=====================  =====================================================================
rule                   one ``observe(values)`` call
=====================  =====================================================================
:class:`Constant`      nothing
:class:`EMA`           one EMA step with the mean of the values
:class:`WindowQuantile`  every value enters the window (the window counts values, not calls)
:class:`AutoClip`      every value enters the history
:class:`ZClip`         one EMA step with the values' mean and their mean squared deviation
=====================  =====================================================================

So with ``per_sample_clip(EMA())`` the radius tracks the average per-sample norm of recent
micro-batches, and with ``per_sample_clip(WindowQuantile(q=0.85, window=1024))`` it is the
0.85-quantile of the last 1024 per-sample norms. With one value per call (global norm, a layer's
top singular value) every rule reduces to its textbook form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any, NamedTuple, Protocol, TypeVar, cast, runtime_checkable

import torch
from torch import Tensor

from robustclip._validate import check_max_norm, check_positive_int

__all__ = [
    "Threshold",
    "Constant",
    "NoClip",
    "EMA",
    "WindowQuantile",
    "AutoClip",
    "ZClip",
    "as_threshold",
]


@runtime_checkable
class Threshold(Protocol):
    """Protocol every threshold implements (see the module docstring)."""

    def init(self, device: torch.device | str | None = None) -> Any: ...

    def value(self, state: Any) -> Tensor: ...

    def observe(self, state: Any, values: Tensor) -> Any: ...


# -- checks and small helpers ------------------------------------------------------------------


def _check_unit(value: object, name: str, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
    v = float(value)
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (math.isfinite(v) and lo_ok and hi_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {interval}, got {value}.")
    return v


def _check_scale(value: object, name: str = "scale") -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive number such as 1.0, got {type(value).__name__}.")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}.")
    return v


_INF = float("inf")


#: the smallest normal float32: the floor of every observed value and adaptive radius
_TINY = float(torch.finfo(torch.float32).tiny)


def _flat(values: Tensor) -> tuple[Tensor, Tensor]:
    """``values`` as a detached 1-D float32 tensor floored at ``_TINY``, and the mask of the
    entries to observe: finite and > 0 (see the module docstring)."""
    if not isinstance(values, Tensor):
        raise TypeError(
            f"a threshold observes a tensor of values, got {type(values).__name__}; pass e.g. "
            "norm.reshape(1)."
        )
    v = values.detach().reshape(-1).float()
    return v.clamp(min=_TINY), torch.isfinite(v) & (v > 0)


def _moments(v: Tensor, ok: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and sum of squared deviations of the finite entries (0 when none)."""
    n = ok.sum()
    mean = torch.where(ok, v, 0.0).sum() / n.clamp(min=1)
    m2 = torch.where(ok, v - mean, 0.0).pow(2).sum()
    return n, mean, m2


_State = TypeVar("_State", bound=tuple[Tensor, ...])


def _select(keep_new: Tensor, new: _State, old: _State) -> _State:
    """Field-wise ``where(keep_new, new, old)`` over two states of the same NamedTuple type."""
    # a NamedTuple class takes its fields positionally, not tuple's single iterable
    make = cast(Callable[..., _State], type(new))
    return make(*(torch.where(keep_new, a, b) for a, b in zip(new, old)))


def _sorted_quantile(buffer: Tensor, n_valid: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile (numpy's default) of ``buffer[:n_valid]``; 0 if empty.

    ``n_valid`` is a device tensor: the unused slots are pushed to the end by sorting them as
    ``+inf``, and the two order statistics are gathered, so nothing is read on the host.
    """
    size = buffer.shape[0]
    valid = torch.arange(size, device=buffer.device) < n_valid
    s = torch.sort(torch.where(valid, buffer, _INF)).values
    s = torch.where(torch.isfinite(s), s, 0.0)
    last = (n_valid - 1).clamp(min=0)
    pos = q * last.float()
    lo = pos.floor().long().clamp(0, size - 1)
    hi = torch.minimum(lo + 1, last).clamp(0, size - 1)
    frac = pos - lo.float()
    a, b = s[lo], s[hi]
    return a + frac * (b - a)


def _sorted_order_statistic(buffer: Tensor, n_valid: Tensor, index: Tensor) -> Tensor:
    """``sorted(buffer[:n_valid])[index]`` (0 if empty), without a host read."""
    size = buffer.shape[0]
    valid = torch.arange(size, device=buffer.device) < n_valid
    s = torch.sort(torch.where(valid, buffer, _INF)).values
    s = torch.where(torch.isfinite(s), s, 0.0)
    return s[index.clamp(0, size - 1)]


# -- constant ------------------------------------------------------------------------------------


def radius_dtype(device: torch.device | str | None) -> torch.dtype:
    """float64 for constant radii (exact float64 training), float32 where the device lacks it (MPS)."""
    return torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64


class ConstantState(NamedTuple):
    radius: Tensor


class Constant:
    """A fixed radius ``c`` (``c > 0`` and finite; see :func:`as_threshold` for ``None``)."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = check_max_norm(max_norm)

    def init(self, device: torch.device | str | None = None) -> ConstantState:
        return ConstantState(torch.tensor(self.max_norm, dtype=radius_dtype(device), device=device))

    def value(self, state: ConstantState) -> Tensor:
        return state.radius

    def observe(self, state: ConstantState, values: Tensor) -> ConstantState:
        return state

    def __repr__(self) -> str:
        return f"Constant({self.max_norm})"


class _NoClipState(NamedTuple):
    radius: Tensor


class NoClip:
    """Radius ``+inf``: clipping is off (what ``max_norm=None`` means)."""

    def init(self, device: torch.device | str | None = None) -> _NoClipState:
        return _NoClipState(torch.tensor(_INF, dtype=radius_dtype(device), device=device))

    def value(self, state: _NoClipState) -> Tensor:
        return state.radius

    def observe(self, state: _NoClipState, values: Tensor) -> _NoClipState:
        return state

    def __repr__(self) -> str:
        return "NoClip()"


# -- EMA -----------------------------------------------------------------------------------------


class EMAState(NamedTuple):
    steps: Tensor  # int64: observe calls that had at least one finite value
    ema: Tensor  # float32: the biased EMA m_t = beta m_{t-1} + (1 - beta) x_t, m_0 = 0


class EMA:
    """``scale`` times a bias-corrected EMA of the previous values.

    After ``t`` observations ``x_1..x_t`` the radius is ``scale * m_t / (1 - beta**t)`` with
    ``m_t = beta m_{t-1} + (1 - beta) x_t`` and ``m_0 = 0``; before the first observation it is
    ``inf`` (the first step does not clip). This is the layer-wise adaptive threshold of
    spectral clipping (Yukhimchuk et al., arXiv:2605.11838), where ``x_t`` is a layer's top
    singular value; it works the same on any norm. A vector of values counts as one
    observation, its mean.

    Args:
        beta: EMA decay in ``[0, 1)``; 0.9 as in the paper.
        scale: multiplier ``> 0`` on the average (``scale=2`` clips only at twice the average).
    """

    def __init__(self, beta: float = 0.9, scale: float = 1.0) -> None:
        self.beta = _check_unit(beta, "beta", low_open=False, high_open=True)
        self.scale = _check_scale(scale)

    def init(self, device: torch.device | str | None = None) -> EMAState:
        return EMAState(
            torch.zeros((), dtype=torch.int64, device=device),
            torch.zeros((), dtype=torch.float32, device=device),
        )

    def value(self, state: EMAState) -> Tensor:
        t = state.steps.float()
        correction = (1.0 - torch.pow(torch.full_like(t, self.beta), t)).clamp(min=1e-30)
        return torch.where(state.steps > 0, (self.scale * state.ema / correction).clamp(min=_TINY), _INF)

    def observe(self, state: EMAState, values: Tensor) -> EMAState:
        v, ok = _flat(values)
        n, mean, _ = _moments(v, ok)
        new = EMAState(state.steps + 1, self.beta * state.ema + (1.0 - self.beta) * mean)
        return _select(n > 0, new, state)

    def __repr__(self) -> str:
        return f"EMA(beta={self.beta}, scale={self.scale})"


# -- sliding-window quantile ---------------------------------------------------------------------


class WindowQuantileState(NamedTuple):
    buffer: Tensor  # (window + 1,) ring buffer of the last values; the last slot is scratch
    # the field shadows tuple.count, which these states never use
    count: Tensor  # type: ignore[assignment]  # int64: finite values recorded so far


class WindowQuantile:
    """``scale`` times the ``q``-quantile of the last ``window`` values, the current excluded.

    The layer-wise sliding-window threshold of spectral clipping (arXiv:2605.11838;
    ``q = 0.85`` over the last 100 top singular values). By default the quantile is the order
    statistic the authors' code takes, ``sorted(h)[int(q * (n - 1))]`` over the ``n`` values
    in the window (``method="lower"``, numpy's ``method="lower"``): never above the linearly
    interpolated quantile, and always one of the values seen. ``method="linear"``
    interpolates between the two neighbouring order statistics (numpy's default); with
    heavy-tailed values it can sit well above the official threshold (up to about 30% on
    spectral-clipping histories), so it is an option, not the default.

    Until a first value is observed the radius is ``inf``; with fewer than ``window`` values it
    is the quantile of those seen. The window counts values, so with per-sample norms it spans
    ``window / batch`` micro-batches: choose ``window`` accordingly.

    Args:
        q: the quantile level in ``[0, 1]``.
        window: how many recent values to keep (>= 1).
        scale: multiplier ``> 0`` on the quantile.
        method: ``"lower"`` (the official rule, default) or ``"linear"``.
    """

    METHODS = ("lower", "linear")

    def __init__(
        self, q: float = 0.85, window: int = 100, scale: float = 1.0, method: str = "lower"
    ) -> None:
        self.q = _check_unit(q, "q", low_open=False, high_open=False)
        self.window = check_positive_int(window, "window")
        self.scale = _check_scale(scale)
        if method not in self.METHODS:
            raise ValueError(
                f"method must be 'lower' (sorted(h)[int(q * (n - 1))], the spectral-clipping "
                f"paper's rule) or 'linear' (numpy's default interpolation), got {method!r}."
            )
        self.method = method
        # the official index int(q * (n - 1)) for every fill level n, computed once in float64
        # on the host so that it matches the reference bit for bit (no float32 rounding of q)
        self._lower_index = [int(self.q * (n - 1)) if n > 0 else 0 for n in range(self.window + 1)]
        self._index_cache: dict[torch.device, Tensor] = {}

    def init(self, device: torch.device | str | None = None) -> WindowQuantileState:
        return WindowQuantileState(
            torch.zeros(self.window + 1, dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        )

    def value(self, state: WindowQuantileState) -> Tensor:
        n = state.count.clamp(max=self.window)
        if self.method == "linear":
            quant = _sorted_quantile(state.buffer[: self.window], n, self.q)
        else:
            quant = _sorted_order_statistic(state.buffer[: self.window], n, self._index(n.device)[n])
        return torch.where(n > 0, self.scale * quant, _INF)

    def _index(self, device: torch.device) -> Tensor:
        table = self._index_cache.get(device)
        if table is None:
            table = torch.tensor(self._lower_index, dtype=torch.int64, device=device)
            self._index_cache[device] = table
        return table

    def observe(self, state: WindowQuantileState, values: Tensor) -> WindowQuantileState:
        v, ok = _flat(values)
        n_new = ok.sum()
        rank = torch.cumsum(ok.long(), 0) - 1  # position among this call's finite values
        # only the last `window` finite values of this call can survive; the rest (and the
        # non-finite ones) go to the scratch slot, so no two kept values share a slot.
        keep = ok & (rank >= n_new - self.window)
        slot = torch.where(keep, (state.count + rank) % self.window, self.window)
        buffer = state.buffer.clone().scatter_(0, slot, torch.where(ok, v, 0.0))
        return WindowQuantileState(buffer, state.count + n_new)

    def __repr__(self) -> str:
        return f"WindowQuantile(q={self.q}, window={self.window}, scale={self.scale}, method={self.method!r})"


# -- AutoClip ------------------------------------------------------------------------------------


class AutoClipState(NamedTuple):
    exact: Tensor  # (capacity + 1,) the first `capacity` values; the last slot is scratch
    hist: Tensor  # (bins,) int64 counts of every value on a log-spaced grid
    # the field shadows tuple.count, which these states never use
    count: Tensor  # type: ignore[assignment]  # int64: finite values observed so far


class AutoClip:
    """AutoClip: ``scale`` times the ``q``-quantile of the whole history of previous values.

    Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks" (arXiv:2007.14469), who clip the gradient norm at the p-th percentile
    of all gradient norms seen so far (p = 10 worked well for them: ``q = 0.1``).

    Memory stays bounded: the first ``capacity`` values are kept exactly, and while the history
    is no longer than that the quantile is exact (linear interpolation, numpy's default).
    Every value is also counted in a histogram of ``bins`` log-spaced bins over
    ``[1e-12, 1e12]`` (values outside are counted in the end bins); past ``capacity`` values
    the quantile is read from it, as the geometric centre of the bin holding the order
    statistic ``round(q (n - 1))``, which is within half a bin, 0.7% for 4096 bins, of the
    exact value. Unlike the paper the current value is not part of the history (see the
    module docstring): before the first observation the radius is ``inf``.

    Args:
        q: the quantile level in ``[0, 1]`` (the paper's percentile p is ``100 q``).
        scale: multiplier ``> 0`` on the quantile.
        capacity: how many values are kept exactly (>= 1).
        bins: number of histogram bins (>= 2).
    """

    LOW, HIGH = 1e-12, 1e12

    def __init__(
        self, q: float = 0.1, scale: float = 1.0, capacity: int = 1024, bins: int = 4096
    ) -> None:
        self.q = _check_unit(q, "q", low_open=False, high_open=False)
        self.scale = _check_scale(scale)
        self.capacity = check_positive_int(capacity, "capacity")
        self.bins = check_positive_int(bins, "bins")
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}.")
        self._log_low = math.log(self.LOW)
        self._log_width = (math.log(self.HIGH) - self._log_low) / self.bins

    def init(self, device: torch.device | str | None = None) -> AutoClipState:
        return AutoClipState(
            torch.zeros(self.capacity + 1, dtype=torch.float32, device=device),
            torch.zeros(self.bins, dtype=torch.int64, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        )

    def bin_of(self, v: Tensor) -> Tensor:
        """Histogram bin of each value (clamped into the grid)."""
        logv = torch.log(v.clamp(min=self.LOW, max=self.HIGH).double())
        return ((logv - self._log_low) / self._log_width).floor().long().clamp(0, self.bins - 1)

    def value(self, state: AutoClipState) -> Tensor:
        n = state.count
        exact = _sorted_quantile(state.exact[: self.capacity], n.clamp(max=self.capacity), self.q)
        # the bin holding order statistic k is the first whose cumulative count exceeds k
        k = torch.round(self.q * (n - 1).clamp(min=0).double()).long()
        cum = torch.cumsum(state.hist, 0)
        b = torch.searchsorted(cum, k.reshape(1), right=True).reshape(()).clamp(max=self.bins - 1)
        approx = torch.exp(self._log_low + (b.double() + 0.5) * self._log_width).float()
        quant = torch.where(n <= self.capacity, exact, approx)
        return torch.where(n > 0, (self.scale * quant).clamp(min=_TINY), _INF)

    def observe(self, state: AutoClipState, values: Tensor) -> AutoClipState:
        v, ok = _flat(values)
        v0 = torch.where(ok, v, 1.0)
        rank = torch.cumsum(ok.long(), 0) - 1
        pos = state.count + rank
        slot = torch.where(ok & (pos < self.capacity), pos, self.capacity)
        exact = state.exact.clone().scatter_(0, slot, torch.where(ok, v, 0.0))
        hist = state.hist.clone().index_add_(0, self.bin_of(v0), ok.long())
        return AutoClipState(exact, hist, state.count + ok.sum())

    def __repr__(self) -> str:
        return (
            f"AutoClip(q={self.q}, scale={self.scale}, capacity={self.capacity}, bins={self.bins})"
        )


# -- ZClip ---------------------------------------------------------------------------------------


class ZClipState(NamedTuple):
    steps: Tensor  # int64: observe calls with at least one finite value
    # the field shadows tuple.count, which these states never use
    count: Tensor  # type: ignore[assignment]  # int64: values pooled during warm-up
    mean: Tensor  # float32: pooled mean during warm-up, then the EMA mean
    m2: Tensor  # float32: pooled sum of squared deviations during warm-up
    var: Tensor  # float32: the EMA variance (set when warm-up ends)


class ZClip:
    """ZClip: radius ``mu + z sigma`` from an EMA of the mean and variance of the values.

    Kumar, Owen, Roy Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"
    (arXiv:2504.02507). During the first ``warmup`` observations the radius is ``inf`` and the
    values are pooled; then ``mu`` and ``sigma**2`` start as their mean and (population)
    variance and follow

        x' = min(x, mu + z sigma),
        mu <- alpha mu + (1 - alpha) x',    sigma**2 <- alpha sigma**2 + (1 - alpha) (x' - mu)**2

    (``mu`` already updated in the second line, as in the authors' code). Updating with the
    clipped ``x'`` keeps a spike from inflating the statistics that judge the next spike. A
    vector of values is one EMA step with its mean and its mean squared deviation from ``mu``;
    with one value this is the formula above.

    The authors' default ``"adaptive_scaling"`` option lowers the radius further the larger the
    *current* z-score is; a radius that depends on the current value does not fit the
    read-then-observe protocol, so this is their fixed ``mu + z sigma`` rule.

    Args:
        z: the z-score at which to clip (> 0); 2.5 as in the paper.
        alpha: EMA decay in ``[0, 1)``; 0.97 as in the paper.
        warmup: observations pooled before clipping starts (>= 1); 25 as in the paper.
    """

    def __init__(self, z: float = 2.5, alpha: float = 0.97, warmup: int = 25) -> None:
        self.z = _check_scale(z, "z")
        self.alpha = _check_unit(alpha, "alpha", low_open=False, high_open=True)
        self.warmup = check_positive_int(warmup, "warmup")

    def init(self, device: torch.device | str | None = None) -> ZClipState:
        def z(dtype: torch.dtype) -> Tensor:
            return torch.zeros((), dtype=dtype, device=device)

        return ZClipState(
            z(torch.int64), z(torch.int64), z(torch.float32), z(torch.float32), z(torch.float32)
        )

    def _radius(self, state: ZClipState) -> Tensor:
        return state.mean + self.z * state.var.clamp(min=0).sqrt()

    def value(self, state: ZClipState) -> Tensor:
        return torch.where(state.steps >= self.warmup, self._radius(state).clamp(min=_TINY), _INF)

    def observe(self, state: ZClipState, values: Tensor) -> ZClipState:
        v, ok = _flat(values)
        n_b, mean_b, m2_b = _moments(v, ok)
        # warm-up: merge this call's moments into the pooled ones (Chan et al.'s pairwise rule)
        n = state.count + n_b
        delta = mean_b - state.mean
        w_mean = state.mean + delta * (n_b / n.clamp(min=1))
        w_m2 = state.m2 + m2_b + delta.pow(2) * (state.count * n_b / n.clamp(min=1))
        ends = state.steps + 1 == self.warmup
        w_var = torch.where(ends, w_m2 / n.clamp(min=1), state.var)
        warm = ZClipState(state.steps + 1, n, w_mean, w_m2, w_var)
        # after warm-up: one EMA step with the clipped values
        xc = torch.minimum(v, self._radius(state))
        _, mean_c, _ = _moments(xc, ok)
        mu = self.alpha * state.mean + (1 - self.alpha) * mean_c
        sq = torch.where(ok, xc - mu, 0.0).pow(2).sum() / n_b.clamp(min=1)
        var = self.alpha * state.var + (1 - self.alpha) * sq
        ema = ZClipState(state.steps + 1, state.count, mu, state.m2, var)
        new = _select(state.steps >= self.warmup, ema, warm)
        return _select(n_b > 0, new, state)

    def __repr__(self) -> str:
        return f"ZClip(z={self.z}, alpha={self.alpha}, warmup={self.warmup})"


def as_threshold(max_norm: object, name: str = "max_norm") -> Threshold:
    """Turn a user's ``max_norm`` into a threshold object.

    A number becomes :class:`Constant`, ``None`` becomes "no clipping", and a threshold object
    is returned as is. Anything else is a TypeError that names the accepted forms.
    """
    if max_norm is None:
        return NoClip()
    if isinstance(max_norm, Threshold) and not isinstance(max_norm, type):
        return max_norm
    if isinstance(max_norm, type):
        raise TypeError(
            f"{name} got the class {max_norm.__name__}; pass an instance, e.g. {max_norm.__name__}(...)."
        )
    return Constant(check_max_norm(max_norm, name))
