// Reference int8-activation kernels in portable C++17 (baseline flags): the twins of
// qmatmul_avx2.cpp and qmatmul_avx512.cpp, which must give the same bits (see kernels.h). The
// tiles that qmatmul_impl.h runs over the row groups, one output at a time.
#include <cmath>
#include <limits>

#include "formats.h"
#include "kernels.h"
#include "packed.h"
#include "qmatmul.h"

namespace lfm {
namespace scalar {

void quantize_row(const float* x, int64_t k, int8_t* q, float* d, int32_t* sum) {
    for (int64_t b = 0; b < k / kQuantBlock; ++b) {
        const float* xb = x + b * kQuantBlock;
        float amax = 0.0f;
        bool finite = true;
        for (int i = 0; i < kQuantBlock; ++i) {
            finite = finite && std::isfinite(xb[i]);
            amax = std::fmax(amax, std::fabs(xb[i]));
        }
        if (!finite) {  // converting NaN or inf to int is undefined: the block is NaN instead
            for (int i = 0; i < kQuantBlock; ++i) q[b * kQuantBlock + i] = 0;
            d[b] = std::numeric_limits<float>::quiet_NaN();
            sum[b] = 0;
            continue;
        }
        const float scale = amax / 127.0f;
        // |x * inverse| <= 127 (+ rounding) when scale is normal; a subnormal one quantizes to 0
        const float inverse = scale >= std::numeric_limits<float>::min() ? 1.0f / scale : 0.0f;
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

}  // namespace scalar

namespace {

namespace this_isa = scalar;
constexpr int kTokenTile = 1;  // no weight reuse to gain: each output is computed on its own
template <class Block>
constexpr int kDecodeStreams = 1;  // row groups a decode tile reads side by side
static inline bool decode_side_by_side() { return true; }

// y[t, row0 + r] = output(t, r) for the tokens t of the tile [t0, t0 + TT) and rows r < rows.
template <int TT, class Output>
void each_output(int64_t t0, int rows, float* y, int64_t ldy, int64_t row0, const Output& output) {
    for (int64_t t = t0; t < t0 + TT; ++t) {
        for (int r = 0; r < rows; ++r) y[t * ldy + row0 + r] = output(t, r);
    }
}

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

// The nibble of operand o (weights 4o .. 4o+3), lane (r, t), from a Q4_0x16-style qs[256].
inline int nibble(const uint8_t* qs, int o, int r, int t) {
    const uint8_t byte = qs[64 * (o % 4) + 4 * r + t];
    return o < 4 ? byte & 0x0f : byte >> 4;
}

// Lane (r, t) of operand o's 64-bit mask in qh[64] (Q5_0x16.qh and alike).
inline int mask_bit(const uint8_t* qh, int o, int r, int t) {
    const int bit = 4 * r + t;
    return (qh[8 * o + bit / 8] >> (bit % 8)) & 1;
}

// The 2-bit field of operand o, lane (r, t), from a Q6_Kx16.qh-style q2[128].
inline int pair(const uint8_t* q2, int o, int r, int t) {
    return (q2[64 * (o / 4) + 4 * r + t] >> (2 * (o % 4))) & 3;
}

// sum over the block of weight(o, t) * a[4o + t], weight an int function of (o, t).
template <class Weight>
int32_t dot32(const int8_t* a, const Weight& weight) {
    int32_t dot = 0;
    for (int o = 0; o < 8; ++o) {
        for (int t = 0; t < 4; ++t) dot += weight(o, t) * a[4 * o + t];
    }
    return dot;
}

int32_t block_dot(const Q4_1x16& blk, int r, const int8_t* a, int32_t /*a_sum*/) {
    return dot32(a, [&](int o, int t) { return nibble(blk.qs, o, r, t); });
}

int32_t block_dot(const Q5_0x16& blk, int r, const int8_t* a, int32_t a_sum) {
    return dot32(a, [&](int o, int t) { return nibble(blk.qs, o, r, t) | mask_bit(blk.qh, o, r, t) << 4; }) -
           16 * a_sum;
}

int32_t block_dot(const Q5_1x16& blk, int r, const int8_t* a, int32_t /*a_sum*/) {
    return dot32(a, [&](int o, int t) { return nibble(blk.qs, o, r, t) | mask_bit(blk.qh, o, r, t) << 4; });
}

int32_t block_dot(const IQ4_NLx16& blk, int r, const int8_t* a, int32_t /*a_sum*/) {
    return dot32(a, [&](int o, int t) { return static_cast<int>(kIq4Values[nibble(blk.qs, o, r, t)]); });
}

// The 32-weight types: acc += (d dx) dot per block of 32, then acc += (m dx) sum(a) for the
// types with a minimum (exact integers, as llama.cpp's q4_1 x q8_1 dot but with the activation
// sum an integer).
template <class Block, int TT>
void row_group_tile(const QuantizedRows& x, int64_t t0, const Block* blocks, int64_t nb, int rows,
                    float* y, int64_t ldy, int64_t row0) {
    each_output<TT>(t0, rows, y, ldy, row0, [&](int64_t t, int r) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
            const Block& blk = blocks[b];
            const int32_t dot = block_dot(blk, r, x.q + t * x.k + b * kQuantBlock, x.sum[t * nb + b]);
            const float scale = fp16_to_f32(blk.d[r]) * x.d[t * nb + b];
            acc = std::fma(scale, static_cast<float>(dot), acc);
            if constexpr (kHasMin<Block>) {
                const float min = fp16_to_f32(blk.m[r]) * x.d[t * nb + b];
                acc = std::fma(min, static_cast<float>(x.sum[t * nb + b]), acc);
            }
        }
        return acc;
    });
}

// Q4_K / Q5_K weight u (0..15 / 0..31) of sub-block j, operand o, lane (r, t).
inline int k_quant(const Q4_Kx16& blk, int j, int o, int r, int t) { return nibble(blk.qs[j], o, r, t); }
inline int k_quant(const Q5_Kx16& blk, int j, int o, int r, int t) {
    return nibble(blk.low.qs[j], o, r, t) | mask_bit(blk.qh[j], o, r, t) << 4;
}
inline const Q4_Kx16& low_part(const Q4_Kx16& blk) { return blk; }
inline const Q4_Kx16& low_part(const Q5_Kx16& blk) { return blk.low; }

// Q4_K / Q5_K: per sub-block of 32, acc += (s dx) dot(u, a), then acc -= (mn dx) sum(a), with
// s = d sc and mn = dmin m exact in float32.
template <class Block, int TT>
void k_affine_tile(const QuantizedRows& x, int64_t t0, const Block* blocks, int64_t nsb, int rows,
                   float* y, int64_t ldy, int64_t row0) {
    const int64_t nb = x.k / kQuantBlock;
    each_output<TT>(t0, rows, y, ldy, row0, [&](int64_t t, int r) {
        float acc = 0.0f;
        for (int64_t sb = 0; sb < nsb; ++sb) {
            const Block& blk = blocks[sb];
            const Q4_Kx16& low = low_part(blk);
            const float d = fp16_to_f32(low.d[r]), dmin = fp16_to_f32(low.dmin[r]);
            for (int j = 0; j < 8; ++j) {
                const int64_t b = 8 * sb + j;
                const int8_t* a = x.q + t * x.k + b * kQuantBlock;
                const float dx = x.d[t * nb + b];
                int32_t dot = 0;
                for (int o = 0; o < 8; ++o) {
                    for (int tt = 0; tt < 4; ++tt) dot += k_quant(blk, j, o, r, tt) * a[4 * o + tt];
                }
                const float s = d * static_cast<float>(low.sc[j][r]);
                const float mn = dmin * static_cast<float>(low.m[j][r]);
                acc = std::fma(s * dx, static_cast<float>(dot), acc);
                acc = std::fma(-(mn * dx), static_cast<float>(x.sum[t * nb + b]), acc);
            }
        }
        return acc;
    });
}

// Q6_K / Q3_K: the unsigned quant u of block j, operand o, lane (r, t), and the offset every
// quant carries (weight = scale * (u - offset)).
inline int scaled16_quant(const Q6_Kx16& blk, int j, int o, int r, int t) {
    return nibble(blk.ql[j], o, r, t) | pair(blk.qh[j], o, r, t) << 4;
}
inline int scaled16_quant(const Q3_Kx16& blk, int j, int o, int r, int t) {
    return pair(blk.q2[j], o, r, t) | mask_bit(blk.qh[j], o, r, t) << 2;
}
constexpr int32_t offset_of(const Q6_Kx16&) { return 32; }
constexpr int32_t offset_of(const Q3_Kx16&) { return 4; }

// Q6_K / Q3_K: per block of 32, the exact integer sc0 (dot0 - off sum0) + sc1 (dot1 - off sum1)
// over its two 16-weight halves, then acc += (d dx) * that.
template <class Block, int TT>
void scaled16_tile(const QuantizedRows& x, int64_t t0, const Block* blocks, int64_t nsb, int rows,
                   float* y, int64_t ldy, int64_t row0) {
    const int64_t nb = x.k / kQuantBlock;
    each_output<TT>(t0, rows, y, ldy, row0, [&](int64_t t, int r) {
        float acc = 0.0f;
        for (int64_t sb = 0; sb < nsb; ++sb) {
            const Block& blk = blocks[sb];
            const int32_t offset = offset_of(blk);
            const float d = fp16_to_f32(blk.d[r]);
            for (int j = 0; j < 8; ++j) {
                const int64_t b = 8 * sb + j;
                const int8_t* a = x.q + t * x.k + b * kQuantBlock;
                const int32_t* s16 = x.sum16 + t * 2 * nb + 2 * b;  // the block's two halves
                int32_t dot[2] = {0, 0};
                for (int o = 0; o < 8; ++o) {
                    for (int tt = 0; tt < 4; ++tt) dot[o / 4] += scaled16_quant(blk, j, o, r, tt) * a[4 * o + tt];
                }
                const int32_t combined = blk.sc[2 * j][r] * (dot[0] - offset * s16[0]) +
                                         blk.sc[2 * j + 1][r] * (dot[1] - offset * s16[1]);
                acc = std::fma(d * x.d[t * nb + b], static_cast<float>(combined), acc);
            }
        }
        return acc;
    });
}

// Q2_K: per block of 32, acc += (d dx) (sc0 dot0 + sc1 dot1), then acc -= (dmin dx) (m0 sum0 +
// m1 sum1), both brackets exact integers.
template <int TT>
void q2_k_tile(const QuantizedRows& x, int64_t t0, const Q2_Kx16* blocks, int64_t nsb, int rows,
               float* y, int64_t ldy, int64_t row0) {
    const int64_t nb = x.k / kQuantBlock;
    each_output<TT>(t0, rows, y, ldy, row0, [&](int64_t t, int r) {
        float acc = 0.0f;
        for (int64_t sb = 0; sb < nsb; ++sb) {
            const Q2_Kx16& blk = blocks[sb];
            const float d = fp16_to_f32(blk.d[r]), dmin = fp16_to_f32(blk.dmin[r]);
            for (int j = 0; j < 8; ++j) {
                const int64_t b = 8 * sb + j;
                const int8_t* a = x.q + t * x.k + b * kQuantBlock;
                const int32_t* s16 = x.sum16 + t * 2 * nb + 2 * b;
                int32_t dot[2] = {0, 0};
                for (int o = 0; o < 8; ++o) {
                    for (int tt = 0; tt < 4; ++tt) dot[o / 4] += pair(blk.q2[j], o, r, tt) * a[4 * o + tt];
                }
                const uint8_t sm0 = blk.sm[2 * j][r], sm1 = blk.sm[2 * j + 1][r];
                const int32_t scaled = (sm0 & 15) * dot[0] + (sm1 & 15) * dot[1];
                const int32_t mins = (sm0 >> 4) * s16[0] + (sm1 >> 4) * s16[1];
                const float dx = x.d[t * nb + b];
                acc = std::fma(d * dx, static_cast<float>(scaled), acc);
                acc = std::fma(-(dmin * dx), static_cast<float>(mins), acc);
            }
        }
        return acc;
    });
}

// IQ4_XS: per sub-block of 32, acc += (d dx) (sc dot(kIq4Values[u], a)).
template <int TT>
void iq4_xs_tile(const QuantizedRows& x, int64_t t0, const IQ4_XSx16* blocks, int64_t nsb, int rows,
                 float* y, int64_t ldy, int64_t row0) {
    const int64_t nb = x.k / kQuantBlock;
    each_output<TT>(t0, rows, y, ldy, row0, [&](int64_t t, int r) {
        float acc = 0.0f;
        for (int64_t sb = 0; sb < nsb; ++sb) {
            const IQ4_XSx16& blk = blocks[sb];
            const float d = fp16_to_f32(blk.d[r]);
            for (int j = 0; j < 8; ++j) {
                const int64_t b = 8 * sb + j;
                const int8_t* a = x.q + t * x.k + b * kQuantBlock;
                const int32_t dot = dot32(a, [&](int o, int tt) { return static_cast<int>(kIq4Values[nibble(blk.qs[j], o, r, tt)]); });
                acc = std::fma(d * x.d[t * nb + b], static_cast<float>(blk.sc[j][r] * dot), acc);
            }
        }
        return acc;
    });
}

}  // namespace
}  // namespace lfm

#include "qmatmul_impl.h"
