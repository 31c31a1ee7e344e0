// rowwise.cuh -- the row-wise kernels: softmax forward and backward, and the softmax
// cross-entropy fused with its gradient (MATH.md, "Losses" and seed 002).
//
// A row is one sample. Each __host__ __device__ function below does one row in three
// short passes (maximum, sum of exponentials, write) with the maximum subtracted, so no
// finite input overflows; the __global__ wrappers give one row to each thread. A thread
// per row suits gpu_mlp's use, where rows are the few classes of an output layer and
// the batch supplies the parallelism; the row functions are what the host tests run.
// Arrays are C-contiguous (B, C); labels are int64.
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
