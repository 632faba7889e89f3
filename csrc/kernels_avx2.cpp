// AVX2 kernels (with FMA and F16C): this unit's parts of kernels_impl.h, 8 floats at a time; and
// the AVX-VNNI table, the same but for its int8 kernels.
// Same shapes and results as the scalar reference in kernels_scalar.cpp: weights are dequantized
// exactly, only the order of the float32 sums differs. Everything here has internal linkage (see
// kernels.h).
#include <immintrin.h>

#include "formats.h"
#include "kernels.h"
#include "qmatmul.h"

namespace lfm {
namespace {

constexpr const char* kIsaName = "avx2";
namespace this_isa = avx2;

inline float horizontal_sum(__m256 v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

constexpr int64_t kHalfVector = 8;
static inline void f16_vector(const uint8_t* src, float* out) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    _mm256_storeu_ps(out, _mm256_cvtph_ps(h));  // exact, subnormals included
}
static inline void bf16_vector(const uint8_t* src, float* out) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(out, _mm256_castsi256_ps(bits));
}

static inline void dequantize_q8_0_block(const uint8_t* block, float* out) {
    const __m256 d = _mm256_set1_ps(fp16_to_f32(load_u16(block)));
    for (int part = 0; part < 4; ++part) {
        const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 + 8 * part));
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));  // [8]
        _mm256_storeu_ps(out + 8 * part, _mm256_mul_ps(d, q));
    }
}

static inline void dequantize_q4_0_block(const uint8_t* block, float* out) {
    const __m128i nibble = _mm_set1_epi8(0x0f);
    const __m256 eight = _mm256_set1_ps(8.0f);
    const __m256 d = _mm256_set1_ps(fp16_to_f32(load_u16(block)));
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2));
    // quarter p holds weights [8p, 8p + 8): low nibbles are 0..15, high nibbles 16..31
    const __m128i low = _mm_and_si128(bytes, nibble);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    const __m128i quarters[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
    for (int p = 0; p < 4; ++p) {
        // q - 8 is exact in float, so d * (q - 8) rounds once, like the reference
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(quarters[p]));
        _mm256_storeu_ps(out + 8 * p, _mm256_mul_ps(d, _mm256_sub_ps(q, eight)));
    }
}

template <int64_t R, int64_t C>
void dot_rows(const float (*wbuf)[C], const float* xt, int64_t len, float* sums) {
    __m256 acc[R];
    for (int64_t r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        const __m256 xv = _mm256_loadu_ps(xt + i);
        for (int64_t r = 0; r < R; ++r) {
            acc[r] = _mm256_fmadd_ps(_mm256_load_ps(wbuf[r] + i), xv, acc[r]);
        }
    }
    for (int64_t r = 0; r < R; ++r) {
        float tail = 0.0f;  // only float weight types can have k % 8 != 0
        for (int64_t j = i; j < len; ++j) tail += wbuf[r][j] * xt[j];
        sums[r] = horizontal_sum(acc[r]) + tail;
    }
}

}  // namespace
}  // namespace lfm

#include "kernels_impl.h"

namespace lfm {

const KernelTable& avx2_kernels() { return kTable; }

#if defined(LFM_EDGE_HAVE_AVXVNNI)
namespace {

// AVX-VNNI's table: this unit's float kernels (AVX-VNNI adds nothing to them) with the int8
// kernels of qmatmul_avxvnni.cpp, whose dot products are vpdpbusd.
constexpr KernelTable kAvxVnniTable = LFM_EDGE_KERNEL_TABLE("avxvnni", avxvnni);

}  // namespace

const KernelTable& avxvnni_kernels() { return kAvxVnniTable; }
#endif

}  // namespace lfm
