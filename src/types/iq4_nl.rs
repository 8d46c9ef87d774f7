//! `iq4_nl`: blocks of 32 4-bit indices into a fixed non-linear codebook, with one `f16` scale
//! (`ggml_type` 20, `block_iq4_nl`).
//!
//! Block layout (18 bytes, the same shape as `q4_0`):
//!
//! | bytes    | field   | meaning                                                          |
//! |----------|---------|------------------------------------------------------------------|
//! | `0..2`   | `d`     | scale, `f16` little endian                                       |
//! | `2..18`  | `qs[j]` | low nibble: index of element `j`; high nibble: of element `j + 16` |
//!
//! Dequantization (ggml's `dequantize_row_iq4_nl`), for `j` in `0..16`:
//! `y[j] = d * K[qs[j] & 0xf]` and `y[j + 16] = d * K[qs[j] >> 4]`, with the codebook
//! `K` = ggml's `kvalues_iq4nl` ([`KVALUES`]); one f32 multiplication: bit-identical to ggml.
//!
//! Invariant: `dst.len() % 32 == 0` and `src.len() == 18 * dst.len() / 32` (checked by the caller,
//! [`super::dequantize_row`]).

use super::f16::scale;

/// Elements per block.
pub(crate) const QK: usize = 32;
/// Bytes per block.
pub(crate) const BLOCK_BYTES: usize = 2 + QK / 2;

/// The codebook (ggml's `kvalues_iq4nl`, ggml-common.h).
pub(crate) const KVALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Dequantize a row (`src` holds exactly `dst.len()` elements' worth of blocks).
pub(crate) fn to_f32(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() * QK, dst.len() * BLOCK_BYTES);
    for (b, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = scale(&b[0..2]);
        let (lo, hi) = y.split_at_mut(QK / 2);
        for ((q, y0), y1) in b[2..].iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            *y0 = d * KVALUES[(q & 0x0f) as usize] as f32;
            *y1 = d * KVALUES[(q >> 4) as usize] as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_vector() {
        // d = 0.5 (0x3800); qs[j] = j | (15 - j) << 4
        let mut b = vec![0x00, 0x38];
        b.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        to_f32(&b, &mut out);
        assert_eq!(out[0], -63.5);
        assert_eq!(out[7], -5.0);
        assert_eq!(out[8], 0.5);
        assert_eq!(out[15], 56.5);
        assert_eq!(out[16], 56.5);
        assert_eq!(out[31], -63.5);
        for j in 0..16 {
            assert_eq!(out[j], KVALUES[j] as f32 * 0.5);
            assert_eq!(out[j + 16], KVALUES[15 - j] as f32 * 0.5);
        }
    }
}
