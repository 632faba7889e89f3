// Reference int8-activation kernels in portable C++17 (baseline flags): the twins of
// qmatmul_avx2.cpp and qmatmul_avx512.cpp, which must give the same bits (see kernels.h).
#include <cmath>

#include "attention_impl.h"
#include "formats.h"
#include "packed.h"
#include "qmatmul.h"

namespace lfm {
namespace scalar {

void quantize_row(const float* x, int64_t k, int8_t* q, float* d, int32_t* sum) {
    for (int64_t b = 0; b < k / kQuantBlock; ++b) {
        const float* xb = x + b * kQuantBlock;
        float amax = 0.0f;
        for (int i = 0; i < kQuantBlock; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
        const float scale = amax / 127.0f;
        const float inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
        int32_t total = 0;
        for (int i = 0; i < kQuantBlock; ++i) {
            const auto v = static_cast<int32_t>(std::nearbyint(xb[i] * inverse));  // ties to even
            q[b * kQuantBlock + i] = static_cast<int8_t>(v);
            total += v;
        }
        d[b] = scale;
        sum[b] = total;
    }
}

namespace {

// The integer dot product of row r of a packed block with 32 int8 activations, minus the
// offset the packed format adds to every weight (8 for Q4_0 nibbles, 128 for Q8_0 bytes).
int32_t block_dot(const Q4_0x16& blk, int r, const int8_t* a, int32_t a_sum) {
    int32_t dot = 0;
    for (int c = 0; c < 4; ++c) {
        for (int j = 0; j < 4; ++j) {
            const uint8_t byte = blk.qs[64 * c + 4 * r + j];
            dot += (byte & 0x0f) * a[4 * c + j] + (byte >> 4) * a[16 + 4 * c + j];
        }
    }
    return dot - 8 * a_sum;
}

int32_t block_dot(const Q8_0x16& blk, int r, const int8_t* a, int32_t a_sum) {
    int32_t dot = 0;
    for (int quad = 0; quad < 8; ++quad) {
        for (int j = 0; j < 4; ++j) dot += blk.qs[64 * quad + 4 * r + j] * a[4 * quad + j];
    }
    return dot - 128 * a_sum;
}

template <class Block>
void matmul_packed(const QuantizedRows& x, const uint8_t* w, int64_t n_rows, int64_t group_begin,
                   int64_t group_end, float* y, int64_t ldy) {
    const int64_t nb = x.k / kQuantBlock;
    const auto* blocks = reinterpret_cast<const Block*>(w);  // [groups][nb]
    for (int64_t g = group_begin; g < group_end; ++g) {
        const Block* row_group = blocks + g * nb;
        const int rows = static_cast<int>(std::min<int64_t>(kRowGroup, n_rows - g * kRowGroup));
        for (int64_t t = 0; t < x.n_tokens; ++t) {
            const int8_t* q = x.q + t * x.k;
            const float* dx = x.d + t * nb;
            const int32_t* sx = x.sum + t * nb;
            for (int r = 0; r < rows; ++r) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; ++b) {
                    const Block& blk = row_group[b];
                    const int32_t dot = block_dot(blk, r, q + b * kQuantBlock, sx[b]);
                    const float scale = fp16_to_f32(blk.d[r]) * dx[b];
                    acc = std::fma(scale, static_cast<float>(dot), acc);
                }
                y[t * ldy + g * kRowGroup + r] = acc;
            }
        }
    }
}

}  // namespace

void matmul_q4_0_packed(const QuantizedRows& x, const uint8_t* w, int64_t n_rows,
                        int64_t group_begin, int64_t group_end, float* y, int64_t ldy) {
    matmul_packed<Q4_0x16>(x, w, n_rows, group_begin, group_end, y, ldy);
}

void matmul_q8_0_packed(const QuantizedRows& x, const uint8_t* w, int64_t n_rows,
                        int64_t group_begin, int64_t group_end, float* y, int64_t ldy) {
    matmul_packed<Q8_0x16>(x, w, n_rows, group_begin, group_end, y, ldy);
}

void attention(const AttentionArgs& a, int64_t kv_head, int64_t t_begin, int64_t t_end) {
    attention_rows(a, kv_head, t_begin, t_end);
}

}  // namespace scalar
}  // namespace lfm
