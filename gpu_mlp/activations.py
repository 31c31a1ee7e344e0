"""The activation table: every activation gpu_mlp knows, defined once.

Each row gives the value, the derivative from the input and -- where it exists -- the
derivative from the output (docs/MATH.md, "Activations and their derivatives from the
output") as NumPy functions that write into ``out``. The CUDA twins are ``gm_<name>``,
``gm_<name>_grad`` and ``gm_<name>_grad_from_output`` in ``kernels/activations.cuh``,
formula for formula.
The reference, the engine's NumPy backend and its CUDA kernels all read this table.

Softmax is the one row-wise entry: its Jacobian is not diagonal, so it has no
elementwise derivative; its vector-Jacobian product from the output,
``(g - <g, F>_row) (.) F``, is :func:`softmax_backward`, which its row carries in
``rowwise``. A row also gives the gain of its layers' initial weights and whether it
is the identity, so no caller needs to test an activation's name.

>>> relu(0.5).name, str(relu(0.5))
('relu', 'relu(alpha=0.5)')
>>> get("tanh").has_grad_from_output
True
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from scipy.special import erfc

Fn = Callable[[np.ndarray, float, np.ndarray], np.ndarray]


# --- NumPy formulas, each writing into `out` (which may be the input itself) ---------

# NumPy runs a ufunc of an array and a broadcast row in its buffered loop -- both copied
# into buffers, 2-3x slower -- unless the row holds at least its buffer size
# (np.getbufsize(), 8192 values); and np.maximum against a scalar takes no SIMD loop. So
# relu compares with a row of that many zeros (3-5x faster on float32 blocks of 16K-64K
# values; slower below about 4K, where the extra calls cost more), and the engine adds a
# bias repeated to such a row (gpu_mlp.ops.bias_act).
LONG_ROW = 8192


def along_rows(ufunc, z, row, out):
    """``out <- ufunc(z, row)`` for the C-contiguous ``z`` and ``out`` of one shape, read
    flat as rows of ``len(row)`` values, the last one cut short."""
    flat, dest, n = z.reshape(-1), out.reshape(-1), len(row)
    whole = flat.size - flat.size % n
    if whole:
        ufunc(flat[:whole].reshape(-1, n), row, out=dest[:whole].reshape(-1, n))
    if whole < flat.size:
        ufunc(flat[whole:], row[:flat.size - whole], out=dest[whole:])
    return out


def _identity(z, alpha, out):
    np.copyto(out, z)
    return out


def _ones(z, alpha, out):
    out.fill(1)
    return out


def _relu(z, alpha, out):
    # propagates NaN, as gm_relu does; against a row of zeros where that pays (LONG_ROW
    # values or more, contiguous): the same bits as against the scalar 0. (The row is
    # made each call, 0.5-0.7 us: a cached one would stay allocated outside the workspace.)
    if (isinstance(z, np.ndarray) and z.size >= LONG_ROW and z.flags.c_contiguous
            and out.flags.c_contiguous and z.shape == out.shape and z.dtype == out.dtype):
        along_rows(np.maximum, z, np.zeros(LONG_ROW, z.dtype), out)
    else:
        np.maximum(z, 0, out=out)
    if alpha != 1:  # skip a pass over memory in the common case
        out *= alpha
    return out


def _relu_grad(z, alpha, out):
    # NOTE: the derivative at 0 is 0 in every mode: the output F = 0 cannot tell z = 0
    # from z < 0, and all memory modes must agree bit for bit (MATH.md).
    np.greater(z, 0, out=out)
    if alpha != 1:
        out *= alpha
    return out


def _relu_mask(f, out):
    # sigma' = alpha [f > 0], the bool [f > 0] into out (a quarter of a float32's bytes)
    return np.greater(f, 0, out=out)


def _sigmoid(z, alpha, out):
    # exp(-|z|) <= 1 never overflows; 1/(1+e) for z >= 0 and e/(1+e) below.
    e = np.exp(-np.abs(z))
    numerator = np.where(z >= 0, 1, e).astype(out.dtype, copy=False)
    np.divide(numerator, 1 + e, out=out)
    return out


def _sigmoid_grad_from_output(f, alpha, out):
    np.multiply(f, 1 - f, out=out)
    return out


def _sigmoid_grad(z, alpha, out):
    return _sigmoid_grad_from_output(_sigmoid(z, alpha, out), alpha, out)


def _tanh(z, alpha, out):
    np.tanh(z, out=out)
    return out


def _tanh_grad_from_output(f, alpha, out):
    np.multiply(f, f, out=out)
    np.subtract(1, out, out=out)
    return out


def _tanh_grad(z, alpha, out):
    return _tanh_grad_from_output(np.tanh(z, out=out), alpha, out)


_SQRT_HALF = 0.70710678118654752440
_SQRT_2 = float(np.sqrt(2.0))
_INV_SQRT_2PI = 0.39894228040143267794


def _normal_cdf(z):
    return 0.5 * erfc(-z * _SQRT_HALF)


def _gelu(z, alpha, out):
    np.multiply(z, _normal_cdf(z), out=out)
    return out


def _gelu_grad(z, alpha, out):
    np.add(_normal_cdf(z), z * _INV_SQRT_2PI * np.exp(-0.5 * z * z), out=out)
    return out


def _softmax(z, alpha, out):
    # max-subtracted, so no finite row overflows
    shifted = z - z.max(axis=-1, keepdims=True)
    np.exp(shifted, out=out)
    out /= out.sum(axis=-1, keepdims=True)
    return out


def softmax_backward(f: np.ndarray, g: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = (g - <g, f>_row) (.) f``: softmax's vector-Jacobian product from its output."""
    dot = np.einsum("ij,ij->i", g, f)[:, None]
    np.subtract(g, dot, out=out)
    out *= f
    return out


# --- the table ------------------------------------------------------------------------

@dataclass(frozen=True)
class RowWise:
    """The ops of a row-wise activation, whose Jacobian is not diagonal: ``sigma`` maps
    each whole row (``Kind.value`` on NumPy) and backward is a vector-Jacobian product
    from the output, not an elementwise derivative. On the GPU both are the row kernels
    ``gm_<name>_forward`` and ``gm_<name>_backward`` of ``kernels/rowwise.cuh``, which
    ``ops.ROW_ACTIVATIONS`` launches."""

    backward: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (F, g, out)


@dataclass(frozen=True)
class Kind:
    """One row of the activation table."""

    name: str
    value: Fn
    grad: Optional[Fn]              # sigma'(z), elementwise; None for row-wise softmax
    grad_from_output: Optional[Fn]  # sigma' as a function of F = sigma(z), if there is one
    rowwise: Optional[RowWise] = None  # the row-wise ops, for an activation on whole rows
    has_alpha: bool = False
    # the weight scale of initialisation, times 1/sqrt(fan_in) and divided by alpha (the
    # output's scale): He's sqrt(2) for ReLU-like activations, Glorot-like 1 else
    init_gain: float = 1.0
    is_identity: bool = False  # F = A and sigma' = 1: backward has nothing to do
    # value makes no temporary (it writes out alone): the engine's NumPy forward may run
    # it on longer blocks (gpu_mlp.ops.bias_act)
    in_place: bool = False
    # sigma' = alpha * mask(F) for a bool mask of the output, mask(F, out) (relu's [F > 0]):
    # the NumPy backward multiplies by it, no float temporary
    mask_from_output: Optional[Callable[[np.ndarray, np.ndarray], np.ndarray]] = None


TABLE: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("identity", _identity, _ones, _ones, is_identity=True, in_place=True),
        Kind("relu", _relu, _relu_grad, _relu_grad, has_alpha=True, init_gain=_SQRT_2,
             in_place=True, mask_from_output=_relu_mask),
        Kind("sigmoid", _sigmoid, _sigmoid_grad, _sigmoid_grad_from_output),
        Kind("tanh", _tanh, _tanh_grad, _tanh_grad_from_output, in_place=True),
        Kind("gelu", _gelu, _gelu_grad, None, init_gain=_SQRT_2),
        Kind("softmax", _softmax, None, None, rowwise=RowWise(softmax_backward)),
    )
}


@dataclass(frozen=True)
class Activation:
    """An activation from the table with its parameter (ReLU's scale ``alpha``)."""

    kind: Kind
    alpha: float = 1.0

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def has_grad_from_output(self) -> bool:
        """True when backward can work from the stored output alone (MATH.md's table)."""
        return self.kind.grad_from_output is not None or self.kind.rowwise is not None

    @property
    def init_gain(self) -> float:
        """The scale of a layer's initial weights, times ``1/sqrt(fan_in)``."""
        return self.kind.init_gain / self.alpha

    def __call__(self, z: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """sigma(z) with NumPy (rows for softmax)."""
        return self.kind.value(z, self.alpha, np.empty_like(z) if out is None else out)

    def __str__(self) -> str:
        return f"{self.name}(alpha={self.alpha!r})" if self.alpha != 1.0 else self.name


def relu(alpha: float = 1.0) -> Activation:
    """ReLU with scale ``alpha > 0``: ``alpha * max(0, z)``."""
    return get("relu", alpha=alpha)


_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:\(\s*(?:alpha\s*=\s*)?([^)]*?)\s*\))?\s*$")


def get(spec, alpha: Optional[float] = None) -> Activation:
    """Resolve an activation: an :class:`Activation`, a name, or ``"relu(alpha=0.5)"``."""
    if isinstance(spec, Activation):
        if alpha is None:
            return spec
        spec = spec.name  # a new alpha: validate it as for a name
    if not isinstance(spec, str):
        raise TypeError(f"an activation is a name or an Activation, not {type(spec).__name__}")
    match = _SPEC.match(spec)
    name = match.group(1) if match else spec
    if name not in TABLE:
        raise ValueError(f"unknown activation {spec!r}; valid: {', '.join(TABLE)}")
    kind = TABLE[name]
    if match.group(2) is not None:
        if not kind.has_alpha:
            raise ValueError(f"activation {name!r} takes no parameter (got {spec!r})")
        try:
            alpha = float(match.group(2))
        except ValueError:
            raise ValueError(f"activation {spec!r}: alpha must be a number") from None
    alpha = 1.0 if alpha is None else float(alpha)
    if alpha != 1.0 and not kind.has_alpha:
        raise ValueError(f"activation {name!r} takes no alpha")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"relu's alpha must be a finite number > 0, got {alpha}")
    return Activation(kind, alpha)


def per_layer(activations, n_layers: int) -> list:
    """One activation per layer: a single spec for every layer, or a list of ``n_layers``."""
    if isinstance(activations, (str, Activation)):
        activations = [activations] * n_layers
    if not isinstance(activations, Iterable):
        raise TypeError("activations must be an activation name, an Activation, or a "
                        f"list of them, got {activations!r}")
    activations = [get(a) for a in activations]
    if len(activations) != n_layers:
        raise ValueError(f"expected {n_layers} activations (one per layer), "
                         f"got {len(activations)}")
    return activations
