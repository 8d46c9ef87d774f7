//! `f32` (TODO(helper A): block layout, reference, invariants).
//!
//! Minimal little-endian implementation so that scoring tests can run (helper A's full file replaces it).

/// Dequantize a row (`src` holds exactly `dst.len()` elements' worth of blocks).
pub(crate) fn to_f32(src: &[u8], dst: &mut [f32]) {
    for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}
