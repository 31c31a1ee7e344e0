"""Built-in data: real handwritten digits, a synthetic regression set, and a seeded split.

The digits (1,797 scanned 8x8 images, 10 classes; see ``gpu_mlp/data/DIGITS.txt`` for
their source and licence) ship inside the package as a 45 KB ``.npz`` of uint8 pixels
and labels: real data for the quick start and the tests with no download, no network
and no heavy dependency such as scikit-learn.

>>> X, y = digits()
>>> X.shape, y.shape, X.dtype, y.dtype
((1797, 64), (1797,), dtype('float64'), dtype('int64'))
>>> X_train, X_test, y_train, y_test = train_test_split(X, y, test_fraction=0.2, seed=0)
>>> len(X_train), len(X_test)
(1438, 359)
"""

from __future__ import annotations

import numbers
from importlib import resources

import numpy as np

from . import _checks

DIGITS_CLASSES = 10
_PIXEL_MAX = 16  # each pixel counts the set pixels of a 4x4 block of a 32x32 bitmap


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits: X (1797, 64) float64 in [0, 1] (pixels / 16), y (1797,) int64 in 0..9."""
    with resources.files("gpu_mlp.data").joinpath("digits.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
    return images.astype(np.float64) / _PIXEL_MAX, labels.astype(np.int64)


def regression(n: int = 2000, d_in: int = 8, d_out: int = 1, noise: float = 0.1,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic regression set for the squared loss: X (n, d_in), Y (n, d_out), float64.

    The targets are random sine features of X, ``sin(X A) B`` with Gaussian ``A`` and
    ``B``, scaled to mean 0 and variance 1 per output, plus Gaussian noise of standard
    deviation ``noise``: a linear model explains only about 60% of their variance, a
    small MLP most of it.
    """
    n = _checks.integer("n", n, 2, "regression: ")  # the targets are scaled by their std
    d_in = _checks.integer("d_in", d_in, 1, "regression: ")
    d_out = _checks.integer("d_out", d_out, 1, "regression: ")
    seed = _checks.integer("seed", seed, 0, "regression: ")
    noise = _number("regression", "noise", noise)
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"regression: noise must be a finite number >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    features = 4 * d_in
    X = rng.standard_normal((n, d_in))
    A = rng.standard_normal((d_in, features)) * (1.5 / np.sqrt(d_in))  # sin of N(0, 1.5^2)
    B = rng.standard_normal((features, d_out))
    Y = np.sin(X @ A) @ B
    Y = (Y - Y.mean(axis=0)) / Y.std(axis=0)
    return X, Y + noise * rng.standard_normal(Y.shape)


def train_test_split(X, y, test_fraction: float = 0.2, seed: int = 0):
    """``(X_train, X_test, y_train, y_test)``: a random split that depends only on ``seed``.

    ``test_fraction`` of the rows (rounded, at least one) go to the test part.
    """
    X, y = np.asarray(X), np.asarray(y)
    n = len(X)
    if len(y) != n:
        raise ValueError(f"train_test_split: X and y must have the same number of rows, "
                         f"got {n} and {len(y)}")
    seed = _checks.integer("seed", seed, 0, "train_test_split: ")
    test_fraction = _number("train_test_split", "test_fraction", test_fraction)
    if not 0 < test_fraction < 1:
        raise ValueError(f"train_test_split: test_fraction must lie strictly between 0 and 1, "
                         f"got {test_fraction}")
    n_test = held_out_rows(n, test_fraction)
    if n_test >= n:
        raise ValueError(f"train_test_split: test_fraction={test_fraction} leaves no training "
                         f"rows out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return X[train], X[test], y[train], y[test]


def held_out_rows(n: int, test_fraction: float) -> int:
    """How many of ``n`` rows :func:`train_test_split` holds out: the fraction, rounded,
    at least one."""
    return max(1, round(n * test_fraction))


# Argument checks that name the function and the argument: int(2.5) would truncate, a
# bool is an int to Python, and NumPy's own errors name neither.

def _number(function: str, name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{function}: {name} must be a number, got {value!r}")
    return float(value)
