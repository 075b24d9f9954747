#!/usr/bin/env bash
# Same-run comparison of one DPO training step: spoke (candle, CPU) vs PyTorch + transformers.
#
#   scripts/torch-dpo-step.sh [OUT_DIR] [TORCH_BENCH_PY]
#
# Runs `spoke bench step` (small and tiny configs, 3 warm-up + 20 timed steps; see
# src/bench/step.rs) and then, when python3 can import torch and transformers, the PyTorch
# baseline script (default: ../shared/reference/torch-dpo-step/bench.py) on the same machine,
# and prints both side by side. Run it on an otherwise idle machine: both report how much CPU
# other processes used during the timed steps, and 2-thread numbers collapse under contention.
# Set CANDLE_NUM_THREADS to change spoke's thread count (default: all cores).
set -euo pipefail
OUT=${1:-bench-out}
TORCH_PY=${2:-"$(dirname "$0")/../../shared/reference/torch-dpo-step/bench.py"}
SPOKE=${SPOKE:-target/release/spoke}
[ -x "$SPOKE" ] || SPOKE=target/debug/spoke
mkdir -p "$OUT"
"$SPOKE" bench step --out "$OUT"
if python3 -c 'import torch, transformers' 2>/dev/null && [ -f "$TORCH_PY" ]; then
  python3 "$TORCH_PY" --out "$OUT/torch_step.json"
else
  echo "torch/transformers not importable (or $TORCH_PY missing): spoke numbers only" >&2
fi
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
s = json.load(open(os.path.join(out, "step.json")))
t = None
p = os.path.join(out, "torch_step.json")
if os.path.exists(p):
    t = json.load(open(p))
print(f"{'config':8} {'engine':26} {'median ms':>10} {'min ms':>8} {'tok/s (median)':>15}")
for r in s["runs"]:
    for k, v in r["results"].items():
        print(f"{r['config']:8} {'spoke ' + k:26} {v['median_ms']:10.1f} {v['min_ms']:8.1f} {v['tokens_per_s_median']:15.0f}")
    if t:
        print(f"{r['config']:8} torch (see {p})")
PY
