"""Host time of one GEMM call through gpu_mlp's cuBLAS binding (ctypes), against the
alternatives, and what capturing the GEMMs into a CUDA graph buys.

Without a GPU (``--stub``, or whenever CuPy sees none): gcc builds a stub libcublas whose
entry points return CUBLAS_STATUS_SUCCESS at once, and the script times the call alone --
ctypes with argtypes, and ``nvmath.bindings.cublas.sgemm`` when nvmath-python imports
(it needs a libcuda: ``--libcuda-stub`` builds one answering cuDriverGetVersion) -- and
``gpu_mlp.cublas.gemm`` whole (checks, handle, pointer mode, the call) over the stub. On a
GPU: ``ops.gemm`` through the binding against ``cupy.cublas.gemm`` on the same arrays
(64x64 float32: host-bound, so wall time per call is host time), and the probe's 12 GEMMs
eager against one captured graph replayed, with alpha on the device changed between
replays. Prints one JSON object (``--out FILE`` writes it too).

    python bench/cublas_overhead.py --stub
    python bench/cublas_overhead.py                 # on a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_mlp import cublas  # noqa: E402

STUB = """
typedef void *H;
int cublasCreate_v2(H *h) { *h = (H)0x10; return 0; }
int cublasDestroy_v2(H h) { return 0; }
int cublasSetStream_v2(H h, H s) { return 0; }
int cublasSetWorkspace_v2(H h, H w, unsigned long n) { return 0; }
int cublasSetPointerMode_v2(H h, int m) { return 0; }
int cublasSetMathMode(H h, int m) { return 0; }
#define GEMM(name, T) int name(H h, int ta, int tb, int m, int n, int k, const T *al, \\
    const T *A, int lda, const T *B, int ldb, const T *be, T *C, int ldc) { return 0; }
#define GEMV(name, T) int name(H h, int t, int m, int n, const T *al, const T *A, int lda, \\
    const T *x, int incx, const T *be, T *y, int incy) { return 0; }
GEMM(cublasSgemm_v2, float) GEMM(cublasDgemm_v2, double)
#define BATCHED(name, T) int name(H h, int ta, int tb, int m, int n, int k, const T *al, \\
    const T *A, int lda, long long sa, const T *B, int ldb, long long sb, const T *be, \\
    T *C, int ldc, long long sc, int count) { return 0; }
BATCHED(cublasSgemmStridedBatched, float) BATCHED(cublasDgemmStridedBatched, double)
GEMV(cublasSgemv_v2, float) GEMV(cublasDgemv_v2, double)
int cublasGetVersion_v2(H h, int *v) { *v = 131000; return 0; }
"""
LIBCUDA_STUB = "int cuDriverGetVersion(int *v) { *v = 13000; return 0; }\n"


def _timed(call, n: int) -> float:
    """Nanoseconds per call, the best of 3 rounds of ``n``."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            call()
        best = min(best, (time.perf_counter() - start) / n * 1e9)
    return best


def _build(folder: str, name: str, source: str, soname: str) -> str:
    c, so = os.path.join(folder, name + ".c"), os.path.join(folder, soname)
    with open(c, "w") as f:
        f.write(source)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", so, f"-Wl,-soname,{soname}", c],
                   check=True)
    return so


class _StubRuntime:
    """gpu_mlp.cublas's runtime over the stub library: host arrays, one stream."""

    array_type = type(None)  # no device scalars here: every alpha is a host number

    def __init__(self, library):
        self.library = library
        self.addresses = {}

    def device(self):
        return 0

    def stream(self):
        return 0x5EA

    def capturing(self, stream):
        return False

    def workspace(self, nbytes):
        return None, 0x100000

    def pointer(self, a):  # a dict lookup, about what CuPy's a.data.ptr costs
        return self.addresses[id(a)]

    def math_mode(self):
        return 0


def stub(n: int, libcuda_stub: bool) -> dict:
    folder = tempfile.mkdtemp(prefix="cublas_stub_")
    path = _build(folder, "cublas", STUB, "libcublas.so.13")
    if libcuda_stub:
        _build(folder, "cuda", LIBCUDA_STUB, "libcuda.so.1")
        _build(folder, "lt", "int cublasLtGetVersion(void) { return 0; }\n",
               "libcublasLt.so.13")
        for so in ("libcuda.so.1", "libcublasLt.so.13"):
            ctypes.CDLL(os.path.join(folder, so), mode=ctypes.RTLD_GLOBAL)
    library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    sgemm = library.cublasSgemm_v2
    sgemm.argtypes, sgemm.restype = cublas.PROTOTYPES["cublasSgemm_v2"], ctypes.c_int
    one = ctypes.c_float(1.0)
    p = ctypes.addressof(one)
    result = {"mode": "stub libcublas (every call returns at once)", "calls": n,
              "ns_per_call": {}}
    times = result["ns_per_call"]
    times["ctypes cublasSgemm_v2 (argtypes set)"] = _timed(
        lambda: sgemm(0x10, 0, 0, 64, 64, 64, p, 0x1000, 64, 0x2000, 64, p, 0x3000, 64), n)
    try:
        from nvmath.bindings import cublas as nvmath_cublas

        nvmath_cublas.sgemm(0x10, 0, 0, 64, 64, 64, p, 0x1000, 64, 0x2000, 64, p, 0x3000, 64)
        times["nvmath.bindings.cublas.sgemm"] = _timed(
            lambda: nvmath_cublas.sgemm(0x10, 0, 0, 64, 64, 64, p, 0x1000, 64, 0x2000, 64, p,
                                        0x3000, 64), n)
    except Exception as e:  # not installed, or no libcuda to load
        result["nvmath"] = f"not measured: {type(e).__name__}: {str(e).splitlines()[0]}"
    runtime = _StubRuntime(library)
    a, b, out = (np.ones((64, 64), np.float32) for _ in range(3))
    runtime.addresses.update({id(x): x.ctypes.data for x in (a, b, out)})
    binding = cublas.Cublas(runtime)
    times["gpu_mlp.cublas gemm, whole (checks, handle, host scalars, call)"] = _timed(
        lambda: binding.gemm("N", "T", a, b, out, -0.1, 1.0), n)
    times["(an empty Python call)"] = _timed(lambda: None, n)
    return result


HOST_CALLS = 256  # calls issued without a sync, well within CUDA's launch queue


def gpu(n: int) -> dict:
    import cupy
    import cupy.cublas

    from gpu_mlp import ops

    a, b, out = (cupy.ones((64, 64), cupy.float32) for _ in range(3))
    result = {"mode": "GPU", "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
              "cupy": cupy.__version__, "calls": n, "us_per_call": {},
              "host_us_per_call": {}, "host_calls": HOST_CALLS}
    times = result["us_per_call"]

    def per_call(call, name=None):
        """Microseconds a call, the GPU's work included (``n`` calls, then a sync: once
        the host outruns a small GEMM this is the GPU's time); with ``name``, also the
        host's alone, in result["host_us_per_call"]: the time to issue ``HOST_CALLS``
        calls, fewer than CUDA's launch queue holds, so none waits for the GPU."""
        call()
        cupy.cuda.Device().synchronize()
        best = issue = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(n):
                call()
            cupy.cuda.Device().synchronize()
            best = min(best, (time.perf_counter() - start) / n * 1e6)
            start = time.perf_counter()
            for _ in range(HOST_CALLS):
                call()
            issue = min(issue, (time.perf_counter() - start) / HOST_CALLS * 1e6)
            cupy.cuda.Device().synchronize()
        if name is not None:
            result["host_us_per_call"][name] = issue
        return best

    alpha = cupy.full((), -0.1, cupy.float32)
    for name, call in {
            "ops.gemm via gpu_mlp.cublas, host alpha/beta":
                lambda: ops.gemm("N", "T", a, b, out, -0.1, 1.0),
            "ops.gemm via gpu_mlp.cublas, device alpha":
                lambda: ops.gemm("N", "T", a, b, out, alpha, 1.0),
            "cupy.cublas.gemm, host alpha/beta":
                lambda: cupy.cublas.gemm("N", "T", a, b, out=out, alpha=-0.1, beta=1.0)}.items():
        times[name] = per_call(call, name)
    # the probe's step: 12 GEMMs, eager and as one replayed graph
    w = [cupy.random.standard_normal((256, 256), dtype=cupy.float32) / 16 for _ in range(4)]
    x = cupy.random.standard_normal((256, 256), dtype=cupy.float32)
    o, d = ([cupy.empty((256, 256), cupy.float32) for _ in range(4)] for _ in range(2))
    # the updates go to buffers of their own: updated in place, w would feed back into
    # the forward GEMMs and reach NaN within the timed calls (NaN != NaN below)
    u = [cupy.zeros((256, 256), cupy.float32) for _ in range(4)]
    lr = cupy.full((), -1e-3, cupy.float32)

    def step():  # 4 forward, 4 "delta" and 4 in-place update GEMMs (alpha = -lr)
        cur = x
        for W, O in zip(w, o):
            ops.gemm("N", "N", cur, W, O)
            cur = O
        for W, O, D, U in zip(w, o, d, u):
            ops.gemm("N", "T", O, W, D)
            ops.gemm("T", "N", D, x, U, lr, 1.0)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        cublas.prepare()
        times["12 GEMMs (256), eager, per step"] = per_call(step)
        stream.begin_capture()
        step()
        graph = stream.end_capture()
        times["12 GEMMs (256), one graph replayed, per step"] = per_call(graph.launch)
        before = [U.copy() for U in u]
        lr.fill(0.0)  # a replay reads the device alpha as it is now: no update
        graph.launch()
        stream.synchronize()
        result["replay_reads_device_alpha"] = all(
            bool(cupy.isfinite(U).all() and (U == B).all()) for U, B in zip(u, before))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stub", action="store_true", help="time against a stub libcublas")
    parser.add_argument("--libcuda-stub", action="store_true",
                        help="also stub libcuda, so that nvmath-python loads without a GPU")
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    import gpu_mlp

    on_gpu = not args.stub and gpu_mlp.gpu_available()
    result = gpu(args.calls // 10) if on_gpu else stub(args.calls, args.libcuda_stub)
    result.update(python=platform.python_version(), machine=platform.machine(),
                  command="python bench/cublas_overhead.py " + " ".join(argv or sys.argv[1:]))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
