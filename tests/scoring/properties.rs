//! Property tests: whole plans, scores, pooling, selection and budgets against the reference.

use super::*;

#[test]
fn plans_match_reference() {
    let mut rng = Rng(0x5eed_0001);
    let mut tally = Tally::default();
    let cases = 250;
    for _ in 0..cases {
        let case = random_case(&mut rng);
        check_case(&case, &mut tally);
    }
    eprintln!("{cases} cases: {tally:?}");
    assert!(tally.scored >= tally.groups / 3, "too few scored groups: {tally:?}");
    assert!(
        tally.tight * 10 <= tally.scored,
        "too many near-ties to be a strict test: {tally:?}"
    );
}

#[test]
fn every_method_and_option_is_exercised() {
    // A fixed sweep over the discrete options on one mid-sized shape, so that every combination runs.
    let mut rng = Rng(0x5eed_0002);
    let mut tally = Tally::default();
    for method in [
        Method::CompressKv,
        Method::SnapKv,
        Method::PyramidKv,
        Method::StreamingLlm,
        Method::SnapKvSrh,
        Method::Gate,
    ] {
        for per_head in [false, true] {
            for fill in [false, true] {
                for chunk in [0, 8, 16] {
                    for pool in [PoolKind::Avg, PoolKind::Max] {
                        let mut case = random_case(&mut rng);
                        case.params.method = method;
                        case.params.per_head = per_head;
                        case.params.fill = fill;
                        case.params.chunk = chunk;
                        case.params.pool = pool;
                        if (method == Method::SnapKvSrh || method == Method::Gate) && case.profile.is_none()
                            || method == Method::CompressKv && case.profile.is_none() && rng.coin()
                        {
                            case.profile = Some(random_profile(&mut rng, case.shape));
                        }
                        check_case(&case, &mut tally);
                    }
                }
            }
        }
    }
    eprintln!("sweep: {tally:?}");
}

#[test]
fn head_scores_and_pooling_match_reference() {
    let mut rng = Rng(0x5eed_0003);
    let mut worst = 0f64;
    for _ in 0..60 {
        let case = random_case(&mut rng);
        let a = case.attn();
        let n = case.n();
        let we = case.params.window_end.unwrap_or(n);
        let ws = we - case.params.window;
        let inputs = case.inputs();
        for (l, li) in inputs.iter().enumerate() {
            let heads: Vec<usize> = (0..a.n_head).rev().collect();
            let got = head_scores(&li.keys, &case.cells, case.shape.heads, li.queries, ws..we, &heads).unwrap();
            assert_eq!(got.len(), heads.len());
            for (j, &h) in heads.iter().enumerate() {
                let want = rf::head_scores(&case.layers[l].keys, &case.layers[l].queries, a, ws, we, h);
                assert_eq!(got[j].len(), ws);
                for k in [1, 3, 5, 15] {
                    for kind in [PoolKind::Avg, PoolKind::Max] {
                        let p = pool(&got[j], k, kind);
                        let q = rf::pool(&want, k, kind);
                        for (x, y) in p.iter().zip(&q) {
                            assert!(*y > 0.0, "scores are sums of probabilities");
                            let e = (*x as f64 - y).abs() / y;
                            worst = worst.max(e);
                            assert!(e <= TOL / 10.0, "pooled score {x} vs {y} (k {k} {kind:?})");
                        }
                    }
                }
            }
        }
    }
    eprintln!("worst relative error of a score: {worst:e}");
}

#[test]
fn selection_matches_reference_on_identical_scores() {
    // Same f32 scores into the library and (as f64) into the reference: no rounding, exact equality.
    let mut rng = Rng(0x5eed_0004);
    for _ in 0..3000 {
        let n = rng.range(1, 200);
        let we = rng.range(0, n);
        let ws = rng.range(0, we);
        let levels = rng.pick(&[3usize, 10, 1000]); // few levels: many ties
        let scores: Vec<f32> = (0..ws).map(|_| rng.below(levels) as f32 / levels as f32).collect();
        let s64: Vec<f64> = scores.iter().map(|&x| x as f64).collect();
        let n_sink = rng.pick(&[0, 1, 4, 300]);
        let k = rng.range(0, n + 3);
        let chunk = rng.pick(&[0, 1, 2, 8, 16, 500]);
        let got = select(&scores, n, ws..we, n_sink, k, chunk);
        let want = rf::select(&s64, n, ws, we, n_sink, k, chunk);
        assert_eq!(
            got, want.kept,
            "n {n} window {ws}..{we} sink {n_sink} k {k} chunk {chunk} {scores:?}"
        );
        let got = compresskv::select::streaming(n, ws..we, n_sink, k);
        assert_eq!(
            got,
            rf::streaming(n, ws, n_sink, k),
            "streaming n {n} window {ws}..{we} sink {n_sink} k {k}"
        );
    }
}

#[test]
fn budgets_match_reference_and_sum_exactly() {
    let mut rng = Rng(0x5eed_0005);
    for _ in 0..3000 {
        let n_layer = rng.range(1, 40);
        let any = rng.range(1, 5000);
        let avg = rng.pick(&[1, 2, 3, 7, 32, 100, 256, 1000, any]);
        let floor = rng.range(0, avg.min(64));
        let mut w: Vec<f64> = (0..n_layer).map(|_| rng.unit().powi(rng.range(1, 6) as i32)).collect();
        let s: f64 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= s);
        for alloc in [
            Allocation::Uniform,
            Allocation::Pyramid {
                beta: rng.pick(&[1.0, 1.5, 5.0, 20.0, 100.0]),
            },
            Allocation::Weighted(w.clone()),
        ] {
            let got = allocate(&alloc, avg, n_layer, floor).unwrap();
            assert_eq!(
                got,
                rf::allocate(&alloc, avg, n_layer, floor),
                "{alloc:?} avg {avg} L {n_layer} floor {floor}"
            );
            assert_eq!(got.iter().sum::<usize>(), avg * n_layer);
            if let Allocation::Weighted(_) = alloc {
                assert!(got.iter().all(|&b| b >= floor && b <= 3 * avg), "{got:?}");
            }
        }
    }
}

#[test]
fn budget_at_least_n_keeps_everything() {
    let mut rng = Rng(0x5eed_0006);
    for _ in 0..60 {
        let mut case = random_case(&mut rng);
        let n = case.n();
        case.params.budget = rng.range(n, 3 * n);
        case.params.floor = 0;
        // weighted and pyramid budgets vary by layer; the fill form gives every layer the maximum
        let plan = case.build().unwrap();
        for (l, lp) in plan.layers.iter().enumerate() {
            let k = if case.params.fill {
                plan.layers.iter().map(|l| l.budget).max().unwrap()
            } else {
                lp.budget
            };
            if k < n {
                continue;
            }
            for gp in &lp.groups {
                assert_eq!(gp.kept, (0..n as u32).collect::<Vec<_>>(), "layer {l}");
                assert_eq!(gp.src, case.cells);
            }
        }
        if case.params.method == Method::SnapKv || case.params.method == Method::StreamingLlm {
            assert_eq!(plan.n_slots, n);
        }
    }
}
