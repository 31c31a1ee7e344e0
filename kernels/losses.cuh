// losses.cuh -- the elementwise losses of gpu_mlp/losses.py, in CUDA C.
//
// Each gm_LOSS(f, y, scale, grad) returns one element's share of the per-sample loss
// and writes grad = scale * dl/df in the same pass (scale is 1/B for the batch mean,
// 1 for per-sample gradients), so the output delta costs one read of F and Y. The
// logistic loss is written as softplus(-y f), which neither overflows nor loses the
// small values for large |f|. The softmax cross-entropy needs whole rows and lives in
// rowwise.cuh.
#ifndef GPU_MLP_LOSSES_CUH
#define GPU_MLP_LOSSES_CUH

#include "activations.cuh"

// softplus(t) = log(1 + e^t) = max(t, 0) + log1p(e^{-|t|})
template <typename T>
__host__ __device__ inline T gm_softplus(T t)
{
    return gm_max_nan(t, T(0)) + log1p(exp(-fabs(t)));
}

// squared: l = (f - y)^2, dl/df = 2 (f - y)
template <typename T>
__host__ __device__ inline T gm_squared(T f, T y, T scale, T& grad)
{
    T r = f - y;
    grad = r * (T(2) * scale);
    return r * r;
}

// logistic, y in {-1, +1}: l = softplus(-y f), dl/df = -y sigmoid(-y f)
template <typename T>
__host__ __device__ inline T gm_logistic(T f, T y, T scale, T& grad)
{
    T t = -y * f;
    grad = -y * gm_sigmoid(t, T(1)) * scale;
    return gm_softplus(t);
}

#endif  // GPU_MLP_LOSSES_CUH
