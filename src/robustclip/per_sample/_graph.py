"""Walks of the autograd graph that guard the per-sample engines against silent errors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor


def reached_leaves(roots: Iterable[object], stop: set[object] | None = None) -> list[Tensor]:
    """Leaf tensors (parameters) whose ``AccumulateGrad`` node is reachable from ``roots``.

    The walk does not enter nodes in ``stop``. It is iterative and visits each node once, so it
    costs a few microseconds per node of the graph.
    """
    stop = stop or set()
    seen: set[object] = set()
    stack = [r for r in roots if r is not None]
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
