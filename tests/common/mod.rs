//! Helpers shared by the integration tests that drive the real model and the patched llama.cpp tools
//! (e2e_llama, llama_api, server_load, server_chat). Each test binary uses a subset.
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

/// The text `bench/needle.py` prints for `args` (--essays, --chars, --depth, --needle, ...): a needle prompt.
pub fn needle_text(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(root().join("bench/needle.py"))
        .args(args)
        .output()
        .expect("python3 bench/needle.py");
    assert!(
        out.status.success(),
        "needle.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One HTTP/1.1 exchange with llama-server on loopback, the reply bounded by `timeout`: (status, body).
pub fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    timeout: std::time::Duration,
) -> std::io::Result<(u32, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(10))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(std::time::Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((status, body.to_string()))
}

/// A `llama-server` on a free loopback port, killed when dropped (at the end of a test or when it panics).
pub struct Server {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
    pub log: PathBuf,
}

impl Server {
    /// Start `vendor/build/bin/llama-server` with `args` and `envs` on a free loopback port, its stderr in
    /// `log_name` under the test directory, and wait (up to 2 minutes) until `/health` answers.
    pub fn start(args: &[&str], envs: &[(&str, &str)], log_name: &str) -> Server {
        use std::time::{Duration, Instant};
        let bin = bin_dir().join("llama-server");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/build-llama.sh (scripts/test.sh does)",
            bin.display()
        );
        // a free loopback port: bound here, released, then given to the server
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tmpdir().join(log_name);
        let child = Command::new(&bin)
            .args(args)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start llama-server");
        let server = Server {
            child,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        let t0 = Instant::now();
        while !matches!(
            http(server.addr, "GET", "/health", "", Duration::from_secs(5)),
            Ok((200, _))
        ) {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "llama-server did not come up:\n{}",
                server.tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        server
    }

    /// The log from byte `from` on (token pieces need not be valid UTF-8).
    pub fn log_from(&self, from: usize) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&bytes[from.min(bytes.len())..]).into_owned()
    }

    pub fn log_len(&self) -> usize {
        std::fs::metadata(&self.log).map(|m| m.len() as usize).unwrap_or(0)
    }

    /// Whether the log from byte `from` on comes to contain `needle` within 10 s (the server writes its log from
    /// a thread of its own, so a line may land after the reply).
    pub fn log_has(&self, from: usize, needle: &str) -> bool {
        let t0 = std::time::Instant::now();
        while !self.log_from(from).contains(needle) {
            if t0.elapsed() > std::time::Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        true
    }

    /// The last 60 lines of the log.
    pub fn tail(&self) -> String {
        let log = self.log_from(0);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
