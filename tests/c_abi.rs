//! The C ABI from C: compile `examples/c/ckv_example.c` against the static library and run it.
//!
//! The example exercises every function of `include/compresskv.h`, every refusal, and byte-exact
//! compaction of f16 (rows and transposed) and q8_0 caches; it prints `N passed, M failed` and exits
//! non-zero on any failure. This test fails (never skips) if no C compiler can be run.

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

#[test]
fn c_example_passes() {
    let lib = staticlib();
    let root = Path::new(MANIFEST_DIR);
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ckv_example_c-{}", std::process::id()));

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
        .arg(root.join("examples/c/ckv_example.c"))
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
        "compiling ckv_example.c failed: {:?}\n{}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let run = Command::new(&exe)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running the C example");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let _ = std::fs::remove_file(&exe);
    let summary = stdout.lines().last().unwrap_or("").to_string();
    assert!(
        run.status.success(),
        "the C example failed ({}):\n{stdout}\n{stderr}",
        run.status
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
