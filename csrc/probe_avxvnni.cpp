// The probes with AVX-VNNI (see probe.h): AVX2's read loop, and the int8 dot product of the
// AVX-VNNI kernels (qmatmul_avxvnni.cpp): one vpdpbusd on ymm into the accumulator.
#include <immintrin.h>

#include "probe.h"

namespace lfm {
namespace {

// Each vpdpbusd reads its accumulator: with a latency of about 5 cycles and up to 2 issued per
// cycle, 12 independent chains keep the pipes full (as in probe_avx512.cpp).
constexpr int kChains = 12;

int64_t int8_mac(uint32_t a4, uint32_t b4, int64_t iterations) {
    const __m256i a = _mm256_set1_epi32(static_cast<int32_t>(a4));
    const __m256i b = _mm256_set1_epi32(static_cast<int32_t>(b4));
    __m256i acc[kChains];
    for (__m256i& v : acc) v = _mm256_setzero_si256();
    for (int64_t i = 0; i < iterations; ++i) {
        for (__m256i& v : acc) v = _mm256_dpbusd_avx_epi32(v, a, b);
    }
    int64_t sum = 0;
    alignas(32) int32_t lanes[8];
    for (const __m256i& v : acc) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
        for (int32_t x : lanes) sum += x;
    }
    return sum;
}

}  // namespace

const ProbeKernels& avxvnni_probe_kernels() {
    static const ProbeKernels table = {"avxvnni", avx2_probe_kernels().read_sum, int8_mac,
                                       kChains * 8 * 4, "vpdpbusd (ymm)"};
    return table;
}

}  // namespace lfm
