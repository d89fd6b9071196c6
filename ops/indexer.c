/* Lightning indexer scores (DeepSeek sparse attention):
 *
 *   I[b,t,s] = sum_j w[b,t,j] * ReLU(qI[b,t,j,:] . kI[b,s,:])     for s <= t
 *
 * Three entry points share one blocked computation of the dot products:
 *  - pl_indexer_scores: the causal [B,L,L] matrix (-inf above the diagonal);
 *  - pl_indexer_topk:   the causal top-k of each row, fused, never holding
 *                       more than one block of score rows;
 *  - pl_indexer_scores_at: only the scores at given index sets, [B,L,K]
 *                       (blocked like the others, or gathered when few keys are
 *                       selected; see below).
 *
 * Forward (pl_indexer_scores, pl_indexer_topk): fused register-tiled kernels
 * (ix_rows_f32, below): kI packed once per call into panels of 16 keys, then
 * per group of query rows every head's dot products stay in registers, and
 * the ReLU and weighted head sum write each score row once, straight into the
 * row the top-k reads. Extra memory O(B*L*dI + threads * rows * L).
 * Backward and the blocked scores_at take query rows [t0, t1) of batch b as
 *   Dots[(t-t0)*HI + j, s] = qI[b,t,j,:] . kI[b,s,:],   s < t1
 * by the same kernel (ix_dots_f32: the same bits as the forward's scores; the
 * causal triangle is only wasted inside the diagonal block). A block holds at
 * most ~2^20 floats, so the extra memory is O(L * block) and never the
 * [B,L,HI,L] tensor. Backward recomputes each block's products instead of
 * saving them:
 *   dw[t,j]   = sum_{s<=t} dI[t,s] ReLU(Dots[t,j,s])
 *   dDots     = dI[t,s] w[t,j] [Dots > 0]           (ReLU subgradient 0 at 0)
 *   dqI_block = dDots kI[0:t1],   dkI[0:t1] += dDots^T qI_block   (two sgemms)
 * Every product is one chain of multiply-adds over the dI components in order
 * (fused where the level has FMA), the order of the decode kernel
 * pl__ix_scores_kt: pl_indexer_topk sees exactly the scores pl_indexer_scores
 * returns, and decoding the same scores, bit for bit, at every level.
 *
 * Precision (pl_set_indexer_precision): with int8 the rows of qI and kI are
 * quantised once per call and each block's products are an exact int32 gemm
 * (oneDNN), scaled back per row and key inside the score sum.
 *
 * Kernels: this file is one of PLASA_ISA_SOURCES (CMakeLists.txt): the section
 * under PL_ISA is built per instruction set (AVX-512, AVX2, baseline) on
 * lib/simd.h, the ops section once; each op takes its level once (pl__isa(),
 * saved for backward). The file is built with -ffp-contract=off: the
 * elementwise kernels (score rows, their backward, int8 scaling) give the same
 * bits on every path. The dot products (the fused and decode kernels, dq) use
 * explicit FMAs (pl_vfma) where the level has them, as an sgemm does, and
 * the gathered dots (ixg_chunk_dots) sum their PL_VW lanes by the one
 * transposing tree: there the paths differ in the last bits. Every path is tested against the
 * references of tests/test_indexer.c (tu_isa_tcases forces each level the CPU has). */
#include "internal.h"

#include <math.h>
#include <omp.h>

typedef struct {
    int64_t B, L, HI, dI, T; /* T: query rows per block */
    int isa;                 /* the kernels' level (simd.h), the same for the backward */
} ix_dims;

/* The packed operands of a fused score call, in its precision (ix_prepare). */
typedef struct {
    pl_indexer_precision prec;
    const float *kt;   /* f32: kI in panels (ix_pack_keys) */
    int8_t *q8;        /* int8: qI rows [B*L*HI, dI4] (zero padded) */
    int32_t *qoff;     /* int8: 64 * sum of each q8 row */
    float *sq, *sk;    /* int8: scales of qI rows [B*L*HI], kI rows [B*Lp] */
    uint8_t *k8t;      /* int8: offset kI panels, batch b at b*Lp*dI4 */
    uint32_t *qp, *kb; /* bf16: qI pairs [B*L*HI, dI2], kI panels (b at b*Lp*dI2) */
    int64_t dIp;       /* dI4 (int8), dI2 (bf16), dI */
    int hw;            /* int8: AVX512-VNNI; bf16: AVX512_BF16 */
} ix_prep;

PL_ISA_DECLARE(void, pl__ix_pack_i8, (const int8_t *k8, int64_t n, int64_t dI, uint8_t *k8t));
PL_ISA_DECLARE(void, ix_rows_i8,
               (const int8_t *q8, const int32_t *qoff, const float *sq, const float *w, int64_t R,
                int64_t HI, int64_t dI4, const uint8_t *k8t, const float *sk, int64_t n, int vnni,
                float *out, int64_t ldo, int32_t *D));
PL_ISA_DECLARE(void, pl__ix_bf16_rows, (const float *x, int64_t n, int64_t dI, uint32_t *xp));
PL_ISA_DECLARE(void, pl__ix_pack_bf16, (const uint32_t *kp, int64_t n, int64_t dI2, uint32_t *kb));
PL_ISA_DECLARE(void, ix_rows_bf16,
               (const uint32_t *qp, const float *w, int64_t R, int64_t HI, int64_t dI2,
                const uint32_t *kb, int64_t n, int hw, float *out, int64_t ldo, float *D));
PL_ISA_DECLARE(void, pl__ix_pack_f32, (const float *k, int64_t n, int64_t dI, float *kt));
PL_ISA_DECLARE(void, ix_rows_f32,
               (const float *q, const float *w, int64_t R, int64_t HI, int64_t dI, const float *kt,
                int64_t n, float *out, int64_t ldo, float *D));
PL_ISA_DECLARE(void, ix_dots_f32,
               (const float *q, int64_t M, int64_t dI, const float *kt, int64_t n, float *D,
                int64_t ld, float *T));
PL_ISA_DECLARE(void, ix_row_backward,
               (float *D, int64_t ld, const float *g, const float *w, int64_t HI, int64_t n,
                float *dw));
PL_ISA_DECLARE(void, ixb_fwd_row,
               (const float *Dt, int64_t ld, const float *w, int64_t HI, const int32_t *ir,
                int64_t K, float *out));
PL_ISA_DECLARE(void, ixg_fwd_row,
               (const float *q, const float *kb, const float *w, const int32_t *ir, int64_t K,
                int64_t HI, int64_t dI, float *Xc, float *out));
PL_ISA_DECLARE(void, ixg_bwd_row,
               (const float *q, const float *kb, const float *w, const int32_t *ir, const float *g,
                int64_t K, int64_t HI, int64_t dI, float *Xc, float *dq, float *dw, float *dkp));

#ifdef PL_ISA /* ---- the kernels (built per instruction set) ---- */
#if PL_VW == 16
#include <immintrin.h>
#endif

/* Rounds n rows of x [n, dI] to int8 in [-lim, lim], scale max|row| / lim. */
void PL_ISA_FN(pl__ix_quant_rows)(const float *x, int64_t n, int64_t dI, float lim, int8_t *x8,
                                  float *scale) {
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * dI;
        float m = 0.0f;
        for (int64_t i = 0; i < dI; i++) {
            const float a = fabsf(xr[i]);
            m = a > m ? a : m;
        }
        const float inv = m > 0.0f ? lim / m : 0.0f;
        scale[r] = m / lim;
        for (int64_t i = 0; i < dI; i++) {
            float v = xr[i] * inv;
            v = v > lim ? lim : v;
            v = v < -lim ? -lim : v;
            v = v == v ? v : 0.0f; /* NaN input (its scale is NaN too) */
            x8[r * dI + i] = (int8_t)lrintf(v);
        }
    }
}

/* out[s] = sum_j w[j] ReLU(D[j*ld + s]) for s < n, PL_VW keys at a time, heads
 * in order (also the decode path's prefill products, ops/kv_cache.c). */
void PL_ISA_FN(pl__ix_row_scores)(float *out, const float *D, int64_t ld, const float *w,
                                  int64_t HI, int64_t n) {
    int64_t s = 0;
    for (; s + PL_VW <= n; s += PL_VW) {
        pl_vf acc = pl_splat(w[0]) * pl_vrelu(PL_LD(D + s));
        for (int64_t j = 1; j < HI; j++) acc += pl_splat(w[j]) * pl_vrelu(PL_LD(D + j * ld + s));
        PL_ST(out + s, acc);
    }
    for (; s < n; s++) {
        float acc = w[0] * pl__relu(D[s]);
        for (int64_t j = 1; j < HI; j++) acc += w[j] * pl__relu(D[j * ld + s]);
        out[s] = acc;
    }
}

/* Turns the dots of row t into dDots in place (zero for s > t) and adds dw for
 * every head into dw (may be NULL). */
void PL_ISA_FN(ix_row_backward)(float *D, int64_t ld, const float *g, const float *w, int64_t HI,
                                int64_t n, float *dw) {
    for (int64_t j = 0; j < HI; j++) {
        float *Dj = D + j * ld;
        const float wj = w[j];
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}; /* sum_s g[s] ReLU(D[s]) */
        int64_t s = 0;
        for (; s + 8 <= n; s += 8)
            for (int l = 0; l < 8; l++) {
                float x = Dj[s + l];
                acc[l] += g[s + l] * pl__relu(x);
            }
        float sum =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; s < n; s++) sum += g[s] * pl__relu(Dj[s]);
        if (dw) dw[j] += sum;
        for (s = 0; s < n; s++) Dj[s] = Dj[s] > 0.0f ? g[s] * wj : 0.0f;
        for (; s < ld; s++) Dj[s] = 0.0f;
    }
}

/* Blocked: row t's selected scores from its rows of the block products Dt
 * (head h at Dt + h*ld), summed over heads in the order of ix_row_scores. */
void PL_ISA_FN(ixb_fwd_row)(const float *Dt, int64_t ld, const float *w, int64_t HI,
                            const int32_t *ir, int64_t K, float *out) {
    for (int64_t j = 0; j < K; j++) {
        const int64_t s = ir[j];
        if (s < 0) {
            out[j] = -INFINITY;
            continue;
        }
        float acc = w[0] * pl__relu(Dt[s]);
        for (int64_t h = 1; h < HI; h++) {
            const float x = Dt[h * ld + s];
            acc += w[h] * pl__relu(x);
        }
        out[j] = acc;
    }
}

static inline void ix_prefetch(const float *row, int64_t n) {
    for (int64_t o = 0; o < n * (int64_t)sizeof(float); o += 64)
        __builtin_prefetch((const char *)row + o);
}

/* One chunk of PL_VW entries j0 .. j0+PL_VW of a row's index set: the
 * selected key rows (padding and entries past K point at key 0, a valid row
 * whose results are masked), the mask of valid lanes, and g (0 past K). */
typedef struct {
    const float *kp[PL_VW];
    int32_t ir[PL_VW]; /* -1: padding or past K */
} ixg_chunk;

static inline void ix_prefetchw(const float *row, int64_t n) {
    for (int64_t o = 0; o < n * (int64_t)sizeof(float); o += 64)
        __builtin_prefetch((const char *)row + o, 1);
}

/* Loads chunk j0 into c and prefetches the next chunk's key rows (and with
 * dkp, its dk rows for writing). Returns the chunk's entries (<= PL_VW). */
static PL_AI int64_t ixg_chunk_load(ixg_chunk *c, const float *kb, const int32_t *ir, int64_t j0,
                                    int64_t K, int64_t dI, const float *dkp) {
    const int64_t n = K - j0 < PL_VW ? K - j0 : PL_VW;
    for (int l = 0; l < PL_VW; l++) {
        const int32_t s = l < n ? ir[j0 + l] : -1;
        c->ir[l] = s;
        c->kp[l] = kb + (s >= 0 ? (int64_t)s : 0) * dI;
    }
    for (int64_t l = j0 + PL_VW; l < K && l < j0 + 2 * PL_VW; l++)
        if (ir[l] >= 0) {
            ix_prefetch(kb + (int64_t)ir[l] * dI, dI);
            if (dkp) ix_prefetchw(dkp + (int64_t)ir[l] * dI, dI);
        }
    return n;
}

static PL_AI pl_vi ixg_on(const ixg_chunk *c) {
    pl_vi v;
    memcpy(&v, c->ir, sizeof v);
    return v >= 0;
}

/* Xc[h*PL_VW + l] = q_h . k_{ir[j0+l]} for the chunk's lanes: per head, one
 * accumulator per lane over dI (fused multiply-adds in order of i, PL_VW
 * columns at a time), the lanes' sums by the one transposing tree
 * (pl_vhsum_t), then the dI % PL_VW last columns in order. The forward and the
 * backward call it alike: the same dots, bit for bit. */
static PL_AI void ixg_chunk_dots(const ixg_chunk *c, const float *q, int64_t HI, int64_t dI,
                                 float *Xc) {
    const int64_t dv = dI & ~(int64_t)(PL_VW - 1);
    for (int64_t h = 0; h < HI; h++) {
        const float *qh = q + h * dI;
        pl_vf a[PL_VW];
        for (int l = 0; l < PL_VW; l++) a[l] = pl_splat(0.0f);
        for (int64_t i = 0; i < dv; i += PL_VW) {
            const pl_vf qv = PL_LD(qh + i);
            for (int l = 0; l < PL_VW; l++) a[l] = pl_vfma(qv, PL_LD(c->kp[l] + i), a[l]);
        }
        float *x = Xc + h * PL_VW;
        PL_ST(x, pl_vhsum_t(a));
        for (int64_t i = dv; i < dI; i++)
            for (int l = 0; l < PL_VW; l++) x[l] += qh[i] * c->kp[l][i];
    }
}

/* Gathered forward of row (b,t): out[j] = sum_h w[h] ReLU(q_h . k_{ir[j]})
 * (heads added in order, -inf at padding). Xc: room for HI*PL_VW floats. */
void PL_ISA_FN(ixg_fwd_row)(const float *q, const float *kb, const float *w, const int32_t *ir,
                            int64_t K, int64_t HI, int64_t dI, float *Xc, float *out) {
    ixg_chunk c;
    for (int64_t j0 = 0; j0 < K; j0 += PL_VW) {
        const int64_t n = ixg_chunk_load(&c, kb, ir, j0, K, dI, NULL);
        ixg_chunk_dots(&c, q, HI, dI, Xc);
        pl_vf acc = pl_splat(w[0]) * pl_vrelu(PL_LD(Xc));
        for (int64_t h = 1; h < HI; h++) acc += pl_splat(w[h]) * pl_vrelu(PL_LD(Xc + h * PL_VW));
        acc = PL_SEL(ixg_on(&c), acc, pl_splat(-INFINITY));
        if (n == PL_VW) {
            PL_ST(out + j0, acc);
        } else {
            float tmp[PL_VW];
            PL_ST(tmp, acc);
            memcpy(out + j0, tmp, sizeof(float) * (size_t)n);
        }
    }
}

/* Backward of row (b,t), one pass over its index set, PL_VW entries at a
 * time: the chunk's dots (as the forward's), then with
 *   dDots[h,j] = g[j] w[h] [dots > 0]          (0 at padding)
 *   dw[h]  += sum_j g[j] ReLU(dots[h,j])       (per lane, then the one tree)
 *   dq_h   += sum_j dDots[h,j] k_{ir[j]}       (j in order)
 *   dkp_s  += sum_h dDots[h,j] q_h             (heads in fours, in order)
 * while the chunk's key rows are in L1. Scratch Xc: 2*HI*PL_VW floats. */
void PL_ISA_FN(ixg_bwd_row)(const float *q, const float *kb, const float *w, const int32_t *ir,
                            const float *g, int64_t K, int64_t HI, int64_t dI, float *Xc, float *dq,
                            float *dw, float *dkp) {
    float *dwv = Xc + HI * PL_VW; /* per head, per lane: sum g ReLU(dots) */
    for (int64_t h = 0; h < HI; h++) PL_ST(dwv + h * PL_VW, pl_splat(0.0f));
    const int64_t dv = dI & ~(int64_t)(PL_VW - 1);
    ixg_chunk c;
    for (int64_t j0 = 0; j0 < K; j0 += PL_VW) {
        const int64_t n = ixg_chunk_load(&c, kb, ir, j0, K, dI, dkp);
        ixg_chunk_dots(&c, q, HI, dI, Xc);
        float gt[PL_VW] = {0};
        memcpy(gt, g + j0, sizeof(float) * (size_t)n);
        const pl_vf gv = PL_LD(gt);
        const pl_vi on = ixg_on(&c);
        for (int64_t h = 0; h < HI; h++) {
            const pl_vf x = PL_LD(Xc + h * PL_VW);
            PL_ST(dwv + h * PL_VW,
                  PL_LD(dwv + h * PL_VW) + PL_SEL(on, gv * pl_vrelu(x), pl_splat(0.0f)));
            PL_ST(Xc + h * PL_VW,
                  PL_SEL(on & (x > pl_splat(0.0f)), gv * pl_splat(w[h]), pl_splat(0.0f)));
        }
        /* dq: four heads' PL_VW columns in registers over the chunk's keys */
        if (dq) {
            int64_t h = 0;
            for (; h + 4 <= HI; h += 4) {
                const float *C0 = Xc + h * PL_VW, *C1 = C0 + PL_VW, *C2 = C1 + PL_VW,
                            *C3 = C2 + PL_VW;
                float *d0 = dq + h * dI, *d1 = d0 + dI, *d2 = d1 + dI, *d3 = d2 + dI;
                for (int64_t i = 0; i < dv; i += PL_VW) {
                    pl_vf a0 = PL_LD(d0 + i), a1 = PL_LD(d1 + i), a2 = PL_LD(d2 + i),
                          a3 = PL_LD(d3 + i);
                    for (int l = 0; l < n; l++) {
                        if (c.ir[l] < 0) continue;
                        const pl_vf kv = PL_LD(c.kp[l] + i);
                        a0 = pl_vfma(pl_splat(C0[l]), kv, a0);
                        a1 = pl_vfma(pl_splat(C1[l]), kv, a1);
                        a2 = pl_vfma(pl_splat(C2[l]), kv, a2);
                        a3 = pl_vfma(pl_splat(C3[l]), kv, a3);
                    }
                    PL_ST(d0 + i, a0);
                    PL_ST(d1 + i, a1);
                    PL_ST(d2 + i, a2);
                    PL_ST(d3 + i, a3);
                }
                for (int64_t i = dv; i < dI; i++)
                    for (int l = 0; l < n; l++) {
                        if (c.ir[l] < 0) continue;
                        const float kv = c.kp[l][i];
                        d0[i] += C0[l] * kv;
                        d1[i] += C1[l] * kv;
                        d2[i] += C2[l] * kv;
                        d3[i] += C3[l] * kv;
                    }
            }
            for (; h < HI; h++) {
                const float *Ch = Xc + h * PL_VW;
                float *dh = dq + h * dI;
                for (int64_t i = 0; i < dv; i += PL_VW) {
                    pl_vf a = PL_LD(dh + i);
                    for (int l = 0; l < n; l++)
                        if (c.ir[l] >= 0) a = pl_vfma(pl_splat(Ch[l]), PL_LD(c.kp[l] + i), a);
                    PL_ST(dh + i, a);
                }
                for (int64_t i = dv; i < dI; i++)
                    for (int l = 0; l < n; l++)
                        if (c.ir[l] >= 0) dh[i] += Ch[l] * c.kp[l][i];
            }
        }
        if (!dkp) continue;
        /* dk rows: one read-modify-write of each selected key's row */
        for (int l = 0; l < n; l++) {
            if (c.ir[l] < 0) continue;
            float *dks = dkp + (int64_t)c.ir[l] * dI;
            int64_t h = 0;
            for (; h + 4 <= HI; h += 4) {
                const float c0 = Xc[h * PL_VW + l], c1 = Xc[(h + 1) * PL_VW + l],
                            c2 = Xc[(h + 2) * PL_VW + l], c3 = Xc[(h + 3) * PL_VW + l];
                if (c0 == 0.0f && c1 == 0.0f && c2 == 0.0f && c3 == 0.0f) continue;
                const float *q0 = q + h * dI, *q1 = q0 + dI, *q2 = q1 + dI, *q3 = q2 + dI;
                int64_t i = 0;
                for (; i < dv; i += PL_VW)
                    PL_ST(dks + i, PL_LD(dks + i) + (((c0 * PL_LD(q0 + i) + c1 * PL_LD(q1 + i)) +
                                                      c2 * PL_LD(q2 + i)) +
                                                     c3 * PL_LD(q3 + i)));
                for (; i < dI; i++) dks[i] += ((c0 * q0[i] + c1 * q1[i]) + c2 * q2[i]) + c3 * q3[i];
            }
            for (; h < HI; h++)
                if (Xc[h * PL_VW + l] != 0.0f) pl__axpy(dks, Xc[h * PL_VW + l], q + h * dI, dI);
        }
    }
    if (dw)
        for (int64_t h = 0; h < HI; h++) dw[h] += pl_vhsum(PL_LD(dwv + h * PL_VW));
}

/* ---- fused full-sequence scores (pl_indexer_scores, pl_indexer_topk) ----
 * Keys are packed once per call into panels of PL__KT positions, the cache's
 * layouts (ops/kv_cache.c), zero padded to a multiple of PL__KT_PAD:
 *  - f32:  component i of key s at kt[(s/16)*16*dI + i*16 + s%16];
 *  - int8: k8 + 64 (in [1, 127]), 4 components of 16 keys per 64 bytes
 *          (pl__ix_scores_kt8), dI4 = dI rounded up to 4;
 *  - bf16: 2 components of 16 keys per 64 bytes, component i of key s at
 *          kb[(s/16)*16*dI2 + (i/2)*32 + (s%16)*2 + i%2], dI2 = dI rounded up to 2.
 * A register tile of MR query heads (rows t, heads j flattened: m = row*HI + j)
 * x 2*PL_VW keys keeps every dot in a register for its whole chain over the
 * components; the dots of a group of query rows over one chunk of keys go to a
 * small L1 tile, and the epilogue writes each row's scores
 *   out[s] = sum_j w[j] ReLU(dot_j(s))   (heads in order, as pl__ix_row_scores)
 * once, into the row that feeds the top-k. No [rows*HI, L] product buffer.
 * Each f32 dot is one chain of pl_vfma over i = 0..dI-1 from 0: the order of
 * the decode kernel pl__ix_scores_kt, so decoding gives the same bits. */
#if PL_VW == 16
enum { IXF_MR = 12 };
#else
enum { IXF_MR = 6 };
#endif
enum { IXF_NC = 2 * PL_VW }; /* keys per tile */

/* Component 0 of key s in the f32 panels (the cache's kt_at). */
static PL_AI const float *ixf_at(const float *kt, int64_t dI, int64_t s) {
    return kt + (s / PL__KT) * PL__KT * dI + s % PL__KT;
}

/* D[m*IXF_NC + c] = q_m . k_{s0+c}, m < MR (q rows at q + m*dI), p0/p1: the
 * keys' components at their panels (PL_VW keys each). */
static PL_AI void ixf_tile(int MR, const float *q, int64_t dI, const float *p0, const float *p1,
                           float *D) {
    pl_vf a[IXF_MR][2];
    for (int m = 0; m < MR; m++) a[m][0] = a[m][1] = pl_splat(0.0f);
    for (int64_t i = 0; i < dI; i++) {
        const pl_vf k0 = PL_LD(p0 + i * PL__KT), k1 = PL_LD(p1 + i * PL__KT);
        for (int m = 0; m < MR; m++) {
            const pl_vf qm = pl_splat(q[m * dI + i]);
            a[m][0] = pl_vfma(qm, k0, a[m][0]);
            a[m][1] = pl_vfma(qm, k1, a[m][1]);
        }
    }
    for (int m = 0; m < MR; m++) {
        PL_ST(D + m * IXF_NC, a[m][0]);
        PL_ST(D + m * IXF_NC + PL_VW, a[m][1]);
    }
}

/* The dots of M query heads q [M, dI] with the IXF_NC keys from s0 into
 * D [M, IXF_NC]. */
static void ixf_chunk(const float *q, int64_t M, int64_t dI, const float *kt, int64_t s0,
                      float *D) {
    const float *p0 = ixf_at(kt, dI, s0), *p1 = ixf_at(kt, dI, s0 + PL_VW);
    int64_t m = 0;
    for (; m + IXF_MR <= M; m += IXF_MR) ixf_tile(IXF_MR, q + m * dI, dI, p0, p1, D + m * IXF_NC);
    switch (M - m) {
    case 0: break;
#if PL_VW == 16
    case 11: ixf_tile(11, q + m * dI, dI, p0, p1, D + m * IXF_NC); break;
    case 10: ixf_tile(10, q + m * dI, dI, p0, p1, D + m * IXF_NC); break;
    case 9: ixf_tile(9, q + m * dI, dI, p0, p1, D + m * IXF_NC); break;
    case 8: ixf_tile(8, q + m * dI, dI, p0, p1, D + m * IXF_NC); break;
    case 7: ixf_tile(7, q + m * dI, dI, p0, p1, D + m * IXF_NC); break;
    case 6: ixf_tile(6, q + m * dI, dI, p0, p1, D + m * IXF_NC); break;
#endif
    case 5: ixf_tile(5, q + m * dI, dI, p0, p1, D + m * IXF_NC); break;
    case 4: ixf_tile(4, q + m * dI, dI, p0, p1, D + m * IXF_NC); break;
    case 3: ixf_tile(3, q + m * dI, dI, p0, p1, D + m * IXF_NC); break;
    case 2: ixf_tile(2, q + m * dI, dI, p0, p1, D + m * IXF_NC); break;
    default: ixf_tile(1, q + m * dI, dI, p0, p1, D + m * IXF_NC); break;
    }
}

/* out[r*ldo + c] = sum_j w[r*HI + j] ReLU(D[(r*HI + j)*IXF_NC + c]) for R rows,
 * c < IXF_NC: the vector form of pl__ix_row_scores (heads in order). */
static PL_AI void ix_epilogue(const float *D, const float *w, int64_t R, int64_t HI, float *out,
                              int64_t ldo) {
    for (int64_t r = 0; r < R; r++)
        for (int v = 0; v < IXF_NC / PL_VW; v++) {
            const float *Dr = D + r * HI * IXF_NC + v * PL_VW;
            pl_vf acc = pl_splat(w[r * HI]) * pl_vrelu(PL_LD(Dr));
            for (int64_t j = 1; j < HI; j++)
                acc += pl_splat(w[r * HI + j]) * pl_vrelu(PL_LD(Dr + j * IXF_NC));
            PL_ST(out + r * ldo + v * PL_VW, acc);
        }
}

/* Packs n keys k [n, dI] into the f32 panels kt (n rounded up to PL__KT_PAD,
 * zero padded). */
void PL_ISA_FN(pl__ix_pack_f32)(const float *k, int64_t n, int64_t dI, float *kt) {
    const int64_t np = (n + PL__KT_PAD - 1) / PL__KT_PAD * PL__KT_PAD;
    for (int64_t p = 0; p < np; p += PL__KT) {
        float *o = kt + p * dI;
        for (int64_t i = 0; i < dI; i++)
            for (int l = 0; l < PL__KT; l++)
                o[i * PL__KT + l] = p + l < n ? k[(p + l) * dI + i] : 0.0f;
    }
}

/* Scores of R consecutive query rows (heads q [R*HI, dI], weights w [R*HI])
 * over keys [0, n) of the panels kt into out (row r at out + r*ldo, n rounded
 * up to IXF_NC written). D: scratch of R*HI*IXF_NC floats. */
void PL_ISA_FN(ix_rows_f32)(const float *q, const float *w, int64_t R, int64_t HI, int64_t dI,
                            const float *kt, int64_t n, float *out, int64_t ldo, float *D) {
    for (int64_t s0 = 0; s0 < n; s0 += IXF_NC) {
        ixf_chunk(q, R * HI, dI, kt, s0, D);
        ix_epilogue(D, w, R, HI, out + s0, ldo);
    }
}

/* The dots of M query heads q [M, dI] with keys [0, n) into D [M, ld] (the
 * columns s < n), the same bits as ix_rows_f32's: the products of
 * pl_indexer_scores for its backward and the blocked pl_indexer_scores_at.
 * T: scratch of M*IXF_NC floats. */
void PL_ISA_FN(ix_dots_f32)(const float *q, int64_t M, int64_t dI, const float *kt, int64_t n,
                            float *D, int64_t ld, float *T) {
    for (int64_t s0 = 0; s0 < n; s0 += IXF_NC) {
        ixf_chunk(q, M, dI, kt, s0, T);
        const int64_t c = n - s0 < IXF_NC ? n - s0 : IXF_NC;
        for (int64_t m = 0; m < M; m++)
            memcpy(D + m * ld + s0, T + m * IXF_NC, sizeof(float) * (size_t)c);
    }
}

/* ---- fused scores at PL_INDEXER_INT8 ----
 * Dots q8_m . k8_s exact in int32: sum over groups of 4 components of the
 * offset keys (k8 + 64, unsigned) times q8, minus qoff_m = 64 sum q8_m (as
 * pl__ix_scores_kt8). AVX512-VNNI: one vpdpbusd per 16 keys x 4 components;
 * AVX2 (and AVX-512 without VNNI): vpmaddubsw + vpmaddwd (no saturation: two
 * products of at most 127 * 127); baseline: plain integer loops. Then
 *   out[s] = sk[s] * sum_j (w[j] sq[j]) max(dot_j(s), 0)
 * in the order of ix_row_scores_i8: the same bits on every path. */
enum { IX8_NC = 32 }; /* keys per chunk: two panels of PL__KT */

#if PL_VW == 16
#define IX_VNNI __attribute__((target("avx512vnni")))
static IX_VNNI PL_AI void ix8_tile_vnni(int MR, const int8_t *q8, const int32_t *qoff, int64_t dI4,
                                        const uint8_t *b0, const uint8_t *b1, int32_t *D) {
    __m512i a[6][2]; /* MR <= 6: with more, GCC 12 spills the accumulators */
    for (int m = 0; m < MR; m++) a[m][0] = a[m][1] = _mm512_setzero_si512();
    for (int64_t g = 0; g < dI4 / 4; g++) {
        const __m512i k0 = _mm512_loadu_si512(b0 + g * 64), k1 = _mm512_loadu_si512(b1 + g * 64);
        for (int m = 0; m < MR; m++) {
            int32_t wq;
            memcpy(&wq, q8 + m * dI4 + 4 * g, 4);
            const __m512i qm = _mm512_set1_epi32(wq);
            a[m][0] = _mm512_dpbusd_epi32(a[m][0], k0, qm);
            a[m][1] = _mm512_dpbusd_epi32(a[m][1], k1, qm);
        }
    }
    for (int m = 0; m < MR; m++) {
        const __m512i o = _mm512_set1_epi32(qoff[m]);
        _mm512_storeu_si512(D + m * IX8_NC, _mm512_sub_epi32(a[m][0], o));
        _mm512_storeu_si512(D + m * IX8_NC + 16, _mm512_sub_epi32(a[m][1], o));
    }
}
static IX_VNNI void ix8_chunk_vnni(const int8_t *q8, const int32_t *qoff, int64_t M, int64_t dI4,
                                   const uint8_t *b0, int32_t *D) {
    const uint8_t *b1 = b0 + PL__KT * dI4;
    int64_t m = 0;
    for (; m + 6 <= M; m += 6)
        ix8_tile_vnni(6, q8 + m * dI4, qoff + m, dI4, b0, b1, D + m * IX8_NC);
    for (; m + 4 <= M; m += 4)
        ix8_tile_vnni(4, q8 + m * dI4, qoff + m, dI4, b0, b1, D + m * IX8_NC);
    for (; m < M; m++) ix8_tile_vnni(1, q8 + m * dI4, qoff + m, dI4, b0, b1, D + m * IX8_NC);
}
#endif

#if defined(__AVX2__)
/* One panel (16 keys, two ymm of 8 keys x 4 components) for MR query heads. */
static PL_AI void ix8_tile_avx2(int MR, const int8_t *q8, const int32_t *qoff, int64_t dI4,
                                const uint8_t *b, int32_t *D) {
    __m256i a[4][2];
    const __m256i one = _mm256_set1_epi16(1);
    for (int m = 0; m < MR; m++) a[m][0] = a[m][1] = _mm256_setzero_si256();
    for (int64_t g = 0; g < dI4 / 4; g++) {
        const __m256i k0 = _mm256_loadu_si256((const __m256i *)(b + g * 64));
        const __m256i k1 = _mm256_loadu_si256((const __m256i *)(b + g * 64 + 32));
        for (int m = 0; m < MR; m++) {
            int32_t wq;
            memcpy(&wq, q8 + m * dI4 + 4 * g, 4);
            const __m256i qm = _mm256_set1_epi32(wq);
            a[m][0] =
                _mm256_add_epi32(a[m][0], _mm256_madd_epi16(_mm256_maddubs_epi16(k0, qm), one));
            a[m][1] =
                _mm256_add_epi32(a[m][1], _mm256_madd_epi16(_mm256_maddubs_epi16(k1, qm), one));
        }
    }
    for (int m = 0; m < MR; m++) {
        const __m256i o = _mm256_set1_epi32(qoff[m]);
        _mm256_storeu_si256((__m256i *)(D + m * IX8_NC), _mm256_sub_epi32(a[m][0], o));
        _mm256_storeu_si256((__m256i *)(D + m * IX8_NC + 8), _mm256_sub_epi32(a[m][1], o));
    }
}
#endif

/* D[m*IX8_NC + c] = q8_m . k8_{s0+c} for the IX8_NC keys of the two panels
 * from b0 (M query heads q8 [M, dI4]). */
static void ix8_chunk(const int8_t *q8, const int32_t *qoff, int64_t M, int64_t dI4,
                      const uint8_t *b0, int vnni, int32_t *D) {
#if PL_VW == 16
    if (vnni) {
        ix8_chunk_vnni(q8, qoff, M, dI4, b0, D);
        return;
    }
#endif
    (void)vnni;
#if defined(__AVX2__)
    for (int p = 0; p < 2; p++) {
        const uint8_t *b = b0 + p * PL__KT * dI4;
        int32_t *Dp = D + p * PL__KT;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            ix8_tile_avx2(4, q8 + m * dI4, qoff + m, dI4, b, Dp + m * IX8_NC);
        for (; m < M; m++) ix8_tile_avx2(1, q8 + m * dI4, qoff + m, dI4, b, Dp + m * IX8_NC);
    }
#else
    for (int64_t m = 0; m < M; m++)
        for (int c = 0; c < IX8_NC; c++) {
            const uint8_t *b = b0 + (c / PL__KT) * PL__KT * dI4 + (c % PL__KT) * 4;
            int32_t acc = 0;
            for (int64_t g = 0; g < dI4 / 4; g++)
                for (int j = 0; j < 4; j++)
                    acc += (int32_t)b[g * 64 + j] * (int32_t)q8[m * dI4 + 4 * g + j];
            D[m * IX8_NC + c] = acc - qoff[m];
        }
#endif
}

/* Packs n int8 key rows k8 [n, dI] into the offset panels (n rounded up to
 * PL__KT_PAD; padding components and keys hold 64, the value 0). */
void PL_ISA_FN(pl__ix_pack_i8)(const int8_t *k8, int64_t n, int64_t dI, uint8_t *k8t) {
    const int64_t dI4 = (dI + 3) & ~(int64_t)3, np = (n + PL__KT_PAD - 1) / PL__KT_PAD * PL__KT_PAD;
    for (int64_t p = 0; p < np; p += PL__KT) {
        uint8_t *o = k8t + p * dI4;
        for (int64_t g = 0; g < dI4 / 4; g++)
            for (int l = 0; l < PL__KT; l++)
                for (int j = 0; j < 4; j++) {
                    const int64_t i = 4 * g + j;
                    o[g * 64 + l * 4 + j] =
                        (uint8_t)(p + l < n && i < dI ? k8[(p + l) * dI + i] + 64 : 64);
                }
    }
}

/* The int8 scores of R consecutive query rows (q8 [R*HI, dI4] zero padded,
 * qoff, sq [R*HI], weights w [R*HI]) over keys [0, n) of the panels k8t
 * (scales sk, padded to the panels' length) into out (row r at out + r*ldo,
 * n rounded up to IX8_NC written). D: scratch of R*HI*IX8_NC int32. */
void PL_ISA_FN(ix_rows_i8)(const int8_t *q8, const int32_t *qoff, const float *sq, const float *w,
                           int64_t R, int64_t HI, int64_t dI4, const uint8_t *k8t, const float *sk,
                           int64_t n, int vnni, float *out, int64_t ldo, int32_t *D) {
    for (int64_t s0 = 0; s0 < n; s0 += IX8_NC) {
        ix8_chunk(q8, qoff, R * HI, dI4, k8t + s0 * dI4, vnni, D);
        for (int64_t r = 0; r < R; r++)
            for (int v = 0; v < IX8_NC / PL_VW; v++) {
                const int32_t *Dr = D + r * HI * IX8_NC + v * PL_VW;
                pl_vi d;
                memcpy(&d, Dr, sizeof d);
                pl_vf acc =
                    pl_splat(w[r * HI] * sq[r * HI]) * __builtin_convertvector(d & (d > 0), pl_vf);
                for (int64_t j = 1; j < HI; j++) {
                    memcpy(&d, Dr + j * IX8_NC, sizeof d);
                    acc += pl_splat(w[r * HI + j] * sq[r * HI + j]) *
                           __builtin_convertvector(d & (d > 0), pl_vf);
                }
                PL_ST(out + r * ldo + s0 + v * PL_VW, acc * PL_LD(sk + s0 + v * PL_VW));
            }
    }
}

/* ---- fused scores at PL_INDEXER_BF16 ----
 * qI and kI rounded to bfloat16 (pl__bf16_bits; subnormals to signed zero).
 * Each dot is a chain over the pairs of components p = 0, 1, ...:
 *   acc = acc + q[2p+1] k[2p+1];  acc = acc + q[2p] k[2p]
 * every product exact in float32 and every sum rounded (to nearest even):
 * what VDPBF16PS computes (AVX512_BF16, measured against this form on Zen 5),
 * except that it also flushes subnormal partial sums to zero. Without
 * AVX512_BF16 the same chain runs with float multiply-adds (an FMA of an
 * exact product rounds as the add alone). The scores then as f32's
 * (ix_epilogue). Keys in panels of 16 x 2 components (64 bytes). */
#if PL_VW == 16
#define IX_BF16 __attribute__((target("avx512bf16")))
static IX_BF16 PL_AI void ixb16_tile_hw(int MR, const uint32_t *qp, int64_t dI2, const uint32_t *b0,
                                        const uint32_t *b1, float *D) {
    __m512 a[12][2];
    for (int m = 0; m < MR; m++) a[m][0] = a[m][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < dI2; p++) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(b0 + p * 16);
        const __m512bh k1 = (__m512bh)_mm512_loadu_si512(b1 + p * 16);
        for (int m = 0; m < MR; m++) {
            const __m512bh qm = (__m512bh)_mm512_set1_epi32((int32_t)qp[m * dI2 + p]);
            a[m][0] = _mm512_dpbf16_ps(a[m][0], k0, qm);
            a[m][1] = _mm512_dpbf16_ps(a[m][1], k1, qm);
        }
    }
    for (int m = 0; m < MR; m++) {
        _mm512_storeu_ps(D + m * IXF_NC, a[m][0]);
        _mm512_storeu_ps(D + m * IXF_NC + 16, a[m][1]);
    }
}
static IX_BF16 void ixb16_chunk_hw(const uint32_t *qp, int64_t M, int64_t dI2, const uint32_t *b0,
                                   float *D) {
    const uint32_t *b1 = b0 + PL__KT * dI2;
    int64_t m = 0;
    for (; m + 12 <= M; m += 12) ixb16_tile_hw(12, qp + m * dI2, dI2, b0, b1, D + m * IXF_NC);
    for (; m + 4 <= M; m += 4) ixb16_tile_hw(4, qp + m * dI2, dI2, b0, b1, D + m * IXF_NC);
    for (; m < M; m++) ixb16_tile_hw(1, qp + m * dI2, dI2, b0, b1, D + m * IXF_NC);
}
#endif

/* The same chain with float multiply-adds: PL_VW keys per vector, the pair
 * (even low, odd high half) of each key in one 32-bit lane. */
static PL_AI void ixb16_tile_emu(int MR, const uint32_t *qp, int64_t dI2, const uint32_t *kb,
                                 float *D) {
    pl_vf a[IXF_MR][2];
    for (int m = 0; m < MR; m++) a[m][0] = a[m][1] = pl_splat(0.0f);
    const uint32_t *kb1 = kb + (PL_VW == 16 ? PL__KT * dI2 : PL_VW);
    const int64_t step = PL__KT; /* 32-bit words per pair of components in a panel */
    for (int64_t p = 0; p < dI2; p++) {
        const pl_vu w0 = PL_LDU(kb + p * step), w1 = PL_LDU(kb1 + p * step);
        const pl_vf e0 = (pl_vf)(w0 << 16), o0 = (pl_vf)(w0 & 0xffff0000u);
        const pl_vf e1 = (pl_vf)(w1 << 16), o1 = (pl_vf)(w1 & 0xffff0000u);
        for (int m = 0; m < MR; m++) {
            const uint32_t qw = qp[m * dI2 + p];
            union {
                uint32_t u;
                float f;
            } qe = {qw << 16}, qo = {qw & 0xffff0000u};
            const pl_vf ve = pl_splat(qe.f), vo = pl_splat(qo.f);
            a[m][0] = pl_vfma(ve, e0, pl_vfma(vo, o0, a[m][0]));
            a[m][1] = pl_vfma(ve, e1, pl_vfma(vo, o1, a[m][1]));
        }
    }
    for (int m = 0; m < MR; m++) {
        PL_ST(D + m * IXF_NC, a[m][0]);
        PL_ST(D + m * IXF_NC + PL_VW, a[m][1]);
    }
}

/* D[m*IXF_NC + c] = the bf16 dot of query head m with key s0 + c, for the
 * IXF_NC keys from s0 (a multiple of IXF_NC) of the panels kb. */
static void ixb16_chunk(const uint32_t *qp, int64_t M, int64_t dI2, const uint32_t *kb, int64_t s0,
                        int hw, float *D) {
#if PL_VW == 16
    if (hw) {
        ixb16_chunk_hw(qp, M, dI2, kb + s0 * dI2, D);
        return;
    }
#endif
    (void)hw;
    for (int64_t c = 0; c < IXF_NC; c += 2 * PL_VW) { /* IXF_NC = 2 PL_VW: once */
        const uint32_t *k0 = kb + ((s0 + c) / PL__KT) * PL__KT * dI2 + (s0 + c) % PL__KT;
        int64_t m = 0;
        for (; m + IXF_MR <= M; m += IXF_MR)
            ixb16_tile_emu(IXF_MR, qp + m * dI2, dI2, k0, D + m * IXF_NC);
        for (; m + 2 <= M; m += 2) ixb16_tile_emu(2, qp + m * dI2, dI2, k0, D + m * IXF_NC);
        for (; m < M; m++) ixb16_tile_emu(1, qp + m * dI2, dI2, k0, D + m * IXF_NC);
    }
}

/* x rounded to bfloat16 bits, a subnormal to a zero of its sign. */
static inline uint16_t ixb16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
    float y;
    memcpy(&y, &u, 4);
    return pl__bf16_bits(y);
}

/* Rounds n rows x [n, dI] to bf16 pairs xp [n, dI2] (zero padded). */
void PL_ISA_FN(pl__ix_bf16_rows)(const float *x, int64_t n, int64_t dI, uint32_t *xp) {
    const int64_t dI2 = (dI + 1) / 2;
    for (int64_t r = 0; r < n; r++)
        for (int64_t p = 0; p < dI2; p++) {
            const uint32_t lo = ixb16_bits(x[r * dI + 2 * p]);
            const uint32_t hi = 2 * p + 1 < dI ? ixb16_bits(x[r * dI + 2 * p + 1]) : 0u;
            xp[r * dI2 + p] = lo | hi << 16;
        }
}

/* Packs n bf16 key rows kp [n, dI2] into panels of 16 keys x dI2 pairs
 * (pair p of key s at kb[(s/16)*16*dI2 + p*16 + s%16]; n rounded up to
 * PL__KT_PAD, zero padded). */
void PL_ISA_FN(pl__ix_pack_bf16)(const uint32_t *kp, int64_t n, int64_t dI2, uint32_t *kb) {
    const int64_t np = (n + PL__KT_PAD - 1) / PL__KT_PAD * PL__KT_PAD;
    for (int64_t p = 0; p < np; p += PL__KT)
        for (int64_t i = 0; i < dI2; i++)
            for (int l = 0; l < PL__KT; l++)
                kb[p * dI2 + i * PL__KT + l] = p + l < n ? kp[(p + l) * dI2 + i] : 0u;
}

/* The bf16 scores of R consecutive query rows (qp [R*HI, dI2]) over keys
 * [0, n) of the panels kb into out (as ix_rows_f32). */
void PL_ISA_FN(ix_rows_bf16)(const uint32_t *qp, const float *w, int64_t R, int64_t HI, int64_t dI2,
                             const uint32_t *kb, int64_t n, int hw, float *out, int64_t ldo,
                             float *D) {
    for (int64_t s0 = 0; s0 < n; s0 += IXF_NC) {
        ixb16_chunk(qp, R * HI, dI2, kb, s0, hw, D);
        ix_epilogue(D, w, R, HI, out + s0, ldo);
    }
}

/* ---- decoding: scores over the cache's indexer keys ----
 * The cache keeps kI transposed in blocks of PL__KT positions: component i of
 * key s at kt[(s / PL__KT) * PL__KT * dI + i * PL__KT + s % PL__KT] (ops/kv_cache.c).
 * 2*PL_VW keys at a time, four heads at a time: each dot is a chain of
 * (fused, pl_vfma) multiply-adds over i = 0..dI-1 in eight independent
 * accumulators, with no horizontal sums (the order of an sgemm's inner product,
 * so the scores match pl_indexer_topk's); heads are then added in order as in
 * pl__ix_row_scores. */
static PL_AI const float *kt_at(const float *kt, int64_t dI, int64_t s) {
    return kt + (s / PL__KT) * PL__KT * dI + s % PL__KT;
}

static PL_AI void kt_heads(int G, const float *q, const float *w, const float *p0, const float *p1,
                           int64_t dI, bool first, pl_vf *o0, pl_vf *o1) {
    pl_vf a[4][2];
    for (int g = 0; g < G; g++) a[g][0] = a[g][1] = pl_splat(0.0f);
    for (int64_t i = 0; i < dI; i++) {
        const pl_vf k0 = PL_LD(p0 + i * PL__KT), k1 = PL_LD(p1 + i * PL__KT);
        for (int g = 0; g < G; g++) {
            const pl_vf qg = pl_splat(q[g * dI + i]);
            a[g][0] = pl_vfma(qg, k0, a[g][0]);
            a[g][1] = pl_vfma(qg, k1, a[g][1]);
        }
    }
    for (int g = 0; g < G; g++) {
        const pl_vf wg = pl_splat(w[g]);
        if (first && g == 0) {
            *o0 = wg * pl_vrelu(a[0][0]);
            *o1 = wg * pl_vrelu(a[0][1]);
        } else {
            *o0 += wg * pl_vrelu(a[g][0]);
            *o1 += wg * pl_vrelu(a[g][1]);
        }
    }
}

void PL_ISA_FN(pl__ix_scores_kt)(float *out, const float *q, const float *w, const float *kt,
                                 int64_t HI, int64_t dI, int64_t n) {
    for (int64_t s0 = 0; s0 < n; s0 += 2 * PL_VW) {
        const float *p0 = kt_at(kt, dI, s0), *p1 = kt_at(kt, dI, s0 + PL_VW);
        pl_vf o0 = pl_splat(0.0f), o1 = o0;
        for (int64_t h = 0; h < HI; h += 4) {
            const float *qh = q + h * dI, *wh = w + h;
            switch (HI - h < 4 ? HI - h : 4) {
            case 1: kt_heads(1, qh, wh, p0, p1, dI, h == 0, &o0, &o1); break;
            case 2: kt_heads(2, qh, wh, p0, p1, dI, h == 0, &o0, &o1); break;
            case 3: kt_heads(3, qh, wh, p0, p1, dI, h == 0, &o0, &o1); break;
            default: kt_heads(4, qh, wh, p0, p1, dI, h == 0, &o0, &o1); break;
            }
        }
        if (s0 + 2 * PL_VW <= n) {
            PL_ST(out + s0, o0);
            PL_ST(out + s0 + PL_VW, o1);
        } else {
            float tmp[2 * PL_VW];
            PL_ST(tmp, o0);
            PL_ST(tmp + PL_VW, o1);
            memcpy(out + s0, tmp, sizeof(float) * (size_t)(n - s0));
        }
    }
}

/* ---- decoding at PL_INDEXER_INT8 ----
 * The cache keeps each indexer key's int8 image k8 (pl__ix_quant_rows, lim 63,
 * as pl_indexer_topk quantises kI) offset by +64 into [1, 127], in blocks of
 * PL__KT positions: 4 components of 16 keys per 64 bytes (component i of key s
 * at k8t[(s / 16) * 16 * dI4 + (i / 4) * 64 + (s % 16) * 4 + i % 4], dI4 = dI
 * rounded up to 4, padding 64 = the value 0). The dots are exact integers,
 * sum_i (k8 + 64) q8 - 64 sum_i q8, so the scores are pl_indexer_topk's int8
 * scores bit for bit. With AVX512-VNNI one vpdpbusd takes 16 keys x 4
 * components; otherwise the same integers by plain multiplies. */
static void kt8_dots_plain(const int8_t *q8, const int32_t *qoff, const uint8_t *blk, int64_t HI,
                           int64_t dI4, int32_t *dots) {
    for (int64_t h = 0; h < HI; h++)
        for (int l = 0; l < PL__KT; l++) {
            int32_t acc = 0;
            for (int64_t g = 0; g < dI4 / 4; g++)
                for (int j = 0; j < 4; j++)
                    acc += (int32_t)blk[g * 64 + l * 4 + j] * (int32_t)q8[h * dI4 + 4 * g + j];
            dots[h * PL__KT + l] = acc - qoff[h];
        }
}

#if PL_VW == 16
__attribute__((target("avx512vnni"))) static void kt8_dots_vnni(const int8_t *q8,
                                                                const int32_t *qoff,
                                                                const uint8_t *blk, int64_t HI,
                                                                int64_t dI4, int32_t *dots) {
    for (int64_t h = 0; h < HI; h++) {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0;
        const int8_t *qh = q8 + h * dI4;
        int64_t g = 0;
        for (; g + 2 <= dI4 / 4; g += 2) { /* two chains */
            int32_t w0, w1;
            memcpy(&w0, qh + 4 * g, 4);
            memcpy(&w1, qh + 4 * g + 4, 4);
            a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(blk + g * 64), _mm512_set1_epi32(w0));
            a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(blk + g * 64 + 64),
                                     _mm512_set1_epi32(w1));
        }
        if (g < dI4 / 4) {
            int32_t w0;
            memcpy(&w0, qh + 4 * g, 4);
            a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(blk + g * 64), _mm512_set1_epi32(w0));
        }
        const __m512i d = _mm512_sub_epi32(_mm512_add_epi32(a0, a1), _mm512_set1_epi32(qoff[h]));
        _mm512_storeu_si512(dots + h * PL__KT, d);
    }
}
#endif

/* out[s] = sk[s] * sum_j wsq[j] max(dot_j(s), 0) for s < n (wsq[j] = w[j] sq[j];
 * the order of ix_row_scores_i8). dots: scratch of HI*PL__KT int32. */
void PL_ISA_FN(pl__ix_scores_kt8)(float *out, const int8_t *q8, const int32_t *qoff,
                                  const float *wsq, const float *sk, const uint8_t *k8t, int64_t HI,
                                  int64_t dI4, int64_t n, int vnni, int32_t *dots) {
    for (int64_t s0 = 0; s0 < n; s0 += PL__KT) {
        const uint8_t *blk = k8t + (s0 / PL__KT) * PL__KT * dI4;
#if PL_VW == 16
        if (vnni)
            kt8_dots_vnni(q8, qoff, blk, HI, dI4, dots);
        else
#endif
            kt8_dots_plain(q8, qoff, blk, HI, dI4, dots);
        float o[PL__KT];
        for (int v = 0; v < PL__KT / PL_VW; v++) { /* PL_VW keys at a time */
            pl_vi d;
            memcpy(&d, dots + v * PL_VW, sizeof d);
            pl_vf acc = pl_splat(wsq[0]) * __builtin_convertvector(d & (d > 0), pl_vf);
            for (int64_t j = 1; j < HI; j++) {
                memcpy(&d, dots + j * PL__KT + v * PL_VW, sizeof d);
                acc += pl_splat(wsq[j]) * __builtin_convertvector(d & (d > 0), pl_vf);
            }
            PL_ST(o + v * PL_VW, acc);
        }
        const int64_t m = n - s0 < PL__KT ? n - s0 : PL__KT;
        for (int64_t l = 0; l < m; l++) out[s0 + l] = o[l] * sk[s0 + l];
    }
}

#else /* ---- the ops (built once) ---- */

pl_status pl_set_indexer_precision(pl_ctx *ctx, pl_indexer_precision p) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_set_indexer_precision: ctx is NULL");
    if (p != PL_INDEXER_F32 && p != PL_INDEXER_BF16 && p != PL_INDEXER_INT8)
        return pl__err(PL_ERR_ARG,
                       "pl_set_indexer_precision: unknown precision %d (PL_INDEXER_F32, "
                       "PL_INDEXER_BF16 or PL_INDEXER_INT8)",
                       (int)p);
    ctx->indexer_precision = p;
    return PL_OK;
}

pl_indexer_precision pl_get_indexer_precision(const pl_ctx *ctx) {
    return ctx ? ctx->indexer_precision : PL_INDEXER_F32;
}

static int64_t block_rows(int64_t L, int64_t HI) {
    int64_t T =
        pl__tuning.indexer_block_rows > 0 ? pl__tuning.indexer_block_rows : (1 << 20) / (HI * L);
    if (T < 1) T = 1;
    return T < L ? T : L;
}

/* qI [B,L,HI,dI] (or [B,L,HI*dI]), kI [B,L,dI], w [B,L,HI]. */
static pl_status ix_shapes(pl_ctx *ctx, const char *fn, const pl_tensor *qI, const pl_tensor *kI,
                           const pl_tensor *w, ix_dims *d) {
    pl_status st;
    if ((st = pl__check(ctx, fn, "qI", qI, PL_F32)) ||
        (st = pl__check(ctx, fn, "kI", kI, PL_F32)) || (st = pl__check(ctx, fn, "w", w, PL_F32)))
        return st;
    char sq[96], sk[96], sw[96];
    bool ok = kI->ndim == 3 && w->ndim == 3 && (qI->ndim == 3 || qI->ndim == 4);
    if (ok) {
        d->B = kI->shape[0];
        d->L = kI->shape[1];
        d->dI = kI->shape[2];
        d->HI = w->shape[2];
        ok = w->shape[0] == d->B && w->shape[1] == d->L && qI->shape[0] == d->B &&
             qI->shape[1] == d->L &&
             (qI->ndim == 4 ? qI->shape[2] == d->HI && qI->shape[3] == d->dI
                            : qI->shape[2] == d->HI * d->dI);
    }
    if (!ok)
        return pl__err(PL_ERR_SHAPE,
                       "%s: want qI [B, L, HI, dI] (or [B, L, HI*dI]), kI [B, L, dI], w [B, L, "
                       "HI]; got qI %s, kI %s, w %s",
                       fn, pl_shape_str(qI, sq, sizeof sq), pl_shape_str(kI, sk, sizeof sk),
                       pl_shape_str(w, sw, sizeof sw));
    if (d->L > INT32_MAX) return pl__err(PL_ERR_SHAPE, "%s: L exceeds int32", fn);
    d->T = block_rows(d->L, d->HI);
    d->isa = pl__isa();
    return PL_OK;
}

/* Keys padded to the panels' multiple. */
static int64_t ix_lpad(int64_t L) { return (L + PL__KT_PAD - 1) / PL__KT_PAD * PL__KT_PAD; }

/* kI [B, L, dI] packed into the f32 panels of ix_rows_f32, batch b at
 * kt + b*ix_lpad(L)*dI. */
static float *ix_pack_keys(pl_ctx *ctx, const ix_dims *d, const float *k) {
    const int64_t Lp = ix_lpad(d->L), dI = d->dI, np = Lp / PL__KT_PAD;
    float *kt = pl__scratch(ctx, sizeof(float) * (size_t)(d->B * Lp * dI));
    if (!kt) return NULL;
    PL_PARALLEL_FOR(d->B * Lp * dI, schedule(static), c, d->B * np, {
        const int64_t b = c / np, p0 = (c % np) * PL__KT_PAD;
        const int64_t n = d->L - p0 < PL__KT_PAD ? d->L - p0 : PL__KT_PAD;
        PL_ISA_PICK(pl__ix_pack_f32, d->isa)
        (k + (b * d->L + p0) * dI, n, dI, kt + (b * Lp + p0) * dI);
    });
    return kt;
}

/* Dots of block [t0, t1) of batch b into D [(t1-t0)*HI, t1] from the packed
 * keys kt (ix_pack_keys): the products ix_topk and pl_indexer_scores compare,
 * bit for bit (the same kernel). */
enum { IX_DOTS_M = 48 }; /* query heads per task */
static pl_status ix_block_dots(pl_ctx *ctx, const ix_dims *d, const float *q, const float *kt,
                               int64_t b, int64_t t0, int64_t t1, float *D) {
    (void)ctx;
    const int64_t HI = d->HI, dI = d->dI, L = d->L, M = (t1 - t0) * HI;
    const float *qb = q + (b * L + t0) * HI * dI, *ktb = kt + b * ix_lpad(L) * dI;
    PL_PARALLEL_FOR(M * t1 * dI, schedule(static), c, (M + IX_DOTS_M - 1) / IX_DOTS_M, {
        const int64_t m0 = c * IX_DOTS_M, m = M - m0 < IX_DOTS_M ? M - m0 : IX_DOTS_M;
        float T[IX_DOTS_M * 32]; /* IX_DOTS_M x 2 PL_VW */
        PL_ISA_PICK(ix_dots_f32, d->isa)(qb + m0 * dI, m, dI, ktb, t1, D + m0 * t1, t1, T);
    });
    return PL_OK;
}

/* The packed operands for the call's precision (ctx->indexer_precision). */
static pl_status ix_prepare(pl_ctx *ctx, const ix_dims *d, const float *q, const float *k,
                            ix_prep *p) {
    memset(p, 0, sizeof *p);
    p->prec = ctx->indexer_precision;
    const int64_t B = d->B, L = d->L, HI = d->HI, dI = d->dI, Lp = ix_lpad(L), np = Lp / PL__KT_PAD;
    const int64_t nq = B * L * HI, nk = B * L, chunk = 256, isa = d->isa;
    if (p->prec == PL_INDEXER_INT8) {
        const int64_t dI4 = (dI + 3) & ~(int64_t)3;
        int8_t *q8 = pl__scratch(ctx, (size_t)(nq * dI)), *k8 = pl__scratch(ctx, (size_t)(nk * dI));
        p->q8 = pl__scratch(ctx, (size_t)(nq * dI4));
        p->qoff = pl__scratch(ctx, sizeof(int32_t) * (size_t)nq);
        p->sq = pl__scratch(ctx, sizeof(float) * (size_t)nq);
        p->sk = pl__scratch(ctx, sizeof(float) * (size_t)(B * Lp));
        p->k8t = pl__scratch(ctx, (size_t)(B * Lp * dI4));
        if (!q8 || !k8 || !p->q8 || !p->qoff || !p->sq || !p->sk || !p->k8t) return PL_ERR_NOMEM;
        p->dIp = dI4;
        p->hw = pl__cpu_vnni() && !pl__tuning.indexer_no_ext;
        int8_t *q8p = p->q8;
        int32_t *qoff = p->qoff;
        float *sq = p->sq, *sk = p->sk;
        PL_PARALLEL_FOR(nq * dI, schedule(static), c, (nq + chunk - 1) / chunk, {
            const int64_t r0 = c * chunk, n = nq - r0 < chunk ? nq - r0 : chunk;
            PL_ISA_PICK(pl__ix_quant_rows, isa)(q + r0 * dI, n, dI, 127.0f, q8 + r0 * dI, sq + r0);
            for (int64_t r = r0; r < r0 + n; r++) { /* rows padded to dI4, and qoff */
                int32_t sum = 0;
                for (int64_t i = 0; i < dI4; i++) {
                    const int8_t v = i < dI ? q8[r * dI + i] : 0;
                    q8p[r * dI4 + i] = v;
                    sum += v;
                }
                qoff[r] = 64 * sum;
            }
        });
        PL_PARALLEL_FOR(nk * dI, schedule(static), c, B * np, {
            const int64_t b = c / np, p0 = (c % np) * PL__KT_PAD;
            const int64_t n = L - p0 < PL__KT_PAD ? (L - p0 > 0 ? L - p0 : 0) : PL__KT_PAD;
            float *skb = sk + b * Lp + p0;
            for (int64_t i = 0; i < PL__KT_PAD; i++) skb[i] = 0.0f;
            if (n > 0) PL_ISA_PICK(pl__ix_quant_rows, isa)
            (k + (b * L + p0) * dI, n, dI, 63.0f, k8 + (b * L + p0) * dI, skb);
            PL_ISA_PICK(pl__ix_pack_i8, isa)
            (k8 + (b * L + p0) * dI, n, dI, p->k8t + (b * Lp + p0) * dI4);
        });
        return PL_OK;
    }
    if (p->prec == PL_INDEXER_BF16) {
        const int64_t dI2 = (dI + 1) / 2;
        uint32_t *kp = pl__scratch(ctx, sizeof(uint32_t) * (size_t)(nk * dI2));
        p->qp = pl__scratch(ctx, sizeof(uint32_t) * (size_t)(nq * dI2));
        p->kb = pl__scratch(ctx, sizeof(uint32_t) * (size_t)(B * Lp * dI2));
        if (!kp || !p->qp || !p->kb) return PL_ERR_NOMEM;
        p->dIp = dI2;
        p->hw = pl__cpu_bf16() && !pl__tuning.indexer_no_ext;
        uint32_t *qp = p->qp, *kb = p->kb;
        PL_PARALLEL_FOR(nq * dI, schedule(static), c, (nq + chunk - 1) / chunk, {
            const int64_t r0 = c * chunk, n = nq - r0 < chunk ? nq - r0 : chunk;
            PL_ISA_PICK(pl__ix_bf16_rows, isa)(q + r0 * dI, n, dI, qp + r0 * dI2);
        });
        PL_PARALLEL_FOR(nk * dI, schedule(static), c, B * np, {
            const int64_t b = c / np, p0 = (c % np) * PL__KT_PAD;
            const int64_t n = L - p0 < PL__KT_PAD ? L - p0 : PL__KT_PAD;
            PL_ISA_PICK(pl__ix_bf16_rows, isa)
            (k + (b * L + p0) * dI, n, dI, kp + (b * L + p0) * dI2);
            PL_ISA_PICK(pl__ix_pack_bf16, isa)
            (kp + (b * L + p0) * dI2, n, dI2, kb + (b * Lp + p0) * dI2);
        });
        return PL_OK;
    }
    p->prec = PL_INDEXER_F32;
    p->dIp = dI;
    p->kt = ix_pack_keys(ctx, d, k);
    return p->kt ? PL_OK : PL_ERR_NOMEM;
}

/* The fused scores: query rows per task, enough heads for one register tile
 * of the kernels (12 query heads). */
static int64_t ix_group_rows(int64_t HI) { return HI < 12 ? 12 / HI : 1; }

/* Per-thread room of the fused scores: R rows of Lp scores and the L1 tile. */
typedef struct {
    float *rows, *tile;
    int64_t R, Lp, ld_tile;
} ix_rowbuf;

static pl_status ix_rowbuf_new(pl_ctx *ctx, const ix_dims *d, ix_rowbuf *rb) {
    const size_t nt = (size_t)omp_get_max_threads();
    rb->R = ix_group_rows(d->HI);
    rb->Lp = ix_lpad(d->L);
    rb->ld_tile = rb->R * d->HI * 32; /* R*HI query heads x 32 keys (f32 or int32) */
    rb->rows = pl__scratch(ctx, sizeof(float) * (size_t)(rb->R * rb->Lp) * nt);
    rb->tile = pl__scratch(ctx, sizeof(float) * (size_t)rb->ld_tile * nt);
    return rb->rows && rb->tile ? PL_OK : PL_ERR_NOMEM;
}

/* Scores of the r rows [t, t+r) of batch b over keys [0, t+r) in the call's
 * precision into the thread's rows (row i at rows + i*Lp). Returns the rows. */
static float *ix_group(const ix_dims *d, const ix_rowbuf *rb, const ix_prep *p, const float *q,
                       const float *w, int64_t b, int64_t t, int64_t r) {
    const size_t tid = (size_t)omp_get_thread_num();
    const int64_t L = d->L, HI = d->HI, dI = d->dI, Lp = rb->Lp, dIp = p->dIp,
                  m0 = (b * L + t) * HI;
    float *rows = rb->rows + tid * (size_t)(rb->R * Lp),
          *tile = rb->tile + tid * (size_t)rb->ld_tile;
    if (p->prec == PL_INDEXER_INT8) PL_ISA_PICK(ix_rows_i8, d->isa)
    (p->q8 + m0 * dIp, p->qoff + m0, p->sq + m0, w + m0, r, HI, dIp, p->k8t + b * Lp * dIp,
     p->sk + b * Lp, t + r, p->hw, rows, Lp, (int32_t *)tile);
    else if (p->prec == PL_INDEXER_BF16) PL_ISA_PICK(ix_rows_bf16, d->isa)(
        p->qp + m0 * dIp, w + m0, r, HI, dIp, p->kb + b * Lp * dIp, t + r, p->hw, rows, Lp, tile);
    else PL_ISA_PICK(ix_rows_f32, d->isa)(q + m0 * dI, w + m0, r, HI, dI, p->kt + b * Lp * dI,
                                          t + r, rows, Lp, tile);
    return rows;
}

static void indexer_backward(pl_ctx *ctx, pl_node *n) {
    const ix_dims *d = n->saved;
    pl_tensor *qI = n->in[0], *kI = n->in[1], *w = n->in[2];
    const int64_t B = d->B, L = d->L, HI = d->HI, dI = d->dI, T = d->T;
    float *gi[3];
    if (pl__grads(ctx, n, gi)) return;
    float *dq = gi[0], *dk = gi[1], *dw = gi[2];
    float *D = pl__scratch(ctx, sizeof(float) * (size_t)(T * HI * L));
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w), *g = n->out->grad;
    const float *kt = D ? ix_pack_keys(ctx, d, k) : NULL;
    if (!kt) return;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L, M = (t1 - t0) * HI;
            if (ix_block_dots(ctx, d, q, kt, b, t0, t1, D)) return;
            PL_PARALLEL_FOR(M * t1, schedule(static), i, t1 - t0, {
                const int64_t t = t0 + i;
                PL_ISA_PICK(ix_row_backward, d->isa)
                (D + i * HI * t1, t1, g + (b * L + t) * L, wd + (b * L + t) * HI, HI, t + 1,
                 dw ? dw + (b * L + t) * HI : NULL);
            });
            if (dq && pl__sgemm(ctx, false, false, M, dI, t1, 1.0f, D, t1, k + b * L * dI, dI, 1.0f,
                                dq + (b * L + t0) * HI * dI, dI))
                return;
            if (dk && pl__sgemm(ctx, true, false, t1, dI, M, 1.0f, D, t1,
                                q + (b * L + t0) * HI * dI, dI, 1.0f, dk + b * L * dI, dI))
                return;
        }
}

pl_tensor *pl_indexer_scores(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w) {
    static const char *fn = "pl_indexer_scores";
    ix_dims d;
    if (ix_shapes(ctx, fn, qI, kI, w, &d)) return NULL;
    const int64_t B = d.B, L = d.L, HI = d.HI;
    pl_tensor *out = pl__new(ctx, PL_F32, PL_DIMS(B, L, L));
    if (!out) return NULL;
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w);
    float *o = pl_f32(out);
    ix_prep pp;
    ix_rowbuf rb;
    if (ix_prepare(ctx, &d, q, k, &pp) || ix_rowbuf_new(ctx, &d, &rb)) return NULL;
    const int64_t R = rb.R, G = (L + R - 1) / R;
    PL_PARALLEL_FOR(B * L * L * HI * d.dI / 2, schedule(dynamic, 1), c, B * G, {
        const int64_t b = c / G, t = (G - 1 - c % G) * R, r = L - t < R ? L - t : R;
        const float *rows = ix_group(&d, &rb, &pp, q, wd, b, t, r);
        for (int64_t i = 0; i < r; i++) {
            float *row = o + (b * L + t + i) * L;
            memcpy(row, rows + i * rb.Lp, sizeof(float) * (size_t)(t + i + 1));
            for (int64_t s = t + i + 1; s < L; s++) row[s] = -INFINITY;
        }
    });
    pl_tensor *in[3] = {qI, kI, w};
    pl_node *nd;
    if (pl__record(ctx, "indexer_scores", indexer_backward, out, 3, in, sizeof d, &nd)) return NULL;
    if (nd) *(ix_dims *)nd->saved = d;
    return out;
}

static pl_status ixg_forward(pl_ctx *ctx, const ix_dims *d, int64_t K, const float *q,
                             const float *k, const float *w, const int32_t *idx, float *out);
static pl_tensor *ix_record_at(pl_ctx *ctx, pl_tensor *out, pl_tensor *qI, pl_tensor *kI,
                               pl_tensor *w, const ix_dims *d, int64_t K, const pl_tensor *idx);

/* pl_indexer_topk, and with sc the scores at the selected keys ([B,L,k]). */
static pl_tensor *ix_topk(pl_ctx *ctx, const char *fn, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                          int k, float *sc) {
    ix_dims d;
    if (ix_shapes(ctx, fn, qI, kI, w, &d)) return NULL;
    if (k < 1) return pl__err_null(PL_ERR_ARG, "%s: k = %d must be >= 1", fn, k);
    const int64_t B = d.B, L = d.L, HI = d.HI;
    pl_tensor *out = pl__new(ctx, PL_I32, PL_DIMS(B, L, k));
    if (!out) return NULL;
    int32_t *o = pl_i32(out);
    const float *q = pl_f32(qI), *kd = pl_f32(kI), *wd = pl_f32(w);
    /* The float32 scores of the selection are the ones to return; otherwise
     * they are computed at the selected keys afterwards. */
    float *rsc = ctx->indexer_precision == PL_INDEXER_F32 ? sc : NULL;
    /* Rows t < k take every s <= t: no scores needed (unless returned). */
    const int64_t tfirst = rsc ? 0 : (k < L ? k : L);
    PL_PARALLEL_FOR(B * tfirst * tfirst, schedule(static), r, B * tfirst, {
        int64_t b = r / tfirst, t = r % tfirst;
        pl__causal_topk_row(NULL, t + 1, k, o + (b * L + t) * k, k, NULL);
    });
    if (tfirst < L) {
        /* Groups of rows from tfirst, the longest first (dynamic schedule). */
        const int nt = omp_get_max_threads();
        uint32_t *keys = pl__scratch(ctx, sizeof(uint32_t) * 3 * (size_t)L * (size_t)nt);
        ix_prep pp;
        ix_rowbuf rb;
        if (!keys || ix_prepare(ctx, &d, q, kd, &pp) || ix_rowbuf_new(ctx, &d, &rb)) return NULL;
        const int64_t R = rb.R, G = (L - tfirst + R - 1) / R;
        PL_PARALLEL_FOR(B * (L - tfirst) * L * HI * d.dI / 2, schedule(dynamic, 1), c, B * G, {
            const int64_t b = c / G, t = tfirst + (G - 1 - c % G) * R, r = L - t < R ? L - t : R;
            const float *rows = ix_group(&d, &rb, &pp, q, wd, b, t, r);
            uint32_t *kb = keys + (size_t)omp_get_thread_num() * 3 * (size_t)L;
            for (int64_t i = 0; i < r; i++) {
                const float *row = rows + i * rb.Lp;
                int32_t *ot = o + (b * L + t + i) * k;
                pl__causal_topk_row(row, t + i + 1, k, ot, k, kb);
                if (rsc)
                    for (int64_t j = 0; j < k; j++)
                        rsc[(b * L + t + i) * k + j] = ot[j] >= 0 ? row[ot[j]] : -INFINITY;
            }
        });
    }
    if (sc && !rsc && ixg_forward(ctx, &d, k, q, kd, wd, o, sc)) return NULL;
    return out;
}

static pl_tensor *indexer_topk_impl(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                                    int k) {
    return ix_topk(ctx, "pl_indexer_topk", qI, kI, w, k, NULL);
}

pl_tensor *pl_indexer_topk(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w, int k) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = indexer_topk_impl(ctx, qI, kI, w, k);
    pl__prof_end(ctx, "indexer_topk", t0, false);
    return y;
}

pl_tensor *pl_indexer_topk_scores(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w, int k,
                                  pl_tensor **scores) {
    static const char *fn = "pl_indexer_topk_scores";
    if (!scores) return pl__err_null(PL_ERR_ARG, "%s: scores (the output pointer) is NULL", fn);
    *scores = NULL;
    ix_dims d;
    if (ix_shapes(ctx, fn, qI, kI, w, &d)) return NULL;
    if (k < 1) return pl__err_null(PL_ERR_ARG, "%s: k = %d must be >= 1", fn, k);
    pl_tensor *sc = pl__new(ctx, PL_F32, PL_DIMS(d.B, d.L, k));
    pl_tensor *idx = sc ? ix_topk(ctx, fn, qI, kI, w, k, pl_f32(sc)) : NULL;
    if (!idx || !ix_record_at(ctx, sc, qI, kI, w, &d, k, idx)) return NULL;
    *scores = sc;
    return idx;
}

/* ---- scores at given index sets ----
 * Forward two ways, chosen by density: with many selected keys per row
 * (K >= L/3) the blocked sgemm products of the dense path are computed and
 * only the selected entries read (bit-identical to pl_indexer_scores); with
 * few, each selected score is a gather of HI dot products of length dI.
 * Backward (both, and pl_indexer_topk_scores) is one pass over the rows that
 * recomputes the HI dots of each selected entry, PL_VW entries at a time, and
 * uses them while the keys are in L1 (ixg_bwd_row); dq and dw of a row belong
 * to its task, dk is summed per row range (range 0 into dk, the others into
 * one buffer each; the ranges depend on the shapes only, not on the threads)
 * and the buffers are added in order afterwards: no races, and the same bits
 * for any number of threads. */

typedef struct {
    ix_dims d;
    int64_t K;
    const int32_t *idx;
} ixs_saved;

static bool at_blocked(int64_t L, int64_t K) {
    if (pl__tuning.indexer_at_mode == 1) return false;
    if (pl__tuning.indexer_at_mode == 2) return true;
    return K * 3 >= L;
}

static pl_status ixb_forward(pl_ctx *ctx, const ix_dims *d, const float *q, const float *k,
                             const float *w, const int32_t *idx, int64_t K, float *out, float *D) {
    const int64_t B = d->B, L = d->L, HI = d->HI, T = d->T;
    const float *kt = ix_pack_keys(ctx, d, k);
    if (!kt) return PL_ERR_NOMEM;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L;
            pl_status st = ix_block_dots(ctx, d, q, kt, b, t0, t1, D);
            if (st) return st;
            PL_PARALLEL_FOR((t1 - t0) * K * HI, schedule(static), i, t1 - t0, {
                const int64_t t = t0 + i;
                PL_ISA_PICK(ixb_fwd_row, d->isa)
                (D + i * HI * t1, t1, w + (b * L + t) * HI, HI, idx + (b * L + t) * K, K,
                 out + (b * L + t) * K);
            });
        }
    return PL_OK;
}

/* Per-thread room for one chunk's dots and the dw sums (2 HI chunks of at
 * most 16 lanes, lib/simd.h), cache-line aligned. */
static int64_t ixg_room(const ix_dims *d) { return (2 * d->HI * 16 + 15) & ~(int64_t)15; }

static float *ixg_rowbuf(pl_ctx *ctx, const ix_dims *d) {
    return pl__scratch(ctx, sizeof(float) * (size_t)ixg_room(d) * (size_t)omp_get_max_threads());
}

static pl_status ixg_forward(pl_ctx *ctx, const ix_dims *d, int64_t K, const float *q,
                             const float *k, const float *w, const int32_t *idx, float *out) {
    const int64_t B = d->B, L = d->L, HI = d->HI, dI = d->dI;
    float *Xb = ixg_rowbuf(ctx, d);
    if (!Xb) return PL_ERR_NOMEM;
    PL_PARALLEL_FOR(B * L * K * HI * dI, schedule(static, 16), r, B * L, {
        float *X = Xb + (size_t)omp_get_thread_num() * (size_t)ixg_room(d);
        PL_ISA_PICK(ixg_fwd_row, d->isa)
        (q + r * HI * dI, k + (r / L) * L * dI, w + r * HI, idx + r * K, K, HI, dI, X, out + r * K);
    });
    return PL_OK;
}

/* Row ranges with their own dk buffer: a function of the shapes only (range
 * 0 adds into dk itself, ranges 1.. into buffers zeroed by their task). */
static int64_t dk_parts(const ix_dims *d) {
    const int64_t bytes = d->B * d->L * d->dI * (int64_t)sizeof(float);
    int64_t p = ((int64_t)64 << 20) / (bytes > 0 ? bytes : 1);
    p = p < 4 ? p : 4;
    p = p > 2 ? p : 2; /* at least two tasks, at the cost of a second buffer */
    p = p < d->B * d->L ? p : d->B * d->L;
    return p > 1 ? p : 1;
}

static void indexer_at_backward(pl_ctx *ctx, pl_node *n) {
    const ixs_saved *sv = n->saved;
    const ix_dims *d = &sv->d;
    pl_tensor *qI = n->in[0], *kI = n->in[1], *w = n->in[2];
    const int64_t B = d->B, L = d->L, HI = d->HI, dI = d->dI, K = sv->K, rows = B * L;
    float *gi[3];
    if (pl__grads(ctx, n, gi)) return;
    float *dq = gi[0], *dk = gi[1], *dw = gi[2];
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w), *g = n->out->grad;
    const int32_t *idx = sv->idx;
    const int64_t P = dk ? dk_parts(d) : 1, nk = B * L * dI;
    float *part = dk && P > 1 ? pl__scratch(ctx, sizeof(float) * (size_t)((P - 1) * nk)) : NULL;
    float *Xb = ixg_rowbuf(ctx, d);
    if ((dk && P > 1 && !part) || !Xb) return;
    /* Task p: rows [p*rows/P, (p+1)*rows/P), dk into dk (p = 0) or part p-1:
     * dk = (dk + rows of range 0) + part 0 + part 1 ..., the same order at
     * any number of threads. */
    PL_PARALLEL_FOR(rows * K * HI * dI, schedule(dynamic, 1), p, P, {
        const int64_t r0 = p * rows / P, r1 = (p + 1) * rows / P;
        float *dkp = !dk ? NULL : p == 0 ? dk : part + (p - 1) * nk;
        if (dkp && p > 0) memset(dkp, 0, sizeof(float) * (size_t)nk);
        float *X = Xb + (size_t)omp_get_thread_num() * (size_t)ixg_room(d);
        for (int64_t r = r0; r < r1; r++) {
            const float *kb = k + (r / L) * L * dI;
            PL_ISA_PICK(ixg_bwd_row, d->isa)
            (q + r * HI * dI, kb, wd + r * HI, idx + r * K, g + r * K, K, HI, dI, X,
             dq ? dq + r * HI * dI : NULL, dw ? dw + r * HI : NULL,
             dkp ? dkp + (r / L) * L * dI : NULL);
        }
    });
    if (!dk || P < 2) return;
    PL_PARALLEL_FOR(nk * P, schedule(static), i, nk, {
        float acc = dk[i];
        for (int64_t p = 0; p < P - 1; p++) acc += part[p * nk + i];
        dk[i] = acc;
    });
}

static pl_tensor *ix_record_at(pl_ctx *ctx, pl_tensor *out, pl_tensor *qI, pl_tensor *kI,
                               pl_tensor *w, const ix_dims *d, int64_t K, const pl_tensor *idx) {
    pl_tensor *in[3] = {qI, kI, w};
    pl_node *nd;
    if (pl__record(ctx, "indexer_scores_at", indexer_at_backward, out, 3, in, sizeof(ixs_saved),
                   &nd))
        return NULL;
    if (nd) {
        /* Backward reads idx: a copy the caller cannot change. */
        const int32_t *keep = pl__idx_copy(ctx, idx);
        if (!keep) return NULL;
        *(ixs_saved *)nd->saved = (ixs_saved){*d, K, keep};
    }
    return out;
}

static pl_tensor *indexer_scores_at_impl(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                                         pl_tensor *idx) {
    static const char *fn = "pl_indexer_scores_at";
    ix_dims d;
    if (ix_shapes(ctx, fn, qI, kI, w, &d)) return NULL;
    if (pl__check_causal_idx(ctx, fn, idx, d.B, d.L)) return NULL;
    const int64_t B = d.B, L = d.L, HI = d.HI, K = idx->shape[2];
    pl_tensor *out = pl__new(ctx, PL_F32, PL_DIMS(B, L, K));
    if (!out) return NULL;
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w);
    const int32_t *id = pl_i32(idx);
    float *o = pl_f32(out);
    if (at_blocked(L, K)) {
        float *D = pl__scratch(ctx, sizeof(float) * (size_t)(d.T * HI * L));
        if (!D || ixb_forward(ctx, &d, q, k, wd, id, K, o, D)) return NULL;
    } else if (ixg_forward(ctx, &d, K, q, k, wd, id, o)) {
        return NULL;
    }
    return ix_record_at(ctx, out, qI, kI, w, &d, K, idx);
}

pl_tensor *pl_indexer_scores_at(pl_ctx *ctx, pl_tensor *qI, pl_tensor *kI, pl_tensor *w,
                                pl_tensor *idx) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = indexer_scores_at_impl(ctx, qI, kI, w, idx);
    pl__prof_end(ctx, "indexer_scores_at", t0, false);
    return y;
}
#endif
