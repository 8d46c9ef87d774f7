//! The caller's side the target generates: one layer's K or V buffer (descriptor and memory, of a natural or
//! odd geometry), the params, and the naive references the oracles compare with (a group's element range,
//! the element-by-element move, a key row as f32).

use super::*;

/// One caller buffer (K or V of one layer): its descriptor fields and memory.
pub(crate) struct Layer {
    pub(crate) ty: i32,
    pub(crate) n_embd: i32,
    pub(crate) n_cells: i32,
    pub(crate) transposed: i32,
    pub(crate) stride: usize,
    pub(crate) size: usize,
    pub(crate) null_data: bool,
    pub(crate) buf: Buf,
}

/// The layout the library must derive from a descriptor, or `None` if it must refuse it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geom {
    pub(crate) ty: i32,
    pub(crate) n_embd: usize,
    pub(crate) n_cells: usize,
    pub(crate) transposed: bool,
    pub(crate) stride: usize, // row stride, or channel stride
    pub(crate) min_bytes: usize,
}

impl Layer {
    pub(crate) fn geom(&self) -> Option<Geom> {
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

    pub(crate) fn desc(&mut self) -> ckv_buffer {
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
pub(crate) fn natural_min(ty: i32, n_embd: i32, n_cells: i32, transposed: bool, stride: usize) -> usize {
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
pub(crate) fn layer(
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
pub(crate) fn tame_buffer(bytes: &mut [u8], ty: i32, transposed: bool, stride: usize, n_embd: i32, n_cells: i32) {
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
pub(crate) fn group_range(g: &Geom, n_groups: usize, grp: usize, n_head_kv: usize) -> Option<std::ops::Range<usize>> {
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
pub(crate) fn ref_move(g: &Geom, old: &[u8], new: &mut [u8], r: &std::ops::Range<usize>, src: &[i32], dst: &[i32]) {
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
pub(crate) fn key_row(g: &Geom, bytes: &[u8], cell: usize) -> Vec<f32> {
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
pub(crate) fn effective(p: &ckv_params, size: usize) -> ckv_params {
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

pub(crate) fn params_valid(e: &ckv_params) -> bool {
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

pub(crate) fn gen_params(u: &mut Unstructured<'_>, n: usize, n_head: usize) -> Result<ckv_params> {
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

pub(crate) fn method_of(id: i32) -> Method {
    match id {
        CKV_METHOD_COMPRESSKV => Method::CompressKv,
        CKV_METHOD_SNAPKV => Method::SnapKv,
        CKV_METHOD_PYRAMIDKV => Method::PyramidKv,
        CKV_METHOD_STREAMINGLLM => Method::StreamingLlm,
        _ => Method::SnapKvSrh,
    }
}
