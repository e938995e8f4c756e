"""``nn.Embedding``, with ``padding_idx``, ``max_norm`` and index tensors of any shape and layout.

Per sample, ``grad W_i = sum_t e_{idx_t} (x) G_{i,t}``: an outer-product term whose ``u`` side
is one-hot, kept as the index tensor itself. Positions holding ``padding_idx`` get no gradient
(as in ``torch.nn.functional.embedding``), so their ``G`` rows are zeroed. The norm of a lone
embedding term is exact in ``O(B T d)`` by grouping equal indices (``_hooks/norms.py``);
the clipped sum is one ``index_add`` of the weight-scaled ``G`` rows.

``sparse=True`` and ``scale_grad_by_freq=True`` are not modelled (the latter scales by counts
over the whole batch, which mixes samples): such modules fall back to torch.func.
"""

from __future__ import annotations

from torch import Tensor, nn

from robustclip.per_sample.rules import OuterTerm, Term, register


def _unsupported(m: nn.Embedding) -> str | None:
    if m.sparse:
        return "sparse=True (sparse gradients)"
    if m.scale_grad_by_freq:
        return "scale_grad_by_freq=True (scales by token counts over the whole batch)"
    return None


@register(nn.Embedding, _unsupported)
def embedding_terms(module: nn.Embedding, x: Tensor, grad_out: Tensor, names: frozenset[str]) -> dict[str, Term]:
    if "weight" not in names:
        return {}
    b, d = grad_out.shape[0], module.embedding_dim
    idx = x.reshape(b, 1, -1)
    g = grad_out.reshape(b, 1, -1, d)
    if module.padding_idx is not None:
        g = g.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0)
    return {"weight": OuterTerm(idx, g, module.num_embeddings, module.weight.shape, grad_out.dtype)}
