"""gpu_mlp.sklearn: MLPClassifier and MLPRegressor as scikit-learn estimators.

1. scikit-learn's own estimator checks (``parametrize_with_checks``), every one;
2. the same meaning as scikit-learn's MLPs: in float64, from the same ``random_state``,
   every solver, schedule and target kind gives scikit-learn's iterates (coefficients,
   ``loss_curve_``, ``n_iter_``, stopping) to rounding;
3. the same scores as scikit-learn on the digits and a regression set with the same
   hyperparameters (the default float32), both timed;
4. pickling (parameters and optimizer state as NumPy: nothing in the stream needs CuPy or
   a GPU), Pipelines and GridSearchCV, partial_fit, warm_start, sparse input, moving a
   fitted model with set_params, the coefs_ layout, and clear errors.
"""

import io
import pickle
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from scipy import sparse  # noqa: E402
from sklearn import neural_network  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import gpu_mlp  # noqa: E402
from gpu_mlp import datasets  # noqa: E402
from gpu_mlp.sklearn import InvalidParameterError, MLPClassifier, MLPRegressor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def digits():
    X, y = datasets.digits()
    return datasets.train_test_split(X, y, test_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def regression():
    X, Y = datasets.regression(n=2000, d_in=8, d_out=1, noise=0.1, seed=0)
    return datasets.train_test_split(X, Y[:, 0], test_fraction=0.25, seed=0)


# --- 1. scikit-learn's estimator checks -------------------------------------------------

@parametrize_with_checks([MLPClassifier(max_iter=100, device="cpu"),
                          MLPRegressor(max_iter=100, device="cpu")])
def test_sklearn_estimator_checks(estimator, check, monkeypatch):
    # check_array_api_input (NumPy with array-API dispatch on) runs only with this set
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    check(estimator)


# --- 2. scikit-learn's iterates ----------------------------------------------------------

SOLVERS = {
    "adam": dict(solver="adam", learning_rate_init=0.01),
    "adam-early-stopping": dict(solver="adam", early_stopping=True, max_iter=12,
                                n_iter_no_change=3),
    "sgd-nesterov": dict(solver="sgd", learning_rate_init=0.05),
    "sgd-plain": dict(solver="sgd", momentum=0.0, learning_rate_init=0.05),
    "sgd-invscaling": dict(solver="sgd", learning_rate="invscaling", learning_rate_init=0.5,
                           nesterovs_momentum=False),
    "sgd-adaptive": dict(solver="sgd", learning_rate="adaptive", learning_rate_init=0.05,
                         tol=0.05, n_iter_no_change=2, max_iter=12),
}


def targets(kind, X, y):
    return {"multiclass": y, "binary": np.array(["even", "odd"])[y % 2],
            "multilabel": np.stack([y > 4, y % 3 == 0], axis=1).astype(int)}[kind]


def assert_same_fit(ours, theirs, rtol=1e-9):
    assert ours.n_iter_ == theirs.n_iter_ and ours.t_ == theirs.t_
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=rtol)
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())
    if theirs.validation_scores_ is not None:
        np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel"])
def test_classifier_follows_sklearn_iterates(digits, solver, kind):
    X, _, y, _ = digits
    X, y = X[:600], targets(kind, X[:600], y[:600])
    params = {**dict(hidden_layer_sizes=(24, 12), alpha=0.01, batch_size=64, max_iter=6,
                     random_state=0), **SOLVERS[solver]}
    ours = MLPClassifier(dtype="float64", device="cpu", **params).fit(X, y)
    theirs = neural_network.MLPClassifier(**params).fit(X, y)
    assert_same_fit(ours, theirs)
    np.testing.assert_array_equal(ours.classes_, theirs.classes_)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-9)
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
    assert ours.out_activation_ == theirs.out_activation_
    assert ours.n_outputs_ == theirs.n_outputs_ and ours.n_layers_ == theirs.n_layers_


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("d_out", [1, 3])
def test_regressor_follows_sklearn_iterates(solver, d_out):
    X, Y = datasets.regression(n=400, d_in=6, d_out=d_out, seed=1)
    y = Y[:, 0] if d_out == 1 else Y
    params = {**dict(hidden_layer_sizes=(16,), activation="tanh", alpha=0.01, batch_size=50,
                     max_iter=6, random_state=0), **SOLVERS[solver]}
    ours = MLPRegressor(dtype="float64", device="cpu", **params).fit(X, y)
    theirs = neural_network.MLPRegressor(**params).fit(X, y)
    assert_same_fit(ours, theirs)
    np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-9, atol=1e-9)


def test_partial_fit_follows_sklearn_and_keeps_the_optimizer(digits):
    X, _, y, _ = digits
    classes = np.unique(y)
    ours = MLPClassifier((16,), random_state=0, dtype="float64", device="cpu")
    theirs = neural_network.MLPClassifier((16,), random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        clone(ours).partial_fit(X[:100], y[:100])
    for first in range(0, 600, 150):
        for model in (ours, theirs):
            model.partial_fit(X[first:first + 150], y[first:first + 150], classes=classes)
    assert_same_fit(ours, theirs)
    # the Adam moments travel through a pickle
    loaded = pickle.loads(pickle.dumps(ours))
    for model in (loaded, theirs):
        model.partial_fit(X[600:750], y[600:750])
    assert_same_fit(loaded, theirs)


# binary: scikit-learn's output delta p - y rounds to 0 where the sigmoid saturates,
# ours keeps the tiny exact value, so the iterates part by about 1e-5 over the epochs
@pytest.mark.parametrize("kind, rtol", [("multiclass", 1e-9), ("binary", 1e-3)])
def test_unscaled_data_give_scikit_learns_loss_curve_and_stopping(kind, rtol):
    """scikit-learn values the log-loss of probabilities clipped to [eps, 1 - eps]: on
    unscaled features a probability underflows, and the exact loss (131 against 21.7 on
    the wine data) made the curve, tol's stopping and the epochs differ (65 against
    12)."""
    from sklearn.datasets import load_wine

    X, y = load_wine(return_X_y=True)
    if kind == "binary":
        y = (y == 0).astype(int)
    ours = MLPClassifier((10,), random_state=0, dtype="float64", device="cpu")
    theirs = neural_network.MLPClassifier((10,), random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for model in (ours, theirs):
            model.fit(X, y)
    assert max(theirs.loss_curve_) > 20  # probabilities did underflow
    assert_same_fit(ours, theirs, rtol)


def test_partial_fit_keeps_the_schedule_of_its_optimizer(digits):
    """scikit-learn's optimizer, made by the first partial_fit, keeps the solver's rate
    schedule (learning_rate, learning_rate_init, power_t): set_params between calls
    changes none of it. It was read anew each epoch (an Adam fit then crashed in
    invscaling's momentum rescaling, after the epoch's updates)."""
    X, _, y, _ = digits
    classes = np.unique(y)
    for first, then in [(dict(solver="adam"), dict(solver="sgd", learning_rate="invscaling")),
                        (dict(solver="sgd"), dict(learning_rate="invscaling")),
                        (dict(solver="sgd", learning_rate="invscaling"),
                         dict(learning_rate_init=0.1))]:
        ours = MLPClassifier((16,), random_state=0, dtype="float64", device="cpu", **first)
        theirs = neural_network.MLPClassifier((16,), random_state=0, **first)
        for model in (ours, theirs):
            model.partial_fit(X[:300], y[:300], None, classes)  # scikit-learn's positions
            model.set_params(**then)
            model.partial_fit(X[300:600], y[300:600])
        assert_same_fit(ours, theirs)


def test_parameters_are_scikit_learns():
    """Every parameter of scikit-learn's estimators is ours too (max_fun, lbfgs's, is
    kept unused): a model made from one of theirs' get_params()."""
    for ours, theirs in ((MLPClassifier, neural_network.MLPClassifier),
                         (MLPRegressor, neural_network.MLPRegressor)):
        params = theirs(max_fun=20).get_params()
        assert ours(**params).get_params() == {**params, "memory": "auto", "device": "auto",
                                               "dtype": "float32"}


def test_warm_start_follows_sklearn(digits):
    X, _, y, _ = digits
    params = dict(hidden_layer_sizes=(16,), max_iter=3, random_state=0, warm_start=True)
    ours = MLPClassifier(dtype="float64", device="cpu", **params)
    theirs = neural_network.MLPClassifier(**params)
    for _ in range(2):
        ours.fit(X[:400], y[:400])
        theirs.fit(X[:400], y[:400])
    assert_same_fit(ours, theirs)
    assert len(ours.loss_curve_) == 6
    ours.set_params(hidden_layer_sizes=(8,))
    with pytest.raises(ValueError, match="warm_start=False to start over"):
        ours.fit(X[:400], y[:400])


# --- 3. scores and times against scikit-learn -------------------------------------------------

@pytest.mark.parametrize("problem", ["digits", "regression"])
def test_same_score_as_sklearn_with_the_same_hyperparameters(problem, request, record_property):
    X_train, X_test, y_train, y_test = request.getfixturevalue(problem)
    ours_class, theirs_class = ((MLPClassifier, neural_network.MLPClassifier)
                                if problem == "digits" else
                                (MLPRegressor, neural_network.MLPRegressor))
    params = dict(hidden_layer_sizes=(100,), max_iter=100, random_state=0)
    scores, seconds = [], []
    for model in (ours_class(device="cpu", **params), theirs_class(**params)):
        start = time.perf_counter()
        model.fit(X_train, y_train)
        seconds.append(time.perf_counter() - start)
        scores.append(model.score(X_test, y_test))
    record_property("scores (gpu_mlp float32, scikit-learn)", scores)
    record_property("fit seconds (gpu_mlp float32, scikit-learn)", seconds)
    assert scores[0] > (0.95 if problem == "digits" else 0.75)
    assert abs(scores[0] - scores[1]) < 0.01


# --- 4. the rest of the contract ---------------------------------------------------------

def test_pickle_holds_numpy_only_and_predicts_the_same(digits):
    X_train, X_test, y_train, _ = digits
    model = MLPClassifier((32,), max_iter=20, random_state=0, device="cpu").fit(X_train,
                                                                                 y_train)
    data = pickle.dumps(model)
    text = data.decode("latin-1")
    assert "cupy" not in text and "gpu_mlp.network" not in text and "gpu_mlp.mlp" not in text
    loaded = pickle.loads(data)
    assert loaded._net is None  # built at first use, on the loading machine's device
    np.testing.assert_array_equal(loaded.predict_proba(X_test), model.predict_proba(X_test))
    for a, b in zip(loaded.coefs_, model.coefs_):
        np.testing.assert_array_equal(a, b)
    buffer = io.BytesIO()
    pickle.dump(clone(model), buffer)  # an unfitted one too
    assert not pickle.loads(buffer.getvalue()).__sklearn_is_fitted__()


@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_solvers_are_optims_own_with_public_options(regression, solver):
    # no subclass of gpu_mlp.optim: scikit-learn's conventions are its public options,
    # and the optimizer's state dict round trips through optim.from_state_dict
    X_train, _, y_train, _ = regression
    model = MLPRegressor(hidden_layer_sizes=(8,), solver=solver, alpha=0.5, batch_size=300,
                         max_iter=2, random_state=0, device="cpu").fit(X_train, y_train)
    opt = model._optimizer
    assert type(opt) is {"adam": gpu_mlp.optim.Adam, "sgd": gpu_mlp.optim.SGD}[solver]
    assert not opt.decay_bias
    assert getattr(opt, "eps_placement", "uncorrected") == "uncorrected"
    rows = len(X_train) - 300 * (len(X_train) // 300) or 300  # the last batch's
    assert opt.weight_decay == pytest.approx(0.5 / (rows * 0.5))  # alpha / (n_batch c)
    loaded = gpu_mlp.optim.from_state_dict(opt.state_dict())
    assert type(loaded) is type(opt) and repr(loaded) == repr(opt)
    assert loaded.hyperparameters() == opt.hyperparameters() and loaded.steps == opt.steps


def test_pipeline_and_grid_search(digits):
    X_train, X_test, y_train, y_test = digits
    pipe = make_pipeline(StandardScaler(), MLPClassifier(max_iter=30, random_state=0,
                                                         device="cpu"))
    search = GridSearchCV(pipe, {"mlpclassifier__hidden_layer_sizes": [(16,), (48,)],
                                 "mlpclassifier__alpha": [1e-4, 1e-1]}, cv=3)
    search.fit(X_train[:600], y_train[:600])
    assert len(search.cv_results_["params"]) == 4
    assert search.best_score_ > 0.7 and search.score(X_test, y_test) > 0.7
    assert search.best_estimator_[-1].n_features_in_ == 64


def test_coefs_layout_views_and_setters(digits):
    X_train, _, y_train, _ = digits
    model = MLPClassifier((20,), max_iter=3, random_state=0, device="cpu").fit(X_train,
                                                                               y_train)
    assert [c.shape for c in model.coefs_] == [(64, 20), (20, 10)]
    assert [b.shape for b in model.intercepts_] == [(20,), (10,)]
    net = model.net_
    assert isinstance(net, gpu_mlp.MLP) and net.sizes == [64, 20, 10]
    assert np.shares_memory(model.coefs_[0], net.params[0][0])  # CPU: views, no copies
    model.intercepts_ = [np.zeros(20), np.arange(10.0)]
    np.testing.assert_array_equal(net.params[1][1], np.arange(10.0))
    with pytest.raises(ValueError, match=r"coefs_\[0\]"):
        model.coefs_ = [np.zeros((20, 64)), np.zeros((20, 10))]
    # checked as the float32 model holds them (1e39 is inf there), all before any is set
    before = [c.copy() for c in model.coefs_]
    with pytest.raises(ValueError, match=r"coefs_\[1\] contains NaN or Inf in float32"):
        model.coefs_ = [np.zeros((64, 20)), np.full((20, 10), 1e39)]
    with pytest.raises(TypeError, match=r"intercepts_\[0\] must hold real numbers"):
        model.intercepts_ = [np.array(["a"] * 20), np.zeros(10)]
    for c, b in zip(model.coefs_, before):
        np.testing.assert_array_equal(c, b)
    # an item replaced reaches the model, as in scikit-learn's lists (it was lost), checked
    model.coefs_[1] = np.ones((20, 10))
    np.testing.assert_array_equal(net.params[1][0], np.ones((10, 20)))
    model.intercepts_[0] = np.full(20, 2.0)
    np.testing.assert_array_equal(net.params[0][1], np.full(20, 2.0))
    with pytest.raises(ValueError, match=r"coefs_\[0\]"):
        model.coefs_[0] = np.zeros((3, 3))
    # a list taken before a refit is the old model's, as scikit-learn's: the new one keeps
    # its weights; one taken before partial_fit (the model goes on) still writes through
    old = model.coefs_
    model.fit(X_train, y_train)
    refitted = model.coefs_[1].copy()
    old[1] = np.zeros((20, 10))
    np.testing.assert_array_equal(model.coefs_[1], refitted)
    assert not old[1].any()
    kept = model.coefs_
    model.partial_fit(X_train[:50], y_train[:50])
    kept[1] = np.zeros((20, 10))
    assert not model.coefs_[1].any()
    unfitted = MLPClassifier()
    assert not hasattr(unfitted, "coefs_")
    with pytest.raises(NotFittedError):
        unfitted.predict(X_train)


def test_set_params_moves_a_fitted_model(regression):
    X_train, X_test, y_train, _ = regression
    model = MLPRegressor(hidden_layer_sizes=(16,), max_iter=5, random_state=0, device="cpu")
    model.fit(X_train, y_train)
    before = model.predict(X_test)
    model.set_params(dtype="float64", memory="store_both")
    assert model.net_.dtype == np.float64 and model.net_.memory == "store_both"
    np.testing.assert_allclose(model.predict(X_test), before, rtol=1e-5, atol=1e-5)
    model.partial_fit(X_train, y_train)  # the optimizer's state moved along
    assert model.n_iter_ == 1 and len(model.loss_curve_) == 6


def test_sparse_input_is_densified_per_batch(digits):
    X_train, X_test, y_train, _ = digits
    params = dict(hidden_layer_sizes=(16,), max_iter=5, random_state=0, device="cpu",
                  dtype="float64")
    dense = MLPClassifier(**params).fit(X_train, y_train)
    for convert in (sparse.csr_matrix, sparse.csc_array):
        model = MLPClassifier(**params).fit(convert(X_train), y_train)
        np.testing.assert_allclose(model.loss_curve_, dense.loss_curve_, rtol=1e-12)
        np.testing.assert_allclose(model.predict_proba(convert(X_test)),
                                   dense.predict_proba(X_test), rtol=1e-12, atol=1e-15)


def test_outputs_follow_the_input_dtype_and_memory_auto(regression):
    X_train, X_test, y_train, _ = regression
    model = MLPRegressor(hidden_layer_sizes=(8,), activation="gelu", max_iter=3, random_state=0,
                         device="cpu").fit(X_train, y_train)
    assert model.net_.memory == "recompute"  # gelu has no derivative from its output
    assert model.predict(X_test).dtype == np.float64
    assert model.predict(X_test.astype(np.float32)).dtype == np.float32
    clf = MLPClassifier((8,), max_iter=3, random_state=0, device="cpu").fit(
        X_train, y_train > 0)
    assert clf.net_.memory == "output" and clf.predict_proba(X_test).shape == (len(X_test), 2)
    assert np.all(clf.predict_log_proba(X_test) <= 0)


def test_verbose_and_convergence_warning(digits, capsys):
    X_train, _, y_train, _ = digits
    with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
        MLPClassifier((8,), max_iter=2, verbose=True, device="cpu").fit(X_train, y_train)
    assert "Iteration 2, loss = " in capsys.readouterr().out


def test_bad_parameters_and_data_raise_clear_errors(digits):
    X_train, _, y_train, _ = digits
    for params, match in [(dict(solver="lbfgs"), "stochastic ones"),
                          (dict(activation="softmax"), "activation"),
                          (dict(alpha=-1.0), "alpha"), (dict(batch_size=0), "batch_size"),
                          (dict(dtype="float16"), "dtype"), (dict(memory="all"), "memory"),
                          (dict(device="tpu"), "device"), (dict(beta_1=1.0), "beta_1"),
                          (dict(hidden_layer_sizes=(4, 0)), "hidden_layer_sizes")]:
        with pytest.raises((InvalidParameterError, ValueError), match=match):
            MLPClassifier(**params).fit(X_train[:50], y_train[:50])
    with pytest.raises(InvalidParameterError, match="poisson"):
        MLPRegressor(loss="poisson").fit(X_train[:50], y_train[:50])
    with pytest.raises(InvalidParameterError, match="first positional argument"):
        MLPRegressor((16,)).fit(X_train[:50], y_train[:50])  # as in scikit-learn: loss
    with pytest.raises(ValueError, match="too large for float32"):
        MLPRegressor(device="cpu").fit(X_train[:50] * 1e300, y_train[:50])
    fitted = MLPRegressor(hidden_layer_sizes=(4,), max_iter=2, device="cpu").fit(
        X_train[:50], y_train[:50])
    with pytest.raises(ValueError, match="X holds values too large for float32"):
        fitted.predict(X_train[:5] * 1e300)  # finite in float64: not "NaN or Inf"
    with pytest.raises(TypeError, match="sample_weight is not offered"):
        fitted.partial_fit(X_train[:50], y_train[:50], np.ones(50))
    # fit has no sample_weight at all: scikit-learn reads its signature to decide whether
    # to pass weights (its weight checks, BaggingRegressor)
    from sklearn.utils.validation import has_fit_parameter
    assert not has_fit_parameter(MLPRegressor(), "sample_weight")
    with pytest.raises(ValueError, match="early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X_train[:50], y_train[:50],
                                                       classes=np.arange(10))
    assert issubclass(InvalidParameterError, ValueError)
    assert issubclass(InvalidParameterError, TypeError)


def test_an_alpha_past_the_dtypes_numbers_is_refused_by_name(digits):
    """The loss curve's L2 term is alpha / 2 ||W||^2, computed in the net's dtype: an
    alpha whose half float32 cannot hold is refused as 'alpha', before any step, a
    fitted model untouched; float64 takes it."""
    X_train, _, y_train, _ = digits
    X, y = X_train[:50], y_train[:50]
    fitted = MLPClassifier((4,), max_iter=2, device="cpu", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted.fit(X, y)
    before = [W.copy() for W in fitted.coefs_]
    fitted.set_params(alpha=1e39, warm_start=True)
    with pytest.raises(InvalidParameterError, match=r"'alpha'.*for dtype float32"):
        fitted.fit(X, y)
    assert all(np.array_equal(W, W0) for W, W0 in zip(fitted.coefs_, before))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MLPClassifier((4,), alpha=1e39, max_iter=1, dtype="float64", device="cpu").fit(X, y)


def test_extras_are_imported_only_by_their_modules():
    code = """if True:
        import sys
        import gpu_mlp, gpu_mlp.training, gpu_mlp.checkpoint, gpu_mlp.cli, gpu_mlp.optim
        assert "sklearn" not in sys.modules and "torch" not in sys.modules
        for extra, module in (("sklearn", "sklearn"), ("torch", "torch")):
            sys.modules[module] = None  # as if not installed
            try:
                __import__("gpu_mlp." + extra)
            except ModuleNotFoundError as e:
                assert e.name == module and f"gpu_mlp[{extra}]" in str(e), e
            else:
                raise AssertionError(extra)
        """
    subprocess.run([sys.executable, "-c", code], check=True)


def test_module_imports_scikit_learn_itself():
    import gpu_mlp.sklearn as ours

    assert ours.sklearn is sklearn  # `import sklearn` in gpu_mlp/sklearn.py is absolute
    assert ours.MLPClassifier.__module__ == "gpu_mlp.sklearn"


@pytest.mark.gpu
def test_cuda_fit_matches_cpu_and_pickles_to_numpy(digits):
    X_train, X_test, y_train, _ = digits
    params = dict(hidden_layer_sizes=(32,), max_iter=5, random_state=0, dtype="float64")
    gpu = MLPClassifier(device="cuda", **params).fit(X_train, y_train)
    cpu = MLPClassifier(device="cpu", **params).fit(X_train, y_train)
    assert_same_fit(gpu, cpu, rtol=1e-9)
    loaded = pickle.loads(pickle.dumps(gpu))
    assert all(isinstance(W, np.ndarray) for W, _ in loaded._host_params)
    loaded.set_params(device="cpu")
    np.testing.assert_allclose(loaded.predict_proba(X_test), gpu.predict_proba(X_test),
                               rtol=1e-9, atol=1e-12)


def test_module_docstring_example_runs():
    import doctest

    import gpu_mlp.sklearn as ours

    result = doctest.testmod(ours)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copys_coefs_stay_its_weights(how):
    """coefs_ are views of the weights (on the CPU): a write through them reaches the
    model. A copy's first predict rebuilt its engine from copies, so a view taken before
    it was left behind: the write was lost, silently (0.73 where 0.33 was due)."""
    import copy

    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    fitted = MLPClassifier((6,), random_state=0, max_iter=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted.fit(X, y)
    twin = pickle.loads(pickle.dumps(fitted)) if how == "pickle" else copy.deepcopy(fitted)
    W = twin.coefs_[0]
    assert twin.score(X, y) == fitted.score(X, y)
    W[...] = 0
    fitted.coefs_[0][...] = 0
    assert not twin.coefs_[0].any() and twin.score(X, y) == fitted.score(X, y)


def test_a_model_whose_weights_cannot_compute_is_not_copied_and_a_nan_one_is():
    """The engine's own copies check the parameters and keep their values (b678f73): the
    estimator's now do too -- a NaN weight copies and predicts NaN as the original does;
    one of the wrong dtype is refused where pickled, not at the copy's first predict."""
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reg = MLPRegressor(hidden_layer_sizes=(5,), max_iter=5, random_state=0).fit(X, y)
        clf = MLPClassifier((5,), max_iter=5, random_state=0).fit(X, y)
    reg.coefs_[0][0, 0] = np.nan
    assert np.isnan(pickle.loads(pickle.dumps(reg)).predict(X[:2])).all()
    clf.net_.params = [(W.astype(np.float64), b) for W, b in clf.net_.params]
    with pytest.raises(ValueError, match="W_1 must be a C-contiguous float32 array"):
        pickle.dumps(clf)


@pytest.mark.parametrize("shuffle", [True, False])
def test_a_fit_on_the_models_own_weights_fits_their_copy(shuffle):
    """X = coefs_[0].T shares the weights' memory: the fit's updates changed its rows
    under it (0.5-0.8 off fit(X.copy()), shuffled or not). It trains on a copy."""
    rng = np.random.default_rng(0)
    X0, y0 = rng.standard_normal((16, 16)), np.arange(16) % 3
    kw = dict(hidden_layer_sizes=(16,), random_state=0, max_iter=3, solver="adam",
              shuffle=shuffle, batch_size=4, warm_start=True, learning_rate_init=0.1,
              dtype="float64")
    fits = []
    for alias in (True, False):
        model = MLPClassifier(**kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X0, y0)
            X = model.coefs_[0].T
            model.fit(X if alias else X.copy(), y0)
        fits.append(model.coefs_ + model.intercepts_)
    for a, b in zip(*fits):
        np.testing.assert_array_equal(a, b)


def test_multilabel_partial_fit_takes_the_columns_as_classes_every_call():
    """As scikit-learn: a multilabel target's classes are its columns, refused otherwise
    on the first call (it was taken there, and the same argument refused on the second)."""
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((40, 5)), (rng.random((40, 4)) > 0.5).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.raises(ValueError, match="`y` has classes not in `self.classes_`"):
            MLPClassifier((6,), random_state=0).partial_fit(X, Y, classes=[0, 1])
        ours = MLPClassifier((6,), random_state=0)
        for _ in range(2):
            ours.partial_fit(X, Y, classes=[0, 1, 2, 3])
    np.testing.assert_array_equal(ours.classes_, [0, 1, 2, 3])


def test_a_fit_holds_no_shuffled_copy_of_the_data():
    """As gpu_mlp's fit: a shuffled epoch's batches are gathered by index into
    batch-sized buffers, where an epoch's shuffled copy of the data was held (two at
    first, beside X). What remains: the checks' scans and a batch."""
    import tracemalloc

    rng = np.random.default_rng(0)
    X = rng.standard_normal((20_000, 100)).astype(np.float32)
    y = rng.integers(0, 10, len(X))
    model = MLPClassifier((16,), max_iter=3, random_state=0, dtype="float32")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X, y)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 0.6 * X.nbytes, peak / X.nbytes


def test_copies_and_memory_maps_of_an_unpickled_model_train_their_own_weights(tmp_path):
    """An unpickled model computes in its host arrays (its coefs_ stay its weights), but
    not in arrays others hold: copy.copy of it trained the same weights as it, and a
    joblib memory map opened "r+" had the fit write into the saved file."""
    import copy

    import joblib

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 4)), rng.standard_normal(40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MLPRegressor(hidden_layer_sizes=(5,), max_iter=3, random_state=0).fit(X, y)
        a = pickle.loads(pickle.dumps(model))
        b = copy.copy(a)
        before = b.coefs_[0].copy()
        a.partial_fit(X, y)
        assert np.array_equal(b.coefs_[0], before)
        path = tmp_path / "model.joblib"
        joblib.dump(model, path)
        saved = path.read_bytes()
        joblib.load(path, mmap_mode="r+").partial_fit(X, y)
    assert path.read_bytes() == saved


def test_a_dtype_change_that_overflows_a_weight_is_refused():
    """Moved to float32, a float64 weight of 1e300 is inf: refused, as before copies kept
    their values unchecked (a NaN weight, in the same dtype, is still copied as it is)."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 4)), rng.standard_normal(40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MLPRegressor(hidden_layer_sizes=(5,), max_iter=3, random_state=0,
                             dtype="float64").fit(X, y)
    coefs = model.coefs_
    coefs[0][0, 0] = 1e300
    model.coefs_ = coefs
    model.set_params(dtype="float32")
    with pytest.raises(ValueError, match="W_1 in float32 contains NaN or Inf"):
        model.predict(X[:3])
