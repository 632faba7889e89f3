// AVX-512 kernels (F, BW, VL, DQ, VNNI; FMA, F16C). Same shapes and results as the scalar
// reference in kernels_scalar.cpp: weights are dequantized exactly, only the order of the
// float32 sums differs. Everything here has internal linkage (see kernels.h).
#include <immintrin.h>

#include "formats.h"
#include "kernels.h"
#include "qmatmul.h"

namespace lfm {
namespace {

constexpr int64_t kRowTile = 4;  // rows dequantized together
constexpr int64_t kChunk = 256;  // K values per dequantized chunk; [kRowTile, kChunk] = 4 KiB
static_assert(kChunk % kQuantBlock == 0 && kChunk % 16 == 0, "chunk must hold whole blocks");
static_assert(kChunk % kSuperBlock == 0, "a chunk must hold whole K-quant super-blocks");

struct F32 {
    static constexpr int64_t kUnitValues = 1;
    static constexpr int64_t kUnitBytes = 4;
    static void dequantize(const uint8_t* src, int64_t count, float* out) {
        std::memcpy(out, src, static_cast<size_t>(count) * sizeof(float));  // little-endian host
    }
};

struct F16 {
    static constexpr int64_t kUnitValues = 1;
    static constexpr int64_t kUnitBytes = 2;
    static void dequantize(const uint8_t* src, int64_t count, float* out) {
        int64_t i = 0;
        for (; i + 16 <= count; i += 16) {
            const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i));
            _mm512_storeu_ps(out + i, _mm512_cvtph_ps(h));  // exact, subnormals included
        }
        for (; i < count; ++i) out[i] = fp16_to_f32(load_u16(src + 2 * i));
    }
};

struct BF16 {
    static constexpr int64_t kUnitValues = 1;
    static constexpr int64_t kUnitBytes = 2;
    static void dequantize(const uint8_t* src, int64_t count, float* out) {
        int64_t i = 0;
        for (; i + 16 <= count; i += 16) {
            const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i));
            const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
            _mm512_storeu_ps(out + i, _mm512_castsi512_ps(bits));
        }
        for (; i < count; ++i) out[i] = bf16_to_f32(load_u16(src + 2 * i));
    }
};

struct Q8_0 {
    static constexpr int64_t kUnitValues = kQuantBlock;
    static constexpr int64_t kUnitBytes = kQ8_0BlockBytes;
    static void dequantize(const uint8_t* src, int64_t count, float* out) {
        for (int64_t b = 0; b < count / kQuantBlock; ++b) {
            const uint8_t* block = src + b * kQ8_0BlockBytes;
            const __m512 d = _mm512_set1_ps(fp16_to_f32(load_u16(block)));
            float* o = out + b * kQuantBlock;
            for (int half = 0; half < 2; ++half) {
                const __m128i q8 =
                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 + 16 * half));
                const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8));  // [16]
                _mm512_storeu_ps(o + 16 * half, _mm512_mul_ps(d, q));
            }
        }
    }
};

struct Q4_0 {
    static constexpr int64_t kUnitValues = kQuantBlock;
    static constexpr int64_t kUnitBytes = kQ4_0BlockBytes;
    static void dequantize(const uint8_t* src, int64_t count, float* out) {
        const __m128i nibble = _mm_set1_epi8(0x0f);
        const __m512 eight = _mm512_set1_ps(8.0f);
        for (int64_t b = 0; b < count / kQuantBlock; ++b) {
            const uint8_t* block = src + b * kQ4_0BlockBytes;
            const __m512 d = _mm512_set1_ps(fp16_to_f32(load_u16(block)));
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2));
            const __m128i low = _mm_and_si128(bytes, nibble);                       // 0..15
            const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);  // 16..31
            // q - 8 is exact in float, so d * (q - 8) rounds once, like the reference
            const __m512 q_low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(low));
            const __m512 q_high = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(high));
            float* o = out + b * kQuantBlock;
            _mm512_storeu_ps(o, _mm512_mul_ps(d, _mm512_sub_ps(q_low, eight)));
            _mm512_storeu_ps(o + 16, _mm512_mul_ps(d, _mm512_sub_ps(q_high, eight)));
        }
    }
};

// The K-quants (formats.h): whole 256-weight super-blocks, dequantized with gguf's float32 steps.
template <int64_t kBytes, void (*kBlock)(const uint8_t*, float*)>
struct KQuant {
    static constexpr int64_t kUnitValues = kSuperBlock;
    static constexpr int64_t kUnitBytes = kBytes;
    static void dequantize(const uint8_t* src, int64_t count, float* out) {
        for (int64_t b = 0; b < count / kSuperBlock; ++b) kBlock(src + b * kBytes, out + b * kSuperBlock);
    }
};
using Q4_K = KQuant<kQ4_KBlockBytes, dequantize_q4_k_block>;
using Q5_K = KQuant<kQ5_KBlockBytes, dequantize_q5_k_block>;
using Q6_K = KQuant<kQ6_KBlockBytes, dequantize_q6_k_block>;

template <class Format>
void dequantize_row(const uint8_t* row, int64_t k, float* out) {
    Format::dequantize(row, k, out);
}

// sums[r] = dot(wbuf[r][0, len), xt[0, len)) for r < R.
template <int64_t R>
void dot_rows(const float (*wbuf)[kChunk], const float* xt, int64_t len, float* sums) {
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

// Rows [row0, row0 + R) for every token: dequantize a chunk of each row once, then use it for
// all tokens.
template <class Format, int64_t R>
void matmul_tile(const float* x, int64_t n_tokens, const uint8_t* w, int64_t k, int64_t row0,
                 float* y, int64_t ldy) {
    const int64_t row_bytes = k / Format::kUnitValues * Format::kUnitBytes;
    alignas(64) float wbuf[R][kChunk];  // [R, chunk] dequantized weights
    for (int64_t t = 0; t < n_tokens; ++t) {
        for (int64_t r = 0; r < R; ++r) y[t * ldy + row0 + r] = 0.0f;
    }
    for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
        const int64_t len = k - k0 < kChunk ? k - k0 : kChunk;
        const int64_t byte0 = k0 / Format::kUnitValues * Format::kUnitBytes;
        for (int64_t r = 0; r < R; ++r) {
            Format::dequantize(w + (row0 + r) * row_bytes + byte0, len, wbuf[r]);
        }
        for (int64_t t = 0; t < n_tokens; ++t) {
            float sums[R];
            dot_rows<R>(wbuf, x + t * k + k0, len, sums);
            for (int64_t r = 0; r < R; ++r) y[t * ldy + row0 + r] += sums[r];
        }
    }
}

template <class Format>
void matmul(const float* x, int64_t n_tokens, const uint8_t* w, int64_t k, int64_t row_begin,
            int64_t row_end, float* y, int64_t ldy) {
    int64_t row = row_begin;
    for (; row + kRowTile <= row_end; row += kRowTile) {
        matmul_tile<Format, kRowTile>(x, n_tokens, w, k, row, y, ldy);
    }
    for (; row < row_end; ++row) matmul_tile<Format, 1>(x, n_tokens, w, k, row, y, ldy);
}

template <class Format>
constexpr QTypeKernels kernels_of(PackedMatmulFn matmul_packed = nullptr) {
    return {dequantize_row<Format>, matmul<Format>, matmul_packed};
}

constexpr KernelTable kTable = {
    "avx512",
    kernels_of<F32>(),
    kernels_of<F16>(),
    kernels_of<BF16>(),
    kernels_of<Q8_0>(avx512::matmul_q8_0_packed),
    kernels_of<Q4_0>(avx512::matmul_q4_0_packed),
    kernels_of<Q4_K>(avx512::matmul_q4_k_packed),
    kernels_of<Q5_K>(avx512::matmul_q5_k_packed),
    kernels_of<Q6_K>(avx512::matmul_q6_k_packed),
    avx512::quantize_row,
    avx512::attention,
};

}  // namespace

const KernelTable& avx512_kernels() { return kTable; }

}  // namespace lfm
