//! Per-layer budget allocation.
//!
//! TODO(helper B): implement with the algorithms in pseudocode up top.
//!
//! Contract (DESIGN §1.3): the result has one budget per layer, each in `[floor, cap]`
//! (clamped to `n_tokens` afterwards by the caller), summing exactly to `avg * n_layer` when feasible.
//! - Uniform: `avg` everywhere.
//! - Pyramid (PyramidKV): linear from `max = 2*avg - min` at layer 0 down to `min = avg / beta` at the
//!   last layer, repaired to the exact total.
//! - Weighted: `b_l = floor + round(p_l * (avg*L - floor*L))`, clipped to `[floor, 3*avg]`, then repaired
//!   one token at a time (add round-robin to the most important layers still below the cap; remove from
//!   the least important still above the floor) until the sum is `avg * L`.

use crate::error::Result;

/// How budgets are spread over layers.
#[derive(Debug, Clone, PartialEq)]
pub enum Allocation {
    /// Same budget for every layer.
    Uniform,
    /// PyramidKV schedule with parameter `beta` (paper default 20).
    Pyramid {
        /// min = avg / beta.
        beta: f64,
    },
    /// Error-weighted from layer weights `p_l` (non-negative, summing to 1).
    Weighted(Vec<f64>),
}

/// Per-layer budgets for an average of `avg` tokens per layer over `n_layer` layers.
pub fn allocate(alloc: &Allocation, avg: usize, n_layer: usize, floor: usize) -> Result<Vec<usize>> {
    let _ = (alloc, avg, n_layer, floor);
    unimplemented!()
}
