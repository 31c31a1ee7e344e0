"""gpu_mlp.training: fit, evaluate and History.

fit is specified against a plain loop of ``train_step`` calls over the batches that the
documented order gives (``default_rng([seed, epoch]).permutation``); its metrics against
values computed here from the reference forward pass.
"""

import doctest
import io
import json
import sys
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp

import gpu_mlp
from gpu_mlp import checkpoint, datasets, optim, privacy, reference, training
from gpu_mlp.training import History

needs_gpu = pytest.mark.gpu  # skipped without a GPU by conftest


@pytest.fixture(scope="module")
def digits():
    X, y = datasets.digits()
    return datasets.train_test_split(X[:400], y[:400], test_fraction=0.25, seed=0)


def problem(loss, n=120, seed=0):
    """(sizes, X, Y) for a small task under ``loss``."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5))
    if loss == "softmax_cross_entropy":
        return [5, 8, 3], X, np.argmax(X[:, :3], axis=1)
    if loss == "logistic":
        return [5, 8, 1], X, np.where(X[:, :1] > 0, 1.0, -1.0)
    return [5, 8, 2], X, np.column_stack([np.sin(X[:, 0]), X[:, 1] * X[:, 2]])


def new_net(sizes, loss="softmax_cross_entropy", dtype="float64", **kwargs):
    return gpu_mlp.MLP(sizes, activations="tanh", loss=loss, device="cpu", dtype=dtype,
                       seed=1, **kwargs)


def params_of(net):
    return [(W.copy(), b.copy()) for W, b in net.params]


def same_params(a, b):
    return all(np.array_equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def fit_quietly(net, X, Y, **kwargs):
    return net.fit(X, Y, verbose=False, **kwargs)


# --- what fit computes ------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "logistic", "squared"])
@pytest.mark.parametrize("batch_size, shuffle", [(32, True), (7, True), (50, False)])
def test_fit_is_the_documented_sgd_loop(loss, batch_size, shuffle):
    sizes, X, Y = problem(loss)
    net, manual = new_net(sizes, loss), new_net(sizes, loss)
    history = fit_quietly(net, X, Y, epochs=3, batch_size=batch_size, lr=0.05,
                          shuffle=shuffle, seed=5)

    for epoch in range(3):
        order = (np.random.default_rng([5, epoch]).permutation(len(X)) if shuffle
                 else np.arange(len(X)))
        total = 0.0
        for first in range(0, len(X), batch_size):
            rows = order[first:first + batch_size]
            total += float(manual.train_step(X[rows], Y[rows], lr=0.05)) * len(rows)
        assert history.train_loss[epoch] == pytest.approx(total / len(X), rel=1e-12)
    assert same_params(net.params, manual.params)


def test_fit_learns_the_digits(digits):
    X_train, X_test, y_train, y_test = digits
    net = gpu_mlp.MLP([64, 32, 10], loss="softmax_cross_entropy", device="cpu", seed=0)
    history = fit_quietly(net, X_train, y_train, epochs=10, batch_size=16, lr=0.1,
                          validation=(X_test, y_test))
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.val_accuracy[-1] >= 0.9


def test_history_records_every_epoch():
    sizes, X, Y = problem("squared")
    history = fit_quietly(new_net(sizes, "squared"), X, Y, epochs=3, batch_size=16, lr=0.02,
                          seed=4, validation=(X[:30], Y[:30]))
    assert (history.epochs, history.seed, history.batch_size, history.shuffle,
            history.samples) == (3, 4, 16, True, len(X))
    assert history.lr == [0.02] * 3
    assert all(s > 0 for s in history.seconds)
    assert all(v is not None for v in history.val_loss)
    assert history.val_accuracy == [None] * 3  # no accuracy for the squared loss
    as_json = json.loads(json.dumps(history.as_dict()))
    assert History.from_dict(as_json) == history


def test_history_without_validation_holds_none():
    sizes, X, Y = problem("softmax_cross_entropy")
    history = fit_quietly(new_net(sizes), X, Y, epochs=2)
    assert history.val_loss == history.val_accuracy == [None, None]


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("seed"), "entries"),
    (lambda d: d.update(extra=1), "entries"),
    (lambda d: d.update(batch_size=-1), "batch_size"),
    (lambda d: d.update(seed=1.5), "seed"),
    (lambda d: d.update(shuffle="yes"), "shuffle"),
    (lambda d: d.update(lr=[0.1]), "lr"),
    (lambda d: d.update(train_loss="x"), "train_loss"),
    (lambda d: d.update(seconds=[1.0, "x"]), "seconds"),
    (lambda d: d.update(val_loss=[None, "x"]), "val_loss"),
])
def test_history_from_dict_says_what_is_wrong(change, match):
    d = History(seed=0, batch_size=8, shuffle=True, samples=10, lr=[0.1, 0.1],
                train_loss=[1.0, 0.5], val_loss=[None, None], val_accuracy=[None, None],
                seconds=[0.1, 0.1]).as_dict()
    History.from_dict(d)
    change(d)
    with pytest.raises(ValueError, match=match):
        History.from_dict(d)


def oracle_metrics(net, loss, X, Y):
    """(mean loss, accuracy) from the reference forward pass and textbook formulas."""
    params = [(np.asarray(W), np.asarray(b)) for W, b in net.params]
    F = reference.forward(params, [str(a) for a in net.activations], X)
    if loss == "softmax_cross_entropy":
        return (np.mean(logsumexp(F, axis=1) - F[np.arange(len(Y)), Y]),
                np.mean(F.argmax(axis=1) == Y))
    if loss == "logistic":
        return np.mean(np.logaddexp(0, -Y * F).sum(axis=1)), np.mean(np.sign(F) == Y)
    return np.mean(((F - Y) ** 2).sum(axis=1)), None


@pytest.mark.parametrize("predict_bytes", [64 << 20, 1])  # one forward pass, or a row each
@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "logistic", "squared"])
def test_validation_metrics_match_the_oracle(loss, predict_bytes, monkeypatch):
    monkeypatch.setattr(gpu_mlp.network, "PREDICT_BUFFER_BYTES", predict_bytes)
    sizes, X, Y = problem(loss)
    X_val, Y_val = X[:40], Y[:40]
    net = new_net(sizes, loss)
    history = fit_quietly(net, X[40:], Y[40:], epochs=2, lr=0.05, validation=(X_val, Y_val))
    val_loss, val_accuracy = oracle_metrics(net, loss, X_val, Y_val)
    assert history.val_loss[-1] == pytest.approx(val_loss, rel=1e-12)
    assert training.evaluate(net, X_val, Y_val)[0] == pytest.approx(val_loss, rel=1e-12)
    if val_accuracy is None:
        assert history.val_accuracy[-1] is None
    else:
        assert history.val_accuracy[-1] == pytest.approx(val_accuracy, rel=1e-12)


def test_accuracy_from_probability_rows():
    sizes, X, y = problem("softmax_cross_entropy")
    net = new_net(sizes)
    _, labels_accuracy = training.evaluate(net, X, y)
    _, rows_accuracy = training.evaluate(net, X, np.eye(3)[y])
    assert rows_accuracy == labels_accuracy == pytest.approx(
        oracle_metrics(net, "softmax_cross_entropy", X, y)[1])


def test_on_epoch_sees_each_finished_epoch():
    sizes, X, Y = problem("softmax_cross_entropy")
    seen = []
    net = new_net(sizes)
    fit_quietly(net, X, Y, epochs=3,
                on_epoch=lambda n, h: seen.append((n is net, h.epochs, h.train_loss[-1])))
    assert [(same, epochs) for same, epochs, _ in seen] == [(True, 1), (True, 2), (True, 3)]


def test_divergence_stops_with_a_clear_error():
    sizes, X, Y = problem("squared")
    net = gpu_mlp.MLP(sizes, activations="relu", loss="squared", device="cpu")
    with np.errstate(all="ignore"), pytest.raises(RuntimeError, match="diverged in epoch"):
        fit_quietly(net, X, Y, epochs=3, lr=10.0)
    assert all(np.isfinite(a).all() for pair in net.params for a in pair)


def test_divergence_stops_at_once_and_restores_the_last_good_epoch(monkeypatch):
    # steps 1-25 are fine (epochs 1-2 of 10 steps each); step 26 turns everything to NaN
    sizes, X, Y = problem("softmax_cross_entropy", n=100)
    net = new_net(sizes)
    steps, after_epoch = [], {}
    train_step = net._step  # what fit steps with

    def step(*args, **kwargs):
        steps.append(len(steps) + 1)
        if len(steps) == 26:
            for W, b in net.params:
                W[...] = np.nan
        return train_step(*args, **kwargs)

    monkeypatch.setattr(net, "_step", step)
    with np.errstate(all="ignore"), pytest.raises(training.TrainingDiverged) as error:
        fit_quietly(net, X, Y, epochs=5, batch_size=10, lr=0.1,
                    on_epoch=lambda n, h: after_epoch.update({h.epochs: params_of(n)}))
    assert "diverged in epoch 3" in str(error.value)
    assert "parameters are those after epoch 2" in str(error.value)
    assert len(steps) == 26  # not one step more
    assert error.value.history.epochs == 2 and len(error.value.history.val_loss) == 2
    for (W, b), (W2, b2) in zip(net.params, after_epoch[2]):
        assert np.array_equal(W, W2) and np.array_equal(b, b2)


def test_divergence_in_the_first_epoch_restores_the_initial_parameters():
    sizes, X, Y = problem("squared")
    net = gpu_mlp.MLP(sizes, activations="relu", loss="squared", device="cpu")
    initial = params_of(net)
    with np.errstate(all="ignore"), pytest.raises(training.TrainingDiverged) as error:
        fit_quietly(net, X, Y, epochs=3, lr=1e6)
    assert error.value.history.epochs == 0
    for (W, b), (W0, b0) in zip(net.params, initial):
        assert np.array_equal(W, W0) and np.array_equal(b, b0)


def test_a_rising_loss_is_reported():
    sizes, X, Y = problem("softmax_cross_entropy")
    with pytest.warns(training.TrainingWarning, match="training loss rose from .* first step"):
        fit_quietly(new_net(sizes), X, Y, epochs=3, lr=1e4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run that learns says nothing
        fit_quietly(new_net(sizes), X, Y, epochs=3, lr=0.1)
    # said at the caller's line, through either entry point (Network.fit's pointed into
    # gpu_mlp/network.py)
    for fit in (lambda: new_net(sizes).fit(X, Y, epochs=3, lr=1e4, verbose=False),
                lambda: training.fit(new_net(sizes), X, Y, epochs=3, lr=1e4, verbose=False)):
        with pytest.warns(training.TrainingWarning) as said:
            fit()
        assert [w.filename for w in said] == [__file__]


def test_bad_validation_data_is_named_so():
    """The checks of (X_val, Y_val) said "X contains NaN or Inf" of a training X that had
    none."""
    sizes, X, Y = problem("softmax_cross_entropy")
    net, bad = new_net(sizes), X[:10].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^validation data, the pair \(X_val, Y_val\): X "
                                         r"contains NaN or Inf"):
        fit_quietly(net, X, Y, epochs=1, validation=(bad, Y[:10]))
    with pytest.raises(ValueError, match=r"^validation data, .*: X must have shape"):
        fit_quietly(net, X, Y, epochs=1, validation=(X[:10, :-1], Y[:10]))
    with pytest.raises(ValueError, match="^X contains NaN or Inf"):  # the training data's
        fit_quietly(net, bad, Y[:10], epochs=1)


# --- resuming ----------------------------------------------------------------------------

def test_resume_continues_bit_for_bit():
    sizes, X, Y = problem("softmax_cross_entropy")
    settings = dict(batch_size=16, lr=0.05, seed=3, validation=(X[:20], Y[:20]))
    straight = new_net(sizes, dtype="float32")
    full = fit_quietly(straight, X, Y, epochs=5, **settings)

    resumed = new_net(sizes, dtype="float32")
    first = fit_quietly(resumed, X, Y, epochs=2, **settings)
    first_dict = first.as_dict()
    rest = fit_quietly(resumed, X, Y, epochs=5, resume=first, **settings)

    assert same_params(straight.params, resumed.params)
    assert first.as_dict() == first_dict  # the history resumed from is left alone
    for name in ("train_loss", "val_loss", "val_accuracy", "lr"):
        assert getattr(rest, name) == getattr(full, name)


def test_resume_when_done_changes_nothing():
    sizes, X, Y = problem("softmax_cross_entropy")
    net = new_net(sizes)
    history = fit_quietly(net, X, Y, epochs=2)
    before = params_of(net)
    assert fit_quietly(net, X, Y, epochs=2, resume=history) == history
    assert same_params(before, net.params)


@pytest.mark.parametrize("change, match", [
    ({"seed": 1}, "seed=0 \\(now 1\\)"),
    ({"batch_size": 16}, "batch_size=32 \\(now 16\\)"),
    ({"shuffle": False}, "shuffle=True \\(now False\\)"),
    ({"rows": 100}, "samples=120 \\(now 100\\)"),
    ({"epochs": 1}, "2 epochs are done"),
    ({"resume": {"epochs": 2}}, "must be a History"),
])
def test_resume_refuses_another_run(change, match):
    sizes, X, Y = problem("softmax_cross_entropy")
    net = new_net(sizes)
    history = fit_quietly(net, X, Y, epochs=2)
    before = params_of(net)
    kwargs = {"epochs": 4, "resume": history, **change}
    rows = kwargs.pop("rows", len(X))
    with pytest.raises((ValueError, TypeError), match=match):
        fit_quietly(net, X[:rows], Y[:rows], **kwargs)
    assert same_params(before, net.params)


# --- bad input ---------------------------------------------------------------------------

X_WITH_NAN = problem("softmax_cross_entropy")[1].copy()
X_WITH_NAN[3, 1] = np.nan


@pytest.mark.parametrize("kwargs, error, match", [
    ({"epochs": 0}, ValueError, "epochs must be an integer >= 1"),
    ({"epochs": 2.5}, TypeError, "epochs must be an integer"),
    ({"epochs": True}, TypeError, "epochs must be an integer"),
    ({"batch_size": 0}, ValueError, r"batch_size must be in \[1, 2\^64\), got 0"),
    # past what a History (a checkpoint's) holds: it would not read back
    ({"batch_size": 2**64}, ValueError, r"batch_size must be in \[1, 2\^64\)"),
    ({"batch_size": "8"}, TypeError, "batch_size must be an integer"),
    ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
    ({"lr": -0.1}, ValueError, "lr must be a finite number > 0"),
    ({"lr": float("nan")}, ValueError, "lr must be a finite number > 0"),
    ({"lr": "fast"}, TypeError, "lr must be a number"),
    ({"seed": -1}, ValueError, r"seed must be in \[0, 2\^64\), got -1"),
    ({"seed": 2**64}, ValueError, r"seed must be in \[0, 2\^64\)"),
    ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ({"shuffle": "yes"}, TypeError, "shuffle must be True or False"),
    ({"verbose": None}, TypeError, "verbose must be True or False"),
    ({"on_epoch": "save"}, TypeError, "on_epoch must be callable"),
    ({"validation": ([1.0],)}, TypeError, "validation must be a pair"),
    ({"validation": (np.zeros((4, 3)), np.zeros(4, dtype=int))}, ValueError, "X must have shape"),
    ({"validation": (np.zeros((4, 5)), np.full(4, 3))}, ValueError, "labels must lie in"),
    ({"X": np.zeros(5)}, ValueError, "X must be a \\(samples, ...\\) array"),
    ({"X": np.zeros((0, 5))}, ValueError, "at least one sample"),
    ({"X": np.zeros((120, 4))}, ValueError, "X must have shape"),
    ({"X": X_WITH_NAN}, ValueError, "X contains NaN"),
    ({"Y": np.zeros(119, dtype=int)}, ValueError, "labels must have shape \\(120,\\)"),
    ({"Y": np.full(120, 3)}, ValueError, "labels must lie in \\[0, 3\\)"),
    ({"Y": np.zeros(120, dtype=bool)}, TypeError, "not booleans"),
])
def test_bad_arguments_raise_before_anything_changes(kwargs, error, match):
    sizes, X, Y = problem("softmax_cross_entropy")
    net = new_net(sizes)
    before = params_of(net)
    kwargs = {"X": X, "Y": Y, "epochs": 1, "verbose": False, **kwargs}
    with pytest.raises(error, match=match):
        net.fit(**kwargs)
    assert same_params(before, net.params)


# --- how fit runs -----------------------------------------------------------------------

class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("verbose, terminal, shown", [
    (True, True, True), (False, True, False), (True, False, False)])
def test_progress_bar_only_on_a_terminal_when_verbose(verbose, terminal, shown, monkeypatch):
    stderr = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    sizes, X, Y = problem("softmax_cross_entropy")
    new_net(sizes).fit(X, Y, epochs=2, verbose=verbose, validation=(X[:10], Y[:10]))
    text = stderr.getvalue()
    if shown:
        for part in ("epoch 1/2", "epoch 2/2", "samples/s", "loss=", "val_loss=", "val_acc="):
            assert part in text
    else:
        assert text == ""


def test_step_losses_are_summed_by_the_steps_and_read_once_per_epoch(monkeypatch):
    from gpu_mlp.plan import LossTally

    reads, added = [], []
    total, add = LossTally.total, LossTally.add
    monkeypatch.setattr(LossTally, "total", lambda self: reads.append(1) or total(self))
    monkeypatch.setattr(LossTally, "add", lambda self, J, rows: (
        added.append(rows), add(self, J, rows))[1])
    sizes, X, Y = problem("softmax_cross_entropy")
    net = new_net(sizes)
    history = fit_quietly(net, X, Y, epochs=3, batch_size=8)  # 15 steps an epoch
    assert added == ([8] * 14 + [X.shape[0] - 14 * 8]) * 3
    assert reads == [1] * 3  # (the parameters are copied to the host once an epoch too)
    # the epoch's mean: each step's loss weighted by its rows, as the steps gave them
    net, losses = new_net(sizes), []
    step = net._step
    monkeypatch.setattr(net, "_step", lambda *a, **k: (losses.append(
        (float(J := step(*a, **k)), a[0].shape[0])), J)[1])
    fit_quietly(net, X, Y, epochs=1, batch_size=8)
    expected = sum(J * rows for J, rows in losses) / X.shape[0]
    assert history.train_loss[0] == pytest.approx(expected, rel=1e-12)


def test_the_data_is_checked_once_not_at_every_step(monkeypatch):
    """fit checks X and Y whole (shapes, dtype, values) before its first step; its
    batches are rows of that checked data, so a step checks only the parameters."""
    sizes, X, Y = problem("softmax_cross_entropy")
    net = new_net(sizes)
    checked, params_checked = [], []
    batch, check_params = net.inputs.batch, net.inputs.check_params
    monkeypatch.setattr(net.inputs, "batch", lambda *a, **k: checked.append(1) or batch(*a, **k))
    monkeypatch.setattr(net.inputs, "check_params",
                        lambda *a, **k: params_checked.append(1) or check_params(*a, **k))
    fit_quietly(net, X, Y, epochs=2, batch_size=40)  # 3 steps an epoch
    assert len(checked) == 1 and len(params_checked) == 1 + 6

@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_batches_are_views_of_the_data_when_not_shuffled(monkeypatch, library):
    # float32, C-ordered input on the CPU: no copy of X anywhere, each batch a slice
    sizes, X, Y = problem("softmax_cross_entropy")
    X = X.astype(np.float32)
    if library == "torch":
        torch = pytest.importorskip("torch")
        data = torch.from_numpy(X), torch.from_numpy(Y)  # the tensors share X's memory
    else:
        data = X, Y
    net = new_net(sizes, dtype="float32")
    batches = []
    step = net._step  # what fit steps with

    def recording_step(xb, yb, *args, **kwargs):
        batches.append(xb)
        return step(xb, yb, *args, **kwargs)

    monkeypatch.setattr(net, "_step", recording_step)
    fit_quietly(net, *data, epochs=1, batch_size=50, shuffle=False)
    assert len(batches) == 3 and all(np.shares_memory(b, X) for b in batches)


# --- other array libraries --------------------------------------------------------------

def test_torch_tensors_train_like_numpy_arrays():
    torch = pytest.importorskip("torch")
    sizes, X, Y = problem("softmax_cross_entropy")
    X = X.astype(np.float32)
    from_numpy, from_torch = new_net(sizes, dtype="float32"), new_net(sizes, dtype="float32")
    validation = (X[:20], Y[:20])
    h_numpy = fit_quietly(from_numpy, X, Y, epochs=2, validation=validation)
    h_torch = fit_quietly(from_torch, torch.from_numpy(X), torch.from_numpy(Y), epochs=2,
                          validation=tuple(torch.from_numpy(a) for a in validation))
    assert same_params(from_numpy.params, from_torch.params)
    assert h_numpy.train_loss == h_torch.train_loss and h_numpy.val_loss == h_torch.val_loss
    assert np.array_equal(from_torch.predict(torch.from_numpy(X)), from_numpy.predict(X))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("memory", gpu_mlp.MEMORY_MODES)
@pytest.mark.parametrize("inputs", ["numpy", "cupy"])
def test_gpu_fit_matches_the_cpu(memory, inputs):
    import cupy

    sizes, X, Y = problem("softmax_cross_entropy")
    cpu = new_net(sizes, memory=memory)
    gpu = gpu_mlp.MLP(sizes, activations="tanh", loss="softmax_cross_entropy", memory=memory,
                      device="cuda", dtype="float64", seed=1)
    # (validated every epoch: the accuracy's and the cursor's kernels of the module)
    h_cpu = fit_quietly(cpu, X, Y, epochs=3, batch_size=16, lr=0.05, validation=(X, Y))
    data = (cupy.asarray(X), cupy.asarray(Y)) if inputs == "cupy" else (X, Y)
    h_gpu = fit_quietly(gpu, *data, epochs=3, batch_size=16, lr=0.05, validation=data)
    np.testing.assert_allclose(h_gpu.train_loss, h_cpu.train_loss, rtol=1e-10)
    np.testing.assert_allclose(h_gpu.val_loss, h_cpu.val_loss, rtol=1e-10)
    assert h_gpu.val_accuracy == h_cpu.val_accuracy
    for (W, b), (W_gpu, b_gpu) in zip(cpu.params, gpu.params):
        np.testing.assert_allclose(W_gpu.get(), W, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b_gpu.get(), b, rtol=1e-9, atol=1e-12)


# --- the docstring examples -------------------------------------------------------------

@pytest.mark.parametrize("module", [training, checkpoint, datasets])
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


# --- fit with an optimizer -----------------------------------------------------------------

FIT_OPTIMIZERS = {
    "momentum-step": lambda: optim.SGD(0.05, momentum=0.9, schedule=optim.Step(7, 0.5)),
    "adam-cosine": lambda: optim.Adam(1e-2, weight_decay=1e-3,
                                      schedule=optim.Cosine(20, warmup=5, min_lr=1e-4)),
    "adamw": lambda: optim.AdamW(1e-2),
}


@pytest.mark.parametrize("name", FIT_OPTIMIZERS)
def test_fit_with_an_optimizer_is_the_documented_loop(name):
    sizes, X, Y = problem("softmax_cross_entropy")
    net, manual = new_net(sizes), new_net(sizes)
    opt, manual_opt = FIT_OPTIMIZERS[name](), FIT_OPTIMIZERS[name]()
    history = fit_quietly(net, X, Y, epochs=3, batch_size=16, seed=5, optimizer=opt)
    rates = []
    for epoch in range(3):
        order = np.random.default_rng([5, epoch]).permutation(len(X))
        total = 0.0
        for first in range(0, len(X), 16):
            rows = order[first:first + 16]
            total += float(manual.train_step(X[rows], Y[rows], manual_opt)) * len(rows)
        assert history.train_loss[epoch] == pytest.approx(total / len(X), rel=1e-12)
        rates.append(manual_opt.last_lr)
    assert same_params(net.params, manual.params)
    assert history.lr == rates and opt.steps == manual_opt.steps == 3 * 8


def test_an_optimizer_learns_the_digits(digits):
    X_train, X_test, y_train, y_test = digits
    net = gpu_mlp.MLP([64, 32, 10], loss="softmax_cross_entropy", device="cpu", seed=0)
    history = fit_quietly(net, X_train, y_train, epochs=10, batch_size=16,
                          optimizer=optim.Adam(3e-3), validation=(X_test, y_test))
    assert history.val_accuracy[-1] >= 0.9


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lr": 0.1}, ValueError, "give lr \\(plain SGD\\) or optimizer .*, not both"),
    ({"optimizer": "adam"}, TypeError, "optimizer must be a gpu_mlp.optim optimizer"),
    ({"optimizer": 0.1}, TypeError, "optimizer must be a gpu_mlp.optim optimizer"),
])
def test_bad_optimizer_arguments_raise_before_anything_changes(kwargs, error, match):
    sizes, X, Y = problem("softmax_cross_entropy")
    net = new_net(sizes)
    before = params_of(net)
    kwargs = {"optimizer": optim.Adam(), **kwargs}
    with pytest.raises(error, match=match):
        fit_quietly(net, X, Y, epochs=1, **kwargs)
    assert same_params(before, net.params)


def test_resume_with_an_optimizer_continues_bit_for_bit(tmp_path):
    sizes, X, Y = problem("softmax_cross_entropy")
    settings = dict(batch_size=16, seed=3, validation=(X[:20], Y[:20]))

    def adam():
        return optim.Adam(1e-2, schedule=optim.Cosine(40, warmup=6, min_lr=1e-4))

    straight, opt = new_net(sizes, dtype="float32"), adam()
    full = fit_quietly(straight, X, Y, epochs=5, optimizer=opt, **settings)

    first, first_opt = new_net(sizes, dtype="float32"), adam()
    fit_quietly(first, X, Y, epochs=2, optimizer=first_opt, **settings,
                on_epoch=lambda n, h: checkpoint.save(n, tmp_path / "run.npz", history=h,
                                                      optimizer=first_opt))
    run = checkpoint.read(tmp_path / "run.npz", device="cpu")
    assert run.optimizer.steps == 2 * 8
    rest = fit_quietly(run.net, X, Y, epochs=5, optimizer=run.optimizer, resume=run.history,
                       **settings)

    assert same_params(straight.params, run.net.params)
    for name in ("train_loss", "val_loss", "val_accuracy", "lr"):
        assert getattr(rest, name) == getattr(full, name)
    a, b = opt.state_dict(), run.optimizer.state_dict()
    assert a["steps"] == b["steps"] == 5 * 8 and a["last_lr"] == b["last_lr"]
    assert all(np.array_equal(x, y) for name in a["state"]
               for pa, pb in zip(a["state"][name], b["state"][name]) for x, y in zip(pa, pb))


def test_resume_with_a_fresh_optimizer_is_refused():
    sizes, X, Y = problem("softmax_cross_entropy")
    net = new_net(sizes)
    history = fit_quietly(net, X, Y, epochs=2, batch_size=16, optimizer=optim.Adam())
    before = params_of(net)
    with pytest.raises(ValueError, match="resume: the optimizer has taken 0 steps, but the "
                                         "run to continue took 16 \\(2 epochs of 8\\)"):
        fit_quietly(net, X, Y, epochs=3, batch_size=16, optimizer=optim.Adam(),
                    resume=history)
    assert same_params(before, net.params)


def _diverge_at(monkeypatch, net, opt, step: int) -> None:
    """fit's step after ``step`` steps of ``opt`` finds NaN weights: it diverges there."""
    train_step = net._step  # what fit steps with

    def diverging(X, Y, *args, **kwargs):
        if opt.steps == step:
            for W, _ in net.params:
                W[...] = np.nan
        return train_step(X, Y, *args, **kwargs)

    monkeypatch.setattr(net, "_step", diverging)


def test_divergence_restores_the_optimizer_of_the_last_good_epoch(monkeypatch):
    sizes, X, Y = problem("softmax_cross_entropy", n=100)
    net, opt = new_net(sizes), optim.Adam(1e-2)
    saved = {}
    _diverge_at(monkeypatch, net, opt, 25)  # in epoch 3
    with np.errstate(all="ignore"), pytest.raises(training.TrainingDiverged):
        fit_quietly(net, X, Y, epochs=5, batch_size=10, optimizer=opt,
                    on_epoch=lambda n, h: saved.update({h.epochs: opt.state_dict()}))
    state = opt.state_dict()
    assert state["steps"] == 20 and state["last_lr"] == saved[2]["last_lr"]
    assert all(np.array_equal(x, y) for name in state["state"]
               for pa, pb in zip(state["state"][name], saved[2]["state"][name])
               for x, y in zip(pa, pb))


def test_divergence_goes_back_to_the_epoch_as_its_callback_left_it(monkeypatch, tmp_path):
    """on_epoch after epoch 2 sets a new rate, scales the momentum to match (README's
    recipe), zeroes the biases and saves a checkpoint; epoch 3 diverges. fit went back to
    the parameters and momentum from before the callback but kept its rate: half of the
    change, and neither the state the callback left nor the one it saved."""
    sizes, X, Y = problem("softmax_cross_entropy", n=100)
    net, opt = new_net(sizes), optim.SGD(0.05, momentum=0.9)
    path = tmp_path / "epoch2.npz"

    def on_epoch(n, h):
        if h.epochs == 2:
            opt.lr = 0.5
            opt.scale_momentum(0.05 / 0.5)
            for _, b in n.params:
                b[...] = 0.0
            n.save(path, history=h, optimizer=opt)

    _diverge_at(monkeypatch, net, opt, 25)  # in epoch 3
    with np.errstate(all="ignore"), pytest.raises(training.TrainingDiverged):
        fit_quietly(net, X, Y, epochs=4, batch_size=10, optimizer=opt, on_epoch=on_epoch)
    saved = gpu_mlp.checkpoint.read(path, device="cpu")
    for pair, kept in zip(net.params, saved.net.params):
        for a, b in zip(pair, kept):
            np.testing.assert_array_equal(a, b)
    state, kept = opt.state_dict(), saved.optimizer.state_dict()
    assert (opt.lr, state["steps"]) == (saved.optimizer.lr, kept["steps"]) == (0.5, 20)
    for pa, pb in zip(state["state"]["momentum_buffer"], kept["state"]["momentum_buffer"]):
        for a, b in zip(pa, pb):
            np.testing.assert_array_equal(a, b)


def test_an_update_that_overflows_is_a_divergence_and_the_last_good_epoch_comes_back():
    """Each step's loss is that of the parameters before its update: an update that
    overflowed (lr 3e38 is finite in float32) left fit returning inf weights, or taking
    them as an epoch's good ones (one step an epoch here: its loss is finite)."""
    net = gpu_mlp.MLP([4, 8, 2], device="cpu", dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((16, 4)), rng.standard_normal((16, 2))
    good = net.fit(X, Y, epochs=1, batch_size=16, lr=0.01, verbose=False)
    kept = [a.copy() for pair in net.params for a in pair]
    with pytest.raises(training.TrainingDiverged,
                       match=r"epoch 2 \(an update made parameters infinite or NaN, at loss"):
        net.fit(X, Y, epochs=2, batch_size=16, lr=3e38, verbose=False, resume=good)
    for a, b in zip((a for pair in net.params for a in pair), kept):
        np.testing.assert_array_equal(a, b)


def test_evaluate_and_validation_of_a_net_that_ends_in_a_convolution():
    """Its output is maps, its targets rows (as train_step takes them): evaluate compared
    the two shapes and raised, fit's validation after an epoch of steps."""
    from gpu_mlp.layers import Conv2d

    net = gpu_mlp.Network([Conv2d(1, 2, 3, padding=1, activation="identity")],
                          loss="squared", device="cpu", dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((4, 1, 3, 3)), rng.standard_normal((4, 18))
    J, _, _ = net.loss_and_gradients(X, Y)
    assert training.evaluate(net, X, Y) == (pytest.approx(float(J), rel=1e-12), None)
    history = net.fit(X, Y, epochs=1, batch_size=2, lr=0.01, validation=(X, Y),
                      verbose=False)
    assert training.evaluate(net, X, Y)[0] == pytest.approx(history.val_loss[0], rel=1e-12)


@pytest.mark.parametrize("private", [False, True], ids=["shuffled", "dp"])
def test_fit_holds_no_copy_of_the_data(private):
    """Each batch of a shuffled epoch (or a DP Poisson sample) is gathered by index into
    a batch-sized buffer: an epoch's shuffled copy of the data was held beside X (two,
    before the last batch's views let go of the previous epoch's; on a GPU, device
    memory). What remains above X: the data check's boolean scan (a quarter of X's
    float32 bytes) and a batch."""
    import tracemalloc

    rng = np.random.default_rng(0)
    X = rng.standard_normal((20_000, 100)).astype(np.float32)
    y = rng.integers(0, 10, len(X))
    net = gpu_mlp.MLP([100, 16, 10], loss="softmax_cross_entropy", device="cpu",
                      dtype="float32", seed=0)

    def dp():
        return privacy.DP(max_grad_norm=1.0, noise_multiplier=1.0, seed=0, delta=1e-6)

    if private:  # the accountant's first use imports SciPy's modules: not the fit's memory
        net.fit(X[:100], y[:100], epochs=1, batch_size=50, lr=0.01, verbose=False, dp=dp())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        net.fit(X, y, epochs=3, batch_size=500, lr=0.01, verbose=False,
                dp=dp() if private else None)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 0.4 * X.nbytes, peak / X.nbytes


def test_evaluate_checks_its_data_as_fit_does_and_changes_nothing():
    """training.evaluate (the CLI's test loss): the loss and accuracy of the net as it is;
    bad data refused by name, the net untouched."""
    sizes, X, Y = problem("softmax_cross_entropy")
    net = new_net(sizes)
    before = [a.copy() for pair in net.params for a in pair]
    loss, accuracy = training.evaluate(net, X, Y)
    assert np.isfinite(loss) and 0 <= accuracy <= 1
    bad = X.copy()
    bad[0, 0] = np.nan
    for args, error, match in [((X[:, :-1], Y), ValueError, "X must have shape"),
                               ((bad, Y), ValueError, "X contains NaN or Inf"),
                               ((X, Y[:-1]), ValueError, "labels must have shape"),
                               ((X.astype(str), Y), TypeError, "X must hold real numbers")]:
        with pytest.raises(error, match=match):
            training.evaluate(net, *args)
    assert all(np.array_equal(a, b) for a, b in zip(before, (a for pair in net.params
                                                                  for a in pair)))
