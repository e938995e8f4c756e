"""Per-layer rules of the hook engine: one file per layer type, registered here.

A rule turns one call of a layer, seen as its input ``x`` (batch first) and the gradient of the
loss sum with respect to its output ``grad_out`` (batch first), into one
:class:`~robustclip.per_sample.rules._terms.Term` per trainable parameter: a lazy description of
the per-sample gradients from which the engine takes norms and the clipped sum without holding
``B x params`` numbers (see ``_terms.py``).

Adding a layer type is adding a file::

    # rules/my_layer.py
    from robustclip.per_sample.rules import register
    from robustclip.per_sample.rules._terms import DenseTerm, OuterTerm

    @register(MyLayer)
    def my_layer_terms(module, x, grad_out, names):
        return {"weight": OuterTerm(...)}

and importing it at the bottom of this file. Every rule is tested against the batch-of-one
oracle in ``tests/test_layer_rules.py``: add the layer there too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from robustclip.per_sample.rules._terms import Term

#: terms(module, x, grad_out, names) -> {parameter name: Term} for the trainable ``names``
TermsFn = Callable[[nn.Module, Tensor, Tensor, frozenset], dict[str, Term]]


@dataclass(frozen=True)
class Rule:
    module_type: type
    terms: TermsFn
    #: returns why a particular module of this type is not covered (an option the rule does not
    #: model, e.g. ``scale_grad_by_freq``), or None
    unsupported: Callable[[nn.Module], str | None]


RULES: dict[type, Rule] = {}


def register(module_type: type, unsupported: Callable[[nn.Module], str | None] | None = None):
    """Decorator: register ``fn`` as the rule of ``module_type`` (exact type and subclasses that
    keep its ``forward``)."""

    def deco(fn: TermsFn) -> TermsFn:
        RULES[module_type] = Rule(module_type, fn, unsupported or (lambda m: None))
        return fn

    return deco


def rule_for(module: nn.Module) -> tuple[Rule | None, str]:
    """The rule covering ``module``, or ``(None, reason)``."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is None:
            continue
        if type(module).forward is not cls.forward:
            return None, f"it subclasses {cls.__name__} but overrides forward()"
        why = rule.unsupported(module)
        if why:
            return None, why
        return rule, ""
    return None, "no per-sample rule is registered for its type"


# the rules, one file per layer type (importing registers them)
from robustclip.per_sample.rules import (  # noqa: E402
    broadcast,
    conv,
    embedding,
    group_norm,
    layer_norm,
    linear,
    rms_norm,
)

__all__ = ["RULES", "Rule", "broadcast", "conv", "embedding", "group_norm", "layer_norm", "linear", "register", "rms_norm", "rule_for"]
