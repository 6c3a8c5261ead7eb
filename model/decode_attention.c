/* Attention for decode rows, read straight from the paged KV pool: no gathered copy, no padding.
 *
 * Row b's query q[b] (H heads of D) attends over the pool slots idx[b, 0 .. len[b]) of k and v
 * (slots, n_kv, D) float32; query head h reads kv head h / (H / n_kv) (grouped-query attention):
 *
 *     y[b, h] = sum_s softmax_s(scale * q[b, h] . k[slot_s, kv]) * v[slot_s, kv]
 *
 * torch's path gathered every row's keys and values into a padded (B, n_kv, S, D) copy and ran
 * one masked SDPA over it: three passes over the cache's bytes (read, write, read) and a kernel
 * made for long queries. Here each (row, kv head) is one task that reads its slots once, in order,
 * for each query head sharing them, so a row's result is bit for bit the same alone or in any
 * batch, whatever the other rows' lengths. Scores are kept for a two-pass softmax (max, then exp)
 * with a vectorised exp; sums run in float32. Built by model/ckernels.py (gcc -O3 -mavx2 -mfma
 * -fopenmp), called by model/paged_attention.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* sc[s] = scale * q . k[slots[s]] for s < n, four slots at a time: four independent accumulators
 * keep the FMA units busy (one chain waits on each FMA's latency). Every slot's dot runs the same
 * operations in the same order, in a group of four or in the tail, so a score never depends on
 * how many slots the row has. */
static void scores(const float *q, const float *k, const int64_t *slots, int n, long stride, int D, float scale,
                   float *sc) {
    int s = 0;
    for (; s + 4 <= n; s += 4) {
        const float *k0 = k + slots[s] * stride, *k1 = k + slots[s + 1] * stride;
        const float *k2 = k + slots[s + 2] * stride, *k3 = k + slots[s + 3] * stride;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + d), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + d), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + d), a3);
        }
        sc[s] = hsum(a0) * scale, sc[s + 1] = hsum(a1) * scale, sc[s + 2] = hsum(a2) * scale;
        sc[s + 3] = hsum(a3) * scale;
    }
    for (; s < n; s++) {
        const float *ks = k + slots[s] * stride;
        __m256 a0 = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(ks + d), a0);
        sc[s] = hsum(a0) * scale;
    }
}

/* p[s] = softmax(row)[s], in place */
static void softmax(float *row, int n) {
    float mx = -INFINITY;
    for (int s = 0; s < n; s++) mx = row[s] > mx ? row[s] : mx;
    __m256 total = _mm256_setzero_ps();
    const __m256 vmx = _mm256_set1_ps(mx);
    int s = 0;
    for (; s + 8 <= n; s += 8) {
        __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(row + s), vmx));
        _mm256_storeu_ps(row + s, e);
        total = _mm256_add_ps(total, e);
    }
    float sum = hsum(total);
    for (; s < n; s++) { /* the tail through the same exp, one lane used */
        row[s] = _mm256_cvtss_f32(exp_neg(_mm256_set1_ps(row[s] - mx)));
        sum += row[s];
    }
    const float inv = 1.0f / sum;
    for (s = 0; s < n; s++) row[s] *= inv;
}

/* out (D) = sum_s p[s] * v[slots[s]]: slot by slot, each of the D/8 lanes its own chain */
static void weighted_values(const float *p, const float *v, const int64_t *slots, int n, long stride, int D,
                            float *out) {
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, _mm256_setzero_ps());
    for (int s = 0; s < n; s++) {
        const float *vs = v + slots[s] * stride;
        const __m256 ps = _mm256_set1_ps(p[s]);
        for (int d = 0; d < D; d += 8)
            _mm256_storeu_ps(out + d, _mm256_fmadd_ps(ps, _mm256_loadu_ps(vs + d), _mm256_loadu_ps(out + d)));
    }
}

/* One (row, kv head): its G query heads over its n slots. sc: scratch of n floats. */
static void attend_group(const float *q, const float *k, const float *v, const int64_t *slots, int n, int G,
                         int n_kv, int D, int kvh, float scale, float *y, float *sc) {
    const long stride = (long)n_kv * D;
    k += (long)kvh * D, v += (long)kvh * D;
    for (int g = 0; g < G; g++) {
        scores(q + (long)g * D, k, slots, n, stride, D, scale, sc);
        softmax(sc, n);
        weighted_values(sc, v, slots, n, stride, D, y + (long)g * D);
    }
}

/* q (B, H, D), y (B, H, D); k, v (slots, n_kv, D); idx (B, width) int64 slots, lens (B) int64, each
 * 1 <= lens[b] <= width. D a multiple of 8, H a multiple of n_kv. Returns 0, or -1 when out of memory. */
int decode_attention(const float *q, const float *k, const float *v, const int64_t *idx, const int64_t *lens,
                     int B, int width, int H, int n_kv, int D, float scale, float *y) {
    const int G = H / n_kv;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int task = 0; task < B * n_kv; task++) {
        const int b = task / n_kv, kvh = task % n_kv;
        const int n = (int)lens[b];
        float *sc = malloc(sizeof(float) * (size_t)n);
        if (!sc) {
            failed = 1;
            continue;
        }
        const long head0 = (long)b * H + (long)kvh * G; /* this group's first query head */
        attend_group(q + head0 * D, k, v, idx + (long)b * width, n, G, n_kv, D, kvh, scale, y + head0 * D, sc);
        free(sc);
    }
    return failed ? -1 : 0;
}
