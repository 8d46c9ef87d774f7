//! `Plan::compact`: hand-built plans (per layer and per KV head), and bad moves that must leave every
//! buffer of every layer untouched.

use super::compaction::naive;
use super::*;

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
        external_scores: false,
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
