"""Which modules the hook engine watches, and what it records of each call.

A *unit* is a module that directly owns trainable parameters. If a rule covers its type
(``rules/``), each call records the layer input and the autograd edge of its output; otherwise
the unit falls back to replaying its whole subtree per sample with torch.func, and each call
records everything needed for that (inputs, outputs, autocast state).

The :class:`Recorder` holds the forward hooks and the calls recorded since the last backward.

Output gradients are taken at the *edge* of the output (the autograd node that produced it and
its output number), captured when the layer returns. An in-place operation applied later
(``ReLU(inplace=True)``) rebases the output tensor onto a new node, but the captured edge still
names the layer's own node, so the engine gets ``dL/d(layer output)`` and not the gradient after
the activation. All state lives in the engine; modules and parameters are never modified.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from robustclip.per_sample._engine import ParamLayout
from robustclip.per_sample.rules import Rule, rule_for

#: an autograd node and one of its outputs: the key of a gradient the backward pass can request
EdgeKey = tuple[Any, int]


@dataclass(eq=False)
class Unit:
    module: nn.Module
    name: str
    rule: Rule | None  # None: falls back to torch.func over the module's subtree
    #: trainable parameters this unit covers: name inside the module -> index in the layout
    #: (rules: the module's own parameters; fallbacks: every parameter of the subtree, tied
    #: parameters under each of their names)
    params: dict[str, int]
    reason: str = ""

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.params)

    @property
    def indices(self) -> frozenset[int]:
        return frozenset(self.params.values())


@dataclass(eq=False)
class Call:
    """One call of a unit in the forward pass."""

    unit: Unit
    out_edges: list[GradientEdge]
    out_shapes: list[tuple[int, ...]]
    #: gradient edges (node, output number) of the inputs that require grad: the graph walk
    #: stops at their nodes, and a gradient requested exactly there also makes autograd compute
    #: this call's output gradient
    in_keys: list[EdgeKey]
    x: Tensor | None = None  # rules: the layer input
    x_version: int = 0
    # fallbacks only
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    out_positions: list[int] = field(default_factory=list)  # leaves of the output pytree
    out_values: list[Tensor] = field(default_factory=list)
    out_versions: list[int] = field(default_factory=list)
    autocast: tuple[str, bool, Any] | None = None

    @property
    def input_leaves(self) -> list[Any]:
        """The leaves of the recorded ``(args, kwargs)`` (fallbacks)."""
        return pytree.tree_leaves((self.args, self.kwargs))

    @property
    def in_nodes(self) -> list[Any]:
        return [node for node, _ in self.in_keys]

    @property
    def keys(self) -> list[EdgeKey]:
        return [(e.node, e.output_nr) for e in self.out_edges]


def edge_key(edge: GradientEdge) -> EdgeKey:
    return (edge.node, edge.output_nr)


def input_keys(tensors: list[Tensor]) -> list[EdgeKey]:
    return [edge_key(get_gradient_edge(t)) for t in tensors if t.requires_grad]


#: containers whose forward uses their children's parameters directly (not by calling them):
#: replayed as a whole
FUSED_CONTAINERS: tuple[type, ...] = (nn.MultiheadAttention,)


def plan_units(model: nn.Module, layout: ParamLayout) -> list[Unit]:
    """Walk the module tree and decide who covers each trainable parameter.

    * A module with a rule covers its own parameters.
    * A module without a rule that owns parameters and has no parameterised descendants (a
      custom layer, BatchNorm in eval mode) is a fallback unit: replayed per sample with
      torch.func, it covers its subtree.
    * A *container* without a rule that owns parameters next to parameterised children (a
      block with a learned layer scale, a model with a bare position table) does not become a
      unit: its own parameters are bare parameters, handled where they enter the batch (see
      ``rules/broadcast.py``), and its children are visited as usual. Known fused containers
      (``FUSED_CONTAINERS``) are replayed as a whole instead.
    """
    index = {id(p): i for i, p in enumerate(layout.params)}
    units: list[Unit] = []
    seen: set[int] = set()

    def visit(mod: nn.Module, name: str) -> None:
        if id(mod) in seen:
            return
        seen.add(id(mod))
        direct = {n: index[id(p)] for n, p in mod.named_parameters(recurse=False) if id(p) in index}
        if isinstance(mod, FUSED_CONTAINERS):  # its own parameters may all be frozen
            direct = {n: index[id(p)] for n, p in mod.named_parameters(remove_duplicate=False) if id(p) in index}
        if direct:
            rule, why = rule_for(mod)
            container = any(
                id(p) in index for c in mod.children() for p in c.parameters()
            ) and not isinstance(mod, FUSED_CONTAINERS)
            if rule is None and not container:
                sub = {
                    n: index[id(p)]
                    for n, p in mod.named_parameters(remove_duplicate=False)
                    if id(p) in index
                }
                units.append(Unit(mod, name or "<root>", None, sub, why))
                return
            if rule is not None and isinstance(mod, FUSED_CONTAINERS):
                # a fused container's rule covers its children's parameters too
                units.append(Unit(mod, name or "<root>", rule, direct))
                return
            if rule is not None:
                units.append(Unit(mod, name or "<root>", rule, direct))
        for child_name, child in mod.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return units


class Recorder:
    """The forward hooks: one :class:`Call` per call of a unit, held until the engine takes them.

    ``on_output_grad(call, grad)`` is registered as a tensor hook on each rule call's output: it
    fires with ``dL/d(output)`` as the backward pass computes it (also after an in-place change
    of the output, which registers later hooks on a new node), so the engine can process the
    layer while its output gradient is hot instead of holding that gradient to the end.
    """

    def __init__(self, units: list[Unit], on_output_grad: Callable[[Call, Tensor], None]) -> None:
        self.units = units
        self.on_output_grad = on_output_grad
        self.handles: list[RemovableHandle] = []
        self.calls: list[Call] = []
        self._fallback_depth = 0
        self._mute = 0

    def attach(self) -> None:
        if self.handles:
            return
        for u in self.units:
            if u.rule is None:
                self.handles.append(u.module.register_forward_pre_hook(self._fallback_enter))
                self.handles.append(
                    u.module.register_forward_hook(partial(self._fallback_hook, u), with_kwargs=True, always_call=True)
                )
            else:
                self.handles.append(u.module.register_forward_hook(partial(self._rule_hook, u), with_kwargs=True))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        release(self.calls)
        self.calls = []
        self._fallback_depth = 0

    def take(self) -> list[Call]:
        """The calls recorded since the last take, in forward order; recording starts afresh."""
        calls, self.calls = self.calls, []
        return calls

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Forward passes inside this block (torch.func replays, the engine's own backward
        passes) are not recorded."""
        self._mute += 1
        try:
            yield
        finally:
            self._mute -= 1

    def _recording(self) -> bool:
        # calls inside a fallback unit belong to its replay, not to the step
        return torch.is_grad_enabled() and not self._mute and not self._fallback_depth

    def _rule_hook(self, unit: Unit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        assert unit.rule is not None
        full, replaced = unit.rule.full_call, None
        if unit.rule.repack is not None and self._recording():
            # several outputs the losses may use (a recurrent layer's sequence and final
            # states): the rule packs them into one batch-first tensor, and the module returns
            # views of it, so that one output gradient holds them all
            packed = unit.rule.repack(module, output, (args, kwargs))
            if packed is None:
                return None
            output, replaced = packed
        elif full and isinstance(output, tuple) and output:
            output = output[0]  # (attention output, attention weights)
        if not self._recording() or not isinstance(output, Tensor) or output.grad_fn is None:
            return None
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        shape = list(output.shape)
        bd = unit.rule.out_batch_dim(module) if shape else 0
        shape.insert(0, shape.pop(bd))  # the batch first, as the plan expects
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)] if full else [x]
        call = Call(unit, [get_gradient_edge(output)], [tuple(shape)], input_keys(ins), x=x, x_version=x._version)
        if full:
            call.args, call.kwargs = args, kwargs
        self._record(call)
        output.register_hook(partial(self.on_output_grad, call))
        return replaced

    def _record(self, call: Call) -> None:
        # Calls (and through them their forward pass's graph) are held until the next
        # backward(losses). Forward passes that never get one, with grad enabled, pile up.
        self.calls.append(call)
        if len(self.calls) == 64 * max(len(self.units), 1):
            warnings.warn(
                "robustclip: the hook engine has recorded 64 forward passes without a "
                "clipper.backward(losses); each keeps its autograd graph alive until then. Run "
                "evaluation under torch.no_grad() (or torch.inference_mode()).",
                RuntimeWarning,
                stacklevel=4,
            )

    def _fallback_enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._fallback_depth += 1

    def _fallback_hook(self, unit: Unit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self._fallback_depth -= 1
        if not self._recording():
            return
        leaves = pytree.tree_leaves(output)
        pos = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.grad_fn is not None]
        if not pos:
            return
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        dev = ins[0].device.type if ins else "cpu"
        self._record(
            Call(
                unit,
                [get_gradient_edge(leaves[i]) for i in pos],
                [tuple(leaves[i].shape) for i in pos],
                input_keys(ins),
                args=args,
                kwargs=kwargs,
                out_positions=pos,
                out_values=[leaves[i] for i in pos],
                out_versions=[leaves[i]._version for i in pos],
                autocast=(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)),
            )
        )


def release(calls: list[Call]) -> None:
    """Drop what recorded calls hold of a step: inputs, outputs and autograd nodes.

    A call references autograd nodes (its output edge, its input's node), and the output's node
    references the call back through the tensor hook: a reference cycle that would keep the
    step's graph, and the activations it saved, alive until Python's cyclic garbage collector
    ran. The engine cuts it as soon as a step is done.
    """
    for c in calls:
        c.x = None
        c.args, c.kwargs, c.out_values = (), {}, []
        c.out_edges, c.in_keys = [], []
