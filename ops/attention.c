/* Dense causal multi-head attention, fused in the FlashAttention-2 manner.
 *
 * q, k, v, out: [B, L, H, D]; per (b, h), with c = 1/sqrt(D):
 *   S = c Q K^T (s <= t only),  P = softmax_rows(S),  O = (P o Z) V,
 * Z the dropout multipliers (0 or 1/(1-p); all 1 without dropout).
 *
 * Forward, per (b, h, block of BLK queries): loop over the key blocks up to
 * the diagonal with an online softmax (running max m and sum l per row), so
 * only a BLK x BLK tile of scores ever exists. Scores are kept in base-2
 * units (S2 = S log2(e)) so the exponentials are exp2; the row's base-2
 * log-sum-exp lse2 = m + log2(l) is saved for backward with the output.
 *
 * Backward (FA-2): D_t = sum_d dO[t,d] O[t,d]; each tile recomputes
 * P = exp2(S2 - lse2), and with dP = (dO V^T) o Z, dS = P o (dP - D):
 *   dV += (P o Z)^T dO,   dK += c dS^T Q,   dQ += c dS K.
 * Tiles are computed transposed (keys as rows), so dV and dK take the tile
 * as is and dQ reads it with swapped strides. Two schedules give the same
 * bits: one task per (b, h) running over all tiles (5 tile products each),
 * or, when B*H is too small to keep the threads busy, a pass over key blocks
 * (dK, dV) and a pass over query blocks (dQ, recomputing S and dP: 7 tile
 * products). Every value is summed in a fixed order, so results do not
 * depend on the thread count.
 *
 * Tile products use a register-blocked 6x16 kernel written with GCC vector
 * extensions (AVX2+FMA in the x86-64-v3 clone); no oneDNN call happens inside
 * the parallel regions. The operands are first copied once into tile-friendly
 * layouts (K^T blocks and V for the forward; Q^T, dO^T blocks, Q, dO and K
 * for the backward), O(L) work instead of O(L^2 / BLK) strided gathers.
 * Memory, all linear in L: the saved lse2 [B, H, L]; during a call, those
 * copies, D [B, H, L] and per-thread tiles (plus one [L, D] dQ buffer per
 * thread in the per-(b, h) schedule), given back to the arena on return.
 *
 * Dropout: element (b, h, t, s) uses word s % 4 of Philox counter offset +
 * ((b*H + h)*L + t)*W + s/4, W = ceil(L/4) (see plasa.h); the forward draws a
 * query row's keys 32 at a time, the backward 8 queries x 4 keys at a time,
 * both with pl__philox8. */
#include "internal.h"

#include <math.h>
#include <omp.h>

/* ISO C mode turns off FMA contraction; the tile kernels want it. Vector
 * returns in the baseline clone make GCC warn of an ABI change that no call
 * crosses (the helpers are inlined). */
#if defined(__clang__)
#pragma clang fp contract(fast)
#pragma clang diagnostic ignored "-Wpsabi"
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define BLK 64 /* queries and keys per tile; multiple of 16 */
#define AI __attribute__((always_inline)) inline

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8w __attribute__((vector_size(32)));
typedef uint32_t v8wu __attribute__((vector_size(32), aligned(4)));
#define LD(p) (*(const v8u *)(p))
#define ST(p, x) (*(v8u *)(p) = (x))

/* Helpers take vectors by pointer: a 32-byte vector parameter makes GCC print
 * an ABI note for the baseline clone on every build. */
static AI v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }
#define SEL(m, a, b) ((v8)(((v8i)(a) & (m)) | ((v8i)(b) & ~(m)))) /* m ? a : b */
static AI float hmax(const v8 *x) {
    float m = (*x)[0];
    for (int i = 1; i < 8; i++) m = (*x)[i] > m ? (*x)[i] : m;
    return m;
}
static AI float hsum(const v8 *x) {
    const v8 v = *x;
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* 2^x for x <= ~0 (x < -126 and -inf give 0; NaN stays NaN). Cephes exp2f:
 * x = n + f, |f| <= 1/2, 2^f by a degree-6 polynomial (rel. error ~2e-7). */
static AI v8 exp2v(const v8 *px) {
    v8 x = *px;
    v8i under = x < splat(-126.0f);
    x = SEL(under, splat(-126.0f), x);
    x = SEL(x > splat(127.0f), splat(127.0f), x);
    const v8 magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v8 t = x + magic;
    v8 f = x - (t - magic);
    v8i n = (v8i)t - (v8i)magic;
    v8 p = splat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    v8 r = p * (v8)((n + 127) << 23);
    return SEL(under, splat(0.0f), r);
}

/* R x 8*NV tile of C (+)= A B: A(r, k) = A[r*sar + k*sak], B row-major.
 * R <= 6, NV <= 2: 12 accumulators hide the FMA latency on AVX2. */
static AI void tile(int R, int NV, int64_t K, const float *A, int64_t sar, int64_t sak,
                    const float *B, int64_t ldb, float *C, int64_t ldc, bool acc) {
    v8 c[6][2];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) c[r][v] = acc ? LD(C + r * ldc + 8 * v) : splat(0.0f);
    for (int64_t k = 0; k < K; k++) {
        v8 b[2];
        for (int v = 0; v < NV; v++) b[v] = LD(B + k * ldb + 8 * v);
        for (int r = 0; r < R; r++) {
            float a = A[r * sar + k * sak];
            for (int v = 0; v < NV; v++) c[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) ST(C + r * ldc + 8 * v, c[r][v]);
}

/* C[M x N] (+)= A[M x K] B[K x N], N a multiple of 8. */
static AI void gemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t sar, int64_t sak,
                    const float *B, int64_t ldb, float *C, int64_t ldc, bool acc) {
    int64_t m = 0;
    for (; m + 6 <= M; m += 6) {
        int64_t n = 0;
        for (; n + 16 <= N; n += 16)
            tile(6, 2, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
        if (n < N) tile(6, 1, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
    }
    for (; m + 4 <= M; m += 4) {
        int64_t n = 0;
        for (; n + 16 <= N; n += 16)
            tile(4, 2, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
        if (n < N) tile(4, 1, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
    }
    for (; m < M; m++) {
        int64_t n = 0;
        for (; n + 16 <= N; n += 16)
            tile(1, 2, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
        if (n < N) tile(1, 1, K, A + m * sar, sar, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
    }
}

static inline int64_t rup8(int64_t x) { return (x + 7) & ~(int64_t)7; }
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

typedef struct {
    const float *q, *k, *v; /* [B, L, H, D] */
    float *o;               /* forward output */
    float *lse2;            /* [B*H][Lp] base-2 log-sum-exp of the scaled scores, 0 past L */
    int64_t B, L, H, D, Dp, nblk, Lp, rs; /* Dp = D rounded up to 8; Lp = nblk*BLK; rs = H*D */
    float scale, scale2;                  /* 1/sqrt(D), log2(e)/sqrt(D) */
    /* dropout */
    float p, dscale;
    uint32_t thr;
    uint64_t seed, offset, W; /* W = ceil(L/4): Philox counters per row */
    /* Packed operands (see pack_t, pack_rows): K^T blocks and V rows for the
     * forward; Q^T and dO^T blocks, Q, dO and K rows for the backward. */
    const float *KT, *Vp;
    const float *QT, *dOT, *Qp, *dOp, *Kp;
    /* backward */
    const float *dout, *dvec; /* dvec [B*H][Lp], 0 past L */
    float *dq, *dk, *dv;
} att;

/* ---- operand packing, once per call: O(L) work and memory ---- */

/* Block blk of head bh of x, transposed: dst [D][BLK], zero past L. */
static void pack_t(const att *a, const float *x, float *dst, int64_t bh, int64_t blk) {
    const int64_t D = a->D, rs = a->rs, t0 = blk * BLK, n = imin(BLK, a->L - t0);
    const float *src = x + ((bh / a->H) * a->L * a->H + bh % a->H) * D + t0 * rs;
    dst += (bh * a->nblk + blk) * D * BLK;
    for (int64_t c = 0; c < n; c++)
        for (int64_t d = 0; d < D; d++) dst[d * BLK + c] = src[c * rs + d];
    for (int64_t d = 0; d < D; d++)
        for (int64_t c = n; c < BLK; c++) dst[d * BLK + c] = 0.0f;
}

/* Block blk of head bh of x as rows padded with zeros: dst [B*H][Lp][Dp].
 * (Even when D % 8 == 0 the tensor itself is not used as is: its row stride
 * H*D is often a large power of two, and the rows of a tile then fight over
 * a few L1 sets.) */
static void pack_rows(const att *a, const float *x, float *dst, int64_t bh, int64_t blk) {
    const int64_t D = a->D, Dp = a->Dp, rs = a->rs, t0 = blk * BLK, n = imin(BLK, a->L - t0);
    const float *src = x + ((bh / a->H) * a->L * a->H + bh % a->H) * D + t0 * rs;
    dst += (bh * a->Lp + t0) * Dp;
    for (int64_t c = 0; c < BLK; c++)
        for (int64_t d = 0; d < Dp; d++) dst[c * Dp + d] = c < n && d < D ? src[c * rs + d] : 0.0f;
}

/* Floats of per-thread scratch. */
static int64_t fwd_scratch(const att *a) { return BLK * BLK + BLK * a->Dp + 2 * BLK; }
static int64_t bwd_scratch(const att *a, bool whole) {
    return 3 * BLK * BLK + 2 * BLK * a->Dp + (whole ? a->nblk : 1) * BLK * a->Dp;
}

/* Dropout: 8 multipliers (0 or 1/(1-p)) from 8 Philox words. */
static AI v8 keep8(const att *a, const uint32_t *w) {
    v8w x = *(const v8wu *)w;
    v8i k = x >= a->thr;
    return SEL(k, splat(a->dscale), splat(0.0f));
}

/* Counter of the Philox block that holds (query t, key s) of head bh. */
static AI uint64_t drop_ctr(const att *a, int64_t bh, int64_t t, int64_t s) {
    return a->offset + (uint64_t)((bh * a->L + t) * (int64_t)a->W + s / 4);
}

/* Forward: S[r][c] *= Z for queries t0 + r (r < nr), keys s0 + c (c < nc).
 * A row's keys are consecutive counters: 32 elements per pl__philox8. */
static AI void drop_rows(const att *a, int64_t bh, int64_t t0, int64_t nr, int64_t s0, int64_t nc,
                         float *S) {
    for (int64_t r = 0; r < nr; r++) {
        float *sr = S + r * BLK;
        for (int64_t g = 0; g < nc; g += 32) {
            uint32_t w[32];
            pl__philox8(a->seed, drop_ctr(a, bh, t0 + r, s0 + g), 1, false, w);
            for (int64_t e = 0; e < 32 && g + e < nc; e += 8) {
                if (g + e + 8 <= nc) {
                    ST(sr + g + e, LD(sr + g + e) * keep8(a, w + e));
                } else {
                    for (int64_t u = 0; g + e + u < nc; u++)
                        sr[g + e + u] *= w[e + u] >= a->thr ? a->dscale : 0.0f;
                }
            }
        }
    }
}

/* Backward: ZT[c][r] = Z for keys s0 + c (c < nc), queries t0 + r (r < nrp;
 * rows past nr get values that the caller masks). One pl__philox8 covers 8
 * queries (counters W apart) x 4 keys, delivered word by word: each word is
 * 8 consecutive entries of a ZT row. */
static AI void drop_cols(const att *a, int64_t bh, int64_t t0, int64_t nrp, int64_t s0, int64_t nc,
                         float *ZT) {
    for (int64_t r = 0; r < nrp; r += 8)
        for (int64_t g = 0; g < nc; g += 4) {
            uint32_t w[32];
            pl__philox8(a->seed, drop_ctr(a, bh, t0 + r, s0 + g), a->W, true, w);
            for (int64_t e = 0; e < 4 && g + e < nc; e++)
                ST(ZT + (g + e) * BLK + r, keep8(a, w + 8 * e));
        }
}

/* ---- forward ---- */

/* Query block i of head bh. */
PL_KERNEL static void fwd_task(const att *a, int64_t bh, int64_t i, float *ws) {
    const int64_t L = a->L, D = a->D, Dp = a->Dp, rs = a->rs, H = a->H;
    const int64_t b = bh / H, h = bh % H;
    const float *qb = a->q + (b * L * H + h) * D, *KT = a->KT + bh * a->nblk * D * BLK,
                *Vb = a->Vp + bh * a->Lp * Dp;
    float *S = ws, *O = S + BLK * BLK, *m = O + BLK * Dp, *l = m + BLK;
    const int64_t t0 = i * BLK, nr = imin(BLK, L - t0);
    const v8 iota = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int64_t r = 0; r < nr; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int64_t d = 0; d < Dp; d += 8) ST(O + r * Dp + d, splat(0.0f));
    }
    for (int64_t j = 0; j <= i; j++) {
        const int64_t s0 = j * BLK, nc = imin(BLK, L - s0), ncp = rup8(nc);
        gemm(nr, ncp, D, qb + t0 * rs, rs, 1, KT + j * D * BLK, BLK, S, BLK, false);
        /* Online softmax; on the diagonal block keys c > r are masked (that
         * includes the padding past L, which only the diagonal block has). */
        for (int64_t r = 0; r < nr; r++) {
            float *sr = S + r * BLK;
            v8 mx = splat(m[r]);
            for (int64_t c = 0; c < ncp; c += 8) {
                v8 x = LD(sr + c) * a->scale2;
                if (j == i) x = SEL(iota + (float)c > (float)r, splat(-INFINITY), x);
                ST(sr + c, x);
                mx = SEL(x > mx, x, mx);
            }
            float mnew = hmax(&mx);
            float alpha = exp2f(m[r] - mnew); /* 0 on the first block */
            v8 sum = splat(0.0f), mv = splat(mnew);
            for (int64_t c = 0; c < ncp; c += 8) {
                v8 x = LD(sr + c) - mv, e = exp2v(&x);
                sum += e;
                ST(sr + c, e);
            }
            l[r] = l[r] * alpha + hsum(&sum);
            m[r] = mnew;
            if (alpha != 1.0f)
                for (int64_t d = 0; d < Dp; d += 8) ST(O + r * Dp + d, LD(O + r * Dp + d) * alpha);
        }
        if (a->p > 0.0f) drop_rows(a, bh, t0, nr, s0, nc, S);
        gemm(nr, Dp, nc, S, BLK, 1, Vb + s0 * Dp, Dp, O, Dp, true);
    }
    float *ob = a->o + (b * L * H + h) * D;
    for (int64_t r = 0; r < nr; r++) {
        float inv = 1.0f / l[r];
        for (int64_t d = 0; d < D; d++) ob[(t0 + r) * rs + d] = O[r * Dp + d] * inv;
        a->lse2[bh * a->Lp + t0 + r] = m[r] + log2f(l[r]);
    }
}

/* ---- backward ---- */

typedef struct {
    float *ST, *dPT, *ZT, *dKa, *dVa, *dQa;
} bwd_ws;

static AI bwd_ws bwd_carve(const att *a, float *ws) {
    bwd_ws w;
    w.ST = ws;
    w.dPT = w.ST + BLK * BLK;
    w.ZT = w.dPT + BLK * BLK;
    w.dKa = w.ZT + BLK * BLK;
    w.dVa = w.dKa + BLK * a->Dp;
    w.dQa = w.dVa + BLK * a->Dp;
    return w;
}

/* Tile (query block i, key block j), transposed: ST <- P o Z (if want_pz)
 * and dPT <- dS, both [nc x BLK] with keys as rows. Queries past L and keys
 * after the query are masked to P = 0. Not inlined: both backward schedules
 * must run the same machine code (FMA contraction may differ per inlining
 * site) to give the same bits. */
PL_KERNEL __attribute__((noinline)) static void bwd_tile(const att *a, int64_t bh, int64_t i,
                                                         int64_t j, bwd_ws *w, bool want_pz) {
    const int64_t L = a->L, D = a->D, rs = a->rs, H = a->H, Lp = a->Lp;
    const int64_t b = bh / H, h = bh % H, t0 = i * BLK, s0 = j * BLK;
    const int64_t nr = imin(BLK, L - t0), nc = imin(BLK, L - s0), nrp = rup8(nr);
    const float *kb = a->k + (b * L * H + h) * D + s0 * rs,
                *vb = a->v + (b * L * H + h) * D + s0 * rs;
    const float *QT = a->QT + (bh * a->nblk + i) * D * BLK,
                *dOT = a->dOT + (bh * a->nblk + i) * D * BLK;
    const float *lseb = a->lse2 + bh * Lp + t0, *dvb = a->dvec + bh * Lp + t0;
    gemm(nc, nrp, D, kb, rs, 1, QT, BLK, w->ST, BLK, false);
    gemm(nc, nrp, D, vb, rs, 1, dOT, BLK, w->dPT, BLK, false);
    const bool drop = a->p > 0.0f, edge = i == j || nr < BLK;
    if (drop) drop_cols(a, bh, t0, nrp, s0, nc, w->ZT);
    const v8 iota = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int64_t c = 0; c < nc; c++) {
        float *st = w->ST + c * BLK, *dp = w->dPT + c * BLK, *z = w->ZT + c * BLK;
        for (int64_t r = 0; r < nrp; r += 8) {
            v8 x = LD(st + r) * a->scale2 - LD(lseb + r), P = exp2v(&x);
            if (edge) { /* valid: t0 + r >= s0 + c and r < nr */
                v8 rv = iota + (float)r;
                v8i ok = (rv + (float)(t0 - s0) >= (float)c) & (rv < (float)nr);
                P = SEL(ok, P, splat(0.0f));
            }
            v8 dP = LD(dp + r);
            if (drop) {
                v8 Z = LD(z + r);
                dP *= Z;
                if (want_pz) ST(st + r, P * Z);
            } else if (want_pz) {
                ST(st + r, P);
            }
            ST(dp + r, P * (dP - LD(dvb + r)));
        }
    }
}

/* dQa [nr x Dp] += dS K_j: the transposed tile read with swapped strides.
 * Not inlined, for the reason given at bwd_tile. */
PL_KERNEL __attribute__((noinline)) static void dq_accum(const float *dST, int64_t nr, int64_t nc,
                                                         int64_t Dp, const float *Kj, float *dQa) {
    gemm(nr, Dp, nc, dST, 1, BLK, Kj, Dp, dQa, Dp, true);
}

/* dK_j and dV_j of key block j over the query blocks i >= j; with_dq also
 * adds dS K_j into the dQ rows of every block i (w->dQa, [nblk*BLK x Dp]).
 * This, bwd_tile, dq_accum and write_dq hold all the backward arithmetic and
 * are not inlined, so both schedules run the same machine code. */
PL_KERNEL __attribute__((noinline)) static void key_block(const att *a, int64_t bh, int64_t j,
                                                          bwd_ws *w, bool with_dq) {
    const int64_t L = a->L, D = a->D, Dp = a->Dp, rs = a->rs, H = a->H;
    const int64_t b = bh / H, h = bh % H, s0 = j * BLK, nc = imin(BLK, L - s0);
    const bool want_kv = a->dk || a->dv;
    const float *Qb = a->Qp + bh * a->Lp * Dp, *dOb = a->dOp + bh * a->Lp * Dp,
                *Kb = a->Kp + bh * a->Lp * Dp;
    if (want_kv)
        for (int64_t x = 0; x < nc * Dp; x += 8) {
            ST(w->dKa + x, splat(0.0f));
            ST(w->dVa + x, splat(0.0f));
        }
    for (int64_t i = j; i < a->nblk; i++) {
        const int64_t t0 = i * BLK, nr = imin(BLK, L - t0);
        bwd_tile(a, bh, i, j, w, want_kv);
        if (want_kv) {
            gemm(nc, Dp, nr, w->ST, BLK, 1, dOb + t0 * Dp, Dp, w->dVa, Dp, true); /* PZ^T dO */
            gemm(nc, Dp, nr, w->dPT, BLK, 1, Qb + t0 * Dp, Dp, w->dKa, Dp, true); /* dS^T Q */
        }
        if (with_dq) dq_accum(w->dPT, nr, nc, Dp, Kb + s0 * Dp, w->dQa + t0 * Dp);
    }
    if (!want_kv) return;
    const int64_t off = (b * L * H + h) * D + s0 * rs;
    for (int64_t c = 0; c < nc; c++)
        for (int64_t d = 0; d < D; d++) {
            if (a->dk) a->dk[off + c * rs + d] += a->scale * w->dKa[c * Dp + d];
            if (a->dv) a->dv[off + c * rs + d] += w->dVa[c * Dp + d];
        }
}

/* dQ rows [t0, t0 + nr) += c * dQa. */
PL_KERNEL __attribute__((noinline)) static void write_dq(const att *a, int64_t bh, int64_t t0,
                                                         int64_t nr, const float *dQa) {
    const int64_t L = a->L, D = a->D, Dp = a->Dp, rs = a->rs, H = a->H;
    float *g = a->dq + ((bh / H) * L * H + bh % H) * D + t0 * rs;
    for (int64_t r = 0; r < nr; r++)
        for (int64_t d = 0; d < D; d++) g[r * rs + d] += a->scale * dQa[r * Dp + d];
}

/* Schedule 1: all of head bh. */
static void bwd_head_task(const att *a, int64_t bh, float *ws) {
    bwd_ws w = bwd_carve(a, ws);
    const bool with_dq = a->dq != NULL;
    if (with_dq)
        for (int64_t x = 0; x < a->L * a->Dp; x += 8) ST(w.dQa + x, splat(0.0f));
    for (int64_t j = 0; j < a->nblk; j++) key_block(a, bh, j, &w, with_dq);
    if (with_dq) write_dq(a, bh, 0, a->L, w.dQa);
}

/* Schedule 2, first pass: dK, dV of key block j. */
static void bwd_kv_task(const att *a, int64_t bh, int64_t j, float *ws) {
    bwd_ws w = bwd_carve(a, ws);
    key_block(a, bh, j, &w, false);
}

/* Schedule 2, second pass: dQ of query block i (same tiles, same order). */
static void bwd_dq_task(const att *a, int64_t bh, int64_t i, float *ws) {
    bwd_ws w = bwd_carve(a, ws);
    const int64_t Dp = a->Dp, nr = imin(BLK, a->L - i * BLK);
    const float *Kb = a->Kp + bh * a->Lp * Dp;
    for (int64_t x = 0; x < nr * Dp; x += 8) ST(w.dQa + x, splat(0.0f));
    for (int64_t j = 0; j <= i; j++) {
        const int64_t nc = imin(BLK, a->L - j * BLK);
        bwd_tile(a, bh, i, j, &w, false);
        dq_accum(w.dPT, nr, nc, Dp, Kb + j * BLK * Dp, w.dQa);
    }
    write_dq(a, bh, i * BLK, nr, w.dQa);
}

/* D[bh, t] = sum_d dO[b,t,h,d] O[b,t,h,d]; 0 for t in [L, Lp). */
PL_KERNEL static void dvec_rows(const att *a, const float *o, float *dvec, int64_t b) {
    const int64_t L = a->L, H = a->H, D = a->D;
    for (int64_t h = 0; h < H; h++)
        for (int64_t t = L; t < a->Lp; t++) dvec[(b * H + h) * a->Lp + t] = 0.0f;
    for (int64_t t = 0; t < L; t++)
        for (int64_t h = 0; h < H; h++) {
            const float *orow = o + ((b * L + t) * H + h) * D,
                        *grow = a->dout + ((b * L + t) * H + h) * D;
            float s = 0.0f;
            for (int64_t d = 0; d < D; d++) s += orow[d] * grow[d];
            dvec[(b * H + h) * a->Lp + t] = s;
        }
}

static void attention_backward(pl_ctx *ctx, pl_node *n) {
    att a = *(const att *)n->saved;
    float *g[3];
    if (pl__grads(ctx, n, g)) return;
    a.dq = g[0];
    a.dk = g[1];
    a.dv = g[2];
    a.dout = n->out->grad;
    const int64_t BH = a.B * a.H, T = omp_get_max_threads(), nblk = a.nblk;
    const int64_t work = BH * a.L * a.L * a.D;
    const int64_t tsz = BH * a.Lp * a.D, rsz = BH * a.Lp * a.Dp;
    /* One task per head does 5 tile products per tile, the two passes 7 but
     * spread over every block: take the first unless threads would idle. */
    const int64_t rounds = (BH + T - 1) / T;
    const bool whole = 5 * rounds * T <= 7 * BH;
    const int64_t per = bwd_scratch(&a, whole);
    /* Everything below is released for reuse when this backward is done. */
    pl_mark mark = pl_mark_get(ctx);
    float *dvec = pl__scratch(ctx, (size_t)(BH * a.Lp + 2 * tsz + 3 * rsz) * sizeof(float));
    float *ws = dvec ? pl__scratch(ctx, (size_t)(T * per) * sizeof(float)) : NULL;
    if (!ws) return;
    float *QT = dvec + BH * a.Lp, *dOT = QT + tsz, *Qp = dOT + tsz, *dOp = Qp + rsz,
          *Kp = dOp + rsz;
    a.dvec = dvec;
    a.QT = QT;
    a.dOT = dOT;
    a.Qp = Qp;
    a.dOp = dOp;
    a.Kp = Kp;
    const att *ap = &a;
    const float *o = pl_f32(n->out);
    PL_PARALLEL(work, default(shared), {
        _Pragma("omp for schedule(static) nowait") for (int64_t b = 0; b < a.B; b++)
            dvec_rows(ap, o, dvec, b);
        _Pragma("omp for schedule(static)") for (int64_t t = 0; t < BH * nblk; t++) {
            pack_t(ap, a.q, QT, t / nblk, t % nblk);
            pack_t(ap, a.dout, dOT, t / nblk, t % nblk);
            pack_rows(ap, a.q, Qp, t / nblk, t % nblk);
            pack_rows(ap, a.dout, dOp, t / nblk, t % nblk);
            pack_rows(ap, a.k, Kp, t / nblk, t % nblk);
        }
    });
    if (whole) {
        PL_PARALLEL_FOR(work, schedule(dynamic, 1), bh, BH,
                        bwd_head_task(ap, bh, ws + omp_get_thread_num() * per));
    } else {
        if (a.dk || a.dv) /* longest (j = 0) first */
            PL_PARALLEL_FOR(work, schedule(dynamic, 1), t, BH * nblk,
                            bwd_kv_task(ap, t % BH, t / BH, ws + omp_get_thread_num() * per));
        if (a.dq) /* longest (i = nblk - 1) first */
            PL_PARALLEL_FOR(
                work, schedule(dynamic, 1), t, BH * nblk,
                bwd_dq_task(ap, t % BH, nblk - 1 - t / BH, ws + omp_get_thread_num() * per));
    }
    pl_mark_release(ctx, mark);
}

pl_tensor *pl_attention(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *v, float dropout_p,
                        pl_rng *rng) {
    static const char *fn = "pl_attention";
    if (pl__check(ctx, fn, "q", q, PL_F32) || pl__check(ctx, fn, "k", k, PL_F32) ||
        pl__check(ctx, fn, "v", v, PL_F32))
        return NULL;
    char s1[96], s2[96], s3[96];
    if (q->ndim != 4)
        return pl__err_null(PL_ERR_SHAPE, "%s: q must be 4-D [B, L, H, D], got %s", fn,
                            pl_shape_str(q, s1, sizeof s1));
    if (!pl_same_shape(q, k) || !pl_same_shape(q, v))
        return pl__err_null(PL_ERR_SHAPE, "%s: q %s, k %s and v %s must have the same shape", fn,
                            pl_shape_str(q, s1, sizeof s1), pl_shape_str(k, s2, sizeof s2),
                            pl_shape_str(v, s3, sizeof s3));
    if (!(dropout_p >= 0.0f && dropout_p < 1.0f))
        return pl__err_null(PL_ERR_ARG, "%s: dropout_p must be in [0, 1), got %g", fn,
                            (double)dropout_p);
    if (dropout_p > 0.0f && !rng)
        return pl__err_null(PL_ERR_ARG, "%s: rng is NULL (needed when dropout_p > 0)", fn);
    att a = {0};
    a.B = q->shape[0];
    a.L = q->shape[1];
    a.H = q->shape[2];
    a.D = q->shape[3];
    a.Dp = rup8(a.D);
    a.rs = a.H * a.D;
    a.nblk = (a.L + BLK - 1) / BLK;
    a.Lp = a.nblk * BLK;
    a.scale = (float)(1.0 / sqrt((double)a.D));
    a.scale2 = (float)(1.4426950408889634 / sqrt((double)a.D));
    a.W = (uint64_t)(a.L + 3) / 4;
    if (dropout_p > 0.0f) {
        a.p = dropout_p;
        a.thr = pl__drop_threshold(dropout_p);
        a.dscale = pl__drop_scale(dropout_p);
        a.seed = rng->seed;
        a.offset = rng->offset;
    }
    a.q = pl_f32(q);
    a.k = pl_f32(k);
    a.v = pl_f32(v);
    const int64_t BH = a.B * a.H, T = omp_get_max_threads(), per = fwd_scratch(&a), nblk = a.nblk;
    const int64_t tsz = BH * a.Lp * a.D, rsz = BH * a.Lp * a.Dp, work = BH * a.L * a.L * a.D;
    pl_tensor *out = pl__new(ctx, PL_F32, 4, q->shape);
    float *lse2 = out ? pl__scratch(ctx, (size_t)(BH * a.Lp) * sizeof(float)) : NULL;
    /* Operands and per-thread tiles: released for reuse once the forward is done. */
    pl_mark mark = pl_mark_get(ctx);
    float *KT = lse2 ? pl__scratch(ctx, (size_t)(tsz + rsz) * sizeof(float)) : NULL;
    float *ws = KT ? pl__scratch(ctx, (size_t)(T * per) * sizeof(float)) : NULL;
    if (!ws) return NULL;
    a.o = pl_f32(out);
    a.lse2 = lse2;
    a.KT = KT;
    a.Vp = KT + tsz;
    const att *ap = &a;
    /* Two regions: the dynamic loop must not run orphaned (see PL_PARALLEL). */
    PL_PARALLEL_FOR(work, schedule(static), t, BH * nblk, {
        pack_t(ap, a.k, KT, t / nblk, t % nblk);
        pack_rows(ap, a.v, KT + tsz, t / nblk, t % nblk);
        if (t % nblk == nblk - 1) /* pad rows of lse2, read by backward's tiles */
            for (int64_t x = a.L; x < a.Lp; x++) lse2[(t / nblk) * a.Lp + x] = 0.0f;
    });
    PL_PARALLEL_FOR(work, schedule(dynamic, 1), t, BH * nblk, /* longest (last query block) first */
                    fwd_task(ap, t % BH, nblk - 1 - t / BH, ws + omp_get_thread_num() * per));
    if (dropout_p > 0.0f) rng->offset += (uint64_t)BH * (uint64_t)a.L * a.W;
    a.KT = a.Vp = NULL; /* released below */
    pl_mark_release(ctx, mark);
    pl_tensor *in[3] = {q, k, v};
    pl_node *n;
    if (pl__record(ctx, "attention", attention_backward, out, 3, in, sizeof a, &n)) return NULL;
    if (n) *(att *)n->saved = a;
    return out;
}
