"""What a step would make CuPy allocate and wait for, counted on the host.

``with counting_device(net) as counts:`` swaps the net's array module for
:class:`CountingXp`, NumPy under CuPy's rules of allocation, and turns every array the net
holds into a :class:`DeviceArray`; ``gpu_mlp.ops`` takes its CuPy branches (its kernel
launches recorded, not run: the numbers are not the point here; its GEMMs go through
``gpu_mlp.cublas`` over :class:`capture.CapturableBlas`, host_cupy's libcublas).
Then ``counts.allocations`` counts each new device array as CuPy makes one:

* a ufunc (``a + b``, ``xp.sqrt(a)``, ``a > 0``) or a reduction (``a.all()``) without
  ``out=``: one per output (CuPy's ``_core`` makes every result an array, a full
  reduction's 0-d one too);
* a sum, product, min or max that CuPy's default CUB accelerator takes
  (``cupy/cuda/cub.pyx``: ``device_reduce``, ``device_segmented_reduce``): two, its
  result and its workspace, even with ``out=`` (CUB reduces into its own result, then
  copies);
* ``copy``, ``astype``, ``reshape``/``ravel``/``flatten`` or indexing that cannot be a
  view, ``xp.empty``/``zeros``/``ones``/``*_like``/``array``/``asarray`` of anything
  not already a device array, ``xp.einsum``, ``xp.stack`` and every other array
  function whose result shares no memory with its device inputs;
* ``cupy.cublas.gemm``/``gemv`` (which the engine no longer calls; kept to show what it
  did) given an array neither C- nor F-contiguous: the copy ``cupy/cublas.py`` makes of
  it (host scalars alpha and beta allocate nothing).

A kernel launch given a host array raises a TypeError, as CuPy's do.

``counting_device(net, lib)`` also runs what it counts: its kernels are gpu_mlp's CUDA
bodies built for the host (``host_cupy.build``), its GEMMs host_cupy's, so the numbers
are the engine's. While a :mod:`capture` is open (``counts.capture``), every allocation,
host read, kernel launch, ``out=`` ufunc and cuBLAS call goes to it instead: it records
the launches and ``gpu_mlp.cublas``'s GEMMs and refuses the rest, as CUDA stream capture
does -- CuPy's own cuBLAS too: ``cupy.cublas``, and ``matmul``, ``dot`` and
``tensordot``, which reach cuBLAS through CuPy's wrappers.

A view (basic indexing, a reshape of contiguous memory, ``transpose``) and an in-place
or ``out=`` operation allocate nothing. ``counts.syncs`` counts what reads a device
value on the host, each a device-to-host synchronisation on a GPU: ``float``, ``int``,
``bool``, ``item``, ``tolist`` and ``get`` of a device array.
"""

from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest

from gpu_mlp import cuda, ops
from gpu_mlp.workspace import Workspace


@dataclass
class Counts:
    allocations: int = 0
    syncs: int = 0
    where: list = field(default_factory=list)  # what allocated or synchronised, for messages
    capture: object = None  # the open capture.Capture, if any: it records or refuses
    # what the host had the device do outside a graph, each a call into CUDA that costs
    # the host its time: kernels, copies and fills, GEMMs; and graphs launched
    launches: int = 0
    graph_launches: int = 0
    # CuPy's own kernels that a first run compiles with NVRTC (each per dtype signature):
    # its ufuncs, reductions but CUB's (precompiled), take, arange, argmax, fills of a
    # value other than 0 (a 0 is a memset), copies (copy and astype are elementwise_copy;
    # only an assignment between equal layouts is a memcpy) -- gpu_mlp's own kernels are
    # one module of a dtype, not listed here
    compiled: set = field(default_factory=set)

    def compiles(self, what: str) -> None:
        self.compiled.add(what)

    def launch(self, what: str) -> None:
        """One kernel, copy or GEMM run outside a capture (inside, the capture has it)."""
        if self.capture is None:
            self.launches += 1

    def allocated(self, what: str, n: int = 1) -> None:
        if n and self.capture is not None:
            self.capture.allocation(what)
        if n:
            self.allocations += n
            self.where.append(f"alloc {what}")

    def synced(self, what: str) -> None:
        if self.capture is not None:
            self.capture.host_read(what)
        self.syncs += 1
        self.where.append(f"sync {what}")

    def reset(self) -> None:
        self.allocations, self.syncs, self.where, self.capture = 0, 0, [], None
        self.launches, self.graph_launches, self.compiled = 0, 0, set()


_COUNTS = Counts()  # the counts of the device in use (one at a time: tests run serially)


# array functions that launch no kernel of CuPy's (they read shapes and addresses, or copy
# memory as it is); and those that are a ufunc's reduction, CUB's where it takes them
_NO_KERNEL = {"shape", "ndim", "size", "shares_memory", "may_share_memory", "result_type",
              "copyto", "reshape", "ravel", "transpose", "swapaxes", "moveaxis", "squeeze",
              "expand_dims", "broadcast_to", "ascontiguousarray", "dot", "matmul",
              "tensordot", "empty_like", "zeros_like"}
_REDUCTIONS = {np.sum: np.add, np.prod: np.multiply, np.amin: np.minimum,
               np.amax: np.maximum, np.min: np.minimum, np.max: np.maximum}


def _signature(inputs) -> str:
    """A ufunc call's input types, as CuPy compiles a kernel for each: ``(float32,int)``."""
    return "(" + ",".join(str(a.dtype) if isinstance(a, np.ndarray) else type(a).__name__
                          for a in inputs) + ")"


def _host(x):
    """``x`` with every DeviceArray in it as a plain ndarray view (lists, tuples too)."""
    if isinstance(x, DeviceArray):
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_host(v) for v in x)
    return x


def _device_inputs(args) -> list:
    found = []
    for a in args:
        if isinstance(a, DeviceArray):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(_device_inputs(a))
    return found


def _wrap(result, inputs, what):
    """A result as CuPy returns it: a device array (a 0-d one for a scalar), counted as
    an allocation unless it is a view of an input."""
    if isinstance(result, tuple):
        return tuple(_wrap(r, inputs, what) for r in result)
    if isinstance(result, np.generic):
        result = np.asarray(result)
    if not isinstance(result, np.ndarray):
        return result  # a shape, a bool of np.shares_memory, ...
    if any(np.shares_memory(result, a) for a in inputs):
        return result if isinstance(result, DeviceArray) else result.view(DeviceArray)
    _COUNTS.allocated(what)
    if isinstance(result, DeviceArray) and result.base is None:
        return result
    # a device array owning its memory, as CuPy's: views of it have it as their base
    order = "F" if result.flags.f_contiguous and not result.flags.c_contiguous else "C"
    owned = np.ndarray.__new__(DeviceArray, result.shape, result.dtype, order=order)
    np.copyto(owned.view(np.ndarray), result.view(np.ndarray))
    return owned


def _cub_reduction(ufunc, a, kwargs) -> bool:
    """Whether CuPy's default CUB accelerator takes this reduction (cupy/cuda/cub.pyx:
    ``cub_reduction``): a sum, product, min or max of a float or integer array with no
    dtype given, C-contiguous over its last axes or F-contiguous over its first."""
    if ufunc not in (np.add, np.multiply, np.minimum, np.maximum) or \
            kwargs.get("dtype") is not None or a.dtype.kind not in "fiu":
        return False
    axis = kwargs.get("axis", 0)
    axes = sorted(range(a.ndim) if axis is None else
                  [x % a.ndim for x in (axis if isinstance(axis, tuple) else (axis,))])
    if a.flags.c_contiguous and axes == list(range(a.ndim - len(axes), a.ndim)):
        return True
    return bool(a.flags.f_contiguous and axes == list(range(len(axes))))


class DeviceArray(np.ndarray):
    """A NumPy array standing for a ``cupy.ndarray``: what it allocates and reads back is
    counted (see the module)."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        for a in inputs:  # (a 0-d one too: CuPy takes Python and NumPy scalars only,
            # cupy/_core/_scalar.pyx, CScalar)
            if isinstance(a, np.ndarray) and not isinstance(a, DeviceArray):
                raise TypeError(f"{ufunc.__name__}: a host array mixed with device arrays "
                                f"(CuPy refuses implicit conversion)")
        args = _host(inputs)
        if out is not None:
            kwargs["out"] = _host(out)
            if method == "__call__":
                _copied_in(inputs, out, ufunc.__name__)
        if _COUNTS.capture is not None and ufunc is np.matmul:
            _COUNTS.capture.cublas("matmul")  # CuPy's matmul is cuBLAS through CuPy
        if ufunc is not np.matmul and not (
                method == "reduce" and _cub_reduction(ufunc, inputs[0], kwargs)):
            _COUNTS.compiles(f"{ufunc.__name__}.{method}{_signature(inputs)}")
        if _COUNTS.capture is not None and (out is not None or method == "at"):
            # a kernel CuPy launches into existing memory: captured, not run
            if method == "reduce" and _cub_reduction(ufunc, inputs[0], kwargs):
                _COUNTS.allocated(f"{ufunc.__name__}.reduce by CUB")
            _COUNTS.capture.launch(f"{ufunc.__name__}.{method}",
                                   lambda: getattr(ufunc, method)(*args, **kwargs), inputs)
            return out[0] if out is not None and len(out) == 1 else out
        result = getattr(ufunc, method)(*args, **kwargs)
        _COUNTS.launch(f"{ufunc.__name__}.{method}")
        if method == "reduce" and _cub_reduction(ufunc, inputs[0], kwargs):
            # CUB makes its result and a workspace, even with out= (then copies)
            _COUNTS.allocated(f"{ufunc.__name__}.reduce by CUB", 2 - (out is None))
        if out is not None or method == "at":
            return out[0] if out is not None and len(out) == 1 else out
        return _wrap(result, [], f"{ufunc.__name__}.{method}")

    def __array_function__(self, func, types, args, kwargs):
        inputs = _device_inputs(list(args) + list(kwargs.values()))
        if func.__name__ not in _NO_KERNEL and not (
                func in _REDUCTIONS and _cub_reduction(_REDUCTIONS[func], args[0], kwargs)):
            _COUNTS.compiles(f"{func.__name__}{_signature(inputs)}")
        if _COUNTS.capture is not None and func in (np.dot, np.tensordot, np.matmul):
            _COUNTS.capture.cublas(func.__name__)  # cuBLAS through CuPy, as matmul
        if _COUNTS.capture is not None and (func is np.copyto or
                                            kwargs.get("out") is not None):
            # into existing memory: a kernel, captured, not run
            host_args, host_kwargs = _host(args), {k: _host(v) for k, v in kwargs.items()}
            _COUNTS.capture.launch(func.__name__, lambda: func(*host_args, **host_kwargs),
                                   list(args) + list(kwargs.values()))
            return kwargs.get("out")
        result = func(*_host(args), **{k: _host(v) for k, v in kwargs.items()})
        made = _COUNTS.allocations
        result = _wrap(result, inputs, func.__name__)
        if func is np.copyto or kwargs.get("out") is not None or _COUNTS.allocations > made:
            _COUNTS.launch(func.__name__)  # (a kernel into memory, or one making an array)
        return result

    # --- what allocates ---------------------------------------------------------------

    def copy(self, *args, **kwargs):
        # (CuPy's copy is astype to its own dtype: elementwise_copy, a kernel, not a memcpy;
        # cupy/_core/core.pyx, ndarray._astype)
        _COUNTS.compiles(f"copy({self.dtype})")
        return _wrap(self.view(np.ndarray).copy(*args, **kwargs), [], "copy")

    def astype(self, *args, **kwargs):
        result = self.view(np.ndarray).astype(*args, **kwargs)
        if not np.shares_memory(result, self):  # (else itself: copy=False, no cast)
            _COUNTS.compiles(f"astype({self.dtype}->{result.dtype})")
        return _wrap(result, [self], "astype")

    def argmax(self, *args, **kwargs):
        _COUNTS.compiles(f"argmax({self.dtype})")
        return _wrap(self.view(np.ndarray).argmax(*args, **kwargs), [], "argmax")

    def argmin(self, *args, **kwargs):
        _COUNTS.compiles(f"argmin({self.dtype})")
        return _wrap(self.view(np.ndarray).argmin(*args, **kwargs), [], "argmin")

    def reshape(self, *args, **kwargs):
        return _wrap(np.ndarray.reshape(self, *args, **kwargs), [self], "reshape")

    def ravel(self, *args, **kwargs):
        return _wrap(np.ndarray.ravel(self, *args, **kwargs), [self], "ravel")

    def flatten(self, *args, **kwargs):
        return _wrap(self.view(np.ndarray).flatten(*args, **kwargs), [], "flatten")

    def __getitem__(self, index):
        result = np.ndarray.__getitem__(self, _host(index))
        if isinstance(result, np.generic):  # CuPy: a 0-d view, no scalar
            key = index if isinstance(index, tuple) else (index,)
            result = np.ndarray.__getitem__(self, _host(key) + (Ellipsis,))
        return _wrap(result, [self], "getitem")

    def __setitem__(self, index, value):
        host = self.view(np.ndarray)
        if isinstance(value, DeviceArray):
            key = index if isinstance(index, tuple) else (index,)
            if not any(k is Ellipsis for k in key):  # (an element: its 0-d view)
                key = key + (Ellipsis,)
            target = np.ndarray.__getitem__(host, _host(key))
            # CuPy (_routines_indexing.pyx, _scatter_op): the same layout -- nothing for
            # the very same view, one memcpy into a C-contiguous one of the same dtype --
            # else elementwise_copy, a kernel, which copies an overlapping input first
            if not ((value.shape, value.strides) == (target.shape, target.strides) and (
                    value.ctypes.data == target.ctypes.data or (
                        target.flags.c_contiguous and value.dtype == target.dtype))):
                _copied_in([value], [target], "setitem")

        if not isinstance(value, np.ndarray) and value != 0:
            _COUNTS.compiles(f"fill({self.dtype})")

        def run():
            host[_host(index)] = _host(value)
        if _COUNTS.capture is not None:  # a copy or fill kernel: captured, not run
            _COUNTS.capture.launch("setitem", run, (value,))
        else:
            _COUNTS.launch("setitem")
            run()

    def take(self, indices, axis=None, out=None):
        # CuPy (_routines_indexing.pyx, _ndarray_take and _take): one kernel, cupy_take,
        # into ``out`` -- whose dtype and shape must be the result's -- with the indices
        # wrapped (index % range); host indices are copied to the device first, and
        # without ``out`` the result is a new array
        if not isinstance(indices, DeviceArray) and not np.isscalar(indices):
            _COUNTS.allocated("take: host indices copied to the device")
        shape = np.shape(indices)
        if axis is not None:
            axis = axis % self.ndim
            shape = self.shape[:axis] + shape + self.shape[axis + 1:]
        _COUNTS.compiles(f"take({self.dtype})")
        if out is None:
            _COUNTS.allocated("take")
            out = np.empty(shape, self.dtype).view(DeviceArray)
        elif out.dtype != self.dtype:
            raise TypeError("Output dtype mismatch")
        elif out.shape != shape:
            raise ValueError("Output shape mismatch")
        host, into = self.view(np.ndarray), out.view(np.ndarray)

        def run():
            np.take(host, _host(indices), axis, out=into, mode="wrap")
        if _COUNTS.capture is not None:  # a kernel: captured, not run
            _COUNTS.capture.launch("take", run, (self, indices, out))
        else:
            _COUNTS.launch("take")
            run()
        return out

    def fill(self, value):
        if value != 0:
            _COUNTS.compiles(f"fill({self.dtype})")
        host = self.view(np.ndarray)
        if _COUNTS.capture is not None:
            _COUNTS.capture.launch("fill", lambda: host.fill(value), (value,))
        else:
            _COUNTS.launch("fill")
            host.fill(value)

    def set(self, arr, stream=None):
        """``cupy.ndarray.set``: a host array copied in, on the current stream
        (``copy_from_host_async`` from pageable memory, cupy/_core/core.pyx), after
        CuPy's checks; during a capture CUDA refuses a copy from pageable memory."""
        if not isinstance(arr, np.ndarray) or isinstance(arr, DeviceArray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: "
                             f"{arr.shape}")
        if not (self.flags.c_contiguous or self.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        if _COUNTS.capture is not None:
            _COUNTS.capture.pageable_copy("set")
        _COUNTS.launch("set")
        self.view(np.ndarray)[...] = arr

    # --- what reads the device from the host -------------------------------------------

    def __float__(self):
        _COUNTS.synced("float")
        return float(self.view(np.ndarray))

    def __int__(self):
        _COUNTS.synced("int")
        return int(self.view(np.ndarray))

    def __index__(self):
        _COUNTS.synced("index")
        return self.view(np.ndarray).__index__()

    def __bool__(self):
        _COUNTS.synced("bool")
        return bool(self.view(np.ndarray))

    def item(self, *args):
        _COUNTS.synced("item")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        _COUNTS.synced("tolist")
        return self.view(np.ndarray).tolist()

    def get(self):
        """``cupy.ndarray.get``: a host copy."""
        _COUNTS.synced("get")
        return self.view(np.ndarray).copy()


def _created(name):
    """``xp.<name>``: NumPy's, its result a device array, a new one counted."""
    numpy_function = getattr(np, name)

    def create(*args, **kwargs):
        if name in CountingXp.COMPILING:
            _COUNTS.compiles(name)
        inputs, made = _device_inputs(args), _COUNTS.allocations
        result = _wrap(numpy_function(*_host(args), **{k: _host(v) for k, v in kwargs.items()}),
                       inputs, name)
        if _COUNTS.allocations > made and name not in ("empty", "empty_like"):
            _COUNTS.launch(name)  # a new array filled: a kernel, or a copy from the host
        return result
    return create


class CountingXp(types.ModuleType):
    """NumPy as the net's array module, under CuPy's rules (see the module)."""

    CREATION = ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like",
                "full_like", "array", "asarray", "ascontiguousarray", "arange", "stack",
                "concatenate", "einsum", "copy")
    # of those, the ones that run a kernel CuPy compiles (a fill of ones, say)
    COMPILING = ("ones", "full", "ones_like", "full_like", "arange", "stack", "concatenate",
                 "einsum", "copy")

    def __init__(self):
        super().__init__("counting_cupy")
        self.ndarray = DeviceArray
        for name in self.CREATION:
            setattr(self, name, _created(name))

    def __getattr__(self, name):
        return getattr(np, name)


def _contiguous(a) -> bool:
    return a.flags.c_contiguous or a.flags.f_contiguous


class _Cublas:
    """``cupy.cublas`` as the engine calls it: recorded (and run by ``blas``, host_cupy's
    emulation, if given); the copies that cupy/cublas.py makes of an operand or output
    neither C- nor F-contiguous counted. During a capture it refuses, as CuPy does: every
    cuBLAS wrapper first sets the handle's stream, and ``setStream`` raises
    NotImplementedError while the stream captures (cupy_backends/cuda/libs/cublas.pyx,
    ``setStream``, lines 642-651, called by ``sgemm`` at line 1080 through ``_setStream``)."""

    def __init__(self, launches, blas=None):
        self.launches, self.blas = launches, blas

    def gemm(self, transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
        if _COUNTS.capture is not None:
            _COUNTS.capture.cublas("gemm")
        assert isinstance(out, DeviceArray), "gemm: the engine writes into its own out"
        for name, x in (("a", a), ("b", b), ("out", out)):
            if not _contiguous(x):
                _COUNTS.allocated(f"gemm copies {name}")
        self.launches.append("gemm")
        _COUNTS.launch("cupy.cublas.gemm")
        if self.blas is not None:  # a 0-d device alpha or beta: read by cuBLAS, no sync
            self.blas.gemm(transa, transb, *_host((a, b)), out=_host(out), alpha=_host(alpha),
                           beta=_host(beta))
        return out

    def gemv(self, transa, alpha, a, x, beta, y):
        if _COUNTS.capture is not None:
            _COUNTS.capture.cublas("gemv")
        assert isinstance(y, DeviceArray), "gemv: the engine writes into its own y"
        if not _contiguous(a):
            _COUNTS.allocated("gemv copies a")
        self.launches.append("gemv")
        _COUNTS.launch("cupy.cublas.gemv")
        if self.blas is not None:
            self.blas.gemv(transa, _host(alpha), *_host((a, x)), _host(beta), _host(y))


def _copied_in(inputs, outputs, what) -> None:
    """CuPy's rule for a kernel's inputs (cupy/_core/_kernel.pyx,
    ``_copy_in_args_if_needed``): an input that is not the very output object but may
    share memory with it is copied first -- an allocation."""
    for a in inputs:
        if isinstance(a, DeviceArray) and any(
                a is not o and np.may_share_memory(a, o) for o in outputs):
            _COUNTS.allocated(f"{what}: CuPy copies an input that overlaps the output")
            return


def _launched(launches, name, args, run=None) -> None:
    """A kernel launch, recorded: its arrays must be on the device (CuPy's kernels
    refuse host arrays); run by ``run`` if given, or captured by an open capture."""
    for a in args:
        if isinstance(a, np.ndarray) and not isinstance(a, DeviceArray):
            raise TypeError(f"{name}: a host array passed to a kernel")
    launches.append(name)
    _COUNTS.launch(name)
    if _COUNTS.capture is not None:
        _COUNTS.capture.launch(name, run, args)
    elif run is not None:
        run()


def to_device(net, xp):
    """Move ``net`` onto the counting device: its module, parameters and buffers."""
    net.xp = net.inputs.xp = xp
    net.params = [(W.view(DeviceArray), b.view(DeviceArray)) for W, b in net.params]
    net.training_workspace = Workspace(xp, net.dtype)
    net.inference_workspace = Workspace(xp, net.dtype)


@contextlib.contextmanager
def counting_device(net, lib=None):
    """Within: ``net`` computes on the counting device (see the module); yields the
    :class:`Counts` (``reset()`` them after the warm-up steps). ``lib``: host_cupy's build
    (the ``host_cupy_lib`` fixture): then the kernels and GEMMs run, on the host."""
    xp, launches = CountingXp(), []
    cupy = types.ModuleType("cupy")
    device = None
    if lib is not None:
        import host_cupy

        device = host_cupy.Device(lib)
        cupy.RawModule = device.cupy.RawModule
    cupy.ndarray, cupy.cublas = DeviceArray, _Cublas(launches, device)
    cupy.asarray = xp.asarray  # ops' direct calls with a number: a device array of it
    to_device(net, xp)
    _COUNTS.reset()
    launch, launch_rows = ops._launch, ops._launch_rows
    caches = (ops._function, cuda.module)

    def run(function, *args, **kwargs):  # host_cupy's kernels take NumPy arrays
        return None if device is None else lambda: function(*_host(args), **kwargs)

    import capture  # gpu_mlp.cublas's libcublas on this device, capture-aware

    cupy.cuda = capture.cuda_module()  # streams that capture, as gpu_mlp.graph uses them

    with pytest.MonkeyPatch.context() as mp, np.errstate(all="ignore"), \
            capture.capturable_blas(lib):
        # (a plain ndarray is the host's: a host batch checked before it is copied in)
        mp.setattr(ops, "is_numpy", lambda a: type(a) is np.ndarray)
        mp.setattr(ops, "_launch", lambda op, act, *args, **kwargs: _launched(
            launches, op, args, run(launch, op, act, *args, **kwargs)))
        mp.setattr(ops, "_launch_rows", lambda name, rows, *args: _launched(
            launches, name, args, run(launch_rows, name, rows, *args)))
        mp.setitem(sys.modules, "cupy", cupy)
        mp.setitem(sys.modules, "cupy.cublas", cupy.cublas)
        for cache in caches:
            cache.cache_clear()
        try:
            yield _COUNTS
        finally:
            _COUNTS.capture = None
            for cache in caches:
                cache.cache_clear()
