//! The evaluation harness's smoke mode, end to end: `python3 bench/ruler.py --smoke` runs three RULER tasks
//! (niah_single_1, vt, qa_1; one ~1K-token sample each) through the patched `vendor/build/bin/llama-completion`
//! on SmolLM2-135M-Instruct with the full cache and with compresskv at budget 128, and this test checks the
//! JSON it writes. (bench/harness.py has no smoke mode, so the needle harness is not run here.)
//!
//! Needs the binary (`scripts/build-llama.sh`) and the model (`scripts/fetch-model.sh smollm2`); the RULER data
//! comes from `scripts/fetch-data.sh ruler`. `scripts/test.sh` provides all of them before `cargo test`; when the
//! binary or the model is missing, this test says so and skips.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_path() -> PathBuf {
    let cache = std::env::var("COMPRESSKV_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/compresskv"));
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn ruler_smoke_writes_scored_rows() {
    let bin = root().join("vendor/build/bin/llama-completion");
    if !bin.exists() {
        eprintln!(
            "SKIP ruler_smoke_writes_scored_rows: {} is missing (run scripts/build-llama.sh)",
            bin.display()
        );
        return;
    }
    if !model_path().exists() {
        eprintln!(
            "SKIP ruler_smoke_writes_scored_rows: {} is missing (run scripts/fetch-model.sh smollm2)",
            model_path().display()
        );
        return;
    }
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("ruler-smoke.json");
    let _ = std::fs::remove_file(&out); // a previous run's rows would be resumed, not rerun
    let t0 = Instant::now();
    let run = Command::new("python3")
        .arg(root().join("bench/ruler.py"))
        .args(["--smoke", "--bin"])
        .arg(&bin)
        .arg("--out")
        .arg(&out)
        .current_dir(root())
        .output()
        .expect("run python3 bench/ruler.py");
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        run.status.success(),
        "bench/ruler.py --smoke failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    eprintln!("bench/ruler.py --smoke took {secs:.1} s");

    let d: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(d["kind"], "ruler");
    assert_eq!(d["complete"], true, "the smoke grid is not complete");
    assert!(d["commit"].is_string() || d["commit"].is_null());
    assert!(d["machine"]["nproc"].as_u64().unwrap() >= 1);
    assert_eq!(d["model_sha256"].as_str().unwrap().len(), 64);
    let rows = d["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "3 tasks x (full, compresskv@128)");
    for task in ["niah_single_1", "vt", "qa_1"] {
        for method in ["full", "compresskv"] {
            assert!(
                rows.iter().any(|r| r["task"] == task && r["method"] == method),
                "no row for {task} / {method}"
            );
        }
    }
    for r in rows {
        let what = format!("{} {}", r["task"], r["method"]);
        for k in [
            "task", "length", "sample", "method", "budget", "score", "n_prompt", "answer",
        ] {
            assert!(r.get(k).is_some(), "{what}: no field {k}");
        }
        assert_eq!(r["ok"], true, "{what}: the run failed");
        let score = r["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{what}: score {score}");
        let n_prompt = r["n_prompt"].as_u64().unwrap();
        assert!(
            n_prompt > 500 && n_prompt <= 1024,
            "{what}: n_prompt {n_prompt} for a 1K sample"
        );
        assert!(
            r["expected"].as_array().is_some_and(|e| !e.is_empty()),
            "{what}: no expected answers"
        );
        if r["method"] == "full" {
            assert!(r["budget"].is_null());
            // the full cache: no compression stats, or nothing removed
            if let Some(after) = r.get("kv_bytes_after").and_then(|v| v.as_u64()) {
                assert_eq!(
                    Some(after),
                    r["kv_bytes_before"].as_u64(),
                    "{what}: the full cache shrank"
                );
            }
            assert!(r.get("cells_after").map_or(true, |v| v.is_null()));
        } else {
            let budget = r["budget"].as_u64().unwrap();
            assert_eq!(budget, 128);
            assert_eq!(r["compressed"], true, "{what}: not compressed");
            assert_eq!(
                r["n_prompt"].as_u64(),
                r["n_prompt_counted"].as_u64(),
                "{what}: token counts differ"
            );
            let cells = r["cells_after"].as_u64().unwrap();
            // the budget is the cells kept per layer, window included; 16 cells of slack for the chat template
            // suffix after the window
            assert!(
                cells <= budget + 16,
                "{what}: {cells} cells after compression at budget {budget}"
            );
            assert!(cells < n_prompt);
            let (before, after) = (
                r["kv_bytes_before"].as_u64().unwrap(),
                r["kv_bytes_after"].as_u64().unwrap(),
            );
            assert!(after < before, "{what}: KV bytes {before} -> {after}");
        }
    }
    let summary = &d["summary"]["1024"];
    assert!(summary["full"]["mean"].as_f64().is_some() && summary["compresskv@128"]["mean"].as_f64().is_some());
}

/// The GPU speed tool's whole path on the CPU (bench/gpu.sh runs the same on a lent GPU): bench/random_gguf.py
/// writes 2-layer random-weight models with vocabulary type "none"; on F16 weights `llama-compresskv-bench
/// --check` compares the compacted cache with the masked reference and `--paths` the device paths with the host
/// paths (flash attention on and off, q8_0, per-head); on Q4_0 weights the speed mode writes one row per depth
/// and budget.
/// The tool is this crate's binary (src/bin, `--features llama`), which cargo builds for this test.
#[test]
fn speed_tool_checks_and_times_a_random_weight_model() {
    let Some(bin) = option_env!("CARGO_BIN_EXE_llama-compresskv-bench").map(PathBuf::from) else {
        eprintln!(
            "SKIP speed_tool_checks_and_times_a_random_weight_model: llama-compresskv-bench is built with \
             --features llama only (cargo test --release --features llama --test bench_smoke)"
        );
        return;
    };
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("random-tiny.gguf");
    let gen = Command::new("python3")
        .arg(root().join("bench/random_gguf.py"))
        .args(["--shape", "tiny", "-o"])
        .arg(&model)
        .output()
        .expect("run python3 bench/random_gguf.py");
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    // the exactness checks' model: F16 weights (no activation quantized to q8_0 on its way into a matmul, which
    // turns f32 summation-order differences into 1e-3 logit differences), distinct data per tensor
    let f16 = dir.join("random-tiny-f16.gguf");
    let gen = Command::new("python3")
        .arg(root().join("bench/random_gguf.py"))
        .args(["--shape", "tiny", "--type", "f16", "--scale", "0.02", "-o"])
        .arg(&f16)
        .output()
        .expect("run python3 bench/random_gguf.py");
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    let run = |model: &PathBuf, args: &[&str], out: &PathBuf| {
        let _ = std::fs::remove_file(out);
        let r = Command::new(&bin)
            .arg("-m")
            .arg(model)
            .args(["-t", "2", "-o"])
            .arg(out)
            .args(args)
            .output()
            .expect("run llama-compresskv-bench");
        let d: serde_json::Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
        (r.status.success(), String::from_utf8_lossy(&r.stderr).into_owned(), d)
    };

    let out = dir.join("kvcheck-tiny.json");
    let (ok, log, d) = run(&f16, &["--check", "-d", "1024", "-B", "64,512", "-n", "8"], &out);
    assert!(ok, "--check failed:\n{log}");
    assert_eq!(d["kind"], "kvcheck");
    let rows = d["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in rows {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["cells"], r["budget"], "{r}");
        assert!(r["max_logit_diff"].as_f64().unwrap() < 2e-3, "{r}");
        assert!(r["control_max_logit_diff"].as_f64().unwrap() > 1e-2, "control: {r}");
    }

    // the device paths against the host paths (forced onto the CPU backend here), in the cache types and
    // settings bench/gpu.sh checks on a GPU
    for (tag, extra) in [
        ("fa-on", &["-fa", "on"][..]),
        ("fa-off", &["-fa", "off"][..]),
        ("q8_0", &["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"][..]),
        ("per-head", &["-fa", "on", "--per-head"][..]),
    ] {
        let out = dir.join(format!("kvpaths-tiny-{tag}.json"));
        let _ = std::fs::remove_file(&out);
        let r = Command::new(&bin)
            .arg("-m")
            .arg(&f16)
            .args(["-t", "2", "-o"])
            .arg(&out)
            .args(["--paths", "-d", "1024", "-B", "64", "-n", "8"])
            .args(extra)
            .output()
            .expect("run llama-compresskv-bench");
        let log = String::from_utf8_lossy(&r.stderr);
        assert!(r.status.success(), "--paths {tag} failed:\n{log}");
        let d: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(d["kind"], "kvpaths");
        let row = &d["rows"][0];
        assert_eq!(row["ok"], true, "{tag}: {row}");
        assert_eq!(row["scores"], serde_json::json!(["caller", "library"]), "{tag}: {row}");
        assert_eq!(row["kv_checksum"][0], row["kv_checksum"][1], "{tag}: {row}");
    }

    let out = dir.join("kvspeed-tiny.json");
    let (ok, log, d) = run(
        &model,
        &["-d", "0,300,2048", "-B", "0,256,4096", "-n", "8", "-r", "1"],
        &out,
    );
    assert!(ok, "speed run failed:\n{log}");
    assert_eq!(d["kind"], "kvspeed");
    assert_eq!(d["complete"], true);
    assert_eq!(d["n_vocab"], 1024);
    let rows = d["rows"].as_array().unwrap();
    // full at 0, 300, 2048; 256 cells at 300 and 2048; a budget of 4096 covers every depth and is not run
    let got: Vec<(u64, Option<u64>)> = rows
        .iter()
        .map(|r| (r["depth"].as_u64().unwrap(), r["budget"].as_u64()))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, None),
            (300, None),
            (300, Some(256)),
            (2048, None),
            (2048, Some(256))
        ]
    );
    for r in rows {
        assert_eq!(r["ok"], true, "{r}");
        let cells = r["cells"].as_u64().unwrap();
        assert_eq!(
            cells,
            r["budget"].as_u64().unwrap_or(r["depth"].as_u64().unwrap()),
            "{r}"
        );
        assert!(r["decode_tps_mean"].as_f64().unwrap() > 0.0, "{r}");
        assert!(
            r["kv_bytes_used"].as_f64().unwrap() <= r["kv_bytes_alloc"].as_f64().unwrap(),
            "{r}"
        );
        if r["budget"].is_u64() {
            assert_eq!(r["compress_ret"], 0, "{r}");
            // the depth's prefill ran once (the full row); this row restored it from host memory
            assert_eq!(r["prefill_shared"], true, "{r}");
            assert!(r["compress_s"].as_f64().unwrap() > 0.0);
        }
    }
}

/// `llama-compresskv-bench --agnostic` (the kvpress protocol of `bench/ruler.py --engine bench`) reconstructs a
/// context once for every variant that only chooses cells differently: the first records its scores (the
/// library's option `scores`), the others replay them. A replayed variant keeps exactly the cells and gives
/// exactly the answer of the same variant reconstructed on its own, without decoding the context again.
#[test]
fn agnostic_jobs_reconstruct_once_per_context() {
    let Some(bin) = option_env!("CARGO_BIN_EXE_llama-compresskv-bench").map(PathBuf::from) else {
        eprintln!("SKIP agnostic_jobs_reconstruct_once_per_context: llama-compresskv-bench needs --features llama");
        return;
    };
    assert!(
        model_path().exists(),
        "{} is missing: run scripts/fetch-model.sh smollm2",
        model_path().display()
    );
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let filler = "The committee met again to review the budget of the harbour, the repairs of the old lighthouse \
                  and the schedule of the ferries, and adjourned without a decision. ";
    let context = format!(
        "<|im_start|>user\nRead the notes. {}The secret code of the vault is 4917. {}",
        filler.repeat(6),
        filler.repeat(6)
    );
    let rest = "\nWhat is the secret code of the vault?<|im_end|>\n<|im_start|>assistant\n";
    let recon = |name: &str, extra: &[&str]| {
        let mut flags = vec![
            "--compresskv",
            "--compresskv-method",
            "snapkv",
            "--compresskv-reconstruct",
        ];
        flags.extend_from_slice(extra);
        serde_json::json!({"name": name, "flags": flags})
    };
    let run = |tag: &str, variants: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        let jobs = dir.join(format!("agnostic-{tag}.jsonl"));
        let job = serde_json::json!({"id": tag, "context": context, "rest": rest, "gen": 16, "variants": variants});
        std::fs::write(&jobs, format!("{job}\n")).unwrap();
        let out = dir.join(format!("agnostic-{tag}.out.jsonl"));
        let _ = std::fs::remove_file(&out);
        let r = Command::new(&bin)
            .arg("-m")
            .arg(model_path())
            .args(["-t", "2", "-o"])
            .arg(&out)
            .arg("--agnostic")
            .arg(&jobs)
            .output()
            .expect("run llama-compresskv-bench --agnostic");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let alone = run("alone", vec![recon("half", &["--compresskv-ratio", "0.5"])]);
    let shared = run(
        "shared",
        vec![
            recon("three-quarters", &["--compresskv-ratio", "0.75"]),
            recon("half", &["--compresskv-ratio", "0.5"]),
            recon("half-per-head", &["--compresskv-ratio", "0.5", "--compresskv-per-head"]),
        ],
    );
    assert_eq!((alone.len(), shared.len()), (1, 3));
    let passes = |r: &serde_json::Value| r["stats"]["reconstruct"]["passes"].as_u64();
    let (a, first, half) = (&alone[0], &shared[0], &shared[1]);
    assert_eq!(
        (a["scores_replayed"].as_bool(), first["scores_replayed"].as_bool()),
        (Some(false), Some(false))
    );
    assert_eq!(first["stats"]["recorded_scores"]["replayed"], false, "{first}");
    assert!(
        passes(a).is_some_and(|p| p >= 1) && passes(first) == passes(a),
        "{a}\n{first}"
    );
    // the replays: nothing decoded again but the probe, the same cells and answer as the reconstruction alone
    for r in &shared[1..] {
        assert_eq!(r["scores_replayed"], true, "{r}");
        assert_eq!(passes(r), None, "{r}");
        assert_eq!(r["stats"]["recorded_scores"]["replayed"], true, "{r}");
    }
    assert_eq!(half["cells_after_context"], a["cells_after_context"], "{half}\n{a}");
    assert_eq!(half["answer"], a["answer"], "{half}\n{a}");
    assert!(first["cells_after_context"].as_u64() > half["cells_after_context"].as_u64());
    let ms = |r: &serde_json::Value| r["stats"]["ms_redecode"].as_f64().unwrap();
    assert!(
        ms(half) * 3.0 < ms(a),
        "a replay decodes the probe only: {} ms against {} ms",
        ms(half),
        ms(a)
    );
    // the recorded scores do not outlive the job
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains("agnostic-shared.out.jsonl.scores-")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
