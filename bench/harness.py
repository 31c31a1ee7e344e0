"""Timing, memory and FLOP accounting for one training step, gpu_mlp against PyTorch.

Two grids (``model``), one harness: every point describes its network as a list of
:mod:`gpu_mlp.layers`, and everything below -- the implementations, the timing, the
memory, the FLOP count, the records -- works from that list alone.

* ``"mlp"`` (:class:`Point`, width w, depth n, batch B): sizes ``[w] * (n + 1)``, n
  layers of width w on inputs of width w, ReLU hidden layers, an identity output and
  the squared loss (summed over outputs, averaged over the batch), so the output loss
  is one cheap elementwise kernel and the step is dominated by the layers.
* ``"conv"`` (:class:`ConvPoint`, input (c, h, w), channels ch, depth n, batch B): n
  3x3 convolutions (padding 1; stride 1, 2, 1, 2, ...) of ch channels with ReLU on NCHW
  images, then a Dense layer from the flattened maps to 10 classes (identity output)
  and the softmax cross-entropy against integer labels, averaged over the batch.

One step is forward + backward + plain SGD. Every implementation starts from the same
weights and data, drawn on the host.

Implementations (``impl``):

* ``gpu_mlp``: ``net.train_step(X, Y, lr, check=False)`` on CuPy (``device="cuda"``)
  or NumPy (``"cpu"``), once per memory mode.
* ``torch``: PyTorch eager, ``nn.Sequential`` of ``nn.Linear`` (``nn.Conv2d``,
  ``nn.Flatten``) + ``nn.ReLU`` with ``torch.optim.SGD``, same device, dtype and TF32
  setting (``allow_tf32`` of both cuBLAS and cuDNN); the loss is the same expression
  (``F.cross_entropy`` for the softmax cross-entropy).
* ``torch.compile``: ``torch.compile`` (default mode) of that same step function.
* ``torch.graph`` (CUDA only): that same step captured once into a
  ``torch.cuda.CUDAGraph`` as PyTorch's CUDA notes do it ("whole-network capture"):
  warm-up steps on a side stream, ``zero_grad(set_to_none=True)``, capture of forward,
  loss, backward and ``optimizer.step()`` under ``torch.cuda.graph``; a step copies the
  batch into the static input and target tensors and replays the graph, and the loss
  stays in a static tensor. The optimizer is plain SGD (no state); one with state
  would be built ``capturable=True`` (:func:`graph_optimizer`). The weights are put
  back after the capture, so it starts from the same weights as the others. The
  least launch overhead a PyTorch user can have without leaving PyTorch.
* ``gemm``: the GEMM-only bound, the step's GEMMs alone through ``gpu_mlp.ops.gemm``
  into preallocated buffers (the same cuBLAS or SciPy BLAS calls, on the same shapes):
  forward ``rows(F_{k-1}) W_k^T`` per layer, ``Delta_k W_k`` for layers 2..n and the
  update ``W_k -= lr Delta_k^T rows(F_{k-1})`` per layer, where ``rows`` is the identity
  for a Dense layer and im2col for a convolution (one row per sample and output
  position). No implementation of this design can beat it; for a convolution it leaves
  out im2col, col2im and the NCHW <-> rows transposes.

Timing: warm-up steps first (they compile CUDA kernels and torch.compile graphs), then
``time.perf_counter`` around each step with a device synchronisation inside the timed
region, the Python garbage collector off; the median and the quartiles of the repeats.

GPU busy fraction (every CUDA implementation): a further ``BUSY_STEPS`` steps, each
followed by the device synchronisation as when timed, under ``torch.profiler`` with
``ProfilerActivity.CUDA`` only (its CUPTI trace sees CuPy's kernels and cuBLAS calls as
well as PyTorch's, and the kernels of a graph replay); the union of the device
intervals (kernels, memcpy, memset) over the window's wall time (``time.perf_counter``
around those steps). Below 1, the GPU waits for the host: launch overhead.

Peak memory, bytes held during one steady-state step, parameters and data included:
CuPy's memory pool (``free_all_blocks`` before the step, ``total_bytes`` after it; the
pool only grows within a step, so this is the peak it held), PyTorch's
``max_memory_allocated`` after ``reset_peak_memory_stats`` (for ``torch.graph``: over
the capture, whose allocations the replays reuse), and on the CPU
``tracemalloc``'s peak for the NumPy engine, rebuilt under tracing. PyTorch's CPU
allocations are invisible to tracemalloc, so torch-cpu memory is not measured.
"""

from __future__ import annotations

import functools
import gc
import math
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
from gpu_mlp.conv import shifted_taps
from gpu_mlp.layers import SHIFTED_ADJOINT_MAX, SHIFTED_FORWARD_MAX, Conv2d
from gpu_mlp.workspace import Workspace

SCHEMA = "gpu_mlp-bench/1"  # records without "model" and "input" are "mlp" ones
IMPLS = ("gpu_mlp", "torch", "torch.compile", "torch.graph", "gemm")
MODELS = ("mlp", "conv")
LR = 1e-5  # small enough that the weights barely move over hundreds of timed steps
MIN_REPEATS = 5
BUSY_STEPS = 20  # steps profiled for the GPU busy fraction (at most --repeats)
GRAPH_WARMUP = 3  # eager steps on a side stream before the capture, as PyTorch's notes
NETWORK = ("sizes [w] * (depth + 1): depth layers of width w on inputs of width w; "
           "ReLU hidden, identity output; squared loss ((out - y)**2).sum(1).mean(); "
           f"one step = forward + backward + SGD (lr={LR})")
FLOPS = ("6 * B * sum_k d_{k-1} d_k per step (2 for the forward GEMM, 2 for the input "
         "gradient, 2 for the weight gradient of each layer); it counts layer 1's input "
         "gradient, which no implementation computes")
CLASSES = 10
CONV_NETWORK = ("depth 3x3 convolutions of `width` channels (padding 1, stride 1, 2, 1, "
                f"2, ...) with ReLU, then Dense to {CLASSES} classes; NCHW images of shape "
                "`input`; the Dense layer takes the flattened maps, identity output; softmax "
                "cross-entropy against integer labels, averaged over the batch "
                f"(F.cross_entropy); one step = forward + backward + SGD (lr={LR})")
CONV_FLOPS = ("6 * sum_k B P_k K_k c_k per step, P_k output positions and c_k output "
              "channels of layer k, K_k = c_{k-1} * 3 * 3 (the Dense head: P = 1, K = its "
              "inputs): the GEMMs on im2col rows, as for the MLP; im2col, col2im, "
              "transposes and elementwise work are not counted; it counts layer 1's input "
              "gradient, which no implementation computes")
DESCRIPTION = {"mlp": (NETWORK, FLOPS), "conv": (CONV_NETWORK, CONV_FLOPS)}
_CUBLAS_DEFAULT_MATH, _CUBLAS_TF32_TENSOR_OP_MATH = 0, 3  # cublas_api.h's cublasMath_t


class _Grid:
    """What every grid point has, from its ``layers()`` alone: the per-layer GEMM
    shapes, the FLOP count, the record fields and the key."""

    # subclasses have: model, loss, width, depth, batch (no defaults here: a dataclass
    # would take a base class's attribute for its field's default)

    def layers(self) -> list:
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple:
        raise NotImplementedError

    def gemm_shapes(self) -> list[tuple[int, int, int]]:
        """``[(M_k, K_k, d_k)]``: layer k's GEMMs work on rows (M_k, K_k) of its input,
        one per sample and output position, and weights (d_k, K_k)."""
        shapes, shape = [], self.input_shape
        for layer in self.layers():
            shapes.append((self.batch * layer.positions(shape), layer.fan_in,
                           layer.weight_shape[0]))
            shape = layer.output_shape(shape)
        return shapes

    @property
    def flops(self) -> int:
        return 6 * sum(m * k * d for m, k, d in self.gemm_shapes())

    def fields(self) -> dict:
        """The point's fields of a record."""
        return {"model": self.model, "input": list(self.input_shape), "width": self.width,
                "depth": self.depth, "batch": self.batch}

    @property
    def key(self) -> tuple:
        return (self.model, tuple(self.input_shape), self.width, self.depth, self.batch)

    def targets(self, rng, dtype: str):
        raise NotImplementedError


@dataclass(frozen=True)
class Point(_Grid):
    """A point of the MLP grid: ``depth`` Dense layers of width ``width``."""

    width: int
    depth: int
    batch: int
    model = "mlp"
    loss = "squared"

    @property
    def sizes(self) -> list[int]:
        return [self.width] * (self.depth + 1)

    @property
    def input_shape(self) -> tuple:
        return (self.width,)

    def layers(self) -> list:
        s = self.sizes
        return [gpu_mlp.layers.Dense(a, b, "relu" if k < self.depth - 1 else "identity")
                for k, (a, b) in enumerate(zip(s[:-1], s[1:]))]

    def targets(self, rng, dtype: str):
        return rng.standard_normal((self.batch, self.width)).astype(dtype)

    def __str__(self) -> str:
        return f"w{self.width}-d{self.depth}-B{self.batch}"


@dataclass(frozen=True)
class ConvPoint(_Grid):
    """A point of the convolution grid: ``depth`` 3x3 convolutions (padding 1, stride
    1 then 2, alternating) of ``channels`` channels with ReLU on NCHW images of shape
    ``input`` (c, h, w), then a Dense layer to 10 classes and the softmax cross-entropy.
    Its record's ``width`` is ``channels``."""

    input: tuple[int, int, int]
    channels: int
    depth: int
    batch: int
    model = "conv"
    loss = "softmax_cross_entropy"

    @property
    def input_shape(self) -> tuple:
        return tuple(self.input)

    @property
    def width(self) -> int:
        return self.channels

    def layers(self) -> list:
        """The layers; a ValueError if the images shrink to nothing."""
        from gpu_mlp.layers import Conv2d, Dense

        layers, shape = [], self.input_shape
        for k in range(self.depth):
            layers.append(Conv2d(shape[0], self.channels, 3, stride=1 + k % 2, padding=1))
            shape = layers[-1].output_shape(shape)
        return layers + [Dense(int(np.prod(shape)), CLASSES, "identity")]

    def targets(self, rng, dtype: str):
        return rng.integers(0, CLASSES, size=self.batch)  # int64 labels

    def __str__(self) -> str:
        return f"{'x'.join(map(str, self.input))}-c{self.channels}-d{self.depth}-B{self.batch}"


def point_of(record: dict) -> _Grid:
    """The grid point of a record (one without ``model`` is an MLP record)."""
    if record.get("model", "mlp") == "conv":
        return ConvPoint(tuple(record["input"]), record["width"], record["depth"],
                         record["batch"])
    return Point(record["width"], record["depth"], record["batch"])


@dataclass(frozen=True)
class Task:
    device: str             # "cuda" or "cpu"
    impl: str               # one of IMPLS
    mode: Optional[str]     # gpu_mlp's memory mode, None for the others
    point: _Grid

    @property
    def label(self) -> str:
        return label(self.device, self.impl, self.mode)

    @property
    def key(self) -> tuple:
        return (self.device, self.impl, self.mode) + self.point.key


# On the CPU a library's idle threads spin for a while after its last call, on the cores
# the next case wants: OpenBLAS's for 2^28 cycles (about 0.1 s), PyTorch's OpenMP threads
# too. A PyTorch convolution within 50 ms of SciPy's GEMMs took 8-9x its time on the 2-core
# box, 0.1 s later its own; a SciPy GEMM right after PyTorch's 1.3x (bench/settle.py).
# So each CPU case sleeps this long before its warm-up (bench/README.md, "Cases in turn").
CPU_SETTLE_S = 0.3


@dataclass(frozen=True)
class Settings:
    dtype: str = "float32"
    warmup: int = 3
    repeats: int = 100     # at most; fewer once max_time has passed (never below MIN_REPEATS)
    max_time: float = 1.0  # seconds of timed steps per task
    settle: float = 0.0    # seconds a CPU case sleeps before its warm-up (CPU_SETTLE_S)


@dataclass
class Case:
    """One implementation built for one grid point, ready to step."""

    step: Callable[[], object]
    sync: Callable[[], None]
    memory: Optional[str]   # how its peak memory is measured: "cupy", "torch-cuda", "tracemalloc"
    workspace: object = None  # gpu_mlp's training Workspace, when there is one
    capture_peak: Optional[int] = None  # torch.graph: max_memory_allocated over the capture
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


def skip_reason(device: str, impl: str, requested: bool) -> Optional[str]:
    """Why ``impl`` does not run on ``device`` (None: it runs); ``requested``: named in
    ``--impls``."""
    if impl == "torch.graph" and device != "cuda":
        return "CUDA graphs need a CUDA device"
    if impl == "torch.compile" and device != "cuda" and not requested:
        return "on the CPU only on request (--impls): needs a C++ toolchain, long compiles"
    return None


def skipped(devices, impls) -> dict[str, str]:
    """``{label: reason}`` of every implementation a run leaves out."""
    return {label(device, impl): reason for device in devices
            for impl in (impls or IMPLS) if impl != "gpu_mlp"
            and (reason := skip_reason(device, impl, requested=impls is not None))}


def tasks(devices, impls, modes, points) -> list[Task]:
    """Every (device, point, implementation), cheapest points first, torch eager and the
    graphed step first within a point so that ratios fill in as the run goes; what
    :func:`skip_reason` names is left out."""
    order = {"torch": 0, "torch.graph": 1, "gpu_mlp": 2, "torch.compile": 3, "gemm": 4}
    out = []
    for device in devices:
        chosen = sorted((i for i in impls or default_impls(device)
                         if not skip_reason(device, i, requested=impls is not None)),
                        key=order.__getitem__)
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
    ``CUPY_TF32`` reaches ``cupy.matmul`` and gpu_mlp's own cuBLAS handles (made TF32
    where it or CuPy's handle's math mode asks, ``gpu_mlp.cublas``); CuPy's handle's math
    mode is set here too.
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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def repo_path(path) -> str:
    """``path`` as results record it: relative to the repository root when inside it
    (``"."`` for the root), else its last component -- never a machine's own path."""
    full = os.path.abspath(path)
    if _in_repo(full):
        return os.path.relpath(full, ROOT).replace(os.sep, "/")
    return os.path.basename(full)


def _in_repo(path) -> bool:
    return os.path.commonpath([os.path.abspath(path), ROOT]) == ROOT


def portable_command(argv) -> str:
    """``argv`` as a shell line that names no path of the machine: the program (the
    interpreter, ``mpirun``) by its basename, an absolute path (also an ``--opt=PATH``
    value) through :func:`repo_path`; relative arguments stay relative to the ``cwd``
    recorded beside them."""
    words = []
    for i, word in enumerate(map(str, argv)):
        option, eq, value = word.partition("=") if word.startswith("-") else ("", "", word)
        if i == 0 or word == sys.executable:
            word = os.path.basename(word)
        elif os.path.isabs(value):
            word = option + eq + repo_path(value)
        words.append(word)
    return shlex.join(words)


def environment(devices, threads: int, tf32: bool, out=None) -> dict:
    """Where and with what the numbers were taken; ``out``: the folder the results go to.
    Paths are recorded relative to the repository (see :func:`portable_command`)."""
    import scipy

    env = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": {"requested": threads,
                    **{v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                      "MKL_NUM_THREADS")}},
        "blas": blas_kernels(),
        "tf32": tf32,
        "CUPY_TF32": os.environ.get("CUPY_TF32"),
        "command": portable_command(sys.orig_argv),
        "cwd": repo_path(os.getcwd()) if _in_repo(os.getcwd()) else "outside the repository",
        "out": None if out is None else repo_path(out),
        "versions": {"gpu_mlp": gpu_mlp.__version__, "numpy": np.__version__,
                     "scipy": scipy.__version__, "torch": None, "cupy": None},
    }
    try:
        import torch

        env["versions"]["torch"] = torch.__version__
        env["threads"]["torch"] = torch.get_num_threads()
        env["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
        # what PyTorch's convolutions run on: cuDNN on the GPU, oneDNN (mkldnn) on the CPU
        env["torch_conv"] = {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                             "cudnn_benchmark": torch.backends.cudnn.benchmark,
                             "mkldnn": torch.backends.mkldnn.is_available()}
        env["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    if "cuda" in devices:
        env["gpu"] = _gpu_environment()
        env["versions"]["cupy"] = env["gpu"]["cupy"]
    return env


def _sources_digest(*folders: tuple[str, str]) -> str:
    """SHA-256 of the files of ``(folder, suffix)`` pairs, by name, in order."""
    import hashlib

    digest = hashlib.sha256()
    for folder, suffix in folders:
        path = os.path.join(ROOT, folder)
        for name in sorted(os.listdir(path)):
            if name.endswith(suffix):
                with open(os.path.join(path, name), "rb") as f:
                    digest.update(f"{folder}/{name}".encode() + b"\0" + f.read())
    return digest.hexdigest()


def source_state() -> dict:
    """The git commit of the checkout and digests of the sources as measured (the
    working tree may differ from the commit): gpu_mlp's Python, and everything a
    measurement runs -- that, its CUDA kernels and the bench's own code."""
    state = {"sha256_of_gpu_mlp_py": _sources_digest(("gpu_mlp", ".py")),
             "sha256_of_measured_sources": _sources_digest(
                 ("gpu_mlp", ".py"), ("kernels", ".cuh"), ("bench", ".py")),
             "commit": None, "dirty": None}
    try:
        git = ["git", "-C", ROOT]
        state["commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True,
                                         text=True, check=True).stdout.strip()
        state["dirty"] = bool(subprocess.run(git + ["status", "--porcelain", "gpu_mlp",
                                                    "kernels", "bench/*.py"],
                                             capture_output=True, text=True,
                                             check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def blas_kernels() -> dict:
    """Which kernels NumPy's and SciPy's BLAS run, and the variables that force them.
    ``OPENBLAS_CORETYPE`` picks one processor's kernels whatever the CPU (some machines
    set it, with ``OPENBLAS_L2_SIZE``, for older OpenBLAS builds): forced Haswell on an
    AVX-512 CPU runs a large float32 GEMM at half the speed, which a comparison with
    PyTorch's oneDNN would charge to gpu_mlp. ``libraries``: threadpoolctl's view (the
    ``torch`` extra brings it), None without it."""
    from bench import BLAS_FORCING

    forced = {v: os.environ.get(v) for v in BLAS_FORCING}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"forced_by": forced, "libraries": None}
    libraries = [{"library": os.path.basename(i["filepath"]), "api": i["internal_api"],
                  "version": i.get("version"), "architecture": i.get("architecture"),
                  "threads": i["num_threads"]}
                 for i in threadpool_info() if i["user_api"] == "blas"]
    return {"forced_by": forced, "libraries": libraries}


def describe_blas(blas: dict | None) -> str:
    """One line for a report: the kernels each BLAS ran, and what forced them."""
    if not blas:
        return "not recorded"
    libraries = blas.get("libraries")
    text = ("; ".join(f"{lib['api']} {lib['version']} {lib['architecture']} kernels "
                      f"({lib['library']})" for lib in libraries)
            if libraries else "unknown (no threadpoolctl)")
    forced = [f"{k}={v}" for k, v in blas.get("forced_by", {}).items() if v is not None]
    return text + (f"; forced by {', '.join(forced)}" if forced else "; as detected")


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
def problem(point: _Grid, dtype: str):
    """Host weights ``[(W, b)]`` and data ``(X, Y)`` of a grid point, shared by every
    implementation (gpu_mlp's own initialisation, seed 0)."""
    net = gpu_mlp.Network(point.layers(), loss=point.loss, device="cpu", dtype=dtype, seed=0)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((point.batch, *point.input_shape)).astype(dtype)
    return net.params, X, point.targets(rng, dtype)


def build(task: Task, dtype: str) -> Case:
    """The implementation of ``task``, with its own copy of the weights and data."""
    params, X, Y = problem(task.point, dtype)
    if task.impl == "gpu_mlp":
        return _gpu_mlp_case(task, params, X, Y)
    if task.impl in ("torch", "torch.compile"):
        return _torch_case(task, params, X, Y, compiled=task.impl == "torch.compile")
    if task.impl == "torch.graph":
        reason = skip_reason(task.device, task.impl, requested=True)
        if reason:
            raise ValueError(f"torch.graph on {task.device}: {reason}")
        return _torch_graph_case(task, params, X, Y)
    if task.impl == "gemm":
        return _gemm_case(task, params, X)
    raise ValueError(f"unknown implementation {task.impl!r}; valid: {', '.join(IMPLS)}")


def _sync_for(device: str) -> Callable[[], None]:
    if device == "cuda":
        import cupy

        return cupy.cuda.Device().synchronize
    return lambda: None


def _gpu_mlp_case(task, params, X, Y) -> Case:
    net = gpu_mlp.Network.from_params(task.point.layers(), params, loss=task.point.loss,
                                      memory=task.mode, device=task.device)
    _, xp = _device.resolve(task.device)
    X, Y = xp.array(X), xp.array(Y)  # copies: the data count in this case's memory

    def step():
        return net.train_step(X, Y, LR, check=False)

    def weights():
        return [(_device.to_numpy(W), _device.to_numpy(b)) for W, b in net.params]

    return Case(step, _sync_for(task.device),
                memory="cupy" if task.device == "cuda" else "tracemalloc",
                workspace=net.training_workspace, weights=weights)


_TORCH_ACTIVATIONS = {"relu": "ReLU", "identity": None}


def torch_module(layers, params, device: str):
    """``nn.Sequential`` of ``layers`` holding ``params`` (copied): ``nn.Conv2d`` and
    ``nn.Linear`` (torch's weight layouts are gpu_mlp's), an ``nn.Flatten`` where a
    Dense layer follows a convolution, and the activations."""
    import torch
    from gpu_mlp.layers import Conv2d

    dev, modules = torch.device(device), []
    for k, (layer, (W, b)) in enumerate(zip(layers, params)):
        dtype = getattr(torch, W.dtype.name)
        if isinstance(layer, Conv2d):
            module = torch.nn.Conv2d(layer.c_in, layer.c_out, layer.kernel_size,
                                     stride=layer.stride, padding=layer.padding,
                                     device=dev, dtype=dtype)
        else:
            if k > 0 and isinstance(layers[k - 1], Conv2d):
                modules.append(torch.nn.Flatten())  # C order, as gpu_mlp's Dense
            module = torch.nn.Linear(layer.d_in, layer.d_out, device=dev, dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(W))
            module.bias.copy_(torch.from_numpy(b))
        modules.append(module)
        act = layer.activation.name
        if act not in _TORCH_ACTIVATIONS or (act == "relu" and layer.activation.alpha != 1):
            raise ValueError(f"no PyTorch twin for activation {layer.activation}")
        if _TORCH_ACTIVATIONS[act]:
            modules.append(getattr(torch.nn, _TORCH_ACTIVATIONS[act])())
    return torch.nn.Sequential(*modules)


def torch_loss(name: str, out, Y):
    """gpu_mlp's loss ``name``, averaged over the batch, as PyTorch computes it."""
    import torch

    if name == "squared":
        return ((out - Y) ** 2).sum(1).mean()
    if name == "softmax_cross_entropy":
        return torch.nn.functional.cross_entropy(out, Y)
    raise ValueError(f"no PyTorch twin for the loss {name!r}")


def _torch_case(task, params, X, Y, compiled: bool) -> Case:
    import torch

    model = torch_module(task.point.layers(), params, task.device)
    dev, loss_name = torch.device(task.device), task.point.loss
    Xt, Yt = torch.tensor(X, device=dev), torch.tensor(Y, device=dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch_loss(loss_name, model(Xt), Yt)
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
                for m in model if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    if task.device == "cuda":
        return Case(step, torch.cuda.synchronize, memory="torch-cuda", weights=weights)
    return Case(step, lambda: None, memory=None, weights=weights)


def graph_optimizer(cls, parameters, **kwargs):
    """``cls(parameters, **kwargs)`` fit for CUDA graph capture: ``capturable=True``
    where ``cls`` has that option (optimizers with state, e.g. Adam: the step count and
    the bias corrections stay on the device); plain SGD has no state and no such option."""
    import inspect

    if "capturable" in inspect.signature(cls).parameters:
        kwargs.setdefault("capturable", True)
    return cls(parameters, **kwargs)


def _capture(fn):
    """``(graph, fn())`` with ``fn``'s CUDA work captured into a ``torch.cuda.CUDAGraph``
    (``torch.cuda.graph`` makes a side stream current for the capture)."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@functools.cache
def _side_stream(torch):
    """The one side stream of the torch.graph cases (a new one per case would add a
    cuBLAS workspace per stream, counted in later peaks)."""
    return torch.cuda.Stream()


def _torch_graph_case(task, params, X, Y) -> Case:
    """PyTorch's whole-network capture (CUDA notes, "CUDA Graphs"): warm up on a side
    stream, capture forward + loss + backward + ``optimizer.step()`` once, then per step
    ``static_input.copy_(batch)``, ``static_target.copy_(target)``, ``g.replay()``."""
    import torch

    model = torch_module(task.point.layers(), params, task.device)
    dev, loss_name = torch.device(task.device), task.point.loss
    static_X, static_Y = torch.tensor(X, device=dev), torch.tensor(Y, device=dev)
    batch_X, batch_Y = static_X.clone(), static_Y.clone()  # what a loader would hand over
    optimizer = graph_optimizer(torch.optim.SGD, model.parameters(), lr=LR)
    start = [p.detach().to("cpu", copy=True) for p in model.parameters()]  # off the GPU

    def step_body():
        loss = torch_loss(loss_name, model(static_X), static_Y)
        loss.backward()
        optimizer.step()
        return loss

    side = _side_stream(torch)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # kernels chosen, workspaces and grads allocated
        for _ in range(GRAPH_WARMUP):
            optimizer.zero_grad(set_to_none=True)
            step_body()
    torch.cuda.current_stream().wait_stream(side)
    # grads set to None: backward allocates them from the graph's private pool
    optimizer.zero_grad(set_to_none=True)
    on_cuda = task.device == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    graph, static_loss = _capture(step_body)
    capture_peak = int(torch.cuda.max_memory_allocated()) if on_cuda else None
    with torch.no_grad():  # back to the common start; the graph keeps the addresses
        for p, p0 in zip(model.parameters(), start):
            p.copy_(p0)
    del start

    def step():
        static_X.copy_(batch_X)
        static_Y.copy_(batch_Y)
        graph.replay()  # forward, backward and SGD; the grads are refilled in place
        return static_loss

    def weights():
        return [(m.weight.detach().cpu().numpy(), m.bias.detach().cpu().numpy())
                for m in model if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    return Case(step, torch.cuda.synchronize if on_cuda else (lambda: None),
                memory="torch-cuda-graph" if on_cuda else None, weights=weights,
                capture_peak=capture_peak)


def _gemm_case(task, params, X) -> Case:
    """Layer k's three GEMMs on its rows (M_k, K_k) and weights (d_k, K_k), as the
    engine calls them; a layer's rows are the previous layer's output where that is a
    reshape (Dense after Dense), else finite stand-ins (im2col's rows; on the CPU an
    entrance convolution's transposed, as gpu_mlp.layers.EntranceConv builds them)."""
    _, xp = _device.resolve(task.device)
    rng = np.random.default_rng(2)
    shapes = task.point.gemm_shapes()

    def stand_in(shape):  # what the GEMMs read matters, not what it means
        return xp.array(rng.standard_normal(shape).astype(X.dtype))

    W = [xp.array(Wk.reshape(Wk.shape[0], -1)) for Wk, _ in params]
    updated = [xp.array(Wk) for Wk in W]  # the update target: W stays as drawn
    outs = [xp.empty((m, d), dtype=X.dtype) for m, _, d in shapes]
    rows, previous = [], xp.array(X)
    for m, k, _ in shapes:
        if not rows and isinstance(task.point, ConvPoint) and xp is np:
            rows.append(stand_in((k, m)).T)  # F-ordered: ops.gemm flips its flag
        else:
            rows.append(previous.reshape(m, k) if previous.size == m * k
                        else stand_in((m, k)))
        previous = outs[len(rows) - 1]
    deltas = [stand_in(out.shape) for out in outs]
    # on the CPU a convolution's weight gradient (and a Dense head's, which reads the
    # NHWC maps) is formed transposed where the sums are long (ops.sums_transposed)
    transposed = {k: xp.ascontiguousarray(updated[k].T) for k, (m, _, _) in enumerate(shapes)
                  if isinstance(task.point, ConvPoint) and ops.sums_transposed(updated[k], m)}
    grads = {k: xp.empty_like(rows[k]) for k in range(1, len(W))}  # layer 1 needs none
    # on the CPU a convolution may run its forward and input gradient as one GEMM per
    # kernel offset on shifted rows of its input's phase planes, over the cells of their
    # grid (conv.shifted_taps; where layers.ChannelsLast.shifted says)
    forward, adjoint, shape = {}, {}, task.point.input_shape
    for k, layer in enumerate(task.point.layers()):
        if k > 0 and isinstance(layer, Conv2d) and xp is np:
            maps = np.empty((task.point.batch, *shape[1:], shape[0]), X.dtype)  # (unread)
            ws = Workspace(np, X.dtype)
            ways = [(paths, layer.engine.shifted(maps, ws, most)) for paths, most in
                    ((forward, SHIFTED_FORWARD_MAX), (adjoint, SHIFTED_ADJOINT_MAX))]
            if any(shifted for _, shifted in ways):
                taps = shifted_taps(layer, shape)
                n = task.point.batch * math.prod(taps.grid)
                gemms = (stand_in((n, layer.c_in)), stand_in((n, layer.c_out)),
                         stand_in((len(taps.taps), layer.c_out, layer.c_in)),
                         [shift for *_, shift in taps.taps], n - taps.reach)
                for paths, shifted in ways:
                    if shifted:
                        paths[k] = gemms
        shape = layer.output_shape(shape)

    def step():
        for k, Wk in enumerate(W):
            if k in forward:
                planes, grid, W_taps, shifts, n = forward[k]
                for t, s in enumerate(shifts):
                    ops.gemm("N", "T", planes[s:s + n], W_taps[t], grid[:n],
                             beta=0.0 if t == 0 else 1.0)
            else:
                ops.gemm("N", "T", rows[k], Wk, outs[k])
        for k in reversed(range(len(W))):
            if k in adjoint:
                planes, grid, W_taps, shifts, n = adjoint[k]
                for t, s in enumerate(shifts):
                    ops.gemm("N", "N", grid[:n], W_taps[t], planes[s:s + n], beta=1.0)
            elif k > 0:
                ops.gemm("N", "N", deltas[k], W[k], grads[k])
            if k in transposed:
                ops.gemm("T", "N", rows[k], deltas[k], transposed[k], alpha=-LR, beta=1.0)
            else:
                ops.gemm("T", "N", deltas[k], rows[k], updated[k], alpha=-LR, beta=1.0)

    if task.device == "cuda":
        step = _replayed(step)
    return Case(step, _sync_for(task.device), memory=None)


def _replayed(step):
    """On a GPU: ``step``'s GEMMs captured once as a CUDA graph and replayed each step, as
    gpu_mlp replays its own steps -- so that the bound is the GEMMs' device time, not the
    host's launches (eager, it was above gpu_mlp's replayed steps at small sizes)."""
    import cupy

    from gpu_mlp import graph as _graph

    # gpu_mlp's own capture stream of this thread, with its cuBLAS handle and workspace:
    # a stream of its own would add a handle and 32 MiB to every later record's peak
    side = _graph._capture_stream(cupy.cuda)
    with side.stream:
        step()  # warm: cuBLAS picks its kernels outside the capture
        side.stream.synchronize()
        side.stream.begin_capture()
        try:
            step()
        finally:
            captured = side.stream.end_capture()

    def replay():
        captured.launch(cupy.cuda.get_current_stream())

    # what the graph reads and writes (the step's arrays) and its workspace's handle stay
    # alive while it may replay: it keeps their addresses, not them
    replay.keeps = (step, side.handle)
    return replay


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
    if case.memory == "torch-cuda-graph":
        return case.capture_peak  # a replay allocates nothing: the capture's peak
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


def kernel_intervals(events) -> list[tuple[float, float]]:
    """``(start_us, end_us)`` of the device-side events of a ``torch.profiler`` trace
    (``FunctionEvent``s whose ``device_type`` is CUDA: kernels, memcpy, memset)."""
    return [(e.time_range.start, e.time_range.end) for e in events
            if getattr(e.device_type, "name", str(e.device_type)) == "CUDA"]


def busy_seconds(intervals) -> float:
    """Seconds the device was busy: the length of the union of ``intervals`` (in us),
    so that kernels overlapping on several streams count once."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total * 1e-6


def _profile_steps(step, sync, steps: int) -> tuple[list, float]:
    """``(device intervals in us, window seconds)`` of ``steps`` steps, each followed by
    ``sync`` as when timed, under ``torch.profiler`` with ``ProfilerActivity.CUDA``
    alone (no CPU-op recording to slow the host down)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():  # a CPU build of PyTorch beside CuPy
        raise RuntimeError("needs PyTorch with CUDA (torch.profiler's CUDA trace)")
    sync()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as in time_steps
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                step()
                sync()
            window = time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return kernel_intervals(prof.events()), window


def gpu_busy(step, sync, steps: int) -> dict:
    """The GPU busy fraction of ``steps`` steps: device time (union of the device
    intervals of the trace) / wall time of the window; per step: both times and the
    device events (kernels, copies)."""
    intervals, window = _profile_steps(step, sync, steps)
    if not intervals:
        return {"error": "no device activity in the torch.profiler trace", "steps": steps}
    busy = busy_seconds(intervals)
    return {"fraction": busy / window, "gpu_s_per_step": busy / steps,
            "wall_s_per_step": window / steps, "events_per_step": len(intervals) / steps,
            "steps": steps}


def _release(device: str) -> None:
    """Hand the GPU memory of finished cases back, so that each task starts clean."""
    if device != "cuda":
        return
    gc.collect()  # torch.compile's and CuPy's objects can sit in reference cycles
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        # PyTorch keeps a cuBLAS workspace per (handle, stream) from its caching
        # allocator, which empty_cache() leaves: each later record's peak would count
        # every earlier stream's (its own tests clear them so)
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()


GPU_WARMUP = 3  # the least untimed steps on a GPU: warm-up, capture, a first replay


def measure(task: Task, settings: Settings) -> dict:
    """One record: the timing and memory of ``task``, or the error it raised."""
    point = task.point
    record = {
        "device": task.device, "impl": task.impl, "mode": task.mode, "label": task.label,
        **point.fields(), "flops": point.flops, "status": "ok", "error": None,
        "time_s": None, "tflops": None, "peak_bytes": None, "peak_method": None,
        "workspace_peak_bytes": None, "gpu_busy": None,
        "ratio_to_torch": None, "ratio_to_gemm_bound": None, "ratio_to_torch_graph": None,
        "memory_ratio_to_torch": None,
    }
    try:
        case = build(task, settings.dtype)
        if task.device == "cpu" and settings.settle:
            time.sleep(settings.settle)  # the last case's idle threads stop spinning
        # on a GPU gpu_mlp captures its step as a graph at its second use: never timed
        warmup = settings.warmup if task.device == "cpu" else max(settings.warmup,
                                                                  GPU_WARMUP)
        times, warmup_seconds = time_steps(case.step, case.sync, warmup,
                                           settings.repeats, settings.max_time)
        q1, median, q3 = (float(q) for q in np.percentile(times, [25, 50, 75]))
        record["time_s"] = {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1,
                            "min": float(min(times)), "repeats": len(times),
                            "warmup": warmup, "warmup_total": warmup_seconds}
        record["tflops"] = point.flops / median / 1e12
        record["peak_bytes"] = peak_memory(case, task, settings)
        record["peak_method"] = {"cupy": "cupy memory pool total_bytes",
                                 "torch-cuda": "torch.cuda.max_memory_allocated",
                                 "torch-cuda-graph": "torch.cuda.max_memory_allocated "
                                                     "over the capture",
                                 "tracemalloc": "tracemalloc peak"}.get(case.memory)
        if case.workspace is not None:
            record["workspace_peak_bytes"] = int(case.workspace.peak_in_use_bytes)
        if task.device == "cuda":
            record["gpu_busy"] = _busy_or_error(case, min(max(settings.repeats, MIN_REPEATS),
                                                          BUSY_STEPS))
    except Exception as exc:  # one implementation failing must not stop the grid
        message = str(exc).strip().splitlines()
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {message[0] if message else ''}"[:500]
    finally:
        case = None  # the last reference: its GPU memory can go back now
        _release(task.device)
    return record


def by_point(tasks: list[Task]) -> list[list[Task]]:
    """``tasks`` grouped by grid point, each group and the groups in their first order."""
    groups: dict = {}
    for task in tasks:
        groups.setdefault(task.point.key, []).append(task)
    return list(groups.values())


def measure_rounds(point_tasks: list[Task], settings: Settings, rounds: int,
                   measured: Callable = lambda task, r: None) -> list[dict]:
    """The records of one grid point's tasks, each measured ``rounds`` times with the
    order alternating (ABBA...), so that no case always runs first, or always right
    after the same other library; merged by :func:`merge_rounds`. ``measured(task, r)``
    is called after each measurement (a progress bar)."""
    records: dict = {task.key: [] for task in point_tasks}
    for r in range(rounds):
        for task in point_tasks if r % 2 == 0 else point_tasks[::-1]:
            records[task.key].append(measure(task, settings))
            measured(task, r)
    return [merge_rounds(records[task.key]) for task in point_tasks]


def merge_rounds(rounds: list[dict]) -> dict:
    """One record from the records of one task measured in several rounds
    (``run.py --rounds``): its time the median of the rounds' medians, its quartiles
    and fastest those of the round medians (how far the machine moved between rounds),
    ``round_medians`` all of them; the rest from the first round. A round that failed
    makes the record its error."""
    failed = [r for r in rounds if r["status"] != "ok"]
    if failed or len(rounds) == 1:
        return failed[0] if failed else rounds[0]
    medians = [r["time_s"]["median"] for r in rounds]
    q1, median, q3 = (float(q) for q in np.percentile(medians, [25, 50, 75]))
    record = dict(rounds[0])
    record["time_s"] = {**rounds[0]["time_s"], "median": median, "q1": q1, "q3": q3,
                        "iqr": q3 - q1, "min": min(medians),
                        "repeats": sum(r["time_s"]["repeats"] for r in rounds),
                        "round_medians": medians}
    record["tflops"] = record["flops"] / median / 1e12
    return record


def _busy_or_error(case: Case, steps: int) -> dict:
    """:func:`gpu_busy`, or why it could not be measured: the timing stands either way."""
    try:
        return gpu_busy(case.step, case.sync, steps)
    except Exception as exc:
        message = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {message[0] if message else ''}"[:300],
                "steps": steps}


def key(record: dict) -> tuple:
    """A record's key, :attr:`Task.key`."""
    return (record["device"], record["impl"], record["mode"]) + point_of(record).key


def add_ratios(records: list[dict]) -> None:
    """Fill in each record's ratios to torch eager, to the GEMM-only bound and to the
    graphed PyTorch step at the same device and point (None where either side is missing
    or failed)."""
    base = {}
    for r in records:
        if r["status"] == "ok" and r["impl"] in ("torch", "gemm", "torch.graph"):
            base[(r["impl"], r["device"]) + point_of(r).key] = r
    for r in records:
        point = (r["device"],) + point_of(r).key
        torch_r, gemm_r = base.get(("torch",) + point), base.get(("gemm",) + point)
        graph_r = base.get(("torch.graph",) + point)
        ok = r["status"] == "ok"
        r["ratio_to_torch_graph"] = (r["time_s"]["median"] / graph_r["time_s"]["median"]
                                     if ok and graph_r else None)
        r["ratio_to_torch"] = (r["time_s"]["median"] / torch_r["time_s"]["median"]
                               if ok and torch_r else None)
        r["ratio_to_gemm_bound"] = (r["time_s"]["median"] / gemm_r["time_s"]["median"]
                                    if ok and gemm_r else None)
        r["memory_ratio_to_torch"] = (r["peak_bytes"] / torch_r["peak_bytes"]
                                      if ok and torch_r and r["peak_bytes"]
                                      and torch_r["peak_bytes"] else None)
