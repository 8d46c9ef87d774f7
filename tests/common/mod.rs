//! Helpers shared by the integration tests that drive the real model and the patched llama.cpp tools
//! (e2e_llama, llama_api, server_load). Each test binary uses a subset.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The path a fetch script prints (scripts/fetch-model.sh, scripts/fetch-data.sh), fetching on first use.
pub fn script_output(script: &str, args: &[&str]) -> PathBuf {
    let out = Command::new(root().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Scratch files of the tests (prompts, stats, logs, sessions).
pub fn tmpdir() -> PathBuf {
    let d = root().join("target/e2e");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The directory of the patched tools: vendor/build/bin, or $COMPRESSKV_LLAMA_BIN (for example the
/// AddressSanitizer build of `scripts/fuzz.sh --asan-llama`, vendor/build-asan/bin).
pub fn bin_dir() -> PathBuf {
    std::env::var_os("COMPRESSKV_LLAMA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("vendor/build/bin"))
}

/// SmolLM2-135M-Instruct with f32 weights: the Q4_1 file of `scripts/fetch-model.sh smollm2` dequantized by
/// the patched `llama-quantize --allow-requantize ... F32` into tmpdir() (540 MB, written once).
///
/// The equivalence tests of compaction need it: with quantized weights the CPU quantizes every matmul's
/// activations to q8 first, so a last-bit difference in an attention sum (the same terms added in another
/// order, because the kept cells sit at other indices) can flip a q8 rounding and move logits by ~0.4, which
/// decides greedy near-ties. With f32 weights the activations stay f32 and such differences stay at f32
/// rounding.
pub fn smollm2_f32() -> PathBuf {
    // tests of one binary run in parallel threads: one writes the file, the others wait for it
    static WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _write = WRITE.lock().unwrap_or_else(|e| e.into_inner());
    let out = tmpdir().join("SmolLM2-135M-Instruct.F32.gguf");
    if out.exists() {
        return out;
    }
    let q4 = script_output("scripts/fetch-model.sh", &["smollm2"]);
    let tool = bin_dir().join("llama-quantize");
    assert!(
        tool.exists(),
        "{} is missing: run scripts/build-llama.sh --targets llama-quantize (scripts/test.sh does)",
        tool.display()
    );
    let part = out.with_extension("gguf.part");
    let r = Command::new(&tool)
        .arg("--allow-requantize")
        .arg(&q4)
        .arg(&part)
        .arg("F32")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", tool.display()));
    assert!(
        r.status.success(),
        "llama-quantize F32 failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    std::fs::rename(&part, &out).unwrap();
    out
}
