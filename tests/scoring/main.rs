//! Property tests of scoring, selection, budgets and `plan::build` against the naive reference in
//! `tests/reference`, over random shapes, windows, methods and options (f32 keys, random cell
//! permutations), plus the error of every bad input.
//!
//! Kept sets are compared exactly. The one allowed exception: where the reference reports that its
//! outcome hinged on two scores closer than `TOL` (relative to the largest score), the library's f32
//! arithmetic may legitimately order them the other way; those groups get weaker checks, and the test
//! fails if more than a small fraction of groups needs them.
//!
//! One test binary: the random cases and their checks are here; `properties.rs` holds the property tests,
//! `errors.rs` the bad-input tests.

#[path = "../reference/mod.rs"]
mod reference;

mod errors;
mod properties;

use compresskv::budget::{allocate, Allocation};
use compresskv::layout::{Geometry, LayerView};
use compresskv::plan::{build, LayerInput, Method, Params, Plan, Shape};
use compresskv::profile::{ModelIdentity, Profile};
use compresskv::score::{head_scores, pool, Heads, PoolKind};
use compresskv::select::select;
use compresskv::types::GgmlType;
use compresskv::Error;
use reference as rf;

/// Relative tolerance on every score (library f32 vs reference f64).
const TOL: f64 = 2e-5;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn sym(&mut self) -> f32 {
        (self.unit() * 2.0 - 1.0) as f32
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
    fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }
}

/// One random problem: a sequence in random cells of every layer's f32 K buffer, window queries,
/// parameters and maybe a profile.
struct Case {
    params: Params,
    shape: Shape,
    profile: Option<Profile>,
    cells: Vec<u32>,
    n_cells: usize,
    /// Elements per cell of the K buffers.
    n_embd: usize,
    /// Per layer, the K buffer by cell (cells no token occupies hold NaN).
    key_bytes: Vec<Vec<u8>>,
    /// Per layer, keys by token and the queries.
    layers: Vec<rf::RefLayer>,
}

impl Case {
    fn inputs(&self) -> Vec<LayerInput<'_>> {
        let geom = Geometry::rows(GgmlType::F32, self.n_embd, self.n_cells).unwrap();
        self.key_bytes
            .iter()
            .zip(&self.layers)
            .map(|(b, l)| LayerInput {
                keys: LayerView::new(geom, b).unwrap(),
                queries: &l.queries,
            })
            .collect()
    }
    fn attn(&self) -> rf::Attn {
        let h = self.shape.heads;
        rf::Attn {
            n_head: h.n_head,
            n_head_kv: h.n_head_kv,
            head_dim: h.head_dim,
        }
    }
    fn build(&self) -> compresskv::Result<Plan> {
        build(
            &self.params,
            self.shape,
            self.profile.as_ref(),
            &self.cells,
            &self.inputs(),
        )
    }
    fn n(&self) -> usize {
        self.cells.len()
    }
}

fn random_profile(rng: &mut Rng, shape: Shape) -> Profile {
    let h = shape.heads;
    let head_ranking = (0..shape.n_layer)
        .map(|_| {
            let mut r: Vec<usize> = (0..h.n_head).collect();
            rng.shuffle(&mut r);
            r
        })
        .collect();
    let mut w: Vec<f64> = (0..shape.n_layer)
        .map(|_| if rng.below(5) == 0 { 0.0 } else { rng.unit().powi(3) })
        .collect();
    if w.iter().sum::<f64>() == 0.0 {
        w[0] = 1.0;
    }
    let s: f64 = w.iter().sum();
    w.iter_mut().for_each(|x| *x /= s);
    Profile {
        version: 1,
        model: ModelIdentity {
            arch: "test".into(),
            n_layer: shape.n_layer,
            n_head: h.n_head,
            n_head_kv: h.n_head_kv,
            head_dim: h.head_dim,
            fingerprint: "0000000000000000".into(),
        },
        head_ranking,
        head_scores: vec![vec![0.0; h.n_head]; shape.n_layer],
        layer_weights: w,
        calibration: serde_json::Value::Null,
        gate: Some(compresskv::gate::Gate {
            weights: (0..shape.n_layer)
                .map(|_| {
                    (0..h.n_head_kv)
                        .map(|_| {
                            (0..compresskv::gate::n_feat(h.head_dim))
                                .map(|_| (rng.unit() - 0.5) as f32 * 0.2)
                                .collect()
                        })
                        .collect()
                })
                .collect(),
            fit: serde_json::Value::Null,
        }),
    }
}

fn random_case(rng: &mut Rng) -> Case {
    let n_head_kv = rng.range(1, 4);
    let group = rng.range(1, 4);
    let heads = Heads {
        n_head: n_head_kv * group,
        n_head_kv,
        head_dim: rng.pick(&[32, 64]),
    };
    let shape = Shape {
        n_layer: rng.range(1, 3),
        heads,
    };
    let n = rng.range(1, 300);
    let window = rng.range(1, n.min(16));
    let window_end = if rng.coin() { None } else { Some(rng.range(window, n)) };
    let method = rng.pick(&[
        Method::CompressKv,
        Method::SnapKv,
        Method::PyramidKv,
        Method::StreamingLlm,
        Method::SnapKvSrh,
        Method::Gate,
    ]);
    let (budget, ratio) = match rng.below(8) {
        0 => (0, rng.pick(&[0.25f32, 0.5, 1.0])),
        1 => (rng.range(n, 2 * n + 10), 0.0),
        _ => (rng.range(1, n + 10), 0.0),
    };
    let params = Params {
        method,
        budget,
        ratio,
        window,
        window_end,
        n_sink: rng.pick(&[0, 0, 1, 4]),
        pool_kernel: rng.pick(&[1, 3, 5, 15]),
        pool: rng.pick(&[PoolKind::Avg, PoolKind::Max]),
        chunk: rng.pick(&[0, 8, 16]),
        n_srh: rng.range(1, heads.n_head),
        per_head: rng.coin(),
        head_reduce: rng.pick(&[PoolKind::Avg, PoolKind::Max]),
        fill: rng.coin(),
        floor: rng.pick(&[0, 1, 4, 32]),
        pyramid_beta: rng.pick(&[1.0, 2.5, 20.0]),
    };
    let profile =
        ((method == Method::CompressKv && rng.below(4) != 0) || method == Method::SnapKvSrh || method == Method::Gate)
            .then(|| random_profile(rng, shape));

    let n_cells = n + rng.below(20);
    let mut all: Vec<u32> = (0..n_cells as u32).collect();
    rng.shuffle(&mut all);
    let cells = all[..n].to_vec();
    let n_embd = n_head_kv * heads.head_dim;
    let amp = rng.pick(&[0.5f32, 1.0, 2.0, 3.0]);
    let we = window_end.unwrap_or(n);
    // Keys the library must never read are NaN: unused cells, and (sometimes) the suffix after the window.
    let nan_suffix = rng.coin();
    let mut key_bytes = Vec::new();
    let mut layers = Vec::new();
    for _ in 0..shape.n_layer {
        let keys: Vec<Vec<f32>> = (0..n)
            .map(|t| {
                (0..n_embd)
                    .map(|_| {
                        if nan_suffix && t >= we {
                            f32::NAN
                        } else {
                            rng.sym() * amp
                        }
                    })
                    .collect()
            })
            .collect();
        let mut by_cell = vec![f32::NAN; n_cells * n_embd];
        for (t, &c) in cells.iter().enumerate() {
            by_cell[c as usize * n_embd..][..n_embd].copy_from_slice(&keys[t]);
        }
        key_bytes.push(by_cell.iter().flat_map(|x| x.to_le_bytes()).collect());
        let queries = (0..window * heads.n_head * heads.head_dim)
            .map(|_| rng.sym() * amp)
            .collect();
        layers.push(rf::RefLayer { keys, queries });
    }
    Case {
        params,
        shape,
        profile,
        cells,
        n_cells,
        n_embd,
        key_bytes,
        layers,
    }
}

/// Tallies of one or more compared plans.
#[derive(Default, Debug)]
struct Tally {
    groups: usize,
    scored: usize,
    tight: usize,
    differing: usize,
}

/// Compare a built plan with the reference plan; panics with the case's description on a mismatch.
fn check_case(case: &Case, tally: &mut Tally) {
    let plan = case
        .build()
        .unwrap_or_else(|e| panic!("build failed: {e}\n{:?}", case.params));
    let r = rf::plan(&case.params, case.attn(), case.profile.as_ref(), &case.layers);
    let n = case.n();
    let ctx = || format!("params {:?} shape {:?} n {n}", case.params, case.shape);

    // budgets and resolution
    let budgets: Vec<usize> = plan.layers.iter().map(|l| l.budget).collect();
    assert_eq!(budgets, r.budgets, "{}", ctx());
    assert_eq!(budgets.iter().sum::<usize>(), r.avg * case.shape.n_layer, "{}", ctx());
    assert_eq!(plan.params.budget, r.avg, "{}", ctx());
    assert_eq!(plan.params.window_end, Some(r.window.1), "{}", ctx());
    assert_eq!(plan.params.n_sink, r.n_sink, "{}", ctx());
    assert_eq!(plan.window, r.window.0..r.window.1, "{}", ctx());
    assert_eq!(plan.allocation, r.allocation, "{}", ctx());
    assert_eq!(plan.fallback_all_heads, r.fallback, "{}", ctx());
    assert_eq!(plan.n_tokens, n);
    assert_eq!(plan.layers.len(), case.shape.n_layer);

    let (ws, we) = r.window;
    let n_groups = if case.params.per_head {
        case.shape.heads.n_head_kv
    } else {
        1
    };
    let mut max_kept = 0;
    for (l, lp) in plan.layers.iter().enumerate() {
        let expect_heads: Vec<usize> = if case.params.method == Method::StreamingLlm {
            Vec::new()
        } else {
            r.heads_used[l].clone()
        };
        assert_eq!(lp.heads_used, expect_heads, "layer {l} {}", ctx());
        assert_eq!(lp.groups.len(), n_groups, "{}", ctx());
        let k = if case.params.fill {
            (*r.budgets.iter().max().unwrap()).min(n)
        } else {
            r.budgets[l].min(n)
        };
        let sinks = r.n_sink.min(ws);
        let always = sinks + (n - ws);
        for (g, gp) in lp.groups.iter().enumerate() {
            tally.groups += 1;
            let kept = &gp.kept;
            max_kept = max_kept.max(kept.len());
            // structure
            assert!(
                kept.windows(2).all(|p| p[0] < p[1]),
                "not ascending: {kept:?} {}",
                ctx()
            );
            assert_eq!(
                kept.len(),
                if k >= n { n } else { k.max(always) },
                "layer {l} group {g} {}",
                ctx()
            );
            let set: std::collections::HashSet<u32> = kept.iter().cloned().collect();
            assert!(
                (ws..n).all(|i| set.contains(&(i as u32))),
                "window/suffix dropped {}",
                ctx()
            );
            assert!((0..sinks).all(|i| set.contains(&(i as u32))), "sink dropped {}", ctx());
            assert!(kept.iter().all(|&i| (i as usize) < n));
            let src: Vec<u32> = kept.iter().map(|&i| case.cells[i as usize]).collect();
            assert_eq!(gp.src, src);
            let mut low = case.cells.clone();
            low.sort_unstable();
            assert_eq!(gp.dst, low[..kept.len()].to_vec());
            // against the reference
            let sel = &r.groups[l][g];
            let tight = sel.margin <= TOL;
            if !r.scores[l].is_empty() {
                tally.scored += 1;
            }
            tally.tight += tight as usize;
            if *kept == sel.kept {
                continue;
            }
            assert!(
                tight,
                "layer {l} group {g}: kept {kept:?}\nreference {:?} (margin {:e})\n{}",
                sel.kept,
                sel.margin,
                ctx()
            );
            tally.differing += 1;
            assert_eq!(kept.len(), sel.kept.len());
            if case.params.chunk <= 1 {
                // token level: nothing dropped may beat anything kept by more than the tolerance
                let s = &r.scores[l][g];
                let kept_min = (0..ws)
                    .filter(|i| set.contains(&(*i as u32)))
                    .map(|i| s[i])
                    .fold(f64::INFINITY, f64::min);
                let dropped_max = (0..ws)
                    .filter(|i| !set.contains(&(*i as u32)))
                    .map(|i| s[i])
                    .fold(f64::NEG_INFINITY, f64::max);
                assert!(dropped_max <= kept_min * (1.0 + TOL), "{}", ctx());
            }
        }
    }
    let _ = we;
    assert_eq!(plan.n_slots, max_kept, "{}", ctx());
}
