"""gpu_mlp.conv and kernels/conv.cuh: im2col and col2im, checked independently.

1. The NumPy twins against PyTorch's ``unfold`` (im2col) and ``fold`` (col2im), over
   kernel sizes 1-4, strides 1-3, paddings 0-2, non-square images and kernels.
2. The adjoint identity ``<im2col(x), Y> = <x, col2im(Y)>``, which is what makes col2im
   the right backward; planted wrong col2ims show that it catches the classic bugs.
3. The CUDA bodies of ``conv.ELEMENTWISE`` compiled by g++ and run over every index, as
   the elementwise kernels do on a GPU: the same bits as the NumPy twins.
4. The same bodies as ``__global__`` kernels through nvcc for Hopper, with -Werror.
5. The channels-last twins the engine runs (NHWC images; columns in W's order or the
   windows'): the NCHW maps reordered, adjoint, their CUDA bodies the same bits.
6. The engine keeps the maps NHWC between convolutions; 1x1 and stride = kernel
   convolutions (no column buffer, one copy) against PyTorch autograd.
"""

import ctypes
import doctest
import itertools
import math
import re
import shutil

import numpy as np
import pytest

import cuda_host
from gpu_mlp import conv, cuda, ops
from gpu_mlp.layers import ChannelsLastDense, Conv2d

torch = pytest.importorskip("torch")

KERNELS = [1, 2, 3, 4, (1, 3), (4, 2)]
STRIDES = [1, 2, 3, (1, 3), (2, 1)]
PADDINGS = [0, 1, 2, (0, 2), (2, 1)]
CHANNELS = [1, 3]
IMAGES = [(5, 8), (7, 4)]  # (H, W), both non-square
BATCH = 2


def layers_for(kernel):
    """Every (layer, x shape) of the grid with this kernel that fits its input."""
    for stride, padding, c, (h, w) in itertools.product(STRIDES, PADDINGS, CHANNELS, IMAGES):
        layer = Conv2d(c, 2, kernel, stride, padding)
        try:
            layer.output_shape((c, h, w))
        except ValueError:  # kernel larger than the padded image
            continue
        yield layer, (BATCH, c, h, w)


ALL_LAYERS = [case for kernel in KERNELS for case in layers_for(kernel)]


def cols_shape(layer, x_shape):
    _, OH, OW = layer.output_shape(x_shape[1:])
    return (x_shape[0] * OH * OW, layer.c_in * layer.kernel_size[0] * layer.kernel_size[1])


def im2col(x, layer):
    """conv.im2col into a buffer full of NaN: every entry must be written."""
    return conv.im2col(x, layer, np.full(cols_shape(layer, x.shape), np.nan, x.dtype))


def col2im(cols, layer, x_shape):
    return conv.col2im(cols, layer, np.full(x_shape, np.nan, cols.dtype))


def torch_args(layer):
    return dict(kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride)


# --- 1. against PyTorch -------------------------------------------------------------------

@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_im2col_matches_torch_unfold(kernel):
    rng = np.random.default_rng(0)
    for layer, x_shape in layers_for(kernel):
        x = rng.standard_normal(x_shape)
        # unfold gives (B, K, P) with the same (c, i, j) column order: rows are (b, p)
        want = torch.nn.functional.unfold(torch.tensor(x), **torch_args(layer))
        want = want.transpose(1, 2).reshape(cols_shape(layer, x_shape)).numpy()
        np.testing.assert_array_equal(im2col(x, layer), want, err_msg=f"{layer} on {x_shape}")


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_col2im_matches_torch_fold(kernel):
    rng = np.random.default_rng(1)
    for layer, x_shape in layers_for(kernel):
        cols = rng.standard_normal(cols_shape(layer, x_shape))
        as_unfolded = torch.tensor(cols).reshape(BATCH, -1, cols.shape[1]).transpose(1, 2)
        want = torch.nn.functional.fold(as_unfolded, x_shape[2:], **torch_args(layer))
        np.testing.assert_allclose(col2im(cols, layer, x_shape), want.numpy(), rtol=1e-14,
                                   atol=1e-14, err_msg=f"{layer} on {x_shape}")


def test_im2col_reads_a_strided_input():
    layer, x_shape = Conv2d(3, 1, (2, 3), stride=(2, 1), padding=1), (2, 3, 5, 8)
    x = np.random.default_rng(2).standard_normal((8, 5, 3, 2)).transpose(3, 2, 1, 0)
    assert x.shape == x_shape and not x.flags.c_contiguous
    np.testing.assert_array_equal(im2col(x, layer), im2col(np.ascontiguousarray(x), layer))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_stays_float32(dtype):
    layer, x_shape = Conv2d(3, 1, 3, stride=2, padding=1), (2, 3, 5, 8)
    x = np.random.default_rng(3).standard_normal(x_shape).astype(dtype)
    cols = im2col(x, layer)
    assert cols.dtype == col2im(cols, layer, x_shape).dtype == dtype
    np.testing.assert_array_equal(cols, im2col(x.astype(np.float64), layer).astype(dtype))


# --- 2. the adjoint identity, and that it has teeth -------------------------------------------

def adjoint_gap(layer, x_shape, im2col_fn, col2im_fn, seed=0):
    """``|<im2col(x), Y> - <x, col2im(Y)>|`` relative to the size of the terms."""
    rng = np.random.default_rng(seed)
    x, Y = rng.standard_normal(x_shape), rng.standard_normal(cols_shape(layer, x_shape))
    cols, back = im2col_fn(x, layer), col2im_fn(Y, layer, x_shape)
    return abs(np.vdot(cols, Y) - np.vdot(x, back)) / max(1.0, np.abs(cols * Y).sum())


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_col2im_is_the_adjoint_of_im2col(kernel):
    for layer, x_shape in layers_for(kernel):
        assert adjoint_gap(layer, x_shape, im2col, col2im) < 1e-12, f"{layer} on {x_shape}"


def gather_col2im(cols, layer, x_shape, stride_check=True):
    """col2im as the GPU computes it, a gather: pixel y is read by output row oh through
    kernel row i when y + ph - i = oh * sh -- which needs sh to divide y + ph - i."""
    B, C, H, W = x_shape
    _, OH, OW = layer.output_shape(x_shape[1:])
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    view = cols.reshape(B, OH, OW, C, kh, kw)
    out = np.zeros(x_shape)

    def reached(size, pad, offset, stride, n_out):
        d = np.arange(size) + pad - offset
        ok = (d >= 0) & (d // stride < n_out)
        if stride_check:
            ok &= d % stride == 0
        return np.flatnonzero(ok), d[ok] // stride  # pixels, and the output reading each

    for i, j in itertools.product(range(kh), range(kw)):
        ys, oh = reached(H, ph, i, sh, OH)
        xs, ow = reached(W, pw, j, sw, OW)
        part = view[:, :, :, :, i, j][:, oh[:, None], ow[None, :]]  # (B, ny, nx, C)
        out[:, :, ys[:, None], xs[None, :]] += part.transpose(0, 3, 1, 2)
    return out


def col2im_off_by_one(cols, layer, x_shape):
    """Kernel column j summed as if it were j + 1."""
    kh, kw = layer.kernel_size
    shifted = np.roll(cols.reshape(-1, layer.c_in, kh, kw), 1, axis=-1)
    return col2im(shifted.reshape(cols.shape), layer, x_shape)


WRONG_COL2IM = {
    "off-by-one kernel offset": (col2im_off_by_one, Conv2d(3, 1, (2, 3), padding=1)),
    "no stride check": (lambda c, layer, s: gather_col2im(c, layer, s, stride_check=False),
                        Conv2d(3, 1, 3, stride=(2, 3), padding=(1, 2))),
}


@pytest.mark.parametrize("wrong, layer", WRONG_COL2IM.values(), ids=WRONG_COL2IM.keys())
def test_the_adjoint_identity_catches_a_wrong_col2im(wrong, layer):
    x_shape = (2, 3, 7, 8)
    assert adjoint_gap(layer, x_shape, im2col, gather_col2im) < 1e-12  # the right gather
    assert adjoint_gap(layer, x_shape, im2col, wrong) > 1e-3


# --- 3. the CUDA bodies on the host ---------------------------------------------------------

CTYPES = cuda_host.CTYPES


def parse_params(params):
    """``[(raw, type, name)]`` from a CuPy parameter list such as "raw T x, int32 C"."""
    parsed = []
    for declaration in params.split(","):
        words = declaration.split()
        parsed.append((words[0] == "raw", words[-2], words[-1]))
    return parsed


def wrapper(op, ctype, device):
    """An ``conv.ELEMENTWISE`` body over all n output elements, as CuPy runs it: ``raw``
    inputs as pointers (``&x[0]`` is then the data), int32 scalars as ``int``, the output
    element a ``T&``, ``i`` its index. A host loop, or a ``__global__`` kernel."""
    in_params, out_params, body = conv.ELEMENTWISE[op]
    args, outputs = ["long long n"], []
    for raw, type_, name in parse_params(in_params):
        assert type_ in ("T", "int32") and raw == (type_ == "T"), f"{op}: {type_} {name}"
        args.append(f"const {ctype}* {name}" if raw else f"int {name}")
    for raw, type_, name in parse_params(out_params):
        assert type_ == "T" and not raw
        args.append(f"{ctype}* {name}_")
        outputs.append(f"T& {name} = {name}_[i];")
    element = " ".join(outputs + [body + ";"])
    signature = f"ew_{op}_{ctype}({', '.join(args)})"
    if device:
        return (f'extern "C" __global__ void {signature}\n{{\n    typedef {ctype} T;\n'
                "    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
                f"    if (i >= n) return;\n    {element}\n}}\n")
    return (f'extern "C" void {signature}\n{{\n    typedef {ctype} T;\n'
            f"    for (long long i = 0; i < n; ++i) {{ {element} }}\n}}\n")


# the bodies of conv.cuh alone; one that also calls an activation's sigma' ("{act}": the
# fused col2im_nhwc_grad) is built and checked with the engine's kernels
# (tests/test_cupy_path_on_host.py)
CONV_ONLY = [op for op, (_, _, body) in conv.ELEMENTWISE.items() if "{act}" not in body]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler (g++)")
    folder = tmp_path_factory.mktemp("conv_host")
    cpp, lib = folder / "conv_host.cpp", folder / "conv_host.so"
    cpp.write_text('#include "conv.cuh"\n' + "".join(
        wrapper(op, ctype, device=False) for op in CONV_ONLY for ctype in CTYPES.values()))
    cuda_host._run(["g++", *cuda_host.HOST_FLAGS, "-I", str(cuda.kernel_dir()), str(cpp),
                    "-o", str(lib)])
    return ctypes.CDLL(str(lib))


def run_host(host, op, source, out, layer, *extra, channels_last=False):
    """Run the C body of ``op`` over every element of ``out``, reading ``source``; the
    images (``out`` for a col2im, else ``source``) NCHW, or NHWC with ``channels_last``."""
    images = out if op.startswith("col2im") else source
    B, *shape = images.shape
    per_sample = (shape[2], shape[0], shape[1]) if channels_last else tuple(shape)
    geometry = conv.geometry(layer, per_sample)
    fn = getattr(host, f"ew_{op}_{CTYPES[source.dtype]}")
    # in the kernel's parameter order: the input, its geometry (and extras), the output
    fn(ctypes.c_longlong(out.size), source.ctypes.data_as(ctypes.c_void_p),
       *(ctypes.c_int(g) for g in (*geometry, *extra)), out.ctypes.data_as(ctypes.c_void_p))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_bodies_give_the_numpy_bits(host, dtype):
    rng = np.random.default_rng(4)
    for layer, x_shape in ALL_LAYERS:
        where = f"{layer} on {x_shape}"
        x = rng.standard_normal(x_shape).astype(dtype)
        cols = run_host(host, "im2col", x, np.full(cols_shape(layer, x_shape), np.nan, dtype),
                        layer)
        np.testing.assert_array_equal(cols, im2col(x, layer), err_msg=where)
        Y = rng.standard_normal(cols.shape).astype(dtype)
        # the gather adds in the NumPy twin's order: the same sums, bit for bit
        back = run_host(host, "col2im", Y, np.full(x_shape, np.nan, dtype), layer)
        np.testing.assert_array_equal(back, col2im(Y, layer, x_shape), err_msg=where)


def test_cuda_bodies_are_adjoint(host):
    def host_im2col(x, layer):
        return run_host(host, "im2col", x, np.empty(cols_shape(layer, x.shape)), layer)

    def host_col2im(Y, layer, x_shape):
        return run_host(host, "col2im", Y, np.empty(x_shape), layer)

    for layer, x_shape in ALL_LAYERS:
        assert adjoint_gap(layer, x_shape, host_im2col, host_col2im) < 1e-12, layer


# --- 4. nvcc, for the H100 -----------------------------------------------------------------

_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"[^"]+"\s*$', re.MULTILINE)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_cuda_bodies_build_with_nvcc_for_hopper(tmp_path):
    # conv.cuh appended to the engine's headers, as cuda.source() will have it
    headers = cuda.source()
    if "conv.cuh" not in cuda.HEADERS:
        headers += "\n" + _LOCAL_INCLUDE.sub("", (cuda.kernel_dir() / "conv.cuh").read_text())
    cu = tmp_path / "conv_device.cu"
    cu.write_text(headers + "\n" + "".join(
        wrapper(op, ctype, device=True) for op in CONV_ONLY for ctype in CTYPES.values()))
    report = cuda_host._run(["nvcc", *cuda_host.NVCC_FLAGS, str(cu), "-o",
                             str(tmp_path / "conv_device.o")])
    compiled = set(re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", report))
    assert compiled >= {f"ew_{op}_{c}" for op in CONV_ONLY for c in CTYPES.values()}


# --- bad calls and the docstring ---------------------------------------------------------

LAYER = Conv2d(3, 2, 3, padding=1)
GOOD = {"x": np.zeros((2, 3, 4, 5)), "cols": np.zeros((40, 27))}

BAD_CALLS = {
    "3-D images": (lambda: conv.im2col(np.zeros((3, 4, 5)), LAYER, GOOD["cols"]),
                   ValueError, r"x must be a \(batch, 3, height, width\) array"),
    "wrong channel count": (lambda: conv.im2col(np.zeros((2, 1, 4, 5)), LAYER, GOOD["cols"]),
                            ValueError, r"takes \(batch, 3, height, width\) images"),
    "kernel larger than the padded image": (
        lambda: conv.im2col(np.zeros((2, 3, 1, 5)), Conv2d(3, 2, 4), GOOD["cols"]),
        ValueError, r"larger than the padded input"),
    "cols of the wrong shape": (lambda: conv.im2col(GOOD["x"], LAYER, np.zeros((40, 9))),
                                ValueError, r"must have shape \(40, 27\)"),
    "col2im into the wrong shape": (
        lambda: conv.col2im(GOOD["cols"], LAYER, np.zeros((2, 3, 4, 6))),
        ValueError, r"must have shape \(48, 27\)"),
    "non-contiguous out": (lambda: conv.im2col(GOOD["x"], LAYER, np.zeros((27, 40)).T),
                           ValueError, r"im2col's out must be C-contiguous"),
    "mixed dtypes": (lambda: conv.im2col(GOOD["x"], LAYER, GOOD["cols"].astype(np.float32)),
                     TypeError, r"must share one dtype"),
}


@pytest.mark.parametrize("call, error, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_calls_raise_naming_the_problem(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_geometry_is_the_kernel_argument_order():
    names = [p.split()[-1] for p in conv.ELEMENTWISE["im2col"][0].split(",")[1:]]
    values = conv.geometry(Conv2d(3, 2, (2, 3), stride=(1, 2), padding=(0, 1)), (3, 5, 8))
    assert dict(zip(names, values)) == dict(C=3, H=5, W=8, kh=2, kw=3, sh=1, sw=2, ph=0,
                                            pw=1, OH=4, OW=4)
    assert conv.ELEMENTWISE["col2im"][0].split(",")[1:] == \
        conv.ELEMENTWISE["im2col"][0].split(",")[1:]


def test_docstring_examples_run():
    result = doctest.testmod(conv)
    assert result.attempted > 0 and result.failed == 0


# --- 5. the engine's channels-last twins (ChannelsLast: NHWC activations) ---------------------

def nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def taps_first(cols, layer):
    """(c, i, j) columns reordered to the windows' order (i, j, c)."""
    kh, kw = layer.kernel_size
    return np.ascontiguousarray(
        cols.reshape(-1, layer.c_in, kh, kw).transpose(0, 2, 3, 1).reshape(cols.shape))


def padded_buffer(layer, x_shape, dtype=np.float64):
    B, C, H, W = x_shape
    (ph, pw) = layer.padding
    return np.full((B, H + 2 * ph, W + 2 * pw, C), np.nan, dtype)  # its border is written


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_channels_last_im2col_is_the_nchw_one(kernel):
    # the NCHW im2col is torch's unfold (above): the NHWC one must give the same rows, in
    # W's column order or in the windows' order, with or without the padding scratch
    rng = np.random.default_rng(6)
    for layer, x_shape in layers_for(kernel):
        x = rng.standard_normal(x_shape)
        want, where = im2col(x, layer), f"{layer} on {x_shape}"
        for padded in (None, padded_buffer(layer, x_shape)):
            got = conv.im2col_nhwc(nhwc(x), layer, np.full(want.shape, np.nan), False, padded)
            np.testing.assert_array_equal(got, want, err_msg=where)
            got = conv.im2col_nhwc(nhwc(x), layer, np.full(want.shape, np.nan), True, padded)
            np.testing.assert_array_equal(got, taps_first(want, layer), err_msg=where)


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_channels_last_col2im_is_the_adjoint_and_the_nchw_col2im(kernel):
    rng = np.random.default_rng(7)
    for layer, x_shape in layers_for(kernel):
        Y = rng.standard_normal(cols_shape(layer, x_shape))
        out = np.full(nhwc(np.empty(x_shape)).shape, np.nan)
        back = conv.col2im_nhwc(taps_first(Y, layer), layer, out)
        np.testing.assert_allclose(back, nhwc(col2im(Y, layer, x_shape)), rtol=0, atol=1e-14,
                                   err_msg=f"{layer} on {x_shape}")
        x = rng.standard_normal(back.shape)
        cols = conv.im2col_nhwc(x, layer, np.empty(Y.shape), True)
        gap = abs(np.vdot(cols, Y) - np.vdot(x, conv.col2im_nhwc(Y, layer, out)))
        assert gap < 1e-12 * np.abs(cols * Y).sum(), f"{layer} on {x_shape}"


def test_stride_equal_to_the_kernel_tiles_without_padding_or_zeroing():
    # windows that tile the image: rows(x) is one copy of a view, col2im one copy back; the
    # rows and columns beyond the last window get 0
    layer, x_shape = Conv2d(3, 2, (2, 3), stride=(2, 3)), (2, 3, 7, 8)  # 7, 8: a remainder
    rng = np.random.default_rng(8)
    x, Y = rng.standard_normal(x_shape), rng.standard_normal(cols_shape(layer, x_shape))
    got = conv.im2col_nhwc(nhwc(x), layer, np.empty(Y.shape), True)
    np.testing.assert_array_equal(got, taps_first(im2col(x, layer), layer))
    back = conv.col2im_nhwc(taps_first(Y, layer), layer, np.full(nhwc(x).shape, np.nan))
    np.testing.assert_array_equal(back, nhwc(col2im(Y, layer, x_shape)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_cuda_bodies_give_the_numpy_bits(host, dtype):
    rng = np.random.default_rng(9)
    for layer, x_shape in ALL_LAYERS:
        where = f"{layer} on {x_shape}"
        x = nhwc(rng.standard_normal(x_shape).astype(dtype))
        shape = cols_shape(layer, x_shape)
        for order in (0, 1):
            cols = run_host(host, "im2col_nhwc", x, np.full(shape, np.nan, dtype), layer,
                            order, channels_last=True)
            np.testing.assert_array_equal(
                cols, conv.im2col_nhwc(x, layer, np.empty(shape, dtype), bool(order)),
                err_msg=where)
        Y = rng.standard_normal(shape).astype(dtype)
        need = conv.col2im_scratch(layer, x_shape[1:])
        if need is not None:  # sums (not the copy of tiling windows): from +0 on either side
            Y.reshape(-1)[::5] = -0.0
        out = np.full(x.shape, np.nan, dtype)
        back = run_host(host, "col2im_nhwc", Y, out, layer, channels_last=True)
        # the gather adds in the NumPy twin's order: the same sums, bit for bit, with or
        # without the scratch of the contiguous adds
        for scratch in (None, None if need is None else np.full(x.shape[0] * need, np.nan, dtype)):
            got = conv.col2im_nhwc(Y, layer, np.full_like(x, np.nan), scratch)
            np.testing.assert_array_equal(back.view(f"u{x.itemsize}"), got.view(f"u{x.itemsize}"),
                                          err_msg=where)


def test_col2im_scratch_refuses_a_short_or_foreign_buffer():
    layer, x = Conv2d(3, 4, 3, stride=2, padding=1), np.empty((2, 7, 6, 3))
    cols = np.empty(cols_shape(layer, (2, 3, 7, 6)))
    need = 2 * conv.col2im_scratch(layer, (3, 7, 6))
    with pytest.raises(ValueError, match=f"scratch must hold {need} values of float64"):
        conv.col2im_nhwc(cols, layer, x, np.empty(need - 1))
    with pytest.raises(ValueError, match="got 1000 of float32"):
        conv.col2im_nhwc(cols, layer, x, np.empty(1000, np.float32))


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_transposed_columns_are_im2col_transposed(kernel):
    # with the padding scratch in blocks of any size, or without it
    rng = np.random.default_rng(10)
    for layer, (_, c, h, w) in layers_for(kernel):
        x = rng.standard_normal((5, c, h, w))
        want = im2col(x, layer).T
        (ph, pw) = layer.padding
        for n in (None, 1, 2, 5):
            padded = None if n is None else np.full((n, c, h + 2 * ph, w + 2 * pw), np.nan)
            got = conv.im2col_transposed(x, layer, np.full(want.shape, np.nan), padded)
            np.testing.assert_array_equal(got, want, err_msg=f"{layer} on {x.shape}, {n}")


def test_channels_last_geometry_is_the_nchw_kernels():
    for op in ("im2col_nhwc", "col2im_nhwc"):
        assert conv.ELEMENTWISE[op][0].split(",")[1:12] == \
            conv.ELEMENTWISE["im2col"][0].split(",")[1:]


def test_channels_last_bad_calls_name_the_problem():
    layer, x = Conv2d(3, 2, 3, padding=1), np.zeros((2, 4, 5, 3))
    with pytest.raises(ValueError, match=r"x must be a \(batch, height, width, 3\) array"):
        conv.im2col_nhwc(np.zeros((2, 3, 4, 5)), layer, np.zeros((40, 27)), True)
    with pytest.raises(ValueError, match=r"must be C-contiguous of shape \(40, 27\)"):
        conv.im2col_nhwc(x, layer, np.zeros((27, 40)).T, True)
    with pytest.raises(ValueError, match=r"padding needs a buffer of shape \(2, 6, 7, 3\)"):
        conv.windows(x, layer, np.zeros((2, 6, 6, 3)))


# --- 6. the engine keeps the maps channels-last ------------------------------------------------

def test_the_engine_keeps_the_maps_nhwc_between_convolutions():
    import gpu_mlp
    from gpu_mlp.layers import Dense

    layers = [Conv2d(2, 3, 3, padding=1), Conv2d(3, 4, 1), Conv2d(4, 5, 2, stride=2),
              Dense(5 * 3 * 2, 2, "identity")]
    net = gpu_mlp.Network(layers, device="cpu", dtype="float64")
    X = np.random.default_rng(10).standard_normal((4, 2, 6, 4))
    net.train_step(X, np.zeros((4, 2)), 0.1)
    shapes = {key[0] for key in net.training_workspace._free}
    # each map as (H, W, C); NCHW only where X enters (X itself); the Dense (d_out 2 <=
    # the batch) reads the last maps NHWC, against W in their (h, w, c) order
    assert {(6, 4, 3), (6, 4, 4), (3, 2, 5)} <= shapes
    assert not {(3, 6, 4), (4, 6, 4), (5, 3, 2)} & shapes  # no NCHW copy of a map
    assert isinstance(net._engine_layers(4)[-1], ChannelsLastDense)
    # the last maps and their gradient, no more: W's copy in their order and its
    # gradient's permutation take buffers of W's size, not ones pooled with the maps
    assert len(net.training_workspace._free[((3, 2, 5), np.dtype(np.float64))]) == 2


def test_a_dense_wider_than_the_batch_takes_the_maps_nchw():
    # copying W (d_out x d_in) would cost more than copying the maps (B x d_in)
    import gpu_mlp
    from gpu_mlp.layers import Dense

    net = gpu_mlp.Network([Conv2d(2, 3, 3, stride=2), Dense(3 * 2 * 2, 6)], device="cpu",
                          dtype="float64")
    X = np.random.default_rng(10).standard_normal((4, 2, 6, 5))
    net.train_step(X, np.zeros((4, 6)), 0.1)
    assert (3, 2, 2) in {key[0] for key in net.training_workspace._free}  # NCHW maps
    assert net._engine_layers(4)[-1] is net.layers[-1]
    assert isinstance(net._engine_layers(6)[-1], ChannelsLastDense)


def test_a_1x1_convolution_has_no_column_buffer_and_to_rows_is_a_view():
    from gpu_mlp.workspace import Workspace

    ws = Workspace(np, np.float64)
    one = Conv2d(3, 4, 1).engine
    x = np.zeros((2, 5, 6, 3))
    assert np.shares_memory(one.rows(x, ws), x) and ws.allocations == 0
    T = np.zeros((2, 5, 6, 4))
    assert np.shares_memory(one.to_rows(T, ws), T) and one.to_rows(T, ws).shape == (60, 4)


@pytest.mark.parametrize("layers, shape", [
    ([Conv2d(3, 4, 1, activation="tanh"), Conv2d(4, 2, 1)], (3, 5, 4)),      # 1x1, stride 1
    ([Conv2d(2, 3, (2, 3), stride=(2, 3), activation="relu"), Conv2d(3, 2, 2, stride=2)],
     (2, 8, 13)),                                                           # tiles, remainders
], ids=["1x1", "stride-is-kernel"])
@pytest.mark.parametrize("memory", ["output", "recompute", "store_both"])
@pytest.mark.parametrize("batch", [2, 5], ids=["maps-nchw", "w-in-maps-order"])
def test_column_free_convolutions_against_torch(layers, shape, memory, batch):
    # the Dense head (d_out 3) takes the maps NCHW below batch 3, NHWC from there on
    import gpu_mlp
    from gpu_mlp.layers import Dense

    rng = np.random.default_rng(11)
    out = shape
    for layer in layers:
        out = layer.output_shape(out)
    layers = layers + [Dense(int(np.prod(out)), 3, "identity")]
    params = [(rng.standard_normal(layer.weight_shape), rng.standard_normal(layer.bias_shape))
              for layer in layers]
    net = gpu_mlp.Network.from_params(layers, params, memory=memory, device="cpu")
    X, Y = rng.standard_normal((batch, *shape)), rng.standard_normal((batch, 3))
    J, grads, dX = net.loss_and_gradients(X, Y)

    F = torch.tensor(X, requires_grad=True)
    tp = [(torch.tensor(W, requires_grad=True), torch.tensor(b, requires_grad=True))
          for W, b in params]
    out = F
    for layer, (W, b) in zip(layers, tp):
        if isinstance(layer, Conv2d):
            out = torch.nn.functional.conv2d(out, W, b, stride=layer.stride, padding=layer.padding)
        else:
            out = torch.flatten(out, 1) @ W.T + b
        out = {"tanh": torch.tanh, "gelu": torch.nn.functional.gelu, "relu": torch.relu,
               "identity": lambda a: a}[layer.activation.name](out)
    loss = ((out - torch.tensor(Y)) ** 2).sum(1).mean()  # gpu_mlp's squared loss
    loss.backward()
    assert abs(float(J) - loss.item()) < 1e-10 * abs(loss.item())
    for (dW, db), (W, b) in zip(grads, tp):
        np.testing.assert_allclose(dW, W.grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(db, b.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dX, F.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rows", [17, 4100])  # short sums; long ones, formed transposed
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (-0.1, 1.0), (0.5, 0.25)])
def test_a_gradient_from_rows_in_the_windows_order_lands_in_w_layout(alpha, beta, rows,
                                                                      monkeypatch):
    """ops.weight_gradient: rows (rows, kh, kw, c_in) -- a convolution's on NumPy -- give
    alpha T^T X + beta G with G in W's (c_out, c_in, kh, kw) order, as rows in W's own
    column order do, with a workspace's buffer or without; long sums formed as the
    transpose X^T T (ops.sums_transposed); and the engine's rows of a convolution come
    that way."""
    from gpu_mlp import ops
    from gpu_mlp.workspace import Workspace

    rng = np.random.default_rng(3)
    c_out, c_in, kh, kw = 5, 3, 2, 3
    T = rng.standard_normal((rows, c_out))
    taps = rng.standard_normal((rows, kh, kw, c_in))
    in_w_order = np.ascontiguousarray(taps.transpose(0, 3, 1, 2)).reshape(rows, -1)
    G0 = rng.standard_normal((c_out, c_in * kh * kw))
    want = alpha * T.T @ in_w_order + beta * G0
    outputs, real_gemm = [], ops.gemm

    def recording_gemm(transa, transb, a, b, out, **kwargs):
        outputs.append(out.shape)
        return real_gemm(transa, transb, a, b, out, **kwargs)

    monkeypatch.setattr(ops, "gemm", recording_gemm)
    long_sums = rows >= ops.SUMS_TRANSPOSED_ROWS
    assert ops.sums_transposed(G0, rows) == long_sums
    for ws in (None, Workspace(np, np.float64)):
        outputs.clear()
        G = G0.copy()
        assert ops.weight_gradient(T, taps, G, alpha=alpha, beta=beta, ws=ws) is G
        np.testing.assert_allclose(G, want, rtol=1e-13, atol=1e-13)
        assert outputs == [(c_in * kh * kw, c_out) if long_sums else (c_out, c_in * kh * kw)]
        if ws is not None:
            assert ws.in_use_bytes == 0  # its buffer given back
        # an entrance convolution's rows: the transpose of C-ordered columns (K, rows)
        outputs.clear()
        G = G0.copy()
        columns = np.ascontiguousarray(in_w_order.T)
        assert ops.weight_gradient(T, columns.T, G, alpha=alpha, beta=beta, ws=ws) is G
        np.testing.assert_allclose(G, want, rtol=1e-13, atol=1e-13)
        assert outputs == [(c_in * kh * kw, c_out) if long_sums else (c_out, c_in * kh * kw)]
    monkeypatch.undo()
    G2 = G0.copy()
    ops.weight_gradient(T, in_w_order, G2, alpha=alpha, beta=beta)
    np.testing.assert_allclose(G2, want, rtol=1e-13, atol=1e-13)

    layer = Conv2d(c_in, c_out, (kh, kw), padding=1).engine
    x = rng.standard_normal((2, 4, 5, c_in))  # NHWC
    X_rows = layer.rows(x, Workspace(np, np.float64))
    assert X_rows.shape[1:] == (kh, kw, c_in)
    nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    cols = np.empty((X_rows.shape[0], c_in * kh * kw))
    conv.im2col(nchw, Conv2d(c_in, c_out, (kh, kw), padding=1), cols)  # W's order
    np.testing.assert_array_equal(
        np.ascontiguousarray(X_rows.transpose(0, 3, 1, 2)).reshape(len(cols), -1), cols)


@pytest.mark.parametrize("kernel, stride, padding, size",
                         [(3, 1, 1, 9), (5, 2, 2, 2), (1, 1, 0, 9)],
                         ids=["shifted", "col2im", "direct"])
def test_an_input_gradient_given_the_layer_belows_derivative_multiplies_it_in(
        kernel, stride, padding, size, monkeypatch):
    """ChannelsLast.input_grad(derivative=(act, F)) is C^dagger(T) (.) sigma'(F) on every
    path -- fused into col2im on a GPU, a pass of its own after the GEMMs on NumPy's
    shifted and 1x1 paths -- the products ops.grad_from_output makes."""
    from gpu_mlp import activations, ops
    from gpu_mlp.workspace import Workspace

    rng = np.random.default_rng(5)
    layer = Conv2d(3, 4, kernel, stride=stride, padding=padding).engine
    # the path of the id: 3x3 stride 1 shifted (its columns not kept, small as they are),
    # 5x5 stride 2 on 2x2 maps col2im (9 grid cells an output: too many to shift)
    monkeypatch.setattr(ops, "keeps_columns", lambda *args: False)
    taken, shifted = [], type(layer)._input_grad_shifted
    monkeypatch.setattr(type(layer), "_input_grad_shifted",
                        lambda *args: (taken.append(1), shifted(*args))[1])
    B, H, W_ = 2, size, size
    _, OH, OW = layer.output_shape((3, H, W_))
    T = rng.standard_normal((B * OH * OW, 4))
    W = rng.standard_normal(layer.weight_shape)
    F = np.tanh(rng.standard_normal((B, H, W_, 3)))
    act = activations.get("tanh")
    plain, fused = np.empty((B, H, W_, 3)), np.empty((B, H, W_, 3))
    layer.input_grad(T, W, Workspace(np, np.float64), plain)
    ops.grad_from_output(act, F, plain)
    layer.input_grad(T, W, Workspace(np, np.float64), fused, derivative=(act, F))
    np.testing.assert_array_equal(fused, plain)
    assert bool(taken) == (kernel == 3 and stride == 1)


# (c_in, c_out, kernel, stride, padding, (H, W)) and the cells of conv.shifted_taps' grid
# an output position, which decide NumPy's paths: the forward by GEMMs on the shifted
# phase planes up to layers.SHIFTED_FORWARD_MAX (2.25), else im2col; C^dagger so up to
# layers.SHIFTED_ADJOINT_MAX (4), else col2im
NUMPY_CONV_CASES = {
    "s1": ((2, 3, 3, 1, 1, (12, 12)), 1.36), "s1-rect": ((4, 2, (3, 2), 1, (0, 1), (9, 8)), 1.43),
    "s2": ((2, 3, 3, 2, 1, (16, 16)), 1.27), "s2-odd": ((4, 4, 3, 2, 1, (7, 9)), 1.5),
    "tiles": ((3, 2, (2, 3), (2, 3), 0, (8, 13)), 1.25), "1x1-s2": ((2, 2, 1, 2, 0, (5, 4)), 1),
    "1x1-pad": ((2, 3, 1, 1, 1, (6, 6)), 1), "s3x2": ((3, 3, 3, (3, 2), (2, 0), (9, 6)), 1.5),
    "p>k": ((2, 1, 2, 3, 3, (4, 5)), 1), "s>k": ((2, 2, 2, 3, 0, (9, 9)), 1),
    "small": ((5, 3, 3, 1, 1, (7, 6)), 1.71), "wide-pad": ((3, 3, 3, 1, 2, (5, 5)), 1.65),
    "5x5-on-7x7": ((2, 3, 5, 1, 2, (7, 7)), 2.47), "3x3-on-3x3": ((2, 3, 3, 1, 1, (3, 3)), 2.78),
    "2x2": ((3, 2, 3, 1, 1, (2, 2)), 4), "one-output": ((2, 2, 3, 1, 0, (3, 3)), 9),
    "k=input": ((3, 3, (7, 6), 1, 0, (7, 6)), 42)}


@pytest.mark.parametrize("blocks", ["whole", "one-sample"])
@pytest.mark.parametrize("case", NUMPY_CONV_CASES)
def test_the_numpy_forward_and_input_gradient_are_torchs(monkeypatch, case, blocks):
    # the forward (without kept columns) and C^dagger on NumPy, every path: torch's
    # output and gradient, every value written (the buffers start as NaN) -- the pixels no
    # kernel offset reaches too (a stride longer than the kernel) -- over the batch whole
    # or a sample a block (layers.SHIFTED_BLOCK_BYTES), every workspace buffer given back
    from gpu_mlp import layers
    from gpu_mlp.workspace import Workspace

    monkeypatch.setattr(ops, "keeps_columns", lambda *args: False)  # (small columns)
    if blocks == "one-sample":
        monkeypatch.setattr(layers, "SHIFTED_BLOCK_BYTES", 1)
    (c_in, c_out, kernel, stride, padding, hw), cells = NUMPY_CONV_CASES[case]
    layer = Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    _, OH, OW = layer.output_shape((c_in, *hw))
    assert round(layer.engine.cells_per_output((c_in, *hw)), 2) == cells
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, c_in, *hw))
    W = rng.standard_normal(layer.weight_shape)
    T = rng.standard_normal((5, c_out, OH, OW))
    F = torch.tensor(x, requires_grad=True)
    y = torch.nn.functional.conv2d(F, torch.tensor(W), stride=layer.stride,
                                   padding=layer.padding)
    y.backward(torch.tensor(T))
    ws = Workspace(np, np.float64)
    A = np.full((5, OH, OW, c_out), np.nan)
    layer.engine.linear(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), W, ws, out=A)
    np.testing.assert_allclose(A, y.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-12,
                               atol=1e-12)
    out = np.full((5, *hw, c_in), np.nan)
    layer.engine.input_grad(np.ascontiguousarray(T.transpose(0, 2, 3, 1)).reshape(-1, c_out),
                            W, ws, out)
    np.testing.assert_allclose(out, F.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-12,
                               atol=1e-12)
    assert ws.in_use_bytes == 0


def test_the_numpy_paths_follow_the_grid(monkeypatch):
    # which path each case takes: GEMMs on the shifted planes (no im2col_nhwc, no
    # col2im_nhwc) up to the thresholds, the column buffer's beyond them -- and for
    # columns a step keeps (these cases' at batch 2: within a cache-sized block)
    from gpu_mlp import layers
    from gpu_mlp.workspace import Workspace

    for case, ((c_in, c_out, kernel, stride, padding, hw), cells) in NUMPY_CONV_CASES.items():
        layer = Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
        _, OH, OW = layer.output_shape((c_in, *hw))
        monkeypatch.setattr(ops, "keeps_columns", lambda *args: False)  # (small columns)
        calls = []
        for name in ("im2col_nhwc", "col2im_nhwc"):
            monkeypatch.setattr(ops, name, lambda *a, name=name, f=getattr(ops, name), **k:
                                calls.append(name) or f(*a, **k))
        ws = Workspace(np, np.float64)
        layer.engine.linear(np.zeros((2, *hw, c_in)), np.zeros(layer.weight_shape), ws)
        layer.engine.input_grad(np.zeros((2 * OH * OW, c_out)), np.zeros(layer.weight_shape),
                                ws, np.empty((2, *hw, c_in)))
        direct = kernel == 1 and stride == 1 and padding == 0
        want = ([] if cells <= layers.SHIFTED_FORWARD_MAX or direct else ["im2col_nhwc"]) + \
            ([] if cells <= layers.SHIFTED_ADJOINT_MAX or direct else ["col2im_nhwc"])
        assert set(calls) == set(want), case
        monkeypatch.undo()
        # columns a training step keeps (one cache-sized block): im2col and col2im
        assert not layer.engine.shifted(np.zeros((2, *hw, c_in)), ws, math.inf)


@pytest.mark.parametrize("kernel, stride, padding, size", [
    case for case in itertools.product(range(1, 5), range(1, 4), range(0, 4), range(1, 9))
    if case[0] <= case[3] + 2 * case[2]])  # kernel within the padded input
def test_the_phase_planes_hold_each_pixel_once_where_the_taps_read_it(kernel, stride,
                                                                     padding, size):
    # along both axes: the planes hold the padded image, each pixel once, zeros
    # elsewhere; kernel offset (i, j) of output (oh, ow) finds padded pixel (s oh + i,
    # s ow + j) at its shift from the output's cell; from_phases inverts to_phases
    layer = Conv2d(1, 1, kernel, stride=stride, padding=padding)
    _, OH, OW = layer.output_shape((1, size, size + 1))
    taps = conv.shifted_taps(layer, (1, size, size + 1))
    Mh, Mw = taps.grid
    x = np.arange(1.0, 1 + 2 * size * (size + 1)).reshape(2, size, size + 1, 1)
    planes = np.full((stride * stride, 2, Mh, Mw, 1), np.nan)
    conv.to_phases(x, layer, planes)
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    assert sorted(planes[planes != 0]) == sorted(x.ravel())  # each pixel once, zeros else
    flat = planes.reshape(stride * stride, -1)
    cells = 2 * Mh * Mw
    for i, j, phase, shift in taps.taps:
        for b, oh, ow in itertools.product(range(2), range(OH), range(OW)):
            p = (b * Mh + oh) * Mw + ow
            assert p + taps.reach < cells
            assert flat[phase, p + shift] == padded[b, stride * oh + i, stride * ow + j, 0]
    back = np.full_like(x, np.nan)
    conv.from_phases(planes, layer, back)
    np.testing.assert_array_equal(back, x)


def test_transposed_columns_and_shifted_taps_refuse_what_does_not_fit():
    layer = Conv2d(2, 3, 3, padding=1)
    x = np.zeros((4, 2, 5, 5))
    with pytest.raises(ValueError, match=r"x must be a \(batch, 2, height, width\)"):
        conv.im2col_transposed(x[0], layer, np.empty((18, 25)))
    with pytest.raises(ValueError, match="takes \\(batch, 2, height, width\\) images"):
        conv.im2col_transposed(np.zeros((4, 3, 5, 5)), layer, np.empty((27, 100)))
    with pytest.raises(ValueError, match=r"C-contiguous of shape \(18, 100\)"):
        conv.im2col_transposed(x, layer, np.empty((100, 18)))
    with pytest.raises(TypeError, match="one dtype"):
        conv.im2col_transposed(x, layer, np.empty((18, 100), np.float32))
    with pytest.raises(ValueError, match=r"padding needs a buffer of shape \(n, 2, 7, 7\)"):
        conv.im2col_transposed(x, layer, np.empty((18, 100)), np.empty((4, 2, 6, 6)))
    with pytest.raises(ValueError, match="larger than the padded input"):
        conv.shifted_taps(Conv2d(2, 3, 5), (2, 3, 3))
    strided = Conv2d(2, 3, 3, stride=2, padding=1)  # 5x5 maps: 2x2 planes of 4x4 cells
    nhwc, planes = np.zeros((4, 5, 5, 2)), np.zeros((4, 4, 4, 4, 2))
    conv.to_phases(nhwc, strided, planes)  # (fits)
    conv.from_phases(planes, strided, nhwc)
    for f in (lambda images, p: conv.to_phases(images, strided, p),
              lambda images, p: conv.from_phases(p, strided, images)):
        with pytest.raises(ValueError, match=r"must be a \(batch, height, width, 2\) array"):
            f(np.zeros((4, 5, 5, 3)), planes)
        with pytest.raises(ValueError, match=r"phase planes must have shape \(4, 4, 4, 4, 2\)"):
            f(nhwc, np.zeros((1, 4, 4, 4, 2)))
        with pytest.raises(TypeError, match="one dtype"):
            f(nhwc, planes.astype(np.float32))
