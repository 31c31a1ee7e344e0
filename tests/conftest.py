"""Shared test helpers: the ``gpu`` marker, the ``device`` fixture, and random
parameters and targets for any network and loss.

Every test marked ``gpu`` is skipped, with a reason, where CuPy sees no CUDA device, so
the suite runs everywhere and the same bodies run on CuPy where a GPU is present. The
builders are handed out by session-scoped fixtures (rather than imported), so plain
tests and hypothesis tests can both use them.
"""

import shutil

import numpy as np
import pytest

import gpu_mlp


def pytest_collection_modifyitems(config, items):
    if gpu_mlp.gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Each backend in turn: ``"cpu"`` (NumPy) always, ``"cuda"`` (CuPy) on a GPU."""
    return request.param


def random_params(rng, sizes, dtype=np.float64):
    """Random ``[(W_k, b_k)]`` for layer widths ``sizes``, scaled so activations stay O(1)."""
    return [((rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(dtype),
             (0.5 * rng.standard_normal(d_out)).astype(dtype))
            for d_in, d_out in zip(sizes[:-1], sizes[1:])]


def random_targets(rng, loss, batch, d, dtype=np.float64, soft=False):
    """Valid targets Y for ``batch`` outputs of width ``d`` under the loss named ``loss``.

    softmax_cross_entropy gets integer labels, or probability rows when ``soft``.
    """
    if loss == "squared":
        return rng.standard_normal((batch, d)).astype(dtype)
    if loss == "logistic":
        return rng.choice([-1.0, 1.0], size=(batch, d)).astype(dtype)
    if loss == "softmax_cross_entropy":
        if soft:
            return rng.dirichlet(np.ones(d), size=batch).astype(dtype)
        return rng.integers(0, d, size=batch)
    raise ValueError(f"no target builder for loss {loss!r}")


@pytest.fixture(scope="session")
def make_params():
    """:func:`random_params`: ``make_params(rng, sizes, dtype=np.float64)``."""
    return random_params


@pytest.fixture(scope="session")
def make_targets():
    """:func:`random_targets`: ``make_targets(rng, loss, batch, d, dtype, soft=False)``."""
    return random_targets


@pytest.fixture(scope="session")
def host_cupy_lib(tmp_path_factory):
    """The CUDA math built for the host and host_cupy's launchers (the CuPy stand-in),
    built once per session for every module that runs the engine's CuPy path here."""
    if shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler (g++)")
    import host_cupy

    return host_cupy.build(tmp_path_factory.mktemp("host_cupy"))
