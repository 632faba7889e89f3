// The float32-activation half of a KernelTable (kernels.h), written once and compiled into each
// instruction set's translation unit (kernels_{scalar,avx2,avx512}.cpp) with that unit's flags:
// the weight formats, the row-tiled matmul driver and the table itself. The unit defines its
// few instruction-set parts in namespace lfm's anonymous namespace first, then includes this:
//
//   kIsaName                          the table's name: "scalar" | "avx2" | "avx512"
//   namespace this_isa = ...;         its int8 kernels and attention (qmatmul.h)
//   kHalfVector, f16_vector(src, out), bf16_vector(src, out)
//                                     kHalfVector 16-bit values at src -> float32 out[kHalfVector]
//   dequantize_q8_0_block(block, out), dequantize_q4_0_block(block, out)
//                                     one 32-weight GGUF block -> out[32]
//   dot_rows<R>(wbuf, xt, len, sums)  sums[r] = dot(wbuf[r][0, len), xt[0, len)) for r < R; the
//                                     rows of wbuf start 64-byte aligned
//
// Every one of them dequantizes exactly; only the order of dot_rows' float32 sums differs.
// Internal linkage only (see kernels.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "formats.h"
#include "kernels.h"
#include "qmatmul.h"

namespace lfm {
namespace {

// Rows dequantized together, so that each activation value loaded feeds several rows.
constexpr int64_t kRowTile = 4;
// K values dequantized per step: the [kRowTile, kChunk] float buffer (4 KiB) stays in L1 while
// every token uses it. A multiple of every unit's format and vector: whole Q4_0 / Q8_0 blocks and
// K-quant super-blocks, so every chunk starts on a block boundary.
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

// IEEE half / bfloat16: the unit's vector conversion, then one value at a time for the rest.
template <float (*kOne)(uint16_t), void (*kVector)(const uint8_t*, float*)>
struct Float16 {
    static constexpr int64_t kUnitValues = 1;
    static constexpr int64_t kUnitBytes = 2;
    static void dequantize(const uint8_t* src, int64_t count, float* out) {
        int64_t i = 0;
        for (; i + kHalfVector <= count; i += kHalfVector) kVector(src + 2 * i, out + i);
        for (; i < count; ++i) out[i] = kOne(load_u16(src + 2 * i));
    }
};

// Formats stored in blocks of kValues weights in kBytes bytes, each block dequantized on its own:
// Q4_0 / Q8_0 by the unit, the other 32-weight blocks and the 256-weight super-blocks with gguf's
// float32 steps (formats.h). This float32 path serves embedding rows and the numpy reference; the
// model's matmuls run on the packed int8 kernels.
template <int64_t kValues, int64_t kBytes, void (*kBlock)(const uint8_t*, float*)>
struct Blocks {
    static constexpr int64_t kUnitValues = kValues;
    static constexpr int64_t kUnitBytes = kBytes;
    static void dequantize(const uint8_t* src, int64_t count, float* out) {
        for (int64_t b = 0; b < count / kValues; ++b) kBlock(src + b * kBytes, out + b * kValues);
    }
};

using F16 = Float16<fp16_to_f32, f16_vector>;
using BF16 = Float16<bf16_to_f32, bf16_vector>;
using Q8_0 = Blocks<kQuantBlock, kQ8_0BlockBytes, dequantize_q8_0_block>;
using Q4_0 = Blocks<kQuantBlock, kQ4_0BlockBytes, dequantize_q4_0_block>;
using Q4_1 = Blocks<kQuantBlock, kQ4_1BlockBytes, dequantize_q4_1_block>;
using Q5_0 = Blocks<kQuantBlock, kQ5_0BlockBytes, dequantize_q5_0_block>;
using Q5_1 = Blocks<kQuantBlock, kQ5_1BlockBytes, dequantize_q5_1_block>;
using IQ4_NL = Blocks<kQuantBlock, kIQ4_NLBlockBytes, dequantize_iq4_nl_block>;
using Q2_K = Blocks<kSuperBlock, kQ2_KBlockBytes, dequantize_q2_k_block>;
using Q3_K = Blocks<kSuperBlock, kQ3_KBlockBytes, dequantize_q3_k_block>;
using Q4_K = Blocks<kSuperBlock, kQ4_KBlockBytes, dequantize_q4_k_block>;
using Q5_K = Blocks<kSuperBlock, kQ5_KBlockBytes, dequantize_q5_k_block>;
using Q6_K = Blocks<kSuperBlock, kQ6_KBlockBytes, dequantize_q6_k_block>;
using IQ4_XS = Blocks<kSuperBlock, kIQ4_XSBlockBytes, dequantize_iq4_xs_block>;

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

// A table of this unit's float kernels with the int8 kernels and attention of `isa` (a namespace
// of qmatmul.h): kTable for this_isa; kernels_avx2.cpp also makes the AVX-VNNI table with it.
#define LFM_EDGE_KERNEL_TABLE(name, isa)               \
    KernelTable {                                      \
        name,                                          \
        kernels_of<F32>(),                             \
        kernels_of<F16>(),                             \
        kernels_of<BF16>(),                            \
        kernels_of<Q8_0>(isa::matmul_q8_0_packed),     \
        kernels_of<Q4_0>(isa::matmul_q4_0_packed),     \
        kernels_of<Q4_1>(isa::matmul_q4_1_packed),     \
        kernels_of<Q5_0>(isa::matmul_q5_0_packed),     \
        kernels_of<Q5_1>(isa::matmul_q5_1_packed),     \
        kernels_of<IQ4_NL>(isa::matmul_iq4_nl_packed), \
        kernels_of<Q2_K>(isa::matmul_q2_k_packed),     \
        kernels_of<Q3_K>(isa::matmul_q3_k_packed),     \
        kernels_of<Q4_K>(isa::matmul_q4_k_packed),     \
        kernels_of<Q5_K>(isa::matmul_q5_k_packed),     \
        kernels_of<Q6_K>(isa::matmul_q6_k_packed),     \
        kernels_of<IQ4_XS>(isa::matmul_iq4_xs_packed), \
        isa::quantize_row,                             \
        isa::attention,                                \
        isa::silu_mul,                                 \
        nullptr, /* pack_tiles: AMX only */            \
    }

constexpr KernelTable kTable = LFM_EDGE_KERNEL_TABLE(kIsaName, this_isa);

}  // namespace
}  // namespace lfm
