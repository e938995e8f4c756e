"""Worker for the Lightning DDP test: one of two processes, started as torchrun would start it,
so that Lightning's "ddp" strategy joins the group instead of launching processes itself."""

from __future__ import annotations

import os
import warnings

import torch

import robustclip as rc

STEPS = 5


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0",
    )
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import lightning.pytorch as pl

    from robustclip.integrations.lightning import RobustClipCallback

    from . import test_integrations_lightning as T

    data = T.make_data(n=2 * T.BATCH * STEPS)
    x, y = data
    result = {}
    # both integrations in the same two processes: starting them costs more than training
    for mixin in (True, False):
        if mixin:
            module, callbacks = T.PerSample(rc.per_sample_clip(0.5)), []
        else:
            module, callbacks = T.Plain(), [RobustClipCallback(rc.clip_by_global_norm(0.5))]
        trainer = pl.Trainer(
            max_steps=STEPS, accelerator="cpu", devices=2, strategy="ddp", logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=callbacks, use_distributed_sampler=False,
        )
        # each process its own half of every global batch (samples rank, rank + 2, ...): the
        # global batch of step s is samples 2 * BATCH * s ... 2 * BATCH * (s + 1) - 1
        trainer.fit(module, T.loader(x[rank::2], y[rank::2]))
        result["module" if mixin else "callback"] = {
            n: p.detach().clone() for n, p in module.net.named_parameters()
        }
    if rank == 0:
        torch.save(result, out)
