"""The main job against the same training in PyTorch: what a user of either would see.

``python -m gpu_mlp train`` (its options after ``--``) runs in a subprocess as a user
types it, and reports its training time (the epochs, validation excluded: fit's
``History.seconds``) and test accuracy. Its PyTorch twin runs in another subprocess: the
same data and split, the same network with the same initial weights (taken from the net
the command line builds, through bench/harness.py's ``torch_module``), the same batch
size, epochs and learning rate, plain SGD, the training data on the device and each
epoch's batches gathered there, as fit does; the GPU synchronised at each epoch's end.
The two alternate, ``--rounds`` times; medians and the ratio are reported.

    python bench/job.py                                # the MLP job, on the CPU
    python bench/job.py -- --model cnn                 # the CNN job
    python bench/job.py --device cuda -- --model cnn   # on a GPU, TF32 off
    python bench/job.py --out job.json -- --model cnn

The twin reproduces plain SGD only: options that choose an optimizer, DP, a checkpoint
or a plot are refused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_TRAINED = re.compile(r"trained epochs \d+-\d+ in ([0-9.]+) s")
_ACCURACY = re.compile(r"test (accuracy|loss): ([0-9.]+)")
# job options the PyTorch twin cannot reproduce
REFUSED = ("--optimizer", "--momentum", "--nesterov", "--weight-decay", "--betas", "--eps",
           "--schedule", "--warmup", "--min-lr", "--step-size", "--gamma", "--dp-clip",
           "--dp-noise", "--dp-epsilon", "--dp-delta", "--dp-accountant", "--comm-path",
           "--save", "--overwrite", "--resume", "--plot", "--quiet", "--device")
IMPLS = ("gpu_mlp", "torch")


def check_options(options: list[str]) -> None:
    """Refuse what the twin cannot reproduce, an abbreviation too (``--optim``: the job's
    parser takes unique prefixes)."""
    for option in options:
        name = option.split("=", 1)[0]
        if not name.startswith("--") or len(name) < 3:
            continue
        refused = [full for full in REFUSED if full.startswith(name)]
        if refused and all(not other.startswith(name) or other in REFUSED
                           for other in _job_options()):
            full = refused[0]
            raise ValueError(f"bench/job.py: {full} is not a job option the PyTorch twin "
                             f"reproduces (plain SGD on built-in data only)"
                             + ("; give --device before --" if full == "--device" else ""))


def _job_options() -> list[str]:
    """Every long option of ``gpu_mlp train``."""
    from gpu_mlp import cli

    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    return [s for action in train._actions for s in action.option_strings if s.startswith("--")]


def _environment(device: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), CUPY_TF32="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_gpu_mlp(options: list[str], device: str, threads: int) -> dict:
    """The job as a user runs it: its training seconds, result and wall seconds."""
    command = [sys.executable, "-m", "gpu_mlp", "train", "--device", device, *options]
    return _run(command, _environment(device, threads))


def run_torch(options: list[str], device: str, threads: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--twin", "--device", device,
               "--threads", str(threads), "--", *options]
    return _run(command, _environment(device, threads))


def _run(command, env) -> dict:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[1:4])}... failed ({done.returncode}): "
                           f"{done.stderr[-2000:]}")
    trained, result = _TRAINED.search(done.stdout), _ACCURACY.findall(done.stdout)
    if trained is None or not result:
        raise RuntimeError(f"no training time or result in the output: {done.stdout[-2000:]}")
    name, value = result[-1]  # the last line: the accuracy, or the regression's test loss
    return {"train_s": float(trained.group(1)), "wall_s": round(wall, 3),
            f"test_{name}": float(value)}


def twin(options: list[str], device: str, threads: int) -> None:
    """The job's PyTorch twin: prints its lines as the command line does."""
    import torch

    from bench import harness
    from gpu_mlp import cli
    from gpu_mlp.device import to_numpy

    harness.configure(threads, tf32=False)
    args = cli.build_parser().parse_args(["train", *options])
    resumed = cli._resume(args)  # None (no --resume); sets the run's data set
    settings = cli._settings(args, resumed)
    data = cli._data(args, resumed, settings)
    net = cli._model(args, resumed, data, settings)  # the job's net, its initial weights
    plan = cli._plan(args, resumed, data, settings, None, net)
    params = [(to_numpy(W), to_numpy(b)) for W, b in net.params]
    model = harness.torch_module(net.layers, params, device)
    dtype, dev = getattr(torch, net.dtype.name), torch.device(device)
    X = torch.as_tensor(data.X_train, dtype=dtype, device=dev)
    Y = torch.as_tensor(data.Y_train, device=dev)
    Y = Y.to(dtype) if Y.is_floating_point() else Y.long()
    sgd = torch.optim.SGD(model.parameters(), lr=plan.lr)
    generator = torch.Generator(device=dev).manual_seed(settings.seed)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n, B, seconds = len(X), settings.batch_size, 0.0
    for _ in range(args.epochs):
        start = time.perf_counter()
        order = torch.randperm(n, device=dev, generator=generator)
        for first in range(0, n, B):
            rows = order[first:first + B]
            sgd.zero_grad(set_to_none=True)
            harness.torch_loss(net.loss.name, model(X[rows]), Y[rows]).backward()
            sgd.step()
        sync()
        seconds += time.perf_counter() - start
    print(f"trained epochs 1-{args.epochs} in {seconds:.2f} s")
    with torch.no_grad():
        out = model(torch.as_tensor(data.X_test, dtype=dtype, device=dev))
        if data.classes:
            labels = torch.as_tensor(data.Y_test, device=dev)
            print(f"test accuracy: {(out.argmax(1) == labels).double().mean().item():.3f}")
        else:
            Y_test = torch.as_tensor(data.Y_test, dtype=dtype, device=dev)
            print(f"test loss: {harness.torch_loss(net.loss.name, out, Y_test).item():.4f}")


def measure(options: list[str], device: str, threads: int, rounds: int, out=print) -> dict:
    runs = {impl: [] for impl in IMPLS}
    run = {"gpu_mlp": run_gpu_mlp, "torch": run_torch}
    for r in range(rounds):
        for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:  # neither always first
            runs[impl].append(run[impl](options, device, threads))
            out(f"round {r + 1}/{rounds} {impl}: {runs[impl][-1]}")
    summary = {impl: {"median_train_s": statistics.median(x["train_s"] for x in rs),
                      "median_wall_s": statistics.median(x["wall_s"] for x in rs)}
               for impl, rs in runs.items()}
    summary["ratio_train_s"] = round(summary["gpu_mlp"]["median_train_s"]
                                     / summary["torch"]["median_train_s"], 3)
    return {"options": options, "device": device, "threads": threads, "rounds": runs,
            "summary": summary}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2,
                        help="BLAS/OpenMP threads and torch.set_num_threads (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs (default 3)")
    parser.add_argument("--out", help="also write the result to this JSON file")
    parser.add_argument("--twin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("options", nargs="*", help="the job's options, after --")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        parser.error("--threads and --rounds must be at least 1")
    try:
        check_options(args.options)
    except ValueError as e:
        parser.error(str(e))
    if args.twin:
        twin(args.options, args.device, args.threads)
        return 0
    from bench import harness, warn_forced_blas

    warn_forced_blas()
    result = measure(args.options, args.device, args.threads, args.rounds)
    result["environment"] = harness.environment([args.device], args.threads, False,
                                                out=args.out)
    result["source"] = harness.source_state()
    s = result["summary"]
    print(f"train s, median of {args.rounds}: gpu_mlp {s['gpu_mlp']['median_train_s']:.2f}, "
          f"torch {s['torch']['median_train_s']:.2f}; ratio {s['ratio_train_s']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
