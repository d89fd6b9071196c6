/* dist.h under MPI with plasa_mpi (built only when plasa_mpi is). A program
 * started without mpirun (no launcher variables in its environment) runs as
 * one process exactly as dist_none.c does. */
#define _POSIX_C_SOURCE 200809L /* dup, dprintf */
#include "dist.h"

#include <fcntl.h>
#include <plasa_mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

static struct {
    bool active; /* MPI_Init was called */
    int rank, size;
    int err_fd; /* the real stderr (ranks > 0 send stdout and stderr to /dev/null) */
    pl_mpi *d;
    pl_mpi_zero *z;
    tr_model *m;
    float *scratch; /* --check-replicas */
    int64_t scratch_n;
    bool collective; /* dist_fail_is_collective */
} g = {false, 0, 1, 2, NULL, NULL, NULL, NULL, 0, false};

void dist_init(int *argc, char ***argv) {
    /* Set by Open MPI's mpirun, by MPICH's hydra (PMI_*) and by PMIx launchers. */
    static const char *vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"};
    bool launched = false;
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) launched |= getenv(vars[i]) != NULL;
    if (!launched) return;
    MPI_Init(argc, argv);
    g.active = true;
    MPI_Comm_rank(MPI_COMM_WORLD, &g.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g.size);
    if (g.rank != 0) { /* rank 0 alone prints; the others keep stderr for errors */
        g.err_fd = dup(STDERR_FILENO);
        int nul = open("/dev/null", O_WRONLY);
        if (g.err_fd < 0 || nul < 0) {
            fprintf(stderr, "plasa-train: error: rank %d: cannot open /dev/null\n", g.rank);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        fflush(stdout);
        dup2(nul, STDOUT_FILENO);
        dup2(nul, STDERR_FILENO);
        close(nul);
    }
}

int dist_finish(int rc) {
    if (g.active) {
        if (rc) MPI_Abort(MPI_COMM_WORLD, rc);
        MPI_Finalize();
        if (g.err_fd != STDERR_FILENO) close(g.err_fd);
    }
    return rc;
}

int dist_rank(void) { return g.rank; }
int dist_size(void) { return g.size; }

void dist_fail(const char *msg, int rc) {
    if (!g.active) {
        fprintf(stderr, "plasa-train: error: %s\n", msg);
        return;
    }
    fflush(stdout);
    if (g.collective) { /* every rank is here: leave MPI in order */
        if (g.rank == 0) fprintf(stderr, "plasa-train: error: %s\n", msg);
        fflush(stderr);
        dist_detach();
        MPI_Finalize();
        exit(rc ? rc : 1);
    }
    dprintf(g.err_fd, "plasa-train: error: %s (rank %d of %d)\n", msg, g.rank, g.size);
    MPI_Abort(MPI_COMM_WORLD, rc ? rc : 1);
    exit(rc ? rc : 1); /* not reached */
}

void dist_fail_is_collective(void) { g.collective = true; }

int dist_check_config(const tr_config *cfg) {
    if (!g.active) {
        if (cfg->zero || cfg->check_replicas)
            return tr_fail("--%s needs plasa-train to be started by mpirun",
                           cfg->zero ? "zero" : "check-replicas");
        return 0;
    }
    if (cfg->batch % g.size)
        return tr_fail("--batch %d is not divisible by the %d ranks (each rank takes batch/ranks "
                       "rows of every global batch)",
                       cfg->batch, g.size);
    return 0;
}

void dist_serial_begin(void) {
    if (g.active && g.rank != 0) MPI_Barrier(MPI_COMM_WORLD);
}
void dist_serial_end(void) {
    if (g.active && g.rank == 0) MPI_Barrier(MPI_COMM_WORLD);
}

static int fail_mpi(const char *what) { return tr_fail("%s: %s", what, pl_last_error()); }

/* The model's update hook: the gradient mean, global-norm clipping, AdamW
 * (replicated, or ZeRO-1 on this rank's shard then all-gathered). */
static int update(void *user, double clip) {
    (void)user;
    pl_status st = pl_mpi_allreduce_grads(g.d);
    if (!st && clip > 0) pl_mpi_clip_grad_norm(g.d, clip, &st);
    if (!st) st = g.z ? pl_mpi_zero_step(g.z) : pl_adamw_step(model_optimizer(g.m));
    return st ? fail_mpi("optimiser step") : 0;
}

int dist_attach(tr_model *m, const tr_config *cfg) {
    if (!g.active) return 0;
    pl_ctx *ctx = model_ctx(m);
    pl_mpi_config c = {0, cfg->zero};
    if (!(g.d = pl_mpi_new(ctx, MPI_COMM_WORLD, &c))) return fail_mpi("MPI");
    g.m = m;
    if (cfg->zero) {
        pl_adamw_config oc = model_adamw_config(cfg);
        if (!(g.z = pl_mpi_zero_new(g.d, &oc))) return fail_mpi("MPI");
        /* Resumed: the checkpoint's whole state was restored as plain tensors. */
        if (pl_persistent_find(ctx, "adamw.step") && pl_mpi_zero_load_state(g.z))
            return fail_mpi(cfg->resume ? cfg->resume : "optimiser state");
    }
    if (pl_mpi_broadcast_params(g.d, 0)) return fail_mpi("MPI");
    model_set_update(m, update, NULL);
    model_set_row_offset(m, (int64_t)g.rank * (cfg->batch / g.size));
    pl_mpi_reset_stats(g.d);
    return 0;
}

void dist_detach(void) {
    if (g.m) model_set_update(g.m, NULL, NULL);
    pl_mpi_zero_free(g.z);
    pl_mpi_free(g.d);
    free(g.scratch);
    g.z = NULL, g.d = NULL, g.m = NULL, g.scratch = NULL, g.scratch_n = 0;
}

int dist_sum(double *values, int n) {
    if (!g.active) return 0;
    return pl_mpi_allreduce_sum(g.d, values, n) ? fail_mpi("MPI") : 0;
}

int dist_save(tr_model *m, const char *path, int64_t steps_done) {
    if (!g.active) return model_save(m, path, steps_done);
    if (g.z && pl_mpi_zero_gather_state(g.z, 0)) return fail_mpi("gathering the optimiser state");
    int rc = g.rank == 0 ? model_save(m, path, steps_done) : 0;
    if (g.z) pl_mpi_zero_release_state(g.z);
    return rc;
}

int dist_check_replicas(tr_model *m, int64_t step) {
    if (!g.active) return 0;
    pl_ctx *ctx = model_ctx(m);
    int differ = 0;
    for (int i = 0; i < pl_param_count(ctx); i++) {
        pl_tensor *p = pl_param_at(ctx, i);
        if (p->numel > g.scratch_n) {
            float *s = realloc(g.scratch, (size_t)p->numel * sizeof(float));
            if (!s) return tr_fail("out of memory (--check-replicas)");
            g.scratch = s, g.scratch_n = p->numel;
        }
        if (g.rank == 0) memcpy(g.scratch, pl_f32(p), (size_t)p->numel * sizeof(float));
        if (MPI_Bcast(g.scratch, (int)p->numel, MPI_FLOAT, 0, MPI_COMM_WORLD) != MPI_SUCCESS)
            return tr_fail("--check-replicas: MPI_Bcast failed");
        differ += memcmp(g.scratch, pl_f32(p), (size_t)p->numel * sizeof(float)) != 0;
    }
    int total = 0;
    MPI_Allreduce(&differ, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (total)
        return tr_fail("--check-replicas: after step %lld, %d parameter tensor(s) of some rank "
                       "differ from rank 0's (%d here)",
                       (long long)step, total, differ);
    return 0;
}

void dist_stats(double *seconds, int64_t *bytes) {
    pl_mpi_stats s = pl_mpi_get_stats(g.d);
    *seconds = s.seconds;
    *bytes = s.bytes_sent;
}
