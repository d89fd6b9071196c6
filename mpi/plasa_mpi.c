/* plasa_mpi: gradient reduction, parameter broadcast and ZeRO-1 AdamW over
 * MPI (include/plasa_mpi.h has the layout and the arithmetic). */
#include "plasa_mpi.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct pl_mpi {
    pl_ctx *ctx;
    MPI_Comm comm; /* our duplicate */
    int rank, size;
    int n_params;
    pl_tensor **params;     /* the parameters at pl_mpi_new */
    int64_t *offset;        /* flat offset of each parameter; offset[n_params] = N */
    int64_t n;              /* N */
    int64_t *shard_at;      /* rank r's shard: [shard_at[r], shard_at[r+1]) */
    int64_t slice;          /* elements of one shard per bucket: ceil(E/P) */
    int64_t buckets;        /* ceil(max shard / slice) */
    int *counts, *displs;   /* per rank, for the current bucket */
    int *rcounts, *rdispls; /* Alltoallv receive side: `mine` from every rank */
    float *send, *recv;     /* P*slice floats each */
    bool zero;
    float *gshard;   /* zero: this rank's shard of the mean gradient */
    double sumsq;    /* sum of squares of this rank's reduced shard */
    bool reduced;    /* sumsq belongs to the last reduction */
    double *scalars; /* P * cap_scalars, pl_mpi_allreduce_sum */
    int cap_scalars;
    pl_mpi_stats stats;
};

struct pl_mpi_zero {
    pl_mpi *d;
    pl_adamw_config cfg;
    int64_t step;
    float *m, *v;     /* shard moments */
    pl_tensor **full; /* gather_state: 2 per parameter + step */
    int n_full;
};

static pl_status comm_err(const char *fn, const char *call, int rc) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "code %d", rc);
    return pl_set_error(PL_ERR_COMM, "%s: %s failed: %s", fn, call, msg);
}

/* Runs an MPI call, timing it and counting bytes sent; returns from the
 * enclosing function with PL_ERR_COMM on failure. */
#define MPI_CALL(fn, bytes, call)                                                                  \
    do {                                                                                           \
        double t0_ = MPI_Wtime();                                                                  \
        int rc_ = (call);                                                                          \
        d->stats.seconds += MPI_Wtime() - t0_;                                                     \
        d->stats.bytes_sent += (int64_t)(bytes);                                                   \
        d->stats.calls++;                                                                          \
        if (rc_ != MPI_SUCCESS) return comm_err(fn, #call, rc_);                                   \
    } while (0)

static pl_status check_params(const pl_mpi *d, const char *fn) {
    if (pl_param_count(d->ctx) != d->n_params)
        return pl_set_error(PL_ERR_STATE, "%s: the context has %d parameters, %d at pl_mpi_new", fn,
                            pl_param_count(d->ctx), d->n_params);
    for (int i = 0; i < d->n_params; i++)
        if (pl_param_at(d->ctx, i) != d->params[i] ||
            d->params[i]->numel != d->offset[i + 1] - d->offset[i])
            return pl_set_error(PL_ERR_STATE, "%s: parameter %d changed since pl_mpi_new", fn, i);
    return PL_OK;
}

/* Copies flat elements [at, at+n) of the parameters' data (grad: their
 * gradients) to buf (to_buf) or from buf. */
static void flat_copy(const pl_mpi *d, int64_t at, int64_t n, float *buf, bool grad, bool to_buf) {
    int lo = 0, hi = d->n_params - 1;
    while (lo < hi) { /* the parameter holding `at`: last i with offset[i] <= at */
        int mid = (lo + hi + 1) / 2;
        if (d->offset[mid] <= at)
            lo = mid;
        else
            hi = mid - 1;
    }
    for (int i = lo; n > 0 && i < d->n_params; i++) {
        int64_t off = at - d->offset[i], len = d->offset[i + 1] - at;
        if (len > n) len = n;
        if (len <= 0) continue;
        float *p = grad ? d->params[i]->grad : pl_f32(d->params[i]);
        if (to_buf)
            memcpy(buf, p + off, (size_t)len * sizeof(float));
        else
            memcpy(p + off, buf, (size_t)len * sizeof(float));
        buf += len, at += len, n -= len;
    }
}

/* Bucket b: counts/displs of every rank's slice; returns the elements of this
 * rank's slice. */
static int bucket_layout(pl_mpi *d, int64_t b) {
    int pos = 0;
    for (int r = 0; r < d->size; r++) {
        int64_t len = d->shard_at[r + 1] - d->shard_at[r] - b * d->slice;
        if (len > d->slice) len = d->slice;
        if (len < 0) len = 0;
        d->counts[r] = (int)len;
        d->displs[r] = pos;
        pos += (int)len;
    }
    return d->counts[d->rank];
}

/* Rank r's slice of bucket b starts at this flat element. */
static int64_t slice_start(const pl_mpi *d, int r, int64_t b) {
    return d->shard_at[r] + b * d->slice;
}

pl_mpi *pl_mpi_new(pl_ctx *ctx, MPI_Comm comm, const pl_mpi_config *cfg) {
    static const char *fn = "pl_mpi_new";
    pl_mpi_config c = cfg ? *cfg : (pl_mpi_config){0, false};
    if (!ctx) return pl_set_error(PL_ERR_ARG, "%s: ctx is NULL", fn), NULL;
    if (c.bucket_bytes == 0) c.bucket_bytes = PL_MPI_BUCKET_BYTES;
    if (c.bucket_bytes < 4 || c.bucket_bytes % 4 || c.bucket_bytes > ((int64_t)1 << 31))
        return pl_set_error(PL_ERR_ARG,
                            "%s: bucket_bytes = %lld must be a multiple of 4 in [4, 2^31]", fn,
                            (long long)c.bucket_bytes),
               NULL;
    int n_params = pl_param_count(ctx);
    for (int i = 0; i < n_params; i++)
        if (pl_param_at(ctx, i)->dtype != PL_F32)
            return pl_set_error(PL_ERR_ARG, "%s: parameter %d is not float32", fn, i), NULL;
    pl_mpi *d = calloc(1, sizeof *d);
    if (!d) return pl_set_error(PL_ERR_NOMEM, "%s: out of memory", fn), NULL;
    d->comm = MPI_COMM_NULL;
    int rc = MPI_Comm_dup(comm, &d->comm);
    if (rc != MPI_SUCCESS) {
        comm_err(fn, "MPI_Comm_dup", rc);
        d->comm = MPI_COMM_NULL;
        goto fail;
    }
    MPI_Comm_set_errhandler(d->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(d->comm, &d->rank);
    MPI_Comm_size(d->comm, &d->size);
    d->ctx = ctx;
    d->zero = c.zero;
    d->n_params = n_params;
    int P = d->size;
    d->params = calloc((size_t)(n_params ? n_params : 1), sizeof *d->params);
    d->offset = calloc((size_t)n_params + 1, sizeof *d->offset);
    d->shard_at = calloc((size_t)P + 1, sizeof *d->shard_at);
    d->counts = calloc((size_t)P, sizeof *d->counts);
    d->displs = calloc((size_t)P, sizeof *d->displs);
    d->rcounts = calloc((size_t)P, sizeof *d->rcounts);
    d->rdispls = calloc((size_t)P, sizeof *d->rdispls);
    if (!d->params || !d->offset || !d->shard_at || !d->counts || !d->displs || !d->rcounts ||
        !d->rdispls)
        goto nomem;
    for (int i = 0; i < n_params; i++) {
        d->params[i] = pl_param_at(ctx, i);
        d->offset[i + 1] = d->offset[i] + d->params[i]->numel;
    }
    d->n = d->offset[n_params];
    for (int r = 0; r <= P; r++) d->shard_at[r] = d->n * r / P;
    int64_t e = c.bucket_bytes / 4, max_shard = d->shard_at[1] - d->shard_at[0];
    for (int r = 1; r < P; r++)
        if (d->shard_at[r + 1] - d->shard_at[r] > max_shard)
            max_shard = d->shard_at[r + 1] - d->shard_at[r];
    d->slice = (e + P - 1) / P;
    if (d->slice > max_shard) d->slice = max_shard > 0 ? max_shard : 1;
    d->buckets = (max_shard + d->slice - 1) / d->slice;
    size_t buf = (size_t)P * (size_t)d->slice;
    d->send = malloc(buf * sizeof(float));
    d->recv = malloc(buf * sizeof(float));
    if (!d->send || !d->recv) goto nomem;
    if (d->zero) {
        int64_t mine = d->shard_at[d->rank + 1] - d->shard_at[d->rank];
        if (!(d->gshard = calloc((size_t)(mine ? mine : 1), sizeof(float)))) goto nomem;
    }
    /* Every rank must see the same parameter count: a mismatch would make
     * the collectives disagree silently. */
    int64_t mine_n[2] = {d->n, -d->n}, agree[2];
    rc = MPI_Allreduce(mine_n, agree, 2, MPI_INT64_T, MPI_MAX, d->comm);
    if (rc != MPI_SUCCESS) {
        comm_err(fn, "MPI_Allreduce", rc);
        goto fail;
    }
    if (agree[0] != -agree[1]) {
        pl_set_error(PL_ERR_ARG,
                     "%s: the ranks' models differ: between %lld and %lld parameter elements", fn,
                     (long long)-agree[1], (long long)agree[0]);
        goto fail;
    }
    return d;
nomem:
    pl_set_error(PL_ERR_NOMEM, "%s: out of memory (%lld parameter elements, %d ranks)", fn,
                 (long long)d->n, d->size);
fail:
    pl_mpi_free(d);
    return NULL;
}

void pl_mpi_free(pl_mpi *d) {
    if (!d) return;
    if (d->comm != MPI_COMM_NULL) MPI_Comm_free(&d->comm);
    free(d->params), free(d->offset), free(d->shard_at), free(d->counts), free(d->displs);
    free(d->rcounts), free(d->rdispls);
    free(d->send), free(d->recv), free(d->gshard), free(d->scalars);
    free(d);
}

int pl_mpi_rank(const pl_mpi *d) { return d ? d->rank : 0; }
int pl_mpi_size(const pl_mpi *d) { return d ? d->size : 1; }
void pl_mpi_shard(const pl_mpi *d, int64_t *begin, int64_t *end) {
    *begin = d ? d->shard_at[d->rank] : 0;
    *end = d ? d->shard_at[d->rank + 1] : 0;
}
pl_mpi_stats pl_mpi_get_stats(const pl_mpi *d) { return d ? d->stats : (pl_mpi_stats){0, 0, 0}; }
void pl_mpi_reset_stats(pl_mpi *d) {
    if (d) d->stats = (pl_mpi_stats){0, 0, 0};
}

pl_status pl_mpi_broadcast_params(pl_mpi *d, int root) {
    static const char *fn = "pl_mpi_broadcast_params";
    if (!d) return pl_set_error(PL_ERR_ARG, "%s: d is NULL", fn);
    if (root < 0 || root >= d->size)
        return pl_set_error(PL_ERR_ARG, "%s: root %d is not a rank of %d", fn, root, d->size);
    pl_status s = check_params(d, fn);
    if (s) return s;
    const int64_t chunk = (int64_t)d->size * d->slice;
    for (int64_t at = 0; at < d->n; at += chunk) {
        int len = (int)(d->n - at < chunk ? d->n - at : chunk);
        if (d->rank == root) flat_copy(d, at, len, d->send, false, true);
        MPI_CALL(fn, d->rank == root ? (int64_t)len * 4 * (d->size - 1) : 0,
                 MPI_Bcast(d->send, len, MPI_FLOAT, root, d->comm));
        if (d->rank != root) flat_copy(d, at, len, d->send, false, false);
    }
    return PL_OK;
}

pl_status pl_mpi_allreduce_grads(pl_mpi *d) {
    static const char *fn = "pl_mpi_allreduce_grads";
    if (!d) return pl_set_error(PL_ERR_ARG, "%s: d is NULL", fn);
    pl_status s = check_params(d, fn);
    if (s) return s;
    for (int i = 0; i < d->n_params; i++)
        if (!d->params[i]->grad)
            return pl_set_error(PL_ERR_STATE, "%s: parameter %d has no gradient buffer", fn, i);
    const int P = d->size, me = d->rank;
    double sumsq = 0;
    d->reduced = false;
    for (int64_t b = 0; b < d->buckets; b++) {
        int mine = bucket_layout(d, b), total = d->displs[P - 1] + d->counts[P - 1];
        /* send: every rank's slice of my gradient, in rank order */
        for (int r = 0; r < P; r++)
            flat_copy(d, slice_start(d, r, b), d->counts[r], d->send + d->displs[r], true, true);
        /* recv[r*mine ..]: rank r's copy of my slice */
        for (int r = 0; r < P; r++) d->rcounts[r] = mine, d->rdispls[r] = r * mine;
        MPI_CALL(fn, (int64_t)(total - mine) * 4,
                 MPI_Alltoallv(d->send, d->counts, d->displs, MPI_FLOAT, d->recv, d->rcounts,
                               d->rdispls, MPI_FLOAT, d->comm));
        /* The mean of my slice: ranks added in order, in double, one rounding. */
        float *out = d->zero ? d->gshard + b * d->slice : d->send + d->displs[me];
        for (int j = 0; j < mine; j++) {
            double acc = 0;
            for (int r = 0; r < P; r++) acc += (double)d->recv[(int64_t)r * mine + j];
            float g = (float)(acc / P);
            out[j] = g;
            sumsq += (double)g * g;
        }
        if (!d->zero) {
            MPI_CALL(fn, (int64_t)mine * 4 * (P - 1),
                     MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, d->send, d->counts, d->displs,
                                    MPI_FLOAT, d->comm));
            for (int r = 0; r < P; r++)
                flat_copy(d, slice_start(d, r, b), d->counts[r], d->send + d->displs[r], true,
                          false);
        }
    }
    d->sumsq = sumsq;
    d->reduced = true;
    return PL_OK;
}

pl_status pl_mpi_allreduce_sum(pl_mpi *d, double *values, int n) {
    static const char *fn = "pl_mpi_allreduce_sum";
    if (!d) return pl_set_error(PL_ERR_ARG, "%s: d is NULL", fn);
    if (n < 0 || (n > 0 && !values))
        return pl_set_error(PL_ERR_ARG, "%s: n = %d, values %s", fn, n, values ? "set" : "NULL");
    if (n == 0) return PL_OK;
    if (n > d->cap_scalars) {
        double *s = realloc(d->scalars, (size_t)n * (size_t)d->size * sizeof *s);
        if (!s) return pl_set_error(PL_ERR_NOMEM, "%s: out of memory", fn);
        d->scalars = s;
        d->cap_scalars = n;
    }
    MPI_CALL(fn, (int64_t)n * 8 * (d->size - 1),
             MPI_Allgather(values, n, MPI_DOUBLE, d->scalars, n, MPI_DOUBLE, d->comm));
    for (int i = 0; i < n; i++) {
        double acc = 0;
        for (int r = 0; r < d->size; r++) acc += d->scalars[(size_t)r * (size_t)n + (size_t)i];
        values[i] = acc;
    }
    return PL_OK;
}

double pl_mpi_clip_grad_norm(pl_mpi *d, double max_norm, pl_status *status) {
    static const char *fn = "pl_mpi_clip_grad_norm";
    pl_status dummy;
    if (!status) status = &dummy;
    if (!d) return *status = pl_set_error(PL_ERR_ARG, "%s: d is NULL", fn), -1.0;
    if (!(max_norm >= 0))
        return *status = pl_set_error(PL_ERR_ARG, "%s: max_norm = %g must be >= 0", fn, max_norm),
               -1.0;
    if (!d->reduced)
        return *status = pl_set_error(PL_ERR_STATE, "%s: call pl_mpi_allreduce_grads first", fn),
               -1.0;
    double total = d->sumsq;
    if ((*status = pl_mpi_allreduce_sum(d, &total, 1))) return -1.0;
    const double norm = sqrt(total);
    const double coef = max_norm / (norm + 1e-6);
    if (isfinite(norm) && coef < 1.0) {
        const float cf = (float)coef;
        if (d->zero) {
            int64_t n = d->shard_at[d->rank + 1] - d->shard_at[d->rank];
            for (int64_t j = 0; j < n; j++) d->gshard[j] *= cf;
        } else {
            for (int i = 0; i < d->n_params; i++) {
                float *g = d->params[i]->grad;
                for (int64_t j = 0; j < d->params[i]->numel; j++) g[j] *= cf;
            }
        }
    }
    return norm;
}

/* ---- ZeRO-1 ---- */

pl_mpi_zero *pl_mpi_zero_new(pl_mpi *d, const pl_adamw_config *cfg) {
    static const char *fn = "pl_mpi_zero_new";
    if (!d) return pl_set_error(PL_ERR_ARG, "%s: d is NULL", fn), NULL;
    if (!d->zero)
        return pl_set_error(PL_ERR_ARG, "%s: d was made without pl_mpi_config.zero", fn), NULL;
    pl_adamw_config c = cfg ? *cfg : pl_adamw_default_config();
    /* pl_adamw_update checks the configuration; a 0-element dry run does it now. */
    if (pl_adamw_update(&c, 1, NULL, NULL, NULL, NULL, 0)) return NULL;
    pl_mpi_zero *z = calloc(1, sizeof *z);
    int64_t n = d->shard_at[d->rank + 1] - d->shard_at[d->rank];
    if (z) {
        z->m = calloc((size_t)(n ? n : 1), sizeof(float));
        z->v = calloc((size_t)(n ? n : 1), sizeof(float));
    }
    if (!z || !z->m || !z->v) {
        pl_mpi_zero_free(z);
        return pl_set_error(PL_ERR_NOMEM, "%s: out of memory (%lld-element shard)", fn,
                            (long long)n),
               NULL;
    }
    z->d = d;
    z->cfg = c;
    return z;
}

void pl_mpi_zero_free(pl_mpi_zero *z) {
    if (!z) return;
    pl_mpi_zero_release_state(z);
    free(z->m), free(z->v), free(z);
}

int64_t pl_mpi_zero_get_step(const pl_mpi_zero *z) { return z ? z->step : 0; }

pl_status pl_mpi_zero_set_lr(pl_mpi_zero *z, double lr) {
    if (!z) return pl_set_error(PL_ERR_ARG, "pl_mpi_zero_set_lr: z is NULL");
    pl_adamw_config c = z->cfg;
    c.lr = lr;
    pl_status s = pl_adamw_update(&c, 1, NULL, NULL, NULL, NULL, 0);
    if (s) return s;
    z->cfg = c;
    return PL_OK;
}

pl_status pl_mpi_zero_step(pl_mpi_zero *z) {
    static const char *fn = "pl_mpi_zero_step";
    if (!z) return pl_set_error(PL_ERR_ARG, "%s: z is NULL", fn);
    pl_mpi *d = z->d;
    pl_status s = check_params(d, fn);
    if (s) return s;
    if (!d->reduced) return pl_set_error(PL_ERR_STATE, "%s: call pl_mpi_allreduce_grads first", fn);
    if (z->step >= INT32_MAX) return pl_set_error(PL_ERR_STATE, "%s: step count overflows", fn);
    const int64_t t = z->step + 1, begin = d->shard_at[d->rank], end = d->shard_at[d->rank + 1];
    /* The shard, parameter by parameter, in place. */
    for (int i = 0; i < d->n_params; i++) {
        int64_t lo = d->offset[i] > begin ? d->offset[i] : begin;
        int64_t hi = d->offset[i + 1] < end ? d->offset[i + 1] : end;
        if (lo >= hi) continue;
        int64_t k = lo - begin;
        if ((s = pl_adamw_update(&z->cfg, t, pl_f32(d->params[i]) + (lo - d->offset[i]),
                                 d->gshard + k, z->m + k, z->v + k, hi - lo)))
            return s;
    }
    /* All-gather the updated parameters, bucket by bucket. */
    const int P = d->size;
    for (int64_t b = 0; b < d->buckets; b++) {
        int mine = bucket_layout(d, b);
        flat_copy(d, slice_start(d, d->rank, b), mine, d->send + d->displs[d->rank], false, true);
        MPI_CALL(fn, (int64_t)mine * 4 * (P - 1),
                 MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, d->send, d->counts, d->displs,
                                MPI_FLOAT, d->comm));
        for (int r = 0; r < P; r++)
            if (r != d->rank)
                flat_copy(d, slice_start(d, r, b), d->counts[r], d->send + d->displs[r], false,
                          false);
    }
    z->step = t;
    d->reduced = false;
    return PL_OK;
}

/* "adamw.<kind>.<param name or #index>", as lib/optim.c names its state. */
static void state_name(char *buf, size_t size, const char *kind, const pl_tensor *p, int i) {
    if (p->name)
        snprintf(buf, size, "adamw.%s.%s", kind, p->name);
    else
        snprintf(buf, size, "adamw.%s.#%d", kind, i);
}

pl_status pl_mpi_zero_gather_state(pl_mpi_zero *z, int root) {
    static const char *fn = "pl_mpi_zero_gather_state";
    if (!z) return pl_set_error(PL_ERR_ARG, "%s: z is NULL", fn);
    pl_mpi *d = z->d;
    if (root < 0 || root >= d->size)
        return pl_set_error(PL_ERR_ARG, "%s: root %d is not a rank of %d", fn, root, d->size);
    pl_status s = check_params(d, fn);
    if (s) return s;
    const bool am_root = d->rank == root;
    pl_tensor *step = NULL;
    if (am_root) {
        /* Find or create the full-size tensors (kept until release_state). */
        if (!z->full) {
            z->full = calloc((size_t)2 * (size_t)d->n_params + 1, sizeof *z->full);
            if (!z->full) return pl_set_error(PL_ERR_NOMEM, "%s: out of memory", fn);
        }
        char name[512];
        for (int i = 0; i < 2 * d->n_params + 1; i++) {
            pl_tensor *p = d->params[i < 2 * d->n_params ? i / 2 : 0];
            bool is_step = i == 2 * d->n_params;
            if (is_step)
                snprintf(name, sizeof name, "adamw.step");
            else
                state_name(name, sizeof name, i % 2 ? "v" : "m", p, i / 2);
            pl_tensor *t = pl_persistent_find(d->ctx, name);
            bool fits = t && (is_step ? t->dtype == PL_I32 && t->numel == 1
                                      : t->dtype == PL_F32 && pl_same_shape(t, p));
            if (t && !fits)
                return pl_set_error(PL_ERR_STATE, "%s: '%s' exists with another dtype or shape", fn,
                                    name);
            if (!t) {
                t = is_step ? pl_persistent_new(d->ctx, name, PL_I32, PL_DIMS(1), false)
                            : pl_persistent_new(d->ctx, name, PL_F32, p->ndim, p->shape, false);
                if (!t) return pl_last_status();
                z->full[z->n_full++] = t;
            }
            if (is_step) step = t;
        }
    }
    const int P = d->size;
    for (int kind = 0; kind < 2; kind++) {
        const float *mine_state = kind ? z->v : z->m;
        for (int64_t b = 0; b < d->buckets; b++) {
            int mine = bucket_layout(d, b);
            MPI_CALL(fn, am_root ? 0 : (int64_t)mine * 4,
                     MPI_Gatherv(mine_state + b * d->slice, mine, MPI_FLOAT, d->recv, d->counts,
                                 d->displs, MPI_FLOAT, root, d->comm));
            if (!am_root) continue;
            for (int r = 0; r < P; r++) { /* scatter slice r into the named tensors */
                int64_t at = slice_start(d, r, b), n = d->counts[r];
                const float *src = d->recv + d->displs[r];
                for (int i = 0; i < d->n_params && n > 0; i++) {
                    if (d->offset[i + 1] <= at) continue;
                    char name[512];
                    state_name(name, sizeof name, kind ? "v" : "m", d->params[i], i);
                    float *dst = pl_f32(pl_persistent_find(d->ctx, name));
                    int64_t off = at - d->offset[i], len = d->offset[i + 1] - at;
                    if (len > n) len = n;
                    memcpy(dst + off, src, (size_t)len * sizeof(float));
                    src += len, at += len, n -= len;
                }
            }
        }
    }
    if (am_root) pl_i32(step)[0] = (int32_t)z->step;
    return PL_OK;
}

void pl_mpi_zero_release_state(pl_mpi_zero *z) {
    if (!z || !z->full) return;
    for (int i = 0; i < z->n_full; i++) pl_tensor_free(z->full[i]);
    free(z->full);
    z->full = NULL;
    z->n_full = 0;
}

pl_status pl_mpi_zero_load_state(pl_mpi_zero *z) {
    static const char *fn = "pl_mpi_zero_load_state";
    if (!z) return pl_set_error(PL_ERR_ARG, "%s: z is NULL", fn);
    pl_mpi *d = z->d;
    pl_status s = check_params(d, fn);
    if (s) return s;
    pl_mpi_zero_release_state(z);
    pl_tensor *step = pl_persistent_find(d->ctx, "adamw.step");
    if (!step || step->dtype != PL_I32 || step->numel != 1 || pl_i32(step)[0] < 0)
        return pl_set_error(PL_ERR_STATE, "%s: no valid int32 [1] tensor 'adamw.step'", fn);
    const int64_t begin = d->shard_at[d->rank], end = d->shard_at[d->rank + 1];
    char name[512];
    /* Check everything first, so that a failure leaves z unchanged. */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < d->n_params; i++) {
            for (int kind = 0; kind < 2; kind++) {
                state_name(name, sizeof name, kind ? "v" : "m", d->params[i], i);
                pl_tensor *t = pl_persistent_find(d->ctx, name);
                if (pass == 0) {
                    if (!t || t->dtype != PL_F32 || !pl_same_shape(t, d->params[i]))
                        return pl_set_error(PL_ERR_STATE,
                                            "%s: '%s' is missing or not float32 of its "
                                            "parameter's shape",
                                            fn, name);
                    continue;
                }
                int64_t lo = d->offset[i] > begin ? d->offset[i] : begin;
                int64_t hi = d->offset[i + 1] < end ? d->offset[i + 1] : end;
                if (lo < hi)
                    memcpy((kind ? z->v : z->m) + (lo - begin), pl_f32(t) + (lo - d->offset[i]),
                           (size_t)(hi - lo) * sizeof(float));
                pl_tensor_free(t);
            }
        }
    }
    z->step = pl_i32(step)[0];
    pl_tensor_free(step);
    return PL_OK;
}
