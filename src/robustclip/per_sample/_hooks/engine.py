"""The hook engine: per-sample clipping in one forward and one backward pass.

Forward (``capture.py``): hooks on every *unit* (a module owning trainable parameters) record the
layer input and the autograd edge of its output.

``accumulate(losses)``, phase by phase (:meth:`HookEngine._step` reads them in order):

1. walk the losses' graph (``walk.py``) and plan the step (``plan.py``, pure): which calls
   matter and how each gets its per-sample gradients, which parameters are used bare, which
   gradient edges to request; or why the whole model must fall back;
2. ONE ``torch.autograd.grad(losses.sum(), <requested edges>)``. Autograd then computes only
   what those gradients need: every parameter-gradient matmul of the plain backward is skipped,
   and no ``AccumulateGrad`` node runs (so DDP's reducer hooks stay silent; the Clipper
   all-reduces once per step itself);
3. each layer rule (``rules/``) turns (input, output gradient) into per-parameter *terms*: inside
   the backward pass for layers whose parameters have no other use (a tensor hook on their
   output), after it for the rest, the bare parameters (``rules/broadcast.py``) and the modules
   without a rule (``fallback.py``);
4. per parameter, a cost model picks how to get the per-sample squared norms (``norms.py``: keep
   the materialised per-sample gradient when it is smaller than what it frees, the ghost Gram
   form, an exact sort for embeddings, or chunks freed at once);
5. the weights ``w = weight_fn(norms)`` over the *whole* batch (float64 squared norms, finite
   for every finite gradient: ``norms.py``), then ``out[p] += sum_i w_i g_i`` in one matmul (or
   scatter, or weight-gradient convolution) per parameter; the rows of samples of weight 0 are
   zeroed only with ``drop`` (``Clipper(nonfinite="drop_sample")``).

No ``B x params`` per-sample gradient tensor is ever built: a layer's per-sample gradients are
materialised only when they are no larger than the activations and output gradients of that
layer that are freed in exchange.

Safety nets, so that a gradient is never silently wrong:

* modules without a rule are replayed per sample with torch.func (one warning naming them);
* bare parameters and unbatched layer calls are handled at their broadcasting consumer
  (``rules/broadcast.py``) or else the whole model falls back to torch.func (warning);
* on every step that takes a path for the first time (the first step, a module that starts
  falling back, a layer called in a new way) and every ``verify_every`` steps, sample 0's
  gradient from the terms is compared with autograd's (one extra backward pass); a mismatch
  raises instead of training on a wrong gradient (``verify.py``, with the other checks). The
  engine a whole-model fallback hands over to is checked on its own first step
  (``_engine.accumulate_into``).

References: ghost clipping, Goodfellow (arXiv:1510.01799), Li et al. (arXiv:2110.05679);
mixed ghost clipping and book-keeping, Bu et al. (arXiv:2205.10683, arXiv:2210.00038);
PS-Clip-SGD, Nobile & Grohs (arXiv:2605.02701).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustclip._math import wide_dtype
from robustclip.per_sample._engine import (
    ParamLayout,
    PathCheck,
    PerSampleEngine,
    WeightFn,
    acc_dtype,
    accumulate_into,
    expand_weights,
    new_grad,
)
from robustclip.per_sample._hooks import views
from robustclip.per_sample._hooks.capture import Call, EdgeKey, Recorder, Unit, plan_units, release
from robustclip.per_sample._hooks.fallback import DROPOUT, Fallbacks, PerSampleFallbackWarning
from robustclip.per_sample._hooks.norms import Gathered
from robustclip.per_sample._hooks.plan import SHAPED, Plan, PlanTemplate, RuleJob, Site, make_plan
from robustclip.per_sample._hooks.verify import Verifier, check_input_unchanged
from robustclip.per_sample._hooks.walk import Signature, signature, walk
from robustclip.per_sample._loop import LoopEngine
from robustclip.per_sample._vmap import VmapEngine
from robustclip.per_sample.rules import DenseTerm, Term, broadcast, supported_layers

__all__ = ["HookEngine", "PerSampleFallbackWarning"]


#: the error when a forward pass recorded nothing (see HookEngine._step)
NO_CALLS = (
    "robustclip: the model's forward pass ran without the per-sample engine's hooks, so no "
    "layer call was recorded. A model compiled with torch.compile before the Clipper attached "
    "its hooks keeps running the compiled code without them (dynamo does not re-check module "
    "hooks). Create the Clipper before the first call of the compiled model, or call "
    "torch._dynamo.reset() after creating it."
)


@dataclass
class _Pass:
    """The backward pass in flight: the streamed calls still to come, and what came."""

    pending: dict[int, Call]
    batch: int
    got: Gathered


class HookEngine(PerSampleEngine):
    """One forward, one backward, no per-sample gradients held; see the module docstring.

    Args:
        model: the model (or its DistributedDataParallel wrapper).
        layout: the clipper's parameter layout.
        max_chunk_elements: memory cap, in tensor elements, of the temporary per-sample tensors
            of one layer (chunks of samples) and of the torch.func fallbacks.
        verify: compare sample 0's gradient with autograd's on the first use of every path
            (one extra backward pass on such steps; ``verify.py``).
        verify_every: also re-run that check every ``verify_every`` steps (None: first uses only).
    """

    name = "hooks"
    writes_new_grads = True
    checks_itself = True

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        max_chunk_elements: int = 2**26,
        verify: bool = True,
        verify_every: int | None = None,
    ) -> None:
        super().__init__(model, layout)
        self.checks = PathCheck(verify, verify_every)
        self.max_chunk_elements = int(max_chunk_elements)
        # temporaries of a layer's chunk (unfolded patches, Grams) stay below this
        self.transient_elements = min(self.max_chunk_elements, 2**23)
        self._index = {id(p): i for i, p in enumerate(layout.params)}
        self.units: list[Unit] = plan_units(self.model, layout)
        self.recorder = Recorder(self.units, self._on_output_grad)
        self.verifier = Verifier(layout, self.checks)
        self.fallbacks = Fallbacks(self.units, self.verifier, self.recorder.replaying)
        #: after a whole-model fallback: the engine that takes over
        self._delegate: PerSampleEngine | None = None
        self._pass: _Pass | None = None
        #: tests force a norm strategy (``norms.STRATEGIES``) where it applies
        self._plan_override: str | None = None
        #: plans by the signature of their step's graph (``walk.signature``); None: a plan that
        #: is made afresh every step (it holds its step's nodes)
        self._plans: dict[tuple[int, Signature], PlanTemplate | None] = {}
        #: steps in a row whose plan could not be templated: past a few, the signature is no
        #: longer taken (a model with broadcast sites or fallbacks plans every step anyway)
        self._untemplated = 0
        #: plans made from the graph (not rebuilt from a template), for tests and diagnostics
        self.plans_made = 0

    # -- observing the forward pass ----------------------------------------------------------------
    def attach(self) -> None:
        if self._delegate is not None:
            self._delegate.attach()
            return
        if self.recorder.handles:
            return
        for u in self.units:
            if u.rule is None:
                warnings.warn(
                    f"robustclip: module '{u.name}' ({type(u.module).__name__}) is not covered by a "
                    f"per-sample rule ({u.reason}); the hook engine replays it per sample with "
                    "torch.func, which is slower and holds its per-sample gradients. Supported "
                    f"layers: {supported_layers()}.",
                    PerSampleFallbackWarning,
                    stacklevel=3,
                )
        self.recorder.attach()

    def detach(self) -> None:
        self.recorder.detach()
        if self._delegate is not None:
            self._delegate.detach()

    # -- a step ------------------------------------------------------------------------------------
    def accumulate(
        self, losses: Tensor, weight_fn: WeightFn, out: list[Tensor | None], *, drop: bool = False
    ) -> Tensor:
        if self._delegate is not None:
            return accumulate_into(self._delegate, losses, weight_fn, out, drop=drop)
        calls = self.recorder.take()
        try:
            return self._step(calls, losses, weight_fn, out, drop)
        finally:
            release(calls)  # also after an error: the calls hold the step's graph

    def _step(
        self, calls: list[Call], losses: Tensor, weight_fn: WeightFn, out: list[Tensor | None], drop: bool
    ) -> Tensor:
        """The phases of the module docstring, in order."""
        if losses.grad_fn is None:
            raise ValueError("the losses have no autograd graph; compute them from the model's output.")
        batch = losses.shape[0]
        # 1. what to do, before any gradient is computed
        plan, paths = self._plan(calls, losses, batch)
        if plan.problems and not calls:
            # the losses reach parameters, yet no hook fired: the forward ran without them
            raise RuntimeError(NO_CALLS)
        if plan.problems and self.layout.sharded:
            raise ValueError(
                "robustclip: under FSDP2 the hook engine cannot fall back to torch.func (FSDP2 "
                "frees the parameters it would read): " + "; ".join(plan.problems[:4])
            )
        if plan.problems:
            return self._whole_model_fallback(plan.problems, losses, weight_fn, out, drop)
        self.verifier.begin(paths)
        retain = self.fallbacks.prepare(plan.fallbacks)
        ref = self.verifier.reference(losses, self.recorder.replaying)
        # 2-3. the one backward pass, and every call's terms (streamed layers' norms too)
        got = self._backward(plan, losses, retain)
        # From here on only the terms hold the layers' inputs and output gradients, so each
        # parameter's are freed as soon as it is done (a lower peak than holding them all).
        release(calls)
        del calls, plan
        self.verifier.check(ref, got.terms, got.kept)
        # 4-5. the norms of the other parameters, the weights, the weighted sums
        return self._weighted_sums(got, batch, weight_fn, out, losses.device, drop)

    def _plan(self, calls: list[Call], losses: Tensor, batch: int) -> tuple[Plan, set[str]]:
        """Phase 1: this step's plan and its paths. Rebuilt from the template of an earlier
        step whose graph had the same signature (the same labelled graph, call shapes and
        dtypes: then :func:`make_plan` would decide the same), else made from the graph."""
        key: tuple[int, Signature] | None = None
        if self._untemplated < _UNTEMPLATED_MAX:
            sig = signature(losses.grad_fn, calls, self._index, SHAPED)
            if sig is not None:
                key = (batch, sig)
                tmpl = self._plans.get(key)
                if tmpl is not None:
                    return tmpl.plan(calls, self.layout.params), set(tmpl.paths)
        plan = make_plan(calls, walk(losses.grad_fn, calls, self._index), batch, self.layout)
        self.plans_made += 1
        tmpl = None if key is None else PlanTemplate.of(plan, calls, self.layout.params)
        if tmpl is None:
            self._untemplated += 1
        else:
            self._untemplated = 0
            if len(self._plans) >= _PLANS_MAX:  # graphs that change every step: start over
                self._plans.clear()
            self._plans[key] = tmpl  # type: ignore[index]  # key is set whenever tmpl is
            return plan, set(tmpl.paths)
        return plan, plan.paths()

    def _backward(self, plan: Plan, losses: Tensor, retain: bool) -> Gathered:
        """Phases 2 and 3: the one backward pass over the plan's requests, during which the
        streamed calls are processed (:meth:`_on_output_grad`); then the terms of the calls
        after it, of the bare parameters and of the fallback modules."""
        got = Gathered()
        if not plan.requests:
            return got
        keys = list(plan.requests)
        self._pass = _Pass({id(c): c for c in plan.streamed}, plan.batch, got)
        try:
            with self.recorder.replaying():
                grads = torch.autograd.grad(
                    losses.sum(), [plan.requests[k] for k in keys], retain_graph=retain, allow_unused=True
                )
        finally:
            missed = [c.unit.name for c in self._pass.pending.values()]
            self._pass = None
        if missed:  # a guard: the plan makes this unreachable
            raise RuntimeError(f"robustclip hook engine: no output gradient reached {missed}.")
        gmap: dict[EdgeKey, Tensor | None] = dict(zip(keys, grads))
        del grads
        batch, params = plan.batch, self.layout.params
        for job in plan.after:
            check_input_unchanged(job.call)
            g = _output_grad(job, gmap)
            if g is not None:
                got.add(_rule_terms(job.call, g, batch, unbatched=job.consumers is not None, batch_dim=job.batch_dim))
        for b in plan.bare:
            ps = site_grad(b.site, gmap)
            if ps is not None:
                got.add({b.idx: DenseTerm(ps.to(acc_dtype(ps.dtype)))})
        for c in plan.fallbacks:
            gs = [_or_zeros(gmap.get(k), s, losses.device) for k, s in zip(c.keys, c.out_shapes)]
            got.add(self.fallbacks.terms(c, gs, batch, params, self.max_chunk_elements))
        return got

    def _on_output_grad(self, call: Call, g: Tensor) -> None:
        """Tensor hook on a layer's output: a streamed call's terms and norms, inside the pass."""
        run = self._pass
        if run is None or run.pending.pop(id(call), None) is None:
            return  # not our backward pass, or a call processed after it
        check_input_unchanged(call)
        terms = _rule_terms(call, g, run.batch, unbatched=False)
        call.x = None
        run.got.add(terms)
        for idx in terms:
            run.got.take_norms(idx, self.layout.params[idx], run.batch, self.transient_elements, self._plan_override)

    def _weighted_sums(
        self,
        got: Gathered,
        batch: int,
        weight_fn: WeightFn,
        out: list[Tensor | None],
        device: torch.device,
        drop: bool,
    ) -> Tensor:
        """Phases 4 and 5: the norms not taken yet, the weights over the whole batch, and
        ``out[p] += sum_i w_i g_i`` (with ``drop``, rows of weight 0 add exactly 0). Returns
        the per-sample, per-group norms."""
        lay = self.layout
        wide = wide_dtype(device)
        sq_list: list[Tensor] = []
        for idx, p in enumerate(lay.params):
            sq = got.sq.get(idx)
            if sq is None and got.terms.get(idx):
                got.take_norms(idx, p, batch, self.transient_elements, self._plan_override)
                sq = got.sq[idx]
            if sq is None:
                sq = torch.zeros(batch, dtype=wide, device=device)
            sq_list.append(sq if sq.dtype == wide else sq.to(wide))
        gsq = self.group_sq_norms(sq_list)  # float64: finite for every finite gradient
        w = weight_fn(gsq)
        wdt = acc_dtype(lay.params[0].dtype)
        if w.dtype != wdt:
            w = w.to(wdt)  # once, not per parameter
        weights = expand_weights(w, lay.group_of)
        for idx, wp in enumerate(weights):
            for t in got.terms.get(idx, ()):
                t.prepare(wp)
        # last layers first, as in a backward pass: they hold the most activations and get the
        # smallest gradients, so their inputs are freed before the large first-layer gradients
        # are allocated (a lower peak)
        for idx, (o, wp) in reversed(list(enumerate(zip(out, weights)))):
            g = got.kept.pop(idx, None)
            ts: list[Term] = [DenseTerm(g)] if g is not None else got.terms.pop(idx, [])
            if o is None:
                # no gradient yet this step: the first term's sum becomes the gradient, written
                # once (no zero fill, no temporary of the parameter's size beside it)
                out[idx] = o = new_grad(lay.params[idx], ts.pop(0).weighted(wp, drop=drop) if ts else None)
            for t in ts:
                t.add_weighted_(o, wp, drop=drop)
        # the readings in the gradients' precision (float32 at least), as every engine's
        dt = acc_dtype(functools.reduce(torch.promote_types, (p.dtype for p in lay.params)))
        return gsq.sqrt().to(dt)

    # -- when the model cannot be split by sample ------------------------------------------------------
    def _whole_model_fallback(
        self, problems: list[str], losses: Tensor, weight_fn: WeightFn, out: list[Tensor | None], drop: bool
    ) -> Tensor:
        random = any(m.training and m.p > 0 for m in self.model.modules() if isinstance(m, DROPOUT))
        warnings.warn(
            "robustclip: the hook engine cannot split this model's gradient by sample: "
            + "; ".join(problems[:4])
            + (". It falls back to torch.func over the whole model" if not random else ". It falls back to the reference loop (the model has dropout)")
            + " (this step: the reference loop; the next step's engine is checked against autograd).",
            PerSampleFallbackWarning,
            stacklevel=5,
        )
        self.detach()
        if random:
            self._delegate = LoopEngine(self.model, self.layout)
        else:
            self._delegate = VmapEngine(self.model, self.layout, max_chunk_elements=self.max_chunk_elements)
        # its first use (the next step: it did not see this step's forward pass) is checked
        # against autograd, and so is every verify_every-th step after it
        self._delegate.checks = PathCheck(self.checks.enabled, self.checks.every)
        self._delegate.attach()
        return accumulate_into(LoopEngine(self.model, self.layout), losses, weight_fn, out, drop=drop)

    def set_verify_every(self, every: int | None) -> None:
        super().set_verify_every(every)
        if self._delegate is not None:
            self._delegate.set_verify_every(every)


#: plan templates kept at most (graph signatures seen); past it the cache starts over
_PLANS_MAX = 16
#: steps in a row without a template after which the engine stops taking signatures
_UNTEMPLATED_MAX = 4


def _output_grad(job: RuleJob, grads: Mapping[EdgeKey, Tensor | None]) -> Tensor | None:
    """The gradient of a rule call's output, batch first: requested directly, or recovered per
    sample where an unbatched output is broadcast over the batch."""
    if job.consumers is None:
        return grads.get(job.call.keys[0])
    g: Tensor | None = None
    for site in job.consumers:
        part = site_grad(site, grads)
        if part is not None:
            g = part if g is None else g + part
    return g


def site_grad(site: Site, grads: Mapping[EdgeKey, Tensor | None]) -> Tensor | None:
    """Per-sample gradient ``(B, *shape)`` of a tensor shared by every sample, from the gradient
    of the node that broadcasts it, mapped back through the shape-only nodes before it."""
    dy = grads.get((site.node, 0))
    if dy is None:
        return None
    g = broadcast.per_sample(site.factor, dy, site.shape)
    for node, in_shape, fac in reversed(site.views):
        g = views.back(node, g, in_shape) if fac is None else broadcast.per_sample(fac, g, in_shape)
    return g


def _rule_terms(call: Call, grad_out: Tensor, batch: int, unbatched: bool, batch_dim: int = 0) -> dict[int, Term]:
    """A rule call's terms, by parameter index. An unbatched call's input is the same for every
    sample: it is expanded over the batch, as its recovered output gradient is. A sequence-first
    call's input and output gradient get their batch moved first."""
    unit = call.unit
    assert call.x is not None and unit.rule is not None
    x = call.x.detach()
    if unbatched:
        x = x.unsqueeze(0).expand(batch, *x.shape)
    if batch_dim:
        x, grad_out = x.movedim(batch_dim, 0), grad_out.movedim(batch_dim, 0)
    extra = {"call": (call.args, call.kwargs)} if unit.rule.full_call else {}
    terms = unit.rule.terms(unit.module, x, grad_out, unit.names, **extra)
    return {unit.params[name]: t for name, t in terms.items()}


def _or_zeros(g: Tensor | None, shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.zeros(shape, device=device) if g is None else g
