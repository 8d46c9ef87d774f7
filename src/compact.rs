//! Block-exact, in-place compaction of host KV buffers.
//!
//! # Contract
//!
//! - A [`Moves`] lists pairs `src[j] -> dst[j]` of cells and the element range (a head slice, or all of
//!   `n_embd`) they apply to. Destinations are distinct; sources are distinct.
//! - [`validate`] checks every index and the element range against the geometry (non-empty, inside
//!   `0..n_embd`, block-aligned for quantized rows) and writes nothing; [`apply`] validates first, then moves bytes: for every
//!   element `e` in the range, cell `dst[j]` gets exactly the bytes cell `src[j]` had *before the call*
//!   (sources are read before any destination is written, via a scratch of `len(src) * slice bytes`,
//!   or directly when an order exists in which no move reads a cell an earlier move wrote).
//! - Rows: whole blocks are copied; transposed: one element per channel per move. No conversion.
//! - Bytes outside the destinations' element ranges are never written; on error nothing is written.
//!
//! # Algorithm
//!
//! ```text
//! validate(geom, moves):
//!     geom.validate()
//!     require len(src) == len(dst)
//!     require elems.start < elems.end <= n_embd
//!     if Rows and ty is quantized: require elems.start, elems.end multiples of 32
//!     seen_src, seen_dst = empty bitsets of n_cells bits
//!     for j: require src[j] < n_cells, dst[j] < n_cells, neither seen before; mark both
//!
//! apply(view, moves):
//!     validate(view.geom, moves)
//!     pairs = [(s, d) for (s, d) in zip(src, dst) if s != d]    # identity moves are no-ops
//!     order = Forward   if no pair reads a cell that an earlier pair writes (one bitset pass)
//!           | Backward  if no pair reads a cell that a later pair writes
//!           | Scratch   otherwise                                # e.g. a permutation with cycles
//!     # compaction to the front (dst = the k lowest cells, src ascending) is always Forward
//!     Rows:   slice(c) = bytes [c*row_stride + off, + len), off/len = elems in whole blocks
//!         Forward/Backward: for (s, d) in pairs, in that order: slice(d) <- slice(s)
//!         Scratch:          scratch = concat(slice(s) for s); slice(d_j) <- scratch[j]
//!     Transposed: for each channel ch in elems (channel-major, one contiguous row of n_cells
//!         elements at ch*chan_stride at a time): same as Rows with slice(c) = element c of the row,
//!         the scratch (len(pairs) elements) reused across channels
//! ```
//!
//! Both direct orders are equivalent to gather-then-scatter: in Forward order, pair `j` reads `s_j`
//! before any pair `i > j` writes, and no pair `i < j` wrote `s_j` (checked), so it reads the
//! original bytes; rows of distinct cells never overlap (`row_stride >= row bytes`), nor do elements.
//!
//! Only safe slicing is used; indices are checked once by [`validate`], so the copy loops cannot
//! panic after validation.

use crate::error::{Error, Result};
use crate::layout::{Geometry, LayerViewMut, Layout};

/// Cell moves of one layer (or one KV head of it).
#[derive(Debug, Clone)]
pub struct Moves<'a> {
    /// Source cells.
    pub src: &'a [u32],
    /// Destination cells (same length).
    pub dst: &'a [u32],
    /// Element range of each cell that moves (`0..n_embd` for whole cells, a head's slice otherwise).
    pub elems: std::ops::Range<usize>,
}

/// A fixed-size bitset over cell indices.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }

    /// Set bit `i`; returns whether it was already set.
    #[inline]
    fn test_and_set(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        let was = self.0[w] & b != 0;
        self.0[w] |= b;
        was
    }

    #[inline]
    fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1u64 << (i % 64)) != 0
    }
}

/// Check `moves` against `geom` without touching any buffer.
///
/// Errors ([`Error::InvalidArg`]): `src`/`dst` lengths differ; a cell `>= n_cells`; a repeated source or
/// destination; an empty element range or one past `n_embd`; for quantized rows, a range whose ends are
/// not multiples of the block size. An invalid `geom` gives its own [`Geometry::validate`] error.
pub fn validate(geom: &Geometry, moves: &Moves<'_>) -> Result<()> {
    geom.validate()?;
    if moves.src.len() != moves.dst.len() {
        return Err(Error::InvalidArg(format!(
            "{} source cells but {} destination cells",
            moves.src.len(),
            moves.dst.len()
        )));
    }
    let r = &moves.elems;
    if r.start >= r.end || r.end > geom.n_embd {
        return Err(Error::InvalidArg(format!(
            "element range {}..{} is empty or outside 0..{}",
            r.start, r.end, geom.n_embd
        )));
    }
    if matches!(geom.layout, Layout::Rows { .. }) {
        let be = geom.ty.block_elems();
        if r.start % be != 0 || r.end % be != 0 {
            return Err(Error::InvalidArg(format!(
                "element range {}..{} is not aligned to {} blocks of {} elements",
                r.start,
                r.end,
                geom.ty.name(),
                be
            )));
        }
    }
    let n = geom.n_cells;
    let mut seen_src = Bits::new(n);
    let mut seen_dst = Bits::new(n);
    for (j, (&s, &d)) in moves.src.iter().zip(moves.dst).enumerate() {
        let (s, d) = (s as usize, d as usize);
        if s >= n || d >= n {
            return Err(Error::InvalidArg(format!(
                "move {j}: cell {s} -> {d} outside the {n} cells of the buffer"
            )));
        }
        if seen_src.test_and_set(s) {
            return Err(Error::InvalidArg(format!("move {j}: source cell {s} appears twice")));
        }
        if seen_dst.test_and_set(d) {
            return Err(Error::InvalidArg(format!(
                "move {j}: destination cell {d} appears twice"
            )));
        }
    }
    Ok(())
}

/// Validate, then apply `moves` to `view` in place.
pub fn apply(view: &mut LayerViewMut<'_>, moves: &Moves<'_>) -> Result<()> {
    validate(view.geometry(), moves)?;
    apply_validated(view, moves);
    Ok(())
}

/// In which order the (non-identity) pairs can be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// In list order, reading each source directly.
    Forward,
    /// In reverse list order, reading each source directly.
    Backward,
    /// Gather all sources into a scratch first.
    Scratch,
}

/// True when applying `pairs` in the order given never reads a cell an earlier pair wrote.
fn direct_ok<'p>(n_cells: usize, pairs: impl Iterator<Item = &'p (usize, usize)>) -> bool {
    let mut written = Bits::new(n_cells);
    for &(s, d) in pairs {
        if written.get(s) {
            return false;
        }
        written.test_and_set(d);
    }
    true
}

fn choose_order(n_cells: usize, pairs: &[(usize, usize)]) -> Order {
    if direct_ok(n_cells, pairs.iter()) {
        Order::Forward
    } else if direct_ok(n_cells, pairs.iter().rev()) {
        Order::Backward
    } else {
        Order::Scratch
    }
}

/// [`apply`] without the validation: `moves` must have passed [`validate`] against `view`'s
/// geometry (otherwise this may panic on an out-of-range index, or move wrong data).
pub(crate) fn apply_validated(view: &mut LayerViewMut<'_>, moves: &Moves<'_>) {
    let geom = *view.geometry();
    let pairs: Vec<(usize, usize)> = moves
        .src
        .iter()
        .zip(moves.dst)
        .filter(|(s, d)| s != d)
        .map(|(&s, &d)| (s as usize, d as usize))
        .collect();
    if pairs.is_empty() {
        return;
    }
    let order = choose_order(geom.n_cells, &pairs);
    let data = view.bytes_mut();
    match geom.layout {
        Layout::Rows { row_stride } => {
            let (be, bb) = (geom.ty.block_elems(), geom.ty.block_bytes());
            let off = moves.elems.start / be * bb;
            let len = (moves.elems.end - moves.elems.start) / be * bb;
            move_rows(data, row_stride, off, len, &pairs, order);
        }
        Layout::Transposed { chan_stride } => {
            let eb = geom.ty.block_bytes();
            let row_len = geom.n_cells * eb;
            let mut scratch = Vec::new();
            for ch in moves.elems.clone() {
                let row = &mut data[ch * chan_stride..ch * chan_stride + row_len];
                match eb {
                    2 => move_elems::<2>(row, &pairs, order, &mut scratch),
                    4 => move_elems::<4>(row, &pairs, order, &mut scratch),
                    _ => unreachable!("transposed buffers hold 2- or 4-byte floats"),
                }
            }
        }
    }
}

/// Row layout: bytes `[c*stride + off, c*stride + off + len)` of cell `c` move.
fn move_rows(data: &mut [u8], stride: usize, off: usize, len: usize, pairs: &[(usize, usize)], order: Order) {
    let at = |c: usize| c * stride + off;
    match order {
        Order::Forward => pairs
            .iter()
            .for_each(|&(s, d)| data.copy_within(at(s)..at(s) + len, at(d))),
        Order::Backward => pairs
            .iter()
            .rev()
            .for_each(|&(s, d)| data.copy_within(at(s)..at(s) + len, at(d))),
        Order::Scratch => {
            let mut scratch = Vec::with_capacity(pairs.len() * len);
            for &(s, _) in pairs {
                scratch.extend_from_slice(&data[at(s)..at(s) + len]);
            }
            for (&(_, d), chunk) in pairs.iter().zip(scratch.chunks_exact(len)) {
                data[at(d)..at(d) + len].copy_from_slice(chunk);
            }
        }
    }
}

/// Transposed layout, one channel row: element `c` (bytes `[c*EB, c*EB + EB)`) moves.
fn move_elems<const EB: usize>(row: &mut [u8], pairs: &[(usize, usize)], order: Order, scratch: &mut Vec<u8>) {
    #[inline(always)]
    fn one<const EB: usize>(row: &mut [u8], s: usize, d: usize) {
        let mut v = [0u8; EB];
        v.copy_from_slice(&row[s * EB..s * EB + EB]);
        row[d * EB..d * EB + EB].copy_from_slice(&v);
    }
    match order {
        Order::Forward => pairs.iter().for_each(|&(s, d)| one::<EB>(row, s, d)),
        Order::Backward => pairs.iter().rev().for_each(|&(s, d)| one::<EB>(row, s, d)),
        Order::Scratch => {
            scratch.clear();
            for &(s, _) in pairs {
                scratch.extend_from_slice(&row[s * EB..s * EB + EB]);
            }
            for (&(_, d), v) in pairs.iter().zip(scratch.chunks_exact(EB)) {
                row[d * EB..d * EB + EB].copy_from_slice(v);
            }
        }
    }
}

/// Destination cells for `k` kept tokens of a sequence occupying `cells`: the `k` lowest cells of the
/// sequence, ascending.
pub fn dst_cells(cells: &[u32], k: usize) -> Vec<u32> {
    let mut c = cells.to_vec();
    c.sort_unstable();
    c.truncate(k);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::GgmlType;

    fn buf(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn order_choice() {
        // compaction to the front
        assert_eq!(choose_order(10, &[(2, 0), (5, 1), (9, 2)]), Order::Forward);
        // shift to the back
        assert_eq!(choose_order(10, &[(0, 1), (1, 2), (2, 3)]), Order::Backward);
        // swap
        assert_eq!(choose_order(10, &[(0, 1), (1, 0)]), Order::Scratch);
    }

    #[test]
    fn rows_swap_and_front() {
        let g = Geometry::rows(GgmlType::F16, 4, 4).unwrap();
        let orig = buf(32);
        let mut b = orig.clone();
        let mut v = LayerViewMut::new(g, &mut b).unwrap();
        apply(
            &mut v,
            &Moves {
                src: &[0, 3],
                dst: &[3, 0],
                elems: 0..4,
            },
        )
        .unwrap();
        assert_eq!(&b[0..8], &orig[24..32]);
        assert_eq!(&b[24..32], &orig[0..8]);
        assert_eq!(&b[8..24], &orig[8..24]);

        let mut b = orig.clone();
        let mut v = LayerViewMut::new(g, &mut b).unwrap();
        apply(
            &mut v,
            &Moves {
                src: &[1, 3],
                dst: &[0, 1],
                elems: 2..4,
            },
        )
        .unwrap();
        assert_eq!(&b[4..8], &orig[12..16]);
        assert_eq!(&b[12..16], &orig[28..32]);
        assert_eq!(&b[0..4], &orig[0..4]);
        assert_eq!(&b[8..12], &orig[8..12]);
        assert_eq!(&b[16..], &orig[16..]);
    }

    #[test]
    fn transposed_rotation() {
        let g = Geometry::transposed(GgmlType::F32, 3, 5).unwrap();
        let orig = buf(60);
        let mut b = orig.clone();
        let mut v = LayerViewMut::new(g, &mut b).unwrap();
        // 0 -> 1 -> 2 -> 0 on channels 1..3
        apply(
            &mut v,
            &Moves {
                src: &[0, 1, 2],
                dst: &[1, 2, 0],
                elems: 1..3,
            },
        )
        .unwrap();
        for ch in 0..3 {
            for c in 0..5 {
                let from = if ch == 0 || c > 2 { c } else { (c + 2) % 3 };
                assert_eq!(
                    b[ch * 20 + c * 4..][..4],
                    orig[ch * 20 + from * 4..][..4],
                    "ch {ch} cell {c}"
                );
            }
        }
    }

    #[test]
    fn errors_write_nothing() {
        let g = Geometry::rows(GgmlType::Q8_0, 64, 4).unwrap();
        let orig = buf(4 * 68);
        let mut b = orig.clone();
        let mut v = LayerViewMut::new(g, &mut b).unwrap();
        for m in [
            Moves {
                src: &[4],
                dst: &[0],
                elems: 0..64,
            },
            Moves {
                src: &[1],
                dst: &[4],
                elems: 0..64,
            },
            Moves {
                src: &[1, 2],
                dst: &[0, 0],
                elems: 0..64,
            },
            Moves {
                src: &[1, 1],
                dst: &[0, 2],
                elems: 0..64,
            },
            Moves {
                src: &[1, 2],
                dst: &[0],
                elems: 0..64,
            },
            Moves {
                src: &[1],
                dst: &[0],
                elems: 16..64,
            },
            Moves {
                src: &[1],
                dst: &[0],
                elems: 0..48,
            },
            Moves {
                src: &[1],
                dst: &[0],
                elems: 0..96,
            },
            Moves {
                src: &[1],
                dst: &[0],
                elems: 32..32,
            },
        ] {
            assert!(matches!(apply(&mut v, &m), Err(Error::InvalidArg(_))), "{m:?}");
        }
        assert_eq!(b, orig);
    }

    #[test]
    fn identity_and_empty_moves_are_noops() {
        let g = Geometry::rows(GgmlType::Bf16, 2, 3).unwrap();
        let orig = buf(12);
        let mut b = orig.clone();
        let mut v = LayerViewMut::new(g, &mut b).unwrap();
        apply(
            &mut v,
            &Moves {
                src: &[0, 1, 2],
                dst: &[0, 1, 2],
                elems: 0..2,
            },
        )
        .unwrap();
        apply(
            &mut v,
            &Moves {
                src: &[],
                dst: &[],
                elems: 0..2,
            },
        )
        .unwrap();
        assert_eq!(b, orig);
    }

    #[test]
    fn dst_cells_are_lowest() {
        assert_eq!(dst_cells(&[9, 3, 7, 1], 2), vec![1, 3]);
        assert_eq!(dst_cells(&[2, 0], 5), vec![0, 2]);
    }
}
