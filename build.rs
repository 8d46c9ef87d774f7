fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // tests/c_abi.rs drives the C compiler through the `cc` crate, which needs the target and host triples;
    // outside a build script they exist only if we pass them on.
    for var in ["TARGET", "HOST"] {
        let v = std::env::var(var).unwrap_or_default();
        println!("cargo:rustc-env=COMPRESSKV_{var}={v}");
    }
    #[cfg(feature = "llama")]
    llama::build();
}

/// `--features llama`: the patched llama.cpp in vendor/llama.cpp, built as static libraries (CPU only) for
/// the integration tests (tests/llama_api/), and bindgen's bindings of its `llama.h`.
///
/// libllama.a is built with `LLAMA_COMPRESSKV=ON` but without this crate's static library (it does not exist
/// yet while this crate is being built): `LLAMA_COMPRESSKV_LIB` names an empty archive, which a static
/// libllama.a only records and never reads. The `ckv_*` symbols that libllama.a calls come from this crate
/// itself, the rlib every test binary links. rustc puts the rlib before the native libraries on the link
/// line, so nothing would pull those objects out of it by the time the linker reads libllama.a: every
/// function of include/compresskv.h is therefore marked `--undefined`, which makes the linker take it from
/// the rlib when it first sees it.
#[cfg(feature = "llama")]
mod llama {
    use std::env;
    use std::fs;
    use std::path::{Path, PathBuf};

    pub fn build() {
        let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
        let src = root.join("vendor/llama.cpp");
        let stamp = src.join(".compresskv-patched");
        let header = root.join("include/compresskv.h");
        // Not the whole tree (thousands of files): the patch series' stamp changes whenever vendor/fetch.sh
        // applies a new series. Edits made in vendor/llama.cpp by hand are picked up by the next build that
        // runs for another reason (cmake's own dependency tracking), or by touching the stamp.
        println!("cargo:rerun-if-changed={}", stamp.display());
        println!("cargo:rerun-if-changed={}", header.display());
        // the library's ggml side, compiled into libllama (patches/0001)
        for f in ["src/ggml/compresskv-ggml.cpp", "include/compresskv-ggml.h"] {
            println!("cargo:rerun-if-changed={}", root.join(f).display());
        }
        if !stamp.exists() || !src.join("include/llama.h").exists() {
            panic!(
                "--features llama needs the patched llama.cpp in {}: run vendor/fetch.sh (scripts/setup.sh \
                 does) first",
                src.display()
            );
        }

        let out = PathBuf::from(env::var("OUT_DIR").unwrap());
        // target/<profile>/llama.cpp: outside OUT_DIR (which changes with every feature set) so that the
        // cmake build stays incremental, and apart from vendor/build, which the scripts use.
        let profile_dir = out
            .ancestors()
            .nth(3)
            .expect("OUT_DIR is <target>/<profile>/build/<pkg>/out");
        // COMPRESSKV_LLAMA_CUDA=<CUDA architectures, e.g. 90>: libllama.a with the CUDA backend as well, for the
        // tools of src/bin on a GPU machine (bench/gpu.sh, scripts/build-llama.sh --cuda); its own build tree.
        println!("cargo:rerun-if-env-changed=COMPRESSKV_LLAMA_CUDA");
        let cuda = env::var("COMPRESSKV_LLAMA_CUDA").ok().filter(|v| !v.is_empty());
        let dst = profile_dir.join(if cuda.is_some() { "llama.cpp-cuda" } else { "llama.cpp" });
        fs::create_dir_all(&dst).unwrap();
        let empty = dst.join("libcompresskv-none.a");
        if !empty.exists() {
            fs::write(&empty, b"!<arch>\n").unwrap();
        }

        // The -D flags of scripts/build-llama.sh (same compiler command lines, so that ccache serves the
        // objects compiled there), only the library targets.
        let cflags = ggml_cflags(&root);
        let mut cfg = cmake::Config::new(&src);
        if let Some(launcher) = ccache_launcher() {
            cfg.define("CMAKE_C_COMPILER_LAUNCHER", &launcher)
                .define("CMAKE_CXX_COMPILER_LAUNCHER", &launcher);
        }
        if let Some(arch) = &cuda {
            cfg.define("GGML_CUDA", "ON").define("CMAKE_CUDA_ARCHITECTURES", arch);
        }
        let dst = cfg
            .out_dir(&dst)
            .no_default_flags(true)
            .profile("Release")
            // no_default_flags still passes cc's `-w`: CMAKE_<LANG>_FLAGS set to the scripts' own (ggml-cflags.sh)
            .define("CMAKE_C_FLAGS", &cflags)
            .define("CMAKE_CXX_FLAGS", &cflags)
            .define("CMAKE_ASM_FLAGS", "")
            .define("BUILD_SHARED_LIBS", "OFF")
            .define("LLAMA_BUILD_TESTS", "OFF")
            .define("LLAMA_BUILD_EXAMPLES", "OFF")
            .define("LLAMA_OPENSSL", "OFF")
            .define("LLAMA_BUILD_UI", "OFF")
            .define("LLAMA_USE_PREBUILT_UI", "OFF")
            .define("LLAMA_COMPRESSKV", "ON")
            .define("LLAMA_COMPRESSKV_DIR", &root)
            .define("LLAMA_COMPRESSKV_LIB", &empty)
            .build_target("llama")
            .build();
        let build = dst.join("build");

        // libllama.a calls into ggml, which registers the CPU backend (ggml-cpu) and sits on ggml-base.
        // `-bundle`: not copied into this crate's rlib or libcompresskv.a, only passed to the final link.
        let mut libs = vec![("src", "llama"), ("ggml/src", "ggml"), ("ggml/src", "ggml-cpu")];
        if cuda.is_some() {
            libs.push(("ggml/src/ggml-cuda", "ggml-cuda"));
        }
        libs.push(("ggml/src", "ggml-base"));
        for (dir, lib) in libs {
            println!("cargo:rustc-link-search=native={}", build.join(dir).display());
            println!("cargo:rustc-link-lib=static:-bundle={lib}");
        }
        if cuda.is_some() {
            // ggml-cuda's shared dependencies (GGML_STATIC off); libcuda.so from the toolkit's stubs at link time,
            // the driver's at run time
            let home = env::var("CUDA_PATH").unwrap_or_else(|_| "/usr/local/cuda".into());
            println!("cargo:rerun-if-env-changed=CUDA_PATH");
            for dir in [
                "lib64",
                "lib64/stubs",
                "targets/x86_64-linux/lib",
                "targets/x86_64-linux/lib/stubs",
            ] {
                println!("cargo:rustc-link-search=native={home}/{dir}");
            }
            for lib in ["cudart", "cublas", "cublasLt", "cuda"] {
                println!("cargo:rustc-link-lib={lib}");
            }
        }
        let cache = fs::read_to_string(build.join("CMakeCache.txt")).unwrap_or_default();
        if cache.lines().any(|l| l == "GGML_OPENMP_ENABLED:INTERNAL=ON") {
            println!("cargo:rustc-link-lib=gomp");
        }
        for lib in ["stdc++", "pthread", "m", "dl"] {
            println!("cargo:rustc-link-lib={lib}");
        }
        for sym in header_functions(&header) {
            println!("cargo:rustc-link-arg=-Wl,--undefined={sym}");
        }

        bindings(&src, &out.join("llama_sys.rs"));
    }

    /// The C and C++ flags of every llama.cpp build here, from scripts/ggml-cflags.sh (ggml's AMX matmul left
    /// out: it segfaults at this llama.cpp commit). Empty if the script cannot run.
    fn ggml_cflags(root: &Path) -> String {
        let script = root.join("scripts/ggml-cflags.sh");
        println!("cargo:rerun-if-changed={}", script.display());
        println!("cargo:rerun-if-env-changed=COMPRESSKV_GGML_AMX");
        println!("cargo:rerun-if-env-changed=CC");
        match std::process::Command::new("sh").arg(&script).output() {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
            _ => String::new(),
        }
    }

    /// ccache with this build script's own `LC_ALL` (none, usually), as scripts/build-llama.sh runs it.
    ///
    /// ggml finds ccache by itself (GGML_CCACHE), but the cmake crate runs the build with `LC_ALL=C`, and
    /// ccache hashes `LC_ALL`: every object would miss the entries of vendor/build. A launcher `env -u LC_ALL
    /// ccache` (or `env LC_ALL=<ours> ccache`) restores the caller's locale for the compiler. Objects whose
    /// preprocessed text names the build directory (ggml.c includes the generated ggml-version.h) still miss.
    fn ccache_launcher() -> Option<String> {
        let path = env::var_os("PATH")?;
        let ccache = env::split_paths(&path)
            .map(|d| d.join("ccache"))
            .find(|p| p.is_file())?;
        let locale = match env::var("LC_ALL") {
            Ok(v) if v.contains(';') => return None,
            Ok(v) => format!("LC_ALL={v}"),
            Err(_) => "-u;LC_ALL".to_string(),
        };
        Some(format!("env;{locale};{}", ccache.display()))
    }

    /// The names of the functions declared in include/compresskv.h (`ckv_name(` outside comments).
    fn header_functions(header: &Path) -> Vec<String> {
        let text = fs::read_to_string(header).expect("read include/compresskv.h");
        let mut code = String::new();
        let mut rest = text.as_str();
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("/*") {
                rest = r.find("*/").map_or("", |i| &r[i + 2..]);
                code.push(' ');
            } else if let Some(r) = rest.strip_prefix("//") {
                rest = r.find('\n').map_or("", |i| &r[i..]);
            } else {
                let c = rest.chars().next().unwrap();
                code.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let mut names = Vec::new();
        let mut i = 0;
        while let Some(j) = code[i..].find("ckv_") {
            let start = i + j;
            let end = code[start..]
                .find(|c: char| !ident(c))
                .map_or(code.len(), |k| start + k);
            let before_ok = start == 0 || !code[..start].ends_with(ident);
            if before_ok && code[end..].trim_start().starts_with('(') {
                let name = code[start..end].to_string();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            i = end;
        }
        assert!(
            names.len() > 10,
            "found only {names:?} in {}: has the header's form changed?",
            header.display()
        );
        names
    }

    fn bindings(src: &Path, out: &Path) {
        let b = bindgen::Builder::default()
            .header(src.join("include/llama.h").to_str().unwrap())
            .clang_arg(format!("-I{}", src.join("ggml/include").display()))
            .clang_arg("-DLLAMA_COMPRESSKV")
            .allowlist_function("llama_.*")
            .allowlist_type("llama_.*")
            .allowlist_var("LLAMA_.*")
            .generate()
            .unwrap_or_else(|e| {
                panic!(
                    "bindgen failed on vendor/llama.cpp/include/llama.h: {e} (needs libclang: apt-get install \
                     libclang-dev, or set LIBCLANG_PATH)"
                )
            });
        b.write_to_file(out).expect("write llama_sys.rs");
    }
}
