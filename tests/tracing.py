"""tracemalloc helpers for the memory tests.

NumPy reports its allocations to tracemalloc, so on the NumPy backend tracemalloc sees
what a step really holds and allocates: the memory claims are measured with these.
"""

import contextlib
import tracemalloc

import numpy as np


@contextlib.contextmanager
def tracing():
    """tracemalloc on for the block (and left on if something else had started it)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        yield
    finally:
        if started:
            tracemalloc.stop()


def traced_now() -> int:
    return tracemalloc.get_traced_memory()[0]


def traced_peak() -> int:
    return tracemalloc.get_traced_memory()[1]


def step_peak(step) -> int:
    """Bytes a call allocates at its peak beyond what was held before it."""
    base = traced_now()
    tracemalloc.reset_peak()
    step()
    return traced_peak() - base


def numpy_data_now() -> int:
    """Bytes of array data NumPy holds (its own tracemalloc domain): unlike the total,
    free of Python objects' noise (ctypes keeps a few KiB of small objects around)."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
    return sum(trace.size for trace in snapshot.traces)
