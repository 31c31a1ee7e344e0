"""Input checks shared by the reference and the engine.

Every public entry point validates before it touches anything, so a bad call raises a
``TypeError`` / ``ValueError`` that names the problem and leaves a model unchanged.
Values are checked as they will be computed with: after the cast to the net's dtype (a
float64 1e39 is inf in float32), the scalars of a step too (:func:`scalar`). On a GPU
the value checks of one call are gathered as device flags by :class:`Verdicts` and read
with a single device-to-host transfer.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import sys
import warnings
from typing import Callable, Union

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_NUMERIC_KINDS = ("b", "i", "u", "f")  # what the engine casts to its float dtype


class Verdicts:
    """Value checks gathered on the device and read with one transfer.

    >>> v = Verdicts(np)
    >>> v.require(np.all(np.array([1.0]) > 0), "X must be positive")
    >>> v.settle()  # raises the first failed check's message, if any
    """

    def __init__(self, xp):
        self.xp = xp
        self._pending: list[tuple] = []

    def require(self, ok, message: Union[str, Callable[[], str]]) -> None:
        """Record that ``ok`` (a 0-d boolean array or a bool) must hold; ``message`` (or
        a function making it, called only on failure) says what is wrong otherwise."""
        self.require_values((ok,), bool, message)

    def require_values(self, values, test: Callable[..., bool],
                       message: Union[str, Callable[[], str]]) -> None:
        """Record that ``test(*values)`` must hold, ``values`` (0-d arrays on the device,
        or host numbers) read on the host at :meth:`settle` -- a comparison made there
        is no kernel for the GPU to compile."""
        self._pending.append((tuple(values), test, message))

    def settle(self) -> None:
        """Raise a ValueError with the first failed check's message; forget them all."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        if self.xp is not np:  # one device-to-host synchronisation for all of them
            read = iter(_read_scalars(self.xp, [v for values, _, _ in pending
                                                for v in values if _on_device(v, self.xp)]))
            pending = [(tuple(next(read) if _on_device(v, self.xp) else v for v in values),
                        test, message) for values, test, message in pending]
        for values, test, message in pending:
            if not test(*values):
                raise ValueError(message() if callable(message) else message)


def _on_device(a, xp) -> bool:
    return isinstance(a, xp.ndarray)


def _read_scalars(xp, arrays) -> list:
    """The values of 0-d device ``arrays``, of any dtypes, in one transfer: their bytes
    copied into one buffer (a copy each, no kernel), read back, and taken apart."""
    if not arrays:
        return []
    sizes = [a.dtype.itemsize for a in arrays]
    packed = xp.empty(sum(sizes), dtype=np.uint8)
    at = 0
    for a, size in zip(arrays, sizes):
        packed[at:at + size] = a.reshape(1).view(np.uint8)
        at += size
    raw, at, values = packed.get(), 0, []
    for a, size in zip(arrays, sizes):
        values.append(raw[at:at + size].view(a.dtype)[0])
        at += size
    return values


def settle_now(xp, check: Callable[[Verdicts], None]) -> None:
    """Run ``check(verdicts)`` and settle at once: for callers with nothing to gather."""
    verdicts = Verdicts(xp)
    check(verdicts)
    verdicts.settle()


def flag(name: str, value, where: str = "") -> bool:
    """``value`` as a bool if it is one (NumPy's too), else a TypeError naming it: "no",
    1 and None are mistakes, not flags."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}{name} must be True or False, got {value!r}")
    return bool(value)


def dtype_of(name: str, dtype) -> np.dtype:
    """The float32/float64 dtype named by ``dtype``, or a TypeError (None too: NumPy would
    read it as float64)."""
    if dtype is None:
        raise TypeError(f"{name} must be float32 or float64, got None")
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


def named(value, table) -> bool:
    """Whether ``value`` is a name (a str) in ``table``: a list or dict read from a file
    is no name, where ``in`` would raise "unhashable type" and name nothing."""
    return isinstance(value, str) and value in table


def cast(a, dtype, xp=np):
    """``a`` as a C-contiguous array of ``dtype``. What overflows becomes inf, silently:
    the values are checked after the cast, as they will be computed with."""
    if type(a) is xp.ndarray and a.dtype == dtype and a.ndim and a.flags.c_contiguous:
        return a  # nothing to cast (np.errstate alone costs microseconds a step)
    with np.errstate(over="ignore", invalid="ignore"):
        return xp.ascontiguousarray(a, dtype=dtype)


def numeric(name: str, a):
    """``a`` itself if it holds numbers the engine can cast to its float dtype (floats,
    integers, booleans), else a TypeError naming it."""
    dt = getattr(a, "dtype", None)
    if dt is None:
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if (dt if isinstance(dt, np.dtype) else np.dtype(dt)).kind not in _NUMERIC_KINDS:
        raise TypeError(f"{name} must hold real numbers, got dtype {dt}")
    return a


def finite(name: str, a, xp=np, verdicts: Verdicts = None) -> None:
    """``a`` must hold no NaN or Inf: raise now, or leave the check to ``verdicts``
    (on a GPU :func:`gpu_mlp.ops.finite` scans a float array with a kernel of its own)."""
    if not a.size:
        return
    message = f"{name} contains NaN or Inf"
    if verdicts is None:
        if not bool(xp.isfinite(a).all()):
            raise ValueError(message)
    else:
        verdicts.require(xp.isfinite(a).all(), message)


class ScalarOutOfRange(ValueError):
    """A scalar that the net's dtype cannot carry (:func:`scalar`): ``name`` is the
    library's name of it, ``value`` the value, ``requirement`` what it must be, so that a
    front end can name its own option instead."""

    def __init__(self, where: str, name: str, value, requirement: str):
        super().__init__(f"{where}{name} {requirement}, got {value!r}")
        self.name, self.value, self.requirement = name, value, requirement


def scalar(name: str, value: float, dtype, where: str = "", positive: bool = False) -> float:
    """``value``, a scalar a kernel computes with, checked as it computes with it: cast to
    ``dtype`` it must stay finite (1e39 is inf in float32) and, if ``positive``, > 0
    (1e-50 is 0); else a :class:`ScalarOutOfRange` naming it (and ``where`` it was
    given)."""
    dt = np.dtype(dtype)
    with np.errstate(over="ignore", under="ignore"):
        cast = dt.type(value)
    if not np.isfinite(cast) or (positive and not cast > 0):
        raise ScalarOutOfRange(where, name, value, f"must be a finite number"
                               f"{' > 0' if positive else ''} in {dt.name}, the net's dtype")
    return value


def integer(name: str, value, minimum: int = 1, where: str = "",
            below: int | None = None) -> int:
    """``value`` as an int >= ``minimum`` (and < ``below``, if given), or a
    TypeError/ValueError naming it (and ``where`` it was given). 2.5, "3" and True are
    mistakes, not integers; NumPy's integers are integers."""
    interval = integer_interval(minimum, below)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}{name} must be an integer {interval}, got {value!r}")
    if not minimum <= int(value) < (math.inf if below is None else below):
        raise ValueError(f"{where}{name} must be {'an integer ' if below is None else ''}"
                         f"{interval}, got {value!r}")
    return int(value)


def warn(message: str, category: type) -> None:
    """``warnings.warn``, pointing at the first caller outside gpu_mlp (whichever entry
    point -- ``Network.fit``, ``training.fit``, the torch modules -- it came through)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def integer_interval(minimum: int, below: int | None = None) -> str:
    """The integers >= ``minimum`` (and < ``below``) in words: ">= 1", "in [0, 2^64)" (a
    large power of two as one, not 18446744073709551616)."""
    if below is None:
        return f">= {minimum}"
    power = below > 1 << 16 and below & (below - 1) == 0
    return f"in [{minimum}, {f'2^{below.bit_length() - 1}' if power else below})"


def seed(value) -> int:
    """A seed: an integer in [0, 2^64) (what NumPy's generators take, and a History
    holds)."""
    return integer("seed", value, minimum=0, below=2**64)


def pairs(params, layers=None) -> list[tuple]:
    """``params`` as a list of ``(W_k, b_k)`` tuples, or a TypeError/ValueError naming the
    layer; with ``layers``, one pair per layer. Nothing about the arrays themselves."""
    try:
        found = [tuple(p) for p in params]
    except TypeError:
        raise TypeError("params must be a list of (W, b) pairs") from None
    if layers is not None and len(found) != len(layers):
        raise ValueError(f"expected {len(layers)} (W, b) pairs (one per layer), "
                         f"got {len(found)}")
    for k, pair in enumerate(found, start=1):
        if len(pair) != 2:
            where = f"layer {k}" if layers is None else f"layer {k} ({layers[k - 1]})"
            raise ValueError(f"{where}: expected a (W, b) pair, got {len(pair)} items")
    return found


def params(params, finite_values: bool = True) -> list[tuple]:
    """Check a list of ``(W_k, b_k)``: shapes chain, one float dtype, all finite (unless
    ``finite_values`` is False)."""
    checked = pairs(params)
    if not checked:
        raise ValueError("params must hold at least one layer")
    dtype = None
    for k, (W, b) in enumerate(checked, start=1):
        floating(f"W_{k}", W)
        floating(f"b_{k}", b)
        if W.ndim != 2:
            raise ValueError(f"W_{k} must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
        if tuple(b.shape) != (W.shape[0],):
            raise ValueError(f"b_{k} must have shape ({W.shape[0]},) to match W_{k} "
                             f"{tuple(W.shape)}, got {tuple(b.shape)}")
        if k > 1 and W.shape[1] != checked[k - 2][0].shape[0]:
            raise ValueError(f"W_{k} takes {W.shape[1]} inputs but layer {k - 1} has "
                             f"{checked[k - 2][0].shape[0]} outputs")
        if finite_values:
            finite(f"W_{k}", W, _namespace(W))
            finite(f"b_{k}", b, _namespace(b))
        if dtype is None:
            dtype = W.dtype
        if W.dtype != dtype or b.dtype != dtype:
            raise TypeError(f"layer {k}: all parameters must share one dtype ({dtype}), "
                            f"got W {W.dtype} and b {b.dtype}")
    return checked


def layer_params(layers, params, finite_values: bool = True) -> list[tuple]:
    """Check ``(W_k, b_k)`` against the layers' shapes: one float dtype, all finite
    (unless ``finite_values`` is False)."""
    checked = pairs(params, layers)
    dtype = None
    for k, (layer, pair) in enumerate(zip(layers, checked), start=1):
        shapes = (layer.weight_shape, layer.bias_shape)
        for name, a, shape in zip((f"W_{k}", f"b_{k}"), pair, shapes):
            floating(name, a)
            if tuple(a.shape) != tuple(shape):
                raise ValueError(f"layer {k} ({layer}): {name} must have shape "
                                 f"{tuple(shape)}, got {tuple(a.shape)}")
            if finite_values:
                finite(name, a, _namespace(a))
            dtype = a.dtype if dtype is None else dtype
            if a.dtype != dtype:
                raise TypeError(f"layer {k}: all parameters must share one dtype ({dtype}), "
                                f"got {name} {a.dtype}")
    return checked


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


def unmasked(name: str, a):
    """The data of a NumPy masked array without masked entries; a ValueError if some are
    masked (their values are undefined: NaN hides there as easily as anything else)."""
    if isinstance(a, np.ma.MaskedArray):
        if np.ma.getmaskarray(a).any():
            raise ValueError(f"{name} is a masked array with masked entries; fill them "
                             f"first, e.g. {name}.filled(0)")
        return np.ma.getdata(a)
    return a


def lr(value) -> float:
    """A learning rate: a finite number > 0, as a float."""
    value = real("lr", value, "")
    if not (math.isfinite(value) and value > 0):  # (a float: math's, 10x NumPy's speed)
        raise ValueError(f"lr must be a finite number > 0, got {value}")
    return value


def step_scalars(dtype, lr, dp) -> None:
    """The scalars a step scales into its kernels -- the learning rate, an optimizer's
    hyperparameters, DP's clip norm and noise -- checked in the net's dtype, as the
    kernels compute with them (:func:`scalar`): finite, and those that divide or must do
    something (lr, eps, the clip norm) > 0. ``lr``: a float, or an optimizer. A schedule
    only lowers the base lr; the products the rules form are checked too."""
    if isinstance(lr, float):
        scalars = [("", "lr", lr)]
    else:
        where, hyper = f"{type(lr).__name__}: ", lr.hyperparameters()
        scalars = [(where, name, v) for name, v in hyper.items() if isinstance(v, float)]
        scalars += [(where, f"beta{i}", beta)
                    for i, beta in enumerate(hyper.get("betas", ()), start=1)]
        scalars.append((where, "lr * weight_decay", lr.lr * lr.weight_decay))
    if dp is not None:  # (its own ranges, the key's and counter's too, are checked as set)
        C, sigma = dp.max_grad_norm, dp.noise_multiplier
        scalars += [("DP: ", "max_grad_norm", C), ("DP: ", "noise_multiplier", sigma),
                    ("DP: ", "noise_multiplier * max_grad_norm", sigma * C)]
    try:
        _scalars_fit(np.dtype(dtype), tuple(scalars))
    except TypeError:  # unhashable (a 0-d array set by hand, say): checked uncached
        _scalars_fit.__wrapped__(np.dtype(dtype), scalars)


@functools.lru_cache(maxsize=64)
def _scalars_fit(dtype, scalars) -> None:
    """:func:`scalar` of each ``(where, name, value)``: what every training step checks,
    for the same few settings a run long (a cached pass costs a lookup, where the casts
    took 15 us a step of an optimizer: a real share of a step replayed on a GPU)."""
    for where, name, value in scalars:
        scalar(name, value, dtype, where, positive=name in _POSITIVE)


_POSITIVE = ("lr", "eps", "max_grad_norm")  # 0 would do nothing, or divide by 0


def real(name: str, value, where: str) -> float:
    if type(value) is float:  # the common case, before the slower isinstance checks
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}{name} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int past any float (10**400, say, from a crafted file)
        raise ValueError(f"{where}{name} must be a finite number, got an integer of "
                         f"{len(str(abs(int(value))))} digits") from None


def in_range(name: str, value, where: str = "", low: float = 0.0, high: float = math.inf,
              low_open: bool = False, high_open: bool = True) -> float:
    """``value`` as a finite float in the interval, or a TypeError/ValueError naming it."""
    x = real(name, value, where)
    ok = math.isfinite(x) and (x > low if low_open else x >= low) and (
        x < high if high_open else x <= high)
    if not ok:
        interval = ("> " if low_open else ">= ") + f"{low:g}" if high == math.inf else (
            f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
        raise ValueError(f"{where}{name} must be a finite number {interval}, got {value!r}")
    return x
