#!/usr/bin/env bash
# Runs the release-build Check suites under valgrind memcheck: invalid reads
# and writes, uses of uninitialised values, and leaks (definite and possible)
# fail the run. A stage CI may or may not run (see the time it prints).
#
#   tools/valgrind.sh [build-dir [test-name-regex]]     default: build/release, all
#
# Builds the release configuration first if needed (as tools/test.sh does).
# tools/valgrind.supp silences libgomp's worker-thread TLS ("possibly lost"
# because the thread pool lives until exit) and oneDNN's JIT sgemm reading 32
# bytes past a buffer of its own (test_parity; see the file).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/release}
filter=${2:-.}
command -v valgrind > /dev/null || { echo "valgrind.sh: valgrind not found (apt-get install valgrind)"; exit 1; }
if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DPLASA_WERROR=ON
fi
cmake --build "$build" -j"$(nproc)"

# CK_FORK=no: one process per suite, so valgrind sees every test.
export CK_FORK=no OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
logs="$build/valgrind"
mkdir -p "$logs"
failed=()
t_all=$(date +%s)
for exe in "$build"/tests/test_*; do
    if [ ! -f "$exe" ] || [ ! -x "$exe" ]; then continue; fi
    name=$(basename "$exe")
    [[ $name =~ $filter ]] || continue
    t0=$(date +%s)
    if valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible \
            --track-origins=yes --suppressions=tools/valgrind.supp --log-file="$logs/$name.log" "$exe" > "$logs/$name.out" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$name")
    fi
    printf '%-24s %-6s %4ds  (%s)\n' "$name" "$status" $(( $(date +%s) - t0 )) "$logs/$name.log"
done
echo "valgrind.sh: total $(( $(date +%s) - t_all ))s, OMP_NUM_THREADS=$OMP_NUM_THREADS"
if [ ${#failed[@]} -gt 0 ]; then
    echo "valgrind.sh: failed: ${failed[*]}"
    for f in "${failed[@]}"; do tail -n 40 "$logs/$f.log"; tail -n 20 "$logs/$f.out"; done
    exit 1
fi
