// rowwise.cuh -- the row-wise kernels: softmax forward and backward, and the softmax
// cross-entropy fused with its gradient (docs/MATH.md, "Losses").
//
// A row is one sample. Each __host__ __device__ function below does one row in three
// short passes (maximum, sum of exponentials, write) with the maximum subtracted, so no
// finite input overflows; the __global__ wrappers give one row to each thread. A thread
// per row suits rows of a few classes, where the batch supplies the parallelism; for wide
// rows (gpu_mlp/ops.py: ROW_KERNEL_MAX) CuPy's reductions find each row's maximum and sum
// and the element functions at the end of this file do the rest, one thread an element.
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
#endif  // __CUDACC__

#endif  // GPU_MLP_ROWWISE_CUH
