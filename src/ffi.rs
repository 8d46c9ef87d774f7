//! The C ABI (`include/compresskv.h`).
//!
//! Every function of the header is implemented here as a `#[no_mangle] extern "C"` function. Rules, each
//! relied on by the C side:
//! - Nothing unwinds across the boundary: every body runs inside [`std::panic::catch_unwind`]; a panic
//!   becomes `CKV_ERR_PANIC` with its message.
//! - Every failure sets the thread-local last-error message (read by [`ckv_last_error`]), prefixed with the
//!   function's name, and returns the [`Error::status`] of the error. Successful calls leave it as it was.
//! - Every pointer is checked (NULL: `CKV_ERR_NULL`; misaligned: `CKV_ERR_INVALID_ARG`) and every enum
//!   arrives as a plain integer and is validated, so an out-of-range value from C is an error, never UB.
//! - Versioned structs (`ckv_params`) are read by their `size` field: only the fields that lie wholly inside
//!   `size` bytes are read, missing trailing fields take their defaults.
//! - A failing call writes nothing to the caller's buffers or out-pointers (the only exception is
//!   `*needed` of [`ckv_plan_stats_json`], which the header specifies).
//! - Handles carry a magic word, checked on every use: a best-effort guard against passing a freed or
//!   foreign pointer (it cannot make such use safe, only make it likely to be reported).
//!
//! The `#[repr(C)]` mirrors of the header's structs and the enum constants are public so that the header
//! test (`tests/header_bindgen.rs`) can compare them with the header's layout.

#![allow(non_camel_case_types)]

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::mem::{align_of, offset_of, size_of};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::budget::{self, Allocation};
use crate::error::{Error, Result};
use crate::layout::{Geometry, LayerView, LayerViewMut, Layout};
use crate::plan::{self, LayerInput, Method, Params, Plan, Shape};
use crate::profile::{find_profile, fingerprint_bytes, ModelIdentity, Profile};
use crate::score::{Heads, PoolKind};
use crate::types::{dequantize_row, GgmlType};

/// `ckv_status` (a C enum: passed as a plain `int`).
pub type ckv_status = i32;

/// Success.
pub const CKV_OK: ckv_status = 0;
/// A required pointer is NULL.
pub const CKV_ERR_NULL: ckv_status = 1;
/// A value is out of range or inconsistent.
pub const CKV_ERR_INVALID_ARG: ckv_status = 2;
/// Element type not supported for this operation.
pub const CKV_ERR_UNSUPPORTED_TYPE: ckv_status = 3;
/// A buffer is smaller than its declared geometry.
pub const CKV_ERR_SIZE: ckv_status = 4;
/// Profile unreadable or for another model.
pub const CKV_ERR_PROFILE: ckv_status = 5;
/// A file could not be read or written.
pub const CKV_ERR_IO: ckv_status = 6;
/// Out of memory.
pub const CKV_ERR_ALLOC: ckv_status = 7;
/// Internal error caught at the boundary.
pub const CKV_ERR_PANIC: ckv_status = 8;

/// `ckv_type`: ggml type ids.
pub const CKV_TYPE_F32: i32 = 0;
/// f16.
pub const CKV_TYPE_F16: i32 = 1;
/// q4_0.
pub const CKV_TYPE_Q4_0: i32 = 2;
/// q4_1.
pub const CKV_TYPE_Q4_1: i32 = 3;
/// q5_0.
pub const CKV_TYPE_Q5_0: i32 = 6;
/// q5_1.
pub const CKV_TYPE_Q5_1: i32 = 7;
/// q8_0.
pub const CKV_TYPE_Q8_0: i32 = 8;
/// iq4_nl.
pub const CKV_TYPE_IQ4_NL: i32 = 20;
/// bf16.
pub const CKV_TYPE_BF16: i32 = 30;

/// `ckv_method`: CompressKV.
pub const CKV_METHOD_COMPRESSKV: i32 = 0;
/// SnapKV.
pub const CKV_METHOD_SNAPKV: i32 = 1;
/// PyramidKV.
pub const CKV_METHOD_PYRAMIDKV: i32 = 2;
/// StreamingLLM.
pub const CKV_METHOD_STREAMINGLLM: i32 = 3;
/// SnapKV + SRH (ablation).
pub const CKV_METHOD_SNAPKV_SRH: i32 = 4;

/// `ckv_pool`: average pooling.
pub const CKV_POOL_AVG: i32 = 0;
/// Max pooling.
pub const CKV_POOL_MAX: i32 = 1;

/// `ckv_alloc`: uniform budgets.
pub const CKV_ALLOC_UNIFORM: i32 = 0;
/// PyramidKV budgets.
pub const CKV_ALLOC_PYRAMID: i32 = 1;
/// Error-weighted budgets.
pub const CKV_ALLOC_WEIGHTED: i32 = 2;

/// `CKV_VERSION_MAJOR`.
pub const CKV_VERSION_MAJOR: u32 = 0;
/// `CKV_VERSION_MINOR`.
pub const CKV_VERSION_MINOR: u32 = 1;
/// `CKV_VERSION_PATCH`.
pub const CKV_VERSION_PATCH: u32 = 0;

/// Mirror of `ckv_params`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ckv_params {
    /// `sizeof(ckv_params)` of the caller.
    pub size: usize,
    /// `ckv_method`.
    pub method: i32,
    /// Average kept tokens per layer (0: use `ratio`).
    pub budget: i32,
    /// Fraction kept when `budget == 0`.
    pub ratio: f32,
    /// Observation window length.
    pub window: i32,
    /// Window end (exclusive), -1: prompt end.
    pub window_end: i32,
    /// Sink tokens.
    pub n_sink: i32,
    /// Pooling kernel.
    pub pool_kernel: i32,
    /// `ckv_pool`.
    pub pool: i32,
    /// Chunk size.
    pub chunk: i32,
    /// SRHs per layer.
    pub n_srh: i32,
    /// Per-KV-head selection (0/1).
    pub per_head: i32,
    /// Fill form (0/1).
    pub fill: i32,
    /// Weighted allocation floor.
    pub floor: i32,
    /// PyramidKV beta.
    pub pyramid_beta: f32,
}

/// Mirror of `ckv_buffer`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ckv_buffer {
    /// Base of the buffer.
    pub data: *mut c_void,
    /// Bytes available from `data`.
    pub size: usize,
    /// `ckv_type` (the C field is named `type`).
    pub type_: i32,
    /// Elements per cell.
    pub n_embd: i32,
    /// Cells.
    pub n_cells: i32,
    /// 0: rows per cell; 1: rows per channel.
    pub transposed: i32,
    /// Bytes between rows; 0: packed.
    pub stride: usize,
}

/// Mirror of `ckv_shape`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ckv_shape {
    /// Layers.
    pub n_layer: i32,
    /// Query heads.
    pub n_head: i32,
    /// KV heads.
    pub n_head_kv: i32,
    /// Head dimension.
    pub head_dim: i32,
}

/// Mirror of `ckv_model_desc`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ckv_model_desc {
    /// GGUF `general.architecture`.
    pub arch: *const c_char,
    /// Attention shape.
    pub shape: ckv_shape,
    /// `ckv_fingerprint()` of the canonical metadata.
    pub fingerprint: *const c_char,
}

const PLAN_MAGIC: u64 = 0x636b_765f_706c_616e; // "ckv_plan"
const PROFILE_MAGIC: u64 = 0x636b_765f_7072_6f66; // "ckv_prof"

/// Kept tokens and moves of one group, as the `int32_t` arrays [`ckv_plan_group`] hands out.
#[derive(Debug, Clone)]
struct GroupI32 {
    kept: Vec<i32>,
    src: Vec<i32>,
    dst: Vec<i32>,
}

/// Opaque plan handle (`ckv_plan`): a [`Plan`] plus `int32_t` copies of its groups.
#[derive(Debug)]
pub struct ckv_plan {
    magic: u64,
    plan: Plan,
    groups: Vec<Vec<GroupI32>>,
}

impl ckv_plan {
    /// Wrap a plan, copying its index lists to `int32_t`.
    pub fn new(plan: Plan) -> Result<ckv_plan> {
        let conv = |v: &[u32], what: &str| -> Result<Vec<i32>> {
            v.iter()
                .map(|&x| i32::try_from(x).map_err(|_| Error::InvalidArg(format!("{what} index {x} exceeds int32_t"))))
                .collect()
        };
        let mut groups = Vec::with_capacity(plan.layers.len());
        for lp in &plan.layers {
            let mut gs = Vec::with_capacity(lp.groups.len());
            for g in &lp.groups {
                gs.push(GroupI32 {
                    kept: conv(&g.kept, "token")?,
                    src: conv(&g.src, "cell")?,
                    dst: conv(&g.dst, "cell")?,
                });
            }
            groups.push(gs);
        }
        Ok(ckv_plan {
            magic: PLAN_MAGIC,
            plan,
            groups,
        })
    }

    /// The wrapped plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// Opaque profile handle (`ckv_profile`).
#[derive(Debug)]
pub struct ckv_profile {
    magic: u64,
    profile: Profile,
}

impl ckv_profile {
    /// The wrapped profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }
}

// ---------------------------------------------------------------------------------------------------------
// Errors, panics and the last-error message.

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(func: &str, e: &Error) {
    let msg = format!("{func}: {e}").replace('\0', "\\0");
    let c = CString::new(msg).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|s| *s.borrow_mut() = c);
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Run `f`, turning a panic into [`Error::Panic`].
fn catch<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(Error::Panic(format!(
            "{} (this is a bug in compresskv)",
            panic_message(&*payload)
        ))),
    }
}

/// Run the body of a status-returning entry point.
fn run(func: &str, f: impl FnOnce() -> Result<()>) -> ckv_status {
    match catch(f) {
        Ok(()) => CKV_OK,
        Err(e) => {
            set_last_error(func, &e);
            e.status()
        }
    }
}

/// Run the body of a value-returning entry point; `fallback` on error.
fn run_value<T>(func: &str, fallback: T, f: impl FnOnce() -> Result<T>) -> T {
    match catch(f) {
        Ok(v) => v,
        Err(e) => {
            set_last_error(func, &e);
            fallback
        }
    }
}

/// The same error with `what: ` in front of its message.
fn ctx(what: &str, e: Error) -> Error {
    let m = format!("{what}: {}", e.message());
    match e {
        Error::Null(_) => Error::Null(m),
        Error::InvalidArg(_) => Error::InvalidArg(m),
        Error::UnsupportedType(_) => Error::UnsupportedType(m),
        Error::Size(_) => Error::Size(m),
        Error::Profile(_) => Error::Profile(m),
        Error::Io(_) => Error::Io(m),
        Error::Alloc(_) => Error::Alloc(m),
        Error::Panic(_) => Error::Panic(m),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Pointer helpers.

fn check_ptr<T>(ptr: *const T, what: &str) -> Result<()> {
    if ptr.is_null() {
        return Err(Error::Null(format!("{what} is NULL")));
    }
    if (ptr as usize) % align_of::<T>() != 0 {
        return Err(Error::InvalidArg(format!(
            "{what} is not aligned to {} bytes",
            align_of::<T>()
        )));
    }
    Ok(())
}

/// A shared slice of `len` `T`s at `ptr`, after the NULL, alignment and size checks.
///
/// # Safety
/// If `ptr` is non-null and aligned, it must be valid for reads of `len` values of `T` for `'a`, and
/// nothing may write them while the slice lives.
unsafe fn slice_ref<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    check_ptr(ptr, what)?;
    if len
        .checked_mul(size_of::<T>())
        .map_or(true, |b| b > isize::MAX as usize)
    {
        return Err(Error::Size(format!(
            "{what}: {len} elements overflow the address space"
        )));
    }
    // SAFETY: non-null and aligned (checked above), the byte length fits in isize (checked above), and the
    // caller guarantees `len` readable values for 'a.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A shared reference to the `T` at `ptr`, after the NULL and alignment checks.
///
/// # Safety
/// If `ptr` is non-null and aligned, it must point to a valid `T` for `'a`.
unsafe fn deref<'a, T>(ptr: *const T, what: &str) -> Result<&'a T> {
    check_ptr(ptr, what)?;
    // SAFETY: non-null and aligned (checked above); the caller guarantees a valid T.
    Ok(unsafe { &*ptr })
}

/// The NUL-terminated string at `ptr`.
///
/// # Safety
/// If `ptr` is non-null, it must point to a NUL-terminated string valid for `'a`.
unsafe fn c_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a CStr> {
    if ptr.is_null() {
        return Err(Error::Null(format!("{what} is NULL")));
    }
    // SAFETY: non-null; the caller guarantees a NUL-terminated string.
    Ok(unsafe { CStr::from_ptr(ptr) })
}

/// # Safety
/// As for [`c_str`].
unsafe fn c_utf8<'a>(ptr: *const c_char, what: &str) -> Result<&'a str> {
    // SAFETY: forwarded to the caller.
    let s = unsafe { c_str(ptr, what) }?;
    s.to_str()
        .map_err(|e| Error::InvalidArg(format!("{what} is not UTF-8: {e}")))
}

/// Write `v` to the out-pointer `ptr` (already checked by [`check_ptr`]).
///
/// # Safety
/// `ptr` must be non-null, aligned and valid for a write of `T`.
unsafe fn put<T>(ptr: *mut T, v: T) {
    // SAFETY: guaranteed by the caller.
    unsafe { ptr.write(v) }
}

/// # Safety
/// `p` is null or a pointer obtained from [`ckv_plan_create`] and not yet freed.
unsafe fn plan_ref<'a>(p: *const ckv_plan) -> Result<&'a ckv_plan> {
    // SAFETY: forwarded to the caller.
    let h = unsafe { deref(p, "plan") }?;
    if h.magic != PLAN_MAGIC {
        return Err(Error::InvalidArg(
            "plan is not a live ckv_plan (freed, or not from ckv_plan_create)".into(),
        ));
    }
    Ok(h)
}

/// # Safety
/// `p` is null or a pointer obtained from `ckv_profile_load/parse/find` and not yet freed.
unsafe fn profile_ref<'a>(p: *const ckv_profile) -> Result<&'a ckv_profile> {
    // SAFETY: forwarded to the caller.
    let h = unsafe { deref(p, "profile") }?;
    if h.magic != PROFILE_MAGIC {
        return Err(Error::InvalidArg(
            "profile is not a live ckv_profile (freed, or not from ckv_profile_*)".into(),
        ));
    }
    Ok(h)
}

// ---------------------------------------------------------------------------------------------------------
// Conversions between the C structs and the library's types.

fn method_id(m: Method) -> i32 {
    match m {
        Method::CompressKv => CKV_METHOD_COMPRESSKV,
        Method::SnapKv => CKV_METHOD_SNAPKV,
        Method::PyramidKv => CKV_METHOD_PYRAMIDKV,
        Method::StreamingLlm => CKV_METHOD_STREAMINGLLM,
        Method::SnapKvSrh => CKV_METHOD_SNAPKV_SRH,
    }
}

fn method_from_id(id: i32) -> Result<Method> {
    Ok(match id {
        CKV_METHOD_COMPRESSKV => Method::CompressKv,
        CKV_METHOD_SNAPKV => Method::SnapKv,
        CKV_METHOD_PYRAMIDKV => Method::PyramidKv,
        CKV_METHOD_STREAMINGLLM => Method::StreamingLlm,
        CKV_METHOD_SNAPKV_SRH => Method::SnapKvSrh,
        _ => {
            return Err(Error::InvalidArg(format!(
                "params.method: {id} is not a ckv_method (0..=4)"
            )))
        }
    })
}

fn pool_id(p: PoolKind) -> i32 {
    match p {
        PoolKind::Avg => CKV_POOL_AVG,
        PoolKind::Max => CKV_POOL_MAX,
    }
}

fn type_from_id(id: i32, what: &str) -> Result<GgmlType> {
    u32::try_from(id).ok().and_then(GgmlType::from_id).ok_or_else(|| {
        let names: Vec<String> = GgmlType::ALL
            .iter()
            .map(|t| format!("{} = {}", t.name(), *t as u32))
            .collect();
        Error::UnsupportedType(format!(
            "{what}: {id} is not a supported ggml type ({})",
            names.join(", ")
        ))
    })
}

impl Default for ckv_params {
    fn default() -> Self {
        let d = Params::default();
        ckv_params {
            size: size_of::<ckv_params>(),
            method: method_id(d.method),
            budget: d.budget as i32,
            ratio: d.ratio,
            window: d.window as i32,
            window_end: d.window_end.map_or(-1, |e| e as i32),
            n_sink: d.n_sink as i32,
            pool_kernel: d.pool_kernel as i32,
            pool: pool_id(d.pool),
            chunk: d.chunk as i32,
            n_srh: d.n_srh as i32,
            per_head: d.per_head as i32,
            fill: d.fill as i32,
            floor: d.floor as i32,
            pyramid_beta: d.pyramid_beta as f32,
        }
    }
}

/// Smallest `ckv_params::size` accepted: `size`, `method` and `budget`.
pub const CKV_PARAMS_MIN_SIZE: usize = offset_of!(ckv_params, budget) + size_of::<i32>();

/// End offsets of the fields of `ckv_params`, ascending.
const PARAMS_FIELD_ENDS: [usize; 15] = [
    offset_of!(ckv_params, size) + size_of::<usize>(),
    offset_of!(ckv_params, method) + 4,
    offset_of!(ckv_params, budget) + 4,
    offset_of!(ckv_params, ratio) + 4,
    offset_of!(ckv_params, window) + 4,
    offset_of!(ckv_params, window_end) + 4,
    offset_of!(ckv_params, n_sink) + 4,
    offset_of!(ckv_params, pool_kernel) + 4,
    offset_of!(ckv_params, pool) + 4,
    offset_of!(ckv_params, chunk) + 4,
    offset_of!(ckv_params, n_srh) + 4,
    offset_of!(ckv_params, per_head) + 4,
    offset_of!(ckv_params, fill) + 4,
    offset_of!(ckv_params, floor) + 4,
    offset_of!(ckv_params, pyramid_beta) + 4,
];

/// Read a caller's `ckv_params` by its `size`: the fields wholly inside `size` bytes are the caller's,
/// later ones keep their defaults; bytes past our struct (a newer caller) are ignored.
///
/// # Safety
/// `p` must be non-null and valid for reads of `p->size` bytes (at least a `size_t`).
unsafe fn read_params(p: *const ckv_params) -> Result<ckv_params> {
    // SAFETY: the caller guarantees at least the leading size_t; read unaligned to ask nothing more.
    let size = unsafe { std::ptr::read_unaligned(p as *const usize) };
    if size < CKV_PARAMS_MIN_SIZE {
        return Err(Error::Size(format!(
            "params.size {size} is smaller than the {CKV_PARAMS_MIN_SIZE} bytes of the smallest ckv_params \
             (set it to sizeof(ckv_params), e.g. with ckv_params_default)"
        )));
    }
    let n = PARAMS_FIELD_ENDS
        .iter()
        .copied()
        .filter(|&e| e <= size)
        .max()
        .unwrap_or(0);
    let mut out = ckv_params::default();
    // SAFETY: `n <= size` bytes are readable at `p` (caller) and `n <= size_of::<ckv_params>()` bytes are
    // writable at `out`; every bit pattern is valid for its integer/float fields and ckv_params has no padding
    // (a compile-time assertion below); the regions are distinct objects.
    unsafe { std::ptr::copy_nonoverlapping(p as *const u8, (&mut out as *mut ckv_params).cast::<u8>(), n) };
    out.size = size;
    Ok(out)
}

const _: () = assert!(
    PARAMS_FIELD_ENDS[14] == size_of::<ckv_params>(),
    "ckv_params must have no padding"
);

fn nonneg(v: i32, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::InvalidArg(format!("{what}: {v} < 0")))
}

fn flag(v: i32, what: &str) -> Result<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Error::InvalidArg(format!("{what}: {v} is not 0 or 1"))),
    }
}

/// Validate the caller's parameters and convert them.
fn to_params(c: &ckv_params) -> Result<Params> {
    let method = method_from_id(c.method)?;
    let streaming = method == Method::StreamingLlm;
    let budget = nonneg(c.budget, "params.budget")?;
    if budget == 0 && !(c.ratio > 0.0 && c.ratio <= 1.0) {
        return Err(Error::InvalidArg(format!(
            "params.budget is 0 and params.ratio {} is not in (0, 1]: set a budget > 0 or a ratio",
            c.ratio
        )));
    }
    let window = nonneg(c.window, "params.window")?;
    if window == 0 {
        return Err(Error::InvalidArg(
            "params.window: 0 (the observation window needs >= 1 token)".into(),
        ));
    }
    let window_end = match c.window_end {
        -1 => None,
        e if e >= 0 => Some(e as usize),
        e => {
            return Err(Error::InvalidArg(format!(
                "params.window_end: {e} (expected -1 or a token index)"
            )))
        }
    };
    let mut n_sink = nonneg(c.n_sink, "params.n_sink")?;
    if streaming && n_sink == 0 {
        n_sink = 4;
    }
    if c.pool_kernel < 1 || c.pool_kernel % 2 == 0 {
        return Err(Error::InvalidArg(format!(
            "params.pool_kernel: {} (expected an odd value >= 1)",
            c.pool_kernel
        )));
    }
    let pool = match c.pool {
        CKV_POOL_AVG => PoolKind::Avg,
        CKV_POOL_MAX => PoolKind::Max,
        p => {
            return Err(Error::InvalidArg(format!(
                "params.pool: {p} is not a ckv_pool (0 avg, 1 max)"
            )))
        }
    };
    let chunk = nonneg(c.chunk, "params.chunk")?;
    let n_srh = nonneg(c.n_srh, "params.n_srh")?;
    if n_srh == 0 && matches!(method, Method::CompressKv | Method::SnapKvSrh) {
        return Err(Error::InvalidArg(
            "params.n_srh: 0 (CompressKV needs >= 1 retrieval head)".into(),
        ));
    }
    let floor = nonneg(c.floor, "params.floor")?;
    if !(c.pyramid_beta.is_finite() && c.pyramid_beta > 0.0) {
        return Err(Error::InvalidArg(format!(
            "params.pyramid_beta: {} (expected a finite value > 0)",
            c.pyramid_beta
        )));
    }
    Ok(Params {
        method,
        budget,
        ratio: if c.ratio.is_finite() { c.ratio } else { 0.0 },
        window,
        window_end,
        n_sink,
        pool_kernel: c.pool_kernel as usize,
        pool,
        chunk,
        n_srh,
        per_head: flag(c.per_head, "params.per_head")?,
        fill: flag(c.fill, "params.fill")?,
        floor,
        pyramid_beta: c.pyramid_beta as f64,
    })
}

fn to_shape(s: &ckv_shape, what: &str) -> Result<Shape> {
    let pos = |v: i32, f: &str| -> Result<usize> {
        if v > 0 {
            Ok(v as usize)
        } else {
            Err(Error::InvalidArg(format!("{what}.{f}: {v} (expected > 0)")))
        }
    };
    let n_layer = pos(s.n_layer, "n_layer")?;
    let n_head = pos(s.n_head, "n_head")?;
    let n_head_kv = pos(s.n_head_kv, "n_head_kv")?;
    let head_dim = pos(s.head_dim, "head_dim")?;
    if n_head % n_head_kv != 0 {
        return Err(Error::InvalidArg(format!(
            "{what}.n_head {n_head} is not a multiple of {what}.n_head_kv {n_head_kv}"
        )));
    }
    Ok(Shape {
        n_layer,
        heads: Heads {
            n_head,
            n_head_kv,
            head_dim,
        },
    })
}

/// Geometry of one caller buffer, validated against its own fields and its `size`.
fn buffer_geometry(b: &ckv_buffer, what: &str) -> Result<Geometry> {
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
unsafe fn buffer_view<'a>(b: &ckv_buffer, what: &str) -> Result<LayerView<'a>> {
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
unsafe fn buffer_view_mut<'a>(b: &ckv_buffer, g: Geometry, what: &str) -> Result<LayerViewMut<'a>> {
    let len = g.min_bytes()?;
    // SAFETY: `len <= b.size` writable bytes at the non-null `b.data` (caller), exclusive (caller).
    unsafe { LayerViewMut::from_raw(g, b.data as *mut u8, len) }.map_err(|e| ctx(what, e))
}

/// Refuse buffers whose used byte ranges overlap.
fn check_disjoint(ranges: &mut [(usize, usize, String)]) -> Result<()> {
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

/// # Safety
/// `m`'s string pointers are null or NUL-terminated strings.
unsafe fn model_identity(m: &ckv_model_desc) -> Result<ModelIdentity> {
    // SAFETY: forwarded to the caller.
    let arch = unsafe { c_utf8(m.arch, "model.arch") }?;
    // SAFETY: forwarded to the caller.
    let fp = unsafe { c_utf8(m.fingerprint, "model.fingerprint") }?;
    let s = to_shape(&m.shape, "model.shape")?;
    Ok(ModelIdentity {
        arch: arch.to_string(),
        n_layer: s.n_layer,
        n_head: s.heads.n_head,
        n_head_kv: s.heads.n_head_kv,
        head_dim: s.heads.head_dim,
        fingerprint: fp.to_string(),
    })
}

/// Check an optional model description, then hand out a profile handle.
///
/// # Safety
/// `model` is null or points to a valid `ckv_model_desc`; `out` was checked by [`check_ptr`].
unsafe fn finish_profile(profile: Profile, model: *const ckv_model_desc, out: *mut *mut ckv_profile) -> Result<()> {
    if !model.is_null() {
        // SAFETY: non-null; the caller guarantees a valid ckv_model_desc.
        let m = unsafe { deref(model, "model") }?;
        // SAFETY: the desc's strings are the caller's NUL-terminated strings.
        let id = unsafe { model_identity(m) }?;
        profile.check_model(&id)?;
    }
    let h = Box::new(ckv_profile {
        magic: PROFILE_MAGIC,
        profile,
    });
    // SAFETY: `out` is non-null and aligned (checked by the caller of this function).
    unsafe { put(out, Box::into_raw(h)) };
    Ok(())
}

fn stats_json(h: &ckv_plan) -> String {
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

// ---------------------------------------------------------------------------------------------------------
// Entry points.

/// `ckv_version`: the library version, `"MAJOR.MINOR.PATCH"`. Never NULL.
#[no_mangle]
pub extern "C" fn ckv_version() -> *const c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}

/// `ckv_last_error`: the message of the last failing call on this thread, `""` if none.
#[no_mangle]
pub extern "C" fn ckv_last_error() -> *const c_char {
    catch_unwind(|| LAST_ERROR.try_with(|s| s.borrow().as_ptr()).ok())
        .ok()
        .flatten()
        .unwrap_or(c"".as_ptr())
}

/// `ckv_status_name`: `"CKV_OK"`, ...; `"CKV_ERR_UNKNOWN"` for a value outside the enum. Never NULL.
#[no_mangle]
pub extern "C" fn ckv_status_name(status: ckv_status) -> *const c_char {
    let s: &'static CStr = match status {
        CKV_OK => c"CKV_OK",
        CKV_ERR_NULL => c"CKV_ERR_NULL",
        CKV_ERR_INVALID_ARG => c"CKV_ERR_INVALID_ARG",
        CKV_ERR_UNSUPPORTED_TYPE => c"CKV_ERR_UNSUPPORTED_TYPE",
        CKV_ERR_SIZE => c"CKV_ERR_SIZE",
        CKV_ERR_PROFILE => c"CKV_ERR_PROFILE",
        CKV_ERR_IO => c"CKV_ERR_IO",
        CKV_ERR_ALLOC => c"CKV_ERR_ALLOC",
        CKV_ERR_PANIC => c"CKV_ERR_PANIC",
        _ => c"CKV_ERR_UNKNOWN",
    };
    s.as_ptr()
}

/// `ckv_params_default`: fill `*params` with the defaults (`size = sizeof(ckv_params)`).
///
/// # Safety
/// `params` is null or valid for a write of a whole `ckv_params`.
#[no_mangle]
pub unsafe extern "C" fn ckv_params_default(params: *mut ckv_params) -> ckv_status {
    run("ckv_params_default", || {
        check_ptr(params, "params")?;
        // SAFETY: checked non-null and aligned; the caller provides a whole ckv_params.
        unsafe { put(params, ckv_params::default()) };
        Ok(())
    })
}

/// `ckv_method_from_name`: `"compresskv"`, `"snapkv"`, `"pyramidkv"`, `"streamingllm"`, `"snapkv-srh"` (ASCII case
/// ignored).
///
/// # Safety
/// `name` is null or a NUL-terminated string; `out` is null or valid for a write of an `int`-sized enum.
#[no_mangle]
pub unsafe extern "C" fn ckv_method_from_name(name: *const c_char, out: *mut i32) -> ckv_status {
    run("ckv_method_from_name", || {
        // SAFETY: the caller guarantees a NUL-terminated string or NULL.
        let s = unsafe { c_str(name, "name") }?;
        check_ptr(out, "out")?;
        let text = s.to_string_lossy();
        let m = [
            Method::CompressKv,
            Method::SnapKv,
            Method::PyramidKv,
            Method::StreamingLlm,
            Method::SnapKvSrh,
        ]
        .into_iter()
        .find(|m| m.name().eq_ignore_ascii_case(&text))
        .ok_or_else(|| {
            Error::InvalidArg(format!(
                "unknown method name {text:?} (expected compresskv, snapkv, pyramidkv, streamingllm or snapkv-srh)"
            ))
        })?;
        // SAFETY: checked non-null and aligned.
        unsafe { put(out, method_id(m)) };
        Ok(())
    })
}

/// `ckv_fingerprint`: 64-bit FNV-1a of `meta` as 16 lower-case hex digits and a NUL into `buf`.
///
/// # Safety
/// `meta` is null or a NUL-terminated string; `buf` is null or valid for writes of `buf_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ckv_fingerprint(meta: *const c_char, buf: *mut c_char, buf_size: usize) -> ckv_status {
    run("ckv_fingerprint", || {
        // SAFETY: the caller guarantees a NUL-terminated string or NULL.
        let s = unsafe { c_str(meta, "meta") }?;
        check_ptr(buf, "buf")?;
        if buf_size < 17 {
            return Err(Error::Size(format!(
                "buf_size {buf_size} < 17 bytes (16 hex digits and a NUL)"
            )));
        }
        let fp = fingerprint_bytes(s.to_bytes());
        debug_assert_eq!(fp.len(), 16);
        // SAFETY: `buf` is non-null and valid for `buf_size >= 17` bytes (caller); `fp` is 16 bytes and a
        // distinct allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(fp.as_ptr(), buf.cast::<u8>(), 16);
            buf.add(16).write(0);
        }
        Ok(())
    })
}

/// `ckv_dequantize_row`: dequantize `n` elements of `type` from `src` (exactly the row's `src_size` bytes).
///
/// # Safety
/// `src` is null or valid for reads of `src_size` bytes; `dst` is null or valid for writes of `n` floats.
#[no_mangle]
pub unsafe extern "C" fn ckv_dequantize_row(
    type_: i32,
    src: *const c_void,
    src_size: usize,
    dst: *mut f32,
    n: i32,
) -> ckv_status {
    run("ckv_dequantize_row", || {
        let ty = type_from_id(type_, "type")?;
        if src.is_null() {
            return Err(Error::Null("src is NULL".into()));
        }
        check_ptr(dst, "dst")?;
        let n = nonneg(n, "n")?;
        let want = ty.row_bytes(n).ok_or_else(|| {
            Error::InvalidArg(format!(
                "n: {n} is not a multiple of the {} block size {}",
                ty.name(),
                ty.block_elems()
            ))
        })?;
        if src_size != want {
            return Err(Error::Size(format!(
                "src_size: {src_size} bytes, but {n} {} elements are exactly {want} bytes",
                ty.name()
            )));
        }
        let (s0, s1) = (src as usize, (src as usize).saturating_add(src_size));
        let (d0, d1) = (dst as usize, (dst as usize).saturating_add(n.saturating_mul(4)));
        if n > 0 && s0 < d1 && d0 < s1 {
            return Err(Error::InvalidArg("src and dst overlap".into()));
        }
        // SAFETY: non-null, `src_size` readable bytes (caller), u8 needs no alignment.
        let s = unsafe { slice_ref(src as *const u8, src_size, "src") }?;
        // SAFETY: non-null and aligned (checked), `n` writable floats (caller), disjoint from `s` (checked).
        let d = unsafe { std::slice::from_raw_parts_mut(dst, n) };
        dequantize_row(ty, s, d);
        Ok(())
    })
}

/// `ckv_budget_fit`: the average budget to ask for so that the largest layer budget of `params`' method (its
/// allocation: weighted by `profile` for CompressKV, the pyramid for PyramidKV, uniform otherwise) fits
/// `slots` cells ([`budget::fit_average`]).
///
/// # Safety
/// `params` is null or valid for reads of `params->size` bytes; `profile` is null or a live profile handle;
/// `out` is null or valid for a write of one `int32_t`.
#[no_mangle]
pub unsafe extern "C" fn ckv_budget_fit(
    params: *const ckv_params,
    profile: *const ckv_profile,
    n_layer: i32,
    slots: i32,
    out: *mut i32,
) -> ckv_status {
    run("ckv_budget_fit", || {
        if params.is_null() {
            return Err(Error::Null("params is NULL".into()));
        }
        check_ptr(out, "out")?;
        // SAFETY: non-null; the caller guarantees `params->size` readable bytes.
        let prm = to_params(&unsafe { read_params(params) }?)?;
        let prof = if profile.is_null() {
            None
        } else {
            // SAFETY: the caller guarantees a live handle when non-null.
            Some(&unsafe { profile_ref(profile) }?.profile)
        };
        let nl = usize::try_from(n_layer)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::InvalidArg(format!("n_layer: {n_layer} (expected > 0)")))?;
        let sl = usize::try_from(slots)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::InvalidArg(format!("slots: {slots} (expected > 0)")))?;
        if let Some(p) = prof {
            if p.model.n_layer != nl {
                return Err(Error::Profile(format!(
                    "profile model.n_layer {} != n_layer {nl}",
                    p.model.n_layer
                )));
            }
        }
        let (alloc, floor) = crate::plan::allocation_for(&prm, prof);
        let a = budget::fit_average(&alloc, sl, nl, floor)?;
        // SAFETY: `out` is non-null and aligned (checked) and valid for one write (caller).
        unsafe { put(out, a as i32) };
        Ok(())
    })
}

/// `ckv_budget_allocate`: per-layer budgets into `out` (`n_layer` values).
///
/// # Safety
/// `weights` is null or valid for reads of `n_layer` doubles (read only for `CKV_ALLOC_WEIGHTED`);
/// `out` is null or valid for writes of `n_layer` `int32_t`.
#[no_mangle]
pub unsafe extern "C" fn ckv_budget_allocate(
    alloc: i32,
    avg: i32,
    n_layer: i32,
    floor: i32,
    beta: f32,
    weights: *const f64,
    out: *mut i32,
) -> ckv_status {
    run("ckv_budget_allocate", || {
        check_ptr(out, "out")?;
        let nl = usize::try_from(n_layer)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::InvalidArg(format!("n_layer: {n_layer} (expected > 0)")))?;
        let avg_u = usize::try_from(avg)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::InvalidArg(format!("avg: {avg} (expected > 0)")))?;
        let floor = nonneg(floor, "floor")?;
        let a = match alloc {
            CKV_ALLOC_UNIFORM => Allocation::Uniform,
            CKV_ALLOC_PYRAMID => {
                if !(beta.is_finite() && beta > 0.0) {
                    return Err(Error::InvalidArg(format!("beta: {beta} (expected a finite value > 0)")));
                }
                Allocation::Pyramid { beta: beta as f64 }
            }
            CKV_ALLOC_WEIGHTED => {
                // SAFETY: the caller guarantees `n_layer` readable doubles when non-null.
                let w = unsafe { slice_ref(weights, nl, "weights") }?;
                if let Some(l) = w.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
                    return Err(Error::InvalidArg(format!(
                        "weights[{l}]: {} is not a finite value >= 0",
                        w[l]
                    )));
                }
                let sum: f64 = w.iter().sum();
                if (sum - 1.0).abs() > crate::profile::WEIGHT_SUM_TOLERANCE {
                    return Err(Error::InvalidArg(format!("weights: sum {sum} is not 1")));
                }
                Allocation::Weighted(w.to_vec())
            }
            _ => return Err(Error::InvalidArg(format!("alloc: {alloc} is not a ckv_alloc (0..=2)"))),
        };
        let b = budget::allocate(&a, avg_u, nl, floor)?;
        if b.len() != nl {
            return Err(Error::Panic(format!(
                "allocate returned {} budgets for {nl} layers",
                b.len()
            )));
        }
        let b: Vec<i32> = b
            .iter()
            .map(|&x| i32::try_from(x).map_err(|_| Error::InvalidArg(format!("a budget of {x} exceeds int32_t"))))
            .collect::<Result<_>>()?;
        // SAFETY: `out` is non-null and aligned (checked) and valid for `nl` writes (caller); `b` is ours.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out, nl) };
        Ok(())
    })
}

/// `ckv_profile_load`: read a profile from the JSON file at `path`, check it against `model` (if not NULL).
///
/// # Safety
/// `path` is null or a NUL-terminated string; `model` is null or a valid `ckv_model_desc` whose strings are
/// null or NUL-terminated; `out` is null or valid for a pointer write.
#[no_mangle]
pub unsafe extern "C" fn ckv_profile_load(
    path: *const c_char,
    model: *const ckv_model_desc,
    out: *mut *mut ckv_profile,
) -> ckv_status {
    run("ckv_profile_load", || {
        // SAFETY: the caller guarantees a NUL-terminated string or NULL.
        let p = unsafe { c_str(path, "path") }?;
        check_ptr(out, "out")?;
        #[cfg(unix)]
        let path = {
            use std::os::unix::ffi::OsStrExt;
            std::path::PathBuf::from(std::ffi::OsStr::from_bytes(p.to_bytes()))
        };
        #[cfg(not(unix))]
        let path = std::path::PathBuf::from(
            p.to_str()
                .map_err(|e| Error::InvalidArg(format!("path is not UTF-8: {e}")))?,
        );
        let profile = Profile::load(&path)?;
        // SAFETY: `model` and `out` as guaranteed by the caller; `out` checked above.
        unsafe { finish_profile(profile, model, out) }
    })
}

/// `ckv_profile_find`: the profile for `model` among the `*.json` files directly in `dir` (see
/// [`find_profile`]); its path into `path_buf` (unless `path_buf` is NULL with `path_buf_size` 0).
///
/// # Safety
/// `dir` is null or a NUL-terminated string; `model` is null or a valid `ckv_model_desc` whose strings are
/// null or NUL-terminated; `path_buf` is null or valid for writes of `path_buf_size` bytes; `out` is null
/// or valid for a pointer write.
#[no_mangle]
pub unsafe extern "C" fn ckv_profile_find(
    dir: *const c_char,
    model: *const ckv_model_desc,
    path_buf: *mut c_char,
    path_buf_size: usize,
    out: *mut *mut ckv_profile,
) -> ckv_status {
    run("ckv_profile_find", || {
        // SAFETY: the caller guarantees a NUL-terminated string or NULL.
        let d = unsafe { c_str(dir, "dir") }?;
        // SAFETY: the caller guarantees a valid ckv_model_desc or NULL.
        let m = unsafe { deref(model, "model") }?;
        if path_buf.is_null() && path_buf_size > 0 {
            return Err(Error::Null(format!(
                "path_buf is NULL with path_buf_size {path_buf_size}"
            )));
        }
        check_ptr(out, "out")?;
        // SAFETY: the desc's strings are the caller's NUL-terminated strings.
        let id = unsafe { model_identity(m) }?;
        #[cfg(unix)]
        let dir = {
            use std::os::unix::ffi::OsStrExt;
            std::path::PathBuf::from(std::ffi::OsStr::from_bytes(d.to_bytes()))
        };
        #[cfg(not(unix))]
        let dir = std::path::PathBuf::from(
            d.to_str()
                .map_err(|e| Error::InvalidArg(format!("dir is not UTF-8: {e}")))?,
        );
        let (path, profile) = find_profile(&dir, &id)?;
        if !path_buf.is_null() {
            #[cfg(unix)]
            let bytes = {
                use std::os::unix::ffi::OsStrExt;
                path.as_os_str().as_bytes()
            };
            #[cfg(not(unix))]
            let bytes = path
                .to_str()
                .ok_or_else(|| Error::InvalidArg(format!("the path {} is not UTF-8", path.display())))?
                .as_bytes();
            if path_buf_size <= bytes.len() {
                return Err(Error::Size(format!(
                    "path_buf_size {path_buf_size} is too small for the matched profile's path {} \
                     (needs {} bytes with the NUL)",
                    path.display(),
                    bytes.len() + 1
                )));
            }
            // SAFETY: `path_buf` is non-null and writable for `path_buf_size > bytes.len()` bytes (caller);
            // `bytes` is ours.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), path_buf.cast::<u8>(), bytes.len());
                path_buf.add(bytes.len()).write(0);
            }
        }
        // The model was checked by `find_profile`: hand out the handle only.
        // SAFETY: `out` checked above; NULL model means no second check.
        unsafe { finish_profile(profile, std::ptr::null(), out) }
    })
}

/// `ckv_profile_parse`: parse a profile from `len` bytes of JSON, check it against `model` (if not NULL).
///
/// # Safety
/// `json` is null or valid for reads of `len` bytes; `model` and `out` as for [`ckv_profile_load`].
#[no_mangle]
pub unsafe extern "C" fn ckv_profile_parse(
    json: *const c_char,
    len: usize,
    model: *const ckv_model_desc,
    out: *mut *mut ckv_profile,
) -> ckv_status {
    run("ckv_profile_parse", || {
        // SAFETY: the caller guarantees `len` readable bytes when non-null.
        let bytes = unsafe { slice_ref(json as *const u8, len, "json") }?;
        check_ptr(out, "out")?;
        let text = std::str::from_utf8(bytes).map_err(|e| Error::Profile(format!("the JSON is not UTF-8: {e}")))?;
        let profile = Profile::from_json(text)?;
        // SAFETY: `model` and `out` as guaranteed by the caller; `out` checked above.
        unsafe { finish_profile(profile, model, out) }
    })
}

/// `ckv_profile_free`: free a profile handle (NULL is allowed).
///
/// # Safety
/// `profile` is null or a live handle from `ckv_profile_load/parse/find`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ckv_profile_free(profile: *mut ckv_profile) {
    if profile.is_null() {
        return;
    }
    let _ = run("ckv_profile_free", || {
        // SAFETY: non-null; the caller guarantees a live handle (the magic check is best effort).
        unsafe { profile_ref(profile) }?;
        // SAFETY: a live handle was produced by Box::into_raw in finish_profile and is freed once.
        let mut b = unsafe { Box::from_raw(profile) };
        b.magic = 0;
        drop(b);
        Ok(())
    });
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
        let mut prm = to_params(&cp)?;
        // SAFETY: the caller guarantees a valid ckv_shape when non-null.
        let shp = to_shape(unsafe { deref(shape, "shape") }?, "shape")?;
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
        // SAFETY: the caller guarantees `n_layer` readable ckv_buffer when non-null.
        let key_bufs = unsafe { slice_ref(keys, shp.n_layer, "keys") }?;
        let streaming = prm.method == Method::StreamingLlm;
        let qlen = prm
            .window
            .checked_mul(heads.n_head)
            .and_then(|x| x.checked_mul(heads.head_dim))
            .ok_or_else(|| Error::Size("window * n_head * head_dim overflows".into()))?;
        let q_ptrs: Option<&[*const f32]> = if queries.is_null() && streaming {
            None
        } else {
            // SAFETY: the caller guarantees `n_layer` readable pointers when non-null.
            Some(unsafe { slice_ref(queries, shp.n_layer, "queries") }?)
        };
        let profile = if profile.is_null() {
            None
        } else {
            // SAFETY: non-null; the caller guarantees a live handle.
            Some(&unsafe { profile_ref(profile) }?.profile)
        };
        if let Some(p) = profile {
            let want = ModelIdentity {
                arch: p.model.arch.clone(),
                n_layer: shp.n_layer,
                n_head: heads.n_head,
                n_head_kv: heads.n_head_kv,
                head_dim: heads.head_dim,
                fingerprint: p.model.fingerprint.clone(),
            };
            p.check_model(&want).map_err(|e| ctx("profile vs shape", e))?;
        }
        let n_embd = heads.n_head_kv * heads.head_dim;
        let mut views = Vec::with_capacity(shp.n_layer);
        for (l, b) in key_bufs.iter().enumerate() {
            let what = format!("keys[{l}]");
            // SAFETY: the caller guarantees `b.size` readable bytes at `b.data`, unwritten during the call.
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
        let min_cells = views.iter().map(|v| v.geometry().n_cells).min().unwrap_or(0);
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
        let mut inputs = Vec::with_capacity(shp.n_layer);
        for (l, v) in views.into_iter().enumerate() {
            let q: &[f32] = match q_ptrs {
                Some(ps) if !(streaming && ps[l].is_null()) => {
                    // SAFETY: the caller guarantees `window * n_head * head_dim` readable floats per layer.
                    unsafe { slice_ref(ps[l], qlen, &format!("queries[{l}]")) }?
                }
                _ => &[],
            };
            inputs.push(LayerInput { keys: v, queries: q });
        }
        let plan = plan::build(&prm, shp, profile, &cell_u, &inputs)?;
        if plan.layers.len() != shp.n_layer {
            return Err(Error::Panic(format!(
                "plan has {} layers for {}",
                plan.layers.len(),
                shp.n_layer
            )));
        }
        let h = Box::new(ckv_plan::new(plan)?);
        // SAFETY: `out` is non-null and aligned (checked above).
        unsafe { put(out, Box::into_raw(h)) };
        Ok(())
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
    use crate::plan::{GroupPlan, LayerPlan};
    use std::ptr::{null, null_mut};

    fn last_error() -> String {
        // SAFETY: ckv_last_error never returns NULL and the string lives until the next failing call.
        unsafe { CStr::from_ptr(ckv_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

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
        }
    }

    #[test]
    fn version_matches_header_macros() {
        // SAFETY: a static NUL-terminated string.
        let v = unsafe { CStr::from_ptr(ckv_version()) }.to_str().unwrap();
        assert_eq!(
            v,
            format!("{CKV_VERSION_MAJOR}.{CKV_VERSION_MINOR}.{CKV_VERSION_PATCH}")
        );
    }

    #[test]
    fn status_names() {
        for (code, name) in [
            (CKV_OK, "CKV_OK"),
            (CKV_ERR_NULL, "CKV_ERR_NULL"),
            (CKV_ERR_PANIC, "CKV_ERR_PANIC"),
        ] {
            // SAFETY: static strings.
            assert_eq!(unsafe { CStr::from_ptr(ckv_status_name(code)) }.to_str().unwrap(), name);
        }
        // SAFETY: static strings.
        assert_eq!(
            unsafe { CStr::from_ptr(ckv_status_name(-7)) }.to_str().unwrap(),
            "CKV_ERR_UNKNOWN"
        );
        for e in [
            Error::Null(String::new()),
            Error::InvalidArg(String::new()),
            Error::UnsupportedType(String::new()),
            Error::Size(String::new()),
            Error::Profile(String::new()),
            Error::Io(String::new()),
            Error::Alloc(String::new()),
            Error::Panic(String::new()),
        ] {
            // SAFETY: static strings.
            let n = unsafe { CStr::from_ptr(ckv_status_name(e.status())) }.to_str().unwrap();
            assert_ne!(n, "CKV_ERR_UNKNOWN");
        }
    }

    #[test]
    fn last_error_is_per_thread_and_prefixed() {
        std::thread::spawn(|| {
            assert_eq!(last_error(), "");
            // SAFETY: NULL is allowed and refused.
            assert_eq!(unsafe { ckv_params_default(null_mut()) }, CKV_ERR_NULL);
            let m = last_error();
            assert!(m.starts_with("ckv_params_default: null argument: params"), "{m}");
            // A success leaves it alone.
            let mut p = ckv_params::default();
            // SAFETY: a valid struct.
            assert_eq!(unsafe { ckv_params_default(&mut p) }, CKV_OK);
            assert_eq!(last_error(), m);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn panics_become_status_8() {
        let s = run("ckv_test", || panic!("boom {}", 42));
        assert_eq!(s, CKV_ERR_PANIC);
        let m = last_error();
        assert!(m.contains("ckv_test") && m.contains("boom 42"), "{m}");
        assert_eq!(run_value("ckv_test", -1, || -> Result<i32> { panic!("x") }), -1);
    }

    #[test]
    fn params_defaults_and_short_sizes() {
        let mut c = ckv_params {
            size: 0,
            ..ckv_params::default()
        };
        // SAFETY: a valid struct.
        assert_eq!(unsafe { ckv_params_default(&mut c) }, CKV_OK);
        assert_eq!(c.size, size_of::<ckv_params>());
        assert_eq!(to_params(&c).unwrap(), Params::default());

        // An older caller whose struct ends before `floor`: floor and beta take their defaults.
        let mut old = ckv_params {
            floor: -99,
            pyramid_beta: f32::NAN,
            budget: 77,
            ..ckv_params::default()
        };
        old.size = offset_of!(ckv_params, floor);
        // SAFETY: a whole struct is readable, more than `size`.
        let r = unsafe { read_params(&old) }.unwrap();
        assert_eq!(r.budget, 77);
        assert_eq!(r.floor, ckv_params::default().floor);
        assert_eq!(r.pyramid_beta, ckv_params::default().pyramid_beta);
        // A size cutting a field in two: that field is the default too.
        old.size = offset_of!(ckv_params, floor) + 2;
        // SAFETY: as above.
        assert_eq!(unsafe { read_params(&old) }.unwrap().floor, 32);
        // Too small.
        old.size = 8;
        // SAFETY: as above.
        let e = unsafe { read_params(&old) }.unwrap_err();
        assert_eq!(e.status(), CKV_ERR_SIZE);
        assert!(e.message().contains("params.size"), "{e}");
        // A newer caller's larger struct is accepted.
        old.size = 4096;
        // SAFETY: only size_of::<ckv_params>() bytes are read.
        assert!(unsafe { read_params(&old) }.is_ok());
    }

    #[test]
    fn params_validation_names_fields() {
        let d = ckv_params::default();
        let cases: Vec<(ckv_params, &str)> = vec![
            (ckv_params { method: 9, ..d }, "params.method"),
            (ckv_params { budget: -1, ..d }, "params.budget"),
            (ckv_params { budget: 0, ..d }, "params.budget"),
            (
                ckv_params {
                    budget: 0,
                    ratio: 1.5,
                    ..d
                },
                "params.ratio",
            ),
            (ckv_params { window: 0, ..d }, "params.window"),
            (ckv_params { window: -2, ..d }, "params.window"),
            (ckv_params { window_end: -2, ..d }, "params.window_end"),
            (ckv_params { n_sink: -1, ..d }, "params.n_sink"),
            (ckv_params { pool_kernel: 4, ..d }, "params.pool_kernel"),
            (ckv_params { pool_kernel: 0, ..d }, "params.pool_kernel"),
            (ckv_params { pool: 2, ..d }, "params.pool"),
            (ckv_params { chunk: -1, ..d }, "params.chunk"),
            (ckv_params { n_srh: 0, ..d }, "params.n_srh"),
            (ckv_params { per_head: 2, ..d }, "params.per_head"),
            (ckv_params { fill: -1, ..d }, "params.fill"),
            (ckv_params { floor: -1, ..d }, "params.floor"),
            (ckv_params { pyramid_beta: 0.0, ..d }, "params.pyramid_beta"),
            (
                ckv_params {
                    pyramid_beta: f32::INFINITY,
                    ..d
                },
                "params.pyramid_beta",
            ),
        ];
        for (c, field) in cases {
            let e = to_params(&c).unwrap_err();
            assert_eq!(e.status(), CKV_ERR_INVALID_ARG, "{field}");
            assert!(e.message().contains(field), "{e} should name {field}");
        }
        let p = to_params(&ckv_params {
            budget: 0,
            ratio: 0.25,
            ..d
        })
        .unwrap();
        assert_eq!((p.budget, p.ratio), (0, 0.25));
        let s = to_params(&ckv_params {
            method: CKV_METHOD_STREAMINGLLM,
            ..d
        })
        .unwrap();
        assert_eq!((s.method, s.n_sink), (Method::StreamingLlm, 4));
        assert_eq!(
            to_params(&ckv_params { window_end: 40, ..d }).unwrap().window_end,
            Some(40)
        );
    }

    #[test]
    fn shapes() {
        assert!(to_shape(
            &ckv_shape {
                n_layer: 2,
                n_head: 4,
                n_head_kv: 2,
                head_dim: 32
            },
            "shape"
        )
        .is_ok());
        let e = to_shape(
            &ckv_shape {
                n_layer: 2,
                n_head: 4,
                n_head_kv: 3,
                head_dim: 32,
            },
            "shape",
        )
        .unwrap_err();
        assert!(e.message().contains("shape.n_head_kv"), "{e}");
        let e = to_shape(
            &ckv_shape {
                n_layer: 0,
                n_head: 4,
                n_head_kv: 2,
                head_dim: 32,
            },
            "shape",
        )
        .unwrap_err();
        assert!(e.message().contains("shape.n_layer"), "{e}");
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

    #[test]
    fn names_and_fingerprints() {
        let mut m = -1;
        // SAFETY: valid strings and out pointers below.
        unsafe {
            assert_eq!(ckv_method_from_name(c"snapkv".as_ptr(), &mut m), CKV_OK);
            assert_eq!(m, CKV_METHOD_SNAPKV);
            assert_eq!(ckv_method_from_name(c"StreamingLLM".as_ptr(), &mut m), CKV_OK);
            assert_eq!(m, CKV_METHOD_STREAMINGLLM);
            assert_eq!(ckv_method_from_name(c"h2o".as_ptr(), &mut m), CKV_ERR_INVALID_ARG);
            assert!(last_error().contains("\"h2o\""));
            assert_eq!(m, CKV_METHOD_STREAMINGLLM);
            assert_eq!(ckv_method_from_name(null(), &mut m), CKV_ERR_NULL);
            assert_eq!(ckv_method_from_name(c"snapkv".as_ptr(), null_mut()), CKV_ERR_NULL);

            let mut buf = [0x55 as c_char; 17];
            assert_eq!(ckv_fingerprint(c"a".as_ptr(), buf.as_mut_ptr(), 17), CKV_OK);
            assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), "af63dc4c8601ec8c");
            let mut small = [0x55 as c_char; 16];
            assert_eq!(ckv_fingerprint(c"a".as_ptr(), small.as_mut_ptr(), 16), CKV_ERR_SIZE);
            assert!(small.iter().all(|&c| c == 0x55));
            assert_eq!(ckv_fingerprint(null(), buf.as_mut_ptr(), 17), CKV_ERR_NULL);
            assert_eq!(ckv_fingerprint(c"a".as_ptr(), null_mut(), 17), CKV_ERR_NULL);
        }
    }

    #[test]
    fn dequantize_argument_errors() {
        let src = [0u8; 68];
        let mut dst = [7f32; 64];
        // SAFETY: valid buffers of the stated sizes.
        unsafe {
            assert_eq!(
                ckv_dequantize_row(5, src.as_ptr().cast(), 68, dst.as_mut_ptr(), 64),
                CKV_ERR_UNSUPPORTED_TYPE
            );
            assert_eq!(
                ckv_dequantize_row(CKV_TYPE_Q8_0, null(), 68, dst.as_mut_ptr(), 64),
                CKV_ERR_NULL
            );
            assert_eq!(
                ckv_dequantize_row(CKV_TYPE_Q8_0, src.as_ptr().cast(), 68, null_mut(), 64),
                CKV_ERR_NULL
            );
            assert_eq!(
                ckv_dequantize_row(CKV_TYPE_Q8_0, src.as_ptr().cast(), 67, dst.as_mut_ptr(), 64),
                CKV_ERR_SIZE
            );
            assert!(last_error().contains("src_size"));
            assert_eq!(
                ckv_dequantize_row(CKV_TYPE_Q8_0, src.as_ptr().cast(), 68, dst.as_mut_ptr(), 48),
                CKV_ERR_INVALID_ARG
            );
            assert_eq!(
                ckv_dequantize_row(CKV_TYPE_Q8_0, src.as_ptr().cast(), 68, dst.as_mut_ptr(), -1),
                CKV_ERR_INVALID_ARG
            );
            let p = dst.as_mut_ptr();
            assert_eq!(
                ckv_dequantize_row(CKV_TYPE_F32, p.cast(), 64, p.add(8), 16),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("overlap"));
        }
        assert!(dst.iter().all(|&x| x == 7.0));
    }

    #[test]
    fn budget_argument_errors() {
        let mut out = [-5i32; 4];
        let w = [0.5, 0.5, 0.5, 0.5];
        // SAFETY: valid buffers of n_layer values.
        unsafe {
            assert_eq!(
                ckv_budget_allocate(9, 64, 4, 32, 20.0, null(), out.as_mut_ptr()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("alloc"));
            assert_eq!(
                ckv_budget_allocate(0, 0, 4, 32, 20.0, null(), out.as_mut_ptr()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("avg"));
            assert_eq!(
                ckv_budget_allocate(0, 64, 0, 32, 20.0, null(), out.as_mut_ptr()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("n_layer"));
            assert_eq!(
                ckv_budget_allocate(0, 64, 4, 32, 20.0, null(), null_mut()),
                CKV_ERR_NULL
            );
            assert_eq!(
                ckv_budget_allocate(2, 64, 4, 32, 20.0, null(), out.as_mut_ptr()),
                CKV_ERR_NULL
            );
            assert!(last_error().contains("weights"));
            assert_eq!(
                ckv_budget_allocate(2, 64, 4, 32, 20.0, w.as_ptr(), out.as_mut_ptr()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("weights: sum"));
            assert_eq!(
                ckv_budget_allocate(1, 64, 4, 32, 0.0, null(), out.as_mut_ptr()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("beta"));
        }
        assert_eq!(out, [-5; 4]);
    }

    const PROFILE: &str = r#"{"version": 1,
        "model": {"arch": "llama", "n_layer": 2, "n_head": 4, "n_head_kv": 2, "head_dim": 32,
                  "fingerprint": "af63dc4c8601ec8c"},
        "head_ranking": [[3, 2, 1, 0], [0, 1, 2, 3]],
        "head_scores": [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]],
        "layer_weights": [0.4, 0.6]}"#;

    #[test]
    fn profiles_through_the_c_api() {
        let model = |n_layer: i32, fp: &CStr| ckv_model_desc {
            arch: c"llama".as_ptr(),
            shape: ckv_shape {
                n_layer,
                n_head: 4,
                n_head_kv: 2,
                head_dim: 32,
            },
            fingerprint: fp.as_ptr(),
        };
        let sentinel = 0x10 as *mut ckv_profile;
        let mut out = sentinel;
        // SAFETY: valid strings, descriptors and out pointers; handles freed once.
        unsafe {
            let good = model(2, c"af63dc4c8601ec8c");
            assert_eq!(
                ckv_profile_parse(PROFILE.as_ptr().cast(), PROFILE.len(), &good, &mut out),
                CKV_OK
            );
            assert!(!out.is_null() && out != sentinel);
            assert_eq!(profile_ref(out).unwrap().profile().model.n_layer, 2);
            ckv_profile_free(out);
            ckv_profile_free(null_mut());

            let mut out = sentinel;
            let bad = model(3, c"0000000000000000");
            assert_eq!(
                ckv_profile_parse(PROFILE.as_ptr().cast(), PROFILE.len(), &bad, &mut out),
                CKV_ERR_PROFILE
            );
            let m = last_error();
            assert!(
                m.contains("n_layer: profile 2, model 3") && m.contains("fingerprint"),
                "{m}"
            );
            assert_eq!(out, sentinel);
            assert_eq!(
                ckv_profile_parse(PROFILE.as_ptr().cast(), 10, null(), &mut out),
                CKV_ERR_PROFILE
            );
            assert_eq!(ckv_profile_parse(null(), 10, null(), &mut out), CKV_ERR_NULL);
            assert_eq!(
                ckv_profile_parse(PROFILE.as_ptr().cast(), PROFILE.len(), null(), null_mut()),
                CKV_ERR_NULL
            );
            let nul = ckv_model_desc { arch: null(), ..good };
            assert_eq!(
                ckv_profile_parse(PROFILE.as_ptr().cast(), PROFILE.len(), &nul, &mut out),
                CKV_ERR_NULL
            );
            assert!(last_error().contains("model.arch"));
            assert_eq!(out, sentinel);

            assert_eq!(
                ckv_profile_load(c"/no/such/profile.json".as_ptr(), null(), &mut out),
                CKV_ERR_IO
            );
            assert!(last_error().contains("/no/such/profile.json"));
            let path = std::env::temp_dir().join(format!("ckv-ffi-unit-{}.json", std::process::id()));
            std::fs::write(&path, PROFILE).unwrap();
            let cpath = CString::new(path.to_str().unwrap()).unwrap();
            assert_eq!(ckv_profile_load(cpath.as_ptr(), &good, &mut out), CKV_OK);
            ckv_profile_free(out);
            std::fs::remove_file(&path).unwrap();
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
