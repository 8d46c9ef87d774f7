//! The `--compresskv-*` flags of llama.cpp's tools: the one table of their names, the option each sets and
//! their help text, which llama.cpp's argument parser registers through the C ABI (`ckv_flag_get`).
//!
//! ```text
//! for each flag in FLAGS:                      # llama.cpp's common/arg.cpp, at start-up
//!     register flag.name (with flag.hint if it takes a value) and help(flag)
//! on "--compresskv-x VALUE":
//!     options += flag.key "=" VALUE ";"        # a switch: "=1"; --compresskv itself only enables
//!     Options::parse(options)?                 # validated at once: the error names the flag
//! ```
//!
//! Invariants:
//! - Every key a flag sets is one of [`crate::options::KEYS`] (but [`PROBE_KEY`], the caller's own), and
//!   no two flags share a name or a key.
//! - A flag's help shows the option's default from [`crate::options::Options::default_text`], the one
//!   place defaults are defined.

use crate::options::Options;
use crate::plan::Method;
use once_cell::sync::Lazy;
use std::ffi::CString;

/// Where a flag is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tools {
    /// llama-completion, llama-cli and llama-server.
    All,
    /// llama-completion only (prompts longer than the context).
    Completion,
}

/// One flag.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// The flag, e.g. `--compresskv-budget`.
    pub name: &'static str,
    /// The option it sets; empty for `--compresskv`, which enables compression.
    pub key: &'static str,
    /// The value's placeholder in `--help` (`N`, `NAME`, ...); empty for a switch (the option is set to 1).
    pub hint: &'static str,
    /// Help text; `{methods}` is replaced by the method table's names.
    pub help: &'static str,
    /// Whether `--help` shows the option's default after the text.
    pub show_default: bool,
    /// Where the flag is offered.
    pub tools: Tools,
}

const fn flag(
    name: &'static str,
    key: &'static str,
    hint: &'static str,
    help: &'static str,
    show_default: bool,
) -> Flag {
    Flag {
        name,
        key,
        hint,
        help,
        show_default,
        tools: Tools::All,
    }
}

/// The key of `--compresskv-probe`: its text is the caller's (it may hold `;` and newlines, so it cannot
/// travel in the options string); it is decoded after the sequence as `ckv_seq_desc.n_probe` tokens.
pub const PROBE_KEY: &str = "probe";

/// The most flags llama.cpp registers: `common/arg.cpp` instantiates one handler per index below it (a
/// handler is a plain function pointer and cannot carry its flag).
pub const MAX_FLAGS: usize = 32;

/// Every flag, in the order `--help` lists them.
pub const FLAGS: &[Flag] = &[
    flag(
        "--compresskv",
        "",
        "",
        "compress the KV cache right after the prompt is decoded (compresskv)",
        false,
    ),
    flag(
        "--compresskv-budget",
        "budget",
        "N",
        "KV cells kept per layer, window included: the memory",
        true,
    ),
    flag(
        "--compresskv-ratio",
        "ratio",
        "F",
        "fraction of the prompt kept per layer, in (0, 1] (instead of --compresskv-budget)",
        false,
    ),
    flag(
        "--compresskv-budget-avg",
        "budget_avg",
        "",
        "the budget is the paper's average over layers: per-layer budgets (compresskv with a profile, pyramidkv) \
         then occupy the largest one, up to 3x the budget (default: the budget is the cells kept)",
        false,
    ),
    flag(
        "--compresskv-method",
        "method",
        "NAME",
        "{methods} (ablation: the profile's heads, uniform budgets)",
        true,
    ),
    flag(
        "--compresskv-profile",
        "profile",
        "FILE",
        "model profile (semantic retrieval heads, layer weights) for --compresskv-method compresskv",
        false,
    ),
    flag(
        "--compresskv-trigger",
        "trigger",
        "N",
        "compress only a sequence holding more than N cells, 0 = the budget; a conversation reuses its \
         compressed cells, appends each turn and is compressed again past N",
        true,
    ),
    flag(
        "--compresskv-window",
        "window",
        "N",
        "observation window: queries of the last N prompt tokens score the rest",
        true,
    ),
    flag(
        "--compresskv-pool",
        "pool",
        "N",
        "pooling kernel along the sequence, odd",
        true,
    ),
    flag(
        "--compresskv-chunk",
        "chunk",
        "N",
        "keep whole chunks of N tokens ranked by mean score, 0 = single tokens",
        true,
    ),
    flag(
        "--compresskv-sink",
        "sink",
        "N",
        "first N prompt tokens always kept (streamingllm uses 4 when 0)",
        true,
    ),
    flag(
        "--compresskv-per-head",
        "per_head",
        "",
        "select tokens per KV head instead of one set per layer",
        false,
    ),
    flag(
        "--compresskv-head-reduce",
        "head_reduce",
        "HOW",
        "how the scores of a token set's heads combine: mean (SnapKV), or max (KVzip: a cell one head must read \
         counts as much as that head reads it)",
        true,
    ),
    flag(
        "--compresskv-preset",
        "preset",
        "NAME",
        "paper: the CompressKV paper's selection (window of the last 8 tokens, pooling 5, single tokens); \
         default: ours (window ending at the question, 32-token chunks; chosen by bench/tune.py)",
        false,
    ),
    flag(
        "--compresskv-window-anchor",
        "anchor",
        "WHERE",
        "end: the window is the prompt's last tokens (paper); question: it ends where the chat template's \
         generation prompt starts, which is always kept",
        true,
    ),
    flag(
        "--compresskv-form",
        "form",
        "FORM",
        "fill: every layer keeps the largest layer budget; exact: per-layer budgets, masked per layer; mask: \
         reference, evicted cells hidden per layer in place",
        true,
    ),
    flag(
        "--compresskv-stats",
        "stats",
        "FILE",
        "append one JSON object per compression to FILE",
        false,
    ),
    flag(
        "--compresskv-probe",
        PROBE_KEY,
        "TEXT",
        "score with the queries of TEXT instead of a window of the prompt: TEXT is decoded after the prompt and \
         removed again (query-agnostic compression: a fixed instruction when the question is not known yet)",
        false,
    ),
    flag(
        "--compresskv-reconstruct",
        "reconstruct",
        "",
        "score by reconstruction (query-agnostic): the model reads its context again after an instruction to \
         repeat it (--compresskv-probe, or the library's), in chunks, and its queries score every cell",
        false,
    ),
    Flag {
        tools: Tools::Completion,
        ..flag(
            "--compresskv-overflow-window",
            "overflow",
            "WHICH",
            "prompt longer than the context (-c): the cache is compressed whenever it would overflow, scored by \
             recent: the latest tokens; question: the prompt's question, decoded ahead and removed; probe: the \
             --compresskv-probe text",
            true,
        )
    },
];

/// The help text of `f` as `--help` shows it: the method names filled in and the default appended.
pub fn help(f: &Flag) -> String {
    let text = f.help.replace("{methods}", &Method::names());
    match Options::default_text(f.key) {
        Ok(d) if f.show_default => format!("{text} (default: {d})"),
        _ => text,
    }
}

/// The flags' strings as the C ABI hands them out: name, key, hint and help, NUL-terminated, for the life
/// of the process.
pub static C_FLAGS: Lazy<Vec<[CString; 4]>> = Lazy::new(|| {
    let c = |s: &str| CString::new(s).expect("flag strings hold no NUL");
    FLAGS
        .iter()
        .map(|f| [c(f.name), c(f.key), c(f.hint), c(&help(f))])
        .collect()
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::KEYS;
    use std::collections::HashSet;

    #[test]
    fn every_flag_sets_a_known_key_once() {
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        for f in FLAGS {
            assert!(names.insert(f.name), "{} twice", f.name);
            assert!(f.name.starts_with("--compresskv"), "{}", f.name);
            if f.key.is_empty() {
                assert_eq!(f.name, "--compresskv");
                continue;
            }
            assert!(keys.insert(f.key), "{} twice", f.key);
            if f.key == PROBE_KEY {
                assert!(Options::parse("probe=x").is_err(), "the probe text is not an option");
                continue;
            }
            assert!(KEYS.contains(&f.key), "{}: unknown key {}", f.name, f.key);
            // a switch sets its option to 1, a value flag's default parses back
            let value = if f.hint.is_empty() {
                "1".to_string()
            } else {
                Options::default_text(f.key).unwrap()
            };
            if !value.is_empty() && f.key != "preset" {
                Options::parse(&format!("{}={value}", f.key)).unwrap_or_else(|e| panic!("{}: {e}", f.name));
            }
        }
    }

    #[test]
    fn help_shows_the_defaults_and_the_method_table() {
        let by = |n: &str| FLAGS.iter().find(|f| f.name == n).unwrap();
        assert!(help(by("--compresskv-budget"))
            .ends_with(&format!("(default: {})", Options::default_text("budget").unwrap())));
        let m = help(by("--compresskv-method"));
        for method in Method::ALL {
            assert!(m.contains(method.name()), "{m}");
        }
        assert!(help(by("--compresskv-overflow-window")).ends_with("(default: question)"));
        assert!(!help(by("--compresskv-stats")).contains("default"));
        assert_eq!(C_FLAGS.len(), FLAGS.len());
        assert!(
            FLAGS.len() <= MAX_FLAGS,
            "common/arg.cpp registers at most {MAX_FLAGS} flags"
        );
    }
}
