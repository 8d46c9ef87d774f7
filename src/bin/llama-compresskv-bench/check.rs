//! `--check`: one (depth, budget) row of the compaction check on whatever backend holds the cache.
//!
//! Three contexts with f32 caches and flash attention off prefill the same tokens; one is compacted (the
//! fill form), one keeps the same plan as a mask (nothing moves, evicted cells hidden), one stays full.
//! Teacher-forced with the masked one's greedy tokens for --n-gen steps, the compacted logits must match the
//! masked ones to --tol (f32 summation order is all that differs), the greedy token must agree wherever the
//! masked top-2 margin exceeds twice the step's difference, and the full cache must differ from the masked
//! one 100 times more (the control: the masks matter).

use serde::Serialize;

use crate::common::compress::{self, Form, Options};
use crate::common::{argmax, Batch, Model, Token};
use crate::{decode_one, decode_span, make_context, Args, Run};

/// One row of the check's JSON, fields in the order the C++ tool wrote them.
#[derive(Serialize)]
pub struct CheckRow {
    depth: i32,
    budget: i32,
    method: String,
    /// Whether every criterion held.
    pub ok: bool,
    compress_ret: [i32; 2],
    #[serde(skip_serializing_if = "Option::is_none")]
    cells: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_logit_diff: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    control_max_logit_diff: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    near_ties: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    greedy_disagreements: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

/// Check the compaction of `tokens[..depth]` to `budget` cells (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn check_one(
    model: &Model,
    a: &Args,
    r: &Run,
    tokens: &[Token],
    depth: i32,
    budget: i32,
    n_vocab: i32,
    one: &mut Batch,
) -> CheckRow {
    let mut row = CheckRow {
        depth,
        budget,
        method: a.method.clone(),
        ok: false,
        compress_ret: [-1, -1],
        cells: None,
        steps: None,
        max_logit_diff: None,
        control_max_logit_diff: None,
        near_ties: None,
        greedy_disagreements: None,
        error: None,
    };
    let c = make_context(model, a, r, depth, true); // compacted
    let m = make_context(model, a, r, depth, true); // masked reference
    let f = make_context(model, a, r, depth, true); // full cache (control)
    let (Some(mut c), Some(mut m), Some(mut f)) = (c, m, f) else {
        row.error = Some("context, prefill or compression failed");
        return row;
    };
    let ok = [&mut c, &mut m, &mut f]
        .into_iter()
        .all(|x| decode_span(x, tokens, 0, depth, a.n_batch));
    if ok {
        let o = Options {
            budget,
            form: Form::Compact,
            ..r.opts.clone()
        };
        row.compress_ret[0] = compress::compress(&mut c, 0, &tokens[..depth as usize], &o);
        let o = Options {
            budget,
            form: Form::Masked,
            ..r.opts.clone()
        };
        row.compress_ret[1] = compress::compress(&mut m, 0, &tokens[..depth as usize], &o);
    }
    if !ok || row.compress_ret != [0, 0] {
        row.error = Some("context, prefill or compression failed");
        return row;
    }
    row.cells = Some(compress::n_cells(&mut c, 0));
    let (mut worst, mut worst_full) = (0.0f64, 0.0f64);
    let (mut near_ties, mut disagree) = (0, 0);
    let mut ok = true;
    let mut step = 0;
    while step < a.n_gen && ok {
        let (lc, lm, lf) = (c.last_logits(n_vocab), m.last_logits(n_vocab), f.last_logits(n_vocab));
        let (mut d, mut df) = (0.0f64, 0.0f64);
        for i in 0..n_vocab as usize {
            d = d.max((lc[i] - lm[i]).abs() as f64);
            df = df.max((lf[i] - lm[i]).abs() as f64);
        }
        let best = argmax(lm);
        let second = lm
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != best)
            .fold(f32::NEG_INFINITY, |s, (_, &v)| s.max(v));
        if (lm[best] - second) as f64 > 2.0 * d {
            disagree += (argmax(lc) != best) as i32;
        } else {
            near_ties += 1;
        }
        worst = worst.max(d);
        worst_full = worst_full.max(df);
        for x in [&mut c, &mut m, &mut f] {
            ok = ok && decode_one(x, one, best as Token, depth + step);
        }
        step += 1;
    }
    row.steps = Some(a.n_gen);
    row.max_logit_diff = Some(worst);
    row.control_max_logit_diff = Some(worst_full);
    row.near_ties = Some(near_ties);
    row.greedy_disagreements = Some(disagree);
    row.ok = ok && worst < a.tol as f64 && disagree == 0 && worst_full > 100.0 * worst.max(1e-5);
    if !ok {
        row.error = Some("decode failed");
    }
    row
}
