//! The benchmark's support: deterministic random rows, timing statistics, memory and system probes, and the
//! multithreaded memcpy it is compared with.

use std::time::Instant;

use compresskv::types::GgmlType;
use rayon::prelude::*;
use serde_json::{json, Value};

use super::{MEMCPY_CHUNK, N_EMBD};

// ---------------------------------------------------------------------------------------------
// Deterministic random data: every row has its own seed, so any row can be regenerated alone.

pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// xorshift64* stream.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

pub(crate) fn row_seed(seed: u64, layer: usize, which: u64, cell: usize) -> u64 {
    splitmix(seed ^ splitmix((layer as u64) << 40 ^ which << 32 ^ cell as u64))
}

/// One row of `N_EMBD` random valid elements of `ty` (f16: uniform [-1, 1); q8_0: f16 scales in
/// [1/254, 1/63], quants in [-127, 127]).
pub(crate) fn fill_row(ty: GgmlType, seed: u64, out: &mut [u8]) {
    let mut r = Rng::new(seed);
    match ty {
        GgmlType::F16 => {
            for e in out.chunks_exact_mut(2) {
                e.copy_from_slice(&half::f16::from_f32(r.unit()).to_le_bytes());
            }
        }
        GgmlType::Q8_0 => {
            for b in out.chunks_exact_mut(34) {
                let d = (1.25 + 0.75 * r.unit()) / 127.0;
                b[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
                for q in &mut b[2..] {
                    *q = (((r.next() >> 33) % 255) as i32 - 127) as i8 as u8;
                }
            }
        }
        _ => unreachable!("only f16 and q8_0 are generated"),
    }
}

/// Fill rows `rows` of one layer buffer (parallel over rows).
pub(crate) fn fill_rows(
    ty: GgmlType,
    seed: u64,
    layer: usize,
    which: u64,
    buf: &mut [u8],
    rows: std::ops::Range<usize>,
) {
    let rb = ty.row_bytes(N_EMBD).unwrap();
    buf[rows.start * rb..rows.end * rb]
        .par_chunks_exact_mut(rb)
        .enumerate()
        .for_each(|(i, row)| fill_row(ty, row_seed(seed, layer, which, rows.start + i), row));
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers.

pub(crate) fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

pub(crate) fn best(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::INFINITY, f64::min)
}

pub(crate) fn stats(v: &[f64]) -> Value {
    json!({"best": round3(best(v)), "median": round3(median(v)), "all": v.iter().map(|&x| round3(x)).collect::<Vec<_>>()})
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// A `/proc/self/status` field in KiB.
pub(crate) fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Highest VmHWM seen before any reset (KiB): the whole run's peak RSS.
pub(crate) static PEAK_KIB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Fold the current VmHWM into [`PEAK_KIB`]; returns the whole run's peak so far.
pub(crate) fn note_peak() -> u64 {
    let h = status_kib("VmHWM:").unwrap_or(0);
    PEAK_KIB.fetch_max(h, std::sync::atomic::Ordering::Relaxed).max(h)
}

/// Reset the peak-RSS mark (VmHWM) to the current RSS (after folding it into the run's peak); false
/// where not allowed.
pub(crate) fn reset_hwm() -> bool {
    note_peak();
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

pub(crate) fn mib(kib: u64) -> f64 {
    round3(kib as f64 / 1024.0)
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn meminfo_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub(crate) fn git(args: &[&str]) -> Option<String> {
    let o = std::process::Command::new("git").args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// `--malloc mmap` (the default): fix glibc's mmap threshold at 256 KiB, so every large scratch
/// buffer is mapped fresh and unmapped on free. The VmHWM delta of each build then measures that
/// build's scratch, and every build pays its page faults, as the first call of a fresh process (and
/// any buffer over glibc's 32 MiB dynamic maximum) does anyway. Returns whether it was applied.
pub(crate) fn fix_mmap_threshold() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Multithreaded memcpy of `src` into `dst` (same length), chunked over the rayon pool.
pub(crate) fn par_memcpy(dst: &mut [u8], src: &[u8]) {
    dst.par_chunks_mut(MEMCPY_CHUNK)
        .zip(src.par_chunks(MEMCPY_CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}
