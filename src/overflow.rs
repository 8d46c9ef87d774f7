//! Bounded-memory prefill: a prompt longer than the context is decoded in chunks, and the cache is
//! compressed whenever the next chunk would overflow it. This module decides, before anything is decoded,
//! the chunk size, what each pass that makes room keeps and which tokens score those passes.
//!
//! ```text
//! plan(opts, eog[n_prompt], n_cells, n_batch, n_probe_text):
//!     refuse unless the budget is cells, the form fill and one token set per layer
//!     probe = match opts.overflow:                   # StreamingLLM scores nothing: no probe
//!         probe    -> the caller's probe text        (refused without one)
//!         question -> prompt[qe - window, qe), qe = question_end(eog)
//!                     (none found: the latest tokens, noted)
//!         recent   -> none: the latest tokens
//!     room = n_cells - |probe|                       # what the last pass kept + the next chunk
//!     refuse if room - budget < 2 window
//!     n_batch = min(n_batch, room - max(budget, room / 2));  n_keep = room - n_batch
//! ```
//!
//! Invariants: a plan has `n_keep + n_batch + |probe| <= n_cells`, `n_keep >= budget` and
//! `n_batch >= 2 window`; a refusal names the flag to change.

use crate::error::{Error, Result};
use crate::options::{question_end, Budget, Form, Options};

/// Which tokens score the passes that make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The latest tokens (the cache's own window).
    Latest,
    /// The caller's probe text, decoded after the cache and removed again.
    Text,
    /// The prompt's tokens `[start, end)`: its question, decoded ahead of its place and removed again.
    Prompt(usize, usize),
}

/// How a prompt longer than the context is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    /// Prompt tokens per chunk.
    pub n_batch: usize,
    /// Cells a pass that makes room keeps.
    pub n_keep: usize,
    /// What scores those passes.
    pub probe: Probe,
    /// The overflow window was `question` but the prompt has no end-of-turn token near its end.
    pub no_question: bool,
}

/// The plan for a prompt whose end-of-turn flags are `eog` (one per token) in a context of `n_cells`
/// cells, chunks of at most `n_batch` tokens, and a probe text of `n_probe_text` tokens (0: none).
pub fn plan(opts: &Options, eog: &[u8], n_cells: usize, n_batch: usize, n_probe_text: usize) -> Result<Overflow> {
    let n_prompt = eog.len();
    let budget = match opts.budget {
        Budget::Cells(c) if c > 0 && opts.form == Form::Fill && !opts.per_head => c as usize,
        _ => {
            return Err(Error::InvalidArg(format!(
                "prompt is too long ({n_prompt} tokens, max {n_cells}): a prompt longer than the context needs \
                 --compresskv-budget, the fill form and one token set per layer"
            )))
        }
    };
    let scores = opts.method.needs_queries();
    let window = opts.window as usize;
    let mut no_question = false;
    let probe = match opts.overflow {
        "probe" if n_probe_text == 0 => {
            return Err(Error::InvalidArg(
                "--compresskv-overflow-window probe needs --compresskv-probe TEXT".into(),
            ))
        }
        "probe" if scores => Probe::Text,
        "question" => match question_end(eog, 0) {
            Some(qe) if scores => Probe::Prompt(qe.saturating_sub(window), qe),
            Some(_) => Probe::Latest,
            None => {
                no_question = true;
                Probe::Latest
            }
        },
        _ => Probe::Latest,
    };
    let n_probe = match probe {
        Probe::Latest => 0,
        Probe::Text => n_probe_text,
        Probe::Prompt(s, e) => e - s,
    };
    let room = n_cells.saturating_sub(n_probe);
    if room < budget + 2 * window {
        return Err(Error::InvalidArg(format!(
            "prompt is too long ({n_prompt} tokens) and --compresskv-budget {budget} leaves no room in the \
             context of {n_cells} cells: use a larger -c or a smaller budget"
        )));
    }
    let n_batch = n_batch.min(room - budget.max(room / 2));
    Ok(Overflow {
        n_batch,
        n_keep: room - n_batch,
        probe,
        no_question,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(text: &str) -> Options {
        Options::parse(text).unwrap()
    }

    /// A prompt of n tokens whose turn ends at `qe` (if any).
    fn eog(n: usize, qe: Option<usize>) -> Vec<u8> {
        let mut e = vec![0u8; n];
        if let Some(q) = qe {
            e[q] = 1;
        }
        e
    }

    #[test]
    fn the_question_scores_and_every_chunk_fits() {
        let o = opts("budget=512");
        let p = plan(&o, &eog(26000, Some(25990)), 4092, 2048, 0).unwrap();
        let w = o.window as usize;
        assert_eq!(p.probe, Probe::Prompt(25990 - w, 25990));
        assert!(!p.no_question);
        assert!(p.n_keep + p.n_batch + w <= 4092);
        assert!(p.n_keep >= 512 && p.n_batch >= 2 * w);
        // half the room each: the keep is the larger of the budget and half
        assert_eq!(p.n_keep, (4092 - w) - (4092 - w - (4092 - w) / 2));
        // a small batch stays as given
        assert_eq!(plan(&o, &eog(26000, Some(25990)), 4092, 64, 0).unwrap().n_batch, 64);
    }

    #[test]
    fn recent_probe_and_streamingllm_windows() {
        let e = eog(9000, Some(8990));
        assert_eq!(
            plan(&opts("budget=512;overflow=recent"), &e, 2044, 2048, 0)
                .unwrap()
                .probe,
            Probe::Latest
        );
        let p = plan(&opts("budget=512;overflow=probe"), &e, 2044, 2048, 12).unwrap();
        assert_eq!(p.probe, Probe::Text);
        assert!(p.n_keep + p.n_batch + 12 <= 2044);
        let s = plan(
            &opts("budget=512;method=streamingllm;overflow=probe"),
            &e,
            2044,
            2048,
            12,
        )
        .unwrap();
        assert_eq!(s.probe, Probe::Latest);
        assert_eq!(
            plan(&opts("budget=512;method=streamingllm"), &e, 2044, 2048, 0)
                .unwrap()
                .probe,
            Probe::Latest
        );
        // no end-of-turn token near the end: the latest tokens, noted
        let n = plan(&opts("budget=512"), &eog(9000, Some(100)), 2044, 2048, 0).unwrap();
        assert_eq!((n.probe, n.no_question), (Probe::Latest, true));
    }

    #[test]
    fn refusals_name_the_flag() {
        let e = eog(9000, None);
        let err = |o: &str, cells: usize, text: usize| plan(&opts(o), &e, cells, 2048, text).unwrap_err().to_string();
        assert!(err("ratio=0.5", 2044, 0).contains("--compresskv-budget"));
        assert!(err("budget=512;form=exact", 2044, 0).contains("fill form"));
        assert!(err("budget=512;per_head=1", 2044, 0).contains("one token set per layer"));
        assert!(err("budget=512;overflow=probe", 2044, 0).contains("needs --compresskv-probe"));
        assert!(err("budget=2040", 2044, 0).contains("leaves no room"));
    }
}
