"""Per-sample gradients with ``torch.func``: vmap over samples, in memory-capped chunks.

The engine watches the model's forward (a pre-hook keeps the inputs, a hook keeps the output).
At ``accumulate(losses)`` it needs no loss function: the gradient of ``losses.sum()`` with
respect to the model's output gives, row by row, ``d loss_i / d out_i`` (each loss depends on
its own output row only). Sample ``i``'s parameter gradient is then the vector-Jacobian
product of the model at ``x_i`` with that row, which ``vmap(vjp(...))`` computes for a chunk
of samples at once. Chunks hold at most ``max_chunk_elements`` per-sample gradient entries.

Two guards keep this from ever being silently wrong: the losses may not depend on parameters
except through the captured output (a weight penalty inside the loss would be lost), and the
recomputed outputs must match the batch's outputs, which fails loudly for BatchNorm-like
mixing of samples, dropout and any other per-call randomness.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils import _pytree as pytree

from robustclip.per_sample._engine import (
    ParamLayout,
    PerSampleEngine,
    WeightFn,
    acc_dtype,
    expand_weights,
    row_sq_norms,
)
from robustclip.per_sample._grads import fill_missing
from robustclip.per_sample._graph import check_losses_reach_only, output_cotangents
from robustclip.per_sample.rules._terms import zero_dropped

#: one chunk's per-sample gradients (one tensor per parameter) and recomputed outputs, each with
#: the chunk's samples as first dimension
_Chunk = tuple[Sequence[Tensor], Sequence[Tensor]]


class VmapEngine(PerSampleEngine):
    name = "vmap"

    def __init__(
        self, model: nn.Module, layout: ParamLayout, max_chunk_elements: int = 2**26
    ) -> None:
        super().__init__(model, layout)
        self.max_chunk_elements = int(max_chunk_elements)
        self._handles: list[Any] = []
        self._inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._output: Any = None
        self._autocast: tuple[str, bool, torch.dtype] | None = None
        self._verified = False
        #: vmap could not batch the forward pass: samples run one at a time
        self._sequential = False

    # -- observing the forward ------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        self._handles.append(
            self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        )
        self._handles.append(self.model.register_forward_hook(self._hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs = self._output = None

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():
            return  # evaluation passes are not training steps
        self._inputs = (args, kwargs)
        dev = next((t.device.type for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)), "cpu")
        self._autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled():
            self._output = output

    # -- the engine ---------------------------------------------------------------------------
    def accumulate(
        self, losses: Tensor, weight_fn: WeightFn, out: list[Tensor | None], *, drop: bool = False
    ) -> Tensor:
        if self._inputs is None or self._output is None:
            raise RuntimeError(
                "the vmap engine saw no forward pass of the model since the last backward(). "
                "Call the model (with grad enabled) to compute the losses you pass to backward()."
            )
        batch = losses.shape[0]
        out_leaves, out_spec = pytree.tree_flatten(self._output)
        cand = [i for i, t in enumerate(out_leaves) if isinstance(t, Tensor) and t.requires_grad]
        if not cand:
            raise ValueError("the model's output does not require grad; nothing to differentiate.")
        # Only the outputs the losses use are pulled back, each with its partial derivative:
        # a scalar loss the model returns beside its logits (Hugging Face's labels=) is not
        # used by per-sample losses, and an output computed from another one (an encoder's
        # last hidden state beside the decoder's logits) would otherwise be counted twice.
        cots = output_cotangents(losses, [out_leaves[i] for i in cand])
        diff_idx = [i for i, c in zip(cand, cots) if c is not None]
        cot = [c for c in cots if c is not None]
        if not diff_idx:
            raise ValueError(
                "the per-sample losses do not depend on the model's output; compute them from "
                "what the model returns in the forward pass the clipper watched."
            )
        diff_out = [out_leaves[i] for i in diff_idx]
        for t in diff_out:
            if t.dim() == 0 or t.shape[0] != batch:
                raise ValueError(
                    f"the per-sample losses use a model output of shape {tuple(t.shape)} but "
                    f"there are {batch} of them; the vmap engine needs the outputs the losses "
                    "use to have the batch as first dimension."
                )
        check_losses_reach_only(losses, diff_out)

        args, kwargs = self._inputs
        in_leaves, in_spec = pytree.tree_flatten((args, kwargs))
        batched = [
            i for i, t in enumerate(in_leaves) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch
        ]
        if not batched:
            raise ValueError(
                f"none of the model's inputs has a first dimension equal to the batch ({batch}); "
                "the vmap engine cannot split the forward pass by sample."
            )
        model = self.model
        lay = self.layout
        train_ids = {id(p) for p in lay.params}
        named = dict(model.named_parameters(remove_duplicate=False))
        # functional_call substitutes by name; tied parameters appear under every name, so the
        # differentiated tensor is shared by all of them, as in the real model.
        name_of_param: dict[int, list[str]] = {}
        for n, p in named.items():
            name_of_param.setdefault(id(p), []).append(n)
        const = {n: p.detach() for n, p in named.items() if id(p) not in train_ids}
        buffers = dict(model.named_buffers())
        dev, ac_on, ac_dtype = self._autocast or ("cpu", False, torch.bfloat16)

        def per_sample(
            train_vals: tuple[Tensor, ...], xs: list[Tensor], cots: list[Tensor]
        ) -> tuple[tuple[Tensor, ...], list[Tensor]]:
            def f(vals: tuple[Tensor, ...]) -> list[Tensor]:
                mapping = dict(const)
                for p, v in zip(lay.params, vals):
                    for n in name_of_param[id(p)]:
                        mapping[n] = v
                mapping.update(buffers)
                leaves = list(in_leaves)
                for i, x in zip(batched, xs):
                    leaves[i] = x.unsqueeze(0)
                a, kw = pytree.tree_unflatten(leaves, in_spec)
                with torch.autocast(dev, dtype=ac_dtype, enabled=ac_on):
                    o = functional_call(model, mapping, tuple(a), kw)
                ol = pytree.tree_leaves(o)
                return [ol[i] for i in diff_idx]

            # vjp is typed to return a triple too, which only has_aux=True gives
            primal, pullback = cast(tuple[list[Tensor], Callable[..., Any]], vjp(f, train_vals))
            (g,) = pullback([c.unsqueeze(0) for c in cots])
            return g, [p.squeeze(0) for p in primal]

        def one_sample(xs: list[Tensor], cots: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
            # plain autograd on a batch of one: no batching rules, no torch.func transforms
            leaves = list(in_leaves)
            for i, x in zip(batched, xs):
                leaves[i] = x.unsqueeze(0)
            a, kw = pytree.tree_unflatten(leaves, in_spec)
            with torch.enable_grad(), torch.autocast(dev, dtype=ac_dtype, enabled=ac_on):
                o = model(*a, **kw)
            ol = pytree.tree_leaves(o)
            outs = [ol[i] for i in diff_idx]
            gs = torch.autograd.grad(
                outs, lay.params, [c.unsqueeze(0) for c in cots], allow_unused=True
            )
            g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(lay.params, gs)]
            return g, [t.detach().squeeze(0) for t in outs]

        per_sample_v = vmap(per_sample, in_dims=(None, 0, 0), randomness="error")
        total = sum(p.numel() for p in lay.params)
        chunk = max(1, min(batch, self.max_chunk_elements // max(total, 1)))
        train_vals = tuple(p.detach() for p in lay.params)
        # this engine only adds: accumulate_into has zero-filled the missing entries already
        dst = fill_missing(out, lay.params)
        norms = []
        for start in range(0, batch, chunk):
            sl = slice(start, min(start + chunk, batch))
            xs = [in_leaves[i][sl] for i in batched]
            cs = [c[sl] for c in cot]
            grads, primal = self._chunk(per_sample_v, one_sample, train_vals, xs, cs)
            if not self._verified:
                # Once: this comparison reads values on the host. Batch-mixing layers and
                # randomness are structural, so the first step reveals them.
                for got, ref in zip(primal, diff_out):
                    _check_recompute(got, ref[sl].detach())
            # float64 squared norms of each sample's gradient scaled by its largest entry: finite
            # and accurate for every finite gradient (a float32 square overflows above 1.8e19)
            gsq = self.group_sq_norms([row_sq_norms(g) for g in grads])
            w = weight_fn(gsq)
            for o, g, wp in zip(dst, grads, expand_weights(w, lay.group_of)):
                # with drop, a dropped sample (weight 0) may hold NaN, and 0 * NaN is NaN: zeroed
                o.add_(torch.tensordot(wp.to(g.dtype), zero_dropped(g, wp, drop), dims=1))
            norms.append(gsq.sqrt().to(acc_dtype(grads[0].dtype)))
            del grads, primal
        self._verified = True
        self._inputs = self._output = None  # free the forward's graph and inputs
        return torch.cat(norms, dim=1)


    def _chunk(
        self,
        batched_fn: Callable[[tuple[Tensor, ...], list[Tensor], list[Tensor]], _Chunk],
        one_fn: Callable[[list[Tensor], list[Tensor]], _Chunk],
        train_vals: tuple[Tensor, ...],
        xs: list[Tensor],
        cs: list[Tensor],
    ) -> _Chunk:
        """Per-sample gradients and recomputed outputs of one chunk: vmapped, or one sample at
        a time where torch.func cannot run the model's forward and backward passes."""
        if not self._sequential:
            try:
                with warnings.catch_warnings():
                    # torch notes ops without a batching rule (e.g. CPU flash attention); the
                    # fallback is correct, and the note is not actionable for the user.
                    warnings.filterwarnings("ignore", message=".*batching rule.*")
                    return batched_fn(train_vals, xs, cs)
            except RuntimeError as e:
                if isinstance(e, torch.OutOfMemoryError):
                    raise  # max_chunk_elements is the answer there, not another path
                if "randomness" in str(e) or "random" in str(e):
                    raise ValueError(
                        "the model uses randomness in its forward pass (dropout?), which the vmap "
                        "engine would redraw and so get the wrong per-sample gradients. Put "
                        "dropout modules in eval mode, or use engine='loop' (or the hook engine), "
                        "which reuse the batch's own forward pass."
                    ) from e
                # torch.func cannot run some forward passes: data-dependent control flow (a
                # padding mask checked with .all() or .item()), an in-place write of batched
                # values into a tensor the model creates (nn.GRU's initial state), or a backward
                # formula that differs under its transforms (scaled_dot_product_attention with
                # bf16 inputs and a float32 mask that requires grad, as T5's position bias
                # under autocast). Plain autograd on one sample at a time runs them all.
                from robustclip.per_sample._hooks import PerSampleFallbackWarning

                warnings.warn(
                    "robustclip: torch.func (vmap over vjp) cannot run this model over the "
                    f"batch ({str(e).splitlines()[0][:160]}); the vmap engine now computes "
                    "per-sample gradients one sample at a time, with plain autograd on a "
                    "batch of one (exact, slower).",
                    PerSampleFallbackWarning,
                    stacklevel=6,
                )
                self._sequential = True
                self._verified = False  # a new path: its recomputed outputs are checked too
        n = xs[0].shape[0]
        per = [one_fn([x[i] for x in xs], [c[i] for c in cs]) for i in range(n)]
        grads = [torch.stack(g) for g in zip(*(p[0] for p in per))]
        primal = [torch.stack(o) for o in zip(*(p[1] for p in per))]
        return grads, primal


def _check_recompute(got: Tensor, ref: Tensor) -> None:
    """The per-sample recomputation must reproduce the batch's output (up to rounding)."""
    # bf16/fp16 (autocast) outputs differ by a few units in their last place between the batch
    # and a batch of one (other kernel blocking); samples that interact differ by O(1)
    half = (torch.float16, torch.bfloat16)
    tol = 3e-2 if got.dtype in half or ref.dtype in half else 1e-2 if got.dtype != ref.dtype else 1e-3
    got = got.detach().float()
    ref = ref.float()
    # a sample whose batch output is not finite is dropped (Clipper(nonfinite="drop_sample"))
    # or makes the step skip: only the finite samples are compared
    if ref.dim():
        finite = torch.isfinite(ref).reshape(ref.shape[0], -1).all(1)
        got, ref = got[finite], ref[finite]
    elif not torch.isfinite(ref):
        return
    scale = ref.abs().amax().clamp(min=1.0) if ref.numel() else torch.ones(())
    if not torch.allclose(got, ref, rtol=0, atol=float(tol * scale)):
        raise ValueError(
            "recomputing the model one sample at a time does not reproduce the batch's output: "
            "the samples interact in the forward pass (BatchNorm in training mode, statistics "
            "over the batch) or the forward pass is random. Per-sample gradients are undefined "
            "there. Convert BatchNorm with robustclip.convert_batchnorm_to_groupnorm(model), put "
            "random layers in eval mode, or use engine='loop'."
        )
