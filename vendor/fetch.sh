#!/usr/bin/env bash
# Fetch llama.cpp (pinned in vendor/llama.cpp.pin), verify it, unpack it to vendor/llama.cpp and apply
# patches/*.patch in order.
#
#   vendor/fetch.sh                 fetch (or reuse the cached sdist), unpack, patch
#   vendor/fetch.sh --from DIR      use an existing llama.cpp checkout of the same commit instead
#   vendor/fetch.sh --force         re-unpack even if vendor/llama.cpp is already patched
#   vendor/fetch.sh --stamp         only mark vendor/llama.cpp as patched with the current series (after
#                                   scripts/export-patches.sh wrote the patches from it)
#
# Idempotent: a tree already patched with the current series is left alone. Works offline once the
# sdist is in the cache ($COMPRESSKV_CACHE, default ~/.cache/compresskv).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pin="$root/vendor/llama.cpp.pin"
dest="$root/vendor/llama.cpp"
cache="${COMPRESSKV_CACHE:-$HOME/.cache/compresskv}/sdist"
get() { sed -n "s/^$1=//p" "$pin"; }
package=$(get package); version=$(get version); file=$(get file); sha=$(get sha256); subdir=$(get subdir)

from=""; force=0; stamp_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from="$2"; shift 2 ;;
    --force) force=1; shift ;;
    --stamp) stamp_only=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "fetch.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

shopt -s nullglob
patches=("$root"/patches/*.patch)
series=$( { echo "$(get sha256)"; [ ${#patches[@]} -gt 0 ] && cat "${patches[@]}"; true; } | sha256sum | cut -c1-16)
stamp="$dest/.compresskv-patched"
if [ $stamp_only = 1 ]; then
  [ -d "$dest" ] || { echo "fetch.sh: no $dest to stamp" >&2; exit 1; }
  echo "$series" > "$stamp"
  exit 0
fi
if [ $force = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$series" ]; then
  echo "vendor/llama.cpp is up to date (patch series $series)"
  exit 0
fi

rm -rf "$dest.tmp"
if [ -n "$from" ]; then
  [ -f "$from/include/llama.h" ] || { echo "fetch.sh: '$from' is not a llama.cpp tree (no include/llama.h)" >&2; exit 1; }
  echo "copying llama.cpp from $from (it must be commit $(get commit))"
  mkdir -p "$dest.tmp" && (cd "$from" && tar cf - --exclude=.git --exclude=build --exclude=models .) | (cd "$dest.tmp" && tar xf -)
else
  mkdir -p "$cache"
  if [ ! -f "$cache/$file" ]; then
    echo "downloading $package==$version (sdist) with pip into $cache"
    python3 -m pip download --quiet --no-deps --no-binary "$package" -d "$cache" "$package==$version"
  fi
  got=$(sha256sum "$cache/$file" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    echo "fetch.sh: checksum mismatch for $cache/$file" >&2
    echo "  expected $sha" >&2
    echo "  got      $got" >&2
    echo "  delete the file and run again, or check vendor/llama.cpp.pin" >&2
    exit 1
  fi
  mkdir -p "$dest.tmp"
  tar xzf "$cache/$file" -C "$dest.tmp" --strip-components=3 --exclude="$subdir/models/*.gguf*" --exclude="$subdir/.git" "$subdir"
fi

# a git baseline of the pristine tree, so that scripts/export-patches.sh can regenerate the series
if command -v git >/dev/null; then
  (cd "$dest.tmp" && git init -q && git add -A && git -c user.name=compresskv -c user.email=compresskv@localhost \
     commit -q -m "llama.cpp $(get commit) from $package==$version" && git tag upstream) >/dev/null
fi

for p in "${patches[@]}"; do
  if ! (cd "$dest.tmp" && patch -p1 --forward --silent --dry-run < "$p" >/dev/null); then
    echo "fetch.sh: patch $(basename "$p") does not apply to this llama.cpp tree" >&2
    (cd "$dest.tmp" && patch -p1 --forward --dry-run < "$p") >&2 || true
    rm -rf "$dest.tmp"
    exit 1
  fi
  (cd "$dest.tmp" && patch -p1 --forward --silent < "$p")
  echo "applied $(basename "$p")"
done
echo "$series" > "$dest.tmp/.compresskv-patched"
if [ -d "$dest" ]; then
  # keep the replaced tree (it may hold edits not yet exported with scripts/export-patches.sh)
  rm -rf "$dest.prev"
  mv "$dest" "$dest.prev"
  echo "the previous tree is in vendor/llama.cpp.prev"
fi
mv "$dest.tmp" "$dest"
echo "vendor/llama.cpp ready (commit $(get commit), patch series $series)"
