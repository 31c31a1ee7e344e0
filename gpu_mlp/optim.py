"""Optimizers and learning-rate schedules, fused into the backward pass.

:class:`SGD` (momentum, Nesterov, weight decay), :class:`Adam` (L2 weight decay in the
gradient) and :class:`AdamW` (decoupled weight decay) follow ``torch.optim``'s update
rules exactly (dampening 0, no AMSGrad, bias corrections and first steps included); the
rules are written out in ``kernels/optim.cuh``. Two options reach scikit-learn's rules
(:mod:`gpu_mlp.sklearn` uses them): ``decay_bias=False``, the weight decay on the weights
only, and Adam's ``eps_placement="uncorrected"``, eps added to ``sqrt(v)`` before the
bias correction. Schedules (:class:`Constant`, :class:`Step`, :class:`Cosine`) give each
step's rate from the base ``lr`` and the optimizer's step count. Pass an optimizer where
a learning rate goes::

    opt = gpu_mlp.optim.Adam(lr=1e-3, schedule=gpu_mlp.optim.Cosine(1000, warmup=100))
    net.train_step(X, Y, opt)          # or net.fit(X, Y, optimizer=opt)

The engine hands each layer's gradient factors to the optimizer's *sink*, which writes
``G_k`` into ONE scratch buffer shared by all layers (the size of the largest weight)
and updates ``W_k`` with one fused kernel, then ``b_k``: no ``.grad`` per parameter
(docs/MATH.md, "Memory modes"; the measured table is in README, "Optimizers and
schedules"). Beyond the parameters SGD keeps nothing (its update is the gradient GEMM,
``alpha = -lr, beta = 1 - lr wd``), SGD with momentum a buffer plus the scratch, Adam
and AdamW two moments plus the scratch. State is allocated at the first step, on the
net's device, which binds the optimizer to that net; a step then allocates nothing and
never synchronises: the step's scalars (scheduled lr, bias corrections) are computed on
the host in double, as PyTorch does (on a GPU a window of steps ahead, into a table that
the kernels read by the device's step counter: :class:`gpu_mlp.plan.StepScalars`).
:meth:`Optimizer.state_dict` holds everything, and :mod:`gpu_mlp.checkpoint` saves it, so
that a resumed run continues bit for bit.

>>> import numpy as np, gpu_mlp
>>> from gpu_mlp import optim
>>> net = gpu_mlp.MLP([4, 8, 3], loss="softmax_cross_entropy", device="cpu", seed=0)
>>> opt = optim.Adam(lr=1e-2, schedule=optim.Cosine(total_steps=10, warmup=2))
>>> X, y = np.ones((5, 4)), np.array([0, 1, 2, 1, 0])
>>> losses = [float(net.train_step(X, y, opt)) for _ in range(3)]
>>> opt.steps, opt.last_lr == opt.lr
(3, True)
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple, Optional

import numpy as np

from . import _checks, ops
from .device import to_numpy, write
from .updates import Apply

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "Schedule", "Constant", "Step", "Cosine",
           "KINDS", "from_state_dict", "schedule_from_spec"]


# --- argument checks --------------------------------------------------------------------

def _lr(value, where: str) -> float:
    return _checks.in_range("lr", value, where, low_open=True)


# --- learning-rate schedules --------------------------------------------------------------

class Schedule:
    """The learning rate of each step: :meth:`lr` of the base rate and the number of
    steps taken before this one (0 for the first step)."""

    def lr(self, base_lr: float, step: int) -> float:
        raise NotImplementedError

    def check(self, base_lr: float) -> None:
        """Raise a ValueError if the schedule cannot start from ``base_lr``."""

    def spec(self) -> dict:
        """The schedule as JSON-ready values: :func:`schedule_from_spec` inverts it."""
        return {"type": _SCHEDULE_NAMES[type(self)], **vars(self)}

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """The base learning rate at every step."""

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr


class Step(Schedule):
    """``lr * gamma ** (step // step_size)``: the rate times ``gamma`` every ``step_size``
    steps, as ``torch.optim.lr_scheduler.StepLR`` stepped once per optimizer step."""

    def __init__(self, step_size: int, gamma: float = 0.1):
        self.step_size = _checks.integer("step_size", step_size, 1, "Step: ")
        self.gamma = _checks.in_range("gamma", gamma, "Step: ", 0.0, 1.0, low_open=True,
                               high_open=False)

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr * self.gamma ** (step // self.step_size)


class Cosine(Schedule):
    """Linear warm-up, then cosine decay to ``min_lr``.

    Step ``s`` (0-based) runs at ``lr (s + 1) / warmup`` for ``s < warmup`` (the last
    warm-up step reaches ``lr``), at ``min_lr + (lr - min_lr) (1 + cos(pi p)) / 2`` with
    ``p = (s - warmup) / (total_steps - warmup)`` up to ``total_steps``, and at ``min_lr``
    after that.
    """

    def __init__(self, total_steps: int, warmup: int = 0, min_lr: float = 0.0):
        self.total_steps = _checks.integer("total_steps", total_steps, 1, "Cosine: ")
        self.warmup = _checks.integer("warmup", warmup, 0, "Cosine: ")
        if self.warmup > self.total_steps:
            raise ValueError(f"Cosine: warmup ({self.warmup} steps) must not exceed "
                             f"total_steps ({self.total_steps})")
        self.min_lr = _checks.in_range("min_lr", min_lr, "Cosine: ")

    def check(self, base_lr: float) -> None:
        if self.min_lr > base_lr:
            raise ValueError(f"Cosine: min_lr ({self.min_lr}) must not exceed the "
                             f"optimizer's lr ({base_lr})")

    def lr(self, base_lr: float, step: int) -> float:
        if step < self.warmup:
            return base_lr * (step + 1) / self.warmup
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup) / (self.total_steps - self.warmup)
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES = {"constant": Constant, "step": Step, "cosine": Cosine}
_SCHEDULE_NAMES = {kind: name for name, kind in SCHEDULES.items()}


def schedule_from_spec(spec) -> Schedule:
    """The schedule that :meth:`Schedule.spec` describes; a TypeError/ValueError says what
    does not fit."""
    if not isinstance(spec, dict) or not _checks.named(spec.get("type"), SCHEDULES):
        raise ValueError(f"a schedule must be a dict with a type in {list(SCHEDULES)}, "
                         f"got {spec!r}")
    arguments = {key: value for key, value in spec.items() if key != "type"}
    try:
        return SCHEDULES[spec["type"]](**arguments)
    except TypeError as e:
        if "argument" in str(e):
            raise ValueError(f"schedule {spec!r}: {e}") from None
        raise


# --- optimizers -------------------------------------------------------------------------

class Optimizer:
    """What every optimizer has: a base ``lr``, a schedule, a step count and, once bound
    to a net by its first step, per-parameter state on the net's device.

    Use it as the ``lr`` of :meth:`Network.train_step` or as ``optimizer=`` of
    :meth:`Network.fit` (or the rule of a :class:`gpu_mlp.plan.StepPlan`, whose steps
    call :meth:`begin_step`). The hyperparameters
    are read-only but ``lr`` and ``weight_decay`` (checked when set; a caller may change
    them between steps, as PyTorch's ``param_groups``); the state and the scratch live
    as long as the optimizer (``net.free_buffers()`` leaves them).
    """

    STATE: tuple = ()  # the names of the per-parameter state tensors (PyTorch's)

    def __init__(self, lr, weight_decay, schedule):
        where = f"{type(self).__name__}: "
        self._lr = _lr(lr, where)
        self._weight_decay = _checks.in_range("weight_decay", weight_decay, where)
        schedule = Constant() if schedule is None else schedule
        if not isinstance(schedule, Schedule):
            raise TypeError(f"{where}schedule must be a gpu_mlp.optim schedule (Constant, "
                            f"Step, Cosine), got {schedule!r}")
        schedule.check(self._lr)
        self._schedule = schedule
        self._steps = 0
        self._last_lr: Optional[float] = None
        self._net = None        # a weak reference to the bound net
        self._state = {}        # name -> [(state of W_k, state of b_k)] on the net's device
        self._scratch = None    # the one gradient buffer, flat
        self._pending = None    # host state loaded before binding, checked at bind
        self._fixed = None      # why nothing may change it (a plain StepPlan's rule), or None

    # --- hyperparameters and position ---------------------------------------------------

    @property
    def lr(self) -> float:
        """The base learning rate (the schedule scales it per step)."""
        return self._lr

    def _changing(self) -> None:
        """Raise an AttributeError, saying why, if this optimizer may not change."""
        if self._fixed is not None:
            raise AttributeError(self._fixed)

    @lr.setter
    def lr(self, value) -> None:
        self._changing()
        value = _lr(value, f"{type(self).__name__}: ")
        self.schedule.check(value)
        self._lr = value

    @property
    def decay_bias(self) -> bool:
        """Whether the weight decay applies to the biases too (PyTorch's default)."""
        return self._decay_bias

    @property
    def weight_decay(self) -> float:
        """The L2 (Adam, SGD) or decoupled (AdamW) decay coefficient of the next step."""
        return self._weight_decay

    @weight_decay.setter
    def weight_decay(self, value) -> None:
        self._changing()
        self._weight_decay = _checks.in_range("weight_decay", value,
                                              f"{type(self).__name__}: ")

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @property
    def steps(self) -> int:
        """Steps taken: the position of the schedule, ``t - 1`` of the next step."""
        return self._steps

    @property
    def last_lr(self) -> Optional[float]:
        """The learning rate of the last step taken (None before the first)."""
        return self._last_lr

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based: the steps taken before it)."""
        return self.schedule.lr(self._lr, step)

    def hyperparameters(self) -> dict:
        """The constructor's arguments but the schedule, as JSON-ready values
        (``decay_bias`` and ``eps_placement`` only where they are not their defaults:
        the state dicts and reprs of PyTorch's rules stay as they were)."""
        raise NotImplementedError

    @property
    def kind(self) -> str:
        """The name of this optimizer's kind in :data:`KINDS`."""
        raise NotImplementedError

    def settings(self) -> dict:
        """``lr`` and the hyperparameters of its kind (:data:`KINDS`), pairs as tuples:
        what describes this optimizer, the schedule aside."""
        hyper = self.hyperparameters()
        return {name: tuple(hyper[name]) if isinstance(hyper[name], list) else hyper[name]
                for name in ("lr", *KINDS[self.kind].options)}

    def kernel_settings(self) -> tuple:
        """What this optimizer's kernels take as numbers: its type and hyperparameters
        but ``lr`` and the schedule, whose rates reach the kernels as the step's scalars
        (:meth:`step_scalars`, read on the device by a step captured as a CUDA graph).
        Such a graph keeps these (:mod:`gpu_mlp.graph`); a new ``lr`` needs no new one."""
        hyper = self.hyperparameters()
        del hyper["lr"]
        return type(self).__name__, tuple(
            (name, tuple(value) if isinstance(value, list) else value)
            for name, value in sorted(hyper.items()))

    def __repr__(self) -> str:
        args = [f"{key}={tuple(value) if isinstance(value, list) else value!r}"
                for key, value in self.hyperparameters().items()]
        if not isinstance(self.schedule, Constant):
            args.append(f"schedule={self.schedule!r}")
        return f"{type(self).__name__}({', '.join(args)})"

    @property
    def state_bytes(self) -> int:
        """Bytes of per-parameter state on the net's device (0 before binding)."""
        return sum(a.nbytes for pairs in self._state.values() for pair in pairs for a in pair)

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the one gradient buffer (0 before binding, and for plain SGD)."""
        return 0 if self._scratch is None else self._scratch.nbytes

    # --- binding to a net -------------------------------------------------------------

    def _bound_net(self):
        return None if self._net is None else self._net()

    def check_net(self, net) -> None:
        """Raise a ValueError, changing nothing, if this optimizer cannot step ``net``:
        it is bound to another net, or state loaded for it does not fit."""
        if self._net is not None:
            if self._bound_net() is not net:
                raise ValueError(f"this {type(self).__name__} is bound to another network "
                                 f"(its state belongs to that net's parameters); make a new "
                                 f"optimizer for this one")
            return
        if self._pending is not None:
            _check_state_fits(self._pending, net, type(self).__name__)

    def bind(self, net) -> None:
        """Check ``net`` and, on the first call, allocate the state (or move the loaded
        state) and the scratch on its device."""
        self.check_net(net)
        if self._net is not None:
            return
        xp, pending = net.xp, self._pending
        state = {}
        for name in self.STATE:
            pairs = []
            for k, (W, b) in enumerate(net.params):
                if pending is None:
                    pairs.append((xp.zeros_like(W), xp.zeros_like(b)))
                else:
                    pairs.append(tuple(xp.array(a, dtype=net.dtype, order="C", copy=True)
                                       for a in pending[name][k]))
            state[name] = pairs
        self._state = state
        if self.STATE:
            largest = max(max(W.size, b.size) for W, b in net.params)
            self._scratch = xp.empty(largest, dtype=net.dtype)
        self._pending = None
        self._net = weakref.ref(net)

    # --- a step -------------------------------------------------------------------------

    def begin_step(self, net, scalars=None):
        """Bind to ``net`` (first call) and return the :class:`~gpu_mlp.updates.Apply` of
        one step: the engine hands it each layer's gradient, last layer first, after
        ``dJ/dF_{k-1}`` has used the old ``W_k``; the step counts when it finishes.
        ``scalars``: a :class:`gpu_mlp.plan.StepScalars` (CuPy): the kernels read the
        step's scalars there, by pointer, instead of as numbers computed here."""
        self.bind(net)
        values = (scalars.views if scalars is not None
                  else self.step_scalars(self.lr_at(self._steps), self._steps + 1))

        def state(k):
            pairs = [self._state[name][k] for name in self.STATE]
            return [p[0].reshape(-1) for p in pairs], [p[1] for p in pairs]
        return Apply(net.params, **self._rule(values), scratch=self._scratch, state=state,
                     on_finish=self.count_step, scalars=scalars, ws=net.training_workspace)

    def count_step(self) -> None:
        """What a step does to the optimizer on the host: count it, and remember its rate
        (a replayed step, which runs no Python, is counted by its caller)."""
        self._last_lr = self.lr_at(self._steps)
        self._steps += 1

    def step_scalars(self, lr: float, t: int) -> dict:
        """The scalars of step ``t`` (1-based) at learning rate ``lr``, by the names of
        :data:`gpu_mlp.plan.StepScalars.COLUMNS`, computed in double as PyTorch does
        (the device reads them from a table of these)."""
        raise NotImplementedError

    def _rule(self, values: dict) -> dict:
        """The step whose scalars are ``values`` (:meth:`step_scalars`, or their device
        views) as :class:`~gpu_mlp.updates.Apply`'s arguments: ``lr`` and ``keep`` for
        plain SGD, else ``kernels`` (of W, of b)."""
        raise NotImplementedError

    # --- state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything to continue from, as host values: ``type``, ``hyperparameters``,
        ``schedule`` (its spec), ``steps`` and ``state`` (``{name: [(W_k's, b_k's)]}``,
        NumPy copies; empty before the first step)."""
        if self._net is not None:
            state = {name: [(np.array(to_numpy(a)), np.array(to_numpy(c))) for a, c in pairs]
                     for name, pairs in self._state.items()}
        elif self._pending is not None:
            state = {name: [(a.copy(), c.copy()) for a, c in pairs]
                     for name, pairs in self._pending.items()}
        else:
            state = {}
        return {"type": type(self).__name__, "hyperparameters": self.hyperparameters(),
                "schedule": self.schedule.spec(), "steps": self._steps,
                "last_lr": self._last_lr, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Take hyperparameters, schedule, step count and state from ``state_dict`` (of
        :meth:`state_dict`, of the same optimizer type). Everything is checked first --
        a bound optimizer's state against its net -- and nothing changes on an error."""
        self._changing()
        other = from_state_dict(state_dict)
        if type(other) is not type(self):
            raise ValueError(f"this {type(self).__name__} cannot load a state dict of type "
                             f"{type(other).__name__}")
        if self._net is not None:
            net = self._bound_net()
            if net is None:
                raise ValueError(f"this {type(self).__name__} is bound to a network that "
                                 f"no longer exists; make a new optimizer")
            if other.STATE != self.STATE:
                raise ValueError(f"this {type(self).__name__} keeps {list(self.STATE)} for "
                                 f"its net; a state with {list(other.STATE)} needs a new "
                                 f"optimizer (optim.from_state_dict)")
            if other._pending is not None:
                _check_state_fits(other._pending, net, type(self).__name__)
        for name, value in vars(other).items():
            if name not in ("_net", "_state", "_scratch", "_pending"):
                setattr(self, name, value)
        if self._net is None:
            self._pending = other._pending
        else:
            self._write_state(other._pending)

    def _write_state(self, host) -> None:
        """Copy host state into the bound state arrays (zeros if ``host`` is None)."""
        for name, pairs in self._state.items():
            for k, pair in enumerate(pairs):
                for i, a in enumerate(pair):
                    if host is None:
                        a.fill(0)
                    else:
                        write(a, host[name][k][i])

    def _snapshot(self) -> dict:
        """What :meth:`_restore` needs to go back here (host copies)."""
        return self.state_dict()

    def _restore(self, snapshot: dict) -> None:
        """Back to a :meth:`_snapshot` of this very optimizer (fit, after a divergence)."""
        self._steps, self._last_lr = snapshot["steps"], snapshot["last_lr"]
        if self._net is not None:
            self._write_state(snapshot["state"] or None)


def _check_state_fits(state: dict, net, who: str) -> None:
    for name, pairs in state.items():
        if len(pairs) != len(net.params):
            raise ValueError(f"{who}: the state {name!r} holds {len(pairs)} layers, but the "
                             f"network has {len(net.params)}")
        for k, (pair, (W, b)) in enumerate(zip(pairs, net.params), start=1):
            for what, a, p in (("W", pair[0], W), ("b", pair[1], b)):
                if tuple(a.shape) != tuple(p.shape):
                    raise ValueError(f"{who}: the state {name!r} of {what}_{k} has shape "
                                     f"{tuple(a.shape)}, but {what}_{k} has {tuple(p.shape)}")
                if a.dtype != net.dtype:
                    raise ValueError(f"{who}: the state {name!r} of {what}_{k} is "
                                     f"{a.dtype}, but the network is {net.dtype}")


class SGD(Optimizer):
    """``torch.optim.SGD(params, lr, momentum, nesterov=..., weight_decay=...)`` (dampening 0).

    ``g <- g + wd W``; with momentum ``buf <- g`` at the first step, ``mu buf + g`` after,
    and ``g <- g + mu buf`` (Nesterov) or ``buf``; then ``W <- W - lr g``. Without momentum
    it is the gradient GEMM straight into W (``beta = 1 - lr wd``): no state, no scratch.

    ``decay_bias=False`` puts the weight decay on the weights only, not on the biases
    (PyTorch: the biases in a parameter group with ``weight_decay=0``; scikit-learn's L2
    term). :meth:`scale_momentum` keeps a velocity-style momentum across a change of
    ``lr``.
    """

    def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0, schedule=None,
                 decay_bias=True):
        where = "SGD: "
        self._momentum = _checks.in_range("momentum", momentum, where, 0.0, 1.0)
        self._nesterov = _checks.flag("nesterov", nesterov, where)
        if self._nesterov and self._momentum == 0:
            raise ValueError(f"{where}nesterov needs a momentum > 0")
        self._decay_bias = _checks.flag("decay_bias", decay_bias, where)
        super().__init__(lr, weight_decay, schedule)

    @property
    def momentum(self) -> float:
        return self._momentum

    @property
    def nesterov(self) -> bool:
        return self._nesterov

    def scale_momentum(self, factor) -> None:
        """Multiply the momentum buffers by ``factor``, in place (the loaded state if
        not bound yet; nothing without momentum or state).

        A velocity ``v <- mu v - lr g``, ``W <- W + v`` (Sutskever et al.'s, scikit-learn's)
        is ``-lr`` times this buffer at the rate of the steps that made it: after changing
        ``lr`` from ``old`` to ``new``, ``scale_momentum(old / new)`` keeps following it."""
        where = "SGD.scale_momentum: "
        self._changing()
        factor = _checks.in_range("factor", factor, where, low_open=True)
        held = (self._state.get("momentum_buffer", ()) if self._net is not None else
                (self._pending or {}).get("momentum_buffer", ()))
        for buf in (buf for pair in held for buf in pair if buf.size):  # first: all or none
            _checks.scalar("factor", factor, buf.dtype, where, positive=True)
            largest = float(abs(buf).max())
            if largest * factor > float(np.finfo(buf.dtype).max):
                raise ValueError(f"{where}factor {factor:g} would overflow the momentum "
                                 f"buffers in {buf.dtype} (an entry of {largest:g}); "
                                 f"nothing was scaled")
        if self._net is not None:
            for pair in self._state.get("momentum_buffer", ()):
                for buf in pair:
                    buf *= factor
        elif self._pending is not None:  # new arrays: the loaded ones may be the caller's
            self._pending = {name: [tuple(a * factor for a in pair) for pair in pairs]
                             for name, pairs in self._pending.items()}

    @property
    def STATE(self) -> tuple:
        return ("momentum_buffer",) if self.momentum else ()

    @property
    def kind(self) -> str:
        return "momentum" if self.momentum else "sgd"

    def hyperparameters(self) -> dict:
        hyper = {"lr": self._lr, "momentum": self.momentum, "nesterov": self.nesterov,
                 "weight_decay": self.weight_decay}
        if not self.decay_bias:
            hyper["decay_bias"] = False
        return hyper

    def step_scalars(self, lr, t):
        keep = 1.0 - lr * self.weight_decay
        return {"lr": lr, "alpha": -lr, "keep_W": keep,
                "keep_b": keep if self.decay_bias else 1.0}

    def _rule(self, values):
        if not self.momentum:
            return {"lr": values["lr"], "keep": (values["keep_W"], values["keep_b"])}
        lr, weight_decay = values["lr"], self.weight_decay
        momentum, nesterov = self.momentum, self.nesterov

        def kernel(decay):
            return lambda w, g, state: ops.sgd_momentum(w, g, state[0], lr, momentum, decay,
                                                        nesterov)
        return {"kernels": (kernel(weight_decay),
                            kernel(weight_decay if self.decay_bias else 0.0))}


class Adam(Optimizer):
    """``torch.optim.Adam(params, lr, betas, eps, weight_decay)``: L2 weight decay, added to
    the gradient (``g <- g + wd W``), then ``m <- lerp(m, g, 1 - b1)``, ``v <- b2 v +
    (1 - b2) g^2``, ``W <- W - lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    ``eps_placement``: ``"corrected"`` (PyTorch's, the default) adds ``eps`` to the
    bias-corrected ``sqrt(v / (1 - b2^t))``, as above; ``"uncorrected"`` adds it to
    ``sqrt(v)`` -- Kingma and Ba's epsilon-hat (their section 2), scikit-learn's and
    TensorFlow's Adam -- for the step ``lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) +
    eps)``. That is PyTorch's step with ``eps / sqrt(1 - b2^t)`` for ``eps``, and so it is
    computed. ``decay_bias=False`` puts the weight decay (the L2 term; AdamW's decoupled
    decay) on the weights only, not on the biases.
    """

    STATE = ("exp_avg", "exp_avg_sq")
    DECOUPLED = False
    EPS_PLACEMENTS = ("corrected", "uncorrected")

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 schedule=None, decay_bias=True, eps_placement="corrected"):
        where = f"{type(self).__name__}: "
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
        self._betas = tuple(_checks.in_range(f"beta{i}", beta, where, 0.0, 1.0)
                            for i, beta in enumerate(betas, start=1))
        self._eps = _checks.in_range("eps", eps, where, low_open=True)
        if not isinstance(eps_placement, str) or eps_placement not in self.EPS_PLACEMENTS:
            raise ValueError(f"{where}eps_placement must be one of "
                             f"{', '.join(map(repr, self.EPS_PLACEMENTS))}, got "
                             f"{eps_placement!r}")
        self._eps_placement = eps_placement
        self._decay_bias = _checks.flag("decay_bias", decay_bias, where)
        super().__init__(lr, weight_decay, schedule)

    @property
    def betas(self) -> tuple:
        return self._betas

    @property
    def eps(self) -> float:
        return self._eps

    @property
    def eps_placement(self) -> str:
        """``"corrected"`` (PyTorch's) or ``"uncorrected"`` (scikit-learn's)."""
        return self._eps_placement

    @property
    def kind(self) -> str:
        return "adamw" if self.DECOUPLED else "adam"

    def hyperparameters(self) -> dict:
        hyper = {"lr": self._lr, "betas": list(self.betas), "eps": self.eps,
                 "weight_decay": self.weight_decay}
        if not self.decay_bias:
            hyper["decay_bias"] = False
        if self.eps_placement != "corrected":
            hyper["eps_placement"] = self.eps_placement
        return hyper

    def step_scalars(self, lr, t):
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1 ** t  # in double, as PyTorch's Python floats
        bias_correction2 = 1 - beta2 ** t
        eps = self.eps
        if self.eps_placement == "uncorrected":
            # sqrt(v) + eps = sqrt(1 - b2^t) (sqrt(v / (1 - b2^t)) + eps / sqrt(1 - b2^t))
            eps = eps / bias_correction2 ** 0.5
        decay = 1 - lr * self.weight_decay if self.DECOUPLED else 1.0
        return {"lr": lr, "alpha": -lr, "step_size": lr / bias_correction1,
                "bias_correction2_sqrt": bias_correction2 ** 0.5, "eps": eps,
                "decay_W": decay, "decay_b": decay if self.decay_bias else 1.0}

    def _rule(self, values):
        beta1, beta2 = self.betas
        if self.DECOUPLED:
            l2 = (0.0, 0.0)
        else:
            l2 = (self.weight_decay, self.weight_decay if self.decay_bias else 0.0)
        decays = (values["decay_W"], values["decay_b"])

        def kernel(which):
            scalars = (1 - beta1, beta2, 1 - beta2, values["eps"], l2[which], decays[which],
                       values["step_size"], values["bias_correction2_sqrt"])
            return lambda w, g, state: ops.adam(w, g, state[0], state[1], *scalars)
        return {"kernels": (kernel(0), kernel(1))}


class AdamW(Adam):
    """``torch.optim.AdamW(params, lr, betas, eps, weight_decay=0.01)``: decoupled weight
    decay, ``W <- W (1 - lr wd)`` first, then Adam's step without the L2 term."""

    DECOUPLED = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 schedule=None, decay_bias=True, eps_placement="corrected"):
        super().__init__(lr, betas, eps, weight_decay, schedule, decay_bias, eps_placement)


OPTIMIZERS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}


class Kind(NamedTuple):
    """A kind of optimizer to pick by name: its class and the hyperparameters beyond
    ``lr`` that it takes."""

    cls: type
    options: tuple


# The kinds by name (the command line's --optimizer): SGD with and without momentum are
# two, for they take different hyperparameters. Optimizer.kind names an optimizer's.
KINDS = {"sgd": Kind(SGD, ("weight_decay",)),
         "momentum": Kind(SGD, ("momentum", "nesterov", "weight_decay")),
         "adam": Kind(Adam, ("betas", "eps", "weight_decay")),
         "adamw": Kind(AdamW, ("betas", "eps", "weight_decay"))}
_STATE_KEYS = ("type", "hyperparameters", "schedule", "steps", "last_lr", "state")


def from_state_dict(state_dict) -> Optimizer:
    """A new optimizer, not bound to any net, from :meth:`Optimizer.state_dict`: its state
    goes to the device of the net of its first step (checked against it there). A
    TypeError/ValueError says what does not fit."""
    if not isinstance(state_dict, dict) or sorted(state_dict) != sorted(_STATE_KEYS):
        got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"an optimizer state must have the entries {list(_STATE_KEYS)}, "
                         f"got {got}")
    kind = OPTIMIZERS.get(state_dict["type"])
    if kind is None:
        raise ValueError(f"unknown optimizer {state_dict['type']!r}; valid: "
                         f"{', '.join(OPTIMIZERS)}")
    hyper = state_dict["hyperparameters"]
    if not isinstance(hyper, dict):
        raise ValueError(f"optimizer hyperparameters must be a dict, got {hyper!r}")
    # a state dict holds every hyperparameter but those at their defaults that PyTorch's
    # rules lack (decay_bias, eps_placement): one missing is a damaged file, not a default
    missing = sorted(set(kind(1.0).hyperparameters()) - set(hyper))
    if missing:
        raise ValueError(f"{kind.__name__} hyperparameters {hyper} lack {', '.join(missing)}")
    try:
        optimizer = kind(**hyper, schedule=schedule_from_spec(state_dict["schedule"]))
    except TypeError as e:
        if "argument" in str(e):  # an unknown or missing name
            raise ValueError(f"{kind.__name__} hyperparameters {hyper}: {e}") from None
        raise
    optimizer._steps = _checks.integer("steps", state_dict["steps"], 0, "optimizer: ")
    if optimizer._steps >= 2**64:  # beta ** steps would overflow long before
        raise ValueError(f"optimizer: steps must be < 2^64, got {optimizer._steps}")
    last_lr = state_dict["last_lr"]
    if last_lr is not None:
        last_lr = _checks.in_range("last_lr", last_lr, "optimizer: ")
    optimizer._last_lr = last_lr
    optimizer._pending = _check_state(state_dict["state"], optimizer)
    return optimizer


_NONNEGATIVE = ("exp_avg_sq",)  # a running mean of squares: Adam takes its square root


def _check_state(state, optimizer: Optimizer) -> Optional[dict]:
    """The state entries of a state dict as host arrays, checked for names, pairs, one
    float dtype and finite values; None when there is none (a run not started)."""
    who = type(optimizer).__name__
    if not isinstance(state, dict):
        raise ValueError(f"{who}: the state must be a dict, got {type(state).__name__}")
    if not state:
        if optimizer.steps and optimizer.STATE:
            raise ValueError(f"{who}: {optimizer.steps} steps taken, but no state "
                             f"({', '.join(optimizer.STATE)}) to continue from")
        return None
    if sorted(state) != sorted(optimizer.STATE):
        raise ValueError(f"{who}: the state must hold {list(optimizer.STATE)}, got "
                         f"{sorted(state)}")
    checked, dtypes, layers = {}, set(), set()
    for name in optimizer.STATE:
        pairs = state[name]
        if not isinstance(pairs, (list, tuple)):
            raise ValueError(f"{who}: the state {name!r} must be a list of (W, b) pairs")
        layers.add(len(pairs))
        checked[name] = []
        for k, pair in enumerate(pairs, start=1):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"{who}: the state {name!r} of layer {k} must be a (W, b) "
                                 f"pair")
            arrays = []
            for what, a in zip("Wb", pair):
                a = np.asarray(to_numpy(a))
                if a.dtype not in (np.float32, np.float64):
                    raise ValueError(f"{who}: the state {name!r} of {what}_{k} must be "
                                     f"float32 or float64, got {a.dtype}")
                if not np.isfinite(a).all():
                    raise ValueError(f"{who}: the state {name!r} of {what}_{k} contains "
                                     f"NaN or Inf")
                if name in _NONNEGATIVE and (a < 0).any():
                    raise ValueError(f"{who}: the state {name!r} of {what}_{k} must be >= 0")
                dtypes.add(a.dtype)
                arrays.append(a)
            checked[name].append(tuple(arrays))
    if len(dtypes) > 1 or len(layers) > 1:
        raise ValueError(f"{who}: the state's entries must share one dtype and one number "
                         f"of layers")
    return checked
