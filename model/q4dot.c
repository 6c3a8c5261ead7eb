/* 4- and 8-bit weights times 8-bit activations on AVX2: the quantized matmul for CPUs whose torch
 * int4 kernel is slow.
 *
 * y[r, n] = sum over groups g of 32:  d[n,g] * sx[r,g] * (u[n,g,:] . xq[r,g,:])  +  m[n,g] * sx[r,g] * sum(xq[r,g,:])
 *
 * where the weights are w = u * d + m (one d and m per group of 32, float16; u in [0, 15] for
 * 4-bit weights, in [-128, 127] for 8-bit ones) and each row of x is quantized per group of 32 to
 * xq = round(x / sx), sx = max|x| / 127 (llama.cpp's Q8 activations). The dot of 32 unsigned bytes
 * with 32 signed bytes is one vpmaddubsw, so the integer units do the multiply-adds; a weight row's
 * groups are loaded (and unpacked) once for up to 8 rows. 8-bit weights (GGUF's Q8_0, the tied
 * output head of small models) take one pass instead of two 4-bit planes.
 *
 * Every row is computed by the same sequence of operations whatever the batch (each row has its
 * own accumulators, the tiles differ only in how many rows share an unpacking), so a row's result
 * is bit for bit the same alone or in any batch.
 *
 * Layout: 4-bit nib (N, K/32, 16) bytes, byte i of a group holding u[i] (low nibble) and u[i+16]
 * (high); 8-bit q (N, K) int8; dm (N, 2, K/32) float16, each weight row's d, then its m (GGUF's
 * own scales are float16, so Q4_0/Q4_1/Q8_0 lose nothing, and 4-bit weights stay within 1.11x of
 * a Q4_0 file, 8-bit ones within 1.06x of a Q8_0 file). Built by model/ckernels.py (gcc -O3
 * -mavx2 -mfma -mf16c -fopenmp), called by model/q4dot.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define GROUP 32
#define TILE 8  /* rows sharing one unpacking of a weight row's groups */
#define CHUNK 16 /* weight rows per OpenMP task */

/* x (M, K) -> xq (M, K) int8 and xs (2, M, K/32): each row's group scales sx, then sx * sum(xq) */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *xs) {
    const long groups = (long)M * (K / GROUP);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (long rg = 0; rg < groups; rg++) {
        const float *p = x + rg * GROUP;
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(p + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float s = _mm_cvtss_f32(h) / 127.0f;
        const __m256 inv = _mm256_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
        __m256i q[4], sum = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) { /* round half to even */
            q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            sum = _mm256_add_epi32(sum, q[j]);
        }
        /* 32 int32 -> 32 int8; the packs work within 128-bit lanes, the permute puts them back in order */
        __m256i a = _mm256_packs_epi32(q[0], q[1]), b = _mm256_packs_epi32(q[2], q[3]);
        __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + rg * GROUP), bytes);
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        xs[rg] = s;
        xs[groups + rg] = s * (float)_mm_cvtsi128_si32(s4);
    }
}

/* How a tile reads a weight row's group g (BYTES bytes each) and forms the 16-bit pair products
 * of its 32 weights with a row's 32 int8 activations xv (vpmaddubsw: unsigned x signed):
 * - 4-bit: u in [0, 15], byte i holding u[i] and u[i + 16], so u . xv directly;
 * - 8-bit: q in [-128, 127]; |q| . (xv with q's sign) equals q . xv (llama.cpp's trick), and a
 *   pair sums to at most 2 * 128 * 127 = 32512, so the 16-bit sums never saturate. */
#define U4_BYTES 16
#define U4_LOAD(wn, g)                                                                                     \
    __m128i b = _mm_loadu_si128((const __m128i *)((wn) + U4_BYTES * (g)));                                 \
    __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0xF));
#define U4_PAIRS(xv) _mm256_maddubs_epi16(u, xv)
#define Q8_BYTES 32
#define Q8_LOAD(wn, g)                                                                                     \
    __m256i w = _mm256_loadu_si256((const __m256i *)((wn) + Q8_BYTES * (g)));                              \
    __m256i aw = _mm256_sign_epi8(w, w);
#define Q8_PAIRS(xv) _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w))

/* y[r0 .. r0+R, n0 .. n1] for weights of kind KIND (U4 or Q8). R is a constant in each instance,
 * so the R accumulators stay in registers, and each row runs the same operations in every
 * instance. The m terms (sum over g of m[n,g] * sx * sum(xq)) are one vector dot per (row, weight
 * row) after the groups, not a scalar FMA per group in the hot loop: 13-27% quicker at 8 rows. */
#define TILE_KERNEL(KIND, R)                                                                               \
    static void KIND##_tile_##R(const uint8_t *wq, const uint16_t *dm, const int8_t *xq, const float *xs,  \
                                float *y, int M, int N, int K, int n0, int n1, int r0) {                   \
        const int G = K / GROUP;                                                                           \
        const long groups = (long)M * G;                                                                   \
        const __m256i ones = _mm256_set1_epi16(1);                                                         \
        for (int n = n0; n < n1; n++) {                                                                    \
            const uint8_t *wn = wq + (long)n * G * KIND##_BYTES;                                           \
            const uint16_t *dn = dm + (long)n * 2 * G, *mn = dn + G;                                       \
            __m256 acc[R];                                                                                 \
            for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                                      \
            for (int g = 0; g < G; g++) {                                                                  \
                KIND##_LOAD(wn, g)                                                                         \
                const float d = _cvtsh_ss(dn[g]);                                                          \
                for (int r = 0; r < R; r++) {                                                              \
                    const long rg = (long)(r0 + r) * G + g;                                                \
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + rg * GROUP));                   \
                    __m256i p = _mm256_madd_epi16(KIND##_PAIRS(xv), ones);                                 \
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xs[rg]), acc[r]);   \
                }                                                                                          \
            }                                                                                              \
            for (int r = 0; r < R; r++) {                                                                  \
                const float *x2 = xs + groups + (long)(r0 + r) * G;                                        \
                __m256 mv = _mm256_setzero_ps();                                                           \
                int g = 0;                                                                                 \
                for (; g + 8 <= G; g += 8)                                                                 \
                    mv = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mn + g))),      \
                                         _mm256_loadu_ps(x2 + g), mv);                                     \
                float mins = hsum(mv);                                                                     \
                for (; g < G; g++) mins = fmaf(_cvtsh_ss(mn[g]), x2[g], mins);                             \
                y[(long)(r0 + r) * N + n] = hsum(acc[r]) + mins;                                           \
            }                                                                                              \
        }                                                                                                  \
    }
#define TILE_KERNELS(KIND)                                                                                 \
    TILE_KERNEL(KIND, 1) TILE_KERNEL(KIND, 2) TILE_KERNEL(KIND, 3) TILE_KERNEL(KIND, 4)                    \
    TILE_KERNEL(KIND, 5) TILE_KERNEL(KIND, 6) TILE_KERNEL(KIND, 7) TILE_KERNEL(KIND, 8)
TILE_KERNELS(U4)
TILE_KERNELS(Q8)

typedef void (*tile_fn)(const uint8_t *, const uint16_t *, const int8_t *, const float *, float *, int, int, int, int,
                        int, int);
static const tile_fn U4_TILES[TILE + 1] = {0, U4_tile_1, U4_tile_2, U4_tile_3, U4_tile_4,
                                           U4_tile_5, U4_tile_6, U4_tile_7, U4_tile_8};
static const tile_fn Q8_TILES[TILE + 1] = {0, Q8_tile_1, Q8_tile_2, Q8_tile_3, Q8_tile_4,
                                           Q8_tile_5, Q8_tile_6, Q8_tile_7, Q8_tile_8};

/* 0, or -1 when the scratch for the quantized activations cannot be allocated */
static int matmul(const tile_fn *tiles, const uint8_t *wq, const uint16_t *dm, const float *x, float *y, int M,
                  int N, int K) {
    int8_t *xq = malloc((size_t)M * K);                             /* (M, K) int8 */
    float *xs = malloc(2 * (size_t)M * (K / GROUP) * sizeof(float)); /* (2, M, K/32) */
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
    quantize_rows(x, M, K, xq, xs);
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += CHUNK) {
        const int n1 = n0 + CHUNK < N ? n0 + CHUNK : N;
        for (int r0 = 0; r0 < M; r0 += TILE) {
            const int R = M - r0 < TILE ? M - r0 : TILE;
            tiles[R](wq, dm, xq, xs, y, M, N, K, n0, n1, r0);
        }
    }
    free(xq);
    free(xs);
    return 0;
}

/* y (M, N) = x (M, K) @ w.T, K a multiple of 32; 0, or -1 when out of memory. Threads: OpenMP, as
 * many as the calling thread's torch uses.
 * q4dot_matmul: nib (N, K/32, 16) 4-bit weights; q8dot_matmul: q (N, K) int8 weights. */
int q4dot_matmul(const uint8_t *nib, const uint16_t *dm, const float *x, float *y, int M, int N, int K) {
    return matmul(U4_TILES, nib, dm, x, y, M, N, K);
}

int q8dot_matmul(const int8_t *q, const uint16_t *dm, const float *x, float *y, int M, int N, int K) {
    return matmul(Q8_TILES, (const uint8_t *)q, dm, x, y, M, N, K);
}
