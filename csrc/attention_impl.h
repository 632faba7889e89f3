// Causal GQA attention with an online softmax (see AttentionFn in kernels.h), written once and
// compiled into each instruction set's translation unit (qmatmul_{scalar,avx2,avx512}.cpp).
// The few vector operations it needs come from that unit's flags: 16 lanes with AVX-512, 8 with
// AVX2, and plain floats otherwise, which is the scalar twin. The instruction sets differ only
// in rounding (fused multiply-adds, the order of the lane sums); a result never depends on the
// thread count, since each call owns whole query rows of one KV head.
// Internal linkage only (see kernels.h).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "formats.h"
#include "kernels.h"

namespace lfm {
namespace {

constexpr int64_t kKeyTile = 64;      // scores kept at once per query: no [T, S] matrix
constexpr int64_t kMaxHeadDim = 256;  // checked by the bindings
constexpr int64_t kMaxGroup = 16;     // query heads per KV head, checked by the bindings

// e^x for x <= 0 (softmax arguments), to about 2 ulp: Cody-Waite reduction to r in
// [-ln2/2, ln2/2], a degree-6 polynomial for e^r, then the exponent. Plain float arithmetic,
// so a loop over it vectorizes.
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * r * r + r + 1.0f;
    // 2^n, n in [-126, 0] for x in [-87, 0]. Outside (x = NaN or > 0, from a NaN or inf score)
    // n is clamped so that the int conversion and the shift stay defined; e is NaN there anyway
    // for NaN and +inf, so the result is what it was.
    float nc = n >= -126.0f ? n : -126.0f;  // NaN -> -126
    nc = nc <= 127.0f ? nc : 127.0f;
    const int32_t bits = (static_cast<int32_t>(nc) + 127) << 23;
    float two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return e * two_n;
}

// ---------------------------------------------------------------- this unit's vectors
#if defined(__AVX512F__)
constexpr int64_t kWidth = 16;
using Vec = __m512;
static inline Vec vzero() { return _mm512_setzero_ps(); }
static inline Vec vset1(float x) { return _mm512_set1_ps(x); }
static inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a); }
static inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
static inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
static inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
static inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }
static inline float vmax_all(Vec a) { return _mm512_reduce_max_ps(a); }
#elif defined(__AVX2__)
constexpr int64_t kWidth = 8;
using Vec = __m256;
static inline Vec vzero() { return _mm256_setzero_ps(); }
static inline Vec vset1(float x) { return _mm256_set1_ps(x); }
static inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a); }
static inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
static inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
static inline float vsum(Vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float vmax_all(Vec a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else  // the scalar twin: one lane
constexpr int64_t kWidth = 1;
using Vec = float;
static inline Vec vzero() { return 0.0f; }
static inline Vec vset1(float x) { return x; }
static inline Vec vload(const float* p) { return *p; }
static inline void vstore(float* p, Vec a) { *p = a; }
static inline Vec vadd(Vec a, Vec b) { return a + b; }
static inline Vec vfma(Vec a, Vec b, Vec c) { return a * b + c; }
static inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }
static inline float vsum(Vec a) { return a; }
static inline float vmax_all(Vec a) { return a; }
#endif

// One cache element or kWidth of them as float32: the KV cache holds float32 or IEEE half.
static inline float kv_scalar(const float* p) { return *p; }
static inline float kv_scalar(const uint16_t* p) {
#if defined(__F16C__)
    return _cvtsh_ss(*p);
#else
    return fp16_to_f32(*p);
#endif
}
static inline Vec kv_load(const float* p) { return vload(p); }
static inline Vec kv_load(const uint16_t* p) {
#if defined(__AVX512F__)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    return fp16_to_f32(*p);
#endif
}

// p[g0 + k][j] = q_{g0 + k} . key * scale for NG query heads (q [group, d]): the key row is
// loaded once for all of them, the NG sums run as independent chains.
template <int NG, typename KV>
static inline void score_heads(const float* q, int64_t d, const KV* key, float scale,
                               float (*p)[kKeyTile], int64_t g0, int64_t j) {
    Vec s[NG];
    for (int k = 0; k < NG; ++k) s[k] = vzero();
    int64_t i = 0;
    for (; i + kWidth <= d; i += kWidth) {
        const Vec kv = kv_load(key + i);
        for (int k = 0; k < NG; ++k) s[k] = vfma(vload(q + (g0 + k) * d + i), kv, s[k]);
    }
    for (int k = 0; k < NG; ++k) {
        float total = vsum(s[k]);
        for (int64_t c = i; c < d; ++c) total += q[(g0 + k) * d + c] * kv_scalar(key + c);
        p[g0 + k][j] = total * scale;
    }
}

// acc[g][c .. c + kWidth) += sum_j p[g][j] * v_j[c ..] for NG query heads starting at g0: the NG
// accumulators stay in registers while the tile's value rows (already in L1 after the first
// column) stream past.
template <int NG, typename KV>
static inline void accumulate_values(float (*acc)[kMaxHeadDim], const float (*p)[kKeyTile],
                                     int64_t g0, const KV* values, int64_t d, int64_t n,
                                     int64_t c) {
    Vec a[NG];
    for (int k = 0; k < NG; ++k) a[k] = vload(acc[g0 + k] + c);
    for (int64_t j = 0; j < n; ++j) {
        const Vec v = kv_load(values + j * d + c);
        for (int k = 0; k < NG; ++k) a[k] = vfma(vset1(p[g0 + k][j]), v, a[k]);
    }
    for (int k = 0; k < NG; ++k) vstore(acc[g0 + k] + c, a[k]);
}

// One tile of n consecutive keys and values [n, d] for the `group` query heads q [group, d].
template <typename KV>
static inline void attend_tile(const float* q, int64_t group, int64_t d, float scale,
                               const KV* keys, const KV* values, int64_t n,
                               float (*acc)[kMaxHeadDim], float (*p)[kKeyTile], float* m, float* l) {
    // Scores, key-major: each key row is read from memory once, for every head of the group.
    // The keys stream past the hardware prefetcher; ask for the tile's values now, so that
    // they arrive while the scores are computed.
    const int64_t row_bytes = d * static_cast<int64_t>(sizeof(KV));
    for (int64_t j = 0; j < n; ++j) {
        const KV* key = keys + j * d;
        const char* value = reinterpret_cast<const char*>(values + j * d);
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(value + b);
        int64_t g = 0;
        for (; g + 4 <= group; g += 4) score_heads<4>(q, d, key, scale, p, g, j);
        switch (group - g) {
            case 3: score_heads<3>(q, d, key, scale, p, g, j); break;
            case 2: score_heads<2>(q, d, key, scale, p, g, j); break;
            case 1: score_heads<1>(q, d, key, scale, p, g, j); break;
            default: break;
        }
    }
    const int64_t n_vec = n - n % kWidth;
    for (int64_t g = 0; g < group; ++g) {
        float* pg = p[g];
        Vec vm = vset1(m[g]);
        for (int64_t j = 0; j < n_vec; j += kWidth) vm = vmax(vm, vload(pg + j));
        float tile_max = vmax_all(vm);
        for (int64_t j = n_vec; j < n; ++j) tile_max = pg[j] > tile_max ? pg[j] : tile_max;
        const float correction = exp_nonpositive(m[g] - tile_max);
        m[g] = tile_max;
        for (int64_t j = 0; j < n; ++j) pg[j] = exp_nonpositive(pg[j] - tile_max);  // vectorizes
        Vec vs = vzero();
        for (int64_t j = 0; j < n_vec; j += kWidth) vs = vadd(vs, vload(pg + j));
        float tile_sum = vsum(vs);
        for (int64_t j = n_vec; j < n; ++j) tile_sum += pg[j];
        l[g] = l[g] * correction + tile_sum;
        if (correction != 1.0f) {
            for (int64_t i = 0; i < d; ++i) acc[g][i] *= correction;
        }
    }
    const int64_t d_vec = d - d % kWidth;
    for (int64_t c = 0; c < d_vec; c += kWidth) {
        int64_t g = 0;
        for (; g + 4 <= group; g += 4) accumulate_values<4>(acc, p, g, values, d, n, c);
        switch (group - g) {
            case 3: accumulate_values<3>(acc, p, g, values, d, n, c); break;
            case 2: accumulate_values<2>(acc, p, g, values, d, n, c); break;
            case 1: accumulate_values<1>(acc, p, g, values, d, n, c); break;
            default: break;
        }
    }
    for (int64_t g = 0; g < group; ++g) {  // the columns past the last whole vector
        for (int64_t j = 0; j < n; ++j) {
            const KV* v = values + j * d;
            for (int64_t i = d_vec; i < d; ++i) acc[g][i] += p[g][j] * kv_scalar(v + i);
        }
    }
}

template <typename KV>
static void attention_rows_of(const AttentionArgs& a, int64_t kvh, int64_t t_begin, int64_t t_end) {
    const int64_t d = a.head_dim;
    const int64_t group = a.n_heads / a.n_kv;
    const KV* keys = static_cast<const KV*>(a.k) + kvh * a.head_stride;  // [capacity, d]
    const KV* values = static_cast<const KV*>(a.v) + kvh * a.head_stride;
    alignas(64) float acc[kMaxGroup][kMaxHeadDim];  // the running sum of p * v per query head
    alignas(64) float p[kMaxGroup][kKeyTile];       // scores, then probabilities, of one tile
    float m[kMaxGroup], l[kMaxGroup];               // running max and running sum of p
    for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t n_keys = a.q_start + t + 1;  // causal: keys 0 .. q_start + t
        const float* q = a.q + (t * a.n_heads + kvh * group) * d;  // [group, d]
        for (int64_t g = 0; g < group; ++g) {
            m[g] = -3.0e38f;
            l[g] = 0.0f;
            for (int64_t i = 0; i < d; ++i) acc[g][i] = 0.0f;
        }
        for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyTile) {
            const int64_t n = n_keys - j0 < kKeyTile ? n_keys - j0 : kKeyTile;
            attend_tile(q, group, d, a.scale, keys + j0 * d, values + j0 * d, n, acc, p, m, l);
        }
        float* out = a.out + (t * a.n_heads + kvh * group) * d;
        for (int64_t g = 0; g < group; ++g) {
            const float inverse = 1.0f / l[g];
            for (int64_t i = 0; i < d; ++i) out[g * d + i] = acc[g][i] * inverse;
        }
    }
}

static void attention_rows(const AttentionArgs& a, int64_t kvh, int64_t t_begin, int64_t t_end) {
    if (a.kv_type == KvType::F16) {
        attention_rows_of<uint16_t>(a, kvh, t_begin, t_end);
    } else {
        attention_rows_of<float>(a, kvh, t_begin, t_end);
    }
}

}  // namespace
}  // namespace lfm
