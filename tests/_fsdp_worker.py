"""Worker for tests/test_fsdp.py: every method under FSDP2 (fully_shard, gloo, 2 processes).

One spawn runs every case; rank 0 saves what the test compares with one process on the global
batch (tests/test_fsdp.py), and each rank saves what must be identical across ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import robustclip as rc
from robustclip.experiments.models import MLP, CharGPT, sequence_losses
from robustclip.thresholds import EMA

WORLD = 2
MICRO = 2  # micro-batches per process and step
BATCH = 16  # global batch
STEPS = 5
NAN_STEP, NAN_SAMPLE = 2, 11  # a NaN input in sample 11 (rank 1) at step 2


def methods() -> dict[str, Callable[[], Any]]:
    return {
        "mean": lambda: rc.mean(),
        "clip_global": lambda: rc.clip_by_global_norm(0.05),
        "normalize": lambda: rc.chain(rc.mean(), rc.normalize()),
        "clip_tensor": lambda: rc.clip_by_tensor_norm(0.03),
        "warmup": lambda: rc.chain(rc.mean(), rc.l0l1_warmup(2.0, 1.0)),
        "micro_batch": lambda: rc.micro_batch_clip(0.05),
        "per_sample": lambda: rc.chain(rc.per_sample_clip(0.1), rc.clip_by_global_norm(0.05)),
        "per_sample_layer": lambda: rc.per_sample_clip(0.05, per_layer=True),
        "ps_normalize": lambda: rc.per_sample_normalize(0.1),
        "spectral": lambda: rc.chain(rc.mean(), rc.spectral_clip(0.002, rank=None)),
        "spectral_rand": lambda: rc.chain(rc.mean(), rc.spectral_clip(EMA(0.5), rank=2, oversample=2)),
    }


#: (model kind, method) pairs checked against one process
def cases() -> list[tuple[str, str]]:
    out = [("mlp", m) for m in methods()]
    out += [("gpt", m) for m in methods()]
    out += [("gpt_tied", m) for m in ("mean", "micro_batch", "per_sample", "per_sample_layer", "spectral")]
    return out


def model_of(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP([6, 12, 3]).double()
    return CharGPT(vocab=11, block_size=8, d=16, layers=2, heads=2, tied=kind == "gpt_tied").double()


def data(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if kind == "mlp":
        x = torch.randn(STEPS, BATCH, 6, generator=g, dtype=torch.float64)
        return x, torch.randint(0, 3, (STEPS, BATCH), generator=g)
    return torch.randint(0, 11, (STEPS, BATCH, 8), generator=g), torch.randint(0, 11, (STEPS, BATCH, 8), generator=g)


def loss_fn(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none") if kind == "mlp" else sequence_losses(out, y)


def shard(model: nn.Module, kind: str, mesh: Any = None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    if kind == "mlp":
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
    else:
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batches(kind: str, step: int, rank: int | None, nan: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of a step (rank None: one process, all WORLD * MICRO)."""
    xs, ys = data(kind)
    x, y = xs[step].clone(), ys[step]
    if nan and step == NAN_STEP:
        x[NAN_SAMPLE] = float("nan")
    if rank is not None:
        per = BATCH // WORLD
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        return list(zip(x.chunk(MICRO), y.chunk(MICRO)))
    return list(zip(x.chunk(WORLD * MICRO), y.chunk(WORLD * MICRO)))


def train(
    kind: str,
    model: nn.Module,
    method: Any,
    rank: int | None,
    nan: bool = False,
    sync: str = "on",
    compiled: bool = False,
    finish: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[bool]]:
    """5 SGD-momentum steps; ``sync``: 'on', 'last' (gradient sync only in the last
    micro-batch) or 'off' (sync off for the whole step); ``compiled``: the forward through
    ``torch.compile`` (aot_eager: no code generation), the Clipper created first; ``finish``:
    ``clipper.finish(layer_norms=True)`` and the caller's ``optimizer.step()`` instead of
    ``clipper.step()``, each step's layer norms appended to the list."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    skipped = []
    with rc.Clipper(model, opt, method) as clipper:
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        for s in range(STEPS):
            micro = batches(kind, s, rank, nan)
            for k, (x, y) in enumerate(micro):
                if sync != "on":
                    model.set_requires_gradient_sync(sync == "last" and k == len(micro) - 1)  # type: ignore[operator]
                clipper.backward(loss_fn(kind, forward(x), y))
            if finish is None:
                skipped.append(clipper.step().skipped)
            else:
                info = clipper.finish(layer_norms=True)
                if not info.skipped:
                    opt.step()
                assert info.layer_norms is not None
                finish.append(info.layer_norms.clone())
                skipped.append(info.skipped)
    return full_params(model), skipped


def full_params(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().clone())
    return out


def single_process(kind: str, name: str, nan: bool = False) -> list[torch.Tensor]:
    """Reference: one process, the global batch, the same micro-batches in turn."""
    model = model_of(kind)
    params, _ = train(kind, model, methods()[name](), None, nan)
    return params


def _checkpoint_case(rank: int, tmp: str) -> dict[str, Any]:
    """5 steps straight against 3, a full-state-dict save, a fresh model, optimizer and clipper,
    a load, and 2 more steps: the same parameters, bit for bit."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def setup() -> tuple[nn.Module, torch.optim.Optimizer, rc.Clipper]:
        model = shard(model_of("mlp"), "mlp")
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        method = rc.chain(rc.per_sample_clip(EMA(0.9)), rc.clip_by_global_norm(EMA(0.9)))
        return model, opt, rc.Clipper(model, opt, method)

    def run(model: nn.Module, clipper: rc.Clipper, steps: range) -> None:
        for s in steps:
            for x, y in batches("mlp", s, rank):
                clipper.backward(loss_fn("mlp", model(x), y))
            clipper.step()

    model, opt, clipper = setup()
    run(model, clipper, range(STEPS))
    straight = full_params(model)
    clipper.close()

    model, opt, clipper = setup()
    run(model, clipper, range(3))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {
        "model": get_model_state_dict(model, options=full),
        "optim": get_optimizer_state_dict(model, opt, options=full),
        "clipper": clipper.state_dict(),
    }
    path = os.path.join(tmp, "ckpt.pt")
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    clipper.close()

    model, opt, clipper = setup()
    loaded = torch.load(path, weights_only=True) if rank == 0 else {"model": {}, "optim": {}, "clipper": None}
    bcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, loaded["model"], options=bcast)
    set_optimizer_state_dict(model, opt, loaded["optim"], options=bcast)
    box = [loaded["clipper"]]
    dist.broadcast_object_list(box, src=0)
    clipper.load_state_dict(box[0])
    run(model, clipper, range(3, STEPS))
    resumed = full_params(model)
    clipper.close()
    return {"resumed_equal": all(torch.equal(a, b) for a, b in zip(straight, resumed))}


def _adaptive_case(rank: int) -> dict[str, Any]:
    """Adaptive per-sample and micro-batch radii observe every rank's norms: the same state on
    every rank, under FSDP2 and DDP. ``*_local`` runs each rank's radii on its own norms only
    (the gathering switched off), which must differ: the check is not vacuous."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name, make in {
        "ps_ema": lambda: rc.per_sample_clip(EMA(0.9)),
        "ps_layer_ema": lambda: rc.per_sample_clip(EMA(0.9), per_layer=True),
        "mb_ema": lambda: rc.micro_batch_clip(EMA(0.9)),
        "spectral_ema": lambda: rc.chain(rc.mean(), rc.spectral_clip(EMA(0.9), rank=None)),
    }.items():
        for wrap in ("fsdp", "ddp", "ddp_local"):
            if wrap == "fsdp":
                model: nn.Module = shard(model_of("gpt"), "gpt")
            elif name == "spectral_ema":
                continue
            else:
                model = DDP(model_of("gpt"))
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            with rc.Clipper(model, opt, make()) as clipper:
                if wrap == "ddp_local":
                    clipper.layout.gather_norms = None
                for s in range(3):
                    for x, y in batches("gpt", s, rank):
                        clipper.backward(loss_fn("gpt", model(x), y))
                    clipper.step()
                out[f"{wrap}/{name}"] = clipper.state_dict()
    return out


def _collectives_case(rank: int) -> dict[str, dict[str, int]]:
    """The collectives robustclip adds to FSDP2's, per step (2 micro-batches; FSDP2 itself
    issues no all-reduce on a 1-D mesh)."""
    counts: dict[str, dict[str, int]] = {}
    real_ar, real_rs = dist.all_reduce, dist.reduce_scatter_single
    for name in ("mean", "clip_global", "clip_tensor", "per_sample", "micro_batch"):
        model = shard(model_of("mlp"), "mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        clipper = rc.Clipper(model, opt, methods()[name]())
        n = {"all_reduce": 0, "reduce_scatter": 0}

        def ar(*a: Any, _n: dict[str, int] = n, **k: Any) -> Any:
            _n["all_reduce"] += 1
            return real_ar(*a, **k)

        def rs(*a: Any, _n: dict[str, int] = n, **k: Any) -> Any:
            _n["reduce_scatter"] += 1
            return real_rs(*a, **k)

        dist.all_reduce, dist.reduce_scatter_single = ar, rs  # type: ignore[assignment]
        try:
            for x, y in batches("mlp", 0, rank):
                clipper.backward(loss_fn("mlp", model(x), y))
            clipper.step()
        finally:
            dist.all_reduce, dist.reduce_scatter_single = real_ar, real_rs  # type: ignore[assignment]
            clipper.close()
        counts[name] = n
    return counts


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = MLP([6, 12, 3]).double()
        self.unused = nn.Linear(2, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _errors_case(rank: int) -> dict[str, str]:
    """What is refused, and the message."""
    from torch.distributed.tensor import distribute_tensor, init_device_mesh

    out = {}
    # a parameter the loss never reaches: an error naming it, never a silent zero gradient
    from torch.distributed.fsdp import fully_shard

    model = WithUnused()
    fully_shard(model)
    clipper = rc.Clipper(model, torch.optim.SGD(model.parameters(), lr=0.1), rc.per_sample_clip(1.0))
    x, y = batches("mlp", 0, rank)[0]
    try:
        clipper.backward(loss_fn("mlp", model(x), y))
        out["unused"] = ""
    except ValueError as e:
        out["unused"] = str(e)
    clipper.close()
    # DTensor parameters without FSDP2 (tensor parallelism alone)
    mesh = init_device_mesh("cpu", (WORLD,))
    lin = nn.Linear(4, 4).double()
    lin.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh))
    try:
        rc.Clipper(lin, torch.optim.SGD([lin.weight], lr=0.1))
        out["dtensor"] = ""
    except ValueError as e:
        out["dtensor"] = str(e)
    # what the FSDP2 path refuses: dropping samples, a GradScaler, a gradient from the user's own
    # backward pass (FSDP2 is set to sum, so it would not be the mean)
    model = shard(model_of("mlp"), "mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for key, kwargs in (("drop", {"nonfinite": "drop_sample"}), ("scaler", {"scaler": torch.amp.GradScaler("cpu")})):
        try:
            rc.Clipper(model, opt, rc.per_sample_clip(1.0), **kwargs)
            out[key] = ""
        except ValueError as e:
            out[key] = str(e)
    with rc.Clipper(model, opt, rc.clip_by_global_norm(1.0)) as clipper:
        x, y = batches("mlp", 0, rank)[0]
        loss_fn("mlp", model(x), y).mean().backward()
        try:
            clipper.finish()
            out["external"] = ""
        except RuntimeError as e:
            out["external"] = str(e)
    return out


def worker(rank: int, init_file: str, result_dir: str, which: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out: dict[str, Any] = {}
        if which == "methods":
            for kind, name in cases():
                params, _ = train(kind, shard(model_of(kind), kind), methods()[name](), rank)
                out[f"{kind}/{name}"] = params
        else:
            from torch.distributed.device_mesh import init_device_mesh

            for kind, name in (("mlp", "micro_batch"), ("mlp", "per_sample"), ("gpt", "mean"), ("gpt", "per_sample")):
                for sync in ("last", "off"):
                    params, _ = train(kind, shard(model_of(kind), kind), methods()[name](), rank, sync=sync)
                    out[f"sync_{sync}/{kind}/{name}"] = params
            for name in ("mean", "per_sample", "spectral"):  # FSDP2 and torch.compile together
                torch._dynamo.reset()
                params, _ = train("gpt", shard(model_of("gpt"), "gpt"), methods()[name](), rank, compiled=True)
                out[f"compiled/gpt/{name}"] = params
            for kind, name in (("mlp", "per_sample"), ("gpt", "spectral"), ("mlp", "micro_batch")):
                # finish() and the caller's optimizer step (HF Trainer, Lightning) under FSDP2
                norms: list[torch.Tensor] = []
                params, _ = train(kind, shard(model_of(kind), kind), methods()[name](), rank, finish=norms)
                out[f"finish/{kind}/{name}"] = params
                out[f"finish_layer_norms/{kind}/{name}"] = norms
            for shape in ((2, 1), (1, 2)):
                mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
                for name in ("mean", "clip_tensor", "micro_batch", "per_sample", "spectral"):
                    params, _ = train("gpt", shard(model_of("gpt"), "gpt", mesh), methods()[name](), rank)
                    out[f"hsdp{shape}/gpt/{name}"] = params
            for name in ("per_sample", "clip_global"):
                params, skipped = train("mlp", shard(model_of("mlp"), "mlp"), methods()[name](), rank, nan=True)
                out[f"nan/mlp/{name}"] = params
                out[f"nan_skipped/{name}"] = skipped
            out["collectives"] = _collectives_case(rank)
            out["errors"] = _errors_case(rank)
            out["checkpoint"] = _checkpoint_case(rank, result_dir)
            out["adaptive"] = _adaptive_case(rank)
        torch.save(out, os.path.join(result_dir, f"{which}{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
