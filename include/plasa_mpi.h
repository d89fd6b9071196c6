/* plasa_mpi: data-parallel training of a libplasa context over MPI.
 *
 * A separate library (libplasa_mpi, pkg-config plasa-mpi, CMake option
 * PLASA_MPI) on top of libplasa; the core library never links MPI. Every
 * process (rank) holds the whole model in its own pl_ctx, computes the
 * gradient of its share of the batch, and these functions keep the replicas
 * equal:
 *
 *   MPI_Init(&argc, &argv);
 *   pl_mpi *d = pl_mpi_new(ctx, MPI_COMM_WORLD, NULL);   // after the params exist
 *   pl_mpi_broadcast_params(d, 0);                        // rank 0's initial values
 *   per step:
 *       forward + pl_backward on this rank's rows
 *       pl_mpi_allreduce_grads(d);                        // mean over ranks
 *       pl_mpi_clip_grad_norm(d, 1.0, &st);               // the global norm
 *       pl_adamw_step(opt);            // or, with cfg.zero: pl_mpi_zero_step(z)
 *       pl_mpi_allreduce_sum(d, &loss_sum, 1);            // scalars for reporting
 *   pl_mpi_free(d); MPI_Finalize();
 *
 * Layout. The gradients of the context's parameters (pl_param_at order) form
 * one flat vector of N floats. Rank r owns the contiguous shard
 * [N*r/P, N*(r+1)/P) of it (P ranks). A bucket is the b-th slice of
 * ceil(E/P) elements of every shard (E = bucket_bytes/4), so one bucket
 * moves about bucket_bytes per rank and there are ceil(N/E) collectives per
 * step whatever the number of tensors.
 *
 * Reduction. A bucket is reduced by MPI_Alltoallv (each rank receives every
 * rank's copy of its own slice), a sum in rank order 0, 1, ..., P-1 in
 * double and one rounding to float of sum/P, then (without ZeRO)
 * MPI_Allgatherv of the reduced slices. So every element's mean is the same
 * arithmetic on the same numbers whatever bucket_bytes is and whichever MPI
 * algorithm runs: results do not depend on bucketing (tests/mpi), and all
 * ranks get bit-identical gradients. The bytes moved equal a ring
 * all-reduce's: (P-1)/P of the bucket out and in, twice.
 *
 * ZeRO stage 1 (cfg.zero): gradients are only reduce-scattered; each rank
 * keeps AdamW moments for its shard alone (2*N/P floats instead of 2*N),
 * updates its shard of the parameters with pl_adamw_update (the element code
 * of pl_adamw_step) and the updated shards are all-gathered. The parameters
 * after pl_mpi_zero_step are bit-identical to pl_mpi_allreduce_grads +
 * pl_adamw_step. pl_mpi_zero_gather_state puts the whole state on one rank
 * under pl_adamw's tensor names for a checkpoint, so a checkpoint does not
 * depend on the number of ranks; pl_mpi_zero_load_state takes its shard back
 * from those tensors (after pl_checkpoint_restore with PL_CKPT_CREATE_EXTRA),
 * with any number of ranks.
 *
 * Every function here is collective over the communicator: all ranks call
 * it, in the same order, with the same arguments (root, n, max_norm). The
 * communicator is duplicated, so this traffic never mixes with the
 * embedder's. Errors: PL_ERR_COMM with MPI's message when MPI fails (errors
 * return on the duplicate, MPI_ERRORS_RETURN), PL_ERR_STATE when the
 * context's parameters changed since pl_mpi_new. An error on one rank is not
 * seen by the others: the embedder decides (MPI_Abort after printing the
 * message is what plasa-train does). No allocation per step. */
#ifndef PLASA_MPI_H
#define PLASA_MPI_H

#include <mpi.h>

#include "plasa.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pl_mpi pl_mpi;

typedef struct {
    int64_t bucket_bytes; /* bytes of gradient per bucket; 0: 8 MiB (PL_MPI_BUCKET_BYTES) */
    bool zero;            /* ZeRO-1: shard the AdamW state (pl_mpi_zero_*) */
} pl_mpi_config;

#define PL_MPI_BUCKET_BYTES ((int64_t)8 << 20)

/* Takes the context's current parameters as the flat vector (they must not
 * change afterwards). NULL cfg: defaults. Collective. NULL + message on
 * error (PL_ERR_ARG: bucket_bytes < 4 or not a multiple of 4, a non-float
 * parameter; PL_ERR_COMM). */
PL_API pl_mpi *pl_mpi_new(pl_ctx *ctx, MPI_Comm comm, const pl_mpi_config *cfg);
/* Collective (MPI_Comm_free of the duplicate). */
PL_API void pl_mpi_free(pl_mpi *d);
PL_API int pl_mpi_rank(const pl_mpi *d);
PL_API int pl_mpi_size(const pl_mpi *d);
/* [*begin, *end): this rank's shard of the flat vector. */
PL_API void pl_mpi_shard(const pl_mpi *d, int64_t *begin, int64_t *end);

/* Every parameter takes root's values. */
PL_API pl_status pl_mpi_broadcast_params(pl_mpi *d, int root);

/* Gradients become their mean over the ranks (see Reduction). With
 * cfg.zero, only this rank's shard of the mean is formed (kept inside d for
 * pl_mpi_clip_grad_norm and pl_mpi_zero_step); the parameters' grad
 * buffers are left as they were. */
PL_API pl_status pl_mpi_allreduce_grads(pl_mpi *d);

/* values[0..n) become their sum over ranks, added in rank order in double,
 * so every rank gets the same bits (loss sums, token counts, ...). */
PL_API pl_status pl_mpi_allreduce_sum(pl_mpi *d, double *values, int n);

/* pl_clip_grad_norm on the reduced gradient after pl_mpi_allreduce_grads:
 * the L2 norm of the whole mean gradient (each rank's shard summed in
 * element order in double, then the shards in rank order: identical on all
 * ranks, with and without ZeRO, and independent of bucketing), and when
 * coef = max_norm / (norm + 1e-6) < 1 the (sharded) gradient is multiplied by
 * coef rounded to float. max_norm = INFINITY only measures. Returns the
 * norm, or -1 and *status on error. */
PL_API double pl_mpi_clip_grad_norm(pl_mpi *d, double max_norm, pl_status *status);

/* ZeRO-1 AdamW over the shard of d (made with cfg.zero); cfg as for
 * pl_adamw_new (NULL: defaults). Moments start at zero, step at 0. */
typedef struct pl_mpi_zero pl_mpi_zero;
PL_API pl_mpi_zero *pl_mpi_zero_new(pl_mpi *d, const pl_adamw_config *cfg);
PL_API void pl_mpi_zero_free(pl_mpi_zero *z);
/* After pl_mpi_allreduce_grads (and clipping): updates this rank's shard of
 * the parameters from its shard of the mean gradient, then all-gathers the
 * parameters. Collective. */
PL_API pl_status pl_mpi_zero_step(pl_mpi_zero *z);
PL_API int64_t pl_mpi_zero_get_step(const pl_mpi_zero *z);
PL_API pl_status pl_mpi_zero_set_lr(pl_mpi_zero *z, double lr);
/* Collective. On root: the whole state as persistent tensors of the context
 * named as pl_adamw names them ("adamw.m.<param>", "adamw.v.<param>",
 * "adamw.step"), created if absent, so pl_checkpoint_save writes a
 * checkpoint any pl_adamw or pl_mpi_zero run can resume. Other ranks only
 * send. */
PL_API pl_status pl_mpi_zero_gather_state(pl_mpi_zero *z, int root);
/* Frees those full-size tensors again (on the rank that holds them); local. */
PL_API void pl_mpi_zero_release_state(pl_mpi_zero *z);
/* Takes this rank's shard of the moments and the step from the context's
 * "adamw.*" tensors (restored from a checkpoint on every rank, e.g. with
 * pl_checkpoint_restore(ctx, st, PL_CKPT_CREATE_EXTRA)), then frees them.
 * Not collective. PL_ERR_STATE if a tensor is missing or of another shape. */
PL_API pl_status pl_mpi_zero_load_state(pl_mpi_zero *z);

/* Communication counters since pl_mpi_new (or the last reset): seconds
 * inside MPI calls, bytes this rank sent in them, and collectives made. */
typedef struct {
    double seconds;
    int64_t bytes_sent;
    int64_t calls;
} pl_mpi_stats;
PL_API pl_mpi_stats pl_mpi_get_stats(const pl_mpi *d);
PL_API void pl_mpi_reset_stats(pl_mpi *d);

#ifdef __cplusplus
}
#endif
#endif
