"""Shape-only operations between a tensor shared by every sample and the node that broadcasts it.

A tensor without a batch dimension (a bare parameter, or the output of a layer called on a
position index) often reaches the operation that broadcasts it over the batch through a few
operations that only rearrange its elements: T5's relative position bias is an embedding of
shape ``(q, k, H)``, permuted to ``(H, q, k)`` and unsqueezed to ``(1, H, q, k)`` before it is
added to the batch's attention scores; a position table is ``unsqueeze(0)``-ed before the add.

The per-sample gradient is recovered at the broadcasting node (``rules/broadcast.py``), in the
shape the operand had there, and mapped back through these operations here, with the batch as
an extra first dimension: each is a fixed rearrangement, so its backward is the inverse
rearrangement, applied to all samples at once. Which nodes qualify is read from the autograd
graph's node names; their saved dimensions come from the node, and their input shape from the
walk (the shape of the tensor followed so far).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

#: nodes whose backward is a reshape of the gradient to the input's shape (element order kept)
RESHAPES = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "UnsqueezeBackward0",
        "UnsqueezeBackward1",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "SqueezeBackward3",
        "SqueezeBackward4",
        "CloneBackward0",
        "AliasBackward0",
        "ToCopyBackward0",
    }
)
#: nodes whose backward permutes the gradient's dimensions
PERMUTES = frozenset({"PermuteBackward0", "TransposeBackward0", "TBackward0"})
#: every shape-only node the engine sees through
SHAPE_ONLY = RESHAPES | PERMUTES


def _norm(d: int, n: int) -> int:
    return d + n if d < 0 else d


def back(node: Any, g: Tensor, in_shape: tuple[int, ...]) -> Tensor:
    """The per-sample gradient of a shape-only node's input, ``(B, *in_shape)``, from that of its
    output, ``g`` of shape ``(B, *out_shape)``."""
    name = node.name()
    b = g.shape[0]
    if name in RESHAPES:
        return g.reshape(b, *in_shape)
    n = len(in_shape)
    if name == "PermuteBackward0":
        dims = [_norm(int(d), n) for d in node._saved_dims]
        inverse = sorted(range(n), key=lambda i: dims[i])
        return g.permute(0, *(1 + i for i in inverse))
    if name == "TransposeBackward0":
        return g.transpose(1 + _norm(int(node._saved_dim0), n), 1 + _norm(int(node._saved_dim1), n))
    if name == "TBackward0":
        return g.transpose(1, 2) if n == 2 else g
    raise KeyError(name)  # the planner only follows SHAPE_ONLY nodes
