#!/usr/bin/env bash
# Data-parallel plasa-train on one machine, at equal global batch:
#   1 rank  x 2 threads  (plasa-train --threads 2, no MPI)
#   2 ranks x 1 thread   (mpirun -np 2 plasa-train --threads 1)
#   2 ranks x 1 thread with --zero (ZeRO-1)
# Reports time per step (from the trainer's tokens_per_second, training steps
# only), the share of rank 0's step time spent inside MPI (comm_share) and the
# bytes rank 0 sent per step, from each run's JSON. The configurations run
# interleaved, ROUNDS times, and the table gives the median of each, so a load
# change on a shared machine hits all of them alike. Prints `uptime` before
# and after: quote it with the figures (docs/distributed.md).
#
#   bash bench/mpi_scaling.sh [BUILD_DIR] [STEPS] [BATCH] [ROUNDS] [-- extra plasa-train flags]
#
# Defaults: build/release, 30 steps, global batch 8, 3 rounds, the benchmark
# model and corpus (bash tools/fetch-corpus.sh once; or pass --data FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/release}
steps=${2:-30}
batch=${3:-8}
rounds=${4:-3}
shift $(($# < 4 ? $# : 4))
[ "${1:-}" = "--" ] && shift
extra=("$@")
train=$build/examples/plasa-train/plasa-train
mpirun=$(command -v mpirun || true)
[ -x "$train" ] || { echo "mpi_scaling: no $train (build with -DPLASA_BUILD_EXAMPLES=ON)" >&2; exit 1; }
[ -n "$mpirun" ] || { echo "mpi_scaling: no mpirun (apt-get install openmpi-bin)" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common=(--steps "$steps" --batch "$batch" --eval-every 0 --log-every 1000000 "${extra[@]}")
mpi=("$mpirun" --oversubscribe --allow-run-as-root --bind-to none -np 2)

# Tokenise once (cached), so no run pays for it.
"$train" "${common[@]}" --prepare-only > /dev/null

echo "load before: $(uptime)"
run() { # name, command...
    local name=$1
    shift
    OMP_WAIT_POLICY=passive "$@" --json "$out/$name.$r.json" > /dev/null 2> "$out/$name.$r.err" ||
        { cat "$out/$name.$r.err" >&2; exit 1; }
}
for r in $(seq 1 "$rounds"); do
    run one "$train" "${common[@]}" --threads 2
    run two "${mpi[@]}" "$train" "${common[@]}" --threads 1
    run zero "${mpi[@]}" "$train" "${common[@]}" --threads 1 --zero
done
echo "load after:  $(uptime)"

# A top-level number of a result JSON.
num() { sed -n "s/.*\"$2\": \([-0-9.e+]*\).*/\1/p" "$1"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
seq_len=$(sed -n 's/.*"seq": \([0-9]*\).*/\1/p' "$out/one.1.json")
params=$(num "$out/one.1.json" parameters)
printf '\nplasa-train, %s parameters, global batch %s x seq %s, %s steps, median of %s rounds\n' \
    "$params" "$batch" "$seq_len" "$steps" "$rounds"
printf '%-24s %12s %12s %12s %16s\n' configuration "ms/step" "tokens/s" "comm share" "bytes sent/step"
base=
for name in one two zero; do
    tps=$(for r in $(seq 1 "$rounds"); do num "$out/$name.$r.json" tokens_per_second; done | median)
    ms=$(awk -v t="$tps" -v b="$batch" -v l="$seq_len" 'BEGIN {printf "%.1f", 1000 * b * l / t}')
    if [ "$name" = one ]; then
        share=-; bytes=-; base=$tps; label="1 rank x 2 threads"
    else
        share=$(for r in $(seq 1 "$rounds"); do num "$out/$name.$r.json" comm_share; done | median)
        share=$(awk -v s="$share" 'BEGIN {printf "%.1f%%", 100 * s}')
        bytes=$(num "$out/$name.1.json" comm_bytes_per_step)
        label="2 ranks x 1 thread"
        [ "$name" = zero ] && label="$label --zero"
    fi
    printf '%-24s %12s %12.0f %12s %16s\n' "$label" "$ms" "$tps" "$share" "$bytes"
done
printf '(bytes sent/step: by rank 0 inside MPI per training step; the fp32 gradient is %s bytes)\n' \
    "$(awk -v p="$params" 'BEGIN {printf "%.0f", 4 * p}')"
