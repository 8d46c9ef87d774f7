//! `bf16`: bfloat16 (the top half of an `f32`), one element per "block".
//!
//! Layout (2 bytes per element): bytes `0..2` are the little-endian bit pattern
//! (`ggml_type` 30, `GGML_TYPE_BF16`; ggml's `ggml_bf16_t { uint16_t bits; }`).
//!
//! Dequantization: `x = f32::from_bits((bits as u32) << 16)`, as ggml's `ggml_compute_bf16_to_fp32`.
//! Exact for every pattern, NaN payloads included.
//!
//! Invariant: `src.len() == 2 * dst.len()` (checked by the caller, [`super::dequantize_row`]).

/// Bytes per element.
pub(crate) const BLOCK_BYTES: usize = 2;

/// Dequantize a row (`src` holds exactly `dst.len()` elements' worth of blocks).
pub(crate) fn to_f32(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * BLOCK_BYTES);
    for (b, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.iter_mut()) {
        *y = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_vectors() {
        // 1.0 = 0x3f80, -2.0 = 0xc000, 0.5 = 0x3f00, pi ~ 0x4049 -> 3.140625, NaN 0x7fc1
        let pats: [u16; 5] = [0x3f80, 0xc000, 0x3f00, 0x4049, 0x7fc1];
        let want: [u32; 5] = [0x3f80_0000, 0xc000_0000, 0x3f00_0000, 0x4049_0000, 0x7fc1_0000];
        let bytes: Vec<u8> = pats.iter().flat_map(|h| h.to_le_bytes()).collect();
        let mut out = [0f32; 5];
        to_f32(&bytes, &mut out);
        for (w, o) in want.iter().zip(out.iter()) {
            assert_eq!(*w, o.to_bits());
        }
        assert_eq!(out[3], 3.140625);
    }
}
