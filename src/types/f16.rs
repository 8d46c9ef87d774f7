//! `f16` (TODO(helper A): block layout, reference, invariants).

/// Dequantize a row (`src` holds exactly `dst.len()` elements' worth of blocks).
pub(crate) fn to_f32(src: &[u8], dst: &mut [f32]) {
    let _ = (src, dst);
    unimplemented!("f16 dequantization")
}
