//! A conversation over a compressed cache: `llama-server --compresskv`, one slot, SmolLM2, a ~2K-token
//! document with a question, then 20 more turns through `/v1/chat/completions` (`cache_prompt`, the default).
//!
//! The slot keeps its logical history (every token of the conversation, evicted ones included) beside its
//! kept cells, so each turn after the first reuses the compressed history and prefills only what is new;
//! the sequence is compressed again whenever it holds more cells than the trigger (here the budget), so its
//! memory stays flat while the history grows, past the context (`-c`) itself. Then, on the same server:
//! - the last turn regenerated with another question: prefilled from the divergence point (no evicted token
//!   lies before it);
//! - another conversation in the slot, then the first one again: its compressed state comes back from the
//!   RAM prompt cache (`--cache-ram`, on by default) and its history is reused;
//! - the slot saved, erased and restored (`/slots/0?action=save|erase|restore`): the next turn reuses the
//!   restored history and cells;
//! - an edit inside the compressed document: an evicted token lies before the divergence, so the prompt is
//!   prefilled from scratch, and the log says which.
//!
//! Needs `scripts/build-llama.sh` (`vendor/build/bin/llama-server`) and the model and essays of
//! `scripts/setup.sh`. ~2 minutes on 2 cores: two prefills of the document, the rest a few dozen tokens each.

mod common;
use common::{http, script_output, tmpdir, Server};

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

const BUDGET: u64 = 384;
/// The slot's context: the document fits, the conversation's history outgrows it.
const N_CTX: u64 = 2304;
/// Cells a compressed sequence may hold beyond the budget: the template suffix kept after the window.
const PAD: u64 = 32;
const MAX_TOKENS: u64 = 12;
/// Turns after the first.
const TURNS: usize = 20;
/// A turn's new tokens at most: the previous answer as the template renders it, the question, the markers.
const TURN_MAX: u64 = 64;
const FACTS: [&str; 3] = [
    "The secret code of the vault is 4917.",
    "Maria's favourite fruit is the mango.",
    "The meeting is on Thursday at noon.",
];
const QUESTIONS: [&str; 4] = [
    "What is the secret code of the vault?",
    "What is Maria's favourite fruit?",
    "When is the meeting?",
    "Say that again in one sentence.",
];

/// ~8000 characters of essays with the facts at a quarter, half and three quarters.
fn document() -> String {
    let essays = script_output("scripts/fetch-data.sh", &[]);
    let mut files: Vec<_> = std::fs::read_dir(&essays)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let text: String = files
        .iter()
        .take(4)
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let chars: Vec<char> = text.chars().take(8000).collect();
    let mut doc = String::new();
    for (i, part) in chars.chunks(2000).enumerate() {
        doc.extend(part);
        if let Some(f) = FACTS.get(i) {
            doc += &format!(" {f} ");
        }
    }
    doc
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

/// One request to the chat endpoint: (HTTP status, body).
fn post_chat(addr: SocketAddr, messages: &[Value]) -> (u32, String) {
    post_chat_to(addr, messages, -1)
}

/// One request to the chat endpoint, to slot `id_slot` (-1: the server chooses).
fn post_chat_to(addr: SocketAddr, messages: &[Value], id_slot: i64) -> (u32, String) {
    let req = json!({"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0, "seed": 1,
                     "id_slot": id_slot});
    http(
        addr,
        "POST",
        "/v1/chat/completions",
        &req.to_string(),
        Duration::from_secs(600),
    )
    .unwrap_or_else(|e| panic!("HTTP: {e}"))
}

/// One turn: (answer, timings.prompt_n, timings.cache_n).
fn chat(addr: SocketAddr, messages: &[Value]) -> (String, u64, u64) {
    chat_to(addr, messages, -1)
}

/// One turn in slot `id_slot`.
fn chat_to(addr: SocketAddr, messages: &[Value], id_slot: i64) -> (String, u64, u64) {
    let (status, body) = post_chat_to(addr, messages, id_slot);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let t = &v["timings"];
    (
        v["choices"][0]["message"]["content"].as_str().unwrap().to_string(),
        t["prompt_n"].as_u64().unwrap(),
        t["cache_n"].as_u64().unwrap(),
    )
}

/// The slot's KV cells and the tokens of its history (`/slots`).
fn slot(addr: SocketAddr) -> (i64, u64) {
    slots(addr)[0]
}

/// `/slots`: one JSON object per slot.
fn slots_json(addr: SocketAddr) -> Vec<Value> {
    let (status, body) = http(addr, "GET", "/slots", "", Duration::from_secs(30)).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Each slot's KV cells and the tokens of its history (0 before its first task).
fn slots(addr: SocketAddr) -> Vec<(i64, u64)> {
    slots_json(addr)
        .iter()
        .map(|s| {
            (
                s["n_cells"].as_i64().unwrap(),
                s["n_prompt_tokens"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The compressions of slot 0 since it last prefilled from scratch (`/slots` `n_compressions`).
fn compressions(addr: SocketAddr) -> u64 {
    slots_json(addr)[0]["n_compressions"].as_u64().unwrap()
}

fn slot_action(addr: SocketAddr, action: &str, body: Value) {
    let (status, reply) = http(
        addr,
        "POST",
        &format!("/slots/0?action={action}"),
        &body.to_string(),
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(status, 200, "{action}: {reply}");
}

#[test]
fn conversation_reuses_the_compressed_history_and_stays_flat() {
    let model = script_output("scripts/fetch-model.sh", &["smollm2"]);
    let stats = tmpdir().join("stats-server-chat.jsonl");
    let _ = std::fs::remove_file(&stats);
    let slots = tmpdir().join("server-chat-slots");
    std::fs::create_dir_all(&slots).unwrap();
    #[rustfmt::skip]
    let args = [
        "-m", model.to_str().unwrap(), "-t", "2", "--no-warmup", "-c", &N_CTX.to_string(), "-np", "1",
        "--slot-save-path", slots.to_str().unwrap(),
        "--compresskv", "--compresskv-budget", &BUDGET.to_string(), "--compresskv-stats", stats.to_str().unwrap(),
    ];
    let server = Server::start(&args, &[], "server-chat.log");
    let addr = server.addr;
    let doc = document();

    // the document and its question, then 20 turns
    let mut messages = vec![user(&format!("Read this document.\n\n{doc}\n\n{}", QUESTIONS[0]))];
    let (mut history, mut max_cells) = (0u64, 0i64);
    let mut per_turn = Vec::new();
    for turn in 0..=TURNS {
        let (answer, prompt_n, cache_n) = chat(addr, &messages);
        let (cells, n_tokens) = slot(addr);
        per_turn.push((prompt_n, cache_n, cells, n_tokens));
        if turn == 0 {
            assert_eq!(cache_n, 0);
            assert!(prompt_n > 1500, "the document: {prompt_n} tokens");
        } else {
            // the previous prompt and (almost all of) its answer come from the cache; only the new turn is decoded
            assert!(
                cache_n + MAX_TOKENS >= history,
                "turn {turn}: cache_n {cache_n}, history {history}\n{}",
                server.tail()
            );
            assert!(
                prompt_n <= TURN_MAX,
                "turn {turn}: {prompt_n} tokens prefilled\n{}",
                server.tail()
            );
        }
        // compressed after every prompt past the budget: the cells never hold more than one turn beyond it
        assert!(
            cells > 0 && cells as u64 <= BUDGET + PAD + MAX_TOKENS,
            "turn {turn}: {cells} cells"
        );
        max_cells = max_cells.max(cells);
        history = prompt_n + cache_n;
        assert!(
            n_tokens >= history,
            "turn {turn}: history {n_tokens} < prompt {history}"
        );
        messages.push(json!({"role": "assistant", "content": answer}));
        messages.push(user(QUESTIONS[(turn + 1) % QUESTIONS.len()]));
    }
    let (_, n_tokens_end) = slot(addr);
    assert!(
        n_tokens_end > 2 * max_cells as u64 && n_tokens_end > N_CTX,
        "history {n_tokens_end} tokens (context {N_CTX}) in at most {max_cells} cells"
    );
    let lines: Vec<Value> = std::fs::read_to_string(&stats)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines.len() > TURNS / 2,
        "{} compressions in {} turns",
        lines.len(),
        TURNS + 1
    );
    for s in &lines {
        assert!(s["cells_after"].as_u64().unwrap() <= BUDGET + PAD, "{s}");
    }
    assert_eq!(
        compressions(addr),
        lines.len() as u64,
        "/slots counts the slot's compressions"
    );
    assert!(server.log_has(0, "prefilled from there"), "{}", server.tail());

    // the last question asked again differently: prefilled from where it diverges, in the uncompressed tail
    let last = messages.len() - 1;
    messages[last] = user("Which city was the essay about?");
    let (_, prompt_n, cache_n) = chat(addr, &messages);
    assert!(
        cache_n + TURN_MAX >= history && prompt_n <= TURN_MAX,
        "regenerated: {prompt_n} prefilled, {cache_n} cached"
    );

    // another conversation in the only slot, then this one again: its state comes back from the RAM cache
    let other = [user(&format!(
        "Read this document.\n\n{}\n\nWho wrote it?",
        &doc[1000..]
    ))];
    let (_, prompt_other, cache_other) = chat(addr, &other);
    assert!(
        cache_other < 100 && prompt_other > 1000,
        "another conversation: {prompt_other} prefilled, {cache_other} cached"
    );
    let (_, prompt_n, cache_n) = chat(addr, &messages);
    assert!(
        cache_n + TURN_MAX >= history && prompt_n <= TURN_MAX,
        "back from the RAM cache: {prompt_n} prefilled, {cache_n} cached\n{}",
        server.tail()
    );

    // saved, erased, restored: the next turn reuses the restored history
    let (cells_saved, tokens_saved) = slot(addr);
    slot_action(addr, "save", json!({"filename": "chat.bin"}));
    slot_action(addr, "erase", json!({}));
    assert_eq!(slot(addr).0, 0, "erased");
    slot_action(addr, "restore", json!({"filename": "chat.bin"}));
    assert_eq!(slot(addr), (cells_saved, tokens_saved), "restored cells and history");
    let (answer, _, _) = chat(addr, &messages);
    messages.push(json!({"role": "assistant", "content": answer}));
    messages.push(user(QUESTIONS[1]));
    let (_, prompt_n, cache_n) = chat(addr, &messages);
    assert!(
        cache_n >= tokens_saved && prompt_n <= TURN_MAX,
        "after restore: {prompt_n} prefilled, {cache_n} cached"
    );

    // an edit inside the compressed document: an evicted token lies before it, so from scratch
    let from = server.log_len();
    let edited = user(&format!(
        "Read this document.\n\n{}EDITED{}\n\n{}",
        &doc[..4000],
        &doc[4000..],
        QUESTIONS[0]
    ));
    // the whole edited conversation from scratch does not fit the context: refused, naming the cells it needs
    messages[0] = edited.clone();
    let (status, body) = post_chat(addr, &messages);
    assert!(
        status == 400 && body.contains("cells with the compressed history"),
        "{status}: {body}"
    );
    // the edited first message alone fits
    messages.truncate(1);
    messages[0] = edited;
    let (_, prompt_n, cache_n) = chat(addr, &messages);
    assert_eq!(
        cache_n, 0,
        "an edit in the compressed document is prefilled from scratch ({prompt_n} tokens)"
    );
    assert_eq!(compressions(addr), 1, "prefilled from scratch, then compressed once");
    // (upstream's own check may get there first: when every position below the divergence was evicted by the
    // recompressions, the slot's lowest position is past it and the prompt is reset to 0)
    assert!(server.log_has(from, "prefilled from scratch"), "{}", server.tail());
    eprintln!("per turn (prompt_n, cache_n, cells, history tokens): {per_turn:?}");
}

/// Four slots share one unified cache of 4096 cells, less than two of the conversations below would need
/// uncompressed. Four conversations (each the document with its own first question, then 20 turns) run
/// interleaved, one request at a time, each pinned to its slot: every turn after a conversation's first reuses
/// its slot's compressed history and prefills only its new tokens, every slot stays under the trigger, and at
/// the end each history is longer than half the cache. `--cache-ram 0` keeps idle slots resident: with the RAM
/// prompt cache on (the default) llama-server clears a unified cache's idle slots into it when another slot
/// starts, and a slot pinned by `id_slot` then prefills from scratch, upstream too (a full-cache server with 2
/// slots: `cache_n` 0 on every turn; with `--cache-ram 0`, the whole history reused).
#[test]
fn four_slots_hold_compressed_chats_in_a_cache_too_small_for_two_uncompressed() {
    const N_SLOTS: usize = 4;
    const CACHE: u64 = 4096;
    let model = script_output("scripts/fetch-model.sh", &["smollm2"]);
    #[rustfmt::skip]
    let args = [
        "-m", model.to_str().unwrap(), "-t", "2", "--no-warmup", "-c", &CACHE.to_string(),
        "-np", &N_SLOTS.to_string(), "-kvu", "--cache-ram", "0",
        "--compresskv", "--compresskv-budget", &BUDGET.to_string(),
    ];
    let server = Server::start(&args, &[], "server-chat-4-slots.log");
    let addr = server.addr;
    let doc = document();
    let mut chats: Vec<Vec<Value>> = (0..N_SLOTS)
        .map(|i| {
            vec![user(&format!(
                "Read this document.\n\n{doc}\n\n{}",
                QUESTIONS[i % QUESTIONS.len()]
            ))]
        })
        .collect();
    let mut history = [0u64; N_SLOTS];
    for turn in 0..=TURNS {
        for (i, messages) in chats.iter_mut().enumerate() {
            let (answer, prompt_n, cache_n) = chat_to(addr, messages, i as i64);
            if turn == 0 {
                assert!(prompt_n > 1500, "slot {i}: the document, {prompt_n} tokens");
            } else {
                assert!(
                    cache_n + MAX_TOKENS >= history[i] && prompt_n <= TURN_MAX,
                    "slot {i} turn {turn}: {prompt_n} prefilled, {cache_n} cached of {}\n{}",
                    history[i],
                    server.tail()
                );
            }
            history[i] = prompt_n + cache_n;
            let cells = slots(addr);
            assert!(
                cells.iter().all(|&(c, _)| c as u64 <= BUDGET + PAD + MAX_TOKENS),
                "slot {i} turn {turn}: cells {cells:?}"
            );
            messages.push(json!({"role": "assistant", "content": answer}));
            messages.push(user(QUESTIONS[(i + turn + 1) % QUESTIONS.len()]));
        }
    }
    let end = slots(addr);
    assert!(
        end.iter().all(|&(_, n)| 2 * n > CACHE),
        "every history longer than half the cache: {end:?}"
    );
    let cells: i64 = end.iter().map(|&(c, _)| c).sum();
    eprintln!("4 slots: cells {cells} in all, per slot (cells, history tokens) {end:?}");
}
