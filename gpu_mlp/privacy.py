"""Differentially private SGD in one backward pass, from the factored gradients.

:class:`DP` holds a private run's settings (clipping norm ``C``, noise multiplier,
delta, seed) and its step count; pass it as ``dp=`` to :meth:`Network.train_step` or
:meth:`Network.fit`. DP-SGD (Abadi et al. 2016) clips every sample's gradient (over all
layers) to norm ``C``, sums, adds Gaussian noise ``N(0, sigma^2 C^2 I)`` and divides by
the batch size. The per-sample norms come from the factors the ordinary backward pass
already has (:func:`gpu_mlp.norms.per_sample_squares`), so no second backward pass runs
and no per-sample gradient is formed (Opacus needs one or the other) -- but a
convolution's whose norm takes the direct form, which computes them anyway: where they
take no more memory than its rows they are kept, and the clipped sum is a GEMV over
them (:func:`gpu_mlp.norms.forms_gradients`). The formulas
and the noise generator are in docs/MATH.md, "Factored weight gradients" and "DP-SGD".

Per step, this module's stage of the backward pass (:mod:`gpu_mlp.updates`) adds each
layer's per-sample squared norms and *keeps* its factors; after the last layer it scales
each layer's ``T`` row by row by the clipping factors and hands the factors on, so plain
SGD is one GEMM straight into ``W_k`` (kept per-sample gradients: their clipped sum,
formed, to the update rule). The noise is added where the summed gradient is
formed (``W_k``, or the optimizer's scratch), keyed by ``(seed, step, layer, tensor)``:
the same seed gives the same noise, bit for bit, on a CPU and a GPU.

The privacy spent is counted by :mod:`gpu_mlp.accounting` (the ``[dp]`` extra):
:meth:`Network.fit` samples batches by Poisson sampling (:func:`poisson_batches`), as the
accountant assumes, and reports epsilon at ``delta`` after every epoch.

>>> import numpy as np, gpu_mlp
>>> from gpu_mlp.privacy import DP
>>> net = gpu_mlp.MLP([4, 8, 3], loss="softmax_cross_entropy", device="cpu", seed=0)
>>> dp = DP(max_grad_norm=1.0, noise_multiplier=1.1, seed=0)
>>> loss = net.train_step(np.ones((5, 4)), np.array([0, 1, 2, 1, 0]), 0.1, dp=dp)
>>> dp.steps
1
"""

from __future__ import annotations

import secrets
from typing import NamedTuple, Optional

import numpy as np

from . import _checks, accounting, norms, ops
from .updates import Rule, Sink, Stage

__all__ = ["DP"]


class DP:
    """The settings and the position of a differentially private training run.

    Pass it as ``dp=`` to :meth:`Network.train_step` (one private step on that batch,
    divided by its size) or :meth:`Network.fit` (Poisson-sampled batches, epsilon
    reported per epoch).

    Args:
        max_grad_norm: C, the norm each sample's gradient is clipped to (> 0).
        noise_multiplier: sigma; the noise of the summed gradient is N(0, sigma^2 C^2)
            per entry (>= 0; 0 clips without noise: no privacy).
        delta: the delta of the (epsilon, delta) guarantee reported, in (0, 1).
        seed: the seed of the noise and of fit's Poisson sampling; with the step count it
            fixes every step's noise. None (the default): 64 bits from the operating
            system (``secrets``), secret -- the guarantee holds only while whoever sees
            the model cannot know the noise (or which rows each step took). A seed
            others may know (0, a published one) reproduces a run exactly, noise
            included: for tests and reproductions, not for privacy. The seed is part of
            :meth:`state_dict`, so a checkpoint of a private run is as secret as its data.
            Data-parallel ranks take rank 0's drawn seed at their first step (:meth:`agree`).
        accountant: ``"rdp"`` or ``"pld"`` (:mod:`gpu_mlp.accounting`).
    """

    def __init__(self, max_grad_norm, noise_multiplier, delta=1e-5, seed=None,
                 accountant="rdp"):
        self.max_grad_norm, self.noise_multiplier, self.delta = (max_grad_norm,
                                                                 noise_multiplier, delta)
        self.drawn = seed is None  # a secret seed: its repr does not show it
        self._agreed = None  # id of the communicator whose ranks took rank 0's (agree)
        self.seed = secrets.randbits(64) if self.drawn else seed
        self.accountant = accountant
        self.steps = 0  # private steps taken: the position of the noise stream
        self.target_epsilon = None  # what for_epsilon solved the noise for, if it did

    def __setattr__(self, name, value):
        """The settings are checked whenever they are set, by the constructor or later
        (``dp.noise_multiplier = 2.0`` between runs): a step never reads a bad one."""
        check = _SETTINGS.get(name)
        super().__setattr__(name, value if check is None else check(value))

    @classmethod
    def for_epsilon(cls, target_epsilon, delta, sample_rate, steps, max_grad_norm, seed=None,
                    accountant="rdp") -> "DP":
        """The DP whose noise multiplier just reaches ``target_epsilon`` at ``delta``
        after ``steps`` steps of Poisson sampling at rate ``sample_rate``; a ValueError
        if no noise within :mod:`gpu_mlp.accounting`'s bound does, or ``steps`` is below 1."""
        if _checks.integer("steps", steps, minimum=0) < 1:  # (a TypeError if no integer)
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}: a DP for no "
                             f"steps would add no noise (and spend infinite epsilon on the "
                             f"first step it takes)")
        sigma = accounting.noise_multiplier(target_epsilon, delta, sample_rate, steps,
                                            accountant=accountant)
        dp = cls(max_grad_norm, sigma, delta=delta, seed=seed, accountant=accountant)
        dp.target_epsilon = float(target_epsilon)  # a resumed run can be asked for it again
        return dp

    def agree(self, comm) -> None:
        """Data-parallel: a seed drawn on each rank becomes rank 0's, at the first step
        with ``comm`` (every rank steps alike: one collective, once), so that every rank
        adds the same noise; a seed given is left as it is (fit compares them)."""
        if self.drawn and self._agreed != id(comm):
            agree(self, comm)

    def epsilon(self, sample_rate, steps=None) -> float:
        """The epsilon at ``self.delta`` after ``steps`` (default: the steps taken)
        Poisson-sampled steps at rate ``sample_rate``."""
        return accounting.epsilon(self.noise_multiplier, sample_rate,
                                  self.steps if steps is None else steps, self.delta,
                                  accountant=self.accountant)

    def __repr__(self) -> str:
        seed = "<secret>" if self.drawn else self.seed  # not into logs
        return (f"DP(max_grad_norm={self.max_grad_norm}, noise_multiplier="
                f"{self.noise_multiplier}, delta={self.delta}, seed={seed}, "
                f"accountant={self.accountant!r})")

    # --- state: a checkpoint continues the noise stream where it stopped -------------

    def state_dict(self) -> dict:
        state = {"max_grad_norm": self.max_grad_norm, "noise_multiplier": self.noise_multiplier,
                 "delta": self.delta, "seed": self.seed, "accountant": self.accountant,
                 "steps": self.steps}
        if self.target_epsilon is not None:  # absent otherwise, as before it existed
            state["target_epsilon"] = self.target_epsilon
        if self.drawn:  # a secret seed stays one (not shown) where the state goes
            state["drawn"] = True
        return state

    @classmethod
    def from_state_dict(cls, state) -> "DP":
        keys = ("max_grad_norm", "noise_multiplier", "delta", "seed", "accountant", "steps")
        if not (isinstance(state, dict)
                and set(keys) <= set(state) <= {*keys, "target_epsilon", "drawn"}):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"a DP state must have the entries {list(keys)} (and may have "
                             f"target_epsilon and drawn), got {got}")
        if state["seed"] is None:  # (None would draw a new one: not this run's noise)
            raise ValueError("DP: seed must be an integer in [0, 2^64), got None")
        dp = cls(*(state[key] for key in keys[:5]))
        if state.get("drawn", False) is not False:
            if state["drawn"] is not True:
                raise ValueError(f"DP: drawn must be true or false, got {state['drawn']!r}")
            dp.drawn = True
        dp.steps = state["steps"]
        if "target_epsilon" in state:
            dp.target_epsilon = state["target_epsilon"]
        return dp

    # --- the stage of the backward pass ----------------------------------------------

    def stage(self, net, downstream: Sink, rows: int, batch: float,
              scalars=None) -> "_Private":
        """The sink of one private step over ``rows`` local samples, dividing by
        ``batch`` (the batch size, or the expected one under Poisson sampling).
        ``scalars``: a :class:`gpu_mlp.plan.StepScalars` (CuPy), whose device counter
        keys the noise."""
        return _Private(self, net, downstream, rows, batch, scalars)

    def noise_std(self, batch: float) -> float:
        """The std of the noise of the gradient, per entry, of a step dividing by
        ``batch``: ``sigma C / batch``."""
        return self.noise_multiplier * self.max_grad_norm / float(batch)


def agree(dp: Optional[DP], comm) -> None:
    """:meth:`DP.agree` as fit calls it, before it compares the ranks' settings: one
    collective on every rank, whatever its ``dp`` (None too), so that ranks that differ
    in DP reach the comparison, which names the difference, instead of waiting for each
    other in different collectives. A drawn seed becomes rank 0's where rank 0's was
    drawn too (else the seeds differ, and fit says so)."""
    drawn = dp is not None and dp.drawn
    seed = comm.bcast(dp.seed if drawn else None)
    if drawn and seed is not None:
        dp.seed, dp._agreed = seed, id(comm)


def _accountant(name):
    if name not in accounting.ACCOUNTANTS:
        raise ValueError(f"DP: unknown accountant {name!r}; valid: "
                         f"{', '.join(accounting.ACCOUNTANTS)}")
    return name


# DP's settings, each checked as it is set (DP.__setattr__)
_SETTINGS = {
    "max_grad_norm": lambda v: _checks.in_range("max_grad_norm", v, "DP: ", low_open=True),
    "noise_multiplier": lambda v: _checks.in_range("noise_multiplier", v, "DP: "),
    "delta": lambda v: _checks.in_range("delta", v, "DP: ", 0.0, 1.0, low_open=True),
    "seed": lambda v: _checks.integer("seed", v, 0, "DP: ", below=2**64),  # Philox's key
    "accountant": _accountant,
    "steps": lambda v: _checks.integer("steps", v, 0, "DP: ", below=2**64),
    "target_epsilon": lambda v: None if v is None else _checks.in_range(
        "target_epsilon", v, "DP: ", low_open=True),
}


class _Formed(NamedTuple):
    """A layer's per-sample gradients, kept by :class:`_Private`: G (B, d_out, K), g
    (B, d_out), and the (kh, kw, c_in) of a convolution's columns in the windows' order
    (None: W's)."""

    G: object
    g: object
    windows: Optional[tuple]


class _Private(Stage):
    """One private step: keeps every layer's factors and sums the per-sample squared
    norms; at the end scales each sample's rows of T by its clipping factor over the
    batch size and hands the factors on, with the noise, to the next stage.

    A convolution whose norms take the direct form (:func:`gpu_mlp.norms.forms_gradients`)
    keeps its per-sample gradients instead, when the next stage is the update rule (it
    takes a formed gradient): the clipped sum is then a GEMV of them against the
    clipping factors, handed on formed (``Rule.gradient``)."""

    keeps_factors = True

    def __init__(self, dp: DP, net, downstream: Sink, rows: int, batch: float, scalars=None):
        super().__init__(downstream)
        self.dp, self.net, self.rows = dp, net, rows
        self.batch = float(batch)
        self.squares = net.training_workspace.take((rows,)) if rows else net.xp.zeros(0, net.dtype)
        self.squares.fill(0)
        self.kept = []
        self.noise_std = dp.noise_std(self.batch)  # of the gradient, per entry
        # on a GPU the step counter is the device's (a replayed step advances it there)
        self.device_step = None if scalars is None else scalars.dp_step
        # a communication stage takes factors only; a rule also takes a formed gradient
        self.takes_gradients = (isinstance(downstream, Rule)
                                and type(downstream).gradient is not Rule.gradient)

    def __call__(self, k, T_rows, X_rows, ones, noise=None):
        B, xp, ws = self.rows, self.net.xp, self.net.training_workspace
        if B:
            # (a convolution's rows may come in its windows' column order: the norms are
            # the same in any order, a gradient is permuted into W's -- ops.weight_gradient)
            T = T_rows.reshape(B, -1, T_rows.shape[1])
            X = ops.sample_rows(X_rows, B)
            (P, d_out), K = T.shape[1:], X.shape[2]
            if self.takes_gradients and norms.forms_gradients(P, d_out, K):
                G, g = ws.take((B, d_out, K)), ws.take((B, d_out))
                norms.per_sample_gradients(xp, T, X, G, g, ws)
                norms.add_row_squares(xp, G.reshape(B, -1), g, self.squares, ws)
                windows = X_rows.shape[1:] if X_rows.ndim == 4 else None
                self.kept.append((k, _Formed(G, g, windows)))
                return
            norms.add_squares(xp, T, X, self.squares, ws)
        self.kept.append((k, (T_rows, X_rows, ones)))

    def finish(self):
        B, C = self.rows, self.dp.max_grad_norm
        if B:
            # c_i / batch with c_i = min(1, C / ||g_i||), which is C / max(||g_i||, C)
            # (and 1 for a zero gradient), computed in place in the squares' buffer
            factors = self.squares
            ops.clip_factors(factors, C, C / self.batch)
        ws = self.net.training_workspace
        for k, kept in self.kept:
            if isinstance(kept, _Formed):  # sum_i c_i [G_i | g_i], two GEMVs
                G, g, windows = kept
                W_size = G[0].size
                held = ws.take((1, W_size + g.shape[1]))
                flat = held.reshape(-1)
                if windows is None:
                    ops.gemv("T", G.reshape(B, -1), factors, flat[:W_size])
                else:  # summed in the windows' order, then into W's
                    taps = ws.take((G.shape[1], *windows))
                    ops.gemv("T", G.reshape(B, -1), factors, taps.reshape(-1))
                    ops.to_weight_order(taps, flat[:W_size])
                    ws.give(taps)
                ops.gemv("T", g, factors, flat[W_size:])
                self.downstream.gradient(k, flat, noise=self._noise)
                ws.give(held, G, g)
                continue
            T_rows, X_rows, ones = kept
            if B:
                ops.scale_rows(T_rows.reshape(B, -1, T_rows.shape[1]), factors)
            self.downstream(k, T_rows, X_rows, ones, noise=self._noise)
        self.kept = []
        if B:
            self.net.training_workspace.give(self.squares)
        super().finish()
        self.dp.steps += 1

    def _noise(self, k, which, array, alpha):
        """Add ``alpha`` times the noise of layer k's W (which 0) or b (1) gradient."""
        if self.noise_std == 0:
            return
        if self.device_step is not None:  # alpha is a device view: alpha times the std
            ops.add_gaussian(array, alpha, self.dp.seed, 2 * k + which, self.device_step)
            return
        ops.add_gaussian(array, alpha * self.noise_std, self.dp.seed, 2 * k + which,
                         self.dp.steps)


def sample_rate(batch_size: int, n: int) -> float:
    """Poisson sampling's rate ``q = min(1, batch_size / n)`` (computed so that a batch
    size past any float cannot overflow)."""
    return min(batch_size, n) / n


def poisson_batches(n: int, batch_size: int, seed: int, epoch: int, secret: int = 0):
    """The batches of one epoch of Poisson sampling: ``ceil(n / batch_size)`` steps, each
    taking every row independently with probability ``q = min(1, batch_size / n)``; the
    rows depend on ``(secret, seed, epoch)`` alone -- ``secret`` the DP's seed: the
    amplification by sampling that the accountant counts holds only while the rows each
    step took are unknown. Yields arrays of row indices in order (possibly empty).

    Each sample is drawn as its size ``k ~ Binomial(n, q)`` and then ``k`` distinct rows,
    every such set alike likely: the distribution of n independent coin flips of
    probability q, at the cost of about ``q n`` draws, not n (a coin per row: for a
    large n, more host time than a replayed DP step on a GPU)."""
    q = sample_rate(batch_size, n)
    rng = np.random.default_rng([secret, seed, epoch, 1])  # apart from the shuffle's
    for _ in range(-(-n // batch_size)):  # (in integers: n / batch_size may underflow)
        rows = rng.choice(n, rng.binomial(n, q), replace=False)
        rows.sort()
        yield rows
