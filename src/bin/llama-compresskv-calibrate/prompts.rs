//! The calibration's prompts (JSON lines of scripts/calib-data.py) and the ROUGE-1 recall of an answer.
//!
//! A line holds `id`, `pre`, `span` and `post` (strings; optional `set`, `answer` and `meta`). The user
//! message `pre + span + post` is put in the model's chat template (plain text and a newline for a model
//! without one) and tokenized piecewise, so that the span's token positions are known.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::common::{Model, Token};

/// One needle probe or calibration sample, tokenized.
pub struct Prompt {
    /// Unique within its file.
    pub id: String,
    /// The data set (layer weights are averaged over sets); "default" if the line names none.
    pub set: String,
    /// The whole prompt.
    pub tokens: Vec<Token>,
    /// The answer span [span_begin, span_end) in `tokens` (empty is refused for probes).
    pub span_begin: usize,
    /// See `span_begin`.
    pub span_end: usize,
    /// The reference answer (the span's text if the line gives none).
    pub answer: String,
    /// Free-form, copied into the state records.
    pub meta: Value,
}

fn string_field(j: &HashMap<String, Value>, name: &str) -> Result<Option<String>, String> {
    match j.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!("the field {name} must be a string, not {v}")),
    }
}

fn build_prompt(model: &Model, line: &str) -> Result<Prompt, String> {
    let j: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let obj: HashMap<String, Value> = match j {
        Value::Object(m) => m.into_iter().collect(),
        _ => HashMap::new(),
    };
    if !["id", "pre", "span", "post"].iter().all(|k| obj.contains_key(*k)) {
        return Err("a prompt needs the fields id, pre, span and post".into());
    }
    let get = |k: &str| string_field(&obj, k).map(|v| v.unwrap_or_default());
    let (id, pre, span, post) = (get("id")?, get("pre")?, get("span")?, get("post")?);
    let set = string_field(&obj, "set")?.unwrap_or_else(|| "default".into());
    let answer = string_field(&obj, "answer")?.unwrap_or_else(|| span.clone());
    let meta = obj
        .get("meta")
        .cloned()
        .unwrap_or_else(|| Value::Object(Default::default()));
    let user = format!("{pre}{span}{post}");

    let (prefix, suffix) = match model.apply_chat_template(&user) {
        Err(()) => return Err("the model's chat template is not supported by llama_chat_apply_template".into()),
        Ok(None) => (String::new(), "\n".to_string()),
        Ok(Some(chat)) => match chat.find(&user) {
            None => return Err("the chat template changed the message text".into()),
            Some(at) => (chat[..at].to_string(), chat[at + user.len()..].to_string()),
        },
    };
    let mut tokens = model.tokenize(&prefix, true, true);
    tokens.extend(model.tokenize(&pre, false, false));
    let span_begin = tokens.len();
    tokens.extend(model.tokenize(&span, false, false));
    let span_end = tokens.len();
    tokens.extend(model.tokenize(&post, false, false));
    tokens.extend(model.tokenize(&suffix, false, true));
    Ok(Prompt {
        id,
        set,
        tokens,
        span_begin,
        span_end,
        answer,
        meta,
    })
}

/// The prompts of the JSON-lines file `path` (the first `max_n` if > 0); Err: the message to print.
pub fn read_prompts(model: &Model, path: &str, max_n: usize) -> Result<Vec<Prompt>, String> {
    let text = std::fs::read(path).map_err(|_| format!("cannot read {path}"))?;
    let text = String::from_utf8_lossy(&text);
    let mut out: Vec<Prompt> = Vec::new();
    let mut ids = HashSet::new();
    for (i, line) in text.split('\n').enumerate() {
        let lineno = i + 1;
        if line.is_empty() {
            continue;
        }
        let p = build_prompt(model, line).map_err(|why| format!("{path}:{lineno}: {why}"))?;
        if !ids.insert(p.id.clone()) {
            return Err(format!("{path}:{lineno}: duplicate id '{}'", p.id));
        }
        out.push(p);
        if max_n > 0 && out.len() >= max_n {
            break;
        }
    }
    if out.is_empty() {
        return Err(format!("{path} holds no prompts"));
    }
    Ok(out)
}

/// The lower-cased ASCII alphanumeric words of `s`.
fn words(s: &[u8]) -> Vec<Vec<u8>> {
    s.split(|c| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_ascii_lowercase())
        .collect()
}

/// ROUGE-1 recall of `hyp` against `reference` (clipped unigram counts); 0 for an empty reference.
pub fn rouge1_recall(hyp: &[u8], reference: &[u8]) -> f64 {
    let r = words(reference);
    if r.is_empty() {
        return 0.0;
    }
    let mut hc: HashMap<Vec<u8>, usize> = HashMap::new();
    for w in words(hyp) {
        *hc.entry(w).or_default() += 1;
    }
    let mut hit = 0;
    for w in &r {
        if let Some(c) = hc.get_mut(w) {
            if *c > 0 {
                *c -= 1;
                hit += 1;
            }
        }
    }
    hit as f64 / r.len() as f64
}

#[cfg(test)]
mod tests {
    use super::rouge1_recall;

    #[test]
    fn rouge1_counts_clipped_lowercase_words() {
        assert_eq!(rouge1_recall(b"The answer is Paris.", b"paris"), 1.0);
        assert_eq!(rouge1_recall(b"a a", b"a a a b"), 0.5);
        assert_eq!(rouge1_recall(b"x", b"!!"), 0.0);
    }
}
