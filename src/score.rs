//! Window-attention token scores (SnapKV family), shared by CompressKV, SnapKV and PyramidKV.
//!
//! # Algorithm
//!
//! ```text
//! head_scores(K, cells, (n_head, n_head_kv, d), Q[w][n_head][d], window [ws, we), heads):
//!     gs = n_head / n_head_kv                        # query heads per KV head
//!     for each KV group g read by some h in heads:   # in parallel
//!         for each tile T of 64 keys in 0..we:       # in parallel
//!             Kt[i] = dequantize(K[cell cells[i]], elements g*d .. (g+1)*d)   for i in T
//!             z[h][r][i] = (Q[r][h] . Kt[i]) / sqrt(d)   for h of g, r in 0..w, i in T, i <= ws+r (causal)
//!         for each h in heads with h / gs == g:      # in parallel
//!             s = [0; ws]
//!             for r in 0..w:                         # window query r is token ws + r
//!                 m = max z[h][r];  e[i] = exp(z[h][r][i] - m);  Z = sum e   (i in 0..=ws+r)
//!                 s[i] += e[i] / Z                                        for i in 0..ws
//!             out[position of h in heads] = s
//!
//! pool(x, k, Avg):  y[i] = (1/k) * sum of x[j] for j in [i - k/2, i - k/2 + k), x[j] = 0 outside 0..n
//! pool(x, k, Max):  y[i] = max of x[j] for j in [i - k/2, i - k/2 + k) ∩ 0..n
//! ```
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
//! - Memory: the `[w][we]` logits of the heads of the KV groups in flight (at most one layer's
//!   `len(heads) * w * n` f32) plus one 64-key tile per thread; keys are never copied whole.
//!
//! Precision: keys are dequantized to f32; dot products and `exp` are f32 (the dot product uses 8
//! independent accumulators); the softmax normaliser `Z` is summed in f64 and the probabilities are
//! accumulated into the f32 scores. Relative error against an f64 reference is ~1e-6 for the logit
//! magnitudes of real models.
//!
//! Cost and parallelism: `O(len(heads) * w * we * d)` flops. Each key row is read from the cache and
//! dequantized once per layer, into a 64-key tile against which all window queries of all the group's
//! heads are dotted while it is hot; groups, tiles and the softmax of each head run in parallel on the
//! rayon pool. An even `k` (not produced by [`crate::plan::build`],
//! which rejects it) uses the window `[i - k/2, i + k/2)`.
//!
//! Non-finite inputs: a NaN/inf key or query makes the affected scores NaN (never a panic); pooling
//! propagates NaN (a window containing NaN pools to NaN, for both kinds).

use rayon::prelude::*;

use crate::error::{Error, Result};
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

impl Heads {
    /// Check `n_head`, `n_head_kv` and `head_dim` (non-zero, `n_head % n_head_kv == 0`).
    pub fn validate(&self) -> Result<()> {
        if self.n_head == 0 || self.n_head_kv == 0 || self.head_dim == 0 {
            return Err(Error::InvalidArg(format!(
                "attention shape must be non-zero: n_head {} n_head_kv {} head_dim {}",
                self.n_head, self.n_head_kv, self.head_dim
            )));
        }
        if self.n_head % self.n_head_kv != 0 {
            return Err(Error::InvalidArg(format!(
                "n_head {} is not a multiple of n_head_kv {}",
                self.n_head, self.n_head_kv
            )));
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.n_head / self.n_head_kv
    }
}

/// Check that `keys` can be scored with `shape` and that `cells` index it: `n_embd == n_head_kv *
/// head_dim`, `head_dim` a whole number of blocks, every cell `< n_cells`.
pub(crate) fn check_keys(keys: &LayerView<'_>, cells: &[u32], shape: Heads) -> Result<()> {
    shape.validate()?;
    let g = keys.geometry();
    if g.n_embd != shape.n_head_kv * shape.head_dim {
        return Err(Error::InvalidArg(format!(
            "key n_embd {} != n_head_kv {} * head_dim {}",
            g.n_embd, shape.n_head_kv, shape.head_dim
        )));
    }
    if shape.head_dim % g.ty.block_elems() != 0 {
        return Err(Error::InvalidArg(format!(
            "head_dim {} is not a multiple of the {} block size {}",
            shape.head_dim,
            g.ty.name(),
            g.ty.block_elems()
        )));
    }
    if let Some((i, &c)) = cells.iter().enumerate().find(|(_, &c)| c as usize >= g.n_cells) {
        return Err(Error::InvalidArg(format!(
            "cell {c} of token {i} is out of range (n_cells {})",
            g.n_cells
        )));
    }
    Ok(())
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
    check_keys(keys, cells, shape)?;
    let (ws, we) = (window.start, window.end);
    if ws > we || we > cells.len() {
        return Err(Error::InvalidArg(format!(
            "window {ws}..{we} is not inside the {} tokens of the sequence",
            cells.len()
        )));
    }
    if ws == we {
        return Err(Error::InvalidArg(format!("empty observation window {ws}..{we}")));
    }
    let w = we - ws;
    let want = w * shape.n_head * shape.head_dim;
    if queries.len() != want {
        return Err(Error::InvalidArg(format!(
            "queries hold {} floats, expected window {w} * n_head {} * head_dim {} = {want}",
            queries.len(),
            shape.n_head,
            shape.head_dim
        )));
    }
    if let Some(&h) = heads.iter().find(|&&h| h >= shape.n_head) {
        return Err(Error::InvalidArg(format!(
            "query head {h} is out of range (n_head {})",
            shape.n_head
        )));
    }
    let d = shape.head_dim;
    let fetch = |g: usize, i: usize, out: &mut [f32]| keys.dequantize(cells[i] as usize, g * d, out);
    Ok(window_scores(fetch, shape, queries, ws, we, heads))
}

/// Keys per tile: a tile's dequantized keys (`TILE * head_dim` f32, 32 KiB at `d = 128`) stay in L1/L2
/// while every window query of every head of the group is dotted against them.
const TILE: usize = 64;

/// The core of [`head_scores`], on validated arguments: keys come from `fetch(g, i, out)`, which writes
/// KV head `g` of token `i` (`head_dim` floats) into `out`.
fn window_scores<F>(fetch: F, shape: Heads, queries: &[f32], ws: usize, we: usize, heads: &[usize]) -> Vec<Vec<f32>>
where
    F: Fn(usize, usize, &mut [f32]) + Sync,
{
    let gs = shape.group_size();
    let mut groups: Vec<usize> = heads.iter().map(|&h| h / gs).collect();
    groups.sort_unstable();
    groups.dedup();

    // One task per KV group; each returns (position in `heads`, scores) for the heads it serves.
    let per_group: Vec<Vec<(usize, Vec<f32>)>> = groups
        .par_iter()
        .map(|&g| {
            let mine: Vec<usize> = (0..heads.len()).filter(|&p| heads[p] / gs == g).collect();
            let z = group_logits(&fetch, shape, queries, ws, we, g, &mine, heads);
            mine.par_iter()
                .enumerate()
                .map(|(j, &p)| (p, softmax_sums(&z, j, mine.len(), ws, we)))
                .collect()
        })
        .collect();

    let mut out = vec![Vec::new(); heads.len()];
    for (p, s) in per_group.into_iter().flatten() {
        out[p] = s;
    }
    out
}

/// Logits of the group's heads `mine` (positions in `heads`), tile-major: `z[t][j][r][i - t*TILE]` is
/// `q(ws + r, heads[mine[j]]) . k(i) / sqrt(d)` for the keys `i` of tile `t` that window query `r` sees
/// (`i <= ws + r`); other entries are unused. Each key is dequantized once (into a per-thread tile
/// buffer, never a whole `[we][d]` copy) and read from cache by all `len(mine) * w` queries.
#[allow(clippy::too_many_arguments)]
fn group_logits<F>(
    fetch: &F,
    shape: Heads,
    queries: &[f32],
    ws: usize,
    we: usize,
    g: usize,
    mine: &[usize],
    heads: &[usize],
) -> Vec<f32>
where
    F: Fn(usize, usize, &mut [f32]) + Sync,
{
    let d = shape.head_dim;
    let w = we - ws;
    let np = mine.len();
    let scale = 1.0 / (d as f32).sqrt();
    // the group's window queries, contiguous: qs[j][r] = Q[r][heads[mine[j]]]
    let mut qs = Vec::with_capacity(np * w * d);
    for &p in mine {
        for r in 0..w {
            qs.extend_from_slice(&queries[(r * shape.n_head + heads[p]) * d..][..d]);
        }
    }
    let n_tiles = we.div_ceil(TILE);
    let mut z = vec![0f32; n_tiles * np * w * TILE];
    z.par_chunks_mut(np * w * TILE).enumerate().for_each_init(
        || vec![0f32; TILE * d],
        |kt, (t, zt)| {
            let i0 = t * TILE;
            let i1 = (i0 + TILE).min(we);
            for (k, row) in kt.chunks_exact_mut(d).take(i1 - i0).enumerate() {
                fetch(g, i0 + k, row);
            }
            for (jr, zr) in zt.chunks_exact_mut(TILE).enumerate() {
                let r = jr % w;
                let q = &qs[jr * d..][..d];
                // query r (token ws + r) sees key i when i <= ws + r
                let last = (ws + r + 1).min(i1);
                if last <= i0 {
                    continue;
                }
                for (zi, k) in zr.iter_mut().zip(kt.chunks_exact(d)).take(last - i0) {
                    *zi = dot(q, k) * scale;
                }
            }
        },
    );
    z
}

/// Scores of head `j` of a group from its tile-major logits (see [`group_logits`]): one softmax per
/// window query over the keys it sees, probabilities of the prefix tokens summed over the queries.
fn softmax_sums(z: &[f32], j: usize, np: usize, ws: usize, we: usize) -> Vec<f32> {
    let w = we - ws;
    let at = |r: usize, i: usize| ((i / TILE * np + j) * w + r) * TILE + i % TILE;
    let mut s = vec![0f32; ws];
    let mut e = vec![0f32; we];
    for r in 0..w {
        let n = ws + r + 1;
        let row = &mut e[..n];
        for (i, x) in row.iter_mut().enumerate() {
            *x = z[at(r, i)];
        }
        let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        let mut total = 0f64;
        for zi in row.iter_mut() {
            *zi = (*zi - m).exp();
            total += *zi as f64;
        }
        let inv = (1.0 / total) as f32;
        for (si, &x) in s.iter_mut().zip(row.iter()) {
            *si += x * inv;
        }
    }
    s
}

/// f32 dot product with 8 independent accumulators (vectorizes; also halves the rounding error of a
/// single running sum).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Pool `x` with kernel `k` (see module doc).
pub fn pool(x: &[f32], k: usize, kind: PoolKind) -> Vec<f32> {
    if k <= 1 || x.is_empty() {
        return x.to_vec();
    }
    match kind {
        PoolKind::Avg => pool_avg(x, k),
        PoolKind::Max => pool_max(x, k),
    }
}

/// Window of output `i`: `[lo, hi)` clipped to `0..n`.
fn pool_window(i: usize, k: usize, n: usize) -> (usize, usize) {
    let left = k / 2;
    (i.saturating_sub(left), (i + k - left).min(n))
}

/// Average pooling: a sliding f64 sum, re-summed from scratch every 64 outputs so that the error of
/// the running add/subtract cannot build up; a window holding a non-finite value is summed directly.
fn pool_avg(x: &[f32], k: usize) -> Vec<f32> {
    let n = x.len();
    let direct = |lo: usize, hi: usize| x[lo..hi].iter().map(|&v| v as f64).sum::<f64>();
    let all_finite = x.iter().all(|v| v.is_finite());
    let mut y = Vec::with_capacity(n);
    let (mut sum, mut plo, mut phi) = (0f64, 0usize, 0usize);
    for i in 0..n {
        let (lo, hi) = pool_window(i, k, n);
        if !all_finite || i % 64 == 0 {
            sum = direct(lo, hi);
        } else {
            for v in &x[phi..hi] {
                sum += *v as f64;
            }
            for v in &x[plo..lo] {
                sum -= *v as f64;
            }
        }
        (plo, phi) = (lo, hi);
        y.push((sum / k as f64) as f32);
    }
    y
}

/// Max pooling over the window clipped to `0..n` (padding ignored): a monotone deque of candidate
/// indices, O(n). A window holding a NaN pools to NaN.
fn pool_max(x: &[f32], k: usize) -> Vec<f32> {
    let n = x.len();
    let mut y = Vec::with_capacity(n);
    let mut dq: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    let (mut nan, mut plo, mut phi) = (0usize, 0usize, 0usize);
    for i in 0..n {
        let (lo, hi) = pool_window(i, k, n);
        for j in phi..hi {
            if x[j].is_nan() {
                nan += 1;
                continue;
            }
            while dq.back().is_some_and(|&b| x[b] <= x[j]) {
                dq.pop_back();
            }
            dq.push_back(j);
        }
        nan -= x[plo..lo].iter().filter(|v| v.is_nan()).count();
        while dq.front().is_some_and(|&f| f < lo) {
            dq.pop_front();
        }
        (plo, phi) = (lo, hi);
        y.push(if nan > 0 {
            f32::NAN
        } else {
            dq.front().map_or(f32::NAN, |&f| x[f])
        });
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Geometry;
    use crate::types::GgmlType;

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
    }

    #[test]
    fn pool_hand_worked() {
        assert_eq!(pool(&[1.0, 2.0, 3.0], 3, PoolKind::Avg), vec![1.0, 2.0, 5.0 / 3.0]);
        assert_eq!(pool(&[1.0, 2.0, 3.0], 3, PoolKind::Max), vec![2.0, 3.0, 3.0]);
        assert_eq!(pool(&[1.0, 2.0, 3.0], 1, PoolKind::Avg), vec![1.0, 2.0, 3.0]);
        assert_eq!(pool(&[1.0, 2.0, 3.0], 0, PoolKind::Max), vec![1.0, 2.0, 3.0]);
        // kernel 5 over 3 tokens: every window is clipped, still divided by 5
        assert_eq!(
            pool(&[1.0, 2.0, 3.0], 5, PoolKind::Avg),
            vec![6.0 / 5.0, 6.0 / 5.0, 6.0 / 5.0]
        );
        assert_eq!(pool(&[5.0, -1.0, 0.0, 4.0], 3, PoolKind::Max), vec![5.0, 5.0, 4.0, 4.0]);
        assert_eq!(pool(&[], 5, PoolKind::Avg), Vec::<f32>::new());
        // even kernel: window [i - k/2, i + k/2)
        assert_eq!(pool(&[1.0, 2.0, 3.0], 2, PoolKind::Avg), vec![0.5, 1.5, 2.5]);
    }

    #[test]
    fn pool_matches_direct_on_long_input() {
        let x: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1009) as f32 / 1009.0 + 1e-3).collect();
        for k in [3, 5, 15, 31] {
            for kind in [PoolKind::Avg, PoolKind::Max] {
                let y = pool(&x, k, kind);
                let z: Vec<f32> = (0..x.len())
                    .map(|i| {
                        let (lo, hi) = pool_window(i, k, x.len());
                        match kind {
                            PoolKind::Avg => (x[lo..hi].iter().map(|&v| v as f64).sum::<f64>() / k as f64) as f32,
                            PoolKind::Max => x[lo..hi].iter().cloned().fold(f32::NEG_INFINITY, f32::max),
                        }
                    })
                    .collect();
                assert!(close(&y, &z, 1e-6), "k {k} {kind:?}");
            }
        }
    }

    #[test]
    fn pool_propagates_nan() {
        let x = [1.0, f32::NAN, 2.0, 3.0, 4.0, 5.0];
        for kind in [PoolKind::Avg, PoolKind::Max] {
            let y = pool(&x, 3, kind);
            assert!(y[0].is_nan() && y[1].is_nan() && y[2].is_nan(), "{kind:?} {y:?}");
            assert!(!y[3].is_nan() && !y[4].is_nan() && !y[5].is_nan(), "{kind:?} {y:?}");
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn two_tokens_by_hand() {
        // one head, head_dim 1: keys k0 = 0, k1 = ln 3 (scale 1), window = token 1 (ws 1, we 2),
        // query 1: logits [0, ln 3] -> probs [1/4, 3/4]; score of token 0 = 1/4.
        let keys = f32_bytes(&[0.0, 3f32.ln()]);
        let view = LayerView::new(Geometry::rows(GgmlType::F32, 1, 2).unwrap(), &keys).unwrap();
        let shape = Heads {
            n_head: 1,
            n_head_kv: 1,
            head_dim: 1,
        };
        let s = head_scores(&view, &[0, 1], shape, &[1.0], 1..2, &[0]).unwrap();
        assert_eq!(s.len(), 1);
        assert!((s[0][0] - 0.25).abs() < 1e-6, "{s:?}");
        // cells permuted: token 0 lives in cell 1
        let s = head_scores(&view, &[1, 0], shape, &[1.0], 1..2, &[0]).unwrap();
        assert!((s[0][0] - 0.75).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn causal_window_and_groups() {
        // 2 query heads on 1 KV head, head_dim 1, 4 tokens, window tokens 2..4. All keys 0, so every
        // query attends uniformly over its causal range: query 0 (token 2) over 3 keys, query 1 over 4.
        // Score of tokens 0 and 1 = 1/3 + 1/4; the key at token 3 is invisible to query 0.
        let keys = f32_bytes(&[0.0; 4]);
        let view = LayerView::new(Geometry::rows(GgmlType::F32, 1, 4).unwrap(), &keys).unwrap();
        let shape = Heads {
            n_head: 2,
            n_head_kv: 1,
            head_dim: 1,
        };
        let q = [0.3, -2.0, 1.0, 0.5];
        let s = head_scores(&view, &[0, 1, 2, 3], shape, &q, 2..4, &[1, 0]).unwrap();
        let want = 1.0 / 3.0 + 0.25;
        for v in &s {
            assert!(close(v, &[want, want], 1e-6), "{s:?}");
        }
        // a window ending before the last token: tokens >= we are never attended
        let s = head_scores(&view, &[0, 1, 2, 3], shape, &q, 1..3, &[0]).unwrap();
        assert!(close(&s[0], &[0.5 + 1.0 / 3.0], 1e-6), "{s:?}");
    }

    #[test]
    fn validation_messages() {
        let keys = f32_bytes(&[0.0; 8]);
        let view = LayerView::new(Geometry::rows(GgmlType::F32, 2, 4).unwrap(), &keys).unwrap();
        let shape = Heads {
            n_head: 2,
            n_head_kv: 2,
            head_dim: 1,
        };
        let cells = [0, 1, 2, 3];
        let q = [0.0; 2];
        let err = |r: Result<Vec<Vec<f32>>>| r.unwrap_err().to_string();
        let bad = Heads { n_head: 3, ..shape };
        assert!(err(head_scores(&view, &cells, bad, &q, 3..4, &[0])).contains("n_head 3"));
        let bad = Heads {
            n_head_kv: 1,
            n_head: 1,
            ..shape
        };
        assert!(err(head_scores(&view, &cells, bad, &q, 3..4, &[0])).contains("n_embd 2"));
        assert!(err(head_scores(&view, &[0, 1, 2, 4], shape, &q, 3..4, &[0])).contains("cell 4"));
        assert!(err(head_scores(&view, &cells, shape, &q, 3..5, &[0])).contains("window 3..5"));
        assert!(err(head_scores(&view, &cells, shape, &q, 3..3, &[0])).contains("empty"));
        assert!(err(head_scores(&view, &cells, shape, &[0.0; 3], 3..4, &[0])).contains("3 floats"));
        assert!(err(head_scores(&view, &cells, shape, &q, 3..4, &[2])).contains("head 2"));
        assert!(head_scores(&view, &cells, shape, &q, 3..4, &[]).unwrap().is_empty());
    }
}
