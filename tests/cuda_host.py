"""Build gpu_mlp's CUDA C for the host (g++, called through ctypes) and for the GPU (nvcc).

The device math in ``kernels/*.cuh`` is ``__host__ __device__``, so the tests compile it
with the system C++ compiler and check it against the NumPy tables on a machine without
a GPU, and compile the same text with nvcc for the GPU the engine targets. Everything
called is generated here from gpu_mlp's own tables by the naming convention of
``kernels/activations.cuh``, so a new table row or ``ops.ELEMENTWISE`` entry is compiled
and tested with no change to the tests. The generated C functions (CTYPE is ``float`` or
``double``; arrays are C-contiguous; counts are ``long long``):

* ``host_<fn>_CTYPE(x, alpha, out, n)``: an activation function ``gm_<name>``,
  ``gm_<name>_grad`` or ``gm_<name>_grad_from_output`` over n elements;
* ``host_gm_<loss>_CTYPE(f, y, scale, grad, loss, n)``: an elementwise loss;
* ``ew_<op>[_<activation>]_CTYPE(n, channels, inner, params...)``: an ``ops.ELEMENTWISE``
  body over the n elements ``i`` of a (B, channels, *inner) output -- (B, d) for a
  dense layer, NCHW for a convolution -- its parameters in the kernel's order
  (:func:`elementwise_signature` says how each is passed): scalars by value, arrays as
  pointers -- ``bias`` indexed by channel as CuPy broadcasts the engine's bias, (d,)
  over (B, d) or (c, 1, 1) over (B, c, H, W); ``raw`` arrays left to the body. Inside,
  inputs are values and outputs ``T&``, as in CuPy;
* ``host_softmax_rows_CTYPE`` and friends: the row functions of ``rowwise.cuh`` per row;
* ``host_philox4x32_10(ctr, key, out, n)``: ``noise.cuh``'s generator on n counters
  (``uint32`` arrays (n, 4)) and keys ((n, 2)) into out (n, 4).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import numpy as np

from gpu_mlp import activations, cuda, losses, ops

CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# How gpu_mlp.ops passes each ELEMENTWISE parameter: ops.param_layout.
SCALAR_PARAMS, COLUMN_PARAMS = ops.SCALAR_PARAMS, ops.COLUMN_PARAMS
PARAM_TYPES = ops.PARAM_DTYPES

# GPU_MLP_SANITIZE=1: the host builds with AddressSanitizer and UndefinedBehaviorSanitizer,
# stopping at the first report -- a kernel body reading or writing past its arrays, an
# index arithmetic overflow (tests/test_sanitizers.py runs the kernel tests so)
SANITIZE_FLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=all")
HOST_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++14", "-Wall", "-Werror") + (  # no -ffast-math
    SANITIZE_FLAGS if os.environ.get("GPU_MLP_SANITIZE") == "1" else ())
NVCC_FLAGS = ("-c", "-arch=sm_90", "-std=c++14", "-Werror", "all-warnings", "-Xptxas", "-v")


class CompileError(RuntimeError):
    pass


# --- what the tables promise ------------------------------------------------------------

def activation_functions() -> dict[str, tuple[activations.Kind, str]]:
    """``{C name: (table row, role)}`` for every elementwise activation function, where
    ``role`` names the NumPy twin: ``getattr(kind, role)``."""
    functions = {}
    for kind in activations.TABLE.values():
        if kind.rowwise:
            continue
        functions[f"gm_{kind.name}"] = (kind, "value")
        if kind.grad is not None:
            functions[f"gm_{kind.name}_grad"] = (kind, "grad")
        if kind.grad_from_output is not None:
            functions[f"gm_{kind.name}_grad_from_output"] = (kind, "grad_from_output")
    return functions


def loss_functions() -> dict[str, losses.Loss]:
    """``{C name: loss}`` for every elementwise loss."""
    return {f"gm_{loss.name}": loss for loss in losses.TABLE.values() if not loss.rowwise}


def elementwise_pairs() -> list[tuple[str, str | None]]:
    """Every (op, activation name) the engine launches (``ops.elementwise_pairs``)."""
    return ops.elementwise_pairs()


def elementwise_name(op: str, act: str | None, dtype, index32: bool = False) -> str:
    """The host function of the kernel, with 64-bit indices or (``index32``) 32-bit ones,
    as the device kernel's two branches (``ops.kernel_template``)."""
    return "_".join(["ew", op] + ([act] if act else []) + [CTYPES[np.dtype(dtype)]]
                    + (["i32"] if index32 else []))


# One parameter of an ``ops.ELEMENTWISE`` kernel, and an op's parameters in order: what
# ops itself generates the kernels from.
EwParam = ops.Param
elementwise_signature = ops.signature


def elementwise_params(op: str) -> tuple[list[str], list[str]]:
    """The names of an op's input and output parameters, in order."""
    signature = elementwise_signature(op)
    return ([p.name for p in signature if not p.output], [p.name for p in signature if p.output])


# How gpu_mlp.ops calls each activation op, on arrays named as the kernel's parameters.
OP_CALLS = {
    "bias_act": lambda act, v: ops.bias_act(act, v["a"], v["bias"]),
    "bias_act_keep": lambda act, v: ops.bias_act_keep(act, v["a"], v["bias"], v["f"]),
    "bias_act_grad": lambda act, v: ops.bias_act_grad(act, v["a"], v["bias"], v["f"]),
    "grad_from_output": lambda act, v: ops.grad_from_output(act, v["f"], v["delta"]),
    "recompute_grad": lambda act, v: ops.recompute_grad(act, v["a"], v["delta"]),
    "mul": lambda act, v: ops.mul(v["delta"], v["d"]),
}


# --- generated C++ ----------------------------------------------------------------------

def elementwise_function(op: str, act: str | None, dtype, index32: bool = False) -> str:
    """An ``ops.ELEMENTWISE`` body as a host loop: the device kernel's arguments and loop
    body (``ops.kernel_parts``, ``ops.index_loop``), run element after element, with
    the index type of the device's branch for 64-bit or (``index32``) 32-bit indices."""
    ctype = CTYPES[np.dtype(dtype)]
    args, element = ops.kernel_parts(op, act, ctype)
    signature = f"{elementwise_name(op, act, dtype, index32)}({', '.join(args)})"
    return (f'extern "C" void {signature}\n{{\n'
            f"    typedef {ctype} T;\n"
            "    (void)sizeof(T);  // (a kernel of integers only does not use it)\n"
            + ops.index_loop(element, "unsigned int" if index32 else "long long") + "}\n")


_ACTIVATION_WRAPPER = """
extern "C" void host_{fn}_{T}(const {T}* x, {T} alpha, {T}* out, long long n)
{{
    for (long long i = 0; i < n; ++i) out[i] = {fn}(x[i], alpha);
}}
"""

_LOSS_WRAPPER = """
extern "C" void host_{fn}_{T}(const {T}* f, const {T}* y, {T} scale, {T}* grad, {T}* loss,
                              long long n)
{{
    for (long long i = 0; i < n; ++i) loss[i] = {fn}(f[i], y[i], scale, grad[i]);
}}
"""

_ROW_WRAPPERS = """
extern "C" void host_softmax_rows_{T}(const {T}* z, const {T}* bias, {T}* out,
                                      long long rows, long long C)
{{
    for (long long r = 0; r < rows; ++r) gm_softmax_row(z + r * C, bias, out + r * C, (int)C);
}}
extern "C" void host_softmax_backward_rows_{T}(const {T}* f, {T}* g, long long rows, long long C)
{{
    for (long long r = 0; r < rows; ++r) gm_softmax_backward_row(f + r * C, g + r * C, (int)C);
}}
// targets (B, C) or labels (B,): the other one is null, as in the two __global__ kernels
extern "C" void host_softmax_xent_rows_{T}(const {T}* f, const {T}* targets,
                                           const long long* labels, {T}* grad, {T}* loss,
                                           long long rows, long long C, {T} scale)
{{
    for (long long r = 0; r < rows; ++r)
        loss[r] = gm_softmax_xent_row(f + r * C, targets ? targets + r * C : ({T}*)0,
                                      labels ? labels[r] : -1LL, grad + r * C, (int)C, scale);
}}
"""


_NOISE_WRAPPER = """
extern "C" void host_philox4x32_10(const unsigned int* ctr, const unsigned int* key,
                                   unsigned int* out, long long n)
{
    for (long long b = 0; b < n; ++b) {
        unsigned int r[4] = {ctr[4 * b], ctr[4 * b + 1], ctr[4 * b + 2], ctr[4 * b + 3]};
        gm_philox4x32_10(r, key[2 * b], key[2 * b + 1]);
        for (int j = 0; j < 4; ++j) out[4 * b + j] = r[j];
    }
}
"""


def host_source() -> str:
    """Every kernel header, then ``extern "C"`` wrappers of everything the tests call."""
    parts = [f'#include "{header}"\n' for header in cuda.HEADERS]
    for ctype in CTYPES.values():
        parts += [_ACTIVATION_WRAPPER.format(fn=fn, T=ctype) for fn in activation_functions()]
        parts += [_LOSS_WRAPPER.format(fn=fn, T=ctype) for fn in loss_functions()]
        parts.append(_ROW_WRAPPERS.format(T=ctype))
    parts.append(_NOISE_WRAPPER)
    for dtype in CTYPES:
        parts += [elementwise_function(op, act, dtype, index32)
                  for op, act in elementwise_pairs() for index32 in (False, True)]
    return "\n".join(parts)


def device_source() -> str:
    """What CuPy compiles, as one translation unit: the module's code for every kernel
    (``cuda.module_code(ops.kernel_source())``) with every name of both dtypes' modules
    instantiated (taking a template's address does it, as CuPy's ``name_expressions``)."""
    names = [name for dtype in CTYPES for name in ops.module_names(dtype)]
    addresses = ", ".join(f"(void*)&{name}" for name in names)
    return (cuda.module_code(ops.kernel_source())
            + f"\nvoid* gm_kernel(int i)\n{{\n    void* const kernels[] = {{{addresses}}};\n"
            f"    return kernels[i];\n}}\n")


# --- compiling and calling ----------------------------------------------------------------

def _run(command: list[str]) -> str:
    # (not the sanitizers' runtime, preloaded into this process to run a sanitized build:
    # the compilers are no such build)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise CompileError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def build_host(folder: Path) -> ctypes.CDLL:
    """Compile :func:`host_source` with g++ into ``folder`` and load it."""
    cpp, lib = folder / "gpu_mlp_host.cpp", folder / "gpu_mlp_host.so"
    cpp.write_text(host_source())
    _run(["g++", *HOST_FLAGS, "-I", str(cuda.kernel_dir()), str(cpp), "-o", str(lib)])
    return ctypes.CDLL(str(lib))


def build_device(folder: Path) -> str:
    """Compile :func:`device_source` with nvcc for sm_90; returns the compiler's report."""
    cu = folder / "gpu_mlp_device.cu"
    cu.write_text(device_source())
    return _run(["nvcc", *NVCC_FLAGS, str(cu), "-o", str(folder / "gpu_mlp_device.o")])


def _c_arg(a):
    if a is None:
        return None  # a null pointer
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise ValueError("arrays passed to C must be C-contiguous")
        return a.ctypes.data_as(ctypes.c_void_p)
    if isinstance(a, np.float32):
        return ctypes.c_float(a)
    if isinstance(a, np.float64):
        return ctypes.c_double(a)
    if isinstance(a, np.int32):
        return ctypes.c_int(a)
    if isinstance(a, np.uint32):
        return ctypes.c_uint(a)
    if isinstance(a, (int, np.int64)):
        return ctypes.c_longlong(a)
    raise TypeError(f"cannot pass {type(a).__name__} to C: use an array, a NumPy float, "
                    f"a numpy.int32 or numpy.uint32, or an int")


def call(lib: ctypes.CDLL, name: str, *args) -> None:
    """Call ``name`` in ``lib``: arrays as pointers, NumPy floats, ``numpy.int32`` and
    ``numpy.uint32`` as their C type, other ints as ``long long``, None as a null pointer."""
    getattr(lib, name)(*(_c_arg(a) for a in args))
