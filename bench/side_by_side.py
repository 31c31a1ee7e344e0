"""A commit's gpu_mlp against the checkout's, side by side in one process, on the CPU.

On a shared 2-core box a memory-bound pass can take twice as long one hour as the next,
so two versions are only compared in alternating rounds. This script extracts the
package of ``--base`` (``git archive``) under the name ``gpu_mlp_base``, imports it
beside the checkout's ``gpu_mlp`` (the package imports itself relatively), builds the
same networks in both from the same layer specs, and times them in alternating rounds of
``--steps`` training steps (float32, SGD): median and fastest round per version, and
the ratio checkout / base.

    python bench/side_by_side.py --base HEAD~2 1x28x28-16-2 3x32x32-32-4 digits
    python bench/side_by_side.py --base HEAD~2 --layers 28-16-16-1 14-32-32-1
    python bench/side_by_side.py --base torch --layers 28-16-16-1 14-32-32-1

A network is ``CxHxW-channels-depth``, one of ``bench/run.py --grid conv``'s (3x3
convolutions, padding 1, strides 1, 2, 1, ..., then Dense to 10 classes), or
``digits``, ``gpu-mlp train --model cnn``'s. With ``--layers`` each argument is one
convolution, ``size-c_in-c_out-stride`` (3x3, padding 1, on size x size NHWC maps), timed
as the engine runs it: forward, input gradient and weight gradient apart (the engine's
internal calls, which both commits must have). With ``--base torch`` and ``--layers`` the
checkout's convolutions are timed against PyTorch's own (``F.conv2d`` and
``aten.convolution_backward`` on NCHW tensors, the same numbers), each turn after
``harness.CPU_SETTLE_S`` of sleep so that the other library's idle threads have stopped
spinning (bench/README.md, "Cases in turn"). Set the BLAS environment before it runs
(see bench/README.md, "The BLAS kernels").
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_base(commit: str, into: Path):
    """``commit``'s gpu_mlp package, imported as ``gpu_mlp_base`` from ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "gpu_mlp"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "gpu_mlp").rename(into / "gpu_mlp_base")
    for name in [m for m in sys.modules if m.split(".")[0] == "gpu_mlp_base"]:
        del sys.modules[name]  # (an earlier call's, from its folder, gone since)
    sys.path.insert(0, str(into))
    try:
        return importlib.import_module("gpu_mlp_base")
    finally:
        sys.path.remove(str(into))


def network_specs(name: str):
    """(layer specs, per-sample input shape) of a named network, built by the checkout."""
    from bench.harness import ConvPoint
    from gpu_mlp import cli

    if name == "digits":
        layers = cli._cnn_layers(cli.DEFAULTS["channels"], "relu", (1, 8, 8), 10)
        return [layer.spec() for layer in layers], (1, 8, 8)
    try:
        image, channels, depth = name.split("-")
        shape = tuple(int(v) for v in image.split("x"))
        layers = ConvPoint(input=shape, channels=int(channels), depth=int(depth),
                           batch=1).layers()
    except ValueError:
        raise SystemExit(f"side_by_side.py: a network is CxHxW-channels-depth or digits, "
                         f"got {name!r}") from None
    return [layer.spec() for layer in layers], shape


def _rounds(cases, rounds: int, steps: int, settle: float = 0.0):
    """``cases``: two callables, each one round's worth of work; ms per call, per case.
    Each round runs them in the other order from the last (ABBA...): whichever runs
    second in a round measured 1-2% slower in an A/A comparison of one commit.
    ``settle``: seconds of sleep before each turn (two libraries' threads)."""
    times = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            case = cases[i]
            if settle:
                time.sleep(settle)
                case()  # (its threads awake again: untimed)
            start = time.perf_counter()
            for _ in range(steps):
                case()
            times[i].append((time.perf_counter() - start) / steps * 1e3)
    return times


def _line(label: str, times) -> str:
    (base, new) = times
    ratio = statistics.median(new) / statistics.median(base)
    return (f"{label:28s} base {min(base):7.3f} / {statistics.median(base):7.3f} ms   "
            f"checkout {min(new):7.3f} / {statistics.median(new):7.3f} ms   "
            f"checkout / base (medians) {ratio:.2f}")


def compare_steps(packages, name: str, batch: int, rounds: int, steps: int) -> str:
    specs, shape = network_specs(name)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    nets = []
    for pkg in packages:
        layers = [pkg.layers.from_spec(spec) for spec in specs]
        net = pkg.Network(layers, loss="softmax_cross_entropy", dtype="float32", seed=0,
                          device="cpu")
        for _ in range(3):  # warm: the workspace filled
            net.train_step(X, y, 1e-5)
        nets.append(net)
    times = _rounds([lambda net=net: net.train_step(X, y, 1e-5) for net in nets],
                    rounds, steps)
    return _line(f"{name} B{batch}", times)


def compare_layer(packages, spec: str, batch: int, rounds: int, steps: int) -> list[str]:
    try:
        size, c_in, c_out, stride = (int(v) for v in spec.split("-"))
    except ValueError:
        raise SystemExit(f"side_by_side.py: a layer is size-c_in-c_out-stride, got "
                         f"{spec!r}") from None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, c_in)).astype(np.float32)
    parts = []
    for pkg in packages:
        if pkg == "torch":
            parts.append(_torch_layer(x, c_out, stride, np.random.default_rng(0)))
            continue
        conv = pkg.layers.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        form, ws = conv.engine, pkg.workspace.Workspace(np, np.float32)
        ws.largest_batch = batch
        W = rng.standard_normal(conv.weight_shape).astype(np.float32)
        _, OH, OW = conv.output_shape((c_in, size, size))
        T = rng.standard_normal((batch * OH * OW, c_out)).astype(np.float32)
        dx, G = np.empty_like(x), np.empty((c_out, conv.fan_in), np.float32)

        def forward(form=form, ws=ws, W=W):
            ws.give(form.linear(x, W, ws))

        def input_grad(form=form, ws=ws, W=W, T=T, dx=dx):
            form.input_grad(T, W, ws, dx)

        def weight_grad(form=form, ws=ws, T=T, G=G, ops=pkg.ops):
            rows = form.rows(x, ws, True)
            ops.weight_gradient(T, rows, G, ws=ws)
            form.give_rows(rows, ws)

        parts.append((forward, input_grad, weight_grad))
    from bench import harness

    lines = []
    settle = harness.CPU_SETTLE_S if "torch" in packages else 0.0
    for what, cases in zip(("forward", "input gradient", "weight gradient"), zip(*parts)):
        for case in cases:
            case()  # warm
        lines.append(_line(f"{spec} {what}", _rounds(cases, rounds, steps, settle)))
    return lines


def _torch_layer(x, c_out: int, stride: int, rng):
    """PyTorch's forward, input gradient and weight gradient of the 3x3 convolution
    (padding 1) that :func:`compare_layer` times, on the NCHW copy of the NHWC ``x``,
    with W and T drawn as there."""
    import torch

    B, size, _, c_in = x.shape
    x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    W = torch.from_numpy(rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32))
    OH = (size + 2 - 3) // stride + 1
    T = rng.standard_normal((B * OH * OH, c_out)).astype(np.float32)
    T_t = torch.from_numpy(np.ascontiguousarray(T.reshape(B, OH, OH, c_out)
                                                .transpose(0, 3, 1, 2)))
    backward = torch.ops.aten.convolution_backward

    def grads(mask):
        return lambda: backward(T_t, x_t, W, None, [stride] * 2, [1, 1], [1, 1], False,
                                [0, 0], 1, mask)

    return (lambda: torch.nn.functional.conv2d(x_t, W, None, stride, 1),
            grads([True, False, False]), grads([False, True, False]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True,
                        help="the commit to compare against; with --layers also 'torch': "
                             "PyTorch's own convolutions")
    parser.add_argument("--layers", action="store_true",
                        help="time single convolutions (size-c_in-c_out-stride)")
    parser.add_argument("--batch", type=int, default=None,
                        help="samples a step (default 64; digits 32)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="steps a round")
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or (args.batch is not None and args.batch < 1):
        parser.error("--rounds, --steps and --batch must be positive")
    if args.base == "torch" and not args.layers:
        parser.error("--base torch times single convolutions: give --layers")
    import gpu_mlp

    with tempfile.TemporaryDirectory() as folder:
        try:
            base = "torch" if args.base == "torch" else load_base(args.base, Path(folder))
        except subprocess.CalledProcessError as e:
            parser.error(f"--base {args.base}: git archive failed: "
                         f"{e.stderr.decode(errors='replace').strip()}")
        packages = (base, gpu_mlp)
        print(f"base {args.base}, checkout {ROOT.name}: ms per step (fastest / median of "
              f"{args.rounds} alternating rounds of {args.steps})")
        for case in args.cases:
            if args.layers:
                batch = args.batch or 64
                print("\n".join(compare_layer(packages, case, batch, args.rounds,
                                              args.steps)), flush=True)
            else:
                batch = args.batch or (32 if case == "digits" else 64)
                print(compare_steps(packages, case, batch, args.rounds, args.steps),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
