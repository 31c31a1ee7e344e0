"""CUDA stream capture, as CuPy and CUDA define it, on the counting device.

``with Capture() as capture: step()`` -- or ``s = Capture(); s.begin_capture(); step();
graph = s.end_capture()``, CuPy's ``cupy.cuda.Stream`` names -- records what the step
enqueues on the :mod:`device_counts` device and runs none of it; ``capture.graph`` (what
``end_capture`` returns) is a :class:`Graph` whose ``launch()`` runs the record, each
launch with the arguments it was captured with: arrays by reference (the replay reads and
writes their current contents), scalars by value (frozen at capture).

What real capture does, and so what this does (CuPy at cupy/cupy@6b6d9563):

* ``Stream.begin_capture(mode=None)`` (cupy/cuda/stream.pyx, lines 350-405): refuses the
  default (legacy) stream with ``RuntimeError('cannot capture on the default (legacy)
  stream')`` (line 394) and captures in ``cudaStreamCaptureModeRelaxed`` unless told
  otherwise (lines 396-403), so that the memory pool may still call ``cudaMalloc``.
  ``end_capture()`` (lines 407-425) ends it and instantiates the graph
  (``Graph.from_stream``, cupy/cuda/graph.pyx, lines 36-42: ``cudaGraphInstantiate``);
  ``Graph.launch(stream=None)`` (graph.pyx, lines 44-63) is ``cudaGraphLaunch``, and
  ``upload`` (lines 65-84) ``cudaGraphUpload``. Nothing runs during the capture: CUDA
  records each launch as a graph node (``cudaStreamBeginCapture``: "work launched into
  the stream is not enqueued for execution").
* A kernel launch is captured with its parameters as they are at the launch: CUDA copies
  the kernel's argument buffer into the node (``cudaLaunchKernel``: the arguments are
  copied when the kernel is launched), so a pointer keeps pointing at the same memory --
  a replay sees its current contents -- and a scalar passed by value is frozen. A
  ``numpy.float32`` learning rate passed to a RawKernel is such a scalar.
* cuBLAS through CuPy refuses: every wrapper in cupy_backends/cuda/libs/cublas.pyx first
  sets the handle's stream (``sgemm``, line 1080: ``_setStream(handle)``, line 666), and
  ``setStream`` (lines 642-651) raises ``NotImplementedError('calling cuBLAS API during
  stream capture is currently unsupported')`` while the stream captures, before any
  cuBLAS call. cuBLAS called directly does capture (../shared/gpu/graph_capture_probe.py
  on the H200: ``cublasSgemm_v2`` through ctypes, captured and replayed). In
  ``CUBLAS_POINTER_MODE_HOST`` (CuPy's mode for host scalars, cupy/cublas.py, ``gemv``
  lines 463-476) cuBLAS reads ``*alpha`` and ``*beta`` during the call, i.e. at capture:
  frozen too. :class:`CapturableBlas` is that binding.
* A host read: ``ndarray.get`` (cupy/_core/core.pyx, line 2098), behind ``float``,
  ``item`` and ``tolist``, copies with ``MemoryPointer.copy_to_host_async``
  (cupy/cuda/memory.pyx, lines 698-722), which raises ``RuntimeError('the current stream
  is capturing, so D2H transfers are disallowed')`` while capturing (lines 713-719).
* A synchronisation (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``) is not legal
  during capture: CUDA answers ``cudaErrorStreamCaptureUnsupported`` and invalidates the
  capture, so ``cudaStreamEndCapture`` then fails with
  ``cudaErrorStreamCaptureInvalidated`` (CUDA Programming Guide, "CUDA Graphs":
  "Prohibited and Unhandled Operations", "Invalidation"); CuPy raises both as
  ``CUDARuntimeError``.
* An allocation is not refused in relaxed mode (above), and CuPy's pool does not look
  (memory.pyx: ``SingleDeviceMemoryPool.malloc``, line 1323, and ``MemoryPool.malloc``,
  line 1614, check no capture state; only the copies, lines 526-745, do): it
  hands out a block, the graph keeps its address, and when the array dies the pool gives
  the block to the next array -- a replay then writes into memory that is no longer the
  graph's. That breaks capture silently, so here it is refused (:class:`CaptureBroken`);
  PyTorch's whole-network capture recipe (its CUDA semantics notes) likewise keeps
  every buffer a graph touches alive at a fixed address.

What it cannot show: anything concurrent (streams, events), the instantiated graph's own
validity checks, and which CUDA calls CuPy makes behind an operation the counting device
does not model.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, NamedTuple, Optional

import numpy as np

import device_counts
import host_cupy
from device_counts import DeviceArray
from gpu_mlp.graph import CaptureAllocation


class CUDARuntimeError(RuntimeError):
    """``cupy_backends.cuda.api.runtime.CUDARuntimeError``: ``"<status>: <message>"``."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class CaptureBroken(RuntimeError):
    """What CUDA lets through during a relaxed capture but the replay cannot survive."""


class AllocationDuringCapture(CaptureBroken, CaptureAllocation):
    """An allocation during a capture. On a GPU gpu_mlp's memory hook refuses it before
    CuPy's pool makes it, with :class:`gpu_mlp.graph.CaptureAllocation`
    (``graph._no_allocation``); this device has no pool hooks, so it raises that itself."""


# CuPy's and CUDA's words
CUBLAS_REFUSES = "calling cuBLAS API during stream capture is currently unsupported"
D2H_REFUSED = "the current stream is capturing, so D2H transfers are disallowed"
SYNC_STATUS = "cudaErrorStreamCaptureUnsupported"
SYNC_MESSAGE = "operation not permitted when stream is capturing"
INVALIDATED_STATUS = "cudaErrorStreamCaptureInvalidated"
INVALIDATED_MESSAGE = "operation failed due to a previous error during capture"


class Launch(NamedTuple):
    """One captured node: a kernel (or GEMM) and its arguments as captured."""
    name: str
    run: Optional[Callable[[], None]]  # None: the counting device runs no kernels
    scalars: tuple  # the by-value arguments, frozen at capture (for messages and tests)


def _scalars(args) -> tuple:
    return tuple(a for a in args if not isinstance(a, np.ndarray)
                 and isinstance(a, (int, float, np.generic)))


class Graph:
    """``cupy.cuda.Graph``: made by :meth:`Capture.end_capture` only."""

    def __init__(self, record):
        self.record = tuple(record)

    @property
    def names(self) -> list:
        return [launch.name for launch in self.record]

    def upload(self, stream=None) -> None:
        """``cudaGraphUpload``: nothing to do on the host."""

    def launch(self, stream=None) -> None:
        """``cudaGraphLaunch``: every captured launch in order, with its captured
        arguments (arrays as they are now, scalars as they were)."""
        capture = device_counts._COUNTS.capture
        if capture is not None:  # a graph launched into a capture becomes a node
            capture.launch("graph", self.launch, ())
            return
        device_counts._COUNTS.graph_launches += 1
        for launch in self.record:
            if launch.run is not None:
                launch.run()


class Capture:
    """A stream being captured on the counting device (``cupy.cuda.Stream``'s capture
    API; see the module). ``null=True``: the default stream, which CuPy will not capture.
    As a context: ``begin_capture`` on entry, ``end_capture`` on exit (its graph in
    :attr:`graph`); an exception ends the capture and propagates."""

    def __init__(self, null: bool = False):
        self.null = null
        self.record: Optional[list] = None
        self.invalidated: Optional[str] = None
        self.graph: Optional[Graph] = None

    # --- cupy.cuda.Stream ------------------------------------------------------------

    def begin_capture(self, mode=None) -> None:
        if self.null:  # stream.pyx, line 394
            raise RuntimeError("cannot capture on the default (legacy) stream")
        counts = device_counts._COUNTS
        if counts.capture is not None:
            raise CUDARuntimeError("cudaErrorIllegalState",
                                   "a capture is already open on the device")
        self.record, self.invalidated, counts.capture = [], None, self

    def end_capture(self) -> Graph:
        if not self.is_capturing():
            raise CUDARuntimeError("cudaErrorIllegalState", "the stream is not capturing")
        device_counts._COUNTS.capture = None
        record, self.record = self.record, None
        if self.invalidated is not None:
            raise CUDARuntimeError(INVALIDATED_STATUS,
                                   f"{INVALIDATED_MESSAGE} ({self.invalidated})")
        self.graph = Graph(record)
        return self.graph

    def is_capturing(self) -> bool:
        return self.record is not None

    def synchronize(self) -> None:
        """``cudaStreamSynchronize``: during capture, refused, and the capture invalid."""
        if self.is_capturing():
            self.invalidated = "synchronize"
            raise CUDARuntimeError(SYNC_STATUS, SYNC_MESSAGE)

    def __enter__(self) -> "Capture":
        self.begin_capture()
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.end_capture()
        elif self.is_capturing():
            device_counts._COUNTS.capture, self.record = None, None

    # --- what the counting device reports while this is open -------------------------

    def launch(self, name: str, run, args) -> None:
        """A kernel launch (or a GEMM of a capturable binding): a node, not run."""
        self.record.append(Launch(name, run, _scalars(args)))

    def cublas(self, name: str) -> None:
        raise NotImplementedError(CUBLAS_REFUSES)

    def host_read(self, what: str) -> None:
        raise RuntimeError(f"{D2H_REFUSED} ({what})")

    def pageable_copy(self, what: str) -> None:
        """A copy from pageable host memory (``cupy.ndarray.set``): not capturable; the
        capture is invalidated."""
        self.invalidated = what
        raise CUDARuntimeError(SYNC_STATUS, f"{SYNC_MESSAGE} ({what})")

    def allocation(self, what: str) -> None:
        raise AllocationDuringCapture(f"{what}: an allocation during capture -- the graph "
                                      f"would keep an address the memory pool hands to the "
                                      f"next array")


class Stream:
    """``cupy.cuda.Stream`` on the counting device, as the engine uses it
    (gpu_mlp/graph.py): each has its own ``ptr``; ``with stream:`` makes it current (what
    ``cupy.cuda.get_current_stream()`` and the cuBLAS runtime's ``stream()`` answer: a
    handle is per stream, as on a GPU; the counting device still has one queue),
    ``begin_capture``/``end_capture``/``is_capturing`` are a :class:`Capture`'s;
    ``null=True`` is the default stream, which CuPy will not capture. ``made`` counts the
    streams made."""

    made = 0
    _addresses = itertools.count(host_cupy.STREAM + 1)

    def __init__(self, null: bool = False, non_blocking: bool = False):
        self.capture = Capture(null=null)
        self.non_blocking = non_blocking
        self.ptr = 0 if null else next(Stream._addresses)
        Stream.made += 1

    def __enter__(self) -> "Stream":
        _current.append(self.ptr)
        return self

    def __exit__(self, *exc) -> None:
        _current.pop()

    def begin_capture(self, mode=None) -> None:
        self.capture.begin_capture(mode)

    def end_capture(self) -> Graph:
        return self.capture.end_capture()

    def is_capturing(self) -> bool:
        return self.capture.is_capturing()

    def synchronize(self) -> None:
        self.capture.synchronize()

    def wait_event(self, event: "Event") -> None:
        Event.waits.append((self.ptr, event.stream))


class Event:
    """``cupy.cuda.Event`` on the counting device, which has one queue and so nothing to
    wait for: ``record`` notes the stream that recorded it last, and each stream's
    ``wait_event`` is logged in ``Event.waits`` as (waiting stream, recording stream)."""

    waits: list = []

    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False):
        self.stream = None

    def record(self, stream=None) -> None:
        self.stream = (stream if stream is not None else _CURRENT).ptr


_current = [host_cupy.STREAM]  # the current stream's pointer last: ``with stream`` pushes


class _CurrentStream:
    """``cupy.cuda.get_current_stream()``: capturing while any capture is open (the
    counting device has one queue)."""

    @property
    def ptr(self) -> int:
        return _current[-1]

    def is_capturing(self) -> bool:
        return device_counts._COUNTS.capture is not None

    def synchronize(self) -> None:
        synchronize()

    wait_event = Stream.wait_event


_CURRENT = _CurrentStream()


def cuda_module():
    """``cupy.cuda`` as the engine reaches it: ``Stream``, ``Event``,
    ``get_current_stream``, ``runtime.getDevice`` (one device, 0) and ``graph.Graph``."""
    import types

    cuda = types.ModuleType("cupy.cuda")
    cuda.Stream, cuda.Event, cuda.get_current_stream = Stream, Event, lambda: _CURRENT
    cuda.runtime = types.SimpleNamespace(getDevice=lambda: 0)
    cuda.graph = types.SimpleNamespace(Graph=Graph)
    return cuda


def synchronize() -> None:
    """``cupy.cuda.Device().synchronize()`` (``cudaDeviceSynchronize``): refused during a
    capture, which it invalidates."""
    capture = device_counts._COUNTS.capture
    if capture is not None:
        capture.synchronize()


class CapturableBlas(host_cupy.HostCublas):
    """``gpu_mlp.cublas``'s libcublas and runtime on the counting device, under capture as
    cuBLAS called directly is (../shared/gpu/graph_capture_probe.py): a GEMM or GEMV
    during a capture is a node, not run; ``alpha`` and ``beta`` in
    ``CUBLAS_POINTER_MODE_HOST`` were read during the call, so frozen at capture, those in
    ``CUBLAS_POINTER_MODE_DEVICE`` are read when the node runs, on each replay. A handle
    with no workspace of its own (``cublasSetWorkspace``, undone by ``cublasSetStream``)
    would have cuBLAS allocate during the capture: refused, as every allocation is.
    Outside a capture the work runs at once (``run=False``: counted, never run). The
    handle's workspace and device constants are device arrays, their allocation counted;
    a host array given to cuBLAS is a TypeError, as a kernel's is."""

    def __init__(self, device, run: bool = True):
        super().__init__(device)
        self.array_type, self.run, self.calls = DeviceArray, run, 0

    def stream(self) -> int:
        return _current[-1]

    def capturing(self, stream: int) -> bool:
        return device_counts._COUNTS.capture is not None

    def workspace(self, nbytes: int):
        device_counts._COUNTS.allocated("cuBLAS workspace")
        return super().workspace(nbytes)

    def scalar(self, value, dtype):
        device_counts._COUNTS.allocated("cuBLAS device constant")
        return super().scalar(value, dtype).view(DeviceArray)

    def pointer(self, a) -> int:
        if not isinstance(a, DeviceArray):
            raise TypeError(f"a host {type(a).__name__} passed to cuBLAS")
        return super().pointer(a)

    def enqueue(self, name: str, run, handle, scalars) -> None:
        self.calls += 1
        run = run if self.run else None
        capture = device_counts._COUNTS.capture
        if capture is None:
            device_counts._COUNTS.launch(name)
            if run is not None:
                run()
            return
        if handle.workspace is None:
            capture.allocation(f"{name} with no workspace of its own (cublasSetWorkspace)")
        # the host-mode scalars as captured (a device one is read at replay, not frozen)
        capture.launch("gemm" if "gemm" in name else "gemv", run,
                       tuple(x for x in scalars if not callable(x)))


@contextlib.contextmanager
def capturable_blas(lib, run: bool = True):
    """Within a ``device_counts.counting_device(net, lib)``: ``gpu_mlp.cublas`` runs over a
    fresh :class:`CapturableBlas` (host_cupy's GEMMs computing when ``lib`` is given),
    its one stream's handle and workspace made on entry (``gpu_mlp.cublas.prepare``, as
    the engine must before capturing on a stream); yields it."""
    import gpu_mlp.cublas

    blas = CapturableBlas(host_cupy.Device(lib), run=run and lib is not None)
    with gpu_mlp.cublas.use(blas) as binding:
        binding.prepare()
        yield blas

