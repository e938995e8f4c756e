"""``nn.RNN`` (tanh or relu), ``nn.LSTM`` and ``nn.GRU``: any number of layers, bidirectional,
batch first or not, with or without an initial state, the losses using the output sequence, the
final states, or both.

Every weight acts through a matrix product at each time step: ``gi_t = x_t W_ih^T + b_ih`` on
the layer's input and ``gh_t = h_{t-1} W_hh^T + b_hh`` on the previous hidden state (GRU keeps
them apart because its candidate gate multiplies ``gh`` by the reset gate). Given ``dL/dgi_t``
and ``dL/dgh_t``, per sample, ``grad W_ih_i = sum_t dgi_{i,t} (x) x_{i,t}`` and ``grad W_hh_i =
sum_t dgh_{i,t} (x) h_{i,t-1}``: outer-product terms over the time steps, as for ``nn.Linear``
over positions; the biases are sums over time (for RNN and LSTM ``dgi_t == dgh_t``: one
tensor serves both weights). Those gradients come from the cells' equations (gate order as in
torch's documentation) and their derivatives written out, batched over samples. The top (or
only) layer's gates come from the hidden states the call returned, ``h_{t-1}`` for every ``t``
at once: two large matrix products and elementwise activations (for LSTM, the cell state's
scan is one fused op per step); the layers below, whose outputs the call does not return, are
recomputed step by step. The backward is a loop of a few fused ops per time step into buffers
allocated once. No per-sample work.

The gate pre-activations cost as many multiply-adds as the layer's own forward: that, not the
loop, is most of what the rule adds to a plain step (a 1-layer LSTM, 256 units, ``T = 32``,
``B = 64``: about 1.7x a plain step on one CPU thread, where the gate products are a third of
the rule's time). The layer's own kernel does not return its gates.

The solution also holds the gradients of the layer's input and initial states. The rule's
``repack`` routes the call's outputs through a backward node (:class:`_Recurrence`) that,
in the engine's pass, returns those instead of running the layer's backward again (the rule
sees the output gradient first: the tensor hook fires before the node). Every other backward
pass through that node (autograd's reference check, a plain ``backward()``) runs torch's own
backward of the layer, so the check compares the rule with torch, not with itself.

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
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from robustclip.per_sample._engine import acc_dtype
from robustclip.per_sample.rules import DenseTerm, OuterTerm, Term, register
from robustclip.per_sample.rules._util import sum_positions


def _unsupported(m: nn.RNNBase) -> str | None:
    if m.dropout > 0 and m.num_layers > 1:
        return f"dropout {m.dropout} between layers (its random mask is not recorded)"
    if getattr(m, "proj_size", 0) > 0:
        return "proj_size > 0 (LSTM projections)"
    return None


Call = tuple[tuple[Any, ...], dict[str, Any]]


def _pack(m: nn.RNNBase, seq: Tensor, states: list[Tensor]) -> Tensor:
    """The sequence (batch first) and the final states, ``(layers * dirs, B, H)`` each, as one
    ``(B, n)`` tensor: the layout of the output gradient the rule gets."""
    b = seq.shape[0]
    return torch.cat([seq.reshape(b, -1)] + [s.transpose(0, 1).reshape(b, -1) for s in states], 1)


class _Record:
    """One recorded call, held by its backward node: the call's arguments and, once the rule
    has solved the recurrence for an output gradient in the engine's pass, that gradient and
    the gradients of the layer's input and initial states."""

    __slots__ = ("__weakref__", "autocast", "call", "grads", "seq")

    def __init__(self, call: Call, autocast: tuple[str, bool, torch.dtype], seq: Tensor) -> None:
        self.call = call
        self.autocast = autocast
        #: the output sequence the layer computed, batch first, detached: the top layer's
        #: hidden states, from which the rule gets every gate at once
        self.seq = seq
        self.grads: tuple[Tensor, Tensor | None, Tensor | None, Tensor | None] | None = None


#: the records of the calls whose graph is alive, by the identity of their (args, kwargs)
_RECORDS: weakref.WeakValueDictionary[tuple[int, int], _Record] = weakref.WeakValueDictionary()


def _record_of(call: Call) -> _Record | None:
    rec = _RECORDS.get((id(call[0]), id(call[1])))
    return rec if rec is not None and rec.call[0] is call[0] and rec.call[1] is call[1] else None


def _arguments(m: nn.RNNBase, call: Call) -> tuple[Tensor, list[Tensor]]:
    """The call's input and initial states (an empty list for none)."""
    a = inspect.signature(type(m).forward).bind(m, *call[0], **call[1]).arguments
    hx = a.get("hx")
    return a["input"], [] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]


def _native(m: nn.RNNBase, inp: Tensor, hx: list[Tensor], weights: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The layer's own computation (torch's kernel) from its input, states and weights."""
    dirs = 2 if m.bidirectional else 1
    b = inp.shape[0] if m.batch_first else inp.shape[1]
    if not hx:
        zeros = inp.new_zeros((m.num_layers * dirs, b, m.hidden_size))
        hx = [zeros, zeros] if isinstance(m, nn.LSTM) else [zeros]
    rest = (weights, m.bias, m.num_layers, 0.0, m.training, m.bidirectional, m.batch_first)
    if isinstance(m, nn.LSTM):
        out, h, c = torch.lstm(inp, (hx[0], hx[1]), *rest)
        return out, [h, c]
    fn = torch.gru if isinstance(m, nn.GRU) else torch.rnn_tanh if m.nonlinearity == "tanh" else torch.rnn_relu
    out, h = fn(inp, hx[0], *rest)
    return out, [h]


def _engine_needs(t: Tensor) -> bool:
    """Whether the running backward pass wants a gradient for leaf ``t`` (torch answers only
    for leaves it does not capture; otherwise: yes)."""
    try:
        return bool(torch._C._will_engine_execute_node(get_gradient_edge(t).node))
    except RuntimeError:
        return True


class _Recurrence(torch.autograd.Function):
    """The packed outputs of one call, with a backward that reuses the rule's work.

    In the engine's backward pass the rule gets the packed output gradient first (the tensor
    hook on the output fires before the node that produced it) and solves the recurrence for
    its terms, which gives the gradients of the layer's input and initial states on the way:
    this node then returns those (one matmul for the input, done by the rule) instead of
    running the layer's backward again. Any other backward pass (autograd's reference check,
    a plain ``backward()``, a call the rule did not solve, parameter gradients requested) runs
    torch's own backward of the layer, recomputed from the saved inputs.
    """

    @staticmethod
    def forward(
        ctx: Any, rec: _Record, m: nn.RNNBase, seq: Tensor, states: list[Tensor], n_hx: int, inp: Tensor, *rest: Tensor
    ) -> Tensor:
        ctx.rec, ctx.m, ctx.n_hx = rec, m, n_hx
        ctx.save_for_backward(inp, *rest)
        return _pack(m, seq, states)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        inp, *rest = ctx.saved_tensors
        m, n_hx, rec = ctx.m, ctx.n_hx, ctx.rec
        hx, weights = rest[:n_hx], rest[n_hx:]
        needs = ctx.needs_input_grad[5:]
        head: tuple[None, ...] = (None,) * 5
        got = rec.grads
        if got is not None and got[0] is grad and not any(n and _engine_needs(w) for n, w in zip(needs[1 + n_hx :], weights)):
            rec.grads = None
            _, d_in, dh0, dc0 = got
            dx = None if d_in is None or not needs[0] else (d_in if m.batch_first else d_in.transpose(0, 1)).to(inp.dtype)
            dstates = [dh0, dc0][:n_hx]
            d_hx = [d.to(h.dtype) if n and d is not None else None for d, h, n in zip(dstates, hx, needs[1:])]
            return (*head, dx, *d_hx, *(None,) * len(weights))
        dev, enabled, dtype = rec.autocast
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip([inp, *rest], needs)]
            out, states = _native(m, leaves[0], leaves[1 : 1 + n_hx], leaves[1 + n_hx :])
            packed = _pack(m, out if m.batch_first else out.transpose(0, 1), states)
            wanted = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(packed, wanted, grad.to(packed.dtype), allow_unused=True))
        return (*head, *(next(grads) if t.requires_grad else None for t in leaves))


def _repack(m: nn.RNNBase, output: Any, call: Call) -> tuple[Tensor, Any] | None:
    out, hidden = output
    if not isinstance(out, Tensor) or out.dim() != 3:
        return None  # a PackedSequence, or an unbatched input
    states = list(hidden) if isinstance(hidden, tuple) else [hidden]
    seq = out if m.batch_first else out.transpose(0, 1)
    inp, hx = _arguments(m, call)
    dev = out.device.type
    rec = _Record(call, (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)), seq.detach())
    _RECORDS[(id(call[0]), id(call[1]))] = rec
    weights = [getattr(m, n) for n in m._flat_weights_names]
    # Function.apply is untyped in torch's stubs; it returns forward's Tensor
    packed: Tensor = _Recurrence.apply(  # type: ignore[no-untyped-call]
        rec, m, seq.detach(), [s.detach() for s in states], len(hx), inp, *hx, *weights
    )
    b = seq.shape[0]
    pieces = packed.split([seq[0].numel()] + [s[:, 0].numel() for s in states], 1)
    seq2 = pieces[0].reshape(seq.shape)
    out2 = (seq2 if m.batch_first else seq2.transpose(0, 1)).contiguous()
    st2 = [p.reshape(b, s.shape[0], s.shape[2]).transpose(0, 1).contiguous() for p, s in zip(pieces[1:], states)]
    return packed, (out2, tuple(st2) if isinstance(hidden, tuple) else st2[0])


# -- the recurrence and its backward, by hand ---------------------------------------------------------------
#
# Each direction of each layer runs in *processing order* (a reverse direction sees its input
# flipped in time), batch first. The forward loop keeps what the backward needs (gate
# activations, cell states, hidden states); the backward loop is the cells' derivative written
# out, a few fused ops per step. Pairs (u_t, v_t) of a term may come in any order of t, so the
# terms of a reverse direction use its flipped input as it is.


class _Weights:
    """One direction of one layer's parameters, detached, in the computation dtype."""

    def __init__(self, m: nn.RNNBase, sfx: str, cd: torch.dtype) -> None:
        def get(name: str) -> Tensor | None:
            w = getattr(m, name + sfx, None)
            return w.detach().to(cd) if isinstance(w, Tensor) else None

        w_ih, w_hh = get("weight_ih"), get("weight_hh")
        assert w_ih is not None and w_hh is not None
        self.w_ih, self.w_hh = w_ih, w_hh
        self.b_ih, self.b_hh = get("bias_ih"), get("bias_hh")


def _project(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x W^T + b`` over every (sample, step) at once: ``(B, T, n) -> (B, T, rows)``."""
    b_, t_ = x.shape[:2]
    x2 = x.reshape(b_ * t_, -1)
    out = torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())
    return out.view(b_, t_, -1)


def _both_biases(w: _Weights) -> Tensor | None:
    if w.b_ih is None or w.b_hh is None:
        return None
    return w.b_ih + w.b_hh


class _Direction:
    """The forward pass of one direction, what its backward needs, and its gate gradients.

    With the direction's outputs ``out`` known (the top layer: the call returned them), every
    gate comes from ``h_{t-1}`` at once: two large matrix products over all ``(sample, step)``
    pairs and elementwise activations, and for LSTM the cell state's scan ``c_t = f_t c_{t-1} +
    i_t g_t`` (one fused op per step). Without them (a layer below the top, whose outputs the
    call does not return) the recurrence runs step by step.
    """

    def __init__(self, kind: str, x: Tensor, h0: Tensor, c0: Tensor, w: _Weights, out: Tensor | None = None) -> None:
        self.kind, self.x, self.w = kind, x, w
        b, t_len = x.shape[:2]
        hid = h0.shape[-1]
        if out is not None:
            self.h_prev = torch.cat([h0.unsqueeze(1), out[:, :-1]], 1)  # h_0 .. h_{T-1}
            self.out = out
            self._from_outputs(kind, hid, c0)
            return
        hbuf = x.new_empty((b, t_len + 1, hid))  # h_0 .. h_T
        hbuf[:, 0] = h0
        w_hh_t = w.w_hh.t()
        if kind == "LSTM":
            pre = _project(x, w.w_ih, _both_biases(w))
            act = torch.empty_like(pre)  # sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
            cbuf = x.new_empty((b, t_len + 1, hid))
            cbuf[:, 0] = c0
            tc = x.new_empty((b, t_len, hid))  # tanh(c_t)
            for t in range(t_len):
                a = act[:, t]
                z = torch.addmm(pre[:, t], hbuf[:, t], w_hh_t)
                torch.sigmoid(z, out=a)
                torch.tanh(z[:, 2 * hid : 3 * hid], out=a[:, 2 * hid : 3 * hid])
                torch.addcmul(a[:, : hid] * a[:, 2 * hid : 3 * hid], a[:, hid : 2 * hid], cbuf[:, t], out=cbuf[:, t + 1])
                torch.tanh(cbuf[:, t + 1], out=tc[:, t])
                torch.mul(a[:, 3 * hid :], tc[:, t], out=hbuf[:, t + 1])
            self.act, self.c_prev, self.tc = act, cbuf[:, :-1], tc
        elif kind == "GRU":
            gi = _project(x, w.w_ih, w.b_ih)
            gh = torch.empty_like(gi)
            rz = x.new_empty((b, t_len, 2 * hid))
            n = x.new_empty((b, t_len, hid))
            for t in range(t_len):
                h = hbuf[:, t]
                g = torch.mm(h, w_hh_t) if w.b_hh is None else torch.addmm(w.b_hh, h, w_hh_t)
                gh[:, t] = g
                torch.sigmoid(gi[:, t, : 2 * hid] + g[:, : 2 * hid], out=rz[:, t])
                torch.tanh(torch.addcmul(gi[:, t, 2 * hid :], rz[:, t, :hid], g[:, 2 * hid :]), out=n[:, t])
                torch.addcmul(n[:, t], rz[:, t, hid:], h - n[:, t], out=hbuf[:, t + 1])
            self.gh, self.rz, self.n = gh, rz, n
        else:
            pre = _project(x, w.w_ih, _both_biases(w))
            for t in range(t_len):
                z = torch.addmm(pre[:, t], hbuf[:, t], w_hh_t)
                if kind == "RNN_TANH":
                    torch.tanh(z, out=hbuf[:, t + 1])
                else:
                    torch.clamp_min(z, 0, out=hbuf[:, t + 1])
        # contiguous: the weight_hh term's factor, read whole by the engine
        self.h_prev, self.out = hbuf[:, :-1].contiguous(), hbuf[:, 1:]

    def _from_outputs(self, kind: str, hid: int, c0: Tensor) -> None:
        x, w, h_prev = self.x, self.w, self.h_prev
        if kind == "LSTM":
            act = _project(x, w.w_ih, _both_biases(w))
            act.view(-1, 4 * hid).addmm_(h_prev.reshape(-1, hid), w.w_hh.t())
            g = act[..., 2 * hid : 3 * hid]
            tg = torch.tanh(g)
            act.sigmoid_()
            g.copy_(tg)
            i, f = act[..., :hid], act[..., hid : 2 * hid]
            ig = i * g
            b, t_len = x.shape[:2]
            cbuf = x.new_empty((b, t_len + 1, hid))  # c_0 .. c_T
            cbuf[:, 0] = c0
            for t in range(t_len):
                torch.addcmul(ig[:, t], f[:, t], cbuf[:, t], out=cbuf[:, t + 1])
            self.act, self.c_prev, self.tc = act, cbuf[:, :-1], torch.tanh(cbuf[:, 1:])
        elif kind == "GRU":
            gi = _project(x, w.w_ih, w.b_ih)
            gh = _project(h_prev, w.w_hh, w.b_hh)
            self.rz = torch.sigmoid(gi[..., : 2 * hid] + gh[..., : 2 * hid])
            self.n = torch.tanh(torch.addcmul(gi[..., 2 * hid :], self.rz[..., :hid], gh[..., 2 * hid :]))
            self.gh = gh

    def backward(self, d_seq: Tensor, dh_n: Tensor, dc_n: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Given ``dL/dh_t`` from outside the recurrence (processing order) and the final
        states' gradients: ``dL/dgi``, ``dL/dgh`` (``(B, T, gates)``, one tensor for both where
        they are equal) and the initial states' gradients.

        Each step is a few fused ops into buffers allocated once: the matrix product that
        carries ``dh`` back through ``W_hh`` and elementwise products with factors computed
        for all steps beforehand."""
        b, t_len, _ = self.x.shape
        hid = self.h_prev.shape[-1]
        w_hh = self.w.w_hh
        dh = d_seq[:, -1] + dh_n
        if self.kind == "LSTM":
            act = self.act
            i, f, g, o = act.split(hid, -1)
            tc = self.tc
            p = torch.empty_like(act)  # dL/dgate = (dc, dc, dc, dh) * p
            torch.mul(g, i * (1 - i), out=p[..., :hid])
            torch.mul(self.c_prev, f * (1 - f), out=p[..., hid : 2 * hid])
            torch.mul(i, 1 - g * g, out=p[..., 2 * hid : 3 * hid])
            torch.mul(tc, o * (1 - o), out=p[..., 3 * hid :])
            k = o * (1 - tc * tc)  # dc_t += dh_t * k_t
            dg = torch.empty_like(act)
            dc = dc_n.clone() if dc_n is not None else torch.zeros_like(dh)
            for t in reversed(range(t_len)):
                if t < t_len - 1:
                    torch.addmm(d_seq[:, t], dg[:, t + 1], w_hh, out=dh)
                    dc.mul_(f[:, t + 1])
                dc.addcmul_(dh, k[:, t])
                torch.mul(p[:, t, : 3 * hid].view(b, 3, hid), dc.unsqueeze(1), out=dg[:, t, : 3 * hid].view(b, 3, hid))
                torch.mul(p[:, t, 3 * hid :], dh, out=dg[:, t, 3 * hid :])
            return dg, dg, dg[:, 0] @ w_hh, dc.mul_(f[:, 0])
        if self.kind == "GRU":
            r, z = self.rz.split(hid, -1)
            n = self.n
            qn = (1 - z) * (1 - n * n)
            p = torch.empty_like(self.gh)  # dL/dgi = dh * p
            torch.mul(qn, self.gh[..., 2 * hid :] * r * (1 - r), out=p[..., :hid])
            torch.mul(self.h_prev - n, z * (1 - z), out=p[..., hid : 2 * hid])
            p[..., 2 * hid :] = qn
            rfull = torch.ones_like(p)  # dL/dgh = dL/dgi * (1, 1, r)
            rfull[..., 2 * hid :] = r
            dgi, dgh = torch.empty_like(p), torch.empty_like(p)
            dz = torch.empty_like(dh)
            for t in reversed(range(t_len)):
                if t < t_len - 1:
                    torch.mul(dh, z[:, t + 1], out=dz)
                    torch.addmm(d_seq[:, t], dgh[:, t + 1], w_hh, out=dh).add_(dz)
                torch.mul(p[:, t].view(b, 3, hid), dh.unsqueeze(1), out=dgi[:, t].view(b, 3, hid))
                torch.mul(dgi[:, t], rfull[:, t], out=dgh[:, t])
            return dgi, dgh, torch.addcmul(dgh[:, 0] @ w_hh, dh, z[:, 0]), None
        out = self.out
        deriv = 1 - out * out if self.kind == "RNN_TANH" else (out > 0).to(out.dtype)
        dg = torch.empty_like(out)
        for t in reversed(range(t_len)):
            if t < t_len - 1:
                torch.addmm(d_seq[:, t], dg[:, t + 1], w_hh, out=dh)
            torch.mul(dh, deriv[:, t], out=dg[:, t])
        return dg, dg, dg[:, 0] @ w_hh, None


class _Solved:
    """Per (layer, direction) suffix: the input, previous hidden states and gate gradients,
    in processing order; and the gradients of the layer's input and initial states."""

    def __init__(self) -> None:
        self.parts: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.d_input: Tensor | None = None
        self.dh0: Tensor | None = None
        self.dc0: Tensor | None = None


def _kind(m: nn.RNNBase) -> str:
    if isinstance(m, nn.LSTM):
        return "LSTM"
    if isinstance(m, nn.GRU):
        return "GRU"
    return "RNN_TANH" if m.nonlinearity == "tanh" else "RNN_RELU"


def _solve(
    m: nn.RNNBase,
    inp: Tensor,
    h0: Tensor,
    c0: Tensor,
    grad: Tensor,
    cd: torch.dtype,
    input_grad: bool,
    seq: Tensor | None,
) -> _Solved:
    """The recurrence forward (bottom up) and backward (top down) for a batch-first input
    ``inp`` ``(B, T, in)``, initial states ``(layers * dirs, B, H)`` and the packed output
    gradient ``grad`` (see :func:`_repack`), in dtype ``cd``. ``seq``: the layer's output
    sequence (batch first), when known: the top layer's hidden states, not recomputed."""
    kind = _kind(m)
    b, t_len = inp.shape[:2]
    dirs, hid, layers = 2 if m.bidirectional else 1, m.hidden_size, m.num_layers
    n_states = 2 if kind == "LSTM" else 1
    sizes = [t_len * dirs * hid] + [layers * dirs * hid] * n_states
    g_parts = [g.to(cd) for g in grad.split(sizes, 1)]
    g_seq = g_parts[0].reshape(b, t_len, dirs * hid)
    g_h = g_parts[1].reshape(b, layers * dirs, hid)
    g_c = g_parts[2].reshape(b, layers * dirs, hid) if kind == "LSTM" else None
    # forward, bottom up
    runs: list[list[_Direction]] = []
    layer_in = inp
    for layer in range(layers):
        run = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            x = layer_in.flip(1) if d else layer_in
            out = None
            if seq is not None and layer == layers - 1:
                out = seq[..., d * hid : (d + 1) * hid].to(cd)
                out = out.flip(1) if d else out
            run.append(_Direction(kind, x, h0[layer * dirs + d], c0[layer * dirs + d], _Weights(m, sfx, cd), out))
        runs.append(run)
        if layer + 1 < layers:
            outs = [r.out.flip(1) if d else r.out for d, r in enumerate(run)]
            layer_in = torch.cat(outs, 2) if dirs == 2 else outs[0].contiguous()
    # backward, top down: the sequence gradient of a layer below comes from the layer above
    solved = _Solved()
    dh0s: list[Tensor] = [g_h[:, 0]] * (layers * dirs)
    dc0s: list[Tensor] = [g_h[:, 0]] * (layers * dirs)
    seq_grad = g_seq
    for layer in reversed(range(layers)):
        d_in: Tensor | None = None
        for d, r in enumerate(runs[layer]):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            idx = layer * dirs + d
            ds = seq_grad[..., d * hid : (d + 1) * hid]
            ds = ds.flip(1) if d else ds
            dgi, dgh, dh0, dc0 = r.backward(ds, g_h[:, idx], g_c[:, idx] if g_c is not None else None)
            solved.parts[sfx] = (r.x, r.h_prev, dgi, dgh)
            dh0s[idx] = dh0
            if dc0 is not None:
                dc0s[idx] = dc0
            if layer > 0 or input_grad:
                dx = _project(dgi, r.w.w_ih.t(), None)
                dx = dx.flip(1) if d else dx
                d_in = dx if d_in is None else d_in + dx
        if layer > 0:
            assert d_in is not None
            seq_grad = d_in
        else:
            solved.d_input = d_in
    solved.dh0 = torch.stack(dh0s)
    solved.dc0 = torch.stack(dc0s) if kind == "LSTM" else None
    return solved


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
    raw, hx_list = _arguments(m, call)
    # computed in the parameters' precision (float32 at least), as for attention
    w0 = m.weight_ih_l0
    assert isinstance(w0, Tensor)
    cd = torch.promote_types(acc_dtype(raw.dtype), w0.dtype)
    inp = raw.detach().to(cd)
    if not m.batch_first:
        inp = inp.transpose(0, 1)
    inp = inp.contiguous()
    b = inp.shape[0]
    dirs, hid, layers = 2 if m.bidirectional else 1, m.hidden_size, m.num_layers
    zeros = inp.new_zeros((layers * dirs, b, hid))
    h0 = hx_list[0].detach().to(cd) if hx_list else zeros
    c0 = hx_list[1].detach().to(cd) if len(hx_list) > 1 else zeros
    rec = _record_of(call)
    seq = rec.seq if rec is not None else None
    solved = _solve(m, inp, h0, c0, grad_out, cd, rec is not None and raw.requires_grad, seq)
    if rec is not None:  # for the call's backward node, which runs next (see _Recurrence)
        rec.grads = (grad_out, solved.d_input, solved.dh0, solved.dc0)
    terms: dict[str, Term] = {}
    dt = grad_out.dtype
    for s, (x_in, h_prev, dgi, dgh) in solved.parts.items():
        n_g = dgi.shape[-1]
        if "weight_ih" + s in names:
            terms["weight_ih" + s] = OuterTerm(dgi.unsqueeze(1), x_in.unsqueeze(1), n_g, getattr(m, "weight_ih" + s).shape, dt)
        if "weight_hh" + s in names:
            terms["weight_hh" + s] = OuterTerm(dgh.unsqueeze(1), h_prev.unsqueeze(1), n_g, getattr(m, "weight_hh" + s).shape, dt)
        bias_i = sum_positions(dgi) if "bias_ih" + s in names or (dgh is dgi and "bias_hh" + s in names) else None
        if "bias_ih" + s in names:
            assert bias_i is not None
            terms["bias_ih" + s] = DenseTerm(bias_i)
        if "bias_hh" + s in names:
            terms["bias_hh" + s] = DenseTerm(bias_i if dgh is dgi and bias_i is not None else sum_positions(dgh))
    return terms
