"""Unpickling data files without letting them run code.

The CIFAR "python version" archives are pickles of dicts of bytes, lists and numpy arrays. A
plain ``pickle.loads`` of such a file would call whatever function the file names, so a file
planted in ``data_dir`` could run code. :func:`load_data_pickle` resolves only the few names that
rebuilding numpy arrays needs, and refuses every other.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

__all__ = ["UnsafePickleError", "load_data_pickle"]

#: the globals a pickle of plain containers and numpy arrays refers to (numpy 1.x and 2.x names;
#: ``_codecs.encode`` is how protocol 2 stores bytes)
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names a function or class other than those plain data needs."""


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(f"{module}.{name}")
        return super().find_class(module, name)


def load_data_pickle(data: bytes, what: str) -> Any:
    """Unpickle ``data`` (the bytes of the file ``what``) allowing only plain data and numpy arrays.

    Raises:
        ValueError: the file names anything else (it is not read further), or is not a pickle.
    """
    try:
        return _DataUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as e:
        raise ValueError(
            f"{what} was refused: it is a pickle that calls {e}, which a data file never needs and "
            "which could run code; replace it with the original file from the data set's site."
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{what} cannot be read ({type(e).__name__}: {e}); is it damaged? Fetch it again.") from None
