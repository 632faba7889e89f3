// Repacking into the 16-row layouts (see packed.h and pack.h). Baseline flags: plain byte
// shuffling. Every packer decodes a GGUF block into its integers (formats.h) and places them;
// nothing is rounded or re-quantized.
#include "pack.h"

#include <algorithm>
#include <cstring>

#include "formats.h"
#include "packed.h"

namespace lfm {
namespace {

// ---- placing one row's 32 quants q[32] of a block into the x16 layouts (row r of 16)

// Low 4 bits into a Q4_0x16-style qs[256]: operand c / c + 4 in the low / high nibbles.
void put_nibbles(const uint8_t* q, int r, uint8_t* qs) {
    for (int c = 0; c < 4; ++c) {
        for (int t = 0; t < 4; ++t) {
            qs[64 * c + 4 * r + t] = static_cast<uint8_t>((q[4 * c + t] & 0x0f) | ((q[16 + 4 * c + t] & 0x0f) << 4));
        }
    }
}

// Bit `bit` of each quant into 8 64-bit masks qh[64]: weight i = 4o + t is bit 4r + t of mask o.
void put_bit_masks(const uint8_t* q, int bit, int r, uint8_t* qh) {
    for (int i = 0; i < kQuantBlock; ++i) {
        const int o = i / 4, lane_bit = 4 * r + i % 4;
        qh[8 * o + lane_bit / 8] |= static_cast<uint8_t>(((q[i] >> bit) & 1) << (lane_bit % 8));
    }
}

// Bits shift, shift + 1 of each quant into dst[128]: operand o = 4v + s at bits 2s, 2s+1 of byte
// 64 v + 4 r + t.
void put_pairs(const uint8_t* q, int shift, int r, uint8_t* dst) {
    for (int o = 0; o < 8; ++o) {
        for (int t = 0; t < 4; ++t) {
            const int pair = (q[4 * o + t] >> shift) & 3;
            dst[64 * (o / 4) + 4 * r + t] |= static_cast<uint8_t>(pair << (2 * (o % 4)));
        }
    }
}

// ---- the 32-weight types: row r of an x16 block from one GGUF block

void put_row(const uint8_t* block, int r, Q4_0x16& out) {
    out.d[r] = load_u16(block);
    for (int c = 0; c < 4; ++c) std::memcpy(out.qs + 64 * c + 4 * r, block + 2 + 4 * c, 4);  // GGUF byte i: weights i, i + 16
}

void put_row(const uint8_t* block, int r, IQ4_NLx16& out) {
    out.d[r] = load_u16(block);
    for (int c = 0; c < 4; ++c) std::memcpy(out.qs + 64 * c + 4 * r, block + 2 + 4 * c, 4);
}

void put_row(const uint8_t* block, int r, Q4_1x16& out) {
    out.d[r] = load_u16(block);
    out.m[r] = load_u16(block + 2);
    for (int c = 0; c < 4; ++c) std::memcpy(out.qs + 64 * c + 4 * r, block + 4 + 4 * c, 4);
}

void put_row(const uint8_t* block, int r, Q5_0x16& out) {
    uint8_t q[kQuantBlock];
    five_bit_quants(block + 2, block + 6, q);
    out.d[r] = load_u16(block);
    put_nibbles(q, r, out.qs);
    put_bit_masks(q, 4, r, out.qh);
}

void put_row(const uint8_t* block, int r, Q5_1x16& out) {
    uint8_t q[kQuantBlock];
    five_bit_quants(block + 4, block + 8, q);
    out.d[r] = load_u16(block);
    out.m[r] = load_u16(block + 2);
    put_nibbles(q, r, out.qs);
    put_bit_masks(q, 4, r, out.qh);
}

void put_row(const uint8_t* block, int r, Q8_0x16& out) {
    out.d[r] = load_u16(block);
    for (int quad = 0; quad < 8; ++quad) {
        for (int j = 0; j < 4; ++j) {
            out.qs[64 * quad + 4 * r + j] = static_cast<uint8_t>(block[2 + 4 * quad + j] ^ 0x80);  // w + 128
        }
    }
}

// ---- the super-block types: row r of an x16 block from one GGUF super-block

void put_k_scales(const uint8_t* block, int r, Q4_Kx16& out) {
    out.d[r] = load_u16(block);
    out.dmin[r] = load_u16(block + 2);
    for (int j = 0; j < 8; ++j) k_scale_min(block + 4, j, &out.sc[j][r], &out.m[j][r]);
}

// Q4_K's 128 nibble bytes hold sub-blocks 2p and 2p + 1 in the low and high nibbles of the 32
// bytes at 32p; the packed byte of operands c / c + 4 pairs weights i and 16 + i of one sub-block.
// So 4 bytes at a time: the low (even j) or high (odd j) nibbles of the bytes at 32p + 4c and
// 32p + 16 + 4c, side by side: the bytes put_nibbles would write from q4_k_quants, without them.
void put_row(const uint8_t* block, int r, Q4_Kx16& out) {
    constexpr uint32_t kLow = 0x0f0f0f0fu;
    put_k_scales(block, r, out);
    const uint8_t* qs = block + 16;
    for (int p = 0; p < 4; ++p) {
        for (int c = 0; c < 4; ++c) {
            uint32_t a, b;
            std::memcpy(&a, qs + 32 * p + 4 * c, 4);
            std::memcpy(&b, qs + 32 * p + 16 + 4 * c, 4);
            const uint32_t even = (a & kLow) | ((b & kLow) << 4);
            const uint32_t odd = ((a >> 4) & kLow) | (b & ~kLow);
            std::memcpy(out.qs[2 * p] + 64 * c + 4 * r, &even, 4);
            std::memcpy(out.qs[2 * p + 1] + 64 * c + 4 * r, &odd, 4);
        }
    }
}

void put_row(const uint8_t* block, int r, Q5_Kx16& out) {
    uint8_t q[kSuperBlock];
    q5_k_quants(block, q);
    put_k_scales(block, r, out.low);
    for (int j = 0; j < 8; ++j) {
        put_nibbles(q + 32 * j, r, out.low.qs[j]);
        put_bit_masks(q + 32 * j, 4, r, out.qh[j]);
    }
}

// Q6_K, 4 bytes at a time as Q4_K: in each half h (128 weights), sub-block 4h + k takes the low
// (k = 0, 1) or high (k = 2, 3) nibbles of the 32 ql bytes at 64h + 32 (k % 2), and bits 2k, 2k + 1
// of the 32 qh bytes at 128 + 32h (q6_k_quants); put_pairs's byte for operands 4v .. 4v + 3 holds
// weight 16v + 4s + t's two bits at bits 2s (t: the byte in the word).
void put_row(const uint8_t* block, int r, Q6_Kx16& out) {
    constexpr uint32_t kLow = 0x0f0f0f0fu, kTwoBits = 0x03030303u;
    out.d[r] = load_u16(block + 208);
    for (int i = 0; i < 16; ++i) out.sc[i][r] = static_cast<int8_t>(block[192 + i]);
    for (int h = 0; h < 2; ++h) {
        for (int odd_half = 0; odd_half < 2; ++odd_half) {
            const uint8_t* ql = block + 64 * h + 32 * odd_half;
            for (int c = 0; c < 4; ++c) {
                uint32_t a, b;
                std::memcpy(&a, ql + 4 * c, 4);
                std::memcpy(&b, ql + 16 + 4 * c, 4);
                const uint32_t low = (a & kLow) | ((b & kLow) << 4);
                const uint32_t high = ((a >> 4) & kLow) | (b & ~kLow);
                std::memcpy(out.ql[4 * h + odd_half] + 64 * c + 4 * r, &low, 4);
                std::memcpy(out.ql[4 * h + odd_half + 2] + 64 * c + 4 * r, &high, 4);
            }
        }
        const uint8_t* qh = block + 128 + 32 * h;
        for (int k = 0; k < 4; ++k) {
            for (int v = 0; v < 2; ++v) {
                uint32_t pairs = 0;
                for (int s = 0; s < 4; ++s) {
                    uint32_t w;
                    std::memcpy(&w, qh + 16 * v + 4 * s, 4);
                    pairs |= ((w >> (2 * k)) & kTwoBits) << (2 * s);
                }
                std::memcpy(out.qh[4 * h + k] + 64 * v + 4 * r, &pairs, 4);
            }
        }
    }
}

void put_row(const uint8_t* block, int r, Q2_Kx16& out) {
    uint8_t q[kSuperBlock];
    q2_k_quants(block, q);
    out.d[r] = load_u16(block + 80);
    out.dmin[r] = load_u16(block + 82);
    for (int i = 0; i < 16; ++i) out.sm[i][r] = block[i];
    for (int j = 0; j < 8; ++j) put_pairs(q + 32 * j, 0, r, out.q2[j]);
}

void put_row(const uint8_t* block, int r, Q3_Kx16& out) {
    uint8_t q[kSuperBlock];
    q3_k_quants(block, q);
    out.d[r] = load_u16(block + 108);
    for (int i = 0; i < 16; ++i) out.sc[i][r] = static_cast<int8_t>(q3_k_scale(block + 96, i));
    for (int j = 0; j < 8; ++j) {
        put_pairs(q + 32 * j, 0, r, out.q2[j]);
        put_bit_masks(q + 32 * j, 2, r, out.qh[j]);
    }
}

// IQ4_XS's sub-block j is 16 bytes of nibble pairs (weights i, 16 + i) as Q4_0's: moved as is.
void put_row(const uint8_t* block, int r, IQ4_XSx16& out) {
    out.d[r] = load_u16(block);
    for (int j = 0; j < 8; ++j) {
        out.sc[j][r] = static_cast<int8_t>(iq4_xs_scale(block, j));
        for (int c = 0; c < 4; ++c) std::memcpy(out.qs[j] + 64 * c + 4 * r, block + 8 + 16 * j + 4 * c, 4);
    }
}

// Padding rows (past n) are all zero, scales included, so they compute 0; Q8_0 stores int8
// zero as 0x80.
void clear(Q8_0x16& blk) {
    std::memset(&blk, 0, sizeof blk);
    std::memset(blk.qs, 0x80, sizeof blk.qs);
}
template <class Block>
void clear(Block& blk) {
    std::memset(&blk, 0, sizeof blk);
}

// The packers that OR bits into their block (put_bit_masks, put_pairs) need it zeroed first; the
// others write every byte of a row's share.
template <class Block>
constexpr bool kOrsIntoBlock = false;
template <>
constexpr bool kOrsIntoBlock<Q5_0x16> = true;
template <>
constexpr bool kOrsIntoBlock<Q5_1x16> = true;
template <>
constexpr bool kOrsIntoBlock<Q5_Kx16> = true;
template <>
constexpr bool kOrsIntoBlock<Q2_Kx16> = true;
template <>
constexpr bool kOrsIntoBlock<Q3_Kx16> = true;

// Row group g of the n x k GGUF matrix src into out[k / block_values].
template <class Block>
void pack_group(QType qtype, const uint8_t* src, int64_t n, int64_t k, int64_t g, Block* out) {
    const QTypeInfo& info = qtype_info(qtype);
    const int64_t nb = k / info.block_values;
    const int rows = static_cast<int>(std::min<int64_t>(kRowGroup, n - g * kRowGroup));
    for (int64_t b = 0; b < nb; ++b) {
        // padding rows (a last, partial group) stay zero
        if (rows < kRowGroup || kOrsIntoBlock<Block>) clear(out[b]);
        for (int r = 0; r < rows; ++r) {
            put_row(src + ((g * kRowGroup + r) * nb + b) * info.block_bytes, r, out[b]);
        }
    }
}

template <class Block>
void pack_groups(QType qtype, const uint8_t* src, int64_t n, int64_t k, int64_t group_begin,
                 int64_t group_end, uint8_t* dst) {
    static_assert(sizeof(Block) % kRowGroup == 0, "a packed block is 16 rows");
    const int64_t nb = k / qtype_info(qtype).block_values;
    for (int64_t g = group_begin; g < group_end; ++g) {
        pack_group(qtype, src, n, k, g, reinterpret_cast<Block*>(dst) + g * nb);
    }
}

}  // namespace

int64_t packed_bytes(QType qtype, int64_t n, int64_t k) {
    const QTypeInfo& info = qtype_info(qtype);
    return row_groups(n) * (k / info.block_values) * info.packed_bytes;
}

int64_t gguf_row_bytes(QType qtype, int64_t k) {
    const QTypeInfo& info = qtype_info(qtype);
    return k / info.block_values * info.block_bytes;
}

void pack_row_groups(QType qtype, const uint8_t* src, int64_t n, int64_t k, int64_t group_begin,
                     int64_t group_end, uint8_t* dst) {
    switch (qtype) {
        case QType::Q4_0: return pack_groups<Q4_0x16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::Q4_1: return pack_groups<Q4_1x16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::Q5_0: return pack_groups<Q5_0x16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::Q5_1: return pack_groups<Q5_1x16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::Q8_0: return pack_groups<Q8_0x16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::IQ4_NL: return pack_groups<IQ4_NLx16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::Q2_K: return pack_groups<Q2_Kx16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::Q3_K: return pack_groups<Q3_Kx16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::Q4_K: return pack_groups<Q4_Kx16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::Q5_K: return pack_groups<Q5_Kx16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::Q6_K: return pack_groups<Q6_Kx16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::IQ4_XS: return pack_groups<IQ4_XSx16>(qtype, src, n, k, group_begin, group_end, dst);
        case QType::F32:
        case QType::F16:
        case QType::BF16: break;  // read as stored, never packed
    }
}

}  // namespace lfm
