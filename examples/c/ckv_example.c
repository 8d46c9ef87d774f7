/*
 * ckv_example.c - compress one sequence of a small f16 KV cache with compresskv's C API.
 *
 * A model of 2 layers, 4 query heads sharing 2 KV heads (head_dim 32) has a 64-cell cache whose cells
 * 16..63 hold a 48-token prompt. The last 8 queries (the observation window) point at tokens 5, 17 and 30,
 * so SnapKV with a budget of 16 tokens per layer keeps those three, the window, and the best of the rest.
 * The kept tokens' K and V rows are then moved down to the sequence's first cells (16, 17, ...).
 *
 * Build (after `cargo build --release`):
 *   cc -std=c11 -Iinclude examples/c/ckv_example.c target/release/libcompresskv.a -lpthread -ldl -lm
 * The full test of the API, every refusal included, is tests/c/ckv_abi_test.c.
 */
#include "compresskv.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_LAYER 2
#define N_HEAD 4
#define N_HEAD_KV 2
#define HEAD_DIM 32
#define N_EMBD (N_HEAD_KV * HEAD_DIM) /* elements per cell */
#define N_CELLS 64
#define N_TOK 48
#define FIRST_CELL 16
#define WINDOW 8

/* Stop with the status's name and the library's message if a call failed. */
static void check(ckv_status st, const char * what) {
    if (st != CKV_OK) {
        fprintf(stderr, "%s failed: %s: %s\n", what, ckv_status_name(st), ckv_last_error());
        exit(1);
    }
}

/* float -> IEEE half, truncating (enough for the small values used here); half -> float for the check. */
static uint16_t f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, m = x & 0x7fffffu;
    int32_t  e    = (int32_t) ((x >> 23) & 0xffu) - 127 + 15;
    if (e <= 0) return (uint16_t) sign;
    return (uint16_t) (sign | ((uint32_t) e << 10) | (m >> 13));
}
static float h2f(uint16_t h) {
    float out;
    check(ckv_dequantize_row(CKV_TYPE_F16, &h, sizeof h, &out, 1), "ckv_dequantize_row");
    return out;
}

int main(void) {
    static uint16_t k[N_LAYER][N_CELLS][N_EMBD], v[N_LAYER][N_CELLS][N_EMBD];
    static float    q[N_LAYER][WINDOW * N_HEAD * HEAD_DIM];
    const int       important[3] = {5, 17, 30};
    float           dir[HEAD_DIM];
    int32_t         cells[N_TOK];
    uint32_t        rng = 12345;

    printf("compresskv %s\n", ckv_version());
    for (int d = 0; d < HEAD_DIM; d++) dir[d] = (d * 7 % 5 < 2) ? 1.0f : -1.0f;

    /* The cache: small pseudo-random keys, and the direction the queries look for at the important tokens.
     * Every element of a token's V row is the token's index, so that the moves can be seen afterwards. */
    for (int i = 0; i < N_TOK; i++) cells[i] = FIRST_CELL + i;
    for (int l = 0; l < N_LAYER; l++) {
        for (int c = 0; c < N_CELLS; c++) {
            int tok = c - FIRST_CELL, hit = 0;
            for (int j = 0; j < 3; j++) hit |= tok == important[j];
            for (int e = 0; e < N_EMBD; e++) {
                rng = rng * 1103515245u + 12345u;
                float noise = (float) ((rng >> 16) % 1000u) / 4000.0f - 0.125f;
                k[l][c][e]  = f2h(hit ? dir[e % HEAD_DIM] : noise);
                v[l][c][e]  = f2h(tok >= 0 ? (float) tok : -1.0f);
            }
        }
        for (int j = 0; j < WINDOW * N_HEAD; j++) memcpy(&q[l][j * HEAD_DIM], dir, sizeof dir);
    }

    /* Describe the buffers as llama.cpp lays them out: one f16 row per cell (stride 0: packed). */
    ckv_buffer kb[N_LAYER], vb[N_LAYER];
    const float * queries[N_LAYER];
    for (int l = 0; l < N_LAYER; l++) {
        kb[l]      = (ckv_buffer) {k[l], sizeof k[l], CKV_TYPE_F16, N_EMBD, N_CELLS, 0, 0};
        vb[l]      = (ckv_buffer) {v[l], sizeof v[l], CKV_TYPE_F16, N_EMBD, N_CELLS, 0, 0};
        queries[l] = q[l];
    }

    ckv_params params;
    check(ckv_params_default(&params), "ckv_params_default");
    params.method      = CKV_METHOD_SNAPKV; /* CompressKV proper needs a calibrated profile */
    params.budget      = 16;                /* tokens kept per layer, the window included */
    params.window      = WINDOW;
    params.pool_kernel = 1; /* no pooling: score each token on its own */

    ckv_shape  shape = {N_LAYER, N_HEAD, N_HEAD_KV, HEAD_DIM};
    ckv_plan * plan  = NULL;
    check(ckv_plan_create(&params, &shape, NULL, cells, N_TOK, kb, queries, &plan), "ckv_plan_create");
    int n_slots = ckv_plan_n_slots(plan);
    printf("plan: %d tokens -> %d cells\n", N_TOK, n_slots);

    /* Errors come back as a status and a message; the failing call writes nothing. */
    ckv_buffer short_k[N_LAYER];
    memcpy(short_k, kb, sizeof kb);
    short_k[1].size -= 1;
    ckv_status st = ckv_compact(plan, short_k, NULL);
    printf("a short K buffer is refused: %s (%s)\n", ckv_status_name(st), ckv_last_error());
    if (st != CKV_ERR_SIZE) return 1;

    check(ckv_compact(plan, kb, vb), "ckv_compact");

    /* Each layer's kept tokens (ascending), and where they went. */
    int moved_ok = 1;
    for (int l = 0; l < N_LAYER; l++) {
        int32_t         n = 0;
        const int32_t * kept, * src, * dst;
        check(ckv_plan_group(plan, l, 0, &n, &kept, &src, &dst), "ckv_plan_group");
        printf("layer %d: kept %d:", l, n);
        for (int j = 0; j < n; j++) {
            printf(" %d", kept[j]);
            if (h2f(v[l][dst[j]][0]) != (float) kept[j]) moved_ok = 0;
        }
        printf("\n");
        if (n > 0) printf("  token %d: cell %d -> cell %d\n", kept[0], src[0], dst[0]);
    }
    ckv_plan_free(plan);
    if (!moved_ok) {
        fprintf(stderr, "a kept token's V row is not in its new cell\n");
        return 1;
    }
    printf("ok: the kept tokens' rows are in cells %d..%d\n", FIRST_CELL, FIRST_CELL + n_slots - 1);
    return 0;
}
