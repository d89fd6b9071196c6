/* A program outside the project that uses the installed plasa_mpi: on each
 * rank a parameter whose gradient is the rank number; after the all-reduce
 * every rank holds the mean, (P - 1) / 2. */
#include <math.h>
#include <plasa_mpi.h>
#include <stdio.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    pl_ctx *ctx = pl_ctx_new(NULL);
    pl_tensor *w = pl_param_new(ctx, "w", PL_DIMS(3));
    pl_mpi *d = w ? pl_mpi_new(ctx, MPI_COMM_WORLD, NULL) : NULL;
    int ok = d != NULL, rank = pl_mpi_rank(d), size = pl_mpi_size(d);
    for (int i = 0; ok && i < 3; i++) w->grad[i] = (float)rank;
    ok = ok && pl_mpi_allreduce_grads(d) == PL_OK;
    for (int i = 0; ok && i < 3; i++) ok = fabsf(w->grad[i] - (size - 1) / 2.0f) < 1e-6f;
    int all = 0;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    if (rank == 0)
        printf("consumer_mpi: %d ranks, mean gradient %g: %s\n", size, w->grad[0],
               all ? "ok" : "WRONG");
    pl_mpi_free(d);
    pl_ctx_free(ctx);
    MPI_Finalize();
    return all ? 0 : 1;
}
