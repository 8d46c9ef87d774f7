//! Profile JSON: round trip through text and file, and every kind of corruption refused with a message
//! naming the field; finding a model's profile in a directory.

use std::path::{Path, PathBuf};

use compresskv::profile::{find_profile, fingerprint, ModelIdentity, Profile};
use compresskv::Error;
use serde_json::{json, Value};

fn model() -> ModelIdentity {
    ModelIdentity {
        arch: "qwen2".into(),
        n_layer: 3,
        n_head: 6,
        n_head_kv: 2,
        head_dim: 64,
        fingerprint: fingerprint("qwen2|3|6|2|64"),
    }
}

fn profile() -> Profile {
    Profile {
        version: 1,
        model: model(),
        head_ranking: vec![vec![5, 4, 3, 2, 1, 0], vec![0, 2, 4, 1, 3, 5], vec![1, 0, 3, 2, 5, 4]],
        head_scores: vec![
            vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
            vec![0.6, 0.3, 0.5, 0.2, 0.4, 0.1],
            vec![0.5, 0.6, 0.3, 0.4, 0.1, 0.2],
        ],
        layer_weights: vec![0.2, 0.3, 0.5],
        calibration: json!({"tool": "ckv-calibrate", "probes": 600, "seed": 7, "data": ["held-out"]}),
        gate: None,
    }
}

fn text_with(f: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(&profile().to_json_pretty()).unwrap();
    f(&mut v);
    serde_json::to_string_pretty(&v).unwrap()
}

#[track_caller]
fn assert_refused(text: &str, field: &str) {
    match Profile::from_json(text) {
        Err(e @ Error::Profile(_)) => {
            assert!(
                e.message().contains(field),
                "message {:?} does not name {field:?}",
                e.message()
            );
            assert_eq!(e.status(), 5);
        }
        other => panic!("expected a profile error naming {field:?}, got {other:?}"),
    }
}

#[test]
fn round_trip_text() {
    let p = profile();
    let text = p.to_json_pretty();
    assert!(text.contains("\n  \"version\": 1"), "pretty JSON expected: {text}");
    assert_eq!(Profile::from_json(&text).unwrap(), p);
    // Field order and whitespace do not matter.
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(Profile::from_json(&v.to_string()).unwrap(), p);
}

#[test]
fn round_trip_file() {
    let dir = std::env::temp_dir().join(format!("ckv-tests-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.ckvprofile.json");
    std::fs::write(&path, profile().to_json_pretty()).unwrap();
    let p = Profile::load(&path).unwrap();
    assert_eq!(p, profile());
    p.check_model(&model()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_file_is_io() {
    let e = Profile::load("/definitely/not/here.json").unwrap_err();
    assert!(matches!(e, Error::Io(_)), "{e:?}");
    assert!(e.message().contains("/definitely/not/here.json"), "{e}");
}

#[test]
fn syntax_and_shape_errors() {
    assert_refused("", "JSON");
    assert_refused("{\"version\": 1,", "JSON");
    assert_refused("42", "object");
    assert_refused("{}", "version");
}

#[test]
fn version() {
    assert_refused(&text_with(|v| v["version"] = json!(2)), "version");
    assert_refused(&text_with(|v| v["version"] = json!(0)), "version");
    assert_refused(&text_with(|v| v["version"] = json!("1")), "version");
    assert_refused(
        &text_with(|v| drop(v.as_object_mut().unwrap().remove("version"))),
        "version",
    );
}

#[test]
fn model_fields() {
    for f in ["arch", "n_layer", "n_head", "n_head_kv", "head_dim", "fingerprint"] {
        assert_refused(
            &text_with(|v| drop(v["model"].as_object_mut().unwrap().remove(f))),
            &format!("model.{f}"),
        );
    }
    for f in ["n_layer", "n_head", "n_head_kv", "head_dim"] {
        assert_refused(&text_with(|v| v["model"][f] = json!(0)), &format!("model.{f}"));
        assert_refused(&text_with(|v| v["model"][f] = json!(-3)), &format!("model.{f}"));
        assert_refused(&text_with(|v| v["model"][f] = json!("many")), &format!("model.{f}"));
    }
    assert_refused(&text_with(|v| v["model"]["n_head_kv"] = json!(4)), "n_head_kv");
    assert_refused(&text_with(|v| v["model"]["arch"] = json!(7)), "model.arch");
    assert_refused(&text_with(|v| v["model"] = json!([1])), "model");
    assert_refused(&text_with(|v| v["model"]["rope"] = json!(1)), "model.rope");
}

#[test]
fn unknown_top_level_field() {
    assert_refused(&text_with(|v| v["layer_weight"] = json!([1.0])), "layer_weight");
}

#[test]
fn head_ranking() {
    // n_layer disagrees with the number of rows.
    assert_refused(&text_with(|v| v["model"]["n_layer"] = json!(4)), "head_ranking");
    assert_refused(
        &text_with(|v| v["head_ranking"][2] = json!([1, 0, 3, 2, 5])),
        "head_ranking[2]",
    );
    assert_refused(
        &text_with(|v| v["head_ranking"][1] = json!([0, 2, 4, 1, 3, 3])),
        "head_ranking[1]",
    );
    assert_refused(
        &text_with(|v| v["head_ranking"][0] = json!([5, 4, 3, 2, 1, 6])),
        "head_ranking[0]",
    );
    assert_refused(
        &text_with(|v| v["head_ranking"][0] = json!([5, 4, 3, 2, 1, -1])),
        "head_ranking",
    );
    assert_refused(&text_with(|v| v["head_ranking"] = json!("none")), "head_ranking");
    // n_head disagrees with the row length.
    assert_refused(&text_with(|v| v["model"]["n_head"] = json!(4)), "head_ranking[0]");
}

#[test]
fn head_scores() {
    assert_refused(
        &text_with(|v| drop(v["head_scores"].as_array_mut().unwrap().pop())),
        "head_scores",
    );
    assert_refused(
        &text_with(|v| drop(v["head_scores"][1].as_array_mut().unwrap().pop())),
        "head_scores[1]",
    );
    assert_refused(&text_with(|v| v["head_scores"][2][3] = json!(null)), "head_scores");
    assert_refused(&text_with(|v| v["head_scores"][2][3] = json!("x")), "head_scores");
    // 1e999 overflows f64: refused by the parser or as not finite, either way not accepted.
    let t = profile().to_json_pretty().replacen("0.4,", "1e999,", 1);
    assert!(Profile::from_json(&t).is_err());
    let mut p = profile();
    p.head_scores[0][1] = f64::INFINITY;
    assert!(p.validate().unwrap_err().message().contains("head_scores[0][1]"));
}

#[test]
fn layer_weights() {
    assert_refused(&text_with(|v| v["layer_weights"] = json!([0.5, 0.5])), "layer_weights");
    assert_refused(
        &text_with(|v| v["layer_weights"] = json!([0.2, 0.3, 0.6])),
        "layer_weights",
    );
    assert_refused(
        &text_with(|v| v["layer_weights"] = json!([1.2, -0.2, 0.0])),
        "layer_weights[1]",
    );
    assert_refused(
        &text_with(|v| v["layer_weights"] = json!([0.2, 0.3, "0.5"])),
        "layer_weights",
    );
    // Within the tolerance is accepted.
    Profile::from_json(&text_with(|v| v["layer_weights"] = json!([0.2, 0.3, 0.5000004]))).unwrap();
}

#[test]
fn check_model_names_every_field() {
    let p = profile();
    let other = ModelIdentity {
        arch: "llama".into(),
        n_layer: 30,
        n_head: 9,
        n_head_kv: 3,
        head_dim: 32,
        fingerprint: fingerprint("other"),
    };
    let e = p.check_model(&other).unwrap_err();
    assert!(matches!(e, Error::Profile(_)));
    let m = e.message();
    for (f, a, b) in [
        ("arch", "\"qwen2\"", "\"llama\""),
        ("n_layer", "3", "30"),
        ("n_head", "6", "9"),
        ("n_head_kv", "2", "3"),
        ("head_dim", "64", "32"),
        (
            "fingerprint",
            model().fingerprint.as_str(),
            fingerprint("other").as_str(),
        ),
    ] {
        let want = format!("{f}: profile {a}, model {b}");
        assert!(m.contains(&want), "{m:?} lacks {want:?}");
    }
    // Only the differing field is named.
    let mut one = model();
    one.n_head_kv = 1;
    let m = p.check_model(&one).unwrap_err().message().to_string();
    assert!(m.contains("n_head_kv: profile 2, model 1"), "{m}");
    assert!(
        !m.contains("n_layer") && !m.contains("fingerprint") && !m.contains("arch"),
        "{m}"
    );
}

/// A fresh, empty directory under the system temp dir, unique to this process and `tag`.
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ckv-tests-find-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// The test profile, but for the model `llama` with another fingerprint (same shape).
fn other_model_profile() -> Profile {
    let mut p = profile();
    p.model.arch = "llama".into();
    p.model.fingerprint = fingerprint("another model");
    p
}

#[test]
fn find_picks_the_first_matching_file_in_name_order() {
    let dir = temp_dir("match");
    write(&dir, "a-other.json", &other_model_profile().to_json_pretty());
    write(&dir, "b-broken.json", "{\"version\": 1,");
    let mut second = profile();
    second.calibration = json!({"tool": "second"});
    // Written before the first match, found after it: the order is by name, not by creation.
    write(&dir, "d-match.json", &second.to_json_pretty());
    write(&dir, "c-match.json", &profile().to_json_pretty());
    write(&dir, "0-not-a-profile.txt", "ignored: not *.json");
    std::fs::create_dir(dir.join("0-sub.json")).unwrap(); // a directory, not a file: ignored
    write(&dir.join("0-sub.json"), "x.json", &profile().to_json_pretty());

    let (path, p) = find_profile(&dir, &model()).unwrap();
    assert_eq!(path, dir.join("c-match.json"));
    assert_eq!(p, profile());

    // The other model's profile is found for that model, before the broken file and the later ones.
    let (path, p) = find_profile(&dir, &other_model_profile().model).unwrap();
    assert_eq!(path, dir.join("a-other.json"));
    assert_eq!(p, other_model_profile());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn find_without_a_match_lists_every_file_and_why() {
    let dir = temp_dir("nomatch");
    write(&dir, "a-other.json", &other_model_profile().to_json_pretty());
    write(&dir, "b-broken.json", "{\"version\": 1,");
    write(&dir, "c-v2.json", &text_with(|v| v["version"] = json!(2)));
    let mut want = model();
    want.n_layer = 30;
    want.fingerprint = fingerprint("wanted");
    let e = find_profile(&dir, &want).unwrap_err();
    assert!(matches!(e, Error::Profile(_)), "{e:?}");
    assert_eq!(e.status(), 5);
    let m = e.message();
    let head = format!(
        "no profile in {} is for this model (arch \"qwen2\", fingerprint {})",
        dir.display(),
        want.fingerprint
    );
    assert!(m.starts_with(&head), "{m}");
    assert!(m.contains("3 files examined"), "{m}");
    // Each file is named once, with the reason: the fields that differ, the parse error.
    let a = m.find("a-other.json (").expect(m);
    let b = m.find("b-broken.json (").expect(m);
    let c = m.find("c-v2.json (").expect(m);
    assert!(a < b && b < c, "{m}");
    let a_reason = &m[a..b];
    assert!(a_reason.contains("arch: profile \"llama\", model \"qwen2\""), "{m}");
    assert!(a_reason.contains("n_layer: profile 3, model 30"), "{m}");
    assert!(a_reason.contains("fingerprint: profile"), "{m}");
    assert!(!a_reason.contains("head_dim"), "{m}");
    assert!(m[b..c].contains("not valid JSON"), "{m}");
    assert!(m[c..].contains("version: 2 is not supported"), "{m}");
    assert_eq!(
        m.matches(&dir.display().to_string()).count(),
        1,
        "the path once, in the head: {m}"
    );
    assert!(!m.contains("more"), "{m}");

    // Beyond 8 files, the rest are counted.
    for i in 0..9 {
        write(&dir, &format!("z{i}.json"), "[]");
    }
    let m = find_profile(&dir, &want).unwrap_err().message().to_string();
    assert!(m.contains("12 files examined"), "{m}");
    assert!(m.contains("z4.json (the profile is not a JSON object)"), "{m}");
    assert!(!m.contains("z5.json"), "{m}");
    assert!(m.ends_with(", and 4 more"), "{m}");
    println!("{m}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn find_in_an_empty_directory() {
    let dir = temp_dir("empty");
    write(&dir, "profile.json.bak", &profile().to_json_pretty());
    let e = find_profile(&dir, &model()).unwrap_err();
    assert!(matches!(e, Error::Profile(_)), "{e:?}");
    let m = e.message();
    assert!(
        m.contains(&dir.display().to_string()) && m.contains("no *.json file"),
        "{m}"
    );
    assert!(m.contains(&model().fingerprint) && m.contains("qwen2"), "{m}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn find_in_a_missing_directory_is_io() {
    let dir = std::env::temp_dir().join(format!("ckv-tests-find-missing-{}/none", std::process::id()));
    let e = find_profile(&dir, &model()).unwrap_err();
    assert!(matches!(e, Error::Io(_)), "{e:?}");
    assert_eq!(e.status(), 6);
    assert!(e.message().contains(&dir.display().to_string()), "{e}");

    // A file is not a directory either.
    let tmp = temp_dir("file");
    let file = tmp.join("p.json");
    std::fs::write(&file, profile().to_json_pretty()).unwrap();
    let e = find_profile(&file, &model()).unwrap_err();
    assert!(matches!(e, Error::Io(_)) && e.message().contains("p.json"), "{e:?}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Every shipped profile validates, carries how it was calibrated, and has its two PNGs beside it.
#[test]
fn shipped_profiles_validate_and_have_their_pngs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("profiles/") {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let p = Profile::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            p.calibration["tool"],
            "llama-compresskv-calibrate",
            "{}",
            path.display()
        );
        assert!(
            p.calibration["srh"]["counted"].as_u64().unwrap() >= 2,
            "{}",
            path.display()
        );
        let stem = path.file_stem().unwrap().to_str().unwrap();
        for png in [format!("{stem}-heads.png"), format!("{stem}-layers.png")] {
            let bytes = std::fs::read(dir.join(&png)).unwrap_or_else(|e| panic!("{png}: {e}"));
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{png} is not a PNG");
        }
        // every shipped profile carries its key gate (method gate), fitted with a held-out R^2 above 0
        let g = p.gate.as_ref().unwrap_or_else(|| panic!("{}: no gate", path.display()));
        assert!(g.fit["held_out_r2"].as_f64().unwrap() > 0.0, "{}", path.display());
        n += 1;
    }
    assert!(n >= 1, "no profile in {}", dir.display());
}

#[test]
fn gate_round_trips_and_bad_gates_are_refused() {
    let mut p = profile();
    let nf = compresskv::gate::n_feat(64);
    p.gate = Some(compresskv::gate::Gate {
        weights: vec![vec![vec![0.5; nf]; 2]; 3],
        fit: json!({"lambda": 0.01}),
    });
    let text = p.to_json_pretty();
    assert_eq!(Profile::from_json(&text).unwrap(), p);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_str(&text).unwrap();
        f(&mut v);
        v.to_string()
    };
    assert_refused(&with(&|v| v["gate"]["weights"][2] = json!([])), "gate.weights[2]");
    assert_refused(
        &with(&|v| v["gate"]["weights"][1][0] = json!([1.0, 2.0])),
        "gate.weights[1][0]",
    );
    assert_refused(&with(&|v| v["gate"]["weights"] = json!([[[]]])), "gate.weights");
    assert_refused(&with(&|v| v["gate"] = json!({"fit": {}})), "gate");
    // a profile without a gate is still a profile
    assert_eq!(
        Profile::from_json(&with(&|v| v["gate"] = Value::Null)).unwrap().gate,
        None
    );
}
