#!/usr/bin/env bash
# libplasa vs PyTorch on this machine, same thread count: ms per training step
# (forward with dropout 0.1, backward, clip, AdamW) and per evaluation batch of
# the PLASA benchmark model (batch 2, seq 128, progressive k) for each
# vocabulary, the ratio torch ms / libplasa ms, the step's matrix-product FLOPs
# (formula in bench/bench_train.c) and the share of the machine's sgemm peak.
#
#   bash bench/compare_torch.sh [--threads N] [--steps N] [--vocab 8192,49152]
#                               [--build DIR] [--sgemm-n N] [--omp-wait LIST]
#                               [--precision f32|bf16|both] [--force]
#
# --threads N   OpenMP threads of libplasa, torch and OpenBLAS threads (default 2)
# --steps N     timed steps per side (median reported; default 20, after 3 / 2 warm-up)
# --vocab LIST  vocabularies (default 8192,49152)
# --build DIR   CMake build directory (default build); bench_train is (re)built there
# --sgemm-n N   size of the square products measuring the sgemm peak (default 2048)
# --omp-wait L OMP_WAIT_POLICY settings to measure, comma-separated (default PASSIVE,default;
#               "default" leaves it unset: libgomp spins a while before sleeping). Each side
#               runs under each setting and the summary compares each side's best: spinning
#               helps libplasa on a quiet machine (its kernels and oneDNN share one OpenMP
#               pool) and hurts on a busy one; torch runs OpenMP threads for its own kernels
#               and OpenBLAS pthreads for products, and spinning OpenMP threads take the
#               cores from OpenBLAS (a torch step took 2.2 s instead of 0.24 s here).
# --precision L f32, bf16 or both (default both). bf16: libplasa's bf16 products
#               (bench_train --precision bf16, where the CPU has native bf16) against
#               torch's best of f32 and its CPU bf16 autocast.
# --force       print ratios even if torch's BLAS looks slow
#
# OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which some machines set and which make
# OpenBLAS run an older kernel (Haswell instead of Cooperlake: about half the
# speed), are unset for the PyTorch side only; the kernel OpenBLAS then uses is
# printed.
#
# Needs Debian's python3-torch and libopenblas0-pthread (tools/torch_ref/README.md);
# Python is used only here, never by the build or the tests. Before quoting a
# ratio the script checks that torch's matmul reaches a sensible speed: an
# N x N x N float32 product must reach at least half of oneDNN's sgemm peak
# (the netlib reference BLAS gives ~3 GFLOP/s, which would make any ratio
# meaningless). The load average is printed with the figures: on a shared
# machine they are noisy.
set -euo pipefail

threads=2 steps=20 vocab=8192,49152 build=build sgemm_n=2048 force=0 omp_wait=PASSIVE,default
precision=both
py=${PYTHON:-/usr/bin/python3}
while [ $# -gt 0 ]; do
    case "$1" in
    --threads) threads=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --vocab) vocab=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --sgemm-n) sgemm_n=$2; shift 2 ;;
    --omp-wait) omp_wait=$2; shift 2 ;;
    --precision) precision=$2; shift 2 ;;
    --force) force=1; shift ;;
    -h | --help) sed -n '2,44p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "compare_torch.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
case $precision in f32 | bf16 | both) ;; *) echo "compare_torch.sh: --precision f32|bf16|both" >&2; exit 2 ;; esac
IFS=, read -r -a policies <<<"$omp_wait"
# Runs a command under OMP_WAIT_POLICY=$1 ("default": unset).
with_policy() {
    local pol=$1
    shift
    if [ "$pol" = default ]; then env -u OMP_WAIT_POLICY "$@"; else OMP_WAIT_POLICY=$pol "$@"; fi
}
# The PyTorch side: OpenBLAS's own kernel choice (see the top of the file).
torch_env=(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS="$threads")

echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores online" \
    "($(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx2|avx512f|fma' | sort -u | tr '\n' ' '))"
echo "threads: $threads (libplasa OpenMP, torch, OpenBLAS); OMP_WAIT_POLICY settings: ${policies[*]}"
echo "environment: OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE:-unset} (unset for the PyTorch side)"
echo "load: $(uptime | sed 's/.*load average/load average/')"
echo "libplasa: $(git describe --always --dirty 2>/dev/null || echo '?') (oneDNN sgemm)"

echo "== build ($build/bench/bench_train)"
[ -f "$build/CMakeCache.txt" ] || cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j2 --target bench_train >/dev/null
btype=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$build/CMakeCache.txt")
echo "build type: ${btype:-none}$([ "$btype" = Release ] || echo '  <- not Release: libplasa timings are not representative')"
bench=$build/bench/bench_train

echo "== torch's BLAS (tools/torch_ref/blas_check.py --n $sgemm_n --threads $threads; OPENBLAS_* unset)"
blas_out=$("${torch_env[@]}" "$py" tools/torch_ref/blas_check.py --n "$sgemm_n" \
    --threads "$threads" --reps 5)
echo "$blas_out"
torch_gemm=$(echo "$blas_out" | awk '/^result/ { for (i = 2; i <= NF; i++) if ($i ~ /^gflops=/) { sub("gflops=", "", $i); print $i } }')

precs=()
[ "$precision" = bf16 ] || precs+=(f32)
if [ "$precision" != f32 ]; then
    if "$bench" --help 2>&1 | grep -q -- '--precision'; then
        precs+=(bf16)
    else
        echo "(this bench_train has no --precision: bf16 not measured)"
    fi
fi
res=""
IFS=, read -r -a vocabs <<<"$vocab"
for pol in "${policies[@]}"; do
    for prec in "${precs[@]}"; do
        popt=()
        [ "$prec" = f32 ] || popt=(--precision "$prec")
        echo "== libplasa $prec, OMP_WAIT_POLICY=$pol (bench_train --threads $threads --steps $steps --sgemm-peak $sgemm_n ${popt[*]})"
        for v in "${vocabs[@]}"; do
            if ! out=$(with_policy "$pol" "$bench" --vocab "$v" --threads "$threads" --steps "$steps" \
                --warmup 3 --sgemm-peak "$sgemm_n" "${popt[@]}" 2>&1); then
                echo "$out" | tail -n 3
                echo "(libplasa $prec not measured)"
                continue
            fi
            echo "$out" | grep -v '^result'
            res+=$(echo "$out" | grep '^result' | tail -n 1 | sed "s/^result/result side=c pol=$pol prec=$prec/")$'\n'
        done
    done
    for ac in none $([ "$precision" = f32 ] || echo bf16); do
        echo "== PyTorch autocast $ac, OMP_WAIT_POLICY=$pol (train_ref.py --bench --threads $threads --bench-steps $steps --bench-autocast $ac)"
        if ! t_out=$(with_policy "$pol" "${torch_env[@]}" "$py" tools/torch_ref/train_ref.py --bench \
            --threads "$threads" --bench-vocab "$vocab" --bench-steps "$steps" --bench-autocast "$ac" 2>&1); then
            echo "$t_out" | tail -n 3
            continue
        fi
        echo "$t_out" | grep -v '^result'
        res+=$(echo "$t_out" | grep '^result' | sed "s/^result/result side=t pol=$pol prec=$ac/")$'\n'
    done
done
echo "load after: $(uptime | sed 's/.*load average/load average/')"

echo "== summary (medians; each side at its best OMP_WAIT_POLICY; ratio = torch ms / libplasa ms, > 1: libplasa faster)"
printf '%s' "$res" | awk -v tg="$torch_gemm" -v force="$force" -v n="$sgemm_n" '
function kv(line, key,    i, a) {
    for (i = 1; i <= split(line, a, " "); i++)
        if (index(a[i], key "=") == 1) return substr(a[i], length(key) + 2)
    return ""
}
function best(arr, k, ms, tag) { if (!(k in arr) || ms + 0 < arr[k] + 0) { arr[k] = ms; at[k] = tag } }
/^result/ {
    v = kv($0, "vocab"); side = kv($0, "side"); pol = kv($0, "pol"); prec = kv($0, "prec")
    if (!(v in seen)) { seen[v] = 1; order[++nv] = v }
    tr = kv($0, "train_ms"); ev = kv($0, "eval_ms")
    printf "  %-6s %-5s %-8s vocab %6d: train %8.1f ms  eval %8.1f ms\n", side == "c" ? "C" : "torch", prec, pol, v, tr, ev
    if (side == "c") {
        if (kv($0, "peak_gflops") + 0 > peak) peak = kv($0, "peak_gflops") + 0
        fs[v] = kv($0, "train_gflop")
        k = v SUBSEP prec
        if (!(k in cs) || tr + 0 < cs[k] + 0) { cs[k] = tr; cpol[k] = pol }
        if (!(k in ce) || ev + 0 < ce[k] + 0) ce[k] = ev
    } else {
        k = v SUBSEP prec
        if (!(k in ts) || tr + 0 < ts[k] + 0) { ts[k] = tr; tpol[k] = pol }
        if (!(k in te) || ev + 0 < te[k] + 0) te[k] = ev
    }
}
END {
    ok = tg + 0 >= 0.5 * peak
    printf "sgemm %d^3: oneDNN (libplasa) %.1f GFLOP/s (best in this run), torch matmul %.1f GFLOP/s%s\n",
        n, peak, tg, ok ? "" : "  <- torch BLAS SLOW: see tools/torch_ref/README.md, BLAS"
    if (!ok && !force) { print "compare_torch.sh: not printing ratios (use --force)"; exit 1 }
    printf "%6s %-5s | %8s %-8s | %8s %-13s | %6s | %8s %8s %6s | %7s\n", "vocab", "C", "C step",
        "policy", "torch", "(best of)", "ratio", "C eval", "torch", "ratio", "C %peak"
    for (i = 1; i <= nv; i++) {
        v = order[i]
        # torch f32 best, and torch best of f32 and autocast bf16
        tf = ts[v SUBSEP "none"]; tfp = "f32 " tpol[v SUBSEP "none"]
        tb = tf; tbp = tfp; tbe = te[v SUBSEP "none"]
        if ((v SUBSEP "bf16") in ts && (tb == "" || ts[v SUBSEP "bf16"] + 0 < tb + 0)) {
            tb = ts[v SUBSEP "bf16"]; tbp = "bf16 " tpol[v SUBSEP "bf16"]
        }
        if ((v SUBSEP "bf16") in te && te[v SUBSEP "bf16"] + 0 < tbe + 0) tbe = te[v SUBSEP "bf16"]
        for (p = 1; p <= 2; p++) {
            prec = p == 1 ? "f32" : "bf16"
            k = v SUBSEP prec
            if (!(k in cs)) continue
            t = p == 1 ? tf : tb; tp = p == 1 ? tfp : tbp; tev = p == 1 ? te[v SUBSEP "none"] : tbe
            if (t == "") continue
            printf "%6d %-5s | %8.1f %-8s | %8.1f %-13s | %6.2f | %8.1f %8.1f %6.2f | %6.1f%%\n", v, prec,
                cs[k], cpol[k], t, tp, t / cs[k], ce[k], tev, tev / ce[k],
                100 * fs[v] / cs[k] * 1e3 / peak
        }
    }
    print "(f32 rows: torch f32 only; bf16 rows: torch best of f32 and bf16 autocast. C %peak: the"
    print " step'"'"'s f32 GFLOP over its time, against the f32 sgemm peak of this run.)"
}'
