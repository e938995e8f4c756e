"""Planning one step of the hook engine: from the recorded calls to the jobs of its backward pass.

From the calls recorded in the forward pass (``capture.py``) and the walk of the losses' graph
(``walk.py``), before any gradient is computed, :func:`make_plan` decides

* how each call the losses depend on gets its per-sample gradients: its rule, on its output
  gradient or, for an output without a batch dimension, on the per-sample gradient recovered at
  the consumers that broadcast it over the batch (``rules/broadcast.py``); or the per-module
  fallback (``fallback.py``);
* how each bare parameter does (at its broadcasting consumer);
* which rule calls are *streamed*: processed inside the backward pass, by the tensor hook on
  their output, as soon as their output gradient exists (their parameters have no other use
  this step; the others, tied or shared, are processed after the pass, together);
* which gradient edges the one backward pass requests;
* or why the model's gradient cannot be split by sample (``problems``: the whole model falls
  back).

Pure: it reads the graph through node names, ``next_functions`` and metadata only, runs no
autograd, and changes nothing, so any objects with those attributes can stand in for the graph
(``tests/test_hooks_plan.py``). A :class:`Plan` prints as a table, one row per job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from robustclip.per_sample._engine import ParamLayout
from robustclip.per_sample._hooks import views as views_mod
from robustclip.per_sample._hooks.capture import Call, EdgeKey, edge_key
from robustclip.per_sample._hooks.walk import WalkResult
from robustclip.per_sample.rules import broadcast

#: an autograd node (or a stand-in with ``name()`` and ``next_functions``)
Node = Any


#: a node on the way from a shared tensor to its broadcasting site: (node, its input's shape,
#: its factor for an elementwise node, None for a shape-only one)
View = tuple[Node, tuple[int, ...], "float | Tensor | None"]


@dataclass(eq=False)
class Site:
    """Where a tensor shared by every sample is broadcast over the batch.

    ``node`` broadcasts it (``rules/broadcast.py``), with ``factor``, as an operand of ``shape``;
    ``views`` are the nodes between the tensor and there, in forward order (``views.py``): each
    with the shape of its input and, for an elementwise node whose output has no batch
    dimension either (a position bias masked by a causal mask), its factor."""

    node: Node
    factor: float | Tensor
    shape: tuple[int, ...]
    views: tuple[View, ...] = ()


@dataclass(eq=False)
class RuleJob:
    """A call of a layer with a rule."""

    call: Call
    #: for an output without a batch dimension: where it is broadcast over the batch; the rule
    #: then sees the per-sample output gradient recovered there. None for a batch-first output.
    consumers: list[Site] | None = None
    #: processed inside the backward pass by the tensor hook on its output
    streamed: bool = False
    #: the dimension of the batch in the call's input and output (1: a sequence-first
    #: position-wise layer; processed after the pass, with the batch moved first)
    batch_dim: int = 0
    #: what the pass requests so that it reaches this (first) layer: ``"output"``, or the
    #: parameter the rule declares as ``source_param``; None when a request below serves it
    requests: str | None = None


@dataclass(eq=False)
class BareJob:
    """A parameter used directly in the forward pass, recovered at its broadcasting consumer."""

    site: Site
    idx: int
    name: str

    @property
    def node(self) -> Node:
        return self.site.node

    @property
    def factor(self) -> float | Tensor:
        return self.site.factor


@dataclass(eq=False)
class Plan:
    """The jobs of one step; see the module docstring."""

    batch: int
    rules: list[RuleJob] = field(default_factory=list)
    fallbacks: list[Call] = field(default_factory=list)
    bare: list[BareJob] = field(default_factory=list)
    #: the gradient edges the one backward pass requests, by key, in request order
    requests: dict[EdgeKey, GradientEdge] = field(default_factory=dict)
    #: why the model's gradient cannot be split by sample; not empty: the whole model falls back
    problems: list[str] = field(default_factory=list)

    @property
    def streamed(self) -> list[Call]:
        return [j.call for j in self.rules if j.streamed]

    @property
    def after(self) -> list[RuleJob]:
        """The rule jobs processed after the backward pass."""
        return [j for j in self.rules if not j.streamed]

    def rows(self) -> list[tuple[str, str, str]]:
        """One ``(what, path, detail)`` row per job, in planning order."""
        out: list[tuple[str, str, str]] = []
        for j in self.rules:
            unit = j.call.unit
            what = f"{unit.name} ({type(unit.module).__name__})"
            if j.batch_dim:
                out.append((what, "rule, batch in dimension 1", "sequence-first layer"))
            elif j.consumers is not None:
                via = ", ".join(sorted({_via(x) for x in j.consumers}))
                out.append((what, "rule, unbatched output", f"broadcast by {via}"))
            elif j.streamed:
                out.append((what, "rule, in the backward pass", f"requests its {j.requests}" if j.requests else ""))
            else:
                out.append((what, "rule, after the backward pass", "parameters used elsewhere too"))
        for c in self.fallbacks:
            reason = c.unit.reason
            out.append((f"{c.unit.name} ({type(c.unit.module).__name__})", "per-module fallback", reason))
        for b in self.bare:
            out.append((b.name, "bare parameter", f"broadcast by {_via(b.site)}"))
        return out

    def paths(self) -> set[str]:
        """The ways this step computes per-sample gradients, one string each: a step that
        takes one for the first time is checked against autograd (``verify.py``)."""
        return {" | ".join(r) for r in self.rows()}

    def __str__(self) -> str:
        head = f"hook engine plan: batch {self.batch}, {len(self.requests)} gradient(s) requested"
        rows = self.rows()
        width = [max((len(r[k]) for r in rows), default=0) for k in range(2)]
        lines = [head] + [f"  {a:<{width[0]}}  {b:<{width[1]}}  {c}".rstrip() for a, b, c in rows]
        lines += [f"  whole-model fallback: {p}" for p in self.problems]
        return "\n".join(lines)


def _via(site: Site) -> str:
    return " <- ".join([site.node.name()] + [v[0].name() for v in reversed(site.views)])


def make_plan(calls: list[Call], found: WalkResult, batch: int, layout: ParamLayout) -> Plan:
    """The jobs of one step. ``calls``: every call recorded, in forward order; ``found``: the
    walk of the losses' graph over them; ``batch``: the number of losses."""
    plan = Plan(batch)
    for c in found.reached:
        if c.unit.rule is not None:
            _plan_rule_call(plan, c, found.consumers)
    for c in found.reached:
        if c.unit.rule is None:
            _plan_fallback_call(plan, c, found.consumers)
    for node, pos, idx in found.bare:
        _plan_bare(plan, node, pos, idx, tuple(layout.params[idx].shape), layout.names[idx], found.consumers)
    if not plan.problems:
        _plan_streaming(plan, calls, layout.params)
    return plan


def _plan_rule_call(plan: Plan, c: Call, users: Users) -> None:
    shape, batch = c.out_shapes[0], plan.batch
    consumers = users.get(c.keys[0], [])
    if not unbatched(shape, consumers, batch, users):
        plan.requests[c.keys[0]] = c.out_edges[0]
        plan.rules.append(RuleJob(c))
        return
    sites: list[Site] = []
    bad: list[str] = []
    for m, pos in consumers:
        _sites(m, pos, shape, batch, users, (), sites, bad, [_BUDGET])
    if consumers and not bad:
        for x in sites:
            plan.requests[(x.node, 0)] = GradientEdge(x.node, 0)
        plan.rules.append(RuleJob(c, sites))
    elif len(shape) >= 2 and shape[1] == batch and _positionwise(c):
        # a sequence-first layer (batch_first=False): a position-wise layer sees its batch in
        # dimension 1; the rule gets input and output gradient with the batch moved first
        plan.requests[c.keys[0]] = c.out_edges[0]
        plan.rules.append(RuleJob(c, batch_dim=1))
    else:
        used = ", ".join(sorted(set(bad))) or "nothing"
        plan.problems.append(
            f"'{c.unit.name}' is called on an input without a batch dimension (output "
            f"shape {shape}, batch {batch}) and its output is used by {used}, which "
            "does not broadcast it over the batch"
        )


def _positionwise(c: Call) -> bool:
    """Does the call's rule treat every position of its input alike, acting on the last
    dimension only (so the batch may sit in any leading dimension)? Its input must then
    have the batch in dimension 1 too."""
    rule = c.unit.rule
    x = c.x
    return (
        rule is not None
        and isinstance(rule.module_type, type)  # a rule matched by name is not position-wise
        and issubclass(rule.module_type, POSITIONWISE)
        and x is not None
        and x.dim() >= 2
        and x.shape[1] == c.out_shapes[0][1]
    )


#: layer types whose rules act on the last dimension alone (a Linear, a norm over the last
#: dimension, an embedding lookup): the batch may sit in dimension 1 of their input and output
POSITIONWISE: tuple[type, ...] = (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding)


#: edge key -> its consumers (the walk's ``consumers``)
Users = dict[EdgeKey, list[tuple[Node, int]]]


def _sites(
    m: Node,
    pos: int,
    shape: tuple[int, ...],
    batch: int,
    users: Users,
    views: tuple[View, ...],
    sites: list[Site],
    bad: list[str],
    budget: list[int],
) -> None:
    """Where a tensor of ``shape`` without a batch dimension, consumed by ``m`` as input ``pos``,
    is broadcast over the batch: at ``m`` itself, or past the nodes that carry it there without
    a batch dimension: shape-only ones, and elementwise ones with another unbatched operand
    (``views.py``). What cannot be followed is named in ``bad``; so is everything once
    ``budget[0]`` nodes have been visited (a shared tensor reaches the batch within a few
    nodes; a batched one may branch everywhere)."""
    budget[0] -= 1
    if broadcast.supported(m, shape, batch):
        sites.append(Site(m, broadcast.factor(m, pos), shape, views))
        return
    out = broadcast.output_shape(m)
    nxt = users.get((m, 0), [])
    step: View | None = None
    if out is not None and nxt and budget[0] > 0:
        if m.name() in views_mod.SHAPE_ONLY:
            step = (m, shape, None)
        elif m.name() in broadcast.CONSUMERS and broadcast.broadcast_dims(shape, (batch, *out)) is not None:
            step = (m, shape, broadcast.factor(m, pos))
    if step is None or out is None:
        bad.append(" <- ".join([m.name()] + [v[0].name() for v in reversed(views)]))
        return
    for n, p in nxt:
        _sites(n, p, out, batch, users, (*views, step), sites, bad, budget)
        if bad:
            return


#: nodes :func:`_sites` visits at most for one tensor
_BUDGET = 64


def _plan_fallback_call(plan: Plan, c: Call, users: Users) -> None:
    batch = plan.batch
    # only the outputs the losses use are replayed and differentiated: a recurrent layer's
    # final state (batch in dimension 1) returned beside its batch-first output is often unused
    used = [k for k, key in enumerate(c.keys) if key in users]
    if used and len(used) < len(c.keys):
        c = replace(
            c,
            out_edges=[c.out_edges[k] for k in used],
            out_shapes=[c.out_shapes[k] for k in used],
            out_positions=[c.out_positions[k] for k in used],
            out_values=[c.out_values[k] for k in used],
            out_versions=[c.out_versions[k] for k in used],
        )
    batched_in = any(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch for t in c.input_leaves)
    if not batched_in or any(len(s) == 0 or s[0] != batch for s in c.out_shapes):
        plan.problems.append(
            f"the fallback module '{c.unit.name}' has inputs or outputs without the batch as first dimension"
        )
    for e in c.out_edges:
        plan.requests[edge_key(e)] = e
    plan.fallbacks.append(c)


def _plan_bare(plan: Plan, node: Node, pos: int, idx: int, shape: tuple[int, ...], name: str, users: Users) -> None:
    sites: list[Site] = []
    bad: list[str] = []
    _sites(node, pos, shape, plan.batch, users, (), sites, bad, [_BUDGET])
    if bad:
        plan.problems.append(
            f"parameter '{name}' is used directly by {', '.join(sorted(set(bad)))} (not through a "
            "layer with a rule, nor a broadcasting add, multiply or expand)"
        )
        return
    for x in sites:
        plan.requests[(x.node, 0)] = GradientEdge(x.node, 0)
        plan.bare.append(BareJob(x, idx, name))


def _plan_streaming(plan: Plan, calls: list[Call], params: Sequence[Tensor]) -> None:
    """Stream the batched rule calls whose parameters have no other use, and make sure the
    backward pass reaches each of them."""
    uses: dict[int, int] = {}
    for j in plan.rules:
        for idx in j.call.unit.params.values():
            uses[idx] = uses.get(idx, 0) + 1
    for c in plan.fallbacks:
        for idx in set(c.unit.params.values()):
            uses[idx] = uses.get(idx, 0) + 1
    for b in plan.bare:
        uses[b.idx] = uses.get(b.idx, 0) + 1
    for j in plan.rules:
        if j.consumers is None and j.batch_dim == 0 and all(uses[i] == 1 for i in j.call.unit.params.values()):
            j.streamed = True
            # autograd computes a streamed call's output gradient only if a requested gradient
            # lies below it; calls with none below (the first layer) are requested themselves
            del plan.requests[j.call.keys[0]]
    jobs = {id(j.call): j for j in plan.rules if j.streamed}
    # In forward order, so that the first layer's request serves every layer above it. A
    # request added changes the answers: the memo starts over. (Requesting a convolution's
    # bias makes oneDNN run its weight-gradient kernel, which costs as much as the plain
    # weight gradient this engine exists to skip: request as few as possible.)
    below = _Reach(set(plan.requests))
    for c in calls:
        job = jobs.get(id(c))
        if job is not None and not below.any(c.in_keys):
            plan.requests.update(source_edge(c, params))
            job.requests = _source_name(c) or "output"
            below = _Reach(set(plan.requests))


def source_edge(call: Call, params: Sequence[Tensor] | None = None) -> dict[EdgeKey, GradientEdge]:
    """What to request so that autograd computes a first layer's output gradient: the output
    itself, or the parameter its rule declares as ``source_param`` (a cheaper way there).
    ``params``: the layout's parameters, which the graph holds (under FSDP2 the module holds a
    shard by now, not the parameter the forward pass used)."""
    name = _source_name(call)
    if name is not None:
        p = getattr(call.unit.module, name) if params is None else params[call.unit.params[name]]
        edge = get_gradient_edge(p)
        return {edge_key(edge): edge}
    return {call.keys[0]: call.out_edges[0]}


def _source_name(call: Call) -> str | None:
    rule = call.unit.rule
    return None if rule is None else rule.source_param(call.unit.module, call.unit.names)


def unbatched(shape: tuple[int, ...], consumers: list[tuple[Node, int]], batch: int, users: Users | None = None) -> bool:
    """Does a layer output lack a batch dimension?

    Yes if its first dimension is not the batch. If it is, the output is batched, unless every
    use of it ends, past shape-only nodes (and elementwise ones with other unbatched operands),
    at an operation that broadcasts it over the batch
    (``rules/broadcast.py``): a position table of ``T == B`` rows, ``unsqueeze(0)``-ed and added
    to ``(B, T, d)`` activations. A view, reshape, permute, split or concatenation that keeps
    the batch in dimension 0 (the head split ``.view(B, T, H, d)`` after an attention
    projection) is not broadcasting and says nothing against the batch: the output stays
    batched, and the first-use check (``verify.py``) compares the result with autograd.
    """
    if len(shape) == 0 or shape[0] != batch:
        return True
    if not consumers:
        return False
    sites: list[Site] = []
    bad: list[str] = []
    budget = [_BUDGET]
    for m, pos in consumers:
        _sites(m, pos, shape, batch, users or {}, (), sites, bad, budget)
        if bad:
            return False
    return True


class _Reach:
    """Does a requested gradient edge (one of ``keys``) lie at or below a layer's input?

    At: the input tensor's own edge is requested (the previous layer's output, consumed
    directly). Below: the graph under the input's node contains one. Memoised over one step's
    graph; iterative, so deep graphs do not hit the recursion limit.
    """

    def __init__(self, keys: set[EdgeKey]) -> None:
        self.keys = keys
        self.memo: dict[Node, bool] = {}

    def any(self, in_keys: list[EdgeKey]) -> bool:
        return any(k in self.keys or self._node(k[0]) for k in in_keys)

    def _node(self, root: Node) -> bool:
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


#: node names whose output shapes :func:`make_plan` reads (``_sites``): part of a step's
#: signature (``walk.signature``)
SHAPED: frozenset[str] = frozenset(views_mod.SHAPE_ONLY) | frozenset(broadcast.CONSUMERS)


@dataclass(frozen=True)
class PlanTemplate:
    """A plan with this step's objects replaced by positions, to rebuild on a later step whose
    graph has the same signature (``walk.signature``). Only plans whose every job and request
    is named by a recorded call are templated: rule calls with a batch-first output (streamed
    or not, sequence-first included). Plans with broadcast sites, bare parameters or fallback
    calls hold nodes and tensors of their own step (a site's factor) and are made afresh."""

    batch: int
    #: per rule job: (call position, streamed, batch_dim, what it requests)
    jobs: tuple[tuple[int, bool, int, str | None], ...]
    #: the requests in order: (call position, True for the rule's source edge, else its output)
    requests: tuple[tuple[int, bool], ...]
    #: ``Plan.paths()`` of the plan (the first-use checks read them every step)
    paths: frozenset[str]

    @staticmethod
    def of(plan: Plan, calls: list[Call], params: Sequence[Tensor]) -> PlanTemplate | None:
        """The template of ``plan``, or None if it holds anything but calls."""
        if plan.problems or plan.fallbacks or plan.bare:
            return None
        if any(j.consumers is not None for j in plan.rules):
            return None
        pos = {id(c): i for i, c in enumerate(calls)}
        by_key: dict[EdgeKey, tuple[int, bool]] = {}
        for j in plan.rules:
            i = pos[id(j.call)]
            by_key[j.call.keys[0]] = (i, False)
            name = j.requests
            if name is not None and name != "output":  # the parameter source_edge requested
                by_key.setdefault(edge_key(get_gradient_edge(params[j.call.unit.params[name]])), (i, True))
        if any(k not in by_key for k in plan.requests):
            return None
        jobs = tuple((pos[id(j.call)], j.streamed, j.batch_dim, j.requests) for j in plan.rules)
        return PlanTemplate(plan.batch, jobs, tuple(by_key[k] for k in plan.requests), frozenset(plan.paths()))

    def plan(self, calls: list[Call], params: Sequence[Tensor]) -> Plan:
        """This step's plan: the template's jobs and requests on this step's calls."""
        plan = Plan(self.batch)
        plan.rules = [RuleJob(calls[i], None, streamed, bd, req) for i, streamed, bd, req in self.jobs]
        for i, source in self.requests:
            c = calls[i]
            if source:
                plan.requests.update(source_edge(c, params))
            else:
                plan.requests[c.keys[0]] = c.out_edges[0]
        return plan
