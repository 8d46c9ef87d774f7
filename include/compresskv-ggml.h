// compresskv-ggml.h - compresskv's mechanism on ggml tensors, for llama.cpp built with LLAMA_COMPRESSKV
//
// The attention layers of one stream of a KV cache, read and written through the public ggml API only:
//   - host views of each layer's K (and V) for the library (ckv_buffer), copied from a device when needed
//     and written back after the library compacted them;
//   - the window-attention scores of a layer (ckv_score_fn), computed by a graph on the backend that holds
//     the layer, so that only the scores leave it;
//   - the compaction of a plan by gather graphs on that backend.
// src/ggml/compresskv-ggml.cpp is compiled into libllama (patches/0001 adds it to its sources), so that
// the patch keeps only what needs llama.cpp's internals: the cells' metadata, query capture and the API.
// Every function reports a failure by its return value and a message in `error` (only an allocation failure
// throws, std::bad_alloc, which llama_kv_compress catches), and none writes to the cache before every check of
// its plan passed (ckv_ggml_compact: -1 is the exception).
#pragma once

#include "compresskv.h"
#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

// the attention layers of one stream of a KV cache (every layer of the same attention shape)
struct ckv_ggml_cache {
    std::vector<ggml_tensor *> k, v; // per layer: K [n_embd_k, size, n_stream], V as rows or transposed
    bool    v_trans  = false;        // V is stored transposed
    int32_t strm     = 0;            // the stream of the sequence
    int64_t size     = 0;            // cells per stream
    int64_t n_head   = 0;            // query heads of a layer
    int64_t head_dim = 0;
    int32_t n_threads = 0;           // threads of a CPU backend that runs scoring graphs (0: ggml's default)
};

// each layer's K (and V) as the library sees them: the stream's slice in place for a host buffer, else a host
// copy of its first n_hi cells (those below the sequence's highest), so that a copy grows with the sequence
struct ckv_ggml_host {
    std::vector<ckv_buffer> k, v;
    std::vector<std::vector<uint8_t>> copies;
};

ckv_ggml_host ckv_ggml_host_get(const ckv_ggml_cache & c, int64_t n_hi, bool with_v);

// move the kept cells of the plan by the library in host memory (a copy of device buffers, written back):
// 0, or -1 (nothing written)
int32_t ckv_ggml_compact_host(const ckv_ggml_cache & c, const ckv_plan * plan, int64_t n_hi, std::string & error);

// move the kept cells of every layer by a graph on the backend that holds it. Returns 1 if the cache cannot be
// compacted this way (nothing was written), 0 on success and -1 if a backend failed after the first move.
// The caller synchronizes the backends that may still write the cache first
int32_t ckv_ggml_compact(const ckv_ggml_cache & c, const ckv_plan * plan, std::string & error);

// the facts of the stats line that the cache's tensors give (types, layout, K and V bytes of a cell)
ckv_request_facts ckv_ggml_facts(const ckv_ggml_cache & c);

// tests: the checksum of the bytes of the cells `cells` of every layer (ckv_checksum)
std::string ckv_ggml_checksum(const ckv_ggml_cache & c, int64_t n_hi, const std::vector<int32_t> & cells);

// a backend and a graph allocator per buffer type that holds cache layers: several when the layers are split
// across devices or RPC servers, each layer's graphs then run where its cells are
struct ckv_ggml_device {
    ggml_backend_ptr backend;
    ggml_gallocr_ptr galloc;
};

// what scoring on the cache's backends needs across layers; `user` of ckv_ggml_score
struct ckv_ggml_scorer {
    const ckv_ggml_cache * cache = nullptr;
    std::vector<const float *> queries;  // per layer: the window's queries, [w][n_head][head_dim] f32
    bool max = false;                    // each cell's largest probability over the window instead of the sum
    std::vector<std::vector<float>> recon; // per layer, n_head rows of n_recon scores to return instead (if any)
    int32_t n_recon = 0;
    std::map<ggml_backend_buffer_type_t, ckv_ggml_device> devs;
    std::string error;                   // why the last call failed
};

// ckv_score_fn: the raw window-attention scores of layer il for the query heads `heads`
int32_t ckv_ggml_score(void * user, int32_t il, const int32_t * cells, int32_t ws, int32_t we,
        const int32_t * heads, int32_t n_heads, float * out);

// reconstruction: each layer's scores of every query head, with sc.max, for the window cells [ws, we) after the
// sequence's cells [0, ws), folded into sc.recon by their maximum. false (sc.error) on failure
bool ckv_ggml_recon_add(ckv_ggml_scorer & sc, const int32_t * cells, int32_t ws, int32_t we);
