/* Per-op-family profile of a step (pl_profile_start / stop / read): wall time
 * of the outermost public op for the forward, and of each tape node's backward
 * for the backward, summed per family name. Off, it costs one branch per op. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "internal.h"

#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double pl__prof_begin(pl_ctx *ctx) {
    if (!ctx || !ctx->prof.on) return 0;
    return ctx->prof.depth++ ? 0 : now();
}

void pl__prof_end(pl_ctx *ctx, const char *family, double t0, bool bwd) {
    if (!ctx || !ctx->prof.on || ctx->prof.depth == 0) return;
    if (--ctx->prof.depth) return;
    double dt = now() - t0;
    pl__profile *p = &ctx->prof;
    int i = 0;
    while (i < p->n && p->slot[i].name != family && strcmp(p->slot[i].name, family)) i++;
    if (i == p->n) {
        if (p->n == PL__PROF_SLOTS) /* full: the last slot takes the rest */
            p->slot[--i].name = "other";
        else
            p->n++, p->slot[i] = (pl__prof_slot){family, 0, 0, 0, 0};
    }
    if (bwd)
        p->slot[i].bwd += dt, p->slot[i].nb++;
    else
        p->slot[i].fwd += dt, p->slot[i].nf++;
}

pl_status pl_profile_start(pl_ctx *ctx) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_profile_start: ctx is NULL");
    ctx->prof.on = true;
    ctx->prof.depth = 0;
    return PL_OK;
}

pl_status pl_profile_reset(pl_ctx *ctx) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_profile_reset: ctx is NULL");
    bool on = ctx->prof.on;
    memset(&ctx->prof, 0, sizeof ctx->prof);
    ctx->prof.on = on;
    return PL_OK;
}

pl_status pl_profile_stop(pl_ctx *ctx) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_profile_stop: ctx is NULL");
    ctx->prof.on = false;
    ctx->prof.depth = 0;
    return PL_OK;
}

int pl_profile_read(const pl_ctx *ctx, pl_profile_entry *out, int max) {
    if (!ctx) return pl__err(PL_ERR_ARG, "pl_profile_read: ctx is NULL"), -1;
    if (max < 0 || (max > 0 && !out))
        return pl__err(PL_ERR_ARG, "pl_profile_read: out is NULL or max (%d) < 0", max), -1;
    const pl__profile *p = &ctx->prof;
    for (int i = 0; i < p->n && i < max; i++)
        out[i] = (pl_profile_entry){p->slot[i].name, p->slot[i].fwd * 1e3, p->slot[i].bwd * 1e3,
                                    p->slot[i].nf, p->slot[i].nb};
    return p->n;
}
