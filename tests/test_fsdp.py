"""FSDP2 (fully_shard) with 2 CPU processes (gloo) against one process on the global batch.

Every method, on an MLP, a 2-block CharGPT and a CharGPT with a tied head, 5 SGD-momentum steps
with 2 micro-batches per process: the parameters agree to 1e-6 relative (float64; in practice
~1e-15). Also: gradient sync off for accumulation, HSDP meshes, FSDP2 with torch.compile, a NaN
on one rank, a checkpoint resumed, adaptive radii identical on every rank, the collectives of a
step, and what is refused. Two spawns in all.
"""

from __future__ import annotations

import pytest
import torch

from . import _fsdp_worker as W
from ._spawn import spawn

pytestmark = pytest.mark.distributed

RTOL = 1e-6


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b))


def _moved(kind: str, params: list[torch.Tensor]) -> float:
    start = [p.detach() for p in W.model_of(kind).parameters()]
    return max(float((a - b).norm()) for a, b in zip(params, start))


def _run(tmp_path, which: str) -> list[dict]:
    spawn(W.worker, lambda a: (str(tmp_path / f"init_{which}{a}"), str(tmp_path), which), W.WORLD)
    return [torch.load(tmp_path / f"{which}{r}.pt", weights_only=True) for r in range(W.WORLD)]


@pytest.fixture(scope="module")
def refs():
    cache: dict = {}

    def get(kind: str, name: str, nan: bool = False):
        key = (kind, name, nan)
        if key not in cache:
            cache[key] = W.single_process(kind, name, nan)
        return cache[key]

    return get


def test_every_method_matches_one_process(tmp_path, refs):
    got = _run(tmp_path, "methods")
    for kind, name in W.cases():
        ref = refs(kind, name)
        assert _moved(kind, ref) > 1e-3, (kind, name)  # the check is not vacuous
        for r in range(W.WORLD):
            err = _rel(got[r][f"{kind}/{name}"], ref)
            assert err < RTOL, (kind, name, r, err)


def test_accumulation_hsdp_nan_checkpoint_thresholds(tmp_path, refs):
    got = _run(tmp_path, "more")
    mine = got[0]
    for key, params in mine.items():
        if key.startswith(("sync_", "hsdp", "compiled", "finish/")):
            _, kind, name = key.split("/")
            err = _rel(params, refs(kind, name))
            assert err < RTOL, (key, err)
    for name in ("per_sample", "clip_global"):
        # every rank skips the step with the NaN (only rank 1 saw it), and the result is one
        # process's with the same NaN
        for r in range(W.WORLD):
            assert got[r][f"nan_skipped/{name}"] == [s == W.NAN_STEP for s in range(W.STEPS)]
        ref = refs("mlp", name, nan=True)
        assert _rel(mine[f"nan/mlp/{name}"], ref) < RTOL
    assert mine["checkpoint"]["resumed_equal"]
    # one all-reduce per step (the norm of clip_by_global_norm comes with it); a method with
    # transforms adds one for the finite check after the chain (each rank's largest final entry),
    # clip_by_tensor_norm one more. mean(): FSDP2's own reduce-scatters, one per FSDP group (2)
    # and micro-batch (2); clipped sums: robustclip's, one per backward() for all groups
    assert mine["collectives"] == {
        "mean": {"all_reduce": 1, "reduce_scatter": 4},
        "clip_global": {"all_reduce": 2, "reduce_scatter": 4},
        "clip_tensor": {"all_reduce": 3, "reduce_scatter": 4},
        "per_sample": {"all_reduce": 2, "reduce_scatter": 2},
        "micro_batch": {"all_reduce": 1, "reduce_scatter": 2},
    }
    assert "unused.weight" in mine["errors"]["unused"] and "got no gradient" in mine["errors"]["unused"]
    assert "no FSDP2 module" in mine["errors"]["dtensor"]
    assert "drop_sample" in mine["errors"]["drop"] and "FSDP2" in mine["errors"]["drop"]
    assert "GradScaler" in mine["errors"]["scaler"] and "FSDP2" in mine["errors"]["scaler"]
    assert "clipper.backward(losses)" in mine["errors"]["external"]
    # finish(layer_norms=True) over shards: the same norms on every rank, and (with the
    # parameters above matching one process) the norm of the whole gradient, by layer group
    for key, norms in mine.items():
        if key.startswith("finish_layer_norms/"):
            assert len(norms) == W.STEPS and all(torch.isfinite(n).all() and (n > 0).all() for n in norms)
            for a, b in zip(norms, got[1][key]):
                assert torch.equal(a, b), key
    for name, state in mine["adaptive"].items():
        same = _same_state(state, got[1]["adaptive"][name])
        # gathered norms: identical radii on every rank; each rank's own norms: they differ
        assert same == (not name.startswith("ddp_local")), name


def _same_state(a, b) -> bool:
    flat_a, spec_a = torch.utils._pytree.tree_flatten(a)
    flat_b, spec_b = torch.utils._pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor):
            if not torch.equal(x.nan_to_num(123.0), y.nan_to_num(123.0)):
                return False
        elif x != y:
            return False
    return True
