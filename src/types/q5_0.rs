//! `q5_0`: blocks of 32 unsigned 5-bit integers with an offset of 16 and one `f16` scale
//! (`ggml_type` 6, `block_q5_0`).
//!
//! Block layout (22 bytes):
//!
//! | bytes    | field   | meaning                                                                 |
//! |----------|---------|-------------------------------------------------------------------------|
//! | `0..2`   | `d`     | scale, `f16` little endian                                              |
//! | `2..6`   | `qh`    | `u32` little endian: bit `i` is the 5th (high) bit of element `i` (0..32) |
//! | `6..22`  | `qs[j]` | low nibble: low 4 bits of element `j`; high nibble: of element `j + 16`   |
//!
//! Dequantization (ggml's `dequantize_row_q5_0`), for `j` in `0..16`:
//! `q0 = (qs[j] & 0xf) | ((qh >> j) & 1) << 4`, `q1 = (qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4`,
//! `y[j] = (q0 - 16) * d`, `y[j + 16] = (q1 - 16) * d` (integer converted exactly, one f32
//! multiplication): bit-identical to ggml.
//!
//! Invariant: `dst.len() % 32 == 0` and `src.len() == 22 * dst.len() / 32` (checked by the caller,
//! [`super::dequantize_row`]).

use super::f16::scale;

/// Elements per block.
pub(crate) const QK: usize = 32;
/// Bytes per block.
pub(crate) const BLOCK_BYTES: usize = 2 + 4 + QK / 2;

/// Dequantize a row (`src` holds exactly `dst.len()` elements' worth of blocks).
pub(crate) fn to_f32(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() * QK, dst.len() * BLOCK_BYTES);
    for (b, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = scale(&b[0..2]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let (lo, hi) = y.split_at_mut(QK / 2);
        for (j, ((q, y0), y1)) in b[6..].iter().zip(lo.iter_mut()).zip(hi.iter_mut()).enumerate() {
            let h0 = (((qh >> j) & 1) << 4) as i32;
            let h1 = (((qh >> (j + 16)) & 1) << 4) as i32;
            *y0 = (((q & 0x0f) as i32 | h0) - 16) as f32 * d;
            *y1 = (((q >> 4) as i32 | h1) - 16) as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_vector() {
        // d = 2.0 (0x4000); qh = 0xaaaa_5555: odd elements 1..16 and even elements 16..32 get no high
        // bit, i.e. bit i set for i even < 16 and i odd >= 16; qs[j] = j | (15 - j) << 4.
        let mut b = vec![0x00, 0x40];
        b.extend(0xaaaa_5555u32.to_le_bytes());
        b.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        to_f32(&b, &mut out);
        for j in 0..16usize {
            let h0 = if j % 2 == 0 { 16 } else { 0 };
            let h1 = if (j + 16) % 2 == 1 { 16 } else { 0 };
            assert_eq!(out[j], ((j as i32 | h0) - 16) as f32 * 2.0, "j={j}");
            assert_eq!(out[j + 16], (((15 - j) as i32 | h1) - 16) as f32 * 2.0, "j={}", j + 16);
        }
        assert_eq!(out[0], 0.0); // (0 | 16) - 16
        assert_eq!(out[1], -30.0); // (1 | 0) - 16 = -15
        assert_eq!(out[16], -2.0); // (15 | 0) - 16 = -1
        assert_eq!(out[17], 28.0); // (14 | 16) - 16 = 14
    }
}
