/* One decoder layer (Llama family or Gemma 3) for M decode rows (one new token each), in one call.
 *
 * A decode step of a small model is mostly overhead around its matmuls: SmolLM2-135M's 30 layers
 * cost ~21 ms a token through torch (compiled or eager) on 2 cores, of which the int4 kernels are
 * ~6 ms; at 8 rows ~43 ms against ~30 ms. Here a layer is a straight run of C over buffers:
 *
 *     h = norm(x);  q, k, v = h @ wqkv.T;  [q, k = per-head norms];  rope(q, k)
 *     k, v -> the pool at the row's slot;  a = attention over the row's slots (decode_attention.c)
 *     h = a @ wo.T;  [h = post_norm(h)];  x += h
 *     h = norm(x);  g, u = h @ w13.T;  h = (act(g) * u) @ w2.T;  [h = post_norm(h)];  x += h
 *
 * the operations of model/llama.py's Block (SwiGLU) and model/gemma3.py's GemmaBlock (q/k norms,
 * post-norms, GeGLU), float32 throughout, RoPE in the HF rotate_half layout, with the matmuls of
 * model/q4dot.c. A norm is x * rsqrt(mean(x^2) + eps) * scale, the scale being Llama's w or
 * Gemma's 1 + w (computed by the caller in float32, as GemmaRMSNorm does). Every step treats each
 * row on its own, so a row's result is bit for bit the same alone or in any batch.
 * model/fused_decode.py calls it for decode rows when every projection is a q4dot weight without
 * bias; anything else keeps torch's path. Built by model/ckernels.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decode_attention.c"
#include "q4dot.c"

struct linear {
    const uint8_t *w;   /* (n, k/2) 4-bit nibbles or (n, k) int8, model/q4dot.c's layout */
    const uint16_t *dm; /* (n, 2, k/32) float16 */
    int bits;           /* 4 or 8 */
    int n;              /* output features */
};

/* mirrored by model/fused_decode.py's LayerSpec: keep the two in the same order */
struct decoder_layer {
    int dim, n_heads, n_kv, head_dim, hidden;
    int gelu; /* the feed-forward's gate: 0 SiLU (SwiGLU), 1 GELU with the tanh approximation (GeGLU) */
    float eps, scale;
    const float *attn_norm, *ffn_norm;           /* (dim) norm scales before attention / feed-forward */
    const float *q_norm, *k_norm;                /* (head_dim) per-head scales, or NULL */
    const float *post_attn_norm, *post_ffn_norm; /* (dim) scales of the outputs, or NULL */
    struct linear wqkv, wo, w13, w2;
};

static int linear(const struct linear *l, const float *x, float *y, int M, int K) {
    return matmul(l->bits == 4 ? U4_TILES : Q8_TILES, l->w, l->dm, x, y, M, l->n, K);
}

/* out = w * (x * rsqrt(mean(x^2) + eps)) per row of D (out may be x), rounding as RMSNorm.forward */
static void rmsnorm(const float *x, const float *w, float *out, int M, int D, float eps) {
    for (int m = 0; m < M; m++) {
        const float *xr = x + (long)m * D;
        float *o = out + (long)m * D;
        __m256 acc = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= D; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (; i < D; i++) ss += xr[i] * xr[i];
        const float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (i = 0; i < D; i++) o[i] = w[i] * (xr[i] * r);
    }
}

/* v (heads, hd) rotated in place: v[i] = v[i] cos[i] - v[i + hd/2] sin[i], v[i + hd/2] = v[i + hd/2]
 * cos[i + hd/2] + v[i] sin[i + hd/2] (apply_rope's x * cos + rotate_half(x) * sin) */
static void rope(float *v, int heads, int hd, const float *cos, const float *sin) {
    const int half = hd / 2;
    for (int h = 0; h < heads; h++) {
        float *p = v + (long)h * hd;
        for (int i = 0; i < half; i++) {
            const float a = p[i], b = p[i + half];
            p[i] = a * cos[i] + (-b) * sin[i];
            p[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/* tanh(y) = sign(y) (1 - e^-2|y|) / (1 + e^-2|y|) */
static inline __m256 tanh_ps(__m256 y) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    const __m256 a = _mm256_andnot_ps(sign, y);
    const __m256 t = exp_neg(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f)));
    const __m256 r = _mm256_div_ps(_mm256_sub_ps(one, t), _mm256_add_ps(one, t));
    return _mm256_or_ps(r, _mm256_and_ps(y, sign));
}

/* silu(x) = x * sigmoid(x), with e^-|x| from exp_neg: x / (1 + e^-x), or x e^x / (1 + e^x) below 0 */
static inline __m256 silu_ps(__m256 x) {
    const __m256 t = exp_neg(_mm256_or_ps(x, _mm256_set1_ps(-0.0f))); /* e^-|x| */
    const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, t), x);
    return _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0f), t));
}

/* torch's gelu(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
static inline __m256 gelu_tanh_ps(__m256 x) {
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(0.7978845608f),
                                       _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    const __m256 half_x = _mm256_mul_ps(_mm256_set1_ps(0.5f), x);
    return _mm256_mul_ps(half_x, _mm256_add_ps(_mm256_set1_ps(1.0f), tanh_ps(inner)));
}

/* out[m, j] = act(gu[m, j]) * gu[m, F + j], F a multiple of 8 (the caller's K % 32) */
static void gated(const float *gu, float *out, int M, int F, int gelu) {
    for (int m = 0; m < M; m++) {
        const float *g = gu + (long)m * 2 * F, *u = g + F;
        float *o = out + (long)m * F;
        for (int j = 0; j < F; j += 8) {
            const __m256 x = _mm256_loadu_ps(g + j);
            const __m256 a = gelu ? gelu_tanh_ps(x) : silu_ps(x);
            _mm256_storeu_ps(o + j, _mm256_mul_ps(a, _mm256_loadu_ps(u + j)));
        }
    }
}

static void add_into(float *x, const float *y, long n) {
    for (long i = 0; i < n; i++) x[i] += y[i];
}

/* The layer over x (M, dim), in place. cos/sin (M, head_dim): each row's RoPE angles. Each row's
 * new key/value go to slots[m] of the pools (slots, n_kv, head_dim) float32; row m then attends
 * over idx[m, 0 .. lens[m]) (width columns), which includes that slot. 0, or -1 out of memory. */
int decode_layer(const struct decoder_layer *L, float *x, int M, const float *cos, const float *sin, float *k_pool,
                 float *v_pool, const int64_t *slots, const int64_t *idx, const int64_t *lens, int width) {
    const int D = L->dim, H = L->n_heads, KV = L->n_kv, hd = L->head_dim, F = L->hidden;
    const int qn = H * hd, kvn = KV * hd, qkv_n = qn + 2 * kvn;
    const long per_row = (long)D + qkv_n + 2L * qn + 2L * F + F;
    float *buf = malloc(sizeof(float) * (size_t)M * per_row);
    if (!buf) return -1;
    float *h = buf, *qkv = h + (long)M * D, *q = qkv + (long)M * qkv_n, *att = q + (long)M * qn;
    float *gu = att + (long)M * qn, *act = gu + 2L * M * F;
    int rc = 0;

    rmsnorm(x, L->attn_norm, h, M, D, L->eps);
    rc |= linear(&L->wqkv, h, qkv, M, D);
    for (int m = 0; m < M && !rc; m++) {
        float *row = qkv + (long)m * qkv_n;
        const float *c = cos + (long)m * hd, *s = sin + (long)m * hd;
        if (L->q_norm) rmsnorm(row, L->q_norm, row, H, hd, L->eps);
        if (L->k_norm) rmsnorm(row + qn, L->k_norm, row + qn, KV, hd, L->eps);
        rope(row, H, hd, c, s);
        rope(row + qn, KV, hd, c, s);
        memcpy(q + (long)m * qn, row, sizeof(float) * qn);
        memcpy(k_pool + slots[m] * kvn, row + qn, sizeof(float) * kvn);
        memcpy(v_pool + slots[m] * kvn, row + qn + kvn, sizeof(float) * kvn);
    }
    if (!rc) rc |= decode_attention(q, k_pool, v_pool, idx, lens, M, width, H, KV, hd, L->scale, att);
    if (!rc) rc |= linear(&L->wo, att, h, M, qn);
    if (!rc) {
        if (L->post_attn_norm) rmsnorm(h, L->post_attn_norm, h, M, D, L->eps);
        add_into(x, h, (long)M * D);
        rmsnorm(x, L->ffn_norm, h, M, D, L->eps);
        rc |= linear(&L->w13, h, gu, M, D);
    }
    if (!rc) {
        gated(gu, act, M, F, L->gelu);
        rc |= linear(&L->w2, act, h, M, F);
    }
    if (!rc) {
        if (L->post_ffn_norm) rmsnorm(h, L->post_ffn_norm, h, M, D, L->eps);
        add_into(x, h, (long)M * D);
    }
    free(buf);
    return rc ? -1 : 0;
}
