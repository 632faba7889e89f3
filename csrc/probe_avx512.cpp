// The probes with AVX-512 (see probe.h): 512-bit loads, and the int8 dot product of the AVX-512
// kernels (qmatmul_avx512.cpp): vpdpbusd, u8 x s8 quadruples added into int32 lanes in one
// instruction.
#include <immintrin.h>

#include "probe.h"
#include "probe_impl.h"

namespace lfm {
namespace {

// 512-bit lanes: a line is one load.
struct Avx512Lines {
    using Acc = __m512i;
    static Acc zero() { return _mm512_setzero_si512(); }
    static Acc add(Acc a, Acc b) { return _mm512_add_epi64(a, b); }
    static Acc add_line(Acc acc, const uint8_t* line) { return _mm512_add_epi64(acc, _mm512_loadu_si512(line)); }
    static uint64_t total(Acc a) { return static_cast<uint64_t>(_mm512_reduce_add_epi64(a)); }
};

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
    static const ProbeKernels table = {"avx512", probe_impl::read_sum<Avx512Lines>, int8_mac, kChains * 16 * 4, "vpdpbusd"};
    return table;
}

}  // namespace lfm
