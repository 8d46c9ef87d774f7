#!/usr/bin/env bash
# The test command: set up, build the library and the patched llama.cpp (CPU), run every test.
#   unit + property tests, the C example through the header, the bindgen header check, and the
#   end-to-end tests through the patched llama-completion on SmolLM2-135M-Instruct, and (--features llama:
#   build.rs builds the patched libllama.a into target/) llama_kv_compress() through llama.h.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
# llama-compresskv-calibrate and llama-compresskv-bench are this repository's Rust tools (src/bin): build-llama.sh
# builds them with `cargo build --release --features llama --bins` (never llama.cpp's C++ targets of those
# names) and copies them into vendor/build/bin beside llama-completion, where the e2e tests look for them.
scripts/build-llama.sh --targets "llama-completion llama-cli llama-server llama-quantize ggml-rpc-server llama-compresskv-calibrate llama-compresskv-bench"
cargo test --release --features llama "$@"
