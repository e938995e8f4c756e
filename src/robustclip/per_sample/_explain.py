"""``robustclip.explain``: the path every parameterised module takes, said before training.

One forward and one backward pass of the per-sample engine on an example batch, exactly as the
first training step would run them, but without touching ``p.grad`` or the optimizer: the hook
engine's :class:`~robustclip.per_sample._hooks.plan.Plan` says which modules have a rule, which
fall back per module (and why), which parameters are used bare, or why the whole model must
fall back; the terms the pass produces say which norm strategy the cost model picks for each
parameter and how many multiply-adds it predicts (``_hooks/norms.py: cost``), against those of
the plain backward's weight gradient.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from robustclip.per_sample._engine import ParamLayout
from robustclip.per_sample._hooks.capture import release
from robustclip.per_sample._hooks.engine import HookEngine
from robustclip.per_sample._hooks.fallback import PerSampleFallbackWarning
from robustclip.per_sample._hooks.plan import Plan, make_plan
from robustclip.per_sample._hooks.walk import walk

#: predicted cost of the whole-model engines relative to a plain backward: vmap recomputes each
#: sample's forward and backward (about three passes), the loop runs one backward per sample
_WHOLE_COST = {"vmap": 3.0, "loop": None}


@dataclass
class ModulePath:
    """How one module that owns trainable parameters gets its per-sample gradients."""

    name: str
    type: str
    #: ``"rule <Type>"``, ``"per-module fallback"``, ``"bare parameters"``, ``"whole-model
    #: fallback (vmap)"``, ``"engine vmap"``/``"engine loop"``, ``"tied"`` (its parameters are
    #: used only through other modules), or ``"not reached"``
    path: str
    why: str
    #: the norm strategy of each parameter (``keep``, ``ghost``, ``index``, ``chunks``,
    #: ``precomputed`` for a replay), by parameter name
    norms: dict[str, str] = field(default_factory=dict)
    #: predicted multiply-adds of the per-sample work, and of the plain backward's gradient of
    #: the same parameters (0 where not predicted)
    cost: float = 0.0
    plain: float = 0.0

    @property
    def relative_cost(self) -> float | None:
        """Per-sample work over the plain gradient's (None where not predicted)."""
        return self.cost / self.plain if self.plain > 0 else None


@dataclass
class Explanation:
    """What :func:`explain` found; prints as a table."""

    engine: str
    batch: int
    modules: list[ModulePath]
    #: why the whole model falls back (empty: it does not)
    problems: list[str] = field(default_factory=list)
    #: the hook engine's plan of the step (None for the vmap and loop engines)
    plan: Plan | None = None

    @property
    def whole_model_fallback(self) -> bool:
        return bool(self.problems)

    def by_path(self, prefix: str) -> list[ModulePath]:
        return [m for m in self.modules if m.path.startswith(prefix)]

    @property
    def relative_cost(self) -> float | None:
        """The whole model's predicted per-sample work over its plain gradient's."""
        plain = sum(m.plain for m in self.modules)
        return sum(m.cost for m in self.modules) / plain if plain > 0 else None

    def __str__(self) -> str:
        rows = [("module", "path", "norms", "cost", "why")]
        for m in self.modules:
            rel = m.relative_cost
            norms = ", ".join(f"{k}: {v}" for k, v in m.norms.items())
            rows.append((f"{m.name} ({m.type})", m.path, norms, "" if rel is None else f"{rel:.1f}x", m.why))
        width = [max(len(r[k]) for r in rows) for k in range(4)]
        lines = [f"robustclip per-sample plan: engine {self.engine!r}, batch {self.batch}"]
        lines += ["  " + "  ".join(f"{r[k]:<{width[k]}}" for k in range(4)) + f"  {r[4]}".rstrip() for r in rows]
        total = self.relative_cost
        if total is not None:
            lines.append(f"  predicted per-sample work: {total:.1f}x the plain backward's weight gradients")
        for p in self.problems:
            lines.append(f"  whole-model fallback: {p}")
        return "\n".join(lines)


def explain(
    model: nn.Module,
    example: Any,
    losses_fn: Callable[[Any], Tensor],
    method: Any = None,
    *,
    params: Sequence[Tensor] | None = None,
    file: TextIO | None = None,
    quiet: bool = False,
) -> Explanation:
    """Print and return, for each module that owns trainable parameters, the path its
    per-sample gradients take (a layer rule, the per-module fallback, bare parameters, the
    whole-model fallback), why, its norm strategy and its predicted cost relative to the plain
    backward.

    Runs one forward and one backward pass on ``example`` as the first training step would,
    without touching ``p.grad``; dropout draws and BatchNorm statistics advance as in a step.

    Args:
        model: the model, as given to :class:`robustclip.Clipper`.
        example: one batch: a tensor (``model(example)``), a tuple (``model(*example)``), a dict
            (``model(**example)``), or a function ``example(model)`` that calls the model.
        losses_fn: the model's output -> per-sample losses of shape ``(B,)``, as passed to
            ``clipper.backward``.
        method: the per-sample method (``rc.per_sample_clip(...)``); its ``engine`` decides the
            engine (default: the hook engine).
        params: the parameters to train (default: every parameter that requires grad).
        file: where to print the table (default: ``sys.stdout``).
        quiet: do not print; only return the :class:`Explanation`.

    Example::

        plan = rc.explain(model, {"input_ids": ids}, lambda out: my_losses(out.logits, labels))
        assert not plan.whole_model_fallback
    """
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    layout = ParamLayout.build(model, params)
    engine_name = _engine_name(method)
    if engine_name != "hooks":
        result = _whole_engine(model, layout, example, losses_fn, engine_name)
    else:
        result = _hooks(model, layout, example, losses_fn)
    if not quiet:
        print(result, file=file if file is not None else sys.stdout)
    return result


def _engine_name(method: Any) -> str:
    from robustclip._method import as_method
    from robustclip.per_sample import ENGINES
    from robustclip.per_sample._engine import auto_engine

    if method is None:
        return auto_engine(ENGINES)
    est = as_method(method).estimator
    name = getattr(est, "engine", None)
    if not getattr(est, "per_sample", False) or name is None:
        raise ValueError(f"explain needs a per-sample method (rc.per_sample_clip, rc.per_sample_normalize), got {est!r}.")
    return auto_engine(ENGINES) if name == "auto" else str(name)


def _call(model: nn.Module, example: Any) -> Any:
    if callable(example) and not isinstance(example, (Tensor, nn.Module)):
        return example(model)
    if isinstance(example, Tensor):
        return model(example)
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    raise TypeError(
        f"example must be a tensor, a tuple, a dict or a function of the model, got {type(example).__name__}."
    )


def _losses(model: nn.Module, example: Any, losses_fn: Callable[[Any], Tensor]) -> Tensor:
    with torch.enable_grad():
        losses = losses_fn(_call(model, example))
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        raise ValueError(
            "losses_fn must return one loss per sample, shape (B,); got "
            f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}."
        )
    return losses


def _owners(model: nn.Module, layout: ParamLayout) -> list[tuple[str, nn.Module, dict[str, int]]]:
    """Each module that directly owns trainable parameters, with them (name -> layout index)."""
    index = {id(p): i for i, p in enumerate(layout.params)}
    out = []
    for name, mod in model.named_modules():
        own = {n: index[id(p)] for n, p in mod.named_parameters(recurse=False) if id(p) in index}
        if own:
            out.append((name or "<root>", mod, own))
    return out


def _whole_engine(model: nn.Module, layout: ParamLayout, example: Any, losses_fn: Callable[[Any], Tensor], name: str) -> Explanation:
    losses = _losses(model, example, losses_fn)
    why = "chosen engine: " + ("one torch.func vmap over the whole model" if name == "vmap" else "one backward per sample")
    rel = _WHOLE_COST.get(name)
    mods = [
        ModulePath(n, type(m).__name__, f"engine {name}", why, cost=(rel or 0.0), plain=1.0 if rel else 0.0)
        for n, m, _ in _owners(model, layout)
    ]
    return Explanation(name, losses.shape[0], mods)


def _hooks(model: nn.Module, layout: ParamLayout, example: Any, losses_fn: Callable[[Any], Tensor]) -> Explanation:
    engine = HookEngine(model, layout)
    with warnings.catch_warnings():
        # explain says all the warnings would say, in its table
        warnings.simplefilter("ignore", PerSampleFallbackWarning)
        engine.attach()
    calls = []
    try:
        losses = _losses(model, example, losses_fn)
        calls = engine.recorder.take()
        if losses.grad_fn is None:
            raise ValueError("the losses have no autograd graph; compute them from the model's output.")
        batch = losses.shape[0]
        plan = make_plan(calls, walk(losses.grad_fn, calls, engine._index), batch, layout)
        if plan.problems:
            return _whole_model_fallback(model, layout, batch, plan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PerSampleFallbackWarning)
            retain = engine.fallbacks.prepare(plan.fallbacks)
            got = engine._backward(plan, losses, retain)
        for idx, p in enumerate(layout.params):
            if idx not in got.how and got.terms.get(idx):
                got.take_norms(idx, p, batch, engine.transient_elements)
        by_module: dict[int, tuple[str, str]] = {}
        for j, (_, how, detail) in zip(plan.rules, plan.rows()):
            mod = j.call.unit.module
            by_module.setdefault(id(mod), (f"rule {type(mod).__name__}", f"{how}{'; ' + detail if detail else ''}"))
        for c in plan.fallbacks:
            mode = "graph mode, one backward per sample" if id(c.unit) in engine.fallbacks.graph_mode else "torch.func replay"
            inside = f" (inside '{c.unit.name}')"
            for sub in c.unit.module.modules():
                why = f"{c.unit.reason}; {mode}{inside if sub is not c.unit.module else ''}"
                by_module.setdefault(id(sub), ("per-module fallback", why))
        bare = {b.idx: b for b in plan.bare}
        used_by: dict[int, str] = {}
        for j in plan.rules:
            for i in j.call.unit.params.values():
                used_by.setdefault(i, j.call.unit.name)
        mods = []
        for name, mod, own in _owners(model, layout):
            if id(mod) in by_module:
                route, why = by_module[id(mod)]
            elif any(i in bare for i in own.values()):
                route, why = "bare parameters", "used outside any layer; broadcast by " + ", ".join(
                    plan_row_via(plan, i) for i in own.values() if i in bare
                )
            elif any(i in used_by for i in own.values()):
                via = sorted({used_by[i] for i in own.values() if i in used_by})
                route, why = "tied", f"its parameters are used through {', '.join(via)}"
            else:
                route, why = "not reached", "the losses do not depend on it"
            norms = {n: got.how[i][0] for n, i in own.items() if i in got.how}
            cost = sum(got.how[i][1] for i in own.values() if i in got.how)
            plain = sum(got.how[i][2] for i in own.values() if i in got.how)
            mods.append(ModulePath(name, type(mod).__name__, route, why, norms, cost, plain))
        return Explanation("hooks", batch, mods, plan=plan)
    finally:
        engine.detach()
        release(calls)


def plan_row_via(plan: Plan, idx: int) -> str:
    from robustclip.per_sample._hooks.plan import _via

    return ", ".join(sorted({_via(b.site) for b in plan.bare if b.idx == idx}))


def _whole_model_fallback(model: nn.Module, layout: ParamLayout, batch: int, plan: Plan) -> Explanation:
    import robustclip.per_sample._hooks.fallback as fb

    random = any(m.training and m.p > 0 for m in model.modules() if isinstance(m, fb.DROPOUT))
    name = "loop" if random else "vmap"
    why = "; ".join(plan.problems[:2])
    rel = _WHOLE_COST.get(name)
    mods = [
        ModulePath(n, type(m).__name__, f"whole-model fallback ({name})", why, cost=(rel or 0.0), plain=1.0 if rel else 0.0)
        for n, m, _ in _owners(model, layout)
    ]
    return Explanation("hooks", batch, mods, problems=list(plan.problems), plan=plan)
