//! The compresskv part of `llama.h`, and the only place the tools touch it: `llama_kv_compress` (with an
//! options string the library parses), `llama_kv_compress_option`, `llama_kv_compress_n_cells` and
//! `llama_kv_compress_model_info_get`. The tools see [`Options`], [`compress`], [`n_cells`], [`model_info`]
//! and [`defaults`].
//!
//! The tools score with the CompressKV paper's selection (`preset=paper`: the last 8 tokens, pooling 5,
//! single tokens), as they always have: their rows measure speed and exactness, not the product defaults.

use std::ffi::{c_char, CString};

use super::{sys, Context, Model, Token};

/// The compression method: the library's one table of methods and their names.
pub use compresskv::plan::Method;

/// Where the evicted cells go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// The library's default.
    Default,
    /// Compacted, every layer keeping the largest layer budget (the fill form).
    Compact,
    /// The reference: evicted cells hidden per layer in place, nothing moved.
    Masked,
}

/// One compression's settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Method.
    pub method: Method,
    /// Cells kept per layer, window included.
    pub budget: i32,
    /// Model profile JSON file (None: looked up for the model, else all-head scoring).
    pub profile: Option<String>,
    /// Where the evicted cells go.
    pub form: Form,
    /// One selection per KV head.
    pub per_head: bool,
    /// A file the compression appends its stats line to.
    pub stats: Option<String>,
}

/// The library's default scoring settings (recorded in the tools' JSON).
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    /// Observation window.
    pub window: i32,
    /// Pooling kernel.
    pub pool: i32,
    /// Selection chunk (0: token level).
    pub chunk: i32,
}

/// The options every tool run starts from.
const BASE: &str = "preset=paper;form=fill";

/// The value option `key` takes in `options`, from the library.
pub fn option(options: &str, key: &str) -> String {
    let (o, k) = (CString::new(options).expect("options"), CString::new(key).expect("key"));
    let mut buf = [0 as c_char; 256];
    // SAFETY: NUL-terminated strings and a buffer of the size given; the library writes a NUL-terminated string.
    let rc = unsafe { sys::llama_kv_compress_option(o.as_ptr(), k.as_ptr(), buf.as_mut_ptr(), buf.len()) };
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    assert!(rc == 0, "llama_kv_compress_option({options:?}, {key:?}): {text}");
    text
}

/// The window, pool and chunk the tools score with.
pub fn defaults() -> Defaults {
    let get = |k: &str| option(BASE, k).parse().unwrap_or(0);
    Defaults {
        window: get("window"),
        pool: get("pool"),
        chunk: get("chunk"),
    }
}

/// The options string of `o`.
fn options_text(o: &Options) -> String {
    let method = o.method.name();
    let mut s = format!("{BASE};method={method};budget={}", o.budget);
    match o.form {
        Form::Default | Form::Compact => {}
        Form::Masked => s.push_str(";form=mask"),
    }
    if let Some(p) = &o.profile {
        s.push_str(&format!(";profile={p}"));
    }
    if o.per_head {
        s.push_str(";per_head=1");
    }
    if let Some(p) = &o.stats {
        s.push_str(&format!(";stats={p}"));
    }
    s
}

/// Compress the cache of sequence `seq`, whose last tokens are `tokens`: 0 compressed, 1 nothing to do,
/// negative on error (see `llama_kv_compress` in llama.h).
pub fn compress(ctx: &mut Context<'_>, seq: i32, tokens: &[Token], o: &Options) -> i32 {
    compress_raw(ctx, seq, tokens, &[], &options_text(o))
}

/// Compress with a raw options string and a probe decoded after the sequence (`llama_kv_compress`'s own
/// arguments; the calibration's reconstruction passes): 0 compressed, 1 nothing to do, negative on error.
pub fn compress_raw(ctx: &mut Context<'_>, seq: i32, tokens: &[Token], probe: &[Token], options: &str) -> i32 {
    let opts = CString::new(options).expect("options without NUL");
    let probe_ptr = if probe.is_empty() {
        std::ptr::null()
    } else {
        probe.as_ptr()
    };
    // SAFETY: the options string outlives the call; `tokens` and `probe` (null when empty) are readable for
    // their lengths; a live context, used by this thread only.
    unsafe {
        sys::llama_kv_compress(
            ctx.raw(),
            seq,
            tokens.as_ptr(),
            tokens.len() as i32,
            probe_ptr,
            probe.len() as i32,
            opts.as_ptr(),
        )
    }
}

/// The cells sequence `seq` occupies (-1: an invalid sequence or a memory compresskv does not handle).
pub fn n_cells(ctx: &mut Context<'_>, seq: i32) -> i32 {
    // SAFETY: a live context.
    unsafe { sys::llama_kv_compress_n_cells(ctx.raw(), seq) }
}

/// The identity a compresskv profile records for a model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// GGUF `general.architecture`.
    pub arch: String,
    /// Layers.
    pub n_layer: i32,
    /// Query heads.
    pub n_head: i32,
    /// KV heads.
    pub n_head_kv: i32,
    /// Head dimension.
    pub head_dim: i32,
    /// Metadata fingerprint (16 hex digits).
    pub fingerprint: String,
}

/// The identity of `model`.
pub fn model_info(model: &Model) -> ModelInfo {
    // SAFETY: a live model; the struct is plain data, filled by the call.
    let i = unsafe {
        let mut i = std::mem::zeroed::<sys::llama_kv_compress_model_info>();
        sys::llama_kv_compress_model_info_get(model.raw(), &mut i);
        i
    };
    let text = |b: &[c_char]| {
        let bytes: Vec<u8> = b.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    ModelInfo {
        arch: text(&i.arch),
        n_layer: i.n_layer,
        n_head: i.n_head,
        n_head_kv: i.n_head_kv,
        head_dim: i.head_dim,
        fingerprint: text(&i.fingerprint),
    }
}
