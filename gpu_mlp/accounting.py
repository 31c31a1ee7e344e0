"""The privacy spent by DP-SGD, counted by Google's ``dp-accounting``.

A run of :mod:`gpu_mlp.privacy` is a Poisson-sampled Gaussian mechanism (sampling rate
``q``, noise multiplier ``sigma``) composed once per step (docs/MATH.md, "DP-SGD").
:func:`epsilon` gives its (epsilon, delta) guarantee; :func:`noise_multiplier` goes the
other way, from a target epsilon to the least noise that meets it.

Nothing of the arithmetic is redone here: a subtly wrong accountant fails silently (the
model trains as well, the number printed is false), so the run is described as the
``DpEvent`` ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)),
steps)`` and handed to one of the library's accountants (``accountant=``):

* ``"rdp"`` (default): ``dp_accounting.rdp.RdpAccountant``, its default orders. Cheap (at
  most ~0.2 s a call), a valid upper bound, typically 5-40 % above the PLD's epsilon.
  With little noise and a large q (sigma 0.5, q 0.05) the library logs that some
  fractional orders did not converge: the bound stays valid, from the other orders.
* ``"pld"``: ``dp_accounting.pld.PLDAccountant``, the privacy loss distribution: tighter,
  about 0.02-0.5 s a call for usual settings, but minutes and gigabytes with tiny noise
  (sigma well below 0.3, epsilons in the thousands): use ``"rdp"`` there.

Both count neighbouring datasets as differing by adding or removing one sample
(``ADD_OR_REMOVE_ONE``), the relation Poisson sampling is analysed under.
``dp-accounting`` is the ``[dp]`` extra, imported only when an epsilon is computed.

>>> from gpu_mlp import accounting
>>> eps = accounting.epsilon(1.1, 256 / 60000, 14000, 1e-5)      # doctest: +SKIP
>>> sigma = accounting.noise_multiplier(3.0, 1e-5, 0.01, 1000)   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import math

from . import _checks

__all__ = ["ACCOUNTANTS", "MAX_NOISE_MULTIPLIER", "MIN_NOISE_MULTIPLIER", "NOISE_RTOL",
           "PLD_VALUE_DISCRETIZATION", "epsilon", "noise_multiplier"]

ACCOUNTANTS = ("rdp", "pld")

# The PLD accountant rounds privacy losses up to a grid of this step (a pessimistic
# discretisation: the epsilon stays an upper bound). The library's default, 1e-4, costs
# 4-10x the time for a gain below 0.5 % of epsilon up to ~1e4 steps (2 % at 2e5 steps,
# still well inside RDP's looseness); 1e-2 overstates epsilon by 30 % at 1e4 steps.
PLD_VALUE_DISCRETIZATION = 1e-3

# noise_multiplier searches sigma in [MIN, MAX]. Above 1e3 the noise swamps any clipped
# gradient sum (of norm <= B C), so a target that needs more is reported as out of reach;
# below 1e-3 epsilon is already ~1e5 or more, no privacy at all.
MAX_NOISE_MULTIPLIER = 1e3
MIN_NOISE_MULTIPLIER = 1e-3
# The search runs on log(sigma), so its tolerance is relative: the sigma returned is
# within a factor exp(NOISE_RTOL) of the smallest one that meets the target.
NOISE_RTOL = 1e-4

_HINT = 'privacy accounting needs Google\'s dp-accounting: pip install "gpu_mlp[dp]"'


def _library():
    """The ``dp_accounting`` module, with its accountants' submodules loaded."""
    try:
        import dp_accounting
        from dp_accounting import pld, rdp  # noqa: F401 -- where the accountants live
    except ImportError as e:
        raise ImportError(f"{_HINT} ({e})") from None
    return dp_accounting


# --- argument checks ------------------------------------------------------------------

def _accountant(accountant) -> str:
    if not isinstance(accountant, str):
        raise TypeError(f"accountant must be a str, one of {', '.join(ACCOUNTANTS)}; got "
                        f"{accountant!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; valid: {', '.join(ACCOUNTANTS)}")
    return accountant


def _common(sample_rate, steps, delta, accountant) -> tuple:
    q = _checks.in_range("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True,
                  high_open=False)
    steps = _checks.integer("steps", steps, minimum=0)
    # delta = 0 is pure DP, which no Gaussian mechanism gives (epsilon = inf); delta = 1
    # promises nothing
    delta = _checks.in_range("delta", delta, low=0.0, high=1.0, low_open=True, high_open=True)
    return q, steps, delta, _accountant(accountant)


# --- the accountants --------------------------------------------------------------------

def _event(dp, sigma: float, q: float, steps: int):
    return dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma)),
                                  steps)


def _fresh(dp, accountant: str):
    if accountant == "rdp":
        return dp.rdp.RdpAccountant()
    return dp.pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)


# Cached: fit reports epsilon every epoch, and noise_multiplier's bracket search asks for
# the same points again (a PLD evaluation is worth keeping).
class _LibraryNotes(logging.Filter):
    """Drops dp-accounting's absl warnings that an RDP order did not converge and was
    left out (the bound stays valid: the module's notes say so once), and that a
    divergence came out negative by rounding, with huge noise, and counts as 0 (as it
    should: the epsilon reported is then 0). A run's stderr should show what concerns
    the user, not dozens of these."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not ("failed to converge" in message or "Negative Renyi divergence" in message)


logging.getLogger("absl").addFilter(_LibraryNotes())


@functools.lru_cache(maxsize=1024)
def _epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    dp = _library()
    if accountant == "rdp":
        # RDP composes linearly: the accountant adds steps x the one-step RDP vector
        # and converts with compute_epsilon. Computing that vector once per (sigma, q)
        # makes fit's epsilon of every epoch (and the calibration's probes over steps)
        # cost a conversion, not the ~0.1 s of the fractional orders each time.
        one_step = _rdp_of_one_step(sigma, q)
        if one_step is not None:
            orders, rdp = one_step
            return float(dp.rdp.compute_epsilon(orders, steps * rdp, delta)[0])
    return float(_fresh(dp, accountant).compose(_event(dp, sigma, q, steps)).get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def _rdp_of_one_step(sigma: float, q: float):
    """``(orders, RDP vector)`` of one step, read from a one-step RdpAccountant (None if
    this version of the library keeps them elsewhere: then every call composes)."""
    dp = _library()
    accountant = dp.rdp.RdpAccountant()
    accountant.compose(_event(dp, sigma, q, 1))
    orders, rdp = getattr(accountant, "_orders", None), getattr(accountant, "_rdp", None)
    return None if orders is None or rdp is None else (orders, rdp)


def epsilon(noise_multiplier, sample_rate, steps, delta, accountant="rdp") -> float:
    """The epsilon at ``delta`` spent by ``steps`` DP-SGD steps.

    Args:
        noise_multiplier: sigma, the noise's standard deviation over the clipping norm
            (finite, >= 0).
        sample_rate: q, the Poisson sampling probability of each sample per step (the
            expected batch size over the dataset size), in (0, 1].
        steps: the number of steps composed (an integer >= 0).
        delta: the delta of the guarantee, in (0, 1).
        accountant: ``"rdp"`` or ``"pld"`` (see the module's notes).

    Returns:
        epsilon as a float: 0.0 for no steps, ``math.inf`` for steps without noise.
    """
    sigma = _checks.in_range("noise_multiplier", noise_multiplier)
    q, steps, delta, accountant = _common(sample_rate, steps, delta, accountant)
    if steps == 0:  # nothing released (and the library refuses a count of 0)
        return 0.0
    if sigma == 0.0:  # the clipped sum itself is released: no privacy
        return math.inf
    _library()  # the missing-library error even where the value is cached
    try:
        return _epsilon(sigma, q, steps, delta, accountant)
    except (ArithmeticError, MemoryError) as e:  # an extreme sigma: the library's limits
        raise ValueError(f"noise_multiplier {sigma:g} is beyond what the {accountant} "
                         f"accountant can compute epsilon for ({type(e).__name__}: {e}); "
                         f"calibrated noise multipliers lie in [{MIN_NOISE_MULTIPLIER:g}, "
                         f"{MAX_NOISE_MULTIPLIER:g}]") from None


# --- calibration --------------------------------------------------------------------------

def noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant="rdp") -> float:
    """The smallest noise multiplier whose epsilon at ``delta`` after ``steps`` steps
    at sample rate ``sample_rate`` is at most ``target_epsilon``.

    Found by ``dp_accounting.calibrate_dp_mechanism`` (Brent's method) on log(sigma):
    the sigma returned meets the target -- ``epsilon(sigma, ...) <= target_epsilon`` --
    and is within a factor ``exp(NOISE_RTOL)`` (1 + 1e-4) of the smallest that does.
    0.0 for ``steps == 0`` (nothing to protect).

    Raises:
        ValueError: if even ``MAX_NOISE_MULTIPLIER`` (1e3) leaves epsilon above the
            target, or if ``target_epsilon`` is so large that ``MIN_NOISE_MULTIPLIER``
            (1e-3) already meets it; and for bad arguments (as :func:`epsilon`).
    """
    target = _checks.in_range("target_epsilon", target_epsilon, low_open=True)
    q, steps, delta, accountant = _common(sample_rate, steps, delta, accountant)
    if steps == 0:
        return 0.0
    _library()
    return _calibrate(target, delta, q, steps, accountant)


def _bracket(eps, target: float, start: float, factor: float, where: str) -> tuple:
    """``(lo, hi)`` with ``eps(lo) > target >= eps(hi)``, ``hi <= factor lo``, walking
    from ``start`` by ``factor``; ``eps(MAX_NOISE_MULTIPLIER) <= target`` is known."""
    x = min(max(start, MIN_NOISE_MULTIPLIER), MAX_NOISE_MULTIPLIER)
    if eps(x) > target:
        while True:  # ends by MAX at the latest
            lo, x = x, min(x * factor, MAX_NOISE_MULTIPLIER)
            if eps(x) <= target:
                return lo, x
    while True:
        hi, x = x, max(x / factor, MIN_NOISE_MULTIPLIER)
        reached = eps(x)
        if reached > target:
            return x, hi
        if x == MIN_NOISE_MULTIPLIER:
            raise ValueError(f"target_epsilon={target:g} is too large to calibrate for "
                             f"{where}: even noise_multiplier={MIN_NOISE_MULTIPLIER:g}, the "
                             f"smallest searched, gives epsilon={reached:.6g} (no privacy)")


@functools.lru_cache(maxsize=128)
def _calibrate(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    dp = _library()
    where = f"delta={delta:g}, sample_rate={q:g}, steps={steps} ({accountant} accountant)"

    def eps(sigma: float) -> float:
        return _epsilon(sigma, q, steps, delta, accountant)

    reached = eps(MAX_NOISE_MULTIPLIER)
    if reached > target:
        raise ValueError(f"target_epsilon={target:g} cannot be met at {where}: even "
                         f"noise_multiplier={MAX_NOISE_MULTIPLIER:g}, the largest searched, "
                         f"gives epsilon={reached:.6g}")
    if accountant == "rdp":
        start, factor = 1.0, 2.0
    else:
        # A PLD evaluation costs more the larger its epsilon, so walk in from RDP's answer
        # (cheap; PLD's sigma is typically 5-15 % below it) rather than from far away.
        rdp_reachable = _epsilon(MAX_NOISE_MULTIPLIER, q, steps, delta, "rdp") <= target
        start = _calibrate(target, delta, q, steps, "rdp") if rdp_reachable else \
            MAX_NOISE_MULTIPLIER
        factor = 1.25
    lo, hi = _bracket(eps, target, start, factor, where)
    # The library checks the root it returns and steps to the safe side of it, so
    # epsilon(exp(x)) <= target holds for the very float returned (the same event).
    x = dp.calibrate_dp_mechanism(
        lambda: _fresh(dp, accountant),
        lambda log_sigma: _event(dp, math.exp(log_sigma), q, steps),
        target, delta,
        bracket_interval=dp.ExplicitBracketInterval(math.log(lo), math.log(hi)),
        tol=NOISE_RTOL)
    return math.exp(x)
