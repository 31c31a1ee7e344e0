"""gpu_mlp.datasets: the shipped digits, the synthetic regression set, the seeded split."""

import numpy as np
import pytest

from gpu_mlp import datasets

# The class distribution of the UCI optdigits test set (its documentation, item 9).
UCI_TEST_SET_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(scope="module")
def digits():
    return datasets.digits()


def test_digits_are_the_uci_test_set(digits):
    X, y = digits
    assert X.shape == (1797, 64) and X.dtype == np.float64
    assert y.shape == (1797,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == UCI_TEST_SET_CLASS_COUNTS
    pixels = X * 16  # counts of set pixels in 4x4 blocks: integers 0..16
    assert np.array_equal(pixels, np.round(pixels))
    assert pixels.min() == 0 and pixels.max() == 16


def test_digits_classes_differ_in_mean_image(digits):
    # real images: the mean "0" has a hole in the middle that the mean "1" fills
    X, y = digits
    centre = [27, 28, 35, 36]  # the four middle pixels of the 8x8 image
    assert X[y == 0][:, centre].mean() < 0.3 < X[y == 1][:, centre].mean()


def test_digits_load_fresh_arrays(digits):
    X, y = datasets.digits()
    X[0, 0] = 99.0
    assert datasets.digits()[0][0, 0] == digits[0][0, 0] != 99.0


@pytest.mark.parametrize("n, fraction, n_test", [(1797, 0.2, 359), (10, 0.25, 2), (10, 0.01, 1)])
def test_split_sizes_and_partition(n, fraction, n_test):
    X = np.arange(n * 2, dtype=float).reshape(n, 2)
    y = np.arange(n)
    X_train, X_test, y_train, y_test = datasets.train_test_split(X, y, fraction, seed=3)
    assert len(X_test) == len(y_test) == n_test and len(X_train) == len(y_train) == n - n_test
    assert sorted(np.concatenate([y_train, y_test])) == list(range(n))  # a partition
    assert np.array_equal(X_train[:, 0], 2 * y_train)  # rows keep their labels
    assert np.array_equal(X_test[:, 0], 2 * y_test)


def test_split_depends_only_on_the_seed(digits):
    X, y = digits
    first = datasets.train_test_split(X, y, 0.2, seed=7)
    again = datasets.train_test_split(X, y, 0.2, seed=7)
    other = datasets.train_test_split(X, y, 0.2, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[3], other[3])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, 0.99])
def test_split_rejects_fractions_leaving_a_part_empty(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.train_test_split(np.zeros((10, 2)), np.zeros(10), fraction)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"seed": -1}, ValueError, "train_test_split: seed must be an integer >= 0, got -1"),
    ({"seed": 1.5}, TypeError, "train_test_split: seed must be an integer >= 0, got 1.5"),
    ({"seed": "a"}, TypeError, "train_test_split: seed must be an integer >= 0, got 'a'"),
    ({"seed": None}, TypeError, "seed must be an integer"),
    ({"test_fraction": "0.2"}, TypeError, "train_test_split: test_fraction must be a number, "
                                          "got '0.2'"),
    ({"test_fraction": None}, TypeError, "test_fraction must be a number"),
])
def test_split_names_a_bad_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        datasets.train_test_split(np.zeros((10, 2)), np.zeros(10), **kwargs)


def test_split_rejects_unpaired_rows():
    with pytest.raises(ValueError, match="same number of rows"):
        datasets.train_test_split(np.zeros((10, 2)), np.zeros(9))


def test_regression_shapes_scale_and_seed():
    X, Y = datasets.regression(n=500, d_in=3, d_out=2, noise=0.0, seed=1)
    assert X.shape == (500, 3) and Y.shape == (500, 2)
    np.testing.assert_allclose(Y.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(Y.std(axis=0), 1)
    again = datasets.regression(n=500, d_in=3, d_out=2, noise=0.0, seed=1)
    assert np.array_equal(Y, again[1])
    assert not np.array_equal(Y, datasets.regression(n=500, d_in=3, d_out=2, seed=2)[1])


def test_regression_noise_has_the_requested_size():
    _, clean = datasets.regression(noise=0.0)
    _, noisy = datasets.regression(noise=0.3)
    assert np.std(noisy - clean) == pytest.approx(0.3, rel=0.1)


def test_regression_is_not_linear():
    # a least-squares linear fit leaves much of the variance unexplained
    X, Y = datasets.regression(noise=0.0)
    A = np.column_stack([X, np.ones(len(X))])
    residual = Y - A @ np.linalg.lstsq(A, Y, rcond=None)[0]
    assert residual.var() > 0.25 * Y.var()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n": 0}, ValueError, "regression: n must be an integer >= 2, got 0"),
    ({"n": 2.5}, TypeError, "regression: n must be an integer >= 2, got 2.5"),
    ({"n": True}, TypeError, "regression: n must be an integer >= 2, got True"),
    ({"d_in": 0}, ValueError, "regression: d_in must be an integer >= 1"),
    ({"d_in": 3.0}, TypeError, "regression: d_in must be an integer >= 1, got 3.0"),
    ({"d_out": -1}, ValueError, "regression: d_out must be an integer >= 1, got -1"),
    ({"d_out": "2"}, TypeError, "regression: d_out must be an integer >= 1, got '2'"),
    ({"seed": -1}, ValueError, "regression: seed must be an integer >= 0, got -1"),
    ({"seed": "a"}, TypeError, "regression: seed must be an integer >= 0, got 'a'"),
    ({"noise": -0.1}, ValueError, "regression: noise"),
    ({"noise": float("nan")}, ValueError, "regression: noise"),
    ({"noise": "a"}, TypeError, "regression: noise must be a number, got 'a'"),
])
def test_regression_names_a_bad_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        datasets.regression(**kwargs)


def test_numpy_integers_are_integers():
    X, Y = datasets.regression(n=np.int64(20), d_in=np.int32(3), seed=np.uint8(1))
    assert X.shape == (20, 3) and np.array_equal(Y, datasets.regression(20, 3, seed=1)[1])
    parts = datasets.train_test_split(X, Y, np.float32(0.25), seed=np.int64(2))
    assert [len(p) for p in parts] == [15, 5, 15, 5]


def test_regression_needs_two_samples_to_scale_its_targets():
    """Its targets are scaled to variance 1: one sample's std is 0 (NaN targets before)."""
    with pytest.raises(ValueError, match="regression: n must be an integer >= 2, got 1"):
        datasets.regression(n=1)
    assert np.isfinite(datasets.regression(n=2)[1]).all()
