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
 * Blocking: query rows [t0, t1) of batch b form one product
 *   Dots[(t-t0)*HI + j, s] = qI[b,t,j,:] . kI[b,s,:],   s < t1
 * (oneDNN sgemm, M = (t1-t0)*HI, N = t1, K = dI; the causal triangle is only
 * wasted inside the diagonal block). A block holds at most ~2^20 floats, so the
 * extra memory is O(L * block) and never the [B,L,HI,L] tensor. Backward
 * recomputes each block's products instead of saving them:
 *   dw[t,j]   = sum_{s<=t} dI[t,s] ReLU(Dots[t,j,s])
 *   dDots     = dI[t,s] w[t,j] [Dots > 0]           (ReLU subgradient 0 at 0)
 *   dqI_block = dDots kI[0:t1],   dkI[0:t1] += dDots^T qI_block   (two sgemms)
 * The block partition depends only on (L, HI), so pl_indexer_topk sees exactly
 * the scores pl_indexer_scores returns (bit for bit).
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
 * bits on every path. The dot products (ixg_dots, the decode kernel, dq) use
 * explicit FMAs (pl_vfma) where the level has them, as an sgemm does, and
 * the gathered dots (ixg_chunk_dots) sum their PL_VW lanes by the one
 * transposing tree: there the paths differ in the last bits. Every path is tested against the references of
 * tests/test_indexer.c (tu_isa_tcases forces each level the CPU has). */
#include "internal.h"

#include <math.h>
#include <omp.h>

typedef struct {
    int64_t B, L, HI, dI, T; /* T: query rows per block */
    int isa;                 /* the kernels' level (simd.h), the same for the backward */
} ix_dims;

/* int8 images of qI and kI (PL_INDEXER_INT8): per row scale s, value = s * q8. */
typedef struct {
    int8_t *q8, *k8; /* [B*L*HI, dI], [B*L, dI] */
    float *sq, *sk;  /* [B*L*HI], [B*L] */
    int32_t *C;      /* one block of int32 products */
} ix_q8;

PL_ISA_DECLARE(void, ix_row_scores_i8,
               (float *out, const int32_t *C, int64_t ld, const float *w, const float *sq,
                const float *sk, int64_t HI, int64_t n));
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

/* int8: out[s] = sk[s] * sum_j (w[j] sq[j]) max(C[j*ld + s], 0) for s < n. */
void PL_ISA_FN(ix_row_scores_i8)(float *out, const int32_t *C, int64_t ld, const float *w,
                                 const float *sq, const float *sk, int64_t HI, int64_t n) {
    const float w0 = w[0] * sq[0];
    for (int64_t s = 0; s < n; s++) out[s] = w0 * (float)(C[s] > 0 ? C[s] : 0);
    for (int64_t j = 1; j < HI; j++) {
        const float wj = w[j] * sq[j];
        const int32_t *Cj = C + j * ld;
        for (int64_t s = 0; s < n; s++) out[s] += wj * (float)(Cj[s] > 0 ? Cj[s] : 0);
    }
    for (int64_t s = 0; s < n; s++) out[s] *= sk[s];
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
    if (p != PL_INDEXER_F32 && p != PL_INDEXER_INT8)
        return pl__err(PL_ERR_ARG,
                       "pl_set_indexer_precision: unknown precision %d (PL_INDEXER_F32 or "
                       "PL_INDEXER_INT8)",
                       (int)p);
    ctx->indexer_precision = p;
    return PL_OK;
}

pl_indexer_precision pl_get_indexer_precision(const pl_ctx *ctx) {
    return ctx ? ctx->indexer_precision : PL_INDEXER_F32;
}

/* The int8 images for a call, or all NULL for float32. */
static pl_status ix_quantise(pl_ctx *ctx, const ix_dims *d, const float *q, const float *k,
                             ix_q8 *z) {
    memset(z, 0, sizeof *z);
    if (ctx->indexer_precision != PL_INDEXER_INT8) return PL_OK;
    const int64_t nq = d->B * d->L * d->HI, nk = d->B * d->L, dI = d->dI;
    z->q8 = pl__scratch(ctx, (size_t)(nq * dI));
    z->k8 = pl__scratch(ctx, (size_t)(nk * dI));
    z->sq = pl__scratch(ctx, sizeof(float) * (size_t)nq);
    z->sk = pl__scratch(ctx, sizeof(float) * (size_t)nk);
    z->C = pl__scratch(ctx, sizeof(int32_t) * (size_t)(d->T * d->HI * d->L));
    if (!z->q8 || !z->k8 || !z->sq || !z->sk || !z->C) return PL_ERR_NOMEM;
    const int64_t chunk = 256;
    PL_PARALLEL_FOR(nq * dI, schedule(static), c, (nq + chunk - 1) / chunk, {
        const int64_t r0 = c * chunk, n = nq - r0 < chunk ? nq - r0 : chunk;
        PL_ISA_PICK(pl__ix_quant_rows, d->isa)
        (q + r0 * dI, n, dI, 127.0f, z->q8 + r0 * dI, z->sq + r0);
    });
    PL_PARALLEL_FOR(nk * dI, schedule(static), c, (nk + chunk - 1) / chunk, {
        const int64_t r0 = c * chunk, n = nk - r0 < chunk ? nk - r0 : chunk;
        PL_ISA_PICK(pl__ix_quant_rows, d->isa)
        (k + r0 * dI, n, dI, 63.0f, z->k8 + r0 * dI, z->sk + r0);
    });
    return PL_OK;
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

/* Dots of block [t0, t1) of batch b into D [(t1-t0)*HI, t1]. */
static pl_status ix_block_dots(pl_ctx *ctx, const ix_dims *d, const float *q, const float *k,
                               int64_t b, int64_t t0, int64_t t1, float *D) {
    const int64_t HI = d->HI, dI = d->dI, L = d->L;
    return pl__sgemm(ctx, false, true, (t1 - t0) * HI, t1, dI, 1.0f, q + (b * L + t0) * HI * dI, dI,
                     k + b * L * dI, dI, 0.0f, D, t1);
}

/* The same in the call's precision: float dots into D, or (int8) int32 dots
 * into z->C. */
static pl_status ix_block(pl_ctx *ctx, const ix_dims *d, const float *q, const float *k,
                          const ix_q8 *z, int64_t b, int64_t t0, int64_t t1, float *D) {
    if (!z->q8) return ix_block_dots(ctx, d, q, k, b, t0, t1, D);
    const int64_t HI = d->HI, dI = d->dI, L = d->L;
    return pl__gemm_s8((t1 - t0) * HI, t1, dI, z->q8 + (b * L + t0) * HI * dI, dI,
                       z->k8 + b * L * dI, dI, z->C, t1);
}

/* Row t (i-th of the block starting at t0) of the scores in the call's precision. */
static void ix_row(const ix_dims *d, const ix_q8 *z, const float *D, const float *w, int64_t b,
                   int64_t t0, int64_t t, int64_t t1, float *out) {
    const int64_t HI = d->HI, i = t - t0;
    if (z->q8) PL_ISA_PICK(ix_row_scores_i8, d->isa)
    (out, z->C + i * HI * t1, t1, w + (b * d->L + t) * HI, z->sq + (b * d->L + t) * HI,
     z->sk + b * d->L, HI, t + 1);
    else PL_ISA_PICK(pl__ix_row_scores, d->isa)(out, D + i * HI * t1, t1, w + (b * d->L + t) * HI,
                                                HI, t + 1);
}

static void indexer_backward(pl_ctx *ctx, pl_node *n) {
    const ix_dims *d = n->saved;
    pl_tensor *qI = n->in[0], *kI = n->in[1], *w = n->in[2];
    const int64_t B = d->B, L = d->L, HI = d->HI, dI = d->dI, T = d->T;
    float *gi[3];
    if (pl__grads(ctx, n, gi)) return;
    float *dq = gi[0], *dk = gi[1], *dw = gi[2];
    float *D = pl__scratch(ctx, sizeof(float) * (size_t)(T * HI * L));
    if (!D) return;
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w), *g = n->out->grad;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L, M = (t1 - t0) * HI;
            if (ix_block_dots(ctx, d, q, k, b, t0, t1, D)) return;
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
    const int64_t B = d.B, L = d.L, HI = d.HI, T = d.T;
    pl_tensor *out = pl__new(ctx, PL_F32, PL_DIMS(B, L, L));
    float *D = out ? pl__scratch(ctx, sizeof(float) * (size_t)(T * HI * L)) : NULL;
    if (!D) return NULL;
    const float *q = pl_f32(qI), *k = pl_f32(kI), *wd = pl_f32(w);
    ix_q8 z;
    if (ix_quantise(ctx, &d, q, k, &z)) return NULL;
    float *o = pl_f32(out);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L;
            if (ix_block(ctx, &d, q, k, &z, b, t0, t1, D)) return NULL;
            PL_PARALLEL_FOR((t1 - t0) * HI * t1, schedule(static), i, t1 - t0, {
                const int64_t t = t0 + i;
                float *row = o + (b * L + t) * L;
                ix_row(&d, &z, D, wd, b, t0, t, t1, row);
                for (int64_t s = t + 1; s < L; s++) row[s] = -INFINITY;
            });
        }
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
    const int64_t B = d.B, L = d.L, HI = d.HI, T = d.T;
    pl_tensor *out = pl__new(ctx, PL_I32, PL_DIMS(B, L, k));
    if (!out) return NULL;
    int32_t *o = pl_i32(out);
    const float *q = pl_f32(qI), *kd = pl_f32(kI), *wd = pl_f32(w);
    ix_q8 z;
    if (ix_quantise(ctx, &d, q, kd, &z)) return NULL;
    /* The float32 scores of the selection are the ones to return; otherwise
     * they are computed at the selected keys afterwards. */
    float *rsc = z.q8 ? NULL : sc;
    /* Rows t < k take every s <= t: no scores needed (unless returned). */
    const int64_t tfirst = rsc ? 0 : (k < L ? k : L);
    PL_PARALLEL_FOR(B * tfirst * tfirst, schedule(static), r, B * tfirst, {
        int64_t b = r / tfirst, t = r % tfirst;
        pl__causal_topk_row(NULL, t + 1, k, o + (b * L + t) * k, k, NULL);
    });
    if (tfirst < L) {
        const int nt = omp_get_max_threads();
        float *D = pl__scratch(ctx, sizeof(float) * (size_t)(T * HI * L));
        float *rowbuf = pl__scratch(ctx, sizeof(float) * (size_t)L * (size_t)nt);
        uint32_t *keys = pl__scratch(ctx, sizeof(uint32_t) * 3 * (size_t)L * (size_t)nt);
        if (!D || !rowbuf || !keys) return NULL;
        for (int64_t b = 0; b < B; b++)
            for (int64_t t0 = 0; t0 < L; t0 += T) {
                const int64_t t1 = t0 + T < L ? t0 + T : L;
                if (t1 <= tfirst) continue;
                if (ix_block(ctx, &d, q, kd, &z, b, t0, t1, D)) return NULL;
                const int64_t ts = t0 > tfirst ? t0 : tfirst;
                PL_PARALLEL((t1 - ts) * HI * t1, default(shared), {
                    const size_t tid = (size_t)omp_get_thread_num();
                    float *row = rowbuf + tid * (size_t)L;
                    uint32_t *kb = keys + tid * 3 * (size_t)L;
                    _Pragma("omp for schedule(static)") for (int64_t t = ts; t < t1; t++) {
                        int32_t *ot = o + (b * L + t) * k;
                        ix_row(&d, &z, D, wd, b, t0, t, t1, row);
                        pl__causal_topk_row(row, t + 1, k, ot, k, kb);
                        if (rsc)
                            for (int64_t j = 0; j < k; j++)
                                rsc[(b * L + t) * k + j] = ot[j] >= 0 ? row[ot[j]] : -INFINITY;
                    }
                });
            }
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
    for (int64_t b = 0; b < B; b++)
        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t t1 = t0 + T < L ? t0 + T : L;
            pl_status st = ix_block_dots(ctx, d, q, k, b, t0, t1, D);
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
