"""A stand-in for CuPy that runs gpu_mlp's CUDA code on the CPU: the engine's CuPy path,
end to end, on a machine without a GPU.

Inside ``with cupy_path(lib) as device:`` every op of ``gpu_mlp.ops`` takes its CuPy
branch on the engine's NumPy arrays (``ops.is_numpy`` answers False) and ``import cupy``
finds ``device.cupy``, a fake module. The real ``gpu_mlp.cuda`` builds its kernels from
it, and each call is checked as strictly as the GPU needs it, then run:

* ``cupy.ElementwiseKernel``: it must be an ``ops.ELEMENTWISE`` entry formatted for one
  activation, named as ``ops`` names it, with ``cuda.source()`` as its preamble. A call
  passes inputs, then outputs, in parameter order, as CuPy takes them: scalars as NumPy
  scalars of their declared type (``T``: the arrays' dtype; ``int32``, ``int64`` and
  ``uint32``: ``numpy.int32``, ``numpy.int64`` and ``numpy.uint32``, which the body gets
  as ``int``, ``long long`` and ``unsigned int``; anything else CuPy would type
  otherwise), arrays C-contiguous, of their declared dtype, ``bias`` (d,) against
  (B, d) outputs, the per-row columns (B, 1), and every other array the outputs'
  shape (a ``raw`` one any shape). The body then runs as the host loop ``cuda_host``
  generates from the same text.
* ``cupy.RawModule(code=cuda.source(), ...)``: ``get_function("gm_softmax_forward<float>")``
  gives a kernel called as CuPy's ``kernel(grid, block, args)``, with the arguments
  checked against the ``__global__`` signature parsed from ``kernels/rowwise.cuh``: an
  array per pointer (the pointee's dtype, its shape from the parameter's name and the
  ``int`` arguments B and C), ``numpy.uint64(0)`` -- a null pointer -- only for ``bias``,
  ``numpy.int32`` for ``int``, a scalar of the kernel's dtype for ``T``; no
  ``__restrict__`` array overlapping another; a one-dimensional grid with a thread for
  every row. Then the very ``__global__`` bodies, compiled by g++ with ``blockIdx``,
  ``blockDim`` and ``threadIdx`` as host variables, run thread after thread.
* ``cupy.cublas.gemm(transa, transb, a, b, out, alpha, beta)`` and
  ``cupy.cublas.gemv(transa, alpha, a, x, beta, y)``: CuPy's documented semantics,
  ``out = alpha op(a) op(b) + beta out`` and ``y = alpha op(a) x + beta y`` in place
  (with ``beta = 0`` the output is not read, as in cuBLAS), computed in float64 by
  NumPy after CuPy's own shape and dtype assertions; operands C-contiguous and no output
  overlapping an input.

* ``cupy.asarray(a)``: a host array goes to the "device" only if CuPy takes its dtype
  (``cupy/_core/_dtype.pyx``: booleans, integers, floats, complex numbers); anything else
  -- strings, objects, dates, records -- raises CuPy's ``ValueError: Unsupported dtype``.
  ``cupy.ndarray`` is a class no host array belongs to, so every one goes that way.

``device.launches`` counts every kernel and BLAS call.

What this proves: the CuPy branches of ``gpu_mlp.ops`` and the CuPy side of
``gpu_mlp.cuda`` -- kernel names, bodies and preamble, the number, order, types and
shapes of every launch's arguments, the grid arithmetic, the null bias, the BLAS
transposition flags -- and that the engine computing through the CUDA bodies gets the
reference's numbers. What it cannot: CuPy itself (its type inference, broadcasting and
indexing beyond the cases checked here), NVRTC (``test_cuda_host.py`` compiles the same
text with nvcc where there is one), cuBLAS's rounding (its summation order, TF32), the
device's math library and its fused multiply-adds (g++ here contracts nothing), and
anything concurrent: threads run one after another, so a race, a stream or an
asynchronous copy cannot show. The workspace's buffers are NumPy's, so a kernel that
reads an uninitialised buffer shows as wrong numbers, never as a fault.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
import sys
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import cuda_host
from gpu_mlp import cuda, ops

# --- the __global__ kernels, as the CUDA sources declare them ------------------------------

_DEVICE_ONLY = re.compile(r"^#ifdef __CUDACC__\n(.*?)^#endif", re.MULTILINE | re.DOTALL)
_GLOBAL = re.compile(r"template <typename T>\s*__global__ void (\w+)\(([^)]*)\)")

# The extent of each pointer argument of the row kernels, by the parameter's name, in
# units named after the kernel's int parameters (rowwise.cuh: "Arrays are (B, C)").
ROW_SHAPES = {"z": ("B", "C"), "out": ("B", "C"), "f": ("B", "C"), "g": ("B", "C"),
              "grad": ("B", "C"), "targets": ("B", "C"), "bias": ("C",), "labels": ("B",),
              "row_loss": ("B",)}
NULLABLE = {"bias"}  # rowwise.cuh: "bias may be null (no bias)"
NULL = np.uint64(0)  # how a RawKernel is given a null pointer (8 zero bytes)
MAX_BLOCK = 1024     # threads per block on every CUDA GPU

_SCALAR_CTYPES = {"float": ctypes.c_float, "double": ctypes.c_double, "int": ctypes.c_int,
                  "long long": ctypes.c_longlong}


@dataclass(frozen=True)
class Param:
    """One parameter of a ``__global__`` template."""

    declaration: str  # as written, e.g. "const T* __restrict__ bias"
    name: str
    type: str         # "T", "int" or "long long"; for a pointer, the pointee's
    pointer: bool
    restrict: bool

    @classmethod
    def parse(cls, declaration: str) -> "Param":
        words = declaration.replace("*", " * ").split()
        base = [w for w in words[:-1] if w not in ("const", "*", "__restrict__")]
        return cls(" ".join(declaration.split()), words[-1], " ".join(base), "*" in words,
                   "__restrict__" in words)


def device_code() -> str:
    """The ``#ifdef __CUDACC__`` parts of ``cuda.source()``: what only nvcc compiles."""
    return "".join(_DEVICE_ONLY.findall(cuda.source()))


def row_kernels() -> dict[str, list[Param]]:
    """``{kernel: parameters}`` for every ``__global__`` template of the sources."""
    return {name: [Param.parse(p) for p in params.split(",")]
            for name, params in _GLOBAL.findall(device_code())}


# --- the host build: cuda_host's functions and the __global__ bodies behind launchers ------

_THREAD_COORDINATES = """
// CUDA's built-in thread coordinates, as host variables the launchers set per "thread"
struct gm_host_dim3 { unsigned int x, y, z; };
static gm_host_dim3 blockIdx, blockDim, threadIdx;
"""

_LAUNCHER = """
extern "C" void launch_{kernel}_{ctype}(unsigned int grid, unsigned int block, {params})
{{
    blockDim.x = block;
    for (blockIdx.x = 0; blockIdx.x < grid; ++blockIdx.x)
        for (threadIdx.x = 0; threadIdx.x < block; ++threadIdx.x)
            {kernel}<{ctype}>({args});
}}
"""


def launcher_source() -> str:
    """The ``__global__`` kernels as they are written, and ``launch_<kernel>_<ctype>(grid,
    block, <the kernel's parameters>)`` running one of them over a one-dimensional grid."""
    parts = [_THREAD_COORDINATES, device_code()]
    for kernel, params in row_kernels().items():
        for ctype in cuda_host.CTYPES.values():
            declared = ", ".join(re.sub(r"\bT\b", ctype, p.declaration) for p in params)
            parts.append(_LAUNCHER.format(kernel=kernel, ctype=ctype, params=declared,
                                          args=", ".join(p.name for p in params)))
    return "\n".join(parts)


def build(folder: Path) -> ctypes.CDLL:
    """Compile ``cuda_host.host_source()`` and :func:`launcher_source` with g++ and load it."""
    cpp, lib = folder / "host_cupy.cpp", folder / "host_cupy.so"
    cpp.write_text(cuda_host.host_source() + launcher_source())
    cuda_host._run(["g++", *cuda_host.HOST_FLAGS, "-I", str(cuda.kernel_dir()), str(cpp),
                    "-o", str(lib)])
    return ctypes.CDLL(str(lib))


# --- checks shared by the fakes ------------------------------------------------------------

def _check_array(where: str, a, dtype, shape) -> None:
    assert isinstance(a, np.ndarray), f"{where}: expected an array, got {type(a).__name__}"
    assert a.dtype == dtype, f"{where}: expected {np.dtype(dtype).name}, got {a.dtype}"
    assert a.shape == tuple(shape), f"{where}: expected shape {tuple(shape)}, got {a.shape}"
    assert a.flags.c_contiguous, f"{where}: not C-contiguous"


def _check_no_overlap(where: str, a, others) -> None:
    for other in others:
        assert not np.shares_memory(a, other), f"{where}: overlaps another argument"


# --- the fake cupy --------------------------------------------------------------------------

class ElementwiseKernel:
    """``cupy.ElementwiseKernel`` for the bodies of ``ops.ELEMENTWISE``."""

    def __init__(self, device, in_params, out_params, operation, name, *, preamble):
        known = {"_".join(["gpu_mlp", op] + ([act] if act else [])): (op, act)
                 for op, act in cuda_host.elementwise_pairs()}
        assert name in known, f"no ops.ELEMENTWISE kernel is named {name!r}"
        self.op, self.act = known[name]
        in_, out, body = ops.ELEMENTWISE[self.op]
        assert (in_params, out_params, operation) == (in_, out, body.format(act=self.act)), \
            f"{name} is not ops.ELEMENTWISE[{self.op!r}] for {self.act}"
        assert preamble == cuda.source(), f"{name}: the preamble is not cuda.source()"
        self.device, self.name = device, name
        self.params = cuda_host.elementwise_signature(self.op)

    def __call__(self, *args):
        names = [p.name for p in self.params]
        assert len(args) == len(names), f"{self.name}{tuple(names)}: got {len(args)} arguments"
        out = args[[p.output for p in self.params].index(True)]
        assert isinstance(out, np.ndarray) and out.dtype in cuda_host.CTYPES, \
            f"{self.name}: the output {names[-1]} must be a float32 or float64 array"
        # how CuPy broadcasts the engine's per-channel bias ((d,) over (B, d), (c, 1, 1)
        # over NCHW) and its per-row (B, 1) columns
        channels, inner = (out.shape[1], int(np.prod(out.shape[2:]))) if out.ndim > 1 else \
            (out.shape[0], 1)
        shapes = {"full": out.shape, "column": (channels,) + (1,) * (out.ndim - 2),
                  "row": out.shape[:1] + (1,) * (out.ndim - 1)}
        for p, value in zip(self.params, args):
            where, dtype = f"{self.name}, {p.name}", p.dtype(out.dtype)
            if p.kind == "scalar":
                assert type(value) is dtype.type, \
                    f"{where}: expected a numpy.{dtype.name}, got {type(value).__name__}"
            elif p.kind == "raw":  # any shape: the body indexes it (C order)
                _check_array(where, value, dtype, value.shape)
            else:
                _check_array(where, value, dtype, shapes[p.kind])
        self.device.launches[self.name, out.dtype.name] += 1
        cuda_host.call(self.device.lib, cuda_host.elementwise_name(self.op, self.act, out.dtype),
                       out.size, channels, inner, *args)


class RawModule:
    """``cupy.RawModule`` over ``cuda.source()``, serving the row kernels."""

    def __init__(self, device, *, code, options, name_expressions):
        assert code == cuda.source(), "the module's code is not cuda.source()"
        self.device, self.names = device, set(name_expressions)

    def get_function(self, name: str) -> "RowKernel":
        assert name in self.names, f"{name!r} is not among the module's name_expressions"
        kernel, ctype = re.fullmatch(r"(\w+)<(\w+)>", name).groups()
        return RowKernel(self.device, kernel, ctype)


class RowKernel:
    """A ``__global__`` row kernel, called as ``cupy.RawKernel``: ``kernel(grid, block, args)``."""

    def __init__(self, device, kernel: str, ctype: str):
        self.device, self.name = device, f"{kernel}<{ctype}>"
        self.dtype = next(d for d, c in cuda_host.CTYPES.items() if c == ctype)
        self.params = device.kernels[kernel]
        self.function = getattr(device.lib, f"launch_{kernel}_{ctype}")
        self.function.argtypes = [ctypes.c_uint, ctypes.c_uint] + [
            ctypes.c_void_p if p.pointer else _SCALAR_CTYPES[ctype if p.type == "T" else p.type]
            for p in self.params]

    def __call__(self, grid, block, args):
        assert all(isinstance(t, tuple) for t in (grid, block, args)), \
            f"{self.name}: grid, block and args must be tuples"
        assert len(grid) == len(block) == 1, f"{self.name}: the kernel indexes rows by x only"
        rows = self._check(args)["B"]
        assert 0 < block[0] <= MAX_BLOCK, f"{self.name}: {block[0]} threads per block"
        assert grid[0] * block[0] >= rows, \
            f"{self.name}: {grid[0]} x {block[0]} threads for {rows} rows"
        self.device.launches[self.name] += 1
        self.function(grid[0], block[0], *(
            value.ctypes.data if isinstance(value, np.ndarray)
            else None if isinstance(value, np.uint64) else value.item() for value in args))

    def _check(self, args) -> dict[str, int]:
        """Check ``args`` against the kernel's parameters; returns the int arguments by name."""
        names = [p.name for p in self.params]
        assert len(args) == len(names), f"{self.name}{tuple(names)}: got {len(args)} arguments"
        numpy_types = {"T": self.dtype.type, "int": np.int32, "long long": np.int64}
        for p, value in zip(self.params, args):
            if not p.pointer:
                expected = numpy_types[p.type]
                assert type(value) is expected, f"{self.name}, {p.name}: expected a " \
                    f"numpy.{expected.__name__}, got {type(value).__name__}"
        sizes = {p.name: int(v) for p, v in zip(self.params, args)
                 if not p.pointer and p.type == "int"}
        arrays = {}
        for p, value in zip(self.params, args):
            if not p.pointer:
                continue
            where = f"{self.name}, {p.name}"
            if isinstance(value, np.uint64):
                assert value == NULL and p.name in NULLABLE, \
                    f"{where}: no null pointer (or raw address) allowed here"
                continue
            _check_array(where, value, numpy_types[p.type],
                         [sizes[unit] for unit in ROW_SHAPES[p.name]])
            arrays[p.name] = value
        for p in self.params:
            if p.restrict and p.name in arrays:
                _check_no_overlap(f"{self.name}, __restrict__ {p.name}", arrays[p.name],
                                  [a for name, a in arrays.items() if name != p.name])
        return sizes


# The dtypes CuPy has (cupy/_core/_dtype.pyx, all_type_chars): bool, the integers,
# float16/32/64, complex64/128. check_supported_dtype refuses every other.
CUPY_TYPE_CHARS = "?bhilqBHILQefdFD"


class DeviceArray:
    """``cupy.ndarray``'s place: no host array is one."""


def asarray(a, dtype=None):
    """``cupy.asarray``: CuPy's dtype check, then (here) the host array itself."""
    a = np.asarray(a, dtype=dtype)
    if a.dtype.char not in CUPY_TYPE_CHARS:
        raise ValueError(f"Unsupported dtype {a.dtype}")
    return a


def _op(where: str, trans: str, a):
    assert trans in ("N", "T"), f"{where}: transposition {trans!r} is not 'N' or 'T'"
    return a if trans == "N" else a.T


def _blas_scalar(x, dtype) -> float:
    """``x`` as cuBLAS receives it: cast to the arrays' dtype."""
    return float(dtype.type(x))


class Device:
    """The emulated GPU: the fake ``cupy`` module over the host build ``lib``, and the
    count of what was launched on it."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.kernels = row_kernels()
        self.launches = Counter()
        self.cupy = types.ModuleType("cupy")
        self.cupy.ElementwiseKernel = functools.partial(ElementwiseKernel, self)
        self.cupy.RawModule = functools.partial(RawModule, self)
        self.cupy.ndarray, self.cupy.asarray = DeviceArray, asarray
        self.cupy.cublas = types.ModuleType("cupy.cublas")
        self.cupy.cublas.gemm, self.cupy.cublas.gemv = self.gemm, self.gemv

    def gemm(self, transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
        """``out = alpha op(a) op(b) + beta out``, in place."""
        where = f"gemm {transa}{transb}"
        # CuPy's assertions, then the engine's promise: in place into C-ordered memory
        assert a.ndim == b.ndim == 2 and a.dtype == b.dtype, f"{where}: a {a.dtype}, b {b.dtype}"
        op_a, op_b = _op(where, transa, a), _op(where, transb, b)
        assert op_a.shape[1] == op_b.shape[0], f"{where}: op(a) {op_a.shape}, op(b) {op_b.shape}"
        assert out is not None, f"{where}: the engine writes into its own out"
        _check_array(f"{where}, out", out, a.dtype, (op_a.shape[0], op_b.shape[1]))
        _check_array(f"{where}, a", a, a.dtype, a.shape)
        _check_array(f"{where}, b", b, a.dtype, b.shape)
        _check_no_overlap(f"{where}, out", out, [a, b])
        self.launches["gemm", transa, transb, a.dtype.name] += 1
        result = _blas_scalar(alpha, a.dtype) * (op_a.astype(np.float64) @ op_b.astype(np.float64))
        if beta != 0:
            result += _blas_scalar(beta, a.dtype) * out.astype(np.float64)
        out[...] = result
        return out

    def gemv(self, transa, alpha, a, x, beta, y):
        """``y = alpha op(a) x + beta y``, in place."""
        where = f"gemv {transa}"
        assert a.ndim == 2 and x.ndim == y.ndim == 1, f"{where}: a {a.ndim}-D, x {x.ndim}-D"
        op_a = _op(where, transa, a)
        _check_array(f"{where}, a", a, a.dtype, a.shape)
        _check_array(f"{where}, x", x, a.dtype, op_a.shape[1:])  # CuPy passes incx = 1
        _check_array(f"{where}, y", y, a.dtype, op_a.shape[:1])
        _check_no_overlap(f"{where}, y", y, [a, x])
        self.launches["gemv", transa, a.dtype.name] += 1
        result = _blas_scalar(alpha, a.dtype) * (op_a.astype(np.float64) @ x.astype(np.float64))
        if beta != 0:
            result += _blas_scalar(beta, a.dtype) * y.astype(np.float64)
        y[...] = result


@contextlib.contextmanager
def cupy_path(lib: ctypes.CDLL):
    """Within: ``gpu_mlp.ops`` takes its CuPy branches and ``import cupy`` gives the
    emulation over ``lib`` (see :func:`build`). Yields the :class:`Device`. Kernels that
    ``gpu_mlp`` cached are dropped on entry and on exit, so none crosses the boundary."""
    device = Device(lib)
    caches = (ops._kernel, cuda.elementwise, cuda._row_module, cuda._row_function)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "is_numpy", lambda a: False)
        mp.setitem(sys.modules, "cupy", device.cupy)
        mp.setitem(sys.modules, "cupy.cublas", device.cupy.cublas)
        for cache in caches:
            cache.cache_clear()
        try:
            yield device
        finally:
            for cache in caches:
                cache.cache_clear()
