/* Sparse attention over per-query index sets (the PLASA attention step).
 *
 * For query t, head h, with S_t = { idx[b,t,j] : idx[b,t,j] >= 0 }:
 *   z_j = q_t . k_{s_j} / sqrt(D),  p = softmax_j(z),  out_t = sum_j p'_j v_{s_j}
 * with p'_j = p_j * keep_j / (1 - dropout_p) (keep_j = 1 when dropout_p = 0).
 * Only the selected keys and values are read: O(B*H*L*K*D) time.
 *
 * Kernels. The key set is shared by the heads and a row of k or v holds all
 * heads contiguously, so a selected row is gathered once for all heads (the
 * heads' loops run over a group of rows while its lines are in L1). Scores:
 * 8 selected rows at a time, 8 vectors of partial sums (D/8 FMAs each) are
 * added into one vector of scores by the transposing add tree of simd.h.
 * out += p v: chains of vector FMAs over the gathered rows, two accumulator
 * sets. Rows are prefetched a group or chunk ahead.
 *
 * Tiling. The cost is moving the gathered rows (1 KB of k and v per pair at
 * H*D = 128, reused by nothing else in the row), not arithmetic. So a task
 * takes TQ query rows and walks the keys in blocks of SK: a block's rows stay
 * in L2 while every row of the tile takes its entries from it (rows sorted by
 * key: top-k rows already are, others are sorted). Scores block by block, then
 * an exact softmax per row (the whole row's scores are kept, TQ*H*K floats of
 * scratch), then out block by block.
 *
 * Saved for backward: the probabilities P [B,L,K,H] (before dropout; an
 * entry's heads side by side) and, with dropout, the keep bits
 * [B,L,H,ceil(K/32)] words: B*L*K*H floats, the price of not recomputing the
 * scores in backward.
 *
 * Backward, with dO the output gradient and Delta_t = dO_t . out_t:
 *   dp_j = keep_j/(1-p) * dO_t . v_{s_j},   g_j = p_j (dp_j - Delta_t) / sqrt(D)
 *   dq_t += sum_j g_j k_{s_j},  dk_{s_j} += g_j q_t,  dv_{s_j} += p'_j dO_t
 * in one pass over the forward's tiles and key blocks: an entry's k and v rows
 * are read for dp and dq, and its dk and dv rows updated, while the block is in
 * cache. Two query rows may select one key, so the tiles are split into 4 fixed
 * groups of consecutive rows (bwd_groups): a group's tiles run in order on one
 * thread and add into the group's own dk, dv buffer (keys below the group's
 * last row; group 0 adds into the gradients), and the buffers are then added
 * in group order. No atomics, and the results do not depend on the number of
 * threads. */
#include "internal.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>

typedef struct {
    int64_t B, L, H, D, K, W; /* W: 32-bit keep words per (b,t,h) row */
    int64_t Kp, Kz;           /* K rounded up to 8; Kz = Kp + 16: a row's stride in scratch */
    int64_t TQ, SK;           /* query rows per tile, keys per block */
    float scale, keep_scale;
    uint32_t threshold; /* dropout: keep iff the random word >= threshold */
    uint64_t seed, offset;
    const float *q, *k, *v;
    const int32_t *idx;
    float *out;
    float *P;       /* [B,L,K,H] probabilities (before dropout); NULL when not recorded */
    uint32_t *keep; /* [B,L,H,W] keep bits; NULL without dropout */
    int isa;        /* the kernels' level (simd.h), the same for the backward */
    /* Recompute mode (P == NULL): the forward saves lse [B,L,H], each row's
     * log-sum-exp of the scaled scores; the backward recomputes the scores. */
    float *lse;
    /* The key-block walk (SB > 0, see sb_rows): keys per superblock; rinfo
     * [B*L]: a row's count of valid entries when they come first and ascending
     * (top-k rows), else -1; rcur [B*L]: each row's cursor in its idx row;
     * mrun, lrun [B,L,H]: the forward's running max and sum of exponentials;
     * dl [B,L,H]: the backward's dO . out. */
    int64_t SB;
    int32_t *rinfo, *rcur;
    float *mrun, *lrun, *dl;
    /* Recorded forward of the tile walk: uflag [B, tiles] = 1 where the tile
     * took the micro-GEMMs over its union (its backward takes them too and
     * recomputes p from lse, always saved then; P is not written for it). */
    uint8_t *uflag;
    int64_t qt0; /* decode (pl__sparse_attention_seqs): q, out and idx rows hold the queries
                    t >= qt0 of one sequence (row t - qt0); 0 otherwise */
} sa_args;

#ifdef PL_ISA /* used by the kernels only */
static inline bool keep_bit(const uint32_t *row, int64_t j) {
    return (row[j >> 5] >> (j & 31)) & 1u;
}
#endif

/* Per-thread working memory of a tile of TQ query rows: row r's entries
 * (keys sorted, padded with valid keys; their slots) at r*Kz, its scores and
 * weights for head h at (r*H + h)*Kz. */
typedef struct {
    int32_t *sel, *pos; /* TQ*Kz each */
    int64_t *n, *cur;   /* TQ each */
    int64_t *tmp;       /* K (sorting) */
    float *z, *w;       /* TQ*H*Kz each */
    float *delta;       /* TQ*H */
    float *zr;          /* H*Kz: recomputed scores of one row */
    /* The masked micro-GEMMs over the tile's union of keys (at most
     * union_max keys): the keys (sorted), each key's place in them (L
     * entries); transposed [key][row] arrays of the tile's rows (TQ16 columns,
     * union_max rows): the mask (how often a row selected the key), scores or
     * weights, score gradients; K, V rows of the union and dk or dv rows of
     * one head (union_max x D); Q^T and dO^T of one head (D x TQ16). */
    int32_t *uni, *uidx;
    float *mt, *pt, *gt, *ku, *vu, *du, *qt, *ot;
    float *dl; /* 2 x TQ16: Delta and lse of the tile's rows, one head */
} sa_work;

/* Keys of the union of one tile (sub-tiles of rows when more). */
static inline int64_t union_max(const sa_args *a) { return 2 * a->Kz; }
/* Tile rows rounded up to the widest vector (the transposed arrays' stride). */
static inline int64_t tq16(const sa_args *a) { return (a->TQ + 15) & ~(int64_t)15; }
#ifndef PL_ISA /* used by the op's part only */
static inline size_t work_bytes(const sa_args *a) {
    const size_t TQ = (size_t)a->TQ, H = (size_t)a->H, Kz = (size_t)a->Kz, D = (size_t)a->D;
    const size_t UM = (size_t)union_max(a), L = (size_t)a->L, T16 = (size_t)tq16(a);
    const size_t bytes =
        8 * (2 * TQ + (size_t)a->K) + 4 * (2 * TQ * Kz + 2 * TQ * H * Kz + TQ * H + H * Kz) +
        4 * (TQ * Kz + L + 3 * D * UM + 3 * T16 * UM + 2 * D * T16 + 2 * T16) + 128;
    return (bytes + 63) & ~(size_t)63;
}

static inline sa_work work_carve(const sa_args *a, unsigned char *base) {
    const int64_t TQ = a->TQ, H = a->H, Kz = a->Kz;
    sa_work w;
    w.n = (int64_t *)base;
    w.cur = w.n + TQ;
    w.tmp = w.cur + TQ;
    w.z = (float *)(w.tmp + a->K);
    w.w = w.z + TQ * H * Kz;
    w.delta = w.w + TQ * H * Kz;
    w.sel = (int32_t *)(w.delta + TQ * H);
    w.pos = w.sel + TQ * Kz;
    w.zr = (float *)(w.pos + TQ * Kz);
    const int64_t UM = union_max(a), T16 = tq16(a);
    w.uni = (int32_t *)(w.zr + a->H * Kz);
    w.uidx = w.uni + TQ * Kz;
    w.mt = (float *)(w.uidx + a->L);
    w.pt = w.mt + T16 * UM;
    w.gt = w.pt + T16 * UM;
    w.ku = w.gt + T16 * UM;
    w.vu = w.ku + a->D * UM;
    w.du = w.vu + a->D * UM;
    w.qt = w.du + a->D * UM;
    w.ot = w.qt + a->D * T16;
    w.dl = w.ot + a->D * T16;
    return w;
}
#endif

/* The kernels (per instruction-set level, see simd.h): the forward and the
 * row pass of the backward of query rows [t0, t1) of batch b, and the dk, dv
 * pass of keys [s0, s1). */
PL_ISA_DECLARE(void, sa_fwd_tile,
               (const sa_args *a, int64_t b, int64_t t0, int64_t t1, const sa_work *w));
PL_ISA_DECLARE(void, sa_bwd_tile,
               (const sa_args *a, const float *dO, float *dq, float *dkb, float *dvb, int64_t b,
                int64_t t0, int64_t t1, const sa_work *w));
/* The same by the key-block walk (SB > 0), for the rows [r0, r1) (whole tiles). */
PL_ISA_DECLARE(void, sa_fwd_sb,
               (const sa_args *a, int64_t b, int64_t r0, int64_t r1, const sa_work *w));
PL_ISA_DECLARE(void, sa_bwd_sb,
               (const sa_args *a, const float *dO, float *dq, float *dkb, float *dvb, int64_t b,
                int64_t r0, int64_t r1, const sa_work *w));

#ifdef PL_ISA /* ---- the kernels ---- */

/* out[i] = x . base[rows[i]*rs .. + PL_VW*ND) for i < n (n rounded up to PL_VW: rows
 * must be padded with valid row numbers; the extra outputs are junk). */
static PL_AI void dots(const float *x, const float *base, const int32_t *rows, int64_t rs,
                       int64_t n, int ND, float *out) {
    for (int64_t i = 0; i < n; i += PL_VW) {
        const float *r[PL_VW];
        for (int u = 0; u < PL_VW; u++) r[u] = base + rows[i + u] * rs;
        pl_vf acc[PL_VW];
        if (ND <= 4) { /* x stays in registers */
            pl_vf xv[4] = {pl_splat(0.0f), pl_splat(0.0f), pl_splat(0.0f), pl_splat(0.0f)};
            for (int c = 0; c < ND; c++) xv[c] = PL_LD(x + PL_VW * c);
            for (int u = 0; u < PL_VW; u++) {
                acc[u] = xv[0] * PL_LD(r[u]);
                for (int c = 1; c < ND; c++) acc[u] += xv[c] * PL_LD(r[u] + PL_VW * c);
            }
        } else {
            for (int u = 0; u < PL_VW; u++) {
                acc[u] = PL_LD(x) * PL_LD(r[u]);
                for (int c = 1; c < ND; c++)
                    acc[u] += PL_LD(x + PL_VW * c) * PL_LD(r[u] + PL_VW * c);
            }
        }
        PL_ST(out + i, pl_vhsum_t(acc));
    }
}

/* y[0 .. PL_VW*ND) += sum_{i<n} w[i] * base[rows[i]*rs ..]: two accumulator sets
 * (even and odd i) per group of up to 4 vectors, to cover the FMA latency. */
static PL_AI void axpys(float *y, const float *w, const float *base, const int32_t *rows,
                        int64_t rs, int64_t n, int ND) {
    for (int c0 = 0; c0 < ND; c0 += 4) {
        const int nc = ND - c0 < 4 ? ND - c0 : 4;
        pl_vf a0[4], a1[4];
        for (int c = 0; c < nc; c++) {
            a0[c] = PL_LD(y + PL_VW * (c0 + c));
            a1[c] = pl_splat(0.0f);
        }
        int64_t i = 0;
        for (; i + 2 <= n; i += 2) {
            const float *r0 = base + rows[i] * rs + PL_VW * c0,
                        *r1 = base + rows[i + 1] * rs + PL_VW * c0;
            const pl_vf w0 = pl_splat(w[i]), w1 = pl_splat(w[i + 1]);
            for (int c = 0; c < nc; c++) {
                a0[c] += w0 * PL_LD(r0 + PL_VW * c);
                a1[c] += w1 * PL_LD(r1 + PL_VW * c);
            }
        }
        if (i < n) {
            const float *r0 = base + rows[i] * rs + PL_VW * c0;
            const pl_vf w0 = pl_splat(w[i]);
            for (int c = 0; c < nc; c++) a0[c] += w0 * PL_LD(r0 + PL_VW * c);
        }
        for (int c = 0; c < nc; c++) PL_ST(y + PL_VW * (c0 + c), a0[c] + a1[c]);
    }
}

/* The same for any D (scalar; tests use odd D). */
static void dots_any(const float *x, const float *base, const int32_t *rows, int64_t rs, int64_t n,
                     int64_t D, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = pl__dot(x, base + rows[i] * rs, D);
}
static void axpys_any(float *y, const float *w, const float *base, const int32_t *rows, int64_t rs,
                      int64_t n, int64_t D) {
    for (int64_t i = 0; i < n; i++) pl__axpy(y, w[i], base + rows[i] * rs, D);
}
/* axpys for D = PL_VW*ND, axpys_any when ND = 0. */
static PL_AI void axpys_nd(float *y, const float *w, const float *base, const int32_t *rows,
                           int64_t rs, int64_t n, int ND, int64_t D) {
    if (ND)
        axpys(y, w, base, rows, rs, n, ND);
    else
        axpys_any(y, w, base, rows, rs, n, D);
}

/* Gathered rows are used in chunks of CH entries, all heads of a chunk before
 * the next one (a row's H*D floats are then fetched once, while the chunk
 * after next is prefetched). */
#define CH 16

static PL_AI void prefetch_rows(const float *base, const int32_t *rows, int64_t n, int64_t rs,
                                int64_t bytes) {
    for (int64_t i = 0; i < n; i++) {
        const char *r = (const char *)(base + rows[i] * rs);
        for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(r + o);
    }
}

/* z[h*ldz + i] = x[h*D ..] . base[rows[i]*rs + h*D ..] for every head, i < n
 * (n a multiple of PL_VW; rows padded). ND = D/PL_VW, or 0 for the scalar kernels. */
static PL_AI void dots_heads(const float *x, const float *base, const int32_t *rows, int64_t rs,
                             int64_t H, int64_t D, int64_t n, int ND, float *z, int64_t ldz) {
    for (int64_t i = 0; i < n; i += PL_VW) {
        if (i + 2 * PL_VW < n)
            prefetch_rows(base, rows + i + 2 * PL_VW,
                          n - i - 2 * PL_VW < PL_VW ? n - i - 2 * PL_VW : PL_VW, rs, 4 * H * D);
        for (int64_t h = 0; h < H; h++) {
            if (ND)
                dots(x + h * D, base + h * D, rows + i, rs, PL_VW, ND, z + h * ldz + i);
            else
                dots_any(x + h * D, base + h * D, rows + i, rs, PL_VW, D, z + h * ldz + i);
        }
    }
}

/* y[h*D ..] += sum_{i<n} w[h*ldw + i] base[rows[i]*rs + h*D ..] for every head. */
static PL_AI void axpys_heads(float *y, const float *w, int64_t ldw, const float *base,
                              const int32_t *rows, int64_t rs, int64_t H, int64_t D, int64_t n,
                              int ND) {
    for (int64_t i = 0; i < n; i += CH) {
        const int64_t c = n - i < CH ? n - i : CH;
        if (i + CH < n)
            prefetch_rows(base, rows + i + CH, n - i - CH < CH ? n - i - CH : CH, rs, 4 * H * D);
        for (int64_t h = 0; h < H; h++) {
            axpys_nd(y + h * D, w + h * ldw + i, base + h * D, rows + i, rs, c, ND, D);
        }
    }
}

static int cmp_i64(const void *x, const void *y) {
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

/* The valid entries of idx row (b, t) as (key, slot), sorted by key then slot
 * (top-k rows already are; others are sorted here); sel is padded with 16
 * copies of a valid key. Returns the count. */
static int64_t row_entries(const sa_args *a, int64_t b, int64_t t, int32_t *sel, int32_t *pos,
                           int64_t *tmp) {
    const int32_t *ir = a->idx + (b * a->L + t - a->qt0) * a->K;
    int64_t n = 0;
    bool sorted = true;
    for (int64_t j = 0; j < a->K; j++)
        if (ir[j] >= 0) {
            if (n > 0 && ir[j] < sel[n - 1]) sorted = false;
            sel[n] = ir[j];
            pos[n++] = (int32_t)j;
        }
    if (!sorted) {
        for (int64_t i = 0; i < n; i++) tmp[i] = ((int64_t)sel[i] << 32) | pos[i];
        qsort(tmp, (size_t)n, sizeof *tmp, cmp_i64);
        for (int64_t i = 0; i < n; i++) {
            sel[i] = (int32_t)(tmp[i] >> 32);
            pos[i] = (int32_t)(tmp[i] & 0xffffffff);
        }
    }
    for (int64_t i = n; i < n + 16; i++) sel[i] = n ? sel[0] : 0;
    return n;
}

/* Entries of tile row r with keys < s1, from its cursor on: [*c0, return). */
static inline int64_t block_end(const sa_work *w, int64_t Kz, int64_t r, int64_t s1, int64_t *c0) {
    const int32_t *sel = w->sel + r * Kz;
    int64_t c = *c0 = w->cur[r];
    while (c < w->n[r] && sel[c] < s1) c++;
    w->cur[r] = c;
    return c;
}

/* The walk of a tile's rows [t0, t1) by blocks of SK keys, so that a block's k and v rows
 * serve every query row of the tile together: block by block, each row t that can see the
 * block (t >= its first key) and selected keys in it, as *t with its entries c0 .. c0 + c - 1.
 * Start with *s1 = the first key (the end of the block before the first) and *t = t1 - 1;
 * the walk ends at key se (no entry of the rows is >= se). */
static inline bool next_block(const sa_args *a, const sa_work *w, int64_t t0, int64_t t1,
                              int64_t se, int64_t *s1, int64_t *t, int64_t *c0, int64_t *c) {
    const int64_t e = t1 < se ? t1 : se;
    for (;;) {
        if (++*t == t1) { /* on to the next block [s0, s1) */
            const int64_t s0 = *s1;
            if (s0 >= e) return false;
            *s1 = s0 + a->SK < e ? s0 + a->SK : e;
            *t = t0 > s0 ? t0 : s0;
        }
        *c = block_end(w, a->Kz, *t - t0, *s1, c0) - *c0;
        if (*c) return true;
    }
}

/* Dropout keep bits of row (b, t): element (b,h,t,j) uses word j%4 of
 * Philox(seed, offset + ((b*H+h)*L+t)*ceil(K/4) + j/4), kept iff >= threshold
 * (pl_attention's scheme with K in place of L). */
static void row_keep(const sa_args *a, int64_t b, int64_t t, int64_t n, const int32_t *pos) {
    const int64_t H = a->H, L = a->L, K = a->K, W = a->W, row0 = (b * L + t) * H;
    memset(a->keep + row0 * W, 0, sizeof(uint32_t) * (size_t)(H * W));
    for (int64_t h = 0; h < H; h++) {
        uint32_t *kr = a->keep + (row0 + h) * W, wd[4];
        const uint64_t base = a->offset + (uint64_t)(((b * H + h) * L + t) * ((K + 3) / 4));
        int64_t blk = -1; /* top-k rows: slots ascending, one Philox call per 4 */
        for (int64_t i = 0; i < n; i++) {
            const int64_t j = pos[i];
            if (j >> 2 != blk) {
                blk = j >> 2;
                pl_philox(a->seed, base + (uint64_t)blk, wd);
            }
            if (wd[j & 3] >= a->threshold) kr[j >> 5] |= 1u << (j & 31);
        }
    }
}

/* ---- masked micro-GEMMs over a tile's union of keys ----
 * Where the rows of a tile select largely the same keys, the tile's union U of
 * keys is processed densely: per head, S^T = K_U Q^T (keys x rows), a softmax
 * per column over the keys the row selected (the mask M: how often it selected
 * each), out = P V_U; backward dP^T = V_U dO^T, G = P (dP - Delta) / sqrt(D),
 * dq += G K_U, dk_U = G^T Q, dv_U = P^T dO. Arrays are [key][row], so the
 * softmax runs with the rows in the vector lanes. A row's results do not
 * depend on the other rows: its scores are the same dot products (over d in
 * order), its max, sum and out sums run over the union in key order, and a
 * key it did not select adds an exact zero. */

/* The sorted union of the selected keys of tile rows [r0, r1) into w->uni and
 * each key's place in it into w->uidx; returns its size. The keys are marked,
 * then the marked range is scanned in order (no sort). */
static int64_t tile_union(const sa_args *a, int64_t r0, int64_t r1, const sa_work *w) {
    const int64_t Kz = a->Kz;
    int64_t lo = INT64_MAX, hi = -1, nu = 0;
    for (int64_t r = r0; r < r1; r++)
        if (w->n[r]) { /* entries sorted by key */
            const int32_t *sel = w->sel + r * Kz;
            lo = sel[0] < lo ? sel[0] : lo;
            hi = sel[w->n[r] - 1] > hi ? sel[w->n[r] - 1] : hi;
        }
    if (hi < 0) return 0;
    for (int64_t s = lo; s <= hi; s++) w->uidx[s] = -1;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < w->n[r]; i++) w->uidx[w->sel[r * Kz + i]] = 0;
    for (int64_t s = lo; s <= hi; s++)
        if (w->uidx[s] == 0) {
            w->uidx[s] = (int32_t)nu;
            w->uni[nu++] = (int32_t)s;
        }
    return nu;
}

/* A tile takes the micro-GEMMs when its entries fill at least UNION_DENSITY of
 * rows x union of keys (measured, see docs/benchmarks.md "Sparse attention:
 * gather or micro-GEMMs") and it has at least UNION_MIN_ROWS rows (fewer rows
 * amortise the union's K and V rows on too few queries). Not with dropout
 * (its keep bits are per entry). */
#define UNION_DENSITY 0.4
#define UNION_MIN_ROWS 8

/* Whether the forward's tile of rows [t0, t0 + nr) takes the micro-GEMMs: by
 * the density of the tile before it (rows [t0 - TQ, t0); row t0 alone for the
 * first tile). Only rows <= t0 decide, so no row's output depends on a later
 * row (PLASA is causal bit for bit; the two paths round differently). uidx
 * serves as marks. */
static bool window_dense(const sa_args *a, int64_t b, int64_t t0, int64_t nr, const sa_work *w) {
    const int64_t K = a->K;
    int64_t tw = t0 - a->TQ > a->qt0 ? t0 - a->TQ : a->qt0, te = t0;
    if (tw == te) te++; /* the first tile */
    int64_t lo = INT64_MAX, hi = -1, entries = 0, nu = 0;
    const int32_t *ir = a->idx + (b * a->L + tw - a->qt0) * K;
    for (int64_t j = 0; j < (te - tw) * K; j++)
        if (ir[j] >= 0) {
            lo = ir[j] < lo ? ir[j] : lo;
            hi = ir[j] > hi ? ir[j] : hi;
            entries++;
        }
    if (hi < 0) return false;
    memset(w->uidx + lo, 0, sizeof(int32_t) * (size_t)(hi - lo + 1));
    for (int64_t j = 0; j < (te - tw) * K; j++)
        if (ir[j] >= 0 && !w->uidx[ir[j]]) {
            w->uidx[ir[j]] = 1;
            nu++;
        }
    return nr >= UNION_MIN_ROWS && nu > 0 && (double)entries >= UNION_DENSITY * (te - tw) * nu;
}

/* The mask M^T [nu][nrp] of tile rows [r0, r0 + nr) (entries of row r0 + c in
 * column c); returns whether some row selected a key twice. */
static bool union_mask(const sa_args *a, int64_t r0, int64_t nr, int64_t nu, int64_t nrp,
                       const sa_work *w) {
    const int64_t Kz = a->Kz;
    bool dup = false;
    memset(w->mt, 0, sizeof(float) * (size_t)(nu * nrp));
    for (int64_t c = 0; c < nr; c++) {
        const int32_t *sel = w->sel + (r0 + c) * Kz;
        for (int64_t i = 0; i < w->n[r0 + c]; i++) {
            float *m = w->mt + (int64_t)w->uidx[sel[i]] * nrp + c;
            dup |= *m != 0.0f;
            *m += 1.0f;
        }
    }
    return dup;
}

/* The union's rows of head h of x (k or v of the batch) into dst [nu][D];
 * x^T of nr consecutive rows (q or dO from row x0, head h) into dst [D][nrp],
 * zero columns past nr. */
static PL_AI void union_rows(const float *x, int64_t HD, int64_t h, int64_t D, int64_t nu,
                             const int32_t *uni, float *dst, int ND) {
    for (int64_t u = 0; u < nu; u++) {
        const float *src = x + uni[u] * HD + h * D;
        for (int c = 0; c < ND; c++) PL_ST(dst + u * D + PL_VW * c, PL_LD(src + PL_VW * c));
    }
}
static void rows_t(const float *x0, int64_t HD, int64_t D, int64_t nr, int64_t nrp, float *dst) {
    for (int64_t d = 0; d < D; d++)
        for (int64_t c = 0; c < nrp; c++) dst[d * nrp + c] = c < nr ? x0[c * HD + d] : 0.0f;
}

/* Forward of tile rows [r0, r0 + nr) (rows t0 + r0 ...) over their union (nu
 * keys in w->uni, w->uidx). */
static PL_AI void union_fwd(const sa_args *a, int64_t b, int64_t t0, int64_t r0, int64_t nr,
                            int64_t nu, const sa_work *w, int ND) {
    const int64_t L = a->L, H = a->H, D = a->D, HD = H * D;
    const int64_t nrp = pl_rupw(nr), row = b * L + t0 + r0; /* first row */
    const float *q0 = a->q + (row - a->qt0) * HD;
    float *o0 = a->out + (row - a->qt0) * HD;
    const bool dup = union_mask(a, r0, nr, nu, nrp, w);
    const pl_vf zero = pl_splat(0.0f), ms = pl_splat(-INFINITY), sc = pl_splat(a->scale);
    for (int64_t h = 0; h < H; h++) {
        union_rows(a->k + b * L * HD, HD, h, D, nu, w->uni, w->ku, ND);
        rows_t(q0 + h * D, HD, D, nr, nrp, w->qt);
        pl_gemm(nu, nrp, D, w->ku, D, 1, w->qt, nrp, w->pt, nrp, false); /* S^T */
        for (int64_t c = 0; c < nrp; c += PL_VW) { /* softmax per column (row of the tile) */
            pl_vf m = ms, sum = zero;
            for (int64_t u = 0; u < nu; u++) {
                const pl_vf sv = PL_LD(w->pt + u * nrp + c);
                m = PL_SEL((PL_LD(w->mt + u * nrp + c) > zero) & (sv > m), sv, m);
            }
            const pl_vf mss = m * sc;
            for (int64_t u = 0; u < nu; u++) { /* E = M e^(S/sqrt(D) - max) */
                const pl_vf mk = PL_LD(w->mt + u * nrp + c);
                const pl_vf e =
                    PL_SEL(mk > zero, pl_vexp(PL_LD(w->pt + u * nrp + c) * sc - mss), zero);
                sum += dup ? e * mk : e;
                if (dup)
                    PL_ST(w->pt + u * nrp + c, e * mk); /* a key selected twice weighs twice */
                else
                    PL_ST(w->pt + u * nrp + c, e);
            }
            PL_ST(w->dl + c, PL_SEL(sum > zero, pl_splat(1.0f) / sum, zero));
            for (int64_t i = 0; i < PL_VW && c + i < nr; i++)
                if (a->lse && sum[i] > 0.0f) a->lse[(row + c + i) * H + h] = mss[i] + logf(sum[i]);
        }
        union_rows(a->v + b * L * HD, HD, h, D, nu, w->uni, w->vu, ND);
        pl_gemm(nr, D, nu, w->pt, 1, nrp, w->vu, D, o0 + h * D, HD, false); /* out = E V_U */
        for (int64_t c = 0; c < nr; c++) {                                  /* / sum */
            const pl_vf inv = pl_splat(w->dl[c]);
            for (int x = 0; x < ND; x++)
                PL_ST(o0 + c * HD + h * D + PL_VW * x,
                      PL_LD(o0 + c * HD + h * D + PL_VW * x) * inv);
        }
    }
}

/* Backward of tile rows [r0, r0 + nr) over their union (w->uni, w->uidx),
 * p recomputed from lse; Delta of tile row r, head h in w->delta[r*H + h]. */
static PL_AI void union_bwd(const sa_args *a, const float *dO, float *dq, float *dkb, float *dvb,
                            int64_t b, int64_t t0, int64_t r0, int64_t nr, int64_t nu,
                            const sa_work *w, int ND) {
    const int64_t L = a->L, H = a->H, D = a->D, HD = H * D;
    const int64_t nrp = pl_rupw(nr), row = b * L + t0 + r0;
    const float *q0 = a->q + row * HD, *dO0 = dO + row * HD;
    (void)union_mask(a, r0, nr, nu, nrp, w);
    const pl_vf zero = pl_splat(0.0f), sc = pl_splat(a->scale);
    float *dl = w->dl, *ls = w->dl + nrp; /* Delta and lse of the rows, one head */
    for (int64_t h = 0; h < H; h++) {
        for (int64_t c = 0; c < nrp; c++) {
            dl[c] = c < nr ? w->delta[(r0 + c) * H + h] : 0.0f;
            ls[c] = c < nr ? a->lse[(row + c) * H + h] : 0.0f;
        }
        union_rows(a->k + b * L * HD, HD, h, D, nu, w->uni, w->ku, ND);
        union_rows(a->v + b * L * HD, HD, h, D, nu, w->uni, w->vu, ND);
        rows_t(dO0 + h * D, HD, D, nr, nrp, w->ot);
        pl_gemm(nu, nrp, D, w->vu, D, 1, w->ot, nrp, w->gt, nrp, false); /* dP^T */
        /* P^T = M e^(S^T / sqrt(D) - lse) (a key selected twice weighs twice) */
        rows_t(q0 + h * D, HD, D, nr, nrp, w->qt);
        pl_gemm(nu, nrp, D, w->ku, D, 1, w->qt, nrp, w->pt, nrp, false);
        for (int64_t u = 0; u < nu; u++)
            for (int64_t c = 0; c < nrp; c += PL_VW) {
                const pl_vf mk = PL_LD(w->mt + u * nrp + c);
                const pl_vf e = pl_vexp(PL_LD(w->pt + u * nrp + c) * sc - PL_LD(ls + c));
                PL_ST(w->pt + u * nrp + c, PL_SEL(mk > zero, e * mk, zero));
            }
        for (int64_t u = 0; u < nu; u++) /* G^T = P^T (dP^T - Delta) / sqrt(D) */
            for (int64_t c = 0; c < nrp; c += PL_VW) {
                float *g = w->gt + u * nrp + c;
                PL_ST(g, PL_LD(w->pt + u * nrp + c) * (PL_LD(g) - PL_LD(dl + c)) * sc);
            }
        if (dq) pl_gemm(nr, D, nu, w->gt, 1, nrp, w->ku, D, dq + row * HD + h * D, HD, true);
        for (int x = 0; x < 2; x++) { /* dk_U = G^T Q, dv_U = P^T dO, into the key rows */
            float *dst = x ? dvb : dkb;
            if (!dst) continue;
            pl_gemm(nu, D, nr, x ? w->pt : w->gt, nrp, 1, (x ? dO0 : q0) + h * D, HD, w->du, D,
                    false);
            for (int64_t u = 0; u < nu; u++) {
                float *dr = dst + (int64_t)w->uni[u] * HD + h * D;
                for (int c = 0; c < ND; c++)
                    PL_ST(dr + PL_VW * c, PL_LD(dr + PL_VW * c) + PL_LD(w->du + u * D + PL_VW * c));
            }
        }
    }
}

/* Scores z of the tile's rows at their entries with keys in [s0, se), gathered
 * block by block, into w->z (row r, head h at (r*H + h)*Kz + entry). */
static PL_AI void scores_walk(const sa_args *a, int64_t b, int64_t t0, int64_t t1, int64_t s0,
                              int64_t se, const sa_work *w, int ND) {
    const int64_t L = a->L, H = a->H, D = a->D, HD = H * D, Kz = a->Kz;
    const float *kb = a->k + b * L * HD;
    for (int64_t s1 = s0, t = t1 - 1, c0 = 0, c = 0;
         next_block(a, w, t0, t1, se, &s1, &t, &c0, &c);) {
        const int64_t r = t - t0;
        dots_heads(a->q + (b * L + t - a->qt0) * HD, kb, w->sel + r * Kz + c0, HD, H, D, pl_rupw(c),
                   ND, w->z + r * H * Kz + c0, Kz);
    }
}

/* out += sum of the weights pw (laid out as w->z) times the gathered v rows,
 * entries with keys in [s0, se). */
static PL_AI void out_walk(const sa_args *a, int64_t b, int64_t t0, int64_t t1, int64_t s0,
                           int64_t se, const float *pw, const sa_work *w, int ND) {
    const int64_t L = a->L, H = a->H, D = a->D, HD = H * D, Kz = a->Kz;
    const float *vb = a->v + b * L * HD;
    for (int64_t s1 = s0, t = t1 - 1, c0 = 0, c = 0;
         next_block(a, w, t0, t1, se, &s1, &t, &c0, &c);) {
        const int64_t r = t - t0;
        axpys_heads(a->out + (b * L + t - a->qt0) * HD, pw + r * H * Kz + c0, Kz, vb,
                    w->sel + r * Kz + c0, HD, H, D, c, ND);
    }
}

/* Forward of the query rows [t0, t1) of batch b, all heads. The rows walk the
 * keys in blocks of SK (a block's k or v rows stay in L2 while every row of the
 * tile takes its entries from it): scores z = q.k/sqrt(D) block by block,
 * then p = softmax(z) per row and head (saved as P[b,t,j,h]), then out = sum
 * p' v block by block. Or, where the selections are dense enough, the same by
 * micro-GEMMs over the tile's union of keys. */
static PL_AI void fwd_tile_impl(const sa_args *a, int64_t b, int64_t t0, int64_t t1,
                                const sa_work *w, int ND) {
    const int64_t L = a->L, H = a->H, K = a->K, HD = H * a->D, Kz = a->Kz;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t - t0;
        int32_t *sel = w->sel + r * Kz, *pos = w->pos + r * Kz;
        const int64_t n = w->n[r] = row_entries(a, b, t, sel, pos, w->tmp);
        w->cur[r] = 0;
        memset(a->out + (b * L + t - a->qt0) * HD, 0, sizeof(float) * (size_t)HD);
        if (a->keep && n) row_keep(a, b, t, n, pos);
    }
    /* Per tile, by the measured density of the selections of the rows up to
     * t0 (window_dense): masked micro-GEMMs over the union of the tile's keys
     * (in sub-tiles of rows whose union fits), or a gather per query. */
    const int64_t nr = t1 - t0, mode = pl__tuning.sparse_gemm;
    const bool uni = ND && !a->keep && mode != 1 && (mode == 2 || window_dense(a, b, t0, nr, w));
    if (a->uflag) a->uflag[b * ((a->L + a->TQ - 1) / a->TQ) + t0 / a->TQ] = uni;
    if (uni) {
        for (int64_t r0 = 0, r1 = nr; r0 < nr; r0 = r1, r1 = nr) {
            int64_t nu;
            while ((nu = tile_union(a, r0, r1, w)) > union_max(a)) r1 = r0 + (r1 - r0) / 2;
            union_fwd(a, b, t0, r0, r1 - r0, nu, w, ND);
        }
        return;
    }
    scores_walk(a, b, t0, t1, 0, L, w, ND);
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t - t0, n = w->n[r], n8 = pl_rupw(n), row0 = (b * L + t) * H;
        const int32_t *pos = w->pos + r * Kz;
        w->cur[r] = 0;
        if (n == 0) continue; /* nothing selected: output 0, no gradient */
        for (int64_t h = 0; h < H; h++) {
            float *z = w->z + (r * H + h) * Kz;
            for (int64_t i = n; i < n8; i++) z[i] = -INFINITY; /* the padding: p = 0 */
            pl_vf mv = pl_splat(-INFINITY);
            for (int64_t i = 0; i < n8; i += PL_VW)
                mv = PL_SEL(PL_LD(z + i) > mv, PL_LD(z + i), mv);
            const float m = pl_vhmax(mv);
            const pl_vf ms = pl_splat(m * a->scale);
            pl_vf sum = pl_splat(0.0f);
            for (int64_t i = 0; i < n8; i += PL_VW) {
                const pl_vf e = pl_vexp(PL_LD(z + i) * a->scale - ms);
                sum += e;
                PL_ST(z + i, e);
            }
            const float tot = pl_vhsum(sum), inv = 1.0f / tot;
            if (a->lse) a->lse[row0 + h] = m * a->scale + logf(tot);
            for (int64_t i = 0; i < n8; i += PL_VW) PL_ST(z + i, PL_LD(z + i) * inv);
            if (a->keep) {
                const uint32_t *kr = a->keep + (row0 + h) * a->W;
                float *pw = w->w + (r * H + h) * Kz;
                for (int64_t i = 0; i < n; i++)
                    pw[i] = keep_bit(kr, pos[i]) ? z[i] * a->keep_scale : 0.0f;
            }
        }
        if (a->P) { /* P[b,t,j,h]: an entry's heads together, for the dk/dv pass */
            float *P = a->P + (b * L + t) * K * H;
            const float *zr = w->z + r * H * Kz;
            for (int64_t i = 0; i < n; i++)
                for (int64_t h = 0; h < H; h++) P[pos[i] * H + h] = zr[h * Kz + i];
        }
    }
    out_walk(a, b, t0, t1, 0, L, a->keep ? w->w : w->z, w, ND);
}

void PL_ISA_FN(sa_fwd_tile)(const sa_args *a, int64_t b, int64_t t0, int64_t t1, const sa_work *w) {
    if (a->D == 32)
        fwd_tile_impl(a, b, t0, t1, w, 32 / PL_VW);
    else if (a->D % PL_VW == 0)
        fwd_tile_impl(a, b, t0, t1, w, (int)(a->D / PL_VW));
    else
        fwd_tile_impl(a, b, t0, t1, w, 0);
}

/* ---- the key-block walk (SB > 0) ----
 * Where k and v (and their gradients) outgrow the cache, a per-tile walk would
 * fetch every selected row from DRAM once per tile. Instead a group of
 * consecutive rows (bwd_groups) walks the keys in superblocks of SB keys: for
 * each superblock, every tile of the group takes its rows' entries in it, so the
 * superblock's rows are fetched once and then served from L2/L3 to all the
 * group's queries; the query side (q, out, dq rows and a few numbers per row
 * and head) is what is streamed. The forward makes two such passes: running
 * max and sum of exponentials per row and head (then lse), then p = e^(z/sqrt(D)
 * - lse) and out += p' v. A row's entries must be sorted by key for its cursor
 * (top-k rows are: rinfo >= 0); another row is sorted again per superblock. */

/* The entries of the tile's rows [t0, t1) with keys in [S0, S1) into w->sel,
 * w->pos, w->n (cursors a->rcur advanced; w->cur reset). */
static void sb_rows(const sa_args *a, int64_t b, int64_t t0, int64_t t1, int64_t S0, int64_t S1,
                    const sa_work *w) {
    const int64_t L = a->L, K = a->K, Kz = a->Kz;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t - t0, row = b * L + t, nv = a->rinfo[row];
        int32_t *sel = w->sel + r * Kz, *pos = w->pos + r * Kz;
        int64_t n = 0;
        if (nv >= 0) { /* sorted: the next run of the row from its cursor */
            const int32_t *ir = a->idx + row * K;
            int64_t j = a->rcur[row];
            for (; j < nv && ir[j] < S1; j++, n++) {
                sel[n] = ir[j];
                pos[n] = (int32_t)j;
            }
            a->rcur[row] = (int32_t)j;
        } else { /* unsorted: sorted again, keys in [S0, S1) kept */
            const int64_t m = row_entries(a, b, t, sel, pos, w->tmp);
            for (int64_t i = 0; i < m; i++)
                if (sel[i] >= S0 && sel[i] < S1) {
                    sel[n] = sel[i];
                    pos[n++] = pos[i];
                }
        }
        for (int64_t i = n; i < n + 16; i++) sel[i] = n ? sel[0] : (int32_t)S0;
        w->n[r] = n;
        w->cur[r] = 0;
    }
}

static PL_AI void fwd_sb_impl(const sa_args *a, int64_t b, int64_t r0, int64_t r1, const sa_work *w,
                              int ND) {
    const int64_t L = a->L, H = a->H, K = a->K, HD = H * a->D, Kz = a->Kz, TQ = a->TQ;
    const float scale = a->scale;
    for (int64_t t = r0; t < r1; t++) {
        const int64_t row = b * L + t;
        a->rcur[row] = 0;
        for (int64_t h = 0; h < H; h++) {
            a->mrun[row * H + h] = -INFINITY;
            a->lrun[row * H + h] = 0.0f;
        }
        memset(a->out + row * HD, 0, sizeof(float) * (size_t)HD);
        if (a->keep) { /* the row's valid slots, ascending */
            const int32_t *ir = a->idx + row * K;
            int64_t n = 0;
            for (int64_t j = 0; j < K; j++)
                if (ir[j] >= 0) w->pos[n++] = (int32_t)j;
            if (n) row_keep(a, b, t, n, w->pos);
        }
    }
    for (int pass = 0; pass < 2; pass++) {
        for (int64_t S0 = 0; S0 < r1; S0 += a->SB) {
            const int64_t S1 = S0 + a->SB < L ? S0 + a->SB : L;
            for (int64_t t0 = r0; t0 < r1; t0 += TQ) {
                const int64_t t1 = t0 + TQ < r1 ? t0 + TQ : r1;
                if (t1 <= S0) continue; /* rows before the superblock */
                sb_rows(a, b, t0, t1, S0, S1, w);
                scores_walk(a, b, t0, t1, S0, S1, w, ND);
                for (int64_t t = t0; t < t1; t++) {
                    const int64_t r = t - t0, n = w->n[r], n8 = pl_rupw(n), row0 = (b * L + t) * H;
                    w->cur[r] = 0; /* out_walk walks the entries again */
                    if (n == 0) continue;
                    const int32_t *pos = w->pos + r * Kz;
                    for (int64_t h = 0; h < H; h++) {
                        float *z = w->z + (r * H + h) * Kz;
                        for (int64_t i = n; i < n8; i++) z[i] = -INFINITY; /* padding: e = 0 */
                        if (pass == 0) { /* m, l: running max and sum of e^((z - m) scale) */
                            pl_vf mv = pl_splat(-INFINITY);
                            for (int64_t i = 0; i < n8; i += PL_VW)
                                mv = PL_SEL(PL_LD(z + i) > mv, PL_LD(z + i), mv);
                            float *m = a->mrun + row0 + h, *l = a->lrun + row0 + h;
                            const float mc = pl_vhmax(mv);
                            if (mc > *m) {
                                *l *= pl__expf((*m - mc) * scale);
                                *m = mc;
                            }
                            const pl_vf ms = pl_splat(*m * scale);
                            pl_vf sum = pl_splat(0.0f);
                            for (int64_t i = 0; i < n8; i += PL_VW)
                                sum += pl_vexp(PL_LD(z + i) * scale - ms);
                            *l += pl_vhsum(sum);
                            continue;
                        }
                        const pl_vf lv = pl_splat(a->lse[row0 + h]);
                        for (int64_t i = 0; i < n8; i += PL_VW)
                            PL_ST(z + i, pl_vexp(PL_LD(z + i) * scale - lv));
                        if (a->keep) {
                            const uint32_t *kr = a->keep + (row0 + h) * a->W;
                            float *pw = w->w + (r * H + h) * Kz;
                            for (int64_t i = 0; i < n; i++)
                                pw[i] = keep_bit(kr, pos[i]) ? z[i] * a->keep_scale : 0.0f;
                        }
                    }
                    if (pass && a->P) {
                        float *P = a->P + (b * L + t) * K * H;
                        const float *zr = w->z + r * H * Kz;
                        for (int64_t i = 0; i < n; i++)
                            for (int64_t h = 0; h < H; h++) P[pos[i] * H + h] = zr[h * Kz + i];
                    }
                }
                if (pass) out_walk(a, b, t0, t1, S0, S1, a->keep ? w->w : w->z, w, ND);
            }
        }
        if (pass) break;
        for (int64_t t = r0; t < r1; t++) { /* lse = m scale + log l; cursors back to 0 */
            const int64_t row = b * L + t;
            a->rcur[row] = 0;
            for (int64_t h = 0; h < H; h++) {
                const float l = a->lrun[row * H + h];
                a->lse[row * H + h] = l > 0.0f ? a->mrun[row * H + h] * scale + logf(l) : 0.0f;
            }
        }
    }
}

void PL_ISA_FN(sa_fwd_sb)(const sa_args *a, int64_t b, int64_t r0, int64_t r1, const sa_work *w) {
    if (a->D == 32)
        fwd_sb_impl(a, b, r0, r1, w, 32 / PL_VW);
    else if (a->D % PL_VW == 0)
        fwd_sb_impl(a, b, r0, r1, w, (int)(a->D / PL_VW));
    else
        fwd_sb_impl(a, b, r0, r1, w, 0);
}

/* dk[s_i, h] += g[h*ldw + i] x[h] and dv[s_i, h] += p[h*ldw + i] y[h] for every
 * entry i < n and head h: the backward's scatter into the key rows the entries
 * selected (x = q_t, y = dO_t, one query row). In entry order, so a key
 * repeated in a row adds twice, in slot order. dk or dv may be NULL. */
static PL_AI void scatter_heads(float *dk, float *dv, const float *g, const float *p, int64_t ldw,
                                const float *x, const float *y, const int32_t *rows, int64_t HD,
                                int64_t H, int64_t D, int64_t n, int ND) {
    for (int64_t i = 0; i < n; i++) {
        if (i + CH < n) { /* the rows CH entries ahead, for writing */
            const int64_t o = (int64_t)rows[i + CH] * HD;
            for (int64_t b = 0; b < 4 * HD; b += 64) {
                if (dk) __builtin_prefetch((const char *)(dk + o) + b, 1);
                if (dv) __builtin_prefetch((const char *)(dv + o) + b, 1);
            }
        }
        float *rk = dk ? dk + (int64_t)rows[i] * HD : NULL,
              *rv = dv ? dv + (int64_t)rows[i] * HD : NULL;
        for (int64_t h = 0; h < H; h++) {
            const float gi = g[h * ldw + i], pi = p[h * ldw + i];
            if (ND) {
                const pl_vf gv = pl_splat(gi), pv = pl_splat(pi);
                for (int c = 0; c < ND; c++) {
                    const int64_t o = h * D + PL_VW * c;
                    if (rk) PL_ST(rk + o, PL_LD(rk + o) + gv * PL_LD(x + o));
                    if (rv) PL_ST(rv + o, PL_LD(rv + o) + pv * PL_LD(y + o));
                }
            } else {
                if (rk) pl__axpy(rk + h * D, gi, x + h * D, D);
                if (rv) pl__axpy(rv + h * D, pi, y + h * D, D);
            }
        }
    }
}

/* The row pass of the tile's entries with keys in [s0, se); delta: Delta of
 * tile row r, head h at [r*H + h]. */
static PL_AI void bwd_walk(const sa_args *a, const float *dO, float *dq, float *dkb, float *dvb,
                           int64_t b, int64_t t0, int64_t t1, int64_t s0, int64_t se,
                           const float *dlt, const sa_work *w, int ND) {
    const int64_t L = a->L, H = a->H, D = a->D, K = a->K, HD = H * D, Kz = a->Kz;
    const float *kb = a->k + b * L * HD, *vb = a->v + b * L * HD;
    const float scale = a->scale, ks = a->keep_scale;
    const bool recompute = a->P == NULL;
    for (int64_t s1 = s0, t = t1 - 1, c0 = 0, c = 0;
         next_block(a, w, t0, t1, se, &s1, &t, &c0, &c);) {
        const int64_t r = t - t0, row0 = (b * L + t) * H;
        const int32_t *sel = w->sel + r * Kz + c0, *pos = w->pos + r * Kz + c0;
        const float *P = recompute ? NULL : a->P + (b * L + t) * K * H;
        float *dp = w->z, *g = w->w, *z = w->zr;
        dots_heads(dO + row0 * D, vb, sel, HD, H, D, pl_rupw(c), ND, dp, Kz);
        if (recompute) /* p = e^(z scale - lse), z recomputed */
            dots_heads(a->q + row0 * D, kb, sel, HD, H, D, pl_rupw(c), ND, z, Kz);
        for (int64_t h = 0; h < H; h++) {
            float *dph = dp + h * Kz, *gh = g + h * Kz, *zh = z + h * Kz;
            const float delta = dlt[r * H + h];
            if (recompute) { /* zh becomes p */
                const pl_vf lv = pl_splat(a->lse[row0 + h]);
                for (int64_t i = 0; i < c; i += PL_VW)
                    PL_ST(zh + i, pl_vexp(PL_LD(zh + i) * scale - lv));
            } else {
                for (int64_t i = 0; i < c; i++) zh[i] = P[pos[i] * H + h];
            }
            if (a->keep) { /* dp and p scaled by keep_j / (1 - dropout_p) */
                const uint32_t *kr = a->keep + (row0 + h) * a->W;
                for (int64_t i = 0; i < c; i++) {
                    const bool kp = keep_bit(kr, pos[i]);
                    gh[i] = zh[i] * ((kp ? dph[i] * ks : 0.0f) - delta) * scale;
                    dph[i] = kp ? zh[i] * ks : 0.0f;
                }
            } else {
                for (int64_t i = 0; i < c; i++) {
                    gh[i] = zh[i] * (dph[i] - delta) * scale;
                    dph[i] = zh[i];
                }
            }
        }
        if (dq) axpys_heads(dq + row0 * D, g, Kz, kb, sel, HD, H, D, c, ND);
        if (dkb || dvb)
            scatter_heads(dkb, dvb, g, dp, Kz, a->q + row0 * D, dO + row0 * D, sel, HD, H, D, c,
                          ND);
    }
}

/* Backward of the query rows [t0, t1) of batch b in one pass, with
 * Delta_h = dO_h . out_h:
 *   dp_j = keep_j/(1-p) dO_h . v_{s_j},   g_j = p_j (dp_j - Delta_h) / sqrt(D)
 *   dq_h += sum_j g_j k_{s_j,h},  dk_{s_j,h} += g_j q_h,  dv_{s_j,h} += p'_j dO_h
 * walking the same key blocks as the forward (a block's k, v, dk and dv rows
 * stay in cache while the tile's rows use them). dkb, dvb: batch b's key rows
 * of the buffer this tile's group adds into (the caller orders the groups). */
static PL_AI void bwd_tile_impl(const sa_args *a, const float *dO, float *dq, float *dkb,
                                float *dvb, int64_t b, int64_t t0, int64_t t1, const sa_work *w,
                                int ND) {
    const int64_t L = a->L, H = a->H, D = a->D, Kz = a->Kz;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t - t0, row0 = (b * L + t) * H;
        w->n[r] = row_entries(a, b, t, w->sel + r * Kz, w->pos + r * Kz, w->tmp);
        w->cur[r] = 0;
        for (int64_t h = 0; h < H; h++)
            w->delta[r * H + h] = pl__dot(dO + (row0 + h) * D, a->out + (row0 + h) * D, D);
    }
    /* The micro-GEMMs where the forward took them (same sub-tiles). */
    const int64_t nr = t1 - t0;
    if (a->uflag && a->uflag[b * ((L + a->TQ - 1) / a->TQ) + t0 / a->TQ]) {
        for (int64_t r0 = 0, r1 = nr; r0 < nr; r0 = r1, r1 = nr) { /* the forward's sub-tiles */
            int64_t nu;
            while ((nu = tile_union(a, r0, r1, w)) > union_max(a)) r1 = r0 + (r1 - r0) / 2;
            union_bwd(a, dO, dq, dkb, dvb, b, t0, r0, r1 - r0, nu, w, ND);
        }
        return;
    }
    bwd_walk(a, dO, dq, dkb, dvb, b, t0, t1, 0, L, w->delta, w, ND);
}

void PL_ISA_FN(sa_bwd_tile)(const sa_args *a, const float *dO, float *dq, float *dkb, float *dvb,
                            int64_t b, int64_t t0, int64_t t1, const sa_work *w) {
    if (a->D == 32)
        bwd_tile_impl(a, dO, dq, dkb, dvb, b, t0, t1, w, 32 / PL_VW);
    else if (a->D % PL_VW == 0)
        bwd_tile_impl(a, dO, dq, dkb, dvb, b, t0, t1, w, (int)(a->D / PL_VW));
    else
        bwd_tile_impl(a, dO, dq, dkb, dvb, b, t0, t1, w, 0);
}

/* The backward of the rows [r0, r1) of batch b by the key-block walk (see
 * sb_rows): superblock by superblock, the row pass of each tile of the rows. */
static PL_AI void bwd_sb_impl(const sa_args *a, const float *dO, float *dq, float *dkb, float *dvb,
                              int64_t b, int64_t r0, int64_t r1, const sa_work *w, int ND) {
    const int64_t L = a->L, H = a->H, D = a->D, TQ = a->TQ;
    for (int64_t t = r0; t < r1; t++) {
        const int64_t row0 = (b * L + t) * H;
        a->rcur[b * L + t] = 0;
        for (int64_t h = 0; h < H; h++)
            a->dl[row0 + h] = pl__dot(dO + (row0 + h) * D, a->out + (row0 + h) * D, D);
    }
    for (int64_t S0 = 0; S0 < r1; S0 += a->SB) {
        const int64_t S1 = S0 + a->SB < L ? S0 + a->SB : L;
        for (int64_t t0 = r0; t0 < r1; t0 += TQ) {
            const int64_t t1 = t0 + TQ < r1 ? t0 + TQ : r1;
            if (t1 <= S0) continue;
            sb_rows(a, b, t0, t1, S0, S1, w);
            bwd_walk(a, dO, dq, dkb, dvb, b, t0, t1, S0, S1, a->dl + (b * L + t0) * H, w, ND);
        }
    }
}

void PL_ISA_FN(sa_bwd_sb)(const sa_args *a, const float *dO, float *dq, float *dkb, float *dvb,
                          int64_t b, int64_t r0, int64_t r1, const sa_work *w) {
    if (a->D == 32)
        bwd_sb_impl(a, dO, dq, dkb, dvb, b, r0, r1, w, 32 / PL_VW);
    else if (a->D % PL_VW == 0)
        bwd_sb_impl(a, dO, dq, dkb, dvb, b, r0, r1, w, (int)(a->D / PL_VW));
    else
        bwd_sb_impl(a, dO, dq, dkb, dvb, b, r0, r1, w, 0);
}

#else /* ---- the op (built once) ---- */

/* The backward's query groups: NG_BWD fixed groups of consecutive tiles of a
 * batch, of about equal work (sum of min(t + 1, K) over their rows). A group's
 * tiles run in order on one thread and add into the group's own dk, dv buffer
 * (group 0 into the gradients themselves); the others are then added in group
 * order. So every sum has one order whatever the number of threads, and no
 * two threads write one row. first[g]: the group's first tile; first[NG_BWD] = nq. */
#define NG_BWD 4
static void bwd_groups(int64_t L, int64_t K, int64_t TQ, int64_t first[NG_BWD + 1]) {
    const int64_t nq = (L + TQ - 1) / TQ;
    double total = 0.0;
    for (int64_t t = 0; t < L; t++) total += (double)(t + 1 < K ? t + 1 : K);
    double acc = 0.0;
    int g = 1;
    first[0] = 0;
    for (int64_t i = 0; i < nq && g < NG_BWD; i++) {
        while (g < NG_BWD && acc >= total * g / NG_BWD) first[g++] = i;
        for (int64_t t = i * TQ; t < (i + 1) * TQ && t < L; t++)
            acc += (double)(t + 1 < K ? t + 1 : K);
    }
    while (g < NG_BWD) first[g++] = nq;
    first[NG_BWD] = nq;
}

static void sparse_attention_backward(pl_ctx *ctx, pl_node *n) {
    sa_args args = *(const sa_args *)n->saved;
    const sa_args *a = &args;
    const float *dO = n->out->grad;
    const int64_t B = a->B, L = a->L, HD = a->H * a->D, TQ = a->TQ;
    float *g[3];
    if (pl__grads(ctx, n, g)) return;
    float *dq = g[0], *dk = g[1], *dv = g[2];
    const int nt = omp_get_max_threads();
    const size_t per = (work_bytes(a) + 63) & ~(size_t)63;
    /* The per-thread memory and the groups' dk, dv buffers are given back to
     * the arena when this backward is done. */
    const pl_mark mark = pl_mark_get(ctx);
    unsigned char *buf = pl__scratch(ctx, per * (size_t)nt);
    if (!buf) return;
    const int64_t nq = (L + TQ - 1) / TQ, work = B * L * a->K * HD;
    if (a->SB && (!(args.rcur = pl__scratch(ctx, sizeof(int32_t) * (size_t)(B * L))) ||
                  !(args.dl = pl__scratch(ctx, sizeof(float) * (size_t)(B * L * a->H))))) {
        pl_mark_release(ctx, mark);
        return;
    }
    if (!dk && !dv && !a->SB) { /* dq alone: every tile on its own */
        PL_PARALLEL_FOR(work, schedule(dynamic, 1), r, B * nq,
                        { /* largest tiles first */
                          sa_work w = work_carve(a, buf + per * (size_t)omp_get_thread_num());
                          const int64_t b = r / nq, t0 = (nq - 1 - r % nq) * TQ;
                          PL_ISA_PICK(sa_bwd_tile, a->isa)
                          (a, dO, dq, NULL, NULL, b, t0, t0 + TQ < L ? t0 + TQ : L, &w);
                        });
        pl_mark_release(ctx, mark);
        return;
    }
    int64_t first[NG_BWD + 1], end[NG_BWD];
    bwd_groups(L, a->K, TQ, first);
    /* Group g >= 1 adds into buffers of batch b's keys [0, end[g]): its rows' keys. */
    float *gk[NG_BWD] = {dk}, *gv[NG_BWD] = {dv};
    for (int gi = 0; gi < NG_BWD; gi++) {
        end[gi] = first[gi + 1] * TQ < L ? first[gi + 1] * TQ : L;
        if (gi == 0) continue;
        const size_t bytes = sizeof(float) * (size_t)(B * end[gi] * HD);
        if ((dk && !(gk[gi] = pl__scratch(ctx, bytes))) ||
            (dv && !(gv[gi] = pl__scratch(ctx, bytes)))) {
            pl_mark_release(ctx, mark);
            return;
        }
    }
    PL_PARALLEL_FOR(work, schedule(dynamic, 1), r, B * NG_BWD, {
        /* the groups of late rows (most keys) first */
        sa_work w = work_carve(a, buf + per * (size_t)omp_get_thread_num());
        const int64_t b = r / NG_BWD, gi = NG_BWD - 1 - r % NG_BWD, ld = gi ? end[gi] : L;
        float *dkb = gk[gi] ? gk[gi] + b * ld * HD : NULL,
              *dvb = gv[gi] ? gv[gi] + b * ld * HD : NULL;
        if (gi) { /* first touch by the thread that adds into it */
            if (dkb) memset(dkb, 0, sizeof(float) * (size_t)(end[gi] * HD));
            if (dvb) memset(dvb, 0, sizeof(float) * (size_t)(end[gi] * HD));
        }
        const int64_t r0 = first[gi] * TQ, r1 = first[gi + 1] * TQ < L ? first[gi + 1] * TQ : L;
        if (a->SB && r0 < r1) PL_ISA_PICK(sa_bwd_sb, a->isa)(a, dO, dq, dkb, dvb, b, r0, r1, &w);
        for (int64_t i = first[gi]; !a->SB && i < first[gi + 1]; i++)
            PL_ISA_PICK(sa_bwd_tile, a->isa)
        (a, dO, dq, dkb, dvb, b, i * TQ, (i + 1) * TQ < L ? (i + 1) * TQ : L, &w);
    });
    /* dk += the groups' buffers, group by group, per block of 256 keys. */
    const int64_t nb = (L + 255) / 256;
    PL_PARALLEL_FOR(B * L * HD * 2, schedule(static), r, B * nb, {
        const int64_t b = r / nb, s0 = (r % nb) * 256, s1 = s0 + 256 < L ? s0 + 256 : L;
        for (int x = 0; x < 2; x++) {
            float *dst = x ? dv : dk;
            if (!dst) continue;
            for (int gi = 1; gi < NG_BWD; gi++) {
                const int64_t e = s1 < end[gi] ? s1 : end[gi];
                const float *src = (x ? gv[gi] : gk[gi]) + b * end[gi] * HD;
                for (int64_t j = s0 * HD; j < e * HD; j++) dst[b * L * HD + j] += src[j];
            }
        }
    });
    pl_mark_release(ctx, mark);
}

pl_sparse_save pl_set_sparse_attention_save(pl_ctx *ctx, pl_sparse_save mode) {
    const pl_sparse_save old = (pl_sparse_save)ctx->sparse_save;
    if (mode != PL_SPARSE_SAVE_AUTO && mode != PL_SPARSE_SAVE_PROBS && mode != PL_SPARSE_SAVE_LSE)
        pl__err(PL_ERR_ARG, "pl_set_sparse_attention_save: unknown mode %d", (int)mode);
    else
        ctx->sparse_save = (int)mode;
    return old;
}

static int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

/* Keys per superblock of the key-block walk, 0 for the tile walk: the walk where
 * one batch's k and v (L*HD*8 bytes) exceed 16 MiB, half of this machine's L3
 * (then k, v, dk and dv outgrow it), superblocks of 2048 keys (k, v, dk, dv
 * rows of a superblock: 4 MiB at HD = 128). pl__tuning.sparse_sb: 1 never, 2
 * always (tests), with pl__tuning.sparse_sb_keys keys. */
static int64_t sa_superblock(int64_t L, int64_t HD, int64_t SK) {
    const int64_t mode = pl__tuning.sparse_sb;
    if (mode == 1 || (mode == 0 && L * HD * 8 <= ((int64_t)16 << 20))) return 0;
    int64_t sb = pl__tuning.sparse_sb_keys > 0 ? pl__tuning.sparse_sb_keys : 2048;
    return sb > SK ? sb : SK;
}

/* rinfo of every row: its count of valid entries when they come first and in
 * ascending key order, else -1. */
static void row_info(const sa_args *a) {
    const int64_t K = a->K;
    PL_PARALLEL_FOR(a->B * a->L * K, schedule(static), row, a->B * a->L, {
        const int32_t *ir = a->idx + row * K;
        int64_t n = 0;
        bool ok = true;
        for (int64_t j = 0; j < K; j++)
            if (ir[j] >= 0) {
                if (j != n || (n > 0 && ir[j] < ir[j - 1])) ok = false;
                n++;
            }
        a->rinfo[row] = ok ? (int32_t)n : -1;
    });
}

/* Tiles of the forward: query rows per tile and keys per block (see below). */
static void sa_tiles(int64_t H, int64_t D, int64_t K, int64_t *TQ, int64_t *SK) {
    *SK = pl__tuning.sparse_tile_k > 0 ? pl__tuning.sparse_tile_k
                                       : clamp64((1 << 15) / (H * D), 8, 1024);
    const int64_t Kz = ((K + 7) & ~(int64_t)7) + 16;
    *TQ = pl__tuning.sparse_tile_q > 0 ? pl__tuning.sparse_tile_q : clamp64((1 << 17) / Kz, 4, 64);
}

pl_status pl__sparse_attention_seqs(pl_ctx *ctx, const pl__sa_seq *seqs, int64_t n, int64_t H,
                                    int64_t D, int64_t K) {
    int64_t TQ, SK, tasks = 0, work = 0;
    sa_tiles(H, D, K, &TQ, &SK);
    sa_args *a = pl__scratch(ctx, sizeof(sa_args) * (size_t)(n > 0 ? n : 1));
    int64_t *first = pl__scratch(ctx, sizeof(int64_t) * (size_t)(n + 1)); /* first task of seq */
    if (!a || !first) return pl_last_status();
    for (int64_t i = 0; i < n; i++) {
        const pl__sa_seq *s = &seqs[i];
        a[i] = (sa_args){.B = 1,
                         .L = s->t1,
                         .H = H,
                         .D = D,
                         .K = K,
                         .W = (K + 31) / 32,
                         .Kp = (K + 7) & ~(int64_t)7,
                         .Kz = ((K + 7) & ~(int64_t)7) + 16,
                         .TQ = TQ,
                         .SK = SK,
                         .scale = 1.0f / sqrtf((float)D),
                         .keep_scale = 1.0f,
                         .q = s->q,
                         .k = s->k,
                         .v = s->v,
                         .idx = s->idx,
                         .out = s->out,
                         .isa = pl__isa(),
                         .qt0 = s->t0};
        first[i] = tasks;
        tasks += (s->t1 - s->t0 + TQ - 1) / TQ;
        work += (s->t1 - s->t0) * K * H * D;
    }
    first[n] = tasks;
    const int nt = omp_get_max_threads();
    const size_t per = (work_bytes(&a[0]) + 63) & ~(size_t)63;
    unsigned char *buf = n ? pl__scratch(ctx, per * (size_t)nt) : NULL;
    if (n && !buf) return pl_last_status();
    PL_PARALLEL_FOR(work, schedule(dynamic, 1), r, tasks, {
        sa_work w = work_carve(&a[0], buf + per * (size_t)omp_get_thread_num());
        int64_t i = 0;
        while (first[i + 1] <= r) i++;
        const int64_t t0 = seqs[i].t0 + (r - first[i]) * TQ, t1 = seqs[i].t1;
        PL_ISA_PICK(sa_fwd_tile, a[i].isa)(&a[i], 0, t0, t0 + TQ < t1 ? t0 + TQ : t1, &w);
    });
    return PL_OK;
}

static pl_tensor *sparse_attention_impl(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *v,
                                        pl_tensor *idx, float dropout_p, pl_rng *rng) {
    static const char *fn = "pl_sparse_attention";
    if (pl__check(ctx, fn, "q", q, PL_F32) || pl__check(ctx, fn, "k", k, PL_F32) ||
        pl__check(ctx, fn, "v", v, PL_F32))
        return NULL;
    char sq[96], sk[96], sv[96];
    if (q->ndim != 4 || !pl_same_shape(q, k) || !pl_same_shape(q, v))
        return pl__err_null(PL_ERR_SHAPE, "%s: q, k, v must all be [B, L, H, D]; got %s, %s, %s",
                            fn, pl_shape_str(q, sq, sizeof sq), pl_shape_str(k, sk, sizeof sk),
                            pl_shape_str(v, sv, sizeof sv));
    const int64_t B = q->shape[0], L = q->shape[1], H = q->shape[2], D = q->shape[3];
    if (pl__check_causal_idx(ctx, fn, idx, B, L)) return NULL;
    if (!(dropout_p >= 0.0f && dropout_p < 1.0f))
        return pl__err_null(PL_ERR_ARG, "%s: dropout_p = %g must be in [0, 1)", fn,
                            (double)dropout_p);
    if (dropout_p > 0.0f && !rng)
        return pl__err_null(PL_ERR_ARG, "%s: rng is NULL but dropout_p > 0", fn);
    const int64_t K = idx->shape[2];
    pl_tensor *out = pl__new(ctx, PL_F32, 4, q->shape);
    if (!out) return NULL;
    pl_tensor *in[3] = {q, k, v};
    const bool record = pl__wants_grad(ctx, 3, in);
    /* Tiles: a key block's k or v rows (SK*H*D*4 bytes) within ~128 KB of L2;
     * TQ query rows share each block (their scratch, ~TQ*K*(8 + 8H) bytes, within
     * ~5 MB). */
    int64_t TQ, SK;
    sa_tiles(H, D, K, &TQ, &SK);
    const int64_t Kz = ((K + 7) & ~(int64_t)7) + 16;
    sa_args a = {B,
                 L,
                 H,
                 D,
                 K,
                 (K + 31) / 32,
                 (K + 7) & ~(int64_t)7,
                 Kz,
                 TQ,
                 SK,
                 1.0f / sqrtf((float)D),
                 pl__drop_scale(dropout_p),
                 pl__drop_threshold(dropout_p),
                 rng ? rng->seed : 0,
                 rng ? rng->offset : 0,
                 pl_f32(q),
                 pl_f32(k),
                 pl_f32(v),
                 pl_i32(idx),
                 pl_f32(out),
                 NULL,
                 NULL,
                 pl__isa(),
                 NULL,
                 sa_superblock(L, H * D, SK),
                 NULL,
                 NULL,
                 NULL,
                 NULL,
                 NULL,
                 NULL,
                 0};
    const size_t pbytes = sizeof(float) * (size_t)(B * L * K * H);
    const bool lse_only =
        ctx->sparse_save == PL_SPARSE_SAVE_LSE ||
        (ctx->sparse_save == PL_SPARSE_SAVE_AUTO && pbytes > PL_SPARSE_SAVE_AUTO_BYTES);
    /* lse is saved in both modes: the tiles that take the micro-GEMMs (uflag,
     * tile walk) recompute p from it. */
    if (record && !(a.lse = pl__scratch(ctx, sizeof(float) * (size_t)(B * L * H)))) return NULL;
    if (record && !lse_only && !(a.P = pl__scratch(ctx, pbytes))) return NULL;
    if (record && !a.SB && !(a.uflag = pl__scratch(ctx, (size_t)(B * ((L + TQ - 1) / TQ)))))
        return NULL;
    /* Backward reads idx: keep a copy, checked above, that the caller cannot change. */
    if (record && !(a.idx = pl__idx_copy(ctx, idx))) return NULL;
    if (dropout_p > 0.0f &&
        !(a.keep = pl__scratch(ctx, sizeof(uint32_t) * (size_t)(B * L * H * a.W))))
        return NULL;
    const int nt = omp_get_max_threads();
    const size_t per = (work_bytes(&a) + 63) & ~(size_t)63;
    unsigned char *buf = pl__scratch(ctx, per * (size_t)nt);
    if (!buf) return NULL;
    const int64_t nq = (L + TQ - 1) / TQ;
    if (a.SB) { /* the key-block walk, by the backward's groups of rows */
        if (!(a.rinfo = pl__scratch(ctx, sizeof(int32_t) * (size_t)(B * L)))) return NULL;
        const pl_mark mk = pl_mark_get(ctx);
        const size_t rb = sizeof(float) * (size_t)(B * L * H);
        if (!(a.rcur = pl__scratch(ctx, sizeof(int32_t) * (size_t)(B * L))) ||
            !(a.mrun = pl__scratch(ctx, rb)) || !(a.lrun = pl__scratch(ctx, rb)) ||
            (!a.lse && !(a.lse = pl__scratch(ctx, rb))))
            return NULL;
        row_info(&a);
        int64_t first[NG_BWD + 1];
        bwd_groups(L, K, TQ, first);
        PL_PARALLEL_FOR(B * L * K * H * D, schedule(dynamic, 1), r, B * NG_BWD, {
            sa_work w = work_carve(&a, buf + per * (size_t)omp_get_thread_num());
            const int64_t b = r / NG_BWD, gi = NG_BWD - 1 - r % NG_BWD, r0 = first[gi] * TQ,
                          r1 = first[gi + 1] * TQ < L ? first[gi + 1] * TQ : L;
            if (r0 < r1) PL_ISA_PICK(sa_fwd_sb, a.isa)(&a, b, r0, r1, &w);
        });
        /* lse was only scratch unless recorded; the running sums are done */
        if (!record) a.lse = NULL;
        a.rcur = NULL;
        a.mrun = a.lrun = NULL;
        pl_mark_release(ctx, mk);
    } else
        /* Each task carves its thread's memory (see the backward). */
        PL_PARALLEL_FOR(B * L * K * H * D, schedule(dynamic, 1), r, B * nq, {
            sa_work w = work_carve(&a, buf + per * (size_t)omp_get_thread_num());
            const int64_t b = r / nq,
                          t0 = (nq - 1 - r % nq) * TQ; /* largest tiles (late t) first */
            PL_ISA_PICK(sa_fwd_tile, a.isa)(&a, b, t0, t0 + TQ < L ? t0 + TQ : L, &w);
        });
    if (dropout_p > 0.0f) rng->offset += (uint64_t)(B * H * L * ((K + 3) / 4));
    pl_node *nd;
    if (pl__record(ctx, "sparse_attention", sparse_attention_backward, out, 3, in, sizeof a, &nd))
        return NULL;
    if (nd) *(sa_args *)nd->saved = a;
    return out;
}

pl_tensor *pl_sparse_attention(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *v,
                               pl_tensor *idx, float dropout_p, pl_rng *rng) {
    double t0 = pl__prof_begin(ctx);
    pl_tensor *y = sparse_attention_impl(ctx, q, k, v, idx, dropout_p, rng);
    pl__prof_end(ctx, "sparse_attention", t0, false);
    return y;
}

#endif
