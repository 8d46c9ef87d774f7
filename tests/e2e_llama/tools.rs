//! The calibration tool, the shipped profile found by fingerprint, and llama-server.

use super::*;

fn calibrate_bin() -> PathBuf {
    tool("llama-compresskv-calibrate")
}

/// The calibration tool on a tiny grid (three ~500-token needle probes, one held-out QA sample), with the key
/// gate (phase 3: reconstruction scores of the same four contexts): it writes a profile the library accepts for
/// this model, gate included, and a second run resumes from the state file, redoes nothing and writes the same
/// bytes (deterministic).
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
                "--gate",
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
        log1.contains("probe 3/3") && log1.contains("calib 1/1") && log1.contains("gate 4/4"),
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

    // the gate: one weight vector per layer and KV head, fitted on two contexts and checked on the other two
    let g = p.gate.as_ref().expect("--gate writes the gate");
    assert_eq!(
        (g.weights.len(), g.weights[0].len(), g.weights[0][0].len()),
        (30, 3, 129)
    );
    assert!(g.fit["held_out_r2"].as_f64().unwrap().is_finite(), "{}", g.fit);
    assert_eq!(g.fit["contexts"], 4);

    let (log2, text2) = calibrate();
    assert_eq!(
        log2.matches("(done before)").count(),
        8,
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

/// llama-server with `--compresskv`: the prompt is compressed after its prefill (a stats line), the needle is
/// still retrieved, and a repeated request reuses the compressed history (it decodes only the prompt's last
/// token again, as upstream does for a cached prompt), is not compressed again and answers the same.
#[test]
fn server_compresses_the_prompt_and_reuses_it() {
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
    let (mut answers, mut prefilled) = (Vec::new(), Vec::new());
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
        prefilled.push(v["timings"]["prompt_n"].as_u64().unwrap());
    }
    drop(guard);
    assert!(
        prefilled[0] > 3000 && prefilled[1] == 1,
        "prompt tokens decoded: {prefilled:?}"
    );

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&stats)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one compression, the second request reuses it:\n{}",
        slog()
    );
    for s in &lines {
        assert!(s["n_prompt"].as_u64().unwrap() > 3000);
        assert!(s["cells_after"].as_u64().unwrap() <= 256 + 32);
    }
    assert_eq!(answers[0], answers[1], "the same request must give the same answer");
}

/// `llama-cli`'s conversation mode (it runs on the server's slot code): the first message (a ~1.8K-token
/// document with the needle and its question) is compressed to the budget, each later turn read from stdin is
/// appended after the kept cells (the cells before its compression are the kept cells plus that turn, not the
/// conversation again) and the sequence is compressed back to the budget, so the memory stays flat.
#[test]
fn cli_conversation_appends_turns_to_the_compressed_cache() {
    let bin = tool("llama-cli");
    let doc = tmpdir().join("cli-document.txt");
    std::fs::write(&doc, plain_needle_text(8000)).unwrap();
    let stats = tmpdir().join("stats-cli.jsonl");
    let _ = std::fs::remove_file(&stats);
    let questions = "Who wrote the essay?\nWhat is the best thing to do in San Francisco?\nSay that again.\n";
    let mut child = Command::new(&bin)
        .args(["-m", model().to_str().unwrap(), "-f", doc.to_str().unwrap()])
        .args(["-t", "2", "-c", "4096", "-n", "24", "--temp", "0", "--no-warmup"])
        .args([
            "--compresskv",
            "--compresskv-budget",
            "256",
            "--compresskv-stats",
            stats.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run llama-cli");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(questions.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (text, log) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{log}");
    assert!(text.to_lowercase().contains("sandwich"), "{text}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&stats)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "the document and each of 3 turns compressed:\n{log}");
    let first = &lines[0];
    assert!(first["n_prompt"].as_u64().unwrap() > 1500, "{first}");
    assert_eq!(first["cells_before"], first["n_prompt"]);
    for w in lines.windows(2) {
        let (before, after) = (&w[0], &w[1]);
        let kept = before["cells_after"].as_u64().unwrap();
        assert!(kept <= 256, "{before}");
        // the previous answer and the new question: tens of tokens, appended after the kept cells
        let added = after["cells_before"].as_u64().unwrap() - kept;
        let grown = after["n_prompt"].as_u64().unwrap() - before["n_prompt"].as_u64().unwrap();
        assert!(
            added <= 80 && added >= grown,
            "{added} cells added for {grown} new tokens: {after}"
        );
        assert!(after["cells_after"].as_u64().unwrap() <= 256, "{after}");
    }
}
