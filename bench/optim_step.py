"""One training step with an optimizer: gpu_mlp's fused update against torch.optim.

For each optimizer (SGD, SGD with momentum, Adam, AdamW) and net, the same step --
forward, backward, update -- is timed side by side for gpu_mlp (the update fused into
the backward pass, one scratch gradient buffer) and PyTorch (``.grad`` per parameter,
then ``optimizer.step()`` with ``foreach=True`` and, where PyTorch has it for the
device, ``fused=True``), on the same device, dtype, weights and batch, with the harness's
timing (:func:`bench.harness.time_steps`: warm-up, GPU synchronised inside the timed
region, median of repeats; on the CPU each after ``harness.CPU_SETTLE_S`` of sleep, so
that the last one's idle threads stop spinning). Writes ``results.json`` and ``report.md`` to ``--out``.

    python bench/optim_step.py --out bench/results/cpu-float32-optim    # needs torch
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import pin_environment  # noqa: E402  (imports nothing that reads it)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", required=True)
    return parser


if __name__ == "__main__":  # the BLAS threads and TF32 set before NumPy and CuPy load
    pin_environment(_parser().parse_args().threads)

import numpy as np  # noqa: E402

import gpu_mlp  # noqa: E402
from bench import harness  # noqa: E402
from gpu_mlp import optim  # noqa: E402

NETS = {"784-1024-1024-10": [784, 1024, 1024, 10], "64-256-256-10": [64, 256, 256, 10]}
BATCH, LR = 128, 1e-3
OPTIMIZERS = {  # name: (gpu_mlp's, torch's constructor given params and extra options)
    "SGD": (lambda: optim.SGD(LR), lambda torch, p, **o: torch.optim.SGD(p, lr=LR, **o)),
    "SGD momentum": (lambda: optim.SGD(LR, momentum=0.9),
                     lambda torch, p, **o: torch.optim.SGD(p, lr=LR, momentum=0.9, **o)),
    "Adam": (lambda: optim.Adam(LR), lambda torch, p, **o: torch.optim.Adam(p, lr=LR, **o)),
    "AdamW": (lambda: optim.AdamW(LR), lambda torch, p, **o: torch.optim.AdamW(p, lr=LR, **o)),
}


def problem(sizes, dtype):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], BATCH)
    net = gpu_mlp.MLP(sizes, loss="softmax_cross_entropy", device="cpu", dtype=dtype, seed=0)
    return [(np.array(W), np.array(b)) for W, b in net.params], X, y


def ours(sizes, params, X, y, device, dtype, make):
    net = gpu_mlp.MLP.from_params(params, ["relu"] * (len(sizes) - 2) + ["identity"],
                                  "softmax_cross_entropy", device=device, dtype=dtype)
    X, y = gpu_mlp.device.to_device(X, net.xp), gpu_mlp.device.to_device(y, net.xp)
    opt = make()
    return lambda: net.train_step(X, y, opt, check=False)


def theirs(torch, sizes, params, X, y, device, make, **options):
    layers = [gpu_mlp.layers.Dense(a, b, "relu") for a, b in zip(sizes[:-2], sizes[1:-1])]
    layers.append(gpu_mlp.layers.Dense(sizes[-2], sizes[-1], "identity"))
    model = harness.torch_module(layers, params, device)
    X, y = torch.as_tensor(X, device=device), torch.as_tensor(y, device=device)
    opt = make(torch, model.parameters(), **options)

    def step():
        opt.zero_grad(set_to_none=True)  # PyTorch's default: no zeroing pass, no += of grads
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return step


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch

    harness.configure(args.threads, tf32=False)
    sync = harness._sync_for(args.device)

    def timed(step) -> float:
        if args.device == "cpu":  # the last case's idle BLAS/OpenMP threads stop spinning
            time.sleep(harness.CPU_SETTLE_S)  # (bench/README.md, "Cases in turn")
        return float(np.median(harness.time_steps(step, sync, 5, args.repeats, 10.0)[0]))

    records = []
    for net_name, sizes in NETS.items():
        params, X, y = problem(sizes, args.dtype)
        for name, (make_ours, make_theirs) in OPTIMIZERS.items():
            steps = {"gpu_mlp": ours(sizes, params, X, y, args.device, args.dtype, make_ours),
                     "torch foreach": theirs(torch, sizes, params, X, y, args.device,
                                             make_theirs, foreach=True)}
            try:
                steps["torch fused"] = theirs(torch, sizes, params, X, y, args.device,
                                              make_theirs, fused=True)
            except (RuntimeError, ValueError, TypeError):
                pass  # no fused kernel for this device in this PyTorch
            times = {impl: timed(step) for impl, step in steps.items()}
            best_torch = min(t for impl, t in times.items() if impl != "gpu_mlp")
            records.append({"net": net_name, "optimizer": name, "time_s": times,
                            "ratio_to_best_torch": times["gpu_mlp"] / best_torch})
            print(f"{net_name:>17} {name:>13}: " + ", ".join(
                f"{impl} {t * 1e3:.2f} ms" for impl, t in times.items())
                + f"; ours / best torch {records[-1]['ratio_to_best_torch']:.2f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    environment = harness.environment([args.device], args.threads, False, out=args.out)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": environment, "batch": BATCH, "dtype": args.dtype,
                   "records": records}, f, indent=1)
    lines = ["| net | optimizer | gpu_mlp ms | torch foreach ms | torch fused ms | ours / best torch |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        t = r["time_s"]
        fused = f"{t['torch fused'] * 1e3:.2f}" if "torch fused" in t else "n/a"
        lines.append(f"| {r['net']} | {r['optimizer']} | {t['gpu_mlp'] * 1e3:.2f} | "
                     f"{t['torch foreach'] * 1e3:.2f} | {fused} | {r['ratio_to_best_torch']:.2f} |")
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(f"# One training step with an optimizer, {args.device}, {args.dtype}, "
                f"batch {BATCH}\n\n`{environment['command']}`\n\n"
                f"{environment.get('cpu', '')}; BLAS: "
                f"{harness.describe_blas(environment.get('blas'))}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
