"""Input checks shared by the reference and the engine.

Every public entry point validates before it touches anything, so a bad call raises a
``TypeError`` / ``ValueError`` that names the problem and leaves a model unchanged.
"""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def dtype_of(name: str, dtype) -> np.dtype:
    """The float32/float64 dtype named by ``dtype``, or a TypeError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def floating(name: str, a):
    """``a`` itself if it is a floating-point array, else a TypeError naming it."""
    dt = getattr(a, "dtype", None)
    if dt is None:
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if np.dtype(dt).kind != "f":
        raise TypeError(f"{name} must hold floating-point numbers, got dtype {dt}")
    return a


def finite(name: str, a, xp=np) -> None:
    """Raise a ValueError if ``a`` holds NaN or Inf (one device sync on a GPU array)."""
    if a.size and not bool(xp.isfinite(a).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def params(params) -> list[tuple]:
    """Check a list of ``(W_k, b_k)``: shapes chain, one float dtype, all finite."""
    try:
        pairs = [tuple(p) for p in params]
    except TypeError:
        raise TypeError("params must be a list of (W, b) pairs") from None
    if not pairs:
        raise ValueError("params must hold at least one layer")
    dtype = None
    for k, pair in enumerate(pairs, start=1):
        if len(pair) != 2:
            raise ValueError(f"layer {k}: expected a (W, b) pair, got {len(pair)} items")
        W, b = pair
        floating(f"W_{k}", W)
        floating(f"b_{k}", b)
        if W.ndim != 2:
            raise ValueError(f"W_{k} must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
        if tuple(b.shape) != (W.shape[0],):
            raise ValueError(f"b_{k} must have shape ({W.shape[0]},) to match W_{k} "
                             f"{tuple(W.shape)}, got {tuple(b.shape)}")
        if k > 1 and W.shape[1] != pairs[k - 2][0].shape[0]:
            raise ValueError(f"W_{k} takes {W.shape[1]} inputs but layer {k - 1} has "
                             f"{pairs[k - 2][0].shape[0]} outputs")
        finite(f"W_{k}", W, _namespace(W))
        finite(f"b_{k}", b, _namespace(b))
        if dtype is None:
            dtype = W.dtype
        if W.dtype != dtype or b.dtype != dtype:
            raise TypeError(f"layer {k}: all parameters must share one dtype ({dtype}), "
                            f"got W {W.dtype} and b {b.dtype}")
    return pairs


def _namespace(a):
    """NumPy, or CuPy for a CuPy array (without importing CuPy otherwise)."""
    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy


def inputs(X, d_in: int, xp=np, values: bool = True):
    """Check X: a float (B, d_in) batch or one (d_in,) sample, finite (if ``values``)."""
    X = floating("X", X)
    if X.ndim not in (1, 2) or X.shape[-1] != d_in:
        raise ValueError(f"X must have shape (batch, {d_in}) or ({d_in},), got {tuple(X.shape)}")
    if X.ndim == 2 and X.shape[0] == 0:
        raise ValueError("X is an empty batch: it must hold at least one sample")
    if values:
        finite("X", X, xp)
    return X
