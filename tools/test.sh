#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite twice:
# a -Werror release build, then the same suite under AddressSanitizer + UBSan,
# then 60 s of fuzzing of the readers of outside input. (valgrind: tools/valgrind.sh.)
#
# Every option the suite depends on is passed explicitly, so whatever another
# script left in a build folder's cache (tools/run.sh configures build/release
# too), the whole suite is built and run. ctest fails if it finds no test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
jobs=$(nproc)
all=(-DPLASA_BUILD_TESTS=ON -DPLASA_BUILD_EXAMPLES=ON -DPLASA_WERROR=ON -DPLASA_FUZZ=OFF)

cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release "${all[@]}" -DPLASA_SANITIZE=OFF \
      -DPLASA_BUILD_BENCH=ON
cmake --build build/release -j"$jobs"
ctest --test-dir build/release --output-on-failure --no-tests=error -j"$jobs"

cmake -S . -B build/asan -DCMAKE_BUILD_TYPE=Debug "${all[@]}" -DPLASA_SANITIZE=ON \
      -DPLASA_BUILD_BENCH=OFF
cmake --build build/asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build/asan --output-on-failure --no-tests=error -j"$jobs"

# The readers of outside input under libFuzzer (clang, ASan + UBSan), bounded.
bash tools/fuzz.sh "${PLASA_FUZZ_SECONDS:-60}"
