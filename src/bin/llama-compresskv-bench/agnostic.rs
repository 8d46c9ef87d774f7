//! --agnostic JOBS.jsonl: contexts compressed before their question arrives, every method on one prefill (the
//! kvpress protocol of bench/ruler.py --engine bench).
//!
//! ```text
//! for each job {id, context, rest, gen, variants: [{name, flags, after_question}]} of JOBS.jsonl:
//!     C = tokens(context) (special tokens parsed, BOS as the model wants); R = tokens(rest)
//!     prefill C in one context; snapshot = llama_state_seq_get_data(sequence 0)
//!     for each variant (restoring the snapshot before every variant but the first):
//!         flags (llama.cpp's --compresskv-* flags, read through the library's flag table): none = the full
//!         cache; else llama_kv_compress(C, probe, options) right after the prefill, as llama-completion does
//!         (--compresskv-reconstruct without --compresskv-probe: the library's reconstruction prompt)
//!         decode R after the context (after_question: decode R first, then compress C + R: the query-aware
//!         reference on the same prefill); greedy: up to `gen` tokens, stopping at an end-of-generation token
//!         append {id, variant, answer, cells, compression stats, seconds} to the output (JSON lines)
//! ```
//!
//! A reconstruction (the most expensive scoring by far) is done once per job for every variant that differs
//! only in how the cells are chosen from its scores (budget, ratio, pooling, spans, sinks, one set per KV head,
//! how the heads' scores combine, form): the first writes its raw scores to a file (the library's option
//! `scores`), the others replay them.
//!
//! The question and the template's end (R) are decoded into the compressed cache as the answering run of
//! ruler.py's two-run protocol decodes them after loading a saved compressed context; one prefill serves every
//! variant, so the full cache and every method see the same context KV.

use std::io::Write;

use serde_json::{json, Value};

use super::{decode_one, decode_span, Args, Run};
use crate::common::compress;
use crate::common::{argmax, now_s, Batch, Context, ContextParams, Model};

/// Flags that choose cells from the scores without changing them, for a scoring with a probe (a
/// reconstruction): its window is the probe, so neither the window nor its anchor scores either.
const SELECTION_FLAGS: &[&str] = &[
    "--compresskv-budget",
    "--compresskv-ratio",
    "--compresskv-budget-avg",
    "--compresskv-window",
    "--compresskv-window-anchor",
    "--compresskv-pool",
    "--compresskv-chunk",
    "--compresskv-sink",
    "--compresskv-per-head",
    "--compresskv-head-reduce",
    "--compresskv-preset",
    "--compresskv-form",
];

/// The flags of `flags` that decide a reconstruction's raw scores (the rest choose cells from them), or None
/// for a variant that does not reconstruct.
fn scoring_flags(flags: &[String]) -> Option<Vec<String>> {
    if !flags.iter().any(|f| f == "--compresskv-reconstruct") {
        return None;
    }
    let mut out = Vec::new();
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        let takes_value = compresskv::flags::FLAGS
            .iter()
            .any(|x| x.name == f && !x.hint.is_empty());
        let value = if takes_value { it.next().cloned() } else { None };
        if !SELECTION_FLAGS.contains(&f.as_str()) {
            out.push(f.clone());
            out.extend(value);
        }
    }
    Some(out)
}

/// The options string and the probe text of llama.cpp flags (`--compresskv` first, as the tools take them).
fn options_of(flags: &[String]) -> Result<(String, Option<String>), String> {
    let mut opts = String::new();
    let mut probe = None;
    let mut recon = false;
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        let flag = compresskv::flags::FLAGS
            .iter()
            .find(|x| x.name == f)
            .ok_or_else(|| format!("unknown flag {f}"))?;
        if flag.key.is_empty() {
            continue;
        }
        let value = if flag.hint.is_empty() {
            "1".to_string()
        } else {
            it.next().ok_or_else(|| format!("{f} needs a value"))?.clone()
        };
        if flag.key == compresskv::flags::PROBE_KEY {
            probe = Some(value);
        } else {
            recon |= flag.key == "reconstruct" && value == "1";
            opts.push_str(&format!("{}={value};", flag.key));
        }
    }
    if recon && probe.is_none() {
        probe = Some(compress::option("", "reconstruct_prompt"));
    }
    Ok((opts, probe))
}

/// Run every job of `jobs` (JSON lines), appending one line per variant to `a.output`: 0, or 1 on a failure.
pub fn run_jobs(a: &Args, r: &Run, model: &Model, jobs: &str) -> i32 {
    let text = match std::fs::read_to_string(jobs) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {jobs}: {e}");
            return 1;
        }
    };
    let mut out = match std::fs::OpenOptions::new().create(true).append(true).open(&a.output) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot write {}: {e}", a.output);
            return 1;
        }
    };
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let job: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: {jobs}:{}: {e}", i + 1);
                return 1;
            }
        };
        match run_job(a, r, model, &job) {
            Ok(rows) => {
                for row in rows {
                    if writeln!(out, "{row}").and_then(|_| out.flush()).is_err() {
                        eprintln!("error: cannot append to {}", a.output);
                        return 1;
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {jobs}:{}: {e}", i + 1);
                return 1;
            }
        }
    }
    0
}

fn run_job(a: &Args, r: &Run, model: &Model, job: &Value) -> Result<Vec<Value>, String> {
    let s = |k: &str| job[k].as_str().ok_or_else(|| format!("{k}: a string is needed"));
    let (id, context, rest) = (s("id")?, s("context")?, s("rest")?);
    let gen = job["gen"].as_u64().ok_or("gen: a count is needed")? as usize;
    let variants = job["variants"].as_array().ok_or("variants: an array is needed")?;
    let c_tok = model.tokenize(context, true, true);
    let r_tok = model.tokenize(rest, false, true);
    let (nc, nr) = (c_tok.len() as i32, r_tok.len() as i32);
    // room for the answer, and for a probe or a reconstruction pass decoded after the context
    let n_ctx = ((2 * nc + nr + gen as i32 + 1024 + 255) / 256 * 256) as u32;
    let p = ContextParams {
        n_ctx,
        n_batch: a.n_batch as u32,
        n_ubatch: a.n_ubatch as u32,
        n_threads: a.threads,
        flash_attn: r.fa,
        type_k: r.type_k,
        type_v: r.type_v,
    };
    let mut ctx = Context::new(model, &p, None).ok_or("cannot create the context")?;
    let t0 = now_s();
    if !decode_span(&mut ctx, &c_tok, 0, nc, a.n_batch) {
        return Err("the context's prefill failed".into());
    }
    let s_prefill = now_s() - t0;
    let snapshot = ctx.state_seq_get(0).ok_or("cannot snapshot the context's cache")?;
    let stats = format!("{}.stats.jsonl", a.output);
    // the recorded scores of each reconstruction of this job: (its scoring flags, the file)
    let mut recorded: Vec<(Vec<String>, String)> = Vec::new();
    let mut rows = Vec::new();
    for (k, v) in variants.iter().enumerate() {
        let name = v["name"].as_str().ok_or("variant name: a string is needed")?;
        let flags: Vec<String> = match &v["flags"] {
            Value::Null => Vec::new(),
            Value::Array(f) => f.iter().map(|x| x.as_str().unwrap_or_default().to_string()).collect(),
            _ => return Err(format!("{name}: flags: an array or null is needed")),
        };
        if k > 0 {
            ctx.memory_clear(true);
            if ctx.state_seq_set(&snapshot, 0) != snapshot.len() {
                return Err("cannot restore the context's cache".into());
            }
        }
        let all = [c_tok.as_slice(), r_tok.as_slice()].concat();
        let after_question = v["after_question"].as_bool().unwrap_or(false);
        if after_question && !decode_span(&mut ctx, &all, nc, nc + nr, a.n_batch) {
            return Err(format!("{name}: decoding the question failed"));
        }
        let t1 = now_s();
        let mut st = Value::Null;
        // the scores came from an earlier variant's reconstruction: s_compress is not the scoring's cost
        let mut replayed = false;
        if !flags.is_empty() {
            let (opts, probe) = options_of(&flags)?;
            let _ = std::fs::remove_file(&stats);
            let probe_tok = probe.map(|t| model.tokenize(&t, false, true)).unwrap_or_default();
            let seen = if after_question { &all[..] } else { &c_tok[..] };
            let mut opts = opts;
            if let Some(key) = scoring_flags(&flags).filter(|_| !after_question) {
                let i = recorded.iter().position(|(k, _)| *k == key).unwrap_or_else(|| {
                    let path = format!("{}.scores-{}-{}.bin", a.output, std::process::id(), recorded.len());
                    let _ = std::fs::remove_file(&path);
                    recorded.push((key, path));
                    recorded.len() - 1
                });
                replayed = std::path::Path::new(&recorded[i].1).exists();
                opts.push_str(&format!("scores={};", recorded[i].1));
            }
            let rc = compress::compress_raw(&mut ctx, 0, seen, &probe_tok, &format!("{opts}stats={stats}"));
            if rc < 0 {
                return Err(format!("{name}: the compression failed ({rc}); see the log"));
            }
            st = std::fs::read_to_string(&stats)
                .ok()
                .and_then(|t| t.lines().last().and_then(|l| serde_json::from_str(l).ok()))
                .unwrap_or(Value::Null);
        }
        let s_compress = now_s() - t1;
        let cells = compress::n_cells(&mut ctx, 0);
        let t2 = now_s();
        if !after_question && !decode_span(&mut ctx, &all, nc, nc + nr, a.n_batch) {
            return Err(format!("{name}: decoding the question failed"));
        }
        let mut answer = Vec::new();
        let mut one = Batch::new(1);
        for pos in (nc + nr..).take(gen) {
            let y = argmax(ctx.last_logits(model.n_vocab())) as i32;
            if model.is_eog(y) {
                break;
            }
            answer.extend(model.piece(y));
            if !decode_one(&mut ctx, &mut one, y, pos) {
                return Err(format!("{name}: decoding the answer failed"));
            }
        }
        rows.push(json!({
            "id": id, "variant": name, "ok": true, "answer": String::from_utf8_lossy(&answer),
            "n_context": nc, "n_rest": nr, "cells_after_context": cells, "s_prefill": s_prefill,
            "s_compress": s_compress, "s_answer": now_s() - t2, "stats": st, "scores_replayed": replayed,
        }));
    }
    let _ = std::fs::remove_file(&stats);
    for (_, path) in &recorded {
        let _ = std::fs::remove_file(path);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::options_of;

    fn flags(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reconstructions_share_scores_across_selections_only() {
        use super::scoring_flags;
        let base = [
            "--compresskv",
            "--compresskv-method",
            "snapkv",
            "--compresskv-reconstruct",
        ];
        let at = |extra: &[&str]| scoring_flags(&flags(&[&base[..], extra].concat()));
        let half = at(&[
            "--compresskv-ratio",
            "0.5",
            "--compresskv-per-head",
            "--compresskv-pool",
            "1",
        ]);
        assert_eq!(
            half,
            at(&["--compresskv-ratio", "0.75", "--compresskv-preset", "paper"])
        );
        assert_eq!(half.as_deref(), Some(&flags(&base)[..]));
        // another scorer (method, probe text) records its own
        assert_ne!(half, at(&["--compresskv-probe", "Repeat:"]));
        assert_ne!(
            half,
            scoring_flags(&flags(&["--compresskv", "--compresskv-reconstruct"]))
        );
        // no reconstruction: nothing recorded
        assert_eq!(
            scoring_flags(&flags(&["--compresskv", "--compresskv-ratio", "0.5"])),
            None
        );
    }

    #[test]
    fn flags_become_the_options_string_through_the_librarys_table() {
        let (o, p) = options_of(&flags(&[
            "--compresskv",
            "--compresskv-method",
            "gate",
            "--compresskv-ratio",
            "0.5",
        ]))
        .unwrap();
        assert_eq!((o.as_str(), p), ("method=gate;ratio=0.5;", None));
        let (o, p) = options_of(&flags(&[
            "--compresskv",
            "--compresskv-per-head",
            "--compresskv-probe",
            "a;b\n",
        ]))
        .unwrap();
        assert_eq!((o.as_str(), p.as_deref()), ("per_head=1;", Some("a;b\n")));
        // reconstruction without a probe text: the library's instruction to repeat the context
        let (o, p) = options_of(&flags(&["--compresskv", "--compresskv-reconstruct"])).unwrap();
        assert_eq!(o, "reconstruct=1;");
        assert_eq!(p.as_deref(), Some(compresskv::options::RECONSTRUCT_PROMPT));
        assert!(options_of(&flags(&["--compresskv-magic"]))
            .unwrap_err()
            .contains("unknown flag"));
        assert!(options_of(&flags(&["--compresskv-budget"]))
            .unwrap_err()
            .contains("needs a value"));
    }
}
