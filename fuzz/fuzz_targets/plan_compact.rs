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
#[path = "../../tests/reference/mod.rs"]
mod reference;

use std::ffi::CStr;
use std::mem::size_of;

use common::*;
use compresskv::ffi::*;
use compresskv::plan::{Method, Params};
use compresskv::score::PoolKind;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const TOL: f64 = 2e-5; // tests/scoring.rs

/// One caller buffer (K or V of one layer): its descriptor fields and memory.
struct Layer {
    ty: i32,
    n_embd: i32,
    n_cells: i32,
    transposed: i32,
    stride: usize,
    size: usize,
    null_data: bool,
    buf: Buf,
}

/// The layout the library must derive from a descriptor, or `None` if it must refuse it.
#[derive(Clone, Copy, Debug)]
struct Geom {
    ty: i32,
    n_embd: usize,
    n_cells: usize,
    transposed: bool,
    stride: usize, // row stride, or channel stride
    min_bytes: usize,
}

impl Layer {
    fn geom(&self) -> Option<Geom> {
        let (be, bb) = type_info(self.ty)?;
        if self.null_data || self.n_embd <= 0 || self.n_cells <= 0 || !(0..=1).contains(&self.transposed) {
            return None;
        }
        let (n_embd, n_cells) = (self.n_embd as usize, self.n_cells as usize);
        if n_embd % be != 0 {
            return None;
        }
        let transposed = self.transposed == 1;
        let (stride, min_bytes) = if transposed {
            if !is_float_type(self.ty) {
                return None;
            }
            let s = if self.stride == 0 { n_cells * bb } else { self.stride };
            if s < n_cells * bb {
                return None;
            }
            (s, (n_embd - 1) * s + n_cells * bb)
        } else {
            let row = n_embd / be * bb;
            let s = if self.stride == 0 { row } else { self.stride };
            if s < row {
                return None;
            }
            (s, (n_cells - 1) * s + row)
        };
        if self.size < min_bytes {
            return None;
        }
        Some(Geom {
            ty: self.ty,
            n_embd,
            n_cells,
            transposed,
            stride,
            min_bytes,
        })
    }

    fn desc(&mut self) -> ckv_buffer {
        ckv_buffer {
            data: if self.null_data {
                std::ptr::null_mut()
            } else {
                self.buf.ptr().cast()
            },
            size: self.size,
            type_: self.ty,
            n_embd: self.n_embd,
            n_cells: self.n_cells,
            transposed: self.transposed,
            stride: self.stride,
        }
    }
}

/// Bytes a well-formed descriptor covers, for sizing (0 when the geometry is not computable).
fn natural_min(ty: i32, n_embd: i32, n_cells: i32, transposed: bool, stride: usize) -> usize {
    let Some((be, bb)) = type_info(ty) else { return 0 };
    if n_embd <= 0 || n_cells <= 0 {
        return 0;
    }
    let (e, c) = (n_embd as usize, n_cells as usize);
    if transposed {
        let s = if stride == 0 { c * bb } else { stride };
        (e - 1) * s + c * bb
    } else {
        if e % be != 0 {
            return 0;
        }
        let row = e / be * bb;
        let s = if stride == 0 { row } else { stride };
        (c - 1) * s + row
    }
}

/// A buffer of `ty` for `n_embd` x `n_cells`, maybe faulty, filled from the input (tamed if `nice`).
/// `faults`: whether this buffer may be made invalid.
fn layer(
    u: &mut Unstructured<'_>,
    ty: i32,
    n_embd: i32,
    n_cells: i32,
    transposed: bool,
    nice: bool,
    faults: bool,
) -> Result<Layer> {
    let (be, bb) = type_info(ty).unwrap_or((1, 2));
    let elem = if transposed {
        bb
    } else {
        n_embd.max(0) as usize / be * bb
    };
    let mut stride = match pick(u, &[8, 2])? {
        0 => 0,
        _ => elem + u.int_in_range(1..=16)?,
    };
    let mut l = Layer {
        ty,
        n_embd,
        n_cells,
        transposed: transposed as i32,
        stride,
        size: 0,
        null_data: false,
        buf: Buf::new(0, 0),
    };
    if faults && one_in(u, 8)? {
        match u.int_in_range(0..=6)? {
            0 => l.ty = *u.choose(&[4, 5, 9, 31, -1, 1000])?,
            1 => l.n_embd = *u.choose(&[0, -1, n_embd + 1, n_embd * 2])?,
            2 => l.n_cells = *u.choose(&[0, -1])?,
            3 => l.transposed = *u.choose(&[2, -1])?,
            4 if elem > 1 && !transposed => {
                stride = elem - 1;
                l.stride = stride;
            }
            5 => l.null_data = true,
            _ => l.transposed = 1 - l.transposed, // quantized transposed, or rows
        }
    }
    let min = natural_min(l.ty, l.n_embd, l.n_cells, l.transposed == 1, l.stride);
    let mut size = min + if one_in(u, 3)? { u.int_in_range(1..=24)? } else { 0 };
    if faults && min > 0 && one_in(u, 12)? {
        size = min - u.int_in_range(1..=min.min(40))?;
    }
    l.size = size;
    let off = if one_in(u, 4)? { u.int_in_range(1..=15)? } else { 0 };
    l.buf = Buf::new(size.max(min), off);
    // contents: the input's bytes, repeated when it runs short, tamed for the scoring oracle
    let take = u.len().min(size);
    let src = u.bytes(take)?.to_vec();
    let all = l.buf.all_mut();
    for (i, b) in all.iter_mut().enumerate() {
        *b = if src.is_empty() {
            (i * 131 + 7) as u8
        } else {
            src[i % src.len()] ^ (i / src.len()) as u8
        };
    }
    if nice && type_info(l.ty).is_some() {
        let o = l.buf.off;
        let len = l.buf.len;
        tame_buffer(
            &mut l.buf.all_mut()[o..o + len],
            l.ty,
            l.transposed == 1,
            l.stride,
            l.n_embd,
            l.n_cells,
        );
    }
    Ok(l)
}

/// `tame` every row (or channel) of a buffer.
fn tame_buffer(bytes: &mut [u8], ty: i32, transposed: bool, stride: usize, n_embd: i32, n_cells: i32) {
    let (be, bb) = type_info(ty).unwrap();
    let (rows, row_len) = if transposed {
        (n_embd.max(0) as usize, n_cells.max(0) as usize * bb)
    } else {
        (n_cells.max(0) as usize, n_embd.max(0) as usize / be * bb)
    };
    let s = if stride == 0 { row_len } else { stride };
    for r in 0..rows {
        let a = r * s;
        if a + row_len <= bytes.len() {
            tame(ty, &mut bytes[a..a + row_len]);
        }
    }
}

/// The element range of group `g` of `n_groups` in a buffer of `n_embd`, and whether the library must
/// refuse it.
fn group_range(g: &Geom, n_groups: usize, grp: usize, n_head_kv: usize) -> Option<std::ops::Range<usize>> {
    let r = if n_groups == 1 {
        0..g.n_embd
    } else {
        if g.n_embd % n_head_kv != 0 {
            return None;
        }
        let hd = g.n_embd / n_head_kv;
        grp * hd..(grp + 1) * hd
    };
    let (be, _) = type_info(g.ty).unwrap();
    if !g.transposed && (r.start % be != 0 || r.end % be != 0) {
        return None;
    }
    Some(r)
}

/// Move `src[j] -> dst[j]` for the elements `r` of a snapshot `old` into `new` (buffer bytes from its base).
fn ref_move(g: &Geom, old: &[u8], new: &mut [u8], r: &std::ops::Range<usize>, src: &[i32], dst: &[i32]) {
    let (be, bb) = type_info(g.ty).unwrap();
    for (&s, &d) in src.iter().zip(dst) {
        let (s, d) = (s as usize, d as usize);
        if g.transposed {
            for ch in r.clone() {
                let (a, b) = (ch * g.stride + s * bb, ch * g.stride + d * bb);
                new[b..b + bb].copy_from_slice(&old[a..a + bb]);
            }
        } else {
            let (o0, o1) = (r.start / be * bb, r.end / be * bb);
            let (a, b) = (s * g.stride, d * g.stride);
            new[b + o0..b + o1].copy_from_slice(&old[a + o0..a + o1]);
        }
    }
}

/// Dequantized row of `cell` (for the reference).
fn key_row(g: &Geom, bytes: &[u8], cell: usize) -> Vec<f32> {
    let (_, bb) = type_info(g.ty).unwrap();
    if g.transposed {
        let mut row = Vec::with_capacity(g.n_embd * bb);
        for ch in 0..g.n_embd {
            let a = ch * g.stride + cell * bb;
            row.extend_from_slice(&bytes[a..a + bb]);
        }
        ref_dequantize(g.ty, &row, g.n_embd)
    } else {
        let n = row_bytes(g.ty, g.n_embd).unwrap();
        let a = cell * g.stride;
        ref_dequantize(g.ty, &bytes[a..a + n], g.n_embd)
    }
}

/// The ckv_params a caller with `size` bytes of it passes: the fields inside `size`, the rest defaults.
fn effective(p: &ckv_params, size: usize) -> ckv_params {
    const ENDS: [usize; 15] = [8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64];
    let n = ENDS.iter().copied().filter(|&e| e <= size).max().unwrap_or(0);
    let mut eff = ckv_params::default();
    // SAFETY: both plain-bytes ckv_params, n <= sizeof.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (p as *const ckv_params).cast::<u8>(),
            (&mut eff as *mut ckv_params).cast::<u8>(),
            n,
        )
    };
    eff
}

fn params_valid(e: &ckv_params) -> bool {
    (0..=4).contains(&e.method)
        && e.budget >= 0
        && (e.budget > 0 || (e.ratio > 0.0 && e.ratio <= 1.0))
        && e.window >= 1
        && e.window_end >= -1
        && e.n_sink >= 0
        && e.pool_kernel >= 1
        && e.pool_kernel % 2 == 1
        && (0..=1).contains(&e.pool)
        && e.chunk >= 0
        && e.n_srh >= 0
        && !(e.n_srh == 0 && matches!(e.method, CKV_METHOD_COMPRESSKV | CKV_METHOD_SNAPKV_SRH))
        && e.floor >= 0
        && e.pyramid_beta.is_finite()
        && e.pyramid_beta > 0.0
        && (0..=1).contains(&e.per_head)
        && (0..=1).contains(&e.fill)
}

fn gen_params(u: &mut Unstructured<'_>, n: usize, n_head: usize) -> Result<ckv_params> {
    let n = n as i32;
    let mut p = ckv_params::default();
    p.method = match pick(u, &[30, 1])? {
        0 => u.int_in_range(0..=4)?,
        _ => *u.choose(&[5, -1, 100])?,
    };
    p.budget = match pick(u, &[10, 3, 2, 1, 1])? {
        0 => u.int_in_range(1..=n.max(2))?,
        1 => u.int_in_range(n..=n + 16)?,
        2 => 0,
        3 => *u.choose(&[1 << 16, 1 << 20, i32::MAX / 64])?,
        _ => *u.choose(&[-1, i32::MIN])?,
    };
    p.ratio = match pick(u, &[8, 1])? {
        0 => u.int_in_range(1..=100u32)? as f32 / 100.0,
        _ => *u.choose(&[0.0, -0.5, 1.5, f32::NAN, f32::INFINITY, 1e-30])?,
    };
    p.window = match pick(u, &[20, 1, 1])? {
        0 => u.int_in_range(1..=n.min(12))?,
        1 => *u.choose(&[0, -1])?,
        _ => n + u.int_in_range(1..=3)?,
    };
    p.window_end = match pick(u, &[8, 4, 1])? {
        0 => -1,
        1 => u.int_in_range(p.window.max(0)..=n.max(p.window.max(0)))?,
        _ => *u.choose(&[-2, n + 1, p.window - 1, i32::MIN])?,
    };
    p.n_sink = match pick(u, &[6, 3, 1])? {
        0 => 0,
        1 => u.int_in_range(1..=n + 2)?,
        _ => -1,
    };
    p.pool_kernel = match pick(u, &[12, 1])? {
        0 => *u.choose(&[1, 3, 5, 7, 9])?,
        _ => *u.choose(&[0, 2, 4, -1])?,
    };
    p.pool = match pick(u, &[20, 1])? {
        0 => u.int_in_range(0..=1)?,
        _ => *u.choose(&[2, -1])?,
    };
    p.chunk = match pick(u, &[6, 6, 1])? {
        0 => 0,
        1 => u.int_in_range(1..=n.clamp(1, 12))?,
        _ => -1,
    };
    p.n_srh = match pick(u, &[12, 1])? {
        0 => u.int_in_range(1..=n_head as i32 + 1)?,
        _ => *u.choose(&[0, -1])?,
    };
    p.per_head = match pick(u, &[20, 1])? {
        0 => u.int_in_range(0..=1)?,
        _ => 2,
    };
    p.fill = match pick(u, &[20, 1])? {
        0 => u.int_in_range(0..=1)?,
        _ => -1,
    };
    p.floor = match pick(u, &[12, 1])? {
        0 => u.int_in_range(0..=n + 4)?,
        _ => -1,
    };
    p.pyramid_beta = match pick(u, &[12, 1, 1])? {
        0 => u.int_in_range(4..=120u32)? as f32 / 4.0,
        1 => *u.choose(&[1.0, 0.5, 1e30])?,
        _ => *u.choose(&[0.0, -1.0, f32::NAN, f32::INFINITY])?,
    };
    Ok(p)
}

fn method_of(id: i32) -> Method {
    match id {
        CKV_METHOD_COMPRESSKV => Method::CompressKv,
        CKV_METHOD_SNAPKV => Method::SnapKv,
        CKV_METHOD_PYRAMIDKV => Method::PyramidKv,
        CKV_METHOD_STREAMINGLLM => Method::StreamingLlm,
        _ => Method::SnapKvSrh,
    }
}

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

    // ---- stats JSON -------------------------------------------------------------------------------------
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

    // ---- compaction -------------------------------------------------------------------------------------
    let rounds = if one_in(u, 4)? { 2 } else { 1 };
    // K: the planned buffers, or others of another geometry
    let mut kc: Vec<Layer> = if u.ratio(3, 4)? {
        std::mem::take(&mut keys)
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
