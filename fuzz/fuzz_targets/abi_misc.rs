//! `ckv_version`, `ckv_last_error`, `ckv_status_name`, `ckv_params_default` and `ckv_method_from_name`,
//! in an input-driven sequence: arbitrary status values, method names of arbitrary bytes (any case), NULL
//! and misaligned out-pointers. Oracles: the header's names and values; a refused call leaves its output
//! untouched; a successful call leaves the last error as it was.

#![no_main]

mod common;

use std::ffi::CStr;

use common::*;
use compresskv::ffi::*;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 9] = [
    "CKV_OK",
    "CKV_ERR_NULL",
    "CKV_ERR_INVALID_ARG",
    "CKV_ERR_UNSUPPORTED_TYPE",
    "CKV_ERR_SIZE",
    "CKV_ERR_PROFILE",
    "CKV_ERR_IO",
    "CKV_ERR_ALLOC",
    "CKV_ERR_PANIC",
];
const METHODS: [(&str, i32); 5] = [
    ("compresskv", CKV_METHOD_COMPRESSKV),
    ("snapkv", CKV_METHOD_SNAPKV),
    ("pyramidkv", CKV_METHOD_PYRAMIDKV),
    ("streamingllm", CKV_METHOD_STREAMINGLLM),
    ("snapkv-srh", CKV_METHOD_SNAPKV_SRH),
];

fn version() {
    let p = ckv_version();
    assert!(!p.is_null());
    // SAFETY: a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(p) }.to_str().unwrap();
    assert_eq!(
        v,
        format!("{CKV_VERSION_MAJOR}.{CKV_VERSION_MINOR}.{CKV_VERSION_PATCH}")
    );
    assert_eq!(ckv_version(), p, "ckv_version is not a stable pointer");
}

fn status(u: &mut Unstructured<'_>) -> Result<()> {
    let st = match pick(u, &[3, 1])? {
        0 => u.int_in_range(-2..=10)?,
        _ => u.arbitrary::<i32>()?,
    };
    let marker = last_error();
    let name = status_name(st);
    let want = usize::try_from(st)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("CKV_ERR_UNKNOWN");
    assert_eq!(name, want, "ckv_status_name({st})");
    assert_eq!(last_error(), marker, "ckv_status_name changed the last error");
    Ok(())
}

fn params_default(u: &mut Unstructured<'_>) -> Result<()> {
    let size = std::mem::size_of::<ckv_params>();
    match pick(u, &[4, 1, 2])? {
        0 => {
            let marker = mark_last_error();
            let mut p = ckv_params {
                size: 0,
                method: -7,
                budget: -7,
                ratio: f32::NAN,
                window: -7,
                window_end: -7,
                n_sink: -7,
                pool_kernel: -7,
                pool: -7,
                chunk: -7,
                n_srh: -7,
                per_head: -7,
                fill: -7,
                floor: -7,
                pyramid_beta: -7.0,
            };
            // SAFETY: a whole, aligned ckv_params.
            let st = unsafe { ckv_params_default(&mut p) };
            expect_ok("ckv_params_default", st, Some(&marker));
            assert_eq!(p, ckv_params::default());
            assert_eq!(p.size, size);
            assert_eq!(p.method, CKV_METHOD_COMPRESSKV);
            assert_eq!(
                (p.window, p.window_end, p.pool_kernel, p.n_srh, p.fill, p.floor),
                (8, -1, 5, 4, 1, 32)
            );
            assert_eq!(p.pyramid_beta, 20.0);
        }
        1 => {
            // SAFETY: NULL is refused.
            let st = unsafe { ckv_params_default(std::ptr::null_mut()) };
            expect_err("ckv_params_default", st, CKV_ERR_NULL);
            assert!(last_error().contains("params"));
        }
        _ => {
            let off = u.int_in_range(1..=7)?;
            let mut b = Buf::new(size, off);
            let fill: u8 = u.arbitrary()?;
            b.all_mut().fill(fill);
            let before = b.all().to_vec();
            // SAFETY: `size` writable bytes at a misaligned address; it must be refused unwritten.
            let st = unsafe { ckv_params_default(b.ptr().cast()) };
            expect_err("ckv_params_default", st, CKV_ERR_INVALID_ARG);
            assert!(last_error().contains("aligned"), "{}", last_error());
            assert_eq!(b.all(), &before[..], "a refused ckv_params_default wrote its buffer");
        }
    }
    Ok(())
}

fn method_from_name(u: &mut Unstructured<'_>) -> Result<()> {
    // a known name with its case scrambled, a known name altered, or arbitrary bytes
    let mut name: Vec<u8> = match pick(u, &[3, 2, 3])? {
        0 => {
            let (n, _) = *u.choose(&METHODS)?;
            let mut v = n.as_bytes().to_vec();
            for c in v.iter_mut() {
                if u.arbitrary::<bool>()? {
                    c.make_ascii_uppercase();
                }
            }
            v
        }
        1 => {
            let (n, _) = *u.choose(&METHODS)?;
            let mut v = n.as_bytes().to_vec();
            let at = u.int_in_range(0..=v.len())?;
            match pick(u, &[1, 1, 1])? {
                0 => v.insert(at, u.arbitrary()?),
                1 if at < v.len() => {
                    v.remove(at);
                }
                _ => v.truncate(at),
            }
            v
        }
        _ => u.arbitrary::<Vec<u8>>()?,
    };
    if let Some(z) = name.iter().position(|&b| b == 0) {
        name.truncate(z);
    }
    let want = METHODS
        .iter()
        .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(&name))
        .map(|&(_, id)| id);
    name.push(0);
    let null_name = one_in(u, 16)?;
    let out_kind = pick(u, &[8, 1, 1])?; // valid, NULL, misaligned
    let mut out_buf = Buf::new(4, if out_kind == 2 { u.int_in_range(1..=3)? } else { 0 });
    out_buf.bytes_mut().copy_from_slice(&(-99i32).to_le_bytes());
    let before = out_buf.all().to_vec();
    let out: *mut i32 = if out_kind == 1 {
        std::ptr::null_mut()
    } else {
        out_buf.ptr().cast()
    };
    let name_ptr = if null_name {
        std::ptr::null()
    } else {
        name.as_ptr().cast()
    };
    let marker = mark_last_error();
    // SAFETY: name is NUL-terminated (or NULL); out is NULL, misaligned (refused) or one writable int.
    let st = unsafe { ckv_method_from_name(name_ptr, out) };
    if null_name {
        expect_err("ckv_method_from_name", st, CKV_ERR_NULL);
        assert!(last_error().contains("name"));
    } else if out_kind == 1 {
        expect_err("ckv_method_from_name", st, CKV_ERR_NULL);
        assert!(last_error().contains("out"));
    } else if out_kind == 2 {
        expect_err("ckv_method_from_name", st, CKV_ERR_INVALID_ARG);
    } else if let Some(id) = want {
        expect_ok("ckv_method_from_name", st, Some(&marker));
        assert_eq!(i32::from_le_bytes(out_buf.bytes().try_into().unwrap()), id);
        return Ok(());
    } else {
        expect_err("ckv_method_from_name", st, CKV_ERR_INVALID_ARG);
        assert!(last_error().contains("unknown method name"), "{}", last_error());
    }
    assert_eq!(out_buf.all(), &before[..], "a refused ckv_method_from_name wrote *out");
    Ok(())
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    version();
    assert!(!ckv_last_error().is_null());
    for _ in 0..u.int_in_range(1..=16)? {
        match pick(u, &[2, 2, 4, 1])? {
            0 => status(u)?,
            1 => params_default(u)?,
            2 => method_from_name(u)?,
            _ => version(),
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    tally_input();
    let _ = run(&mut Unstructured::new(data));
});
