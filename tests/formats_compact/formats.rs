//! Formats: an independent per-element reference of every ggml type, ggml's own output vectors, and
//! random rows compared bit for bit.

use super::*;

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
pub(super) fn random_row(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
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
