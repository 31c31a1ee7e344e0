"""Layer networks in gpu_mlp.reference (Dense and Conv2d), checked in float64.

1. The adjoint identities of MATH.md that define each layer's backward maps,
   ``<C(x, W), T> = <x, C^dagger(T, W)> = <W, C^{dagger dagger}(x, T)>`` and
   ``<iota(b), T> = <b, iota^*(T)>``, with planted wrong adjoints that they catch;
2. PyTorch autograd on the same networks (torch.nn.functional.conv2d and linear), for
   kernel sizes 1-4, strides 1-3, paddings 0-2, non-square images, every activation and
   every output/loss pairing of test_reference.py;
3. central finite differences on a tiny convolutional network;
4. a Dense-only network gives exactly what the dense reference gives;
5. bad input raises an error naming the layer and the problem.
"""

import doctest

import numpy as np
import pytest

from gpu_mlp import activations, reference
from gpu_mlp.layers import Conv2d, Dense
from test_reference import (HEADS, TORCH_ACTIVATIONS, TORCH_LOSSES, assert_close,
                            central_differences)

# Elementwise activations (a convolution's output is not rows: no softmax there).
CONV_ACTIVATIONS = ["identity", "relu", "relu(alpha=0.5)", "sigmoid", "tanh", "gelu"]


def random_params(rng, layers):
    """Weights scaled by 1/sqrt(fan_in) so activations stay O(1); biases O(1)."""
    return [(rng.standard_normal(layer.weight_shape) / np.sqrt(layer.fan_in),
             0.5 * rng.standard_normal(layer.bias_shape)) for layer in layers]


def output_shape(layers, input_shape):
    for layer in layers:
        input_shape = layer.output_shape(input_shape)
    return input_shape


# --- 1. the adjoint identities --------------------------------------------------------------

# (layer, per-sample input shape): every conv geometry, and a Dense on images and rows
MAPS = {
    "conv-k3-s1-p1": (Conv2d(2, 3, 3, padding=1), (2, 6, 7)),
    "conv-k2x4-s2x3-p0x2": (Conv2d(3, 2, (2, 4), stride=(2, 3), padding=(0, 2)), (3, 7, 9)),
    "conv-k4-s3-p2": (Conv2d(1, 2, 4, stride=3, padding=2), (1, 8, 5)),
    "conv-k1-s2-p2": (Conv2d(2, 2, 1, stride=2, padding=2), (2, 5, 4)),
    "dense-on-images": (Dense(24, 5), (2, 3, 4)),
    "dense-on-rows": (Dense(7, 3), (7,)),
}


def check_adjoints(layer, input_shape, seed=0, batch=3):
    """Each identity to 1e-12 of the size of its terms, on random float64 arguments."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *input_shape))
    W, b = rng.standard_normal(layer.weight_shape), rng.standard_normal(layer.bias_shape)
    T = rng.standard_normal((batch, *layer.output_shape(input_shape)))

    Cx = reference.bilinear(layer, x, W)
    assert Cx.shape == T.shape
    dx = reference.bilinear_dagger(layer, T, W, input_shape)
    dW = reference.bilinear_dagger_dagger(layer, x, T)
    assert dx.shape == x.shape and dW.shape == W.shape
    scale = np.abs(Cx * T).sum()
    assert abs(np.vdot(Cx, T) - np.vdot(x, dx)) < 1e-12 * scale, "C^dagger"
    assert abs(np.vdot(Cx, T) - np.vdot(W, dW)) < 1e-12 * scale, "C^{dagger dagger}"

    bias = reference.iota(layer, b, T.shape)
    db = reference.iota_star(layer, T)
    assert bias.shape == T.shape and db.shape == b.shape
    assert abs(np.vdot(bias, T) - np.vdot(b, db)) < 1e-12 * np.abs(bias * T).sum(), "iota^*"


@pytest.mark.parametrize("layer, input_shape", MAPS.values(), ids=MAPS.keys())
def test_adjoint_identities(layer, input_shape):
    check_adjoints(layer, input_shape)


def _flipped_kernel(dagger):
    # a convolution where a cross-correlation is meant: the classic mistake
    def wrong(layer, T, W, shape):
        return dagger(layer, T, W[:, :, ::-1, ::-1] if W.ndim == 4 else W, shape)
    return wrong


def _wrong_weight_adjoint(dagger_dagger):
    def wrong(layer, x, T):
        G = dagger_dagger(layer, x, T)
        return G[:, :, ::-1, ::-1] if G.ndim == 4 else G
    return wrong


def _mean_not_sum(iota_star):
    return lambda layer, T: iota_star(layer, T) / (T.size // T.shape[1])


def _dense_missing_transpose(dagger):
    # T W^T for T W: right shapes when W is square, wrong numbers
    return lambda layer, T, W, shape: dagger(layer, T, W.T, shape)


PLANTED = {
    "C^dagger flips the kernel": ("bilinear_dagger", _flipped_kernel, "conv-k2x4-s2x3-p0x2"),
    "C^dd flips the kernel": ("bilinear_dagger_dagger", _wrong_weight_adjoint, "conv-k3-s1-p1"),
    "iota^* is a mean": ("iota_star", _mean_not_sum, "conv-k4-s3-p2"),
    "dense C^dagger transposed": ("bilinear_dagger", _dense_missing_transpose, "square"),
}


@pytest.mark.parametrize("name, plant, case", PLANTED.values(), ids=PLANTED.keys())
def test_a_wrong_adjoint_is_caught(monkeypatch, name, plant, case):
    layer, input_shape = MAPS[case] if case != "square" else (Dense(4, 4), (4,))
    monkeypatch.setattr(reference, name, plant(getattr(reference, name)))
    with pytest.raises(AssertionError):
        check_adjoints(layer, input_shape)


# --- 2. PyTorch autograd ----------------------------------------------------------------

# name: (per-sample input shape, the convolutions before a Dense head); each conv's
# activation is filled in per case from CONV_ACTIVATIONS
NETS = {
    "k3-s1-p1": ((1, 6, 7), [dict(c_in=1, c_out=2, kernel_size=3, padding=1)]),
    "k2x3-s2-p0": ((2, 7, 5), [dict(c_in=2, c_out=3, kernel_size=(2, 3), stride=2)]),
    "k4-s3-p2": ((1, 9, 6), [dict(c_in=1, c_out=2, kernel_size=4, stride=3, padding=2)]),
    "k1-s1x3-p2x0": ((3, 4, 7), [dict(c_in=3, c_out=2, kernel_size=1, stride=(1, 3),
                                      padding=(2, 0))]),
    "two-convs": ((2, 8, 7), [dict(c_in=2, c_out=3, kernel_size=3, stride=2, padding=1),
                              dict(c_in=3, c_out=2, kernel_size=(2, 1), padding=(0, 1))]),
    "three-convs": ((1, 9, 10), [dict(c_in=1, c_out=2, kernel_size=(3, 4), padding=(1, 2)),
                                 dict(c_in=2, c_out=3, kernel_size=2, stride=(3, 2)),
                                 dict(c_in=3, c_out=2, kernel_size=1, stride=1, padding=1)]),
}
D_OUT = 3  # the Dense head's width


def build(net, head, shift=0, hidden_dense=None):
    """The layers of NETS[net] (conv activations rotated by ``shift``), an optional hidden
    Dense of the given activation, and a Dense head for ``head``."""
    input_shape, convs = NETS[net]
    layers = [Conv2d(**spec, activation=CONV_ACTIVATIONS[(shift + k) % len(CONV_ACTIVATIONS)])
              for k, spec in enumerate(convs)]
    width = int(np.prod(output_shape(layers, input_shape)))
    if hidden_dense:
        layers.append(Dense(width, 4, activation=hidden_dense))
        width = 4
    layers.append(Dense(width, D_OUT, activation=head.output))
    return input_shape, layers


def torch_network(layers, params, X, Y, loss):
    """(J, output, parameter tensors, X tensor), J backpropagated by autograd."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    tensors = [(torch.tensor(W, requires_grad=True), torch.tensor(b, requires_grad=True))
               for W, b in params]
    X = torch.tensor(X, requires_grad=True)
    out = X
    for layer, (W, b) in zip(layers, tensors):
        if isinstance(layer, Conv2d):
            a = F.conv2d(out, W, b, stride=layer.stride, padding=layer.padding)
        else:
            a = F.linear(torch.flatten(out, 1), W, b)
        out = TORCH_ACTIVATIONS[layer.activation.name](torch, a, layer.activation.alpha)
    J = TORCH_LOSSES[loss](torch, torch.flatten(out, 1), torch.as_tensor(Y))
    J.backward()
    return J, out, tensors, X


def check_torch(layers, params, X, Y, loss):
    J_torch, out, tensors, X_torch = torch_network(layers, params, X, Y, loss)
    assert_close(reference.network_forward(layers, params, X), out.detach().numpy(), 1e-10,
                 "output")
    J, grads, dX = reference.network_loss_and_gradients(layers, params, loss, X, Y)
    assert_close(J, J_torch.item(), 1e-10, "J")
    for k, ((dW, db), (W, b)) in enumerate(zip(grads, tensors), start=1):
        assert_close(dW, W.grad.numpy(), 1e-10, f"dJ/dW_{k}")
        assert_close(db, b.grad.numpy(), 1e-10, f"dJ/db_{k}")
    assert_close(dX, X_torch.grad.numpy(), 1e-10, "dJ/dX")


def problem(seed, input_shape, layers, head, make_targets, batch=3):
    rng = np.random.default_rng(seed)
    params = random_params(rng, layers)
    X = rng.standard_normal((batch, *input_shape))
    Y = make_targets(rng, head.loss, batch, D_OUT, soft=head.soft)
    return params, X, Y


@pytest.mark.parametrize("head", HEADS, ids=str)
@pytest.mark.parametrize("net", NETS)
def test_matches_torch_autograd(make_targets, net, head):
    shift = list(NETS).index(net) + HEADS.index(head)  # every activation at every depth
    input_shape, layers = build(net, head, shift)
    params, X, Y = problem(shift, input_shape, layers, head, make_targets)
    check_torch(layers, params, X, Y, head.loss)


@pytest.mark.parametrize("hidden", ["softmax", "relu", "gelu"])
def test_conv_then_hidden_dense_matches_torch(make_targets, hidden):
    head = HEADS[2]  # identity + softmax cross-entropy
    input_shape, layers = build("two-convs", head, 1, hidden_dense=hidden)
    params, X, Y = problem(7, input_shape, layers, head, make_targets)
    check_torch(layers, params, X, Y, head.loss)


def test_a_conv_output_layer_is_flattened_for_the_loss(make_targets):
    layers = [Conv2d(2, 3, 2, stride=2, padding=1, activation="tanh"),
              Conv2d(3, 2, (1, 2), activation="sigmoid")]
    input_shape = (2, 5, 6)
    rng = np.random.default_rng(8)
    params, X = random_params(rng, layers), rng.standard_normal((3, *input_shape))
    Y = make_targets(rng, "squared", 3, int(np.prod(output_shape(layers, input_shape))))
    check_torch(layers, params, X, Y, "squared")


@pytest.mark.parametrize("name, plant", [("bilinear_dagger", _flipped_kernel),
                                         ("bilinear_dagger_dagger", _wrong_weight_adjoint),
                                         ("iota_star", _mean_not_sum)])
def test_the_torch_check_catches_a_wrong_backward(monkeypatch, make_targets, name, plant):
    input_shape, layers = build("two-convs", HEADS[0])
    params, X, Y = problem(12, input_shape, layers, HEADS[0], make_targets)
    monkeypatch.setattr(reference, name, plant(getattr(reference, name)))
    with pytest.raises(AssertionError):
        check_torch(layers, params, X, Y, "squared")


# --- 3. finite differences -----------------------------------------------------------------

def test_gradients_match_finite_differences(make_targets):
    layers = [Conv2d(1, 2, (2, 3), stride=(2, 1), padding=1, activation="tanh"),
              Conv2d(2, 2, 2, activation="gelu"),
              Dense(12, 3, activation="identity")]
    rng = np.random.default_rng(9)
    params, X = random_params(rng, layers), rng.standard_normal((2, 1, 5, 4))
    Y = make_targets(rng, "softmax_cross_entropy", 2, 3)

    def J():
        return reference.network_loss_and_gradients(layers, params, "softmax_cross_entropy",
                                                    X, Y)[0]

    J0, grads, dX = reference.network_loss_and_gradients(layers, params,
                                                         "softmax_cross_entropy", X, Y)
    noise = 1e-8 * max(1.0, abs(J0))
    for k, ((W, b), (dW, db)) in enumerate(zip(params, grads), start=1):
        assert_close(dW, central_differences(J, W), 1e-6, f"dJ/dW_{k}", noise)
        assert_close(db, central_differences(J, b), 1e-6, f"dJ/db_{k}", noise)
    assert_close(dX, central_differences(J, X), 1e-6, "dJ/dX", noise)


# --- 4. Dense-only is the dense reference -------------------------------------------------

@pytest.mark.parametrize("hidden", ["relu(alpha=0.5)", "softmax", "gelu"])
@pytest.mark.parametrize("head", HEADS, ids=str)
def test_dense_only_is_algorithm_1_exactly(make_targets, head, hidden):
    layers = [Dense(3, 5, activation=hidden), Dense(5, 4, activation="tanh"),
              Dense(4, D_OUT, activation=head.output)]
    params, X, Y = problem(10, (3,), layers, head, make_targets, batch=4)
    specs = [layer.activation for layer in layers]
    J1, grads1, dX1 = reference.loss_and_gradients(params, specs, head.loss, X, Y)
    J2, grads2, dX2 = reference.network_loss_and_gradients(layers, params, head.loss, X, Y)
    assert J1 == J2
    np.testing.assert_array_equal(dX1, dX2)
    for (dW1, db1), (dW2, db2) in zip(grads1, grads2):
        np.testing.assert_array_equal(dW1, dW2)
        np.testing.assert_array_equal(db1, db2)
    np.testing.assert_array_equal(reference.forward(params, specs, X),
                                  reference.network_forward(layers, params, X))


def test_float32_stays_float32(make_targets):
    input_shape, layers = build("two-convs", HEADS[0])
    params, X, Y = problem(11, input_shape, layers, HEADS[0], make_targets)
    J, grads, dX = reference.network_loss_and_gradients(
        layers, [(W.astype(np.float32), b.astype(np.float32)) for W, b in params], "squared",
        X.astype(np.float32), Y)
    J64, grads64, dX64 = reference.network_loss_and_gradients(layers, params, "squared", X, Y)
    assert J.dtype == dX.dtype == np.float32
    assert all(dW.dtype == db.dtype == np.float32 for dW, db in grads)
    assert_close(J, J64, 1e-4, "J")
    assert_close(dX, dX64, 1e-4, "dX")
    for k, ((dW, db), (dW64, db64)) in enumerate(zip(grads, grads64), start=1):
        assert_close(dW, dW64, 1e-4, f"dW_{k}")
        assert_close(db, db64, 1e-4, f"db_{k}")


# --- 5. bad input ----------------------------------------------------------------------------

CONV = Conv2d(1, 2, 3, padding=1, activation="tanh")
HEAD = Dense(2 * 4 * 5, 3, activation="identity")


@pytest.fixture
def valid_call():
    rng = np.random.default_rng(0)
    return dict(layers=[CONV, HEAD], params=random_params(rng, [CONV, HEAD]), loss="squared",
                X=rng.standard_normal((2, 1, 4, 5)), Y=rng.standard_normal((2, 3)))


def _replace(params, k, W=None, b=None):
    """params with layer k's W and/or b replaced."""
    params = list(params)
    params[k] = (params[k][0] if W is None else W, params[k][1] if b is None else b)
    return params


# name: (overrides from the valid call, error, message it must match)
BAD_CALLS = {
    "wrong channel count": (
        lambda c: {"X": np.ones((2, 3, 4, 5))}, ValueError,
        r"layer 1: Conv2d\(1, 2, .*takes \(batch, 1, height, width\) images, but its input "
        r"has per-sample shape \(3, 4, 5\)"),
    "images without a channel axis": (
        lambda c: {"X": np.ones((2, 4, 5))}, ValueError,
        r"layer 1: Conv2d.*per-sample shape \(4, 5\)"),
    "kernel larger than the padded input": (
        lambda c: {"layers": [Conv2d(1, 2, 7, activation="tanh"), HEAD],
                   "params": random_params(np.random.default_rng(0),
                                           [Conv2d(1, 2, 7), HEAD])},
        ValueError, r"layer 1: Conv2d.*kernel \(7, 7\) is larger than the padded input"),
    "Dense d_in does not match the flattened input": (
        lambda c: {"layers": [CONV, Dense(41, 3)],
                   "params": random_params(np.random.default_rng(0), [CONV, Dense(41, 3)])},
        ValueError, r"layer 2: Dense\(41, 3, .*takes 41 inputs per sample, but its input has "
                    r"shape \(2, 4, 5\) \(40 values"),
    "conv W of the wrong shape": (
        lambda c: {"params": _replace(c["params"], 0, W=np.ones((2, 1, 3, 2)))}, ValueError,
        r"layer 1 \(Conv2d\(1, 2.*\)\): W_1 must have shape \(2, 1, 3, 3\), got \(2, 1, 3, 2\)"),
    "conv b of the wrong shape": (
        lambda c: {"params": _replace(c["params"], 0, b=np.ones(3))}, ValueError,
        r"layer 1 \(Conv2d.*\): b_1 must have shape \(2,\), got \(3,\)"),
    "Dense W of the wrong shape": (
        lambda c: {"params": _replace(c["params"], 1, W=np.ones((40, 3)))}, ValueError,
        r"layer 2 \(Dense\(40, 3.*\)\): W_2 must have shape \(3, 40\)"),
    "too few params": (lambda c: {"params": c["params"][:1]}, ValueError,
                       r"expected 2 \(W, b\) pairs \(one per layer\), got 1"),
    "not a (W, b) pair": (
        lambda c: {"params": [c["params"][0] + (np.ones(2),), c["params"][1]]}, ValueError,
        r"layer 1 \(Conv2d.*\): expected a \(W, b\) pair, got 3 items"),
    "not a layer": (lambda c: {"layers": [CONV, "dense"]}, TypeError,
                    r"layer 2: expected a Dense or Conv2d, got 'dense'"),
    "a bare layer": (lambda c: {"layers": CONV}, TypeError, r"layers must be a list"),
    "no layers": (lambda c: {"layers": [], "params": []}, ValueError, r"at least one layer"),
    "X without a batch axis": (lambda c: {"X": np.ones(3)}, ValueError,
                               r"X must be a batch \(B, \.\.\.\)"),
    "empty batch": (lambda c: {"X": np.ones((0, 1, 4, 5))}, ValueError, r"X must be a batch"),
    "integer X": (lambda c: {"X": np.ones((2, 1, 4, 5), dtype=int)}, TypeError,
                  r"X must hold floating-point numbers"),
    "float32 X, float64 parameters": (
        lambda c: {"X": c["X"].astype(np.float32)}, TypeError,
        r"X has dtype float32 but the parameters are float64"),
    "mixed parameter dtypes": (
        lambda c: {"params": _replace(c["params"], 1, b=np.zeros(3, np.float32))}, TypeError,
        r"layer 2: all parameters must share one dtype"),
    "NaN in X": (lambda c: {"X": np.full((2, 1, 4, 5), np.nan)}, ValueError,
                 r"X contains NaN or Inf"),
    "Inf in a conv weight": (
        lambda c: {"params": _replace(c["params"], 0, W=np.full((2, 1, 3, 3), np.inf))},
        ValueError, r"W_1 contains NaN or Inf"),
    "Y of the wrong shape": (lambda c: {"Y": np.ones((2, 4))}, ValueError,
                             r"Y must have shape \(2, 3\)"),
    "unknown loss": (lambda c: {"loss": "mse"}, ValueError, r"unknown loss 'mse'"),
}


@pytest.mark.parametrize("change, error, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_an_error_naming_the_problem(valid_call, change, error, message):
    changes = change(valid_call)
    call = {**valid_call, **changes}
    with pytest.raises(error, match=message):
        reference.network_loss_and_gradients(**call)
    if not changes.keys() & {"loss", "Y"}:  # forward takes the rest and checks it alike
        with pytest.raises(error, match=message):
            reference.network_forward(call["layers"], call["params"], call["X"])


def test_docstring_examples_run():
    result = doctest.testmod(reference)
    assert result.attempted > 0 and result.failed == 0


def test_conv2d_refuses_softmax():
    # why CONV_ACTIVATIONS has no softmax: it works on rows, and feature maps are not rows
    assert activations.get("softmax").kind.rowwise
    with pytest.raises(ValueError, match="works on rows"):
        Conv2d(1, 1, 1, activation="softmax")
