//! `ckv_compact` and the caller-buffer checks it shares with `ckv_plan_create`: the geometry of a
//! `ckv_buffer` validated against its own fields and `size`, read-only and mutable views over exactly the
//! bytes that geometry uses, and the overlap check of all buffers of one call.
//!
//! Invariants: a view spans exactly `min_bytes` of its validated geometry, never more than the caller's
//! `size`; mutable views are made only after [`check_disjoint`] has proved every extent of the call disjoint;
//! `ckv_compact` validates everything (geometry, overlap, cells the plan moves) before the first byte moves.

use super::boundary::{ctx, plan_ref, put_str, run, slice_ref};
use super::params::type_from_id;
use super::types::*;
use crate::error::{Error, Result};
use crate::layout::{Geometry, LayerView, LayerViewMut, Layout};
use std::ffi::c_char;

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

/// `ckv_checksum`: 64-bit FNV-1a, as 16 hex digits and a NUL into `buf`, of the bytes of `cells` in `k[l]`
/// then `v[l]` for every layer in order (tests: compares compaction paths byte for byte).
///
/// # Safety
/// `k` and `v` are null or `n_layer` buffers, each valid for reads of its `size` bytes; `cells` is null or
/// valid for `n_cells` reads; `buf` is null or valid for writes of `buf_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ckv_checksum(
    k: *const ckv_buffer,
    v: *const ckv_buffer,
    n_layer: i32,
    cells: *const i32,
    n_cells: i32,
    buf: *mut c_char,
    buf_size: usize,
) -> ckv_status {
    run("ckv_checksum", || {
        let nl = usize::try_from(n_layer).map_err(|_| Error::InvalidArg(format!("n_layer {n_layer} < 0")))?;
        let nc = usize::try_from(n_cells).map_err(|_| Error::InvalidArg(format!("n_cells {n_cells} < 0")))?;
        // SAFETY: `n_layer` readable buffers each and `n_cells` cells when non-null (caller).
        let (kb, vb, cells) = unsafe {
            (
                slice_ref(k, nl, "k")?,
                slice_ref(v, nl, "v")?,
                slice_ref(cells, nc, "cells")?,
            )
        };
        let mut cs = Vec::with_capacity(nc);
        for &c in cells {
            cs.push(usize::try_from(c).map_err(|_| Error::InvalidArg(format!("cell {c} < 0")))?);
        }
        let mut h: u64 = 0xcbf29ce484222325;
        for l in 0..nl {
            for (b, what) in [(&kb[l], format!("k[{l}]")), (&vb[l], format!("v[{l}]"))] {
                // SAFETY: `b.size` readable bytes at `b.data`, not written during the call (caller).
                let view = unsafe { buffer_view(b, &what) }?;
                if let Some(&c) = cs.iter().find(|&&c| c >= view.geometry().n_cells) {
                    return Err(Error::InvalidArg(format!("{what} has no cell {c}")));
                }
                h = view.fnv1a(&cs, h);
            }
        }
        // SAFETY: forwarded to the caller.
        unsafe { put_str(buf, buf_size, &format!("{h:016x}"), "buf") }
    })
}

#[cfg(test)]
mod tests {
    use super::super::boundary::last_error;
    use super::*;
    use std::ptr::null_mut;

    /// Naive FNV-1a over the bytes the checksum must cover, in its order.
    fn fnv(bytes: impl Iterator<Item = u8>) -> String {
        let h = bytes.fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        format!("{h:016x}")
    }

    #[test]
    fn checksum_covers_exactly_the_cells_of_every_layer() {
        // one layer: K as rows of 4 f32 (16 bytes, stride 16), V transposed f16 (4 channels x 6 cells)
        let mut k: Vec<u8> = (0..96).map(|i| i as u8).collect();
        let mut v: Vec<u8> = (0..48).map(|i| (200 - i) as u8).collect();
        let mk = |data: &mut Vec<u8>, ty, tr| ckv_buffer {
            data: data.as_mut_ptr().cast(),
            size: data.len(),
            type_: ty,
            n_embd: 4,
            n_cells: 6,
            transposed: tr,
            stride: 0,
        };
        let cells = [4i32, 1];
        let sum = |k: &mut Vec<u8>, v: &mut Vec<u8>, cells: &[i32]| -> std::result::Result<String, ckv_status> {
            let (kb, vb) = (mk(k, CKV_TYPE_F32, 0), mk(v, CKV_TYPE_F16, 1));
            let mut buf = [0 as c_char; 17];
            // SAFETY: one live buffer each, `cells` and `buf` sized as passed.
            let st = unsafe { ckv_checksum(&kb, &vb, 1, cells.as_ptr(), cells.len() as i32, buf.as_mut_ptr(), 17) };
            if st != CKV_OK {
                return Err(st);
            }
            // SAFETY: ckv_checksum wrote 16 hex digits and a NUL.
            Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
                .to_str()
                .unwrap()
                .to_string())
        };
        let want = {
            let kr = cells
                .iter()
                .flat_map(|&c| k[c as usize * 16..c as usize * 16 + 16].to_vec());
            let vt = cells
                .iter()
                .flat_map(|&c| (0..4).flat_map(move |e| [e * 12 + c as usize * 2, e * 12 + c as usize * 2 + 1]))
                .map(|i| v[i])
                .collect::<Vec<_>>();
            fnv(kr.collect::<Vec<_>>().into_iter().chain(vt))
        };
        let got = sum(&mut k, &mut v, &cells).unwrap();
        assert_eq!(got, want);
        // a byte of another cell changes nothing, a byte of a covered cell changes the sum
        k[0] ^= 0xff;
        v[12 * 3] ^= 0xff;
        assert_eq!(sum(&mut k, &mut v, &cells).unwrap(), want);
        v[12 * 2 + 2] ^= 0xff;
        assert_ne!(sum(&mut k, &mut v, &cells).unwrap(), want);
        // a cell out of range is refused
        assert_eq!(sum(&mut k, &mut v, &[6]), Err(CKV_ERR_INVALID_ARG));
        assert!(last_error().contains("no cell 6"), "{}", last_error());
    }

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
