//! Integration tests of the ggml formats (`types`) and of compaction (`compact`, `Plan::compact`).
//!
//! - Formats: vectors produced by ggml's own `dequantize_row_*` / `GGML_FP16_TO_FP32` /
//!   `GGML_BF16_TO_FP32` (ggml-quants.c and ggml-impl.h of the pinned llama.cpp, compiled and run once;
//!   the inputs are random blocks from a splitmix64 stream), and random blocks compared bit for bit
//!   against a straightforward per-element reference written here from the format definitions.
//! - Compaction: random shapes, all 9 types, both layouts, random move sets, against a naive
//!   element-by-element reference on a clone of the buffer; error cases leave the buffer untouched.
//! - `Plan::compact`: hand-built plans (per layer and per KV head), and a bad move in the last layer
//!   that must leave every buffer of every layer untouched.

use compresskv::budget::Allocation;
use compresskv::compact::{apply, dst_cells, validate, Moves};
use compresskv::layout::{Geometry, LayerViewMut, Layout};
use compresskv::plan::{GroupPlan, LayerPlan, Params, Plan, Shape};
use compresskv::score::Heads;
use compresskv::types::{dequantize_row, GgmlType};
use compresskv::Error;

// ---------------------------------------------------------------------------------------------
// Deterministic PRNG (splitmix64)
// ---------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
    /// `k` distinct values of `0..n`, in random order.
    fn distinct(&mut self, n: usize, k: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..n as u32).collect();
        self.shuffle(&mut all);
        all.truncate(k);
        all
    }
}

// ---------------------------------------------------------------------------------------------
// Formats: an independent per-element reference
// ---------------------------------------------------------------------------------------------

const IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// binary16 -> f32 from the definition (sign, 5-bit exponent with bias 15, 10-bit mantissa), via f64.
/// NaNs become the quiet NaN of the same sign and payload (what ggml's conversion yields on x86/arm).
fn half_ref(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f64 } else { 1.0 };
    let e = ((h >> 10) & 0x1f) as i32;
    let m = (h & 0x3ff) as u32;
    if e == 31 {
        return if m == 0 {
            (sign * f64::INFINITY) as f32
        } else {
            f32::from_bits(((h as u32 & 0x8000) << 16) | 0x7fc0_0000 | (m << 13))
        };
    }
    let v = if e == 0 {
        m as f64 * 2f64.powi(-24)
    } else {
        (1024 + m) as f64 * 2f64.powi(e - 25)
    };
    (sign * v) as f32
}

fn le16(b: &[u8], at: usize) -> u16 {
    b[at] as u16 | (b[at + 1] as u16) << 8
}

/// Element `i` (0..32) of a 4-bit-packed block whose nibbles start at byte `qs`.
fn nibble(b: &[u8], qs: usize, i: usize) -> u32 {
    if i < 16 {
        (b[qs + i] & 15) as u32
    } else {
        (b[qs + i - 16] >> 4) as u32
    }
}

/// Element `i` of the block (or float element) `b`, by the format definition.
fn elem_ref(ty: GgmlType, b: &[u8], i: usize) -> f32 {
    let d = || half_ref(le16(b, 0));
    let m = || half_ref(le16(b, 2));
    match ty {
        GgmlType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => half_ref(le16(b, 0)),
        GgmlType::Bf16 => f32::from_le_bytes([0, 0, b[0], b[1]]),
        GgmlType::Q8_0 => (b[2 + i] as i8) as f32 * d(),
        GgmlType::Q4_0 => (nibble(b, 2, i) as i32 - 8) as f32 * d(),
        GgmlType::Q4_1 => nibble(b, 4, i) as f32 * d() + m(),
        GgmlType::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let q = nibble(b, 6, i) + 16 * ((qh >> i) & 1);
            (q as i32 - 16) as f32 * d()
        }
        GgmlType::Q5_1 => {
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let q = nibble(b, 8, i) + 16 * ((qh >> i) & 1);
            q as f32 * d() + m()
        }
        GgmlType::Iq4Nl => IQ4NL[nibble(b, 2, i) as usize] as f32 * d(),
    }
}

fn row_ref(ty: GgmlType, src: &[u8]) -> Vec<f32> {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    src.chunks_exact(bb)
        .flat_map(|b| (0..be).map(move |i| elem_ref(ty, b, i)))
        .collect()
}

/// Number of leading f16 fields (scale, min) of a block.
fn n_scales(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 => 2,
        t if t.is_quantized() => 1,
        _ => 0,
    }
}

/// A row of `n` random elements of `ty`. Any byte pattern is a valid block; the f16 scales are kept
/// finite (no inf/NaN) to keep comparisons simple. Float elements may be anything, NaN included.
fn random_row(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    let mut b = rng.bytes(ty.row_bytes(n).unwrap());
    for blk in b.chunks_exact_mut(ty.block_bytes()) {
        for s in 0..n_scales(ty) {
            if le16(blk, 2 * s) & 0x7c00 == 0x7c00 {
                blk[2 * s + 1] &= !0x40;
            }
        }
    }
    b
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn ty_named(name: &str) -> GgmlType {
    *GgmlType::ALL.iter().find(|t| t.name() == name).unwrap()
}

/// (type, input bytes, ggml's output as f32 bit patterns in big-endian hex), produced by ggml's
/// reference C: 2 random blocks per quantized type (finite scales), 16 chosen f16/bf16 patterns.
#[rustfmt::skip]
const GGML_VECTORS: &[(&str, &str, &str)] = &[
    (
        "q8_0",
        concat!(
            "c51abdef527f431e48f0d2e1e06fcf3499a52ca70f5facb806ae28aa7c73b0a2c9856d6c335a4758d2c3a2465d3dc9a7",
            "267fd11797637d8c61006adda3c73975c8648562",
        ),
        concat!(
            "be62c780bd662a003e8ac6803ed6eec03e62c7803dcb16003e73b400bd58a000be1bb300bdd1db00bdd8a0003ebbdac0",
            "be25da803e300200beae50c0be9a01c03e14ee00be969f403d4b16003ea0c6c0be8e2900be73b4003ca27800be8ac680",
            "3e076400be918b803ed1db003ec29fc0be876400be9f1580be3a2980bed029c04861b70048c72900489d1d8048c2bc00",
            "c84b9600c886fc80c8d00300489ae70048cdcc804886fc80c8736b00c8c4f28048282e00490c84c0c850030047cb9600",
            "c8e85a8048db1380490a4e40c900590048d6a6800000000048ea9100c81ae700c8cdcc80c87c4500487c450049017440",
            "c877d80048dd4a00c90817c048d8dd00",
        ),
    ),
    (
        "q4_0",
        "ae1433a5101c57bd6dd7b4a45941466bff31bce7fd03fe6dc72b4d6d853f6f2ec0c28ff6",
        concat!(
            "bbbb3000bb60a000bc15c0003b95c000ba95c0003bbb30003bbb3000ba95c000bb95c000bb95c0003a95c000bc030800",
            "bb15c0003b60a0003c030800bc030800bbbb30003b15c000bc030800bc030800bb60a0003b60a000bb15c0003bbb3000",
            "3b60a0003b15c000bb60a000bb95c000bb95c000bb15c0003c030800bbbb3000c61ab000461ab000c639a000c61ab000",
            "44f78000c5b9a000c61ab000c61ab00045b9a000c6589000c6589000c639a000467780004639a000c658900045778000",
            "c658900046778000c658900045778000c5f780004639a00045f780004577800080000000461ab000457780004639a000",
            "c5f78000c5f7800080000000c6589000",
        ),
    ),
    (
        "q4_1",
        "4eaaa762b6607147113c95edd91bd194b27a5a929a8582a99ba2b8bd31e1e507b7e6811d50b122a8",
        concat!(
            "4454cd164454e0004454dcd94454c9ef4454dcd94454ba2c4454d03d4454b7054454c3a14454bd534454dcd94454d364",
            "4454d9b24454c07a4454c07a4454d9b24454bd534454cd164454c9ef4454d3644454dcd94454d68b4454c3a14454b3de",
            "4454b7054454dcd94454b7054454c3a14454bd534454c9ef4454d03d4454c3a1bd3419e0bd30f340bd330d00bd34cd20",
            "bd3099a0bd3099a0bd320020bd32b360bd32b360bd3259c0bd3099a0bd34cd20bd304000bd3099a0bd30f340bd330d00",
            "bd3366a0bd33c040bd3419e0bd3419e0bd314ce0bd3526c0bd3526c0bd304000bd3419e0bd3526c0bd330d00bd3099a0",
            "bd320020bd3419e0bd30f340bd33c040",
        ),
    ),
    (
        "q5_0",
        "1edff7775b58fdfd671dc6a37cc8e72813f2069ee5e657463be123b07f0a1956d50cd2abb292b10762f470df",
        concat!(
            "c5b90c00c5b90c00c547480044aad000c52ad000c4aad000c5aad000c563c000c5474800c563c000c4aad00045c74800",
            "c52ad000c5c74800c50e5800458e5800c5d58400c5d58400458e5800c3e3c000c5aad000452ad000c547480044e3c000",
            "4463c00045c7480045d58400c5d584008000000045474800c5c748004463c00042be3200427d9800c231840042182800",
            "41fd980042982800c2b18400c1fd9800414ae000c2b18400c2be3200c2643c00c2b1840041cae0000000000042be3200",
            "4231840000000000c2be3200c28b7a00c198280000000000c1982800c2182800c1fd9800c2318400c1fd9800c2cae000",
            "4218280042be3200c2643c0042a4d600",
        ),
    ),
    (
        "q5_1",
        "ab44a0cbe36031477edc3230231f754ac71f608017efe191e92ec3d4ea5e78b79731995275ef5b5610573c71bedca99e",
        concat!(
            "42f9940042e6e800c0bd4000c1740000bf9f80004301750042a58e0042d43c00418b6800425b1400c1740000c1740000",
            "418b68004301750042803600c129500042b83a004235bc00bf9f8000bf9f800042898c0042803600418b6800405b0000",
            "42e6e8004280360042aee40041b0c000c12950004248680042f9940041d61800c296dd08c294b438c2966e78c2947cf0",
            "c2974b98c291ae48c2928b68c2939fd0c2986000c2936888c2925420c294b438c291e590c295c8a0c292f9f8c2955a10",
            "c2966e78c297ba28c2966e78c293d718c2936888c291e590c293d718c2974b98c294b438c293d718c29445a8c296dd08",
            "c2928b68c2921cd8c2963730c292f9f8",
        ),
    ),
    (
        "iq4_nl",
        "44739f68600c712a714108f716908adc8944160349fb5989f1f193c30946a05ec33963ac",
        concat!(
            "49cd410046688000c9e6af0049408a00c9bce80048b5a400c9bce800c9bce80046688000c8115000c89fd800c9e6af00",
            "48b5a40049408a00483ce800c9320200483ce800c89fd800c89fd800c9e6af00c8115000c996c300c8115000c9320200",
            "c9e6af0049cd4100c9bce800483ce80046688000497aaa0046688000c93202003a2078003aea88003a2078003a207800",
            "bba07800bba07800bb489600bb4896003a207800ba87c800bbc3f5003b895300bb4896003a207800bb4896003b238e00",
            "bb1736003bae5b00bad80400384580003bae5b003bae5b003a2078003b238e00bbc3f500bb1736003a9a4c00bad80400",
            "3b238e00bb489600ba87c8003a9a4c00",
        ),
    ),
    (
        "f16",
        "000000800100ff030004003cff7bfffb007c00fc5535f3b0341201805a5a662e",
        concat!(
            "000000008000000033800000387fc000388000003f800000477fe000c77fe0007f800000ff8000003eaaa000be1e6000",
            "3a468000b3800000434b40003dccc000",
        ),
    ),
    (
        "bf16",
        "0000008001007f008000803f7f7f7fff807f80ffc17f4940f7c201805a5aaa3e",
        concat!(
            "000000008000000000010000007f0000008000003f8000007f7f0000ff7f00007f800000ff8000007fc1000040490000",
            "c2f70000800100005a5a00003eaa0000",
        ),
    ),
];

#[test]
fn matches_ggml_reference_vectors() {
    let mut seen = std::collections::HashSet::new();
    for (name, input, output) in GGML_VECTORS {
        let ty = ty_named(name);
        seen.insert(ty);
        let src = hex(input);
        let want: Vec<u32> = hex(output)
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut got = vec![0f32; want.len()];
        dequantize_row(ty, &src, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                *w,
                "{name} element {i}: got {g} want {}",
                f32::from_bits(*w)
            );
        }
        // The reference of this file agrees with ggml too.
        for (i, (g, w)) in row_ref(ty, &src).iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), *w, "reference {name} element {i}");
        }
    }
    assert_eq!(seen.len(), 8, "every type but f32 has ggml vectors");
}

#[test]
fn random_rows_match_reference() {
    let mut rng = Rng(42);
    for ty in GgmlType::ALL {
        for _ in 0..200 {
            let n = ty.block_elems() * rng.range(1, 12);
            let src = random_row(&mut rng, ty, n);
            let mut got = vec![0f32; n];
            dequantize_row(ty, &src, &mut got);
            for (i, (g, w)) in got.iter().zip(&row_ref(ty, &src)).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{} element {i}: {g} vs {w}", ty.name());
            }
        }
    }
}

#[test]
fn every_f16_pattern_matches_reference() {
    for h in 0..=u16::MAX {
        let mut got = [0f32];
        dequantize_row(GgmlType::F16, &h.to_le_bytes(), &mut got);
        assert_eq!(got[0].to_bits(), half_ref(h).to_bits(), "{h:#06x}");
    }
}

#[test]
fn every_q8_0_value_and_subnormal_scales() {
    // All 256 quants with a subnormal, a normal and a large negative scale.
    for d in [0x0001u16, 0x03ff, 0x3555, 0xfbff] {
        for start in [0usize, 32, 64, 96, 128, 160, 192, 224] {
            let mut b = d.to_le_bytes().to_vec();
            b.extend((start..start + 32).map(|q| q as u8));
            let mut got = [0f32; 32];
            dequantize_row(GgmlType::Q8_0, &b, &mut got);
            for (i, g) in got.iter().enumerate() {
                let want = ((start + i) as u8 as i8) as f32 * half_ref(d);
                assert_eq!(g.to_bits(), want.to_bits());
            }
        }
    }
}

#[test]
fn hand_vectors() {
    // q8_0: d = 0.5 (0x3800), qs = [3, -3, 127, -128, 0...]
    let mut b = vec![0x00, 0x38, 3, 0xfd, 0x7f, 0x80];
    b.resize(34, 0);
    let mut y = [0f32; 32];
    dequantize_row(GgmlType::Q8_0, &b, &mut y);
    assert_eq!(&y[..5], &[1.5, -1.5, 63.5, -64.0, 0.0]);

    // q4_0: d = 1.0 (0x3c00), qs[0] = 0xf0: y[0] = 0 - 8, y[16] = 15 - 8; other bytes 0x88: 0
    let mut b = vec![0x00, 0x3c, 0xf0];
    b.resize(18, 0x88);
    let mut y = [0f32; 32];
    dequantize_row(GgmlType::Q4_0, &b, &mut y);
    assert_eq!((y[0], y[16], y[1], y[17]), (-8.0, 7.0, 0.0, 0.0));

    // q4_1: d = 2.0 (0x4000), m = 0.5 (0x3800), qs[j] = 0x31: y[j] = 1*2 + 0.5, y[j+16] = 3*2 + 0.5
    let mut b = vec![0x00, 0x40, 0x00, 0x38];
    b.resize(20, 0x31);
    let mut y = [0f32; 32];
    dequantize_row(GgmlType::Q4_1, &b, &mut y);
    assert!(y[..16].iter().all(|v| *v == 2.5) && y[16..].iter().all(|v| *v == 6.5));

    // q5_0: d = 1.0, qh bits 0 and 16, qs[0] = 0x21: y[0] = (1|16)-16 = 1, y[16] = (2|16)-16 = 2,
    // y[1] = y[17] = 0 - 16
    let mut b = vec![0x00, 0x3c, 0x01, 0x00, 0x01, 0x00, 0x21];
    b.resize(22, 0);
    let mut y = [0f32; 32];
    dequantize_row(GgmlType::Q5_0, &b, &mut y);
    assert_eq!((y[0], y[16], y[1], y[17]), (1.0, 2.0, -16.0, -16.0));

    // q5_1: d = 0.5, m = -1.0, qh = 0x8000_0000 (element 31), qs[15] = 0xf0: y[31] = 31*0.5 - 1,
    // y[15] = 0*0.5 - 1
    let mut b = vec![0x00, 0x38, 0x00, 0xbc, 0, 0, 0, 0x80];
    b.resize(24, 0);
    b[8 + 15] = 0xf0;
    let mut y = [0f32; 32];
    dequantize_row(GgmlType::Q5_1, &b, &mut y);
    assert_eq!((y[31], y[15], y[0]), (14.5, -1.0, -1.0));

    // iq4_nl: d = -1.0 (0xbc00), qs[0] = 0x80: y[0] = -K[0] = 127, y[16] = -K[8] = -1
    let mut b = vec![0x00, 0xbc, 0x80];
    b.resize(18, 0);
    let mut y = [0f32; 32];
    dequantize_row(GgmlType::Iq4Nl, &b, &mut y);
    assert_eq!((y[0], y[16], y[1]), (127.0, -1.0, 127.0));

    // f16 / bf16 / f32
    let mut y = [0f32; 3];
    dequantize_row(GgmlType::F16, &[0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b], &mut y);
    assert_eq!(y, [1.0, -2.0, 65504.0]);
    dequantize_row(GgmlType::Bf16, &[0x80, 0x3f, 0x00, 0xc0, 0x49, 0x40], &mut y);
    assert_eq!(y, [1.0, -2.0, 3.140625]);
    let b: Vec<u8> = [0.25f32, -7.0, 1e30].iter().flat_map(|v| v.to_le_bytes()).collect();
    dequantize_row(GgmlType::F32, &b, &mut y);
    assert_eq!(y, [0.25, -7.0, 1e30]);
}

#[test]
#[should_panic]
fn dequantize_row_rejects_a_partial_block() {
    let mut y = [0f32; 16];
    dequantize_row(GgmlType::Q8_0, &[0u8; 17], &mut y);
}

// ---------------------------------------------------------------------------------------------
// Compaction
// ---------------------------------------------------------------------------------------------

/// Byte offset and length of the unit (block for rows, element for transposed) of cell `c` that
/// holds element `e`.
fn unit_at(g: &Geometry, c: usize, e: usize) -> (usize, usize) {
    let (be, bb) = (g.ty.block_elems(), g.ty.block_bytes());
    match g.layout {
        Layout::Rows { row_stride } => (c * row_stride + e / be * bb, bb),
        Layout::Transposed { chan_stride } => (e * chan_stride + c * bb, bb),
    }
}

/// The naive reference: every destination unit gets the original source unit, one at a time.
fn naive(g: &Geometry, orig: &[u8], moves: &Moves<'_>) -> Vec<u8> {
    let mut out = orig.to_vec();
    let step = match g.layout {
        Layout::Rows { .. } => g.ty.block_elems(),
        Layout::Transposed { .. } => 1,
    };
    for (&s, &d) in moves.src.iter().zip(moves.dst) {
        for e in moves.elems.clone().step_by(step) {
            let (so, n) = unit_at(g, s as usize, e);
            let (dof, _) = unit_at(g, d as usize, e);
            out[dof..dof + n].copy_from_slice(&orig[so..so + n]);
        }
    }
    out
}

/// A random geometry: rows (any type) or transposed (float types), with padded strides half the time.
/// Returns it with its number of KV heads and head size.
fn random_geometry(rng: &mut Rng, ty: GgmlType, transposed: bool) -> (Geometry, usize, usize) {
    let n_head_kv = rng.range(1, 4);
    let head_dim = if ty.is_quantized() {
        32 * rng.range(1, 3)
    } else {
        rng.range(1, 24)
    };
    let n_embd = n_head_kv * head_dim;
    let n_cells = rng.range(1, 160);
    let pad = if rng.below(2) == 0 { 0 } else { rng.range(1, 40) };
    let layout = if transposed {
        Layout::Transposed {
            chan_stride: n_cells * ty.block_bytes() + pad,
        }
    } else {
        Layout::Rows {
            row_stride: ty.row_bytes(n_embd).unwrap() + pad,
        }
    };
    (
        Geometry {
            ty,
            n_embd,
            n_cells,
            layout,
        },
        n_head_kv,
        head_dim,
    )
}

#[derive(Debug, Clone, Copy)]
enum Scenario {
    /// Random distinct sources and destinations, randomly paired (cycles, chains, overlaps).
    Random,
    /// Kept cells ascending, moved to the front `0..k` (the plan's form).
    Front,
    /// Ascending cells shifted towards the end.
    Back,
    /// A permutation of a random subset onto itself.
    Permute,
}

fn random_moves(rng: &mut Rng, n_cells: usize, sc: Scenario) -> (Vec<u32>, Vec<u32>) {
    let k = rng.range(0, n_cells);
    match sc {
        Scenario::Random => (rng.distinct(n_cells, k), rng.distinct(n_cells, k)),
        Scenario::Front => {
            let mut src = rng.distinct(n_cells, k);
            src.sort_unstable();
            (src, (0..k as u32).collect())
        }
        Scenario::Back => {
            let shift = rng.range(0, n_cells - k) as u32;
            let mut src = rng.distinct(n_cells - shift as usize, k);
            src.sort_unstable();
            let dst = src.iter().map(|s| s + shift).collect();
            (src, dst)
        }
        Scenario::Permute => {
            let src = rng.distinct(n_cells, k);
            let mut dst = src.clone();
            rng.shuffle(&mut dst);
            (src, dst)
        }
    }
}

#[test]
fn apply_matches_naive_reference() {
    let mut rng = Rng(7);
    let mut cases = 0;
    for ty in GgmlType::ALL {
        for transposed in [false, true] {
            if transposed && ty.is_quantized() {
                continue;
            }
            for sc in [Scenario::Random, Scenario::Front, Scenario::Back, Scenario::Permute] {
                for _ in 0..25 {
                    let (g, n_head_kv, head_dim) = random_geometry(&mut rng, ty, transposed);
                    g.validate().unwrap();
                    let len = g.min_bytes().unwrap() + rng.below(20);
                    let orig = rng.bytes(len);
                    let (src, dst) = random_moves(&mut rng, g.n_cells, sc);
                    let elems = if rng.below(2) == 0 {
                        0..g.n_embd
                    } else {
                        let h = rng.below(n_head_kv);
                        h * head_dim..(h + 1) * head_dim
                    };
                    let moves = Moves {
                        src: &src,
                        dst: &dst,
                        elems,
                    };
                    validate(&g, &moves).unwrap();
                    let want = naive(&g, &orig, &moves);
                    let mut buf = orig.clone();
                    apply(&mut LayerViewMut::new(g, &mut buf).unwrap(), &moves).unwrap();
                    assert!(buf == want, "{} {sc:?} {g:?} {moves:?}", ty.name());
                    // Spot check without the reference: the first destination unit equals the
                    // original first source unit.
                    if let (Some(&s), Some(&d)) = (src.first(), dst.first()) {
                        let (so, n) = unit_at(&g, s as usize, moves.elems.start);
                        let (dof, _) = unit_at(&g, d as usize, moves.elems.start);
                        assert_eq!(buf[dof..dof + n], orig[so..so + n]);
                    }
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 12 * 4 * 25);
}

#[test]
fn front_compaction_keeps_values() {
    // The plan's typical move set: 40 of 100 cells kept (32 scattered + the last 8), moved to 0..40.
    let g = Geometry::rows(GgmlType::Q4_0, 128, 100).unwrap();
    let mut rng = Rng(3);
    let orig = random_row(&mut rng, GgmlType::Q4_0, 128 * 100);
    let mut src: Vec<u32> = rng.distinct(92, 32);
    src.extend(92..100);
    src.sort_unstable();
    let dst = dst_cells(&(0..100).collect::<Vec<u32>>(), 40);
    let moves = Moves {
        src: &src,
        dst: &dst,
        elems: 0..128,
    };
    let mut buf = orig.clone();
    apply(&mut LayerViewMut::new(g, &mut buf).unwrap(), &moves).unwrap();
    assert_eq!(buf, naive(&g, &orig, &moves));
    let row = 4 * 18;
    for (j, &s) in src.iter().enumerate() {
        let s = s as usize;
        assert_eq!(buf[j * row..(j + 1) * row], orig[s * row..(s + 1) * row]);
        let (mut a, mut b) = (vec![0f32; 128], vec![0f32; 128]);
        dequantize_row(GgmlType::Q4_0, &buf[j * row..(j + 1) * row], &mut a);
        dequantize_row(GgmlType::Q4_0, &orig[s * row..(s + 1) * row], &mut b);
        assert_eq!(a, b);
    }
    assert_eq!(buf[40 * row..], orig[40 * row..]);
}

#[test]
fn errors_leave_buffer_untouched() {
    let mut rng = Rng(11);
    for ty in GgmlType::ALL {
        for transposed in [false, true] {
            if transposed && ty.is_quantized() {
                continue;
            }
            let (mut g, _, _) = random_geometry(&mut rng, ty, transposed);
            g.n_cells = g.n_cells.max(4);
            if let Layout::Transposed { chan_stride } = &mut g.layout {
                *chan_stride = (*chan_stride).max(4 * ty.block_bytes());
            }
            let n = g.n_cells as u32;
            let e = g.n_embd;
            let orig = rng.bytes(g.min_bytes().unwrap());
            type Case = (&'static str, Vec<u32>, Vec<u32>, std::ops::Range<usize>);
            let mut bad: Vec<Case> = vec![
                ("src out of range", vec![0, n], vec![1, 2], 0..e),
                ("dst out of range", vec![0, 1], vec![n, 2], 0..e),
                ("dst u32::MAX", vec![0], vec![u32::MAX], 0..e),
                ("duplicate dst", vec![0, 1, 3], vec![2, 2, 0], 0..e),
                ("duplicate src", vec![3, 1, 3], vec![0, 1, 2], 0..e),
                ("length mismatch", vec![0, 1], vec![2], 0..e),
                ("range past n_embd", vec![0], vec![1], 0..e + ty.block_elems()),
                ("empty range", vec![0], vec![1], 0..0),
            ];
            if ty.is_quantized() {
                bad.push(("misaligned start", vec![0], vec![1], 16..e));
                bad.push(("misaligned end", vec![0], vec![1], 0..e - 8));
            }
            for (what, src, dst, elems) in bad {
                let moves = Moves {
                    src: &src,
                    dst: &dst,
                    elems,
                };
                assert!(validate(&g, &moves).is_err(), "{what}");
                let mut buf = orig.clone();
                let r = apply(&mut LayerViewMut::new(g, &mut buf).unwrap(), &moves);
                assert!(matches!(r, Err(Error::InvalidArg(_))), "{} {what}: {r:?}", ty.name());
                assert!(buf == orig, "{} {what}: buffer changed", ty.name());
            }
        }
    }
}

#[test]
fn transposed_moves_single_elements_per_channel() {
    // n_embd 3, 4 cells, f16, chan_stride 10 (2 bytes of padding per channel).
    let g = Geometry {
        ty: GgmlType::F16,
        n_embd: 3,
        n_cells: 4,
        layout: Layout::Transposed { chan_stride: 10 },
    };
    let orig: Vec<u8> = (0..28u8).collect();
    let mut buf = orig.clone();
    let moves = Moves {
        src: &[3, 1],
        dst: &[0, 3],
        elems: 1..3,
    };
    apply(&mut LayerViewMut::new(g, &mut buf).unwrap(), &moves).unwrap();
    #[rustfmt::skip]
    let want: Vec<u8> = vec![
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, //          channel 0 untouched (and its padding)
        16, 17, 12, 13, 14, 15, 12, 13, 18, 19, // channel 1: c0 <- c3, c3 <- c1
        26, 27, 22, 23, 24, 25, 22, 23, //         channel 2 (the buffer ends without padding)
    ];
    assert_eq!(buf, want);
}

#[test]
fn rows_with_padded_stride_keep_padding() {
    // q8_0, 64 elements (68 bytes) in rows of 80 bytes: the 12 padding bytes never move.
    let g = Geometry {
        ty: GgmlType::Q8_0,
        n_embd: 64,
        n_cells: 5,
        layout: Layout::Rows { row_stride: 80 },
    };
    let orig: Vec<u8> = (0..4 * 80 + 68).map(|i| (i % 251) as u8).collect();
    let mut buf = orig.clone();
    let moves = Moves {
        src: &[4, 2],
        dst: &[0, 1],
        elems: 32..64,
    };
    apply(&mut LayerViewMut::new(g, &mut buf).unwrap(), &moves).unwrap();
    assert_eq!(buf[34..68], orig[4 * 80 + 34..4 * 80 + 68]);
    assert_eq!(buf[80 + 34..80 + 68], orig[2 * 80 + 34..2 * 80 + 68]);
    assert_eq!(buf[..34], orig[..34]);
    assert_eq!(buf[68..80 + 34], orig[68..80 + 34]);
    assert_eq!(buf[80 + 68..], orig[80 + 68..]);
}

// ---------------------------------------------------------------------------------------------
// Plan::compact
// ---------------------------------------------------------------------------------------------

const N_LAYER: usize = 3;
const N_HEAD_KV: usize = 2;
const HEAD_DIM: usize = 64;
const N_CELLS: usize = 50;

fn plan_with(groups: Vec<Vec<GroupPlan>>) -> Plan {
    let n_slots = groups.iter().flatten().map(|g| g.dst.len()).max().unwrap_or(0);
    Plan {
        params: Params::default(),
        shape: Shape {
            n_layer: groups.len(),
            heads: Heads {
                n_head: 4,
                n_head_kv: N_HEAD_KV,
                head_dim: HEAD_DIM,
            },
        },
        n_tokens: N_CELLS,
        window: N_CELLS - 8..N_CELLS,
        allocation: Allocation::Uniform,
        layers: groups
            .into_iter()
            .map(|g| LayerPlan {
                budget: g[0].kept.len(),
                groups: g,
                heads_used: vec![0, 1],
            })
            .collect(),
        n_slots,
        fallback_all_heads: false,
        ms_score: 0.0,
    }
}

/// A group keeping `k` random tokens plus the 8-token window (cell = token), moved to the front.
fn random_group(rng: &mut Rng, k: usize) -> GroupPlan {
    let mut kept = rng.distinct(N_CELLS - 8, k);
    kept.extend((N_CELLS - 8) as u32..N_CELLS as u32);
    kept.sort_unstable();
    let cells: Vec<u32> = (0..N_CELLS as u32).collect();
    let src = kept.iter().map(|&t| cells[t as usize]).collect();
    let dst = dst_cells(&cells, kept.len());
    GroupPlan { kept, src, dst }
}

struct Bufs {
    k_geom: Geometry,
    v_geom: Geometry,
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
}

/// Random K (rows, `N_HEAD_KV` heads of `HEAD_DIM`) and V (`N_HEAD_KV` heads of `v_head`) buffers.
fn make_bufs(rng: &mut Rng, k_ty: GgmlType, v_ty: GgmlType, v_transposed: bool, v_head: usize) -> Bufs {
    let k_geom = Geometry::rows(k_ty, N_HEAD_KV * HEAD_DIM, N_CELLS).unwrap();
    let v_geom = if v_transposed {
        Geometry::transposed(v_ty, N_HEAD_KV * v_head, N_CELLS).unwrap()
    } else {
        Geometry::rows(v_ty, N_HEAD_KV * v_head, N_CELLS).unwrap()
    };
    let k = (0..N_LAYER).map(|_| rng.bytes(k_geom.min_bytes().unwrap())).collect();
    let v = (0..N_LAYER).map(|_| rng.bytes(v_geom.min_bytes().unwrap())).collect();
    Bufs { k_geom, v_geom, k, v }
}

fn run_plan(plan: &Plan, b: &mut Bufs, with_v: bool) -> Result<(), Error> {
    let (kg, vg) = (b.k_geom, b.v_geom);
    let mut kv: Vec<LayerViewMut<'_>> = b.k.iter_mut().map(|x| LayerViewMut::new(kg, x).unwrap()).collect();
    let mut vv: Vec<LayerViewMut<'_>> = b.v.iter_mut().map(|x| LayerViewMut::new(vg, x).unwrap()).collect();
    plan.compact(&mut kv, if with_v { Some(&mut vv) } else { None })
}

/// The expected buffers: the naive reference applied group by group (head slices are disjoint).
fn expected(plan: &Plan, b: &Bufs) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let one = |g: &Geometry, bufs: &[Vec<u8>]| -> Vec<Vec<u8>> {
        bufs.iter()
            .zip(&plan.layers)
            .map(|(buf, lp)| {
                let n = lp.groups.len();
                let hd = g.n_embd / n;
                let mut out = buf.clone();
                for (h, gp) in lp.groups.iter().enumerate() {
                    let elems = if n == 1 { 0..g.n_embd } else { h * hd..(h + 1) * hd };
                    out = naive(
                        g,
                        &out,
                        &Moves {
                            src: &gp.src,
                            dst: &gp.dst,
                            elems,
                        },
                    );
                }
                out
            })
            .collect()
    };
    (one(&b.k_geom, &b.k), one(&b.v_geom, &b.v))
}

#[test]
fn plan_compact_per_layer_and_per_head() {
    let mut rng = Rng(5);
    for (k_ty, v_ty, v_tr, v_head) in [
        (GgmlType::F16, GgmlType::F16, true, HEAD_DIM),
        (GgmlType::Q8_0, GgmlType::Q8_0, false, HEAD_DIM),
        (GgmlType::Q4_0, GgmlType::Q5_1, false, 32),
        (GgmlType::Bf16, GgmlType::F32, true, 24),
    ] {
        for per_head in [false, true] {
            let n = if per_head { N_HEAD_KV } else { 1 };
            let groups = (0..N_LAYER)
                .map(|l| (0..n).map(|_| random_group(&mut rng, 4 + 5 * l)).collect())
                .collect();
            let plan = plan_with(groups);
            let mut b = make_bufs(&mut rng, k_ty, v_ty, v_tr, v_head);
            let (want_k, want_v) = expected(&plan, &b);
            run_plan(&plan, &mut b, true).unwrap();
            assert!(b.k == want_k, "K {} per_head {per_head}", k_ty.name());
            assert!(b.v == want_v, "V {} per_head {per_head}", v_ty.name());
            // K only: V untouched.
            let mut b = make_bufs(&mut rng, k_ty, v_ty, v_tr, v_head);
            let v_before = b.v.clone();
            let (want_k, _) = expected(&plan, &b);
            run_plan(&plan, &mut b, false).unwrap();
            assert!(b.k == want_k && b.v == v_before);
        }
    }
}

#[test]
fn plan_compact_bad_last_layer_writes_nothing() {
    let mut rng = Rng(9);
    for per_head in [false, true] {
        let n = if per_head { N_HEAD_KV } else { 1 };
        let good = |rng: &mut Rng| -> Vec<Vec<GroupPlan>> {
            (0..N_LAYER)
                .map(|_| (0..n).map(|_| random_group(rng, 10)).collect())
                .collect()
        };
        let last = N_LAYER - 1;
        let mut cases: Vec<(&str, Plan)> = Vec::new();

        let mut g = good(&mut rng);
        g[last][n - 1].dst[3] = N_CELLS as u32;
        cases.push(("dst out of range", plan_with(g)));

        let mut g = good(&mut rng);
        g[last][n - 1].src[0] = N_CELLS as u32 + 7;
        cases.push(("src out of range", plan_with(g)));

        let mut g = good(&mut rng);
        g[last][n - 1].dst[5] = g[last][n - 1].dst[4];
        cases.push(("duplicate dst", plan_with(g)));

        let mut g = good(&mut rng);
        g[last][n - 1].src.pop();
        cases.push(("length mismatch", plan_with(g)));

        let mut g = good(&mut rng);
        while g[last].len() < 3 {
            let extra = random_group(&mut rng, 3);
            g[last].push(extra);
        }
        cases.push(("neither 1 nor n_head_kv groups", plan_with(g)));

        let mut p = plan_with(good(&mut rng));
        p.layers.pop();
        cases.push(("fewer plan layers than buffers", p));

        for (what, plan) in cases {
            for with_v in [false, true] {
                let mut b = make_bufs(&mut rng, GgmlType::Q8_0, GgmlType::F16, true, HEAD_DIM);
                let (k0, v0) = (b.k.clone(), b.v.clone());
                let r = run_plan(&plan, &mut b, with_v);
                assert!(
                    matches!(r, Err(Error::InvalidArg(_))),
                    "{what} per_head {per_head}: {r:?}"
                );
                assert!(b.k == k0 && b.v == v0, "{what} per_head {per_head}: a buffer changed");
            }
        }
    }
}

#[test]
fn plan_compact_bad_v_slice_writes_nothing() {
    // 4 KV-head groups over a q8_0 V of 64 elements: 16-element head slices are not block aligned,
    // while the f16 K (128 elements, 32 per head) is fine. Nothing may move, K included.
    let mut rng = Rng(13);
    let groups = (0..N_LAYER)
        .map(|_| (0..4).map(|_| random_group(&mut rng, 6)).collect())
        .collect();
    let mut plan = plan_with(groups);
    plan.shape.heads.n_head_kv = 4;
    plan.shape.heads.head_dim = 32;
    let mut b = make_bufs(&mut rng, GgmlType::F16, GgmlType::Q8_0, false, 32);
    let (k0, v0) = (b.k.clone(), b.v.clone());
    let r = run_plan(&plan, &mut b, true);
    assert!(matches!(r, Err(Error::InvalidArg(_))), "{r:?}");
    assert!(b.k == k0 && b.v == v0);
    // Without V the same plan is valid for K.
    let (want_k, _) = expected(&plan, &b);
    run_plan(&plan, &mut b, false).unwrap();
    assert!(b.k == want_k && b.v == v0);
}

#[test]
fn plan_compact_wrong_v_count() {
    let mut rng = Rng(17);
    let plan = plan_with((0..N_LAYER).map(|_| vec![random_group(&mut rng, 5)]).collect());
    let mut b = make_bufs(&mut rng, GgmlType::F16, GgmlType::F16, false, HEAD_DIM);
    b.v.pop();
    let (k0, v0) = (b.k.clone(), b.v.clone());
    let r = run_plan(&plan, &mut b, true);
    assert!(matches!(r, Err(Error::InvalidArg(_))), "{r:?}");
    assert!(b.k == k0 && b.v == v0);
}
