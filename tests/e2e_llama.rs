//! End to end through the patched `llama-completion` on SmolLM2-135M-Instruct (a real model, a real
//! needle prompt, greedy decoding).
//!
//! Needs `scripts/build-llama.sh` (the binaries in `vendor/build/bin`) and the model and essays from
//! `scripts/setup.sh`; `scripts/test.sh` does both before `cargo test`. A missing piece is a failure with
//! the command that provides it, never a skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

mod common;
use common::{bin_dir, http, needle_text, root, script_output, smollm2_f32, tmpdir};

fn completion_bin() -> PathBuf {
    let bin = bin_dir().join("llama-completion");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/build-llama.sh (scripts/test.sh does)",
        bin.display()
    );
    bin
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
/// up to 512 with every method, as the reference prototype did (DESIGN §1.5); that gap is measured in
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

#[test]
fn full_cache_finds_the_needle() {
    assert_needle(full(), "full cache");
}

#[test]
fn compressed_cache_finds_the_needle_at_budget_256() {
    let r = run(prompt_35k(), &["--compresskv", "--compresskv-budget", "256"], "b256");
    assert_retrieved(&r, "--compresskv-budget 256");
    let s = check_stats(&r, 256);
    // default anchor: the window ends at the question, before the template's generation prompt
    let w = &s["window"];
    assert_eq!(w["anchor"], "question", "{w}");
    assert_eq!(w["len"], 8);
    let text = w["text"].as_str().unwrap();
    assert!(text.ends_with('?') && !text.contains("<|im_start|>"), "{w}");
    assert_eq!(
        s["n_prompt"].as_i64().unwrap() - w["start"].as_i64().unwrap() - 8,
        5,
        "the template suffix <|im_end|>\\n<|im_start|>assistant\\n follows the window: {w}"
    );
}

/// A fixed instruction that scores a context whose question is not known (bench/ruler.py's GENERIC_PROBE)
const GENERIC_PROBE: &str = "\nWhat are the important facts, names and numbers in the text above?";
/// One token after compressing to 256 cells scored by GENERIC_PROBE
const PROBE_256: [&str; 7] = [
    "-n",
    "1",
    "--compresskv",
    "--compresskv-budget",
    "256",
    "--compresskv-probe",
    GENERIC_PROBE,
];

/// Query-agnostic scoring (`--compresskv-probe TEXT`): a fixed instruction, decoded after the prompt for
/// scoring only and removed again, is the window. The stats record it after the prompt's last position, the
/// kept cells fit the budget (the probe's cells are gone), and the first token is sampled from the prompt's own
/// logits. The prompt is raw and ends mid-sentence, so the full cache continues it (" eat ..."), while the
/// probe's question is followed by a newline (the control: the same prompt with the probe text appended).
#[test]
fn probe_text_scores_the_prompt_and_leaves_the_prompt_logits() {
    let text = std::fs::read_to_string(needle_prompt(6000, 0.5)).unwrap();
    let q = text.rfind("What is the best thing").expect("the needle question");
    let lead = "The best thing to do in San Francisco is";
    let probe = GENERIC_PROBE;
    let raw = tmpdir().join("probe-raw.txt");
    std::fs::write(&raw, format!("{}{lead}", &text[..q])).unwrap();
    let with_probe = tmpdir().join("probe-appended.txt");
    std::fs::write(&with_probe, format!("{}{lead}{probe}", &text[..q])).unwrap();

    let full = run(&raw, &["-n", "4"], "probe-full");
    let control = run(&with_probe, &["-n", "1"], "probe-control");
    let r = run(&raw, &PROBE_256, "probe");
    for x in [&full, &control, &r] {
        assert!(x.ok, "{}", x.log);
    }
    let first = r.answer.trim_end();
    assert!(
        !first.is_empty(),
        "the first token is the prompt's continuation, got {:?}",
        r.answer
    );
    assert!(
        full.answer.starts_with(first),
        "first token {first:?} is not the full cache's {:?}",
        full.answer
    );
    assert_ne!(
        control.answer.trim_end(),
        first,
        "the control must differ from the prompt's continuation"
    );

    assert_eq!(r.stats.len(), 1, "{}", r.log);
    let s = &r.stats[0];
    let n = s["n_prompt"].as_u64().unwrap();
    assert_eq!(s["cells_before"].as_u64().unwrap(), n);
    assert!(s["cells_after"].as_u64().unwrap() <= 256, "{s}");
    let w = &s["window"];
    assert_eq!(w["anchor"], "probe", "{w}");
    assert_eq!(w["start"].as_u64().unwrap(), n, "the probe sits after the prompt: {w}");
    assert_eq!(w["text"], probe, "{w}");
    assert!(w["len"].as_u64().unwrap() > 8, "{w}");
}

/// The query-agnostic flow (chat, prompt caching): a context is compressed before its question exists, scored
/// by a probe, and saved (`--prompt-cache`); a later run without --compresskv loads it and decodes the question
/// and the generation prompt into the compressed cache. A probe compression keeps the context's last token in
/// every layer at its true position: the save can take it out and replay it, and the question continues at the
/// next position (a gap there fails llama_decode's position check).
#[test]
fn context_compressed_with_a_probe_saves_and_takes_its_question_later() {
    let text = std::fs::read_to_string(prompt_35k()).unwrap();
    let q = text.rfind("\n\nQuestion:").expect("the needle question");
    // the context text[..end] alone, compressed with a probe and saved: its run, and the session's path
    let save_context = |end: usize, tag: &str| {
        let context = tmpdir().join(format!("{tag}-context.txt"));
        std::fs::write(&context, &text[..end]).unwrap();
        let session = tmpdir().join(format!("{tag}-session.bin"));
        let _ = std::fs::remove_file(&session);
        let r = run(
            &context,
            &[&PROBE_256[..], &["--prompt-cache", session.to_str().unwrap()]].concat(),
            &format!("{tag}-1"),
        );
        assert!(r.ok, "{}", r.log);
        assert_eq!(r.stats.len(), 1, "{}", r.log);
        (r, session)
    };

    let (first, session) = save_context(q, "agnostic");
    let s = session.to_str().unwrap();
    let st = &first.stats[0];
    assert_eq!(st["window"]["anchor"], "probe", "{st}");
    assert!(st["cells_after"].as_u64().unwrap() <= 256, "{st}");
    assert!(
        first.log.contains("saved the compressed session before the last token"),
        "{}",
        first.log
    );

    let second = run(prompt_35k(), &["--prompt-cache", s, "--prompt-cache-ro"], "agnostic-2");
    assert!(second.ok, "{}", second.log);
    let n_ctx = st["n_prompt"].as_u64().unwrap();
    assert!(
        second.log.contains(&format!("session file matches {n_ctx} / ")) && second.log.contains("is compressed"),
        "the compressed context must be loaded and extended:\n{}",
        second.log
    );
    assert!(
        second.stats.is_empty() && !second.answer.trim().is_empty(),
        "{}",
        second.log
    );

    // a context whose last token merges with what follows (here it ends inside "Question": "Qu" and then
    // "estion" tokenize as one token; Qwen's ".\n" does the same at a sentence end): the loading run matches all
    // but the saved last token, and upstream would cut the cache before that one to replay it, inside the
    // compressed prompt, which the cache refuses. Cut after the match instead: the compressed context is kept
    // and the question is decoded into it, with no full prefill
    let (_, session_merge) = save_context(q + "\n\nQu".len(), "agnostic-merge");
    let s_merge = session_merge.to_str().unwrap();
    let second_merge = run(
        prompt_35k(),
        &["--prompt-cache", s_merge, "--prompt-cache-ro"],
        "agnostic-merge-2",
    );
    assert!(second_merge.ok, "{}", second_merge.log);
    assert!(
        second_merge.log.contains("is cut after its")
            && second_merge.log.contains("is compressed")
            && !second_merge.log.contains("unable to reuse common prefix"),
        "the compressed context must be cut after its match and extended:\n{}",
        second_merge.log
    );
    assert!(!second_merge.answer.trim().is_empty(), "{}", second_merge.log);
}

#[test]
fn streamingllm_at_the_same_budget_misses_the_needle() {
    let r = run(
        prompt_35k(),
        &[
            "--compresskv",
            "--compresskv-method",
            "streamingllm",
            "--compresskv-budget",
            "256",
        ],
        "stream256",
    );
    assert!(r.ok, "{}", r.log);
    check_stats(&r, 256);
    assert!(
        !r.answer.to_lowercase().contains("sandwich"),
        "sink + recent tokens cannot hold a needle from the middle: {:?}",
        r.answer
    );
}

#[test]
fn budget_at_least_the_prompt_is_token_identical() {
    let r = run(prompt_35k(), &["--compresskv", "--compresskv-budget", "8192"], "b8192");
    assert!(r.ok, "{}", r.log);
    assert!(r.stats.is_empty(), "nothing should have been compressed");
    assert!(r.log.contains("nothing to compress"), "log should say why:\n{}", r.log);
    assert_eq!(r.answer, full().answer);
}

#[test]
fn q8_0_cache_with_flash_attention() {
    let args = ["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"];
    let f = run(prompt_35k(), &args, "q8-full");
    assert_needle(&f, "q8_0 full");
    let mut with = args.to_vec();
    with.extend(["--compresskv", "--compresskv-budget", "256"]);
    let r = run(prompt_35k(), &with, "q8-b256");
    assert_retrieved(&r, "q8_0 --compresskv-budget 256");
    let s = check_stats(&r, 256);
    assert_eq!(s["kv_type_k"], "q8_0");
}

#[test]
fn transposed_v_without_flash_attention() {
    let r = run(
        prompt_35k(),
        &["-fa", "off", "--compresskv", "--compresskv-budget", "256"],
        "fa-off",
    );
    assert_retrieved(&r, "-fa off --compresskv-budget 256");
    let s = check_stats(&r, 256);
    assert_eq!(s["v_trans"], true);
}

/// The device path (a gather graph on the cache's own backend, used for GPU caches) moves the same bytes
/// as the library's in-place compaction: forced onto the CPU backend, the occupied cells hash the same and
/// the greedy answer is the same. Covers rows as f32 words (q4_0, per-head slices) and transposed V.
#[test]
fn graph_compaction_moves_the_same_bytes_as_the_host_path() {
    for (tag, args) in [
        (
            "q4h",
            &["-fa", "on", "-ctk", "q4_0", "-ctv", "q4_0", "--compresskv-per-head"][..],
        ),
        ("vt", &["-fa", "off", "--compresskv-window-anchor", "end"][..]),
    ] {
        let mut a = args.to_vec();
        a.extend(["--compresskv", "--compresskv-budget", "256"]);
        let mut by_path = Vec::new();
        for mode in ["host", "graph"] {
            let r = run_env(
                prompt_35k(),
                &a,
                &format!("path-{tag}-{mode}"),
                &[("LLAMA_COMPRESSKV_COMPACT", mode), ("LLAMA_COMPRESSKV_CHECKSUM", "1")],
            );
            assert!(r.ok, "{tag} {mode}: {}", r.log);
            let s = check_stats(&r, 256).clone();
            assert_eq!(s["compact"], mode, "{tag}: the {mode} path must have run:\n{}", r.log);
            assert!(s["kv_checksum"].is_string(), "{tag} {mode}: no checksum in {s}");
            if tag == "vt" {
                // the paper's window: the last 8 prompt tokens, the template's assistant header
                assert_eq!(s["window"]["anchor"], "end");
                assert!(
                    s["window"]["text"]
                        .as_str()
                        .unwrap()
                        .trim_end()
                        .ends_with("<|im_start|>assistant"),
                    "{}",
                    s["window"]
                );
            }
            by_path.push((s, r.answer));
        }
        assert_eq!(
            by_path[0].0["kv_checksum"], by_path[1].0["kv_checksum"],
            "{tag}: graph and host compaction must leave the same bytes"
        );
        assert_eq!(by_path[0].0["plan"]["layers"], by_path[1].0["plan"]["layers"]);
        assert_eq!(by_path[0].1, by_path[1].1, "{tag}: same greedy answer");
    }
}

/// Injected faults (LLAMA_COMPRESSKV_FAULT): a compaction the library refuses at its last layer leaves the
/// full cache and the full-cache answer; a graph that cannot reserve its memory falls back to the host path;
/// a backend failure after the first layer moved removes the sequence and llama-completion stops with an
/// error instead of generating from a half-moved cache.
#[test]
fn injected_faults_keep_the_cache_consistent() {
    let args = ["--compresskv", "--compresskv-budget", "256"];
    let r = run_env(
        prompt_35k(),
        &args,
        "fault-compact",
        &[("LLAMA_COMPRESSKV_FAULT", "compact")],
    );
    assert!(r.ok, "{}", r.log);
    assert!(r.log.contains("compaction refused"), "{}", r.log);
    assert!(r.stats.is_empty());
    assert_eq!(
        r.answer,
        full().answer,
        "a refused compaction must leave the full cache"
    );

    let r = run_env(
        prompt_35k(),
        &args,
        "fault-reserve",
        &[
            ("LLAMA_COMPRESSKV_COMPACT", "graph"),
            ("LLAMA_COMPRESSKV_FAULT", "graph-reserve"),
        ],
    );
    assert_retrieved(&r, "graph reservation failed");
    assert_eq!(check_stats(&r, 256)["compact"], "host", "fallback to the host path");

    let r = run_env(
        prompt_35k(),
        &args,
        "fault-compute",
        &[
            ("LLAMA_COMPRESSKV_COMPACT", "graph"),
            ("LLAMA_COMPRESSKV_FAULT", "graph-compute"),
        ],
    );
    assert!(!r.ok, "llama-completion must fail");
    assert!(r.log.contains("was removed from the cache"), "{}", r.log);
    assert!(r.answer.trim().is_empty(), "nothing may be generated: {:?}", r.answer);
    assert!(r.stats.is_empty());
}

#[test]
fn bad_flags_are_rejected_at_parse_time() {
    for (args, needle) in [
        (&["--compresskv-budget", "0"][..], "--compresskv-budget"),
        (&["--compresskv-method", "magic"][..], "--compresskv-method"),
        (&["--compresskv-ratio", "1.5"][..], "--compresskv-ratio"),
        (&["--compresskv-pool", "4"][..], "--compresskv-pool"),
        (&["--compresskv-probe", ""][..], "--compresskv-probe"),
        (
            &["--compresskv-overflow-window", "latest"][..],
            "--compresskv-overflow-window",
        ),
    ] {
        let r = run(prompt_35k(), args, "bad");
        assert!(!r.ok, "{args:?} should be refused");
        assert!(
            r.log.contains(needle),
            "{args:?}: the error should name {needle}:\n{}",
            r.log
        );
    }
}

#[test]
fn bad_runtime_input_falls_back_to_the_full_cache() {
    // a profile for another model
    let prof = tmpdir().join("other-model.json");
    let layers = 2;
    let ranking: Vec<Vec<usize>> = (0..layers).map(|_| (0..9).collect()).collect();
    let scores: Vec<Vec<f64>> = (0..layers).map(|_| vec![0.0; 9]).collect();
    let profile = serde_json::json!({
        "version": 1,
        "model": {"arch": "llama", "n_layer": layers, "n_head": 9, "n_head_kv": 3, "head_dim": 64, "fingerprint": "0000000000000000"},
        "head_ranking": ranking, "head_scores": scores, "layer_weights": vec![1.0 / layers as f64; layers],
        "calibration": {"note": "test profile for another model"}
    });
    std::fs::write(&prof, profile.to_string()).unwrap();
    let r = run(
        prompt_35k(),
        &["--compresskv", "--compresskv-profile", prof.to_str().unwrap()],
        "badprof",
    );
    assert!(
        r.log.contains("profile") && r.log.contains("n_layer"),
        "the log should say the profile's n_layer differs:\n{}",
        r.log
    );
    assert!(r.stats.is_empty());
    assert_eq!(r.answer, full().answer, "fallback must be the full cache");

    // a window larger than the prompt
    let r = run(
        prompt_35k(),
        &["--compresskv", "--compresskv-window", "100000"],
        "badwin",
    );
    assert!(r.log.contains("window"), "{}", r.log);
    assert!(r.stats.is_empty());
    assert_eq!(r.answer, full().answer, "fallback must be the full cache");
}

/// The strongest check of compaction (DESIGN §1.5): greedy output through the compacted cache equals the
/// full cache with each layer's evicted cells masked out in place (`--compresskv-form mask`: same plan,
/// nothing moves, true positions). f32 weights (common::smollm2_f32), f32 caches and flash attention off make
/// the two attention sums identical up to f32 rounding. With the Q4_1 weights the q8 activations turn that
/// rounding into logit moves of ~0.4 and the fill form's 9th token flips at a near-tie ("is eat" vs "is to
/// eat"); with CPU flash attention the blocked online softmax rounds differently for the two layouts.
/// tests/llama_api.rs compares the logits themselves.
fn masked_equivalence(method: &str, form: &str) {
    let base = [
        "-fa",
        "off",
        "-ctk",
        "f32",
        "-ctv",
        "f32",
        "--compresskv",
        "--compresskv-method",
        method,
    ];
    let budget = ["--compresskv-budget", "256"];
    let mut compacted = base.to_vec();
    compacted.extend(budget);
    compacted.extend(["--compresskv-form", form]);
    let mut masked = base.to_vec();
    masked.extend(budget);
    masked.extend(["--compresskv-form", "mask"]);
    let f32 = smollm2_f32();
    let c = run_model(&f32, prompt_35k(), &compacted, &format!("eq-{method}-{form}"), &[]);
    let m = run_model(&f32, prompt_35k(), &masked, &format!("eq-{method}-mask"), &[]);
    assert!(c.ok && m.ok, "{}\n{}", c.log, m.log);
    assert_eq!(c.stats.len(), 1);
    assert_eq!(m.stats.len(), 1);
    // fill: every layer holds 256 cells; exact: the extent is the largest per-layer budget (pyramid: < 2x)
    let (before, after) = (
        c.stats[0]["cells_before"].as_u64().unwrap(),
        c.stats[0]["cells_after"].as_u64().unwrap(),
    );
    assert!(
        after < 512 && after * 4 < before,
        "the compacted run must really compact: {before} -> {after} cells"
    );
    assert_eq!(
        c.answer, m.answer,
        "compacted ({form}) and masked caches must give the same greedy tokens"
    );
}

#[test]
fn compacted_equals_masked_fill_form() {
    masked_equivalence("snapkv", "fill");
}

#[test]
fn compacted_equals_masked_exact_form_with_pyramid_budgets() {
    masked_equivalence("pyramidkv", "exact");
}

fn calibrate_bin() -> PathBuf {
    let bin = bin_dir().join("llama-compresskv-calibrate");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/build-llama.sh --targets llama-compresskv-calibrate (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The calibration tool on a tiny grid (three ~500-token needle probes, one held-out QA sample): it writes a
/// profile the library accepts for this model, and a second run resumes from the state file, redoes
/// nothing and writes the same bytes (deterministic).
#[test]
fn calibration_tool_writes_a_valid_profile_and_resumes() {
    let dir = tmpdir().join("calib");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ruler = script_output("scripts/fetch-data.sh", &["ruler"]);
    let out = Command::new("python3")
        .arg(root().join("scripts/calib-data.py"))
        .args(["--essays", essays().to_str().unwrap()])
        .arg("--hotpotqa")
        .arg(ruler.join("data/synthetic/json/hotpotqa.json"))
        .args(["--out", dir.to_str().unwrap()])
        .args([
            "--lengths",
            "500",
            "--depths",
            "0.5",
            "--calib",
            "1",
            "--calib-tokens",
            "400",
        ])
        .output()
        .expect("python3 scripts/calib-data.py");
    assert!(
        out.status.success(),
        "calib-data.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let profile = dir.join("profile.json");
    let calibrate = || {
        let out = Command::new(calibrate_bin())
            .args([
                "-m",
                model().to_str().unwrap(),
                "-t",
                "2",
                "--steps",
                "4",
                "--max-gen",
                "24",
            ])
            .arg("--probes")
            .arg(dir.join("probes.jsonl"))
            .arg("--calib")
            .arg(dir.join("calib.jsonl"))
            .arg("-o")
            .arg(&profile)
            .output()
            .expect("run llama-compresskv-calibrate");
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "calibration failed:\n{log}");
        (log, std::fs::read_to_string(&profile).unwrap())
    };
    let (log1, text1) = calibrate();
    assert!(
        log1.contains("probe 3/3") && log1.contains("calib 1/1"),
        "progress lines:\n{log1}"
    );
    let p = compresskv::profile::Profile::from_json(&text1).expect("the tool's profile validates");
    assert_eq!(
        (
            p.model.arch.as_str(),
            p.model.n_layer,
            p.model.n_head,
            p.model.n_head_kv
        ),
        ("llama", 30, 9, 3)
    );
    // the identity is the one llama.cpp computes for this model: the shipped SmolLM2 profile has it too
    let shipped = compresskv::profile::Profile::load(root().join("profiles/smollm2.json")).expect("shipped profile");
    assert_eq!(p.model, shipped.model);
    let counted = p.calibration["srh"]["counted"].as_u64().unwrap();
    assert!(counted >= 1, "no probe answered:\n{log1}");
    assert!(
        p.layer_weights.iter().all(|&w| w > 0.0),
        "every layer has some eviction error"
    );

    let (log2, text2) = calibrate();
    assert_eq!(
        log2.matches("(done before)").count(),
        4,
        "the second run must resume:\n{log2}"
    );
    assert_eq!(text1, text2, "same inputs, same profile");
}

/// Without --compresskv-profile the shipped profile is found by the model's fingerprint; the ablation
/// snapkv-srh uses its heads with uniform budgets.
#[test]
fn shipped_profile_is_found_by_fingerprint() {
    let r = run(prompt_35k(), &["--compresskv", "--compresskv-budget", "256"], "found");
    assert_retrieved(&r, "compresskv with the shipped profile");
    assert_eq!(r.stats.len(), 1, "{}", r.log);
    let used = r.stats[0]["profile"].as_str().unwrap_or_default();
    assert!(
        used.ends_with("profiles/smollm2.json"),
        "profile used: {used:?}\n{}",
        r.log
    );
    let plan = &r.stats[0]["plan"];
    assert_eq!(
        (plan["method"].as_str(), plan["allocation"].as_str()),
        (Some("compresskv"), Some("weighted"))
    );
    assert_eq!(plan["fallback_all_heads"], false);

    let r = run(
        prompt_35k(),
        &[
            "--compresskv",
            "--compresskv-budget",
            "256",
            "--compresskv-method",
            "snapkv-srh",
        ],
        "srh",
    );
    assert!(r.ok, "{}", r.log);
    assert_eq!(r.stats.len(), 1, "{}", r.log);
    let plan = &r.stats[0]["plan"];
    assert_eq!(
        (plan["method"].as_str(), plan["allocation"].as_str()),
        (Some("snapkv-srh"), Some("uniform"))
    );
    assert_eq!(plan["fallback_all_heads"], false);
    assert_eq!(
        plan["layers"][0]["heads"].as_array().unwrap().len(),
        4,
        "4 SRHs per layer"
    );
    assert_eq!(r.stats[0]["cells_after"].as_u64().unwrap(), 256);
}

const SERVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn server_addr(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// llama-server with `--compresskv`: each request's prompt is compressed after its prefill (stats line per
/// request), the needle is still retrieved, and a repeated request recomputes its prompt (a compressed cache
/// holds no reusable prefix) and answers the same.
#[test]
fn server_compresses_every_request() {
    let bin = bin_dir().join("llama-server");
    assert!(bin.exists(), "{} missing: run scripts/build-llama.sh", bin.display());
    let stats = tmpdir().join("stats-server.jsonl");
    let _ = std::fs::remove_file(&stats);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(tmpdir().join("server.log")).unwrap();
    let mut server = Command::new(&bin)
        .args(["-m", model().to_str().unwrap(), "-c", "4608", "-np", "1", "-t", "2"])
        .args(["--no-warmup", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--compresskv", "--compresskv-budget", "256"])
        .args(["--compresskv-stats", stats.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start llama-server");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let guard = Kill(&mut server);
    let slog = || std::fs::read_to_string(tmpdir().join("server.log")).unwrap_or_default();

    let t0 = std::time::Instant::now();
    while !matches!(
        http(server_addr(port), "GET", "/health", "", SERVER_TIMEOUT),
        Ok((200, _))
    ) {
        assert!(
            t0.elapsed().as_secs() < 120,
            "llama-server did not come up:\n{}",
            slog()
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }

    let prompt = std::fs::read_to_string(prompt_35k()).unwrap();
    let req = serde_json::json!({"prompt": prompt, "n_predict": 32, "temperature": 0.0, "seed": 1});
    let mut answers = Vec::new();
    for i in 0..2 {
        let (status, body) = http(
            server_addr(port),
            "POST",
            "/completion",
            &req.to_string(),
            SERVER_TIMEOUT,
        )
        .unwrap();
        assert_eq!(status, 200, "request {i}: {body}\n{}", slog());
        let v: serde_json::Value = serde_json::from_str(&body).expect("completion JSON");
        let content = v["content"].as_str().unwrap().to_string();
        assert!(
            content.to_lowercase().contains("sandwich"),
            "request {i}: the answer misses the needle: {content:?}"
        );
        answers.push(content);
    }
    drop(guard);

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&stats)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one compression per request:\n{}", slog());
    for s in &lines {
        assert!(s["n_prompt"].as_u64().unwrap() > 3000);
        assert!(s["cells_after"].as_u64().unwrap() <= 256 + 32);
    }
    assert_eq!(answers[0], answers[1], "the same request must give the same answer");
}

/// iSWA (Gemma 3 270M, a base model): the sliding-window layers keep their own small cache and the three
/// full-attention layers are compressed; the needle is still retrieved. The exact form, whose per-layer mask
/// iSWA attention does not apply, is refused with the full cache kept.
#[test]
fn gemma3_iswa_compresses_the_full_attention_layers() {
    let gemma = script_output("scripts/fetch-model.sh", &["gemma3"]);
    let out = Command::new("python3")
        .arg(root().join("bench/needle.py"))
        .args([
            "--essays",
            essays().to_str().unwrap(),
            "--chars",
            "8000",
            "--depth",
            "0.5",
        ])
        .args(["--template", "none"])
        .output()
        .expect("python3 bench/needle.py");
    assert!(out.status.success());
    let prompt = tmpdir().join("needle-gemma3.txt");
    let mut text = String::from_utf8(out.stdout).unwrap();
    text.push_str("Answer: The best thing to do in San Francisco is");
    std::fs::write(&prompt, text).unwrap();

    let gemma_run = |extra: &[&str], tag: &str| {
        let stats = tmpdir().join(format!("stats-{tag}.jsonl"));
        let _ = std::fs::remove_file(&stats);
        let out = Command::new(completion_bin())
            .args(["-m", gemma.to_str().unwrap(), "-f", prompt.to_str().unwrap()])
            .args(["-n", "24", "--temp", "0", "--seed", "1", "-c", "4096", "-t", "2"])
            .args(["-no-cnv", "--no-display-prompt", "--no-warmup", "--simple-io"])
            .args([
                "--compresskv",
                "--compresskv-budget",
                "256",
                "--compresskv-window-anchor",
                "end",
            ])
            .args(["--compresskv-stats", stats.to_str().unwrap()])
            .args(extra)
            .output()
            .expect("run llama-completion");
        let stats: Vec<serde_json::Value> = std::fs::read_to_string(&stats)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            stats,
        )
    };

    let (ok, answer, log, stats) = gemma_run(&[], "gemma3");
    assert!(ok, "{log}");
    assert_eq!(stats.len(), 1, "{log}");
    let s = &stats[0];
    assert_eq!(
        s["plan"]["layers"].as_array().unwrap().len(),
        3,
        "the 3 full-attention layers: {s}"
    );
    assert!(s["n_prompt"].as_u64().unwrap() > 1500);
    assert!(s["cells_after"].as_u64().unwrap() <= 256);
    assert!(answer.to_lowercase().contains("sandwich"), "{answer:?}");

    let (ok, _, log, stats) = gemma_run(&["--compresskv-form", "exact"], "gemma3-exact");
    assert!(ok, "{log}");
    assert!(stats.is_empty());
    assert!(log.contains("iSWA"), "{log}");
}

/// Bounded memory (issue "Prompts longer than the cache"): a ~5.6K-token needle prompt in a context smaller
/// than the prompt. Without --compresskv llama-completion refuses it; with it, the prompt is decoded in chunks
/// and the cache compressed whenever the next chunk would overflow (to half the context), each time scored by
/// the prompt's question decoded ahead of its place ("probe"), then to the budget by the question-anchored
/// window after the last chunk. In 4096 cells the needle's fact survives; in 2048 cells (four passes) SmolLM2
/// loses it at this depth, measured in bench/results/bounded-smollm2-cpu.json, so there only the memory bound
/// and the pass structure are checked here. The selection is pinned to 16-token chunks, what this check was
/// calibrated with: at this depth (a test prompt, never tuned on) 32-token chunks, the default chosen by
/// bench/tune.py, lose the needle in 4096 cells; on the held-out depths 0.1/0.3/0.7/0.9 the two score 0.56 (16)
/// and 0.60 (32), bench/results/tune-bounded/.
#[test]
fn prompt_longer_than_the_context_is_prefilled_in_bounded_memory() {
    let prompt = needle_prompt(26000, 0.5);
    let plain = run(&prompt, &["-c", "4096"], "bounded-off");
    assert!(
        !plain.ok && plain.log.contains("prompt is too long"),
        "without --compresskv the prompt must be refused:\n{}",
        plain.log
    );

    // every pass: the cache never held more than -c cells, each left at most half of them (the last: the budget)
    let passes = |r: &Run, ctx: u64, overflow_anchor: &str| {
        assert!(r.ok, "{}", r.log);
        let n = r.stats.last().expect("stats lines")["n_prompt"].as_u64().unwrap();
        assert!(n > 5000, "prompt of {n} positions, expected ~5.6K");
        let mut p_prev = 0;
        for (i, s) in r.stats.iter().enumerate() {
            let last = i + 1 == r.stats.len();
            let after = s["cells_after"].as_u64().unwrap();
            let cap = if last { 512 + 32 } else { ctx / 2 };
            assert!(after <= cap, "pass {i}: {after} cells > {cap}: {s}");
            assert!(s["cells_before"].as_u64().unwrap() <= ctx, "{s}");
            assert_eq!(s["recompressed"], i > 0, "pass {i}: {s}");
            let p = s["n_prompt"].as_u64().unwrap();
            assert!(p > p_prev, "positions must grow: {p} after {p_prev}");
            p_prev = p;
            let w = &s["window"];
            if last {
                assert_eq!(w["anchor"], "question", "final pass: {s}");
            } else {
                assert_eq!(w["anchor"], overflow_anchor, "pass {i}: {s}");
            }
            if w["anchor"] != "end" {
                let text = w["text"].as_str().unwrap();
                assert!(text.contains("San Francisco"), "{s}");
            }
        }
        r.stats.len()
    };

    let r = run(
        &prompt,
        &[
            "--compresskv",
            "--compresskv-budget",
            "512",
            "--compresskv-chunk",
            "16",
            "-c",
            "4096",
        ],
        "bounded-4096",
    );
    assert_retrieved(&r, "bounded prefill, -c 4096");
    assert!(passes(&r, 4096, "probe") >= 2);

    let in_2048 = |window: &str, tag: &str| {
        let args = ["--compresskv", "--compresskv-budget", "512", "-c", "2048"];
        run(
            &prompt,
            &[&args[..], &["--compresskv-overflow-window", window]].concat(),
            tag,
        )
    };
    // the query-agnostic alternative: the latest tokens score each overflow pass
    let recent = in_2048("recent", "bounded-recent");
    assert!(passes(&recent, 2048, "end") >= 4);

    // a probe window for the overflow passes needs its text; refused before anything is decoded
    let no_text = in_2048("probe", "bounded-probe-no-text");
    assert!(
        !no_text.ok && no_text.log.contains("needs --compresskv-probe"),
        "{}",
        no_text.log
    );
}

/// Session files (`--prompt-cache`): with --compresskv the session is the compressed cache, saved before the
/// last prompt token (removed from the cache's uncompressed tail and decoded again, as after a load). A second
/// run with the same prompt loads it, does not compress again and gives the same answer; the file is a fraction
/// of the full-cache session and carries its own version (upstream's is 10), so that a build without compresskv
/// refuses it at its version check. The patched build without --compresskv loads it too: a compressed state is
/// a valid cache, and an edit inside its compressed prompt is refused, so a prompt that differs early is decoded
/// from scratch instead.
#[test]
fn compressed_session_saves_loads_and_continues() {
    let read_header = |p: &Path| -> (u32, u32) {
        let b = std::fs::read(p).unwrap();
        let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        (u(0), u(4))
    };
    let session = tmpdir().join("session-compressed.bin");
    let session_full = tmpdir().join("session-full.bin");
    let _ = std::fs::remove_file(&session);
    let _ = std::fs::remove_file(&session_full);
    let s = session.to_str().unwrap();
    let args = ["--compresskv", "--compresskv-budget", "256", "--prompt-cache", s];

    let t = std::time::Instant::now();
    let first = run(prompt_35k(), &args, "session-1");
    let t_first = t.elapsed();
    assert_retrieved(&first, "run 1 (saves the session)");
    check_stats(&first, 256);
    assert!(
        first.log.contains("saved the compressed session before the last token"),
        "{}",
        first.log
    );
    let size = std::fs::metadata(&session).expect("session file written").len();

    let t = std::time::Instant::now();
    let second = run(prompt_35k(), &args, "session-2");
    let t_second = t.elapsed();
    assert!(second.ok, "{}", second.log);
    assert!(
        second.log.contains("loaded a session with prompt size of")
            && second.log.contains("replayed last token from session"),
        "the session must be loaded:\n{}",
        second.log
    );
    assert!(
        second.log.contains("is compressed") && second.log.contains("not compressing it again"),
        "{}",
        second.log
    );
    assert!(second.stats.is_empty(), "no second compression: {:?}", second.stats);
    assert_eq!(second.answer, first.answer, "the loaded session continues the same");
    assert_eq!(std::fs::metadata(&session).unwrap().len(), size, "not saved again");

    // the same prompt without --compresskv: upstream's session file
    let full_run = run(
        prompt_35k(),
        &["--prompt-cache", session_full.to_str().unwrap()],
        "session-full",
    );
    assert_needle(&full_run, "full-cache session run");
    let size_full = std::fs::metadata(&session_full).unwrap().len();
    assert!(
        (size as f64) < 0.25 * size_full as f64,
        "compressed session {size} bytes, full {size_full}"
    );
    let (magic, version) = read_header(&session);
    let (magic_full, version_full) = read_header(&session_full);
    assert_eq!((magic, magic_full), (0x6767736e, 0x6767736e), "'ggsn'");
    assert_eq!(version_full, 10, "upstream's LLAMA_SESSION_VERSION");
    assert_ne!(version, 10, "an upstream build must refuse the compressed session");

    // without --compresskv the patched build loads the compressed session and continues the same
    let t = std::time::Instant::now();
    let plain = run(prompt_35k(), &["--prompt-cache", s], "session-3");
    let t_plain = t.elapsed();
    assert!(plain.ok, "{}", plain.log);
    assert!(
        plain.log.contains("loaded a session") && plain.log.contains("is compressed"),
        "{}",
        plain.log
    );
    assert!(!plain.log.contains("not compressing it again"), "{}", plain.log);
    assert_eq!(plain.answer, first.answer);

    // a prompt that differs early: the compressed prefix cannot be cut there, so it is decoded from scratch
    let text = std::fs::read_to_string(prompt_35k()).unwrap();
    let other = tmpdir().join("needle-14000-0.5-other-system.txt");
    std::fs::write(
        &other,
        text.replacen(
            "You are a helpful assistant.",
            "You are a helpful and concise assistant.",
            1,
        ),
    )
    .unwrap();
    let edited = run(&other, &["--prompt-cache", s, "--prompt-cache-ro"], "session-4");
    assert_needle(&edited, "a prompt differing from the compressed session");
    assert!(
        edited.log.contains("refusing seq_rm") && edited.log.contains("unable to reuse common prefix"),
        "{}",
        edited.log
    );
    assert_eq!(std::fs::metadata(&session).unwrap().len(), size, "read-only");

    eprintln!(
        "session: compressed {size} bytes (version {version:#x}), full {size_full} bytes (version {version_full}), \
         {:.1}%; run 1 {:.1} s, run 2 (loaded) {:.1} s, run 3 (loaded, no --compresskv) {:.1} s; answer {:?}",
        100.0 * size as f64 / size_full as f64,
        t_first.as_secs_f64(),
        t_second.as_secs_f64(),
        t_plain.as_secs_f64(),
        first.answer
    );
}
