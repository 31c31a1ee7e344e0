"""DP-SGD's Gaussian noise (kernels/noise.cuh, ``ops.add_gaussian``) and the small ops
beside it (``ops.sgd``; GEMM and GEMV over an empty dimension), checked on a CPU.

The generator is checked against Random123's known-answer vectors, the very
``gaussian_noise`` body of ``ops.ELEMENTWISE`` (built for the host by ``cuda_host``)
against the documented map from (seed, stream, step, i) to Philox words to Box-Muller,
computed in extended precision (within a few ulps of double; float32 the exact value
rounded), and both backends' noise by its statistics: mean, standard deviation, a
Kolmogorov-Smirnov test against N(0, 1) (which a noise of the wrong scale fails),
independent streams, exact reproduction. The NumPy backend must draw the kernel's very
bits, whatever its block size and threads. ``ops.add_gaussian``'s CuPy branch runs
through the ``host_cupy`` stand-in and must give the host build's numbers.
"""


import numpy as np
import pytest
from scipy import stats

import cuda_host
import host_cupy
from cuda_host import call
from gpu_mlp import ops
from tracing import step_peak, tracing

DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]
N = 1 << 20  # samples for the statistical checks
# Every statistic below is computed from fixed seeds, so each check passes or fails for
# good; the bounds are 5 standard errors (a false alarm ~ 1e-6) and a KS p-value of 1e-4.
KS_LEVEL = 1e-4
SIGMAS = 5


@pytest.fixture(params=DTYPES, ids=lambda t: t.name)
def dtype(request):
    return request.param


# --- Philox4x32-10 ----------------------------------------------------------------------------

# Random123's known answers, tests/kat_vectors lines 27-29 (github.com/DEShawResearch/
# random123, commit 9545ff6): "philox4x32 10", counter (4 words), key (2), result (4).
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


def philox(host_cupy_lib, counters, keys):
    """noise.cuh's gm_philox4x32_10 on (n, 4) counters and (n, 2) keys: (n, 4) words."""
    counters = np.ascontiguousarray(counters, dtype=np.uint32)
    keys = np.ascontiguousarray(keys, dtype=np.uint32)
    out = np.empty_like(counters)
    call(host_cupy_lib, "host_philox4x32_10", counters, keys, out, len(counters))
    return out


def test_philox_known_answers(host_cupy_lib):
    counters, keys, expected = (np.array(column, dtype=np.uint32)
                                for column in zip(*PHILOX_KAT))
    np.testing.assert_array_equal(philox(host_cupy_lib, counters, keys), expected)


# --- the gaussian_noise kernel body -----------------------------------------------------------

def split(value):
    """A 64-bit int as (low, high) ``numpy.uint32`` words."""
    return np.uint32(value & 0xFFFFFFFF), np.uint32(value >> 32)


def kernel_noise(host_cupy_lib, w, scale, seed, stream, step):
    """``ops.ELEMENTWISE["gaussian_noise"]``, host-built, on the C-contiguous ``w`` in
    place, its arguments as the kernel declares them."""
    assert w.flags.c_contiguous
    key0, key1 = split(seed)
    # scale and the 64-bit step by pointer, as the kernel reads them (the step as int64 bits)
    call(host_cupy_lib, cuda_host.elementwise_name("gaussian_noise", None, w.dtype), w.size,
         w.size, 1, np.array([scale], w.dtype), key0, key1, np.uint32(stream),
         np.array([step], np.uint64).view(np.int64), w)
    return w


def kernel_normals(host_cupy_lib, n, dtype, seed=0, stream=0, step=0):
    return kernel_noise(host_cupy_lib, np.zeros(n, dtype), 1.0, seed, stream, step)


# NumPy's long double: x87's 64-bit significand on x86, IEEE quad on some others; where
# it is only double (MSVC, Apple silicon), the reference below is no better than the kernel
EXTENDED = np.finfo(np.longdouble).nmant >= 63


def box_muller_exact(x, y):
    """sqrt(-2 log u) (sin pi t, cos pi t) for the words x, y (uint arrays) by noise.cuh's
    documented map -- u = x 2^-32 + 2^-33, the angle 2 pi (y 2^-32 + 2^-33) = pi t -- in
    long double, with pi t reduced exactly (t - q / 2 for q = round(2 t)) and NumPy's
    long double log, sqrt, sin, cos: within ~2^-63 of the true values."""
    L = np.longdouble
    x, y = x.astype(np.int64), y.astype(np.int64)  # exact, and room for 2 y + 1
    u = (2 * x + 1).astype(L) * L(2) ** -33
    k = 2 * y + 1  # t = k 2^-32
    q = (k + (1 << 30)) >> 31
    a = np.arccos(L(-1)) * (k - (q << 31)).astype(L) * L(2) ** -32  # pi t - q pi / 2
    sin_a, cos_a = np.sin(a), np.cos(a)
    quadrant = (q % 4).astype(int)
    radius = np.sqrt(-2 * np.log(u))
    return (radius * np.choose(quadrant, [sin_a, cos_a, -sin_a, -cos_a]),
            radius * np.choose(quadrant, [cos_a, -sin_a, -cos_a, sin_a]))


def box_muller_reference(host_cupy_lib, n, seed, stream, step):
    """The first n normals of a stream by noise.cuh's documented map, in long double:
    element i from the Philox block (i / 4, stream, step_lo, step_hi) keyed by the seed;
    its pair (i % 4) / 2 of words (x, y); sqrt(-2 log u) times sin(pi t) for even i,
    cos(pi t) for odd i (:func:`box_muller_exact`)."""
    blocks = (n + 3) // 4
    counters = np.zeros((blocks, 4), np.uint32)
    counters[:, 0] = np.arange(blocks)
    counters[:, 1] = stream
    counters[:, 2:] = split(step)
    words = philox(host_cupy_lib, counters, np.tile(split(seed), (blocks, 1))).reshape(-1, 2)
    sin, cos = box_muller_exact(words[:, 0], words[:, 1])
    return np.column_stack([sin, cos]).reshape(-1)[:n]


def ulps(got, want):
    """|got - want| in ulps of double at want (want in long double)."""
    spacing = np.spacing(np.abs(want.astype(np.float64))).astype(np.longdouble)
    return np.abs((got.astype(np.longdouble) - want) / spacing).astype(np.float64)


@pytest.mark.parametrize("seed, stream, step", [(0, 0, 0), (12345, 7, 3),
                                                ((1 << 64) - 1, (1 << 32) - 1, (1 << 64) - 1),
                                                (0xDEADBEEF << 32, 1, 1 << 40)])
def test_kernel_follows_the_documented_map(host_cupy_lib, dtype, seed, stream, step):
    n = 1001  # not a multiple of 4
    got = kernel_normals(host_cupy_lib, n, dtype, seed, stream, step)
    want = box_muller_reference(host_cupy_lib, n, seed, stream, step)
    if not EXTENDED:  # the reference is double: a few ulps of 6.8 apart
        assert_within(got, want.astype(np.float64), 2e-15 if dtype == np.float64 else 2**-24)
    elif dtype == np.float64:  # fdlibm's polynomials in double, then r times the trig
        assert ulps(got, want).max() <= 4
    else:  # the double rounded once: the exact value rounded (only a double within 4 ulp
        # of a float32 midpoint could round the other way: none here)
        np.testing.assert_array_equal(got, want.astype(np.float64).astype(np.float32))


@pytest.mark.skipif(not EXTENDED, reason="needs an extended long double for the reference")
def test_box_muller_is_within_4_ulp_of_exact_on_edge_words():
    # u's ends (x = 0: u = 2^-33, the longest radius; x = 2^32 - 1: u nearest 1) and the
    # angle's quadrant edges (t near 0, 1/2, 1, 3/2 and 2), every x with every y, through
    # the NumPy steps (the kernel's bits: test_backends_draw_the_same_bits)
    edges = np.array([0, 1, 2, 3, (1 << 29), (1 << 30) - 1, 1 << 30, (1 << 31) - 1,
                      1 << 31, (3 << 30) - 1, 3 << 30, 0x5A827999, 0xB504F333,
                      (1 << 32) - 2, (1 << 32) - 1], np.uint64)
    x, y = (np.tile(a.reshape(1, -1), (2, 1)) for a in np.meshgrid(edges, edges))
    views = ops._NoiseBuffers(4 * x.shape[1], np.float64).views(x.shape[1])  # (2, n) pairs
    radius = np.empty(x.shape)
    ops._radius(views, x, radius)
    sin, cos = ops._sin_cos_pi(views, y)
    want_sin, want_cos = box_muller_exact(x, y)
    assert ulps(radius * sin, want_sin).max() <= 4
    assert ulps(radius * cos, want_cos).max() <= 4


def assert_within(got, want, tolerance):
    """|got - want| <= tolerance max(1, |want|) everywhere."""
    error = np.abs(got - want) / np.maximum(1, np.abs(want))
    worst = int(np.argmax(error))
    assert error[worst] <= tolerance, \
        f"element {worst}: {got[worst]!r} vs {want[worst]!r} (of {got.size})"


def assert_standard_normal(z, label=""):
    """Mean, standard deviation and the KS test of N(0, 1) at KS_LEVEL."""
    z = z.astype(np.float64)
    n = z.size
    assert abs(z.mean()) < SIGMAS / np.sqrt(n), f"{label}: mean {z.mean()}"
    assert abs(z.std() - 1) < SIGMAS / np.sqrt(2 * n), f"{label}: std {z.std()}"
    p = stats.kstest(z, "norm").pvalue
    assert p > KS_LEVEL, f"{label}: KS p-value {p}"


def assert_not_standard_normal(z):
    assert stats.kstest(z.astype(np.float64), "norm").pvalue < KS_LEVEL


def assert_uncorrelated(a, b, label=""):
    r = np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1]
    assert abs(r) < SIGMAS / np.sqrt(a.size), f"{label}: correlation {r}"


def test_kernel_noise_is_standard_normal(host_cupy_lib, dtype):
    z = kernel_normals(host_cupy_lib, N, dtype, seed=2024, stream=3, step=11)
    assert_standard_normal(z, "kernel")
    assert_not_standard_normal(2 * z)  # the check can fail: a wrong scale does
    assert_not_standard_normal(z + 0.01)  # and so does a small bias
    # neighbours: the sin and cos of a pair, the two pairs of a Philox block
    assert_uncorrelated(z[0::2], z[1::2], "sin/cos of a pair")
    assert_uncorrelated(z[0::4], z[2::4], "the pairs of a block")
    assert_uncorrelated(z[:-4], z[4:], "adjacent blocks")
    # the even elements (sin) and the odd ones (cos) are each N(0, 1)
    assert_standard_normal(z[0::2], "sin")
    assert_standard_normal(z[1::2], "cos")


# Each argument changed alone, its high word included: each gives another stream.
OTHER_STREAMS = {"seed": dict(seed=2), "seed-high-word": dict(seed=1 | 1 << 32),
                 "stream": dict(stream=1), "step": dict(step=1),
                 "step-high-word": dict(step=1 << 32)}
BASE = dict(seed=1, stream=0, step=0)


def test_kernel_streams_differ_and_reproduce(host_cupy_lib, dtype):
    n = N // 4
    base = kernel_normals(host_cupy_lib, n, dtype, **BASE)
    np.testing.assert_array_equal(kernel_normals(host_cupy_lib, n, dtype, **BASE), base)
    others = {}
    for name, change in OTHER_STREAMS.items():
        other = kernel_normals(host_cupy_lib, n, dtype, **{**BASE, **change})
        assert_standard_normal(other, name)
        assert_uncorrelated(base, other, name)
        assert np.mean(base == other) < 1e-3, name
        others[name] = other
    names = list(others)
    for i, a in enumerate(names):  # and from each other
        for b in names[i + 1:]:
            assert_uncorrelated(others[a], others[b], f"{a} vs {b}")


def test_kernel_adds_scaled_noise_to_w(host_cupy_lib, dtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(4099).astype(dtype)
    z = kernel_normals(host_cupy_lib, w.size, dtype, seed=5)
    scale = dtype.type(-0.37)
    want = w + scale * z  # the kernel's w + scale z, rounded alike
    np.testing.assert_array_equal(kernel_noise(host_cupy_lib, w, scale, 5, 0, 0), want)


# --- ops.add_gaussian on NumPy ----------------------------------------------------------------

def numpy_normals(n, dtype, seed=0, stream=0, step=0, shape=None):
    w = np.zeros(shape or n, dtype)
    ops.add_gaussian(w, 1.0, seed, stream, step)
    return w.reshape(-1)


def test_numpy_noise_is_standard_normal(dtype):
    z = numpy_normals(N, dtype, seed=2024, stream=3, step=11)
    assert_standard_normal(z, "numpy")
    assert_not_standard_normal(2 * z)
    assert_uncorrelated(z[:-1], z[1:], "neighbours")
    assert_uncorrelated(z[0::2], z[1::2], "sin/cos of a pair")
    assert_uncorrelated(z[:-ops.NOISE_BLOCK], z[ops.NOISE_BLOCK:], "neighbouring blocks")


def test_numpy_streams_differ_and_reproduce(dtype):
    n = N // 4
    base = numpy_normals(n, dtype, **BASE)
    np.testing.assert_array_equal(numpy_normals(n, dtype, **BASE), base)
    for name, change in OTHER_STREAMS.items():
        other = numpy_normals(n, dtype, **{**BASE, **change})
        assert_standard_normal(other, name)
        assert_uncorrelated(base, other, name)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_numpy_noise_does_not_depend_on_the_threads(dtype, threads, monkeypatch):
    n = 5 * ops.NOISE_BLOCK + 7  # an odd tail block too
    want = numpy_normals(n, dtype, seed=9)
    monkeypatch.setattr(ops, "NOISE_THREADS", threads)
    ops._noise_threads.cache_clear()
    try:
        np.testing.assert_array_equal(numpy_normals(n, dtype, seed=9), want)
    finally:
        ops._noise_threads.cache_clear()


def test_numpy_noise_is_in_place_and_adds(dtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 5, 7, 11)).astype(dtype)  # any shape
    before, address = w.copy(), w.__array_interface__["data"][0]
    scale = dtype.type(0.25)
    z = numpy_normals(w.size, dtype, seed=4, stream=2, step=6)
    assert ops.add_gaussian(w, scale, 4, 2, 6) is None
    assert w.__array_interface__["data"][0] == address and w.shape == (3, 5, 7, 11)
    np.testing.assert_array_equal(w.reshape(-1), before.reshape(-1) + scale * z)


def test_numpy_noise_allocates_no_array_of_ws_size():
    w = np.zeros(1 << 20)
    ops.add_gaussian(w, 1.0, 0, 0, 0)  # warm up: the threads' buffers
    with tracing():
        peak = step_peak(lambda: ops.add_gaussian(w, 1.0, 1, 2, 3))
    assert peak < 64 * 1024, f"{peak} bytes for {w.nbytes} bytes of w"


# --- the two backends: the same bits ---------------------------------------------------------

@pytest.mark.parametrize("seed, stream, step", [(0, 0, 0), (2024, 3, 11),
                                                ((1 << 64) - 1, (1 << 32) - 1, (1 << 64) - 1)])
def test_backends_draw_the_same_bits(host_cupy_lib, dtype, seed, stream, step):
    # a million normals, several NumPy blocks, on either side: not one bit apart (and a
    # measure: docs/MATH.md states this count of mismatches, 0, in float32 and float64)
    n = N + 3
    np.testing.assert_array_equal(numpy_normals(n, dtype, seed, stream, step),
                                  kernel_normals(host_cupy_lib, n, dtype, seed, stream, step))


def test_backends_add_the_same_bits_to_w(host_cupy_lib, dtype):
    # w + scale z rounded after the product and after the sum on both sides (no FMA)
    w = np.random.default_rng(6).standard_normal((33, 31)).astype(dtype)
    numpy_w = w.copy()
    ops.add_gaussian(numpy_w, -0.37, 8, 4, 2)
    kernel_w = kernel_noise(host_cupy_lib, w.reshape(-1), -0.37, 8, 4, 2).reshape(w.shape)
    np.testing.assert_array_equal(numpy_w, kernel_w)


@pytest.mark.parametrize("block, threads", [(4, 1), (12, 3), (1000, 2), (1 << 15, 4)])
def test_numpy_noise_does_not_depend_on_the_blocks(host_cupy_lib, dtype, block, threads,
                                                   monkeypatch):
    # element i's normal is a function of i: any block size (rounded down to whole Philox
    # blocks), any threads, any tail
    n = 4099
    want = kernel_normals(host_cupy_lib, n, dtype, seed=12, stream=1, step=5)
    monkeypatch.setattr(ops, "NOISE_BLOCK", block)
    monkeypatch.setattr(ops, "NOISE_THREADS", threads)
    ops._noise_threads.cache_clear()
    try:
        np.testing.assert_array_equal(numpy_normals(n, dtype, seed=12, stream=1, step=5), want)
    finally:
        ops._noise_threads.cache_clear()


BAD_ARGUMENTS = [  # (changes to good arguments, error, message)
    (dict(seed=-1), ValueError, "seed must be in"),
    (dict(seed=1 << 64), ValueError, "seed must be in"),
    (dict(stream=1 << 32), ValueError, "stream must be in"),
    (dict(step=1 << 64), ValueError, "step must be in"),
    (dict(step=-1), ValueError, "step must be in"),
    (dict(seed=1.0), TypeError, "integer"),
    (dict(stream=True), TypeError, "stream must be an int"),
    (dict(w=np.zeros((4, 6))[:, ::2]), ValueError, "C-contiguous"),
    (dict(w=np.zeros(8, np.int64)), ValueError, "float32 or float64"),
]


@pytest.mark.parametrize("change, error, message", BAD_ARGUMENTS)
def test_bad_arguments_are_refused(change, error, message):
    args = dict(w=np.zeros(8), scale=1.0, seed=0, stream=0, step=0)
    args.update(change)
    with pytest.raises(error, match=message):
        ops.add_gaussian(**args)


def test_numpy_integers_are_accepted():
    a = numpy_normals(10, np.float64, seed=np.uint64((1 << 64) - 1), stream=np.uint32(7),
                      step=np.int64(3))
    np.testing.assert_array_equal(a, numpy_normals(10, np.float64, seed=(1 << 64) - 1,
                                                   stream=7, step=3))


# --- ops.add_gaussian on the CuPy path (host_cupy's stand-in) ---------------------------------

@pytest.mark.parametrize("seed, stream, step", [(0, 0, 0), (0x0123456789ABCDEF, 12, 1 << 33)])
def test_cupy_path_runs_the_kernel(host_cupy_lib, dtype, seed, stream, step):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((37, 11)).astype(dtype)
    want = kernel_noise(host_cupy_lib, w.copy().reshape(-1), -0.5, seed, stream,
                        step).reshape(w.shape)
    with host_cupy.cupy_path(host_cupy_lib) as device:
        ops.add_gaussian(w, -0.5, seed, stream, step)
    np.testing.assert_array_equal(w, want)
    assert device.launches == {("gpu_mlp_gaussian_noise", dtype.name): 1}


def test_cupy_path_refuses_more_than_a_stream_holds(host_cupy_lib, monkeypatch):
    monkeypatch.setattr(ops, "MAX_NOISE_ELEMENTS", 8)
    with host_cupy.cupy_path(host_cupy_lib) as device, pytest.raises(ValueError, match="2\\^34"):
        ops.add_gaussian(np.zeros(9), 1.0, 0, 0, 0)
    assert not device.launches


# --- ops.sgd ----------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", [1.0, 0.999])
def test_sgd_is_the_formula(dtype, decay):
    rng = np.random.default_rng(3)
    n = 2 * ops.BLOCK_ELEMENTS + 5
    w, g = (rng.standard_normal(n).astype(dtype) for _ in range(2))
    t = dtype.type
    want = t(decay) * w - t(0.1) * g  # the same roundings, in the same order
    ops.sgd(w, g, 0.1, decay)
    np.testing.assert_array_equal(w, want)


def test_sgd_branches_agree(host_cupy_lib, dtype):
    rng = np.random.default_rng(4)
    w, g = (rng.standard_normal(1000).astype(dtype) for _ in range(2))
    w_cupy = w.copy()
    with host_cupy.cupy_path(host_cupy_lib) as device:
        ops.sgd(w_cupy, g, 0.05, 0.99)
    ops.sgd(w, g, 0.05, 0.99)
    np.testing.assert_array_equal(w_cupy, w)  # g++ contracts nothing: the same bits
    assert device.launches == {("gpu_mlp_sgd", dtype.name): 1}


def test_sgd_allocates_no_array_of_ws_size():
    w, g = np.zeros(1 << 20), np.ones(1 << 20)
    with tracing():
        peak = step_peak(lambda: ops.sgd(w, g, 0.1, 0.9))
    assert peak < 2 * ops.BLOCK_ELEMENTS * w.itemsize, peak


# --- GEMM and GEMV over an empty dimension ----------------------------------------------------

def refuse_blas(monkeypatch):
    """BLAS is not to be called with k = 0 (SciPy's gemv wrapper rejects it)."""
    def refused(*args, **kwargs):
        raise AssertionError("BLAS called with k = 0")
    for table in (ops._NUMPY_GEMM, ops._NUMPY_GEMV):
        for dtype in list(table):
            monkeypatch.setitem(table, dtype, refused)


GEMMS = [("N", "T"), ("N", "N"), ("T", "N"), ("T", "T")]
BETAS = [0.0, 1.0, -0.5]


def empty_product_cases(dtype):
    """(start, beta, want): out before, beta, and out <- beta out after (NaN at the start
    where beta = 0: BLAS does not read out then)."""
    start = np.random.default_rng(5).standard_normal((3, 4)).astype(dtype)
    for beta in BETAS:
        before = np.full_like(start, np.nan) if beta == 0 else start
        yield before, beta, np.zeros_like(start) if beta == 0 else dtype.type(beta) * start


@pytest.mark.parametrize("path", ["numpy", "cupy"])
@pytest.mark.parametrize("transa, transb", GEMMS, ids=["".join(t) for t in GEMMS])
def test_gemm_over_an_empty_dimension(host_cupy_lib, monkeypatch, dtype, transa, transb, path):
    refuse_blas(monkeypatch)
    m, n = 3, 4
    a = np.empty((m, 0) if transa == "N" else (0, m), dtype)
    b = np.empty((0, n) if transb == "N" else (n, 0), dtype)
    for before, beta, want in empty_product_cases(dtype):
        out = before.copy()
        if path == "cupy":
            with host_cupy.cupy_path(host_cupy_lib) as device:
                assert ops.gemm(transa, transb, a, b, out, alpha=2.0, beta=beta) is out
            assert not device.launches  # no cuBLAS call either
        else:
            assert ops.gemm(transa, transb, a, b, out, alpha=2.0, beta=beta) is out
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("path", ["numpy", "cupy"])
@pytest.mark.parametrize("transa", ["N", "T"])
def test_gemv_over_an_empty_dimension(host_cupy_lib, monkeypatch, dtype, transa, path):
    refuse_blas(monkeypatch)
    m = 3
    a = np.empty((m, 0) if transa == "N" else (0, m), dtype)  # e.g. T_rows^T 1, no rows
    x = np.empty(0, dtype)
    for before, beta, want in empty_product_cases(dtype):
        out, want = before[:, 0].copy(), want[:, 0]
        if path == "cupy":
            with host_cupy.cupy_path(host_cupy_lib) as device:
                ops.gemv(transa, a, x, out, alpha=2.0, beta=beta)
            assert not device.launches
        else:
            ops.gemv(transa, a, x, out, alpha=2.0, beta=beta)
        np.testing.assert_array_equal(out, want)


def test_empty_batch_gradient_is_zero_on_numpy(dtype):
    # the case that needs it: dW = T_rows^T X_rows and db = T_rows^T 1 over no rows
    T_rows, X_rows = np.empty((0, 5), dtype), np.empty((0, 7), dtype)
    dW, db = np.full((5, 7), np.nan, dtype), np.full(5, np.nan, dtype)
    ops.gemm("T", "N", T_rows, X_rows, dW)
    ops.gemv("T", T_rows, np.empty(0, dtype), db)
    assert not dW.any() and not db.any()


# --- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_noise_is_the_host_builds(host_cupy_lib, dtype):
    import cupy

    w = cupy.zeros(N, dtype)
    ops.add_gaussian(w, 1.0, 77, 5, 9)
    got = cupy.asnumpy(w)
    assert_standard_normal(got, "gpu")
    # IEEE basic operations alone, rounded alike on the GPU and the CPU: the same bits
    np.testing.assert_array_equal(got, kernel_normals(host_cupy_lib, N, dtype, 77, 5, 9))
    np.testing.assert_array_equal(got, numpy_normals(N, dtype, 77, 5, 9))
