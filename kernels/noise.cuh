// noise.cuh -- the Gaussian noise of differentially private SGD, one element per call.
//
// DP-SGD adds N(0, (sigma C)^2) to every coordinate of a summed gradient (or, fused,
// -lr times it to the parameter). The noise is drawn here, in place, inside one
// elementwise kernel over the tensor (gpu_mlp/ops.py: "gaussian_noise"), so no buffer of
// the tensor's size is ever made. It comes from a counter-based generator: element i's
// normal is a pure function of (seed, stream, step, i), with no generator state to keep,
// save or advance -- every thread computes its own, in any order, and a run resumed from
// a checkpoint at step t draws exactly the noise it would have drawn.
//
// The generator is Philox4x32-10 of Random123 (Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3", SC'11), the one behind curand's curand_Philox4x32_10, as plain
// C++ (no curand header, so g++ builds it for the host tests, which check it against
// Random123's known-answer vectors). Its 4 words feed curand's Box-Muller
// (_curand_box_muller: u in (0, 1) from one word, the angle from the next), computed in
// double from +, -, *, / and sqrt alone (below), then rounded once to T: the CPU's
// NumPy twin does the same operations and gets the same bits. As with curand, the
// uniform has 32 bits, so |z| <= sqrt(2 * 33 ln 2) ~ 6.76: the tails are cut there.
//
// Element i of a stream: counter (i / 4, stream, step_lo, step_hi), key (key0, key1);
// the block's outputs (x0, x1, x2, x3) give the 4 normals of elements 4(i / 4) + 0..3 as
// curand_normal4 orders them: (s sin v, s cos v) of the pair (x0, x1), then of (x2, x3).
// A stream thus holds 2^34 normals.
#ifndef GPU_MLP_NOISE_CUH
#define GPU_MLP_NOISE_CUH

#include "common.cuh"

#ifndef __CUDA_ARCH__
#include <cstring>
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

// --- the normal, in double, by +, -, *, / and sqrt alone ------------------------------
//
// The CPU draws the very same stream (gpu_mlp/ops.py: _add_normal_block, the same steps
// in NumPy), so a seed gives the same noise on every device. The Philox words and the
// uniforms from them are integers and exact; log, sin and cos of libraries are not (CUDA's
// and glibc's and NumPy's differ in the last ulp). So the normal is computed here by
// fdlibm's polynomials (Sun's e_log.c, k_sin.c, k_cos.c: the constants below), in double,
// from IEEE basic operations only -- each correctly rounded on every device -- in one
// fixed order: the device's ones are the _rn intrinsics, which the compiler never fuses
// into an FMA, and the host's plain operators (g++ without -mfma contracts nothing).
// The result is then bit for bit the NumPy one, in float64 and, rounded once, in float32
// (as is w + scale z, its product and sum rounded apart on both sides; only float32
// subnormals, which the device flushes, could differ); it is within 4 ulp of double of
// the exact Box-Muller value (tests/test_noise.py; docs/MATH.md, "DP-SGD", the noise).

#ifdef __CUDA_ARCH__
__device__ inline double gm_dadd(double a, double b) { return __dadd_rn(a, b); }
__device__ inline double gm_dsub(double a, double b) { return __dsub_rn(a, b); }
__device__ inline double gm_dmul(double a, double b) { return __dmul_rn(a, b); }
__device__ inline double gm_ddiv(double a, double b) { return __ddiv_rn(a, b); }
__device__ inline double gm_dsqrt(double a) { return __dsqrt_rn(a); }
__device__ inline float gm_add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline float gm_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double gm_add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ inline double gm_mul_rn(double a, double b) { return __dmul_rn(a, b); }
#else
inline double gm_dadd(double a, double b) { return a + b; }
inline double gm_dsub(double a, double b) { return a - b; }
inline double gm_dmul(double a, double b) { return a * b; }
inline double gm_ddiv(double a, double b) { return a / b; }
inline double gm_dsqrt(double a) { return sqrt(a); }
template <typename T>
inline T gm_add_rn(T a, T b) { return a + b; }
template <typename T>
inline T gm_mul_rn(T a, T b) { return a * b; }
#endif

// frexp of a positive normal double, by its bits alone (no floating-point operation
// that a compiler could contract): m = f 2^e with f in [1/2, 1), exact
__host__ __device__ inline double gm_frexp(double m, int& e)
{
#ifdef __CUDA_ARCH__
    unsigned long long bits = (unsigned long long)__double_as_longlong(m);
#else
    unsigned long long bits;
    std::memcpy(&bits, &m, sizeof bits);
#endif
    e = (int)(bits >> 52) - 1022;
    bits = (bits & 0x000FFFFFFFFFFFFFull) | (1022ull << 52);
#ifdef __CUDA_ARCH__
    return __longlong_as_double((long long)bits);
#else
    double f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

// log(u) of the uniform u = (2 x + 1) 2^-33 (curand's x 2^-32 + 2^-33, in (0, 1), exact in
// double): m = 2 x + 1 = f 2^e with f in [sqrt(1/2), sqrt(2)) (exact), then
// fdlibm's log(f) + (e - 33) ln 2, without its special cases (m is a normal number > 0)
__host__ __device__ inline double gm_log_uniform(unsigned int x)
{
    const double Lg1 = 6.666666666666735130e-01, Lg2 = 3.999999999940941908e-01,
                 Lg3 = 2.857142874366239149e-01, Lg4 = 2.222219843214978396e-01,
                 Lg5 = 1.818357216161805012e-01, Lg6 = 1.531383769920937332e-01,
                 Lg7 = 1.479819860511658591e-01;
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    int e;
    double f = gm_frexp(double(2ull * x + 1ull), e);  // [1/2, 1): exact
    if (f < 0.70710678118654757) {  // sqrt(1/2) rounded: where it falls does not matter
        f = gm_dadd(f, f);
        e -= 1;
    }
    f = gm_dsub(f, 1.0);  // exact (Sterbenz)
    const double dk = double(e - 33);
    const double s = gm_ddiv(f, gm_dadd(2.0, f));
    const double z = gm_dmul(s, s);
    const double w = gm_dmul(z, z);
    double t1 = gm_dadd(Lg4, gm_dmul(w, Lg6));  // w (Lg2 + w (Lg4 + w Lg6))
    t1 = gm_dmul(w, gm_dadd(Lg2, gm_dmul(w, t1)));
    double t2 = gm_dadd(Lg5, gm_dmul(w, Lg7));  // z (Lg1 + w (Lg3 + w (Lg5 + w Lg7)))
    t2 = gm_dadd(Lg3, gm_dmul(w, t2));
    t2 = gm_dmul(z, gm_dadd(Lg1, gm_dmul(w, t2)));
    const double R = gm_dadd(t2, t1);
    const double hfsq = gm_dmul(gm_dmul(0.5, f), f);
    // dk ln2_hi - ((hfsq - (s (hfsq + R) + dk ln2_lo)) - f)
    return gm_dsub(gm_dmul(dk, ln2_hi),
                   gm_dsub(gm_dsub(hfsq, gm_dadd(gm_dmul(s, gm_dadd(hfsq, R)),
                                                 gm_dmul(dk, ln2_lo))),
                           f));
}

// fdlibm's sin(a) and cos(a) on |a| <= pi/4 (k_sin.c, and k_cos.c as FreeBSD/musl write it)
__host__ __device__ inline double gm_sin_kernel(double a)
{
    const double S1 = -1.66666666666666324348e-01, S2 = 8.33333333332248946124e-03,
                 S3 = -1.98412698298579493134e-04, S4 = 2.75573137070700676789e-06,
                 S5 = -2.50507602534068634195e-08, S6 = 1.58969099521155010221e-10;
    const double z = gm_dmul(a, a);
    const double v = gm_dmul(z, a);
    double r = gm_dadd(S5, gm_dmul(z, S6));  // S2 + z (S3 + z (S4 + z (S5 + z S6)))
    r = gm_dadd(S4, gm_dmul(z, r));
    r = gm_dadd(S3, gm_dmul(z, r));
    r = gm_dadd(S2, gm_dmul(z, r));
    return gm_dadd(a, gm_dmul(v, gm_dadd(S1, gm_dmul(z, r))));  // a + v (S1 + z r)
}

__host__ __device__ inline double gm_cos_kernel(double a)
{
    const double C1 = 4.16666666666666019037e-02, C2 = -1.38888888888741095749e-03,
                 C3 = 2.48015872894767294178e-05, C4 = -2.75573143513906633035e-07,
                 C5 = 2.08757232129817482790e-09, C6 = -1.13596475577881948265e-11;
    const double z = gm_dmul(a, a);
    double r = gm_dadd(C5, gm_dmul(z, C6));  // z (C1 + z (C2 + ... + z (C5 + z C6)))
    r = gm_dadd(C4, gm_dmul(z, r));
    r = gm_dadd(C3, gm_dmul(z, r));
    r = gm_dadd(C2, gm_dmul(z, r));
    r = gm_dmul(z, gm_dadd(C1, gm_dmul(z, r)));
    const double hz = gm_dmul(0.5, z);
    const double w = gm_dsub(1.0, hz);
    return gm_dadd(w, gm_dadd(gm_dsub(gm_dsub(1.0, w), hz), gm_dmul(z, r)));  // w + (1-w-hz + zr)
}

// sin(pi t) or cos(pi t) of curand's angle pi t, t = (2 y + 1) 2^-32 in (0, 2): reduced
// exactly, in integers, to t = q / 2 + d 2^-32 with q = round(2 t) in 0..4 and
// |d| < 2^30, so |a| = |pi d 2^-32| < pi / 4, then the quadrant's kernel and sign
__host__ __device__ inline double gm_sin_or_cos_pi(unsigned int y, bool cosine)
{
    const double pi_2pow_m32 = 3.141592653589793116 * 2.3283064365386963e-10;  // exact
    const unsigned long long k = 2ull * y + 1ull;
    const unsigned long long q = (k + (1ull << 30)) >> 31;  // no ties: k is odd
    const long long d = (long long)k - (long long)(q << 31);
    const double a = gm_dmul(double(d), pi_2pow_m32);
    // sin(pi t) = sin a, cos a, -sin a, -cos a and cos(pi t) = cos a, -sin a, -cos a, sin a
    // for q = 0, 1, 2, 3 (4 as 0)
    const bool use_cos = ((q & 1) != 0) != cosine;
    const bool negative = cosine ? (((q + 1) & 2) != 0) : ((q & 2) != 0);
    const double value = use_cos ? gm_cos_kernel(a) : gm_sin_kernel(a);
    return negative ? -value : value;
}

// curand's _curand_box_muller, in double: u = x 2^-32 + 2^-33 (in (0, 1)), the angle
// v = 2 pi (y 2^-32 + 2^-33) = pi t; sqrt(-2 log u) sin v, or its cos v; rounded once to T
template <typename T>
__host__ __device__ inline T gm_box_muller(unsigned int x, unsigned int y, bool cosine)
{
    const double radius = gm_dsqrt(gm_dmul(-2.0, gm_log_uniform(x)));
    return T(gm_dmul(radius, gm_sin_or_cos_pi(y, cosine)));
}

// w <- w + scale z_i, z_i the i-th standard normal of the stream (stream, step) of the
// generator keyed by (key0, key1) (see the top of this file); i < 2^34. The product and
// the sum are rounded apart (no FMA), as NumPy's w + scale z.
template <typename T>
__host__ __device__ inline void gm_gaussian_noise(T& w, T scale, long long i, unsigned int key0,
                                                  unsigned int key1, unsigned int stream,
                                                  unsigned int step_lo, unsigned int step_hi)
{
    unsigned int r[4] = {(unsigned int)(i >> 2), stream, step_lo, step_hi};
    gm_philox4x32_10(r, key0, key1);
    const int pair = (int)(i & 3) >> 1;  // elements 0, 1 from (x0, x1); 2, 3 from (x2, x3)
    w = gm_add_rn(w, gm_mul_rn(scale, gm_box_muller<T>(r[2 * pair], r[2 * pair + 1],
                                                       (i & 1) != 0)));
}

#endif  // GPU_MLP_NOISE_CUH
