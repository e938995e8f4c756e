"""Switches for how robustclip computes, in the spirit of ``torch.backends.cudnn``.

``autotune`` (default ``False``)
    Time the candidate kernels of the products robustclip computes itself on the first call
    for each shape and layout, and reuse the fastest for the rest of the process, as
    ``torch.backends.cudnn.benchmark`` does. The candidates are PyTorch's BLAS product and
    oneDNN's (through a private PyTorch op), in either operand order; the blocking of a
    low-rank update in place; grouped convolution or im2col for a convolution's per-sample
    gradients. On some CPUs this saves 10-15% of a small step; the timing itself runs inside
    the first training step, and the choice is kept in a cache for the whole process.

    Off, only public PyTorch operations run, with a fixed kernel at each call site:
    ``torch.matmul`` for products, ``Tensor.addmm_`` for updates in place, im2col for a
    convolution's per-sample gradients. Both settings compute the same values; only the
    rounding order of float32 products differs. Deterministic mode
    (``torch.use_deterministic_algorithms(True)``) always uses the fixed kernels.

Set it as an attribute, or for a block::

    import robustclip as rc

    rc.backends.autotune = True
    with rc.backends.flags(autotune=False):
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["autotune", "flags"]

#: time kernel candidates once per shape and keep the fastest (see the module docstring)
autotune: bool = False


@contextlib.contextmanager
def flags(*, autotune: bool | None = None) -> Iterator[None]:
    """Set the switches given inside a ``with`` block and restore them after it; ``None`` leaves
    a switch as it is."""
    prev = _get_autotune()
    if autotune is not None:
        if not isinstance(autotune, bool):
            raise TypeError(f"autotune must be True or False, got {autotune!r}.")
        _set_autotune(autotune)
    try:
        yield
    finally:
        _set_autotune(prev)


def _get_autotune() -> bool:
    return autotune


def _set_autotune(value: bool) -> None:
    global autotune
    autotune = value
