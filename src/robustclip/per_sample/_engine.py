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
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# the p.grad plumbing lives in _grads; engines import new_grad and fill_missing from here too
from robustclip.per_sample._grads import fill_missing
from robustclip.per_sample._grads import new_grad as new_grad

#: maps squared norms of shape (groups, chunk) to weights of shape (groups, chunk) or (1, chunk)
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
        cache = self.__dict__.setdefault("_group_index", {})
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
        names, modules, group_of, group_names = [], [], [], []
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


class PerSampleEngine:
    """Base class: see the module docstring for the contract."""

    name = "engine"
    #: True if :meth:`accumulate` accepts ``None`` entries in ``out``; otherwise the per-sample
    #: estimators hand it zero-filled buffers
    writes_new_grads = False

    def __init__(self, model: nn.Module, layout: ParamLayout) -> None:
        self.model = unwrap_model(model)
        self.layout = layout

    def attach(self) -> None:
        """Install whatever the engine needs to observe the forward pass."""

    def detach(self) -> None:
        """Remove everything :meth:`attach` installed."""

    def accumulate(self, losses: Tensor, weight_fn: WeightFn, out: list[Tensor | None]) -> Tensor:
        """Add ``sum_i w_{l,i} g_{l,i}`` to ``out`` (aligned with ``layout.params``).

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
        the widest of their dtypes (float32 at least)."""
        lay = self.layout
        chunk = per_param_sq[0].shape[0]
        dtype = acc_dtype(functools.reduce(torch.promote_types, (s.dtype for s in per_param_sq)))
        out = per_param_sq[0].new_zeros((lay.num_groups, chunk), dtype=dtype)
        idx = lay.group_index(out.device)
        out.index_add_(0, idx, torch.stack([s.to(dtype) for s in per_param_sq]))
        return out


def auto_engine(engines: Mapping[str, type]) -> str:
    """The engine ``"auto"`` means: the hook engine where it is registered, else vmap."""
    return "hooks" if "hooks" in engines else "vmap"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms accumulate in float32 at least (bf16/fp16 gradients), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the parameters, through DistributedDataParallel wrappers and
    torch.compile's (``OptimizedModule._orig_mod``), so names are the eager model's."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def accumulate_into(
    engine: PerSampleEngine, losses: Tensor, weight_fn: WeightFn, out: list[Tensor | None]
) -> Tensor:
    """``engine.accumulate``, with zeros first in the ``None`` entries of ``out`` for an engine
    that only adds into it (``writes_new_grads`` False)."""
    if not engine.writes_new_grads:
        fill_missing(out, engine.layout.params)
    return engine.accumulate(losses, weight_fn, out)


def expand_weights(weights: Tensor, group_of: Sequence[int]) -> list[Tensor]:
    """Per-parameter weight vectors from (G, b) or (1, b) group weights."""
    if weights.shape[0] == 1:
        return [weights[0]] * len(group_of)
    return [weights[g] for g in group_of]
