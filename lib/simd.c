/* The run-time choice of kernel instruction set (see simd.h). */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

static int cpu_level = 0;    /* 0: not yet known */
static int env_level = 0;    /* PLASA_ISA, 0: none */
static int forced_level = 0; /* pl__isa_force, 0: none */

static int parse_level(const char *s) {
    if (!s || !*s) return 0;
    if (!strcmp(s, "avx512")) return PL_ISA_AVX512;
    if (!strcmp(s, "avx2")) return PL_ISA_AVX2;
    if (!strcmp(s, "baseline")) return PL_ISA_BASELINE;
    return 0; /* unknown names are ignored: the CPU's best level */
}

int pl__isa_cpu(void) {
    int l = __atomic_load_n(&cpu_level, __ATOMIC_RELAXED);
    if (l) return l;
#if defined(__x86_64__) && !defined(PL_NO_ISA_CLONES)
    __builtin_cpu_init();
    /* The kernels are built with -march=x86-64-v4 / -v3: the CPU must have
     * every feature of the level, not just the vector unit. */
#if defined(__clang__) /* no level names in clang's __builtin_cpu_supports */
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    const bool v3 = __builtin_cpu_supports("x86-64-v3"), v4 = __builtin_cpu_supports("x86-64-v4");
#endif
    l = v4 ? PL_ISA_AVX512 : v3 ? PL_ISA_AVX2 : PL_ISA_BASELINE;
#else
    l = PL_ISA_BASELINE;
#endif
    __atomic_store_n(&env_level, parse_level(getenv("PLASA_ISA")), __ATOMIC_RELAXED);
    __atomic_store_n(&cpu_level, l, __ATOMIC_RELAXED);
    return l;
}

int pl__isa(void) {
    int l = pl__isa_cpu();
    int e = __atomic_load_n(&env_level, __ATOMIC_RELAXED);
    if (e && e < l) l = e;
    if (forced_level && forced_level < l) l = forced_level;
    return l;
}

int pl__isa_force(int level) {
    forced_level = level > 0 ? level : 0;
    return pl__isa();
}

const char *pl__isa_name(int level) {
    return level >= PL_ISA_AVX512 ? "avx512" : level >= PL_ISA_AVX2 ? "avx2" : "baseline";
}

int pl__cpu_vnni(void) {
#if defined(__x86_64__) && !defined(PL_NO_ISA_CLONES)
    if (pl__isa() < PL_ISA_AVX512) return 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") ? 1 : 0;
#else
    return 0;
#endif
}

int pl__cpu_bf16(void) {
#if defined(__x86_64__) && !defined(PL_NO_ISA_CLONES)
    if (pl__isa() < PL_ISA_AVX512) return 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
    return 0;
#endif
}
