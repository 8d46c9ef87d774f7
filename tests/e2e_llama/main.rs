//! End to end through the patched `llama-completion` on SmolLM2-135M-Instruct (a real model, a real
//! needle prompt, greedy decoding).
//!
//! Needs `scripts/build-llama.sh` (the binaries in `vendor/build/bin`) and the model and essays from
//! `scripts/setup.sh`; `scripts/test.sh` does both before `cargo test`. A missing piece is a failure with
//! the command that provides it, never a skip.
//!
//! One test binary; the shared runners and checks are here, the tests in `needle.rs` (retrieval, probes,
//! baselines), `cache.rs` (cache types, graph compaction, faults, bad input, masked equivalence), `tools.rs`
//! (calibration tool, shipped profile, server) and `contexts.rs` (iSWA, long prompts, saved sessions).

mod cache;
mod contexts;
mod needle;
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

#[path = "../common/mod.rs"]
mod common;
use common::{bin_dir, http, needle_text, root, script_output, smollm2_f32, tmpdir};

/// A patched tool of `vendor/build/bin` (or $COMPRESSKV_LLAMA_BIN); missing, a failure naming the build.
fn tool(name: &str) -> PathBuf {
    let bin = bin_dir().join(name);
    assert!(
        bin.exists(),
        "{} is missing: run scripts/build-llama.sh --targets {name} (scripts/test.sh does)",
        bin.display()
    );
    bin
}

fn completion_bin() -> PathBuf {
    tool("llama-completion")
}

fn model() -> &'static Path {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| script_output("scripts/fetch-model.sh", &["smollm2"]))
}

fn essays() -> &'static Path {
    static E: OnceLock<PathBuf> = OnceLock::new();
    E.get_or_init(|| script_output("scripts/fetch-data.sh", &[]))
}

/// A ~3.5K-token needle prompt (needle at `depth`), written once per depth.
fn needle_prompt(chars: usize, depth: f64) -> PathBuf {
    let path = tmpdir().join(format!("needle-{chars}-{depth}.txt"));
    let text = needle_text(&[
        "--essays",
        essays().to_str().unwrap(),
        "--chars",
        &chars.to_string(),
        "--depth",
        &depth.to_string(),
    ]);
    std::fs::write(&path, text).unwrap();
    path
}

/// The needle prompt without a chat template (the question at the end, no assistant header), `chars` of essays.
fn plain_needle_text(chars: usize) -> String {
    let chars = chars.to_string();
    needle_text(&[
        "--essays",
        essays().to_str().unwrap(),
        "--chars",
        &chars,
        "--depth",
        "0.5",
        "--template",
        "none",
    ])
}

struct Run {
    ok: bool,
    answer: String,
    log: String,
    stats: Vec<serde_json::Value>,
}

fn run(prompt: &Path, extra: &[&str], tag: &str) -> Run {
    run_env(prompt, extra, tag, &[])
}

fn run_env(prompt: &Path, extra: &[&str], tag: &str, env: &[(&str, &str)]) -> Run {
    run_model(model(), prompt, extra, tag, env)
}

fn run_model(model: &Path, prompt: &Path, extra: &[&str], tag: &str, env: &[(&str, &str)]) -> Run {
    let stats = tmpdir().join(format!("stats-{tag}.jsonl"));
    let _ = std::fs::remove_file(&stats);
    let mut cmd = Command::new(completion_bin());
    cmd.envs(env.iter().copied());
    cmd.args(["-m", model.to_str().unwrap(), "-f", prompt.to_str().unwrap()])
        .args([
            "-n",
            "32",
            "--temp",
            "0",
            "--seed",
            "1",
            "-c",
            "4608",
            "-t",
            "2",
            "-no-cnv",
            "--no-display-prompt",
        ])
        .args(["--no-warmup", "--simple-io"])
        .args(extra);
    if extra.contains(&"--compresskv") {
        cmd.args(["--compresskv-stats", stats.to_str().unwrap()]);
    }
    let out = cmd.output().expect("run llama-completion");
    let stats = std::fs::read_to_string(&stats)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("stats line is JSON"))
        .collect();
    Run {
        ok: out.status.success(),
        answer: String::from_utf8_lossy(&out.stdout).into_owned(),
        log: String::from_utf8_lossy(&out.stderr).into_owned(),
        stats,
    }
}

fn prompt_35k() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| needle_prompt(14000, 0.5))
}

fn full() -> &'static Run {
    static R: OnceLock<Run> = OnceLock::new();
    R.get_or_init(|| run(prompt_35k(), &[], "full"))
}

/// The full cache recalls the whole needle ("... eat a sandwich and sit in Dolores Park ...").
fn assert_needle(r: &Run, what: &str) {
    assert!(r.ok, "{what}: llama-completion failed:\n{}", r.log);
    let a = r.answer.to_lowercase();
    assert!(
        a.contains("sandwich") && a.contains("dolores park"),
        "{what}: the answer misses the needle: {:?}",
        r.answer
    );
}

/// A compressed cache at 7% of the prompt must still retrieve the needle's fact ("sandwich", a word the
/// essays never use). SmolLM2-135M then loses the needle's continuation ("in Dolores Park") at every budget
/// up to 512 with every method, as the reference prototype did (docs/design.md §1.5); that gap is measured in
/// `bench/`, not hidden here. `streamingllm_at_the_same_budget_misses_the_needle` shows this check can fail.
fn assert_retrieved(r: &Run, what: &str) {
    assert!(r.ok, "{what}: llama-completion failed:\n{}", r.log);
    assert!(
        r.answer.to_lowercase().contains("sandwich"),
        "{what}: the answer misses the needle: {:?}",
        r.answer
    );
}

fn check_stats(r: &Run, budget: u64) -> &serde_json::Value {
    assert_eq!(r.stats.len(), 1, "one compression expected, log:\n{}", r.log);
    let s = &r.stats[0];
    let n = s["n_prompt"].as_u64().unwrap();
    assert!(n > 3000, "prompt of {n} tokens, expected ~3.5K");
    assert_eq!(s["cells_before"].as_u64().unwrap(), n);
    let after = s["cells_after"].as_u64().unwrap();
    assert!(
        after <= budget + 32,
        "cells_after {after} > budget {budget} + template suffix"
    );
    let (b0, b1) = (
        s["kv_bytes_before"].as_f64().unwrap(),
        s["kv_bytes_after"].as_f64().unwrap(),
    );
    assert!(b1 < 0.15 * b0, "kv bytes {b1} not below 15% of {b0}");
    assert_eq!(
        s["plan"]["layers"].as_array().unwrap().len(),
        30,
        "SmolLM2 has 30 layers"
    );
    // the summary fields the integration issue names, next to the plan's own record
    assert_eq!(s["method"], s["plan"]["method"]);
    assert_eq!(s["budget"].as_u64().unwrap(), budget);
    let layers = s["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 30);
    assert!(layers.iter().all(|l| l["kept"].as_u64().unwrap() <= after));
    assert!(s["ms_score"].as_f64().unwrap() > 0.0 && s["ms_compact"].as_f64().is_some());
    s
}
