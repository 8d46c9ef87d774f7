//! `q8_0`: blocks of 32 signed 8-bit integers with one `f16` scale (`ggml_type` 8, `block_q8_0`).
//!
//! Block layout (34 bytes):
//!
//! | bytes    | field   | meaning                                   |
//! |----------|---------|-------------------------------------------|
//! | `0..2`   | `d`     | scale, `f16` little endian                |
//! | `2..34`  | `qs[j]` | element `j` (0..32) as an `i8`            |
//!
//! Dequantization (ggml's `dequantize_row_q8_0`): `y[j] = (f32) qs[j] * d`, with `d` widened from
//! `f16` first. One f32 multiplication of an exactly representable integer, so the result is
//! bit-identical to ggml's.
//!
//! Invariant: `src.len() == 34 * dst.len() / 32` and `dst.len() % 32 == 0` (checked by the caller,
//! [`super::dequantize_row`]).

use super::f16::scale;

/// Elements per block.
pub(crate) const QK: usize = 32;
/// Bytes per block.
pub(crate) const BLOCK_BYTES: usize = 2 + QK;

/// Dequantize a row (`src` holds exactly `dst.len()` elements' worth of blocks).
pub(crate) fn to_f32(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() * QK, dst.len() * BLOCK_BYTES);
    for (b, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = scale(&b[0..2]);
        for (q, y) in b[2..].iter().zip(y.iter_mut()) {
            *y = (*q as i8) as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_vector() {
        // d = 0.5 (f16 0x3800); qs = -16..16
        let mut b = vec![0x00, 0x38];
        b.extend((-16i8..16).map(|q| q as u8));
        let mut out = [0f32; 32];
        to_f32(&b, &mut out);
        for (j, y) in out.iter().enumerate() {
            assert_eq!(*y, (j as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn extremes_and_two_blocks() {
        // block 0: d = -2.0 (0xc000), qs[0] = -128, qs[31] = 127; block 1: d = 0 -> all +-0
        let mut b = vec![0u8; 2 * BLOCK_BYTES];
        b[0..2].copy_from_slice(&0xc000u16.to_le_bytes());
        b[2] = 0x80;
        b[33] = 0x7f;
        b[BLOCK_BYTES + 2] = 0xff; // -1 * 0.0 = -0.0
        let mut out = [1f32; 64];
        to_f32(&b, &mut out);
        assert_eq!(out[0], 256.0);
        assert_eq!(out[31], -254.0);
        assert_eq!(out[1], -0.0);
        assert_eq!(out[32].to_bits(), (-0.0f32).to_bits());
        assert!(out[33..].iter().all(|y| y.to_bits() == 0));
    }
}
