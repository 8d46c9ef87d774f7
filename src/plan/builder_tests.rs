//! Unit tests of the plan builder: small hand-built caches whose plans are computed by hand, and external scores.

use super::*;
use crate::layout::{Geometry, LayerView};
use crate::types::GgmlType;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn one_head() -> Shape {
    Shape {
        n_layer: 1,
        heads: Heads {
            n_head: 1,
            n_head_kv: 1,
            head_dim: 1,
        },
    }
}

fn params(method: Method, budget: usize) -> Params {
    Params {
        method,
        budget,
        window: 1,
        pool_kernel: 1,
        ..Params::default()
    }
}

#[test]
fn snapkv_by_hand() {
    // token t's key is keys[t]; query 1: token 1 scores best, then 3, then 2.
    let keys = [0.0, 3.0, 1.0, 2.0, 0.0, 0.0];
    // cells reversed: token t lives in cell 5 - t
    let cells = [5, 4, 3, 2, 1, 0];
    let mut buf = vec![0f32; 6];
    for (t, &c) in cells.iter().enumerate() {
        buf[c as usize] = keys[t];
    }
    let bytes = f32_bytes(&buf);
    let view = LayerView::new(Geometry::rows(GgmlType::F32, 1, 6).unwrap(), &bytes).unwrap();
    let li = [LayerInput {
        keys: view,
        queries: &[1.0],
    }];
    let plan = build(&params(Method::SnapKv, 3), one_head(), None, &cells, &li).unwrap();
    let g = &plan.layers[0].groups[0];
    assert_eq!(g.kept, vec![1, 3, 5]);
    assert_eq!(g.src, vec![4, 2, 0]);
    assert_eq!(g.dst, vec![0, 1, 2]);
    assert_eq!((plan.n_slots, plan.window.clone(), plan.layers[0].budget), (3, 5..6, 3));
    assert_eq!(plan.layers[0].heads_used, vec![0]);
    assert!(!plan.fallback_all_heads);
    // CompressKV without a profile: the same, flagged
    let plan = build(&params(Method::CompressKv, 3), one_head(), None, &cells, &li).unwrap();
    assert_eq!(plan.layers[0].groups[0].kept, vec![1, 3, 5]);
    assert!(plan.fallback_all_heads);
    // budget >= n keeps everything; ratio 0.5 of 6 = 3
    let plan = build(&params(Method::SnapKv, 6), one_head(), None, &cells, &li).unwrap();
    assert_eq!(plan.layers[0].groups[0].kept, (0..6).collect::<Vec<u32>>());
    let p = Params {
        budget: 0,
        ratio: 0.5,
        ..params(Method::SnapKv, 0)
    };
    let plan = build(&p, one_head(), None, &cells, &li).unwrap();
    assert_eq!(
        (plan.params.budget, plan.layers[0].groups[0].kept.clone()),
        (3, vec![1, 3, 5])
    );
    // StreamingLLM: no queries needed; sinks default to 4
    let li = [LayerInput {
        keys: view,
        queries: &[],
    }];
    let plan = build(&params(Method::StreamingLlm, 5), one_head(), None, &cells, &li).unwrap();
    assert_eq!(plan.layers[0].groups[0].kept, vec![0, 1, 2, 3, 5]);
    assert_eq!(plan.params.n_sink, 4);
    assert!(plan.layers[0].heads_used.is_empty());
}

/// An external scorer that returns the library's own scores gives the same plan; one that returns the
/// wrong number of scores, or fails, makes no plan.
#[test]
fn external_scores() {
    let cells = [5u32, 4, 3, 2, 1, 0];
    let mut buf = vec![0f32; 6];
    for (t, &c) in cells.iter().enumerate() {
        buf[c as usize] = [0.0, 3.0, 1.0, 2.0, 0.0, 0.0][t];
    }
    let bytes = f32_bytes(&buf);
    let view = LayerView::new(Geometry::rows(GgmlType::F32, 1, 6).unwrap(), &bytes).unwrap();
    let li = [LayerInput {
        keys: view,
        queries: &[1.0],
    }];
    let prm = params(Method::SnapKv, 3);
    let host = build(&prm, one_head(), None, &cells, &li).unwrap();
    let mut calls = Vec::new();
    let mut same = |l: usize, hs: &[usize], w: std::ops::Range<usize>| {
        calls.push((l, hs.to_vec(), w.clone()));
        head_scores(&li[0].keys, &cells, one_head().heads, li[0].queries, w, hs)
    };
    let ext = build_from(&prm, one_head(), None, &cells, Source::External(&mut same)).unwrap();
    assert_eq!(calls, vec![(0, vec![0], 5..6)]);
    assert_eq!(ext.layers, host.layers);
    assert!(ext.external_scores && !host.external_scores);
    let mut short = |_: usize, hs: &[usize], w: std::ops::Range<usize>| Ok(vec![vec![0.0; w.start - 1]; hs.len()]);
    let e = build_from(&prm, one_head(), None, &cells, Source::External(&mut short)).unwrap_err();
    assert!(e.message().contains("the scorer returned"), "{e}");
    let mut nan = |_: usize, hs: &[usize], w: std::ops::Range<usize>| Ok(vec![vec![f32::NAN; w.start]; hs.len()]);
    let e = build_from(&prm, one_head(), None, &cells, Source::External(&mut nan)).unwrap_err();
    assert!(e.message().contains("not finite"), "{e}");
    let mut failing = |_: usize, _: &[usize], _: std::ops::Range<usize>| Err(Error::InvalidArg("device lost".into()));
    let e = build_from(&prm, one_head(), None, &cells, Source::External(&mut failing)).unwrap_err();
    assert!(e.message().contains("device lost"), "{e}");
}

#[test]
fn pyramid_fill_and_exact() {
    let bytes = f32_bytes(&[0.5, 0.1, 0.4, 0.2, 0.3, 0.0, 0.0, 0.0]);
    let view = LayerView::new(Geometry::rows(GgmlType::F32, 1, 8).unwrap(), &bytes).unwrap();
    let li = [LayerInput {
        keys: view,
        queries: &[1.0],
    }; 2];
    let shape = Shape {
        n_layer: 2,
        ..one_head()
    };
    let cells: Vec<u32> = (0..8).collect();
    // avg 3, beta 3: min 1, max 5 -> budgets 5, 1
    let p = Params {
        pyramid_beta: 3.0,
        ..params(Method::PyramidKv, 3)
    };
    let plan = build(&p, shape, None, &cells, &li).unwrap();
    assert_eq!(plan.allocation, Allocation::Pyramid { beta: 3.0 });
    assert_eq!(plan.layers.iter().map(|l| l.budget).collect::<Vec<_>>(), vec![5, 1]);
    for l in &plan.layers {
        assert_eq!(l.groups[0].kept, vec![0, 2, 3, 4, 7]);
    }
    assert_eq!(plan.n_slots, 5);
    let plan = build(&Params { fill: false, ..p }, shape, None, &cells, &li).unwrap();
    assert_eq!(plan.layers[0].groups[0].kept, vec![0, 2, 3, 4, 7]);
    assert_eq!(plan.layers[1].groups[0].kept, vec![7]);
    assert_eq!(plan.layers[1].groups[0].dst, vec![0]);
    assert_eq!(plan.n_slots, 5);
}

#[test]
fn errors_name_the_value() {
    let bytes = f32_bytes(&[0.0; 4]);
    let view = LayerView::new(Geometry::rows(GgmlType::F32, 1, 4).unwrap(), &bytes).unwrap();
    let li = [LayerInput {
        keys: view,
        queries: &[1.0],
    }];
    let cells = [0, 1, 2, 3];
    let p = params(Method::SnapKv, 2);
    let e = |p: &Params, cells: &[u32], li: &[LayerInput<'_>]| {
        build(p, one_head(), None, cells, li).unwrap_err().to_string()
    };
    assert!(e(&p, &[0, 1, 1, 3], &li).contains("cell 1 holds both token 1 and token 2"));
    assert!(e(&p, &[0, 1, 2, 4], &li).contains("cell 4 of token 3"));
    assert!(e(&p, &[], &li).contains("empty sequence"));
    assert!(e(&p, &cells, &[]).contains("0 layer inputs for n_layer 1"));
    assert!(e(
        &Params {
            budget: 0,
            ratio: 1.5,
            ..p.clone()
        },
        &cells,
        &li
    )
    .contains("ratio 1.5"));
    assert!(e(&Params { window: 0, ..p.clone() }, &cells, &li).contains("window length 0"));
    assert!(e(
        &Params {
            window_end: Some(5),
            ..p.clone()
        },
        &cells,
        &li
    )
    .contains("ending at 5"));
    assert!(e(
        &Params {
            pool_kernel: 4,
            ..p.clone()
        },
        &cells,
        &li
    )
    .contains("pool_kernel 4"));
    let li2 = [LayerInput {
        keys: view,
        queries: &[],
    }];
    assert!(e(&p, &cells, &li2).contains("queries hold 0 floats"));
}

fn gate_profile(weights: Vec<f32>) -> Profile {
    Profile {
        version: 1,
        model: crate::profile::ModelIdentity {
            arch: "test".into(),
            n_layer: 1,
            n_head: 1,
            n_head_kv: 1,
            head_dim: 1,
            fingerprint: "0123456789abcdef".into(),
        },
        head_ranking: vec![vec![0]],
        head_scores: vec![vec![1.0]],
        layer_weights: vec![1.0],
        calibration: serde_json::Value::Null,
        gate: Some(crate::gate::Gate {
            weights: vec![vec![weights]],
            fit: serde_json::Value::Null,
        }),
    }
}

#[test]
fn the_key_gate_by_hand_needs_no_queries_and_a_profile_with_a_gate() {
    // token t's key is keys[t] (head_dim 1): the gate's logit is -k^2 + 4k, so token 3 (k = 2, logit 4) is the
    // best prefix token, then tokens 1 and 2 (logit 3); the window is token 5
    let keys = [0.0f32, 3.0, 1.0, 2.0, 0.0, 0.0];
    let cells = [0u32, 1, 2, 3, 4, 5];
    let bytes = f32_bytes(&keys);
    let view = LayerView::new(Geometry::rows(GgmlType::F32, 1, 6).unwrap(), &bytes).unwrap();
    let li = [LayerInput {
        keys: view,
        queries: &[],
    }];
    let prof = gate_profile(vec![-1.0, 4.0, 0.0]);
    let plan = build(&params(Method::Gate, 2), one_head(), Some(&prof), &cells, &li).unwrap();
    assert_eq!(plan.layers[0].groups[0].kept, vec![3, 5]);
    assert_eq!(plan.layers[0].heads_used, vec![0]);
    // other weights, another choice: the logit k keeps token 1 (k = 3)
    let plan = build(
        &params(Method::Gate, 2),
        one_head(),
        Some(&gate_profile(vec![0.0, 1.0, 0.0])),
        &cells,
        &li,
    )
    .unwrap();
    assert_eq!(plan.layers[0].groups[0].kept, vec![1, 5]);
    // no profile, or a profile without a gate, or a gate of another shape: refused, naming what is missing
    let e = build(&params(Method::Gate, 2), one_head(), None, &cells, &li).unwrap_err();
    assert!(e.message().contains("key gate"), "{}", e.message());
    let mut no_gate = prof.clone();
    no_gate.gate = None;
    assert!(build(&params(Method::Gate, 2), one_head(), Some(&no_gate), &cells, &li).is_err());
    let e = build(
        &params(Method::Gate, 2),
        one_head(),
        Some(&gate_profile(vec![0.0; 5])),
        &cells,
        &li,
    )
    .unwrap_err();
    assert!(e.message().contains("gate.weights[0][0]"), "{}", e.message());
    // the gate scores from the keys: an external scorer is refused
    let mut scorer = |_: usize, _: &[usize], _: std::ops::Range<usize>| -> Result<Vec<Vec<f32>>> { Ok(vec![]) };
    let e = build_from(
        &params(Method::Gate, 2),
        one_head(),
        Some(&prof),
        &cells,
        Source::External(&mut scorer),
    )
    .unwrap_err();
    assert!(e.message().contains("from the keys"), "{}", e.message());
}

/// `head_reduce`: the mean of two heads keeps the cells both glance at, the maximum keeps the cell one of
/// them must read.
#[test]
fn heads_combine_by_mean_or_max() {
    let shape = Shape {
        n_layer: 1,
        heads: Heads {
            n_head: 2,
            n_head_kv: 1,
            head_dim: 1,
        },
    };
    let cells = [0u32, 1, 2, 3, 4];
    // token 0: read by head 0 only; tokens 1, 2: glanced at by both; token 3 by neither; 4 is the window
    let raw = [vec![0.9, 0.5, 0.4, 0.0], vec![0.0, 0.5, 0.4, 0.0]];
    let plan_with = |head_reduce| {
        let mut scorer =
            |_: usize, hs: &[usize], _: std::ops::Range<usize>| Ok(hs.iter().map(|&h| raw[h].clone()).collect());
        let p = Params {
            head_reduce,
            ..params(Method::SnapKv, 2)
        };
        build_from(&p, shape, None, &cells, Source::External(&mut scorer)).unwrap()
    };
    // mean: 0.45, 0.5, 0.4, 0 -> token 1 and the window
    assert_eq!(plan_with(PoolKind::Avg).layers[0].groups[0].kept, vec![1, 4]);
    // max: 0.9, 0.5, 0.4, 0 -> token 0 and the window
    assert_eq!(plan_with(PoolKind::Max).layers[0].groups[0].kept, vec![0, 4]);
}
