"""The engine's memory claims (docs/MATH.md, "Memory modes"), measured rather than assumed.

NumPy reports its allocations to tracemalloc, so on the NumPy backend tracemalloc sees
what a training step really holds. Those measurements are compared with MATH.md's table
of activation memory per memory mode, computed from the sizes below, and with the
workspace's own counters (``bytes``, ``peak_in_use_bytes``, ``allocations``). The
counter checks need no tracemalloc, so they run on CuPy too. What a steady-state step
would make CuPy allocate, and where it would wait for the device, is counted on the host
(``tests/device_counts.py``): nothing, with ``check=False``.
"""

import tracemalloc
from dataclasses import dataclass

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import ops, optim
from gpu_mlp.layers import Conv2d, Dense
from gpu_mlp.privacy import DP
from gpu_mlp.device import to_numpy
from gpu_mlp.workspace import Workspace
from device_counts import CountingXp, DeviceArray, counting_device
from host_cupy import cupy_path
from tracing import numpy_data_now, traced_now, traced_peak, tracing



MODES = gpu_mlp.MEMORY_MODES
LR = 1e-3

# A network whose hidden activations dominate its working memory, with (B, d_k) buffers
# of several of the NumPy twins' row blocks (ops.BLOCK_ELEMENTS).
BATCH, WIDTH, HIDDEN, D_IN, D_OUT = 256, 256, 6, 8, 2
SIZES = [D_IN] + [WIDTH] * HIDDEN + [D_OUT]
ITEM = 8                         # float64
UNIT = BATCH * WIDTH * ITEM      # one (B, d_k) buffer of a hidden layer
# MATH.md, "Memory modes": activation memory of the hidden layers, B d_k per layer for
# "output", the same plus one transient buffer for "recompute", 2 B d_k for "store_both"
ACTIVATION_MEMORY = {"output": HIDDEN * UNIT,
                     "recompute": HIDDEN * UNIT + UNIT,
                     "store_both": 2 * HIDDEN * UNIT}
# Besides the kept activations every mode needs one more (B, d_k) buffer -- going back
# through layer k, Delta_k and dJ/dF_{k-1} are both alive and only F_k has been given
# back -- and the output layer's few (B, d_out) buffers and (B,) vectors (ones, losses).
WORKING_SET = UNIT + 4 * BATCH * D_OUT * ITEM + BATCH * ITEM
# Not the engine's buffers: the NumPy twins' temporaries, a row block's worth (ReLU:
# sigma' before it multiplies Delta, plus a ufunc's casting buffer), and Python objects.
NUMPY_TEMPORARIES = 3 * ops.BLOCK_ELEMENTS * ITEM
assert NUMPY_TEMPORARIES < UNIT
BOOKKEEPING = 16 * 1024

SMALL, REMAINDER = [D_IN, 64, 64, D_OUT], 7  # for the tests that take many steps


def make_net(memory, device="cpu", sizes=SIZES, act="relu"):
    return gpu_mlp.MLP(sizes, activations=act, loss="squared", memory=memory, device=device,
                       dtype="float64", seed=0)


def make_batch(sizes=SIZES, batch=BATCH):
    rng = np.random.default_rng(1)
    return rng.standard_normal((batch, sizes[0])), rng.standard_normal((batch, sizes[-1]))


@dataclass
class Measured:
    peak: int      # traced peak of a warm training step, its workspace included
    retained: int  # array data the net keeps after its first step
    workspace: Workspace


@pytest.fixture(scope="module")
def measured():
    """Per memory mode, a fresh net's first step (which fills the workspace), then a
    warm step, both traced from a baseline taken before the first."""
    X, Y = make_batch()
    result = {}
    for memory in MODES:
        net = make_net(memory)
        with tracing():
            base, data_base = traced_now(), numpy_data_now()
            net.train_step(X, Y, LR)
            retained = numpy_data_now() - data_base
            tracemalloc.reset_peak()
            net.train_step(X, Y, LR)
            result[memory] = Measured(traced_peak() - base, retained, net.training_workspace)
    return result


# --- the memory of a training step, per mode ------------------------------------------

@pytest.mark.parametrize("memory", MODES)
def test_traced_peak_matches_the_math_table(measured, memory):
    expected = ACTIVATION_MEMORY[memory]
    slack = WORKING_SET + NUMPY_TEMPORARIES + BOOKKEEPING
    assert expected <= measured[memory].peak <= expected + slack


@pytest.mark.parametrize("memory", MODES)
def test_workspace_counts_what_numpy_holds(measured, memory):
    m = measured[memory]
    assert m.retained == m.workspace.bytes
    assert m.workspace.peak_in_use_bytes <= m.workspace.bytes


@pytest.mark.parametrize("memory", MODES)
def test_workspace_peak_matches_the_math_table(device, memory):
    net = make_net(memory, device)
    net.train_step(*make_batch(), LR)
    expected = ACTIVATION_MEMORY[memory]
    assert expected <= net.training_workspace.peak_in_use_bytes <= expected + WORKING_SET


def test_modes_rank_as_the_table_says(measured):
    for size in (lambda m: m.peak, lambda m: m.workspace.peak_in_use_bytes,
                 lambda m: m.workspace.bytes):
        output, recompute, store_both = (size(measured[mode]) for mode in
                                         ("output", "recompute", "store_both"))
        # recompute's transient F_k is alive in the forward pass only, while the
        # backward pass of both holds one more (B, d_k) buffer: their peaks may tie
        assert output <= recompute < store_both


def test_store_both_keeps_a_full_extra_buffer_per_layer(measured):
    # sigma'(A_k) beside F_k for every hidden layer, measured, NumPy's temporaries and all
    extra = measured["store_both"].peak - measured["output"].peak
    assert HIDDEN * UNIT - NUMPY_TEMPORARIES <= extra <= HIDDEN * UNIT + NUMPY_TEMPORARIES


# --- no gradient buffers, no allocations in the steady state, W updated in place ----------

@pytest.mark.parametrize("memory", MODES)
def test_train_step_holds_no_gradient_buffers(memory):
    sizes, batch = [256, 512, 512, 4], 2  # weights of 1-2 MiB, activations of 8 KiB
    net = make_net(memory, sizes=sizes)
    X, Y = make_batch(sizes, batch)
    net.train_step(X, Y, LR)  # warm both: workspaces exist before tracing
    net.loss_and_gradients(X, Y)

    def step_peak(step):
        base = traced_now()
        tracemalloc.reset_peak()
        step(X, Y)
        return traced_peak() - base

    with tracing():
        train = step_peak(lambda X, Y: net.train_step(X, Y, LR))
        gradients = step_peak(net.loss_and_gradients)
    assert gradients - train >= sum(W.nbytes for W, _ in net.params)


@pytest.mark.parametrize("memory", MODES)
def test_steady_state_creates_no_buffers(device, memory):
    net = make_net(memory, device, SMALL)
    X, Y = make_batch(SMALL)
    net.train_step(X, Y, LR)
    ws = net.training_workspace
    allocations, held = ws.allocations, ws.bytes
    for _ in range(20):
        net.train_step(X, Y, LR)
    assert (ws.allocations, ws.bytes) == (allocations, held)


@pytest.mark.parametrize("memory", MODES)
def test_batch_sizes_in_turn_run_on_the_same_buffers(device, memory):
    # a full batch, the remainder and a third size, cycled: only the largest allocates
    net = make_net(memory, device, SMALL)
    batches = [make_batch(SMALL, size) for size in (BATCH, REMAINDER, BATCH // 2 + 1)]
    net.train_step(*batches[0], LR)
    ws = net.training_workspace
    allocations, held = ws.allocations, ws.bytes
    for _ in range(10):
        for X, Y in batches:
            net.train_step(X, Y, LR)
    assert (ws.allocations, ws.bytes) == (allocations, held)


@pytest.mark.parametrize("memory", MODES)
def test_steady_state_retains_no_memory(memory):
    net = make_net(memory, sizes=SMALL)
    X, Y = make_batch(SMALL)
    net.train_step(X, Y, LR)
    with tracing():
        J = net.train_step(X, Y, LR)  # traced, so the baseline counts the loss it frees
        base = numpy_data_now()
        for _ in range(20):
            J = net.train_step(X, Y, LR)
        growth = numpy_data_now() - base
    # at most the loss we hold; a leak of even the smallest per-step array, (B,) float64
    # = 256 B, would add 5 KiB
    assert J.shape == () and growth <= J.nbytes


@pytest.mark.parametrize("memory", MODES)
def test_weights_are_updated_in_place(device, memory):
    def data_pointer(a):
        interface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
        return interface["data"][0]

    net = make_net(memory, device, SMALL)
    arrays = [a for pair in net.params for a in pair]
    pointers = [data_pointer(a) for a in arrays]
    weights = [to_numpy(W).copy() for W, _ in net.params]
    net.train_step(*make_batch(SMALL), LR)
    after = [a for pair in net.params for a in pair]
    assert all(a is b for a, b in zip(after, arrays))
    assert [data_pointer(a) for a in after] == pointers
    assert all(not np.array_equal(to_numpy(W), W0)  # and the step did move them
               for (W, _), W0 in zip(net.params, weights))


# --- bounded buffers: no batch-size temporaries, predict in chunks, release on request ------

# every activation with the squared loss, every loss with ReLU
STEADY_CASES = ([(act, "squared") for act in ["relu", "sigmoid", "tanh", "gelu", "softmax"]]
                + [("relu", loss) for loss in ["logistic", "softmax_cross_entropy"]])


@pytest.mark.parametrize("act, loss", STEADY_CASES)
@pytest.mark.parametrize("memory", MODES)
def test_steady_state_step_allocates_no_array_of_batch_size(memory, act, loss):
    # After the first step, what a step allocates beyond the workspace is a few of the
    # NumPy twins' row blocks, whatever the batch: here 4 MiB (B, d) buffers, a few
    # 128 KiB blocks of temporaries (the case was 4 MiB of them every step).
    if act == "gelu" and memory == "output":
        pytest.skip("gelu has no derivative from its output")
    batch, width = 4096, 128
    sizes = [16, width, width, width, 10]
    net = gpu_mlp.MLP(sizes, activations=act, loss=loss, memory=memory, device="cpu",
                      dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, sizes[0]))
    Y = {"squared": rng.standard_normal((batch, 10)),
         "logistic": np.where(rng.standard_normal((batch, 10)) > 0, 1.0, -1.0),
         "softmax_cross_entropy": rng.integers(0, 10, batch)}[loss]
    net.train_step(X, Y, LR, check=False)
    with tracing():
        base = traced_now()
        tracemalloc.reset_peak()
        net.train_step(X, Y, LR, check=False)
        extra = traced_peak() - base
    one_batch_array = batch * width * ITEM
    assert extra <= 8 * ops.BLOCK_ELEMENTS * ITEM <= one_batch_array // 4, \
        f"{extra} bytes beyond the workspace"


def test_predict_memory_is_bounded_and_released_on_request():
    # 100,000 rows through a 64-4096-10 net: predict runs chunks of PREDICT_BUFFER_BYTES
    rows, sizes = 100_000, [64, 4096, 10]
    net = gpu_mlp.MLP(sizes, device="cpu", dtype="float32", seed=0)
    X = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    with tracing():
        base = traced_now()
        tracemalloc.reset_peak()
        out = net.predict(X)
        peak = traced_peak() - base
        held = traced_now() - base
        net.free_buffers()
        released = traced_now() - base
        buffers_left = net.inference_workspace.bytes
    assert out.shape == (rows, 10)
    np.testing.assert_allclose(out[-5:], net.predict(X[-5:]), rtol=1e-5, atol=1e-6)
    assert peak < 300 * 2**20
    assert peak < gpu_mlp.network.PREDICT_BUFFER_BYTES + out.nbytes + 8 * 2**20
    assert held - out.nbytes >= gpu_mlp.network.PREDICT_BUFFER_BYTES // 2  # kept for next time
    assert released - out.nbytes < 2**20 and buffers_left == 0


def test_predicts_buffers_stay_within_the_bound_through_many_layers(monkeypatch):
    """The workspace keeps a buffer for every layer's output: chunks sized by the widest
    layer alone held their sum, 1.6x the bound for a tapered MLP (5x for a deep one)."""
    monkeypatch.setattr(gpu_mlp.network, "PREDICT_BUFFER_BYTES", 1 << 20)
    net = gpu_mlp.MLP([64, 512, 512, 256, 256, 128, 10], device="cpu", dtype="float32",
                      seed=0)
    X = np.random.default_rng(0).standard_normal((4000, 64)).astype(np.float32)
    out = net.predict(X)
    assert out.shape == (4000, 10)
    assert net.inference_workspace.bytes <= 1 << 20
    np.testing.assert_allclose(out[-3:], net.predict(X[-3:]), rtol=1e-5, atol=1e-6)


def test_predict_of_a_deep_net_of_one_width_uses_its_budget(monkeypatch):
    """A net of one width keeps two buffers of it (a layer's input and output), not one
    per layer: chunks sized by the sum over the layers were 8x too small (more, smaller
    GEMMs), the budget an eighth used."""
    monkeypatch.setattr(gpu_mlp.network, "PREDICT_BUFFER_BYTES", 1 << 20)
    net = gpu_mlp.MLP([64] + [256] * 16 + [10], device="cpu", dtype="float32", seed=0)
    net.predict(np.random.default_rng(0).standard_normal((4000, 64)).astype(np.float32))
    assert (1 << 19) <= net.inference_workspace.bytes <= 1 << 20


def test_free_buffers_releases_training_and_inference_buffers(device):
    net = make_net("output", device, SMALL)
    X, Y = make_batch(SMALL)
    net.train_step(X, Y, LR)
    net.predict(X)
    assert net.training_workspace.bytes > 0 and net.inference_workspace.bytes > 0
    net.free_buffers()
    assert net.training_workspace.bytes == 0 and net.inference_workspace.bytes == 0
    J = net.train_step(X, Y, LR)  # and everything works again, on new buffers
    assert np.isfinite(float(to_numpy(J))) and net.training_workspace.bytes > 0


def test_validation_between_epochs_leaves_the_training_buffers_alone(device):
    net = make_net("output", device, SMALL)
    X, Y = make_batch(SMALL, 100)
    net.fit(X, Y, epochs=1, batch_size=32, lr=LR, verbose=False, validation=(X[:50], Y[:50]))
    ws = net.training_workspace
    allocations = ws.allocations
    net.fit(X, Y, epochs=4, batch_size=32, lr=LR, verbose=False, validation=(X[:50], Y[:50]))
    assert ws.allocations == allocations  # 32 and the remainder 4, epoch after epoch


# --- no device allocation, no host synchronisation in a steady-state step (issue 19) ---
#
# On the counting device (tests/device_counts.py): NumPy under CuPy's rules of what
# allocates (a ufunc or reduction without out=, a copy, a new array) and what reads the
# device from the host (float, bool, item, get), the engine taking its CuPy branches.

COUNTED_NETS = {
    "dense": (lambda: [Dense(12, 16, "relu"), Dense(16, 16, "tanh"), Dense(16, 5, "identity")],
              (8, 12)),
    "conv": (lambda: [Conv2d(1, 3, 3, padding=1), Conv2d(3, 4, 3, stride=2, padding=1),
                      Dense(4 * 3 * 3, 5, "identity")], (8, 1, 6, 6)),
    # softmax rows wider than ops.ROW_KERNEL_MAX, hidden and in the loss
    "wide": (lambda: [Dense(12, ops.ROW_KERNEL_MAX + 8, "softmax"),
                      Dense(ops.ROW_KERNEL_MAX + 8, ops.ROW_KERNEL_MAX + 3, "identity")],
             (8, 12)),
}
RULES = {"sgd": lambda: 1e-3, "momentum": lambda: optim.SGD(1e-3, momentum=0.9, nesterov=True),
         "adam": lambda: optim.Adam(1e-3, weight_decay=1e-2), "adamw": lambda: optim.AdamW(1e-3)}


def counted_net(kind, memory, loss="softmax_cross_entropy"):
    make, shape = COUNTED_NETS[kind]
    net = gpu_mlp.Network(make(), loss=loss, memory=memory, device="cpu", seed=0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal(shape).astype(np.float32).view(DeviceArray)
    Y = (rng.integers(0, 5, shape[0]) if loss == "softmax_cross_entropy"
         else np.sign(rng.standard_normal((shape[0], 5))).astype(np.float32)).view(DeviceArray)
    return net, X, Y


def steady_counts(net, step, steps=3):
    """The counts of ``steps`` steady-state steps (after three to warm up)."""
    with counting_device(net) as counts:
        for _ in range(3):
            step()
        counts.reset()
        for _ in range(steps):
            step()
        return counts.allocations, counts.syncs, counts.where


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("memory", MODES)
@pytest.mark.parametrize("kind", COUNTED_NETS)
def test_steady_state_step_allocates_nothing_on_the_device(kind, memory, rule):
    net, X, Y = counted_net(kind, memory)
    r = RULES[rule]()
    assert steady_counts(net, lambda: net.train_step(X, Y, r, check=False)) == (0, 0, [])


@pytest.mark.parametrize("loss", ["squared", "logistic", "softmax_cross_entropy"])
def test_steady_state_loop_that_keeps_the_latest_loss_allocates_nothing(loss):
    net, X, Y = counted_net("dense", "output", loss)
    held = []

    def step():  # as `loss = net.train_step(...)` in a loop: the last loss is held
        held[:] = [net.train_step(X, Y, 1e-3, check=False)]
    assert steady_counts(net, step) == (0, 0, [])


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_steady_state_private_step_allocates_nothing_on_the_device(kind):
    net, X, Y = counted_net(kind, "output")
    dp = DP(max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    assert steady_counts(net, lambda: net.train_step(X, Y, 1e-3, check=False, dp=dp))[:2] == (0, 0)


def test_steady_state_step_with_wide_softmax_rows_allocates_nothing():
    # rows of ROW_LANES threads each: their shares in the workspace and the loss's scratch
    width = ops.ROW_KERNEL_MAX + 8
    net = gpu_mlp.Network([Dense(12, width, "softmax"), Dense(width, width, "identity")],
                          loss="softmax_cross_entropy", device="cpu", seed=0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 12)).astype(np.float32).view(DeviceArray)
    Y = rng.integers(0, width, 8).view(DeviceArray)
    assert steady_counts(net, lambda: net.train_step(X, Y, 1e-3, check=False))[:2] == (0, 0)


def test_workspace_loss_buffers_are_reused_unless_held():
    ws = Workspace(np, np.float64)
    for _ in range(4):
        ws.loss()[...] = 1.0
    assert ws.allocations == 2  # both at the first step, none since
    latest = ws.loss()
    assert ws.loss() is not latest and ws.allocations == 2  # the latest stays valid
    kept = []
    for value in range(5):  # held: each left to its holder when its turn comes, replaced
        kept.append(ws.loss())
        kept[-1][...] = value
    assert [float(J) for J in kept] == list(range(5)) and ws.bytes == 2 * 8


@pytest.mark.parametrize("kind", COUNTED_NETS)
def test_checked_step_synchronises_once(kind):
    net, X, Y = counted_net(kind, "output")
    allocations, syncs, where = steady_counts(net, lambda: net.train_step(X, Y, 1e-3), steps=4)
    assert syncs == 4, where  # the verdicts of the value checks: one read per step


def test_fit_neither_allocates_nor_synchronises_between_loss_reads(monkeypatch):
    net, X, Y = counted_net("dense", "output")
    X, Y = np.tile(X, (4, 1)).view(DeviceArray), np.tile(Y, 4).view(DeviceArray)
    monkeypatch.setattr(gpu_mlp.training, "_REFRESH_S", 1e9)  # no read within the epoch
    seen, step = [], net._step

    def counted_step(*args, **kwargs):
        seen.append((counts.allocations, counts.syncs))
        return step(*args, **kwargs)
    monkeypatch.setattr(net, "_step", counted_step)
    with counting_device(net) as counts:
        net.fit(X, Y, epochs=2, batch_size=8, lr=1e-3, verbose=False)
    # from the first epoch's third step to its last (its second captures the step, and
    # makes the graph's static buffers then), and within the second epoch
    per_epoch = len(seen) // 2
    for epoch in range(2):
        steps = seen[epoch * per_epoch + 2:(epoch + 1) * per_epoch]
        assert len(set(steps)) == 1, (epoch, steps, counts.where)


def test_a_kept_loss_keeps_its_value(device):
    net = make_net("output", device, SMALL)
    X, Y = make_batch(SMALL)
    losses = [net.train_step(X, Y, 0.05) for _ in range(5)]
    values = [float(to_numpy(J)) for J in losses]
    assert len(set(values)) == 5  # each step's own loss, none overwritten by a later step
    latest = net.train_step(X, Y, 0.05)
    before = float(to_numpy(latest))
    net.train_step(X, Y, 0.05)  # the loss the last step returned stays valid during the next
    assert float(to_numpy(latest)) == before


@pytest.mark.parametrize("widths", [(5, 7), (40, 100), (1, 33)], ids=str)
def test_gpu_dense_per_sample_squares_match_the_cpu_ones(host_cupy_lib, widths):
    """A dense layer's ||T_i||^2 (||x_i||^2 + 1) by the GPU's two wide-row kernels (the
    host build of their bodies, launched as ops launches them) against the NumPy path's
    per_sample_squares: added to what the buffer held, nothing where T_i = 0 even with
    ||x_i||^2 infinite, NaN kept; rows narrower and wider than a row's 32 threads."""
    from gpu_mlp import norms

    d_out, K = widths
    rng = np.random.default_rng(3)
    T, X = rng.standard_normal((9, 1, d_out)), rng.standard_normal((9, 1, K))
    T[3], X[3, 0, 0] = 0.0, np.inf  # G_3 = 0
    T[5, 0, 0] = np.nan
    with np.errstate(invalid="ignore", over="ignore"):
        expected = 2.0 + norms.per_sample_squares(T, X)
    expected[3] = 2.0
    ws = Workspace(np, np.float64)
    out = np.full(9, 2.0)
    with cupy_path(host_cupy_lib) as device:
        norms.add_squares(CountingXp(), T, X, out, ws)  # (not NumPy: the GPU's branch)
    assert {name.split("<")[0] for name in device.launches} == {
        "gm_wide_square_shares", "gm_wide_add_squares"}
    np.testing.assert_allclose(out, expected, rtol=1e-13)
    assert ws.in_use_bytes == 0


@pytest.mark.parametrize("widths", [(5, 7), (70, 100)], ids=str)
def test_gpu_row_squares_of_kept_gradients_match_the_cpu_ones(host_cupy_lib, widths):
    """A convolution's kept per-sample gradients: ||G_i||^2 + ||g_i||^2 by the GPU's two
    wide-row kernels against NumPy's row_squares_into, added to what out held."""
    from gpu_mlp import norms

    rng = np.random.default_rng(4)
    a, b = (rng.standard_normal((9, n)) for n in widths)
    a[2, 0] = np.nan
    expected = np.full(9, 2.0)
    norms.add_row_squares(np, a, b, expected, Workspace(np, np.float64))
    out, ws = np.full(9, 2.0), Workspace(np, np.float64)
    with cupy_path(host_cupy_lib) as device:
        norms.add_row_squares(CountingXp(), a, b, out, ws)  # (not NumPy: the GPU's branch)
    assert {name.split("<")[0] for name in device.launches} == {
        "gm_wide_square_shares", "gm_wide_add_squares"}
    np.testing.assert_allclose(out, expected, rtol=1e-13)
    assert np.isnan(out[2]) and ws.in_use_bytes == 0
