//! `--paths`: the device paths against the host paths, on whatever backend holds the cache (a GPU's), in the
//! run's cache types, flash-attention setting and `--per-head`.
//!
//! Two contexts prefill the same tokens; each compresses them to the budget (the fill form):
//!   device: the default for a cache off the host (scores from a graph on the cache's backend, cells moved by
//!           a gather graph there; forced with LLAMA_COMPRESSKV_COMPACT=graph, so a CPU dry run takes it too),
//!           with LLAMA_COMPRESSKV_SCORE=check: the library also scores a host copy of the keys and records
//!           the largest difference and whether it selects the same cells
//!   host:   LLAMA_COMPRESSKV_SCORE=host, LLAMA_COMPRESSKV_COMPACT=host: the library scores and compacts a host
//!           copy of the cache, the reference
//! Both hash their occupied cells (LLAMA_COMPRESSKV_CHECKSUM=1, the stats line's `kv_checksum`), then decode
//! --n-gen greedy tokens. Criteria, fixed before any run: the device scores within --score-tol of the
//! library's, the same cells in every layer, the same checksum (the same bytes in the same cells, which a wrong
//! gather or a wrong cell fails), and the same greedy tokens.

use serde::Serialize;
use serde_json::Value;

use crate::common::compress::{self, Form, Options};
use crate::common::{argmax, Batch, Model, Token};
use crate::{decode_one, decode_span, make_context, Args, Run};

/// One row of the paths JSON.
#[derive(Serialize)]
pub struct PathsRow {
    depth: i32,
    budget: i32,
    method: String,
    per_head: bool,
    /// Whether every criterion held.
    pub ok: bool,
    compress_ret: [i32; 2],
    /// The paths that ran (the stats' `scores` and `compact`), device then host.
    scores: [String; 2],
    compact: [String; 2],
    score_max_abs_diff: Option<f64>,
    same_cells: Option<bool>,
    kv_checksum: [String; 2],
    greedy_same: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The environment of one path (set for the one compression, cleared after it).
const ENV: [&str; 3] = [
    "LLAMA_COMPRESSKV_SCORE",
    "LLAMA_COMPRESSKV_COMPACT",
    "LLAMA_COMPRESSKV_CHECKSUM",
];

/// Compare the two paths at one (depth, budget) (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn paths_one(
    model: &Model,
    a: &Args,
    r: &Run,
    tokens: &[Token],
    depth: i32,
    budget: i32,
    n_vocab: i32,
    one: &mut Batch,
) -> PathsRow {
    let mut row = PathsRow {
        depth,
        budget,
        method: a.method.clone(),
        per_head: a.per_head,
        ok: false,
        compress_ret: [-1, -1],
        scores: Default::default(),
        compact: Default::default(),
        score_max_abs_diff: None,
        same_cells: None,
        kv_checksum: Default::default(),
        greedy_same: None,
        error: None,
    };
    let stats = std::env::temp_dir().join(format!("compresskv-paths-{}.jsonl", std::process::id()));
    let mut lines: Vec<Value> = Vec::new();
    let mut ctxs = Vec::new();
    for (i, env) in [["check", "graph", "1"], ["host", "host", "1"]].iter().enumerate() {
        let Some(mut c) = make_context(model, a, r, depth, false) else {
            row.error = Some("context failed".into());
            return row;
        };
        if !decode_span(&mut c, tokens, 0, depth, a.n_batch) {
            row.error = Some("prefill failed".into());
            return row;
        }
        let _ = std::fs::remove_file(&stats);
        let o = Options {
            budget,
            form: Form::Compact,
            per_head: a.per_head,
            stats: Some(stats.to_string_lossy().into_owned()),
            ..r.opts.clone()
        };
        // the tool is single-threaded here: nothing else reads the environment while it is set
        for (k, v) in ENV.iter().zip(env) {
            std::env::set_var(k, v);
        }
        row.compress_ret[i] = compress::compress(&mut c, 0, &tokens[..depth as usize], &o);
        for k in ENV {
            std::env::remove_var(k);
        }
        let line = std::fs::read_to_string(&stats).unwrap_or_default();
        match serde_json::from_str::<Value>(line.lines().next().unwrap_or("")) {
            Ok(v) if row.compress_ret[i] == 0 => lines.push(v),
            _ => {
                row.error = Some(format!(
                    "path {i}: compression returned {} (no stats line)",
                    row.compress_ret[i]
                ));
                return row;
            }
        }
        ctxs.push(c);
    }
    let _ = std::fs::remove_file(&stats);
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    for (i, s) in lines.iter().enumerate() {
        row.scores[i] = text(&s["scores"]);
        row.compact[i] = text(&s["compact"]);
        row.kv_checksum[i] = text(&s["kv_checksum"]);
    }
    row.score_max_abs_diff = lines[0]["score_check"]["max_abs_diff"].as_f64();
    row.same_cells = lines[0]["score_check"]["same_cells"].as_bool();

    // greedy continuation: each context follows its own argmax
    let mut same = true;
    for step in 0..a.n_gen {
        let next: Vec<Token> = ctxs
            .iter_mut()
            .map(|c| argmax(c.last_logits(n_vocab)) as Token)
            .collect();
        same &= next[0] == next[1];
        for (c, &t) in ctxs.iter_mut().zip(&next) {
            if !decode_one(c, one, t, depth + step) {
                row.error = Some("decode failed".into());
                return row;
            }
        }
    }
    row.greedy_same = Some(same);
    row.ok = row.scores == ["caller", "library"]
        && row.compact[0] == "graph"
        && row.compact[1].starts_with("host")
        && row.score_max_abs_diff.is_some_and(|d| d <= a.score_tol as f64)
        && row.same_cells == Some(true)
        && !row.kv_checksum[0].is_empty()
        && row.kv_checksum[0] == row.kv_checksum[1]
        && same;
    row
}
