//! Every bad input is an error naming it; `ratio` is read as a decimal.

use super::*;

/// The error of building `case` after `edit`: its variant must be `kind` and its message contain `text`.
fn expect_err(case: &Case, edit: impl FnOnce(&mut Case), kind: fn(&Error) -> bool, text: &str) {
    let mut c = Case {
        params: case.params.clone(),
        shape: case.shape,
        profile: case.profile.clone(),
        cells: case.cells.clone(),
        n_cells: case.n_cells,
        n_embd: case.n_embd,
        key_bytes: case.key_bytes.clone(),
        layers: case
            .layers
            .iter()
            .map(|l| rf::RefLayer {
                keys: l.keys.clone(),
                queries: l.queries.clone(),
            })
            .collect(),
    };
    edit(&mut c);
    match c.build() {
        Ok(_) => panic!("expected an error containing {text:?}"),
        Err(e) => {
            assert!(kind(&e), "wrong error kind: {e}");
            assert!(
                e.to_string().contains(text),
                "message {:?} lacks {text:?}",
                e.to_string()
            );
        }
    }
}

#[test]
fn every_bad_input_is_an_error_naming_it() {
    let mut rng = Rng(0x5eed_0007);
    let mut case = random_case(&mut rng);
    while case.n() < 40 || case.shape.heads.n_head_kv < 2 || case.params.window < 2 {
        case = random_case(&mut rng);
    }
    let w = case.params.window;
    case.params.method = Method::CompressKv;
    case.params.window_end = None;
    case.params.budget = 16;
    case.profile = Some(random_profile(&mut rng, case.shape));
    case.build().expect("the base case is valid");
    let n = case.n();
    let inv = |e: &Error| matches!(e, Error::InvalidArg(_));
    let prof = |e: &Error| matches!(e, Error::Profile(_));
    let nl = case.shape.n_layer;
    let h = case.shape.heads;

    expect_err(
        &case,
        |c| c.shape.n_layer += 1,
        inv,
        &format!("{nl} layer inputs for n_layer {}", nl + 1),
    );
    expect_err(&case, |c| c.shape.heads.n_head_kv += 1, inv, "n_head_kv");
    expect_err(&case, |c| c.shape.heads.n_head_kv = 0, inv, "n_head_kv 0");
    expect_err(
        &case,
        |c| c.shape.heads.head_dim *= 2,
        inv,
        &format!(
            "key n_embd {} != n_head_kv {} * head_dim {}",
            h.n_head_kv * h.head_dim,
            h.n_head_kv,
            2 * h.head_dim
        ),
    );
    expect_err(
        &case,
        |c| c.cells[3] = c.cells[7],
        inv,
        "holds both token 3 and token 7",
    );
    expect_err(
        &case,
        |c| c.cells[5] = c.n_cells as u32,
        inv,
        &format!("cell {} of token 5", case.n_cells),
    );
    expect_err(&case, |c| c.cells.clear(), inv, "empty sequence");
    expect_err(&case, |c| c.params.budget = 0, inv, "ratio 0");
    expect_err(
        &case,
        |c| {
            c.params.budget = 0;
            c.params.ratio = 1.25;
        },
        inv,
        "ratio 1.25",
    );
    expect_err(
        &case,
        |c| {
            c.params.budget = 0;
            c.params.ratio = f32::NAN;
        },
        inv,
        "ratio NaN",
    );
    expect_err(&case, |c| c.params.window = 0, inv, "window length 0");
    expect_err(
        &case,
        |c| c.params.window_end = Some(n + 1),
        inv,
        &format!("ending at {}", n + 1),
    );
    expect_err(
        &case,
        |c| c.params.window_end = Some(w - 1),
        inv,
        &format!("window of {w} tokens ending at {}", w - 1),
    );
    expect_err(&case, |c| c.params.pool_kernel = 6, inv, "pool_kernel 6");
    expect_err(
        &case,
        |c| c.layers[0].queries.pop().map(|_| ()).unwrap(),
        inv,
        "layer 0: queries hold",
    );
    expect_err(
        &case,
        |c| {
            c.params.method = Method::SnapKv;
            c.layers[nl - 1].queries.clear();
        },
        inv,
        &format!("layer {}: queries hold 0 floats", nl - 1),
    );
    expect_err(&case, |c| c.params.n_srh = 0, inv, "n_srh is 0");
    expect_err(
        &case,
        |c| c.profile.as_mut().unwrap().model.n_layer += 1,
        prof,
        &format!("n_layer {}", nl + 1),
    );
    expect_err(
        &case,
        |c| c.profile.as_mut().unwrap().model.n_head += 1,
        prof,
        &format!("n_head {}", h.n_head + 1),
    );
    expect_err(
        &case,
        |c| c.profile.as_mut().unwrap().head_ranking.pop().map(|_| ()).unwrap(),
        prof,
        "head_ranking",
    );
    expect_err(
        &case,
        |c| c.profile.as_mut().unwrap().layer_weights.push(0.0),
        prof,
        "layer_weights",
    );
    expect_err(
        &case,
        |c| c.profile.as_mut().unwrap().head_ranking[0][0] = h.n_head,
        prof,
        &format!("names head {}", h.n_head),
    );
    expect_err(
        &case,
        |c| {
            c.params.n_srh = 2;
            let r = &mut c.profile.as_mut().unwrap().head_ranking[0];
            r[1] = r[0];
        },
        prof,
        "twice",
    );
    expect_err(
        &case,
        |c| c.profile.as_mut().unwrap().layer_weights[0] = -1.0,
        prof,
        "p_0 = -1",
    );
    expect_err(
        &case,
        |c| c.profile.as_mut().unwrap().layer_weights[0] += 0.5,
        prof,
        "sum to",
    );
    // other methods ignore the profile entirely
    let mut c = random_case(&mut rng);
    c.params.method = Method::SnapKv;
    c.profile = Some(random_profile(&mut rng, Shape { n_layer: 9, ..c.shape }));
    assert!(c.build().is_ok());

    // a quantized key type whose blocks straddle heads (q8_0 blocks of 32, head_dim 16)
    let geom = Geometry::rows(GgmlType::Q8_0, 64, 4).unwrap();
    let bytes = vec![0u8; geom.min_bytes().unwrap()];
    let li = [LayerInput {
        keys: LayerView::new(geom, &bytes).unwrap(),
        queries: &[0.0; 4 * 16],
    }];
    let p = Params {
        method: Method::SnapKv,
        window: 1,
        budget: 2,
        ..Params::default()
    };
    let shape = Shape {
        n_layer: 1,
        heads: Heads {
            n_head: 4,
            n_head_kv: 4,
            head_dim: 16,
        },
    };
    let e = build(&p, shape, None, &[0, 1, 2, 3], &li).unwrap_err();
    assert!(
        e.to_string()
            .contains("head_dim 16 is not a multiple of the q8_0 block size 32"),
        "{e}"
    );
}

#[test]
fn ratio_is_read_as_a_decimal() {
    let mut rng = Rng(0x5eed_0008);
    let mut case = random_case(&mut rng);
    while case.n() < 100 {
        case = random_case(&mut rng);
    }
    case.cells.truncate(100);
    for l in &mut case.layers {
        l.keys.truncate(100);
    }
    case.params.window_end = None;
    case.params.budget = 0;
    for (ratio, want) in [(0.1f32, 10), (0.3, 30), (0.07, 7), (0.071, 8), (1.0, 100), (0.001, 1)] {
        case.params.ratio = ratio;
        assert_eq!(case.build().unwrap().params.budget, want, "ratio {ratio}");
    }
}
