// common.cuh -- what every gpu_mlp kernel source shares.
//
// The device math of gpu_mlp is written as `__host__ __device__` templates so that the
// same text compiles three ways: by NVRTC when CuPy builds the kernels at run time, by
// nvcc in the test suite, and by the host C++ compiler, whose build the tests call
// through ctypes to check every formula against gpu_mlp's NumPy tables on a machine
// without a GPU. Outside CUDA the qualifiers expand to nothing and the math comes from
// <cmath>; inside CUDA (NVRTC included) the overloaded device math functions are used.
#ifndef GPU_MLP_COMMON_CUH
#define GPU_MLP_COMMON_CUH

#ifndef __CUDACC__
#include <cmath>
#define __host__
#define __device__
#define __global__
using std::erfc;
using std::exp;
using std::fabs;
using std::log;
using std::log1p;
using std::nan;
using std::sqrt;
using std::tanh;
#endif

// NaN-propagating maximum: fmax() would drop a NaN, and a NaN must never be hidden.
template <typename T>
__host__ __device__ inline T gm_max_nan(T a, T b)
{
    return (a != a || a > b) ? a : b;
}

// A quiet NaN: what a result is when its input makes no sense (a label out of range).
template <typename T>
__host__ __device__ inline T gm_nan()
{
    return T(nan(""));
}

// The index of a row's largest entry, the first of equals, a NaN counting as the largest
// (the first NaN): NumPy's argmax.
template <typename T>
__host__ __device__ inline long long gm_argmax(const T* row, long long width)
{
    long long best = 0;
    T most = row[0];
    for (long long c = 1; c < width; ++c) {
        if (most == most && (row[c] > most || row[c] != row[c])) {
            most = row[c];
            best = c;
        }
    }
    return best;
}

#endif  // GPU_MLP_COMMON_CUH
