"""What the host does for one steady-state training step on a GPU, counted on the CPU.

A step on a GPU waits for Python when the host spends longer launching its work than the
GPU spends doing it (the H200 measured 11 us of host time for a bare CuPy kernel launch:
``../shared/gpu/README.md``). This script runs each way of training -- ``train_step``,
``fit``, ``fit`` under DP, the scikit-learn estimators' ``fit`` and ``partial_fit`` -- on
the tests' counting device (``tests/device_counts.py`` over ``tests/host_cupy.py``, which
follows CuPy's rules of allocation and CUDA's of stream capture, ``tests/capture.py``)
and counts, per step, from the start of one step to the start of the next (so the
loop's own work between steps is in it):

* launches: the kernels, copies and GEMMs the host sent outside a CUDA graph;
* graphs: the CUDA graphs it launched;
* allocations: new device arrays (CuPy's memory pool);
* host reads: device values read on the host (each a synchronisation);
* nodes: the kernels and GEMMs of the largest graph captured (what the GPU runs for a
  replayed step, each a launch of its own inside the graph).

and, over the whole case, CuPy's own kernels that a first run compiles (its ufuncs,
reductions other than CUB's, ``take``, ``arange``...: one NVRTC compilation each, on a
machine with an empty kernel cache, where gpu_mlp's kernels are one compilation of a
module per dtype).

The median over the steps after the first epoch (or the first steps) is reported,
with CUDA graphs (as a GPU runs them) and without (every step eager). These are counts,
not times: what each costs on a GPU is for a GPU run to say. ``--package DIR`` counts the
gpu_mlp package in DIR instead of the checkout's (an earlier commit's, checked out
there), with the checkout's stand-in.

    python bench/host_work.py
    python bench/host_work.py --package /tmp/old      # e.g. git worktree add /tmp/old HEAD~5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import tempfile
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLUMNS = ("launches", "graphs", "allocations", "host reads", "nodes")


def _counting(counts) -> tuple:
    return (counts.launches, counts.graph_launches, counts.allocations, counts.syncs)


def _per_step(net, counts, run, skip: int) -> dict:
    """Run ``run()`` with ``net``'s steps watched: the median, over the steps after the
    first ``skip``, of each count from one step's start to the next one's; and the
    nodes of the largest graph captured."""
    from gpu_mlp import graph

    starts, step, nodes, capture = [], net._step, [], graph.StepGraphs._capture

    def watched(*args, **kwargs):
        starts.append(_counting(counts))
        return step(*args, **kwargs)

    def captured(self, cuda, entry, *args):
        done = capture(self, cuda, entry, *args)
        if done:
            nodes.append(len(entry.graph.names))
        return done

    net._step, graph.StepGraphs._capture = watched, captured
    try:
        run()
    finally:
        del net._step  # (the instance attribute: the method again)
        graph.StepGraphs._capture = capture
    starts.append(_counting(counts))
    deltas = [tuple(b - a for a, b in zip(first, second))
              for first, second in zip(starts[skip:], starts[skip + 1:])]
    if not deltas:
        raise SystemExit("host_work.py: too few steps to count")
    return {**{name: statistics.median(d[i] for d in deltas)
               for i, name in enumerate(COLUMNS[:-1])}, "nodes": max(nodes, default=None),
            "compiled": sorted(counts.compiled)}


def _data(rows: int, features: int, classes: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, features)).astype(np.float32),
            rng.integers(0, classes, rows))


SIZES, BATCH, ROWS = [64, 128, 10], 32, 32 * 12  # the default job's net, 12 steps an epoch
CNN_INPUT = (1, 8, 8)


def _net(cnn=False):
    """The main job's net, or with ``cnn`` its CNN (``train --model cnn``: digits' 1x8x8
    images)."""
    import gpu_mlp
    from gpu_mlp import cli

    if cnn:
        layers = cli._cnn_layers(cli.DEFAULTS["channels"], "relu", CNN_INPUT, SIZES[-1])
        return gpu_mlp.Network(layers, loss="softmax_cross_entropy", device="cpu", seed=0)
    return gpu_mlp.MLP(SIZES, loss="softmax_cross_entropy", device="cpu", seed=0)


def _on_device(net, lib):
    """The counting device with ``net`` on it and its kernels and GEMMs running."""
    from capture import capturable_blas
    from device_counts import counting_device

    stack = contextlib.ExitStack()
    counts = stack.enter_context(counting_device(net, lib))
    stack.enter_context(capturable_blas(lib))
    return stack, counts


def train_step(lib, make_rule, dp=False, cnn=False, host=False):
    """``host``: the batch as NumPy arrays, checked (``check=True``, the default); else
    device arrays, unchecked."""
    from device_counts import DeviceArray
    from gpu_mlp.privacy import DP

    net = _net(cnn)
    X, y = _data(BATCH, SIZES[0], SIZES[-1])
    if cnn:
        X = X.reshape(BATCH, *CNN_INPUT)
    stack, counts = _on_device(net, lib)
    with stack:
        if not host:
            X, y = X.view(DeviceArray), y.view(DeviceArray)
        rule = make_rule()
        private = DP(max_grad_norm=1.0, noise_multiplier=1.0, seed=0) if dp else None

        def steps():
            for _ in range(12):  # (the loss not kept: a loss held keeps its buffer)
                net.train_step(X, y, rule, check=host, dp=private)
        return _per_step(net, counts, steps, skip=4)


def fit(lib, dp=False):
    from device_counts import DeviceArray
    from gpu_mlp.privacy import DP

    net = _net()
    X, y = _data(ROWS, SIZES[0], SIZES[-1])
    stack, counts = _on_device(net, lib)
    with stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (DP noise on random labels: the loss may rise)
        private = DP(max_grad_norm=1.0, noise_multiplier=1.0, seed=0) if dp else None
        epochs = 6 if dp else 2  # (under DP: a graph per sample size, each seen twice)
        # (validated every epoch, as the main job is)
        return _per_step(net, counts, lambda: net.fit(
            X.view(DeviceArray), y.view(DeviceArray), epochs=epochs, batch_size=BATCH,
            lr=1e-2, dp=private, verbose=False, validation=(X[:BATCH], y[:BATCH])),
            skip=ROWS // BATCH * (epochs - 1))


def estimator(lib, streaming=False):
    from gpu_mlp.sklearn import MLPClassifier

    X, y = _data(ROWS, SIZES[0], SIZES[-1])
    clf = MLPClassifier(tuple(SIZES[1:-1]), batch_size=BATCH, max_iter=1, random_state=0,
                        device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (max_iter reached)
        if streaming:  # partial_fit, one batch a call
            clf.partial_fit(X[:BATCH], y[:BATCH], classes=list(range(SIZES[-1])))
        else:
            clf.fit(X, y)  # on the host: the net; then warm_start on the device
        net = clf.net_
        stack, counts = _on_device(net, lib)
        with stack:
            if streaming:
                clf._optimizer = None  # (Adam's moments made anew on the device)
                chunks = [(X[i:i + BATCH], y[i:i + BATCH]) for i in range(0, ROWS, BATCH)]
                return _per_step(net, counts, lambda: [clf.partial_fit(*chunk)
                                                       for chunk in chunks], skip=4)
            clf.set_params(warm_start=True, max_iter=2, tol=0.0)
            return _per_step(net, counts, lambda: clf.fit(X, y), skip=ROWS // BATCH)


def cases():
    """The cases by name; the estimators' where scikit-learn is installed."""
    import importlib.util

    from gpu_mlp import optim

    found = {"train_step, SGD": lambda lib: train_step(lib, lambda: 1e-2),
             "train_step, SGD, NumPy batch": lambda lib: train_step(lib, lambda: 1e-2,
                                                                   host=True),
             "train_step, Adam": lambda lib: train_step(lib, lambda: optim.Adam(1e-3)),
             "train_step, SGD, DP": lambda lib: train_step(lib, lambda: 1e-2, dp=True),
             "train_step, CNN": lambda lib: train_step(lib, lambda: 1e-2, cnn=True),
             "train_step, CNN, DP": lambda lib: train_step(lib, lambda: 1e-2, dp=True,
                                                          cnn=True),
             "fit": fit,
             "fit, DP": lambda lib: fit(lib, dp=True)}
    if importlib.util.find_spec("sklearn") is not None:
        found["MLPClassifier.fit"] = estimator
        found["MLPClassifier.partial_fit"] = lambda lib: estimator(lib, streaming=True)
    return found


def _shown(count) -> str:
    return "-" if count is None else f"{count:g}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=pathlib.Path,
                        help="a directory holding the gpu_mlp package to count")
    parser.add_argument("--out", type=pathlib.Path, help="also write the counts as JSON")
    args = parser.parse_args(argv)
    if args.package and not (args.package / "gpu_mlp" / "__init__.py").is_file():
        parser.error(f"--package: no gpu_mlp package in {args.package}")
    sys.path[:0] = ([str(args.package)] if args.package else []) + [str(ROOT),
                                                                     str(ROOT / "tests")]
    import gpu_mlp
    import host_cupy
    from gpu_mlp import graph

    lib = host_cupy.build(pathlib.Path(tempfile.mkdtemp()))  # (g++: the kernels' C++)
    rows = []
    for name, count in cases().items():
        with_graphs = count(lib)
        original = graph._cuda
        graph._cuda = lambda: None  # every step eager
        try:
            eager = count(lib)
        finally:
            graph._cuda = original
        rows.append({"case": name, "graphs": with_graphs, "eager": eager})
    print(f"gpu_mlp from {pathlib.Path(gpu_mlp.__file__).parent}; net {SIZES} (CNN: train "
          f"--model cnn's on {CNN_INPUT}), batch {BATCH}, float32; per step, median: with "
          f"CUDA graphs / every step eager")
    print(f"{'case':28s}" + "".join(f"{c:>16s}" for c in COLUMNS))
    for row in rows:
        print(f"{row['case']:28s}" + "".join(
            f"{_shown(row['graphs'][c]):>9s} / {_shown(row['eager'][c]):<4s}" for c in COLUMNS))
    print("CuPy's own kernels a first run compiles (NVRTC, one each; gpu_mlp's kernels are "
          "its one module):")
    for row in rows:
        print(f"  {row['case']}: {', '.join(row['graphs']['compiled']) or 'none'}")
    if args.out:
        args.out.write_text(json.dumps({"net": SIZES, "batch": BATCH, "rows": rows},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
