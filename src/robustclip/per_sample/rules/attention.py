"""``nn.MultiheadAttention``: batch first or sequence first, self- or cross-attention, key
padding and attention masks (boolean or additive, ``is_causal``), separate key/value sizes,
``add_bias_kv`` and ``add_zero_attn``.

The layer's parameters all act through matrix products with activations the layer computes
itself: the input projections ``q = query W_q^T + b_q`` (and ``k``, ``v``), the output
projection ``y = o W_o^T + b_o`` of the attention output ``o``. Given ``dL/dq``, ``dL/dk``,
``dL/dv`` and ``o``, every weight is an outer-product term as for ``nn.Linear`` (``u`` = the
projection's output gradient, ``v`` = its input), every bias a sum over positions. Those come
from ONE batched recomputation of the attention from the recorded inputs: the projections are
applied here (self-attention: one matmul with the packed weight), the attention core runs
through ``F.scaled_dot_product_attention`` with the masks applied as
``F.multi_head_attention_forward`` applies them, and one backward pass of ``dL/do = dL/dy W_o``
through the core gives ``dL/dq``, ``dL/dk``, ``dL/dv``. No per-sample work; the extra cost is
the input projections and one forward and one backward of the attention core.

The input projection weight ``in_proj_weight`` (``3E x E``) is, for self-attention (one tensor
as query, key and value), one Linear term: ``u`` = ``(dq, dk, dv)`` side by side, ``v`` = the
input. Otherwise it is one term in three blocks (query, key, value rows), with the shorter of
query and key padded by zero positions. ``bias_k`` and
``bias_v`` are appended to each sample's keys and values here, as one row per sample, so that
their gradients stay per sample.

Attention dropout is not modelled (its random mask is not recorded): such layers take the
per-module fallback.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustclip.per_sample._engine import acc_dtype
from robustclip.per_sample.rules import DenseTerm, OuterTerm, Term, register
from robustclip.per_sample.rules._util import sum_positions

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _unsupported(m: nn.MultiheadAttention) -> str | None:
    if m.dropout > 0:
        return f"attention dropout {m.dropout} (its random mask is not recorded)"
    if m.bias_k is not None and (m.bias_v is None):
        return "bias_k without bias_v"
    return None


def _batch_dim(m: nn.MultiheadAttention) -> int:
    return 0 if m.batch_first else 1


def _pad_positions(t: Tensor, length: int) -> Tensor:
    """``(N, T, n) -> (N, length, n)`` with zero positions appended."""
    return t if t.shape[1] == length else F.pad(t, (0, 0, 0, length - t.shape[1]))


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not attended) as the additive mask the layer uses; float masks as
    they are."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _core(
    m: nn.MultiheadAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    need_weights: bool,
) -> Tensor:
    """The attention between the projections, batch first: ``q (N, L, E)``, ``k, v (N, S, E)``
    (``bias_k``, ``bias_v`` already appended) -> ``(N, L, E)``, with the masks meaning what
    they mean to ``F.multi_head_attention_forward`` (the layer's own path when it trains), step
    for step: boolean masks become additive; the ``is_causal`` hint replaces the attention mask
    only without a padding mask (and is ignored when the layer returns the attention weights: it
    then computes them from the mask); every appended key (bias, zero attention) is never masked."""
    n, length, e = q.shape
    h = m.num_heads
    kpm = _additive(key_padding_mask, q.dtype)
    if is_causal and kpm is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = _additive(attn_mask, q.dtype)
        is_causal = False
    if attn_mask is not None:  # (L, S) or (N * heads, L, S) -> broadcastable to (N, heads, L, S)
        attn_mask = attn_mask.reshape(1, 1, *attn_mask.shape) if attn_mask.dim() == 2 else attn_mask.reshape(n, h, length, -1)
    appended = k.shape[1] - (kpm.shape[1] if kpm is not None else k.shape[1])
    q4, k4, v4 = (t.reshape(n, t.shape[1], h, e // h).transpose(1, 2) for t in (q, k, v))
    if m.add_zero_attn:
        zeros = k4.new_zeros((n, h, 1, e // h))
        k4, v4 = torch.cat([k4, zeros], 2), torch.cat([v4, zeros], 2)
        appended += 1
    pad_to = k4.shape[2]
    if attn_mask is not None and attn_mask.shape[-1] < pad_to:
        attn_mask = F.pad(attn_mask, (0, pad_to - attn_mask.shape[-1]))
    if kpm is not None:
        kpm = F.pad(kpm, (0, appended)).reshape(n, 1, 1, pad_to)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask, 0.0, is_causal)
    return o.transpose(1, 2).reshape(n, length, e)


@register(nn.MultiheadAttention, _unsupported, full_call=True, out_batch_dim=_batch_dim)
def attention_terms(
    module: nn.MultiheadAttention,
    x: Tensor,
    grad_out: Tensor,
    names: frozenset[str],
    call: tuple[tuple[Any, ...], dict[str, Any]],
) -> dict[str, Term]:
    bound = _SIGNATURE.bind(module, *call[0], **call[1])
    bound.apply_defaults()
    a = bound.arguments
    # recomputed in the parameters' precision (float32 at least): under autocast the layer ran
    # in bf16/fp16, and the terms need only its gradients to that precision
    cd = torch.promote_types(acc_dtype(a["query"].dtype), module.out_proj.weight.dtype)
    # self-attention (one tensor as query, key and value) projects once with the packed weight,
    # and its in_proj_weight is then ONE Linear term: u = (dq, dk, dv) side by side, v = input
    packed = a["query"] is a["key"] and a["key"] is a["value"] and module._qkv_same_embed_dim
    query, key, value = (a[n].detach().to(cd) for n in ("query", "key", "value"))
    if query.dim() != 3:
        raise RuntimeError(
            "robustclip: nn.MultiheadAttention was called on an unbatched (2-D) query; per-sample "
            "gradients need a batch: call it on (batch, length, embed) inputs (batch_first=True)."
        )
    m, e = module, module.embed_dim
    if not m.batch_first:  # batch first from here on
        query, key, value, grad_out = (t.transpose(0, 1) for t in (query, key, value, grad_out))
    n, length, src = query.shape[0], query.shape[1], key.shape[1]
    b_in = m.in_proj_bias.detach().to(cd) if m.in_proj_bias is not None else None
    key_padding_mask, attn_mask = (
        mk.to(cd) if isinstance(mk, Tensor) and mk.is_floating_point() else mk
        for mk in (a["key_padding_mask"], a["attn_mask"])
    )
    with torch.enable_grad():
        qkv: Tensor | None = None
        if packed:
            qkv = F.linear(query, m.in_proj_weight.detach().to(cd), b_in).detach().requires_grad_()
            q, k, v = qkv.chunk(3, -1)
            leaves = [qkv]
        else:
            if m._qkv_same_embed_dim:
                w_q, w_k, w_v = m.in_proj_weight.detach().to(cd).chunk(3)
            else:
                w_q, w_k, w_v = (w.detach().to(cd) for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
            b_q, b_k, b_v = b_in.chunk(3) if b_in is not None else (None, None, None)
            q = F.linear(query, w_q, b_q).detach().requires_grad_()
            k = F.linear(key, w_k, b_k).detach().requires_grad_()
            v = F.linear(value, w_v, b_v).detach().requires_grad_()
            leaves = [q, k, v]
        k_all, v_all = k, v
        if m.bias_k is not None and m.bias_v is not None:
            # one row per sample, so that their gradients stay per sample
            bk = m.bias_k.detach().to(cd).reshape(1, 1, e).expand(n, 1, e).clone().requires_grad_()
            bv = m.bias_v.detach().to(cd).reshape(1, 1, e).expand(n, 1, e).clone().requires_grad_()
            leaves += [bk, bv]
            k_all, v_all = torch.cat([k, bk], 1), torch.cat([v, bv], 1)
        o = _core(m, q, k_all, v_all, key_padding_mask, attn_mask, bool(a["is_causal"]), bool(a["need_weights"]))
        g_o = torch.matmul(grad_out.to(cd), m.out_proj.weight.detach().to(cd))
        grads = list(torch.autograd.grad(o, leaves, g_o))
    o = o.detach()  # (N, L, E): the output projection's input
    terms: dict[str, Term] = {}
    dt = grad_out.dtype
    if packed:
        dqkv = grads.pop(0)
        if "in_proj_weight" in names:
            terms["in_proj_weight"] = OuterTerm(dqkv.unsqueeze(1), query.unsqueeze(1), 3 * e, m.in_proj_weight.shape, dt)
        if "in_proj_bias" in names:
            terms["in_proj_bias"] = DenseTerm(sum_positions(dqkv))
    else:
        dq, dk, dv = grads[:3]
        del grads[:3]
        if "in_proj_weight" in names:
            t = max(length, src)
            u = torch.stack([_pad_positions(d, t) for d in (dq, dk, dv)], 1)
            vv = torch.stack([_pad_positions(i, t) for i in (query, key, value)], 1)
            terms["in_proj_weight"] = OuterTerm(u, vv, e, m.in_proj_weight.shape, dt)
        for name, d, i in (("q_proj_weight", dq, query), ("k_proj_weight", dk, key), ("v_proj_weight", dv, value)):
            if name in names:
                terms[name] = OuterTerm(d.unsqueeze(1), i.unsqueeze(1), e, getattr(m, name).shape, dt)
        if "in_proj_bias" in names:
            terms["in_proj_bias"] = DenseTerm(torch.cat([sum_positions(d) for d in (dq, dk, dv)], 1))
    if "bias_k" in names:
        terms["bias_k"] = DenseTerm(grads[0].reshape(n, 1, 1, e))
    if "bias_v" in names:
        terms["bias_v"] = DenseTerm(grads[1].reshape(n, 1, 1, e))
    if "out_proj.weight" in names:
        terms["out_proj.weight"] = OuterTerm(grad_out.unsqueeze(1), o.unsqueeze(1), e, m.out_proj.weight.shape, dt)
    if "out_proj.bias" in names:
        terms["out_proj.bias"] = DenseTerm(sum_positions(grad_out))
    return terms
