//! The model profile: SRH ranking and layer weights, computed offline once per model.
//!
//! Format (JSON, version 1):
//! ```json
//! {
//!   "version": 1,
//!   "model": {"arch": "llama", "n_layer": 30, "n_head": 9, "n_head_kv": 3, "head_dim": 64,
//!             "fingerprint": "0123456789abcdef"},
//!   "head_ranking": [[3, 0, ...], ...],   // n_layer rows, each a permutation of 0..n_head, best first
//!   "head_scores":  [[0.1, ...], ...],    // n_layer rows of n_head finite scores, in head order
//!   "layer_weights": [0.03, ...],         // n_layer finite values >= 0 summing to 1 (within 1e-6)
//!   "calibration": {...},                 // optional, free-form (tool, probes, data, seed, dates)
//!   "gate": {"weights": [[[...]]], "fit": {...}}  // optional: the key gate (crate::gate), n_layer x
//!                                         // n_head_kv vectors of 2 * head_dim + 1 finite weights
//! }
//! ```
//!
//! Invariants of a [`Profile`] returned by [`Profile::from_json`] / [`Profile::load`]: every rule above
//! holds, and `model.n_head % model.n_head_kv == 0`. Every error is an [`Error::Profile`] (or
//! [`Error::Io`] for an unreadable file) whose message names the offending field.
//!
//! [`find_profile`] picks a model's profile out of a directory of profiles by its identity (architecture,
//! shape and [`fingerprint`]).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Identity of the model a profile belongs to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelIdentity {
    /// GGUF `general.architecture`.
    pub arch: String,
    /// Layers.
    pub n_layer: usize,
    /// Query heads per layer.
    pub n_head: usize,
    /// KV heads per layer.
    pub n_head_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Fingerprint of the weights' metadata (see [`fingerprint`]).
    pub fingerprint: String,
}

/// A validated model profile.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    /// Format version (1).
    pub version: u32,
    /// Model identity.
    pub model: ModelIdentity,
    /// Per layer, all query heads ranked best first.
    pub head_ranking: Vec<Vec<usize>>,
    /// Per layer, per head mean retrieval score (same order as heads, not ranking).
    pub head_scores: Vec<Vec<f64>>,
    /// Layer weights `p_l`, non-negative, summing to 1.
    pub layer_weights: Vec<f64>,
    /// How it was calibrated (free-form but structured: tool, probes, data, seed, dates).
    #[serde(default)]
    pub calibration: serde_json::Value,
    /// The key gate of method `gate` (query-agnostic scoring), when calibrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<crate::gate::Gate>,
}

/// The only format version this library reads and writes.
pub const PROFILE_VERSION: u32 = 1;

/// Tolerance on `sum(layer_weights) == 1`.
pub const WEIGHT_SUM_TOLERANCE: f64 = 1e-6;

const TOP_FIELDS: [&str; 7] = [
    "version",
    "model",
    "head_ranking",
    "head_scores",
    "layer_weights",
    "calibration",
    "gate",
];
const MODEL_FIELDS: [&str; 6] = ["arch", "n_layer", "n_head", "n_head_kv", "head_dim", "fingerprint"];

fn perr(msg: String) -> Error {
    Error::Profile(msg)
}

/// Deserialize the required field `name` of `obj`, naming it (as `path`) in any error.
fn field<T: DeserializeOwned>(obj: &Map<String, Value>, name: &str, path: &str) -> Result<T> {
    let v = obj.get(name).ok_or_else(|| perr(format!("{path}: missing")))?;
    T::deserialize(v).map_err(|e| perr(format!("{path}: {e}")))
}

fn refuse_unknown(obj: &Map<String, Value>, known: &[&str], prefix: &str) -> Result<()> {
    for k in obj.keys() {
        if !known.contains(&k.as_str()) {
            return Err(perr(format!(
                "{prefix}{k}: unknown field (expected one of {})",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

impl Profile {
    /// Parse and validate internal consistency (rankings are permutations, weights sum to 1, ...).
    pub fn from_json(text: &str) -> Result<Profile> {
        let root: Value = serde_json::from_str(text).map_err(|e| perr(format!("not valid JSON: {e}")))?;
        let obj = root
            .as_object()
            .ok_or_else(|| perr("the profile is not a JSON object".into()))?;
        // The version first: a newer format may have other fields.
        let version: u64 = field(obj, "version", "version")?;
        if version != PROFILE_VERSION as u64 {
            return Err(perr(format!(
                "version: {version} is not supported (expected {PROFILE_VERSION})"
            )));
        }
        refuse_unknown(obj, &TOP_FIELDS, "")?;
        let mobj = obj
            .get("model")
            .ok_or_else(|| perr("model: missing".into()))?
            .as_object()
            .ok_or_else(|| perr("model: not a JSON object".into()))?;
        refuse_unknown(mobj, &MODEL_FIELDS, "model.")?;
        let model = ModelIdentity {
            arch: field(mobj, "arch", "model.arch")?,
            n_layer: field(mobj, "n_layer", "model.n_layer")?,
            n_head: field(mobj, "n_head", "model.n_head")?,
            n_head_kv: field(mobj, "n_head_kv", "model.n_head_kv")?,
            head_dim: field(mobj, "head_dim", "model.head_dim")?,
            fingerprint: field(mobj, "fingerprint", "model.fingerprint")?,
        };
        let p = Profile {
            version: PROFILE_VERSION,
            model,
            head_ranking: field(obj, "head_ranking", "head_ranking")?,
            head_scores: field(obj, "head_scores", "head_scores")?,
            layer_weights: field(obj, "layer_weights", "layer_weights")?,
            calibration: obj.get("calibration").cloned().unwrap_or(Value::Null),
            gate: match obj.get("gate") {
                None | Some(Value::Null) => None,
                Some(g) => Some(
                    <crate::gate::Gate as serde::Deserialize>::deserialize(g)
                        .map_err(|e| perr(format!("gate: {e}")))?,
                ),
            },
        };
        p.validate()?;
        Ok(p)
    }

    /// Check every invariant of the module doc.
    pub fn validate(&self) -> Result<()> {
        if self.version != PROFILE_VERSION {
            return Err(perr(format!(
                "version: {} is not supported (expected {PROFILE_VERSION})",
                self.version
            )));
        }
        let m = &self.model;
        if m.arch.is_empty() {
            return Err(perr("model.arch: empty".into()));
        }
        if m.fingerprint.is_empty() {
            return Err(perr("model.fingerprint: empty".into()));
        }
        for (name, v) in [
            ("n_layer", m.n_layer),
            ("n_head", m.n_head),
            ("n_head_kv", m.n_head_kv),
            ("head_dim", m.head_dim),
        ] {
            if v == 0 {
                return Err(perr(format!("model.{name}: must be > 0")));
            }
        }
        if m.n_head % m.n_head_kv != 0 {
            return Err(perr(format!(
                "model.n_head: {} is not a multiple of model.n_head_kv {}",
                m.n_head, m.n_head_kv
            )));
        }
        let (nl, nh) = (m.n_layer, m.n_head);
        if self.head_ranking.len() != nl {
            return Err(perr(format!(
                "head_ranking: {} rows, expected model.n_layer = {nl}",
                self.head_ranking.len()
            )));
        }
        for (l, row) in self.head_ranking.iter().enumerate() {
            if row.len() != nh {
                return Err(perr(format!(
                    "head_ranking[{l}]: {} entries, expected model.n_head = {nh}",
                    row.len()
                )));
            }
            let mut seen = vec![false; nh];
            for &h in row {
                if h >= nh {
                    return Err(perr(format!(
                        "head_ranking[{l}]: head {h} out of range (not a permutation of 0..{nh})"
                    )));
                }
                if std::mem::replace(&mut seen[h], true) {
                    return Err(perr(format!(
                        "head_ranking[{l}]: head {h} repeated (not a permutation of 0..{nh})"
                    )));
                }
            }
        }
        if self.head_scores.len() != nl {
            return Err(perr(format!(
                "head_scores: {} rows, expected model.n_layer = {nl}",
                self.head_scores.len()
            )));
        }
        for (l, row) in self.head_scores.iter().enumerate() {
            if row.len() != nh {
                return Err(perr(format!(
                    "head_scores[{l}]: {} entries, expected model.n_head = {nh}",
                    row.len()
                )));
            }
            if let Some(h) = row.iter().position(|s| !s.is_finite()) {
                return Err(perr(format!("head_scores[{l}][{h}]: {} is not finite", row[h])));
            }
        }
        if self.layer_weights.len() != nl {
            return Err(perr(format!(
                "layer_weights: {} values, expected model.n_layer = {nl}",
                self.layer_weights.len()
            )));
        }
        for (l, &w) in self.layer_weights.iter().enumerate() {
            if !w.is_finite() || w < 0.0 {
                return Err(perr(format!("layer_weights[{l}]: {w} is not a finite value >= 0")));
            }
        }
        let sum: f64 = self.layer_weights.iter().sum();
        if (sum - 1.0).abs() > WEIGHT_SUM_TOLERANCE {
            return Err(perr(format!(
                "layer_weights: sum {sum} is not 1 (tolerance {WEIGHT_SUM_TOLERANCE})"
            )));
        }
        if let Some(g) = &self.gate {
            g.validate(nl, m.n_head_kv, m.head_dim)?;
        }
        Ok(())
    }

    /// Read, parse and validate the profile in the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Profile> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|e| Error::Io(format!("cannot read profile {}: {e}", path.display())))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| perr(format!("{}: not UTF-8 text: {e}", path.display())))?;
        Profile::from_json(text).map_err(|e| perr(format!("{}: {}", path.display(), e.message())))
    }

    /// The profile as pretty-printed JSON (the format [`Profile::from_json`] reads).
    pub fn to_json_pretty(&self) -> String {
        // Serializing plain structs, vectors, finite floats and a `Value` cannot fail (serde_json fails only
        // on maps with non-string keys, which this type has none of).
        serde_json::to_string_pretty(self).expect("a Profile always serializes")
    }

    /// Check the profile against the model the caller describes; the error names every field that differs.
    pub fn check_model(&self, model: &ModelIdentity) -> Result<()> {
        let p = &self.model;
        let mut diffs = Vec::new();
        if p.arch != model.arch {
            diffs.push(format!("arch: profile {:?}, model {:?}", p.arch, model.arch));
        }
        for (name, a, b) in [
            ("n_layer", p.n_layer, model.n_layer),
            ("n_head", p.n_head, model.n_head),
            ("n_head_kv", p.n_head_kv, model.n_head_kv),
            ("head_dim", p.head_dim, model.head_dim),
        ] {
            if a != b {
                diffs.push(format!("{name}: profile {a}, model {b}"));
            }
        }
        if p.fingerprint != model.fingerprint {
            diffs.push(format!(
                "fingerprint: profile {}, model {}",
                p.fingerprint, model.fingerprint
            ));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(perr(format!("the profile is for another model: {}", diffs.join("; "))))
        }
    }

    /// The first `k` SRHs of layer `l`.
    pub fn srh(&self, l: usize, k: usize) -> &[usize] {
        let r = &self.head_ranking[l];
        &r[..k.min(r.len())]
    }
}

/// At most this many examined files are named, with their reasons, in [`find_profile`]'s no-match error.
const FIND_LISTED: usize = 8;

/// The profile for `model` among the `*.json` files directly in `dir` (not its subdirectories).
///
/// The files are tried in sorted file-name order, each read with [`Profile::load`]; the first whose
/// [`Profile::check_model`] passes is returned with its path (`dir` joined with the file name). Files that
/// cannot be read or parsed are passed over, not fatal.
///
/// Errors: [`Error::Io`] naming `dir` if it is missing or cannot be listed; [`Error::Profile`] if no file
/// matches, saying so for the model's arch and fingerprint and listing each file examined (the first 8,
/// then how many more) with why it was passed over.
pub fn find_profile(dir: impl AsRef<Path>, model: &ModelIdentity) -> Result<(PathBuf, Profile)> {
    let dir = dir.as_ref();
    let io = |e: std::io::Error| Error::Io(format!("cannot read the profile directory {}: {e}", dir.display()));
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        // `is_file` follows symbolic links: a link to a profile counts, a directory named `x.json` does not.
        if path.extension().is_some_and(|x| x == "json") && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));

    let mut passed_over = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        match Profile::load(&path).and_then(|p| p.check_model(model).map(|()| p)) {
            Ok(p) => return Ok((path, p)),
            Err(e) => {
                // `load` names the file in its messages: drop that, the list names it once.
                let shown = path.display().to_string();
                let m = e.message();
                let reason = if let Some(r) = m.strip_prefix(&format!("{shown}: ")) {
                    r.to_string()
                } else if let Some(r) = m.strip_prefix(&format!("cannot read profile {shown}: ")) {
                    format!("cannot read: {r}")
                } else {
                    m.to_string()
                };
                passed_over.push(format!("{name} ({reason})"));
            }
        }
    }

    let head = format!(
        "no profile in {} is for this model (arch {:?}, fingerprint {})",
        dir.display(),
        model.arch,
        model.fingerprint
    );
    if passed_over.is_empty() {
        return Err(perr(format!("{head}: the directory has no *.json file")));
    }
    let n = passed_over.len();
    let mut list = passed_over.into_iter().take(FIND_LISTED).collect::<Vec<_>>().join(", ");
    if n > FIND_LISTED {
        list.push_str(&format!(", and {} more", n - FIND_LISTED));
    }
    let files = if n == 1 { "file" } else { "files" };
    Err(perr(format!("{head}; {n} {files} examined: {list}")))
}

/// Fingerprint of a canonical metadata string: 64-bit FNV-1a, 16 lower-case hex digits.
pub fn fingerprint(meta: &str) -> String {
    fingerprint_bytes(meta.as_bytes())
}

/// [`fingerprint`] of raw bytes (the C ABI hashes the caller's bytes without requiring UTF-8).
pub fn fingerprint_bytes(meta: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in meta {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Profile {
        Profile {
            version: 1,
            model: ModelIdentity {
                arch: "llama".into(),
                n_layer: 2,
                n_head: 4,
                n_head_kv: 2,
                head_dim: 32,
                fingerprint: fingerprint("meta"),
            },
            head_ranking: vec![vec![2, 0, 3, 1], vec![0, 1, 2, 3]],
            head_scores: vec![vec![0.2, 0.05, 0.4, 0.1], vec![0.3, 0.2, 0.1, 0.0]],
            layer_weights: vec![0.25, 0.75],
            calibration: serde_json::json!({"tool": "unit-test"}),
            gate: None,
        }
    }

    fn mutate(f: impl FnOnce(&mut Value)) -> String {
        let mut v = serde_json::to_value(sample()).unwrap();
        f(&mut v);
        v.to_string()
    }

    fn refused(text: &str, needle: &str) {
        match Profile::from_json(text) {
            Err(Error::Profile(m)) => assert!(m.contains(needle), "message {m:?} does not name {needle:?}"),
            other => panic!("expected a profile error naming {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn round_trip() {
        let p = sample();
        let q = Profile::from_json(&p.to_json_pretty()).unwrap();
        assert_eq!(p, q);
        assert_eq!(q.srh(0, 2), &[2, 0]);
        assert_eq!(q.srh(1, 9), &[0, 1, 2, 3]);
    }

    #[test]
    fn calibration_is_optional() {
        let p = Profile::from_json(&mutate(|v| {
            v.as_object_mut().unwrap().remove("calibration");
        }))
        .unwrap();
        assert_eq!(p.calibration, Value::Null);
    }

    #[test]
    fn corruptions_name_the_field() {
        refused("{", "JSON");
        refused("[1]", "object");
        refused(&mutate(|v| v["version"] = 2.into()), "version");
        refused(&mutate(|v| v["version"] = "one".into()), "version");
        refused(&mutate(|v| v["model"]["n_layer"] = 3.into()), "head_ranking");
        refused(&mutate(|v| v["model"]["n_layer"] = (-1).into()), "model.n_layer");
        refused(&mutate(|v| v["model"]["n_head_kv"] = 3.into()), "model.n_head");
        refused(&mutate(|v| v["model"]["head_dim"] = 0.into()), "model.head_dim");
        refused(&mutate(|v| v["model"]["arch"] = "".into()), "model.arch");
        refused(&mutate(|v| v["model"]["extra"] = 1.into()), "model.extra");
        refused(&mutate(|v| v["extra"] = 1.into()), "extra");
        refused(
            &mutate(|v| v["head_ranking"][1] = serde_json::json!([0, 1, 2, 2])),
            "head_ranking[1]",
        );
        refused(
            &mutate(|v| v["head_ranking"][0] = serde_json::json!([0, 1, 2, 4])),
            "head_ranking[0]",
        );
        refused(
            &mutate(|v| v["head_ranking"][0] = serde_json::json!([0, 1, 2])),
            "head_ranking[0]",
        );
        refused(
            &mutate(|v| v["head_scores"][1] = serde_json::json!([0.1])),
            "head_scores[1]",
        );
        refused(
            &mutate(|v| v["head_scores"] = serde_json::json!([[0.0, 0.0, 0.0, 0.0]])),
            "head_scores",
        );
        refused(
            &mutate(|v| v["layer_weights"] = serde_json::json!([0.5, 0.6])),
            "layer_weights",
        );
        refused(
            &mutate(|v| v["layer_weights"] = serde_json::json!([1.5, -0.5])),
            "layer_weights[1]",
        );
        refused(
            &mutate(|v| v["layer_weights"] = serde_json::json!([1.0])),
            "layer_weights",
        );
        refused(
            &mutate(|v| drop(v.as_object_mut().unwrap().remove("head_scores"))),
            "head_scores: missing",
        );
    }

    #[test]
    fn non_finite_scores_refused() {
        let mut p = sample();
        p.head_scores[1][2] = f64::NAN;
        let e = p.validate().unwrap_err();
        assert!(e.message().contains("head_scores[1][2]"), "{e}");
    }

    #[test]
    fn check_model_lists_every_difference() {
        let p = sample();
        p.check_model(&p.model.clone()).unwrap();
        let mut m = p.model.clone();
        m.n_layer = 3;
        m.head_dim = 64;
        m.fingerprint = "0000000000000000".into();
        let e = p.check_model(&m).unwrap_err();
        let msg = e.message();
        assert!(matches!(e, Error::Profile(_)));
        assert!(msg.contains("n_layer: profile 2, model 3"), "{msg}");
        assert!(msg.contains("head_dim: profile 32, model 64"), "{msg}");
        assert!(msg.contains("fingerprint: profile"), "{msg}");
        assert!(!msg.contains("arch"), "{msg}");
        assert!(!msg.contains("n_head:"), "{msg}");
    }

    #[test]
    fn fingerprint_is_fnv1a() {
        assert_eq!(fingerprint(""), "cbf29ce484222325");
        assert_eq!(fingerprint("a"), "af63dc4c8601ec8c");
        assert_eq!(fingerprint_bytes(b"foobar"), "85944171f73967e8");
    }

    #[test]
    fn load_reports_io_and_path() {
        let e = Profile::load("/nonexistent/dir/profile.json").unwrap_err();
        assert!(matches!(e, Error::Io(_)), "{e:?}");
        let dir = std::env::temp_dir().join(format!("ckv-profile-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.json");
        std::fs::write(&f, sample().to_json_pretty()).unwrap();
        assert_eq!(Profile::load(&f).unwrap(), sample());
        std::fs::write(&f, "{\"version\": 7}").unwrap();
        let e = Profile::load(&f).unwrap_err();
        assert!(e.message().contains("p.json") && e.message().contains("version"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
