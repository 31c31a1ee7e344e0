"""Optimizers and learning-rate schedules, fused into the backward pass.

:class:`SGD` (momentum, Nesterov, weight decay), :class:`Adam` (L2 weight decay in the
gradient) and :class:`AdamW` (decoupled weight decay) follow PyTorch's update rules
exactly -- ``torch.optim.SGD``, ``Adam`` and ``AdamW`` with their defaults (dampening
0, no AMSGrad), bias corrections and first steps included (docs/MATH.md,
"Optimizers"). Pass one where a learning rate goes::

    opt = gpu_mlp.optim.Adam(lr=1e-3, schedule=gpu_mlp.optim.Cosine(1000, warmup=100))
    net.train_step(X, Y, opt)          # or net.fit(X, Y, optimizer=opt)

Memory (Remark 8 (iii)): PyTorch keeps a ``.grad`` for every parameter beside the
state. Here a layer's gradient lives only between its computation and its update, in
ONE scratch buffer shared by all layers, as large as the largest layer's weight: the
engine's backward pass hands each layer's factors to the optimizer's *sink*, which
writes ``G_k = T^T rows(F_{k-1})`` into the scratch (one GEMM), updates ``W_k`` with
ONE fused kernel (kernels/optim.cuh), then the bias gradient ``T^T 1`` (one GEMV) and
``b_k`` (one kernel). So beyond the parameters:

=====================  ==============================  =================================
optimizer              gpu_mlp                         PyTorch
=====================  ==============================  =================================
SGD                    nothing (one GEMM into W)       grads: 1x params
SGD, momentum          buffer 1x params + scratch      grads + buffer: 2x params
Adam, AdamW            moments 2x params + scratch     grads + moments: 3x params
=====================  ==============================  =================================

SGD without momentum needs neither state nor scratch: ``W <- (1 - lr wd) W - lr G`` is
the gradient GEMM itself with ``alpha = -lr, beta = 1 - lr wd``, as the plain-SGD
path of :meth:`~gpu_mlp.network.Network.train_step` (the same bits when ``wd = 0``).

State is allocated once, on the net's device, at the first step, which *binds* the
optimizer to that net; a step then allocates nothing and never synchronises with the
host: the step count lives on the host, and the step's scalars (the scheduled lr, the
bias corrections ``1 - beta^t``) are computed there, in double as PyTorch does, and
passed to the kernels by value.

Schedules (:class:`Constant`, :class:`Step`, :class:`Cosine`) give the learning rate
of each step from the optimizer's base ``lr`` and the number of steps taken before it,
so the position of a schedule is the optimizer's step count. :meth:`Optimizer.state_dict`
holds everything -- hyperparameters, schedule, step count, state -- and
:mod:`gpu_mlp.checkpoint` saves it, so that a resumed run continues bit for bit.

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
from typing import Optional

import numpy as np

from . import _checks, ops
from .device import to_numpy
from .updates import Apply

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "Schedule", "Constant", "Step", "Cosine",
           "from_state_dict", "schedule_from_spec"]


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
    if not isinstance(spec, dict) or spec.get("type") not in SCHEDULES:
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
    :meth:`Network.fit`; :meth:`begin_step` is what the engine calls. The hyperparameters
    are read-only but ``lr`` (checked when set); the state and the scratch live as long
    as the optimizer (``net.free_buffers()`` leaves them).
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

    # --- hyperparameters and position ---------------------------------------------------

    @property
    def lr(self) -> float:
        """The base learning rate (the schedule scales it per step)."""
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        value = _lr(value, f"{type(self).__name__}: ")
        self.schedule.check(value)
        self._lr = value

    @property
    def weight_decay(self) -> float:
        return self._weight_decay

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
        """The constructor's arguments but the schedule, as JSON-ready values."""
        raise NotImplementedError

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

    def _check_net(self, net) -> None:
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

    def _bind(self, net) -> None:
        """Check ``net`` and, on the first call, allocate the state (or move the loaded
        state) and the scratch on its device."""
        self._check_net(net)
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

    def begin_step(self, net):
        """Bind to ``net`` (first call) and return the :class:`~gpu_mlp.updates.Apply` of
        one step: the engine hands it each layer's gradient, last layer first, after
        ``dJ/dF_{k-1}`` has used the old ``W_k``; the step counts when it finishes."""
        self._bind(net)
        lr = self.lr_at(self._steps)

        def state(k):
            pairs = [self._state[name][k] for name in self.STATE]
            return [p[0].reshape(-1) for p in pairs], [p[1] for p in pairs]

        def count():
            self._steps += 1
            self._last_lr = lr
        return Apply(net.params, **self._rule(lr, self._steps + 1), scratch=self._scratch,
                     state=state, on_finish=count)

    def _rule(self, lr: float, t: int) -> dict:
        """Step ``t`` (1-based) at learning rate ``lr`` as :class:`~gpu_mlp.updates.Apply`'s
        arguments: ``lr`` and ``keep`` for plain SGD, else ``kernels`` (of W, of b)."""
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
                    elif isinstance(a, np.ndarray):
                        a[...] = host[name][k][i]
                    else:
                        a.set(np.ascontiguousarray(host[name][k][i], dtype=a.dtype))

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
    """

    def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0, schedule=None):
        where = "SGD: "
        self._momentum = _checks.in_range("momentum", momentum, where, 0.0, 1.0)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"{where}nesterov must be True or False, got {nesterov!r}")
        if nesterov and self._momentum == 0:
            raise ValueError(f"{where}nesterov needs a momentum > 0")
        self._nesterov = bool(nesterov)
        super().__init__(lr, weight_decay, schedule)

    @property
    def momentum(self) -> float:
        return self._momentum

    @property
    def nesterov(self) -> bool:
        return self._nesterov

    @property
    def STATE(self) -> tuple:
        return ("momentum_buffer",) if self.momentum else ()

    def hyperparameters(self) -> dict:
        return {"lr": self._lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def _rule(self, lr, t):
        if not self.momentum:
            keep = 1.0 - lr * self.weight_decay
            return {"lr": lr, "keep": (keep, keep)}
        momentum, weight_decay, nesterov = self.momentum, self.weight_decay, self.nesterov

        def kernel(w, g, state):
            ops.sgd_momentum(w, g, state[0], lr, momentum, weight_decay, nesterov)
        return {"kernels": (kernel, kernel)}


class Adam(Optimizer):
    """``torch.optim.Adam(params, lr, betas, eps, weight_decay)``: L2 weight decay, added to
    the gradient (``g <- g + wd W``), then ``m <- lerp(m, g, 1 - b1)``, ``v <- b2 v +
    (1 - b2) g^2``, ``W <- W - lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps)``."""

    STATE = ("exp_avg", "exp_avg_sq")
    DECOUPLED = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 schedule=None):
        where = f"{type(self).__name__}: "
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
        self._betas = tuple(_checks.in_range(f"beta{i}", beta, where, 0.0, 1.0)
                            for i, beta in enumerate(betas, start=1))
        self._eps = _checks.in_range("eps", eps, where, low_open=True)
        super().__init__(lr, weight_decay, schedule)

    @property
    def betas(self) -> tuple:
        return self._betas

    @property
    def eps(self) -> float:
        return self._eps

    def hyperparameters(self) -> dict:
        return {"lr": self._lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}

    def _rule(self, lr, t):
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1 ** t  # in double, as PyTorch's Python floats
        bias_correction2 = 1 - beta2 ** t
        if self.DECOUPLED:
            l2, decay = 0.0, 1 - lr * self.weight_decay
        else:
            l2, decay = self.weight_decay, 1.0
        scalars = (1 - beta1, beta2, 1 - beta2, self.eps, l2, decay, lr / bias_correction1,
                   bias_correction2 ** 0.5)

        def kernel(w, g, state):
            ops.adam(w, g, state[0], state[1], *scalars)
        return {"kernels": (kernel, kernel)}


class AdamW(Adam):
    """``torch.optim.AdamW(params, lr, betas, eps, weight_decay=0.01)``: decoupled weight
    decay, ``W <- W (1 - lr wd)`` first, then Adam's step without the L2 term."""

    DECOUPLED = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 schedule=None):
        super().__init__(lr, betas, eps, weight_decay, schedule)


OPTIMIZERS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}
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
