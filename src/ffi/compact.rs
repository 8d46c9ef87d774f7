//! `ckv_compact` and the caller-buffer checks it shares with `ckv_plan_create`: the geometry of a
//! `ckv_buffer` validated against its own fields and `size`, read-only and mutable views over exactly the
//! bytes that geometry uses, and the overlap check of all buffers of one call.
//!
//! Invariants: a view spans exactly `min_bytes` of its validated geometry, never more than the caller's
//! `size`; mutable views are made only after [`check_disjoint`] has proved every extent of the call disjoint;
//! `ckv_compact` validates everything (geometry, overlap, cells the plan moves) before the first byte moves.

use super::boundary::{ctx, plan_ref, run, slice_ref};
use super::params::type_from_id;
use super::types::*;
use crate::error::{Error, Result};
use crate::layout::{Geometry, LayerView, LayerViewMut, Layout};

/// Geometry of one caller buffer, validated against its own fields and its `size`.
pub(super) fn buffer_geometry(b: &ckv_buffer, what: &str) -> Result<Geometry> {
    if b.data.is_null() {
        return Err(Error::Null(format!("{what}.data is NULL")));
    }
    let ty = type_from_id(b.type_, &format!("{what}.type"))?;
    let n_embd = usize::try_from(b.n_embd)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::InvalidArg(format!("{what}.n_embd: {} (expected > 0)", b.n_embd)))?;
    let n_cells = usize::try_from(b.n_cells)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::InvalidArg(format!("{what}.n_cells: {} (expected > 0)", b.n_cells)))?;
    let layout = match b.transposed {
        0 => {
            let row = ty.row_bytes(n_embd).ok_or_else(|| {
                Error::InvalidArg(format!(
                    "{what}.n_embd: {n_embd} is not a multiple of the {} block size {}",
                    ty.name(),
                    ty.block_elems()
                ))
            })?;
            Layout::Rows {
                row_stride: if b.stride == 0 { row } else { b.stride },
            }
        }
        1 => Layout::Transposed {
            chan_stride: if b.stride == 0 {
                n_cells * ty.block_bytes()
            } else {
                b.stride
            },
        },
        t => return Err(Error::InvalidArg(format!("{what}.transposed: {t} is not 0 or 1"))),
    };
    let g = Geometry {
        ty,
        n_embd,
        n_cells,
        layout,
    };
    g.validate().map_err(|e| ctx(what, e))?;
    let need = g.min_bytes().map_err(|e| ctx(what, e))?;
    if b.size < need {
        return Err(Error::Size(format!(
            "{what}.size: {} bytes is smaller than the {need} bytes of {n_cells} cells x {n_embd} {}{}",
            b.size,
            ty.name(),
            if b.transposed == 1 { " (transposed)" } else { "" }
        )));
    }
    Ok(g)
}

/// Geometry and read-only view of one caller buffer; the view spans exactly the bytes the geometry uses.
///
/// # Safety
/// `b.data` must be valid for reads of `b.size` bytes for `'a`, unwritten while the view lives.
pub(super) unsafe fn buffer_view<'a>(b: &ckv_buffer, what: &str) -> Result<LayerView<'a>> {
    let g = buffer_geometry(b, what)?;
    let len = g.min_bytes()?;
    // SAFETY: `len <= b.size` (checked by buffer_geometry) readable bytes at the non-null `b.data` (caller).
    unsafe { LayerView::from_raw(g, b.data as *const u8, len) }.map_err(|e| ctx(what, e))
}

/// Mutable view of one caller buffer over exactly the bytes its geometry uses.
///
/// # Safety
/// `b.data` must be valid for reads and writes of `b.size` bytes for `'a`, and the `min_bytes` extents of
/// all views alive at once must be disjoint (checked by [`check_disjoint`]) and otherwise unaccessed.
pub(super) unsafe fn buffer_view_mut<'a>(b: &ckv_buffer, g: Geometry, what: &str) -> Result<LayerViewMut<'a>> {
    let len = g.min_bytes()?;
    // SAFETY: `len <= b.size` writable bytes at the non-null `b.data` (caller), exclusive (caller).
    unsafe { LayerViewMut::from_raw(g, b.data as *mut u8, len) }.map_err(|e| ctx(what, e))
}

/// Refuse buffers whose used byte ranges overlap.
pub(super) fn check_disjoint(ranges: &mut [(usize, usize, String)]) -> Result<()> {
    ranges.sort_by_key(|r| (r.0, r.1));
    let mut widest: Option<&(usize, usize, String)> = None;
    for r in ranges.iter() {
        if let Some(w) = widest {
            if r.0 < w.1 {
                return Err(Error::InvalidArg(format!(
                    "{} (bytes {:#x}..{:#x}) and {} (bytes {:#x}..{:#x}) overlap",
                    w.2, w.0, w.1, r.2, r.0, r.1
                )));
            }
        }
        if widest.map_or(true, |w| r.1 > w.1) {
            widest = Some(r);
        }
    }
    Ok(())
}

/// `ckv_compact`: move the kept cells of every layer in place (K, and V if not NULL). Everything is
/// validated before the first byte moves.
///
/// # Safety
/// `plan` is null or a live handle; `k` (and `v` if not NULL) are null or `n_layer` buffers, each valid for
/// reads and writes of its `size` bytes and not accessed by anyone else during the call.
#[no_mangle]
pub unsafe extern "C" fn ckv_compact(plan: *const ckv_plan, k: *const ckv_buffer, v: *const ckv_buffer) -> ckv_status {
    run("ckv_compact", || {
        // SAFETY: null or a live handle (caller).
        let h = unsafe { plan_ref(plan) }?;
        let shp = h.plan.shape;
        let nl = shp.n_layer;
        // SAFETY: the caller guarantees `n_layer` readable ckv_buffer when non-null.
        let kb = unsafe { slice_ref(k, nl, "k") }?;
        let vb = if v.is_null() {
            None
        } else {
            // SAFETY: as for `k`.
            Some(unsafe { slice_ref(v, nl, "v") }?)
        };
        let n_embd = shp.heads.n_head_kv * shp.heads.head_dim;
        let mut kg = Vec::with_capacity(nl);
        let mut ranges = Vec::with_capacity(2 * nl);
        for (l, b) in kb.iter().enumerate() {
            let what = format!("k[{l}]");
            let g = buffer_geometry(b, &what)?;
            if g.n_embd != n_embd {
                return Err(Error::InvalidArg(format!(
                    "{what}.n_embd {} != n_head_kv * head_dim = {n_embd} of the plan",
                    g.n_embd
                )));
            }
            ranges.push((b.data as usize, b.data as usize + g.min_bytes()?, what));
            kg.push(g);
        }
        let mut vg = Vec::new();
        if let Some(vb) = vb {
            for (l, b) in vb.iter().enumerate() {
                let what = format!("v[{l}]");
                let g = buffer_geometry(b, &what)?;
                ranges.push((b.data as usize, b.data as usize + g.min_bytes()?, what));
                vg.push(g);
            }
        }
        check_disjoint(&mut ranges)?;
        // Name the buffer that is too short for the plan's cells (the plan validates again, generically).
        let max_cell = h
            .groups
            .iter()
            .flatten()
            .flat_map(|g| g.src.iter().chain(&g.dst))
            .copied()
            .max();
        if let Some(mc) = max_cell {
            let named = kg
                .iter()
                .enumerate()
                .map(|(l, g)| (g, "k", l))
                .chain(vg.iter().enumerate().map(|(l, g)| (g, "v", l)));
            for (g, kind, l) in named {
                if g.n_cells <= mc as usize {
                    return Err(Error::InvalidArg(format!(
                        "{kind}[{l}].n_cells {} does not hold cell {mc} that the plan moves",
                        g.n_cells
                    )));
                }
            }
        }
        let mut kv = Vec::with_capacity(nl);
        for (l, (b, g)) in kb.iter().zip(kg).enumerate() {
            // SAFETY: `b.size >= min_bytes` read/write bytes (caller, checked); extents disjoint (checked).
            kv.push(unsafe { buffer_view_mut(b, g, &format!("k[{l}]")) }?);
        }
        let mut vv = Vec::with_capacity(vg.len());
        if let Some(vb) = vb {
            for (l, (b, g)) in vb.iter().zip(vg).enumerate() {
                // SAFETY: as for K.
                vv.push(unsafe { buffer_view_mut(b, g, &format!("v[{l}]")) }?);
            }
        }
        h.plan
            .compact(&mut kv, if vb.is_some() { Some(&mut vv[..]) } else { None })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::null_mut;

    #[test]
    fn buffers() {
        let mut mem = vec![0u8; 64 * 2 * 10];
        let b = ckv_buffer {
            data: mem.as_mut_ptr().cast(),
            size: mem.len(),
            type_: CKV_TYPE_F16,
            n_embd: 64,
            n_cells: 10,
            transposed: 0,
            stride: 0,
        };
        let g = buffer_geometry(&b, "k[0]").unwrap();
        assert_eq!(g.layout, Layout::Rows { row_stride: 128 });
        let t = buffer_geometry(&ckv_buffer { transposed: 1, ..b }, "v[0]").unwrap();
        assert_eq!(t.layout, Layout::Transposed { chan_stride: 20 });
        let bad: Vec<(ckv_buffer, i32, &str)> = vec![
            (ckv_buffer { data: null_mut(), ..b }, CKV_ERR_NULL, "k[0].data"),
            (ckv_buffer { type_: 5, ..b }, CKV_ERR_UNSUPPORTED_TYPE, "k[0].type"),
            (ckv_buffer { type_: -1, ..b }, CKV_ERR_UNSUPPORTED_TYPE, "k[0].type"),
            (ckv_buffer { n_embd: 0, ..b }, CKV_ERR_INVALID_ARG, "k[0].n_embd"),
            (ckv_buffer { n_cells: -4, ..b }, CKV_ERR_INVALID_ARG, "k[0].n_cells"),
            (
                ckv_buffer { transposed: 2, ..b },
                CKV_ERR_INVALID_ARG,
                "k[0].transposed",
            ),
            (
                ckv_buffer {
                    size: mem.len() - 1,
                    ..b
                },
                CKV_ERR_SIZE,
                "k[0].size",
            ),
            (ckv_buffer { stride: 100, ..b }, CKV_ERR_INVALID_ARG, "k[0]"),
            (
                ckv_buffer {
                    type_: CKV_TYPE_Q8_0,
                    n_embd: 48,
                    ..b
                },
                CKV_ERR_INVALID_ARG,
                "k[0].n_embd",
            ),
            (
                ckv_buffer {
                    type_: CKV_TYPE_Q8_0,
                    transposed: 1,
                    ..b
                },
                CKV_ERR_UNSUPPORTED_TYPE,
                "k[0]",
            ),
        ];
        for (bb, code, needle) in bad {
            let e = buffer_geometry(&bb, "k[0]").unwrap_err();
            assert_eq!(e.status(), code, "{e}");
            assert!(e.message().contains(needle), "{e} should name {needle}");
        }
    }

    #[test]
    fn disjoint_ranges() {
        let r = |a, b, n: &str| (a, b, n.to_string());
        check_disjoint(&mut [r(0, 10, "a"), r(10, 20, "b"), r(30, 40, "c")]).unwrap();
        let e = check_disjoint(&mut [r(0, 100, "k[0]"), r(200, 300, "v[0]"), r(50, 60, "v[1]")]).unwrap_err();
        assert!(e.message().contains("k[0]") && e.message().contains("v[1]") && e.message().contains("overlap"));
        // A range inside a wide one, with a smaller one in between.
        assert!(check_disjoint(&mut [r(0, 100, "a"), r(10, 20, "b"), r(50, 60, "c")]).is_err());
    }
}
