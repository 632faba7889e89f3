// Test-only stand-in for <immintrin.h>: the AVX-512 intrinsics of csrc/qmatmul_avx512.cpp and the
// AVX-VNNI one of csrc/qmatmul_avxvnni.cpp emulated by SIMDe
// (https://github.com/simd-everywhere/simde) on a CPU without them, so that those kernels can be
// checked against their scalar twins anywhere (test_avx512_emulated.py, test_avxvnni_emulated.py).
// Put first on the include path; SIMDe's own include of the real header passes through.
#ifdef LFM_EDGE_INSIDE_SIMDE
#include_next <immintrin.h>
#else
#define LFM_EDGE_INSIDE_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cstdint>

// The few intrinsics this SIMDe release lacks, written plainly.
static inline simde__m512i emulated_cvt8_epi32(simde__m128i v, bool is_signed) {
    uint8_t in[16];
    int32_t out[16];
    simde_mm_storeu_si128(reinterpret_cast<simde__m128i*>(in), v);
    for (int i = 0; i < 16; ++i) out[i] = is_signed ? static_cast<int8_t>(in[i]) : in[i];
    return simde_mm512_loadu_si512(out);
}
static inline simde__m128i emulated_cvtepi32_epi8(simde__m512i v) {
    int32_t in[16];
    int8_t out[16];
    simde_mm512_storeu_si512(in, v);
    for (int i = 0; i < 16; ++i) out[i] = static_cast<int8_t>(in[i]);
    return simde_mm_loadu_si128(reinterpret_cast<const simde__m128i*>(out));
}
static inline int32_t emulated_reduce_add_epi32(simde__m512i v) {
    int32_t in[16];
    int32_t sum = 0;
    simde_mm512_storeu_si512(in, v);
    for (int i = 0; i < 16; ++i) sum += in[i];
    return sum;
}
#define _mm512_cvtepu8_epi32(v) emulated_cvt8_epi32((v), false)
#define _mm512_cvtepi8_epi32(v) emulated_cvt8_epi32((v), true)
#define _mm512_cvtepi32_epi8(v) emulated_cvtepi32_epi8(v)
#define _mm512_reduce_add_epi32(v) emulated_reduce_add_epi32(v)
// AVX-VNNI's vpdpbusd on ymm (qmatmul_avxvnni.cpp) is AVX512-VNNI's with the VEX encoding.
#define _mm256_dpbusd_avx_epi32(src, a, b) simde_mm256_dpbusd_epi32((src), (a), (b))
#ifndef _cvtu64_mask64
#define _cvtu64_mask64(x) (static_cast<simde__mmask64>(x))
#endif
#endif
