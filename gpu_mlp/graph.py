"""Training steps captured once and replayed as CUDA graphs (CuPy), eager everywhere else.

A step of :meth:`Network.train_step <gpu_mlp.network.Network.train_step>` or
:func:`gpu_mlp.training.fit` on a GPU launches a few dozen small kernels and GEMMs; on
their own each costs the host more time than the GPU spends on it. :class:`StepGraphs`
(one per net) runs each *configuration* of a step -- batch shape and dtype, targets,
memory mode, update rule and its settings, DP and its settings, the divisor and loss
scale, the parameter arrays and buffers -- eagerly on its first use (the warm-up:
kernels compiled, workspace buffers allocated; once more if the workspace outgrew a
buffer the step held, which it replaces only at the next step), captures it as one CUDA
graph on its second (on a ``cupy.cuda.Stream(non_blocking=True)`` of its thread and
device, shared by the nets, ``begin_capture()`` /
``end_capture()``, cupy/cuda/stream.pyx) and replays it after (``Graph.launch``,
cupy/cuda/graph.pyx), on the current stream, after the batch is copied into the graph's
static input buffers -- a host batch is copied from the host straight into the
workspace's kept buffers for its shape, which the graph reads (no copy of its own);
for batches gathered from device-resident data
(:class:`Gathered`: fit's, the estimators'), only their row indices, the gather being
part of the graph; nothing at all where a :class:`Cursor` on the device gives the rows
(fit's and the estimators' on a GPU) -- after the last launch of any graph of its
capture stream (an event: they share its cuBLAS workspace). What changes from step to step is read on the
device by pointer (:class:`gpu_mlp.plan.StepScalars`: the rule's scalars, the step
counters), so a replay
is the eager step, bit for bit, with no capture again; the loss is written into the
graph's own 0-d buffer and copied into the workspace's (``Workspace.loss``), so the
loss a step returns behaves as an eager step's -- but for ``fit``'s, which it reads at
once (``lasting=False``: no copy), and which the graph also adds to fit's (or the
scikit-learn estimators') :class:`~gpu_mlp.plan.LossTally`, the epoch's sum.

Eager instead: the NumPy backend; a CuPy without stream capture (the tests' stand-in
``host_cupy``); a configuration seen once; a stream already capturing (the step becomes
part of that capture); data parallelism (its collectives are not captured); a step
while a buffer its graph writes is lent
out (to a pending ``Network.forward``'s tape: the graph is then captured again with the
buffers free); and any configuration whose capture failed, after one warning saying why
-- but one that allocated, because another call grew the workspace since its warm-up,
warms up again first. A graph is dropped -- recaptured on its next use -- when
the net's parameter arrays are replaced (``net.params`` reassigned or an array swapped),
when a setting the kernels take as a number changes (another key: the rule's kind, its
momentum, betas or weight decay, the DP settings; not ``lr``, which a replay reads with
the step's scalars), when the net steps by another optimizer or DP object (a net
keeps only its latest pair's graphs and scalars, which hold the objects alive), and by
``free_buffers()``, and at the end of a ``fit`` those that gather from its data
(:meth:`StepGraphs.forget`: they would keep the training set alive on the device). At
most :data:`MAX_GRAPHS` graphs are held per net (fit: the full batch and the remainder;
under DP :data:`POISSON_GRAPHS`, one per Poisson sample size, the least recently used
dropped first), each keeping alive every buffer it touches; a graph's copy of its batch
is made at its capture and goes with it (a gathered batch is gathered into the
gather's buffers: no copy per graph).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import OrderedDict
from typing import Callable, NamedTuple

import numpy as np

from . import _checks, cublas, ops
from .device import write
from .plan import LossTally, StepPlan, StepScalars

MAX_GRAPHS = 2   # graphs held per net: fit's full batch and its remainder
MAX_SEEN = 8     # configurations remembered (seen once, or captured), at least
# graphs held per net for fit's Poisson samples under DP, one per sample size (the
# sizes within about 5 standard deviations of the mean at a batch size of 32, 2 at 256):
# the most recently used kept
POISSON_GRAPHS = 64


class Cursor:
    """Row indices that the steps read on the device, one batch after another: an
    epoch's order (or a DP epoch's Poisson samples end to end) and the position ``at``
    in it, a device scalar that each step moves on by its rows. A step's rows are
    ``order[at:at + m]``, gathered by kernels of gpu_mlp's module (of ``dtype``, the
    net's) -- inside its graph, when replayed -- so a replay copies nothing in.
    :meth:`restart` (once an epoch, before its first step) writes the next order and
    puts ``at`` back to 0."""

    def __init__(self, xp, capacity: int, dtype):
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.order = xp.empty(capacity, dtype=np.int64)
        self.at = xp.zeros((), dtype=np.int64)

    @property
    def capacity(self) -> int:
        return self.order.shape[0]

    def restart(self, order) -> None:
        """From the start of ``order`` (host integers, at most :attr:`capacity`)."""
        write(self.order[:len(order)], np.asarray(order, dtype=np.int64))
        self.at.fill(0)

    def take(self, data, out) -> None:
        """``out <- data[order[at:at + m]]``, m = ``out.shape[0]`` (``at`` stays)."""
        ops.gather(data, self.order, self.at, out, self.dtype)

    def move(self, m: int) -> None:
        """``at`` moved on by ``m`` rows, on the device."""
        ops.advance(self.at, m, self.dtype)


class Gathered(NamedTuple):
    """A batch given as rows of device-resident data (fit's shuffled batches, DP's
    Poisson samples, the estimators' batches): the step reads ``X = data[0][rows]`` and
    ``Y = data[1][rows]``, which :meth:`into` gathers -- before an eager step, and inside
    a captured graph. ``rows`` are row indices on the device, of which a replay copies
    its own into the graph (one launch, where a batch gathered outside took two gathers
    and two copies into the graph's buffers), or a :class:`Cursor`, which the graph
    reads itself (no launch)."""

    data: tuple     # (X, Y): every row, on the device
    rows: object    # the batch's row indices (intp, on the device), or a Cursor
    take: Callable  # take(a, rows, out): out <- a[rows], one kernel

    def into(self, X, Y, rows=None) -> None:
        """``X, Y <- data[0][rows], data[1][rows]`` (``rows``: this batch's, or a graph's
        static copy of them; a cursor's next X.shape[0])."""
        rows = self.rows if rows is None else rows
        if isinstance(rows, Cursor):  # two gathers, then the cursor moved on
            for a, out in zip(self.data, (X, Y)):
                rows.take(a, out)
            rows.move(X.shape[0])
            return
        for a, out in zip(self.data, (X, Y)):
            self.take(a, rows, out)


class _Entry:
    """One configuration: how often seen, and its graph with what the graph touches."""

    __slots__ = ("uses", "graph", "X", "Y", "rows", "loss", "keep", "buffers", "side",
                 "failed", "rewarmed")

    def __init__(self):
        self.uses, self.failed, self.rewarmed = 0, False, False
        self.drop()

    def drop(self) -> None:
        """Let the graph go, and what it alone held: its static buffers and its keeps."""
        self.graph = self.X = self.Y = self.rows = self.loss = self.keep = None
        self.buffers = self.side = None


def _cuda():
    """``cupy.cuda`` if this CuPy captures streams (the real one does), else None."""
    cupy = sys.modules.get("cupy")
    cuda = getattr(cupy, "cuda", None)
    if cuda is None or not hasattr(cuda, "Stream") or not hasattr(cuda, "get_current_stream"):
        return None
    return cuda


class StepGraphs:
    """The captured steps of one net (see the module). ``captures`` and ``replays``
    count what it did, for tests and benchmarks."""

    def __init__(self):
        self._entries: OrderedDict = OrderedDict()
        self._latest = None  # (rule, dp, dtype, their StepScalars): the last step's pair
        self._params = None
        self._tallies = {}
        self._warned = set()
        self.captures = self.replays = 0

    @property
    def graphs(self) -> int:
        """The graphs held now."""
        return sum(e.graph is not None for e in self._entries.values())

    def clear(self) -> None:
        """Drop every graph, the device scalars and the tallies (``free_buffers``)."""
        self._entries.clear()
        self._latest = None
        self._params = None
        self._tallies.clear()

    def tally(self, net, weight: float = 1.0, penalty: float = 0.0) -> LossTally:
        """The net's :class:`~gpu_mlp.plan.LossTally` of these numbers, kept: a graph
        knows its tally by identity, so runs one after another (fit called an epoch at
        a time) replay the graphs of the last rather than capture their own."""
        key = (float(weight), float(penalty), net.dtype, net.xp)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = LossTally(net, weight, penalty)
        return tally

    def step(self, net, X, Y, plan: StepPlan, rows: int, counts, divisor, scale,
             capture: bool = True, lasting: bool = True, gathered: Gathered = None,
             tally: LossTally = None, graphs: int = MAX_GRAPHS):
        """One training step of ``net`` on the checked batch (X, Y) by ``plan`` (see
        :meth:`Network._step`): eager, captured or replayed. Returns the loss: with
        ``lasting`` one that keeps its value through the next step, as an eager step's
        (a replay's is copied out of its graph); else, from a replay, the graph's own
        buffer, which its next replay overwrites (fit reads it at once: one copy kernel
        less a step). ``gathered``: X and Y are buffers to gather the batch into
        (:class:`Gathered`), which an eager step does first and a graph itself.
        ``tally``: a :class:`~gpu_mlp.plan.LossTally` the step adds its loss to (a graph
        too, as it replays). ``graphs``: how many graphs the net may hold for steps like
        this one (the least recently used go first)."""
        if ops.is_numpy(net.params[0][0]):  # host numbers, as always
            return _run(net, X, Y, plan, rows, counts, divisor, scale, None,
                        gathered=gathered, tally=tally)
        noise_std = plan.dp.noise_std(divisor) if plan.private else 0.0
        scalars = self._scalars_for(net, plan)
        scalars.prepare(plan, noise_std)

        def eager():
            return _run(net, X, Y, plan, rows, counts, divisor, scale, scalars,
                        gathered=gathered, tally=tally)

        cuda = _cuda()
        if not capture or cuda is None or plan.parallel or _capturing(cuda):
            return eager()
        params = tuple(id(a) for pair in net.params for a in pair)
        if params != self._params:  # replaced parameters: every graph is stale
            self._entries.clear()
            self._params = params
        key = self._key(net, X, Y, plan, rows, counts, divisor, scale, scalars, gathered,
                        tally)
        entries = self._entries
        entry = entries.pop(key, None)  # (free_buffers() from another thread may clear
        if entry is None:                # the entries at any point: no KeyError here)
            entry = _Entry()
        entries[key] = entry  # the newest
        while len(entries) > max(MAX_SEEN, 2 * graphs):
            entries.popitem(last=False)
        entry.uses += 1
        if entry.uses == 1:  # the warm-up: what the capture will need is made now
            self._prepare(cuda, entry, net, X, Y, gathered)
        if entry.failed:
            return eager()
        if entry.uses == 1:
            # A buffer the workspace outgrew while the step held it is replaced only at
            # the next step (and a capture cannot allocate): warm up again then
            ws = net.training_workspace
            outgrown = ws.outgrown
            J = eager()
            if ws.outgrown != outgrown:
                entry.uses = 0
            return J
        if entry.graph is None:
            if not self._capture(cuda, entry, net, X, Y, plan, rows, counts, divisor, scale,
                                 scalars, gathered, tally, graphs):
                return eager()
        elif not entry.buffers <= _free_ids(net):
            # a buffer the graph writes is out of the workspace: lent to a pending
            # Network.forward's tape, or lost with a step that raised. Eager now (it takes
            # other buffers), and captured again, with what is free then, on the next use
            entry.drop()
            entry.uses = 1
            return eager()
        else:
            _inputs_into(entry, X, Y, gathered)
            entry.side.launch(cuda, entry.graph)
            plan.count_step()  # the host's side of the step, which the replay skips
            scalars.counted()
            self.replays += 1
        if not lasting:
            return entry.loss
        J = net.training_workspace.loss()
        J[...] = entry.loss
        return J

    # --- helpers ----------------------------------------------------------------------

    def _scalars_for(self, net, plan) -> StepScalars:
        """The device scalars of ``plan``'s rule and DP on ``net``, kept with the objects
        so that their device counters stay with them. Another rule or DP than the last
        step's: the old pair's scalars and graphs go, which held its objects alive (an
        optimizer's moments, say) -- a net steps by one pair at a time, and one the
        caller dropped (a learning-rate sweep on one net) is freed."""
        pair = ("plain" if plan.plain else plan.rule, plan.dp, net.dtype)
        latest = self._latest
        if latest is None or any(a is not b for a, b in zip(pair, latest)):
            self._entries.clear()
            latest = self._latest = (*pair, StepScalars(net.xp, net.dtype))
        return latest[3]

    def forget(self, data) -> None:
        """Drop the graphs that gather from ``data`` (fit's (X, Y), at its end: such a
        graph would keep the training set alive on the device)."""
        ids = tuple(id(a) for a in data)
        for key in [key for key in list(self._entries) if key[-1] == ids]:
            self._entries.pop(key, None)

    @staticmethod
    def _key(net, X, Y, plan, rows, counts, divisor, scale, scalars, gathered,
             tally) -> tuple:
        """What a graph is captured for: everything a replay does not read anew."""
        # (not the rates: a schedule's, or an lr set between steps, are in the scalars)
        rule = "plain" if plan.plain else (id(plan.rule), plan.rule.kernel_settings())
        dp = None if not plan.private else (id(plan.dp), plan.dp.max_grad_norm,
                                            plan.dp.noise_multiplier, plan.dp.seed)
        # (last: the data a graph gathers from, which forget() looks for)
        source = None if gathered is None else tuple(id(a) for a in gathered.data)
        cursor = id(gathered.rows) if gathered is not None and _reads_cursor(gathered) \
            else None
        # a host batch in the workspace's kept buffers: the graph reads them themselves
        staged = (id(X), id(Y)) if _staged(net, X, Y) else None
        return (tuple(X.shape), X.dtype.str, tuple(Y.shape), Y.dtype.str, staged, net.memory,
                tuple(net._modes), id(net.training_workspace), rule, dp, rows,
                None if counts is None else tuple(counts), divisor, scale, id(scalars),
                None if tally is None else tally.key(), cursor, source)

    def _prepare(self, cuda, entry, net, X, Y, gathered):
        """Make what a capture needs before it (nothing may allocate during it): the
        capture stream and its cuBLAS handle and workspace -- at a configuration's
        warm-up, so that no first GEMM of a handle happens in a capture -- and, at the
        capture (``entry.uses`` 2: a configuration seen once holds no copy of its
        batch), the static input (and row index) and loss buffers. A gathered batch
        has none of its own: the graph gathers into the gather's buffers, X and Y (and
        a graph that keeps them alive computes right with them, whatever buffers the
        gather has later). Returns the :class:`_CaptureSide`."""
        if entry.X is None and entry.uses > 1:
            xp = net.xp
            if gathered is None and _staged(net, X, Y):
                entry.X, entry.Y = X, Y  # (its key holds them: the batch is copied there)
            elif gathered is None:
                entry.X, entry.Y = xp.empty(X.shape, X.dtype), xp.empty(Y.shape, Y.dtype)
            else:
                entry.X, entry.Y = X, Y
                if not _reads_cursor(gathered):
                    entry.rows = xp.empty(gathered.rows.shape, gathered.rows.dtype)
            entry.loss = xp.empty((), dtype=net.dtype)
        return _capture_stream(cuda)

    def _capture(self, cuda, entry, net, X, Y, plan, rows, counts, divisor, scale,
                 scalars, gathered, tally, graphs) -> bool:
        """Capture the step into ``entry`` and launch it once; False (and a warning,
        once per reason) if the capture failed: the step is then to run eagerly, and
        the plan and scalars are as before."""
        side = self._prepare(cuda, entry, net, X, Y, gathered)  # this thread's, made outside
        stream = side.stream
        _inputs_into(entry, X, Y, gathered)
        # a gathered batch: the gathers are captured too, reading the graph's row indices
        # (or its cursor)
        inside = gathered if gathered is None or _reads_cursor(gathered) else \
            gathered._replace(rows=entry.rows)
        host = _host_state(plan)
        at = scalars._at
        try:
            with stream, _no_allocation(cuda):
                stream.begin_capture()
                try:
                    _run(net, entry.X, entry.Y, plan, rows, counts, divisor, scale, scalars,
                         loss=entry.loss, gathered=inside, tally=tally)
                finally:
                    graph = stream.end_capture()
        except Exception as e:  # noqa: BLE001 -- any failure: say why, then eager
            _restore_host_state(plan, host)
            scalars._at = at
            if isinstance(e, CaptureAllocation) and not entry.rewarmed:
                # the workspace let go of a buffer since the warm-up (another call grew
                # it): the eager step now makes it again, and the next use warms up anew
                entry.rewarmed, entry.uses = True, 0
                return False
            entry.failed = True
            entry.drop()  # (eager for good: no copy of its batch kept)
            reason = f"{type(e).__name__}: {e}"
            if reason not in self._warned:
                self._warned.add(reason)
                _checks.warn(f"gpu_mlp: this training step could not be captured as a "
                             f"CUDA graph ({reason}); it runs eagerly", RuntimeWarning)
            return False
        # alive while the graph is: what it reads and writes, and what its key names by id
        entry.graph = graph
        # and the handle of the capture (its workspace, whose address the GEMMs keep: the
        # side's may be evicted and replaced later)
        entry.keep = (_touched(net), scalars, tuple(net.params), plan.optimizer, plan.dp,
                      side.handle, None if gathered is None else gathered, tally)
        entry.buffers, entry.side, entry.rewarmed = _free_ids(net), side, False
        for other in list(self._entries.values()):  # at most ``graphs``, the newest
            if self.graphs <= graphs:
                break
            if other is not entry and other.graph is not None:
                other.drop()
                other.uses = 1  # seen before: captured again on its next use
        side.launch(cuda, graph)
        self.captures += 1
        return True


_streams = threading.local()  # this thread's capture streams, by stream class and device


class _CaptureSide:
    """A thread's capture stream on one device, and what the graphs captured on it
    share: its cuBLAS handle, whose workspace (the GEMMs' scratch memory, at an address
    they keep) every such graph holds alive -- the thread's exit would return it to the
    pool under them -- and an event at the end of the last launch of any of them: one
    launched on another stream first waits for it, or replays on two streams at once
    would write into the one workspace together."""

    __slots__ = ("stream", "handle", "event", "launched", "lock")

    def __init__(self, cuda):
        self.stream = cuda.Stream(non_blocking=True)
        self.event = cuda.Event(disable_timing=True)
        self.handle, self.launched = None, False
        self.lock = threading.Lock()  # another thread may replay a net's graph

    def launch(self, cuda, graph) -> None:
        """Launch ``graph`` on the current stream, after the last launch here. The wait
        is unconditional: streams cannot be told apart by their pointers (per-thread
        default streams share one; a new stream may take a destroyed one's), and on
        the stream that recorded the event it waits for nothing more."""
        stream = cuda.get_current_stream()
        with self.lock:
            if self.launched:
                stream.wait_event(self.event)
            graph.launch(stream)
            self.event.record(stream)
            self.launched = True


def _capture_stream(cuda) -> _CaptureSide:
    """This thread's capture stream on the current device, with its cuBLAS handle and
    workspace (``cublas.prepare``: made once, a lookup after; a handle is per thread,
    device and stream). One stream per thread and device, shared by every net: one per
    net would leave a handle and its 32 MiB workspace behind with each net trained. Kept
    by ``cuda.Stream`` too: a CuPy stand-in's stream (the tests') is no real one."""
    streams = _streams.__dict__.setdefault("of_device", {})
    key = (cuda.Stream, cuda.runtime.getDevice())
    side = streams.get(key)
    if side is None:
        side = streams[key] = _CaptureSide(cuda)
    with side.stream:
        side.handle = cublas.prepare()
    return side


class CaptureAllocation(RuntimeError):
    """A memory pool allocation during a capture: the graph would keep an address that
    the pool hands to the next array once this one dies."""


def _no_allocation(cuda):
    """Within: every allocation from CuPy's memory pool raises :class:`CaptureAllocation`
    before it is made. CuPy captures in relaxed mode so that its pool may still allocate
    (cupy/cuda/stream.pyx, ``begin_capture``) and checks nothing itself, so a buffer made
    during a capture would let a replay write into memory that is no longer the graph's,
    silently. A ``cupy.cuda.MemoryHook``'s ``malloc_preprocess`` runs before every pool
    allocation, a cached block's too (memory.pyx, ``SingleDeviceMemoryPool.malloc``), so
    raising there refuses it and the capture fails as any other: eager, with a warning.
    Another allocator calls no hook: a RuntimeError, and the steps run eagerly, warned.
    A CuPy without memory hooks (the tests' stand-in, which refuses allocations itself):
    nothing to do."""
    hook = getattr(cuda, "MemoryHook", None)
    if hook is None:
        return contextlib.nullcontext()
    # only a MemoryPool calls the hooks (not set_allocator(None)'s cudaMalloc, not a
    # MemoryAsyncPool, not another library's allocator): with any other, refuse to capture
    if not isinstance(getattr(cuda.get_allocator(), "__self__", None), cuda.MemoryPool):
        raise RuntimeError("CuPy's allocator is not its memory pool (cupy.cuda."
                           "set_allocator), whose hooks let gpu_mlp refuse an allocation "
                           "inside a capture, where a graph would go on writing into "
                           "memory freed after it")

    class NoAllocation(hook):
        name = "gpu_mlp.graph.no_allocation"

        def malloc_preprocess(self, **kwargs):
            raise CaptureAllocation(f"an allocation of {kwargs.get('size')} bytes from "
                                    f"CuPy's memory pool during the capture")

    return NoAllocation()


def _capturing(cuda) -> bool:
    """Whether the current stream is being captured (by the caller: the step is then
    part of that capture). A query CUDA refuses (the legacy stream while another
    captures in global mode) counts as capturing."""
    try:
        return bool(cuda.get_current_stream().is_capturing())
    except Exception:  # noqa: BLE001 -- cudaErrorStreamCaptureImplicit and the like
        return True


def _run(net, X, Y, plan, rows, counts, divisor, scale, scalars, loss=None,
         gathered=None, tally=None):
    """The step itself, eagerly (or as it is captured): the batch gathered into X and Y
    where ``gathered`` says, the scalars of the step, the forward and backward pass with
    the plan's chain of sinks, the loss added to ``tally``, the step counted."""
    if gathered is not None:
        gathered.into(X, Y)
    if any(net.xp.may_share_memory(X, a) for pair in net.params for a in pair):
        X = X.copy()  # (X = W_1 say: the updates write what the step still reads)
    if scalars is not None:
        scalars.select()
    if tally is not None:
        tally.before(net)  # (the weights the forward uses: the backward updates them)
    sink = plan.sink(net, rows, counts, divisor, scalars)
    # with other ranks: one engine form of each layer on all (Network._engine_layers)
    ranks = 1 if counts is None else len(counts)
    J, _ = net._backprop(X, Y, sink, scale=scale, want_dx=False, loss_out=loss,
                         forms_batch=0 if ranks > 1 else None)
    if tally is not None:
        tally.add(J, rows)
    if scalars is not None:
        scalars.advance()
    return J


def _into(static, batch) -> None:
    """Copy the batch into a graph's static buffer (on the device: one copy kernel)."""
    if batch is not static:
        static[...] = batch


def _inputs_into(entry, X, Y, gathered) -> None:
    """What a replay of ``entry`` reads of this step: the batch copied into its static
    buffers, or a gathered batch's row indices (the graph gathers the rows itself)."""
    if gathered is None:
        _into(entry.X, X)
        _into(entry.Y, Y)
    elif not _reads_cursor(gathered):
        _into(entry.rows, gathered.rows)


def _staged(net, X, Y) -> bool:
    """Whether X and Y are host batches copied into the training workspace's kept
    buffers (:meth:`~gpu_mlp.workspace.Workspace.staged`), which a graph can read as
    its static input: no copy in."""
    ws = net.training_workspace
    return ws.is_staged(X) and ws.is_staged(Y)


def _reads_cursor(gathered) -> bool:
    return isinstance(gathered.rows, Cursor)


def _host_state(plan):
    rule = None if plan.plain else plan.rule
    return ((rule.steps, rule.last_lr) if rule is not None else None,
            plan.dp.steps if plan.private else None)


def _restore_host_state(plan, state) -> None:
    (rule, dp) = state
    if rule is not None:
        plan.rule._steps, plan.rule._last_lr = rule
    if dp is not None:
        plan.dp.steps = dp


def _touched(net) -> list:
    """Every workspace buffer a captured step may have used (all are back in the
    workspace when a step ends): the graph keeps them alive, so that no later
    allocation is given their memory while the graph may still write there."""
    ws = net.training_workspace  # (not the losses: the graph writes its own)
    return [b for free in ws._free.values() for b in free] + [ws._ones]


def _free_ids(net) -> frozenset:
    """The ids of the training workspace's free buffers (a graph's are kept alive by
    it, so their ids stay theirs)."""
    return frozenset(id(b) for free in net.training_workspace._free.values() for b in free)
