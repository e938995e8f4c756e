"""The verdict benchmark's least-squares problems sit on the side of B vs rho their names say,
as measured by the library's own whole-set estimator along plain SGD."""

from __future__ import annotations

import pathlib

import pytest
import torch

import robustclip.diagnostics as rcd

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def suite(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import suite_verdict

    return suite_verdict


def _rho_along_sgd(bench, steps: int, every: int) -> list[float]:
    torch.manual_seed(0)
    model = bench.model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=bench.lr)
    loader = bench.loader(0)
    whole = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*bench.train), batch_size=256)
    out, step = [], 0
    while step < steps:
        for x, y in loader:
            if step % every == 0:
                out.append(rcd.strong_growth_over(model, bench.loss_fn, whole).rho)
            opt.zero_grad()
            bench.loss_fn(model(x), y).mean().backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_least_squares_rows_are_on_their_side_of_rho(suite, seed):
    big = suite.PROBLEMS["ls-B>>rho"](seed)
    rhos = _rho_along_sgd(big, 300, 150)
    # B = 64 and rho stays near d_eff + 2 = 6 for rank-4 isotropic data, at every reading
    assert max(rhos) < big.batch_size / 4, rhos
    small = suite.PROBLEMS["ls-B<<rho"](seed)
    rhos = _rho_along_sgd(small, 100, 50)
    assert min(rhos) > 10 * small.batch_size, rhos
