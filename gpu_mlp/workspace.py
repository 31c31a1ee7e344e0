"""The engine's buffer pool: allocated once per batch shape, reused every step.

A training step takes its activation and delta buffers from here and gives each back
as soon as the backward pass is done with it (MATH.md, Remark 8 (iii)), so a buffer
freed by one layer serves the next layer of the same shape. After the first step with
a batch shape the free lists hold every buffer the step needs: the steady state
allocates nothing, which ``allocations`` lets tests and benchmarks see.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


class Workspace:
    def __init__(self, xp, dtype):
        self.xp, self.dtype = xp, np.dtype(dtype)
        self._ones = {}
        self._free = defaultdict(list)
        self.allocations = 0     # buffers ever created
        self.bytes = 0           # bytes held, in use or free
        self.in_use_bytes = 0
        self.peak_in_use_bytes = 0

    def take(self, shape, dtype=None):
        """A C-contiguous buffer of ``shape`` (contents undefined)."""
        key = (tuple(shape), np.dtype(dtype or self.dtype))
        free = self._free[key]
        if free:
            buf = free.pop()
        else:
            buf = self.xp.empty(key[0], dtype=key[1])
            self.allocations += 1
            self.bytes += buf.nbytes
        self.in_use_bytes += buf.nbytes
        self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
        return buf

    def ones(self, n: int):
        """A vector of n ones (kept for good: the bias gradient is a GEMV against it)."""
        if n not in self._ones:
            self._ones[n] = self.xp.ones(n, dtype=self.dtype)
            self.allocations += 1
            self.bytes += self._ones[n].nbytes
        return self._ones[n]

    def give(self, *buffers) -> None:
        """Return buffers to the pool; the caller must not touch them afterwards."""
        for buf in buffers:
            self.in_use_bytes -= buf.nbytes
            self._free[(buf.shape, buf.dtype)].append(buf)

    def clear(self) -> None:
        """Drop every free buffer (their memory returns to NumPy's or CuPy's allocator)."""
        self._free.clear()
        self._ones.clear()
        self.bytes = self.in_use_bytes
