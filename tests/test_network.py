"""The convolutional engine, :class:`gpu_mlp.Network`: its specification.

One layer loop (docs/MATH.md, "General bilinear layers") runs Dense
and Conv2d layers alike. Every test takes a ``device``: ``"cpu"`` (NumPy) always,
``"cuda"`` (CuPy) where CuPy sees a GPU; results come back with ``to_numpy``.

1. The adjoint identities of the engine's own layer maps (``Layer.linear``,
   ``to_rows``/``input_grad``, the weight GEMM ``T_rows^T rows(x)``, ``bias_view`` and
   ``T_rows^T 1``), and planted wrong adjoints that they catch.
2. Conv networks against PyTorch autograd and :func:`gpu_mlp.reference.network_loss_and_gradients`:
   loss, every gradient, dX, per-sample gradient norms and the fused SGD step, over a
   grid that covers every geometry, activation, loss and memory mode.
3. Central finite differences on a tiny conv net.
4. float32 against the float64 reference.
5. Bad input refused with an error naming the layer, before anything changes.
6. Memory per mode (tracemalloc on the NumPy backend; workspace counters everywhere).
7. A Network of Dense layers is the MLP, bit for bit.
8. fit on images, and resuming a conv net's training bit for bit.

Tolerances are relative to the scale (largest entry) of the array compared.
"""

import contextlib
import math
import re
import tracemalloc

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import norms, ops, reference
from gpu_mlp.device import resolve, to_numpy
from gpu_mlp.layers import Conv2d, Dense, Layer
from gpu_mlp.workspace import Workspace
from tracing import step_peak, traced_now, traced_peak, tracing
from test_reference_layers import output_shape as per_sample_shape
from test_reference import central_differences
from test_reference_layers import random_params, torch_network  # torch: TORCH_ACTIVATIONS

MODES = gpu_mlp.MEMORY_MODES
RTOL64 = 1e-10   # float64, engine against the reference and against PyTorch
RTOL32 = 1e-4    # float32 engine against the float64 reference
ADJOINT_RTOL = 1e-12
LR = 0.1
BATCH = 3
D_OUT = 3        # the Dense head's width


def assert_close(actual, expected, rtol, what=""):
    actual, expected = to_numpy(actual), np.asarray(to_numpy(expected))
    assert actual.shape == expected.shape, what
    scale = np.abs(expected).max(initial=0.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale, err_msg=what)


def host_params(net, dtype=None):
    return [(to_numpy(W).astype(dtype or W.dtype), to_numpy(b).astype(dtype or b.dtype))
            for W, b in net.params]


# --- 1. adjoint identities of the engine's layer maps ------------------------------------

# (layer, per-sample input shape): kernels 1-4 (and non-square), strides 1-3, paddings
# 0-2, non-square images, c_in 1-3; a Dense on images and on rows
MAPS = {
    "conv-k3-s1-p1": (Conv2d(2, 3, 3, padding=1), (2, 6, 7)),
    "conv-k2x4-s2x3-p0x2": (Conv2d(3, 2, (2, 4), stride=(2, 3), padding=(0, 2)), (3, 7, 9)),
    "conv-k4-s3-p2": (Conv2d(1, 2, 4, stride=3, padding=2), (1, 8, 5)),
    "conv-k1-s2-p2": (Conv2d(2, 2, 1, stride=2, padding=2), (2, 5, 4)),
    "conv-k3x1-s1x2-p1x0": (Conv2d(3, 4, (3, 1), stride=(1, 2), padding=(1, 0)), (3, 4, 6)),
    "conv-k4x3-s2-p1": (Conv2d(1, 3, (4, 3), stride=2, padding=1), (1, 9, 4)),
    "dense-on-images": (Dense(24, 5), (2, 3, 4)),
    "dense-on-rows": (Dense(7, 3), (7,)),
    "dense-square": (Dense(4, 4), (4,)),
}


def engine_maps(layer, input_shape, device, batch=3, seed=0):
    """The engine's C, C^dagger, C^{dagger dagger}, iota and iota^* on random float64
    arguments, as host arrays; buffers from a Workspace, as in a training step."""
    xp = resolve(device)[1]
    rng = np.random.default_rng(seed)
    ws = Workspace(xp, np.float64)
    out_shape = (batch, *layer.output_shape(input_shape))
    x = rng.standard_normal((batch, *input_shape))
    W, b = rng.standard_normal(layer.weight_shape), rng.standard_normal(layer.bias_shape)
    T = rng.standard_normal(out_shape)
    x_d, W_d, b_d = xp.asarray(x), xp.asarray(W), xp.asarray(b)

    Cx = to_numpy(layer.linear(x_d, W_d, ws))                 # C(x, W)
    T_d = ws.take(out_shape)                                  # to_rows gives T back
    T_d[...] = xp.asarray(T)
    T_rows = layer.to_rows(T_d, ws)
    dx = xp.empty_like(x_d)
    layer.input_grad(T_rows, W_d, ws, dx)                     # C^dagger(T, W)
    G = xp.empty_like(W_d)
    x_rows = layer.rows(x_d, ws)
    ops.gemm("T", "N", T_rows, x_rows, Layer.weight_matrix(G))  # C^{dd}(x, T)
    layer.give_rows(x_rows, ws)
    bias = to_numpy(xp.broadcast_to(layer.bias_view(b_d), out_shape))  # iota(b)
    db = xp.empty_like(b_d)
    ops.gemv("T", T_rows, ws.ones(T_rows.shape[0]), db)       # iota^*(T) = T_rows^T 1
    return dict(x=x, W=W, b=b, T=T, Cx=Cx, dx=to_numpy(dx), G=to_numpy(G), bias=bias,
                db=to_numpy(db))


def check_input_adjoint(m):
    assert m["dx"].shape == m["x"].shape and m["Cx"].shape == m["T"].shape
    scale = np.abs(m["Cx"] * m["T"]).sum()
    assert abs(np.vdot(m["Cx"], m["T"]) - np.vdot(m["x"], m["dx"])) < ADJOINT_RTOL * scale, \
        "<C(x, W), T> != <x, C^dagger(T, W)>"


def check_weight_adjoint(m):
    assert m["G"].shape == m["W"].shape
    scale = np.abs(m["Cx"] * m["T"]).sum()
    assert abs(np.vdot(m["Cx"], m["T"]) - np.vdot(m["W"], m["G"])) < ADJOINT_RTOL * scale, \
        "<C(x, W), T> != <W, C^{dagger dagger}(x, T)>"


def check_bias_adjoint(m):
    assert m["bias"].shape == m["T"].shape and m["db"].shape == m["b"].shape
    scale = np.abs(m["bias"] * m["T"]).sum()
    assert abs(np.vdot(m["bias"], m["T"]) - np.vdot(m["b"], m["db"])) < ADJOINT_RTOL * scale, \
        "<iota(b), T> != <b, iota^*(T)>"


CHECKS = {"input": check_input_adjoint, "weight": check_weight_adjoint,
          "bias": check_bias_adjoint}


@pytest.mark.parametrize("layer, input_shape", MAPS.values(), ids=MAPS.keys())
def test_engine_adjoint_identities(device, layer, input_shape):
    maps = engine_maps(layer, input_shape, device)
    for check in CHECKS.values():
        check(maps)
    # and C is the reference's convolution (an independent formulation), not only
    # self-consistent
    assert_close(maps["Cx"], reference.bilinear(layer, maps["x"], maps["W"]), ADJOINT_RTOL)


def _col2im_dropping_offset_0_0(col2im):
    def wrong(layer, cols, out):
        cols = cols.copy()
        cols.reshape(cols.shape[0], layer.c_in, *layer.kernel_size)[:, :, 0, 0] = 0
        return col2im(layer, cols, out)
    return wrong


def _im2col_flipping_the_kernel(im2col):
    def wrong(layer, x, out):
        im2col(layer, x, out)
        view = out.reshape(out.shape[0], layer.c_in, *layer.kernel_size)
        view[...] = view[:, :, ::-1, ::-1].copy()
        return out
    return wrong


def _to_rows_without_the_transpose(to_rows):
    def wrong(self, T, ws):
        T_rows = ws.take((T.size // self.c_out, self.c_out))
        T_rows[...] = T.reshape(T_rows.shape)  # NCHW read as NHWC: the channels mixed
        ws.give(T)
        return T_rows
    return wrong


def _dense_input_grad_transposed(input_grad):
    def wrong(self, T_rows, W, ws, out):
        ops.gemm("N", "T", T_rows, W, self.rows(out, ws))  # T W^T for T W: square W fits
    return wrong


# name: (object, attribute, plant, MAPS case, the identities it breaks)
PLANTED = {
    "col2im drops a kernel offset": (ops, "col2im", _col2im_dropping_offset_0_0,
                                     "conv-k2x4-s2x3-p0x2", {"input"}),
    # rows(x) wrong in C and C^{dd} alike: only C^dagger (col2im) disagrees
    "im2col flips the kernel": (ops, "im2col", _im2col_flipping_the_kernel,
                                "conv-k3-s1-p1", {"input"}),
    "to_rows misses the transpose": (Conv2d, "to_rows", _to_rows_without_the_transpose,
                                     "conv-k4-s3-p2", {"input", "weight", "bias"}),
    "dense C^dagger transposed": (Dense, "input_grad", _dense_input_grad_transposed,
                                  "dense-square", {"input"}),
}


@pytest.mark.parametrize("owner, name, plant, case, broken", PLANTED.values(),
                         ids=PLANTED.keys())
def test_a_planted_wrong_adjoint_is_caught(device, monkeypatch, owner, name, plant, case,
                                           broken):
    layer, input_shape = MAPS[case]
    monkeypatch.setattr(owner, name, plant(getattr(owner, name)))
    maps = engine_maps(layer, input_shape, device)
    for identity, check in CHECKS.items():
        if identity in broken:
            with pytest.raises(AssertionError):
                check(maps)
        else:
            check(maps)


# --- 2. conv networks against PyTorch and the reference -----------------------------------

# name: (per-sample input shape, convolutions as (c_in, c_out, kernel, stride, padding),
# width of a hidden Dense before the head or None)
GEOMETRIES = {
    "k3-s1-p1": ((1, 6, 7), [(1, 2, 3, 1, 1)], None),
    "k2x3-s2-p0": ((2, 7, 5), [(2, 3, (2, 3), 2, 0)], None),
    "k4-s3-p2": ((1, 9, 6), [(1, 2, 4, 3, 2)], None),
    "k1-s1x3-p2x0": ((3, 4, 7), [(3, 2, 1, (1, 3), (2, 0))], None),
    "k4x1-s2x1-p1x2-hidden-dense": ((2, 6, 3), [(2, 2, (4, 1), (2, 1), (1, 2))], 4),
    "k3x2-s3-p1": ((3, 8, 5), [(3, 2, (3, 2), 3, 1)], None),
    "k2x4-s1x2-p0x1": ((2, 5, 8), [(2, 3, (2, 4), (1, 2), (0, 1))], None),
    "two-convs": ((2, 8, 7), [(2, 3, 3, 2, 1), (3, 2, (2, 1), 1, (0, 1))], None),
    "three-convs-hidden-dense": ((1, 9, 10), [(1, 2, (3, 4), 1, (1, 2)), (2, 3, 2, (3, 2), 0),
                                              (3, 2, 1, 1, 1)], 5),
    "four-convs": ((1, 7, 9), [(1, 2, 3, 1, 1), (2, 2, 2, 2, 0), (2, 3, (1, 3), 1, (1, 0)),
                               (3, 2, 2, 1, 1)], None),
    # P = 4 positions, K = 48, c_out = 8: P (c_out + K) = 224 < c_out K = 384, the Gram path
    "gram-path": ((3, 6, 7), [(3, 8, 4, 2, 0)], None),
    # the kernel fills the padded image: one output position (P = 1)
    "kernel-fills-padded-input": ((1, 3, 2), [(1, 2, (5, 4), 1, 1)], None),
}
CONV_ACTIVATIONS = ["identity", "relu", "relu(alpha=0.5)", "sigmoid", "tanh", "gelu"]
HIDDEN_DENSE = {"output": "relu", "recompute": "gelu", "store_both": "sigmoid"}
# (the Dense head's activation, loss, soft targets): softmax only with the squared loss
HEADS = [("identity", "squared", False), ("identity", "logistic", False),
         ("identity", "softmax_cross_entropy", False),
         ("identity", "softmax_cross_entropy", True),
         ("softmax", "squared", False), ("tanh", "squared", False)]


def build(geometry, acts, head, memory):
    input_shape, convs, hidden = GEOMETRIES[geometry]
    layers = [Conv2d(c_in, c_out, k, s, p, activation=act)
              for (c_in, c_out, k, s, p), act in zip(convs, acts)]
    width = math.prod(per_sample_shape(layers, input_shape))
    if hidden:
        layers.append(Dense(width, hidden, activation=HIDDEN_DENSE[memory]))
        width = hidden
    layers.append(Dense(width, D_OUT, activation=head[0]))
    return input_shape, layers


def _cases():
    """Every geometry in every memory mode; the conv activations and the heads rotate so
    that every activation meets every mode it runs in, and every head every mode."""
    for g, geometry in enumerate(GEOMETRIES):
        n_convs = len(GEOMETRIES[geometry][1])
        for m, memory in enumerate(MODES):
            acts = [CONV_ACTIVATIONS[(g + 2 * m + j) % len(CONV_ACTIVATIONS)]
                    for j in range(n_convs)]
            if memory == "output":  # GELU has no sigma' from its output
                acts = ["tanh" if a == "gelu" else a for a in acts]
            head = HEADS[(g + m) % len(HEADS)]
            yield pytest.param(geometry, tuple(acts), head, memory,
                               id=f"{geometry}-{memory}-{'-'.join(acts)}-"
                                  f"{head[0]}-{head[1]}{'-soft' if head[2] else ''}")


CASES = list(_cases())


def test_the_grid_covers_every_axis():
    seen = {(v.values[3], a) for v in CASES for a in v.values[1]}
    assert seen == {(mode, act) for mode in MODES for act in CONV_ACTIVATIONS
                    if not (act == "gelu" and mode == "output")}
    assert {(v.values[3], v.values[2]) for v in CASES} == {(m, h) for m in MODES for h in HEADS}
    assert {len(convs) for _, convs, _ in GEOMETRIES.values()} == {1, 2, 3, 4}
    specs = [spec for _, convs, _ in GEOMETRIES.values() for spec in convs]

    def sizes(i):  # every height and width given as argument i of the convolutions
        return {v for spec in specs for v in np.atleast_1d(spec[i]).tolist()}

    assert sizes(2) >= {1, 2, 3, 4} and sizes(3) == {1, 2, 3} and sizes(4) == {0, 1, 2}
    assert {spec[0] for spec in specs} == {1, 2, 3}
    assert any(isinstance(spec[2], tuple) for spec in specs)  # non-square kernels
    assert any(h != w for (_, h, w), _, _ in GEOMETRIES.values())  # non-square images
    # the per-sample norm's three paths: P = 1, the Gram matrices, the direct product
    paths = {_norm_path(layer, shape) for geometry in GEOMETRIES
             for layer, shape in _conv_shapes(geometry)}
    assert paths == {"outer", "gram", "direct"}


def _conv_shapes(geometry):
    input_shape, layers = build(geometry, ["relu"] * 4, HEADS[0], "output")
    for layer in layers:
        if isinstance(layer, Conv2d):
            yield layer, input_shape
        input_shape = layer.output_shape(input_shape)


def _norm_path(layer, input_shape):
    """MATH.md: ``<T_i T_i^T, X_i X_i^T>`` costs P^2 (c_out + K), ``||T_i^T X_i||^2``
    P c_out K: the cheaper one."""
    P, K = layer.positions(input_shape), layer.fan_in
    if P == 1:
        return "outer"
    return "gram" if P * (layer.c_out + K) < layer.c_out * K else "direct"


def problem(geometry, acts, head, memory, dtype=np.float64, seed=0):
    input_shape, layers = build(geometry, acts, head, memory)
    rng = np.random.default_rng(seed + list(GEOMETRIES).index(geometry))
    params = random_params(rng, layers)
    X = rng.standard_normal((BATCH, *input_shape))
    _, loss, soft = head
    if loss == "squared":
        Y = rng.standard_normal((BATCH, D_OUT))
    elif loss == "logistic":
        Y = rng.choice([-1.0, 1.0], size=(BATCH, D_OUT))
    elif soft:
        Y = rng.dirichlet(np.ones(D_OUT), size=BATCH)
    else:
        Y = rng.integers(0, D_OUT, size=BATCH)
    return layers, params, loss, X, Y


def engine(layers, params, loss, memory, device, dtype=np.float64):
    return gpu_mlp.Network.from_params(layers, [(W.astype(dtype), b.astype(dtype))
                                                for W, b in params],
                                       loss=loss, memory=memory, device=device)


def reference_norms(layers, params, loss, X, Y):
    """Each sample's own gradient, one sample at a time, and its norm over all W and b."""
    norms = []
    for i in range(X.shape[0]):
        _, grads, _ = reference.network_loss_and_gradients(layers, params, loss,
                                                           X[i:i + 1], Y[i:i + 1])
        norms.append(math.sqrt(sum((dW ** 2).sum() + (db ** 2).sum() for dW, db in grads)))
    return np.array(norms)


@pytest.mark.parametrize("geometry, acts, head, memory", CASES)
def test_conv_net_matches_the_reference(device, geometry, acts, head, memory):
    layers, params, loss, X, Y = problem(geometry, acts, head, memory)
    J_ref, grads_ref, dX_ref = reference.network_loss_and_gradients(layers, params, loss, X, Y)

    net = engine(layers, params, loss, memory, device)
    assert_close(net.predict(X), reference.network_forward(layers, params, X), RTOL64, "F")
    J, grads, dX = net.loss_and_gradients(X, Y)
    assert_close(J, J_ref, RTOL64, "J")
    for k, ((dW, db), (dW_ref, db_ref)) in enumerate(zip(grads, grads_ref), start=1):
        assert_close(dW, dW_ref, RTOL64, f"dJ/dW_{k}")
        assert_close(db, db_ref, RTOL64, f"dJ/db_{k}")
    assert_close(dX, dX_ref, RTOL64, "dJ/dX")
    assert_close(net.per_sample_grad_norms(X, Y), reference_norms(layers, params, loss, X, Y),
                 RTOL64, "per-sample norms")
    # nothing above moved the parameters; the fused step is SGD with those gradients
    for (W, b), (W0, b0) in zip(net.params, params):
        assert np.array_equal(to_numpy(W), W0) and np.array_equal(to_numpy(b), b0)
    assert_close(net.train_step(X, Y, LR), J_ref, RTOL64, "train_step's loss")
    for k, ((W, b), (W0, b0), (dW, db)) in enumerate(zip(net.params, params, grads_ref),
                                                     start=1):
        assert_close(W, W0 - LR * dW, RTOL64, f"W_{k} after the step")
        assert_close(b, b0 - LR * db, RTOL64, f"b_{k} after the step")


@pytest.mark.parametrize("geometry, acts, head, memory", CASES)
def test_conv_net_matches_torch_autograd(device, geometry, acts, head, memory):
    layers, params, loss, X, Y = problem(geometry, acts, head, memory)
    J_torch, out, tensors, X_torch = torch_network(layers, params, X, Y, loss)
    net = engine(layers, params, loss, memory, device)
    assert_close(net.predict(X), out.detach().numpy(), RTOL64, "F")
    J, grads, dX = net.loss_and_gradients(X, Y)
    assert_close(J, J_torch.item(), RTOL64, "J")
    for k, ((dW, db), (W, b)) in enumerate(zip(grads, tensors), start=1):
        assert_close(dW, W.grad.numpy(), RTOL64, f"dJ/dW_{k}")
        assert_close(db, b.grad.numpy(), RTOL64, f"dJ/db_{k}")
    assert_close(dX, X_torch.grad.numpy(), RTOL64, "dJ/dX")


@pytest.mark.parametrize("geometry", ["two-convs", "gram-path"])
def test_memory_modes_give_the_same_numbers(device, geometry):
    # the NumPy twins run the same ufuncs in every mode: bit for bit on the CPU
    rtol = 0.0 if device == "cpu" else 1e-14
    acts = ("sigmoid", "relu") if geometry == "two-convs" else ("tanh",)
    results = []
    for memory in MODES:
        layers, params, loss, X, Y = problem(geometry, acts, HEADS[2], memory)
        net = engine(layers, params, loss, memory, device)
        J, grads, dX = net.loss_and_gradients(X, Y)
        norms = net.per_sample_grad_norms(X, Y)
        results.append([J, dX, norms] + [a for pair in grads for a in pair])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert_close(a, b, rtol)


class _RecordingXp:
    """numpy as the GPU's branches use it (``xp is not np``), noting the shape of every
    batched GEMM's result (ops.gemm_batched, on NumPy one GEMM a matrix)."""

    def __init__(self):
        self.products = []

    def __getattr__(self, name):  # the rest as NumPy's: zeros, maximum, copyto
        return getattr(np, name)

    @contextlib.contextmanager
    def recording(self):
        batched = ops.gemm_batched

        def recorded(transa, transb, a, b, out, *args):
            self.products.append(out.shape)
            return batched(transa, transb, a, b, out, *args)
        ops.gemm_batched = recorded
        try:
            yield self
        finally:
            ops.gemm_batched = batched


def _batched_squares(xp, T, X, lib):
    """The GPU's per-sample squares (norms.add_squares: batched GEMMs into workspace
    buffers, a dense layer's by two row kernels), run by ``xp``, NumPy under another
    name, on the tests' CuPy stand-in over host_cupy's build ``lib``."""
    from gpu_mlp.workspace import Workspace
    from host_cupy import cupy_path

    squares = np.zeros(T.shape[0], dtype=T.dtype)
    with cupy_path(lib):
        norms.add_squares(xp, T, X, squares, Workspace(xp, T.dtype))
    return squares


def _squares(xp, T, X, lib):
    """The CPU's per-sample squares for ``np``, the GPU's for another ``xp``."""
    return norms.per_sample_squares(T, X) if xp is np else _batched_squares(xp, T, X, lib)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", ["gram-path", "two-convs", "kernel-fills-padded-input"])
def test_per_sample_squares_on_the_cpu_equal_the_batched_form(geometry, dtype, host_cupy_lib):
    # the NumPy backend runs one sample at a time through SciPy's BLAS, the GPU batched
    # GEMMs into workspace buffers (norms.add_squares)
    layer, input_shape = next(_conv_shapes(geometry))
    rng = np.random.default_rng(6)
    P, K = layer.positions(input_shape), layer.fan_in
    T = rng.standard_normal((BATCH, P, layer.c_out)).astype(dtype)
    X = rng.standard_normal((BATCH, P, K)).astype(dtype)
    assert_close(norms.per_sample_squares(T, X),
                 _batched_squares(_RecordingXp(), T, X, host_cupy_lib),
                 1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("geometry, path", [("gram-path", "gram"), ("two-convs", "direct"),
                                            ("kernel-fills-padded-input", "outer")])
def test_per_sample_norm_takes_the_cheaper_path(geometry, path, host_cupy_lib):
    layer, input_shape = next(_conv_shapes(geometry))
    assert _norm_path(layer, input_shape) == path
    rng = np.random.default_rng(5)
    P, K = layer.positions(input_shape), layer.fan_in
    T, X = rng.standard_normal((BATCH, P, layer.c_out)), rng.standard_normal((BATCH, P, K))
    xp = _RecordingXp()
    with xp.recording():
        squares = _squares(xp, T, X, host_cupy_lib)
    sums = [(BATCH, 1, layer.c_out)]  # the bias's per-sample sums: ones against T
    expected = {"gram": [(BATCH, P, P)] * 2 + sums, "direct": [(BATCH, layer.c_out, K)] + sums,
                "outer": []}[path]
    assert xp.products == expected
    G = np.einsum("bpo,bpk->bok", T, X)  # the per-sample gradients, formed
    assert_close(squares, (G ** 2).sum(axis=(1, 2)) + (T.sum(axis=1) ** 2).sum(axis=1),
                 1e-12)


@pytest.mark.parametrize("xp", [np, _RecordingXp()], ids=["cpu", "batched"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gram_form_norms_whose_terms_cancel_are_bounded_above_never_nan(xp, dtype, host_cupy_lib):
    """A sample whose gradient nearly cancels over the positions: the Gram form's
    <T T^T, X X^T> was then rounding noise -- negative (a NaN norm, then every weight of
    a DP step NaN) or far too small for the clipping. Where its worst-case rounding is
    more than GRAM_TRUSTED of it, it is replaced by an upper bound; elsewhere (random
    factors) it stays the value to rounding."""
    P, d_out, K = 16, 32, 144
    assert norms.gram_form(P, d_out, K)
    rng = np.random.default_rng(0)
    signs = np.where(np.arange(P) % 2 == 0, 0.5, -0.5)  # alternating residuals over P
    T = (signs[None, :, None] * np.ones((4, P, d_out))).astype(dtype)
    X = (1e3 + 1e-4 * rng.standard_normal((4, P, K))).astype(dtype)  # nearly flat input
    G = np.einsum("bpo,bpk->bok", T.astype(np.float64), X.astype(np.float64))
    exact = (G ** 2).sum(axis=(1, 2)) + (T.astype(np.float64).sum(axis=1) ** 2).sum(axis=1)
    squares = _squares(xp, T, X, host_cupy_lib)
    assert np.isfinite(squares).all() and (squares >= exact * (1 - 1e-6)).all()
    Tr, Xr = rng.standard_normal((4, P, d_out)), rng.standard_normal((4, P, K))
    G = np.einsum("bpo,bpk->bok", Tr, Xr)
    exact = (G ** 2).sum(axis=(1, 2)) + (Tr.sum(axis=1) ** 2).sum(axis=1)
    got = _squares(xp, Tr.astype(dtype), Xr.astype(dtype), host_cupy_lib)
    assert_close(got, exact, 1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("xp", [np, _RecordingXp()], ids=["cpu", "batched"])
@pytest.mark.parametrize("P, d_out, K", [(1, 2, 400), (4, 20, 30), (9, 4, 3)],
                         ids=["dense", "gram", "direct"])
def test_norms_of_huge_inputs_are_never_nan(xp, P, d_out, K, host_cupy_lib):
    """float32 inputs of 1e19 overflow their squares: a sample with T_i = 0 (a saturated
    softmax) has G_i = 0, but 0 inf made its norm NaN, and a DP step's every weight NaN;
    X_i X_i^T overflowing made the Gram form NaN (inf - inf). Now 0 where T_i = 0, and
    an upper bound (inf: the sample's clipped share is 0) where the value is lost."""
    assert P == 1 or norms.gram_form(P, d_out, K) == (d_out == 20)
    rng = np.random.default_rng(1)
    T = (1e-3 * rng.standard_normal((3, P, d_out))).astype(np.float32)
    T[0] = 0
    X = (1e19 * rng.standard_normal((3, P, K))).astype(np.float32)
    with np.errstate(over="ignore"):
        squares = _squares(xp, T, X, host_cupy_lib)
    assert squares[0] == 0 and not np.isnan(squares).any()


# --- 3. central finite differences -----------------------------------------------------------

def finite_difference_net(memory, device):
    """A tiny conv net away from ReLU's kink (tanh and sigmoid), with a batch (X, Y)."""
    layers = [Conv2d(1, 2, (2, 3), stride=(1, 2), padding=1, activation="tanh"),
              Dense(30, 3, activation="sigmoid")]
    rng = np.random.default_rng(3)
    params, X = random_params(rng, layers), rng.standard_normal((2, 1, 4, 5))
    Y = rng.standard_normal((2, 3))
    return engine(layers, params, "squared", memory, device), X, Y


def assert_finite_differences(net, X, Y):
    """Every gradient of ``net`` at (X, Y) against central differences, which perturb the
    net's own parameters (on its device) and the host X in place."""
    def J():
        return float(to_numpy(net.loss_and_gradients(X, Y)[0]))

    J0, grads, dX = net.loss_and_gradients(X, Y)
    grads = [(to_numpy(dW), to_numpy(db)) for dW, db in grads]
    noise = 1e-8 * max(1.0, abs(float(to_numpy(J0))))  # rounding: eps |J| / h
    for k, ((W, b), (dW, db)) in enumerate(zip(net.params, grads), start=1):
        # on CuPy the differences come back as a CuPy array (np.empty_like dispatches)
        np.testing.assert_allclose(dW, to_numpy(central_differences(J, W)), rtol=1e-6,
                                   atol=noise, err_msg=f"dJ/dW_{k}")
        np.testing.assert_allclose(db, to_numpy(central_differences(J, b)), rtol=1e-6,
                                   atol=noise, err_msg=f"dJ/db_{k}")
    np.testing.assert_allclose(to_numpy(dX), central_differences(J, X), rtol=1e-6,
                               atol=noise, err_msg="dJ/dX")


@pytest.mark.parametrize("memory", MODES)
def test_gradients_match_finite_differences(device, memory):
    assert_finite_differences(*finite_difference_net(memory, device))


@pytest.mark.parametrize("memory", MODES)
def test_gradients_match_finite_differences_on_the_cupy_path(host_cupy_lib, memory):
    """The same, with every op on its CuPy branch and the CUDA bodies run on the host
    (host_cupy). Its arrays are NumPy's, so it cannot show a CuPy array handed to NumPy:
    the cuda case above is the only check of that."""
    import host_cupy

    net, X, Y = finite_difference_net(memory, "cpu")
    with host_cupy.cupy_path(host_cupy_lib) as device:
        assert_finite_differences(net, X, Y)
    assert device.launches["gemm", "N", "T", "float64"] > 0


# --- 4. float32 ------------------------------------------------------------------------------

@pytest.mark.parametrize("geometry, acts, head, memory", CASES[::5])
def test_float32_matches_the_float64_reference(device, geometry, acts, head, memory):
    layers, params, loss, X, Y = problem(geometry, acts, head, memory)
    J_ref, grads_ref, dX_ref = reference.network_loss_and_gradients(layers, params, loss, X, Y)
    net = engine(layers, params, loss, memory, device, dtype=np.float32)
    assert net.dtype == np.float32
    J, grads, dX = net.loss_and_gradients(X.astype(np.float32), Y)
    assert to_numpy(J).dtype == to_numpy(dX).dtype == np.float32
    assert_close(J, J_ref, RTOL32, "J")
    assert_close(dX, dX_ref, RTOL32, "dJ/dX")
    for k, ((dW, db), (dW_ref, db_ref)) in enumerate(zip(grads, grads_ref), start=1):
        assert_close(dW, dW_ref, RTOL32, f"dJ/dW_{k}")
        assert_close(db, db_ref, RTOL32, f"dJ/db_{k}")
    assert_close(net.predict(X), reference.network_forward(layers, params, X), RTOL32, "F")
    assert_close(net.per_sample_grad_norms(X, Y), reference_norms(layers, params, loss, X, Y),
                 RTOL32, "per-sample norms")


# --- 5. bad input: an error naming the layer, before anything changes ---------------------------

def conv_net(device):
    layers = [Conv2d(1, 2, 3, padding=1, activation="tanh"), Dense(40, 3, activation="identity")]
    return gpu_mlp.Network(layers, device=device, dtype="float64", seed=0)


def two_conv_net(device):
    # fits 9x9 images: (2, 5, 5), then (2, 1, 1)
    layers = [Conv2d(1, 2, 5, activation="tanh"), Conv2d(2, 2, 5, activation="tanh"),
              Dense(2, 3, activation="identity")]
    return gpu_mlp.Network(layers, device=device, dtype="float64", seed=0)


CONV1 = re.escape("layer 1, Conv2d(1, 2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), "
                  "activation='tanh'): ")
# name: (net builder, X, message)
BAD_X = {
    "3-D batch into a conv net": (
        conv_net, np.ones((2, 4, 5)),
        CONV1 + r"takes \(batch, 1, height, width\) images, but its input has per-sample "
                r"shape \(2, 4, 5\)"),
    "rows into a conv net": (conv_net, np.ones((2, 20)), CONV1 + r".*per-sample shape \(20,\)"),
    "wrong channel count": (conv_net, np.ones((2, 3, 4, 5)),
                            CONV1 + r".*per-sample shape \(3, 4, 5\)"),
    "5-D batch": (conv_net, np.ones((2, 1, 1, 4, 5)),
                  CONV1 + r".*per-sample shape \(1, 1, 4, 5\)"),
    "Dense d_in does not match the flattened conv output": (
        conv_net, np.ones((2, 1, 4, 6)),
        r"layer 2, Dense\(40, 3, activation='identity'\): takes 40 inputs per sample, but its "
        r"input has shape \(2, 4, 6\) \(48 values when flattened\)"),
    "first kernel larger than the padded input": (
        two_conv_net, np.ones((2, 1, 4, 9)),
        r"layer 1, Conv2d\(1, 2, kernel_size=\(5, 5\).*\): the kernel \(5, 5\) is larger than "
        r"the padded input \(4, 9\)"),
    "second kernel larger than its input": (
        two_conv_net, np.ones((2, 1, 8, 8)),
        r"layer 2, Conv2d\(2, 2, kernel_size=\(5, 5\).*\): the kernel \(5, 5\) is larger than "
        r"the padded input \(4, 4\)"),
}
ENTRY_POINTS = {
    "predict": lambda net, X: net.predict(X),
    "loss_and_gradients": lambda net, X: net.loss_and_gradients(X, np.ones((len(X), 3))),
    "train_step": lambda net, X: net.train_step(X, np.ones((len(X), 3)), LR),
    "per_sample_grad_norms": lambda net, X: net.per_sample_grad_norms(X, np.ones((len(X), 3))),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("make, X, message", BAD_X.values(), ids=BAD_X.keys())
def test_bad_input_is_refused_before_anything_changes(device, entry, make, X, message):
    net = make(device)
    before = host_params(net)
    workspaces = [(ws.allocations, ws.in_use_bytes)
                  for ws in (net.training_workspace, net.inference_workspace)]
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](net, X)
    for (W, b), (W0, b0) in zip(net.params, before):
        assert np.array_equal(to_numpy(W), W0) and np.array_equal(to_numpy(b), b0)
    assert workspaces == [(ws.allocations, ws.in_use_bytes)
                          for ws in (net.training_workspace, net.inference_workspace)]


# (Conv2d keyword arguments, error, message)
BAD_CONV2D = {
    "stride 0": (dict(stride=0), ValueError, r"Conv2d: stride must be an integer >= 1, got 0"),
    "padding -1": (dict(padding=-1), ValueError,
                   r"Conv2d: padding must be an integer >= 0, got -1"),
    "kernel 0": (dict(kernel_size=0), ValueError,
                 r"Conv2d: kernel_size must be an integer >= 1, got 0"),
    "kernel 2.5": (dict(kernel_size=2.5), TypeError, r"Conv2d: kernel_size must be an integer"),
    "kernel '3'": (dict(kernel_size="3"), TypeError, r"Conv2d: kernel_size must be an integer"),
    "kernel True": (dict(kernel_size=True), TypeError, r"Conv2d: kernel_size .*got True"),
    "stride (1, 2.5)": (dict(stride=(1, 2.5)), TypeError, r"Conv2d: stride .*got 2\.5"),
    "padding True": (dict(padding=True), TypeError, r"Conv2d: padding .*got True"),
    "kernel of three sizes": (dict(kernel_size=(1, 2, 3)), ValueError,
                              r"Conv2d: kernel_size must be an integer or a pair"),
    "c_in 0": (dict(c_in=0), ValueError, r"Conv2d: c_in must be an integer >= 1"),
    "c_out 1.0": (dict(c_out=1.0), TypeError, r"Conv2d: c_out must be an integer"),
    "softmax": (dict(activation="softmax"), ValueError,
                r"Conv2d: activation 'softmax' works on rows of a Dense layer's output"),
    "unknown activation": (dict(activation="swish"), ValueError,
                           r"Conv2d: unknown activation 'swish'"),
}


@pytest.mark.parametrize("kwargs, error, message", BAD_CONV2D.values(), ids=BAD_CONV2D.keys())
def test_bad_conv2d_arguments_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        Conv2d(**{**dict(c_in=1, c_out=2, kernel_size=3), **kwargs})


def test_bad_dense_activation_names_the_layer():
    with pytest.raises(ValueError, match=r"Dense: unknown activation 'swish'"):
        Dense(3, 2, activation="swish")


# (layers, Network keyword arguments, error, message)
BAD_NETWORKS = {
    "Conv2d after Dense": (
        [Dense(4, 4), Conv2d(4, 2, 1)], {}, ValueError,
        r"layer 2, Conv2d\(4, 2, .*\): follows a Dense layer, whose output has no image shape"),
    "channel mismatch": (
        [Conv2d(1, 2, 3), Conv2d(3, 2, 3)], {}, ValueError,
        r"layer 2, Conv2d\(3, 2, .*\): takes 3 channels, but layer 1 gives 2"),
    "Dense widths do not chain": (
        [Conv2d(1, 2, 3), Dense(8, 4), Dense(5, 2)], {}, ValueError,
        r"layer 3, Dense\(5, 2, .*\): takes 5 inputs, but layer 2 gives 4"),
    "input_shape too small for the kernel": (
        [Conv2d(1, 2, 5), Dense(2, 3)], dict(input_shape=(1, 3, 3)), ValueError,
        r"layer 1, Conv2d\(1, 2, kernel_size=\(5, 5\).*\): the kernel \(5, 5\) is larger than "
        r"the padded input \(3, 3\)"),
    "input_shape with the wrong channels": (
        [Conv2d(1, 2, 3), Dense(2, 3)], dict(input_shape=(2, 3, 3)), ValueError,
        r"layer 1, Conv2d\(1, 2, .*per-sample shape \(2, 3, 3\)"),
    "input_shape that the Dense does not fit": (
        [Conv2d(1, 2, 3, padding=1), Dense(2, 3)], dict(input_shape=(1, 3, 3)), ValueError,
        r"layer 2, Dense\(2, 3, .*\): takes 2 inputs per sample, but its input has shape "
        r"\(2, 3, 3\)"),
    "input_shape of fractions": (
        [Conv2d(1, 2, 3), Dense(2, 3)], dict(input_shape=(1, 2.5, 3)), TypeError,
        r"input_shape must be a tuple of sizes, got \(1, 2\.5, 3\)"),
    "input_shape with a zero": (
        [Conv2d(1, 2, 3), Dense(2, 3)], dict(input_shape=(1, 0, 3)), ValueError,
        r"input_shape must be an integer >= 1, got 0"),
    "not a layer": ([Conv2d(1, 2, 3), "dense"], {}, TypeError,
                    r"layer 2 must be a gpu_mlp.layers.Dense or Conv2d, got str"),
    "no layers": ([], {}, ValueError, r"at least one layer"),
    "GELU conv in memory='output'": (
        [Conv2d(1, 2, 3, activation="gelu"), Dense(2, 3)], dict(memory="output"), ValueError,
        r"memory='output' needs sigma' as a function of the output, which gelu lacks"),
    "softmax head before the cross-entropy": (
        [Conv2d(1, 2, 3), Dense(2, 3, activation="softmax")],
        dict(loss="softmax_cross_entropy"), ValueError, r"softmax would be applied twice"),
}


@pytest.mark.parametrize("layers, kwargs, error, message", BAD_NETWORKS.values(),
                         ids=BAD_NETWORKS.keys())
def test_bad_networks_are_refused(layers, kwargs, error, message):
    with pytest.raises(error, match=message):
        gpu_mlp.Network(layers, **{**dict(device="cpu"), **kwargs})


def test_input_shape_that_fits_is_accepted():
    net = gpu_mlp.Network([Conv2d(1, 2, 3, padding=1), Dense(18, 3)], device="cpu",
                          input_shape=(1, 3, 3))
    assert net.predict(np.zeros((1, 3, 3))).shape == (3,)  # one sample, no batch axis


# --- 6. memory per mode ----------------------------------------------------------------------

# Three 8->8 channel 3x3 convolutions (padding 1) on 16x16 images, then a Dense head: every
# conv has the same K = 72 and c_out, so the workspace keeps one column buffer and one
# rows buffer (buffers are pooled per row shape), and the kept activations are UNIT each.
MEM_B, MEM_C, MEM_HW, MEM_D_OUT, ITEM = 32, 8, 16, 2, 8
MEM_CONVS = 3
MEM_P, MEM_K = MEM_HW * MEM_HW, MEM_C * 9
UNIT = MEM_B * MEM_C * MEM_P * ITEM          # one conv layer's (B, c, H, W) output
COLS = MEM_B * MEM_P * MEM_K * ITEM          # im2col of one layer: B*P*K values
ROWS = MEM_B * MEM_P * MEM_C * ITEM          # a layer's output as rows, (B*P, c_out)
# MATH.md, "Memory modes": the kept activation buffers of the conv layers
KEPT = {"output": MEM_CONVS * UNIT, "recompute": MEM_CONVS * UNIT + UNIT,
        "store_both": 2 * MEM_CONVS * UNIT}
# On NumPy im2col copies each block of samples (ops.conv_block) from one padded copy of
# it, against a copy of W in the windows' order (layers.ChannelsLast); the entrance
# convolution pads its NCHW blocks (layers.EntranceConv): a second padded block
BLOCK = max(1, ops.CONV_BLOCK_BYTES // (MEM_P * MEM_K * ITEM))
PADDED = BLOCK * (MEM_HW + 2) ** 2 * MEM_C * ITEM
W_COPY = MEM_C * MEM_K * ITEM
# The second and third convolutions' forward and C^dagger run as GEMMs on shifted views
# (layers.ChannelsLast.shifted: 18x18 cells for 16x16 outputs): the phase planes in the
# column buffer (smaller than the columns), a grid of outputs, (B, 18, 18, 8), and W's
# taps
SHIFTED = MEM_B * (MEM_HW + 2) ** 2 * MEM_C * ITEM + W_COPY
# Besides: one more activation (Delta_k beside dJ/dF_{k-1}), the column buffer (the
# weight gradient's rows), one rows buffer, the padded blocks and W's copy, the head's
# few (B, d_out) buffers and the (B*P,) ones of the bias GEMV
WORKING_SET = (UNIT + COLS + ROWS + 2 * PADDED + W_COPY + SHIFTED
               + 4 * MEM_B * MEM_D_OUT * ITEM + MEM_B * MEM_P * ITEM)
NUMPY_TEMPORARIES = 3 * ops.BLOCK_ELEMENTS * ITEM  # the NumPy twins' row blocks
BOOKKEEPING = 16 * 1024
assert NUMPY_TEMPORARIES < UNIT


def memory_net(memory, device="cpu"):
    layers = [Conv2d(MEM_C, MEM_C, 3, padding=1, activation="relu") for _ in range(MEM_CONVS)]
    layers.append(Dense(MEM_C * MEM_P, MEM_D_OUT, activation="identity"))
    return gpu_mlp.Network(layers, memory=memory, device=device, dtype="float64", seed=0)


def memory_batch(batch=MEM_B):
    rng = np.random.default_rng(1)
    return (rng.standard_normal((batch, MEM_C, MEM_HW, MEM_HW)),
            rng.standard_normal((batch, MEM_D_OUT)))





@pytest.fixture(scope="module")
def measured():
    """Per mode: (traced peak of a warm step above a baseline taken before the first
    step, the workspace)."""
    X, Y = memory_batch()
    result = {}
    for memory in MODES:
        net = memory_net(memory)
        with tracing():
            base = traced_now()  # before the first step: the peak includes the workspace
            net.train_step(X, Y, 1e-3)
            tracemalloc.reset_peak()
            net.train_step(X, Y, 1e-3)
            result[memory] = (traced_peak() - base, net.training_workspace)
    return result


@pytest.mark.parametrize("memory", MODES)
def test_conv_traced_peak_matches_the_math_table(measured, memory):
    peak, _ = measured[memory]
    slack = WORKING_SET + NUMPY_TEMPORARIES + BOOKKEEPING
    assert KEPT[memory] <= peak <= KEPT[memory] + slack


def test_conv_modes_rank_as_the_table_says(measured):
    for size in (lambda m: m[0], lambda m: m[1].peak_in_use_bytes, lambda m: m[1].bytes):
        output, recompute, store_both = (size(measured[mode]) for mode in MODES)
        assert output <= recompute < store_both
    # store_both keeps sigma'(A_k) beside F_k: one more UNIT per conv layer, measured
    extra = measured["store_both"][0] - measured["output"][0]
    assert abs(extra - MEM_CONVS * UNIT) <= NUMPY_TEMPORARIES


@pytest.mark.parametrize("memory", MODES)
def test_conv_workspace_peak_matches_the_math_table(device, memory):
    net = memory_net(memory, device)
    net.train_step(*memory_batch(), 1e-3)
    peak = net.training_workspace.peak_in_use_bytes
    assert KEPT[memory] <= peak <= KEPT[memory] + WORKING_SET
    assert peak <= net.training_workspace.bytes <= KEPT[memory] + WORKING_SET


@pytest.mark.parametrize("memory", MODES)
def test_conv_steady_state_creates_no_buffers(device, memory):
    net = memory_net(memory, device)
    batches = [memory_batch(size) for size in (8, 3, 5)]  # a batch, a remainder, another
    net.train_step(*batches[0], 1e-3)  # the largest batch first
    ws = net.training_workspace
    allocations, held = ws.allocations, ws.bytes
    for _ in range(10):
        for X, Y in batches:
            net.train_step(X, Y, 1e-3)
    assert (ws.allocations, ws.bytes) == (allocations, held)
    assert ws.in_use_bytes == 0


# Remark 8's store over recompute where it is cheap: on NumPy a convolution whose columns
# (for the largest batch its workspace has run) fit one cache-sized block keeps them from
# the forward for its weight gradient, and the W copy its input gradient reads, except in
# "recompute" mode. Where a step keeps no columns (a recompute net, or keeping patched
# off) a layer's forward may run as GEMMs on shifted views instead (layers.ChannelsLast.
# shifted), which sum in another order: the tests of keeping hold every convolution to
# the im2col path they compare against (columns_path).


@pytest.fixture
def columns_path(monkeypatch):
    """Every convolution through im2col and col2im, as one on small maps runs."""
    from gpu_mlp import layers as engine

    monkeypatch.setattr(engine, "SHIFTED_FORWARD_MAX", 0)
    monkeypatch.setattr(engine, "SHIFTED_ADJOINT_MAX", 0)


# A 1 -> 4 -> 8 channel net on 8x8 images: its second convolution
# widens (c_out > c_in), so its input gradient reads the forward's copy of W.
def small_conv_net(memory, seed=0):
    layers = [Conv2d(1, 4, 3, padding=1, activation="relu"),
              Conv2d(4, 8, 3, stride=2, padding=1, activation="tanh"),
              Dense(8 * 4 * 4, 3, activation="identity")]
    return gpu_mlp.Network(layers, loss="softmax_cross_entropy", memory=memory, device="cpu",
                           dtype="float64", seed=seed)


def small_conv_batch(batch=6):
    rng = np.random.default_rng(3)
    return rng.standard_normal((batch, 1, 8, 8)), rng.integers(0, 3, batch)


def counting(monkeypatch, owner, name, calls):
    f = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return f(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("memory", MODES)
def test_small_convolutions_keep_their_columns_from_the_forward(monkeypatch, memory, columns_path):
    from gpu_mlp import conv, layers as engine
    net = small_conv_net(memory)
    X, y = small_conv_batch()
    net.train_step(X, y, LR)
    calls = {}
    counting(monkeypatch, conv, "im2col_nhwc", calls)  # the widening convolution's
    counting(monkeypatch, engine, "im2col_transposed", calls)  # the entrance's (NCHW)
    counting(monkeypatch, engine.ChannelsLast, "_windows_weight", calls)
    net.train_step(X, y, LR)
    made = 2 if memory == "recompute" else 1  # forward, and again for the backward
    assert calls == {"im2col_nhwc": made, "im2col_transposed": made, "_windows_weight": made}
    assert net.training_workspace.in_use_bytes == 0  # and given back

    # after a batch whose columns exceed one block, the small batch keeps none either
    # (a remainder holds no buffer the full batch does not): made again, as in every mode
    net.train_step(*small_conv_batch(ops.CONV_BLOCK_BYTES // (16 * 36 * 8) + 1), LR)
    calls.clear()
    net.train_step(X, y, LR)
    assert calls == {"im2col_nhwc": 2, "im2col_transposed": 2, "_windows_weight": 2}


RULES = {"sgd": lambda: LR, "adam": lambda: gpu_mlp.optim.Adam(1e-2),
         "dp": lambda: gpu_mlp.plan.StepPlan(LR, dp=gpu_mlp.privacy.DP(
             max_grad_norm=0.5, noise_multiplier=0.7, seed=1))}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("memory", MODES)
def test_kept_columns_give_the_made_again_ones_bits(monkeypatch, memory, rule, columns_path):
    X, y = small_conv_batch()
    nets = []
    for keeps in (True, False):
        if not keeps:
            monkeypatch.setattr(ops, "keeps_columns", lambda *args: False)
        net, step = small_conv_net(memory), RULES[rule]()
        for _ in range(3):
            net.train_step(X, y, step)
        J, grads, dX = net.loss_and_gradients(X, y)
        nets.append((host_params(net), to_numpy(J), grads, dX))
    (params, J, grads, dX), (params0, J0, grads0, dX0) = nets
    assert J == J0 and np.array_equal(dX, dX0)
    for (W, b), (W0, b0), (gW, gb), (gW0, gb0) in zip(params, params0, grads, grads0):
        assert np.array_equal(W, W0) and np.array_equal(b, b0)
        assert np.array_equal(gW, gW0) and np.array_equal(gb, gb0)


def test_kept_columns_cost_at_most_a_block_per_convolution(monkeypatch, columns_path):
    X, y = small_conv_batch()
    held = []
    for keeps in (True, False):
        if not keeps:
            monkeypatch.setattr(ops, "keeps_columns", lambda *args: False)
        net = small_conv_net("output")
        net.train_step(X, y, LR)
        held.append(net.training_workspace.peak_in_use_bytes)
    # both convolutions' columns (B*P*K values) and the widening one's W copy
    kept = (6 * 64 * 9 + 6 * 16 * 36 + 8 * 36) * 8
    assert held[0] - held[1] <= kept <= 2 * ops.CONV_BLOCK_BYTES
    assert held[0] > held[1]


def test_kept_weight_copies_stay_within_a_block_per_layer(columns_path):
    # widening convolutions on small maps: tiny columns, W copies of 0.07-9 MiB; what the
    # forward keeps of a layer must stay within the README's cache-sized blocks
    layers = [Conv2d(16, 64, 3, padding=1, activation="relu"),
              Conv2d(64, 256, 3, padding=1, activation="relu"),
              Conv2d(256, 512, 3, padding=1, activation="relu"), Dense(512 * 2 * 2, 3)]
    net = gpu_mlp.Network(layers, loss="softmax_cross_entropy", device="cpu",
                          dtype="float64", seed=0)
    F, tape = net.forward(np.random.default_rng(0).standard_normal((4, 16, 2, 2)))
    _, _, saved = tape._kept
    assert any(s.rows is not None for s in saved)  # (kept: the test tests something)
    for s in saved:
        for kept in (s.rows, s.weight):
            assert kept is None or kept.nbytes <= ops.CONV_BLOCK_BYTES
    tape.release()


def test_col2im_scratch_has_a_pool_of_its_own():
    # the (B,) vectors of a DP step (its squares) must not be sized for col2im's scratch
    from gpu_mlp.privacy import DP
    layers = [Conv2d(1, 4, 3, padding=1, activation="relu"),
              Conv2d(4, 8, 3, padding=1, activation="relu"), Dense(8 * 8 * 8, 3)]
    net = gpu_mlp.Network(layers, loss="softmax_cross_entropy", device="cpu", seed=0)
    X, y = small_conv_batch()
    net.train_step(X, y, LR, dp=DP(max_grad_norm=1.0, noise_multiplier=1.0, seed=0))
    ws = net.training_workspace
    assert ws._rows[((), ws.dtype)] == len(X)


@pytest.mark.parametrize("memory", MODES)
def test_conv_train_step_holds_no_gradient_buffers(memory):
    # weights of about 4 MiB (the Dense), activations of a few KiB
    layers = [Conv2d(1, 16, 3, padding=1, activation="relu"), Dense(16 * 16 * 16, 128, "tanh"),
              Dense(128, 2, "identity")]
    net = gpu_mlp.Network(layers, memory=memory, device="cpu", dtype="float64", seed=0)
    rng = np.random.default_rng(2)
    X, Y = rng.standard_normal((2, 1, 16, 16)), rng.standard_normal((2, 2))
    net.train_step(X, Y, 1e-3)  # warm both: workspaces exist before tracing
    net.loss_and_gradients(X, Y)

    with tracing():
        train = step_peak(lambda: net.train_step(X, Y, 1e-3))
        gradients = step_peak(lambda: net.loss_and_gradients(X, Y))
    # (less a KiB: the Python objects of a step, which tracemalloc counts too, moved the
    # two peaks by tens of bytes from one commit to the next -- a gradient buffer would
    # move them by the 4 MiB of W)
    assert gradients - train >= sum(W.nbytes + b.nbytes for W, b in net.params) - 1024


# --- 7. a Network of Dense layers is the MLP -------------------------------------------------

@pytest.mark.parametrize("memory", MODES)
def test_dense_network_is_the_mlp_bit_for_bit(device, memory):
    sizes, acts = [5, 7, 6, 3], ["tanh", "relu(alpha=0.5)", "identity"]
    mlp = gpu_mlp.MLP(sizes, activations=acts, loss="softmax_cross_entropy", memory=memory,
                      device=device, dtype="float64", seed=4)
    layers = [Dense(d_in, d_out, act) for d_in, d_out, act in zip(sizes, sizes[1:], acts)]
    net = gpu_mlp.Network(layers, loss="softmax_cross_entropy", memory=memory, device=device,
                          dtype="float64", seed=4)
    assert mlp.layers == net.layers
    for (W, b), (W0, b0) in zip(host_params(net), host_params(mlp)):  # the same draws
        assert np.array_equal(W, W0) and np.array_equal(b, b0)
    rng = np.random.default_rng(0)
    for W, b in net.params + mlp.params:  # non-zero biases: a lost bias shows
        b[...] = net.xp.asarray(np.arange(b.shape[0]) * 0.1 - 0.2)
    X, y = rng.standard_normal((4, 5)), rng.integers(0, 3, 4)

    def same(a, b):
        assert np.array_equal(to_numpy(a), to_numpy(b))

    same(net.predict(X), mlp.predict(X))
    (J, grads, dX), (J0, grads0, dX0) = net.loss_and_gradients(X, y), mlp.loss_and_gradients(X, y)
    same(J, J0)
    same(dX, dX0)
    for (dW, db), (dW0, db0) in zip(grads, grads0):
        same(dW, dW0)
        same(db, db0)
    same(net.per_sample_grad_norms(X, y), mlp.per_sample_grad_norms(X, y))
    same(net.train_step(X, y, LR), mlp.train_step(X, y, LR))
    for (W, b), (W0, b0) in zip(net.params, mlp.params):
        same(W, W0)
        same(b, b0)

    # an MLP's layers and params build a Network, and a Network's params an MLP
    from_mlp = gpu_mlp.Network.from_params(mlp.layers, mlp.params, loss=mlp.loss.name,
                                           memory=memory, device=device)
    back = gpu_mlp.MLP.from_params(net.params, net.activations, loss=net.loss.name,
                                   memory=memory, device=device)
    assert back.sizes == sizes and from_mlp.layers == mlp.layers
    for other in (from_mlp, back):
        same(other.predict(X), mlp.predict(X))
        same(other.loss_and_gradients(X, y)[2], mlp.loss_and_gradients(X, y)[2])


# --- 8. fit on images, and resume -------------------------------------------------------------

def image_data(n=40):
    rng = np.random.default_rng(6)
    X = rng.standard_normal((n, 2, 6, 5))
    y = (X[:, 0, :3].sum(axis=(1, 2)) > X[:, 1, 3:].sum(axis=(1, 2))).astype(int) + \
        (X.mean(axis=(1, 2, 3)) > 0.2)
    return X, y


def image_net(device):
    layers = [Conv2d(2, 3, 3, stride=(1, 2), padding=1, activation="relu"),
              Conv2d(3, 2, 2, activation="tanh"), Dense(2 * 5 * 2, 3, activation="identity")]
    return gpu_mlp.Network(layers, loss="softmax_cross_entropy", memory="recompute",
                           device=device, dtype="float64", seed=3)


FIT = dict(batch_size=16, lr=0.05, seed=7, verbose=False)  # 16, 16 and a remainder of 8


def test_fit_trains_on_images(device):
    X, y = image_data()
    net = image_net(device)
    before = net.loss_and_gradients(X, y)[0]
    history = net.fit(X, y, epochs=3, validation=(X[:10], y[:10]), **FIT)
    assert history.epochs == 3 and history.samples == len(X)
    assert all(math.isfinite(v) for v in history.train_loss + history.val_loss)
    assert all(0 <= a <= 1 for a in history.val_accuracy)
    assert float(to_numpy(net.loss_and_gradients(X, y)[0])) < float(to_numpy(before))
    assert net.predict(X).shape == (len(X), 3)


def test_fit_resumed_is_bit_for_bit(device):
    X, y = image_data()
    straight = image_net(device)
    straight_history = straight.fit(X, y, epochs=4, **FIT)
    resumed = image_net(device)
    history = resumed.fit(X, y, epochs=2, **FIT)
    history = resumed.fit(X, y, epochs=4, resume=history, **FIT)
    assert history.train_loss == straight_history.train_loss
    for (W, b), (W0, b0) in zip(host_params(resumed), host_params(straight)):
        assert np.array_equal(W, W0) and np.array_equal(b, b0)


# --- forward and backward as two calls (for frameworks: gpu_mlp.torch) --------------------

@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
def test_backward_from_a_given_output_gradient(device, memory):
    # J = <F_n, G> has dJ/dF_n = G; with the squared loss and Y = F_n - B G / 2 the loss
    # gradient is the same G, so loss_and_gradients is the oracle
    net = gpu_mlp.Network([Conv2d(2, 3, 3, padding=1, activation="tanh"),
                           Dense(3 * 5 * 4, 4, "sigmoid")], loss="squared", memory=memory,
                          device=device, dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    X, G = rng.standard_normal((6, 2, 5, 4)), rng.standard_normal((6, 4))
    out, tape = net.forward(X)
    grads, dX = net.backward(tape, G)
    _, expected, dX_ref = net.loss_and_gradients(X, to_numpy(out) - 3 * G)
    for (dW, db), (dW_ref, db_ref) in zip(grads, expected):
        np.testing.assert_allclose(to_numpy(dW), to_numpy(dW_ref), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(to_numpy(db), to_numpy(db_ref), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(dX), to_numpy(dX_ref), rtol=1e-12, atol=1e-14)
    assert net.training_workspace.in_use_bytes == 0  # the tape's buffers are back


@pytest.mark.parametrize("change", ["train_step", "fit", "params replaced",
                                    "params replaced, wrong dtype"])
def test_a_tape_whose_parameters_changed_since_its_forward_is_refused(device, change):
    """The tape keeps the activations of its forward's weights; backward reads the weights
    as they are then: after a training step (or new params) its gradient mixed the two,
    15-50% off torch's for either set, silently. Refused, naming why, its buffers back;
    the parameters untouched; a new forward's backward is right."""
    net = gpu_mlp.MLP([4, 6, 3], activations="tanh", device=device, dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    X, G = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    _, tape = net.forward(X)
    if change == "train_step":
        net.train_step(X, G, 0.1)
    elif change == "fit":
        net.fit(X, G, epochs=1, batch_size=5, lr=0.1, verbose=False)
    else:
        W, b = net.params[0]
        net.params[0] = (W.astype(np.float32) if "dtype" in change else W.copy(), b)
    params = host_params(net)
    with pytest.raises(ValueError, match=r"parameters changed since this tape's forward "
                                         r"pass \(a training step, or net.params replaced\)"):
        net.backward(tape, G)
    assert net.training_workspace.in_use_bytes == 0
    assert all(np.array_equal(a, b) for pair, pair_now in zip(params, host_params(net))
               for a, b in zip(pair, pair_now))
    if "dtype" not in change:
        out, tape = net.forward(X)
        grads, _ = net.backward(tape, G)  # the squared loss's gradient at Y = F - B G / 2
        _, expected, _ = net.loss_and_gradients(X, to_numpy(out) - 2.5 * G)
        for pair, pair_ref in zip(grads, expected):
            for g, g_ref in zip(pair, pair_ref):
                np.testing.assert_allclose(to_numpy(g), to_numpy(g_ref), rtol=1e-12,
                                           atol=1e-14)


def test_a_tape_serves_one_backward_and_can_be_released(device):
    net = gpu_mlp.Network([Dense(3, 4, "relu"), Dense(4, 2, "identity")], device=device,
                          dtype="float64")
    other = gpu_mlp.Network([Dense(3, 4, "relu"), Dense(4, 2, "identity")], device=device,
                            dtype="float64")
    X = np.ones((5, 3))
    out, tape = net.forward(X)
    with pytest.raises(ValueError, match="tape of a forward pass of this network"):
        other.backward(tape, np.ones((5, 2)))
    with pytest.raises(ValueError, match=re.escape("grad_output must have the output's "
                                                   "shape (5, 2), got (5, 3)")):
        net.backward(tape, np.ones((5, 3)))
    assert net.training_workspace.in_use_bytes == 0  # a failed backward gives them back
    with pytest.raises(ValueError, match="used already"):
        net.backward(tape, np.ones((5, 2)))
    _, tape = net.forward(X)
    with pytest.raises(ValueError, match="grad_output contains NaN or Inf"):
        net.backward(tape, np.full((5, 2), np.nan))
    assert net.training_workspace.in_use_bytes == 0
    _, tape = net.forward(X)
    with pytest.raises(TypeError, match="grad_output must hold real numbers"):
        net.backward(tape, np.full((5, 2), "a"))
    _, tape = net.forward(X)
    assert net.training_workspace.in_use_bytes > 0
    tape.release()
    assert net.training_workspace.in_use_bytes == 0
    with pytest.raises(ValueError, match="forward takes a batch"):
        net.forward(np.ones(3))
    # a tape dropped unused gives its buffers back: they were counted in use for good,
    # and the workspace kept a big batch's sizes through free_buffers()
    _, tape = net.forward(np.ones((1000, 3)))
    del tape
    assert net.training_workspace.in_use_bytes == 0
    net.free_buffers()
    net.train_step(X[:2], np.ones((2, 2)), 0.1)
    assert set(net.training_workspace._rows.values()) == {2}


@pytest.mark.parametrize("memory", MODES)
def test_a_conv_tape_released_or_refused_gives_back_its_kept_columns(memory, columns_path):
    """A forward keeps a small convolution's columns and W copy in its tape (on the CPU
    outside "recompute"): a tape released unused, or whose backward is refused, gives
    them back with the activations."""
    net = small_conv_net(memory)
    X, _ = small_conv_batch()
    ws = net.training_workspace
    _, tape = net.forward(X)
    tape.release()
    assert ws.in_use_bytes == 0
    _, tape = net.forward(X)
    with pytest.raises(ValueError, match="grad_output contains NaN or Inf"):
        net.backward(tape, np.full((6, 3), np.nan))
    assert ws.in_use_bytes == 0
    _, tape = net.forward(X)
    net.backward(tape, np.ones((6, 3)))
    assert ws.in_use_bytes == 0


# --- hostile input found by a hunt (each failed before its fix) -----------------------------

def _snapshot(net):
    return [a.copy() for pair in net.params for a in pair]


def test_read_only_parameters_are_refused_before_a_step_writes_them(tmp_path):
    """The update is written into W in place: a read-only array (a memory map opened
    "r") was written through, or crashed the process; now a ValueError, nothing written.
    predict still reads them."""
    net = gpu_mlp.MLP([4, 3], device="cpu", seed=0)
    path = tmp_path / "W.npy"
    np.save(path, net.params[0][0])
    mapped = np.load(path, mmap_mode="r")
    net.params = [(mapped, net.params[0][1])]
    X, Y = np.ones((2, 4)), np.ones((2, 3))
    before = _snapshot(net)
    with pytest.raises(ValueError, match="W_1 is read-only"):
        net.train_step(X, Y, 0.1)
    with pytest.raises(ValueError, match="W_1 is read-only"):
        gpu_mlp.training.fit(net, X, Y, epochs=1, verbose=False)
    np.testing.assert_array_equal(net.predict(X), net.predict(X))
    for a, b in zip(_snapshot(net), before):
        np.testing.assert_array_equal(a, b)
    frozen = net.params[0][1].copy()
    frozen.flags.writeable = False
    net.params = [(np.array(mapped), frozen)]
    with pytest.raises(ValueError, match="b_1 is read-only"):
        net.train_step(X, Y, 0.1)


@pytest.mark.parametrize("bad, error, match", [
    (lambda W: W.astype(np.float32), ValueError, "W_1 must be a C-contiguous float64 array "
                                                 "of shape \\(5, 4\\), got float32"),
    (lambda W: np.ascontiguousarray(W.T), ValueError, "got float64 \\(4, 5\\)"),
    (lambda W: np.asmatrix(W), TypeError, "W_1 is a numpy.matrix")])
@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_replaced_parameters_the_engine_cannot_use_are_neither_saved_nor_copied(
        tmp_path, bad, error, match):
    """save wrote them -- atomically, over the last good checkpoint -- into a file load
    refuses, and a pickled copy failed only at its first predict; an np.matrix (2-D when
    flattened) failed an optimizer's update after the last layer was updated. All are
    refused as the other entry points refuse them, nothing written, nothing changed."""
    import pickle

    from gpu_mlp import optim

    net = gpu_mlp.MLP([4, 5, 3], activations="tanh", device="cpu", dtype="float64", seed=0)
    path = tmp_path / "net.npz"
    net.save(path)
    good = path.read_bytes()
    net.params[0] = (bad(net.params[0][0]), net.params[0][1])
    before = _snapshot(net)
    with pytest.raises(error, match=match):
        net.save(path)
    assert path.read_bytes() == good
    with pytest.raises(error, match=match):
        pickle.dumps(net)
    opt = optim.Adam(0.1)
    with pytest.raises(error, match=match):
        net.train_step(np.ones((2, 4)), np.ones((2, 3)), opt)
    assert opt.steps == 0
    for a, b in zip(_snapshot(net), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rule", ["sgd", "momentum"])
@pytest.mark.parametrize("rows", [slice(None), slice(2, 5)])
def test_a_batch_that_is_a_parameter_steps_as_its_copy(rule, rows):
    """Plain SGD writes W_1 -= lr T^T X in the GEMM that reads X: with X = W_1 (or rows
    of it) the BLAS read what it was writing, up to 0.09 off. The step takes a copy."""
    from gpu_mlp import optim

    def step(copy):
        net = gpu_mlp.MLP([6, 6, 6], activations="tanh", device="cpu", dtype="float64",
                          seed=0)
        X = net.params[0][0][rows]  # W_1 is (6, 6): rows of 6 features
        X = X.copy() if copy else X
        Y = np.ones((X.shape[0], 6))
        net.train_step(X, Y, 0.5 if rule == "sgd" else optim.SGD(0.5, momentum=0.9))
        return _snapshot(net)

    for a, b in zip(step(copy=False), step(copy=True)):
        np.testing.assert_array_equal(a, b)


def _unaligned(a):
    """``a``'s values in a C-contiguous, writeable array at an odd byte offset."""
    u = np.frombuffer(bytearray(a.nbytes + 1), a.dtype, a.size, offset=1).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned and u.flags.c_contiguous and u.flags.writeable
    return u


def test_unaligned_parameters_are_copied_or_refused_before_any_layer_is_updated():
    """BLAS writes no unaligned array (f2py copied it, then the step raised a 'not
    C-contiguous' error after the later layers were updated): from_params(copy=False)
    copies such arrays, and one set into net.params is refused, nothing written."""
    net = gpu_mlp.MLP([3, 4, 2], device="cpu", dtype="float64", seed=0)
    X, Y = np.ones((2, 3)), np.ones((2, 2))
    odd = [(_unaligned(W), _unaligned(b)) for W, b in net.params]
    held = gpu_mlp.MLP.from_params(odd, ["relu", "identity"], device="cpu", copy=False)
    assert all(a.flags.aligned for pair in held.params for a in pair)
    held.train_step(X, Y, 0.1)
    net.params[0] = (odd[0][0], net.params[0][1])
    before = _snapshot(net)
    with pytest.raises(ValueError, match="W_1 is not aligned to its dtype"):
        net.train_step(X, Y, 0.1)
    for a, b in zip(_snapshot(net), before):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(net.predict(X)).all()  # predict still reads it


@pytest.mark.parametrize("alpha", [1e-50, 1e39])
def test_relu_alpha_is_checked_in_the_nets_dtype(alpha):
    """1e-50 is 0 and 1e39 inf in float32: the net's weights (gain / alpha) or its
    kernels would be NaN; float64 holds both."""
    with pytest.raises(ValueError, match=r"layer 1's relu\(alpha=.*\): alpha must be a finite "
                                         r"number > 0 in float32"):
        gpu_mlp.MLP([4, 5, 3], activations=f"relu(alpha={alpha})", device="cpu",
                    dtype="float32")
    net = gpu_mlp.MLP([4, 5, 3], activations=f"relu(alpha={alpha})", device="cpu",
                      dtype="float64")
    assert all(np.isfinite(a).all() for pair in net.params for a in pair)


def test_from_params_checks_the_values_as_cast_and_refuses_masked_entries():
    W, b = np.full((3, 4), 1e39), np.zeros(3)
    with pytest.raises(ValueError, match="W_1 in float32 contains NaN or Inf"):
        gpu_mlp.MLP.from_params([(W, b)], "identity", device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="b_1 in float32 contains NaN or Inf"):
        gpu_mlp.Network.from_params([Dense(4, 3)], [(np.zeros((3, 4)), np.full(3, -1e39))],
                                    device="cpu", dtype="float32")
    masked = np.ma.masked_invalid(np.where(np.eye(3, 4) > 0, np.nan, 1.0))
    for make in (lambda: gpu_mlp.MLP.from_params([(masked, b)], "identity", device="cpu"),
                 lambda: gpu_mlp.Network.from_params([Dense(4, 3)], [(masked, b)],
                                                     device="cpu")):
        with pytest.raises(ValueError, match="W_1 is a masked array with masked entries"):
            make()


def test_from_params_without_copy_trains_in_the_given_arrays_where_they_fit():
    rng = np.random.default_rng(0)
    W1, b1 = rng.standard_normal((5, 4)), np.zeros(5)
    W2, b2 = rng.standard_normal((3, 5)), np.zeros(3)
    net = gpu_mlp.MLP.from_params([(W1, b1), (W2, b2)], "tanh", device="cpu", copy=False)
    assert all(a is g for (W, b), (gW, gb) in zip(net.params, [(W1, b1), (W2, b2)])
               for a, g in ((W, gW), (b, gb)))
    before = W1.copy()
    net.train_step(rng.standard_normal((8, 4)), rng.standard_normal((8, 3)), lr=0.1)
    assert not np.array_equal(W1, before)  # the step wrote into the caller's array
    copied = gpu_mlp.MLP.from_params([(W1, b1), (W2, b2)], "tanh", device="cpu")
    assert not any(np.shares_memory(a, g) for pair in copied.params for a in pair
                   for g in (W1, b1, W2, b2))  # the default copies, as before

    # where an array does not fit, the net holds a copy: another dtype, strided,
    # read-only, or one array given twice (tied: each update would land twice)
    frozen = W1.copy()
    frozen.flags.writeable = False
    for params, dtype in [([(W1, b1)], "float32"), ([(np.asfortranarray(W1), b1)], None),
                          ([(frozen, b1)], None)]:
        net = gpu_mlp.MLP.from_params(params, "tanh", device="cpu", dtype=dtype, copy=False)
        assert not np.shares_memory(net.params[0][0], params[0][0])
        assert net.params[0][0].flags.c_contiguous and net.params[0][0].flags.writeable
    square = rng.standard_normal((4, 4))
    tied = gpu_mlp.MLP.from_params([(square, b1[:4]), (square, b1[:4])], "tanh",
                                   device="cpu", copy=False)
    (W1t, b1t), (W2t, b2t) = tied.params
    assert W1t is square and not np.shares_memory(W2t, square)
    assert b1t.base is b1 and not np.shares_memory(b2t, b1)
    with pytest.raises(TypeError, match="copy must be True or False"):
        gpu_mlp.MLP.from_params([(W1, b1)], "tanh", device="cpu", copy="no")


def test_check_false_takes_nan_parameters_and_inputs_as_they_are():
    """A diverged model's parameters, inspected or copied, and NaN inputs propagated (as
    PyTorch does): from_params(check=False) and predict(check=False)."""
    W, b = np.full((2, 3), np.inf), np.zeros(2)
    with pytest.raises(ValueError, match="W_1 contains NaN or Inf"):
        gpu_mlp.MLP.from_params([(W, b)], "tanh", device="cpu")
    for net in (gpu_mlp.MLP.from_params([(W, b)], "tanh", device="cpu", check=False),
                gpu_mlp.Network.from_params([Dense(3, 2, "tanh")], [(W, b)], device="cpu",
                                            check=False)):
        assert np.isinf(net.params[0][0]).all()
    net = gpu_mlp.MLP([3, 2], device="cpu", seed=0)
    X = np.array([[np.nan, 1.0, 2.0]])
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        net.predict(X)
    assert np.isnan(net.predict(X, check=False)).all()


@pytest.mark.parametrize("make", [
    lambda: gpu_mlp.MLP([4, 2**62, 3], device="cpu"),
    lambda: gpu_mlp.MLP([4, 2**70, 3], device="cpu"),
    lambda: gpu_mlp.Network([Dense(2**70, 3)], device="cpu"),
    lambda: gpu_mlp.Network([Conv2d(1, 2, 2**31)], device="cpu"),
    # within float32's range, not float64's, in which the weights are drawn
    lambda: gpu_mlp.MLP([2**30, 2**30 + 2**29], device="cpu", dtype="float32"),
], ids=["2^62", "2^70", "dense-2^70", "conv-2^31", "float32-2^60.6"])
def test_a_model_past_any_arrays_range_is_a_memory_error_naming_its_size(make):
    with pytest.raises(MemoryError, match=r"the model needs .* TB for its .* parameters"):
        make()


def test_softmax_cross_entropy_needs_two_outputs_whatever_the_last_layer():
    """A convolution's outputs are known with the input shape: one output a sample was
    accepted, and every loss 0."""
    layers = [Conv2d(1, 1, 3)]
    with pytest.raises(ValueError, match="needs at least 2 outputs .* got 1"):
        gpu_mlp.Network(layers, loss="softmax_cross_entropy", device="cpu",
                        input_shape=(1, 3, 3))
    net = gpu_mlp.Network(layers, loss="softmax_cross_entropy", device="cpu")
    before = _snapshot(net)
    with pytest.raises(ValueError, match="needs at least 2 outputs .* got 1"):
        net.train_step(np.ones((2, 1, 3, 3)), np.zeros(2, dtype=int), 0.1)
    for a, b in zip(_snapshot(net), before):
        np.testing.assert_array_equal(a, b)
    # four positions of one channel are four outputs: a softmax over them is fine
    gpu_mlp.Network(layers, loss="softmax_cross_entropy", device="cpu", input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="needs at least 2 outputs"):
        gpu_mlp.MLP([4, 1], loss="softmax_cross_entropy", device="cpu")


def test_flags_dtypes_and_ragged_lists_are_refused_by_name():
    net = gpu_mlp.MLP([4, 5, 3], loss="softmax_cross_entropy", device="cpu")
    X, y = np.ones((2, 4)), np.array([0, 1])
    for check in ("no", None, 1):
        with pytest.raises(TypeError, match="check must be True or False"):
            net.train_step(X, y, 0.1, check=check)
    with pytest.raises(ValueError, match="X cannot be made an array: .*inhomogeneous"):
        net.train_step([[1, 2, 3, 4], [1, 2]], y, 0.1)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got None"):
        gpu_mlp.MLP([4, 5, 3], device="cpu", dtype=None)


@pytest.mark.parametrize("make", [
    lambda: gpu_mlp.MLP([4, 6, 3], activations="relu(alpha=0.5)", loss="softmax_cross_entropy",
                        memory="store_both", device="cpu", dtype="float64", seed=1),
    lambda: gpu_mlp.Network([Conv2d(1, 2, 3, padding=1), Dense(2 * 4 * 4, 3)],
                            loss="softmax_cross_entropy", device="cpu", seed=1),
], ids=["mlp", "cnn"])
def test_a_net_pickles_and_deep_copies_into_a_net_of_its_own(make):
    """pickle, copy.deepcopy, a process pool: the copy has the architecture, settings and
    parameters, its own arrays and buffers; training it leaves the original as it was."""
    import copy
    import pickle

    net = make()
    X = np.random.default_rng(0).standard_normal((5, *(
        (4,) if isinstance(net, gpu_mlp.MLP) else (1, 4, 4))))
    y = np.array([0, 1, 2, 1, 0])
    net.train_step(X, y, 0.1)  # buffers and engine forms made: not part of a copy
    for twin in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert type(twin) is type(net) and repr(twin) == repr(net)
        for (W, b), (W2, b2) in zip(net.params, twin.params):
            np.testing.assert_array_equal(W, W2)
            np.testing.assert_array_equal(b, b2)
            assert not np.shares_memory(W, W2)
        np.testing.assert_array_equal(twin.predict(X), net.predict(X))
        before = _snapshot(net)
        twin.train_step(X, y, 0.1)
        for a, b in zip(_snapshot(net), before):
            np.testing.assert_array_equal(a, b)


def test_a_diverged_net_and_a_clipped_loss_copy_as_they_are():
    """A copy is made of the values as they are -- a diverged net's too (it raised 'W_1
    contains NaN or Inf': from_params(check=False) is for inspecting or copying one) --
    and with the loss as it is (a clipped loss came back unclipped: 200 for 16.1)."""
    import copy
    import pickle

    from gpu_mlp import losses

    W, b = np.array([[np.nan, 1.0], [np.inf, 0.0]]), np.zeros(2)
    diverged = gpu_mlp.MLP.from_params([(W, b)], "identity", device="cpu", dtype="float64",
                                       check=False)
    clipped = gpu_mlp.MLP([2, 2], loss=losses.get("softmax_cross_entropy").clipped(1e-7),
                          device="cpu", dtype="float64", seed=0)
    clipped.params = [(np.array([[100.0, 0.0], [0.0, 0.0]]), np.zeros(2))]
    X, y = np.array([[1.0, 0.0]]), np.array([1])
    for copied in (copy.copy, copy.deepcopy, lambda net: pickle.loads(pickle.dumps(net))):
        np.testing.assert_array_equal(copied(diverged).params[0][0], W)
        twin = copied(clipped)
        assert twin.loss == clipped.loss and twin.loss.clip is not None
        assert float(twin.loss_and_gradients(X, y)[0]) == pytest.approx(-np.log(1e-7))
    plain = pickle.loads(pickle.dumps(gpu_mlp.MLP([2, 2], device="cpu")))
    assert plain.loss is losses.get("squared")  # a table's loss travels by its name


def test_recompute_net_makes_an_identity_convolutions_columns_again(monkeypatch, columns_path):
    # an identity layer runs as "output" in a "recompute" net (same memory, less work):
    # it must not keep columns that the net's mode promises to make again
    from gpu_mlp import conv
    net = gpu_mlp.Network([Conv2d(1, 4, 3, padding=1, activation="tanh"),
                           Conv2d(4, 8, 3, padding=1, activation="identity"),
                           Dense(8 * 8 * 8, 3, activation="identity")],
                          loss="softmax_cross_entropy", memory="recompute", device="cpu",
                          dtype="float64", seed=0)
    X, y = small_conv_batch()
    net.train_step(X, y, LR)
    calls = {}
    counting(monkeypatch, conv, "im2col_nhwc", calls)
    net.train_step(X, y, LR)
    assert calls == {"im2col_nhwc": 2}


def test_kept_columns_follow_the_batch_when_largest_batch_was_reset(columns_path):
    # free_buffers() in another thread may reset largest_batch between a step's setting
    # it and its convolutions: a batch too large for one block still keeps nothing
    ws = Workspace(np, np.float64)
    x = np.zeros((2000, 8, 8, 4))
    assert ws.largest_batch == 0
    assert not ops.keeps_columns(x, ws, 64 * 36 * 8)
    assert ops.keeps_columns(x[:6], ws, 64 * 36 * 8)
