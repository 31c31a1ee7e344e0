"""pytest-benchmark suite: one training step of each implementation at a few grid points
of both grids (MLP and convolutions).

    python -m pytest bench/ --benchmark-enable                # time them
    python -m pytest bench/ --benchmark-enable --benchmark-json=steps.json
    python -m pytest bench/                                   # each body once, no timing

pyproject's addopts carry ``--benchmark-disable``, so without ``--benchmark-enable``
every body runs once, as a smoke test. The steps are bench/harness.py's (same networks,
data, synchronisation); bench/run.py is the full grid with ratios and memory. TF32 is
off in both libraries (PyTorch's cuDNN would otherwise default to it) and PyTorch has
as many CPU threads as NumPy's BLAS (this session's ``OPENBLAS_NUM_THREADS``, else one
a core): :func:`same_footing`.
"""

import os

import pytest

import gpu_mlp
from bench import harness

POINTS = {"cpu": [harness.Point(256, 2, 1024), harness.Point(1024, 4, 1024),
                  harness.ConvPoint((1, 28, 28), 16, 2, 64),
                  harness.ConvPoint((3, 32, 32), 32, 4, 256)],
          "cuda": [harness.Point(1024, 4, 1024), harness.Point(4096, 4, 8192),
                   harness.ConvPoint((3, 32, 32), 64, 4, 1024)]}
GPU = [pytest.mark.gpu,
       pytest.mark.skipif(not gpu_mlp.gpu_available(), reason="needs CuPy and a CUDA GPU")]
TASKS = [pytest.param(task, id=f"{task.label}-{task.point}",
                      marks=GPU if device == "cuda" else ())
         for device, points in POINTS.items()
         for task in harness.tasks([device], None, gpu_mlp.MEMORY_MODES, points)]


@pytest.fixture(scope="module", autouse=True)
def same_footing():
    """Both libraries on the same footing, as bench/run.py puts them: TF32 off in both
    (``CUPY_TF32`` is read as gpu_mlp makes its cuBLAS handles), PyTorch's threads as
    NumPy's BLAS has them."""
    saved = os.environ.get("CUPY_TF32")
    os.environ["CUPY_TF32"] = "0"
    try:
        import torch
    except ImportError:
        torch = None
    before = None if torch is None else (torch.get_num_threads(),
                                         torch.backends.cuda.matmul.allow_tf32,
                                         torch.backends.cudnn.allow_tf32)
    threads = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get(
        "OMP_NUM_THREADS") or os.cpu_count())
    harness.configure(threads, tf32=False)
    yield
    if saved is None:
        del os.environ["CUPY_TF32"]
    else:
        os.environ["CUPY_TF32"] = saved
    if before is not None:  # the next module's as they were
        torch.set_num_threads(before[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1:]


@pytest.mark.parametrize("task", TASKS)
def test_step(benchmark, task):
    if task.impl.startswith("torch"):
        torch = pytest.importorskip("torch")
        if task.device == "cuda" and not torch.cuda.is_available():
            pytest.skip("this PyTorch build has no CUDA")
    case = harness.build(task, "float32")

    def step():
        case.step()
        case.sync()  # the GPU's work is inside the timed call

    benchmark.extra_info.update(label=task.label, flops=task.point.flops)
    # warm-up rounds compile CuPy kernels and torch.compile graphs before any timing
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    if not benchmark.disabled:
        benchmark.extra_info["tflops_at_median"] = (
            task.point.flops / benchmark.stats.stats.median / 1e12)


def test_cublas_overhead_runs_against_its_stub():
    """The README's command: the stub must define every entry point gpu_mlp.cublas binds
    (it lacked cublasDestroy_v2 once that was bound, and the command crashed)."""
    import shutil

    if shutil.which("gcc") is None:
        pytest.skip("needs a C compiler (gcc)")
    from bench import cublas_overhead
    from gpu_mlp import cublas

    for name in cublas.PROTOTYPES:
        assert f" {name}(" in cublas_overhead.STUB or f"({name}," in cublas_overhead.STUB, name
    times = cublas_overhead.stub(50, libcuda_stub=False)["ns_per_call"]
    assert all(t > 0 for t in times.values()) and len(times) >= 3


def test_dp_step_breakdown_times_eager_steps():
    """On a GPU a step is captured and replayed after its warm-up, and a replay runs none
    of the Python that --breakdown times: every part read 0. Its steps run eagerly."""
    from bench import dp_step

    seen = []

    def step(capture=True):
        seen.append(capture)

    dp_step.breakdown({"gpu_mlp": (step, lambda: None)}, rounds=2, steps=3, settle=0)
    assert seen == [False] * 8


def test_dp_step_quick(tmp_path):
    """bench/dp_step.py --quick end to end, in its own process (it sets the BLAS threads
    before NumPy loads): every implementation timed or its failure recorded, the ratios,
    the breakdown of the private step and the report; where Opacus ran, its noise-free
    private step agrees with gpu_mlp's."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "bench", "dp_step.py"), "--quick",
                    "--threads", "1", "--breakdown", "--out", str(tmp_path)],
                   check=True, cwd=root, timeout=600)
    from bench import dp_step

    result = json.loads((tmp_path / "results.json").read_text())
    [record] = result["records"]
    assert set(record["time_s"]) | set(record["errors"]) == set(dp_step.IMPLS)
    for impl in ("gpu_mlp", "gpu_mlp DP", "gpu_mlp DP noise 0"):
        assert record["time_s"][impl]["median"] > 0
    assert record["ratios"]["dp_over_plain"] > 0
    for parts in record["breakdown_ms"].values():
        assert set(parts) == set(dp_step.PARTS) | {"total"}
    assert set(record["breakdown_ms"]) == set(dp_step.IMPLS[:3])
    if "opacus hooks" in record["time_s"]:
        check = record["agreement"]
        assert check["max_abs_weight_diff"] <= 1e-3 * check["max_abs_weight_change"]
    assert "| 64-256-256-10 | 32 |" in (tmp_path / "report.md").read_text()
