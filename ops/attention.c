/* Dense causal multi-head attention, fused in the FlashAttention-2 manner.
 *
 * q, k, v, out: [B, L, H, D]; per (b, h), with c = 1/sqrt(D):
 *   S = c Q K^T (s <= t only),  P = softmax_rows(S),  O = (P o Z) V,
 * Z the dropout multipliers (0 or 1/(1-p); all 1 without dropout).
 *
 * Forward, per (b, h, block of BLK queries): loop over the key blocks up to
 * the diagonal with an online softmax (running max m and sum l per row), so
 * only a few rows of scores ever exist (see "forward" below). The row's
 * log-sum-exp, in base 2 (lse = m + log2(l) of the scores times log2(e)), is
 * saved for backward with the output.
 *
 * Backward (FA-2): D_t = sum_d dO[t,d] O[t,d]; each tile recomputes
 * P = 2^(S log2(e) - lse), and with dP = (dO V^T) o Z, dS = P o (dP - D):
 *   dV += (P o Z)^T dO,   dK += c dS^T Q,   dQ += c dS K.
 * Tiles are computed transposed (keys as rows), so dV and dK take the tile
 * as is and dQ reads it with swapped strides. Two schedules give the same
 * bits: one task per (b, h) running over all tiles (5 tile products each),
 * or, when B*H is too small to keep the threads busy, a pass over key blocks
 * (dK, dV) and a pass over query blocks (dQ, recomputing S and dP: 7 tile
 * products). Every value is summed in a fixed order, so results do not
 * depend on the thread count.
 *
 * Tile products are register-blocked kernels written with the SIMD layer
 * (lib/simd.h): the forward's scores 6 rows x 4 vectors, dK and dV fused 6
 * rows x 2 vectors of each, the rest pl_gemm's 6 x 2. This file's kernel
 * section is compiled per instruction-set level (AVX-512, AVX2, baseline)
 * and chosen at run time, once per forward and saved for the backward; no
 * oneDNN call happens inside the parallel regions. The operands are first
 * copied once into tile-friendly layouts (K^T blocks and V for the forward;
 * Q^T, dO^T blocks, Q, dO and K for the backward), O(L) work instead of
 * O(L^2 / BLK) strided gathers.
 * Memory, all linear in L: the saved lse [B, H, L]; during a call, those
 * copies, D [B, H, L] and per-thread tiles (plus one [L, D] dQ buffer per
 * thread in the per-(b, h) schedule), given back to the arena on return.
 *
 * Dropout: element (b, h, t, s) uses word s % 4 of Philox counter offset +
 * ((b*H + h)*L + t)*W + s/4, W = ceil(L/4) (see plasa.h); the forward draws a
 * query row's keys up to 32 at a time (a chunk: 16, 32 or 64 keys), the
 * backward 8 queries x 4 keys at a time, both with pl__philox8. */
#include "internal.h"

#include <math.h>
#include <omp.h>

#define BLK 64 /* queries and keys per tile; multiple of 16 */

#ifdef PL_ISA /* used by the kernels only */
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
#endif

typedef struct {
    const float *q, *k, *v; /* [B, L, H, D] */
    float *o;               /* forward output */
    float *lse;             /* [B*H][Lp] log-sum-exp (base 2) of the scaled scores, 0 past L */
    int64_t B, L, H, D, Dp, nblk, Lp,
        rs;      /* Dp: D rounded up to the vector width; Lp = nblk*BLK; rs = H*D */
    float scale; /* 1/sqrt(D) */
    int isa;     /* the kernels' level (simd.h), the same for the backward */
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

/* The kernels (per instruction-set level, see simd.h). pack_t: block blk of
 * head bh of x transposed into dst; pack_rows: as rows padded to Dp;
 * fwd_task: query block i of head bh; bwd_head_task: the whole backward of
 * head bh; bwd_kv_task / bwd_dq_task: dK, dV of key block j / dQ of query
 * block i; dvec_rows: D = rowsum(dO o O) of batch b. ws: per-thread scratch. */
PL_ISA_DECLARE(void, pack_t, (const att *a, const float *x, float *dst, int64_t bh, int64_t blk));
PL_ISA_DECLARE(void, pack_rows,
               (const att *a, const float *x, float *dst, int64_t bh, int64_t blk));
PL_ISA_DECLARE(void, fwd_task, (const att *a, int64_t bh, int64_t i, float *ws));
PL_ISA_DECLARE(void, bwd_head_task, (const att *a, int64_t bh, float *ws));
PL_ISA_DECLARE(void, bwd_kv_task, (const att *a, int64_t bh, int64_t j, float *ws));
PL_ISA_DECLARE(void, bwd_dq_task, (const att *a, int64_t bh, int64_t i, float *ws));
PL_ISA_DECLARE(void, dvec_rows, (const att *a, const float *o, float *dvec, int64_t b));

#ifdef PL_ISA /* ---- the kernels ---- */

/* Functions both backward schedules call: one copy of their machine code (no
 * inlining, and with GCC no specialised clones either), so that the
 * schedules give the same bits. */
#if defined(__clang__)
#define PL_SAME_CODE __attribute__((noinline))
#else
#define PL_SAME_CODE __attribute__((noipa))
#endif

/* ---- operand packing, once per call: O(L) work and memory ---- */

/* Block blk of head bh of x, transposed: dst [D][BLK], zero past L. */
void PL_ISA_FN(pack_t)(const att *a, const float *x, float *dst, int64_t bh, int64_t blk) {
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
void PL_ISA_FN(pack_rows)(const att *a, const float *x, float *dst, int64_t bh, int64_t blk) {
    const int64_t D = a->D, Dp = a->Dp, rs = a->rs, t0 = blk * BLK, n = imin(BLK, a->L - t0);
    const float *src = x + ((bh / a->H) * a->L * a->H + bh % a->H) * D + t0 * rs;
    dst += (bh * a->Lp + t0) * Dp;
    for (int64_t c = 0; c < BLK; c++)
        for (int64_t d = 0; d < Dp; d++) dst[c * Dp + d] = c < n && d < D ? src[c * rs + d] : 0.0f;
}

/* Dropout: PL_VW multipliers (0 or 1/(1-p)) from PL_VW Philox words. */
static PL_AI pl_vf keepv(const att *a, const uint32_t *w) {
    pl_vu x = PL_LDU(w);
    pl_vi k = (pl_vi)(x >= a->thr);
    return PL_SEL(k, pl_splat(a->dscale), pl_splat(0.0f));
}

/* Counter of the Philox block that holds (query t, key s) of head bh. */
static PL_AI uint64_t drop_ctr(const att *a, int64_t bh, int64_t t, int64_t s) {
    return a->offset + (uint64_t)((bh * a->L + t) * (int64_t)a->W + s / 4);
}

/* Forward: S[r][c] *= Z for queries t0 + r (r < nr), keys s0 + c (c < nc).
 * A row's keys are consecutive counters: 32 elements per pl__philox8. */
static PL_AI void drop_rows(const att *a, int64_t bh, int64_t t0, int64_t nr, int64_t s0,
                            int64_t nc, float *S, int64_t lds) {
    for (int64_t r = 0; r < nr; r++) {
        float *sr = S + r * lds;
        for (int64_t g = 0; g < nc; g += 32) {
            uint32_t w[32];
            pl__philox8(a->seed, drop_ctr(a, bh, t0 + r, s0 + g), 1, false, w);
            for (int64_t e = 0; e < 32 && g + e < nc; e += PL_VW) {
                if (g + e + PL_VW <= nc) {
                    PL_ST(sr + g + e, PL_LD(sr + g + e) * keepv(a, w + e));
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
static PL_AI void drop_cols(const att *a, int64_t bh, int64_t t0, int64_t nrp, int64_t s0,
                            int64_t nc, float *ZT) {
    for (int64_t r = 0; r < nrp; r += 8)
        for (int64_t g = 0; g < nc; g += 4) {
            uint32_t w[32];
            pl__philox8(a->seed, drop_ctr(a, bh, t0 + r, s0 + g), a->W, true, w);
            for (int64_t e = 0; e < 4 && g + e < nc; e++)
                for (int u = 0; u < 8; u++)
                    ZT[(g + e) * BLK + r + u] = w[8 * e + u] >= a->thr ? a->dscale : 0.0f;
        }
}

/* ---- forward ---- */

/* The forward walks key chunks of CK = 4 vectors (64 keys with AVX-512, 32
 * with AVX2, 16 at baseline) and, per chunk, panels of 6 query rows: the
 * scores of RS rows at a time (RS x 4 accumulators: 24 of the 32 zmm, 12 of
 * the 16 ymm) stay in registers through the softmax step, which writes
 * P [6 x CK]; then O [6 x Dp] += P V_chunk. Scores are in base 2: the packed
 * queries carry c log2(e), so P = 2^(s - m) (pl_vexp2) with no scaling.
 * The running maximum m of a row is raised only when a score exceeds it by
 * more than LAZY (then O and l are rescaled by 2^(m_old - m_new)): P stays
 * <= 2^LAZY, and the exact result O / l, lse = m + log2(l) is unchanged. The
 * row sum l is kept as a vector and reduced once at the end. */
#define CK (4 * PL_VW)
#define RS (PL_VW == 16 ? 6 : 3)
#define LAZY 8.0f

/* Scores of rows r0 .. r0 + R - 1 (block-local) with the chunk's keys (KT
 * columns c0 ..), softmax step, P rows written at P + (r0 - p0) * CK. diag:
 * key c0 + c is masked when it is after the row's query. */
static PL_AI void fwd_scores(int R, int64_t D, const float *Qs, const float *KTc, float *S) {
    pl_vf acc[6][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = pl_splat(0.0f);
    for (int64_t d = 0; d < D; d++) {
        pl_vf kv[4];
        for (int v = 0; v < 4; v++) kv[v] = PL_LD(KTc + d * BLK + v * PL_VW);
        for (int r = 0; r < R; r++) {
            const float q = Qs[r * D + d];
            for (int v = 0; v < 4; v++) acc[r][v] += q * kv[v];
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) PL_ST(S + r * CK + v * PL_VW, acc[r][v]);
}

/* Not inlined: in the caller the exp's constants would take registers that
 * the 24 accumulators need (they were spilled). */
__attribute__((noinline)) static void fwd_scores_n(int R, int64_t D, const float *Qs,
                                                   const float *KTc, float *S) {
    switch (R) {
    case 6: fwd_scores(6, D, Qs, KTc, S); break;
    case 5: fwd_scores(5, D, Qs, KTc, S); break;
    case 4: fwd_scores(4, D, Qs, KTc, S); break;
    case 3: fwd_scores(3, D, Qs, KTc, S); break;
    case 2: fwd_scores(2, D, Qs, KTc, S); break;
    default: fwd_scores(1, D, Qs, KTc, S); break;
    }
}

static PL_AI void fwd_rows(int R, const att *a, const float *Qs, const float *KTc, int64_t r0,
                           int64_t c0, bool diag, float *P, float *O, float *lv, float *m) {
    const int64_t Dp = a->Dp;
    fwd_scores_n(R, a->D, Qs + r0 * a->D, KTc, P);
    const pl_vf ninf = pl_splat(-INFINITY);
    for (int r = 0; r < R; r++) {
        float *pr = P + r * CK;
        pl_vf x[4];
        for (int v = 0; v < 4; v++) x[v] = PL_LD(pr + v * PL_VW);
        if (diag) {
            const pl_vf key = pl_iota() + (float)(c0 - (r0 + r));
            for (int v = 0; v < 4; v++) x[v] = PL_SEL(key + (float)(v * PL_VW) > 0.0f, ninf, x[v]);
        }
        pl_vf mx = x[0];
        for (int v = 1; v < 4; v++) mx = PL_SEL(x[v] > mx, x[v], mx);
        float *mr = m + r0 + r, *lr = lv + (r0 + r) * PL_VW;
        if (pl_vany((pl_vi)(mx > pl_splat(*mr + LAZY)))) { /* raise m: rare past the start */
            const float mn = pl_vhmax(mx), alpha = pl_vexp2(pl_splat(*mr - mn))[0];
            *mr = mn;
            PL_ST(lr, PL_LD(lr) * alpha);
            for (int64_t d = 0; d < Dp; d += PL_VW)
                PL_ST(O + (r0 + r) * Dp + d, PL_LD(O + (r0 + r) * Dp + d) * alpha);
        }
        const pl_vf mv = pl_splat(*mr);
        pl_vf sum = PL_LD(lr);
        for (int v = 0; v < 4; v++) {
            const pl_vf e = pl_vexp2(x[v] - mv);
            sum += e;
            PL_ST(pr + v * PL_VW, e);
        }
        PL_ST(lr, sum);
    }
}

/* Query block i of head bh. */
void PL_ISA_FN(fwd_task)(const att *a, int64_t bh, int64_t i, float *ws) {
    const int64_t L = a->L, D = a->D, Dp = a->Dp, rs = a->rs, H = a->H;
    const int64_t b = bh / H, h = bh % H;
    const float *qb = a->q + (b * L * H + h) * D, *KT = a->KT + bh * a->nblk * D * BLK,
                *Vb = a->Vp + bh * a->Lp * Dp;
    float *Qs = ws, *P = Qs + BLK * D, *O = P + 6 * CK, *lv = O + BLK * Dp, *m = lv + BLK * PL_VW;
    const int64_t t0 = i * BLK, nr = imin(BLK, L - t0);
    const float c2 = a->scale * 1.44269504088896341f; /* scores in base 2 */
    for (int64_t r = 0; r < nr; r++) {
        m[r] = -INFINITY;
        PL_ST(lv + r * PL_VW, pl_splat(0.0f));
        for (int64_t d = 0; d < Dp; d += PL_VW) PL_ST(O + r * Dp + d, pl_splat(0.0f));
        for (int64_t d = 0; d < D; d++) Qs[r * D + d] = qb[(t0 + r) * rs + d] * c2;
    }
    for (int64_t j = 0; j <= i; j++) {
        const int64_t s0 = j * BLK;
        const bool dg = j == i;
        for (int64_t c0 = 0; c0 < BLK && s0 + c0 < L; c0 += CK) {
            const float *KTc = KT + j * D * BLK + c0;
            for (int64_t p0 = 0; p0 < nr; p0 += 6) {
                const int64_t R = imin(6, nr - p0);
                if (dg && c0 > p0 + R - 1) continue; /* the chunk is after every row's query */
                const bool diag = dg && c0 + CK - 1 > p0;
                for (int64_t r0 = p0; r0 < p0 + R; r0 += RS) {
                    const int64_t n = imin(RS, p0 + R - r0);
                    float *Pr = P + (r0 - p0) * CK;
#if PL_VW == 16
                    switch (n) {
                    case 6: fwd_rows(6, a, Qs, KTc, r0, c0, diag, Pr, O, lv, m); break;
                    case 5: fwd_rows(5, a, Qs, KTc, r0, c0, diag, Pr, O, lv, m); break;
                    case 4: fwd_rows(4, a, Qs, KTc, r0, c0, diag, Pr, O, lv, m); break;
                    case 3: fwd_rows(3, a, Qs, KTc, r0, c0, diag, Pr, O, lv, m); break;
                    case 2: fwd_rows(2, a, Qs, KTc, r0, c0, diag, Pr, O, lv, m); break;
                    default: fwd_rows(1, a, Qs, KTc, r0, c0, diag, Pr, O, lv, m); break;
                    }
#else
                    switch (n) {
                    case 3: fwd_rows(3, a, Qs, KTc, r0, c0, diag, Pr, O, lv, m); break;
                    case 2: fwd_rows(2, a, Qs, KTc, r0, c0, diag, Pr, O, lv, m); break;
                    default: fwd_rows(1, a, Qs, KTc, r0, c0, diag, Pr, O, lv, m); break;
                    }
#endif
                }
                const int64_t nc = imin(CK, L - s0 - c0);
                if (a->p > 0.0f) drop_rows(a, bh, t0 + p0, R, s0 + c0, nc, P, CK);
                pl_gemm(R, Dp, nc, P, CK, 1, Vb + (s0 + c0) * Dp, Dp, O + p0 * Dp, Dp, true);
            }
        }
    }
    float *ob = a->o + (b * L * H + h) * D;
    for (int64_t r = 0; r < nr; r++) {
        const float l = pl_vhsum(PL_LD(lv + r * PL_VW)), inv = 1.0f / l;
        for (int64_t d = 0; d < D; d++) ob[(t0 + r) * rs + d] = O[r * Dp + d] * inv;
        a->lse[bh * a->Lp + t0 + r] = m[r] + log2f(l); /* base 2 */
    }
}

/* ---- backward ---- */

typedef struct {
    float *ST, *dPT, *ZT, *dKa, *dVa, *dQa;
} bwd_ws;

static PL_AI bwd_ws bwd_carve(const att *a, float *ws) {
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
PL_SAME_CODE static void bwd_tile(const att *a, int64_t bh, int64_t i, int64_t j, bwd_ws *w,
                                  bool want_pz) {
    const int64_t L = a->L, D = a->D, rs = a->rs, H = a->H, Lp = a->Lp;
    const int64_t b = bh / H, h = bh % H, t0 = i * BLK, s0 = j * BLK;
    const int64_t nr = imin(BLK, L - t0), nc = imin(BLK, L - s0), nrp = pl_rupw(nr);
    const float *kb = a->k + (b * L * H + h) * D + s0 * rs,
                *vb = a->v + (b * L * H + h) * D + s0 * rs;
    const float *QT = a->QT + (bh * a->nblk + i) * D * BLK,
                *dOT = a->dOT + (bh * a->nblk + i) * D * BLK;
    const float *lseb = a->lse + bh * Lp + t0, *dvb = a->dvec + bh * Lp + t0;
    pl_gemm(nc, nrp, D, kb, rs, 1, QT, BLK, w->ST, BLK, false);
    pl_gemm(nc, nrp, D, vb, rs, 1, dOT, BLK, w->dPT, BLK, false);
    const bool drop = a->p > 0.0f, edge = i == j || nr < BLK;
    if (drop) drop_cols(a, bh, t0, nrp, s0, nc, w->ZT);
    const pl_vf iota = pl_iota();
    const float c2 = a->scale * 1.44269504088896341f;
    for (int64_t c = 0; c < nc; c++) {
        float *st = w->ST + c * BLK, *dp = w->dPT + c * BLK, *z = w->ZT + c * BLK;
        for (int64_t r = 0; r < nrp; r += PL_VW) {
            pl_vf P = pl_vexp2(PL_LD(st + r) * c2 - PL_LD(lseb + r)); /* lse in base 2 */
            if (edge) { /* valid: t0 + r >= s0 + c and r < nr */
                pl_vf rv = iota + (float)r;
                pl_vi ok = (rv + (float)(t0 - s0) >= (float)c) & (rv < (float)nr);
                P = PL_SEL(ok, P, pl_splat(0.0f));
            }
            pl_vf dP = PL_LD(dp + r);
            if (drop) {
                pl_vf Z = PL_LD(z + r);
                dP *= Z;
                if (want_pz) PL_ST(st + r, P * Z);
            } else if (want_pz) {
                PL_ST(st + r, P);
            }
            PL_ST(dp + r, P * (dP - PL_LD(dvb + r)));
        }
    }
}

/* dQa [nr x Dp] += dS K_j: the transposed tile read with swapped strides.
 * Not inlined, for the reason given at bwd_tile. */
PL_SAME_CODE static void dq_accum(const float *dST, int64_t nr, int64_t nc, int64_t Dp,
                                  const float *Kj, float *dQa) {
    pl_gemm(nr, Dp, nc, dST, 1, BLK, Kj, Dp, dQa, Dp, true);
}

/* Two products sharing their shape, in one pass (each B row and A column
 * loaded once per step for both): C1 += A1 B1 and C2 += A2 B2, [R x PL_VW*NV]
 * tiles of C, A by rows of stride lda, B and C row-major with stride ldb.
 * R <= 6, NV <= 2: with AVX-512 24 accumulators of the 32 registers; the
 * narrower levels use R <= 3 (12 of 16). */
static PL_AI void gemm2_tile(int R, int NV, int64_t K, const float *A1, const float *A2,
                             int64_t lda, const float *B1, const float *B2, int64_t ldb, float *C1,
                             float *C2) {
    pl_vf c1[6][2], c2[6][2];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            c1[r][v] = PL_LD(C1 + r * ldb + PL_VW * v);
            c2[r][v] = PL_LD(C2 + r * ldb + PL_VW * v);
        }
    for (int64_t k = 0; k < K; k++) {
        pl_vf b1[2], b2[2];
        for (int v = 0; v < NV; v++) {
            b1[v] = PL_LD(B1 + k * ldb + PL_VW * v);
            b2[v] = PL_LD(B2 + k * ldb + PL_VW * v);
        }
        for (int r = 0; r < R; r++) {
            const float x1 = A1[r * lda + k], x2 = A2[r * lda + k];
            for (int v = 0; v < NV; v++) {
                c1[r][v] += x1 * b1[v];
                c2[r][v] += x2 * b2[v];
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            PL_ST(C1 + r * ldb + PL_VW * v, c1[r][v]);
            PL_ST(C2 + r * ldb + PL_VW * v, c2[r][v]);
        }
}

#define G2R (PL_VW == 16 ? 6 : 3) /* rows of a gemm2 tile */

/* C1 [M x N] += A1 B1, C2 += A2 B2 (N a multiple of PL_VW; K the inner size). */
static PL_AI void gemm2(int64_t M, int64_t N, int64_t K, const float *A1, const float *A2,
                        int64_t lda, const float *B1, const float *B2, int64_t ldb, float *C1,
                        float *C2) {
    for (int64_t m = 0; m < M; m += G2R) {
        const int64_t R = imin(G2R, M - m);
        for (int64_t n = 0; n < N; n += 2 * PL_VW) {
            const int NV = n + 2 * PL_VW <= N ? 2 : 1;
            const float *a1 = A1 + m * lda, *a2 = A2 + m * lda;
            float *c1 = C1 + m * ldb + n, *c2 = C2 + m * ldb + n;
#define G2(RR)                                                                                     \
    (NV == 2 ? gemm2_tile(RR, 2, K, a1, a2, lda, B1 + n, B2 + n, ldb, c1, c2)                      \
             : gemm2_tile(RR, 1, K, a1, a2, lda, B1 + n, B2 + n, ldb, c1, c2))
            int64_t done = 0; /* rows of the tile done by a multi-row kernel */
            if (R == G2R) {
                G2(G2R);
                done = R;
            }
#if PL_VW == 16
            else if (R >= 4) {
                G2(4);
                done = 4;
            }
#endif
            for (int64_t x = m + done; x < m + R; x++) { /* the rest, a row at a time */
                const float *e1 = A1 + x * lda, *e2 = A2 + x * lda;
                float *f1 = C1 + x * ldb + n, *f2 = C2 + x * ldb + n;
                if (NV == 2)
                    gemm2_tile(1, 2, K, e1, e2, lda, B1 + n, B2 + n, ldb, f1, f2);
                else
                    gemm2_tile(1, 1, K, e1, e2, lda, B1 + n, B2 + n, ldb, f1, f2);
            }
#undef G2
        }
    }
}

/* dK_j and dV_j of key block j over the query blocks i >= j; with_dq also
 * adds dS K_j into the dQ rows of every block i (w->dQa, [nblk*BLK x Dp]).
 * This, bwd_tile, dq_accum and write_dq hold all the backward arithmetic and
 * are not inlined, so both schedules run the same machine code. */
PL_SAME_CODE static void key_block(const att *a, int64_t bh, int64_t j, bwd_ws *w, bool with_dq) {
    const int64_t L = a->L, D = a->D, Dp = a->Dp, rs = a->rs, H = a->H;
    const int64_t b = bh / H, h = bh % H, s0 = j * BLK, nc = imin(BLK, L - s0);
    const bool want_kv = a->dk || a->dv;
    const float *Qb = a->Qp + bh * a->Lp * Dp, *dOb = a->dOp + bh * a->Lp * Dp,
                *Kb = a->Kp + bh * a->Lp * Dp;
    if (want_kv)
        for (int64_t x = 0; x < nc * Dp; x += PL_VW) {
            PL_ST(w->dKa + x, pl_splat(0.0f));
            PL_ST(w->dVa + x, pl_splat(0.0f));
        }
    for (int64_t i = j; i < a->nblk; i++) {
        const int64_t t0 = i * BLK, nr = imin(BLK, L - t0);
        bwd_tile(a, bh, i, j, w, want_kv);
        if (want_kv) /* dV += (P o Z)^T dO, dK += dS^T Q */
            gemm2(nc, Dp, nr, w->ST, w->dPT, BLK, dOb + t0 * Dp, Qb + t0 * Dp, Dp, w->dVa, w->dKa);
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
PL_SAME_CODE static void write_dq(const att *a, int64_t bh, int64_t t0, int64_t nr,
                                  const float *dQa) {
    const int64_t L = a->L, D = a->D, Dp = a->Dp, rs = a->rs, H = a->H;
    float *g = a->dq + ((bh / H) * L * H + bh % H) * D + t0 * rs;
    for (int64_t r = 0; r < nr; r++)
        for (int64_t d = 0; d < D; d++) g[r * rs + d] += a->scale * dQa[r * Dp + d];
}

/* Schedule 1: all of head bh. */
void PL_ISA_FN(bwd_head_task)(const att *a, int64_t bh, float *ws) {
    bwd_ws w = bwd_carve(a, ws);
    const bool with_dq = a->dq != NULL;
    if (with_dq)
        for (int64_t x = 0; x < a->L * a->Dp; x += PL_VW) PL_ST(w.dQa + x, pl_splat(0.0f));
    for (int64_t j = 0; j < a->nblk; j++) key_block(a, bh, j, &w, with_dq);
    if (with_dq) write_dq(a, bh, 0, a->L, w.dQa);
}

/* Schedule 2, first pass: dK, dV of key block j. */
void PL_ISA_FN(bwd_kv_task)(const att *a, int64_t bh, int64_t j, float *ws) {
    bwd_ws w = bwd_carve(a, ws);
    key_block(a, bh, j, &w, false);
}

/* Schedule 2, second pass: dQ of query block i (same tiles, same order). */
void PL_ISA_FN(bwd_dq_task)(const att *a, int64_t bh, int64_t i, float *ws) {
    bwd_ws w = bwd_carve(a, ws);
    const int64_t Dp = a->Dp, nr = imin(BLK, a->L - i * BLK);
    const float *Kb = a->Kp + bh * a->Lp * Dp;
    for (int64_t x = 0; x < nr * Dp; x += PL_VW) PL_ST(w.dQa + x, pl_splat(0.0f));
    for (int64_t j = 0; j <= i; j++) {
        const int64_t nc = imin(BLK, a->L - j * BLK);
        bwd_tile(a, bh, i, j, &w, false);
        dq_accum(w.dPT, nr, nc, Dp, Kb + j * BLK * Dp, w.dQa);
    }
    write_dq(a, bh, i * BLK, nr, w.dQa);
}

/* D[bh, t] = sum_d dO[b,t,h,d] O[b,t,h,d]; 0 for t in [L, Lp). */
void PL_ISA_FN(dvec_rows)(const att *a, const float *o, float *dvec, int64_t b) {
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

#else /* ---- the ops (built once) ---- */

/* Floats of per-thread scratch. */
/* Forward: Qs [BLK][D], P [6][CK], O [BLK][Dp], l [BLK][PL_VW], m [BLK], at
 * the widest PL_VW (16). */
static int64_t fwd_scratch(const att *a) {
    return BLK * a->D + 6 * 64 + BLK * a->Dp + BLK * 16 + BLK;
}
static int64_t bwd_scratch(const att *a, bool whole) {
    return 3 * BLK * BLK + 2 * BLK * a->Dp + (whole ? a->nblk : 1) * BLK * a->Dp;
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
            PL_ISA_PICK(dvec_rows, a.isa)(ap, o, dvec, b);
        _Pragma("omp for schedule(static)") for (int64_t t = 0; t < BH * nblk; t++) {
            PL_ISA_PICK(pack_t, a.isa)(ap, a.q, QT, t / nblk, t % nblk);
            PL_ISA_PICK(pack_t, a.isa)(ap, a.dout, dOT, t / nblk, t % nblk);
            PL_ISA_PICK(pack_rows, a.isa)(ap, a.q, Qp, t / nblk, t % nblk);
            PL_ISA_PICK(pack_rows, a.isa)(ap, a.dout, dOp, t / nblk, t % nblk);
            PL_ISA_PICK(pack_rows, a.isa)(ap, a.k, Kp, t / nblk, t % nblk);
        }
    });
    if (whole) {
        PL_PARALLEL_FOR(work, schedule(dynamic, 1), bh, BH,
                        PL_ISA_PICK(bwd_head_task, a.isa)(ap, bh, ws + omp_get_thread_num() * per));
    } else {
        if (a.dk || a.dv) /* longest (j = 0) first */
            PL_PARALLEL_FOR(work, schedule(dynamic, 1), t, BH * nblk,
                            PL_ISA_PICK(bwd_kv_task, a.isa)(ap, t % BH, t / BH,
                                                            ws + omp_get_thread_num() * per));
        if (a.dq) /* longest (i = nblk - 1) first */
            PL_PARALLEL_FOR(work, schedule(dynamic, 1), t, BH * nblk,
                            PL_ISA_PICK(bwd_dq_task, a.isa)(ap, t % BH, nblk - 1 - t / BH,
                                                            ws + omp_get_thread_num() * per));
    }
    pl_mark_release(ctx, mark);
}

static pl_tensor *attention_impl(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *v,
                                 float dropout_p, pl_rng *rng) {
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
    a.isa = pl__isa();
    a.Dp = (a.D + pl__isa_width(a.isa) - 1) & ~(int64_t)(pl__isa_width(a.isa) - 1);
    a.rs = a.H * a.D;
    a.nblk = (a.L + BLK - 1) / BLK;
    a.Lp = a.nblk * BLK;
    a.scale = (float)(1.0 / sqrt((double)a.D));
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
    float *lse = out ? pl__scratch(ctx, (size_t)(BH * a.Lp) * sizeof(float)) : NULL;
    /* Operands and per-thread tiles: released for reuse once the forward is done. */
    pl_mark mark = pl_mark_get(ctx);
    float *KT = lse ? pl__scratch(ctx, (size_t)(tsz + rsz) * sizeof(float)) : NULL;
    float *ws = KT ? pl__scratch(ctx, (size_t)(T * per) * sizeof(float)) : NULL;
    if (!ws) return NULL;
    a.o = pl_f32(out);
    a.lse = lse;
    a.KT = KT;
    a.Vp = KT + tsz;
    const att *ap = &a;
    /* Two regions: the dynamic loop must not run orphaned (see PL_PARALLEL). */
    PL_PARALLEL_FOR(work, schedule(static), t, BH * nblk, {
        PL_ISA_PICK(pack_t, a.isa)(ap, a.k, KT, t / nblk, t % nblk);
        PL_ISA_PICK(pack_rows, a.isa)(ap, a.v, KT + tsz, t / nblk, t % nblk);
        if (t % nblk == nblk - 1) /* pad rows of lse, read by backward's tiles */
            for (int64_t x = a.L; x < a.Lp; x++) lse[(t / nblk) * a.Lp + x] = 0.0f;
    });
    PL_PARALLEL_FOR(work, schedule(dynamic, 1), t, BH * nblk, /* longest (last query block) first */
                    PL_ISA_PICK(fwd_task, a.isa)(ap, t % BH, nblk - 1 - t / BH,
                                                 ws + omp_get_thread_num() * per));
    if (dropout_p > 0.0f) rng->offset += (uint64_t)BH * (uint64_t)a.L * a.W;
    a.KT = a.Vp = NULL; /* released below */
    pl_mark_release(ctx, mark);
    pl_tensor *in[3] = {q, k, v};
    pl_node *n;
    if (pl__record(ctx, "attention", attention_backward, out, 3, in, sizeof a, &n)) return NULL;
    if (n) *(att *)n->saved = a;
    return out;
}

pl_tensor *pl_attention(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *v, float dropout_p,
                        pl_rng *rng) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = attention_impl(ctx, q, k, v, dropout_p, rng);
    pl__prof_end(ctx, "attention", t0, false);
    return y;
}

#endif
