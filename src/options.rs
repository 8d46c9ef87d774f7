//! Options of one compression as llama.cpp hands them over: the only place where the user-facing knobs
//! are named, parsed, validated and given their defaults.
//!
//! ```text
//! parse(text):
//!     opts = Options::default()                      # the product defaults, defined here only
//!     for each "key=value" in text split at ';' or '\n' (blank entries skipped):
//!         opts.set(key, value)?                      # later entries override earlier ones
//!     opts.validate()?                               # combinations (e.g. mask form with per-head)
//! ```
//!
//! Invariants:
//! - Every key has exactly one default ([`Options::default`]); [`Options::default_text`] exports it (the
//!   `--help` of llama.cpp's flags shows it through the C ABI), and `preset=paper` is the CompressKV paper's
//!   selection (window of the last 8 tokens, pooling 5, single tokens).
//! - The budget is one concept: either a number of cells or a ratio of the sequence, resolved by one rule
//!   ([`Budget::cells`]: `ceil(ratio * n)`, at least 1).
//! - Method names come from one table ([`Method::ALL`], [`Method::name`]).
//! - A value that fails validation leaves nothing half-set: `parse` returns an error and no options.

use crate::error::{Error, Result};
use crate::plan::{Method, Params};
use crate::score::PoolKind;

/// Where the observation window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// The sequence's last tokens (the paper).
    End,
    /// Before the chat template's generation prompt: the last end-of-turn token among the sequence's last
    /// [`QUESTION_MAX_SUFFIX`] + 1 tokens; the tokens from there on are always kept. Falls back to `End`.
    Question,
    /// An explicit position (exclusive end).
    Position(u32),
}

/// How kept cells are laid out across layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Every layer keeps the largest layer budget (its next-best tokens fill the rest).
    Fill,
    /// Per-layer budgets; the cells above a layer's budget are masked for it.
    Exact,
    /// Reference: nothing moves, evicted cells are hidden per layer in place.
    Mask,
}

/// The budget: cells kept per layer (window included), or a fraction of the sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// Cells.
    Cells(u32),
    /// Fraction of the sequence's tokens, in (0, 1].
    Ratio(f32),
}

impl Budget {
    /// The cells this budget keeps of a sequence of `n` tokens: the one rounding rule, `ceil(ratio * n)`,
    /// at least 1.
    pub fn cells(self, n: usize) -> usize {
        match self {
            Budget::Cells(c) => c as usize,
            Budget::Ratio(r) => ((r as f64 * n as f64).ceil() as usize).max(1),
        }
    }
}

/// The most template tokens a question-anchored window leaves after itself: an end-of-turn token further
/// back closes an earlier turn, not the question.
pub const QUESTION_MAX_SUFFIX: usize = 64;

/// Where a question ends in tokens whose end-of-turn flags are `eog` (`eog[0]` at position `first`): the
/// index of the last end-of-turn token among the last [`QUESTION_MAX_SUFFIX`] + 1, not at position 0.
pub fn question_end(eog: &[u8], first: i64) -> Option<usize> {
    let m = eog.len();
    let lo = m.saturating_sub(1 + QUESTION_MAX_SUFFIX);
    (lo..m).rev().find(|&i| eog[i] != 0 && first + i as i64 >= 1)
}

/// Options of one compression (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Scoring and allocation method.
    pub method: Method,
    /// Cells kept per layer or ratio.
    pub budget: Budget,
    /// The budget is the paper's average over layers, not the cells every layer may hold.
    pub budget_avg: bool,
    /// Compress only a sequence that holds more cells than this (0: the budget). A conversation appends
    /// turns to its compressed cells and is compressed again when it passes the trigger, so its memory stays
    /// below the trigger plus one turn.
    pub trigger: u32,
    /// Observation window length.
    pub window: u32,
    /// Where the window ends.
    pub anchor: Anchor,
    /// Pooling kernel (odd).
    pub pool: u32,
    /// Whole-span selection chunk (0: single tokens).
    pub chunk: u32,
    /// First tokens always kept (StreamingLLM uses 4 when 0).
    pub sink: u32,
    /// One token set per KV head.
    pub per_head: bool,
    /// How the scores of a token set's heads combine (`mean` or `max`).
    pub head_reduce: PoolKind,
    /// Layout form.
    pub form: Form,
    /// Model profile (None: looked up by the model's fingerprint).
    pub profile: Option<String>,
    /// Append one JSON line per compression to this file.
    pub stats: Option<String>,
    /// A prompt longer than the context (llama-completion): what scores the passes that make room
    /// (`recent`: the latest tokens; `question`: the prompt's question, decoded ahead; `probe`: the probe text).
    pub overflow: &'static str,
    /// Reconstruction scoring (query-agnostic): the probe is an instruction to repeat the context, and the
    /// sequence's own tokens are decoded after it chunk by chunk; every chunk's queries score the cells.
    pub reconstruct: bool,
    /// Calibration of the key gate: add each scored layer's (key, score) samples to the gate statistics in
    /// this file ([`crate::gate::Stats`]); used with reconstruction scoring by `llama-compresskv-calibrate`.
    pub gate_stats: Option<String>,
    /// Recorded scores ([`crate::recorded`]): a missing file gets this compression's raw scores, an existing
    /// one gives them instead of scoring (nothing is decoded again for a reconstruction). For benchmarks that
    /// compare budgets and selections on one scoring of the same sequence.
    pub scores: Option<String>,
}

/// The probe that asks the model to repeat its context (reconstruction scoring), when the caller gave none.
pub const RECONSTRUCT_PROMPT: &str = "\n\nRepeat the text above exactly:\n";

impl Default for Options {
    fn default() -> Self {
        let p = Params::default();
        Options {
            method: p.method,
            budget: Budget::Cells(p.budget as u32),
            budget_avg: false,
            trigger: 0,
            window: p.window as u32,
            // ours (bench/tune.py on held-out prompts): the window ends at the question, 32-token chunks
            anchor: Anchor::Question,
            pool: p.pool_kernel as u32,
            chunk: 32,
            sink: p.n_sink as u32,
            per_head: p.per_head,
            head_reduce: p.head_reduce,
            form: Form::Fill,
            profile: None,
            stats: None,
            overflow: "question",
            reconstruct: false,
            gate_stats: None,
            scores: None,
        }
    }
}

/// The keys [`Options::set`] takes, in the order `--help` lists them.
pub const KEYS: &[&str] = &[
    "method",
    "budget",
    "ratio",
    "budget_avg",
    "trigger",
    "window",
    "anchor",
    "window_end",
    "pool",
    "chunk",
    "sink",
    "per_head",
    "head_reduce",
    "form",
    "preset",
    "profile",
    "stats",
    "overflow",
    "reconstruct",
    "gate_stats",
    "scores",
];

impl Method {
    /// Every method, in `ckv_method` order (the one table of names).
    pub const ALL: [Method; 6] = [
        Method::CompressKv,
        Method::SnapKv,
        Method::PyramidKv,
        Method::StreamingLlm,
        Method::SnapKvSrh,
        Method::Gate,
    ];

    /// The method named `name` (ASCII case ignored).
    pub fn from_name(name: &str) -> Result<Method> {
        Method::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| Error::InvalidArg(format!("unknown method '{name}' (expected {})", Method::names())))
    }

    /// "compresskv, snapkv, pyramidkv, streamingllm, snapkv-srh or gate".
    pub fn names() -> String {
        let n: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
        format!("{} or {}", n[..n.len() - 1].join(", "), n[n.len() - 1])
    }
}

fn int(key: &str, v: &str, min: u32) -> Result<u32> {
    match v.trim().parse::<u32>() {
        Ok(x) if x >= min => Ok(x),
        _ => Err(Error::InvalidArg(format!(
            "{key} must be an integer >= {min}, not '{v}'"
        ))),
    }
}

fn boolean(key: &str, v: &str) -> Result<bool> {
    match v.trim() {
        "1" | "true" | "on" | "" => Ok(true),
        "0" | "false" | "off" => Ok(false),
        _ => Err(Error::InvalidArg(format!("{key} must be 0 or 1, not '{v}'"))),
    }
}

fn one_of<T: Copy>(key: &str, v: &str, table: &[(&str, T)]) -> Result<T> {
    table
        .iter()
        .find(|(n, _)| *n == v.trim())
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            Error::InvalidArg(format!("{key} must be {}, not '{v}'", names.join(", ")))
        })
}

fn table_name<T: PartialEq>(table: &[(&str, T)], v: T) -> String {
    table.iter().find(|(_, x)| *x == v).map_or("", |(n, _)| n).to_string()
}

const ANCHORS: &[(&str, Anchor)] = &[("end", Anchor::End), ("question", Anchor::Question)];
const FORMS: &[(&str, Form)] = &[("fill", Form::Fill), ("exact", Form::Exact), ("mask", Form::Mask)];
const REDUCES: &[(&str, PoolKind)] = &[("mean", PoolKind::Avg), ("max", PoolKind::Max)];
const OVERFLOWS: &[(&str, &str)] = &[("recent", "recent"), ("question", "question"), ("probe", "probe")];

impl Options {
    /// Parse `key=value` entries separated by `;` or newlines over the defaults, then validate.
    pub fn parse(text: &str) -> Result<Options> {
        let mut o = Options::default();
        for entry in text.split([';', '\n']) {
            if entry.trim().is_empty() {
                continue;
            }
            let (k, v) = entry.split_once('=').unwrap_or((entry, ""));
            o.set(k.trim(), v)?;
        }
        o.validate()?;
        Ok(o)
    }

    /// Set one option (`value` as written; flags such as `per_head` take an empty value as 1).
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "method" => self.method = Method::from_name(value.trim())?,
            "budget" => self.budget = Budget::Cells(int(key, value, 1)?),
            "ratio" => match value.trim().parse::<f32>() {
                Ok(r) if r > 0.0 && r <= 1.0 => self.budget = Budget::Ratio(r),
                _ => return Err(Error::InvalidArg(format!("ratio must be in (0, 1], not '{value}'"))),
            },
            "budget_avg" => self.budget_avg = boolean(key, value)?,
            "trigger" => self.trigger = int(key, value, 0)?,
            "window" => self.window = int(key, value, 1)?,
            "anchor" => self.anchor = one_of(key, value, ANCHORS)?,
            "window_end" => self.anchor = Anchor::Position(int(key, value, 1)?),
            "pool" => {
                let p = int(key, value, 1)?;
                if p % 2 == 0 {
                    return Err(Error::InvalidArg(format!(
                        "pool must be an odd number >= 1, not '{value}'"
                    )));
                }
                self.pool = p;
            }
            "chunk" => self.chunk = int(key, value, 0)?,
            "sink" => self.sink = int(key, value, 0)?,
            "per_head" => self.per_head = boolean(key, value)?,
            "head_reduce" => self.head_reduce = one_of(key, value, REDUCES)?,
            "form" => self.form = one_of(key, value, FORMS)?,
            "preset" => {
                let paper = one_of(key, value, &[("paper", true), ("default", false)])?;
                let d = Options::default();
                self.window = d.window;
                self.pool = d.pool;
                self.anchor = if paper { Anchor::End } else { d.anchor };
                self.chunk = if paper { 0 } else { d.chunk };
            }
            "profile" => self.profile = Some(value.to_string()).filter(|s| !s.is_empty()),
            "stats" => self.stats = Some(value.to_string()).filter(|s| !s.is_empty()),
            "overflow" => self.overflow = one_of(key, value, OVERFLOWS)?,
            "reconstruct" => self.reconstruct = boolean(key, value)?,
            "gate_stats" => self.gate_stats = Some(value.to_string()).filter(|s| !s.is_empty()),
            "scores" => self.scores = Some(value.to_string()).filter(|s| !s.is_empty()),
            _ => {
                return Err(Error::InvalidArg(format!(
                    "unknown option '{key}' (expected one of {})",
                    KEYS.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// Combinations no single key can refuse.
    pub fn validate(&self) -> Result<()> {
        if self.form == Form::Mask && self.per_head {
            return Err(Error::InvalidArg(
                "the mask form (reference) needs one token set per layer, not per_head".into(),
            ));
        }
        Ok(())
    }

    /// The value of `key` as text ("" for an unset path or ratio; flags as 0/1).
    pub fn get_text(&self, key: &str) -> Result<String> {
        Ok(match key {
            "method" => self.method.name().to_string(),
            "budget" => match self.budget {
                Budget::Cells(c) => c.to_string(),
                Budget::Ratio(_) => "0".into(),
            },
            "ratio" => match self.budget {
                Budget::Ratio(r) => r.to_string(),
                Budget::Cells(_) => String::new(),
            },
            "budget_avg" => u8::from(self.budget_avg).to_string(),
            "trigger" => self.trigger.to_string(),
            "per_head" => u8::from(self.per_head).to_string(),
            "head_reduce" => table_name(REDUCES, self.head_reduce),
            "window" => self.window.to_string(),
            "anchor" => match self.anchor {
                Anchor::Position(_) => "explicit".into(),
                a => table_name(ANCHORS, a),
            },
            "window_end" => match self.anchor {
                Anchor::Position(p) => p.to_string(),
                _ => String::new(),
            },
            "pool" => self.pool.to_string(),
            "chunk" => self.chunk.to_string(),
            "sink" => self.sink.to_string(),
            "form" => table_name(FORMS, self.form),
            "preset" => if self.window == 8 && self.pool == 5 && self.chunk == 0 && self.anchor == Anchor::End {
                "paper"
            } else {
                "default"
            }
            .into(),
            "profile" => self.profile.clone().unwrap_or_default(),
            "stats" => self.stats.clone().unwrap_or_default(),
            "overflow" => self.overflow.to_string(),
            "reconstruct" => u8::from(self.reconstruct).to_string(),
            "gate_stats" => self.gate_stats.clone().unwrap_or_default(),
            "scores" => self.scores.clone().unwrap_or_default(),
            // read-only: the probe a reconstruction uses when the caller gives none
            "reconstruct_prompt" => RECONSTRUCT_PROMPT.to_string(),
            _ => {
                return Err(Error::InvalidArg(format!(
                    "unknown option '{key}' (expected one of {})",
                    KEYS.join(", ")
                )))
            }
        })
    }

    /// The default of `key` as `--help` shows it.
    pub fn default_text(key: &str) -> Result<String> {
        Options::default().get_text(key)
    }

    /// The planner's parameters for a sequence of `n` tokens (window placement and the budget fit to the
    /// shared cells are the request's: [`crate::request`]).
    pub fn params(&self, n: usize) -> Params {
        let mut p = Params {
            method: self.method,
            budget: self.budget.cells(n),
            window: self.window as usize,
            n_sink: self.sink as usize,
            pool_kernel: self.pool as usize,
            chunk: self.chunk as usize,
            per_head: self.per_head,
            head_reduce: self.head_reduce,
            fill: self.form == Form::Fill,
            ..Params::default()
        };
        p.n_sink = p.sinks();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_override_in_order() {
        assert_eq!(Options::parse("").unwrap(), Options::default());
        let o = Options::parse("budget=512; method=snapkv\nchunk=0;;ratio=0.25").unwrap();
        assert_eq!(o.method, Method::SnapKv);
        assert_eq!(o.budget, Budget::Ratio(0.25));
        assert_eq!(o.chunk, 0);
        let o = Options::parse("ratio=0.5;budget=7").unwrap();
        assert_eq!(o.budget, Budget::Cells(7));
        let o = Options::parse("head_reduce=max").unwrap();
        assert_eq!(
            (o.params(10).head_reduce, o.get_text("head_reduce").unwrap().as_str()),
            (PoolKind::Max, "max")
        );
        assert_eq!(Options::default_text("head_reduce").unwrap(), "mean");
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        for (text, key) in [
            ("budget=0", "budget"),
            ("budget=-3", "budget"),
            ("ratio=1.5", "ratio"),
            ("ratio=0", "ratio"),
            ("pool=4", "pool"),
            ("window=0", "window"),
            ("method=magic", "method"),
            ("anchor=middle", "anchor"),
            ("form=x", "form"),
            ("per_head=2", "per_head"),
            ("head_reduce=sum", "head_reduce"),
            ("nope=1", "nope"),
            ("form=mask;per_head=1", "per_head"),
        ] {
            let e = Options::parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn presets_and_method_table() {
        let o = Options::parse("chunk=16;preset=paper").unwrap();
        assert_eq!((o.window, o.pool, o.chunk, o.anchor), (8, 5, 0, Anchor::End));
        let o = Options::parse("preset=paper;preset=default").unwrap();
        assert_eq!(o, Options::default());
        for m in Method::ALL {
            assert_eq!(Method::from_name(m.name()).unwrap(), m);
        }
        assert_eq!(Method::from_name("SnapKV").unwrap(), Method::SnapKv);
    }

    #[test]
    fn one_rounding_rule() {
        assert_eq!(Budget::Ratio(0.1).cells(1001), 101);
        assert_eq!(Budget::Ratio(0.001).cells(10), 1);
        assert_eq!(Budget::Ratio(1.0).cells(37), 37);
        assert_eq!(Budget::Cells(9).cells(3), 9);
    }

    #[test]
    fn every_key_has_a_default_text() {
        for k in KEYS {
            Options::default_text(k).unwrap();
        }
        assert_eq!(Options::default_text("budget").unwrap(), "256");
        assert_eq!(Options::default_text("chunk").unwrap(), "32");
        assert_eq!(Options::default_text("reconstruct").unwrap(), "0");
        assert_eq!(Options::default_text("reconstruct_prompt").unwrap(), RECONSTRUCT_PROMPT);
        assert!(Options::parse("reconstruct").unwrap().reconstruct);
        assert!(Options::parse("reconstruct=2").is_err());
    }

    #[test]
    fn streamingllm_gets_its_sinks() {
        let o = Options::parse("method=streamingllm").unwrap();
        assert_eq!(o.params(100).n_sink, 4);
        assert_eq!(
            Options::parse("method=streamingllm;sink=2").unwrap().params(100).n_sink,
            2
        );
    }
}
