"""The CUDA bodies of ``kernels/`` touch only their own arrays: the host-built kernel tests
run again with AddressSanitizer and UndefinedBehaviorSanitizer.

On a GPU a kernel that reads past its array reads another buffer's values, or faults and
takes the CUDA context with it; one whose index arithmetic overflows does the same far
from the cause. The host builds of the kernels (``tests/cuda_host.py``,
``tests/host_cupy.py``) run the very same bodies on NumPy arrays, which are allocated by
``malloc``: built with ``-fsanitize=address,undefined`` (``GPU_MLP_SANITIZE=1``) and the
sanitizers' runtime preloaded into Python, every access past an array's bytes and every
signed overflow stops the run with a report. This runs the kernel-level tests and the
engine's whole CuPy path on the host stand-in that way, in a subprocess -- after showing
that the setup does catch an access one element past a NumPy array.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cuda_host

ROOT = Path(__file__).resolve().parent.parent


def _runtime() -> str:
    """LD_PRELOAD for the sanitizers' runtime libraries of this g++, or a skip."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    paths = []
    for name in ("libasan.so", "libubsan.so"):
        found = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True,
                               text=True).stdout.strip()
        if not os.path.isabs(found) or not os.path.exists(found):
            pytest.skip(f"g++ has no {name}")
        paths.append(found)
    return ":".join(paths)


def _sanitized_env(preload: str) -> dict:
    return {**os.environ, "LD_PRELOAD": preload, "GPU_MLP_SANITIZE": "1",
            "ASAN_OPTIONS": "detect_leaks=0",  # (Python's own allocations are no leak)
            "UBSAN_OPTIONS": "print_stacktrace=1"}


def test_the_setup_catches_a_read_one_element_past_a_numpy_array(tmp_path):
    """The canary: a function that reads x[n] of an n-element array, built with the
    flags the kernels get and called through ctypes on a NumPy array, as the tests call
    the kernels -- the run must stop with ASan's report."""
    preload = _runtime()
    source = tmp_path / "past.cpp"
    source.write_text("extern \"C\" float past(const float* x, int n)\n"
                      "{ float s = 0; for (int i = 0; i <= n; ++i) s += x[i]; return s; }\n")
    lib = tmp_path / "past.so"
    subprocess.run(["g++", *cuda_host.HOST_FLAGS, *cuda_host.SANITIZE_FLAGS, str(source),
                    "-o", str(lib)], check=True)
    script = textwrap.dedent(f"""
        import ctypes, numpy as np
        lib = ctypes.CDLL({str(lib)!r})
        lib.past.restype = ctypes.c_float
        x = np.ones(5, np.float32)
        print("read", lib.past(x.ctypes.data_as(ctypes.c_void_p), 5))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=_sanitized_env(preload), timeout=120)
    assert done.returncode != 0 and "heap-buffer-overflow" in done.stderr, done.stderr[-2000:]
    assert "read" not in done.stdout


def test_the_kernels_run_clean_under_address_and_undefined_behaviour_sanitizers():
    """tests/test_cuda_host.py (each kernel body against its NumPy twin, wide and narrow
    rows, the noise generator) and tests/test_cupy_path_on_host.py (the engine's CuPy
    path end to end, every launch run by the host builds), sanitized: no report."""
    preload = _runtime()
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "-p", "no:xdist", "tests/test_cuda_host.py", "tests/test_cupy_path_on_host.py",
               "-k", "not nvcc"]  # (nvcc builds for the GPU: nothing to sanitize)
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env=_sanitized_env(preload), timeout=900)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    assert "Sanitizer" not in done.stderr and " passed" in done.stdout, tail
