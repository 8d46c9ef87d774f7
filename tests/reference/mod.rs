//! A slow, obviously-correct reference of the compression pipeline (docs/design.md §1.1, §1.3 and the
//! contracts of `score`, `select`, `budget` and `plan`), written for clarity, not speed.
//!
//! Arithmetic is f64 wherever the library may use f32: dense logits, a full softmax per window query,
//! sums of probabilities, pooling over an explicitly padded vector, the mean (or maximum) over heads, chunk means.
//! Selection sorts every candidate with the tie rule spelled out.
//!
//! Because the library computes in f32, two reference scores closer than a tolerance may come out in
//! either order there. Every selection therefore also reports its `margin`: the smallest non-zero gap
//! between a score its outcome depends on and any competing score. Scores that are exactly equal here
//! (max pooling copies one value to neighbouring tokens) are equal in the library too, where the tie
//! rule decides the same way, so exact ties do not narrow the margin.

#![allow(dead_code)]
// Index loops read closest to the definitions they transcribe.
#![allow(clippy::needless_range_loop)]

use compresskv::budget::Allocation;
use compresskv::plan::{Method, Params};
use compresskv::profile::Profile;
use compresskv::score::PoolKind;

/// Attention shape of one layer.
#[derive(Debug, Clone, Copy)]
pub struct Attn {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

/// Raw score of every prefix token `i < ws` for query head `h`.
/// `keys[t]` is token t's key row (`n_head_kv * head_dim` values), `queries` is `[w][n_head][head_dim]`.
pub fn head_scores(keys: &[Vec<f32>], queries: &[f32], a: Attn, ws: usize, we: usize, h: usize) -> Vec<f64> {
    let d = a.head_dim;
    let group_size = a.n_head / a.n_head_kv;
    let g = h / group_size;
    let mut score = vec![0.0f64; ws];
    for r in 0..(we - ws) {
        let q = &queries[(r * a.n_head + h) * d..(r * a.n_head + h + 1) * d];
        // window query r is token ws + r: it sees keys 0 ..= ws + r
        let visible = ws + r + 1;
        let mut logits = Vec::with_capacity(visible);
        for key in keys.iter().take(visible) {
            let k = &key[g * d..(g + 1) * d];
            let dot: f64 = q.iter().zip(k).map(|(x, y)| *x as f64 * *y as f64).sum();
            logits.push(dot / (d as f64).sqrt());
        }
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = logits.iter().map(|z| (z - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        for i in 0..ws {
            score[i] += exps[i] / total;
        }
    }
    score
}

/// The key gate's score of tokens `0..ws` for KV head `g`: `exp(clamp(w . [k^2, k, 1], -30, 30))`, in f64.
pub fn gate_scores(keys: &[Vec<f32>], w: &[f32], a: Attn, ws: usize, g: usize) -> Vec<f64> {
    let d = a.head_dim;
    (0..ws)
        .map(|i| {
            let k = &keys[i][g * d..(g + 1) * d];
            let mut s = w[2 * d] as f64;
            for j in 0..d {
                let x = k[j] as f64;
                s += w[j] as f64 * x * x + w[d + j] as f64 * x;
            }
            s.clamp(-30.0, 30.0).exp()
        })
        .collect()
}

/// Pooling with explicit padding: `k/2` values on the left, `k - 1 - k/2` on the right; zeros for
/// average pooling (which always divides by `k`), minus infinity for max pooling (ignored).
pub fn pool(x: &[f64], k: usize, kind: PoolKind) -> Vec<f64> {
    if k <= 1 {
        return x.to_vec();
    }
    let pad_value = match kind {
        PoolKind::Avg => 0.0,
        PoolKind::Max => f64::NEG_INFINITY,
    };
    let mut padded = vec![pad_value; k / 2];
    padded.extend_from_slice(x);
    padded.extend(std::iter::repeat(pad_value).take(k - 1 - k / 2));
    (0..x.len())
        .map(|i| {
            let win = &padded[i..i + k];
            match kind {
                PoolKind::Avg => win.iter().sum::<f64>() / k as f64,
                PoolKind::Max => win.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            }
        })
        .collect()
}

/// Element-wise mean of several vectors.
pub fn mean(vectors: &[&Vec<f64>]) -> Vec<f64> {
    let len = vectors[0].len();
    (0..len)
        .map(|i| vectors.iter().map(|v| v[i]).sum::<f64>() / vectors.len() as f64)
        .collect()
}

/// Element-wise maximum of several vectors.
pub fn max(vectors: &[&Vec<f64>]) -> Vec<f64> {
    let len = vectors[0].len();
    (0..len)
        .map(|i| vectors.iter().map(|v| v[i]).fold(f64::NEG_INFINITY, f64::max))
        .collect()
}

/// A selection and how robust it is (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub kept: Vec<u32>,
    /// Smallest non-zero relative gap between a deciding score and a competitor; infinity when nothing was decided.
    pub margin: f64,
}

/// Indices sorted best first: higher score first, equal scores by lower index.
fn ranked(scores: &[f64], candidates: &[usize]) -> Vec<usize> {
    let mut order = candidates.to_vec();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    order
}

/// Relative gap from `v` to the nearest different value among `values`: `|x - v| / max(|x|, |v|)`.
fn nearest_other(v: f64, values: impl Iterator<Item = f64>) -> f64 {
    values
        .filter(|&x| x != v)
        .map(|x| (x - v).abs() / x.abs().max(v.abs()))
        .fold(f64::INFINITY, f64::min)
}

/// The best `r` of `candidates` by `scores`, and the margin of that choice.
fn top_tokens(scores: &[f64], candidates: &[usize], r: usize) -> (Vec<usize>, f64) {
    let order = ranked(scores, candidates);
    let margin = if r > 0 && r < order.len() {
        // the r-th best value separates kept from dropped; any value close to it could cross over
        let boundary = scores[order[r - 1]];
        nearest_other(boundary, candidates.iter().map(|&i| scores[i]))
    } else {
        f64::INFINITY
    };
    (order[..r.min(order.len())].to_vec(), margin)
}

/// Selection of `k` tokens (window `[ws, we)`, `n` tokens, `n_sink` sinks, chunk size `chunk`).
pub fn select(scores: &[f64], n: usize, ws: usize, we: usize, n_sink: usize, k: usize, chunk: usize) -> Selection {
    assert!(ws <= we && we <= n && scores.len() == ws);
    let done = |kept: Vec<bool>, margin: f64| Selection {
        kept: (0..n).filter(|&i| kept[i]).map(|i| i as u32).collect(),
        margin,
    };
    if k >= n {
        return done(vec![true; n], f64::INFINITY);
    }
    let mut kept = vec![false; n];
    for i in 0..n {
        let is_sink = i < n_sink;
        let in_window_or_suffix = i >= ws;
        kept[i] = is_sink || in_window_or_suffix;
    }
    let always = kept.iter().filter(|&&x| x).count();
    if k <= always {
        return done(kept, f64::INFINITY);
    }
    let mut r = k - always;
    let mut margin = f64::INFINITY;

    if chunk > 1 {
        let n_chunks = ws.div_ceil(chunk);
        let tokens = |c: usize| (c * chunk)..((c + 1) * chunk).min(ws);
        let means: Vec<f64> = (0..n_chunks)
            .map(|c| tokens(c).map(|i| scores[i]).sum::<f64>() / tokens(c).len() as f64)
            .collect();
        let cost = |c: usize, kept: &[bool]| tokens(c).filter(|&i| !kept[i]).count();
        let eligible: Vec<usize> = (0..n_chunks).filter(|&c| cost(c, &kept) > 0).collect();
        let order = ranked(&means, &eligible);
        // Greedy: best chunks first while they fit; the first that does not fit stops the walk.
        let mut stopped_at = None;
        for (rank, &c) in order.iter().enumerate() {
            let cst = cost(c, &kept);
            if cst > r {
                stopped_at = Some(rank);
                break;
            }
            for i in tokens(c) {
                kept[i] = true;
            }
            r -= cst;
        }
        // If the walk stopped, the ranks of the chunks up to the stopping one decided the outcome.
        if let Some(stop) = stopped_at {
            for &c in &order[..=stop] {
                margin = margin.min(nearest_other(means[c], eligible.iter().map(|&o| means[o])));
            }
        }
    }

    let candidates: Vec<usize> = (0..ws).filter(|&i| !kept[i]).collect();
    let (best, m) = top_tokens(scores, &candidates, r);
    margin = margin.min(m);
    for i in best {
        kept[i] = true;
    }
    done(kept, margin)
}

/// StreamingLLM: sinks, then the most recent prefix tokens, plus window and suffix.
pub fn streaming(n: usize, ws: usize, n_sink: usize, k: usize) -> Vec<u32> {
    if k >= n {
        return (0..n as u32).collect();
    }
    let mut kept: Vec<bool> = (0..n).map(|i| i < n_sink || i >= ws).collect();
    let mut extra = k.saturating_sub(kept.iter().filter(|&&x| x).count());
    let mut i = ws;
    while extra > 0 {
        i -= 1;
        if !kept[i] {
            kept[i] = true;
            extra -= 1;
        }
    }
    (0..n).filter(|&i| kept[i]).map(|i| i as u32).collect()
}

/// Per-layer budgets, docs/design.md §1.3 and the PyramidKV schedule, one token at a time.
pub fn allocate(alloc: &Allocation, avg: usize, n_layer: usize, floor: usize) -> Vec<usize> {
    let total = avg * n_layer;
    match alloc {
        Allocation::Uniform => vec![avg; n_layer],
        Allocation::Pyramid { beta } => {
            let min = avg as f64 / beta;
            let max = 2.0 * avg as f64 - min;
            let target: Vec<f64> = (0..n_layer)
                .map(|l| {
                    if n_layer == 1 {
                        avg as f64
                    } else {
                        max - l as f64 * (max - min) / (n_layer - 1) as f64
                    }
                })
                .collect();
            let mut b: Vec<usize> = target.iter().map(|t| t.round() as usize).collect();
            // repair: give to the layer rounded down the most / take from the one rounded up the most
            let mut sum: usize = b.iter().sum();
            while sum != total {
                let residual = |l: usize| target[l] - b[l] as f64;
                let mut pick = 0;
                for l in 0..n_layer {
                    let better = if sum < total {
                        residual(l) > residual(pick)
                    } else {
                        residual(l) < residual(pick)
                    };
                    if better {
                        pick = l;
                    }
                }
                if sum < total {
                    b[pick] += 1;
                    sum += 1;
                } else {
                    b[pick] -= 1;
                    sum -= 1;
                }
            }
            b
        }
        Allocation::Weighted(p) => {
            let p_sum: f64 = p.iter().sum();
            let cap = 3 * avg;
            let spread = (total - floor * n_layer) as f64;
            let mut b: Vec<usize> = p
                .iter()
                .map(|w| (floor + (w / p_sum * spread).round() as usize).clamp(floor, cap))
                .collect();
            let mut by_importance: Vec<usize> = (0..n_layer).collect();
            by_importance.sort_by(|&x, &y| p[y].partial_cmp(&p[x]).unwrap().then(x.cmp(&y)));
            let mut by_unimportance: Vec<usize> = (0..n_layer).collect();
            by_unimportance.sort_by(|&x, &y| p[x].partial_cmp(&p[y]).unwrap().then(x.cmp(&y)));
            let mut sum: usize = b.iter().sum();
            let mut turn = 0;
            while sum < total {
                let l = by_importance[turn % n_layer];
                if b[l] < cap {
                    b[l] += 1;
                    sum += 1;
                }
                turn += 1;
            }
            let mut turn = 0;
            while sum > total {
                let l = by_unimportance[turn % n_layer];
                if b[l] > floor {
                    b[l] -= 1;
                    sum -= 1;
                }
                turn += 1;
            }
            b
        }
    }
}

/// One layer's input: keys by token (not by cell) and the window queries.
pub struct RefLayer {
    pub keys: Vec<Vec<f32>>,
    pub queries: Vec<f32>,
}

/// The reference plan: budgets and, per layer, the heads used and each group's selection.
#[derive(Debug)]
pub struct RefPlan {
    pub avg: usize,
    pub window: (usize, usize),
    pub n_sink: usize,
    pub allocation: Allocation,
    pub budgets: Vec<usize>,
    pub heads_used: Vec<Vec<usize>>,
    pub groups: Vec<Vec<Selection>>,
    /// Per layer, per group: the mean score of every prefix token (empty when nothing was scored).
    pub scores: Vec<Vec<Vec<f64>>>,
    pub fallback: bool,
}

/// The whole plan, following `plan::build`'s documented resolution rules.
pub fn plan(params: &Params, a: Attn, profile: Option<&Profile>, layers: &[RefLayer]) -> RefPlan {
    let n = layers[0].keys.len();
    let n_layer = layers.len();
    let avg = if params.budget > 0 {
        params.budget
    } else {
        let r: f64 = params.ratio.to_string().parse().unwrap();
        ((r * n as f64 - 1e-9).ceil() as usize).clamp(1, n)
    };
    let we = params.window_end.unwrap_or(n);
    let ws = we - params.window;
    let all_heads: Vec<usize> = (0..a.n_head).collect();

    let mut fallback = false;
    let mut n_sink = params.n_sink;
    let (heads, allocation, floor): (Vec<Vec<usize>>, Allocation, usize) = match params.method {
        Method::CompressKv => match profile {
            Some(p) => {
                let heads = (0..n_layer)
                    .map(|l| p.head_ranking[l].iter().take(params.n_srh).cloned().collect())
                    .collect();
                (
                    heads,
                    Allocation::Weighted(p.layer_weights.clone()),
                    params.floor.min(avg),
                )
            }
            None => {
                fallback = true;
                (vec![all_heads.clone(); n_layer], Allocation::Uniform, 0)
            }
        },
        Method::SnapKvSrh => {
            let p = profile.expect("snapkv-srh needs a profile");
            let heads = (0..n_layer)
                .map(|l| p.head_ranking[l].iter().take(params.n_srh).cloned().collect())
                .collect();
            (heads, Allocation::Uniform, 0)
        }
        Method::SnapKv => (vec![all_heads.clone(); n_layer], Allocation::Uniform, 0),
        Method::PyramidKv => (
            vec![all_heads.clone(); n_layer],
            Allocation::Pyramid {
                beta: params.pyramid_beta,
            },
            0,
        ),
        Method::StreamingLlm => {
            if n_sink == 0 {
                n_sink = 4;
            }
            (vec![Vec::new(); n_layer], Allocation::Uniform, 0)
        }
        Method::Gate => (vec![all_heads.clone(); n_layer], Allocation::Uniform, 0),
    };
    let budgets = allocate(&allocation, avg, n_layer, floor);
    let max_budget = *budgets.iter().max().unwrap();

    let group_size = a.n_head / a.n_head_kv;
    let n_groups = if params.per_head { a.n_head_kv } else { 1 };
    let mut out_heads = Vec::new();
    let mut out_groups = Vec::new();
    let mut out_scores = Vec::new();
    for (l, layer) in layers.iter().enumerate() {
        let k = if params.fill {
            max_budget.min(n)
        } else {
            budgets[l].min(n)
        };
        let mut used = heads[l].clone();
        // which heads score each group
        let mut group_heads: Vec<Vec<usize>> = Vec::new();
        if params.method != Method::StreamingLlm {
            for g in 0..n_groups {
                let mine: Vec<usize> = if params.per_head {
                    heads[l].iter().cloned().filter(|h| h / group_size == g).collect()
                } else {
                    heads[l].clone()
                };
                if mine.is_empty() {
                    let own: Vec<usize> = (g * group_size..(g + 1) * group_size).collect();
                    used.extend(own.iter().cloned());
                    group_heads.push(own);
                } else {
                    group_heads.push(mine);
                }
            }
        }
        let mut sels = Vec::new();
        let mut layer_scores = Vec::new();
        for g in 0..n_groups {
            if params.method == Method::StreamingLlm {
                let kept = streaming(n, ws, n_sink, k);
                sels.push(Selection {
                    kept,
                    margin: f64::INFINITY,
                });
            } else if k >= n || ws == 0 {
                sels.push(Selection {
                    kept: (0..n as u32).collect(),
                    margin: f64::INFINITY,
                });
            } else {
                let pooled: Vec<Vec<f64>> = group_heads[g]
                    .iter()
                    .map(|&h| {
                        let raw = if params.method == Method::Gate {
                            let gate = profile
                                .and_then(|p| p.gate.as_ref())
                                .expect("gate needs a profile's gate");
                            gate_scores(&layer.keys, &gate.weights[l][h / group_size], a, ws, h / group_size)
                        } else {
                            head_scores(&layer.keys, &layer.queries, a, ws, we, h)
                        };
                        pool(&raw, params.pool_kernel, params.pool)
                    })
                    .collect();
                let s = match params.head_reduce {
                    PoolKind::Avg => mean(&pooled.iter().collect::<Vec<_>>()),
                    PoolKind::Max => max(&pooled.iter().collect::<Vec<_>>()),
                };
                sels.push(select(&s, n, ws, we, params.n_sink, k, params.chunk));
                layer_scores.push(s);
            }
        }
        out_heads.push(used);
        out_groups.push(sels);
        out_scores.push(layer_scores);
    }
    RefPlan {
        avg,
        window: (ws, we),
        n_sink,
        allocation,
        budgets,
        heads_used: out_heads,
        groups: out_groups,
        scores: out_scores,
        fallback,
    }
}
