//! `f16`: IEEE-754 binary16, one element per "block".
//!
//! Layout (2 bytes per element): bytes `0..2` are the little-endian bit pattern
//! (`ggml_type` 1, `GGML_TYPE_F16`; ggml's `ggml_fp16_t` is a `uint16_t`).
//!
//! Dequantization: `x = (f32) h`, the exact widening of a binary16 to a binary32 (every binary16
//! value, subnormals included, is representable). ggml's `ggml_compute_fp16_to_fp32` computes the
//! same value with bit tricks; we use the `half` crate's conversion. Both give the same bits for every
//! non-NaN input and a quiet NaN of the same sign and payload (`0x7fc0_0000 | man << 13`) for NaNs.
//!
//! The scale `d` (and the minimum `m`) of every quantized block is an `f16` too: [`scale`] reads
//! one for the other formats.
//!
//! Invariant: `src.len() == 2 * dst.len()` (checked by the caller, [`super::dequantize_row`]).

/// Bytes per element.
pub(crate) const BLOCK_BYTES: usize = 2;

/// Every binary16 bit pattern widened to `f32` by `half` (256 KiB, built on first use), as ggml keeps
/// `ggml_table_f32_f16`: a load per element instead of a branchy software conversion.
static TABLE: once_cell::sync::Lazy<Box<[f32]>> =
    once_cell::sync::Lazy::new(|| (0..=u16::MAX).map(|h| half::f16::from_bits(h).to_f32()).collect());

/// The `f16` at `b[0..2]` (little endian), widened to `f32`.
#[inline(always)]
pub(crate) fn scale(b: &[u8]) -> f32 {
    TABLE[u16::from_le_bytes([b[0], b[1]]) as usize]
}

/// Dequantize a row (`src` holds exactly `dst.len()` elements' worth of blocks).
pub(crate) fn to_f32(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * BLOCK_BYTES);
    let t: &[f32] = &TABLE;
    for (b, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.iter_mut()) {
        *y = t[u16::from_le_bytes([b[0], b[1]]) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's `ggml_compute_fp16_to_fp32`, transcribed as an independent check of `half`.
    fn ggml_style(h: u16) -> f32 {
        let w = (h as u32) << 16;
        let sign = w & 0x8000_0000;
        let two_w = w.wrapping_add(w);
        let exp_offset = 0xE0u32 << 23;
        let exp_scale = f32::from_bits(0x0780_0000); // 2^-112
        let normalized = f32::from_bits((two_w >> 4) + exp_offset) * exp_scale;
        let magic_mask = 126u32 << 23;
        let denormalized = f32::from_bits((two_w >> 17) | magic_mask) - 0.5;
        let cutoff = 1u32 << 27;
        let r = sign
            | if two_w < cutoff {
                denormalized.to_bits()
            } else {
                normalized.to_bits()
            };
        f32::from_bits(r)
    }

    #[test]
    fn every_non_nan_half_matches_ggml() {
        for h in 0..=u16::MAX {
            let mut out = [0f32];
            to_f32(&h.to_le_bytes(), &mut out);
            let want = ggml_style(h);
            if want.is_nan() {
                assert!(out[0].is_nan(), "{h:#06x}");
            } else {
                assert_eq!(out[0].to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn nan_is_quieted_with_sign_and_payload() {
        for h in [0x7c01u16, 0x7e00, 0xfc01, 0xffff, 0x7d55] {
            let mut out = [0f32];
            to_f32(&h.to_le_bytes(), &mut out);
            let want = ((h as u32 & 0x8000) << 16) | 0x7fc0_0000 | ((h as u32 & 0x03ff) << 13);
            assert_eq!(out[0].to_bits(), want, "{h:#06x}");
        }
    }

    #[test]
    fn hand_vectors() {
        // 1.0, -2.0, 0.5, 65504 (max), smallest subnormal 2^-24, -0.0, +inf
        let halves: [u16; 7] = [0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0x8000, 0x7c00];
        let want = [1.0f32, -2.0, 0.5, 65504.0, 5.960_464_5e-8, -0.0, f32::INFINITY];
        let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        let mut out = [0f32; 7];
        to_f32(&bytes, &mut out);
        for (a, b) in want.iter().zip(out.iter()) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }
}
