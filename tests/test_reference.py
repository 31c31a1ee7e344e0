"""gpu_mlp.reference, the definition of correct, checked four independent ways in float64.

1. central finite differences on every weight, bias and input entry;
2. the Kronecker / vec form (docs/MATH.md, "Independent checks"), built with
   scipy.sparse, for one layer and one sample;
3. PyTorch autograd on the same network written with torch.nn.functional;
4. hypothesis property tests over shapes, depths and activations.

Every activation is tried in the hidden layers, under every output/loss pairing that
makes sense, at depths 1-4. Bad input must raise an error that names the problem.
"""

import dataclasses
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import sparse
from scipy.special import expit, ndtr, softmax

from gpu_mlp import activations, reference

HIDDEN = ["identity", "relu", "relu(alpha=0.5)", "sigmoid", "tanh", "gelu", "softmax"]


class Head(NamedTuple):
    """The output activation, the loss, and whether cross-entropy targets are soft."""

    output: str
    loss: str
    soft: bool = False

    def __str__(self):
        return f"{self.output}-{self.loss}" + ("-soft" if self.soft else "")


HEADS = [
    Head("identity", "squared"),
    Head("identity", "logistic"),
    Head("identity", "softmax_cross_entropy"),
    Head("identity", "softmax_cross_entropy", soft=True),
    Head("sigmoid", "squared"),
    Head("tanh", "squared"),
    Head("softmax", "squared"),
    Head("relu(alpha=2)", "squared"),
    Head("gelu", "squared"),
]

# Small widths, so finite differences over every entry stay cheap.
SIZES = {1: [3, 3], 2: [3, 4, 3], 3: [3, 4, 5, 3], 4: [2, 4, 3, 4, 3]}

# FD is only valid away from ReLU's kink: pre-activations must stay this far from 0.
KINK_MARGIN = 1e-3


@dataclasses.dataclass
class Problem:
    """A network, a loss and a batch: everything reference.loss_and_gradients takes."""

    params: list
    activations: list
    loss: str
    X: np.ndarray
    Y: np.ndarray

    def loss_and_gradients(self):
        return reference.loss_and_gradients(self.params, self.activations, self.loss,
                                            self.X, self.Y)


def relu_margin(params, specs, X):
    """The smallest |A_k| over the ReLU layers (inf when there are none)."""
    margin = np.inf
    for k, spec in enumerate(specs):
        if activations.get(spec).name == "relu":
            A = reference.forward(params[:k + 1], specs[:k] + ["identity"], X)
            margin = min(margin, np.abs(A).min())
    return margin


@pytest.fixture(scope="session")
def make_problem(make_params, make_targets):
    """``make_problem(rng, sizes, specs, head, batch)``: a random problem clear of kinks."""
    def build(rng, sizes, specs, head, batch=3):
        for _ in range(100):
            params = make_params(rng, sizes)
            X = rng.standard_normal((batch, sizes[0]))
            if relu_margin(params, specs, X) > KINK_MARGIN:
                Y = make_targets(rng, head.loss, batch, sizes[-1], soft=head.soft)
                return Problem(params, list(specs), head.loss, X, Y)
        raise RuntimeError("could not sample a problem clear of ReLU's kink")
    return build


def assert_close(actual, expected, rtol, what="", noise=None):
    """Relative agreement, judging entries near 0 against the array's largest entry.

    ``noise`` is absolute slack on top: by default the rounding noise of O(1)
    intermediates (a gradient exactly 0 in one implementation is 1e-17 in another).
    """
    expected = np.asarray(expected)
    if noise is None:
        noise = 100 * np.finfo(np.result_type(actual)).eps
    atol = rtol * np.abs(expected).max(initial=0.0) + noise
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


# --- check 1: central finite differences ---------------------------------------------

def central_differences(J, a, h=1e-6):
    """dJ/da for the scalar function J() by central differences, perturbing ``a`` in place."""
    grad = np.empty_like(a)
    for i in np.ndindex(a.shape):
        original = float(a[i])  # a Python float: a[i] of a CuPy array is a 0-d view
        a[i] = original + h
        plus = J()
        a[i] = original - h
        minus = J()
        a[i] = original
        grad[i] = (plus - minus) / (2 * h)
    return grad


def check_finite_differences(problem):
    J0, grads, dX = problem.loss_and_gradients()
    # a central difference loses about eps |J| / h = 1e-10 |J| to rounding
    noise = 1e-8 * max(1.0, abs(J0))

    def J():
        return problem.loss_and_gradients()[0]

    for k, ((W, b), (dW, db)) in enumerate(zip(problem.params, grads), start=1):
        assert_close(dW, central_differences(J, W), 1e-6, f"dJ/dW_{k}", noise)
        assert_close(db, central_differences(J, b), 1e-6, f"dJ/db_{k}", noise)
    assert_close(dX, central_differences(J, problem.X), 1e-6, "dJ/dX", noise)


# --- check 2: the Kronecker / vec form (MATH.md, "Independent checks") -------------

# Elementwise activations written independently of the table: (sigma, sigma').
ELEMENTWISE = {
    "identity": (lambda z: z, np.ones_like),
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0) * 1.0),
    "relu(alpha=0.5)": (lambda z: 0.5 * np.maximum(z, 0), lambda z: 0.5 * (z > 0)),
    "sigmoid": (expit, lambda z: expit(z) * expit(-z)),
    "tanh": (np.tanh, lambda z: 1 / np.cosh(z) ** 2),
    "gelu": (lambda z: z * ndtr(z),
             lambda z: ndtr(z) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)),
}


def loss_gradient(loss, f, y):
    """dl/df for one sample, from the textbook formulas."""
    if loss == "squared":
        return 2 * (f - y)
    if loss == "logistic":
        return -y * expit(-y * f)
    target = np.eye(f.size)[y] if np.ndim(y) == 0 else y  # a label or a probability row
    return softmax(f) - target


def check_kronecker(problem):
    """One layer, one sample: the seed-000 vec form against the reference's dW and db."""
    (W, b), = problem.params
    spec, = problem.activations
    x, y = problem.X[0], problem.Y[0]
    sigma, sigma_prime = ELEMENTWISE[spec]
    z = W @ x + b
    lifted = sparse.kron(np.append(x, 1.0)[:, None], sparse.identity(W.shape[0]))
    expected = lifted @ sparse.diags(sigma_prime(z)) @ loss_gradient(problem.loss, sigma(z), y)

    _, ((dW, db),), _ = reference.loss_and_gradients(problem.params, spec, problem.loss, x, y)
    assert_close(np.concatenate([dW.ravel(order="F"), db]), expected, 1e-12, "[Vec dW; db]")


# --- check 3: PyTorch autograd -------------------------------------------------------

TORCH_ACTIVATIONS = {
    "identity": lambda torch, z, alpha: z,
    "relu": lambda torch, z, alpha: alpha * torch.relu(z),
    "sigmoid": lambda torch, z, alpha: torch.sigmoid(z),
    "tanh": lambda torch, z, alpha: torch.tanh(z),
    "gelu": lambda torch, z, alpha: torch.nn.functional.gelu(z, approximate="none"),
    "softmax": lambda torch, z, alpha: torch.softmax(z, dim=1),
}

TORCH_LOSSES = {
    "squared": lambda torch, f, y: ((f - y) ** 2).sum(dim=1).mean(),
    "logistic": lambda torch, f, y: torch.nn.functional.softplus(-y * f).sum(dim=1).mean(),
    # integer labels or probability rows, both batch-mean like gpu_mlp
    "softmax_cross_entropy": lambda torch, f, y: torch.nn.functional.cross_entropy(f, y),
}


def check_torch(problem):
    torch = pytest.importorskip("torch")
    params = [(torch.tensor(W, requires_grad=True), torch.tensor(b, requires_grad=True))
              for W, b in problem.params]
    X = torch.tensor(problem.X, requires_grad=True)
    out = X
    for (W, b), spec in zip(params, problem.activations):
        act = activations.get(spec)
        out = TORCH_ACTIVATIONS[act.name](torch, torch.nn.functional.linear(out, W, b), act.alpha)
    J = TORCH_LOSSES[problem.loss](torch, out, torch.as_tensor(problem.Y))
    J.backward()

    assert_close(reference.forward(problem.params, problem.activations, problem.X),
                 out.detach().numpy(), 1e-10, "output")
    J_ref, grads, dX = problem.loss_and_gradients()
    assert_close(J_ref, J.item(), 1e-10, "J")
    for k, ((dW, db), (W, b)) in enumerate(zip(grads, params), start=1):
        assert_close(dW, W.grad.numpy(), 1e-10, f"dJ/dW_{k}")
        assert_close(db, b.grad.numpy(), 1e-10, f"dJ/db_{k}")
    assert_close(dX, X.grad.numpy(), 1e-10, "dJ/dX")


# --- every activation x head x depth -------------------------------------------------

def _cases():
    for head in HEADS:
        yield pytest.param(1, [head.output], head, id=f"depth1-{head}")
        for depth in (2, 3, 4):
            for hidden in HIDDEN:
                specs = [hidden] * (depth - 1) + [head.output]
                yield pytest.param(depth, specs, head, id=f"depth{depth}-{hidden}-{head}")


CASES = list(_cases())


@pytest.mark.parametrize("depth, specs, head", CASES)
def test_gradients_match_finite_differences(make_problem, depth, specs, head):
    rng = np.random.default_rng(depth)
    check_finite_differences(make_problem(rng, SIZES[depth], specs, head))


@pytest.mark.parametrize("depth, specs, head", CASES)
def test_loss_and_gradients_match_torch_autograd(make_problem, depth, specs, head):
    rng = np.random.default_rng(depth)
    check_torch(make_problem(rng, SIZES[depth], specs, head))


@pytest.mark.parametrize("head", [h for h in HEADS if h.output == "identity"],
                         ids=lambda head: str(head).removeprefix("identity-"))
@pytest.mark.parametrize("spec", ELEMENTWISE)
def test_single_layer_gradient_matches_the_kronecker_form(make_problem, spec, head):
    """Any elementwise output activation under each loss (the head's own output unused)."""
    rng = np.random.default_rng(0)
    check_kronecker(make_problem(rng, [4, 3], [spec], head, batch=1))


def test_mixed_activations_per_layer_match_torch(make_problem):
    specs = ["relu(alpha=0.5)", "gelu", "softmax", "tanh", "sigmoid"]
    check_torch(make_problem(np.random.default_rng(1), [4, 5, 3, 4, 5, 2], specs,
                             Head("sigmoid", "squared")))


# --- the checks have teeth -----------------------------------------------------------

@pytest.mark.parametrize("check", [check_finite_differences, check_kronecker, check_torch])
def test_a_wrong_derivative_is_caught(make_problem, monkeypatch, check):
    """With sigma'(z) = sigma(z) instead of sigma(z)(1 - sigma(z)), every oracle objects."""
    problem = make_problem(np.random.default_rng(0), [4, 3], ["sigmoid"],
                           Head("sigmoid", "squared"), batch=1)
    sigmoid = activations.TABLE["sigmoid"]
    monkeypatch.setitem(activations.TABLE, "sigmoid", dataclasses.replace(
        sigmoid, grad=lambda z, alpha, out: sigmoid.value(z, alpha, out)))
    with pytest.raises(AssertionError):
        check(problem)


# --- hypothesis: random shapes, depths and activations --------------------------------

@st.composite
def networks(draw):
    """(sizes, one activation per layer, head, batch, seed) for a random small network."""
    depth = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 5), min_size=depth + 1, max_size=depth + 1))
    hidden = draw(st.lists(st.sampled_from(HIDDEN), min_size=depth - 1, max_size=depth - 1))
    head = draw(st.sampled_from(HEADS))
    batch, seed = draw(st.integers(1, 6)), draw(st.integers(0, 2**32 - 1))
    return sizes, hidden + [head.output], head, batch, seed


PROPERTY = settings(max_examples=30, deadline=None)


@PROPERTY
@given(net=networks())
def test_property_matches_torch(make_problem, net):
    sizes, specs, head, batch, seed = net
    check_torch(make_problem(np.random.default_rng(seed), sizes, specs, head, batch))


@PROPERTY
@given(net=networks())
def test_property_directional_derivative(make_problem, net):
    """(J(theta + h v) - J(theta - h v)) / 2h = <grad J, v> for a random direction v."""
    sizes, specs, head, batch, seed = net
    rng = np.random.default_rng(seed)
    p = make_problem(rng, sizes, specs, head, batch)
    V = [(rng.standard_normal(W.shape), rng.standard_normal(b.shape)) for W, b in p.params]
    VX = rng.standard_normal(p.X.shape)

    def J(t):
        params = [(W + t * vW, b + t * vb) for (W, b), (vW, vb) in zip(p.params, V)]
        return reference.loss_and_gradients(params, specs, p.loss, p.X + t * VX, p.Y)[0]

    _, grads, dX = p.loss_and_gradients()
    slope = np.sum(dX * VX) + sum(np.sum(dW * vW) + np.sum(db * vb)
                                  for (dW, db), (vW, vb) in zip(grads, V))
    h = 1e-6
    assert (J(h) - J(-h)) / (2 * h) == pytest.approx(slope, rel=1e-6, abs=1e-7)


@PROPERTY
@given(net=networks())
def test_property_batch_gradient_is_the_mean_of_per_sample_gradients(make_problem, net):
    sizes, specs, head, batch, seed = net
    p = make_problem(np.random.default_rng(seed), sizes, specs, head, batch)
    J, grads, dX = p.loss_and_gradients()
    singles = [reference.loss_and_gradients(p.params, specs, p.loss, x, y)
               for x, y in zip(p.X, p.Y)]

    assert_close(J, np.mean([s[0] for s in singles]), 1e-12, "J")
    for k, (dW, db) in enumerate(grads):
        assert_close(dW, np.mean([s[1][k][0] for s in singles], axis=0), 1e-12, f"dW_{k + 1}")
        assert_close(db, np.mean([s[1][k][1] for s in singles], axis=0), 1e-12, f"db_{k + 1}")
    # the mean's 1/B reaches the input gradient too
    assert_close(dX, np.stack([s[2] for s in singles]) / batch, 1e-12, "dX")


# --- single samples and float32 ------------------------------------------------------

@pytest.mark.parametrize("head", HEADS, ids=str)
def test_a_single_sample_is_a_batch_of_one(make_problem, head):
    p = make_problem(np.random.default_rng(3), [3, 4, 2], ["tanh", head.output], head, batch=1)
    J1, grads1, dX1 = reference.loss_and_gradients(p.params, p.activations, p.loss,
                                                   p.X[0], p.Y[0])
    J, grads, dX = p.loss_and_gradients()

    assert dX1.shape == (3,)
    assert reference.forward(p.params, p.activations, p.X[0]).shape == (2,)
    assert J1 == J
    np.testing.assert_array_equal(dX1, dX[0])
    for (dW1, db1), (dW, db) in zip(grads1, grads):
        np.testing.assert_array_equal(dW1, dW)
        np.testing.assert_array_equal(db1, db)


def test_one_activation_spec_applies_to_every_layer(make_problem):
    p = make_problem(np.random.default_rng(4), [3, 4, 4, 2], ["gelu"] * 3, HEADS[0])
    np.testing.assert_array_equal(reference.forward(p.params, "gelu", p.X),
                                  reference.forward(p.params, p.activations, p.X))


@pytest.mark.parametrize("head", HEADS, ids=str)
def test_float32_agrees_with_float64(make_problem, head):
    p = make_problem(np.random.default_rng(5), [3, 5, 4, 4, 3],
                     ["relu", "gelu", "tanh", head.output], head)
    J, grads, dX = p.loss_and_gradients()
    Y32 = p.Y.astype(np.float32) if p.Y.dtype.kind == "f" else p.Y
    params32 = [(W.astype(np.float32), b.astype(np.float32)) for W, b in p.params]
    J32, grads32, dX32 = reference.loss_and_gradients(params32, p.activations, p.loss,
                                                      p.X.astype(np.float32), Y32)

    assert J32.dtype == dX32.dtype == np.float32
    assert_close(J32, J, 1e-4, "J")
    assert_close(dX32, dX, 1e-4, "dX")
    for k, ((dW32, db32), (dW, db)) in enumerate(zip(grads32, grads), start=1):
        assert dW32.dtype == db32.dtype == np.float32
        assert_close(dW32, dW, 1e-4, f"dW_{k}")
        assert_close(db32, db, 1e-4, f"db_{k}")


# --- bad input -----------------------------------------------------------------------

def _with(a, index, value):
    """A copy of a with a[index] = value."""
    a = a.copy()
    a[index] = value
    return a


@pytest.fixture
def valid_call(make_params):
    rng = np.random.default_rng(0)
    return dict(params=make_params(rng, [3, 4, 2]), activations="tanh", loss="squared",
                X=rng.standard_normal((5, 3)), Y=rng.standard_normal((5, 2)))


# name: (overrides from the valid call, error, message it must match)
BAD_CALLS = {
    "layers do not chain": (
        lambda c: {"params": [c["params"][0], (np.ones((2, 5)), np.zeros(2))]},
        ValueError, r"W_2 takes 5 inputs but layer 1 has 4 outputs"),
    "bias of the wrong length": (
        lambda c: {"params": [(c["params"][0][0], np.zeros(3)), c["params"][1]]},
        ValueError, r"b_1 must have shape \(4,\)"),
    "1-D weight": (
        lambda c: {"params": [(np.ones(3), np.zeros(4)), c["params"][1]]},
        ValueError, r"W_1 must be 2-D"),
    "no layers": (lambda c: {"params": []}, ValueError, r"at least one layer"),
    "not a (W, b) pair": (
        lambda c: {"params": [c["params"][0] + (np.zeros(4),), c["params"][1]]},
        ValueError, r"layer 1: expected a \(W, b\) pair"),
    "X of the wrong width": (
        lambda c: {"X": np.ones((5, 4))}, ValueError, r"X must have shape \(batch, 3\)"),
    "3-D X": (lambda c: {"X": np.ones((5, 1, 3))}, ValueError, r"X must have shape"),
    "Y of the wrong shape": (
        lambda c: {"Y": np.ones((5, 3))}, ValueError, r"Y must have shape \(5, 2\)"),
    "labels of the wrong shape": (
        lambda c: {"loss": "softmax_cross_entropy", "Y": np.zeros((5, 1), dtype=int)},
        ValueError, r"integer labels must have shape \(5,\)"),
    "label too large": (
        lambda c: {"loss": "softmax_cross_entropy", "Y": np.array([0, 1, 2, 0, 1])},
        ValueError, r"labels must lie in \[0, 2\)"),
    "negative label": (
        lambda c: {"loss": "softmax_cross_entropy", "Y": np.array([0, -1, 1, 0, 1])},
        ValueError, r"labels must lie in \[0, 2\)"),
    "boolean labels": (
        lambda c: {"loss": "softmax_cross_entropy", "Y": np.ones(5, dtype=bool)},
        TypeError, r"not booleans"),
    "soft targets with a negative entry": (
        lambda c: {"loss": "softmax_cross_entropy", "Y": np.tile([1.5, -0.5], (5, 1))},
        ValueError, r"target rows must be probabilities"),
    "soft targets not summing to 1": (
        lambda c: {"loss": "softmax_cross_entropy", "Y": np.full((5, 2), 0.3)},
        ValueError, r"target rows must be probabilities"),
    "logistic labels in {0, 1}": (
        lambda c: {"loss": "logistic", "Y": np.tile([0.0, 1.0], (5, 1))},
        ValueError, r"labels in Y must be -1 or \+1"),
    "NaN in X": (lambda c: {"X": _with(c["X"], (2, 1), np.nan)}, ValueError,
                 r"X contains NaN or Inf"),
    "Inf in X": (lambda c: {"X": _with(c["X"], (0, 0), -np.inf)}, ValueError,
                 r"X contains NaN or Inf"),
    "NaN in Y": (lambda c: {"Y": _with(c["Y"], (1, 1), np.nan)}, ValueError,
                 r"Y contains NaN or Inf"),
    "NaN in a weight": (
        lambda c: {"params": [(_with(c["params"][0][0], (1, 2), np.nan), c["params"][0][1]),
                              c["params"][1]]},
        ValueError, r"W_1 contains NaN or Inf"),
    "Inf in a bias": (
        lambda c: {"params": [c["params"][0],
                              (c["params"][1][0], _with(c["params"][1][1], 0, np.inf))]},
        ValueError, r"b_2 contains NaN or Inf"),
    "integer X": (lambda c: {"X": np.ones((5, 3), dtype=int)}, TypeError,
                  r"X must hold floating-point numbers"),
    "integer W": (lambda c: {"params": [(np.ones((4, 3), dtype=int), c["params"][0][1]),
                                        c["params"][1]]},
                  TypeError, r"W_1 must hold floating-point numbers"),
    "X a list": (lambda c: {"X": c["X"].tolist()}, TypeError, r"X must be an array"),
    "float32 X, float64 parameters": (
        lambda c: {"X": c["X"].astype(np.float32)}, TypeError,
        r"X has dtype float32 but the parameters are float64"),
    "mixed parameter dtypes": (
        lambda c: {"params": [c["params"][0], (c["params"][1][0].astype(np.float32),
                                               c["params"][1][1])]},
        TypeError, r"layer 2: all parameters must share one dtype"),
    "unknown activation": (
        lambda c: {"activations": ["tanh", "swish"]}, ValueError,
        r"unknown activation 'swish'; valid: identity, relu, sigmoid, tanh, gelu, softmax"),
    "activation of the wrong type": (
        lambda c: {"activations": ["tanh", 3]}, TypeError, r"an activation is a name"),
    "too many activations": (
        lambda c: {"activations": ["tanh"] * 3}, ValueError,
        r"expected 2 activations \(one per layer\), got 3"),
    "unknown loss": (
        lambda c: {"loss": "mse"}, ValueError,
        r"unknown loss 'mse'; valid: squared, logistic, softmax_cross_entropy"),
}


@pytest.mark.parametrize("change, error, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_an_error_naming_the_problem(valid_call, change, error, message):
    changes = change(valid_call)
    call = {**valid_call, **changes}
    with pytest.raises(error, match=message):
        reference.loss_and_gradients(**call)
    if not changes.keys() & {"loss", "Y"}:  # forward takes the rest and checks it alike
        with pytest.raises(error, match=message):
            reference.forward(call["params"], call["activations"], call["X"])
