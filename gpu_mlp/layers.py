"""Layer types: each a bilinear map C(x, W) plus a linear bias map iota(b) (seed 003, Section 4).

A layer ``F_k = sigma_k(C_k(F_{k-1}, W_k) + iota_k(b_k))`` is described here by its
configuration alone: the shapes it takes and gives, its parameters' shapes, its
activation. What Algorithm 2 needs of it -- ``C``, ``C^dagger`` (to the input),
``C^{dagger dagger}`` (to the weights) and ``iota^*`` (to the bias) -- comes in the engine
and the reference as the same three products for every type: a layer works on the *rows*
of its input, one row per (sample, output position) with ``K`` columns, so that

    C(x, W)              = rows(x) W_mat^T         one GEMM,  W_mat: (d_out, K)
    C^{dagger dagger}(x, T) = T_rows^T rows(x)     one GEMM   (beta = 1 for SGD)
    C^dagger(T, W)       = rows^*(T_rows W_mat)    one GEMM, then the adjoint of rows
    iota^*(T)            = T_rows^T 1              one GEMV

``rows`` is a reshape for :class:`Dense` (one position per sample) and im2col for
:class:`Conv2d`; ``rows^*`` is the reshape back and col2im.

>>> conv = Conv2d(1, 4, 3, padding=1)
>>> conv.output_shape((1, 8, 8)), conv.weight_shape
((4, 8, 8), (4, 1, 3, 3))
>>> Dense(256, 10, activation="identity").output_shape((4, 8, 8))
(10,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import _checks
from . import activations as _activations


def _pair(layer: str, name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (height, width), each >= ``minimum``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{layer}: {name} must be an integer or a pair (height, width), "
                             f"got {value!r}")
        return tuple(_checks.integer(name, v, minimum, f"{layer}: ") for v in value)
    v = _checks.integer(name, value, minimum, f"{layer}: ")
    return (v, v)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """``floor((size + 2 padding - kernel) / stride) + 1``: the one place it is computed."""
    return (size + 2 * padding - kernel) // stride + 1


class Layer:
    """What every layer type has: an activation and the shapes of its map."""

    activation: _activations.Activation

    @property
    def weight_shape(self) -> tuple:
        raise NotImplementedError

    @property
    def bias_shape(self) -> tuple:
        return (self.weight_shape[0],)

    @property
    def fan_in(self) -> int:
        """Inputs per output (``K``): the scale of the initial weights."""
        return math.prod(self.weight_shape[1:])

    def output_shape(self, input_shape: tuple) -> tuple:
        """The per-sample output shape for a per-sample ``input_shape``; a ValueError
        naming the layer if the input does not fit."""
        raise NotImplementedError

    def positions(self, input_shape: tuple) -> int:
        """Output positions per sample: the rows each sample contributes to ``rows(x)``."""
        raise NotImplementedError


@dataclass(frozen=True, init=False)
class Dense(Layer):
    """``A = x W^T + b`` on inputs of any shape ``(B, ...)``, flattened in C order first
    (as ``torch.flatten(x, 1)``): ``W`` is ``(d_out, d_in)``, ``nn.Linear``'s layout."""

    d_in: int
    d_out: int
    activation: _activations.Activation

    def __init__(self, d_in: int, d_out: int, activation="relu"):
        object.__setattr__(self, "d_in", _checks.integer("d_in", d_in, 1, "Dense: "))
        object.__setattr__(self, "d_out", _checks.integer("d_out", d_out, 1, "Dense: "))
        object.__setattr__(self, "activation", _activations.get(activation))

    @property
    def weight_shape(self) -> tuple:
        return (self.d_out, self.d_in)

    def output_shape(self, input_shape: tuple) -> tuple:
        if math.prod(input_shape) != self.d_in:
            raise ValueError(f"{self}: takes {self.d_in} inputs per sample, but its input "
                             f"has shape {tuple(input_shape)} ({math.prod(input_shape)} "
                             f"values when flattened)")
        return (self.d_out,)

    def positions(self, input_shape: tuple) -> int:
        return 1

    def __str__(self) -> str:
        return f"Dense({self.d_in}, {self.d_out}, activation={str(self.activation)!r})"


@dataclass(frozen=True, init=False)
class Conv2d(Layer):
    """2-D cross-correlation on NCHW batches, as ``torch.nn.functional.conv2d``:
    ``W`` is ``(c_out, c_in, kh, kw)``, one bias per output channel."""

    c_in: int
    c_out: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    activation: _activations.Activation

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0,
                 activation="relu"):
        name = "Conv2d"
        set_ = object.__setattr__
        set_(self, "c_in", _checks.integer("c_in", c_in, 1, f"{name}: "))
        set_(self, "c_out", _checks.integer("c_out", c_out, 1, f"{name}: "))
        set_(self, "kernel_size", _pair(name, "kernel_size", kernel_size, 1))
        set_(self, "stride", _pair(name, "stride", stride, 1))
        set_(self, "padding", _pair(name, "padding", padding, 0))
        act = _activations.get(activation)
        if act.kind.rowwise:
            raise ValueError(f"{name}: activation {act.name!r} works on rows of a Dense "
                             f"layer's output, not on feature maps")
        set_(self, "activation", act)

    @property
    def weight_shape(self) -> tuple:
        return (self.c_out, self.c_in, *self.kernel_size)

    def output_shape(self, input_shape: tuple) -> tuple:
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[0] != self.c_in:
            raise ValueError(f"{self}: takes (batch, {self.c_in}, height, width) images, but "
                             f"its input has per-sample shape {input_shape}")
        out = tuple(conv_output_size(n, k, s, p) for n, k, s, p in
                    zip(input_shape[1:], self.kernel_size, self.stride, self.padding))
        if min(out) < 1:
            padded = tuple(n + 2 * p for n, p in zip(input_shape[1:], self.padding))
            raise ValueError(f"{self}: the kernel {self.kernel_size} is larger than the "
                             f"padded input {padded}")
        return (self.c_out, *out)

    def positions(self, input_shape: tuple) -> int:
        _, h, w = self.output_shape(input_shape)
        return h * w

    def __str__(self) -> str:
        return (f"Conv2d({self.c_in}, {self.c_out}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, "
                f"activation={str(self.activation)!r})")
