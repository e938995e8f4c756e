"""One walk over the autograd graph of the losses, before the backward pass.

It answers, every step, the questions on which correctness depends:

* which recorded calls the losses actually depend on (others are ignored);
* which nodes consume each edge (a layer output without a batch dimension gets its per-sample
  gradient from its broadcasting consumer, ``rules/broadcast.py``, possibly through shape-only
  nodes, ``views.py``);
* which trainable parameters are reached *other than* through a recorded call (bare
  parameters), and through which node.

Calls of rule-covered layers are jumped over (from the output node straight to the input's
node): their internals use only their own parameters. Fallback calls are entered, since a custom
forward may use any parameter; parameters of the fallback's own subtree found there are covered
by its replay, any other is a bare use. The walk is iterative and visits each node once per
context: microseconds per node, far below a backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from robustclip.per_sample._hooks.capture import Call
from robustclip.per_sample.rules.broadcast import CASTS


@dataclass
class WalkResult:
    reached: list[Call] = field(default_factory=list)
    #: edge key -> [(consumer node, input position)], for every edge of the walked graph
    consumers: dict[tuple[Any, int], list[tuple[Any, int]]] = field(default_factory=dict)
    #: (consumer node, input position, parameter index) for parameters used outside any call
    bare: list[tuple[Any, int, int]] = field(default_factory=list)


def _through_casts(node: Any) -> Any:
    while node is not None and node.name() in CASTS and len(node.next_functions) == 1:
        node = node.next_functions[0][0]
    return node


def walk(root: Any, calls: list[Call], param_index: dict[int, int]) -> WalkResult:
    res = WalkResult()
    by_node: dict[Any, list[Call]] = {}
    for c in calls:
        for k in c.keys:
            lst = by_node.setdefault(k[0], [])
            if c not in lst:
                lst.append(c)
    reached: dict[int, Call] = {}
    seen: set[tuple[Any, int]] = set()
    # context: 0 = outside any fallback call, else id of the fallback Call we are inside
    ctx_call: dict[int, Call] = {}
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        node, ctx = stack.pop()
        key = (node, ctx)
        if key in seen:
            continue
        seen.add(key)
        here = by_node.get(node)
        if here:
            for c in here:
                reached.setdefault(id(c), c)
            fallbacks = [c for c in here if c.unit.rule is None]
            if not fallbacks:
                for c in here:
                    for n in c.in_nodes:
                        stack.append((n, ctx))
                continue
            ctx = id(fallbacks[0])
            ctx_call[ctx] = fallbacks[0]
        inside = ctx_call.get(ctx)
        for pos, (nxt, nr) in enumerate(node.next_functions):
            if nxt is None:
                continue
            # every edge's consumers, not only the recorded calls' outputs: an unbatched output
            # may reach its broadcasting consumer through shape-only nodes (``views.py``)
            users = res.consumers.setdefault((nxt, nr), [])
            if (node, pos) not in users:
                users.append((node, pos))
            leaf = _through_casts(nxt)
            var = getattr(leaf, "variable", None)
            if var is not None:
                idx = param_index.get(id(var))
                if idx is not None and not (inside is not None and idx in inside.unit.indices):
                    res.bare.append((node, pos, idx))
                continue
            nctx = ctx
            if inside is not None and nxt in inside.in_nodes:
                nctx = 0
            stack.append((nxt, nctx))
    res.reached = list(reached.values())
    return res


#: a graph's shape as :func:`signature` reads it; equal signatures, equal plans
Signature = tuple[Any, ...]


def signature(root: Any, calls: list[Call], param_index: dict[int, int], shaped: frozenset[str]) -> Signature | None:
    """Everything the plan of a step without fallback calls depends on, as a hashable value:
    the losses' graph as far as :func:`walk` goes (every node's name and its edges, nodes
    numbered in the order a breadth-first visit finds them, so two graphs have the same
    signature exactly when they are the same labelled graph), the output shape of the nodes
    named in ``shaped`` (those the planner reads shapes of), and every recorded call: its unit,
    output shapes, input shape and dtype, and where its inputs join the graph.

    Parameters and other leaves are named by their layout index (None: not trained). The
    walk jumps over rule calls as :func:`walk` does, and gives up (None) at a fallback call,
    whose replay the plan does not cache. One pass over the nodes :func:`walk` visits,
    without its bookkeeping: the check that a cached plan still fits this step's graph.
    """
    by_node: dict[Any, list[int]] = {}
    for i, c in enumerate(calls):
        for e in c.out_edges:
            lst = by_node.setdefault(e.node, [])
            if i not in lst:
                lst.append(i)
    ids: dict[Any, int] = {root: 0}
    order: list[Any] = [root]
    sig: list[Any] = [
        tuple(
            (id(c.unit), tuple(c.out_shapes), None if c.x is None else (tuple(c.x.shape), c.x.dtype))
            for c in calls
        )
    ]
    k = 0
    while k < len(order):
        node = order[k]
        k += 1
        here = by_node.get(node)
        if here:
            ins: list[tuple[int, int]] = []
            for i in here:
                if calls[i].unit.rule is None:
                    return None
                for n, nr in calls[i].in_keys:
                    if n not in ids:
                        ids[n] = len(order)
                        order.append(n)
                    ins.append((ids[n], nr))
            sig.append((tuple(here), tuple(ins)))
            continue
        name = node.name()
        edges: list[Any] = []
        for nxt, nr in node.next_functions:
            if nxt is None:
                edges.append(None)
                continue
            var = getattr(_through_casts(nxt), "variable", None)
            if var is not None:
                edges.append(("leaf", param_index.get(id(var)), nxt.name(), nr))
                continue
            if nxt not in ids:
                ids[nxt] = len(order)
                order.append(nxt)
            edges.append((ids[nxt], nr))
        meta = getattr(node, "_input_metadata", None) if name in shaped else None
        sig.append((name, tuple(edges), None if meta is None else tuple(tuple(m.shape) for m in meta)))
    return tuple(sig)
