//! A conversation through `llama-server --compresskv` is the same conversation continued through `llama.h`.
//!
//! The server (one slot, f32 weights, f32 cache, flash attention off, budget 384) gets a ~1.9K-token document
//! with a question, then 20 more turns, each as the token ids of the chat template's rendering (so that both
//! sides see the same tokens), with `cache_prompt`. Beside it, a context of this process replays what the
//! server does with its cache, through the public API only: keep the history's tokens up to where the new
//! prompt diverges (`llama_memory_seq_rm` after it, which a compressed sequence allows only past its evicted
//! tokens), decode the rest at its true positions, sample the first token, `llama_kv_compress` the sequence
//! (which compresses only past the budget, the trigger's default), then decode greedily up to 12 tokens. Every
//! turn's tokens must be identical, each with the same log-probability (within 1e-2: greedy tokens alone are
//! too coarse, SmolLM2 gives the same answers from a cache compressed to another budget), and the server must
//! have reused its history (`cache_n`). With f32 weights
//! a cache compacted in another order of cells adds the same terms in another order, far below any greedy
//! margin (the f32 reasoning of `tests/server_load.rs`).

use super::common::{http, tmpdir, Server};
use super::*;

use std::time::Duration;

use serde_json::{json, Value};

const BUDGET: i32 = 384;
const MAX_TOKENS: usize = 12;
const TURNS: usize = 20;
/// Log-probabilities of the generated tokens, server vs C API: the same f32 model on the same cells, but the
/// server batches the prompt its own way, so its sums run in another order (measured: up to 2.6e-4; the same
/// replay compressing to budget 448 instead of 384 moves them by up to 0.70, with the same greedy tokens).
const LOGPROB_TOL: f64 = 1e-2;
const QUESTIONS: [&str; 4] = [
    "What is the best thing to do in San Francisco?",
    "Who wrote the essay?",
    "Say that again in one sentence.",
    "What else does the document say?",
];

fn post(addr: std::net::SocketAddr, path: &str, body: Value) -> Value {
    let (status, reply) =
        http(addr, "POST", path, &body.to_string(), Duration::from_secs(600)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(status, 200, "{path}: {reply}");
    serde_json::from_str(&reply).unwrap()
}

fn ids(v: &Value) -> Vec<sys::llama_token> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a token list: {v}"))
        .iter()
        .map(|t| t.as_i64().unwrap() as sys::llama_token)
        .collect()
}

/// The C API's side of one turn: `history` (the tokens in the context's cache) continued by `prompt`, then
/// greedy tokens as the server samples them. Returns the generated tokens (an end-of-generation token included)
/// and the log-probability of each under the logits it was sampled from.
fn api_turn(
    ctx: &Ctx,
    history: &mut Vec<sys::llama_token>,
    prompt: &[sys::llama_token],
) -> (Vec<sys::llama_token>, Vec<f64>) {
    let vocab = unsafe { sys::llama_model_get_vocab(ctx.model) };
    let mut n_past = history.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    // the server evaluates at least the prompt's last token again
    n_past = n_past.min(prompt.len() - 1);
    if n_past < history.len() {
        let ok = unsafe { sys::llama_memory_seq_rm(ctx.mem(), 0, n_past as sys::llama_pos, -1) };
        assert!(ok, "seq_rm from {n_past} refused:\n{}", log_tail());
        history.truncate(n_past);
    }
    ctx.decode(&prompt[n_past..], n_past);
    history.extend_from_slice(&prompt[n_past..]);
    // the greedy token and its log-probability (a softmax over the whole vocabulary, as the server's n_probs)
    let greedy = |l: &[f32]| {
        let best = (0..l.len())
            .max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a)))
            .unwrap();
        let sum: f64 = l.iter().map(|&x| ((x - l[best]) as f64).exp()).sum();
        (best as sys::llama_token, -sum.ln())
    };
    let (t0, lp0) = greedy(&ctx.logits());
    let (mut out, mut logprobs) = (vec![t0], vec![lp0]);
    // compressed after the first token is sampled, before it is decoded, as the server's slot loop does
    let rc = ctx.compress_options(0, history, &format!("budget={BUDGET};"), &[]);
    assert!(rc == 0 || rc == 1, "llama_kv_compress returned {rc}:\n{}", log_tail());
    while out.len() < MAX_TOKENS && !unsafe { sys::llama_vocab_is_eog(vocab, *out.last().unwrap()) } {
        let t = *out.last().unwrap();
        ctx.decode(&[t], history.len());
        history.push(t);
        let (t, lp) = greedy(&ctx.logits());
        out.push(t);
        logprobs.push(lp);
    }
    (out, logprobs)
}

#[test]
fn server_conversation_is_token_identical_to_the_c_api() {
    let (_turn, model) = model_f32();
    let weights = smollm2_f32();
    #[rustfmt::skip]
    let args = [
        "-m", weights.to_str().unwrap(), "-t", "2", "--no-warmup", "-c", &N_CTX.to_string(), "-np", "1",
        "-b", &N_BATCH.to_string(), "-ub", &N_BATCH.to_string(), "-ctk", "f32", "-ctv", "f32", "-fa", "off",
        "--compresskv", "--compresskv-budget", &BUDGET.to_string(),
    ];
    let server = Server::start(&args, &[], "server-api-conversation.log");
    let addr = server.addr;
    let ctx = Ctx::with(model, |p| {
        p.type_k = sys::ggml_type_GGML_TYPE_F32;
        p.type_v = sys::ggml_type_GGML_TYPE_F32;
        p.flash_attn_type = sys::llama_flash_attn_type_LLAMA_FLASH_ATTN_TYPE_DISABLED;
    });
    let essays = script_output("scripts/fetch-data.sh", &[])
        .to_string_lossy()
        .into_owned();
    let doc = needle_text(&[
        "--essays",
        &essays,
        "--chars",
        "8000",
        "--depth",
        "0.5",
        "--template",
        "none",
    ]);
    let mut messages = vec![json!({"role": "user", "content": doc})];
    let mut history = Vec::new();
    let mut log = Vec::new();
    let mut worst = 0f64;
    for turn in 0..=TURNS {
        let text = post(addr, "/apply-template", json!({ "messages": messages }))["prompt"]
            .as_str()
            .unwrap()
            .to_string();
        let prompt = ids(&post(
            addr,
            "/tokenize",
            json!({"content": text, "add_special": true, "parse_special": true}),
        )["tokens"]);
        let served = post(
            addr,
            "/completion",
            json!({"prompt": prompt, "n_predict": MAX_TOKENS, "temperature": 0.0, "seed": 1,
                   "cache_prompt": true, "return_tokens": true, "n_probs": 1}),
        );
        let (tokens, t) = (ids(&served["tokens"]), &served["timings"]);
        let (prompt_n, cache_n) = (t["prompt_n"].as_u64().unwrap(), t["cache_n"].as_u64().unwrap());
        let (mine, logprobs) = api_turn(&ctx, &mut history, &prompt);
        assert_eq!(
            mine,
            tokens,
            "turn {turn}: the C API answers {:?}, the server {:?}",
            ctx.text(&mine),
            ctx.text(&tokens)
        );
        // the same distributions, not only the same argmax: a cache that differs by a few cells moves these
        for (i, (p, mine)) in served["completion_probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&logprobs)
            .enumerate()
        {
            let theirs = p["logprob"].as_f64().unwrap();
            worst = worst.max((theirs - mine).abs());
            assert!(
                (theirs - mine).abs() <= LOGPROB_TOL,
                "turn {turn} token {i}: logprob {theirs} vs {mine}"
            );
        }
        if turn > 0 {
            assert!(
                prompt_n < 64 && cache_n > 1500,
                "turn {turn}: {prompt_n} prefilled, {cache_n} cached"
            );
        }
        let cells = unsafe { sys::llama_kv_compress_n_cells(ctx.ctx, 0) };
        log.push((prompt.len(), prompt_n, cells));
        messages.push(json!({"role": "assistant", "content": served["content"]}));
        messages.push(json!({"role": "user", "content": QUESTIONS[turn % QUESTIONS.len()]}));
    }
    let compressions = server.log_from(0).matches("compresskv: sequence 0 compressed").count();
    assert!(compressions > TURNS / 2, "{compressions} compressions");
    std::fs::write(tmpdir().join("server-api-conversation.txt"), format!("{log:?}\n")).unwrap();
    eprintln!("per turn (prompt tokens, prefilled by the server, C API cells after it): {log:?}; largest logprob difference {worst:e}");
}
