"""Timing and memory machinery shared by the step suites (``suite_step.py``, ``suite_zoo.py``).

Timing: :func:`timed_rounds` lets the methods take turns round by round, so that load from other
processes hits all of them alike; :func:`set_paired_ratio` turns the rounds into a ratio against
the plain step paired within each round. Memory: :func:`measure_memory` builds a step in a fresh
(spawned) process, after :func:`prepare_memory_process`, and measures it with
:func:`step_memory`; see ``suite_step.py`` for how the extra memory of one step is measured.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import robustclip as rc

# -- memory (fresh process per method) -----------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the mark then dates from this process's start, which is before the baseline


def _release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``), so that the next step's
    allocations show up in the RSS instead of reusing pages the previous steps left resident."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: glibc's mallopt parameter for the size above which an allocation gets its own mapping
_M_MMAP_THRESHOLD = -3


def _fixed_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Give every allocation of ``nbytes`` or more its own mapping, returned to the OS at free.

    glibc's default threshold moves: after a large block is freed, blocks up to its size come
    from the heap, whose freed pages stay resident. Whether a step's large temporaries then
    count in the RSS depends on what ran before (plain steps read 2-4 MB on the MLP and 67-109
    MB on the CNN from one process to the next). Fixed, the RSS follows the memory in use.
    Measurement processes only: the library sets no allocator options."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):
        pass


def add_autotune_argument(
    parser: Any,
    help: str = "robustclip.backends.autotune: time kernel candidates and keep the fastest (on), or "
    "PyTorch's plain kernels (off, the default)",
) -> None:
    parser.add_argument("--autotune", choices=["on", "off"], default="off", help=help)


def prepare_memory_process(conf: dict) -> None:
    """The settings every memory process starts with: the fixed mmap threshold, no warnings,
    the parent's thread count and autotune setting."""
    _fixed_mmap_threshold()
    warnings.simplefilter("ignore")
    if conf["threads"]:
        torch.set_num_threads(conf["threads"])
    rc.backends.autotune = conf["autotune"]


def _measured_step(step: Callable[[], None], cuda: bool) -> float:
    """The extra memory (MB) of one call of ``step`` above the memory in use just before it."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _release_free_memory()
        _reset_peak_rss()
        base = _status_kb("VmRSS") * 1024
    step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kb("VmHWM") * 1024
    return max(peak - base, 0) / 2**20


def step_memory(step: Callable[[], None], cuda: bool, warmup: int, steps: int) -> tuple[float, float]:
    """(the very first step's extra memory, the median of ``steps`` measured steps after
    ``warmup`` unmeasured ones), in MB."""
    first = _measured_step(step, cuda)
    for _ in range(warmup):
        step()
    steady = statistics.median(_measured_step(step, cuda) for _ in range(steps))
    return first, steady


def _memory_worker(make: Callable[[dict], Callable[[], None]], conf: dict, queue: Any) -> None:
    try:
        prepare_memory_process(conf)
        step = make(conf)
        peaks = step_memory(step, conf["device"].startswith("cuda"), conf["warmup"], conf["steps"])
        queue.put((peaks, None))
    except Exception as e:  # reported in the record, not fatal for the suite
        queue.put((None, f"{type(e).__name__}: {e}"))


def measure_memory(
    make: Callable[[dict], Callable[[], None]], conf: dict
) -> tuple[tuple[float, float] | None, str | None]:
    """The extra memory of one step in a fresh (spawned) process: ``make(conf)`` (a module-level
    function, so that the new process can import it) builds the step there. ``conf`` names the
    ``device``, ``threads``, ``autotune``, ``warmup`` and ``steps`` (see :func:`step_memory`).
    Returns ((first step, steady) MB, None), or (None, the error) where the process failed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(make, conf, queue))
    proc.start()
    try:
        result = queue.get(timeout=1800)
    finally:
        proc.join()
    return result


def record_memory(rec: dict, make: Callable[[dict], Callable[[], None]], conf: dict) -> None:
    """Measure as :func:`measure_memory` does and put ``peak_mb`` (steady), ``first_step_peak_mb``
    or the process's error (``note``) into ``rec``."""
    peaks, err = measure_memory(make, conf)
    if peaks is not None:
        rec["first_step_peak_mb"] = round(peaks[0], 1)
        rec["peak_mb"] = round(peaks[1], 1)
    if err:
        rec["note"] = f"memory run failed: {err}"


# -- timing -------------------------------------------------------------------------------------------


def timed_rounds(
    steps: dict[str, Callable[[], None]],
    *,
    warmup: int,
    rounds: int,
    steps_per_round: int,
    sync: Callable[[], None],
    ignore: type[Warning] = Warning,
) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """Every timed step of each method (seconds), and per round each method's median step.

    ``warmup`` untimed steps per method first; then per round, each method in turn runs one
    untimed step (it absorbs what the previous method left: freed memory, caches) and
    ``steps_per_round`` timed ones. The per-round medians pair the ratios within a round (the
    load of other processes drifts over minutes; a round's methods run within a second or so).
    Warnings of category ``ignore`` are silenced while the steps run."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    per_round: list[dict[str, float]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ignore)
        for _ in range(warmup):
            for f in steps.values():
                f()
        for _ in range(rounds):
            this_round: dict[str, float] = {}
            for method, f in steps.items():
                f()
                ts = []
                for _ in range(steps_per_round):
                    sync()
                    t0 = time.perf_counter()
                    f()
                    sync()
                    ts.append(time.perf_counter() - t0)
                times[method] += ts
                this_round[method] = statistics.median(ts)
            per_round.append(this_round)
    return times, per_round


def set_paired_ratio(rec: dict, method: str, rounds: list[dict[str, float]]) -> None:
    """Put the median over rounds of ``method``'s step over the plain step's in the same round,
    and its interquartile range, into ``rec``."""
    paired = sorted(r[method] / r["plain"] for r in rounds)
    rec["ratio_vs_plain_paired"] = round(statistics.median(paired), 3)
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    rec["ratio_vs_plain_paired_iqr"] = [round(q[0], 3), round(q[2], 3)]


def opacus_available() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True
