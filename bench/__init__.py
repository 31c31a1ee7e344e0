"""Benchmarks of one gpu_mlp training step against PyTorch: see bench/README.md."""

import os


def pin_environment(threads: int, tf32: bool = False) -> None:
    """Set what NumPy, SciPy and CuPy read once, when they load -- the BLAS thread counts
    (gpu_mlp's CPU GEMMs) and ``CUPY_TF32`` (gpu_mlp's cuBLAS handles and CuPy's matmul)
    -- so that both libraries of a comparison get the same: call before importing them.
    PyTorch's own are set by ``harness.configure``."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["CUPY_TF32"] = "1" if tf32 else "0"
