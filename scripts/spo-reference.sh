#!/usr/bin/env bash
# Runs the SPO paper's own synthetic code (causalml/spo, `synthetic/`) on the setup of
# `spoke bench synthetic` and compares the two with `spoke bench compare`.
#
# Usage: scripts/spo-reference.sh SPO_CHECKOUT [SPOKE_OUT_DIR] [SEEDS] [S_GRID]
#   SPO_CHECKOUT   a clone of https://github.com/causalml/spo
#   SPOKE_OUT_DIR  a `spoke bench synthetic --out` directory (default bench-out; run if missing)
#   SEEDS          comma list (default 0..19), S_GRID comma list (default 0.0,0.75,1.5)
# Needs python3 with torch, numpy and pandas (not part of the test suite: torch is ~3 GB).
# Writes SPOKE_OUT_DIR/reference/results.csv and SPOKE_OUT_DIR/compare.md.
set -euo pipefail
spo=${1:?usage: scripts/spo-reference.sh SPO_CHECKOUT [SPOKE_OUT_DIR] [SEEDS] [S_GRID]}
out=${2:-bench-out}
seeds=${3:-$(seq -s, 0 19)}
sgrid=${4:-0.0,0.75,1.5}
jobs=$(nproc 2>/dev/null || echo 2)
root=$(cd "$(dirname "$0")/.." && pwd)
spoke=(cargo run --quiet --release --manifest-path "$root/Cargo.toml" --)

[ -f "$spo/synthetic/scripts/run_grid.py" ] || { echo "error: $spo/synthetic/scripts/run_grid.py not found (pass a causalml/spo checkout)" >&2; exit 2; }
python3 -c 'import torch, numpy, pandas' 2>/dev/null || { echo "error: python3 needs torch, numpy and pandas (pip install torch numpy pandas)" >&2; exit 2; }

if [ ! -f "$out/results.csv" ]; then
  "${spoke[@]}" bench synthetic --seeds "$seeds" --s "$sgrid" --out "$out"
fi
ref=$(cd "$out" && pwd)/reference
mkdir -p "$ref"
start=$(date +%s)
# The paper code's defaults are its protocol (n = 1000, d = 20, k = 10, ν = 10, τ = 0.25,
# hidden 32,32, Adam lr 2e-3, batch 128, 100 epochs, OSPO 2 warm-up, PSPO 3 + 4×2).
(cd "$spo/synthetic" && python3 scripts/run_grid.py --seeds "$seeds" --n_grid 1000 \
  --s_grid "$sgrid" --tau_grid 0.25 --methods dpo,pspo,ospo,rspo --n_jobs "$jobs" \
  --out_csv "$ref/results.csv")
echo "paper code: $(( $(date +%s) - start )) s on $jobs jobs"
"${spoke[@]}" bench compare --ours "$out/results.csv" --reference "$ref/results.csv" \
  --out "$out/compare.md"
