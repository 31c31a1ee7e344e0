"""Benchmarks of one gpu_mlp training step against PyTorch: see bench/README.md."""

import os
import sys

# set by some machines for older OpenBLAS builds: they force one processor's kernels
BLAS_FORCING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def pin_environment(threads: int, tf32: bool = False) -> None:
    """Set what NumPy, SciPy and CuPy read once, when they load -- the BLAS thread counts
    (gpu_mlp's CPU GEMMs) and ``CUPY_TF32`` (gpu_mlp's cuBLAS handles and CuPy's matmul)
    -- so that both libraries of a comparison get the same: call before importing them.
    PyTorch's own are set by ``harness.configure``."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["CUPY_TF32"] = "1" if tf32 else "0"
    warn_forced_blas()


def warn_forced_blas() -> None:
    """A note on stderr where the environment forces OpenBLAS's kernels: the numbers are
    then not those of the NumPy a user has."""
    forced = [f"{v}={os.environ[v]}" for v in BLAS_FORCING if v in os.environ]
    if forced:
        print(f"note: {' '.join(forced)} forces OpenBLAS's kernels, not what NumPy detects "
              f"on this CPU; for what a user's NumPy runs, unset them: env -u "
              f"{' -u '.join(BLAS_FORCING)} python ...", file=sys.stderr)
