//! `ckv_plan_gather`: the `int32_t` index blocks of the device gather that moves a plan's kept cells in one
//! layer tensor ([`crate::gather`]), for callers that move cells with `get_rows` / `set_rows` graphs.
//!
//! Invariants: the call is made twice, first with no output arrays for the sizes (`*n_blocks`, `*n_pairs`),
//! then with arrays at least that large; it validates everything and writes nothing on error; every index it
//! writes lies in `[0, span)` of its block, and `span <= max_units`.

use super::boundary::{check_ptr, plan_ref, put, run};
use super::params::nonneg;
use super::types::*;
use crate::error::{Error, Result};
use crate::gather::{blocks, Units};

/// Mirror of `ckv_gather_block`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ckv_gather_block {
    /// First unit of the block in the tensor.
    pub base: i64,
    /// Units the block covers (the view of the gather).
    pub span: i64,
    /// Its first pair in the caller's `src` / `dst` arrays.
    pub first: i64,
    /// Its pairs.
    pub n: i32,
    /// Zero.
    pub reserved: i32,
}

fn positive(v: i64, what: &str) -> Result<usize> {
    usize::try_from(v)
        .ok()
        .filter(|&x| x > 0)
        .ok_or_else(|| Error::InvalidArg(format!("{what} {v} (expected > 0)")))
}

/// `ckv_plan_gather`: the gather of layer `il` in one tensor of stream `strm` (`transposed`: V with one row
/// per channel of `n_embd` channels; else rows of `ckv_plan_n_groups` units per cell), in blocks of at most
/// `max_units` units.
///
/// # Safety
/// `plan` is null or a live handle; `blocks_out` null or valid for `cap_blocks` writes; `src` and `dst` null
/// or valid for `cap_pairs` writes each; `n_blocks` and `n_pairs` null or valid for one write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ckv_plan_gather(
    plan: *const ckv_plan,
    il: i32,
    transposed: i32,
    n_embd: i64,
    kv_size: i64,
    strm: i32,
    max_units: i64,
    blocks_out: *mut ckv_gather_block,
    cap_blocks: i32,
    src: *mut i32,
    dst: *mut i32,
    cap_pairs: i64,
    n_blocks: *mut i32,
    n_pairs: *mut i64,
) -> ckv_status {
    run("ckv_plan_gather", || {
        // SAFETY: null or a live handle (caller).
        let h = unsafe { plan_ref(plan) }?;
        let layer = usize::try_from(il)
            .ok()
            .and_then(|l| h.plan.layers.get(l))
            .ok_or_else(|| Error::InvalidArg(format!("layer il {il} is not in 0..{}", h.plan.layers.len())))?;
        let n_groups = layer.groups.len();
        let units = match transposed {
            0 => Units::Rows { n_groups },
            1 => Units::Transposed {
                n_embd: positive(n_embd, "n_embd")?,
                n_groups,
            },
            t => return Err(Error::InvalidArg(format!("transposed {t} is not 0 or 1"))),
        };
        let moves: Vec<(&[u32], &[u32])> = layer.groups.iter().map(|g| (&g.src[..], &g.dst[..])).collect();
        let bs = blocks(
            &moves,
            units,
            positive(kv_size, "kv_size")?,
            nonneg(strm, "strm")?,
            max_units,
        )?;
        let total: usize = bs.iter().map(|b| b.src.len()).sum();
        check_ptr(n_blocks, "n_blocks")?;
        check_ptr(n_pairs, "n_pairs")?;
        let sizing = blocks_out.is_null() && src.is_null() && dst.is_null();
        if !sizing {
            for (p, what) in [(src, "src"), (dst, "dst")] {
                check_ptr(p, what)?;
            }
            check_ptr(blocks_out, "blocks")?;
            if nonneg(cap_blocks, "cap_blocks")? < bs.len() || usize::try_from(cap_pairs).map_or(true, |c| c < total) {
                return Err(Error::Size(format!(
                    "cap_blocks {cap_blocks} / cap_pairs {cap_pairs} < {} blocks / {total} pairs",
                    bs.len()
                )));
            }
            let mut first = 0usize;
            for (i, b) in bs.iter().enumerate() {
                let n = b.src.len();
                // SAFETY: the arrays hold at least `bs.len()` blocks and `total` pairs (caller, checked above),
                // and `first + n <= total`, `i < bs.len()`.
                unsafe {
                    blocks_out.add(i).write(ckv_gather_block {
                        base: b.base,
                        span: b.span,
                        first: first as i64,
                        n: n as i32,
                        reserved: 0,
                    });
                    std::ptr::copy_nonoverlapping(b.src.as_ptr(), src.add(first), n);
                    std::ptr::copy_nonoverlapping(b.dst.as_ptr(), dst.add(first), n);
                }
                first += n;
            }
        }
        // SAFETY: both non-null and aligned (checked), writable (caller).
        unsafe {
            put(n_blocks, bs.len() as i32);
            put(n_pairs, total as i64);
        }
        Ok(())
    })
}
