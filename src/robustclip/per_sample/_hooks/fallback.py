"""Per-sample gradients of a module no rule covers: replay it per sample with torch.func.

The unit's recorded inputs are split by sample and its forward is replayed under
``vmap(vjp(functional_call(...)))``, with the recorded output gradients as cotangents. This
needs only the module, not the rest of the model, so a custom layer costs about one extra
forward and backward of that layer. The first replay of each unit is checked against the
recorded outputs (one host read); a unit whose replay cannot reproduce them (randomness, such
as dropout inside it, or mixing of samples) switches to *graph mode*: one backward per sample
through the unit's own part of the batch's graph, which reuses the real forward pass.

Per-sample gradients of a chunk are materialised and dropped after use: if the unit's
``B x params`` fit in the budget they are kept for the weighted sum, otherwise they are replayed
a second time with the weights.

:class:`Fallbacks` holds what the engine learns about each unit across steps (which take graph
mode); ``verify.py`` holds which replays have been checked.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils import _pytree as pytree

from robustclip._math import wide_dtype
from robustclip.per_sample._engine import row_sq_norms
from robustclip.per_sample._hooks.capture import Call, Unit
from robustclip.per_sample._hooks.verify import ReplayError, Verifier, check_replay_output
from robustclip.per_sample.rules._terms import DenseTerm, Term, zero_dropped

#: a block whose forward passes the engine does not record
Muted = Callable[[], AbstractContextManager[None]]

DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class PerSampleFallbackWarning(UserWarning):
    """A part of the model is not covered by a fast per-sample rule and takes a slower path."""


class Fallbacks:
    """Per-sample terms of the units no rule covers, and how each unit has behaved so far.

    A unit is replayed per sample (:class:`Replay`) unless it has dropout that is active, or a
    replay of it failed its first check: then it takes graph mode (:func:`graph_mode_terms`).
    """

    def __init__(self, units: list[Unit], verifier: Verifier, muted: Muted) -> None:
        self.verifier = verifier
        self.muted = muted
        #: units (by id) that take graph mode
        self.graph_mode: set[int] = set()
        self._dropouts = {id(u): [m for m in u.module.modules() if isinstance(m, DROPOUT)] for u in units if u.rule is None}

    def prepare(self, calls: list[Call]) -> bool:
        """Before the backward pass: units with active dropout take graph mode. Returns whether
        the backward pass must keep the batch's graph (graph mode needs it after the pass, and
        so does a first replay, which may switch to it)."""
        for c in calls:
            if any(m.training and m.p > 0 for m in self._dropouts[id(c.unit)]):
                self.graph_mode.add(id(c.unit))
        checked = self.verifier.replays_checked
        return any(id(c.unit) in self.graph_mode or id(c.unit) not in checked for c in calls)

    def terms(self, call: Call, grads: list[Tensor], batch: int, params: list[Tensor], budget: int) -> dict[int, Term]:
        """The terms of one call, by parameter index, from its output gradients ``grads``."""
        uid = id(call.unit)
        checked = self.verifier.replays_checked
        if uid not in self.graph_mode:
            try:
                rep = Replay(call, grads, batch, params, budget, uid not in checked, self.muted)
                rep.run()
            except ReplayError as e:
                if uid in checked:
                    raise ValueError(
                        f"the module '{call.unit.name}' could not be replayed per sample ({e}); it "
                        "uses randomness or mixes samples. Use engine='loop', or put its random "
                        "layers in eval mode."
                    ) from e
                warnings.warn(
                    f"robustclip: module '{call.unit.name}' cannot be replayed per sample ({e}); "
                    "its per-sample gradients now come from one backward per sample through its "
                    "part of the graph (exact, slower).",
                    PerSampleFallbackWarning,
                    stacklevel=6,
                )
                self.graph_mode.add(uid)
            else:
                checked.add(uid)
                return {idx: ReplayTerm(rep, idx) for idx in rep.idxs}
        return graph_mode_terms(call, grads, batch, params)


class Replay:
    """Per-sample gradients of one fallback call, for every trainable parameter of its subtree."""

    def __init__(
        self,
        call: Call,
        grads: list[Tensor],
        batch: int,
        params: list[Tensor],
        budget: int,
        check: bool,
        muted: Muted,
    ) -> None:
        self.call, self.batch, self.muted = call, batch, muted
        unit = call.unit
        self.idxs = sorted(set(unit.params.values()))
        self.pos = {idx: j for j, idx in enumerate(self.idxs)}
        self.names_of: dict[int, list[str]] = {}
        for n, idx in unit.params.items():
            self.names_of.setdefault(idx, []).append(n)
        self.vals = tuple(params[i].detach() for i in self.idxs)
        self.grads = grads
        numel = sum(v.numel() for v in self.vals)
        self.chunk = max(1, min(batch, budget // max(numel, 1)))
        self.keep = batch * numel <= budget
        self.stored: list[Tensor] | None = None
        self.sq: Tensor | None = None
        self.weights: dict[int, Tensor] = {}
        #: zero the rows of samples of weight 0 in the weighted sums (Clipper(nonfinite="drop_sample"))
        self.drop = False
        self._weighted: dict[int, Tensor] | None = None
        self.check = check
        leaves, self.spec = pytree.tree_flatten((call.args, call.kwargs))
        self.leaves = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
        self.batched = [
            i for i, t in enumerate(self.leaves) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch
        ]

    # -- the vmapped replay ------------------------------------------------------------------------
    def _per_sample(
        self, vals: tuple[Tensor, ...], xs: list[Tensor], gs: list[Tensor]
    ) -> tuple[tuple[Tensor, ...], list[Tensor]]:
        call = self.call
        mod = call.unit.module

        def f(v: tuple[Tensor, ...]) -> list[Tensor]:
            mapping = {n: t for idx, t in zip(self.idxs, v) for n in self.names_of[idx]}
            leaves = list(self.leaves)
            for i, x in zip(self.batched, xs):
                leaves[i] = x.unsqueeze(0)
            a, kw = pytree.tree_unflatten(leaves, self.spec)
            dev, on, dt = call.autocast or ("cpu", False, torch.bfloat16)
            with torch.autocast(dev, dtype=dt, enabled=on):
                out = functional_call(mod, mapping, tuple(a), kw)
            ol = pytree.tree_leaves(out)
            return [ol[i] for i in call.out_positions]

        # vjp is typed to return a triple too, which only has_aux=True gives
        primal, pull = cast(tuple[list[Tensor], Callable[..., Any]], vjp(f, vals))
        (g,) = pull([x.unsqueeze(0) for x in gs])
        return g, [p.squeeze(0) for p in primal]

    def _chunk(self, sl: slice) -> list[Tensor]:
        xs = [self.leaves[i][sl] for i in self.batched]
        gs = [g[sl] for g in self.grads]
        with self.muted():
            try:
                # made per call: a vmapped bound method kept on self would be a reference cycle
                # holding the recorded inputs until a garbage collection
                fn = vmap(self._per_sample, in_dims=(None, 0, 0), randomness="error")
                grads, primal = fn(self.vals, xs, gs)
            except RuntimeError as e:
                if "random" in str(e):
                    raise ReplayError(str(e)) from e
                raise
        if self.check:
            for got, ref, ver in zip(primal, self.call.out_values, self.call.out_versions):
                if ref._version == ver:  # an output changed in place later cannot be compared
                    check_replay_output(got, ref[sl])
        return list(grads)

    # -- what the engine asks -------------------------------------------------------------------------
    def run(self) -> None:
        """First pass: squared norms of every parameter, float64 and scaled as every norm of the
        hook engine (``norms.py``), and the gradients, if they fit."""
        dev = self.vals[0].device
        sq = torch.zeros(len(self.idxs), self.batch, dtype=wide_dtype(dev), device=dev)
        stored: list[list[Tensor]] = [[] for _ in self.idxs]
        for s in range(0, self.batch, self.chunk):
            sl = slice(s, min(s + self.chunk, self.batch))
            gs = self._chunk(sl)
            self.check = False
            for j, g in enumerate(gs):
                sq[j, sl] = row_sq_norms(g)
                if self.keep:
                    stored[j].append(g)
        self.sq = sq
        if self.keep:
            self.stored = [torch.cat(s) for s in stored]

    def materialize(self, idx: int, sl: slice) -> Tensor:
        if self.stored is not None:
            return self.stored[self.pos[idx]][sl]
        return self._chunk(sl)[self.pos[idx]]

    def weighted(self, idx: int) -> Tensor:
        if self.stored is not None:
            g = self.stored[self.pos[idx]]
            w = self.weights[idx]
            out: Tensor = torch.tensordot(w.to(g.dtype), zero_dropped(g, w, self.drop), dims=1)
            return out
        if self._weighted is None:
            # second replay, every parameter that wants a sum at once (all were told their
            # weights first; a parameter whose gradients the engine kept wants none)
            want = [j for j, i in enumerate(self.idxs) if i in self.weights]
            acc = {j: torch.zeros_like(self.vals[j]) for j in want}
            for s in range(0, self.batch, self.chunk):
                sl = slice(s, min(s + self.chunk, self.batch))
                gs = self._chunk(sl)
                for j in want:
                    w = self.weights[self.idxs[j]][sl]
                    acc[j] += torch.tensordot(w.to(gs[j].dtype), zero_dropped(gs[j], w, self.drop), dims=1)
            self._weighted = {self.idxs[j]: a for j, a in acc.items()}
        return self._weighted[idx]


class ReplayTerm(Term):
    def __init__(self, replay: Replay, idx: int) -> None:
        v = replay.vals[replay.pos[idx]]
        super().__init__(replay.batch, v.shape, v.dtype)
        self.replay, self.idx = replay, idx
        assert replay.sq is not None
        self.precomputed_sq = replay.sq[replay.pos[idx]]

    def materialize(self, sl: slice) -> Tensor:
        return self.replay.materialize(self.idx, sl)

    def prepare(self, w: Tensor) -> None:
        # the second replay computes every parameter of the module at once
        self.replay.weights[self.idx] = w

    def weighted(self, w: Tensor, *, drop: bool = False) -> Tensor:
        self.replay.weights[self.idx] = w
        self.replay.drop = drop  # the same for every parameter of the replay: one step's mode
        return self.replay.weighted(self.idx)


def graph_mode_terms(call: Call, grads: list[Tensor], batch: int, params: list[Tensor]) -> dict[int, Term]:
    """One backward per sample through the unit's part of the batch's own graph.

    Exact whatever the unit does (dropout included), at ``B`` backward passes of the unit; the
    graph must still be alive (the engine retains it for units in this mode).
    """
    idxs = sorted(set(call.unit.params.values()))
    ps = [params[i] for i in idxs]
    outs = list(call.out_edges)
    per: list[list[Tensor]] = [[] for _ in idxs]
    for i in range(batch):
        gi = []
        for g in grads:
            m = torch.zeros_like(g)
            m[i] = g[i]
            gi.append(m)
        got = torch.autograd.grad(outs, ps, grad_outputs=gi, retain_graph=True, allow_unused=True)
        for j, (p, g) in enumerate(zip(ps, got)):
            per[j].append(torch.zeros_like(p) if g is None else g)
    return {idx: DenseTerm(torch.stack(per[j])) for j, idx in enumerate(idxs)}

