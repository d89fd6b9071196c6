/* The library's one SIMD layer. Not installed.
 *
 * Vector types of the machine's width (GCC vector extensions), one exp, one
 * horizontal-sum tree, and the run-time choice of the instruction set.
 *
 * Kernel sources (the per-ISA sections of ops/attention.c and
 * ops/sparse_attention.c, see CMakeLists.txt "per-ISA kernels") are compiled
 * once per level with PL_ISA set and the matching -march:
 *   PL_ISA 4: x86-64-v4 (AVX-512F/BW/DQ/VL), pl_vf has 16 lanes;
 *   PL_ISA 3: x86-64-v3 (AVX2 + FMA), 8 lanes;
 *   PL_ISA 1: baseline x86-64 (SSE2), 4 lanes (also every non-x86 build).
 * A kernel f is defined as PL_ISA_FN(f), i.e. f_v4, f_v3 or f_v1; callers
 * declare all three with PL_ISA_DECLARE and call PL_ISA_PICK(f, level)(...)
 * with level = pl__isa(), taken once per op (and saved with what backward
 * needs, so that both halves use the same layout).
 *
 * pl__isa() is the CPU's best level, lowered by the environment variable
 * PLASA_ISA=avx512|avx2|baseline (read once) or by pl__isa_force (tests run
 * every path the CPU has against the scalar references this way). */
#ifndef PLASA_SIMD_H
#define PLASA_SIMD_H

#include <stdint.h>
#if defined(__FMA__)
#include <immintrin.h>
#endif

/* ---- run-time choice (lib/simd.c) ---- */
enum { PL_ISA_BASELINE = 1, PL_ISA_AVX2 = 3, PL_ISA_AVX512 = 4 };
/* The level kernels use now: min(CPU, PLASA_ISA, forced). */
int pl__isa(void);
/* The best level this CPU (and build) can run. */
int pl__isa_cpu(void);
/* Caps the level at `level` (PL_ISA_*), or removes the cap (0). Returns the
 * level kernels will use. Not thread-safe: tests call it between ops. */
int pl__isa_force(int level);
/* Whether the AVX-512 kernels may use AVX512-VNNI (CPU has it, level avx512). */
int pl__cpu_vnni(void);
/* Whether the AVX-512 kernels may use AVX512_BF16 (CPU has it, level avx512). */
int pl__cpu_bf16(void);
/* "avx512", "avx2" or "baseline". */
const char *pl__isa_name(int level);
/* Lanes of pl_vf at a level (16, 8, 4). */
static inline int pl__isa_width(int level) {
    return level >= PL_ISA_AVX512 ? 16 : level >= PL_ISA_AVX2 ? 8 : 4;
}

#if defined(__x86_64__) && !defined(PL_NO_ISA_CLONES)
#define PL_ISA_DECLARE(ret, f, params) ret f##_v4 params, f##_v3 params, f##_v1 params
#define PL_ISA_PICK(f, level)                                                                      \
    ((level) >= PL_ISA_AVX512 ? f##_v4 : (level) >= PL_ISA_AVX2 ? f##_v3 : f##_v1)
#else
#define PL_ISA_DECLARE(ret, f, params) ret f##_v1 params
#define PL_ISA_PICK(f, level) f##_v1
#endif

#ifdef PL_ISA
#if PL_ISA == 4
#define PL_ISA_FN(f) f##_v4
#elif PL_ISA == 3
#define PL_ISA_FN(f) f##_v3
#else
#define PL_ISA_FN(f) f##_v1
#endif
#endif

/* ---- vectors of the width this file is compiled for ---- */
#if defined(__AVX512F__)
#define PL_VW 16
#elif defined(__AVX2__)
#define PL_VW 8
#else
#define PL_VW 4
#endif

typedef float pl_vf __attribute__((vector_size(4 * PL_VW)));
typedef float pl_vfu __attribute__((vector_size(4 * PL_VW), aligned(4)));
typedef int32_t pl_vi __attribute__((vector_size(4 * PL_VW)));
typedef uint32_t pl_vu __attribute__((vector_size(4 * PL_VW)));
typedef uint32_t pl_vuu __attribute__((vector_size(4 * PL_VW), aligned(4)));

#define PL_AI __attribute__((always_inline)) inline
/* Unaligned load and store. */
#define PL_LD(p) (*(const pl_vfu *)(p))
#define PL_ST(p, x) (*(pl_vfu *)(p) = (x))
#define PL_LDU(p) (*(const pl_vuu *)(p))
/* m ? a : b, lane by lane (m from a vector comparison: all ones or zero). */
#define PL_SEL(m, a, b) ((pl_vf)(((pl_vi)(a) & (m)) | ((pl_vi)(b) & ~(m))))

static PL_AI pl_vf pl_splat(float x) {
    pl_vf v = {0};
    return v + x;
}
/* {0, 1, ..., PL_VW - 1} */
static PL_AI pl_vf pl_iota(void) {
    pl_vf v;
    for (int i = 0; i < PL_VW; i++) v[i] = (float)i;
    return v;
}
/* max(x, 0) lane by lane, NaN in NaN out (as pl__relu). */
static PL_AI pl_vf pl_vrelu(pl_vf x) { return PL_SEL(x <= pl_splat(0.0f), pl_splat(0.0f), x); }
/* a*b + c: one fused multiply-add where the level has FMA (x86-64-v3, v4), else
 * a multiply and an add. Kernels built with -ffp-contract=off (ops/indexer.c)
 * use it where an sgemm's inner product would use an FMA. */
#if defined(__FMA__) && PL_VW == 16
static PL_AI pl_vf pl_vfma(pl_vf a, pl_vf b, pl_vf c) {
    return (pl_vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
#elif defined(__FMA__) && PL_VW == 8
static PL_AI pl_vf pl_vfma(pl_vf a, pl_vf b, pl_vf c) {
    return (pl_vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
#else
static PL_AI pl_vf pl_vfma(pl_vf a, pl_vf b, pl_vf c) { return a * b + c; }
#endif
/* x rounded up to a multiple of PL_VW. */
static inline int64_t pl_rupw(int64_t x) { return (x + PL_VW - 1) & ~(int64_t)(PL_VW - 1); }

/* ---- the one exp ----
 * e^x in float, ~2 ulp, branch free. Cephes' expf: x = n ln2 + r with
 * |r| <= ln2/2, e^r by a degree-7 polynomial, 2^n put into the exponent bits.
 * x < -87 (and -inf) gives 0 instead of a denormal; x > 88 gives e^88; NaN
 * stays NaN in the scalar form. PL__EXP_CORE is the one definition of the
 * reduction and polynomial, used by the scalar pl__expf (whose loops GCC
 * vectorises) and by the vector pl_vexp. */
#define PL__EXP_CORE(xc, t, n, p)                                                                  \
    do {                                                                                           \
        /* n = round(x / ln2) by the 1.5*2^23 trick (exact in float). */                           \
        t = xc * 1.44269504088896341f + 12582912.0f;                                               \
        n = t - 12582912.0f;                                                                       \
        __typeof__(xc) r_ = xc - n * 0.693359375f;                                                 \
        r_ = r_ - n * -2.12194440e-4f;                                                             \
        PL__EXP_POLY(r_, p);                                                                       \
    } while (0)
/* p = e^r for |r| <= ln2/2 (Cephes' degree-7 polynomial): the one polynomial,
 * shared by the e^x reduction above and the 2^y one of pl_vexp2. */
#define PL__EXP_POLY(r_, p)                                                                        \
    do {                                                                                           \
        p = r_ * 1.9875691500e-4f + 1.3981999507e-3f;                                              \
        p = p * r_ + 8.3334519073e-3f;                                                             \
        p = p * r_ + 4.1665795894e-2f;                                                             \
        p = p * r_ + 1.6666665459e-1f;                                                             \
        p = p * r_ + 5.0000001201e-1f;                                                             \
        p = p * r_ * r_ + r_ + 1.0f;                                                               \
    } while (0)

static inline float pl__expf(float x) {
    float xc = x > -87.0f ? x : -87.0f; /* also maps NaN to a number */
    xc = xc < 88.0f ? xc : 88.0f;
    float t, n, p;
    PL__EXP_CORE(xc, t, n, p);
    union {
        float f;
        int32_t i;
    } u = {p};
    u.i += (int32_t)n * (1 << 23);
    float y = x < -87.0f ? 0.0f : u.f;
    return x == x ? y : x;
}

static PL_AI pl_vf pl_vexp(pl_vf x) {
    const pl_vi under = x < pl_splat(-87.0f);
    x = PL_SEL(under, pl_splat(-87.0f), x);
    x = PL_SEL(x > pl_splat(88.0f), pl_splat(88.0f), x);
    pl_vf t, n, p;
    PL__EXP_CORE(x, t, n, p);
    const pl_vi e = ((pl_vi)t - (pl_vi)pl_splat(12582912.0f)) << 23; /* n * 2^23 */
    return PL_SEL(under, pl_splat(0.0f), (pl_vf)((pl_vi)p + e));
}

/* 2^y, the same exp for arguments already in base 2 (kernels that fold
 * log2(e) into a scale they apply anyway, e.g. attention's 1/sqrt(D)):
 * y = n + f with n = round(y), |f| <= 1/2 exact, 2^f = e^(f ln2) by the one
 * polynomial (f ln2 rounds to ~1e-8 absolute, so ~2 ulp as pl_vexp).
 * y < -126 (and -inf) gives 0; y > 127 gives 2^127. */
static PL_AI pl_vf pl_vexp2(pl_vf y) {
    const pl_vi under = y < pl_splat(-126.0f);
    y = PL_SEL(under, pl_splat(-126.0f), y);
    y = PL_SEL(y > pl_splat(127.0f), pl_splat(127.0f), y);
    const pl_vf t = y + 12582912.0f, n = t - 12582912.0f, r = (y - n) * 0.693147180559945f;
    pl_vf p;
    PL__EXP_POLY(r, p);
    const pl_vi e = (pl_vi)t << 23; /* n * 2^23: t's low mantissa bits hold n mod 2^9 */
    return PL_SEL(under, pl_splat(0.0f), (pl_vf)((pl_vi)p + e));
}

/* Whether any lane of a comparison result m is set. */
static PL_AI int pl_vany(pl_vi m) {
#if PL_VW == 16 && defined(__AVX512F__)
    return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif PL_VW == 8 && defined(__AVX2__)
    return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#else
    int any = 0;
    for (int i = 0; i < PL_VW; i++) any |= m[i];
    return any != 0;
#endif
}

/* ---- bfloat16: the upper half of a float's bits ----
 * pl__bf16_bits: x rounded to bfloat16, round to nearest even, as the bits of
 * the upper half (what VCVTNEPS2BF16 and oneDNN's reorders give). Overflow
 * rounds to infinity; a NaN stays a (quiet) NaN of the same sign instead of
 * rounding into infinity. Branch free, so loops over it vectorise.
 * pl__bf16_round: the same value as a float (lower 16 bits zero). */
static inline uint32_t pl__bf16_rne32(float x) {
    union {
        float f;
        uint32_t u;
    } v = {x};
    const uint32_t r = v.u + 0x7fffu + ((v.u >> 16) & 1u);
    return (v.u & 0x7fffffffu) > 0x7f800000u ? (v.u | 0x00400000u) & 0xffff0000u : r & 0xffff0000u;
}
static inline uint16_t pl__bf16_bits(float x) { return (uint16_t)(pl__bf16_rne32(x) >> 16); }
static inline float pl__bf16_round(float x) {
    union {
        uint32_t u;
        float f;
    } v = {pl__bf16_rne32(x)};
    return v.f;
}

/* ---- horizontal sums: one tree ----
 * pl_vhsum: the lanes of v added by halving (lane i + lane i + w/2, ...).
 * pl_vhsum_t: the PL_VW sums of a[0 .. PL_VW) as one vector (lane i = the sum
 * of a[i]), by the transposing form of the same pairing. pl_vhmax: the
 * largest lane, by the same halving. */
#if defined(__clang__)
#define PL__SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define PL__SHUF(a, b, ...) __builtin_shuffle(a, b, (pl_vi){__VA_ARGS__})
#endif
/* v rotated down by w lanes (lane i takes lane i + w mod PL_VW). */
#if PL_VW == 16
#define PL__ROT8(v) PL__SHUF(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
#define PL__ROT4(v) PL__SHUF(v, v, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3)
#define PL__ROT2(v) PL__SHUF(v, v, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1)
#define PL__ROT1(v) PL__SHUF(v, v, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0)
#define PL__HALVE(v, OP)                                                                           \
    (v = OP(v, PL__ROT8(v)), v = OP(v, PL__ROT4(v)), v = OP(v, PL__ROT2(v)), v = OP(v, PL__ROT1(v)))
#elif PL_VW == 8
#define PL__ROT4(v) PL__SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3)
#define PL__ROT2(v) PL__SHUF(v, v, 2, 3, 4, 5, 6, 7, 0, 1)
#define PL__ROT1(v) PL__SHUF(v, v, 1, 2, 3, 4, 5, 6, 7, 0)
#define PL__HALVE(v, OP) (v = OP(v, PL__ROT4(v)), v = OP(v, PL__ROT2(v)), v = OP(v, PL__ROT1(v)))
#else
#define PL__ROT2(v) PL__SHUF(v, v, 2, 3, 0, 1)
#define PL__ROT1(v) PL__SHUF(v, v, 1, 2, 3, 0)
#define PL__HALVE(v, OP) (v = OP(v, PL__ROT2(v)), v = OP(v, PL__ROT1(v)))
#endif
#define PL__VADD(a, b) ((a) + (b))
#define PL__VMAX(a, b) PL_SEL((b) > (a), (b), (a))
static PL_AI float pl_vhsum(pl_vf v) {
    PL__HALVE(v, PL__VADD);
    return v[0];
}
static PL_AI float pl_vhmax(pl_vf v) {
    PL__HALVE(v, PL__VMAX);
    return v[0];
}

/* One level of the tree: x, y hold partial sums in blocks of bl lanes; the
 * result pairs the blocks (lane i of group g = i / 2bl, w = i % 2bl: x's lanes
 * 2bl g + w and + bl when w < bl, else y's). */
#if PL_VW == 16
#define PL__L1(x, y)                                                                               \
    (PL__SHUF(x, y, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +                   \
     PL__SHUF(x, y, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
#define PL__L2(x, y)                                                                               \
    (PL__SHUF(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +                    \
     PL__SHUF(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
#define PL__L4(x, y)                                                                               \
    (PL__SHUF(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +                    \
     PL__SHUF(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
#define PL__L8(x, y)                                                                               \
    (PL__SHUF(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +                      \
     PL__SHUF(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
static PL_AI pl_vf pl_vhsum_t(const pl_vf *a) {
    pl_vf s1[8], s2[4];
    for (int i = 0; i < 8; i++) s1[i] = PL__L1(a[2 * i], a[2 * i + 1]);
    for (int i = 0; i < 4; i++) s2[i] = PL__L2(s1[2 * i], s1[2 * i + 1]);
    return PL__L8(PL__L4(s2[0], s2[1]), PL__L4(s2[2], s2[3]));
}
#elif PL_VW == 8
#define PL__L1(x, y)                                                                               \
    (PL__SHUF(x, y, 0, 8, 2, 10, 4, 12, 6, 14) + PL__SHUF(x, y, 1, 9, 3, 11, 5, 13, 7, 15))
#define PL__L2(x, y)                                                                               \
    (PL__SHUF(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + PL__SHUF(x, y, 2, 3, 10, 11, 6, 7, 14, 15))
#define PL__L4(x, y)                                                                               \
    (PL__SHUF(x, y, 0, 1, 2, 3, 8, 9, 10, 11) + PL__SHUF(x, y, 4, 5, 6, 7, 12, 13, 14, 15))
static PL_AI pl_vf pl_vhsum_t(const pl_vf *a) {
    return PL__L4(PL__L2(PL__L1(a[0], a[1]), PL__L1(a[2], a[3])),
                  PL__L2(PL__L1(a[4], a[5]), PL__L1(a[6], a[7])));
}
#else
#define PL__L1(x, y) (PL__SHUF(x, y, 0, 4, 2, 6) + PL__SHUF(x, y, 1, 5, 3, 7))
#define PL__L2(x, y) (PL__SHUF(x, y, 0, 1, 4, 5) + PL__SHUF(x, y, 2, 3, 6, 7))
static PL_AI pl_vf pl_vhsum_t(const pl_vf *a) {
    return PL__L2(PL__L1(a[0], a[1]), PL__L1(a[2], a[3]));
}
#endif

/* ---- micro-GEMM ---- */
/* R x PL_VW*NV tile of C (+)= A B: A(r, k) = A[r*sar + k*sak], B row-major.
 * R <= 6, NV <= 2: 12 accumulators hide the FMA latency on AVX2. */
static PL_AI void pl__gemm_tile(int R, int NV, int64_t K, const float *A, int64_t sar, int64_t sak,
                                const float *B, int64_t ldb, float *C, int64_t ldc, bool acc) {
    pl_vf c[6][2];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++)
            c[r][v] = acc ? PL_LD(C + r * ldc + PL_VW * v) : pl_splat(0.0f);
    for (int64_t k = 0; k < K; k++) {
        pl_vf b[2];
        for (int v = 0; v < NV; v++) b[v] = PL_LD(B + k * ldb + PL_VW * v);
        for (int r = 0; r < R; r++) {
            float a = A[r * sar + k * sak];
            for (int v = 0; v < NV; v++) c[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) PL_ST(C + r * ldc + PL_VW * v, c[r][v]);
}

/* C[M x N] (+)= A[M x K] B[K x N] (row-major B and C, A by strides), N a multiple
 * of PL_VW: the register-blocked micro-GEMM of the attention kernels (tiles of
 * at most 64 x 64, where a oneDNN call would cost more than the product). */
static PL_AI void pl_gemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t sar, int64_t sak,
                          const float *B, int64_t ldb, float *C, int64_t ldc, bool acc) {
    int64_t m = 0;
    for (; m + 6 <= M; m += 6) {
        int64_t n = 0;
        for (; n + 2 * PL_VW <= N; n += 2 * PL_VW)
            pl__gemm_tile(6, 2, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
        if (n < N)
            pl__gemm_tile(6, 1, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
    }
    for (; m + 4 <= M; m += 4) {
        int64_t n = 0;
        for (; n + 2 * PL_VW <= N; n += 2 * PL_VW)
            pl__gemm_tile(4, 2, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
        if (n < N)
            pl__gemm_tile(4, 1, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
    }
    for (; m < M; m++) {
        int64_t n = 0;
        for (; n + 2 * PL_VW <= N; n += 2 * PL_VW)
            pl__gemm_tile(1, 2, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
        if (n < N)
            pl__gemm_tile(1, 1, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
    }
}

#endif
