"""Softmax rows on the GPU: a thread a row against ``ops.ROW_LANES`` threads a row.

Rows up to ``ops.ROW_KERNEL_MAX`` (32) classes wide go to the row kernels, one thread a
row; wider ones to the wide-row kernels (kernels/rowwise.cuh, "wide rows"), which cost
two or three launches a pass but read a row coalesced. The limit was chosen, not
measured: this times both paths on the same rows -- softmax forward (``ops.bias_act``),
its backward (``ops.grad_from_output``) and the cross-entropy against labels
(``ops.loss_and_grad``) -- at every (batch, classes) point, with CUDA events around
``--repeat`` calls captured once as a CUDA graph (as a training step replays them: the
device's time, not the host's launches, which would favour the path of fewer kernels),
and says where the wide path starts to win. Every call takes its scratch from one
workspace, as in a step; the device is synchronised before each timing; the copy that
restores the forward's and the backward's input before each call is timed alone and
taken off.

    python bench/rows.py                      # on a GPU; prints a table and a JSON line
    python bench/rows.py --out rows.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpu_mlp  # noqa: E402
from gpu_mlp import activations, losses, ops  # noqa: E402
from gpu_mlp.workspace import Workspace  # noqa: E402

BATCHES = (32, 256, 4096)
CLASSES = (8, 16, 32, 64, 128, 1000)
PATHS = {"thread": 1 << 30, "lanes": 0}  # ROW_KERNEL_MAX that sends every row one way


def _ops(cp, B, C, dtype):
    """The three row-wise ops on one batch, as closures, and the workspace they share."""
    rng = np.random.default_rng(0)
    z = cp.asarray(rng.standard_normal((B, C)).astype(dtype))
    bias = cp.asarray(rng.standard_normal(C).astype(dtype))
    labels = cp.asarray(rng.integers(0, C, B))
    softmax, loss = activations.get("softmax"), losses.get("softmax_cross_entropy")
    ws = Workspace(cp, np.dtype(dtype))
    a, f, g, grad = (cp.empty_like(z) for _ in range(4))
    scratch = {}

    def forward():
        a[...] = z
        ops.bias_act(softmax, a, bias, ws)

    def backward():
        g[...] = z
        ops.grad_from_output(softmax, f, g, ws)

    def xent():
        shape = ops.loss_scratch_shape(loss, z.shape)
        if shape not in scratch:
            scratch[shape] = cp.empty(shape, dtype)
        ops.loss_and_grad(loss, z, labels, grad, 1.0 / B, scratch[shape])

    def copy():  # what forward and backward do before their op
        a[...] = z

    forward()
    f[...] = a
    return {"forward": forward, "backward": backward, "xent": xent}, copy


def _time(cp, call, repeat: int) -> float:
    """Microseconds a call: ``repeat`` calls captured as one CUDA graph, the median of 5
    replays between events."""
    call()  # compile, warm the workspace (what a step's replay would find there)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            for _ in range(repeat):
                call()
        finally:
            graph = stream.end_capture()
    rounds = []
    for _ in range(5):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        cp.cuda.Device().synchronize()
        start.record()
        graph.launch()
        stop.record()
        stop.synchronize()
        rounds.append(cp.cuda.get_elapsed_time(start, stop) * 1e3 / repeat)
    return float(np.median(rounds))


def measure(cp, dtype, repeat: int, batches=BATCHES, classes=CLASSES) -> list[dict]:
    rows = []
    limit = ops.ROW_KERNEL_MAX
    try:
        for B in batches:
            for C in classes:
                record = {"batch": B, "classes": C}
                for path, row_kernel_max in PATHS.items():
                    ops.ROW_KERNEL_MAX = row_kernel_max
                    calls, copy = _ops(cp, B, C, dtype)
                    copied = _time(cp, copy, repeat)
                    for name, call in calls.items():
                        record[f"{name} {path} us"] = _time(cp, call, repeat) - (
                            copied if name != "xent" else 0.0)
                rows.append(record)
    finally:
        ops.ROW_KERNEL_MAX = limit
    return rows


def _table(rows) -> str:
    names = ("forward", "backward", "xent")
    head = ["batch", "classes"] + [f"{n} {p}" for n in names for p in PATHS] + ["lanes/thread"]
    lines = ["  ".join(f"{h:>16}" for h in head)]
    for r in rows:
        total = {p: sum(r[f"{n} {p} us"] for n in names) for p in PATHS}
        cells = [r["batch"], r["classes"]] + [f"{r[f'{n} {p} us']:.1f}" for n in names
                                               for p in PATHS]
        cells.append(f"{total['lanes'] / total['thread']:.2f}")
        lines.append("  ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeat", type=int, default=200, help="calls per timed round")
    parser.add_argument("--out", help="also write the records to this JSON file")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if not gpu_mlp.gpu_available():
        print("bench/rows.py needs CuPy and a CUDA GPU", file=sys.stderr)
        return 2
    import cupy as cp

    rows = measure(cp, np.dtype(args.dtype), args.repeat)
    print(f"us per call; ROW_KERNEL_MAX now {ops.ROW_KERNEL_MAX}, "
          f"ROW_LANES {ops.ROW_LANES}, {args.dtype}")
    print(_table(rows))
    result = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
              "cupy": cp.__version__, "dtype": args.dtype, "repeat": args.repeat,
              "row_kernel_max": ops.ROW_KERNEL_MAX, "row_lanes": ops.ROW_LANES,
              "records": rows}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
