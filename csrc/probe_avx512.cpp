// The probes with AVX-512 (see probe.h): 512-bit loads, and the int8 dot product of the AVX-512
// kernels (qmatmul_avx512.cpp): vpdpbusd, u8 x s8 quadruples added into int32 lanes in one
// instruction.
#include <immintrin.h>

#include "probe.h"

namespace lfm {
namespace {

template <int kStreams>
uint64_t read_streams(const uint8_t* data, int64_t n) {
    const int64_t part = n / kStreams;
    __m512i acc[kStreams];
    for (__m512i& a : acc) a = _mm512_setzero_si512();
    for (int64_t offset = 0; offset < part; offset += 64) {
        for (int s = 0; s < kStreams; ++s) {
            acc[s] = _mm512_add_epi64(acc[s], _mm512_loadu_si512(data + s * part + offset));
        }
    }
    __m512i total = acc[0];
    for (int s = 1; s < kStreams; ++s) total = _mm512_add_epi64(total, acc[s]);
    alignas(64) uint64_t lanes[8];
    _mm512_store_si512(lanes, total);
    uint64_t sum = 0;
    for (uint64_t x : lanes) sum += x;
    return sum;
}

uint64_t read_sum(const uint8_t* data, int64_t n, int streams) {
    switch (streams) {
        case 1: return read_streams<1>(data, n);
        case 2: return read_streams<2>(data, n);
        case 4: return read_streams<4>(data, n);
        default: return read_streams<8>(data, n);
    }
}

// Each vpdpbusd reads its accumulator: with a latency of about 5 cycles and up to 2 issued per
// cycle, 12 independent chains keep the pipes full.
constexpr int kChains = 12;

int64_t int8_mac(uint32_t a4, uint32_t b4, int64_t iterations) {
    const __m512i a = _mm512_set1_epi32(static_cast<int32_t>(a4));
    const __m512i b = _mm512_set1_epi32(static_cast<int32_t>(b4));
    __m512i acc[kChains];
    for (__m512i& v : acc) v = _mm512_setzero_si512();
    for (int64_t i = 0; i < iterations; ++i) {
        for (__m512i& v : acc) v = _mm512_dpbusd_epi32(v, a, b);
    }
    int64_t sum = 0;
    alignas(64) int32_t lanes[16];
    for (const __m512i& v : acc) {
        _mm512_store_si512(lanes, v);
        for (int32_t x : lanes) sum += x;
    }
    return sum;
}

}  // namespace

const ProbeKernels& avx512_probe_kernels() {
    static const ProbeKernels table = {"avx512", read_sum, int8_mac, kChains * 16 * 4, "vpdpbusd"};
    return table;
}

}  // namespace lfm
