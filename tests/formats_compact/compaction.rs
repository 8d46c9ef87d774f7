//! Compaction: random shapes, all 9 types, both layouts, random move sets, against a naive
//! element-by-element reference on a clone of the buffer; error cases leave the buffer untouched.

use super::formats::random_row;
use super::*;

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
pub(super) fn naive(g: &Geometry, orig: &[u8], moves: &Moves<'_>) -> Vec<u8> {
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
