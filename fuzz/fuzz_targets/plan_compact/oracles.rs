//! The plan's oracles after a successful `ckv_plan_create`: the selection against the f64 reference of
//! tests/reference, and the stats JSON against the accessors.

use super::*;

/// What the oracles read of `run`'s state once the plan exists.
pub(super) struct Planned<'a> {
    pub(super) plan: *mut ckv_plan,
    pub(super) prof: *mut ckv_profile,
    pub(super) eff: &'a ckv_params,
    pub(super) streaming: bool,
    /// n, n_layer, n_head, n_head_kv, head_dim, n_groups
    pub(super) dims: (usize, usize, usize, usize, usize, usize),
    pub(super) cells: &'a [i32],
    pub(super) keys: &'a [Layer],
    pub(super) geoms: &'a [Option<Geom>],
    pub(super) qbufs: &'a [Vec<f32>],
    pub(super) qlen: usize,
    /// the average budget, the window's start, the most cells a group keeps
    pub(super) avg: usize,
    pub(super) ws: usize,
    pub(super) max_kept: usize,
    pub(super) budgets: &'a [usize],
    pub(super) groups: &'a [Vec<(Vec<i32>, Vec<i32>, Vec<i32>)>],
    pub(super) ctx: &'a dyn Fn() -> String,
}

/// Every layer's kept tokens equal the reference's, unless two scores lie within its tolerance.
pub(super) fn selection_matches_reference(p: &Planned<'_>) -> Result<()> {
    let Planned {
        prof,
        eff,
        streaming,
        dims,
        cells,
        keys,
        geoms,
        qbufs,
        qlen,
        avg,
        budgets,
        groups,
        ctx,
        ..
    } = *p;
    let (n, n_layer, n_head, n_head_kv, head_dim, n_groups) = dims;
    let moderate = |x: f32| x.is_finite() && x.abs() <= 64.0;
    let key_rows: Vec<Vec<Vec<f32>>> = (0..n_layer)
        .map(|l| {
            let g = geoms[l].unwrap();
            cells
                .iter()
                .map(|&c| key_row(&g, keys[l].buf.bytes(), c as usize))
                .collect()
        })
        .collect();
    let inputs_moderate = key_rows.iter().flatten().flatten().all(|&x| moderate(x))
        && (streaming || qbufs.iter().all(|q| q[..qlen].iter().all(|&x| moderate(x))));
    if inputs_moderate && avg <= 1 << 16 {
        let params = Params {
            method: method_of(eff.method),
            budget: eff.budget as usize,
            ratio: eff.ratio,
            window: eff.window as usize,
            window_end: if eff.window_end == -1 || eff.window_end as usize == n {
                None
            } else {
                Some(eff.window_end as usize)
            },
            n_sink: eff.n_sink as usize,
            pool_kernel: eff.pool_kernel as usize,
            pool: if eff.pool == CKV_POOL_MAX {
                PoolKind::Max
            } else {
                PoolKind::Avg
            },
            chunk: eff.chunk as usize,
            n_srh: eff.n_srh as usize,
            per_head: eff.per_head == 1,
            fill: eff.fill == 1,
            floor: eff.floor as usize,
            pyramid_beta: eff.pyramid_beta as f64,
        };
        let attn = reference::Attn {
            n_head,
            n_head_kv,
            head_dim,
        };
        let layers: Vec<reference::RefLayer> = (0..n_layer)
            .map(|l| reference::RefLayer {
                keys: key_rows[l].clone(),
                queries: if streaming {
                    Vec::new()
                } else {
                    qbufs[l][..qlen].to_vec()
                },
            })
            .collect();
        // SAFETY: a live handle (or none).
        let profile = if prof.is_null() {
            None
        } else {
            Some(unsafe { &*prof }.profile())
        };
        let r = reference::plan(&params, attn, profile, &layers);
        tally(if r.scores.iter().any(|s| !s.is_empty()) {
            "reference scored"
        } else {
            "reference unscored"
        });
        assert_eq!(r.budgets, budgets, "budgets vs reference: {}", ctx());
        for l in 0..n_layer {
            for g in 0..n_groups {
                let got: Vec<u32> = groups[l][g].0.iter().map(|&i| i as u32).collect();
                let want = &r.groups[l][g];
                if got != want.kept {
                    tally("reference tight difference");
                    assert!(
                        want.margin <= TOL,
                        "layer {l} group {g}: kept {got:?}\nreference {:?} (margin {:e}): {}",
                        want.kept,
                        want.margin,
                        ctx()
                    );
                }
            }
        }
    }
    Ok(())
}

/// `ckv_plan_stats_json`: `*needed`, CKV_ERR_SIZE without writing, valid JSON that agrees with the accessors.
pub(super) fn stats_json_agrees(u: &mut Unstructured<'_>, p: &Planned<'_>) -> Result<()> {
    let Planned {
        plan,
        eff,
        dims,
        avg,
        ws,
        max_kept,
        budgets,
        groups,
        ..
    } = *p;
    let (n, n_layer, _, _, _, n_groups) = dims;
    {
        let fs = "ckv_plan_stats_json";
        let mut needed = usize::MAX;
        // SAFETY: live plan; NULL buffer with size 0 asks for the length.
        expect_err(
            fs,
            unsafe { ckv_plan_stats_json(plan, std::ptr::null_mut(), 0, &mut needed) },
            CKV_ERR_SIZE,
        );
        assert!(needed > 0 && needed < 1 << 24);
        let mut needed2 = 7usize;
        // SAFETY: as above; NULL with a size is refused before *needed is written.
        expect_err(
            fs,
            unsafe { ckv_plan_stats_json(plan, std::ptr::null_mut(), 5, &mut needed2) },
            CKV_ERR_NULL,
        );
        assert_eq!(needed2, 7);
        let mut mis = Buf::new(16, 4);
        // SAFETY: a misaligned needed is refused.
        expect_err(
            fs,
            unsafe { ckv_plan_stats_json(plan, std::ptr::null_mut(), 0, mis.ptr().cast()) },
            CKV_ERR_INVALID_ARG,
        );
        let size = match pick(u, &[4, 2, 1])? {
            0 => needed + 1,
            1 => u.int_in_range(1..=needed)?,
            _ => needed + 1 + u.int_in_range(1..=64)?,
        };
        let mut b = Buf::new(size, u.int_in_range(0..=15)?);
        b.all_mut().fill(0xcd);
        let before = b.all().to_vec();
        let mut needed3 = 0usize;
        let marker = mark_last_error();
        // SAFETY: live plan; b holds size bytes.
        let st = unsafe { ckv_plan_stats_json(plan, b.ptr().cast(), size, &mut needed3) };
        assert_eq!(needed3, needed);
        if size <= needed {
            expect_err(fs, st, CKV_ERR_SIZE);
            assert_eq!(b.all(), &before[..], "a refused ckv_plan_stats_json wrote its buffer");
        } else {
            expect_ok(fs, st, Some(&marker));
            let o = b.off;
            assert_eq!(b.all()[o + needed], 0);
            assert_eq!(
                &b.all()[o + needed + 1..],
                &before[o + needed + 1..],
                "wrote past the NUL"
            );
            // SAFETY: NUL-terminated (checked).
            let text = unsafe { CStr::from_ptr(b.ptr().cast()) }
                .to_str()
                .expect("stats JSON is UTF-8");
            assert_eq!(text.len(), needed);
            let v: serde_json::Value = serde_json::from_str(text).expect("stats JSON parses");
            assert_eq!(v["n_prompt"], n);
            assert_eq!(v["n_layer"], n_layer);
            assert_eq!(v["n_slots"], max_kept);
            assert_eq!(v["n_groups"], n_groups);
            assert_eq!(v["budget"], avg);
            assert_eq!(v["window"]["start"], ws);
            assert_eq!(v["window"]["len"], eff.window);
            let layers = v["layers"].as_array().expect("layers");
            assert_eq!(layers.len(), n_layer);
            for (l, lv) in layers.iter().enumerate() {
                assert_eq!(lv["budget"], budgets[l]);
                assert_eq!(lv["kept"], groups[l].iter().map(|g| g.0.len()).max().unwrap());
            }
        }
    }
    Ok(())
}
