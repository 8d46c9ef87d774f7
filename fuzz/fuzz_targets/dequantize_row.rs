//! `ckv_dequantize_row` over every type id (and invalid ones) with arbitrary sizes: `n` a whole number of
//! blocks or not, negative, huge; `src_size` exact or off; `src` at any alignment; `dst` NULL, misaligned,
//! or overlapping `src`. Oracle: the per-element reference of the ggml formats in common/mod.rs (bit for
//! bit; NaN as NaN); the exact status of each refusal in the header's order; a refused call writes nothing
//! to `dst`, a successful one writes exactly `n` floats.

#![no_main]

mod common;

use common::*;
use compresskv::ffi::*;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let ty: i32 = match pick(u, &[12, 1, 1])? {
        0 => u.choose(&TYPES)?.0,
        1 => *u.choose(&[4, 5, 9, 10, 19, 21, 29, 31, 39, -1])?,
        _ => u.arbitrary()?,
    };
    let info = type_info(ty);
    let be = info.map_or(1, |t| t.0) as i64;
    let n: i32 = match pick(u, &[12, 2, 1, 1])? {
        0 => (u.int_in_range(0..=8i64)? * be * if be == 1 { u.int_in_range(1..=32i64)? } else { 1 }) as i32,
        1 => u.int_in_range(0..=300)?,
        2 => u.int_in_range(i32::MIN..=-1)?,
        _ => *u.choose(&[i32::MAX, i32::MAX - 31, 1 << 30, 1 << 26])?,
    };
    let nu = usize::try_from(n).ok();
    let want = nu.and_then(|n| row_bytes(ty, n));
    let src_size: usize = match (pick(u, &[10, 2, 1])?, want) {
        (0, Some(w)) if w < 1 << 20 => w,
        (1, Some(w)) if w < 1 << 20 => (w as i64 + u.int_in_range(-40i64..=40)?).max(0) as usize,
        _ => u.int_in_range(0..=600)?,
    };
    let src_off = u.int_in_range(0..=15)?;
    let null_src = one_in(u, 24)?;
    let dst_kind = pick(u, &[20, 1, 1, 1])?; // ok, NULL, misaligned, overlapping src
    let mut src = Buf::new(src_size, src_off);
    let raw = u.bytes(src_size.min(u.len()))?.to_vec();
    src.bytes_mut()[..raw.len()].copy_from_slice(&raw);
    // a few runs with every byte from the input being rare: repeat it
    for i in raw.len()..src_size {
        src.bytes_mut()[i] = raw.get(i % raw.len().max(1)).copied().unwrap_or(0x3c);
    }

    // dst: room for n floats (when n is small) and a canary
    let n_room = nu.filter(|&n| n <= 1 << 16).unwrap_or(0);
    let dst_off = if dst_kind == 2 { u.int_in_range(1..=3)? } else { 0 };
    let mut dst = Buf::new(4 * (n_room + 8), dst_off);
    dst.all_mut().fill(0xa5);
    let dst_before = dst.all().to_vec();
    let src_before = src.all().to_vec();

    let src_ptr: *const u8 = if null_src { std::ptr::null() } else { src.ptr() };
    let dst_ptr: *mut f32 = match dst_kind {
        1 => std::ptr::null_mut(),
        // inside src, 4-aligned: overlaps whenever both are non-empty
        3 => {
            let base = src.ptr() as usize;
            (base.div_ceil(4) * 4) as *mut f32
        }
        _ => dst.ptr().cast(),
    };
    // Overlap is refused; but a dst inside src must still be writable for n floats if the call went on:
    // only pass it when src holds them (else it is not a valid call).
    if dst_kind == 3 && (nu.map_or(true, |n| 4 * n + 4 > src_size) || src_size == 0) {
        return Ok(());
    }
    // A successful call needs dst valid for n floats: only pass large n when it must be refused.
    if dst_kind != 3 && nu.is_some_and(|n| n > n_room) && want == Some(src_size) {
        return Ok(());
    }

    let marker = mark_last_error();
    // SAFETY: src is NULL or valid for src_size bytes; dst is NULL, misaligned (refused), inside src (refused)
    // or valid for n floats whenever n floats could be written (checked above).
    let st = unsafe { ckv_dequantize_row(ty, src_ptr.cast(), src_size, dst_ptr, n) };
    let f = "ckv_dequantize_row";
    let expect = if info.is_none() {
        Some(CKV_ERR_UNSUPPORTED_TYPE)
    } else if null_src || dst_kind == 1 {
        Some(CKV_ERR_NULL)
    } else if dst_kind == 2 {
        Some(CKV_ERR_INVALID_ARG)
    } else if nu.is_none() || want.is_none() {
        Some(CKV_ERR_INVALID_ARG)
    } else if want != Some(src_size) {
        Some(CKV_ERR_SIZE)
    } else if dst_kind == 3 && n > 0 {
        Some(CKV_ERR_INVALID_ARG)
    } else {
        None
    };
    assert_eq!(src.all(), &src_before[..], "ckv_dequantize_row wrote its source");
    match expect {
        Some(e) => {
            expect_err(f, st, e);
            assert_eq!(dst.all(), &dst_before[..], "a refused ckv_dequantize_row wrote dst");
        }
        None => {
            expect_ok(f, st, Some(&marker));
            if dst_kind == 3 {
                return Ok(()); // n == 0 inside src: nothing to compare
            }
            let n = nu.unwrap();
            let y = ref_dequantize(ty, src.bytes(), n);
            let all = dst.all();
            for (i, r) in y.iter().enumerate() {
                let b = &all[dst.off + 4 * i..dst.off + 4 * i + 4];
                let got = f32::from_le_bytes(b.try_into().unwrap());
                assert!(
                    same_float(got, *r),
                    "type {ty} n {n}: element {i} is {got:e} ({:#010x}), reference {r:e} ({:#010x})",
                    got.to_bits(),
                    r.to_bits()
                );
            }
            let end = dst.off + 4 * n;
            assert_eq!(
                &all[end..],
                &dst_before[end..],
                "ckv_dequantize_row wrote past n floats"
            );
            assert_eq!(&all[..dst.off], &dst_before[..dst.off]);
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    tally_input();
    let _ = run(&mut Unstructured::new(data));
});
