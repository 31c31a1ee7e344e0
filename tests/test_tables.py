"""The activation and loss tables: stable formulas, derivatives, parsing and errors.

Values are checked against SciPy's independent implementations (expit, ndtr, softmax,
log_softmax, logaddexp) at ordinary and extreme inputs; derivatives against textbook
closed forms, and the derivative from the output against the one from the input.
"""

import contextlib
import warnings

import numpy as np
import pytest
from scipy.special import expit, log_softmax, ndtr, softmax

from gpu_mlp import activations, losses

# Ordinary and extreme inputs, signed zero and tiny values included.
GRID = np.array([-1e4, -800.0, -40.0, -3.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 3.0,
                 40.0, 800.0, 1e4])
DTYPES = [np.float32, np.float64]
ELEMENTWISE = [name for name, kind in activations.TABLE.items() if not kind.rowwise]
# table name -> alpha values worth trying
ALPHAS = {name: [1.0, 0.5, 3.0] if kind.has_alpha else [1.0]
          for name, kind in activations.TABLE.items()}


@contextlib.contextmanager
def no_overflow():
    """Turn overflow, invalid operations, division by zero and warnings into errors.

    Underflow stays allowed: exp(-1e4) = 0 is the right answer in a stable formula.
    """
    with np.errstate(all="raise", under="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def grid(dtype):
    return GRID.astype(dtype)


def tol(dtype):
    """Relative accuracy only: tiny results (sigmoid(-40) = 4e-18) must be right too."""
    return {"rtol": 1e-6 if dtype == np.float32 else 1e-13, "atol": 0}


def value(name, z, alpha=1.0):
    return activations.TABLE[name].value(z, alpha, np.empty_like(z))


# --- activation values ---------------------------------------------------------------

# Independent formulas: SciPy for the transcendental ones.
EXPECTED_VALUES = {
    "identity": lambda z, alpha: z,
    "relu": lambda z, alpha: alpha * np.maximum(z, 0),
    "sigmoid": lambda z, alpha: expit(z),
    "tanh": lambda z, alpha: np.tanh(z),
    "gelu": lambda z, alpha: z * ndtr(z),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_values_are_stable_and_accurate_at_extremes(name, dtype):
    z = grid(dtype)
    for alpha in ALPHAS[name]:
        with no_overflow():
            f = value(name, z, alpha)
        assert f.dtype == dtype
        np.testing.assert_allclose(f, EXPECTED_VALUES[name](z.astype(np.float64), alpha),
                                   **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_stays_in_the_unit_interval(dtype):
    z = grid(dtype)
    with no_overflow():
        f = value("sigmoid", z)
    assert np.all((f >= 0) & (f <= 1))
    assert f[0] == 0 and f[-1] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_is_max_subtracted(dtype):
    Z = np.array([[1e4, -1e4, 0.0], [1e4, 1e4, 1e4], [-1e4, -1e4, -1e4],
                  [-1e4, 1e4, 3.0], [1.0, 2.0, 3.0]], dtype=dtype)
    with no_overflow():
        F = value("softmax", Z)
    assert F.dtype == dtype
    np.testing.assert_allclose(F, softmax(Z.astype(np.float64), axis=1), **tol(dtype))
    np.testing.assert_allclose(F.sum(axis=1), 1, rtol=1e-6)


@pytest.mark.parametrize("name", activations.TABLE)
def test_nan_propagates_through_values(name):
    z = np.array([[1.0, np.nan, -2.0]])
    for alpha in ALPHAS[name]:
        assert np.isnan(value(name, z, alpha)[0, 1])


@pytest.mark.parametrize("name", activations.TABLE)
def test_formulas_may_write_over_their_input(name):
    """The table promises ``out`` may be the input itself (the engine works in place)."""
    z = np.linspace(-3, 3, 12).reshape(3, 4)
    kind, alpha = activations.TABLE[name], ALPHAS[name][-1]
    for fn in filter(None, (kind.value, kind.grad, kind.grad_from_output)):
        in_place = z.copy()
        fn(in_place, alpha, in_place)
        np.testing.assert_array_equal(in_place, fn(z, alpha, np.empty_like(z)))


# --- activation derivatives ----------------------------------------------------------

EXPECTED_GRADS = {
    "identity": lambda z, alpha: np.ones_like(z),
    "relu": lambda z, alpha: alpha * (z > 0),  # 0 at the kink, as PyTorch
    "sigmoid": lambda z, alpha: expit(z) * expit(-z),
    "tanh": lambda z, alpha: 1 / np.cosh(z) ** 2,
    "gelu": lambda z, alpha: ndtr(z) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_derivatives_match_closed_forms(name, dtype):
    z = grid(dtype)
    kind = activations.TABLE[name]
    for alpha in ALPHAS[name]:
        with np.errstate(over="ignore"):  # cosh(800) = inf gives the exact 0 expected
            expected = EXPECTED_GRADS[name](z.astype(np.float64), alpha)
        with no_overflow():
            grad = kind.grad(z, alpha, np.empty_like(z))
        assert grad.dtype == dtype
        # absolute accuracy: 1 - F loses sigmoid'(40) = 4e-18 once F rounds to 1
        np.testing.assert_allclose(grad, expected, rtol=tol(dtype)["rtol"],
                                   atol=1e-7 if dtype == np.float32 else 1e-16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [n for n in ELEMENTWISE
                                  if activations.TABLE[n].grad_from_output])
def test_derivative_from_the_output_equals_derivative_from_the_input(name, dtype):
    z = grid(dtype)
    kind = activations.TABLE[name]
    for alpha in ALPHAS[name]:
        with no_overflow():
            from_output = kind.grad_from_output(value(name, z, alpha), alpha, np.empty_like(z))
            from_input = kind.grad(z, alpha, np.empty_like(z))
        # bit for bit: the memory modes must agree exactly
        np.testing.assert_array_equal(from_output, from_input)


@pytest.mark.parametrize("shape", [(4099, 3), (700, 32), (8192,), (3, 8191), (64, 1024)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_engines_long_row_passes_give_the_plain_formulas_bits(shape, dtype):
    """gpu_mlp.ops runs bias + relu against rows of LONG_ROW values (a repeated bias, a
    row of zeros) and relu's sigma' as a bool mask, where NumPy's broadcast loops are
    slow: the same bits as the plain broadcast formulas, NaN, Inf and -0 included, at
    sizes below, at and past LONG_ROW, rows cut short."""
    from gpu_mlp import ops
    rng = np.random.default_rng(5)
    z = rng.standard_normal(shape).astype(dtype)
    z.reshape(-1)[::7] = -0.0
    z.reshape(-1)[3::11] = np.nan
    z.reshape(-1)[5::13] = np.inf
    rows = z.reshape(z.shape[0], -1) if z.ndim > 1 else z.reshape(1, -1)
    bias = rng.standard_normal(rows.shape[1]).astype(dtype)
    for alpha in (1.0, 0.5):
        act = activations.get(f"relu(alpha={alpha})")
        a = rows.copy()
        ops.bias_act(act, a, bias)
        want = np.maximum(rows + bias, 0)
        if alpha != 1:
            want *= dtype(alpha)
        np.testing.assert_array_equal(a.view(f"u{a.itemsize}"), want.view(f"u{a.itemsize}"))
        delta = rng.standard_normal(rows.shape).astype(dtype)
        got = delta.copy()
        ops.grad_from_output(act, a, got)
        want = delta * (dtype(alpha) * (a > 0))
        np.testing.assert_array_equal(got, want)
    for name in ("identity", "tanh"):
        a = rows.copy()
        ops.bias_act(activations.get(name), a, bias)
        s = rows + bias
        np.testing.assert_array_equal(a, np.tanh(s) if name == "tanh" else s)


def test_which_activations_can_work_from_their_output():
    can = {name for name in activations.TABLE if activations.get(name).has_grad_from_output}
    assert can == {"identity", "relu", "sigmoid", "tanh", "softmax"}


@pytest.mark.parametrize("spec, gain", [
    ("relu", np.sqrt(2.0)), ("relu(alpha=0.5)", 2 * np.sqrt(2.0)), ("relu(4)", np.sqrt(2.0) / 4),
    ("gelu", np.sqrt(2.0)), ("identity", 1.0), ("sigmoid", 1.0), ("tanh", 1.0),
    ("softmax", 1.0),
])
def test_init_gain_is_he_for_relu_like_rows_divided_by_alpha(spec, gain):
    assert activations.get(spec).init_gain == gain


def test_only_the_identity_row_is_the_identity():
    assert [name for name, kind in activations.TABLE.items() if kind.is_identity] == ["identity"]


def test_row_wise_rows_carry_their_ops_for_both_backends():
    """A row-wise row has no elementwise derivative; its NumPy backward is in the row and
    its GPU ops in ``ops.ROW_ACTIVATIONS``, for every such row and no other."""
    from gpu_mlp import ops

    rowwise = {name for name, kind in activations.TABLE.items() if kind.rowwise}
    assert rowwise == set(ops.ROW_ACTIVATIONS) == {"softmax"}
    for name in rowwise:
        kind = activations.TABLE[name]
        assert kind.grad is None and kind.grad_from_output is None
        assert callable(kind.rowwise.backward)
    assert activations.TABLE["softmax"].rowwise.backward is activations.softmax_backward


@pytest.mark.parametrize("memory", ["output", "recompute", "store_both"])
def test_a_new_row_wise_row_runs_through_the_engine_unchanged(monkeypatch, memory):
    """The engine dispatches on the row, not on the name "softmax": a copy of the softmax
    row under another name gives the very same numbers."""
    import gpu_mlp
    from gpu_mlp import ops

    softmax = activations.TABLE["softmax"]
    monkeypatch.setitem(activations.TABLE, "rowmax", activations.Kind(
        "rowmax", softmax.value, None, None, rowwise=activations.RowWise(softmax.rowwise.backward)))
    monkeypatch.setitem(ops.ROW_ACTIVATIONS, "rowmax", ops.ROW_ACTIVATIONS["softmax"])
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    nets = [gpu_mlp.MLP([4, 6, 3], act, output=act, memory=memory, device="cpu",
                        dtype="float64", seed=2) for act in ("softmax", "rowmax")]
    step_losses = [[float(net.train_step(X, Y, 0.5)) for _ in range(2)] for net in nets]
    assert step_losses[0] == step_losses[1]
    for (W0, b0), (W1, b1) in zip(nets[0].params, nets[1].params):
        np.testing.assert_array_equal(W0, W1)
        np.testing.assert_array_equal(b0, b1)


def test_softmax_backward_is_the_jacobian_product():
    rng = np.random.default_rng(0)
    Z, G = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    F = value("softmax", Z)
    expected = [g @ (np.diag(f) - np.outer(f, f)) for f, g in zip(F, G)]
    out = activations.softmax_backward(F, G, np.empty_like(G))
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-15)


# --- activation parsing --------------------------------------------------------------

@pytest.mark.parametrize("spec, name, alpha", [
    ("identity", "identity", 1.0),
    ("relu", "relu", 1.0),
    ("relu(alpha=0.5)", "relu", 0.5),
    ("relu(2)", "relu", 2.0),
    (" relu ( alpha = 3e-2 ) ", "relu", 0.03),
    ("softmax", "softmax", 1.0),
])
def test_activation_specs_are_parsed(spec, name, alpha):
    act = activations.get(spec)
    assert (act.name, act.alpha) == (name, alpha)
    assert activations.get(str(act)) == act  # str() gives a spec that parses back


def test_alpha_can_be_given_apart_from_the_name():
    assert activations.get("relu", alpha=0.25) == activations.relu(0.25)
    assert activations.get(activations.relu(), alpha=0.25).alpha == 0.25
    assert activations.relu(0.25)(np.array([-1.0, 2.0])).tolist() == [0.0, 0.5]


# name: (spec, keyword arguments, error, message it must match)
BAD_SPECS = {
    "alpha 0": ("relu(0)", {}, ValueError, r"alpha must be a finite number > 0, got 0"),
    "negative alpha": ("relu(-1)", {}, ValueError, r"alpha must be a finite number > 0, got -1"),
    "negative alpha=": ("relu(alpha=-0.5)", {}, ValueError, r"alpha must be a finite number > 0"),
    "infinite alpha": ("relu(inf)", {}, ValueError, r"alpha must be a finite number > 0"),
    "NaN alpha": ("relu(nan)", {}, ValueError, r"alpha must be a finite number > 0"),
    "alpha 0 by keyword": ("relu", {"alpha": 0}, ValueError, r"alpha must be a finite number > 0"),
    "alpha not a number": ("relu(abc)", {}, ValueError, r"alpha must be a number"),
    "empty parentheses": ("relu()", {}, ValueError, r"alpha must be a number"),
    "alpha on tanh": ("tanh(alpha=0.5)", {}, ValueError, r"'tanh' takes no parameter"),
    "parameter on sigmoid": ("sigmoid(2)", {}, ValueError, r"'sigmoid' takes no parameter"),
    "alpha on tanh by keyword": ("tanh", {"alpha": 2}, ValueError, r"'tanh' takes no alpha"),
    "alpha on a tanh Activation": (activations.get("tanh"), {"alpha": 2}, ValueError,
                                   r"'tanh' takes no alpha"),
    "negative alpha on a relu Activation": (activations.relu(), {"alpha": -1}, ValueError,
                                            r"alpha must be a finite number > 0"),
    "unknown name": ("swish", {}, ValueError,
                     r"unknown activation 'swish'; valid: identity, relu, sigmoid, tanh, "
                     r"gelu, softmax"),
    "names are lower case": ("RELU", {}, ValueError, r"unknown activation 'RELU'; valid:"),
    "unbalanced parenthesis": ("relu(", {}, ValueError, r"unknown activation 'relu\('"),
    "unknown name with a parameter": ("swish(1)", {}, ValueError,
                                      r"unknown activation 'swish\(1\)'"),
    "a number": (3, {}, TypeError, r"an activation is a name or an Activation, not int"),
    "None": (None, {}, TypeError, r"not NoneType"),
}


@pytest.mark.parametrize("spec, kwargs, error, message", BAD_SPECS.values(),
                         ids=BAD_SPECS.keys())
def test_bad_activation_specs_are_rejected(spec, kwargs, error, message):
    with pytest.raises(error, match=message):
        activations.get(spec, **kwargs)


# --- losses --------------------------------------------------------------------------

def evaluate(name, F, Y, scale=1.0):
    grad = np.empty_like(F)
    with no_overflow():
        per_sample = losses.get(name).evaluate(F, Y, scale, grad)
    return per_sample, grad


def test_squared_loss():
    F = np.array([[1.0, 2.0], [0.0, -3.0]])
    Y = np.array([[0.0, 2.0], [1.0, 1.0]])
    per_sample, grad = evaluate("squared", F, Y, scale=0.5)
    np.testing.assert_allclose(per_sample, [1.0, 17.0])
    np.testing.assert_allclose(grad, 0.5 * 2 * (F - Y))


@pytest.mark.parametrize("y", [1.0, -1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_logistic_loss_is_a_stable_softplus(dtype, y):
    F = grid(dtype)[:, None]
    per_sample, grad = evaluate("logistic", F, np.full_like(F, y), scale=0.25)
    F64 = F.astype(np.float64)

    # log(1 + e^{-y f}), accurate where it is tiny (4e-18 at y f = 40) and where it is
    # huge (1e4 at y f = -1e4)
    np.testing.assert_allclose(per_sample, np.logaddexp(0, -y * F64[:, 0]), **tol(dtype))
    np.testing.assert_allclose(grad, 0.25 * -y * expit(-y * F64), **tol(dtype))
    assert per_sample.dtype == grad.dtype == dtype


SPREADS = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [1e4, 1e4, 1e4], [-1e4, -1e4, -1e4],
                    [0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [-5e3, 5e3, 5e3]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("targets", ["labels", "probabilities"])
def test_softmax_cross_entropy_is_max_subtracted(dtype, targets):
    F = SPREADS.astype(dtype)
    labels = np.array([1, 0, 2, 0, 1, 2, 1])
    onehot = np.eye(3)[labels]
    if targets == "labels":
        Y, P = labels, onehot
    else:
        P = 0.6 * onehot + 0.2
        Y = P.astype(dtype)
    per_sample, grad = evaluate("softmax_cross_entropy", F, Y, scale=0.5)
    F64 = F.astype(np.float64)

    assert np.all(np.isfinite(per_sample)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(per_sample, -(P * log_softmax(F64, axis=1)).sum(axis=1),
                               **tol(dtype))
    np.testing.assert_allclose(grad, 0.5 * (softmax(F64, axis=1) - P), **tol(dtype))
    assert per_sample.dtype == grad.dtype == dtype


def test_losses_get():
    assert losses.get("squared") is losses.TABLE["squared"]
    assert losses.get(losses.TABLE["logistic"]) is losses.TABLE["logistic"]
    assert str(losses.get("softmax_cross_entropy")) == "softmax_cross_entropy"
    valid = r"valid: squared, logistic, softmax_cross_entropy"
    with pytest.raises(ValueError, match=r"unknown loss 'mse'; " + valid):
        losses.get("mse")
    with pytest.raises(TypeError, match=r"a loss is a name, not int"):
        losses.get(3)


def test_classification_losses_give_an_accuracy_and_regression_none():
    assert losses.get("squared").accuracy is None
    # logistic: the sign of each output against its +-1 label (0 counts as negative)
    F = np.array([[2.0, -1.0], [0.0, 0.5]])
    Y = np.array([[1.0, 1.0], [-1.0, -1.0]])
    assert losses.get("logistic").accuracy(F, Y) == 0.5
    # softmax_cross_entropy: the largest logit against the label or the target's mode
    F = np.array([[0.1, 3.0, -1.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 4.0, 2.0]])
    labels = np.array([1, 2, 2, 0])
    accuracy = losses.get("softmax_cross_entropy").accuracy
    assert accuracy(F, labels) == 0.5
    assert accuracy(F, 0.7 * np.eye(3)[labels] + 0.1) == 0.5
