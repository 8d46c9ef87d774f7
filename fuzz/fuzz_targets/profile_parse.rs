//! `ckv_profile_parse` on arbitrary bytes (the input itself is the JSON text), with no model, the model the
//! text describes, or one that differs in one field, and NULL / misaligned arguments; `ckv_profile_free`.
//! Oracle: `validate_profile` (common/mod.rs), an independent validator of the profile format over
//! serde_json's `Value`: the library accepts exactly what it accepts, and checks the model exactly; a refused call leaves
//! `*out` as it was; every handle is freed.

#![no_main]

mod common;

use std::ffi::CString;

use common::*;
use compresskv::ffi::*;
use libfuzzer_sys::fuzz_target;

const SENTINEL: usize = 0x5a5a_5a50;

fn one(data: &[u8], desc_kind: u8) {
    let oracle = validate_profile(data);
    // the model: none, the one the text describes, or one field off; `mismatch`: expected to differ
    let mut id = match &oracle {
        Ok(i) => i.clone(),
        Err(_) => Ident {
            arch: "llama".into(),
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 32,
            fingerprint: "x".into(),
        },
    };
    let mut with_desc = desc_kind % 4 != 0;
    let mut mismatch = false;
    match desc_kind % 8 {
        2 => {
            id.arch.push('x');
            mismatch = true;
        }
        3 => {
            id.fingerprint.insert(0, '0');
            mismatch = true;
        }
        5 => {
            id.head_dim = id.head_dim.saturating_add(1);
            mismatch = true;
        }
        _ => {}
    }
    // the C struct holds int32_t dimensions: a profile whose dimensions do not fit is checked without one
    let dims_fit = [id.n_layer, id.n_head, id.n_head_kv, id.head_dim]
        .iter()
        .all(|&d| d <= i32::MAX as usize);
    let strings_ok = !id.arch.contains('\0') && !id.fingerprint.contains('\0');
    if !dims_fit || !strings_ok {
        with_desc = false;
        mismatch = false;
    }
    let arch = CString::new(id.arch.clone()).unwrap_or_default();
    let fp = CString::new(id.fingerprint.clone()).unwrap_or_default();
    let desc = ckv_model_desc {
        arch: arch.as_ptr(),
        shape: ckv_shape {
            n_layer: id.n_layer as i32,
            n_head: id.n_head as i32,
            n_head_kv: id.n_head_kv as i32,
            head_dim: id.head_dim as i32,
        },
        fingerprint: fp.as_ptr(),
    };
    let mut out = SENTINEL as *mut ckv_profile;
    let marker = mark_last_error();
    // SAFETY: data is valid for its length; desc and out are valid.
    let st = unsafe {
        ckv_profile_parse(
            data.as_ptr().cast(),
            data.len(),
            if with_desc { &desc } else { std::ptr::null() },
            &mut out,
        )
    };
    let f = "ckv_profile_parse";
    match oracle {
        Err(None) => {
            check(f, st, Some(&marker));
        }
        Err(Some(why)) => {
            assert_ne!(
                st,
                CKV_OK,
                "accepted an invalid profile ({why}): {:?}",
                String::from_utf8_lossy(data)
            );
            expect_err(f, st, CKV_ERR_PROFILE);
        }
        Ok(_) if mismatch && with_desc => {
            expect_err(f, st, CKV_ERR_PROFILE);
            assert!(last_error().contains("another model"), "{}", last_error());
        }
        Ok(_) => {
            expect_ok(f, st, Some(&marker));
            assert_ne!(out as usize, SENTINEL);
            assert!(!out.is_null());
            // SAFETY: a live handle.
            let p = unsafe { &*out }.profile();
            assert_eq!(p.model.n_layer, id.n_layer);
            // SAFETY: a live handle, freed once.
            unsafe { ckv_profile_free(out) };
            return;
        }
    }
    if st != CKV_OK {
        assert_eq!(out as usize, SENTINEL, "a refused ckv_profile_parse wrote *out");
    } else {
        // SAFETY: a live handle, freed once.
        unsafe { ckv_profile_free(out) };
    }
}

fuzz_target!(|data: &[u8]| {
    tally_input();
    // the last byte picks the model description; the rest is the JSON text
    let (desc_kind, text) = match data.split_last() {
        Some((&k, rest)) => (k, rest),
        None => (0, data),
    };
    one(text, desc_kind);
    // NULL pointers: json NULL (any len), out NULL, out misaligned
    if desc_kind == 0xff {
        let mut out = SENTINEL as *mut ckv_profile;
        // SAFETY: NULL json is refused.
        let st = unsafe { ckv_profile_parse(std::ptr::null(), text.len(), std::ptr::null(), &mut out) };
        expect_err("ckv_profile_parse", st, CKV_ERR_NULL);
        assert_eq!(out as usize, SENTINEL);
        // SAFETY: NULL out is refused.
        let st = unsafe { ckv_profile_parse(text.as_ptr().cast(), text.len(), std::ptr::null(), std::ptr::null_mut()) };
        expect_err("ckv_profile_parse", st, CKV_ERR_NULL);
        let mut b = Buf::new(16, 3);
        // SAFETY: a misaligned out is refused.
        let st = unsafe { ckv_profile_parse(text.as_ptr().cast(), text.len(), std::ptr::null(), b.ptr().cast()) };
        expect_err("ckv_profile_parse", st, CKV_ERR_INVALID_ARG);
        assert!(b.all().iter().all(|&x| x == 0));
    }
});
