/* plasa_mpi under mpirun (any number of ranks; the suite runs 2): broadcast,
 * the gradient mean against its definition, independence of the bucket
 * size, the global clipping norm, scalar sums, ZeRO-1 bit-identical to the
 * replicated AdamW, the gathered checkpoint state, resuming it on another
 * communicator size, and misuse errors. Exit status 0 only if every check
 * passed on every rank. */
#include <math.h>
#include <plasa_mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures, rank, size;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            failures++;                                                                            \
            fprintf(stderr, "rank %d: %s:%d: CHECK(%s) failed: ", rank, __FILE__, __LINE__,        \
                    #cond);                                                                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, " [%s]\n", pl_last_error());                                           \
        }                                                                                          \
    } while (0)

/* Parameter sizes chosen so that shards and buckets cut through tensors. */
static const int64_t SIZES[] = {1000, 37, 4099, 1, 513};
enum { NP = sizeof SIZES / sizeof *SIZES };

/* A float in [-1, 1) from (a, b, c), the same on every rank. */
static float val(uint64_t a, uint64_t b, uint64_t c) {
    uint32_t w[4];
    pl_philox(a * 1000003u + b, c, w);
    return (float)((double)w[0] / 4294967296.0 * 2.0 - 1.0);
}

static pl_ctx *make_ctx(void) {
    pl_ctx *ctx = pl_ctx_new(NULL);
    char name[32];
    for (int i = 0; i < NP; i++) {
        snprintf(name, sizeof name, "p%d", i);
        pl_tensor *p = pl_param_new(ctx, name, PL_DIMS(SIZES[i]));
        for (int64_t j = 0; j < SIZES[i]; j++) pl_f32(p)[j] = val(1, (uint64_t)i, (uint64_t)j);
    }
    return ctx;
}

/* The gradient rank r has at step s. Step 2 is scaled up so clipping acts. */
static void set_grads(pl_ctx *ctx, int r, int s) {
    for (int i = 0; i < NP; i++) {
        pl_tensor *p = pl_param_at(ctx, i);
        for (int64_t j = 0; j < p->numel; j++)
            p->grad[j] = val(100 + (uint64_t)s, (uint64_t)(r * NP + i), (uint64_t)j) *
                         (s == 2 ? 50.0f : 1.0f);
    }
}

/* Every rank holds the same bytes in every parameter. */
static bool replicas_equal(pl_ctx *ctx) {
    bool same = true;
    for (int i = 0; i < pl_param_count(ctx); i++) {
        pl_tensor *p = pl_param_at(ctx, i);
        float *root = malloc((size_t)p->numel * sizeof(float));
        memcpy(root, pl_f32(p), (size_t)p->numel * sizeof(float));
        MPI_Bcast(root, (int)p->numel, MPI_FLOAT, 0, MPI_COMM_WORLD);
        same &= memcmp(root, pl_f32(p), (size_t)p->numel * sizeof(float)) == 0;
        free(root);
    }
    int all = same, both;
    MPI_Allreduce(&all, &both, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    return both;
}

static void test_broadcast(void) {
    pl_ctx *ctx = make_ctx();
    /* Rank-specific values, then root 1's (or 0's) win. */
    for (int i = 0; i < NP; i++)
        for (int64_t j = 0; j < SIZES[i]; j++)
            pl_f32(pl_param_at(ctx, i))[j] = val(7, (uint64_t)rank, (uint64_t)(i * 10000 + j));
    pl_mpi_config c = {.bucket_bytes = 64};
    pl_mpi *d = pl_mpi_new(ctx, MPI_COMM_WORLD, &c);
    CHECK(d, "pl_mpi_new");
    int root = size > 1 ? 1 : 0;
    CHECK(pl_mpi_broadcast_params(d, root) == PL_OK, "broadcast");
    int bad = 0;
    for (int i = 0; i < NP; i++)
        for (int64_t j = 0; j < SIZES[i]; j++)
            bad +=
                pl_f32(pl_param_at(ctx, i))[j] != val(7, (uint64_t)root, (uint64_t)(i * 10000 + j));
    CHECK(bad == 0, "%d elements differ from root %d's", bad, root);
    CHECK(pl_mpi_broadcast_params(d, size) == PL_ERR_ARG, "root out of range");
    pl_mpi_free(d);
    pl_ctx_free(ctx);
}

/* The mean of the gradients and the clipping norm, by definition, and the
 * same bits for every bucket size, with and without ZeRO. */
static void test_reduce(void) {
    const int64_t buckets[] = {4, 12, 400, 4100, 0};
    float *first = NULL;
    double first_norm = 0;
    int64_t total = 0;
    for (int i = 0; i < NP; i++) total += SIZES[i];
    for (int zero = 0; zero < 2; zero++) {
        for (size_t bi = 0; bi < sizeof buckets / sizeof *buckets; bi++) {
            pl_ctx *ctx = make_ctx();
            pl_mpi_config c = {.bucket_bytes = buckets[bi], .zero = zero};
            pl_mpi *d = pl_mpi_new(ctx, MPI_COMM_WORLD, &c);
            CHECK(d, "pl_mpi_new bucket %lld", (long long)buckets[bi]);
            if (!d) continue;
            set_grads(ctx, rank, 0);
            CHECK(pl_mpi_allreduce_grads(d) == PL_OK, "allreduce");
            pl_status st;
            double norm = pl_mpi_clip_grad_norm(d, INFINITY, &st);
            CHECK(st == PL_OK, "norm");
            /* The definition: (sum over ranks in double) / P, rounded once. */
            double want_sq = 0;
            int bad = 0;
            float *got = malloc((size_t)total * sizeof(float));
            for (int i = 0, at = 0; i < NP; i++) {
                for (int64_t j = 0; j < SIZES[i]; j++, at++) {
                    double acc = 0;
                    for (int r = 0; r < size; r++)
                        acc += val(100, (uint64_t)(r * NP + i), (uint64_t)j);
                    float want = (float)(acc / size);
                    want_sq += (double)want * want;
                    got[at] = pl_param_at(ctx, i)->grad[j];
                    if (!zero) bad += got[at] != want;
                }
            }
            CHECK(bad == 0, "bucket %lld: %d gradient elements differ from the mean",
                  (long long)buckets[bi], bad);
            CHECK(fabs(norm - sqrt(want_sq)) <= 1e-12 * sqrt(want_sq), "norm %.17g vs %.17g", norm,
                  sqrt(want_sq));
            if (!first) {
                first = got;
                first_norm = norm;
            } else {
                if (!zero)
                    CHECK(memcmp(first, got, (size_t)total * sizeof(float)) == 0,
                          "bucket %lld changed the gradients", (long long)buckets[bi]);
                CHECK(norm == first_norm, "bucket %lld zero %d: norm %.17g != %.17g",
                      (long long)buckets[bi], zero, norm, first_norm);
                free(got);
            }
            pl_mpi_free(d);
            pl_ctx_free(ctx);
        }
    }
    free(first);
}

static void test_sum(void) {
    pl_ctx *ctx = make_ctx();
    pl_mpi *d = pl_mpi_new(ctx, MPI_COMM_WORLD, NULL);
    double v[3] = {rank + 1.0, 0.5, (double)rank * rank};
    CHECK(pl_mpi_allreduce_sum(d, v, 3) == PL_OK, "sum");
    double w0 = 0, w2 = 0;
    for (int r = 0; r < size; r++) w0 += r + 1.0, w2 += (double)r * r;
    CHECK(v[0] == w0 && v[1] == 0.5 * size && v[2] == w2, "sums %g %g %g", v[0], v[1], v[2]);
    CHECK(pl_mpi_allreduce_sum(d, NULL, 2) == PL_ERR_ARG, "NULL values");
    pl_mpi_free(d);
    pl_ctx_free(ctx);
}

/* ZeRO-1 against allreduce + pl_adamw_step, step by step, with clipping on
 * step 2; then the gathered state against pl_adamw's, and a resume from it
 * (on every rank, and on a one-rank communicator). */
static void test_zero(void) {
    pl_adamw_config oc = pl_adamw_default_config();
    oc.lr = 0.01, oc.beta2 = 0.95, oc.weight_decay = 0.1;
    pl_ctx *a = make_ctx(), *b = make_ctx();
    pl_adamw *opt = pl_adamw_new(a, &oc);
    pl_mpi_config ca = {.bucket_bytes = 400}, cb = {.bucket_bytes = 4096, .zero = true};
    pl_mpi *da = pl_mpi_new(a, MPI_COMM_WORLD, &ca), *db = pl_mpi_new(b, MPI_COMM_WORLD, &cb);
    pl_mpi_zero *z = pl_mpi_zero_new(db, &oc);
    CHECK(opt && da && db && z, "setup");
    if (!(opt && da && db && z)) return;
    CHECK(pl_mpi_zero_step(z) == PL_ERR_STATE, "step before the reduction");
    CHECK(!pl_mpi_zero_new(da, &oc) && pl_last_status() == PL_ERR_ARG, "zero on a non-zero d");
    for (int s = 0; s < 4; s++) {
        set_grads(a, rank, s);
        set_grads(b, rank, s);
        pl_status st1, st2;
        CHECK(pl_mpi_allreduce_grads(da) == PL_OK && pl_mpi_allreduce_grads(db) == PL_OK, "reduce");
        double n1 = pl_mpi_clip_grad_norm(da, 20.0, &st1),
               n2 = pl_mpi_clip_grad_norm(db, 20.0, &st2);
        CHECK(st1 == PL_OK && st2 == PL_OK && n1 == n2, "step %d: norms %.17g %.17g", s, n1, n2);
        if (s == 2) CHECK(n1 > 20.0, "step 2 should clip (norm %g)", n1);
        CHECK(pl_adamw_step(opt) == PL_OK, "adamw");
        CHECK(pl_mpi_zero_step(z) == PL_OK, "zero step");
        int bad = 0;
        for (int i = 0; i < NP; i++)
            bad += memcmp(pl_f32(pl_param_at(a, i)), pl_f32(pl_param_at(b, i)),
                          (size_t)SIZES[i] * sizeof(float)) != 0;
        CHECK(bad == 0, "step %d: ZeRO parameters differ from AdamW's in %d tensors", s, bad);
        CHECK(replicas_equal(b), "step %d: ZeRO replicas differ", s);
        CHECK(replicas_equal(a), "step %d: replicas differ", s);
    }
    CHECK(pl_mpi_zero_get_step(z) == 4, "step count");
    /* The gathered state on root 0 equals pl_adamw's tensors. */
    CHECK(pl_mpi_zero_gather_state(z, 0) == PL_OK, "gather");
    if (rank == 0) {
        char name[64];
        int bad = 0;
        for (int i = 0; i < NP; i++)
            for (int k = 0; k < 2; k++) {
                snprintf(name, sizeof name, "adamw.%s.p%d", k ? "v" : "m", i);
                pl_tensor *x = pl_persistent_find(a, name), *y = pl_persistent_find(b, name);
                bad +=
                    !x || !y || memcmp(pl_f32(x), pl_f32(y), (size_t)SIZES[i] * sizeof(float)) != 0;
            }
        CHECK(bad == 0, "%d gathered state tensors differ from pl_adamw's", bad);
        pl_tensor *st = pl_persistent_find(b, "adamw.step");
        CHECK(st && pl_i32(st)[0] == 4, "gathered step");
    } else {
        CHECK(!pl_persistent_find(b, "adamw.m.p0"), "state gathered on a non-root rank");
    }
    pl_mpi_zero_release_state(z);
    CHECK(!pl_persistent_find(b, "adamw.m.p0"), "release_state left the tensors");

    /* Resume: a fresh context takes pl_adamw's state (as a checkpoint would
     * restore it), on the whole world and on each rank alone, and continues
     * exactly as the replicated run. */
    for (int alone = 0; alone < 2; alone++) {
        pl_ctx *c = make_ctx();
        for (int i = 0; i < NP; i++)
            memcpy(pl_f32(pl_param_at(c, i)), pl_f32(pl_param_at(a, i)),
                   (size_t)SIZES[i] * sizeof(float));
        char name[64];
        for (int i = 0; i < NP; i++)
            for (int k = 0; k < 2; k++) {
                snprintf(name, sizeof name, "adamw.%s.p%d", k ? "v" : "m", i);
                pl_tensor *t = pl_persistent_new(c, name, PL_F32, PL_DIMS(SIZES[i]), false);
                memcpy(pl_f32(t), pl_f32(pl_persistent_find(a, name)),
                       (size_t)SIZES[i] * sizeof(float));
            }
        pl_mpi *dc = pl_mpi_new(c, alone ? MPI_COMM_SELF : MPI_COMM_WORLD, &cb);
        pl_mpi_zero *zc = pl_mpi_zero_new(dc, &oc);
        CHECK(pl_mpi_zero_load_state(zc) == PL_ERR_STATE, "load without adamw.step");
        pl_tensor *st = pl_persistent_new(c, "adamw.step", PL_I32, PL_DIMS(1), false);
        pl_i32(st)[0] = 4;
        CHECK(pl_mpi_zero_load_state(zc) == PL_OK, "load");
        CHECK(!pl_persistent_find(c, "adamw.m.p0"), "load_state kept the full tensors");
        CHECK(pl_mpi_zero_get_step(zc) == 4, "loaded step");
        /* One more step on a's copy and on c: same gradients (the world's mean
         * is what the alone run sees as its own gradient). */
        pl_ctx *ref = make_ctx();
        for (int i = 0; i < NP; i++)
            memcpy(pl_f32(pl_param_at(ref, i)), pl_f32(pl_param_at(a, i)),
                   (size_t)SIZES[i] * sizeof(float));
        for (int i = 0; i < NP; i++)
            for (int k = 0; k < 2; k++) {
                snprintf(name, sizeof name, "adamw.%s.p%d", k ? "v" : "m", i);
                pl_tensor *t = pl_persistent_new(ref, name, PL_F32, PL_DIMS(SIZES[i]), false);
                memcpy(pl_f32(t), pl_f32(pl_persistent_find(a, name)),
                       (size_t)SIZES[i] * sizeof(float));
            }
        pl_adamw *ro = pl_adamw_new(ref, &oc);
        pl_adamw_set_step(ro, 4);
        pl_mpi *dr = pl_mpi_new(ref, MPI_COMM_WORLD, &ca);
        set_grads(ref, rank, 5);
        pl_mpi_allreduce_grads(dr);
        pl_mpi_clip_grad_norm(dr, 1000.0,
                              NULL); /* no clipping: the norm's rounding differs alone */
        pl_adamw_step(ro);
        if (alone) { /* c's own gradient: the world's mean, already formed in ref */
            for (int i = 0; i < NP; i++) {
                pl_tensor *p = pl_param_at(c, i);
                for (int64_t j = 0; j < p->numel; j++) {
                    double acc = 0;
                    for (int r = 0; r < size; r++)
                        acc += val(105, (uint64_t)(r * NP + i), (uint64_t)j);
                    p->grad[j] = (float)(acc / size);
                }
            }
        } else {
            set_grads(c, rank, 5);
        }
        CHECK(pl_mpi_allreduce_grads(dc) == PL_OK, "reduce");
        pl_mpi_clip_grad_norm(dc, 1000.0, NULL);
        CHECK(pl_mpi_zero_step(zc) == PL_OK, "step");
        int bad = 0;
        for (int i = 0; i < NP; i++)
            bad += memcmp(pl_f32(pl_param_at(c, i)), pl_f32(pl_param_at(ref, i)),
                          (size_t)SIZES[i] * sizeof(float)) != 0;
        CHECK(bad == 0, "resumed %s: %d tensors differ after a step", alone ? "alone" : "world",
              bad);
        pl_mpi_free(dr);
        pl_adamw_free(ro);
        pl_ctx_free(ref);
        pl_mpi_zero_free(zc);
        pl_mpi_free(dc);
        pl_ctx_free(c);
    }
    pl_mpi_zero_free(z);
    pl_mpi_free(db);
    pl_mpi_free(da);
    pl_adamw_free(opt);
    pl_ctx_free(b);
    pl_ctx_free(a);
}

static void test_misuse(void) {
    pl_ctx *ctx = make_ctx();
    pl_mpi_config c = {.bucket_bytes = 3};
    CHECK(!pl_mpi_new(ctx, MPI_COMM_WORLD, &c) && pl_last_status() == PL_ERR_ARG, "bucket 3");
    CHECK(!pl_mpi_new(NULL, MPI_COMM_WORLD, NULL) && pl_last_status() == PL_ERR_ARG, "NULL ctx");
    pl_mpi *d = pl_mpi_new(ctx, MPI_COMM_WORLD, NULL);
    CHECK(pl_mpi_clip_grad_norm(d, 1.0, NULL) == -1.0 && pl_last_status() == PL_ERR_STATE,
          "clip before reduce");
    pl_param_new(ctx, "late", PL_DIMS(3));
    CHECK(pl_mpi_allreduce_grads(d) == PL_ERR_STATE, "a parameter added after pl_mpi_new");
    pl_mpi_free(d);
    /* Ranks whose models differ: an error on every rank, not a hang. */
    if (size > 1 && rank == 1) pl_param_new(ctx, "extra", PL_DIMS(5));
    d = pl_mpi_new(ctx, MPI_COMM_WORLD, NULL);
    if (size > 1) CHECK(!d && pl_last_status() == PL_ERR_ARG, "models differ");
    pl_mpi_free(d);
    pl_ctx_free(ctx);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    test_broadcast();
    test_reduce();
    test_sum();
    test_zero();
    test_misuse();
    int all;
    MPI_Allreduce(&failures, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) printf("test_mpi_lib: %d ranks, %d failed checks\n", size, all);
    MPI_Finalize();
    return all ? 1 : 0;
}
