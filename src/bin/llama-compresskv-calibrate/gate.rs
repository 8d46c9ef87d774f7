//! Phase 3, the key gate (method `gate`, `compresskv::gate`): fitted to reconstruction scores.
//!
//! ```text
//! for each context c of the probes and calibration samples (alternately the fit half and the held-out half):
//!     prefill c; compress it with reconstruction scoring (method snapkv, every query head, budget n/2):
//!     the model reads "Repeat the text above exactly:" and c again, and each cell's score is the largest
//!     attention any of those queries gives it; the library adds (key, score) of every cell, layer and KV
//!     head to the half's gate statistics (option gate_stats; LLAMA_COMPRESSKV_SCORE=check hands it the keys)
//! lambda = the ridge strength of compresskv::gate::LAMBDAS whose fit on the fit half has the best mean R^2
//!          on the held-out half
//! gate   = the fit of both halves with that lambda, written into the profile (its SRHs and weights kept)
//! ```
//!
//! Resumable like the other phases: a context done is a state record, and its statistics are in the half's
//! file (`<state>.gate-fit.bin`, `<state>.gate-held.bin`), which the library updates by an atomic rename.

use std::path::Path;

use compresskv::gate::{Stats, LAMBDAS};
use compresskv::profile::Profile;
use serde_json::{json, Value};

use crate::common::{compress, to_json_indent1, Context, ContextParams, FlashAttn, Model};
use crate::prompts::Prompt;
use crate::{Progress, State};

/// What the gate phase needs from the command line.
pub struct GateArgs<'a> {
    pub output: &'a str,
    pub state_path: &'a str,
    pub threads: i32,
    pub batch_size: i32,
}

/// Fit the gate on `contexts` and write it into the profile at `a.output` (which must exist and be this
/// model's): 0, or 1 after an error message.
pub fn run(a: &GateArgs<'_>, model: &Model, contexts: &[&Prompt], state: &mut State) -> i32 {
    let info = compress::model_info(model);
    let text = match std::fs::read_to_string(a.output) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "error: the gate is added to an existing profile: cannot read {}: {e}",
                a.output
            );
            return 1;
        }
    };
    let id = compresskv::profile::ModelIdentity {
        arch: info.arch.clone(),
        n_layer: info.n_layer as usize,
        n_head: info.n_head as usize,
        n_head_kv: info.n_head_kv as usize,
        head_dim: info.head_dim as usize,
        fingerprint: info.fingerprint.clone(),
    };
    if let Err(e) = Profile::from_json(&text).and_then(|p| p.check_model(&id)) {
        eprintln!("error: {}: {e}", a.output);
        return 1;
    }
    // the reconstruction's probe and chunks: the context, the probe and a chunk fit the cache
    let probe_text = compress::option("", "reconstruct_prompt");
    let probe = model.tokenize(&probe_text, false, true);
    let n_max = contexts.iter().map(|p| p.tokens.len()).max().unwrap_or(0);
    let n_ctx = (2 * n_max + probe.len() + 64) as u32;
    let params = ContextParams {
        n_ctx,
        n_batch: a.batch_size as u32,
        n_ubatch: a.batch_size as u32,
        n_threads: a.threads,
        flash_attn: FlashAttn::Auto,
        type_k: crate::common::TYPE_F16,
        type_v: crate::common::TYPE_F16,
    };
    let Some(mut ctx) = Context::new(model, &params, None) else {
        eprintln!("error: cannot create a context of {n_ctx} cells");
        return 1;
    };
    // SAFETY of the environment: this tool is single-threaded here; the variable makes llama_kv_compress hand
    // the library the keys next to the reconstruction's scores
    std::env::set_var("LLAMA_COMPRESSKV_SCORE", "check");
    let halves = [
        format!("{}.gate-fit.bin", a.state_path),
        format!("{}.gate-held.bin", a.state_path),
    ];
    let mut pr = Progress::new("gate", contexts.len());
    let mut batch = crate::common::Batch::new(a.batch_size as usize);
    for (i, p) in contexts.iter().enumerate() {
        if state.get("gate", &p.id).is_some() {
            pr.skipped += 1;
            pr.step(&format!("{} (done before)", p.id));
            continue;
        }
        ctx.memory_clear(true);
        let n = p.tokens.len();
        let mut b = 0;
        while b < n {
            let m = (a.batch_size as usize).min(n - b);
            batch.set(&p.tokens[b..b + m], b as i32, (b + m == n).then_some(m - 1));
            if ctx.decode(&batch) != 0 {
                eprintln!("error: decoding {} failed", p.id);
                return 1;
            }
            b += m;
        }
        let half = &halves[i % 2];
        let options = format!("method=snapkv;budget={};reconstruct=1;gate_stats={half}", n / 2);
        let rc = compress::compress_raw(&mut ctx, 0, &p.tokens, &probe, &options);
        if rc != 0 {
            eprintln!("error: the reconstruction of {} failed ({rc}); see the log above", p.id);
            return 1;
        }
        if !state.record(
            "gate",
            &p.id,
            &json!({"phase": "gate", "id": p.id, "n_tokens": n, "half": i % 2}),
        ) {
            return 1;
        }
        pr.step(&format!("{}: {n} tokens", p.id));
    }
    let load = |p: &str| Stats::load(Path::new(p)).map_err(|e| e.to_string());
    let (fit, held) = match (load(&halves[0]), load(&halves[1])) {
        (Ok(f), Ok(h)) => (f, h),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let mean = |r: &[Vec<f64>]| {
        let v: Vec<f64> = r.iter().flatten().copied().filter(|x| x.is_finite()).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let mut best = (f64::NEG_INFINITY, LAMBDAS[0]);
    let mut trials = Vec::new();
    for &l in &LAMBDAS {
        let w = match fit.fit(l) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        };
        let r2 = mean(&held.r2(&w));
        eprintln!("gate: lambda {l:e}: held-out R^2 {r2:.4}");
        trials.push(json!({"lambda": l, "held_out_r2": r2}));
        if r2 > best.0 {
            best = (r2, l);
        }
    }
    let mut all = fit.clone();
    if let Err(e) = all.add(&held) {
        eprintln!("error: {e}");
        return 1;
    }
    let weights = match all.fit(best.1) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let r2_layer: Vec<f64> = held
        .r2(&weights)
        .iter()
        .map(|r| mean(std::slice::from_ref(r)))
        .collect();
    let fit_info = json!({
        "target": "ln(reconstruction score + 1e-5), the score the largest attention of the model repeating its context",
        "method": "ridge, standardized features, lambda by held-out R^2 (fit on half the contexts)",
        "contexts": contexts.len(),
        "samples": all.groups.first().map_or(0.0, |g| g.n),
        "lambda": best.1,
        "held_out_r2": best.0,
        "lambdas": trials,
        "r2_per_layer_in_sample": r2_layer,
        "probe": probe_text,
    });
    write(a.output, &text, &weights, fit_info, &id)
}

/// The profile `text` with its gate replaced (the gate is the last field: the rest of the text is kept as it
/// was), validated by the library, written to `path`.
fn write(
    path: &str,
    text: &str,
    weights: &[Vec<Vec<f32>>],
    fit: Value,
    id: &compresskv::profile::ModelIdentity,
) -> i32 {
    let base = match text.find(",\n \"gate\": ") {
        Some(i) => &text[..i],
        None => text.trim_end().strip_suffix('}').unwrap_or(text).trim_end(),
    };
    // one line per KV head's weights instead of one per number
    let rows: Vec<String> = weights
        .iter()
        .map(|l| {
            let heads: Vec<String> = l.iter().map(|w| serde_json::to_string(w).expect("finite")).collect();
            format!("[\n    {}\n   ]", heads.join(",\n    "))
        })
        .collect();
    let gate = to_json_indent1(&json!({"fit": fit, "weights": "@WEIGHTS@"})).replace('\n', "\n ");
    let gate = gate.replace("\"@WEIGHTS@\"", &format!("[\n   {}\n  ]", rows.join(",\n   ")));
    let out = format!("{base},\n \"gate\": {gate}\n}}");
    if let Err(e) = Profile::from_json(&out).and_then(|p| p.check_model(id)) {
        eprintln!("error: the profile with the gate is refused: {e}");
        return 1;
    }
    if std::fs::write(path, format!("{out}\n")).is_err() {
        eprintln!("error: cannot write {path}");
        return 1;
    }
    eprintln!("wrote the gate into {path}");
    0
}
