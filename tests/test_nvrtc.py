"""Every kernel gpu_mlp hands CuPy, compiled by NVRTC exactly as CuPy would, without a GPU.

CuPy compiles at run time, so a kernel that NVRTC rejects -- or one that a float32
network would run in double precision -- shows only on a GPU. Here CuPy's own code
runs the way to NVRTC, with nothing of a device in it:

* ``ElementwiseKernel``: gpu_mlp's own kernel objects (``ops._kernel``, one per
  ``ops.ELEMENTWISE`` entry and activation). The argument records CuPy makes at launch
  (``cupy._core._kernel._ArgInfo``: array or scalar, dtype, ndim, contiguity, 32-bit
  indexing) are built here as CuPy's broadcast and dimension reduction make them for
  the arrays gpu_mlp passes (see :func:`launch_records`); from them CuPy's code
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
import dataclasses
import io
import os
import re
import threading
import types

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="needs CuPy")

import cuda_host  # noqa: E402
from gpu_mlp import cuda, ops  # noqa: E402

ARCHS = ("80", "90")  # A100, H100
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# The batch shapes (B, d) whose launches CuPy compiles differently: the usual one; a
# single sample, where a broadcast bias is contiguous and the arrays collapse to 1-D;
# and arrays over 2 GiB, which CuPy indexes with 64 bits. The last two change CuPy's
# indexing, not the element type: they are compiled for one architecture and dtype.
LAYOUTS = {"typical": (64, 64), "one-row": (1, 64), "huge": (1 << 22, 1 << 10)}


def layouts_for(arch: str, dtype) -> tuple[str, ...]:
    return tuple(LAYOUTS) if (arch, dtype) == ("90", np.float32) else ("typical",)


# a double-precision instruction, operand type or register in PTX
_DOUBLE = re.compile(r"\.f64\b|%fd\d")


# --- CuPy's launch records, as CuPy would make them ---------------------------------------

def launch_records(kernel, dtype, layout: str) -> list[tuple]:
    """``[(arginfos, type_map)]``: what ``ElementwiseKernel.__call__`` computes for
    gpu_mlp's arguments with the batch shape of ``layout`` (cupy/_core/_kernel.pyx 14.2:
    ``_preprocess_args``, ``_broadcast``, ``_decide_params_type``, ``_reduce_dims`` and
    ``_ArgInfo.from_*``). Outputs are (B, d) arrays, or also (B, 1) columns when every
    input is a column or a scalar, as nothing in the signature then tells which."""
    B, d = LAYOUTS[layout]
    params = kernel.params[:kernel.nargs]  # the last one is CuPy's CIndexer _ind
    kinds, dtypes = [], []
    for p in params:
        kinds.append(ops.param_layout(p.name, p.dtype is not None, p.raw))
        dtypes.append(np.dtype(p.dtype) if p.dtype is not None else dtype)
    # CScalar.apply_dtype gives a scalar its parameter's type
    array_types = [None if k == "scalar" else t for k, t in zip(kinds, dtypes)]
    in_types, out_types, type_map = kernel._decide_params_type(
        tuple(array_types[:kernel.nin]), tuple(array_types[kernel.nin:]))
    shape_of = {"full": (B, d), "raw": (B, d), "column": (d,), "row": (B, 1)}
    broadcast_inputs = [k for k in kinds[:kernel.nin] if k not in ("scalar", "raw")]
    out_shapes = [(B, d)]
    if broadcast_inputs and set(broadcast_inputs) == {"row"}:
        out_shapes.append((B, 1))
    return [(_arginfos(kinds, in_types + out_types, kernel.nin, shape_of, out_shape),
             type_map) for out_shape in out_shapes]


def _arginfos(kinds, dtypes, nin, shape_of, out_shape) -> tuple:
    from cupy._core import _carray, _kernel, _scalar

    shapes = [None if k == "scalar" else shape_of[k] if i < nin or k == "raw" else out_shape
              for i, k in enumerate(kinds)]
    broadcast = [i for i, k in enumerate(kinds) if k not in ("scalar", "raw")]
    shape = np.broadcast_shapes(*[shapes[i] for i in broadcast])

    def small(s):  # lengths 1 and 2 stand for 1 and more: the same contiguity flags
        return tuple(min(n, 2) for n in s)

    # contiguity after broadcasting: NumPy's flag, like CuPy's, ignores axes of length 1
    contiguous = {i: np.broadcast_to(np.empty(small(shapes[i])), small(shape)).flags.c_contiguous
                  for i in broadcast}
    # _reduced_view_core: all contiguous -> one flat axis; a 2-D broadcast stays as it is
    ndim = 1 if all(contiguous.values()) else len(shape)

    def fits_32_bits(s, t):  # ndarray._index_32_bits, kept by broadcast and reduced views
        return int(np.prod(s)) * t.itemsize <= 1 << 31

    records = []
    for i, k in enumerate(kinds):
        if k == "scalar":
            records.append(_kernel._ArgInfo(3, _scalar.CScalar, dtypes[i], 0, True, True))
        elif k == "raw":  # neither broadcast nor reshaped
            records.append(_kernel._ArgInfo(1, cupy.ndarray, dtypes[i], len(shapes[i]), True,
                                            fits_32_bits(shapes[i], dtypes[i])))
        else:
            records.append(_kernel._ArgInfo(1, cupy.ndarray, dtypes[i], ndim,
                                            ndim == 1 or contiguous[i],
                                            fits_32_bits(shapes[i], dtypes[i])))
    size = int(np.prod(shape))
    records.append(_kernel._ArgInfo(2, _carray.Indexer, None, ndim, True, size <= 1 << 31))
    return tuple(records)


def elementwise_sources(kernel, dtype, layout: str) -> list[str]:
    """The CUDA sources CuPy generates for ``kernel``'s launches (before CuPy's headers
    are prepended), as ``ElementwiseKernel._get_elementwise_kernel`` does."""
    from cupy._core import _kernel

    return [_kernel._get_elementwise_kernel_code(
        arginfos, type_map, kernel.params, kernel.operation, kernel.name, kernel.preamble,
        **kernel.kwargs) for arginfos, type_map in launch_records(kernel, dtype, layout)]


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

    def elementwise(self, kernel, dtype, arch: str, layout: str = "typical") -> Compiled:
        """Compile ``kernel``'s first launch in ``layout``."""
        return self.elementwise_code(elementwise_sources(kernel, dtype, layout)[0], kernel, arch)

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
    elif dtype == np.float32:
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
    jobs, seen = [], set()
    for op, act in ELEMENTWISE_PAIRS:
        kernel = ops._kernel(op, act or "")
        for layout in layouts_for(arch, dtype):
            for n, code in enumerate(elementwise_sources(kernel, dtype, layout)):
                if code in seen:  # the same launch records as another layout
                    continue
                seen.add(code)
                jobs.append(((kernel.name, f"{layout}{'-column-out' if n else ''}"),
                             lambda c=code, k=kernel: nvrtc.elementwise_code(c, k, arch)))
    assert {name for (name, _), _ in jobs} == {ops._kernel(op, act or "").name
                                               for op, act in ELEMENTWISE_PAIRS}
    failures = []
    for (name, layout), result in _parallel(jobs).items():
        found = ([f"does not compile:\n{result}"] if isinstance(result, Exception) else
                 problems(result, name, dtype))
        failures += [f"{name} ({layout}, sm_{arch}, {dtype.name}): {f}" for f in found]
    assert not failures, "\n".join(failures)


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
    kernel = ops._kernel(*next((op, act or "") for op, act in ELEMENTWISE_PAIRS))
    compiled = nvrtc.elementwise(kernel, DTYPES[0], "90")
    assert compiled.source.startswith("#include <cupy/complex.cuh>\n#include <cupy/carray.cuh>")
    assert cuda.source() in compiled.source
    assert f'extern "C" __global__ void {kernel.name}(' in compiled.source
    for option in ("--std=c++17", "-ftz=true", "-arch=sm_90",
                   "--device-as-default-execution-space"):
        assert option in compiled.options
    assert any(o.startswith("-I") and o.endswith("_core/include") for o in compiled.options)


# --- the check fails where it must ----------------------------------------------------------

def test_an_elementwise_kernel_that_does_not_compile_fails(nvrtc, monkeypatch):
    from cupy.cuda.compiler import CompileException

    monkeypatch.setitem(ops.ELEMENTWISE, "broken", ("T x", "T y", "y = gm_no_such_function(x)"))
    assert ("broken", None) in cuda_host.elementwise_pairs()  # the tests above would see it
    kernel = ops._kernel.__wrapped__("broken", "")
    with pytest.raises(CompileException, match="gm_no_such_function"):
        nvrtc.elementwise(kernel, DTYPES[0], "90")


def test_a_row_module_that_does_not_compile_fails(nvrtc, monkeypatch):
    from cupy.cuda.compiler import CompileException

    source = cuda.source()
    monkeypatch.setattr(cuda, "source", lambda: source + "\nint broken = gm_no_such_function();\n")
    with pytest.raises(CompileException, match="gm_no_such_function"):
        nvrtc.module(cuda._row_module.__wrapped__(), "90")


def test_double_precision_in_a_float32_kernel_is_found(nvrtc, monkeypatch):
    # 1.1 is a double: the product is computed in double and rounded back
    monkeypatch.setitem(ops.ELEMENTWISE, "doubled", ("T x", "T y", "y = x * 1.1"))
    kernel = ops._kernel.__wrapped__("doubled", "")
    compiled = nvrtc.elementwise(kernel, DTYPES[0], "90")
    [problem] = problems(compiled, kernel.name, DTYPES[0])
    assert "double precision" in problem and "mul" in problem
    assert problems(nvrtc.elementwise(kernel, DTYPES[1], "90"), kernel.name, DTYPES[1]) == []


def test_a_warning_fails_the_check(nvrtc, monkeypatch):
    monkeypatch.setitem(ops.ELEMENTWISE, "warned", ("T x", "T y", "int unused; y = x"))
    kernel = ops._kernel.__wrapped__("warned", "")
    compiled = nvrtc.elementwise(kernel, DTYPES[0], "90")
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
