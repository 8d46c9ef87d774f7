//! The whole compression step for one sequence: budgets, scores, selection and cell moves.
//!
//! [`Plan::compact`] only calls `compact::validate` / `compact::apply`.
//!
//! # Algorithm of [`build`]
//!
//! ```text
//! build(params, shape, profile, cells, layers):
//!     validate everything (see `build`'s doc); n = len(cells); window [ws, we) = [we - w, we)
//!     avg = params.budget, or ceil(ratio * n)
//!     method          heads of layer l                  allocation
//!     CompressKV      profile.srh(l, n_srh)             Weighted(profile.layer_weights), floor min(floor, avg)
//!       no profile    all heads (fallback_all_heads)    Uniform
//!     SnapKV          all heads                         Uniform
//!     PyramidKV       all heads                         Pyramid(beta)
//!     StreamingLLM    none                              Uniform (n_sink 4 when 0)
//!     Gate            all heads (no queries)            Uniform
//!     budget_l = allocate(allocation, avg, n_layer)
//!     k_l = min(fill ? max_l budget_l : budget_l, n)
//!     for each layer l (in parallel):
//!         StreamingLLM:          kept = streaming(n, window, n_sink, k_l)
//!         k_l >= n or ws == 0:   kept = 0..n (nothing to score)
//!         otherwise:
//!             raw[h] = head_scores(K_l, cells, Q_l, window, h)      for every head some group reads
//!                      (Gate: raw[h] = gate.layer_scores(l, K_l, cells)[h / gs], keys only)
//!                      (build_from with an external scorer: scorer(l, heads, window), layers in order)
//!             p[h]   = pool(raw[h], pool_kernel, pool)
//!             per layer:    s = reduce of p[h] over the layer's heads;     kept = select(s, .., k_l, chunk)
//!             per KV head:  s_g = reduce of p[h] over the layer's heads in group g (all of g's heads when
//!                           none of them is among the layer's); kept_g = select(s_g, .., k_l, chunk)
//!             reduce: head_reduce, the element-wise mean (default) or maximum
//!         group plan: kept, src = cells[kept], dst = dst_cells(cells, len(kept))
//! ```
//!
//! Invariants of a [`Plan`]:
//! - `layers.len() == n_layer`; each layer has 1 group (per-layer selection) or `n_head_kv` groups
//!   (per-KV-head selection).
//! - `kept` is strictly ascending token indices; it always contains the sinks, the window and the
//!   suffix `[window.end, n_tokens)`; `src[j] = cells[kept[j]]`, `dst = compact::dst_cells(cells, kept.len())`.
//! - A layer with `budget >= n_tokens` keeps every token (identity moves are still listed).
//! - Fill form (`fill = true`): every layer (and group) keeps `n_slots = max_l budget_l` tokens (its
//!   next-best ones), so all layers occupy the same cells. Exact form: layer `l` keeps `budget_l`.
//!   Both clamped to `n_tokens`; a layer keeps more only when its sinks, window and suffix alone are
//!   more (see [`crate::select`]).
//! - Building a plan never writes to any KV buffer; [`Plan::compact`] validates every move of every
//!   layer before the first byte moves.
//!
//! This file holds the plan's types and [`Plan::compact`]; [`build`] and its helpers are in `builder`.

mod builder;

pub use builder::{allocation_for, build, build_from};

use crate::budget::Allocation;
use crate::error::Result;
use crate::layout::{LayerView, LayerViewMut};
use crate::score::{Heads, PoolKind};

/// Scoring / eviction method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// SRH scoring + error-weighted budgets (needs a profile; without one: all heads, uniform).
    CompressKv,
    /// All query heads, uniform budgets.
    SnapKv,
    /// All query heads, pyramid budgets.
    PyramidKv,
    /// Sinks + most recent tokens, no scoring.
    StreamingLlm,
    /// Ablation: the profile's SRH scoring with uniform budgets (SnapKV + SRH; needs a profile).
    SnapKvSrh,
    /// Query-agnostic: the profile's key gate scores every cell from its key alone (no queries, no decode),
    /// uniform budgets (needs a profile with a gate, see [`crate::gate`]).
    Gate,
}

impl Method {
    /// Lower-case name as used in flags and stats.
    pub fn name(self) -> &'static str {
        match self {
            Method::CompressKv => "compresskv",
            Method::SnapKv => "snapkv",
            Method::PyramidKv => "pyramidkv",
            Method::StreamingLlm => "streamingllm",
            Method::SnapKvSrh => "snapkv-srh",
            Method::Gate => "gate",
        }
    }

    /// Whether the method scores with window queries (StreamingLLM and the gate do not: no decode).
    pub fn needs_queries(self) -> bool {
        !matches!(self, Method::StreamingLlm | Method::Gate)
    }

    /// Whether the method reads the model's profile (found for the model when the options name none).
    pub fn uses_profile(self) -> bool {
        matches!(self, Method::CompressKv | Method::SnapKvSrh | Method::Gate)
    }
}

/// Parameters of one compression (defaults: [`Params::default`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Method.
    pub method: Method,
    /// Average kept tokens per layer, window included. 0: use `ratio`.
    pub budget: usize,
    /// Fraction of the prompt to keep, used when `budget == 0`.
    pub ratio: f32,
    /// Observation window length `w`.
    pub window: usize,
    /// Token index where the window ends (exclusive); `None`: at the end of the prompt. Tokens from here
    /// to the end (a chat template's generation prompt) are always kept.
    pub window_end: Option<usize>,
    /// Sink tokens always kept at the start (StreamingLLM).
    pub n_sink: usize,
    /// Pooling kernel (odd; 1 = none).
    pub pool_kernel: usize,
    /// Pooling kind.
    pub pool: PoolKind,
    /// Chunk size for whole-span selection (0 or 1 = token level).
    pub chunk: usize,
    /// SRHs per layer (CompressKV).
    pub n_srh: usize,
    /// Per-KV-head selection instead of one token set per layer.
    pub per_head: bool,
    /// How the pooled scores of a group's heads combine: their mean ([`PoolKind::Avg`], SnapKV's), or
    /// their maximum ([`PoolKind::Max`], KVzip's: a cell that one head must read counts as that head reads it).
    pub head_reduce: PoolKind,
    /// Fill form (all layers keep `max budget`) instead of the exact form.
    pub fill: bool,
    /// Budget floor of the weighted allocation.
    pub floor: usize,
    /// PyramidKV beta.
    pub pyramid_beta: f64,
}

/// StreamingLLM's attention sinks when `n_sink` is 0.
pub const STREAMINGLLM_SINK: usize = 4;

impl Params {
    /// `n_sink` as the plan uses it: [`STREAMINGLLM_SINK`] for StreamingLLM when 0 (the one place of that rule).
    pub fn sinks(&self) -> usize {
        if self.method == Method::StreamingLlm && self.n_sink == 0 {
            STREAMINGLLM_SINK
        } else {
            self.n_sink
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        Params {
            method: Method::CompressKv,
            budget: 256,
            ratio: 0.0,
            window: 8,
            window_end: None,
            n_sink: 0,
            pool_kernel: 5,
            pool: PoolKind::Avg,
            chunk: 0,
            n_srh: 4,
            per_head: false,
            head_reduce: PoolKind::Avg,
            fill: true,
            floor: 32,
            pyramid_beta: 20.0,
        }
    }
}

/// Model attention shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Layers.
    pub n_layer: usize,
    /// Heads per layer.
    pub heads: Heads,
}

/// What the caller provides for one layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerInput<'a> {
    /// The layer's K buffer.
    pub keys: LayerView<'a>,
    /// Window queries, f32 `[w][n_head][head_dim]` (unused by StreamingLLM; may be empty then).
    pub queries: &'a [f32],
}

/// Raw head scores of one layer computed outside the library (a graph on the device that holds the cache):
/// `(layer, heads, window)` gives one vector of `window.start` floats per head of `heads`, what
/// [`crate::score::head_scores`] returns for them (window `[ws, we)` attending causally to tokens `0..we`).
pub type ExternalScorer<'s> = dyn FnMut(usize, &[usize], std::ops::Range<usize>) -> Result<Vec<Vec<f32>>> + 's;

/// Where the scores of [`build_from`] come from.
pub enum Source<'a, 'b> {
    /// The library scores each layer from its keys and window queries, layers in parallel.
    Host(&'b [LayerInput<'a>]),
    /// The caller's scorer, called once per layer that needs scores, in layer order, on the calling thread.
    External(&'b mut ExternalScorer<'a>),
}

/// Kept tokens and cell moves of one group (a layer, or one KV head of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    /// Kept token indices, ascending.
    pub kept: Vec<u32>,
    /// `cells[kept[j]]`.
    pub src: Vec<u32>,
    /// Destination cells.
    pub dst: Vec<u32>,
}

/// Plan of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPlan {
    /// The layer's budget (before fill).
    pub budget: usize,
    /// One group per layer, or one per KV head.
    pub groups: Vec<GroupPlan>,
    /// Query heads used for scoring (empty for StreamingLLM).
    pub heads_used: Vec<usize>,
}

/// A complete plan for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Parameters it was built with: `window_end`, `budget` (the average used, also when it came from
    /// `ratio`) and, for StreamingLLM, `n_sink` resolved.
    pub params: Params,
    /// Model shape.
    pub shape: Shape,
    /// Tokens of the sequence before compression.
    pub n_tokens: usize,
    /// The window `[start, end)`.
    pub window: std::ops::Range<usize>,
    /// Allocation used.
    pub allocation: Allocation,
    /// Per-layer plans.
    pub layers: Vec<LayerPlan>,
    /// Cells the sequence occupies after compaction (max kept over layers and groups).
    pub n_slots: usize,
    /// Whether CompressKV fell back to all heads (no profile).
    pub fallback_all_heads: bool,
    /// Milliseconds spent scoring and selecting.
    pub ms_score: f64,
    /// The scores came from an external scorer ([`Source::External`]), not from the keys.
    pub external_scores: bool,
}

impl Plan {
    /// Apply the plan to host buffers: `k[l]` and (optionally) `v[l]` for every layer. Validates all
    /// moves of all layers first; on error nothing was written.
    pub fn compact(&self, k: &mut [LayerViewMut<'_>], v: Option<&mut [LayerViewMut<'_>]>) -> Result<()> {
        use crate::compact::{apply_validated, validate, Moves};
        use crate::error::Error;
        use rayon::prelude::*;

        /// The same error with `p: ` in front of its message.
        fn prefixed(e: Error, p: &str) -> Error {
            let m = format!("{p}: {}", e.message());
            match e {
                Error::Null(_) => Error::Null(m),
                Error::InvalidArg(_) => Error::InvalidArg(m),
                Error::UnsupportedType(_) => Error::UnsupportedType(m),
                Error::Size(_) => Error::Size(m),
                Error::Profile(_) => Error::Profile(m),
                Error::Io(_) => Error::Io(m),
                Error::Alloc(_) => Error::Alloc(m),
                Error::Panic(_) => Error::Panic(m),
            }
        }

        let n_layer = self.layers.len();
        let n_head_kv = self.shape.heads.n_head_kv;
        // The element range of group `g` of a layer with `n_groups` groups in a buffer of `n_embd`.
        let range =
            |what: &str, l: usize, n_groups: usize, g: usize, n_embd: usize| -> Result<std::ops::Range<usize>> {
                if n_groups == 1 {
                    Ok(0..n_embd)
                } else if n_groups == n_head_kv && n_embd % n_head_kv == 0 {
                    let hd = n_embd / n_head_kv;
                    Ok(g * hd..(g + 1) * hd)
                } else {
                    Err(Error::InvalidArg(format!(
                        "layer {l}: {n_groups} groups for a {what} of {n_embd} elements and {n_head_kv} KV heads \
                         (need 1 group, or one per KV head dividing the cell)"
                    )))
                }
            };
        let moves_of = |what: &str, l: usize, view: &LayerViewMut<'_>| -> Result<Vec<Moves<'_>>> {
            let groups = &self.layers[l].groups;
            let n_embd = view.geometry().n_embd;
            groups
                .iter()
                .enumerate()
                .map(|(g, gp)| {
                    Ok(Moves {
                        src: &gp.src,
                        dst: &gp.dst,
                        elems: range(what, l, groups.len(), g, n_embd)?,
                    })
                })
                .collect()
        };

        // 1. Validate everything before the first byte moves.
        if k.len() != n_layer {
            return Err(Error::InvalidArg(format!(
                "{} K buffers for a plan of {n_layer} layers",
                k.len()
            )));
        }
        if let Some(v) = v.as_deref() {
            if v.len() != n_layer {
                return Err(Error::InvalidArg(format!(
                    "{} V buffers for a plan of {n_layer} layers",
                    v.len()
                )));
            }
        }
        let check = |what: &str, bufs: &[LayerViewMut<'_>]| -> Result<()> {
            for (l, view) in bufs.iter().enumerate() {
                for (g, m) in moves_of(what, l, view)?.iter().enumerate() {
                    validate(view.geometry(), m).map_err(|e| prefixed(e, &format!("layer {l} {what} group {g}")))?;
                }
            }
            Ok(())
        };
        check("K", k)?;
        if let Some(v) = v.as_deref() {
            check("V", v)?;
        }

        // 2. Move (K, V and layers are independent buffers: in parallel). Cannot fail after step 1.
        let run = |what: &str, bufs: &mut [LayerViewMut<'_>]| {
            bufs.par_iter_mut().enumerate().for_each(|(l, view)| {
                let moves = moves_of(what, l, view).expect("validated");
                for m in &moves {
                    apply_validated(view, m);
                }
            });
        };
        rayon::join(
            || run("K", k),
            || {
                if let Some(v) = v {
                    run("V", v)
                }
            },
        );
        Ok(())
    }
}
