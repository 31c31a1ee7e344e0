"""scikit-learn estimators on gpu_mlp's engine: :class:`MLPClassifier` and :class:`MLPRegressor`.

Drop-in for ``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor`` with their
stochastic solvers: the same parameters and meanings, fitted attributes (``coefs_[k]`` is
``(n_in, n_out)``), objective (mean log-loss or half squared error plus
``alpha / (2 n_batch) sum ||W||^2`` on the weights only), Glorot initialisation from
``random_state``, epoch shuffles, validation split, stopping rule and schedules -- so in
float64 a fit follows scikit-learn's iterates to rounding (tests/test_sklearn.py). It
trains :class:`gpu_mlp.MLP`, on the GPU where there is one, the update fused into the
backward pass.

>>> from gpu_mlp import datasets
>>> from gpu_mlp.sklearn import MLPClassifier
>>> X, y = datasets.digits()
>>> X_train, X_test, y_train, y_test = datasets.train_test_split(X, y, seed=0)
>>> clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=100, random_state=0)
>>> clf.fit(X_train, y_train).score(X_test, y_test) > 0.95
True

Solvers: ``"adam"`` is :class:`gpu_mlp.optim.Adam`, ``"sgd"`` :class:`gpu_mlp.optim.SGD`
(momentum, Nesterov), with the L2 term on the weights only and Adam's eps placed as
scikit-learn places them (their options ``decay_bias=False``, ``weight_decay`` set per
batch, ``eps_placement="uncorrected"``); ``learning_rate`` and ``power_t`` schedule the
SGD rate per epoch (momentum buffers rescaled at each change), as the optimizer made by
the first ``partial_fit`` has them. Not offered: ``"lbfgs"`` (its ``max_fun`` is accepted,
unused), ``sample_weight`` (None only), ``loss="poisson"``. Ours: ``memory``
(``"auto"``: ``"output"`` unless an activation needs ``"recompute"``), ``device`` and
``dtype`` (``"float32"`` by default); ``set_params`` on a fitted estimator moves its
network. Inputs are validated as scikit-learn does (sparse CSR/CSC densified a batch at a
time); outputs are NumPy arrays in the input's float dtype. Pickles hold NumPy arrays only, so a model fitted on a GPU
loads and predicts without one.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

try:
    import sklearn  # noqa: F401  -- Python 3 imports are absolute: this is scikit-learn
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    if e.name != "sklearn":
        raise
    raise ModuleNotFoundError("gpu_mlp.sklearn needs scikit-learn: "
                              "pip install 'gpu_mlp[sklearn]'", name="sklearn") from None

import scipy.sparse as sp
from scipy.special import expit
from scipy.special import softmax as _softmax
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state, gen_batches
from sklearn.utils import shuffle as _shuffle
from sklearn.utils.multiclass import type_of_target, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from . import _checks
from . import activations as _activations
from . import device as _device
from . import losses as _losses
from . import optim
from .mlp import MLP
from .network import MEMORY_MODES
from .plan import StepPlan
from .training import BatchGather

__all__ = ["MLPClassifier", "MLPRegressor", "InvalidParameterError"]

_SOLVERS = ("sgd", "adam")


class _ParamList(list):
    """``coefs_`` or ``intercepts_``: a list whose item assignment reaches the model
    (checked by the attribute's setter), as with scikit-learn's plain lists:
    ``clf.coefs_[0] = W`` was lost on a list made anew at each access. A list taken
    before a fit that made a new model (not one that went on) is that old model's, as
    scikit-learn's is: an item set there stays in the list."""

    def __init__(self, arrays, owner, name):
        super().__init__(arrays)
        self._owner, self._name, self._model = owner, name, owner._model

    def __setitem__(self, index, value):
        if self._model is not self._owner._model:  # refitted since: the old model's list
            super().__setitem__(index, value)
            return
        arrays = list(self)
        arrays[index] = value
        setattr(self._owner, self._name, arrays)
        super().__setitem__(slice(None), getattr(self._owner, self._name))


_LEARNING_RATES = ("constant", "invscaling", "adaptive")
_SCHEDULE = ("solver", "learning_rate", "learning_rate_init", "power_t")  # the optimizer's
_SKLEARN_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh",
                        "relu": "relu"}


class InvalidParameterError(ValueError, TypeError):
    """A hyperparameter out of its domain (a ValueError and a TypeError, as
    scikit-learn's own ``InvalidParameterError``)."""


# --- parameter checks -------------------------------------------------------------------

def _bad(name, value, what):
    return InvalidParameterError(f"The {name!r} parameter must be {what}. Got {value!r} "
                                 f"instead.")


def _real(name, value, low=None, high=None, low_open=False, high_open=False, inf=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if ok:
        v = float(value)
        ok = (not math.isnan(v) and (inf or math.isfinite(v))
              and (low is None or (v > low if low_open else v >= low))
              and (high is None or (v < high if high_open else v <= high)))
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        raise _bad(name, value, f"a float in the range {lo or '(-inf'}, {hi or 'inf)'}")
    return float(value)


def _int(name, value, low=1):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < low:
        raise _bad(name, value, f"an int in the range [{low}, inf)")
    return int(value)


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise _bad(name, value, "an instance of 'bool'")
    return bool(value)


def _choice(name, value, options):
    if not isinstance(value, str) or value not in options:
        raise _bad(name, value, f"a str among {set(options)}")
    return value


def _hidden_sizes(value) -> list:
    sizes = [value] if not hasattr(value, "__iter__") or isinstance(value, str) else list(value)
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_))
               for s in sizes):
        raise _bad("hidden_layer_sizes", value, "an int or an array-like of ints")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"hidden_layer_sizes must be > 0, got {sizes}.")
    return [int(s) for s in sizes]


def _hidden_activation(value):
    """gpu_mlp's activation for scikit-learn's name ('logistic' is 'sigmoid'), or any
    elementwise activation of gpu_mlp ('gelu', 'relu(alpha=0.5)', ...)."""
    if isinstance(value, str) and value in _SKLEARN_ACTIVATIONS:
        return _activations.get(_SKLEARN_ACTIVATIONS[value])
    try:
        act = _activations.get(value)
    except (TypeError, ValueError):
        act = None
    if act is None or act.kind.rowwise:
        raise _bad("activation", value, "a str among {'identity', 'logistic', 'tanh', "
                   "'relu'} or an elementwise gpu_mlp activation ('sigmoid', 'gelu', "
                   "'relu(alpha=0.5)')")
    return act


# --- the estimators ---------------------------------------------------------------------

class _BaseMLP(BaseEstimator):
    """What both estimators share: parameters, the engine, the stochastic training loop."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10,
                 max_fun=15000, memory="auto", device="auto", dtype="float32"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun  # lbfgs's, which gpu_mlp lacks: checked, kept, unused
        self.memory = memory
        self.device = device
        self.dtype = dtype

    # --- parameters ---------------------------------------------------------------------

    def _check_params(self) -> dict:
        """The hyperparameters checked, as the training loop uses them."""
        p = dict(
            hidden=_hidden_sizes(self.hidden_layer_sizes),
            activation=_hidden_activation(self.activation),
            solver=self._solver(),
            alpha=_real("alpha", self.alpha, 0.0),
            learning_rate=_choice("learning_rate", self.learning_rate, _LEARNING_RATES),
            learning_rate_init=_real("learning_rate_init", self.learning_rate_init, 0.0,
                                     low_open=True),
            power_t=_real("power_t", self.power_t, 0.0),
            max_iter=_int("max_iter", self.max_iter),
            shuffle=_flag("shuffle", self.shuffle),
            tol=_real("tol", self.tol, 0.0),
            warm_start=_flag("warm_start", self.warm_start),
            momentum=_real("momentum", self.momentum, 0.0, 1.0),
            nesterovs_momentum=_flag("nesterovs_momentum", self.nesterovs_momentum),
            early_stopping=_flag("early_stopping", self.early_stopping),
            validation_fraction=_real("validation_fraction", self.validation_fraction, 0.0,
                                      1.0, high_open=True),
            beta_1=_real("beta_1", self.beta_1, 0.0, 1.0, high_open=True),
            beta_2=_real("beta_2", self.beta_2, 0.0, 1.0, high_open=True),
            epsilon=_real("epsilon", self.epsilon, 0.0, low_open=True),
        )
        if self.batch_size != "auto":
            _int("batch_size", self.batch_size)
        _int("max_fun", self.max_fun)
        if not (isinstance(self.n_iter_no_change, numbers.Real) and self.n_iter_no_change
                == np.inf):
            _int("n_iter_no_change", self.n_iter_no_change)
        if isinstance(self.verbose, str) or not isinstance(self.verbose, (numbers.Integral,
                                                                          np.bool_)):
            raise _bad("verbose", self.verbose, "a bool or an int")
        if self.random_state is not None and not isinstance(
                self.random_state, (numbers.Integral, np.random.RandomState)):
            raise _bad("random_state", self.random_state,
                       "an int, a numpy.random.RandomState instance or None")
        p["memory"], p["device"], p["dtype"] = self._engine_settings([p["activation"]])
        most = 2 * float(np.finfo(p["dtype"]).max)  # the L2 term's alpha / 2, in the dtype
        if p["alpha"] > most:
            raise _bad("alpha", self.alpha, f"a float in the range [0.0, {most:g}] for dtype "
                                            f"{p['dtype'].name}, whose numbers take alpha / 2")
        return p

    def _solver(self) -> str:
        if self.solver == "lbfgs":
            raise InvalidParameterError("solver='lbfgs' is not available in gpu_mlp: its "
                                        "solvers are the stochastic ones, 'sgd' and 'adam'")
        return _choice("solver", self.solver, _SOLVERS)

    def _engine_settings(self, acts):
        """``(memory, device, dtype)`` as the engine takes them, for a network of
        activations ``acts``: ``memory="auto"`` chosen, the device resolved."""
        try:
            dtype = np.dtype(self.dtype) if isinstance(self.dtype, (str, type, np.dtype)) \
                else None
        except TypeError:
            dtype = None
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise _bad("dtype", self.dtype, "'float32' or 'float64'")
        memory = _choice("memory", self.memory, ("auto",) + MEMORY_MODES)
        if memory == "auto":
            memory = ("output" if all(a.has_grad_from_output for a in acts)
                      else "recompute")
        try:
            if not isinstance(self.device, str):
                raise ValueError
            device, _ = _device.resolve(self.device)
        except ValueError:
            raise _bad("device", self.device, "'auto', 'cpu' or 'cuda'") from None
        return memory, device, dtype

    # --- the engine -----------------------------------------------------------------------

    _net = None  # the fitted engine (gpu_mlp.MLP); None before fit and after unpickling
    _model = None  # a new object for each new model (fit from scratch): whose lists are whose

    def _fitted(self) -> bool:
        return self._net is not None or getattr(self, "_host_params", None) is not None

    def __sklearn_is_fitted__(self) -> bool:
        return self._fitted()

    def _engine(self) -> MLP:
        """The fitted network, on the device, dtype and memory mode the parameters now ask
        for (moved there, with the optimizer's state, if they changed since)."""
        check_is_fitted(self)
        memory, device, dtype = self._engine_settings(
            [_activations.get(a) for a in self._arch["acts"]])
        net = self._net
        if net is not None and (net.device, net.dtype, net.memory) == (device, dtype, memory):
            return net
        # an unpickled (or copied) model computes in its host arrays where they fit, so
        # that its coefs_, views of them, stay its weights; values as they are (a model
        # whose weights are NaN copies too, as the engine's own copies)
        pairs = self._host_pairs()
        arrays = [a for pair in pairs for a in pair]
        new = MLP.from_params(pairs, self._arch["acts"], loss=self._net_loss(dtype),
                              memory=memory, device=device, dtype=dtype,
                              # (a memmap's, say: a file the fit would write into)
                              copy=net is not None or any(type(a) is not np.ndarray
                                                          for a in arrays),
                              # values checked where a cast may overflow them to inf
                              check=any(a.dtype != np.dtype(dtype) for a in arrays))
        state = getattr(self, "_optimizer_state", None)
        if getattr(self, "_optimizer", None) is not None:
            state = self._optimizer.state_dict()
        if state is not None:
            if state["state"]:
                state = dict(state, state={name: [tuple(np.asarray(a, dtype=dtype) for a in pair)
                                                  for pair in pairs]
                                           for name, pairs in state["state"].items()})
            self._optimizer = optim.from_state_dict(state)
        self._net, self._host_params, self._optimizer_state = new, None, None
        return new

    def _net_loss(self, dtype):
        """The engine's loss: a classifier's log-loss valued as scikit-learn values it,
        each probability clipped to [eps, 1 - eps] (``Loss.clipped``): the loss curve
        and the stopping rule follow scikit-learn's where a probability underflows."""
        loss = _losses.get(self._arch["loss"])
        return loss.clipped(float(np.finfo(dtype).eps)) if loss.accuracy else loss

    def _init_engine(self, layer_units, activation, loss, dtype, memory, device):
        """A new network with scikit-learn's initialisation (Glorot uniform, factor 2
        for the logistic activation, 6 else; weights then bias, layer by layer, from
        ``self._random_state``), in the engine's layout."""
        factor = 2.0 if activation.name == "sigmoid" else 6.0
        params = []
        for fan_in, fan_out in zip(layer_units[:-1], layer_units[1:]):
            bound = np.sqrt(factor / (fan_in + fan_out))
            coef = self._random_state.uniform(-bound, bound, (fan_in, fan_out))
            intercept = self._random_state.uniform(-bound, bound, fan_out)
            params.append((np.ascontiguousarray(coef.T, dtype=dtype),
                           intercept.astype(dtype)))
        acts = [activation] * (len(layer_units) - 2) + ["identity"]
        self._arch = {"sizes": list(layer_units), "acts": [str(a) for a in acts], "loss": loss}
        self._net = MLP.from_params(params, acts, loss=self._net_loss(dtype), memory=memory,
                                    device=device, dtype=dtype)
        self._host_params = None
        self._optimizer = self._optimizer_state = None
        self._model = object()

    @property
    def net_(self) -> MLP:
        """The fitted :class:`gpu_mlp.MLP` (its output layer gives logits for a
        classifier): ``net_.save(path)``, ``net_.predict(X)``, ..."""
        if not self._fitted():
            raise AttributeError("net_: this estimator is not fitted yet")
        return self._engine()

    def _host_pairs(self) -> list:
        """``[(W_k, b_k)]`` on the host, engine layout: views of a CPU net's arrays."""
        if self._net is not None:
            return [(_device.to_numpy(W), _device.to_numpy(b)) for W, b in self._net.params]
        return self._host_params

    def _host_copy(self) -> list:
        """A host copy of the parameters, ``[(W_k, b_k)]`` in the engine's layout."""
        return [(np.array(W), np.array(b)) for W, b in self._host_pairs()]

    @property
    def coefs_(self) -> list:
        """``coefs_[k]``, ``(n_in, n_out)``: the weights of layer k+1 (on the CPU a view
        of the engine's array, so writes reach the model; on a GPU a host copy)."""
        if not self._fitted():
            raise AttributeError("coefs_: this estimator is not fitted yet")
        return _ParamList([W.T for W, _ in self._host_pairs()], self, "coefs_")

    @coefs_.setter
    def coefs_(self, value) -> None:
        self._set_params_of("coefs_", value, 0)

    @property
    def intercepts_(self) -> list:
        """``intercepts_[k]``, ``(n_out,)``: the biases of layer k+1 (views on the CPU)."""
        if not self._fitted():
            raise AttributeError("intercepts_: this estimator is not fitted yet")
        return _ParamList([b for _, b in self._host_pairs()], self, "intercepts_")

    @intercepts_.setter
    def intercepts_(self, value) -> None:
        self._set_params_of("intercepts_", value, 1)

    def _set_params_of(self, name, value, which) -> None:
        if not self._fitted():
            raise AttributeError(f"{name} can only be set on a fitted estimator (its "
                                 f"architecture comes from fit)")
        pairs = self._host_pairs()
        value = list(value)
        if len(value) != len(pairs):
            raise ValueError(f"{name} must hold {len(pairs)} arrays, got {len(value)}")
        new = []
        for k, (pair, v) in enumerate(zip(pairs, value)):
            target = pair[which]
            v = np.asarray(_checks.unmasked(f"{name}[{k}]", v))
            if v.dtype.kind not in "iuf":
                raise TypeError(f"{name}[{k}] must hold real numbers, got dtype {v.dtype}")
            with np.errstate(over="ignore"):  # checked as the model holds it: 1e39 is inf
                v = (v.T if which == 0 else v).astype(target.dtype)
            if v.shape != target.shape:
                raise ValueError(f"{name}[{k}] must have shape "
                                 f"{target.T.shape if which == 0 else target.shape}, got "
                                 f"{np.shape(value[k])}")
            if not np.isfinite(v).all():
                raise ValueError(f"{name}[{k}] contains NaN or Inf in {target.dtype}, the "
                                 f"model's dtype")
            new.append(v)
        for k, v in enumerate(new):
            if self._net is None:
                self._host_params[k][which][...] = v
            else:
                _device.write(self._net.params[k][which], v)

    # --- pickling: parameters and optimizer state as NumPy ------------------------------

    def __getstate__(self):
        state = dict(super().__getstate__())
        net = state.pop("_net", None)
        if net is not None:
            net.inputs.check_params(net.params)  # (replaced by hand: what it computes with)
        if net is not None or state.get("_host_params") is not None:
            state["_host_params"] = self._host_copy()  # a copy's own (copy.copy too)
        opt = state.pop("_optimizer", None)
        if opt is not None:
            state["_optimizer_state"] = opt.state_dict()
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._net, self._optimizer = None, None

    # --- fitting ------------------------------------------------------------------------

    def fit(self, X, y):
        """Fit the model to X (n_samples, n_features) and y; returns self. No
        ``sample_weight``: scikit-learn asks ``fit``'s signature whether an estimator
        takes weights (``has_fit_parameter``), and its meta-estimators then pass them."""
        return self._fit(X, y, incremental=False)

    def _fit(self, X, y, incremental):
        p = self._check_params()
        first_pass = not self._fitted() or (not p["warm_start"] and not incremental)
        X, Y = self._validate_input(X, y, incremental, reset=first_pass)
        n_features = X.shape[1]
        layer_units = [n_features] + p["hidden"] + [Y.shape[1]]
        self._random_state = check_random_state(self.random_state)
        if first_pass:
            self._initialize(Y, layer_units, p)
        else:
            if self._arch["sizes"] != layer_units or self._arch["acts"][:-1] != \
                    [str(p["activation"])] * len(p["hidden"]):
                raise ValueError(
                    f"{'partial_fit' if incremental else 'warm_start'} continues the fitted "
                    f"network of layer sizes {self._arch['sizes']} and activations "
                    f"{self._arch['acts'][:-1]}, but the parameters and data now ask for "
                    f"{layer_units} and {str(p['activation'])!r}; fit with "
                    f"warm_start=False to start over")
            self._engine()
        self._fit_stochastic(X, Y, incremental, p)
        if not all(bool(np.isfinite(a).all()) for pair in self._host_pairs() for a in pair):
            raise ValueError("Solver produced non-finite parameter weights. The input data "
                             "may contain large values and need to be preprocessed.")
        return self

    def _initialize(self, Y, layer_units, p):
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = Y.shape[1]
        self.n_layers_ = len(layer_units)
        self.out_activation_ = self._out_activation()
        self._init_engine(layer_units, p["activation"], self._engine_loss(), p["dtype"],
                          p["memory"], p["device"])
        self._best_params = self._host_copy()
        self.loss_curve_ = []
        self._no_improvement_count = 0
        if p["early_stopping"]:
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
            self.best_loss_ = None
        else:
            self.best_loss_ = np.inf
            self.validation_scores_ = None
            self.best_validation_score_ = None

    def _loss_scale(self) -> float:
        """scikit-learn's loss over the engine's: 1, or 1/(2 d) for the squared error."""
        return 1.0

    def _grad_scale(self) -> float:
        """scikit-learn's gradient over the engine's: 1, or 1/2 for the squared error
        (scikit-learn's gradient is ``(f - y) / n``, for any number of outputs)."""
        return 1.0

    def _new_optimizer(self, p):
        """gpu_mlp.optim's SGD or Adam with scikit-learn's conventions as their public
        options: the L2 gradient ``alpha / n_batch * W`` on the weights only
        (``decay_bias=False``; the loop sets ``weight_decay`` before each batch, for its
        size) and Adam's eps added to the uncorrected ``sqrt(v)``
        (``eps_placement="uncorrected"``)."""
        c = self._grad_scale()  # the engine's gradient is scikit-learn's / c
        if p["solver"] == "sgd":
            momentum = p["momentum"]
            opt = optim.SGD(p["learning_rate_init"] * c, momentum=momentum,
                            nesterov=p["nesterovs_momentum"] and momentum > 0,
                            decay_bias=False)
        else:
            opt = optim.Adam(p["learning_rate_init"], betas=(p["beta_1"], p["beta_2"]),
                             eps=p["epsilon"] / c, decay_bias=False,
                             eps_placement="uncorrected")
        self._lr = p["learning_rate_init"]  # scikit-learn's current rate (SGD schedules)
        # the schedule goes with the optimizer, as scikit-learn's: set_params before a
        # partial_fit changes neither
        self._schedule = {name: p[name] for name in _SCHEDULE}
        return opt

    def _schedule_of(self, p) -> dict:
        """The optimizer's schedule settings (``p``'s for a model pickled before they
        were kept with it)."""
        return getattr(self, "_schedule", None) or {name: p[name] for name in _SCHEDULE}

    def _fit_stochastic(self, X, Y, incremental, p):
        if p["early_stopping"] and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        if not incremental or getattr(self, "_optimizer", None) is None:
            self._optimizer = self._new_optimizer(p)
        opt, net = self._optimizer, self._net
        early_stopping = p["early_stopping"]
        if early_stopping:
            stratify = Y if self._stratify() and self.n_outputs_ == 1 else None
            X_train, X_val, Y_train, Y_val = train_test_split(
                X, Y, random_state=self._random_state, test_size=p["validation_fraction"],
                stratify=stratify)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase "
                                 "'validation_fraction' or the size of your dataset.")
            y_val = self._validation_targets(Y_val)
        else:
            X_train, Y_train, X_val, y_val = X, Y, None, None

        n = X_train.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n)
        else:
            if self.batch_size > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It "
                              "is going to be clipped")
            batch_size = int(np.clip(self.batch_size, 1, n))

        # (partial_fit's rows, new at each call, stay on the host: see _Rows)
        data = _Rows(X_train, self._engine_targets(Y_train, net.dtype), net,
                     resident=not incremental)
        c = self._grad_scale()
        alpha = p["alpha"]
        # the epoch's loss, summed by the steps on the device (in a step's CUDA graph
        # too): each batch's mean times its rows, and scikit-learn's L2 term --
        # alpha / (2 n_batch) sum ||W||^2 in a batch's mean, so alpha / 2 sum ||W||^2
        tally = net.step_graphs.tally(net, weight=self._loss_scale(), penalty=0.5 * alpha)
        sample_idx = np.arange(n)
        n_iter_no_change = self.n_iter_no_change
        plan = StepPlan(opt)  # the optimizer's step, one plan for the fit (no DP, no comm)
        # NOTE: an epoch loop of its own, not gpu_mlp.training.fit: scikit-learn's shuffles
        # (from random_state), its L2 term (per batch, in the loss curve too), its stopping
        # rule (tol, n_iter_no_change, early_stopping's validation score and best
        # parameters), its SGD rate schedules, partial_fit's one epoch and its warnings.
        # Each step is the engine's, by the plan, as fit's: a shuffled batch gathered
        # from the device-resident rows by the step (inside its graph, when replayed)
        try:
            self.n_iter_ = 0
            for _ in range(p["max_iter"]):
                if p["shuffle"]:
                    sample_idx = _shuffle(sample_idx, random_state=self._random_state)
                # (partial_fit's rows are new at each call: gathered outside the graph,
                # whose key then holds no data, the calls replay one graph)
                batches = data.epoch(sample_idx if p["shuffle"] else None,
                                     in_graph=not incremental)
                tally.reset()
                for batch in gen_batches(n, batch_size):
                    rows = batch.stop - batch.start
                    # scikit-learn's L2 gradient, alpha W / n_batch: the engine's times c
                    opt.weight_decay = alpha / (rows * c)
                    X_batch, Y_batch, gathered = batches(batch)
                    net._step(X_batch, Y_batch, plan, False, lasting=False,
                              prepared=data.resident, gathered=gathered, tally=tally)
                self.n_iter_ += 1
                self.loss_ = tally.total() / n
                self.t_ += n
                self.loss_curve_.append(self.loss_)
                if self.verbose:
                    print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
                if not math.isfinite(self.loss_):
                    raise ValueError("Solver produced non-finite parameter weights. The "
                                     "input data may contain large values and need to be "
                                     "preprocessed.")
                self._update_no_improvement_count(early_stopping, X_val, y_val)
                schedule = self._schedule_of(p)
                if schedule["solver"] == "sgd" and schedule["learning_rate"] == "invscaling":
                    self._set_lr(schedule["learning_rate_init"]
                                 / (self.t_ + 1) ** schedule["power_t"])
                if self._no_improvement_count > n_iter_no_change:
                    what = ("Validation score" if early_stopping else "Training loss")
                    msg = (f"{what} did not improve more than tol={self.tol:f} for "
                           f"{n_iter_no_change} consecutive epochs.")
                    if self._trigger_stopping(msg, p):
                        break
                    self._no_improvement_count = 0
                if incremental:
                    break
                if self.n_iter_ == p["max_iter"]:
                    warnings.warn(f"Stochastic Optimizer: Maximum iterations "
                                  f"({p['max_iter']}) reached and the optimization hasn't "
                                  f"converged yet.", ConvergenceWarning)
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.")
        finally:  # the graphs that gather from the rows would keep them on the device
            net.step_graphs.forget(data.source)
        if early_stopping and self._best_params is not None:
            for (W, b), (W_best, b_best) in zip(net.params, self._best_params):
                _device.write(W, W_best)
                _device.write(b, b_best)

    def _set_lr(self, lr) -> None:
        """A new SGD rate. scikit-learn's velocity is ``-lr`` times PyTorch's momentum
        buffer, with the rate of the step that made it: rescaling the buffers by
        ``old / new`` keeps the iterates scikit-learn's across the change."""
        opt = self._optimizer
        opt.scale_momentum(self._lr / lr)
        self._lr = lr
        opt.lr = lr * self._grad_scale()

    def _trigger_stopping(self, msg, p) -> bool:
        """scikit-learn's: stop, or (SGD, ``learning_rate="adaptive"``) divide the rate
        by 5 while it is above 1e-6."""
        schedule = self._schedule_of(p)
        if schedule["solver"] != "sgd" or schedule["learning_rate"] != "adaptive":
            if self.verbose:
                print(msg + " Stopping.")
            return True
        if self._lr <= 1e-6:
            if self.verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        self._set_lr(self._lr / 5.0)
        if self.verbose:
            print(msg + " Setting learning rate to %f" % self._lr)
        return False

    def _update_no_improvement_count(self, early_stopping, X_val, y_val) -> None:
        if early_stopping:
            score = self._validation_score(X_val, y_val)
            self.validation_scores_.append(score)
            if self.verbose:
                print("Validation score: %f" % score)
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_params = self._host_copy()
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    def _validation_score(self, X, y) -> float:
        out = self._predict_raw(X)
        if not np.isfinite(out).all():
            return np.nan
        return self._score_function(y, self._from_raw(out))

    # --- predicting -----------------------------------------------------------------------

    def _predict_raw(self, X):
        """The network's outputs for validated X, as float64 NumPy."""
        net = self._engine()
        if (X.data if sp.issparse(X) else X).size and X.dtype.itemsize > net.dtype.itemsize:
            values = X.data if sp.issparse(X) else X
            _fits_dtype("X", [values.min(), values.max()], net.dtype)
        if sp.issparse(X):
            rows = max(1, (64 << 20) // (8 * max(sum(self._arch["sizes"]), 1)))
            X = X.tocsr()
            return np.concatenate([_device.to_numpy(net.predict(X[i:i + rows].toarray()))
                                   for i in range(0, X.shape[0], rows)]).astype(np.float64)
        return _device.to_numpy(net.predict(X)).astype(np.float64, copy=False)

    def _forward(self, X):
        """``(outputs, dtype)``: the network's outputs for X, float64, and X's float
        dtype (that of the results)."""
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse=["csr", "csc"], dtype=(np.float64, np.float32),
                          reset=False)
        return self._predict_raw(X), X.dtype

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # densified one batch at a time
        return tags


def _no_sample_weight(sample_weight) -> None:
    if sample_weight is not None:
        raise TypeError("sample_weight is not offered by gpu_mlp's estimators (every sample "
                        "weighs 1); pass None. It is partial_fit's third argument, as in "
                        "scikit-learn: pass classes= by name")


def _fits_dtype(name: str, values, dtype) -> None:
    """A ValueError if ``values``, finite (checked before), overflow in the model's
    ``dtype``: float64 values past float32's range."""
    with np.errstate(over="ignore", invalid="ignore"):
        fits = np.isfinite(np.asarray(values).astype(dtype, copy=False)).all()
    if not fits:
        raise ValueError(f"{name} holds values too large for {np.dtype(dtype).name}; scale "
                         f"them or use dtype='float64'")


class _Rows:
    """The training rows in ``net``'s dtype, checked as the engine computes with them,
    and their targets ``Y`` (host arrays, as given). ``resident``: dense rows are copied
    to the net's device once, and each batch is a view of them or gathered from them
    there (fit's); else (partial_fit's, whose rows come once: one copy whatever happens)
    they stay on the host, as a sparse matrix does, and each batch goes to the device
    with its step -- on a GPU into the buffers its CUDA graph reads
    (:meth:`gpu_mlp.workspace.Workspace.staged`)."""

    def __init__(self, X, Y, net, resident: bool = True):
        xp, dtype = net.xp, net.dtype
        self.sparse = sp.issparse(X)
        # (on the CPU the host is the device: its rows are always "resident")
        self.resident = not self.sparse and (resident or xp is np)
        self.xp = xp if self.resident else np  # where the batches are
        if self.sparse:
            self.data = X.tocsr().astype(dtype)
            values = self.data.data
        else:
            with np.errstate(over="ignore"):
                values = np.ascontiguousarray(X, dtype=dtype)
            self.data = _device.to_device(values, self.xp)
            if self.xp is xp and any(xp.may_share_memory(self.data, a) for pair in net.params
                                     for a in pair):
                self.data = self.data.copy()  # (X = coefs_[0].T, say: the fit updates it)
        _fits_dtype("X", values, dtype)
        self.Y = _device.to_device(Y, self.xp)
        self._gather = None
        if self.resident:  # the shapes once, for every batch's step (prepared=True)
            self.data, self.Y, _ = net.inputs.batch(net.params, self.data, self.Y,
                                                    check=False)
            # a shuffled epoch's batches, gathered by index (by the step) into buffers
            self._gather = BatchGather(xp, self.data, self.Y)

    @property
    def source(self) -> tuple:
        """What a step's graph gathers from (gpu_mlp.graph.StepGraphs.forget)."""
        return self.data, self.Y

    def epoch(self, order, in_graph: bool = True):
        """A function of a slice giving ``(X, Y, gathered)`` of that batch of these rows
        in ``order`` (None: as they are): rows kept on the host, as host arrays (gathered
        None); resident ones, on the device: views of them (gathered None),
        or in a shuffled order two batch-sized buffers (gpu_mlp.training's, each batch
        overwriting the last) -- not a shuffled copy of the data -- and, ``in_graph``,
        the :class:`gpu_mlp.graph.Gathered` the step fills them with (a captured step
        then gathers inside its graph, which is kept for these rows alone; on a GPU
        through the gather's cursor, which the steps move on: the batches must come in
        order, as gen_batches gives them), else gathered already (None)."""
        xp, Y = self.xp, self.Y
        if self.sparse:
            data = self.data if order is None else self.data[order]
            Y = Y if order is None else Y[order]
            return lambda batch: (data[batch].toarray(), Y[batch], None)
        if order is None:
            return lambda batch: (self.data[batch], Y[batch], None)
        if not self.resident:  # on the host: the batch's rows copied there
            return lambda batch: (self.data[order[batch]], Y[order[batch]], None)
        if in_graph and xp is not np:  # a GPU's: the order on the device, read by the steps
            cursor = self._gather.restart(order)
            return lambda batch: self._gather.later(cursor, batch.stop - batch.start)
        order = xp.asarray(order)
        if not in_graph:
            return lambda batch: (*self._gather(order[batch]), None)
        return lambda batch: self._gather.later(order[batch])


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier (log-loss) trained by gpu_mlp's engine.

    ``sklearn.neural_network.MLPClassifier``'s parameters, attributes and methods (the
    solvers ``"sgd"`` and ``"adam"``; no ``sample_weight``), plus ``memory``, ``device``
    and ``dtype``; see :mod:`gpu_mlp.sklearn`. Binary and multilabel targets train a
    logistic output (the engine's ``logistic`` loss), multiclass ones a softmax
    (``softmax_cross_entropy`` on class indices).

    Attributes: ``classes_``, ``loss_``, ``best_loss_``, ``loss_curve_``,
    ``validation_scores_``, ``best_validation_score_``, ``t_``, ``coefs_``,
    ``intercepts_``, ``n_features_in_``, ``feature_names_in_``, ``n_iter_``,
    ``n_layers_``, ``n_outputs_``, ``out_activation_``, and ``net_`` (the engine).
    """

    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y), continuing the fit; ``classes`` (all the labels) is
        needed on the first call. ``sample_weight`` (scikit-learn's third argument) is
        not offered: None only."""
        _no_sample_weight(sample_weight)
        if getattr(self, "classes_", None) is None and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        if classes is not None:
            if getattr(self, "classes_", None) is not None:
                if not np.array_equal(self.classes_, unique_labels(classes)):
                    raise ValueError(f"`classes={classes!r}` is not the same as on last call "
                                     f"to partial_fit, was: {self.classes_!r}")
            else:
                binarizer = LabelBinarizer()
                if type_of_target(y).startswith("multilabel"):
                    binarizer.fit(y)  # the classes are the columns: classes must say so
                    if not np.array_equal(binarizer.classes_, unique_labels(classes)):
                        raise ValueError(f"`y` has classes not in `self.classes_`. "
                                         f"`self.classes_` has {unique_labels(classes)}. "
                                         f"'y' has {binarizer.classes_}.")  # (theirs)
                else:
                    binarizer.fit(unique_labels(classes))
                self._label_binarizer, self.classes_ = binarizer, binarizer.classes_
        return self._fit(X, y, incremental=True)

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start and not incremental:
                if set(classes) != set(self.classes_):
                    raise ValueError(f"warm_start can only be used where `y` has the same "
                                     f"classes as in the previous call to fit. Previously "
                                     f"got {self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` "
                                 f"has {self.classes_}. 'y' has {classes}.")
        return X, self._label_binarizer.transform(y).astype(bool)

    def _multiclass(self) -> bool:
        return self._label_binarizer.y_type_ == "multiclass"

    def _out_activation(self) -> str:
        return "softmax" if self._multiclass() else "logistic"

    def _engine_loss(self) -> str:
        return "softmax_cross_entropy" if self._multiclass() else "logistic"

    def _engine_targets(self, Y, dtype):
        if self._multiclass():
            return Y.argmax(axis=1).astype(np.int64)  # class indices: no one-hot copy
        return np.where(Y, 1, -1).astype(dtype)       # the logistic loss's +-1 labels

    def _stratify(self) -> bool:
        return True

    def _validation_targets(self, Y):
        return self._label_binarizer.inverse_transform(Y)

    def _score_function(self, y, y_pred):
        return accuracy_score(y, y_pred)

    def _probabilities(self, out):
        if self._multiclass():
            return _softmax(out, axis=1)
        return expit(out)

    def _from_raw(self, out):
        p = self._probabilities(out)
        return self._label_binarizer.inverse_transform(p.ravel() if p.shape[1] == 1 else p)

    def predict(self, X):
        """The predicted classes, (n_samples,) (or (n_samples, n_labels) for multilabel)."""
        out, _ = self._forward(X)
        return self._from_raw(out)

    def predict_proba(self, X):
        """Class probabilities, (n_samples, n_classes), columns in ``classes_`` order."""
        out, dtype = self._forward(X)
        p = self._probabilities(out)
        if p.shape[1] == 1 and self._label_binarizer.y_type_ != "multilabel-indicator":
            p = np.hstack([1 - p, p])
        return p.astype(dtype, copy=False)

    def predict_log_proba(self, X):
        """``log(predict_proba(X))``."""
        p = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(p, out=p)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor (half squared error) trained by gpu_mlp's engine.

    ``sklearn.neural_network.MLPRegressor``'s parameters, attributes and methods (the
    solvers ``"sgd"`` and ``"adam"``, ``loss="squared_error"``; no ``sample_weight``),
    plus ``memory``, ``device`` and ``dtype``; see :mod:`gpu_mlp.sklearn`. y may have
    several columns (multi-output).

    The engine's squared loss is ``||f - y||^2`` per sample, ``2 d`` times scikit-learn's
    ``||f - y||^2 / (2 d)`` for d outputs, and its gradient ``2 (f - y)``, twice
    scikit-learn's (which uses ``f - y`` whatever d); the SGD rate, Adam's epsilon and the
    L2 term are scaled to match, so the iterates are scikit-learn's and ``loss_curve_`` is
    in its units.
    """

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10,
                 max_fun=15000, memory="auto", device="auto", dtype="float32"):
        super().__init__(
            hidden_layer_sizes=hidden_layer_sizes, activation=activation, solver=solver,
            alpha=alpha, batch_size=batch_size, learning_rate=learning_rate,
            learning_rate_init=learning_rate_init, power_t=power_t, max_iter=max_iter,
            shuffle=shuffle, random_state=random_state, tol=tol, verbose=verbose,
            warm_start=warm_start, momentum=momentum, nesterovs_momentum=nesterovs_momentum,
            early_stopping=early_stopping, validation_fraction=validation_fraction,
            beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, n_iter_no_change=n_iter_no_change,
            max_fun=max_fun, memory=memory, device=device, dtype=dtype)
        self.loss = loss

    def _check_params(self) -> dict:
        if self.loss == "poisson":
            raise InvalidParameterError("loss='poisson' is not available in gpu_mlp; its "
                                        "regressor fits the squared error")
        if not isinstance(self.loss, str):
            raise InvalidParameterError(
                f"The 'loss' parameter must be 'squared_error'. Got {self.loss!r} instead: "
                f"loss is MLPRegressor's first positional argument, as in scikit-learn; "
                f"pass hidden_layer_sizes={self.loss!r} by name")
        _choice("loss", self.loss, ("squared_error",))
        return super()._check_params()

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y), continuing the fit. ``sample_weight`` (scikit-learn's
        third argument) is not offered: None only."""
        _no_sample_weight(sample_weight)
        return self._fit(X, y, incremental=True)

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             y_numeric=True, dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, (y.reshape(-1, 1) if y.ndim == 1 else y)

    def _out_activation(self) -> str:
        return "identity"

    def _engine_loss(self) -> str:
        return "squared"

    def _loss_scale(self) -> float:
        return 1.0 / (2 * self._arch["sizes"][-1])

    def _grad_scale(self) -> float:
        return 0.5

    def _engine_targets(self, Y, dtype):
        with np.errstate(over="ignore"):
            Y = np.ascontiguousarray(Y, dtype=dtype)
        _fits_dtype("y", Y, dtype)
        return Y

    def _stratify(self) -> bool:
        return False

    def _validation_targets(self, Y):
        return Y

    def _score_function(self, y, y_pred):
        return r2_score(y, y_pred)

    def _from_raw(self, out):
        return out.ravel() if out.shape[1] == 1 else out

    def predict(self, X):
        """The predicted values, (n_samples,) or (n_samples, n_outputs)."""
        out, dtype = self._forward(X)
        return self._from_raw(out).astype(dtype, copy=False)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True  # y with several columns
        return tags
