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

// The nibble of operand o (weights 4o .. 4o+3), lane (r, t), from a Q4_0x16-style qs[256].
inline int nibble(const uint8_t* qs, int o, int r, int t) {
    const uint8_t byte = qs[64 * (o % 4) + 4 * r + t];
    return o < 4 ? byte & 0x0f : byte >> 4;
}

// Q4_K / Q5_K weight u (0..15 / 0..31) of sub-block j, operand o, lane (r, t).
inline int k_quant(const Q4_Kx16& blk, int j, int o, int r, int t) { return nibble(blk.qs[j], o, r, t); }
inline int k_quant(const Q5_Kx16& blk, int j, int o, int r, int t) {
    const int bit = 4 * r + t;
    return nibble(blk.low.qs[j], o, r, t) | (((blk.qh[j][8 * o + bit / 8] >> (bit % 8)) & 1) << 4);
}
inline const Q4_Kx16& low_part(const Q4_Kx16& blk) { return blk; }
inline const Q4_Kx16& low_part(const Q5_Kx16& blk) { return blk.low; }

// Q4_K / Q5_K: per sub-block of 32, acc += (s dx) dot(u, a), then acc -= (mn dx) sum(a), with
// s = d sc and mn = dmin m exact in float32.
template <class Block>
void matmul_k_affine(const QuantizedRows& x, const uint8_t* w, int64_t n_rows, int64_t group_begin,
                     int64_t group_end, float* y, int64_t ldy) {
    const int64_t nb = x.k / kQuantBlock, nsb = x.k / kSuperBlock;
    const auto* blocks = reinterpret_cast<const Block*>(w);  // [groups][nsb]
    for (int64_t g = group_begin; g < group_end; ++g) {
        const Block* row_group = blocks + g * nsb;
        const int rows = static_cast<int>(std::min<int64_t>(kRowGroup, n_rows - g * kRowGroup));
        for (int64_t t = 0; t < x.n_tokens; ++t) {
            const int8_t* q = x.q + t * x.k;
            const float* dx = x.d + t * nb;
            const int32_t* sx = x.sum + t * nb;
            for (int r = 0; r < rows; ++r) {
                float acc = 0.0f;
                for (int64_t sb = 0; sb < nsb; ++sb) {
                    const Block& blk = row_group[sb];
                    const Q4_Kx16& low = low_part(blk);
                    const float d = fp16_to_f32(low.d[r]), dmin = fp16_to_f32(low.dmin[r]);
                    for (int j = 0; j < 8; ++j) {
                        const int64_t b = 8 * sb + j;
                        const int8_t* a = q + b * kQuantBlock;
                        int32_t dot = 0;
                        for (int o = 0; o < 8; ++o) {
                            for (int tt = 0; tt < 4; ++tt) dot += k_quant(blk, j, o, r, tt) * a[4 * o + tt];
                        }
                        const float s = d * static_cast<float>(low.sc[j][r]);
                        const float mn = dmin * static_cast<float>(low.m[j][r]);
                        acc = std::fma(s * dx[b], static_cast<float>(dot), acc);
                        acc = std::fma(-(mn * dx[b]), static_cast<float>(sx[b]), acc);
                    }
                }
                y[t * ldy + g * kRowGroup + r] = acc;
            }
        }
    }
}

// Q6_K: per block of 32, the exact integer sc0 (dot0 - 32 sum0) + sc1 (dot1 - 32 sum1) over its
// two 16-weight halves, then acc += (d dx) * that.
void matmul_q6_k(const QuantizedRows& x, const uint8_t* w, int64_t n_rows, int64_t group_begin,
                 int64_t group_end, float* y, int64_t ldy) {
    const int64_t nb = x.k / kQuantBlock, nsb = x.k / kSuperBlock;
    const auto* blocks = reinterpret_cast<const Q6_Kx16*>(w);  // [groups][nsb]
    for (int64_t g = group_begin; g < group_end; ++g) {
        const Q6_Kx16* row_group = blocks + g * nsb;
        const int rows = static_cast<int>(std::min<int64_t>(kRowGroup, n_rows - g * kRowGroup));
        for (int64_t t = 0; t < x.n_tokens; ++t) {
            const int8_t* q = x.q + t * x.k;
            const float* dx = x.d + t * nb;
            const int32_t* s16 = x.sum16 + t * 2 * nb;
            for (int r = 0; r < rows; ++r) {
                float acc = 0.0f;
                for (int64_t sb = 0; sb < nsb; ++sb) {
                    const Q6_Kx16& blk = row_group[sb];
                    const float d = fp16_to_f32(blk.d[r]);
                    for (int j = 0; j < 8; ++j) {
                        const int64_t b = 8 * sb + j;
                        const int8_t* a = q + b * kQuantBlock;
                        int32_t dot[2] = {0, 0};
                        for (int o = 0; o < 8; ++o) {
                            for (int tt = 0; tt < 4; ++tt) {
                                const int high = (blk.qh[j][64 * (o / 4) + 4 * r + tt] >> (2 * (o % 4))) & 3;
                                const int u = nibble(blk.ql[j], o, r, tt) | (high << 4);
                                dot[o / 4] += u * a[4 * o + tt];
                            }
                        }
                        const int32_t combined = blk.sc[2 * j][r] * (dot[0] - 32 * s16[2 * b]) +
                                                 blk.sc[2 * j + 1][r] * (dot[1] - 32 * s16[2 * b + 1]);
                        acc = std::fma(d * dx[b], static_cast<float>(combined), acc);
                    }
                }
                y[t * ldy + g * kRowGroup + r] = acc;
            }
        }
    }
}

}  // namespace

void matmul_q4_k_packed(const QuantizedRows& x, const uint8_t* w, int64_t n_rows,
                        int64_t group_begin, int64_t group_end, float* y, int64_t ldy) {
    matmul_k_affine<Q4_Kx16>(x, w, n_rows, group_begin, group_end, y, ldy);
}

void matmul_q5_k_packed(const QuantizedRows& x, const uint8_t* w, int64_t n_rows,
                        int64_t group_begin, int64_t group_end, float* y, int64_t ldy) {
    matmul_k_affine<Q5_Kx16>(x, w, n_rows, group_begin, group_end, y, ldy);
}

void matmul_q6_k_packed(const QuantizedRows& x, const uint8_t* w, int64_t n_rows,
                        int64_t group_begin, int64_t group_end, float* y, int64_t ldy) {
    matmul_q6_k(x, w, n_rows, group_begin, group_end, y, ldy);
}

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
