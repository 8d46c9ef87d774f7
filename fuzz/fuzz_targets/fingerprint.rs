//! `ckv_fingerprint`: arbitrary metadata bytes (up to the first NUL), output buffers of 0..40 bytes,
//! NULL `meta` or `buf`. Oracle: 64-bit FNV-1a written here, 16 lower-case hex digits and a NUL; a
//! refused call (buf_size < 17, NULL) leaves the buffer untouched; nothing is written past 17 bytes.

#![no_main]

mod common;

use common::*;
use compresskv::ffi::*;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let size = match pick(u, &[1, 6, 1])? {
        0 => u.int_in_range(0..=16)?,
        1 => u.int_in_range(17..=24)?,
        _ => u.int_in_range(25..=40)?,
    };
    let null_meta = one_in(u, 20)?;
    let null_buf = one_in(u, 20)?;
    let off = u.int_in_range(0..=15)?; // char needs no alignment
    let fill: u8 = u.arbitrary()?;
    let mut meta: Vec<u8> = u.arbitrary()?;
    if u.arbitrary::<bool>()? {
        meta = u.bytes(u.len())?.to_vec();
    }
    if let Some(z) = meta.iter().position(|&b| b == 0) {
        meta.truncate(z);
    }
    let want = fnv1a(&meta);
    meta.push(0);

    let mut buf = Buf::new(size, off);
    buf.all_mut().fill(fill);
    let before = buf.all().to_vec();
    let meta_ptr = if null_meta {
        std::ptr::null()
    } else {
        meta.as_ptr().cast()
    };
    let buf_ptr = if null_buf {
        std::ptr::null_mut()
    } else {
        buf.ptr().cast()
    };
    let marker = mark_last_error();
    // SAFETY: meta is NUL-terminated or NULL; buf is NULL or `size` writable bytes.
    let st = unsafe { ckv_fingerprint(meta_ptr, buf_ptr, size) };
    if null_meta || null_buf {
        expect_err("ckv_fingerprint", st, CKV_ERR_NULL);
    } else if size < 17 {
        expect_err("ckv_fingerprint", st, CKV_ERR_SIZE);
    } else {
        expect_ok("ckv_fingerprint", st, Some(&marker));
        let got = buf.bytes();
        assert_eq!(
            &got[..16],
            want.as_bytes(),
            "fingerprint of {:?}",
            &meta[..meta.len() - 1]
        );
        assert_eq!(got[16], 0);
        // nothing past the NUL
        let o = buf.off;
        assert_eq!(&buf.all()[..o], &before[..o]);
        assert_eq!(
            &buf.all()[o + 17..],
            &before[o + 17..],
            "ckv_fingerprint wrote past 17 bytes"
        );
        return Ok(());
    }
    assert_eq!(buf.all(), &before[..], "a refused ckv_fingerprint wrote its buffer");
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    tally_input();
    let _ = run(&mut Unstructured::new(data));
});
