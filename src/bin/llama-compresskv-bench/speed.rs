//! The speed grid: per depth one context; per budget a row (prefill or restore, compress, timed decode).
//! A failed depth is reported and the other depths still run.

use std::collections::HashSet;

use crate::common::compress::{self, Options};
use crate::common::{now_s, peak_rss_kib, Batch, Model, Token};
use crate::{decode_one, decode_span, make_context, save, Args, Doc, Row, Run, SpeedRow};

/// Run every (depth, budget) row not in `done`, appending them to `doc` (saved after each): 0 if all
/// succeeded, else 1.
#[allow(clippy::too_many_arguments)]
pub fn grid(
    model: &Model,
    a: &Args,
    r: &Run,
    tokens: &[Token],
    cell_bytes: usize,
    done: &HashSet<(i32, i32)>,
    doc: &mut Doc,
    one: &mut Batch,
) -> i32 {
    let mut rc = 0;
    for &depth in &a.depths.0 {
        let todo = a
            .budgets
            .0
            .iter()
            .any(|&b| (b == 0 || b < depth) && !done.contains(&(depth, b)));
        if !todo {
            continue;
        }
        let Some(mut ctx) = make_context(model, a, r, depth, false) else {
            rc = 1;
            continue;
        };
        let n_ctx = ctx.n_ctx();
        let mut snap: Option<Vec<u8>> = None; // the prefilled cache of this depth (reuse)
        let mut snap_prefill_s = 0.0;
        for &budget in &a.budgets.0 {
            if (budget > 0 && budget >= depth) || done.contains(&(depth, budget)) {
                continue;
            }
            ctx.memory_clear(true);
            let mut row = SpeedRow {
                depth,
                budget: (budget > 0).then_some(budget),
                method: if budget > 0 { a.method.clone() } else { "full".into() },
                n_ctx,
                ..Default::default()
            };
            let mut prefill_s = snap_prefill_s;
            if let Some(s) = &snap {
                // the same prompt's cache again, from host memory: the prefill is timed once per depth
                let t0 = now_s();
                if ctx.state_seq_set(s, 0) == 0 {
                    eprintln!("error: restoring the prefilled cache of depth {depth} failed");
                    rc = 1;
                    break;
                }
                ctx.synchronize();
                row.restore_s = Some(now_s() - t0);
                row.prefill_shared = Some(true);
            } else {
                let t0 = now_s();
                if !decode_span(&mut ctx, tokens, 0, depth, a.n_batch) {
                    eprintln!("error: prefill of {depth} tokens failed");
                    rc = 1;
                    break;
                }
                prefill_s = now_s() - t0;
                if !a.no_reuse_prefill && depth > 0 {
                    snap = ctx.state_seq_get(0);
                    snap_prefill_s = prefill_s;
                }
            }
            row.prefill_s = Some(prefill_s);
            row.prefill_tps = Some(if depth > 0 { depth as f64 / prefill_s } else { 0.0 });
            if budget > 0 {
                let o = Options {
                    budget,
                    ..r.opts.clone()
                };
                let t1 = now_s();
                let ret = compress::compress(&mut ctx, 0, &tokens[..depth as usize], &o);
                ctx.synchronize();
                let compress_s = now_s() - t1;
                row.compress_s = Some(compress_s);
                row.compress_ret = Some(ret);
                if ret < 0 {
                    eprintln!("error: llama_kv_compress returned {ret} at depth {depth}, budget {budget}");
                    row.ok = false;
                    doc.rows.push(Row::Speed(row));
                    save(doc, &a.output);
                    rc = 1;
                    continue;
                }
                row.ttft_share = Some(compress_s / (prefill_s + compress_s));
            }
            let cells = compress::n_cells(&mut ctx, 0);
            row.cells = Some(cells);
            row.kv_bytes_used = Some(cells as f64 * cell_bytes as f64);
            row.kv_bytes_alloc = Some(n_ctx as f64 * cell_bytes as f64);

            // decode: one warm-up token, then reps x n_gen tokens at positions depth..
            let mut tps = Vec::new();
            let mut ok = decode_one(&mut ctx, one, tokens[depth as usize], depth);
            ctx.seq_rm(0, depth, -1);
            let mut rep = 0;
            while rep < a.reps && ok {
                let t2 = now_s();
                let mut i = 0;
                while i < a.n_gen && ok {
                    ok = decode_one(&mut ctx, one, tokens[(depth + i) as usize], depth + i);
                    i += 1;
                }
                tps.push(a.n_gen as f64 / (now_s() - t2));
                ok = ok && ctx.seq_rm(0, depth, -1);
                rep += 1;
            }
            if !ok {
                eprintln!("error: decoding after depth {depth} failed");
                rc = 1;
                break;
            }
            let mean = tps.iter().fold(0.0, |m, x| m + x / tps.len() as f64);
            let compress_msg = match row.compress_s {
                Some(s) if budget > 0 => format!("compress {s:.6} s"),
                _ => String::new(),
            };
            let budget_col = if budget > 0 { budget.to_string() } else { "-".into() };
            eprintln!(
                "depth {depth:>7}  {:<12} {budget_col:>5}  prefill {:>8.1} tok/s  {compress_msg} cells {cells:>7}  \
                 decode {mean:>7.2} tok/s",
                row.method,
                row.prefill_tps.unwrap_or(0.0)
            );
            row.decode_tps = Some(tps);
            row.decode_tps_mean = Some(mean);
            row.peak_rss_kib = Some(peak_rss_kib());
            row.ok = true;
            doc.rows.push(Row::Speed(row));
            save(doc, &a.output);
        }
        // the context is freed here; a failed depth is reported, the others still run
    }
    rc
}
