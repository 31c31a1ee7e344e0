"""gpu_mlp.accounting: DP-SGD's epsilon from Google's dp-accounting, and back.

The values are checked against the library called directly (the module must add no
arithmetic of its own), against the closed form of the Gaussian mechanism where there
is one (q = 1), for monotonicity, and for the calibration's round trip. Argument checks
and the missing-library message need no library. Parameters are chosen so that the
PLD accountant stays cheap (moderate epsilons, few hundred steps).
"""

import math
import sys

import pytest

from gpu_mlp import accounting

CASES = [  # (noise_multiplier, sample_rate, steps, delta)
    (1.1, 0.01, 1000, 1e-5),
    (2.0, 0.1, 50, 1e-6),
    (4.0, 1.0, 10, 1e-5),  # no sampling: q = 1
]


@pytest.fixture
def dp():
    return pytest.importorskip("dp_accounting")


def _direct(dp, sigma, q, steps, delta, accountant):
    event = dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma)),
                                   steps)
    if accountant == "rdp":
        acc = dp.rdp.RdpAccountant()
    else:
        acc = dp.pld.PLDAccountant(
            value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION)
    return acc.compose(event).get_epsilon(delta)


# --- the values ----------------------------------------------------------------------

@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
@pytest.mark.parametrize("sigma, q, steps, delta", CASES)
def test_epsilon_is_the_librarys(dp, accountant, sigma, q, steps, delta):
    got = accounting.epsilon(sigma, q, steps, delta, accountant=accountant)
    assert type(got) is float
    assert got == pytest.approx(_direct(dp, sigma, q, steps, delta, accountant), rel=1e-12)


def test_full_batch_matches_the_gaussian_closed_form(dp):
    """q = 1: T steps of noise sigma are one Gaussian mechanism of noise sigma/sqrt(T),
    whose exact delta(eps) is Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s) (Balle
    and Wang 2018). PLD is an upper bound within its discretisation; RDP is looser."""
    from scipy import optimize, stats

    sigma, steps, delta = 4.0, 10, 1e-5
    s = sigma / math.sqrt(steps)

    def delta_of(eps):
        return (stats.norm.cdf(1 / (2 * s) - eps * s)
                - math.exp(eps) * stats.norm.cdf(-1 / (2 * s) - eps * s))

    exact = optimize.brentq(lambda e: delta_of(e) - delta, 1e-6, 100, xtol=1e-12)
    pld = accounting.epsilon(sigma, 1.0, steps, delta, accountant="pld")
    rdp = accounting.epsilon(sigma, 1.0, steps, delta, accountant="rdp")
    assert exact <= pld <= exact * 1.001
    assert pld < rdp < 1.2 * exact


def test_pld_discretisation_costs_little(dp):
    """The coarser grid chosen (1e-3, not the library's 1e-4) is an upper bound within
    0.5 % of the fine one here."""
    sigma, q, steps, delta = 2.0, 0.05, 200, 1e-5
    event = dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma)),
                                   steps)
    fine = dp.pld.PLDAccountant(value_discretization_interval=1e-4).compose(
        event).get_epsilon(delta)
    ours = accounting.epsilon(sigma, q, steps, delta, accountant="pld")
    assert fine <= ours <= fine * 1.005


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_monotone(dp, accountant):
    def eps(sigma=2.0, steps=100, delta=1e-5):
        return accounting.epsilon(sigma, 0.05, steps, delta, accountant=accountant)

    assert 0 < eps(steps=10) < eps(steps=100) < eps(steps=1000)        # more steps: more
    assert eps(sigma=1.0) > eps(sigma=2.0) > eps(sigma=4.0) > 0         # more noise: less
    assert eps(delta=1e-3) < eps(delta=1e-5) < eps(delta=1e-7)          # smaller delta: more


def test_pld_is_tighter_than_rdp(dp):
    for sigma, q, steps, delta in CASES:
        assert (accounting.epsilon(sigma, q, steps, delta, accountant="pld")
                < accounting.epsilon(sigma, q, steps, delta, accountant="rdp"))


def test_no_steps_and_no_noise():
    # need no library: decided before it is asked
    assert accounting.epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    assert accounting.epsilon(0.0, 0.01, 0, 1e-5, accountant="pld") == 0.0
    assert accounting.epsilon(0.0, 0.01, 1, 1e-5) == math.inf
    assert accounting.epsilon(0, 1.0, 100, 1e-5, accountant="pld") == math.inf
    assert accounting.noise_multiplier(1.0, 1e-5, 0.01, 0) == 0.0
    assert accounting.noise_multiplier(1.0, 1e-5, 0.01, 0, accountant="pld") == 0.0


# --- calibration ----------------------------------------------------------------------

@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
@pytest.mark.parametrize("target, delta, q, steps", [
    (1.0, 1e-5, 0.01, 300),
    (8.0, 1e-5, 1.0, 10),
])
def test_noise_multiplier_round_trip(dp, accountant, target, delta, q, steps):
    sigma = accounting.noise_multiplier(target, delta, q, steps, accountant=accountant)
    assert type(sigma) is float
    assert accounting.MIN_NOISE_MULTIPLIER < sigma < accounting.MAX_NOISE_MULTIPLIER
    reached = accounting.epsilon(sigma, q, steps, delta, accountant=accountant)
    assert 0.99 * target <= reached <= target
    # the smallest to the stated tolerance: a little less noise misses the target
    less = sigma * math.exp(-2 * accounting.NOISE_RTOL)
    assert accounting.epsilon(less, q, steps, delta, accountant=accountant) > target


def test_pld_needs_less_noise(dp):
    args = (1.0, 1e-5, 0.01, 300)
    assert (accounting.noise_multiplier(*args, accountant="pld")
            < accounting.noise_multiplier(*args, accountant="rdp"))


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
def test_unreachable_target(dp, accountant):
    # 1e4 full-batch steps: even sigma = 1e3 spends epsilon ~ 0.5
    with pytest.raises(ValueError) as info:
        accounting.noise_multiplier(0.01, 1e-5, 1.0, 10000, accountant=accountant)
    message = str(info.value)
    reached = accounting.epsilon(1e3, 1.0, 10000, 1e-5, accountant=accountant)
    assert reached > 0.3
    for part in ("target_epsilon=0.01", "delta=1e-05", "sample_rate=1", "steps=10000",
                 "noise_multiplier=1000", f"epsilon={reached:.6g}"):
        assert part in message, message


def test_target_with_no_privacy(dp):
    with pytest.raises(ValueError, match=r"target_epsilon=1e\+09 is too large.*noise_multiplier=0.001"):
        accounting.noise_multiplier(1e9, 1e-5, 1.0, 1)


# --- arguments ------------------------------------------------------------------------

GOOD_EPSILON = dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5)
GOOD_NOISE = dict(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=10)
BAD = [  # (argument, value, error)
    ("noise_multiplier", -0.1, ValueError), ("noise_multiplier", math.nan, ValueError),
    ("noise_multiplier", math.inf, ValueError), ("noise_multiplier", "1", TypeError),
    ("noise_multiplier", True, TypeError), ("noise_multiplier", None, TypeError),
    ("target_epsilon", 0.0, ValueError), ("target_epsilon", -1.0, ValueError),
    ("target_epsilon", math.inf, ValueError), ("target_epsilon", math.nan, ValueError),
    ("target_epsilon", "1", TypeError), ("target_epsilon", True, TypeError),
    ("sample_rate", 0.0, ValueError), ("sample_rate", -0.5, ValueError),
    ("sample_rate", 1.5, ValueError), ("sample_rate", math.nan, ValueError),
    ("sample_rate", None, TypeError),
    ("steps", -1, ValueError), ("steps", 2.5, TypeError), ("steps", 10.0, TypeError),
    ("steps", True, TypeError), ("steps", "3", TypeError),
    ("delta", 0.0, ValueError), ("delta", 1.0, ValueError), ("delta", -1e-5, ValueError),
    ("delta", math.nan, ValueError), ("delta", "1e-5", TypeError),
    ("accountant", "gdp", ValueError), ("accountant", "RDP", ValueError),
    ("accountant", None, TypeError), ("accountant", 1, TypeError),
]


@pytest.mark.parametrize("argument, value, error", BAD,
                         ids=[f"{a}={v!r}" for a, v, _ in BAD])
def test_bad_arguments(argument, value, error):
    # need no library: checked before it is asked
    for function, good in ((accounting.epsilon, GOOD_EPSILON),
                           (accounting.noise_multiplier, GOOD_NOISE)):
        if argument not in good and argument != "accountant":
            continue
        with pytest.raises(error, match=argument) as info:
            function(**{**good, argument: value})
        assert repr(value) in str(info.value)
        if argument == "accountant" and error is ValueError:
            assert "rdp, pld" in str(info.value)


def test_missing_library_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import now fails
    for accountant in accounting.ACCOUNTANTS:
        with pytest.raises(ImportError, match=r'pip install "gpu_mlp\[dp\]"'):
            accounting.epsilon(1.0, 0.01, 10, 1e-5, accountant=accountant)
        with pytest.raises(ImportError, match=r'pip install "gpu_mlp\[dp\]"'):
            accounting.noise_multiplier(1.0, 1e-5, 0.01, 10, accountant=accountant)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the library's own, on its way down
@pytest.mark.parametrize("sigma, accountant", [(1e-300, "rdp"), (1e300, "rdp"),
                                               (1e-300, "pld"), (1e-5, "pld")])
def test_a_noise_the_accountant_cannot_compute_is_a_value_error_naming_it(dp, sigma,
                                                                         accountant):
    """dp_accounting's ZeroDivisionError, OverflowError or MemoryError (36 TiB for the
    PLD of sigma 1e-5) at extreme noise: a ValueError that names the noise multiplier."""
    with pytest.raises(ValueError, match=r"noise_multiplier .* is beyond what the "
                                         rf"{accountant} accountant can compute"):
        accounting.epsilon(sigma, 0.1, 10, 1e-5, accountant=accountant)
