//! Safe wrappers of the patched llama.cpp's `llama.h` for the two tools in `src/bin/` (`--features llama`):
//! the bindgen bindings that build.rs writes (the same ones tests/llama_api/ includes), a few ggml
//! functions the tools need beside them, and RAII types for the backend, a model, a context and a batch.
//!
//! Each tool includes this directory with `#[path]` (it is no module of the library: the library's
//! `libcompresskv.a` must not reference llama.cpp). All `unsafe` of the tools is here, in [`eval`] (the graph
//! evaluation callback) and in [`compress`] (the compresskv part of `llama.h`, kept apart because that API
//! is changing); the tools themselves are safe code.
//!
//! Invariants: a [`Model`], [`Context`] or [`Batch`] owns a non-null llama.cpp object and frees it once on
//! drop; a [`Context`] never outlives the [`Model`] it was created from (it borrows it).

// Both tools include this module; each uses a part of it.
#![allow(dead_code)]

pub mod compress;
pub mod eval;

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::marker::PhantomData;
use std::rc::Rc;

/// The bindings of `vendor/llama.cpp/include/llama.h` (build.rs, bindgen).
#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unnecessary_transmutes,
    clippy::all
)]
pub mod sys {
    include!(concat!(env!("OUT_DIR"), "/llama_sys.rs"));

    // ggml functions the tools call; bindgen's allowlist covers `llama_*` only (the types are among its output,
    // reached through llama.h). Signatures as in ggml.h and ggml-backend.h of the vendored llama.cpp.
    extern "C" {
        pub fn ggml_backend_tensor_get(
            tensor: *const ggml_tensor,
            data: *mut std::ffi::c_void,
            offset: usize,
            size: usize,
        );
        pub fn ggml_backend_tensor_set(
            tensor: *mut ggml_tensor,
            data: *const std::ffi::c_void,
            offset: usize,
            size: usize,
        );
        pub fn ggml_nelements(tensor: *const ggml_tensor) -> i64;
        pub fn ggml_is_contiguous(tensor: *const ggml_tensor) -> bool;
        pub fn ggml_type_name(t: ggml_type) -> *const std::ffi::c_char;
        pub fn ggml_row_size(t: ggml_type, ne: i64) -> usize;
        pub fn ggml_backend_dev_count() -> usize;
        pub fn ggml_backend_dev_get(index: usize) -> ggml_backend_dev_t;
        pub fn ggml_backend_dev_name(device: ggml_backend_dev_t) -> *const std::ffi::c_char;
        pub fn ggml_backend_dev_description(device: ggml_backend_dev_t) -> *const std::ffi::c_char;
        pub fn ggml_backend_dev_memory(device: ggml_backend_dev_t, free: *mut usize, total: *mut usize);
    }
}

pub use sys::llama_token as Token;

/// `ggml_type` (a KV cache element type).
pub type GgmlType = sys::ggml_type;
/// The f16 cache type (the tools' default) and f32 (the compaction check's).
pub const TYPE_F16: GgmlType = sys::ggml_type_GGML_TYPE_F16;
/// See [`TYPE_F16`].
pub const TYPE_F32: GgmlType = sys::ggml_type_GGML_TYPE_F32;

/// `%s` of a C string that may be null.
fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null C strings returned by llama.cpp/ggml are NUL-terminated and live at least as long as
    // this call (static tables, or objects the caller keeps alive).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The ggml type named `name` (`ggml_type_name`), as llama.cpp's `-ctk`/`-ctv` accept it.
pub fn type_from_name(name: &str) -> Option<GgmlType> {
    (0..sys::ggml_type_GGML_TYPE_COUNT).find(|&t| {
        // SAFETY: any value below GGML_TYPE_COUNT is accepted; the result is null or a static string.
        let p = unsafe { sys::ggml_type_name(t) };
        !p.is_null() && cstr(p) == name
    })
}

/// `ggml_type_name`.
pub fn type_name(t: GgmlType) -> String {
    // SAFETY: as in type_from_name (ggml returns "NONE" for out-of-range values).
    cstr(unsafe { sys::ggml_type_name(t) })
}

/// `ggml_row_size`: bytes of `ne` elements of type `t`.
pub fn row_size(t: GgmlType, ne: i64) -> usize {
    // SAFETY: a pure function of its arguments.
    unsafe { sys::ggml_row_size(t, ne) }
}

/// One ggml backend device (name, description, total memory).
pub struct Device {
    /// `ggml_backend_dev_name`.
    pub name: String,
    /// `ggml_backend_dev_description`.
    pub description: String,
    /// `ggml_backend_dev_memory`'s total.
    pub memory_total: usize,
}

/// The registered ggml backend devices.
pub fn devices() -> Vec<Device> {
    // SAFETY: the device registry is initialized statically by ggml; every index below the count is valid
    // and its device pointer lives as long as the process.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| {
                let dev = sys::ggml_backend_dev_get(i);
                let (mut free, mut total) = (0usize, 0usize);
                sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
                Device {
                    name: cstr(sys::ggml_backend_dev_name(dev)),
                    description: cstr(sys::ggml_backend_dev_description(dev)),
                    memory_total: total,
                }
            })
            .collect()
    }
}

/// `llama_print_system_info`.
pub fn system_info() -> String {
    // SAFETY: returns a static buffer.
    cstr(unsafe { sys::llama_print_system_info() })
}

/// The peak resident set of this process in KiB (`getrusage`), -1 if unknown.
#[allow(clippy::unnecessary_cast)]
pub fn peak_rss_kib() -> i64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one struct rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0 {
        // SAFETY: initialized by the successful call (and zeroed before it).
        unsafe { ru.assume_init() }.ru_maxrss as i64 // c_long: i64 on the 64-bit targets, i32 elsewhere
    } else {
        -1
    }
}

/// llama.cpp's log: warnings and errors (and their continuation lines) to stderr, the rest dropped.
unsafe extern "C" fn log_warnings(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if level >= sys::ggml_log_level_GGML_LOG_LEVEL_WARN && !text.is_null() {
        // SAFETY: llama.cpp passes a NUL-terminated message.
        eprint!("{}", unsafe { CStr::from_ptr(text) }.to_string_lossy());
    }
}

/// `llama_backend_init` with the log set to warnings only; `llama_backend_free` on drop.
pub struct Backend(());

impl Backend {
    /// Initialize the backends (once per process).
    pub fn init() -> Backend {
        // SAFETY: no arguments; log_warnings is a valid callback for the whole process.
        unsafe {
            sys::llama_backend_init();
            sys::llama_log_set(Some(log_warnings), std::ptr::null_mut());
        }
        Backend(())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: after every model and context (they borrow nothing from it, but the tools drop them first).
        unsafe { sys::llama_backend_free() }
    }
}

/// A loaded model (`llama_model_load_from_file`).
pub struct Model {
    ptr: *mut sys::llama_model,
}

impl Model {
    /// Load `path` with `n_gpu_layers` offloaded; None if llama.cpp cannot (it logged why).
    pub fn load(path: &str, n_gpu_layers: i32) -> Option<Model> {
        let c = CString::new(path).ok()?;
        // SAFETY: default parameters from llama.cpp; `c` outlives the call.
        let ptr = unsafe {
            let mut mp = sys::llama_model_default_params();
            mp.n_gpu_layers = n_gpu_layers;
            sys::llama_model_load_from_file(c.as_ptr(), mp)
        };
        (!ptr.is_null()).then_some(Model { ptr })
    }

    /// The raw pointer, for [`compress`] only.
    pub(crate) fn raw(&self) -> *mut sys::llama_model {
        self.ptr
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: a live model.
        unsafe { sys::llama_model_get_vocab(self.ptr) }
    }

    /// Tokens in the vocabulary.
    pub fn n_vocab(&self) -> i32 {
        // SAFETY: a live model's vocabulary.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) }
    }

    /// Whether `t` ends generation.
    pub fn is_eog(&self, t: Token) -> bool {
        // SAFETY: a live model's vocabulary; any token id is accepted.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), t) }
    }

    /// `llama_model_desc`.
    pub fn desc(&self) -> String {
        let mut buf = [0 as c_char; 256];
        // SAFETY: writes at most buf.len() bytes, NUL-terminated.
        unsafe { sys::llama_model_desc(self.ptr, buf.as_mut_ptr(), buf.len()) };
        cstr(buf.as_ptr())
    }

    /// Bytes of the weights.
    pub fn size(&self) -> u64 {
        // SAFETY: a live model.
        unsafe { sys::llama_model_size(self.ptr) }
    }

    /// Parameters.
    pub fn n_params(&self) -> u64 {
        // SAFETY: a live model.
        unsafe { sys::llama_model_n_params(self.ptr) }
    }

    /// `llama_tokenize` (empty if it fails).
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<Token> {
        let len = text.len() as i32;
        let p = text.as_ptr() as *const c_char;
        // SAFETY: `text` is readable for `len` bytes; a null output of size 0 asks for the count (negative).
        let n = -unsafe {
            sys::llama_tokenize(
                self.vocab(),
                p,
                len,
                std::ptr::null_mut(),
                0,
                add_special,
                parse_special,
            )
        };
        let mut out = vec![0 as Token; n.max(0) as usize];
        // SAFETY: `out` holds n tokens.
        if n > 0
            && unsafe { sys::llama_tokenize(self.vocab(), p, len, out.as_mut_ptr(), n, add_special, parse_special) }
                != n
        {
            out.clear();
        }
        out
    }

    /// The bytes of token `t` (`llama_token_to_piece`, specials not rendered, at most 256 bytes).
    pub fn piece(&self, t: Token) -> Vec<u8> {
        let mut buf = [0 as c_char; 256];
        // SAFETY: writes at most buf.len() bytes.
        let n = unsafe { sys::llama_token_to_piece(self.vocab(), t, buf.as_mut_ptr(), buf.len() as i32, 0, false) };
        buf[..n.max(0) as usize].iter().map(|&c| c as u8).collect()
    }

    /// `user` as the single user message of the model's default chat template with the assistant's turn
    /// opened: Ok(None) when the model has no template, Err when llama.cpp does not support it.
    pub fn apply_chat_template(&self, user: &str) -> Result<Option<String>, ()> {
        // SAFETY: a live model; the result is null or a string owned by the model.
        let tmpl = unsafe { sys::llama_model_chat_template(self.ptr, std::ptr::null()) };
        if tmpl.is_null() {
            return Ok(None);
        }
        let role = c"user";
        let content = CString::new(user).map_err(|_| ())?;
        let msg = sys::llama_chat_message {
            role: role.as_ptr(),
            content: content.as_ptr(),
        };
        let mut buf = vec![0u8; user.len() * 2 + 4096];
        for _ in 0..2 {
            // SAFETY: one message whose strings outlive the call; writes at most buf.len() bytes.
            let n = unsafe {
                sys::llama_chat_apply_template(tmpl, &msg, 1, true, buf.as_mut_ptr() as *mut c_char, buf.len() as i32)
            };
            if n < 0 {
                return Err(());
            }
            if n as usize <= buf.len() {
                buf.truncate(n as usize);
                return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
            }
            buf.resize(n as usize, 0);
        }
        Err(())
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: owned, freed once; every Context borrowing it is gone.
        unsafe { sys::llama_model_free(self.ptr) }
    }
}

/// Flash attention setting (`llama_flash_attn_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashAttn {
    /// Enabled.
    On,
    /// Disabled (the softmax is a graph node of its own).
    Off,
    /// llama.cpp decides.
    Auto,
}

/// The context parameters the tools set (the rest are llama.cpp's defaults).
#[derive(Clone, Debug)]
pub struct ContextParams {
    /// Cells.
    pub n_ctx: u32,
    /// Logical batch.
    pub n_batch: u32,
    /// Physical batch.
    pub n_ubatch: u32,
    /// Threads for decoding and for batches.
    pub n_threads: i32,
    /// Flash attention.
    pub flash_attn: FlashAttn,
    /// K cache type.
    pub type_k: GgmlType,
    /// V cache type.
    pub type_v: GgmlType,
}

/// A context of one sequence (`n_seq_max` 1, no perf counters) on a borrowed model.
pub struct Context<'m> {
    ptr: *mut sys::llama_context,
    // The evaluation callback's state: the C side holds a pointer to the inner Rc (boxed: a stable, thin
    // address) until llama_free, which Drop calls before the fields are dropped.
    _observer: Option<Box<Rc<RefCell<dyn eval::Observer>>>>,
    _model: PhantomData<&'m Model>,
}

impl<'m> Context<'m> {
    /// A context, with `observer` called back on the graph's nodes during every decode; None if llama.cpp
    /// cannot create it (it logged why).
    pub fn new(model: &'m Model, p: &ContextParams, observer: Option<Rc<RefCell<dyn eval::Observer>>>) -> Option<Self> {
        let observer = observer.map(Box::new);
        // SAFETY: default parameters from llama.cpp; the callback's user data points into `observer`, which
        // the returned Context keeps alive until after llama_free.
        let ptr = unsafe {
            let mut cp = sys::llama_context_default_params();
            cp.n_ctx = p.n_ctx;
            cp.n_batch = p.n_batch;
            cp.n_ubatch = p.n_ubatch;
            cp.n_seq_max = 1;
            cp.n_threads = p.n_threads;
            cp.n_threads_batch = p.n_threads;
            cp.flash_attn_type = match p.flash_attn {
                FlashAttn::On => sys::llama_flash_attn_type_LLAMA_FLASH_ATTN_TYPE_ENABLED,
                FlashAttn::Off => sys::llama_flash_attn_type_LLAMA_FLASH_ATTN_TYPE_DISABLED,
                FlashAttn::Auto => sys::llama_flash_attn_type_LLAMA_FLASH_ATTN_TYPE_AUTO,
            };
            cp.type_k = p.type_k;
            cp.type_v = p.type_v;
            cp.no_perf = true;
            if let Some(o) = &observer {
                cp.cb_eval = Some(eval::trampoline);
                cp.cb_eval_user_data = eval::user_data(o.as_ref());
            }
            sys::llama_init_from_model(model.ptr, cp)
        };
        (!ptr.is_null()).then_some(Context {
            ptr,
            _observer: observer,
            _model: PhantomData,
        })
    }

    /// The raw pointer, for [`compress`] only.
    pub(crate) fn raw(&self) -> *mut sys::llama_context {
        self.ptr
    }

    /// Cells of the context.
    pub fn n_ctx(&self) -> u32 {
        // SAFETY: a live context.
        unsafe { sys::llama_n_ctx(self.ptr) }
    }

    /// `llama_decode`: 0 on success.
    pub fn decode(&mut self, batch: &Batch) -> i32 {
        // SAFETY: a live context; the batch's arrays hold its n_tokens entries (Batch::set keeps that).
        unsafe { sys::llama_decode(self.ptr, batch.raw) }
    }

    /// Wait for the backends.
    pub fn synchronize(&mut self) {
        // SAFETY: a live context.
        unsafe { sys::llama_synchronize(self.ptr) }
    }

    /// The logits of the last output row (`n_vocab` values).
    pub fn last_logits(&self, n_vocab: i32) -> &[f32] {
        // SAFETY: a live context; the result is null or n_vocab floats owned by the context, valid until the
        // next decode (which needs &mut self, so not while this borrow lives).
        unsafe {
            let p = sys::llama_get_logits_ith(self.ptr, -1);
            assert!(
                !p.is_null(),
                "llama_get_logits_ith(-1): the last decode produced no logits"
            );
            std::slice::from_raw_parts(p, n_vocab as usize)
        }
    }

    /// Clear the memory (`data`: the buffers too).
    pub fn memory_clear(&mut self, data: bool) {
        // SAFETY: a live context and its memory.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ptr), data) }
    }

    /// Remove positions [p0, p1) of sequence `seq` (p1 < 0: to the end).
    pub fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        // SAFETY: a live context and its memory.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.ptr), seq, p0, p1) }
    }

    /// The state of sequence `seq` (`llama_state_seq_get_data`), None if the copy is short.
    pub fn state_seq_get(&mut self, seq: i32) -> Option<Vec<u8>> {
        // SAFETY: a live context; `buf` holds the size llama.cpp asked for.
        unsafe {
            let mut buf = vec![0u8; sys::llama_state_seq_get_size(self.ptr, seq)];
            let n = sys::llama_state_seq_get_data(self.ptr, buf.as_mut_ptr(), buf.len(), seq);
            (n == buf.len()).then_some(buf)
        }
    }

    /// Restore sequence `seq` from [`Context::state_seq_get`]'s bytes: the bytes read, 0 on failure.
    pub fn state_seq_set(&mut self, data: &[u8], seq: i32) -> usize {
        // SAFETY: a live context; `data` readable for its length.
        unsafe { sys::llama_state_seq_set_data(self.ptr, data.as_ptr(), data.len(), seq) }
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: owned, freed once, before the observer the callback points to is dropped.
        unsafe { sys::llama_free(self.ptr) }
    }
}

/// A token batch of sequence 0 (`llama_batch_init` with room for `capacity` tokens).
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
}

impl Batch {
    /// Room for `capacity` tokens (at least one).
    pub fn new(capacity: usize) -> Batch {
        let capacity = capacity.max(1);
        // SAFETY: token ids (no embeddings), one sequence id per token.
        let raw = unsafe { sys::llama_batch_init(capacity as i32, 0, 1) };
        Batch { raw, capacity }
    }

    /// The tokens `tokens` of sequence 0 at positions `pos0..`; logits for the token at index `logits_at`
    /// only (None: for none).
    pub fn set(&mut self, tokens: &[Token], pos0: i32, logits_at: Option<usize>) {
        let n = tokens.len();
        assert!(n <= self.capacity, "batch of {n} tokens, capacity {}", self.capacity);
        // SAFETY: llama_batch_init allocated `capacity` entries in every array and one seq id per entry.
        unsafe {
            let token = std::slice::from_raw_parts_mut(self.raw.token, n);
            let pos = std::slice::from_raw_parts_mut(self.raw.pos, n);
            let n_seq = std::slice::from_raw_parts_mut(self.raw.n_seq_id, n);
            let seq = std::slice::from_raw_parts_mut(self.raw.seq_id, n);
            let logits = std::slice::from_raw_parts_mut(self.raw.logits, n);
            for j in 0..n {
                token[j] = tokens[j];
                pos[j] = pos0 + j as i32;
                n_seq[j] = 1;
                *seq[j] = 0;
                logits[j] = (Some(j) == logits_at) as i8;
            }
        }
        self.raw.n_tokens = n as i32;
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: owned, freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

/// The index of the largest value (the first of equal ones).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for i in 1..v.len() {
        if v[i] > v[best] {
            best = i;
        }
    }
    best
}

/// The command line with llama.cpp's multi-letter single-dash options (`-ngl`, `-fa`, ...), which clap has no
/// form for, replaced by their long names (`legacy`: pairs of the old and the long spelling). Only whole
/// arguments equal to an old spelling change (an option's value, such as a file named `-ngl`, would too).
pub fn args_with_long_names(legacy: &[(&str, &str)]) -> Vec<std::ffi::OsString> {
    std::env::args_os()
        .map(|a| match legacy.iter().find(|(old, _)| a == *old) {
            Some((_, long)) => (*long).into(),
            None => a,
        })
        .collect()
}

/// A non-negative integer option value no larger than 2^30 (what the tools' C++ versions accepted).
pub fn parse_count(s: &str) -> Result<i32, String> {
    match s.parse::<i64>() {
        Ok(x) if (0..=1 << 30).contains(&x) => Ok(x as i32),
        _ => Err(format!("'{s}' is not a non-negative integer")),
    }
}

/// `value` as JSON indented by one space per level (nlohmann's `dump(1)`, the C++ tools' format).
pub fn to_json_indent1<T: serde::Serialize>(value: &T) -> String {
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, serde_json::ser::PrettyFormatter::with_indent(b" "));
    value.serialize(&mut ser).expect("plain data serializes");
    String::from_utf8(buf).expect("serde_json writes UTF-8")
}

/// Seconds since an arbitrary fixed point (a monotonic clock).
pub fn now_s() -> f64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T0.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
}
