"""DDP with 2 CPU processes (gloo) gives the same update as one process on the global batch."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from . import _ddp_worker as W


@pytest.mark.distributed
def test_ddp_equals_single_process(tmp_path):
    result = tmp_path / "ddp.pt"
    mp.spawn(W.worker, args=(str(tmp_path / "init"), str(result)), nprocs=W.WORLD, join=True)
    got = torch.load(result, weights_only=True)
    ref = W.single_process()
    assert got.keys() == ref.keys()
    for name in ref:
        for a, b in zip(got[name], ref[name]):
            assert torch.allclose(a, b, rtol=0, atol=1e-12), name
