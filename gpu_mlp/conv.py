"""im2col and col2im: the rows of a convolution's input, and their adjoint.

A :class:`~gpu_mlp.layers.Conv2d` works on ``rows(x) = im2col(x)``, so that the layer is
one GEMM, ``C(x, W) = rows(x) W_mat^T`` (see :mod:`gpu_mlp.layers`). ``im2col(x)`` of an
NCHW batch is the C-contiguous (B*OH*OW, K) matrix, K = C*kh*kw, in the row and column
order of docs/MATH.md, "General bilinear layers": entry ``((b*OH + oh)*OW + ow,
(c*kh + i)*kw + j)`` is ``x[b, c, oh*sh - ph + i, ow*sw - pw + j]``, 0 outside the
image. ``col2im`` is its exact adjoint: each pixel gets the sum of the entries that read
it, which takes ``C^dagger(T, W) = col2im(T_rows W_mat)`` back to the input.

Both are written here twice, formula for formula: as NumPy functions that fill a
caller's buffer (a loop over the kh*kw kernel offsets with strided slices, as Chainer's
``chainer/utils/conv.py``: no loop over samples or pixels, no batch-size temporary),
and as CUDA elementwise kernel bodies over ``kernels/conv.cuh`` (``ELEMENTWISE``),
whose col2im is a gather adding in the NumPy order, so both give the same bits.

The engine keeps a convolution's maps channels-last (NHWC: :class:`gpu_mlp.layers.
ChannelsLast`); :func:`im2col_nhwc` and :func:`col2im_nhwc` are the same maps on NHWC
images, twinned the same way (``im2col_nhwc``, ``col2im_nhwc`` in ``ELEMENTWISE``). The
NCHW pair serves the layers' torch-layout methods and the network's entrance. On NumPy
a layer whose columns would be large runs its forward and ``C^dagger`` with none: one
GEMM per kernel offset on a shifted view of the input's stride-phase planes
(:func:`shifted_taps`, :func:`to_phases`, :func:`from_phases`).

>>> import numpy as np
>>> from gpu_mlp.layers import Conv2d
>>> layer = Conv2d(1, 1, 2)
>>> x = np.arange(9.0).reshape(1, 1, 3, 3)
>>> im2col(x, layer, np.empty((4, 4)))[0]
array([0., 1., 3., 4.])
>>> col2im(np.ones((4, 4)), layer, np.empty((1, 1, 3, 3)))[0, 0]
array([[1., 2., 1.],
       [2., 4., 2.],
       [1., 2., 1.]])
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np


class ConvGeometry(Protocol):
    """What this module reads of a :class:`gpu_mlp.layers.Conv2d` (which it does not
    import: layers imports the engine's ops, which import this module)."""

    c_in: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]

    def output_shape(self, input_shape: tuple) -> tuple[int, int, int]: ...


_GEOMETRY = ("int32 C, int32 H, int32 W, int32 kh, int32 kw, int32 sh, int32 sw, "
             "int32 ph, int32 pw, int32 OH, int32 OW")
_ARGS = "C, H, W, kh, kw, sh, sw, ph, pw, OH, OW"

# name: (in_params, out_params, operation), as gpu_mlp.ops.ELEMENTWISE; the launch is
# over the output (its index i), the input C-contiguous, the geometry from geometry().
ELEMENTWISE = {
    # cols (B*OH*OW, C*kh*kw) <- im2col(x), x (B, C, H, W)
    "im2col": (f"raw T x, {_GEOMETRY}", "T cols",
               f"cols = gm_im2col_at(&x[0], i, {_ARGS})"),
    # img (B, C, H, W) <- col2im(cols), a gather: no atomics, deterministic
    "col2im": (f"raw T cols, {_GEOMETRY}", "T img",
               f"img = gm_col2im_at(&cols[0], i, {_ARGS})"),
    # the engine's channels-last twins (x (B, H, W, C)): cols in the (c, i, j) column order
    # above, or with taps_first in the (i, j, c) order of the NHWC windows
    "im2col_nhwc": (f"raw T x, {_GEOMETRY}, int32 taps_first", "T cols",
                    f"cols = gm_im2col_nhwc_at(&x[0], i, {_ARGS}, taps_first)"),
    # img (B, H, W, C) <- the adjoint of im2col_nhwc with taps_first, a gather
    "col2im_nhwc": (f"raw T cols, {_GEOMETRY}", "T img",
                    f"img = gm_col2im_nhwc_at(&cols[0], i, {_ARGS})"),
    # the same, times sigma' of the layer below from its output f at the pixel ("output"
    # mode, Remark 8): its backward in col2im's pass, the products ops.grad_from_output
    # would make next (the same bits), one pass over the maps fewer
    "col2im_nhwc_grad": (f"raw T cols, {_GEOMETRY}, T f, T alpha", "T img",
                         f"img = gm_col2im_nhwc_at(&cols[0], i, {_ARGS}) "
                         f"* gm_{{act}}_grad_from_output(f, alpha)"),
}


def geometry(layer: ConvGeometry, input_shape: tuple) -> tuple[int, ...]:
    """``(C, H, W, kh, kw, sh, sw, ph, pw, OH, OW)``, the ELEMENTWISE kernels' int32
    arguments in order, for a per-sample ``input_shape`` (C, H, W); a ValueError naming
    the layer if the input does not fit it."""
    _, OH, OW = layer.output_shape(input_shape)
    return (*input_shape, *layer.kernel_size, *layer.stride, *layer.padding, OH, OW)


def _window(n_out: int, size: int, stride: int, pad: int, offset: int):
    """For kernel offset ``offset`` along one axis: the output range [lo, hi) whose input
    index ``o*stride - pad + offset`` lies inside [0, size), and that input slice."""
    lo = max(0, -((offset - pad) // stride))  # ceil((pad - offset) / stride)
    hi = min(n_out, (size - 1 + pad - offset) // stride + 1)
    if hi <= lo:  # the offset reads only padding
        return lo, lo, slice(0, 0)
    start = lo * stride - pad + offset
    return lo, hi, slice(start, start + (hi - lo - 1) * stride + 1, stride)


def _check_buffer(layer: ConvGeometry, images, buffer, shape: tuple, name: str) -> None:
    """``buffer``, the ``name`` of ``images``, must have ``shape`` and their dtype."""
    if tuple(buffer.shape) != shape:
        raise ValueError(f"{layer}: the {name} must have shape {shape} for images of shape "
                         f"{tuple(images.shape)}, got {tuple(buffer.shape)}")
    if images.dtype != buffer.dtype:
        raise TypeError(f"{layer}: the images and the {name} must share one dtype, got "
                        f"{images.dtype} and {buffer.dtype}")


def _views(images, matrix, layer: ConvGeometry, what: str):
    """``matrix`` viewed as (B, OH, OW, C, kh, kw), and (OH, OW), after checking shapes."""
    if images.ndim != 4:
        raise ValueError(f"{layer}: {what} must be a (batch, {layer.c_in}, height, width) "
                         f"array, got shape {tuple(images.shape)}")
    B, (_, OH, OW) = images.shape[0], layer.output_shape(images.shape[1:])
    shape = (B * OH * OW, layer.c_in * layer.kernel_size[0] * layer.kernel_size[1])
    _check_buffer(layer, images, matrix, shape, "column matrix")
    return matrix.reshape(B, OH, OW, layer.c_in, *layer.kernel_size), OH, OW


def im2col(x: np.ndarray, layer: ConvGeometry, out: np.ndarray) -> np.ndarray:
    """``out <- im2col(x)`` for x (B, C, H, W); ``out`` is C-contiguous (B*OH*OW, K)."""
    if not out.flags.c_contiguous:  # its reshape would be a copy, and the result lost
        raise ValueError("im2col's out must be C-contiguous")
    view, OH, OW = _views(x, out, layer, "x")
    H, W = x.shape[2:]
    for i in range(layer.kernel_size[0]):
        h_lo, h_hi, ys = _window(OH, H, layer.stride[0], layer.padding[0], i)
        for j in range(layer.kernel_size[1]):
            w_lo, w_hi, xs = _window(OW, W, layer.stride[1], layer.padding[1], j)
            o = view[:, :, :, :, i, j]  # (B, OH, OW, C)
            # the padding: output positions whose pixel lies outside the image
            o[:, :h_lo] = 0
            o[:, h_hi:] = 0
            o[:, h_lo:h_hi, :w_lo] = 0
            o[:, h_lo:h_hi, w_hi:] = 0
            np.copyto(o[:, h_lo:h_hi, w_lo:w_hi], x[:, :, ys, xs].transpose(0, 2, 3, 1))
    return out


def col2im(cols: np.ndarray, layer: ConvGeometry, out: np.ndarray) -> np.ndarray:
    """``out <- col2im(cols)``, the adjoint of :func:`im2col`: ``out`` (B, C, H, W) gets,
    per pixel, the sum of the entries of ``cols`` (B*OH*OW, K) that read that pixel."""
    view, OH, OW = _views(out, cols, layer, "out")
    H, W = out.shape[2:]
    out.fill(0)
    for i in range(layer.kernel_size[0]):
        h_lo, h_hi, ys = _window(OH, H, layer.stride[0], layer.padding[0], i)
        for j in range(layer.kernel_size[1]):
            w_lo, w_hi, xs = _window(OW, W, layer.stride[1], layer.padding[1], j)
            part = view[:, h_lo:h_hi, w_lo:w_hi, :, i, j].transpose(0, 3, 1, 2)
            out[:, :, ys, xs] += part
    return out


def pad_into(x, padded, low) -> None:
    """``padded <- x`` inside a zero border, both (B, H, W, ...) (an NCHW pair as
    ``.transpose(0, 2, 3, 1)`` views): ``low`` = (top, left) rows and columns of zeros
    before x, the rest of padded's after it."""
    (top, left), (H, W) = low, x.shape[1:3]
    padded[:, :top] = 0
    padded[:, top + H:] = 0
    padded[:, top:top + H, :left] = 0
    padded[:, top:top + H, left + W:] = 0
    padded[:, top:top + H, left:left + W] = x


class ShiftedTaps(NamedTuple):
    """A convolution on NHWC maps as one GEMM per kernel offset, each on a shifted view
    of the input's stride-phase planes -- no column buffer (:func:`shifted_taps`)."""

    grid: tuple[int, int]  # (Mh, Mw): the cells of each phase plane (_phase_grid)
    taps: tuple            # per offset (i, j): (i, j, phase a*sw + b, shift in cells)
    reach: int             # the largest shift: the cells a GEMM leaves out at the end


def shifted_taps(layer: ConvGeometry, input_shape: tuple) -> ShiftedTaps:
    """The NHWC input (B, H, W, C) of ``layer`` padded splits into sh*sw phase planes
    (:func:`to_phases`), plane (a, b) holding the padded pixels (a + sh m, b + sw k) at
    cell (m, k) of a (Mh, Mw) grid. Kernel offset (i, j) of output (oh, ow) reads padded
    pixel (sh oh + i, sw ow + j): cell (oh + i // sh, ow + j // sw) of plane (i % sh,
    j % sw). So with the planes and the output both flat over (B, Mh, Mw) cells, offset
    (i, j) is one GEMM of the plane's rows from ``shift = (i // sh) Mw + j // sw`` on --
    ``out[p] += plane[p + shift] W[:, :, i, j]^T`` for every cell p < B Mh Mw - reach --
    and the outputs are the cells (oh, ow) < (OH, OW); the others read across a row or a
    sample, and are dropped. The adjoint adds ``T W[:, :, i, j]`` into the planes at the
    same shifts, from T put in the grid with zeros in the other cells. A grid cell p
    with oh < OH and ow < OW has p + reach < B Mh Mw: (OH - 1) + (kh - 1) // sh < Mh."""
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    layer.output_shape(input_shape)  # a ValueError naming the layer if it does not fit
    Mh, Mw = _phase_grid(layer, input_shape[1:])
    taps = tuple((i, j, (i % sh) * sw + j % sw, (i // sh) * Mw + j // sw)
                 for i in range(kh) for j in range(kw))
    return ShiftedTaps((Mh, Mw), taps, max(t[3] for t in taps))


def _phase_parts(layer: ConvGeometry, hw):
    """``(phase, pixels, (m, k))`` for each phase plane holding image pixels: the image's
    pixels of that phase, ``out[:, pixels]``, lie in the plane from cell (m, k) on."""
    (sh, sw), (ph, pw) = layer.stride, layer.padding
    for a in range(sh):  # the image's rows h with (h + ph) % sh == a, at (h + ph) // sh
        h = (a - ph) % sh
        for b in range(sw):
            w = (b - pw) % sw
            if h < hw[0] and w < hw[1]:
                yield a * sw + b, (slice(h, None, sh), slice(w, None, sw)), \
                    ((h + ph) // sh, (w + pw) // sw)


def _check_planes(images, planes, layer: ConvGeometry, what: str) -> None:
    """The NHWC ``images`` (B, H, W, c_in) and ``planes`` (sh*sw, B, Mh, Mw, c_in) must
    fit ``layer`` and each other; else a ValueError or TypeError naming them."""
    _check_nhwc(images, layer, what)
    B, H, W, C = images.shape
    shape = (layer.stride[0] * layer.stride[1], B,
             *shifted_taps(layer, (C, H, W)).grid, C)
    _check_buffer(layer, images, planes, shape, "phase planes")


def to_phases(x, layer: ConvGeometry, planes) -> None:
    """``planes`` (sh*sw, B, Mh, Mw, C) <- the NHWC ``x`` (B, H, W, C) padded, split into
    its stride phases (:func:`shifted_taps`): zeros in the cells no pixel reaches."""
    _check_planes(x, planes, layer, "x")
    filled = set()
    for phase, pixels, low in _phase_parts(layer, x.shape[1:3]):
        pad_into(x[:, pixels[0], pixels[1]], planes[phase], low)
        filled.add(phase)
    for phase in set(range(len(planes))) - filled:  # a stride longer than the image
        planes[phase].fill(0)


def from_phases(planes, layer: ConvGeometry, out) -> None:
    """``out`` (B, H, W, C) <- the image's pixels of ``planes`` (sh*sw, B, Mh, Mw, C):
    the inverse of :func:`to_phases`, the padding's cells dropped."""
    _check_planes(out, planes, layer, "out")
    for phase, pixels, (m, k) in _phase_parts(layer, out.shape[1:3]):
        part = out[:, pixels[0], pixels[1]]
        np.copyto(part, planes[phase][:, m:m + part.shape[1], k:k + part.shape[2]])


def im2col_transposed(x: np.ndarray, layer: ConvGeometry, out: np.ndarray,
                      padded=None) -> np.ndarray:
    """``out <- im2col(x)^T`` for x (B, C, H, W): the (K, B*OH*OW) C-contiguous matrix
    whose row (c*kh + i)*kw + j holds ``x[b, c, oh*sh - ph + i, ow*sw - pw + j]`` over
    (b, oh, ow). Each kernel offset is one copy of (C, B, OH, OW) that moves runs of OW
    values (with stride 1), where :func:`im2col`'s rows take C*kh*kw values a pixel, a
    value at a time: 4-6x faster for the few channels of a network's input (NumPy only).
    A padding layer reads the offsets from ``padded`` (n, C, H + 2 ph, W + 2 pw), which
    gets ``x`` inside a zero border, n samples at a time; without it the zeros are
    written offset by offset."""
    if x.ndim != 4:
        raise ValueError(f"{layer}: x must be a (batch, {layer.c_in}, height, width) array, "
                         f"got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    _, OH, OW = layer.output_shape((C, H, W))
    if x.dtype != out.dtype:
        raise TypeError(f"{layer}: images and columns must share one dtype, got "
                        f"{x.dtype} and {out.dtype}")
    if out.shape != (C * kh * kw, B * OH * OW) or not out.flags.c_contiguous:
        raise ValueError(f"{layer}: the transposed column matrix must be C-contiguous of "
                         f"shape {(C * kh * kw, B * OH * OW)}, got {tuple(out.shape)}")
    view = out.reshape(C, kh, kw, B, OH, OW)
    if padded is not None and (ph or pw):
        if padded.ndim != 4 or padded.shape[1:] != (C, H + 2 * ph, W + 2 * pw):
            raise ValueError(f"{layer}: padding needs a buffer of shape "
                             f"(n, {C}, {H + 2 * ph}, {W + 2 * pw})")
        n = len(padded)
        for first in range(0, B, n):
            samples = slice(first, first + n)
            block = padded[:len(x[samples])]
            pad_into(x[samples].transpose(0, 2, 3, 1), block.transpose(0, 2, 3, 1), (ph, pw))
            # every kernel offset in one copy of a strided view (C, kh, kw, n, OH, OW):
            # 1.1-1.5x faster than a copy per offset
            s = block.strides
            np.copyto(view[:, :, :, samples], np.lib.stride_tricks.as_strided(
                block, (C, kh, kw, len(block), OH, OW),
                (s[1], s[2], s[3], s[0], s[2] * sh, s[3] * sw), writeable=False))
        return out
    for i in range(kh):
        h_lo, h_hi, ys = _window(OH, H, sh, ph, i)
        for j in range(kw):
            w_lo, w_hi, xs = _window(OW, W, sw, pw, j)
            o = view[:, i, j]  # (C, B, OH, OW)
            o[:, :, :h_lo] = 0
            o[:, :, h_hi:] = 0
            o[:, :, h_lo:h_hi, :w_lo] = 0
            o[:, :, h_lo:h_hi, w_hi:] = 0
            np.copyto(o[:, :, h_lo:h_hi, w_lo:w_hi], x[:, :, ys, xs].transpose(1, 0, 2, 3))
    return out


# --- channels last: the engine's layout -----------------------------------------------------
#
# The engine keeps a convolution's activations as NHWC (B, H, W, C), the rows of its GEMM
# (gpu_mlp.layers.ChannelsLast). Its im2col reads the NHWC windows through one strided
# view, so each copy moves runs of C (or kw*C) contiguous values, not single pixels.

def _check_nhwc(images, layer: ConvGeometry, what: str) -> None:
    if images.ndim != 4 or images.shape[3] != layer.c_in:
        raise ValueError(f"{layer}: {what} must be a (batch, height, width, {layer.c_in}) "
                         f"array, got shape {tuple(images.shape)}")


def _nhwc(images, matrix, layer: ConvGeometry, what: str):
    """(B, OH, OW) of the NHWC ``images`` for ``layer``, after checking the shapes."""
    _check_nhwc(images, layer, what)
    B, H, W, C = images.shape
    _, OH, OW = layer.output_shape((C, H, W))
    shape = (B * OH * OW, C * layer.kernel_size[0] * layer.kernel_size[1])
    if tuple(matrix.shape) != shape or not matrix.flags.c_contiguous:
        raise ValueError(f"{layer}: the column matrix must be C-contiguous of shape {shape} "
                         f"for images of shape {tuple(images.shape)}, got {tuple(matrix.shape)}")
    return B, OH, OW


def windows(x, layer: ConvGeometry, padded=None):
    """The NHWC batch ``x`` (B, H, W, C) as its windows (B, OH, OW, kh, kw, C): entry
    ``[b, oh, ow, i, j, c]`` is ``x[b, oh*sh - ph + i, ow*sw - pw + j, c]``, 0 outside the
    image. A strided view of ``x``; with padding, of ``padded`` (B, H + 2 ph, W + 2 pw,
    C), which gets ``x`` inside a zero border."""
    B, H, W, C = x.shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    _, OH, OW = layer.output_shape((C, H, W))
    if ph or pw:
        if padded is None or padded.shape != (B, H + 2 * ph, W + 2 * pw, C):
            raise ValueError(f"{layer}: padding needs a buffer of shape "
                             f"{(B, H + 2 * ph, W + 2 * pw, C)}")
        pad_into(x, padded, (ph, pw))
        x = padded
    s = x.strides
    return strided_view(x, (B, OH, OW, kh, kw, C),
                        (s[0], s[1] * sh, s[2] * sw, s[1], s[2], s[3]))


def strided_view(x, shape, strides, offset: int = 0):
    """A read-only view of ``x``'s memory from ``offset`` bytes on, of ``shape`` and
    ``strides`` (bytes), as ``np.lib.stride_tricks.as_strided(..., writeable=False)``.
    A C-contiguous ``x`` (the engine's buffers) gets it from the ndarray constructor,
    which also checks that the view stays inside x: 0.3 us where as_strided's Python
    takes 2.4 us (twice a step of a padding convolution)."""
    if x.flags.c_contiguous:
        view = np.ndarray(shape, x.dtype, x, offset, strides)
        view.flags.writeable = False
        return view
    if offset:
        raise ValueError("strided_view: an offset needs a C-contiguous array")
    return np.lib.stride_tricks.as_strided(x, shape, strides, writeable=False)


def im2col_nhwc(x, layer: ConvGeometry, out, taps_first: bool, padded=None):
    """``out <- rows(x)`` for the NHWC ``x``: (B*OH*OW, K), its columns in the order
    (c, i, j) of :func:`im2col` (``W``'s own), or with ``taps_first`` in the windows'
    order (i, j, c), one copy of contiguous runs. A padding layer reads the windows of
    ``padded`` (see :func:`windows`), or without it writes the zeros of the padding
    itself, kernel offset by kernel offset."""
    B, OH, OW = _nhwc(x, out, layer, "x")
    (kh, kw), C = layer.kernel_size, layer.c_in
    view = out.reshape((B, OH, OW, kh, kw, C) if taps_first else (B, OH, OW, C, kh, kw))
    if padded is None and any(layer.padding):
        H, W = x.shape[1:3]
        for i in range(kh):
            h_lo, h_hi, ys = _window(OH, H, layer.stride[0], layer.padding[0], i)
            for j in range(kw):
                w_lo, w_hi, xs = _window(OW, W, layer.stride[1], layer.padding[1], j)
                o = view[:, :, :, i, j] if taps_first else view[..., i, j]
                o[:, :h_lo] = 0
                o[:, h_hi:] = 0
                o[:, h_lo:h_hi, :w_lo] = 0
                o[:, h_lo:h_hi, w_hi:] = 0
                np.copyto(o[:, h_lo:h_hi, w_lo:w_hi], x[:, ys, xs])
        return out
    w = windows(x, layer, padded)
    if taps_first:
        np.copyto(view, w)
        return out
    for i in range(kh):  # kh*kw copies of runs of C
        for j in range(kw):
            np.copyto(view[..., i, j], w[:, :, :, i, j])
    return out


def col2im_scratch(layer: ConvGeometry, input_shape: tuple) -> int | None:
    """The values of the scratch buffer :func:`col2im_nhwc` takes for one sample of
    ``input_shape`` (C, H, W), or None where col2im sums without it: windows that tile
    the image (one copy), and a stride longer than the kernel, which :func:`_col2im_flat`
    cannot take (a phase no kernel offset reaches would keep the scratch's old values)."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    if ((sh, sw) == (kh, kw) and not ph and not pw) or sh > kh or sw > kw:
        return None
    Mh, Mw = _phase_grid(layer, input_shape[1:])
    return (sh * sw + 1) * Mh * Mw * input_shape[0]


def _phase_grid(layer: ConvGeometry, hw) -> tuple[int, int]:
    """(Mh, Mw), the cells of a phase of :func:`_col2im_flat`: the windows' (OH, OW)
    and the kernel's reach beyond them, or the image's pixels of that phase if more (a
    stride can leave the last rows unread)."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    _, OH, OW = layer.output_shape((layer.c_in, *hw))
    return (max(OH + (kh - 1) // sh, (hw[0] - 1 + ph) // sh + 1),
            max(OW + (kw - 1) // sw, (hw[1] - 1 + pw) // sw + 1))


def col2im_nhwc(cols, layer: ConvGeometry, out, scratch=None):
    """``out`` (B, H, W, C) <- the adjoint of :func:`im2col_nhwc` with ``taps_first``:
    per pixel the sum of the entries of ``cols`` that read it, added in the order of the
    CUDA gather ``gm_col2im_nhwc_at``. ``scratch``: a buffer of at least B times
    :func:`col2im_scratch` values, for the faster sums (:func:`_col2im_flat`)."""
    B, OH, OW = _nhwc(out, cols, layer, "out")
    H, W = out.shape[1:3]
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    view = cols.reshape(B, OH, OW, kh, kw, layer.c_in)
    if (sh, sw) == (kh, kw) and not ph and not pw:  # the windows tile the image: one copy
        out[:, OH * kh:] = 0
        out[:, :OH * kh, OW * kw:] = 0
        tiles = out[:, :OH * kh, :OW * kw].reshape(B, OH, kh, OW, kw, layer.c_in)
        np.copyto(tiles, view.transpose(0, 1, 3, 2, 4, 5))
        return out
    need = col2im_scratch(layer, (layer.c_in, H, W))
    if scratch is not None and need is not None:
        if scratch.size < B * need or scratch.dtype != out.dtype:
            raise ValueError(f"{layer}: col2im's scratch must hold {B * need} values of "
                             f"{out.dtype}, got {scratch.size} of {scratch.dtype}")
        return _col2im_flat(view, layer, out, scratch.reshape(-1)[:B * need])
    out.fill(0)
    for i in range(kh):
        h_lo, h_hi, ys = _window(OH, H, sh, ph, i)
        for j in range(kw):
            w_lo, w_hi, xs = _window(OW, W, sw, pw, j)
            out[:, ys, xs] += view[:, h_lo:h_hi, w_lo:w_hi, i, j]
    return out


def _col2im_flat(view, layer: ConvGeometry, out, scratch):
    """:func:`col2im_nhwc`'s sums with every add one contiguous 1-D ufunc call, where
    ``out[:, ys, xs] += view[..., i, j, :]`` reads and writes strided blocks that NumPy
    copies through its buffers (3x a copy's time): 1.2-1.6x faster, and 1.1x in a step
    of the digits CNN, where ``cols`` comes from the GEMM out of cache.

    Pixel (h, w) is the pixel (h + ph, w + pw) of the padded image, whose rows and columns
    split into phases mod the stride: the kernel offset (i, j) of window (oh, ow) lands in
    phase (i % sh, j % sw) at (oh + i // sh, ow + j // sw). Each phase is accumulated as a
    (B, Mh, Mw, C) array (:func:`_phase_grid`): offset (i, j)'s values, copied into
    ``S`` of that shape whose cells outside the (OH, OW) windows stay 0, are then added to
    it flat, shifted by (i // sh, j // sw) cells -- the zeros run over into cells no
    window reaches or the next sample's first ones, adding 0 to sums that are never -0
    (they start at +0): the offsets are added in order from 0 as ever, the same bits.
    The phases are then copied into their pixels."""
    B, OH, OW, kh, kw, C = view.shape
    sh, sw = layer.stride
    Mh, Mw = _phase_grid(layer, out.shape[1:3])
    n = B * Mh * Mw * C
    phases, S = scratch[:sh * sw * n].reshape(sh, sw, n), scratch[sh * sw * n:]
    windows = S.reshape(B, Mh, Mw, C)
    windows[:, OH:] = 0
    windows[:, :OH, OW:] = 0
    for i in range(kh):
        for j in range(kw):
            np.copyto(windows[:, :OH, :OW], view[:, :, :, i, j])
            shift = ((i // sh) * Mw + j // sw) * C
            phase = phases[i % sh, j % sw]
            if i < sh and j < sw:  # the phase's first offset, shift 0: the sums from +0
                np.add(S, 0, out=phase)
            else:
                np.add(phase[shift:], S[:n - shift], out=phase[shift:])
    from_phases(phases.reshape(sh * sw, B, Mh, Mw, C), layer, out)
    return out
