"""The engine's operations, each with its CUDA kernel and its NumPy twin side by side.

Every operation works in place on arrays the engine owns: on CuPy arrays it launches a
kernel built from ``kernels/`` (``ELEMENTWISE`` below lists the elementwise ones as
data: ``kernel_template`` makes each a ``__global__`` template, and the tests compile the
very same bodies for the host; every kernel of a dtype is in one module, compiled by
NVRTC once -- ``_function``), on NumPy arrays it
runs the twin, which calls the same row of the activation or loss table. Matrix work
goes to BLAS with ``beta``: cuBLAS called directly (``cublas``: capturable into a CUDA
graph), and on the CPU SciPy's BLAS
on Fortran-ordered views of our C-ordered arrays, which is what lets ``W -= lr dJ/dW``
be one GEMM straight into ``W`` with no gradient buffer on either backend.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import numpy as np
from scipy.linalg import blas as _blas

from . import _checks, activations, conv, cublas, cuda

# the gathers' body: element i of out, in row r of its rows (64-bit: rows * width may
# pass 2^32 in a large data set)
_GATHER = ("long long r = (long long)i / width; "
           "out = data[order[at[0] + r] * width + ((long long)i - r * width)]")

# a weight gradient's taps (d_out, kh, kw, c_in), in the windows' column order, into g
# (d_out, c_in, kh, kw), W's: g <- taps + BETA g, g not read where BETA is 0 (BLAS's
# rule, as cuBLAS's beta: NaN in g stays out)
_WEIGHT_ORDER = ("long long per = kh * kw * c_in, d = (long long)i / per, "
                 "rest = (long long)i - d * per, c = rest / (kh * kw), "
                 "yx = rest - c * (kh * kw); T moved = taps[d * per + yx * c_in + c]; "
                 "g = BETA == (T)0 ? moved : BETA * g + moved")

# name: (in_params, out_params, operation); "{act}" is an activation's table name.
ELEMENTWISE = {
    # forward, "output" mode: A <- sigma(A + b), in place
    "bias_act": ("T bias, T alpha", "T a", "a = gm_{act}(a + bias, alpha)"),
    # forward, "recompute" mode: keep A <- A + b, write F = sigma(A)
    "bias_act_keep": ("T bias, T alpha", "T a, T f", "a = a + bias; f = gm_{act}(a, alpha)"),
    # forward, "store_both" mode: F = sigma(A + b), and A becomes D = sigma'(A + b)
    "bias_act_grad": ("T bias, T alpha", "T a, T f",
                      "T z = a + bias; f = gm_{act}(z, alpha); a = gm_{act}_grad(z, alpha)"),
    # backward, "output" mode: Delta *= sigma'(F), from the output alone
    "grad_from_output": ("T f, T alpha", "T delta",
                         "delta = delta * gm_{act}_grad_from_output(f, alpha)"),
    # backward, "recompute" mode: A becomes F = sigma(A), and Delta *= sigma'(A)
    "recompute_grad": ("T alpha", "T a, T delta",
                       "T z = a; a = gm_{act}(z, alpha); delta = delta * gm_{act}_grad(z, alpha)"),
    # backward, "store_both" mode: Delta *= D
    "mul": ("T d", "T delta", "delta = delta * d"),
    # losses: per-element loss and scale * dl/df in one pass
    "squared": ("T f, T y, T scale", "T grad, T loss", "loss = gm_squared(f, y, scale, grad)"),
    "logistic": ("T f, T y, T scale", "T grad, T loss", "loss = gm_logistic(f, y, scale, grad)"),
    # convolutions: im2col and its adjoint col2im (gpu_mlp/conv.py)
    **conv.ELEMENTWISE,
    # optimizers (gpu_mlp/optim.py): one fused update of a flat parameter tensor w from
    # its gradient g (the one scratch buffer) and its state, in place; the scalars that
    # change from step to step (a schedule's lr, Adam's bias corrections, AdamW's decay)
    # are read by pointer, a one-element array each, so a captured step sees its own
    "sgd_momentum": ("T g, raw T lr, T momentum, T weight_decay, int32 nesterov",
                     "T w, T buf",
                     "gm_sgd_momentum(w, buf, g, lr[0], momentum, weight_decay, nesterov)"),
    "adam": ("T g, T one_minus_beta1, T beta2, T one_minus_beta2, raw T eps, T weight_decay, "
             "raw T decay, raw T step_size, raw T bias_correction2_sqrt", "T w, T m, T v",
             "gm_adam(w, m, v, g, one_minus_beta1, beta2, one_minus_beta2, eps[0], "
             "weight_decay, decay[0], step_size[0], bias_correction2_sqrt[0])"),
    # plain SGD with decoupled decay on a flat w, when the gradient g is already a buffer
    "sgd": ("T g, raw T lr, raw T decay", "T w", "w = decay[0] * w - lr[0] * g"),
    # an empty product with a device beta (a GEMM over k = 0): w <- beta w, and with beta
    # 0 zeros, w not read (BLAS's rule: NaN in w stays out); by pointer, as cuBLAS's beta
    "scale": ("raw T beta", "T w", "w = beta[0] == (T)0 ? (T)0 : beta[0] * w"),
    # a loss's terms clamped in place (Loss.clip: scikit-learn's clipped log-loss); NaN
    # stays NaN, as np.clip keeps it
    "clamp": ("T low, T high", "T x", "x = x < low ? low : (x > high ? high : x)"),
    # DP's Gram-form norms (gpu_mlp.norms._gram_bound): the inner product kept where its
    # rounding error e = t x coef is within "trusted" of it, else max(inner, 0) + e (an
    # upper bound); 0 where T_i = 0 (t = 0). A NaN inner product is untrusted: it becomes e
    "gram_bound": ("T t, T x, T coef, T trusted", "T inner",
                   "T error = t * x * coef; T bound = fmax(inner, (T)0) + error; "
                   "if (!(error <= inner * trusted)) inner = bound; "
                   "if (t == (T)0) inner = (T)0"),
    # DP's clipping factors from the per-sample squared norms, in place (privacy._Private):
    # s <- scale / max(sqrt(s), clip), the maximum NaN-propagating as CuPy's
    "clip_factor": ("T clip, T scale", "T s", "s = scale / gm_max_nan(sqrt(s), clip)"),
    # a batch's rows of device-resident data, found through a cursor on the device
    # (gpu_mlp.graph.Cursor): out row r is data row order[at[0] + r], rows ``width``
    # elements long (float data, and class labels); then the cursor's position moved on
    "gather": ("raw T data, raw int64 order, raw int64 at, int64 width", "T out", _GATHER),
    "gather_labels": ("raw int64 data, raw int64 order, raw int64 at, int64 width",
                      "int64 out", _GATHER),
    # accuracy (gpu_mlp.losses): hit = 1 where row i's largest output is its label (or
    # its target row's largest entry), else 0; a thread a row of ``width`` outputs
    "class_hit": ("raw T f, raw int64 label, int64 width", "T hit",
                  "hit = gm_argmax(f + (long long)i * width, width) == label[i] ? (T)1 : (T)0"),
    "class_hit_targets": ("raw T f, raw T y, int64 width", "T hit",
                          "hit = gm_argmax(f + (long long)i * width, width) == "
                          "gm_argmax(y + (long long)i * width, width) ? (T)1 : (T)0"),
    # the windows' order into W's (to_weight_order): beta a number, or read by pointer
    "to_weight_order": ("raw T taps, int64 kh, int64 kw, int64 c_in, T beta", "T g",
                        _WEIGHT_ORDER.replace("BETA", "beta")),
    "to_weight_order_by": ("raw T taps, int64 kh, int64 kw, int64 c_in, raw T beta", "T g",
                           _WEIGHT_ORDER.replace("BETA", "beta[0]")),
    # DP's per-sample norms and clipping (gpu_mlp.norms, gpu_mlp.privacy): squares, and
    # each sample's rows scaled by its factor (x viewed as (1, B, rest): a column each)
    "square": ("T a", "T s", "s = a * a"),
    "scale_rows": ("T factor", "T x", "x = x * factor"),
    # a counter moved on, in place: the cursor's position, the steps' counters (a
    # captured step counts itself)
    "advance": ("int64 by", "int64 c", "c = c + by"),
    # value checks (finite, losses' targets): flag[0] = 1 if x holds a NaN or an Inf (x - x
    # is 0 for every finite x, NaN for both), or a logistic label other than -1 and +1, or
    # a target row (of s's rows, ``width`` long; s gets its sum) negative somewhere or not
    # summing to 1 within np.allclose's tolerance; x and y, the launch's shape, only read
    "flag_nonfinite": ("", "T x, raw T flag", "if (!(x - x == (T)0)) flag[0] = (T)1"),
    "flag_not_sign": ("", "T x, raw T flag",
                      "if (!(x == (T)1 || x == (T)-1)) flag[0] = (T)1"),
    "flag_not_probabilities": ("raw T y, int64 width", "T s, raw T flag",
                               "const T* row = y + (long long)i * width; T total = (T)0; "
                               "bool negative = false; for (long long c = 0; c < width; ++c) "
                               "{{ total += row[c]; negative = negative || row[c] < (T)0; }} "
                               "s = total; if (negative || !(fabs(total - (T)1) <= "
                               "(T)(1e-3 + 1e-5))) flag[0] = (T)1"),
    # logistic accuracy: hit = 1 where the output's sign is the label's
    "sign_hit": ("T f, T y", "T hit", "hit = (f > (T)0) == (y > (T)0) ? (T)1 : (T)0"),
    # a running sum (gpu_mlp.plan.LossTally): total += scale * loss + penalty * squares,
    # compensated (Kahan): carry holds what total's rounding dropped, taken back next time
    "tally": ("T loss, T squares, T scale, T penalty", "T total, T carry",
              "T y = scale * loss + penalty * squares - carry; T t = total + y; "
              "carry = (t - total) - y; total = t"),
    # a step's scalars: row gm_step_row(counters[0] - counters[2]) of a table of rows
    # (gpu_mlp/plan.py: StepScalars), by the device's step counter
    "step_scalars": ("raw T table, raw int64 counters, int32 rows", "T s",
                     "s = table[gm_step_row(counters[0] - counters[2], rows) * gm_n + i]"),
    # DP-SGD's noise (kernels/noise.cuh): w += scale N(0, 1), element i's normal from a
    # counter-based generator keyed by the seed, at (stream, step); in place, no buffer
    # (scale and step by pointer: the DP's step counter lives on the device)
    "gaussian_noise": ("raw T scale, uint32 key0, uint32 key1, uint32 stream, raw int64 step",
                       "T w",
                       "gm_gaussian_noise(w, scale[0], i, key0, key1, stream, "
                       "(unsigned int)step[0], (unsigned int)((unsigned long long)step[0] >> 32))"),
}


# How ops passes each ELEMENTWISE parameter, by name: ``alpha`` and ``scale``, and every
# input of a fixed integer type (int32, int64, uint32), are scalars; ``bias`` is a
# (d,) vector broadcast over the rows; a ``raw`` array is indexed by the body itself;
# anything else is shaped as the output. The host tests and the NVRTC check read this,
# not their own guesses.
SCALAR_PARAMS = ("alpha", "scale", "low", "high", "penalty", "clip", "coef", "trusted",
                 # the optimizers' hyperparameters and step scalars
                 "lr", "momentum", "weight_decay", "one_minus_beta1", "beta2",
                 "one_minus_beta2", "eps", "decay", "step_size", "bias_correction2_sqrt",
                 "beta")
COLUMN_PARAMS = ("bias", "factor")


def param_layout(name: str, integer: bool, raw: bool, output: bool = False) -> str:
    """``"scalar"``, ``"raw"``, ``"column"`` or ``"full"`` (see above);
    ``integer``: declared an integer type (int32, int64, uint32) rather than T;
    ``output``: written by the kernel (an array, whatever its type)."""
    if raw:
        return "raw"
    if name in SCALAR_PARAMS or (integer and not output):
        return "scalar"
    return "column" if name in COLUMN_PARAMS else "full"


def is_numpy(a) -> bool:
    return isinstance(a, np.ndarray)


# The NumPy dtype of each ELEMENTWISE parameter type (None: T, the arrays' float type),
# and the C type the kernel gives it.
PARAM_DTYPES = {"T": None, "int32": np.dtype(np.int32), "int64": np.dtype(np.int64),
                "uint32": np.dtype(np.uint32)}
_C_TYPES = {"T": "T", "int32": "int", "int64": "long long", "uint32": "unsigned int"}


class Param(NamedTuple):
    """One parameter of an ``ELEMENTWISE`` kernel, as its entry declares it."""

    name: str
    type: str     # "T", "int32", "int64" or "uint32", as CuPy spells them
    raw: bool     # CuPy's "raw": the body indexes it itself
    output: bool

    @property
    def kind(self) -> str:
        """``param_layout``'s answer: how ops passes it."""
        return param_layout(self.name, self.type != "T", self.raw, self.output)

    def dtype(self, float_dtype) -> np.dtype:
        return PARAM_DTYPES[self.type] or np.dtype(float_dtype)

    def ctype(self, float_ctype: str = "T") -> str:
        return float_ctype if self.type == "T" else _C_TYPES[self.type]


@functools.cache
def signature(op: str) -> tuple[Param, ...]:
    """An op's parameters, inputs then outputs, as ``ELEMENTWISE`` declares them."""
    in_params, out_params, _ = ELEMENTWISE[op]
    params = []
    for declared, output in ((in_params, False), (out_params, True)):
        for words in (p.split() for p in declared.split(",") if p.strip()):
            raw = words[0] == "raw"
            type_, name = words[1:] if raw else words
            if type_ not in PARAM_DTYPES:
                raise ValueError(f"{op}: a parameter of type {type_!r} is not supported")
            params.append(Param(name, type_, raw, output))
    return tuple(params)


def elementwise_pairs() -> list[tuple[str, str | None]]:
    """Every (op, activation name) the engine launches; None for ops without ``{act}``."""
    pairs = []
    for op, (_, _, body) in ELEMENTWISE.items():
        if "{act}" not in body:
            pairs.append((op, None))
            continue
        for kind in activations.TABLE.values():
            # softmax goes to the row kernels; an activation without a derivative from
            # its output never reaches the "output"-mode backward
            if kind.rowwise or ("_grad_from_output" in body and kind.grad_from_output is None):
                continue
            pairs.append((op, kind.name))
    return pairs


def kernel_name(op: str, act: str | None) -> str:
    # kernel names must not clash with the gm_* device functions they call
    return f"gpu_mlp_{op}_{act}" if act else f"gpu_mlp_{op}"


# How a kernel reads element i's value of a parameter of each layout, for an output of
# n elements (B, channels, *inner): as CuPy broadcasts the engine's bias, (d,) over
# (B, d) or (c, 1, 1) over (B, c, H, W).
_ELEMENT = {"full": "i", "column": "i / gm_inner % gm_channels"}


# Element indices are 32-bit where the output has at most this many elements, as CuPy's
# own ElementwiseKernels index below 2^31: a GPU's 64-bit integer division is a software
# routine several times a 32-bit one's cost, and a bias's column, im2col and col2im take
# several a element. 2^30, not 2^31: i plus the grid's stride (each at most n + 127 for
# such n, _grid) stays below 2^32 in the unsigned index.
INDEX32_MAX = 1 << 30


def kernel_parts(op: str, act: str | None, arg_type: str = "T") -> tuple[list, list]:
    """The ``ELEMENTWISE`` entry ``op`` for ``act`` as ``(arguments, loop body)``: the
    arguments n, channels and inner (``long long gm_n_``, ...; see _ELEMENT and
    :func:`index_loop`), then the entry's parameters (floats as ``arg_type``); the body
    the lines element ``i`` runs, inputs as ``const`` values, outputs as references,
    ``raw`` arrays as pointers -- as CuPy's ElementwiseKernel would run it. The device
    kernel and the tests' host loop are both built from it."""
    args = ["long long gm_n_", "long long gm_channels_", "long long gm_inner_"]
    element = []
    for p in signature(op):
        const = "" if p.output else "const "
        if p.kind == "scalar":
            args.append(f"const {p.ctype(arg_type)} {p.name}")
        elif p.kind == "raw":
            args.append(f"{const}{p.ctype(arg_type)}* {p.name}")
        else:
            args.append(f"{const}{p.ctype(arg_type)}* {p.name}_")
            element.append(f"{p.ctype()}& {p.name} = {p.name}_[{_ELEMENT[p.kind]}];" if p.output
                           else f"const {p.ctype()} {p.name} = {p.name}_[{_ELEMENT[p.kind]}];")
    element.append(ELEMENTWISE[op][2].format(act=act or "") + ";")
    return args, element


def index_loop(element: list, index: str, first: str = "0", stride: str = "1",
               indent: str = "    ", device: bool = False) -> str:
    """A loop of the body ``element`` (:func:`kernel_parts`) over i in [first, n) by
    ``stride``, its index and sizes (``gm_n``, ``gm_channels``, ``gm_inner``) of the C
    type ``index``: ``"unsigned int"`` up to INDEX32_MAX elements, else ``"long long"``
    (im2col's and col2im's functions take the index's type as theirs)."""
    inner = indent + "    "
    sizes = ["gm_n"] + [name for name in ("gm_channels", "gm_inner")  # those it reads
                        if any(name in line for line in element)]
    return (f"{indent}{{\n"
            f"{inner}typedef {index} gm_index;\n"
            f"{inner}const gm_index {', '.join(f'{n} = (gm_index){n}_' for n in sizes)};\n"
            # one element per iteration: unrolling buys nothing here
            + (f"{inner}#pragma unroll 1\n" if device else "") +
            f"{inner}for (gm_index i = {first}; i < gm_n; i += {stride}) {{\n"
            + "".join(f"{inner}    {line}\n" for line in element) + f"{inner}}}\n{indent}}}\n")


def kernel_template(op: str, act: str | None) -> str:
    """The ``ELEMENTWISE`` entry ``op`` for ``act`` as a ``__global__`` template over
    ``T`` (:func:`kernel_parts`), in a grid-stride loop over the n elements of the
    output: 32-bit indices up to INDEX32_MAX elements, 64-bit beyond (one branch, the
    same for every thread). No pointer is ``__restrict__``: as with an ElementwiseKernel,
    an input may be an output."""
    args, element = kernel_parts(op, act)
    first, stride = "(gm_index)blockIdx.x * blockDim.x + threadIdx.x", \
        "(gm_index)gridDim.x * blockDim.x"
    return (f"template <typename T>\n__global__ void {kernel_name(op, act)}({', '.join(args)})\n"
            "{\n"
            f"    if (gm_n_ <= {INDEX32_MAX}LL)\n"
            + index_loop(element, "unsigned int", first, stride, "    ", device=True)
            + "    else\n"
            + index_loop(element, "long long", first, stride, "    ", device=True) + "}\n")


@functools.cache
def kernel_source() -> str:
    """Every ``ELEMENTWISE`` kernel the engine launches, as templates (kernel_template)."""
    return "\n".join(kernel_template(op, act) for op, act in elementwise_pairs())


def module_names(dtype) -> tuple[str, ...]:
    """What the one module of ``dtype`` instantiates: every row kernel and every
    ``ELEMENTWISE`` kernel for its C type."""
    ctype = cuda.CTYPES[np.dtype(dtype).name]
    kernels = [*cuda.ROW_KERNELS, *(kernel_name(op, act) for op, act in elementwise_pairs())]
    return tuple(f"{kernel}<{ctype}>" for kernel in kernels)


@functools.cache  # get_function looks the kernel up in the module: once is enough
def _function(name: str, dtype: str):
    """The ``__global__`` template ``name`` for ``dtype``, from the one module that holds
    every kernel of that dtype (one NVRTC compilation, one entry in CuPy's cache)."""
    module = cuda.module(kernel_source(), module_names(dtype))
    return module.get_function(f"{name}<{cuda.CTYPES[dtype]}>")


# The threads of a block, and the most blocks of a grid (CUDA's limit on x): the
# kernels loop over the elements, so a grid of any size covers them all.
KERNEL_THREADS = 128
_MAX_BLOCKS = (1 << 31) - 1


def _grid(n: int) -> tuple[tuple[int], tuple[int]]:
    """The launch geometry for n elements (or rows), one thread each: (grid, block)."""
    return (min((n + KERNEL_THREADS - 1) // KERNEL_THREADS, _MAX_BLOCKS),), (KERNEL_THREADS,)


@functools.cache
def _first_output(op: str) -> int:
    return next(k for k, p in enumerate(signature(op)) if p.output)


def _launch(op, act, *args, dtype=None):
    """Launch ``ELEMENTWISE[op]`` for ``act`` (or None) over its first output, its
    arguments in the entry's order: inputs, then outputs; from the module of the first
    output's dtype, or of ``dtype`` (the net's, for an output of integers: every module
    has the integer kernels too, and a first run compiles only its net's)."""
    out = args[_first_output(op)]
    n = out.size
    if n == 0:
        return  # as CuPy: nothing to launch
    channels, inner = (out.shape[1], n // (out.shape[0] * out.shape[1])) if out.ndim > 1 \
        else (n, 1)
    module = out.dtype.name if dtype is None else np.dtype(dtype).name
    kernel = _function(kernel_name(op, act.name if act is not None else None), module)
    kernel(*_grid(n), (np.int64(n), np.int64(channels), np.int64(inner), *args))


def _alpha(act, a):
    return a.dtype.type(act.alpha)


_NULL = np.uint64(0)  # a null pointer argument for a RawKernel (no bias)
# The widest row given to one thread: up to here the fused row kernels win (the batch
# gives the parallelism, each thread's row is a few cache lines); beyond, a thread per
# row reads uncoalesced and leaves the GPU idle, so a row gets ROW_LANES threads and its
# passes a launch each (rowwise.cuh, "wide rows"). Neither makes an array or reads the
# host, so a step with wide rows is captured too. (Chosen, not yet measured on a GPU.)
ROW_KERNEL_MAX = 32


def _launch_rows(name, rows, *args):
    """Launch a row-wise kernel over ``rows`` rows, one thread per row."""
    dtype = next(a.dtype for a in args if hasattr(a, "dtype") and a.dtype.kind == "f")
    if rows:
        _function(name, dtype.name)(*_grid(rows), args)


# NumPy cannot fuse, so a formula of several ufuncs makes temporaries as large as its
# input. The twins run on blocks of rows instead: their temporaries then have a block's
# size whatever the batch (a steady-state step allocates no array of batch size), and
# stay in cache between the ufuncs.
BLOCK_ELEMENTS = 1 << 14


_WHOLE = (slice(None),)


# Passes that make no temporary (a bias added, an in-place activation: Kind.in_place) run
# on blocks this long: an eighth of the ufunc calls, still in cache (float32: 512 KiB).
IN_PLACE_ELEMENTS = 8 * BLOCK_ELEMENTS


def _row_blocks(a, elements=BLOCK_ELEMENTS):
    """Slices of at most about ``elements`` elements over the rows of ``a``."""
    if a.size <= elements:
        return _WHOLE
    rows = a.shape[0]
    return _row_slices(rows, max(1, elements // (a.size // rows)))


@functools.lru_cache(maxsize=256)
def _row_slices(rows: int, step: int) -> tuple:
    """The slices of :func:`_row_blocks`, kept: the same few shapes come every step."""
    return tuple(slice(first, first + step) for first in range(0, rows, step))


def _bias_adder(a, bias):
    """A function that adds ``bias`` to each row of a block of ``a``'s rows, in place: as
    a row of it repeated to activations.LONG_ROW values (at most ``a``'s) where ``a`` is
    C-contiguous and that long, 2.4-3.5x faster than the broadcast bias (the same sums)."""
    if not (a.flags.c_contiguous and a.ndim == 2 and bias.shape == a.shape[1:]
            and bias.dtype == a.dtype and a.size >= activations.LONG_ROW):
        return lambda block: np.add(block, bias, out=block)
    reps = min(a.shape[0], -(-activations.LONG_ROW // a.shape[1]))
    row = np.empty((reps, a.shape[1]), a.dtype)
    row[...] = bias
    row = row.reshape(-1)
    return lambda block: activations.along_rows(np.add, block, row, block)


# --- activations ----------------------------------------------------------------------

def bias_act(act, a, bias, ws=None):
    """``a <- sigma(a + bias)`` (forward, "output" mode). ``ws``: the workspace that
    lends a row-wise activation's kernels their scratch on wide rows (GPU)."""
    if is_numpy(a):
        add = _bias_adder(a, bias)
        for rows in _row_blocks(a, IN_PLACE_ELEMENTS if act.kind.in_place else BLOCK_ELEMENTS):
            block = a[rows]
            add(block)
            if not act.kind.is_identity:  # its value would copy the block onto itself
                act.kind.value(block, act.alpha, block)
    elif act.kind.rowwise:
        ROW_ACTIVATIONS[act.name].forward(a, bias, a, ws)
    else:
        _launch("bias_act", act, bias, _alpha(act, a), a)


def bias_act_keep(act, a, bias, f, ws=None):
    """``a <- a + bias``; ``f <- sigma(a)`` (forward, "recompute" mode)."""
    if is_numpy(a):
        add = _bias_adder(a, bias)
        for rows in _row_blocks(a):
            add(a[rows])
            act.kind.value(a[rows], act.alpha, f[rows])
    elif act.kind.rowwise:
        a += bias
        ROW_ACTIVATIONS[act.name].forward(a, None, f, ws)
    else:
        _launch("bias_act_keep", act, bias, _alpha(act, a), a, f)


def bias_act_grad(act, a, bias, f):
    """``f <- sigma(a + bias)``; ``a <- sigma'(a + bias)`` (forward, "store_both" mode)."""
    if act.kind.grad is None:
        raise ValueError(f"{act.name} has no elementwise derivative to store")
    if is_numpy(a):
        add = _bias_adder(a, bias)
        for rows in _row_blocks(a):
            block = a[rows]
            add(block)
            act.kind.value(block, act.alpha, f[rows])
            act.kind.grad(block, act.alpha, block)
    else:
        _launch("bias_act_grad", act, bias, _alpha(act, a), a, f)


def grad_from_output(act, f, delta, ws=None):
    """``delta <- delta (.) sigma'`` computed from the output ``f`` ("output" mode)."""
    if act.kind.is_identity:
        return  # sigma' = 1
    if is_numpy(f):
        mask = act.kind.mask_from_output
        if mask is not None and f.flags.c_contiguous and delta.flags.c_contiguous:
            _times_mask(act, f, delta)
            return
        for rows in _row_blocks(f):
            if act.kind.rowwise:
                g = delta[rows]
                act.kind.rowwise.backward(f[rows], g, g)
            else:
                block = f[rows]
                delta[rows] *= act.kind.grad_from_output(block, act.alpha, np.empty_like(block))
    elif act.kind.rowwise:
        ROW_ACTIVATIONS[act.name].backward(f, delta, ws)
    else:
        _launch("grad_from_output", act, f, _alpha(act, f), delta)


def _times_mask(act, f, delta):
    """``delta <- delta (.) alpha mask(f)`` (Kind.mask_from_output): a bool mask, read by
    one multiply (the same products as by a float 0/1), on blocks 4x BLOCK_ELEMENTS long
    in a float32 block's bytes: 1.2-2.5x faster than sigma' as floats (relu, float32)."""
    f, delta = f.reshape(-1), delta.reshape(-1)
    step = 4 * BLOCK_ELEMENTS
    mask = np.empty(min(step, f.size), dtype=bool)
    for first in range(0, f.size, step):
        d = delta[first:first + step]
        m = act.kind.mask_from_output(f[first:first + step], mask[:d.size])
        np.multiply(d, m, out=d)
        if act.alpha != 1:  # (delta m) alpha: the bits of delta (alpha m)
            d *= _alpha(act, d)


def recompute_grad(act, a, delta, ws=None):
    """``a <- sigma(a)`` and ``delta <- delta (.) sigma'(a)`` ("recompute" mode)."""
    if act.kind.is_identity:
        return  # sigma(a) = a and sigma' = 1
    if is_numpy(a):
        for rows in _row_blocks(a):
            block = a[rows]
            if act.kind.rowwise:
                act.kind.value(block, act.alpha, block)
                g = delta[rows]
                act.kind.rowwise.backward(block, g, g)
            else:
                d = act.kind.grad(block, act.alpha, np.empty_like(block))
                act.kind.value(block, act.alpha, block)
                delta[rows] *= d
    elif act.kind.rowwise:
        kernels = ROW_ACTIVATIONS[act.name]
        kernels.forward(a, None, a, ws)
        kernels.backward(a, delta, ws)
    else:
        _launch("recompute_grad", act, _alpha(act, a), a, delta)


def mul(delta, d):
    """``delta <- delta (.) d`` ("store_both" mode)."""
    if is_numpy(delta):
        delta *= d
    else:
        _launch("mul", None, d, delta)


def _softmax(z, bias, out, ws):
    """``out <- softmax(z + bias)`` over rows on the GPU (``bias`` may be None, ``out`` z)."""
    B, C = z.shape
    bias = _NULL if bias is None else bias
    if C <= ROW_KERNEL_MAX:
        _launch_rows("gm_softmax_forward", B, z, bias, out, np.int32(B), np.int32(C))
        return
    part, sizes = _wide_part(ws, B), _wide_sizes(B, C)
    _launch_wide("gm_wide_max", B, z, bias, part[0], *sizes)
    _launch_wide("gm_wide_exp", B, z, bias, part[0], out, part[1], *sizes)
    _launch_wide("gm_wide_normalize", B, part[1], out, *sizes)
    ws.give(part)


def _softmax_backward(f, g, ws):
    """``g <- (g - <g, f>_row) (.) f`` on the GPU."""
    B, C = f.shape
    if C <= ROW_KERNEL_MAX:
        _launch_rows("gm_softmax_backward", B, f, g, np.int32(B), np.int32(C))
        return
    part, sizes = _wide_part(ws, B), _wide_sizes(B, C)
    _launch_wide("gm_wide_dot", B, f, g, part[0], *sizes)
    _launch_wide("gm_wide_softmax_backward", B, f, part[0], g, *sizes)
    ws.give(part)


# A row wider than ROW_KERNEL_MAX gets ROW_LANES threads (rowwise.cuh, "wide rows"): a
# warp, so that its loads of a row are coalesced. They keep their shares of the row's
# maximum and sums in (k, B, ROW_LANES) scratch: a loss's three (loss_scratch_shape), or
# the two the workspace lends an activation for the call.
ROW_LANES = 32


def _wide_part(ws, B):
    if ws is None:
        raise ValueError("a row-wise activation on rows wider than ROW_KERNEL_MAX needs "
                         "the workspace that lends its scratch (ws)")
    # (the batch first: the workspace keeps a buffer per shape after it, so a leading
    # 2 would keep one per batch size, each new one allocated -- DP's Poisson batches)
    return ws.take((2 * B, ROW_LANES)).reshape(2, B, ROW_LANES)


def _wide_sizes(B, C):
    """The wide-row kernels' (B, C, L) arguments."""
    return np.int32(B), np.int32(C), np.int32(ROW_LANES)


def _launch_wide(name, B, *args):
    """Launch a wide-row kernel: ROW_LANES threads for each of the B rows."""
    _launch_rows(name, B * ROW_LANES, *args)


class RowKernels(NamedTuple):
    """A row-wise activation's ops on the GPU: ``forward(z, bias, out, ws)`` writes
    ``out <- sigma(z + bias)`` row by row (``bias`` may be None, ``out`` may be z),
    ``backward(f, g, ws)`` the vector-Jacobian product ``g <- g J(f)`` from the output,
    in place -- its row kernels ``gm_<name>_forward`` and ``gm_<name>_backward``
    (kernels/rowwise.cuh), or for rows wider than ROW_KERNEL_MAX the wide-row kernels,
    with scratch from the workspace ``ws``."""

    forward: Callable
    backward: Callable


# The GPU twins of the table's row-wise activations (``Kind.rowwise``; on NumPy the row
# itself has them), by table name.
ROW_ACTIVATIONS = {"softmax": RowKernels(_softmax, _softmax_backward)}


# --- losses ---------------------------------------------------------------------------

def loss_and_grad(loss, F, Y, grad, scale, scratch, out=None, ones=None):
    """Write ``grad = scale * dl/dF`` and return the mean per-sample loss as a 0-d array:
    ``out`` (0-d, given with ``ones``, as many ones as loss terms) or a new one.

    ``scratch`` is a workspace buffer of :func:`loss_scratch_shape` that receives the loss
    terms before the sum (F's shape for an elementwise loss, a row-wise one's B), and
    the wide-row kernels' shares on wide rows. With class labels, a
    label out of range (possible only when the checks were skipped) gives its row a NaN
    loss and no gradient, on both backends. With ``out``, on the GPU the mean is one GEMV
    against ``ones`` (``alpha = 1/B``) straight into ``out``: no array is made, where a
    CuPy reduction makes its result (and under its default CUB accelerator a workspace).
    """
    B = F.shape[0]
    if is_numpy(F):
        total = F.dtype.type(0)
        for rows in _row_blocks(F):
            total += loss.evaluate(F[rows], Y[rows], scale, grad[rows], loss.clip).sum()
        if out is None:
            return np.asarray(total / B)
        out[...] = total / B
        return out
    s = F.dtype.type(scale)
    terms = loss_terms(loss, scratch)
    if loss.rowwise and F.shape[1] <= ROW_KERNEL_MAX:
        kernel = "gm_softmax_xent_labels" if Y.ndim == 1 else "gm_softmax_xent_targets"
        _launch_rows(kernel, B, F, Y, grad, terms, np.int32(B), np.int32(F.shape[1]), s)
    elif loss.rowwise:
        _softmax_xent_wide(F, Y, grad, terms, scratch[1:].reshape(3, B, ROW_LANES), s)
    else:
        _launch(loss.name, None, F, Y, s, grad, terms)
    if loss.clip is not None:
        low, high = (F.dtype.type(c) for c in loss.clip)
        _launch("clamp", None, low, high, terms)
    if out is None:
        return terms.sum() / B
    gemv("T", terms.reshape(-1, 1), ones[:terms.size], out.reshape(1), alpha=1.0 / B)
    return out


def add_row_squares(a, b, out, ws, dense: bool = False) -> None:
    """``out[i] += ||a_i||^2 + ||b_i||^2`` over the rows of a (B, n) and b (B, m) -- a
    convolution's kept per-sample gradients, G flat and g -- or, ``dense``, ``out[i] +=
    ||a_i||^2 (||b_i||^2 + 1)``, nothing where a_i = 0: a dense layer's per-sample
    squared gradient norms from T and x (NumPy's are gpu_mlp.norms'). DP's, on the GPU:
    each row's shares of both (gm_wide_square_shares), then gm_wide_add_squares, in a
    workspace buffer -- two launches, where CuPy's ufuncs and two GEMVs took nine for a
    dense layer, four and an add for kept gradients. CuPy only."""
    B = a.shape[0]
    if not B:
        return
    part = ws.take((2 * B, ROW_LANES)).reshape(2, B, ROW_LANES)  # (the batch first: see
    L = np.int32(ROW_LANES)                                        # _wide_scratch)
    _launch_wide("gm_wide_square_shares", B, a, b, part[0], part[1], np.int32(B),
                 np.int32(a.shape[1]), np.int32(b.shape[1]), L)
    _launch_wide("gm_wide_add_squares", B, part[0], part[1], out, np.int32(B), L,
                 np.int32(dense))
    ws.give(part)


def _softmax_xent_wide(F, Y, grad, row_loss, part, scale):
    """The softmax cross-entropy of rows wider than ROW_KERNEL_MAX, on the GPU: the
    wide-row kernels, ``part`` (3, B, ROW_LANES) their scratch."""
    B, C = F.shape
    sizes = _wide_sizes(B, C)
    _launch_wide("gm_wide_max", B, F, _NULL, part[0], *sizes)
    _launch_wide("gm_wide_exp", B, F, _NULL, part[0], grad, part[1], *sizes)  # exp(F - m)
    if Y.ndim == 1:
        _launch_wide("gm_wide_xent_labels", B, F, Y, part[0], part[1], grad, row_loss, *sizes,
                     scale)
    else:
        _launch_wide("gm_wide_xent_targets", B, F, Y, part[0], part[1], grad, part[2],
                     *sizes, scale)
        _launch_wide("gm_wide_row_sums", B, part[2], row_loss, sizes[0], sizes[2])


def loss_terms(loss, scratch):
    """The part of a :func:`loss_scratch_shape` buffer that holds the loss terms."""
    return scratch[0] if loss.rowwise and scratch.ndim == 2 else scratch


def loss_scratch_shape(loss, F_shape):
    """The scratch of :func:`loss_and_grad`: F's shape for an elementwise loss; (B,) for a
    row-wise one, or on rows wider than ROW_KERNEL_MAX (1 + 3 ROW_LANES, B): the rows'
    losses, then the wide-row kernels' (3, B, ROW_LANES) shares."""
    if not loss.rowwise:
        return tuple(F_shape)
    B, C = F_shape[0], math.prod(F_shape[1:])
    return (1 + 3 * ROW_LANES, B) if C > ROW_KERNEL_MAX else (B,)


# --- convolutions ----------------------------------------------------------------------

def im2col(layer, x, out):
    """``out <- rows(x)`` of a Conv2d: (B*OH*OW, c_in*kh*kw) from x (B, c_in, H, W)."""
    if is_numpy(x):
        conv.im2col(x, layer, out)
    else:
        _launch("im2col", None, x, *_geometry(layer, x.shape[1:]), out)
    return out


def col2im(layer, cols, out):
    """``out <- rows^*(cols)``, the adjoint of :func:`im2col`, into out (B, c_in, H, W)."""
    if is_numpy(out):
        conv.col2im(cols, layer, out)
    else:
        _launch("col2im", None, cols, *_geometry(layer, out.shape[1:]), out)
    return out


def _geometry(layer, input_shape):
    return [np.int32(v) for v in conv.geometry(layer, tuple(input_shape))]


def im2col_nhwc(layer, x, out, taps_first: bool, padded=None):
    """``out <- rows(x)`` of a Conv2d on the channels-last x (B, H, W, c_in): columns
    (c, i, j), or (i, j, c) with ``taps_first``; ``padded`` (NumPy only, where the layer
    pads): a (B, H + 2 ph, W + 2 pw, c_in) scratch buffer (conv.windows)."""
    if is_numpy(x):
        conv.im2col_nhwc(x, layer, out, taps_first, padded)
    else:
        _launch("im2col_nhwc", None, x, *_geometry(layer, _nchw(x.shape)),
                np.int32(taps_first), out)
    return out


def col2im_nhwc(layer, cols, out, scratch=None, derivative=None):
    """``out`` (B, H, W, c_in) <- the adjoint of :func:`im2col_nhwc` with taps_first;
    ``scratch`` (NumPy only): a buffer of B times conv.col2im_scratch values, for faster
    sums. ``derivative``: ``(act, f)``, the layer below's elementwise activation and its
    output (out's shape): out is then also multiplied by its sigma', as
    :func:`grad_from_output` would -- on a GPU in the same kernel."""
    if is_numpy(out):
        conv.col2im_nhwc(cols, layer, out, scratch)
        if derivative is not None:
            grad_from_output(*derivative, out)
    elif derivative is None:
        _launch("col2im_nhwc", None, cols, *_geometry(layer, _nchw(out.shape)), out)
    else:
        act, f = derivative
        _launch("col2im_nhwc_grad", act, cols, *_geometry(layer, _nchw(out.shape)), f,
                _alpha(act, f), out)
    return out


def _nchw(shape):
    """The per-sample (C, H, W) of an NHWC batch shape (B, H, W, C)."""
    return (shape[3], shape[1], shape[2])


# A channels-last convolution on NumPy runs im2col (and the forward GEMM, C^dagger's GEMM
# and col2im) on blocks of whole samples of about this many bytes of columns: im2col's
# kh*kw strided passes then stay in cache (measured: 1.5x faster than over the whole
# batch; smaller blocks make the GEMMs slower).
CONV_BLOCK_BYTES = 1 << 20
# The most a convolution's column buffer holds on either backend (its rows(x), C^dagger's
# columns): a batch whose columns would be larger runs in blocks of whole samples, and a
# weight gradient reads rows(x) block by block (RowBlocks); the layers share one such
# buffer (Workspace.take_columns). A column buffer is kh*kw times the layer's input:
# over a whole batch it put a GPU step at up to 2.3x PyTorch's peak memory. Counted on
# the CuPy path (bench/README.md, "Column budget"): 16 MiB gives 0.51-0.88x PyTorch's
# H200 peak on the conv grid (36 points, batches 64-1,024), whole columns up to 1.51x;
# 32 and 64 MiB reached 1.00x and 1.16x. A 16 MiB block is still a GEMM of thousands of
# rows (7,000 at K = 576).
COLUMN_BUDGET_BYTES = 16 << 20


def column_block(B: int, bytes_per_sample: int) -> int:
    """Samples per block of ``B`` whose columns fit :data:`COLUMN_BUDGET_BYTES` (at
    least one, even for an empty batch: a loop's step)."""
    n = COLUMN_BUDGET_BYTES // (bytes_per_sample if bytes_per_sample > 1 else 1)
    if n >= B:
        n = B
    return n if n > 1 else 1  # (not max/min: called a dozen times a step)


# On NumPy a weight gradient reads rows(x) in blocks of at most this many bytes of
# columns (RowBlocks, within the column budget): im2col's last writes are still in cache
# when the GEMM reads them. 16 MiB blocks took 1.7-2x as long as 4 MiB ones for 3x3
# convolutions of 16-32 channels on 16x16-32x32 maps; 1-2 MiB ones 1.05-1.15x.
ROW_BLOCK_BYTES = 4 << 20


def row_block(x, bytes_per_sample: int) -> int:
    """Samples per block of a convolution's ``rows(x)`` that a weight gradient reads
    block by block (:class:`RowBlocks`): as many as the column budget holds, on NumPy
    within :data:`ROW_BLOCK_BYTES` too."""
    return _block_within(x, bytes_per_sample, ROW_BLOCK_BYTES)


def conv_block(x, bytes_per_sample: int) -> int:
    """Samples per block of a channels-last convolution on ``x``'s backend: on a GPU as
    many as the column budget holds, on NumPy a cache-sized block (within it too)."""
    return _block_within(x, bytes_per_sample, CONV_BLOCK_BYTES)


def _block_within(x, bytes_per_sample: int, numpy_bytes: int) -> int:
    """Samples per block of ``x``'s batch within the column budget, and on NumPy within
    ``numpy_bytes`` too (at least one)."""
    fit = column_block(x.shape[0], bytes_per_sample)
    if not is_numpy(x):
        return fit
    n = numpy_bytes // (bytes_per_sample if bytes_per_sample > 1 else 1)
    if n >= fit:
        return fit
    return n if n > 1 else 1


def keeps_columns(x, ws, bytes_per_sample: int) -> bool:
    """Whether a training step's forward keeps a convolution's columns of ``x`` for its
    weight gradient (Remark 8's store over recompute): on NumPy, where those of the
    largest batch the step's workspace ``ws`` has run fit one cache-sized block
    (:data:`CONV_BLOCK_BYTES`: at most that much more held per layer, and as much for
    W's copy, :func:`keeps_weight`), within the column
    budget too (the forward then runs as one block). Decided by that batch, not
    ``x``'s, so that a remainder batch holds no buffer the full one does not. (A GPU
    gathers them again at little cost, and its memory is the scarcer.)"""
    # x's batch too: free_buffers() in another thread may reset ws.largest_batch to 0
    # between the step's setting it and this layer (README: "one may call
    # free_buffers() while another trains"); kept columns must be the whole batch's
    batch = max(ws.largest_batch, x.shape[0])
    return is_numpy(x) and batch * bytes_per_sample <= min(
        CONV_BLOCK_BYTES, COLUMN_BUDGET_BYTES)


def keeps_weight(x, nbytes: int) -> bool:
    """Whether a training step's forward keeps a layer's copy of W (``nbytes``) for its
    input gradient: on NumPy, where it fits the same cache-sized block as kept columns
    (:data:`CONV_BLOCK_BYTES`), so that what a layer keeps stays within two blocks. A
    larger copy is made again in the backward pass: one pass over W, small next to the
    GEMMs that read it."""
    return is_numpy(x) and nbytes <= CONV_BLOCK_BYTES


def sample_blocks(B: int, n: int, P: int):
    """``(samples, rows)`` slices of the blocks of ``n`` whole samples of a batch of
    ``B``, each sample ``P`` rows (a convolution's output positions)."""
    if 0 < B <= n:  # one block, the common case
        return [(slice(0, B), slice(0, B * P))]
    return [(slice(b, min(B, b + n)), slice(b * P, min(B, b + n) * P))
            for b in range(0, B, n)]


class RowBlocks:
    """A convolution's ``rows(x)``, (B*P, ...), larger than :data:`COLUMN_BUDGET_BYTES`:
    made ``per_block`` whole samples at a time into one buffer, as a weight gradient
    reads them (:func:`weight_gradient`; the sinks that take them: ``takes_row_blocks``
    in gpu_mlp/updates.py). ``fill(first, count)`` makes the rows of samples ``first``
    to ``first + count`` and returns them (in its buffer, overwritten by the next);
    ``buffers`` are the workspace buffers to give back when done."""

    def __init__(self, samples: int, per_block: int, positions: int, fill, buffers):
        self.samples, self.per_block, self.positions = samples, per_block, positions
        self.fill, self.buffers = fill, buffers

    def __iter__(self):
        """``(rows, block)``: the slice of rows(x) a block is, and the block."""
        for samples, rows in sample_blocks(self.samples, self.per_block, self.positions):
            yield rows, self.fill(samples.start, samples.stop - samples.start)


# --- optimizers (gpu_mlp/optim.py) --------------------------------------------------------
#
# Each update is one kernel over a parameter tensor, flattened: ``w`` the parameter,
# ``g`` its gradient (a view of the optimizer's one scratch buffer), the state beside
# them, all 1-D and C-contiguous; the scalars are host numbers, cast to the arrays'
# dtype. The NumPy twins run the same IEEE operations in the same order as
# kernels/optim.cuh (so they agree with its host build to the bit), on blocks of
# BLOCK_ELEMENTS: their temporaries are a block's size, whatever the layer's.

def _flat_blocks(n: int):
    return [slice(first, first + BLOCK_ELEMENTS) for first in range(0, n, BLOCK_ELEMENTS)]


def _block_buffers(w, count: int):
    """``count`` scratch blocks for a twin's loop over ``w``: at most a block each."""
    return [np.empty(min(w.size, BLOCK_ELEMENTS), dtype=w.dtype) for _ in range(count)]


def _on_device(x, dtype):
    """A step scalar as the CuPy kernels read it, by pointer: ``x`` itself if it is a
    device array (a view of :class:`gpu_mlp.plan.StepScalars`' values), else a new
    device array holding it (a direct call with a number: one small allocation)."""
    if not isinstance(x, numbers.Number):
        return x
    import cupy

    return cupy.asarray(np.array(x, dtype=dtype))


def _host_scalar(x, t):
    """A step scalar for a NumPy twin: a number (or a host array's one value) as ``t``."""
    return t(x if isinstance(x, numbers.Number) else x.reshape(-1)[0])


def sgd_momentum(w, g, buf, lr, momentum, weight_decay, nesterov: bool):
    """One step of torch.optim.SGD with ``momentum > 0`` (dampening 0) on ``w``, in place:
    ``g + wd w`` into ``buf <- momentum buf + g``, then ``w -= lr (nesterov ? g + momentum
    buf : buf)``. ``lr``: a number, or on CuPy a one-element device array (read there)."""
    t = w.dtype.type
    momentum, weight_decay = t(momentum), t(weight_decay)
    if not is_numpy(w):
        _launch("sgd_momentum", None, g, _on_device(lr, w.dtype), momentum, weight_decay,
                np.int32(bool(nesterov)), w, buf)
        return
    lr = _host_scalar(lr, t)
    decayed, step = _block_buffers(w, 2)
    for s in _flat_blocks(w.size):
        wb, gb, bb = w[s], g[s], buf[s]
        d, u = decayed[:wb.size], step[:wb.size]
        if weight_decay != 0:
            np.multiply(wb, weight_decay, out=d)  # g + wd w
            gb = np.add(gb, d, out=d)
        bb *= momentum
        bb += gb
        if nesterov:
            np.multiply(bb, momentum, out=u)  # g + momentum buf
            u += gb
            u *= lr
        else:
            np.multiply(bb, lr, out=u)
        wb -= u


def adam(w, g, m, v, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay,
         step_size, bias_correction2_sqrt):
    """One step of torch.optim.Adam / AdamW on ``w``, in place (kernels/optim.cuh,
    ``gm_adam``): the L2 term ``weight_decay`` (Adam), the decoupled ``decay`` factor
    (AdamW), the moments ``m`` and ``v``, and the bias-corrected step. ``eps``, ``decay``,
    ``step_size`` and ``bias_correction2_sqrt`` (which change with the step): numbers, or
    on CuPy one-element device arrays."""
    t = w.dtype.type
    c1, beta2, c2, weight_decay = (t(x) for x in (one_minus_beta1, beta2, one_minus_beta2,
                                                   weight_decay))
    if not is_numpy(w):
        eps, decay, step_size, bias_correction2_sqrt = (
            _on_device(x, w.dtype) for x in (eps, decay, step_size, bias_correction2_sqrt))
        _launch("adam", None, g, c1, beta2, c2, eps, weight_decay, decay, step_size,
                bias_correction2_sqrt, w, m, v)
        return
    eps, decay, step_size, bc2_sqrt = (_host_scalar(x, t) for x in (
        eps, decay, step_size, bias_correction2_sqrt))
    one = t(1)
    decayed, first, second = _block_buffers(w, 3)
    for s in _flat_blocks(w.size):
        wb, gb, mb, vb = w[s], g[s], m[s], v[s]
        d, a, b = decayed[:wb.size], first[:wb.size], second[:wb.size]
        if weight_decay != 0:
            np.multiply(wb, weight_decay, out=d)  # g + wd w
            gb = np.add(gb, d, out=d)
        if decay != one:
            wb *= decay
        np.subtract(gb, mb, out=a)  # ATen's lerp (kernels/optim.cuh: gm_lerp)
        if abs(c1) < t(0.5):
            a *= c1
            mb += a
        else:
            a *= one - c1
            np.subtract(gb, a, out=mb)
        np.multiply(gb, c2, out=a)  # v beta2 + (c2 g) g
        a *= gb
        vb *= beta2
        vb += a
        np.sqrt(vb, out=a)  # the denominator
        a /= bc2_sqrt
        a += eps
        np.multiply(mb, step_size, out=b)  # (step_size m) / denominator
        b /= a
        wb -= b


def sgd(w, g, lr, decay=1.0):
    """``w <- decay w - lr g`` on ``w``, in place: a plain SGD step from a gradient
    already in a buffer, its weight decay as the factor ``decay`` (numbers, or on CuPy
    one-element device arrays)."""
    t = w.dtype.type
    if not is_numpy(w):
        _launch("sgd", None, g, _on_device(lr, w.dtype), _on_device(decay, w.dtype), w)
        return
    lr, decay = _host_scalar(lr, t), _host_scalar(decay, t)
    [step] = _block_buffers(w, 1)
    for s in _flat_blocks(w.size):
        wb = w[s]
        u = np.multiply(g[s], lr, out=step[:wb.size])
        if decay != 1:  # 1 w is w, bit for bit
            wb *= decay
        wb -= u


def step_scalars(s, table, counters):
    """``s <- table[row]``, the row of the device's step counter (``counters = (step,
    DP step, the step of the table's first row)``; kernels/optim.cuh, ``gm_step_row``):
    one launch, on CuPy only (:class:`gpu_mlp.plan.StepScalars`)."""
    _launch("step_scalars", None, table, counters, np.int32(table.shape[0]), s)


def gram_bound(inner, t, x, coef: float, trusted: float, ws=None):
    """``inner`` (B,) <- itself where ``e = t x coef`` is at most ``trusted`` of it, else
    ``max(inner, 0) + e``; 0 where ``t`` = 0 (gpu_mlp.norms._gram_bound says why). One
    launch on CuPy, where its ufuncs took ten; on NumPy ``t`` and ``x`` are overwritten,
    and the two scratch vectors come from the workspace ``ws`` if given."""
    if not is_numpy(inner):
        d = inner.dtype.type
        _launch("gram_bound", None, t, x, d(coef), d(trusted), inner)
        return inner
    if ws is None:
        limit = np.empty_like(inner)
        loose, none = (np.empty(inner.shape, dtype=bool) for _ in range(2))
    else:
        limit, loose, none = (ws.take(inner.shape, dtype) for dtype in (None, bool, bool))
    # T_i = 0: G_i = 0, though X_i's squares overflow (0 inf: NaN below)
    np.equal(t, 0, out=none)
    with np.errstate(invalid="ignore", over="ignore"):
        error = t
        error *= x
        error *= coef
        bound = x
        np.fmax(inner, 0, out=bound)  # (a NaN value, X_i X_i^T overflowed: the error)
        bound += error
        np.multiply(inner, trusted, out=limit)
        np.less_equal(error, limit, out=loose)
    np.logical_not(loose, out=loose)  # (a NaN either side: not to be trusted)
    np.copyto(inner, bound, where=loose)
    np.copyto(inner, 0, where=none)
    if ws is not None:
        ws.give(limit, loose, none)
    return inner


def gather(data, order, at, out, dtype) -> None:
    """``out[r] = data[order[at + r]]`` for the rows r of ``out``, ``at`` a 0-d device
    integer (on NumPy, an array too): float rows, or int64 class labels (``dtype``: the
    net's, whose module holds the kernel). On CuPy one kernel of the module -- CuPy's
    take and the index arithmetic before it are three more to compile on a first run."""
    if is_numpy(out):
        np.take(data, order[int(at):int(at) + out.shape[0]], axis=0, out=out)
        return
    if out.dtype not in (np.int64, np.dtype(dtype)) or data.dtype != out.dtype:
        raise TypeError(f"gather: rows of int64 or {np.dtype(dtype).name} into their own "
                        f"dtype, got {data.dtype} into {out.dtype}")
    op = "gather_labels" if out.dtype == np.int64 else "gather"
    width = np.int64(out.size // out.shape[0]) if out.shape[0] else np.int64(0)
    _launch(op, None, data, order, at, width, out, dtype=dtype)


def sign_hits(F, Y, hits) -> None:
    """``hits = 1`` where F's sign (> 0 or not) is the label's in Y (+-1), else 0,
    elementwise (logistic accuracy); on CuPy one kernel of the module."""
    if is_numpy(F):
        np.equal(F > 0, Y > 0, out=hits, casting="unsafe")
        return
    _launch("sign_hit", None, F, Y, hits)


def class_hits(F, Y, hits) -> None:
    """``hits[i] = 1`` where row i of ``F`` (B, C) is largest at its label ``Y[i]`` (or at
    its target row ``Y[i]``'s largest entry), else 0 -- NumPy's argmax, the first of
    equals, a NaN the largest. On CuPy one kernel of the module, a thread a row (CuPy's
    argmax and comparison are two kernels more for a first run to compile)."""
    if is_numpy(F):
        labels = Y if Y.ndim == 1 else Y.argmax(axis=1)
        np.equal(F.argmax(axis=1), labels, out=hits, casting="unsafe")
        return
    op = "class_hit" if Y.ndim == 1 else "class_hit_targets"
    _launch(op, None, F, Y, np.int64(F.shape[1]), hits)


def square(a, out) -> None:
    """``out <- a * a`` elementwise (one kernel of the module on CuPy)."""
    if is_numpy(a):
        np.multiply(a, a, out=out)
    else:
        _launch("square", None, a, out)


def scale_rows(x, factors) -> None:
    """``x[i] *= factors[i]`` in place for each sample i of ``x`` (B, ...), C-contiguous
    (one kernel of the module on CuPy: the factors as a column of x viewed (1, B, rest))."""
    if is_numpy(x):
        x *= factors.reshape(-1, *(1,) * (x.ndim - 1))
    elif x.size:
        B = x.shape[0]
        _launch("scale_rows", None, factors.reshape(B, 1), x.reshape(1, B, -1))


def advance(counter, by: int, dtype) -> None:
    """``counter += by`` in place (int64, on the device: a captured step moves its own
    counters); one kernel of the module of ``dtype`` (the net's)."""
    if is_numpy(counter):
        counter += by
        return
    _launch("advance", None, np.int64(by), counter, dtype=dtype)


def finite(name: str, a, xp, verdicts=None) -> None:
    """:func:`gpu_mlp._checks.finite`, a float CuPy array scanned by a kernel of the
    module (:func:`flag_nonfinite`) into a flag read with the verdicts, or at once: CuPy's
    isfinite and all are two more kernels for a first run to compile, and two arrays a
    call."""
    if xp is np or not a.size or a.dtype not in (np.float32, np.float64) \
            or not a.flags.c_contiguous:
        _checks.finite(name, a, xp, verdicts)
        return
    flag = xp.zeros(1, dtype=a.dtype)
    flag_nonfinite(a, flag)
    settle = verdicts is None
    verdicts = _checks.Verdicts(xp) if settle else verdicts
    verdicts.require_values((flag[0],), lambda f: f == 0, f"{name} contains NaN or Inf")
    if settle:
        verdicts.settle()


def flag_targets(kind: str, Y, flag, sums=None) -> None:
    """``flag[0] = 1`` where the float targets ``Y`` (C-contiguous) are not what a loss
    takes: ``kind`` "sign", a logistic label other than -1 and +1; "probabilities", a
    row (of Y's (B, C)) with a negative entry or not summing to 1 within np.allclose's
    tolerance (``sums``, (B,), gets the rows' sums). On CuPy one kernel of the module."""
    if is_numpy(Y):
        if kind == "sign":
            bad = not np.all(np.abs(Y) == 1)
        else:
            bad = not (np.all(Y >= 0) and np.all(np.abs(Y.sum(axis=1) - 1) <= 1e-3 + 1e-5))
        if bad:
            flag[0] = 1
        return
    if kind == "sign":
        _launch("flag_not_sign", None, Y, flag)
    else:
        _launch("flag_not_probabilities", None, Y, np.int64(Y.shape[1]), sums, flag)


def flag_nonfinite(a, flag) -> None:
    """``flag[0] = 1`` if ``a`` (C-contiguous, of a float dtype) holds a NaN or an Inf;
    else ``flag`` is left as it is. On CuPy one kernel of the module (CuPy's isfinite and
    all are two kernels more to compile on a first run, and two arrays a call)."""
    if is_numpy(a):
        if not np.isfinite(a).all():
            flag[0] = 1
        return
    _launch("flag_nonfinite", None, a, flag)


def clip_factors(squares, clip: float, scale: float) -> None:
    """``squares <- scale / max(sqrt(squares), clip)`` in place: DP's clipping factors
    ``scale min(1, clip / ||g_i||)`` (1 for a zero gradient) from the per-sample squared
    norms; a NaN stays NaN. One launch on CuPy, where its ufuncs took three."""
    if is_numpy(squares):
        np.sqrt(squares, out=squares)
        np.maximum(squares, clip, out=squares)
        np.divide(scale, squares, out=squares)
        return
    t = squares.dtype.type
    _launch("clip_factor", None, t(clip), t(scale), squares)


def tally(loss, squares, scale: float, penalty: float, total, carry) -> None:
    """``total <- total + scale * loss + penalty * squares``, a compensated (Kahan) sum:
    ``carry`` keeps what the addition's rounding dropped and takes it back at the next
    one, so that a run of float32 terms sums to float32's precision, not to that times
    their count. All one-element arrays of one dtype; one launch on CuPy (capturable:
    :class:`gpu_mlp.plan.LossTally`; NVRTC may fuse a product and a sum into one
    multiply-add, which rounds once where NumPy rounds twice)."""
    t = total.dtype.type
    if is_numpy(total):  # on NumPy's scalars, which cost less than (1,) arrays
        y = t(scale) * loss[0]
        if penalty:  # (else + 0 * squares, which changes no sum)
            y = y + t(penalty) * squares[0]
        y = y - carry[0]
        s = total[0] + y
        carry[0] = (s - total[0]) - y
        total[0] = s
        return
    _launch("tally", None, loss, squares, t(scale), t(penalty), total, carry)


# --- DP-SGD noise (kernels/noise.cuh) ----------------------------------------------------

_U32, _U64 = 1 << 32, 1 << 64
# Element i of a stream is in the Philox block i / 4, a 32-bit counter word.
MAX_NOISE_ELEMENTS = 1 << 34


def add_gaussian(w, scale, seed, stream, step):
    """``w <- w + scale z`` in place, ``z`` i.i.d. standard normal, one per element.

    ``w`` is a C-contiguous float32 or float64 array of any shape. The noise is a pure
    function of ``seed`` (an int in [0, 2^64)), ``stream`` (in [0, 2^32); e.g. one per
    tensor) and ``step`` (in [0, 2^64)): the same arguments give the same noise, and
    another seed, stream or step an independent one -- nothing to save in a checkpoint.

    On CuPy: one launch of the ``gaussian_noise`` kernel over ``w`` (kernels/noise.cuh:
    Philox4x32-10 keyed by the seed, counter (element / 4, stream, step), curand's
    Box-Muller in double from IEEE basic operations alone), no buffer. On NumPy the very
    same computation, every rounded operation of it (the exact steps by bits, or times
    2), vectorised over blocks of NOISE_BLOCK elements (whole Philox blocks), on
    NOISE_THREADS threads (ufuncs release the GIL; one by default), in buffers kept per
    thread: the same arguments give the same bits on both backends, in float32 and
    float64 (docs/MATH.md, "DP-SGD", its paragraph on the noise).

    On CuPy ``scale`` may be a one-element device array and ``step`` an int64 one
    holding the counter's 64 bits (:class:`gpu_mlp.plan.StepScalars`): read by the
    kernel, so a captured step draws each step's own noise.
    """
    seed = _checks.integer("seed", seed, 0, "add_gaussian: ", below=_U64)
    stream = _checks.integer("stream", stream, 0, "add_gaussian: ", below=_U32)
    device_step = hasattr(step, "shape") and not isinstance(step, numbers.Number)
    if not device_step:
        step = _checks.integer("step", step, 0, "add_gaussian: ", below=_U64)
    if w.dtype not in _NUMPY_GEMM or not w.flags.c_contiguous:
        raise ValueError(f"add_gaussian: w must be a C-contiguous float32 or float64 array, "
                         f"got {w.dtype}{'' if w.flags.c_contiguous else ', not contiguous'}")
    t = w.dtype.type
    flat = w.reshape(-1)  # a view: w is C-contiguous
    if flat.size > MAX_NOISE_ELEMENTS:
        raise ValueError(f"add_gaussian: at most 2^34 elements per stream, got {flat.size}")
    if not is_numpy(w):
        if not device_step:  # the counter's 64 bits, as the int64 the kernel reads
            step = int(np.array(step, dtype=np.uint64).view(np.int64))
        _launch("gaussian_noise", None, _on_device(scale, w.dtype), np.uint32(seed % _U32),
                np.uint32(seed // _U32), np.uint32(stream), _on_device(step, np.int64), flat)
        return
    if device_step:
        raise TypeError("add_gaussian: a device step counter on the NumPy backend")
    block = max(4, NOISE_BLOCK // 4 * 4)  # whole Philox blocks
    blocks = range(0, flat.size, block)

    def add(first):
        _add_normal_block(flat[first:first + block], t(scale), seed, first, stream, step,
                          block)
    if len(blocks) > 1 and NOISE_THREADS > 1:
        list(_noise_threads().map(add, blocks))
    else:
        for first in blocks:
            add(first)


# The CPU's noise: elements per block (rounded down to whole Philox blocks of 4) and
# threads. Neither changes the numbers: element i's normal is a function of (seed,
# stream, step, i) alone. One thread by default, measured (2-core EPYC, the DP step of
# 784-1024-1024-10 at batch 64, 21.9 ms on one thread): a pool of 2 gained nothing
# with blocks of 2^16 or 2^17 (22.0 and 22.9 ms) while OpenBLAS's idle threads spin on
# the other core, but 1.35x with blocks of 2^17 and OPENBLAS_THREAD_TIMEOUT=4 (16.3
# ms), for 4x the scratch a thread (~80 bytes an element of a block).
NOISE_BLOCK = 1 << 15
NOISE_THREADS = 1


@functools.cache
def _noise_threads():
    return ThreadPoolExecutor(max(1, min(NOISE_THREADS, os.cpu_count() or 1)),
                              thread_name_prefix="gpu_mlp-noise")


_noise_buffers = threading.local()  # one _NoiseBuffers per thread, block size and dtype

# noise.cuh's constants: Philox4x32's multipliers (M0, M1) and key increments (W0, W1);
# fdlibm's log (Lg1..Lg7, ln 2 in two parts), sin (S1..S6) and cos (C1..C6) polynomials
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_LG = (6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01,
       2.222219843214978396e-01, 1.818357216161805012e-01, 1.531383769920937332e-01,
       1.479819860511658591e-01)
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_S = (-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
      2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10)
_C = (4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
      -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11)
_PI_2POW_M32 = 3.141592653589793116 * 2.0**-32
_SQRT_HALF_BITS = 0x3FE6A09E667F3BCD  # 0.70710678118654757: gm_log_uniform's threshold


def _constant(value, dtype=np.float64):
    """``value`` as a 0-d array: a ufunc call whose operands are contiguous arrays of
    one shape and 0-d arrays takes NumPy's fast path (0.2 us against 0.4-0.8 us with a
    Python scalar, a broadcast row or a slice made in the call; the noise makes ~130
    calls a block, so this is most of a small tensor's cost)."""
    return np.array(value, dtype)


# the noise's constants, as 0-d arrays: integers (uint64, but the int64 shift) ...
_NI = {name: _constant(value, np.uint64) for name, value in dict(
    low=0xFFFFFFFF, sign=1 << 63, bit33=1 << 33, bit61=1 << 61, shift1=1, shift32=32,
    shift34=34, shift52=52, exponent52=0x4330000000000000, mantissa=(1 << 52) - 1,
    sqrt_half=_SQRT_HALF_BITS, carry=(1 << 52) - (_SQRT_HALF_BITS & ((1 << 52) - 1)),
).items()}
_NI["shift63"] = _constant(63, np.int64)
# ... and doubles: the log's coefficients and ln 2's parts times 2 (see _radius)
_NF = {name: _constant(value) for name, value in dict(
    one=1.0, two=2.0, half=0.5, x_half=2.0**52 - 0.5, exponent=2.0**52 + 1022 + 33,
    ln2_hi=2 * _LN2_HI, ln2_lo=2 * _LN2_LO, pi=_PI_2POW_M32 * 2.0**-33).items()}
_NLG = [_constant(2 * c) for c in _LG]
_NS, _NC = [_constant(c) for c in _S], [_constant(c) for c in _C]

_LOW = 0 if sys.byteorder == "little" else 1  # where a uint64's low uint32 half is


class _NoiseBuffers:
    """One thread's scratch for blocks of up to ``size`` elements, and for a block of
    ``n`` Philox blocks (n <= size / 4) its contiguous views (:meth:`views`, kept per n:
    a small tensor's cost is the calls, and a contiguous view is the cheapest to call on).
    """

    def __init__(self, size, dtype):
        P = size // 4
        self.index_m0 = np.arange(P, dtype=np.uint64) * np.uint64(_PHILOX_M[0])
        self.multipliers = np.repeat(np.array(_PHILOX_M, np.uint64), P)  # M0..., M1...
        self.words = np.empty(8 * P, np.uint64)  # x, the xors, 2 products
        self.ints = np.empty(10 * P, np.uint64)
        self.floats = np.empty(18 * P)
        self.out = np.empty(4 * P, dtype)
        self.kept = {}

    def views(self, n):
        """The buffers as arrays of n Philox blocks, each flat: two rows of n one after
        the other (a block's two pairs of words, or the normals of pair 1 and pair 0).
        x, xors and 2 products uint64 (2 n), their rows, the multipliers (M0 n times, M1
        n times) and the uint32 views that the rounds xor (:func:`_philox_words`);
        ints (5, 2 n) uint64 and f (9, 2 n) float64; radius f[8] as (2, n); out (n, 2, 2)
        in the dtype (Philox block, pair, sin or cos), and as (sin or cos, pair 1 and
        pair 0, block)."""
        v = self.kept.get(n)
        if v is None:
            if len(self.kept) > 64:  # a few tensor sizes come back step after step
                self.kept.clear()
            v = self.kept[n] = _Views()
            v.index_m0 = self.index_m0[:n]
            P = self.index_m0.size
            v.multipliers = self.multipliers[P - n:P + n]
            words = self.words[:8 * n].reshape(4, 2 * n)
            v.x, v.xors, v.products = words[0], words[1], words[2:]
            v.x_rows, v.xor_rows = (a.reshape(2, n) for a in words[:2])
            v.first_rows, v.last_rows = (p.reshape(2, n) for p in v.products)
            # hi(product) ^ lo(previous product), as contiguous uint32 arrays one word
            # apart: every other uint32 of xors is garbage (the high halves)
            p32 = [p.view(np.uint32) for p in v.products]
            low, high = (slice(None, -1), slice(1, None))[::1 - 2 * _LOW]
            v.xor_out = v.xors.view(np.uint32)[low]
            v.xor_in = [(p32[r % 2][high], p32[1 - r % 2][low]) for r in range(2)]
            v.ints = self.ints[:10 * n].reshape(5, 2 * n)
            v.f = self.floats[:18 * n].reshape(9, 2 * n)
            v.radius = v.f[8].reshape(2, n)
            v.out = self.out[:4 * n].reshape(n, 2, 2)
            v.out_rows = v.out.transpose(2, 1, 0)[:, ::-1]
            v.number, v.key0, v.key1 = (_constant(0, np.uint64) for _ in range(3))
            v.radius_views = (v.f[:8], v.f[0].view(np.uint64), v.ints[0],
                              v.ints[0].view(np.float64))
            kernels = v.f[6:8]
            v.sin_cos_views = (v.ints[:2], v.ints[2:5], v.ints[2].view(np.int64),
                               v.ints[3].view(np.int64), v.f[:6], kernels,
                               kernels.view(np.uint64), kernels.reshape(2, 2, n))
        return v


class _Views:
    """The arrays of :meth:`_NoiseBuffers.views`, as attributes."""


def _philox_words(v, first, seed, stream, step):
    """noise.cuh's gm_philox4x32_10 on the counters (first + j, stream, step_lo, step_hi)
    of the n blocks of the views ``v``, keyed by the seed: the words (x2, x0) and
    (x3, x1) -- the pairs in reverse -- in the low halves of two uint64 (2, n) (views of
    the buffers; the high halves are garbage)."""
    x, (x0, x2), (xor0, xor2) = v.x, v.x_rows, v.xor_rows
    number, key0, key1, products = v.number, v.key0, v.key1, v.products
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    # Random123's round: (hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0) of the products
    # (M0 x0, M1 x2) = (hi0 lo0, hi1 lo1), 64 bits each. In the first, x1, x2 and x3
    # are the same in every block: M1 x2 and the new x0 are numbers
    m0x0, m1x2 = v.first_rows
    number[()] = first * _PHILOX_M[0]
    np.add(v.index_m0, number, m0x0)  # M0 (first + j)
    m1x2[...] = product = _PHILOX_M[1] * (step & 0xFFFFFFFF)
    x0[...] = (product >> 32) ^ stream ^ k0
    number[()] = (step >> 32) ^ k1
    np.right_shift(m0x0, _NI["shift32"], x2)
    np.bitwise_xor(x2, number, x2)
    for r in range(1, 10):
        k0, k1 = (k0 + _PHILOX_W[0]) & 0xFFFFFFFF, (k1 + _PHILOX_W[1]) & 0xFFFFFFFF
        key0[()], key1[()] = k0, k1
        if r > 1:
            np.bitwise_and(x, _NI["low"], x)  # whole words again, for the products
        np.multiply(x, v.multipliers, products[r % 2])
        np.bitwise_xor(*v.xor_in[r % 2], v.xor_out)  # (hi0 ^ x3, hi1 ^ x1)
        if r < 9:
            np.bitwise_xor(xor2, key0, x0)
            np.bitwise_xor(xor0, key1, x2)
    np.bitwise_xor(xor0, key1, x0)  # the last, in reverse: (x2, x0), and the low
    np.bitwise_xor(xor2, key0, x2)  # halves of the products (x3, x1)
    return v.x_rows, v.last_rows


def _radius(v, x, out):
    """sqrt(-2 log u) of u = (2 x + 1) 2^-33 (x the low halves of a uint64 (2, n)) into
    out, a C-contiguous (2, n), with the views ``v`` of n blocks: gm_log_uniform, op for
    op (its values times 2, below)."""
    (f, s, z, w, dk, t, t1, t2), bits, e, e_double = v.radius_views
    I, F, lg = _NI, _NF, _NLG
    out = out.reshape(-1)
    # m / 2 = x + 1/2, exact: the double 2^52 + x from its bits, less 2^52 - 1/2
    np.bitwise_and(x.reshape(-1), I["low"], bits)
    np.bitwise_or(bits, I["exponent52"], bits)
    np.subtract(f, F["x_half"], f)
    # m = f 2^e with f in [sqrt(1/2), sqrt(2)) (frexp's f, or where it is below the
    # threshold T, 2 f and e - 1): adding 2^52 less T's mantissa to the bits carries into
    # the exponent where the mantissa is at least T's: there f in [T, 1) once T's bits
    # are added back to the mantissa, elsewhere f in [1, 2 T) (they carry into it)
    np.add(bits, I["carry"], bits)
    np.right_shift(bits, I["shift52"], e)  # e + 1022, m / 2's biased exponent
    np.bitwise_and(bits, I["mantissa"], bits)
    np.add(bits, I["sqrt_half"], bits)
    np.subtract(f, F["one"], f)  # exact (Sterbenz)
    np.bitwise_or(e, I["exponent52"], e)  # the double 2^52 + e + 1022, less 2^52 +
    np.subtract(e_double, F["exponent"], dk)  # 1022 + 33: dk = e - 33, u = m 2^-33's
    # fdlibm's log(1 + f) + dk ln 2, times 2 (exact: a factor 2 on each operand of a
    # sum, or on one factor of a product, doubles the rounded result), so that -2 log u
    # is one subtraction: 2 hfsq = f f, and 2 R from the coefficients times 2
    np.add(f, F["two"], s)
    np.divide(f, s, s)
    np.multiply(s, s, z)
    np.multiply(z, z, w)
    np.multiply(w, lg[5], t1)  # t1 = w (Lg2 + w (Lg4 + w Lg6))
    np.add(t1, lg[3], t1)
    np.multiply(t1, w, t1)
    np.add(t1, lg[1], t1)
    np.multiply(t1, w, t1)
    np.multiply(w, lg[6], t2)  # t2 = z (Lg1 + w (Lg3 + w (Lg5 + w Lg7)))
    np.add(t2, lg[4], t2)
    np.multiply(t2, w, t2)
    np.add(t2, lg[2], t2)
    np.multiply(t2, w, t2)
    np.add(t2, lg[0], t2)
    np.multiply(t2, z, t2)
    np.add(t2, t1, t2)  # R
    np.multiply(f, f, t1)  # hfsq
    np.add(t2, t1, t2)  # hfsq + R
    np.multiply(t2, s, t2)
    np.multiply(dk, F["ln2_lo"], t)
    np.add(t2, t, t2)
    np.subtract(t1, t2, t2)
    np.add(f, f, f)
    np.subtract(t2, f, t2)  # hfsq - (s (hfsq + R) + dk ln2_lo) - f
    np.multiply(dk, F["ln2_hi"], t)
    np.subtract(t2, t, out)  # -2 log u = 2 (that - dk ln2_hi)
    np.sqrt(out, out)


def _sin_cos_pi(views, y):
    """sin(pi t) and cos(pi t) of t = (2 y + 1) 2^-32 (y the low halves of a uint64
    (2, n)), as a (2, 2, n) stack, with the views of n blocks: gm_sin_or_cos_pi, op for
    op."""
    I, F, S, C = _NI, _NF, _NS, _NC
    y = y.reshape(-1)
    signs, (d, odd, swap), d_int, odd_int, (a, z, v, hz, w, e), kernels, bits, stack = \
        views.sin_cos_views  # signs: of sin(pi t) and cos(pi t)
    q = signs[0]
    sin, cos = kernels
    # 2 t = k 2^-31, k = 2 y + 1, is q / 2 + d 2^-32, q = round(2 t) in 0..4 and
    # |d| < 2^30: d 2^33 is k's low 31 bits as an int64's high bits; and q mod 4 (4 as
    # 0) is the top 2 bits of k + 2^30 mod 2^32, that is of y + 2^29
    np.left_shift(y, I["shift34"], d)
    np.bitwise_or(d, I["bit33"], d)
    np.copyto(a, d_int)  # exact: 31 bits
    np.multiply(a, F["pi"], a)  # a = d pi 2^-32, rounded once
    np.left_shift(y, I["shift32"], q)
    np.add(q, I["bit61"], q)  # q's bits at 63 and 62
    np.left_shift(q, I["shift1"], odd)  # its bit 0 at 63
    np.multiply(a, a, z)
    np.multiply(z, a, v)
    # sin a = a + v (S1 + z (S2 + ... + z S6)); cos a's r = z (C1 + z (C2 + ... + z C6))
    np.multiply(z, S[5], sin)
    for coefficient in S[4:0:-1]:
        np.add(sin, coefficient, sin)
        np.multiply(sin, z, sin)
    np.add(sin, S[0], sin)
    np.multiply(sin, v, sin)
    np.add(sin, a, sin)
    np.multiply(z, C[5], cos)
    for coefficient in C[4::-1]:
        np.add(cos, coefficient, cos)
        np.multiply(cos, z, cos)
    np.multiply(cos, z, cos)  # z r
    np.multiply(z, F["half"], hz)
    np.subtract(F["one"], hz, w)  # w = 1 - hz
    np.subtract(F["one"], w, e)  # cos a = w + (((1 - w) - hz) + z r)
    np.subtract(e, hz, e)
    np.add(cos, e, cos)
    np.add(cos, w, cos)
    # the quadrant q: sin(pi t) = sin a, cos a, -sin a, -cos a and cos(pi t) = cos a,
    # -sin a, -cos a, sin a for q = 0, 1, 2, 3: sin a and cos a swapped where q is odd,
    # then -sin(pi t) where q's bit 1 is set and -cos(pi t) where its bits differ
    # (exact: bits swapped and sign bits flipped, by xor; where= is slow)
    np.bitwise_xor(q, odd, signs[1])
    np.bitwise_and(signs, I["sign"], signs)
    np.right_shift(odd_int, I["shift63"], odd_int)  # all 1s where q is odd
    np.bitwise_xor(bits[0], bits[1], swap)
    np.bitwise_and(swap, odd, swap)  # sin a ^ cos a where q is odd, else 0
    np.bitwise_xor(signs[0], swap, signs[0])
    np.bitwise_xor(signs[1], swap, signs[1])
    np.bitwise_xor(bits, signs, bits)
    return stack


def _add_normal_block(w, scale, seed, first, stream, step, block):
    """Elements ``first`` .. ``first + w.size`` of the stream (first a multiple of 4,
    w.size at most ``block``), times ``scale``, added to ``w``: noise.cuh's
    gm_gaussian_noise, vectorised. Philox block j gives the normals 4 j + 0..3:
    (r sin, r cos) of its words (x0, x1), then of (x2, x3), each rounded once from
    double to w's dtype; then ``w + scale z``, rounded after the product and the sum."""
    kept = getattr(_noise_buffers, "kept", None)
    if kept is None:
        kept = _noise_buffers.kept = {}
    b = kept.get((block, w.dtype.name))
    if b is None:
        b = kept[block, w.dtype.name] = _NoiseBuffers(block, w.dtype)
    v = b.views((w.size + 3) // 4)
    x, y = _philox_words(v, first // 4, seed, stream, step)  # the pairs in reverse
    _radius(v, x, v.radius)
    # (r sin, r cos) into out (Philox block, pair, sin or cos), each rounded once
    np.multiply(_sin_cos_pi(v, y), v.radius, v.out_rows)
    z = b.out[:w.size]
    np.multiply(z, scale, z)
    np.add(w, z, w)


# --- BLAS -----------------------------------------------------------------------------

def _by_position(f, names):
    """SciPy's f2py wrapper ``f``, to be called with the arguments ``names`` by position:
    f2py parses keywords at 0.3 us a call, half of a small GEMM's call. Where a SciPy
    orders them otherwise (its docstring's first line, the signature, says), a function
    that passes them to ``f`` by name."""
    signature = f"({','.join(names[:3])},[{','.join(names[3:])}])"
    if (f.__doc__ or "").split("\n", 1)[0].replace(" ", "").endswith(signature):
        return f
    return lambda *args: f(**dict(zip(names, args)))


_GEMM_ARGS = ("alpha", "a", "b", "beta", "c", "trans_a", "trans_b", "overwrite_c")
_GEMV_ARGS = ("alpha", "a", "x", "beta", "y", "offx", "incx", "offy", "incy", "trans",
              "overwrite_y")
_NUMPY_GEMM = {np.dtype(t): _by_position(f, _GEMM_ARGS)
               for t, f in ((np.float32, _blas.sgemm), (np.float64, _blas.dgemm))}
_NUMPY_GEMV = {np.dtype(t): _by_position(f, _GEMV_ARGS)
               for t, f in ((np.float32, _blas.sgemv), (np.float64, _blas.dgemv))}


def _empty_product(out, beta):
    """``out <- beta out``: a product over an empty dimension is 0. BLAS is not asked
    (SciPy's gemv wrapper rejects k = 0, and cuBLAS documents no k = 0 case); with
    beta = 0 out is not read, as in BLAS. A beta on the GPU's device is not read on the
    host: the ``scale`` kernel reads it there."""
    if not is_numpy(out) and not isinstance(beta, (int, float, np.generic)):
        _launch("scale", None, beta, out)
    elif beta == 0:
        out.fill(0)
    elif beta != 1:
        out *= out.dtype.type(beta)
    return out


def gemm(transa: str, transb: str, a, b, out, alpha=1.0, beta=0.0):
    """``out <- alpha op(a) op(b) + beta out`` in place; all arrays C-contiguous (on NumPy
    ``a`` and ``b`` may also be the transpose of one: F-contiguous). ``alpha`` and
    ``beta``: numbers, or 0-d arrays of out's dtype on out's device (on the GPU read
    when the GEMM runs -- a captured graph's replay reads their current value)."""
    if a.shape[1 if transa == "N" else 0] == 0:  # op(a) (m, 0): e.g. an empty batch
        return _empty_product(out, beta)
    if is_numpy(out):
        # In Fortran order the C-ordered out is out^T = alpha op(b)^T op(a)^T + beta out^T,
        # and x.T of a C-ordered x is the Fortran array BLAS wants: no copy anywhere.
        out_f = out.T
        b_f, trans_b_f = _fortran_operand(b, transb)
        a_f, trans_a_f = _fortran_operand(a, transa)
        result = _NUMPY_GEMM[out.dtype](alpha, b_f, a_f, beta, out_f, trans_b_f, trans_a_f,
                                        1)  # (by position: see _by_position)
        if result is not out_f:  # f2py copied (a wrong dtype or layout): never expected
            raise RuntimeError("BLAS gemm did not write in place; pass C-contiguous arrays")
    else:  # cuBLAS directly (gpu_mlp/cublas.py), the same out^T as above
        cublas.gemm(transa, transb, a, b, out, alpha, beta)
    return out


def _f_ordered(x) -> bool:
    return x.flags.f_contiguous and not x.flags.c_contiguous


def _fortran_operand(x, trans: str):
    """``op(x)^T`` as BLAS takes it from Fortran: ``(array, transposed?)``. A C-ordered
    ``x`` goes as ``x.T``, a Fortran array; an F-ordered one (the transpose of a
    C-ordered array, e.g. :class:`gpu_mlp.layers.EntranceConv`'s rows) as itself."""
    if not _f_ordered(x):
        return x.T, trans == "T"
    return x, trans == "N"


def weight_gradient(T_rows, X_rows, G, alpha=1.0, beta=0.0, ws=None):
    """``G <- alpha T_rows^T X_rows + beta G``: a layer's weight gradient from its
    factors, into ``G``, the (d_out, K) matrix of W's layout (``alpha`` and ``beta`` as
    for :func:`gemm`). ``X_rows`` is (rows, K) in W's column order; or (rows, kh, kw,
    c_in) -- a channels-last convolution's rows on NumPy, columns in the windows' order
    (:class:`gpu_mlp.layers.ChannelsLast`), or the NHWC maps (B, H, W, C) a Dense layer
    reads (:class:`gpu_mlp.layers.ChannelsLastDense`) -- whose product is permuted into
    W's (c_in, kh, kw) on the way, through a buffer of W's size: the workspace ``ws``'s
    (a training step's; on a GPU always), or on NumPy a new one; the product formed
    transposed where :func:`sums_transposed` says. Or ``X_rows`` is a
    :class:`RowBlocks`: the sum of the blocks' products, the first scaled by ``beta``,
    the rest added (beta 1)."""
    transposed = sums_transposed(G, T_rows.shape[0])  # (for all blocks alike)
    if not isinstance(X_rows, RowBlocks):
        return _weight_gradient(T_rows, X_rows, G, alpha, beta, ws, transposed)
    for i, (rows, block) in enumerate(X_rows):
        _weight_gradient(T_rows[rows], block, G, alpha, beta if i == 0 else 1.0, ws,
                         transposed)
    return G


# OpenBLAS forms T^T X faster as its transpose X^T T (K, d_out) where the sums are long:
# 0.53-0.98x the time for 512 to 65,536 rows on the AMD EPYC box, but 1.5x for 64 rows
# and 1.1x for the digits CNN's 2,048-row entrance (bench/blas_shapes.py;
# bench/README.md, "The weight gradient's orientation")
SUMS_TRANSPOSED_ROWS = 4096


def sums_transposed(G, rows: int) -> bool:
    """Whether :func:`weight_gradient` forms the product of ``rows`` rows transposed --
    4-D rows, which it permutes into ``G`` through a buffer anyway, and an entrance
    convolution's transposed columns, whose small product it then copies into ``G``: on
    NumPy, for sums of :data:`SUMS_TRANSPOSED_ROWS` rows or more. cuBLAS keeps the form
    measured on a GPU."""
    return is_numpy(G) and rows >= SUMS_TRANSPOSED_ROWS


def _weight_gradient(T_rows, X_rows, G, alpha, beta, ws, transposed: bool):
    if transposed and X_rows.ndim == 2 and _f_ordered(X_rows):
        # an entrance convolution's columns, (K, rows) C-ordered: as a 1x1
        # convolution's windows, formed transposed along those rows (0.5-0.8x the time)
        X_rows = X_rows.reshape(len(X_rows), 1, 1, -1)
    if X_rows.ndim == 2:
        gemm("T", "N", T_rows, X_rows, G, alpha=alpha, beta=beta)
        return G
    rows, kh, kw, c_in = X_rows.shape
    d_out = G.shape[0]
    # one row of W's size: a buffer shaped as the maps or the windows would be pooled
    # with those, and sized for their batch (NumPy: ws or not)
    held = np.empty((1, G.size), G.dtype) if ws is None else ws.take((1, G.size))
    if transposed:
        taps_t = held.reshape(kh, kw, c_in, d_out)
        gemm("T", "N", X_rows.reshape(rows, -1), T_rows, taps_t.reshape(-1, d_out),
             alpha=alpha)
        taps = taps_t.transpose(3, 0, 1, 2)
    else:
        taps = held.reshape(d_out, kh, kw, c_in)
        gemm("T", "N", T_rows, X_rows.reshape(rows, -1), taps.reshape(d_out, -1),
             alpha=alpha)
    to_weight_order(taps, G, beta)
    if ws is not None:
        ws.give(held)
    return G


def sample_rows(X_rows, B: int):
    """A layer's rows ``X_rows`` -- (B*P, K), or (B*P, kh, kw, c_in) in the windows'
    order, or F-ordered (the transpose of a C-ordered (K, B*P): an entrance
    convolution's on NumPy, :class:`gpu_mlp.layers.EntranceConv`) -- as (B, P, K), each
    sample's P rows: a view, never a copy of them all."""
    if X_rows.ndim == 2 and _f_ordered(X_rows):
        return X_rows.T.reshape(X_rows.shape[1], B, -1).transpose(1, 2, 0)
    return X_rows.reshape(B, -1, math.prod(X_rows.shape[1:]))


def to_weight_order(taps, G, beta=0.0) -> None:
    """``G <- taps + beta G`` for ``taps`` (d_out, kh, kw, c_in) in the windows' column
    order and ``G`` anything of its size in W's (d_out, c_in, kh, kw): strided copies
    and in-place ufuncs, no array made. ``beta`` a number, or on CuPy a 0-d device
    array, read there (no host read: a captured step's own)."""
    d_out, kh, kw, c_in = taps.shape
    out, moved = G.reshape(d_out, c_in, kh, kw), taps.transpose(0, 3, 1, 2)
    if not is_numpy(G):  # one kernel of the module (CuPy's ufuncs: two to compile)
        sizes = (np.int64(kh), np.int64(kw), np.int64(c_in))
        if isinstance(beta, numbers.Number):
            _launch("to_weight_order", None, taps, *sizes, G.dtype.type(beta), out)
        else:
            _launch("to_weight_order_by", None, taps, *sizes, beta, out)
        return
    if not isinstance(beta, numbers.Number):
        out *= beta
    elif beta == 0:
        out[...] = moved
        return
    elif beta != 1:
        out *= beta
    out += moved


def gemm_batched(transa: str, transb: str, a, b, out, alpha=1.0, beta=0.0):
    """``out[i] <- alpha op(a[i]) op(b[i]) + beta out[i]`` for each matrix of the 3-D
    C-contiguous stacks; ``alpha`` and ``beta`` as for :func:`gemm`. On the GPU one
    strided batched GEMM (capturable, as :func:`gemm`); on NumPy one :func:`gemm` per
    matrix, which measured faster on 2 cores than NumPy's batched matmul (its own BLAS
    threads contend with SciPy's: 4.5-6.4x slower)."""
    if not (a.ndim == b.ndim == out.ndim == 3 and len(a) == len(b) == len(out)):
        raise ValueError(f"gemm_batched: a {a.shape}, b {b.shape} and out {out.shape} must "
                         f"be 3-D stacks of one batch size")
    if a.shape[2 if transa == "N" else 1] == 0 or not len(out):
        return _empty_product(out, beta)
    if is_numpy(out):
        for a_i, b_i, out_i in zip(a, b, out):
            gemm(transa, transb, a_i, b_i, out_i, alpha, beta)
    else:
        cublas.gemm_batched(transa, transb, a, b, out, alpha, beta)
    return out


def gemv(transa: str, a, x, out, alpha=1.0, beta=0.0):
    """``out <- alpha op(a) x + beta out`` in place; ``a`` C-contiguous (on the GPU all
    three); ``alpha`` and ``beta`` as for :func:`gemm`."""
    if a.shape[1 if transa == "N" else 0] == 0:
        return _empty_product(out, beta)
    if is_numpy(out):
        result = _NUMPY_GEMV[out.dtype](alpha, a.T, x, beta, out, 0, 1, 0, 1,
                                        int(transa == "N"), 1)  # (by position)
        if result is not out:
            raise RuntimeError("BLAS gemv did not write in place; pass C-contiguous arrays")
    else:
        cublas.gemv(transa, a, x, out, alpha, beta)
    return out
