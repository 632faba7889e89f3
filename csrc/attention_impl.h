// Causal GQA attention with an online softmax (see AttentionFn in kernels.h), written once and
// compiled into each instruction set's translation unit (qmatmul_{scalar,avx2,avx512}.cpp).
// The few vector operations it needs come from that unit's flags: 16 lanes with AVX-512, 8 with
// AVX2, and plain floats otherwise, which is the scalar twin. The instruction sets differ only
// in rounding (fused multiply-adds, the order of the lane sums); a result never depends on the
// thread count, since each call owns whole query rows of one KV head.
//
// Two ways through, chosen by how many query vectors (rows x the group's heads) a call has:
// - rows: one query row at a time, each key row read once for the group's heads (decode, and
//   the last few rows of a prompt). Memory traffic: all keys and values per query row.
// - tiles (flash attention): tiles of up to kTileQueries query vectors (passes) against tiles
//   of kTileKeys keys. Up to kPasses passes go through the keys together, so that each key and
//   value tile is read and converted to float32 once for all of them. The scores S^T = K Q^T
//   and the update O += P V are register-blocked products on those float32 copies; tiles wholly
//   past a pass's last query are never visited, and the one or two tiles on its diagonal are
//   masked per query. A query's arithmetic does not depend on the pass it falls in.
// Internal linkage only (see kernels.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "formats.h"
#include "kernels.h"
#if defined(__AVX512F__)
#include "reduce_avx512.h"
#endif

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
static inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
static inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
static inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
static inline Vec vfnma(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
static inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
static inline Vec vdiv(Vec a, Vec b) { return _mm512_div_ps(a, b); }
static inline Vec vabs(Vec a) { return _mm512_abs_ps(a); }
static inline Vec vselect_nonnegative(Vec v, Vec a, Vec b) {  // a where v >= 0, else b
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
}
// a * 2^n for n integral in [-126, 0] (vexp_nonpositive's), or NaN where a is NaN: one
// rounding, as the multiply by 2^n in the AVX2 unit, and no clamp needed for the range.
static inline Vec vtimes_pow2(Vec a, Vec n) { return _mm512_scalef_ps(a, n); }
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
static inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
static inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
static inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline Vec vfnma(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
static inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
static inline Vec vdiv(Vec a, Vec b) { return _mm256_div_ps(a, b); }
static inline Vec vabs(Vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline Vec vselect_nonnegative(Vec v, Vec a, Vec b) {  // a where v >= 0, else b
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ));
}
static inline Vec vtimes_pow2(Vec a, Vec n) {  // as the AVX-512 one: a * 2^n, n in [-126, 0] or NaN
    // clamped so that the int conversion and the shift stay defined: NaN -> -126 (a is NaN there)
    n = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(127.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(a, _mm256_castsi256_ps(bits));
}
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
static inline Vec vsub(Vec a, Vec b) { return a - b; }
static inline Vec vmul(Vec a, Vec b) { return a * b; }
static inline Vec vfma(Vec a, Vec b, Vec c) { return a * b + c; }
static inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }
static inline Vec vdiv(Vec a, Vec b) { return a / b; }
static inline Vec vabs(Vec a) { return std::fabs(a); }
static inline Vec vselect_nonnegative(Vec v, Vec a, Vec b) { return v >= 0.0f ? a : b; }
static inline float vsum(Vec a) { return a; }
static inline float vmax_all(Vec a) { return a; }
#endif

// exp_nonpositive on every lane, the same steps on vectors (the compiler leaves the scalar
// function's loops scalar: its clamps and its float-to-int conversion). vmax(a, b) returns b
// where either is NaN, as the scalar function's comparisons do.
#if defined(__AVX512F__) || defined(__AVX2__)
static inline Vec vexp_nonpositive(Vec x) {
    x = vmax(vset1(-87.0f), x);  // a NaN lane stays NaN
    const Vec magic = vset1(12582912.0f);
    const Vec n = vsub(vfma(x, vset1(1.44269504088896341f), magic), magic);
    Vec r = vfnma(n, vset1(0.693359375f), x);
    r = vfnma(n, vset1(-2.12194440e-4f), r);
    Vec p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    const Vec e = vadd(vfma(vmul(p, r), r, r), vset1(1.0f));
    return vtimes_pow2(e, n);  // n in [-126, 0] for x in [-87, 0]
}
#else
static inline Vec vexp_nonpositive(Vec x) { return exp_nonpositive(x); }
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

#if defined(__AVX512F__)
// p[g0 + k][j + r] for 4 query heads (k) x 4 keys (r) from key: each key row is loaded once
// for the four heads, the 16 dot products run as independent chains, and their lanes are
// summed together (sum16) instead of one by one (score_heads). d is a multiple of 16.
template <typename KV>
static inline void score_heads_4x4(const float* q, int64_t d, const KV* key, float scale,
                                   float (*p)[kKeyTile], int64_t g0, int64_t j) {
    Vec s[16];  // s[4k + r]: head g0 + k, key j + r
    for (Vec& v : s) v = vzero();
    for (int64_t i = 0; i < d; i += kWidth) {
        Vec keys[4];
        for (int r = 0; r < 4; ++r) keys[r] = kv_load(key + r * d + i);
        for (int k = 0; k < 4; ++k) {
            const Vec qk = vload(q + (g0 + k) * d + i);
            for (int r = 0; r < 4; ++r) s[4 * k + r] = vfma(qk, keys[r], s[4 * k + r]);
        }
    }
    alignas(64) float scores[16];
    vstore(scores, vmul(sum16(s), vset1(scale)));
    for (int k = 0; k < 4; ++k) std::memcpy(p[g0 + k] + j, scores + 4 * k, 4 * sizeof(float));
}
#endif

// acc[g][c .. c + C * kWidth) += sum_j p[g][j] * v_j[c ..] for NG query heads starting at g0:
// the NG x C accumulators stay in registers while the tile's value rows (already in L1 after
// the first columns) stream past. Each accumulator is one chain of fused multiply-adds over the
// keys in order, so C changes no bit; C vectors a value row give NG x C chains instead of NG,
// enough to keep both FMA pipes busy (NG = 4 chains of 4-cycle FMAs fill half of them).
template <int NG, int C, typename KV>
static inline void accumulate_values(float (*acc)[kMaxHeadDim], const float (*p)[kKeyTile],
                                     int64_t g0, const KV* values, int64_t d, int64_t n,
                                     int64_t c) {
    Vec a[NG][C];
    for (int k = 0; k < NG; ++k) {
        for (int x = 0; x < C; ++x) a[k][x] = vload(acc[g0 + k] + c + x * kWidth);
    }
    for (int64_t j = 0; j < n; ++j) {
        Vec v[C];
        for (int x = 0; x < C; ++x) v[x] = kv_load(values + j * d + c + x * kWidth);
        for (int k = 0; k < NG; ++k) {
            const Vec pk = vset1(p[g0 + k][j]);
            for (int x = 0; x < C; ++x) a[k][x] = vfma(pk, v[x], a[k][x]);
        }
    }
    for (int k = 0; k < NG; ++k) {
        for (int x = 0; x < C; ++x) vstore(acc[g0 + k] + c + x * kWidth, a[k][x]);
    }
}

// Vectors of a value row that accumulate_values takes at once: 16 accumulators for 4 heads with
// AVX-512 (of 32 registers), 8 with AVX2 (of 16).
#if defined(__AVX512F__)
constexpr int kRowValueVecs = 4;
#elif defined(__AVX2__)
constexpr int kRowValueVecs = 2;
#else
constexpr int kRowValueVecs = 1;
#endif

// accumulate_values over the group's heads, four at a time, for columns [c, c + C * kWidth).
template <int C, typename KV>
static inline void accumulate_group_values(float (*acc)[kMaxHeadDim], const float (*p)[kKeyTile],
                                           int64_t group, const KV* values, int64_t d, int64_t n,
                                           int64_t c) {
    int64_t g = 0;
    for (; g + 4 <= group; g += 4) accumulate_values<4, C>(acc, p, g, values, d, n, c);
    switch (group - g) {
        case 3: accumulate_values<3, C>(acc, p, g, values, d, n, c); break;
        case 2: accumulate_values<2, C>(acc, p, g, values, d, n, c); break;
        case 1: accumulate_values<1, C>(acc, p, g, values, d, n, c); break;
        default: break;
    }
}

// Asks for byte b of the key row kKeyTile rows after `key`: the next tile's keys, which the
// hardware prefetcher alone brought too late once the scores went four keys at a time (decode
// over 32k positions of f16 KV from DRAM, AVX-512, 2 threads: 20-26 -> 28 GB/s). Past the
// cache's last key this names memory the call was not handed: as an address only (a prefetch
// never faults), made without pointer arithmetic beyond the array.
static inline void prefetch_next_tile(const void* key, int64_t row_bytes, int64_t b) {
    __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(key) +
                                                     static_cast<uintptr_t>(kKeyTile * row_bytes + b)));
}

// One tile of n consecutive keys and values [n, d] for the `group` query heads q [group, d].
template <typename KV>
static inline void attend_tile(const float* q, int64_t group, int64_t d, float scale,
                               const KV* keys, const KV* values, int64_t n,
                               float (*acc)[kMaxHeadDim], float (*p)[kKeyTile], float* m, float* l) {
    // Scores, key-major: each key row is read from memory once, for every head of the group.
    // Ask for the tile's values now, so that they arrive while the scores are computed, and for
    // the next tile's keys. (The next tile's values asked for instead: 22 against 26 GB/s.)
    const int64_t row_bytes = d * static_cast<int64_t>(sizeof(KV));
    int64_t j = 0;
#if defined(__AVX512F__)
    if (d % kWidth == 0 && group >= 4) {  // four keys at a time for each four heads
        for (; j + 4 <= n; j += 4) {
            const char* value = reinterpret_cast<const char*>(values + j * d);
            for (int64_t b = 0; b < 4 * row_bytes; b += 64) {
                __builtin_prefetch(value + b);
                prefetch_next_tile(keys + j * d, row_bytes, b);
            }
            int64_t g = 0;
            for (; g + 4 <= group; g += 4) score_heads_4x4(q, d, keys + j * d, scale, p, g, j);
            for (int64_t r = 0; r < 4 && g < group; ++r) {
                switch (group - g) {
                    case 3: score_heads<3>(q, d, keys + (j + r) * d, scale, p, g, j + r); break;
                    case 2: score_heads<2>(q, d, keys + (j + r) * d, scale, p, g, j + r); break;
                    case 1: score_heads<1>(q, d, keys + (j + r) * d, scale, p, g, j + r); break;
                    default: break;
                }
            }
        }
    }
#endif
    for (; j < n; ++j) {
        const KV* key = keys + j * d;
        const char* value = reinterpret_cast<const char*>(values + j * d);
        for (int64_t b = 0; b < row_bytes; b += 64) {
            __builtin_prefetch(value + b);
            prefetch_next_tile(key, row_bytes, b);
        }
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
        const Vec vtile_max = vset1(tile_max);
        for (int64_t j = 0; j < n_vec; j += kWidth) vstore(pg + j, vexp_nonpositive(vsub(vload(pg + j), vtile_max)));
        for (int64_t j = n_vec; j < n; ++j) pg[j] = exp_nonpositive(pg[j] - tile_max);
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
    int64_t c = 0;
    for (; c + kRowValueVecs * kWidth <= d_vec; c += kRowValueVecs * kWidth) {
        accumulate_group_values<kRowValueVecs>(acc, p, group, values, d, n, c);
    }
    for (; c < d_vec; c += kWidth) accumulate_group_values<1>(acc, p, group, values, d, n, c);
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

// ---------------------------------------------------------------- tiles of queries x keys
// The register blocks of the two products, per instruction set: the scores take kScoreKeys keys
// (broadcast) x kScoreVecs vectors of query vectors, the update kPvRows query vectors
// (broadcast) x kPvVecs vectors of head columns. Each is as many accumulators as the unit has
// registers to spare (16 of 32 with AVX-512, 8 of 16 with AVX2, enough for two FMA pipes).
#if defined(__AVX512F__)
constexpr int kScoreKeys = 8, kScoreVecs = 2, kPvRows = 4, kPvVecs = 4;
#elif defined(__AVX2__)
constexpr int kScoreKeys = 4, kScoreVecs = 2, kPvRows = 4, kPvVecs = 2;
#else
constexpr int kScoreKeys = 4, kScoreVecs = 4, kPvRows = 4, kPvVecs = 4;
#endif
constexpr int64_t kTileQueries = kAttentionTileQueries;  // query vectors per pass (kernels.h)
constexpr int64_t kTileKeys = 64;
constexpr int64_t kQueryBlock = kWidth * kScoreVecs;  // query vectors are padded to this
static_assert(kTileQueries % kQueryBlock == 0 && kQueryBlock % kPvRows == 0, "query blocks");
static_assert(kTileKeys % kScoreKeys == 0 && kMaxHeadDim % (kWidth * kPvVecs) == 0, "tile sizes");
static_assert(kScoreKeys % 4 == 0, "the softmax's max runs four chains over the padded keys");
// Fewer query vectors than this take the row path: too few to pay for copying the tiles.
constexpr int64_t kMinTiledQueries = 8;

static inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// seen where key j of the tile is one a lane's query may see (j < visible, a count of keys in
// each lane), else unseen: the causal mask of a diagonal tile.
static inline Vec vmask_keys(Vec visible, int64_t j, Vec seen, Vec unseen) {
    return vselect_nonnegative(vsub(visible, vset1(static_cast<float>(j + 1))), seen, unseen);
}

// What one tile of queries (a pass) carries from key tile to key tile, flat with the pass's own
// row lengths (a fixed 256-float stride would put every row of a 64-wide head in the same few
// L1 sets).
struct PassState {
    alignas(64) float qt[kMaxHeadDim * kTileQueries];   // queries transposed [d][mp]
    alignas(64) float acc[kTileQueries * kMaxHeadDim];  // running sum of p * v [mp][dp]
    alignas(64) float m[kTileQueries];                   // running max of the scores
    alignas(64) float l[kTileQueries];                   // running sum of p
};
// kPasses query tiles go through the keys together: each key and value tile is converted to
// float32 once for all of them (a prompt's keys come from L2 or L3; converting them once per
// pass took up to an eighth of a 4096-token prompt's attention, measured by leaving it out).
// 660 KB: one per thread, made at its first prompt and kept, rather than on its stack (musl
// gives a thread 128 KB of stack).
constexpr int kPasses = static_cast<int>(kAttentionTaskQueries / kTileQueries);
static_assert(kPasses >= 1 && kAttentionTaskQueries % kTileQueries == 0, "whole tiles a call");
struct TileBuffers {
    PassState pass[kPasses];
    alignas(64) float k[kTileKeys * kMaxHeadDim];   // one key tile [keys][d]
    alignas(64) float v[kTileKeys * kMaxHeadDim];   // one value tile [keys][dp]
    alignas(64) float s[kTileKeys * kTileQueries];  // one pass's scores, then probabilities [keys][mp]
    alignas(64) float correction[kTileQueries];     // the factor for what a pass summed before
    alignas(64) float visible[kTileQueries];  // keys of the current tile each query vector may see
};

// s[j][i] = (k_j . q_i) * scale for R keys from jb and R * kWidth query vectors from ib:
// s^T = K Q^T, a key broadcast against kScoreVecs vectors of the transposed queries.
template <int R, int C>
static inline void score_block(const float* k, int64_t d, const float* qt, int64_t mp, float scale,
                               float* s, int64_t jb, int64_t ib) {
    Vec acc[R][C];
    for (int r = 0; r < R; ++r) {
        for (int x = 0; x < C; ++x) acc[r][x] = vzero();
    }
    for (int64_t c = 0; c < d; ++c) {
        Vec q[C];
        for (int x = 0; x < C; ++x) q[x] = vload(qt + c * mp + ib + x * kWidth);
        for (int r = 0; r < R; ++r) {
            const Vec key = vset1(k[(jb + r) * d + c]);
            for (int x = 0; x < C; ++x) acc[r][x] = vfma(key, q[x], acc[r][x]);
        }
    }
    const Vec vscale = vset1(scale);
    for (int r = 0; r < R; ++r) {
        for (int x = 0; x < C; ++x) vstore(s + (jb + r) * mp + ib + x * kWidth, vmul(acc[r][x], vscale));
    }
}

// acc[i][cb ..] += sum_{j < n} p[j][i] * v[j][cb ..] for R query vectors from ib: a probability
// broadcast against kPvVecs vectors of a value row.
template <int R, int C>
static inline void value_block(const float* p, int64_t mp, const float* v, int64_t dp, int64_t n,
                               const float* correction, float* acc, int64_t ib, int64_t cb) {
    Vec o[R][C];
    for (int r = 0; r < R; ++r) {
        const Vec f = vset1(correction[ib + r]);
        for (int x = 0; x < C; ++x) o[r][x] = vmul(vload(acc + (ib + r) * dp + cb + x * kWidth), f);
    }
    for (int64_t j = 0; j < n; ++j) {
        Vec value[C];
        for (int x = 0; x < C; ++x) value[x] = vload(v + j * dp + cb + x * kWidth);
        for (int r = 0; r < R; ++r) {
            const Vec pr = vset1(p[j * mp + ib + r]);
            for (int x = 0; x < C; ++x) o[r][x] = vfma(pr, value[x], o[r][x]);
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int x = 0; x < C; ++x) vstore(acc + (ib + r) * dp + cb + x * kWidth, o[r][x]);
    }
}

// rows [0, n) of a cache tile [n, d] into out [rows, ld] as float32, columns d .. ld and rows
// n .. rows zeroed (the padding the register blocks read).
template <typename KV>
static inline void load_tile(const KV* src, int64_t n, int64_t d, int64_t rows, int64_t ld, float* out) {
    for (int64_t j = 0; j < n; ++j) {
        const KV* row = src + j * d;
        float* o = out + j * ld;
        int64_t c = 0;
        for (; c + kWidth <= d; c += kWidth) vstore(o + c, kv_load(row + c));
        for (; c < d; ++c) o[c] = kv_scalar(row + c);
        for (; c < ld; ++c) o[c] = 0.0f;
    }
    for (int64_t j = n; j < rows; ++j) {
        for (int64_t c = 0; c < ld; ++c) out[j * ld + c] = 0.0f;
    }
}

// One pass's query rows [t0, t1) of KV head kvh, (t1 - t0) * group <= kTileQueries query
// vectors: query vector i is head g = i % group of row t0 + i / group.
struct Pass {
    int64_t t0, t1;
    int64_t nq, mp;  // query vectors, padded to kQueryBlock
};

// The pass's queries into its state, transposed, with an empty running softmax.
static inline void begin_pass(const AttentionArgs& a, int64_t kvh, const Pass& pass, int64_t dp, PassState& st) {
    const int64_t d = a.head_dim, group = a.n_heads / a.n_kv;
    for (int64_t i = 0; i < pass.mp; ++i) {
        const float* q = i < pass.nq ? a.q + ((pass.t0 + i / group) * a.n_heads + kvh * group + i % group) * d : nullptr;
        for (int64_t c = 0; c < d; ++c) st.qt[c * pass.mp + i] = q ? q[c] : 0.0f;
        st.m[i] = -3.0e38f;
        st.l[i] = 0.0f;
    }
    for (int64_t x = 0; x < pass.mp * dp; ++x) st.acc[x] = 0.0f;
}

// One key tile (keys j0 .., n of them this pass may see, already in b.k and b.v as float32) for
// one pass: scores, the online softmax, O += P V.
static inline void attend_pass_tile(const AttentionArgs& a, const Pass& pass, int64_t dp, int64_t j0, int64_t n,
                                    TileBuffers& b, PassState& st) {
    const int64_t d = a.head_dim, group = a.n_heads / a.n_kv, mp = pass.mp, nq = pass.nq;
    const int64_t np = round_up(n, kScoreKeys);
    const int64_t first_position = a.q_start + pass.t0;  // the pass's first query sees keys 0 .. this
    // whole: every query vector sees every key of the tile (no mask, no padding)
    const bool whole = n == kTileKeys && j0 + n - 1 <= first_position;

    for (int64_t jb = 0; jb < np; jb += kScoreKeys) {
        for (int64_t ib = 0; ib < mp; ib += kQueryBlock) {
            score_block<kScoreKeys, kScoreVecs>(b.k, d, st.qt, mp, a.scale, b.s, jb, ib);
        }
    }
    if (!whole) {  // masked scores are -inf for the max, and 0 after the exponential
        for (int64_t i = 0; i < mp; ++i) {
            const int64_t seen = i < nq ? first_position + i / group - j0 + 1 : 0;
            b.visible[i] = static_cast<float>(seen < 0 ? 0 : (seen > n ? n : seen));
        }
        const Vec minus_inf = vset1(-__builtin_inff());
        for (int64_t i = 0; i < mp; i += kWidth) {
            const Vec visible = vload(b.visible + i);
            for (int64_t j = 0; j < np; ++j) {
                float* s = b.s + j * mp + i;
                vstore(s, vmask_keys(visible, j, vload(s), minus_inf));
            }
        }
    }

    // The online softmax, kWidth query vectors a lane each: the new maxima, the factor that
    // rescales what was summed before (applied in value_block), then the probabilities and
    // their sums in one pass over the tile's scores.
    for (int64_t i = 0; i < mp; i += kWidth) {
        const Vec old_max = vload(st.m + i);
        Vec mx[4] = {old_max, old_max, old_max, old_max};  // four chains: max is exact
        for (int64_t j = 0; j < np; j += 4) {
            for (int u = 0; u < 4; ++u) mx[u] = vmax(mx[u], vload(b.s + (j + u) * mp + i));
        }
        const Vec tile_max = vmax(vmax(mx[0], mx[1]), vmax(mx[2], mx[3]));
        const Vec correction = vexp_nonpositive(vsub(old_max, tile_max));
        Vec sum = vzero();
        if (whole) {
            for (int64_t j = 0; j < np; ++j) {
                const Vec p = vexp_nonpositive(vsub(vload(b.s + j * mp + i), tile_max));
                vstore(b.s + j * mp + i, p);
                sum = vadd(sum, p);
            }
        } else {  // a probability is 0 from the first key its query may not see
            const Vec visible = vload(b.visible + i);
            for (int64_t j = 0; j < np; ++j) {
                Vec p = vexp_nonpositive(vsub(vload(b.s + j * mp + i), tile_max));
                p = vmask_keys(visible, j, p, vzero());
                vstore(b.s + j * mp + i, p);
                sum = vadd(sum, p);
            }
        }
        vstore(st.m + i, tile_max);
        vstore(b.correction + i, correction);
        vstore(st.l + i, vfma(vload(st.l + i), correction, sum));
    }

    // O += P V. On a masked tile a block of query vectors runs together over the keys all of
    // them see, then each alone over the rest of its own: a key it may not see never meets
    // its accumulator (0 * an infinite value would be NaN).
    for (int64_t ib = 0; ib < mp; ib += kPvRows) {
        int64_t common = n;
        if (!whole) {
            for (int64_t r = 0; r < kPvRows; ++r) {
                const int64_t seen = static_cast<int64_t>(b.visible[ib + r]);
                common = seen < common ? seen : common;
            }
        }
        for (int64_t cb = 0; cb < dp; cb += kWidth * kPvVecs) {
            value_block<kPvRows, kPvVecs>(b.s, mp, b.v, dp, common, b.correction, st.acc, ib, cb);
        }
        if (whole) continue;
        for (int64_t i = ib; i < ib + kPvRows; ++i) {
            for (int64_t j = common; j < static_cast<int64_t>(b.visible[i]); ++j) {
                const Vec p = vset1(b.s[j * mp + i]);
                for (int64_t c = 0; c < dp; c += kWidth) {
                    vstore(st.acc + i * dp + c, vfma(p, vload(b.v + j * dp + c), vload(st.acc + i * dp + c)));
                }
            }
        }
    }
}

// Up to kPasses passes of consecutive query rows from t_begin to t_end, through the keys together.
template <typename KV>
static void attention_passes(const AttentionArgs& a, int64_t kvh, int64_t t_begin, int64_t t_end, TileBuffers& b) {
    const int64_t d = a.head_dim, group = a.n_heads / a.n_kv;
    const int64_t rows = kTileQueries / group;  // >= 4: group <= kMaxGroup
    const int64_t dp = round_up(d, kWidth * kPvVecs);
    const KV* keys = static_cast<const KV*>(a.k) + kvh * a.head_stride;  // [capacity, d]
    const KV* values = static_cast<const KV*>(a.v) + kvh * a.head_stride;
    Pass passes[kPasses];
    int n_passes = 0;
    for (int64_t t0 = t_begin; t0 < t_end && n_passes < kPasses; t0 += rows) {
        Pass& pass = passes[n_passes];
        pass.t0 = t0;
        pass.t1 = t_end - t0 < rows ? t_end : t0 + rows;
        pass.nq = (pass.t1 - pass.t0) * group;
        pass.mp = round_up(pass.nq, kQueryBlock);
        begin_pass(a, kvh, pass, dp, b.pass[n_passes]);
        ++n_passes;
    }
    const int64_t n_keys = a.q_start + passes[n_passes - 1].t1;  // the last query sees them all
    for (int64_t j0 = 0; j0 < n_keys; j0 += kTileKeys) {
        const int64_t n = n_keys - j0 < kTileKeys ? n_keys - j0 : kTileKeys;
        load_tile(keys + j0 * d, n, d, round_up(n, kScoreKeys), d, b.k);
        load_tile(values + j0 * d, n, d, n, dp, b.v);
        for (int p = 0; p < n_passes; ++p) {
            const int64_t seen = a.q_start + passes[p].t1 - j0;  // keys of this tile the pass's last query sees
            if (seen > 0) attend_pass_tile(a, passes[p], dp, j0, seen < n ? seen : n, b, b.pass[p]);
        }
    }
    for (int p = 0; p < n_passes; ++p) {
        const Pass& pass = passes[p];
        const PassState& st = b.pass[p];
        for (int64_t i = 0; i < pass.nq; ++i) {
            float* out = a.out + ((pass.t0 + i / group) * a.n_heads + kvh * group + i % group) * d;
            const float inverse = 1.0f / st.l[i];
            for (int64_t c = 0; c < d; ++c) out[c] = st.acc[i * dp + c] * inverse;
        }
    }
}

static TileBuffers& tile_buffers() {
    static thread_local TileBuffers buffers;  // trivial: zero-filled on first use, no constructor
    return buffers;
}

template <typename KV>
static void attention_tiles_of(const AttentionArgs& a, int64_t kvh, int64_t t_begin, int64_t t_end) {
    TileBuffers& buffers = tile_buffers();
    const int64_t rows = attention_call_rows(a.n_heads / a.n_kv);  // kPasses passes' rows
    for (int64_t t0 = t_begin; t0 < t_end; t0 += rows) {
        attention_passes<KV>(a, kvh, t0, t_end - t0 < rows ? t_end : t0 + rows, buffers);
    }
}

static void attention_rows(const AttentionArgs& a, int64_t kvh, int64_t t_begin, int64_t t_end) {
    const bool tiled = (t_end - t_begin) * (a.n_heads / a.n_kv) >= kMinTiledQueries;
    if (a.kv_type == KvType::F16) {
        tiled ? attention_tiles_of<uint16_t>(a, kvh, t_begin, t_end) : attention_rows_of<uint16_t>(a, kvh, t_begin, t_end);
    } else {
        tiled ? attention_tiles_of<float>(a, kvh, t_begin, t_end) : attention_rows_of<float>(a, kvh, t_begin, t_end);
    }
}

}  // namespace
}  // namespace lfm
