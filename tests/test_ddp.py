"""DDP with 2 CPU processes (gloo) gives the same update as one process on the global batch."""

from __future__ import annotations

import pytest
import torch

from . import _ddp_worker as W
from ._spawn import spawn


@pytest.mark.distributed
def test_ddp_equals_single_process(tmp_path):
    result = tmp_path / "ddp.pt"
    spawn(W.worker, lambda a: (str(tmp_path / f"init{a}"), str(result)), W.WORLD)
    got = torch.load(result, weights_only=True)
    ref = W.single_process()
    assert got.keys() == ref.keys()
    for name in ref:
        for a, b in zip(got[name], ref[name]):
            assert torch.allclose(a, b, rtol=0, atol=1e-12), name
