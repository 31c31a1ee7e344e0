"""Every kernel gpu_mlp hands CuPy, compiled by NVRTC exactly as CuPy would, without a GPU.

CuPy compiles at run time, so a kernel that NVRTC rejects -- or one that a float32
network would run in double precision -- shows only on a GPU. Here CuPy's own code
runs the way to NVRTC, with nothing of a device in it:

* ``ElementwiseKernel``: gpu_mlp's own kernel objects (``ops._kernel``, one per
  ``ops.ELEMENTWISE`` entry and activation). The argument records CuPy makes at launch
  (``cupy._core._kernel._ArgInfo``: array or scalar, dtype, ndim, contiguity, 32-bit
  indexing) are built here by a line-for-line port of what CuPy 14.2 does at launch
  -- broadcast, typing, dimension reduction (:func:`cupy_launch`) -- for the arrays
  the engine passes: Dense (B, d) and Conv2d NCHW (B, c, H, W) outputs with their
  biases ((d,), and (c, 1, 1) from ``bias_view``), the per-row columns of the losses,
  and the image and column matrices of im2col/col2im (:func:`launches`, checked
  against the launches the engine itself makes by
  ``test_the_model_holds_every_launch_the_engine_makes``); from them CuPy's code
  generator ``_get_elementwise_kernel_code`` writes the source and
  ``cupy._core.core.compile_with_cache`` compiles it, as ``_get_elementwise_kernel``
  does: CuPy's headers prepended, CuPy's include paths and ``--std=c++17``, then
  ``-ftz=true``, ``-arch=sm_XX`` and ``--device-as-default-execution-space`` added by
  ``cupy.cuda.compiler``.
* ``RawModule``: ``gpu_mlp.cuda._row_module()`` itself, through ``RawModule.compile``
  -- its code, options and name expressions.

Only the device is taken out: ``compiler._get_arch`` answers the architecture under
test, ``_get_arch_for_options_for_nvrtc`` and ``raw._get_raw_module`` run without their
per-device memo (which asks the driver for the current device), the kernel cache stays
in memory (``CUPY_CACHE_IN_MEMORY``), and loading the binary into a ``Module`` (a driver
call) only keeps it. NVRTC's log must be empty (no error, no warning) and the PTX of a
float32 kernel must hold no double-precision instruction.

Needs CuPy, libnvrtc (the ``nvidia-cuda-nvrtc`` wheel, or the CUDA toolkit) and the
CUDA runtime headers CuPy passes with ``-I`` (the ``nvidia-cuda-runtime`` wheel, or the
toolkit); skipped otherwise.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import math
import os
import re
import threading
import types

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="needs CuPy")

import cuda_host  # noqa: E402
from gpu_mlp import MEMORY_MODES, conv, cuda, ops  # noqa: E402
from gpu_mlp.layers import Conv2d, Dense, Layer  # noqa: E402

ARCHS = ("80", "90")  # A100, H100
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# a double-precision instruction, operand type or register in PTX
_DOUBLE = re.compile(r"\.f64\b|%fd\d")
# The one kernel that computes in double in its float32 build too, by design: DP's noise
# draws each normal in double from IEEE basic operations alone and rounds it once to
# float, so that the CPU's NumPy twin draws the very same bits (kernels/noise.cuh); one
# double pass per step. Its PTX must instead hold no fused multiply-add (a contraction
# would round otherwise than NumPy): test_the_noise_kernel_rounds_as_numpy.
DOUBLE_BY_DESIGN = {"gpu_mlp_gaussian_noise"}
# a fused multiply-add in PTX (fma, or mad on floats)
_FUSED = re.compile(r"^\s*(?:fma|mad)\.\S*f(?:32|64)\b", re.MULTILINE)


# --- the launches the engine makes, and what CuPy makes of them ---------------------------

@dataclasses.dataclass(frozen=True)
class Geometry:
    """A layer of the engine and the batch it runs: what shapes the arrays of its
    launches -- its output (B, *output_shape), its bias as ``layer.bias_view`` gives it,
    its input (B, *input_shape) and the rows of that input."""

    layer: Layer
    input_shape: tuple  # of one sample
    batch: int

    @property
    def output_shape(self) -> tuple:
        return (self.batch, *self.layer.output_shape(self.input_shape))


# The launches CuPy compiles differently. Dense outputs (B, d) with the bias (d,): the
# usual one; a single sample, where the broadcast bias is contiguous and the arrays
# collapse to 1-D; arrays over 2 GiB but of fewer than 2^31 elements, whose pointers
# CuPy offsets with 64 bits but indexes with 32; arrays over 2^31 elements, all 64-bit.
# Conv2d outputs (B, c, H, W) with the bias (c, 1, 1): the usual one, which CuPy reduces
# to 3-D (B, c, H*W); one sample, reduced to 2-D (c, H*W) as a Dense batch; one channel,
# reduced to 1-D with the bias still strided; a 1 x 1 output, 2-D (B, c); im2col
# columns over 2^31 elements from an image under 2 GiB; images over 2 GiB; everything
# over 2^31 elements.
# An op's first layout here is compiled for every architecture and dtype; the others
# change CuPy's indexing, not the element type, and are compiled for one (compile_plan).
LAYOUTS = {
    "typical": Geometry(Dense(64, 64), (64,), 64),
    "one-row": Geometry(Dense(64, 64), (64,), 1),
    "large": Geometry(Dense(1 << 10, 1 << 10), (1 << 10,), 1 << 20),
    "huge": Geometry(Dense(1 << 10, 1 << 10), (1 << 10,), 1 << 22),
    "conv": Geometry(Conv2d(3, 8, 3, padding=1), (3, 12, 10), 4),
    "conv-one-sample": Geometry(Conv2d(3, 8, 3, padding=1), (3, 12, 10), 1),
    "conv-one-channel": Geometry(Conv2d(3, 1, 3, stride=2), (3, 12, 10), 4),
    "conv-1x1": Geometry(Conv2d(3, 8, (12, 10)), (3, 12, 10), 4),
    "conv-huge-columns": Geometry(Conv2d(64, 64, 3, padding=1), (64, 64, 64), 1 << 10),
    "conv-large": Geometry(Conv2d(64, 64, 3, padding=1), (64, 64, 64), 1 << 12),
    "conv-huge": Geometry(Conv2d(64, 64, 3, padding=1), (64, 128, 128), 1 << 12),
}


@dataclasses.dataclass(frozen=True)
class Array:
    """What CuPy's launch reads of a ``cupy.ndarray`` (cupy/_core/core.pyx 14.2): shape,
    strides in bytes, dtype, and the flags ``_c_contiguous`` and ``_index_32_bits``."""

    shape: tuple
    strides: tuple
    dtype: np.dtype
    c_contiguous: bool
    index_32_bits: bool

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @classmethod
    def empty(cls, shape, dtype) -> "Array":
        """A new C-ordered array (``ndarray.__init__``/``_init_fast``: contiguous,
        ``_index_32_bits`` = its bytes <= 2^31)."""
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        return cls(shape, _c_strides(shape, dtype.itemsize), dtype, True,
                   math.prod(shape) * dtype.itemsize <= 1 << 31)

    @classmethod
    def of(cls, a: np.ndarray) -> "Array":
        """The CuPy array that the engine would hold where it holds the NumPy array ``a``:
        a view keeps the ``_index_32_bits`` of the array it views (``_view``)."""
        owner = a
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        return cls(a.shape, a.strides, a.dtype,
                   a.size == 0 or get_c_contiguity(a.shape, a.strides, a.itemsize),
                   owner.nbytes <= 1 << 31)

    def reshape(self, *shape) -> "Array":
        """``_reshape`` of a C-contiguous array: a ``_view`` with its flags kept."""
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if -1 in shape:
            known = math.prod(n for n in shape if n != -1)
            shape = tuple(self.size // known if n == -1 else n for n in shape)
        assert self.c_contiguous and math.prod(shape) == self.size, (self, shape)
        return dataclasses.replace(self, shape=tuple(shape),
                                   strides=_c_strides(shape, self.itemsize))

    def view(self, shape, strides, update_c_contiguity: bool) -> "Array":
        """``ndarray._view``: the flags kept, C-contiguity recomputed if asked."""
        shape, strides = tuple(shape), tuple(strides)
        c_contiguous = self.c_contiguous
        if update_c_contiguity:  # _update_c_contiguity
            c_contiguous = math.prod(shape) == 0 or get_c_contiguity(shape, strides,
                                                                   self.itemsize)
        return dataclasses.replace(self, shape=shape, strides=strides,
                                   c_contiguous=c_contiguous)


@dataclasses.dataclass
class Scalar:
    """A ``_scalar.CScalar``: a Python or NumPy scalar argument, typed at the launch."""

    dtype: np.dtype


def _c_strides(shape, itemsize) -> tuple:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def get_c_contiguity(shape, strides, itemsize) -> bool:
    """cupy/_core/internal.pyx 14.2, ``get_c_contiguity`` (lines 159-177)."""
    ndim = len(strides)
    if ndim == 0 or (ndim == 1 and strides[0] == itemsize):
        return True
    prev, index, st = -1, 0, 0
    for i in range(ndim):
        sh = shape[i]
        if sh == 0:
            return True
        if sh == 1:
            continue
        st = strides[i]
        if prev == -1 or strides[prev] != sh * st:
            index += 1
        prev = i
    return index == 0 or (index == 1 and st == itemsize)


def _broadcast_core(arrays: list) -> tuple:
    """cupy/_core/internal.pyx 14.2, ``_broadcast_core`` (lines 320-376): the broadcast
    shape; the arrays in ``arrays`` (None elsewhere) replaced by broadcast views."""
    index = [i for i, a in enumerate(arrays) if isinstance(a, Array)]
    if not index:
        return ()
    nd = max(arrays[i].ndim for i in index)
    shape = []
    for i in range(nd):
        s = 1
        for j in index:
            a = arrays[j]
            if i < nd - a.ndim:
                continue
            a_sh = a.shape[i - (nd - a.ndim)]
            if a_sh == s or a_sh == 1:
                continue
            if s == 1:
                s = a_sh
                continue
            raise ValueError(f"operands could not be broadcast together: "
                             f"{[a.shape for a in arrays if a is not None]}")
        shape.append(s)
    shape = tuple(shape)
    for i in index:
        a = arrays[i]
        if a.shape == shape:
            continue
        strides = [0] * nd
        for j in range(a.ndim):
            if a.shape[j] == shape[j + nd - a.ndim]:
                strides[j + nd - a.ndim] = a.strides[j]
        a = a.view(shape, strides, update_c_contiguity=True)
        if a.size * a.itemsize > 1 << 31:
            a = dataclasses.replace(a, index_32_bits=False)
        arrays[i] = a
    return shape


def _reduce_dims(args: list, params, shape: tuple) -> tuple:
    """cupy/_core/_kernel.pyx 14.2, ``_reduce_dims`` and ``_reduced_view_core`` (lines
    360-461): merge the axes every array can merge; the arrays in ``args`` replaced by
    the reduced views (``_view`` with C-contiguity kept, not recomputed)."""
    if len(shape) <= 1 or not args:
        return shape
    assert len(args) > 1, "the one-argument fast path is not modelled"  # never: >= 2 params
    ndim = len(shape)
    array_indexes, strides_indexes = [], []
    for i, a in enumerate(args):
        if params[i].raw or not isinstance(a, Array):
            continue
        array_indexes.append(i)
        if not a.c_contiguous:
            if ndim == 2:  # short cut
                return shape
            strides_indexes.append(i)
    if not array_indexes:
        return shape
    if not strides_indexes:  # all C-contiguous: one flat axis
        total = args[array_indexes[0]].size
        for i in array_indexes:
            args[i] = args[i].view((total,), (args[i].itemsize,), update_c_contiguity=False)
        return (total,)
    vecshape, axes, last_ax = list(shape), [], -1
    for ax in range(ndim):
        if vecshape[ax] == 1:
            continue
        if last_ax < 0:
            last_ax = ax
            continue
        if any(args[i].strides[ax] * vecshape[ax] != args[i].strides[last_ax]
               for i in strides_indexes):
            axes.append(last_ax)
        else:
            vecshape[ax] *= vecshape[last_ax]
        last_ax = ax
    if last_ax >= 0:
        axes.append(last_ax)
    if len(axes) == ndim:
        return shape
    newshape = tuple(vecshape[ax] for ax in axes)
    for i in array_indexes:
        args[i] = args[i].view(newshape, [args[i].strides[ax] for ax in axes],
                               update_c_contiguity=False)
    return newshape


def cupy_launch(kernel, args) -> tuple:
    """``(arginfos, type_map)``: what ``ElementwiseKernel.__call__`` (cupy/_core/
    _kernel.pyx 14.2, lines 832-933) computes for a launch with ``args``, inputs then
    outputs, each an :class:`Array` or a :class:`Scalar`: ``_broadcast`` over the
    non-raw arrays, outputs included, keeping the broadcast inputs; the types by
    ``_decide_params_type``; each scalar typed as its parameter (``CScalar.apply_dtype``);
    ``_reduce_dims``; the ``Indexer`` of the reduced shape; ``_ArgInfo.from_*``."""
    from cupy._core import _carray, _kernel, _scalar

    params = kernel.params[:kernel.nargs]  # the last one is CuPy's CIndexer _ind
    assert len(args) == kernel.nargs, (kernel.name, args)
    value = [a if isinstance(a, Array) and not p.raw else None for a, p in zip(args, params)]
    shape = _broadcast_core(value)
    args = [v if v is not None else a for v, a in zip(value, args)]
    in_args, out_args = args[:kernel.nin], list(args[kernel.nin:])  # outputs not broadcast
    in_types, _, type_map = kernel._decide_params_type(
        tuple(a.dtype if isinstance(a, Array) else None for a in in_args),
        tuple(a.dtype for a in out_args))
    for p, a in zip(params[kernel.nin:], out_args):  # _get_out_args_with_params
        assert p.raw or a.shape == shape, f"{kernel.name}: out shape {a.shape} != {shape}"
    assert 0 not in shape, "a launch over nothing is not made"
    in_args = [Scalar(np.dtype(t)) if isinstance(a, Scalar) else a
               for a, t in zip(in_args, in_types)]
    inout = in_args + out_args
    shape = _reduce_dims(inout, params, shape)
    size = math.prod(shape)
    records = []
    for a in inout:
        if isinstance(a, Scalar):
            records.append(_kernel._ArgInfo(3, _scalar.CScalar, a.dtype, 0, True, True))
        else:
            records.append(_kernel._ArgInfo(1, cupy.ndarray, a.dtype, a.ndim,
                                            a.c_contiguous, a.index_32_bits))
    records.append(_kernel._ArgInfo(2, _carray.Indexer, None, len(shape), True,
                                    size <= 1 << 31))
    return tuple(records), type_map


class _Buffers:
    """A workspace handing out new arrays (``Workspace.take``'s contract)."""

    def __init__(self, dtype, empty):
        self.dtype, self.empty = dtype, empty

    def take(self, shape, dtype=None):
        return self.empty(shape, dtype or self.dtype)

    def give(self, *buffers):
        pass


@contextlib.contextmanager
def _recorded_launches():
    """Within: ``gpu_mlp.ops`` records each elementwise launch as ``(op, act, args)``
    instead of making it, and its BLAS calls do nothing."""
    launched = []
    saved = ops._launch, ops.gemm, ops.gemv
    ops._launch = lambda op, act, *args: launched.append((op, act, list(args)))
    ops.gemm = ops.gemv = lambda *args, **kwargs: None
    try:
        yield launched
    finally:
        ops._launch, ops.gemm, ops.gemv = saved


def _engine_arg(a):
    """A launch argument the engine passed, as CuPy's launch sees it."""
    if isinstance(a, Array):
        return a
    if isinstance(a, np.ndarray):
        return Array.of(a)
    if isinstance(a, cupy.ndarray):  # CuPy's own flags
        return Array(a.shape, a.strides, a.dtype, a._c_contiguous, a._index_32_bits)
    return Scalar(np.asarray(a).dtype)  # CScalar: a NumPy scalar keeps its type


@functools.cache
def _no_memory():
    """Device memory that is never touched: CuPy arrays over it need no device."""
    from cupy.cuda import memory

    return memory.MemoryPointer(memory.UnownedMemory(1 << 20, 1 << 50, None, device_id=0), 0)


def cupy_empty(shape, dtype):
    """A real ``cupy.ndarray`` made as ``cupy.empty`` makes one, over :func:`_no_memory`."""
    return cupy.ndarray(tuple(shape), dtype=dtype, memptr=_no_memory())


def launches(op: str, dtype, layout: str, empty=Array.empty) -> list[list]:
    """The arguments (:class:`Array`, :class:`Scalar`) of each launch of the
    ``ops.ELEMENTWISE`` kernel ``op`` that ``layout``'s layer makes; [] if none.
    ``empty(shape, dtype)`` makes the new arrays (:func:`cupy_empty`: real CuPy ones).

    Which kernels a layer launches, and with what, comes from gpu_mlp's tables: the
    convolution kernels (``conv.ELEMENTWISE``) are what a Conv2d's own ``rows`` and
    ``input_grad`` launch, called here on its arrays; the activation kernels (the rows of
    ``cuda_host.OP_CALLS``) run on every layer's output, each parameter shaped by
    ``ops.param_layout`` -- ``bias`` as the layer's ``bias_view`` gives it; the rest
    (losses, wide softmax) on the (B, d) output of a Dense layer, the per-row columns
    (B, 1), and their outputs also (B, 1) when every input is a column or a scalar, as
    nothing in the signature then tells which.
    """
    geometry, dtype = LAYOUTS[layout], np.dtype(dtype)
    layer, B = geometry.layer, geometry.batch
    is_conv = isinstance(layer, Conv2d)
    if op in conv.ELEMENTWISE:
        if not is_conv:
            return []
        x = empty((B, *geometry.input_shape), dtype)
        T_rows = empty((B * layer.positions(geometry.input_shape), layer.c_out), dtype)
        ws = _Buffers(dtype, empty)
        with _recorded_launches() as launched:
            layer.give_rows(layer.rows(x, ws), ws)                           # im2col
            layer.input_grad(T_rows, empty(layer.weight_shape, dtype), ws, x)  # col2im
        return [[_engine_arg(a) for a in args] for name, _, args in launched if name == op]
    if is_conv and op not in cuda_host.OP_CALLS:
        return []
    signature = cuda_host.elementwise_signature(op)
    out_shape = geometry.output_shape
    bias = _engine_arg(layer.bias_view(empty(layer.bias_shape, dtype)))
    broadcast = {p.kind for p in signature if not p.output and p.kind not in ("scalar", "raw")}
    out_shapes = [out_shape] + ([(B, 1)] if broadcast == {"row"} else [])
    result = []
    for shape in out_shapes:
        args = []
        for p in signature:
            assert not (is_conv and p.kind in ("row", "raw")), f"{op}: {p.name} on NCHW"
            t = p.dtype(dtype)
            args.append(Scalar(t) if p.kind == "scalar" else
                        empty(shape, t) if p.output else
                        bias if p.kind == "column" else
                        empty((B, 1), t) if p.kind == "row" else
                        empty(out_shape, t))  # "full", and "raw": the output's like
        args = [_engine_arg(a) for a in args]
        result.append(args)
    return result


def launch_records(kernel, op: str, dtype, layout: str) -> list[tuple]:
    """``[(arginfos, type_map)]`` of ``op``'s launches on ``layout`` (see :func:`launches`
    and :func:`cupy_launch`)."""
    return [cupy_launch(kernel, args) for args in launches(op, dtype, layout)]


@functools.cache
def layouts_of(op: str) -> tuple[str, ...]:
    """The layouts on which the engine launches ``op``, in LAYOUTS' order."""
    return tuple(layout for layout in LAYOUTS if launches(op, DTYPES[0], layout))


def compile_plan(arch: str, dtype) -> list[tuple]:
    """``[(op, activation or None, layout, n, (arginfos, type_map))]``: the launches to
    compile for ``arch`` and ``dtype``, the n-th of ``launches(op, dtype, layout)``.

    Every kernel (each op with each activation) in its op's first layout, everywhere.
    For sm_90 float32 also each other launch record of each op -- the other layouts
    change CuPy's indexing (the ``CArray``/``CIndexer`` types), not the body, which
    differs between an op's kernels only by the activation it calls -- given to the
    op's activations in turn, so each indexing is compiled once per op and each
    activation's body with several of them.
    """
    plan = []
    for op in dict.fromkeys(op for op, _ in ELEMENTWISE_PAIRS):
        acts = [act for o, act in ELEMENTWISE_PAIRS if o == op]
        kernel = ops._kernel(op, acts[0] or "")  # the records do not depend on the act
        layouts = layouts_of(op)
        assert layouts, f"{op}: no layout of LAYOUTS launches it"
        first = launch_records(kernel, op, dtype, layouts[0])
        plan += [(op, act, layouts[0], n, record) for act in acts
                 for n, record in enumerate(first)]
        if (arch, np.dtype(dtype)) != ("90", np.float32):
            continue
        seen, turn = set(first), 0
        for layout in layouts[1:]:
            for n, record in enumerate(launch_records(kernel, op, dtype, layout)):
                if record not in seen:
                    seen.add(record)
                    act = acts[-1 - turn % len(acts)]  # the last activations first
                    plan.append((op, act, layout, n, record))
                    turn += 1
    return plan


def elementwise_code(kernel, arginfos, type_map) -> str:
    """The CUDA source CuPy generates for a launch (before CuPy's headers are prepended),
    as ``ElementwiseKernel._get_elementwise_kernel`` does."""
    from cupy._core import _kernel

    return _kernel._get_elementwise_kernel_code(
        arginfos, type_map, kernel.params, kernel.operation, kernel.name, kernel.preamble,
        **kernel.kwargs)


def elementwise_sources(kernel, op: str, dtype, layout: str) -> list[str]:
    """The CUDA sources of ``op``'s launches on ``layout``."""
    return [elementwise_code(kernel, arginfos, type_map)
            for arginfos, type_map in launch_records(kernel, op, dtype, layout)]



# --- NVRTC through CuPy, without a device ------------------------------------------------

@dataclasses.dataclass
class Compiled:
    source: str      # what NVRTC was given
    options: tuple   # with what options
    log: str         # NVRTC's program log
    ptx: str
    binary: bytes    # the cubin CuPy would load (-arch=sm_XX)
    mapping: dict | None  # name expression -> lowered name (RawModule)


class NVRTC:
    """CuPy's compile path with the device taken out (see the module's docstring)."""

    def __init__(self, monkeypatch):
        from cupy._core import raw
        from cupy.cuda import compiler, function

        self._local = threading.local()
        local = self._local
        nvrtc = cupy.cuda.nvrtc

        class RecordingProgram(compiler._NVRTCProgram):
            def compile(self, options=(), log_stream=None):
                binary, mapping = super().compile(options, log_stream)
                if self.src:  # not CuPy's empty-file probe of the compiler version
                    local.compiled = Compiled(self.src, tuple(options),
                                              nvrtc.getProgramLog(self.ptr).strip("\0 \n"),
                                              nvrtc.getPTX(self.ptr).decode().rstrip("\0"),
                                              binary, mapping)
                return binary, mapping

        class KeptModule(function.Module):
            def load(self, cubin):  # cuModuleLoadData needs a driver
                self.cubin = cubin

        monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
        monkeypatch.setattr(compiler, "_get_arch", lambda: local.arch)
        monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                            compiler._get_arch_for_options_for_nvrtc.__wrapped__)
        monkeypatch.setattr(compiler, "_NVRTCProgram", RecordingProgram)
        monkeypatch.setattr(compiler, "function",
                            types.SimpleNamespace(Module=KeptModule,
                                                  LinkState=function.LinkState))
        monkeypatch.setattr(raw, "_get_raw_module", raw._get_raw_module.__wrapped__)

    def _run(self, arch, compile_):
        self._local.arch, self._local.compiled = arch, None
        compile_()
        return self._local.compiled

    def elementwise_code(self, code: str, kernel, arch: str) -> Compiled:
        """Compile generated code as ``_get_elementwise_kernel`` does; raises
        ``cupy.cuda.compiler.CompileException`` with NVRTC's log if it does not compile."""
        from cupy._core import core

        options = kernel.kwargs.get("options", ())
        return self._run(arch, lambda: core.compile_with_cache(code, options))

    def elementwise(self, kernel, op: str, dtype, arch: str, layout: str = "typical") -> Compiled:
        """Compile the first launch of ``kernel``, made for ``op``, in ``layout``."""
        return self.elementwise_code(elementwise_sources(kernel, op, dtype, layout)[0], kernel,
                                     arch)

    def module(self, raw_module, arch: str) -> Compiled:
        """Compile a ``cupy.RawModule`` through ``RawModule.compile``."""
        log = io.StringIO()
        return self._run(arch, lambda: raw_module.compile(log_stream=log))


def _missing_piece() -> str | None:
    """Why NVRTC cannot be driven here, or None."""
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as e:  # libnvrtc not found
        return (f"needs libnvrtc (pip install nvidia-cuda-nvrtc, or the CUDA toolkit): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    try:
        from cupy._core import core

        core.assemble_cupy_compiler_options(())
    except RuntimeError as e:  # no cuda_runtime.h for CuPy's -I
        return f"needs the CUDA runtime headers (pip install nvidia-cuda-runtime): {e}"
    return None


@pytest.fixture(scope="module")
def nvrtc():
    missing = _missing_piece()
    if missing:
        pytest.skip(missing)
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield NVRTC(monkeypatch)


_PTX_FUNCTION = re.compile(
    r"^(?:\.visible\s+|\.weak\s+)*\.(?:entry|func)\s+(?:\([^)]*\)\s*)?(\w+)\s*\(", re.MULTILINE)
_PTX_CALL = re.compile(r"\bcall(?:\.uni)?\s+(?:\([^)]*\),\s*)?(\w+)")


def ptx_code(ptx: str, entry: str) -> str:
    """The PTX of ``entry`` and of every ``.func`` it calls, directly or not."""
    bodies = {}
    for match in _PTX_FUNCTION.finditer(ptx):
        end = ptx.find("\n}", match.end())
        bodies[match.group(1)] = ptx[match.start():end + 2]
    assert entry in bodies, f"{entry} is not in the PTX"
    todo, seen = [entry], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in bodies:
            continue
        seen.add(name)
        todo += _PTX_CALL.findall(bodies[name])
    return "\n".join(bodies[name] for name in sorted(seen))


def problems(compiled: Compiled, entry: str, dtype) -> list[str]:
    """What is wrong with a compiled kernel: a log (warnings), a missing entry, double
    precision in a float32 kernel."""
    found = []
    if compiled.log:
        found.append(f"NVRTC says:\n{compiled.log}")
    if not compiled.binary:
        found.append("no binary")
    if not re.search(rf"\.entry\s+{re.escape(entry)}\s*\(", compiled.ptx):
        found.append(f"no entry {entry} in the PTX")
    elif dtype == np.float32 and entry not in DOUBLE_BY_DESIGN:
        doubles = [line.strip() for line in ptx_code(compiled.ptx, entry).splitlines()
                   if _DOUBLE.search(line)]
        if doubles:
            found.append("double precision in a float32 kernel:\n  " + "\n  ".join(doubles[:8]))
    return found


def _parallel(jobs):
    """Run ``(label, thunk)`` jobs on every core (NVRTC releases the GIL); returns
    ``{label: result or exception}``."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {label: pool.submit(thunk) for label, thunk in jobs}
    results = {}
    for label, future in futures.items():
        try:
            results[label] = future.result()
        except Exception as e:  # a CompileException carries NVRTC's log
            results[label] = e
    return results


# --- the tests ------------------------------------------------------------------------------

ELEMENTWISE_PAIRS = cuda_host.elementwise_pairs()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_every_elementwise_kernel_compiles(nvrtc, arch, dtype):
    jobs = []
    for op, act, layout, n, (arginfos, type_map) in compile_plan(arch, dtype):
        kernel = ops._kernel(op, act or "")
        code = elementwise_code(kernel, arginfos, type_map)
        jobs.append(((kernel.name, f"{layout}{f', launch {n + 1}' if n else ''}"),
                     lambda c=code, k=kernel: nvrtc.elementwise_code(c, k, arch)))
    assert {name for (name, _), _ in jobs} == {ops._kernel(op, act or "").name
                                               for op, act in ELEMENTWISE_PAIRS}
    failures = []
    for (name, layout), result in _parallel(jobs).items():
        found = ([f"does not compile:\n{result}"] if isinstance(result, Exception) else
                 problems(result, name, dtype))
        failures += [f"{name} ({layout}, sm_{arch}, {dtype.name}): {f}" for f in found]
    assert not failures, "\n".join(failures)


# --- the model against the launches the engine makes ----------------------------------------

# Small networks whose launches take every path of the model but its big arrays: Conv2d
# layers of many channels, of one channel and of a 1 x 1 output, a Conv2d last, Dense
# layers after them, and outputs wider than ops.ROW_KERNEL_MAX; per net: (layers, input
# shape of one sample, loss, soft targets).
ENGINE_NETS = {
    "conv-one-channel-xent": ([Conv2d(2, 4, 3, padding=1, activation="relu"),
                               Conv2d(4, 1, 3, stride=2, activation="tanh"),
                               Dense(9, 40, activation="identity")],
                              (2, 8, 8), "softmax_cross_entropy", False),
    "conv-1x1-softmax": ([Conv2d(3, 5, (6, 5), activation="sigmoid"),
                          Dense(5, 36, activation="softmax")], (3, 6, 5), "squared", False),
    "conv-last-gelu": ([Conv2d(2, 3, 2, activation="gelu"),
                        Conv2d(3, 2, 2, activation="identity")], (2, 5, 4), "logistic", False),
    "dense-xent-targets": ([Dense(6, 7, activation="tanh"), Dense(7, 40, activation="identity")],
                           (6,), "softmax_cross_entropy", True),
}


def engine_launches(monkeypatch, name, memory, dtype) -> list[tuple]:
    """``[(op, activation name or "", args)]``: every elementwise launch the engine's CuPy
    path makes for ``ENGINE_NETS[name]`` in a train step on a batch and on one sample,
    ``loss_and_gradients``, ``predict`` on a batch and on one sample and
    ``per_sample_grad_norms``. It runs on the CPU: ``ops`` takes its CuPy branches on the
    net's NumPy arrays and records its launches instead of making them (the numbers are
    garbage, the shapes and the buffers the engine's own)."""
    from gpu_mlp import Network

    layers, input_shape, loss, soft = ENGINE_NETS[name]
    if memory == "output" and any(not layer.activation.has_grad_from_output
                                  for layer in layers):
        return []
    rng = np.random.default_rng(0)
    net = Network(layers, loss=loss, memory=memory, device="cpu", dtype=dtype, seed=0)
    B, d = 5, math.prod(net.inputs.shapes(input_shape)[-1][1])
    X = rng.standard_normal((B, *input_shape)).astype(dtype)
    Y = (rng.dirichlet(np.ones(d), B).astype(dtype) if soft else rng.integers(0, d, B)
         if loss == "softmax_cross_entropy" else
         np.where(rng.random((B, d)) < 0.5, -1.0, 1.0).astype(dtype) if loss == "logistic"
         else rng.standard_normal((B, d)).astype(dtype))
    with monkeypatch.context() as mp, np.errstate(all="ignore"), \
            _recorded_launches() as launched:
        mp.setattr(ops, "is_numpy", lambda a: False)
        mp.setattr(ops, "_launch_rows", lambda *args: None)
        net.train_step(X, Y, lr=0.1)
        net.train_step(X[:1], Y[:1], lr=0.1)
        net.loss_and_gradients(X, Y)
        net.predict(X)
        net.predict(X[0])
        net.per_sample_grad_norms(X, Y)
    return [(op, act.name if act is not None else "", args) for op, act, args in launched]


def test_the_model_holds_every_launch_the_engine_makes(monkeypatch):
    """Each launch the engine makes, run through :func:`cupy_launch`, is one that
    :func:`launches` models (and so one the compile test compiles: sm_90 float32 takes
    every layout); and each modelled launch of the activation and convolution kernels
    on arrays under 2 GiB is one the engine makes, so the model holds no launch of its
    own invention there."""
    layer_ops = set(cuda_host.OP_CALLS) | set(conv.ELEMENTWISE)
    missing, made = [], set()
    for dtype in DTYPES:
        modelled = {}
        for name in ENGINE_NETS:
            for memory in MEMORY_MODES:
                for op, act, args in engine_launches(monkeypatch, name, memory, dtype):
                    kernel = ops._kernel(op, act)
                    record = cupy_launch(kernel, [_engine_arg(a) for a in args])
                    made.add((op, dtype, record))
                    if (op, act) not in modelled:
                        modelled[op, act] = {r for layout in layouts_of(op)
                                             for r in launch_records(kernel, op, dtype, layout)}
                    if record not in modelled[op, act]:
                        missing.append(f"{kernel.name} ({name}, {memory}, {dtype.name}): "
                                       f"{describe(record[0])}")
    assert not missing, "launches the model does not hold:\n" + "\n".join(missing)
    invented = [f"{op} ({layout}, {dtype.name}): {describe(record[0])}"
                for op in sorted(layer_ops) for layout in layouts_of(op) for dtype in DTYPES
                for record in launch_records(ops._kernel(op, _some_activation(op)), op, dtype,
                                             layout)
                if all(a.index_32_bits for a in record[0])  # no array over 2 GiB
                and not any(m[0] == op and m[1] == dtype and m[2][0] == record[0]
                            for m in made)]
    assert not invented, "modelled launches the engine never makes:\n" + "\n".join(invented)


def test_the_model_makes_and_broadcasts_arrays_as_cupy_does():
    """The arrays of every modelled launch, made again as real CuPy arrays (over memory
    never touched: no device needed) by the engine's own code (``bias_view``, a Conv2d's
    ``rows`` and ``input_grad``), carry the shapes, strides and flags the model gives
    them, and CuPy's own ``_broadcast_core`` (through ``cupy.broadcast``) broadcasts them
    as :func:`_broadcast_core` does; its C-contiguity is ``get_c_contiguity``'s."""
    from cupy._core import internal

    checked = 0
    for op in dict.fromkeys(op for op, _ in ELEMENTWISE_PAIRS):
        params = ops._kernel(op, _some_activation(op)).params
        for layout in layouts_of(op):
            for model, real in zip(launches(op, DTYPES[0], layout),
                                   launches(op, DTYPES[0], layout, empty=cupy_empty),
                                   strict=True):
                assert model == real, f"{op} ({layout}): the arrays differ from CuPy's"
                value = [a if isinstance(a, Array) and not p.raw else None
                         for a, p in zip(model, params)]
                broadcast = cupy.broadcast(*[cupy_like(v) for v in value if v is not None])
                shape = _broadcast_core(value)
                assert broadcast.shape == shape, f"{op} ({layout})"
                for v in broadcast.values:
                    assert internal.get_c_contiguity(v.shape, v.strides, v.itemsize) == \
                        get_c_contiguity(v.shape, v.strides, v.itemsize)
                ported = [v for v in value if v is not None]
                assert [_engine_arg(v) for v in broadcast.values] == ported, \
                    f"{op} ({layout}): broadcast unlike CuPy's"
                checked += 1
    assert checked > len(LAYOUTS)


def cupy_like(a: Array):
    """A real CuPy array with the shape, strides and flags of ``a`` (a new array, or
    ``bias_view``'s reshaped one)."""
    real = cupy.ndarray(a.shape, dtype=a.dtype, memptr=_no_memory(), strides=a.strides)
    assert _engine_arg(real) == a, (a, _engine_arg(real))
    return real


def describe(arginfos) -> str:
    """Launch records in brief: per argument its dtype, ndim, and the C-contiguity and
    32-bit indexing flags where they are not true."""
    return ", ".join(
        f"{'indexer' if a.dtype is None else np.dtype(a.dtype).name}/{a.ndim}"
        f"{'' if a.c_contiguous else ' strided'}{'' if a.index_32_bits else ' 64-bit'}"
        for a in arginfos)


def _some_activation(op: str) -> str:
    return next(act or "" for o, act in ELEMENTWISE_PAIRS if o == op)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_row_module_compiles(nvrtc, arch):
    module = cuda._row_module()
    expected = {f"{kernel}<{ctype}>" for kernel in cuda.ROW_KERNELS for ctype in CTYPES.values()}
    assert set(module.name_expressions) == expected
    compiled = nvrtc.module(module, arch)
    assert compiled.source == cuda.source()  # RawModule prepends no header of CuPy's
    assert set(compiled.mapping) == expected
    failures = []
    for expression, lowered in sorted(compiled.mapping.items()):
        dtype = np.dtype(np.float32) if expression.endswith("<float>") else np.dtype(np.float64)
        failures += [f"{expression} (sm_{arch}): {f}" for f in problems(compiled, lowered, dtype)]
    assert not failures, "\n".join(failures)


def test_nvrtc_gets_cupys_headers_and_options(nvrtc):
    op, act = ELEMENTWISE_PAIRS[0]
    kernel = ops._kernel(op, act or "")
    compiled = nvrtc.elementwise(kernel, op, DTYPES[0], "90")
    assert compiled.source.startswith("#include <cupy/complex.cuh>\n#include <cupy/carray.cuh>")
    assert cuda.source() in compiled.source
    assert f'extern "C" __global__ void {kernel.name}(' in compiled.source
    for option in ("--std=c++17", "-ftz=true", "-arch=sm_90",
                   "--device-as-default-execution-space"):
        assert option in compiled.options
    assert any(o.startswith("-I") and o.endswith("_core/include") for o in compiled.options)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_the_noise_kernel_rounds_as_numpy(nvrtc, arch, dtype):
    # -fmad is on by default: a * b + c would become one fma with one rounding where
    # NumPy rounds twice. The noise's _rn intrinsics are never contracted, so its PTX has
    # no fma at all, every float operation carries .rn (PTX lets ptxas fuse a mul and an
    # add without it), and its float32 arithmetic is one rounding from double and
    # w + scale z as mul.rn and add.rn
    op = "gaussian_noise"
    kernel = ops._kernel(op, "")
    compiled = nvrtc.elementwise(kernel, op, dtype, arch)
    assert kernel.name in DOUBLE_BY_DESIGN and problems(compiled, kernel.name, dtype) == []
    code = ptx_code(compiled.ptx, kernel.name)
    assert not _FUSED.findall(code), _FUSED.findall(code)[:4]
    arithmetic = re.findall(r"^\s*((?:add|sub|mul|div|sqrt)\.\S*f(?:32|64))\s", code,
                            re.MULTILINE)
    assert {"div.rn.f64", "sqrt.rn.f64"} <= set(arithmetic), arithmetic
    assert all(".rn." in operation for operation in arithmetic), set(arithmetic)
    if dtype == np.float32:
        single = re.findall(r"^\s*((?:add|sub|mul|div|cvt)\S*\.f32\S*)", code, re.MULTILINE)
        assert sorted(single) == ["add.rn.ftz.f32", "cvt.rn.ftz.f32.f64", "mul.rn.ftz.f32"]


def test_fused_multiply_adds_are_found():
    assert _FUSED.search("\tfma.rn.f32 \t%f3, %f1, %f2, %f3;")
    assert _FUSED.search("\tfma.rn.ftz.f32 \t%f3, %f1, %f2, %f3;")
    assert _FUSED.search("\tfma.rn.f64 \t%fd3, %fd1, %fd2, %fd3;")
    assert not _FUSED.search("\tmad.lo.s32 \t%r3, %r1, %r2, %r3;")  # integers: exact
    assert not _FUSED.search("\tmul.rn.f64 \t%fd3, %fd1, %fd2;")


def test_integer_scalars_reach_the_body_as_their_c_type():
    # the noise kernel's key and counter words, declared uint32 in ops.ELEMENTWISE, are
    # the unsigned int words gm_gaussian_noise takes
    op = "gaussian_noise"
    kernel = ops._kernel(op, "")
    for dtype in DTYPES:
        [code] = elementwise_sources(kernel, op, dtype, "typical")
        for name in ("key0", "key1", "stream", "step_lo", "step_hi"):
            assert f"const unsigned int {name}," in code, name
        assert f"const {CTYPES[dtype]} scale," in code


# --- the check fails where it must ----------------------------------------------------------

def test_an_elementwise_kernel_that_does_not_compile_fails(nvrtc, monkeypatch):
    from cupy.cuda.compiler import CompileException

    monkeypatch.setitem(ops.ELEMENTWISE, "broken", ("T x", "T y", "y = gm_no_such_function(x)"))
    assert ("broken", None) in cuda_host.elementwise_pairs()  # the tests above would see it
    op = "broken"
    kernel = ops._kernel.__wrapped__(op, "")
    with pytest.raises(CompileException, match="gm_no_such_function"):
        nvrtc.elementwise(kernel, op, DTYPES[0], "90")


def test_a_row_module_that_does_not_compile_fails(nvrtc, monkeypatch):
    from cupy.cuda.compiler import CompileException

    source = cuda.source()
    monkeypatch.setattr(cuda, "source", lambda: source + "\nint broken = gm_no_such_function();\n")
    with pytest.raises(CompileException, match="gm_no_such_function"):
        nvrtc.module(cuda._row_module.__wrapped__(), "90")


def test_double_precision_in_a_float32_kernel_is_found(nvrtc, monkeypatch):
    # 1.1 is a double: the product is computed in double and rounded back
    monkeypatch.setitem(ops.ELEMENTWISE, "doubled", ("T x", "T y", "y = x * 1.1"))
    op = "doubled"
    kernel = ops._kernel.__wrapped__(op, "")
    compiled = nvrtc.elementwise(kernel, op, DTYPES[0], "90")
    [problem] = problems(compiled, kernel.name, DTYPES[0])
    assert "double precision" in problem and "mul" in problem
    assert problems(nvrtc.elementwise(kernel, op, DTYPES[1], "90"), kernel.name, DTYPES[1]) == []


def test_a_warning_fails_the_check(nvrtc, monkeypatch):
    monkeypatch.setitem(ops.ELEMENTWISE, "warned", ("T x", "T y", "int unused; y = x"))
    op = "warned"
    kernel = ops._kernel.__wrapped__(op, "")
    compiled = nvrtc.elementwise(kernel, op, DTYPES[0], "90")
    assert compiled.log and "unused" in compiled.log
    assert any("NVRTC says" in p for p in problems(compiled, kernel.name, DTYPES[0]))


def test_the_ptx_of_a_kernel_takes_in_the_functions_it_calls():
    ptx = ("\n.func  (.param .b32 func_retval0) _Z4halfIfET_S0_(\n\t.param .b32 x\n)\n{\n"
           "\tmul.f64 \t%fd2, %fd1, 0d3FE0000000000000;\n}\n"
           "\n.visible .entry gm_calls(\n\t.param .u64 p\n)\n{\n"
           "\tcall.uni (retval0), _Z4halfIfET_S0_, (param0);\n\tret;\n}\n"
           "\n.visible .entry gm_alone(\n)\n{\n\tret;\n}\n")
    assert _DOUBLE.search(ptx_code(ptx, "gm_calls"))
    assert not _DOUBLE.search(ptx_code(ptx, "gm_alone"))
