"""The engine's CuPy code path, run end to end on the CPU through the CUDA kernel bodies.

Inside ``host_cupy.cupy_path(host_cupy_lib)`` every op of ``gpu_mlp.ops`` takes its CuPy branch on
NumPy arrays, and ``import cupy`` gives an emulation that checks each launch as the GPU
needs it -- kernel and body, argument count, order, types and shapes, null pointers,
grid, BLAS transpositions -- and then runs the CUDA bodies compiled for the host by g++
(``host_cupy.py`` says what this proves and what it cannot). Here the real engine runs
on that path in every memory mode, activation, loss and depth 1-4 and is compared with
the float64 reference and with the NumPy engine; each op is compared with its NumPy
branch; the launches are counted to show that every kernel ran; and bugs planted in the
CuPy branches are shown to be caught.
"""

import contextlib
import types

import numpy as np
import pytest

import cuda_host
import gpu_mlp
import host_cupy
from gpu_mlp import activations, cuda, losses, ops, optim, reference
from gpu_mlp.layers import ChannelsLastDense, Conv2d, Dense
from gpu_mlp.plan import StepPlan
from gpu_mlp.privacy import DP
from gpu_mlp.updates import Apply
from host_cupy import NULL, cupy_path

ACTIVATIONS = ["identity", "relu", "relu(alpha=0.5)", "sigmoid", "tanh", "gelu", "softmax"]
# the kinds of targets as (loss, soft), the arguments of conftest's make_targets
TARGETS = {"squared": ("squared", False), "logistic": ("logistic", False),
           "labels": ("softmax_cross_entropy", False),
           "probabilities": ("softmax_cross_entropy", True)}
SUPPORTED = [(act, mode) for act in ACTIVATIONS for mode in gpu_mlp.MEMORY_MODES
             if not (act == "gelu" and mode == "output")]

# d_0 .. d_4; depth n uses the first n, then D_OUT. No width equals another's neighbour
# or BATCH, so an operand transposed by mistake is a shape error, not a silent one.
WIDTHS = [5, 7, 6, 8, 9]
D_OUT, BATCH, LR = 3, 4, 0.1
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-4}  # against the reference
# Against the NumPy engine, in ulps of the array's scale: the host's libm and NumPy
# round exp, tanh and erfc apart, sums run in other orders, and a float32 GEMM here
# accumulates in float64: a few ulps, under 10 in every case seen. The op tests below
# say which results must agree to the bit.
NUMPY_ULPS = 32


@pytest.fixture
def rng():
    return np.random.default_rng(20240602)


@pytest.fixture
def make_batch(rng, make_targets):
    """``make_batch(net, target, batch=BATCH)``: random X and valid Y of kind ``target``."""
    def make_batch(net, target, batch=BATCH):
        loss, soft = TARGETS[target]
        Y = make_targets(rng, loss, batch, net.sizes[-1], soft=soft)
        return rng.standard_normal((batch, net.sizes[0])).astype(net.dtype), Y
    return make_batch


@pytest.fixture
def make_net(rng, make_params):
    """``make_net(act, target, memory, depth, dtype)``: a NumPy-backed net (``device="cpu"``)
    with random weights and biases (a bias of 0 would hide a lost bias); ``act`` is used
    by every layer, or is a list with one per layer."""
    def make_net(act, target="squared", memory="output", depth=3, dtype="float64"):
        acts = act if isinstance(act, list) else [act] * depth
        if acts[-1] == "softmax" and TARGETS[target][0] == "softmax_cross_entropy":
            acts = acts[:-1] + ["identity"]  # the cross-entropy takes logits
        params = make_params(rng, WIDTHS[:len(acts)] + [D_OUT], dtype)
        return gpu_mlp.MLP.from_params(params, acts, TARGETS[target][0], memory, device="cpu")
    return make_net


def host_params(net):
    """Float64 copies of the net's parameters, for the reference."""
    return [(W.astype(np.float64), b.astype(np.float64)) for W, b in net.params]


def reference_gradients(net, X, Y):
    return reference.loss_and_gradients(host_params(net), net.activations, net.loss,
                                        X.astype(np.float64), Y)


def sgd(params, grads):
    return [(W - LR * dW, b - LR * db) for (W, b), (dW, db) in zip(params, grads)]


def assert_close(actual, expected, rtol):
    """Within ``rtol`` of the largest entry of ``expected`` (dead ReLU units are 0)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


def numpy_rtol(dtype):
    return NUMPY_ULPS * np.finfo(dtype).eps


def flatten(results):
    """``(J, [(dW, db)], dX)`` as a flat list of arrays."""
    J, grads, dX = results
    return [J, dX] + [a for pair in grads for a in pair]


def assert_all_close(actual, expected, rtol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, rtol)


# --- the engine on the CuPy path --------------------------------------------------------------

@pytest.fixture(params=["narrow", "wide"])
def rows(request, monkeypatch):
    """Row-wise kernels (softmax, cross-entropy) for rows of a thread each, or -- all rows
    taken as wide -- the wide-row kernels, ops.ROW_LANES threads a row."""
    if request.param == "wide":
        monkeypatch.setattr(ops, "ROW_KERNEL_MAX", 0)
    return request.param


# every net, and the nets with a row-wise kernel once more with all rows taken as wide
ENGINE_CASES = [(act, memory, target, rows) for act, memory in SUPPORTED for target in TARGETS
                for rows in ("narrow", "wide")
                if rows == "narrow" or act == "softmax" or target in ("labels", "probabilities")]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("act, memory, target, row_path", ENGINE_CASES)
def test_loss_and_gradients(host_cupy_lib, make_net, make_batch, act, memory, target, depth, dtype,
                            row_path, monkeypatch):
    if row_path == "wide":
        monkeypatch.setattr(ops, "ROW_KERNEL_MAX", 0)
    net = make_net(act, target, memory, depth, dtype)
    X, Y = make_batch(net, target)
    with cupy_path(host_cupy_lib):
        result = flatten(net.loss_and_gradients(X, Y))
    assert_all_close(result, flatten(reference_gradients(net, X, Y)), RTOL[net.dtype])
    assert_all_close(result, flatten(net.loss_and_gradients(X, Y)), numpy_rtol(net.dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("act, memory", SUPPORTED)
def test_predict_norms_and_train_step(host_cupy_lib,
                                      make_net, make_batch, act, memory, target, dtype,
                                      rows):
    net = make_net(act, target, memory, dtype=dtype)
    twin = gpu_mlp.MLP.from_params(net.params, net.activations, net.loss, memory, device="cpu")
    X, Y = make_batch(net, target)
    params = host_params(net)
    J_ref, grads, _ = reference_gradients(net, X, Y)
    norms_ref = [np.sqrt(sum(np.sum(dW ** 2) + np.sum(db ** 2)
                             for dW, db in reference_gradients(net, X[i:i + 1], Y[i:i + 1])[1]))
                 for i in range(BATCH)]

    def run(net):
        return [net.predict(X), net.per_sample_grad_norms(X, Y), net.train_step(X, Y, LR)]

    W = net.params[0][0]
    with cupy_path(host_cupy_lib):
        out, norms, J = run(net)
    assert out.dtype == norms.dtype == J.dtype == net.dtype
    assert net.params[0][0] is W  # SGD went into W in place
    expected = [reference.forward(params, net.activations, X.astype(np.float64)), norms_ref,
                J_ref]
    expected += [a for pair in sgd(params, grads) for a in pair]
    assert_all_close([out, norms, J] + [a for pair in net.params for a in pair], expected,
                     RTOL[net.dtype])
    assert_all_close([out, norms, J] + [a for pair in net.params for a in pair],
                     run(twin) + [a for pair in twin.params for a in pair], numpy_rtol(dtype))


@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
def test_mixed_activations(host_cupy_lib, make_net, make_batch, memory):
    # two ReLU scales in one net (alpha is an argument, never part of a cached kernel)
    # and softmax between hidden layers
    acts = ["relu(alpha=0.5)", "softmax", "relu", "sigmoid" if memory == "output" else "gelu",
            "identity"]
    net = make_net(acts, "labels", memory)
    X, Y = make_batch(net, "labels")
    with cupy_path(host_cupy_lib):
        result = flatten(net.loss_and_gradients(X, Y))
    assert_all_close(result, flatten(reference_gradients(net, X, Y)), RTOL[net.dtype])


@pytest.mark.parametrize("target", ["labels", "probabilities"])
@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
def test_batch_over_several_thread_blocks(host_cupy_lib,
                                          make_net, make_batch, memory, target, rows):
    # 300 rows: three blocks of ops.KERNEL_THREADS, the last one partly idle
    net = make_net(["softmax", "tanh", "identity"], target, memory)
    X, Y = make_batch(net, target, batch=300)
    with cupy_path(host_cupy_lib):
        result = flatten(net.loss_and_gradients(X, Y))
    assert_all_close(result, flatten(reference_gradients(net, X, Y)), RTOL[net.dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_kernel_and_blas_call_runs(host_cupy_lib, make_net, make_batch, make_targets, dtype,
                                         monkeypatch):
    with cupy_path(host_cupy_lib) as device:
        for row_kernel_max in (ops.ROW_KERNEL_MAX, 0):  # rows for a thread each, then wide
            monkeypatch.setattr(ops, "ROW_KERNEL_MAX", row_kernel_max)
            for i, (act, memory) in enumerate(SUPPORTED):
                target = list(TARGETS)[i % len(TARGETS)]  # every loss, several activations
                net = make_net(act, target, memory, depth=2, dtype=dtype)
                X, Y = make_batch(net, target)
                net.predict(X)
                net.loss_and_gradients(X, Y)
                net.per_sample_grad_norms(X, Y)
                net.train_step(X, Y, LR)
        for memory in gpu_mlp.MEMORY_MODES:  # convolutions: im2col, col2im
            net, X, Y = conv_problem(memory, "tanh", dtype, make_targets)
            net.predict(X)
            net.loss_and_gradients(X, Y)
            net.train_step(X, Y, LR)
        # col2im times the layer below's sigma' ("output" mode), for each activation
        net, X, Y = conv_problem("output", "sigmoid", dtype, make_targets)
        net.train_step(X, Y, LR)
        for make in OPTIMIZERS.values():  # the optimizers' update kernels
            net, X, Y = conv_problem("output", "relu", dtype, make_targets)
            net.train_step(X, Y, make())
        # DP's noise kernel, and plain SGD from a formed gradient (the allreduce path)
        net.train_step(X, Y, LR, dp=DP(max_grad_norm=1.0, noise_multiplier=1.0))
        W, b = net.params[0]
        Apply(net.params, lr=LR).gradient(0, np.zeros(W.size + b.size, dtype=dtype))
        # an empty product with a device beta (an empty batch's weight gradient)
        ops.gemm("T", "N", np.ones((0, 3), dtype), np.ones((0, 4), dtype),
                 np.ones((3, 4), dtype), np.array(1.0, dtype), np.array(0.5, dtype))
        # a log-loss valued as scikit-learn's: its terms clamped
        net = make_net("tanh", "labels", depth=2, dtype=dtype)
        net.loss = net.loss.clipped(float(np.finfo(dtype).eps))
        net.train_step(*make_batch(net, "labels"), LR)
        # a step that tallies its loss with scikit-learn's L2 term (fit's, the estimators')
        _tallied_steps(net, *make_batch(net, "labels"), steps=1)
        # DP's per-sample squares of a dense layer and of kept per-sample gradients
        # (norms.add_squares on a device's arrays; the stand-in's nets are NumPy's, whose
        # norms NumPy's branch computes)
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((5, n)).astype(dtype) for n in (3, 40))
        for dense in (True, False):
            ops.add_row_squares(a, b, np.zeros(5, dtype), gpu_mlp.workspace.Workspace(np, dtype),
                                dense)
        ops.square(a, np.empty_like(a))  # (the stand-in's norms are NumPy's einsum)
        # a value check's scan (the stand-in's checks run on NumPy, as its nets do)
        flag = np.zeros(1, dtype)
        ops.flag_nonfinite(b, flag)
        assert flag[0] == 0
        # a cursor's gathers and its move (fit's on a GPU; the stand-in's fit has views)
        order, at = np.arange(5)[::-1].copy(), np.zeros((), np.int64)
        for source in (b, np.arange(5)):
            out = np.empty((2, *source.shape[1:]), source.dtype)
            ops.gather(source, order, at, out, dtype)
            np.testing.assert_array_equal(out, source[[4, 3]])
        ops.advance(at, 2, dtype)
        assert at == 2
        # accuracy's hits, against labels and against target rows (fit's validation)
        hits = np.empty(5, dtype)
        for targets in (np.arange(5) % 3, np.eye(3, dtype=dtype)[np.arange(5) % 3]):
            ops.class_hits(b[:, :3].copy(), targets, hits)
        ops.sign_hits(b, np.sign(b), np.empty_like(b))  # (the logistic loss's)
        ops.gram_bound(*(np.ones(5, dtype) for _ in range(3)), 1e-3, 0.01)  # (Gram form)
    elementwise = {("_".join(["gpu_mlp", op] + ([act] if act else [])), dtype)
                   for op, act in cuda_host.elementwise_pairs()}
    # an identity layer runs in "output" mode whatever the net's mode (F = A, sigma' = 1),
    # with no sigma' to multiply in col2im
    for op in ("grad_from_output", "recompute_grad", "bias_act_keep", "bias_act_grad",
               "col2im_nhwc_grad"):
        elementwise.remove((f"gpu_mlp_{op}_identity", dtype))
    ctype = cuda_host.CTYPES[np.dtype(dtype)]
    rows = {f"{kernel}<{ctype}>" for kernel in cuda.ROW_KERNELS}
    # MATH.md: A = F W^T, Delta W, dW = Delta^T F, db = Delta^T 1
    # and DP's per-sample gradients of a convolution, G_i = T_i^T rows(x)_i, batched
    blas = {("gemm", "N", "T", dtype), ("gemm", "N", "N", dtype), ("gemm", "T", "N", dtype),
            ("gemv", "T", dtype), ("gemm_batched", "T", "N", dtype)}
    assert set(device.launches) == elementwise | rows | blas
    assert set(host_cupy.row_kernels()) == set(cuda.ROW_KERNELS)


def _tallied_steps(net, X, Y, steps):
    """``steps`` steps that add their loss and an L2 term to a LossTally: its total."""
    tally = net.step_graphs.tally(net, weight=0.5, penalty=1e-2)
    tally.reset()
    for _ in range(steps):
        net._step(X, Y, StepPlan(LR), False, tally=tally)
    return tally.total()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_tally_of_steps_is_the_numpy_paths(host_cupy_lib, make_net, make_batch, dtype):
    net = make_net("tanh", "labels", depth=2, dtype=dtype)
    X, Y = make_batch(net, "labels")
    start = [a.copy() for pair in net.params for a in pair]
    totals = []
    for on_cupy in (False, True):
        for a, value in zip((a for pair in net.params for a in pair), start):
            a[...] = value
        with cupy_path(host_cupy_lib) if on_cupy else contextlib.nullcontext():
            totals.append(_tallied_steps(net, X, Y, steps=5))
    assert totals[1] == pytest.approx(totals[0], rel=50 * float(np.finfo(dtype).eps))


@pytest.mark.parametrize("target", ["logistic", "labels", "probabilities"])
@pytest.mark.parametrize("row_kernel_max", [ops.ROW_KERNEL_MAX, 0], ids=["rows", "wide"])
def test_a_clipped_log_loss_is_the_numpy_paths(host_cupy_lib, make_net, make_batch, target,
                                               row_kernel_max, monkeypatch):
    """Loss.clipped (the scikit-learn front end's): each term clamped to [-log(1 - eps),
    -log(eps)] -- an element's for the logistic loss, a row's for the cross-entropy --
    by the clamp kernel on the GPU, by np.clip on the NumPy path, the gradients as
    unclipped. Logits of +-1e3 make terms past both bounds."""
    monkeypatch.setattr(ops, "ROW_KERNEL_MAX", row_kernel_max)
    eps = float(np.finfo(np.float64).eps)
    cpu = make_net("identity", target, depth=1)
    for (W, b) in cpu.params:
        W *= 1e3
    X, Y = make_batch(cpu, target)
    cpu.loss = cpu.loss.clipped(eps)
    gpu = gpu_mlp.MLP.from_params(cpu.params, cpu.activations, cpu.loss, device="cpu")
    low, high = cpu.loss.clip
    J_cpu, grads_cpu, _ = cpu.loss_and_gradients(X, Y)
    unclipped = gpu_mlp.MLP.from_params(cpu.params, cpu.activations, cpu.loss.name,
                                        device="cpu").loss_and_gradients(X, Y)
    assert J_cpu < unclipped[0] and high > 36
    with cupy_path(host_cupy_lib):
        J_gpu, grads_gpu, _ = gpu.loss_and_gradients(X, Y)
    np.testing.assert_allclose(float(J_gpu), float(J_cpu), rtol=1e-12)
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"clipped: eps must be a finite number in \(0"):
            cpu.loss.clipped(bad)
    with pytest.raises(ValueError, match="squared is no log-loss"):
        gpu_mlp.losses.get("squared").clipped(eps)
    for got, want, plain in zip(grads_gpu, grads_cpu, unclipped[1]):
        for a, b, c in zip(got, want, plain):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(b, c)  # the gradients: as unclipped


# --- convolutional networks on the CuPy path ---------------------------------------------------

CONV_LAYERS = [  # non-square images and kernels, strides 1-2, paddings 0-1, then Dense
    lambda act: Conv2d(2, 3, (3, 2), stride=1, padding=1, activation=act),
    lambda act: Conv2d(3, 4, 2, stride=(2, 1), padding=0, activation=act),
    lambda act: Dense(4 * 3 * 5, D_OUT, activation="identity"),
]
CONV_INPUT = (2, 6, 5)


def conv_problem(memory, act, dtype, make_targets, target="labels", batch=BATCH):
    """A small conv net (float64 numbers in ``dtype``), with random biases, and a batch."""
    rng = np.random.default_rng(5)
    layers = [make(act) for make in CONV_LAYERS]
    params = [(rng.standard_normal(layer.weight_shape) / np.sqrt(layer.fan_in),
               0.5 * rng.standard_normal(layer.bias_shape)) for layer in layers]
    loss, soft = TARGETS[target]
    net = gpu_mlp.Network.from_params(layers, [(W.astype(dtype), b.astype(dtype))
                                               for W, b in params], loss, memory, device="cpu")
    X = rng.standard_normal((batch, *CONV_INPUT)).astype(dtype)
    return net, X, make_targets(rng, loss, batch, D_OUT, soft=soft)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_col2im_takes_the_layer_belows_derivative_with_the_same_bits(
        host_cupy_lib, make_targets, monkeypatch, act, dtype):
    """On a GPU a convolution's input gradient ends in col2im, which in "output" mode
    multiplies in the layer below's sigma' (from its output) in the same kernel: the
    products ops.grad_from_output made in a pass of its own, so the same parameters bit
    for bit, one launch less per convolution above another."""
    from gpu_mlp import layers

    launched, launch = [], ops._launch
    monkeypatch.setattr(ops, "_launch", lambda op, act, *args, **kwargs: (
        launched.append((op, act and act.name)), launch(op, act, *args, **kwargs))[1])
    results = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(layers.ChannelsLast, "fuses_derivative", lambda self, out: False)
        launched.clear()
        with cupy_path(host_cupy_lib):
            net, X, Y = conv_problem("output", act, dtype, make_targets)
            for _ in range(2):
                net.train_step(X, Y, LR)
            results[fused] = (host_params(net), list(launched))
    (fused_params, fused_launches), (plain_params, plain_launches) = results[True], results[False]
    for pair, plain_pair in zip(fused_params, plain_params):
        for a, b in zip(pair, plain_pair):
            np.testing.assert_array_equal(a, b)
    # per step: the second convolution's C^dagger takes the first's sigma'; the first's
    # own C^dagger (dJ/dX) is not needed
    assert fused_launches.count(("col2im_nhwc_grad", act)) == 2
    assert plain_launches.count(("col2im_nhwc_grad", act)) == 0
    assert fused_launches.count(("grad_from_output", act)) == \
        plain_launches.count(("grad_from_output", act)) - 2


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act, memory", [(act, mode) for act, mode in SUPPORTED
                                         if act != "softmax"])
def test_conv_network(host_cupy_lib, make_targets, act, memory, dtype):
    net, X, Y = conv_problem(memory, act, dtype, make_targets)
    params = host_params(net)
    J_ref, grads, dX_ref = reference.network_loss_and_gradients(
        net.layers, params, net.loss, X.astype(np.float64), Y)
    with cupy_path(host_cupy_lib):
        results = flatten(net.loss_and_gradients(X, Y))
        out = net.predict(X)
        J = net.train_step(X, Y, LR)
    expected = flatten((J_ref, grads, dX_ref))
    assert_all_close(results, expected, RTOL[net.dtype])
    assert_close(out, reference.network_forward(net.layers, params, X.astype(np.float64)),
                 RTOL[net.dtype])
    assert_close(J, J_ref, RTOL[net.dtype])
    assert_all_close([a for pair in net.params for a in pair],
                     [a for pair in sgd(params, grads) for a in pair], RTOL[net.dtype])


def test_a_dense_head_reads_the_maps_nhwc_on_the_cupy_path(host_cupy_lib, make_targets):
    """The Dense head (d_out 3 <= the batch) reads the last maps NHWC against W in their
    order, as on NumPy: no NCHW copy of them, and its weight gradient permuted back into
    W's layout on the device -- the NumPy engine's numbers."""
    net, X, Y = conv_problem("output", "relu", "float64", make_targets)
    on_numpy = flatten(net.loss_and_gradients(X, Y))
    with cupy_path(host_cupy_lib):
        assert isinstance(net._engine_layers(BATCH)[-1], ChannelsLastDense)
        results = flatten(net.loss_and_gradients(X, Y))
        net.train_step(X, Y, LR)
    shapes = {key[0] for key in net.training_workspace._free}
    assert (3, 5, 4) in shapes and (4, 3, 5) not in shapes  # the last maps: NHWC only
    assert_all_close(results, on_numpy, numpy_rtol(np.float64))


# --- optimizers on the CuPy path ---------------------------------------------------------------

OPTIMIZERS = {  # every rule, option and branch of kernels/optim.cuh
    "sgd-wd": lambda: optim.SGD(LR, weight_decay=0.1),
    "momentum": lambda: optim.SGD(LR, momentum=0.9),
    "nesterov-wd": lambda: optim.SGD(LR, momentum=0.8, nesterov=True, weight_decay=0.05),
    "adam-wd": lambda: optim.Adam(0.01, weight_decay=0.05, schedule=optim.Cosine(3, 1)),
    "adamw-lerp-upper": lambda: optim.AdamW(0.01, betas=(0.3, 0.9), schedule=optim.Step(2)),
    # scikit-learn's conventions: decay on W only (W's and b's kernels differ), eps-hat
    "nesterov-wd-weights": lambda: optim.SGD(LR, momentum=0.8, nesterov=True,
                                             weight_decay=0.05, decay_bias=False),
    "adam-sklearn": lambda: optim.Adam(0.01, weight_decay=0.05, decay_bias=False,
                                       eps_placement="uncorrected"),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_steps(host_cupy_lib, make_net, make_batch, make_targets, name, kind, dtype):
    """Three steps through the stand-in against the NumPy engine with the same optimizer:
    one update kernel per W and b, each launch checked, the same parameters and state."""
    if kind == "dense":
        net = make_net("tanh", "labels", "recompute", depth=3, dtype=dtype)
        batches = [make_batch(net, "labels") for _ in range(3)]
    else:
        net, X, Y = conv_problem("store_both", "tanh", dtype, make_targets)
        batches = [(X, Y), (X[::-1].copy(), Y[::-1].copy()), (X, Y)]
    twin = gpu_mlp.Network.from_params(net.layers, net.params, net.loss.name, net.memory,
                                       device="cpu")
    ours, theirs = OPTIMIZERS[name](), OPTIMIZERS[name]()
    with cupy_path(host_cupy_lib) as device:
        for X, Y in batches:
            net.train_step(X, Y, ours)
    for X, Y in batches:
        twin.train_step(X, Y, theirs)
    kernels = {key: count for key, count in device.launches.items()
               if key[0] in ("gpu_mlp_sgd_momentum", "gpu_mlp_adam")}
    fused = 0 if name == "sgd-wd" else 2 * len(net.layers) * len(batches)  # W_k, b_k
    assert sum(kernels.values()) == fused
    got, want = ours.state_dict(), theirs.state_dict()
    assert got["steps"] == want["steps"] == 3 and got["last_lr"] == want["last_lr"]
    arrays = [a for pair in net.params for a in pair] + [
        a for pairs in got["state"].values() for pair in pairs for a in pair]
    expected = [a for pair in twin.params for a in pair] + [
        a for pairs in want["state"].values() for pair in pairs for a in pair]
    # the GEMMs round apart (the stand-in sums in float64); the kernels agree to the bit
    # with their twins (test_optimizer_op_branches_agree)
    assert_all_close(arrays, expected, numpy_rtol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("nesterov, weight_decay", [(False, 0.0), (True, 0.01)])
def test_sgd_momentum_op_branches_agree(host_cupy_lib, dtype, nesterov, weight_decay):
    rng = np.random.default_rng(8)
    n = ops.BLOCK_ELEMENTS + 5  # the twin's blocks, and one more
    start = {name: rng.normal(0, 1, n).astype(dtype) for name in ("w", "g", "buf")}
    arrays = {path: {k: a.copy() for k, a in start.items()} for path in ("cupy", "numpy")}
    for path in arrays:
        v = arrays[path]
        with cupy_path(host_cupy_lib) if path == "cupy" else contextlib.nullcontext():
            ops.sgd_momentum(v["w"], v["g"], v["buf"], 0.05, 0.9, weight_decay, nesterov)
    assert_branches_agree(arrays["cupy"], arrays["numpy"], True, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("one_minus_beta1, weight_decay, decay",
                         [(0.1, 0.0, 1.0), (0.1, 0.05, 1.0), (0.7, 0.0, 0.999)])
def test_adam_op_branches_agree(host_cupy_lib, dtype, one_minus_beta1, weight_decay, decay):
    rng = np.random.default_rng(9)
    n = ops.BLOCK_ELEMENTS + 5
    start = {name: rng.normal(0, 1, n).astype(dtype) for name in ("w", "g", "m", "v")}
    start["v"] = np.abs(start["v"])
    arrays = {path: {k: a.copy() for k, a in start.items()} for path in ("cupy", "numpy")}
    for path in arrays:
        v = arrays[path]
        with cupy_path(host_cupy_lib) if path == "cupy" else contextlib.nullcontext():
            ops.adam(v["w"], v["g"], v["m"], v["v"], one_minus_beta1, 0.999, 0.001, 1e-8,
                     weight_decay, decay, 0.01, 0.2)
    assert_branches_agree(arrays["cupy"], arrays["numpy"], True, dtype)


# --- each op: its CuPy branch against its NumPy branch ----------------------------------------

# The ops that launch an activation kernel, on arrays named as the kernels' parameters.
ACTIVATION_OPS = cuda_host.OP_CALLS
OP_CASES = [(op, act) for op in ACTIVATION_OPS for act in (ACTIVATIONS if op != "mul" else [None])
            if not (op == "bias_act_grad" and act == "softmax")  # refused on both paths
            and not (op == "grad_from_output" and act == "gelu")]
# No library function (exp, tanh, erfc) and no sum, so the same IEEE operations in C and
# NumPy: these must agree to the bit on any machine.
EXACT = {"identity", "relu"}


def exact(op, activation):
    # sigma' from the output is arithmetic on F alone: f (1 - f), 1 - f^2
    return (op == "mul" or activation.name in EXACT
            or (op == "grad_from_output" and not activation.kind.rowwise))
B, C = 300, 11  # more rows than one block of ops.KERNEL_THREADS


def op_arrays(dtype, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {name: rng.normal(0, 2, (B, C)).astype(dtype) for name in ("a", "f", "delta", "d")}
    arrays["bias"] = rng.normal(0, 1, C).astype(dtype)
    return arrays


def assert_branches_agree(cupy, numpy, exact, dtype):
    for name in numpy:
        if exact:
            assert np.array_equal(cupy[name], numpy[name]), name
        else:
            assert_close(cupy[name], numpy[name], numpy_rtol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("op, act", OP_CASES, ids=[f"{op}-{act}" for op, act in OP_CASES])
def test_activation_op_branches_agree(host_cupy_lib, op, act, dtype):
    activation = activations.get(act or "identity")
    cupy, numpy = op_arrays(dtype), op_arrays(dtype)
    with cupy_path(host_cupy_lib) as device:
        ACTIVATION_OPS[op](activation, cupy)
    ACTIVATION_OPS[op](activation, numpy)
    # sigma' = 1 and sigma(a) = a: ops launches nothing
    no_op = op in ("grad_from_output", "recompute_grad") and act == "identity"
    assert bool(device.launches) != no_op  # the CuPy branch ran
    assert_branches_agree(cupy, numpy, exact(op, activation), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("target", TARGETS)
def test_loss_op_branches_agree(host_cupy_lib, make_targets, target, dtype):
    loss, soft = TARGETS[target]
    rng = np.random.default_rng(1)
    F = rng.normal(0, 2, (B, C)).astype(dtype)
    Y = make_targets(rng, loss, B, C, dtype, soft=soft)
    loss = losses.get(loss)
    grads = {"cupy": np.empty_like(F), "numpy": np.empty_like(F)}
    with cupy_path(host_cupy_lib):
        J = ops.loss_and_grad(loss, F, Y, grads["cupy"], 1 / B,
                              np.empty(ops.loss_scratch_shape(loss, F.shape), dtype))
    J_numpy = ops.loss_and_grad(loss, F, Y, grads["numpy"], 1 / B, None)
    assert J.dtype == dtype
    assert_close(J, J_numpy, numpy_rtol(dtype))  # the terms are summed in other orders
    assert_branches_agree({"grad": grads["cupy"]}, {"grad": grads["numpy"]},
                          loss.name == "squared", dtype)


GEMMS = [("N", "T"), ("N", "N"), ("T", "N"), ("T", "T")]


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (-0.1, 1.0)], ids=["write", "update"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("transa, transb", GEMMS, ids=["".join(t) for t in GEMMS])
def test_gemm_branches_agree(host_cupy_lib, transa, transb, dtype, alpha, beta):
    rng = np.random.default_rng(2)
    m, k, n = 4, 5, 6
    a = rng.standard_normal((m, k) if transa == "N" else (k, m)).astype(dtype)
    b = rng.standard_normal((k, n) if transb == "N" else (n, k)).astype(dtype)
    # with beta = 0 BLAS must not read out: NaN there must not show
    start = np.full((m, n), np.nan) if beta == 0 else rng.standard_normal((m, n))
    out = {path: start.astype(dtype) for path in ("cupy", "numpy")}
    with cupy_path(host_cupy_lib):
        assert ops.gemm(transa, transb, a, b, out["cupy"], alpha=alpha, beta=beta) is out["cupy"]
    ops.gemm(transa, transb, a, b, out["numpy"], alpha=alpha, beta=beta)
    assert_close(out["cupy"], out["numpy"], numpy_rtol(dtype))


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (-0.1, 1.0)], ids=["write", "update"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("transa", ["N", "T"])
def test_gemv_branches_agree(host_cupy_lib, transa, dtype, alpha, beta):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 5)).astype(dtype)
    x = rng.standard_normal(5 if transa == "N" else 4).astype(dtype)
    start = np.full(4 if transa == "N" else 5, np.nan if beta == 0 else 0.5, dtype)
    y = {path: start.copy() for path in ("cupy", "numpy")}
    with cupy_path(host_cupy_lib):
        ops.gemv(transa, a, x, y["cupy"], alpha=alpha, beta=beta)
    ops.gemv(transa, a, x, y["numpy"], alpha=alpha, beta=beta)
    assert_close(y["cupy"], y["numpy"], numpy_rtol(dtype))


# --- the emulation refuses what would go wrong on a GPU ---------------------------------------

def python_float_alpha(mp):
    mp.setattr(ops, "_alpha", lambda act, a: act.alpha)


def double_alpha(mp):
    mp.setattr(ops, "_alpha", lambda act, a: np.float64(act.alpha))


def forward_gemm_not_transposed(mp):
    gemm = ops.gemm
    mp.setattr(ops, "gemm", lambda transa, transb, *args, **kw:
               gemm(transa, "N" if (transa, transb) == ("N", "T") else transb, *args, **kw))


def too_many_threads(mp):
    mp.setattr(ops, "KERNEL_THREADS", 2048)


def f_and_delta_swapped(mp):
    launch = ops._launch
    mp.setattr(ops, "_launch", lambda op, act, *args, **kwargs:
               launch(op, act, *(args[::-1] if op == "grad_from_output" else args), **kwargs))


PLANTED = [  # (bug, activation, memory, dtype, what gives it away)
    pytest.param(python_float_alpha, "relu", "output", "float64",
                 "alpha: expected a numpy.float64, got float", id="alpha a Python float"),
    pytest.param(double_alpha, "tanh", "recompute", "float32",
                 "alpha: expected a numpy.float32, got float64", id="alpha float64 in float32"),
    pytest.param(forward_gemm_not_transposed, "tanh", "output", "float64",
                 r"gemm NN: op\(a\) \(4, 5\), op\(b\) \(7, 5\)", id="forward GEMM untransposed"),
    pytest.param(too_many_threads, "softmax", "output", "float64", "2048 threads per block",
                 id="block too large"),
    pytest.param(f_and_delta_swapped, "tanh", "output", "float64", "Not equal to tolerance",
                 id="f and delta swapped"),
]


@pytest.mark.parametrize("plant, act, memory, dtype, message", PLANTED)
def test_planted_bugs_are_caught(host_cupy_lib,
                                 make_net, make_batch, monkeypatch, plant, act, memory, dtype,
                                 message):
    net = make_net(act, "squared", memory, dtype=dtype)
    X, Y = make_batch(net, "squared")
    expected = flatten(reference_gradients(net, X, Y))
    plant(monkeypatch)
    # the emulation's assertions, or gpu_mlp.cublas's own refusal (a ValueError)
    with cupy_path(host_cupy_lib), pytest.raises((AssertionError, ValueError), match=message):
        assert_all_close(flatten(net.loss_and_gradients(X, Y)), expected,
                         RTOL[net.dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_row_kernels_run_the_global_bodies(host_cupy_lib, dtype):
    """Each kernel launched as ops launches it, over three blocks, against the NumPy tables."""
    rng = np.random.default_rng(4)
    z, g = rng.normal(0, 2, (B, C)).astype(dtype), rng.normal(0, 1, (B, C)).astype(dtype)
    bias = rng.normal(0, 1, C).astype(dtype)
    targets = {"labels": rng.integers(0, C, B),
               "targets": rng.dirichlet(np.ones(C), B).astype(dtype)}
    f = activations.get("softmax")(z + bias)
    xent = losses.get("softmax_cross_entropy").evaluate
    expected = {"forward": f, "backward": activations.softmax_backward(f, g, np.empty_like(g))}
    got = {"forward": np.empty_like(z), "backward": g.copy()}
    for kind, Y in targets.items():
        expected[kind + " grad"], got[kind + " grad"] = np.empty_like(z), np.empty_like(z)
        expected[kind + " loss"] = xent(z, Y, dtype(0.5), expected[kind + " grad"])
        got[kind + " loss"] = np.empty(B, dtype)

    dims = (np.int32(B), np.int32(C))
    with cupy_path(host_cupy_lib) as device:
        ops._launch_rows("gm_softmax_forward", B, z, bias, got["forward"], *dims)
        ops._launch_rows("gm_softmax_backward", B, f, got["backward"], *dims)
        for kind, Y in targets.items():
            ops._launch_rows(f"gm_softmax_xent_{kind}", B, z, Y, got[kind + " grad"],
                             got[kind + " loss"], *dims, dtype(0.5))
    assert len(device.launches) == sum(not k.startswith("gm_wide_") for k in cuda.ROW_KERNELS)
    rtol = 2 * C * np.finfo(dtype).eps  # a row's terms summed in another order
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=rtol, atol=rtol, err_msg=name)


@pytest.mark.parametrize("width", [5, ops.ROW_LANES, ops.ROW_KERNEL_MAX + 13, 100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_wide_rows_run_the_global_bodies(host_cupy_lib, dtype, width, monkeypatch):
    """Rows taken as wide, ROW_LANES threads each (fewer columns than threads too): the
    softmax, its backward and the cross-entropy, as ops launches them, against NumPy,
    with their scratch borrowed from a workspace and given back."""
    monkeypatch.setattr(ops, "ROW_KERNEL_MAX", 0)
    rng = np.random.default_rng(5)
    z, g = rng.normal(0, 2, (B, width)).astype(dtype), rng.normal(0, 1, (B, width)).astype(dtype)
    bias = rng.normal(0, 1, width).astype(dtype)
    f = activations.get("softmax")(z + bias)
    loss = losses.get("softmax_cross_entropy")
    targets = {"labels": rng.integers(0, width, B),
               "targets": rng.dirichlet(np.ones(width), B).astype(dtype)}
    ws = gpu_mlp.workspace.Workspace(np, dtype)
    with cupy_path(host_cupy_lib) as device:
        forward = z.copy()
        ops.bias_act(activations.get("softmax"), forward, bias, ws)
        backward = g.copy()
        ops.grad_from_output(activations.get("softmax"), f, backward, ws)
        results = {}
        for kind, Y in targets.items():
            grad = np.empty_like(z)
            scratch = ws.take(ops.loss_scratch_shape(loss, z.shape))
            J = ops.loss_and_grad(loss, z, Y, grad, 0.5, scratch)
            results[kind] = (float(J), grad)
            ws.give(scratch)
    assert ws.in_use_bytes == 0  # every scratch given back
    assert {name.split("<")[0] for name in device.launches} == {  # (the softmax's)
        k for k in cuda.ROW_KERNELS if k.startswith("gm_wide_") and "square" not in k}
    rtol = 4 * width * np.finfo(dtype).eps  # a row's terms summed in another order
    close = dict(rtol=rtol, atol=rtol)
    np.testing.assert_allclose(forward, f, **close, err_msg="forward")
    np.testing.assert_allclose(backward, activations.softmax_backward(f, g, np.empty_like(g)),
                               **close, err_msg="backward")
    for kind, Y in targets.items():
        grad = np.empty_like(z)
        J = loss.evaluate(z, Y, dtype(0.5), grad).mean()
        np.testing.assert_allclose(results[kind][0], J, **close, err_msg=f"{kind} loss")
        np.testing.assert_allclose(results[kind][1], grad, **close, err_msg=f"{kind} grad")


def softmax_backward(f, g, B=np.int32(B), C=np.int32(C)):
    return "gm_softmax_backward", (f, g, B, C)


def xent_labels(labels, scale):
    f = np.zeros((B, C))
    return "gm_softmax_xent_labels", (f, labels, np.empty_like(f), np.empty(B), np.int32(B),
                                      np.int32(C), scale)


F, G = np.full((B, C), 1 / C), np.ones((B, C))
BAD_ROW_LAUNCHES = [  # ((kernel, args), grid, block, what the emulation says)
    pytest.param(softmax_backward(F, G, B=B), (3,), (128,), "B: expected a numpy.int32, got int",
                 id="B a Python int"),
    pytest.param(xent_labels(np.zeros(B, np.int32), np.float64(1)), (3,), (128,),
                 "labels: expected int64, got int32", id="int32 labels"),
    pytest.param(xent_labels(np.zeros(B, np.int64), np.float32(1)), (3,), (128,),
                 "scale: expected a numpy.float64, got float32", id="float32 scale"),
    pytest.param(softmax_backward(NULL, G), (3,), (128,), "f: no null pointer",
                 id="null f"),
    pytest.param(softmax_backward(G, G), (3,), (128,), "__restrict__ f: overlaps",
                 id="f is g"),
    pytest.param(softmax_backward(F, G.T), (3,), (128,), r"g: expected shape \(300, 11\)",
                 id="g transposed"),
    pytest.param(softmax_backward(F, G), (2,), (128,), "2 x 128 threads for 300 rows$",
                 id="grid too small"),
    pytest.param(("gm_wide_dot", (F, G, np.empty((B, 32), F.dtype), np.int32(B), np.int32(C),
                                  np.int32(32))),
                 (3,), (128,), "3 x 128 threads for 300 rows of 32 threads",
                 id="wide rows, a thread a row"),
    pytest.param(softmax_backward(F, G), (3, 1), (128, 1), "indexes rows by x only",
                 id="two-dimensional grid"),
    pytest.param(("gm_softmax_backward", (F, G, np.int32(B))), (3,), (128,), "got 3 arguments",
                 id="an argument missing"),
]


@pytest.mark.parametrize("launch, grid, block, message", BAD_ROW_LAUNCHES)
def test_bad_row_launches_are_refused(host_cupy_lib, launch, grid, block, message):
    kernel, args = launch
    with cupy_path(host_cupy_lib), pytest.raises(AssertionError, match=message):
        ops._function(kernel, "float64")(grid, block, args)


RELU = types.SimpleNamespace(name="relu")  # what ops._launch reads of an activation


def bias_act_relu(*args):
    """``args`` launched as ``ops`` launches the bias_act kernel of relu."""
    ops._launch("bias_act", RELU, *args)


def bias_act_relu_raw(sizes, *args, dtype="float64", grid=(1,), block=(128,)):
    """The float64 bias_act kernel of relu called with (n, channels, inner) = ``sizes``."""
    ops._function("gpu_mlp_bias_act_relu", dtype)(grid, block, (*sizes, *args))


A = np.ones((B, C))
SIZES = (np.int64(B * C), np.int64(C), np.int64(1))
BAD_ELEMENTWISE_LAUNCHES = [  # (launch, what the emulation says)
    pytest.param(lambda: bias_act_relu(A.copy(), np.float64(1), A[0].copy()),
                 r"bias: expected shape \(11,\)", id="bias and a swapped"),
    pytest.param(lambda: bias_act_relu_raw(SIZES, A[0], np.float64(1)), "got 5 arguments",
                 id="output missing"),
    pytest.param(lambda: bias_act_relu(A[0], np.float64(1), np.ones((C, B)).T),
                 "a: not C-contiguous", id="strided output"),
    pytest.param(lambda: bias_act_relu(A[0].astype(np.float32), np.float64(1), A.copy()),
                 "bias: expected float64, got float32", id="mixed dtypes"),
    pytest.param(lambda: bias_act_relu_raw(SIZES, A[0], np.float64(1), A.copy(), dtype="float32"),
                 "the output a must be a float32 array", id="the float32 kernel on float64"),
    pytest.param(lambda: bias_act_relu_raw((np.int64(B), *SIZES[1:]), A[0], np.float64(1),
                                           A.copy()),
                 "n: 300, the output says 3300", id="n not the output's size"),
    pytest.param(lambda: bias_act_relu_raw(SIZES[:2] + (np.int64(C),), A[0], np.float64(1),
                                           A.copy()),
                 "inner: 11, the output says 1", id="inner not the output's"),
    pytest.param(lambda: bias_act_relu_raw((B * C, *SIZES[1:]), A[0], np.float64(1), A.copy()),
                 "n: expected a numpy.int64, got int", id="n a Python int"),
    pytest.param(lambda: bias_act_relu_raw(SIZES, A[0], np.float64(1), A.copy(), grid=(0,)),
                 "0 blocks", id="no blocks"),
    pytest.param(lambda: ops._function("gpu_mlp_mul_relu", "float64"),
                 "'gpu_mlp_mul_relu<double>' is not among the module's name_expressions",
                 id="unknown name"),
    pytest.param(lambda: cuda.module(ops.kernel_source().replace("gm_relu(a", "gm_tanh(a"),
                                     ops.module_names("float64")),
                 "the module's code is not", id="another body"),
    pytest.param(lambda: cuda.module(ops.kernel_source(), ops.module_names("float64")[1:]),
                 "does not instantiate every kernel", id="a kernel left out"),
]


@pytest.mark.parametrize("launch, message", BAD_ELEMENTWISE_LAUNCHES)
def test_bad_elementwise_launches_are_refused(host_cupy_lib, launch, message):
    with cupy_path(host_cupy_lib), pytest.raises(AssertionError, match=message):
        launch()


M, S = np.ones((4, 5)), np.ones((4, 4))
BAD_BLAS_CALLS = [  # (call, what the emulation says)
    pytest.param(lambda: ops.gemm("N", "N", M, M, np.empty((4, 4))),
                 r"gemm NN: op\(a\) \(4, 5\), op\(b\) \(4, 5\)", id="gemm untransposed"),
    pytest.param(lambda: ops.gemm("N", "T", M, M[:, :4].copy(), np.empty((4, 5))),
                 r"gemm NT: op\(a\) \(4, 5\), op\(b\) \(4, 4\)", id="gemm inner sizes"),
    pytest.param(lambda: ops.gemm("N", "T", M[:, :4], M[:, :4], np.empty((4, 4))),
                 "a: not C-contiguous", id="gemm strided operand"),
    pytest.param(lambda: ops.gemm("T", "N", S, S.copy(), S), "out: overlaps", id="gemm out is a"),
    pytest.param(lambda: ops.gemm("C", "N", M, M, np.empty((5, 5))),
                 "transposition 'C'", id="gemm conjugate"),
    pytest.param(lambda: ops.gemv("T", M, np.ones(8)[::2], np.empty(5)),
                 "x: not C-contiguous", id="gemv strided x"),
    pytest.param(lambda: ops.gemv("N", M, np.ones(4), np.empty(5)),
                 r"x: expected shape \(5,\)", id="gemv untransposed"),
    pytest.param(lambda: ops.gemv("T", M, np.ones(4, np.float32), np.empty(5)),
                 "x: expected float64, got float32", id="gemv mixed dtypes"),
]


@pytest.mark.parametrize("call, message", BAD_BLAS_CALLS)
def test_bad_blas_calls_are_refused(host_cupy_lib, call, message):
    # refused by gpu_mlp.cublas itself, before cuBLAS: on a GPU too
    with cupy_path(host_cupy_lib), pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_empty_product_with_a_device_beta_is_scaled_on_the_device(host_cupy_lib, dtype):
    """op(a) (m, 0), e.g. an empty batch's weight gradient: out <- beta out by the
    ``scale`` kernel, beta read on the device (cuBLAS documents no k = 0 case, so it is not
    asked); beta = 0 writes zeros without reading out, NaN there stays out."""
    a = np.ones((3, 0), dtype)
    with cupy_path(host_cupy_lib) as device:
        for beta, expected in [(0.0, 0.0), (0.5, 1.0)]:
            out = np.full((3, 4), np.nan if beta == 0 else 2.0, dtype)
            ops.gemm("N", "N", a, np.ones((0, 4), dtype), out, np.array(1.0, dtype),
                     np.array(beta, dtype))
            np.testing.assert_array_equal(out, expected)
            y = np.full(3, np.nan if beta == 0 else 2.0, dtype)
            ops.gemv("N", a, np.ones(0, dtype), y, np.array(1.0, dtype), np.array(beta, dtype))
            np.testing.assert_array_equal(y, expected)
    launched = {key[0] if isinstance(key, tuple) else key: n
                for key, n in device.launches.items()}
    assert sum(n for name, n in launched.items() if "scale" in name) == 4
    assert "gemm" not in launched and "gemv" not in launched
