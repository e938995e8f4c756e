"""The reference engine: one backward pass per sample.

``g_i = autograd.grad(losses[i], params)`` on the batch's own graph is the definition of a
per-sample gradient, with nothing clever in between, so this engine is the oracle every faster
engine is tested against. It costs ``B`` backward passes: use it to check, not to train.
"""

from __future__ import annotations

import torch
from torch import Tensor

from robustclip.per_sample._engine import PerSampleEngine, WeightFn, acc_dtype, expand_weights
from robustclip.per_sample._grads import fill_missing


class LoopEngine(PerSampleEngine):
    name = "loop"

    def accumulate(
        self, losses: Tensor, weight_fn: WeightFn, out: list[Tensor | None], *, drop: bool = False
    ) -> Tensor:
        # the oracle zeroes a sample of weight 0 in every mode (``drop`` changes nothing here)
        params = self.layout.params
        # this engine only adds: accumulate_into has zero-filled the missing entries already
        dst = fill_missing(out, params)
        norms = []
        for i in range(losses.shape[0]):
            found = torch.autograd.grad(
                losses[i], params, retain_graph=True, allow_unused=True
            )
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)]
            # float64 squares: float32 ones overflow above norm 1.8e19 and underflow below 1e-19
            wide = torch.float64 if losses.device.type != "mps" else torch.float32
            sq = [g.detach().to(wide).pow(2).sum().reshape(1) for g in grads]
            gsq = self.group_sq_norms(sq)  # (G, 1)
            w = weight_fn(gsq)
            for o, g, wp in zip(dst, grads, expand_weights(w, self.layout.group_of)):
                # where, not a product: a dropped sample (weight 0) may hold NaN, and NaN * 0 is NaN
                o.add_(torch.where(wp[0] == 0, 0.0, g * wp[0].to(g.dtype)))
            norms.append(gsq.sqrt().to(acc_dtype(grads[0].dtype)))
        return torch.cat(norms, dim=1)
