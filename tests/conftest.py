import pytest
import torch

from robustclip import _kernels, backends


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


KERNELS = ["torch", "torch-transposed", "onednn", "onednn-transposed"]


@pytest.fixture(params=range(len(KERNELS)), ids=KERNELS)
def kernel(request, monkeypatch):
    """Every product robustclip._kernels routes, through one fixed candidate (the timed choice
    would pick one per shape and layout): ``matmul`` takes candidate ``n``, a row-major
    ``matmul`` the same kernel, and an in-place low-rank update (``addmm_``) its candidate
    ``n mod 3``. Forcing a candidate is what autotuning does, so it is on."""
    n = request.param
    if n >= 2 and not _kernels.ONEDNN_MATMUL:
        pytest.skip("this PyTorch build has no oneDNN linear kernel")
    ways = {"mm": n, "mm-rows": n // 2, "addmm-inner": n % 3}
    monkeypatch.setattr(backends, "autotune", True)
    monkeypatch.setattr(_kernels, "chosen", lambda key: ways[key[0]])
    return KERNELS[n]


@pytest.fixture
def autotune_on(monkeypatch):
    """robustclip.backends.autotune on, with a fresh choice cache, for the test."""
    monkeypatch.setattr(backends, "autotune", True)
    monkeypatch.setattr(_kernels, "_CHOICES", {})
