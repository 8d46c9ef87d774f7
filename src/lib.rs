//! # compresskv
//!
//! KV-cache compression after the CompressKV method (arXiv 2508.02401): after a prompt is prefilled,
//! each layer keeps only the tokens its *semantic retrieval heads* (SRHs) attend to from an observation
//! window of queries, with per-layer budgets set offline from each layer's measured eviction error.
//!
//! The crate works on KV buffers shaped exactly as llama.cpp/ggml stores them and contains no llama.cpp
//! code. It is built as a static library with a C ABI (`include/compresskv.h`, see [`ffi`]) and as an
//! rlib for Rust users.
//!
//! Module map (one concept each; every module doc states its invariants):
//! - [`types`]: the ggml element/block formats (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl),
//!   with dequantization bit-identical to ggml's reference.
//! - [`layout`]: read-only and mutable views of one layer's K or V buffer (row-major or transposed V).
//! - [`score`]: window-attention token scores (CompressKV, SnapKV, PyramidKV), pooling.
//! - [`select`]: top-k / chunk selection per layer or per KV head, window, suffix and sink handling.
//! - [`budget`]: per-layer budget allocation (uniform, pyramid, error-weighted).
//! - [`compact`]: move plans and in-place, block-exact compaction of host buffers.
//! - [`gather`]: the `i32` index blocks of the device gather that moves the same cells (llama.cpp's graph).
//! - [`gate`]: the key gate, a query-agnostic scorer fitted offline to reconstruction scores.
//! - [`recorded`]: the raw scores of one compression in a file, replayed by a later one (benchmarks).
//! - [`plan`]: the whole step for one sequence: budgets + scores + selection + moves.
//! - [`profile`]: the JSON model profile (SRH ranking, layer weights), validated against a model.
//! - [`options`]: the options of one compression as llama.cpp passes them (names, defaults, validation).
//! - [`flags`]: the `--compresskv-*` flags of llama.cpp's tools that set them (names, help).
//! - [`overflow`]: bounded-memory prefill of a prompt longer than the context (chunks, passes, probe).
//! - [`request`]: one compression of a llama.cpp sequence as policy (window, budget, slots, stats).
//! - [`ffi`]: the C ABI.
//!
//! The ggml side of the same steps (host views of the cache's tensors, the scoring and compaction graphs on
//! the backend that holds them) is C++ over the public ggml API, `src/ggml/compresskv-ggml.cpp`, compiled
//! into llama.cpp's libllama when it is built with `LLAMA_COMPRESSKV`.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod budget;
pub mod compact;
pub mod error;
pub mod ffi;
pub mod flags;
pub mod gate;
pub mod gather;
pub mod layout;
pub mod options;
pub mod overflow;
pub mod plan;
pub mod profile;
pub mod recorded;
pub mod request;
pub mod score;
pub mod select;
pub mod types;

pub use error::{Error, Result};
