"""``nn.ConvTranspose1d``, ``nn.ConvTranspose2d`` and ``nn.ConvTranspose3d``: any stride,
padding, output padding (also through ``output_size``), dilation and groups.

A transposed convolution is the adjoint of a convolution with the same weight: for ``y =
conv_transpose(x, W)`` and any ``G`` of ``y``'s shape, ``<y, G> = <x, conv(G, W)>``, where
``conv`` maps ``out_channels`` to ``in_channels`` with the same stride, padding and dilation
(the output padding only adds positions of ``y`` that ``conv(G)`` does not reach, since it is
smaller than the stride). So the per-sample weight gradient of the transposed convolution with
output gradient ``G`` and input ``x`` is that of the convolution with input ``G`` and output
gradient ``x``: the convolution rule's term (``rules/conv.py``) with the two swapped, and all of
its paths (Gram norm without unfolding, grouped-convolution or im2col materialisation, the
clipped sum as one weight-gradient convolution) carry over.
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvTransposeNd

from robustclip.per_sample.rules import DenseTerm, Term, register
from robustclip.per_sample.rules._util import sum_positions
from robustclip.per_sample.rules.conv import ConvTerm


class AdjointConv:
    """The convolution whose adjoint a transposed convolution is: what :class:`ConvTerm` reads
    of a convolution module."""

    def __init__(self, m: _ConvTransposeNd) -> None:
        self.kernel_size, self.stride, self.dilation = m.kernel_size, m.stride, m.dilation
        self.padding, self.groups = m.padding, m.groups
        self.in_channels, self.out_channels = m.out_channels, m.in_channels
        self.weight = m.weight  # (in, out / groups, *k): the convolution's (out, in / groups, *k)
        self.padding_mode = "zeros"
        self._reversed_padding_repeated_twice = m._reversed_padding_repeated_twice


def _unsupported(m: _ConvTransposeNd) -> str | None:
    if any(p >= s for p, s in zip(m.output_padding, m.stride)):
        return "output_padding not smaller than the stride"
    return None


@register(nn.ConvTranspose3d, _unsupported)
@register(nn.ConvTranspose2d, _unsupported)
@register(nn.ConvTranspose1d, _unsupported)
def conv_transpose_terms(module: _ConvTransposeNd, x: Tensor, grad_out: Tensor, names: frozenset[str]) -> dict[str, Term]:
    terms: dict[str, Term] = {}
    if "weight" in names:
        terms["weight"] = ConvTerm(cast(nn.Conv2d, AdjointConv(module)), grad_out, x.to(grad_out.dtype))
    if "bias" in names:
        b = grad_out.shape[0]
        terms["bias"] = DenseTerm(sum_positions(grad_out.reshape(b, module.out_channels, -1).transpose(1, 2)))
    return terms
