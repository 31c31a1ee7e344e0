"""A deliberately plain NumPy implementation of Algorithm 1: the definition of correct.

Everything else in gpu_mlp is checked against this module, and this module is checked
against finite differences, the Kronecker form of seed 000 and PyTorch autograd. It
favours the page over speed: one loop forward, one loop backward, exactly the formulas
of ``MATH.md`` (rows are samples, ``W_k`` is ``(d_out, d_in)``, the loss is the batch
mean)::

    A_k = F_{k-1} W_k^T + b_k          F_k = sigma_k(A_k)
    Delta_n = sigma_n'(A_n) (.) dJ/dF_n
    Delta_k = (Delta_{k+1} W_{k+1}) (.) sigma_k'(A_k)
    dJ/dW_k = Delta_k^T F_{k-1}        dJ/db_k = Delta_k^T 1        dJ/dX = Delta_1 W_1

>>> import numpy as np
>>> W, b = np.eye(2), np.zeros(2)
>>> forward([(W, b)], ["relu"], np.array([[1.0, -1.0]]))
array([[1., 0.]])
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from . import _checks
from . import activations as _activations
from . import losses as _losses


def resolve_activations(activations, n_layers: int) -> list:
    """One activation per layer: a single spec for every layer, or a list of ``n_layers``."""
    if isinstance(activations, (str, _activations.Activation)):
        activations = [activations] * n_layers
    if not isinstance(activations, Iterable):
        raise TypeError("activations must be an activation name, an Activation, or a "
                        f"list of them, got {activations!r}")
    activations = [_activations.get(a) for a in activations]
    if len(activations) != n_layers:
        raise ValueError(f"expected {n_layers} activations (one per layer), "
                         f"got {len(activations)}")
    return activations


def _prepare(params, activations, X):
    params = _checks.params(params)
    acts = resolve_activations(activations, len(params))
    X = _checks.inputs(X, params[0][0].shape[1])
    if X.dtype != params[0][0].dtype:
        raise TypeError(f"X has dtype {X.dtype} but the parameters are {params[0][0].dtype}")
    return params, acts, X


def _forward(params, acts, X):
    """Pre-activations A_k and outputs F_k of every layer (F_0 = X)."""
    A, F = [], [X]
    for (W, b), act in zip(params, acts):
        A.append(F[-1] @ W.T + b)
        F.append(act(A[-1]))
    return A, F


def _backward_through(act, a, f, g):
    """dJ/dA from dJ/dF = g: the Hadamard product with sigma'(A), or softmax's VJP."""
    if act.kind.rowwise:
        return _activations.softmax_backward(f, g, np.empty_like(g))
    return g * act.kind.grad(a, act.alpha, np.empty_like(a))


def forward(params, activations, X):
    """The network output for X, a (B, d_0) batch or one (d_0,) sample."""
    params, acts, X = _prepare(params, activations, X)
    _, F = _forward(params, acts, np.atleast_2d(X))
    return F[-1] if X.ndim == 2 else F[-1][0]


def loss_and_gradients(params, activations, loss, X, Y):
    """``(J, [(dJ/dW_k, dJ/db_k)], dJ/dX)`` for the batch-mean loss J of Algorithm 1.

    ``activations`` names one activation per layer (or one for all layers), ``loss`` a
    row of :mod:`gpu_mlp.losses`. X is (B, d_0) or a single sample (d_0,), in which case
    Y is that sample's target and dJ/dX has shape (d_0,).
    """
    params, acts, X = _prepare(params, activations, X)
    loss = _losses.get(loss)
    single = X.ndim == 1
    X2 = X[None, :] if single else X
    B, d_out = X2.shape[0], params[-1][0].shape[0]
    if single:
        Y = np.asarray(Y)[None] if np.ndim(Y) < 2 else Y
    Y = loss.check_targets(Y, B, d_out, np, X.dtype)

    A, F = _forward(params, acts, X2)
    dJ_dF = np.empty_like(F[-1])
    J = loss.evaluate(F[-1], Y, 1.0 / B, dJ_dF).mean()

    grads = [None] * len(params)
    delta = _backward_through(acts[-1], A[-1], F[-1], dJ_dF)
    for k in reversed(range(len(params))):
        W, _ = params[k]
        grads[k] = (delta.T @ F[k], delta.sum(axis=0))
        g = delta @ W
        if k > 0:
            delta = _backward_through(acts[k - 1], A[k - 1], F[k], g)
    dX = g[0] if single else g
    return J, grads, dX
