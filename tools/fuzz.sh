#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (libFuzzer + ASan + UBSan) in
# build/fuzz and runs each for a bounded time, seeded with its committed
# corpus (new inputs go to build/fuzz/corpus-<target>, crashes to
# build/fuzz/<target>-crash-*). Run as root on Debian 12 from anywhere in the
# repo. The targets, one per reader of outside input:
#   safetensors  the checkpoint loader            seeds: tests/fuzz/corpus
#   tokens       plasa-train's llm.c .bin files   seeds: tests/fuzz/corpus-tokens
#   tokenizer    plasa-train's tokenizer file     seeds: tests/fuzz/corpus-tokenizer
#   text         plasa-train's --data text path   seeds: tests/fuzz/corpus-text
#   flags        plasa-train's flag parser        seeds: tests/fuzz/corpus-flags
#
#   bash tools/fuzz.sh              # 60 seconds in all (12 s per target; CI)
#   bash tools/fuzz.sh 600          # 600 seconds in all
#   bash tools/fuzz.sh 60 tokens    # only these targets (the seconds are split among them)
#   bash tools/fuzz.sh long         # the long run: 10 million executions per target
#                                   # (hours on one core; the figures: docs/checkpoints.md, "Fuzzing")
# Extra libFuzzer arguments: PLASA_FUZZ_ARGS="-jobs=2".
set -euo pipefail
cd "$(dirname "$0")/.."
arg=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors tokens tokenizer text flags)

bash tools/install-deps.sh
# Debian's clang only recommends its sanitizer/fuzzer runtimes, and clang's
# OpenMP is a separate package: install them if missing.
extra=()
for p in libclang-rt-14-dev libomp-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || extra+=("$p")
done
if [ ${#extra[@]} -gt 0 ]; then
    echo "fuzz: installing ${extra[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${extra[@]}"
fi

CC=clang cmake -S . -B build/fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPLASA_FUZZ=ON \
    -DPLASA_BUILD_TESTS=OFF -DPLASA_BUILD_BENCH=OFF -DPLASA_BUILD_EXAMPLES=OFF
cmake --build build/fuzz -j"$(nproc)" --target $(printf 'fuzz_%s ' "${targets[@]}")

if [ "$arg" = long ]; then
    limit=(-runs=10000000)
else
    limit=(-max_total_time=$((arg / ${#targets[@]} > 0 ? arg / ${#targets[@]} : 1)))
fi
for t in "${targets[@]}"; do
    seeds=tests/fuzz/corpus-$t
    opts=(-max_len=8192)
    case $t in
    safetensors) seeds=tests/fuzz/corpus; opts=(-max_len=65536 -dict=tests/fuzz/safetensors.dict) ;;
    text) opts=(-max_len=1024) ;;
    flags) opts=(-max_len=1024 -close_fd_mask=1) ;; # --help prints the usage
    esac
    mkdir -p build/fuzz/corpus-$t
    echo "fuzz: $t"
    ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    OMP_NUM_THREADS=1 \
        build/fuzz/tests/fuzz/fuzz_$t build/fuzz/corpus-$t "$seeds" "${opts[@]}" "${limit[@]}" \
        -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 -artifact_prefix=build/fuzz/$t- \
        ${PLASA_FUZZ_ARGS:-}
done
