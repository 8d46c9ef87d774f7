//! Choosing the kept tokens of one layer (or one KV head) from its scores.
//!
//! # Algorithm
//!
//! ```text
//! keep(n, window [ws, we), n_sink, k, choose):          # the core; `choose` is the specialization
//!     if k >= n: return 0..n
//!     s = min(n_sink, ws)
//!     always = [0, s) ∪ [ws, n)                          # sinks, window, suffix
//!     if k <= |always|: return always                    # budget too small: the always-kept set only
//!     r = k - |always|                                   # 0 < r < ws - s
//!     return sorted(always ∪ choose(candidates = [s, ws), r))
//!
//! select, token level (chunk <= 1):  choose = the r candidates ranked first
//! select, chunk level:
//!     chunks C_c = [c*chunk, (c+1)*chunk) ∩ [0, ws), ranked by mean score over C_c (sinks included),
//!     cost(C_c) = |C_c ∩ [s, ws)|; chunks of cost 0 are skipped
//!     for C in ranked chunks: if cost(C) <= r: take C, r -= cost(C)  else: stop
//!     then the r candidates not taken ranked first
//! streaming:                         choose = [ws - r, ws)      # the most recent prefix tokens
//!
//! ranking ("ranked first"): higher score first; NaN after every number; equal scores (and NaNs)
//! by lower index first. A strict total order: selection is deterministic.
//! ```
//!
//! Contract:
//! - Always kept: sink tokens `[0, n_sink)`, the window `[ws, we)` and the suffix `[we, n)`.
//! - The rest of the budget `k` (total kept, all of the above included) goes to prefix tokens
//!   `i < ws` by score: token level = top scores; chunk level (`chunk > 1`) = chunks `[c*chunk,
//!   (c+1)*chunk) ∩ [0, ws)` ranked by mean token score, whole chunks taken best first while they fit, the
//!   remainder filled by the best single tokens not yet kept. Budgets are met exactly.
//! - Ties break toward the lower token index; NaN scores rank last. Deterministic.
//! - Output: token indices, strictly ascending. If `k >= n`, all tokens.
//! - A budget smaller than the always-kept set keeps exactly the always-kept set (never fewer tokens
//!   than the sinks, window and suffix). Otherwise exactly `min(k, n)` tokens are kept.
//! - "While they fit" stops at the first ranked chunk that does not fit the remaining budget (a later,
//!   smaller chunk is not tried); only the last chunk and chunks cut by the sinks are smaller.
//!
//! Preconditions (checked by callers such as [`crate::plan::build`]; violated ones panic):
//! `window.start <= window.end <= n` and `scores.len() == window.start`.

use std::cmp::Ordering;
use std::ops::Range;

/// The ranking order: higher score first, NaN last, ties to the lower index (f32 token scores, f64
/// chunk means).
fn rank<T: PartialOrd + Copy>(scores: &[T], a: usize, b: usize) -> Ordering {
    let (x, y) = (scores[a], scores[b]);
    // a float is NaN exactly when it is unordered with itself
    let nan = |v: T| v.partial_cmp(&v).is_none();
    let by_value = match (nan(x), nan(y)) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
    };
    by_value.then(a.cmp(&b))
}

/// The generic core: always-kept tokens plus `choose(candidates, r)`, which must return `r` distinct
/// indices inside `candidates`. Ascending.
fn keep(
    n: usize,
    window: &Range<usize>,
    n_sink: usize,
    k: usize,
    choose: impl FnOnce(Range<usize>, usize) -> Vec<u32>,
) -> Vec<u32> {
    assert!(
        window.start <= window.end && window.end <= n,
        "window {window:?} outside 0..{n}"
    );
    if k >= n {
        return (0..n as u32).collect();
    }
    let ws = window.start;
    let s = n_sink.min(ws);
    let always = s + (n - ws);
    let mut out: Vec<u32> = (0..s as u32).collect();
    if k > always {
        let r = k - always;
        let chosen = choose(s..ws, r);
        debug_assert_eq!(chosen.len(), r);
        out.extend(chosen);
    }
    out.extend(ws as u32..n as u32);
    out.sort_unstable();
    out
}

/// The `r` indices of `cand` ranked first by `scores` (any order).
fn top(scores: &[f32], mut cand: Vec<usize>, r: usize) -> Vec<u32> {
    if r < cand.len() {
        if r > 0 {
            cand.select_nth_unstable_by(r - 1, |&a, &b| rank(scores, a, b));
        }
        cand.truncate(r);
    }
    cand.into_iter().map(|i| i as u32).collect()
}

/// Chunk-level choice of `r` tokens among `cand` (see the module doc).
fn choose_chunks(scores: &[f32], cand: Range<usize>, mut r: usize, chunk: usize) -> Vec<u32> {
    let ws = cand.end;
    let n_chunks = ws.div_ceil(chunk);
    let bounds = |c: usize| (c * chunk, ((c + 1) * chunk).min(ws));
    let cost = |c: usize| {
        let (lo, hi) = bounds(c);
        hi - lo.max(cand.start)
    };
    // Means stay in f64: rounding them to f32 would turn distinct means into ties.
    let means: Vec<f64> = (0..n_chunks)
        .map(|c| {
            let (lo, hi) = bounds(c);
            scores[lo..hi].iter().map(|&v| v as f64).sum::<f64>() / (hi - lo) as f64
        })
        .collect();
    let mut order: Vec<usize> = (0..n_chunks).filter(|&c| bounds(c).1 > cand.start).collect();
    order.sort_unstable_by(|&a, &b| rank(&means, a, b));

    let mut taken = vec![false; ws];
    let mut out = Vec::with_capacity(r);
    for c in order {
        if cost(c) > r {
            break;
        }
        let (lo, hi) = bounds(c);
        let first = lo.max(cand.start);
        taken[first..hi].iter_mut().for_each(|t| *t = true);
        out.extend(first as u32..hi as u32);
        r -= cost(c);
    }
    let rest: Vec<usize> = cand.filter(|&i| !taken[i]).collect();
    out.extend(top(scores, rest, r));
    out
}

/// Kept token indices for a budget of `k` tokens in total (see module doc).
pub fn select(
    scores: &[f32],
    n: usize,
    window: std::ops::Range<usize>,
    n_sink: usize,
    k: usize,
    chunk: usize,
) -> Vec<u32> {
    assert_eq!(scores.len(), window.start, "one score per prefix token");
    keep(n, &window, n_sink, k, |cand, r| {
        if chunk <= 1 {
            top(scores, cand.collect(), r)
        } else {
            choose_chunks(scores, cand, r, chunk)
        }
    })
}

/// StreamingLLM: the first `n_sink` tokens and the most recent `k - n_sink` (window and suffix always
/// included), ascending.
pub fn streaming(n: usize, window: std::ops::Range<usize>, n_sink: usize, k: usize) -> Vec<u32> {
    keep(n, &window, n_sink, k, |cand, r| {
        (cand.end - r..cand.end).map(|i| i as u32).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_level_hand_worked() {
        let s = [0.1, 0.9, 0.3, 0.7, 0.5];
        // n 7, window 5..7: budget 4 = window (2) + 2 best prefix tokens (1 and 3)
        assert_eq!(select(&s, 7, 5..7, 0, 4, 0), vec![1, 3, 5, 6]);
        assert_eq!(select(&s, 7, 5..7, 0, 5, 1), vec![1, 3, 4, 5, 6]);
        // a sink: token 0 always kept, then 1 best
        assert_eq!(select(&s, 7, 5..7, 1, 4, 0), vec![0, 1, 5, 6]);
        // suffix: window 3..5 of n 7; tokens 5, 6 are the suffix, prefix scores are the first 3
        assert_eq!(select(&s[..3], 7, 3..5, 0, 5, 0), vec![1, 3, 4, 5, 6]);
        // budget >= n: everything; budget below the always-kept set: that set
        assert_eq!(select(&s, 7, 5..7, 0, 7, 0), (0..7).collect::<Vec<u32>>());
        assert_eq!(select(&s, 7, 5..7, 0, 100, 0), (0..7).collect::<Vec<u32>>());
        assert_eq!(select(&s, 7, 5..7, 0, 1, 0), vec![5, 6]);
        assert_eq!(select(&s, 7, 5..7, 2, 3, 0), vec![0, 1, 5, 6]);
        assert_eq!(select(&s, 7, 5..7, 0, 0, 0), vec![5, 6]);
    }

    #[test]
    fn ties_and_nan() {
        let s = [0.5, f32::NAN, 0.5, 0.5, 1.0];
        assert_eq!(select(&s, 6, 5..6, 0, 3, 0), vec![0, 4, 5]);
        assert_eq!(select(&s, 6, 5..6, 0, 4, 0), vec![0, 2, 4, 5]);
        assert_eq!(select(&s, 6, 5..6, 0, 5, 0), vec![0, 2, 3, 4, 5]);
        let s = [f32::NAN, f32::NAN, f32::NAN];
        assert_eq!(select(&s, 4, 3..4, 0, 2, 0), vec![0, 3]);
        let s = [f32::NEG_INFINITY, f32::NAN, f32::INFINITY];
        assert_eq!(select(&s, 4, 3..4, 0, 3, 0), vec![0, 2, 3]);
    }

    #[test]
    fn chunk_level_hand_worked() {
        // 10 prefix tokens, chunks of 4: [0..4) mean 0.25, [4..8) mean 0.5, [8..10) mean 0.9
        let s = [0.1, 0.1, 0.1, 0.7, 0.5, 0.5, 0.5, 0.5, 0.9, 0.9];
        // budget 1 (window) + 6: chunk [8,10) (2), chunk [4,8) (4)
        assert_eq!(select(&s, 11, 10..11, 0, 7, 4), vec![4, 5, 6, 7, 8, 9, 10]);
        // + 5: chunk [8,10), then [4,8) does not fit: stop; best 3 single tokens: 3 (0.7), 4, 5
        assert_eq!(select(&s, 11, 10..11, 0, 6, 4), vec![3, 4, 5, 8, 9, 10]);
        // with a sink: chunk [0,4) costs 3; budget 1 + 1 + 9: [8,10), [4,8), then [0,4) (cost 3) fits
        assert_eq!(select(&s, 11, 10..11, 1, 11, 4), (0..11).collect::<Vec<u32>>());
        // budget 1 + 1 + 8: [8,10), [4,8), then [0,4) (cost 3) does not fit: tokens 3 (0.7) and 1 (tie, lower)
        assert_eq!(select(&s, 11, 10..11, 1, 10, 4), vec![0, 1, 3, 4, 5, 6, 7, 8, 9, 10]);
        // chunk larger than the prefix: one chunk of cost 10 never fits a smaller remainder
        assert_eq!(select(&s, 11, 10..11, 0, 3, 64), vec![8, 9, 10]);
        // ties between chunks go to the lower chunk
        let s = [1.0, 1.0, 1.0, 1.0];
        assert_eq!(select(&s, 5, 4..5, 0, 3, 2), vec![0, 1, 4]);
    }

    #[test]
    fn streaming_hand_worked() {
        assert_eq!(streaming(10, 8..10, 2, 5), vec![0, 1, 7, 8, 9]);
        assert_eq!(streaming(10, 6..8, 2, 6), vec![0, 1, 6, 7, 8, 9]);
        assert_eq!(streaming(10, 6..8, 2, 7), vec![0, 1, 5, 6, 7, 8, 9]);
        assert_eq!(streaming(10, 8..10, 0, 3), vec![7, 8, 9]);
        assert_eq!(streaming(10, 8..10, 4, 3), vec![0, 1, 2, 3, 8, 9]);
        assert_eq!(streaming(10, 8..10, 20, 3), vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(streaming(10, 8..10, 2, 10), (0..10).collect::<Vec<u32>>());
    }

    #[test]
    fn exact_sizes_and_ascending() {
        let s: Vec<f32> = (0..50).map(|i| ((i * 37) % 17) as f32).collect();
        for k in 0..60 {
            for chunk in [0, 1, 3, 8, 16] {
                for sink in [0, 4] {
                    let out = select(&s, 60, 50..55, sink, k, chunk);
                    let always = sink + 10;
                    assert_eq!(out.len(), k.clamp(always, 60), "k {k} chunk {chunk} sink {sink}");
                    assert!(out.windows(2).all(|p| p[0] < p[1]));
                    assert!((50..60).all(|i| out.contains(&i)));
                    assert!((0..sink as u32).all(|i| out.contains(&i)));
                }
            }
        }
    }
}
