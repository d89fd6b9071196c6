/* Matrix products go to oneDNN. dnnl_sgemm is row-major, threads with the
 * same OpenMP runtime as our kernels, and must not be called from inside an
 * OpenMP parallel region (it would run on one thread). */
#include "internal.h"

#include <dnnl.h>
#include <omp.h>

pl_status pl__sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                    int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    if (M == 0 || N == 0) return PL_OK;
    dnnl_status_t st =
        dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (st != dnnl_success)
        return pl__err(PL_ERR_BACKEND, "oneDNN sgemm failed (status %d) for M=%lld N=%lld K=%lld",
                       (int)st, (long long)M, (long long)N, (long long)K);
    return PL_OK;
}
