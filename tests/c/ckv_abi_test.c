/*
 * ckv_abi_test.c - the C ABI of compresskv end to end, and every refusal of every function.
 *
 * A synthetic model (4 layers, 4 query heads, 2 KV heads, head_dim 32) with a 256-cell cache holding one
 * 200-token sequence in scattered cells. Three runs:
 *   A. K f16 rows, V f16 transposed (llama.cpp without flash attention): SnapKV, budget 64.
 *   B. K and V q8_0 rows (flash attention): CompressKV with a profile, per-KV-head sets, exact form.
 *   C. StreamingLLM without queries.
 * After each compaction, every moved row (or head slice / transposed element) must equal the original
 * source bytes, and every cell outside the sequence must be untouched. Every refused call must return the
 * expected status, leave a message in ckv_last_error() that names the bad thing, and leave the cache
 * byte-identical.
 *
 * Build: cc -std=c11 -Iinclude tests/c/ckv_abi_test.c target/debug/libcompresskv.a -lpthread -ldl -lm
 * Prints "N passed, M failed" and exits non-zero on any failure.
 */
#define _POSIX_C_SOURCE 200809L

#include "compresskv.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_LAYER 4
#define N_HEAD 4
#define N_HEAD_KV 2
#define HEAD_DIM 32
#define N_EMBD (N_HEAD_KV * HEAD_DIM)
#define N_CELLS 256
#define N_TOK 200
#define WINDOW 8
#define Q_LEN (WINDOW * N_HEAD * HEAD_DIM)

static int n_pass = 0, n_fail = 0;

static void check(int ok, int line, const char * what) {
    if (ok) {
        n_pass++;
    } else {
        n_fail++;
        fprintf(stderr, "FAIL line %d: %s\n", line, what);
    }
}
#define CHECK(cond) check((cond) ? 1 : 0, __LINE__, #cond)

/* ---- the synthetic cache --------------------------------------------------------------------------- */

typedef struct cache {
    int      ktype, vtype, vtrans;
    size_t   ksize, vsize;
    uint8_t *k[N_LAYER], *v[N_LAYER];   /* live buffers                      */
    uint8_t *k0[N_LAYER], *v0[N_LAYER]; /* snapshot taken before each phase  */
    ckv_buffer kb[N_LAYER], vb[N_LAYER];
} cache;

static cache  C;               /* the cache under test                      */
static int    cells[N_TOK];    /* cell of token i                           */
static int    in_seq[N_CELLS]; /* 1 if the cell belongs to the sequence     */
static float *queries[N_LAYER];

static uint32_t rng = 0x12345678u;
static uint32_t next_u32(void) {
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng;
}
static float next_f(void) { return (float) (next_u32() % 20001u) / 10000.0f - 1.0f; } /* [-1, 1] */

/* float -> IEEE half, truncating; enough for values in [-2, 2]. */
static uint16_t f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    int32_t  e    = (int32_t) ((x >> 23) & 0xffu) - 127 + 15;
    uint32_t m    = x & 0x7fffffu;
    if (e <= 0) return (uint16_t) sign;
    if (e >= 31) return (uint16_t) (sign | 0x7c00u);
    return (uint16_t) (sign | ((uint32_t) e << 10) | (m >> 13));
}

static size_t row_bytes(int type, int n) {
    return type == CKV_TYPE_Q8_0 ? (size_t) (n / 32) * 34 : (size_t) n * 2;
}

static void fill_buffer(uint8_t * p, int type, size_t size) {
    if (type == CKV_TYPE_F16) {
        for (size_t i = 0; i + 1 < size; i += 2) {
            uint16_t h = f2h(next_f());
            memcpy(p + i, &h, 2);
        }
    } else { /* q8_0: blocks of a f16 scale (1.0 = 0x3C00, little endian) and 32 int8 */
        for (size_t b = 0; b + 34 <= size; b += 34) {
            p[b]     = 0x00;
            p[b + 1] = 0x3C;
            for (int j = 0; j < 32; j++) p[b + 2 + j] = (uint8_t) (int8_t) ((int) (next_u32() % 17u) - 8);
        }
    }
}

static void cache_init(int ktype, int vtype, int vtrans) {
    C.ktype  = ktype;
    C.vtype  = vtype;
    C.vtrans = vtrans;
    C.ksize  = row_bytes(ktype, N_EMBD) * N_CELLS;
    C.vsize  = vtrans ? (size_t) N_EMBD * N_CELLS * 2 : row_bytes(vtype, N_EMBD) * N_CELLS;
    for (int l = 0; l < N_LAYER; l++) {
        free(C.k[l]);
        free(C.v[l]);
        free(C.k0[l]);
        free(C.v0[l]);
        C.k[l]  = malloc(C.ksize);
        C.v[l]  = malloc(C.vsize);
        C.k0[l] = malloc(C.ksize);
        C.v0[l] = malloc(C.vsize);
        if (!C.k[l] || !C.v[l] || !C.k0[l] || !C.v0[l]) {
            fprintf(stderr, "out of memory\n");
            exit(2);
        }
        fill_buffer(C.k[l], ktype, C.ksize);
        fill_buffer(C.v[l], vtype, C.vsize);
        C.kb[l] = (ckv_buffer) {C.k[l], C.ksize, ktype, N_EMBD, N_CELLS, 0, 0};
        C.vb[l] = (ckv_buffer) {C.v[l], C.vsize, vtype, N_EMBD, N_CELLS, vtrans, 0};
    }
}

static void snapshot(void) {
    for (int l = 0; l < N_LAYER; l++) {
        memcpy(C.k0[l], C.k[l], C.ksize);
        memcpy(C.v0[l], C.v[l], C.vsize);
    }
}

static int unchanged(void) {
    if (C.k[0] == NULL) return 1; /* no cache yet */
    for (int l = 0; l < N_LAYER; l++) {
        if (memcmp(C.k0[l], C.k[l], C.ksize) != 0 || memcmp(C.v0[l], C.v[l], C.vsize) != 0) return 0;
    }
    return 1;
}

/* ---- refusals -------------------------------------------------------------------------------------- */

/* A refused call: status `want`, a non-empty last error containing `needle`, the cache untouched. */
static void refused(int line, const char * call, ckv_status got, ckv_status want, const char * needle) {
    const char * msg = ckv_last_error();
    int ok = got == want && msg != NULL && msg[0] != '\0' && strstr(msg, needle) != NULL && unchanged();
    if (ok) {
        n_pass++;
    } else {
        n_fail++;
        fprintf(stderr, "FAIL line %d: %s\n  status %s (want %s), cache %s, message \"%s\" (want \"%s\")\n", line,
                call, ckv_status_name(got), ckv_status_name(want), unchanged() ? "unchanged" : "CHANGED",
                msg ? msg : "(NULL)", needle);
    }
}
#define REFUSED(call, want, needle) refused(__LINE__, #call, (call), (want), (needle))

static void ok_call(int line, const char * call, ckv_status got) {
    if (got == CKV_OK) {
        n_pass++;
    } else {
        n_fail++;
        fprintf(stderr, "FAIL line %d: %s -> %s: %s\n", line, call, ckv_status_name(got), ckv_last_error());
    }
}
#define OK(call) ok_call(__LINE__, #call, (call))

/* ---- the example profile --------------------------------------------------------------------------- */

static char fp_model[17];

static int profile_json(char * buf, size_t size, int n_layer, int version) {
    return snprintf(buf, size,
                    "{\"version\": %d,\n"
                    " \"model\": {\"arch\": \"example\", \"n_layer\": %d, \"n_head\": 4, \"n_head_kv\": 2,\n"
                    "           \"head_dim\": 32, \"fingerprint\": \"%s\"},\n"
                    " \"head_ranking\": [[3, 1, 0, 2], [0, 1, 2, 3], [2, 3, 0, 1], [1, 0, 3, 2]%s],\n"
                    " \"head_scores\": [[0.2, 0.3, 0.1, 0.4], [0.4, 0.3, 0.2, 0.1], [0.2, 0.1, 0.4, 0.3],\n"
                    "                   [0.3, 0.4, 0.1, 0.2]%s],\n"
                    " \"layer_weights\": [0.1, 0.2, 0.3, 0.4%s],\n"
                    " \"calibration\": {\"tool\": \"ckv_abi_test.c\", \"note\": \"synthetic\"}}\n",
                    version, n_layer, fp_model, n_layer == 5 ? ", [0, 1, 2, 3]" : "",
                    n_layer == 5 ? ", [0.1, 0.1, 0.1, 0.1]" : "", n_layer == 5 ? ", 0.0" : "");
}

static ckv_model_desc model_desc(void) {
    ckv_model_desc m = {"example", {N_LAYER, N_HEAD, N_HEAD_KV, HEAD_DIM}, fp_model};
    return m;
}

/* ---- plan checks ----------------------------------------------------------------------------------- */

/* Byte offset and length of elements [e0, e0 + n) of a row of `type`. */
static size_t elem_off(int type, int e) { return type == CKV_TYPE_Q8_0 ? (size_t) (e / 32) * 34 : (size_t) e * 2; }

/* Check the plan's groups and that the compacted cache holds exactly the planned moves. */
static void verify_compaction(const ckv_plan * plan, int with_v) {
    int n_groups = ckv_plan_n_groups(plan);
    int ok_moves = 1, ok_meta = 1, ok_outside = 1;
    for (int l = 0; l < N_LAYER; l++) {
        for (int g = 0; g < n_groups; g++) {
            int n = 0;
            const int *kept = NULL, *src = NULL, *dst = NULL;
            if (ckv_plan_group(plan, l, g, &n, &kept, &src, &dst) != CKV_OK) {
                ok_meta = 0;
                continue;
            }
            int e0 = n_groups == 1 ? 0 : g * HEAD_DIM;
            int ne = n_groups == 1 ? N_EMBD : HEAD_DIM;
            for (int j = 0; j < n; j++) {
                if (kept[j] < 0 || kept[j] >= N_TOK || (j > 0 && kept[j] <= kept[j - 1])) ok_meta = 0;
                if (src[j] != cells[kept[j]]) ok_meta = 0;
                /* K rows */
                size_t rb = row_bytes(C.ktype, N_EMBD);
                size_t o = elem_off(C.ktype, e0), len = elem_off(C.ktype, e0 + ne) - o;
                if (memcmp(C.k[l] + (size_t) dst[j] * rb + o, C.k0[l] + (size_t) src[j] * rb + o, len) != 0) ok_moves = 0;
                if (!with_v) continue;
                if (C.vtrans) {
                    for (int ch = e0; ch < e0 + ne; ch++) {
                        size_t cs = (size_t) N_CELLS * 2;
                        if (memcmp(C.v[l] + ch * cs + (size_t) dst[j] * 2, C.v0[l] + ch * cs + (size_t) src[j] * 2, 2) != 0)
                            ok_moves = 0;
                    }
                } else {
                    size_t vrb = row_bytes(C.vtype, N_EMBD);
                    size_t vo = elem_off(C.vtype, e0), vlen = elem_off(C.vtype, e0 + ne) - vo;
                    if (memcmp(C.v[l] + (size_t) dst[j] * vrb + vo, C.v0[l] + (size_t) src[j] * vrb + vo, vlen) != 0)
                        ok_moves = 0;
                }
            }
            /* the observation window (the last WINDOW tokens) is always kept */
            if (n < WINDOW || kept[n - 1] != N_TOK - 1 || kept[n - WINDOW] != N_TOK - WINDOW) ok_meta = 0;
        }
        /* cells outside the sequence never change */
        size_t rb = row_bytes(C.ktype, N_EMBD);
        for (int c = 0; c < N_CELLS; c++) {
            if (in_seq[c]) continue;
            if (memcmp(C.k[l] + c * rb, C.k0[l] + c * rb, rb) != 0) ok_outside = 0;
            if (C.vtrans) {
                for (int ch = 0; ch < N_EMBD; ch++) {
                    size_t at = (size_t) ch * N_CELLS * 2 + (size_t) c * 2;
                    if (memcmp(C.v[l] + at, C.v0[l] + at, 2) != 0) ok_outside = 0;
                }
            } else {
                size_t vrb = row_bytes(C.vtype, N_EMBD);
                if (memcmp(C.v[l] + c * vrb, C.v0[l] + c * vrb, vrb) != 0) ok_outside = 0;
            }
        }
    }
    CHECK(ok_meta);
    CHECK(ok_moves);
    CHECK(ok_outside);
}

static void print_plan(const char * name, const ckv_plan * plan) {
    int n_groups = ckv_plan_n_groups(plan);
    printf("%s: n_slots %d, groups %d, fallback %d\n", name, ckv_plan_n_slots(plan), n_groups,
           ckv_plan_fallback(plan));
    for (int l = 0; l < N_LAYER; l++) {
        int budget = -1;
        ckv_plan_budget(plan, l, &budget);
        printf("  layer %d: budget %3d, kept", l, budget);
        for (int g = 0; g < n_groups; g++) {
            int n = -1;
            ckv_plan_group(plan, l, g, &n, NULL, NULL, NULL);
            printf(" %d", n);
        }
        printf("\n");
    }
}

/* ---- the simple functions -------------------------------------------------------------------------- */

static void test_basics(void) {
    CHECK(strcmp(ckv_last_error(), "") == 0); /* nothing failed yet on this thread */
    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", CKV_VERSION_MAJOR, CKV_VERSION_MINOR, CKV_VERSION_PATCH);
    CHECK(strcmp(ckv_version(), want) == 0);
    CHECK(strcmp(ckv_status_name(CKV_OK), "CKV_OK") == 0);
    CHECK(strcmp(ckv_status_name(CKV_ERR_SIZE), "CKV_ERR_SIZE") == 0);
    CHECK(strcmp(ckv_status_name(CKV_ERR_PANIC), "CKV_ERR_PANIC") == 0);
    CHECK(ckv_status_name((ckv_status) 99) != NULL && strcmp(ckv_status_name((ckv_status) 99), "CKV_OK") != 0);

    ckv_params p;
    memset(&p, 0, sizeof p);
    OK(ckv_params_default(&p));
    CHECK(p.size == sizeof(ckv_params) && p.method == CKV_METHOD_COMPRESSKV && p.window == 8 &&
          p.window_end == -1 && p.pool_kernel == 5 && p.pool == CKV_POOL_AVG && p.n_srh == 4 && p.floor == 32 &&
          p.budget > 0 && fabsf(p.pyramid_beta - 20.0f) < 1e-6f && p.head_reduce == CKV_POOL_AVG);
    REFUSED(ckv_params_default(NULL), CKV_ERR_NULL, "params");

    ckv_method m = CKV_METHOD_COMPRESSKV;
    OK(ckv_method_from_name("snapkv", &m));
    CHECK(m == CKV_METHOD_SNAPKV);
    OK(ckv_method_from_name("pyramidkv", &m));
    CHECK(m == CKV_METHOD_PYRAMIDKV);
    OK(ckv_method_from_name("streamingllm", &m));
    CHECK(m == CKV_METHOD_STREAMINGLLM);
    OK(ckv_method_from_name("snapkv-srh", &m));
    CHECK(m == CKV_METHOD_SNAPKV_SRH);
    OK(ckv_method_from_name("gate", &m));
    CHECK(m == CKV_METHOD_GATE);
    OK(ckv_method_from_name("compresskv", &m));
    CHECK(m == CKV_METHOD_COMPRESSKV);
    REFUSED(ckv_method_from_name("bogus_method", &m), CKV_ERR_INVALID_ARG, "bogus_method");
    CHECK(m == CKV_METHOD_COMPRESSKV);
    REFUSED(ckv_method_from_name(NULL, &m), CKV_ERR_NULL, "name");
    REFUSED(ckv_method_from_name("snapkv", NULL), CKV_ERR_NULL, "out");

    char fp[17];
    OK(ckv_fingerprint("", fp, sizeof fp));
    CHECK(strcmp(fp, "cbf29ce484222325") == 0);
    OK(ckv_fingerprint("a", fp, sizeof fp));
    CHECK(strcmp(fp, "af63dc4c8601ec8c") == 0);
    char small[16];
    memset(small, 'x', sizeof small);
    REFUSED(ckv_fingerprint("a", small, sizeof small), CKV_ERR_SIZE, "buf_size");
    CHECK(small[0] == 'x' && small[15] == 'x');
    REFUSED(ckv_fingerprint(NULL, fp, sizeof fp), CKV_ERR_NULL, "meta");
    REFUSED(ckv_fingerprint("a", NULL, 17), CKV_ERR_NULL, "buf");
    OK(ckv_fingerprint("example|4|4|2|32", fp_model, sizeof fp_model));
}

static void test_dequantize(void) {
    uint16_t h[4] = {0x3C00, 0xC000, 0x3800, 0x0000}; /* 1, -2, 0.5, 0 */
    float    out[64];
    OK(ckv_dequantize_row(CKV_TYPE_F16, h, sizeof h, out, 4));
    CHECK(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0.5f && out[3] == 0.0f);

    uint8_t q[34];
    q[0] = 0x00;
    q[1] = 0x40; /* scale 2.0 */
    for (int j = 0; j < 32; j++) q[2 + j] = (uint8_t) (int8_t) (j - 16);
    OK(ckv_dequantize_row(CKV_TYPE_Q8_0, q, sizeof q, out, 32));
    int ok = 1;
    for (int j = 0; j < 32; j++) ok &= out[j] == 2.0f * (float) (j - 16);
    CHECK(ok);

    for (int j = 0; j < 64; j++) out[j] = 42.0f;
    REFUSED(ckv_dequantize_row(5, q, sizeof q, out, 32), CKV_ERR_UNSUPPORTED_TYPE, "type");
    REFUSED(ckv_dequantize_row(-1, q, sizeof q, out, 32), CKV_ERR_UNSUPPORTED_TYPE, "type");
    REFUSED(ckv_dequantize_row(CKV_TYPE_Q8_0, NULL, sizeof q, out, 32), CKV_ERR_NULL, "src");
    REFUSED(ckv_dequantize_row(CKV_TYPE_Q8_0, q, sizeof q, NULL, 32), CKV_ERR_NULL, "dst");
    REFUSED(ckv_dequantize_row(CKV_TYPE_Q8_0, q, sizeof q - 1, out, 32), CKV_ERR_SIZE, "src_size");
    REFUSED(ckv_dequantize_row(CKV_TYPE_Q8_0, q, sizeof q, out, 16), CKV_ERR_INVALID_ARG, "block size");
    REFUSED(ckv_dequantize_row(CKV_TYPE_Q8_0, q, sizeof q, out, -32), CKV_ERR_INVALID_ARG, "n");
    REFUSED(ckv_dequantize_row(CKV_TYPE_F32, out, 32, out + 4, 8), CKV_ERR_INVALID_ARG, "overlap");
    ok = 1;
    for (int j = 0; j < 64; j++) ok &= out[j] == 42.0f;
    CHECK(ok);
}

static void test_budgets(void) {
    int    b[N_LAYER];
    double w[N_LAYER] = {0.1, 0.2, 0.3, 0.4};
    OK(ckv_budget_allocate(CKV_ALLOC_UNIFORM, 64, N_LAYER, 32, 20.0f, NULL, b));
    CHECK(b[0] == 64 && b[1] == 64 && b[2] == 64 && b[3] == 64);
    OK(ckv_budget_allocate(CKV_ALLOC_PYRAMID, 64, N_LAYER, 32, 20.0f, NULL, b));
    CHECK(b[0] + b[1] + b[2] + b[3] == 4 * 64 && b[0] >= b[3]);
    OK(ckv_budget_allocate(CKV_ALLOC_WEIGHTED, 64, N_LAYER, 32, 20.0f, w, b));
    CHECK(b[0] + b[1] + b[2] + b[3] == 4 * 64 && b[0] >= 32 && b[0] <= b[1] && b[1] <= b[2] && b[2] <= b[3]);
    printf("weighted budgets (weights 0.1 0.2 0.3 0.4, avg 64): %d %d %d %d\n", b[0], b[1], b[2], b[3]);

    for (int l = 0; l < N_LAYER; l++) b[l] = -7;
    double bad_w[N_LAYER] = {0.5, 0.5, 0.5, 0.5};
    double neg_w[N_LAYER] = {0.5, 0.5, 0.5, -0.5};
    REFUSED(ckv_budget_allocate((ckv_alloc) 7, 64, N_LAYER, 32, 20.0f, NULL, b), CKV_ERR_INVALID_ARG, "alloc");
    REFUSED(ckv_budget_allocate(CKV_ALLOC_UNIFORM, 0, N_LAYER, 32, 20.0f, NULL, b), CKV_ERR_INVALID_ARG, "avg");
    REFUSED(ckv_budget_allocate(CKV_ALLOC_UNIFORM, 64, 0, 32, 20.0f, NULL, b), CKV_ERR_INVALID_ARG, "n_layer");
    REFUSED(ckv_budget_allocate(CKV_ALLOC_UNIFORM, 64, N_LAYER, -1, 20.0f, NULL, b), CKV_ERR_INVALID_ARG, "floor");
    REFUSED(ckv_budget_allocate(CKV_ALLOC_UNIFORM, 64, N_LAYER, 32, 20.0f, NULL, NULL), CKV_ERR_NULL, "out");
    REFUSED(ckv_budget_allocate(CKV_ALLOC_PYRAMID, 64, N_LAYER, 32, 0.0f, NULL, b), CKV_ERR_INVALID_ARG, "beta");
    REFUSED(ckv_budget_allocate(CKV_ALLOC_WEIGHTED, 64, N_LAYER, 32, 20.0f, NULL, b), CKV_ERR_NULL, "weights");
    REFUSED(ckv_budget_allocate(CKV_ALLOC_WEIGHTED, 64, N_LAYER, 32, 20.0f, bad_w, b), CKV_ERR_INVALID_ARG, "weights");
    REFUSED(ckv_budget_allocate(CKV_ALLOC_WEIGHTED, 64, N_LAYER, 32, 20.0f, neg_w, b), CKV_ERR_INVALID_ARG,
            "weights[3]");
    CHECK(b[0] == -7 && b[3] == -7);

    /* the average whose largest layer budget fits the cells one can spend */
    ckv_params p;
    OK(ckv_params_default(&p));
    int avg = -1;
    p.method = CKV_METHOD_SNAPKV;
    OK(ckv_budget_fit(&p, NULL, N_LAYER, 256, &avg));
    CHECK(avg == 256);
    p.method = CKV_METHOD_PYRAMIDKV;
    OK(ckv_budget_fit(&p, NULL, N_LAYER, 256, &avg));
    OK(ckv_budget_allocate(CKV_ALLOC_PYRAMID, avg, N_LAYER, 0, p.pyramid_beta, NULL, b));
    CHECK(avg < 256 && b[0] <= 256);
    printf("pyramid budgets fitting 256 cells: average %d, layer 0 %d\n", avg, b[0]);
    REFUSED(ckv_budget_fit(&p, NULL, N_LAYER, 0, &avg), CKV_ERR_INVALID_ARG, "slots");
    REFUSED(ckv_budget_fit(&p, NULL, 0, 256, &avg), CKV_ERR_INVALID_ARG, "n_layer");
    REFUSED(ckv_budget_fit(NULL, NULL, N_LAYER, 256, &avg), CKV_ERR_NULL, "params");
    REFUSED(ckv_budget_fit(&p, NULL, N_LAYER, 256, NULL), CKV_ERR_NULL, "out");
}

static ckv_profile * test_profiles(void) {
    char           json[2048];
    ckv_model_desc m        = model_desc();
    ckv_profile *  sentinel = (ckv_profile *) (uintptr_t) 0x10;
    ckv_profile *  p        = sentinel;

    int len = profile_json(json, sizeof json, N_LAYER, 1);
    OK(ckv_profile_parse(json, (size_t) len, &m, &p));
    CHECK(p != NULL && p != sentinel);
    ckv_profile_free(p);
    ckv_profile_free(NULL);

    /* a profile for another model: 5 layers */
    p   = sentinel;
    len = profile_json(json, sizeof json, 5, 1);
    REFUSED(ckv_profile_parse(json, (size_t) len, &m, &p), CKV_ERR_PROFILE, "n_layer: profile 5, model 4");
    CHECK(p == sentinel);
    ckv_model_desc other = m;
    other.arch           = "llama";
    other.shape.head_dim = 64;
    len                  = profile_json(json, sizeof json, N_LAYER, 1);
    REFUSED(ckv_profile_parse(json, (size_t) len, &other, &p), CKV_ERR_PROFILE, "head_dim: profile 32, model 64");
    CHECK(strstr(ckv_last_error(), "arch") != NULL);
    other                = m;
    other.fingerprint    = "0000000000000000";
    REFUSED(ckv_profile_parse(json, (size_t) len, &other, &p), CKV_ERR_PROFILE, "fingerprint");
    other             = m;
    other.arch        = NULL;
    REFUSED(ckv_profile_parse(json, (size_t) len, &other, &p), CKV_ERR_NULL, "model.arch");
    other             = m;
    other.fingerprint = NULL;
    REFUSED(ckv_profile_parse(json, (size_t) len, &other, &p), CKV_ERR_NULL, "model.fingerprint");
    other                 = m;
    other.shape.n_head_kv = 3;
    REFUSED(ckv_profile_parse(json, (size_t) len, &other, &p), CKV_ERR_INVALID_ARG, "n_head_kv");
    REFUSED(ckv_profile_parse(json, 20, &m, &p), CKV_ERR_PROFILE, "JSON");
    REFUSED(ckv_profile_parse(NULL, 20, &m, &p), CKV_ERR_NULL, "json");
    REFUSED(ckv_profile_parse(json, (size_t) len, &m, NULL), CKV_ERR_NULL, "out");
    len = profile_json(json, sizeof json, N_LAYER, 2);
    REFUSED(ckv_profile_parse(json, (size_t) len, &m, &p), CKV_ERR_PROFILE, "version");
    CHECK(p == sentinel);

    /* from a file */
    char path[] = "/tmp/ckv_abi_test_XXXXXX";
    int  fd     = mkstemp(path);
    CHECK(fd >= 0);
    len = profile_json(json, sizeof json, N_LAYER, 1);
    CHECK(fd >= 0 && write(fd, json, (size_t) len) == len);
    if (fd >= 0) close(fd);
    REFUSED(ckv_profile_load("/nonexistent/ckv_profile.json", &m, &p), CKV_ERR_IO, "/nonexistent/ckv_profile.json");
    REFUSED(ckv_profile_load(NULL, &m, &p), CKV_ERR_NULL, "path");
    REFUSED(ckv_profile_load(path, &m, NULL), CKV_ERR_NULL, "out");
    REFUSED(ckv_profile_load(path, &other, &p), CKV_ERR_INVALID_ARG, "n_head_kv");
    CHECK(p == sentinel);
    ckv_profile * loaded = NULL;
    OK(ckv_profile_load(path, &m, &loaded));
    OK(ckv_profile_load(path, NULL, &p)); /* no model check */
    ckv_profile_free(p);
    unlink(path);
    return loaded;
}

/* A directory holding a profile for another model (5 layers), a broken file and the example's profile:
 * ckv_profile_find picks the example's, writes its path, and refuses the rest. */
static void test_profile_find(void) {
    char           dir[] = "/tmp/ckv_abi_test_dir_XXXXXX";
    char           path[3][64], json[2048], found[64];
    const char *   names[3] = {"a-other.json", "b-broken.json", "c-example.json"};
    ckv_model_desc m        = model_desc();
    ckv_profile *  sentinel = (ckv_profile *) (uintptr_t) 0x10;
    ckv_profile *  p        = sentinel;
    if (mkdtemp(dir) == NULL) {
        CHECK(!"mkdtemp");
        return;
    }
    for (int i = 0; i < 3; i++) {
        snprintf(path[i], sizeof path[i], "%s/%s", dir, names[i]);
        int   len = i == 1 ? snprintf(json, sizeof json, "{\"version\": 1,") :
                             profile_json(json, sizeof json, i == 0 ? 5 : N_LAYER, 1);
        FILE * f  = fopen(path[i], "w");
        CHECK(f != NULL && fwrite(json, 1, (size_t) len, f) == (size_t) len);
        if (f) fclose(f);
    }

    memset(found, 'x', sizeof found);
    OK(ckv_profile_find(dir, &m, found, sizeof found, &p));
    CHECK(p != NULL && p != sentinel && strcmp(found, path[2]) == 0);
    ckv_profile_free(p);
    p = sentinel;
    OK(ckv_profile_find(dir, &m, NULL, 0, &p)); /* path not wanted */
    CHECK(p != NULL && p != sentinel);
    ckv_profile_free(p);

    p = sentinel;
    memset(found, 'x', sizeof found);
    REFUSED(ckv_profile_find(dir, &m, found, strlen(path[2]), &p), CKV_ERR_SIZE, "path_buf_size");
    CHECK(p == sentinel && found[0] == 'x');
    ckv_model_desc other = m;
    other.fingerprint    = "0000000000000000";
    REFUSED(ckv_profile_find(dir, &other, found, sizeof found, &p), CKV_ERR_PROFILE, "no profile in");
    CHECK(strstr(ckv_last_error(), "a-other.json (the profile is for another model: n_layer: profile 5") != NULL &&
          strstr(ckv_last_error(), "b-broken.json (not valid JSON") != NULL &&
          strstr(ckv_last_error(), "c-example.json (the profile is for another model: fingerprint") != NULL);
    REFUSED(ckv_profile_find("/nonexistent/ckv_profiles", &m, found, sizeof found, &p), CKV_ERR_IO,
            "/nonexistent/ckv_profiles");
    REFUSED(ckv_profile_find(NULL, &m, found, sizeof found, &p), CKV_ERR_NULL, "dir");
    REFUSED(ckv_profile_find(dir, NULL, found, sizeof found, &p), CKV_ERR_NULL, "model");
    REFUSED(ckv_profile_find(dir, &m, NULL, sizeof found, &p), CKV_ERR_NULL, "path_buf");
    REFUSED(ckv_profile_find(dir, &m, found, sizeof found, NULL), CKV_ERR_NULL, "out");
    CHECK(p == sentinel && found[0] == 'x');

    for (int i = 0; i < 3; i++) unlink(path[i]);
    rmdir(dir);
}

/* ---- plans ----------------------------------------------------------------------------------------- */

static void test_plan_create_refusals(const ckv_params * good, ckv_profile * wrong_profile) {
    ckv_shape          shape    = {N_LAYER, N_HEAD, N_HEAD_KV, HEAD_DIM};
    ckv_plan *         sentinel = (ckv_plan *) (uintptr_t) 0x10;
    ckv_plan *         out      = sentinel;
    const float *const *q       = (const float *const *) queries;
    ckv_params         p;
    ckv_shape          s;
    ckv_buffer         kb[N_LAYER];
    int                cl[N_TOK];
    const float *      qn[N_LAYER];

#define WITH_PARAMS(field, value) (p = *good, p.field = (value), &p)
#define WITH_SHAPE(field, value) (s = shape, s.field = (value), &s)
#define WITH_KEY(l, field, value) (memcpy(kb, C.kb, sizeof kb), kb[l].field = (value), kb)
#define WITH_CELL(i, value) (memcpy(cl, cells, sizeof cl), cl[i] = (value), cl)

    REFUSED(ckv_plan_create(NULL, &shape, NULL, cells, N_TOK, C.kb, q, &out), CKV_ERR_NULL, "params");
    REFUSED(ckv_plan_create(good, NULL, NULL, cells, N_TOK, C.kb, q, &out), CKV_ERR_NULL, "shape");
    REFUSED(ckv_plan_create(good, &shape, NULL, NULL, N_TOK, C.kb, q, &out), CKV_ERR_NULL, "cells");
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, N_TOK, NULL, q, &out), CKV_ERR_NULL, "keys");
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, N_TOK, C.kb, NULL, &out), CKV_ERR_NULL, "queries");
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, N_TOK, C.kb, q, NULL), CKV_ERR_NULL, "out");

    REFUSED(ckv_plan_create(WITH_PARAMS(size, 0), &shape, NULL, cells, N_TOK, C.kb, q, &out), CKV_ERR_SIZE,
            "params.size");
    REFUSED(ckv_plan_create(WITH_PARAMS(size, 4), &shape, NULL, cells, N_TOK, C.kb, q, &out), CKV_ERR_SIZE,
            "params.size");
    REFUSED(ckv_plan_create(WITH_PARAMS(method, (ckv_method) 9), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "params.method");
    REFUSED(ckv_plan_create(WITH_PARAMS(method, CKV_METHOD_SNAPKV_SRH), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_PROFILE, "profile");
    REFUSED(ckv_plan_create(WITH_PARAMS(method, CKV_METHOD_GATE), &shape, NULL, cells, N_TOK, C.kb, NULL, &out),
            CKV_ERR_PROFILE, "key gate");
    REFUSED(ckv_plan_create(WITH_PARAMS(budget, 0), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "budget");
    REFUSED(ckv_plan_create(WITH_PARAMS(budget, -64), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "params.budget");
    REFUSED(ckv_plan_create(WITH_PARAMS(window, N_TOK + 1), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "window");
    REFUSED(ckv_plan_create(WITH_PARAMS(window, 0), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "params.window");
    REFUSED(ckv_plan_create(WITH_PARAMS(window_end, N_TOK + 5), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "window_end");
    REFUSED(ckv_plan_create(WITH_PARAMS(window_end, 3), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "window_end");
    REFUSED(ckv_plan_create(WITH_PARAMS(window_end, -2), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "window_end");
    REFUSED(ckv_plan_create(WITH_PARAMS(n_sink, -1), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "n_sink");
    REFUSED(ckv_plan_create(WITH_PARAMS(pool_kernel, 4), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "pool_kernel");
    REFUSED(ckv_plan_create(WITH_PARAMS(pool, (ckv_pool) 3), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "params.pool");
    REFUSED(ckv_plan_create(WITH_PARAMS(chunk, -16), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "chunk");
    REFUSED(ckv_plan_create(WITH_PARAMS(per_head, 2), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "per_head");
    REFUSED(ckv_plan_create(WITH_PARAMS(fill, 7), &shape, NULL, cells, N_TOK, C.kb, q, &out), CKV_ERR_INVALID_ARG,
            "fill");
    REFUSED(ckv_plan_create(WITH_PARAMS(floor, -1), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "floor");
    REFUSED(ckv_plan_create(WITH_PARAMS(pyramid_beta, -1.0f), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "pyramid_beta");
    REFUSED(ckv_plan_create(WITH_PARAMS(head_reduce, 2), &shape, NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "head_reduce");
    p          = *good;
    p.method   = CKV_METHOD_COMPRESSKV;
    p.n_srh    = 0;
    REFUSED(ckv_plan_create(&p, &shape, NULL, cells, N_TOK, C.kb, q, &out), CKV_ERR_INVALID_ARG, "n_srh");
    p        = *good;
    p.budget = 0;
    p.ratio  = 1.5f;
    REFUSED(ckv_plan_create(&p, &shape, NULL, cells, N_TOK, C.kb, q, &out), CKV_ERR_INVALID_ARG, "ratio");

    REFUSED(ckv_plan_create(good, WITH_SHAPE(n_layer, 0), NULL, cells, N_TOK, C.kb, q, &out), CKV_ERR_INVALID_ARG,
            "n_layer");
    REFUSED(ckv_plan_create(good, WITH_SHAPE(n_head_kv, 3), NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "n_head_kv");
    REFUSED(ckv_plan_create(good, WITH_SHAPE(head_dim, -32), NULL, cells, N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "head_dim");
    REFUSED(ckv_plan_create(good, WITH_SHAPE(head_dim, 16), NULL, cells, N_TOK, C.kb, q, &out), CKV_ERR_INVALID_ARG,
            "n_embd");
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, 0, C.kb, q, &out), CKV_ERR_INVALID_ARG, "n_tokens");
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, -5, C.kb, q, &out), CKV_ERR_INVALID_ARG, "n_tokens");

    REFUSED(ckv_plan_create(good, &shape, NULL, cells, N_TOK, WITH_KEY(1, type, 5), q, &out),
            CKV_ERR_UNSUPPORTED_TYPE, "keys[1].type");
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, N_TOK, WITH_KEY(2, size, C.ksize - 1), q, &out), CKV_ERR_SIZE,
            "keys[2].size");
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, N_TOK, WITH_KEY(0, n_embd, 32), q, &out), CKV_ERR_INVALID_ARG,
            "n_embd");
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, N_TOK, WITH_KEY(3, data, NULL), q, &out), CKV_ERR_NULL,
            "keys[3].data");
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, N_TOK, WITH_KEY(0, transposed, 2), q, &out),
            CKV_ERR_INVALID_ARG, "transposed");
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, N_TOK, WITH_KEY(1, stride, 10), q, &out), CKV_ERR_INVALID_ARG,
            "stride");
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, N_TOK, WITH_KEY(2, n_cells, 0), q, &out), CKV_ERR_INVALID_ARG,
            "n_cells");

    REFUSED(ckv_plan_create(good, &shape, NULL, WITH_CELL(5, N_CELLS + 44), N_TOK, C.kb, q, &out),
            CKV_ERR_INVALID_ARG, "cells[5]");
    REFUSED(ckv_plan_create(good, &shape, NULL, WITH_CELL(0, -1), N_TOK, C.kb, q, &out), CKV_ERR_INVALID_ARG,
            "cells[0]");
    REFUSED(ckv_plan_create(good, &shape, NULL, WITH_CELL(7, cells[3]), N_TOK, C.kb, q, &out), CKV_ERR_INVALID_ARG,
            "cells[3] and cells[7]");

    memcpy(qn, queries, sizeof qn);
    qn[2] = NULL;
    REFUSED(ckv_plan_create(good, &shape, NULL, cells, N_TOK, C.kb, qn, &out), CKV_ERR_NULL, "queries[2]");

    /* a profile for another model: its shape is 5 layers */
    p        = *good;
    p.method = CKV_METHOD_COMPRESSKV;
    REFUSED(ckv_plan_create(&p, &shape, wrong_profile, cells, N_TOK, C.kb, q, &out), CKV_ERR_PROFILE, "n_layer");

    CHECK(out == sentinel);
#undef WITH_PARAMS
#undef WITH_SHAPE
#undef WITH_KEY
#undef WITH_CELL
}

static void test_accessor_refusals(ckv_plan * plan) {
    int          n = -3, b = -3;
    const int *  kept = NULL;
    size_t       needed = 0;
    char         buf[16];

    CHECK(ckv_plan_n_slots(NULL) == -1 && strstr(ckv_last_error(), "plan") != NULL);
    CHECK(ckv_plan_n_groups(NULL) == -1 && strstr(ckv_last_error(), "ckv_plan_n_groups") != NULL);
    CHECK(ckv_plan_fallback(NULL) == -1 && strstr(ckv_last_error(), "ckv_plan_fallback") != NULL);
    REFUSED(ckv_plan_group(NULL, 0, 0, &n, &kept, NULL, NULL), CKV_ERR_NULL, "plan");
    REFUSED(ckv_plan_group(plan, N_LAYER, 0, &n, &kept, NULL, NULL), CKV_ERR_INVALID_ARG, "il");
    REFUSED(ckv_plan_group(plan, -1, 0, &n, &kept, NULL, NULL), CKV_ERR_INVALID_ARG, "il");
    REFUSED(ckv_plan_group(plan, 0, ckv_plan_n_groups(plan), &n, &kept, NULL, NULL), CKV_ERR_INVALID_ARG, "ig");
    CHECK(n == -3 && kept == NULL);
    REFUSED(ckv_plan_budget(NULL, 0, &b), CKV_ERR_NULL, "plan");
    REFUSED(ckv_plan_budget(plan, 0, NULL), CKV_ERR_NULL, "out");
    REFUSED(ckv_plan_budget(plan, N_LAYER, &b), CKV_ERR_INVALID_ARG, "il");
    CHECK(b == -3);

    REFUSED(ckv_plan_stats_json(NULL, buf, sizeof buf, &needed), CKV_ERR_NULL, "plan");
    REFUSED(ckv_plan_stats_json(plan, NULL, 10, &needed), CKV_ERR_NULL, "buf");
    memset(buf, 'x', sizeof buf);
    REFUSED(ckv_plan_stats_json(plan, buf, sizeof buf, &needed), CKV_ERR_SIZE, "buf_size");
    CHECK(needed > sizeof buf && buf[0] == 'x' && buf[15] == 'x');
    needed = 0;
    REFUSED(ckv_plan_stats_json(plan, NULL, 0, &needed), CKV_ERR_SIZE, "buf_size");
    CHECK(needed > 100);
    char * exact = malloc(needed);
    memset(exact, 'x', needed);
    REFUSED(ckv_plan_stats_json(plan, exact, needed, &needed), CKV_ERR_SIZE, "NUL");
    CHECK(exact[0] == 'x');
    free(exact);
}

static void test_compact_refusals(ckv_plan * plan) {
    ckv_buffer kb[N_LAYER], vb[N_LAYER];
#define WITH_K(l, field, value) (memcpy(kb, C.kb, sizeof kb), kb[l].field = (value), kb)
#define WITH_V(l, field, value) (memcpy(vb, C.vb, sizeof vb), vb[l].field = (value), vb)
    REFUSED(ckv_compact(NULL, C.kb, C.vb), CKV_ERR_NULL, "plan");
    REFUSED(ckv_compact(plan, NULL, C.vb), CKV_ERR_NULL, "k");
    REFUSED(ckv_compact(plan, C.kb, C.kb), CKV_ERR_INVALID_ARG, "overlap");
    REFUSED(ckv_compact(plan, C.kb, WITH_V(1, data, C.v[0])), CKV_ERR_INVALID_ARG, "overlap");
    REFUSED(ckv_compact(plan, WITH_K(3, data, C.k[2] + 64), C.vb), CKV_ERR_INVALID_ARG, "overlap");
    REFUSED(ckv_compact(plan, WITH_K(1, type, 13), C.vb), CKV_ERR_UNSUPPORTED_TYPE, "k[1].type");
    REFUSED(ckv_compact(plan, WITH_K(0, size, 100), C.vb), CKV_ERR_SIZE, "k[0].size");
    REFUSED(ckv_compact(plan, WITH_K(2, n_embd, 32), C.vb), CKV_ERR_INVALID_ARG, "k[2].n_embd");
    REFUSED(ckv_compact(plan, WITH_K(3, data, NULL), C.vb), CKV_ERR_NULL, "k[3].data");
    REFUSED(ckv_compact(plan, WITH_K(0, n_cells, 100), C.vb), CKV_ERR_INVALID_ARG, "k[0].n_cells");
    REFUSED(ckv_compact(plan, C.kb, WITH_V(3, n_cells, 150)), CKV_ERR_INVALID_ARG, "v[3].n_cells");
    REFUSED(ckv_compact(plan, C.kb, WITH_V(2, size, 10)), CKV_ERR_SIZE, "v[2].size");
    REFUSED(ckv_compact(plan, C.kb, WITH_V(1, transposed, 5)), CKV_ERR_INVALID_ARG, "v[1].transposed");
    if (C.vtrans) {
        REFUSED(ckv_compact(plan, C.kb, WITH_V(0, type, CKV_TYPE_Q8_0)), CKV_ERR_UNSUPPORTED_TYPE, "transposed");
    } else {
        REFUSED(ckv_compact(plan, C.kb, WITH_V(0, type, CKV_TYPE_F32)), CKV_ERR_SIZE, "v[0].size");
    }

    /* the checksum reads the cells of every layer's K then V and writes only its 17 bytes */
    char sum[17], sum2[17], small[16];
    OK(ckv_checksum(C.kb, C.vb, N_LAYER, cells, N_TOK, sum, sizeof sum));
    CHECK(strlen(sum) == 16 && unchanged());
    OK(ckv_checksum(C.kb, C.vb, N_LAYER, cells, N_TOK, sum2, sizeof sum2));
    CHECK(strcmp(sum, sum2) == 0);
    OK(ckv_checksum(C.kb, C.vb, N_LAYER, cells, N_TOK - 1, sum2, sizeof sum2));
    CHECK(strcmp(sum, sum2) != 0);
    REFUSED(ckv_checksum(NULL, C.vb, N_LAYER, cells, N_TOK, sum, sizeof sum), CKV_ERR_NULL, "k");
    REFUSED(ckv_checksum(C.kb, C.vb, -1, cells, N_TOK, sum, sizeof sum), CKV_ERR_INVALID_ARG, "n_layer");
    REFUSED(ckv_checksum(C.kb, WITH_V(2, n_cells, 8), N_LAYER, cells, N_TOK, sum, sizeof sum), CKV_ERR_INVALID_ARG, "v[2]");
    REFUSED(ckv_checksum(C.kb, C.vb, N_LAYER, cells, N_TOK, small, sizeof small), CKV_ERR_SIZE, "buf_size");
    REFUSED(ckv_request_hidden(NULL, 0, (uint8_t *) small, 1), CKV_ERR_NULL, "req");
    REFUSED(ckv_request_plan_scored(NULL, NULL, NULL, NULL, NULL, 0, NULL, NULL, NULL, NULL), CKV_ERR_NULL, "score");

    /* the device gather of layer 1: its pairs are the plan's moves in units, within each block's span */
    int32_t nb = -1, ng = ckv_plan_n_groups(plan), kept = 0;
    int64_t np = -1;
    for (int32_t g = 0; g < ng; g++) {
        int32_t n = 0;
        OK(ckv_plan_group(plan, 1, g, &n, NULL, NULL, NULL));
        kept += n;
    }
    OK(ckv_plan_gather(plan, 1, 0, N_EMBD, N_CELLS, 0, INT32_MAX, NULL, 0, NULL, NULL, 0, &nb, &np));
    CHECK(nb == (kept > 0) && np == kept);
    OK(ckv_plan_gather(plan, 1, 1, N_EMBD, N_CELLS, 1, 3 * N_CELLS, NULL, 0, NULL, NULL, 0, &nb, &np));
    CHECK(nb == (N_EMBD + 2) / 3 && np == (int64_t) kept * N_EMBD / ng);
    ckv_gather_block * gb = calloc(nb, sizeof *gb);
    int32_t * gsrc = calloc(np, sizeof *gsrc), * gdst = calloc(np, sizeof *gdst);
    REFUSED(ckv_plan_gather(plan, 1, 1, N_EMBD, N_CELLS, 1, 3 * N_CELLS, gb, nb - 1, gsrc, gdst, np, &nb, &np),
            CKV_ERR_SIZE, "cap_blocks");
    CHECK(gb[0].span == 0 && gsrc[0] == 0);
    OK(ckv_plan_gather(plan, 1, 1, N_EMBD, N_CELLS, 1, 3 * N_CELLS, gb, nb, gsrc, gdst, np, &nb, &np));
    int ok_units = 1;
    for (int32_t b = 0; b < nb; b++) {
        ok_units &= gb[b].span <= 3 * N_CELLS && gb[b].base == ((int64_t) N_EMBD + 3 * b) * N_CELLS;
        for (int32_t j = 0; j < gb[b].n; j++) {
            ok_units &= gsrc[gb[b].first + j] >= 0 && gsrc[gb[b].first + j] < gb[b].span && gdst[gb[b].first + j] < gb[b].span;
        }
    }
    CHECK(ok_units);
    free(gb);
    free(gsrc);
    free(gdst);
    REFUSED(ckv_plan_gather(NULL, 1, 0, N_EMBD, N_CELLS, 0, INT32_MAX, NULL, 0, NULL, NULL, 0, &nb, &np), CKV_ERR_NULL, "plan");
    REFUSED(ckv_plan_gather(plan, N_LAYER, 0, N_EMBD, N_CELLS, 0, INT32_MAX, NULL, 0, NULL, NULL, 0, &nb, &np), CKV_ERR_INVALID_ARG, "il");
    REFUSED(ckv_plan_gather(plan, 1, 2, N_EMBD, N_CELLS, 0, INT32_MAX, NULL, 0, NULL, NULL, 0, &nb, &np), CKV_ERR_INVALID_ARG, "transposed");
    REFUSED(ckv_plan_gather(plan, 1, 0, N_EMBD, 0, 0, INT32_MAX, NULL, 0, NULL, NULL, 0, &nb, &np), CKV_ERR_INVALID_ARG, "kv_size");
    REFUSED(ckv_plan_gather(plan, 1, 0, N_EMBD, N_CELLS, 0, 0, NULL, 0, NULL, NULL, 0, &nb, &np), CKV_ERR_INVALID_ARG, "max_units");
    REFUSED(ckv_plan_gather(plan, 1, 1, N_EMBD, N_CELLS, 0, N_CELLS - 1, NULL, 0, NULL, NULL, 0, &nb, &np), CKV_ERR_SIZE, "units");
    REFUSED(ckv_plan_gather(plan, 1, 0, N_EMBD, N_CELLS, 0, INT32_MAX, NULL, 0, NULL, NULL, 0, NULL, &np), CKV_ERR_NULL, "n_blocks");
#undef WITH_K
#undef WITH_V
}

static ckv_plan * make_plan(const ckv_params * p, const ckv_profile * profile, int with_queries) {
    ckv_shape shape = {N_LAYER, N_HEAD, N_HEAD_KV, HEAD_DIM};
    ckv_plan * plan = NULL;
    OK(ckv_plan_create(p, &shape, profile, cells, N_TOK, C.kb,
                       with_queries ? (const float *const *) queries : NULL, &plan));
    CHECK(unchanged()); /* planning reads, never writes */
    return plan;
}

int main(void) {
    for (int i = 0; i < N_TOK; i++) {
        cells[i]         = (i * 7 + 3) % N_CELLS; /* distinct, scattered */
        in_seq[cells[i]] = 1;
    }
    for (int l = 0; l < N_LAYER; l++) {
        queries[l] = malloc(sizeof(float) * Q_LEN);
        for (int j = 0; j < Q_LEN; j++) queries[l][j] = next_f();
    }

    test_basics();
    test_dequantize();
    test_budgets();
    ckv_profile * profile = test_profiles();
    CHECK(profile != NULL);
    test_profile_find();

    /* A profile parsed without a model check, for a model with 5 layers. */
    char          json[2048];
    ckv_profile * wrong = NULL;
    int           len   = profile_json(json, sizeof json, 5, 1);
    OK(ckv_profile_parse(json, (size_t) len, NULL, &wrong));

    /* ---- A: f16 K rows, f16 V transposed, SnapKV budget 64 ---- */
    cache_init(CKV_TYPE_F16, CKV_TYPE_F16, 1);
    snapshot();
    ckv_params p;
    ckv_params_default(&p);
    p.method = CKV_METHOD_SNAPKV;
    p.budget = 64;
    test_plan_create_refusals(&p, wrong);
    ckv_plan * plan = make_plan(&p, NULL, 1);
    if (plan) {
        print_plan("A snapkv f16 (V transposed)", plan);
        CHECK(ckv_plan_n_slots(plan) == 64 && ckv_plan_n_groups(plan) == 1 && ckv_plan_fallback(plan) == 0);
        int ok = 1;
        for (int l = 0; l < N_LAYER; l++) {
            int n = 0, b = 0;
            ok &= ckv_plan_group(plan, l, 0, &n, NULL, NULL, NULL) == CKV_OK && n == 64;
            ok &= ckv_plan_budget(plan, l, &b) == CKV_OK && b == 64;
        }
        CHECK(ok);
        test_accessor_refusals(plan);

        size_t needed = 0;
        REFUSED(ckv_plan_stats_json(plan, NULL, 0, &needed), CKV_ERR_SIZE, "buf_size");
        char * stats = malloc(needed + 1);
        OK(ckv_plan_stats_json(plan, stats, needed + 1, &needed));
        CHECK(strlen(stats) == needed);
        CHECK(strstr(stats, "\"method\":\"snapkv\"") != NULL && strstr(stats, "\"n_prompt\":200") != NULL &&
              strstr(stats, "\"budget\":64") != NULL && strstr(stats, "\"layers\":[") != NULL &&
              strstr(stats, "\"window\":{") != NULL && strstr(stats, "\"n_slots\":64") != NULL);
        printf("stats: %s\n", stats);
        free(stats);

        test_compact_refusals(plan);
        OK(ckv_compact(plan, C.kb, C.vb));
        verify_compaction(plan, 1);
        ckv_plan_free(plan);
    }

    /* ---- B: q8_0 K and V rows, CompressKV with a profile, per KV head, exact form ---- */
    cache_init(CKV_TYPE_Q8_0, CKV_TYPE_Q8_0, 0);
    snapshot();
    ckv_params_default(&p);
    p.method   = CKV_METHOD_COMPRESSKV;
    p.budget   = 64;
    p.per_head = 1;
    p.fill     = 0;
    p.n_srh    = 2;
    plan       = make_plan(&p, profile, 1);
    if (plan) {
        print_plan("B compresskv q8_0 per head, exact", plan);
        CHECK(ckv_plan_n_groups(plan) == N_HEAD_KV && ckv_plan_fallback(plan) == 0);
        int ok = 1, total = 0, max_b = 0;
        for (int l = 0; l < N_LAYER; l++) {
            int b = 0;
            ok &= ckv_plan_budget(plan, l, &b) == CKV_OK;
            total += b;
            max_b = b > max_b ? b : max_b;
            for (int g = 0; g < N_HEAD_KV; g++) {
                int n = 0;
                ok &= ckv_plan_group(plan, l, g, &n, NULL, NULL, NULL) == CKV_OK && n == (b < N_TOK ? b : N_TOK);
            }
        }
        CHECK(ok && total == 64 * N_LAYER && ckv_plan_n_slots(plan) == max_b);
        test_compact_refusals(plan);
        OK(ckv_compact(plan, C.kb, C.vb));
        verify_compaction(plan, 1);
        ckv_plan_free(plan);
    }

    /* CompressKV without a profile falls back to all heads. */
    snapshot();
    p.per_head = 0;
    plan       = make_plan(&p, NULL, 1);
    if (plan) CHECK(ckv_plan_fallback(plan) == 1);
    ckv_plan_free(plan);

    /* An older caller whose ckv_params ends before `floor`: the rest takes the defaults. The invalid floor
     * beyond the declared size would be refused if it were read. */
    ckv_params_default(&p);
    p.method = CKV_METHOD_SNAPKV;
    p.budget = 48;
    p.floor  = -12345;
    p.size   = offsetof(ckv_params, floor);
    plan     = make_plan(&p, NULL, 1);
    if (plan) {
        int ok = 1;
        for (int l = 0; l < N_LAYER; l++) {
            int b = 0;
            ok &= ckv_plan_budget(plan, l, &b) == CKV_OK && b == 48;
        }
        CHECK(ok);
    }
    ckv_plan_free(plan);

    /* ---- C: StreamingLLM needs no queries; K only ---- */
    snapshot();
    ckv_params_default(&p);
    p.method = CKV_METHOD_STREAMINGLLM;
    p.budget = 32;
    plan     = make_plan(&p, NULL, 0);
    if (plan) {
        print_plan("C streamingllm q8_0, K only", plan);
        int n = 0;
        const int * kept = NULL;
        OK(ckv_plan_group(plan, 0, 0, &n, &kept, NULL, NULL));
        CHECK(n == 32 && kept[0] == 0 && kept[3] == 3 && kept[4] == N_TOK - 28 && kept[31] == N_TOK - 1);
        OK(ckv_compact(plan, C.kb, NULL));
        int v_same = 1;
        for (int l = 0; l < N_LAYER; l++) v_same &= memcmp(C.v[l], C.v0[l], C.vsize) == 0;
        CHECK(v_same);
        verify_compaction(plan, 0);
        ckv_plan_free(plan);
    }

    ckv_profile_free(profile);
    ckv_profile_free(wrong);
    for (int l = 0; l < N_LAYER; l++) {
        free(queries[l]);
        free(C.k[l]);
        free(C.v[l]);
        free(C.k0[l]);
        free(C.v0[l]);
    }
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
