"""Minibatch training over a data set: :func:`fit`, :func:`evaluate` and the :class:`History`.

:func:`fit` checks all the data once, up front, and puts it on the net's device once.
Each epoch then steps on batches of the rows in that epoch's order (each gathered by
its step, on the device) without checking them again -- plain SGD at ``lr``, or a
:mod:`gpu_mlp.optim` optimizer with its schedule -- so no step scans the data or waits
for the device: each step adds its loss, times its rows, to the epoch's sum on the
device (a :class:`gpu_mlp.plan.LossTally`), read only every ``_REFRESH_S`` seconds (for
the progress bar and to notice divergence) and at the end of the epoch. On a GPU the
full batch's step and the remainder's are each captured as a CUDA graph on their second
use and replayed after (:mod:`gpu_mlp.graph`: at most these two graphs; under DP one per
Poisson sample size, :data:`~gpu_mlp.graph.POISSON_GRAPHS`); data-parallel steps run
eagerly.

Divergence: the first non-finite loss seen stops training (on the CPU at once, on a GPU
within ``_REFRESH_S``). The parameters -- and an optimizer's state and step count -- go
back to what they were at the end of the last good epoch (a host copy is kept for that), and
:class:`TrainingDiverged` carries the History of the good epochs. A run that stays
finite but ends with a higher training loss than it started with gets a
:class:`TrainingWarning`.

The order of epoch ``e`` depends on ``(seed, e)`` alone, so a run resumed from a
checkpoint (``resume=history``, and ``optimizer=`` the optimizer saved with it) sees
exactly the batches an uninterrupted run sees and ends with the same parameters, bit for
bit.

>>> import gpu_mlp
>>> from gpu_mlp import datasets
>>> X, y = datasets.digits()
>>> net = gpu_mlp.MLP([64, 32, 10], loss="softmax_cross_entropy", device="cpu")
>>> history = net.fit(X, y, epochs=2, batch_size=64, lr=0.1, verbose=False)
>>> history.epochs, history.train_loss[1] < history.train_loss[0]
(2, True)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np
from tqdm import tqdm

from . import _checks, ops
from . import distributed as _distributed
from . import optim as _optim
from . import privacy as _privacy
from .device import to_numpy, write
from .graph import MAX_GRAPHS, POISSON_GRAPHS, Cursor, Gathered
from .plan import StepPlan

_REFRESH_S = 0.2  # the losses come from the device at most this often (bar, divergence)
_ROSE = 1.1  # a final training loss this many times the first step's is worth a warning
_PER_EPOCH = ("lr", "train_loss", "val_loss", "val_accuracy", "seconds", "epsilon")
# where each number fit records lies (NaN lies in none), and whether null may stand for
# it (no validation data, no accuracy, not private); a run without noise spends an
# infinite epsilon, and a validation set may overflow the net: its loss is any number
_EPOCH_RANGES = {"lr": ((0.0, sys.float_info.max), False),
                 "train_loss": ((-sys.float_info.max, sys.float_info.max), True),
                 "val_loss": (None, True), "val_accuracy": ((0.0, 1.0), True),
                 "seconds": ((0.0, sys.float_info.max), False),
                 "epsilon": ((0.0, math.inf), True)}
DEFAULT_LR = 0.05  # plain SGD's learning rate when neither lr nor optimizer is given


class TrainingDiverged(RuntimeError):
    """Training reached a non-finite loss. The net holds the parameters it had at the end
    of the last good epoch (the initial ones if the first diverged); ``history`` is the
    :class:`History` of the good epochs, e.g. to save or plot."""

    every_rank = True  # data-parallel: the epoch loss is global, so every rank raises it

    def __init__(self, message: str, history: "History"):
        super().__init__(message)
        self.history = history


class TrainingWarning(UserWarning):
    """Training ran, but something about it is likely not what was wanted."""


@dataclass
class History:
    """What :func:`fit` did, one entry per epoch, and the settings that fix its batches.

    ``val_loss`` and ``val_accuracy`` hold ``None`` for epochs without validation data
    and ``val_accuracy`` also where the loss is not a classification loss.
    """

    seed: int
    batch_size: int
    shuffle: bool
    samples: int  # training rows: a resumed run must have as many
    lr: list[float] = field(default_factory=list)  # with an optimizer: the epoch's last step's
    # mean over the epoch's samples; None for an epoch that sampled none (DP's Poisson
    # batches of a small data set can all be empty)
    train_loss: list[Optional[float]] = field(default_factory=list)
    val_loss: list[Optional[float]] = field(default_factory=list)
    val_accuracy: list[Optional[float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # training time, validation excluded
    # DP runs: the epsilon spent after each epoch, at the DP's delta (None when not private)
    epsilon: list[Optional[float]] = field(default_factory=list)

    def __post_init__(self):
        if not self.epsilon and self.train_loss:  # epochs recorded without DP in mind
            self.epsilon = [None] * len(self.train_loss)

    @property
    def epochs(self) -> int:
        """The number of epochs done."""
        return len(self.train_loss)

    def as_dict(self) -> dict:
        """Plain lists and numbers, for ``json``: an epsilon is ``inf`` for DP without
        noise, and a validation loss may be ``inf`` or NaN, which Python's ``json``
        writes as ``Infinity`` and ``NaN`` (and reads back) but strict JSON lacks."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "History":
        """The inverse of :meth:`as_dict`; a ValueError says what does not fit."""
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(d, dict) and "epsilon" not in d and isinstance(d.get("train_loss"), list):
            d = {**d, "epsilon": [None] * len(d["train_loss"])}  # written before DP existed
        if isinstance(d, dict) and d.get("epsilon") == [] and d.get("train_loss"):
            d = {**d, "epsilon": [None] * len(d["train_loss"])}
        if not isinstance(d, dict) or sorted(d) != sorted(names):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"history must have the entries {names}, got {got}")
        for name, minimum in (("seed", 0), ("batch_size", 1), ("samples", 1)):
            if type(d[name]) is not int or not minimum <= d[name] < 2**64:
                raise ValueError(f"history: {name} must be an integer in [{minimum}, 2^64), "
                                 f"got {d[name]!r}")
        if type(d["shuffle"]) is not bool:
            raise ValueError(f"history: shuffle must be true or false, got {d['shuffle']!r}")
        if not isinstance(d["train_loss"], list):
            raise ValueError("history: train_loss must be a list")
        for name in _PER_EPOCH:
            entries = d[name]
            if not isinstance(entries, list) or len(entries) != len(d["train_loss"]):
                raise ValueError(f"history: {name} must be a list with one entry per epoch")
            bounds, optional = _EPOCH_RANGES[name]
            for v in entries:
                if not (optional and v is None or type(v) in (int, float)
                        and (type(v) is float or abs(v) <= sys.float_info.max)  # 10**400
                        and (bounds is None or bounds[0] <= v <= bounds[1])):
                    raise ValueError(f"history: {name} must hold numbers"
                                     f"{'' if bounds is None else ' in [%g, %g]' % bounds}"
                                     f"{' or null' if optional else ''}, got {v!r}")
        return cls(**d)


def fit(net, X, Y, epochs: int = 10, batch_size: int = 32, lr: Optional[float] = None,
        shuffle: bool = True, seed: int = 0, validation=None, verbose: bool = True,
        on_epoch: Optional[Callable] = None, resume: Optional[History] = None,
        optimizer: Optional[_optim.Optimizer] = None, dp=None, comm=None,
        plan: Optional[StepPlan] = None) -> History:
    """Train ``net`` on (X, Y) by minibatch SGD or an optimizer; return the :class:`History`.

    Args:
        X, Y: the training set, NumPy/CuPy arrays or DLPack tensors (PyTorch, ...), with
            targets as the net's loss takes them; moved to the net's device once.
        epochs: the epoch count to reach; with ``resume``, counting the epochs done.
        batch_size: rows per step; the last step of an epoch takes the remainder.
        lr: the learning rate of plain SGD (default 0.05), fused into the gradient GEMM.
            Leave it out when giving ``optimizer``: the optimizer's ``lr`` and schedule
            rule (giving both is an error).
        shuffle: visit the rows in a new random order every epoch (else in order),
            each batch gathered into a buffer of a batch's size: no copy of the data.
        seed: fixes the order of every epoch.
        validation: ``(X_val, Y_val)`` to evaluate after every epoch, or None.
        verbose: show a progress bar per epoch (on stderr, only when it is a terminal)
            with the running loss and samples/s.
        on_epoch: called as ``on_epoch(net, history)`` after every epoch, e.g. to save
            a checkpoint.
        resume: the :class:`History` of an earlier run on the same data with the same
            seed, batch size and shuffling, to be continued (it is not modified). With an
            optimizer or DP, pass the ones saved with it
            (``checkpoint.read(path).optimizer`` / ``.dp``): their step counts must be
            the run's.
        optimizer: a :mod:`gpu_mlp.optim` optimizer (SGD with momentum, Adam, AdamW, with
            a schedule), stepped once per batch; bound to ``net`` by its first step. The
            History's ``lr`` then records each epoch's last learning rate.
        dp: a :class:`gpu_mlp.privacy.DP`: train privately. Each epoch then takes
            ``ceil(n / batch_size)`` steps on Poisson samples (every row independently
            with probability ``q = min(1, batch_size / n)``, from ``(dp.seed, seed,
            epoch)``: secret with the DP's seed; ``shuffle`` has no say), each divided by
            the expected batch size ``q n``, and the History's ``epsilon`` records the
            privacy spent after each epoch (needs the ``[dp]`` extra).
        comm: a :class:`gpu_mlp.distributed.Communicator` (or, on the CPU, an mpi4py
            communicator, wrapped in one for the run): train data-parallel. Every
            rank passes the same data and settings (checked before the first step, the
            parameters, optimizer state, validation data and ``comm.path`` too; the
            parameters again after every epoch); each global batch is split into
            contiguous shares, one per rank, and every rank applies the gradient of the
            global batch mean, so the run is the single-process run on the global
            batches. The History is the same on every rank.
        plan: a :class:`gpu_mlp.plan.StepPlan`, the update rule, ``dp`` and ``comm`` in
            one, instead of ``lr``, ``optimizer``, ``dp`` and ``comm`` (a plan from a
            number is plain SGD at that rate).

    Bad arguments raise a TypeError or ValueError before the net is touched. Training
    that diverges (a non-finite epoch loss) stops with a :class:`TrainingDiverged`. With
    ``comm`` fit is a collective, whose every rank stops together: arguments that fail
    their checks, or an ``on_epoch`` that raises (or calls ``sys.exit()``), on any rank
    raise on every rank -- that rank's own exception, a RuntimeError naming it on the
    others -- as do a configuration that differs and a divergence; an exception inside
    a step on one rank alone ends the job (see
    :meth:`gpu_mlp.distributed.Communicator.guard`).
    """
    if plan is not None:
        if not isinstance(plan, StepPlan):
            raise TypeError(f"plan must be a gpu_mlp.plan.StepPlan, got {plan!r}")
        given = [name for name, value in (("lr", lr), ("optimizer", optimizer), ("dp", dp),
                                          ("comm", comm)) if value is not None]
        if given:
            raise ValueError(f"give plan or {', '.join(given)}, not both: the plan holds the "
                             f"update rule, dp and comm")
        comm = plan.comm
    if comm is not None:
        comm = _distributed.communicator(comm, net)
    if plan is None:  # made by _fit, which checks lr, optimizer and dp in their turn
        make_plan = functools.partial(_step_plan, net, lr, optimizer, dp, comm)
    else:
        make_plan = functools.partial(plan.check, net)
    run = functools.partial(_fit, net, X, Y, epochs, batch_size, shuffle, seed, validation,
                            verbose, on_epoch, resume, make_plan, comm)
    if comm is None:
        return run()
    with comm.guard():  # else the other ranks would wait for this one forever
        return run()


class _Run(NamedTuple):
    """fit's arguments, checked (:func:`_checked`)."""

    epochs: int
    batch_size: int
    plan: StepPlan
    seed: int
    shuffle: bool
    verbose: bool
    X: object
    Y: object
    validation: Optional[tuple]
    history: History
    sample_rate: float


def _fit(net, X, Y, epochs, batch_size, shuffle, seed, validation, verbose, on_epoch,
         resume, make_plan, comm) -> History:
    """:func:`fit`, with ``make_plan()`` the StepPlan of its steps, checked against
    ``net``: everything that depends on DP or data parallelism asks the plan. With
    ``comm`` (fit's Communicator) the ranks first agree that every one's arguments
    passed the checks, then that they are alike: a mistake every rank makes is raised on
    every rank, where the caller can catch it."""
    check = functools.partial(_checked, net, X, Y, epochs, batch_size, shuffle, seed,
                              validation, verbose, on_epoch, resume, make_plan)
    if comm is None:
        run = check()
    else:
        run = comm.settled("fit's checks", check)
        _privacy.agree(run.plan.dp, comm)  # one collective on every rank, DP or not
        comm.check_same("fit", _run_config(net, run, comm))
    try:
        return _train(net, run, on_epoch, comm)
    finally:  # the graphs that gather from the data would keep it alive on the device
        net.step_graphs.forget((run.X, run.Y))


def _checked(net, X, Y, epochs, batch_size, shuffle, seed, validation, verbose, on_epoch,
             resume, make_plan) -> _Run:
    """fit's arguments checked, and X, Y and the validation data on the net's device in
    its dtype; nothing changed (a TypeError or ValueError where one is wrong)."""
    epochs = _checks.integer("epochs", epochs)
    # (below 2^64, as a History holds them: a checkpoint's must read back)
    batch_size = _checks.integer("batch_size", batch_size, below=2**64)
    plan = make_plan()
    seed = _checks.seed(seed)
    shuffle, verbose = _checks.flag("shuffle", shuffle), _checks.flag("verbose", verbose)
    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(f"on_epoch must be callable, got {type(on_epoch).__name__}")
    X, Y = _data(net, "X", X, Y)
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise TypeError("validation must be a pair (X_val, Y_val)")
        validation = _data(net, "X_val", *validation)
    history = _start(resume, epochs, seed, batch_size, bool(shuffle), X.shape[0])
    n = X.shape[0]
    steps_per_epoch = -(-n // batch_size)
    sample_rate = _privacy.sample_rate(batch_size, n)
    plan.epsilon(sample_rate, steps=1)  # under DP: the accountant is there, before any step
    if resume is not None:
        plan.check_resumed(history.epochs, steps_per_epoch)
        plan.check_privacy_resumed(history.epsilon, sample_rate)
    elif plan.private and plan.dp.steps:
        # its epsilon would count those steps at this run's sample rate and noise, and
        # its Poisson samples, keyed by (seed, epoch), would be drawn again
        raise ValueError(f"dp has taken {plan.dp.steps} steps already (another fit, or "
                         f"train_step): this run's epsilon could not count them, so it "
                         f"would report less privacy spent than was; give a new DP, or "
                         f"continue the run that took them with resume=its History")
    if plan.private and plan.dp.delta >= 1 / n:
        _warn(f"DP: delta {plan.dp.delta:g} is at least 1/n for these n = {n} samples, too "
              f"large to protect anyone: a mechanism that publishes a sample in the clear "
              f"with probability delta meets it; take delta well below 1/n",
              plan.communicator(net))
    return _Run(epochs, batch_size, plan, seed, bool(shuffle), verbose, X, Y, validation,
                history, sample_rate)


def _train(net, run: _Run, on_epoch, comm) -> History:
    """fit's epochs, from ``run.history``'s on."""
    (epochs, batch_size, plan, seed, shuffle, verbose, X, Y, validation, history,
     sample_rate) = run
    n = X.shape[0]
    xp = net.xp
    # a GPU's losses are read every _REFRESH_S: no sync per step; data-parallel ranks
    # must all stop together, so they look at the loss only at the end of an epoch
    look = xp is np and not plan.parallel
    first_step_loss = None  # the loss of the initial parameters, on the first batch
    good = _host_copy(net.params)  # the parameters to go back to if an epoch diverges
    good_state = plan.snapshot()  # and the optimizer's state and DP's step count
    spare = None  # the next epoch's copy, checked before it becomes the good one
    gather = BatchGather(xp, X, Y)  # shuffled and Poisson batches, gathered by index
    tally = net.step_graphs.tally(net)  # the epochs' losses, summed by the steps
    # a GPU's graphs: the full batch and the remainder, or under DP one per sample size
    graphs = POISSON_GRAPHS if plan.private else MAX_GRAPHS
    for epoch in range(history.epochs, epochs):
        start = time.perf_counter()
        losses = _StepLosses(tally)
        with tqdm(total=n, desc=f"epoch {epoch + 1}/{epochs}", unit=" samples",
                  unit_scale=True, file=sys.stderr,
                  disable=not (verbose and sys.stderr.isatty())) as bar:
            shown, shown_at = 0, start
            for done, X_batch, Y_batch, counts, gathered in _batches(
                    net, gather, batch_size, seed, epoch, shuffle, plan):
                J = net._step(X_batch, Y_batch, plan, False,
                              expected_batch=plan.divisor(batch_size, n), counts=counts,
                              lasting=False, prepared=True, gathered=gathered, tally=tally,
                              graphs=graphs)
                losses.add(J, X_batch.shape[0], counts)
                if look and not math.isfinite(J):  # free to read on the NumPy backend
                    break
                if not plan.parallel and time.perf_counter() - shown_at > _REFRESH_S:
                    running = losses.mean()
                    if not math.isfinite(running):
                        break
                    bar.set_postfix(loss=f"{running:.4f}", refresh=False)
                    bar.update(done - shown)
                    shown, shown_at = done, time.perf_counter()
            train_loss = losses.mean(comm)  # waits for the epoch's last step
            if not losses.rows:  # no batch had a sample: no loss to speak of
                train_loss = None
            if epoch == 0:
                first_step_loss = losses.first(comm)
            seconds = time.perf_counter() - start
            # the losses are those before each update: an update that overflowed shows
            # in the parameters alone
            spare = _host_copy(net.params, into=spare)
            if comm is not None:  # (before any rank decides on its own parameters)
                seconds = _still_alike(comm, spare, seconds, epoch)
            overflowed = not all(np.isfinite(a).all() for pair in spare for a in pair)
            lost = train_loss is not None and not math.isfinite(train_loss)
            if lost or overflowed:
                _restore(net.params, good)
                plan.restore(good_state)
                what = (f"loss {train_loss}" if lost else "an update made parameters "
                        "infinite or NaN" + ("" if train_loss is None else
                                              f", at loss {train_loss:.4g}"))
                raise TrainingDiverged(
                    f"training diverged in epoch {epoch + 1} ({what}); the "
                    f"parameters are those after epoch {epoch} again; try a smaller "
                    f"learning rate than {plan.lr}", copy.deepcopy(history))
            val_loss, val_accuracy = (_evaluate(net, *validation) if validation is not None
                                      else (None, None))
            bar.set_postfix(_postfix(train_loss, val_loss, val_accuracy), refresh=False)
            bar.update(n - shown)
        epoch_lr = plan.last_lr
        epsilon = plan.epsilon(sample_rate)
        for name, value in zip(_PER_EPOCH, (epoch_lr, train_loss, val_loss, val_accuracy,
                                            seconds, epsilon)):
            getattr(history, name).append(value)
        good, spare = spare, good
        if on_epoch is not None or comm is not None:  # (every rank settles it)
            _call_back(on_epoch, net, history, comm)
        if on_epoch is not None:
            # what a divergence goes back to: the epoch as the callback left it (a new
            # rate, momentum scaled, parameters changed) -- what it may have saved. (A
            # second host copy of the parameters an epoch, only with a callback.)
            good = _host_copy(net.params, into=good)
        good_state = plan.snapshot()
    _warn_if_loss_rose(history, first_step_loss, plan.lr, comm)
    return history


def _still_alike(comm, params, seconds: float, epoch: int) -> float:
    """Every rank's parameters after an epoch (``params``, host copies) must be the same
    bits: on the gather path each rank forms the update itself, with its own BLAS, which
    rounds differently on another CPU or GPU model, and ranks that drift apart would also
    decide apart (a divergence on one rank alone). Returns rank 0's ``seconds``, so that
    the History is the same on every rank."""
    everyone = comm.allgather((_digest(*(a for pair in params for a in pair)), seconds))
    if len({digest for digest, _ in everyone}) > 1:
        changed = ("something changed them on some rank alone (an on_epoch callback, "
                   "say): every rank must hold the same parameters")
        if comm.path != "allreduce":
            changed = (f"where a layer's factors are gathered (comm.path 'gather', or "
                       f"'auto' where that sends fewer bytes) each rank forms the update "
                       f"with its own BLAS, which rounds differently on different CPU or "
                       f"GPU models: use comm.path='allreduce' (--comm-path allreduce), "
                       f"whose ranks all apply one summed gradient; or {changed}")
        error = RuntimeError(f"after epoch {epoch + 1} the {comm.size} ranks' parameters "
                             f"differ: {changed}")
        error.every_rank = True
        raise error
    return everyone[0][1]


def _call_back(on_epoch, net, history, comm) -> None:
    """``on_epoch(net, history)`` (if given); with ``comm``, then told to every rank
    whether it raised anywhere (:meth:`~gpu_mlp.distributed.Communicator.settle`, on
    every rank, with a callback or not: rank 0's alone saves a checkpoint, say): a
    callback that stops the run on one rank (an exception, ``sys.exit()``) stops every
    rank, rather than leave the others waiting in the next epoch's collectives."""
    if comm is None:
        on_epoch(net, history)
    else:  # (a KeyboardInterrupt: guard() ends the job)
        call = (lambda: None) if on_epoch is None else functools.partial(on_epoch, net,
                                                                           history)
        comm.settled("on_epoch", call, catch=(Exception, SystemExit))


def _step_plan(net, lr, optimizer, dp, comm) -> StepPlan:
    """The plan of fit's steps from its arguments, checked as fit always checked them
    and against ``net``."""
    if optimizer is None:
        rule = _checks.lr(DEFAULT_LR if lr is None else lr)
    else:
        if not isinstance(optimizer, _optim.Optimizer):
            raise TypeError(f"optimizer must be a gpu_mlp.optim optimizer (SGD, Adam, AdamW), "
                            f"got {optimizer!r}")
        if lr is not None:
            raise ValueError("give lr (plain SGD) or optimizer (which has its own lr and "
                             "schedule), not both")
        optimizer.check_net(net)
        rule = optimizer
    return StepPlan(rule, dp, comm).check(net)  # StepPlan checks dp


def _batches(net, gather, batch_size, seed, epoch, shuffle, plan):
    """One epoch's steps of ``plan`` on ``net`` as ``(rows done, X_batch, Y_batch,
    counts, gathered)``: contiguous slices of the epoch's order, or Poisson samples under
    DP; under data parallelism this rank's contiguous share of each global batch, and
    ``counts`` every rank's share. On the CPU and for data-parallel steps, unshuffled
    batches are views of the data; otherwise the rows are gathered into ``gather``'s
    buffers (each batch overwrites the last) by the step (``gathered``, a
    :class:`gpu_mlp.graph.Gathered`: a replayed step gathers inside its graph), from
    row indices on the device -- on a GPU through ``gather``'s cursor, which the steps
    move on themselves, the epoch's order (or Poisson samples) written there at its
    start."""
    xp, (X, Y), comm = net.xp, gather.data, plan.communicator(net)
    n = X.shape[0]
    # a GPU's steps (not data-parallel: their ranks read shares of each batch) read
    # their rows through a cursor on the device, which their graphs move on themselves
    cursor = xp is not np and comm is None
    if plan.private:
        samples = [_share(rows, comm) for rows in _privacy.poisson_batches(
            n, batch_size, seed, epoch, secret=plan.dp.seed)]
        # the epoch's row indices on the device in one copy, each step's after the last's
        flat = np.concatenate([rows for rows, _ in samples])
        at = gather.restart(flat) if cursor else xp.asarray(flat, dtype=np.intp)
        first = 0
        for step, (rows, counts) in enumerate(samples):
            upto, last = min(n, (step + 1) * batch_size), first + len(rows)
            X_batch, Y_batch, gathered = gather.later(at, len(rows)) if cursor else \
                gather.later(at[first:last])
            first = last
            yield upto, X_batch, Y_batch, counts, gathered
        return
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else None
    if cursor:  # (unshuffled too: the rows in their order, gathered by the graph)
        at = gather.restart(np.arange(n) if order is None else order)
    elif shuffle:
        order = xp.asarray(order)
    for first in range(0, n, batch_size):
        last = min(first + batch_size, n)
        (lo, hi), counts = _share((first, last), comm)
        if cursor or shuffle:
            X_batch, Y_batch, gathered = gather.later(at, hi - lo) if cursor else \
                gather.later(order[lo:hi])
            yield last, X_batch, Y_batch, counts, gathered
        else:
            yield last, X[lo:hi], Y[lo:hi], counts, None


class BatchGather:
    """fit's rows of (X, Y) by index, gathered into two buffers of a batch's size: an
    epoch in shuffled order, or DP's Poisson samples, then costs a batch's memory, where
    a shuffled copy of the data cost the data's (on a GPU, device memory) -- the same
    rows in the same order, each copied once an epoch as before."""

    def __init__(self, xp, X, Y):
        self.xp, self.data, self._buffers, self._cursor = xp, (X, Y), None, None

    def __call__(self, rows):
        """``(X[rows], Y[rows])``, views of the buffers (grown to the largest batch)."""
        X, Y, gathered = self.later(rows)
        gathered.into(X, Y)
        return X, Y

    def later(self, rows, m=None):
        """``(X, Y, gathered)``: the views of the buffers (grown to the largest batch)
        that will hold ``(X[rows], Y[rows])``, and the :class:`gpu_mlp.graph.Gathered`
        that fills them (a training step does: eagerly, or inside its graph). ``rows``:
        row indices on the device, or the :class:`~gpu_mlp.graph.Cursor` of
        :meth:`restart`, whose next ``m`` rows the step reads."""
        m = rows.shape[0] if m is None else m
        if self._buffers is None or m > self._buffers[0].shape[0]:
            self._buffers = tuple(self.xp.empty((m, *a.shape[1:]), dtype=a.dtype)
                                  for a in self.data)
        return (*(b[:m] for b in self._buffers), Gathered(self.data, rows, self._take))

    def restart(self, order) -> Cursor:
        """A cursor at the start of ``order`` (host row indices: an epoch's), for
        :meth:`later`: one kept across epochs -- so that the graphs that read it replay
        every epoch -- and replaced by a larger one for a longer order (a DP epoch's
        samples vary in number: room for a quarter more)."""
        cursor = self._cursor
        if cursor is None or len(order) > cursor.capacity:
            cursor = self._cursor = Cursor(self.xp, max(len(order) * 5 // 4, 1),
                                           self.data[0].dtype)
        cursor.restart(order)
        return cursor

    def _take(self, a, rows, out):
        """``out <- a[rows]``, no array made: NumPy's take buffers ``out`` unless told the
        indices need no check (mode "clip": fit's are in range); CuPy's has no modes."""
        if self.xp is np:
            return np.take(a, rows, axis=0, out=out, mode="clip")
        return a.take(rows, 0, out)


def _share(batch, comm):
    """This rank's contiguous share of a global batch -- row indices, or a ``(first,
    last)`` range -- and every rank's row count (None without ``comm``)."""
    if comm is None:
        return batch, None
    ranged = isinstance(batch, tuple)
    total = batch[1] - batch[0] if ranged else len(batch)
    counts = [total // comm.size + (r < total % comm.size) for r in range(comm.size)]
    lo = sum(counts[:comm.rank])
    hi = lo + counts[comm.rank]
    if ranged:
        return (batch[0] + lo, batch[0] + hi), counts
    return batch[lo:hi], counts


def _run_config(net, run: _Run, comm):
    """What every rank of a data-parallel run must agree on, JSON-ready: the path too
    (ranks on different collectives fail deep inside MPI, or crash), the optimizer's
    state (moments that differ drift the ranks apart) and the validation data (each
    rank's History would differ)."""
    plan, X, Y, validation = run.plan, run.X, run.Y, run.validation
    rule = None if plan.plain else plan.rule.state_dict()["state"]
    return {"layers": [layer.spec() for layer in net.layers], "loss": net.loss.name,
            "memory": net.memory, "dtype": net.dtype.name, "device": net.device,
            "samples": list(X.shape), "targets": list(Y.shape), "data": _digest(X, Y),
            "epochs": run.epochs, "batch_size": run.batch_size, "seed": run.seed,
            "shuffle": run.shuffle, "epochs_done": run.history.epochs, **plan.config(),
            "params": _digest(*(a for pair in net.params for a in pair)),
            "optimizer_state": None if rule is None else _digest(
                *(a for name in sorted(rule) for pair in rule[name] for a in pair)),
            "comm_path": comm.path,
            "validation": None if validation is None else _digest(*validation)}


def _digest(*arrays) -> str:
    """A digest of the arrays' bytes, in order (BLAKE2b, on the host: a GPU's arrays are
    copied there once per fit): ranks whose data differ anywhere, or only in the order
    of their rows, differ in it, where a sum may not."""
    digest = hashlib.blake2b(digest_size=16)
    for a in arrays:
        digest.update(np.ascontiguousarray(to_numpy(a)))
    return digest.hexdigest()


def _warn(message: str, comm) -> None:
    """A :class:`TrainingWarning`; under data parallelism from the root rank alone: the
    ranks see the same global losses, and P copies would reach a job's merged stderr."""
    if comm is None or comm.is_root:
        _checks.warn(message, TrainingWarning)


def _warn_if_loss_rose(history, first_step_loss, lr, comm) -> None:
    known = [(k, x) for k, x in enumerate(history.train_loss, start=1) if x is not None]
    if not known:
        return
    (first, start), (last, end) = known[0], known[-1]
    start, when = ((first_step_loss, "the first step") if first_step_loss is not None
                   else (start, f"epoch {first}"))
    if end > _ROSE * start:
        _warn(f"the training loss rose from {start:.4g} ({when}) to {end:.4g} (epoch "
              f"{last}): the learning rate {lr} may be too large", comm)


def evaluate(net, X, Y) -> tuple[float, Optional[float]]:
    """``(mean loss, accuracy)`` of ``net`` on (X, Y), checked as fit checks its
    validation data; the accuracy is None for the squared loss (its row of the loss
    table has none).

    softmax_cross_entropy: the share of rows whose largest output is the label (or the
    target row's largest entry). logistic: the share of outputs whose sign matches the
    +-1 label.
    """
    return _evaluate(net, *_data(net, "X", X, Y))


class _StepLosses:
    """An epoch's step losses, weighted by rows: summed on the device by the steps
    themselves (``tally``, a :class:`gpu_mlp.plan.LossTally`: a replayed step's graph
    adds its own, with no launch, copy or read per step on the host), the rows counted
    on the host; the first step that had rows is kept apart (the run's first loss)."""

    def __init__(self, tally):
        self.tally, self.rows, self._first = tally, 0, None
        tally.reset()

    def add(self, J, rows: int, counts=None) -> None:
        """After a step that tallied its loss ``J`` over ``rows`` (``counts``: every
        rank's rows, with communication)."""
        self.rows += rows
        if self._first is None and (rows if counts is None else sum(counts)):
            # (a copy: the next step may reuse J's buffer; once a run. An assignment, a
            # memcpy on a GPU, where CuPy's copy() is a kernel to compile)
            first = self.tally.xp.empty_like(J)
            first[...] = J
            self._first = (first, rows)

    def first(self, comm=None) -> float:
        """The loss of the first step that had rows (a Poisson sample can be empty); with
        ``comm`` of the first global batch that had rows, over every rank's share (on
        each rank the same step: they know each other's rows). NaN if none had."""
        if self._first is None:
            return math.nan
        J, rows = self._first
        if comm is None:
            return float(J)
        total, rows = comm.sum([float(J) * rows, rows])
        return float(total / rows)

    def mean(self, comm=None) -> float:
        """The weighted mean so far: one device-to-host read; with ``comm`` over the
        steps of every rank (the global batch mean): NaN when no step had a row. Sets
        :attr:`rows`, the rows counted (0: none)."""
        totals = np.array([self.tally.total(), self.rows], dtype=np.float64)
        if comm is not None:
            totals = comm.sum(totals)
        self.rows = float(totals[1])
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(totals[0] / totals[1])


def _evaluate(net, X, Y):
    loss = net.loss
    F = net.predict(X)  # in chunks: its memory does not grow with X
    F = F.reshape(F.shape[0], -1)  # a convolution's maps as the rows Y was checked as
    grad = net.xp.empty_like(F)  # the loss kernels write the gradient too; unused here
    scratch = net.xp.empty(ops.loss_scratch_shape(loss, F.shape), dtype=F.dtype)
    # the mean by the GEMV against ones (on a GPU no reduction and division to compile)
    ws = net.inference_workspace
    terms = ops.loss_terms(loss, scratch).size
    mean_loss = float(ops.loss_and_grad(loss, F, Y, grad, 1.0, scratch, out=ws.loss(),
                                        ones=ws.ones(terms)))
    if loss.accuracy is None:
        return mean_loss, None
    hits = None if net.xp is np else net.xp.empty_like(F)
    return mean_loss, float(loss.accuracy(F, Y, hits))


def _host_copy(params, into=None):
    """A host copy of the parameters (into ``into``'s arrays when given)."""
    if into is None:
        return [tuple(np.array(to_numpy(a)) for a in pair) for pair in params]
    for pair, saved in zip(params, into):
        for a, copy_ in zip(pair, saved):
            copy_[...] = to_numpy(a)
    return into


def _restore(params, saved) -> None:
    """Write ``saved`` back into the live parameter arrays (they stay the same objects)."""
    for pair, copies in zip(params, saved):
        for a, copy_ in zip(pair, copies):
            write(a, copy_)


def _data(net, name, X, Y):
    """(X, Y) checked once, in full, and on the net's device in its dtype."""
    shape = getattr(X, "shape", np.shape(X))
    if len(shape) < 2 or shape[0] == 0:
        raise ValueError(f"{name} must be a (samples, ...) array with at least one sample, "
                         f"got shape {tuple(shape)}")
    try:
        X, Y, _ = net.inputs.batch(net.params, X, Y, check=True)
    except (TypeError, ValueError) as e:
        if name == "X":
            raise
        # the checks say X and Y: the validation pair is named
        raise (TypeError if isinstance(e, TypeError) else ValueError)(
            f"validation data, the pair (X_val, Y_val): {e}") from None
    return X, Y


def _start(resume, epochs, seed, batch_size, shuffle, samples) -> History:
    if resume is None:
        return History(seed=seed, batch_size=batch_size, shuffle=shuffle, samples=samples)
    if not isinstance(resume, History):
        raise TypeError(f"resume must be a History, got {type(resume).__name__}")
    ours = dict(seed=seed, batch_size=batch_size, shuffle=shuffle, samples=samples)
    theirs = {key: getattr(resume, key) for key in ours}
    if ours != theirs:
        diff = ", ".join(f"{key}={theirs[key]} (now {ours[key]})"
                         for key in ours if ours[key] != theirs[key])
        raise ValueError(f"resume: the run to continue had {diff}; a resumed run needs "
                         f"the same data, seed, batch size and shuffling")
    if resume.epochs > epochs:
        raise ValueError(f"resume: {resume.epochs} epochs are done already, more than "
                         f"epochs={epochs}")
    return copy.deepcopy(resume)


def _postfix(train_loss, val_loss, val_accuracy) -> dict:
    postfix = {"loss": "none" if train_loss is None else f"{train_loss:.4f}"}
    if val_loss is not None:
        postfix["val_loss"] = f"{val_loss:.4f}"
    if val_accuracy is not None:
        postfix["val_acc"] = f"{val_accuracy:.4f}"
    return postfix
