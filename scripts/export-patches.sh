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
# Subject and message of each patch: what it does and why it must live inside llama.cpp
message() {
  case "$1" in
    0001-*) cat <<'MSG'
Subject: [PATCH 1/4] build: LLAMA_COMPRESSKV option

Add the LLAMA_COMPRESSKV option (OFF by default) and the paths of the compresskv library
(LLAMA_COMPRESSKV_DIR holds include/compresskv.h, LLAMA_COMPRESSKV_LIB is libcompresskv.a). With the
option on, libllama links the library, compiles its ggml side (src/ggml/compresskv-ggml.cpp of the
compresskv root: host views of the cache's tensors, the scoring and compaction graphs, public ggml API
only, so that they need not live in llama.cpp) and defines LLAMA_COMPRESSKV; with it off the llama.h functions of
src/llama-compresskv.cpp report that compression is not built in (the cache's side of the feature, inert
until a sequence is compressed, is compiled either way).
MSG
    ;;
    0002-*) cat <<'MSG'
Subject: [PATCH 2/4] llama: llama_kv_compress, KV-cache compression after prefill

What must live inside llama.cpp to compress a sequence's KV cache right after its prompt was decoded:
- llama.h: llama_kv_compress() and helpers, without #ifdef (without the option they report that
  compression is not built in); options are a "key=value;" string the compresskv library parses;
- query capture in build_attn (the queries as attention sees them, post-RoPE and rotated like K);
- the cache's layers handed to the library's ggml side (compresskv-ggml.cpp), which scores caches off the
  host (GPU, RPC) by a small graph on the backend of each layer, so only the scores come to the host, and
  moves the kept cells (in place on host buffers, by a gather graph on a device buffer);
- rewriting the cell metadata of the moved cells;
- a per-layer mask bias for the exact and mask forms;
- refusing position edits inside a compressed prompt, and marking compressed sequences in saved states
  (a block whose magic takes the place of n_stream, so that a build without it refuses them cleanly).
Only the code that calls the library is behind #ifdef LLAMA_COMPRESSKV; the rest is inert until a sequence
is compressed. The policy (window placement, budgets, method parameters, profiles, per-layer masks, stats, the
bounded-prefill plan, the flag table) is the library's: each step asks it through ckv_request_* before touching the cache, and any refusal leaves
the cache as it was.
MSG
    ;;
    0003-*) cat <<'MSG'
Subject: [PATCH 3/4] common: --compresskv flags

The --compresskv-* flags of llama-completion, llama-cli and llama-server, registered from the library's
table (llama_kv_compress_flag: name, option, help with its default). Each flag appends key=value to one
options string, validated at parse time by the library (the error names the flag; without the option only
--compresskv exists and says that compression is not built in). common_compresskv() compresses after
prefill, common_compresskv_fit() before the cache would overflow (bounded-memory prefill).
MSG
    ;;
    0004-*) cat <<'MSG'
Subject: [PATCH 4/4] tools: compress after prefill in completion and server

Call common_compresskv() where the prompt is done: llama-completion after the last prompt batch (and
bounded-memory prefill of prompts longer than the context as the library plans it with
llama_kv_compress_overflow, compressed sessions), llama-server (and
llama-cli, which runs on it) where a slot moves from prompt processing to generation; the library skips a
sequence at most --compresskv-trigger cells long, so a conversation is compressed again only past it. A slot
reuses its compressed history up to where a new prompt diverges, and from scratch when the cut would remove
positions after an evicted token (the cache refuses it); context shift and chunk reuse, which shift
positions, stay off. /slots shows each slot's cells.
MSG
    ;;
  esac
  echo
}

listed=()
for entry in "${series[@]}"; do
  name=${entry%%:*}; files=${entry#*:}
  # shellcheck disable=SC2086
  {
    # the form of `git format-patch`: a mail header, what and why, a diffstat, the diff (fixed date and author so
    # that the files change only when the code does; vendor/fetch.sh applies them with `patch -p1`)
    echo "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001"
    echo "From: compresskv <compresskv@localhost>"
    echo "Date: Thu, 1 Oct 2026 00:00:00 +0000"
    message "$name"
    echo "---"
    git diff --cached --stat=100 upstream -- $files
    echo
    git diff --cached upstream -- $files
  } > "$out/$name"
  listed+=($files)
  echo "$name: $(grep -c '^+' "$out/$name") lines added"
done
rest=$(git diff --cached --name-only upstream -- . "${listed[@]/#/:!}" | grep -v '^.compresskv-patched$' || true)
[ -z "$rest" ] || { echo "export-patches.sh: changed files not in any patch: $rest" >&2; exit 1; }

# the tree now is the pristine source with these patches: stamp it so vendor/fetch.sh leaves it alone
"$root/vendor/fetch.sh" --stamp
