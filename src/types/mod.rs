//! ggml element and block formats of KV caches.
//!
//! Invariants:
//! - [`GgmlType`] discriminants are ggml's `enum ggml_type` ids (the C header repeats them).
//! - A row of `n` elements of type `t` occupies exactly `t.row_bytes(n)` bytes; `n` must be a multiple
//!   of `t.block_elems()` (32 for the quantized formats, 1 for floats).
//! - [`dequantize_row`] is bit-identical to ggml's reference `dequantize_row_*` / `ggml_*_to_fp32`.
//! - Nothing here re-quantizes: compaction moves whole blocks as bytes.
//!
//! One file per format (block struct + dequantization), this file holds the dispatch.
//! TODO(helper A): implement; the signatures below are the contract.

mod bf16;
mod f16;
mod f32;
mod iq4_nl;
mod q4_0;
mod q4_1;
mod q5_0;
mod q5_1;
mod q8_0;

/// A KV element type, with ggml's type id as discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    /// 32-bit float.
    F32 = 0,
    /// IEEE half.
    F16 = 1,
    /// 32 x 4-bit, f16 scale.
    Q4_0 = 2,
    /// 32 x 4-bit, f16 scale and min.
    Q4_1 = 3,
    /// 32 x 5-bit, f16 scale.
    Q5_0 = 6,
    /// 32 x 5-bit, f16 scale and min.
    Q5_1 = 7,
    /// 32 x 8-bit, f16 scale.
    Q8_0 = 8,
    /// 32 x 4-bit non-linear codebook, f16 scale.
    Iq4Nl = 20,
    /// bfloat16.
    Bf16 = 30,
}

impl GgmlType {
    /// All supported types.
    pub const ALL: [GgmlType; 9] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Iq4Nl,
    ];

    /// The type for a ggml type id, if supported.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::ALL.into_iter().find(|t| *t as u32 == id)
    }

    /// ggml's name for the type ("f16", "q8_0", ...).
    pub const fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Bf16 => "bf16",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Iq4Nl => "iq4_nl",
        }
    }

    /// Elements per block (1 for float types).
    pub const fn block_elems(self) -> usize {
        if self.is_quantized() {
            32
        } else {
            1
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::Bf16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_0 | GgmlType::Iq4Nl => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
        }
    }

    /// True for the block-quantized formats.
    pub const fn is_quantized(self) -> bool {
        !matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16)
    }

    /// Bytes of a row of `n` elements, or `None` when `n` is not a whole number of blocks
    /// (or the size overflows).
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if n % self.block_elems() != 0 {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }
}

/// Dequantize `dst.len()` elements stored as `ty` in `src` into `dst`.
///
/// Panics if `src.len() != ty.row_bytes(dst.len())` (callers validate first).
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let want = ty.row_bytes(dst.len());
    assert_eq!(Some(src.len()), want, "dequantize_row: {} bytes for {} x {}", src.len(), dst.len(), ty.name());
    match ty {
        GgmlType::F32 => f32::to_f32(src, dst),
        GgmlType::F16 => f16::to_f32(src, dst),
        GgmlType::Bf16 => bf16::to_f32(src, dst),
        GgmlType::Q8_0 => q8_0::to_f32(src, dst),
        GgmlType::Q4_0 => q4_0::to_f32(src, dst),
        GgmlType::Q4_1 => q4_1::to_f32(src, dst),
        GgmlType::Q5_0 => q5_0::to_f32(src, dst),
        GgmlType::Q5_1 => q5_1::to_f32(src, dst),
        GgmlType::Iq4Nl => iq4_nl::to_f32(src, dst),
    }
}
