#!/usr/bin/env bash
# libplasa vs PyTorch on this machine, same thread count: ms per training step
# (forward with dropout 0.1, backward, clip, AdamW) and per evaluation batch of
# the PLASA benchmark model (batch 2, seq 128, progressive k) for each
# vocabulary, the ratio torch ms / libplasa ms, the step's matrix-product FLOPs
# (formula in bench/bench_train.c) and the share of the machine's sgemm peak.
#
#   bash bench/compare_torch.sh [--threads N] [--steps N] [--vocab 8192,49152]
#                               [--build DIR] [--sgemm-n N] [--omp-wait POLICY] [--force]
#
# --threads N   OpenMP threads of libplasa, torch and OpenBLAS threads (default 2)
# --steps N     timed steps per side (median reported; default 20, after 3 / 2 warm-up)
# --vocab LIST  vocabularies (default 8192,49152)
# --build DIR   CMake build directory (default build); bench_train is (re)built there
# --sgemm-n N   size of the square products measuring the sgemm peak (default 2048)
# --omp-wait P  OMP_WAIT_POLICY for both sides (default PASSIVE; "" leaves it unset).
#               torch runs OpenMP threads for its own kernels and OpenBLAS pthreads for
#               matrix products: with libgomp's default spin-waiting the idle OpenMP
#               threads compete with OpenBLAS for the cores (here a torch step took
#               2.2 s instead of 0.24 s with 2 threads). libplasa's kernels and oneDNN
#               share one OpenMP pool, but spinning also costs it time when the machine
#               is shared. PASSIVE for both is the fair setting.
# --force       print ratios even if torch's BLAS looks slow
#
# Needs Debian's python3-torch and libopenblas0-pthread (tools/torch_ref/README.md);
# Python is used only here, never by the build or the tests. Before quoting a
# ratio the script checks that torch's matmul reaches a sensible speed: an
# N x N x N float32 product must reach at least half of oneDNN's sgemm peak
# (the netlib reference BLAS gives ~3 GFLOP/s, which would make any ratio
# meaningless). The load average is printed with the figures: on a shared
# machine they are noisy.
set -euo pipefail

threads=2 steps=20 vocab=8192,49152 build=build sgemm_n=2048 force=0 omp_wait=PASSIVE
py=${PYTHON:-/usr/bin/python3}
while [ $# -gt 0 ]; do
    case "$1" in
    --threads) threads=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --vocab) vocab=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --sgemm-n) sgemm_n=$2; shift 2 ;;
    --omp-wait) omp_wait=$2; shift 2 ;;
    --force) force=1; shift ;;
    -h | --help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "compare_torch.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ -n "$omp_wait" ]; then export OMP_WAIT_POLICY=$omp_wait; else unset OMP_WAIT_POLICY; fi

echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores online" \
    "($(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx2|avx512f|fma' | sort -u | tr '\n' ' '))"
echo "threads: $threads (libplasa OpenMP, torch, OpenBLAS); OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-unset}"
echo "load: $(uptime | sed 's/.*load average/load average/')"
echo "libplasa: $(git describe --always --dirty 2>/dev/null || echo '?') (oneDNN sgemm)"

echo "== build ($build/bench/bench_train)"
[ -f "$build/CMakeCache.txt" ] || cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j2 --target bench_train >/dev/null
btype=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$build/CMakeCache.txt")
echo "build type: ${btype:-none}$([ "$btype" = Release ] || echo '  <- not Release: libplasa timings are not representative')"
bench=$build/bench/bench_train

echo "== torch's BLAS (tools/torch_ref/blas_check.py --n $sgemm_n --threads $threads)"
blas_out=$(OMP_NUM_THREADS=$threads "$py" tools/torch_ref/blas_check.py --n "$sgemm_n" \
    --threads "$threads" --reps 5)
echo "$blas_out"
torch_gemm=$(echo "$blas_out" | awk '/^result/ { for (i = 2; i <= NF; i++) if ($i ~ /^gflops=/) { sub("gflops=", "", $i); print $i } }')

echo "== libplasa (bench_train --threads $threads --steps $steps --sgemm-peak $sgemm_n)"
c_res=""
IFS=, read -r -a vocabs <<<"$vocab"
for v in "${vocabs[@]}"; do
    out=$("$bench" --vocab "$v" --threads "$threads" --steps "$steps" --warmup 3 \
        --sgemm-peak "$sgemm_n")
    echo "$out" | grep -v '^result'
    c_res+=$(echo "$out" | grep '^result')$'\n'
done

echo "== PyTorch (tools/torch_ref/train_ref.py --bench --threads $threads --bench-steps $steps)"
t_out=$(OMP_NUM_THREADS=$threads "$py" tools/torch_ref/train_ref.py --bench --threads "$threads" \
    --bench-vocab "$vocab" --bench-steps "$steps")
echo "$t_out" | grep -v '^result'
t_res=$(echo "$t_out" | grep '^result')
echo "load after: $(uptime | sed 's/.*load average/load average/')"

echo "== summary (medians; ratio = torch ms / libplasa ms, > 1: libplasa faster)"
printf '%s\n%s\n' "$c_res" "$t_res" | awk -v tg="$torch_gemm" -v force="$force" -v n="$sgemm_n" '
function kv(line, key,    i, a) {
    for (i = 1; i <= split(line, a, " "); i++)
        if (index(a[i], key "=") == 1) return substr(a[i], length(key) + 2)
    return ""
}
/^result/ {
    v = kv($0, "vocab")
    if (kv($0, "train_gflop") != "") {
        order[++nv] = v
        cs[v] = kv($0, "train_ms"); ce[v] = kv($0, "eval_ms")
        fs[v] = kv($0, "train_gflop"); fe[v] = kv($0, "eval_gflop")
        if (kv($0, "peak_gflops") + 0 > peak) peak = kv($0, "peak_gflops") + 0
    } else {
        ts[v] = kv($0, "train_ms"); te[v] = kv($0, "eval_ms")
    }
}
END {
    ok = tg + 0 >= 0.5 * peak
    printf "sgemm %d^3: oneDNN (libplasa) %.1f GFLOP/s (best in this run), torch matmul %.1f GFLOP/s%s\n",
        n, peak, tg, ok ? "" : "  <- torch BLAS SLOW: see tools/torch_ref/README.md, BLAS"
    if (!ok && !force) { print "compare_torch.sh: not printing ratios (use --force)"; exit 1 }
    printf "%6s | %8s %8s %6s | %8s %8s %6s | %8s %8s | %9s %9s %7s\n", "vocab", "C step", "torch",
        "ratio", "C eval", "torch", "ratio", "GFLOP", "GFLOP", "C GF/s", "torch", "C %peak"
    printf "%6s | %8s %8s %6s | %8s %8s %6s | %8s %8s | %9s %9s %7s\n", "", "ms", "ms", "", "ms", "ms",
        "", "step", "eval", "step", "GF/s", "step"
    for (i = 1; i <= nv; i++) {
        v = order[i]
        g = fs[v] / cs[v] * 1e3
        printf "%6d | %8.1f %8.1f %6.2f | %8.1f %8.1f %6.2f | %8.3f %8.3f | %9.1f %9.1f %6.1f%%\n", v,
            cs[v], ts[v], ts[v] / cs[v], ce[v], te[v], te[v] / ce[v], fs[v], fe[v], g,
            fs[v] / ts[v] * 1e3, 100 * g / peak
    }
    printf "(eval: C %%peak ="
    for (i = 1; i <= nv; i++) printf " %.1f%% at V=%d", 100 * fe[order[i]] / ce[order[i]] * 1e3 / peak, order[i]
    printf ")\n"
}'
