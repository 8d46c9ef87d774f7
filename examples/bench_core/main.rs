//! Core benchmark: scoring + selection + compaction of a Llama-3-8B-shaped KV cache, beside a
//! `memcpy` of the same number of bytes, in the same run.
//!
//! ```text
//! shape: n_layer L (32, or fewer at large n: see --layers), n_head 32, n_head_kv 8, head_dim 128
//! for n in --n, ty in --types (f16, q8_0), heads in --heads (all, srh):
//!     K[l], V[l] = n cells of random valid `ty` rows, n_head_kv*head_dim elements each, row-major
//!                  (llama.cpp's K; V non-transposed = flash-attention layout); cells = 0..n
//!     Q[l]       = random f32 [w=8][n_head][head_dim]
//!     params     = Params::default() (CompressKV), budget 2048
//!                  heads all: no profile   -> CompressKV falls back to all 32 query heads, uniform budgets
//!                  heads srh: a synthetic profile (4 random SRHs per layer, uniform layer weights)
//!     repeat reps times:
//!         t_plan    = time(plan = plan::build(params, shape, profile, cells, [K[l], Q[l]]))   # ckv_plan_create
//!         t_compact = time(plan.compact(K, Some(V)))                                          # ckv_compact
//!         t_memcpy  = time(dst.par_chunks_mut(4 MiB).copy_from_slice(src), S bytes)           # rayon, same pool
//!         restore rows 0..n_slots of every K[l], V[l] (regenerated; not timed)
//!     report best and median of t_plan, t_compact, t_total = t_plan + t_compact, t_memcpy;
//!     ratio = t_total / t_memcpy (target: <= 2)
//! ```
//!
//! Byte accounting (`S`, the size of the memcpy): the bytes the step *reads*:
//! `S = L * n * k_row` (scoring dequantizes every key of every layer)
//!   `+ L * n_slots * (k_row + v_row)` (compaction reads each kept K and V row and writes it once).
//! The step writes only the kept rows (`L * n_slots * (k_row + v_row)`), while the memcpy writes all `S`
//! bytes, so the memcpy moves at least as many bytes as the step in both directions: a lenient
//! baseline. Compaction alone is also compared with a memcpy of just the kept K and V bytes.
//!
//! Memory: the cache buffers (K and V of every layer), two memcpy buffers of `S` bytes, and the
//! library's scratch. The library has no scratch-size API, so the scratch is measured: before each
//! `plan::build` the peak-RSS mark is reset (`5 > /proc/self/clear_refs`) and `VmHWM - VmRSS(before)`
//! after it is the peak extra resident memory of the build (an underestimate when the allocator reuses
//! already-resident freed memory; the first repetition is the cleanest).
//!
//! Run: `cargo run --release --example bench_core -- [--n 8192,32768,131072] [--types f16,q8_0]
//! [--layers N] [--heads all,srh] [--reps 3] [--budget 2048] [--seed S] [--out bench/results/core-cpu.json]`.
//! Threads: rayon's global pool (`RAYON_NUM_THREADS`, default one per CPU). Default `--layers`: 32 for
//! n <= 32768, 4 above (the whole 128K f16 cache is 16 GiB); the ratio does not depend on the layer count
//! (every layer costs the same), and per-layer times are reported.

use std::time::Instant;

use compresskv::layout::{Geometry, LayerView, LayerViewMut};
use compresskv::plan::{self, LayerInput, Params, Plan, Shape};
use compresskv::profile::{ModelIdentity, Profile};
use compresskv::score::Heads;
use compresskv::types::GgmlType;
use serde_json::{json, Value};

const N_HEAD: usize = 32;
const N_HEAD_KV: usize = 8;
const HEAD_DIM: usize = 128;
const N_EMBD: usize = N_HEAD_KV * HEAD_DIM;
const FULL_LAYERS: usize = 32;
const MEMCPY_CHUNK: usize = 4 << 20;

mod support;
use support::*;

// ---------------------------------------------------------------------------------------------
// Options.

struct Opts {
    ns: Vec<usize>,
    types: Vec<GgmlType>,
    layers: Option<usize>,
    heads: Vec<String>,
    reps: usize,
    budget: usize,
    seed: u64,
    out: String,
    /// Fix glibc's mmap threshold (see [`fix_mmap_threshold`]).
    malloc_mmap: bool,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        ns: vec![8192, 32768, 131072],
        types: vec![GgmlType::F16, GgmlType::Q8_0],
        layers: None,
        heads: vec!["all".into(), "srh".into()],
        reps: 3,
        budget: 2048,
        seed: 0x00c0_ffee,
        out: "bench/results/core-cpu.json".into(),
        malloc_mmap: true,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let die = |m: String| -> ! {
        eprintln!("bench_core: {m}");
        std::process::exit(2)
    };
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--help" || a == "-h" {
            println!(
                "bench_core [--n 8192,32768,131072] [--types f16,q8_0] [--layers N] [--heads all,srh] \
                 [--reps 3] [--budget 2048] [--seed S] [--malloc mmap|default] [--out bench/results/core-cpu.json]"
            );
            std::process::exit(0);
        }
        let v = args
            .get(i + 1)
            .cloned()
            .unwrap_or_else(|| die(format!("{a} needs a value")));
        let num = |s: &str| -> usize { s.trim().parse().unwrap_or_else(|_| die(format!("{a}: bad number {s}"))) };
        match a {
            "--n" => o.ns = v.split(',').map(num).collect(),
            "--types" => {
                o.types = v
                    .split(',')
                    .map(|t| match t.trim() {
                        "f16" => GgmlType::F16,
                        "q8_0" => GgmlType::Q8_0,
                        t => die(format!("--types: {t} (f16 or q8_0)")),
                    })
                    .collect()
            }
            "--layers" => o.layers = Some(num(&v)),
            "--heads" => {
                o.heads = v.split(',').map(|s| s.trim().to_string()).collect();
                if let Some(h) = o.heads.iter().find(|h| *h != "all" && *h != "srh") {
                    die(format!("--heads: {h} (all or srh)"));
                }
            }
            "--reps" => o.reps = num(&v).max(1),
            "--budget" => o.budget = num(&v),
            "--seed" => o.seed = num(&v) as u64,
            "--out" => o.out = v,
            "--malloc" => {
                o.malloc_mmap = match v.as_str() {
                    "mmap" => true,
                    "default" => false,
                    m => die(format!("--malloc: {m} (mmap or default)")),
                }
            }
            _ => die(format!("unknown option {a}")),
        }
        i += 2;
    }
    if o.ns.iter().any(|&n| n < 64) {
        die("--n: each n must be >= 64".into());
    }
    o
}

/// Default layer count for `n` (see the module doc).
fn layers_for(o: &Opts, n: usize) -> usize {
    o.layers.unwrap_or(if n <= 32768 { FULL_LAYERS } else { 4 })
}

/// A synthetic profile: per layer a seeded random permutation of the query heads (the first `N_SRH`
/// are the SRHs), uniform layer weights.
fn synthetic_profile(n_layer: usize, seed: u64) -> Profile {
    let mut r = Rng::new(seed ^ 0x5eed);
    let head_ranking = (0..n_layer)
        .map(|_| {
            let mut p: Vec<usize> = (0..N_HEAD).collect();
            for i in (1..N_HEAD).rev() {
                p.swap(i, (r.next() % (i as u64 + 1)) as usize);
            }
            p
        })
        .collect();
    Profile {
        version: 1,
        model: ModelIdentity {
            arch: "llama".into(),
            n_layer,
            n_head: N_HEAD,
            n_head_kv: N_HEAD_KV,
            head_dim: HEAD_DIM,
            fingerprint: "bench0000000000".into(),
        },
        head_ranking,
        head_scores: vec![vec![0.0; N_HEAD]; n_layer],
        layer_weights: vec![1.0 / n_layer as f64; n_layer],
        calibration: json!({"tool": "bench_core", "synthetic": true}),
        gate: None,
    }
}

// ---------------------------------------------------------------------------------------------

/// One (n, type) configuration: buffers built once, every `heads` mode run on them.
fn run_config(o: &Opts, n: usize, ty: GgmlType, rows: &mut Vec<Value>) {
    let n_layer = layers_for(o, n);
    let rb = ty.row_bytes(N_EMBD).unwrap();
    let layer_bytes = n * rb;
    let geom = Geometry::rows(ty, N_EMBD, n).unwrap();
    let shape = Shape {
        n_layer,
        heads: Heads {
            n_head: N_HEAD,
            n_head_kv: N_HEAD_KV,
            head_dim: HEAD_DIM,
        },
    };
    let params = Params {
        budget: o.budget,
        ..Params::default()
    };
    let w = params.window;
    let kept_est = o.budget.min(n);
    let s_est = n_layer * (layer_bytes + kept_est * 2 * rb);
    let need = 2 * n_layer * layer_bytes + 2 * s_est;
    if let Some(avail) = meminfo_kib("MemAvailable:") {
        if need as u64 / 1024 > avail * 9 / 10 {
            eprintln!(
                "bench_core: n {n} {} x {n_layer} layers needs ~{:.1} GiB of buffers, {:.1} GiB available: \
                 skipped (use --layers)",
                ty.name(),
                need as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 20) as f64
            );
            return;
        }
    }

    let t = Instant::now();
    let mut k: Vec<Vec<u8>> = (0..n_layer).map(|_| vec![0u8; layer_bytes]).collect();
    let mut v: Vec<Vec<u8>> = (0..n_layer).map(|_| vec![0u8; layer_bytes]).collect();
    for l in 0..n_layer {
        fill_rows(ty, o.seed, l, 0, &mut k[l], 0..n);
        fill_rows(ty, o.seed, l, 1, &mut v[l], 0..n);
    }
    let queries: Vec<Vec<f32>> = (0..n_layer)
        .map(|l| {
            let mut r = Rng::new(row_seed(o.seed, l, 2, 0));
            (0..w * N_HEAD * HEAD_DIM).map(|_| r.unit()).collect()
        })
        .collect();
    let cells: Vec<u32> = (0..n as u32).collect();
    eprintln!(
        "bench_core: n {n} {} {n_layer} layers: filled {:.2} GiB in {:.1} s",
        ty.name(),
        (2 * n_layer * layer_bytes) as f64 / (1u64 << 30) as f64,
        ms(t) / 1e3
    );

    for mode in &o.heads {
        let profile = (mode == "srh").then(|| synthetic_profile(n_layer, o.seed));
        let (mut t_plan, mut t_compact, mut t_total) = (Vec::new(), Vec::new(), Vec::new());
        let (mut t_memcpy, mut t_memcpy_kept) = (Vec::new(), Vec::new());
        let mut scratch_kib: Vec<u64> = Vec::new();
        let mut first_kept: Option<Vec<u32>> = None;
        let mut last_plan: Option<Plan> = None;
        let mut src: Vec<u8> = Vec::new();
        let mut dst: Vec<u8> = Vec::new();
        let mut checked = false;
        for rep in 0..o.reps {
            // Plan (score + select): what ckv_plan_create runs after validating its C arguments.
            let hwm_ok = reset_hwm();
            let rss0 = status_kib("VmRSS:").unwrap_or(0);
            let t = Instant::now();
            let plan = {
                let inputs: Vec<LayerInput<'_>> = (0..n_layer)
                    .map(|l| LayerInput {
                        keys: LayerView::new(geom, &k[l]).unwrap(),
                        queries: &queries[l],
                    })
                    .collect();
                plan::build(&params, shape, profile.as_ref(), &cells, &inputs).expect("plan::build")
            };
            let tp = ms(t);
            if hwm_ok {
                let hwm = status_kib("VmHWM:").unwrap_or(0);
                scratch_kib.push(hwm.saturating_sub(rss0));
            }
            // Compact K and V in place: what ckv_compact runs.
            let t = Instant::now();
            {
                let mut kv: Vec<LayerViewMut<'_>> = k.iter_mut().map(|b| LayerViewMut::new(geom, b).unwrap()).collect();
                let mut vv: Vec<LayerViewMut<'_>> = v.iter_mut().map(|b| LayerViewMut::new(geom, b).unwrap()).collect();
                plan.compact(&mut kv, Some(&mut vv[..])).expect("compact");
            }
            let tc = ms(t);
            t_plan.push(tp);
            t_compact.push(tc);
            t_total.push(tp + tc);

            let n_slots = plan.n_slots;
            let kept_bytes = n_layer * n_slots * 2 * rb;
            let s = n_layer * layer_bytes + kept_bytes;
            if src.len() != s {
                // Allocated and touched outside the timed region.
                src = vec![1u8; s];
                dst = vec![0u8; s];
                par_memcpy(&mut dst, &src);
            }
            let t = Instant::now();
            par_memcpy(&mut dst, &src);
            t_memcpy.push(ms(t));
            let t = Instant::now();
            par_memcpy(&mut dst[..kept_bytes], &src[..kept_bytes]);
            t_memcpy_kept.push(ms(t));

            // Sanity: the plan is the same every repetition (the data is restored), and compaction
            // moved what it says (layer 0, a few kept rows).
            let kept0 = plan.layers[0].groups[0].kept.clone();
            match &first_kept {
                None => first_kept = Some(kept0.clone()),
                Some(f) => assert_eq!(f, &kept0, "plan differs between repetitions"),
            }
            if !checked {
                let mut want = vec![0u8; rb];
                for j in [0, kept0.len() / 2, kept0.len() - 1] {
                    fill_row(ty, row_seed(o.seed, 0, 0, kept0[j] as usize), &mut want);
                    assert_eq!(&k[0][j * rb..(j + 1) * rb], &want[..], "K row {j} after compaction");
                    fill_row(ty, row_seed(o.seed, 0, 1, kept0[j] as usize), &mut want);
                    assert_eq!(&v[0][j * rb..(j + 1) * rb], &want[..], "V row {j} after compaction");
                }
                checked = true;
            }

            // Restore the rows compaction wrote (dst = the n_slots lowest cells = rows 0..n_slots).
            let max_dst = plan
                .layers
                .iter()
                .flat_map(|lp| lp.groups.iter().map(|g| g.dst.len()))
                .max()
                .unwrap_or(0);
            for l in 0..n_layer {
                fill_rows(ty, o.seed, l, 0, &mut k[l], 0..max_dst);
                fill_rows(ty, o.seed, l, 1, &mut v[l], 0..max_dst);
            }
            eprintln!(
                "  rep {rep} heads {mode}: plan {tp:.1} ms, compact {tc:.1} ms, memcpy {:.1} ms",
                t_memcpy.last().unwrap()
            );
            last_plan = Some(plan);
        }
        drop((src, dst));

        let plan = last_plan.unwrap();
        let n_slots = plan.n_slots;
        let heads_used = plan.layers[0].heads_used.len();
        let k_all = n_layer * layer_bytes;
        let kept_kv = n_layer * n_slots * 2 * rb;
        let s = k_all + kept_kv;
        let (bt, bm) = (best(&t_total), best(&t_memcpy));
        let (mt, mm) = (median(&t_total), median(&t_memcpy));
        // Analytic scratch of one layer's build (score.rs): dequantized keys of the KV groups in
        // flight (we * head_dim f32 each, up to n_head_kv), logits [w][we] f32 per head in flight,
        // raw + pooled scores (ws f32 per head used) and the mean (ws f64).
        let groups_read = {
            let mut g: Vec<usize> = plan.layers[0]
                .heads_used
                .iter()
                .map(|h| h / (N_HEAD / N_HEAD_KV))
                .collect();
            g.sort_unstable();
            g.dedup();
            g.len()
        };
        let est_layer = groups_read * n * HEAD_DIM * 4 + heads_used * w * n * 4 + heads_used * n * 4 * 2 + n * 8;
        let row = json!({
            "n": n,
            "type": ty.name(),
            "heads": mode,
            "heads_used_per_layer": heads_used,
            "kv_groups_read_per_layer": groups_read,
            "fallback_all_heads": plan.fallback_all_heads,
            "layers": n_layer,
            "n_slots": n_slots,
            "bytes": {
                "k_row": rb,
                "k_all_layers": k_all,
                "kept_k_plus_v": kept_kv,
                "memcpy_s": s,
                "cache_k_plus_v": 2 * k_all,
            },
            "ms_plan": stats(&t_plan),
            "ms_compact": stats(&t_compact),
            "ms_total": stats(&t_total),
            "ms_memcpy": stats(&t_memcpy),
            "ms_memcpy_kept": stats(&t_memcpy_kept),
            "ratio": round3(bt / bm),
            "ratio_median": round3(mt / mm),
            "ratio_compact_vs_memcpy_kept": round3(best(&t_compact) / best(&t_memcpy_kept)),
            "gbps_step": round3(s as f64 / (bt * 1e-3) / 1e9),
            "gbps_memcpy": round3(s as f64 / (bm * 1e-3) / 1e9),
            "per_layer_ms": {
                "plan": round3(best(&t_plan) / n_layer as f64),
                "compact": round3(best(&t_compact) / n_layer as f64),
                "total": round3(bt / n_layer as f64),
                "memcpy": round3(bm / n_layer as f64),
            },
            "extrapolated_32_layers_ms_total": round3(bt / n_layer as f64 * FULL_LAYERS as f64),
            "plan_ms_score_reported_by_library": round3(plan.ms_score),
            "scratch": {
                "measured_plan_peak_rss_delta_mib": scratch_kib.iter().map(|&x| mib(x)).collect::<Vec<_>>(),
                "analytic_one_layer_mib": round3(est_layer as f64 / (1u64 << 20) as f64),
                "one_layer_k_bytes_mib": round3(layer_bytes as f64 / (1u64 << 20) as f64),
            },
        });
        println!(
            "{:>7} {:>5} {:>4} {:>3} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>7.2} {:>7.2} {:>8.2} {:>9.1}",
            n,
            ty.name(),
            mode,
            n_layer,
            best(&t_plan),
            best(&t_compact),
            bt,
            bm,
            bt / bm,
            s as f64 / (bt * 1e-3) / 1e9,
            s as f64 / (bm * 1e-3) / 1e9,
            scratch_kib.first().map_or(f64::NAN, |&x| x as f64 / 1024.0),
        );
        rows.push(row);
    }
}

fn main() {
    let o = parse_opts();
    let mmap_fixed = o.malloc_mmap && fix_mmap_threshold();
    let threads = rayon::current_num_threads();
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "bench_core: Llama-3-8B shape (n_head {N_HEAD}, n_head_kv {N_HEAD_KV}, head_dim {HEAD_DIM}), budget {}, \
         window {}, reps {}, rayon threads {threads}, nproc {nproc}, {}",
        o.budget,
        Params::default().window,
        o.reps,
        cpu_model()
    );
    println!(
        "{:>7} {:>5} {:>4} {:>3} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7} {:>8} {:>9}",
        "n",
        "type",
        "hds",
        "L",
        "plan_ms",
        "compact_ms",
        "total_ms",
        "memcpy_ms",
        "ratio",
        "GB/s",
        "cpy_GB/s",
        "scr_MiB"
    );
    let mut rows = Vec::new();
    let t0 = Instant::now();
    for &n in &o.ns {
        for &ty in &o.types {
            run_config(&o, n, ty, &mut rows);
        }
    }
    let wall = ms(t0) / 1e3;
    let p = Params::default();
    let doc = json!({
        "benchmark": "bench_core",
        "what": "compresskv plan::build (score + select) and Plan::compact (K and V in place) on a \
                 Llama-3-8B-shaped cache, beside a rayon-parallel memcpy of the same number of bytes, in the \
                 same process; best and median over reps",
        "byte_accounting": {
            "memcpy_s": "L*n*k_row (scoring dequantizes every key of every layer) + L*n_slots*(k_row+v_row) \
                         (compaction reads every kept K and V row); the memcpy copies S bytes (reads S, writes S)",
            "step_traffic": "reads S, writes L*n_slots*(k_row+v_row): the memcpy moves at least as many bytes \
                             as the step (a lenient baseline)",
            "ratio": "best(ms_total) / best(ms_memcpy); ratio_median: median / median; target <= 2",
            "ratio_compact_vs_memcpy_kept": "best(ms_compact) / best(memcpy of L*n_slots*(k_row+v_row) bytes)",
            "gbps": "S / time, 1e9 bytes per second",
        },
        "machine": {
            "nproc": nproc,
            "rayon_threads": threads,
            "cpu_model": cpu_model(),
            "mem_total_mib": meminfo_kib("MemTotal:").map(mib),
            "arch": std::env::consts::ARCH,
            "os": std::env::consts::OS,
        },
        "git": {
            "commit": git(&["rev-parse", "HEAD"]),
            "dirty": git(&["status", "--porcelain"]).map(|s| !s.is_empty()),
        },
        "params": {
            "model_shape": {"n_layer_full": FULL_LAYERS, "n_head": N_HEAD, "n_head_kv": N_HEAD_KV, "head_dim": HEAD_DIM},
            "method": p.method.name(),
            "budget": o.budget,
            "window": p.window,
            "pool_kernel": p.pool_kernel,
            "fill": p.fill,
            "per_head": p.per_head,
            "n_srh": p.n_srh,
            "chunk": p.chunk,
            "layout": "K and V row-major (V non-transposed, flash-attention layout), n_cells = n, cells = 0..n",
            "heads_modes": {
                "all": "no profile: CompressKV falls back to all query heads (fallback_all_heads), uniform budgets; \
                        what the C ABI does without a profile",
                "srh": "synthetic profile: a random head ranking per layer (first n_srh = 4 are the SRHs), \
                        uniform layer weights (so every layer's budget is the average)",
            },
            "layers_rule": "--layers, else 32 for n <= 32768 and 4 above; per-layer and 32-layer-extrapolated \
                            times are reported",
            "reps": o.reps,
            "seed": o.seed,
            "ns": o.ns,
            "types": o.types.iter().map(|t| t.name()).collect::<Vec<_>>(),
        },
        "memory": {
            "peak_rss_mib_whole_run": mib(note_peak()),
            "malloc": if mmap_fixed {
                "glibc M_MMAP_THRESHOLD fixed at 256 KiB (mallopt): every allocation >= 256 KiB is mmapped and \
                 unmapped on free, so each build's scratch shows in its VmHWM delta and its page faults are timed"
            } else {
                "allocator defaults (glibc's dynamic mmap threshold: after the first free, scratch up to 32 MiB may \
                 be reused from the heap, so later reps' VmHWM deltas undercount)"
            },
            "note": "peak_rss_mib_whole_run: the highest VmHWM of the process (read before every reset). \
                     measured_plan_peak_rss_delta_mib = VmHWM after build - VmRSS before build, per rep (the first rep \
                     is the cleanest: later ones may reuse resident freed memory). The library has no \
                     scratch-size API; analytic_one_layer_mib is this file's estimate from score.rs (dequantized \
                     keys of every KV group read + w x n logits and raw/pooled scores per head used), and build \
                     runs layers in parallel, so several layers' scratch can be live at once.",
        },
        "wall_s": round3(wall),
        "rows": rows,
    });
    if let Some(dir) = std::path::Path::new(&o.out).parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&doc).unwrap() + "\n").expect("write --out");
    println!("wrote {} ({wall:.1} s)", o.out);
}
