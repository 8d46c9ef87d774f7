//! Gather indices for moving the kept cells of one layer tensor on a device: the index pairs of a
//! `get_rows` / `set_rows` pair over *units* of the tensor, split into blocks whose indices fit `i32`
//! (ggml's `get_rows` takes only `i32` indices).
//!
//! ```text
//! units of a tensor of stream s (kv_size cells per stream):
//!     rows (K, V with flash attention):  unit(c, g) = (s*kv_size + c)*n_groups + g   # group g's slice of cell c
//!     transposed V (one row per channel): unit(c, e) = (s*n_embd + e)*kv_size + c    # element e of cell c
//! blocks(moves of each group, unit kind, kv_size, s, max_units):
//!     rows:       one block: the stream's kv_size*n_groups units (refused past max_units)
//!     transposed: blocks of whole channels [e0, e1), (e1 - e0)*kv_size <= max_units
//!     every block: base = its first unit; for each unit it covers, in order, for each kept cell j of the
//!         channel's (or slice's) group: the pair (unit(src[j]) - base, unit(dst[j]) - base)
//! ```
//!
//! Invariants: a block's indices lie in `[0, span)` with `span <= max_units <= i32::MAX + 1`; a move's source
//! and destination always fall in the same block (they share a group slice or a channel); the pairs of all
//! blocks together are exactly the moves of every group, each once; all arithmetic is `i64`, checked.

use crate::error::{Error, Result};

/// What a unit of the tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Units {
    /// One group's slice of a cell's row (K, or V with flash attention): `n_groups` units per cell.
    Rows {
        /// Groups per layer (1, or `n_head_kv` with per-head selection).
        n_groups: usize,
    },
    /// One element of a transposed V: `n_embd` channels of `kv_size` cells; group `g` holds channels
    /// `[g*n_embd/n_groups, (g+1)*n_embd/n_groups)`.
    Transposed {
        /// Channels of the tensor.
        n_embd: usize,
        /// Groups per layer.
        n_groups: usize,
    },
}

/// One `get_rows` / `set_rows` pair over the units `[base, base + span)` of the tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// First unit of the block.
    pub base: i64,
    /// Units it covers.
    pub span: i64,
    /// Source units, relative to `base`.
    pub src: Vec<i32>,
    /// Destination units, relative to `base`.
    pub dst: Vec<i32>,
}

/// The blocks that move `moves[g] = (src cells, dst cells)` of every group of one tensor of stream `strm`.
pub fn blocks(
    moves: &[(&[u32], &[u32])],
    units: Units,
    kv_size: usize,
    strm: usize,
    max_units: i64,
) -> Result<Vec<Block>> {
    let too_big = |what: String| Error::Size(format!("{what} exceed the {max_units} units an index block may span"));
    if !(1..=i32::MAX as i64 + 1).contains(&max_units) {
        return Err(Error::InvalidArg(format!("max_units {max_units} is not in 1..=2^31")));
    }
    let n_groups = match units {
        Units::Rows { n_groups } | Units::Transposed { n_groups, .. } => n_groups,
    };
    if n_groups == 0 || moves.len() != n_groups {
        return Err(Error::InvalidArg(format!(
            "{} groups of moves for {n_groups} groups",
            moves.len()
        )));
    }
    for (g, (s, d)) in moves.iter().enumerate() {
        if s.len() != d.len() || s.iter().chain(d.iter()).any(|&c| c as usize >= kv_size) {
            return Err(Error::InvalidArg(format!(
                "group {g}: moves out of the {kv_size} cells or unpaired"
            )));
        }
    }
    let (kv, ng, s) = (kv_size as i64, n_groups as i64, strm as i64);
    match units {
        Units::Rows { .. } => {
            let span = kv
                .checked_mul(ng)
                .ok_or_else(|| Error::Size("kv_size * n_groups overflows".into()))?;
            if span > max_units {
                return Err(too_big(format!("{kv_size} cells x {n_groups} groups")));
            }
            let mut b = Block {
                base: s * span,
                span,
                src: Vec::new(),
                dst: Vec::new(),
            };
            for (g, (src, dst)) in moves.iter().enumerate() {
                b.src.extend(src.iter().map(|&c| (c as i64 * ng + g as i64) as i32));
                b.dst.extend(dst.iter().map(|&c| (c as i64 * ng + g as i64) as i32));
            }
            Ok(if b.src.is_empty() { Vec::new() } else { vec![b] })
        }
        Units::Transposed { n_embd, .. } => {
            if n_embd % n_groups != 0 {
                return Err(Error::InvalidArg(format!("{n_embd} channels in {n_groups} groups")));
            }
            if kv > max_units {
                return Err(too_big(format!("{kv_size} cells of one channel")));
            }
            let per_group = n_embd / n_groups;
            let per_block = (max_units / kv) as usize; // whole channels per block, >= 1
            let mut out = Vec::new();
            for e0 in (0..n_embd).step_by(per_block) {
                let e1 = (e0 + per_block).min(n_embd);
                let base = (s * n_embd as i64 + e0 as i64)
                    .checked_mul(kv)
                    .ok_or_else(|| Error::Size("unit offset overflows i64".into()))?;
                let mut b = Block {
                    base,
                    span: (e1 - e0) as i64 * kv,
                    src: Vec::new(),
                    dst: Vec::new(),
                };
                for e in e0..e1 {
                    let (src, dst) = moves[e / per_group];
                    let row = (e - e0) as i64 * kv;
                    b.src.extend(src.iter().map(|&c| (row + c as i64) as i32));
                    b.dst.extend(dst.iter().map(|&c| (row + c as i64) as i32));
                }
                if !b.src.is_empty() {
                    out.push(b);
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (src unit, dst unit) pair, absolute, from the blocks.
    fn pairs(bs: &[Block]) -> Vec<(i64, i64)> {
        let mut p: Vec<_> = bs
            .iter()
            .flat_map(|b| {
                b.src
                    .iter()
                    .zip(&b.dst)
                    .map(move |(&s, &d)| (b.base + s as i64, b.base + d as i64))
            })
            .collect();
        p.sort_unstable();
        p
    }

    /// The reference: every move of every group in every unit it touches, by the unit formulas.
    fn naive(moves: &[(&[u32], &[u32])], units: Units, kv: i64, s: i64) -> Vec<(i64, i64)> {
        let mut p = Vec::new();
        match units {
            Units::Rows { n_groups } => {
                for (g, (src, dst)) in moves.iter().enumerate() {
                    for (&a, &b) in src.iter().zip(dst.iter()) {
                        let u = |c: u32| (s * kv + c as i64) * n_groups as i64 + g as i64;
                        p.push((u(a), u(b)));
                    }
                }
            }
            Units::Transposed { n_embd, n_groups } => {
                for e in 0..n_embd {
                    let (src, dst) = moves[e / (n_embd / n_groups)];
                    for (&a, &b) in src.iter().zip(dst.iter()) {
                        let u = |c: u32| (s * n_embd as i64 + e as i64) * kv + c as i64;
                        p.push((u(a), u(b)));
                    }
                }
            }
        }
        p.sort_unstable();
        p
    }

    fn check(moves: &[(&[u32], &[u32])], units: Units, kv: usize, s: usize, max: i64) {
        let bs = blocks(moves, units, kv, s, max).unwrap();
        for b in &bs {
            assert!(b.span <= max && b.span > 0);
            assert!(
                b.src.iter().chain(&b.dst).all(|&i| i >= 0 && (i as i64) < b.span),
                "{b:?}"
            );
        }
        assert_eq!(pairs(&bs), naive(moves, units, kv as i64, s as i64));
    }

    #[test]
    fn blocks_match_the_unit_formulas() {
        let (s0, d0): (&[u32], &[u32]) = (&[3, 7, 9], &[0, 1, 2]);
        let (s1, d1): (&[u32], &[u32]) = (&[5, 9], &[0, 1]);
        for strm in [0, 2] {
            check(&[(s0, d0)], Units::Rows { n_groups: 1 }, 10, strm, i32::MAX as i64);
            check(&[(s0, d0), (s1, d1)], Units::Rows { n_groups: 2 }, 10, strm, 20);
            check(
                &[(s0, d0)],
                Units::Transposed { n_embd: 8, n_groups: 1 },
                10,
                strm,
                1 << 31,
            );
            // one channel per block, then three
            check(
                &[(s0, d0), (s1, d1)],
                Units::Transposed { n_embd: 8, n_groups: 2 },
                10,
                strm,
                10,
            );
            check(
                &[(s0, d0), (s1, d1)],
                Units::Transposed { n_embd: 8, n_groups: 2 },
                10,
                strm,
                35,
            );
        }
        let bs = blocks(&[(s0, d0)], Units::Transposed { n_embd: 8, n_groups: 1 }, 10, 1, 35).unwrap();
        assert_eq!(bs.iter().map(|b| b.span).collect::<Vec<_>>(), [30, 30, 20]);
        assert_eq!(bs[0].base, 80);
    }

    #[test]
    fn large_transposed_v_splits_into_i32_blocks() {
        // 4096 channels x 512K cells: 2^31 elements, past what one i32-indexed gather addresses
        let (n_embd, kv) = (4096usize, 1usize << 19);
        let src: Vec<u32> = vec![17, 100_000, kv as u32 - 1];
        let dst: Vec<u32> = vec![0, 1, 2];
        let units = Units::Transposed { n_embd, n_groups: 1 };
        for strm in [0, 3] {
            // at most 2^31 units: all 4096 channels in one block, indices up to 2^31 - 1
            let bs = blocks(&[(&src, &dst)], units, kv, strm, i32::MAX as i64 + 1).unwrap();
            assert_eq!(bs.len(), 1);
            check(&[(&src, &dst)], units, kv, strm, i32::MAX as i64 + 1);
            let bs = blocks(&[(&src, &dst)], units, kv, strm, i32::MAX as i64).unwrap();
            assert_eq!(bs.len(), 2, "2^31 - 1 units hold 4095 channels");
            assert_eq!(bs[1].base, (strm as i64 * 4096 + 4095) * kv as i64);
            check(&[(&src, &dst)], units, kv, strm, i32::MAX as i64);
        }
    }

    #[test]
    fn refusals() {
        let (s, d): (&[u32], &[u32]) = (&[3], &[0]);
        let rows = Units::Rows { n_groups: 1 };
        assert!(blocks(&[(s, d)], rows, 10, 0, 0).is_err());
        assert!(blocks(&[(s, d)], rows, 10, 0, 1 << 32).is_err());
        assert!(blocks(&[(s, d)], rows, 3, 0, 100).is_err(), "cell 3 of 3");
        assert!(blocks(&[(s, &[])], rows, 10, 0, 100).is_err(), "unpaired");
        assert!(
            blocks(&[(s, d)], Units::Rows { n_groups: 2 }, 10, 0, 100).is_err(),
            "1 group of moves for 2"
        );
        assert!(blocks(&[(s, d)], rows, 10, 0, 9).is_err(), "10 cells in 9 units");
        assert!(blocks(&[(s, d)], Units::Transposed { n_embd: 8, n_groups: 1 }, 10, 0, 9).is_err());
        assert!(blocks(
            &[(s, d), (s, d)],
            Units::Transposed { n_embd: 9, n_groups: 2 },
            10,
            0,
            100
        )
        .is_err());
        assert!(blocks(&[(&[], &[])], rows, 10, 0, 100).unwrap().is_empty());
    }
}
