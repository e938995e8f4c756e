"""robustclip._kernels: every candidate kernel against a float64 product, the timed choice
(robustclip.backends.autotune on; the switch itself and its default are in test_backends.py)."""

from __future__ import annotations

import pytest
import torch

from robustclip import _kernels, backends

N_CANDIDATES = 4 if _kernels.ONEDNN_MATMUL else 2


def operand(shape: tuple[int, int], layout: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    if layout == "r":
        return torch.randn(m, n, generator=gen).to(dtype)
    if layout == "c":
        return torch.randn(n, m, generator=gen).to(dtype).mT
    return torch.randn(m, 2 * n, generator=gen).to(dtype)[:, ::2]  # strided, neither


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Autotuning on, with a fresh choice cache: these tests are about the timed choice."""
    monkeypatch.setattr(_kernels, "_CHOICES", {})
    monkeypatch.setattr(backends, "autotune", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("la", ["r", "c", "s"])
@pytest.mark.parametrize("lb", ["r", "c", "s"])
@pytest.mark.parametrize("shape", [(37, 19, 5), (3, 64, 130), (1, 7, 1)])
def test_every_candidate_is_the_product(dtype, la, lb, shape):
    m, k, n = shape
    a, b = operand((m, k), la, dtype, 0), operand((k, n), lb, dtype, 1)
    ref = a.double() @ b.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16 rounds the result
    scale = float(ref.abs().max())
    outs = [fn() for fn in _kernels._candidates(a, b)]
    assert len(outs) == N_CANDIDATES
    rows = [fn() for fn in _kernels._candidates(a, b, rows=True)] + [_kernels.matmul(a, b, rows=True)]
    assert all(r.stride(-1) == 1 for r in rows) and len(rows) == N_CANDIDATES // 2 + 1
    for out in outs + rows + [_kernels.matmul(a, b)]:
        assert out.shape == (m, n) and out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol * scale)


def test_choice_is_timed_once_and_reused_by_neighbouring_sizes():
    a, b = torch.randn(200, 64), torch.randn(64, 24)
    _kernels.matmul(a, b)
    assert len(_kernels._CHOICES) == 1
    (key, idx), = _kernels._CHOICES.items()
    assert 0 <= idx < N_CANDIDATES
    # 150 rows: same power-of-two bucket as 200, so the same choice and no new timing
    calls = []
    real = _kernels._candidates

    def counting(x, y, rows=False):
        fns = real(x, y, rows)
        return tuple((lambda f=f, i=i: calls.append(i) or f()) for i, f in enumerate(fns))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_kernels, "_candidates", counting)
        torch.testing.assert_close(_kernels.matmul(a[:150], b), a[:150] @ b)
    assert calls == [idx] and len(_kernels._CHOICES) == 1
    # another layout is another signature
    _kernels.matmul(a.mT.contiguous().mT, b)
    assert len(_kernels._CHOICES) == 2


def test_deterministic_mode_uses_the_plain_kernel_untimed():
    a, b = torch.randn(30, 20), torch.randn(20, 10)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(_kernels.matmul(a, b), a @ b)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert not _kernels._CHOICES


def test_what_is_not_routed_is_torch_matmul():
    a64, b64 = torch.randn(5, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(_kernels.matmul(a64, b64), a64 @ b64)
    # a product autograd must differentiate stays on torch's kernels
    a = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(4, 3)
    _kernels.matmul(a, b).sum().backward()
    torch.testing.assert_close(a.grad, b.sum(1).expand(5, 4))
    prev = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # the user switched oneDNN off
    try:
        _kernels.matmul(a.detach(), b)
    finally:
        torch.backends.mkldnn.enabled = prev
    assert not _kernels._CHOICES


def test_batched_product_is_per_matrix():
    a, b = torch.randn(3, 40, 20), torch.randn(3, 20, 16).mT.contiguous().mT
    torch.testing.assert_close(_kernels.matmul(a, b), torch.bmm(a, b))
    torch.testing.assert_close(_kernels.matmul(a[:1], b[:1]), torch.bmm(a[:1], b[:1]))


def test_plain_kernels_and_autocast_use_torch_matmul_untimed():
    a, b = torch.randn(30, 20), torch.randn(20, 10)
    with _kernels.plain_kernels():
        assert torch.equal(_kernels.matmul(a, b), a @ b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = _kernels.matmul(a, b), a @ b
    assert got.dtype == ref.dtype == torch.bfloat16 and torch.equal(got, ref)
    assert not _kernels._CHOICES


def test_empty_batch_of_matrices():
    a, b = torch.randn(0, 6, 5), torch.randn(0, 5, 4)
    assert _kernels.matmul(a, b).shape == (0, 6, 4)


def low_rank_update(shape, inner, layouts, dtype, seed=0):
    """out, a, b for ``out += a @ b`` where only the first ``inner`` columns of ``a`` and rows
    of ``b`` are nonzero (the others hold zeros, as in a spectral correction)."""
    m, k, n = shape
    a, b = operand((m, k), layouts[1], dtype, seed), operand((k, n), layouts[2], dtype, seed + 1)
    a[:, inner:] = 0
    b[inner:] = 0
    return operand((m, n), layouts[0], dtype, seed + 2), a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layouts", ["rrr", "rcc", "crs"])
@pytest.mark.parametrize("shape", [(24, 16, 70), (70, 16, 24), (5, 3, 5), (8, 12, 9), (3, 8, 600)])
def test_every_in_place_update_adds_the_product(dtype, layouts, shape):
    m, k, n = shape
    inner = max(1, k // 2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    out0, a, b = low_rank_update(shape, inner, layouts, dtype)
    ref = out0.double() + a.double() @ b.double()
    scale = float(ref.abs().max())
    for i in range(3):
        out = out0.clone()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_kernels, "chosen", lambda key, i=i: i)
            got = _kernels.addmm_(out, a, b, inner)
        assert got is out and out.stride() == out0.stride()
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol * scale)
    # the timed choice: the candidates run on a scratch copy, then once on out
    out = out0.clone()
    _kernels.addmm_(out, a, b, inner)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol * scale)
    # float32 only: blocks would round a bfloat16 product before adding it
    assert [k[0] for k in _kernels._CHOICES] == (["addmm-inner"] if dtype == torch.float32 else [])


def test_in_place_update_falls_back_to_addmm_untimed():
    out0, a, b = low_rank_update((30, 16, 50), 8, "rrr", torch.float32)
    ref = out0.clone().addmm_(a, b)
    for inner in (None, 16, 20):  # all columns: nothing to narrow
        assert torch.equal(_kernels.addmm_(out0.clone(), a, b, inner), ref)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(_kernels.addmm_(out0.clone(), a, b, 8), ref)
    finally:
        torch.use_deterministic_algorithms(prev)
    with _kernels.plain_kernels():
        assert torch.equal(_kernels.addmm_(out0.clone(), a, b, 8), ref)
    o64, a64, b64 = (t.double() for t in (out0, a, b))
    assert torch.equal(_kernels.addmm_(o64.clone(), a64, b64, 8), o64.clone().addmm_(a64, b64))
    assert not _kernels._CHOICES


def norm_inputs(seed: int) -> list[torch.Tensor]:
    """Large and small, contiguous and strided, float32/float64/bfloat16/complex, and empty:
    every route of sum_of_squares."""
    gen = torch.Generator().manual_seed(seed)
    big = _kernels.DOT_MIN_NUMEL
    return [
        torch.randn(big + 7, generator=gen) * 3,  # BLAS dot
        torch.randn(64, big // 32, generator=gen)[:, ::2],  # large but strided
        torch.randn(5, 3, generator=gen),
        torch.randn(big, generator=gen).to(torch.bfloat16),
        torch.randn(0, 4, generator=gen),
        torch.randn(7, generator=gen, dtype=torch.complex64),
    ]


@pytest.mark.parametrize("with_double", [False, True])
def test_sum_of_squares_matches_float64_concatenation(with_double):
    ts = norm_inputs(0)
    if with_double:
        ts.append(torch.randn(_kernels.DOT_MIN_NUMEL, dtype=torch.float64))
    ref = sum(float(t.abs().double().square().sum()) for t in ts)
    got = _kernels.sum_of_squares(ts)
    assert got.dim() == 0 and got.dtype == (torch.float64 if with_double else torch.float32)
    assert abs(float(got) - ref) <= 2e-5 * ref  # float32 accumulation over 3e4 terms
    # one big float32 tensor alone: a single dot, no stacking
    one = _kernels.sum_of_squares(ts[:1])
    assert abs(float(one) - float(ts[0].double().square().sum())) <= 2e-5 * float(one)


def test_sum_of_squares_avoids_blas_where_rounding_must_match():
    ts = norm_inputs(1)[:-1]
    # the reduction used for all tensors in deterministic mode and under plain_kernels
    ref = torch.stack(list(torch._foreach_norm(ts, 2.0, dtype=torch.float32))).square().sum()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(_kernels.sum_of_squares(ts), ref)
    finally:
        torch.use_deterministic_algorithms(prev)
    with _kernels.plain_kernels():
        assert torch.equal(_kernels.sum_of_squares(ts), ref)


def test_sum_of_squares_of_complex_and_real_tensors_exactly():
    # |3+4i|^2 + |1-2i|^2 = 25 + 5, plus 2^2 + 1^2 from a real tensor: exact in float32
    got = _kernels.sum_of_squares([torch.tensor([3 + 4j, 1 - 2j]), torch.tensor([2.0, -1.0])])
    assert got.dtype == torch.float32 and float(got) == 35.0
    got = _kernels.sum_of_squares([torch.tensor([3 + 4j], dtype=torch.complex128)])
    assert got.dtype == torch.float64 and float(got) == 25.0

