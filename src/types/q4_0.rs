//! `q4_0`: blocks of 32 unsigned 4-bit integers with an offset of 8 and one `f16` scale
//! (`ggml_type` 2, `block_q4_0`).
//!
//! Block layout (18 bytes):
//!
//! | bytes    | field   | meaning                                                      |
//! |----------|---------|--------------------------------------------------------------|
//! | `0..2`   | `d`     | scale, `f16` little endian                                   |
//! | `2..18`  | `qs[j]` | low nibble: element `j`; high nibble: element `j + 16` (0..16) |
//!
//! Dequantization (ggml's `dequantize_row_q4_0`), for `j` in `0..16`:
//! `y[j] = ((qs[j] & 0xf) - 8) * d` and `y[j + 16] = ((qs[j] >> 4) - 8) * d`, the integer converted
//! to `f32` exactly, then one f32 multiplication: bit-identical to ggml.
//!
//! Invariant: `dst.len() % 32 == 0` and `src.len() == 18 * dst.len() / 32` (checked by the caller,
//! [`super::dequantize_row`]).

use super::f16::scale;

/// Elements per block.
pub(crate) const QK: usize = 32;
/// Bytes per block.
pub(crate) const BLOCK_BYTES: usize = 2 + QK / 2;

/// Dequantize a row (`src` holds exactly `dst.len()` elements' worth of blocks).
pub(crate) fn to_f32(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() * QK, dst.len() * BLOCK_BYTES);
    for (b, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = scale(&b[0..2]);
        let (lo, hi) = y.split_at_mut(QK / 2);
        for ((q, y0), y1) in b[2..].iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            *y0 = ((q & 0x0f) as i32 - 8) as f32 * d;
            *y1 = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_vector() {
        // d = 0.25 (f16 0x3400); qs[j] = j | (15 - j) << 4
        let mut b = vec![0x00, 0x34];
        b.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        to_f32(&b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 0.25);
            assert_eq!(out[j + 16], (7.0 - j as f32) * 0.25);
        }
        assert_eq!(out[0], -2.0);
        assert_eq!(out[16], 1.75);
    }
}
