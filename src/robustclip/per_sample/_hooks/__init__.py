"""The hook engine (one forward, one backward, no per-sample gradients held), one file per phase.

* ``capture.py``: which modules are watched (units) and what each forward call records;
* ``walk.py``: the walk of the losses' autograd graph over the recorded calls;
* ``plan.py``: the jobs of a step, before any gradient is computed (pure);
* ``norms.py``: per-sample squared norms of a parameter, the cost model and its strategies;
* ``fallback.py``: per-sample terms of modules no rule covers (torch.func replay, graph mode);
* ``verify.py``: the checks against silent errors;
* ``engine.py``: :class:`HookEngine`, which runs a step through them.

The layer rules live in ``per_sample/rules/``.
"""

from robustclip.per_sample._hooks.engine import HookEngine, PerSampleFallbackWarning

__all__ = ["HookEngine", "PerSampleFallbackWarning"]
