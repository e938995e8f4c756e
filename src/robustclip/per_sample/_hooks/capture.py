"""Which modules the hook engine watches, and what it records of each call.

A *unit* is a module that directly owns trainable parameters. If a rule covers its type
(``rules/``), each call records the layer input and the autograd edge of its output; otherwise
the unit falls back to replaying its whole subtree per sample with torch.func, and each call
records everything needed for that (inputs, outputs, autocast state).

Output gradients are taken at the *edge* of the output (the autograd node that produced it and
its output number), captured when the layer returns. An in-place operation applied later
(``ReLU(inplace=True)``) rebases the output tensor onto a new node, but the captured edge still
names the layer's own node, so the engine gets ``dL/d(layer output)`` and not the gradient after
the activation. All state lives in the engine; modules and parameters are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from robustclip.per_sample._engine import ParamLayout
from robustclip.per_sample.rules import Rule, rule_for


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
    def names(self) -> frozenset:
        return frozenset(self.params)

    @property
    def indices(self) -> frozenset:
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
    in_keys: list[tuple[Any, int]]
    x: Tensor | None = None  # rules: the layer input
    x_version: int = 0
    # fallbacks only
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    out_positions: list[int] = field(default_factory=list)  # leaves of the output pytree
    out_values: list[Tensor] = field(default_factory=list)
    out_versions: list[int] = field(default_factory=list)
    autocast: tuple[str, bool, Any] | None = None

    @property
    def in_nodes(self) -> list[Any]:
        return [node for node, _ in self.in_keys]

    @property
    def keys(self) -> list[tuple[Any, int]]:
        return [(e.node, e.output_nr) for e in self.out_edges]


def edge_key(edge: GradientEdge) -> tuple[Any, int]:
    return (edge.node, edge.output_nr)


def input_keys(tensors: list[Tensor]) -> list[tuple[Any, int]]:
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
            if rule is not None:
                units.append(Unit(mod, name or "<root>", rule, direct))
        for child_name, child in mod.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return units
