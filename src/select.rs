//! Choosing the kept tokens of one layer (or one KV head) from its scores.
//!
//! TODO(helper B): open with the algorithm in pseudocode; implement.
//!
//! Contract:
//! - Always kept: sink tokens `[0, n_sink)`, the window `[ws, we)` and the suffix `[we, n)`.
//! - The rest of the budget `k` (total kept, all of the above included) goes to prefix tokens
//!   `i < ws` by score: token level = top scores; chunk level (`chunk > 1`) = chunks `[c*chunk,
//!   (c+1)*chunk) ∩ [0, ws)` ranked by mean token score, whole chunks taken best first while they fit, the
//!   remainder filled by the best single tokens not yet kept. Budgets are met exactly.
//! - Ties break toward the lower token index; NaN scores rank last. Deterministic.
//! - Output: token indices, strictly ascending. If `k >= n`, all tokens.

/// Kept token indices for a budget of `k` tokens in total (see module doc).
pub fn select(scores: &[f32], n: usize, window: std::ops::Range<usize>, n_sink: usize, k: usize, chunk: usize) -> Vec<u32> {
    let _ = (scores, n, window, n_sink, k, chunk);
    unimplemented!()
}

/// StreamingLLM: the first `n_sink` tokens and the most recent `k - n_sink` (window and suffix always
/// included), ascending.
pub fn streaming(n: usize, window: std::ops::Range<usize>, n_sink: usize, k: usize) -> Vec<u32> {
    let _ = (n, window, n_sink, k);
    unimplemented!()
}
