"""The engine's operations, each with its CUDA kernel and its NumPy twin side by side.

Every operation works in place on arrays the engine owns: on CuPy arrays it launches a
kernel built from ``kernels/`` (``ELEMENTWISE`` below lists the elementwise ones as
data, so the tests can compile the very same bodies for the host), on NumPy arrays it
runs the twin, which calls the same row of the activation or loss table. Matrix work
goes to BLAS with ``beta``: cuBLAS through ``cupy.cublas``, and on the CPU SciPy's BLAS
on Fortran-ordered views of our C-ordered arrays, which is what lets ``W -= lr dJ/dW``
be one GEMM straight into ``W`` with no gradient buffer on either backend.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.linalg import blas as _blas

from . import cuda

# name: (in_params, out_params, operation); "{act}" is an activation's table name.
ELEMENTWISE = {
    # forward, "output" mode: A <- sigma(A + b), in place
    "bias_act": ("T bias, T alpha", "T a", "a = gm_{act}(a + bias, alpha)"),
    # forward, "recompute" mode: keep A <- A + b, write F = sigma(A)
    "bias_act_keep": ("T bias, T alpha", "T a, T f", "a = a + bias; f = gm_{act}(a, alpha)"),
    # forward, "store_both" mode: F = sigma(A + b), and A becomes D = sigma'(A + b)
    "bias_act_grad": ("T bias, T alpha", "T a, T f",
                      "T z = a + bias; f = gm_{act}(z, alpha); a = gm_{act}_grad(z, alpha)"),
    # backward, "output" mode: Delta *= sigma'(F), from the output alone
    "grad_from_output": ("T f, T alpha", "T delta",
                         "delta = delta * gm_{act}_grad_from_output(f, alpha)"),
    # backward, "recompute" mode: A becomes F = sigma(A), and Delta *= sigma'(A)
    "recompute_grad": ("T alpha", "T a, T delta",
                       "T z = a; a = gm_{act}(z, alpha); delta = delta * gm_{act}_grad(z, alpha)"),
    # backward, "store_both" mode: Delta *= D
    "mul": ("T d", "T delta", "delta = delta * d"),
    # losses: per-element loss and scale * dl/df in one pass
    "squared": ("T f, T y, T scale", "T grad, T loss", "loss = gm_squared(f, y, scale, grad)"),
    "logistic": ("T f, T y, T scale", "T grad, T loss", "loss = gm_logistic(f, y, scale, grad)"),
}


def is_numpy(a) -> bool:
    return isinstance(a, np.ndarray)


@functools.cache
def _kernel(op: str, act_name: str):
    in_params, out_params, body = ELEMENTWISE[op]
    # kernel names must not clash with the gm_* device functions they call
    name = f"gpu_mlp_{op}_{act_name}" if act_name else f"gpu_mlp_{op}"
    return cuda.elementwise(in_params, out_params, body.format(act=act_name), name)


def _launch(op, act, *args):
    _kernel(op, act.name if act is not None else "")(*args)


def _alpha(act, a):
    return a.dtype.type(act.alpha)


_ROW_THREADS = 128
_NULL = np.uint64(0)  # a null pointer argument for a RawKernel (no bias)


def _launch_rows(name, rows, *args):
    """Launch a row-wise kernel over ``rows`` rows, one thread per row."""
    dtype = next(a.dtype for a in args if hasattr(a, "dtype") and a.dtype.kind == "f")
    blocks = (rows + _ROW_THREADS - 1) // _ROW_THREADS
    if blocks:
        cuda.row_kernel(name, dtype)((blocks,), (_ROW_THREADS,), args)


# --- activations ----------------------------------------------------------------------

def bias_act(act, a, bias):
    """``a <- sigma(a + bias)`` (forward, "output" mode)."""
    if is_numpy(a):
        np.add(a, bias, out=a)
        act.kind.value(a, act.alpha, a)
    elif act.kind.rowwise:
        B, C = a.shape
        _launch_rows("gm_softmax_forward", B, a, bias, a, np.int32(B), np.int32(C))
    else:
        _launch("bias_act", act, bias, _alpha(act, a), a)


def bias_act_keep(act, a, bias, f):
    """``a <- a + bias``; ``f <- sigma(a)`` (forward, "recompute" mode)."""
    if is_numpy(a):
        np.add(a, bias, out=a)
        act.kind.value(a, act.alpha, f)
    elif act.kind.rowwise:
        B, C = a.shape
        a += bias
        _launch_rows("gm_softmax_forward", B, a, _NULL, f, np.int32(B), np.int32(C))
    else:
        _launch("bias_act_keep", act, bias, _alpha(act, a), a, f)


def bias_act_grad(act, a, bias, f):
    """``f <- sigma(a + bias)``; ``a <- sigma'(a + bias)`` (forward, "store_both" mode)."""
    if act.kind.rowwise:
        raise ValueError("softmax has no elementwise derivative to store")
    if is_numpy(a):
        np.add(a, bias, out=a)
        act.kind.value(a, act.alpha, f)
        act.kind.grad(a, act.alpha, a)
    else:
        _launch("bias_act_grad", act, bias, _alpha(act, a), a, f)


def grad_from_output(act, f, delta):
    """``delta <- delta (.) sigma'`` computed from the output ``f`` ("output" mode)."""
    if act.name == "identity":
        return
    if is_numpy(f):
        if act.kind.rowwise:
            _softmax_backward_numpy(f, delta)
        else:
            delta *= act.kind.grad_from_output(f, act.alpha, np.empty_like(f))
    elif act.kind.rowwise:
        B, C = f.shape
        _launch_rows("gm_softmax_backward", B, f, delta, np.int32(B), np.int32(C))
    else:
        _launch("grad_from_output", act, f, _alpha(act, f), delta)


def recompute_grad(act, a, delta):
    """``a <- sigma(a)`` and ``delta <- delta (.) sigma'(a)`` ("recompute" mode)."""
    if is_numpy(a):
        if act.kind.rowwise:
            act.kind.value(a, act.alpha, a)
            _softmax_backward_numpy(a, delta)
        else:
            d = act.kind.grad(a, act.alpha, np.empty_like(a))
            act.kind.value(a, act.alpha, a)
            delta *= d
    elif act.kind.rowwise:
        B, C = a.shape
        _launch_rows("gm_softmax_forward", B, a, _NULL, a, np.int32(B), np.int32(C))
        _launch_rows("gm_softmax_backward", B, a, delta, np.int32(B), np.int32(C))
    else:
        _launch("recompute_grad", act, _alpha(act, a), a, delta)


def mul(delta, d):
    """``delta <- delta (.) d`` ("store_both" mode)."""
    if is_numpy(delta):
        delta *= d
    else:
        _launch("mul", None, d, delta)


def _softmax_backward_numpy(f, delta):
    from .activations import softmax_backward

    softmax_backward(f, delta, out=delta)


# --- losses ---------------------------------------------------------------------------

def loss_and_grad(loss, F, Y, grad, scale, scratch):
    """Write ``grad = scale * dl/dF`` and return the mean per-sample loss as a 0-d array.

    ``scratch`` is a workspace buffer shaped like F (elementwise losses) or (B,)
    (row-wise ones) that receives the loss terms before the sum.
    """
    B = F.shape[0]
    if is_numpy(F):
        return np.asarray(loss.evaluate(F, Y, scale, grad).sum() / B)
    s = F.dtype.type(scale)
    if loss.rowwise:
        kernel = "gm_softmax_xent_labels" if Y.ndim == 1 else "gm_softmax_xent_targets"
        _launch_rows(kernel, B, F, Y, grad, scratch, np.int32(B), np.int32(F.shape[1]), s)
    else:
        _launch(loss.name, None, F, Y, s, grad, scratch)
    return scratch.sum() / B


def loss_scratch_shape(loss, F_shape):
    return (F_shape[0],) if loss.rowwise else tuple(F_shape)


# --- BLAS -----------------------------------------------------------------------------

_NUMPY_GEMM = {np.dtype(np.float32): _blas.sgemm, np.dtype(np.float64): _blas.dgemm}
_NUMPY_GEMV = {np.dtype(np.float32): _blas.sgemv, np.dtype(np.float64): _blas.dgemv}


def gemm(transa: str, transb: str, a, b, out, alpha=1.0, beta=0.0):
    """``out <- alpha op(a) op(b) + beta out`` in place; all arrays C-contiguous."""
    if is_numpy(out):
        # In Fortran order the C-ordered out is out^T = alpha op(b)^T op(a)^T + beta out^T,
        # and x.T of a C-ordered x is the Fortran array BLAS wants: no copy anywhere.
        out_f = out.T
        result = _NUMPY_GEMM[out.dtype](alpha, b.T, a.T, beta, out_f,
                                        trans_a=transb == "T", trans_b=transa == "T",
                                        overwrite_c=1)
        if result is not out_f:  # f2py copied (a wrong dtype or layout): never expected
            raise RuntimeError("BLAS gemm did not write in place; pass C-contiguous arrays")
    else:
        import cupy.cublas

        cupy.cublas.gemm(transa, transb, a, b, out=out, alpha=alpha, beta=beta)
    return out


def gemv(transa: str, a, x, out, alpha=1.0, beta=0.0):
    """``out <- alpha op(a) x + beta out`` in place; ``a`` C-contiguous."""
    if is_numpy(out):
        result = _NUMPY_GEMV[out.dtype](alpha, a.T, x, beta, out, trans=int(transa == "N"),
                                        overwrite_y=1)
        if result is not out:
            raise RuntimeError("BLAS gemv did not write in place; pass C-contiguous arrays")
    else:
        import cupy.cublas

        cupy.cublas.gemv(transa, alpha, a, x, beta, out)
    return out
