//! `ckv_params`: its defaults, its versioned read by `size`, its validation into [`Params`], and the
//! conversions between the C enums (`ckv_method`, `ckv_pool`, `ckv_type`) and the library's types; with the
//! entry points `ckv_params_default` and `ckv_method_from_name`.
//!
//! Invariants: [`read_params`] reads only the fields that lie wholly inside the caller's `size` bytes (later
//! fields keep their defaults, bytes past our struct are ignored) and refuses a `size` below
//! [`CKV_PARAMS_MIN_SIZE`]; `ckv_params` has no padding (a compile-time assertion). [`to_params`] and
//! [`to_shape`] accept only in-range values and name the offending field in their error.

use std::ffi::c_char;
use std::mem::{offset_of, size_of};

use super::boundary::{c_str, check_ptr, put, run};
use super::types::*;
use crate::error::{Error, Result};
use crate::plan::{Method, Params, Shape};
use crate::score::{Heads, PoolKind};
use crate::types::GgmlType;

pub(super) fn method_id(m: Method) -> i32 {
    match m {
        Method::CompressKv => CKV_METHOD_COMPRESSKV,
        Method::SnapKv => CKV_METHOD_SNAPKV,
        Method::PyramidKv => CKV_METHOD_PYRAMIDKV,
        Method::StreamingLlm => CKV_METHOD_STREAMINGLLM,
        Method::SnapKvSrh => CKV_METHOD_SNAPKV_SRH,
        Method::Gate => CKV_METHOD_GATE,
    }
}

pub(super) fn method_from_id(id: i32) -> Result<Method> {
    Ok(match id {
        CKV_METHOD_COMPRESSKV => Method::CompressKv,
        CKV_METHOD_SNAPKV => Method::SnapKv,
        CKV_METHOD_PYRAMIDKV => Method::PyramidKv,
        CKV_METHOD_STREAMINGLLM => Method::StreamingLlm,
        CKV_METHOD_SNAPKV_SRH => Method::SnapKvSrh,
        CKV_METHOD_GATE => Method::Gate,
        _ => {
            return Err(Error::InvalidArg(format!(
                "params.method: {id} is not a ckv_method (0..=5)"
            )))
        }
    })
}

pub(super) fn pool_id(p: PoolKind) -> i32 {
    match p {
        PoolKind::Avg => CKV_POOL_AVG,
        PoolKind::Max => CKV_POOL_MAX,
    }
}

pub(super) fn type_from_id(id: i32, what: &str) -> Result<GgmlType> {
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
        ckv_params::from(&Params::default())
    }
}

/// Every field of `d` (the inverse of [`to_params`] on valid parameters).
impl From<&Params> for ckv_params {
    fn from(d: &Params) -> Self {
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
            head_reduce: pool_id(d.head_reduce),
        }
    }
}

/// Smallest `ckv_params::size` accepted: `size`, `method` and `budget`.
pub const CKV_PARAMS_MIN_SIZE: usize = offset_of!(ckv_params, budget) + size_of::<i32>();

/// End offsets of the fields of `ckv_params`, ascending.
pub(super) const PARAMS_FIELD_ENDS: [usize; 16] = [
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
    offset_of!(ckv_params, head_reduce) + 4,
];

/// Read a caller's `ckv_params` by its `size`: the fields wholly inside `size` bytes are the caller's,
/// later ones keep their defaults; bytes past our struct (a newer caller) are ignored.
///
/// # Safety
/// `p` must be non-null and valid for reads of `p->size` bytes (at least a `size_t`).
pub(super) unsafe fn read_params(p: *const ckv_params) -> Result<ckv_params> {
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
    // between its fields (a compile-time assertion below), so the n bytes are whole fields; the regions are
    // distinct objects.
    unsafe { std::ptr::copy_nonoverlapping(p as *const u8, (&mut out as *mut ckv_params).cast::<u8>(), n) };
    out.size = size;
    Ok(out)
}

// Every field after `size` is 4 bytes and follows the previous one: no padding between fields (the tail
// padding after the last one is never copied: `n` stops at a field's end).
const _: () = assert!(
    PARAMS_FIELD_ENDS[PARAMS_FIELD_ENDS.len() - 1] == size_of::<usize>() + 4 * (PARAMS_FIELD_ENDS.len() - 1)
        && PARAMS_FIELD_ENDS[PARAMS_FIELD_ENDS.len() - 1] <= size_of::<ckv_params>(),
    "ckv_params must have no padding between its fields"
);

pub(super) fn nonneg(v: i32, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::InvalidArg(format!("{what}: {v} < 0")))
}

pub(super) fn flag(v: i32, what: &str) -> Result<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Error::InvalidArg(format!("{what}: {v} is not 0 or 1"))),
    }
}

/// Validate the caller's parameters and convert them.
pub(super) fn to_params(c: &ckv_params) -> Result<Params> {
    let method = method_from_id(c.method)?;
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
    let n_sink = nonneg(c.n_sink, "params.n_sink")?;
    if c.pool_kernel < 1 || c.pool_kernel % 2 == 0 {
        return Err(Error::InvalidArg(format!(
            "params.pool_kernel: {} (expected an odd value >= 1)",
            c.pool_kernel
        )));
    }
    let pool_of = |p: i32, what: &str| match p {
        CKV_POOL_AVG => Ok(PoolKind::Avg),
        CKV_POOL_MAX => Ok(PoolKind::Max),
        p => Err(Error::InvalidArg(format!(
            "params.{what}: {p} is not a ckv_pool (0 avg, 1 max)"
        ))),
    };
    let pool = pool_of(c.pool, "pool")?;
    let head_reduce = pool_of(c.head_reduce, "head_reduce")?;
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
    let p = Params {
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
        head_reduce,
        fill: flag(c.fill, "params.fill")?,
        floor,
        pyramid_beta: c.pyramid_beta as f64,
    };
    Ok(Params { n_sink: p.sinks(), ..p })
}

pub(super) fn to_shape(s: &ckv_shape, what: &str) -> Result<Shape> {
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
        let m = Method::ALL
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field survives the C struct: a request's parameters reach the planner as the options set them.
    #[test]
    fn params_round_trip_through_the_c_struct() {
        let p = Params {
            method: Method::PyramidKv,
            budget: 100,
            ratio: 0.5,
            window: 16,
            window_end: Some(40),
            n_sink: 2,
            pool_kernel: 3,
            pool: PoolKind::Max,
            chunk: 8,
            n_srh: 2,
            per_head: true,
            head_reduce: PoolKind::Max,
            fill: false,
            floor: 7,
            pyramid_beta: 10.0,
        };
        assert_eq!(to_params(&ckv_params::from(&p)).unwrap(), p);
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
            (ckv_params { head_reduce: -1, ..d }, "params.head_reduce"),
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
}
