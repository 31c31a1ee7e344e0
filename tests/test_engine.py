"""The engine, :class:`gpu_mlp.MLP`, against the plain NumPy reference.

Every test takes a ``device``: ``"cpu"`` (the NumPy backend) always, ``"cuda"`` (CuPy)
where CuPy sees a GPU. Results come back to the host with ``to_numpy`` and are compared
with :mod:`gpu_mlp.reference` run in float64 on the same parameters. Tolerances are
relative to the scale of the array compared (its largest entry), so entries that are
0 or tiny -- dead ReLU units -- do not each need a relative match of their own.
"""

import re

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import activations as activation_table
from gpu_mlp import losses as loss_table
from gpu_mlp import reference
from gpu_mlp.device import DEVICES as DEVICE_NAMES
from gpu_mlp.device import resolve, to_numpy


RTOL64 = {"cpu": 1e-12, "cuda": 1e-10}  # float64: rounding only (cuBLAS sums in another order)
RTOL32 = 1e-4                            # float32 against the float64 reference
# memory modes against each other: the NumPy twins run the same ufuncs in every mode, so
# bit for bit; CUDA kernels of different modes may contract to FMAs differently
MODES_RTOL = {"cpu": 0.0, "cuda": 1e-14}

ACTIVATIONS = ["identity", "relu", "relu(alpha=0.5)", "sigmoid", "tanh", "gelu", "softmax"]
# the kinds of targets as (loss, soft), the arguments of conftest's make_targets:
# softmax_cross_entropy takes class indices or rows of class probabilities
TARGETS = {"squared": ("squared", False), "logistic": ("logistic", False),
           "labels": ("softmax_cross_entropy", False),
           "probabilities": ("softmax_cross_entropy", True)}
# (activation, memory mode) pairs the engine accepts: "output" needs sigma' from F
SUPPORTED = [(act, mode) for act in ACTIVATIONS for mode in gpu_mlp.MEMORY_MODES
             if not (act == "gelu" and mode == "output")]

WIDTHS = [5, 7, 6, 8, 4]  # d_0 .. d_4; depth n uses the first n, then D_OUT
D_OUT = 3
BATCH = 4
LR = 0.1


@pytest.fixture
def xp(device):
    return resolve(device)[1]


@pytest.fixture
def rng():
    return np.random.default_rng(20240601)


@pytest.fixture
def make_batch(rng, make_targets):
    """``make_batch(net, target, batch=BATCH)``: random X and valid Y of kind ``target``."""
    def make_batch(net, target, batch=BATCH):
        loss, soft = TARGETS[target]
        Y = make_targets(rng, loss, batch, net.sizes[-1], soft=soft)
        return rng.standard_normal((batch, net.sizes[0])), Y
    return make_batch


def make_net(device, act="tanh", target="squared", memory="output", depth=3,
             dtype="float64", seed=0):
    """Every layer, the output layer included, uses ``act`` (but for softmax before the
    cross-entropy, which takes logits). The biases are random, not the initial zeros, so
    that a lost bias shows."""
    output = identity_before_xent(act, TARGETS[target][0])
    net = gpu_mlp.MLP(WIDTHS[:depth] + [D_OUT], activations=act, output=output,
                      loss=TARGETS[target][0], memory=memory, device=device, dtype=dtype,
                      seed=seed)
    rng = np.random.default_rng(seed + 1)
    for _, b in net.params:
        b[...] = net.xp.asarray(0.5 * rng.standard_normal(b.shape), dtype=b.dtype)
    return net


def identity_before_xent(act, loss):
    """``act``, or identity where the loss is the softmax cross-entropy and ``act`` softmax."""
    return "identity" if act == "softmax" and loss == "softmax_cross_entropy" else act


def host_params(net, dtype=None):
    """Copies of the net's parameters as NumPy arrays (optionally cast)."""
    return [(to_numpy(W).astype(dtype or W.dtype), to_numpy(b).astype(dtype or b.dtype))
            for W, b in net.params]


def reference_gradients(net, X, Y, dtype=None):
    return reference.loss_and_gradients(host_params(net, dtype), net.activations, net.loss,
                                        X, Y)


def assert_close(actual, expected, rtol):
    actual, expected = to_numpy(actual), to_numpy(expected)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max() if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def assert_same_results(actual, expected, rtol):
    """``(loss, [(dW, db)], dX)`` triples match, array by array."""
    J, grads, dX = actual
    J_ref, grads_ref, dX_ref = expected
    assert_close(J, J_ref, rtol)
    assert len(grads) == len(grads_ref)
    for (dW, db), (dW_ref, db_ref) in zip(grads, grads_ref):
        assert_close(dW, dW_ref, rtol)
        assert_close(db, db_ref, rtol)
    assert_close(dX, dX_ref, rtol)


def sgd(params, grads, lr):
    return [(W - lr * dW, b - lr * db) for (W, b), (dW, db) in zip(params, grads)]


def assert_params(net, expected, rtol):
    for (W, b), (W_ref, b_ref) in zip(net.params, expected):
        assert_close(W, W_ref, rtol)
        assert_close(b, b_ref, rtol)


def assert_unchanged(net, before):
    for (W, b), (W0, b0) in zip(net.params, before):
        assert np.array_equal(to_numpy(W), W0) and np.array_equal(to_numpy(b), b0)


# --- the engine computes what the reference computes ------------------------------------

@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("act, memory", SUPPORTED)
def test_loss_and_gradients_match_reference(device, make_batch, act, memory, target, depth):
    net = make_net(device, act, target, memory, depth)
    X, Y = make_batch(net, target)
    result = net.loss_and_gradients(X, Y)
    assert_same_results(result, reference_gradients(net, X, Y), RTOL64[device])


@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
def test_mixed_activations_match_reference(device, make_batch, memory):
    acts = ["sigmoid", "relu(alpha=0.5)", "softmax", "tanh", "identity"]
    if memory != "output":
        acts[3] = "gelu"
    net = gpu_mlp.MLP(WIDTHS + [D_OUT], activations=acts, loss="softmax_cross_entropy",
                      memory=memory, device=device, dtype="float64")
    X, Y = make_batch(net, "labels")
    assert [str(a) for a in net.activations] == acts
    assert_same_results(net.loss_and_gradients(X, Y), reference_gradients(net, X, Y),
                        RTOL64[device])


@pytest.mark.parametrize("act, memory", SUPPORTED)
def test_float32_matches_float64_reference(device, make_batch, act, memory):
    net = make_net(device, act, "labels", memory, dtype="float32")
    X, Y = make_batch(net, "labels")
    J, grads, dX = net.loss_and_gradients(X.astype(np.float32), Y)
    assert J.dtype == dX.dtype == grads[0][0].dtype == np.float32
    assert_same_results((J, grads, dX), reference_gradients(net, X, Y, np.float64), RTOL32)


@pytest.mark.parametrize("spec", [dict(activations="gelu"), dict(output="gelu"),
                                  dict(activations=["relu", "gelu", "identity"])])
def test_output_mode_refuses_gelu_clearly(device, spec):
    message = r"memory='output' needs sigma' as a function of the output, which gelu.* lacks"
    with pytest.raises(ValueError, match=message) as info:
        gpu_mlp.MLP([4, 5, 6, 3], memory="output", device=device, **spec)
    assert "recompute" in str(info.value) and "store_both" in str(info.value)


def test_from_params_output_mode_refuses_gelu(device, rng):
    params = [(rng.standard_normal((5, 4)), np.zeros(5))]
    with pytest.raises(ValueError, match="gelu lacks; use memory='recompute'"):
        gpu_mlp.MLP.from_params(params, "gelu", memory="output", device=device)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("act, memory", SUPPORTED)
def test_train_step_is_sgd_with_the_reference_gradients(device, make_batch, act, memory, target):
    net = make_net(device, act, target, memory)
    X, Y = make_batch(net, target)
    J_ref, grads, _ = reference_gradients(net, X, Y)
    expected = sgd(host_params(net), grads, LR)

    J = net.train_step(X, Y, LR)

    assert type(J) is type(net.params[0][0]) and J.shape == ()
    assert_close(J, J_ref, RTOL64[device])  # the loss at the parameters before the step
    assert_params(net, expected, RTOL64[device])


@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
def test_repeated_train_steps_follow_the_reference(device, make_batch, memory):
    net = make_net(device, "relu(alpha=0.5)", "labels", memory, depth=4)
    X, Y = make_batch(net, "labels", batch=6)
    params = host_params(net)
    for _ in range(5):
        J_ref, grads, _ = reference.loss_and_gradients(params, net.activations, net.loss, X, Y)
        params = sgd(params, grads, LR)
        assert_close(net.train_step(X, Y, LR), J_ref, RTOL64[device])
    assert_params(net, params, RTOL64[device])


def test_train_step_float32_returns_a_float32_loss(device, make_batch):
    net = make_net(device, "tanh", "labels", dtype="float32")
    X, Y = make_batch(net, "labels")
    params = host_params(net, np.float64)
    J_ref, grads, _ = reference.loss_and_gradients(params, net.activations, net.loss, X, Y)
    J = net.train_step(X.astype(np.float32), Y, LR)
    assert J.dtype == np.float32 and J.shape == ()
    assert_close(J, J_ref, RTOL32)
    assert_params(net, sgd(params, grads, LR), RTOL32)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_memory_modes_give_the_same_numbers(device, make_batch, act, target):
    modes = [m for m in gpu_mlp.MEMORY_MODES if (act, m) in SUPPORTED]
    nets = [make_net(device, act, target, memory) for memory in modes]
    X, Y = make_batch(nets[0], target)

    def results(net):
        J, grads, dX = net.loss_and_gradients(X, Y)
        norms = net.per_sample_grad_norms(X, Y)
        net.train_step(X, Y, LR)
        return [J, dX, norms] + [a for pair in grads + net.params for a in pair]

    first, *others = [results(net) for net in nets]
    for other in others:
        for a, b in zip(first, other):
            assert_close(b, a, MODES_RTOL[device])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("act, memory", SUPPORTED)
def test_per_sample_grad_norms_match_single_sample_gradients(device, make_batch, act, memory,
                                                              target):
    net = make_net(device, act, target, memory)
    X, Y = make_batch(net, target)
    expected = []
    for i in range(BATCH):
        _, grads, _ = reference_gradients(net, X[i:i + 1], Y[i:i + 1])
        expected.append(np.sqrt(sum(np.sum(dW ** 2) + np.sum(db ** 2) for dW, db in grads)))
    assert_close(net.per_sample_grad_norms(X, Y), expected, RTOL64[device])


@pytest.mark.parametrize("act, memory", SUPPORTED)
def test_predict_matches_reference_forward(device, rng, act, memory):
    net = make_net(device, act, memory=memory, depth=4)
    X1, X2 = rng.standard_normal((2, BATCH, net.sizes[0]))
    out1 = net.predict(X1)
    out2 = net.predict(X2)  # must not reuse out1's memory: the caller keeps it
    assert_close(out1, reference.forward(host_params(net), net.activations, X1),
                 RTOL64[device])
    assert_close(out2, reference.forward(host_params(net), net.activations, X2),
                 RTOL64[device])


def test_results_belong_to_the_caller(device, make_batch):
    """A second call must not overwrite what the first returned (no workspace aliasing)."""
    net = make_net(device, "relu", "squared")
    X, Y = make_batch(net, "squared")
    first = net.loss_and_gradients(X, Y)
    net.loss_and_gradients(*make_batch(net, "squared"))
    assert_same_results(first, reference_gradients(net, X, Y), RTOL64[device])


# --- one sample of shape (d_0,) -----------------------------------------------------------

def test_predict_one_sample(device, rng):
    net = make_net(device)
    x = rng.standard_normal(net.sizes[0])
    out = net.predict(x)
    assert out.shape == (D_OUT,)
    assert_close(out, reference.forward(host_params(net), net.activations, x), RTOL64[device])


@pytest.mark.parametrize("target", TARGETS)
def test_loss_and_gradients_one_sample(device, make_batch, target):
    net = make_net(device, "tanh", target)
    X, Y = make_batch(net, target, batch=1)
    x, y = X[0], Y[0]
    J, grads, dx = net.loss_and_gradients(x, y)
    assert dx.shape == x.shape
    assert_same_results((J, grads, dx), reference_gradients(net, x, y), RTOL64[device])
    # the same numbers as the batch of one
    assert_same_results(net.loss_and_gradients(X, Y), reference_gradients(net, X, Y),
                        RTOL64[device])


@pytest.mark.parametrize("target", TARGETS)
def test_train_step_one_sample(device, make_batch, target):
    net = make_net(device, "sigmoid", target, "recompute")
    X, Y = make_batch(net, target, batch=1)
    J_ref, grads, _ = reference_gradients(net, X[0], Y[0])
    expected = sgd(host_params(net), grads, LR)
    assert_close(net.train_step(X[0], Y[0], LR), J_ref, RTOL64[device])
    assert_params(net, expected, RTOL64[device])


# --- bad input: a clear error, and the model untouched ------------------------------------

ENTRY_POINTS = {
    "predict": lambda net, X, Y: net.predict(X),
    "loss_and_gradients": lambda net, X, Y: net.loss_and_gradients(X, Y),
    "train_step": lambda net, X, Y: net.train_step(X, Y, LR),
    "per_sample_grad_norms": lambda net, X, Y: net.per_sample_grad_norms(X, Y),
}
D_IN = WIDTHS[0]
GOOD_X = np.ones((BATCH, D_IN))
GOOD_Y = {"squared": np.zeros((BATCH, D_OUT)), "logistic": np.ones((BATCH, D_OUT)),
          "labels": np.arange(BATCH) % D_OUT}


def with_value(shape, index, value):
    a = np.ones(shape)
    a[index] = value
    return a


BAD_X = [  # (X, error, message)
    pytest.param(np.ones((BATCH, D_IN + 1)), ValueError,
                 re.escape(f"X must have shape (batch, {D_IN}) or ({D_IN},), got (4, 6)"),
                 id="wrong width"),
    pytest.param(np.ones(D_IN + 1), ValueError, "X must have shape", id="wrong width 1-D"),
    pytest.param(np.ones((BATCH, D_IN, 2)), ValueError,
                 re.escape(f"layer 1, Dense({D_IN}, 7, activation='relu'): takes {D_IN} inputs "
                           f"per sample, but its input has shape ({D_IN}, 2)"), id="3-D"),
    pytest.param(np.float64(1.0), ValueError, "X must have shape", id="0-D"),
    pytest.param("abc", TypeError, "X must hold real numbers", id="string"),
    pytest.param(np.ones((BATCH, D_IN), dtype=complex), TypeError, "X must hold real numbers",
                 id="complex"),
    # checked as computed with: finite in float64, inf once cast to the net's float32
    pytest.param(with_value((BATCH, D_IN), (0, 0), 1e39), ValueError,
                 "X contains NaN or Inf", id="overflows in the cast"),
    pytest.param(np.ma.masked_array(with_value((BATCH, D_IN), (1, 1), np.nan),
                                    mask=with_value((BATCH, D_IN), (1, 1), 2) == 2),
                 ValueError, "X is a masked array with masked entries", id="masked NaN"),
    pytest.param(with_value((BATCH, D_IN), (1, 2), np.nan), ValueError,
                 "X contains NaN or Inf", id="NaN"),
    pytest.param(with_value((BATCH, D_IN), (3, 0), -np.inf), ValueError,
                 "X contains NaN or Inf", id="Inf"),
    pytest.param(np.ones((0, D_IN)), ValueError, "X", id="no rows"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("X, error, message", BAD_X)
def test_bad_X_is_refused_and_changes_nothing(device, entry, X, error, message):
    net = make_net(device, "relu", "squared", "store_both", dtype="float32")
    before = host_params(net)
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](net, X, GOOD_Y["squared"])
    assert_unchanged(net, before)


NOT_NUMBERS = [np.full((BATCH, D_IN), "abc"), np.full((BATCH, D_IN), b"ab"),
               np.full((BATCH, D_IN), None, dtype=object),
               np.full((BATCH, D_IN), "2024-01-01", dtype="M8[D]")]


@pytest.mark.parametrize("bad", NOT_NUMBERS, ids=lambda a: a.dtype.str)
def test_what_is_not_a_number_never_reaches_cupy(host_cupy_lib, monkeypatch, bad):
    """On a GPU the user's arrays go to CuPy, which refuses these dtypes with its own
    ValueError: the engine must refuse them on the host first, as on the CPU."""
    import host_cupy

    net = make_net("cpu", "relu", "squared", "store_both", dtype="float32")
    before = host_params(net)
    _, tape = net.forward(GOOD_X)
    with host_cupy.cupy_path(host_cupy_lib) as device:
        with pytest.raises(ValueError, match=re.escape(f"Unsupported dtype {bad.dtype}")):
            device.cupy.asarray(bad)  # what CuPy does with them
        monkeypatch.setattr(net, "xp", device.cupy)  # the net's inputs go to its asarray
        for name, entry in ENTRY_POINTS.items():
            with pytest.raises(TypeError, match="X must hold real numbers"):
                entry(net, bad, GOOD_Y["squared"])
            if name != "predict":
                with pytest.raises(TypeError, match="Y must hold real numbers"):
                    entry(net, GOOD_X, bad[:, :D_OUT])
        with pytest.raises(TypeError, match="grad_output must hold real numbers"):
            net.backward(tape, bad[:, :D_OUT])
    assert_unchanged(net, before)


BAD_Y = [  # (target kind, Y, error, message)
    pytest.param("squared", np.zeros((BATCH, D_OUT + 1)), ValueError,
                 re.escape("squared loss: Y must have shape (4, 3) to match the output, "
                           "got (4, 4)"), id="squared wrong width"),
    pytest.param("squared", np.zeros((BATCH + 1, D_OUT)), ValueError,
                 re.escape("Y must have shape (4, 3)"), id="squared wrong batch"),
    pytest.param("squared", np.zeros(BATCH), ValueError, re.escape("Y must have shape (4, 3)"),
                 id="squared 1-D"),
    pytest.param("squared", np.zeros((BATCH, D_OUT), dtype=complex), TypeError,
                 "Y must hold real numbers", id="squared complex"),
    pytest.param("squared", with_value((BATCH, D_OUT), (1, 0), -1e39), ValueError,
                 "Y contains NaN or Inf", id="squared overflows in the cast"),
    pytest.param("squared", with_value((BATCH, D_OUT), (0, 1), np.nan), ValueError,
                 "Y contains NaN or Inf", id="squared NaN"),
    pytest.param("squared", with_value((BATCH, D_OUT), (2, 2), np.inf), ValueError,
                 "Y contains NaN or Inf", id="squared Inf"),
    pytest.param("logistic", with_value((BATCH, D_OUT), (1, 1), 0.0), ValueError,
                 "logistic loss: labels in Y must be -1 or \\+1", id="logistic 0"),
    pytest.param("logistic", np.full((BATCH, D_OUT), 0.5), ValueError,
                 "labels in Y must be -1 or \\+1", id="logistic 0.5"),
    pytest.param("labels", np.array([0, 1, 2, 3]), ValueError,
                 re.escape("labels must lie in [0, 3), got values in [0, 3]"),
                 id="label too large"),
    pytest.param("labels", np.array([0, -1, 2, 1]), ValueError,
                 re.escape("labels must lie in [0, 3)"), id="label negative"),
    pytest.param("labels", np.zeros((BATCH, 1), dtype=int), ValueError,
                 re.escape("integer labels must have shape (4,), got (4, 1)"),
                 id="labels 2-D"),
    pytest.param("labels", np.zeros(BATCH + 1, dtype=int), ValueError,
                 re.escape("integer labels must have shape (4,)"), id="labels wrong batch"),
    pytest.param("labels", np.zeros(BATCH, dtype=bool), TypeError, "not booleans",
                 id="labels bool"),
    pytest.param("labels", np.array([0, 1, 2**63, 1], dtype=np.uint64), ValueError,
                 re.escape(f"got values in [0, {2**63}]"), id="label uint64 as given"),
    pytest.param("probabilities", np.full((BATCH, D_OUT), 0.5), ValueError,
                 "target rows must be probabilities", id="rows not summing to 1"),
    pytest.param("probabilities", np.array([[1.5, -0.5, 0.0]] * BATCH), ValueError,
                 "target rows must be probabilities", id="negative probability"),
    pytest.param("probabilities", with_value((BATCH, D_OUT), (0, 0), np.nan), ValueError,
                 "Y contains NaN or Inf", id="probabilities NaN"),
]


@pytest.mark.parametrize("entry", ["loss_and_gradients", "train_step", "per_sample_grad_norms"])
@pytest.mark.parametrize("target, Y, error, message", BAD_Y)
def test_bad_Y_is_refused_and_changes_nothing(device, entry, target, Y, error, message):
    net = make_net(device, "tanh", target, "recompute", dtype="float32")
    before = host_params(net)
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](net, GOOD_X, Y)
    assert_unchanged(net, before)


@pytest.mark.parametrize("target, Y", [("labels", np.array([1])),
                                       ("squared", np.zeros((2, D_OUT)))])
def test_one_sample_with_a_batch_of_targets_says_which_is_which(device, target, Y):
    """X[0] is one sample; Y[:1] (or more rows) is a batch: the message names both, as
    given, not the shapes made from them."""
    net = make_net(device, "tanh", target, "recompute", dtype="float32")
    before = host_params(net)
    with pytest.raises(ValueError, match=re.escape(
            f"X is one sample, of shape ({D_IN},), so Y, of shape {Y.shape}, must be one "
            f"sample's target")):
        net.train_step(GOOD_X[0], Y, LR)
    assert_unchanged(net, before)
    net.train_step(GOOD_X[0], Y[0], LR)  # one sample, one target
    net.train_step(GOOD_X[:1], Y[:1], LR)  # a batch of one


@pytest.mark.parametrize("lr, error", [
    (0.0, ValueError), (-0.1, ValueError), (np.nan, ValueError), (np.inf, ValueError),
    ("fast", TypeError), (None, TypeError), ([0.1], TypeError), (np.array([0.1, 0.2]), TypeError),
    pytest.param("0.1", TypeError),
])
def test_bad_learning_rate_is_refused_and_changes_nothing(device, lr, error):
    net = make_net(device)
    before = host_params(net)
    with pytest.raises(error, match="lr must be a"):
        net.train_step(GOOD_X, GOOD_Y["squared"], lr)
    assert_unchanged(net, before)


def _optimizer(name, **kwargs):
    return lambda: getattr(gpu_mlp.optim, name)(**kwargs)


def _dp(*args):
    from gpu_mlp.privacy import DP

    return lambda: DP(*args)


# (what train_step takes: lr, dp; the message): fine in float64, not as float32 computes
BAD_SCALARS = [
    pytest.param(lambda: 1e39, None, "lr must be a finite number > 0 in float32", id="lr inf"),
    pytest.param(lambda: 1e-50, None, "lr must be a finite number > 0 in float32",
                 id="lr 0"),
    pytest.param(_optimizer("SGD", lr=1e39), None, "SGD: lr must be a finite number > 0 in "
                 "float32", id="SGD lr"),
    pytest.param(_optimizer("SGD", lr=0.1, momentum=0.5, weight_decay=1e39), None,
                 "SGD: weight_decay must be a finite number", id="SGD weight decay"),
    pytest.param(_optimizer("AdamW", lr=1e20, weight_decay=1e20), None,
                 re.escape("AdamW: lr * weight_decay must be a finite number"),
                 id="AdamW lr * weight decay"),
    pytest.param(_optimizer("Adam", eps=1e-50), None, "Adam: eps must be a finite number > 0 "
                 "in float32", id="Adam eps 0"),
    pytest.param(lambda: LR, _dp(1.0, 1e308), "DP: noise_multiplier must be a finite number",
                 id="DP noise"),
    pytest.param(lambda: LR, _dp(1e-50, 1.0), "DP: max_grad_norm must be a finite number > 0",
                 id="DP clip 0"),
    pytest.param(lambda: LR, _dp(1e20, 1e20),
                 re.escape("DP: noise_multiplier * max_grad_norm must be a finite number"),
                 id="DP noise std"),
]


def test_an_integer_lr_past_any_float_is_a_value_error_that_names_it(device):
    """float(10**400) overflows: an OverflowError from inside the check, not its own."""
    net = make_net(device, dtype="float64")
    before = host_params(net)
    with pytest.raises(ValueError, match="lr must be a finite number, got an integer of "
                                         "401 digits"):
        net.train_step(GOOD_X, GOOD_Y["squared"], 10**400)
    assert_unchanged(net, before)


@pytest.mark.parametrize("lr, dp, message", BAD_SCALARS)
def test_scalars_are_checked_as_the_kernels_compute_with_them(device, lr, dp, message):
    """Scalars are values too: cast to the net's dtype, they must stay finite (and > 0
    where they must be); refused before anything changes."""
    net = make_net(device, dtype="float32")
    before = host_params(net)
    rule, private = lr(), dp and dp()
    with pytest.raises(ValueError, match=message):
        net.train_step(GOOD_X, GOOD_Y["squared"], rule, dp=private)
    assert_unchanged(net, before)
    assert getattr(rule, "steps", 0) == 0 and getattr(private, "steps", 0) == 0
    with pytest.raises(ValueError, match=message):  # fit refuses it before any step
        net.fit(GOOD_X, GOOD_Y["squared"], epochs=1, verbose=False, dp=private,
                **({"optimizer": rule} if hasattr(rule, "steps") else {"lr": rule}))
    assert_unchanged(net, before)
    wide = make_net(device, dtype="float64")  # float64 holds them all
    wide.train_step(GOOD_X, GOOD_Y["squared"], lr(), dp=dp and dp())


def test_scalars_that_round_to_0_harmlessly_are_taken(device):
    net = make_net(device, dtype="float32")
    net.train_step(GOOD_X, GOOD_Y["squared"], _optimizer("AdamW", weight_decay=1e-50)())
    net.train_step(GOOD_X, GOOD_Y["squared"], LR, dp=_dp(1e-20, 1e-30)())  # no noise


def valid_names(names):
    return re.escape("valid: " + ", ".join(names))


BAD_MLP_ARGS = [  # (keyword arguments, error, message)
    pytest.param(dict(sizes=[4]), ValueError, "at least two widths", id="one width"),
    pytest.param(dict(sizes=[4, 0, 3]), ValueError, re.escape("widths >= 1"), id="zero width"),
    pytest.param(dict(sizes=5), TypeError, "sizes must be a list", id="sizes not a list"),
    pytest.param(dict(sizes=["four", 3]), TypeError, "sizes must be a list",
                 id="sizes not numbers"),
    pytest.param(dict(sizes=[4, 2.5, 3]), TypeError, "sizes", id="fractional width"),
    pytest.param(dict(activations="relu6"), ValueError,
                 "unknown activation 'relu6'; " + valid_names(activation_table.TABLE),
                 id="unknown activation"),
    pytest.param(dict(output="swish"), ValueError, "unknown activation 'swish'",
                 id="unknown output"),
    pytest.param(dict(activations="relu(alpha=-1)"), ValueError, "alpha must be",
                 id="negative alpha"),
    pytest.param(dict(activations="tanh(alpha=2)"), ValueError, "takes no parameter",
                 id="alpha on tanh"),
    pytest.param(dict(activations=["relu", "relu"]), ValueError,
                 re.escape("expected 3 activations (one per layer), got 2"),
                 id="too few activations"),
    pytest.param(dict(activations=3), TypeError, "activation", id="activations a number"),
    pytest.param(dict(loss="hinge"), ValueError,
                 "unknown loss 'hinge'; " + valid_names(loss_table.TABLE), id="unknown loss"),
    pytest.param(dict(memory="lazy"), ValueError,
                 "unknown memory mode 'lazy'; " + valid_names(gpu_mlp.MEMORY_MODES),
                 id="unknown memory"),
    pytest.param(dict(device="tpu"), ValueError,
                 "unknown device 'tpu'; " + valid_names(DEVICE_NAMES), id="unknown device"),
    pytest.param(dict(dtype="float16"), TypeError, "must be float32 or float64, got float16",
                 id="float16"),
    pytest.param(dict(dtype="floaty"), TypeError, "float32 or float64", id="unknown dtype"),
    pytest.param(dict(seed=-1), ValueError, r"seed must be in \[0, 2\^64\), got -1",
                 id="negative seed"),
    pytest.param(dict(seed=2**64), ValueError, r"seed must be in \[0, 2\^64\)",
                 id="seed past 64 bits"),
    pytest.param(dict(seed="a"), TypeError, "seed must be an integer", id="seed a string"),
    pytest.param(dict(seed=1.5), TypeError, "seed must be an integer", id="fractional seed"),
    pytest.param(dict(output="softmax", loss="softmax_cross_entropy"), ValueError,
                 "softmax_cross_entropy takes logits.*softmax would be applied twice",
                 id="softmax twice"),
    pytest.param(dict(sizes=[4, 8, 1], loss="softmax_cross_entropy"), ValueError,
                 "softmax_cross_entropy needs at least 2 outputs", id="one class"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_MLP_ARGS)
def test_bad_constructor_arguments_are_refused(kwargs, error, message):
    kwargs = dict(dict(sizes=[4, 5, 6, 3], device="cpu"), **kwargs)
    with pytest.raises(error, match=message):
        gpu_mlp.MLP(**kwargs)


@pytest.mark.skipif(gpu_mlp.gpu_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_says_what_to_install():
    with pytest.raises(RuntimeError, match=r"needs CuPy and a CUDA GPU; install gpu_mlp\[cuda"):
        gpu_mlp.MLP([4, 3], device="cuda")


def good_params():
    return [(np.ones((5, 4)), np.zeros(5)), (np.ones((3, 5)), np.zeros(3))]


def with_layer(k, W=None, b=None, pair=None):
    params = good_params()
    params[k] = pair if pair is not None else (params[k][0] if W is None else W,
                                               params[k][1] if b is None else b)
    return params


BAD_PARAMS = [  # (params, error, message)
    pytest.param(with_layer(1, W=np.ones((3, 6))), ValueError,
                 "W_2 takes 6 inputs but layer 1 has 5 outputs", id="shapes do not chain"),
    pytest.param(with_layer(0, b=np.zeros(4)), ValueError,
                 re.escape("b_1 must have shape (5,) to match W_1 (5, 4), got (4,)"),
                 id="bias wrong shape"),
    pytest.param(with_layer(0, W=np.ones(4)), ValueError, "W_1 must be 2-D", id="W 1-D"),
    pytest.param(with_layer(1, W=with_value((3, 5), (2, 4), np.nan)), ValueError,
                 "W_2 contains NaN or Inf", id="W NaN"),
    pytest.param(with_layer(0, b=with_value(5, 3, np.inf)), ValueError,
                 "b_1 contains NaN or Inf", id="b Inf"),
    pytest.param(with_layer(1, b=np.zeros(3, np.float32)), TypeError,
                 "all parameters must share one dtype", id="mixed dtypes"),
    pytest.param(with_layer(0, W=np.ones((5, 4), int)), TypeError,
                 "W_1 must hold floating-point numbers", id="int W"),
    pytest.param([], ValueError, "at least one layer", id="no layers"),
    pytest.param(None, TypeError, r"params must be a list of \(W, b\) pairs", id="None"),
    pytest.param(with_layer(0, pair=(np.ones((5, 4)), np.zeros(5), np.zeros(5))), ValueError,
                 r"expected a \(W, b\) pair", id="triple"),
]


@pytest.mark.parametrize("params, error, message", BAD_PARAMS)
def test_bad_params_are_refused(device, params, error, message):
    with pytest.raises(error, match=message):
        gpu_mlp.MLP.from_params(params, "relu", device=device)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(activations=["relu"] * 3), ValueError, "expected 2 activations"),
    (dict(activations="relu6"), ValueError, "unknown activation"),
    (dict(loss="hinge"), ValueError, "unknown loss"),
    (dict(memory="lazy"), ValueError, "unknown memory mode"),
    (dict(device="tpu"), ValueError, "unknown device"),
    (dict(dtype="int32"), TypeError, "dtype must be float32 or float64"),
])
def test_bad_from_params_arguments_are_refused(kwargs, error, message):
    kwargs = dict(dict(activations="relu", device="cpu"), **kwargs)
    with pytest.raises(error, match=message):
        gpu_mlp.MLP.from_params(good_params(), **kwargs)


def test_check_false_skips_value_checks_only(device):
    net = make_net(device, "tanh", "logistic")
    before = host_params(net)
    X_nan = with_value((BATCH, D_IN), (0, 0), np.nan)
    for X, Y in [(GOOD_X[:, :-1], GOOD_Y["logistic"]), (GOOD_X, GOOD_Y["logistic"][:, :-1]),
                 (np.stack([X_nan, X_nan], axis=2), GOOD_Y["logistic"])]:
        with pytest.raises(ValueError, match="must have shape|inputs per sample"):
            net.train_step(X, Y, LR, check=False)
    assert_unchanged(net, before)

    with pytest.raises(ValueError, match="X contains NaN"):
        net.train_step(X_nan, GOOD_Y["logistic"], LR)
    assert np.isnan(to_numpy(net.train_step(X_nan, GOOD_Y["logistic"], LR, check=False)))

    labels = np.full((BATCH, D_OUT), 0.5)  # not +-1: only a value check can tell
    fresh = make_net(device, "tanh", "logistic")
    assert np.isfinite(to_numpy(fresh.train_step(GOOD_X, labels, LR, check=False)))


@pytest.mark.parametrize("bad_label", [-1, D_OUT])
def test_unchecked_label_out_of_range_gives_nan_and_no_gradient(device, bad_label):
    # with check=False nothing reads the labels; a bad one must not train as another
    # class (-1 would index the last one): its row's loss is NaN, its gradient 0
    net = make_net(device, "tanh", "labels")
    labels = np.array([0, bad_label, 2, 1])
    J, grads, _ = net.loss_and_gradients(GOOD_X[[0, 2, 3]], labels[[0, 2, 3]])
    before = host_params(net)
    J_bad = net.train_step(GOOD_X, labels, LR, check=False)
    assert np.isnan(to_numpy(J_bad))
    # the three good rows alone, their mean over 4 rows: the SGD step the net took
    expected = [(W - LR * 3 / 4 * to_numpy(dW), b - LR * 3 / 4 * to_numpy(db))
                for (W, b), (dW, db) in zip(before, grads)]
    assert_params(net, expected, RTOL64[device])


def test_replaced_params_are_checked_before_a_step(device, xp):
    net = make_net(device, "relu", "squared", dtype="float32")
    W, b = net.params[1]
    before = host_params(net)
    for replacement, message in [
            ((W.astype(np.float64), b), "W_2 must be a C-contiguous float32 array"),
            ((xp.asfortranarray(W), b), "not C-contiguous"),
            ((W[:, :-1], b), re.escape(f"of shape {W.shape}")),
            ((to_numpy(W) if device == "cuda" else list(W), b), "W_2 must be a"),
            ((W,), r"must be a \(W_2, b_2\) pair")]:
        net.params[1] = replacement
        for entry in ENTRY_POINTS.values():
            with pytest.raises((TypeError, ValueError), match=message):
                entry(net, GOOD_X, GOOD_Y["squared"])
        assert_unchanged(net, before[:1])  # no half-applied step: layer 1 untouched
    net.params[1] = (W, b)
    net.params.append(net.params[0])
    with pytest.raises(ValueError, match=r"must hold 3 \(W, b\) pairs"):
        net.train_step(GOOD_X, GOOD_Y["squared"], LR)
    net.params.pop()
    net.params[1] = (W.copy(), b.copy())  # a good replacement is used
    net.train_step(GOOD_X, GOOD_Y["squared"], LR)
    assert not np.array_equal(to_numpy(net.params[1][0]), before[1][0])


def test_torch_bfloat16_and_float16_inputs_are_cast(device):
    torch = pytest.importorskip("torch")
    net = make_net(device, "tanh", "squared")
    X = torch.arange(BATCH * D_IN, dtype=torch.float32).reshape(BATCH, D_IN) / 8
    expected = to_numpy(net.predict(X.numpy().astype(np.float64)))
    for dtype in (torch.bfloat16, torch.float16):  # both hold these values exactly
        assert_close(net.predict(X.to(dtype)), expected, 0.0)


def test_integer_and_boolean_inputs_are_cast(device):
    net = make_net(device, "tanh", "squared")
    X_int = np.arange(BATCH * D_IN).reshape(BATCH, D_IN) % 3
    Y_int = np.ones((BATCH, D_OUT), dtype=np.int32)
    expected = net.loss_and_gradients(X_int.astype(np.float64), Y_int.astype(np.float64))
    assert_same_results(net.loss_and_gradients(X_int, Y_int), expected, 0.0)
    assert_same_results(net.loss_and_gradients(X_int.tolist(), Y_int.tolist()), expected, 0.0)
    assert_close(net.predict(X_int > 0), net.predict((X_int > 0).astype(np.float64)), 0.0)


def test_value_checks_are_read_from_the_device_once_a_call(monkeypatch):
    # every check of X and Y is gathered and settled in one transfer
    settles = []
    settle = gpu_mlp._checks.Verdicts.settle

    def counting(self):
        settles.append(len(self._pending))
        return settle(self)

    monkeypatch.setattr(gpu_mlp._checks.Verdicts, "settle", counting)
    net = make_net("cpu", "tanh", "probabilities")
    Y = np.full((BATCH, D_OUT), 1 / D_OUT)
    net.train_step(GOOD_X, Y, LR)
    assert settles == [3]  # X finite, Y finite, Y rows are probabilities
    settles.clear()
    net.train_step(GOOD_X, Y, LR, check=False)
    assert settles == []


def test_public_methods_show_their_arguments():
    import inspect

    assert list(inspect.signature(gpu_mlp.MLP.fit).parameters)[:6] == [
        "self", "X", "Y", "epochs", "batch_size", "lr"]
    assert "history" in inspect.signature(gpu_mlp.MLP.save).parameters
    assert "device" in inspect.signature(gpu_mlp.MLP.load).parameters


def test_submodules_are_reachable_from_the_package():
    import subprocess
    import sys

    code = ("import sys, gpu_mlp; gpu_mlp.datasets.digits; gpu_mlp.checkpoint.read; "
            "gpu_mlp.training.fit; gpu_mlp.reference.forward; gpu_mlp.privacy.DP; "
            "gpu_mlp.accounting.epsilon; gpu_mlp.distributed.Communicator; "
            "gpu_mlp.updates.Apply; "
            # the optional libraries load when used, not with the package
            "assert not {'mpi4py', 'dp_accounting', 'cupy', 'torch'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- batches of changing size and odd layouts ---------------------------------------------

@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
def test_batch_size_may_change_between_steps(device, make_batch, memory):
    net = make_net(device, "relu", "labels", memory, depth=4)
    params = host_params(net)
    for batch in [6, 3, 6, 1, 5, 6]:  # more sizes than the engine keeps workspaces for
        X, Y = make_batch(net, "labels", batch)
        J_ref, grads, _ = reference.loss_and_gradients(params, net.activations, net.loss, X, Y)
        params = sgd(params, grads, LR)
        assert_close(net.train_step(X, Y, LR), J_ref, RTOL64[device])
        assert_params(net, params, RTOL64[device])


LAYOUTS = {  # each gives an array equal to its input but not C-contiguous
    "every other column": lambda xp, a: xp.repeat(a, 2, axis=1)[:, ::2],
    "every other row": lambda xp, a: xp.repeat(a, 2, axis=0)[::2],
    "Fortran order": lambda xp, a: xp.asfortranarray(a),
    "transposed view": lambda xp, a: xp.ascontiguousarray(a.T).T,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs_give_the_same_numbers(device, xp, make_batch, layout):
    net = make_net(device, "sigmoid", "squared", "store_both")
    twin = make_net(device, "sigmoid", "squared", "store_both")
    X, Y = make_batch(net, "squared")
    X_odd, Y_odd = (LAYOUTS[layout](xp, xp.asarray(a)) for a in (X, Y))
    assert not X_odd.flags.c_contiguous and not Y_odd.flags.c_contiguous
    X_kept, Y_kept = X_odd.copy(), Y_odd.copy()
    rtol = RTOL64[device]

    assert_close(net.predict(X_odd), twin.predict(X), rtol)
    assert_same_results(net.loss_and_gradients(X_odd, Y_odd), twin.loss_and_gradients(X, Y),
                        rtol)
    assert_close(net.per_sample_grad_norms(X_odd, Y_odd), twin.per_sample_grad_norms(X, Y), rtol)
    assert_close(net.train_step(X_odd, Y_odd, LR), twin.train_step(X, Y, LR), rtol)
    assert_params(net, host_params(twin), rtol)
    # the caller's arrays are read, never written
    assert xp.array_equal(X_odd, X_kept) and xp.array_equal(Y_odd, Y_kept)


def test_float64_inputs_into_a_float32_net(device, make_batch):
    net = make_net(device, "tanh", "squared", dtype="float32")
    X, Y = make_batch(net, "squared")  # float64
    params = host_params(net, np.float64)
    out = net.predict(X)
    assert out.dtype == np.float32
    assert_close(out, reference.forward(params, net.activations, X), RTOL32)
    J, grads, dX = net.loss_and_gradients(X, Y)
    assert J.dtype == dX.dtype == np.float32
    expected = reference.loss_and_gradients(params, net.activations, net.loss, X, Y)
    assert_same_results((J, grads, dX), expected, RTOL32)
    assert_close(net.train_step(X, Y, LR), expected[0], RTOL32)
    assert_params(net, sgd(params, expected[1], LR), RTOL32)


def test_torch_cpu_tensors_go_in_through_dlpack(device, make_batch):
    torch = pytest.importorskip("torch")
    net = make_net(device, "relu", "labels", "recompute")
    twin = make_net(device, "relu", "labels", "recompute")
    X, Y = make_batch(net, "labels")
    X_t, Y_t = torch.from_numpy(X), torch.from_numpy(Y)
    rtol = RTOL64[device]

    assert_close(net.predict(X_t), twin.predict(X), rtol)
    # float32 and non-contiguous tensors are cast / copied as needed
    assert_close(net.predict(X_t.float()), twin.predict(X.astype(np.float32)), rtol)
    wide = torch.from_numpy(np.repeat(X, 2, axis=1))[:, ::2]
    assert_close(net.predict(wide), twin.predict(X), rtol)
    assert_same_results(net.loss_and_gradients(X_t, Y_t), reference_gradients(twin, X, Y), rtol)
    assert_close(net.train_step(X_t, Y_t, LR), twin.train_step(X, Y, LR), rtol)
    assert_params(net, host_params(twin), rtol)


# --- initialisation and from_params --------------------------------------------------------

def test_seed_makes_the_initial_weights_deterministic(device):
    def weights(seed, device=device):
        return host_params(gpu_mlp.MLP([6, 8, 3], device=device, seed=seed))

    same, again, other = weights(7), weights(7), weights(8)
    for (W, b), (W2, b2), (W3, _) in zip(same, again, other):
        assert np.array_equal(W, W2) and np.array_equal(b, b2)
        assert not np.array_equal(W, W3)
    # drawn on the host: every device starts from the same numbers
    for (W, _), (W_cpu, _) in zip(same, weights(7, "cpu")):
        assert np.array_equal(W, W_cpu)


def test_from_params_copies_its_inputs(device, xp, rng, make_params):
    source = [(xp.asarray(W), xp.asarray(b)) for W, b in make_params(rng, [4, 5, 3])]
    kept = [(to_numpy(W).copy(), to_numpy(b).copy()) for W, b in source]
    net = gpu_mlp.MLP.from_params(source, ["tanh", "identity"], device=device)
    assert net.dtype == np.float64 and net.sizes == [4, 5, 3]
    assert_unchanged(net, kept)

    for W, b in source:
        W[...] = 0.0
        b[...] = 0.0
    assert_unchanged(net, kept)  # mutating the sources later does not reach the net
    net.train_step(rng.standard_normal((2, 4)), rng.standard_normal((2, 3)), LR)
    assert all(not xp.any(W) and not xp.any(b) for W, b in source)  # nor the reverse


def test_from_params_casts_to_the_requested_dtype(device, rng, make_params):
    params = make_params(rng, [4, 5, 3])
    net = gpu_mlp.MLP.from_params(params, "relu", device=device, dtype="float32")
    assert net.dtype == np.float32
    for (W, b), (W0, b0) in zip(net.params, params):
        assert W.dtype == b.dtype == np.float32
        assert np.array_equal(to_numpy(W), W0.astype(np.float32))
        assert np.array_equal(to_numpy(b), b0.astype(np.float32))


def test_blas_wrappers_take_arguments_by_position():
    """ops calls SciPy's gemm and gemv with their arguments by position (f2py parses
    keywords at 0.3 us a call): the order is their signature's, or by name otherwise."""
    from scipy.linalg import blas

    from gpu_mlp import ops
    # whichever way this SciPy orders them, the wrappers compute alpha op(a) op(b) + beta c
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(shape) for shape in ((3, 4), (5, 4), (3, 5)))
    got = ops._NUMPY_GEMM[np.dtype(np.float64)](2.0, np.asfortranarray(a), np.asfortranarray(b),
                                                 0.5, np.asfortranarray(c), 0, 1, 0)
    np.testing.assert_allclose(got, 2.0 * a @ b.T + 0.5 * c, rtol=1e-13)
    x, y = rng.standard_normal(4), rng.standard_normal(3)
    got = ops._NUMPY_GEMV[np.dtype(np.float64)](2.0, np.asfortranarray(a), x, 0.5, y.copy(),
                                                 0, 1, 0, 1, 0, 0)
    np.testing.assert_allclose(got, 2.0 * a @ x + 0.5 * y, rtol=1e-13)
    if "(alpha,a,b,[beta,c,trans_a,trans_b" in (blas.sgemm.__doc__ or "").replace(" ", ""):
        assert ops._NUMPY_GEMM[np.dtype(np.float32)] is blas.sgemm  # no wrapper needed

    def reordered(**kwargs):
        return kwargs
    reordered.__doc__ = "c = sgemm(alpha,a,b,[beta,c,overwrite_c,trans_a,trans_b])"
    call = ops._by_position(reordered, ops._GEMM_ARGS)
    assert call(1.0, "a", "b", 0.0, "c", 1, 0, 1) == dict(
        alpha=1.0, a="a", b="b", beta=0.0, c="c", trans_a=1, trans_b=0, overwrite_c=1)
