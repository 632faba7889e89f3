// AVX-512 kernels (F, BW, VL, DQ, VNNI; FMA, F16C): this unit's parts of kernels_impl.h, 16
// floats at a time. Same shapes and results as the scalar reference in kernels_scalar.cpp:
// weights are dequantized exactly, only the order of the float32 sums differs. Everything here
// has internal linkage (see kernels.h).
#include <immintrin.h>

#include "formats.h"
#include "kernels.h"
#include "qmatmul.h"

namespace lfm {
namespace {

constexpr const char* kIsaName = "avx512";
namespace this_isa = avx512;

constexpr int64_t kHalfVector = 16;
static inline void f16_vector(const uint8_t* src, float* out) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    _mm512_storeu_ps(out, _mm512_cvtph_ps(h));  // exact, subnormals included
}
static inline void bf16_vector(const uint8_t* src, float* out) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    _mm512_storeu_ps(out, _mm512_castsi512_ps(bits));
}

static inline void dequantize_q8_0_block(const uint8_t* block, float* out) {
    const __m512 d = _mm512_set1_ps(fp16_to_f32(load_u16(block)));
    for (int half = 0; half < 2; ++half) {
        const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 + 16 * half));
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8));  // [16]
        _mm512_storeu_ps(out + 16 * half, _mm512_mul_ps(d, q));
    }
}

static inline void dequantize_q4_0_block(const uint8_t* block, float* out) {
    const __m128i nibble = _mm_set1_epi8(0x0f);
    const __m512 eight = _mm512_set1_ps(8.0f);
    const __m512 d = _mm512_set1_ps(fp16_to_f32(load_u16(block)));
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2));
    const __m128i low = _mm_and_si128(bytes, nibble);                       // 0..15
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);  // 16..31
    // q - 8 is exact in float, so d * (q - 8) rounds once, like the reference
    const __m512 q_low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(low));
    const __m512 q_high = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(high));
    _mm512_storeu_ps(out, _mm512_mul_ps(d, _mm512_sub_ps(q_low, eight)));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(d, _mm512_sub_ps(q_high, eight)));
}

template <int64_t R, int64_t C>
void dot_rows(const float (*wbuf)[C], const float* xt, int64_t len, float* sums) {
    __m512 acc[R];
    for (int64_t r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
        const __m512 xv = _mm512_loadu_ps(xt + i);
        for (int64_t r = 0; r < R; ++r) {
            acc[r] = _mm512_fmadd_ps(_mm512_load_ps(wbuf[r] + i), xv, acc[r]);
        }
    }
    if (i < len) {  // only float weight types can have k % 16 != 0
        const __mmask16 tail = static_cast<__mmask16>((1u << (len - i)) - 1);
        const __m512 xv = _mm512_maskz_loadu_ps(tail, xt + i);
        for (int64_t r = 0; r < R; ++r) {
            acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, wbuf[r] + i), xv, acc[r]);
        }
    }
    for (int64_t r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

}  // namespace
}  // namespace lfm

#include "kernels_impl.h"

namespace lfm {

const KernelTable& avx512_kernels() { return kTable; }

#if defined(LFM_EDGE_HAVE_AMX)
namespace {

// AMX's table: this one with the AMX prompt kernels of qmatmul_amx.cpp for Q4_0 and Q8_0 (which
// hand decode and the tokens past the last 16 back to this unit's).
constexpr KernelTable amx_table() {
    KernelTable table = LFM_EDGE_KERNEL_TABLE("amx", avx512);
    table.q4_0.matmul_packed = amx::matmul_q4_0_packed;
    table.q8_0.matmul_packed = amx::matmul_q8_0_packed;
    table.pack_tiles = amx::pack_tiles;
    return table;
}
constexpr KernelTable kAmxTable = amx_table();

}  // namespace

const KernelTable& amx_kernels() { return kAmxTable; }
#endif

}  // namespace lfm
