"""The formulas every clipping method shares: norms that neither overflow nor underflow, and
the clip coefficient.

The floor below the estimators, the norm transforms and spectral clipping, so that none of them
imports another for its arithmetic.

Why norms need care: a float32 square overflows above 1.8e19 and underflows below 1e-19, so
``sqrt(sum(g**2))`` in float32 reports ``inf`` for an exploding gradient of norm 1e25 (exactly
what clipping is for: it would then be scaled by ``c/inf = 0`` and dropped) and 0 for a gradient
of norm 1e-25 (which then escapes a radius of 1e-30). Every norm here is computed so that a
finite gradient gets a finite, accurate norm:

* on the CPU, the fast float32 (float64 for float64 tensors) sum of squares of
  :func:`robustclip._kernels.sum_of_squares` is kept when it lies in the range where no square
  can have overflowed and none that matters underflowed; otherwise each tensor's largest entry
  is read and the norm recomputed after an exact power-of-two scaling by it (LAPACK's ``nrm2``
  idea), which an all-zero tensor skips. Reading a CPU scalar costs no device sync, so only
  gradients that need it pay for the extra passes.
* on other devices no value is read on the host: float32, bfloat16 and float16 tensors are
  always reduced with float64 accumulation (every square of such a number fits a float64), and
  float64 tensors, or every tensor on a device without float64 (MPS), are scaled first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from robustclip import _kernels

__all__ = [
    "clip_coefficient",
    "coefficient_as",
    "combine_norms",
    "global_norm",
    "holds_integer",
    "tensor_norms",
    "wide_dtype",
]


def wide_dtype(device: torch.device | str | None) -> torch.dtype:
    """float64, or float32 on a device without float64 (MPS): the dtype in which robustclip
    combines norms and computes clip coefficients (small tensors only)."""
    if not isinstance(device, torch.device):  # (a torch.device, the usual case, is not rebuilt)
        device = torch.device(device or "cpu")
    return torch.float32 if device.type == "mps" else torch.float64


def _result_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype.to_real())
    return dtype


def _safe_low(dtype: torch.dtype) -> float:
    """The smallest sum of squares, in ``dtype``, that lost nothing that matters to underflow:
    each lost square is below ``tiny``, so ``n`` of them are a relative ``n * sqrt(tiny)``
    of a sum >= ``sqrt(tiny)`` (1e-19 for float32, 1e-154 for float64)."""
    return math.sqrt(torch.finfo(dtype).tiny)


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _scaled_norm(t: Tensor, acc: torch.dtype) -> Tensor:
    """``||t||`` in ``acc`` after dividing ``t`` by the power of two just above its largest
    entry: exact (a power-of-two scaling only moves exponents), no square can overflow, and the
    largest one is in [1/4, 1), so what underflows is negligible. NaN if ``t`` has a NaN, inf if
    it has an inf (the scales are finite and non-zero). No host read."""
    if t.numel() == 0:
        return torch.zeros((), dtype=acc, device=t.device)
    x = t.to(acc)
    lo, hi = torch.aminmax(x)
    amax = torch.maximum(hi, -lo)
    # 2**-e with e the exponent of amax, applied as two factors: one factor 2**-e alone
    # overflows for a subnormal amax (2**149 in float32)
    e = torch.frexp(torch.where(amax > 0, amax, 1.0)).exponent
    half = torch.div(e, 2, rounding_mode="floor")
    one = torch.ones((), dtype=acc, device=t.device)
    s1, s2 = torch.ldexp(one, -half), torch.ldexp(one, half - e)
    norm: Tensor = torch.linalg.vector_norm(x * s1 * s2)  # torch.linalg's functions return Any
    return norm / s1 / s2


def combine_norms(norms: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """``sqrt(sum(norms**2))`` over ``dim`` (all of it if None) of a small tensor of norms
    (per-layer norms into a flat one, per-tensor norms into a global one), scaled by the largest
    entry, so neither the squares nor the result overflow unless the result itself does. NaN
    if an entry is NaN, inf if one is inf."""
    if dim is None:
        norms, dim = norms.reshape(-1), 0
    if norms.shape[dim] == 0:
        return norms.sum(dim, keepdim=keepdim)
    m = norms.amax(dim, keepdim=True)
    safe = torch.where(m > 0, m, 1.0)
    out = safe * (norms / safe).square().sum(dim, keepdim=True).sqrt()
    out = torch.where(torch.isinf(m), m, torch.where(m > 0, out, m))
    return out if keepdim else out.squeeze(dim)


def _wide_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Per-tensor norms in :func:`wide_dtype` that neither overflow nor underflow, with no
    host read: float64 accumulation where it is exact enough and available, else scaling."""
    wide = wide_dtype(tensors[0].device)
    reals = [_real(t) for t in tensors]
    if wide == torch.float64 and all(t.dtype != torch.float64 for t in reals):
        return list(torch._foreach_norm(reals, 2.0, dtype=torch.float64))
    return [_scaled_norm(t, wide) for t in reals]


def _host_scaled_norm(t: Tensor) -> Tensor:
    """CPU only: :func:`_scaled_norm` with the largest entry read on the host (no device to
    wait for), so an all-zero tensor costs one pass and the scaling one multiply, and the
    squares stay in the tensor's own precision (float32 for float32, bfloat16 and float16: a
    float64 copy of a large tensor costs several passes). A 0-d float64 tensor."""
    x = _real(t)
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    lo, hi = torch.aminmax(x)
    amax = max(float(hi), -float(lo))
    if amax == 0 or not math.isfinite(amax):  # 0, inf, or NaN (max() above keeps a NaN of hi)
        return torch.tensor(amax if not math.isnan(float(lo)) else math.nan, dtype=torch.float64)
    e = math.frexp(amax)[1]
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    # 2**-e as one factor where float32 holds it, else two
    y = y * 2.0**-e if abs(e) <= 120 else y * 2.0 ** -(e // 2) * 2.0 ** -(e - e // 2)
    # sum_of_squares' own kernel rule: BLAS dot only where rounding may differ (not under
    # deterministic algorithms or plain_kernels, so DDP replicas still agree)
    ssq = float(_kernels.sum_of_squares([y]))
    return torch.tensor(math.sqrt(ssq) * 2.0**e, dtype=torch.float64)


def tensor_norms(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """The L2 norm of each tensor, 0-d, in ``dtype`` (default: float32, float64 for a float64
    tensor), finite and accurate for every finite tensor whose norm ``dtype`` can hold, in every
    dtype (see the module docstring). Per-tensor clipping reads these."""
    if len(tensors) == 0:
        return []
    reals = [_real(t) for t in tensors]
    outs = [dtype if dtype is not None else torch.promote_types(t.dtype, torch.float32) for t in reals]
    if reals[0].device.type != "cpu":
        return [n.to(o) for n, o in zip(_wide_norms(reals), outs)]
    norms = list(torch._foreach_norm(reals, 2.0, dtype=torch.float32)) if all(
        t.dtype != torch.float64 for t in reals
    ) else [torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in reals]
    # a norm is safe when its square lies in [sqrt(tiny), max] of its dtype (see _safe_low); a
    # CPU tensor is read without a device sync, and only the others are recomputed
    values = torch.stack([n.double() for n in norms]).tolist()
    for i, (v, n) in enumerate(zip(values, norms)):
        finfo = torch.finfo(n.dtype)
        if not (_safe_low(n.dtype) ** 0.5 <= v <= float(finfo.max) ** 0.5) and v == v:
            norms[i] = _host_scaled_norm(reals[i])
    return [n.to(o) for n, o in zip(norms, outs)]


def global_norm(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """L2 norm of the concatenation of ``tensors``, a 0-d tensor in ``dtype`` (default: float32
    or the widest dtype of the tensors), finite and accurate for every finite input whose norm
    ``dtype`` can hold, without a device sync (see the module docstring: the fast path is
    :func:`robustclip._kernels.sum_of_squares`). Pass ``dtype=wide_dtype(device)`` for a norm
    that does not overflow even above the float32 maximum."""
    out = dtype if dtype is not None else _result_dtype(tensors)
    if len(tensors) == 0:
        return torch.zeros((), dtype=out)
    reals = [_real(t) for t in tensors]
    if reals[0].device.type != "cpu":
        return combine_norms(torch.stack(_wide_norms(reals))).to(out)
    sq = _kernels.sum_of_squares(reals)
    v = float(sq)  # a CPU scalar: no device to wait for
    if _safe_low(sq.dtype) <= v <= float(torch.finfo(sq.dtype).max) or v != v:
        return sq.sqrt().to(out)
    return combine_norms(torch.stack([_host_scaled_norm(t) for t in reals])).to(out)


def coefficient_as(coef: Tensor, dtype: torch.dtype) -> Tensor:
    """``coef`` (>= 0) converted to ``dtype`` without rounding up: a clip coefficient rounded to
    the nearest bfloat16, or to a subnormal float32 (below 1.2e-38), could otherwise let the
    clipped norm exceed the radius. A few operations on a small tensor; no host read."""
    out = coef.to(dtype)
    if torch.finfo(dtype).eps <= torch.finfo(coef.dtype).eps:
        return out  # as wide as coef: nothing was rounded
    return torch.where(out.to(coef.dtype) > coef, torch.nextafter(out, torch.zeros_like(out)), out)


def holds_integer(dtype: torch.dtype, n: int) -> bool:
    """Whether ``dtype`` represents the integer ``n > 0`` exactly (its odd part fits the
    mantissa): a count that scales a sum, such as a batch size of 257, is not exact in bfloat16."""
    info = torch.finfo(dtype)
    odd = n >> ((n & -n).bit_length() - 1)
    # eps = 2**-m for m stored mantissa bits (frexp gives exponent 1 - m); m + 1 significant bits
    return n <= info.max and odd.bit_length() <= 2 - math.frexp(info.eps)[1]


def clip_coefficient(norm: Tensor, radius: Tensor) -> Tensor:
    """``min(1, radius/norm)``: 1 wherever ``norm <= radius`` (also at ``norm = radius = 0``,
    where ``radius/norm`` would be 0/0), and NaN only if ``norm`` or ``radius`` is NaN.

    No coefficient is tested on the host (``if coef < 1`` would sync with the device): the
    gradient is multiplied by the coefficient, as ``torch.nn.utils.clip_grad_norm_`` does."""
    return torch.where(norm <= radius, 1.0, radius / norm)
