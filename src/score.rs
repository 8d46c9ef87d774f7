//! Window-attention token scores (SnapKV family), shared by CompressKV, SnapKV and PyramidKV.
//!
//! TODO(helper B): open with the algorithm in pseudocode; implement.
//!
//! Contract:
//! - Tokens are indexed `0..n` in position order; `cells[i]` is the cache cell of token `i`.
//! - The observation window is tokens `[ws, we)` (`we - ws = w`); its queries arrive as f32
//!   `[w][n_head][head_dim]`, post-RoPE, rotated like the cached keys.
//! - Query head `h` reads KV head `g = h / (n_head / n_head_kv)`.
//! - For window query `r` (token `ws + r`) the logits over keys `i <= ws + r` (causal) are
//!   `q·k / sqrt(head_dim)`, softmax in f32 over those keys; token `i < ws` gets the sum over the `w`
//!   queries of its probability. Keys at `i >= we` are never attended.
//! - Only prefix tokens `i < ws` are scored; the returned vectors have length `ws`.
//! - Pooling along the sequence ([`pool`]): kernel `k` (odd), stride 1, zero padding `k/2`, average
//!   divides by `k` at the edges too; max pooling ignores the padding. `k <= 1` is the identity.
//! - Memory: O(w * n) scratch per head in flight, never `n_head * n * w` at once.

use crate::error::Result;
use crate::layout::LayerView;

/// Pooling kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// Average pooling (the paper's).
    Avg,
    /// Max pooling.
    Max,
}

/// Geometry of the attention of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Query heads.
    pub n_head: usize,
    /// KV heads (`n_head % n_head_kv == 0`).
    pub n_head_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// Raw window-attention scores of the query heads `heads` of one layer: one vector of length `ws` per
/// head in `heads` (same order), before pooling.
pub fn head_scores(
    keys: &LayerView<'_>,
    cells: &[u32],
    shape: Heads,
    queries: &[f32],
    window: std::ops::Range<usize>,
    heads: &[usize],
) -> Result<Vec<Vec<f32>>> {
    let _ = (keys, cells, shape, queries, window, heads);
    unimplemented!()
}

/// Pool `x` with kernel `k` (see module doc).
pub fn pool(x: &[f32], k: usize, kind: PoolKind) -> Vec<f32> {
    let _ = (x, k, kind);
    unimplemented!()
}
