//! The model profile: SRH ranking and layer weights, computed offline once per model.
//!
//! TODO(helper C): implement (serde JSON), with validation messages naming the mismatching field.

use crate::error::Result;

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
    pub calibration: serde_json::Value,
}

impl Profile {
    /// Parse and validate internal consistency (rankings are permutations, weights sum to 1, ...).
    pub fn from_json(text: &str) -> Result<Profile> {
        let _ = text;
        unimplemented!()
    }

    /// Check the profile against the model the caller describes; the error names every field that differs.
    pub fn check_model(&self, model: &ModelIdentity) -> Result<()> {
        let _ = model;
        unimplemented!()
    }

    /// The first `k` SRHs of layer `l`.
    pub fn srh(&self, l: usize, k: usize) -> &[usize] {
        let r = &self.head_ranking[l];
        &r[..k.min(r.len())]
    }
}

/// Fingerprint of a canonical metadata string: 64-bit FNV-1a, 16 lower-case hex digits.
pub fn fingerprint(meta: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in meta.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}
