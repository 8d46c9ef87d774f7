//! The plan entry points: `ckv_plan_create`, `ckv_plan_free`, the accessors (`ckv_plan_n_slots`,
//! `ckv_plan_n_groups`, `ckv_plan_fallback`, `ckv_plan_group`, `ckv_plan_budget`) and
//! `ckv_plan_stats_json`; plus [`plan_into_handle`] for Rust callers that build a [`Plan`] themselves.
//!
//! Invariants: `ckv_plan_create` reads the caller's buffers and writes none; it validates params, shape,
//! profile, cells (in range of every layer, no duplicates) and key buffers before planning. A handle is a
//! `Box` freed once by `ckv_plan_free` (which clears its magic word); the arrays `ckv_plan_group` hands out
//! are owned by the handle and live as long as it does. The accessors return -1 (and set the last error)
//! on error; `ckv_plan_stats_json` writes `*needed` even when `buf` is too small, as the header specifies.

use std::ffi::c_char;

use super::boundary::{check_ptr, ctx, deref, plan_ref, profile_ref, put, run, run_value, slice_ref};
use super::compact::buffer_view;
use super::params::{read_params, to_params, to_shape};
use super::types::*;
use crate::budget::Allocation;
use crate::error::{Error, Result};
use crate::plan::{self, LayerInput, Method, Params, Plan, Shape};
use crate::profile::ModelIdentity;
use crate::score::PoolKind;

pub(super) fn stats_json(h: &ckv_plan) -> String {
    use serde_json::json;
    let p = &h.plan;
    let layers: Vec<serde_json::Value> = p
        .layers
        .iter()
        .map(|l| {
            let kept = l.groups.iter().map(|g| g.kept.len()).max().unwrap_or(0);
            let mut o = json!({"budget": l.budget, "kept": kept, "heads": l.heads_used});
            if l.groups.len() > 1 {
                o["kept_groups"] = json!(l.groups.iter().map(|g| g.kept.len()).collect::<Vec<_>>());
            }
            o
        })
        .collect();
    let allocation = match &p.allocation {
        Allocation::Uniform => "uniform",
        Allocation::Pyramid { .. } => "pyramid",
        Allocation::Weighted(_) => "weighted",
    };
    json!({
        "method": p.params.method.name(),
        "n_prompt": p.n_tokens,
        "budget": p.params.budget,
        "ratio": p.params.ratio,
        "window": {"start": p.window.start, "len": p.window.len()},
        "n_suffix": p.n_tokens.saturating_sub(p.window.end),
        "n_sink": p.params.n_sink,
        "pool_kernel": p.params.pool_kernel,
        "pool": match p.params.pool { PoolKind::Avg => "avg", PoolKind::Max => "max" },
        "chunk": p.params.chunk,
        "n_srh": p.params.n_srh,
        "per_head": p.params.per_head,
        "fill": p.params.fill,
        "allocation": allocation,
        "n_layer": p.shape.n_layer,
        "n_groups": h.groups.first().map_or(0, |g| g.len()),
        "n_slots": p.n_slots,
        "fallback_all_heads": p.fallback_all_heads,
        "ms_score": p.ms_score,
        "layers": layers,
    })
    .to_string()
}

/// `ckv_plan_create`: plan the compression of one sequence (reads the buffers, writes none).
///
/// # Safety
/// Every pointer is null or valid as the header describes: `params` for `params->size` bytes, `shape` one
/// struct, `profile` a live handle, `cells` `n_tokens` values, `keys` `shape->n_layer` buffers each readable
/// for its `size` bytes, `queries` `shape->n_layer` pointers each to `window * n_head * head_dim` floats,
/// `out` a pointer write. None of the buffers may be written during the call.
#[no_mangle]
pub unsafe extern "C" fn ckv_plan_create(
    params: *const ckv_params,
    shape: *const ckv_shape,
    profile: *const ckv_profile,
    cells: *const i32,
    n_tokens: i32,
    keys: *const ckv_buffer,
    queries: *const *const f32,
    out: *mut *mut ckv_plan,
) -> ckv_status {
    run("ckv_plan_create", || {
        if params.is_null() {
            return Err(Error::Null("params is NULL".into()));
        }
        check_ptr(out, "out")?;
        // SAFETY: non-null; the caller guarantees `params->size` readable bytes.
        let cp = unsafe { read_params(params) }?;
        // SAFETY: the caller guarantees a valid ckv_shape when non-null.
        let shp = unsafe { deref(shape, "shape") }?;
        // SAFETY: the caller guarantees `n_tokens` cells, `n_layer` key buffers and query pointers.
        let inp = unsafe { plan_inputs(&cp, shp, cells, n_tokens, Some((keys, queries))) }?;
        let profile = if profile.is_null() {
            None
        } else {
            // SAFETY: non-null; the caller guarantees a live handle.
            Some(&unsafe { profile_ref(profile) }?.profile)
        };
        if let Some(p) = profile {
            let heads = inp.shape.heads;
            let want = ModelIdentity {
                arch: p.model.arch.clone(),
                n_layer: inp.shape.n_layer,
                n_head: heads.n_head,
                n_head_kv: heads.n_head_kv,
                head_dim: heads.head_dim,
                fingerprint: p.model.fingerprint.clone(),
            };
            p.check_model(&want).map_err(|e| ctx("profile vs shape", e))?;
        }
        let plan = plan::build(&inp.params, inp.shape, profile, &inp.cells, &inp.layers)?;
        let h = Box::new(ckv_plan::new(plan)?);
        // SAFETY: `out` is non-null and aligned (checked above).
        unsafe { put(out, Box::into_raw(h)) };
        Ok(())
    })
}

/// The validated inputs of a plan: parameters, shape, cells and, when keys are given, each layer's keys
/// and window queries.
pub(super) struct PlanInputs<'a> {
    pub params: Params,
    pub shape: Shape,
    pub cells: Vec<u32>,
    pub layers: Vec<LayerInput<'a>>,
}

/// Validate and convert what [`ckv_plan_create`] takes (see its checks); `keys_queries` None: no layer inputs
/// (an external scorer gives the scores).
///
/// # Safety
/// `cells` null or `n_tokens` values; `keys_queries` as [`ckv_plan_create`]'s `keys` and `queries`, readable and
/// unwritten for `'a`.
pub(super) unsafe fn plan_inputs<'a>(
    cp: &ckv_params,
    shape: &ckv_shape,
    cells: *const i32,
    n_tokens: i32,
    keys_queries: Option<(*const ckv_buffer, *const *const f32)>,
) -> Result<PlanInputs<'a>> {
    let mut prm = to_params(cp)?;
    let shp = to_shape(shape, "shape")?;
    let heads = shp.heads;
    let n = usize::try_from(n_tokens)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::InvalidArg(format!("n_tokens: {n_tokens} (expected > 0)")))?;
    if prm.window > n {
        return Err(Error::InvalidArg(format!(
            "params.window {} > n_tokens {n}",
            prm.window
        )));
    }
    if let Some(e) = prm.window_end {
        if e > n {
            return Err(Error::InvalidArg(format!("params.window_end {e} > n_tokens {n}")));
        }
        if e < prm.window {
            return Err(Error::InvalidArg(format!(
                "params.window_end {e} < params.window {}",
                prm.window
            )));
        }
        if e == n {
            prm.window_end = None;
        }
    }
    // SAFETY: the caller guarantees `n_tokens` readable int32_t when non-null.
    let cells_in = unsafe { slice_ref(cells, n, "cells") }?;
    let streaming = prm.method == Method::StreamingLlm;
    let no_queries = !prm.method.needs_queries();
    let mut views = Vec::with_capacity(shp.n_layer);
    let mut q_ptrs: Option<&[*const f32]> = None;
    if let Some((keys, queries)) = keys_queries {
        // SAFETY: the caller guarantees `n_layer` readable ckv_buffer when non-null.
        let key_bufs = unsafe { slice_ref(keys, shp.n_layer, "keys") }?;
        if !(queries.is_null() && no_queries) {
            // SAFETY: the caller guarantees `n_layer` readable pointers when non-null.
            q_ptrs = Some(unsafe { slice_ref(queries, shp.n_layer, "queries") }?);
        }
        let n_embd = heads.n_head_kv * heads.head_dim;
        for (l, b) in key_bufs.iter().enumerate() {
            let what = format!("keys[{l}]");
            // SAFETY: the caller guarantees `b.size` readable bytes at `b.data`, unwritten for 'a.
            let v = unsafe { buffer_view(b, &what) }?;
            let g = *v.geometry();
            if g.n_embd != n_embd {
                return Err(Error::InvalidArg(format!(
                    "{what}.n_embd {} != shape.n_head_kv * shape.head_dim = {n_embd}",
                    g.n_embd
                )));
            }
            if !streaming && g.ty.is_quantized() && heads.head_dim % g.ty.block_elems() != 0 {
                return Err(Error::UnsupportedType(format!(
                    "{what}.type {}: head_dim {} is not a multiple of its block size {}",
                    g.ty.name(),
                    heads.head_dim,
                    g.ty.block_elems()
                )));
            }
            views.push(v);
        }
    }
    let min_cells = views
        .iter()
        .map(|v| v.geometry().n_cells)
        .min()
        .unwrap_or(i32::MAX as usize);
    let mut cell_u = Vec::with_capacity(n);
    for (i, &c) in cells_in.iter().enumerate() {
        let cu = usize::try_from(c).map_err(|_| Error::InvalidArg(format!("cells[{i}]: {c} < 0")))?;
        if cu >= min_cells {
            let l = views.iter().position(|v| cu >= v.geometry().n_cells).unwrap_or(0);
            return Err(Error::InvalidArg(format!(
                "cells[{i}]: {c} is not a cell of keys[{l}] (n_cells {})",
                views[l].geometry().n_cells
            )));
        }
        cell_u.push(c as u32);
    }
    let mut sorted: Vec<(u32, usize)> = cell_u.iter().copied().zip(0..).collect();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::InvalidArg(format!(
            "cells[{}] and cells[{}] are both cell {}",
            w[0].1.min(w[1].1),
            w[0].1.max(w[1].1),
            w[0].0
        )));
    }
    let qlen = prm
        .window
        .checked_mul(heads.n_head)
        .and_then(|x| x.checked_mul(heads.head_dim))
        .ok_or_else(|| Error::Size("window * n_head * head_dim overflows".into()))?;
    let mut layers = Vec::with_capacity(views.len());
    for (l, v) in views.into_iter().enumerate() {
        let q: &[f32] = match q_ptrs {
            Some(ps) if !(streaming && ps[l].is_null()) => {
                // SAFETY: the caller guarantees `window * n_head * head_dim` readable floats per layer.
                unsafe { slice_ref(ps[l], qlen, &format!("queries[{l}]")) }?
            }
            _ => &[],
        };
        layers.push(LayerInput { keys: v, queries: q });
    }
    Ok(PlanInputs {
        params: prm,
        shape: shp,
        cells: cell_u,
        layers,
    })
}

/// `ckv_plan_free`: free a plan handle (NULL is allowed).
///
/// # Safety
/// `plan` is null or a live handle from [`ckv_plan_create`], not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ckv_plan_free(plan: *mut ckv_plan) {
    if plan.is_null() {
        return;
    }
    let _ = run("ckv_plan_free", || {
        // SAFETY: non-null; the caller guarantees a live handle (the magic check is best effort).
        unsafe { plan_ref(plan) }?;
        // SAFETY: a live handle was produced by Box::into_raw in ckv_plan_create and is freed once.
        let mut b = unsafe { Box::from_raw(plan) };
        b.magic = 0;
        drop(b);
        Ok(())
    });
}

/// Hand a plan handle out to C (for Rust callers and tests that build a [`Plan`] themselves).
pub fn plan_into_handle(plan: Plan) -> Result<*mut ckv_plan> {
    Ok(Box::into_raw(Box::new(ckv_plan::new(plan)?)))
}

/// `ckv_plan_n_slots`: cells the sequence occupies after compaction; -1 (and the last error) on error.
///
/// # Safety
/// `plan` is null or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ckv_plan_n_slots(plan: *const ckv_plan) -> i32 {
    run_value("ckv_plan_n_slots", -1, || {
        // SAFETY: null or a live handle (caller).
        let h = unsafe { plan_ref(plan) }?;
        Ok(h.plan.n_slots as i32)
    })
}

/// `ckv_plan_n_groups`: 1, or `n_head_kv` with per-head selection; -1 (and the last error) on error.
///
/// # Safety
/// `plan` is null or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ckv_plan_n_groups(plan: *const ckv_plan) -> i32 {
    run_value("ckv_plan_n_groups", -1, || {
        // SAFETY: null or a live handle (caller).
        let h = unsafe { plan_ref(plan) }?;
        Ok(h.groups.first().map_or(0, |g| g.len()) as i32)
    })
}

/// `ckv_plan_fallback`: 1 if CompressKV fell back to all heads; -1 (and the last error) on error.
///
/// # Safety
/// `plan` is null or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ckv_plan_fallback(plan: *const ckv_plan) -> i32 {
    run_value("ckv_plan_fallback", -1, || {
        // SAFETY: null or a live handle (caller).
        let h = unsafe { plan_ref(plan) }?;
        Ok(h.plan.fallback_all_heads as i32)
    })
}

/// `ckv_plan_group`: kept tokens and moves of layer `il`, group `ig` (pointers owned by the plan).
///
/// # Safety
/// `plan` is null or a live handle; each out pointer is null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn ckv_plan_group(
    plan: *const ckv_plan,
    il: i32,
    ig: i32,
    n_kept: *mut i32,
    kept: *mut *const i32,
    src: *mut *const i32,
    dst: *mut *const i32,
) -> ckv_status {
    run("ckv_plan_group", || {
        // SAFETY: null or a live handle (caller).
        let h = unsafe { plan_ref(plan) }?;
        let nl = h.groups.len();
        let layer = usize::try_from(il)
            .ok()
            .and_then(|l| h.groups.get(l))
            .ok_or_else(|| Error::InvalidArg(format!("layer il {il} is not in 0..{nl}")))?;
        let g = usize::try_from(ig)
            .ok()
            .and_then(|g| layer.get(g))
            .ok_or_else(|| Error::InvalidArg(format!("group ig {ig} is not in 0..{}", layer.len())))?;
        for (p, what) in [(kept, "kept"), (src, "src"), (dst, "dst")] {
            if !p.is_null() {
                check_ptr(p, what)?;
            }
        }
        if !n_kept.is_null() {
            check_ptr(n_kept, "n_kept")?;
        }
        // SAFETY (all four): each pointer, when non-null, was checked aligned and is writable (caller).
        unsafe {
            if !n_kept.is_null() {
                put(n_kept, g.kept.len() as i32);
            }
            if !kept.is_null() {
                put(kept, g.kept.as_ptr());
            }
            if !src.is_null() {
                put(src, g.src.as_ptr());
            }
            if !dst.is_null() {
                put(dst, g.dst.as_ptr());
            }
        }
        Ok(())
    })
}

/// `ckv_plan_budget`: budget of layer `il` before fill.
///
/// # Safety
/// `plan` is null or a live handle; `out` is null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn ckv_plan_budget(plan: *const ckv_plan, il: i32, out: *mut i32) -> ckv_status {
    run("ckv_plan_budget", || {
        // SAFETY: null or a live handle (caller).
        let h = unsafe { plan_ref(plan) }?;
        check_ptr(out, "out")?;
        let nl = h.plan.layers.len();
        let l = usize::try_from(il)
            .ok()
            .and_then(|l| h.plan.layers.get(l))
            .ok_or_else(|| Error::InvalidArg(format!("layer il {il} is not in 0..{nl}")))?;
        let b = i32::try_from(l.budget).unwrap_or(i32::MAX);
        // SAFETY: checked non-null and aligned; writable (caller).
        unsafe { put(out, b) };
        Ok(())
    })
}

/// `ckv_plan_stats_json`: the plan as a JSON object into `buf` (see the header for `needed`).
///
/// # Safety
/// `plan` is null or a live handle; `buf` is null or valid for writes of `buf_size` bytes; `needed` is null
/// or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn ckv_plan_stats_json(
    plan: *const ckv_plan,
    buf: *mut c_char,
    buf_size: usize,
    needed: *mut usize,
) -> ckv_status {
    run("ckv_plan_stats_json", || {
        // SAFETY: null or a live handle (caller).
        let h = unsafe { plan_ref(plan) }?;
        if !needed.is_null() {
            check_ptr(needed, "needed")?;
        }
        if buf.is_null() && buf_size > 0 {
            return Err(Error::Null(format!("buf is NULL with buf_size {buf_size}")));
        }
        let s = stats_json(h);
        if !needed.is_null() {
            // SAFETY: checked non-null and aligned; writable (caller). The header asks for it even on
            // CKV_ERR_SIZE.
            unsafe { put(needed, s.len()) };
        }
        if buf_size <= s.len() {
            return Err(Error::Size(format!(
                "buf_size {buf_size} <= {} bytes of JSON (need {} with the NUL)",
                s.len(),
                s.len() + 1
            )));
        }
        // SAFETY: `buf` non-null (buf_size > 0 here) and writable for `buf_size > s.len()` bytes (caller).
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
            buf.add(s.len()).write(0);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::boundary::last_error;
    use crate::plan::{GroupPlan, LayerPlan, Params, Shape};
    use crate::score::Heads;
    use std::ffi::CStr;
    use std::ptr::{null, null_mut};

    fn shape() -> Shape {
        Shape {
            n_layer: 2,
            heads: Heads {
                n_head: 4,
                n_head_kv: 2,
                head_dim: 32,
            },
        }
    }

    /// A hand-made plan: 10 tokens in cells 20..30, layer 0 keeps 4, layer 1 per head keeps 3 / 4.
    fn sample_plan() -> Plan {
        let cells: Vec<u32> = (20..30).collect();
        let group = |kept: Vec<u32>| GroupPlan {
            src: kept.iter().map(|&t| cells[t as usize]).collect(),
            dst: crate::compact::dst_cells(&cells, kept.len()),
            kept,
        };
        Plan {
            params: Params {
                budget: 4,
                per_head: true,
                ..Params::default()
            },
            shape: shape(),
            n_tokens: 10,
            window: 8..10,
            allocation: Allocation::Uniform,
            layers: vec![
                LayerPlan {
                    budget: 4,
                    groups: vec![group(vec![1, 5, 8, 9]), group(vec![0, 3, 8, 9])],
                    heads_used: vec![0, 1],
                },
                LayerPlan {
                    budget: 4,
                    groups: vec![group(vec![2, 8, 9]), group(vec![4, 6, 8, 9])],
                    heads_used: vec![3],
                },
            ],
            n_slots: 4,
            fallback_all_heads: true,
            ms_score: 1.5,
            external_scores: false,
        }
    }

    #[test]
    fn plan_accessors_and_stats() {
        let h = plan_into_handle(sample_plan()).unwrap();
        // SAFETY: `h` is a live handle until freed at the end; out pointers are valid locals.
        unsafe {
            assert_eq!(ckv_plan_n_slots(h), 4);
            assert_eq!(ckv_plan_n_groups(h), 2);
            assert_eq!(ckv_plan_fallback(h), 1);
            assert_eq!(ckv_plan_n_slots(null()), -1);
            assert!(last_error().contains("ckv_plan_n_slots") && last_error().contains("plan is NULL"));
            assert_eq!(ckv_plan_n_groups(null()), -1);
            assert_eq!(ckv_plan_fallback(null()), -1);

            let (mut n, mut kept, mut src, mut dst) = (0, null(), null(), null());
            assert_eq!(ckv_plan_group(h, 1, 1, &mut n, &mut kept, &mut src, &mut dst), CKV_OK);
            assert_eq!(n, 4);
            assert_eq!(std::slice::from_raw_parts(kept, 4), &[4, 6, 8, 9]);
            assert_eq!(std::slice::from_raw_parts(src, 4), &[24, 26, 28, 29]);
            assert_eq!(std::slice::from_raw_parts(dst, 4), &[20, 21, 22, 23]);
            assert_eq!(
                ckv_plan_group(h, 0, 0, null_mut(), null_mut(), null_mut(), null_mut()),
                CKV_OK
            );
            n = -3;
            assert_eq!(
                ckv_plan_group(h, 2, 0, &mut n, null_mut(), null_mut(), null_mut()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("layer il 2"));
            assert_eq!(
                ckv_plan_group(h, 0, 2, &mut n, null_mut(), null_mut(), null_mut()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("group ig 2"));
            assert_eq!(
                ckv_plan_group(h, -1, 0, &mut n, null_mut(), null_mut(), null_mut()),
                CKV_ERR_INVALID_ARG
            );
            assert_eq!(n, -3);
            assert_eq!(
                ckv_plan_group(null(), 0, 0, &mut n, null_mut(), null_mut(), null_mut()),
                CKV_ERR_NULL
            );

            let mut b = -1;
            assert_eq!(ckv_plan_budget(h, 1, &mut b), CKV_OK);
            assert_eq!(b, 4);
            assert_eq!(ckv_plan_budget(h, 5, &mut b), CKV_ERR_INVALID_ARG);
            assert_eq!(ckv_plan_budget(h, 0, null_mut()), CKV_ERR_NULL);
            assert_eq!(ckv_plan_budget(null(), 0, &mut b), CKV_ERR_NULL);

            let mut needed = 0usize;
            assert_eq!(ckv_plan_stats_json(h, null_mut(), 0, &mut needed), CKV_ERR_SIZE);
            assert!(needed > 50);
            let mut buf = vec![0x55 as c_char; needed + 1];
            assert_eq!(
                ckv_plan_stats_json(h, buf.as_mut_ptr(), needed, &mut needed),
                CKV_ERR_SIZE
            );
            assert!(buf.iter().all(|&c| c == 0x55));
            assert_eq!(ckv_plan_stats_json(h, null_mut(), 10, &mut needed), CKV_ERR_NULL);
            assert_eq!(
                ckv_plan_stats_json(null(), buf.as_mut_ptr(), buf.len(), &mut needed),
                CKV_ERR_NULL
            );
            assert_eq!(ckv_plan_stats_json(h, buf.as_mut_ptr(), buf.len(), null_mut()), CKV_OK);
            let s = CStr::from_ptr(buf.as_ptr()).to_str().unwrap();
            assert_eq!(s.len(), needed);
            let v: serde_json::Value = serde_json::from_str(s).unwrap();
            assert_eq!(v["method"], "compresskv");
            assert_eq!(v["n_prompt"], 10);
            assert_eq!(v["budget"], 4);
            assert_eq!(v["window"], serde_json::json!({"start": 8, "len": 2}));
            assert_eq!(v["pool"], "avg");
            assert_eq!(v["pool_kernel"], 5);
            assert_eq!(v["per_head"], true);
            assert_eq!(v["fill"], true);
            assert_eq!(v["n_slots"], 4);
            assert_eq!(v["fallback_all_heads"], true);
            assert_eq!(v["ms_score"], 1.5);
            assert_eq!(v["layers"][1]["kept"], 4);
            assert_eq!(v["layers"][1]["kept_groups"], serde_json::json!([3, 4]));
            assert_eq!(v["layers"][0]["budget"], 4);
            for k in ["chunk", "n_srh", "n_sink", "allocation", "n_groups"] {
                assert!(v.get(k).is_some(), "{k}");
            }
            ckv_plan_free(h);
            ckv_plan_free(null_mut());
        }
    }
}
