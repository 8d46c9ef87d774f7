//! One compression of a llama.cpp sequence, as policy: what llama.cpp must decode again, which budget and
//! window the planner gets, where the kept cells go, and the stats line. llama.cpp keeps only the mechanism
//! (query capture, moving cells, rewriting cell metadata) and asks this module at each step.
//!
//! ```text
//! new(options, sequence):                    # before anything is decoded or moved
//!     refuse combinations the cache cannot hold (recompression needs the fill form, one set per layer; a
//!         probe needs a scoring method and the fill form; iSWA needs the fill form)
//!     budget = options.budget.cells(n)       # the one rounding rule
//!     if n <= max(budget, trigger): skip     # nothing to compress (yet: a conversation below its trigger)
//!     window end we: the probe (after the sequence) | an explicit position | the question (last
//!         end-of-turn token in the last 65 tokens) | the end
//!     decode again: the window and what follows it (or the probe), which must fit one ubatch
//! plan(cells after the decode):              # with a probe, the last cell stays out (kept in place)
//!     budget fit: the per-layer allocation whose largest layer holds `budget` cells (not with budget_avg)
//! slots(plan):                               # cell metadata: slot j gets the largest position any layer
//!     keeps at j; the kept cells go to the lowest cells of the sequence
//! ```
//!
//! Invariants: a refused request has changed nothing (it is decided before llama.cpp touches the cache);
//! positions are those of llama.cpp (`i32`), indices are into the sequence's cells in position order.

use crate::error::{Error, Result};
use crate::options::{question_end, Anchor, Form, Options, QUESTION_MAX_SUFFIX};
use crate::plan::{Method, Params, Plan};

/// The sequence as llama.cpp holds it.
#[derive(Debug, Clone)]
pub struct Sequence<'a> {
    /// Positions of its cells in position order (ascending).
    pub pos: &'a [i32],
    /// It was compressed before (its kept cells hold different tokens per layer).
    pub compressed: bool,
    /// End-of-turn flags of the sequence's last tokens (the caller's `tokens`), if known.
    pub eog: Option<&'a [u8]>,
    /// How many of the sequence's last tokens the caller passed.
    pub n_tokens: usize,
    /// Tokens of a probe decoded after the sequence (0: none).
    pub n_probe: usize,
    /// The most tokens one decode takes.
    pub n_ubatch: usize,
    /// The cache is the full-attention cache of an iSWA model.
    pub iswa: bool,
}

/// What llama.cpp does next, decided by [`Request::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The options.
    pub opts: Options,
    /// Nothing to compress (the budget covers the sequence).
    pub skip: bool,
    /// Cells of the sequence.
    pub n: usize,
    /// Where generation continues.
    pub p_next: i32,
    /// Cells the sequence keeps.
    pub budget: usize,
    /// Window `[ws, we)` as indices (a probe: `[n, n)`).
    pub ws: usize,
    /// End of the window.
    pub we: usize,
    /// Tokens to decode again with query capture (0: none), from index `ws` at position `decode_pos`.
    pub n_decode: usize,
    /// Position of the first token decoded again.
    pub decode_pos: i32,
    /// Probe tokens.
    pub n_probe: usize,
    /// With a probe the sequence's last cell stays out of the plan, where it is.
    pub keep_last: bool,
    /// "probe", "end", "question" or "explicit".
    pub anchor: &'static str,
    /// The sequence was compressed before.
    pub again: bool,
    /// A line for the log.
    pub note: Option<String>,
    /// Reconstruction scoring: the sequence's tokens decoded after the probe this many at a time (0: none).
    pub recon_chunk: usize,
    /// The scores come from the file of option `scores`, recorded by an earlier compression.
    pub replay: bool,
}

/// Reconstruction scoring holds `n_head x (n + chunk) x chunk` attention probabilities per pass: the chunk
/// shrinks as the sequence grows so that a pass holds at most this many per head (and at least 32 tokens).
pub const RECON_PROBS_PER_HEAD: usize = 1 << 20;

fn refuse(msg: impl Into<String>) -> Error {
    Error::InvalidArg(msg.into())
}

impl Request {
    /// Decide the request (see the module doc).
    pub fn new(opts: Options, seq: &Sequence<'_>) -> Result<Request> {
        // the gate scores without queries: a probe the caller offers is not decoded
        let unused_probe = seq.n_probe > 0 && opts.method == Method::Gate;
        let seq = &Sequence {
            n_probe: if unused_probe { 0 } else { seq.n_probe },
            ..*seq
        };
        let n = seq.pos.len();
        if n == 0 {
            return Err(refuse("the sequence holds no tokens"));
        }
        let fill = opts.form == Form::Fill;
        let no_queries = !opts.method.needs_queries();
        let probe = seq.n_probe > 0;
        if seq.compressed && (!fill || opts.per_head) {
            return Err(refuse(
                "the sequence is already compressed; compressing it again needs the fill form with one token set per layer",
            ));
        }
        if probe && (!fill || no_queries) {
            return Err(refuse("a probe window needs a scoring method and the fill form"));
        }
        if seq.iswa && !fill {
            return Err(refuse(
                "the exact and mask forms need a per-layer mask that iSWA attention does not apply (use the fill form)",
            ));
        }
        let p_next = seq.pos[n - 1] + 1;
        let budget = opts.budget.cells(n);
        let trigger = (opts.trigger as usize).max(budget);
        let mut r = Request {
            skip: n <= trigger,
            n,
            p_next,
            budget,
            ws: n,
            we: n,
            n_decode: 0,
            decode_pos: p_next,
            n_probe: seq.n_probe,
            keep_last: probe && n >= 2 && budget >= 2,
            anchor: if probe { "probe" } else { "end" },
            again: seq.compressed,
            note: None,
            recon_chunk: 0,
            replay: false,
            opts,
        };
        if r.skip {
            r.note = Some(if trigger > budget {
                format!("{n} cells, at most the trigger {trigger}: nothing to compress yet")
            } else {
                format!("budget {budget} >= {n} prompt tokens, nothing to compress")
            });
            return Ok(r);
        }
        if probe {
            r.n_decode = if no_queries { 0 } else { seq.n_probe };
        } else {
            r.place_window(seq)?;
        }
        if r.opts.reconstruct {
            r.recon_chunk = r.reconstruct_chunk(seq)?;
        }
        if let Some(path) = r.opts.scores.clone() {
            if no_queries {
                return Err(refuse(format!(
                    "recorded scores ({path}) are a scoring method's; method {} scores without queries",
                    r.opts.method.name()
                )));
            }
            if std::path::Path::new(&path).exists() {
                // the recorded scores stand for the reconstruction: only the probe is decoded, as the window
                r.recon_chunk = 0;
                r.replay = true;
                let m = format!("scores replayed from {path}");
                r.note = Some(r.note.take().map_or(m.clone(), |n| format!("{n}; {m}")));
            }
        }
        if unused_probe {
            let m = "method gate scores each cell from its key alone: the probe is not used";
            r.note = Some(r.note.take().map_or(m.into(), |n| format!("{n}; {m}")));
        }
        if r.n_decode > seq.n_ubatch {
            return Err(refuse(format!(
                "window and suffix ({} tokens) must fit one ubatch ({})",
                r.n_decode, seq.n_ubatch
            )));
        }
        Ok(r)
    }

    /// Tokens of the sequence decoded per reconstruction pass: what one ubatch holds after the probe, at most
    /// the largest chunk with `(n + chunk) * chunk <= RECON_PROBS_PER_HEAD` (at least 32). Refused without a probe (the instruction to repeat
    /// the context), with a method that does not score, or without the tokens of every cell.
    fn reconstruct_chunk(&self, seq: &Sequence<'_>) -> Result<usize> {
        if seq.n_probe == 0 || !self.opts.method.needs_queries() {
            return Err(refuse(
                "reconstruction needs a scoring method and a probe (the instruction to repeat the context)",
            ));
        }
        let first = self.p_next as i64 - seq.n_tokens as i64;
        if (seq.pos[0] as i64) < first {
            return Err(refuse(format!(
                "reconstruction needs the tokens of every cell: got the last {} of {} positions",
                seq.n_tokens, self.p_next
            )));
        }
        let room = seq.n_ubatch.saturating_sub(seq.n_probe);
        if room == 0 {
            return Err(refuse(format!(
                "the probe ({} tokens) leaves no room for the context in one ubatch ({})",
                seq.n_probe, seq.n_ubatch
            )));
        }
        // the largest c with (n + c) * c <= RECON_PROBS_PER_HEAD
        let n = self.n as f64;
        let c = ((n * n + 4.0 * RECON_PROBS_PER_HEAD as f64).sqrt() - n) / 2.0;
        Ok((c.floor() as usize).clamp(32, 1 << 30).min(room))
    }

    /// The window of a sequence scored by its own tokens, and the tokens decoded again.
    fn place_window(&mut self, seq: &Sequence<'_>) -> Result<()> {
        let (n, pos) = (self.n, seq.pos);
        let index_of = |p: i32| pos.binary_search(&p).ok();
        let end_pos = match self.opts.anchor {
            Anchor::Position(p) => Some(p as i32),
            Anchor::Question => self.question_end(seq),
            Anchor::End => None,
        };
        let we = match end_pos {
            Some(p) if p != self.p_next => index_of(p),
            _ => Some(n),
        };
        let w = self.opts.window as usize;
        // the window and what follows it must be consecutive positions (not yet compressed)
        let fits = we.filter(|&we| we >= w && pos[n - 1] - pos[we - w] == (n - 1 - (we - w)) as i32);
        let Some(we) = fits else {
            return Err(refuse(format!(
                "window of {w} tokens ending at position {} does not fit the {} positions of the sequence (or reaches into its compressed part)",
                end_pos.unwrap_or(self.p_next),
                self.p_next
            )));
        };
        self.we = we;
        self.ws = we - w;
        self.decode_pos = pos[self.ws];
        if self.opts.method.needs_queries() {
            self.n_decode = n - self.ws;
            if seq.n_tokens < self.n_decode {
                return Err(refuse(format!(
                    "need the last {} prompt tokens, got {}",
                    self.n_decode, seq.n_tokens
                )));
            }
        }
        if we < n {
            let eog_at = seq.eog.and_then(|e| e.get(seq.n_tokens.checked_sub(n - we)?)).copied();
            self.anchor = if eog_at == Some(1) { "question" } else { "explicit" };
        }
        Ok(())
    }

    /// The position of the last end-of-turn token among the last [`QUESTION_MAX_SUFFIX`] + 1 tokens (not
    /// the first token of the sequence), with a note for the log either way.
    fn question_end(&mut self, seq: &Sequence<'_>) -> Option<i32> {
        let eog = seq.eog.unwrap_or(&[]);
        let m = eog.len().min(seq.n_tokens);
        let first = self.p_next - m as i32; // position of eog[0]
        let Some(i) = question_end(&eog[..m], i64::from(first)) else {
            self.note = Some(format!(
                "no end-of-turn token in the prompt's last {QUESTION_MAX_SUFFIX} tokens (no generation prompt); the window ends at the prompt's end"
            ));
            return None;
        };
        let we = first + i as i32;
        self.note = Some(format!(
            "window anchored at the question: tokens [{}, {we}), {} template tokens after it kept",
            (we - self.opts.window as i32).max(0),
            self.p_next - we
        ));
        Some(we)
    }

    /// The planner's parameters for `n_plan` cells, the per-layer allocation fit by `fit(avg slots)` unless
    /// the budget is the paper's average (`budget_avg`) or StreamingLLM's.
    pub fn params(&self, n_plan: usize, fit: impl FnOnce(&Params, usize) -> Result<usize>) -> Result<Params> {
        let mut p = self.opts.params(self.n);
        let plan_budget = self.budget + self.n_probe - usize::from(self.keep_last);
        if self.n_probe > 0 {
            p.window = self.n_probe;
            p.window_end = Some(n_plan);
        } else {
            p.window_end = Some(self.we).filter(|&we| we < n_plan);
        }
        p.ratio = 0.0;
        p.budget = plan_budget;
        if !self.opts.budget_avg && p.method != Method::StreamingLlm {
            p.budget = fit(&p, plan_budget)?;
        }
        Ok(p)
    }

    /// The cells (and their positions) the planner sees: the sequence after the decode, less the last cell
    /// when it stays in place.
    pub fn plan_cells(&self, cells: &[i32], pos: &[i32]) -> Result<(Vec<i32>, Vec<i32>)> {
        let want = self.n + self.n_probe;
        if cells.len() != want || pos.len() != want {
            return Err(refuse(format!(
                "the sequence holds {} cells after the window was decoded again, expected {want}",
                cells.len()
            )));
        }
        let (mut c, mut p) = (cells.to_vec(), pos.to_vec());
        if self.keep_last {
            c.remove(self.n - 1);
            p.remove(self.n - 1);
        }
        Ok((c, p))
    }

    /// Cell metadata after compaction: for each slot its cell and position (`cells`/`pos` as given to the
    /// planner), and the first position from which the sequence is uncompressed.
    pub fn slots(&self, plan: &Plan, cells: &[i32], pos: &[i32]) -> Slots {
        let n_slots = plan.n_slots;
        let mut slot_pos = vec![0i32; n_slots];
        let mut n_kept_min = usize::MAX;
        for l in &plan.layers {
            n_kept_min = n_kept_min.min(l.groups.first().map_or(0, |g| g.kept.len()));
            for g in &l.groups {
                for (j, &k) in g.kept.iter().enumerate() {
                    slot_pos[j] = slot_pos[j].max(pos[k as usize]);
                }
            }
        }
        let mut dst: Vec<i32> = cells.to_vec();
        dst.sort_unstable();
        dst.truncate(n_slots);
        let need_mask = self.opts.form == Form::Mask || n_kept_min < n_slots;
        let probe = self.n_probe > 0;
        // fill form: every layer keeps the window and what follows it in its last slots at their true
        // positions, so from decode_pos on the sequence is as good as uncompressed; the exact and mask forms
        // hide slots per layer, and the probe leaves again: there it ends at p_next (or at the kept last token)
        let mark = if need_mask || (probe && !self.keep_last) {
            self.p_next
        } else if probe {
            self.p_next - 1
        } else {
            self.decode_pos
        };
        Slots {
            dst,
            pos: slot_pos,
            mark,
            need_mask,
        }
    }

    /// The per-layer mask of the exact and mask forms for layer `il`, 1 = hidden: one flag per slot of
    /// [`Request::slots`] (exact form: the slots past the layer's kept cells), or per planned cell in place
    /// (mask form: the cells the layer did not keep). All zero in the fill form, where layers keep every slot.
    pub fn hidden(&self, plan: &Plan, il: usize, n_cells: usize) -> Vec<u8> {
        let kept = plan.layers[il].groups.first().map_or(&[][..], |g| &g.kept[..]);
        if self.opts.form == Form::Mask {
            let mut h = vec![1u8; n_cells];
            kept.iter().for_each(|&k| h[k as usize] = 0);
            h
        } else {
            (0..plan.n_slots).map(|j| u8::from(j >= kept.len())).collect()
        }
    }
}

/// Where the kept cells go ([`Request::slots`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    /// The cell of each slot (the sequence's lowest cells).
    pub dst: Vec<i32>,
    /// The position of each slot.
    pub pos: Vec<i32>,
    /// First position from which the sequence holds every position.
    pub mark: i32,
    /// Some layer keeps fewer slots than the cells (exact form) or nothing moves (mask form): per-layer masks.
    pub need_mask: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq<'a>(pos: &'a [i32], eog: Option<&'a [u8]>) -> Sequence<'a> {
        Sequence {
            pos,
            compressed: false,
            eog,
            n_tokens: eog.map_or(pos.len(), |e| e.len()),
            n_probe: 0,
            n_ubatch: 512,
            iswa: false,
        }
    }

    #[test]
    fn budget_covering_the_sequence_skips() {
        let pos: Vec<i32> = (0..100).collect();
        let r = Request::new(Options::parse("budget=100").unwrap(), &seq(&pos, None)).unwrap();
        assert!(r.skip);
        let r = Request::new(Options::parse("ratio=1").unwrap(), &seq(&pos, None)).unwrap();
        assert!(r.skip);
        let r = Request::new(Options::parse("budget=99").unwrap(), &seq(&pos, None)).unwrap();
        assert!(!r.skip);
        // a trigger above the budget: compressed only past it, then down to the budget
        let r = Request::new(Options::parse("budget=50;trigger=100").unwrap(), &seq(&pos, None)).unwrap();
        assert!(r.skip && r.note.as_deref().unwrap().contains("trigger 100"));
        let r = Request::new(Options::parse("budget=50;trigger=99").unwrap(), &seq(&pos, None)).unwrap();
        assert!(!r.skip && r.budget == 50);
        // a trigger below the budget is the budget
        let r = Request::new(Options::parse("budget=100;trigger=10").unwrap(), &seq(&pos, None)).unwrap();
        assert!(r.skip);
    }

    #[test]
    fn question_anchor_finds_the_last_end_of_turn_token() {
        let pos: Vec<i32> = (0..200).collect();
        let mut eog = vec![0u8; 200];
        eog[190] = 1;
        eog[100] = 1; // an earlier turn
        let r = Request::new(Options::parse("budget=50;window=8").unwrap(), &seq(&pos, Some(&eog))).unwrap();
        assert_eq!(
            (r.ws, r.we, r.n_decode, r.decode_pos, r.anchor),
            (182, 190, 18, 182, "question")
        );
        // too far from the end: the window ends at the end
        let mut eog = vec![0u8; 200];
        eog[100] = 1;
        let r = Request::new(Options::parse("budget=50").unwrap(), &seq(&pos, Some(&eog))).unwrap();
        assert_eq!((r.ws, r.we, r.anchor), (192, 200, "end"));
        assert!(r.note.unwrap().contains("no end-of-turn"));
    }

    #[test]
    fn explicit_window_and_refusals() {
        let pos: Vec<i32> = (0..100).collect();
        let r = Request::new(Options::parse("budget=10;window_end=50").unwrap(), &seq(&pos, None)).unwrap();
        assert_eq!((r.ws, r.we, r.anchor), (42, 50, "explicit"));
        let e = Request::new(Options::parse("budget=10;window=1000").unwrap(), &seq(&pos, None)).unwrap_err();
        assert!(e.to_string().contains("window"), "{e}");
        let mut s = seq(&pos, None);
        s.compressed = true;
        assert!(Request::new(Options::parse("budget=10;form=exact").unwrap(), &s).is_err());
        s.compressed = false;
        s.n_ubatch = 4;
        assert!(Request::new(Options::parse("budget=10").unwrap(), &s).is_err());
        // a window reaching into the compressed part (positions not consecutive)
        let gap: Vec<i32> = (0..50).chain(80..100).collect();
        let e = Request::new(Options::parse("budget=10;window=30").unwrap(), &seq(&gap, None)).unwrap_err();
        assert!(e.to_string().contains("compressed part"), "{e}");
    }

    #[test]
    fn probe_keeps_the_last_cell_out_and_fits_the_budget() {
        let pos: Vec<i32> = (0..100).collect();
        let mut s = seq(&pos, None);
        s.n_probe = 6;
        let r = Request::new(Options::parse("budget=20").unwrap(), &s).unwrap();
        assert_eq!(
            (r.n_decode, r.decode_pos, r.keep_last, r.anchor),
            (6, 100, true, "probe")
        );
        let cells: Vec<i32> = (0..106).collect();
        let cpos: Vec<i32> = (0..106).collect();
        let (c, p) = r.plan_cells(&cells, &cpos).unwrap();
        assert_eq!(c.len(), 105);
        assert!(!p.contains(&99));
        let prm = r.params(c.len(), |_, b| Ok(b)).unwrap();
        assert_eq!((prm.budget, prm.window, prm.window_end), (25, 6, Some(105)));
        assert!(r.plan_cells(&cells[..100], &cpos[..100]).is_err());
        s.n_probe = 6;
        assert!(Request::new(Options::parse("method=streamingllm").unwrap(), &s).is_err());
    }

    #[test]
    fn reconstruction_chunks_fit_one_ubatch_and_bound_the_scores() {
        let pos: Vec<i32> = (0..4000).collect();
        let mut s = seq(&pos, None);
        s.n_probe = 12;
        let opts = |t: &str| Options::parse(&format!("budget=100;reconstruct=1;{t}")).unwrap();
        // one ubatch holds the probe and the chunk; (n + chunk) * chunk stays within RECON_PROBS_PER_HEAD
        let r = Request::new(opts(""), &s).unwrap();
        assert_eq!((r.recon_chunk, r.n_decode, r.anchor), (246, 12, "probe"));
        assert!((4000 + r.recon_chunk) * r.recon_chunk <= RECON_PROBS_PER_HEAD);
        let short: Vec<i32> = (0..300).collect();
        let mut s2 = seq(&short, None);
        s2.n_probe = 12;
        assert_eq!(Request::new(opts(""), &s2).unwrap().recon_chunk, 500);
        // a huge sequence still gets 32 tokens a pass
        let long: Vec<i32> = (0..1_000_000).collect();
        let mut s3 = seq(&long, None);
        s3.n_probe = 12;
        assert_eq!(Request::new(opts(""), &s3).unwrap().recon_chunk, 32);
        assert_eq!(
            Request::new(Options::parse("budget=100").unwrap(), &s)
                .unwrap()
                .recon_chunk,
            0
        );
        // refusals: no probe, a method that does not score, missing tokens, no room after the probe
        for (t, n_probe, n_tokens, n_ubatch, why) in [
            ("", 0, 4000, 512, "probe"),
            ("method=streamingllm", 12, 4000, 512, "scoring method"),
            ("", 12, 3999, 512, "tokens of every cell"),
            ("", 512, 4000, 512, "no room"),
        ] {
            let sq = Sequence {
                n_probe,
                n_tokens,
                n_ubatch,
                ..seq(&pos, None)
            };
            let e = Request::new(opts(t), &sq).unwrap_err().to_string();
            assert!(e.contains(why), "{t} {n_probe} {n_tokens}: {e}");
        }
    }

    #[test]
    fn the_gate_decodes_nothing_and_leaves_a_probe_unused() {
        let pos: Vec<i32> = (0..100).collect();
        let r = Request::new(Options::parse("budget=20;method=gate").unwrap(), &seq(&pos, None)).unwrap();
        assert_eq!((r.n_decode, r.ws, r.we, r.anchor), (0, 92, 100, "end"));
        let mut s = seq(&pos, None);
        s.n_probe = 6;
        let r = Request::new(Options::parse("budget=20;method=gate").unwrap(), &s).unwrap();
        assert_eq!((r.n_decode, r.n_probe, r.keep_last, r.anchor), (0, 0, false, "end"));
        assert!(r.note.unwrap().contains("probe is not used"));
        // nor does it reconstruct: that scores with queries
        let e = Request::new(Options::parse("budget=20;method=gate;reconstruct=1").unwrap(), &s).unwrap_err();
        assert!(e.to_string().contains("scoring method"), "{e}");
    }

    #[test]
    fn recorded_scores_stand_for_the_reconstruction_once_written() {
        let pos: Vec<i32> = (0..4000).collect();
        let mut s = seq(&pos, None);
        s.n_probe = 12;
        let path = std::env::temp_dir().join(format!("ckv-request-scores-{}.bin", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let opts = Options::parse(&format!("budget=100;reconstruct=1;scores={}", path.display())).unwrap();
        // no file yet: reconstruct (and record)
        let r = Request::new(opts.clone(), &s).unwrap();
        assert_eq!((r.recon_chunk, r.n_decode, r.replay), (246, 12, false));
        // a file: nothing is decoded again but the probe
        std::fs::write(&path, b"x").unwrap();
        let r = Request::new(opts, &s).unwrap();
        assert_eq!((r.recon_chunk, r.n_decode, r.anchor, r.replay), (0, 12, "probe", true));
        assert!(r.note.unwrap().contains("scores replayed from"));
        std::fs::remove_file(&path).unwrap();
        // a method without queries has no scores to record or replay
        let e = Request::new(
            Options::parse("budget=20;method=gate;scores=/tmp/x").unwrap(),
            &seq(&pos, None),
        );
        assert!(e.unwrap_err().to_string().contains("without queries"));
    }
}
