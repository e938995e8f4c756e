"""Start torch.distributed test workers, retrying once when a worker dies by a signal.

gloo can abort a process while tearing down ("terminate called without an active
exception"), rarely and unrelated to the code under test. A worker that *raises* (a failed
check) is never retried: only a death by signal is.
"""

from __future__ import annotations

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessExitedException


def spawn(fn, args_for, nprocs: int, retries: int = 1) -> None:
    """``args_for(attempt)`` gives the workers' arguments; each attempt needs its own
    rendezvous (a file store left by a dead attempt cannot be reused)."""
    for attempt in range(retries + 1):
        try:
            mp.spawn(fn, args=args_for(attempt), nprocs=nprocs, join=True)
            return
        except ProcessExitedException:
            if attempt == retries:
                raise
