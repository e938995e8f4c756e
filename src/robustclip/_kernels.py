"""Kernel choices for the products robustclip computes itself, timed when
:data:`robustclip.backends.autotune` is on.

Several operations have more than one correct kernel, and which is fastest depends on the
machine, the shapes and the memory layout, often by 2x or more, in directions no operation
count predicts. With ``robustclip.backends.autotune = True``, like
``torch.backends.cudnn.benchmark``, the first call for a *signature* times every candidate and
later calls reuse the fastest (:func:`choose`). Off (the default), and under
``torch.use_deterministic_algorithms(True)``, the first candidate (the plain PyTorch kernel) is
always used and nothing is timed or remembered: :func:`matmul` is ``torch.matmul``,
:func:`addmm_` is ``Tensor.addmm_``, and a choice made through :func:`chosen` is candidate 0
(the per-sample convolution kernel of ``per_sample/rules/conv.py`` is then picked by the
layer's shape alone, and is im2col in deterministic mode). A run resumed in a new process then
rounds exactly as the original did.

:func:`matmul` uses the timed choice for float32 and bfloat16 products on the CPU. PyTorch
multiplies float32 matrices there with its BLAS (MKL on x86 builds); oneDNN, which PyTorch also
ships, is 1.5-3x faster on some CPUs for the thin and medium products of robustclip (on a 2-core
AMD EPYC with AVX-512: the clipped weight gradient of a 784x512 layer at batch 256 in 0.50 ms
instead of 1.02 ms; ``G^T Z`` for a 768x3072 ``G`` and 16 columns in 0.22 ms instead of
0.69 ms), and the best operand order differs by layout. oneDNN's product is reached through a
private PyTorch op, which is one more reason autotuning is opt-in. Both kernels compute in
float32 with float32 accumulation; only the rounding order differs.

Updates in place (``out += a @ b``, :func:`addmm_`) stay on PyTorch's BLAS: oneDNN's products
return a new tensor as large as ``out``, and inside a training step, among other large
allocations, that tensor pays page faults which a timing on the first call does not see
(measured: 2 ms instead of 0.5 ms for a 768x3072 spectral correction). What is timed there is
the inner dimension of a low-rank update whose trailing columns are zero, and whether to apply
it by column blocks: MKL's update of a 3072x768 float32 matrix takes 0.17 ms with an inner
dimension of 8 and 0.33 ms with 16, but for 768x3072 it takes 0.69 ms with 8 and 0.53 ms with
16, and 0.38 ms as four 768x768 blocks of inner dimension 8.

:func:`sum_of_squares` is not timed: it streams large CPU float tensors through BLAS ``dot`` by
a fixed rule, whatever the switch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from robustclip import backends

R = TypeVar("R")

#: signature -> index of the candidate that was fastest when it was timed
_CHOICES: dict[tuple[Any, ...], int] = {}

#: set inside :func:`plain_kernels`
_PLAIN = False


@contextlib.contextmanager
def plain_kernels() -> Iterator[None]:
    """PyTorch's own kernels for every product inside: for computations that several processes
    must round identically, such as the transforms every DDP process applies on its own to the
    all-reduced gradient (processes time, and so choose, independently)."""
    global _PLAIN
    prev, _PLAIN = _PLAIN, True
    try:
        yield
    finally:
        _PLAIN = prev


def chosen(key: tuple[Any, ...]) -> int | None:
    """The choice for ``key``: 0 (the plain kernel) when autotuning is off
    (:data:`robustclip.backends.autotune`) or in deterministic mode, else the remembered one,
    ``None`` if it has not been timed yet."""
    if not backends.autotune or torch.are_deterministic_algorithms_enabled():
        return 0
    return _CHOICES.get(key)


def _fastest(n: int, repeats: int, run: Callable[[int], object], before: Callable[[], object] | None = None) -> int:
    """Index of the fastest of ``n`` candidates: ``run(i)`` timed ``repeats`` times each,
    interleaved, best time kept (the first call of a oneDNN kernel pays its primitive creation,
    and a sub-millisecond product's time moves by 2x with page faults and cache state);
    ``before()``, if given, runs untimed before each."""
    best = [math.inf] * n
    for _ in range(repeats):
        for i in range(n):
            if before is not None:
                before()
            t0 = time.perf_counter()
            run(i)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best.index(min(best))


def choose(key: tuple[Any, ...], candidates: Sequence[Callable[[], R]], repeats: int = 5) -> R:
    """Result of the fastest candidate for ``key``: timed on the first call (:func:`_fastest`),
    remembered afterwards. The candidates must compute the same value and have no side
    effects, since every one runs while timing."""
    idx = chosen(key)
    if idx is not None:
        return candidates[idx]()
    last: list[R] = []  # only the latest result: each may be large

    def run(i: int) -> None:
        last[:] = [candidates[i]()]

    _CHOICES[key] = _fastest(len(candidates), repeats, run)
    return last[0]


def choose_inplace(key: tuple[Any, ...], out: Tensor, candidates: Sequence[Callable[[Tensor], object]], repeats: int = 3) -> None:
    """:func:`choose` for candidates that update a tensor in place: ``candidates[i](t)`` must
    leave the same value in ``t``. On the first call for ``key`` each candidate is timed on a
    scratch copy of ``out`` (refreshed before every run, outside the timer); then the fastest
    updates ``out`` itself."""
    idx = chosen(key)
    if idx is None:
        scratch = torch.empty_like(out)
        idx = _fastest(len(candidates), repeats, lambda i: candidates[i](scratch), lambda: scratch.copy_(out))
        _CHOICES[key] = idx
        del scratch
    candidates[idx](out)


def _onednn_available() -> bool:
    # only looked up here, never called: a PyTorch without the op leaves the BLAS candidates
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 - resolving the op is the check
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.backends.mkldnn.is_available())


#: whether this build of PyTorch has oneDNN's linear kernel (its fp32 path); the routing also
#: honours ``torch.backends.mkldnn.enabled`` at each call
ONEDNN_MATMUL = _onednn_available()


def _onednn_mm(a: Tensor, b: Tensor) -> Tensor:
    # oneDNN's linear computes X @ W^T and accepts strided operands
    out: Tensor = torch.ops.mkldnn._linear_pointwise(a, b.mT, None, "none", [], "")
    return out


def _routable(a: Tensor, b: Tensor) -> bool:
    return (
        backends.autotune
        and ONEDNN_MATMUL
        # a bool at run time; typed as the descriptor that serves it
        and bool(torch.backends.mkldnn.enabled)
        and a.device.type == "cpu"
        and a.dtype == b.dtype
        and a.dtype in (torch.float32, torch.bfloat16)
        and a.dim() == b.dim() == 2
        and a.numel() > 0
        and b.numel() > 0
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        # under autocast torch's matmul computes in the autocast dtype and oneDNN's linear would
        # not: the candidates must compute the same thing
        and not torch.is_autocast_enabled("cpu")
        and not _PLAIN
    )


def _layout(x: Tensor) -> str:
    if x.stride(-1) == 1:
        return "r"  # rows contiguous
    if x.stride(-2) == 1:
        return "c"  # columns contiguous
    return "s"


def _signature(op: str, a: Tensor, b: Tensor) -> tuple[Any, ...]:
    # sizes by power-of-two bucket, so that a new batch size (a last partial batch, Poisson
    # sampling) reuses the choice of its neighbours instead of timing again
    m, k = a.shape
    n = b.shape[1]
    sizes = (m.bit_length(), k.bit_length(), n.bit_length())
    return (op, a.dtype, _layout(a), _layout(b), *sizes, torch.get_num_threads())


def _candidates(a: Tensor, b: Tensor, rows: bool = False) -> tuple[Callable[[], Tensor], ...]:
    # the same product with each kernel and operand order; the transposed orders return a
    # transposed (column-major) result, so ``rows`` leaves them out
    ways: tuple[Callable[[], Tensor], ...] = (lambda: a @ b, lambda: (b.mT @ a.mT).mT)
    if ONEDNN_MATMUL:
        ways += (lambda: _onednn_mm(a, b), lambda: _onednn_mm(b.mT, a.mT).mT)
    return ways[::2] if rows else ways


def matmul(a: Tensor, b: Tensor, rows: bool = False) -> Tensor:
    """``a @ b``: with :data:`robustclip.backends.autotune` on, by the fastest kernel for
    float32 and bfloat16 CPU matrices (2-D, or a batch of them as 3-D tensors), and the result
    may then be column-major unless ``rows`` asks for a row-major one. Anything else, and
    everything with autotuning off, is ``torch.matmul``."""
    if a.dim() == b.dim() == 3 and a.shape[0] == b.shape[0]:
        if a.shape[0] == 0 or not _routable(a[0], b[0]):
            return a @ b
        if a.shape[0] == 1:
            return matmul(a[0], b[0], rows).unsqueeze(0)
        return torch.stack([matmul(x, y, rows) for x, y in zip(a, b)])
    if not _routable(a, b):
        return a @ b
    return choose(_signature("mm-rows" if rows else "mm", a, b), _candidates(a, b, rows))


def _by_column_blocks(out: Tensor, a: Tensor, b: Tensor) -> None:
    # square blocks (out.shape[0] columns, at least 256): each product is a new, cache-sized
    # tensor, and a short, wide output does not become thousands of tiny products
    w = max(out.shape[0], 256)
    for j in range(0, out.shape[1], w):
        out[:, j : j + w].add_(a @ b[:, j : j + w])


def addmm_(out: Tensor, a: Tensor, b: Tensor, inner: int | None = None) -> Tensor:
    """``out += a @ b`` in place, where the terms ``a[:, k] b[k]`` vanish for ``k >= inner``
    (``a``'s columns there, or ``b``'s rows, are zero; ``None``: no such promise). For float32
    CPU matrices the fastest of three ways is timed once per signature (see the module
    docstring): the full product, the product over the first ``inner`` columns, and the latter
    by square column blocks, when :data:`robustclip.backends.autotune` is on. They add the same
    terms (the others are zero), in a different rounding order; in float32 accumulation either
    way. Anything else (the blocks would round a bfloat16 product before adding it), autotuning
    off and deterministic mode is ``out.addmm_(a, b)``."""
    k = a.shape[-1]
    plain = inner is None or inner >= k or out.dim() != 2 or out.dtype != a.dtype
    if plain or a.dtype != torch.float32 or not _routable(a, b):
        return out.addmm_(a, b)
    ar, br = a[:, :inner], b[:inner]
    m, n = out.shape
    key = ("addmm-inner", out.dtype, _layout(out), _layout(a), _layout(b), m.bit_length(), n.bit_length(), k, inner)
    ways = (lambda o: o.addmm_(a, b), lambda o: o.addmm_(ar, br), lambda o: _by_column_blocks(o, ar, br))
    choose_inplace((*key, torch.get_num_threads()), out, ways)
    return out


#: tensors at least this large get their sum of squares from BLAS ``dot`` (below it the call's
#: fixed cost outweighs the faster streaming)
DOT_MIN_NUMEL = 1 << 15


def sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """``sum_t ||t||^2`` over non-empty ``tensors``, as a 0-dim tensor in float32 or wider (the
    widest of their dtypes), without a host sync.

    A gradient norm is a pass over memory; on the CPU, BLAS ``dot`` makes that pass at memory
    speed while ``linalg.vector_norm``'s reduction does not (a 512x784 float32 gradient on a
    2-core AMD EPYC: 15 us instead of 26 us; measured error against float64, 4e-6 relative for
    ``dot`` and 2.5e-5 for ``vector_norm``). So large contiguous CPU tensors of the result's
    dtype use ``dot`` and the rest one ``_foreach_norm``. BLAS may round differently with the
    memory alignment of its input, so deterministic mode and :func:`plain_kernels` (DDP
    replicas) use ``_foreach_norm`` for everything.

    The squares are float32 for float32 tensors: the sum overflows to ``inf`` above a norm of
    1.8e19 and loses squares below 1e-19. This is the fast path of
    :func:`robustclip._math.global_norm`, which keeps the result only inside that range and
    otherwise recomputes the norm safely."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype.to_real())
    blas = tensors[0].device.type == "cpu" and not _PLAIN and not torch.are_deterministic_algorithms_enabled()
    parts: list[Tensor] = []
    rest: list[Tensor] = []
    for t in tensors:
        if blas and t.dtype == dtype and t.numel() >= DOT_MIN_NUMEL and t.is_contiguous():
            v = t.view(-1)
            parts.append(torch.dot(v, v))
        else:
            rest.append(t)
    if rest:
        real = [t for t in rest if not t.is_complex()]
        cplx = [t for t in rest if t.is_complex()]
        # each norm accumulated and returned in ``dtype``, not rounded to bf16 first; a complex
        # tensor's norm comes in its real dtype (``dtype=`` there would have to be complex)
        norms = list(torch._foreach_norm(real, 2.0, dtype=dtype)) if real else []
        if cplx:
            norms += [n.to(dtype) for n in torch._foreach_norm(cplx, 2.0)]
        parts.append(torch.stack(norms).square().sum())
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()
