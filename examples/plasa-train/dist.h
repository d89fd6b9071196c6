/* Data-parallel training of plasa-train under mpirun (docs/distributed.md).
 *
 * dist.c implements this with plasa_mpi and is built only when plasa_mpi is;
 * dist_none.c is the single-process build (rank 0 of 1, every call a no-op),
 * so train.c reads the same either way and the one-process trainer behaves
 * exactly as before.
 *
 * Under mpirun every rank runs the whole program on the same flags: rank r of
 * P trains on rows [r*B/P, (r+1)*B/P) of every global batch of --batch B
 * rows, evaluates every P-th evaluation batch, and the results are summed
 * over ranks; rank 0 alone prints progress and results and writes files (the
 * other ranks' stdout and stderr go to /dev/null, except their error
 * messages). An error on any rank prints its message and ends every rank
 * (MPI_Abort), so a run never hangs on a rank that left. */
#ifndef PLASA_TRAIN_DIST_H
#define PLASA_TRAIN_DIST_H

#include <stdbool.h>
#include <stdint.h>

#include "cli.h"
#include "model.h"

/* main() first: joins the MPI job when launched by mpirun/mpiexec. */
void dist_init(int *argc, char ***argv);
/* The end of main(): MPI_Finalize. Returns rc. */
int dist_finish(int rc);
int dist_rank(void);
int dist_size(void);
/* Prints "plasa-train: error: msg" (with the rank under MPI) on the real
 * stderr; under MPI then ends every rank with status rc and does not return. */
void dist_fail(const char *msg, int rc);
/* The next dist_fail is reached by every rank with the same cause (the
 * ranks agreed on it, e.g. a signal): rank 0 prints, every rank leaves MPI
 * in order (MPI_Finalize) and exits with rc, without MPI_Abort. */
void dist_fail_is_collective(void);
/* Flags that need MPI, and --batch divisible by the ranks. 0 or -1 (message). */
int dist_check_config(const tr_config *cfg);
/* Rank 0 first, then the others (they reuse what it cached): brackets data
 * preparation. dist_serial_begin/end are called by every rank. */
void dist_serial_begin(void);
void dist_serial_end(void);
/* After model_create and any checkpoint load: rank 0's parameters to all,
 * the model's update hook and row offset set. 0 or -1. */
int dist_attach(tr_model *m, const tr_config *cfg);
void dist_detach(void);
/* values[0..n) summed over ranks (rank order, the same bits everywhere). */
int dist_sum(double *values, int n);
/* Every rank: writes the checkpoint (rank 0 writes; ZeRO state gathered). */
int dist_save(tr_model *m, const char *path, int64_t steps_done);
/* --check-replicas: fails unless all ranks hold bit-identical parameters. */
int dist_check_replicas(tr_model *m, int64_t step);
/* Seconds inside MPI and bytes this rank sent, since dist_attach. */
void dist_stats(double *seconds, int64_t *bytes);

#endif
