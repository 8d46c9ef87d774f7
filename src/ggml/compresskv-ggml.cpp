// compresskv's mechanism on ggml tensors: host views, scoring graphs and compaction graphs (compresskv-ggml.h)
//
// Scoring, per layer, on the backend that holds its cells (only the scores leave it):
//
//   k    = get_rows(K, cells[0, we))                       the sequence's keys as f32 [d, n_head_kv, we]
//   kq   = soft_max(k^T q / sqrt(d) + causal mask)          [we, w, n_head], query head h reads KV head h/(n_head/n_head_kv)
//   out  = get_rows(sum over the window of kq, heads)      [ws, n_heads] of [we, n_heads] (max: the maximum, a
//                                                          custom op on the CPU, pool_2d elsewhere)
//
// Compaction, per layer, one gather and one scatter per tensor and index block of the plan:
//
//   rows = get_rows(view, src)     gather the kept units into scratch memory of the same buffer type
//   view = set_rows(view, rows, dst)
//
// a unit is one group's slice of a cell's row, as f32 words (K, V rows: every cache type moves byte for byte),
// or one element (transposed V, f16/bf16/f32); the library splits the indices into blocks that int32 addresses.
// Every layer's graph is reserved and checked against its backend before the first one runs.

#include "compresskv-ggml.h"

#include "ggml-alloc.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>

// tests: LLAMA_COMPRESSKV_FAULT=<where> makes that step fail as an allocation or a backend would
static bool ckv_fault(const char * where) {
    const char * env = getenv("LLAMA_COMPRESSKV_FAULT");
    return env && strcmp(env, where) == 0;
}

// copy the cells of host buffer b from (to_host) or to the stream's slice of t: one block of rows, or the first
// b.n_cells elements of each channel of a transposed V
static void ckv_copy_host(const ckv_ggml_cache & c, ggml_tensor * t, const ckv_buffer & b, bool to_host) {
    const size_t n_rows = b.transposed ? (size_t) b.n_embd : 1;
    const size_t len    = b.transposed ? b.stride : b.size;
    const size_t t_row  = b.transposed ? ggml_row_size(t->type, t->ne[1]) : 0;
    for (size_t r = 0; r < n_rows; ++r) {
        char * h = (char *) b.data + r*len;
        if (to_host) {
            ggml_backend_tensor_get(t, h, c.strm*t->nb[2] + r*t_row, len);
        } else {
            ggml_backend_tensor_set(t, h, c.strm*t->nb[2] + r*t_row, len);
        }
    }
}

static ckv_buffer ckv_layer_buffer(const ckv_ggml_cache & c, ggml_tensor * t, bool trans, int64_t n_hi, std::vector<uint8_t> & host) {
    const bool    on_host = ggml_backend_buffer_is_host(t->buffer);
    const int64_t n_cells = on_host ? t->ne[1] : n_hi;
    ckv_buffer b = {};
    b.type       = (int32_t) t->type;
    b.n_embd     = (int32_t) t->ne[0];
    b.n_cells    = (int32_t) n_cells;
    b.transposed = trans ? 1 : 0;
    b.stride     = trans ? ggml_row_size(t->type, n_cells) : t->nb[1];
    b.size       = trans ? b.stride*t->ne[0] : n_cells*t->nb[1];
    b.data       = (char *) t->data + c.strm*t->nb[2];
    if (!on_host) {
        host.resize(b.size);
        b.data = host.data();
        ckv_copy_host(c, t, b, true);
    }
    return b;
}

ckv_ggml_host ckv_ggml_host_get(const ckv_ggml_cache & c, int64_t n_hi, bool with_v) {
    ckv_ggml_host h;
    h.copies.resize(2*c.k.size());
    for (size_t il = 0; il < c.k.size(); ++il) {
        h.k.push_back(ckv_layer_buffer(c, c.k[il], false, n_hi, h.copies[2*il]));
        if (with_v) {
            h.v.push_back(ckv_layer_buffer(c, c.v[il], c.v_trans, n_hi, h.copies[2*il + 1]));
        }
    }
    return h;
}

int32_t ckv_ggml_compact_host(const ckv_ggml_cache & c, const ckv_plan * plan, int64_t n_hi, std::string & error) {
    ckv_ggml_host h = ckv_ggml_host_get(c, n_hi, true);
    if (ckv_fault("compact")) {
        // an invalid buffer for the last layer: the library must refuse before moving any layer
        h.v.back().size = 1;
    }
    if (ckv_compact(plan, h.k.data(), h.v.data()) != CKV_OK) {
        error = std::string("compaction refused: ") + ckv_last_error();
        return -1;
    }
    for (size_t il = 0; il < c.k.size(); ++il) {
        for (const auto & [t, b] : { std::make_pair(c.k[il], h.k[il]), std::make_pair(c.v[il], h.v[il]) }) {
            if (!ggml_backend_buffer_is_host(t->buffer)) {
                ckv_copy_host(c, t, b, false);
            }
        }
    }
    return 0;
}

ckv_request_facts ckv_ggml_facts(const ckv_ggml_cache & c) {
    ckv_request_facts f = {};
    f.size    = sizeof(f);
    f.type_k  = ggml_type_name(c.k[0]->type);
    f.type_v  = ggml_type_name(c.v[0]->type);
    f.v_trans = c.v_trans ? 1 : 0;
    f.host    = ggml_backend_buffer_is_host(c.k[0]->buffer) ? 1 : 0;
    for (size_t il = 0; il < c.k.size(); ++il) {
        f.kv_bytes_cell += ggml_row_size(c.k[il]->type, c.k[il]->ne[0]) + ggml_row_size(c.v[il]->type, c.v[il]->ne[0]);
    }
    return f;
}

std::string ckv_ggml_checksum(const ckv_ggml_cache & c, int64_t n_hi, const std::vector<int32_t> & cells) {
    const ckv_ggml_host h = ckv_ggml_host_get(c, n_hi, true);
    char sum[17] = {0};
    ckv_checksum(h.k.data(), h.v.data(), (int32_t) h.k.size(), cells.data(), (int32_t) cells.size(), sum, sizeof(sum));
    return sum;
}

// the device of layer il's cache in devs (made on first use), or nullptr (error)
static ckv_ggml_device * ckv_layer_device(const ckv_ggml_cache & c, size_t il, std::map<ggml_backend_buffer_type_t, ckv_ggml_device> & devs,
        std::string & error) {
    ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(c.k[il]->buffer);
    auto it = devs.find(buft);
    if (it == devs.end()) {
        ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
        if (!dev && ggml_backend_buft_is_host(buft)) {
            // the plain CPU buffer type names no device
            dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        }
        ggml_backend_ptr backend(dev ? ggml_backend_dev_init(dev, nullptr) : nullptr);
        if (!backend || !ggml_backend_supports_buft(backend.get(), buft)) {
            backend.reset();
        }
        ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
        auto set_n_threads = reg ? (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads") : nullptr;
        if (backend && set_n_threads && c.n_threads > 0) {
            set_n_threads(backend.get(), c.n_threads); // a CPU backend: the context's threads, not ggml's default 4
        }
        ggml_gallocr_ptr galloc(backend ? ggml_gallocr_new(buft) : nullptr);
        it = devs.emplace(buft, ckv_ggml_device{ std::move(backend), std::move(galloc) }).first;
    }
    if (!it->second.galloc) {
        error = std::string("no backend for the cache buffer type ") + ggml_backend_buft_name(buft);
        return nullptr;
    }
    return &it->second;
}

// whether the backend runs every node of gf, else false (error)
static bool ckv_supports(ggml_backend_t backend, ggml_cgraph * gf, std::string & error) {
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (!ggml_backend_supports_op(backend, node)) {
            error = std::string(ggml_backend_name(backend)) + " does not support " + ggml_op_desc(node) + " of " + ggml_type_name(node->src[0]->type);
            return false;
        }
    }
    return true;
}

// a no-alloc context and a graph of at most n_nodes nodes
static ggml_cgraph * ckv_new_graph(ggml_context_ptr & ctx0, size_t n_nodes) {
    ggml_init_params ip = { ggml_tensor_overhead()*n_nodes + ggml_graph_overhead_custom(n_nodes, false), nullptr, true };
    ctx0.reset(ggml_init(ip));
    return ctx0 ? ggml_new_graph_custom(ctx0.get(), n_nodes, false) : nullptr;
}

// the causal mask of the window [ws, we) over the cells [0, we): row r sees the cells up to ws + r
static std::vector<float> ckv_causal_mask(int32_t ws, int32_t we) {
    const int64_t w = we - ws;
    std::vector<float> m((size_t) we*w);
    for (int64_t r = 0; r < w; ++r) {
        for (int64_t i = 0; i < we; ++i) {
            m[r*we + i] = i <= ws + r ? 0.0f : -INFINITY;
        }
    }
    return m;
}

// dst [we, 1, n_head] = the maximum over the window of kq [we, w, n_head] (src[0]): what pool_2d(MAX, 1 x w)
// computes, for the CPU backend, whose pool_2d runs on one thread and reads kq a column at a time. Thread ith
// of nth takes a slice of the cells and reads every row of kq along it.
static void ckv_max_window(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * kq = dst->src[0];
    const int64_t we = kq->ne[0], w = kq->ne[1], n_head = kq->ne[2];
    const int64_t per = (we + nth - 1)/nth;
    const int64_t i0  = std::min(we, ith*per), i1 = std::min(we, i0 + per);
    for (int64_t h = 0; h < n_head; ++h) {
        float * o = (float *) ((char *) dst->data + h*dst->nb[2]);
        std::fill(o + i0, o + i1, -INFINITY);
        for (int64_t r = 0; r < w; ++r) {
            const float * row = (const float *) ((const char *) kq->data + r*kq->nb[1] + h*kq->nb[2]);
            for (int64_t i = i0; i < i1; ++i) {
                o[i] = std::max(o[i], row[i]);
            }
        }
    }
}

// the scores of layer il on its backend, as ckv_ggml_score without the reconstruction scores; mask: the
// window's causal mask (ckv_causal_mask(ws, we))
static int32_t ckv_score_graph(ckv_ggml_scorer & sc, int32_t il, const int32_t * cells, int32_t ws, int32_t we,
        const int32_t * heads, int32_t n_heads, const std::vector<float> & m, float * out) {
    const ckv_ggml_cache & cache = *sc.cache;
    ckv_ggml_device * dv = ckv_layer_device(cache, il, sc.devs, sc.error);
    ggml_context_ptr ctx0;
    ggml_cgraph * gf = dv ? ckv_new_graph(ctx0, 32) : nullptr;
    if (!gf || !sc.queries[il]) {
        return 1;
    }
    ggml_context * c = ctx0.get();
    const int64_t d = cache.head_dim, n_head = cache.n_head, w = we - ws;
    ggml_tensor * k    = cache.k[il];
    ggml_tensor * idx  = ggml_new_tensor_1d(c, GGML_TYPE_I32, we);
    ggml_tensor * q    = ggml_new_tensor_3d(c, GGML_TYPE_F32, d, n_head, w);
    ggml_tensor * mask = ggml_new_tensor_2d(c, GGML_TYPE_F32, we, w);
    ggml_tensor * hidx = ggml_new_tensor_1d(c, GGML_TYPE_I32, n_heads);
    ggml_tensor * kc   = ggml_get_rows(c, ggml_view_2d(c, k, k->ne[0], k->ne[1], k->nb[1], cache.strm*k->nb[2]), idx);
    kc = ggml_cont(c, ggml_permute(c, ggml_reshape_3d(c, kc, d, k->ne[0]/d, we), 0, 2, 1, 3));
    ggml_tensor * kq = ggml_mul_mat(c, kc, ggml_cont(c, ggml_permute(c, q, 0, 2, 1, 3)));
    kq = ggml_soft_max_ext(c, kq, mask, 1.0f/sqrtf((float) d), 0.0f);
    ggml_tensor * ones = ggml_new_tensor_3d(c, GGML_TYPE_F32, 1, w, n_head);
    ggml_tensor * sum  = sc.max ? ggml_custom_4d(c, GGML_TYPE_F32, we, 1, n_head, 1, &kq, 1, ckv_max_window, GGML_N_TASKS_MAX, nullptr) :
        ggml_out_prod(c, kq, ones); // the sum over the window, without transposing kq
    ggml_tensor * pool = sc.max ? ggml_pool_2d(c, kq, GGML_OP_POOL_MAX, 1, (int) w, 1, (int) w, 0, 0) : nullptr;
    // tests (LLAMA_COMPRESSKV_SCORE=check): the custom maximum must equal pool_2d's, bit for bit
    const char * env   = getenv("LLAMA_COMPRESSKV_SCORE");
    const bool   check = sc.max && env && strcmp(env, "check") == 0;
    if (sc.max && !ggml_backend_supports_op(dv->backend.get(), sum)) {
        sum  = pool; // a GPU backend: its own pooling
        pool = nullptr;
    }
    if (!sc.max && !ggml_backend_supports_op(dv->backend.get(), sum)) {
        sum = ggml_sum_rows(c, ggml_cont(c, ggml_permute(c, kq, 1, 0, 2, 3)));
    }
    sum = ggml_get_rows(c, ggml_reshape_2d(c, sum, we, n_head), hidx);
    ggml_set_output(sum);
    ggml_build_forward_expand(gf, sum);
    ggml_tensor * ref = check && pool ? ggml_get_rows(c, ggml_reshape_2d(c, pool, we, n_head), hidx) : nullptr;
    if (ref) {
        ggml_set_output(ref);
        ggml_build_forward_expand(gf, ref);
    }
    if (!ckv_supports(dv->backend.get(), gf, sc.error) || ckv_fault("score-graph") || !ggml_gallocr_alloc_graph(dv->galloc.get(), gf)) {
        return 1;
    }
    ggml_backend_tensor_set(idx, cells, 0, ggml_nbytes(idx));
    ggml_backend_tensor_set(q, sc.queries[il], 0, ggml_nbytes(q));
    ggml_backend_tensor_set(mask, m.data(), 0, ggml_nbytes(mask));
    ggml_backend_tensor_set(hidx, heads, 0, ggml_nbytes(hidx));
    if (ones->buffer) {
        const std::vector<float> one((size_t) w*n_head, 1.0f);
        ggml_backend_tensor_set(ones, one.data(), 0, ggml_nbytes(ones));
    }
    if (ggml_backend_graph_compute(dv->backend.get(), gf) != GGML_STATUS_SUCCESS) {
        sc.error = std::string("the scoring graph failed on ") + ggml_backend_name(dv->backend.get());
        return 1;
    }
    std::vector<float> s((size_t) we*n_heads);
    ggml_backend_tensor_get(sum, s.data(), 0, ggml_nbytes(sum));
    if (ref) {
        std::vector<float> r(s.size());
        ggml_backend_tensor_get(ref, r.data(), 0, ggml_nbytes(ref));
        if (memcmp(r.data(), s.data(), s.size()*sizeof(float)) != 0) {
            sc.error = "layer " + std::to_string(il) + ": the window maximum differs from pool_2d's";
            return 1;
        }
    }
    for (int32_t j = 0; j < n_heads; ++j) {
        std::copy_n(s.data() + (size_t) j*we, ws, out + (size_t) j*ws);
    }
    return 0;
}

int32_t ckv_ggml_score(void * user, int32_t il, const int32_t * cells, int32_t ws, int32_t we,
        const int32_t * heads, int32_t n_heads, float * out) {
    auto & sc = *(ckv_ggml_scorer *) user;
    if (sc.recon.empty()) {
        return ckv_score_graph(sc, il, cells, ws, we, heads, n_heads, ckv_causal_mask(ws, we), out);
    }
    if (ws > sc.n_recon) {
        sc.error = "the reconstruction scores are of a shorter sequence";
        return 1;
    }
    for (int32_t j = 0; j < n_heads; ++j) {
        std::copy_n(sc.recon[il].data() + (size_t) heads[j]*sc.n_recon, ws, out + (size_t) j*ws);
    }
    return 0;
}

bool ckv_ggml_recon_add(ckv_ggml_scorer & sc, const int32_t * cells, int32_t ws, int32_t we) {
    const size_t n_layer = sc.cache->k.size();
    const int32_t n_head = (int32_t) sc.cache->n_head;
    if (sc.recon.empty()) {
        sc.recon.assign(n_layer, std::vector<float>((size_t) n_head*ws, 0.0f));
        sc.n_recon = ws;
    }
    std::vector<int32_t> heads(n_head);
    for (int32_t h = 0; h < n_head; ++h) {
        heads[h] = h;
    }
    std::vector<float> out((size_t) n_head*ws);
    const std::vector<float> mask = ckv_causal_mask(ws, we); // the same for every layer
    bool ok = ws == sc.n_recon;
    sc.max = true;
    for (size_t il = 0; ok && il < n_layer; ++il) {
        ok = ckv_score_graph(sc, (int32_t) il, cells, ws, we, heads.data(), n_head, mask, out.data()) == 0;
        for (size_t i = 0; ok && i < out.size(); ++i) {
            sc.recon[il][i] = std::max(sc.recon[il][i], out[i]);
        }
    }
    sc.max = false;
    return ok;
}

// whether every layer can be compacted by a graph where its cells are (its device made in devs), else false
static bool ckv_graph_devices(const ckv_ggml_cache & c, int32_t n_groups, std::map<ggml_backend_buffer_type_t, ckv_ggml_device> & devs,
        std::string & error) {
    for (size_t il = 0; il < c.k.size(); ++il) {
        if (!ckv_layer_device(c, il, devs, error)) {
            return false;
        }
        for (ggml_tensor * t : { c.k[il], c.v[il] }) {
            const bool trans = t == c.v[il] && c.v_trans;
            if (ggml_backend_buffer_get_type(t->buffer) != ggml_backend_buffer_get_type(c.k[il]->buffer)) {
                error = "K and V of a layer in different buffer types";
                return false;
            }
            if (trans ? ggml_is_quantized(t->type) || t->ne[0] % n_groups : t->nb[1] % (4*(size_t) n_groups)) {
                error = std::string(ggml_type_name(t->type)) + " rows of " + t->name + " are not whole f32 words per group";
                return false;
            }
        }
    }
    return true;
}

using ckv_idx = std::vector<std::pair<ggml_tensor *, std::vector<int32_t>>>;

// the graph that moves the kept cells of layer il (idx receives the host data of its index tensors), or nullptr
static ggml_cgraph * ckv_compact_graph(const ckv_ggml_cache & c, const ckv_plan * plan, size_t il, ggml_context_ptr & ctx0, ckv_idx & idx,
        std::string & error) {
    ggml_cgraph * gf = ckv_new_graph(ctx0, 256); // a few nodes per index block
    const int32_t n_groups = ckv_plan_n_groups(plan);
    for (ggml_tensor * t : { c.k[il], c.v[il] }) {
        const bool    trans = t == c.v[il] && c.v_trans;
        ggml_tensor * units = !gf ? nullptr : trans
            ? ggml_new_tensor_2d(ctx0.get(), t->type, 1, ggml_nelements(t))
            : ggml_new_tensor_2d(ctx0.get(), GGML_TYPE_F32, t->nb[1]/4/n_groups, t->ne[1]*t->ne[2]*n_groups);
        std::vector<ckv_gather_block> blocks;
        std::vector<int32_t> src, dst;
        int32_t n_blocks = 0;
        int64_t n_pairs  = 0;
        for (int pass = 0; units && pass < 2; ++pass) {
            blocks.resize(n_blocks);
            src.resize(n_pairs);
            dst.resize(n_pairs);
            if (ckv_plan_gather(plan, (int32_t) il, trans, t->ne[0], c.size, c.strm, INT32_MAX, pass ? blocks.data() : nullptr,
                    n_blocks, pass ? src.data() : nullptr, pass ? dst.data() : nullptr, n_pairs, &n_blocks, &n_pairs) != CKV_OK) {
                error = ckv_last_error();
                return nullptr;
            }
        }
        if (!units || ggml_backend_tensor_alloc(t->buffer, units, t->data) != GGML_STATUS_SUCCESS) {
            return nullptr;
        }
        for (const auto & b : blocks) {
            ggml_tensor * view = ggml_view_2d(ctx0.get(), units, units->ne[0], b.span, units->nb[1], b.base*units->nb[1]);
            ggml_tensor * ts   = ggml_new_tensor_1d(ctx0.get(), GGML_TYPE_I32, b.n);
            ggml_tensor * td   = ggml_new_tensor_1d(ctx0.get(), GGML_TYPE_I32, b.n);
            idx.emplace_back(ts, std::vector<int32_t>(src.begin() + b.first, src.begin() + b.first + b.n));
            idx.emplace_back(td, std::vector<int32_t>(dst.begin() + b.first, dst.begin() + b.first + b.n));
            ggml_build_forward_expand(gf, ggml_set_rows(ctx0.get(), view, ggml_get_rows(ctx0.get(), view, ts), td));
        }
    }
    return gf;
}

int32_t ckv_ggml_compact(const ckv_ggml_cache & c, const ckv_plan * plan, std::string & error) {
    std::map<ggml_backend_buffer_type_t, ckv_ggml_device> devs;
    if (!ckv_graph_devices(c, ckv_plan_n_groups(plan), devs, error)) {
        return 1;
    }
    // pass 0 reserves every layer's graph and checks that its backend runs every op, all before the first move;
    // pass 1 moves the cells, layer by layer
    for (int pass = 0; pass < 2; ++pass) {
        for (size_t il = 0; il < c.k.size(); ++il) {
            ggml_context_ptr ctx0;
            ckv_idx idx;
            ggml_cgraph * gf = ckv_compact_graph(c, plan, il, ctx0, idx, error);
            const ckv_ggml_device * dv = ckv_layer_device(c, il, devs, error);
            const char * backend = ggml_backend_name(dv->backend.get());
            if (pass == 0) {
                if (!gf || ckv_fault("graph-reserve") || !ggml_gallocr_reserve(dv->galloc.get(), gf)) {
                    error = std::string("cannot allocate the compaction graph on ") + backend;
                    return 1;
                }
                if (!ckv_supports(dv->backend.get(), gf, error)) {
                    return 1;
                }
                continue;
            }
            if (!gf || !ggml_gallocr_alloc_graph(dv->galloc.get(), gf)) {
                error = "cannot allocate the compaction graph of layer " + std::to_string(il);
                return il == 0 ? 1 : -1;
            }
            for (const auto & [t, data] : idx) {
                ggml_backend_tensor_set(t, data.data(), 0, ggml_nbytes(t));
            }
            if ((ckv_fault("graph-compute") && il == c.k.size()/2) || ggml_backend_graph_compute(dv->backend.get(), gf) != GGML_STATUS_SUCCESS) {
                error = "the compaction graph of layer " + std::to_string(il) + " failed on " + backend;
                return -1;
            }
        }
    }
    return 0;
}
