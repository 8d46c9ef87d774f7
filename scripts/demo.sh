#!/usr/bin/env bash
# The main job: set everything up on a fresh machine, then hold a chat over a ~5K-token document (Paul Graham
# essays with a needle sentence, Qwen2.5-Coder-1.5B-Instruct Q4_K_M, greedy) through llama-server, once with
# the full cache and once with --compresskv: the document and its question, then two follow-up questions.
# Prints each turn's answers, seconds, tokens prefilled, KV memory and decode speed (scripts/demo.py).
#
#   scripts/demo.sh [extra llama-server flags for the compressed run, e.g. --compresskv-budget 128]
#   DEMO_MODEL=smollm2 scripts/demo.sh      # the 135M model: a 100 MB download and ~4x faster, but it often
#                                           # answers wrongly, with the full cache too
# ~3 minutes on 2 cores after the setup (the 1.5B model prefills the document twice at ~70 tokens/s).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
scripts/build-llama.sh --targets llama-server
model=$(scripts/fetch-model.sh "${DEMO_MODEL:-qwen15}")
essays=$(scripts/fetch-data.sh)
python3 scripts/demo.py --model "$model" --essays "$essays" --out "$root/target/demo" -- "$@"
