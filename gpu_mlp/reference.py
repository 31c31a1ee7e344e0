"""A deliberately plain NumPy backprop: the definition of correct.

Everything else in gpu_mlp is checked against this module, and this module is checked
against finite differences, the Kronecker / vec form and PyTorch autograd
(tests/test_reference.py, tests/test_reference_layers.py). It favours the page over
speed: one loop forward, one loop backward, exactly the formulas of docs/MATH.md,
"Conventions" and "Backward" (:func:`forward`, :func:`loss_and_gradients`, for dense
networks given as ``[(W_k, b_k)]``).

Networks of :mod:`gpu_mlp.layers` (Dense and Conv2d) are here too, as in "General
bilinear layers": :func:`network_forward` and :func:`network_loss_and_gradients`, with
each layer's bilinear map C, its adjoints C^dagger and C^{dagger dagger}, and the bias
map iota and its adjoint written out plainly (:func:`bilinear` and friends).

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
from . import layers as _layers
from . import losses as _losses


def _prepare(params, activations, X):
    params = _checks.params(params)
    acts = _activations.per_layer(activations, len(params))
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
    """``(J, [(dJ/dW_k, dJ/db_k)], dJ/dX)`` for the batch-mean loss J of a dense net.

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


# --- every layer a bilinear map ----------------------------------------------------------
#
# Layer k is F_k = sigma_k(C_k(F_{k-1}, W_k) + iota_k(b_k)), and the backward pass is the
# dense one with the three adjoints of MATH.md ("General bilinear layers") in place of
# the matrix products. The maps below follow the definitions, not the engine's im2col:
# a convolution is a sum over its kh*kw kernel offsets of einsums on strided windows of
# the zero-padded input, so the engine is checked against an independent formulation.
# Arrays keep their natural shapes: Dense maps (B, ...) -> (B, d_out), flattening its
# input in C order (torch.flatten(x, 1)); Conv2d maps NCHW to NCHW.

def _conv_windows(layer, out_hw):
    """``(i, j, index)`` per kernel offset: ``xpad[index]`` is the (B, C, OH, OW) window
    of the zero-padded input that offset (i, j) reads, ``xpad[..., oh*sh + i, ow*sw + j]``."""
    (kh, kw), (sh, sw), (OH, OW) = layer.kernel_size, layer.stride, out_hw
    for i in range(kh):
        for j in range(kw):
            yield i, j, (slice(None), slice(None), slice(i, i + sh * (OH - 1) + 1, sh),
                         slice(j, j + sw * (OW - 1) + 1, sw))


def _pad(layer, x):
    ph, pw = layer.padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def _conv(layer, x, W):
    """C(x, W): (B, c_in, H, W) -> (B, c_out, OH, OW), cross-correlation as conv2d."""
    _, OH, OW = layer.output_shape(x.shape[1:])
    xpad = _pad(layer, x)
    out = np.zeros((x.shape[0], layer.c_out, OH, OW), dtype=x.dtype)
    for i, j, window in _conv_windows(layer, (OH, OW)):
        out += np.einsum("bchw,oc->bohw", xpad[window], W[:, :, i, j])
    return out


def _conv_dagger(layer, T, W, input_shape):
    """C^dagger(T, W): each window gets back what it gave, scatter-added into the input."""
    ph, pw = layer.padding
    _, H, Wd = input_shape
    gpad = np.zeros((T.shape[0], layer.c_in, H + 2 * ph, Wd + 2 * pw), dtype=T.dtype)
    for i, j, window in _conv_windows(layer, T.shape[2:]):
        gpad[window] += np.einsum("bohw,oc->bchw", T, W[:, :, i, j])
    return gpad[:, :, ph:ph + H, pw:pw + Wd].copy()  # the padding is not an input


def _conv_dagger_dagger(layer, x, T):
    """C^{dagger dagger}(x, T): offset (i, j) of the weight gradient pairs T with its window."""
    xpad = _pad(layer, x)
    G = np.empty((layer.c_out, layer.c_in, *layer.kernel_size), dtype=x.dtype)
    for i, j, window in _conv_windows(layer, T.shape[2:]):
        G[:, :, i, j] = np.einsum("bohw,bchw->oc", T, xpad[window])
    return G


def bilinear(layer, x, W):
    """``C(x, W)``: the layer's bilinear map of its input batch x and its weight W."""
    if isinstance(layer, _layers.Conv2d):
        return _conv(layer, x, W)
    return x.reshape(x.shape[0], -1) @ W.T


def bilinear_dagger(layer, T, W, input_shape):
    """``C^dagger(T, W)``, the adjoint in x: ``<C(x, W), T> = <x, C^dagger(T, W)>``, for
    inputs of per-sample shape ``input_shape``."""
    if isinstance(layer, _layers.Conv2d):
        return _conv_dagger(layer, T, W, tuple(input_shape))
    return (T @ W).reshape(T.shape[0], *input_shape)


def bilinear_dagger_dagger(layer, x, T):
    """``C^{dagger dagger}(x, T)``, the adjoint in W: ``<C(x, W), T> = <W, C^{dd}(x, T)>``."""
    if isinstance(layer, _layers.Conv2d):
        return _conv_dagger_dagger(layer, x, T)
    return T.T @ x.reshape(x.shape[0], -1)


def iota(layer, b, shape):
    """``iota(b)``: the bias broadcast to the layer's output ``shape`` (B, d_out) or
    (B, c_out, OH, OW), one value per output channel."""
    if isinstance(layer, _layers.Conv2d):
        return np.broadcast_to(b[:, None, None], shape)
    return np.broadcast_to(b, shape)


def iota_star(layer, T):
    """``iota^*(T)``, the adjoint of iota: T summed over everything but the channel."""
    if isinstance(layer, _layers.Conv2d):
        return T.sum(axis=(0, 2, 3))
    return T.sum(axis=0)


def _check_network(layers, params, X):
    """Validate the layers, their (W, b) and X against each other; returns
    ``(layers, params, X)`` as lists and the array."""
    if isinstance(layers, _layers.Layer) or not isinstance(layers, Iterable):
        raise TypeError("layers must be a list of gpu_mlp.layers layers (Dense, Conv2d)")
    layers = list(layers)
    if not layers:
        raise ValueError("layers must hold at least one layer")
    for k, layer in enumerate(layers, start=1):
        if not isinstance(layer, (_layers.Dense, _layers.Conv2d)):
            raise TypeError(f"layer {k}: expected a Dense or Conv2d, got {layer!r}")
    params = _checks.layer_params(layers, params)
    dtype = params[0][0].dtype
    X = _checks.floating("X", X)
    if X.ndim < 2 or X.shape[0] == 0:
        raise ValueError(f"X must be a batch (B, ...) of at least one sample, got shape "
                         f"{tuple(X.shape)}")
    if X.dtype != dtype:
        raise TypeError(f"X has dtype {X.dtype} but the parameters are {dtype}")
    _checks.finite("X", X)
    shape = X.shape[1:]
    for k, layer in enumerate(layers, start=1):
        try:
            shape = layer.output_shape(shape)
        except ValueError as error:
            raise ValueError(f"layer {k}: {error}") from None
    return layers, params, X


def _network_forward(layers, params, X):
    """Pre-activations A_k and outputs F_k of every layer (F_0 = X), in natural shapes."""
    A, F = [], [X]
    for layer, (W, b) in zip(layers, params):
        a = bilinear(layer, F[-1], W)
        A.append(a + iota(layer, b, a.shape))
        F.append(layer.activation(A[-1]))
    return A, F


def network_forward(layers, params, X):
    """The output of the network ``layers`` (gpu_mlp.layers) with ``params`` [(W_k, b_k)]
    (PyTorch's layouts) for a batch X of shape (B, *input_shape).

    >>> from gpu_mlp.layers import Conv2d, Dense
    >>> net = [Conv2d(1, 1, 2, activation="identity"), Dense(1, 1, activation="identity")]
    >>> params = [(np.ones((1, 1, 2, 2)), np.zeros(1)), (np.full((1, 1), 2.0), np.ones(1))]
    >>> network_forward(net, params, np.ones((1, 1, 2, 2)))
    array([[9.]])
    """
    layers, params, X = _check_network(layers, params, X)
    return _network_forward(layers, params, X)[1][-1]


def network_loss_and_gradients(layers, params, loss, X, Y):
    """``(J, [(dJ/dW_k, dJ/db_k)], dJ/dX)`` for the batch-mean loss J of a layer network.

    ``layers``, ``params`` and X as for :func:`network_forward`; ``loss`` a row of
    :mod:`gpu_mlp.losses`, applied to the output flattened to (B, d) in C order (so Y is
    (B, d), or (B,) class labels). Gradients have the shapes of what they differentiate.
    """
    layers, params, X = _check_network(layers, params, X)
    loss = _losses.get(loss)
    A, F = _network_forward(layers, params, X)
    B = X.shape[0]
    out = F[-1].reshape(B, -1)
    Y = loss.check_targets(Y, B, out.shape[1], np, X.dtype)
    dJ_dF = np.empty_like(out)
    J = loss.evaluate(out, Y, 1.0 / B, dJ_dF).mean()

    grads = [None] * len(layers)
    T = _backward_through(layers[-1].activation, A[-1], F[-1], dJ_dF.reshape(F[-1].shape))
    for k in reversed(range(len(layers))):
        layer, (W, _) = layers[k], params[k]
        grads[k] = (bilinear_dagger_dagger(layer, F[k], T), iota_star(layer, T))
        g = bilinear_dagger(layer, T, W, F[k].shape[1:])
        if k > 0:
            T = _backward_through(layers[k - 1].activation, A[k - 1], F[k], g)
    return J, grads, g
