"""Loading the CUDA C sources in ``kernels/`` and building CuPy kernels from them, lazily.

Nothing here imports CuPy until a kernel is first asked for, so ``import gpu_mlp``
works on a machine with neither a GPU nor CuPy. Each kernel is built once per
process (``functools.cache``); CuPy then compiles it once per dtype with NVRTC and
keeps the binary in its on-disk cache. The sources are handed to NVRTC as text, our
own ``#include`` lines resolved here, so that CuPy's cache key changes whenever a
header does.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

# The order in which the headers depend on each other. noise.cuh (DP-SGD's Gaussian
# noise) comes last: it needs only common.cuh, and what it adds is used by ops alone.
HEADERS = ("common.cuh", "activations.cuh", "losses.cuh", "rowwise.cuh", "conv.cuh",
           "optim.cuh", "noise.cuh")

_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"[^"]+"\s*$', re.MULTILINE)


def kernel_dir() -> Path:
    """The folder holding the CUDA sources: in the installed package, or the checkout."""
    spec = importlib.util.find_spec("gpu_mlp.kernel_sources")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "kernels"


@functools.cache
def source() -> str:
    """All headers as one translation unit, local includes inlined in order."""
    folder = kernel_dir()
    missing = [h for h in HEADERS if not (folder / h).is_file()]
    if missing:
        raise FileNotFoundError(f"gpu_mlp's CUDA sources are missing from {folder}: {missing}")
    return "\n".join(_LOCAL_INCLUDE.sub("", (folder / h).read_text()) for h in HEADERS)


@functools.cache
def elementwise(in_params: str, out_params: str, operation: str, name: str):
    """A ``cupy.ElementwiseKernel`` over gpu_mlp's device functions."""
    import cupy

    return cupy.ElementwiseKernel(in_params, out_params, operation, name,
                                  preamble=source())


ROW_KERNELS = ("gm_softmax_forward", "gm_softmax_backward",
               "gm_softmax_xent_labels", "gm_softmax_xent_targets")


@functools.cache
def _row_module():
    import cupy

    names = [f"{k}<{t}>" for k in ROW_KERNELS for t in ("float", "double")]
    return cupy.RawModule(code=source(), options=("--std=c++14",), name_expressions=names)


def row_kernel(name: str, dtype):
    """The row-wise ``__global__`` template ``name`` instantiated for ``dtype``."""
    return _row_function(name, str(dtype))


@functools.cache  # get_function looks the kernel up in the module: once is enough
def _row_function(name: str, dtype: str):
    ctype = {"float32": "float", "float64": "double"}[dtype]
    return _row_module().get_function(f"{name}<{ctype}>")
