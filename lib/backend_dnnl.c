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

pl_status pl__gemm_s8(int64_t M, int64_t N, int64_t K, const int8_t *A, int64_t lda,
                      const int8_t *B, int64_t ldb, int32_t *C, int64_t ldc) {
    if (M == 0 || N == 0) return PL_OK;
    const int32_t co = 0;
    dnnl_status_t st =
        dnnl_gemm_s8s8s32('N', 'T', 'F', M, N, K, 1.0f, A, lda, 0, B, ldb, 0, 0.0f, C, ldc, &co);
    if (st != dnnl_success)
        return pl__err(PL_ERR_BACKEND,
                       "oneDNN s8s8s32 gemm failed (status %d) for M=%lld N=%lld K=%lld", (int)st,
                       (long long)M, (long long)N, (long long)K);
    return PL_OK;
}

const char *pl__dnnl_isa(void) {
    switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx512_mic: return "avx512_mic";
    case dnnl_cpu_isa_avx512_mic_4ops: return "avx512_mic_4ops";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    default: return "other";
    }
}
