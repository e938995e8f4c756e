"""Per-layer rules of the hook engine: one file per layer type, registered here.

How to write a rule
-------------------
A rule sees one call of a layer as its input ``x`` (batch first) and the gradient of the loss
sum with respect to its output, ``grad_out`` (batch first), and returns one :class:`Term` per
trainable parameter (``names``: the parameters being trained). A term is a lazy description
of the per-sample gradients ``g_i`` of that parameter, from which the engine takes norms and the
clipped sum without holding ``B x params`` numbers (``_terms.py``):

* :class:`OuterTerm` ``(u, v, n_u, shape, dtype)``: ``g_i = sum_{k,t} u[i,k,t] (x) v[i,k,t]``,
  a sum of outer products over ``T`` positions in ``K`` blocks (weights of Linear, Conv,
  Embedding); its norm has a Gram ("ghost") form;
* :class:`DenseTerm` ``(g)``: the per-sample gradients themselves, ``(B, *shape)``, for
  parameters no larger than the activations they come from (biases, normalisation scales).

Adding a layer type is adding a file::

    # rules/my_scale.py                   y = x * weight, weight of shape (C,)
    from robustclip.per_sample.rules import DenseTerm, register

    @register(MyScale)
    def my_scale_terms(module, x, grad_out, names):
        b = grad_out.shape[0]
        per_sample = (grad_out * x).reshape(b, -1, module.weight.shape[0]).sum(1)
        return {"weight": DenseTerm(per_sample)} if "weight" in names else {}

importing it at the bottom of this file, and adding a case to the table ``CASES`` of
``tests/test_layer_rules.py``, which tests every registered rule against the batch-of-one
oracle (a registered type without a case fails the tests).

A layer type robustclip cannot import (a class of another library, such as Hugging Face's
``Conv1D``) is registered by name with :func:`register_match` and a predicate that recognises
its modules by their class name, module path and attributes; its case in ``CASES`` is keyed by
that name.

A rule also declares its own special cases, as keywords of :func:`register`:

* ``unsupported(module)``: why this particular module is not covered (an option the rule does
  not model), or None; such modules take the per-module fallback;
* ``source_param(module, names)``: the name of a trainable parameter whose gradient, requested
  in place of the layer's output, makes autograd compute the output gradient more cheaply
  (the engine requests one gradient below the first layers so that the backward pass reaches
  them; see ``_hooks/plan.py``), or None for the output itself;
* ``full_call=True``: the rule needs the whole call (a layer with several inputs and options,
  such as attention): its ``terms`` function also gets ``call=(args, kwargs)``, the arguments
  the layer was called with; ``x`` is the first. A tuple output is differentiated through its
  first tensor;
* ``out_batch_dim(module)``: the dimension of the output that holds the batch, when not 0
  (sequence-first layers); the output gradient the rule gets is as the layer returned it;
* ``repack(module, output, call)``: for layers with several outputs the losses may use: returns
  ``(packed, new_output)``, a batch-first tensor computed from all the outputs and a
  replacement output made of views of it (values unchanged), or None to leave the call
  unrecorded; the rule then gets the gradient of ``packed``. ``call`` is ``(args, kwargs)``
  of the call, the same objects the rule's ``terms`` later gets (a rule may key what it keeps
  of the call on them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from torch import Tensor, nn

from robustclip.per_sample.rules._terms import DenseTerm, OuterTerm, Term

M = TypeVar("M", bound=nn.Module)
#: terms(module, x, grad_out, names[, call]) -> {parameter name: Term} for the trainable ``names``
TermsFn = Callable[..., dict[str, Term]]
#: unsupported(module) -> why this module is not covered, or None
UnsupportedFn = Callable[[nn.Module], str | None]
#: source_param(module, names) -> the parameter to request for the output's gradient, or None
SourceFn = Callable[[nn.Module, frozenset[str]], str | None]
#: out_batch_dim(module) -> the dimension of the output that holds the batch
BatchDimFn = Callable[[nn.Module], int]
#: repack(module, output, (args, kwargs)) -> (one batch-first tensor of all outputs, the output
#: made of its views)
RepackFn = Callable[[nn.Module, Any, tuple[tuple[Any, ...], dict[str, Any]]], tuple[Tensor, Any] | None]
F = TypeVar("F", bound=Callable[..., dict[str, Term]])


def _covered(module: nn.Module) -> str | None:
    return None


def _output_itself(module: nn.Module, names: frozenset[str]) -> str | None:
    return None


def _batch_first(module: nn.Module) -> int:
    return 0


@dataclass(frozen=True)
class Rule:
    """A layer type's rule and the special cases it declares (see the module docstring)."""

    #: the registered type, or the name of a rule registered by :func:`register_match`
    module_type: type | str
    terms: TermsFn
    unsupported: UnsupportedFn = _covered
    source_param: SourceFn = _output_itself
    #: predicate of a rule registered by :func:`register_match`
    matches: Callable[[nn.Module], bool] | None = None
    #: the terms function also gets ``call=(args, kwargs)``
    full_call: bool = False
    out_batch_dim: BatchDimFn = _batch_first
    repack: RepackFn | None = None

    @property
    def name(self) -> str:
        t = self.module_type
        return t if isinstance(t, str) else t.__name__


RULES: dict[type, Rule] = {}
#: rules of layer types recognised without importing them, by name
MATCHED: dict[str, Rule] = {}


def register(
    module_type: type[M],
    unsupported: Callable[[M], str | None] | None = None,
    *,
    source_param: Callable[[M, frozenset[str]], str | None] | None = None,
    full_call: bool = False,
    out_batch_dim: Callable[[M], int] | None = None,
    repack: Callable[[M, Any, tuple[tuple[Any, ...], dict[str, Any]]], tuple[Tensor, Any] | None] | None = None,
) -> Callable[[F], F]:
    """Decorator: register ``fn`` as the rule of ``module_type`` (exact type and subclasses that
    keep its ``forward``), with its declared special cases."""

    def deco(fn: F) -> F:
        # the Rule only calls these on instances of module_type, so narrowing M to Module is safe
        RULES[module_type] = Rule(
            module_type,
            fn,
            cast(UnsupportedFn, unsupported or _covered),
            cast(SourceFn, source_param or _output_itself),
            full_call=full_call,
            out_batch_dim=cast(BatchDimFn, out_batch_dim or _batch_first),
            repack=cast(RepackFn | None, repack),
        )
        return fn

    return deco


def register_match(
    name: str,
    matches: Callable[[nn.Module], bool],
    unsupported: Callable[[nn.Module], str | None] | None = None,
    *,
    source_param: Callable[[nn.Module, frozenset[str]], str | None] | None = None,
) -> Callable[[F], F]:
    """Decorator: register ``fn`` as the rule, named ``name``, of the modules ``matches(module)``
    accepts: layer types of other libraries, recognised without importing them. ``matches``
    must also refuse subclasses that change the forward pass."""

    def deco(fn: F) -> F:
        MATCHED[name] = Rule(
            name,
            fn,
            unsupported or _covered,
            source_param or _output_itself,
            matches,
        )
        return fn

    return deco


def rule_for(module: nn.Module) -> tuple[Rule | None, str]:
    """The rule covering ``module``, or ``(None, reason)``."""
    for matched in MATCHED.values():
        assert matched.matches is not None
        if matched.matches(module):
            why = matched.unsupported(module)
            return (None, why) if why else (matched, "")
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is None:
            continue
        if type(module).forward is not getattr(cls, "forward", None):
            return None, f"it subclasses {cls.__name__} but overrides forward()"
        why = rule.unsupported(module)
        if why:
            return None, why
        return rule, ""
    return None, "no per-sample rule is registered for its type"


def supported_layers() -> str:
    """The layer types that have a rule, for messages: ``"Conv1d, Conv2d, ..."``."""
    return ", ".join([t.__name__ for t in RULES] + list(MATCHED))


# the rules, one file per layer type (importing registers them)
from robustclip.per_sample.rules import (  # noqa: E402
    affine_norm,
    attention,
    broadcast,
    conv,
    conv_transpose,
    embedding,
    embedding_bag,
    group_norm,
    hf_conv1d,
    instance_norm,
    layer_norm,
    linear,
    recurrent,
    rms_norm,
)

__all__ = [
    "MATCHED",
    "RULES",
    "DenseTerm",
    "OuterTerm",
    "Rule",
    "Term",
    "affine_norm",
    "attention",
    "broadcast",
    "conv",
    "conv_transpose",
    "embedding",
    "embedding_bag",
    "group_norm",
    "hf_conv1d",
    "instance_norm",
    "layer_norm",
    "linear",
    "recurrent",
    "register",
    "register_match",
    "rms_norm",
    "rule_for",
    "supported_layers",
]
