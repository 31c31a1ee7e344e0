"""Timing, memory and FLOP accounting for one training step, gpu_mlp against PyTorch.

The network of a grid point (width w, depth n, batch B) has sizes ``[w] * (n + 1)``:
n layers of width w on inputs of width w, ReLU hidden layers, an identity output and
the squared loss (summed over outputs, averaged over the batch), so the output loss is
one cheap elementwise kernel and the step is dominated by the layers. One step is
forward + backward + plain SGD. Every implementation starts from the same weights and
data, drawn on the host.

Implementations (``impl``):

* ``gpu_mlp``: ``net.train_step(X, Y, lr, check=False)`` on CuPy (``device="cuda"``)
  or NumPy (``"cpu"``), once per memory mode.
* ``torch``: PyTorch eager, ``nn.Sequential`` of ``nn.Linear`` + ``nn.ReLU`` with
  ``torch.optim.SGD``, same device, dtype and TF32 setting.
* ``torch.compile``: ``torch.compile`` (default mode) of that same step function.
* ``gemm``: the GEMM-only bound, the step's GEMMs alone through ``gpu_mlp.ops.gemm``
  into preallocated buffers (the same cuBLAS or SciPy BLAS calls): forward
  ``F_{k-1} W_k^T`` per layer, ``Delta_k W_k`` for layers 2..n and the update
  ``W_k -= lr Delta_k^T F_{k-1}`` per layer. No implementation of this design can
  beat it.

Timing: warm-up steps first (they compile CUDA kernels and torch.compile graphs), then
``time.perf_counter`` around each step with a device synchronisation inside the timed
region, the Python garbage collector off; the median and the quartiles of the repeats.

Peak memory, bytes held during one steady-state step, parameters and data included:
CuPy's memory pool (``free_all_blocks`` before the step, ``total_bytes`` after it; the
pool only grows within a step, so this is the peak it held), PyTorch's
``max_memory_allocated`` after ``reset_peak_memory_stats``, and on the CPU
``tracemalloc``'s peak for the NumPy engine, rebuilt under tracing. PyTorch's CPU
allocations are invisible to tracemalloc, so torch-cpu memory is not measured.
"""

from __future__ import annotations

import gc
import os
import platform
import shlex
import subprocess
import sys
import time
import tracemalloc
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import numpy as np

import gpu_mlp
from gpu_mlp import device as _device
from gpu_mlp import ops

SCHEMA = "gpu_mlp-bench/1"
IMPLS = ("gpu_mlp", "torch", "torch.compile", "gemm")
LR = 1e-5  # small enough that the weights barely move over hundreds of timed steps
MIN_REPEATS = 5
NETWORK = ("sizes [w] * (depth + 1): depth layers of width w on inputs of width w; "
           "ReLU hidden, identity output; squared loss ((out - y)**2).sum(1).mean(); "
           f"one step = forward + backward + SGD (lr={LR})")
FLOPS = ("6 * B * sum_k d_{k-1} d_k per step (2 for the forward GEMM, 2 for the input "
         "gradient, 2 for the weight gradient of each layer); it counts layer 1's input "
         "gradient, which no implementation computes")
_CUBLAS_DEFAULT_MATH, _CUBLAS_TF32_TENSOR_OP_MATH = 0, 3  # cublas_api.h's cublasMath_t


@dataclass(frozen=True)
class Point:
    width: int
    depth: int
    batch: int

    @property
    def sizes(self) -> list[int]:
        return [self.width] * (self.depth + 1)

    @property
    def flops(self) -> int:
        s = self.sizes
        return 6 * self.batch * sum(a * b for a, b in zip(s[:-1], s[1:]))

    def __str__(self) -> str:
        return f"w{self.width}-d{self.depth}-B{self.batch}"


@dataclass(frozen=True)
class Task:
    device: str             # "cuda" or "cpu"
    impl: str               # one of IMPLS
    mode: Optional[str]     # gpu_mlp's memory mode, None for the others
    point: Point

    @property
    def label(self) -> str:
        return label(self.device, self.impl, self.mode)

    @property
    def key(self) -> tuple:
        return (self.device, self.impl, self.mode, self.point.width, self.point.depth,
                self.point.batch)


@dataclass(frozen=True)
class Settings:
    dtype: str = "float32"
    warmup: int = 3
    repeats: int = 100     # at most; fewer once max_time has passed (never below MIN_REPEATS)
    max_time: float = 1.0  # seconds of timed steps per task


@dataclass
class Case:
    """One implementation built for one grid point, ready to step."""

    step: Callable[[], object]
    sync: Callable[[], None]
    memory: Optional[str]   # how its peak memory is measured: "cupy", "torch-cuda", "tracemalloc"
    workspace: object = None  # gpu_mlp's training Workspace, when there is one
    weights: Optional[Callable[[], list]] = None  # the current [(W, b)] as NumPy, for checks


def label(device: str, impl: str, mode: Optional[str] = None) -> str:
    """The row name: ``gpu_mlp-cupy[output]``, ``torch-cuda``, ``gemm-numpy``, ..."""
    backend = "cupy" if device == "cuda" else "numpy"
    if impl == "gpu_mlp":
        return f"gpu_mlp-{backend}[{mode}]"
    if impl == "gemm":
        return f"gemm-bound-{backend}"
    return f"{impl}-{device}"


def default_impls(device: str) -> tuple[str, ...]:
    # torch.compile on the CPU needs a C++ toolchain and long compiles: only on request
    return IMPLS if device == "cuda" else ("gpu_mlp", "torch", "gemm")


def tasks(devices, impls, modes, points) -> list[Task]:
    """Every (device, point, implementation), cheapest points first, torch eager first
    within a point so that ratios fill in as the run goes."""
    order = {"torch": 0, "gpu_mlp": 1, "torch.compile": 2, "gemm": 3}
    out = []
    for device in devices:
        chosen = sorted(impls or default_impls(device), key=order.__getitem__)
        for point in sorted(points, key=lambda p: (p.flops, p.batch, p.depth)):
            for impl in chosen:
                for mode in (modes if impl == "gpu_mlp" else (None,)):
                    out.append(Task(device, impl, mode, point))
    return out


# --- configuration ----------------------------------------------------------------------

def configure(threads: int, tf32: bool) -> None:
    """Thread count for PyTorch on the CPU and the TF32 switch of both libraries on the GPU.

    The BLAS thread count of NumPy/SciPy and ``CUPY_TF32`` are read when those libraries
    load, so ``bench/run.py`` sets them in the environment before importing anything.
    ``CUPY_TF32`` reaches ``cupy.matmul``; gpu_mlp's GEMMs go through ``cupy.cublas``
    (cublasSgemm), which follows the cuBLAS handle's math mode, set here.
    """
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if gpu_mlp.gpu_available():
        import cupy

        mode = _CUBLAS_TF32_TENSOR_OP_MATH if tf32 else _CUBLAS_DEFAULT_MATH
        try:
            cupy.cuda.cublas.setMathMode(cupy.cuda.device.get_cublas_handle(), mode)
        except Exception as exc:  # the run goes on; the JSON records the mode in force
            warnings.warn(f"could not set the cuBLAS math mode of CuPy's handle: {exc!r}")


def environment(devices, threads: int, tf32: bool) -> dict:
    """Where and with what the numbers were taken."""
    import scipy

    env = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": {"requested": threads,
                    **{v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                      "MKL_NUM_THREADS")}},
        "tf32": tf32,
        "CUPY_TF32": os.environ.get("CUPY_TF32"),
        "command": shlex.join(sys.orig_argv),
        "cwd": os.getcwd(),
        "versions": {"gpu_mlp": gpu_mlp.__version__, "numpy": np.__version__,
                     "scipy": scipy.__version__, "torch": None, "cupy": None},
    }
    try:
        import torch

        env["versions"]["torch"] = torch.__version__
        env["threads"]["torch"] = torch.get_num_threads()
        env["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
        env["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    if "cuda" in devices:
        env["gpu"] = _gpu_environment()
        env["versions"]["cupy"] = env["gpu"]["cupy"]
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _gpu_environment() -> dict:
    import cupy

    runtime = cupy.cuda.runtime
    props = runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    gpu = {
        "name": name.decode() if isinstance(name, bytes) else name,
        "compute_capability": cupy.cuda.Device().compute_capability,
        "memory_bytes": int(props["totalGlobalMem"]),
        "cuda_driver_api": runtime.driverGetVersion(),
        "cuda_runtime": runtime.runtimeGetVersion(),
        "cupy": cupy.__version__,
        "cublas_math_mode": None,
        "driver": None,
    }
    try:  # 0: default (FP32), 3: TF32 tensor ops
        gpu["cublas_math_mode"] = cupy.cuda.cublas.getMathMode(
            cupy.cuda.device.get_cublas_handle())
    except Exception as exc:
        gpu["cublas_math_mode"] = repr(exc)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
        gpu["driver"] = out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass  # no nvidia-smi on the PATH: the driver API version above still identifies it
    return gpu


# --- building each implementation -------------------------------------------------------

@lru_cache(maxsize=1)
def problem(point: Point, dtype: str):
    """Host weights ``[(W, b)]`` and data ``(X, Y)`` of a grid point, shared by every
    implementation (gpu_mlp's own initialisation, seed 0)."""
    net = gpu_mlp.MLP(point.sizes, activations="relu", output="identity", loss="squared",
                      device="cpu", dtype=dtype, seed=0)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((point.batch, point.width)).astype(dtype)
    Y = rng.standard_normal((point.batch, point.width)).astype(dtype)
    return net.params, X, Y


def build(task: Task, dtype: str) -> Case:
    """The implementation of ``task``, with its own copy of the weights and data."""
    params, X, Y = problem(task.point, dtype)
    if task.impl == "gpu_mlp":
        return _gpu_mlp_case(task, params, X, Y)
    if task.impl in ("torch", "torch.compile"):
        return _torch_case(task, params, X, Y, compiled=task.impl == "torch.compile")
    if task.impl == "gemm":
        return _gemm_case(task, params, X)
    raise ValueError(f"unknown implementation {task.impl!r}; valid: {', '.join(IMPLS)}")


def _sync_for(device: str) -> Callable[[], None]:
    if device == "cuda":
        import cupy

        return cupy.cuda.Device().synchronize
    return lambda: None


def _gpu_mlp_case(task, params, X, Y) -> Case:
    depth = task.point.depth
    net = gpu_mlp.MLP.from_params(params, ["relu"] * (depth - 1) + ["identity"],
                                  loss="squared", memory=task.mode, device=task.device)
    _, xp = _device.resolve(task.device)
    X, Y = xp.array(X), xp.array(Y)  # copies: the data count in this case's memory

    def step():
        return net.train_step(X, Y, LR, check=False)

    def weights():
        return [(_device.to_numpy(W), _device.to_numpy(b)) for W, b in net.params]

    return Case(step, _sync_for(task.device),
                memory="cupy" if task.device == "cuda" else "tracemalloc",
                workspace=net.training_workspace, weights=weights)


def _torch_case(task, params, X, Y, compiled: bool) -> Case:
    import torch

    dev = torch.device(task.device)
    layers = []
    for k, (W, b) in enumerate(params):
        linear = torch.nn.Linear(W.shape[1], W.shape[0], device=dev,
                                 dtype=getattr(torch, W.dtype.name))
        with torch.no_grad():  # torch's weight layout (out, in) is gpu_mlp's
            linear.weight.copy_(torch.from_numpy(W))
            linear.bias.copy_(torch.from_numpy(b))
        layers.append(linear)
        if k < len(params) - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    Xt, Yt = torch.tensor(X, device=dev), torch.tensor(Y, device=dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = ((model(Xt) - Yt) ** 2).sum(1).mean()
        loss.backward()
        optimizer.step()
        return loss

    if compiled:
        # a fresh cache per grid point: past dynamo's recompile limit, a step function
        # recompiled for new shapes would silently run eager
        torch._dynamo.reset()
        step = torch.compile(step)

    def weights():
        return [(m.weight.detach().cpu().numpy(), m.bias.detach().cpu().numpy())
                for m in model if isinstance(m, torch.nn.Linear)]

    if task.device == "cuda":
        return Case(step, torch.cuda.synchronize, memory="torch-cuda", weights=weights)
    return Case(step, lambda: None, memory=None, weights=weights)


def _gemm_case(task, params, X) -> Case:
    _, xp = _device.resolve(task.device)
    rng = np.random.default_rng(2)
    B = task.point.batch
    W = [xp.array(Wk) for Wk, _ in params]
    updated = [xp.array(Wk) for Wk, _ in params]  # the update target: W stays as drawn
    F = [xp.array(X)] + [xp.empty((B, Wk.shape[0]), dtype=Wk.dtype) for Wk in W]
    # finite stand-ins for the deltas: what the GEMMs read matters, not what it means
    deltas = [xp.array(rng.standard_normal(Fk.shape).astype(X.dtype)) for Fk in F[1:]]
    grads = {k: xp.empty_like(F[k]) for k in range(1, len(W))}  # layer 1 needs none

    def step():
        for k, Wk in enumerate(W):
            ops.gemm("N", "T", F[k], Wk, F[k + 1])
        for k in reversed(range(len(W))):
            if k > 0:
                ops.gemm("N", "N", deltas[k], W[k], grads[k])
            ops.gemm("T", "N", deltas[k], F[k], updated[k], alpha=-LR, beta=1.0)

    return Case(step, _sync_for(task.device), memory=None)


# --- measuring --------------------------------------------------------------------------

def time_steps(step, sync, warmup: int, repeats: int, max_time: float) -> tuple[list, float]:
    """Seconds per step for up to ``repeats`` steps after ``warmup`` untimed ones.

    Returns ``(times, warmup_seconds)``. Timing stops early once ``max_time`` seconds of
    timed steps have passed, but never before ``MIN_REPEATS`` steps.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_seconds = time.perf_counter() - start
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(times) < max(repeats, MIN_REPEATS):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
            if len(times) >= MIN_REPEATS and sum(times) >= max_time:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, warmup_seconds


def peak_memory(case: Case, task: Task, settings: Settings) -> Optional[int]:
    """Bytes held at the peak of one steady-state step (None where not measurable)."""
    if case.memory == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        case.sync()
        gc.collect()
        pool.free_all_blocks()  # what remains is in use: weights, data, workspace
        case.step()
        case.sync()
        return int(pool.total_bytes())
    if case.memory == "torch-cuda":
        import torch

        case.sync()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        case.step()
        case.sync()
        return int(torch.cuda.max_memory_allocated())
    if case.memory == "tracemalloc":
        # tracemalloc sees only what is allocated while it runs: build a fresh case
        tracemalloc.start()
        try:
            fresh = build(task, settings.dtype)
            fresh.step()
            tracemalloc.reset_peak()
            fresh.step()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return None


def _release(device: str) -> None:
    """Hand the GPU memory of finished cases back, so that each task starts clean."""
    if device != "cuda":
        return
    gc.collect()  # torch.compile's and CuPy's objects can sit in reference cycles
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


def measure(task: Task, settings: Settings) -> dict:
    """One record: the timing and memory of ``task``, or the error it raised."""
    point = task.point
    record = {
        "device": task.device, "impl": task.impl, "mode": task.mode, "label": task.label,
        "width": point.width, "depth": point.depth, "batch": point.batch,
        "flops": point.flops, "status": "ok", "error": None,
        "time_s": None, "tflops": None, "peak_bytes": None, "peak_method": None,
        "workspace_peak_bytes": None,
        "ratio_to_torch": None, "ratio_to_gemm_bound": None, "memory_ratio_to_torch": None,
    }
    try:
        case = build(task, settings.dtype)
        times, warmup_seconds = time_steps(case.step, case.sync, settings.warmup,
                                           settings.repeats, settings.max_time)
        q1, median, q3 = (float(q) for q in np.percentile(times, [25, 50, 75]))
        record["time_s"] = {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1,
                            "min": float(min(times)), "repeats": len(times),
                            "warmup": settings.warmup, "warmup_total": warmup_seconds}
        record["tflops"] = point.flops / median / 1e12
        record["peak_bytes"] = peak_memory(case, task, settings)
        record["peak_method"] = {"cupy": "cupy memory pool total_bytes",
                                 "torch-cuda": "torch.cuda.max_memory_allocated",
                                 "tracemalloc": "tracemalloc peak"}.get(case.memory)
        if case.workspace is not None:
            record["workspace_peak_bytes"] = int(case.workspace.peak_in_use_bytes)
    except Exception as exc:  # one implementation failing must not stop the grid
        message = str(exc).strip().splitlines()
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {message[0] if message else ''}"[:500]
    finally:
        case = None  # the last reference: its GPU memory can go back now
        _release(task.device)
    return record


def key(record: dict) -> tuple:
    return (record["device"], record["impl"], record["mode"], record["width"],
            record["depth"], record["batch"])


def add_ratios(records: list[dict]) -> None:
    """Fill in each record's ratios to torch eager and to the GEMM-only bound at the same
    device and point (None where either side is missing or failed)."""
    base = {}
    for r in records:
        if r["status"] == "ok" and r["impl"] in ("torch", "gemm"):
            base[(r["impl"], r["device"], r["width"], r["depth"], r["batch"])] = r
    for r in records:
        point = (r["device"], r["width"], r["depth"], r["batch"])
        torch_r, gemm_r = base.get(("torch",) + point), base.get(("gemm",) + point)
        ok = r["status"] == "ok"
        r["ratio_to_torch"] = (r["time_s"]["median"] / torch_r["time_s"]["median"]
                               if ok and torch_r else None)
        r["ratio_to_gemm_bound"] = (r["time_s"]["median"] / gemm_r["time_s"]["median"]
                                    if ok and gemm_r else None)
        r["memory_ratio_to_torch"] = (r["peak_bytes"] / torch_r["peak_bytes"]
                                      if ok and torch_r and r["peak_bytes"]
                                      and torch_r["peak_bytes"] else None)
