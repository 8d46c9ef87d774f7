//! The compaction half of the target: `ckv_compact` on the planned buffers or others (K alone or K and V,
//! V in rows or transposed, of the same or other types, overlapping, NULL), against a naive move of a
//! snapshot, and refusals that leave every byte as it was.

use super::*;

#[allow(clippy::too_many_arguments)] // the state of `run` this half reads
pub(super) fn compact_and_check(
    u: &mut Unstructured<'_>,
    plan: *mut ckv_plan,
    keys: &mut Vec<Layer>,
    groups: &[Vec<(Vec<i32>, Vec<i32>, Vec<i32>)>],
    ktypes: &[i32],
    (n_layer, n_head_kv, head_dim, n_embd): (usize, usize, usize, i32),
    n_cells: usize,
    n_groups: usize,
    ctx: &dyn Fn() -> String,
) -> Result<()> {
    let rounds = if one_in(u, 4)? { 2 } else { 1 };
    // K: the planned buffers, or others of another geometry
    let mut kc: Vec<Layer> = if u.ratio(3, 4)? {
        std::mem::take(keys)
    } else {
        let mut v = Vec::with_capacity(n_layer);
        for _ in 0..n_layer {
            let t = u.choose(&TYPES)?.0;
            let tr = is_float_type(t) && one_in(u, 4)?;
            let c = n_cells as i32 + *u.choose(&[0, 0, 3, -1, -(n_cells as i32 / 2)])?;
            v.push(layer(u, t, n_embd, c.max(1), tr, false, true)?);
        }
        v
    };
    let with_v = u.ratio(3, 4)?;
    let mut vc: Vec<Layer> = Vec::new();
    if with_v {
        let hd_v = if one_in(u, 6)? {
            *u.choose(&[1, 8, 16, 32, 48, 64])?
        } else {
            head_dim
        };
        let vt_shared = u.ratio(3, 4)?;
        let vt0 = if u.arbitrary::<bool>()? {
            ktypes[0]
        } else {
            u.choose(&TYPES)?.0
        };
        for _ in 0..n_layer {
            let t = if vt_shared { vt0 } else { u.choose(&TYPES)?.0 };
            let tr = is_float_type(t) && u.arbitrary::<bool>()?;
            let mut e = (n_head_kv * hd_v) as i32;
            if one_in(u, 20)? {
                e += 1; // not a whole number of KV heads
            }
            let c = n_cells as i32 + *u.choose(&[0, 0, 0, 5, -1])?;
            vc.push(layer(u, t, e, c.max(1), tr, false, true)?);
        }
    }
    let null_k = one_in(u, 40)?;
    let k_off = if one_in(u, 40)? { u.int_in_range(1..=7)? } else { 0 };
    let v_off = if with_v && one_in(u, 40)? {
        u.int_in_range(1..=7)?
    } else {
        0
    };
    let null_plan = one_in(u, 60)?;
    // overlapping buffers: one descriptor repeated
    let overlap = if one_in(u, 30)? && (with_v || n_layer >= 2) {
        Some(u.int_in_range(0..=n_layer - 1)?)
    } else {
        None
    };

    for round in 0..rounds {
        let mut kd: Vec<ckv_buffer> = kc.iter_mut().map(Layer::desc).collect();
        let mut vd: Vec<ckv_buffer> = vc.iter_mut().map(Layer::desc).collect();
        let kg: Vec<Option<Geom>> = kc.iter().map(Layer::geom).collect();
        let vg: Vec<Option<Geom>> = vc.iter().map(Layer::geom).collect();
        let mut overlapping = false;
        if let Some(l) = overlap {
            if with_v {
                vd[l] = kd[l];
                if let Some(g) = kg[l] {
                    overlapping = g.min_bytes > 0;
                }
            } else {
                kd[(l + 1) % n_layer] = kd[l];
                overlapping = true;
            }
        }
        // the prediction
        let max_cell = groups
            .iter()
            .flatten()
            .flat_map(|g| g.1.iter().chain(&g.2))
            .copied()
            .max()
            .unwrap_or(0) as usize;
        let kv_geoms: Vec<Option<Geom>> = if let Some(l) = overlap {
            let mut all: Vec<Option<Geom>> = kg.clone();
            if with_v {
                let mut v2 = vg.clone();
                v2[l] = kg[l];
                all.extend(v2);
            } else {
                all[(l + 1) % n_layer] = kg[l];
            }
            all
        } else {
            kg.iter().chain(vg.iter()).copied().collect()
        };
        let k_embd_ok = kv_geoms[..n_layer]
            .iter()
            .all(|g| g.is_some_and(|g| g.n_embd == n_embd as usize));
        let geoms_ok = kv_geoms.iter().all(|g| g.is_some());
        let cells_fit = kv_geoms.iter().flatten().all(|g| g.n_cells > max_cell);
        let ranges_ok = kv_geoms
            .iter()
            .flatten()
            .all(|g| (0..n_groups).all(|grp| group_range(g, n_groups, grp, n_head_kv).is_some()));
        let predict_ok = !null_plan
            && !null_k
            && k_off == 0
            && v_off == 0
            && geoms_ok
            && k_embd_ok
            && !overlapping
            && cells_fit
            && ranges_ok;

        let mut karr = Buf::new(n_layer * size_of::<ckv_buffer>(), k_off);
        let mut varr = Buf::new(n_layer * size_of::<ckv_buffer>(), v_off);
        // SAFETY: plain data into buffers of n_layer descriptors.
        unsafe {
            std::ptr::copy_nonoverlapping(kd.as_ptr().cast::<u8>(), karr.ptr(), n_layer * size_of::<ckv_buffer>());
            if with_v {
                std::ptr::copy_nonoverlapping(vd.as_ptr().cast::<u8>(), varr.ptr(), n_layer * size_of::<ckv_buffer>());
            }
        }
        let before_k: Vec<Vec<u8>> = kc.iter().map(|l| l.buf.all().to_vec()).collect();
        let before_v: Vec<Vec<u8>> = vc.iter().map(|l| l.buf.all().to_vec()).collect();
        let marker = mark_last_error();
        // SAFETY: plan live (or NULL); k and v NULL, misaligned (refused) or n_layer descriptors, each of
        // memory valid for its size; overlapping descriptors must be refused before anything is written.
        let st = unsafe {
            ckv_compact(
                if null_plan { std::ptr::null() } else { plan },
                if null_k { std::ptr::null() } else { karr.ptr().cast() },
                if with_v { varr.ptr().cast() } else { std::ptr::null() },
            )
        };
        let ok = check("ckv_compact", st, Some(&marker));
        tally(match (ok, round, with_v) {
            (false, _, _) => "compact refused",
            (true, 0, false) => "compact ok (k)",
            (true, 0, true) => "compact ok (k+v)",
            _ => "compact ok (round 2)",
        });
        let cctx = || {
            format!(
                "round {round}: k {kg:?} v {vg:?} overlap {overlap:?} groups {n_groups} max_cell {max_cell}: {}",
                ctx()
            )
        };
        if ok != predict_ok {
            panic!(
                "ckv_compact: {} but {} expected ({}): {}",
                status_name(st),
                if predict_ok { "success" } else { "a refusal" },
                last_error(),
                cctx()
            );
        }
        if !ok {
            for (l, b) in kc.iter().enumerate() {
                assert!(
                    b.buf.all() == &before_k[l][..],
                    "a refused ckv_compact wrote k[{l}]: {}",
                    cctx()
                );
            }
            for (l, b) in vc.iter().enumerate() {
                assert!(
                    b.buf.all() == &before_v[l][..],
                    "a refused ckv_compact wrote v[{l}]: {}",
                    cctx()
                );
            }
            break;
        }
        for (bufs, geoms, before, what) in [(&kc, &kg, &before_k, "k"), (&vc, &vg, &before_v, "v")] {
            for (l, b) in bufs.iter().enumerate() {
                let g = geoms[l].unwrap();
                let mut want = before[l].clone();
                let o = b.buf.off;
                for (grp, (_, src, dst)) in groups[l].iter().enumerate() {
                    let r = group_range(&g, n_groups, grp, n_head_kv).unwrap();
                    ref_move(&g, &before[l][o..], &mut want[o..], &r, src, dst);
                }
                if b.buf.all() != &want[..] {
                    let i = b.buf.all().iter().zip(&want).position(|(a, b)| a != b).unwrap();
                    panic!(
                        "ckv_compact: {what}[{l}] differs from the reference at byte {} (of {}): {}",
                        i as isize - o as isize,
                        g.min_bytes,
                        cctx()
                    );
                }
            }
        }
    }
    Ok(())
}
