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
// indices are long long, geometry int. Each function is an elementwise kernel's body:
// gpu_mlp/conv.py's ELEMENTWISE table calls it with the kernel's index i.
#ifndef GPU_MLP_CONV_CUH
#define GPU_MLP_CONV_CUH

#include "common.cuh"

// Element idx of im2col(x): x is (B, C, H, W), the result (B*OH*OW, C*kh*kw).
template <typename T>
__host__ __device__ inline T gm_im2col_at(const T* x, long long idx, int C, int H, int W,
                                          int kh, int kw, int sh, int sw, int ph, int pw,
                                          int OH, int OW)
{
    const long long K = (long long)C * kh * kw;
    const long long r = idx / K;
    const int k = (int)(idx - r * K);
    const int j = k % kw;
    const int i = (k / kw) % kh;
    const int c = k / (kw * kh);
    const int ow = (int)(r % OW);
    const long long b = r / OW / OH;
    const int oh = (int)(r / OW - b * OH);
    const int y = oh * sh - ph + i;
    const int xx = ow * sw - pw + j;
    if (y < 0 || y >= H || xx < 0 || xx >= W) return T(0);  // the zero padding
    return x[((b * C + c) * H + y) * W + xx];
}

// Element idx of col2im(cols): cols is (B*OH*OW, C*kh*kw), the result (B, C, H, W).
template <typename T>
__host__ __device__ inline T gm_col2im_at(const T* cols, long long idx, int C, int H, int W,
                                          int kh, int kw, int sh, int sw, int ph, int pw,
                                          int OH, int OW)
{
    const long long K = (long long)C * kh * kw;
    const int xx = (int)(idx % W);
    const int y = (int)(idx / W % H);
    const int c = (int)(idx / W / H % C);
    const long long b = idx / W / H / C;
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
            sum += cols[((b * OH + oh) * OW + ow) * K + (c * kh + i) * kw + j];
        }
    }
    return sum;
}

#endif  // GPU_MLP_CONV_CUH
