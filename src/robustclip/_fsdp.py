"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the Clipper's step on sharded parameters.

FSDP2 keeps each parameter as a sharded DTensor (``Shard(0)`` over the mesh's shard dimension)
on the module and in the optimizer, and swaps a plain, unsharded ``nn.Parameter`` onto the
module for forward and backward. Those unsharded parameters are the leaves of the autograd graph
(one object per parameter for the model's life; FSDP2 frees their storage after use and gathers
it again), so the DTensors the optimizer holds are never reached by the loss. robustclip
therefore:

* differentiates with respect to the unsharded leaves (:attr:`Sharding.leaves`, which become
  the layout's ``params``), found with FSDP2's public ``unshard()``/``reshard()``, one FSDP group
  at a time;
* ``mean()``: a real backward into the leaves, so that FSDP2's own post-backward hooks
  reduce-scatter the sums into the sharded ``p.grad``, overlapped with the backward pass (the
  Clipper sets every FSDP module's divide factor to 1 with a plain SUM: estimators add sums);
* every other estimator (micro-batch clipping, per-sample clipping): the rank's full local
  contribution, clipped per micro-batch or per sample on this rank, is reduce-scattered by
  robustclip into the shards, one collective per dtype and ``backward()``. With the user's
  gradient sync off (``model.set_requires_gradient_sync(False)``, as for accumulation without
  communication) the contributions add up in a local buffer and are reduce-scattered once, at
  the first synced ``backward()`` or in ``step()``;
* ``step()``: ONE all-reduce (float64) of ``[count, loss sum, clipped count, local sum of
  squares]``: the global norm, the skip decision and every threshold are then the same on every
  rank;
* the transforms act on the local shards; norms go through :class:`StepContext`'s reducer
  (``sum_over_shards``), and spectral clipping gathers each selected matrix to one owner rank
  (groups of same-shaped matrices spread over ranks by size), clips it there and scatters the
  result back (two ``all_to_all_single`` and one small all-reduce per step).

HSDP meshes (``(Replicate(), Shard(0))`` placements) work the same way; every reduction also
all-reduces over the replicate dimension. Not supported: tensor parallelism (other DTensor
placements), mixed-precision policies (untested), per-sample fallbacks that replay modules with
torch.func (FSDP2 frees the parameters they would read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from robustclip._estimators import Contribution, Estimator, Mean
from robustclip._math import tensor_norms, wide_dtype
from robustclip._method import Method
from robustclip._spectral import SpectralClip, SpectralClipState
from robustclip._transform import Chain, StepContext
from robustclip.per_sample import ParamLayout, PerSampleEngine
from robustclip.per_sample._grads import fill_missing

__all__ = ["Sharding", "detect", "fsdp_modules"]


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _is_dtensor(t: Tensor) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def detect(model: nn.Module, params: Sequence[Tensor], method: Method) -> Sharding | None:
    """A :class:`Sharding` if ``model`` is sharded with FSDP2, else None; DTensor parameters
    that FSDP2 does not manage are refused (they would never get a gradient)."""
    mods = fsdp_modules(model)
    if not mods:
        if any(_is_dtensor(p) for p in params):
            raise ValueError(
                "the optimizer holds DTensor parameters, but the model has no FSDP2 module: "
                "robustclip supports DTensor parameters only as FSDP2 shards (tensor parallelism "
                "alone is not supported). Shard the model with "
                "torch.distributed.fsdp.fully_shard, or give the optimizer plain parameters."
            )
        return None
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "the model is DistributedDataParallel around an FSDP2 model; for replicas of a "
            "sharded model use an HSDP mesh: fully_shard(model, mesh=init_device_mesh(..., "
            "(replicas, shards)))."
        )
    return Sharding(model, mods, params, method)


class Sharding:
    """The FSDP2 side of one Clipper: the sharded parameters, their unsharded leaves, the mesh
    groups, and the reductions of a step (see the module docstring)."""

    def __init__(self, model: nn.Module, mods: list[nn.Module], params: Sequence[Tensor], method: Method) -> None:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        self.model = model
        self.modules = mods
        plain = [tuple(p.shape) for p in params if not isinstance(p, DTensor)]
        if plain:
            raise ValueError(
                f"{len(plain)} optimizer parameter(s) of the FSDP2 model are not sharded (shapes "
                f"{plain[:4]}): apply fully_shard to the module that owns them, or to the root "
                "model last, which takes every parameter left."
            )
        self.params: list[Any] = list(params)  # DTensors
        mesh = self.params[0].device_mesh
        for p in self.params:
            pl = tuple(p.placements)
            shards = [i for i, x in enumerate(pl) if isinstance(x, Shard)]
            if (
                p.device_mesh != mesh
                or len(shards) != 1
                or pl[shards[0]] != Shard(0)
                or not all(isinstance(x, (Shard, Replicate)) for x in pl)
                or p.dim() == 0
            ):
                raise ValueError(
                    f"robustclip supports FSDP2 parameters sharded on dim 0 over one mesh (FSDP or "
                    f"HSDP); got placements {pl} on {p.device_mesh} for a parameter of shape "
                    f"{tuple(p.shape)} (tensor parallelism is not supported)."
                )
        self.mesh = mesh
        dim = shards[0]
        self.shard_group = mesh.get_group(dim)
        self.shard_size = mesh.size(dim)
        self.shard_rank = mesh.get_local_rank(dim)
        others = [i for i in range(mesh.ndim) if i != dim]
        self.replicate_groups = [mesh.get_group(i) for i in others]
        self.replicas = math.prod(mesh.size(i) for i in others)
        est = method.estimator
        if est.per_sample and getattr(est, "engine", "auto") not in ("auto", "hooks"):
            raise ValueError(
                f"under FSDP2 per-sample clipping runs on the hook engine only (engine='hooks' or "
                f"'auto'), got engine={getattr(est, 'engine', None)!r}: the vmap and loop engines "
                "replay the model with parameters FSDP2 has freed."
            )
        self.leaves = self._aliases()
        # robustclip's estimators add sums: FSDP2 must neither divide nor pre-multiply (with a
        # custom factor it would pick ReduceOp.PREMUL_SUM for float32/bf16, which gloo lacks)
        self._saved = [(m, _group_settings(m)) for m in mods]
        for m in mods:
            m.set_gradient_divide_factor(1.0)  # type: ignore[operator]  # FSDPModule method; the module is typed nn.Module, whose __getattr__ returns Tensor | Module
            m.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]  # FSDPModule method, as above
        self._acc: list[Tensor] | None = None  # local sums while gradient sync is off

    # -- the graph's leaves ------------------------------------------------------------------------
    def _aliases(self) -> list[Tensor]:
        """The unsharded parameter FSDP2 puts on the modules for forward and backward, for each
        sharded one; one FSDP group unsharded at a time."""
        from torch.distributed.tensor import DTensor

        model = self.model
        name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        found: dict[str, Tensor] = {}
        for m in self.modules:
            m.unshard()  # type: ignore[operator]  # FSDPModule method, as above
            try:
                for n, p in model.named_parameters(remove_duplicate=False):
                    if not isinstance(p, DTensor) and n not in found:
                        found[n] = p
            finally:
                m.reshard()  # type: ignore[operator]  # FSDPModule method, as above
        missing = [name_of[id(p)] for p in self.params if name_of[id(p)] not in found]
        if missing:
            raise ValueError(
                f"FSDP2 did not unshard {missing[:4]}: are these parameters registered on the "
                "model given to the Clipper?"
            )
        return [found[name_of[id(p)]] for p in self.params]

    @contextlib.contextmanager
    def view(self) -> Iterator[None]:
        """The modules hold the unsharded leaves instead of the shards inside this block, as in
        FSDP2's forward, without gathering anything (the per-sample engine plans its units on
        the objects the forward pass will use)."""
        leaf_of = {id(p): leaf for p, leaf in zip(self.params, self.leaves)}
        swapped: list[tuple[nn.Module, str, Any]] = []
        for mod in self.model.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and id(p) in leaf_of:
                    swapped.append((mod, name, p))
                    mod._parameters[name] = leaf_of[id(p)]  # type: ignore[assignment]  # the unsharded leaf is an nn.Parameter at run time; FSDP2 types it as a Tensor
        try:
            yield
        finally:
            for mod, name, p in swapped:
                mod._parameters[name] = p

    def graph_layout(self, layout: ParamLayout) -> ParamLayout:
        """``layout`` (built on the shards) with the leaves as the parameters autograd sees."""
        return dataclasses.replace(
            layout, params=list(self.leaves), direct_backward=False, sharded=True, gather_norms=self.gather_padded
        )

    def check_engine(self, engine: PerSampleEngine | None) -> None:
        units = getattr(engine, "units", [])
        replayed = [u.name for u in units if u.rule is None]
        if replayed:
            raise ValueError(
                f"under FSDP2 every module with parameters needs a per-sample rule, but "
                f"{replayed[:4]} have none (the torch.func replay would read parameters FSDP2 "
                "has freed). Use supported layers, or a batch-level method."
            )

    def close(self) -> None:
        """Restore the FSDP modules' reduction settings."""
        for m, (factor, force) in self._saved:
            m.set_gradient_divide_factor(factor)  # type: ignore[operator]  # FSDPModule method, as above
            m.set_force_sum_reduction_for_comms(force)  # type: ignore[operator]  # FSDPModule method, as above
        self._saved = []

    # -- backward ------------------------------------------------------------------------------------
    def sync_on(self) -> bool:
        """Whether the user left FSDP2's gradient sync on (``set_requires_gradient_sync``)."""
        for m in self.modules:
            state = m._get_fsdp_state()  # type: ignore[operator]  # FSDPModule's private state accessor, through nn.Module's __getattr__ typing
            for group in getattr(state, "_fsdp_param_groups", ()):
                if not getattr(group, "reduce_grads", True):
                    return False
        return True

    def contribute(
        self,
        est: Estimator[Any],
        losses: Tensor,
        state: Any,
        layout: ParamLayout,
        engine: PerSampleEngine | None,
        first: bool,
    ) -> tuple[Contribution, Any]:
        """One ``backward()``: the estimator's sum into the sharded gradients."""
        if first:
            for p in self.params:
                p.grad = None
        if isinstance(est, Mean):
            total, count = (losses, 1) if losses.dim() == 0 else (losses.sum(), losses.shape[0])
            # FSDP2's post-backward hooks reduce-scatter (sum) into p.grad, or accumulate in
            # the leaves' .grad while the user keeps gradient sync off
            torch.autograd.backward(total, inputs=list(self.leaves))
            return Contribution(count), state
        out: list[Tensor | None] = [None] * len(self.leaves) if self._acc is None else list(self._acc)
        contrib, state = est.contribute(losses, state, layout, engine, out)
        full = fill_missing(out, self.leaves)
        if self.sync_on():
            self._acc = None
            self.scatter_add(full)
        else:
            self._acc = full
        return contrib, state

    def scatter_add(self, fulls: Sequence[Tensor]) -> None:
        """``p.grad += `` this rank's shard of the sum over ranks of ``fulls`` (leaf-shaped): one
        reduce-scatter per dtype in FSDP2's layout (each tensor padded to ``N * ceil(rows/N)``
        rows, rank r's rows of every tensor side by side), then, for HSDP, one all-reduce over
        the replicates."""
        n = self.shard_size
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, f in enumerate(fulls):
            by_dtype.setdefault(f.dtype, []).append(i)
        for idxs in by_dtype.values():
            cols, widths = [], []
            for i in idxs:
                f = fulls[i].detach()
                rows = f.shape[0]
                chunk = -(-rows // n)
                f2 = f.reshape(rows, -1)
                if chunk * n != rows:
                    f2 = torch.cat([f2, f2.new_zeros((chunk * n - rows, f2.shape[1]))])
                cols.append(f2.reshape(n, -1))
                widths.append(cols[-1].shape[1])
            flat = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0].contiguous()
            mine = flat.new_empty(flat.shape[1])
            _reduce_scatter(mine, flat.reshape(-1), self.shard_group)
            del flat, cols
            for g in self.replicate_groups:
                dist.all_reduce(mine, group=g)
            off = 0
            for i, w in zip(idxs, widths):
                p = self.params[i]
                local_shape = p.to_local().shape
                part = mine[off : off + w].reshape(-1, *p.shape[1:])[: local_shape[0]].reshape(local_shape)
                off += w
                self._add_local(p, part)

    def _add_local(self, p: Any, part: Tensor) -> None:
        from torch.distributed.tensor import DTensor

        if p.grad is None:
            local = part.to(p.dtype, copy=True)
            p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)
        else:
            p.grad.to_local().add_(part.to(p.dtype))

    # -- step ------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Local sums left by accumulation without gradient sync: reduce-scattered now, once."""
        if self._acc is not None:
            acc, self._acc = self._acc, None
            self.scatter_add(acc)
        pending = [i for i, leaf in enumerate(self.leaves) if leaf.grad is not None]
        if pending:  # mean() with gradient sync off: FSDP2 kept the sums on the leaves
            fulls = [self.leaves[i].grad if self.leaves[i].grad is not None else torch.zeros_like(self.leaves[i]) for i in range(len(self.leaves))]
            for leaf in self.leaves:
                leaf.grad = None
            self.scatter_add(fulls)  # type: ignore[arg-type]  # every entry is a tensor: zeros replace a missing .grad

    def reduce(self, count: int, loss_sum: Tensor, clipped_sum: Tensor) -> tuple[list[Tensor], Tensor, Tensor, Tensor, Tensor]:
        """The step's one all-reduce: the local gradient shards divided by the global count,
        and the count, mean loss, clipped count and global gradient norm, identical on every
        rank."""
        self._flush()
        for p in self.params:
            if p.grad is None:  # reached by nothing (the Clipper refused that unless allow_unused)
                self._add_local(p, torch.zeros_like(p.to_local()))
        grads = [p.grad.to_local() for p in self.params]
        dev = grads[0].device
        # each shard's overflow-safe norm in the wide dtype (float64 where the device has it),
        # squared there: finite for every finite gradient, even above the float32 maximum
        wide = wide_dtype(dev)
        sq = torch.stack(tensor_norms(grads, dtype=wide)).square().sum().to(torch.float64)
        scalars = torch.stack(
            [torch.full((), float(count), dtype=torch.float64, device=dev), loss_sum.to(dev), clipped_sum.to(dev), sq]
        )
        self.all_reduce(scalars)
        total, loss_sum, clipped, sq = scalars.unbind()
        torch._foreach_div_(grads, total)
        grad_norm = ((sq / self.replicas).sqrt() / total).to(wide)
        return grads, total, loss_sum / total, clipped, grad_norm

    def all_reduce(self, t: Tensor) -> None:
        """Sum ``t`` over every rank of the mesh, in place."""
        dist.all_reduce(t, group=self.shard_group)
        for g in self.replicate_groups:
            dist.all_reduce(t, group=g)

    def sum_over_shards(self, local: Tensor) -> Tensor:
        """The whole gradient's value of a sum over elements (a sum of squares), from each
        rank's sum over its shards."""
        t = local.to(torch.float64, copy=True)
        self.all_reduce(t)
        out: Tensor = (t / self.replicas).to(local.dtype)
        return out

    def gather_padded(self, values: Tensor) -> Tensor:
        """Every rank's ``values`` (last dimension: the rank's samples, any length), joined along
        the last dimension in rank order: what adaptive thresholds observe, the same on every
        rank."""
        from robustclip._distributed import all_gather_padded

        out = all_gather_padded(values, self.shard_group)
        for g in self.replicate_groups:
            out = all_gather_padded(out, g)
        return out

    def context(self, ctx: StepContext, grad_norm: Tensor) -> StepContext:
        return dataclasses.replace(ctx, params=self.params, sum_over_shards=self.sum_over_shards, grad_norm=grad_norm)

    def transform(self, chain: Chain, grads: list[Tensor], state: tuple[Any, ...], ctx: StepContext) -> tuple[list[Tensor], tuple[Any, ...]]:
        """The chain on the local shards; spectral clipping through owner ranks."""
        if not any(isinstance(t, SpectralClip) for t in chain.transforms):
            return chain.update(grads, state, ctx)
        new = []
        for t, s in zip(chain.transforms, state):
            if isinstance(t, SpectralClip):
                s = self._spectral(t, grads, s, ctx)
            else:
                grads, s = t.update(grads, s, ctx)
            ctx = dataclasses.replace(ctx, grad_norm=None)
            new.append(s)
        return grads, tuple(new)

    # -- spectral clipping of sharded matrices ------------------------------------------------------------
    def _spectral(self, t: SpectralClip, grads: list[Tensor], state: SpectralClipState, ctx: StepContext) -> SpectralClipState:
        """Each group of same-shaped matrices (the transform's own batching) is gathered to one
        owner rank, clipped there with the transform's code, and its rows sent back. Owners:
        the least-loaded rank, groups in plan order, so every rank computes the same map. The
        sketch generator advances on every rank as in one process; thresholds and readings are
        shared with one all-reduce, so the state is the same everywhere."""
        n, me = self.shard_size, self.shard_rank
        plan = t._plan(self.params, ctx)  # global shapes
        load = [0] * n
        owner: list[int] = []
        for grp in plan.groups:
            o = min(range(n), key=lambda r: (load[r], r))
            owner.append(o)
            load[o] += sum(self.params[i].numel() for i in grp.indices)
        # matrix i travels as its rows padded to N * chunk_i; segment per owner
        chunk = {i: -(-self.params[i].shape[0] // n) for grp in plan.groups for i in grp.indices}
        width = {i: self.params[i].numel() // self.params[i].shape[0] for i in chunk}
        by_owner: list[list[int]] = [[] for _ in range(n)]
        for grp, o in zip(plan.groups, owner):
            by_owner[o].extend(grp.indices)
        seg = [sum(chunk[i] * width[i] for i in by_owner[o]) for o in range(n)]
        dtype = grads[0].dtype
        if any(grads[i].dtype != dtype for i in chunk):
            raise ValueError("spectral clipping under FSDP2 needs one gradient dtype for the selected matrices.")
        dev = grads[0].device
        send = torch.zeros(sum(seg), dtype=dtype, device=dev)
        off = 0
        for o in range(n):
            for i in by_owner[o]:
                g = grads[i].reshape(grads[i].shape[0], -1)
                send[off : off + g.numel()] = g.reshape(-1)
                off += chunk[i] * width[i]
        recv = torch.empty(seg[me] * n, dtype=dtype, device=dev)
        dist.all_to_all_single(recv, send, [seg[me]] * n, seg, group=self.shard_group)
        # the full matrices this rank owns
        fulls: list[Tensor] = list(grads)
        rows_of = [[c.shape[0] for c in torch.empty(self.params[i].shape[0], 0).chunk(n)] for i in range(len(grads))]
        for counts in rows_of:
            counts += [0] * (n - len(counts))
        pieces = recv.split(seg[me]) if seg[me] else [recv] * n
        off = 0
        for i in by_owner[me]:
            size = chunk[i] * width[i]
            parts = [pieces[r][off : off + size].reshape(chunk[i], width[i])[: rows_of[i][r]] for r in range(n)]
            fulls[i] = torch.cat(parts).reshape(self.params[i].shape)
            off += size
        ths = list(state.thresholds)
        before, after, taus, clipped = (state.sigma_before.clone(), state.sigma_after.clone(), state.threshold.clone(), state.clipped.clone())
        nonfinite = state.nonfinite.clone()
        gen: torch.Generator | None = None
        if plan.groups and t.rank is not None:
            gen = torch.Generator(device=dev)
            gen.set_state(state.rng)
        with torch.no_grad():
            for grp, o in zip(plan.groups, owner):
                if o == me:
                    t._clip_group(fulls, grp, ths, gen, (before, after, taus, clipped, nonfinite))
                elif gen is not None:
                    _advance_sketch(gen, grp, self.params, t, dtype)
            if plan.vectors:
                # 1-D gradients (clip_vectors) are clipped in place on every rank: their norms
                # over the shards (overflow-safe, wide dtype, one all-reduce) are the same
                # everywhere, and so are the thresholds and readings
                vs = [grads[i] for i in plan.vectors]
                sq = torch.stack(tensor_norms(vs, dtype=wide_dtype(dev))).square()
                norms = self.sum_over_shards(sq).sqrt().float()
                t._clip_vectors(grads, plan, ths, (before, after, taus, clipped, nonfinite), norms=norms)
        # rows back to their ranks: the reverse exchange
        back = torch.zeros(seg[me] * n, dtype=dtype, device=dev)
        off = 0
        for i in by_owner[me]:
            size = chunk[i] * width[i]
            full = fulls[i].reshape(self.params[i].shape[0], -1)
            start = 0
            for r in range(n):
                rows = rows_of[i][r]
                dst = back[r * seg[me] + off : r * seg[me] + off + rows * width[i]]
                dst.copy_(full[start : start + rows].reshape(-1))
                start += rows
            off += size
        got = torch.empty(sum(seg), dtype=dtype, device=dev)
        dist.all_to_all_single(got, back, seg, [seg[me]] * n, group=self.shard_group)
        off = 0
        for o in range(n):
            for i in by_owner[o]:
                local = grads[i]
                local.copy_(got[off : off + local.numel()].reshape(local.shape))
                off += chunk[i] * width[i]
        # thresholds and readings: each owner's entries, summed into every rank
        sel = [i for grp in plan.groups for i in grp.indices]
        mine = {i for i in by_owner[me]}
        leaves, specs = [], []
        for i in sel:
            flat, spec = pytree.tree_flatten(ths[i])
            leaves.append(flat)
            specs.append(spec)
        parts_: list[Tensor] = []
        for i, flat in zip(sel, leaves):
            for x in flat:
                v = x.detach().reshape(-1).to(torch.float64)
                parts_.append(v if i in mine else torch.zeros_like(v))
        idx = torch.tensor(sel, dtype=torch.long, device=before.device)
        own = torch.tensor([i in mine for i in sel], device=before.device)
        reads = torch.stack([before, after, taus, clipped, nonfinite])[:, idx].to(torch.float64)
        parts_.append(torch.where(own, reads, torch.zeros_like(reads)).reshape(-1))
        if parts_:
            buf = torch.cat(parts_)
            dist.all_reduce(buf, group=self.shard_group)
            off = 0
            for k, (i, flat) in enumerate(zip(sel, leaves)):
                vals = []
                for x in flat:
                    vals.append(buf[off : off + x.numel()].reshape(x.shape).to(x.dtype))
                    off += x.numel()
                ths[i] = pytree.tree_unflatten(vals, specs[k])
            reads = buf[off:].reshape(5, len(sel))
            for row, tgt in zip(reads, (before, after, taus, clipped, nonfinite)):
                tgt.index_copy_(0, idx, row.to(tgt.dtype))
        picked = [idx] if sel else []
        if plan.vector_index is not None:
            picked.append(plan.vector_index)
        frac = clipped.index_select(0, torch.cat(picked)).mean() if picked else torch.zeros_like(state.clipped_fraction)
        rng = gen.get_state() if gen is not None else state.rng
        return SpectralClipState(tuple(ths), rng, before, after, taus, clipped, nonfinite, frac)


def _advance_sketch(gen: torch.Generator, grp: Any, params: Sequence[Tensor], t: SpectralClip, dtype: torch.dtype) -> None:
    """Draw what the randomized mode draws for ``grp`` (``_svd._randomized``'s Gaussian sketch,
    ``(k, q, n)`` for ``k`` tall ``m x n`` matrices; nothing when the exact mode applies), so
    the generator stays where one process would have it."""
    i = grp.indices[0]
    m, k = params[i].shape[0], params[i].numel() // params[i].shape[0]
    small = min(m, k)
    if t.rank is None or t.q >= small:
        return
    torch.randn(len(grp.indices), t.q, small, generator=gen, device=gen.device, dtype=torch.promote_types(dtype, torch.float32))


def _reduce_scatter(out: Tensor, inp: Tensor, group: Any) -> None:
    """Sum ``inp`` over ``group`` and keep this rank's slice (``reduce_scatter_single`` where
    this PyTorch has it; ``reduce_scatter_tensor``, its older name, otherwise)."""
    fn = getattr(dist, "reduce_scatter_single", None)
    if fn is not None:
        fn(out, inp, group=group)
    else:
        dist.reduce_scatter_tensor(out, inp, group=group)


def _group_settings(m: nn.Module) -> tuple[float | None, bool]:
    """An FSDP module's divide factor and forced-SUM switch, to restore on close (readable only
    from FSDP2's param groups)."""
    state = m._get_fsdp_state()  # type: ignore[operator]  # FSDPModule's private state accessor, through nn.Module's __getattr__ typing
    for g in getattr(state, "_fsdp_param_groups", ()):
        return getattr(g, "gradient_divide_factor", None), bool(getattr(g, "force_sum_reduction_for_comms", False))
    return None, False
