//! llama-compresskv-bench: decode speed by context depth, full cache vs a compressed one, on random tokens.
//!
//! For each depth D (prompt tokens) and each budget B (0: the full cache):
//!   clear the cache; decode D random tokens (batches of -b), once per depth: the other rows restore
//!   that cache from host memory (llama_state_seq_*)                                -> prefill time
//!   if 0 < B < D: compress sequence 0 (its D tokens) to B cells                    -> compression time, cells
//!   r times: decode --n-gen tokens one at a time at positions D.., then remove them -> decode tokens/s
//! A budget at or above the depth is not run (there is nothing to compress): the full cache at depth B is the
//! speed a cache of B cells can reach. Random tokens need no vocabulary, so this runs a random-weight model
//! written with vocabulary type "none" (bench/random_gguf.py) as well as a real one. The scores the compression
//! computes on such a model are meaningless; its cost and the decode speed that follows are what is measured.
//!
//! The JSON document (-o) is rewritten after every row, so an interrupted run keeps the rows done, and a run of
//! the same configuration on the same -o resumes: it keeps those rows and runs the others.
//!
//! --agnostic JOBS.jsonl instead answers questions about contexts compressed before the question arrived, every
//! method on one prefill per context (bench/ruler.py --engine bench): see agnostic.rs.
//!
//! --check instead runs the compaction check of tests/llama_api/ on whatever backend holds the cache (the
//! gather graph on a GPU): see check.rs. --paths compares the device paths (scoring and compaction graphs) with
//! the host paths in the run's cache types: see paths.rs.
//!
//! Exit status: 0 every row ok, 1 a row or the run failed (the rows done are in the JSON), 2 a usage error.

// Nothing here calls the library, but libllama.a does (its ckv_* functions): linking it also brings the
// llama.cpp static libraries its build script declares.
extern crate compresskv;

mod agnostic;
mod check;
#[path = "../common/mod.rs"]
mod common;
mod mt;
mod paths;
mod speed;

use std::collections::HashSet;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use common::compress::{self, Form, Method, Options};
use common::{now_s, Backend, Batch, Context, ContextParams, FlashAttn, GgmlType, Model, Token};

/// Decode speed by context depth, full cache vs a compressed one, on random tokens.
#[derive(Parser, Debug)]
#[command(name = "llama-compresskv-bench", version, allow_negative_numbers = true)]
#[command(after_help = "llama.cpp's spellings -ngl, -fa, -ctk, -ctv and -ub are accepted for the long options.")]
struct Args {
    /// The model (GGUF)
    #[arg(short = 'm', long = "model", value_name = "MODEL.gguf")]
    model: String,
    /// The JSON document to write (and resume)
    #[arg(short = 'o', long = "output", value_name = "OUT.json")]
    output: String,
    /// Prompt tokens before decoding
    #[arg(short = 'd', long, value_name = "N,N,..", default_value = "0,2048,8192,32768", value_parser = parse_list)]
    depths: List,
    /// 0: the full cache; B > 0: compress to B cells
    #[arg(short = 'B', long, value_name = "N,N,..", default_value = "0,256,1024,2048", value_parser = parse_list)]
    budgets: List,
    /// Tokens decoded after the prompt, per repetition
    #[arg(short = 'n', long = "n-gen", value_name = "N", default_value_t = 128, value_parser = common::parse_count)]
    n_gen: i32,
    /// Decode repetitions
    #[arg(short = 'r', long, value_name = "N", default_value_t = 2, value_parser = common::parse_count)]
    reps: i32,
    /// compresskv, snapkv, pyramidkv, streamingllm
    #[arg(long, value_name = "NAME", default_value = "compresskv")]
    method: String,
    /// compresskv profile (default: looked up for the model, else all heads)
    #[arg(long, value_name = "FILE")]
    profile: Option<String>,
    /// Layers on the GPU (-ngl)
    #[arg(long = "n-gpu-layers", value_name = "N", default_value_t = 99, value_parser = common::parse_count)]
    n_gpu_layers: i32,
    /// Flash attention (-fa)
    #[arg(long = "flash-attn", value_enum, default_value_t = Fa::Auto)]
    flash_attn: Fa,
    /// K cache type (-ctk)
    #[arg(long = "cache-type-k", value_name = "TYPE", default_value = "f16")]
    cache_type_k: String,
    /// V cache type (-ctv)
    #[arg(long = "cache-type-v", value_name = "TYPE", default_value = "f16")]
    cache_type_v: String,
    /// Threads
    #[arg(short = 't', long, value_name = "N", default_value_t = 4, value_parser = common::parse_count)]
    threads: i32,
    /// Prefill batch size
    #[arg(short = 'b', long = "batch-size", value_name = "N", default_value_t = 2048, value_parser = common::parse_count)]
    n_batch: i32,
    /// Prefill micro-batch size (-ub)
    #[arg(long = "ubatch-size", value_name = "N", default_value_t = 512, value_parser = common::parse_count)]
    n_ubatch: i32,
    /// Random tokens' seed
    #[arg(long, value_name = "N", default_value_t = 42, value_parser = common::parse_count)]
    seed: i32,
    /// Prefill every row (default: once per depth, the cache kept in host memory and restored with
    /// llama_state_seq_set_data for the other rows)
    #[arg(long = "no-reuse-prefill")]
    no_reuse_prefill: bool,
    /// Compaction check instead of speed (see check.rs)
    #[arg(long)]
    check: bool,
    /// The check's tolerance on the logits
    #[arg(long, value_name = "X", default_value = "2e-3", value_parser = parse_tol)]
    tol: f32,
    /// Device paths (scoring and compaction graphs) against the host paths instead of speed (see paths.rs)
    #[arg(long, conflicts_with = "check")]
    paths: bool,
    /// --paths: the tolerance on the scores (sums of softmax weights over the window)
    #[arg(long = "score-tol", value_name = "X", default_value = "1e-4", value_parser = parse_tol)]
    score_tol: f32,
    /// One selection per KV head
    #[arg(long = "per-head")]
    per_head: bool,
    /// Contexts compressed before their question, every method on one prefill (see agnostic.rs); -o gets
    /// one JSON line per (job, variant)
    #[arg(long, value_name = "JOBS.jsonl", conflicts_with_all = ["check", "paths"])]
    agnostic: Option<String>,
}

/// A comma-separated list of non-negative integers.
#[derive(Clone, Debug)]
struct List(Vec<i32>);

fn parse_list(s: &str) -> Result<List, String> {
    let v: Option<Vec<i32>> = s
        .split(',')
        .map(|t| {
            t.parse::<i64>()
                .ok()
                .filter(|x| (0..=1 << 24).contains(x))
                .map(|x| x as i32)
        })
        .collect();
    v.map(List)
        .ok_or_else(|| format!("'{s}' is not a list of non-negative integers"))
}

fn parse_tol(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(x) if x > 0.0 => Ok(x),
        _ => Err(format!("'{s}' is not a positive number")),
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Fa {
    On,
    Off,
    Auto,
}

impl Fa {
    fn name(self) -> &'static str {
        match self {
            Fa::On => "on",
            Fa::Off => "off",
            Fa::Auto => "auto",
        }
    }
}

/// The options as the run uses them (validated, in llama.cpp's terms).
struct Run {
    fa: FlashAttn,
    type_k: GgmlType,
    type_v: GgmlType,
    opts: Options,
}

fn main() -> ExitCode {
    let legacy = [
        ("-ngl", "--n-gpu-layers"),
        ("-fa", "--flash-attn"),
        ("-ctk", "--cache-type-k"),
        ("-ctv", "--cache-type-v"),
        ("-ub", "--ubatch-size"),
    ];
    let a = Args::parse_from(common::args_with_long_names(&legacy));
    if a.n_gen < 1 || a.reps < 1 || a.threads < 1 || a.n_batch < 1 || a.n_ubatch < 1 {
        eprintln!("error: -n, -r, -t, -b and -ub must be >= 1");
        return ExitCode::from(2);
    }
    let type_of = |name: &str, flag: &str| {
        let t = common::type_from_name(name);
        if t.is_none() {
            eprintln!("error: {flag}: unknown type '{name}'");
        }
        t
    };
    let Some(type_k) = type_of(&a.cache_type_k, "-ctk") else {
        return ExitCode::from(2);
    };
    let Some(type_v) = type_of(&a.cache_type_v, "-ctv") else {
        return ExitCode::from(2);
    };
    let method = match Method::from_name(&a.method) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let fa = match a.flash_attn {
        Fa::On => FlashAttn::On,
        Fa::Off => FlashAttn::Off,
        Fa::Auto => FlashAttn::Auto,
    };
    let opts = Options {
        method,
        budget: 0,
        profile: a.profile.clone(),
        form: Form::Default,
        per_head: a.per_head,
        stats: None,
    };
    ExitCode::from(run(
        &a,
        &Run {
            fa,
            type_k,
            type_v,
            opts,
        },
    ) as u8)
}

/// Decode `tokens[i0..i1)` of sequence 0 at positions i0.., in batches of `n_batch`; logits of the last token only.
fn decode_span(ctx: &mut Context<'_>, tokens: &[Token], i0: i32, i1: i32, n_batch: i32) -> bool {
    let mut batch = Batch::new(n_batch as usize);
    let mut ok = true;
    let mut i = i0;
    while i < i1 && ok {
        let n = n_batch.min(i1 - i);
        batch.set(&tokens[i as usize..(i + n) as usize], i, Some((i1 - 1 - i) as usize));
        ok = ctx.decode(&batch) == 0;
        i += n_batch;
    }
    ctx.synchronize();
    ok
}

/// Decode one token of sequence 0 at `pos` through a one-token batch the caller owns (the timed loop
/// allocates nothing); synchronized, as generation is before it samples.
fn decode_one(ctx: &mut Context<'_>, one: &mut Batch, token: Token, pos: i32) -> bool {
    one.set(&[token], pos, Some(0));
    let ok = ctx.decode(one) == 0;
    ctx.synchronize();
    ok
}

/// A context for one depth: the prompt, --n-gen tokens and the warm-up token fit; f32: the check's setup.
fn make_context<'m>(model: &'m Model, a: &Args, r: &Run, depth: i32, f32: bool) -> Option<Context<'m>> {
    let n_ctx = ((depth + a.n_gen + 1 + 255) / 256 * 256) as u32;
    let p = ContextParams {
        n_ctx,
        n_batch: a.n_batch as u32,
        n_ubatch: a.n_ubatch as u32,
        n_threads: a.threads,
        flash_attn: if f32 { FlashAttn::Off } else { r.fa },
        type_k: if f32 { common::TYPE_F32 } else { r.type_k },
        type_v: if f32 { common::TYPE_F32 } else { r.type_v },
    };
    let ctx = Context::new(model, &p, None);
    if ctx.is_none() {
        eprintln!("error: cannot create a context of {n_ctx} cells (depth {depth})");
    }
    ctx
}

#[derive(Serialize)]
struct DeviceOut {
    name: String,
    description: String,
    memory_total: usize,
}

/// One row of the speed JSON (fields in the C++ tool's order; rows of an earlier run are read back into it).
#[derive(Serialize, Deserialize, Clone, Default)]
struct SpeedRow {
    depth: i32,
    budget: Option<i32>,
    method: String,
    n_ctx: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    restore_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefill_shared: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefill_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefill_tps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compress_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compress_ret: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttft_share: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cells: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kv_bytes_used: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kv_bytes_alloc: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decode_tps: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decode_tps_mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peak_rss_kib: Option<i64>,
    #[serde(default)]
    ok: bool,
    /// Fields of a resumed row that this version does not write.
    #[serde(flatten)]
    extra: serde_json::Map<String, Value>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Row {
    Speed(SpeedRow),
    Check(check::CheckRow),
    Paths(paths::PathsRow),
}

/// The JSON document (-o), fields in the C++ tool's order.
#[derive(Serialize)]
struct Doc {
    kind: &'static str,
    tool: &'static str,
    model_path: String,
    model_desc: String,
    model_size: u64,
    model_n_params: u64,
    fingerprint: String,
    arch: String,
    n_layer: i32,
    n_head: i32,
    n_head_kv: i32,
    head_dim: i32,
    n_vocab: i32,
    method: String,
    profile: Option<String>,
    window: i32,
    pool: i32,
    chunk: i32,
    n_gen: i32,
    reps: i32,
    n_gpu_layers: i32,
    threads: i32,
    n_batch: i32,
    n_ubatch: i32,
    flash_attn: &'static str,
    type_k: String,
    type_v: String,
    kv_bytes_per_cell: usize,
    seed: u32,
    reuse_prefill: bool,
    system_info: String,
    devices: Vec<DeviceOut>,
    load_s: f64,
    complete: bool,
    rows: Vec<Row>,
    tool_command: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tol: Option<f64>,
}

/// Write `doc` to `path` whole or not at all (a temporary file renamed): a run killed while writing leaves
/// the previous document.
fn save(doc: &Doc, path: &str) -> bool {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, format!("{}\n", common::to_json_indent1(doc))).is_ok() && std::fs::rename(&tmp, path).is_ok()
}

/// The rows an earlier run of the same configuration wrote to `path` (ok rows only), if it is one.
fn resumable_rows(doc: &Doc, path: &str) -> Option<Vec<SpeedRow>> {
    let prev: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let now = serde_json::to_value(doc).expect("plain data serializes");
    let keys = [
        "fingerprint",
        "model_size",
        "method",
        "n_gen",
        "reps",
        "n_gpu_layers",
        "n_ubatch",
        "flash_attn",
        "type_k",
        "type_v",
        "seed",
    ];
    let same = prev.get("kind") == Some(&Value::from("kvspeed"))
        && prev.get("rows").is_some()
        && keys.iter().all(|k| prev.get(k).is_some() && prev.get(k) == now.get(k));
    if !same {
        return None;
    }
    let rows = prev["rows"].as_array().cloned().unwrap_or_default();
    Some(
        rows.into_iter()
            .filter_map(|r| serde_json::from_value::<SpeedRow>(r).ok())
            .filter(|r| r.ok)
            .collect(),
    )
}

fn run(a: &Args, r: &Run) -> i32 {
    let _backend = Backend::init();
    let t_load = now_s();
    let Some(model) = Model::load(&a.model, a.n_gpu_layers) else {
        eprintln!("error: cannot load model {}", a.model);
        return 1;
    };
    let load_s = now_s() - t_load;
    let n_vocab = model.n_vocab();
    if n_vocab < 1 {
        eprintln!("error: the model has no tokens (a vocabulary \"none\" needs <arch>.vocab_size)");
        return 1;
    }
    if let Some(jobs) = &a.agnostic {
        return agnostic::run_jobs(a, r, &model, jobs);
    }
    let info = compress::model_info(&model);
    let n_embd_kv = info.n_head_kv as i64 * info.head_dim as i64;
    let cell_bytes =
        info.n_layer as usize * (common::row_size(r.type_k, n_embd_kv) + common::row_size(r.type_v, n_embd_kv));
    let defaults = compress::defaults();
    let devices = common::devices()
        .into_iter()
        .map(|d| DeviceOut {
            name: d.name,
            description: d.description,
            memory_total: d.memory_total,
        })
        .collect();
    let mut doc = Doc {
        kind: "kvspeed",
        tool: "llama-compresskv-bench",
        model_path: a.model.clone(),
        model_desc: model.desc(),
        model_size: model.size(),
        model_n_params: model.n_params(),
        fingerprint: info.fingerprint.clone(),
        arch: info.arch.clone(),
        n_layer: info.n_layer,
        n_head: info.n_head,
        n_head_kv: info.n_head_kv,
        head_dim: info.head_dim,
        n_vocab,
        method: a.method.clone(),
        profile: a.profile.clone(),
        window: defaults.window,
        pool: defaults.pool,
        chunk: defaults.chunk,
        n_gen: a.n_gen,
        reps: a.reps,
        n_gpu_layers: a.n_gpu_layers,
        threads: a.threads,
        n_batch: a.n_batch,
        n_ubatch: a.n_ubatch,
        flash_attn: a.flash_attn.name(),
        type_k: common::type_name(r.type_k),
        type_v: common::type_name(r.type_v),
        kv_bytes_per_cell: cell_bytes,
        seed: a.seed as u32,
        reuse_prefill: !a.no_reuse_prefill,
        system_info: common::system_info(),
        devices,
        load_s,
        complete: false,
        rows: Vec::new(),
        tool_command: std::env::args().collect::<Vec<_>>().join(" "),
        tol: None,
    };
    // resume (speed mode): the rows an earlier run of the same configuration wrote to -o are kept, not redone
    let mut done = HashSet::new();
    if !a.check && !a.paths {
        if let Some(rows) = resumable_rows(&doc, &a.output) {
            for row in rows {
                done.insert((row.depth, row.budget.unwrap_or(0)));
                doc.rows.push(Row::Speed(row));
            }
            eprintln!("resuming {}: {} rows done", a.output, done.len());
        }
    }
    if !save(&doc, &a.output) {
        eprintln!("error: cannot write {}", a.output);
        return 1;
    }

    let mut rng = mt::Mt19937::new(a.seed as u32);
    let d_max = a.depths.0.iter().copied().max().unwrap_or(0);
    let tokens: Vec<Token> = (0..d_max + a.n_gen)
        .map(|_| rng.below(n_vocab as u32) as Token)
        .collect();

    let mut rc = 0;
    let mut one = Batch::new(1);
    if a.check || a.paths {
        (doc.kind, doc.tol) = if a.check {
            ("kvcheck", Some(a.tol as f64))
        } else {
            ("kvpaths", Some(a.score_tol as f64))
        };
        for &depth in &a.depths.0 {
            for &budget in &a.budgets.0 {
                if budget <= 0 || budget >= depth {
                    continue;
                }
                let (ok, row) = if a.check {
                    let row = check::check_one(&model, a, r, &tokens, depth, budget, n_vocab, &mut one);
                    (row.ok, Row::Check(row))
                } else {
                    let row = paths::paths_one(&model, a, r, &tokens, depth, budget, n_vocab, &mut one);
                    (row.ok, Row::Paths(row))
                };
                rc |= !ok as i32;
                let status = if ok { "ok" } else { "FAILED" };
                let line = serde_json::to_string(&row).expect("plain data serializes");
                eprintln!("{} depth {depth:>7} budget {budget:>5}: {status}  {line}", doc.kind);
                doc.rows.push(row);
                save(&doc, &a.output);
            }
        }
    } else {
        rc = speed::grid(&model, a, r, &tokens, cell_bytes, &done, &mut doc, &mut one);
    }
    doc.complete = rc == 0;
    save(&doc, &a.output);
    rc
}
