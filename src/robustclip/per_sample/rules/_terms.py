"""What a layer rule hands the hook engine: each sample's gradient of one parameter, in factored form.

A rule never returns ``B x params`` per-sample gradients. It returns a *term* per parameter and
per call of the layer, a lazy description of the per-sample gradients ``g_i`` from which the
engine can get, at its choice,

* the per-sample squared norms ``||g_i||^2`` (several ways, priced by the cost model
  of ``_hooks/norms.py``),
* the per-sample gradients of a chunk of samples (to check, or to keep when that is cheaper),
* the weighted sum ``sum_i w_i g_i`` (the clipped gradient), in one matmul or scatter.

Two kinds of term cover every layer robustclip knows:

:class:`OuterTerm`
    ``g_i = sum_{k,t} u_{i,k,t} (x) v_{i,k,t}`` reshaped to the parameter: a sum of outer
    products over ``T`` positions (tokens, pixels) in ``K`` independent blocks (convolution
    groups). Linear: ``u`` = output gradient, ``v`` = input; Conv: ``v`` = unfolded input
    patches; Embedding: ``u`` = one-hot of the token index (stored as the index), ``v`` = output
    gradient. Its squared norm has the "ghost" form ``<U_i U_i^T, V_i V_i^T>`` (Goodfellow 2015,
    arXiv:1510.01799; Li et al., arXiv:2110.05679, for sequences) that costs ``T^2 (n_u + n_v)``
    instead of materialising ``T n_u n_v`` (Bu et al., mixed ghost clipping, arXiv:2205.10683).
:class:`DenseTerm`
    the per-sample gradients themselves, ``(B, *shape)``, when they are no larger than the
    activations they come from (biases, normalisation scales, fallbacks).

Several terms for the same parameter (tied embeddings, a layer called twice) add up: the
per-sample gradient is their sum, and the ghost form then needs the cross Grams
``<U_a U_b^T, V_a V_b^T>``, which :func:`gram` computes for any pair of dense or index factors.

Grams take each factor divided by a per-sample scale (its largest magnitude,
``_engine.max_abs``), so that a float32 product of an exploding gradient's factors (1e25 x
1e25) cannot overflow and a vanishing one's cannot underflow; the norms code puts the scales
back in float64.

Weighted sums take ``drop`` (``Clipper(nonfinite="drop_sample")``): only then are the rows of a
sample of weight 0 zeroed in every factor (:func:`zero_dropped`, :func:`scale_rows`), since a
dropped sample may hold NaN and ``0 * NaN`` is NaN. Without it a non-finite sample has a NaN
weight, the sum is NaN, and the clipper skips the step: zeroing would change nothing there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from robustclip._kernels import matmul
from robustclip.per_sample._engine import acc_dtype, max_abs, scaled_by


class Term:
    """One use of one parameter by one call: the per-sample gradients ``g_i``, lazily."""

    #: squared norms computed on the way (fallback replays), or None
    precomputed_sq: Tensor | None = None

    def __init__(self, batch: int, shape: torch.Size, dtype: torch.dtype) -> None:
        self.batch = batch
        self.shape = torch.Size(shape)
        self.dtype = dtype  # the dtype the layer computed in (bf16 under autocast)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def hold_bytes(self) -> int:
        """Bytes of activations and output gradients this term keeps alive."""
        return 0

    def materialize(self, sl: slice) -> Tensor:
        """Per-sample gradients of samples ``sl``: ``(b, *shape)``."""
        raise NotImplementedError

    def transient_per_sample(self) -> int:
        """Elements per sample that :meth:`materialize` allocates (its output and scratch)."""
        return self.numel

    def prepare(self, w: Tensor) -> None:
        """Told every term's weights before any sum is taken (terms that share work across
        parameters, like a replayed module, need them all at once)."""

    def weighted(self, w: Tensor, *, drop: bool = False) -> Tensor:
        """``sum_i w_i g_i`` (shape ``shape``) for weights ``w`` of shape ``(B,)``; with
        ``drop``, a sample of weight 0 adds exactly 0 even where it holds NaN."""
        raise NotImplementedError

    def add_weighted_(self, out: Tensor, w: Tensor, *, drop: bool = False) -> None:
        """``out += sum_i w_i g_i``; subclasses fuse the sum into ``out`` when they can."""
        out.add_(self.weighted(w, drop=drop).to(out.dtype))

    def materialize_cost(self) -> float:
        """Multiply-adds to materialise every sample's gradient."""
        return float(self.batch * self.numel)


class DenseTerm(Term):
    """Per-sample gradients already materialised: ``g`` of shape ``(B, *shape)``."""

    def __init__(self, g: Tensor) -> None:
        super().__init__(g.shape[0], g.shape[1:], g.dtype)
        self.g = g

    def hold_bytes(self) -> int:
        return self.g.numel() * self.g.element_size()

    def materialize(self, sl: slice) -> Tensor:
        return self.g[sl]

    def weighted(self, w: Tensor, *, drop: bool = False) -> Tensor:
        out: Tensor = torch.tensordot(w.to(self.g.dtype), zero_dropped(self.g, w, drop), dims=1)
        return out

    def add_weighted_(self, out: Tensor, w: Tensor, *, drop: bool = False) -> None:
        add_weighted_rows_(out, self.g, w, drop)


def zero_dropped(x: Tensor, w: Tensor, drop: bool) -> Tensor:
    """``x`` with the rows of the samples of weight 0 set to exactly 0 if ``drop``, else ``x``.

    A dropped sample (``Clipper(nonfinite="drop_sample")``) has weight 0 and may hold NaN or inf
    in any factor of its gradient; ``0 * NaN`` is NaN, and a matmul over the batch would spread
    it to the whole sum. In that mode every factor that enters a weighted sum goes through this
    (one elementwise pass, no host read)."""
    if not drop:
        return x
    return torch.where((w == 0).view(-1, *(1,) * (x.dim() - 1)), 0, x)


def scale_rows(x: Tensor, w: Tensor, drop: bool) -> Tensor:
    """``w_i x[i]``; with ``drop``, exactly 0 where ``w_i == 0`` even if ``x[i]`` is not finite."""
    wv = w.to(x.dtype).view(-1, *(1,) * (x.dim() - 1))
    if not drop:
        return x * wv
    return torch.where(wv == 0, 0, x * wv)


def add_weighted_rows_(out: Tensor, g: Tensor, w: Tensor, drop: bool = False) -> None:
    """``out += sum_i w_i g[i]`` in one matrix-vector product; with ``drop``, rows of weight 0
    add exactly 0."""
    g = zero_dropped(g, w, drop)
    if g.dtype == out.dtype and out.is_contiguous():
        out.view(-1).addmv_(g.reshape(g.shape[0], -1).t(), w.to(g.dtype))
    else:
        out.add_(torch.tensordot(w.to(g.dtype), g, dims=1).to(out.dtype))


class OuterTerm(Term):
    """``g_i = reshape(sum_{k,t} u[i,k,t] (x) v[i,k,t], shape)``; see the module docstring.

    Args:
        u: ``(B, K, T, n_u)`` dense factor, or ``(B, K, T)`` integer indices into ``n_u`` (a
            one-hot factor stored as its index; rows to ignore must have ``v`` zeroed).
        v: ``(B, K, T, n_v)`` dense factor.
        n_u: size of the ``u`` side (needed for index factors).
        shape: the parameter's shape; ``(K, n_u, n_v)`` must reshape to it.
    """

    def __init__(self, u: Tensor, v: Tensor | None, n_u: int, shape: torch.Size, dtype: torch.dtype) -> None:
        super().__init__(u.shape[0], shape, dtype)
        self.u = u
        self.v = v
        self.index = not u.is_floating_point()
        self.n_u = int(n_u)

    # -- geometry (subclasses with lazy factors override these) -------------------------------
    @property
    def K(self) -> int:  # noqa: N802 - the paper's symbol
        return self.u.shape[1]

    @property
    def T(self) -> int:  # noqa: N802
        return self.u.shape[2]

    @property
    def n_v(self) -> int:
        return self.numel // (self.K * self.n_u)

    def u_chunk(self, sl: slice) -> Tensor:
        return self.u[sl]

    def v_chunk(self, sl: slice) -> Tensor:
        assert self.v is not None
        return self.v[sl]

    def u_scale(self, sl: slice) -> Tensor | None:
        """The largest magnitude of each sample's ``u`` (``(b,)``), or None for an index factor
        (a one-hot row needs no scaling)."""
        return None if self.index else max_abs(self.u_chunk(sl))

    def v_scale(self, sl: slice) -> Tensor:
        return max_abs(self.v_chunk(sl))

    def u_gram(self, sl: slice, scale: Tensor | None = None) -> Tensor:
        """``<u_t, u_s>`` for samples ``sl``, each sample's ``u`` divided by its ``scale``
        (``(b,)``, None: 1): ``(b, K, T, T)`` in float32 at least."""
        return self_gram(self.u_chunk(sl), scale)

    def v_gram(self, sl: slice, scale: Tensor | None = None) -> Tensor:
        return self_gram(self.v_chunk(sl), scale)

    def ghost_sq(self, sl: slice, u_scale: Tensor | None = None, v_scale: Tensor | None = None) -> Tensor:
        """``||g_i||^2`` of samples ``sl`` from this term's own Grams, ``<U_i U_i^T, V_i V_i^T>``,
        with each sample's factors divided by ``u_scale`` and ``v_scale`` (``(b,)``, None: 1;
        the caller multiplies the scales back in float64)."""
        out: Tensor = (self.u_gram(sl, u_scale) * self.v_gram(sl, v_scale)).sum(dim=(1, 2, 3))
        return out

    def ghost_cost(self) -> float:
        """Multiply-adds of :meth:`ghost_sq` over the batch (the cost model's price of the Gram norm)."""
        return float(self.batch * self.K * self.T * self.T * ((1 if self.index else self.n_u) + self.n_v + 1))

    def hold_bytes(self) -> int:
        n = self.u.numel() * self.u.element_size()
        if self.v is not None:
            n += self.v.numel() * self.v.element_size()
        return n

    # -- per-sample gradients -------------------------------------------------------------------
    def materialize(self, sl: slice) -> Tensor:
        u, v = self.u_chunk(sl), self.v_chunk(sl)
        b = u.shape[0]
        if self.index:
            out = v.new_zeros((b, self.K, self.n_u, v.shape[-1]))
            out.scatter_add_(2, u.unsqueeze(-1).expand(*u.shape, v.shape[-1]), v)
        else:
            out = torch.matmul(u.to(self.dtype).transpose(-1, -2), v.to(self.dtype))
        return out.reshape(b, *self.shape)

    def materialize_cost(self) -> float:
        if self.index:  # zero-fill plus a scatter of the T rows
            return float(self.batch * self.K * (self.n_u * self.n_v + self.T * self.n_v))
        return float(self.batch * self.K * self.T * self.n_u * self.n_v)

    def weighted(self, w: Tensor, *, drop: bool = False) -> Tensor:
        b, k, t = self.batch, self.K, self.T
        u, v = self.u_chunk(slice(None)), self.v_chunk(slice(None))
        dt = self.dtype
        if self.index:
            vw = scale_rows(v.to(dt), w.to(dt), drop)
            offs = (torch.arange(k, device=u.device) * self.n_u).view(1, k, 1)
            out = vw.new_zeros((k * self.n_u, vw.shape[-1]))
            out.index_add_(0, (u + offs).reshape(-1), vw.reshape(-1, vw.shape[-1]))
            return out.reshape(self.shape)
        u, v = self._scaled(u, v, w, drop)
        if k == 1:
            # row-major: the result may become the parameter's gradient as it is
            out = matmul(u.reshape(b * t, -1).t(), v.reshape(b * t, -1), rows=True)
        else:
            out = torch.einsum("bktn,bktm->knm", u, v)
        return out.reshape(self.shape)

    def _scaled(self, u: Tensor, v: Tensor, w: Tensor, drop: bool) -> tuple[Tensor, Tensor]:
        # scale whichever factor is smaller, then ONE matmul over B*T; with drop, a dropped
        # sample's rows are zeroed in both factors (its NaN in either would reach the sum as
        # 0 * NaN)
        dt = self.dtype
        u, v = u.to(dt), v.to(dt)
        if u.shape[-1] <= v.shape[-1]:
            return scale_rows(u, w.to(dt), drop), zero_dropped(v, w, drop)
        return zero_dropped(u, w, drop), scale_rows(v, w.to(dt), drop)

    def add_weighted_(self, out: Tensor, w: Tensor, *, drop: bool = False) -> None:
        if self.index or self.K != 1 or out.dtype != self.dtype or not out.is_contiguous():
            return super().add_weighted_(out, w, drop=drop)
        u, v = self._scaled(self.u_chunk(slice(None)), self.v_chunk(slice(None)), w, drop)
        bt = self.batch * self.T
        out.view(self.n_u, -1).addmm_(u.reshape(bt, -1).t(), v.reshape(bt, -1))


# -- Grams and sums ---------------------------------------------------------------------------------------


def gram(x: Tensor, y: Tensor) -> Tensor:
    """``<x_t, y_s>`` for all position pairs: ``(b, K, Tx, n)``, ``(b, K, Ty, n)`` -> ``(b, K, Tx, Ty)``.

    Integer tensors ``(b, K, T)`` stand for one-hot rows, so index/index is an equality test and
    index/dense a gather: neither builds the one-hot matrix. Dense factors are expected scaled
    (:func:`~robustclip.per_sample._engine.scaled_by`), so no product overflows.
    """
    xi, yi = not x.is_floating_point(), not y.is_floating_point()
    if xi and yi:
        return (x.unsqueeze(-1) == y.unsqueeze(-2)).float()
    if xi:
        return gram(y, x).transpose(-1, -2)
    dt = acc_dtype(x.dtype)
    if yi:
        # <x_t, e_{y_s}> = x_t[y_s]
        b, k, tx, _ = x.shape
        idx = y.unsqueeze(-2).expand(b, k, tx, y.shape[-1])
        return x.to(dt).gather(-1, idx)
    if x.shape[-2] == 1 and y.shape[-2] == 1:  # 2-D inputs: a row dot product, no matmul
        return (x.to(dt) * y.to(dt)).sum(-1, keepdim=True)
    return torch.matmul(x.to(dt), y.to(dt).transpose(-1, -2))


def self_gram(x: Tensor, scale: Tensor | None = None) -> Tensor:
    """``gram(x, x)`` of ``x`` with each sample divided by ``scale`` (``(b,)``; None: 1); for a
    single position (2-D inputs) the squared row norms."""
    if not x.is_floating_point():
        return gram(x, x)
    x = scaled_by(x, scale)
    if x.shape[-2] == 1:  # a cascade sum (linalg.vector_norm adds one by one on the CPU)
        return x.pow(2).sum(-1, keepdim=True)
    return gram(x, x)


def sum_materialized(terms: Sequence[Term], sl: slice) -> Tensor:
    """Per-sample gradients of samples ``sl`` of one parameter: the sum of its terms'."""
    g = terms[0].materialize(sl)
    for t in terms[1:]:
        g = g + t.materialize(sl)
    return g
