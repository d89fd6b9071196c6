#!/usr/bin/env bash
# Decoding speed, libplasa vs PyTorch, side by side in one run: for each thread
# count, bench/bench_decode (libplasa's KV cache ops and the trainer's model)
# and tools/torch_ref/decode_ref.py (the same layer and model in PyTorch with a
# hand-written KV cache) one after the other, then one table per part with both
# sides and the ratio torch / libplasa (> 1: libplasa is faster).
#
#   bash bench/compare_decode.sh [--threads 1,2] [--ctx 512,1024,2048,4096,8192]
#                                [--long 8192] [--reps 41] [--build DIR]
#                                [--skip-layer] [--skip-model]
#
# --threads LIST  thread counts (default 1,2)
# --ctx LIST      contexts of the layer table and of the per-token columns
# --long L        context of the long-context model variant (default 8192)
# --reps N        tokens timed per context in the layer part (median and min)
# --build DIR     CMake build directory (default build/release); bench_decode is
#                 (re)built there
# --skip-layer, --skip-model   leave out a part (both sides)
# Ratios are of the MINIMUM times of the layer part (the machine may be shared:
# the minimum is the least disturbed repetition); the model part gives the
# median of the 64 tokens before each context.
# Both sides run with OMP_WAIT_POLICY=PASSIVE (see bench/compare_torch.sh). Needs
# Debian's python3-torch (tools/torch_ref/README.md). The load average is printed
# with each part: on a shared machine the figures are noisy.
set -euo pipefail

threads=1,2 ctx=512,1024,2048,4096,8192 long=8192 reps=41 build=build/release skip=()
py=${PYTHON:-/usr/bin/python3}
while [ $# -gt 0 ]; do
    case "$1" in
    --threads) threads=$2; shift 2 ;;
    --ctx) ctx=$2; shift 2 ;;
    --long) long=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --skip-layer | --skip-model) skip+=("$1"); shift ;;
    -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "compare_decode.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ -f "$build/CMakeCache.txt" ] || cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
grep -q "CMAKE_BUILD_TYPE:STRING=Release" "$build/CMakeCache.txt" ||
    echo "compare_decode.sh: warning: $build is not a Release build" >&2
cmake --build "$build" --target bench_decode -j2 >/dev/null
bin=$build/bench/bench_decode
export OMP_WAIT_POLICY=PASSIVE
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cpu() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'; }
echo "machine: $(cpu 'model name') (family $(cpu 'cpu family'), model $(cpu 'model')), $(nproc) cores;" \
     "AVX-512: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no); $(date -u '+%Y-%m-%d %H:%M UTC')"
for t in ${threads//,/ }; do
    args=(--threads "$t" --ctx "$ctx" --reps "$reps" --long "$long" ${skip[@]+"${skip[@]}"})
    "$bin" "${args[@]}" >"$tmp/c$t.md"
    "$py" tools/torch_ref/decode_ref.py "${args[@]}" >"$tmp/p$t.md"
    echo
    echo "## $t thread(s)"
    echo
    echo "libplasa: $(head -1 "$tmp/c$t.md")"
    echo "torch:    $(head -1 "$tmp/p$t.md")"
    # Layer: both sides' minimums and medians, and the ratios of the minimums.
    if grep -q '^| [0-9]' "$tmp/c$t.md"; then
    echo
    echo "### One attention layer, one new token: minimum us per token (median in brackets)"
    echo
    echo "| context | libplasa dense | libplasa PLASA | torch dense | torch PLASA | torch/libplasa dense | torch/libplasa PLASA | libplasa dense/PLASA |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'|' 'FNR == 1 { f++ }
        /^\| [0-9]/ { gsub(/ /, ""); split($3, d, "/"); split($4, p, "/");
                      key = $2; if (f == 1) { cd[key] = d[1]; cdm[key] = d[2]; cp[key] = p[1]; cpm[key] = p[2]; order[++n] = key }
                      else { td[key] = d[1]; tdm[key] = d[2]; tp[key] = p[1]; tpm[key] = p[2] } }
        END { for (i = 1; i <= n; i++) { k = order[i];
                printf "| %s | %s (%s) | %s (%s) | %s (%s) | %s (%s) | %.2f | %.2f | %.2f |\n", k,
                       cdm[k], cd[k], cpm[k], cp[k], tdm[k], td[k], tpm[k], tp[k],
                       tdm[k] / cdm[k], tpm[k] / cpm[k], cdm[k] / cpm[k] } }' \
        <(grep '^| [0-9]' "$tmp/c$t.md") <(grep '^| [0-9]' "$tmp/p$t.md")
    fi
    # Model: tokens/s and per-token ms, both sides.
    if grep -q '^| model |' "$tmp/c$t.md"; then
    echo
    echo "### The model, one token at a time (vocabulary 8192, greedy): tokens/s, ms per token as the context grows"
    echo
    grep -m1 '^| model |' "$tmp/c$t.md" | sed 's/^| model |/| side | model |/'
    grep -m1 '^|---|---|' "$tmp/c$t.md" | sed 's/^|/|---|/'
    grep -E '^\| (benchmark|long-context)' "$tmp/c$t.md" | sed 's/^|/| libplasa |/'
    grep -E '^\| (benchmark|long-context)' "$tmp/p$t.md" | sed 's/^|/| torch |/'
    fi
done
