// conv.cuh -- im2col and its adjoint col2im, one output element per call.
//
// A convolution layer works on rows(x) = im2col(x) (gpu_mlp/layers.py): for NCHW input
// x (B, C, H, W), kernel (kh, kw), stride (sh, sw), padding (ph, pw) and output (OH, OW),
// a C-contiguous (B*OH*OW, K) matrix, K = C*kh*kw, with row r = (b*OH + oh)*OW + ow,
// column k = (c*kh + i)*kw + j and value x[b, c, oh*sh - ph + i, ow*sw - pw + j], 0
// outside the image. col2im is its exact adjoint, (B*OH*OW, K) -> (B, C, H, W): each
// pixel the sum of the entries that read it. It is a gather, as Chainer's col2im: one
// call per pixel visits only the kernel offsets that can reach it (those whose distance
// to the pixel the stride divides), so there is no atomicAdd and the result does not
// depend on scheduling. It adds in the order of gpu_mlp/conv.py's NumPy twin (kernel
// offsets (i, j) ascending), so both give the same bits. Arrays are C-contiguous;
// geometry is int; the element index idx is of the kernel's index type I (unsigned int
// up to ops.INDEX32_MAX elements, else long long: the divisions that split idx run in
// it), the pixels and columns read are long long. Each function is an elementwise
// kernel's body: gpu_mlp/conv.py's ELEMENTWISE table calls it with the kernel's index i.
#ifndef GPU_MLP_CONV_CUH
#define GPU_MLP_CONV_CUH

#include "common.cuh"

// Layouts: an image is NCHW (channels_last = 0) or NHWC (1, the engine's channels-last
// form: gpu_mlp/layers.py, ChannelsLast); a row of the columns holds its window in W's
// own (c, i, j) order, k = (c*kh + i)*kw + j (taps_first = 0), or in an NHWC window's
// (i, j, c), k = (i*kw + j)*C + c (taps_first = 1: what the channels-last input gradient
// and col2im_nhwc use).
__host__ __device__ inline long long gm_pixel(long long b, int c, int y, int x, int C, int H,
                                              int W, int channels_last)
{
    return channels_last ? ((b * H + y) * W + x) * C + c : ((b * C + c) * H + y) * W + x;
}

__host__ __device__ inline long long gm_column(int c, int i, int j, int C, int kh, int kw,
                                               int taps_first)
{
    return taps_first ? ((long long)i * kw + j) * C + c : ((long long)c * kh + i) * kw + j;
}

// Element idx of im2col(x), x an image of either layout, the result (B*OH*OW, C*kh*kw).
template <typename T, typename I>
__host__ __device__ inline T gm_im2col_layout_at(const T* x, I idx, int C, int H, int W,
                                                 int kh, int kw, int sh, int sw, int ph,
                                                 int pw, int OH, int OW, int channels_last,
                                                 int taps_first)
{
    const I K = (I)C * kh * kw;  // a row's width, at most idx's bound: it fits I
    const I r = idx / K;
    const int k = (int)(idx - r * K);
    int c, i, j;
    if (taps_first) {
        c = k % C;
        j = (k / C) % kw;
        i = k / (C * kw);
    } else {
        j = k % kw;
        i = (k / kw) % kh;
        c = k / (kw * kh);
    }
    const int ow = (int)(r % (I)OW);
    const I row = r / (I)OW;
    const long long b = row / (I)OH;
    const int oh = (int)(row - (I)b * (I)OH);
    const int y = oh * sh - ph + i;
    const int xx = ow * sw - pw + j;
    if (y < 0 || y >= H || xx < 0 || xx >= W) return T(0);  // the zero padding
    return x[gm_pixel(b, c, y, xx, C, H, W, channels_last)];
}

// Element idx of col2im(cols), the image of either layout: the adjoint of
// gm_im2col_layout_at with the same layout and column order.
template <typename T, typename I>
__host__ __device__ inline T gm_col2im_layout_at(const T* cols, I idx, int C, int H, int W,
                                                 int kh, int kw, int sh, int sw, int ph,
                                                 int pw, int OH, int OW, int channels_last,
                                                 int taps_first)
{
    const long long K = (long long)C * kh * kw;
    int c, y, xx;
    long long b;
    if (channels_last) {
        const I pixel = idx / (I)C;
        c = (int)(idx - pixel * (I)C);
        xx = (int)(pixel % (I)W);
        y = (int)(pixel / (I)W % (I)H);
        b = pixel / (I)W / (I)H;
    } else {
        const I line = idx / (I)W;
        xx = (int)(idx - line * (I)W);
        y = (int)(line % (I)H);
        c = (int)(line / (I)H % (I)C);
        b = line / (I)H / (I)C;
    }
    // Output row oh reads this pixel through kernel row i = yp - oh*sh, 0 <= i < kh:
    // oh from ceil((yp - kh + 1) / sh) to floor(yp / sh), clipped to [0, OH). Stepping oh
    // keeps i - yp a multiple of sh, so only offsets that touch the pixel are visited.
    const int yp = y + ph, xp = xx + pw;  // the pixel in the padded image
    const int oh_lo = yp >= kh ? (yp - kh + sh) / sh : 0;
    const int ow_lo = xp >= kw ? (xp - kw + sw) / sw : 0;
    const int oh_hi = yp / sh < OH - 1 ? yp / sh : OH - 1;
    const int ow_hi = xp / sw < OW - 1 ? xp / sw : OW - 1;
    T sum = T(0);
    // oh and ow descending: offsets (i, j) ascending, the NumPy twin's order of addition
    for (int oh = oh_hi; oh >= oh_lo; --oh) {
        const int i = yp - oh * sh;
        for (int ow = ow_hi; ow >= ow_lo; --ow) {
            const int j = xp - ow * sw;
            sum += cols[((b * OH + oh) * OW + ow) * K + gm_column(c, i, j, C, kh, kw,
                                                                   taps_first)];
        }
    }
    return sum;
}

// The table's kernels (gpu_mlp/conv.py, ELEMENTWISE): the user's NCHW layout, and the
// engine's channels-last one.
template <typename T, typename I>
__host__ __device__ inline T gm_im2col_at(const T* x, I idx, int C, int H, int W,
                                          int kh, int kw, int sh, int sw, int ph, int pw,
                                          int OH, int OW)
{
    return gm_im2col_layout_at(x, idx, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW, 0, 0);
}

template <typename T, typename I>
__host__ __device__ inline T gm_col2im_at(const T* cols, I idx, int C, int H, int W,
                                          int kh, int kw, int sh, int sw, int ph, int pw,
                                          int OH, int OW)
{
    return gm_col2im_layout_at(cols, idx, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW, 0, 0);
}

template <typename T, typename I>
__host__ __device__ inline T gm_im2col_nhwc_at(const T* x, I idx, int C, int H, int W,
                                               int kh, int kw, int sh, int sw, int ph, int pw,
                                               int OH, int OW, int taps_first)
{
    return gm_im2col_layout_at(x, idx, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW, 1,
                               taps_first);
}

// col2im_nhwc: the adjoint of im2col_nhwc with taps_first
template <typename T, typename I>
__host__ __device__ inline T gm_col2im_nhwc_at(const T* cols, I idx, int C, int H,
                                               int W, int kh, int kw, int sh, int sw, int ph,
                                               int pw, int OH, int OW)
{
    return gm_col2im_layout_at(cols, idx, C, H, W, kh, kw, sh, sw, ph, pw, OH, OW, 1, 1);
}

#endif  // GPU_MLP_CONV_CUH
