"""gpu_mlp.cublas, the direct cuBLAS binding, on the host: its marshalling run against
host_cupy's libcublas (the C API as cuBLAS defines it: column-major matrices at raw
addresses, leading dimensions, the handle's stream, workspace and pointer mode), its
capture on the counting device (tests/capture.py), and on a GPU against CuPy's cuBLAS.

The stand-in computes from the very m, n, k, lda, ldb, ldc, operations and addresses the
binding passes, so a wrong one is a wrong number or a refusal here, as on a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools

import numpy as np
import pytest

import gpu_mlp
from gpu_mlp import cublas, ops
from gpu_mlp.layers import Dense

import host_cupy
from capture import Capture, CapturableBlas, CaptureBroken, capturable_blas
from device_counts import DeviceArray, counting_device
from test_capture import _arrays as _device, device  # noqa: F401 -- the fixture, shared


class Recording(host_cupy.HostCublas):
    """host_cupy's libcublas, every call recorded as ``(name, args)``."""

    def __init__(self, device=None, math_mode=0, aligned=True):
        super().__init__(device or host_cupy.Device(None))
        self.calls, self.mode_, self.aligned = [], math_mode, aligned
        for name in vars(self.library):
            function = getattr(self.library, name)
            body = function.body
            function.body = (lambda name, body: lambda *args: (
                self.calls.append((name, args)), body(*args))[1])(name, body)

    def math_mode(self) -> int:
        return self.mode_

    def workspace(self, nbytes):
        owner, address = super().workspace(nbytes)
        return owner, address + (0 if self.aligned else 8)

    def named(self, prefix):
        return [(name, args) for name, args in self.calls if name.startswith(prefix)]


@pytest.fixture
def blas(host_cupy_lib, monkeypatch):
    """ops' GPU branch, the binding over a recording host libcublas, the kernels (an empty
    product's ``scale``) host_cupy's; yields the runtime. (CUPY_TF32 as CuPy's default,
    unset: a shell's would turn the handles' TF32 on.)"""
    monkeypatch.delenv("CUPY_TF32", raising=False)
    with host_cupy.cupy_path(host_cupy_lib) as device:
        runtime = Recording(device)
        with cublas.use(runtime):
            yield runtime


DTYPES = [np.float32, np.float64]
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-13}
# (m, k, n): rows of out, the inner size, columns of out; 1-row, 1-column, 1-inner, empty
SHAPES = [(4, 5, 6), (1, 5, 6), (4, 1, 6), (4, 5, 1), (1, 1, 1), (0, 5, 6), (4, 5, 0),
          (4, 0, 6)]


def _operands(rng, dtype, transa, transb, m, k, n):
    a = rng.standard_normal((m, k) if transa == "N" else (k, m)).astype(dtype)
    b = rng.standard_normal((k, n) if transb == "N" else (n, k)).astype(dtype)
    return a, b


def _expected(op_product, alpha, beta, start):
    result = alpha * op_product
    if beta != 0:
        result = result + beta * start.astype(np.float64)
    return result


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("m, k, n", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("transa, transb", list(itertools.product("NT", repeat=2)),
                         ids=lambda t: "".join(t))
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (-0.5, 1.0), (2.0, 0.25)],
                         ids=["write", "update", "scaled"])
@pytest.mark.parametrize("device_scalars", [False, True], ids=["host", "device"])
def test_gemm_is_numpys_for_every_shape_and_transposition(blas, dtype, m, k, n, transa,
                                                          transb, alpha, beta,
                                                          device_scalars):
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    a, b = _operands(rng, dtype, transa, transb, m, k, n)
    # beta = 0: cuBLAS does not read out, so NaN there must not show
    start = np.full((m, n), np.nan, dtype) if beta == 0 else \
        rng.standard_normal((m, n)).astype(dtype)
    out = start.copy()
    scalars = [np.array(x, dtype) if device_scalars else x for x in (alpha, beta)]
    assert ops.gemm(transa, transb, a, b, out, *scalars) is out
    op_a, op_b = (a if transa == "N" else a.T), (b if transb == "N" else b.T)
    expected = _expected(op_a.astype(np.float64) @ op_b.astype(np.float64), alpha, beta, start)
    np.testing.assert_allclose(out, expected, rtol=RTOL[np.dtype(dtype)],
                               atol=RTOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("m, k", [(4, 5), (1, 5), (4, 1), (1, 1), (0, 5), (4, 0)])
@pytest.mark.parametrize("transa", ["N", "T"])
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (-0.5, 1.0), (2.0, 0.25)],
                         ids=["write", "update", "scaled"])
@pytest.mark.parametrize("device_scalars", [False, True], ids=["host", "device"])
def test_gemv_is_numpys_for_every_shape(blas, dtype, m, k, transa, alpha, beta,
                                        device_scalars):
    rng = np.random.default_rng(m * 10 + k)
    a = rng.standard_normal((m, k) if transa == "N" else (k, m)).astype(dtype)
    x = rng.standard_normal(k).astype(dtype)
    start = np.full(m, np.nan, dtype) if beta == 0 else rng.standard_normal(m).astype(dtype)
    out = start.copy()
    scalars = [np.array(v, dtype) if device_scalars else v for v in (alpha, beta)]
    ops.gemv(transa, a, x, out, *scalars)
    op_a = a if transa == "N" else a.T
    expected = _expected(op_a.astype(np.float64) @ x.astype(np.float64), alpha, beta, start)
    np.testing.assert_allclose(out, expected, rtol=RTOL[np.dtype(dtype)],
                               atol=RTOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("batch, m, k, n", [(3, 4, 5, 6), (1, 4, 5, 6), (3, 1, 1, 1),
                                            (3, 1, 5, 6), (0, 4, 5, 6), (3, 4, 0, 6)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("transa, transb", list(itertools.product("NT", repeat=2)),
                         ids=lambda t: "".join(t))
@pytest.mark.parametrize("device_scalars", [False, True], ids=["host", "device"])
@pytest.mark.parametrize("on_device", [False, True], ids=["numpy", "cublas"])
def test_gemm_batched_is_each_matrixs_gemm(host_cupy_lib, dtype, batch, m, k, n, transa,
                                           transb, device_scalars, on_device):
    """Each out[i] is op(a[i]) op(b[i]) (scaled), on NumPy's loop and through cuBLAS's
    strided batched GEMM with the strides the binding computes."""
    rng = np.random.default_rng(batch * 1000 + m * 100 + k * 10 + n)
    pairs = [_operands(rng, dtype, transa, transb, m, k, n) for _ in range(batch)]
    shape_a = (m, k) if transa == "N" else (k, m)
    shape_b = (k, n) if transb == "N" else (n, k)
    a = np.array([p[0] for p in pairs], dtype).reshape(batch, *shape_a)
    b = np.array([p[1] for p in pairs], dtype).reshape(batch, *shape_b)
    start = rng.standard_normal((batch, m, n)).astype(dtype)
    alpha, beta = -0.5, 0.25
    out = start.copy()
    scalars = [np.array(x, dtype) if device_scalars else x for x in (alpha, beta)]
    with contextlib.ExitStack() as stack:
        device = stack.enter_context(host_cupy.cupy_path(host_cupy_lib)) if on_device \
            else None  # the GPU branch; an empty product's kernel on the host
        runtime = Recording(device)
        stack.enter_context(cublas.use(runtime))
        assert ops.gemm_batched(transa, transb, a, b, out, *scalars) is out
    op = lambda x, t: x if t == "N" else x.transpose(0, 2, 1)
    product = np.matmul(op(a, transa).astype(np.float64), op(b, transb).astype(np.float64))
    np.testing.assert_allclose(out, alpha * product + beta * start,
                               rtol=RTOL[np.dtype(dtype)], atol=RTOL[np.dtype(dtype)])
    batched = [name for name, _ in runtime.named("cublas") if "StridedBatched" in name]
    assert len(batched) == (on_device and batch > 0 and k > 0)  # one call for the stack
    if not on_device:
        assert not runtime.calls


@pytest.mark.parametrize("shapes", [((2, 4, 5), (3, 5, 6), (2, 4, 6)),
                                    ((2, 4, 5), (2, 5, 6), (3, 4, 6)),
                                    ((4, 5), (5, 6), (4, 6))], ids=["b", "out", "2-D"])
def test_gemm_batched_refuses_stacks_of_other_sizes_on_numpy_too(shapes):
    """NumPy's loop would zip the stacks and drop the extra matrices silently."""
    a, b, out = (np.ones(s) for s in shapes)
    with pytest.raises(ValueError, match="3-D stacks of one batch size"):
        ops.gemm_batched("N", "N", a, b, out)


def test_gemm_batched_asks_one_strided_call_with_each_matrixs_size_as_stride(blas):
    """G (5, 3, 4) = T^T X per sample, T (5, 7, 3), X (5, 7, 4): as gemm("T", "N") per
    matrix -- m = 4, n = 3, k = 7, ld 4, 3, 4 -- the strides 28, 21, 12, count 5."""
    T, X = np.ones((5, 7, 3), np.float32), np.ones((5, 7, 4), np.float32)
    G = np.empty((5, 3, 4), np.float32)
    ops.gemm_batched("T", "N", T, X, G)
    [(name, args)] = blas.named("cublasSgemm")
    (handle, opb, opa, m, n, k, alpha, B, ldb, stride_b, A, lda, stride_a, beta, C, ldc,
     stride_c, count) = args
    assert name == "cublasSgemmStridedBatched"
    assert (opb, opa, m, n, k, ldb, stride_b, lda, stride_a, ldc, stride_c, count) == \
        (0, 1, 4, 3, 7, 4, 28, 3, 21, 4, 12, 5)
    assert (B, A, C) == (X.ctypes.data, T.ctypes.data, G.ctypes.data)
    np.testing.assert_array_equal(G, 7.0)


def test_gemm_asks_cublas_for_out_transposed_with_c_orders_leading_dimensions(blas):
    """out (4, 6) = a (4, 5) b^T, b (6, 5): column-major, out^T = b a^T is the (6, 4)
    matrix: m = 6, n = 4, k = 5, b with op T and ld 5, a with op N and ld 5, ldc 6."""
    a, b, out = np.ones((4, 5), np.float32), np.ones((6, 5), np.float32), np.empty((4, 6),
                                                                                  np.float32)
    ops.gemm("N", "T", a, b, out)
    [(name, args)] = blas.named("cublasSgemm")
    handle, opb, opa, m, n, k, alpha, B, ldb, A, lda, beta, C, ldc = args
    assert name == "cublasSgemm_v2"
    assert (opb, opa, m, n, k, ldb, lda, ldc) == (1, 0, 6, 4, 5, 5, 5, 6)
    assert (B, A, C) == (b.ctypes.data, a.ctypes.data, out.ctypes.data)
    ops.gemm("T", "N", np.ones((5, 4)), np.ones((5, 6)), np.empty((4, 6)))
    [(name, args)] = blas.named("cublasDgemm")
    assert name == "cublasDgemm_v2" and args[1:6] == (0, 1, 6, 4, 5) and args[8] == 6 \
        and args[10] == 4 and args[13] == 6


def test_gemv_asks_cublas_for_the_transposed_operation(blas):
    """a (4, 5) C-ordered is the column-major (5, 4) a^T, ld 5: a x is cuBLAS's op T."""
    a, x, y = np.ones((4, 5)), np.ones(5), np.empty(4)
    ops.gemv("N", a, x, y)
    ops.gemv("T", a, np.ones(4), np.empty(5))
    (_, first), (_, second) = blas.named("cublasDgemv")
    assert first[1:4] == (1, 5, 4) and first[6] == 5 and first[8] == first[11] == 1
    assert second[1:4] == (0, 5, 4)


def test_one_handle_per_stream_its_workspace_set_after_its_stream(blas):
    for _ in range(3):
        ops.gemm("N", "N", np.ones((2, 2)), np.ones((2, 2)), np.empty((2, 2)))
    assert [name for name, _ in blas.calls if not name.endswith(("gemm_v2", "gemv_v2"))] == [
        "cublasCreate_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2",
        "cublasSetMathMode", "cublasSetPointerMode_v2"]
    [state] = blas.handles.values()
    # cublasSetStream resets the workspace: set after it, it is still there
    assert state.stream == host_cupy.STREAM
    assert state.workspace is not None and state.workspace[1] == cublas.WORKSPACE_BYTES


def test_handles_of_streams_long_unused_are_destroyed_with_their_workspaces(blas):
    """A handle and its 32 MiB workspace per stream: a program making stream after stream
    held them all. At most MAX_HANDLES stay, the least recently used destroyed
    (cublasDestroy, which waits for the device) and its workspace released -- the
    current streams' handles kept."""
    import gc
    import weakref

    made = []
    workspace = blas.workspace

    def recorded(nbytes):
        owner, address = workspace(nbytes)
        made.append(weakref.ref(owner))
        return owner, address
    blas.workspace = recorded
    stream = [host_cupy.STREAM]
    blas.stream = lambda: stream[0]
    extra = 3
    for k in range(cublas.MAX_HANDLES + extra):
        for s in (host_cupy.STREAM, 0x5000 + k):  # the default stream stays in use
            stream[0] = s
            ops.gemm("N", "N", np.ones((2, 2)), np.ones((2, 2)), np.empty((2, 2)))
    gc.collect()
    assert len(blas.handles) == cublas.MAX_HANDLES and blas.destroyed == extra + 1
    assert sum(w() is not None for w in made) == cublas.MAX_HANDLES
    assert host_cupy.STREAM in {state.stream for state in blas.handles.values()}
    destroyed = [name for name, _ in blas.calls if name == "cublasDestroy_v2"]
    assert len(destroyed) == extra + 1


def test_the_math_mode_is_cupys_handles(blas):
    """TF32 only where CuPy's own handle has it: gpu_mlp's GEMMs round as CuPy's did."""
    runtime = Recording(math_mode=3)  # CUBLAS_TF32_TENSOR_OP_MATH
    with cublas.use(runtime):
        ops.gemm("N", "N", np.ones((2, 2)), np.ones((2, 2)), np.empty((2, 2)))
    assert [state.math_mode for state in runtime.handles.values()] == [3]
    ops.gemm("N", "N", np.ones((2, 2)), np.ones((2, 2)), np.empty((2, 2)))
    assert [state.math_mode for state in blas.handles.values()] == [0]


@pytest.mark.parametrize("value, tf32", [("1", True), ("2", True), ("0", False),
                                         ("-1", False)])
def test_cupy_tf32_turns_tf32_on_as_it_does_for_cupys_matmul(blas, monkeypatch, value, tf32):
    """CuPy's documented switch is the environment variable CUPY_TF32 (an integer > 0),
    which its matmul passes per call and which leaves its handle as it was: gpu_mlp's
    GEMMs follow it too, so one switch turns TF32 on for both."""
    monkeypatch.setenv("CUPY_TF32", value)
    runtime = Recording(math_mode=0)
    with cublas.use(runtime):
        ops.gemm("N", "N", np.ones((2, 2)), np.ones((2, 2)), np.empty((2, 2)))
    assert [state.math_mode for state in runtime.handles.values()] == [3 if tf32 else 0]


def test_a_cupy_tf32_that_is_no_integer_is_refused_by_name(blas, monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "yes")
    with cublas.use(Recording()), pytest.raises(ValueError, match="CUPY_TF32 must be an "
                                                               "integer.*'yes'"):
        ops.gemm("N", "N", np.ones((2, 2)), np.ones((2, 2)), np.empty((2, 2)))


def test_the_gram_bound_takes_tf32_from_the_handle_that_ran_its_gemms(blas):
    """The Gram form's rounding bound must be TF32's where its GEMMs were: those of the
    stream's handle, whose math mode is CuPy's when it was made -- not CuPy's now (a
    float32 bound 2^13 too small where CuPy went back to float32 after the handle was
    made: the clipping could fail)."""
    from gpu_mlp import norms

    runtime = Recording(math_mode=3)
    with cublas.use(runtime):
        ops.gemm("N", "N", np.ones((2, 2)), np.ones((2, 2)), np.empty((2, 2)))
        runtime.mode_ = 0  # CuPy's handle back to float32 since
        assert norms._tf32()
    ops.gemm("N", "N", np.ones((2, 2)), np.ones((2, 2)), np.empty((2, 2)))
    blas.mode_ = 3
    assert not norms._tf32()


def test_the_pointer_mode_follows_the_scalars_and_is_set_only_when_it_changes(blas):
    a, out = np.ones((2, 2)), np.empty((2, 2))
    one, zero = np.array(1.0), np.array(0.0)
    for alpha, beta in [(1.0, 0.0), (1.0, 0.0), (one, zero), (one, zero), (2.0, 1.0)]:
        ops.gemm("N", "N", a, a, out, alpha, beta)
    modes = [args[1] for name, args in blas.calls if name == "cublasSetPointerMode_v2"]
    assert modes == [cublas.POINTER_MODE_HOST, cublas.POINTER_MODE_DEVICE,
                     cublas.POINTER_MODE_HOST]


def test_a_host_number_beside_a_device_scalar_goes_to_the_device_once(blas):
    a, out = np.ones((2, 2)), np.zeros((2, 2))
    for lr in (0.5, 0.25):
        ops.gemm("N", "N", a, a, out, np.array(-lr), 1.0)
    np.testing.assert_array_equal(out, -1.5)
    [(name, args)] = [c for c in blas.calls if c[0] == "cublasSetPointerMode_v2"
                      and c[1][1] == cublas.POINTER_MODE_DEVICE]
    betas = {args[11] for name, args in blas.named("cublasDgemm")}
    assert len(betas) == 1  # one device constant 1.0, kept


def test_the_cpu_path_takes_0d_arrays_too():  # SciPy reads them at the call
    a, out = np.ones((2, 3)), np.zeros((2, 2))
    ops.gemm("N", "T", a, a, out, np.array(2.0), np.array(0.0))
    np.testing.assert_array_equal(out, 6.0)
    y = np.full(2, 1.0)
    ops.gemv("N", a, np.ones(3), y, np.array(-1.0), np.array(1.0))
    np.testing.assert_array_equal(y, -2.0)


M = np.ones((4, 5))
BAD_CALLS = [  # (call, exception, message)
    pytest.param(lambda: ops.gemm("N", "T", M.astype(np.float32), M, np.empty((4, 4))),
                 TypeError, "gemm NT, a: expected float64, got float32", id="mixed dtypes"),
    pytest.param(lambda: ops.gemm("N", "T", M.astype(np.float16), M.astype(np.float16),
                                  np.empty((4, 4), np.float16)),
                 TypeError, "float32 or float64 arrays only", id="float16"),
    pytest.param(lambda: ops.gemm("N", "T", np.asfortranarray(M), M, np.empty((4, 4))),
                 ValueError, "a: not C-contiguous", id="Fortran order"),
    pytest.param(lambda: ops.gemm("N", "N", M, M, np.empty((4, 4))),
                 ValueError, r"op\(a\) \(4, 5\), op\(b\) \(4, 5\)", id="inner sizes"),
    pytest.param(lambda: ops.gemm("N", "T", M, M, np.empty((4, 5))),
                 ValueError, r"out \(4, 5\)", id="out's shape"),
    pytest.param(lambda: ops.gemm("N", "T", M, M, M[:, :4].copy().reshape(-1)),
                 ValueError, "out: expected 2-D", id="out 1-D"),
    pytest.param(lambda: ops.gemm("H", "N", M, M, np.empty((5, 5))),
                 ValueError, "transposition 'H'", id="conjugate"),
    pytest.param(lambda: ops.gemm("T", "N", M[:, :4], M[:, :4], np.empty((4, 4))),
                 ValueError, "a: not C-contiguous", id="strided"),
    pytest.param(lambda: (lambda S: ops.gemm("N", "N", S, np.eye(4), S))(np.ones((4, 4))),
                 ValueError, "out: overlaps a", id="out is a"),
    pytest.param(lambda: ops.gemm("N", "T", M, M, np.empty((4, 4)), np.array([1.0])),
                 TypeError, "alpha on the device must be a 0-d float64", id="alpha (1,)"),
    pytest.param(lambda: ops.gemm("N", "T", M, M, np.empty((4, 4)), 1.0,
                                  np.array(0.0, np.float32)),
                 TypeError, "beta on the device must be a 0-d float64", id="beta float32"),
    pytest.param(lambda: ops.gemm_batched("N", "T", M[None], M[None], np.empty((2, 4, 4))),
                 ValueError, "one batch", id="batched counts"),
    pytest.param(lambda: ops.gemm_batched("N", "T", M[None], M, np.empty((1, 4, 4))),
                 ValueError, r"b \(4, 5\) and out .* must be 3-D stacks", id="batched b 2-D"),
    pytest.param(lambda: ops.gemm_batched("N", "T", M[None], M[None], np.empty((1, 4, 5))),
                 ValueError, r"op\(a\[i\]\) \(4, 5\) op\(b\[i\]\) \(5, 4\)",
                 id="batched out's shape"),
    pytest.param(lambda: ops.gemv("T", M, np.ones(5), np.empty(5)),
                 ValueError, r"x: expected shape \(4,\)", id="gemv x"),
    pytest.param(lambda: ops.gemv("N", M, np.ones(10)[::2], np.empty(4)),
                 ValueError, "x: not C-contiguous", id="gemv strided x"),
    pytest.param(lambda: ops.gemv("N", M, np.ones(5, np.float32), np.empty(4)),
                 TypeError, "x: expected float64, got float32", id="gemv mixed dtypes"),
]


@pytest.mark.parametrize("call, exception, message", BAD_CALLS)
def test_bad_calls_are_refused_before_cublas(blas, call, exception, message):
    with pytest.raises(exception, match=message):
        call()
    assert not blas.named("cublasSgemm") + blas.named("cublasDgemm") + \
        blas.named("cublasDgemv")


def test_a_cublas_error_names_its_status(monkeypatch):
    monkeypatch.setattr(ops, "is_numpy", lambda a: False)
    with cublas.use(Recording(aligned=False)):  # cuBLAS refuses a misaligned workspace
        with pytest.raises(cublas.CublasError, match=r"cublasSetWorkspace_v2 returned "
                                                     r"CUBLAS_STATUS_INVALID_VALUE \(7\)"):
            ops.gemm("N", "N", np.ones((2, 2)), np.ones((2, 2)), np.empty((2, 2)))


def test_the_stand_in_refuses_what_cublas_refuses():
    """A leading dimension below the rows is CUBLAS_STATUS_INVALID_VALUE; one that would
    read past the array is caught here before it reads; C prototypes are checked."""
    runtime = Recording()
    binding = cublas.Cublas(runtime)
    handle = binding.handle().ptr
    a = np.ones((3, 3))
    one = ctypes.c_double(1.0)
    sgemm = runtime.library.cublasDgemm_v2
    p, address = ctypes.addressof(one), runtime.pointer(a)
    assert sgemm(handle, 0, 0, 3, 3, 3, p, address, 2, address, 3, p, address, 3) == 7
    b = np.ones(4)
    with pytest.raises(AssertionError, match="reads 9 elements of an array of 4"):
        sgemm(handle, 0, 0, 3, 3, 3, p, runtime.pointer(b), 3, address, 3, p,
              runtime.pointer(np.ones((3, 3))), 3)
    with pytest.raises(AssertionError, match="overflows a C int"):
        sgemm(handle, 0, 0, 2**31, 3, 3, p, address, 3, address, 3, p, address, 3)
    sgemm.argtypes = sgemm.argtypes[:-1] + (ctypes.c_long,)
    with pytest.raises(AssertionError, match="the C prototype"):
        sgemm(handle, 0, 0, 3, 3, 3, p, address, 3, address, 3, p, address, 3)


# --- under capture (tests/capture.py) ------------------------------------------------------

def test_a_replay_reads_device_scalars_as_they_are(device):
    """The learning rate of a schedule can live on the device: alpha = -lr passed as a
    0-d device array is read by each replay (a host number beside it is copied to the
    device before the capture, once: here beta = 1.0, used eagerly first)."""
    counts, _ = device
    a, b, out = _device(np.eye(2), [[1.0, 2.0], [3.0, 4.0]], np.zeros((2, 2)))
    [alpha] = _device(-1.0)
    ops.gemm("N", "N", a, b, out, alpha, 1.0)  # eager: the constant 1.0 goes to the device
    out[...] = np.float32(0)
    syncs = counts.syncs
    with Capture() as capture:
        ops.gemm("N", "N", a, b, out, alpha, 1.0)
        ops.gemv("N", a, b[0], out[1], alpha, 1.0)
    assert capture.graph.names == ["gemm", "gemv"]
    assert capture.graph.record[0].scalars == ()  # nothing frozen
    np.testing.assert_array_equal(out.view(np.ndarray), 0.0)  # captured, not run
    alpha[...] = np.float32(-0.5)
    capture.graph.launch()
    np.testing.assert_array_equal(out.view(np.ndarray), [[-0.5, -1.0], [-2.0, -3.0]])
    alpha[...] = np.float32(2.0)
    capture.graph.launch()
    np.testing.assert_array_equal(out.view(np.ndarray), [[1.5, 3.0], [6.0, 9.0]])
    assert counts.syncs == syncs  # nothing read on the host


def test_host_scalars_are_frozen_at_capture(device):
    a, b, out = _device(np.eye(2), np.ones((2, 2)), np.zeros((2, 2)))
    with Capture() as capture:
        ops.gemm("N", "N", a, b, out, 2.0, 0.0)
    assert capture.graph.record[0].scalars == (2.0, 0.0)


def test_no_handle_is_made_and_no_constant_copied_during_a_capture(device):
    counts, lib = device
    a, out = _device(np.eye(2), np.zeros((2, 2)))
    [alpha] = _device(1.0)
    runtime = CapturableBlas(host_cupy.Device(lib))
    with cublas.use(runtime):  # a fresh binding: no handle for the stream yet
        with Capture() as capture:
            with pytest.raises(RuntimeError, match="call gpu_mlp.cublas.prepare"):
                ops.gemm("N", "N", a, a, out)
        cublas.prepare()
        with Capture() as capture:
            ops.gemm("N", "N", a, a, out)
            with pytest.raises(RuntimeError, match=r"a host number \(0.5\) beside"):
                ops.gemm("N", "N", a, a, out, alpha, 0.5)
        assert capture.graph.names == ["gemm"]


def test_a_handle_without_its_workspace_breaks_the_capture(device):
    """cuBLAS without a workspace of its own allocates from its pool during the capture."""
    counts, lib = device
    a, out = _device(np.eye(2), np.zeros((2, 2)))
    with capturable_blas(lib) as runtime:
        [state] = runtime.handles.values()
        state.workspace = None  # as a cublasSetStream after cublasSetWorkspace leaves it
        with Capture():
            with pytest.raises(CaptureBroken, match="no workspace of its own"):
                ops.gemm("N", "N", a, a, out)


def test_a_host_array_is_refused(device):
    [out] = _device(np.zeros((2, 2)))
    with pytest.raises(TypeError, match="a host ndarray passed to cuBLAS"):
        ops.gemm("N", "N", np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), out)


# --- on a GPU: the real libcublas ----------------------------------------------------------

def _real_libcublas():
    """The libcublas CuPy would load (cuda.pathfinder), where one is installed."""
    pathfinder = pytest.importorskip("cuda.pathfinder")
    try:
        loaded = pathfinder.load_nvidia_dynamic_lib("cublas")
    except Exception as e:  # DynamicLibNotFoundError: no CUDA toolkit libraries here
        pytest.skip(f"no libcublas to load ({type(e).__name__})")
    return ctypes.CDLL(loaded.abs_path or "libcublas.so.13")


def test_the_real_libcublas_has_the_bindings_entry_points_and_status_names():
    """Runs wherever a libcublas loads, GPU or not: every name the binding binds resolves,
    its statuses are the library's own names, and a GEMM with no handle is refused by
    cuBLAS (NOT_INITIALIZED) through the binding's own argtypes, touching no device."""
    lib = _real_libcublas()
    for name in cublas.PROTOTYPES:
        getattr(lib, name)
    status_name = lib.cublasGetStatusName
    status_name.argtypes, status_name.restype = (ctypes.c_int,), ctypes.c_char_p
    for status, name in cublas.STATUS.items():
        assert status_name(status).decode() == name
    sgemm = lib.cublasSgemm_v2
    sgemm.argtypes, sgemm.restype = cublas.PROTOTYPES["cublasSgemm_v2"], ctypes.c_int
    one = ctypes.c_float(1.0)
    p = ctypes.addressof(one)
    assert sgemm(None, 0, 0, 1, 1, 1, p, None, 1, None, 1, p, None, 1) == 1



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("transa, transb", list(itertools.product("NT", repeat=2)),
                         ids=lambda t: "".join(t))
def test_on_a_gpu_gemm_is_cupys(dtype, transa, transb):
    import cupy

    rng = np.random.default_rng(0)
    for m, k, n in [(33, 17, 9), (1, 5, 6), (4, 5, 1), (4, 0, 6)]:
        a, b = (cupy.asarray(x) for x in _operands(rng, dtype, transa, transb, m, k, n))
        start = cupy.asarray(rng.standard_normal((m, n)).astype(dtype))
        for alpha, beta in [(1.0, 0.0), (-0.5, 1.0)]:
            for device_scalars in (False, True):
                out = start.copy()
                scalars = [cupy.asarray(np.array(x, dtype)) if device_scalars else x
                           for x in (alpha, beta)]
                ops.gemm(transa, transb, a, b, out, *scalars)
                op_a, op_b = (a if transa == "N" else a.T), (b if transb == "N" else b.T)
                expected = alpha * (op_a @ op_b) + beta * start
                cupy.testing.assert_allclose(out, expected, rtol=RTOL[np.dtype(dtype)] * 10,
                                             atol=RTOL[np.dtype(dtype)] * 10)


@pytest.mark.gpu
def test_on_a_gpu_a_captured_gemm_replays_with_its_device_alpha():
    import cupy

    a = cupy.eye(64, dtype=cupy.float32)
    b = cupy.ones((64, 64), cupy.float32)
    out = cupy.zeros((64, 64), cupy.float32)
    alpha = cupy.full((), 1.0, cupy.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        cublas.prepare()
        # a host beta beside a device alpha is copied to the device once, which a
        # capture cannot do: a warm-up call first, as the engine's eager first step
        ops.gemm("N", "N", a, b, cupy.zeros_like(out), alpha, 1.0)
        stream.begin_capture()
        try:
            ops.gemm("N", "N", a, b, out, alpha, 1.0)
        finally:
            graph = stream.end_capture()
        for value in (1.0, 2.0, 3.0):
            alpha.fill(value)
            graph.launch()
        stream.synchronize()
    cupy.testing.assert_array_equal(out, cupy.full((64, 64), 6.0, cupy.float32))


def test_cupys_runtime_has_cupy_load_libcublas_before_its_cublas_module(monkeypatch):
    """CuPy's cupy_backends.cuda.libs loads libcublas (through cuda.pathfinder) in its
    package __getattr__, before the module that links it; ``import
    cupy_backends.cuda.libs.cublas`` skips that hook and fails where only pathfinder finds
    the library (a pip wheel's, CUDA_PATH). The runtime must ask the package, as CuPy's
    own code does (``from cupy_backends.cuda.libs import cublas``)."""
    import sys
    import types

    asked = []
    libs = types.ModuleType("cupy_backends.cuda.libs")  # a package with only the hook

    def hook(name):
        if name.startswith("__"):  # what the import system asks of any package
            raise AttributeError(name)
        asked.append(name)
        return types.ModuleType(f"cupy_backends.cuda.libs.{name}")
    libs.__getattr__ = hook
    loaded = types.SimpleNamespace(abs_path=None)
    fake_cupy = types.SimpleNamespace(
        ndarray=object, cuda=types.SimpleNamespace(
            runtime=types.SimpleNamespace(runtimeGetVersion=lambda: 13000)))
    pathfinder = types.SimpleNamespace(load_nvidia_dynamic_lib=lambda name: loaded)
    for name, module in {"cupy": fake_cupy, "cupy_backends": types.ModuleType("cb"),
                         "cupy_backends.cuda": types.ModuleType("cbc"),
                         "cupy_backends.cuda.libs": libs,
                         "cuda": types.SimpleNamespace(pathfinder=pathfinder),
                         "cuda.pathfinder": pathfinder}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "cupy_backends.cuda.libs.cublas", raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda path: path)  # no real library opened
    runtime = cublas.CupyRuntime()
    assert asked == ["cublas"] and runtime.library == "libcublas.so.13"
