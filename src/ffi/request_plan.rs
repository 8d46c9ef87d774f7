//! Entry points that plan a compression request: `ckv_request_plan` (the library scores each layer from its
//! keys and the captured queries) and `ckv_request_plan_scored` (the caller scores each layer, for example
//! with a graph on the device that holds the cache, and the library does the rest of the policy).
//!
//! Invariants: both resolve the request the same way ([`prepare`]: cells, profile, fitted budget) and build
//! the plan with the same builder; a request whose planning fails keeps no plan and may be planned again
//! (so a caller falls back from its scorer to the library's); the scorer is called on the calling thread,
//! once per layer that needs scores, in layer order, and its output is checked before it is used.

use super::boundary::{c_utf8, ctx, deref, run, slice_ref};
use super::params::nonneg;
use super::plan::plan_inputs;
use super::profile::model_identity;
use super::request::{ckv_request, request_mut};
use super::types::*;
use crate::budget;
use crate::error::{Error, Result};
use crate::gate;
use crate::plan::{self, Method, Source};
use crate::profile::find_profile;
use crate::profile::Profile;
use crate::recorded::Recorded;
use crate::score::head_scores;
use std::ffi::{c_char, c_void, CString};
use std::path::PathBuf;

fn profile_dir() -> PathBuf {
    match std::env::var("LLAMA_COMPRESSKV_PROFILES") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/profiles")),
    }
}

/// `ckv_request_plan`: plan the compression from the cells after the decode (and the captured queries).
///
/// # Safety
/// `req` is null or a live request; `model` null or a valid description; `meta` null or a NUL-terminated
/// string; `cells` and `pos` null or `n` values; `keys` and `queries` as for [`ckv_plan_create`].
#[no_mangle]
pub unsafe extern "C" fn ckv_request_plan(
    req: *mut ckv_request,
    model: *const ckv_model_desc,
    meta: *const c_char,
    cells: *const i32,
    pos: *const i32,
    n: i32,
    keys: *const ckv_buffer,
    queries: *const *const f32,
) -> ckv_status {
    run("ckv_request_plan", || {
        // SAFETY: forwarded to the caller.
        let (h, pre) = unsafe { prepare(req, model, meta, cells, pos, n) }?;
        // SAFETY: the cells are ours; `keys` and `queries` are forwarded to the caller.
        let inp = unsafe {
            plan_inputs(
                &pre.params,
                &pre.shape,
                pre.cells.as_ptr(),
                pre.cells.len() as i32,
                Some((keys, queries)),
            )
        }?;
        let profile = pre.profile.as_deref().map(|p| &p.profile);
        let plan = match h.req.opts.scores.clone() {
            None => plan::build(&inp.params, inp.shape, profile, &inp.cells, &inp.layers)?,
            Some(path) => {
                // the library's own scores of each layer, as `build` makes them, recorded or replayed
                let mut own = |l: usize, hs: &[usize], win: std::ops::Range<usize>| {
                    let li = inp
                        .layers
                        .get(l)
                        .ok_or_else(|| Error::InvalidArg(format!("no keys and queries of layer {l}")))?;
                    head_scores(&li.keys, &inp.cells, inp.shape.heads, li.queries, win, hs)
                };
                build_recorded(&path, &inp.params, inp.shape, profile, &inp.cells, &mut own)?
            }
        };
        h.finish_plan(plan, pre)
    })
}

/// What a request has resolved before it plans: the parameters, the model's shape, its profile, and the cells
/// and positions the plan covers.
pub(super) struct Prepared {
    pub params: ckv_params,
    pub shape: ckv_shape,
    pub profile: Option<Box<ckv_profile>>,
    pub cells: Vec<i32>,
    pub pos: Vec<i32>,
}

impl ckv_request {
    /// Keep `plan` and the cells and positions it covers: the request is planned.
    fn finish_plan(&mut self, plan: plan::Plan, pre: Prepared) -> Result<()> {
        self.plan = Some(Box::new(ckv_plan::new(plan)?));
        self.cells = pre.cells;
        self.pos = pre.pos;
        Ok(())
    }
}

/// The request behind `req`, ready to plan: its cells, the profile (the option's, or the one found for the
/// model) and the parameters with the budget fitted.
///
/// # Safety
/// As [`ckv_request_plan`]'s `req`, `model`, `meta`, `cells`, `pos` and `n`.
pub(super) unsafe fn prepare<'r>(
    req: *mut ckv_request,
    model: *const ckv_model_desc,
    meta: *const c_char,
    cells: *const i32,
    pos: *const i32,
    n: i32,
) -> Result<(&'r mut ckv_request, Prepared)> {
    // SAFETY: forwarded to the caller.
    let h = unsafe { request_mut(req) }?;
    if h.req.skip || h.plan.is_some() {
        return Err(Error::InvalidArg("the request has nothing (more) to plan".into()));
    }
    // SAFETY: forwarded to the caller.
    let m = unsafe { deref(model, "model") }?;
    // SAFETY: forwarded to the caller.
    let id = unsafe { model_identity(m) }?;
    let n = nonneg(n, "n")?;
    // SAFETY: the caller guarantees `n` values each.
    let (c_in, p_in) = unsafe { (slice_ref(cells, n, "cells")?, slice_ref(pos, n, "pos")?) };
    let (c, p) = h.req.plan_cells(c_in, p_in)?;
    let method = h.req.opts.method;
    let profile = if let Some(path) = h.req.opts.profile.clone() {
        let prof = Profile::load(&path)
            .and_then(|pr| pr.check_model(&id).map(|_| pr))
            .map_err(|e| Error::Profile(format!("profile '{path}' refused: {e}")))?;
        h.profile_path = Some(path);
        Some(prof)
    } else if method.uses_profile() {
        let dir = profile_dir();
        match find_profile(&dir, &id) {
            Ok((path, prof)) => {
                let path = path.display().to_string();
                h.note = CString::new(format!("profile {path}")).unwrap_or_default();
                h.profile_path = Some(path);
                Some(prof)
            }
            Err(e) if method == Method::Gate => {
                return Err(Error::Profile(format!(
                    "method gate scores with the model's profile (fingerprint {}), and none was found: {e}",
                    id.fingerprint
                )))
            }
            Err(e) => {
                let meta = if meta.is_null() {
                    String::new()
                } else {
                    // SAFETY: forwarded to the caller.
                    unsafe { c_utf8(meta, "meta") }?.to_string()
                };
                h.note = CString::new(format!(
                    "no profile for this model (fingerprint {} of '{meta}'): {e}; scoring with all heads, uniform budgets",
                    id.fingerprint
                ))
                .unwrap_or_default();
                h.note_warn = true;
                None
            }
        }
    } else {
        None
    };
    h.fingerprint = id.fingerprint.clone();
    let n_layer = id.n_layer;
    let prm = h.req.params(c.len(), |p, slots| {
        let (alloc, floor) = crate::plan::allocation_for(p, profile.as_ref());
        budget::fit_average(&alloc, slots, n_layer, floor).map_err(|e| ctx("budget allocation", e))
    })?;
    let params = ckv_params {
        ratio: 0.0,
        ..ckv_params::from(&prm)
    };
    let profile = profile.map(|profile| {
        Box::new(ckv_profile {
            magic: PROFILE_MAGIC,
            profile,
        })
    });
    let shape = m.shape;
    Ok((
        h,
        Prepared {
            params,
            shape,
            profile,
            cells: c,
            pos: p,
        },
    ))
}

/// The caller's scorer of [`ckv_request_plan_scored`]: for layer `il`, tokens `0..we` of the planned sequence
/// (`cells[i]` the cell of token `i`) and the window `[ws, we)`, write `n_heads` rows of `ws` floats to `out`:
/// row `j`, token `i` is the sum over the window's queries of the softmax probability of token `i` for query head
/// `heads[j]` (causal inside the window, logits `q.k / sqrt(head_dim)`). Returns 0, nonzero on failure.
pub type ckv_score_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        il: i32,
        cells: *const i32,
        ws: i32,
        we: i32,
        heads: *const i32,
        n_heads: i32,
        out: *mut f32,
    ) -> i32,
>;

/// `ckv_request_plan_scored`: as [`ckv_request_plan`], the scores of each layer from `score`. With `keys` (and
/// `queries`) the library also scores every layer itself and records the largest difference and whether both
/// select the same cells (the stats line's `"score_check"`); the plan is the scorer's.
///
/// # Safety
/// As [`ckv_request_plan`]; `score` is a function that writes `n_heads * ws` floats to `out` and does not call
/// into this request or unwind; `user` is passed to it unchanged; `keys` and `queries` are null or as for
/// [`ckv_plan_create`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ckv_request_plan_scored(
    req: *mut ckv_request,
    model: *const ckv_model_desc,
    meta: *const c_char,
    cells: *const i32,
    pos: *const i32,
    n: i32,
    score: ckv_score_fn,
    user: *mut c_void,
    keys: *const ckv_buffer,
    queries: *const *const f32,
) -> ckv_status {
    run("ckv_request_plan_scored", || {
        let f = score.ok_or_else(|| Error::Null("score is NULL".into()))?;
        // SAFETY: forwarded to the caller.
        let (h, pre) = unsafe { prepare(req, model, meta, cells, pos, n) }?;
        let check = (!keys.is_null()).then_some((keys, queries));
        // SAFETY: the cells are ours; `keys` and `queries` are forwarded to the caller.
        let inp = unsafe {
            plan_inputs(
                &pre.params,
                &pre.shape,
                pre.cells.as_ptr(),
                pre.cells.len() as i32,
                check,
            )
        }?;
        let profile = pre.profile.as_deref().map(|p| &p.profile);
        let mut max_diff = 0f64;
        // with keys: the library's own scores of each layer, for the check (computed once, next to the caller's)
        let mut own: Vec<Option<Vec<Vec<f32>>>> = vec![None; inp.layers.len()];
        // gate calibration: the keys and the scorer's (reconstruction) scores of every scored layer
        let gate_path = h.req.opts.gate_stats.clone().filter(|_| !inp.layers.is_empty());
        let hd = inp.shape.heads;
        let mut gate = gate_path
            .as_ref()
            .map(|_| gate::Stats::new(inp.shape.n_layer, hd.n_head_kv, hd.head_dim));
        let mut scorer = |l: usize, hs: &[usize], win: std::ops::Range<usize>| -> Result<Vec<Vec<f32>>> {
            let heads: Vec<i32> = hs.iter().map(|&x| x as i32).collect();
            let ws = win.start;
            let mut out = vec![0f32; hs.len() * ws];
            // SAFETY: the caller guarantees `f` writes `n_heads * ws` floats to `out` (allocated so), reads `we`
            // cells (`pre.cells` holds `n >= we`) and `n_heads` heads.
            let rc = unsafe {
                f(
                    user,
                    l as i32,
                    pre.cells.as_ptr(),
                    ws as i32,
                    win.end as i32,
                    heads.as_ptr(),
                    hs.len() as i32,
                    out.as_mut_ptr(),
                )
            };
            if rc != 0 {
                return Err(Error::InvalidArg(format!(
                    "the scorer failed for layer {l} (status {rc})"
                )));
            }
            let s: Vec<Vec<f32>> = (0..hs.len()).map(|j| out[j * ws..(j + 1) * ws].to_vec()).collect();
            if let (Some(li), Some(g)) = (inp.layers.get(l), gate.as_mut()) {
                g.accumulate(l, &li.keys, &inp.cells, hd, hs, &s);
            }
            if let Some(li) = inp.layers.get(l) {
                let mine = head_scores(&li.keys, &inp.cells, inp.shape.heads, li.queries, win, hs)?;
                for (a, b) in s.iter().flatten().zip(mine.iter().flatten()) {
                    let d = (a - b).abs() as f64;
                    max_diff = if d.is_nan() { f64::INFINITY } else { max_diff.max(d) };
                }
                own[l] = Some(mine);
            }
            Ok(s)
        };
        let plan = match h.req.opts.scores.clone() {
            None => plan::build_from(
                &inp.params,
                inp.shape,
                profile,
                &inp.cells,
                Source::External(&mut scorer),
            )?,
            Some(path) => build_recorded(&path, &inp.params, inp.shape, profile, &inp.cells, &mut scorer)?,
        };
        if let (Some(path), Some(g)) = (&gate_path, &gate) {
            g.merge_into_file(std::path::Path::new(path))?;
        }
        h.score_check = None;
        if !inp.layers.is_empty() && own.iter().any(Option::is_some) {
            // the plan the library's own scores make: the same heads are asked of the same layers, so replay them
            let mut replay = |l: usize, _: &[usize], _: std::ops::Range<usize>| {
                own[l]
                    .take()
                    .ok_or_else(|| Error::InvalidArg(format!("layer {l} was not scored")))
            };
            let mine = plan::build_from(
                &inp.params,
                inp.shape,
                profile,
                &inp.cells,
                Source::External(&mut replay),
            )?;
            let same = mine.layers.iter().zip(&plan.layers).all(|(a, b)| a.groups == b.groups);
            h.score_check = Some((max_diff, same));
        }
        h.finish_plan(plan, pre)
    })
}

/// [`plan::build_from`] through the recorded scores of option `scores` ([`crate::recorded`]): an existing file
/// answers every layer's scores (`score` is not called); otherwise `score` does, and the file is written once
/// the plan is built from its scores.
fn build_recorded(
    path: &str,
    params: &plan::Params,
    shape: plan::Shape,
    profile: Option<&Profile>,
    cells: &[u32],
    score: &mut plan::ExternalScorer<'_>,
) -> Result<plan::Plan> {
    let file = std::path::Path::new(path);
    if file.exists() {
        let rec = Recorded::read(file, shape.n_layer)?;
        let mut replay = |l: usize, hs: &[usize], win: std::ops::Range<usize>| rec.replay(l, hs, win.start);
        return plan::build_from(params, shape, profile, cells, Source::External(&mut replay));
    }
    let mut rec = Recorded::new(shape.n_layer);
    let mut record = |l: usize, hs: &[usize], win: std::ops::Range<usize>| {
        let ws = win.start;
        let s = score(l, hs, win)?;
        rec.record(l, hs, ws, &s)?;
        Ok(s)
    };
    let plan = plan::build_from(params, shape, profile, cells, Source::External(&mut record))?;
    rec.write(file)?;
    Ok(plan)
}
