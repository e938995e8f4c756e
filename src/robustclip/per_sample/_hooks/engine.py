"""The hook engine: per-sample clipping in one forward and one backward pass.

Forward: hooks on every *unit* (a module owning trainable parameters) record the layer input and
the autograd edge of its output (``capture.py``).

``accumulate(losses)``:

1. walk the losses' graph (``walk.py``): which calls matter, which parameters are used bare,
   which layer outputs lack a batch dimension;
2. ONE ``torch.autograd.grad(losses.sum(), <captured output edges>)``. Autograd then computes
   only what those gradients need: every parameter-gradient matmul of the plain backward is
   skipped, and no ``AccumulateGrad`` node runs (so DDP's reducer hooks stay silent; the
   Clipper all-reduces once per step itself);
3. each layer rule (``rules/``) turns (input, output gradient) into per-parameter *terms*;
4. per parameter, a cost model picks how to get the per-sample squared norms (keep the
   materialised per-sample gradient when it is smaller than what it frees, the ghost Gram
   form, an exact sort for embeddings, or chunks freed at once);
5. the weights ``w = weight_fn(norms)`` over the *whole* batch, then ``out[p] += sum_i w_i g_i``
   in one matmul (or scatter, or weight-gradient convolution) per parameter.

No ``B x params`` per-sample gradient tensor is ever built: a layer's per-sample gradients are
materialised only when they are no larger than the activations and output gradients of that
layer that are freed in exchange.

Safety nets, so that a gradient is never silently wrong:

* modules without a rule are replayed per sample with torch.func (one warning naming them);
* bare parameters and unbatched layer calls are handled at their broadcasting consumer
  (``rules/broadcast.py``) or else the whole model falls back to torch.func (warning);
* on the first step, sample 0's gradient from the terms is compared with autograd's (one extra
  backward pass, once); a mismatch raises instead of training on a wrong gradient.

References: ghost clipping, Goodfellow (arXiv:1510.01799), Li et al. (arXiv:2110.05679);
mixed ghost clipping and book-keeping, Bu et al. (arXiv:2205.10683, arXiv:2210.00038);
PS-Clip-SGD, Nobile & Grohs (arXiv:2605.02701).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils import _pytree as pytree

from robustclip.per_sample._engine import (
    ParamLayout,
    PerSampleEngine,
    WeightFn,
    acc_dtype,
    accumulate_into,
    expand_weights,
    new_grad,
)
from robustclip.per_sample._hooks.capture import (
    Call,
    Unit,
    edge_key,
    input_keys,
    plan_units,
)
from robustclip.per_sample._hooks.fallback import (
    Replay,
    ReplayError,
    ReplayTerm,
    graph_mode_terms,
)
from robustclip.per_sample._hooks.walk import walk
from robustclip.per_sample._loop import LoopEngine
from robustclip.per_sample._vmap import VmapEngine
from robustclip.per_sample.rules import broadcast
from robustclip.per_sample.rules._terms import (
    DenseTerm,
    OuterTerm,
    Term,
    ghost_sq_norms,
    index_sq_norms,
    plan,
    sum_materialized,
)

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class PerSampleFallbackWarning(UserWarning):
    """A part of the model is not covered by a fast per-sample rule and takes a slower path."""


class HookEngine(PerSampleEngine):
    """One forward, one backward, no per-sample gradients held; see the module docstring.

    Args:
        model: the model (or its DistributedDataParallel wrapper).
        layout: the clipper's parameter layout.
        max_chunk_elements: memory cap, in tensor elements, of the temporary per-sample tensors
            of one layer (chunks of samples) and of the torch.func fallbacks.
        verify: compare sample 0's gradient with autograd's on the first step (one extra
            backward pass, once).
    """

    name = "hooks"
    writes_new_grads = True

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        max_chunk_elements: int = 2**26,
        verify: bool = True,
    ) -> None:
        super().__init__(model, layout)
        self.max_chunk_elements = int(max_chunk_elements)
        # temporaries of a layer's chunk (unfolded patches, Grams) stay below this
        self.transient_elements = min(self.max_chunk_elements, 2**23)
        self._index = {id(p): i for i, p in enumerate(layout.params)}
        self.units: list[Unit] = plan_units(self.model, layout)
        self._handles: list[Any] = []
        self._calls: list[Call] = []
        self._fallback_depth = 0
        self._mute = 0
        self._verified = not verify
        self._graph_mode: set[int] = set()
        self._replay_checked: set[int] = set()
        self._delegate: PerSampleEngine | None = None
        # set during the main backward pass only: calls processed inside it, and their results
        self._stream: dict[int, Call] = {}
        self._stream_batch = 0
        self._stream_sq: dict[int, Tensor] = {}
        self._stream_kept: dict[int, Tensor] = {}
        self._stream_terms: dict[int, list[Term]] = {}
        self._group_index: Tensor | None = None
        #: tests force a norm strategy ("keep", "ghost", "chunks", "index") where it applies
        self._plan_override: str | None = None
        self._dropouts = {
            id(u): [m for m in u.module.modules() if isinstance(m, _DROPOUT)] for u in self.units if u.rule is None
        }

    # -- observing the forward pass --------------------------------------------------------------
    def attach(self) -> None:
        if self._delegate is not None:
            self._delegate.attach()
            return
        if self._handles:
            return
        for u in self.units:
            if u.rule is None:
                warnings.warn(
                    f"robustclip: module '{u.name}' ({type(u.module).__name__}) is not covered by a "
                    f"per-sample rule ({u.reason}); the hook engine replays it per sample with "
                    "torch.func, which is slower and holds its per-sample gradients. Supported "
                    "layers: Linear, Conv1d/2d, Embedding, LayerNorm, GroupNorm, RMSNorm.",
                    PerSampleFallbackWarning,
                    stacklevel=3,
                )
                self._handles.append(u.module.register_forward_pre_hook(self._fallback_enter))
                self._handles.append(
                    u.module.register_forward_hook(
                        partial(self._fallback_hook, u), with_kwargs=True, always_call=True
                    )
                )
            else:
                self._handles.append(u.module.register_forward_hook(partial(self._rule_hook, u), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        _release(self._calls)
        self._calls = []
        self._fallback_depth = 0
        if self._delegate is not None:
            self._delegate.detach()

    def _recording(self) -> bool:
        return torch.is_grad_enabled() and not self._mute and not self._fallback_depth

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Forward passes inside this block (torch.func replays) are not recorded."""
        self._mute += 1
        try:
            yield
        finally:
            self._mute -= 1

    def _rule_hook(self, unit: Unit, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._recording() or not isinstance(output, Tensor) or output.grad_fn is None:
            return
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        call = Call(unit, [get_gradient_edge(output)], [tuple(output.shape)], input_keys([x]), x=x, x_version=x._version)
        self._record(call)
        # Fires with dL/d(output) as the backward pass computes it (also after an in-place
        # change of the output, which registers later hooks on a new node): the layer is then
        # processed while its output gradient is hot, and that gradient is not held to the end.
        output.register_hook(partial(self._on_output_grad, call))

    def _record(self, call: Call) -> None:
        # Calls (and through them their forward pass's graph) are held until the next
        # backward(losses). Forward passes that never get one, with grad enabled, pile up.
        self._calls.append(call)
        if len(self._calls) == 64 * max(len(self.units), 1):
            warnings.warn(
                "robustclip: the hook engine has recorded 64 forward passes without a "
                "clipper.backward(losses); each keeps its autograd graph alive until then. Run "
                "evaluation under torch.no_grad() (or torch.inference_mode()).",
                RuntimeWarning,
                stacklevel=4,
            )

    def _fallback_enter(self, module: nn.Module, args: tuple) -> None:
        self._fallback_depth += 1

    def _fallback_hook(self, unit: Unit, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._fallback_depth -= 1
        if not self._recording():
            return
        leaves = pytree.tree_leaves(output)
        pos = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.grad_fn is not None]
        if not pos:
            return
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        dev = ins[0].device.type if ins else "cpu"
        self._record(
            Call(
                unit,
                [get_gradient_edge(leaves[i]) for i in pos],
                [tuple(leaves[i].shape) for i in pos],
                input_keys(ins),
                args=args,
                kwargs=kwargs,
                out_positions=pos,
                out_values=[leaves[i] for i in pos],
                out_versions=[leaves[i]._version for i in pos],
                autocast=(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)),
            )
        )

    # -- the engine ------------------------------------------------------------------------------------
    def accumulate(self, losses: Tensor, weight_fn: WeightFn, out: list[Tensor | None]) -> Tensor:
        if self._delegate is not None:
            return accumulate_into(self._delegate, losses, weight_fn, out)
        calls, self._calls = self._calls, []
        try:
            return self._accumulate(calls, losses, weight_fn, out)
        finally:
            # A call references autograd nodes (its output edge, its input's node), and the
            # output's node references the call back through the tensor hook: a reference
            # cycle that would keep the step's graph, and the activations it saved, alive
            # until Python's cyclic garbage collector ran. Cut it as soon as the step is done.
            _release(calls)

    def _accumulate(self, calls: list[Call], losses: Tensor, weight_fn: WeightFn, out: list[Tensor | None]) -> Tensor:
        self._stream_sq, self._stream_kept, self._stream_terms = {}, {}, {}  # after an error
        if losses.grad_fn is None:
            raise ValueError("the losses have no autograd graph; compute them from the model's output.")
        batch = losses.shape[0]
        lay = self.layout
        found = walk(losses.grad_fn, calls, self._index)

        problems: list[str] = []
        edges: dict[tuple[Any, int], GradientEdge] = {}
        rule_jobs: list[tuple[Call, list | None]] = []
        for c in found.reached:
            if c.unit.rule is None:
                continue
            shape = c.out_shapes[0]
            cons = found.consumers.get(c.keys[0], [])
            if _unbatched(shape, cons, batch):
                if cons and all(broadcast.supported(m, shape, batch) for m, _ in cons):
                    for m, _ in cons:
                        edges[(m, 0)] = GradientEdge(m, 0)
                    rule_jobs.append((c, [(m, broadcast.factor(m, pos)) for m, pos in cons]))
                else:
                    used = ", ".join(sorted({m.name() for m, _ in cons})) or "nothing"
                    problems.append(
                        f"'{c.unit.name}' is called on an input without a batch dimension (output "
                        f"shape {shape}, batch {batch}) and its output is used by {used}, which "
                        "does not broadcast it over the batch"
                    )
            else:
                edges[c.keys[0]] = c.out_edges[0]
                rule_jobs.append((c, None))
        fb_jobs = [c for c in found.reached if c.unit.rule is None]
        for c in fb_jobs:
            batched_in = any(
                isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch
                for t in pytree.tree_leaves((c.args, c.kwargs))
            )
            if not batched_in or any(len(s) == 0 or s[0] != batch for s in c.out_shapes):
                problems.append(
                    f"the fallback module '{c.unit.name}' has inputs or outputs without the batch "
                    "as first dimension"
                )
            for e in c.out_edges:
                edges[edge_key(e)] = e
        bare_jobs = []
        for m, pos, idx in found.bare:
            shape = tuple(lay.params[idx].shape)
            if broadcast.supported(m, shape, batch):
                edges[(m, 0)] = GradientEdge(m, 0)
                bare_jobs.append((m, broadcast.factor(m, pos), idx))
            else:
                problems.append(
                    f"parameter '{lay.names[idx]}' is used directly by {m.name()} (not through a "
                    "layer with a rule, nor a broadcasting add or multiply)"
                )
        if problems:
            return self._whole_model_fallback(problems, losses, weight_fn, out)

        # random fallback units (dropout inside) need the batch's own graph after the backward
        for c in fb_jobs:
            if any(m.training and m.p > 0 for m in self._dropouts[id(c.unit)]):
                self._graph_mode.add(id(c.unit))
        retain = any(
            id(c.unit) in self._graph_mode or id(c.unit) not in self._replay_checked for c in fb_jobs
        )
        ref = self._oracle(losses) if not self._verified else None

        # Batched calls whose parameters have no other use are processed inside the backward
        # pass (``_on_output_grad``); the rest (tied or shared parameters, unbatched calls) after.
        uses: dict[int, int] = {}
        for c, _ in rule_jobs:
            for idx in c.unit.params.values():
                uses[idx] = uses.get(idx, 0) + 1
        for c in fb_jobs:
            for idx in set(c.unit.params.values()):
                uses[idx] = uses.get(idx, 0) + 1
        for _, _, idx in bare_jobs:
            uses[idx] = uses.get(idx, 0) + 1
        stream = [
            c for c, cons in rule_jobs if cons is None and all(uses[i] == 1 for i in c.unit.params.values())
        ]
        streamed = {id(c) for c in stream}
        rule_jobs = [(c, cons) for c, cons in rule_jobs if id(c) not in streamed]
        # autograd computes a streamed call's output gradient only if a requested gradient lies
        # below it; calls with none below (the first layer) are requested themselves
        for c in stream:
            del edges[c.keys[0]]
        # In forward order, so that the first layer's request serves every layer above it. A
        # request added changes the answers: the memo starts over. (Requesting a convolution's
        # bias makes oneDNN run its weight-gradient kernel, which costs as much as the plain
        # weight gradient this engine exists to skip: request as few as possible.)
        below = _Reach(set(edges))
        for c in calls:  # recorded in forward order
            if id(c) in streamed and not below.any(c.in_keys):
                edges.update(self._source_edge(c))
                below = _Reach(set(edges))

        terms: dict[int, list[Term]] = {}
        if edges:
            keys = list(edges)
            self._stream = {id(c): c for c in stream}
            self._stream_batch = batch
            try:
                with self.replaying():
                    grads = torch.autograd.grad(
                        losses.sum(), [edges[k] for k in keys], retain_graph=retain, allow_unused=True
                    )
            finally:
                missed = [c.unit.name for c in self._stream.values()]
                self._stream = {}
            if missed:  # a guard: the analysis above makes this unreachable
                raise RuntimeError(f"robustclip hook engine: no output gradient reached {missed}.")
            gmap = dict(zip(keys, grads))
            del grads
            self._rule_terms(rule_jobs, gmap, batch, terms)
            for m, fac, idx in bare_jobs:
                g = gmap.get((m, 0))
                if g is not None:
                    p = lay.params[idx]
                    ps = broadcast.per_sample(fac, g, tuple(p.shape))
                    terms.setdefault(idx, []).append(DenseTerm(ps.to(acc_dtype(ps.dtype))))
            for c in fb_jobs:
                gs = [
                    gmap.get(k) if gmap.get(k) is not None else torch.zeros(s, device=losses.device)
                    for k, s in zip(c.keys, c.out_shapes)
                ]
                self._fallback_terms(c, gs, batch, terms)
            del gmap
        # From here on only the terms hold the layers' inputs and output gradients, so each
        # parameter's are freed as soon as it is done (a lower peak than holding them all).
        _release(calls)
        del calls, found, rule_jobs, fb_jobs, bare_jobs, stream
        sq, kept = self._stream_sq, self._stream_kept
        terms.update(self._stream_terms)
        self._stream_sq, self._stream_kept, self._stream_terms = {}, {}, {}
        if ref is not None:
            self._check_sample(ref, terms, kept)
            self._verified = True
        return self._finish(terms, sq, kept, batch, weight_fn, out, losses.device)

    def _source_edge(self, call: Call) -> dict[tuple[Any, int], Any]:
        """What to request so that autograd computes a first layer's output gradient.

        Requesting the output itself makes autograd hold that gradient to the end of the pass.
        For a Linear layer, requesting its bias instead runs the layer's backward node for the
        bias alone (a sum) and frees the output gradient once the hook has processed it. Not for
        a convolution: oneDNN computes a convolution's bias gradient in its weight-gradient
        kernel, as slow as the weight gradient itself (measured: 2.1 ms for the bias alone
        against 0.2 ms for the sum, first layer of the benchmark CNN).
        """
        bias = getattr(call.unit.module, "bias", None)
        if isinstance(call.unit.module, nn.Linear) and isinstance(bias, Tensor) and "bias" in call.unit.params:
            edge = get_gradient_edge(bias)
            return {edge_key(edge): edge}
        return {call.keys[0]: call.out_edges[0]}

    def _on_output_grad(self, call: Call, g: Tensor) -> None:
        """Tensor hook on a layer's output: process a streamed call inside the backward pass."""
        if self._stream.pop(id(call), None) is None:
            return  # not our backward pass, or a call processed after it
        terms: dict[int, list[Term]] = {}
        self._rule_terms([(call, None)], {call.keys[0]: g}, self._stream_batch, terms)
        call.x = None
        for idx, ts in terms.items():
            self._stream_sq[idx] = self._sq_norms(ts, self._stream_batch, self.layout.params[idx], self._stream_kept, idx)
            if idx not in self._stream_kept:
                self._stream_terms[idx] = ts

    def _rule_terms(self, jobs: list, gmap: dict, batch: int, terms: dict[int, list[Term]]) -> None:
        for c, cons in jobs:
            assert c.x is not None and c.unit.rule is not None
            x = c.x.detach()
            if x._version != c.x_version:
                raise ValueError(
                    f"the input of '{c.unit.name}' was modified in place after the layer used it; "
                    "per-sample gradients need the value the layer saw. Avoid the in-place "
                    "operation on that tensor (e.g. use x = x + y instead of x += y)."
                )
            if cons is None:
                g = gmap.get(c.keys[0])
                if g is None:
                    continue
            else:
                shape = c.out_shapes[0]
                parts = [broadcast.per_sample(fac, gmap[(m, 0)], shape) for m, fac in cons]
                g = parts[0]
                for p in parts[1:]:
                    g = g + p
                x = x.unsqueeze(0).expand(batch, *x.shape)
            for name, t in c.unit.rule.terms(c.unit.module, x, g, c.unit.names).items():
                terms.setdefault(c.unit.params[name], []).append(t)

    def _fallback_terms(self, c: Call, gs: list[Tensor], batch: int, terms: dict[int, list[Term]]) -> None:
        uid = id(c.unit)
        params = self.layout.params
        if uid not in self._graph_mode:
            try:
                rep = Replay(
                    c, gs, batch, params, self.max_chunk_elements, uid not in self._replay_checked, self
                )
                rep.run()
            except ReplayError as e:
                if uid in self._replay_checked:
                    raise ValueError(
                        f"the module '{c.unit.name}' could not be replayed per sample ({e}); it "
                        "uses randomness or mixes samples. Use engine='loop', or put its random "
                        "layers in eval mode."
                    ) from e
                warnings.warn(
                    f"robustclip: module '{c.unit.name}' cannot be replayed per sample ({e}); "
                    "its per-sample gradients now come from one backward per sample through its "
                    "part of the graph (exact, slower).",
                    PerSampleFallbackWarning,
                    stacklevel=5,
                )
                self._graph_mode.add(uid)
            else:
                self._replay_checked.add(uid)
                for idx in rep.idxs:
                    terms.setdefault(idx, []).append(ReplayTerm(rep, idx))
                return
        for idx, t in graph_mode_terms(c, gs, batch, params).items():
            terms.setdefault(idx, []).append(t)

    # -- norms, weights, weighted sums ---------------------------------------------------------------
    def _finish(
        self,
        terms: dict[int, list[Term]],
        sq_done: dict[int, Tensor],
        kept: dict[int, Tensor],
        batch: int,
        weight_fn: WeightFn,
        out: list[Tensor | None],
        device,
    ) -> Tensor:
        lay = self.layout
        sq_list: list[Tensor] = []
        for idx, p in enumerate(lay.params):
            dt = acc_dtype(p.dtype)
            ts = terms.get(idx)
            if idx in sq_done:
                sq = sq_done[idx]
            elif not ts:
                sq = torch.zeros(batch, dtype=dt, device=device)
            else:
                sq = self._sq_norms(ts, batch, p, kept, idx)
                if idx in kept:
                    terms[idx] = []  # free the activations this parameter held
            sq_list.append(sq.to(dt))
        gsq = self._group_sq(sq_list)
        w = weight_fn(gsq)
        w = w.to(torch.promote_types(lay.params[0].dtype, torch.float32))  # once, not per parameter
        weights = expand_weights(w, lay.group_of)
        for idx, wp in enumerate(weights):
            for t in terms.get(idx, ()):
                t.prepare(wp)
        # last layers first, as in a backward pass: they hold the most activations and get the
        # smallest gradients, so their inputs are freed before the large first-layer gradients
        # are allocated (a lower peak)
        for idx, (o, wp) in reversed(list(enumerate(zip(out, weights)))):
            g = kept.pop(idx, None)
            ts: list[Term] = [DenseTerm(g)] if g is not None else terms.pop(idx, [])
            if o is None:
                # no gradient yet this step: the first term's sum becomes the gradient, written
                # once (no zero fill, no temporary of the parameter's size beside it)
                out[idx] = o = new_grad(lay.params[idx], ts.pop(0).weighted(wp) if ts else None)
            for t in ts:
                t.add_weighted_(o, wp)
        return gsq.sqrt()

    def _group_sq(self, sq_list: list[Tensor]) -> Tensor:
        """Per-parameter squared norms (each (B,)) summed into layer groups: (G, B)."""
        lay = self.layout
        stacked = torch.stack(sq_list)
        if self._group_index is None or self._group_index.device != stacked.device:
            self._group_index = torch.tensor(lay.group_of, device=stacked.device)
        out = stacked.new_zeros((lay.num_groups, stacked.shape[1]))
        return out.index_add_(0, self._group_index, stacked)

    def _sq_norms(self, ts: list[Term], batch: int, p: Tensor, kept: dict[int, Tensor], idx: int) -> Tensor:
        dt = acc_dtype(p.dtype)
        if len(ts) == 1 and ts[0].precomputed_sq is not None:
            return ts[0].precomputed_sq
        item = ts[0].dtype.itemsize
        keep_ok = batch * p.numel() * item <= sum(t.hold_bytes() for t in ts)
        how = plan(ts, keep_ok)
        forced = self._plan_override
        if forced == "keep" or forced == "chunks":
            how = forced
        elif forced == "ghost" and all(isinstance(t, OuterTerm) for t in ts):
            how = "ghost"
        elif forced == "index" and len(ts) == 1 and isinstance(ts[0], OuterTerm) and ts[0].index:
            how = "index"
        if how == "index":
            return index_sq_norms(ts[0])  # type: ignore[arg-type]
        if how == "ghost":
            return ghost_sq_norms(ts, self.transient_elements)  # type: ignore[arg-type]
        per_sample = sum(t.transient_per_sample() for t in ts) + p.numel()
        chunk = max(1, min(batch, self.transient_elements // per_sample))
        sqs, parts = [], []
        for s in range(0, batch, chunk):
            g = sum_materialized(ts, slice(s, min(s + chunk, batch)))
            sqs.append(_sq_rows(g, dt))
            if how == "keep":
                parts.append(g)
        if how == "keep":
            kept[idx] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return sqs[0] if len(sqs) == 1 else torch.cat(sqs)

    # -- safety nets -----------------------------------------------------------------------------------
    def _oracle(self, losses: Tensor) -> list[Tensor]:
        with self.replaying():
            got = torch.autograd.grad(losses[0], self.layout.params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.layout.params, got)]

    def _check_sample(self, ref: list[Tensor], terms: dict[int, list[Term]], kept: dict[int, Tensor]) -> None:
        """Sample 0's gradient from the terms must match autograd's, parameter by parameter."""
        lay = self.layout
        half = any(t.dtype in (torch.float16, torch.bfloat16) for ts in terms.values() for t in ts) or any(
            g.dtype in (torch.float16, torch.bfloat16) for g in kept.values()
        )
        rtol, atol = (5e-2, 1e-2) if half else (1e-3, 1e-5)
        # one host read per parameter, once: this runs on the first step only
        total = math.sqrt(sum(float(r.detach().float().norm()) ** 2 for r in ref))
        bad = []
        for idx, r in enumerate(ref):
            ts = terms.get(idx)
            r = r.detach()
            if idx in kept:
                mine = kept[idx][0]
            else:
                mine = sum_materialized(ts, slice(0, 1))[0] if ts else torch.zeros_like(r)
            dt = acc_dtype(r.dtype)
            err = float(torch.linalg.vector_norm((mine - r).to(dt)))
            # the floor: gradients that are rounding noise everywhere compare as equal
            floor = 100 * torch.finfo(dt).eps * (1.0 + total)
            if err > rtol * float(torch.linalg.vector_norm(r.to(dt))) + atol * total + floor:
                bad.append(lay.names[idx])
        if bad:
            raise ValueError(
                "robustclip hook engine: the per-sample gradient of sample 0 disagrees with autograd "
                f"for {', '.join(bad[:6])}{'...' if len(bad) > 6 else ''}. The model probably mixes "
                "samples in its forward pass (statistics over the batch), keeps the batch "
                "elsewhere than in the first dimension (e.g. nn.MultiheadAttention or RNNs with "
                "batch_first=False), or uses these parameters in a way the rules do not model. "
                "Make the batch the first dimension, or use engine='vmap' or engine='loop'."
            )

    def _whole_model_fallback(self, problems: list[str], losses: Tensor, weight_fn: WeightFn, out: list[Tensor | None]) -> Tensor:
        random = any(m.training and m.p > 0 for m in self.model.modules() if isinstance(m, _DROPOUT))
        warnings.warn(
            "robustclip: the hook engine cannot split this model's gradient by sample: "
            + "; ".join(problems[:4])
            + (". It falls back to torch.func over the whole model" if not random else ". It falls back to the reference loop (the model has dropout)")
            + " (this step: the reference loop).",
            PerSampleFallbackWarning,
            stacklevel=5,
        )
        self.detach()
        if random:
            self._delegate = LoopEngine(self.model, self.layout)
        else:
            self._delegate = VmapEngine(self.model, self.layout, max_chunk_elements=self.max_chunk_elements)
        self._delegate.attach()
        return accumulate_into(LoopEngine(self.model, self.layout), losses, weight_fn, out)


def _release(calls: list[Call]) -> None:
    """Drop what recorded calls hold of a step: inputs, outputs and autograd nodes."""
    for c in calls:
        c.x = None
        c.args, c.kwargs, c.out_values = (), {}, []
        c.out_edges, c.in_keys = [], []


def _unbatched(shape: tuple[int, ...], consumers: list, batch: int) -> bool:
    """A layer output without a batch dimension is one its consumers broadcast over the batch."""
    if len(shape) == 0 or shape[0] != batch:
        return True
    outs = [broadcast.output_shape(m) for m, _ in consumers]
    return bool(outs) and all(o is not None and len(o) > len(shape) and o[0] == batch for o in outs)


def _sq_rows(g: Tensor, dt: torch.dtype) -> Tensor:
    """Squared norm of each row of ``g`` (B, ...), in ``dt``, without a squared temporary."""
    return torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=dt).square()


class _Reach:
    """Does a requested gradient edge (one of ``keys``) lie at or below a layer's input?

    At: the input tensor's own edge is requested (the previous layer's output, consumed
    directly). Below: the graph under the input's node contains one. Memoised over one step's
    graph; iterative, so deep graphs do not hit the recursion limit.
    """

    def __init__(self, keys: set) -> None:
        self.keys = keys
        self.memo: dict[Any, bool] = {}

    def any(self, in_keys: list) -> bool:
        return any(k in self.keys or self._node(k[0]) for k in in_keys)

    def _node(self, root: Any) -> bool:
        memo, keys = self.memo, self.keys
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo:
                continue
            nexts = [(n, nr) for n, nr in node.next_functions if n is not None]
            if expanded:
                memo[node] = any((n, nr) in keys or memo[n] for n, nr in nexts)
                continue
            stack.append((node, True))
            stack.extend((n, False) for n, _ in nexts if n not in memo)
        return memo[root]
