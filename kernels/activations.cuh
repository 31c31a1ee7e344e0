// activations.cuh -- the activation table of gpu_mlp/activations.py, in CUDA C.
//
// For every elementwise activation NAME there are three functions, the names of which
// gpu_mlp/cuda.py derives from the table: gm_NAME(z, alpha) is the value,
// gm_NAME_grad(z, alpha) the derivative from the input, and, where the derivative is a
// function of the output alone (docs/MATH.md's activation table),
// gm_NAME_grad_from_output(f, alpha).
// `alpha` is ReLU's scale; the other activations ignore it. Formulas match the NumPy
// table exactly, operation for operation, so both backends round alike: the sigmoid
// uses exp(-|z|) and never overflows, GELU uses erfc so its negative tail keeps its
// relative accuracy, and ReLU propagates NaN (its derivative at 0 is 0 in every mode).
// Softmax is row-wise and lives in rowwise.cuh.
#ifndef GPU_MLP_ACTIVATIONS_CUH
#define GPU_MLP_ACTIVATIONS_CUH

#include "common.cuh"

// identity
template <typename T>
__host__ __device__ inline T gm_identity(T z, T alpha) { return z; }
template <typename T>
__host__ __device__ inline T gm_identity_grad(T z, T alpha) { return T(1); }
template <typename T>
__host__ __device__ inline T gm_identity_grad_from_output(T f, T alpha) { return T(1); }

// relu with scale alpha > 0: alpha * max(0, z), NaN in -> NaN out
template <typename T>
__host__ __device__ inline T gm_relu(T z, T alpha)
{
    return (z > T(0) || z != z) ? alpha * z : T(0);
}
template <typename T>
__host__ __device__ inline T gm_relu_grad(T z, T alpha) { return z > T(0) ? alpha : T(0); }
template <typename T>
__host__ __device__ inline T gm_relu_grad_from_output(T f, T alpha)
{
    return f > T(0) ? alpha : T(0);
}

// sigmoid: 1 / (1 + e^{-z}) written with e = exp(-|z|) <= 1, so nothing overflows
template <typename T>
__host__ __device__ inline T gm_sigmoid(T z, T alpha)
{
    T e = exp(-fabs(z));
    return (z >= T(0) ? T(1) : e) / (T(1) + e);
}
template <typename T>
__host__ __device__ inline T gm_sigmoid_grad_from_output(T f, T alpha) { return f * (T(1) - f); }
template <typename T>
__host__ __device__ inline T gm_sigmoid_grad(T z, T alpha)
{
    return gm_sigmoid_grad_from_output(gm_sigmoid(z, alpha), alpha);
}

// tanh
template <typename T>
__host__ __device__ inline T gm_tanh(T z, T alpha) { return tanh(z); }
template <typename T>
__host__ __device__ inline T gm_tanh_grad_from_output(T f, T alpha) { return T(1) - f * f; }
template <typename T>
__host__ __device__ inline T gm_tanh_grad(T z, T alpha)
{
    return gm_tanh_grad_from_output(tanh(z), alpha);
}

// gelu (exact, erf form): z * Phi(z). Its derivative is not a function of its output,
// so it has no _grad_from_output and the "output" memory mode refuses it.
template <typename T>
__host__ __device__ inline T gm_normal_cdf(T z) { return T(0.5) * erfc(-z * T(0.70710678118654752440)); }
template <typename T>
__host__ __device__ inline T gm_gelu(T z, T alpha) { return z * gm_normal_cdf(z); }
template <typename T>
__host__ __device__ inline T gm_gelu_grad(T z, T alpha)
{
    return gm_normal_cdf(z) + z * T(0.39894228040143267794) * exp(T(-0.5) * z * z);
}

#endif  // GPU_MLP_ACTIVATIONS_CUH
