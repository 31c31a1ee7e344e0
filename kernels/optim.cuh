// optim.cuh -- the optimizers' update rules, one parameter element per call.
//
// gpu_mlp/optim.py keeps per-parameter state (momentum buffer; Adam's two moments) and
// ONE scratch buffer shared by all layers: the backward pass writes a layer's gradient
// g there (one GEMM, one GEMV), and then ONE of these element functions, launched as an
// elementwise kernel over the parameter tensor (gpu_mlp/ops.py: ELEMENTWISE), does the
// whole update in place -- no .grad per parameter as in PyTorch. The rules are PyTorch's
// single-tensor ones (torch/optim/sgd.py, adam.py, written out below), operation
// for operation, so that float64 trajectories agree to rounding:
//
//   SGD with momentum mu (dampening 0), weight decay wd:
//       g <- g + wd w;  buf <- mu buf + g;  d = nesterov ? g + mu buf : buf;  w <- w - lr d
//   PyTorch sets buf = g at step 1; the buffer starts at exactly 0 here, and mu 0 + g is
//   g bit for bit, so the first step is the same without a flag.
//   Adam / AdamW:
//       g <- g + wd w          (Adam's L2 term; 0 for AdamW)
//       w <- w decay           (AdamW's decoupled decay 1 - lr wd; 1 for Adam)
//       m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g g
//       w <- w - step_size m / (sqrt(v) / sqrt(1 - b2^t) + eps),  step_size = lr / (1 - b1^t)
//   The step-dependent scalars (bias corrections, the scheduled lr) are computed on the
//   host from the host's step count, in double as PyTorch does, a window of steps ahead,
//   into a table on the device; gm_step_row picks the row of the device's step counter
//   (gpu_mlp/plan.py, StepScalars), and the kernels read their step's scalars by pointer,
//   so that a step captured as a CUDA graph and replayed sees each step's own. lerp is
//   ATen's (at::native::lerp), whose formula depends on the weight.
#ifndef GPU_MLP_OPTIM_CUH
#define GPU_MLP_OPTIM_CUH

#include "common.cuh"

// The row of a table of per-step scalars for the step ``offset`` steps past its first
// row: clamped to the table (a replay past its end keeps the last row's scalars).
__host__ __device__ inline long long gm_step_row(long long offset, int rows)
{
    return offset < 0 ? 0 : offset >= rows ? rows - 1 : offset;
}

// ATen's lerp(start, end, weight): start + weight (end - start) for |weight| < 1/2, else
// end - (end - start) (1 - weight), which is exact at weight 1
template <typename T>
__host__ __device__ inline T gm_lerp(T start, T end, T weight)
{
    const T diff = end - start;
    return fabs(weight) < T(0.5) ? start + weight * diff : end - diff * (T(1) - weight);
}

// torch.optim.SGD with momentum > 0, dampening 0: one element of w and its buffer
template <typename T>
__host__ __device__ inline void gm_sgd_momentum(T& w, T& buf, T g, T lr, T momentum,
                                                T weight_decay, int nesterov)
{
    if (weight_decay != T(0)) g = g + weight_decay * w;
    buf = buf * momentum + g;
    w = w - lr * (nesterov ? g + momentum * buf : buf);
}

// torch.optim.Adam (weight_decay: L2 in the gradient, decay = 1) and torch.optim.AdamW
// (weight_decay = 0, decay = 1 - lr wd): one element of w and its two moments
template <typename T>
__host__ __device__ inline void gm_adam(T& w, T& m, T& v, T g, T one_minus_beta1, T beta2,
                                        T one_minus_beta2, T eps, T weight_decay, T decay,
                                        T step_size, T bias_correction2_sqrt)
{
    if (weight_decay != T(0)) g = g + weight_decay * w;
    w = w * decay;
    m = gm_lerp(m, g, one_minus_beta1);
    v = v * beta2 + one_minus_beta2 * g * g;
    w = w - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps);
}

#endif  // GPU_MLP_OPTIM_CUH
