"""``nn.EmbeddingBag`` in modes ``"sum"`` and ``"mean"``: bags as rows of a 2-D index tensor, or
a 1-D index tensor cut by ``offsets`` (``include_last_offset`` either way, empty bags allowed),
with ``per_sample_weights`` and ``padding_idx``. Each bag is one sample.

Bag ``i``'s output is ``o_i = sum_t c_{i,t} W[idx_{i,t}]`` with ``c`` its per-sample weights
(mode ``"sum"``; else 1), or 1 / the number of its entries that are not ``padding_idx`` (mode
``"mean"``); padding entries have ``c = 0``. So, per sample, ``grad W_i = sum_t e_{idx_{i,t}} (x)
c_{i,t} G_i``: the Embedding rule's index term (``rules/embedding.py``), with the bags padded to
the longest by entries of weight zero. The exact norm groups equal indices within each bag; the
clipped sum is one ``index_add``.

Mode ``"max"`` routes each output coordinate to one row (its argmax), which is not a sum of
outer products over the bag's entries: such modules take the per-module fallback, as do
``sparse=True`` and ``scale_grad_by_freq=True``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from robustclip.per_sample._engine import acc_dtype
from robustclip.per_sample.rules import OuterTerm, Term, register

_SIGNATURE = inspect.signature(nn.EmbeddingBag.forward)


def _unsupported(m: nn.EmbeddingBag) -> str | None:
    if m.mode == "max":
        return "mode='max' (each coordinate's gradient goes to its argmax row)"
    if m.sparse:
        return "sparse=True (sparse gradients)"
    if m.scale_grad_by_freq:
        return "scale_grad_by_freq=True (scales by index counts over the whole batch)"
    return None


def bags(module: nn.EmbeddingBag, idx: Tensor, offsets: Tensor | None, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(B, L)`` indices and their coefficients ``c`` (module docstring), bags padded to the
    longest with coefficient zero."""
    if idx.dim() == 2:
        c = torch.ones(idx.shape, dtype=torch.float64, device=idx.device) if weights is None else weights
    else:
        assert offsets is not None, "a 1-D EmbeddingBag input comes with offsets"
        n = idx.shape[0]
        starts = offsets[:-1] if module.include_last_offset else offsets
        ends = torch.cat([starts[1:], (offsets[-1:] if module.include_last_offset else offsets.new_tensor([n]))])
        lengths = (ends - starts).clamp_min(0)
        b, width = starts.shape[0], max(int(lengths.max()) if lengths.numel() else 0, 1)
        pos = torch.arange(n, device=idx.device)
        bag = torch.searchsorted(starts, pos, right=True) - 1
        inside = (bag >= 0) & (pos < ends[bag.clamp_min(0)])  # entries past the last offset: no bag
        bag, pos = bag[inside], pos[inside]
        # slots past a bag's length keep coefficient 0 (and index 0): no contribution
        slot = pos - starts[bag]
        padded = idx.new_zeros((b, width))
        padded[bag, slot] = idx[inside]
        c = torch.zeros((b, width), dtype=torch.float64 if weights is None else weights.dtype, device=idx.device)
        c[bag, slot] = 1.0 if weights is None else weights[inside]
        idx = padded
    present = c != 0 if weights is None else torch.ones_like(idx, dtype=torch.bool)
    if module.padding_idx is not None:
        present = present & (idx != module.padding_idx)
        c = c * present
    if module.mode == "mean":  # (per_sample_weights come only with mode "sum")
        c = c / present.sum(1, keepdim=True).clamp_min(1)
    return idx, c


@register(nn.EmbeddingBag, _unsupported, full_call=True)
def embedding_bag_terms(
    module: nn.EmbeddingBag,
    x: Tensor,
    grad_out: Tensor,
    names: frozenset[str],
    call: tuple[tuple[Any, ...], dict[str, Any]],
) -> dict[str, Term]:
    if "weight" not in names:
        return {}
    a = _SIGNATURE.bind(module, *call[0], **call[1]).arguments
    weights = a.get("per_sample_weights")
    idx, c = bags(module, a["input"], a.get("offsets"), None if weights is None else weights.detach())
    b, d = grad_out.shape
    # in float32 at least: 1 / count in bf16 would add rounding the plain backward does not have
    dt = acc_dtype(grad_out.dtype)
    g = c.to(dt).unsqueeze(-1) * grad_out.to(dt).unsqueeze(1)  # (B, L, d)
    return {"weight": OuterTerm(idx.reshape(b, 1, -1), g.reshape(b, 1, -1, d), module.num_embeddings, module.weight.shape, grad_out.dtype)}
