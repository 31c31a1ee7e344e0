"""The CuPy engine on a CUDA GPU: against the reference and the NumPy engine, its memory,
its steady state and its inputs.

Every test here needs CuPy and a CUDA GPU and is skipped without them (the CUDA math is
also checked on any CPU by test_cuda_host.py, and every launch compiled by NVRTC by
test_nvrtc.py). Gradients are compared per array by the norm-wise relative error:
float64 to 1e-10 against the float64 reference, float32 to 1e-5 (1e-4 for convolutions,
whose GEMMs and bias sums run over many more terms) against the float64 reference run
from the same float32 parameters and data.
"""

import contextlib
import gc
import time
import warnings

import numpy as np
import pytest

from gpu_mlp import MEMORY_MODES, MLP, Network, activations, ops, reference
from gpu_mlp.device import to_device, to_numpy
from gpu_mlp.layers import Conv2d, Dense
from gpu_mlp.plan import StepPlan

pytestmark = pytest.mark.gpu  # skipped, with the reason, by conftest without a GPU

DEVICE = "cuda"
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
CONV_RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}
DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def assert_rel(got, want, rtol, what):
    """``||got - want|| <= rtol ||want||``, with ``got`` on any device."""
    got = to_numpy(got).astype(np.float64)
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), np.finfo(np.float64).tiny)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


# --- the engine against the reference -------------------------------------------------------

HIDDEN = ["identity", "relu", "relu(alpha=0.5)", "sigmoid", "tanh", "gelu", "softmax"]
# case: (output activation, loss); the targets come from targets(case, ...)
OUTPUTS = {
    "squared": ("identity", "squared"),
    "softmax-squared": ("softmax", "squared"),
    "logistic": ("identity", "logistic"),
    "xent-labels": ("identity", "softmax_cross_entropy"),
    "xent-probabilities": ("identity", "softmax_cross_entropy"),
}
MODES_AND_HIDDEN = [(memory, hidden) for memory in MEMORY_MODES for hidden in HIDDEN
                    if memory != "output" or activations.get(hidden).has_grad_from_output]


def targets(case, B, d, rng):
    if case == "logistic":
        return np.where(rng.random((B, d)) < 0.5, -1.0, 1.0)
    if case == "xent-labels":
        return rng.integers(0, d, B)
    if case == "xent-probabilities":
        return activations.get("softmax")(rng.normal(0, 2, (B, d)))
    return rng.normal(0, 1, (B, d))


def batch(case, sizes, B, dtype, seed=0):
    """A batch (X, Y) in ``dtype`` (integer labels stay int64)."""
    rng = np.random.default_rng(seed)
    Y = targets(case, B, sizes[-1], rng)
    return (rng.normal(0, 1, (B, sizes[0])).astype(dtype),
            Y if Y.dtype.kind == "i" else Y.astype(dtype))


def compare_with_reference(cp, net, X, Y):
    """net.loss_and_gradients and net.predict against the float64 reference, run from the
    net's own parameters and the same (already rounded) data."""
    params = [(to_numpy(W).astype(np.float64), to_numpy(b).astype(np.float64))
              for W, b in net.params]
    X64 = X.astype(np.float64)
    Y64 = Y if Y.dtype.kind == "i" else Y.astype(np.float64)
    J_ref, grads_ref, dX_ref = reference.loss_and_gradients(params, net.activations, net.loss,
                                                            X64, Y64)
    J, grads, dX = net.loss_and_gradients(cp.asarray(X), cp.asarray(Y))
    rtol = RTOL[net.dtype]
    assert_rel(J, J_ref, rtol, "loss")
    for k, ((dW, db), (dW_ref, db_ref)) in enumerate(zip(grads, grads_ref), start=1):
        assert_rel(dW, dW_ref, rtol, f"dW_{k}")
        assert_rel(db, db_ref, rtol, f"db_{k}")
    assert_rel(dX, dX_ref, rtol, "dX")
    assert_rel(net.predict(cp.asarray(X)), reference.forward(params, net.activations, X64),
               rtol, "predict")


@pytest.mark.parametrize("case", OUTPUTS)
@pytest.mark.parametrize("memory, hidden", MODES_AND_HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_activation_loss_and_mode_matches_reference(cp, dtype, memory, hidden, case):
    output, loss = OUTPUTS[case]
    sizes = [6, 16, 12, 4]
    net = MLP(sizes, activations=hidden, output=output, loss=loss, memory=memory,
              device=DEVICE, dtype=dtype, seed=1)
    compare_with_reference(cp, net, *batch(case, sizes, 33, dtype))


@pytest.mark.parametrize("B", [1, 7, 1000])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("memory", MEMORY_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_depths_and_batch_sizes_match_reference(cp, dtype, memory, depth, B):
    sizes = [5] + [9] * (depth - 1) + [3]
    net = MLP(sizes, activations="tanh", loss="softmax_cross_entropy", memory=memory,
              device=DEVICE, dtype=dtype, seed=2)
    compare_with_reference(cp, net, *batch("xent-labels", sizes, B, dtype))


@pytest.mark.parametrize("hidden, case", [("relu", "xent-labels"), ("sigmoid", "squared")])
@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_train_step_matches_numpy_engine(cp, memory, hidden, case):
    output, loss = OUTPUTS[case]
    sizes = [8, 32, 16, 4]
    nets = [MLP(sizes, activations=hidden, output=output, loss=loss, memory=memory,
                device=device, dtype="float64", seed=3) for device in (DEVICE, "cpu")]
    for step in range(3):
        X, Y = batch(case, sizes, 50, np.float64, seed=step)
        J_gpu = nets[0].train_step(cp.asarray(X), cp.asarray(Y), lr=0.1)
        J_cpu = nets[1].train_step(X, Y, lr=0.1)
        assert_rel(J_gpu, J_cpu, 1e-10, f"loss of step {step}")
    for k, ((W, b), (W_cpu, b_cpu)) in enumerate(zip(nets[0].params, nets[1].params), start=1):
        assert_rel(W, W_cpu, 1e-10, f"W_{k}")
        assert_rel(b, b_cpu, 1e-10, f"b_{k}")


# --- convolutional networks ----------------------------------------------------------------

# name: (the layers, given the hidden activation; one sample's shape; the targets' case)
CONV_NETS = {
    # padded, then strided convolutions into a Dense classifier
    "conv-conv-dense": (lambda act: [Conv2d(2, 4, 3, padding=1, activation=act),
                                     Conv2d(4, 3, 3, stride=2, activation=act),
                                     Dense(3 * 4 * 3, 5, activation="identity")],
                        (2, 9, 8), "xent-labels"),
    # a rectangular kernel, stride and padding unequal per axis, one output channel (CuPy
    # reduces its bias launches to 1-D), and a Conv2d last, its output flattened
    "one-channel-conv-last": (lambda act: [Conv2d(3, 1, (3, 2), stride=(2, 1), padding=(1, 0),
                                                  activation=act),
                                           Conv2d(1, 2, 2, activation="identity")],
                              (3, 7, 6), "squared"),
    # a kernel as large as the image: 1 x 1 outputs (the bias launches 2-D, as a Dense)
    "1x1-output": (lambda act: [Conv2d(2, 6, (5, 4), activation=act),
                                Dense(6, 4, activation=act),
                                Dense(4, 3, activation="identity")],
                   (2, 5, 4), "logistic"),
}
CONV_LOSSES = {"xent-labels": "softmax_cross_entropy", "squared": "squared",
               "logistic": "logistic"}
CONV_MODES_AND_HIDDEN = [(memory, hidden) for memory in MEMORY_MODES
                         for hidden in ["relu", "relu(alpha=0.5)", "sigmoid", "tanh", "gelu"]
                         if memory != "output" or activations.get(hidden).has_grad_from_output]


def conv_net(name, hidden, memory, dtype, device=DEVICE, seed=0):
    """``CONV_NETS[name]`` with random weights and biases (a bias of 0 would hide a lost
    bias), on ``device``."""
    make_layers, _, case = CONV_NETS[name]
    layers = make_layers(hidden)
    rng = np.random.default_rng(seed)
    params = [((rng.normal(0, 1, layer.weight_shape) / np.sqrt(layer.fan_in)).astype(dtype),
               rng.normal(0, 0.5, layer.bias_shape).astype(dtype)) for layer in layers]
    return Network.from_params(layers, params, loss=CONV_LOSSES[case], memory=memory,
                               device=device, dtype=dtype)


def conv_batch(name, B, dtype, seed=0):
    """A batch (X, Y) for ``CONV_NETS[name]`` in ``dtype`` (integer labels stay int64)."""
    make_layers, shape, case = CONV_NETS[name]
    X_shape = shape
    for layer in make_layers("relu"):
        shape = layer.output_shape(shape)
    rng = np.random.default_rng(seed)
    Y = targets(case, B, int(np.prod(shape)), rng)
    return (rng.normal(0, 1, (B, *X_shape)).astype(dtype),
            Y if Y.dtype.kind == "i" else Y.astype(dtype))


def compare_network_with_reference(cp, net, X, Y, rtol):
    """net.loss_and_gradients and net.predict (on the batch and on its first sample)
    against the float64 reference (network_loss_and_gradients), run from the net's own
    parameters and the same (already rounded) data."""
    params = [(to_numpy(W).astype(np.float64), to_numpy(b).astype(np.float64))
              for W, b in net.params]
    X64 = X.astype(np.float64)
    Y64 = Y if Y.dtype.kind == "i" else Y.astype(np.float64)
    J_ref, grads_ref, dX_ref = reference.network_loss_and_gradients(net.layers, params,
                                                                    net.loss.name, X64, Y64)
    J, grads, dX = net.loss_and_gradients(cp.asarray(X), cp.asarray(Y))
    assert_rel(J, J_ref, rtol, "loss")
    for k, ((dW, db), (dW_ref, db_ref)) in enumerate(zip(grads, grads_ref), start=1):
        assert dW.shape == dW_ref.shape and db.shape == db_ref.shape
        assert_rel(dW, dW_ref, rtol, f"dW_{k}")
        assert_rel(db, db_ref, rtol, f"db_{k}")
    assert dX.shape == X.shape
    assert_rel(dX, dX_ref, rtol, "dX")
    F_ref = reference.network_forward(net.layers, params, X64)
    assert_rel(net.predict(cp.asarray(X)), F_ref, rtol, "predict")
    assert_rel(net.predict(cp.asarray(X[0])), F_ref[0], rtol, "predict, one sample")


@pytest.mark.parametrize("name", CONV_NETS)
@pytest.mark.parametrize("memory, hidden", CONV_MODES_AND_HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_networks_match_reference(cp, dtype, memory, hidden, name):
    net = conv_net(name, hidden, memory, dtype)
    compare_network_with_reference(cp, net, *conv_batch(name, 7, dtype), CONV_RTOL[net.dtype])


@pytest.mark.parametrize("B", [1, 2, 300])
@pytest.mark.parametrize("name", CONV_NETS)
@pytest.mark.parametrize("memory", MEMORY_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_batch_sizes_match_reference(cp, dtype, memory, name, B):
    net = conv_net(name, "tanh", memory, dtype, seed=1)
    compare_network_with_reference(cp, net, *conv_batch(name, B, dtype, seed=1),
                                   CONV_RTOL[net.dtype])


@pytest.mark.parametrize("hidden", ["relu", "sigmoid"])
@pytest.mark.parametrize("name", CONV_NETS)
@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_conv_train_step_matches_numpy_engine(cp, memory, name, hidden):
    nets = [conv_net(name, hidden, memory, "float64", device=device, seed=3)
            for device in (DEVICE, "cpu")]
    for step in range(3):
        X, Y = conv_batch(name, 20, np.float64, seed=step)
        J_gpu = nets[0].train_step(cp.asarray(X), cp.asarray(Y), lr=0.1)
        J_cpu = nets[1].train_step(X, Y, lr=0.1)
        assert_rel(J_gpu, J_cpu, 1e-10, f"loss of step {step}")
    for k, ((W, b), (W_cpu, b_cpu)) in enumerate(zip(nets[0].params, nets[1].params), start=1):
        assert_rel(W, W_cpu, 1e-10, f"W_{k}")
        assert_rel(b, b_cpu, 1e-10, f"b_{k}")
    X, Y = conv_batch(name, 20, np.float64, seed=9)
    assert_rel(nets[0].per_sample_grad_norms(cp.asarray(X), cp.asarray(Y)),
               nets[1].per_sample_grad_norms(X, Y), 1e-10, "per-sample gradient norms")


# --- rows wider than one thread's: the wide-row kernels, ROW_LANES threads a row ----------

WIDE_ROWS = 100  # classes, and a hidden softmax's width: over ops.ROW_KERNEL_MAX


@pytest.fixture
def wide_launches(monkeypatch):
    """The names of the row kernels the engine launches while the test runs."""
    launched = set()
    launch = ops._launch_rows

    def recording(name, *args):
        launched.add(name)
        launch(name, *args)

    monkeypatch.setattr(ops, "_launch_rows", recording)
    return launched


@pytest.mark.parametrize("case", ["xent-labels", "xent-probabilities", "softmax-squared"])
@pytest.mark.parametrize("memory", MEMORY_MODES)
@pytest.mark.parametrize("B", [1, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_softmax_and_cross_entropy_match_reference(cp, wide_launches, dtype, B, memory,
                                                        case):
    assert WIDE_ROWS > ops.ROW_KERNEL_MAX
    output, loss = OUTPUTS[case]
    sizes = [12, WIDE_ROWS, 24, WIDE_ROWS]
    rng = np.random.default_rng(4)  # biases too: the wide softmax adds its own
    params = [((rng.normal(0, 1, (d_out, d_in)) / np.sqrt(d_in)).astype(dtype),
               rng.normal(0, 0.5, d_out).astype(dtype)) for d_in, d_out in zip(sizes, sizes[1:])]
    net = MLP.from_params(params, ["softmax", "tanh", output], loss=loss, memory=memory,
                          device=DEVICE)
    compare_with_reference(cp, net, *batch(case, sizes, B, dtype, seed=4))
    # the rows went to the wide-row kernels, not to a thread each
    wide = {"gm_wide_max", "gm_wide_exp", "gm_wide_normalize", "gm_wide_dot",
            "gm_wide_softmax_backward"}
    wide |= ({"gm_wide_xent_labels"} if case == "xent-labels" else
             {"gm_wide_xent_targets", "gm_wide_row_sums"} if case == "xent-probabilities"
             else set())
    assert wide <= wide_launches, f"not launched: {sorted(wide - wide_launches)}"
    assert not {"gm_softmax_forward", "gm_softmax_backward"} & wide_launches


# --- memory ------------------------------------------------------------------------------------

WIDE, WIDE_BATCH = [1024, 4096, 4096, 4096, 10], 512
# what a step may get from the device for CuPy's pool besides the workspace: the 0-d loss
# and the scratch of its reduction, freed by the step's end but kept in the pool
POOL_SLACK = 1 << 20


def classifier(memory, sizes=WIDE):
    return MLP(sizes, activations="relu", loss="softmax_cross_entropy", memory=memory,
               device=DEVICE, dtype="float32", seed=0)


def classifier_batch(cp, sizes, B):
    X, y = batch("xent-labels", sizes, B, np.float32)
    return cp.asarray(X), cp.asarray(y)


def _step_graph_bytes(net, unit=512):
    """The pool bytes of what ``net.step_graphs`` holds (gpu_mlp/graph.py): each
    configuration's static input, targets and loss, and the step scalars (plan.py)."""
    graphs = net.step_graphs
    arrays = [a for e in graphs._entries.values() for a in (e.X, e.Y, e.loss)]
    arrays += [a for s, _, _ in graphs._scalars.values() for a in (s.values, s.counters, s.table)]
    return sum(-(-a.nbytes // unit) * unit for a in arrays if a is not None)


def test_memory_modes_peak_and_pool_usage(cp):
    pool = cp.get_default_memory_pool()
    X, y = classifier_batch(cp, WIDE, WIDE_BATCH)
    for memory in MEMORY_MODES:  # build the kernels and cuBLAS's state outside the count
        small = [WIDE[0], 16, 16, 16, WIDE[-1]]
        classifier(memory, small).train_step(X, y, lr=1e-3, check=False)
    peak, grown = {}, {}
    for memory in MEMORY_MODES:
        net = classifier(memory)
        gc.collect()
        # in use: X, y, the params; free_all_blocks cannot release a free block split off
        # an allocation still partly in use, and the step may reuse such a block, so the
        # pool's total_bytes() may grow by less than the workspace (33554432 bytes against
        # the workspace's 33599488 on an H200): compare what is in use, like with like
        pool.free_all_blocks()
        used, total = pool.used_bytes(), pool.total_bytes()
        net.train_step(X, y, lr=1e-3, check=False)  # the loss (and all else) goes at once
        gc.collect()
        ws = net.training_workspace
        grown[memory] = pool.used_bytes() - used
        peak[memory] = ws.peak_in_use_bytes
        # what stays in use after a step is the workspace and what the step graphs keep
        # (a warm-up's static inputs and loss, the device scalars), each buffer rounded up
        # to the pool's 512-byte unit, exactly; the device gave the pool little more
        kept = ws.pool_bytes + _step_graph_bytes(net)
        assert ws.peak_in_use_bytes <= ws.bytes <= ws.pool_bytes
        assert kept == grown[memory]
        assert pool.total_bytes() - total <= kept + POOL_SLACK
        del net, ws
    # store_both keeps D_k = sigma'(A_k) next to every hidden F_k; output mode keeps F_k only
    hidden_bytes = WIDE_BATCH * sum(WIDE[1:-1]) * 4
    assert peak["store_both"] - peak["output"] >= hidden_bytes
    assert grown["output"] < grown["store_both"]
    assert grown["recompute"] < grown["store_both"]


SIZES, BATCH = [64, 256, 256, 10], 128
# a convolutional classifier of the same batch: padded, then strided convolutions (im2col
# and col2im, the NCHW <-> rows transposes, (c, 1, 1) biases) into a Dense layer
CONV_INPUT = (3, 16, 16)


def conv_classifier(memory):
    layers = [Conv2d(3, 16, 3, padding=1, activation="relu"),
              Conv2d(16, 16, 3, stride=2, padding=1, activation="relu"),
              Dense(16 * 8 * 8, 10, activation="identity")]
    return Network(layers, loss="softmax_cross_entropy", memory=memory, device=DEVICE,
                   dtype="float32", seed=0, input_shape=CONV_INPUT)


def conv_classifier_batch(cp, B):
    rng = np.random.default_rng(0)
    return (cp.asarray(rng.normal(0, 1, (B, *CONV_INPUT)).astype(np.float32)),
            cp.asarray(rng.integers(0, 10, B)))


@pytest.fixture(params=[(kind, memory) for kind in ("dense", "conv") for memory in MEMORY_MODES],
                ids="-".join)
def warm(cp, request):
    """A net and a batch after two warm-up steps: kernels built, workspace filled, and
    the pool holding the blocks a step frees while the previous step's loss is kept."""
    kind, memory = request.param
    if kind == "dense":
        net = classifier(memory, SIZES)
        X, y = classifier_batch(cp, SIZES, BATCH)
    else:
        net = conv_classifier(memory)
        X, y = conv_classifier_batch(cp, BATCH)
    for _ in range(2):
        loss = net.train_step(X, y, lr=1e-3, check=False)
    del loss
    cp.cuda.get_current_stream().synchronize()
    return net, X, y


@contextlib.contextmanager
def cupy_sync_detection():
    """``cupyx.allow_synchronize(False)`` where this CuPy still has it: deprecated since
    CuPy 10 and blind to the syncs CuPy does not declare, it is only a second check."""
    import cupyx

    if not hasattr(cupyx, "allow_synchronize"):
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="cupyx.allow_synchronize")  # deprecated
        with cupyx.allow_synchronize(False):
            yield


def _step(net, X, y, capture):
    """A steady-state step: replayed from its graph (train_step after the warm-up), or
    eager (``Network._step(capture=False)``: the engine's Python runs every launch)."""
    if capture:
        return net.train_step(X, y, lr=1e-3, check=False)
    return net._step(X, y, StepPlan.of(1e-3), False, global_loss=True, capture=False)


@pytest.mark.parametrize("capture", [True, False], ids=["replayed", "eager"])
def test_steady_state_allocates_nothing(cp, warm, capture):
    net, X, y = warm
    _step(net, X, y, capture)  # the eager form's own first step
    pool = cp.get_default_memory_pool()
    total, allocations = pool.total_bytes(), net.training_workspace.allocations
    with cupy_sync_detection():
        for _ in range(10):
            loss = _step(net, X, y, capture)
    assert pool.total_bytes() == total
    assert net.training_workspace.allocations == allocations
    assert np.isfinite(float(loss))


def _mallocs():
    """A CuPy MemoryHook counting the pool's allocations (``count``), cache hits
    included: ``malloc_preprocess`` runs before each (memory.pyx)."""
    from cupy.cuda import memory_hook

    class Mallocs(memory_hook.MemoryHook):
        name = "gpu_mlp_mallocs"

        def __init__(self):
            self.count = 0

        def malloc_preprocess(self, **kwargs):
            self.count += 1
    return Mallocs()


@pytest.mark.parametrize("capture", [True, False], ids=["replayed", "eager"])
def test_steady_state_takes_nothing_from_the_pool(cp, warm, capture):
    """What ../shared/gpu/busy.py counted (3 a step before issue 19): CuPy pool
    allocations of a steady-state step, cache hits included, seen by a MemoryHook."""
    net, X, y = warm
    _step(net, X, y, capture)
    hook = _mallocs()
    with hook:
        for _ in range(10):
            loss = _step(net, X, y, capture)
    assert hook.count == 0
    assert np.isfinite(float(loss))


_SPIN = r"""
extern "C" __global__ void spin(unsigned long long ns)
{
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""


def test_train_steps_never_wait_for_the_gpu(cp, warm):
    """Queue 1 s of GPU work ahead of 5 train_steps: had any step synchronised with the
    device, the host would have waited for it, and the stream would be idle by the end."""
    net, X, y = warm
    spin = cp.RawKernel(_SPIN, "spin")
    spin((1,), (1,), (np.uint64(0),))  # compile it now
    stream = cp.cuda.get_current_stream()
    stream.synchronize()
    with cupy_sync_detection():
        start = time.perf_counter()
        spin((1,), (1,), (np.uint64(1_000_000_000),))
        for _ in range(5):
            loss = net.train_step(X, y, lr=1e-3, check=False)
        host_seconds = time.perf_counter() - start
        still_busy = not stream.done
    stream.synchronize()
    assert still_busy and host_seconds < 0.5
    assert np.isfinite(float(loss))


def test_numpy_batches_are_checked_on_the_host_and_copied_in_without_waiting(cp, warm):
    """Host batches (NumPy), checked (check=True, the default): cast and scanned on the
    host, copied into the workspace's kept buffers by cupy.ndarray.set, which the
    replayed graph reads -- no pool allocation, and no step waits for the GPU (queued
    behind 1 s of GPU work, the host is done with 5 steps long before)."""
    net, X, y = warm
    X, y = cp.asnumpy(X), cp.asnumpy(y)
    for _ in range(3):  # warm-up and capture, for these buffers
        loss = net.train_step(X, y, lr=1e-3)
    del loss
    spin = cp.RawKernel(_SPIN, "spin")
    spin((1,), (1,), (np.uint64(0),))
    stream = cp.cuda.get_current_stream()
    stream.synchronize()
    hook = _mallocs()
    with hook, cupy_sync_detection():
        start = time.perf_counter()
        spin((1,), (1,), (np.uint64(1_000_000_000),))
        for _ in range(5):
            loss = net.train_step(X, y, lr=1e-3)
        host_seconds = time.perf_counter() - start
        still_busy = not stream.done
    stream.synchronize()
    assert hook.count == 0
    assert still_busy and host_seconds < 0.5
    assert np.isfinite(float(loss)) and net.step_graphs.replays >= 5


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_numpy_batches_replay_as_eager_steps_on_device_arrays_run(cp, kind):
    """New NumPy batches each step, replayed from the graph that reads the kept buffers:
    the parameters and losses of eager steps on the same batches as CuPy arrays, bit for
    bit."""
    rng = np.random.default_rng(3)
    shape = (BATCH, SIZES[0]) if kind == "dense" else (BATCH, *CONV_INPUT)
    batches = [(rng.standard_normal(shape).astype(np.float32),
                rng.integers(0, 10, BATCH)) for _ in range(6)]
    runs = []
    for host in (True, False):
        net = classifier("output", SIZES) if kind == "dense" else conv_classifier("output")
        losses = []
        for X, y in batches:
            if host:
                J = net.train_step(X, y, lr=1e-2)
            else:
                J = net._step(cp.asarray(X), cp.asarray(y), StepPlan.of(1e-2), True,
                              global_loss=True, capture=False)
            losses.append(float(J))
        runs.append(([cp.asnumpy(a) for pair in net.params for a in pair], losses, net))
    (params, losses, net), (eager, eager_losses, _) = runs
    assert net.step_graphs.replays == 4
    for a, b in zip(params, eager):
        np.testing.assert_array_equal(a, b)
    assert losses == eager_losses


# --- inputs and parameters ---------------------------------------------------------------------

def test_torch_cupy_and_numpy_inputs_agree_and_torch_is_not_copied(cp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs PyTorch with CUDA")
    X, y = batch("xent-labels", SIZES, BATCH, np.float32)
    X_torch, y_torch = torch.from_numpy(X).cuda(), torch.from_numpy(y).cuda()
    torch.cuda.synchronize()
    assert to_device(X_torch, cp).data.ptr == X_torch.data_ptr()  # DLPack: shared memory
    step_losses = [classifier("output", SIZES).train_step(X_in, y_in, lr=1e-3)
                   for X_in, y_in in ((X_torch, y_torch), (cp.asarray(X), cp.asarray(y)), (X, y))]
    for loss in step_losses[1:]:
        assert_rel(loss, to_numpy(step_losses[0]), 1e-6, "loss")


def test_a_failed_step_leaves_the_parameters_alone(cp):
    net = classifier("output", SIZES)
    X, y = classifier_batch(cp, SIZES, BATCH)
    before = [(W.copy(), b.copy()) for W, b in net.params]
    with pytest.raises(ValueError, match="labels"):
        net.train_step(X, cp.full(BATCH, SIZES[-1]), lr=1e-3)  # one past the last class
    X[0, 0] = cp.nan
    with pytest.raises(ValueError, match="NaN"):
        net.train_step(X, y, lr=1e-3)
    for (W, b), (W0, b0) in zip(net.params, before):
        assert bool(cp.array_equal(W, W0)) and bool(cp.array_equal(b, b0))


def test_train_step_updates_the_parameters_in_place(cp):
    net = classifier("output", SIZES)
    X, y = classifier_batch(cp, SIZES, BATCH)
    pointers = [(W.data.ptr, b.data.ptr) for W, b in net.params]
    before = [W.copy() for W, _ in net.params]
    net.train_step(X, y, lr=1e-1)
    assert [(W.data.ptr, b.data.ptr) for W, b in net.params] == pointers
    assert not any(bool(cp.array_equal(W, W0)) for (W, _), W0 in zip(net.params, before))
