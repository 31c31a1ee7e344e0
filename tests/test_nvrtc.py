"""Every kernel gpu_mlp hands CuPy, compiled by NVRTC exactly as CuPy would, without a GPU.

CuPy compiles at run time, so a kernel that NVRTC rejects -- or one that a float32
network would run in double precision -- shows only on a GPU. Here CuPy's own code
runs the way to NVRTC, with nothing of a device in it: gpu_mlp's one module per dtype
(``cuda.module(ops.kernel_source(), ops.module_names(dtype))``: the headers, every row
kernel and every ``ops.ELEMENTWISE`` kernel generated from the table, instantiated by
name expressions) is compiled through ``RawModule.compile`` -- its code, options and
name expressions -- and so through ``cupy.cuda.compiler._compile_with_cache_cuda``,
which adds ``-ftz=true`` and ``-arch=sm_XX``.

Only the device is taken out: ``compiler._get_arch`` answers the architecture under
test, ``_get_arch_for_options_for_nvrtc`` and ``raw._get_raw_module`` run without their
per-device memo (which asks the driver for the current device), the kernel cache stays
in memory (``CUPY_CACHE_IN_MEMORY``), and loading the binary into a ``Module`` (a driver
call) only keeps it. NVRTC's log must be empty (no error, no warning) and the PTX of a
float32 kernel must hold no double-precision instruction.

Needs CuPy and libnvrtc (the ``nvidia-cuda-nvrtc`` wheel, or the CUDA toolkit); skipped
otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
import threading
import types

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="needs CuPy")

from gpu_mlp import cuda, ops  # noqa: E402

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

    def module(self, raw_module, arch: str) -> Compiled:
        """Compile a ``cupy.RawModule`` through ``RawModule.compile``; raises
        ``cupy.cuda.compiler.CompileException`` with NVRTC's log if it does not compile."""
        log = io.StringIO()
        return self._run(arch, lambda: raw_module.compile(log_stream=log))

    @functools.cache
    def gpu_mlp_module(self, arch: str, dtype) -> Compiled:
        """gpu_mlp's module of ``dtype``, as ``ops`` builds it, compiled for ``arch``."""
        return self.module(gpu_mlp_module(dtype), arch)


def gpu_mlp_module(dtype):
    """A new ``cupy.RawModule`` made as ``ops._function`` makes the module of ``dtype``
    (not the cached one: the tests below change the sources)."""
    return cuda.module.__wrapped__(ops.kernel_source.__wrapped__(), ops.module_names(dtype))


def _missing_piece() -> str | None:
    """Why NVRTC cannot be driven here, or None."""
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as e:  # libnvrtc not found
        return (f"needs libnvrtc (pip install nvidia-cuda-nvrtc, or the CUDA toolkit): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
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


def problems(compiled: Compiled, expression: str, dtype) -> list[str]:
    """What is wrong with the kernel ``expression`` (e.g. ``"gpu_mlp_mul<float>"``) of a
    compiled module: a log (warnings), a missing entry, double precision in a float32
    kernel."""
    found = []
    if compiled.log:
        found.append(f"NVRTC says:\n{compiled.log}")
    if not compiled.binary:
        found.append("no binary")
    entry = compiled.mapping.get(expression)
    if entry is None or not re.search(rf"\.entry\s+{re.escape(entry)}\s*\(", compiled.ptx):
        found.append(f"no entry for {expression} in the PTX")
    elif dtype == np.float32 and expression.split("<")[0] not in DOUBLE_BY_DESIGN:
        doubles = [line.strip() for line in ptx_code(compiled.ptx, entry).splitlines()
                   if _DOUBLE.search(line)]
        if doubles:
            found.append("double precision in a float32 kernel:\n  " + "\n  ".join(doubles[:8]))
    return found


# --- the tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_the_module_compiles_every_kernel(nvrtc, arch, dtype):
    compiled = nvrtc.gpu_mlp_module(arch, dtype)
    names = ops.module_names(dtype)
    ctype = CTYPES[dtype]
    assert set(names) == {f"{kernel}<{ctype}>" for kernel in cuda.ROW_KERNELS} | {
        f"{ops.kernel_name(op, act)}<{ctype}>" for op, act in ops.elementwise_pairs()}
    assert set(compiled.mapping) == set(names)
    assert compiled.source == cuda.module_code(ops.kernel_source())  # no header of CuPy's
    failures = [f"{name} (sm_{arch}): {f}" for name in names
                for f in problems(compiled, name, dtype)]
    assert not failures, "\n".join(failures)


def test_nvrtc_gets_the_modules_options(nvrtc):
    compiled = nvrtc.gpu_mlp_module("90", DTYPES[0])
    # RawModule adds CuPy's -I paths of CCCL; the compiler adds -ftz=true (as it does
    # for every ElementwiseKernel: the same flushing of float32 subnormals) and the arch
    for option in (*cuda.OPTIONS, "-ftz=true", "-arch=sm_90"):
        assert option in compiled.options, (option, compiled.options)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_the_noise_kernel_rounds_as_numpy(nvrtc, arch, dtype):
    # -fmad is on by default: a * b + c would become one fma with one rounding where
    # NumPy rounds twice. The noise's _rn intrinsics are never contracted, so its PTX has
    # no fma at all, every float operation carries .rn (PTX lets ptxas fuse a mul and an
    # add without it), and its float32 arithmetic is one rounding from double and
    # w + scale z as mul.rn and add.rn
    compiled = nvrtc.gpu_mlp_module(arch, dtype)
    expression = f"gpu_mlp_gaussian_noise<{CTYPES[dtype]}>"
    assert expression.split("<")[0] in DOUBLE_BY_DESIGN
    assert problems(compiled, expression, dtype) == []
    code = ptx_code(compiled.ptx, compiled.mapping[expression])
    assert not _FUSED.findall(code), _FUSED.findall(code)[:4]
    arithmetic = re.findall(r"^\s*((?:add|sub|mul|div|sqrt)\.\S*f(?:32|64))\s", code,
                            re.MULTILINE)
    assert {"div.rn.f64", "sqrt.rn.f64"} <= set(arithmetic), arithmetic
    assert all(".rn." in operation for operation in arithmetic), set(arithmetic)
    if dtype == np.float32:  # in each of the kernel's two loops (32- and 64-bit indices)
        single = re.findall(r"^\s*((?:add|sub|mul|div|cvt)\S*\.f32\S*)", code, re.MULTILINE)
        assert sorted(single) == 2 * ["add.rn.ftz.f32"] + 2 * ["cvt.rn.ftz.f32.f64"] + \
            2 * ["mul.rn.ftz.f32"]


def test_integer_scalars_reach_the_body_as_their_c_type():
    # the noise kernel's key and stream words, declared uint32 in ops.ELEMENTWISE, are
    # the unsigned int words gm_gaussian_noise takes; its scale and 64-bit step counter,
    # read on the device (raw), are pointers; the sizes are long long
    code = ops.kernel_template("gaussian_noise", None)
    for name in ("key0", "key1", "stream"):
        assert f"const unsigned int {name}," in code, name
    assert "const T* scale," in code and "const long long* step," in code
    assert "(long long gm_n_, long long gm_channels_, long long gm_inner_," in code


def test_fused_multiply_adds_are_found():
    assert _FUSED.search("\tfma.rn.f32 \t%f3, %f1, %f2, %f3;")
    assert _FUSED.search("\tfma.rn.ftz.f32 \t%f3, %f1, %f2, %f3;")
    assert _FUSED.search("\tfma.rn.f64 \t%fd3, %fd1, %fd2, %fd3;")
    assert not _FUSED.search("\tmad.lo.s32 \t%r3, %r1, %r2, %r3;")  # integers: exact
    assert not _FUSED.search("\tmul.rn.f64 \t%fd3, %fd1, %fd2;")


# --- the check fails where it must ----------------------------------------------------------

def test_an_elementwise_kernel_that_does_not_compile_fails(nvrtc, monkeypatch):
    from cupy.cuda.compiler import CompileException

    monkeypatch.setitem(ops.ELEMENTWISE, "broken", ("T x", "T y", "y = gm_no_such_function(x)"))
    assert ("broken", None) in ops.elementwise_pairs()  # the tests above would see it
    with pytest.raises(CompileException, match="gm_no_such_function"):
        nvrtc.module(gpu_mlp_module(DTYPES[0]), "90")


def test_a_header_that_does_not_compile_fails(nvrtc, monkeypatch):
    from cupy.cuda.compiler import CompileException

    source = cuda.source()
    monkeypatch.setattr(cuda, "source", lambda: source + "\nint broken = gm_no_such_function();\n")
    with pytest.raises(CompileException, match="gm_no_such_function"):
        nvrtc.module(gpu_mlp_module(DTYPES[0]), "90")


def test_double_precision_in_a_float32_kernel_is_found(nvrtc, monkeypatch):
    # 1.1 is a double: the product is computed in double and rounded back
    monkeypatch.setitem(ops.ELEMENTWISE, "doubled", ("T x", "T y", "y = x * 1.1"))
    compiled = {dtype: nvrtc.module(gpu_mlp_module(dtype), "90") for dtype in DTYPES}
    [problem] = problems(compiled[DTYPES[0]], "gpu_mlp_doubled<float>", DTYPES[0])
    assert "double precision" in problem and "mul" in problem
    assert problems(compiled[DTYPES[1]], "gpu_mlp_doubled<double>", DTYPES[1]) == []


def test_a_warning_fails_the_check(nvrtc, monkeypatch):
    monkeypatch.setitem(ops.ELEMENTWISE, "warned", ("T x", "T y", "int unused; y = x"))
    compiled = nvrtc.module(gpu_mlp_module(DTYPES[0]), "90")
    assert compiled.log and "unused" in compiled.log
    assert any("NVRTC says" in p for p in problems(compiled, "gpu_mlp_warned<float>", DTYPES[0]))


def test_the_ptx_of_a_kernel_takes_in_the_functions_it_calls():
    ptx = ("\n.func  (.param .b32 func_retval0) _Z4halfIfET_S0_(\n\t.param .b32 x\n)\n{\n"
           "\tmul.f64 \t%fd2, %fd1, 0d3FE0000000000000;\n}\n"
           "\n.visible .entry gm_calls(\n\t.param .u64 p\n)\n{\n"
           "\tcall.uni (retval0), _Z4halfIfET_S0_, (param0);\n\tret;\n}\n"
           "\n.visible .entry gm_alone(\n)\n{\n\tret;\n}\n")
    assert _DOUBLE.search(ptx_code(ptx, "gm_calls"))
    assert not _DOUBLE.search(ptx_code(ptx, "gm_alone"))
