// Causal GQA attention with an online softmax (see AttentionFn in kernels.h), written once in
// plain loops and compiled into each instruction set's translation unit, where the compiler
// vectorizes it with that unit's flags. Every sum has a fixed order (16 explicit partial sums,
// no reassociation, no contraction in ISO C++ mode), so all instruction sets give the same bits.
// Internal linkage only (see kernels.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace lfm {
namespace {

constexpr int64_t kKeyTile = 64;      // scores kept at once per query: no [T, S] matrix
constexpr int64_t kMaxHeadDim = 256;  // checked by the bindings
constexpr int64_t kMaxGroup = 16;     // query heads per KV head, checked by the bindings
constexpr int kLanes = 16;

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
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
    float two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return e * two_n;
}

static inline float dot_fixed_order(const float* a, const float* b, int64_t d) {
    float part[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= d; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
    }
    for (int l = 0; i < d; ++i, ++l) part[l] += a[i] * b[i];
    float total = 0.0f;
    for (int l = 0; l < kLanes; ++l) total += part[l];
    return total;
}

static void attention_rows(const AttentionArgs& a, int64_t kvh, int64_t t_begin, int64_t t_end) {
    const int64_t d = a.head_dim;
    const int64_t group = a.n_heads / a.n_kv;
    const int64_t key_stride = a.n_kv * d;  // between consecutive positions of one KV head
    const float* keys = a.k + kvh * d;
    const float* values = a.v + kvh * d;
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
            for (int64_t g = 0; g < group; ++g) {
                float tile_max = m[g];
                for (int64_t j = 0; j < n; ++j) {
                    const float s = dot_fixed_order(q + g * d, keys + (j0 + j) * key_stride, d) * a.scale;
                    p[g][j] = s;
                    tile_max = s > tile_max ? s : tile_max;
                }
                const float correction = exp_nonpositive(m[g] - tile_max);
                m[g] = tile_max;
                float tile_sum = 0.0f;
                for (int64_t j = 0; j < n; ++j) {
                    p[g][j] = exp_nonpositive(p[g][j] - tile_max);
                }
                for (int64_t j = 0; j < n; ++j) tile_sum += p[g][j];
                l[g] = l[g] * correction + tile_sum;
                for (int64_t i = 0; i < d; ++i) acc[g][i] *= correction;
                for (int64_t j = 0; j < n; ++j) {
                    const float* v = values + (j0 + j) * key_stride;
                    const float pj = p[g][j];
                    for (int64_t i = 0; i < d; ++i) acc[g][i] += pj * v[i];
                }
            }
        }
        float* out = a.out + (t * a.n_heads + kvh * group) * d;
        for (int64_t g = 0; g < group; ++g) {
            const float inverse = 1.0f / l[g];
            for (int64_t i = 0; i < d; ++i) out[g * d + i] = acc[g][i] * inverse;
        }
    }
}

}  // namespace
}  // namespace lfm
