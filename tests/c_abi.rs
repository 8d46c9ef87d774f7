//! The C ABI from C: compile C programs against the static library and run them.
//!
//! - `tests/c/ckv_abi_test.c` exercises every function of `include/compresskv.h`, every refusal, and
//!   byte-exact compaction of f16 (rows and transposed) and q8_0 caches; it prints `N passed, M failed` and
//!   exits non-zero on any failure.
//! - `examples/c/ckv_example.c`, the short example for embedders, must build warning-free, keep the tokens
//!   its queries point at, and move their rows where the plan says.
//!
//! These tests fail (never skip) if no C compiler can be run.

use std::path::{Path, PathBuf};
use std::process::Command;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// `target/<profile>/`: the test executable lives in its `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable outside target/<profile>/deps")
        .to_path_buf()
}

/// `libcompresskv.a` of the profile this test was built with. `cargo test` builds the library with all its
/// crate types, but leaves the static library in `deps/` (as `libcompresskv-<hash>.a`); only `cargo build`
/// copies it up to `target/<profile>/`, where it may therefore be stale. Take the newest of these; if there
/// is none, build it (in a separate target directory, so as not to wait on the lock of the running cargo).
fn staticlib() -> PathBuf {
    let dir = profile_dir();
    let mut candidates = vec![dir.join("libcompresskv.a")];
    if let Ok(entries) = std::fs::read_dir(dir.join("deps")) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("libcompresskv-") && name.ends_with(".a") {
                candidates.push(e.path());
            }
        }
    }
    let newest = candidates
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max();
    if let Some((_, lib)) = newest {
        return lib;
    }
    let dir_name = dir
        .file_name()
        .and_then(|s| s.to_str())
        .expect("profile directory name")
        .to_string();
    let profile = if dir_name == "debug" {
        "dev".to_string()
    } else {
        dir_name.clone()
    };
    let target_dir = dir.parent().expect("target dir").join("c_abi_staticlib");
    let status = Command::new(env!("CARGO"))
        .current_dir(MANIFEST_DIR)
        .args(["build", "--lib", "--profile", &profile, "--target-dir"])
        .arg(&target_dir)
        .status()
        .expect("running cargo build for the static library");
    assert!(status.success(), "cargo build --lib --profile {profile} failed");
    let lib = target_dir.join(&dir_name).join("libcompresskv.a");
    assert!(lib.is_file(), "{} missing after cargo build", lib.display());
    lib
}

/// Compile `source` (relative to the crate root) against the static library with `-Werror`, run it, and
/// return its exit status, stdout and stderr.
fn compile_and_run(source: &str, name: &str) -> (std::process::ExitStatus, String, String) {
    let lib = staticlib();
    let root = Path::new(MANIFEST_DIR);
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));

    let compiler = cc::Build::new()
        .target(env!("COMPRESSKV_TARGET"))
        .host(env!("COMPRESSKV_HOST"))
        .opt_level(1)
        .debug(true)
        .cargo_metadata(false)
        .warnings(true)
        .extra_warnings(true)
        .try_get_compiler()
        .expect("no usable C compiler (install gcc or clang, or set CC)");
    let mut cmd = compiler.to_command();
    cmd.arg("-std=c11")
        .arg("-Werror")
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join(source))
        .arg("-o")
        .arg(&exe)
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm"]);
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run the C compiler {:?}: {e} (install gcc or clang)",
            compiler.path()
        )
    });
    assert!(
        out.status.success(),
        "compiling {source} failed: {:?}\n{}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let run = Command::new(&exe)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap_or_else(|e| panic!("running {source}: {e}"));
    let _ = std::fs::remove_file(&exe);
    (
        run.status,
        String::from_utf8_lossy(&run.stdout).into_owned(),
        String::from_utf8_lossy(&run.stderr).into_owned(),
    )
}

#[test]
fn c_abi_test_passes() {
    let (status, stdout, stderr) = compile_and_run("tests/c/ckv_abi_test.c", "ckv_abi_test_c");
    let summary = stdout.lines().last().unwrap_or("").to_string();
    assert!(
        status.success(),
        "the C ABI test failed ({status}):\n{stdout}\n{stderr}"
    );
    let (passed, failed) = summary
        .strip_suffix(" failed")
        .and_then(|s| s.split_once(" passed, "))
        .and_then(|(p, f)| Some((p.parse::<u32>().ok()?, f.parse::<u32>().ok()?)))
        .unwrap_or_else(|| panic!("no 'N passed, M failed' summary line:\n{stdout}"));
    assert_eq!(failed, 0, "{stdout}\n{stderr}");
    assert!(passed >= 200, "only {passed} checks ran:\n{stdout}");
    println!("{stdout}");
}

/// The example: SnapKV, budget 16 of 48 tokens, queries pointing at tokens 5, 17 and 30.
#[test]
fn c_example_runs() {
    let (status, stdout, stderr) = compile_and_run("examples/c/ckv_example.c", "ckv_example_c");
    assert!(status.success(), "the C example failed ({status}):\n{stdout}\n{stderr}");
    println!("{stdout}");
    let version = format!("compresskv {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(stdout.lines().next(), Some(version.as_str()), "{stdout}");
    assert!(stdout.contains("plan: 48 tokens -> 16 cells\n"), "{stdout}");
    // the deliberate refusal: its status name and the library's message
    assert!(
        stdout.contains("a short K buffer is refused: CKV_ERR_SIZE (ckv_compact: "),
        "{stdout}"
    );
    // "layer L: kept N: t0 t1 ..."
    let layers: Vec<Vec<i32>> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("layer "))
        .map(|l| {
            let (n, rest) = l
                .split_once(": kept ")
                .and_then(|(_, r)| r.split_once(": "))
                .unwrap_or_else(|| panic!("layer line {l:?}"));
            let n: usize = n.parse().unwrap_or_else(|_| panic!("layer line {l:?}"));
            let kept: Vec<i32> = rest
                .split_whitespace()
                .map(|t| t.parse().expect("token index"))
                .collect();
            assert_eq!(kept.len(), n, "{l}");
            kept
        })
        .collect();
    assert_eq!(layers.len(), 2, "{stdout}");
    for kept in &layers {
        assert_eq!(kept.len(), 16, "{stdout}");
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "not ascending: {kept:?}");
        for t in [5, 17, 30].into_iter().chain(40..48) {
            assert!(kept.contains(&t), "token {t} not kept: {kept:?}");
        }
    }
    assert!(
        stdout.contains("ok: the kept tokens' rows are in cells 16..31"),
        "{stdout}"
    );
}
