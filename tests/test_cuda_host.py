"""The CUDA side of the engine, checked on a CPU.

The ``__host__ __device__`` math of ``kernels/*.cuh`` is compiled with g++ and called
through ctypes against gpu_mlp's NumPy tables; the very ``ops.ELEMENTWISE`` bodies CuPy
compiles are run on arrays against their NumPy twins in ``gpu_mlp.ops``; nvcc compiles
everything CuPy would, for Hopper. What is generated, and how, is in ``cuda_host.py``.
"""

import math
import re
import shutil

import numpy as np
import pytest

import cuda_host
from cuda_host import call
from gpu_mlp import activations, cuda, losses, ops

DTYPES = [np.float32, np.float64]
ULPS = 4  # glibc and NumPy/SciPy differ by an ulp or two in exp, tanh, log1p and erfc


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """Everything the tests call, built once per session (see ``cuda_host.host_source``).
    A function the tables promise but the headers lack fails this build, and with it
    every test that uses it, with the compiler's message naming the function."""
    if shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler (g++)")
    return cuda_host.build_host(tmp_path_factory.mktemp("cuda_host"))


@pytest.fixture(params=DTYPES, ids=lambda t: np.dtype(t).name)
def dtype(request):
    return np.dtype(request.param)


def exact_points(dtype):
    """Inputs where every formula is exact: exp, tanh and erfc round to 0, 1, +-inf or
    their tiny argument there (no library rounds those differently), or the input is
    inf or NaN."""
    fi = np.finfo(dtype)
    points = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e4, -1e4, 1e-30, -1e-30,
              fi.smallest_subnormal, -fi.smallest_subnormal, fi.max, -fi.max]
    return np.array(points, dtype=dtype)


def grid(dtype, seed=0):
    """+-1 and random inputs: around 0, far out in the tails, and tiny to huge magnitudes."""
    rng = np.random.default_rng(seed)
    magnitudes = 10.0 ** rng.uniform(-30, 4, 500)
    points = [[1.0, -1.0], rng.normal(0, 4, 2000), rng.uniform(-40, 40, 1000),
              magnitudes, -magnitudes]
    return np.concatenate(points).astype(dtype)


def assert_ulps(actual, expected, inputs, ulps, floor):
    """NaN exactly where ``expected`` is NaN; elsewhere equal (so infinities must agree) or
    within ``ulps * (spacing(|expected|) + floor)``. ``floor`` is an absolute unit for
    results whose ulp says little: subnormals, or O(1) differences such as ``1 - f * f``."""
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.abs(actual - expected) <= ulps * (np.spacing(np.abs(expected)) + floor)
    ok = (np.isnan(actual) == np.isnan(expected)) & (
        (actual == expected) | close | np.isnan(expected))
    bad = np.flatnonzero(~ok)
    assert bad.size == 0, (
        f"{bad.size} of {ok.size} differ; (input, C, NumPy): "
        + ", ".join(f"({inputs[i]!r}, {actual[i]!r}, {expected[i]!r})" for i in bad[:5]))


def numpy_twin(fn, x, *args):
    with np.errstate(all="ignore"):  # inf and NaN inputs are the point
        return fn(x, *args)


# --- 1. the device functions against the NumPy tables ------------------------------------

ACTIVATION_FUNCTIONS = cuda_host.activation_functions()
LOSS_FUNCTIONS = cuda_host.loss_functions()


def activation_ulps(kind, dtype, z):
    # SciPy's erfc (Cephes) is off by up to ~15 ulps in double near z = -1.4 and by about
    # z^2 / 2 ulps in the tail, where glibc's and CUDA's stay within a few (checked
    # against mpmath): NumPy's GELU in double can only be held to that.
    if kind.name == "gelu" and dtype == np.float64:
        return ULPS + 12 + z * z / 2
    return ULPS


@pytest.mark.parametrize("fn", sorted(ACTIVATION_FUNCTIONS))
def test_activation_function_matches_table(host, fn, dtype):
    kind, role = ACTIVATION_FUNCTIONS[fn]
    numpy_fn = getattr(kind, role)
    fi = np.finfo(dtype)
    # a value keeps its relative accuracy down to the subnormals; a derivative is an O(1)
    # difference (1 - f * f, f (1 - f)), so an ulp of f moves it by an ulp of 1
    floor = fi.tiny if role == "value" else fi.eps
    for alpha in ((1.0, 0.3) if kind.has_alpha else (1.0,)):
        a = dtype.type(alpha)
        for x, exact in ((exact_points(dtype), True), (grid(dtype), False)):
            got = np.empty_like(x)
            call(host, f"host_{fn}_{cuda_host.CTYPES[dtype]}", x, a, got, x.size)
            want = numpy_twin(numpy_fn, x, alpha, np.empty_like(x))
            ulps = 0 if exact else activation_ulps(kind, dtype, x.astype(np.float64))
            assert_ulps(got, want, x, ulps, floor)


def loss_targets(loss, n, dtype, rng):
    """n targets the loss accepts: random values, or random signs if only +-1 are valid."""
    Y = rng.normal(0, 3, (n, 1)).astype(dtype)
    try:
        loss.check_targets(Y, n, 1, np, dtype)
    except ValueError:
        Y = np.where(Y < 0, -1, 1).astype(dtype)
    return Y


@pytest.mark.parametrize("fn", sorted(LOSS_FUNCTIONS))
def test_elementwise_loss_matches_table(host, fn, dtype):
    loss = LOSS_FUNCTIONS[fn]
    F = np.concatenate([exact_points(dtype), grid(dtype)])[:, None]
    Y = loss_targets(loss, F.shape[0], dtype, np.random.default_rng(1))
    scale = dtype.type(1 / 7)
    grad, per_element = np.empty_like(F), np.empty_like(F)
    call(host, f"host_{fn}_{cuda_host.CTYPES[dtype]}", F, Y, scale, grad, per_element, F.size)
    want_grad = np.empty_like(F)
    # one column: the per-sample loss is the per-element one
    want = numpy_twin(loss.evaluate, F, Y, scale, want_grad)
    tiny = np.finfo(dtype).tiny
    assert_ulps(per_element[:, 0], want, F[:, 0], ULPS, tiny)
    assert_ulps(grad[:, 0], want_grad[:, 0], F[:, 0], ULPS, tiny * scale)


def test_a_table_row_without_cuda_functions_fails_the_build(tmp_path, monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler (g++)")
    tanh = activations.TABLE["tanh"]
    monkeypatch.setitem(activations.TABLE, "softsign",
                        activations.Kind("softsign", tanh.value, tanh.grad, None))
    assert {"gm_softsign", "gm_softsign_grad"} <= set(cuda_host.activation_functions())
    with pytest.raises(cuda_host.CompileError, match="gm_softsign"):
        cuda_host.build_host(tmp_path)


# --- 2. the kernel bodies of gpu_mlp.ops against their NumPy twins -------------------------

# Each ELEMENTWISE op's NumPy twin, on arrays named as the kernel's parameters, in place.
NUMPY_TWINS = cuda_host.OP_CALLS
ACTIVATION_OPS = [(op, act) for op, act in cuda_host.elementwise_pairs()
                  if op in NUMPY_TWINS]
LOSS_OPS = [op for op, _ in cuda_host.elementwise_pairs() if op in losses.TABLE]
B, C = 37, 11


def op_arrays(op, dtype, special=True, seed=0):
    """Random O(1) arrays for an op's array parameters: (C,) for a bias, else (B, C), each
    beginning with the exact points if ``special``."""
    rng = np.random.default_rng(seed)
    ins, outs = cuda_host.elementwise_params(op)
    arrays = {}
    for name in ins + outs:
        if name in cuda_host.SCALAR_PARAMS:
            continue
        shape = (C,) if name in cuda_host.COLUMN_PARAMS else (B, C)
        arrays[name] = rng.normal(0, 3, shape).astype(dtype)
        if special and len(shape) == 2:
            arrays[name].flat[:len(exact_points(dtype))] = exact_points(dtype)
    return arrays


def run_op(host, op, act, dtype, arrays, scalars):
    """Run the generated C version of an op in place on ``arrays``."""
    ins, outs = cuda_host.elementwise_params(op)
    args = [scalars[name] if name in cuda_host.SCALAR_PARAMS else arrays[name]
            for name in ins + outs]
    call(host, cuda_host.elementwise_name(op, act, dtype), B * C, C, 1, *args)


def assert_close(actual, expected, dtype):
    """Few ulps, with an absolute floor at the scale of the random data (products of two
    O(1) numbers): the kernels are what is checked here, the formulas' last ulps above."""
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(actual, expected, rtol=ULPS * eps, atol=ULPS * eps * 10)


@pytest.mark.parametrize("op, act", ACTIVATION_OPS,
                         ids=[f"{op}-{act}" if act else op for op, act in ACTIVATION_OPS])
def test_activation_op_matches_numpy_twin(host, op, act, dtype):
    activation = activations.get(act or "identity", alpha=0.3 if act == "relu" else None)
    arrays = op_arrays(op, dtype)
    twin = {name: a.copy() for name, a in arrays.items()}
    run_op(host, op, act, dtype, arrays, {"alpha": dtype.type(activation.alpha)})
    numpy_twin(NUMPY_TWINS[op], activation, twin)
    _, outs = cuda_host.elementwise_params(op)
    for name in outs:
        assert_close(arrays[name], twin[name], dtype)


@pytest.mark.parametrize("op", LOSS_OPS)
def test_loss_op_matches_loss_and_grad(host, op, dtype):
    loss = losses.get(op)
    arrays = op_arrays(op, dtype, special=False)  # a finite loss to compare
    arrays["y"] = loss_targets(loss, B * C, dtype, np.random.default_rng(3)).reshape(B, C)
    scale = dtype.type(1 / B)
    run_op(host, op, None, dtype, arrays, {"scale": scale})
    grad = np.empty_like(arrays["f"])
    J = ops.loss_and_grad(loss, arrays["f"], arrays["y"], grad, scale, None)
    assert_close(arrays["grad"], grad, dtype)
    np.testing.assert_allclose(arrays["loss"].sum() / B, J, rtol=B * C * np.finfo(dtype).eps)


def test_gram_bound_op_matches_its_numpy_twin(host, dtype):
    """DP's Gram-form norms, kept or bounded, bit for bit as NumPy's ufuncs give them:
    trusted values, cancelling ones (bounded), negative and NaN inner products, T_i = 0
    with an infinite ||X_i||^2 (0)."""
    rng = np.random.default_rng(7)
    n = 200
    t, x = rng.uniform(0.5, 2, n).astype(dtype), rng.uniform(0.5, 2, n).astype(dtype)
    inner = (t * x * rng.uniform(-0.01, 1, n)).astype(dtype)  # some cancel, some negative
    inner[:3], t[3], x[3] = np.nan, 0, np.inf
    coef, trusted = 1e-3, 0.01
    kernel, twin = inner.copy(), inner.copy()
    call(host, cuda_host.elementwise_name("gram_bound", None, dtype), n, n, 1, t.copy(),
         x.copy(), dtype.type(coef), dtype.type(trusted), kernel)
    ops.gram_bound(twin, t.copy(), x.copy(), coef, trusted)
    np.testing.assert_array_equal(kernel, twin)
    assert kernel[3] == 0 and not np.isnan(kernel).any()
    assert (kernel != inner).sum() > 10  # bounded ones among them


def test_clip_factor_op_matches_its_numpy_twin(host, dtype):
    """DP's clipping factors, scale / max(sqrt(s), clip), bit for bit as NumPy's three
    ufuncs give them: below and above the clip, a zero norm (factor scale / clip), an
    infinite one (0) and NaN (NaN)."""
    rng = np.random.default_rng(6)
    squares = np.concatenate([rng.uniform(0, 9, 300), [0.0, 1.0, np.inf, np.nan]])
    squares = squares.astype(dtype)
    clip, scale = dtype.type(1.5), dtype.type(1.5 / 64)
    twin = squares.copy()
    call(host, cuda_host.elementwise_name("clip_factor", None, dtype), squares.size,
         squares.size, 1, clip, scale, squares)
    with np.errstate(invalid="ignore"):
        ops.clip_factors(twin, clip, scale)
    np.testing.assert_array_equal(squares, twin)
    assert squares[-4] == scale / clip and squares[-2] == 0 and np.isnan(squares[-1])


@pytest.mark.parametrize("index32", [False, True], ids=["i64", "i32"])
def test_gather_ops_take_the_rows_at_the_cursor_as_numpy_does(host, dtype, index32):
    """The cursor's gathers: out row r is data row order[at + r] -- float rows of
    several elements (NCHW maps flattened), and int64 labels, one element a row -- as
    NumPy's take gives them, in the 32-bit and the 64-bit loop; and ``advance`` moves a
    counter on by its step, as ``ops.advance`` does on NumPy."""
    rng = np.random.default_rng(8)
    data = rng.standard_normal((20, 3, 2, 2)).astype(dtype)
    labels = rng.integers(0, 7, 20)
    order = rng.permutation(20).astype(np.int64)
    at, m = np.array(5, dtype=np.int64), 6
    for source, ctype in ((data, dtype), (labels, None)):
        out = np.zeros((m, *source.shape[1:]), dtype=source.dtype)
        op = "gather" if ctype is not None else "gather_labels"
        width = np.int64(out.size // m)
        call(host, cuda_host.elementwise_name(op, None, dtype, index32), out.size,
             out.shape[1] if out.ndim > 1 else out.size,
             out.size // (m * out.shape[1]) if out.ndim > 1 else 1, source, order, at, width,
             out)
        twin = np.empty_like(out)
        ops.gather(source, order, at, twin, dtype)
        np.testing.assert_array_equal(out, twin)
        np.testing.assert_array_equal(out, source[order[5:11]])
    counters = np.array([3, 7], dtype=np.int64)
    call(host, cuda_host.elementwise_name("advance", None, dtype, index32), 2, 2, 1,
         np.int64(4), counters)
    twin = np.array([3, 7], dtype=np.int64)
    ops.advance(twin, 4, dtype)
    np.testing.assert_array_equal(counters, twin)
    assert counters.tolist() == [7, 11]


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5, "device 0", "device 0.5"])
def test_to_weight_order_ops_permute_the_taps_as_numpy_does(host, dtype, beta):
    """A weight gradient's taps (d_out, kh, kw, c_in) into W's (d_out, c_in, kh, kw):
    g <- taps + beta g, beta a number or read by pointer; with beta 0 g is not read, so
    a NaN there stays out (cuBLAS's rule), as ops.to_weight_order does on NumPy."""
    rng = np.random.default_rng(11)
    d_out, kh, kw, c_in = 3, 2, 3, 4
    taps = rng.standard_normal((d_out, kh, kw, c_in)).astype(dtype)
    G = rng.standard_normal((d_out, c_in, kh, kw)).astype(dtype)
    G[0, 0, 0, 0] = np.nan
    value = float(str(beta).split()[-1])
    sizes = (np.int64(kh), np.int64(kw), np.int64(c_in))
    out = G.copy()
    if isinstance(beta, str):
        call(host, cuda_host.elementwise_name("to_weight_order_by", None, dtype), G.size,
             c_in, kh * kw, taps, *sizes, np.array([value], dtype), out)
    else:
        call(host, cuda_host.elementwise_name("to_weight_order", None, dtype), G.size,
             c_in, kh * kw, taps, *sizes, dtype.type(value), out)
    twin = G.copy()
    ops.to_weight_order(taps, twin, value)
    np.testing.assert_allclose(out, twin, rtol=4 * np.finfo(dtype).eps)
    assert np.isnan(out[0, 0, 0, 0]) == (value != 0)


def test_target_checks_and_sign_hits_match_numpy(host, dtype):
    """The losses' target checks: a logistic label other than -1 and +1 flagged (0.5,
    NaN, 2), rows not summing to 1 within np.allclose's tolerance or with a negative
    entry flagged (their sums written), good ones not; and the logistic accuracy's hits
    -- each as ops' NumPy branch gives it."""
    signs = np.array([[1, -1, 1], [-1, -1, 1]], dtype=dtype)
    for bad, expected in ((None, 0), (0.5, 1), (np.nan, 1), (2.0, 1)):
        Y = signs.copy()
        if bad is not None:
            Y[1, 2] = bad
        flag, twin = np.zeros(1, dtype), np.zeros(1, dtype)
        call(host, cuda_host.elementwise_name("flag_not_sign", None, dtype), Y.size, 3, 1,
             Y, flag)
        with np.errstate(invalid="ignore"):
            ops.flag_targets("sign", Y, twin)
        assert flag[0] == twin[0] == expected, bad
    rows = np.array([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0005]], dtype=dtype)
    for change, expected in ((None, 0), ((2, 2, 0.002), 1), ((0, 0, -0.1), 1),
                             ((1, 0, 0.999), 0)):
        Y = rows.copy()
        if change is not None:
            Y[change[0], change[1]] = change[2]
        flag, twin, sums = np.zeros(1, dtype), np.zeros(1, dtype), np.empty(3, dtype)
        call(host, cuda_host.elementwise_name("flag_not_probabilities", None, dtype), 3, 3,
             1, Y, np.int64(3), sums, flag)
        ops.flag_targets("probabilities", Y, twin)
        assert flag[0] == twin[0] == expected, change
        np.testing.assert_allclose(sums, Y.sum(axis=1), rtol=4 * np.finfo(dtype).eps)
    F = np.array([[0.3, -0.2, 0.0], [-1.0, 2.0, -0.0]], dtype=dtype)
    hits, twin = np.empty_like(F), np.empty_like(F)
    call(host, cuda_host.elementwise_name("sign_hit", None, dtype), F.size, 3, 1, F, signs,
         hits)
    ops.sign_hits(F, signs, twin)
    np.testing.assert_array_equal(hits, twin)
    assert hits.tolist() == [[1, 1, 0], [1, 0, 0]]


def test_square_and_scale_rows_ops_match_numpy(host, dtype):
    """DP's elementwise squares, and each sample's rows scaled by its factor (the
    factors a column of x viewed as (1, B, rest)), bit for bit as NumPy's products."""
    rng = np.random.default_rng(12)
    a = rng.standard_normal((5, 7)).astype(dtype)
    out = np.empty_like(a)
    call(host, cuda_host.elementwise_name("square", None, dtype), a.size, 7, 1, a, out)
    np.testing.assert_array_equal(out, a * a)
    x = rng.standard_normal((4, 3, 2)).astype(dtype)
    factors = rng.uniform(0, 2, 4).astype(dtype)
    scaled = x.copy()
    call(host, cuda_host.elementwise_name("scale_rows", None, dtype), x.size, 4, 6,
         factors, scaled)
    twin = x.copy()
    ops.scale_rows(twin, factors)
    np.testing.assert_array_equal(scaled, twin)
    np.testing.assert_array_equal(scaled, x * factors[:, None, None])


def test_class_hit_ops_mark_the_rows_numpys_argmax_gets_right(host, dtype):
    """Accuracy's row kernels: hit[i] = 1 where row i's largest output is its label (or
    its target row's largest entry) -- NumPy's argmax: the first of equal largest, a
    NaN the largest, the first NaN of several -- else 0, as ops.class_hits gives on
    NumPy; and a wide row, scanned to its end."""
    F = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.1], [np.nan, 2.0, np.nan], [1.0, np.nan, 3.0],
                  [-1.0, -2.0, -0.5], [0.0, 0.0, 0.0]], dtype=dtype)
    F = np.vstack([F, np.random.default_rng(9).standard_normal((30, 3)).astype(dtype)])
    labels = np.random.default_rng(10).integers(0, 3, F.shape[0])
    labels[:6] = [1, 0, 0, 1, 2, 1]
    targets = np.eye(3, dtype=dtype)[labels] * 0.8 + 0.05
    for op, Y in (("class_hit", labels), ("class_hit_targets", targets)):
        hits = np.full(F.shape[0], 7, dtype=dtype)
        call(host, cuda_host.elementwise_name(op, None, dtype), F.shape[0], F.shape[0], 1,
             F, Y, np.int64(3), hits)
        twin = np.empty_like(hits)
        ops.class_hits(F, Y, twin)
        np.testing.assert_array_equal(hits, twin)
        np.testing.assert_array_equal(hits, F.argmax(axis=1) == labels)
        assert hits[:6].tolist() == [1, 1, 1, 1, 1, 0]
    wide = np.zeros((2, 100), dtype)
    wide[0, 99], wide[1, 3] = 1, 1
    hits = np.zeros(2, dtype)
    call(host, cuda_host.elementwise_name("class_hit", None, dtype), 2, 2, 1, wide,
         np.array([99, 4]), np.int64(100), hits)
    assert hits.tolist() == [1, 0]


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_flag_nonfinite_op_flags_nan_and_inf_and_never_clears(host, dtype, bad):
    """The value check's scan: flag[0] becomes 1 where x holds a NaN or an Inf, at any
    position, and stays as it was on finite values -- the largest, the smallest normal
    and subnormal ones, zeros of both signs -- as NumPy's isfinite says."""
    info = np.finfo(dtype)
    x = np.array([0.0, -0.0, 1.0, -info.max, info.max, info.tiny, info.smallest_subnormal,
                  -3.5] * 5, dtype=dtype)
    for at in ([] if bad is None else [0, 17, x.size - 1]):
        y = x.copy()
        y[at] = bad
        flag = np.zeros(1, dtype)
        call(host, cuda_host.elementwise_name("flag_nonfinite", None, dtype), y.size, y.size,
             1, y, flag)
        twin = np.zeros(1, dtype)
        ops.flag_nonfinite(y, twin)
        assert flag[0] == twin[0] == 1, at
    for start in (0.0, 1.0):  # finite: the flag as it was (never cleared)
        flag = np.full(1, start, dtype)
        call(host, cuda_host.elementwise_name("flag_nonfinite", None, dtype), x.size, x.size,
             1, x, flag)
        assert flag[0] == start


def test_tally_op_matches_its_numpy_twin_and_sums_to_the_dtypes_precision(host, dtype):
    """ops.tally's kernel, one element, against its NumPy twin, bit for bit at every
    term of a long run of them (the steps of an epoch); the compensated total within
    two ulps of the exact sum, where a plain running sum of the same terms drifts."""
    rng = np.random.default_rng(5)
    losses, squares = rng.uniform(0.1, 3.0, (2, 4000)).astype(dtype)
    scale, penalty = dtype.type(32), dtype.type(5e-5)
    kernel = {"total": np.zeros(1, dtype), "carry": np.zeros(1, dtype)}
    twin = {name: a.copy() for name, a in kernel.items()}
    plain = dtype.type(0)
    name = cuda_host.elementwise_name("tally", None, dtype)
    for loss, square in zip(losses, squares):
        loss, square = np.array([loss]), np.array([square])
        call(host, name, 1, 1, 1, loss, square, scale, penalty, kernel["total"],
             kernel["carry"])
        ops.tally(loss, square, scale, penalty, twin["total"], twin["carry"])
        for key in kernel:
            np.testing.assert_array_equal(kernel[key], twin[key], err_msg=key)
        plain = plain + (scale * loss[0] + penalty * square[0])
    terms = scale.astype(np.float64) * losses.astype(np.float64) + \
        penalty.astype(np.float64) * squares.astype(np.float64)
    exact = math.fsum(terms)
    eps = np.finfo(dtype).eps
    assert abs(float(kernel["total"][0]) - exact) <= 2 * eps * exact
    if dtype == np.float32:  # (float64's plain sum is as close: nothing to show there)
        assert abs(float(plain) - exact) > 4 * eps * exact


# --- the row functions of rowwise.cuh --------------------------------------------------------

def logit_rows(dtype, seed=0):
    """Random rows, then rows that overflow unless the maximum is subtracted, a row of
    ties, and rows with -inf, +inf and NaN."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 3, (20, C))
    special = np.zeros((5, C))
    special[0, ::2], special[0, 1::2] = 1e4, -1e4
    special[1] = 5.0
    special[2, 3] = -np.inf
    special[3, 4] = np.inf
    special[4, 5] = np.nan
    return np.concatenate([rows, special]).astype(dtype)


def row_tolerance(dtype):
    # C and NumPy sum a row's C terms in different orders
    return {"rtol": 2 * C * np.finfo(dtype).eps, "atol": 2 * C * np.finfo(dtype).eps}


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in-place"])
def test_softmax_rows_match_table(host, dtype, with_bias, in_place):
    z = logit_rows(dtype)
    bias = np.random.default_rng(1).normal(0, 1, C).astype(dtype) if with_bias else None
    want = numpy_twin(activations.TABLE["softmax"].value,
                      z + bias if with_bias else z, 1.0, np.empty_like(z))
    out = z if in_place else np.empty_like(z)
    call(host, f"host_softmax_rows_{cuda_host.CTYPES[dtype]}", z, bias, out, z.shape[0], C)
    np.testing.assert_allclose(out, want, **row_tolerance(dtype))


def test_softmax_backward_rows_match_table(host, dtype):
    rng = np.random.default_rng(2)
    f = activations.get("softmax")(rng.normal(0, 3, (30, C)).astype(dtype))
    g = rng.normal(0, 1, f.shape).astype(dtype)
    want = activations.softmax_backward(f, g, np.empty_like(g))
    call(host, f"host_softmax_backward_rows_{cuda_host.CTYPES[dtype]}", f, g, f.shape[0], C)
    np.testing.assert_allclose(g, want, **row_tolerance(dtype))


def probability_rows(n, dtype, rng):
    """One-hot rows and soft rows, some with exact zeros."""
    soft = rng.dirichlet(np.ones(C), n)
    soft[::3, :C // 2] = 0
    soft /= soft.sum(axis=1, keepdims=True)
    return np.concatenate([np.eye(C)[rng.integers(0, C, n)], soft]).astype(dtype)


@pytest.mark.parametrize("targets", ["labels", "probabilities"])
def test_softmax_cross_entropy_rows_match_table(host, dtype, targets):
    rng = np.random.default_rng(3)
    F = logit_rows(dtype)[:21]  # finite rows: the random ones and the +-1e4 one
    if targets == "labels":
        Y = rng.integers(0, C, F.shape[0])
        rows_and_labels = (None, Y)
    else:
        Y = probability_rows(F.shape[0], dtype, rng)  # twice as many rows
        F = np.concatenate([F, F])
        rows_and_labels = (Y, None)
    scale = dtype.type(1 / F.shape[0])
    grad, per_row = np.empty_like(F), np.empty(F.shape[0], dtype)
    call(host, f"host_softmax_xent_rows_{cuda_host.CTYPES[dtype]}", F, *rows_and_labels,
         grad, per_row, F.shape[0], C, scale)
    want_grad = np.empty_like(F)
    want = losses.get("softmax_cross_entropy").evaluate(F, Y, scale, want_grad)
    np.testing.assert_allclose(grad, want_grad, **row_tolerance(dtype))
    np.testing.assert_allclose(per_row, want, **row_tolerance(dtype))


# --- 3. everything CuPy compiles, through nvcc for the H100 ----------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_everything_cupy_compiles_builds_with_nvcc_for_hopper(tmp_path):
    # one nvcc call for all of it: -Werror all-warnings fails on any warning, and
    # ptxas -v names every kernel it compiles
    report = cuda_host.build_device(tmp_path)
    compiled = set(re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", report))
    kernels = [*cuda.ROW_KERNELS, *(ops.kernel_name(op, act)
                                    for op, act in cuda_host.elementwise_pairs())]
    for kernel in kernels:
        for code in "fd":  # the Itanium mangling of kernel<float> and kernel<double>
            assert any(name.startswith(f"_Z{len(kernel)}{kernel}I{code}E") for name in compiled)
    assert len(compiled) == 2 * len(kernels)


# --- 4. the kernel sources ship --------------------------------------------------------------

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def test_kernel_dir_holds_exactly_the_headers():
    folder = cuda.kernel_dir()
    assert sorted(p.name for p in folder.glob("*.cuh")) == sorted(cuda.HEADERS)


def test_headers_include_only_earlier_headers():
    # source() concatenates HEADERS in order, so each may only rely on those before it
    for i, header in enumerate(cuda.HEADERS):
        included = _LOCAL_INCLUDE.findall((cuda.kernel_dir() / header).read_text())
        assert set(included) <= set(cuda.HEADERS[:i]), header


def test_source_has_no_local_include():
    assert not _LOCAL_INCLUDE.findall(cuda.source())


# --- 5. the optimizers' update kernels against their NumPy twins ------------------------------

# (kernel, scalars by name, the ops call on arrays named as the kernel's): every branch --
# weight decay on and off, Nesterov on and off, AdamW's decay, both sides of lerp's switch
OPTIMIZER_CASES = {
    "momentum": ("sgd_momentum", {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
                                  "nesterov": 0}),
    "nesterov-wd": ("sgd_momentum", {"lr": 0.1, "momentum": 0.7, "weight_decay": 0.01,
                                     "nesterov": 1}),
    "adam-wd": ("adam", {"one_minus_beta1": 0.1, "beta2": 0.999, "one_minus_beta2": 0.001,
                         "eps": 1e-8, "weight_decay": 0.05, "decay": 1.0, "step_size": 0.02,
                         "bias_correction2_sqrt": 0.05}),
    "adamw-lerp-upper": ("adam", {"one_minus_beta1": 0.7, "beta2": 0.9, "one_minus_beta2": 0.1,
                                  "eps": 1e-6, "weight_decay": 0.0, "decay": 0.999,
                                  "step_size": 0.01, "bias_correction2_sqrt": 0.3}),
    "sgd": ("sgd", {"lr": 0.1, "decay": 1.0}),
    "sgd-decay": ("sgd", {"lr": 0.03, "decay": 0.995}),
}
OPTIMIZER_CALLS = {
    "sgd_momentum": lambda v, s: ops.sgd_momentum(v["w"], v["g"], v["buf"], s["lr"],
                                                  s["momentum"], s["weight_decay"],
                                                  bool(s["nesterov"])),
    "adam": lambda v, s: ops.adam(v["w"], v["g"], v["m"], v["v"], *(s[name] for name in (
        "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight_decay", "decay",
        "step_size", "bias_correction2_sqrt"))),
    "sgd": lambda v, s: ops.sgd(v["w"], v["g"], s["lr"], s["decay"]),
}


def optimizer_arrays(op, dtype, n, special):
    """Random state for the op's arrays (v >= 0, as a second moment is), over ``n``
    elements, the first ones the exact points if ``special``."""
    rng = np.random.default_rng(7)
    arrays = {}
    for p in cuda_host.elementwise_signature(op):
        if p.kind != "full":
            continue
        a = rng.normal(0, 1, n).astype(dtype)
        if p.name == "v":
            a = np.abs(a)
        elif special:
            a[:len(exact_points(dtype))] = exact_points(dtype)
        arrays[p.name] = a
    return arrays


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
@pytest.mark.parametrize("special", [False, True], ids=["random", "special"])
def test_optimizer_op_matches_numpy_twin(host, case, dtype, special):
    # more elements than one of the twin's blocks; the same IEEE operations in the same
    # order (sqrt is correctly rounded on both sides), so the same bits, NaN and inf too
    op, scalars = OPTIMIZER_CASES[case]
    arrays = optimizer_arrays(op, dtype, ops.BLOCK_ELEMENTS + 123, special)
    twin = {name: a.copy() for name, a in arrays.items()}
    params = cuda_host.elementwise_signature(op)
    # a step scalar the kernel reads by pointer ("raw": the step's own, on the device) is
    # a one-element array of it
    args = [(np.int32(scalars[p.name]) if p.type == "int32" else dtype.type(scalars[p.name]))
            if p.kind == "scalar" else np.array([scalars[p.name]], dtype) if p.kind == "raw"
            else arrays[p.name] for p in params]
    n = arrays["w"].size
    call(host, cuda_host.elementwise_name(op, None, dtype), n, n, 1, *args)
    with np.errstate(all="ignore"):
        OPTIMIZER_CALLS[op](twin, scalars)
    for p in params:
        if p.output:
            np.testing.assert_array_equal(arrays[p.name], twin[p.name], err_msg=p.name)
    assert np.isfinite(arrays["w"]).any() and not np.array_equal(arrays["w"], arrays["g"])


def test_every_optimizer_kernel_is_tested():
    # an optimizer's kernel updates the parameter w from its gradient g
    assert {op for op, _ in OPTIMIZER_CASES.values()} == set(OPTIMIZER_CALLS) == {
        op for op in ops.ELEMENTWISE
        if {"g", "w"} <= {p.name for p in cuda_host.elementwise_signature(op)}}


# --- 6. the index types: the device kernels' 32-bit and 64-bit loops ----------------------------

# (C, H, W, kh, kw, sh, sw, ph, pw): a non-square kernel with padding; stride over a
# 1x1 kernel (the image larger than its columns); a kernel wider than the stride
INDEX_GEOMETRIES = [(3, 7, 5, 3, 2, 2, 1, 1, 0), (2, 6, 6, 1, 1, 3, 3, 0, 0),
                    (4, 5, 6, 5, 3, 1, 2, 2, 1)]


@pytest.mark.parametrize("geometry", INDEX_GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("op", ["im2col", "col2im", "im2col_nhwc", "col2im_nhwc"])
def test_conv_kernels_give_the_same_bits_with_32_and_64_bit_indices(host, op, geometry,
                                                                     dtype):
    """im2col and col2im split the element index by divisions in the loop's index type
    (unsigned int up to ops.INDEX32_MAX elements, long long beyond): both loops, built
    from the same body, read and write the same elements."""
    C, H, W, kh, kw, sh, sw, ph, pw = geometry
    OH, OW = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    B, rng = 2, np.random.default_rng(3)
    image, cols = B * C * H * W, B * OH * OW * C * kh * kw
    n_in, n_out = (image, cols) if op.startswith("im2col") else (cols, image)
    source = rng.standard_normal(n_in).astype(dtype)
    sizes = [np.int32(v) for v in (C, H, W, kh, kw, sh, sw, ph, pw, OH, OW)]
    for taps_first in ([0, 1] if op == "im2col_nhwc" else [None]):
        extra = [] if taps_first is None else [np.int32(taps_first)]
        outs = []
        for index32 in (False, True):
            out = np.full(n_out, np.nan, dtype)
            call(host, cuda_host.elementwise_name(op, None, dtype, index32), n_out, n_out, 1,
                 source, *sizes, *extra, out)
            outs.append(out)
        np.testing.assert_array_equal(outs[0], outs[1])
        assert np.isfinite(outs[0]).all()  # every element written


def test_the_stand_in_takes_the_devices_branch_of_index_type(monkeypatch, host_cupy_lib):
    """Up to ops.INDEX32_MAX elements the kernel's 32-bit loop, beyond it the 64-bit one:
    host_cupy calls the host twin of the branch a GPU takes."""
    import host_cupy

    called = []
    monkeypatch.setattr(cuda_host, "call", lambda lib, name, *args: called.append(name))
    a, bias = np.zeros((4, 3), np.float32), np.zeros(3, np.float32)
    activation = activations.get("relu")
    with host_cupy.cupy_path(host_cupy_lib):
        ops.bias_act(activation, a, bias)
        monkeypatch.setattr(ops, "INDEX32_MAX", 11)  # 12 elements: past it
        ops.bias_act(activation, a, bias)
    assert called == ["ew_bias_act_relu_float_i32", "ew_bias_act_relu_float"]
