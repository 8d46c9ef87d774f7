//! ggml element and block formats of KV caches.
//!
//! Invariants:
//! - [`GgmlType`] discriminants are ggml's `enum ggml_type` ids (the C header repeats them).
//! - A row of `n` elements of type `t` occupies exactly `t.row_bytes(n)` bytes; `n` must be a multiple
//!   of `t.block_elems()` (32 for the quantized formats, 1 for floats).
//! - [`dequantize_row`] is bit-identical to ggml's reference `dequantize_row_*` / `ggml_*_to_fp32`.
//! - Nothing here re-quantizes: compaction moves whole blocks as bytes.
//!
//! One file per format: its module doc gives the block layout byte by byte and the dequantization
//! formula; the code reads bytes (little endian, no `#[repr(C)]` structs, no `unsafe`). This file
//! holds the type table and the dispatch.
//!
//! Bit-identity with ggml is tested three ways: hand-computed vectors in each format's unit tests;
//! vectors produced by ggml's own C functions (tests/formats_compact/); random blocks against an
//! independent per-element reference (same file). Every f16 pattern is checked exhaustively.

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
    assert_eq!(
        Some(src.len()),
        want,
        "dequantize_row: {} bytes for {} x {}",
        src.len(),
        dst.len(),
        ty.name()
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The type table agrees with each format file's block size.
    #[test]
    fn block_sizes_match_format_files() {
        let per_file = [
            (GgmlType::F32, f32::BLOCK_BYTES, 1),
            (GgmlType::F16, f16::BLOCK_BYTES, 1),
            (GgmlType::Bf16, bf16::BLOCK_BYTES, 1),
            (GgmlType::Q8_0, q8_0::BLOCK_BYTES, q8_0::QK),
            (GgmlType::Q4_0, q4_0::BLOCK_BYTES, q4_0::QK),
            (GgmlType::Q4_1, q4_1::BLOCK_BYTES, q4_1::QK),
            (GgmlType::Q5_0, q5_0::BLOCK_BYTES, q5_0::QK),
            (GgmlType::Q5_1, q5_1::BLOCK_BYTES, q5_1::QK),
            (GgmlType::Iq4Nl, iq4_nl::BLOCK_BYTES, iq4_nl::QK),
        ];
        for (ty, bytes, elems) in per_file {
            assert_eq!(ty.block_bytes(), bytes, "{}", ty.name());
            assert_eq!(ty.block_elems(), elems, "{}", ty.name());
            assert_eq!(GgmlType::from_id(ty as u32), Some(ty));
        }
        assert_eq!(GgmlType::Q8_0.row_bytes(4096), Some(128 * 34));
        assert_eq!(GgmlType::Q4_0.row_bytes(48), None);
    }

    /// Dispatch: a zero block of every type dequantizes to zeros (a zero f16 scale and a zero min),
    /// and a wrong byte count panics.
    #[test]
    fn dispatch_and_zero_blocks() {
        for ty in GgmlType::ALL {
            let n = 2 * ty.block_elems();
            let src = vec![0u8; ty.row_bytes(n).unwrap()];
            let mut out = vec![1f32; n];
            dequantize_row(ty, &src, &mut out);
            assert!(out.iter().all(|y| *y == 0.0), "{}", ty.name());
            let r = std::panic::catch_unwind(|| dequantize_row(ty, &src[1..], &mut vec![0f32; n]));
            assert!(r.is_err(), "{}", ty.name());
        }
    }
}
