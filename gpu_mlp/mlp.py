"""The multilayer perceptron: a :class:`~gpu_mlp.network.Network` of Dense layers.

The dense backward pass of docs/MATH.md ("Backward") is the general one ("General
bilinear layers") with every layer dense, so :class:`MLP` is only a way to say "these
widths, these activations"; everything it does is the Network's one layer loop
(:mod:`gpu_mlp.network`).
"""

from __future__ import annotations

import operator

from . import _checks
from . import activations as _activations
from . import checkpoint as _checkpoint
from . import device as _device
from .layers import Dense
from .network import Network, params_on


class MLP(Network):
    """A multilayer perceptron trained by the backprop of MATH.md.

    >>> import numpy as np, gpu_mlp
    >>> net = gpu_mlp.MLP([4, 8, 3], activations="tanh", loss="softmax_cross_entropy",
    ...                   device="cpu", dtype="float64", seed=0)
    >>> X, y = np.ones((5, 4)), np.array([0, 1, 2, 1, 0])
    >>> float(net.train_step(X, y, lr=0.1)) > 0
    True
    >>> net.predict(X).shape
    (5, 3)

    Args:
        sizes: layer widths ``[d_0, d_1, ..., d_n]``.
        activations: one activation for every hidden layer, or a list of ``n`` with one
            per layer, the output layer included (then ``output`` is not used).
        output: the output layer's activation.
        loss, memory, device, dtype, seed: as for :class:`gpu_mlp.Network`.
    """

    def __init__(self, sizes, activations="relu", output="identity", loss="squared",
                 memory="output", device="auto", dtype="float32", seed=0):
        sizes = _check_sizes(sizes)
        n = len(sizes) - 1
        if isinstance(activations, (str, _activations.Activation)):
            activations = [activations] * (n - 1) + [output]
        acts = _activations.per_layer(activations, n)
        super().__init__(_dense_layers(sizes, acts), loss=loss, memory=memory,
                         device=device, dtype=dtype, seed=seed)

    @classmethod
    def from_params(cls, params, activations, loss="squared", memory="output",
                    device="auto", dtype=None, copy=True, check=True) -> "MLP":
        """A network with the given ``(W_k, b_k)``, ``W_k`` of shape (d_out, d_in), copied
        (or with ``copy=False`` held where they fit; ``check=False``: NaN and Inf taken
        as they are, as :meth:`Network.from_params`).

        ``activations`` is one activation for every layer or a list with one per layer.
        ``dtype`` defaults to the parameters' own.
        """
        name, xp = _device.resolve(device)
        pairs = _checks.params(params_on(xp, params), _checks.flag("check", check))
        sizes = [int(pairs[0][0].shape[1])] + [int(W.shape[0]) for W, _ in pairs]
        acts = _activations.per_layer(activations, len(pairs))
        return super().from_params(_dense_layers(sizes, acts), pairs, loss=loss,
                                   memory=memory, device=name, dtype=dtype, copy=copy,
                                   check=check)

    @property
    def sizes(self) -> list[int]:
        return [self.layers[0].d_in] + [layer.d_out for layer in self.layers]

    def __repr__(self) -> str:
        acts = ", ".join(str(a) for a in self.activations)
        return (f"MLP(sizes={self.sizes}, activations=[{acts}], loss={self.loss.name!r}, "
                f"memory={self.memory!r}, device={self.device!r}, dtype={self.dtype.name!r})")


def _from_checkpoint(layers, params, loss, **options) -> MLP:
    return MLP.from_params(params, [layer.activation for layer in layers], loss, **options)


_checkpoint.register("MLP", MLP, _from_checkpoint)


def _dense_layers(sizes, acts) -> list:
    return [Dense(d_in, d_out, act) for d_in, d_out, act in zip(sizes[:-1], sizes[1:], acts)]


def _check_sizes(sizes) -> list[int]:
    try:
        sizes = [operator.index(s) for s in sizes]  # ints only: 2.5 or "3" is a mistake
    except TypeError:
        raise TypeError(f"sizes must be a list of integer layer widths, got {sizes!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least two widths >= 1 (input, output), got {sizes}")
    return sizes

