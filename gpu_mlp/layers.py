"""Layer types: each a bilinear map C(x, W) plus a linear bias map iota(b).

A layer ``F_k = sigma_k(C_k(F_{k-1}, W_k) + iota_k(b_k))`` (:class:`Layer`;
:class:`Dense`, :class:`Conv2d`) is its configuration (the shapes it takes and gives,
its parameters' shapes, its activation) and what the backward pass needs of it --
``C``, ``C^dagger`` (to the input), ``C^{dagger dagger}`` (to the weights) and
``iota^*`` (to the bias) -- on the engine's arrays; the maths is docs/MATH.md, "General
bilinear layers". Every type works on the *rows* of its input, one row per (sample,
output position) with ``K`` columns, so all are the same products: ``C(x, W) = rows(x)
W_mat^T`` and ``C^dagger(T, W) = rows^*(T_rows W_mat)`` (one GEMM each),
``C^{dagger dagger}(x, T) = T_rows^T rows(x)`` and ``iota^*(T) = T_rows^T 1``.

``rows`` is a reshape for :class:`Dense` and im2col for :class:`Conv2d`
(:mod:`gpu_mlp.conv`); ``rows^*`` is the reshape back and col2im. A layer's methods take
arrays in torch's layouts, ``(B, d)`` or NCHW. The engine (:mod:`gpu_mlp.network`) runs
one loop over the same methods of each layer's *engine form* (:attr:`Layer.engine`): a
Dense is its own; a Conv2d's is :class:`ChannelsLast`, which keeps the maps NHWC, the
rows ``(B*H*W, c)`` of its GEMM, so that no layout copy runs between convolutions (the
engine copies where torch's layout meets the channels-last one:
:attr:`Layer.takes_channels_last`, :attr:`Layer.gives_channels_last`; on NumPy the first
convolution takes NCHW itself, :class:`EntranceConv`, and a Dense after a convolution
NHWC, :class:`ChannelsLastDense`).
The weight and bias gradients are left to the engine's *sink*, which receives
``(T_rows, rows(x))`` -- the same factors from either form.

>>> conv = Conv2d(1, 4, 3, padding=1)
>>> conv.output_shape((1, 8, 8)), conv.weight_shape
((4, 8, 8), (4, 1, 3, 3))
>>> Dense(256, 10, activation="identity").output_shape((4, 8, 8))
(10,)
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import numpy as np

from . import _checks, ops
from . import activations as _activations
from .conv import (col2im_scratch, from_phases, im2col_transposed, pad_into, shifted_taps,
                   to_phases)


def _pair(layer: str, name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (height, width), each >= ``minimum``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{layer}: {name} must be an integer or a pair (height, width), "
                             f"got {value!r}")
        return tuple(_checks.integer(name, v, minimum, f"{layer}: ") for v in value)
    v = _checks.integer(name, value, minimum, f"{layer}: ")
    return (v, v)


def _activation(layer: str, spec) -> _activations.Activation:
    """The activation ``spec`` names; an error naming ``layer`` if there is none."""
    try:
        return _activations.get(spec)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{layer}: {e}") from None


def from_spec(spec) -> "Layer":
    """The layer that :meth:`Layer.spec` describes; a TypeError/ValueError says what does
    not fit."""
    if not isinstance(spec, dict) or not _checks.named(spec.get("type"), LAYER_TYPES):
        raise ValueError(f"a layer must be a dict with a type in {list(LAYER_TYPES)}, "
                         f"got {spec!r}")
    kind = LAYER_TYPES[spec["type"]]
    arguments = {key: value for key, value in spec.items() if key != "type"}
    try:  # the names first: the constructor checks the values, naming them
        inspect.signature(kind).bind(**arguments)
    except TypeError as e:
        raise ValueError(f"{spec['type']} layer {arguments}: {e}") from None
    return kind(**arguments)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """``floor((size + 2 padding - kernel) / stride) + 1``: the one place it is computed."""
    return (size + 2 * padding - kernel) // stride + 1


class Layer:
    """What every layer type has: an activation and the shapes of its map."""

    activation: _activations.Activation

    def spec(self) -> dict:
        """The layer as plain JSON-ready values (checkpoints): :func:`from_spec` inverts it."""
        spec = {"type": type(self).__name__}
        for name, value in vars(self).items():
            spec[name] = (str(value) if isinstance(value, _activations.Activation)
                          else list(value) if isinstance(value, tuple) else value)
        return spec

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

    def working_size(self, input_shape: tuple) -> int:
        """Values per sample that the forward pass holds at once: input and output."""
        return math.prod(input_shape) + math.prod(self.output_shape(input_shape))

    # --- the backward pass's products on the engine's arrays, buffers from a Workspace ---

    def rows(self, x, ws, blocks: bool = False):
        """``rows(x)``, (B*P, K): a view of ``x`` where it can be, else a workspace
        buffer that :meth:`give_rows` returns. ``blocks``: the caller reads them block
        by block too (:func:`gpu_mlp.ops.weight_gradient`), so a convolution whose
        columns exceed ``ops.COLUMN_BUDGET_BYTES`` gives :class:`gpu_mlp.ops.RowBlocks`."""
        raise NotImplementedError

    def give_rows(self, rows, ws) -> None:
        """Return what :meth:`rows` took from the workspace."""

    def linear(self, x, W, ws, out=None, kept=None):
        """``C(x, W)`` in this layer's layout (B, *output_shape): into ``out``, or a
        workspace buffer. ``kept``: a training step's record of the layer
        (``network._Saved``), given where the memory mode lets the forward keep more
        than outputs: where keeping is cheap (on NumPy, one cache-sized block of a
        convolution's columns) the layer leaves there, as workspace buffers, what its
        backward would make again -- ``rows``, :meth:`rows` of ``x`` (Remark 8's store
        over recompute), and ``weight``, its copy of W in the engine's column order,
        which :meth:`input_grad` takes."""
        raise NotImplementedError

    def to_rows(self, T, ws):
        """``T`` (B, *output_shape) as rows (B*P, d_out); when that is a copy, ``T`` goes
        back to the workspace and the copy is a workspace buffer."""
        return T

    def input_grad(self, T_rows, W, ws, out, weight=None, derivative=None) -> None:
        """``out <- C^dagger(T, W)``, out of shape (B, *input_shape), from T as rows;
        ``weight``: the forward's copy of W that :meth:`linear` kept, if it did;
        ``derivative``: ``(act, F)``, the layer below's elementwise activation and its
        output, whose sigma' out is then multiplied by too -- given only where
        :meth:`fuses_derivative` says."""
        raise NotImplementedError

    def fuses_derivative(self, out) -> bool:
        """Whether :meth:`input_grad` into ``out`` multiplies in the layer below's
        sigma' in its own last pass (``derivative``): one pass over the maps fewer."""
        return False

    def bias_view(self, b):
        """``b`` shaped to broadcast over this layer's layout: ``iota(b)``."""
        return b

    @staticmethod
    def weight_matrix(W):
        """``W`` as the (d_out, K) matrix of the GEMMs: a view."""
        return W.reshape(W.shape[0], -1)

    # --- the engine's form of the layer (gpu_mlp.network runs its loop on it) ---

    # whether the engine form takes its input and gives its output NHWC
    takes_channels_last = gives_channels_last = False

    @property
    def engine(self) -> "Layer":
        """The layer as the engine runs it: its methods above, on arrays in the engine's
        layout (a Conv2d's :class:`ChannelsLast`; a Dense is its own, or on NumPy after
        a convolution a :class:`ChannelsLastDense`: :func:`engine_forms`)."""
        return self

    def engine_shape(self, shape: tuple) -> tuple:
        """A per-sample input shape in torch's layout as the engine's form keeps it."""
        return tuple(shape)

    @staticmethod
    def as_rows(a):
        """The engine's activations of this layer as rows (B*P, d_out), a view: what the
        bias broadcasts over."""
        return a


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
        object.__setattr__(self, "activation", _activation("Dense", activation))

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

    def rows(self, x, ws, blocks=False):
        return x if x.ndim == 2 else x.reshape(x.shape[0], self.d_in)  # flatten, C order

    def linear(self, x, W, ws, out=None, kept=None):
        A = ws.take((x.shape[0], self.d_out)) if out is None else out
        ops.gemm("N", "T", self.rows(x, ws), W, A)
        return A

    def input_grad(self, T_rows, W, ws, out, weight=None, derivative=None) -> None:
        ops.gemm("N", "N", T_rows, W, self.rows(out, ws))

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
        act = _activation(name, activation)
        if act.kind.rowwise:
            raise ValueError(f"{name}: activation {act.name!r} works on rows of a Dense "
                             f"layer's output, not on feature maps")
        set_(self, "activation", act)

    @property
    def weight_shape(self) -> tuple:
        return (self.c_out, self.c_in, *self.kernel_size)

    def output_shape(self, input_shape: tuple) -> tuple:
        return _conv_output_shape(self, tuple(input_shape))  # asked for a dozen times a step

    def positions(self, input_shape: tuple) -> int:
        _, h, w = self.output_shape(input_shape)
        return h * w

    def working_size(self, input_shape: tuple) -> int:
        # and, while the GEMM runs, the rows of the input and of the output
        rows = self.positions(input_shape) * (self.fan_in + self.c_out)
        return super().working_size(input_shape) + rows

    def rows(self, x, ws, blocks=False):
        B, P, K = x.shape[0], self.positions(x.shape[1:]), self.fan_in
        n = ops.row_block(x, P * K * x.dtype.itemsize) if blocks else B
        cols = _row_buffer(ws, n * P, K, blocks)
        if n >= B:
            return ops.im2col(self, x, cols)
        return ops.RowBlocks(B, n, P, lambda first, count: ops.im2col(
            self, x[first:first + count], cols[:count * P]), (cols,))

    def give_rows(self, rows, ws) -> None:
        _give_rows(rows, ws)

    def linear(self, x, W, ws, out=None, kept=None):
        B, out_shape = x.shape[0], self.output_shape(x.shape[1:])
        cols = self.rows(x, ws)
        A_rows = ws.take((cols.shape[0], self.c_out))  # NHWC: one row per position
        ops.gemm("N", "T", cols, self.weight_matrix(W), A_rows)
        ws.give(cols)
        A = ws.take((B, *out_shape)) if out is None else out
        _transpose(A_rows.reshape(B, -1, self.c_out), A.reshape(B, self.c_out, -1))
        ws.give(A_rows)
        return A

    def to_rows(self, T, ws):
        B = T.shape[0]
        T_rows = ws.take((T.size // self.c_out, self.c_out))
        _transpose(T.reshape(B, self.c_out, -1), T_rows.reshape(B, -1, self.c_out))
        ws.give(T)
        return T_rows

    def input_grad(self, T_rows, W, ws, out, weight=None, derivative=None) -> None:
        B, P, K = out.shape[0], self.positions(out.shape[1:]), self.fan_in
        n = ops.column_block(B, P * K * out.dtype.itemsize)
        dcols = ws.take_columns(n * P, K)
        for samples, rows in ops.sample_blocks(B, n, P):
            block = dcols[:rows.stop - rows.start]
            ops.gemm("N", "N", T_rows[rows], self.weight_matrix(W), block)
            ops.col2im(self, block, out[samples])
        ws.give(dcols)

    def bias_view(self, b):
        return b.reshape(self.c_out, 1, 1)  # one bias per channel, over (B, c, H, W)

    @property
    def engine(self) -> "ChannelsLast":
        return _channels_last(self)

    def __str__(self) -> str:
        return (f"Conv2d({self.c_in}, {self.c_out}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, "
                f"activation={str(self.activation)!r})")


@functools.lru_cache(maxsize=1024)
def _conv_output_shape(conv: Conv2d, input_shape: tuple) -> tuple:
    """:meth:`Conv2d.output_shape`, kept per layer and input shape (a ValueError is not
    kept: it is raised again on each call)."""
    if len(input_shape) != 3 or input_shape[0] != conv.c_in:
        raise ValueError(f"{conv}: takes (batch, {conv.c_in}, height, width) images, but "
                         f"its input has per-sample shape {input_shape}")
    out = tuple(conv_output_size(int(n), k, s, p) for n, k, s, p in
                zip(input_shape[1:], conv.kernel_size, conv.stride, conv.padding))
    if min(out) < 1:
        padded = tuple(int(n) + 2 * p for n, p in zip(input_shape[1:], conv.padding))
        raise ValueError(f"{conv}: the kernel {conv.kernel_size} is larger than the "
                         f"padded input {padded}")
    return (conv.c_out, *out)


class _Form(Layer):
    """An engine form of ``layer`` (:attr:`Layer.engine`): the layer's shapes."""

    def __init__(self, layer: Layer):
        self.layer, self.activation = layer, layer.activation
        # the layer's shapes, asked for a dozen times a step: kept (output per input shape)
        self._output_shapes, self._fan_in = {}, layer.fan_in

    @property
    def weight_shape(self) -> tuple:
        return self.layer.weight_shape

    @property
    def fan_in(self) -> int:
        return self._fan_in

    def output_shape(self, input_shape: tuple) -> tuple:
        found = self._output_shapes.get(input_shape)
        if found is None:  # (a ValueError is not kept: raised again on each call)
            found = self._output_shapes[input_shape] = self.layer.output_shape(input_shape)
        return found

    def positions(self, input_shape: tuple) -> int:
        return math.prod(self.output_shape(input_shape)[1:])

    def __str__(self) -> str:
        return f"{type(self).__name__}({self.layer})"


class _TakesMapsNHWC(_Form):
    """A form that takes its input maps NHWC: their per-sample shape as (H, W, C)."""

    takes_channels_last = True

    def engine_shape(self, shape: tuple) -> tuple:
        return (*shape[1:], shape[0])


# NumPy runs a convolution's forward and C^dagger as GEMMs on shifted views
# (ChannelsLast.shifted) where conv.shifted_taps' grid has at most this many
# cells an output position -- the cells beyond the outputs are multiplied and dropped.
# Measured against im2col + GEMM (3x3 kernels, float32): 0.6-0.9x its time on 7x7-32x32
# maps (1.13-1.65 cells an output), 0.8-0.95x on 4x4 (2.25), but 1.5-1.9x on 3x3 (2.78)
# and 1.2x for a 5x5 kernel on 7x7 (2.47); against col2im 0.4-0.8x up to 2.47 cells and
# as fast at 4 (2x2 maps), where col2im does not add into padding
SHIFTED_FORWARD_MAX = 2.25
SHIFTED_ADJOINT_MAX = 4.0
# ... on blocks of whole samples whose phase planes and grid of outputs hold about this
# many bytes (at least one sample): 4 and 16 MiB took the same time, 1 MiB up to 1.25x
# and the whole batch up to 1.2x as long (28x28 maps, batch 64), holding the most
SHIFTED_BLOCK_BYTES = 4 << 20


class ChannelsLast(_TakesMapsNHWC):
    """A :class:`Conv2d` as the engine runs it: activations NHWC, (B, H, W, C), which are
    the rows of its GEMM. So no copy runs between convolutions: ``to_rows`` is a view and
    the bias broadcasts over the rows; the engine copies NCHW to NHWC where the network's
    input enters (on a GPU) and back where the loss takes the maps, or a Dense layer
    whose d_out exceeds the batch (torch.flatten's order; else a Dense reads them NHWC:
    :class:`ChannelsLastDense`).
    The rows are (b, oh, ow); the columns of a window, on NumPy, in its NHWC
    order (i, j, c): im2col then copies runs of C contiguous values from one padded copy
    of the block (2.5-5x faster than W's (c, i, j), which writes every value kh*kw
    apart), against a copy of ``W`` in that order (c_out x K: small). ``rows(x)`` comes
    as (rows, kh, kw, c_in), the shape that tells the sinks so: the weight gradient
    ``T_rows^T rows(x)`` is permuted into ``W``'s layout as it is formed
    (:func:`gpu_mlp.ops.weight_gradient`). On a GPU a thread gathers one value, in any
    order at the same cost, so there the columns keep ``W``'s order and ``rows(x)`` is
    (rows, K). ``C^dagger`` reads the windows in their NHWC order on both: col2im then
    adds contiguous runs. On NumPy both run instead, where the columns are not small and
    the maps not small against the kernel (:meth:`shifted`), with no columns: one GEMM
    per kernel offset on a shifted view of the input's stride-phase planes, adding into
    the output, and the adjoint adding into the planes (:func:`gpu_mlp.conv.
    shifted_taps`); the weight gradient's rows(x) stay im2col's (one GEMM against T^T:
    long sums into a small product, which BLAS runs 2-3x slower as kh*kw narrow ones).
    im2col and col2im run on blocks of whole samples (ops.conv_block): on NumPy blocks
    that stay in cache, on a GPU as many samples as ``ops.COLUMN_BUDGET_BYTES`` holds,
    in the net's one column buffer. A 1x1 convolution with stride 1 and no padding has
    no column buffer: ``rows(x)`` is ``x``; windows that tile the image (stride =
    kernel, no padding) are one copy each way.
    """

    gives_channels_last = True

    def __init__(self, conv: Conv2d):
        super().__init__(conv)
        self.conv, self.c_in, self.c_out = conv, conv.c_in, conv.c_out
        self._direct = (conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                        and conv.padding == (0, 0))
        self._cells = {}  # cells_per_output per input shape

    def cells_per_output(self, input_shape) -> float:
        """Cells of :func:`gpu_mlp.conv.shifted_taps`' grid per output position for
        inputs of ``input_shape`` (C, H, W): more than the outputs where the kernel
        reaches past them (3x3 on 3x3 maps: 2.78). Infinite for a 1x1 convolution with
        stride 1 and no padding, which needs no columns at all."""
        found = self._cells.get(input_shape)
        if found is None:
            _, OH, OW = self.output_shape(input_shape)
            found = (math.inf if self._direct else
                     math.prod(shifted_taps(self.conv, input_shape).grid) / (OH * OW))
            self._cells[input_shape] = found
        return found

    def shifted(self, x, ws, most: float) -> bool:
        """Whether the NHWC batch ``x`` runs this convolution's forward (``most`` =
        :data:`SHIFTED_FORWARD_MAX`) or ``C^dagger`` (:data:`SHIFTED_ADJOINT_MAX`) as
        GEMMs on shifted views: on NumPy, where the grid has at most ``most`` cells an
        output, unless the columns are ones a step keeps (ops.keeps_columns: one
        cache-sized block for the largest batch the workspace ``ws`` has run, which
        im2col makes faster and the weight gradient reuses; the digits CNN's step took
        1.15x as long shifted). The same for every memory mode (the same numbers), and
        for a remainder batch as for the full one (no other buffers)."""
        B, H, Wd, C = x.shape
        _, OH, OW = self.output_shape((C, H, Wd))
        return (ops.is_numpy(x) and self.cells_per_output((C, H, Wd)) <= most
                and not ops.keeps_columns(x, ws, OH * OW * self.fan_in * x.dtype.itemsize))

    @staticmethod
    def as_rows(a):
        return a.reshape(-1, a.shape[-1])

    def _geometry(self, x):
        """(B, P, K) of the NHWC batch ``x``."""
        B, H, W, C = x.shape
        _, OH, OW = self.output_shape((C, H, W))
        return B, OH * OW, self.fan_in

    def rows(self, x, ws, blocks=False):
        if self._direct:
            return x.reshape(-1, self.c_in)
        B, P, K = self._geometry(x)
        per_block = ops.row_block(x, P * K * x.dtype.itemsize) if blocks else B
        cols = _row_buffer(ws, per_block * P, K, blocks)
        n = min(per_block, ops.conv_block(x, P * K * x.dtype.itemsize))
        padded = self._padding(x, n, ws)
        numpy = ops.is_numpy(x)

        def fill(first, count):
            """rows(x) of samples first..first + count, in cols."""
            for samples, rows in ops.sample_blocks(count, n, P):  # blocks: faster than one
                self._im2col(x[first:first + count][samples], cols[rows], padded)
            made = cols[:count * P]
            # NumPy: the windows' order, said by the shape
            return made.reshape(-1, *self.conv.kernel_size, self.c_in) if numpy else made

        buffers = tuple(b for b in (cols, padded) if b is not None)
        if per_block < B:
            return ops.RowBlocks(B, per_block, P, fill, buffers)
        made = fill(0, B)
        if padded is not None:
            ws.give(padded)
        return made

    def give_rows(self, rows, ws) -> None:
        if not self._direct:
            _give_rows(rows, ws)

    def _padding(self, x, n, ws):
        """On NumPy, for a padding convolution: a buffer for a block of ``n`` samples
        inside their zero border (conv.windows), from the workspace; else None."""
        if not ops.is_numpy(x) or not any(self.conv.padding):
            return None
        (ph, pw), (H, W) = self.conv.padding, x.shape[1:3]
        return ws.take((min(n, x.shape[0]), H + 2 * ph, W + 2 * pw, self.c_in))

    def _im2col(self, x, cols, padded) -> None:
        """``cols <- rows(x)`` of one block: on NumPy in the windows' order, one copy
        from ``padded`` (see :meth:`_padding`); on a GPU in W's."""
        block = None if padded is None else padded[:x.shape[0]]
        ops.im2col_nhwc(self.conv, x, cols, taps_first=ops.is_numpy(x), padded=block)

    def _windows_weight(self, W, into):
        """``into`` (c_out, kh, kw, c_in) <- ``W``, returned as the (c_out, K) matrix of
        columns (i, j, c), the windows' order."""
        into[...] = W.transpose(0, 2, 3, 1)
        return into.reshape(self.c_out, -1)

    def linear(self, x, W, ws, out=None, kept=None):
        B, P, K = self._geometry(x)
        H, Wd = x.shape[1:3]
        _, OH, OW = self.output_shape((self.c_in, H, Wd))
        A = ws.take((B, OH, OW, self.c_out)) if out is None else out
        A_rows = self.as_rows(A)
        if self._direct:
            ops.gemm("N", "T", self.rows(x, ws), self.weight_matrix(W), A_rows)
            return A
        numpy = ops.is_numpy(x)
        if self.shifted(x, ws, SHIFTED_FORWARD_MAX):
            self._linear_shifted(x, W, ws, A)
            return A
        keep = kept is not None and ops.keeps_columns(x, ws, P * K * x.dtype.itemsize)
        # NumPy: columns in the windows' order against W's copy in that order; a GPU
        # gathers W's own (c, i, j) (see the class)
        Wt = ws.take((self.c_out, *self.conv.kernel_size, self.c_in)) if numpy else None
        W_mat = self.weight_matrix(W) if Wt is None else self._windows_weight(W, Wt)
        n = min(B, ops.conv_block(x, P * K * x.dtype.itemsize))
        # the net's one column buffer, or rows(x) kept for the weight gradient
        cols = _row_buffer(ws, n * P, K, transient=not keep)
        padded = self._padding(x, n, ws)
        for samples, rows in ops.sample_blocks(B, n, P):
            block = cols[:rows.stop - rows.start]
            self._im2col(x[samples], block, padded)
            ops.gemm("N", "T", block, W_mat, A_rows[rows])
        if keep:
            kept.rows, cols = cols[:B * P].reshape(-1, *self.conv.kernel_size, self.c_in), None
            if not self.shifted(x, ws, SHIFTED_ADJOINT_MAX) and ops.keeps_weight(
                    x, Wt.nbytes):  # col2im's W, where that is small too
                kept.weight, Wt = Wt, None
        ws.give(*(b for b in (cols, Wt, padded) if b is not None))
        return A

    def to_rows(self, T, ws):
        return self.as_rows(T)  # a view: the engine gives T back through it

    def fuses_derivative(self, out) -> bool:
        # a GPU's input gradient ends in col2im, a kernel of ours (not in a GEMM)
        return not ops.is_numpy(out) and not self._direct

    def input_grad(self, T_rows, W, ws, out, weight=None, derivative=None) -> None:
        # the columns in the windows' order (i, j, c), against W in that order: col2im
        # then adds runs of C contiguous values
        if self._direct or self.shifted(out, ws, SHIFTED_ADJOINT_MAX):
            if self._direct:
                ops.gemm("N", "N", T_rows, self.weight_matrix(W), out.reshape(-1, self.c_in))
            else:
                self._input_grad_shifted(T_rows, W, ws, out)
            if derivative is not None:  # (these paths end in a GEMM or a copy: its own pass)
                ops.grad_from_output(*derivative, out, ws)
            return
        B, P, K = self._geometry(out)
        n = min(B, ops.conv_block(out, P * K * out.dtype.itemsize))
        # the net's one column buffer; W's copy kept by the forward, or one pooled with
        # the forward's, free by now
        dcols = ws.take_columns(n * P, K)
        Wt = ws.take((self.c_out, *self.conv.kernel_size, self.c_in)) if weight is None \
            else None
        W_mat = (weight if Wt is None else self._windows_weight(W, Wt)).reshape(self.c_out, -1)
        # NumPy: col2im's scratch, for its sums as contiguous adds (conv._col2im_flat)
        need = ops.is_numpy(out) and col2im_scratch(self.conv, (self.c_in, *out.shape[1:3]))
        # (n, need): its own pool, not that of the (B,) vectors (DP's squares), which
        # would each be sized for it
        scratch = ws.take((n, need)) if need else None
        for samples, rows in ops.sample_blocks(B, n, P):
            block = dcols[:rows.stop - rows.start]
            ops.gemm("N", "N", T_rows[rows], W_mat, block)
            ops.col2im_nhwc(self.conv, block, out[samples], scratch,
                            None if derivative is None else
                            (derivative[0], derivative[1][samples]))
        ws.give(*(b for b in (dcols, Wt, scratch) if b is not None))

    def _taps_weight(self, W, ws):
        """W as (kh*kw, c_out, c_in), each kernel offset's (c_out, c_in) matrix
        contiguous, in a workspace buffer: the shifted GEMMs' operands."""
        taps = ws.take((math.prod(self.conv.kernel_size), self.c_out, self.c_in))
        taps.reshape(*self.conv.kernel_size, self.c_out, self.c_in)[...] = \
            W.transpose(2, 3, 0, 1)
        return taps

    def _planes(self, x_shape, ws):
        """For NHWC maps of ``x_shape``: :func:`gpu_mlp.conv.shifted_taps`, the samples
        of a block (:data:`SHIFTED_BLOCK_BYTES` of planes and grid), and workspace
        buffers for a block's phase planes, (sh*sw, n, Mh, Mw, C), and its grid of
        outputs, (n, Mh, Mw, c_out)."""
        B, H, Wd, C = x_shape
        taps = shifted_taps(self.conv, (C, H, Wd))
        phases = math.prod(self.conv.stride)
        per_sample = math.prod(taps.grid) * (phases * C + self.c_out) * ws.dtype.itemsize
        n = min(B, max(1, SHIFTED_BLOCK_BYTES // per_sample))
        # the planes in the net's one column buffer (the weight gradient's columns come
        # after them): no more memory than im2col's
        planes = ws.take_columns(phases * n * math.prod(taps.grid), C)
        return (taps, n, planes.reshape(phases, n, *taps.grid, C),
                ws.take((n, *taps.grid, self.c_out)))

    def _linear_shifted(self, x, W, ws, A) -> None:
        """``A <- C(x, W)`` on NumPy, a block of samples at a time: kh*kw GEMMs on
        shifted rows of its phase planes into a grid of outputs
        (:func:`gpu_mlp.conv.shifted_taps`), whose cells (oh, ow) are A's."""
        B, (OH, OW) = x.shape[0], A.shape[1:3]
        taps, n, planes, grid = self._planes(x.shape, ws)
        W_taps = self._taps_weight(W, ws)
        for first in range(0, B, n):
            m = min(n, B - first)
            block, cells = planes[:, :m], m * math.prod(taps.grid)
            to_phases(x[first:first + m], self.conv, block)
            rows = block.reshape(len(planes), cells, self.c_in)
            out = grid[:m].reshape(cells, self.c_out)
            k = cells - taps.reach
            for t, (_, _, phase, shift) in enumerate(taps.taps):  # (0, 0) first: shift 0
                ops.gemm("N", "T", rows[phase, shift:shift + k], W_taps[t], out[:k],
                         beta=0.0 if t == 0 else 1.0)
            np.copyto(A[first:first + m], grid[:m, :OH, :OW])
        ws.give(planes, grid, W_taps)

    def _input_grad_shifted(self, T_rows, W, ws, out) -> None:
        """``out <- C^dagger(T, W)`` on NumPy, a block of samples at a time: T in the
        grid of :func:`gpu_mlp.conv.shifted_taps` (zeros in the cells that are no
        output), each kernel offset's GEMM added into the phase planes at its shift,
        the planes' pixels copied into out. (The sums run in another order than
        col2im's: the same numbers to rounding.)"""
        B, (sh, sw), (kh, kw) = out.shape[0], self.conv.stride, self.conv.kernel_size
        _, OH, OW = self.output_shape((self.c_in, *out.shape[1:3]))
        T = T_rows.reshape(B, OH, OW, self.c_out)
        taps, n, planes, grid = self._planes(out.shape, ws)
        W_taps = self._taps_weight(W, ws)
        for first in range(0, B, n):
            m = min(n, B - first)
            block, cells = planes[:, :m], m * math.prod(taps.grid)
            pad_into(T[first:first + m], grid[:m], (0, 0))
            rows = block.reshape(len(planes), cells, self.c_in)
            k = cells - taps.reach
            T_cells = grid[:m].reshape(cells, self.c_out)[:k]
            for t, (i, j, phase, shift) in enumerate(taps.taps):
                first_tap = i < sh and j < sw  # the plane's first offset, shift 0
                if first_tap:
                    rows[phase, k:] = 0
                ops.gemm("N", "N", T_cells, W_taps[t], rows[phase, shift:shift + k],
                         beta=0.0 if first_tap else 1.0)
            for phase in range(len(planes)):  # a stride longer than the kernel: untouched
                if phase // sw >= kh or phase % sw >= kw:
                    block[phase] = 0
            from_phases(block, self.conv, out[first:first + m])
        ws.give(planes, grid, W_taps)


@functools.cache
def _channels_last(conv: Conv2d) -> ChannelsLast:
    return ChannelsLast(conv)


class EntranceConv(_Form):
    """A :class:`Conv2d` that takes the network's NCHW input, as the engine runs it on
    NumPy: it gives NHWC maps, the rows of its GEMM (as :class:`ChannelsLast`), from
    columns built transposed, (K, B*P) in W's own (c, i, j) order: one copy per kernel
    offset moves runs of OW values of the NCHW input (:func:`gpu_mlp.conv.
    im2col_transposed`), where rows of a window would take runs of C, the few channels
    of an input: 4-6x faster, and no copy of X to NHWC or of W. ``rows(x)`` is that
    matrix's transpose, an F-ordered (B*P, K) view, which :func:`gpu_mlp.ops.gemm` takes
    as it is; the forward runs on blocks of whole samples (ops.conv_block). dJ/dX, NCHW,
    is :class:`Conv2d`'s. A GPU copies X to NHWC and runs a :class:`ChannelsLast`."""

    gives_channels_last = True

    def __init__(self, conv: Conv2d):
        super().__init__(conv)
        self.conv, self.c_out = conv, conv.c_out

    as_rows = staticmethod(ChannelsLast.as_rows)

    def _transposed_columns(self, x, buffer):
        """A (K, B*P) C-contiguous matrix for the columns of the NCHW ``x``, in the
        memory of the C-contiguous ``buffer`` (a (rows, K) workspace buffer, at least
        B*P rows: the pool's rows(x) buffers serve it, whatever the layout)."""
        B, P, K = x.shape[0], self.positions(x.shape[1:]), self.fan_in
        return buffer.reshape(-1)[:K * B * P].reshape(K, B * P)

    def _fill(self, x, columns, ws) -> None:
        """``columns <- im2col(x)^T``, through padded copies of cache-sized blocks of
        samples of x (ops.conv_block) in a buffer from ``ws``."""
        (ph, pw), (B, C, H, W) = self.conv.padding, x.shape
        if not (ph or pw):
            im2col_transposed(x, self.conv, columns)
            return
        P, K = columns.shape[1] // B, columns.shape[0]
        n = min(B, ops.conv_block(x, P * K * x.dtype.itemsize))
        padded = ws.take((n, C, H + 2 * ph, W + 2 * pw))
        im2col_transposed(x, self.conv, columns, padded)
        ws.give(padded)

    def rows(self, x, ws, blocks=False):
        B, P, K = x.shape[0], self.positions(x.shape[1:]), self.fan_in
        n = ops.row_block(x, P * K * x.dtype.itemsize) if blocks else B
        buffer = _row_buffer(ws, n * P, K, blocks)

        def fill(first, count):
            """rows(x) of samples first..first + count, in buffer."""
            samples = x[first:first + count]
            columns = self._transposed_columns(samples, buffer)
            self._fill(samples, columns, ws)
            return columns.T

        return fill(0, B) if n >= B else ops.RowBlocks(B, n, P, fill, (buffer,))

    def give_rows(self, rows, ws) -> None:
        _give_rows(rows, ws)

    def linear(self, x, W, ws, out=None, kept=None):
        B, (_, OH, OW) = x.shape[0], self.output_shape(x.shape[1:])
        P, K = OH * OW, self.fan_in
        A = ws.take((B, OH, OW, self.c_out)) if out is None else out
        A_rows, W_mat = self.as_rows(A), self.weight_matrix(W)
        n = min(B, ops.conv_block(x, P * K * x.dtype.itemsize))
        keep = kept is not None and ops.keeps_columns(x, ws, P * K * x.dtype.itemsize)
        # the net's one column buffer, or rows(x) kept for the weight gradient
        block = _row_buffer(ws, n * P, K, transient=not keep)
        for samples, rows in ops.sample_blocks(B, n, P):
            columns = self._transposed_columns(x[samples], block)
            self._fill(x[samples], columns, ws)
            ops.gemm("T", "T", columns, W_mat, A_rows[rows])
        if keep:  # (one block: the whole batch's columns) as rows() gives them
            kept.rows = self._transposed_columns(x, block).T
        else:
            ws.give(block)
        return A

    def to_rows(self, T, ws):
        return self.as_rows(T)

    def input_grad(self, T_rows, W, ws, out, weight=None, derivative=None) -> None:
        self.conv.input_grad(T_rows, W, ws, out)


class ChannelsLastDense(_TakesMapsNHWC):
    """A :class:`Dense` that takes a convolution's maps, as the engine runs it:
    the maps stay NHWC, (B, H, W, C), and are read flattened in that (h, w, c) order
    against a copy of ``W`` with its columns in that order (d_out x d_in, W's size: less
    than the maps' at any batch above d_out), so ``torch.flatten``'s (c, h, w) order
    holds with no copy of the maps either way. ``rows(x)`` is ``x`` itself, (B, H, W,
    C), the shape that tells the sinks so: they permute ``T_rows^T rows(x)`` into W's
    layout as a convolution's windows (:func:`gpu_mlp.ops.weight_gradient`), on NumPy
    and on a GPU alike (strided copies there, no array made)."""

    def __init__(self, dense: Dense):
        super().__init__(dense)
        self.d_out = dense.d_out

    def _weight(self, W, maps, ws):
        """A workspace copy of ``W`` with its columns in the (h, w, c) order of the NHWC
        ``maps``, as the (d_out, d_in) matrix (taken as one row of W's size: shaped as
        the maps, it would be pooled with them and sized for the batch)."""
        H, Wd, C = maps.shape[1:]
        Wt = ws.take((1, self.d_out * H * Wd * C)).reshape(self.d_out, -1)
        Wt.reshape(self.d_out, H, Wd, C)[...] = W.reshape(self.d_out, C, H, Wd).transpose(
            0, 2, 3, 1)
        return Wt

    def rows(self, x, ws, blocks=False):
        return x

    def linear(self, x, W, ws, out=None, kept=None):
        A = ws.take((x.shape[0], self.d_out)) if out is None else out
        Wt = self._weight(W, x, ws)
        ops.gemm("N", "T", x.reshape(x.shape[0], -1), Wt, A)
        if kept is not None and ops.keeps_weight(x, Wt.nbytes):  # for input_grad
            kept.weight = Wt
        else:
            ws.give(Wt)
        return A

    def input_grad(self, T_rows, W, ws, out, weight=None, derivative=None) -> None:
        Wt = self._weight(W, out, ws) if weight is None else weight
        ops.gemm("N", "N", T_rows, Wt, out.reshape(out.shape[0], -1))
        if weight is None:
            ws.give(Wt)


@functools.cache
def _entrance_conv(conv: Conv2d) -> EntranceConv:
    return EntranceConv(conv)


@functools.cache
def _channels_last_dense(dense: Dense) -> ChannelsLastDense:
    return ChannelsLastDense(dense)


def engine_forms(layers, numpy: bool, batch: int) -> list:
    """The engine forms of ``layers`` (:attr:`Layer.engine`) for a batch of ``batch``
    samples. A Dense that takes a convolution's maps runs as a
    :class:`ChannelsLastDense` where that copies less: a step copies W in the maps'
    order twice and permutes its gradient once (3 d_out d_in values), where the engine
    would copy the maps to NCHW and their gradient back, and the maps again for the
    weight gradient's rows (3 B d_in): so where ``d_out <= batch``."""
    forms = []
    for layer in layers:
        form = layer.engine
        if numpy and isinstance(layer, Conv2d) and not forms:
            form = _entrance_conv(layer)
        if (isinstance(layer, Dense) and layer.d_out <= batch and forms
                and forms[-1].gives_channels_last):
            form = _channels_last_dense(layer)
        forms.append(form)
    return forms


def to_channels_last(x, ws):
    """NCHW ``x`` (B, C, H, W) copied into a workspace buffer (B, H, W, C)."""
    y = ws.take((x.shape[0], *x.shape[2:], x.shape[1]))
    y[...] = x.transpose(0, 2, 3, 1)
    return y


def to_channels_first(x, ws, out=None):
    """NHWC ``x`` (B, H, W, C) copied into ``out`` or a workspace buffer (B, C, H, W)."""
    y = ws.take((x.shape[0], x.shape[3], *x.shape[1:3])) if out is None else out
    y[...] = x.transpose(0, 3, 1, 2)
    return y


LAYER_TYPES = {"Dense": Dense, "Conv2d": Conv2d}


def _row_buffer(ws, rows: int, K: int, transient: bool):
    """A buffer for rows(x): the net's one column buffer where the sink is done with it
    before the next layer's (``transient``), else one per K (a sink that keeps every
    layer's factors holds them all at once)."""
    return ws.take_columns(rows, K) if transient else ws.take((rows, K))


def _give_rows(rows, ws) -> None:
    """Return a convolution's rows(x), one buffer or :class:`gpu_mlp.ops.RowBlocks`'."""
    ws.give(*(rows.buffers if isinstance(rows, ops.RowBlocks) else (rows,)))


def _transpose(src, dst) -> None:
    """``dst <- src`` with its last two axes swapped: (B, m, n) into (B, n, m), as one
    strided copy (NumPy's or CuPy's), no temporary."""
    dst[...] = src.transpose(0, 2, 1)
