//! `q4_1`: blocks of 32 unsigned 4-bit integers with an `f16` scale and an `f16` minimum
//! (`ggml_type` 3, `block_q4_1`).
//!
//! Block layout (20 bytes):
//!
//! | bytes    | field   | meaning                                                        |
//! |----------|---------|----------------------------------------------------------------|
//! | `0..2`   | `d`     | scale, `f16` little endian                                     |
//! | `2..4`   | `m`     | minimum, `f16` little endian                                   |
//! | `4..20`  | `qs[j]` | low nibble: element `j`; high nibble: element `j + 16` (0..16)   |
//!
//! Dequantization (ggml's `dequantize_row_q4_1`), for `j` in `0..16`:
//! `y[j] = (qs[j] & 0xf) * d + m` and `y[j + 16] = (qs[j] >> 4) * d + m`: an f32 multiplication,
//! then an f32 addition, in that order, as ggml's reference C computes it. The product of a 4-bit
//! integer and an `f16` is exact in f32, so only the addition rounds (and a fused multiply-add
//! would give the same bits).
//!
//! Invariant: `dst.len() % 32 == 0` and `src.len() == 20 * dst.len() / 32` (checked by the caller,
//! [`super::dequantize_row`]).

use super::f16::scale;

/// Elements per block.
pub(crate) const QK: usize = 32;
/// Bytes per block.
pub(crate) const BLOCK_BYTES: usize = 4 + QK / 2;

/// Dequantize a row (`src` holds exactly `dst.len()` elements' worth of blocks).
pub(crate) fn to_f32(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() * QK, dst.len() * BLOCK_BYTES);
    for (b, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = scale(&b[0..2]);
        let m = scale(&b[2..4]);
        let (lo, hi) = y.split_at_mut(QK / 2);
        for ((q, y0), y1) in b[4..].iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            *y0 = (q & 0x0f) as f32 * d + m;
            *y1 = (q >> 4) as f32 * d + m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_vector() {
        // d = 0.5 (0x3800), m = -1.0 (0xbc00); qs[j] = j | (15 - j) << 4
        let mut b = vec![0x00, 0x38, 0x00, 0xbc];
        b.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        to_f32(&b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.5 - 1.0);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
        assert_eq!(out[15], 6.5);
    }

    #[test]
    fn addition_rounds_once() {
        // d = 2^-24 (0x0001), m = 1.0 (0x3c00), q = 15: 1 + 15 * 2^-24 is 7.5 ulps above 1.0 and rounds
        // to even, 1 + 8 * 2^-23 = 1 + 2^-20.
        let mut b = vec![0x01, 0x00, 0x00, 0x3c];
        b.extend([0xffu8; 16]);
        let mut out = [0f32; 32];
        to_f32(&b, &mut out);
        assert!(out.iter().all(|y| *y == 1.0 + 2f32.powi(-20)));
    }
}
