//! Entry points of the options string (`ckv_options_check`, `ckv_option_get`) and of the flags that set
//! them (`ckv_flag_get`), and the bounded-prefill plan they lead to (`ckv_overflow_plan`): parsing, validation and defaults are [`crate::options`]'s, the flag table
//! [`crate::flags`]'s, the plan [`crate::overflow`]'s; these only cross the boundary.
//!
//! Invariants: NULL options are the defaults; a failing call writes nothing to the caller's buffer.

use super::boundary::{c_utf8, check_ptr, put, put_str, run, slice_ref};
use super::types::*;
use crate::error::{Error, Result};
use crate::flags::{Tools, C_FLAGS, FLAGS};
use crate::options::Options;
use crate::overflow::Probe;
use std::ffi::c_char;

/// # Safety
/// `p` is null or a NUL-terminated string.
pub(super) unsafe fn options_arg(p: *const c_char) -> Result<Options> {
    if p.is_null() {
        return Ok(Options::default());
    }
    // SAFETY: forwarded to the caller.
    Options::parse(unsafe { c_utf8(p, "options") }?)
}

/// `ckv_options_check`: parse and validate `options` (NULL: the defaults).
///
/// # Safety
/// `options` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn ckv_options_check(options: *const c_char) -> ckv_status {
    // SAFETY: forwarded to the caller.
    run("ckv_options_check", || unsafe { options_arg(options) }.map(|_| ()))
}

/// `ckv_option_get`: the value option `key` takes in `options` (NULL: its default) as text.
///
/// # Safety
/// `options` and `key` are null or NUL-terminated strings; `buf` is null or valid for `buf_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ckv_option_get(
    options: *const c_char,
    key: *const c_char,
    buf: *mut c_char,
    buf_size: usize,
) -> ckv_status {
    run("ckv_option_get", || {
        // SAFETY: forwarded to the caller.
        let o = unsafe { options_arg(options) }?;
        // SAFETY: forwarded to the caller.
        let k = unsafe { c_utf8(key, "key") }?;
        let text = o.get_text(k)?;
        // SAFETY: forwarded to the caller.
        unsafe { put_str(buf, buf_size, &text, "buf") }
    })
}

/// Mirror of `ckv_flag`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ckv_flag {
    /// The flag, NUL-terminated.
    pub name: *const c_char,
    /// The option it sets ("" for `--compresskv`).
    pub key: *const c_char,
    /// The value's placeholder ("" for a switch).
    pub hint: *const c_char,
    /// Help with the option's default.
    pub help: *const c_char,
    /// 1: llama-completion only.
    pub completion_only: i32,
}

/// `ckv_flag_get`: flag `i` of [`crate::flags::FLAGS`], its strings alive for the process.
///
/// # Safety
/// `out` is null or valid for writing one `ckv_flag`.
#[no_mangle]
pub unsafe extern "C" fn ckv_flag_get(i: i32, out: *mut ckv_flag) -> ckv_status {
    run("ckv_flag_get", || {
        check_ptr(out, "out")?;
        let n = FLAGS.len();
        let idx = usize::try_from(i).ok().filter(|&i| i < n);
        let idx = idx.ok_or_else(|| Error::InvalidArg(format!("flag {i} out of range (0..{n})")))?;
        let [name, key, hint, help] = &C_FLAGS[idx];
        let f = ckv_flag {
            name: name.as_ptr(),
            key: key.as_ptr(),
            hint: hint.as_ptr(),
            help: help.as_ptr(),
            completion_only: i32::from(FLAGS[idx].tools == Tools::Completion),
        };
        // SAFETY: `out` is non-null (checked) and valid for writing per the contract.
        unsafe { put(out, f) };
        Ok(())
    })
}

/// Mirror of `ckv_overflow`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ckv_overflow {
    /// Prompt tokens per chunk.
    pub n_batch: i32,
    /// Cells a pass that makes room keeps.
    pub n_keep: i32,
    /// First prompt token of the probe (-1: the probe text).
    pub probe_start: i32,
    /// End of the probe's prompt tokens (-1: the probe text; `== probe_start`: the latest tokens).
    pub probe_end: i32,
    /// 1: no question found, the latest tokens score.
    pub no_question: i32,
}

/// `ckv_overflow_plan`: [`crate::overflow::plan`] across the boundary.
///
/// # Safety
/// `options` is null or a NUL-terminated string; `eog` is null or valid for `n_prompt` bytes; `out` is null
/// or valid for writing one `ckv_overflow`.
#[no_mangle]
pub unsafe extern "C" fn ckv_overflow_plan(
    options: *const c_char,
    eog: *const u8,
    n_prompt: i32,
    n_cells: i32,
    n_batch: i32,
    n_probe_text: i32,
    out: *mut ckv_overflow,
) -> ckv_status {
    run("ckv_overflow_plan", || {
        check_ptr(out, "out")?;
        let count = |v: i32, what: &str| {
            usize::try_from(v).map_err(|_| Error::InvalidArg(format!("{what} must not be negative, got {v}")))
        };
        let (n, cells) = (count(n_prompt, "n_prompt")?, count(n_cells, "n_cells")?);
        let (batch, text) = (count(n_batch, "n_batch")?, count(n_probe_text, "n_probe_text")?);
        // SAFETY: forwarded to the caller.
        let o = unsafe { options_arg(options) }?;
        let none = vec![0u8; if eog.is_null() { n } else { 0 }];
        // SAFETY: `eog` is valid for `n_prompt` bytes when non-null (the caller's contract).
        let eog = if eog.is_null() {
            &none[..]
        } else {
            unsafe { slice_ref(eog, n, "eog") }?
        };
        let p = crate::overflow::plan(&o, eog, cells, batch, text)?;
        let (probe_start, probe_end) = match p.probe {
            Probe::Latest => (0, 0),
            Probe::Text => (-1, -1),
            Probe::Prompt(s, e) => (s as i32, e as i32),
        };
        let r = ckv_overflow {
            n_batch: p.n_batch as i32,
            n_keep: p.n_keep as i32,
            probe_start,
            probe_end,
            no_question: i32::from(p.no_question),
        };
        // SAFETY: `out` is non-null (checked) and valid for writing per the contract.
        unsafe { put(out, r) };
        Ok(())
    })
}
