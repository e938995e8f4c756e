"""Walks of the autograd graph that guard the per-sample engines against silent errors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge


def reached_leaves(roots: Iterable[object], stop: set[Any] | None = None) -> list[Tensor]:
    """Leaf tensors (parameters) whose ``AccumulateGrad`` node is reachable from ``roots``.

    The walk does not enter nodes in ``stop``. It is iterative and visits each node once, so it
    costs a few microseconds per node of the graph.
    """
    stop = stop or set()
    seen: set[object] = set()
    stack: list[Any] = [r for r in roots if r is not None]
    found: list[Tensor] = []
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            found.append(var)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                stack.append(nxt)
    return found


def check_losses_reach_only(losses: Tensor, outputs: Sequence[Tensor]) -> None:
    """Raise if ``losses`` depend on a parameter other than through ``outputs``.

    A per-sample loss such as ``ce_i + lam * ||W||^2`` has a gradient term that is not a
    function of the model's output; engines that start from the output would drop it.
    """
    stop = {o.grad_fn for o in outputs if o.grad_fn is not None}
    direct = reached_leaves([losses.grad_fn], stop)
    if direct:
        shapes = ", ".join(str(tuple(t.shape)) for t in direct[:3])
        raise ValueError(
            "the per-sample losses depend on parameters other than through the model's output "
            f"(leaf tensors of shape {shapes}): a weight penalty inside the loss, or a second "
            "forward pass the clipper did not see. Move weight penalties into the optimizer "
            "(weight_decay=...), and call the model once per backward()."
        )


def _edge(t: Tensor) -> tuple[object, int]:
    e = get_gradient_edge(t)
    return (e.node, e.output_nr)


def _reached_edges(
    starts: Iterable[tuple[Any, int]], targets: set[tuple[object, int]], through: bool
) -> set[tuple[object, int]]:
    """The edges of ``targets`` that the graph from the edges ``starts`` reaches (a start edge
    itself included). With ``through`` False a path ends at the first target edge it meets
    (what lies below is reached through that target); a node entered by another edge is
    still walked."""
    seen: set[object] = set()
    found: set[tuple[object, int]] = set()
    stack: list[Any] = []

    def visit(node: Any, nr: int) -> None:
        hit = (node, nr) in targets
        if hit:
            found.add((node, nr))
        if (through or not hit) and node not in seen:
            stack.append(node)

    for node, nr in starts:
        if node is not None:
            visit(node, nr)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, nr in node.next_functions:
            if nxt is not None:
                visit(nxt, nr)
    return found


def output_cotangents(losses: Tensor, outputs: Sequence[Tensor]) -> list[Tensor | None]:
    """``d sum(losses) / d outputs[k]`` with the losses read as a function of the outputs:
    the *partial* derivatives, which pulled back through the model give the parameters'
    gradient.

    ``autograd.grad(losses.sum(), outputs)`` gives total derivatives instead. When one output
    is computed from another (an encoder-decoder returns the encoder's last hidden state next
    to the logits computed from it), the inner output's total derivative already holds every
    path through the outer one, and pulling both back through the model counts those paths
    twice. With ``a_k`` the total and ``p_k`` the partial derivative,
    ``a_k = p_k + sum_j D_jk^T p_j`` over the outputs ``j`` computed from output ``k``
    (``D_jk``: the model's derivative of ``o_j`` by ``o_k``, every path), solved from the
    outermost outputs in; only nested outputs that the losses also use directly cost this
    extra backward pass.

    Returns None where the partial derivative is zero: an output the losses reach only
    through other outputs, or not at all, and a repeated output after its first occurrence.
    Outputs must require grad.
    """
    edges = [_edge(o) for o in outputs]
    first: dict[tuple[object, int], int] = {}
    for k, e in enumerate(edges):
        first.setdefault(e, k)
    uniq = sorted(first.values())
    targets = {edges[k] for k in uniq}
    # (the losses may be an output themselves: a model that returns its per-sample losses)
    direct = _reached_edges([_edge(losses)], targets, through=False)
    keep = [k for k in uniq if edges[k] in direct]
    result: list[Tensor | None] = [None] * len(outputs)
    if not keep:
        return result
    # above[k]: the used outputs computed from output k (one used output, the usual case,
    # needs no walk)
    used = {edges[k] for k in keep}
    below = {
        j: _reached_edges([edges[j]], used - {edges[j]}, through=True) if len(keep) > 1 else set()
        for j in keep
    }
    above = {k: [j for j in keep if edges[k] in below[j]] for k in keep}
    totals = torch.autograd.grad(
        losses.sum(), [outputs[k] for k in keep], retain_graph=True, allow_unused=True
    )
    total = dict(zip(keep, totals))
    partial: dict[int, Tensor | None] = {}
    pending = list(keep)
    while pending:
        # the nesting is acyclic (a graph), so some output has all its outer ones solved
        k = next(k for k in pending if all(j in partial for j in above[k]))
        pending.remove(k)
        t = total[k]
        outer = [j for j in above[k] if partial[j] is not None]
        if t is not None and outer:
            (via,) = torch.autograd.grad(
                [outputs[j] for j in outer],
                outputs[k],
                grad_outputs=[partial[j] for j in outer],
                retain_graph=True,
                allow_unused=True,
            )
            if via is not None:
                t = t - via
        partial[k] = t
        result[k] = t
    return result
