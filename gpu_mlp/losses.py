"""The loss table: every loss gpu_mlp knows, defined once.

A loss compares the network output ``F`` (B, d) with targets ``Y`` and gives the
per-sample losses ``l(y_i, F[i])`` together with ``scale * dl/dF`` written into
``grad`` in the same pass -- exactly what the fused CUDA kernels in
``kernels/losses.cuh`` and ``kernels/rowwise.cuh`` compute. The batch loss is the mean
of the per-sample losses, so the engine passes ``scale = 1/B``. The rows --
``squared``, ``logistic`` (y = +-1) and ``softmax_cross_entropy`` -- and their
derivatives are docs/MATH.md's, "Losses".

``softmax_cross_entropy`` takes logits (use it with an ``identity`` output layer, like
PyTorch's ``CrossEntropyLoss``) and targets either as integer class indices of shape
(B,) or as rows of class probabilities (one-hot or soft) of shape (B, d).

A classification loss's row also says how its predictions are scored (``accuracy``):
by the largest output for ``softmax_cross_entropy``, by the sign for ``logistic``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import _checks, ops
from .activations import TABLE as _ACTIVATIONS


def _squared(F, Y, scale, grad, clip=None):  # (no log-loss: never clipped)
    np.subtract(F, Y, out=grad)
    per_sample = np.einsum("ij,ij->i", grad, grad)
    grad *= 2 * scale
    return per_sample


def _softplus(t):
    return np.maximum(t, 0) + np.log1p(np.exp(-np.abs(t)))


def _logistic(F, Y, scale, grad, clip=None):
    t = -Y * F
    sigmoid = _ACTIVATIONS["sigmoid"].value(t, 1.0, np.empty_like(t))
    np.multiply(-Y * scale, sigmoid, out=grad)
    terms = _softplus(t)
    if clip is not None:  # each element's term, as the kernel's terms on a GPU
        np.clip(terms, *clip, out=terms)
    return terms.sum(axis=1)


def _softmax_cross_entropy(F, Y, scale, grad, clip=None):
    shifted = F - F.max(axis=1, keepdims=True)
    np.exp(shifted, out=grad)
    total = grad.sum(axis=1, keepdims=True)
    grad /= total
    log_total = np.log(total[:, 0])
    rows = np.arange(F.shape[0])
    if Y.ndim == 1:  # class indices
        valid = (Y >= 0) & (Y < F.shape[1])
        if not valid.all():  # only when checks were skipped: as the CUDA kernels do,
            rows, Y = rows[valid], Y[valid]  # NaN loss and no gradient for those rows
            grad[~valid] = 0
            log_total[~valid] = np.nan
        grad[rows, Y] -= 1
        if len(rows) == len(log_total):  # every label valid: one pass, no copy
            per_sample = log_total - shifted[rows, Y]
        else:
            per_sample = log_total.copy()
            per_sample[rows] -= shifted[rows, Y]
    else:            # probability rows
        grad -= Y
        # a zero target contributes nothing, even against a logit of -inf (as in CUDA)
        terms = np.where(Y != 0, Y * (log_total[:, None] - shifted), 0)
        per_sample = terms.sum(axis=1)
    grad *= scale
    if clip is not None:  # each row's term, as the kernels' row terms on a GPU
        np.clip(per_sample, *clip, out=per_sample)
    return per_sample


# --- accuracy: the share of right predictions, on NumPy or CuPy arrays (a number) ---

def _class_accuracy(F, Y, hits=None):
    """Rows whose largest output is the label (or the target row's largest entry).
    ``hits``: a buffer of F's shape and dtype, which a GPU needs (one kernel of
    gpu_mlp's module marks each row's hit, CUB's precompiled sum counts them)."""
    if hits is None:
        labels = Y if Y.ndim == 1 else Y.argmax(axis=1)
        return (F.argmax(axis=1) == labels).mean()
    hits = hits.reshape(-1)[:F.shape[0]]
    ops.class_hits(F, Y, hits)
    return float(hits.sum()) / F.shape[0]


def _sign_accuracy(F, Y, hits=None):
    """Outputs whose sign matches the +-1 label (``hits`` as for _class_accuracy)."""
    if hits is None:
        return ((F > 0) == (Y > 0)).mean()
    ops.sign_hits(F, Y, hits)
    return float(hits.sum()) / F.size


# --- target checks --------------------------------------------------------------------
# Each takes (Y, B, d, xp, dtype, values) and returns Y in canonical form or raises.
# ``values`` is True (check the data now), False (shapes only: reading the data costs a
# device sync on a GPU) or a _checks.Verdicts that gathers the checks for one read.

def _value_checks(values, xp):
    """``(verdicts, settle)``: where to record value checks, and whether to settle now."""
    if isinstance(values, _checks.Verdicts):
        return values, False
    return (_checks.Verdicts(xp), True) if values else (None, False)


def _float_targets(name, Y, B, d, xp, dtype, verdicts):
    Y = _checks.numeric("Y", _checks.unmasked("Y", Y))
    if Y.ndim == 1 and d == 1:
        Y = Y.reshape(-1, 1)
    if Y.shape != (B, d):
        raise ValueError(f"{name} loss: Y must have shape ({B}, {d}) to match the output, "
                         f"got {tuple(Y.shape)}")
    Y = _checks.cast(Y, dtype, xp)  # checked as computed with: 1e39 is inf in float32
    if verdicts is not None:
        ops.finite("Y", Y, xp, verdicts)
    return Y


def _require_targets(verdicts, xp, kind: str, Y, message: str) -> None:
    """Record that the float targets ``Y`` are of ``kind`` (:func:`gpu_mlp.ops.
    flag_targets`): on a GPU by a kernel into a flag read with the verdicts (CuPy's
    comparisons and reductions: kernels for a first run to compile)."""
    flag = xp.zeros(1, dtype=Y.dtype)
    sums = xp.empty(Y.shape[0], dtype=Y.dtype) if kind == "probabilities" else None
    ops.flag_targets(kind, Y, flag, sums)
    verdicts.require_values((flag[0],), lambda f: f == 0, message)


def _check_squared(Y, B, d, xp, dtype, values=True):
    verdicts, settle = _value_checks(values, xp)
    Y = _float_targets("squared", Y, B, d, xp, dtype, verdicts)
    if settle:
        verdicts.settle()
    return Y


def _check_logistic(Y, B, d, xp, dtype, values=True):
    verdicts, settle = _value_checks(values, xp)
    Y = _float_targets("logistic", Y, B, d, xp, dtype, verdicts)
    if verdicts is not None:
        _require_targets(verdicts, xp, "sign", Y,
                         "logistic loss: labels in Y must be -1 or +1")
        if settle:
            verdicts.settle()
    return Y


def _check_softmax_cross_entropy(Y, B, d, xp, dtype, values=True):
    verdicts, settle = _value_checks(values, xp)
    Y = _checks.unmasked("Y", Y)
    kind = getattr(getattr(Y, "dtype", None), "kind", None)
    if kind in ("i", "u"):
        if Y.shape != (B,):
            raise ValueError(f"softmax_cross_entropy: integer labels must have shape ({B},), "
                             f"got {tuple(Y.shape)}")
        if verdicts is not None and B:  # on the labels as given: uint64 2**63 is no -2**63
            given = Y  # (their extremes compared on the host: no kernel to compile)
            verdicts.require_values((given.min(), given.max()),
                                    lambda low, high: low >= 0 and high < d, lambda: (
                f"softmax_cross_entropy: labels must lie in [0, {d}), got values in "
                f"[{int(given.min())}, {int(given.max())}]"))
        Y = Y.astype(np.int64, copy=False)
    elif kind == "b":
        raise TypeError("softmax_cross_entropy: Y must hold integer labels or float "
                        "probability rows, not booleans")
    else:
        Y = _float_targets("softmax_cross_entropy", Y, B, d, xp, dtype, verdicts)
        if verdicts is not None and B:
            _require_targets(verdicts, xp, "probabilities", Y,
                             "softmax_cross_entropy: target rows must be probabilities "
                             "(non-negative, summing to 1), e.g. one-hot rows")
    if settle:
        verdicts.settle()
    return Y


# --- the table ------------------------------------------------------------------------

@dataclass(frozen=True)
class Loss:
    """One row of the loss table."""

    name: str
    evaluate: Callable  # (F, Y, scale, grad) -> per-sample losses (B,); writes grad
    # (Y, B, d, xp, dtype, values=True) -> Y in canonical form, or raises; see above
    check_targets: Callable
    rowwise: bool = False
    # (F, Y) -> the share of right predictions, for a classification loss; None else
    accuracy: Optional[Callable] = None
    min_outputs: int = 1  # a sample's outputs the loss needs (softmax: 2 classes)
    # (low, high): each term's value clamped to it (terms: a row's for a row-wise loss,
    # an element's else), the gradients unchanged; see clipped()
    clip: Optional[tuple] = None

    def __str__(self) -> str:
        return self.name

    def clipped(self, eps: float) -> "Loss":
        """This log-loss valued as scikit-learn values it: the log of each probability
        clipped to ``[eps, 1 - eps]`` first, so a term lies in ``[-log(1 - eps),
        -log(eps)]`` (at most about 36 in float64) -- the gradients, and so the
        training, unchanged; the loss curve and a stopping rule that reads it follow
        scikit-learn's where a probability underflows (one-hot targets: a row's term is
        its label's)."""
        if self.accuracy is None:
            raise ValueError(f"{self.name} is no log-loss: nothing to clip")
        eps = _checks.in_range("eps", eps, f"{self.name}.clipped: ", 0.0, 0.5,
                               low_open=True)
        return dataclasses.replace(self, clip=(-math.log1p(-eps), -math.log(eps)))

    def check_outputs(self, d: int, where: str = "") -> None:
        """A ValueError unless a sample's ``d`` outputs are enough for this loss."""
        if d < self.min_outputs:
            raise ValueError(f"{where}{self.name} needs at least {self.min_outputs} outputs "
                             f"(classes) a sample, got {d}: with one, every loss is 0; use "
                             f"the logistic loss")


TABLE: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("squared", _squared, _check_squared),
        Loss("logistic", _logistic, _check_logistic, accuracy=_sign_accuracy),
        Loss("softmax_cross_entropy", _softmax_cross_entropy, _check_softmax_cross_entropy,
             rowwise=True, accuracy=_class_accuracy, min_outputs=2),
    )
}


def get(spec) -> Loss:
    """Resolve a loss from its name (or return a :class:`Loss` as it is)."""
    if isinstance(spec, Loss):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a loss is a name, not {type(spec).__name__}")
    if spec not in TABLE:
        raise ValueError(f"unknown loss {spec!r}; valid: {', '.join(TABLE)}")
    return TABLE[spec]
