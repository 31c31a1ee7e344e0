"""A convolution's column buffer within ``ops.COLUMN_BUDGET_BYTES`` (issue 20).

A batch whose columns would outgrow the budget runs in blocks of whole samples: the
forward's im2col and GEMM, C^dagger's GEMM and col2im, and the weight gradient, which
reads rows(x) block by block (``ops.RowBlocks``) where its sink only forms gradients
(``takes_row_blocks``). The same numbers to rounding, on NumPy and on the CuPy path (the
host stand-in), and a captured step replays as eager steps run, bit for bit; sinks that
keep the factors (DP, per-sample norms) still get them whole. The memory it saves is
measured: tracemalloc on NumPy, the workspace's pool bytes on the CuPy path.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import ops, optim
from gpu_mlp.layers import Conv2d, Dense
from gpu_mlp.privacy import DP

from host_cupy import cupy_path
from tracing import step_peak, traced_now, tracing

# every kind of column layer the engine has: a padded entrance, a strided one with a
# remainder block, a 1x1 (no columns), stride = kernel, then the Dense head
INPUT, BATCH, CLASSES = (3, 8, 8), 10, 5


def _layers():
    return [Conv2d(3, 4, 3, padding=1), Conv2d(4, 6, 3, stride=2, padding=1),
            Conv2d(6, 6, 1), Conv2d(6, 5, 2, stride=2), Dense(5 * 2 * 2, CLASSES, "identity")]


def _entrance_budget(dtype) -> int:
    """Three samples of the entrance's columns (P = 64, K = 27): it runs in blocks of
    3, 3, 3, 1; the second layer (P = 16, K = 36) in blocks of 9 and 1."""
    return 3 * 64 * 27 * np.dtype(dtype).itemsize


RULES = {"sgd": lambda: 0.05,
         "sgd-decay": lambda: optim.SGD(0.05, weight_decay=0.1),  # beta != 1 on block one
         "adam": lambda: optim.Adam(1e-2, schedule=optim.Cosine(4, warmup=1))}


@pytest.fixture
def blocks(monkeypatch):
    """Counts the row blocks that weight gradients read."""
    count = [0]
    iterate = ops.RowBlocks.__iter__

    def counted(self):
        for block in iterate(self):
            count[0] += 1
            yield block
    monkeypatch.setattr(ops.RowBlocks, "__iter__", counted)
    return count


@contextlib.contextmanager
def budget(nbytes):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "COLUMN_BUDGET_BYTES", nbytes)
        yield


def _backend(name, lib):
    return cupy_path(lib) if name == "cupy" else contextlib.nullcontext()


def _run(memory, rule, dtype="float64", steps=3, dp=None):
    """loss, gradients and dJ/dX of a fresh net, then ``steps`` training steps: every
    array, on the host."""
    net = gpu_mlp.Network(_layers(), loss="softmax_cross_entropy", memory=memory,
                          device="cpu", dtype=dtype, seed=0)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((BATCH, *INPUT)).astype(dtype)
    Y = rng.integers(0, CLASSES, BATCH)
    J, grads, dX = net.loss_and_gradients(X, Y)
    out = [np.asarray(J), np.asarray(dX)] + [np.asarray(a) for pair in grads for a in pair]
    r = RULES[rule]()
    for _ in range(steps):
        out.append(np.asarray(net.train_step(X, Y, r, dp=dp)))
    return out + [np.asarray(a) for pair in net.params for a in pair]


def _close(a, b, rtol):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(np.abs(y).max(), 1e-300))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_a_batch_over_the_budget_runs_in_blocks_with_the_same_numbers(
        host_cupy_lib, blocks, backend, memory, rule):
    with _backend(backend, host_cupy_lib):
        whole = _run(memory, rule)
        assert blocks[0] == 0  # the default budget holds this batch
        with budget(_entrance_budget("float64")):
            blocked = _run(memory, rule)
    # loss_and_gradients and 3 steps: (4 + 2) blocks each, where the weight gradient is formed
    assert blocks[0] == 4 * 6
    _close(blocked, whole, 1e-12)


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_sinks_that_keep_the_factors_get_rows_whole(host_cupy_lib, blocks, backend):
    """DP clips every sample over all layers before it forms any gradient, and the
    per-sample norms read each sample's rows: both take rows(x) whole."""
    private = dict(max_grad_norm=0.5, noise_multiplier=0.8, seed=4)
    with _backend(backend, host_cupy_lib):
        whole = _run("output", "adam", dp=DP(**private))
        net = gpu_mlp.Network(_layers(), loss="softmax_cross_entropy", device="cpu",
                              dtype="float64", seed=0)
        X = np.random.default_rng(2).standard_normal((BATCH, *INPUT))
        Y = np.arange(BATCH) % CLASSES
        norms = np.asarray(net.per_sample_grad_norms(X, Y))
        with budget(_entrance_budget("float64")):
            blocked = _run("output", "adam", dp=DP(**private))
            blocked_norms = np.asarray(net.per_sample_grad_norms(X, Y))
    assert blocks[0] == 6  # loss_and_gradients' (4 + 2) only: not DP's, not the norms'
    _close(blocked, whole, 1e-12)
    _close([blocked_norms], [norms], 1e-12)


@pytest.mark.parametrize("rule", ["sgd-decay", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_blocked_step_is_captured_and_replayed_as_eager_steps_run(host_cupy_lib, blocks,
                                                                    dtype, rule, monkeypatch):
    from test_capture import _same, _steps
    # the counted conv net's entrance (P = 36, K = 9) in blocks of 2 samples of 8
    monkeypatch.setattr(ops, "COLUMN_BUDGET_BYTES", 2 * 36 * 9 * np.dtype(dtype).itemsize)
    args = dict(kind="conv", memory="output", dtype=dtype, make_rule=RULES[rule])
    params, losses, _, _, net = _steps(host_cupy_lib, **args)
    assert blocks[0] > 0
    eager, eager_losses, _, _, _ = _steps(host_cupy_lib, capture=False, **args)
    _same(params, eager)
    assert losses == eager_losses
    assert (net.step_graphs.captures, net.step_graphs.replays) == (1, 4)


# --- the memory it saves, measured ---------------------------------------------------------

BIG_INPUT, BIG_BATCH, ITEM = (2, 16, 16), 32, 8


def _big_net(memory="output"):
    # the second convolution's columns (P = 256, K = 72) dominate: 4.7 MB over the batch,
    # where a map is 0.5 MB
    return gpu_mlp.Network([Conv2d(2, 8, 3, padding=1), Conv2d(8, 8, 3, padding=1),
                            Dense(8 * 16 * 16, CLASSES, "identity")],
                           loss="softmax_cross_entropy", memory=memory, device="cpu",
                           dtype="float64", seed=0)


def _big_batch():
    rng = np.random.default_rng(3)
    return rng.standard_normal((BIG_BATCH, *BIG_INPUT)), rng.integers(0, CLASSES, BIG_BATCH)


COLUMNS = BIG_BATCH * 256 * 72 * ITEM   # the second layer's rows(x), the whole batch
SAMPLE = 256 * 72 * ITEM                # one sample's
LIMIT = 3 * SAMPLE + SAMPLE // 2        # a budget of 3 samples (and a half)


def _warm_peak(net, X, Y):
    """The traced peak of a warm training step (its first fills the workspace), from
    before the first: what the step holds at its peak, workspace included."""
    with tracing():
        base = traced_now()
        net.train_step(X, Y, 0.01)
        return step_peak(lambda: net.train_step(X, Y, 0.01)) + (traced_now() - base)


@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
def test_the_budget_caps_what_a_numpy_step_holds(monkeypatch, memory):
    # (the budget alone: NumPy's cache-sized row blocks, ops.ROW_BLOCK_BYTES, set aside)
    monkeypatch.setattr(ops, "ROW_BLOCK_BYTES", 1 << 40)
    X, Y = _big_batch()
    whole = _warm_peak(_big_net(memory), X, Y)
    with budget(LIMIT):
        net = _big_net(memory)
        blocked = _warm_peak(net, X, Y)
    # the whole rows(x) gave way to a block of 3 samples (the forward's cache-sized
    # blocks are smaller already)
    saved = COLUMNS - 3 * SAMPLE
    assert whole - blocked >= 0.95 * saved, (whole, blocked, saved)


def test_the_budget_caps_the_workspace_on_the_cupy_path(host_cupy_lib):
    """On a GPU the whole batch was one block, forward and backward: the workspace held
    a column buffer of the batch. Its pool bytes, measured on the stand-in."""
    X, Y = _big_batch()
    held = {}
    for name, nbytes in (("whole", ops.COLUMN_BUDGET_BYTES), ("blocked", LIMIT)):
        with cupy_path(host_cupy_lib), budget(nbytes):
            net = _big_net()
            for _ in range(2):
                net.train_step(X, Y, 0.01)
            held[name] = net.training_workspace.pool_bytes
    assert held["whole"] - held["blocked"] >= 0.95 * (COLUMNS - 3 * SAMPLE), held


def test_the_bench_counts_what_a_step_holds_on_the_cupy_path(host_cupy_lib, tmp_path):
    """bench/column_memory.py's count of a replayed step: the workspace's pool bytes, the
    parameters, the batch and the graph's copy of it, and cuBLAS's two workspaces (the
    eager stream's handle's, the capture stream's); a budget below the columns lowers
    it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import column_memory
    from bench.harness import ConvPoint

    point = ConvPoint((1, 8, 8), 4, 2, 16)
    whole = column_memory.held_bytes(host_cupy_lib, point, column_memory.NONE)
    blocked = column_memory.held_bytes(host_cupy_lib, point, 4 * 64 * 9 * 4)
    batch = 2 * 16 * 64 * 4  # X and the graph's copy of it
    assert whole > blocked > 2 * gpu_mlp.cublas.WORKSPACE_BYTES + batch
    assert ops.COLUMN_BUDGET_BYTES == 16 << 20  # restored
    # the CLI, on the grid's 12 points at a batch of 1, into a folder it makes
    out = tmp_path / "new" / "results.json"
    assert column_memory.main(["--batches", "1", "--budgets", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["records"]) == 12 and set(doc["budgets"]) == {"none", "1 MiB"}
    assert all(r["torch_peak_bytes"] is None for r in doc["records"])
    assert str(tmp_path) not in json.dumps(doc["environment"])
    for bad in (["--budgets", "0"], ["--batches", "x"]):
        with pytest.raises(SystemExit):
            column_memory.main(bad)


def test_column_blocks_hold_whole_samples_within_the_budget(monkeypatch):
    monkeypatch.setattr(ops, "COLUMN_BUDGET_BYTES", 1000)
    assert ops.column_block(10, 300) == 3     # 900 bytes of columns a block
    assert ops.column_block(2, 300) == 2      # the batch fits
    assert ops.column_block(10, 5000) == 1    # one sample over the budget: one a block
    assert ops.column_block(0, 300) == 1      # an empty batch: still a loop's step


def test_numpy_weight_gradients_read_rows_in_cache_sized_blocks(monkeypatch, host_cupy_lib):
    """On NumPy a weight gradient's rows(x) come in blocks of ops.ROW_BLOCK_BYTES (within
    the budget); a GPU's, the budget's."""
    from host_cupy import cupy_path

    monkeypatch.setattr(ops, "COLUMN_BUDGET_BYTES", 1000)
    monkeypatch.setattr(ops, "ROW_BLOCK_BYTES", 700)
    x = np.zeros((10, 1))
    assert ops.row_block(x, 300) == 2       # 600 bytes: NumPy's cache-sized block
    assert ops.row_block(x, 5000) == 1      # one sample over both: one a block
    assert ops.row_block(x[:1], 300) == 1   # the batch fits
    monkeypatch.setattr(ops, "ROW_BLOCK_BYTES", 1 << 20)
    assert ops.row_block(x, 300) == 3       # the budget caps it
    monkeypatch.setattr(ops, "ROW_BLOCK_BYTES", 700)
    with cupy_path(host_cupy_lib):  # (where every array is the GPU's)
        assert ops.row_block(x, 300) == 3  # the budget's alone
