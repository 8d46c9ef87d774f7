//! Integration tests of the ggml formats (`types`) and of compaction (`compact`, `Plan::compact`).
//!
//! - Formats: vectors produced by ggml's own `dequantize_row_*` / `GGML_FP16_TO_FP32` /
//!   `GGML_BF16_TO_FP32` (ggml-quants.c and ggml-impl.h of the pinned llama.cpp, compiled and run once;
//!   the inputs are random blocks from a splitmix64 stream), and random blocks compared bit for bit
//!   against a straightforward per-element reference written here from the format definitions.
//! - Compaction: random shapes, all 9 types, both layouts, random move sets, against a naive
//!   element-by-element reference on a clone of the buffer; error cases leave the buffer untouched.
//! - `Plan::compact`: hand-built plans (per layer and per KV head), and a bad move in the last layer
//!   that must leave every buffer of every layer untouched.
//!
//! One test binary in three files: `formats.rs` (the format reference and vectors), `compaction.rs`
//! (`compact::apply` / `validate` against the naive reference), `plan_compact.rs` (`Plan::compact`).

mod compaction;
mod formats;
mod plan_compact;

use compresskv::budget::Allocation;
use compresskv::compact::{apply, dst_cells, validate, Moves};
use compresskv::layout::{Geometry, LayerViewMut, Layout};
use compresskv::plan::{GroupPlan, LayerPlan, Params, Plan, Shape};
use compresskv::score::Heads;
use compresskv::types::{dequantize_row, GgmlType};
use compresskv::Error;

// ---------------------------------------------------------------------------------------------
// Deterministic PRNG (splitmix64)
// ---------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
    /// `k` distinct values of `0..n`, in random order.
    fn distinct(&mut self, n: usize, k: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..n as u32).collect();
        self.shuffle(&mut all);
        all.truncate(k);
        all
    }
}
