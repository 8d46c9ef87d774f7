//! `llama_kv_compress()` through the public `llama.h` only, as a C or Rust embedder calls it: the patched
//! llama.cpp built by `build.rs` (`--features llama`) and linked into this test, bindings by bindgen.
//!
//! SmolLM2-135M-Instruct (`scripts/fetch-model.sh smollm2`) on a ~3K-token needle prompt
//! (`bench/needle.py` over the essays of `scripts/fetch-data.sh`), tokenized, decoded in batches, then:
//! - budget 256: returns 0, the sequence still ends at position n - 1, the greedy answer retrieves the
//!   needle's fact;
//! - budget >= n: returns 1 and the greedy tokens are those of a context that never called it;
//! - an invalid sequence id and a negative budget: return -1 and leave the cache as it was (same positions,
//!   same greedy tokens as without the call).
//!
//! - `conversation.rs`: a 21-turn conversation through `llama-server --compresskv` gives the same tokens and
//!   log-probabilities as the same cache state continued here through `llama.h`.
//!
//! One model load is shared; each test decodes the prompt in a context of its own (four prefills of ~3K
//! tokens in all, with the reference), and the tests take turns on the model (2 threads each). A missing
//! model or data set is a failure with the command that provides it.
#![cfg(feature = "llama")]

// Nothing here calls the crate, but libllama.a does (the ckv_* functions): linking it also brings the
// llama.cpp static libraries its build script declares.
extern crate compresskv;

#[path = "../common/mod.rs"]
mod common;
mod conversation;
mod flags;
use common::{needle_text, script_output, smollm2_f32};

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::{Mutex, MutexGuard, OnceLock};

#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unnecessary_transmutes,
    clippy::all
)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/llama_sys.rs"));
}

const N_CTX: u32 = 4096;
const N_BATCH: usize = 512;
const N_GEN: usize = 24;

/// llama.cpp's log, kept for failure messages instead of flooding the test output.
static LOG: Mutex<String> = Mutex::new(String::new());

unsafe extern "C" fn log_to_buffer(_level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    let s = CStr::from_ptr(text).to_string_lossy();
    let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    log.push_str(&s);
    if log.len() > 1 << 20 {
        let cut = log.len() - (1 << 19);
        let cut = (cut..log.len()).find(|&i| log.is_char_boundary(i)).unwrap();
        log.drain(..cut);
    }
}

fn log_tail() -> String {
    let log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    let start = log.len().saturating_sub(3000);
    let start = (start..=log.len()).find(|&i| log.is_char_boundary(i)).unwrap();
    log[start..].to_string()
}

fn clear_log() {
    LOG.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

struct Model(*mut sys::llama_model);
// The model is read-only after loading; llama.cpp allows contexts on it from any thread.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

/// The lock the tests take turns on (one context at a time: 2 cores).
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

fn load(path: &str) -> Model {
    let cpath = CString::new(path).unwrap();
    unsafe {
        sys::llama_log_set(Some(log_to_buffer), std::ptr::null_mut());
        sys::llama_backend_init();
        let p = sys::llama_model_load_from_file(cpath.as_ptr(), sys::llama_model_default_params());
        assert!(!p.is_null(), "cannot load {path}:\n{}", log_tail());
        Model(p)
    }
}

/// The shared model (SmolLM2 Q4_1), and the turn.
fn model() -> (MutexGuard<'static, ()>, *mut sys::llama_model) {
    static MODEL: OnceLock<Model> = OnceLock::new();
    let turn = turn();
    let m = MODEL.get_or_init(|| load(&script_output("scripts/fetch-model.sh", &["smollm2"]).to_string_lossy()));
    (turn, m.0)
}

/// The same model with f32 weights (common::smollm2_f32: why the equivalence test needs it), and the turn.
fn model_f32() -> (MutexGuard<'static, ()>, *mut sys::llama_model) {
    static MODEL: OnceLock<Model> = OnceLock::new();
    let turn = turn();
    let m = MODEL.get_or_init(|| load(&smollm2_f32().to_string_lossy()));
    (turn, m.0)
}

/// The needle prompt (~3K tokens), tokenized as llama-completion -f tokenizes it.
fn prompt_tokens(model: *mut sys::llama_model) -> &'static [sys::llama_token] {
    static TOKENS: OnceLock<Vec<sys::llama_token>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let essays = script_output("scripts/fetch-data.sh", &[])
            .to_string_lossy()
            .into_owned();
        let mut text = needle_text(&["--essays", &essays, "--chars", "12000", "--depth", "0.5"]);
        // llama-completion -f drops the file's final newline (the one after the assistant header)
        if text.ends_with('\n') {
            text.pop();
        }
        let vocab = unsafe { sys::llama_model_get_vocab(model) };
        let mut toks = vec![0; text.len() + 16];
        // add_special: BOS if the model wants it; parse_special: the chat template's tokens
        let n = unsafe {
            sys::llama_tokenize(
                vocab,
                text.as_ptr().cast(),
                text.len() as i32,
                toks.as_mut_ptr(),
                toks.len() as i32,
                true,
                true,
            )
        };
        assert!(n > 0, "llama_tokenize returned {n}");
        toks.truncate(n as usize);
        assert!(
            (2500..(N_CTX as usize - N_GEN - 64)).contains(&toks.len()),
            "prompt of {} tokens, expected ~3K",
            toks.len()
        );
        toks
    })
}

/// A context on the shared model, freed on drop.
struct Ctx {
    ctx: *mut sys::llama_context,
    model: *mut sys::llama_model,
}

impl Ctx {
    fn new(model: *mut sys::llama_model) -> Ctx {
        Ctx::with(model, |_| {})
    }

    /// A context with the test's defaults, then `tweak` (cache types, flash attention).
    fn with(model: *mut sys::llama_model, tweak: impl FnOnce(&mut sys::llama_context_params)) -> Ctx {
        unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = N_CTX;
            p.n_batch = N_BATCH as u32;
            p.n_threads = 2;
            p.n_threads_batch = 2;
            p.no_perf = true;
            tweak(&mut p);
            let ctx = sys::llama_init_from_model(model, p);
            assert!(!ctx.is_null(), "llama_init_from_model failed:\n{}", log_tail());
            Ctx { ctx, model }
        }
    }

    fn mem(&self) -> sys::llama_memory_t {
        unsafe { sys::llama_get_memory(self.ctx) }
    }

    fn pos_range(&self) -> (sys::llama_pos, sys::llama_pos) {
        unsafe {
            (
                sys::llama_memory_seq_pos_min(self.mem(), 0),
                sys::llama_memory_seq_pos_max(self.mem(), 0),
            )
        }
    }

    /// Decode `tokens` at positions `pos..` of sequence 0 in batches of N_BATCH, logits for the last one.
    fn decode(&self, tokens: &[sys::llama_token], pos: usize) {
        unsafe {
            let mut batch = sys::llama_batch_init(N_BATCH as i32, 0, 1);
            for (ib, chunk) in tokens.chunks(N_BATCH).enumerate() {
                let base = ib * N_BATCH;
                for (i, &t) in chunk.iter().enumerate() {
                    *batch.token.add(i) = t;
                    *batch.pos.add(i) = (pos + base + i) as sys::llama_pos;
                    *batch.n_seq_id.add(i) = 1;
                    **batch.seq_id.add(i) = 0;
                    *batch.logits.add(i) = (base + i + 1 == tokens.len()) as i8;
                }
                batch.n_tokens = chunk.len() as i32;
                let rc = sys::llama_decode(self.ctx, batch);
                assert_eq!(rc, 0, "llama_decode at {}:\n{}", pos + base, log_tail());
            }
            sys::llama_batch_free(batch);
        }
    }

    /// Greedy decoding of N_GEN tokens (fewer at end of generation) from the current logits, the first
    /// new token at position `pos`.
    fn greedy(&self, pos: usize) -> Vec<sys::llama_token> {
        let vocab = unsafe { sys::llama_model_get_vocab(self.model) };
        let n_vocab = unsafe { sys::llama_vocab_n_tokens(vocab) } as usize;
        let mut out = Vec::new();
        for i in 0..N_GEN {
            let logits = unsafe { sys::llama_get_logits_ith(self.ctx, -1) };
            assert!(!logits.is_null(), "no logits:\n{}", log_tail());
            let logits = unsafe { std::slice::from_raw_parts(logits, n_vocab) };
            let best = (0..n_vocab)
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
                .unwrap() as sys::llama_token;
            out.push(best);
            if unsafe { sys::llama_vocab_is_eog(vocab, best) } {
                break;
            }
            self.decode(&[best], pos + i);
        }
        out
    }

    fn text(&self, tokens: &[sys::llama_token]) -> String {
        let vocab = unsafe { sys::llama_model_get_vocab(self.model) };
        let mut s = Vec::new();
        for &t in tokens {
            let mut buf = [0u8; 256];
            let n = unsafe { sys::llama_token_to_piece(vocab, t, buf.as_mut_ptr().cast(), buf.len() as i32, 0, false) };
            assert!(n >= 0, "llama_token_to_piece({t}) returned {n}");
            s.extend_from_slice(&buf[..n as usize]);
        }
        String::from_utf8_lossy(&s).into_owned()
    }

    fn compress(&self, seq_id: sys::llama_seq_id, tokens: &[sys::llama_token], budget: i32) -> i32 {
        self.compress_with(seq_id, tokens, budget, "", &[])
    }

    /// `llama_kv_compress` with the paper's selection (the options' `preset=paper`), `budget` and `extra` options,
    /// scored by `probe` when not empty.
    fn compress_with(
        &self,
        seq_id: sys::llama_seq_id,
        tokens: &[sys::llama_token],
        budget: i32,
        extra: &str,
        probe: &[sys::llama_token],
    ) -> i32 {
        self.compress_options(seq_id, tokens, &format!("preset=paper;budget={budget};{extra}"), probe)
    }

    /// `llama_kv_compress` with the options string as given.
    fn compress_options(
        &self,
        seq_id: sys::llama_seq_id,
        tokens: &[sys::llama_token],
        options: &str,
        probe: &[sys::llama_token],
    ) -> i32 {
        let opts = CString::new(options).unwrap();
        unsafe {
            sys::llama_kv_compress(
                self.ctx,
                seq_id,
                tokens.as_ptr(),
                tokens.len() as i32,
                probe.as_ptr(),
                probe.len() as i32,
                opts.as_ptr(),
            )
        }
    }

    /// The logits of the last decoded token.
    fn logits(&self) -> Vec<f32> {
        let vocab = unsafe { sys::llama_model_get_vocab(self.model) };
        let n_vocab = unsafe { sys::llama_vocab_n_tokens(vocab) } as usize;
        let logits = unsafe { sys::llama_get_logits_ith(self.ctx, -1) };
        assert!(!logits.is_null(), "no logits:\n{}", log_tail());
        // SAFETY: llama_get_logits_ith returns a row of n_vocab floats, valid until the next decode
        unsafe { std::slice::from_raw_parts(logits, n_vocab) }.to_vec()
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        unsafe { sys::llama_free(self.ctx) }
    }
}

/// The greedy tokens of a context that decoded the prompt and never called llama_kv_compress.
fn uncompressed(model: *mut sys::llama_model) -> &'static [sys::llama_token] {
    static REF: OnceLock<Vec<sys::llama_token>> = OnceLock::new();
    REF.get_or_init(|| prefilled(model).greedy(prompt_tokens(model).len()))
}

/// A new context that decoded the prompt (each test its own: the state API does not keep the logits).
fn prefilled(model: *mut sys::llama_model) -> Ctx {
    let toks = prompt_tokens(model);
    let ctx = Ctx::new(model);
    ctx.decode(toks, 0);
    assert_eq!(ctx.pos_range(), (0, toks.len() as i32 - 1));
    ctx
}

#[test]
fn budget_256_keeps_the_needle_and_the_true_position() {
    let (_turn, model) = model();
    let toks = prompt_tokens(model);
    let n = toks.len() as i32;
    let ctx = prefilled(model);
    clear_log();
    let rc = ctx.compress(0, toks, 256);
    assert_eq!(rc, 0, "llama_kv_compress at budget 256 of {n} tokens:\n{}", log_tail());
    // the cells moved, the positions did not: generation continues at n
    assert_eq!(ctx.pos_range().1, n - 1, "seq_pos_max after compression");
    let answer = ctx.text(&ctx.greedy(n as usize));
    // the needle's fact; "sandwich" is a word the essays never use (see tests/e2e_llama.rs)
    assert!(
        answer.to_lowercase().contains("sandwich"),
        "budget 256 of {n}: the answer misses the needle: {answer:?}"
    );
}

#[test]
fn budget_covering_the_prompt_changes_nothing() {
    let (_turn, model) = model();
    let toks = prompt_tokens(model);
    let n = toks.len() as i32;
    let reference = uncompressed(model);
    let ctx = prefilled(model);
    for budget in [n, n + 100] {
        clear_log();
        assert_eq!(
            ctx.compress(0, toks, budget),
            1,
            "budget {budget} >= {n}:\n{}",
            log_tail()
        );
        assert_eq!(ctx.pos_range(), (0, n - 1), "budget {budget}");
    }
    let got = ctx.greedy(n as usize);
    assert_eq!(
        got,
        reference,
        "budget >= n: {:?} vs uncompressed {:?}",
        ctx.text(&got),
        ctx.text(reference)
    );
}

#[test]
fn refused_calls_leave_the_cache_as_it_was() {
    let (_turn, model) = model();
    let toks = prompt_tokens(model);
    let n = toks.len() as i32;
    let reference = uncompressed(model);
    let ctx = prefilled(model);
    // the context has one sequence (n_seq_max 1): 99 and -1 are not sequences of it
    for (seq_id, budget, what) in [(99, 256, "seq_id 99"), (-1, 256, "seq_id -1"), (0, -5, "budget -5")] {
        clear_log();
        let rc = ctx.compress(seq_id, toks, budget);
        assert_eq!(rc, -1, "{what}: expected -1 (refused):\n{}", log_tail());
        assert_eq!(ctx.pos_range(), (0, n - 1), "{what}: positions changed");
    }
    let got = ctx.greedy(n as usize);
    assert_eq!(
        got,
        reference,
        "after refused calls: {:?} vs uncompressed {:?}",
        ctx.text(&got),
        ctx.text(reference)
    );
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a)))
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The strongest check of compaction (docs/design.md §1.5), logit by logit: the fill-form compacted cache against the
/// masked reference (`mask_only`: the same plan, nothing moves, each layer's evicted cells hidden in place),
/// SmolLM2 with f32 weights, f32 caches, flash attention off, teacher-forced for 32 tokens with the
/// reference's greedy tokens. The two attention sums then differ only in the order f32 adds the same terms
/// (the kept cells sit at other indices): every logit must agree to 2e-3, and the greedy token must agree
/// wherever the reference's top-2 margin is wider than twice that step's difference. Control: the full
/// cache, fed the same tokens, differs far more (the masks matter), so this test can fail.
///
/// With the Q4_1 weights the same comparison moves logits by up to ~0.9 (q8 activations, see
/// common::smollm2_f32). That is layout noise, not compaction: measured while finding it, the masked reference
/// itself moved as much between decoding two tokens one by one and as one batch.
#[test]
fn compacted_cache_matches_the_masked_reference_to_f32_rounding() {
    let (_turn, model) = model_f32();
    let toks = prompt_tokens(model);
    let n = toks.len();
    let f32_no_fa = |p: &mut sys::llama_context_params| {
        p.type_k = sys::ggml_type_GGML_TYPE_F32;
        p.type_v = sys::ggml_type_GGML_TYPE_F32;
        p.flash_attn_type = sys::llama_flash_attn_type_LLAMA_FLASH_ATTN_TYPE_DISABLED;
    };
    let ctxs: Vec<Ctx> = (0..3)
        .map(|_| {
            let c = Ctx::with(model, f32_no_fa);
            c.decode(toks, 0);
            c
        })
        .collect();
    let (compacted, masked, full) = (&ctxs[0], &ctxs[1], &ctxs[2]);
    clear_log();
    let rc = compacted.compress_with(0, toks, 256, "method=snapkv;form=fill", &[]);
    assert_eq!(rc, 0, "fill form:\n{}", log_tail());
    let cells = unsafe { sys::llama_kv_compress_n_cells(compacted.ctx, 0) };
    assert!(
        (0..300).contains(&cells),
        "the compacted cache must really compact: {n} -> {cells} cells"
    );
    let rc = masked.compress_with(0, toks, 256, "method=snapkv;form=mask", &[]);
    assert_eq!(rc, 0, "mask form:\n{}", log_tail());
    // both re-decoded the window and its suffix: the logits are those of the prompt's last token again; the
    // full cache's logits are still those of its prefill
    let (mut worst, mut worst_full, mut near_ties) = (0.0f32, 0.0f32, 0);
    for step in 0..32 {
        let (c, m, f) = (compacted.logits(), masked.logits(), full.logits());
        let d = max_abs_diff(&c, &m);
        let best = argmax(&m);
        let second = (0..m.len())
            .filter(|&i| i != best)
            .map(|i| m[i])
            .fold(f32::NEG_INFINITY, f32::max);
        let margin = m[best] - second;
        if margin > 2.0 * d {
            assert_eq!(
                argmax(&c),
                best,
                "step {step}: greedy tokens differ with a margin of {margin} > 2 x {d}"
            );
        } else {
            near_ties += 1;
        }
        worst = worst.max(d);
        worst_full = worst_full.max(max_abs_diff(&f, &m));
        let t = best as sys::llama_token;
        for ctx in [compacted, masked, full] {
            ctx.decode(&[t], n + step);
        }
    }
    eprintln!(
        "compacted vs masked: max |logit difference| {worst:e} over 32 steps ({near_ties} near-ties); \
         full cache vs masked: {worst_full:e}"
    );
    assert!(
        worst < 2e-3,
        "the compacted cache's logits differ from the masked reference's by {worst}"
    );
    assert!(
        worst_full > 100.0 * worst.max(1e-5),
        "control: the full cache should differ from the masked one far more than {worst} ({worst_full})"
    );
}

#[test]
fn probe_compression_leaves_the_prompt_logits_and_the_last_position() {
    let (_turn, model) = model();
    let toks = prompt_tokens(model);
    let n = toks.len() as i32;
    let ctx = prefilled(model);
    let before = ctx.logits();
    // the probe: the prompt's own question tokens again (any tokens do; these make a plausible scorer)
    let probe: Vec<sys::llama_token> = toks[toks.len() - 24..].to_vec();
    clear_log();
    let rc = ctx.compress_with(0, toks, 256, "", &probe);
    assert_eq!(
        rc,
        0,
        "llama_kv_compress with a probe of {} tokens:\n{}",
        probe.len(),
        log_tail()
    );
    // the probe decoded after the prompt left again, and the prompt's last token is where it was
    assert_eq!(ctx.pos_range().1, n - 1, "seq_pos_max after a probe compression");
    assert_eq!(unsafe { sys::llama_kv_compress_n_cells(ctx.ctx, 0) }, 256, "cells held");
    let after = ctx.logits();
    // the probe's decode wrote its own logits; the prompt's last row must be back, bit for bit
    assert!(
        before == after,
        "logits after a probe compression differ from the prompt's: max |diff| {}, argmax {} vs {}",
        max_abs_diff(&before, &after),
        argmax(&before),
        argmax(&after)
    );
}

/// The options go through llama.h to the library, which validates them and owns every default.
#[test]
fn options_are_checked_and_defaulted_by_the_library_through_llama_h() {
    let text = |buf: &[c_char]| unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    assert!(unsafe { sys::llama_kv_compress_supported() });
    let mut buf = [0 as c_char; 256];
    let ok = CString::new("budget=512;method=snapkv;chunk=0").unwrap();
    assert_eq!(
        unsafe { sys::llama_kv_compress_check(ok.as_ptr(), buf.as_mut_ptr(), buf.len()) },
        0
    );
    for (bad, key) in [
        ("budget=0", "budget"),
        ("method=magic", "method"),
        ("pool=4", "pool"),
        ("nope=1", "nope"),
    ] {
        let c = CString::new(bad).unwrap();
        assert_eq!(
            unsafe { sys::llama_kv_compress_check(c.as_ptr(), buf.as_mut_ptr(), buf.len()) },
            -1,
            "{bad}"
        );
        assert!(text(&buf).contains(key), "{bad}: {}", text(&buf));
    }
    let get = |opts: Option<&CString>, key: &str| {
        let k = CString::new(key).unwrap();
        let mut b = [0 as c_char; 64];
        let p = opts.map_or(std::ptr::null(), |o| o.as_ptr());
        assert_eq!(
            unsafe { sys::llama_kv_compress_option(p, k.as_ptr(), b.as_mut_ptr(), b.len()) },
            0,
            "{key}"
        );
        text(&b)
    };
    assert_eq!(get(None, "budget"), "256");
    assert_eq!(get(None, "chunk"), "32");
    assert_eq!(get(Some(&ok), "method"), "snapkv");
    assert_eq!(get(Some(&ok), "budget"), "512");
    // a refused option string leaves the cache alone: -1, the prompt's positions unchanged
    let (_turn, model) = model();
    let toks = prompt_tokens(model);
    let ctx = prefilled(model);
    let rc = ctx.compress_options(0, toks, "budget=-5", &[]);
    assert_eq!(rc, -1);
    assert_eq!(ctx.pos_range(), (0, toks.len() as i32 - 1));
}
