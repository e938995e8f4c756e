"""The interface every per-sample gradient engine implements.

An engine turns a 1-D tensor of per-sample losses into the weighted sum

    sum_i w_{l,i} * g_{l,i}

for every parameter, where ``g_{l,i}`` is sample ``i``'s gradient restricted to layer group
``l`` and the weights ``w`` come from a rule applied to the per-sample, per-group squared norms
(for PS-Clip-SGD, arXiv:2605.02701: ``w_i = min(1, c/||g_i||)`` with the flat norm over all
groups). Engines differ in how they get there:

* :class:`~robustclip.per_sample._loop.LoopEngine`: one backward per sample; the oracle.
* :class:`~robustclip.per_sample._vmap.VmapEngine`: ``torch.func`` vmap over samples, in
  chunks that respect a memory budget; works for any model whose samples do not interact.
* the hook engine (one forward, one backward, no per-sample gradients held) plugs in here too.

A weight rule sees one chunk of samples at a time and must treat samples independently, which
every per-sample rule does; this is what lets engines process the batch in chunks.

The squared norms an engine hands ``weight_fn`` are float64 (:func:`wide_dtype`), and finite
and accurate for every finite gradient: a float32 square overflows above 1.8e19 and underflows
below 1e-19, so a sample's gradient of norm 1e25 would get weight ``c/inf = 0`` (dropped instead
of clipped) and one of norm 1e-25 would escape a radius of 1e-30. Engines sum squares in
float64, where every square of a float32, bfloat16 or float16 number fits
(:func:`row_sq_norms`); where a float32 product comes first (a Gram of a sample's factors) or
float64 cannot hold the squares (float64 gradients, MPS), they divide each sample's values by
their largest magnitude first and put the scale back after (LAPACK's ``nrm2`` idea, per sample:
:func:`max_abs`, :func:`scaled_by`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustclip._math import wide_dtype

# the p.grad plumbing lives in _grads; engines import new_grad and fill_missing from here too
from robustclip.per_sample._grads import fill_missing
from robustclip.per_sample._grads import new_grad as new_grad

#: maps squared norms of shape (groups, chunk), float64 (:func:`wide_dtype`), to weights of
#: shape (groups, chunk) or (1, chunk)
WeightFn = Callable[[Tensor], Tensor]


@dataclass
class ParamLayout:
    """The parameters a clipper updates, their names, owning modules and layer groups.

    A *group* is a module that directly owns parameters (a Linear's weight and bias form one
    group), which is the "layer" of per-layer clipping. A parameter shared by several modules
    (tied embeddings) belongs to the first module that owns it.
    """

    params: list[Tensor]
    names: list[str]
    modules: list[nn.Module | None]
    group_of: list[int]  # group index of each parameter
    group_names: list[str]
    #: set by the Clipper: autograd may accumulate into ``p.grad`` itself (single process; under
    #: DDP a ``backward()`` would fire the reducer's all-reduce on unclipped gradients)
    direct_backward: bool = False
    #: set by the Clipper under FSDP2: ``params`` are the unsharded leaves of the autograd graph,
    #: whose storage FSDP2 frees outside forward and backward (nothing may replay the model)
    sharded: bool = False
    #: set by the Clipper when several processes train: joins the processes' observed norms
    #: (last dimension) so that adaptive radii stay identical on every process
    gather_norms: Callable[[Tensor], Tensor] | None = None

    def group_index(self, device: torch.device) -> Tensor:
        """``group_of`` as a tensor on ``device``, made once: building a device tensor from
        host data every step would wait for the device."""
        key = str(device)
        cache: dict[str, Tensor] = self.__dict__.setdefault("_group_index", {})
        if key not in cache:
            cache[key] = torch.tensor(self.group_of, device=device)
        return cache[key]

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @classmethod
    def build(cls, model: nn.Module, params: Sequence[Tensor]) -> ParamLayout:
        owner: dict[int, tuple[str, nn.Module, str]] = {}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            for p_name, p in mod.named_parameters(recurse=False):
                if id(p) not in owner:
                    owner[id(p)] = (mod_name, mod, p_name)
        names: list[str] = []
        modules: list[nn.Module | None] = []
        group_of: list[int] = []
        group_names: list[str] = []
        group_index: dict[str, int] = {}
        seen: set[int] = set()
        for p in params:
            if id(p) in seen:
                raise ValueError(
                    "a parameter appears twice in the optimizer's param_groups; list each "
                    "parameter once."
                )
            seen.add(id(p))
            if id(p) not in owner:
                raise ValueError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not part "
                    "of the model given to the Clipper. Pass the model whose parameters the "
                    "optimizer updates."
                )
            mod_name, mod, p_name = owner[id(p)]
            names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
            modules.append(mod)
            key = mod_name if mod_name else f"<root>.{p_name}"
            if key not in group_index:
                group_index[key] = len(group_names)
                group_names.append(key)
            group_of.append(group_index[key])
        return cls(list(params), names, modules, group_of, group_names)


class PathCheck:
    """When an engine compares its per-sample result with autograd (one extra backward pass).

    A check is due on the first use of every way the engine computes per-sample gradients
    (*paths*: the whole engine for vmap and the loop; each layer's rule, per-module fallback or
    broadcast site for the hook engine, which names them), so a path first taken at step ``k``
    (a module that starts falling back, a layer called in a new way, a whole-model fallback)
    is checked at step ``k``; and, with ``every = N``, again once ``N`` steps have passed since
    the last check. A step here is one ``accumulate`` call: one ``clipper.backward``, so with
    gradient accumulation a micro-batch.

    Args:
        enabled: run the checks at all.
        every: re-check every ``every`` steps (None: first uses only).
    """

    def __init__(self, enabled: bool = True, every: int | None = None) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"verify_every must be a positive int or None, got {every!r}.")
        self.enabled = enabled
        self.every = every
        #: the paths that have passed a check
        self.checked: set[str] = set()
        self.since = 0  # steps since the last check passed
        self.checks = 0  # checks passed (tests and diagnostics read it)

    def due(self, paths: set[str]) -> bool:
        """Is a check due on a step that takes ``paths``? Call once per step."""
        self.since += 1
        if not self.enabled:
            return False
        return bool(paths - self.checked) or (self.every is not None and self.since >= self.every)

    def passed(self, paths: set[str]) -> None:
        self.checked |= paths
        self.since = 0
        self.checks += 1


class PerSampleEngine:
    """Base class: see the module docstring for the contract."""

    name = "engine"
    #: True if :meth:`accumulate` accepts ``None`` entries in ``out``; otherwise the per-sample
    #: estimators hand it zero-filled buffers
    writes_new_grads = False
    #: True if the engine runs its own first-use checks (finer than :func:`accumulate_into`'s)
    checks_itself = False

    def __init__(self, model: nn.Module, layout: ParamLayout) -> None:
        self.model = unwrap_model(model)
        self.layout = layout
        #: when the result is compared with autograd (:func:`accumulate_into`, or the engine)
        self.checks = PathCheck()
        #: set by the Clipper: :func:`accumulate_into` multiplies every weight by it, so the sum
        #: added to ``out`` is ``sum_scale * sum_i w_i g_i`` (the step's ``1/count`` folded
        #: into the weights instead of a pass over every gradient afterwards)
        self.sum_scale = 1.0
        #: :func:`accumulate_into` calls that applied ``sum_scale`` (the Clipper checks it)
        self.scaled_calls = 0

    def set_verify_every(self, every: int | None) -> None:
        """Re-run the check against autograd every ``every`` steps, besides first uses."""
        self.checks.every = PathCheck(True, every).every  # validated there

    def attach(self) -> None:
        """Install whatever the engine needs to observe the forward pass."""

    def detach(self) -> None:
        """Remove everything :meth:`attach` installed."""

    def accumulate(
        self, losses: Tensor, weight_fn: WeightFn, out: list[Tensor | None], *, drop: bool = False
    ) -> Tensor:
        """Add ``sum_i w_{l,i} g_{l,i}`` to ``out`` (aligned with ``layout.params``).

        ``drop`` (``Clipper(nonfinite="drop_sample")``): a sample of weight 0 may hold NaN or
        inf in its gradient and must still add exactly 0 (``0 * NaN`` is NaN), so its rows are
        zeroed in every weighted sum. Without ``drop`` they are not (one elementwise pass less
        per factor): a non-finite sample then has a NaN weight and makes the sum NaN, which the
        clipper's finite check sees and skips the step for.

        An engine with ``writes_new_grads`` also takes ``None`` entries: that parameter has no
        gradient yet this step, and the engine puts a new tensor there, laid out like the
        parameter (:func:`new_grad`): the sum is then written once instead of added to a
        zero-filled buffer, and no temporary of the parameter's size sits beside that buffer.
        Callers go through :func:`accumulate_into`, which zero-fills for the other engines.

        Returns the per-sample, per-group norms, shape ``(num_groups, batch)``, float32 or wider, on the
        device (no sync).
        """
        raise NotImplementedError

    def group_sq_norms(self, per_param_sq: Sequence[Tensor]) -> Tensor:
        """Sum per-parameter squared norms (each shape (chunk,)) into groups -> (G, chunk), in
        the widest of their dtypes (float32 at least; the engines pass float64 ones)."""
        lay = self.layout
        chunk = per_param_sq[0].shape[0]
        dtype = acc_dtype(functools.reduce(torch.promote_types, (s.dtype for s in per_param_sq)))
        stacked = torch.stack([s if s.dtype == dtype else s.to(dtype) for s in per_param_sq])
        if lay.num_groups == len(per_param_sq) and lay.group_of == sorted(lay.group_of):
            return stacked  # one parameter per group, in group order: nothing to add
        out = stacked.new_zeros((lay.num_groups, chunk))
        return out.index_add_(0, lay.group_index(out.device), stacked)


def auto_engine(engines: Mapping[str, type]) -> str:
    """The engine ``"auto"`` means: the hook engine where it is registered, else vmap."""
    return "hooks" if "hooks" in engines else "vmap"


def check_engine_name(name: str, engines: Mapping[str, type]) -> str:
    """``name`` if it is ``"auto"`` or one of ``engines``, else an error listing the choices."""
    if name != "auto" and name not in engines:
        raise ValueError(f"unknown per-sample engine {name!r}; choose one of {['auto', *sorted(engines)]}.")
    return name


def make_engine(
    engines: Mapping[str, type[PerSampleEngine]],
    name: str,
    model: nn.Module,
    layout: ParamLayout,
    max_chunk_elements: int,
) -> PerSampleEngine:
    """The engine called ``name`` in ``engines`` (``"auto"``: :func:`auto_engine`) for ``model``;
    every engine but the loop takes the memory cap ``max_chunk_elements``."""
    if name == "auto":
        name = auto_engine(engines)
    cls = engines[name]
    if name == "loop":
        return cls(model, layout)
    return cls(model, layout, max_chunk_elements=max_chunk_elements)  # type: ignore[call-arg]  # ENGINES is typed by the base class; every engine but the loop takes max_chunk_elements


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms accumulate in float32 at least (bf16/fp16 gradients), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def max_abs(x: Tensor) -> Tensor:
    """The largest magnitude of each sample (first dimension) of ``x``, ``(B,)`` in ``x``'s
    dtype, at least the dtype's smallest normal number (so that dividing an all-zero sample by
    it gives zeros, and a subnormal one never overflows); NaN for a sample with a NaN, inf for
    one with an inf. No temporary of ``x``'s size."""
    if x.dim() == 1:
        s = x.abs()
    elif x[0].numel() == 0:
        return x.new_ones(x.shape[0])
    else:
        dims = tuple(range(1, x.dim()))
        s = torch.maximum(x.amax(dims), -x.amin(dims))
    return s.clamp_min(torch.finfo(x.dtype).tiny)


def scaled_by(x: Tensor, scale: Tensor | None) -> Tensor:
    """``x`` (batch first) in :func:`acc_dtype`, each sample divided by its ``scale`` (``(B,)``,
    from :func:`max_abs`): every entry then lies in [-1, 1], so float32 products and squares
    of it neither overflow nor lose anything that matters to underflow. One pass (the cast
    and the division in one operation)."""
    dt = acc_dtype(x.dtype)
    if scale is None:
        return x.to(dt)
    return torch.div(x, scale.to(dt).view(-1, *(1,) * (x.dim() - 1)))


def float64_holds_squares(x: Tensor) -> bool:
    """Whether float64 accumulation alone makes ``x``'s sums of squares safe: every square of
    a float32, bfloat16 or float16 number is a normal float64, so nothing overflows or
    underflows, on every device with float64 (all but MPS). Float64 tensors need scaling."""
    return x.dtype != torch.float64 and wide_dtype(x.device) == torch.float64


#: entries per sample from which :func:`row_sq_norms` reduces each sample on its own
ROW_BY_ROW = 2**15


def row_sq_norms(g: Tensor) -> Tensor:
    """Squared L2 norm of each sample (first dimension) of ``g``, ``(B,)`` in :func:`wide_dtype`
    (float64; float32 on MPS), finite and accurate for every finite sample of a float32,
    bfloat16 or float16 ``g``: accumulated in float64 (one pass), or where float64 cannot hold
    the squares (float64 gradients, MPS), each sample divided by its largest magnitude first
    and the scale put back after. NaN for a sample with a NaN or inf. No host read."""
    b = g.shape[0]
    wide = wide_dtype(g.device)
    x = g.detach().reshape(b, -1)
    if x.shape[1] == 0:
        return torch.zeros(b, dtype=wide, device=g.device)
    if float64_holds_squares(x):
        if x.shape[1] < ROW_BY_ROW:
            norm: Tensor = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)  # Any in torch's stubs
            return norm.square()
        # long rows one at a time: on the CPU a float64 copy of the whole chunk (up to 64 MB)
        # would be a fresh mapping every call, 35x the float32 pass; one row's is reused
        return torch.stack(torch._foreach_norm(list(x.unbind(0)), 2.0, dtype=torch.float64)).square()
    s = max_abs(x)
    # squared in place in the scaled copy, then summed: torch's sum adds in a cascade (relative
    # error ~1e-7 for millions of entries), where linalg.vector_norm over a dimension adds
    # one by one on the CPU (5e-4 for 8 million entries in float32)
    sq = scaled_by(x, s).square_().sum(1)
    return sq.to(wide) * s.to(wide).square()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the parameters, through DistributedDataParallel wrappers and
    torch.compile's (``OptimizedModule._orig_mod``), so names are the eager model's."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]  # torch.compile's OptimizedModule keeps the eager module in _orig_mod (untyped)
        else:
            return model


def accumulate_into(
    engine: PerSampleEngine,
    losses: Tensor,
    weight_fn: WeightFn,
    out: list[Tensor | None],
    drop: bool = False,
) -> Tensor:
    """``engine.accumulate``, with zeros first in the ``None`` entries of ``out`` for an engine
    that only adds into it (``writes_new_grads`` False), and, when due
    (:class:`PathCheck`), sample 0's per-group norms compared with autograd's (for engines
    that do not check themselves). ``drop``: see :meth:`PerSampleEngine.accumulate`."""
    if not engine.writes_new_grads:
        fill_missing(out, engine.layout.params)
    scale = engine.sum_scale
    if scale != 1.0:
        engine.scaled_calls += 1
        weight_fn = functools.partial(_scaled_weights, weight_fn, scale)
    if engine.checks_itself or not engine.checks.due({engine.name}) or losses.grad_fn is None:
        return engine.accumulate(losses, weight_fn, out, drop=drop)
    lay = engine.layout
    ref = torch.autograd.grad(losses[0], lay.params, retain_graph=True, allow_unused=True)
    wide = wide_dtype(losses.device)
    ref_sq = engine.group_sq_norms(
        [torch.zeros(1, dtype=wide, device=losses.device) if g is None else row_sq_norms(g.unsqueeze(0)) for g in ref]
    )[:, 0]
    del ref
    norms = engine.accumulate(losses, weight_fn, out, drop=drop)
    check_norms(norms[:, 0], ref_sq.sqrt(), lay.group_names, engine.name, _half_precision(engine, losses))
    engine.checks.passed({engine.name})
    return norms


def _scaled_weights(weight_fn: WeightFn, scale: float, sq: Tensor) -> Tensor:
    return weight_fn(sq) * scale


_HALF = (torch.float16, torch.bfloat16)


def _half_precision(engine: PerSampleEngine, losses: Tensor) -> bool:
    """Did the step compute in bf16/fp16 (half-precision parameters, or a forward pass under
    autocast, as the engine recorded it: ``(device, enabled, dtype)``), so that the engine and
    autograd round differently?"""
    if losses.dtype in _HALF or engine.layout.params[0].dtype in _HALF:
        return True
    recorded = getattr(engine, "_autocast", None)  # the vmap engine records its forward's
    return bool(recorded and recorded[1] and recorded[2] in _HALF) or torch.is_autocast_enabled(losses.device.type)


def check_norms(got: Tensor, ref: Tensor, groups: Sequence[str], engine: str, half: bool) -> None:
    """Sample 0's per-group gradient norms from an engine against autograd's; raise if they
    disagree (one host read: this runs on check steps only)."""
    # as the hook engine's sample-0 check (verify.py): half-precision rounding is relative to
    # the whole gradient, so a small group's norm may differ by more than its own 5%
    rtol, atol = (5e-2, 1e-2) if half else (1e-3, 1e-5)
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    total = float(ref.norm())
    floor = 100 * torch.finfo(torch.float32).eps * (1.0 + total)
    bad = [g for g, a, r in zip(groups, got.tolist(), ref.tolist()) if abs(a - r) > rtol * r + atol * total + floor]
    if bad:
        raise ValueError(
            f"robustclip: the {engine!r} per-sample engine's gradient norm of sample 0 disagrees "
            f"with autograd's for {', '.join(bad[:6])}{'...' if len(bad) > 6 else ''}. Its "
            "per-sample gradients would be wrong; the model probably mixes samples in its "
            "forward pass or keeps the batch elsewhere than in the first dimension. Use "
            "engine='loop' (one backward per sample) for this model, and report it."
        )


def expand_weights(weights: Tensor, group_of: Sequence[int]) -> list[Tensor]:
    """Per-parameter weight vectors from (G, b) or (1, b) group weights."""
    if weights.shape[0] == 1:
        return [weights[0]] * len(group_of)
    return [weights[g] for g in group_of]
