#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite twice:
# a -Werror release build, then the same suite under AddressSanitizer + UBSan,
# then 30 s of fuzzing of the checkpoint loader. (valgrind: tools/valgrind.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
jobs=$(nproc)

cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DPLASA_WERROR=ON
cmake --build build/release -j"$jobs"
ctest --test-dir build/release --output-on-failure -j"$jobs"

cmake -S . -B build/asan -DCMAKE_BUILD_TYPE=Debug -DPLASA_WERROR=ON -DPLASA_SANITIZE=ON \
      -DPLASA_BUILD_BENCH=OFF
cmake --build build/asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build/asan --output-on-failure -j"$jobs"

# The safetensors loader under libFuzzer (clang, ASan + UBSan), bounded.
bash tools/fuzz.sh "${PLASA_FUZZ_SECONDS:-30}"
