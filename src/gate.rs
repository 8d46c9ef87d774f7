//! The key gate: a cheap query-agnostic scorer whose weights are fitted offline, per model, to
//! reconstruction scores (the attention a cell gets while the model repeats its context).
//!
//! # Algorithm
//!
//! ```text
//! features(k):  k = one KV head's cached key (head_dim values, post-RoPE), d = head_dim
//!     x = [k_0^2, .., k_{d-1}^2, k_0, .., k_{d-1}, 1]                     (N_FEAT(d) = 2d + 1 values)
//! score(l, g, token i) = exp(clamp(w[l][g] . features(K_l[cells[i], head g]), -MAX_LOGIT, MAX_LOGIT))
//!
//! accumulate(l, g, k, r):   r = the reconstruction score of the cell (mean over g's query heads)
//!     y = ln(r + EPS);  XtX += x x^T;  Xty += x y;  yty += y^2;  n += 1
//! fit(stats, lambda):       per (l, g), ridge with an unpenalized bias on standardized features
//!     var_j = XtX[j][j] / n - (XtX[j][bias] / n)^2
//!     solve (XtX + n * lambda * diag(var_j, bias: 0) + jitter) w = Xty      (Cholesky, f64)
//! held_out_r2(stats, w) = 1 - SSE(w) / SST,  SSE = yty - 2 w.Xty + w^T XtX w,  SST = yty - n * mean(y)^2
//! ```
//!
//! Why these features: a future query q scores a key with softmax weight proportional to
//! `exp(q.k / sqrt(d))`. When the queries to come are unknown, RoPE turns the fast-rotating channel
//! pairs of q into noise of zero mean and (per pair) isotropic variance, while slowly rotating pairs
//! keep their mean; then `ln E[exp(q.k / sqrt(d))] = sum_j mu_j k_j / sqrt(d) + sum_j s_j k_j^2 / (2d)`
//! (Expected Attention), linear in the key's components and their squares. The gate learns those
//! coefficients (and the softmax normalisation, in the bias) per layer and KV head from the
//! reconstruction scores, so it needs no query statistics, no decode and no RoPE tables: one dot
//! product per cached key.
//!
//! Invariants:
//! - [`Gate`] holds `n_layer x n_head_kv` weight vectors of `N_FEAT(head_dim)` finite values
//!   ([`Gate::validate`]); the profile refuses any other.
//! - [`Stats`] are sufficient statistics: adding two is the same as accumulating both's samples, so
//!   calibration prompts can be scored in separate runs and merged ([`Stats::merge_into_file`]).
//! - Scoring reads each key once, never writes a buffer and returns finite values.

use std::path::Path;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::layout::LayerView;
use crate::score::Heads;

/// Added to a reconstruction score before its logarithm.
pub const EPS: f64 = 1e-5;
/// Gate logits are clamped to `[-MAX_LOGIT, MAX_LOGIT]` before `exp`.
pub const MAX_LOGIT: f64 = 30.0;
/// The ridge strengths the calibration chooses from by held-out error.
pub const LAMBDAS: [f64; 6] = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];

/// Features per KV head of `head_dim` values: squares, values, bias.
pub const fn n_feat(head_dim: usize) -> usize {
    2 * head_dim + 1
}

/// The gate of a model: `weights[l][g]` for layer `l`, KV head `g`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gate {
    /// `n_layer x n_head_kv` vectors of [`n_feat`]`(head_dim)` weights.
    pub weights: Vec<Vec<Vec<f32>>>,
    /// How it was fitted (free-form: lambda, samples, held-out R^2 per layer).
    #[serde(default)]
    pub fit: serde_json::Value,
}

impl Gate {
    /// Check the shape against the model and that every weight is finite; the message names the entry.
    pub fn validate(&self, n_layer: usize, n_head_kv: usize, head_dim: usize) -> Result<()> {
        let nf = n_feat(head_dim);
        let bad = |m: String| Err(Error::Profile(format!("gate.weights{m}")));
        if self.weights.len() != n_layer {
            return bad(format!(
                ": {} layers, expected model.n_layer = {n_layer}",
                self.weights.len()
            ));
        }
        for (l, layer) in self.weights.iter().enumerate() {
            if layer.len() != n_head_kv {
                return bad(format!(
                    "[{l}]: {} KV heads, expected model.n_head_kv = {n_head_kv}",
                    layer.len()
                ));
            }
            for (g, w) in layer.iter().enumerate() {
                if w.len() != nf {
                    return bad(format!(
                        "[{l}][{g}]: {} weights, expected 2 * head_dim + 1 = {nf}",
                        w.len()
                    ));
                }
                if let Some(j) = w.iter().position(|x| !x.is_finite()) {
                    return bad(format!("[{l}][{g}][{j}]: {} is not finite", w[j]));
                }
            }
        }
        Ok(())
    }

    /// The gate scores of layer `l` for tokens `0..ws` (`cells[i]` the cell of token `i`): one vector per
    /// KV head. The keys were checked against `heads` and `cells` (`crate::score::check_keys`).
    pub fn layer_scores(
        &self,
        l: usize,
        keys: &LayerView<'_>,
        cells: &[u32],
        heads: Heads,
        ws: usize,
    ) -> Vec<Vec<f32>> {
        let d = heads.head_dim;
        (0..heads.n_head_kv)
            .map(|g| {
                let w = &self.weights[l][g];
                cells[..ws]
                    .par_iter()
                    .map_init(
                        || vec![0f32; d],
                        |k, &c| {
                            keys.dequantize(c as usize, g * d, k);
                            logit(w, k).clamp(-MAX_LOGIT, MAX_LOGIT).exp() as f32
                        },
                    )
                    .collect()
            })
            .collect()
    }
}

/// `w . features(k)` in f64 (non-finite keys give a non-finite logit, clamped by the caller: NaN stays NaN).
fn logit(w: &[f32], k: &[f32]) -> f64 {
    let d = k.len();
    let mut s = w[2 * d] as f64;
    for (j, &x) in k.iter().enumerate() {
        let x = x as f64;
        s += w[j] as f64 * x * x + w[d + j] as f64 * x;
    }
    s
}

fn features(k: &[f32], x: &mut [f64]) {
    let d = k.len();
    for (j, &v) in k.iter().enumerate() {
        let v = v as f64;
        x[j] = v * v;
        x[d + j] = v;
    }
    x[2 * d] = 1.0;
}

/// Sufficient statistics of the gate's regression for one (layer, KV head).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStats {
    /// Samples.
    pub n: f64,
    /// Sum of `y^2`.
    pub yy: f64,
    /// `X^T y` ([`n_feat`] values).
    pub xy: Vec<f64>,
    /// `X^T X`, row major ([`n_feat`]`^2` values, symmetric).
    pub xx: Vec<f64>,
}

/// The statistics of every (layer, KV head) of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Layers.
    pub n_layer: usize,
    /// KV heads per layer.
    pub n_head_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// `groups[l * n_head_kv + g]`.
    pub groups: Vec<GroupStats>,
}

const MAGIC: &[u8; 8] = b"CKVGATE1";

impl Stats {
    /// Empty statistics for a model shape.
    pub fn new(n_layer: usize, n_head_kv: usize, head_dim: usize) -> Stats {
        let nf = n_feat(head_dim);
        let g = GroupStats {
            n: 0.0,
            yy: 0.0,
            xy: vec![0.0; nf],
            xx: vec![0.0; nf * nf],
        };
        Stats {
            n_layer,
            n_head_kv,
            head_dim,
            groups: vec![g; n_layer * n_head_kv],
        }
    }

    /// Add layer `l`'s samples: tokens `0..ws` with reconstruction scores `recon[j]` of query heads `hs[j]`
    /// (each `ws` long). A KV head none of whose query heads is in `hs` gets no samples.
    pub fn accumulate(
        &mut self,
        l: usize,
        keys: &LayerView<'_>,
        cells: &[u32],
        heads: Heads,
        hs: &[usize],
        recon: &[Vec<f32>],
    ) {
        let (d, gs, nf) = (heads.head_dim, heads.group_size(), n_feat(heads.head_dim));
        let ws = recon.first().map_or(0, |r| r.len());
        let groups = &mut self.groups[l * self.n_head_kv..(l + 1) * self.n_head_kv];
        groups.par_iter_mut().enumerate().for_each(|(g, st)| {
            let mine: Vec<&Vec<f32>> = hs
                .iter()
                .zip(recon)
                .filter(|(&h, _)| h / gs == g)
                .map(|(_, r)| r)
                .collect();
            if mine.is_empty() {
                return;
            }
            let (mut k, mut x) = (vec![0f32; d], vec![0f64; nf]);
            for (i, &c) in cells[..ws].iter().enumerate() {
                let r = mine.iter().map(|v| v[i] as f64).sum::<f64>() / mine.len() as f64;
                if !r.is_finite() {
                    continue;
                }
                keys.dequantize(c as usize, g * d, &mut k);
                features(&k, &mut x);
                if x.iter().any(|v| !v.is_finite()) {
                    continue;
                }
                let y = (r.max(0.0) + EPS).ln();
                st.n += 1.0;
                st.yy += y * y;
                for a in 0..nf {
                    st.xy[a] += x[a] * y;
                    let row = &mut st.xx[a * nf..a * nf + nf];
                    for b in a..nf {
                        row[b] += x[a] * x[b];
                    }
                }
            }
        });
    }

    /// Mirror the upper triangle of every `X^T X` (accumulate fills only `b >= a`).
    fn symmetrize(&mut self) {
        let nf = n_feat(self.head_dim);
        for st in &mut self.groups {
            for a in 0..nf {
                for b in 0..a {
                    st.xx[a * nf + b] = st.xx[b * nf + a];
                }
            }
        }
    }

    /// Add `other` (same shape) to these statistics.
    pub fn add(&mut self, other: &Stats) -> Result<()> {
        if (self.n_layer, self.n_head_kv, self.head_dim) != (other.n_layer, other.n_head_kv, other.head_dim) {
            return Err(Error::InvalidArg(format!(
                "gate statistics of shape {}x{}x{} cannot be added to {}x{}x{}",
                other.n_layer, other.n_head_kv, other.head_dim, self.n_layer, self.n_head_kv, self.head_dim
            )));
        }
        for (a, b) in self.groups.iter_mut().zip(&other.groups) {
            a.n += b.n;
            a.yy += b.yy;
            a.xy.iter_mut().zip(&b.xy).for_each(|(x, y)| *x += y);
            a.xx.iter_mut().zip(&b.xx).for_each(|(x, y)| *x += y);
        }
        Ok(())
    }

    /// The statistics as bytes: magic, three u32 (n_layer, n_head_kv, head_dim), then per group n, yy,
    /// xy, xx as little-endian f64 (xx symmetric).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s = self.clone();
        s.symmetrize();
        let mut out = MAGIC.to_vec();
        for v in [self.n_layer, self.n_head_kv, self.head_dim] {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for g in &s.groups {
            for v in [g.n, g.yy].iter().chain(&g.xy).chain(&g.xx) {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Parse [`Stats::to_bytes`]'s format.
    pub fn from_bytes(b: &[u8]) -> Result<Stats> {
        let bad = |m: &str| Error::InvalidArg(format!("gate statistics: {m}"));
        if b.len() < 20 || &b[..8] != MAGIC {
            return Err(bad("not a gate statistics file"));
        }
        let u = |i: usize| u32::from_le_bytes(b[8 + 4 * i..12 + 4 * i].try_into().expect("4 bytes")) as usize;
        let (nl, nk, d) = (u(0), u(1), u(2));
        let nf = n_feat(d);
        let per = 2 + nf + nf * nf;
        if nl == 0 || nk == 0 || d == 0 || b.len() != 20 + nl * nk * per * 8 {
            return Err(bad("truncated, or its size does not match its shape"));
        }
        let mut vals = b[20..]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")));
        let mut s = Stats::new(nl, nk, d);
        for g in &mut s.groups {
            g.n = vals.next().expect("sized");
            g.yy = vals.next().expect("sized");
            g.xy.iter_mut().for_each(|x| *x = vals.next().expect("sized"));
            g.xx.iter_mut().for_each(|x| *x = vals.next().expect("sized"));
        }
        Ok(s)
    }

    /// Read the statistics file at `path`.
    pub fn load(path: &Path) -> Result<Stats> {
        let b = std::fs::read(path).map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
        Stats::from_bytes(&b).map_err(|e| Error::InvalidArg(format!("{}: {}", path.display(), e.message())))
    }

    /// Add these statistics to the file at `path` (created when missing), through a temporary file renamed
    /// over it, so that a failed write leaves the file as it was.
    pub fn merge_into_file(&self, path: &Path) -> Result<()> {
        let mut all = match std::fs::metadata(path) {
            Ok(_) => Stats::load(path)?,
            Err(_) => Stats::new(self.n_layer, self.n_head_kv, self.head_dim),
        };
        all.add(self)?;
        let tmp = path.with_extension("tmp");
        let io = |e: std::io::Error| Error::Io(format!("cannot write {}: {e}", path.display()));
        std::fs::write(&tmp, all.to_bytes()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Fit every group with ridge strength `lambda` (see the module doc). A group without samples gets
    /// zero weights (every cell the same score).
    pub fn fit(&self, lambda: f64) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut s = self.clone();
        s.symmetrize();
        let nf = n_feat(self.head_dim);
        let ws: Vec<Vec<f32>> = s
            .groups
            .par_iter()
            .map(|g| fit_group(g, nf, lambda).map(|w| w.into_iter().map(|x| x as f32).collect()))
            .collect::<Result<_>>()?;
        Ok(ws.chunks(self.n_head_kv).map(|c| c.to_vec()).collect())
    }

    /// `R^2` of `weights` on these statistics, per (layer, KV head) (`NaN` for a group without samples).
    pub fn r2(&self, weights: &[Vec<Vec<f32>>]) -> Vec<Vec<f64>> {
        let mut s = self.clone();
        s.symmetrize();
        let nf = n_feat(self.head_dim);
        s.groups
            .chunks(self.n_head_kv)
            .zip(weights)
            .map(|(gs, wl)| {
                gs.iter()
                    .zip(wl)
                    .map(|(g, w)| {
                        if g.n < 2.0 {
                            return f64::NAN;
                        }
                        let w: Vec<f64> = w.iter().map(|&x| x as f64).collect();
                        let mut sse = g.yy;
                        for a in 0..nf {
                            sse -= 2.0 * w[a] * g.xy[a];
                            sse += w[a] * (0..nf).map(|b| g.xx[a * nf + b] * w[b]).sum::<f64>();
                        }
                        let mean = g.xy[nf - 1] / g.n;
                        let sst = g.yy - g.n * mean * mean;
                        1.0 - sse / sst
                    })
                    .collect()
            })
            .collect()
    }
}

/// Ridge solution of one group (module doc): features scaled to unit RMS for conditioning, then Cholesky.
fn fit_group(g: &GroupStats, nf: usize, lambda: f64) -> Result<Vec<f64>> {
    if g.n < 1.0 {
        return Ok(vec![0.0; nf]);
    }
    let bias = nf - 1;
    let rms: Vec<f64> = (0..nf).map(|j| (g.xx[j * nf + j] / g.n).sqrt().max(1e-12)).collect();
    let mut a = vec![0f64; nf * nf];
    for i in 0..nf {
        for j in 0..nf {
            a[i * nf + j] = g.xx[i * nf + j] / (rms[i] * rms[j]);
        }
        let mean = g.xx[i * nf + bias] / g.n;
        let var = (g.xx[i * nf + i] / g.n - mean * mean).max(0.0);
        let pen = if i == bias {
            0.0
        } else {
            lambda * g.n * var / (rms[i] * rms[i])
        };
        a[i * nf + i] += pen + 1e-9 * g.n;
    }
    let b: Vec<f64> = (0..nf).map(|i| g.xy[i] / rms[i]).collect();
    let w = cholesky_solve(&mut a, nf, b)
        .ok_or_else(|| Error::InvalidArg("gate fit: the normal equations are not positive definite".into()))?;
    Ok(w.iter().zip(&rms).map(|(w, r)| w / r).collect())
}

/// Solve `A x = b` for a symmetric positive definite `A` (`n x n`, overwritten by its factor); `None` if it
/// is not.
fn cholesky_solve(a: &mut [f64], n: usize, mut b: Vec<f64>) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d.is_nan() || d <= 0.0 {
            return None;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
    }
    for i in 0..n {
        let s = b[i] - (0..i).map(|k| a[i * n + k] * b[k]).sum::<f64>();
        b[i] = s / a[i * n + i];
    }
    for i in (0..n).rev() {
        let s = b[i] - (i + 1..n).map(|k| a[k * n + i] * b[k]).sum::<f64>();
        b[i] = s / a[i * n + i];
    }
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Geometry;
    use crate::types::GgmlType;

    fn rng(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    #[test]
    fn the_fit_recovers_a_gate_that_made_the_scores_and_statistics_add_up() {
        let (d, nk, n) = (8usize, 2usize, 600usize);
        let heads = Heads {
            n_head: 4,
            n_head_kv: nk,
            head_dim: d,
        };
        let mut seed = 7u64;
        let keys: Vec<f32> = (0..n * nk * d).map(|_| 2.0 * rng(&mut seed)).collect();
        let bytes: Vec<u8> = keys.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = LayerView::new(Geometry::rows(GgmlType::F32, nk * d, n).unwrap(), &bytes).unwrap();
        let truth: Vec<Vec<f32>> = (0..nk)
            .map(|_| (0..n_feat(d)).map(|_| 0.3 * rng(&mut seed)).collect())
            .collect();
        let gate = Gate {
            weights: vec![truth.clone()],
            fit: serde_json::Value::Null,
        };
        let cells: Vec<u32> = (0..n as u32).rev().collect();
        let scores = gate.layer_scores(0, &view, &cells, heads, n);
        // reconstruction scores exactly exp(w . x) - EPS: the regression target is then exactly linear
        let recon: Vec<Vec<f32>> = (0..4)
            .map(|h| scores[h / 2].iter().map(|&s| (s as f64 - EPS) as f32).collect())
            .collect();
        let mut st = Stats::new(1, nk, d);
        let (half_a, half_b) = (&cells[..n / 2], &cells[n / 2..]);
        st.accumulate(
            0,
            &view,
            half_a,
            heads,
            &[0, 1, 2, 3],
            &recon.iter().map(|r| r[..n / 2].to_vec()).collect::<Vec<_>>(),
        );
        let mut b = Stats::new(1, nk, d);
        b.accumulate(
            0,
            &view,
            half_b,
            heads,
            &[0, 1, 2, 3],
            &recon.iter().map(|r| r[n / 2..].to_vec()).collect::<Vec<_>>(),
        );
        let mut whole = Stats::new(1, nk, d);
        whole.accumulate(0, &view, &cells, heads, &[0, 1, 2, 3], &recon);
        st.add(&b).unwrap();
        let back = Stats::from_bytes(&st.to_bytes()).unwrap();
        let w = back.fit(1e-9).unwrap();
        for g in 0..nk {
            for (a, t) in w[0][g].iter().zip(&truth[g]) {
                assert!((a - t).abs() < 2e-3, "group {g}: {a} vs {t}");
            }
        }
        let r2 = whole.r2(&w);
        assert!(r2[0].iter().all(|&r| r > 0.999), "{r2:?}");
        // a KV head without query heads gets no samples
        let mut one = Stats::new(1, nk, d);
        one.accumulate(0, &view, &cells, heads, &[2], &recon[2..3]);
        assert_eq!((one.groups[0].n, one.groups[1].n), (0.0, n as f64));
    }

    #[test]
    fn bad_shapes_and_files_are_refused() {
        let g = Gate {
            weights: vec![vec![vec![0.0; n_feat(4)]; 2]],
            fit: serde_json::Value::Null,
        };
        assert!(g.validate(1, 2, 4).is_ok());
        assert!(g.validate(2, 2, 4).unwrap_err().message().contains("n_layer"));
        assert!(g.validate(1, 2, 8).unwrap_err().message().contains("2 * head_dim + 1"));
        let mut nan = g.clone();
        nan.weights[0][1][3] = f32::NAN;
        assert!(nan
            .validate(1, 2, 4)
            .unwrap_err()
            .message()
            .contains("gate.weights[0][1][3]"));
        assert!(Stats::from_bytes(b"nothing").is_err());
        let mut b = Stats::new(1, 1, 4).to_bytes();
        b.pop();
        assert!(Stats::from_bytes(&b).is_err());
        assert!(Stats::new(1, 1, 4).add(&Stats::new(1, 1, 8)).is_err());
    }
}
