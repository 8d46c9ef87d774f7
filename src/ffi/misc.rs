//! The small stateless entry points: `ckv_version`, `ckv_status_name`, `ckv_fingerprint` and
//! `ckv_dequantize_row`.
//!
//! Invariants: `ckv_version` and `ckv_status_name` never fail and return static NUL-terminated strings;
//! `ckv_fingerprint` and `ckv_dequantize_row` write their output only after every argument checked out
//! (buffer sizes, exact row size, no overlap of `src` and `dst`).

use std::ffi::{c_char, c_void, CStr};

use super::boundary::{c_str, check_ptr, put_str, run, slice_ref};
use super::params::{nonneg, type_from_id};
use super::types::*;
use crate::error::Error;
use crate::profile::fingerprint_bytes;
use crate::types::dequantize_row;

/// `ckv_version`: the library version, `"MAJOR.MINOR.PATCH"`. Never NULL.
#[no_mangle]
pub extern "C" fn ckv_version() -> *const c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
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

/// `ckv_fingerprint`: 64-bit FNV-1a of `meta` as 16 lower-case hex digits and a NUL into `buf`.
///
/// # Safety
/// `meta` is null or a NUL-terminated string; `buf` is null or valid for writes of `buf_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ckv_fingerprint(meta: *const c_char, buf: *mut c_char, buf_size: usize) -> ckv_status {
    run("ckv_fingerprint", || {
        // SAFETY: the caller guarantees a NUL-terminated string or NULL.
        let s = unsafe { c_str(meta, "meta") }?;
        // SAFETY: forwarded to the caller.
        unsafe { put_str(buf, buf_size, &fingerprint_bytes(s.to_bytes()), "buf") }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::boundary::last_error;
    use crate::ffi::ckv_method_from_name;
    use std::ptr::{null, null_mut};

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
}
