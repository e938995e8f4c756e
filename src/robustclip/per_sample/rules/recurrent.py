"""``nn.RNN`` (tanh or relu), ``nn.LSTM`` and ``nn.GRU``: any number of layers, bidirectional,
batch first or not, with or without an initial state, the losses using the output sequence, the
final states, or both.

Every weight acts through a matrix product at each time step: ``gi_t = x_t W_ih^T + b_ih`` on
the layer's input and ``gh_t = h_{t-1} W_hh^T + b_hh`` on the previous hidden state (GRU keeps
them apart because its candidate gate multiplies ``gh`` by the reset gate). Given ``dL/dgi_t``
and ``dL/dgh_t``, per sample, ``grad W_ih_i = sum_t dgi_{i,t} (x) x_{i,t}`` and ``grad W_hh_i =
sum_t dgh_{i,t} (x) h_{i,t-1}``: outer-product terms over the time steps, as for ``nn.Linear``
over positions; the biases are sums over time. Those gradients come from ONE batched
recomputation of the recurrence from the recorded input (and initial state), with the cell's
equations written out (gate order and equations as in torch's documentation), and one backward
pass of the output gradients through it. No per-sample work; the extra cost is about one
forward and one backward of the layer, run step by step.

A recurrent layer returns the sequence and the final state(s), and the losses may use any of
them (a classifier often reads only ``h_n``). The rule's ``repack`` makes the engine see them
as one output: the hook packs all of them into one batch-first tensor and the layer returns
copies of pieces of it, equal in value and layout to what it computed, so one output gradient
holds the gradients of all of them.

Not modelled (the per-module fallback takes them, with the reason): dropout between layers
(its random mask is not recorded), LSTM projections (``proj_size``), packed sequences and
unbatched inputs (a call the rule cannot read is not recorded, and its parameters are then
found on the losses' graph outside any call: the engine falls back for the whole model).
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


def _unsupported(m: nn.RNNBase) -> str | None:
    if m.dropout > 0 and m.num_layers > 1:
        return f"dropout {m.dropout} between layers (its random mask is not recorded)"
    if getattr(m, "proj_size", 0) > 0:
        return "proj_size > 0 (LSTM projections)"
    return None


def _repack(m: nn.RNNBase, output: Any) -> tuple[Tensor, Any] | None:
    out, hidden = output
    if not isinstance(out, Tensor) or out.dim() != 3:
        return None  # a PackedSequence, or an unbatched input
    states = list(hidden) if isinstance(hidden, tuple) else [hidden]
    seq = out if m.batch_first else out.transpose(0, 1)
    b = seq.shape[0]
    parts = [seq.reshape(b, -1)] + [s.transpose(0, 1).reshape(b, -1) for s in states]
    packed = torch.cat(parts, 1)
    pieces = packed.split([p.shape[1] for p in parts], 1)
    seq2 = pieces[0].reshape(seq.shape)
    out2 = (seq2 if m.batch_first else seq2.transpose(0, 1)).contiguous()
    st2 = [p.reshape(b, s.shape[0], s.shape[2]).transpose(0, 1).contiguous() for p, s in zip(pieces[1:], states)]
    return packed, (out2, tuple(st2) if isinstance(hidden, tuple) else st2[0])


def _cell(m: nn.RNNBase, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if isinstance(m, nn.LSTM):
        assert c is not None
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if isinstance(m, nn.GRU):
        ir, iz, in_ = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    a = gi + gh
    return (torch.tanh(a) if m.nonlinearity == "tanh" else torch.relu(a)), None


@register(nn.GRU, _unsupported, full_call=True, repack=_repack)
@register(nn.LSTM, _unsupported, full_call=True, repack=_repack)
@register(nn.RNN, _unsupported, full_call=True, repack=_repack)
def recurrent_terms(
    module: nn.RNNBase,
    x: Tensor,
    grad_out: Tensor,
    names: frozenset[str],
    call: tuple[tuple[Any, ...], dict[str, Any]],
) -> dict[str, Term]:
    m = module
    a = inspect.signature(type(m).forward).bind(m, *call[0], **call[1]).arguments
    # recomputed in the parameters' precision (float32 at least), as for attention
    w0 = m.weight_ih_l0
    assert isinstance(w0, Tensor)
    cd = torch.promote_types(acc_dtype(a["input"].dtype), w0.dtype)
    inp = a["input"].detach().to(cd)
    if not m.batch_first:
        inp = inp.transpose(0, 1)
    b, t_len = inp.shape[:2]
    dirs, hid, layers = 2 if m.bidirectional else 1, m.hidden_size, m.num_layers
    lstm = isinstance(m, nn.LSTM)
    hx = a.get("hx")
    zeros = inp.new_zeros((layers * dirs, b, hid))
    if hx is None:
        h0, c0 = zeros, zeros
    elif lstm:
        h0, c0 = hx[0].detach().to(cd), hx[1].detach().to(cd)
    else:
        h0, c0 = hx.detach().to(cd), zeros
    n_states = 2 if lstm else 1
    sizes = [t_len * dirs * hid] + [layers * dirs * hid] * n_states
    g_parts = grad_out.split(sizes, 1)
    targets, grad_targets = [], []
    records: dict[str, tuple[Tensor, Tensor, list[Tensor], list[Tensor]]] = {}
    # leaves that require grad, so that every gi and gh lies on the graph of the outputs
    inp, h0, c0 = (v.detach().requires_grad_() for v in (inp, h0, c0))
    with torch.enable_grad():
        layer_in: Tensor = inp
        finals_h: list[Tensor] = []
        finals_c: list[Tensor] = []
        for layer in range(layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih = getattr(m, "weight_ih" + sfx).detach().to(cd)
                w_hh = getattr(m, "weight_hh" + sfx).detach().to(cd)
                b_ih = getattr(m, "bias_ih" + sfx).detach().to(cd) if m.bias else None
                b_hh = getattr(m, "bias_hh" + sfx).detach().to(cd) if m.bias else None
                gi = F.linear(layer_in, w_ih, b_ih)
                h: Tensor = h0[layer * dirs + d]
                c: Tensor | None = c0[layer * dirs + d]
                hs: list[Tensor] = [h] * t_len
                ghs: list[Tensor] = [h] * t_len
                prev: list[Tensor] = [h] * t_len
                for t in range(t_len) if d == 0 else reversed(range(t_len)):
                    prev[t] = h.detach()
                    ghs[t] = F.linear(h, w_hh, b_hh)
                    h, c = _cell(m, gi[:, t], ghs[t], h, c)
                    hs[t] = h
                outs.append(torch.stack(hs, 1))
                finals_h.append(h)
                if c is not None:
                    finals_c.append(c)
                records[sfx] = (layer_in.detach(), gi, ghs, prev)
            layer_in = torch.cat(outs, 2) if dirs == 2 else outs[0]
        targets = [layer_in, torch.stack(finals_h, 1)] + ([torch.stack(finals_c, 1)] if lstm else [])
        grad_targets = [g.reshape(tg.shape).to(tg.dtype) for g, tg in zip(g_parts, targets)]
        wanted = [s for s in records if any(n.endswith(s) for n in names)]
        inputs = [v for s in wanted for v in [records[s][1], *records[s][2]]]
        grads = list(torch.autograd.grad(targets, inputs, grad_targets, allow_unused=True))
    terms: dict[str, Term] = {}
    dt = grad_out.dtype
    for s in wanted:
        x_in, gi, ghs, prev = records[s]
        dgi = grads.pop(0)
        dghs = [grads.pop(0) for _ in ghs]
        dgi = torch.zeros_like(gi) if dgi is None else dgi
        dgh = torch.stack([torch.zeros_like(gi[:, 0]) if g is None else g for g in dghs], 1)
        hprev = torch.stack(prev, 1)
        n_g = gi.shape[-1]
        if "weight_ih" + s in names:
            terms["weight_ih" + s] = OuterTerm(dgi.unsqueeze(1), x_in.unsqueeze(1), n_g, getattr(m, "weight_ih" + s).shape, dt)
        if "weight_hh" + s in names:
            terms["weight_hh" + s] = OuterTerm(dgh.unsqueeze(1), hprev.unsqueeze(1), n_g, getattr(m, "weight_hh" + s).shape, dt)
        if "bias_ih" + s in names:
            terms["bias_ih" + s] = DenseTerm(sum_positions(dgi))
        if "bias_hh" + s in names:
            terms["bias_hh" + s] = DenseTerm(sum_positions(dgh))
    return terms
