//! `ckv_budget_allocate` (uniform, pyramid, weighted; arbitrary avg, n_layer, floor, beta and weights,
//! NULL and misaligned pointers) and `ckv_budget_fit` (params of any `size`, at any alignment, with or
//! without a profile, arbitrary n_layer and slots).
//! Oracles: the exact refusal for each invalid argument; allocations equal the slow reference of
//! tests/reference (one token at a time), sum to avg * n_layer and respect floor / 3 * avg; a fit `a`
//! satisfies a == 1 || max_l b_l(a) <= slots, and a == slots || max_l b_l(a + 1) > slots, with the
//! allocations computed through ckv_budget_allocate; refused calls write nothing.

#![no_main]

mod common;
#[path = "../../tests/reference/mod.rs"]
mod reference;

use common::*;
use compresskv::budget::Allocation;
use compresskv::ffi::*;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const TOL: f64 = 1e-6; // profile::WEIGHT_SUM_TOLERANCE

fn weights(u: &mut Unstructured<'_>, n: usize) -> Result<Vec<f64>> {
    Ok(match pick(u, &[6, 1, 1, 1])? {
        // normalised from small integers (some zero)
        0 => {
            let raw: Vec<f64> = (0..n)
                .map(|_| u.int_in_range(0..=20u32).map(f64::from))
                .collect::<Result<_>>()?;
            let s: f64 = raw.iter().sum();
            if s == 0.0 {
                vec![1.0 / n as f64; n]
            } else {
                raw.iter().map(|x| x / s).collect()
            }
        }
        // one layer takes (almost) everything
        1 => {
            let mut w = vec![0.0; n];
            w[u.int_in_range(0..=n - 1)?] = 1.0;
            w
        }
        // normalised, then one value nudged (inside or outside the tolerance)
        2 => {
            let mut w = vec![1.0 / n as f64; n];
            let i = u.int_in_range(0..=n - 1)?;
            w[i] += *u.choose(&[1e-9, -1e-9, 1e-3, -1e-3, 0.5, -2.0])?;
            w
        }
        // raw bit patterns
        _ => (0..n)
            .map(|_| u.arbitrary::<u64>().map(f64::from_bits))
            .collect::<Result<_>>()?,
    })
}

fn weights_ok(w: &[f64]) -> bool {
    w.iter().all(|x| x.is_finite() && *x >= 0.0) && (w.iter().sum::<f64>() - 1.0).abs() <= TOL
}

/// ckv_budget_allocate through the C ABI, `None` when refused (after the checks).
fn allocate_c(alloc: i32, avg: i32, n_layer: i32, floor: i32, beta: f32, w: Option<&[f64]>) -> Option<Vec<i32>> {
    let n = n_layer.max(0) as usize;
    let mut out = vec![-5i32; n + 4];
    let marker = mark_last_error();
    // SAFETY: weights hold n_layer doubles or are NULL; out holds n_layer + 4 ints.
    let st = unsafe {
        ckv_budget_allocate(
            alloc,
            avg,
            n_layer,
            floor,
            beta,
            w.map_or(std::ptr::null(), |w| w.as_ptr()),
            out.as_mut_ptr(),
        )
    };
    if check("ckv_budget_allocate", st, Some(&marker)) {
        assert!(
            out[n..].iter().all(|&x| x == -5),
            "ckv_budget_allocate wrote past n_layer values"
        );
        out.truncate(n);
        Some(out)
    } else {
        assert!(out.iter().all(|&x| x == -5), "a refused ckv_budget_allocate wrote out");
        None
    }
}

fn allocate(u: &mut Unstructured<'_>) -> Result<()> {
    let alloc = match pick(u, &[10, 1])? {
        0 => u.int_in_range(0..=2)?,
        _ => u.arbitrary()?,
    };
    let n_layer: i32 = match pick(u, &[12, 1, 1])? {
        0 => u.int_in_range(1..=48)?,
        1 => u.int_in_range(49..=600)?,
        _ => u.int_in_range(-3..=0)?,
    };
    let avg: i32 = match pick(u, &[10, 2, 1, 1])? {
        0 => u.int_in_range(1..=600)?,
        1 => u.int_in_range(1..=1 << 24)?,
        2 => *u.choose(&[i32::MAX, i32::MAX / 3, i32::MAX / 3 + 1, 1 << 30])?,
        _ => u.int_in_range(-3..=0)?,
    };
    let floor: i32 = match pick(u, &[4, 3, 1, 1])? {
        0 => 0,
        1 => u.int_in_range(0..=avg.max(1))?,
        2 => avg.saturating_add(u.int_in_range(1..=5)?),
        _ => u.int_in_range(i32::MIN..=-1)?,
    };
    let beta: f32 = match pick(u, &[6, 2, 1])? {
        0 => u.int_in_range(1..=200u32)? as f32 / 4.0,
        1 => *u.choose(&[1.0, 20.0, 0.5, 0.0, -1.0, f32::NAN, f32::INFINITY, 1e30, 1.0000001])?,
        _ => f32::from_bits(u.arbitrary()?),
    };
    let n = n_layer.max(1) as usize;
    let w = weights(u, n)?;
    let null_weights = one_in(u, 16)?;
    let out_kind = pick(u, &[20, 1, 1])?; // ok, NULL, misaligned

    if out_kind != 0 {
        let mut b = Buf::new(4 * n + 8, if out_kind == 2 { u.int_in_range(1..=3)? } else { 0 });
        let before = b.all().to_vec();
        let p: *mut i32 = if out_kind == 1 {
            std::ptr::null_mut()
        } else {
            b.ptr().cast()
        };
        // SAFETY: out is NULL or misaligned: refused before anything is read.
        let st = unsafe { ckv_budget_allocate(alloc, avg, n_layer, floor, beta, w.as_ptr(), p) };
        expect_err(
            "ckv_budget_allocate",
            st,
            if out_kind == 1 {
                CKV_ERR_NULL
            } else {
                CKV_ERR_INVALID_ARG
            },
        );
        assert_eq!(b.all(), &before[..]);
        return Ok(());
    }

    let wp = if null_weights { None } else { Some(&w[..]) };
    let got = allocate_c(alloc, avg, n_layer, floor, beta, wp);
    // the expected outcome, in the order of the checks
    let f = "ckv_budget_allocate";
    let e = last_error();
    let refused = |want: i32| {
        assert!(
            got.is_none(),
            "{f}({alloc}, {avg}, {n_layer}, {floor}, {beta}) succeeded, expected {}",
            status_name(want)
        );
        assert!(e.starts_with(f));
    };
    if n_layer <= 0 || avg <= 0 || floor < 0 || !(0..=2).contains(&alloc) {
        return Ok(refused(CKV_ERR_INVALID_ARG));
    }
    let (avg_u, nl, floor_u) = (avg as usize, n_layer as usize, floor as usize);
    let a = match alloc {
        CKV_ALLOC_UNIFORM => Allocation::Uniform,
        CKV_ALLOC_PYRAMID => {
            if !(beta.is_finite() && beta >= 1.0) {
                return Ok(refused(CKV_ERR_INVALID_ARG));
            }
            Allocation::Pyramid { beta: beta as f64 }
        }
        _ => {
            if null_weights || !weights_ok(&w) || floor_u > avg_u {
                return Ok(refused(if null_weights {
                    CKV_ERR_NULL
                } else {
                    CKV_ERR_INVALID_ARG
                }));
            }
            Allocation::Weighted(w.clone())
        }
    };
    if got.is_none() && avg_u > i32::MAX as usize / 3 && alloc != CKV_ALLOC_UNIFORM {
        // a layer budget above INT32_MAX (pyramid: up to 2 * avg, weighted: up to 3 * avg) is refused
        assert!(e.contains("exceeds int32_t"), "{e}");
        return Ok(());
    }
    let b = got.unwrap_or_else(|| panic!("{f}({alloc}, {avg}, {n_layer}, {floor}, {beta}) refused: {e}"));
    let b: Vec<usize> = b
        .iter()
        .map(|&x| usize::try_from(x).expect("a negative budget"))
        .collect();
    assert_eq!(
        b.iter().sum::<usize>(),
        avg_u * nl,
        "budgets {b:?} do not sum to avg * n_layer"
    );
    if let Allocation::Weighted(_) = a {
        assert!(
            b.iter().all(|&x| x >= floor_u && x <= 3 * avg_u),
            "{b:?} outside floor {floor_u}..3*{avg_u}"
        );
    }
    // the reference adds one token at a time: only where that is quick
    if avg_u * nl <= 1 << 22 {
        let r = reference::allocate(&a, avg_u, nl, floor_u);
        tally(match a {
            Allocation::Uniform => "allocate = reference (uniform)",
            Allocation::Pyramid { .. } => "allocate = reference (pyramid)",
            _ => "allocate = reference (weighted)",
        });
        assert_eq!(
            b, r,
            "{f}({alloc}, {avg}, {n_layer}, {floor}, {beta}): library vs reference"
        );
    }
    Ok(())
}

/// A `ckv_params` as a caller with `size` bytes of it (and `size` readable bytes) passes it.
struct ParamsBuf {
    buf: Buf,
}

impl ParamsBuf {
    fn new(p: &ckv_params, size: usize, off: usize) -> ParamsBuf {
        let full = std::mem::size_of::<ckv_params>();
        let mut buf = Buf::new(size.max(full), off);
        let mut q = *p;
        q.size = size;
        // SAFETY: a ckv_params has no padding (asserted by the library), so it is plain bytes.
        let bytes = unsafe { std::slice::from_raw_parts((&q as *const ckv_params).cast::<u8>(), full) };
        buf.bytes_mut()[..full].copy_from_slice(bytes);
        ParamsBuf { buf }
    }
    fn ptr(&mut self) -> *const ckv_params {
        self.buf.ptr().cast()
    }
}

fn fit(u: &mut Unstructured<'_>) -> Result<()> {
    let mut p = ckv_params::default();
    p.method = match pick(u, &[10, 1])? {
        0 => u.int_in_range(0..=4)?,
        _ => u.arbitrary()?,
    };
    p.floor = match pick(u, &[6, 1])? {
        0 => u.int_in_range(0..=64)?,
        _ => u.int_in_range(-2..=-1)?,
    };
    p.pyramid_beta = match pick(u, &[6, 1])? {
        0 => u.int_in_range(4..=200u32)? as f32 / 4.0,
        _ => *u.choose(&[0.5, 0.0, -1.0, f32::NAN])?,
    };
    if one_in(u, 8)? {
        p.budget = u.int_in_range(-2..=0)?;
        p.ratio = *u.choose(&[0.0, 0.5, 1.0, 1.5, f32::NAN])?;
    }
    let full = std::mem::size_of::<ckv_params>();
    let size = match pick(u, &[10, 1, 1])? {
        0 => full,
        1 => u.int_in_range(0..=full - 1)?,
        _ => full + u.int_in_range(1..=64)?,
    };
    let off = if one_in(u, 4)? { u.int_in_range(1..=7)? } else { 0 };
    let n_layer: i32 = match pick(u, &[12, 1])? {
        0 => u.int_in_range(1..=40)?,
        _ => u.int_in_range(-2..=0)?,
    };
    let slots: i32 = match pick(u, &[8, 2, 1, 1])? {
        0 => u.int_in_range(1..=600)?,
        1 => u.int_in_range(601..=1 << 20)?,
        2 => *u.choose(&[i32::MAX, 1 << 30])?,
        _ => u.int_in_range(-2..=0)?,
    };
    // a profile for n_layer (or for another layer count)
    let mut prof: *mut ckv_profile = std::ptr::null_mut();
    let mut prof_layers = 0usize;
    if u.arbitrary::<bool>()? {
        prof_layers = if one_in(u, 6)? {
            u.int_in_range(1..=40)?
        } else {
            n_layer.max(1) as usize
        };
        let id = Ident {
            arch: "llama".into(),
            n_layer: prof_layers,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 32,
            fingerprint: "0123456789abcdef".into(),
        };
        prof = parse_profile(&valid_profile(u, &id)?.to_string());
        assert!(!prof.is_null(), "a valid profile was refused: {}", last_error());
    }
    let null_params = one_in(u, 24)?;
    let out_kind = pick(u, &[20, 1, 1])?;

    let mut pb = ParamsBuf::new(&p, size, off);
    let mut ob = Buf::new(4, if out_kind == 2 { u.int_in_range(1..=3)? } else { 0 });
    ob.bytes_mut().copy_from_slice(&(-77i32).to_le_bytes());
    let before = ob.all().to_vec();
    let pp = if null_params { std::ptr::null() } else { pb.ptr() };
    let op: *mut i32 = if out_kind == 1 {
        std::ptr::null_mut()
    } else {
        ob.ptr().cast()
    };
    let marker = mark_last_error();
    // SAFETY: params is NULL or readable for its size (at any alignment: read byte-wise); profile NULL or
    // live; out NULL, misaligned (refused) or one int.
    let st = unsafe { ckv_budget_fit(pp, prof, n_layer, slots, op) };
    let f = "ckv_budget_fit";

    // the fields a caller of `size` bytes passes; the others take their defaults
    let ends = [8usize, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64];
    let mut eff = ckv_params::default();
    {
        let n = ends.iter().copied().filter(|&e| e <= size).max().unwrap_or(0);
        // SAFETY: both are ckv_params (plain bytes); n <= sizeof.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&p as *const ckv_params).cast::<u8>(),
                (&mut eff as *mut ckv_params).cast::<u8>(),
                n,
            )
        };
    }
    let expect = if null_params || out_kind == 1 {
        Some(CKV_ERR_NULL)
    } else if out_kind == 2 {
        Some(CKV_ERR_INVALID_ARG)
    } else if size < 16 {
        Some(CKV_ERR_SIZE)
    } else if !(0..=4).contains(&eff.method)
        || eff.budget < 0
        || (eff.budget == 0 && !(eff.ratio > 0.0 && eff.ratio <= 1.0))
        || eff.floor < 0
        || !(eff.pyramid_beta.is_finite() && eff.pyramid_beta > 0.0)
        || n_layer <= 0
        || slots <= 0
    {
        Some(CKV_ERR_INVALID_ARG)
    } else if !prof.is_null() && prof_layers != n_layer as usize {
        Some(CKV_ERR_PROFILE)
    } else if eff.method == CKV_METHOD_PYRAMIDKV && eff.pyramid_beta < 1.0 {
        Some(CKV_ERR_INVALID_ARG)
    } else {
        None
    };
    match expect {
        Some(e) => {
            expect_err(f, st, e);
            assert_eq!(ob.all(), &before[..], "a refused ckv_budget_fit wrote *out");
        }
        None => {
            expect_ok(f, st, Some(&marker));
            let a = i32::from_le_bytes(ob.bytes().try_into().unwrap());
            tally("fit ok");
            assert!(a >= 1 && a <= slots, "fit {a} outside 1..={slots}");
            // the allocation the method uses
            let (alloc, floor, w): (i32, i32, Option<Vec<f64>>) = match (eff.method, prof.is_null()) {
                (CKV_METHOD_COMPRESSKV, false) => {
                    // SAFETY: a live handle from ckv_profile_parse.
                    let pw = unsafe { &*prof }.profile().layer_weights.clone();
                    (CKV_ALLOC_WEIGHTED, eff.floor, Some(pw))
                }
                (CKV_METHOD_PYRAMIDKV, _) => (CKV_ALLOC_PYRAMID, 0, None),
                _ => (CKV_ALLOC_UNIFORM, 0, None),
            };
            if alloc == CKV_ALLOC_UNIFORM {
                assert_eq!(a, slots, "a uniform allocation fits its slots exactly");
            }
            let max_at = |x: i32| -> i32 {
                let b = allocate_c(alloc, x, n_layer, floor.min(x), eff.pyramid_beta, w.as_deref())
                    .unwrap_or_else(|| panic!("allocation at {x} refused: {}", last_error()));
                b.into_iter().max().unwrap()
            };
            // only where ckv_budget_allocate at a + 1 stays quick
            if (a as i64 + 1) * n_layer as i64 <= 1 << 26 {
                assert!(
                    a == 1 || max_at(a) <= slots,
                    "fit {a}: max budget {} > slots {slots}",
                    max_at(a)
                );
                assert!(
                    a == slots || max_at(a + 1) > slots,
                    "fit {a} is not the largest (slots {slots})"
                );
            }
        }
    }
    // SAFETY: NULL or a live handle, freed once.
    unsafe { ckv_profile_free(prof) };
    Ok(())
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    for _ in 0..u.int_in_range(1..=4)? {
        if u.arbitrary::<bool>()? {
            allocate(u)?;
        } else {
            fit(u)?;
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    tally_input();
    let _ = run(&mut Unstructured::new(data));
});
