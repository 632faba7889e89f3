// Reference kernels in portable C++17, compiled with baseline flags. Every SIMD table in
// kernels_avx2.cpp / kernels_avx512.cpp has the same shape and must agree with this one.
#include "formats.h"
#include "kernels.h"
#include "qmatmul.h"

namespace lfm {
namespace {

// Rows dequantized together, so that each activation value loaded feeds several rows.
constexpr int64_t kRowTile = 4;
// K values dequantized per step: the [kRowTile, kChunk] float buffer (4 KiB) stays in L1 while
// every token uses it. A multiple of kQuantBlock, so every chunk starts on a block boundary.
constexpr int64_t kChunk = 256;
static_assert(kChunk % kQuantBlock == 0, "chunks must start on block boundaries");
static_assert(kChunk % kSuperBlock == 0, "a chunk must hold whole K-quant super-blocks");

// One struct per weight format: a row is a sequence of units of kUnitValues values stored in
// kUnitBytes bytes, and dequantize() expands `count` values (a whole number of units).
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
        for (int64_t i = 0; i < count; ++i) out[i] = fp16_to_f32(load_u16(src + 2 * i));
    }
};

struct BF16 {
    static constexpr int64_t kUnitValues = 1;
    static constexpr int64_t kUnitBytes = 2;
    static void dequantize(const uint8_t* src, int64_t count, float* out) {
        for (int64_t i = 0; i < count; ++i) out[i] = bf16_to_f32(load_u16(src + 2 * i));
    }
};

struct Q8_0 {
    static constexpr int64_t kUnitValues = kQuantBlock;
    static constexpr int64_t kUnitBytes = kQ8_0BlockBytes;
    static void dequantize(const uint8_t* src, int64_t count, float* out) {
        for (int64_t b = 0; b < count / kQuantBlock; ++b) {
            const uint8_t* block = src + b * kQ8_0BlockBytes;
            const float d = fp16_to_f32(load_u16(block));
            const int8_t* qs = reinterpret_cast<const int8_t*>(block + 2);  // [32]
            float* o = out + b * kQuantBlock;
            for (int j = 0; j < 32; ++j) o[j] = d * static_cast<float>(qs[j]);
        }
    }
};

struct Q4_0 {
    static constexpr int64_t kUnitValues = kQuantBlock;
    static constexpr int64_t kUnitBytes = kQ4_0BlockBytes;
    static void dequantize(const uint8_t* src, int64_t count, float* out) {
        for (int64_t b = 0; b < count / kQuantBlock; ++b) {
            const uint8_t* block = src + b * kQ4_0BlockBytes;
            const float d = fp16_to_f32(load_u16(block));
            const uint8_t* qs = block + 2;  // [16], two weights per byte
            float* o = out + b * kQuantBlock;
            for (int j = 0; j < 16; ++j) {
                o[j] = d * static_cast<float>((qs[j] & 0x0f) - 8);
                o[j + 16] = d * static_cast<float>((qs[j] >> 4) - 8);
            }
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

// Rows [row0, row0 + R) for every token: dequantize a chunk of each row once, then use it for
// all tokens.
template <class Format, int64_t R>
void matmul_tile(const float* x, int64_t n_tokens, const uint8_t* w, int64_t k, int64_t row0,
                 float* y, int64_t ldy) {
    const int64_t row_bytes = k / Format::kUnitValues * Format::kUnitBytes;
    float wbuf[R][kChunk];  // [R, chunk] dequantized weights
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
            const float* xt = x + t * k + k0;  // [len]
            float acc[R] = {};
            for (int64_t i = 0; i < len; ++i) {
                for (int64_t r = 0; r < R; ++r) acc[r] += wbuf[r][i] * xt[i];
            }
            for (int64_t r = 0; r < R; ++r) y[t * ldy + row0 + r] += acc[r];
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
    "scalar",
    kernels_of<F32>(),
    kernels_of<F16>(),
    kernels_of<BF16>(),
    kernels_of<Q8_0>(scalar::matmul_q8_0_packed),
    kernels_of<Q4_0>(scalar::matmul_q4_0_packed),
    kernels_of<Q4_K>(scalar::matmul_q4_k_packed),
    kernels_of<Q5_K>(scalar::matmul_q5_k_packed),
    kernels_of<Q6_K>(scalar::matmul_q6_k_packed),
    scalar::quantize_row,
    scalar::attention,
};

}  // namespace

const KernelTable& scalar_kernels() { return kTable; }

}  // namespace lfm
