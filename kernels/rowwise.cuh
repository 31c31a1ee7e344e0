// rowwise.cuh -- the row-wise kernels: softmax forward and backward, and the softmax
// cross-entropy fused with its gradient (docs/MATH.md, "Losses").
//
// A row is one sample. Each __host__ __device__ function below does one row in three
// short passes (maximum, sum of exponentials, write) with the maximum subtracted, so no
// finite input overflows; the __global__ wrappers give one row to each thread. A thread
// per row suits rows of a few classes, where the batch supplies the parallelism. Wide
// rows (gpu_mlp/ops.py: ROW_KERNEL_MAX) get L threads each ("wide rows", below): the
// same passes, each its own launch, the row's maximum and sums in shares of L.
// Arrays are C-contiguous (B, C); labels are int64. A label outside [0, C) (possible
// only when the engine's checks were skipped) gives its row a NaN loss and no gradient.
#ifndef GPU_MLP_ROWWISE_CUH
#define GPU_MLP_ROWWISE_CUH

#include "common.cuh"

// out <- softmax(z + bias); bias may be null (no bias) and out may be z (in place)
template <typename T>
__host__ __device__ inline void gm_softmax_row(const T* z, const T* bias, T* out, int C)
{
    T m = z[0] + (bias ? bias[0] : T(0));
    for (int c = 1; c < C; ++c) m = gm_max_nan(m, z[c] + (bias ? bias[c] : T(0)));
    T s = T(0);
    for (int c = 0; c < C; ++c) {
        out[c] = exp(z[c] + (bias ? bias[c] : T(0)) - m);
        s += out[c];
    }
    for (int c = 0; c < C; ++c) out[c] /= s;
}

// g <- (g - <g, f>) (.) f: the vector-Jacobian product of softmax, from its output f
template <typename T>
__host__ __device__ inline void gm_softmax_backward_row(const T* f, T* g, int C)
{
    T dot = T(0);
    for (int c = 0; c < C; ++c) dot += g[c] * f[c];
    for (int c = 0; c < C; ++c) g[c] = (g[c] - dot) * f[c];
}

// Cross-entropy of logits f against a target distribution t (one row of Y), or against
// the class `label` when t is null. Writes grad = scale * (softmax(f) - t) and returns
// the row's loss, log sum exp(f) - <t, f>.
template <typename T>
__host__ __device__ inline T gm_softmax_xent_row(const T* f, const T* t, long long label,
                                                 T* grad, int C, T scale)
{
    if (!t && (label < 0 || label >= C)) {
        for (int c = 0; c < C; ++c) grad[c] = T(0);
        return gm_nan<T>();
    }
    T m = f[0];
    for (int c = 1; c < C; ++c) m = gm_max_nan(m, f[c]);
    T s = T(0);
    for (int c = 0; c < C; ++c) s += exp(f[c] - m);
    T log_s = log(s);
    T loss = T(0);
    for (int c = 0; c < C; ++c) {
        T target = t ? t[c] : (c == label ? T(1) : T(0));
        grad[c] = (exp(f[c] - m) / s - target) * scale;
        if (target != T(0)) loss += target * (log_s - (f[c] - m));
    }
    return loss;
}

// The same cross-entropy for wide rows, one element at a time, given the row's maximum m
// and s = sum exp(f - m). The gradient from e = exp(f_c - m) of column c:
template <typename T>
__host__ __device__ inline T gm_softmax_xent_grad(T e, T s, long long label, long long c, int C,
                                                  T scale)
{
    if (label < 0 || label >= C) return T(0);
    return (e / s - (c == label ? T(1) : T(0))) * scale;
}

// the row's loss against a class label, from the row f
template <typename T>
__host__ __device__ inline T gm_softmax_xent_label_loss(const T* f, T m, T s, long long label, int C)
{
    if (label < 0 || label >= C) return gm_nan<T>();
    return log(s) - (f[label] - m);
}

// one column's share of the loss against a target distribution (row sums give the loss)
template <typename T>
__host__ __device__ inline T gm_softmax_xent_term(T f, T m, T s, T target)
{
    return target != T(0) ? target * (log(s) - (f - m)) : T(0);
}

#ifdef __CUDACC__
// no __restrict__ on z and out: they may be the same array
template <typename T>
__global__ void gm_softmax_forward(const T* z, const T* __restrict__ bias, T* out, int B, int C)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B) return;
    gm_softmax_row(z + i * C, bias, out + i * C, C);
}

template <typename T>
__global__ void gm_softmax_backward(const T* __restrict__ f, T* __restrict__ g, int B, int C)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B) return;
    gm_softmax_backward_row(f + i * C, g + i * C, C);
}

template <typename T>
__global__ void gm_softmax_xent_labels(const T* __restrict__ f, const long long* __restrict__ labels,
                                       T* __restrict__ grad, T* __restrict__ row_loss,
                                       int B, int C, T scale)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B) return;
    row_loss[i] = gm_softmax_xent_row(f + i * C, (const T*)0, labels[i], grad + i * C, C, scale);
}

template <typename T>
__global__ void gm_softmax_xent_targets(const T* __restrict__ f, const T* __restrict__ targets,
                                        T* __restrict__ grad, T* __restrict__ row_loss,
                                        int B, int C, T scale)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B) return;
    row_loss[i] = gm_softmax_xent_row(f + i * C, targets + i * C, -1LL, grad + i * C, C, scale);
}

// --- wide rows: L threads a row ----------------------------------------------------------
//
// Thread i of B L takes row i / L and its columns i % L, i % L + L, ...: the L threads of
// a row read L neighbouring elements at a time (coalesced, where a thread per row reads
// one element of each of 32 rows), and each leaves its share of the row's maximum or sum
// in a (B, L) array "part_*"; the next launch reduces a row's L shares, in each thread
// that needs them. No shared memory, no synchronisation inside a kernel: a pass that
// needs the whole row's result is the next launch (and in a CUDA graph costs no host
// time). Every launch runs B L threads; out and z may be the same array.

// Thread i's row r and lane (its first column); false for the threads past the B L
__device__ inline bool gm_wide_thread(int B, int L, long long& r, int& lane)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    r = i / L;
    lane = (int)(i % L);
    return i < (long long)B * L;
}

// the row's maximum, or sum, of its L shares
template <typename T>
__device__ inline T gm_lanes_max(const T* part, int L)
{
    T m = part[0];
    for (int k = 1; k < L; ++k) m = gm_max_nan(m, part[k]);
    return m;
}

template <typename T>
__device__ inline T gm_lanes_sum(const T* part, int L)
{
    T s = T(0);
    for (int k = 0; k < L; ++k) s += part[k];
    return s;
}

// part_max <- the thread's share of the maximum of z + bias (bias may be null), from the
// row's first element on: a thread without a column (C < L) holds that one
template <typename T>
__global__ void gm_wide_max(const T* __restrict__ z, const T* __restrict__ bias,
                            T* __restrict__ part_max, int B, int C, int L)
{
    long long r;
    int lane;
    if (!gm_wide_thread(B, L, r, lane)) return;
    const T* row = z + r * C;
    T m = row[0] + (bias ? bias[0] : T(0));
    for (int c = lane; c < C; c += L) m = gm_max_nan(m, row[c] + (bias ? bias[c] : T(0)));
    part_max[r * L + lane] = m;
}

// out <- exp(z + bias - m), m the row's maximum; part_sum <- the thread's share of their sum
template <typename T>
__global__ void gm_wide_exp(const T* z, const T* __restrict__ bias,
                            const T* __restrict__ part_max, T* out, T* __restrict__ part_sum,
                            int B, int C, int L)
{
    long long r;
    int lane;
    if (!gm_wide_thread(B, L, r, lane)) return;
    const T m = gm_lanes_max(part_max + r * L, L);
    T s = T(0);
    for (int c = lane; c < C; c += L) {
        out[r * C + c] = exp(z[r * C + c] + (bias ? bias[c] : T(0)) - m);
        s += out[r * C + c];
    }
    part_sum[r * L + lane] = s;
}

// out <- out / the row's sum: softmax's last pass
template <typename T>
__global__ void gm_wide_normalize(const T* __restrict__ part_sum, T* __restrict__ out, int B,
                                  int C, int L)
{
    long long r;
    int lane;
    if (!gm_wide_thread(B, L, r, lane)) return;
    const T s = gm_lanes_sum(part_sum + r * L, L);
    for (int c = lane; c < C; c += L) out[r * C + c] /= s;
}

// part_dot <- the thread's share of <g, f> of its row
template <typename T>
__global__ void gm_wide_dot(const T* __restrict__ f, const T* __restrict__ g,
                            T* __restrict__ part_dot, int B, int C, int L)
{
    long long r;
    int lane;
    if (!gm_wide_thread(B, L, r, lane)) return;
    T dot = T(0);
    for (int c = lane; c < C; c += L) dot += g[r * C + c] * f[r * C + c];
    part_dot[r * L + lane] = dot;
}

// g <- (g - <g, f>) (.) f, the softmax backward of gm_softmax_backward_row
template <typename T>
__global__ void gm_wide_softmax_backward(const T* __restrict__ f, const T* __restrict__ part_dot,
                                         T* __restrict__ g, int B, int C, int L)
{
    long long r;
    int lane;
    if (!gm_wide_thread(B, L, r, lane)) return;
    const T dot = gm_lanes_sum(part_dot + r * L, L);
    for (int c = lane; c < C; c += L) g[r * C + c] = (g[r * C + c] - dot) * f[r * C + c];
}

// The cross-entropy of the logits f, after gm_wide_max of f and gm_wide_exp of f into grad
// (grad = exp(f - m)): grad <- scale (softmax(f) - target). Against labels the row's first
// thread writes its loss; against targets each thread its share, into part_loss, which
// gm_wide_row_sums adds up.
template <typename T>
__global__ void gm_wide_xent_labels(const T* __restrict__ f, const long long* __restrict__ labels,
                                    const T* __restrict__ part_max, const T* __restrict__ part_sum,
                                    T* __restrict__ grad, T* __restrict__ row_loss, int B, int C,
                                    int L, T scale)
{
    long long r;
    int lane;
    if (!gm_wide_thread(B, L, r, lane)) return;
    const T m = gm_lanes_max(part_max + r * L, L), s = gm_lanes_sum(part_sum + r * L, L);
    for (int c = lane; c < C; c += L)
        grad[r * C + c] = gm_softmax_xent_grad(grad[r * C + c], s, labels[r], (long long)c, C,
                                               scale);
    if (lane == 0) row_loss[r] = gm_softmax_xent_label_loss(f + r * C, m, s, labels[r], C);
}

template <typename T>
__global__ void gm_wide_xent_targets(const T* __restrict__ f, const T* __restrict__ targets,
                                     const T* __restrict__ part_max,
                                     const T* __restrict__ part_sum, T* __restrict__ grad,
                                     T* __restrict__ part_loss, int B, int C, int L, T scale)
{
    long long r;
    int lane;
    if (!gm_wide_thread(B, L, r, lane)) return;
    const T m = gm_lanes_max(part_max + r * L, L), s = gm_lanes_sum(part_sum + r * L, L);
    T loss = T(0);
    for (int c = lane; c < C; c += L) {
        const long long k = r * C + c;
        loss += gm_softmax_xent_term(f[k], m, s, targets[k]);
        grad[k] = (grad[k] / s - targets[k]) * scale;
    }
    part_loss[r * L + lane] = loss;
}

// row_loss <- the sum of the row's L shares (its first thread)
template <typename T>
__global__ void gm_wide_row_sums(const T* __restrict__ part_loss, T* __restrict__ row_loss,
                                 int B, int L)
{
    long long r;
    int lane;
    if (!gm_wide_thread(B, L, r, lane) || lane) return;
    row_loss[r] = gm_lanes_sum(part_loss + r * L, L);
}

// DP's per-sample squared gradient norms (gpu_mlp/norms.py, add_squares): a dense
// layer's, G_i = T_i x_i^T and g_i = T_i, so ||G_i||^2 + ||g_i||^2 = ||T_i||^2
// (||x_i||^2 + 1); a convolution's kept G_i and g_i. First each thread's shares of
// ||t_i||^2 (t: B x C) and ||x_i||^2 (x: B x K)...
template <typename T>
__global__ void gm_wide_square_shares(const T* __restrict__ t, const T* __restrict__ x,
                                      T* __restrict__ part_t, T* __restrict__ part_x, int B,
                                      int C, int K, int L)
{
    long long r;
    int lane;
    if (!gm_wide_thread(B, L, r, lane)) return;
    T st = T(0), sx = T(0);
    for (int c = lane; c < C; c += L) st += t[r * C + c] * t[r * C + c];
    for (int k = lane; k < K; k += L) sx += x[r * K + k] * x[r * K + k];
    part_t[r * L + lane] = st;
    part_x[r * L + lane] = sx;
}

// ...then, by the row's first thread, squares[i] += ||T_i||^2 (||x_i||^2 + 1) if
// "dense", 0 where T_i = 0 (G_i = 0 even where ||x_i||^2 overflowed; a NaN stays NaN);
// else squares[i] += ||t_i||^2 + ||x_i||^2 (a convolution's kept per-sample gradients:
// t = G_i flat, x = g_i)
template <typename T>
__global__ void gm_wide_add_squares(const T* __restrict__ part_t, const T* __restrict__ part_x,
                                    T* __restrict__ squares, int B, int L, int dense)
{
    long long r;
    int lane;
    if (!gm_wide_thread(B, L, r, lane) || lane) return;
    const T st = gm_lanes_sum(part_t + r * L, L), sx = gm_lanes_sum(part_x + r * L, L);
    if (!dense)
        squares[r] += st + sx;
    else if (st != T(0))
        squares[r] += st * (sx + T(1));
}
#endif  // __CUDACC__

#endif  // GPU_MLP_ROWWISE_CUH
