//! [`build`]: the whole planning step for one sequence (validation, budgets, scores, selection, moves),
//! the budget allocation of a method ([`allocation_for`]) and their helpers. The algorithm and the
//! invariants of the [`Plan`] it returns are in the parent module's doc.
//!
//! Invariants: every input is validated before any scoring starts (see [`build`]); building never writes
//! to any KV buffer.

use super::{GroupPlan, LayerInput, LayerPlan, Method, Params, Plan, Shape, Source};
use crate::budget::Allocation;
use crate::error::Result;
use crate::profile::Profile;
use crate::score::{Heads, PoolKind};

use rayon::prelude::*;

use crate::budget::allocate;
use crate::error::Error;
use crate::score::{check_keys, head_scores, pool};
use crate::select::{select, streaming};

/// Build a plan. `cells[i]` is the cell of token `i` (positions ascending); `layers.len() == n_layer`.
/// Validates every input (shapes, window inside the prompt, budget > 0, queries length, profile shape).
///
/// Everything is validated before any scoring starts; every error is [`Error::InvalidArg`] naming the
/// bad value, except a profile that does not match `shape` ([`Error::Profile`]) and the key buffer
/// checks of [`LayerView`](crate::layout::LayerView) (already done when the views were made). Checked:
/// - `shape` (non-zero, `n_head % n_head_kv == 0`), `layers.len() == n_layer`, a non-empty `cells`
///   with distinct values, each `< n_cells` of every layer's keys;
/// - the budget: `budget > 0`, or `budget == 0` and `ratio` in `(0, 1]`, giving `ceil(ratio * n)` with
///   `ratio` read as its shortest decimal (0.1 of 1000 tokens is 100, not 101);
/// - `window >= 1` and `window <= window_end <= n` (`window_end` defaults to `n`);
/// - `pool_kernel` odd, or 0 / 1 (no pooling);
/// - every layer's keys: `n_embd == n_head_kv * head_dim`, `head_dim` a whole number of blocks;
/// - queries: exactly `window * n_head * head_dim` floats per layer (StreamingLLM: that or none);
/// - CompressKV with a profile: `n_srh >= 1`; the profile's model shape, `head_ranking` and
///   `layer_weights` lengths match `shape`; the first `n_srh` heads of every layer are distinct and
///   `< n_head`; the weights are valid for [`crate::budget::allocate`]. Other methods ignore the profile.
///
/// Resolution and edge cases:
/// - The weighted floor is `min(params.floor, avg)`, so a small budget with the default floor works.
/// - `Plan::params` holds the resolved `window_end`, `budget` (the average used, also when it came from
///   `ratio`) and, for StreamingLLM, `n_sink`.
/// - `LayerPlan::budget` is the allocated budget, not clamped to `n` (the budgets sum to `avg *
///   n_layer`); a layer keeps `min(budget, n)` tokens (fill form: `min(max budget, n)`), or the
///   sinks + window + suffix when these alone are more.
/// - Per-KV-head selection: a KV group none of whose query heads is among the layer's heads (a
///   CompressKV layer whose SRHs read other KV heads) is scored with all of its own query heads.
///   `heads_used` lists the layer's heads, then any such fallback heads (ascending).
/// - `ms_score` is the wall time of the whole call.
pub fn build(
    params: &Params,
    shape: Shape,
    profile: Option<&Profile>,
    cells: &[u32],
    layers: &[LayerInput<'_>],
) -> Result<Plan> {
    build_from(params, shape, profile, cells, Source::Host(layers))
}

/// [`build`] with the scores from `source`: the keys and queries of every layer, or an external scorer.
/// With an external scorer nothing checks keys or queries (there are none); each layer's scores are
/// checked to be one vector of `window.start` floats per head asked for, else the build fails
/// ([`Error::InvalidArg`], or the scorer's own error) and no plan is made.
pub fn build_from(
    params: &Params,
    shape: Shape,
    profile: Option<&Profile>,
    cells: &[u32],
    source: Source<'_, '_>,
) -> Result<Plan> {
    let t0 = std::time::Instant::now();
    let n = cells.len();
    let h = shape.heads;
    h.validate()?;
    if let Source::Host(layers) = &source {
        if layers.len() != shape.n_layer {
            return Err(Error::InvalidArg(format!(
                "{} layer inputs for n_layer {}",
                layers.len(),
                shape.n_layer
            )));
        }
    }
    if shape.n_layer == 0 {
        return Err(Error::InvalidArg("n_layer 0: no layers".into()));
    }
    if n == 0 {
        return Err(Error::InvalidArg("empty sequence: no cells".into()));
    }
    check_distinct(cells)?;

    let avg = resolve_budget(params, n)?;
    if params.window == 0 {
        return Err(Error::InvalidArg(
            "window length 0: the observation window needs at least one token".into(),
        ));
    }
    let we = params.window_end.unwrap_or(n);
    if we > n || params.window > we {
        return Err(Error::InvalidArg(format!(
            "window of {} tokens ending at {we} is not inside the {n} tokens of the sequence",
            params.window
        )));
    }
    let window = we - params.window..we;
    if params.pool_kernel > 1 && params.pool_kernel % 2 == 0 {
        return Err(Error::InvalidArg(format!(
            "pool_kernel {} is even; use an odd kernel",
            params.pool_kernel
        )));
    }

    let no_queries = !params.method.needs_queries();
    let want_q = params.window * h.n_head * h.head_dim;
    let host_layers: &[LayerInput<'_>] = match &source {
        Source::Host(layers) => layers,
        Source::External(_) => &[],
    };
    if matches!(source, Source::External(_)) && cells.iter().any(|&c| c > i32::MAX as u32) {
        return Err(Error::InvalidArg("a cell index exceeds int32".into()));
    }
    for (l, li) in host_layers.iter().enumerate() {
        check_keys(&li.keys, cells, h).map_err(|e| Error::InvalidArg(format!("layer {l}: {}", e.message())))?;
        let ok = li.queries.len() == want_q || (no_queries && li.queries.is_empty());
        if !ok {
            return Err(Error::InvalidArg(format!(
                "layer {l}: queries hold {} floats, expected window {} * n_head {} * head_dim {} = {want_q}",
                li.queries.len(),
                params.window,
                h.n_head,
                h.head_dim
            )));
        }
    }

    // Method: heads per layer and the allocation.
    let all_heads: Vec<usize> = (0..h.n_head).collect();
    let (allocation, floor) = allocation_for(params, profile);
    let floor = floor.min(avg);
    let (heads, fallback) = match (params.method, profile) {
        (Method::CompressKv | Method::SnapKvSrh, Some(p)) => {
            check_profile(p, params.n_srh, shape)?;
            let heads = (0..shape.n_layer).map(|l| p.srh(l, params.n_srh).to_vec()).collect();
            (heads, false)
        }
        (Method::CompressKv, None) => (vec![all_heads; shape.n_layer], true),
        (Method::SnapKvSrh, None) => {
            return Err(Error::Profile(
                "method snapkv-srh scores with the profile's SRHs: give a profile".into(),
            ))
        }
        (Method::SnapKv | Method::PyramidKv, _) => (vec![all_heads; shape.n_layer], false),
        (Method::Gate, p) => {
            let g = p.and_then(|p| p.gate.as_ref()).ok_or_else(|| {
                Error::Profile(
                    "method gate scores with the profile's key gate: give a profile that has one \
                     (llama-compresskv-calibrate --gate)"
                        .into(),
                )
            })?;
            g.validate(shape.n_layer, h.n_head_kv, h.head_dim)?;
            if matches!(source, Source::External(_)) {
                return Err(Error::InvalidArg(
                    "method gate scores from the keys, not from a scorer: plan it with the keys".into(),
                ));
            }
            (vec![all_heads; shape.n_layer], false)
        }
        (Method::StreamingLlm, _) => (vec![Vec::new(); shape.n_layer], false),
    };
    let budgets = allocate(&allocation, avg, shape.n_layer, floor).map_err(|e| match (&allocation, e) {
        (Allocation::Weighted(_), Error::InvalidArg(m)) => Error::Profile(format!("profile layer_weights: {m}")),
        (_, e) => e,
    })?;

    let mut resolved = params.clone();
    resolved.window_end = Some(we);
    resolved.budget = avg;
    resolved.n_sink = params.sinks();
    let fill_k = budgets.iter().copied().max().unwrap_or(0).min(n);

    let ctx = LayerCtx {
        params: &resolved,
        heads: h,
        cells,
        window: window.clone(),
    };
    let k_of = |budget: usize| if resolved.fill { fill_k } else { budget.min(n) };
    let external = matches!(source, Source::External(_));
    let layer_plans: Vec<LayerPlan> = match source {
        Source::Host(layers) => layers
            .par_iter()
            .zip(budgets.par_iter())
            .zip(heads.into_par_iter())
            .enumerate()
            .map(|(l, ((li, &budget), used))| {
                let mut score = |hs: &[usize]| match profile.and_then(|p| p.gate.as_ref()) {
                    Some(g) if params.method == Method::Gate => {
                        let per_kv = g.layer_scores(l, &li.keys, cells, h, window.start);
                        Ok(hs.iter().map(|&x| per_kv[x / h.group_size()].clone()).collect())
                    }
                    _ => head_scores(&li.keys, cells, h, li.queries, window.clone(), hs),
                };
                ctx.plan_layer(budget, k_of(budget), used, &mut score)
            })
            .collect::<Result<_>>()?,
        Source::External(scorer) => {
            let mut out = Vec::with_capacity(shape.n_layer);
            for (l, (&budget, used)) in budgets.iter().zip(heads).enumerate() {
                let mut score = |hs: &[usize]| {
                    let s = scorer(l, hs, window.clone())?;
                    if s.len() != hs.len() || s.iter().any(|v| v.len() != window.start) {
                        return Err(Error::InvalidArg(format!(
                            "layer {l}: the scorer returned {} vectors for {} heads, or not {} scores each",
                            s.len(),
                            hs.len(),
                            window.start
                        )));
                    }
                    if s.iter().flatten().any(|v| !v.is_finite()) {
                        return Err(Error::InvalidArg(format!(
                            "layer {l}: the scorer returned a score that is not finite"
                        )));
                    }
                    Ok(s)
                };
                out.push(ctx.plan_layer(budget, k_of(budget), used, &mut score)?);
            }
            out
        }
    };

    let n_slots = layer_plans
        .iter()
        .flat_map(|lp| lp.groups.iter().map(|g| g.kept.len()))
        .max()
        .unwrap_or(0);
    Ok(Plan {
        params: resolved,
        shape,
        n_tokens: n,
        window,
        allocation,
        layers: layer_plans,
        n_slots,
        fallback_all_heads: fallback,
        ms_score: t0.elapsed().as_secs_f64() * 1e3,
        external_scores: external,
    })
}

/// The average budget: `params.budget`, or `ceil(ratio * n)` (see [`build`]).
fn resolve_budget(params: &Params, n: usize) -> Result<usize> {
    if params.budget > 0 {
        return Ok(params.budget);
    }
    let r = params.ratio;
    if !(r.is_finite() && r > 0.0 && r <= 1.0) {
        return Err(Error::InvalidArg(format!("budget is 0 and ratio {r} is not in (0, 1]")));
    }
    // The shortest decimal that reads back as `r` (0.1f32 -> 0.1), so that ceil() does not round up
    // the f32 representation error; the tiny slack absorbs the f64 product's own rounding.
    let r: f64 = r.to_string().parse().unwrap_or(r as f64);
    let x = r * n as f64;
    Ok(((x - 1e-9 * x.max(1.0)).ceil() as usize).clamp(1, n))
}

fn check_distinct(cells: &[u32]) -> Result<()> {
    let mut sorted = cells.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        let first = cells.iter().position(|&c| c == w[0]).unwrap_or(0);
        let second = cells.iter().rposition(|&c| c == w[0]).unwrap_or(0);
        return Err(Error::InvalidArg(format!(
            "cell {} holds both token {first} and token {second}",
            w[0]
        )));
    }
    Ok(())
}

/// The budget allocation of `params.method` and its floor (before `min(floor, avg)`): weighted by the profile's
/// layer weights for CompressKV with a profile, the pyramid for PyramidKV, uniform otherwise.
pub fn allocation_for(params: &Params, profile: Option<&Profile>) -> (Allocation, usize) {
    match (params.method, profile) {
        (Method::CompressKv, Some(p)) => (Allocation::Weighted(p.layer_weights.clone()), params.floor),
        (Method::PyramidKv, _) => (
            Allocation::Pyramid {
                beta: params.pyramid_beta,
            },
            0,
        ),
        _ => (Allocation::Uniform, 0),
    }
}

fn check_profile(p: &Profile, n_srh: usize, shape: Shape) -> Result<()> {
    let perr = |m: String| Err(Error::Profile(m));
    if n_srh == 0 {
        return Err(Error::InvalidArg(
            "n_srh is 0: CompressKV needs at least one SRH per layer".into(),
        ));
    }
    let h = shape.heads;
    let m = &p.model;
    let mut diff = Vec::new();
    for (name, have, want) in [
        ("n_layer", m.n_layer, shape.n_layer),
        ("n_head", m.n_head, h.n_head),
        ("n_head_kv", m.n_head_kv, h.n_head_kv),
        ("head_dim", m.head_dim, h.head_dim),
    ] {
        if have != want {
            diff.push(format!("{name} {have} (model: {want})"));
        }
    }
    if !diff.is_empty() {
        return perr(format!("profile is for another shape: {}", diff.join(", ")));
    }
    if p.head_ranking.len() != shape.n_layer {
        return perr(format!(
            "profile head_ranking has {} layers, model has {}",
            p.head_ranking.len(),
            shape.n_layer
        ));
    }
    if p.layer_weights.len() != shape.n_layer {
        return perr(format!(
            "profile layer_weights has {} values, model has {} layers",
            p.layer_weights.len(),
            shape.n_layer
        ));
    }
    for l in 0..shape.n_layer {
        let srh = p.srh(l, n_srh);
        if srh.is_empty() {
            return perr(format!("profile head_ranking[{l}] is empty"));
        }
        for (j, &x) in srh.iter().enumerate() {
            if x >= h.n_head {
                return perr(format!(
                    "profile head_ranking[{l}] names head {x} (n_head {})",
                    h.n_head
                ));
            }
            if srh[..j].contains(&x) {
                return perr(format!("profile head_ranking[{l}] names head {x} twice"));
            }
        }
    }
    Ok(())
}

/// What every layer shares.
struct LayerCtx<'a> {
    params: &'a Params,
    heads: Heads,
    cells: &'a [u32],
    window: std::ops::Range<usize>,
}

/// The raw scores of the given query heads, one vector per head (a layer's scorer, host or external).
type HeadScorer<'s> = dyn FnMut(&[usize]) -> Result<Vec<Vec<f32>>> + 's;

impl LayerCtx<'_> {
    /// Plan one layer keeping `k` tokens per group, scored by the query heads `used`; `score(heads)` gives
    /// the raw scores of `heads` (called at most once).
    fn plan_layer(&self, budget: usize, k: usize, used: Vec<usize>, score: &mut HeadScorer) -> Result<LayerPlan> {
        let p = self.params;
        let (n, h) = (self.cells.len(), self.heads);
        let (n_groups, gs) = if p.per_head {
            (h.n_head_kv, h.group_size())
        } else {
            (1, h.n_head)
        };
        // Heads of each group (indices into `used` and the fallback heads appended to it).
        let mut heads_used = used;
        let n_used = heads_used.len();
        let mut group_heads: Vec<Vec<usize>> = Vec::with_capacity(n_groups);
        if p.method != Method::StreamingLlm {
            for g in 0..n_groups {
                let mine: Vec<usize> = (0..n_used).filter(|&j| heads_used[j] / gs == g).collect();
                if !mine.is_empty() {
                    group_heads.push(mine);
                } else {
                    let start = heads_used.len();
                    heads_used.extend(g * gs..(g + 1) * gs);
                    group_heads.push((start..heads_used.len()).collect());
                }
            }
        }

        let ws = self.window.start;
        let kept: Vec<Vec<u32>> = if p.method == Method::StreamingLlm {
            vec![streaming(n, self.window.clone(), p.n_sink, k); n_groups]
        } else if k >= n || ws == 0 {
            vec![(0..n as u32).collect(); n_groups]
        } else {
            let raw = score(&heads_used)?;
            let pooled: Vec<Vec<f32>> = raw.iter().map(|s| pool(s, p.pool_kernel, p.pool)).collect();
            group_heads
                .iter()
                .map(|gh| {
                    let s = reduce(&pooled, gh, ws, p.head_reduce);
                    select(&s, n, self.window.clone(), p.n_sink, k, p.chunk)
                })
                .collect()
        };

        let groups = kept
            .into_iter()
            .map(|kept| {
                let src = kept.iter().map(|&i| self.cells[i as usize]).collect();
                let dst = crate::compact::dst_cells(self.cells, kept.len());
                GroupPlan { kept, src, dst }
            })
            .collect();
        Ok(LayerPlan {
            budget,
            groups,
            heads_used,
        })
    }
}

/// Element-wise mean (summed in f64, in `which` order) or maximum of the vectors `pooled[j]`, `j` in `which`.
fn reduce(pooled: &[Vec<f32>], which: &[usize], len: usize, kind: PoolKind) -> Vec<f32> {
    if kind == PoolKind::Max {
        let mut acc = vec![f32::NEG_INFINITY; len];
        for &j in which {
            for (a, &x) in acc.iter_mut().zip(&pooled[j]) {
                *a = a.max(x);
            }
        }
        return acc;
    }
    let mut acc = vec![0f64; len];
    for &j in which {
        for (a, &x) in acc.iter_mut().zip(&pooled[j]) {
            *a += x as f64;
        }
    }
    let c = which.len() as f64;
    acc.into_iter().map(|a| (a / c) as f32).collect()
}

#[cfg(test)]
#[path = "builder_tests.rs"]
mod tests;
