"""The engine's buffer pool: allocated once, reused every step, whatever the batch size.

A training step takes its activation and delta buffers from here and gives each back
as soon as the backward pass is done with it (docs/MATH.md, "Memory modes"), so a buffer
freed by one layer serves the next layer of the same width. Buffers are kept per *row
shape* (the shape without the batch dimension) and sized for the most rows asked for so
far; a smaller batch gets a view of their first rows (convolutions' column buffers,
which the layers take one at a time, share one pool whatever their width:
``take_columns``). So a full batch, the remainder, or any number of sizes in turn all
run on the same buffers: after the first step with the largest batch the steady state
allocates nothing, which ``allocations`` lets tests and benchmarks see. The memory held
is bounded by the largest batch. On a GPU a training step's batch from the host is
copied into a buffer kept for its shape (:meth:`Workspace.staged`), which a captured
step reads as its input.

Two sizes of what is held: ``bytes`` is what the workspace asked for (the buffers'
``nbytes``); ``pool_bytes`` is what the allocator holds for them. On NumPy the two are
equal (NumPy's allocator reports no rounding of its own). CuPy's memory pool rounds every
request up to a multiple of 512 bytes (``ALLOCATION_UNIT_SIZE`` and ``_round_size`` in
cupy/cuda/memory.pyx), and its ``used_bytes()`` counts those rounded sizes for the
blocks in use: the workspace's buffers add exactly ``pool_bytes`` to it. Its
``total_bytes()`` is another measure -- device memory obtained from cudaMalloc, free
blocks included; ``free_all_blocks()`` cannot release a free block split off an
allocation that is still partly in use, and a new buffer may be cut from such a block
without the total growing -- so the total grows by neither size.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, defaultdict

import numpy as np

from .device import write

# CuPy's MemoryPool rounds every allocation up to a multiple of this (cupy/cuda/memory.pyx:
# ALLOCATION_UNIT_SIZE, used by _round_size; the same from CuPy 7 to 14)
CUPY_ALLOCATION_UNIT = 512
COLUMNS = "columns"  # the key of the one pool of column buffers (take_columns)
# host batches kept on the device (Workspace.staged): one per shape and dtype, the most
# recently used -- a full batch and the remainder, X and Y, with room to spare
STAGED = 8


class Workspace:
    def __init__(self, xp, dtype):
        self.xp, self.dtype = xp, np.dtype(dtype)
        self._free = defaultdict(list)  # (row shape, dtype) -> free base buffers
        self._rows = {}                 # (row shape, dtype) -> rows of its base buffers
        self._ones = None
        self._staged = OrderedDict()  # (shape, dtype) -> a host batch's device copy
        self._losses, self._turn = [None, None], 0  # the steps' 0-d losses, in turn
        self._unheld = [object()]  # what sys.getrefcount says of an entry held nowhere else
        self.allocations = 0     # buffers ever created
        self.outgrown = 0        # buffers released on their return, outgrown while in use
        self.bytes = 0           # bytes held, in use or free: the buffers' nbytes
        self.pool_bytes = 0      # the same buffers as the allocator holds them (see above)
        self._unit = 1 if xp is np else CUPY_ALLOCATION_UNIT
        self.in_use_bytes = 0
        self.peak_in_use_bytes = 0
        self._columns = set()    # ids of the column pool's (1-D) bases, while held
        # the most samples a training step has run on (the network sets it): what the
        # buffers are sized for, which decides what a step keeps (ops.keeps_columns)
        self.largest_batch = 0

    def take(self, shape, dtype=None):
        """A C-contiguous buffer of ``shape`` (contents undefined)."""
        return self._take(shape[0], (tuple(shape[1:]),
                                     self.dtype if dtype is None else np.dtype(dtype)))

    def take_columns(self, rows: int, K: int):
        """A (rows, K) buffer from one pool that every width K shares: a convolution's
        column buffer, which the layers of a net take one at a time -- so the net holds
        one, not one per K."""
        return self._take(rows * K, (COLUMNS, self.dtype)).reshape(rows, K)

    def _take(self, rows: int, key):
        size = self._rows.get(key, 0)  # read once: free_buffers() may clear it meanwhile
        if rows > size:
            # grow: the smaller free buffers go now, those in use when they come back
            self._release(_drained(self._free.pop(key, [])))
            self._rows[key] = size = rows
        try:  # (empty, or emptied meanwhile by free_buffers() in another thread)
            base = self._free[key].pop()
        except IndexError:
            base = None
        if base is None and key[0] == COLUMNS:
            base = self.xp.empty(size, dtype=key[1])
            self._count(base)
            self._columns.add(id(base))
        elif base is None:
            base = self.xp.empty((size,) + key[0], dtype=key[1])
            self._count(base)
        self.in_use_bytes += base.nbytes
        if self.in_use_bytes > self.peak_in_use_bytes:
            self.peak_in_use_bytes = self.in_use_bytes
        return base[:rows]

    def ones(self, n: int):
        """A vector of n ones (kept for good: the bias gradient is a GEMV against it)."""
        ones = self._ones  # read once: free_buffers() may drop it meanwhile
        if ones is None or ones.shape[0] < n:
            self._release([ones] if ones is not None else [])
            # (copied from the host: CuPy's ones() is a fill kernel it compiles first)
            ones = self._ones = self.xp.empty(n, dtype=self.dtype)
            write(ones, np.ones(n, dtype=self.dtype))
            self._count(ones)
        return ones[:n]

    def loss(self):
        """A 0-d buffer for a step's loss: two kept, taken in turn, so the loss the last
        step returned stays as it is during the next. One still referenced outside when
        its turn comes back (e.g. kept in a list) is left to its holder and replaced: a
        loss handed out never changes, and a loop that keeps only the latest loss, or
        none, allocates nothing."""
        self._turn ^= 1
        turn = self._turn
        losses = self._losses  # read once: free_buffers() may replace it meanwhile
        if losses[turn] is not None and (
                sys.getrefcount(losses[turn]) > sys.getrefcount(self._unheld[0])):
            self._release([losses[turn]])  # its holder's now
            losses[turn] = None
        first = losses[0] is None and losses[1] is None  # the first step makes both
        for t in (0, 1) if first else (turn,):
            if losses[t] is None:
                losses[t] = self.xp.empty((), dtype=self.dtype)
                self._count(losses[t])
        return losses[turn]

    def staged(self, host):
        """``host``, a C-contiguous NumPy array in its final dtype, copied into the
        device buffer kept for its shape and dtype (one host-to-device copy, no
        allocation after the first): a training step's batch from the host. The same
        buffer comes back for every batch of that shape -- the next such batch
        overwrites it, in stream order, after the step that reads it -- so a captured
        step can read it as its static input (:mod:`gpu_mlp.graph`). The :data:`STAGED`
        most recently used are kept."""
        key = (host.shape, host.dtype)
        staged = self._staged  # read once: clear() may replace it meanwhile
        buffer = staged.pop(key, None)
        if buffer is None:
            buffer = self.xp.empty(host.shape, dtype=host.dtype)
            self._count(buffer)
            while len(staged) >= STAGED:
                self._release([staged.popitem(last=False)[1]])
        staged[key] = buffer  # the newest
        write(buffer, host)
        return buffer

    def is_staged(self, a) -> bool:
        """Whether ``a`` is one of the buffers :meth:`staged` keeps."""
        return any(a is b for b in self._staged.values())

    def give(self, *buffers) -> None:
        """Return buffers that :meth:`take` handed out; the caller must not touch them
        afterwards."""
        for buf in buffers:
            base = buf.base
            if base is None:
                base = buf
            key = ((COLUMNS if id(base) in self._columns else tuple(base.shape[1:])),
                   base.dtype)
            self.in_use_bytes -= base.nbytes
            if base.shape[0] < self._rows.get(key, 0):
                self._release([base])  # outgrown while in use
                self.outgrown += 1
            else:
                self._free[key].append(base)

    def clear(self) -> None:
        """Drop every free buffer (their memory returns to NumPy's or CuPy's allocator)."""
        # swapped out first: another thread's call may add a key meanwhile (README); each
        # buffer popped, one at a time (list.pop is atomic), so that one a concurrent
        # take() pops from the old lists is either its or ours, never counted twice
        free, self._free = self._free, defaultdict(list)
        for buffers in list(free.values()):
            self._release(_drained(buffers))
        if not self.in_use_bytes:  # else the buffers still out must be recognised
            self._rows.clear()
            self.largest_batch = 0
        if self._ones is not None:
            self._release([self._ones])
            self._ones = None
        self._release([b for b in self._losses if b is not None])
        self._losses = [None, None]
        staged, self._staged = self._staged, OrderedDict()
        self._release(list(staged.values()))

    def _held(self, buffer) -> int:
        """The bytes the allocator holds for ``buffer``: its nbytes rounded up."""
        return -(-buffer.nbytes // self._unit) * self._unit

    def _count(self, buffer) -> None:
        self.allocations += 1
        self.bytes += buffer.nbytes
        self.pool_bytes += self._held(buffer)

    def _release(self, buffers) -> None:
        self._columns.difference_update(id(b) for b in buffers)
        self.bytes -= sum(b.nbytes for b in buffers)
        self.pool_bytes -= sum(self._held(b) for b in buffers)


def _drained(buffers: list) -> list:
    """The buffers popped from ``buffers`` one at a time (list.pop is atomic): one that
    another thread's take() pops meanwhile is its, never released here too."""
    popped = []
    while True:
        try:
            popped.append(buffers.pop())
        except IndexError:
            return popped
