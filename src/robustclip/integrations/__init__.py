"""robustclip inside training frameworks that step the optimizer themselves.

* :mod:`robustclip.integrations.transformers`: ``RobustClipTrainer`` (Hugging Face ``Trainer``)
  and ``RobustClipMixin`` for other ``Trainer`` subclasses; ``pip install robustclip[transformers]``.
* :mod:`robustclip.integrations.lightning`: ``RobustClipCallback`` (batch-level methods) and
  ``RobustClipModule`` (any method); ``pip install robustclip[lightning]``.
* accelerate needs no module: :meth:`robustclip.Clipper.finish` fits its loop, see
  ``docs/integrations.md``.

Importing :mod:`robustclip` never imports a framework; each submodule imports its own and says
which extra to install when it is missing.
"""
