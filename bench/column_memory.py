"""What a GPU conv training step holds, counted on the CuPy path without a GPU.

For each point of the conv grid (``bench/run.py --grid conv``: 1x28x28 and 3x32x32
inputs, 16-64 channels, depth 2 or 4), one fresh net runs three training steps (float32,
``output`` mode, SGD: warm-up, capture, replay) on the host stand-in of CuPy that
captures (``tests/device_counts.py`` and ``tests/capture.py`` over ``tests/host_cupy.py``:
the engine's CuPy branches, the CUDA kernel bodies compiled for the host), once per column budget
(``ops.COLUMN_BUDGET_BYTES``; "none": a budget no batch reaches, whole-batch columns).
It counts the workspace's pool bytes (each buffer rounded up to CuPy's 512-byte unit)
plus the parameters, the batch, the captured graph's copies of the batch and loss, and
cuBLAS's workspaces (``cublas.WORKSPACE_BYTES`` for each handle: the eager stream's and
the capture stream's, as a GPU holds them once the step is replayed as a graph), and
divides by PyTorch's peak measured on a GPU for the same point (``--torch``: a
``bench/run.py`` results.json with torch-cuda records). What it cannot count: the CuPy
pool's own fragmentation, and time. A GPU run of ``bench/run.py --grid conv`` measures
both.

    python bench/column_memory.py \
        --torch bench/results/2026-12-04-h200/cuda-float32-conv/results.json \
        --batches 64,256,1024 --budgets 16 \
        --out bench/results/cupy-standin-float32-conv-memory/results.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import gpu_mlp  # noqa: E402
import host_cupy  # noqa: E402  (the tests' CuPy stand-in)
from capture import capturable_blas  # noqa: E402  (... that captures)
from device_counts import DeviceArray, counting_device  # noqa: E402
from gpu_mlp import cublas, ops  # noqa: E402
from bench.harness import ConvPoint, portable_command, repo_path, source_state  # noqa: E402
from bench.run import positive_ints  # noqa: E402

INPUTS, CHANNELS, DEPTHS = ((1, 28, 28), (3, 32, 32)), (16, 32, 64), (2, 4)
NONE = 1 << 62  # a budget no batch reaches


def held_bytes(lib, point: ConvPoint, budget: int) -> int:
    """Bytes a warm step holds on the CuPy path with column budget ``budget``: replayed
    as a CUDA graph, as a GPU runs it from its third step on (the tests' capture
    stand-in), so with the capture stream's cuBLAS handle and workspace beside the eager
    stream's, and the graph's own copies of the batch and its loss."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((point.batch, *point.input)).astype(np.float32)
    Y = rng.integers(0, 10, point.batch)
    net = gpu_mlp.Network(point.layers(), loss="softmax_cross_entropy", device="cpu",
                          dtype="float32", seed=0)
    saved, ops.COLUMN_BUDGET_BYTES = ops.COLUMN_BUDGET_BYTES, budget
    try:
        with counting_device(net, lib), capturable_blas(lib) as blas:
            X_dev, Y_dev = X.view(DeviceArray), Y.view(DeviceArray)
            for _ in range(3):  # warm-up (fills the workspace), capture, replay
                net.train_step(X_dev, Y_dev, 1e-5, check=False)
            handles = len(blas.handles)
    finally:
        ops.COLUMN_BUDGET_BYTES = saved
    graphs = net.step_graphs
    assert graphs.captures == 1 and graphs.replays == 1, "the step was not replayed"
    static = sum(a.nbytes for entry in graphs._entries.values()
                 for a in (entry.X, entry.Y, entry.loss) if a is not None)
    params = sum(a.nbytes for pair in net.params for a in pair)
    return net.training_workspace.pool_bytes + params + X.nbytes + Y.nbytes + static + \
        handles * cublas.WORKSPACE_BYTES


def torch_peaks(path) -> dict:
    if path is None:
        return {}
    records = json.loads(pathlib.Path(path).read_text())["records"]
    return {(tuple(r["input"]), r["width"], r["depth"], r["batch"]): r["peak_bytes"]
            for r in records if r["impl"] == "torch" and r.get("peak_bytes")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", help="a bench/run.py results.json with PyTorch's GPU peaks")
    parser.add_argument("--batches", type=positive_ints, default=[256, 1024])
    parser.add_argument("--budgets", type=positive_ints, default=[16, 32, 64],
                        help="column budgets, MiB")
    parser.add_argument("--out", help="write the records here (JSON)")
    args = parser.parse_args(argv)
    budgets = [("none", NONE)] + [(f"{m} MiB", m << 20) for m in args.budgets]
    peaks = torch_peaks(args.torch)
    lib = host_cupy.build(pathlib.Path(tempfile.mkdtemp()))
    records = []
    out = pathlib.Path(args.out) if args.out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    environment = {
        "command": portable_command(sys.orig_argv), "platform": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__,
        "gpu_mlp": gpu_mlp.__version__, "gpu_mlp_source": source_state(),
        "torch_peaks_from": None if args.torch is None else repo_path(args.torch)}
    print("point | torch MiB | " + " | ".join(f"{name}: MiB, / torch" for name, _ in budgets))
    for batch in args.batches:
        for shape in INPUTS:
            for channels in CHANNELS:
                for depth in DEPTHS:
                    point = ConvPoint(shape, channels, depth, batch)
                    start = time.perf_counter()
                    held = {name: held_bytes(lib, point, b) for name, b in budgets}
                    torch_peak = peaks.get((shape, channels, depth, batch))
                    records.append({"input": list(shape), "width": channels, "depth": depth,
                                    "batch": batch, "held_bytes": held,
                                    "torch_peak_bytes": torch_peak})
                    cells = [f"{held[n] / 2**20:.0f}, " + (
                        f"{held[n] / torch_peak:.2f}" if torch_peak else "-")
                        for n, _ in budgets]
                    torch_cell = f"{torch_peak / 2**20:.0f}" if torch_peak else "-"
                    print(f"{point} | {torch_cell} | " + " | ".join(cells) +
                          f"   ({time.perf_counter() - start:.0f} s)", flush=True)
                    if out is not None:  # after every point: a long run keeps what it has
                        out.write_text(json.dumps({
                            "method": __doc__.split("\n\n")[1].replace("\n", " "),
                            "environment": environment, "budgets": dict(budgets),
                            "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
