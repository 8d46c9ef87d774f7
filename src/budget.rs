//! Per-layer budget allocation.
//!
//! # Algorithm
//!
//! ```text
//! allocate(alloc, avg, L, floor):                       # total T = avg * L
//!     Uniform:       b_l = avg
//!     Pyramid(beta): lo = avg / beta;  hi = 2*avg - lo
//!                    t_l = hi - l * (hi - lo) / (L - 1)         (t_0 = avg when L = 1)
//!                    b_l = round(t_l)
//!                    repair(b, bounds [0, inf), add order: by t_l - b_l descending,
//!                                               remove order: by b_l - t_l descending)
//!     Weighted(p):   b_l = floor + round(p_l * (T - floor*L)),  clipped to [floor, 3*avg]
//!                    repair(b, bounds [floor, 3*avg], add order: p descending, remove order: p ascending)
//!
//! repair(b, [lo, hi], add, remove):                     # the generic core
//!     while sum b < T: for l in add order (round-robin, from the top each lap):
//!                          if b_l < hi and sum b < T: b_l += 1
//!     while sum b > T: for l in remove order (round-robin):
//!                          if b_l > lo and sum b > T: b_l -= 1
//! ties in every order: the lower layer index first. round() rounds half away from zero.
//! ```
//!
//! Contract (docs/design.md §1.3): the result has one budget per layer (clamped to `n_tokens` afterwards by
//! the caller), summing exactly to `avg * n_layer`.
//! - Uniform: `avg` everywhere.
//! - Pyramid (PyramidKV): linear from `max = 2*avg - min` at layer 0 down to `min = avg / beta` at the
//!   last layer, repaired to the exact total (each budget ends within 1 of its real-valued target).
//!   `beta` must be finite and `>= 1` (below 1 the "pyramid" would be inverted or negative).
//! - Weighted: `b_l = floor + round(p_l * (avg*L - floor*L))`, clipped to `[floor, 3*avg]`, then repaired
//!   one token at a time (add round-robin to the most important layers still below the cap; remove from
//!   the least important still above the floor) until the sum is `avg * L`. Every budget ends in
//!   `[floor, 3*avg]`, which is always feasible because `floor <= avg`.
//! - `floor` is used by the weighted allocation only; there `floor > avg` is an error.
//! - Weights: exactly `n_layer` finite, non-negative values whose sum is within `1e-6` of 1; they are
//!   divided by their sum before use (so a profile rounded when it was written allocates as intended).
//!   Anything else is an error naming the bad value.
//! - Errors: `avg == 0`, `n_layer == 0`, `avg * n_layer` overflowing.

use crate::error::{Error, Result};

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

impl Allocation {
    /// Lower-case name ("uniform", "pyramid", "weighted").
    pub fn name(&self) -> &'static str {
        match self {
            Allocation::Uniform => "uniform",
            Allocation::Pyramid { .. } => "pyramid",
            Allocation::Weighted(_) => "weighted",
        }
    }
}

/// Tolerance on the sum of the layer weights.
pub const WEIGHT_SUM_TOL: f64 = 1e-6;

/// Per-layer budgets for an average of `avg` tokens per layer over `n_layer` layers.
pub fn allocate(alloc: &Allocation, avg: usize, n_layer: usize, floor: usize) -> Result<Vec<usize>> {
    if avg == 0 {
        return Err(Error::InvalidArg("average budget avg is 0".into()));
    }
    if n_layer == 0 {
        return Err(Error::InvalidArg("n_layer is 0".into()));
    }
    let total = avg
        .checked_mul(n_layer)
        .ok_or_else(|| Error::InvalidArg(format!("avg {avg} * n_layer {n_layer} overflows")))?;
    match alloc {
        Allocation::Uniform => Ok(vec![avg; n_layer]),
        Allocation::Pyramid { beta } => pyramid(*beta, avg, n_layer, total),
        Allocation::Weighted(p) => weighted(p, avg, n_layer, floor, total),
    }
}

fn pyramid(beta: f64, avg: usize, n_layer: usize, total: usize) -> Result<Vec<usize>> {
    if !beta.is_finite() || beta < 1.0 {
        return Err(Error::InvalidArg(format!(
            "pyramid beta {beta} must be finite and >= 1"
        )));
    }
    let lo = avg as f64 / beta;
    let hi = 2.0 * avg as f64 - lo;
    let t: Vec<f64> = (0..n_layer)
        .map(|l| {
            if n_layer == 1 {
                avg as f64
            } else {
                hi - l as f64 * (hi - lo) / (n_layer - 1) as f64
            }
        })
        .collect();
    let mut b: Vec<usize> = t.iter().map(|&x| x.round().max(0.0) as usize).collect();
    let by = |key: &dyn Fn(usize) -> f64| {
        let mut o: Vec<usize> = (0..n_layer).collect();
        o.sort_by(|&x, &y| key(y).total_cmp(&key(x)).then(x.cmp(&y)));
        o
    };
    let add = by(&|l| t[l] - b[l] as f64);
    let remove = by(&|l| b[l] as f64 - t[l]);
    repair(&mut b, total, 0, usize::MAX, &add, &remove);
    Ok(b)
}

fn weighted(p: &[f64], avg: usize, n_layer: usize, floor: usize, total: usize) -> Result<Vec<usize>> {
    if p.len() != n_layer {
        return Err(Error::InvalidArg(format!(
            "{} layer weights for n_layer {n_layer}",
            p.len()
        )));
    }
    if let Some((l, w)) = p.iter().enumerate().find(|(_, w)| !w.is_finite() || **w < 0.0) {
        return Err(Error::InvalidArg(format!(
            "layer weight p_{l} = {w} is not a finite non-negative number"
        )));
    }
    let sum: f64 = p.iter().sum();
    if (sum - 1.0).abs() > WEIGHT_SUM_TOL {
        return Err(Error::InvalidArg(format!(
            "layer weights sum to {sum}, not 1 (tolerance {WEIGHT_SUM_TOL})"
        )));
    }
    if floor > avg {
        return Err(Error::InvalidArg(format!(
            "budget floor {floor} > average budget {avg}"
        )));
    }
    let cap = avg
        .checked_mul(3)
        .ok_or_else(|| Error::InvalidArg(format!("3 * avg {avg} overflows")))?;
    let spread = (total - floor * n_layer) as f64;
    let mut b: Vec<usize> = p
        .iter()
        .map(|&w| (floor + (w / sum * spread).round() as usize).clamp(floor, cap))
        .collect();
    let mut add: Vec<usize> = (0..n_layer).collect();
    add.sort_by(|&x, &y| p[y].total_cmp(&p[x]).then(x.cmp(&y)));
    let mut remove: Vec<usize> = (0..n_layer).collect();
    remove.sort_by(|&x, &y| p[x].total_cmp(&p[y]).then(x.cmp(&y)));
    repair(&mut b, total, floor, cap, &add, &remove);
    Ok(b)
}

/// The generic core: move `b` to the sum `total`, keeping every value in `[lo, hi]`, one token per layer and
/// lap, adding round-robin in `add` order or removing round-robin in `remove` order (each a permutation of
/// the layers). The caller guarantees `lo * n <= total <= hi * n` (so every lap moves at least one token).
///
/// Whole laps (every layer that can still move gets one token) are taken together, as many as fit before
/// the remainder drops below one lap or a layer reaches its bound, so the time does not grow with the
/// budget (a profile that gives one layer everything otherwise takes `avg` laps); the last, partial lap
/// goes one token at a time in order. The result is that of the one-token-at-a-time loop.
fn repair(b: &mut [usize], total: usize, lo: usize, hi: usize, add: &[usize], remove: &[usize]) {
    let mut sum: usize = b.iter().sum();
    while sum < total {
        let open = add.iter().filter(|&&l| b[l] < hi);
        let (m, room) = (open.clone().count(), open.map(|&l| hi - b[l]).min().unwrap_or(0));
        if m == 0 {
            break; // unreachable: total <= hi * n
        }
        let laps = ((total - sum) / m).min(room);
        for &l in add {
            if laps > 0 && b[l] < hi {
                b[l] += laps;
            } else if laps == 0 && sum < total && b[l] < hi {
                b[l] += 1;
                sum += 1;
            }
        }
        sum += laps * m;
    }
    while sum > total {
        let open = remove.iter().filter(|&&l| b[l] > lo);
        let (m, room) = (open.clone().count(), open.map(|&l| b[l] - lo).min().unwrap_or(0));
        if m == 0 {
            break; // unreachable: lo * n <= total
        }
        let laps = ((sum - total) / m).min(room);
        for &l in remove {
            if laps > 0 && b[l] > lo {
                b[l] -= laps;
            } else if laps == 0 && sum > total && b[l] > lo {
                b[l] -= 1;
                sum -= 1;
            }
        }
        sum -= laps * m;
    }
}

/// The average budget whose largest layer budget fits `slots` cells: `slots` itself when it fits, else the
/// largest `a` in `[1, slots)` found by bisection with `max(allocate(alloc, a, n_layer, min(floor, a))) <=
/// slots` (1 when none does).
///
/// In a cache whose layers share cells (llama.cpp), memory follows the largest layer budget, so this is the
/// average to ask for when `slots` is the memory one can spend. Uniform budgets fit exactly (`a == slots`).
pub fn fit_average(alloc: &Allocation, slots: usize, n_layer: usize, floor: usize) -> Result<usize> {
    if slots == 0 {
        return Err(Error::InvalidArg("slots is 0".into()));
    }
    let max_at = |a: usize| -> Result<usize> {
        Ok(allocate(alloc, a, n_layer, floor.min(a))?
            .into_iter()
            .max()
            .unwrap_or(0))
    };
    if max_at(slots)? <= slots {
        return Ok(slots);
    }
    // invariant: max_at(hi) > slots; lo == 1 or max_at(lo) <= slots
    let (mut lo, mut hi) = (1, slots);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if max_at(mid)? <= slots {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform() {
        assert_eq!(allocate(&Allocation::Uniform, 7, 3, 100).unwrap(), vec![7, 7, 7]);
    }

    #[test]
    fn pyramid_hand_worked() {
        // avg 100, beta 20: lo 5, hi 195; 3 layers: 195, 100, 5
        assert_eq!(
            allocate(&Allocation::Pyramid { beta: 20.0 }, 100, 3, 0).unwrap(),
            vec![195, 100, 5]
        );
        // avg 10, beta 4: lo 2.5, hi 17.5; 2 layers: 17.5 -> 18, 2.5 -> 3 (sum 21): remove from the
        // layer rounded up the most (equal: the lower index)
        assert_eq!(
            allocate(&Allocation::Pyramid { beta: 4.0 }, 10, 2, 0).unwrap(),
            vec![17, 3]
        );
        // beta 1: flat
        assert_eq!(
            allocate(&Allocation::Pyramid { beta: 1.0 }, 9, 4, 0).unwrap(),
            vec![9; 4]
        );
        assert_eq!(allocate(&Allocation::Pyramid { beta: 20.0 }, 9, 1, 0).unwrap(), vec![9]);
        for avg in 1..40 {
            for l in 1..12 {
                let b = allocate(&Allocation::Pyramid { beta: 7.0 }, avg, l, 0).unwrap();
                assert_eq!(b.iter().sum::<usize>(), avg * l);
                assert!(b.windows(2).all(|w| w[0] + 1 >= w[1]), "{b:?}");
            }
        }
    }

    #[test]
    fn weighted_hand_worked() {
        // avg 100, 2 layers, floor 32: spread 136; 0.75 -> 32 + 102 = 134, 0.25 -> 32 + 34 = 66
        let w = Allocation::Weighted(vec![0.75, 0.25]);
        assert_eq!(allocate(&w, 100, 2, 32).unwrap(), vec![134, 66]);
        // everything on one layer: 32 + 136 = 168 (cap 300), 32
        let w = Allocation::Weighted(vec![1.0, 0.0]);
        assert_eq!(allocate(&w, 100, 2, 32).unwrap(), vec![168, 32]);
        // cap: 4 layers avg 10 floor 0, all weight on layer 2: 40 -> cap 30, deficit 10 added
        // round-robin by importance (layer 2 is full, then layers 0, 1, 3 by index)
        let w = Allocation::Weighted(vec![0.0, 0.0, 1.0, 0.0]);
        assert_eq!(allocate(&w, 10, 4, 0).unwrap(), vec![4, 3, 30, 3]);
        // rounding down: 1.35, 1.35, 0.3 -> 1, 1, 0 (sum 2 < 3): add to the most important (tie: lower index)
        let w = Allocation::Weighted(vec![0.45, 0.45, 0.1]);
        assert_eq!(allocate(&w, 1, 3, 0).unwrap(), vec![2, 1, 0]);
        // rounding up: 1.5, 1.5, 0 -> 2, 2, 0 (sum 4 > 3): remove from the least important above the floor
        let w = Allocation::Weighted(vec![0.5, 0.5, 0.0]);
        assert_eq!(allocate(&w, 1, 3, 0).unwrap(), vec![1, 2, 0]);
        let w = Allocation::Weighted(vec![0.25, 0.25, 0.25, 0.25]);
        assert_eq!(allocate(&w, 3, 4, 2).unwrap(), vec![3, 3, 3, 3]);
    }

    #[test]
    fn weighted_bounds_and_total() {
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        for l in 1..20 {
            for avg in [1, 2, 5, 32, 33, 100, 1000] {
                let mut p: Vec<f64> = (0..l).map(|_| next().powi(4)).collect();
                let s: f64 = p.iter().sum();
                p.iter_mut().for_each(|x| *x /= s);
                let floor = (avg as f64 * next()) as usize;
                let b = allocate(&Allocation::Weighted(p), avg, l, floor).unwrap();
                assert_eq!(b.iter().sum::<usize>(), avg * l);
                assert!(b.iter().all(|&x| x >= floor && x <= 3 * avg), "{b:?}");
            }
        }
    }

    #[test]
    fn errors() {
        let e = |r: Result<Vec<usize>>| r.unwrap_err().to_string();
        assert!(e(allocate(&Allocation::Uniform, 0, 3, 0)).contains("avg is 0"));
        assert!(e(allocate(&Allocation::Uniform, 3, 0, 0)).contains("n_layer is 0"));
        assert!(e(allocate(&Allocation::Uniform, usize::MAX, 2, 0)).contains("overflows"));
        assert!(e(allocate(&Allocation::Pyramid { beta: 0.5 }, 3, 2, 0)).contains("beta 0.5"));
        assert!(e(allocate(&Allocation::Pyramid { beta: f64::NAN }, 3, 2, 0)).contains("beta NaN"));
        assert!(e(allocate(&Allocation::Weighted(vec![1.0]), 3, 2, 0)).contains("1 layer weights for n_layer 2"));
        assert!(e(allocate(&Allocation::Weighted(vec![1.5, -0.5]), 3, 2, 0)).contains("p_1 = -0.5"));
        assert!(e(allocate(&Allocation::Weighted(vec![0.5, f64::INFINITY]), 3, 2, 0)).contains("p_1 = inf"));
        assert!(e(allocate(&Allocation::Weighted(vec![0.5, 0.4]), 3, 2, 0)).contains("sum to 0.9"));
        assert!(e(allocate(&Allocation::Weighted(vec![0.5, 0.5]), 3, 2, 4)).contains("floor 4 > average budget 3"));
        // within tolerance: normalised
        let w = Allocation::Weighted(vec![0.5 + 4e-7, 0.5]);
        assert_eq!(allocate(&w, 10, 2, 0).unwrap().iter().sum::<usize>(), 20);
    }

    /// The one-token-at-a-time loop `repair` must agree with.
    fn repair_slow(b: &mut [usize], total: usize, lo: usize, hi: usize, add: &[usize], remove: &[usize]) {
        let mut sum: usize = b.iter().sum();
        while sum < total {
            for &l in add {
                if sum < total && b[l] < hi {
                    b[l] += 1;
                    sum += 1;
                }
            }
        }
        while sum > total {
            for &l in remove {
                if sum > total && b[l] > lo {
                    b[l] -= 1;
                    sum -= 1;
                }
            }
        }
    }

    #[test]
    fn repair_equals_one_token_at_a_time() {
        let mut seed = 99u64;
        let mut next = |n: usize| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) % n as u64) as usize
        };
        for _ in 0..3000 {
            let n = 1 + next(9);
            let lo = next(5);
            let hi = lo + next(40);
            let b0: Vec<usize> = (0..n).map(|_| lo + next(hi - lo + 1)).collect();
            let total = n * lo + next(n * (hi - lo) + 1);
            let mut add: Vec<usize> = (0..n).collect();
            let mut remove: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                add.swap(i, next(i + 1));
                remove.swap(i, next(i + 1));
            }
            let (mut fast, mut slow) = (b0.clone(), b0.clone());
            repair(&mut fast, total, lo, hi, &add, &remove);
            repair_slow(&mut slow, total, lo, hi, &add, &remove);
            assert_eq!(
                fast, slow,
                "b {b0:?} total {total} lo {lo} hi {hi} add {add:?} remove {remove:?}"
            );
        }
    }

    /// Found by fuzzing (fuzz/ target `budget`): a profile that gives one layer all the weight, with a large
    /// average, took `avg` laps of one token per layer (minutes for avg near INT32_MAX, in ckv_budget_allocate,
    /// ckv_budget_fit and ckv_plan_create).
    #[test]
    fn weighted_large_average_is_quick() {
        let avg = i32::MAX as usize;
        let mut w = vec![0.0; 8];
        w[0] = 1.0;
        let b = allocate(&Allocation::Weighted(w.clone()), avg, 8, 0).unwrap();
        assert_eq!(b.iter().sum::<usize>(), avg * 8);
        assert_eq!(b[0], 3 * avg);
        assert!(b[1..].iter().all(|&x| x.abs_diff(5 * avg / 7) <= 1), "{b:?}");
        let b = allocate(&Allocation::Weighted(w), avg, 8, avg / 2).unwrap();
        assert_eq!(b.iter().sum::<usize>(), avg * 8);
        let peaked: Vec<f64> = (0..30).map(|l| if l == 7 { 0.5 } else { 0.5 / 29.0 }).collect();
        let a = fit_average(&Allocation::Weighted(peaked), i32::MAX as usize, 30, 32).unwrap();
        assert!(a >= 1 && a < i32::MAX as usize);
    }

    #[test]
    fn fit_average_fits_the_slots() {
        assert_eq!(fit_average(&Allocation::Uniform, 256, 30, 32).unwrap(), 256);
        let peaked: Vec<f64> = (0..30).map(|l| if l == 7 { 0.11 } else { 0.89 / 29.0 }).collect();
        for alloc in [Allocation::Pyramid { beta: 20.0 }, Allocation::Weighted(peaked)] {
            for slots in [1, 2, 5, 64, 128, 256, 512, 4096] {
                let a = fit_average(&alloc, slots, 30, 32).unwrap();
                let max_at = |a: usize| allocate(&alloc, a, 30, 32.min(a)).unwrap().into_iter().max().unwrap();
                assert!(a >= 1 && a <= slots);
                assert!(
                    a == 1 || max_at(a) <= slots,
                    "{alloc:?} slots {slots}: a {a} max {}",
                    max_at(a)
                );
                assert!(
                    a == slots || max_at(a + 1) > slots,
                    "{alloc:?} slots {slots}: a {a} is not the largest"
                );
            }
        }
        // the pyramid's largest layer holds about 2x the average
        let a = fit_average(&Allocation::Pyramid { beta: 20.0 }, 512, 30, 0).unwrap();
        assert!((255..=265).contains(&a), "{a}");
        assert!(fit_average(&Allocation::Uniform, 0, 30, 32).is_err());
    }
}
