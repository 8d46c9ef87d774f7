//! Block-exact, in-place compaction of host KV buffers.
//!
//! TODO(helper A): open with the algorithm in pseudocode; implement.
//!
//! Contract:
//! - A [`Moves`] lists pairs `src[j] -> dst[j]` of cells and the element range (a head slice, or all of
//!   `n_embd`) they apply to. Destinations are distinct; sources are distinct.
//! - [`validate`] checks every index and the element range against the geometry (block-aligned for
//!   quantized rows) and writes nothing; [`apply`] validates first, then moves bytes: for every
//!   element `e` in the range, cell `dst[j]` gets exactly the bytes cell `src[j]` had *before the call*
//!   (sources are read before any destination is written, via a scratch of `len(src) * slice bytes`).
//! - Rows: whole blocks are copied; transposed: one element per channel per move. No conversion.

use crate::error::Result;
use crate::layout::{Geometry, LayerViewMut};

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

/// Check `moves` against `geom` without touching any buffer.
pub fn validate(geom: &Geometry, moves: &Moves<'_>) -> Result<()> {
    let _ = (geom, moves);
    unimplemented!()
}

/// Validate, then apply `moves` to `view` in place.
pub fn apply(view: &mut LayerViewMut<'_>, moves: &Moves<'_>) -> Result<()> {
    let _ = (view, moves);
    unimplemented!()
}

/// Destination cells for `k` kept tokens of a sequence occupying `cells`: the `k` lowest cells of the
/// sequence, ascending.
pub fn dst_cells(cells: &[u32], k: usize) -> Vec<u32> {
    let mut c = cells.to_vec();
    c.sort_unstable();
    c.truncate(k);
    c
}
