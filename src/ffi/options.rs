//! Entry points of the options string (`ckv_options_check`, `ckv_option_get`): parsing, validation and
//! defaults are [`crate::options`]'s; these only cross the boundary.
//!
//! Invariants: NULL options are the defaults; a failing call writes nothing to the caller's buffer.

use super::boundary::{c_utf8, put_str, run};
use super::types::*;
use crate::error::Result;
use crate::options::Options;
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
