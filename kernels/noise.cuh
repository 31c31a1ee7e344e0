// noise.cuh -- the Gaussian noise of differentially private SGD, one element per call.
//
// DP-SGD adds N(0, (sigma C)^2) to every coordinate of a summed gradient (or, fused,
// -lr times it to the parameter). The noise is drawn here, in place, inside one
// ElementwiseKernel over the tensor (gpu_mlp/ops.py: "gaussian_noise"), so no buffer of
// the tensor's size is ever made. It comes from a counter-based generator: element i's
// normal is a pure function of (seed, stream, step, i), with no generator state to keep,
// save or advance -- every thread computes its own, in any order, and a run resumed from
// a checkpoint at step t draws exactly the noise it would have drawn.
//
// The generator is Philox4x32-10 of Random123 (Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3", SC'11), the one behind curand's curand_Philox4x32_10, as plain
// C++ (no curand header, so g++ builds it for the host tests, which check it against
// Random123's known-answer vectors). Its 4 words feed curand's Box-Muller
// (_curand_box_muller: u in (0, 1] from one word, the angle from the next), computed in
// the element type T, so a float32 kernel stays in single precision. As with curand,
// the uniform has 32 bits, so |z| <= sqrt(2 * 33 ln 2) ~ 6.76: the tails are cut there.
//
// Element i of a stream: counter (i / 4, stream, step_lo, step_hi), key (key0, key1);
// the block's outputs (x0, x1, x2, x3) give the 4 normals of elements 4(i / 4) + 0..3 as
// curand_normal4 orders them: (s sin v, s cos v) of the pair (x0, x1), then of (x2, x3).
// A stream thus holds 2^34 normals.
#ifndef GPU_MLP_NOISE_CUH
#define GPU_MLP_NOISE_CUH

#include "common.cuh"

#ifndef __CUDACC__
using std::cos;
using std::sin;
#endif

// Random123's Philox4x32 constants (include/Random123/philox.h): the multipliers, and
// the Weyl increments of the key (the golden ratio and sqrt(3) - 1)
#define GM_PHILOX_M0 0xD2511F53u
#define GM_PHILOX_M1 0xCD9E8D57u
#define GM_PHILOX_W0 0x9E3779B9u
#define GM_PHILOX_W1 0xBB67AE85u

// the low 32 bits of a * b; the high ones in hi
__host__ __device__ inline unsigned int gm_mulhilo32(unsigned int a, unsigned int b,
                                                     unsigned int& hi)
{
    const unsigned long long product = (unsigned long long)a * b;
    hi = (unsigned int)(product >> 32);
    return (unsigned int)product;
}

// One Philox round on the counter, in place (Random123's _philox4x32round)
__host__ __device__ inline void gm_philox4x32_round(unsigned int (&ctr)[4], unsigned int key0,
                                                    unsigned int key1)
{
    unsigned int hi0, hi1;
    const unsigned int lo0 = gm_mulhilo32(GM_PHILOX_M0, ctr[0], hi0);
    const unsigned int lo1 = gm_mulhilo32(GM_PHILOX_M1, ctr[2], hi1);
    const unsigned int c1 = ctr[1], c3 = ctr[3];
    ctr[0] = hi1 ^ c1 ^ key0;
    ctr[1] = lo1;
    ctr[2] = hi0 ^ c3 ^ key1;
    ctr[3] = lo0;
}

// Philox4x32-10: the counter becomes the 4 random words of (counter, key); the key is
// bumped by the Weyl increments before each round but the first, as in Random123
__host__ __device__ inline void gm_philox4x32_10(unsigned int (&ctr)[4], unsigned int key0,
                                                 unsigned int key1)
{
    gm_philox4x32_round(ctr, key0, key1);
    for (int round = 1; round < 10; ++round) {
        key0 += GM_PHILOX_W0;
        key1 += GM_PHILOX_W1;
        gm_philox4x32_round(ctr, key0, key1);
    }
}

// cos(pi t) or sin(pi t). On the device CUDA's cospi/sinpi, whose argument reduction
// is a rounding: sinf's, for huge arguments (never reached here, but compiled), works in
// double, and a float32 kernel must hold no double instruction. The host (the tests'
// build, and nvcc's host pass) has no sinpi before C23 and multiplies by pi.
template <typename T>
__host__ __device__ inline T gm_cos_or_sin_pi(T t, bool cosine)
{
#ifdef __CUDA_ARCH__
    return cosine ? cospi(t) : sinpi(t);
#else
    const T angle = T(3.14159265358979323846) * t;
    return cosine ? cos(angle) : sin(angle);
#endif
}

// curand's _curand_box_muller in T: u = x 2^-32 + 2^-33 (in (0, 1]), the angle v =
// 2 pi (y 2^-32 + 2^-33) (curand: y CURAND_2POW32_INV_2PI + CURAND_2POW32_INV_2PI / 2),
// taken here as pi t with t = y 2^-31 + 2^-32, exact but for T(y)'s rounding in float;
// s = sqrt(-2 log u); s sin v, or s cos v
template <typename T>
__host__ __device__ inline T gm_box_muller(unsigned int x, unsigned int y, bool cosine)
{
    const T two_pow_32_inv = T(2.3283064365386963e-10);  // 2^-32, exact in float
    const T u = T(x) * two_pow_32_inv + two_pow_32_inv / T(2);
    const T t = T(y) * (two_pow_32_inv * T(2)) + two_pow_32_inv;
    return sqrt(T(-2) * log(u)) * gm_cos_or_sin_pi(t, cosine);
}

// w <- w + scale z_i, z_i the i-th standard normal of the stream (stream, step) of the
// generator keyed by (key0, key1) (see the top of this file); i < 2^34
template <typename T>
__host__ __device__ inline void gm_gaussian_noise(T& w, T scale, long long i, unsigned int key0,
                                                  unsigned int key1, unsigned int stream,
                                                  unsigned int step_lo, unsigned int step_hi)
{
    unsigned int r[4] = {(unsigned int)(i >> 2), stream, step_lo, step_hi};
    gm_philox4x32_10(r, key0, key1);
    const int pair = (int)(i & 3) >> 1;  // elements 0, 1 from (x0, x1); 2, 3 from (x2, x3)
    w = w + scale * gm_box_muller<T>(r[2 * pair], r[2 * pair + 1], (i & 1) != 0);
}

#endif  // GPU_MLP_NOISE_CUH
