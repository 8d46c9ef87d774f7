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
