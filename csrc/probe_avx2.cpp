// The probes with AVX2 (see probe.h): 256-bit loads, and the int8 dot product of the AVX2
// kernels (qmatmul_avx2.cpp): vpmaddubsw (u8 x s8 pairs -> int16), vpmaddwd by ones (-> int32),
// vpaddd into the accumulator.
#include <immintrin.h>

#include "probe.h"
#include "probe_impl.h"

namespace lfm {
namespace {

// 256-bit lanes: a line is two loads.
struct Avx2Lines {
    using Acc = __m256i;
    static Acc zero() { return _mm256_setzero_si256(); }
    static Acc add(Acc a, Acc b) { return _mm256_add_epi64(a, b); }
    static Acc add_line(Acc acc, const uint8_t* line) {
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line));
        const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 32));
        return _mm256_add_epi64(acc, _mm256_add_epi64(lo, hi));
    }
    static uint64_t total(Acc a) {
        alignas(32) uint64_t lanes[4];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a);
        return lanes[0] + lanes[1] + lanes[2] + lanes[3];
    }
};

// Only the vpaddd into each accumulator is serial from one iteration to the next; the multiplies
// of successive iterations overlap, so a few chains fill both multiply pipes.
constexpr int kChains = 4;

int64_t int8_mac(uint32_t a4, uint32_t b4, int64_t iterations) {
    const __m256i b = _mm256_set1_epi32(static_cast<int32_t>(b4));
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a[kChains], acc[kChains];
    for (int c = 0; c < kChains; ++c) {
        a[c] = _mm256_set1_epi32(static_cast<int32_t>(a4));
        acc[c] = _mm256_setzero_si256();
    }
    for (int64_t i = 0; i < iterations; ++i) {
        for (int c = 0; c < kChains; ++c) {
            LFM_PROBE_OPAQUE("x", a[c]);
            acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(a[c], b), ones));
        }
    }
    alignas(32) int32_t lanes[8];
    int64_t sum = 0;
    for (const __m256i& v : acc) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
        for (int32_t x : lanes) sum += x;
    }
    return sum;
}

}  // namespace

const ProbeKernels& avx2_probe_kernels() {
    static const ProbeKernels table = {"avx2", probe_impl::read_sum<Avx2Lines>, int8_mac, kChains * 8 * 4,
                                       "vpmaddubsw + vpmaddwd + vpaddd"};
    return table;
}

}  // namespace lfm
