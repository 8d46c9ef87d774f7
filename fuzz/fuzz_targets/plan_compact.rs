//! The plan entry points end to end: `ckv_plan_create` on shapes, types, cells, windows, budgets and
//! params derived from the input, with buffers sized from the input (sometimes too small, sometimes NULL,
//! misaligned, overlapping, of another geometry); then `ckv_plan_n_slots`, `ckv_plan_n_groups`,
//! `ckv_plan_fallback`, `ckv_plan_group`, `ckv_plan_budget`, `ckv_plan_stats_json` and `ckv_compact` (K
//! alone or K and V, V in rows or transposed, of the same or other types), `ckv_plan_free`.
//!
//! Oracles:
//! - every argument the header and the documented rules of `plan::build` refuse is refused, everything
//!   else is accepted (the prediction below is written from the header, not from the code paths);
//! - plan invariants: kept tokens ascending, the sinks, window and suffix always kept, `min(k, n)` tokens
//!   kept (or the always-kept set when larger), `src = cells[kept]`, `dst` = the lowest cells of the
//!   sequence; budgets sum to `avg * n_layer`; with finite, moderate keys and queries the selection
//!   equals the f64 reference of tests/reference (unless two scores are within its tolerance);
//! - a refused `ckv_compact` leaves every buffer byte-identical; a successful one equals a naive
//!   element-by-element move of the snapshot, and writes nothing else (padding, bytes past `size`);
//! - stats JSON: `*needed`, CKV_ERR_SIZE without writing, valid JSON that agrees with the accessors.

#![no_main]

mod common;
#[path = "plan_compact/compaction.rs"]
mod compaction;
#[path = "plan_compact/oracles.rs"]
mod oracles;
#[path = "../../tests/reference/mod.rs"]
mod reference;
#[path = "plan_compact/setup.rs"]
mod setup;

use std::ffi::CStr;
use std::mem::size_of;

use common::*;
use compresskv::ffi::*;
use compresskv::plan::{Method, Params};
use compresskv::score::PoolKind;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use setup::*;

const TOL: f64 = 2e-5; // tests/scoring.rs

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    // ---- the model and the sequence ------------------------------------------------------------------
    let n_layer = u.int_in_range(1..=4usize)?;
    let n_head_kv = u.int_in_range(1..=3usize)?;
    let n_head = n_head_kv * u.int_in_range(1..=3usize)?;
    let same_type = u.ratio(3, 4)?;
    let mut ktypes: Vec<i32> = Vec::with_capacity(n_layer);
    let t0 = u.choose(&TYPES)?.0;
    for _ in 0..n_layer {
        ktypes.push(if same_type { t0 } else { u.choose(&TYPES)?.0 });
    }
    let any_quant = ktypes.iter().any(|&t| !is_float_type(t));
    let head_dim: usize = if any_quant && u.ratio(9, 10)? {
        *u.choose(&[32, 64])?
    } else {
        *u.choose(&[1, 2, 3, 4, 8, 16, 32, 64])?
    };
    let mut shape = ckv_shape {
        n_layer: n_layer as i32,
        n_head: n_head as i32,
        n_head_kv: n_head_kv as i32,
        head_dim: head_dim as i32,
    };
    let shape_ok = !one_in(u, 40)?;
    if !shape_ok {
        match u.int_in_range(0..=3)? {
            0 => shape.n_layer = 0,
            1 => shape.head_dim = -1,
            2 => shape.n_head_kv = 0,
            _ => shape.n_head = n_head as i32 + if n_head_kv > 1 { 1 } else { -(n_head as i32) },
        }
    }
    let n: usize = match pick(u, &[6, 8, 1])? {
        0 => u.int_in_range(1..=12)?,
        1 => u.int_in_range(13..=64)?,
        _ => u.int_in_range(65..=160)?,
    };
    let n_cells = n + u.int_in_range(0..=16)?;
    let mut all_cells: Vec<i32> = (0..n_cells as i32).collect();
    match u.int_in_range(0..=2)? {
        0 => {}
        _ => {
            for i in (1..n_cells).rev() {
                let j = u.int_in_range(0..=i)?;
                all_cells.swap(i, j);
            }
        }
    }
    let mut cells: Vec<i32> = all_cells[..n].to_vec();
    if u.ratio(1, 3)? {
        cells.sort_unstable();
    }
    // a repeated cell, a negative one or one past n_cells (which a larger key buffer may still hold)
    let mut cells_ok = true;
    if one_in(u, 24)? {
        cells_ok = false;
        let i = u.int_in_range(0..=n - 1)?;
        match u.int_in_range(0..=2)? {
            0 if n >= 2 => cells[i] = cells[(i + 1) % n],
            1 => cells[i] = -1,
            _ => cells[i] = n_cells as i32 + u.int_in_range(0..=4)?,
        }
    }
    let nice = u.ratio(2, 3)?;

    // ---- params -----------------------------------------------------------------------------------------
    let p = gen_params(u, n, n_head)?;
    let full = size_of::<ckv_params>();
    let psize = match pick(u, &[16, 1, 1, 1])? {
        0 => full,
        1 => *u.choose(&[16, 20, 24, 32, 44, 52, 60, 62])?,
        2 => u.int_in_range(0..=15)?,
        _ => full + u.int_in_range(1..=32)?,
    };
    let eff = effective(&p, psize);
    let streaming = eff.method == CKV_METHOD_STREAMINGLLM;
    let mut pbuf = Buf::new(psize.max(full), if one_in(u, 4)? { u.int_in_range(1..=7)? } else { 0 });
    {
        let mut q = p;
        q.size = psize;
        // SAFETY: ckv_params is plain bytes without padding.
        let b = unsafe { std::slice::from_raw_parts((&q as *const ckv_params).cast::<u8>(), full) };
        pbuf.bytes_mut()[..full].copy_from_slice(b);
    }

    // ---- key buffers ------------------------------------------------------------------------------------
    let n_embd = (n_head_kv * head_dim) as i32;
    let mut keys: Vec<Layer> = Vec::with_capacity(n_layer);
    for &t in &ktypes {
        let transposed = is_float_type(t) && one_in(u, 8)?;
        let cells_l = if one_in(u, 6)? {
            n_cells as i32 + u.int_in_range(1..=8)?
        } else {
            n_cells as i32
        };
        keys.push(layer(u, t, n_embd, cells_l, transposed, nice, true)?);
    }
    if one_in(u, 30)? {
        // a layer that does not hold every cell of the sequence
        let l = u.int_in_range(0..=n_layer - 1)?;
        let max_cell = *cells.iter().max().unwrap();
        if max_cell >= 1 {
            let t = keys[l].ty;
            let k = layer(u, t, n_embd, max_cell, false, nice, false)?;
            keys[l] = k;
        }
    }

    // ---- queries ----------------------------------------------------------------------------------------
    let qlen = (eff.window.max(1) as usize) * n_head * head_dim;
    let mut qbufs: Vec<Vec<f32>> = Vec::with_capacity(n_layer);
    for _ in 0..n_layer {
        let mut q = vec![0f32; qlen + 1];
        for x in q.iter_mut() {
            *x = if nice {
                (u.arbitrary::<i8>().unwrap_or(3) as f32) / 32.0
            } else {
                f32::from_bits(u.arbitrary::<u32>().unwrap_or(0x3f80_0000))
            };
        }
        qbufs.push(q);
    }
    let queries_null = one_in(u, if streaming { 3 } else { 40 })?;
    let mut qptrs: Vec<*const f32> = qbufs.iter().map(|q| q.as_ptr()).collect();
    let mut q_ok = true;
    if one_in(u, 20)? {
        let l = u.int_in_range(0..=n_layer - 1)?;
        qptrs[l] = std::ptr::null();
        q_ok &= streaming;
    }
    if one_in(u, 40)? {
        let l = u.int_in_range(0..=n_layer - 1)?;
        // SAFETY: one byte into a buffer of qlen + 1 floats: qlen floats stay readable.
        qptrs[l] = unsafe { qbufs[l].as_ptr().cast::<u8>().add(1).cast() };
        q_ok = false;
    }
    // the array of pointers itself, maybe misaligned
    let qarr_off = if one_in(u, 40)? { u.int_in_range(1..=7)? } else { 0 };
    let mut qarr = Buf::new(n_layer * 8, qarr_off);
    for (l, ptr) in qptrs.iter().enumerate() {
        qarr.bytes_mut()[8 * l..8 * l + 8].copy_from_slice(&(*ptr as usize).to_ne_bytes());
    }
    if queries_null {
        q_ok = streaming;
    } else if qarr_off != 0 {
        q_ok = false;
    }

    // ---- profile ----------------------------------------------------------------------------------------
    let wants_profile = matches!(eff.method, CKV_METHOD_COMPRESSKV | CKV_METHOD_SNAPKV_SRH);
    let mut prof: *mut ckv_profile = std::ptr::null_mut();
    let mut prof_ok = true;
    if u.ratio(if wants_profile { 2 } else { 1 }, 3)? {
        let mut id = Ident {
            arch: "llama".into(),
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            fingerprint: "00ff00ff00ff00ff".into(),
        };
        if one_in(u, 10)? {
            prof_ok = false;
            match u.int_in_range(0..=2)? {
                0 => id.n_layer += 1,
                1 => id.head_dim *= 2,
                _ => {
                    id.n_head *= 2;
                }
            }
        }
        prof = parse_profile(&valid_profile(u, &id)?.to_string());
        assert!(!prof.is_null(), "a valid profile was refused: {}", last_error());
    }

    // ---- pointer faults ---------------------------------------------------------------------------------
    let null_params = one_in(u, 60)?;
    let null_shape = one_in(u, 60)?;
    let null_out = one_in(u, 60)?;
    let cells_ptr_kind = pick(u, &[40, 1, 1])?; // ok, NULL, misaligned
    let keys_ptr_kind = pick(u, &[40, 1, 1])?;
    let n_tokens: i32 = if one_in(u, 40)? { *u.choose(&[0, -1])? } else { n as i32 };

    // ---- the prediction ---------------------------------------------------------------------------------
    let geoms: Vec<Option<Geom>> = keys.iter().map(Layer::geom).collect();
    let keys_ok = geoms.iter().all(|g| match g {
        Some(g) => g.n_embd == n_embd as usize && (type_info(g.ty).unwrap().0 == 1 || head_dim % 32 == 0),
        None => false,
    });
    let min_cells = geoms.iter().flatten().map(|g| g.n_cells).min().unwrap_or(0);
    let cells_in_range = cells.iter().all(|&c| c >= 0 && (c as usize) < min_cells);
    let distinct = {
        let mut s = cells.clone();
        s.sort_unstable();
        s.windows(2).all(|w| w[0] != w[1])
    };
    let window_ok = eff.window >= 1
        && eff.window as usize <= n
        && (eff.window_end == -1 || (eff.window_end >= eff.window && eff.window_end as usize <= n));
    let predict_ok = !null_params
        && !null_out
        && psize >= 16
        && params_valid(&eff)
        && !null_shape
        && shape_ok
        && n_tokens > 0
        && window_ok
        && cells_ptr_kind == 0
        && keys_ptr_kind == 0
        && q_ok
        && (prof.is_null() || prof_ok)
        && keys_ok
        && cells_in_range
        && distinct
        && !(eff.method == CKV_METHOD_SNAPKV_SRH && prof.is_null())
        && !(eff.method == CKV_METHOD_PYRAMIDKV && eff.pyramid_beta < 1.0);

    // ---- the call ---------------------------------------------------------------------------------------
    let descs: Vec<ckv_buffer> = keys.iter_mut().map(Layer::desc).collect();
    let mut karr = Buf::new(
        n_layer * size_of::<ckv_buffer>(),
        if keys_ptr_kind == 2 { u.int_in_range(1..=7)? } else { 0 },
    );
    // SAFETY: ckv_buffer is plain data; the Buf holds n_layer of them.
    unsafe {
        std::ptr::copy_nonoverlapping(
            descs.as_ptr().cast::<u8>(),
            karr.ptr(),
            n_layer * size_of::<ckv_buffer>(),
        )
    };
    let mut carr = Buf::new(4 * n, if cells_ptr_kind == 2 { u.int_in_range(1..=3)? } else { 0 });
    for (i, c) in cells.iter().enumerate() {
        carr.bytes_mut()[4 * i..4 * i + 4].copy_from_slice(&c.to_ne_bytes());
    }
    let snapshot: Vec<Vec<u8>> = keys.iter().map(|l| l.buf.all().to_vec()).collect();
    let mut plan: *mut ckv_plan = 0x5150 as *mut ckv_plan;
    let marker = mark_last_error();
    // SAFETY: every pointer is NULL, misaligned (refused), or valid for what the header asks: params for its
    // size, cells for n_tokens ints, keys for n_layer buffers each readable for its size, queries for n_layer
    // pointers each to window * n_head * head_dim floats.
    let st = unsafe {
        ckv_plan_create(
            if null_params {
                std::ptr::null()
            } else {
                pbuf.ptr().cast()
            },
            if null_shape { std::ptr::null() } else { &shape },
            prof,
            match cells_ptr_kind {
                1 => std::ptr::null(),
                _ => carr.ptr().cast(),
            },
            n_tokens,
            match keys_ptr_kind {
                1 => std::ptr::null(),
                _ => karr.ptr().cast(),
            },
            if queries_null {
                std::ptr::null()
            } else {
                qarr.ptr().cast()
            },
            if null_out { std::ptr::null_mut() } else { &mut plan },
        )
    };
    let f = "ckv_plan_create";
    for (l, k) in keys.iter().enumerate() {
        assert!(k.buf.all() == &snapshot[l][..], "ckv_plan_create wrote keys[{l}]");
    }
    let ok = check(f, st, Some(&marker));
    let ctx = || {
        format!(
            "shape {shape:?} n {n} n_cells {n_cells} types {ktypes:?} geoms {geoms:?} params {eff:?} (size {psize}) \
             profile {} prof_ok {prof_ok} q_ok {q_ok} cells_ok {cells_ok} ptrs {cells_ptr_kind}/{keys_ptr_kind} \
             n_tokens {n_tokens}",
            !prof.is_null()
        )
    };
    if ok != predict_ok {
        panic!(
            "ckv_plan_create: {} but {} expected ({}): {}",
            status_name(st),
            if predict_ok { "success" } else { "a refusal" },
            last_error(),
            ctx()
        );
    }
    tally(if ok { "plan ok" } else { "plan refused" });
    if !ok {
        assert_eq!(plan as usize, 0x5150, "a refused ckv_plan_create wrote *out");
        // SAFETY: NULL or a live handle.
        unsafe { ckv_profile_free(prof) };
        return Ok(());
    }

    // ---- the plan ---------------------------------------------------------------------------------------
    let n_groups = if eff.per_head == 1 { n_head_kv } else { 1 };
    // SAFETY: plan is a live handle until ckv_plan_free below; every out pointer is valid.
    unsafe {
        assert_eq!(ckv_plan_n_groups(plan), n_groups as i32);
        assert_eq!(
            ckv_plan_fallback(plan),
            (eff.method == CKV_METHOD_COMPRESSKV && prof.is_null()) as i32
        );
    }
    let we = if eff.window_end == -1 {
        n
    } else {
        eff.window_end as usize
    };
    let ws = we - eff.window as usize;
    let n_sink = if streaming && eff.n_sink == 0 {
        4
    } else {
        eff.n_sink as usize
    };
    let avg = if eff.budget > 0 {
        eff.budget as usize
    } else {
        let r: f64 = eff.ratio.to_string().parse().unwrap();
        ((r * n as f64 - 1e-9 * (r * n as f64).max(1.0)).ceil() as usize).clamp(1, n)
    };
    let mut budgets = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let mut b = -3i32;
        // SAFETY: live plan, valid out.
        expect_ok(
            "ckv_plan_budget",
            unsafe { ckv_plan_budget(plan, l as i32, &mut b) },
            None,
        );
        assert!(b >= 0);
        budgets.push(b as usize);
    }
    assert_eq!(
        budgets.iter().sum::<usize>(),
        avg * n_layer,
        "budgets {budgets:?} avg {avg}: {}",
        ctx()
    );
    let max_budget = *budgets.iter().max().unwrap();
    let sorted_cells = {
        let mut s = cells.clone();
        s.sort_unstable();
        s
    };
    // groups[l][g] = (kept, src, dst)
    let mut groups: Vec<Vec<(Vec<i32>, Vec<i32>, Vec<i32>)>> = Vec::with_capacity(n_layer);
    let mut max_kept = 0;
    for l in 0..n_layer {
        let mut gs = Vec::with_capacity(n_groups);
        for g in 0..n_groups {
            let (mut nk, mut kp, mut sp, mut dp) = (
                -1i32,
                std::ptr::null::<i32>(),
                std::ptr::null::<i32>(),
                std::ptr::null::<i32>(),
            );
            // SAFETY: live plan, valid out pointers; the arrays hold n_kept values until ckv_plan_free.
            let (kept, src, dst) = unsafe {
                expect_ok(
                    "ckv_plan_group",
                    ckv_plan_group(plan, l as i32, g as i32, &mut nk, &mut kp, &mut sp, &mut dp),
                    None,
                );
                assert!(nk >= 0 && !kp.is_null() && !sp.is_null() && !dp.is_null());
                let nk = nk as usize;
                (
                    std::slice::from_raw_parts(kp, nk).to_vec(),
                    std::slice::from_raw_parts(sp, nk).to_vec(),
                    std::slice::from_raw_parts(dp, nk).to_vec(),
                )
            };
            let k = if eff.fill == 1 {
                max_budget.min(n)
            } else {
                budgets[l].min(n)
            };
            let sinks = n_sink.min(ws);
            let always = sinks + (n - ws);
            let want_len = if k >= n { n } else { k.max(always) };
            assert_eq!(
                kept.len(),
                want_len,
                "layer {l} group {g}: kept {kept:?} budget {k} always {always}: {}",
                ctx()
            );
            assert!(kept.windows(2).all(|w| w[0] < w[1]), "not ascending: {kept:?}");
            assert!(kept.iter().all(|&i| i >= 0 && (i as usize) < n));
            for i in (0..sinks).chain(ws..n) {
                assert!(
                    kept.binary_search(&(i as i32)).is_ok(),
                    "token {i} (sink/window/suffix) dropped: {}",
                    ctx()
                );
            }
            let want_src: Vec<i32> = kept.iter().map(|&i| cells[i as usize]).collect();
            assert_eq!(src, want_src);
            assert_eq!(dst, sorted_cells[..kept.len()].to_vec());
            max_kept = max_kept.max(kept.len());
            gs.push((kept, src, dst));
        }
        groups.push(gs);
    }
    // SAFETY: live plan.
    assert_eq!(unsafe { ckv_plan_n_slots(plan) }, max_kept as i32);

    // refusals of the accessors: nothing written
    {
        let il_bad = *u.choose(&[-1, n_layer as i32, i32::MIN, i32::MAX])?;
        let ig_bad = *u.choose(&[-1, n_groups as i32])?;
        let mut nk = -9i32;
        let mut kp: *const i32 = 0x99 as *const i32;
        // SAFETY: live plan; the out pointers are valid or NULL / misaligned (refused).
        unsafe {
            expect_err(
                "ckv_plan_group",
                ckv_plan_group(
                    plan,
                    il_bad,
                    0,
                    &mut nk,
                    &mut kp,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                ),
                CKV_ERR_INVALID_ARG,
            );
            expect_err(
                "ckv_plan_group",
                ckv_plan_group(
                    plan,
                    0,
                    ig_bad,
                    &mut nk,
                    &mut kp,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                ),
                CKV_ERR_INVALID_ARG,
            );
            let mut mis = Buf::new(16, 3);
            expect_err(
                "ckv_plan_group",
                ckv_plan_group(
                    plan,
                    0,
                    0,
                    &mut nk,
                    mis.ptr().cast(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                ),
                CKV_ERR_INVALID_ARG,
            );
            assert!(
                nk == -9 && kp as usize == 0x99,
                "a refused ckv_plan_group wrote its outputs"
            );
            expect_ok(
                "ckv_plan_group",
                ckv_plan_group(
                    plan,
                    0,
                    0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                ),
                None,
            );
            let mut b = -9i32;
            expect_err(
                "ckv_plan_budget",
                ckv_plan_budget(plan, il_bad, &mut b),
                CKV_ERR_INVALID_ARG,
            );
            expect_err(
                "ckv_plan_budget",
                ckv_plan_budget(plan, 0, std::ptr::null_mut()),
                CKV_ERR_NULL,
            );
            assert_eq!(b, -9);
            expect_err(
                "ckv_plan_group",
                ckv_plan_group(
                    std::ptr::null(),
                    0,
                    0,
                    &mut nk,
                    &mut kp,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                ),
                CKV_ERR_NULL,
            );
            assert_eq!(ckv_plan_n_slots(std::ptr::null()), -1);
            assert!(last_error().starts_with("ckv_plan_n_slots: "));
            assert_eq!(ckv_plan_n_groups(std::ptr::null()), -1);
            assert!(last_error().starts_with("ckv_plan_n_groups: "));
            assert_eq!(ckv_plan_fallback(std::ptr::null()), -1);
            assert!(last_error().starts_with("ckv_plan_fallback: "));
        }
    }

    // ---- the selection against the f64 reference ---------------------------------------------------------
    let planned = oracles::Planned {
        plan,
        prof,
        eff: &eff,
        streaming,
        dims: (n, n_layer, n_head, n_head_kv, head_dim, n_groups),
        cells: &cells,
        keys: &keys,
        geoms: &geoms,
        qbufs: &qbufs,
        qlen,
        avg,
        ws,
        max_kept,
        budgets: &budgets,
        groups: &groups,
        ctx: &ctx,
    };
    oracles::selection_matches_reference(&planned)?;

    // ---- stats JSON -------------------------------------------------------------------------------------
    oracles::stats_json_agrees(u, &planned)?;

    // ---- compaction ----------------------------------------------------------------------------------
    compaction::compact_and_check(
        u,
        plan,
        &mut keys,
        &groups,
        &ktypes,
        (n_layer, n_head_kv, head_dim, n_embd),
        n_cells,
        n_groups,
        &ctx,
    )?;

    // SAFETY: live handles, freed once.
    unsafe {
        ckv_plan_free(plan);
        ckv_plan_free(std::ptr::null_mut());
        ckv_profile_free(prof);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    tally_input();
    let _ = run(&mut Unstructured::new(data));
});
