// The probes with AVX2 (see probe.h): 256-bit loads, and the int8 dot product of the AVX2
// kernels (qmatmul_avx2.cpp): vpmaddubsw (u8 x s8 pairs -> int16), vpmaddwd by ones (-> int32),
// vpaddd into the accumulator.
#include <immintrin.h>

#include "probe.h"

namespace lfm {
namespace {

template <int kStreams>
uint64_t read_streams(const uint8_t* data, int64_t n) {
    const int64_t part = n / kStreams;
    __m256i acc[kStreams];
    for (__m256i& a : acc) a = _mm256_setzero_si256();
    for (int64_t offset = 0; offset < part; offset += 64) {
        for (int s = 0; s < kStreams; ++s) {
            const uint8_t* line = data + s * part + offset;
            const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line));
            const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 32));
            acc[s] = _mm256_add_epi64(acc[s], _mm256_add_epi64(lo, hi));
        }
    }
    __m256i total = acc[0];
    for (int s = 1; s < kStreams; ++s) total = _mm256_add_epi64(total, acc[s]);
    alignas(32) uint64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), total);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

uint64_t read_sum(const uint8_t* data, int64_t n, int streams) {
    switch (streams) {
        case 1: return read_streams<1>(data, n);
        case 2: return read_streams<2>(data, n);
        case 4: return read_streams<4>(data, n);
        default: return read_streams<8>(data, n);
    }
}

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
    static const ProbeKernels table = {"avx2", read_sum, int8_mac, kChains * 8 * 4,
                                       "vpmaddubsw + vpmaddwd + vpaddd"};
    return table;
}

}  // namespace lfm
