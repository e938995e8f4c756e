"""``nn.MultiheadAttention``: batch first or sequence first, self- or cross-attention, key
padding and attention masks (boolean or additive, ``is_causal``), separate key/value sizes,
``add_bias_kv`` and ``add_zero_attn``.

The layer's parameters all act through matrix products with activations the layer computes
itself: the input projections ``q = query W_q^T + b_q`` (and ``k``, ``v``), the output
projection ``y = o W_o^T + b_o`` of the attention output ``o``. Given ``dL/dq``, ``dL/dk``,
``dL/dv`` and ``o``, every weight is an outer-product term as for ``nn.Linear`` (``u`` = the
projection's output gradient, ``v`` = its input), every bias a sum over positions. Those come
from ONE batched recomputation of the attention from the recorded inputs: the projections are
applied here, the attention core runs through ``F.multi_head_attention_forward`` itself (with
identity projections, so masks mean exactly what they mean to the layer) and one backward pass
of ``dL/do = dL/dy W_o`` through it gives ``dL/dq, dL/dk, dL/dv``. No per-sample work; the
extra cost is about one forward and one backward of the attention core.

The input projection weight ``in_proj_weight`` (``3E x E``) is one term in three blocks (query,
key, value rows), with the shorter of query and key padded by zero positions. ``bias_k`` and
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
    query, key, value = (a[n].detach().to(cd) for n in ("query", "key", "value"))
    if query.dim() != 3:
        raise RuntimeError(
            "robustclip: nn.MultiheadAttention was called on an unbatched (2-D) query; per-sample "
            "gradients need a batch: call it on (batch, length, embed) inputs (batch_first=True)."
        )
    m, e, h = module, module.embed_dim, module.num_heads
    if not m.batch_first:  # batch first from here on; the core below runs sequence first
        query, key, value, grad_out = (t.transpose(0, 1) for t in (query, key, value, grad_out))
    n, length, src = query.shape[0], query.shape[1], key.shape[1]
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = m.in_proj_weight.detach().to(cd).chunk(3)
    else:
        w_q, w_k, w_v = (w.detach().to(cd) for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
    b_q = b_k = b_v = None
    if m.in_proj_bias is not None:
        b_q, b_k, b_v = m.in_proj_bias.detach().to(cd).chunk(3)
    key_padding_mask, attn_mask = (
        mk.to(cd) if isinstance(mk, Tensor) and mk.is_floating_point() else mk
        for mk in (a["key_padding_mask"], a["attn_mask"])
    )
    with torch.enable_grad():
        q = F.linear(query, w_q, b_q).detach().requires_grad_()
        k = F.linear(key, w_k, b_k).detach().requires_grad_()
        v = F.linear(value, w_v, b_v).detach().requires_grad_()
        leaves = [q, k, v]
        k_all, v_all = k, v
        if m.bias_k is not None and m.bias_v is not None:
            bk = m.bias_k.detach().to(cd).reshape(1, 1, e).expand(n, 1, e).clone().requires_grad_()
            bv = m.bias_v.detach().to(cd).reshape(1, 1, e).expand(n, 1, e).clone().requires_grad_()
            leaves += [bk, bv]
            k_all, v_all = torch.cat([k, bk], 1), torch.cat([v, bv], 1)
            # as the layer does when it appends bias_k and bias_v: one more key, never masked
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        eye = torch.eye(e, dtype=q.dtype, device=q.device)
        o, _ = F.multi_head_attention_forward(
            q.transpose(0, 1), k_all.transpose(0, 1), v_all.transpose(0, 1), e, h,
            None, None, None, None, m.add_zero_attn, 0.0, eye, None, training=False,
            key_padding_mask=key_padding_mask, need_weights=False, attn_mask=attn_mask,
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
            is_causal=bool(a["is_causal"]),
        )  # fmt: skip
        g_o = torch.matmul(grad_out.to(cd), m.out_proj.weight.detach().to(cd))
        grads = torch.autograd.grad(o, leaves, g_o.transpose(0, 1))
    o = o.detach().transpose(0, 1)  # (N, L, E): the output projection's input
    dq, dk, dv = grads[:3]
    terms: dict[str, Term] = {}
    dt = grad_out.dtype
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
        terms["bias_k"] = DenseTerm(grads[3].reshape(n, 1, 1, e))
    if "bias_v" in names:
        terms["bias_v"] = DenseTerm(grads[4].reshape(n, 1, 1, e))
    if "out_proj.weight" in names:
        terms["out_proj.weight"] = OuterTerm(grad_out.unsqueeze(1), o.unsqueeze(1), e, m.out_proj.weight.shape, dt)
    if "out_proj.bias" in names:
        terms["out_proj.bias"] = DenseTerm(sum_positions(grad_out))
    return terms
