#!/usr/bin/env bash
# Regenerate patches/*.patch from the edited vendor/llama.cpp (diff against the pristine `upstream` tag
# that vendor/fetch.sh records). One patch per concern, in the order they apply.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/vendor/llama.cpp"
git rev-parse -q --verify upstream >/dev/null || { echo "export-patches.sh: no 'upstream' tag in vendor/llama.cpp (run vendor/fetch.sh --force)" >&2; exit 1; }
git add -A
out="$root/patches"
rm -f "$out"/*.patch
series=(
  "0001-build-LLAMA_COMPRESSKV-option.patch:CMakeLists.txt src/CMakeLists.txt"
  "0002-core-llama_kv_compress.patch:include/llama.h src/llama-cparams.h src/llama-graph.h src/llama-graph.cpp src/llama-context.h src/llama-context.cpp src/llama-kv-cache.h src/llama-kv-cache.cpp src/llama-compresskv.cpp"
  "0003-common-compresskv-flags.patch:common/common.h common/common.cpp common/arg.cpp"
  "0004-tools-compress-after-prefill.patch:tools/completion/completion.cpp tools/server/server-context.cpp"
)
listed=()
for entry in "${series[@]}"; do
  name=${entry%%:*}; files=${entry#*:}
  # shellcheck disable=SC2086
  git diff --cached upstream -- $files > "$out/$name"
  listed+=($files)
  echo "$name: $(grep -c '^+' "$out/$name") lines added"
done
rest=$(git diff --cached --name-only upstream -- . "${listed[@]/#/:!}" | grep -v '^.compresskv-patched$' || true)
[ -z "$rest" ] || { echo "export-patches.sh: changed files not in any patch: $rest" >&2; exit 1; }

# the tree now is the pristine source with these patches: stamp it so vendor/fetch.sh leaves it alone
"$root/vendor/fetch.sh" --stamp
