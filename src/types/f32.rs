//! `f32`: IEEE-754 binary32, one element per "block".
//!
//! Layout (4 bytes per element): bytes `0..4` are the little-endian bit pattern of the value
//! (`ggml_type` 0, `GGML_TYPE_F32`).
//!
//! Dequantization: the identity on bits, `x = f32::from_bits(u32::from_le_bytes(b[0..4]))`. NaN
//! payloads and signs pass through unchanged, exactly as ggml's `memcpy`.
//!
//! Invariant: `src.len() == 4 * dst.len()` (checked by the caller, [`super::dequantize_row`]).

/// Bytes per element.
pub(crate) const BLOCK_BYTES: usize = 4;

/// Dequantize a row (`src` holds exactly `dst.len()` elements' worth of blocks).
pub(crate) fn to_f32(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * BLOCK_BYTES);
    for (b, y) in src.chunks_exact(BLOCK_BYTES).zip(dst.iter_mut()) {
        *y = f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_vectors() {
        let vals = [0.0f32, -0.0, 1.5, -3.25, f32::MIN_POSITIVE, f32::MAX, f32::INFINITY];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = [0f32; 7];
        to_f32(&bytes, &mut out);
        for (a, b) in vals.iter().zip(out.iter()) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    fn nan_payload_is_kept() {
        let bits = 0x7fa0_1234u32; // a signalling NaN with a payload
        let mut out = [0f32];
        to_f32(&bits.to_le_bytes(), &mut out);
        assert_eq!(out[0].to_bits(), bits);
    }
}
