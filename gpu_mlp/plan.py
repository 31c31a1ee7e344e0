"""The step plan: what one training step does, in one object.

A training step is one forward and one backward pass whose gradients go, layer by layer,
through a chain of sinks (:mod:`gpu_mlp.updates`)::

    [DP: clip each sample, add noise] -> [data parallel: sum over ranks] -> Apply

:class:`StepPlan` holds the three settings that decide that chain -- the update rule,
DP (or None) and the communication (or None) -- checks them against a net and builds the
chain of each step. It is what :meth:`Network.train_step <gpu_mlp.network.Network.train_step>`,
:func:`gpu_mlp.training.fit`, the command line and :func:`gpu_mlp.checkpoint.save` hand
around, instead of three optional arguments each.

A learning rate given as a number is plain SGD, ``optim.SGD(lr)``: its rule is the
gradient GEMM straight into ``W`` (``alpha = -lr, beta = 1``; no scratch, no state), and
a checkpoint stores no optimizer for it (:attr:`StepPlan.optimizer` is None), so that a
run of plain SGD may change its rate when resumed, as it always could.

>>> import numpy as np, gpu_mlp
>>> from gpu_mlp import optim
>>> from gpu_mlp.plan import StepPlan
>>> net = gpu_mlp.MLP([4, 8, 3], loss="softmax_cross_entropy", device="cpu", seed=0)
>>> plan = StepPlan(optim.Adam(1e-2))
>>> X, y = np.ones((5, 4)), np.array([0, 1, 2, 1, 0])
>>> losses = [float(net.train_step(X, y, plan)) for _ in range(3)]
>>> plan.rule.steps, StepPlan(0.1).optimizer is None
(3, True)
"""

from __future__ import annotations

import hashlib
import math
import numbers
from typing import Optional

import numpy as np

from . import _checks, distributed, ops, optim, privacy
from .device import write
from .updates import Apply, Sink

__all__ = ["LossTally", "StepPlan", "StepScalars"]


class StepPlan:
    """What one training step does: the update rule, DP and communication.

    Args:
        rule: a learning rate (plain SGD, ``optim.SGD(rule)``) or a
            :mod:`gpu_mlp.optim` optimizer; its first step binds it to the net.
        dp: a :class:`gpu_mlp.privacy.DP`, or None.
        comm: a :class:`gpu_mlp.distributed.Communicator`, on the CPU also an mpi4py
            communicator (wrapped in one per net), or None.

    :attr:`rule` is always an optimizer; ``plain`` says it came from a number,
    :attr:`optimizer` is the rule unless plain (what a checkpoint stores). A plan with an
    optimizer steps one net, as the optimizer does; a plain plan, like a number, any net.

    What depends on DP or communication is asked of the plan (as fit does):
    :attr:`private`, :attr:`parallel`, :meth:`divisor`, :meth:`epsilon`, :meth:`config`,
    :meth:`snapshot` and :meth:`restore`, :meth:`check_resumed`,
    :meth:`check_privacy_resumed`.
    """

    __slots__ = ("plain", "_lr", "_rule", "dp", "comm")  # train_step makes one per step

    def __init__(self, rule, dp=None, comm=None):
        if type(rule) is float or isinstance(rule, numbers.Real):  # (float: no ABC check)
            self.plain, self._lr, self._rule = True, _checks.lr(rule), None
        elif isinstance(rule, optim.Optimizer):
            self.plain, self._lr, self._rule = False, None, rule
        else:
            raise TypeError(f"lr must be a number or a gpu_mlp.optim optimizer, got {rule!r}")
        if dp is not None and not isinstance(dp, privacy.DP):
            raise TypeError(f"dp must be a gpu_mlp.privacy.DP, got {dp!r}")
        if comm is not None:
            distributed.check_communicator(comm)
        self.dp, self.comm = dp, comm

    @classmethod
    def of(cls, rule, dp=None, comm=None) -> "StepPlan":
        """``rule`` if it is a plan already (then ``dp`` and ``comm`` must be None: the
        plan has its own), else ``StepPlan(rule, dp, comm)``."""
        if isinstance(rule, StepPlan):
            if dp is not None or comm is not None:
                raise ValueError("a StepPlan holds its own dp and comm: give them to "
                                 "StepPlan(rule, dp=..., comm=...)")
            return rule
        return cls(rule, dp, comm)

    def __repr__(self) -> str:
        rule = f"lr={self.lr}" if self.plain else repr(self.rule)
        return f"StepPlan({rule}, dp={self.dp!r}, comm={self.comm!r})"

    @property
    def rule(self) -> optim.Optimizer:
        """The update rule: the optimizer, or for plain SGD ``optim.SGD(lr)`` (made when
        first asked for: a plain step needs no object but its :class:`~updates.Apply`, so
        this one counts no steps, and its ``lr`` and ``weight_decay`` cannot be set:
        the steps would not see them)."""
        if self._rule is None:
            self._rule = optim.SGD(self._lr)
            self._rule._fixed = ("a StepPlan of a number steps at that rate, without weight "
                                 "decay: to change them, plan with an optimizer "
                                 "(StepPlan(optim.SGD(lr)), fit(optimizer=...))")
        return self._rule

    @property
    def optimizer(self) -> Optional[optim.Optimizer]:
        """The optimizer to save and resume with; None for plain SGD (it has no state)."""
        return None if self.plain else self._rule

    @property
    def lr(self) -> float:
        """The base learning rate."""
        return self._lr if self.plain else self._rule.lr

    @property
    def last_lr(self) -> Optional[float]:
        """The rate of the last step taken (plain SGD: its one rate)."""
        return self._lr if self.plain else self._rule.last_lr

    @property
    def private(self) -> bool:
        """Whether the steps are differentially private (the plan has a DP)."""
        return self.dp is not None

    @property
    def parallel(self) -> bool:
        """Whether the steps are data-parallel (the plan has a communicator)."""
        return self.comm is not None

    def divisor(self, batch_size: int, n: int) -> Optional[int]:
        """What a step of :func:`~gpu_mlp.training.fit` with ``batch_size`` on ``n``
        samples divides by: under DP the expected batch size ``q n`` (its Poisson samples
        vary in size), ``q = min(1, batch_size / n)`` -- n where the batch size exceeds
        the data, whose every row each step then takes -- else None (the step's own
        rows)."""
        return min(batch_size, n) if self.private else None

    def epsilon(self, sample_rate: float, steps: Optional[int] = None) -> Optional[float]:
        """The privacy spent after ``steps`` steps (default: the DP's steps so far) at
        ``sample_rate``, at the DP's delta; None when not private."""
        return self.dp.epsilon(sample_rate, steps) if self.private else None

    def config(self) -> dict:
        """The update rule and DP as every rank of a data-parallel run must agree on
        them, JSON-ready (plain SGD: its rate; an optimizer: its settings and steps)."""
        if self.plain:
            rule = {"lr": self._lr, "optimizer": None, "optimizer_steps": None}
        else:
            rule = {"lr": None, "optimizer": repr(self._rule),
                    "optimizer_steps": self._rule.steps}
        if not self.private:
            return {**rule, "dp": None}
        # the seed by a digest: a mismatch is printed, and a secret seed must not be
        seed = hashlib.blake2b(str(self.dp.seed).encode(), digest_size=8).hexdigest()
        return {**rule, "dp": {**self.dp.state_dict(), "seed": seed}}

    def snapshot(self):
        """The optimizer's state and the DP's step count, to :meth:`restore` later (fit,
        when an epoch diverges); plain SGD has no state."""
        return (None if self.plain else self._rule._snapshot(),
                self.dp.steps if self.private else None)

    def restore(self, snapshot) -> None:
        """Back to a :meth:`snapshot` of this plan."""
        if not self.plain:
            self._rule._restore(snapshot[0])
        if self.private:
            self.dp.steps = snapshot[1]

    def check_resumed(self, epochs: int, steps_per_epoch: int) -> None:
        """Raise a ValueError unless the optimizer and the DP have taken as many steps as
        ``epochs`` of ``steps_per_epoch`` took: a resumed run needs the ones saved with it
        (a fresh one would restart its moments, its schedule or its noise)."""
        expected = epochs * steps_per_epoch
        for name, stepper in (("optimizer", self.optimizer), ("dp", self.dp)):
            if stepper is not None and stepper.steps != expected:
                raise ValueError(f"resume: the {name} has taken {stepper.steps} steps, but "
                                 f"the run to continue took {expected} ({epochs} epochs of "
                                 f"{steps_per_epoch}); pass the {name} saved with it "
                                 f"(gpu_mlp.checkpoint.read(path).{name})")

    def check_privacy_resumed(self, epsilons: list, sample_rate: float) -> None:
        """Raise a ValueError unless the plan's DP is the one that spent the privacy a
        resumed run's History records (``epsilons``, one per epoch): a run trained
        privately continues privately, and DP settings changed since (a noise multiplier
        raised in the file, say) would count less privacy spent than was."""
        recorded = [e for e in epsilons if e is not None]
        if not self.private:
            if recorded:
                raise ValueError("resume: the run to continue was trained with DP (its "
                                 "History records epsilon); pass the DP saved with it "
                                 "(gpu_mlp.checkpoint.read(path).dp)")
            return
        if any(e is None for e in epsilons):
            # a private run records every epoch's: epochs without one were not private
            # (or the file was edited), and the DP's match with them could not be checked
            raise ValueError("resume: the History of the run to continue records no "
                             "epsilon for some of its epochs, but a DP is given: a private "
                             "run records every epoch's (a checkpoint's dp and history "
                             "must be its own; a run trained without DP continues without)")
        if epsilons:
            spent = self.dp.epsilon(sample_rate)
            # (the accountant's own rounding, or a newer dp-accounting's, is far below)
            if not math.isclose(spent, epsilons[-1], rel_tol=1e-3):
                raise ValueError(f"resume: the DP's {self.dp.steps} steps spend epsilon "
                                 f"{spent:.6g}, but the History of the run to continue "
                                 f"records {epsilons[-1]:.6g}: the DP is not the one that "
                                 f"trained it (a checkpoint's dp and history must be its "
                                 f"own)")

    def communicator(self, net) -> Optional[distributed.Communicator]:
        """The :class:`~gpu_mlp.distributed.Communicator` of ``net``'s steps, or None."""
        return distributed.communicator(self.comm, net) if self.parallel else None

    def check(self, net) -> "StepPlan":
        """Raise a TypeError or ValueError, changing nothing, if the plan cannot step
        ``net``: a communicator that does not fit, an optimizer bound to another net or
        with state that does not fit, scalars that ``net``'s dtype cannot compute with."""
        self.communicator(net)
        _checks.step_scalars(net.dtype, self._lr if self.plain else self._rule, self.dp)
        if not self.plain:
            self._rule.check_net(net)
        return self

    def count_step(self) -> None:
        """What a step does to the plan on the host -- the optimizer counts it, the DP's
        noise moves on -- for a step replayed as a CUDA graph, which runs no Python."""
        if not self.plain:
            self._rule.count_step()
        if self.private:
            self.dp.steps += 1

    def settings(self, noise_std: float = 0.0) -> tuple:
        """What the scalars of a step depend on besides its step counts: the rule (its
        kind, hyperparameters and schedule; plain SGD's rate) and the noise's std."""
        return (("plain", self._lr) if self.plain else repr(self._rule)), noise_std

    def step_values(self, step: int, noise_std: float = 0.0) -> dict:
        """The scalars of the step after ``step`` steps of the rule, by
        :data:`StepScalars.COLUMNS`, computed in double on the host (plain SGD: its one
        rate, ``keep = 1``), with the noise's scales ``-lr std`` (plain SGD, whose noise is
        added to ``W`` times ``-lr``) and ``std``."""
        if self.plain:
            lr = self._lr
            values = {"lr": lr, "alpha": -lr, "keep_W": 1.0, "keep_b": 1.0}
        else:
            values = self._rule.step_scalars(self._rule.lr_at(step), step + 1)
        lr = values["lr"]
        return {**values, "noise_lr": -lr * noise_std, "noise_one": 1.0 * noise_std}

    def sink(self, net, rows: int, counts=None, divisor: Optional[float] = None,
             scalars: Optional["StepScalars"] = None) -> Sink:
        """The chain of one step of ``net`` on ``rows`` local rows: DP's stage (dividing
        by ``divisor``, default every rank's rows together) -> the communication's stage
        (``counts``: every rank's rows, gathered when not given) -> the update rule.
        Each step takes a new one.

        Plain SGD's rule is :class:`~gpu_mlp.updates.Apply` without kernels: ``W <- W -
        lr G`` as the gradient GEMM itself, straight into ``W`` (``optim.SGD(lr)``'s own
        rule, without an object that counts its steps)."""
        sink = (Apply(net.params, lr=self._lr, scalars=scalars, ws=net.training_workspace)
                if self.plain
                else self._rule.begin_step(net, scalars))
        comm = self.communicator(net)
        if comm is not None:
            counts = comm.row_counts(rows) if counts is None else counts
            sink = comm.stage(net, sink, counts)
        if self.private:
            if divisor is None:
                divisor = rows if counts is None else sum(counts)
            sink = self.dp.stage(net, sink, rows, divisor, scalars)
        return sink


class StepScalars:
    """A step's scalars on the device, where the kernels read them by pointer: what
    changes from step to step -- a schedule's rate, Adam's bias corrections, AdamW's
    decay, the DP noise's step counter -- so that a step captured as a CUDA graph and
    replayed sees each step's own (CuPy only; the NumPy backend computes with numbers).

    The host computes the scalars of :data:`WINDOW` steps ahead, in double as it always
    did (:meth:`StepPlan.step_values`), into :attr:`table` (one row per step, in the
    net's dtype: the same rounding as a number passed to a kernel). The device keeps the
    step counters, ``counters = (rule's steps, DP's steps, the step of the table's first
    row)`` (int64; the DP's 64-bit counter as its bits). Each step runs
    :meth:`select` first -- one kernel copies the counter's row into :attr:`values`, of
    which :attr:`views` are 0-d views by name -- and :meth:`advance` last, which counts
    the step on the device; both are part of a captured step, so a replay moves on with
    no host work. Past the window's end a replay keeps the last row (a graph replayed
    by hand that long: every step through ``train_step`` or ``fit`` refills it first).

    :meth:`prepare` runs before each step on the host: it writes the table and the
    counters again only when they no longer match the plan (a new window, other
    settings, step counts set by a checkpoint or by hand), so a steady-state step
    writes nothing.
    """

    COLUMNS = ("alpha", "keep_W", "keep_b", "lr", "step_size", "bias_correction2_sqrt",
               "eps", "decay_W", "decay_b", "noise_lr", "noise_one")
    WINDOW = 1024  # steps of scalars computed ahead (a schedule's; a constant rule: 1)

    def __init__(self, xp, dtype):
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.values = xp.zeros(len(self.COLUMNS), dtype=self.dtype)
        self.counters = xp.zeros(3, dtype=np.int64)
        # 0-d views (``[i, ...]``: NumPy's ``[i]`` would be a copy, as a scalar)
        self.views = {name: self.values[i, ...] for i, name in enumerate(self.COLUMNS)}
        self.dp_step = self.counters[1, ...]
        self.table = None
        self._settings, self._first = None, 0
        self._at = None  # (rule's steps, DP's steps) as the device holds them

    def prepare(self, plan: StepPlan, noise_std: float = 0.0) -> None:
        """Make the table and the counters those of ``plan``'s next step (host writes
        only where they differ)."""
        at = self._at or (0, 0)
        step = at[0] if plan.plain else plan.rule.steps
        dp_step = plan.dp.steps if plan.private else at[1]
        settings = plan.settings(noise_std)
        rows = 1 if plan.plain else self.WINDOW  # plain SGD: one rate, whatever the step
        ahead = plan.plain or self._first <= step < self._first + rows
        if settings != self._settings or not ahead:
            table = [[values.get(name, 1.0) for name in self.COLUMNS]
                     for values in (plan.step_values(s, noise_std)
                                    for s in range(step, step + rows))]
            if self.table is None or self.table.shape[0] != rows:
                self.table = self.xp.empty((rows, len(self.COLUMNS)), dtype=self.dtype)
            write(self.table, np.array(table, dtype=self.dtype))
            self._settings, self._first, self._at = settings, step, None
        if self._at != (step, dp_step):
            # (CuPy's set copies on the current stream: after the steps queued there)
            write(self.counters, np.array([step, dp_step, self._first],
                                          dtype=np.uint64).view(np.int64))
            self._at = (step, dp_step)

    def select(self) -> None:
        """On the device: the scalars of the counter's step into :attr:`values`."""
        ops.step_scalars(self.values, self.table, self.counters)

    def advance(self) -> None:
        """On the device: count the step (the rule's and the DP's counters)."""
        ops.advance(self.counters[:2], 1, self.dtype)
        self.counted()

    def counted(self) -> None:
        """The host's record of the device's counters, one step on (a replay's
        :meth:`advance` runs on the device alone)."""
        self._at = (self._at[0] + 1, self._at[1] + 1)


class LossTally:
    """A run's step losses summed on the device, by the steps themselves: each step
    adds ``weight * rows * J`` -- J its mean loss over its ``rows`` -- and, with a
    ``penalty``, ``penalty * sum_k ||W_k||^2`` of the weights its forward used
    (scikit-learn's L2 term), so that a step captured as a CUDA graph does it as it
    replays: no launch, no allocation and no read on the host per step (the
    estimators of :mod:`gpu_mlp.sklearn` read :meth:`total` once an epoch). A
    compensated (Kahan) sum in the net's dtype (:func:`gpu_mlp.ops.tally`): an epoch of
    float32 steps sums to float32's precision. ``weight`` and ``penalty`` are fixed (a
    captured step holds them as numbers); :meth:`reset` starts a new sum.

    >>> import numpy as np, gpu_mlp
    >>> net = gpu_mlp.MLP([2, 3, 1], loss="squared", device="cpu", seed=0)
    >>> tally = LossTally(net, penalty=0.5)
    >>> X, Y = np.ones((4, 2)), np.zeros((4, 1))
    >>> squares = sum(float((W ** 2).sum()) for W, _ in net.params)  # before the step
    >>> J = float(net._step(X, Y, StepPlan(0.1), False, tally=tally))
    >>> bool(np.isclose(tally.total(), 4 * J + 0.5 * squares))
    True
    """

    __slots__ = ("xp", "weight", "penalty", "_sums", "_total", "_carry", "_squares")

    def __init__(self, net, weight: float = 1.0, penalty: float = 0.0):
        for name, value in (("weight", weight), ("penalty", penalty)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise TypeError(f"LossTally: {name} must be a number, got {value!r}")
            _checks.scalar(name, value, net.dtype, "LossTally: ")
        self.xp, self.weight, self.penalty = net.xp, float(weight), float(penalty)
        self._sums = net.xp.zeros(2, dtype=net.dtype)
        self._total, self._carry = self._sums[0:1], self._sums[1:2]
        self._squares = net.xp.zeros(1, dtype=net.dtype)  # sum ||W_k||^2, this step's

    def key(self) -> tuple:
        """What a captured step holds of it (its buffers by identity, its numbers)."""
        return id(self), self.weight, self.penalty

    def before(self, net) -> None:
        """At a step's start: the squared norms of its weights, if there is a penalty
        (one GEMM each, as a (1, n) row against itself, into one buffer)."""
        if not self.penalty:
            return
        out = self._squares.reshape(1, 1)
        for k, (W, _) in enumerate(net.params):
            w = W.reshape(1, -1)
            ops.gemm("N", "T", w, w, out, beta=0.0 if k == 0 else 1.0)

    def add(self, J, rows: int) -> None:
        """At a step's end: its mean loss ``J`` (0-d, on the device) over ``rows``."""
        ops.tally(J.reshape(1), self._squares, self.weight * rows, self.penalty,
                  self._total, self._carry)

    def total(self) -> float:
        """The sum so far (one device-to-host read)."""
        return float(self._sums[0])

    def reset(self) -> None:
        self._sums.fill(0)
