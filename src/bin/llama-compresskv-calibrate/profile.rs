//! The calibration's arithmetic on the recorded probes and samples, and the profile it writes.
//!
//! - [`Heads::rank`]: mean SRH scores over the probes that count, each layer's heads ranked (stable: ties keep
//!   the lower head first), and the top-k overlap between two seeded halves of those probes.
//! - [`select`]: phase 2's kept cells per layer from the window's softmax rows of the layer's top SRHs.
//! - [`write`]: layer weights (per set normalised, averaged, normalised) and the profile JSON (version 1,
//!   fields in the order of the C++ tool this replaces), validated by the library against the model.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::common::{compress::ModelInfo, to_json_indent1};
use crate::prompts::Prompt;

/// The ranking of phase 1.
pub struct Heads {
    /// Per layer, the heads best first.
    pub ranking: Vec<Vec<usize>>,
    /// Mean score per (layer, head), layer-major.
    pub mean: Vec<f64>,
    /// Overlap between the halves (None with fewer than two counted probes).
    stability: Option<Stability>,
}

#[derive(Serialize)]
struct Stability {
    halves: [usize; 2],
    top_k: usize,
    mean_overlap: f64,
    chance_overlap: f64,
    per_layer: Vec<f64>,
}

fn mean_scores(rs: &[&Value], n: usize) -> Vec<f64> {
    let mut m = vec![0.0f64; n];
    for r in rs {
        let s = r["scores"].as_array().map(Vec::as_slice).unwrap_or_default();
        for (i, v) in m.iter_mut().enumerate() {
            *v += s.get(i).and_then(Value::as_f64).unwrap_or(f64::NAN) / rs.len() as f64;
        }
    }
    m
}

fn rank(m: &[f64], n_layer: usize, n_head: usize) -> Vec<Vec<usize>> {
    (0..n_layer)
        .map(|il| {
            let mut r: Vec<usize> = (0..n_head).collect();
            let s = &m[il * n_head..(il + 1) * n_head];
            // stable, best first: `s[x] > s[y]` as the strict order
            r.sort_by(|&x, &y| {
                if s[x] > s[y] {
                    std::cmp::Ordering::Less
                } else if s[y] > s[x] {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            });
            r
        })
        .collect()
}

impl Heads {
    /// From the SRH records of every probe (in probe order); Err: the message to print.
    pub fn rank(records: &[Value], n_layer: usize, n_head: usize, k: usize, seed: u32) -> Result<Heads, String> {
        let ok: Vec<&Value> = records.iter().filter(|r| r["ok"].as_bool().unwrap_or(false)).collect();
        if ok.is_empty() {
            return Err("no probe was answered (ROUGE-1 recall > 0.5); the SRHs cannot be identified".into());
        }
        let mean = mean_scores(&ok, n_layer * n_head);
        let ranking = rank(&mean, n_layer, n_head);

        // stability: top-k from two disjoint halves of the counted probes (seeded split)
        let mut stability = None;
        if ok.len() >= 2 {
            let mut order: Vec<usize> = (0..ok.len()).collect();
            let mut x = (seed as u64).wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(1);
            for i in (1..order.len()).rev() {
                // Fisher-Yates with splitmix64
                x = x.wrapping_add(0x9E3779B97F4A7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                z ^= z >> 31;
                order.swap(i, (z % (i as u64 + 1)) as usize);
            }
            let (mut h1, mut h2) = (Vec::new(), Vec::new());
            for (i, &o) in order.iter().enumerate() {
                if i % 2 == 1 { &mut h2 } else { &mut h1 }.push(ok[o]);
            }
            let r1 = rank(&mean_scores(&h1, n_layer * n_head), n_layer, n_head);
            let r2 = rank(&mean_scores(&h2, n_layer * n_head), n_layer, n_head);
            let per_layer: Vec<f64> = (0..n_layer)
                .map(|il| {
                    let common = r1[il][..k].iter().filter(|h| r2[il][..k].contains(h)).count();
                    common as f64 / k as f64
                })
                .collect();
            let sum = per_layer.iter().fold(0.0, |s, v| s + v);
            // what two random top-k sets of n_head heads share on average
            let chance = k as f64 / n_head as f64;
            eprintln!(
                "SRH stability: top-{k} overlap between two halves ({} / {} probes): {:.3} (chance {chance:.3})",
                h1.len(),
                h2.len(),
                sum / n_layer as f64
            );
            stability = Some(Stability {
                halves: [h1.len(), h2.len()],
                top_k: k,
                mean_overlap: sum / n_layer as f64,
                chance_overlap: chance,
                per_layer,
            });
        }
        Ok(Heads {
            ranking,
            mean,
            stability,
        })
    }
}

/// Per layer, the cells of an `n`-token prompt kept when measuring the error: the `budget - w` prefix tokens
/// scoring best (mean over the layer's top-`k` SRHs of the pooled window attention; ties: the lower position)
/// and the window. `probs[l]` holds the window's softmax rows, [n_head][w][n_kv].
#[allow(clippy::too_many_arguments)]
pub fn select(
    probs: &[Vec<f32>],
    n_kv: usize,
    ranking: &[Vec<usize>],
    k: usize,
    n: usize,
    w: usize,
    pool: usize,
    budget: usize,
) -> Vec<Vec<bool>> {
    let n_pre = n - w;
    let half = pool / 2;
    (0..probs.len())
        .map(|il| {
            let mut s = vec![0.0f64; n_pre];
            let mut raw = vec![0.0f64; n_pre];
            for &h in &ranking[il][..k] {
                raw.iter_mut().for_each(|v| *v = 0.0);
                for r in 0..w {
                    let row = &probs[il][(h * w + r) * n_kv..];
                    for (acc, &p) in raw.iter_mut().zip(&row[..n_pre]) {
                        *acc += p as f64;
                    }
                }
                for (i, si) in s.iter_mut().enumerate() {
                    // average pooling, zero padding, divided by the kernel
                    let acc = raw[i.saturating_sub(half)..=(i + half).min(n_pre - 1)]
                        .iter()
                        .fold(0.0, |acc, v| acc + v);
                    *si += acc / pool as f64 / k as f64;
                }
            }
            let mut idx: Vec<usize> = (0..n_pre).collect();
            let top = n_pre.min(budget - w);
            idx.sort_by(|&x, &y| {
                s[y].partial_cmp(&s[x])
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(x.cmp(&y))
            });
            let mut keep = vec![false; n];
            for &i in &idx[..top] {
                keep[i] = true;
            }
            keep[n_pre..].iter_mut().for_each(|v| *v = true);
            keep
        })
        .collect()
}

/// The tool's settings, recorded in the profile.
pub struct Settings {
    pub max_gen: i32,
    pub budget: i32,
    pub window: i32,
    pub pool: i32,
    pub srh: i32,
    pub steps: i32,
    pub seed: u32,
}

#[derive(Serialize)]
struct ProfileOut<'a> {
    version: u32,
    model: ModelOut<'a>,
    head_ranking: &'a [Vec<usize>],
    head_scores: Vec<&'a [f64]>,
    layer_weights: Vec<f64>,
    calibration: Calibration<'a>,
}

#[derive(Serialize)]
struct ModelOut<'a> {
    arch: &'a str,
    n_layer: i32,
    n_head: i32,
    n_head_kv: i32,
    head_dim: i32,
    fingerprint: &'a str,
}

#[derive(Serialize)]
struct Calibration<'a> {
    tool: &'static str,
    srh: SrhOut<'a>,
    layer_error: LayerError,
    seed: u32,
}

#[derive(Serialize)]
struct SrhOut<'a> {
    probes: usize,
    counted: i32,
    rule: &'static str,
    max_gen: i32,
    stability: &'a Option<Stability>,
    per_probe: Vec<ProbeMeta<'a>>,
}

#[derive(Serialize)]
struct ProbeMeta<'a> {
    id: &'a str,
    n_tokens: &'a Value,
    recall: &'a Value,
    ok: &'a Value,
}

#[derive(Serialize)]
struct LayerError {
    budget: i32,
    window: i32,
    pool: i32,
    srh: i32,
    steps: i32,
    form: &'static str,
    sets: BTreeMap<String, SetOut>,
}

#[derive(Serialize)]
struct SetOut {
    samples: i32,
    normalised_error: Vec<f64>,
}

/// The profile's text (and the probes counted) from the records of every probe and sample (in file order);
/// Err: the message to print.
pub fn write(
    info: &ModelInfo,
    heads: &Heads,
    srh: &[Value],
    probes: &[Prompt],
    errs: &[&Value],
    s: &Settings,
) -> Result<(String, i32), String> {
    let n_layer = info.n_layer as usize;
    let n_head = info.n_head as usize;
    // layer weights: per set, sum over steps and samples, normalise over layers; average the sets; normalise
    let mut per_set: BTreeMap<String, (Vec<f64>, i32)> = BTreeMap::new();
    for r in errs {
        let set = r["set"].as_str().ok_or("a state record (err) has no set")?;
        let e = r["err"]
            .as_array()
            .filter(|e| e.len() == n_layer)
            .ok_or("a state record (err) has no err per layer")?;
        let (acc, samples) = per_set
            .entry(set.to_string())
            .or_insert_with(|| (vec![0.0; n_layer], 0));
        for (a, v) in acc.iter_mut().zip(e) {
            *a += v.as_f64().unwrap_or(f64::NAN);
        }
        *samples += 1;
    }
    let mut weights = vec![0.0f64; n_layer];
    let mut sets = BTreeMap::new();
    let n_sets = per_set.len() as f64;
    for (name, (mut e, samples)) in per_set {
        let tot = e.iter().fold(0.0, |s, v| s + v);
        if tot.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(format!("the eviction error of set '{name}' is zero everywhere"));
        }
        for (il, v) in e.iter_mut().enumerate() {
            *v /= tot;
            weights[il] += *v / n_sets;
        }
        sets.insert(
            name,
            SetOut {
                samples,
                normalised_error: e,
            },
        );
    }
    let wsum = weights.iter().fold(0.0, |s, v| s + v);
    weights.iter_mut().for_each(|v| *v /= wsum);

    let mut n_ok = 0;
    let per_probe = probes
        .iter()
        .zip(srh)
        .map(|(p, r)| {
            n_ok += r["ok"].as_bool().unwrap_or(false) as i32;
            ProbeMeta {
                id: &p.id,
                n_tokens: &r["n_tokens"],
                recall: &r["recall"],
                ok: &r["ok"],
            }
        })
        .collect();
    let prof = ProfileOut {
        version: 1,
        model: ModelOut {
            arch: &info.arch,
            n_layer: info.n_layer,
            n_head: info.n_head,
            n_head_kv: info.n_head_kv,
            head_dim: info.head_dim,
            fingerprint: &info.fingerprint,
        },
        head_ranking: &heads.ranking,
        head_scores: heads.mean.chunks(n_head).collect(),
        layer_weights: weights,
        calibration: Calibration {
            tool: "llama-compresskv-calibrate",
            srh: SrhOut {
                probes: probes.len(),
                counted: n_ok,
                rule: "ROUGE-1 recall > 0.5",
                max_gen: s.max_gen,
                stability: &heads.stability,
                per_probe,
            },
            layer_error: LayerError {
                budget: s.budget,
                window: s.window,
                pool: s.pool,
                srh: s.srh,
                steps: s.steps,
                form: "after the output projection, the model continuing on the full cache",
                sets,
            },
            seed: s.seed,
        },
    };
    let text = to_json_indent1(&prof);
    let model = compresskv::profile::ModelIdentity {
        arch: info.arch.clone(),
        n_layer,
        n_head,
        n_head_kv: info.n_head_kv as usize,
        head_dim: info.head_dim as usize,
        fingerprint: info.fingerprint.clone(),
    };
    compresskv::profile::Profile::from_json(&text)
        .and_then(|p| p.check_model(&model))
        .map_err(|e| format!("the profile does not validate: {}", e.message()))?;
    Ok((text, n_ok))
}
