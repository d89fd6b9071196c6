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
 * added into one vector of 8 scores by a transposing add tree (hsum8).
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
 *   dq_t += sum_j g_j k_{s_j}                                (row pass)
 *   dk_s += sum_{(t,j): s_j = s} g_j q_t                    (key pass)
 *   dv_s += sum_{(t,j): s_j = s} p'_j dO_t
 * The row pass (the forward's tiles and blocks) stores g as G [B,L,K,H]
 * (backward scratch) and turns P into p'. dk and dv come from the index sets
 * transposed (pl__idx_by_key): a thread owns a tile of keys and walks the
 * queries that selected them in blocks (P and G of the next keys' entries
 * prefetched), so every thread writes only its own rows (no atomics) in a
 * fixed order (ascending t). Results do not depend on the number of threads. */
#include "internal.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>

/* ISO C mode turns off FMA contraction; the kernels want it. Vector returns in
 * the baseline clone make GCC warn of an ABI change that no call crosses. */
#if defined(__clang__)
#pragma clang fp contract(fast)
#pragma clang diagnostic ignored "-Wpsabi"
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

/* ---- vector kernels (GCC vector extensions; AVX2+FMA in the x86-64-v3 clone)
 * ---- */

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
#define LD(p) (*(const v8u *)(p))
#define ST(p, x) (*(v8u *)(p) = (x))
#define AI __attribute__((always_inline)) inline
typedef int32_t v8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

static AI v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }
#define SEL(m, a, b) ((v8)(((v8i)(a) & (m)) | ((v8i)(b) & ~(m)))) /* m ? a : b */

/* e^x, 8 lanes: pl__expf's algorithm (x < -87 and -inf give 0). */
static AI v8 expv(v8 x) {
    const v8i under = x < splat(-87.0f);
    x = SEL(under, splat(-87.0f), x);
    x = SEL(x > splat(88.0f), splat(88.0f), x);
    const v8 t = x * 1.44269504088896341f + 12582912.0f, n = t - 12582912.0f;
    v8 r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v8 p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8i e = ((v8i)t - (v8i)splat(12582912.0f)) << 23; /* n * 2^23 */
    return SEL(under, splat(0.0f), (v8)((v8i)p + e));
}

/* The 8 lane sums of a[0..8) as one vector (a transposing add tree). */
static AI v8 hsum8(const v8 *a) {
    v8 s01 =
        SHUF(a[0], a[1], 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a[0], a[1], 1, 9, 3, 11, 5, 13, 7, 15);
    v8 s23 =
        SHUF(a[2], a[3], 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a[2], a[3], 1, 9, 3, 11, 5, 13, 7, 15);
    v8 s45 =
        SHUF(a[4], a[5], 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a[4], a[5], 1, 9, 3, 11, 5, 13, 7, 15);
    v8 s67 =
        SHUF(a[6], a[7], 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a[6], a[7], 1, 9, 3, 11, 5, 13, 7, 15);
    v8 s03 = SHUF(s01, s23, 0, 1, 8, 9, 4, 5, 12, 13) + SHUF(s01, s23, 2, 3, 10, 11, 6, 7, 14, 15);
    v8 s47 = SHUF(s45, s67, 0, 1, 8, 9, 4, 5, 12, 13) + SHUF(s45, s67, 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUF(s03, s47, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(s03, s47, 4, 5, 6, 7, 12, 13, 14, 15);
}

static AI float hsum8v(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* out[i] = x . base[rows[i]*rs .. + 8*ND) for i < n (n rounded up to 8: rows
 * must be padded with valid row numbers; the extra outputs are junk). */
static AI void dots(const float *x, const float *base, const int32_t *rows, int64_t rs, int64_t n,
                    int ND, float *out) {
    for (int64_t i = 0; i < n; i += 8) {
        const float *r[8];
        for (int u = 0; u < 8; u++) r[u] = base + rows[i + u] * rs;
        v8 acc[8];
        if (ND <= 4) { /* x stays in registers */
            v8 xv[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
            for (int c = 0; c < ND; c++) xv[c] = LD(x + 8 * c);
            for (int u = 0; u < 8; u++) {
                acc[u] = xv[0] * LD(r[u]);
                for (int c = 1; c < ND; c++) acc[u] += xv[c] * LD(r[u] + 8 * c);
            }
        } else {
            for (int u = 0; u < 8; u++) {
                acc[u] = LD(x) * LD(r[u]);
                for (int c = 1; c < ND; c++) acc[u] += LD(x + 8 * c) * LD(r[u] + 8 * c);
            }
        }
        ST(out + i, hsum8(acc));
    }
}

/* y[0 .. 8*ND) += sum_{i<n} w[i] * base[rows[i]*rs ..]: two accumulator sets
 * (even and odd i) per group of up to 4 vectors, to cover the FMA latency. */
static AI void axpys(float *y, const float *w, const float *base, const int32_t *rows, int64_t rs,
                     int64_t n, int ND) {
    for (int c0 = 0; c0 < ND; c0 += 4) {
        const int nc = ND - c0 < 4 ? ND - c0 : 4;
        v8 a0[4], a1[4];
        for (int c = 0; c < nc; c++) {
            a0[c] = LD(y + 8 * (c0 + c));
            a1[c] = splat(0.0f);
        }
        int64_t i = 0;
        for (; i + 2 <= n; i += 2) {
            const float *r0 = base + rows[i] * rs + 8 * c0, *r1 = base + rows[i + 1] * rs + 8 * c0;
            const v8 w0 = splat(w[i]), w1 = splat(w[i + 1]);
            for (int c = 0; c < nc; c++) {
                a0[c] += w0 * LD(r0 + 8 * c);
                a1[c] += w1 * LD(r1 + 8 * c);
            }
        }
        if (i < n) {
            const float *r0 = base + rows[i] * rs + 8 * c0;
            const v8 w0 = splat(w[i]);
            for (int c = 0; c < nc; c++) a0[c] += w0 * LD(r0 + 8 * c);
        }
        for (int c = 0; c < nc; c++) ST(y + 8 * (c0 + c), a0[c] + a1[c]);
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

/* Gathered rows are used in chunks of CH entries, all heads of a chunk before
 * the next one (a row's H*D floats are then fetched once, while the chunk
 * after next is prefetched). */
#define CH 16

static AI void prefetch_rows(const float *base, const int32_t *rows, int64_t n, int64_t rs,
                             int64_t bytes) {
    for (int64_t i = 0; i < n; i++) {
        const char *r = (const char *)(base + rows[i] * rs);
        for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(r + o);
    }
}

/* z[h*ldz + i] = x[h*D ..] . base[rows[i]*rs + h*D ..] for every head, i < n
 * (n a multiple of 8; rows padded). ND = D/8, or 0 for the scalar kernels. */
static AI void dots_heads(const float *x, const float *base, const int32_t *rows, int64_t rs,
                          int64_t H, int64_t D, int64_t n, int ND, float *z, int64_t ldz) {
    for (int64_t i = 0; i < n; i += 8) {
        if (i + 2 * 8 < n)
            prefetch_rows(base, rows + i + 16, n - i - 16 < 8 ? n - i - 16 : 8, rs, 4 * H * D);
        for (int64_t h = 0; h < H; h++) {
            if (ND)
                dots(x + h * D, base + h * D, rows + i, rs, 8, ND, z + h * ldz + i);
            else
                dots_any(x + h * D, base + h * D, rows + i, rs, 8, D, z + h * ldz + i);
        }
    }
}

/* y[h*D ..] += sum_{i<n} w[h*ldw + i] base[rows[i]*rs + h*D ..] for every head. */
static AI void axpys_heads(float *y, const float *w, int64_t ldw, const float *base,
                           const int32_t *rows, int64_t rs, int64_t H, int64_t D, int64_t n,
                           int ND) {
    for (int64_t i = 0; i < n; i += CH) {
        const int64_t c = n - i < CH ? n - i : CH;
        if (i + CH < n)
            prefetch_rows(base, rows + i + CH, n - i - CH < CH ? n - i - CH : CH, rs, 4 * H * D);
        for (int64_t h = 0; h < H; h++) {
            if (ND)
                axpys(y + h * D, w + h * ldw + i, base + h * D, rows + i, rs, c, ND);
            else
                axpys_any(y + h * D, w + h * ldw + i, base + h * D, rows + i, rs, c, D);
        }
    }
}

typedef struct {
    int64_t B, L, H, D, K, W; /* W: 32-bit keep words per (b,t,h) row */
    int64_t Kp, Kz;           /* K rounded up to 8; Kz = Kp + 16: a row's stride in scratch */
    int64_t TQ, SK;           /* forward and dq: query rows per tile, keys per block */
    int64_t KT, QB;           /* dk, dv: keys per tile, query rows per block */
    float scale, keep_scale;
    uint32_t threshold; /* dropout: keep iff the random word >= threshold */
    uint64_t seed, offset;
    const float *q, *k, *v;
    const int32_t *idx;
    float *out;
    float *P;       /* [B,L,K,H] probabilities (before dropout); NULL when not recorded */
    uint32_t *keep; /* [B,L,H,W] keep bits; NULL without dropout */
    int64_t qt0;    /* decode (pl__sparse_attention_seqs): q, out and idx rows hold the queries
                       t >= qt0 of one sequence (row t - qt0); 0 otherwise */
} sa_args;

static inline bool keep_bit(const uint32_t *row, int64_t j) {
    return (row[j >> 5] >> (j & 31)) & 1u;
}

/* Per-thread working memory of a tile of TQ query rows: row r's entries
 * (keys sorted, padded with valid keys; their slots) at r*Kz, its scores and
 * weights for head h at (r*H + h)*Kz. */
typedef struct {
    int32_t *sel, *pos; /* TQ*Kz each */
    int64_t *n, *cur;   /* TQ each */
    int64_t *tmp;       /* K (sorting) */
    float *z, *w;       /* TQ*H*Kz each */
    float *delta;       /* TQ*H */
} sa_work;

static size_t work_bytes(const sa_args *a) {
    const size_t TQ = (size_t)a->TQ, H = (size_t)a->H, Kz = (size_t)a->Kz;
    return 8 * (2 * TQ + (size_t)a->K) + 4 * (2 * TQ * Kz + 2 * TQ * H * Kz + TQ * H) + 64;
}

static sa_work work_carve(const sa_args *a, unsigned char *base) {
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
    return w;
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

/* Forward of the query rows [t0, t1) of batch b, all heads. The rows walk the
 * keys in blocks of SK (a block's k or v rows stay in L2 while every row of the
 * tile takes its entries from it): scores z = q.k/sqrt(D) block by block,
 * then p = softmax(z) per row and head (saved as P[b,t,j,h]), then out = sum
 * p' v block by block. */
static AI void fwd_tile_impl(const sa_args *a, int64_t b, int64_t t0, int64_t t1, const sa_work *w,
                             int ND) {
    const int64_t L = a->L, H = a->H, D = a->D, K = a->K, HD = H * D, Kz = a->Kz;
    const float *kb = a->k + b * L * HD, *vb = a->v + b * L * HD;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t - t0;
        int32_t *sel = w->sel + r * Kz, *pos = w->pos + r * Kz;
        const int64_t n = w->n[r] = row_entries(a, b, t, sel, pos, w->tmp);
        w->cur[r] = 0;
        memset(a->out + (b * L + t - a->qt0) * HD, 0, sizeof(float) * (size_t)HD);
        if (a->keep && n) row_keep(a, b, t, n, pos);
    }
    for (int64_t s0 = 0; s0 < t1; s0 += a->SK) {
        const int64_t s1 = s0 + a->SK < t1 ? s0 + a->SK : t1;
        for (int64_t t = t0 > s0 ? t0 : s0; t < t1; t++) {
            const int64_t r = t - t0;
            int64_t c0, c = block_end(w, Kz, r, s1, &c0) - c0;
            if (c == 0) continue;
            dots_heads(a->q + (b * L + t - a->qt0) * HD, kb, w->sel + r * Kz + c0, HD, H, D,
                       (c + 7) & ~7, ND, w->z + r * H * Kz + c0, Kz);
        }
    }
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t - t0, n = w->n[r], n8 = (n + 7) & ~7, row0 = (b * L + t) * H;
        const int32_t *pos = w->pos + r * Kz;
        w->cur[r] = 0;
        if (n == 0) continue; /* nothing selected: output 0, no gradient */
        for (int64_t h = 0; h < H; h++) {
            float *z = w->z + (r * H + h) * Kz;
            for (int64_t i = n; i < n8; i++) z[i] = -INFINITY; /* the padding: p = 0 */
            v8 mv = splat(-INFINITY);
            for (int64_t i = 0; i < n8; i += 8) mv = SEL(LD(z + i) > mv, LD(z + i), mv);
            float m = mv[0];
            for (int u = 1; u < 8; u++) m = mv[u] > m ? mv[u] : m;
            const v8 ms = splat(m * a->scale);
            v8 sum = splat(0.0f);
            for (int64_t i = 0; i < n8; i += 8) {
                const v8 e = expv(LD(z + i) * a->scale - ms);
                sum += e;
                ST(z + i, e);
            }
            const float inv = 1.0f / hsum8v(sum);
            for (int64_t i = 0; i < n8; i += 8) ST(z + i, LD(z + i) * inv);
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
    const float *pw = a->keep ? w->w : w->z;
    for (int64_t s0 = 0; s0 < t1; s0 += a->SK) {
        const int64_t s1 = s0 + a->SK < t1 ? s0 + a->SK : t1;
        for (int64_t t = t0 > s0 ? t0 : s0; t < t1; t++) {
            const int64_t r = t - t0;
            int64_t c0, c = block_end(w, Kz, r, s1, &c0) - c0;
            if (c == 0) continue;
            axpys_heads(a->out + (b * L + t - a->qt0) * HD, pw + r * H * Kz + c0, Kz, vb,
                        w->sel + r * Kz + c0, HD, H, D, c, ND);
        }
    }
}

PL_KERNEL static void sa_fwd_tile(const sa_args *a, int64_t b, int64_t t0, int64_t t1,
                                  const sa_work *w) {
    if (a->D == 32)
        fwd_tile_impl(a, b, t0, t1, w, 4);
    else if (a->D % 8 == 0)
        fwd_tile_impl(a, b, t0, t1, w, (int)(a->D / 8));
    else
        fwd_tile_impl(a, b, t0, t1, w, 0);
}

/* Backward of the query rows [t0, t1) of batch b, with Delta_h = dO_h . out_h:
 *   dp_j = keep_j/(1-p) dO_h . v_{s_j},   g_j = p_j (dp_j - Delta_h) / sqrt(D)
 * stored as G[b,t,j,h] (for the dk pass), and dq_h += sum_j g_j k_{s_j,h}; the
 * same key blocks as the forward, v and k of a block used together. Then P
 * becomes p' = p keep / (1 - dropout_p), what the dv pass wants. */
static AI void bwd_tile_impl(const sa_args *a, const float *dO, float *G, float *dq, int64_t b,
                             int64_t t0, int64_t t1, const sa_work *w, int ND) {
    const int64_t L = a->L, H = a->H, D = a->D, K = a->K, HD = H * D, Kz = a->Kz;
    const float *kb = a->k + b * L * HD, *vb = a->v + b * L * HD;
    const float scale = a->scale, ks = a->keep_scale;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t - t0, row0 = (b * L + t) * H;
        w->n[r] = row_entries(a, b, t, w->sel + r * Kz, w->pos + r * Kz, w->tmp);
        w->cur[r] = 0;
        for (int64_t h = 0; h < H; h++)
            w->delta[r * H + h] = pl__dot(dO + (row0 + h) * D, a->out + (row0 + h) * D, D);
    }
    for (int64_t s0 = 0; G && s0 < t1; s0 += a->SK) {
        const int64_t s1 = s0 + a->SK < t1 ? s0 + a->SK : t1;
        for (int64_t t = t0 > s0 ? t0 : s0; t < t1; t++) {
            const int64_t r = t - t0, row0 = (b * L + t) * H;
            int64_t c0, c = block_end(w, Kz, r, s1, &c0) - c0;
            if (c == 0) continue;
            const int32_t *sel = w->sel + r * Kz + c0, *pos = w->pos + r * Kz + c0;
            const float *P = a->P + (b * L + t) * K * H;
            float *Gr = G + (b * L + t) * K * H, *dp = w->z, *g = w->w;
            dots_heads(dO + row0 * D, vb, sel, HD, H, D, (c + 7) & ~7, ND, dp, Kz);
            for (int64_t h = 0; h < H; h++) {
                float *dph = dp + h * Kz, *gh = g + h * Kz;
                const float delta = w->delta[r * H + h];
                if (a->keep) {
                    const uint32_t *kr = a->keep + (row0 + h) * a->W;
                    for (int64_t i = 0; i < c; i++)
                        dph[i] = keep_bit(kr, pos[i]) ? dph[i] * ks : 0.0f;
                }
                for (int64_t i = 0; i < c; i++)
                    gh[i] = P[pos[i] * H + h] * (dph[i] - delta) * scale;
            }
            for (int64_t i = 0; i < c; i++)
                for (int64_t h = 0; h < H; h++) Gr[pos[i] * H + h] = g[h * Kz + i];
            if (dq) axpys_heads(dq + row0 * D, g, Kz, kb, sel, HD, H, D, c, ND);
        }
    }
    if (!a->keep) return;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r = t - t0, row0 = (b * L + t) * H;
        const int32_t *pos = w->pos + r * Kz;
        float *P = a->P + (b * L + t) * K * H;
        for (int64_t h = 0; h < H; h++) {
            const uint32_t *kr = a->keep + (row0 + h) * a->W;
            for (int64_t i = 0; i < w->n[r]; i++) {
                const int64_t j = pos[i];
                P[j * H + h] = keep_bit(kr, j) ? P[j * H + h] * ks : 0.0f;
            }
        }
    }
}

PL_KERNEL static void sa_bwd_tile(const sa_args *a, const float *dO, float *G, float *dq, int64_t b,
                                  int64_t t0, int64_t t1, const sa_work *w) {
    if (a->D == 32)
        bwd_tile_impl(a, dO, G, dq, b, t0, t1, w, 4);
    else if (a->D % 8 == 0)
        bwd_tile_impl(a, dO, G, dq, b, t0, t1, w, (int)(a->D / 8));
    else
        bwd_tile_impl(a, dO, G, dq, b, t0, t1, w, 0);
}

/* dk and dv of key s from the entries e = t*K + j (of batch b) that selected it:
 *   dv_s,h += sum_e p'_e dO_t,h,   dk_s,h += sum_e g'_e q_t,h
 * with p' = P and g' = G as the row pass left them. rows: scratch for n int32
 * (the entries' t); cw, gw: n floats each. */
static AI void kv_key_impl(const sa_args *a, const float *dO, const float *G, float *dk, float *dv,
                           int64_t b, int64_t s, const int32_t *list, int64_t n, int32_t *rows,
                           float *cw, float *gw, int ND) {
    const int64_t L = a->L, H = a->H, D = a->D, K = a->K, HD = H * D;
    const double invK = 1.0 / (double)K;
    for (int64_t e = 0; e < n; e++) { /* t = e / K without a division */
        int64_t t = (int64_t)((double)list[e] * invK);
        t -= t * K > list[e];
        t += (t + 1) * K <= list[e];
        rows[e] = (int32_t)t;
    }
    const float *Pb = a->P + b * L * K * H, *Gb = G ? G + b * L * K * H : NULL;
    for (int64_t h = 0; h < H; h++) {
        const int64_t ko = ((b * L + s) * H + h) * D;
        const float *qb = a->q + (b * L * H + h) * D, *dOb = dO + (b * L * H + h) * D;
        if (dv) {
            for (int64_t e = 0; e < n; e++) cw[e] = Pb[(int64_t)list[e] * H + h];
            if (ND)
                axpys(dv + ko, cw, dOb, rows, HD, n, ND);
            else
                axpys_any(dv + ko, cw, dOb, rows, HD, n, D);
        }
        if (dk) {
            for (int64_t e = 0; e < n; e++) gw[e] = Gb[(int64_t)list[e] * H + h];
            if (ND)
                axpys(dk + ko, gw, qb, rows, HD, n, ND);
            else
                axpys_any(dk + ko, gw, qb, rows, HD, n, D);
        }
    }
}

PL_KERNEL static void sa_bwd_kv_key(const sa_args *a, const float *dO, const float *G, float *dk,
                                    float *dv, int64_t b, int64_t s, const int32_t *list, int64_t n,
                                    int32_t *rows, float *cw, float *gw) {
    if (a->D == 32)
        kv_key_impl(a, dO, G, dk, dv, b, s, list, n, rows, cw, gw, 4);
    else if (a->D % 8 == 0)
        kv_key_impl(a, dO, G, dk, dv, b, s, list, n, rows, cw, gw, (int)(a->D / 8));
    else
        kv_key_impl(a, dO, G, dk, dv, b, s, list, n, rows, cw, gw, 0);
}

#define KV_AHEAD 2 /* keys ahead whose P and G entries are prefetched */

/* dk, dv of the keys [s0, s1) of batch b, walking the queries in blocks of QB
 * rows so that their q and dO rows are reused from cache. off: batch b's list
 * offsets; cur, end: 2 (s1 - s0) cursors. The entries of a key are summed in
 * ascending t whatever the blocks. */
static void sa_bwd_kv_tile(const sa_args *a, const float *dO, const float *G, float *dk, float *dv,
                           int64_t b, int64_t s0, int64_t s1, const int32_t *off,
                           const int32_t *list, int64_t *cur, const sa_work *w) {
    const int64_t L = a->L, K = a->K, H = a->H, nk = s1 - s0;
    int64_t *end = cur + nk;
    const float *Pb = a->P + b * L * K * H, *Gb = G ? G + b * L * K * H : NULL;
    for (int64_t s = s0; s < s1; s++) cur[s - s0] = off[s];
    for (int64_t tq0 = s0; tq0 < L; tq0 += a->QB) {
        const int64_t lim = (tq0 + a->QB < L ? tq0 + a->QB : L) * K; /* entries e < lim */
        for (int64_t x = 0; x < nk; x++) {
            int64_t e1 = cur[x];
            while (e1 < off[s0 + x + 1] && list[e1] < lim) e1++;
            end[x] = e1;
        }
        for (int64_t x = 0; x < nk + KV_AHEAD; x++) {
            if (x < nk) /* prefetch key x's entries, KV_AHEAD keys before they are used */
                for (int64_t e = cur[x]; e < end[x]; e++) {
                    __builtin_prefetch(Pb + (int64_t)list[e] * H);
                    if (Gb) __builtin_prefetch(Gb + (int64_t)list[e] * H);
                }
            const int64_t y = x - KV_AHEAD;
            if (y < 0) continue;
            for (int64_t c0 = cur[y]; c0 < end[y]; c0 += a->Kp) { /* <= Kp entries per call */
                const int64_t c1 = c0 + a->Kp < end[y] ? c0 + a->Kp : end[y];
                sa_bwd_kv_key(a, dO, G, dk, dv, b, s0 + y, list + c0, c1 - c0, w->sel, w->z, w->w);
            }
            cur[y] = end[y];
        }
    }
}

static void sparse_attention_backward(pl_ctx *ctx, pl_node *n) {
    const sa_args *a = n->saved;
    const float *dO = n->out->grad;
    const int64_t B = a->B, L = a->L, K = a->K, H = a->H;
    float *g[3];
    if (pl__grads(ctx, n, g)) return;
    float *dq = g[0], *dk = g[1], *dv = g[2];
    const int nt = omp_get_max_threads();
    const size_t per = (work_bytes(a) + 16 * (size_t)a->KT + 63) & ~(size_t)63;
    /* G, the transposed index sets and the per-thread memory are given back to
     * the arena when this backward is done. */
    const pl_mark mark = pl_mark_get(ctx);
    unsigned char *buf = pl__scratch(ctx, per * (size_t)nt);
    float *G = buf && (dq || dk) ? pl__scratch(ctx, sizeof(float) * (size_t)(B * L * K * H)) : NULL;
    if (!buf || ((dq || dk) && !G)) return;
    const int64_t TQ = a->TQ, nq = (L + TQ - 1) / TQ, nk = (L + a->KT - 1) / a->KT;
    /* Dynamic loops go through PL_PARALLEL_FOR (an orphaned one would malloc
     * when serial), so each task carves its thread's memory (pointer
     * arithmetic only; the tiles do not depend on what it held before). */
    const int64_t work = B * L * K * H * a->D;
    if (dq || dk || (dv && a->keep))
        PL_PARALLEL_FOR(work, schedule(dynamic, 1), r, B * nq,
                        { /* largest tiles (late t) first */
                          sa_work w = work_carve(a, buf + per * (size_t)omp_get_thread_num());
                          const int64_t b = r / nq, t0 = (nq - 1 - r % nq) * TQ;
                          sa_bwd_tile(a, dO, G, dq, b, t0, t0 + TQ < L ? t0 + TQ : L, &w);
                        });
    int32_t *off, *list;
    if ((dk || dv) && !pl__idx_by_key(ctx, a->idx, B, L, K, &off, &list))
        PL_PARALLEL_FOR(work, schedule(dynamic, 1), r, B * nk,
                        { /* early keys first */
                          unsigned char *base = buf + per * (size_t)omp_get_thread_num();
                          sa_work w = work_carve(a, base);
                          int64_t *cur = (int64_t *)(base + work_bytes(a));
                          const int64_t b = r / nk, s0 = (r % nk) * a->KT;
                          sa_bwd_kv_tile(a, dO, G, dk, dv, b, s0, s0 + a->KT < L ? s0 + a->KT : L,
                                         off + b * (L + 1), list, cur, &w);
                        });
    pl_mark_release(ctx, mark);
}

static int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

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
                         .KT = 1,
                         .QB = 1,
                         .scale = 1.0f / sqrtf((float)D),
                         .keep_scale = 1.0f,
                         .q = s->q,
                         .k = s->k,
                         .v = s->v,
                         .idx = s->idx,
                         .out = s->out,
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
        sa_fwd_tile(&a[i], 0, t0, t0 + TQ < t1 ? t0 + TQ : t1, &w);
    });
    return PL_OK;
}

pl_tensor *pl_sparse_attention(pl_ctx *ctx, pl_tensor *q, pl_tensor *k, pl_tensor *v,
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
     * ~5 MB). The dk, dv pass: KT keys per tile, QB query rows per block. */
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
                 SK / 2 > 0 ? SK / 2 : 1,
                 SK / 4 > 0 ? SK / 4 : 1,
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
                 0};
    if (record && !(a.P = pl__scratch(ctx, sizeof(float) * (size_t)(B * L * K * H)))) return NULL;
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
    /* Each task carves its thread's memory (see the backward). */
    PL_PARALLEL_FOR(B * L * K * H * D, schedule(dynamic, 1), r, B * nq, {
        sa_work w = work_carve(&a, buf + per * (size_t)omp_get_thread_num());
        const int64_t b = r / nq, t0 = (nq - 1 - r % nq) * TQ; /* largest tiles (late t) first */
        sa_fwd_tile(&a, b, t0, t0 + TQ < L ? t0 + TQ : L, &w);
    });
    if (dropout_p > 0.0f) rng->offset += (uint64_t)(B * H * L * ((K + 3) / 4));
    pl_node *nd;
    if (pl__record(ctx, "sparse_attention", sparse_attention_backward, out, 3, in, sizeof a, &nd))
        return NULL;
    if (nd) *(sa_args *)nd->saved = a;
    return out;
}
