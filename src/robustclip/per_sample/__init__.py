"""Per-sample gradient engines (see ``_engine.py`` for the contract)."""

from robustclip.per_sample._engine import ParamLayout, PerSampleEngine, WeightFn
from robustclip.per_sample._hooks import HookEngine, PerSampleFallbackWarning
from robustclip.per_sample._loop import LoopEngine
from robustclip.per_sample._vmap import VmapEngine

#: engine name -> class; the hook engine registers itself here when it is importable.
ENGINES: dict[str, type[PerSampleEngine]] = {"loop": LoopEngine, "vmap": VmapEngine, "hooks": HookEngine}

__all__ = [
    "ENGINES",
    "HookEngine",
    "LoopEngine",
    "ParamLayout",
    "PerSampleEngine",
    "PerSampleFallbackWarning",
    "VmapEngine",
    "WeightFn",
]
