"""Loading the CUDA C sources in ``kernels/`` and building CuPy kernels from them, lazily.

Nothing here imports CuPy until a kernel is first asked for, so ``import gpu_mlp``
works on a machine with neither a GPU nor CuPy. Every kernel of one dtype -- the row
kernels of ``rowwise.cuh`` and the elementwise ones ``gpu_mlp.ops`` generates from its
table -- is in one ``cupy.RawModule`` (:func:`module`): the headers are parsed once and
NVRTC runs once per dtype, not once per kernel, and CuPy keeps the binary in its
on-disk cache. The sources are handed to NVRTC as text, our own ``#include`` lines
resolved here, so that CuPy's cache key changes whenever a header does.
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


ROW_KERNELS = ("gm_softmax_forward", "gm_softmax_backward",
               "gm_softmax_xent_labels", "gm_softmax_xent_targets",
               # wide rows, L threads each
               "gm_wide_max", "gm_wide_exp", "gm_wide_normalize", "gm_wide_dot",
               "gm_wide_softmax_backward", "gm_wide_xent_labels", "gm_wide_xent_targets",
               "gm_wide_row_sums",
               # DP: a dense layer's per-sample squared norms
               "gm_wide_square_shares", "gm_wide_add_squares")
# The C type of each float dtype the kernels are built for.
CTYPES = {"float32": "float", "float64": "double"}
# NVRTC's options for the module (CuPy adds -ftz=true and -arch=sm_XX).
OPTIONS = ("--std=c++14",)


def module_code(kernels: str) -> str:
    """The module's source: every header (:func:`source`), then ``kernels``."""
    return source() + "\n" + kernels


@functools.cache
def module(kernels: str, names: tuple[str, ...]):
    """One ``cupy.RawModule`` of :func:`module_code` with the ``__global__`` templates
    instantiated as ``names`` say (e.g. ``"gm_softmax_forward<float>"``).

    CuPy compiles it with NVRTC once, when the first kernel is asked for, and keeps the
    binary in its on-disk cache under a key of the code, the options, the architecture,
    NVRTC's version and the sorted name expressions (``cupy/cuda/compiler.py``,
    ``_compile_with_cache_cuda``): one compilation and one cache entry per set of names.
    """
    import cupy

    return cupy.RawModule(code=module_code(kernels), options=OPTIONS, name_expressions=names)
