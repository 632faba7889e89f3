// Reductions across 16 AVX-512 vectors at once, for the units compiled with AVX-512
// (qmatmul_avx512.cpp, and attention_impl.h there): lane b of the result is op over the 16
// lanes of vector b. The pairs of each level come from two-source lane permutes, so 16 vectors
// take 15 shuffle pairs where reducing each on its own takes 4 each, and the 16 results land in
// one vector. Floats go through as their bits (_mm512_castps_si512): the permutes only move lanes.
#pragma once

#include <immintrin.h>

#include <array>
#include <cstdint>

namespace lfm {
namespace {

// The lanes reduce_level pairs: for half 0 the first w lanes of each run of 2w, for half 1 the
// last w; result lanes 0-7 from the first vector (indices 0-15), 8-15 from the second (16-31).
template <int W, int Half>
constexpr std::array<int32_t, 16> reduce_lanes() {
    std::array<int32_t, 16> lanes{};
    for (int lane = 0; lane < 16; ++lane) lanes[lane] = (lane < 8 ? 0 : 16) + (lane % 8) / W * 2 * W + Half * W + lane % W;
    return lanes;
}

// One level of reduce16: v[i] (i < n) hold, in runs of 2w lanes, partial results of 16 / n
// blocks each; pairs (v[2i], v[2i + 1]) become u[i] with the runs halved to w lanes: lanes 0-7
// from v[2i]'s, 8-15 from v[2i + 1]'s, block order kept.
template <int W, class Op>
static inline void reduce_level(const __m512i* v, __m512i* u, int n, Op op) {
    alignas(64) static constexpr std::array<int32_t, 16> first = reduce_lanes<W, 0>(), second = reduce_lanes<W, 1>();
    const __m512i a = _mm512_load_si512(first.data()), b = _mm512_load_si512(second.data());
    for (int i = 0; i < n / 2; ++i) {
        u[i] = op(_mm512_permutex2var_epi32(v[2 * i], a, v[2 * i + 1]),
                  _mm512_permutex2var_epi32(v[2 * i], b, v[2 * i + 1]));
    }
}

// Lane b of the result = op over the 16 lanes of v[b], always in one order: lanes i and i + 8
// first, then those results' i and i + 4, then 2, then 1.
template <class Op>
static inline __m512i reduce16(const __m512i (&v)[16], Op op) {
    __m512i r8[8], r4[4], r2[2], r1[1];
    reduce_level<8>(v, r8, 16, op);
    reduce_level<4>(r8, r4, 8, op);
    reduce_level<2>(r4, r2, 4, op);
    reduce_level<1>(r2, r1, 2, op);
    return r1[0];
}

// The float sums of 16 vectors: lane b = the sum of v[b]'s lanes (in reduce16's order).
static inline __m512 sum16(const __m512 (&v)[16]) {
    __m512i bits[16];
    for (int i = 0; i < 16; ++i) bits[i] = _mm512_castps_si512(v[i]);
    return _mm512_castsi512_ps(reduce16(bits, [](__m512i a, __m512i b) {
        return _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b)));
    }));
}

}  // namespace
}  // namespace lfm
