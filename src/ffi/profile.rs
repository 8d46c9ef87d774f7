//! The profile entry points: `ckv_profile_load`, `ckv_profile_find`, `ckv_profile_parse`, `ckv_profile_free`,
//! and the conversion of a `ckv_model_desc` into a [`ModelIdentity`].
//!
//! Invariants: a handle is handed out only for a profile that parsed, validated and (when a model is given)
//! matches the model; on any failure `*out` is left as it was. A handle is a `Box` made by
//! [`finish_profile`] and freed once by `ckv_profile_free`, which clears its magic word.

use std::ffi::c_char;

use super::boundary::{c_str, c_utf8, check_ptr, deref, profile_ref, put, run, slice_ref};
use super::params::to_shape;
use super::types::*;
use crate::error::{Error, Result};
use crate::profile::{find_profile, ModelIdentity, Profile};

/// # Safety
/// `m`'s string pointers are null or NUL-terminated strings.
pub(super) unsafe fn model_identity(m: &ckv_model_desc) -> Result<ModelIdentity> {
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
pub(super) unsafe fn finish_profile(
    profile: Profile,
    model: *const ckv_model_desc,
    out: *mut *mut ckv_profile,
) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::boundary::last_error;
    use std::ffi::{CStr, CString};
    use std::ptr::{null, null_mut};

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
}
