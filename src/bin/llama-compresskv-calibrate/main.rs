//! llama-compresskv-calibrate: compute a compresskv model profile (semantic retrieval heads and per-layer
//! eviction error weights) through the real model.
//!
//! Phase 1, SRH identification (needle probes):
//!   for each probe: prefill the prompt, greedy-decode up to --max-gen tokens; at the step that produces y_t,
//!   with m_t = #{i in A : prompt[i] == y_t} (A = the answer span's positions),
//!       S(l,h) += m_t * sum_{i in A} attn_t(l,h,i)
//!   a probe counts when the ROUGE-1 recall of the answer against the span is > 0.5;
//!   head_scores = mean S over the probes that count; each layer's heads ranked by it (ties: lower head first).
//! Phase 2, layer error (held-out QA samples):
//!   prefill all but the last w tokens, decode the window and take the softmax rows of the SRHs:
//!       score(i) = mean over the layer's top-k SRHs of avgpool5(sum over window rows of attn(l,h,i)), i < n - w
//!   keep(l) = top (budget - w) prefix tokens + the window (+ every generated token);
//!   at every decode step, pass 1 (full cache) records O_full(l), the attention output after the output
//!   projection; pass 2 decodes the same token again with each layer's attention restricted to keep(l)
//!   (softmax renormalised over the kept cells), records O_comp(l) and writes O_full(l) back, so every layer
//!   sees the full-cache residual stream:  e(l) += ||O_comp - O_full||_F / (||O_full||_F + 1e-5).
//!   Per data set e is normalised over layers; the sets are averaged and normalised again: layer_weights.
//!
//! Phase 3, the key gate (--gate, or --gate-only on an existing profile): gate.rs.
//!
//! Attention probabilities and outputs are read (and, in pass 2, written) through the graph evaluation
//! callback (observe.rs), so flash attention is off and the cache cell of position p is p (one sequence from
//! a cleared cache; checked at every step). Every probe and sample done is appended to the state file (JSON
//! lines), from which a killed run resumes; the profile is validated by the library before it is written.
//!
//! Exit status: 0 written, 1 a failure on the way, 2 a usage error.

// The library: the profile's validation, and (through its build script) the llama.cpp static libraries,
// whose libllama.a calls the library's ckv_* functions.
extern crate compresskv;

#[path = "../common/mod.rs"]
mod common;
mod gate;
mod observe;
mod profile;
mod prompts;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::rc::Rc;

use clap::Parser;
use serde_json::Value;

use common::{argmax, compress, Backend, Batch, Context, ContextParams, FlashAttn, Model, Token};
use observe::{Calib, Phase};

/// Compute a compresskv model profile (semantic retrieval heads and layer error weights) through the model.
#[derive(Parser, Debug)]
#[command(name = "llama-compresskv-calibrate", version, allow_negative_numbers = true)]
#[command(after_help = "llama.cpp's spelling -ngl N is accepted for --n-gpu-layers.")]
struct Args {
    /// The model (GGUF)
    #[arg(short = 'm', long = "model", value_name = "MODEL.gguf")]
    model: String,
    /// Needle probes (JSON lines of scripts/calib-data.py)
    #[arg(long, value_name = "PROBES.jsonl")]
    probes: String,
    /// Held-out calibration samples (JSON lines)
    #[arg(long, value_name = "CALIB.jsonl")]
    calib: String,
    /// The profile to write
    #[arg(short = 'o', long = "output", value_name = "PROFILE.json")]
    output: String,
    /// Resume file (default PROFILE.json.state.jsonl); a killed run continues from it
    #[arg(long, value_name = "FILE")]
    state: Option<String>,
    /// CPU threads
    #[arg(short = 't', long, value_name = "N", default_value_t = 2, value_parser = common::parse_count)]
    threads: i32,
    /// Layers offloaded to the GPU (-ngl)
    #[arg(long = "n-gpu-layers", value_name = "N", default_value_t = 0, value_parser = common::parse_count)]
    n_gpu_layers: i32,
    /// Context size (0: the longest prompt + max-gen)
    #[arg(short = 'c', long = "ctx-size", value_name = "N", default_value_t = 0, value_parser = common::parse_count)]
    ctx_size: i32,
    /// Prefill batch
    #[arg(short = 'b', long = "batch-size", value_name = "N", default_value_t = 512, value_parser = common::parse_count)]
    batch_size: i32,
    /// Greedy tokens per needle probe
    #[arg(long, value_name = "N", default_value_t = 48, value_parser = common::parse_count)]
    max_gen: i32,
    /// Decode steps per calibration sample
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = common::parse_count)]
    steps: i32,
    /// Tokens kept per layer when measuring the error
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = common::parse_count)]
    budget: i32,
    /// Observation window
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = common::parse_count)]
    window: i32,
    /// SRHs per layer used for the error selection
    #[arg(long = "srh", value_name = "N", default_value_t = 4, value_parser = common::parse_count)]
    k_srh: i32,
    /// Seed of the split into halves for the stability check
    #[arg(long, value_name = "N", default_value_t = 42, value_parser = common::parse_count)]
    seed: i32,
    /// Use only the first N probes (0: all)
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = common::parse_count)]
    max_probes: i32,
    /// Use only the first N calibration samples (0: all)
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = common::parse_count)]
    max_calib: i32,
    /// Also fit the key gate (phase 3) into the profile
    #[arg(long)]
    gate: bool,
    /// Only fit the key gate, into the existing profile -o (its SRHs and layer weights kept)
    #[arg(long)]
    gate_only: bool,
}

/// Average pooling kernel of the error selection (not an option).
const POOL: i32 = 5;

fn main() -> ExitCode {
    let args = Args::parse_from(common::args_with_long_names(&[("-ngl", "--n-gpu-layers")]));
    let a = &args;
    if a.threads < 1
        || a.batch_size < 1
        || a.max_gen < 1
        || a.steps < 1
        || a.window < 1
        || a.k_srh < 1
        || a.budget <= a.window
    {
        eprintln!("error: --threads, -b, --max-gen, --steps, --window and --srh must be >= 1, --budget > --window");
        return ExitCode::from(2);
    }
    ExitCode::from(run(a) as u8)
}

/// Decodes token spans with the observer set to a phase for the last batch only.
struct Runner {
    obs: Rc<RefCell<Calib>>,
    batch: Batch,
    n_batch: i32,
}

impl Runner {
    /// Decode tokens [i0, i1) of `toks` at their positions, observing only the last batch; logits for the
    /// last token.
    fn decode(&mut self, ctx: &mut Context<'_>, toks: &[Token], i0: i32, i1: i32, phase: Phase) -> bool {
        let mut b = i0;
        while b < i1 {
            let n = self.n_batch.min(i1 - b);
            self.batch
                .set(&toks[b as usize..(b + n) as usize], b, Some((i1 - 1 - b) as usize));
            {
                let mut st = self.obs.borrow_mut();
                st.phase = if b + n == i1 { phase } else { Phase::Idle };
                st.seen.iter_mut().for_each(|s| *s = false);
            }
            let ret = ctx.decode(&self.batch);
            let mut st = self.obs.borrow_mut();
            st.phase = Phase::Idle;
            if ret != 0 || !st.error.is_empty() {
                let sep = if st.error.is_empty() { "" } else { ": " };
                eprintln!("error: decode failed ({ret}){sep}{}", st.error);
                return false;
            }
            b += n;
        }
        true
    }

    /// Cells are positions: the softmax row of the last one-token step sums to 1 over cells [0, pos].
    fn check_cells(&self, pos: i32) -> bool {
        let st = self.obs.borrow();
        let n_kv = st.probs_ne[0];
        for (il, p) in st.probs.iter().enumerate() {
            if n_kv <= pos as i64 || (p.len() as i64) < n_kv {
                eprintln!("error: layer {il} attends to {n_kv} cells, position {pos} is not among them");
                return false;
            }
            let s: f64 = p[..=pos as usize].iter().fold(0.0, |s, &x| s + x as f64);
            if (s - 1.0).abs() > 1e-3 {
                eprintln!(
                    "error: layer {il}: attention over cells [0, {pos}] sums to {s}, not 1: cells are not positions"
                );
                return false;
            }
        }
        true
    }
}

fn fmt_time(s: f64) -> String {
    if s < 0.0 || !s.is_finite() {
        return "?".into();
    }
    let s = s as i64;
    format!("{}m{:02}s", s / 60, s % 60)
}

/// Progress lines: `what done/total  elapsed ..  left ~..  message` (the tests read them).
struct Progress {
    what: &'static str,
    total: usize,
    done: usize,
    skipped: usize,
    t0: std::time::Instant,
}

impl Progress {
    fn new(what: &'static str, total: usize) -> Progress {
        Progress {
            what,
            total,
            done: 0,
            skipped: 0,
            t0: std::time::Instant::now(),
        }
    }

    fn step(&mut self, msg: &str) {
        self.done += 1;
        let el = self.t0.elapsed().as_secs_f64();
        let run = self.done - self.skipped;
        let eta = if run > 0 {
            el / run as f64 * (self.total - self.done) as f64
        } else {
            -1.0
        };
        eprintln!(
            "{} {}/{}  elapsed {}  left ~{}  {msg}",
            self.what,
            self.done,
            self.total,
            fmt_time(el),
            fmt_time(eta)
        );
    }
}

/// The state file: records of the probes and samples done, by "phase:id".
struct State {
    done: HashMap<String, Value>,
    file: std::fs::File,
}

impl State {
    /// Read the records of an earlier run, then open the file for appending; None if it cannot be written.
    fn open(path: &str) -> Option<State> {
        let mut done = HashMap::new();
        let text = std::fs::read(path).unwrap_or_default();
        for line in String::from_utf8_lossy(&text).split('\n') {
            // a line cut by a killed run does not parse: that record is redone
            let Ok(r) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let (Some(Value::String(phase)), Some(Value::String(id))) = (r.get("phase"), r.get("id")) {
                done.insert(format!("{phase}:{id}"), r.clone());
            }
        }
        if !done.is_empty() {
            eprintln!("resuming from {path}: {} records", done.len());
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).ok()?;
        Some(State { done, file })
    }

    fn get(&self, phase: &str, id: &str) -> Option<&Value> {
        self.done.get(&format!("{phase}:{id}"))
    }

    /// Append a record (a JSON object with phase and id) and keep it as a resumed run would read it back.
    fn record<T: serde::Serialize>(&mut self, phase: &str, id: &str, r: &T) -> bool {
        let line = serde_json::to_string(r).expect("plain data serializes");
        if writeln!(self.file, "{line}").and_then(|_| self.file.flush()).is_err() {
            eprintln!("error: cannot append to the state file");
            return false;
        }
        self.done.insert(
            format!("{phase}:{id}"),
            serde_json::from_str(&line).expect("just written"),
        );
        true
    }
}

#[derive(serde::Serialize)]
struct SrhRecord<'a> {
    phase: &'static str,
    id: &'a str,
    n_tokens: i32,
    answer: String,
    recall: f64,
    ok: bool,
    meta: &'a Value,
    scores: &'a [f64],
}

#[derive(serde::Serialize)]
struct ErrRecord<'a> {
    phase: &'static str,
    id: &'a str,
    set: &'a str,
    n_tokens: i32,
    steps: i32,
    text: String,
    err: &'a [f64],
}

fn run(a: &Args) -> i32 {
    let state_path = a.state.clone().unwrap_or_else(|| format!("{}.state.jsonl", a.output));
    let _backend = Backend::init();
    let Some(model) = Model::load(&a.model, a.n_gpu_layers) else {
        eprintln!("error: cannot load model {}", a.model);
        return 1;
    };
    let n_vocab = model.n_vocab();
    let info = compress::model_info(&model);
    let (n_layer, n_head) = (info.n_layer as usize, info.n_head as usize);
    if a.k_srh > info.n_head {
        eprintln!("error: --srh {} exceeds the {} query heads", a.k_srh, info.n_head);
        return 2;
    }

    let read = |path: &str, max: i32| prompts::read_prompts(&model, path, max as usize);
    let (probes, calib) = match (read(&a.probes, a.max_probes), read(&a.calib, a.max_calib)) {
        (Ok(p), Ok(c)) => (p, c),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let mut n_max = 0i32;
    for p in &probes {
        n_max = n_max.max(p.tokens.len() as i32 + a.max_gen + 1);
        if p.span_end <= p.span_begin {
            eprintln!("error: probe '{}' has an empty answer span", p.id);
            return 1;
        }
    }
    for p in &calib {
        n_max = n_max.max(p.tokens.len() as i32 + a.steps + 1);
        if p.tokens.len() as i32 <= a.budget + a.window {
            eprintln!(
                "error: calibration sample '{}' ({} tokens) is not longer than the budget",
                p.id,
                p.tokens.len()
            );
            return 1;
        }
    }
    let n_ctx = if a.ctx_size > 0 { a.ctx_size } else { n_max };
    if n_max > n_ctx {
        eprintln!("error: the longest prompt needs {n_max} cells, -c is {n_ctx}");
        return 1;
    }

    if a.gate_only {
        return gate_phase(a, &model, &probes, &calib, &state_path);
    }

    let obs = Rc::new(RefCell::new(Calib::new(n_layer)));
    let params = ContextParams {
        n_ctx: n_ctx as u32,
        n_batch: a.batch_size as u32,
        n_ubatch: a.batch_size as u32,
        n_threads: a.threads,
        flash_attn: FlashAttn::Off, // the softmax must be a node of its own
        type_k: common::TYPE_F16,
        type_v: common::TYPE_F16,
    };
    let Some(mut ctx) = Context::new(&model, &params, Some(obs.clone())) else {
        eprintln!("error: cannot create a context of {n_ctx} cells");
        return 1;
    };
    let mut run = Runner {
        obs: obs.clone(),
        batch: Batch::new(a.batch_size as usize),
        n_batch: a.batch_size,
    };

    let Some(mut state) = State::open(&state_path) else {
        eprintln!("error: cannot write {state_path}");
        return 1;
    };
    eprintln!(
        "model: {}, {} layers x {} heads ({} KV), fingerprint {}; {} probes, {} calibration samples, -c {n_ctx}",
        info.arch,
        n_layer,
        n_head,
        info.n_head_kv,
        info.fingerprint,
        probes.len(),
        calib.len()
    );

    // phase 1: SRH probes
    let mut pr1 = Progress::new("probe", probes.len());
    for p in &probes {
        if state.get("srh", &p.id).is_some() {
            pr1.skipped += 1;
            pr1.step(&format!("{} (done before)", p.id));
            continue;
        }
        ctx.memory_clear(true);
        let n = p.tokens.len() as i32;
        if !run.decode(&mut ctx, &p.tokens, 0, n - 1, Phase::Idle) {
            return 1;
        }
        let mut seq = p.tokens.clone();
        let mut score = vec![0.0f64; n_layer * n_head];
        let mut answer = Vec::new();
        for pos in (n - 1..).take(a.max_gen as usize) {
            if !run.decode(&mut ctx, &seq, pos, pos + 1, Phase::Step) || !run.check_cells(pos) {
                return 1;
            }
            let y = argmax(ctx.last_logits(n_vocab)) as Token;
            if model.is_eog(y) {
                break;
            }
            let span = p.span_begin..p.span_end;
            let m = p.tokens[span.clone()].iter().filter(|&&t| t == y).count();
            if m > 0 {
                let st = obs.borrow();
                let n_kv = st.probs_ne[0] as usize;
                for il in 0..n_layer {
                    for h in 0..n_head {
                        let row = &st.probs[il][h * n_kv..]; // one query row per head
                        let s = span.clone().fold(0.0f64, |s, i| s + row[i] as f64);
                        score[il * n_head + h] += m as f64 * s;
                    }
                }
            }
            answer.extend(model.piece(y));
            seq.push(y);
        }
        let recall = prompts::rouge1_recall(&answer, p.answer.as_bytes());
        let r = SrhRecord {
            phase: "srh",
            id: &p.id,
            n_tokens: n,
            answer: String::from_utf8_lossy(&answer).into_owned(),
            recall,
            ok: recall > 0.5,
            meta: &p.meta,
            scores: &score,
        };
        if !state.record("srh", &p.id, &r) {
            return 1;
        }
        let counted = if recall > 0.5 { "" } else { " (not counted)" };
        pr1.step(&format!("{}: {n} tokens, recall {recall:.2}{counted}", p.id));
    }

    // SRH ranking from the probes that count, and its stability over two halves of them
    let records: Vec<Value> = probes
        .iter()
        .map(|p| state.get("srh", &p.id).expect("every probe is done").clone())
        .collect();
    let heads = match profile::Heads::rank(&records, n_layer, n_head, a.k_srh as usize, a.seed as u32) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };

    // phase 2: layer error on the held-out calibration samples
    let mut pr2 = Progress::new("calib", calib.len());
    for p in &calib {
        if state.get("err", &p.id).is_some() {
            pr2.skipped += 1;
            pr2.step(&format!("{} (done before)", p.id));
            continue;
        }
        ctx.memory_clear(true);
        let n = p.tokens.len() as i32;
        let w = a.window;
        if !run.decode(&mut ctx, &p.tokens, 0, n - w, Phase::Idle)
            || !run.decode(&mut ctx, &p.tokens, n - w, n, Phase::Window)
        {
            return 1;
        }
        {
            let mut st = obs.borrow_mut();
            let (n_kv, n_rows) = (st.probs_ne[0], st.probs_ne[1]);
            if n_rows != w as i64 || n_kv < n as i64 {
                eprintln!("error: the window softmax has {n_rows} rows over {n_kv} cells (expected {w} over >= {n})");
                return 1;
            }
            let keep = profile::select(
                &st.probs,
                n_kv as usize,
                &heads.ranking,
                a.k_srh as usize,
                n as usize,
                w as usize,
                POOL as usize,
                a.budget as usize,
            );
            st.keep = keep;
            st.err.iter_mut().for_each(|e| *e = 0.0);
        }
        let mut seq = p.tokens.clone();
        seq.push(argmax(ctx.last_logits(n_vocab)) as Token);
        let mut steps = 0;
        let mut text = Vec::new();
        for _ in 0..a.steps {
            if model.is_eog(*seq.last().unwrap()) {
                break;
            }
            let pos = seq.len() as i32 - 1;
            if !run.decode(&mut ctx, &seq, pos, pos + 1, Phase::Full) {
                return 1;
            }
            let y = argmax(ctx.last_logits(n_vocab)) as Token;
            ctx.seq_rm(0, pos, -1);
            if !run.decode(&mut ctx, &seq, pos, pos + 1, Phase::Comp) || !run.check_cells(pos) {
                return 1;
            }
            if let Some(il) = obs.borrow().seen.iter().position(|s| !s) {
                eprintln!("error: no attention output projection (blk.{il}.attn_output.weight) was seen in layer {il}");
                return 1;
            }
            text.extend(model.piece(*seq.last().unwrap()));
            seq.push(y);
            steps += 1;
        }
        let err = obs.borrow().err.clone();
        let r = ErrRecord {
            phase: "err",
            id: &p.id,
            set: &p.set,
            n_tokens: n,
            steps,
            text: String::from_utf8_lossy(&text).into_owned(),
            err: &err,
        };
        if !state.record("err", &p.id, &r) {
            return 1;
        }
        pr2.step(&format!("{}: {n} tokens, {steps} steps", p.id));
    }

    // layer weights, the profile, validated by the library against this model before it is written
    let errs: Vec<&Value> = calib
        .iter()
        .map(|p| state.get("err", &p.id).expect("every sample is done"))
        .collect();
    let settings = profile::Settings {
        max_gen: a.max_gen,
        budget: a.budget,
        window: a.window,
        pool: POOL,
        srh: a.k_srh,
        steps: a.steps,
        seed: a.seed as u32,
    };
    let (text, n_ok) = match profile::write(&info, &heads, &records, &probes, &errs, &settings) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    if std::fs::write(&a.output, format!("{text}\n")).is_err() {
        eprintln!("error: cannot write {}", a.output);
        return 1;
    }
    eprintln!("wrote {} ({n_ok} of {} probes counted)", a.output, probes.len());
    drop(ctx);
    if a.gate {
        return gate_phase(a, &model, &probes, &calib, &state_path);
    }
    0
}

/// Phase 3 on every probe and calibration sample as a context.
fn gate_phase(a: &Args, model: &Model, probes: &[prompts::Prompt], calib: &[prompts::Prompt], state_path: &str) -> i32 {
    let Some(mut state) = State::open(state_path) else {
        eprintln!("error: cannot write {state_path}");
        return 1;
    };
    let contexts: Vec<&prompts::Prompt> = probes.iter().chain(calib).collect();
    let ga = gate::GateArgs {
        output: &a.output,
        state_path,
        threads: a.threads,
        batch_size: a.batch_size,
    };
    gate::run(&ga, model, &contexts, &mut state)
}
