//! The boundary rules every entry point relies on: the thread-local last-error message (and
//! [`ckv_last_error`], which reads it), the [`catch_unwind`] wrappers [`run`] / [`run_value`] that turn a
//! panic into `CKV_ERR_PANIC`, and the checked views of raw C pointers.
//!
//! Invariants: nothing unwinds out of [`run`] or [`run_value`]; a failure sets the last error, prefixed with
//! the entry point's name, and a success leaves it alone. Every pointer helper checks NULL (`CKV_ERR_NULL`)
//! and alignment (`CKV_ERR_INVALID_ARG`) before it makes a reference; what it cannot check (that the memory
//! is live and large enough) is its caller's `# Safety` contract. [`plan_ref`] and [`profile_ref`] also check
//! the handle's magic word.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::mem::{align_of, size_of};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::types::{ckv_plan, ckv_profile, ckv_status, CKV_OK, PLAN_MAGIC, PROFILE_MAGIC};
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------------------
// Errors, panics and the last-error message.

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(super) fn set_last_error(func: &str, e: &Error) {
    let msg = format!("{func}: {e}").replace('\0', "\\0");
    let c = CString::new(msg).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|s| *s.borrow_mut() = c);
}

pub(super) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Run `f`, turning a panic into [`Error::Panic`].
pub(super) fn catch<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(Error::Panic(format!(
            "{} (this is a bug in compresskv)",
            panic_message(&*payload)
        ))),
    }
}

/// Run the body of a status-returning entry point.
pub(super) fn run(func: &str, f: impl FnOnce() -> Result<()>) -> ckv_status {
    match catch(f) {
        Ok(()) => CKV_OK,
        Err(e) => {
            set_last_error(func, &e);
            e.status()
        }
    }
}

/// Run the body of a value-returning entry point; `fallback` on error.
pub(super) fn run_value<T>(func: &str, fallback: T, f: impl FnOnce() -> Result<T>) -> T {
    match catch(f) {
        Ok(v) => v,
        Err(e) => {
            set_last_error(func, &e);
            fallback
        }
    }
}

/// The same error with `what: ` in front of its message.
pub(super) fn ctx(what: &str, e: Error) -> Error {
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

pub(super) fn check_ptr<T>(ptr: *const T, what: &str) -> Result<()> {
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
pub(super) unsafe fn slice_ref<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<&'a [T]> {
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
pub(super) unsafe fn deref<'a, T>(ptr: *const T, what: &str) -> Result<&'a T> {
    check_ptr(ptr, what)?;
    // SAFETY: non-null and aligned (checked above); the caller guarantees a valid T.
    Ok(unsafe { &*ptr })
}

/// The NUL-terminated string at `ptr`.
///
/// # Safety
/// If `ptr` is non-null, it must point to a NUL-terminated string valid for `'a`.
pub(super) unsafe fn c_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a CStr> {
    if ptr.is_null() {
        return Err(Error::Null(format!("{what} is NULL")));
    }
    // SAFETY: non-null; the caller guarantees a NUL-terminated string.
    Ok(unsafe { CStr::from_ptr(ptr) })
}

/// # Safety
/// As for [`c_str`].
pub(super) unsafe fn c_utf8<'a>(ptr: *const c_char, what: &str) -> Result<&'a str> {
    // SAFETY: forwarded to the caller.
    let s = unsafe { c_str(ptr, what) }?;
    s.to_str()
        .map_err(|e| Error::InvalidArg(format!("{what} is not UTF-8: {e}")))
}

/// Write `v` to the out-pointer `ptr` (already checked by [`check_ptr`]).
///
/// # Safety
/// `ptr` must be non-null, aligned and valid for a write of `T`.
pub(super) unsafe fn put<T>(ptr: *mut T, v: T) {
    // SAFETY: guaranteed by the caller.
    unsafe { ptr.write(v) }
}

/// Copy `s` and a NUL into the caller's `buf` of `buf_size` bytes, or refuse (nothing written) if it does
/// not fit.
///
/// # Safety
/// `buf` is null or valid for writes of `buf_size` bytes.
pub(super) unsafe fn put_str(buf: *mut c_char, buf_size: usize, s: &str, what: &str) -> Result<()> {
    check_ptr(buf, what)?;
    if buf_size <= s.len() {
        return Err(Error::Size(format!(
            "{what}_size: {buf_size} bytes, need {} ({} characters and a NUL)",
            s.len() + 1,
            s.len()
        )));
    }
    // SAFETY: `buf` is non-null and valid for `buf_size > s.len()` bytes (caller, checked); `s` is a distinct
    // allocation.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        buf.add(s.len()).write(0);
    }
    Ok(())
}

/// # Safety
/// `p` is null or a pointer obtained from [`ckv_plan_create`](super::ckv_plan_create) and not yet freed.
pub(super) unsafe fn plan_ref<'a>(p: *const ckv_plan) -> Result<&'a ckv_plan> {
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
pub(super) unsafe fn profile_ref<'a>(p: *const ckv_profile) -> Result<&'a ckv_profile> {
    // SAFETY: forwarded to the caller.
    let h = unsafe { deref(p, "profile") }?;
    if h.magic != PROFILE_MAGIC {
        return Err(Error::InvalidArg(
            "profile is not a live ckv_profile (freed, or not from ckv_profile_*)".into(),
        ));
    }
    Ok(h)
}

/// `ckv_last_error`: the message of the last failing call on this thread, `""` if none.
#[no_mangle]
pub extern "C" fn ckv_last_error() -> *const c_char {
    catch_unwind(|| LAST_ERROR.try_with(|s| s.borrow().as_ptr()).ok())
        .ok()
        .flatten()
        .unwrap_or(c"".as_ptr())
}

/// The last-error message as a `String` (for the unit tests of every group).
#[cfg(test)]
pub(super) fn last_error() -> String {
    // SAFETY: ckv_last_error never returns NULL and the string lives until the next failing call.
    unsafe { CStr::from_ptr(ckv_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::{ckv_params, ckv_params_default, CKV_ERR_NULL, CKV_ERR_PANIC};
    use std::ptr::null_mut;

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
}
