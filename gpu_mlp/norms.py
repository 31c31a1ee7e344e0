"""Per-sample gradient norms from the factors of the backward pass.

A layer's weight gradient is ``G = T_rows^T rows(F_{k-1})``; sample i's own part is
``G_i = T_i^T X_i`` over its P rows (one for a dense layer, the output positions of a
convolution). Its squared norm comes from the factors without forming ``G_i`` where that
is cheaper: the product of the norms for a dense layer, the Gram form
``<T_i T_i^T, X_i X_i^T>`` or ``G_i`` itself for a convolution, whichever costs less
(docs/MATH.md, "Factored weight gradients" and the end of "General bilinear layers"). Used by :meth:`gpu_mlp.Network.per_sample_grad_norms` and by DP's
clipping (:mod:`gpu_mlp.privacy`).

Where the direct form wins, DP keeps what it computes: :func:`forms_gradients` says when
a convolution's per-sample gradients (:func:`per_sample_gradients`) are kept, so that
the clipped sum is a GEMV over them rather than a second GEMM over the rows.
"""

from __future__ import annotations

import numpy as np

from . import ops


def per_sample_squares(T, X):
    """``||G_i||^2 + ||g_i||^2`` per sample of one layer, from T (B, P, d_out) and the
    rows X (B, P, K) of its input, without a per-sample gradient where that is cheaper:
    on the CPU, one sample at a time (see :func:`_gram_inner`); a GPU's are
    :func:`add_squares`'s."""
    B, P, d_out = T.shape
    K = X.shape[2]
    if P == 1:  # dense: the outer product's norm is the product of the norms
        t, x = row_squares(np, T[:, 0]), row_squares(np, X[:, 0])
        with np.errstate(invalid="ignore"):
            product = t * x
        product[t == 0] = 0  # T_i = 0: G_i = 0, though ||x_i||^2 overflow (0 inf)
        return product + t  # the bias's gradient is T_i itself (no (B, d_out) sum)
    bias = row_squares(np, T.sum(axis=1))
    if gram_form(P, d_out, K):  # <T_i T_i^T, X_i X_i^T>, bounded where rounding rules
        return _gram_bound(_gram_inner(T, X), row_squares(np, T.reshape(B, -1)),
                           row_squares(np, X.reshape(B, -1)), P, d_out, K) + bias
    squares = np.empty(B, dtype=T.dtype)
    G = np.empty((d_out, K), T.dtype)
    for i in range(B):
        ops.gemm("T", "N", T[i], X[i], G)
        squares[i] = np.vdot(G, G)
    return squares + bias


def _gram_inner(T, X):
    """``<T_i T_i^T, X_i X_i^T>`` per sample on the CPU, one sample at a time through
    ops.gemm -- SciPy's BLAS, as every other GEMM of the step (NumPy's matmul runs on
    NumPy's own BLAS, whose idle threads spin against SciPy's on a small machine) -- into
    one sample's buffers, not B of them."""
    B, P, _ = T.shape
    inner = np.empty(B, dtype=T.dtype)
    gram_T, gram_X = np.empty((P, P), T.dtype), np.empty((P, P), T.dtype)
    for i in range(B):
        ops.gemm("N", "T", T[i], T[i], gram_T)
        ops.gemm("N", "T", X[i], X[i], gram_X)
        inner[i] = np.vdot(gram_T, gram_X)
    return inner


def _gram_bound(inner, T_squares, X_squares, P: int, d_out: int, K: int, ws=None):
    """The Gram form's ``<T_i T_i^T, X_i X_i^T>``, kept where it is reliable and made an
    upper bound of ``||G_i||^2`` where it is not. Computed, it is off by up to ``e_i =
    (d_out + K + P^2) u ||T_i||^2 ||X_i||^2`` (u the dtype's unit roundoff: the two
    GEMMs' and the inner product's rounding, each entry bounded by Cauchy-Schwarz),
    which is all of it where ``G_i``'s terms nearly cancel: noise then, negative, a NaN
    norm (that made a DP step's every weight NaN), or too small a norm for the clipping
    to hold. Where ``e_i`` exceeds :data:`GRAM_TRUSTED` of the value, the value is
    ``max(value, 0) + e_i`` instead, never below the true one: the clipping holds, at
    the price of clipping such a sample harder. In place: the result is written into
    ``inner`` and returned (:func:`gpu_mlp.ops.gram_bound`: on NumPy ``T_squares`` and
    ``X_squares`` are overwritten, and its scratch comes from the workspace ``ws`` if
    given; on a GPU it is one kernel)."""
    u = float(np.finfo(inner.dtype).eps) / 2
    if not isinstance(inner, np.ndarray) and inner.dtype == np.float32 and _tf32():
        u = 2.0 ** -11  # the GEMMs round the factors to TF32's 10 bits
    return ops.gram_bound(inner, T_squares, X_squares, (d_out + K + P * P) * u, GRAM_TRUSTED,
                          ws)


def _tf32() -> bool:
    """Whether the float32 GEMMs of the Gram form just run on this stream were TF32: its
    cuBLAS handle's math mode (CuPy's when the handle was made, not CuPy's now)."""
    from . import cublas

    return cublas.binding().handle().math == cublas.TF32_TENSOR_OP_MATH


# the share of a Gram-form square its worst-case rounding may be for it to be kept as it
# is (about P (d_out + K + P^2) u of it for a sample whose terms do not cancel: 4e-4 in
# float32 at P = 16, 32 -> 32 channels 3x3)
GRAM_TRUSTED = 0.01


def gram_form(P: int, d_out: int, K: int) -> bool:
    """Whether a convolution's per-sample squared norms cost less from the Gram matrices
    ``T_i T_i^T`` and ``X_i X_i^T`` (P^2 (d_out + K) multiply-adds a sample) than from
    ``G_i = T_i^T X_i`` itself (P d_out K); the inner products after either (P^2 or
    d_out K) are the smaller terms."""
    return P * (d_out + K) < d_out * K


def forms_gradients(P: int, d_out: int, K: int) -> bool:
    """Whether DP keeps a layer's per-sample gradients: a convolution whose norms take the
    direct form computes ``G_i`` for them anyway (B P d_out K multiply-adds); kept, the
    clipped sum ``sum_i c_i G_i`` is a GEMV over them (B d_out K) instead of the GEMM over
    the scaled rows again (B P d_out K). Only where they take no more memory than the
    rows ``rows(x)`` (B P K) the step holds anyway: ``d_out <= P``. (There the direct
    form is the cheaper one anyway: the Gram form wins only where P < d_out K / (d_out +
    K) < d_out.)"""
    return 1 < P and d_out <= P and not gram_form(P, d_out, K)


def per_sample_gradients(xp, T, X, G, g, ws) -> None:
    """Each sample's own gradients, ``G[i] = T_i^T X_i`` into ``G`` (B, d_out, K) and
    ``g[i] = T_i^T 1`` into ``g`` (B, d_out), from T (B, P, d_out) and the rows X
    (B, P, K); no array is made."""
    ops.gemm_batched("T", "N", T, X, G)  # no array made, capturable on the GPU
    _sample_sums(xp, T, g, ws)


def _sample_sums(xp, T, g, ws) -> None:
    """``g[i] = sum_p T[i, p]``: NumPy's sum; on a GPU a batched GEMM against the
    workspace's ones (CuPy's sum over an axis is a kernel for a first run to compile)."""
    if xp is np:
        np.sum(T, axis=1, out=g)
        return
    B, P, d_out = T.shape
    ops.gemm_batched("N", "N", ws.ones(B * P).reshape(B, 1, P), T, g.reshape(B, 1, d_out))


def row_squares_into(xp, A, out, ws, add=False) -> None:
    """``out[i] = ||A[i]||^2`` (``add``: ``+=``) for a 2-D C-contiguous ``A``, no array
    made: NumPy's einsum (into a workspace vector to add); on a GPU (CuPy's reductions
    and einsum make their results) the squares into a workspace buffer (``ws``) and a
    GEMV against ones into ``out``."""
    if xp is np:
        if not add:
            np.einsum("ij,ij->i", A, A, out=out)
            return
        squares = ws.take((A.shape[0],))
        np.einsum("ij,ij->i", A, A, out=squares)
        out += squares
    else:
        squares = ws.take(A.shape)
        ops.square(A, squares)
        ops.gemv("N", squares, ws.ones(A.shape[1]), out, beta=1.0 if add else 0.0)
    ws.give(squares)


def add_row_squares(xp, a, b, out, ws) -> None:
    """``out[i] += ||a_i||^2 + ||b_i||^2`` for 2-D C-contiguous ``a`` and ``b`` of B rows
    each (a layer's per-sample G_i flat and g_i), no array made: on NumPy
    :func:`row_squares_into` each, on a GPU :func:`gpu_mlp.ops.add_row_squares`."""
    if xp is np:
        row_squares_into(xp, a, out, ws, add=True)
        row_squares_into(xp, b, out, ws, add=True)
    else:
        ops.add_row_squares(a, b, out, ws)


def add_squares(xp, T, X, out, ws) -> None:
    """``out += per_sample_squares(T, X)``. On a GPU no array is made -- CuPy's
    reductions, einsum and matmul make their results, which a step being captured may
    not -- from the workspace ``ws``: a dense layer's ``||T_i||^2 (||X_i||^2 + 1)`` by
    :func:`gpu_mlp.ops.add_row_squares`' two kernels; a convolution's forms as
    :func:`per_sample_squares` computes them, the batched GEMMs into workspace buffers."""
    if xp is np:
        out += per_sample_squares(T, X)
        return
    B, P, d_out = T.shape
    K = X.shape[2]
    if P == 1:  # T_i = 0: G_i = 0, though ||x_i||^2 overflow
        ops.add_row_squares(T[:, 0], X[:, 0], out, ws, dense=True)
        return
    if not gram_form(P, d_out, K):  # G_i itself, batched, and its rows' squares
        G, g = ws.take((B, d_out, K)), ws.take((B, d_out))
        per_sample_gradients(xp, T, X, G, g, ws)
        ops.add_row_squares(G.reshape(B, -1), g, out, ws)
        ws.give(G, g)
        return
    # the Gram form, <T_i T_i^T, X_i X_i^T>, bounded where rounding rules (two buffers
    # of (P, P) rows: the workspace keeps one per shape after the first axis, so a
    # (2, B, ...) one would be kept per batch size)
    squares = ws.take((B,))
    gram_T, gram_X = ws.take((B, P, P)), ws.take((B, P, P))
    ops.gemm_batched("N", "T", T, T, gram_T)
    ops.gemm_batched("N", "T", X, X, gram_X)
    with np.errstate(invalid="ignore"):  # (0 inf: the bound sees to it)
        ops.mul(gram_T, gram_X)
    ops.gemv("N", gram_T.reshape(B, -1), ws.ones(P * P), squares)
    ws.give(gram_T, gram_X)
    t, x = ws.take((B,)), ws.take((B,))
    row_squares_into(xp, T.reshape(B, -1), t, ws)
    row_squares_into(xp, X.reshape(B, -1), x, ws)
    _gram_bound(squares, t, x, P, d_out, K, ws)
    ws.give(t, x)
    g = ws.take((B, d_out))  # the bias's: sum_p T_i[p]
    _sample_sums(xp, T, g, ws)
    row_squares_into(xp, g, squares, ws, add=True)
    ops.gemv("N", squares.reshape(B, 1), ws.ones(1), out, beta=1.0)  # out += squares
    ws.give(g, squares)


def row_squares(xp, A):
    """``||A[i]||^2`` of each row of a 2-D array, without a temporary of A's size."""
    return xp.einsum("ij,ij->i", A, A)
