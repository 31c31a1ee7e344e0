"""The main job's first run on a new machine: wall time with an empty kernel cache, again
with the cache warm, and the kernels CuPy compiled in between.

Every kernel CuPy has not compiled before is compiled by NVRTC when first launched and
saved in its kernel cache (``CUPY_CACHE_DIR``, cupy/cuda/_compiler_cache.py): gpu_mlp's
one module per dtype (its ``gpu_mlp_*`` and ``gm_*`` kernels) and each CuPy ufunc,
reduction or copy the job calls on the device (``cupy_*``). This runs the job twice in a
subprocess, as a user would, with a fresh cache folder (``CUDA_CACHE_PATH`` too) and
``CUPY_CACHE_SAVE_CUDA_SOURCE=1``, then names the ``__global__`` functions of every
cached source: what a cold start compiles, and what to move into the module or drop.

    python bench/cold_start.py                                  # on a GPU: the main job
    python bench/cold_start.py -- --model cnn --optimizer adam  # another job's options
    python bench/cold_start.py --out cold.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gpu_mlp  # noqa: E402

_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)")
OURS = ("gpu_mlp_", "gm_")  # the module's kernels (ops.kernel_name, kernels/*.cuh)


def kernels_in(cache: Path) -> list[str]:
    """The ``__global__`` functions of the CUDA sources CuPy saved in ``cache``, sorted."""
    names = set()
    for source in cache.glob("*.cu"):
        names.update(_GLOBAL.findall(source.read_text(errors="replace")))
    return sorted(names)


def run_job(options: list[str], cache: Path) -> tuple[float, subprocess.CompletedProcess]:
    """``python -m gpu_mlp train --device cuda --quiet options`` with ``cache`` as CuPy's
    kernel cache: its wall seconds and the completed process."""
    env = dict(os.environ, CUPY_CACHE_DIR=str(cache), CUDA_CACHE_PATH=str(cache / "cuda"),
               CUPY_CACHE_SAVE_CUDA_SOURCE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "gpu_mlp", "train", "--device", "cuda", "--quiet",
               *options]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    return time.perf_counter() - start, done


def measure(options: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_mlp-cold-") as folder:
        cache = Path(folder)
        cold, first = run_job(options, cache)
        if first.returncode:
            raise RuntimeError(f"the job failed ({first.returncode}): {first.stderr[-2000:]}")
        kernels = kernels_in(cache)
        files = sum(1 for _ in cache.glob("*.cubin"))
        warm, second = run_job(options, cache)
        if second.returncode:
            raise RuntimeError(f"the job failed ({second.returncode}): {second.stderr[-2000:]}")
    return {"options": options, "cold_s": round(cold, 2), "warm_s": round(warm, 2),
            "compiled_modules": files,
            "module_kernels": [k for k in kernels if k.startswith(OURS)],
            "other_kernels": [k for k in kernels if not k.startswith(OURS)],
            "results": first.stdout.strip().splitlines()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the result to this JSON file")
    parser.add_argument("options", nargs="*", help="the job's options, after --")
    args = parser.parse_args(argv)
    if not gpu_mlp.gpu_available():
        print("bench/cold_start.py needs CuPy and a CUDA GPU", file=sys.stderr)
        return 2
    result = measure(args.options)
    print(f"cold {result['cold_s']} s, warm {result['warm_s']} s; "
          f"{result['compiled_modules']} modules compiled: "
          f"{len(result['module_kernels'])} of gpu_mlp's kernels and "
          f"{len(result['other_kernels'])} of CuPy's:")
    for name in result["other_kernels"]:
        print(f"  {name}")
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
