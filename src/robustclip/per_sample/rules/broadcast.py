"""Bare parameters and unbatched layer outputs that enter the batch by broadcasting.

A parameter used directly in a forward (``x + self.pos``, ``x * self.gamma``: learned biases,
position tables, layer scales) or a layer called on an input without a batch dimension
(``self.pos_emb(torch.arange(T))`` added to ``(B, T, d)`` activations) is shared by every sample
of the batch; autograd sums the samples' gradients where the broadcast happens, so the gradient
of the parameter (or of the layer's output) alone no longer separates them.

The per-sample gradient is recovered one step later, at the node that broadcasts: for
``y = a + alpha * b`` the gradient of ``b`` for sample ``i`` is ``alpha * dL/dy_i`` summed over
the dimensions ``b`` was broadcast along; for ``y = a * b`` it is ``dL/dy_i * a_i``, likewise
reduced; for ``y = b.expand(B, ...)`` (a class token) it is ``dL/dy_i``; for
``y = torch.where(m, b, fill)`` it is ``dL/dy_i * m_i``. The engine asks autograd for ``dL/dy`` (the consumer's output gradient, batch first)
and this file turns it into ``(B, *shape)``. Any other consumer (a matmul with a bare weight,
indexing a bare table) is not modelled, and the engine falls back for the whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

#: an autograd node (``torch.autograd.graph.Node``); its saved values (``_saved_alpha``,
#: ``_saved_self``...) are attributes torch adds per node class at runtime, unknown to its stubs
Node = Any
_Consumer = Callable[[Node, int], float | Tensor]

#: node name -> fn(node, input position) -> the factor that turns the gradient of the node's
#: output into the (still broadcast) gradient of that input: a number, or a tensor read from
#: the node's saved values *before* the backward pass frees them
CONSUMERS: dict[str, _Consumer] = {}


def _consumer(name: str) -> Callable[[_Consumer], _Consumer]:
    def deco(fn: _Consumer) -> _Consumer:
        CONSUMERS[name] = fn
        return fn

    return deco


@_consumer("AddBackward0")
def _add(node: Node, pos: int) -> float | Tensor:
    alpha: float = node._saved_alpha
    return 1.0 if pos == 0 else alpha


@_consumer("SubBackward0")
def _sub(node: Node, pos: int) -> float | Tensor:
    alpha: float = node._saved_alpha
    return 1.0 if pos == 0 else -alpha


@_consumer("MulBackward0")
def _mul(node: Node, pos: int) -> float | Tensor:
    saved: Tensor = node._saved_other if pos == 0 else node._saved_self
    return saved.detach()


@_consumer("ExpandBackward0")
def _expand(node: Node, pos: int) -> float | Tensor:
    # a class or register token expanded over the batch, ``cls.expand(B, -1, -1)``
    return 1.0


@_consumer("WhereBackward0")
def _where(node: Node, pos: int) -> float | Tensor:
    # torch.where(mask, bias, fill): a position bias masked per sample (T5 under sdpa)
    cond: Tensor = node._saved_condition
    return cond if pos == 0 else ~cond


#: autograd nodes that only change the dtype: a bare fp32 parameter used under autocast
CASTS = {"ToCopyBackward0"}


def output_shape(node: Node) -> tuple[int, ...] | None:
    """Shape of a consumer node's (single) forward output, from autograd's metadata."""
    meta = getattr(node, "_input_metadata", None)
    if not meta or len(meta) != 1:
        return None
    return tuple(meta[0].shape)


def supported(node: Node, operand_shape: tuple[int, ...], batch: int) -> bool:
    """True if ``node`` broadcasts an operand of ``operand_shape`` over a batch-first output."""
    if node.name() not in CONSUMERS:
        return False
    out = output_shape(node)
    if out is None or len(out) == 0 or out[0] != batch:
        return False
    return broadcast_dims(operand_shape, out) is not None


def broadcast_dims(shape: tuple[int, ...], out: tuple[int, ...]) -> list[int] | None:
    """Dimensions (of ``out``, batch excluded) an operand of ``shape`` was broadcast along, or None
    if it does not broadcast over the batch (it is batched itself, or does not fit)."""
    n = len(out)
    if len(shape) > n:
        return None
    s = (1,) * (n - len(shape)) + tuple(shape)
    if s[0] != 1:
        return None
    dims = []
    for d in range(1, n):
        if s[d] == out[d]:
            continue
        if s[d] != 1:
            return None
        dims.append(d)
    return dims


def factor(node: Node, pos: int) -> float | Tensor:
    """Read what the per-sample gradient of operand ``pos`` needs; call before the backward."""
    return CONSUMERS[node.name()](node, pos)


def per_sample(fac: float | Tensor, g: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Per-sample gradient ``(B, *shape)`` of an operand, from ``g = dL/dy`` and its factor."""
    full = g * (fac.to(g.dtype) if isinstance(fac, Tensor) else fac)
    dims = broadcast_dims(shape, tuple(full.shape))
    assert dims is not None, "checked by supported()"
    if dims:
        full = full.sum(dims, keepdim=True)
    return full.reshape(full.shape[0], *shape)
