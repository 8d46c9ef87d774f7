//! The budget entry points: `ckv_budget_fit` (the average budget whose largest layer budget fits a number
//! of cells) and `ckv_budget_allocate` (per-layer budgets of an allocation).
//!
//! Invariants: every argument is validated before anything is written; `*out` (one value, or `n_layer`
//! values) is written only on success, and every budget written fits an `int32_t`.

use super::boundary::{check_ptr, profile_ref, put, run, slice_ref};
use super::params::{nonneg, read_params, to_params};
use super::types::*;
use crate::budget::{self, Allocation};
use crate::error::{Error, Result};

/// `ckv_budget_fit`: the average budget to ask for so that the largest layer budget of `params`' method (its
/// allocation: weighted by `profile` for CompressKV, the pyramid for PyramidKV, uniform otherwise) fits
/// `slots` cells ([`budget::fit_average`]).
///
/// # Safety
/// `params` is null or valid for reads of `params->size` bytes; `profile` is null or a live profile handle;
/// `out` is null or valid for a write of one `int32_t`.
#[no_mangle]
pub unsafe extern "C" fn ckv_budget_fit(
    params: *const ckv_params,
    profile: *const ckv_profile,
    n_layer: i32,
    slots: i32,
    out: *mut i32,
) -> ckv_status {
    run("ckv_budget_fit", || {
        if params.is_null() {
            return Err(Error::Null("params is NULL".into()));
        }
        check_ptr(out, "out")?;
        // SAFETY: non-null; the caller guarantees `params->size` readable bytes.
        let prm = to_params(&unsafe { read_params(params) }?)?;
        let prof = if profile.is_null() {
            None
        } else {
            // SAFETY: the caller guarantees a live handle when non-null.
            Some(&unsafe { profile_ref(profile) }?.profile)
        };
        let nl = usize::try_from(n_layer)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::InvalidArg(format!("n_layer: {n_layer} (expected > 0)")))?;
        let sl = usize::try_from(slots)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::InvalidArg(format!("slots: {slots} (expected > 0)")))?;
        if let Some(p) = prof {
            if p.model.n_layer != nl {
                return Err(Error::Profile(format!(
                    "profile model.n_layer {} != n_layer {nl}",
                    p.model.n_layer
                )));
            }
        }
        let (alloc, floor) = crate::plan::allocation_for(&prm, prof);
        let a = budget::fit_average(&alloc, sl, nl, floor)?;
        // SAFETY: `out` is non-null and aligned (checked) and valid for one write (caller).
        unsafe { put(out, a as i32) };
        Ok(())
    })
}

/// `ckv_budget_allocate`: per-layer budgets into `out` (`n_layer` values).
///
/// # Safety
/// `weights` is null or valid for reads of `n_layer` doubles (read only for `CKV_ALLOC_WEIGHTED`);
/// `out` is null or valid for writes of `n_layer` `int32_t`.
#[no_mangle]
pub unsafe extern "C" fn ckv_budget_allocate(
    alloc: i32,
    avg: i32,
    n_layer: i32,
    floor: i32,
    beta: f32,
    weights: *const f64,
    out: *mut i32,
) -> ckv_status {
    run("ckv_budget_allocate", || {
        check_ptr(out, "out")?;
        let nl = usize::try_from(n_layer)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::InvalidArg(format!("n_layer: {n_layer} (expected > 0)")))?;
        let avg_u = usize::try_from(avg)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::InvalidArg(format!("avg: {avg} (expected > 0)")))?;
        let floor = nonneg(floor, "floor")?;
        let a = match alloc {
            CKV_ALLOC_UNIFORM => Allocation::Uniform,
            CKV_ALLOC_PYRAMID => {
                if !(beta.is_finite() && beta > 0.0) {
                    return Err(Error::InvalidArg(format!("beta: {beta} (expected a finite value > 0)")));
                }
                Allocation::Pyramid { beta: beta as f64 }
            }
            CKV_ALLOC_WEIGHTED => {
                // SAFETY: the caller guarantees `n_layer` readable doubles when non-null.
                let w = unsafe { slice_ref(weights, nl, "weights") }?;
                if let Some(l) = w.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
                    return Err(Error::InvalidArg(format!(
                        "weights[{l}]: {} is not a finite value >= 0",
                        w[l]
                    )));
                }
                let sum: f64 = w.iter().sum();
                if (sum - 1.0).abs() > crate::profile::WEIGHT_SUM_TOLERANCE {
                    return Err(Error::InvalidArg(format!("weights: sum {sum} is not 1")));
                }
                Allocation::Weighted(w.to_vec())
            }
            _ => return Err(Error::InvalidArg(format!("alloc: {alloc} is not a ckv_alloc (0..=2)"))),
        };
        let b = budget::allocate(&a, avg_u, nl, floor)?;
        if b.len() != nl {
            return Err(Error::Panic(format!(
                "allocate returned {} budgets for {nl} layers",
                b.len()
            )));
        }
        let b: Vec<i32> = b
            .iter()
            .map(|&x| i32::try_from(x).map_err(|_| Error::InvalidArg(format!("a budget of {x} exceeds int32_t"))))
            .collect::<Result<_>>()?;
        // SAFETY: `out` is non-null and aligned (checked) and valid for `nl` writes (caller); `b` is ours.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out, nl) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::boundary::last_error;
    use std::ptr::{null, null_mut};

    #[test]
    fn budget_argument_errors() {
        let mut out = [-5i32; 4];
        let w = [0.5, 0.5, 0.5, 0.5];
        // SAFETY: valid buffers of n_layer values.
        unsafe {
            assert_eq!(
                ckv_budget_allocate(9, 64, 4, 32, 20.0, null(), out.as_mut_ptr()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("alloc"));
            assert_eq!(
                ckv_budget_allocate(0, 0, 4, 32, 20.0, null(), out.as_mut_ptr()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("avg"));
            assert_eq!(
                ckv_budget_allocate(0, 64, 0, 32, 20.0, null(), out.as_mut_ptr()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("n_layer"));
            assert_eq!(
                ckv_budget_allocate(0, 64, 4, 32, 20.0, null(), null_mut()),
                CKV_ERR_NULL
            );
            assert_eq!(
                ckv_budget_allocate(2, 64, 4, 32, 20.0, null(), out.as_mut_ptr()),
                CKV_ERR_NULL
            );
            assert!(last_error().contains("weights"));
            assert_eq!(
                ckv_budget_allocate(2, 64, 4, 32, 20.0, w.as_ptr(), out.as_mut_ptr()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("weights: sum"));
            assert_eq!(
                ckv_budget_allocate(1, 64, 4, 32, 0.0, null(), out.as_mut_ptr()),
                CKV_ERR_INVALID_ARG
            );
            assert!(last_error().contains("beta"));
        }
        assert_eq!(out, [-5; 4]);
    }
}
