"""The BLAS facts behind the NumPy path's GEMM choices, measured on this machine.

1. ``orientation``: a weight gradient ``T^T X`` (d_out, K) against its transpose
   ``X^T T`` (K, d_out), through ``gpu_mlp.ops.gemm`` (SciPy's BLAS), for rows x K x
   d_out shapes of the conv and MLP layers, and an entrance convolution's transposed
   columns (X the transpose of a C-ordered (K, rows)): behind ``ops.sums_transposed``.
2. ``libraries``: one ``cblas_sgemm`` call with the same arguments in SciPy's OpenBLAS
   (which ``ops.gemm`` calls) and in NumPy's own (found with threadpoolctl; skipped where
   either is not an OpenBLAS of the scipy-openblas wheels), each after the settle sleep
   (``harness.CPU_SETTLE_S``: the other's threads stop spinning).
3. ``pools``: GEMMs alternating between NumPy's ``matmul`` and SciPy's BLAS against the
   same GEMMs all in SciPy's: two OpenBLAS thread pools spinning against each other --
   why a step never calls NumPy's own BLAS (tests/test_architecture.py).

    python bench/blas_shapes.py                  # all three
    python bench/blas_shapes.py orientation --repeats 50
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARTS = ("orientation", "libraries", "pools")
# (rows, K, d_out): conv layers' weight gradients (a 4 MiB row block, whole batches of
# 28x28 and 14x14 maps), the digits CNN's, and Dense heads'
SHAPES = ((7281, 144, 16), (50176, 144, 16), (12544, 288, 32), (3640, 288, 32),
          (2048, 144, 16), (512, 288, 64), (64, 784, 10), (64, 1568, 10), (1024, 784, 10))
ENTRANCES = ((9, 50176, 16), (9, 50176, 32), (27, 65536, 16), (9, 2048, 32))  # (K, rows, d)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"which to run, of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed calls per case; the median is reported (default 20)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}: choose from {', '.join(PARTS)}")
    args.parts = args.parts or list(PARTS)
    return args


def median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def settled(call, repeats: int) -> float:
    """:func:`median_ms` after the other library's threads have stopped spinning."""
    from bench.harness import CPU_SETTLE_S

    time.sleep(CPU_SETTLE_S)
    return median_ms(call, repeats)


def orientation(repeats: int) -> list[str]:
    import numpy as np

    from gpu_mlp import ops

    rng = np.random.default_rng(0)

    def compare(label, X, d):
        (rows, K), T = X.shape, rng.standard_normal((X.shape[0], d), dtype=np.float32)
        plain = median_ms(lambda: ops.gemm("T", "N", T, X, np.empty((d, K), np.float32)),
                          repeats)
        flipped = median_ms(lambda: ops.gemm("T", "N", X, T, np.empty((K, d), np.float32)),
                            repeats)
        return (f"{label} d_out {d:3d}: T^T X {plain:7.3f} ms, X^T T {flipped:7.3f} ms, "
                f"ratio {flipped / plain:.2f}")

    return ([compare(f"rows {rows:6d} K {K:5d}",
                     rng.standard_normal((rows, K), dtype=np.float32), d)
             for rows, K, d in SHAPES]
            # the entrance's columns: X the transpose of a C-ordered (K, rows)
            + [compare(f"entrance K {K:3d} rows {rows:6d}",
                       rng.standard_normal((K, rows), dtype=np.float32).T, d)
               for K, rows, d in ENTRANCES])


def _sgemm_of(path: str):
    """``cblas_sgemm`` of a scipy-openblas library (32- or 64-bit integer interface)."""
    lib = ctypes.CDLL(path)
    for name, integer in (("scipy_cblas_sgemm64_", ctypes.c_int64),
                          ("scipy_cblas_sgemm", ctypes.c_int)):
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes = ([ctypes.c_int] * 3 + [integer] * 3
                           + [ctypes.c_float, ctypes.c_void_p, integer, ctypes.c_void_p,
                              integer, ctypes.c_float, ctypes.c_void_p, integer])
            return fn
    return None


def libraries(repeats: int) -> list[str]:
    import numpy as np
    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS)

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return ["libraries: skipped (needs threadpoolctl, which the torch extra brings)"]
    found = {}
    for info in threadpool_info():
        path = info["filepath"]
        owner = "numpy" if "numpy" in path else "scipy" if "scipy" in path else None
        sgemm = _sgemm_of(path) if info["user_api"] == "blas" and owner else None
        if sgemm is not None:
            found[owner] = (sgemm, info.get("version"))
    if set(found) != {"numpy", "scipy"}:
        return [f"libraries: skipped (scipy-openblas found for {sorted(found) or 'neither'})"]
    rng = np.random.default_rng(0)
    lines = []
    for rows, K, d in SHAPES[:4]:
        X = rng.standard_normal((rows, K), dtype=np.float32)
        T = rng.standard_normal((rows, d), dtype=np.float32)
        out = np.empty((K, d), np.float32)
        # out (K, d) = X^T T, row-major: CblasRowMajor 101, CblasTrans 112, CblasNoTrans 111
        args = (101, 112, 111, K, d, rows, 1.0, X.ctypes.data, K, T.ctypes.data, d, 0.0,
                out.ctypes.data, d)
        ms = {owner: settled(lambda fn=fn: fn(*args), repeats)
              for owner, (fn, _) in found.items()}
        lines.append(f"X^T T rows {rows:6d} K {K:4d} d_out {d:3d}: SciPy's OpenBLAS "
                     f"{found['scipy'][1]} {ms['scipy']:.3f} ms, NumPy's {found['numpy'][1]} "
                     f"{ms['numpy']:.3f} ms, ratio {ms['numpy'] / ms['scipy']:.2f}")
    return lines


def pools(repeats: int) -> list[str]:
    import numpy as np

    from gpu_mlp import ops

    rng = np.random.default_rng(0)
    X = rng.standard_normal((12544, 144), dtype=np.float32)
    W = rng.standard_normal((16, 144), dtype=np.float32)
    out = np.empty((12544, 16), np.float32)

    def scipy_only():
        for _ in range(4):
            ops.gemm("N", "T", X, W, out)

    def alternating():
        for i in range(4):
            if i % 2:
                np.matmul(X, W.T, out=out)
            else:
                ops.gemm("N", "T", X, W, out)

    one, two = settled(scipy_only, repeats), settled(alternating, repeats)
    return [f"4 GEMMs (12544 x 144 x 16): all SciPy's {one:.3f} ms, alternating NumPy's "
            f"matmul and SciPy's {two:.3f} ms, ratio {two / one:.2f}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench import warn_forced_blas

    warn_forced_blas()
    for part in args.parts:
        print(f"{part}:")
        for line in globals()[part](args.repeats):
            print("  " + line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
