//! `q5_1`: blocks of 32 unsigned 5-bit integers with an `f16` scale and an `f16` minimum
//! (`ggml_type` 7, `block_q5_1`).
//!
//! Block layout (24 bytes):
//!
//! | bytes    | field   | meaning                                                                 |
//! |----------|---------|-------------------------------------------------------------------------|
//! | `0..2`   | `d`     | scale, `f16` little endian                                              |
//! | `2..4`   | `m`     | minimum, `f16` little endian                                            |
//! | `4..8`   | `qh`    | `u32` little endian: bit `i` is the 5th (high) bit of element `i` (0..32) |
//! | `8..24`  | `qs[j]` | low nibble: low 4 bits of element `j`; high nibble: of element `j + 16`   |
//!
//! Dequantization (ggml's `dequantize_row_q5_1`), for `j` in `0..16`:
//! `q0 = (qs[j] & 0xf) | ((qh >> j) & 1) << 4`, `q1 = (qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4`,
//! `y[j] = q0 * d + m`, `y[j + 16] = q1 * d + m`: an f32 multiplication, then an f32 addition, as
//! ggml's reference C. The product of a 5-bit integer and an `f16` is exact in f32, so only the
//! addition rounds.
//!
//! Invariant: `dst.len() % 32 == 0` and `src.len() == 24 * dst.len() / 32` (checked by the caller,
//! [`super::dequantize_row`]).

use super::f16::scale;

/// Elements per block.
pub(crate) const QK: usize = 32;
/// Bytes per block.
pub(crate) const BLOCK_BYTES: usize = 4 + 4 + QK / 2;

/// Dequantize a row (`src` holds exactly `dst.len()` elements' worth of blocks).
pub(crate) fn to_f32(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() * QK, dst.len() * BLOCK_BYTES);
    for (b, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = scale(&b[0..2]);
        let m = scale(&b[2..4]);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let (lo, hi) = y.split_at_mut(QK / 2);
        for (j, ((q, y0), y1)) in b[8..].iter().zip(lo.iter_mut()).zip(hi.iter_mut()).enumerate() {
            let q0 = (q & 0x0f) as u32 | ((qh >> j) & 1) << 4;
            let q1 = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
            *y0 = q0 as f32 * d + m;
            *y1 = q1 as f32 * d + m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_vector() {
        // d = 0.5 (0x3800), m = -8.0 (0xc800); qh = 0xffff_0000 (high bit on elements 16..32);
        // qs[j] = j | j << 4.
        let mut b = vec![0x00, 0x38, 0x00, 0xc8];
        b.extend(0xffff_0000u32.to_le_bytes());
        b.extend((0u8..16).map(|j| j | (j << 4)));
        let mut out = [0f32; 32];
        to_f32(&b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.5 - 8.0);
            assert_eq!(out[j + 16], (j + 16) as f32 * 0.5 - 8.0);
        }
        assert_eq!(out[31], 7.5);
    }
}
