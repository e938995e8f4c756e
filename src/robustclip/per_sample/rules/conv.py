"""``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``: any stride, padding (also ``"same"`` and
non-zero modes), dilation and groups; and the transposed convolutions (``rules/conv_transpose.py``).

Per sample, ``grad W_i`` is, for each group ``k``, a sum over the ``T`` output positions of
``G_{i,k,t} (x) patch_{i,k,t}`` where ``patch`` is the input window seen by position ``t``
(im2col). The term keeps only the (padded) input and the output gradient:

* the per-sample squared norms (when the cost model of ``_hooks/norms.py`` takes the Gram
  form) come from the Gram of the output gradient and the Gram of the patches, the latter from
  the Gram of the padded input's *pixels* and a separable sum over kernel taps whenever that
  is cheaper than unfolding (:meth:`ConvTerm._pixel_gram`); the term prices this itself
  (:meth:`ConvTerm.ghost_cost`), so a wide layer with a few hundred positions (a ResNet's
  second stage) takes the Gram norm instead of materialising twice;
* every sample's gradient (when the engine keeps or checks them) comes either from ONE
  weight-gradient convolution with the batch folded into ``B * groups`` groups, or from im2col
  plus a batched matmul over cache-sized chunks of samples (the input padded once per call).
  The layer's shape picks one (:data:`GROUPED_MIN_POSITIONS`, :data:`GROUPED_MIN_CHANNELS`):
  the grouped convolution for wide layers with many positions, im2col for thin inputs and
  late layers; with ``backends.autotune`` the first call for each layer shape on the CPU
  (per-sample shapes: any batch size) times both and remembers the faster
  (:func:`robustclip._kernels.choose`); on other devices and in deterministic mode im2col is
  used;
* the clipped sum is ONE weight-gradient convolution on the weight-scaled output gradient, as
  in the plain backward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustclip import backends
from robustclip._kernels import choose, chosen
from robustclip.per_sample._engine import max_abs, scaled_by
from robustclip.per_sample.rules import DenseTerm, OuterTerm, Term, register
from robustclip.per_sample.rules._terms import scale_rows, zero_dropped
from robustclip.per_sample.rules._util import sum_positions

#: elements of unfolded patches per im2col chunk: small enough to stay in cache between the
#: strided copy that builds them and the matmul that consumes them
IM2COL_CHUNK_ELEMENTS = 2**18

#: the grouped convolution materialises per-sample gradients when every sample has at least
#: this many output positions and each group at least GROUPED_MIN_CHANNELS input channels
#: (unless ``backends.autotune`` times both). Measured on a 2-core CPU, float32: with 32 to 128
#: input channels and 256 or 1024 positions it matches or beats im2col (0.8-1.0x its time on
#: one thread, 2-7x faster on two busy threads, where each of im2col's chunks pays a thread
#: hand-off); with 3 input channels im2col is 1.7x faster, and with 64 or 16 positions
#: (late stages, which take the Gram norm anyway) 1.6-2.8x faster.
GROUPED_MIN_POSITIONS = 128
GROUPED_MIN_CHANNELS = 16


class ConvTerm(OuterTerm):
    """The weight term of a convolution; its ``v`` factor (patches) is built on demand."""

    def __init__(self, module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor, grad_out: Tensor) -> None:
        self.module = module
        self.nd = x.dim() - 2
        self.pads = list(module._reversed_padding_repeated_twice)
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            # "same" (maybe asymmetric), reflect, replicate, circular: pad once, then every
            # computation is a padding-free convolution of the padded input
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, self.pads, mode=mode) if any(self.pads) else x
            self.padding, self.pads = [0] * self.nd, [0] * (2 * self.nd)
        else:
            self.padding = list(module.padding)
        self.x, self.g = x, grad_out
        b, groups = grad_out.shape[0], module.groups
        self._k = groups
        self._t = grad_out[0, 0].numel()
        n_u = module.out_channels // groups
        super().__init__(grad_out.reshape(b, groups, n_u, self._t), None, n_u, module.weight.shape, grad_out.dtype)

    @property
    def K(self) -> int:  # noqa: N802
        return self._k

    @property
    def T(self) -> int:  # noqa: N802
        return self._t

    @property
    def grouped(self) -> bool | None:
        """Materialise by grouped convolution (True), im2col (False), or not known yet (None:
        CPU with ``backends.autotune``, first call for this layer shape; the call times both).

        Without autotuning the choice follows the layer's shape alone
        (:data:`GROUPED_MIN_POSITIONS`, :data:`GROUPED_MIN_CHANNELS`), so every run of the same
        model takes the same kernels and rounds alike."""
        if self.x.device.type != "cpu" or torch.are_deterministic_algorithms_enabled():
            return False  # im2col: the one kernel of deterministic mode
        if not backends.autotune:
            return self.T >= GROUPED_MIN_POSITIONS and self.x.shape[1] // self.K >= GROUPED_MIN_CHANNELS
        # candidate 0 is im2col
        idx = chosen(self._signature())
        return None if idx is None else idx == 1

    def _signature(self) -> tuple[object, ...]:
        # per-sample shapes: a new batch size (a last partial batch, Poisson sampling) reuses
        # the layer's choice instead of timing again
        m = self.module
        return (
            "conv-per-sample", tuple(self.x.shape[1:]), tuple(self.g.shape[1:]), m.kernel_size, m.stride, tuple(self.padding),
            m.dilation, m.groups, self.dtype, self.x.dtype,
        )  # fmt: skip

    def hold_bytes(self) -> int:
        return self.x.numel() * self.x.element_size() + self.g.numel() * self.g.element_size()

    def transient_per_sample(self) -> int:
        # the grouped convolution reorders its input and output gradient; im2col pads the input
        # once and unfolds at most IM2COL_CHUNK_ELEMENTS of it at a time, and its result is
        # copied once. Not timed yet: both run, and one result is held while the other is computed.
        per_sample_io = self.x[0].numel() + self.g[0].numel()
        grouped = self.grouped
        if grouped is None:
            return 2 * self.numel + per_sample_io
        return self.numel + per_sample_io + (0 if grouped else self.numel)

    def _padded(self, sl: slice) -> Tensor:
        x = self.x[sl].to(self.dtype)
        return F.pad(x, self.pads) if any(self.pads) else x

    def _patches(self, sl: slice, padded: Tensor | None = None) -> Tensor:
        """``(b, K, n_v, T)``: the input window of every output position (im2col), from the
        padded input of samples ``sl`` (``padded``, when the caller has it already)."""
        m = self.module
        x = self._padded(sl) if padded is None else padded
        k, d, s = m.kernel_size, m.dilation, m.stride
        out_sp = self.g.shape[2:]
        st = x.stride()
        view = x.as_strided(
            (x.shape[0], x.shape[1], *k, *out_sp),
            (st[0], st[1], *(d[i] * st[2 + i] for i in range(self.nd)), *(s[i] * st[2 + i] for i in range(self.nd))),
        )
        return view.reshape(x.shape[0], self.K, self.n_v, self.T)

    def u_chunk(self, sl: slice) -> Tensor:
        return self.u[sl].transpose(-1, -2)

    def v_chunk(self, sl: slice) -> Tensor:
        return self._patches(sl).transpose(-1, -2)

    def v_scale(self, sl: slice) -> Tensor:
        # the patches hold the (padded) input's values and zeros: the same largest magnitude,
        # without unfolding them
        return max_abs(self.x[sl])

    def v_gram(self, sl: slice, scale: Tensor | None = None, pixels_first: bool | None = None) -> Tensor:
        """Gram of the patches, ``<patch_t, patch_s>``, each sample's divided by its ``scale``
        (``(b,)``, None: 1), without unfolding when that is cheaper (:meth:`_pixel_gram`;
        ``pixels_first`` forces the choice)."""
        if pixels_first is None:
            pixels_first = self._pixels_first()
        if not pixels_first:
            return super().v_gram(sl, scale)
        b = len(range(*sl.indices(self.batch)))
        return self._pixel_gram(sl, scale).reshape(b, self.K, self.T, self.T)

    def ghost_sq(self, sl: slice, u_scale: Tensor | None = None, v_scale: Tensor | None = None) -> Tensor:
        if not self._pixels_first():
            return super().ghost_sq(sl, u_scale, v_scale)
        idx = range(*sl.indices(self.batch))
        if not idx:
            return super().ghost_sq(sl, u_scale, v_scale)
        # the caller sized ``sl`` for two T x T Grams per sample; the pixel Gram and its first
        # tap pass are larger (up to 9x: the pixel path is taken only while P^2 < taps T^2), so
        # a share of the samples at a time keeps the temporaries within that room
        t2, p2 = self.T * self.T, math.prod(self._padded_size()) ** 2
        step = max(1, len(idx) * 2 * t2 // (2 * p2 + t2))
        out = []
        for s in range(0, len(idx), step):
            sub = slice(idx.start + s * idx.step, idx.start + min(s + step, len(idx)) * idx.step, idx.step)
            part = slice(s, min(s + step, len(idx)))  # the same samples within u_scale, v_scale
            v = self._pixel_gram(sub, None if v_scale is None else v_scale[part])
            # the product in place in the fresh output-gradient Gram, against the strided view
            # of the patch Gram: no third T x T tensor and no copy of the view
            prod = self.u_gram(sub, None if u_scale is None else u_scale[part]).view(v.shape).mul_(v)
            out.append(prod.reshape(v.shape[0] // self.K, -1).sum(1))
        return out[0] if len(out) == 1 else torch.cat(out)

    def ghost_cost(self) -> float:
        per_group = self.T * self.T * (self.n_u + 1) + min(self._pixel_gram_cost(), self.T * self.T * self.n_v)
        return float(self.batch * self.K * per_group)

    def _padded_size(self) -> tuple[int, ...]:
        # _reversed_padding_repeated_twice: (left, right) of the last spatial dimension first
        sp = self.x.shape[2:]
        return tuple(sp[i] + self.pads[2 * (self.nd - 1 - i)] + self.pads[2 * (self.nd - 1 - i) + 1] for i in range(self.nd))

    def _pixel_gram_cost(self) -> int:
        """Multiply-adds of :meth:`_pixel_gram` per sample and group; an addition of the tap sum
        counts as two (a pass over memory, not a fused multiply-add in cache)."""
        sp_in = self._padded_size()
        pixels = math.prod(sp_in)
        return pixels * pixels * (self.x.shape[1] // self.K) + 2 * self._tap_sum_cost(sp_in, tuple(self.g.shape[2:]))

    def _pixels_first(self) -> bool:
        return self._pixel_gram_cost() < self.T * self.T * self.n_v

    def _pixel_gram(self, sl: slice, scale: Tensor | None = None) -> Tensor:
        """The patch Gram of samples ``sl`` from the pixel Gram, each sample's input divided by
        its ``scale`` (``(b,)``, None: 1): ``(b * K, *out, *out)``, maybe a strided view.

        With ``M = X^T X`` the Gram of the padded input's pixels (channels summed), the patch
        Gram is ``sum_k M[a_k(t), a_k(s)]`` over the kernel taps ``k``, where ``a_k(t)`` is the
        pixel tap ``k`` of output position ``t`` reads. A tap offsets both pixel indices by the
        same amount in each spatial dimension, so the sum over taps is separable: one dimension
        at a time, it adds ``kernel_size`` strided *views* of the running sum (start
        ``k * dilation``, step ``stride``, on both of that dimension's axes). That costs about
        ``k T^2`` additions per dimension on top of ``P^2 C`` multiply-adds for the ``P`` padded
        pixels, instead of ``T^2 C taps`` for the Gram of unfolded patches (and measured 5x
        faster than adding the ``k x k`` taps one by one).
        """
        m = self.module
        x = self._padded(sl)
        b, c = x.shape[:2]
        sp_in, sp_out = tuple(x.shape[2:]), tuple(self.g.shape[2:])
        pixels = x[0, 0].numel()
        cg = c // self.K
        xs = scaled_by(x, scale).reshape(b * self.K, cg, pixels)
        out = torch.bmm(xs.transpose(1, 2), xs).view(b * self.K, *sp_in, *sp_in)
        for i in range(self.nd):
            k, d, st = m.kernel_size[i], m.dilation[i], m.stride[i]
            parts = []
            for tap in range(k):
                win = slice(tap * d, tap * d + st * (sp_out[i] - 1) + 1, st)
                idx = [slice(None)] * out.dim()
                idx[1 + i] = idx[1 + self.nd + i] = win
                parts.append(out[tuple(idx)])
            if k == 1:
                out = parts[0]  # a strided view: the next pass (or the caller) reads it as it is
                continue
            acc = torch.add(parts[0], parts[1])
            for part in parts[2:]:
                acc.add_(part)
            out = acc
        return out

    def _tap_sum_cost(self, sp_in: tuple[int, ...], sp_out: tuple[int, ...]) -> int:
        """Additions of the separable sum over taps in :meth:`v_gram`, per sample and group."""
        cost = 0
        for i in range(self.nd):
            size = math.prod(o * o for o in sp_out[: i + 1]) * math.prod(p * p for p in sp_in[i + 1 :])
            cost += self.module.kernel_size[i] * size
        return cost

    def materialize(self, sl: slice) -> Tensor:
        grouped = self.grouped
        if grouped is None:
            if len(range(*sl.indices(self.batch))) < 2:  # a check of one sample: not worth timing
                return self._materialize_grouped(sl)
            ways = (lambda: self._materialize_im2col(sl), lambda: self._materialize_grouped(sl))
            return choose(self._signature(), ways, repeats=2)  # milliseconds each: little noise
        return self._materialize_grouped(sl) if grouped else self._materialize_im2col(sl)

    def _materialize_im2col(self, sl: slice) -> Tensor:
        """Patches times output gradients, per sample, a cache-sized chunk of samples at a time."""
        idx = range(*sl.indices(self.batch))
        b = len(idx)
        # (patches)(G^T) is the faster operand order for thin channel counts; its (n_v, n_u)
        # blocks are transposed into the parameter's layout once at the end
        out = torch.empty((b, self.K, self.n_v, self.n_u), dtype=self.dtype, device=self.x.device)
        step = max(1, IM2COL_CHUNK_ELEMENTS // max(1, self.K * self.T * self.n_v))
        xp = self._padded(sl)  # padded once: one fill and one copy, not one per chunk
        u = self.u[sl]
        for s in range(0, b, step):
            e = min(s + step, b)
            patches = self._patches(slice(s, e), xp[s:e])
            torch.matmul(patches, u[s:e].to(self.dtype).transpose(-1, -2), out=out[s:e])
        return out.transpose(-1, -2).reshape(b, *self.shape)

    def _weight_grad(self, g: Tensor, x: Tensor, out_channels: int, groups: int) -> Tensor:
        m = self.module
        w = torch.empty((out_channels, *m.weight.shape[1:]), dtype=g.dtype, device=g.device)
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            g, x.to(g.dtype), w, None, list(m.stride), self.padding, list(m.dilation),
            False, [0] * self.nd, groups, [False, True, False],
        )  # fmt: skip
        out: Tensor = grad_w  # aten ops are untyped in torch's stubs
        return out

    def _materialize_grouped(self, sl: slice) -> Tensor:
        """Every sample's weight gradient in one convolution: the batch becomes ``b * groups``
        groups of a batch-of-one convolution."""
        m = self.module
        x, g = self.x[sl], self.g[sl]
        b = x.shape[0]
        grad_w = self._weight_grad(
            g.reshape(1, b * g.shape[1], *g.shape[2:]),
            x.reshape(1, b * x.shape[1], *x.shape[2:]),
            b * m.out_channels,
            b * m.groups,
        )
        return grad_w.reshape(b, *self.shape)

    def weighted(self, w: Tensor, *, drop: bool = False) -> Tensor:
        # sum_i G_i * x_i weighted by w_i: scale whichever of G and x is smaller
        # (with drop, a dropped sample's rows are zeroed in both: 0 * NaN is NaN)
        w = w.to(self.dtype)
        g, x = self.g, self.x
        if g.numel() <= x.numel():
            g, x = scale_rows(g, w, drop), zero_dropped(x, w, drop)
        else:
            g, x = zero_dropped(g, w, drop), scale_rows(x.to(self.dtype), w, drop)
        return self._weight_grad(g, x, self.module.out_channels, self.module.groups)

    def add_weighted_(self, out: Tensor, w: Tensor, *, drop: bool = False) -> None:
        # the convolution, not OuterTerm's matmul over unfolded patches
        out.add_(self.weighted(w, drop=drop).to(out.dtype))


@register(nn.Conv3d)
@register(nn.Conv2d)
@register(nn.Conv1d)
def conv_terms(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor, grad_out: Tensor, names: frozenset[str]) -> dict[str, Term]:
    terms: dict[str, Term] = {}
    if "weight" in names:
        terms["weight"] = ConvTerm(module, x, grad_out)
    if "bias" in names:
        b = grad_out.shape[0]
        terms["bias"] = DenseTerm(sum_positions(grad_out.reshape(b, module.out_channels, -1).transpose(1, 2)))
    return terms
