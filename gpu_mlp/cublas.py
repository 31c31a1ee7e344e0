"""cuBLAS called directly through ``ctypes``, so that a GEMM can be captured into a CUDA
graph: the engine's GEMMs (single and strided batched) and GEMVs on the GPU.

CuPy stays the array library; only its cuBLAS wrappers are left, because every one of
them first sets the handle's stream and ``setStream`` refuses while the stream captures
(cupy_backends/cuda/libs/cublas.pyx). Here each (thread, device, stream) gets its own
handle, made once, outside any capture: its stream set once (``cublasSetStream`` also
resets the workspace, so the order matters), then its workspace -- 32 MiB, what the
cuBLAS documentation recommends for Hopper (4 MiB for earlier GPUs), allocated once from
CuPy's pool and kept -- so that cuBLAS never allocates during a capture, and its math
mode TF32 wherever CuPy's GEMMs would be: ``CUPY_TF32=1`` (CuPy's switch, which its
matmul passes per call as a compute type) or TF32 math set on CuPy's own cuBLAS handle
of the device (which its ``cupy.cublas`` calls use); else CUBLAS_DEFAULT_MATH. The
library is the
``libcublas`` CuPy loads (``cuda.pathfinder``, as cupy_backends/cuda/libs/__init__.py).

``alpha`` and ``beta`` are Python (or NumPy) numbers, passed in
``CUBLAS_POINTER_MODE_HOST`` (cuBLAS reads them during the call, so a captured graph
keeps the values of the capture), or 0-d device arrays of the output's dtype, passed in
``CUBLAS_POINTER_MODE_DEVICE`` (read when the GEMM executes: a replay sees their current
value). With one of each, the number goes to the device once and is kept there.

Arrays are C-ordered; cuBLAS is column-major, and a C-ordered (r, c) array is the
column-major (c, r) matrix with leading dimension c, so ``out = op(a) op(b)`` is asked
as ``out^T = op(b)^T op(a)^T``, as ``ops.gemm``'s NumPy branch asks SciPy.

What the binding needs from the GPU runtime is one object (:class:`CupyRuntime` on a
GPU); :func:`use` puts another in its place, which is how the tests run this module's
marshalling against a host stand-in for libcublas.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections import OrderedDict

import numpy as np

OP = {"N": 0, "T": 1}  # cublasOperation_t
POINTER_MODE_HOST, POINTER_MODE_DEVICE = 0, 1  # cublasPointerMode_t
TF32_TENSOR_OP_MATH = 3  # cublasMath_t: float32 GEMMs round their inputs to TF32
WORKSPACE_BYTES = 32 << 20  # cublasSetWorkspace: 32 MiB recommended on Hopper, 4 elsewhere
# handles (and their workspaces) kept per thread: one per stream used, so a program that
# makes stream after stream would otherwise hold 32 MiB more with each
MAX_HANDLES = 8

# cublasStatus_t (cublas_api.h)
STATUS = {0: "CUBLAS_STATUS_SUCCESS", 1: "CUBLAS_STATUS_NOT_INITIALIZED",
          3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
          8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR",
          13: "CUBLAS_STATUS_EXECUTION_FAILED", 14: "CUBLAS_STATUS_INTERNAL_ERROR",
          15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR"}

_P, _I, _SIZE, _LL = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_longlong
# The C prototypes of what is called (cublas_api.h); handles, streams and every array or
# scalar pointer are void*.
PROTOTYPES = {
    "cublasCreate_v2": (ctypes.POINTER(ctypes.c_void_p),),
    "cublasDestroy_v2": (_P,),
    "cublasSetStream_v2": (_P, _P),
    "cublasSetWorkspace_v2": (_P, _P, _SIZE),
    "cublasSetPointerMode_v2": (_P, _I),
    "cublasSetMathMode": (_P, _I),
    "cublasSgemm_v2": (_P, _I, _I, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _I),
    "cublasDgemm_v2": (_P, _I, _I, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _I),
    "cublasSgemmStridedBatched": (_P, _I, _I, _I, _I, _I, _P, _P, _I, _LL, _P, _I, _LL, _P,
                                  _P, _I, _LL, _I),
    "cublasDgemmStridedBatched": (_P, _I, _I, _I, _I, _I, _P, _P, _I, _LL, _P, _I, _LL, _P,
                                  _P, _I, _LL, _I),
    "cublasSgemv_v2": (_P, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _I),
    "cublasDgemv_v2": (_P, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _I),
}
GEMM = {np.dtype(np.float32): "cublasSgemm_v2", np.dtype(np.float64): "cublasDgemm_v2"}
GEMM_BATCHED = {np.dtype(np.float32): "cublasSgemmStridedBatched",
                np.dtype(np.float64): "cublasDgemmStridedBatched"}
GEMV = {np.dtype(np.float32): "cublasSgemv_v2", np.dtype(np.float64): "cublasDgemv_v2"}
_HOST_SCALAR = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}
_INT_MAX = 2**31 - 1  # m, n, k and the leading dimensions are C ints


class CublasError(RuntimeError):
    """A cuBLAS call returned a status other than CUBLAS_STATUS_SUCCESS."""

    def __init__(self, function: str, status: int):
        name = STATUS.get(status, "an unknown cublasStatus_t")
        super().__init__(f"{function} returned {name} ({status})")
        self.function, self.status = function, status


class CupyRuntime:
    """What the binding asks of the GPU, answered by CuPy."""

    def __init__(self):
        import cupy
        # CuPy's cuBLAS module, which loads its libcublas: spelled as CuPy spells it, so
        # that the package's __getattr__ has cuda.pathfinder load the library first (a
        # dotted import skips that hook and fails where only pathfinder finds it: a pip
        # wheel's, or under CUDA_PATH)
        from cupy_backends.cuda.libs import cublas  # noqa: F401
        from cuda import pathfinder  # as CuPy found it (cached: the same library)

        self.cupy = cupy
        loaded = pathfinder.load_nvidia_dynamic_lib("cublas")
        # no path when it was loaded from elsewhere: then by its soname, already loaded
        major = cupy.cuda.runtime.runtimeGetVersion() // 1000
        self.library = ctypes.CDLL(loaded.abs_path or f"libcublas.so.{major}")
        self.array_type = cupy.ndarray

    def device(self) -> int:
        return self.cupy.cuda.runtime.getDevice()

    def stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def capturing(self, stream: int) -> bool:
        return bool(self.cupy.cuda.runtime.streamIsCapturing(stream))

    def workspace(self, nbytes: int):
        """Device memory for a handle's workspace: ``(owner, address)``."""
        memory = self.cupy.cuda.alloc(nbytes)
        return memory, memory.ptr

    def scalar(self, value, dtype):
        """A 0-d device array holding ``value``, kept for as long as the binding lives."""
        return self.cupy.full((), value, dtype=dtype)

    @staticmethod
    def pointer(a) -> int:
        return a.data.ptr

    def math_mode(self) -> int:
        """The math mode of CuPy's own cuBLAS handle of the current device."""
        from cupy_backends.cuda.libs import cublas

        return cublas.getMathMode(self.cupy.cuda.device.get_cublas_handle())


def cupy_tf32() -> bool:
    """Whether ``CUPY_TF32`` asks CuPy's float32 matrix products for TF32: read as CuPy
    reads it (cupy/_core/_routines_linalg.pyx, ``get_compute_type``: an integer > 0)."""
    value = os.environ.get("CUPY_TF32", "0")
    try:
        return int(value) > 0
    except ValueError:
        raise ValueError(f"CUPY_TF32 must be an integer (CuPy's switch for TF32: 1 on, "
                         f"0 off), got {value!r}") from None


class _Handle:
    """A cuBLAS handle bound to one stream, its workspace and its pointer mode."""

    __slots__ = ("ptr", "workspace", "mode", "math")

    def __init__(self, ptr: int, workspace, math: int):
        self.ptr, self.workspace, self.mode = ptr, workspace, POINTER_MODE_HOST
        self.math = math  # the math mode, CuPy's when it was made (TF32 or not)


class Cublas:
    """The binding over one runtime: ``gemm`` and ``gemv`` as :func:`gemm` and :func:`gemv`."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.functions = {}
        for name, argtypes in PROTOTYPES.items():
            function = getattr(runtime.library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
            self.functions[name] = function
        self.local = threading.local()  # handles are per thread: their mode is state
        self.constants = {}  # (device, dtype, value) -> a device scalar, for mixed modes
        self.host_scalars = {}  # (alpha, beta, dtype char) -> what _scalars returns

    # --- handles ---------------------------------------------------------------------

    def _call(self, name: str, *args) -> None:
        status = self.functions[name](*args)
        if status:
            raise CublasError(name, status)

    def handle(self) -> _Handle:
        """The handle of this thread's current device and stream (made on first use; the
        least recently used of :data:`MAX_HANDLES` goes to make room)."""
        runtime = self.runtime
        key = (runtime.device(), runtime.stream())
        handles = self.local.__dict__.get("handles")
        if handles is None:
            handles = self.local.handles = OrderedDict()
        handle = handles.get(key)
        if handle is None:
            handle = self._create(key[1])
            if len(handles) >= MAX_HANDLES:
                with contextlib.suppress(CublasError):  # refused (another thread's
                    self._destroy(handles.popitem(last=False)[1])  # capture): it leaks
            handles[key] = handle
        else:
            handles.move_to_end(key)
        return handle

    def _create(self, stream: int) -> _Handle:
        runtime = self.runtime
        if runtime.capturing(stream):
            raise RuntimeError(
                "cuBLAS has no handle for this stream yet, and making one (cublasCreate, "
                "its workspace) during a stream capture would allocate into the graph: "
                "call gpu_mlp.cublas.prepare() on the stream before capturing")
        ptr = ctypes.c_void_p()
        self._call("cublasCreate_v2", ctypes.byref(ptr))
        owner, address = runtime.workspace(WORKSPACE_BYTES)
        self._call("cublasSetStream_v2", ptr.value, stream)  # resets the workspace: first
        self._call("cublasSetWorkspace_v2", ptr.value, address, WORKSPACE_BYTES)
        math = TF32_TENSOR_OP_MATH if cupy_tf32() else runtime.math_mode()
        self._call("cublasSetMathMode", ptr.value, math)
        self._call("cublasSetPointerMode_v2", ptr.value, POINTER_MODE_HOST)
        return _Handle(ptr.value, owner, math)

    def _destroy(self, handle: _Handle) -> None:
        """Destroy ``handle``. cublasDestroy synchronises the device, so no GEMM still
        runs in its workspace, which then goes back to the pool -- unless a captured
        graph, which keeps its address, holds it (gpu_mlp.graph)."""
        self._call("cublasDestroy_v2", handle.ptr)

    def _mode(self, handle: _Handle, mode: int) -> None:
        if handle.mode != mode:
            self._call("cublasSetPointerMode_v2", handle.ptr, mode)
            handle.mode = mode

    # --- alpha and beta --------------------------------------------------------------

    def _scalars(self, alpha, beta, dtype):
        """``(pointer mode, alpha address, beta address, keep)``; ``keep`` holds what the
        addresses point into alive for the call."""
        array = self.runtime.array_type
        on_device = isinstance(alpha, array), isinstance(beta, array)
        if not any(on_device):
            try:  # host copies of the values, kept: a step asks the same few every time
                return self.host_scalars[alpha, beta, dtype.char]
            except (KeyError, TypeError):  # new, or unhashable (a 0-d NumPy array)
                return self._host_scalars(alpha, beta, dtype)
        alpha, beta = (self._device_scalar(x, dtype) if not d else self._check_scalar(x, dtype, n)
                       for x, d, n in zip((alpha, beta), on_device, ("alpha", "beta")))
        pointer = self.runtime.pointer
        return POINTER_MODE_DEVICE, pointer(alpha), pointer(beta), (alpha, beta)

    def _host_scalars(self, alpha, beta, dtype):
        host = _HOST_SCALAR[dtype]
        keep = host(alpha), host(beta)  # cuBLAS reads them during the call: any address
        found = POINTER_MODE_HOST, ctypes.addressof(keep[0]), ctypes.addressof(keep[1]), keep
        try:
            if len(self.host_scalars) >= 256:  # a schedule's every rate: keep a few only
                self.host_scalars.clear()
            self.host_scalars[alpha, beta, dtype.char] = found
        except TypeError:
            pass
        return found

    @staticmethod
    def _check_scalar(x, dtype, name):
        if x.ndim != 0 or x.dtype != dtype:
            raise TypeError(f"{name} on the device must be a 0-d {dtype.name} array, got "
                            f"{x.dtype.name} of shape {x.shape}")
        return x

    def _device_scalar(self, value, dtype):
        key = (self.runtime.device(), dtype, float(value))
        constant = self.constants.get(key)
        if constant is None:
            if self.runtime.capturing(self.runtime.stream()):
                raise RuntimeError(
                    f"a host number ({float(value)}) beside a device scalar is copied to "
                    f"the device once, and this one is new during a stream capture: pass "
                    f"both alpha and beta as device scalars, or use it once before capturing")
            constant = self.constants[key] = self.runtime.scalar(value, dtype)
        return constant

    # --- BLAS ------------------------------------------------------------------------

    def gemm(self, transa: str, transb: str, a, b, out, alpha=1.0, beta=0.0):
        """``out <- alpha op(a) op(b) + beta out`` in place; arrays C-contiguous."""
        dtype = out.dtype
        function = GEMM.get(dtype)
        if not (function and a.dtype == dtype and b.dtype == dtype and a.ndim == 2 and
                b.ndim == 2 and out.ndim == 2 and a.flags.c_contiguous and
                b.flags.c_contiguous and out.flags.c_contiguous):
            _refuse(GEMM, f"gemm {transa}{transb}", out, (("a", a, 2), ("b", b, 2),
                                                           ("out", out, 2)))
        M, K = _op_shape("gemm", transa, a)
        Kb, N = _op_shape("gemm", transb, b)
        if Kb != K or out.shape != (M, N):
            raise ValueError(f"gemm {transa}{transb}: op(a) {(M, K)}, op(b) {(Kb, N)}, "
                             f"out {out.shape}")
        self._gemm("gemm", function, OP[transb], OP[transa], N, M, K, b, max(1, b.shape[1]),
                   a, max(1, a.shape[1]), out, max(1, N), alpha, beta)
        return out

    def gemm_batched(self, transa: str, transb: str, a, b, out, alpha=1.0, beta=0.0):
        """``out[i] <- alpha op(a[i]) op(b[i]) + beta out[i]`` for every i, one strided
        batched GEMM; 3-D C-contiguous arrays, one batch size."""
        dtype = out.dtype
        function = GEMM_BATCHED.get(dtype)
        if not (function and a.dtype == dtype and b.dtype == dtype and a.ndim == 3 and
                b.ndim == 3 and out.ndim == 3 and a.flags.c_contiguous and
                b.flags.c_contiguous and out.flags.c_contiguous):
            _refuse(GEMM_BATCHED, f"gemm_batched {transa}{transb}", out,
                    (("a", a, 3), ("b", b, 3), ("out", out, 3)))
        M, K = _op_shape("gemm_batched", transa, a, batched=True)
        Kb, N = _op_shape("gemm_batched", transb, b, batched=True)
        batch = out.shape[0]
        if Kb != K or out.shape != (batch, M, N) or len(a) != batch or len(b) != batch:
            raise ValueError(f"gemm_batched {transa}{transb}: a {a.shape}, b {b.shape}, out "
                             f"{out.shape}: op(a[i]) {(M, K)} op(b[i]) {(Kb, N)}, one batch")
        if batch > _INT_MAX:
            raise ValueError(f"gemm_batched: cuBLAS takes up to 2**31 - 1 matrices, got {batch}")
        # each matrix as gemm asks it, the next one a matrix's size further on
        strides = (b.shape[1] * b.shape[2], a.shape[1] * a.shape[2], M * N)
        self._gemm("gemm_batched", function, OP[transb], OP[transa], N, M, K, b,
                   max(1, b.shape[2]), a, max(1, a.shape[2]), out, max(1, N), alpha, beta,
                   batched=(strides, batch))
        return out

    def _gemm(self, where, function, opb, opa, m, n, k, b, ldb, a, lda, out, ldc, alpha,
              beta, overlap=True, batched=None):
        if m > _INT_MAX or n > _INT_MAX or k > _INT_MAX:
            raise ValueError(f"{where}: cuBLAS takes sizes up to 2**31 - 1, got {m, n, k}")
        pointer = self.runtime.pointer
        b_ptr, a_ptr, out_ptr = pointer(b), pointer(a), pointer(out)
        if overlap:  # cuBLAS reads the operands as it writes out: an overlap is undefined
            _check_no_overlap(where, out, out_ptr, (("a", a, a_ptr), ("b", b, b_ptr)))
        handle = self.handle()
        mode, alpha_ptr, beta_ptr, keep = self._scalars(alpha, beta, out.dtype)
        if handle.mode != mode:
            self._mode(handle, mode)
        if batched is None:
            self._call(function, handle.ptr, opb, opa, m, n, k, alpha_ptr, b_ptr, ldb, a_ptr,
                       lda, beta_ptr, out_ptr, ldc)  # keep: alive till here
        else:
            (stride_b, stride_a, stride_out), count = batched
            self._call(function, handle.ptr, opb, opa, m, n, k, alpha_ptr, b_ptr, ldb,
                       stride_b, a_ptr, lda, stride_a, beta_ptr, out_ptr, ldc, stride_out, count)

    def gemv(self, transa: str, a, x, out, alpha=1.0, beta=0.0):
        """``out <- alpha op(a) x + beta out`` in place; arrays C-contiguous."""
        dtype = out.dtype
        function = GEMV.get(dtype)
        if not (function and a.dtype == dtype and x.dtype == dtype and a.ndim == 2 and
                x.ndim == 1 and out.ndim == 1 and a.flags.c_contiguous and
                x.flags.c_contiguous and out.flags.c_contiguous):
            _refuse(GEMV, f"gemv {transa}", out, (("a", a, 2), ("x", x, 1), ("out", out, 1)))
        M, K = _op_shape("gemv", transa, a)
        for name, v, n in (("x", x, K), ("out", out, M)):
            if v.shape != (n,):
                raise ValueError(f"gemv {transa}: {name}: expected shape {(n,)} for op(a) "
                                 f"{(M, K)}, got {v.shape}")
        rows, cols = a.shape  # column-major: a is the (cols, rows) matrix a^T
        if rows > _INT_MAX or cols > _INT_MAX:
            raise ValueError(f"gemv: cuBLAS takes sizes up to 2**31 - 1, got {a.shape}")
        pointer = self.runtime.pointer
        a_ptr, x_ptr, out_ptr = pointer(a), pointer(x), pointer(out)
        _check_no_overlap("gemv", out, out_ptr, (("a", a, a_ptr), ("x", x, x_ptr)))
        handle = self.handle()
        mode, alpha_ptr, beta_ptr, keep = self._scalars(alpha, beta, out.dtype)
        if handle.mode != mode:
            self._mode(handle, mode)
        self._call(function, handle.ptr, 1 - OP[transa], cols, rows, alpha_ptr, a_ptr,
                   max(1, cols), x_ptr, 1, beta_ptr, out_ptr, 1)  # keep: alive till here

    def prepare(self) -> _Handle:
        """Make the current stream's handle and workspace now (before a capture); returns
        the handle, which holds the workspace alive."""
        return self.handle()


def _refuse(table, where, out, arrays) -> None:
    """Raise what is wrong with the arrays of a call (the fast check found something)."""
    dtype = out.dtype
    if dtype not in table:
        raise TypeError(f"{where}: float32 or float64 arrays only, got {dtype.name}")
    for name, a, ndim in arrays:
        if a.dtype != dtype:
            raise TypeError(f"{where}, {name}: expected {dtype.name}, got {a.dtype.name}")
        if a.ndim != ndim:
            raise ValueError(f"{where}, {name}: expected {ndim}-D, got shape {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{where}, {name}: not C-contiguous (cuBLAS reads it in place, "
                             f"and gpu_mlp copies nothing)")
    raise AssertionError(f"{where}: refused with nothing wrong")  # the checks disagree


def _check_no_overlap(where, out, out_ptr, operands) -> None:
    """C-contiguous arrays span [pointer, pointer + nbytes): out's must meet no operand's."""
    size = out.nbytes
    end = out_ptr + size
    for name, a, ptr in operands:
        if size and ptr < end and out_ptr < ptr + a.nbytes:
            raise ValueError(f"{where}, out: overlaps {name} (cuBLAS reads {name} as it "
                             f"writes out)")


def _op_shape(where, trans, a, batched=False) -> tuple[int, int]:
    shape = a.shape[1:] if batched else a.shape
    if trans == "N":
        return shape
    if trans == "T":
        return shape[::-1]
    raise ValueError(f"{where} {trans}: transposition {trans!r} is not 'N' or 'T'")


_lock = threading.Lock()
_binding: Cublas | None = None


def binding() -> Cublas:
    """The process's binding, over CuPy (made on first use)."""
    global _binding
    if _binding is None:
        with _lock:
            if _binding is None:
                _binding = Cublas(CupyRuntime())
    return _binding


@contextlib.contextmanager
def use(runtime):
    """Within: the binding runs over ``runtime`` (an object with :class:`CupyRuntime`'s
    attributes) instead of CuPy; yields that :class:`Cublas`."""
    global _binding
    previous, _binding = _binding, Cublas(runtime)
    try:
        yield _binding
    finally:
        _binding = previous


def gemm(transa: str, transb: str, a, b, out, alpha=1.0, beta=0.0):
    """``out <- alpha op(a) op(b) + beta out`` on the GPU (see the module)."""
    return (_binding or binding()).gemm(transa, transb, a, b, out, alpha, beta)


def gemm_batched(transa: str, transb: str, a, b, out, alpha=1.0, beta=0.0):
    """``out[i] <- alpha op(a[i]) op(b[i]) + beta out[i]`` on the GPU (see the module)."""
    return (_binding or binding()).gemm_batched(transa, transb, a, b, out, alpha, beta)


def gemv(transa: str, a, x, out, alpha=1.0, beta=0.0):
    """``out <- alpha op(a) x + beta out`` on the GPU (see the module)."""
    return (_binding or binding()).gemv(transa, a, x, out, alpha, beta)


def prepare():
    """Make the current device's and stream's handle and workspace now: call it on a
    stream before capturing GEMMs on it. Returns the handle: a graph of those GEMMs keeps
    it, and with it the workspace whose address the GEMMs keep."""
    return (_binding or binding()).prepare()
