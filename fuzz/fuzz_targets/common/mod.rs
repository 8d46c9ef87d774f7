//! Shared by the fuzz targets: the status invariants of include/compresskv.h, byte buffers that can hand
//! out misaligned pointers, a per-element reference of the ggml formats and a profile generator.
//!
//! Every target calls the library through its `extern "C"` functions (`compresskv::ffi::ckv_*`), as a C
//! caller would. The invariants checked on every call:
//! - a failing call returns one of the header's error codes (never `CKV_ERR_PANIC`, which means an internal
//!   bug was caught at the boundary) and leaves a non-empty `ckv_last_error()` that starts with the
//!   function's name;
//! - a successful call leaves the previous `ckv_last_error()` as it was;
//! - a failing call writes nothing to the caller's buffers (each target snapshots and compares them).
//!
//! libfuzzer-sys installs a panic hook that aborts, so a panic inside the library is reported as a crash
//! even though `catch_unwind` at the boundary would have turned it into `CKV_ERR_PANIC`.

#![allow(dead_code)]

use std::ffi::CStr;

use compresskv::ffi::*;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use serde_json::{Map, Value};

/// `ckv_last_error()` as a Rust string.
pub fn last_error() -> String {
    // SAFETY: ckv_last_error never returns NULL and the string is valid until the next call on this thread.
    unsafe { CStr::from_ptr(ckv_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// `ckv_status_name(st)`.
pub fn status_name(st: i32) -> String {
    // SAFETY: never NULL, a static string.
    unsafe { CStr::from_ptr(ckv_status_name(st)) }
        .to_string_lossy()
        .into_owned()
}

/// Set a recognisable last error (a failing call), so that a later successful call can be checked not to
/// touch it.
pub fn mark_last_error() -> String {
    // SAFETY: NULL is allowed and refused.
    let st = unsafe { ckv_params_default(std::ptr::null_mut()) };
    assert_eq!(st, CKV_ERR_NULL);
    let e = last_error();
    assert!(e.starts_with("ckv_params_default: "), "{e:?}");
    e
}

/// Check the status of a call to `func`: `true` for CKV_OK (and then the last error is still `marker`, if
/// given); for a failure, a real error code and a message naming the function.
pub fn check(func: &str, st: i32, marker: Option<&str>) -> bool {
    if st == CKV_OK {
        if let Some(m) = marker {
            let e = last_error();
            assert_eq!(e, m, "{func} succeeded but changed ckv_last_error()");
        }
        return true;
    }
    let e = last_error();
    assert!(
        (CKV_ERR_NULL..=CKV_ERR_ALLOC).contains(&st),
        "{func} returned {st} ({}): {e}",
        status_name(st)
    );
    let prefix = format!("{func}: ");
    assert!(
        e.starts_with(&prefix) && e.len() > prefix.len(),
        "{func} failed with {} but ckv_last_error() is {e:?}",
        status_name(st)
    );
    false
}

/// `check`, and the call must have failed with `want`.
pub fn expect_err(func: &str, st: i32, want: i32) {
    assert!(
        !check(func, st, None),
        "{func} succeeded, expected {}",
        status_name(want)
    );
    assert_eq!(
        st,
        want,
        "{func}: {} instead of {}: {}",
        status_name(st),
        status_name(want),
        last_error()
    );
}

/// `check`, and the call must have succeeded.
pub fn expect_ok(func: &str, st: i32, marker: Option<&str>) {
    assert!(
        check(func, st, marker),
        "{func} failed with {}: {}",
        status_name(st),
        last_error()
    );
}

/// A zero-initialised byte buffer, 16-byte aligned, with `slack` readable bytes past `len` so that a
/// pointer `off` bytes in (off < 16) still covers `len` bytes.
pub struct Buf {
    words: Vec<u128>,
    pub off: usize,
    pub len: usize,
}

impl Buf {
    pub fn new(len: usize, off: usize) -> Buf {
        assert!(off < 16);
        Buf {
            words: vec![0u128; (len + off).div_ceil(16) + 1],
            off,
            len,
        }
    }
    /// The whole allocation (for snapshots: bytes outside `len` must stay untouched too).
    pub fn all(&self) -> &[u8] {
        // SAFETY: u128 storage viewed as bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.words.len() * 16) }
    }
    pub fn all_mut(&mut self) -> &mut [u8] {
        // SAFETY: u128 storage viewed as bytes.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.words.len() * 16) }
    }
    /// The `len` bytes the pointer covers.
    pub fn bytes(&self) -> &[u8] {
        &self.all()[self.off..self.off + self.len]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let (o, l) = (self.off, self.len);
        &mut self.all_mut()[o..o + l]
    }
    pub fn ptr(&mut self) -> *mut u8 {
        // SAFETY: off < 16 lies inside the allocation.
        unsafe { self.words.as_mut_ptr().cast::<u8>().add(self.off) }
    }
}

/// A choice with weights: index `i` with probability `w[i] / sum(w)` (roughly).
pub fn pick(u: &mut Unstructured<'_>, w: &[u32]) -> Result<usize> {
    let total: u32 = w.iter().sum();
    let mut x = u.int_in_range(0..=total - 1)?;
    for (i, &wi) in w.iter().enumerate() {
        if x < wi {
            return Ok(i);
        }
        x -= wi;
    }
    Ok(w.len() - 1)
}

/// A `true` with probability about `1/n`.
pub fn one_in(u: &mut Unstructured<'_>, n: u32) -> Result<bool> {
    Ok(u.int_in_range(0..=n - 1)? == 0)
}

// ---------------------------------------------------------------------------------------------------------
// The ggml formats, per element, from their definitions (ggml-common.h / ggml-quants.c).

/// The 9 supported type ids, and their (block elements, block bytes).
pub const TYPES: [(i32, usize, usize); 9] = [
    (CKV_TYPE_F32, 1, 4),
    (CKV_TYPE_F16, 1, 2),
    (CKV_TYPE_Q4_0, 32, 18),
    (CKV_TYPE_Q4_1, 32, 20),
    (CKV_TYPE_Q5_0, 32, 22),
    (CKV_TYPE_Q5_1, 32, 24),
    (CKV_TYPE_Q8_0, 32, 34),
    (CKV_TYPE_IQ4_NL, 32, 18),
    (CKV_TYPE_BF16, 1, 2),
];

/// (block elements, block bytes) of a supported type id.
pub fn type_info(id: i32) -> Option<(usize, usize)> {
    TYPES.iter().find(|t| t.0 == id).map(|t| (t.1, t.2))
}

pub fn is_float_type(id: i32) -> bool {
    matches!(id, CKV_TYPE_F32 | CKV_TYPE_F16 | CKV_TYPE_BF16)
}

/// Bytes of `n` elements of `id`, if `n` is a whole number of blocks.
pub fn row_bytes(id: i32, n: usize) -> Option<usize> {
    let (be, bb) = type_info(id)?;
    if n % be != 0 {
        return None;
    }
    (n / be).checked_mul(bb)
}

/// IEEE binary16 to f32, exactly (subnormals, infinities and NaN included).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // subnormal: m * 2^-24, exact in f32
            let v = m as f32 * (1.0f32 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Dequantize `n` elements of type `id` from `src` (exactly `row_bytes(id, n)` bytes).
pub fn ref_dequantize(id: i32, src: &[u8], n: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(n);
    match id {
        CKV_TYPE_F32 => {
            for c in src.chunks_exact(4) {
                y.push(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
        }
        CKV_TYPE_F16 => {
            for c in src.chunks_exact(2) {
                y.push(f16_to_f32(u16::from_le_bytes([c[0], c[1]])));
            }
        }
        CKV_TYPE_BF16 => {
            for c in src.chunks_exact(2) {
                y.push(f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16));
            }
        }
        _ => {
            let (_, bb) = type_info(id).expect("a supported type");
            for b in src.chunks_exact(bb) {
                let mut blk = [0f32; 32];
                match id {
                    CKV_TYPE_Q8_0 => {
                        let d = f16_at(b, 0);
                        for j in 0..32 {
                            blk[j] = (b[2 + j] as i8) as f32 * d;
                        }
                    }
                    CKV_TYPE_Q4_0 | CKV_TYPE_IQ4_NL => {
                        let d = f16_at(b, 0);
                        let qs = &b[2..18];
                        for j in 0..16 {
                            let (lo, hi) = ((qs[j] & 0x0f) as usize, (qs[j] >> 4) as usize);
                            if id == CKV_TYPE_Q4_0 {
                                blk[j] = (lo as i32 - 8) as f32 * d;
                                blk[j + 16] = (hi as i32 - 8) as f32 * d;
                            } else {
                                blk[j] = d * KVALUES_IQ4NL[lo] as f32;
                                blk[j + 16] = d * KVALUES_IQ4NL[hi] as f32;
                            }
                        }
                    }
                    CKV_TYPE_Q4_1 => {
                        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                        let qs = &b[4..20];
                        for j in 0..16 {
                            blk[j] = (qs[j] & 0x0f) as f32 * d + m;
                            blk[j + 16] = (qs[j] >> 4) as f32 * d + m;
                        }
                    }
                    CKV_TYPE_Q5_0 | CKV_TYPE_Q5_1 => {
                        let q1 = id == CKV_TYPE_Q5_1;
                        let d = f16_at(b, 0);
                        let m = if q1 { f16_at(b, 2) } else { 0.0 };
                        let o = if q1 { 4 } else { 2 };
                        let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
                        let qs = &b[o + 4..o + 20];
                        for j in 0..16 {
                            let xh0 = ((qh >> j) << 4) & 0x10;
                            let xh1 = (qh >> (j + 12)) & 0x10;
                            let x0 = ((qs[j] as u32 & 0x0f) | xh0) as i32;
                            let x1 = ((qs[j] as u32 >> 4) | xh1) as i32;
                            if q1 {
                                blk[j] = x0 as f32 * d + m;
                                blk[j + 16] = x1 as f32 * d + m;
                            } else {
                                blk[j] = (x0 - 16) as f32 * d;
                                blk[j + 16] = (x1 - 16) as f32 * d;
                            }
                        }
                    }
                    _ => unreachable!(),
                }
                y.extend_from_slice(&blk);
            }
        }
    }
    assert_eq!(y.len(), n);
    y
}

/// Same float: equal bits, or both NaN (ggml does not promise a NaN payload).
pub fn same_float(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Overwrite the scale fields and float elements of a buffer of `id` rows so that every value it holds is
/// finite and small (|x| < ~300): for the scoring oracle, which compares against an f64 reference.
pub fn tame(id: i32, bytes: &mut [u8]) {
    // a small positive or negative f16 from a byte: sign from bit 7, 2^-7 .. 2^0, 4 mantissa bits
    let small_f16 = |b: u8| -> u16 {
        let b = b as u16;
        let sign = (b & 0x80) << 8;
        let exp = ((b >> 4) & 7) + 8;
        let man = (b & 0xf) << 6;
        sign | (exp << 10) | man
    };
    match id {
        CKV_TYPE_F32 => {
            for c in bytes.chunks_exact_mut(4) {
                let v = f16_to_f32(small_f16(c[0] ^ c[3]));
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        CKV_TYPE_F16 => {
            for c in bytes.chunks_exact_mut(2) {
                let h = small_f16(c[0] ^ c[1]);
                c.copy_from_slice(&h.to_le_bytes());
            }
        }
        CKV_TYPE_BF16 => {
            for c in bytes.chunks_exact_mut(2) {
                let v = f16_to_f32(small_f16(c[0] ^ c[1]));
                c.copy_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        _ => {
            let (_, bb) = type_info(id).expect("a supported type");
            let scales = if matches!(id, CKV_TYPE_Q4_1 | CKV_TYPE_Q5_1) {
                2
            } else {
                1
            };
            for b in bytes.chunks_exact_mut(bb) {
                for s in 0..scales {
                    let h = small_f16(b[2 * s] ^ b[2 * s + 1]) & 0x7fff;
                    // d: 2^-11 .. 2^-4 (quantized values reach 127); m: negative, 2^-7 .. 2^0
                    let h = if s == 0 { h - (4 << 10) } else { h | 0x8000 };
                    b[2 * s..2 * s + 2].copy_from_slice(&h.to_le_bytes());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Profiles.

/// A model identity as the profile's `model` object holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub arch: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub fingerprint: String,
}

/// A valid profile for `id` whose ranking, scores and weights come from the input.
pub fn valid_profile(u: &mut Unstructured<'_>, id: &Ident) -> Result<serde_json::Value> {
    use serde_json::json;
    let mut ranking = Vec::with_capacity(id.n_layer);
    let mut scores = Vec::with_capacity(id.n_layer);
    for _ in 0..id.n_layer {
        let mut r: Vec<usize> = (0..id.n_head).collect();
        for i in (1..r.len()).rev() {
            let j = u.int_in_range(0..=i)?;
            r.swap(i, j);
        }
        ranking.push(r);
        let mut s = Vec::with_capacity(id.n_head);
        for _ in 0..id.n_head {
            s.push(u.int_in_range(0..=1000u32)? as f64 / 1000.0);
        }
        scores.push(s);
    }
    let mut raw = Vec::with_capacity(id.n_layer);
    for _ in 0..id.n_layer {
        raw.push(u.int_in_range(0..=255u32)? as f64);
    }
    let total: f64 = raw.iter().sum();
    let weights: Vec<f64> = if total == 0.0 {
        vec![1.0 / id.n_layer as f64; id.n_layer]
    } else {
        raw.iter().map(|x| x / total).collect()
    };
    let mut v = json!({
        "version": 1,
        "model": {
            "arch": id.arch, "n_layer": id.n_layer, "n_head": id.n_head, "n_head_kv": id.n_head_kv,
            "head_dim": id.head_dim, "fingerprint": id.fingerprint,
        },
        "head_ranking": ranking,
        "head_scores": scores,
        "layer_weights": weights,
    });
    if u.arbitrary::<bool>()? {
        v["calibration"] = json!({"tool": "fuzz", "seed": u.arbitrary::<u32>()?});
    }
    Ok(v)
}

/// Parse `text` through the C ABI with no model check; the handle, or NULL (the failure checked).
pub fn parse_profile(text: &str) -> *mut ckv_profile {
    let mut out: *mut ckv_profile = std::ptr::null_mut();
    // SAFETY: text is valid for len bytes, out for one pointer write.
    let st = unsafe { ckv_profile_parse(text.as_ptr().cast(), text.len(), std::ptr::null(), &mut out) };
    if check("ckv_profile_parse", st, None) {
        assert!(!out.is_null());
        out
    } else {
        assert!(out.is_null(), "a failed ckv_profile_parse wrote *out");
        std::ptr::null_mut()
    }
}

// ---------------------------------------------------------------------------------------------------------
// The profile format (src/profile.rs module doc), checked independently of the library.

const TOP: [&str; 6] = [
    "version",
    "model",
    "head_ranking",
    "head_scores",
    "layer_weights",
    "calibration",
];
const MODEL: [&str; 6] = ["arch", "n_layer", "n_head", "n_head_kv", "head_dim", "fingerprint"];

/// A non-negative JSON integer (what serde reads as u64 / usize).
fn uint(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|x| usize::try_from(x).ok())
}

fn str_field<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k)?.as_str()
}

/// The model identity of a valid profile, or why it is invalid. `Err(None)`: a weight sum too close to the
/// tolerance to call (float parsing may differ in the last bit).
pub fn validate_profile(text: &[u8]) -> std::result::Result<Ident, Option<String>> {
    let text = std::str::from_utf8(text).map_err(|_| Some("not UTF-8".to_string()))?;
    let v: Value = serde_json::from_str(text).map_err(|e| Some(format!("not JSON: {e}")))?;
    let o = v.as_object().ok_or(Some("not an object".to_string()))?;
    if o.get("version").and_then(Value::as_u64) != Some(1) {
        return Err(Some("version".into()));
    }
    if let Some(k) = o.keys().find(|k| !TOP.contains(&k.as_str())) {
        return Err(Some(format!("unknown {k}")));
    }
    let m = o
        .get("model")
        .and_then(Value::as_object)
        .ok_or(Some("model".to_string()))?;
    if let Some(k) = m.keys().find(|k| !MODEL.contains(&k.as_str())) {
        return Err(Some(format!("unknown model.{k}")));
    }
    let e = |s: &str| Some(s.to_string());
    let arch = str_field(m, "arch").ok_or(e("arch"))?;
    let fp = str_field(m, "fingerprint").ok_or(e("fingerprint"))?;
    let dims: Vec<usize> = ["n_layer", "n_head", "n_head_kv", "head_dim"]
        .iter()
        .map(|k| m.get(*k).and_then(uint).ok_or(e(k)))
        .collect::<std::result::Result<_, _>>()?;
    let (nl, nh, nkv, hd) = (dims[0], dims[1], dims[2], dims[3]);
    let ranking = o
        .get("head_ranking")
        .and_then(Value::as_array)
        .ok_or(e("head_ranking"))?;
    let ranking: Vec<Vec<usize>> = ranking
        .iter()
        .map(|r| {
            r.as_array()
                .and_then(|a| a.iter().map(uint).collect::<Option<Vec<_>>>())
                .ok_or(e("ranking row"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let num_rows = |k: &str| -> std::result::Result<Vec<Vec<f64>>, Option<String>> {
        o.get(k)
            .and_then(Value::as_array)
            .ok_or(e(k))?
            .iter()
            .map(|r| {
                r.as_array()
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                    .ok_or(e(k))
            })
            .collect()
    };
    let scores = num_rows("head_scores")?;
    let weights: Vec<f64> = o
        .get("layer_weights")
        .and_then(Value::as_array)
        .ok_or(e("layer_weights"))?
        .iter()
        .map(|x| x.as_f64().ok_or(e("weight")))
        .collect::<std::result::Result<_, _>>()?;
    if arch.is_empty() || fp.is_empty() {
        return Err(e("empty string"));
    }
    if dims.contains(&0) || nh % nkv != 0 {
        return Err(e("dims"));
    }
    if ranking.len() != nl || scores.len() != nl || weights.len() != nl {
        return Err(e("rows"));
    }
    for r in &ranking {
        let mut seen = vec![false; nh];
        if r.len() != nh || r.iter().any(|&h| h >= nh || std::mem::replace(&mut seen[h], true)) {
            return Err(e("not a permutation"));
        }
    }
    if scores.iter().any(|r| r.len() != nh || r.iter().any(|s| !s.is_finite())) {
        return Err(e("scores"));
    }
    if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return Err(e("weights"));
    }
    let off = (weights.iter().sum::<f64>() - 1.0).abs();
    if (0.999e-6..=1.001e-6).contains(&off) {
        return Err(None);
    }
    if !(off <= 1e-6) {
        return Err(e("weight sum"));
    }
    Ok(Ident {
        arch: arch.into(),
        n_layer: nl,
        n_head: nh,
        n_head_kv: nkv,
        head_dim: hd,
        fingerprint: fp.into(),
    })
}

// ---------------------------------------------------------------------------------------------------------
// Tallies, to see which paths a corpus reaches: `CKV_FUZZ_TALLY=1 <target binary> -runs=0 <corpus dir>`
// prints the counts to stderr after every 500 inputs.

thread_local! {
    static TALLY: std::cell::RefCell<(u64, std::collections::BTreeMap<&'static str, u64>)> =
        std::cell::RefCell::new((0, std::collections::BTreeMap::new()));
}

fn tally_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("CKV_FUZZ_TALLY").is_some())
}

/// Count one event `what` (only with CKV_FUZZ_TALLY set).
pub fn tally(what: &'static str) {
    if tally_on() {
        TALLY.with(|t| *t.borrow_mut().1.entry(what).or_default() += 1);
    }
}

/// Call once per input: prints the tallies every 500 inputs (only with CKV_FUZZ_TALLY set).
pub fn tally_input() {
    if tally_on() {
        TALLY.with(|t| {
            let mut t = t.borrow_mut();
            t.0 += 1;
            if t.0 % 500 == 0 {
                eprintln!("tally after {} inputs: {:?}", t.0, t.1);
            }
        });
    }
}
