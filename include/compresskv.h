/*
 * compresskv.h - C ABI of the compresskv library (KV-cache compression after CompressKV,
 * arXiv 2508.02401) for llama.cpp/ggml-shaped KV buffers.
 *
 * Conventions
 * - Every function that can fail returns a ckv_status; CKV_OK (0) is success. On failure a readable
 *   message is available from ckv_last_error() on the same thread until the next failing call.
 * - A call that fails writes nothing to the caller's buffers and leaves any handle it was given as it was.
 * - No call panics or unwinds across this boundary; an internal bug is reported as CKV_ERR_PANIC.
 * - Handles (ckv_plan, ckv_profile) are opaque; free them with their *_free function (NULL is allowed).
 *   A handle may be used from one thread at a time; distinct handles are independent.
 * - Token i of a sequence is its i-th token in position order; cells[i] is the KV-cache cell holding it.
 * - Structs that may grow carry a leading `size` field: set it to sizeof(the struct) (the
 *   *_default functions do), so that older callers keep working with newer libraries.
 */
#ifndef COMPRESSKV_H
#define COMPRESSKV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CKV_VERSION_MAJOR 0
#define CKV_VERSION_MINOR 1
#define CKV_VERSION_PATCH 0

/* Status codes. */
typedef enum ckv_status {
    CKV_OK                   = 0,
    CKV_ERR_NULL             = 1, /* a required pointer is NULL                       */
    CKV_ERR_INVALID_ARG      = 2, /* a value is out of range or inconsistent          */
    CKV_ERR_UNSUPPORTED_TYPE = 3, /* element type not supported for this operation    */
    CKV_ERR_SIZE             = 4, /* a buffer is smaller than its declared geometry   */
    CKV_ERR_PROFILE          = 5, /* profile unreadable or for another model          */
    CKV_ERR_IO               = 6, /* a file could not be read or written              */
    CKV_ERR_ALLOC            = 7, /* out of memory                                    */
    CKV_ERR_PANIC            = 8, /* internal error caught at the boundary (a bug)    */
} ckv_status;

/* Element types: the values are ggml's `enum ggml_type` ids. */
typedef enum ckv_type {
    CKV_TYPE_F32    = 0,
    CKV_TYPE_F16    = 1,
    CKV_TYPE_Q4_0   = 2,
    CKV_TYPE_Q4_1   = 3,
    CKV_TYPE_Q5_0   = 6,
    CKV_TYPE_Q5_1   = 7,
    CKV_TYPE_Q8_0   = 8,
    CKV_TYPE_IQ4_NL = 20,
    CKV_TYPE_BF16   = 30,
} ckv_type;

typedef enum ckv_method {
    CKV_METHOD_COMPRESSKV   = 0, /* SRH scoring + error-weighted budgets (needs a profile)  */
    CKV_METHOD_SNAPKV       = 1, /* all query heads, uniform budgets                        */
    CKV_METHOD_PYRAMIDKV    = 2, /* all query heads, pyramid budgets                        */
    CKV_METHOD_STREAMINGLLM = 3, /* sink + recent tokens, no scoring                        */
    CKV_METHOD_SNAPKV_SRH   = 4, /* ablation: the profile's SRHs, uniform budgets (needs one) */
    CKV_METHOD_GATE         = 5, /* query-agnostic: the profile's key gate, no queries (needs one) */
} ckv_method;

typedef enum ckv_pool {
    CKV_POOL_AVG = 0,
    CKV_POOL_MAX = 1,
} ckv_pool;

/* Budget allocations for ckv_budget_allocate. */
typedef enum ckv_alloc {
    CKV_ALLOC_UNIFORM  = 0,
    CKV_ALLOC_PYRAMID  = 1,
    CKV_ALLOC_WEIGHTED = 2,
} ckv_alloc;

/* Parameters of one compression. Initialise with ckv_params_default(). */
typedef struct ckv_params {
    size_t     size;         /* sizeof(ckv_params)                                            */
    ckv_method method;       /* default CKV_METHOD_COMPRESSKV                                 */
    int32_t    budget;       /* average kept tokens per layer, window included; 0: use ratio  */
    float      ratio;        /* fraction of the prompt kept when budget == 0, in (0, 1]       */
    int32_t    window;       /* observation window length w (default 8)                       */
    int32_t    window_end;   /* token index where the window ends (exclusive); -1: prompt end.
                                Tokens in [window_end, n) are always kept.                    */
    int32_t    n_sink;       /* first tokens always kept (default 0; StreamingLLM uses 4 if 0) */
    int32_t    pool_kernel;  /* pooling kernel, odd; 1 = none (default 5)                     */
    ckv_pool   pool;         /* default CKV_POOL_AVG                                          */
    int32_t    chunk;        /* whole-span selection chunk; 0 or 1 = token level (default 0)   */
    int32_t    n_srh;        /* SRHs per layer for CompressKV (default 4)                     */
    int32_t    per_head;     /* 1: one token set per KV head; 0: per layer (default 0)        */
    int32_t    fill;         /* 1: every layer keeps max budget (fill form); 0: exact form    */
    int32_t    floor;        /* weighted allocation floor (default 32)                        */
    float      pyramid_beta; /* PyramidKV beta (default 20)                                   */
    ckv_pool   head_reduce;  /* how the pooled scores of a token set's heads combine: their
                                mean (CKV_POOL_AVG, default) or their maximum (CKV_POOL_MAX)   */
} ckv_params;

/* One layer's K or V buffer, as llama.cpp stores it. */
typedef struct ckv_buffer {
    void *  data;       /* base of the layer's (stream's) buffer                               */
    size_t  size;       /* bytes available from data                                           */
    int32_t type;       /* ckv_type                                                            */
    int32_t n_embd;     /* elements per cell: n_head_kv * head_dim                             */
    int32_t n_cells;    /* cells in the buffer (kv_size)                                       */
    int32_t transposed; /* 0: one row per cell; 1: one row per channel (V without flash attn)  */
    size_t  stride;     /* bytes between rows (cells, or channels when transposed); 0: packed  */
} ckv_buffer;

/* Attention shape of the model. */
typedef struct ckv_shape {
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;
} ckv_shape;

/* The model a profile is checked against. */
typedef struct ckv_model_desc {
    const char * arch;        /* GGUF general.architecture                          */
    ckv_shape    shape;
    const char * fingerprint; /* ckv_fingerprint() of the model's canonical metadata */
} ckv_model_desc;

typedef struct ckv_plan    ckv_plan;
typedef struct ckv_profile ckv_profile;

/* Library version, "MAJOR.MINOR.PATCH". Never NULL. */
const char * ckv_version(void);

/* Message of the last failing call on this thread ("" if none). Valid until the next call on this thread. */
const char * ckv_last_error(void);

/* Name of a status code ("CKV_OK", ...). Never NULL. */
const char * ckv_status_name(ckv_status status);

/* Fill *params with the defaults. */
ckv_status ckv_params_default(ckv_params * params);

/* Method from its name ("compresskv", "snapkv", "pyramidkv", "streamingllm"). */
ckv_status ckv_method_from_name(const char * name, ckv_method * out);

/* 64-bit FNV-1a of `meta` as 16 hex digits into buf (at least 17 bytes). */
ckv_status ckv_fingerprint(const char * meta, char * buf, size_t buf_size);

/* Dequantize n elements of type `type` from src (src_size bytes, exactly the row's size) to dst. */
ckv_status ckv_dequantize_row(int32_t type, const void * src, size_t src_size, float * dst, int32_t n);

/* Per-layer budgets for an average of `avg` tokens per layer; `weights` (n_layer values) only for
 * CKV_ALLOC_WEIGHTED, `beta` only for CKV_ALLOC_PYRAMID. Writes n_layer values to out. */
ckv_status ckv_budget_allocate(ckv_alloc alloc, int32_t avg, int32_t n_layer, int32_t floor, float beta,
                               const double * weights, int32_t * out);

/* The average budget to ask for so that the largest layer budget of params->method fits `slots` cells (the
 * memory, in a cache whose layers share cells): its allocation is weighted by `profile` (CompressKV with a
 * profile), the pyramid (PyramidKV) or uniform (then *out == slots). Found by bisection; at least 1. */
ckv_status ckv_budget_fit(const ckv_params * params, const ckv_profile * profile, int32_t n_layer, int32_t slots,
                          int32_t * out);

/* Load a profile from a JSON file or string and check it against `model` (NULL: no check). */
ckv_status ckv_profile_load(const char * path, const ckv_model_desc * model, ckv_profile ** out);
ckv_status ckv_profile_parse(const char * json, size_t len, const ckv_model_desc * model, ckv_profile ** out);
void       ckv_profile_free(ckv_profile * profile);

/* Find the profile for `model` (required) among the *.json files directly in the directory `dir`: the files
 * are tried in sorted name order and the first whose model matches is loaded; files that cannot be read or
 * parsed are passed over. On success *out is a new handle (free it with ckv_profile_free) and the matched
 * file's path (dir/name) is written NUL-terminated to path_buf, unless path_buf is NULL with path_buf_size 0
 * (path not wanted); CKV_ERR_SIZE if it does not fit (then no handle is made). No match: CKV_ERR_PROFILE,
 * with a message listing each file examined and why it was passed over; dir missing or unreadable:
 * CKV_ERR_IO. On failure *out is left as it was. */
ckv_status ckv_profile_find(const char * dir, const ckv_model_desc * model, char * path_buf, size_t path_buf_size,
                            ckv_profile ** out);

/* Plan the compression of one sequence of n_tokens tokens.
 * - cells:   n_tokens cell indices, token order (positions ascending), distinct, < keys[l].n_cells
 * - keys:    shape.n_layer K buffers
 * - queries: shape.n_layer pointers, each to window * n_head * head_dim floats laid out
 *            [window][n_head][head_dim] (post-RoPE, rotated like the keys). May be NULL for StreamingLLM.
 * - profile: may be NULL (CompressKV then scores with all heads and uniform budgets; see
 *            ckv_plan_fallback).
 * Reads the buffers, writes none of them. */
ckv_status ckv_plan_create(const ckv_params * params, const ckv_shape * shape, const ckv_profile * profile,
                           const int32_t * cells, int32_t n_tokens, const ckv_buffer * keys,
                           const float * const * queries, ckv_plan ** out);
void       ckv_plan_free(ckv_plan * plan);

/* Cells the sequence occupies after compaction (max kept over layers and groups).
 * These three return -1 (and set ckv_last_error) if plan is NULL or not a live plan. */
int32_t    ckv_plan_n_slots(const ckv_plan * plan);
/* Groups per layer: 1, or n_head_kv with per-head selection. */
int32_t    ckv_plan_n_groups(const ckv_plan * plan);
/* 1 if CompressKV had no profile and fell back to all-head scoring. */
int32_t    ckv_plan_fallback(const ckv_plan * plan);

/* Kept tokens of layer il, group ig. Pointers stay valid until ckv_plan_free. kept: token indices
 * (ascending); src: their current cells; dst: the cells they move to. Any out pointer may be NULL. */
ckv_status ckv_plan_group(const ckv_plan * plan, int32_t il, int32_t ig, int32_t * n_kept,
                          const int32_t ** kept, const int32_t ** src, const int32_t ** dst);

/* Budget of layer il before fill. */
ckv_status ckv_plan_budget(const ckv_plan * plan, int32_t il, int32_t * out);

/* Move the kept cells of every layer in place: k[l] and, if v is not NULL, v[l] for l < n_layer.
 * Validates every move of every layer first: on error nothing was written. */
ckv_status ckv_compact(const ckv_plan * plan, const ckv_buffer * k, const ckv_buffer * v);

/* The gather that moves the kept cells of layer il in one tensor of stream strm on a device, as index pairs of
 * a get_rows / set_rows pair over units of the tensor: rows (transposed 0: K, or V with flash attention) have
 * ckv_plan_n_groups units per cell, unit (strm*kv_size + cell)*n_groups + group, one group's slice of the row;
 * a transposed V (transposed 1, n_embd channels) has one unit per element, unit (strm*n_embd + channel)*kv_size
 * + cell. The pairs come in blocks of at most max_units units (INT32_MAX: every index fits int32_t): block b
 * covers units [base, base + span) and its n pairs, src[first ..] and dst[first ..], are relative to base.
 * Call it once with blocks, src and dst NULL for *n_blocks and *n_pairs, then with arrays that large. */
typedef struct ckv_gather_block {
    int64_t base;     /* first unit of the block                  */
    int64_t span;     /* units it covers                          */
    int64_t first;    /* its first pair in src / dst              */
    int32_t n;        /* its pairs                                */
    int32_t reserved; /* 0                                        */
} ckv_gather_block;

ckv_status ckv_plan_gather(const ckv_plan * plan, int32_t il, int32_t transposed, int64_t n_embd, int64_t kv_size,
                           int32_t strm, int64_t max_units, ckv_gather_block * blocks, int32_t cap_blocks,
                           int32_t * src, int32_t * dst, int64_t cap_pairs, int32_t * n_blocks, int64_t * n_pairs);

/* 64-bit FNV-1a, as 16 hex digits into buf (at least 17 bytes), of the bytes of cells[0..n_cells) in k[l] then
 * v[l] for every layer l < n_layer in order (tests: compares compaction paths byte for byte). */
ckv_status ckv_checksum(const ckv_buffer * k, const ckv_buffer * v, int32_t n_layer, const int32_t * cells,
                        int32_t n_cells, char * buf, size_t buf_size);

/* The plan as a JSON object (method, n_prompt, budget, window, pool, chunk, layers[{budget, kept}],
 * ms_score, ...) into buf. *needed gets the length without the NUL; if buf_size <= *needed, nothing is
 * written and CKV_ERR_SIZE is returned (buf may then be NULL). needed may be NULL. */
ckv_status ckv_plan_stats_json(const ckv_plan * plan, char * buf, size_t buf_size, size_t * needed);

/* ---- Options and requests: the policy of one compression of a llama.cpp sequence ----
 *
 * Options are "key=value" entries separated by ';' or newlines, later entries overriding earlier ones:
 * method (compresskv, snapkv, pyramidkv, streamingllm, snapkv-srh, gate), budget (cells kept per layer, window
 * included), ratio (fraction of the sequence, in (0, 1]; instead of budget), budget_avg (0/1: the budget is
 * the paper's average over layers), window, anchor (end, question), window_end (a position), pool (odd),
 * chunk (0: single tokens), sink, per_head (0/1), head_reduce (mean, max: how the scores of a token set's
 * heads combine), form (fill, exact, mask), preset (paper, default),
 * profile (a path), stats (a path: one JSON line per compression is appended), overflow (recent, question,
 * probe), reconstruct (0/1), gate_stats (a path: calibration of the key gate; ckv_request_plan_scored with keys adds
 * each scored layer's keys and scores to the statistics in that file), scores (a path: a missing file gets this
 * compression's raw scores, an existing one gives them instead of scoring, a reconstruction included: for
 * benchmarks that compare budgets and selections on one scoring of the same sequence). Every default is defined once, in the
 * library: ckv_option_get(NULL, key, ...) gives it. */

typedef struct ckv_request ckv_request;

typedef enum ckv_form {
    CKV_FORM_FILL  = 0, /* every layer keeps the largest layer budget */
    CKV_FORM_EXACT = 1, /* per-layer budgets, cells above a layer's budget masked for it */
    CKV_FORM_MASK  = 2, /* reference: nothing moves, evicted cells hidden per layer */
} ckv_form;

/* The sequence to compress, as the caller's cache holds it. */
typedef struct ckv_seq_desc {
    size_t          size;       /* sizeof(ckv_seq_desc) */
    int32_t         n;          /* cells of the sequence */
    const int32_t * pos;        /* [n] their positions, ascending */
    int32_t         compressed; /* 1: compressed before */
    const uint8_t * eog;        /* [n_tokens] 1 where the sequence's last tokens end a turn (NULL: unknown) */
    int32_t         n_tokens;   /* how many of the sequence's last tokens the caller has */
    int32_t         n_probe;    /* tokens of a probe decoded after the sequence and removed again (0: none) */
    int32_t         n_ubatch;   /* the most tokens one decode takes */
    int32_t         iswa;       /* 1: the full-attention cache of an iSWA model */
} ckv_seq_desc;

/* What the caller does next. */
typedef struct ckv_request_info {
    int32_t      skip;         /* 1: nothing to compress (the budget covers the sequence) */
    int32_t      method;       /* ckv_method */
    int32_t      form;         /* ckv_form */
    int32_t      per_head;     /* 1: one token set per KV head */
    int32_t      budget;       /* cells the sequence keeps */
    int32_t      n_decode;     /* tokens to decode again with query capture (0: none) */
    int32_t      decode_idx; /* index of the first in the sequence, n for the probe after it */
    int32_t      decode_pos;   /* its position */
    int32_t      keep_last;    /* 1: the last cell stays where it is, out of the plan (probe) */
    int32_t      text_index;   /* window text: first token in the caller's last tokens; -1 the probe, -2 none */
    int32_t      text_len;
    const char * note;         /* a line for the log (NULL: none), valid until the next call on the request */
    int32_t      note_warn;    /* 1: the note is a warning */
    int32_t      recon_chunk;  /* reconstruction scoring: the caller decodes the probe followed by the sequence's
                                  own tokens, recon_chunk at a time, after the sequence with query capture, and
                                  adds each pass's window scores (ckv_score_fn, all query heads) to the scores of
                                  the plan (0: none) */
} ckv_request_info;

/* What the caller measured, for the stats line. */
typedef struct ckv_request_facts {
    size_t       size;          /* sizeof(ckv_request_facts) */
    int32_t      seq_id;
    int32_t      n_after;       /* cells the sequence holds now */
    uint64_t     kv_bytes_cell; /* K and V bytes of one cell over all layers */
    const char * type_k;
    const char * type_v;
    int32_t      v_trans;
    int32_t      host;          /* 1: host buffers */
    const char * compact;       /* "host", "host-copy", "graph" or "mask" */
    const char * checksum;      /* NULL: none */
    const char * window_text;   /* NULL: none */
    double       ms_redecode;
    double       ms_compact;
    double       ms_total;
} ckv_request_facts;

/* Parse and validate options (NULL: the defaults); the reason in ckv_last_error(). */
ckv_status ckv_options_check(const char * options);

/* The value option `key` takes in `options` (NULL: its default) as text into buf ("" for an unset path). */
ckv_status ckv_option_get(const char * options, const char * key, char * buf, size_t buf_size);

/* One of the --compresskv-* flags of llama.cpp's tools, from the library's table (the options they set, their
 * help with the option's default). The strings live as long as the process. */
typedef struct ckv_flag {
    const char * name;            /* e.g. "--compresskv-budget"                                        */
    const char * key;             /* the option it sets; "" for --compresskv, which enables compression */
    const char * hint;            /* the value's placeholder ("N"); "" for a switch (sets the option to 1) */
    const char * help;
    int32_t      completion_only; /* 1: offered by llama-completion only                               */
} ckv_flag;

/* Flag i of the table, 0 <= i; CKV_ERR_INVALID_ARG past the last one (nothing written). */
ckv_status ckv_flag_get(int32_t i, ckv_flag * out);

/* Bounded-memory prefill: how a caller decodes a prompt of n_prompt tokens longer than the n_cells cells of its
 * context, compressing whenever the next chunk would overflow it (option overflow: what scores those passes).
 * eog: [n_prompt] 1 where a prompt token ends a turn (NULL: none); n_batch: the largest chunk; n_probe_text:
 * tokens of the caller's probe text (0: none). Refused (the reason names the flag) without a budget in cells,
 * the fill form and one token set per layer, or when the budget leaves no room for a chunk. */
typedef struct ckv_overflow {
    int32_t n_batch;     /* prompt tokens per chunk                                                           */
    int32_t n_keep;      /* cells a pass that makes room keeps                                                */
    int32_t probe_start; /* the prompt tokens [probe_start, probe_end) score those passes (its question,      */
    int32_t probe_end;   /*   decoded ahead and removed again); both -1: the probe text; equal: latest tokens */
    int32_t no_question; /* 1: overflow=question found no end-of-turn token near the end: the latest tokens  */
} ckv_overflow;

ckv_status ckv_overflow_plan(const char * options, const uint8_t * eog, int32_t n_prompt, int32_t n_cells,
                             int32_t n_batch, int32_t n_probe_text, ckv_overflow * out);

/* Decide a compression before anything changes: refusals, the budget, the window and the tokens to decode
 * again (ckv_request_info_get). Free with ckv_request_free. */
ckv_status ckv_request_new(const char * options, const ckv_seq_desc * seq, ckv_request ** out);

ckv_status ckv_request_info_get(ckv_request * req, ckv_request_info * info);

/* Plan from the sequence's n cells after the decode (cells and positions in position order, the probe's
 * last), the model (a profile is loaded or looked up by its fingerprint; meta only names it in messages),
 * each layer's keys and the captured queries (rows of the decoded tokens). */
ckv_status ckv_request_plan(ckv_request * req, const ckv_model_desc * model, const char * meta,
                            const int32_t * cells, const int32_t * pos, int32_t n,
                            const ckv_buffer * keys, const float * const * queries);

/* The caller's scores of one layer (ckv_request_plan_scored), for example from a graph on the device that holds
 * the cache: for layer il, tokens [0, we) of the planned sequence (cells[i] the cell of token i) and the window
 * [ws, we), write n_heads rows of ws floats to out: row j, token i = the sum over the window's queries of the
 * softmax probability of token i for query head heads[j] (logits q.k / sqrt(head_dim), causal inside the window;
 * query head h reads KV head h / (n_head / n_head_kv)). Return 0, nonzero to fail the plan. Called on the
 * calling thread, once per layer that needs scores, in layer order; it must not call into the request. */
typedef int32_t (*ckv_score_fn)(void * user, int32_t il, const int32_t * cells, int32_t ws, int32_t we,
                                const int32_t * heads, int32_t n_heads, float * out);

/* As ckv_request_plan, each layer's scores from score(user, ...) instead of its keys: the policy (heads, pooling,
 * budgets, selection) stays the library's. keys and queries: NULL, or (tests) as for ckv_request_plan, when the
 * library also scores every layer itself and the stats line records "score_check": the largest difference and
 * whether both select the same cells. A failed plan leaves the request unplanned: ckv_request_plan may follow. */
ckv_status ckv_request_plan_scored(ckv_request * req, const ckv_model_desc * model, const char * meta,
                                   const int32_t * cells, const int32_t * pos, int32_t n,
                                   ckv_score_fn score, void * user,
                                   const ckv_buffer * keys, const float * const * queries);

/* The plan (for ckv_plan_group and ckv_compact), owned by the request; NULL before ckv_request_plan. */
const ckv_plan * ckv_request_plan_get(ckv_request * req);

/* Cell metadata after compaction: *n_slots cells and positions into dst and pos (cap >= the cells planned),
 * *mark = the first position from which the sequence holds every position, *need_mask = 1 when some layer
 * hides some of its slots (per-layer masks). */
ckv_status ckv_request_slots(ckv_request * req, int32_t * dst, int32_t * pos, int32_t cap,
                             int32_t * n_slots, int32_t * mark, int32_t * need_mask);

/* The per-layer mask when *need_mask: n flags for layer il, 1 = hidden from that layer. Exact form: one per slot
 * of ckv_request_slots (the slots past the layer's kept cells); mask form: one per planned cell, in place (the
 * cells the layer did not keep; a cell hidden from every layer is freed). */
ckv_status ckv_request_hidden(ckv_request * req, int32_t il, uint8_t * out, int32_t n);

/* The stats line (one JSON object), appended to the stats option's file and copied to buf (may be NULL);
 * *len gets its length (may be NULL). */
ckv_status ckv_request_finish(ckv_request * req, const ckv_request_facts * facts, char * buf, size_t buf_size,
                              size_t * len);

void ckv_request_free(ckv_request * req);

#ifdef __cplusplus
}
#endif

#endif /* COMPRESSKV_H */
