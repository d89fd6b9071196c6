#!/usr/bin/env bash
# Reproduces docs/benchmark.md: trains and evaluates the benchmark model on
# the default corpus three ways (PLASA progressive, dense, PLASA with the
# indexer alignment loss), 1000 steps each, one thread (results are
# bit-identical for a given thread count), writing docs/results/*.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
bash tools/fetch-corpus.sh
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DPLASA_BUILD_TESTS=OFF
cmake --build build/release -j"$(nproc)" --target plasa-train
out=docs/results
mkdir -p "$out"
run() {
    local name=$1
    shift
    OMP_WAIT_POLICY=passive build/release/examples/plasa-train/plasa-train --threads 1 \
        --eval-every 100 --json "$out/$name.json" --csv "$out/$name.csv" --plot "$out/$name.svg" \
        "$@" > "$out/$name.log" 2>&1
    tail -n 1 "$out/$name.log" | cut -c1-200
}
run plasa
run dense --schedule dense
run plasa_idx --indexer-loss 0.1
