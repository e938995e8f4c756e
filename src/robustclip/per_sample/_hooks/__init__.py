"""The hook engine (one forward, one backward, no per-sample gradients held); see ``engine.py``."""

from robustclip.per_sample._hooks.engine import HookEngine, PerSampleFallbackWarning

__all__ = ["HookEngine", "PerSampleFallbackWarning"]
