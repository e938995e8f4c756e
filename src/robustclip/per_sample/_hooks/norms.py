"""Per-sample squared norms of one parameter, from its terms: the cost model and its strategies.

Phase 4 of the hook engine (``engine.py``). A parameter's terms (``rules/_terms.py``) describe its
per-sample gradients ``g_i`` lazily; :func:`choose` prices the ways to get ``||g_i||^2`` from them
and :func:`sq_norms` runs the cheapest:

* ``"keep"``: materialise every sample's gradient and keep it for the weighted sum. Chosen when
  it is no larger than the activations and output gradients it lets the engine free, because
  then it is the cheapest in time (one batched matmul replaces the weight-gradient matmul) *and*
  does not raise the peak memory. Always for dense terms (biases, normalisation scales).
* ``"index"``: the sort-based exact norm of a single embedding term, ``O(B T n_v)``.
* ``"ghost"``: the Gram form ``||g_i||^2 = sum_{a,b} <U_a U_b^T, V_a V_b^T>`` (Goodfellow,
  arXiv:1510.01799; Li et al., arXiv:2110.05679), when ``T^2 (n_u + n_v)`` beats materialising
  ``T n_u n_v``, as in mixed ghost clipping (Bu et al., arXiv:2205.10683).
* ``"chunks"``: materialise a chunk of samples at a time, take the norms, free it.

Every strategy returns float64 squared norms (``_engine.wide_dtype``) that are finite and
accurate for every finite gradient, also of norm 1e25 or 1e-25 in float32 or bfloat16 (whose
squares overflow above 1.8e19 and underflow below 1e-19 in float32): a materialised gradient,
an embedding's grouped rows and the factors of a single position are squared and summed in
float64 (``_engine.row_sq_norms``); the factors of a Gram over several positions are first
divided by each sample's largest magnitude, so that their float32 products cannot overflow,
and the scales go back in float64. Temporaries of one parameter stay below ``budget`` elements
(chunks of samples).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from robustclip._math import wide_dtype
from robustclip.per_sample._engine import float64_holds_squares, max_abs, row_sq_norms, scaled_by
from robustclip.per_sample.rules._terms import DenseTerm, OuterTerm, Term, gram, sum_materialized

#: the strategies :func:`choose` picks from (tests force each in turn)
STRATEGIES = ("keep", "ghost", "index", "chunks")


@dataclass
class Gathered:
    """What a step has gathered per parameter (by layout index) on its way to the weighted sums."""

    #: lazy per-sample gradients (the parameter's terms) still needed for the weighted sum
    terms: dict[int, list[Term]] = field(default_factory=dict)
    #: squared norms already taken, ``(B,)`` float64 (``wide_dtype``)
    sq: dict[int, Tensor] = field(default_factory=dict)
    #: per-sample gradients materialised and kept (``"keep"``), ``(B, *shape)``; they replace the terms
    kept: dict[int, Tensor] = field(default_factory=dict)
    #: how each parameter's norms were taken (a strategy, or ``"precomputed"``: a fallback's
    #: replay) and the predicted multiply-adds of its per-sample work against the plain
    #: backward's weight gradient (:func:`cost`), for ``robustclip.explain``
    how: dict[int, tuple[str, float, float]] = field(default_factory=dict)

    def add(self, terms: Mapping[int, Term]) -> None:
        """One more use of each parameter ``terms`` names (a call, a bare use)."""
        for idx, t in terms.items():
            self.terms.setdefault(idx, []).append(t)

    def take_norms(self, idx: int, p: Tensor, batch: int, budget: int, force: str | None = None) -> None:
        """Take parameter ``idx``'s norms from its terms now; what the strategy keeps replaces them."""
        terms = self.terms[idx]
        pre = len(terms) == 1 and terms[0].precomputed_sq is not None
        how = "precomputed" if pre else strategy(terms, batch, p, force)
        self.how[idx] = (how, *cost(terms, how))
        sq, kept = sq_norms(terms, batch, p, budget, force)
        self.sq[idx] = sq
        if kept is not None:
            self.kept[idx] = kept
            del self.terms[idx]  # frees the activations the terms held


def sq_norms(
    terms: Sequence[Term], batch: int, p: Tensor, budget: int, force: str | None = None
) -> tuple[Tensor, Tensor | None]:
    """Squared norms ``(B,)`` of one parameter's per-sample gradients, float64 (see the module
    docstring), and those gradients if the strategy keeps them. ``force`` (tests): a strategy
    of :data:`STRATEGIES` to use where it applies."""
    if len(terms) == 1 and terms[0].precomputed_sq is not None:
        return terms[0].precomputed_sq, None
    how = strategy(terms, batch, p, force)
    if how == "index":
        return index_sq_norms(cast(OuterTerm, terms[0])), None
    if how == "ghost":  # chosen only when every term is an OuterTerm
        return ghost_sq_norms(cast(Sequence[OuterTerm], terms), budget), None
    return materialized_sq_norms(terms, batch, p, budget, keep=how == "keep")


def strategy(terms: Sequence[Term], batch: int, p: Tensor, force: str | None = None) -> str:
    """The strategy for one parameter: the cost model's choice, or ``force`` where it applies."""
    keep_ok = batch * p.numel() * terms[0].dtype.itemsize <= sum(t.hold_bytes() for t in terms)
    if force in ("keep", "chunks"):
        return force
    if force == "ghost" and all(isinstance(t, OuterTerm) for t in terms):
        return "ghost"
    if force == "index" and len(terms) == 1 and isinstance(terms[0], OuterTerm) and terms[0].index:
        return "index"
    return choose(terms, keep_ok)


def choose(terms: Sequence[Term], keep_ok: bool) -> str:
    """The cost model (see the module docstring). ``keep_ok``: the parameter's per-sample
    gradients are no larger than the activations and output gradients its terms hold."""
    if all(isinstance(t, DenseTerm) for t in terms):
        return "keep"
    if keep_ok:
        return "keep"
    if not all(isinstance(t, OuterTerm) for t in terms):
        return "chunks"
    outer = [t for t in terms if isinstance(t, OuterTerm)]
    if len(outer) == 1 and outer[0].index:
        return "index"
    mat = sum(t.materialize_cost() for t in outer) + outer[0].batch * outer[0].numel
    return "ghost" if ghost_cost(outer) < mat else "chunks"


def ghost_cost(outer: Sequence[OuterTerm]) -> float:
    """Multiply-adds of the Gram norm: a single term prices its own Grams (a convolution's
    need not unfold), several pay every cross Gram."""
    if len(outer) == 1:
        return outer[0].ghost_cost()
    ghost = 0.0
    for a in outer:
        for b in outer:
            cu = a.n_u if not (a.index or b.index) else 1
            ghost += a.batch * a.K * a.T * b.T * (cu + a.n_v + 1)
    return ghost


def cost(terms: Sequence[Term], how: str) -> tuple[float, float]:
    """Predicted multiply-adds of one parameter's per-sample work under strategy ``how`` (its
    norms and its clipped sum), and of the plain backward's gradient of that parameter: the
    cost model's own counts, for ``robustclip.explain``. A fallback's replay (``precomputed``)
    is counted as three products per sample (the module's forward, and its backward for the
    input and for the parameter)."""
    plain = sum(t.materialize_cost() for t in terms)
    outer = [t for t in terms if isinstance(t, OuterTerm)]
    if how == "precomputed":
        return 3 * plain + plain, plain
    if how == "index":
        t = outer[0]
        return float(t.batch * t.K * t.T * t.n_v) + plain, plain
    if how == "ghost":
        return ghost_cost(outer) + plain, plain
    # keep: materialised once, the sum reads them; chunks: materialised again for the sum
    per = plain + terms[0].batch * terms[0].numel
    return (per if how == "keep" else 2 * per), plain


def ghost_sq_norms(terms: Sequence[OuterTerm], budget: int) -> Tensor:
    """``||sum_a g_{a,i}||^2`` from the factors only: ``sum_{a,b} <U_a U_b^T, V_a V_b^T>``.

    Each term's factors are divided, sample by sample, by their largest magnitudes ``s_u`` and
    ``s_v`` (an index factor by 1): the Grams of the scaled factors cannot overflow or
    underflow in float32, and each pair's Gram product is multiplied by its terms'
    ``s_u s_v`` in float64, where the scales of a float32 or bfloat16 gradient always fit."""
    batch = terms[0].batch
    tt = sum(t.T for t in terms)
    per_sample = 2 * terms[0].K * tt * tt + 1
    chunk = max(1, min(batch, budget // per_sample))
    wide = wide_dtype(terms[0].u.device)
    out = []
    for s in range(0, batch, chunk):
        sl = slice(s, min(s + chunk, batch))
        one = terms[0]
        if len(terms) == 1 and one.T == 1 and not one.index:
            # one position (2-D inputs): ||u (x) v||^2 = ||u||^2 ||v||^2 per block, squares
            # summed in float64, no product to scale against
            u, v = one.u_chunk(sl), one.v_chunk(sl)
            b, k = u.shape[:2]
            sq = row_sq_norms(u.reshape(b * k, -1)) * row_sq_norms(v.reshape(b * k, -1))
            out.append(sq.view(b, k).sum(1))
            continue
        su = [t.u_scale(sl) for t in terms]
        sv = [t.v_scale(sl) for t in terms]
        scales = [v.to(wide) if u is None else u.to(wide) * v.to(wide) for u, v in zip(su, sv)]
        if len(terms) == 1:  # a term may know a cheaper way to its own Grams
            val = terms[0].ghost_sq(sl, su[0], sv[0])
            out.append(val.to(wide) * scales[0].square())
            continue
        us = [_scaled_factor(t.u_chunk(sl), x) for t, x in zip(terms, su)]
        vs = [_scaled_factor(t.v_chunk(sl), x) for t, x in zip(terms, sv)]
        acc = None
        for a in range(len(terms)):
            for b in range(a, len(terms)):
                val = (gram(us[a], us[b]) * gram(vs[a], vs[b])).sum(dim=(1, 2, 3)).to(wide)
                val = val * (scales[a] * scales[b] if b != a else scales[a].square())
                if b != a:
                    val = 2 * val
                acc = val if acc is None else acc + val
        assert acc is not None
        out.append(acc)
    return out[0] if len(out) == 1 else torch.cat(out)


def _scaled_factor(x: Tensor, scale: Tensor | None) -> Tensor:
    """A dense factor divided by its per-sample scale; an index factor as it is."""
    return scaled_by(x, scale) if x.is_floating_point() else x


def index_sq_norms(term: OuterTerm) -> Tensor:
    """Exact squared norms of an embedding-like term in ``O(B T n_v)``, without ``T^2`` or ``n_u``.

    Sample ``i``'s gradient has one row per *distinct* index: the sum of the ``v`` rows that share
    it. Sorting each sample's indices finds, for every position, the group of equal indices it
    belongs to; scattering ``v`` into those groups and squaring gives the norm. No host sync:
    every shape is fixed. The sums and squares are float64 (see the module docstring).
    """
    u, v = term.u, term.v
    assert v is not None
    b, k, t = u.shape
    flat_u = u.reshape(b * k, t)
    srt, perm = flat_u.sort(dim=1)
    new = torch.ones_like(srt, dtype=torch.long)
    new[:, 1:] = (srt[:, 1:] != srt[:, :-1]).long()
    gid_sorted = new.cumsum(1) - 1
    gid = torch.empty_like(gid_sorted).scatter_(1, perm, gid_sorted)
    wide = wide_dtype(v.device)
    # float64 sums where they hold the squares, else v scaled by each sample's largest entry
    scale = None if float64_holds_squares(v) else max_abs(v)
    vv = (v.to(wide) if scale is None else scaled_by(v, scale)).reshape(b * k, t, -1)
    sums = torch.zeros_like(vv).scatter_add_(1, gid.unsqueeze(-1).expand_as(vv), vv)
    sq = sums.pow(2).sum(dim=(1, 2)).view(b, k).sum(1).to(wide)
    return sq if scale is None else sq * scale.to(wide).square()


def materialized_sq_norms(
    terms: Sequence[Term], batch: int, p: Tensor, budget: int, keep: bool
) -> tuple[Tensor, Tensor | None]:
    """Norms from materialised per-sample gradients, a chunk of samples at a time within
    ``budget``; with ``keep``, the gradients too."""
    per_sample = sum(t.transient_per_sample() for t in terms) + p.numel()
    chunk = max(1, min(batch, budget // per_sample))
    sqs, parts = [], []
    for s in range(0, batch, chunk):
        g = sum_materialized(terms, slice(s, min(s + chunk, batch)))
        sqs.append(row_sq_norms(g))
        if keep:
            parts.append(g)
    kept = (parts[0] if len(parts) == 1 else torch.cat(parts)) if keep else None
    return (sqs[0] if len(sqs) == 1 else torch.cat(sqs)), kept
