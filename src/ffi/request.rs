//! Entry points of compression requests (`ckv_request_*`): the policy of one compression of a llama.cpp
//! sequence ([`crate::request`]) behind the C ABI.
//!
//! Invariants: every entry point validates its arguments and returns a status with the reason in
//! `ckv_last_error`; a request refuses before the caller has changed anything; the plan a request makes is
//! an ordinary `ckv_plan` owned by the request (valid until `ckv_request_free`).

use super::boundary::{c_str, check_ptr, deref, put, run, run_value, slice_ref};
use super::options::options_arg;
use super::params::{flag, method_id, nonneg};
use super::plan::stats_json;
use super::types::*;
use crate::error::{Error, Result};
use crate::options::Form;
use crate::request::{Request, Sequence, Slots};
use std::ffi::{c_char, CString};
use std::mem::size_of;

const REQUEST_MAGIC: u64 = 0x636b_765f_7265_7175; // "ckv_requ"

/// Mirror of `ckv_seq_desc`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ckv_seq_desc {
    /// `sizeof(ckv_seq_desc)` of the caller.
    pub size: usize,
    /// Cells of the sequence.
    pub n: i32,
    /// `n` positions, ascending.
    pub pos: *const i32,
    /// Compressed before (0/1).
    pub compressed: i32,
    /// `n_tokens` end-of-turn flags of the sequence's last tokens (NULL: unknown).
    pub eog: *const u8,
    /// Tokens the caller passed (the sequence's last).
    pub n_tokens: i32,
    /// Probe tokens (0: none).
    pub n_probe: i32,
    /// Most tokens one decode takes.
    pub n_ubatch: i32,
    /// Base cache of an iSWA model (0/1).
    pub iswa: i32,
}

/// Mirror of `ckv_request_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ckv_request_info {
    /// 1: nothing to compress.
    pub skip: i32,
    /// `ckv_method`.
    pub method: i32,
    /// `ckv_form`.
    pub form: i32,
    /// One token set per KV head (0/1).
    pub per_head: i32,
    /// Cells the sequence keeps.
    pub budget: i32,
    /// Tokens to decode again with query capture.
    pub n_decode: i32,
    /// Index of the first (n: the probe, after the sequence).
    pub decode_idx: i32,
    /// Its position.
    pub decode_pos: i32,
    /// The last cell stays in place (probe).
    pub keep_last: i32,
    /// Window text: first token in the caller's tokens, -1: the probe, -2: none.
    pub text_index: i32,
    /// Window text tokens.
    pub text_len: i32,
    /// A line for the log (NULL: none); valid until the next call on the request.
    pub note: *const c_char,
    /// 1: the note is a warning.
    pub note_warn: i32,
    /// Reconstruction: tokens of the sequence decoded after the probe per pass (0: none).
    pub recon_chunk: i32,
}

/// Mirror of `ckv_request_facts`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ckv_request_facts {
    /// `sizeof(ckv_request_facts)` of the caller.
    pub size: usize,
    /// Sequence id.
    pub seq_id: i32,
    /// Cells the sequence holds now (probe removed).
    pub n_after: i32,
    /// K and V bytes of one cell over all layers.
    pub kv_bytes_cell: u64,
    /// ggml type names.
    pub type_k: *const c_char,
    /// ggml type name of V.
    pub type_v: *const c_char,
    /// V transposed (0/1).
    pub v_trans: i32,
    /// Host buffers (0/1).
    pub host: i32,
    /// "host", "host-copy", "graph" or "mask".
    pub compact: *const c_char,
    /// Checksum (NULL: none).
    pub checksum: *const c_char,
    /// Window text (NULL: none).
    pub window_text: *const c_char,
    /// Milliseconds.
    pub ms_redecode: f64,
    /// Milliseconds.
    pub ms_compact: f64,
    /// Milliseconds.
    pub ms_total: f64,
}

/// Opaque request handle.
#[derive(Debug)]
pub struct ckv_request {
    magic: u64,
    pub(super) req: Request,
    pub(super) note: CString,
    pub(super) note_warn: bool,
    pub(super) plan: Option<Box<ckv_plan>>,
    pub(super) cells: Vec<i32>,
    pub(super) pos: Vec<i32>,
    pub(super) profile_path: Option<String>,
    pub(super) fingerprint: String,
    /// With a scorer checked against the library's own scores: the largest difference and whether both select
    /// the same cells.
    pub(super) score_check: Option<(f64, bool)>,
}

/// # Safety
/// `r` is null or a live request handle.
pub(super) unsafe fn request_mut<'a>(r: *mut ckv_request) -> Result<&'a mut ckv_request> {
    check_ptr(r, "request")?;
    // SAFETY: non-null and aligned; the caller guarantees a live handle (the magic check is best effort).
    let h = unsafe { &mut *r };
    if h.magic != REQUEST_MAGIC {
        return Err(Error::InvalidArg("request is not a live ckv_request".into()));
    }
    Ok(h)
}

/// `CKV_FORM_FILL`: every layer keeps the largest layer budget.
pub const CKV_FORM_FILL: i32 = 0;
/// `CKV_FORM_EXACT`: per-layer budgets, masked per layer.
pub const CKV_FORM_EXACT: i32 = 1;
/// `CKV_FORM_MASK`: reference, nothing moves.
pub const CKV_FORM_MASK: i32 = 2;

fn form_id(f: Form) -> i32 {
    match f {
        Form::Fill => CKV_FORM_FILL,
        Form::Exact => CKV_FORM_EXACT,
        Form::Mask => CKV_FORM_MASK,
    }
}

/// `ckv_request_new`: decide a compression of a sequence before the caller changes anything.
///
/// # Safety
/// `options` is null or a NUL-terminated string; `seq` is null or a valid `ckv_seq_desc` whose arrays hold
/// the counts it gives; `out` is null or valid for a pointer write.
#[no_mangle]
pub unsafe extern "C" fn ckv_request_new(
    options: *const c_char,
    seq: *const ckv_seq_desc,
    out: *mut *mut ckv_request,
) -> ckv_status {
    run("ckv_request_new", || {
        check_ptr(out, "out")?;
        // SAFETY: forwarded to the caller.
        let opts = unsafe { options_arg(options) }?;
        // SAFETY: forwarded to the caller.
        let s = unsafe { deref(seq, "seq") }?;
        if s.size < size_of::<ckv_seq_desc>() {
            return Err(Error::InvalidArg(format!(
                "seq.size {} < {}",
                s.size,
                size_of::<ckv_seq_desc>()
            )));
        }
        let n = nonneg(s.n, "seq.n")?;
        let n_tokens = nonneg(s.n_tokens, "seq.n_tokens")?;
        // SAFETY: the caller guarantees `n` positions.
        let pos = unsafe { slice_ref(s.pos, n, "seq.pos") }?;
        if pos.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::InvalidArg("seq.pos is not ascending".into()));
        }
        let eog = if s.eog.is_null() {
            None
        } else {
            // SAFETY: the caller guarantees `n_tokens` flags when non-null.
            Some(unsafe { slice_ref(s.eog, n_tokens, "seq.eog") }?)
        };
        let sq = Sequence {
            pos,
            compressed: flag(s.compressed, "seq.compressed")?,
            eog,
            n_tokens,
            n_probe: nonneg(s.n_probe, "seq.n_probe")?,
            n_ubatch: nonneg(s.n_ubatch, "seq.n_ubatch")?,
            iswa: flag(s.iswa, "seq.iswa")?,
        };
        let req = Request::new(opts, &sq)?;
        let note = CString::new(req.note.clone().unwrap_or_default()).unwrap_or_default();
        let h = Box::new(ckv_request {
            magic: REQUEST_MAGIC,
            req,
            note,
            note_warn: false,
            plan: None,
            cells: Vec::new(),
            pos: Vec::new(),
            profile_path: None,
            fingerprint: String::new(),
            score_check: None,
        });
        // SAFETY: `out` is non-null and aligned (checked).
        unsafe { put(out, Box::into_raw(h)) };
        Ok(())
    })
}

/// `ckv_request_info_get`: what the caller does next.
///
/// # Safety
/// `req` is null or a live request; `info` is null or valid for a write of a `ckv_request_info`.
#[no_mangle]
pub unsafe extern "C" fn ckv_request_info_get(req: *mut ckv_request, info: *mut ckv_request_info) -> ckv_status {
    run("ckv_request_info_get", || {
        // SAFETY: forwarded to the caller.
        let h = unsafe { request_mut(req) }?;
        check_ptr(info, "info")?;
        let r = &h.req;
        let text_index = if !r.opts.method.needs_queries() || r.skip {
            -2
        } else if r.n_probe > 0 {
            -1
        } else {
            i32::try_from(r.ws).unwrap_or(-2)
        };
        let i = ckv_request_info {
            skip: r.skip as i32,
            method: method_id(r.opts.method),
            form: form_id(r.opts.form),
            per_head: r.opts.per_head as i32,
            budget: r.budget as i32,
            n_decode: r.n_decode as i32,
            decode_idx: r.ws as i32,
            decode_pos: r.decode_pos,
            keep_last: r.keep_last as i32,
            text_index,
            text_len: if r.n_probe > 0 { r.n_probe } else { r.we - r.ws } as i32,
            note: if h.note.as_bytes().is_empty() {
                std::ptr::null()
            } else {
                h.note.as_ptr()
            },
            note_warn: h.note_warn as i32,
            recon_chunk: r.recon_chunk as i32,
        };
        // SAFETY: checked non-null and aligned; the caller provides a whole struct.
        unsafe { put(info, i) };
        Ok(())
    })
}

/// `ckv_request_plan_get`: the request's plan (NULL before `ckv_request_plan`).
///
/// # Safety
/// `req` is null or a live request.
#[no_mangle]
pub unsafe extern "C" fn ckv_request_plan_get(req: *mut ckv_request) -> *const ckv_plan {
    run_value("ckv_request_plan_get", std::ptr::null(), || {
        // SAFETY: forwarded to the caller.
        let h = unsafe { request_mut(req) }?;
        Ok(h.plan.as_deref().map_or(std::ptr::null(), |p| p as *const ckv_plan))
    })
}

fn slots_of(h: &ckv_request) -> Result<Slots> {
    let plan = h
        .plan
        .as_ref()
        .ok_or_else(|| Error::InvalidArg("the request has no plan".into()))?;
    Ok(h.req.slots(plan.plan(), &h.cells, &h.pos))
}

/// `ckv_request_slots`: where the kept cells go: `n_slots` cells and positions (`cap` >= the cells planned),
/// the first position from which the sequence holds every position, and whether per-layer masks are needed.
///
/// # Safety
/// `req` is null or a live request; `dst` and `pos` null or valid for `cap` writes; the other outputs null
/// or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn ckv_request_slots(
    req: *mut ckv_request,
    dst: *mut i32,
    pos: *mut i32,
    cap: i32,
    n_slots: *mut i32,
    mark: *mut i32,
    need_mask: *mut i32,
) -> ckv_status {
    run("ckv_request_slots", || {
        // SAFETY: forwarded to the caller.
        let h = unsafe { request_mut(req) }?;
        let s = slots_of(h)?;
        let cap = nonneg(cap, "cap")?;
        if cap < s.dst.len() {
            return Err(Error::Size(format!("cap {cap} < {} slots", s.dst.len())));
        }
        for p in [dst, pos, n_slots, mark, need_mask] {
            check_ptr(p, "output")?;
        }
        // SAFETY: each output is non-null and aligned (checked); `dst` and `pos` hold `cap` values (caller).
        unsafe {
            std::ptr::copy_nonoverlapping(s.dst.as_ptr(), dst, s.dst.len());
            std::ptr::copy_nonoverlapping(s.pos.as_ptr(), pos, s.pos.len());
            put(n_slots, s.dst.len() as i32);
            put(mark, s.mark);
            put(need_mask, s.need_mask as i32);
        }
        Ok(())
    })
}

/// `ckv_request_hidden`: the per-layer mask of the exact and mask forms for layer `il` (see
/// `Request::hidden`): `n` flags, 1 = hidden from that layer; `n` is the slots of `ckv_request_slots` (exact
/// form) or the planned cells (mask form).
///
/// # Safety
/// `req` is null or a live request; `out` is null or valid for `n` writes.
#[no_mangle]
pub unsafe extern "C" fn ckv_request_hidden(req: *mut ckv_request, il: i32, out: *mut u8, n: i32) -> ckv_status {
    run("ckv_request_hidden", || {
        // SAFETY: forwarded to the caller.
        let h = unsafe { request_mut(req) }?;
        let plan = h
            .plan
            .as_ref()
            .ok_or_else(|| Error::InvalidArg("the request has no plan".into()))?
            .plan();
        let il = usize::try_from(il)
            .ok()
            .filter(|&l| l < plan.layers.len())
            .ok_or_else(|| Error::InvalidArg(format!("layer {il} not in 0..{}", plan.layers.len())))?;
        let flags = h.req.hidden(plan, il, h.cells.len());
        if nonneg(n, "n")? != flags.len() {
            return Err(Error::Size(format!("n {n} != {} flags of layer {il}", flags.len())));
        }
        check_ptr(out, "out")?;
        // SAFETY: `out` is non-null and valid for `n == flags.len()` writes (caller, checked).
        unsafe { std::ptr::copy_nonoverlapping(flags.as_ptr(), out, flags.len()) };
        Ok(())
    })
}

/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn opt_str(p: *const c_char, what: &str) -> Result<Option<String>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded to the caller.
    Ok(Some(unsafe { c_str(p, what) }?.to_string_lossy().into_owned()))
}

/// `ckv_request_finish`: the stats line of the compression, appended to the `stats` option's file (if any)
/// and copied to `buf` (if not NULL; `*len` receives its length, without the NUL).
///
/// # Safety
/// `req` is null or a live request; `facts` null or valid for `facts->size` bytes with its strings null or
/// NUL-terminated; `buf` null or valid for `buf_size` bytes; `len` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn ckv_request_finish(
    req: *mut ckv_request,
    facts: *const ckv_request_facts,
    buf: *mut c_char,
    buf_size: usize,
    len: *mut usize,
) -> ckv_status {
    run("ckv_request_finish", || {
        use serde_json::json;
        // SAFETY: forwarded to the caller.
        let h = unsafe { request_mut(req) }?;
        // SAFETY: forwarded to the caller.
        let f = unsafe { deref(facts, "facts") }?;
        if f.size < size_of::<ckv_request_facts>() {
            return Err(Error::InvalidArg(format!(
                "facts.size {} < {}",
                f.size,
                size_of::<ckv_request_facts>()
            )));
        }
        let plan = h
            .plan
            .as_ref()
            .ok_or_else(|| Error::InvalidArg("the request has no plan".into()))?;
        let r = &h.req;
        // SAFETY: the strings of `facts` are forwarded to the caller.
        let (tk, tv, compact, checksum, text) = unsafe {
            (
                opt_str(f.type_k, "facts.type_k")?,
                opt_str(f.type_v, "facts.type_v")?,
                opt_str(f.compact, "facts.compact")?,
                opt_str(f.checksum, "facts.checksum")?,
                opt_str(f.window_text, "facts.window_text")?,
            )
        };
        let window = text.map(|t| {
            let (start, len) = if r.n_probe > 0 {
                (r.p_next, r.n_probe)
            } else {
                (r.decode_pos, r.we - r.ws)
            };
            json!({"start": start, "len": len, "anchor": r.anchor, "text": t})
        });
        let layers: Vec<_> = plan
            .plan()
            .layers
            .iter()
            .map(|l| json!({"kept": l.groups.first().map_or(0, |g| g.kept.len())}))
            .collect();
        let plan_json: serde_json::Value = serde_json::from_str(&stats_json(plan)).unwrap_or_default();
        let n_after = f.n_after.max(0) as u64;
        let line = json!({
            "method": r.opts.method.name(), "budget": r.budget, "seq_id": f.seq_id, "n_prompt": r.p_next,
            "recompressed": r.again, "cells_before": r.n, "cells_after": n_after,
            "kv_bytes_before": f.kv_bytes_cell * r.n as u64, "kv_bytes_after": f.kv_bytes_cell * n_after,
            "kv_type_k": tk, "kv_type_v": tv, "v_trans": f.v_trans != 0, "host_buffers": f.host != 0,
            "compact": compact, "kv_checksum": checksum, "profile": h.profile_path, "fingerprint": h.fingerprint,
            "window": window, "layers": layers, "ms_redecode": f.ms_redecode, "ms_score": plan.plan().ms_score,
            "ms_compact": f.ms_compact, "ms_total": f.ms_total, "plan": plan_json,
            "scores": if plan.plan().external_scores { "caller" } else { "library" },
            "reconstruct": (r.recon_chunk > 0).then(|| json!({"chunk": r.recon_chunk, "passes": r.n.div_ceil(r.recon_chunk)})),
            "score_check": h.score_check.map(|(d, same)| json!({"max_abs_diff": d, "same_cells": same})),
            "recorded_scores": r.opts.scores.as_ref().map(|p| json!({"file": p, "replayed": r.replay})),
        })
        .to_string();
        if let Some(path) = &r.opts.stats {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::Io(format!("cannot open stats file '{path}': {e}")))?;
            writeln!(file, "{line}").map_err(|e| Error::Io(format!("cannot write stats file '{path}': {e}")))?;
        }
        if !len.is_null() {
            // SAFETY: non-null; the caller guarantees one write.
            unsafe { put(len, line.len()) };
        }
        if !buf.is_null() && buf_size > 0 {
            let k = line.len().min(buf_size - 1);
            // SAFETY: `buf` is valid for `buf_size` bytes (caller); k + 1 <= buf_size.
            unsafe {
                std::ptr::copy_nonoverlapping(line.as_ptr(), buf.cast::<u8>(), k);
                *buf.add(k) = 0;
            }
        }
        Ok(())
    })
}

/// `ckv_request_free`: free a request (NULL: no-op).
///
/// # Safety
/// `req` is null or a live request, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ckv_request_free(req: *mut ckv_request) {
    if req.is_null() {
        return;
    }
    let _ = run("ckv_request_free", || {
        // SAFETY: forwarded to the caller.
        unsafe { request_mut(req) }?;
        // SAFETY: a live handle was produced by Box::into_raw in ckv_request_new and is freed once.
        let mut b = unsafe { Box::from_raw(req) };
        b.magic = 0;
        drop(b);
        Ok(())
    });
}
