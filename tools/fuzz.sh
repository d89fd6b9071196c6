#!/usr/bin/env bash
# Builds the libFuzzer target of the safetensors loader with clang (libFuzzer +
# ASan + UBSan) in build/fuzz and runs it for a bounded time, seeded with
# tests/fuzz/corpus (new inputs go to build/fuzz/corpus, crashes to
# build/fuzz/crash-*). Run as root on Debian 12 from anywhere in the repo.
#
#   bash tools/fuzz.sh            # 60 seconds
#   bash tools/fuzz.sh 600        # 10 minutes
#   bash tools/fuzz.sh 60 -jobs=2 # extra arguments go to libFuzzer
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true

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
cmake --build build/fuzz -j"$(nproc)" --target fuzz_safetensors

mkdir -p build/fuzz/corpus
ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
OMP_NUM_THREADS=1 \
    build/fuzz/tests/fuzz/fuzz_safetensors build/fuzz/corpus tests/fuzz/corpus \
    -dict=tests/fuzz/safetensors.dict -max_total_time="$secs" -rss_limit_mb=2048 \
    -max_len=65536 -timeout=10 -print_final_stats=1 -artifact_prefix=build/fuzz/ "$@"
