"""How long one library's idle threads slow the next: why each CPU case of the benchmarks
sleeps first (``harness.CPU_SETTLE_S``; bench/README.md, "Cases in turn").

After a call OpenBLAS's worker threads spin for a while (2^28 cycles by default) before
they sleep, and PyTorch's OpenMP threads do too; on a small machine they hold the cores
the next library's threads want. This times one PyTorch convolution at several delays
after a burst of SciPy GEMMs (gpu_mlp's BLAS on the CPU), and one SciPy GEMM at the same
delays after a burst of PyTorch convolutions: the median of ``--repeats`` tries each.

    python bench/settle.py                       # delays 0, 5, 20, 50, 100, 200, 400 ms
    python bench/settle.py --delays 0,100,300 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", default="0,5,20,50,100,200,400",
                        help="milliseconds between the other library's burst and the "
                             "timed call, comma-separated (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="tries per delay; the median is reported (default 10)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads of both libraries (default: all, %(default)s)")
    args = parser.parse_args(argv)
    try:
        args.delays = [int(v) for v in args.delays.split(",") if v]
    except ValueError:
        parser.error(f"--delays: expected comma-separated milliseconds, got {args.delays!r}")
    if not args.delays or min(args.delays) < 0 or args.repeats < 1 or args.threads < 1:
        parser.error("--delays must be milliseconds >= 0, --repeats and --threads >= 1")
    return args


def measure(delays, repeats: int, threads: int, size: int = 28, burst: int = 20):
    """``{"torch after BLAS": {delay_ms: ms}, "BLAS after torch": {...}}``: the median
    time of one call of each library ``delay_ms`` after ``burst`` calls of the other."""
    import numpy as np
    import scipy.linalg.blas as blas
    import torch

    torch.set_num_threads(threads)
    x, w = torch.randn(64, 16, size, size), torch.randn(16, 16, 3, 3)
    A = np.random.default_rng(0).random((2000, 500), dtype=np.float32)
    B = np.random.default_rng(1).random((500, 500), dtype=np.float32)

    def conv():
        torch.nn.functional.conv2d(x, w, padding=1)

    def gemm():
        blas.sgemm(1.0, A, B)

    def timed(call) -> float:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3

    results = {}
    for label, other, call in (("torch after BLAS", gemm, conv),
                               ("BLAS after torch", conv, gemm)):
        results[label] = {}
        for delay in delays:
            tries = []
            for _ in range(repeats):
                for _ in range(burst):
                    other()
                time.sleep(delay / 1e3)
                tries.append(timed(call))
            results[label][delay] = statistics.median(tries)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench import pin_environment

    pin_environment(args.threads)
    for label, by_delay in measure(args.delays, args.repeats, args.threads).items():
        line = ", ".join(f"{delay} ms: {ms:.2f}" for delay, ms in by_delay.items())
        print(f"{label} (one call, ms, by delay): {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
