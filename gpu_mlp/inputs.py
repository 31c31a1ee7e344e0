"""What a :class:`~gpu_mlp.network.Network` is given, checked before its layer loop runs.

Every public step validates before it touches anything, so a bad call raises an error
that names the problem and leaves the net unchanged: the layers when a net is built
(:func:`check_layers`), and per call the parameters (``net.params`` is public: entries
replaced since must still be what the engine computes with), X's shape against every
layer (:meth:`Inputs.shapes`), and X and Y as they will be computed with -- cast to the
net's dtype, then scanned, the value checks read from the device at once
(:class:`gpu_mlp._checks.Verdicts`). The shapes of the layers themselves are
docs/MATH.md's ("General bilinear layers").
"""

from __future__ import annotations

import math
import operator

import numpy as np

from . import _checks, ops
from . import device as _device
from . import layers as _layers


def check_layers(layers) -> list:
    """``layers`` as a list of Dense / Conv2d layers that chain, or a TypeError/ValueError
    naming the first that does not."""
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError("layers must be a list of gpu_mlp.layers.Dense / Conv2d") from None
    if not layers:
        raise ValueError("a network needs at least one layer")
    for k, layer in enumerate(layers, start=1):
        if not isinstance(layer, _layers.Layer):
            raise TypeError(f"layer {k} must be a gpu_mlp.layers.Dense or Conv2d, got "
                            f"{type(layer).__name__}")
    for k, (before, layer) in enumerate(zip(layers, layers[1:]), start=2):
        if isinstance(layer, _layers.Conv2d) and isinstance(before, _layers.Dense):
            raise ValueError(f"layer {k}, {layer}: follows a Dense layer, whose output has "
                             f"no image shape")
        if isinstance(layer, _layers.Conv2d) and before.c_out != layer.c_in:
            raise ValueError(f"layer {k}, {layer}: takes {layer.c_in} channels, but layer "
                             f"{k - 1} gives {before.c_out}")
        if isinstance(layer, _layers.Dense) and isinstance(before, _layers.Dense) \
                and before.d_out != layer.d_in:
            raise ValueError(f"layer {k}, {layer}: takes {layer.d_in} inputs, but layer "
                             f"{k - 1} gives {before.d_out}")
    return layers


def input_shape(shape) -> tuple:
    """The shape of one sample, e.g. ``(1, 28, 28)``: a tuple of sizes >= 1."""
    try:
        return tuple(_checks.integer("input_shape", n) for n in shape)
    except TypeError:
        raise TypeError(f"input_shape must be a tuple of sizes, got {shape!r}") from None


def writable(a) -> bool:
    """Whether a step may write its update into the parameter array ``a`` (NumPy's flags;
    a CuPy array always)."""
    return getattr(a.flags, "writeable", True) and getattr(a.flags, "aligned", True)


def sample_ndim(layers) -> int:
    """How many axes one sample has: 3 for images into a Conv2d, else 1."""
    return 3 if isinstance(layers[0], _layers.Conv2d) else 1


def on_host(a, xp) -> bool:
    """Whether ``a`` is host data as it stands, not an array of ``xp``: a NumPy array or
    scalar, a list or tuple, a Python number."""
    return isinstance(a, (np.ndarray, np.generic, list, tuple, int, float)) and \
        not isinstance(a, xp.ndarray)


def rows(X) -> int:
    """The number of rows of a batch, before any other check (an empty one is allowed
    in a DP or data-parallel step); -1 for what is not a batch."""
    shape = getattr(X, "shape", None)
    return shape[0] if shape is not None and len(shape) > 1 else -1


class Inputs:
    """The checks of one network's inputs, with what they remember between calls: each
    sample shape's layer shapes, and the parameter arrays last found good.

    ``layers``, ``loss``, ``xp`` and ``dtype`` are the net's; ``param_shapes`` the
    ``(W_k.shape, b_k.shape)`` its parameters must keep.
    """

    def __init__(self, layers, loss, xp, dtype, param_shapes):
        self.layers, self.loss, self.xp, self.dtype = list(layers), loss, xp, dtype
        self.param_shapes = list(param_shapes)
        self._checked_params = []
        self._shape_cache = {}

    def shapes(self, input_shape: tuple) -> list:
        """``[(input shape, output shape)]`` of every layer for per-sample
        ``input_shape``; a ValueError naming the first layer that does not fit."""
        try:  # a shape seen before, as given (a lookup: a step asks once or twice)
            return self._shape_cache[input_shape]
        except (KeyError, TypeError):  # (new, or a list)
            pass
        input_shape = tuple(int(n) for n in input_shape)
        shapes = self._shape_cache.get(input_shape)
        if shapes is None:
            shapes, shape = [], input_shape
            for k, layer in enumerate(self.layers, start=1):
                try:
                    out = layer.output_shape(shape)
                except ValueError as e:
                    raise ValueError(f"layer {k}, {e}") from None
                shapes.append((shape, out))
                shape = out
            self.loss.check_outputs(math.prod(shape))
            self._shape_cache[input_shape] = shapes
        return shapes

    def expected(self) -> str:
        """The shapes X may have, in words."""
        first = self.layers[0]
        if isinstance(first, _layers.Conv2d):
            return f"(batch, {first.c_in}, height, width) or ({first.c_in}, height, width)"
        return f"(batch, {first.d_in}) or ({first.d_in},)"

    def raw(self, X, xp=None):
        """``(X, single)``: X on the net's device (or ``xp``'s) as a batch, its shape and
        kind checked; not yet cast or scanned. ``single``: X was one sample."""
        X = _device.to_device(_checks.unmasked("X", X), xp or self.xp, "X")
        first = self.layers[0]
        if X.ndim < 1 or (isinstance(first, _layers.Dense) and X.ndim <= 2
                          and X.shape[-1] != first.d_in):
            raise ValueError(f"X must have shape {self.expected()}, got {tuple(X.shape)}")
        single = X.ndim == sample_ndim(self.layers)
        if single:
            X = X[None]
        if X.shape[0] == 0:
            raise ValueError("X is an empty batch: it must hold at least one sample")
        self.shapes(X.shape[1:])  # every layer must fit, before anything runs
        return X, single

    def batch(self, params, X, Y, check: bool, write: bool = False, staging=None):
        """``(X, Y, single)``: a C-contiguous batch in the net's dtype, checked as
        computed with: the value checks come after the cast and are read from the device
        at once. ``params``: the net's, checked first (:meth:`check_params`; ``write``:
        for a training step). ``staging``: a training step's
        :class:`~gpu_mlp.workspace.Workspace` on a GPU, where a batch from the host
        (NumPy arrays or lists) is cast and checked on the host, with no device read,
        and copied into the buffers it keeps (:meth:`Workspace.staged
        <gpu_mlp.workspace.Workspace.staged>`: no allocation)."""
        self.check_params(params, write)
        xp = np if staging is not None and self.xp is not np and \
            on_host(X, self.xp) and on_host(Y, self.xp) else self.xp
        X, single = self.raw(X, xp)
        Y = _device.to_device(_checks.unmasked("Y", Y), xp, "Y")
        given = tuple(Y.shape)
        if single:
            Y = Y[None] if Y.ndim < 2 else Y
        X = _checks.cast(X, self.dtype, xp)
        verdicts = _checks.Verdicts(xp) if check else None
        if check:
            ops.finite("X", X, xp, verdicts)
        d_out = math.prod(self.shapes(X.shape[1:])[-1][1])
        try:
            Y = self.loss.check_targets(Y, X.shape[0], d_out, xp, self.dtype,
                                        values=verdicts if check else False)
        except ValueError as e:  # a shape: the values wait in the verdicts
            if not single:
                raise
            sample = tuple(X.shape[1:])
            raise ValueError(f"X is one sample, of shape {sample}, so Y, of shape {given}, "
                             f"must be one sample's target (for a batch of one, give X the "
                             f"shape {(1, *sample)}); with the batch axis added: {e}") from None
        if check:
            verdicts.settle()
        Y = xp.ascontiguousarray(Y)
        if xp is not self.xp:  # checked on the host: now on the device
            X, Y = staging.staged(X), staging.staged(Y)
        return X, Y, single

    def check_params(self, params, write: bool = False) -> None:
        """The net's ``params`` (public): entries replaced since must still be what the
        engine computes with, or a step would fail half-way with some layers updated.
        ``write``: a training step's, which writes its update into them -- a NumPy array
        must be writeable (a read-only memory map would crash the BLAS writing it)."""
        arrays = [a for pair in params for a in pair]
        if not (len(arrays) == len(self._checked_params) and all(
                map(operator.is_, arrays, self._checked_params))):
            self._check_new_params(params, arrays)  # else the objects last checked
        if write and not all(map(writable, arrays)):
            k, name, a = next((k, n, a) for k, pair in enumerate(params, start=1)
                              for n, a in zip(("W", "b"), pair) if not writable(a))
            what = ("read-only (a read-only memory map, say)" if not a.flags.writeable else
                    "not aligned to its dtype (a view at an odd byte offset, say)")
            raise ValueError(f"{name}_{k} is {what}, and training writes its update into "
                             f"it: give the net writeable, "
                             f"aligned copies (np.array(...))")

    def _check_new_params(self, params, arrays) -> None:
        if len(params) != len(self.param_shapes):
            raise ValueError(f"net.params must hold {len(self.param_shapes)} (W, b) pairs, "
                             f"got {len(params)}")
        for k, (pair, shapes) in enumerate(zip(params, self.param_shapes), start=1):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"net.params[{k - 1}] must be a (W_{k}, b_{k}) pair")
            for name, a, shape in zip((f"W_{k}", f"b_{k}"), pair, shapes):
                if not isinstance(a, self.xp.ndarray):
                    raise TypeError(f"{name} must be a {self.xp.__name__} array on the "
                                    f"net's device, got {type(a).__name__}")
                if isinstance(a, np.matrix):  # an update through a flat view would fail
                    raise TypeError(f"{name} is a numpy.matrix, which stays 2-D when "
                                    f"flattened: give np.asarray({name})")
                if a.dtype != self.dtype or a.shape != shape or not a.flags.c_contiguous:
                    raise ValueError(f"{name} must be a C-contiguous {self.dtype} array of "
                                     f"shape {shape}, got {a.dtype} {tuple(a.shape)}"
                                     f"{'' if a.flags.c_contiguous else ', not C-contiguous'}")
        self._checked_params = arrays
